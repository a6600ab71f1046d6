// The CPU backend's compiled building blocks, shared by the fused and the
// unfused paths so that comparing the two isolates fusion: one register-
// blocked product micro-kernel, operand packing, and row normalisations.
#pragma once
#include <cstddef>
#include <cstdint>

#include <attnfuse/element.hpp>

#include "width.hpp"

namespace attnfuse::cpu::kernels {
inline namespace ATTNFUSE_CPU_ISA {

// Operands of the product micro-kernel come in panels of 16 columns. Its
// register block: 6 rows x one panel (twelve 8-lane accumulators) at 8
// lanes; at 16 lanes (AVX-512, 32 registers) 8 rows x 3 panels, 12 x 2 or
// 16 x 1, whichever the panels left allow (kernels.cpp). Callers split rows
// into items of 8 * block_rows = 48, a multiple of every block's rows (6, 8,
// 12, 16), so that only an item's last block is partial.
inline constexpr std::size_t block_rows = 6;
inline constexpr std::size_t panel_width = 16;

inline constexpr std::size_t round_up(std::size_t n, std::size_t m) { return (n + m - 1) / m * m; }

// Packs B (depth x cols), B(p, c) = b[p*p_stride + c*c_stride], into panels of
// 16 columns: panel q holds [depth][16], columns past `cols` zero.
void pack_panels(std::size_t depth, std::size_t cols, const float* b, std::ptrdiff_t p_stride,
                 std::ptrdiff_t c_stride, float* packed);

// C (rows x panels*16) = or += A (rows x depth) * B, with B in panels of 16
// columns: B(p, q*16 + c) = b[q*panel_stride + p*p_stride + c] (a packed
// panel has p_stride 16, panel_stride depth*16; a row-major matrix whose
// width is a multiple of 16 is its own panels: p_stride its row stride,
// panel_stride 16), and A(r, p) = a[r*r_stride + p*p_stride] in any layout.
void multiply_panels(std::size_t rows, std::size_t panels, std::size_t depth, const float* a, std::ptrdiff_t r_stride,
                     std::ptrdiff_t p_stride, const float* b, std::ptrdiff_t b_p_stride, std::ptrdiff_t b_panel_stride,
                     float* c, std::size_t ldc, bool accumulate);
// The same with B stored 16-bit, widened in registers as it is loaded (the
// values of a 16-bit V cache, read in place).
void multiply_panels(std::size_t rows, std::size_t panels, std::size_t depth, const float* a, std::ptrdiff_t r_stride,
                     std::ptrdiff_t p_stride, const half* b, std::ptrdiff_t b_p_stride, std::ptrdiff_t b_panel_stride,
                     float* c, std::size_t ldc, bool accumulate);
void multiply_panels(std::size_t rows, std::size_t panels, std::size_t depth, const float* a, std::ptrdiff_t r_stride,
                     std::ptrdiff_t p_stride, const bfloat16* b, std::ptrdiff_t b_p_stride, std::ptrdiff_t b_panel_stride,
                     float* c, std::size_t ldc, bool accumulate);

// C (rows x panels*16) = or += A (rows x depth) * packed B, where
// A(r, p) = a[r*r_stride + p*p_stride] (any layout: A is read by broadcasts)
// and C has leading dimension ldc (>= panels*16).
void multiply_packed(std::size_t rows, std::size_t panels, std::size_t depth, const float* a, std::ptrdiff_t r_stride,
                     std::ptrdiff_t p_stride, const float* packed_b, float* c, std::size_t ldc, bool accumulate);

// dst[i*ld + j] = src[i*i_stride + j*j_stride] widened to fp32, for
// i < rows, j < cols; columns cols .. padded_cols-1 of each row are zero.
// Vector conversions where j_stride is 1 (F16C's vcvtph2ps for f16; bf16 by
// a 16-bit shift), exact either way: how the fused kernel reads a 16-bit
// operand that no kernel below reads in place, a tile at a time into its
// scratch.
void widen_block(const half* src, std::size_t rows, std::size_t cols, std::ptrdiff_t i_stride, std::ptrdiff_t j_stride,
                 float* dst, std::size_t ld, std::size_t padded_cols);
void widen_block(const bfloat16* src, std::size_t rows, std::size_t cols, std::ptrdiff_t i_stride, std::ptrdiff_t j_stride,
                 float* dst, std::size_t ld, std::size_t padded_cols);

// ---- bf16 products (bf16_products.cpp) ------------------------------------
// AVX512-BF16's vdpbf16ps multiplies pairs of bf16 values and adds both
// products to an fp32 lane: twice the multiply-adds of an fp32 FMA per
// instruction. Operands come as pairs along the depth of the product.
//
// True where this build has the bf16 kernels (16-lane builds) and the CPU
// runs them; nothing below may be called otherwise.
bool bf16_products_available();

// B (depth x cols), B(p, c) = b[p*p_stride + c*c_stride], packed for the
// product: panels of 16 columns, panel q at packed + q*pairs*32 holding, for
// each pair j of depth steps, 16 columns x (B(2j, c), B(2j+1, c)); zero past
// `cols` and past `depth` (pairs = ceil(depth / 2)).
void pack_bf16_pairs(std::size_t depth, std::size_t cols, const bfloat16* b, std::ptrdiff_t p_stride, std::ptrdiff_t c_stride,
                     bfloat16* packed);

// C (rows x panels*16) = scale * A*B (accumulate: C += scale * A*B), A in
// pairs, A(r, 2j + i) = a[r*a_r_stride + j*a_pair_stride + i] for i in {0, 1},
// and B packed by pack_bf16_pairs over `pairs` pairs. Products exact, sums
// fp32.
void multiply_bf16_pairs(std::size_t rows, std::size_t panels, std::size_t pairs, const bfloat16* a, std::ptrdiff_t a_r_stride,
                         std::ptrdiff_t a_pair_stride, const bfloat16* b, float* c, std::size_t ldc, bool accumulate,
                         float scale);

// The fused kernel's weights, a transposed tile st (keys x queries, leading
// dimension ld, queries a multiple of 16 <= ld), rounded to bf16 (nearest,
// even) as the A operand of their product with V: pairs of keys, query q's
// pair j at out[(j*ld + q)*2] (a_r_stride 2, a_pair_stride 2*ld); an odd
// last key pairs with 0.
void round_weight_pairs(const float* st, std::size_t keys, std::size_t queries, std::size_t ld, bfloat16* out);

// Running state of one query row in the fused kernel.
struct row_state {
    float max;  // -inf until a key is kept
    float sum;  // sum of exp(s - max) over the keys seen
};

// Online-softmax step for one tile of scores s (rows x cols, leading
// dimension lds): turns s into p = exp(s - new max) in place (columns up to
// round_up(cols, 8) are written, past `cols` zero), rescales the rows of the
// accumulator o (leading dimension ldo, o_cols columns) and updates state.
void online_softmax_step(float* s, std::size_t rows, std::size_t cols, std::size_t lds, row_state* state, float* o,
                         std::size_t ldo, std::size_t o_cols);

// Online-softmax step on a transposed tile st (keys x queries, leading
// dimension ld): query q's scores are column q, tile_max[q] their maximum
// (NaN when one is NaN). Turns st into p = exp(st - new max) in place,
// updates state[q] and rescales row q of the accumulator o.
void online_softmax_columns(float* st, std::size_t keys, std::size_t queries, std::size_t ld, const float* tile_max,
                            row_state* state, float* o, std::size_t ldo, std::size_t o_cols);

// For x / (row_sum(x) + c): adds each query's weights in the tile to its
// running sum, for a transposed tile (keys x queries) or a row tile.
void accumulate_column_sums(const float* st, std::size_t keys, std::size_t queries, std::size_t ld, row_state* state);
void accumulate_row_sums(const float* s, std::size_t rows, std::size_t cols, std::size_t lds, row_state* state);

// Inverted dropout on a tile of weights, after the running sum has taken
// them: weight (query row0+r, key col0+c), stored at p[r*r_stride + c*c_stride],
// is kept where the hash of (seed, batch_head, row, key) passes the threshold
// and divided by 1 - probability.
void dropout_tile(float* p, std::size_t rows, std::size_t cols, std::ptrdiff_t r_stride, std::ptrdiff_t c_stride,
                  std::uint32_t seed, std::uint32_t threshold, float keep_scale, std::uint32_t batch_head,
                  std::size_t row0, std::size_t col0);

// Running argmax over a transposed tile (keys x queries): query q's best
// score, its key and whether a NaN was seen (strictly greater replaces).
void running_argmax_columns(const float* st, std::size_t keys, std::size_t queries, std::size_t ld, std::size_t key0,
                            float* best, std::size_t* index, unsigned char* nan_seen);

// s[r][c] = sum_p a(r, p) * b(c, p) by dot products: the product for a few
// rows (decode), where packing would cost as much as the arithmetic.
void multiply_dots(std::size_t rows, std::size_t cols, std::size_t depth, const float* a, std::ptrdiff_t a_r_stride,
                   std::ptrdiff_t a_p_stride, const float* b, std::ptrdiff_t b_c_stride, std::ptrdiff_t b_p_stride,
                   float* s, std::size_t lds);
// The same with b stored 16-bit, each column's depth contiguous (b_p_stride
// 1), widened in registers as it is loaded (the keys of a 16-bit K cache).
void multiply_dots(std::size_t rows, std::size_t cols, std::size_t depth, const float* a, std::ptrdiff_t a_r_stride,
                   std::ptrdiff_t a_p_stride, const half* b, std::ptrdiff_t b_c_stride, float* s, std::size_t lds);
void multiply_dots(std::size_t rows, std::size_t cols, std::size_t depth, const float* a, std::ptrdiff_t a_r_stride,
                   std::ptrdiff_t a_p_stride, const bfloat16* b, std::ptrdiff_t b_c_stride, float* s, std::size_t lds);

// Softmax of each row of s (rows x cols), in place; -inf entries get exactly
// 0, a row with every entry -inf becomes zeros, a row holding NaN becomes NaN.
// With row_max and row_sum, each row's max and sum of exp(s - max) go there
// too (a training forward's statistics: -inf and 0 for a row of -inf).
void softmax_rows(float* s, std::size_t rows, std::size_t cols, std::size_t lds, float* row_max = nullptr,
                  float* row_sum = nullptr);

// One-hot argmax of each row (ties: the lowest column); all -inf: zeros.
void hard_rows(float* s, std::size_t rows, std::size_t cols, std::size_t lds);

// Largest entry of each row and its first column, folded into best/index
// (strictly greater replaces: ties keep the earlier column).
void running_argmax(const float* s, std::size_t rows, std::size_t cols, std::size_t lds, std::size_t col0,
                    float* best, std::size_t* index, unsigned char* nan_seen);

}  // namespace ATTNFUSE_CPU_ISA
}  // namespace attnfuse::cpu::kernels
