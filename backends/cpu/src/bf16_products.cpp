// Products of bf16 operands with AVX512-BF16's vdpbf16ps: each fp32 lane
// takes the dot product of a pair of bf16 values with another pair, so one
// instruction does twice the multiply-adds of an fp32 FMA. The products of
// two bf16 values are exact in fp32 and the sums are fp32 (the instruction
// flushes denormals, which is why only attention's operands come here, never
// a caller's arbitrary data as a matter of course).
//
// The library's kernels are built for x86-64-v4, which AVX512-BF16 is not
// part of: only the functions below are compiled for it (GCC's target
// attribute, intrinsics only), and the executor calls them only where the
// CPU reports the feature (bf16_products_available).
#include "attnfuse/cpu/kernels.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "with_count.hpp"

// Built where the kernels are AVX-512 (the pairs are 16 lanes wide) and the
// compiler can target AVX512-BF16 (GCC 10, Clang 9).
#if defined(__AVX512F__) && defined(__AVX512BW__) && (__GNUC__ >= 10 || __clang_major__ >= 9)
#define ATTNFUSE_BF16_PRODUCTS 1
#include <immintrin.h>
#else
#define ATTNFUSE_BF16_PRODUCTS 0
#endif

namespace attnfuse::cpu::kernels {
inline namespace ATTNFUSE_CPU_ISA {

#if ATTNFUSE_BF16_PRODUCTS

bool bf16_products_available() {
    static const bool available = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
    return available;
}

#define ATTNFUSE_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace {

// 16-bit lane i of the low half and lane i of the high half, side by side:
// [a0..a15 | b0..b15] becomes [a0 b0 a1 b1 ... a15 b15].
alignas(64) constexpr std::uint16_t interleave_halves[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                             8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// The two bf16 values of a pair as one 32-bit lane, repeated in every lane.
ATTNFUSE_TARGET_BF16 inline __m512i broadcast_pair(const bfloat16* pair) {
    std::uint32_t bits;
    std::memcpy(&bits, pair, sizeof bits);
    return _mm512_set1_epi32(static_cast<int>(bits));
}

// R rows x P panels of C, the R*P accumulators in registers (the same
// blocking as the fp32 micro-kernel: 24 of 32 registers at most, beside P
// B vectors and a broadcast). Per pair of depth steps: P vectors of B (16
// columns x 2 depths each) are loaded once, each row's pair of A broadcast
// once.
template <int R, int P>
ATTNFUSE_TARGET_BF16 inline void micro_pairs(std::size_t pairs, const bfloat16* a, std::ptrdiff_t a_r_stride,
                                             std::ptrdiff_t a_pair_stride, const bfloat16* b, std::ptrdiff_t b_panel_stride,
                                             float* c, std::size_t ldc, bool accumulate, float scale) {
    __m512 acc[R][P];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < P; ++v) acc[r][v] = _mm512_setzero_ps();
    for (std::size_t j = 0; j < pairs; ++j) {
        __m512bh bv[P];
        for (int v = 0; v < P; ++v)
            bv[v] = (__m512bh)_mm512_loadu_si512(b + v * b_panel_stride + static_cast<std::ptrdiff_t>(j) * 2 * panel_width);
        const bfloat16* aj = a + static_cast<std::ptrdiff_t>(j) * a_pair_stride;
        for (int r = 0; r < R; ++r) {
            const __m512bh x = (__m512bh)broadcast_pair(aj + r * a_r_stride);
            for (int v = 0; v < P; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, bv[v]);
        }
    }
    const __m512 factor = _mm512_set1_ps(scale);
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < P; ++v) {
            float* at = c + r * ldc + v * panel_width;
            const __m512 base = accumulate ? _mm512_loadu_ps(at) : _mm512_setzero_ps();
            _mm512_storeu_ps(at, _mm512_fmadd_ps(acc[r][v], factor, base));
        }
}

template <int P>
constexpr int rows_for_panels = P == 3 ? 8 : P == 2 ? 12 : 16;

template <int P>
ATTNFUSE_TARGET_BF16 void multiply_group(std::size_t rows, std::size_t pairs, const bfloat16* a, std::ptrdiff_t a_r_stride,
                                         std::ptrdiff_t a_pair_stride, const bfloat16* b, std::ptrdiff_t b_panel_stride,
                                         float* c, std::size_t ldc, bool accumulate, float scale) {
    constexpr int R = rows_for_panels<P>;
    std::size_t r = 0;
    for (; r + R <= rows; r += R)
        micro_pairs<R, P>(pairs, a + static_cast<std::ptrdiff_t>(r) * a_r_stride, a_r_stride, a_pair_stride, b, b_panel_stride,
                          c + r * ldc, ldc, accumulate, scale);
    if (r == rows) return;
    with_count<R - 1>(rows - r, [&](auto left) {
        micro_pairs<decltype(left)::value, P>(pairs, a + static_cast<std::ptrdiff_t>(r) * a_r_stride, a_r_stride, a_pair_stride,
                                              b, b_panel_stride, c + r * ldc, ldc, accumulate, scale);
    });
}

}  // namespace

ATTNFUSE_TARGET_BF16 void multiply_bf16_pairs(std::size_t rows, std::size_t panels, std::size_t pairs, const bfloat16* a,
                                              std::ptrdiff_t a_r_stride, std::ptrdiff_t a_pair_stride, const bfloat16* b,
                                              float* c, std::size_t ldc, bool accumulate, float scale) {
    const auto panel_stride = static_cast<std::ptrdiff_t>(pairs * 2 * panel_width);
    for (std::size_t q = 0; q < panels;) {
        const std::size_t group = std::min<std::size_t>(3, panels - q);
        with_count<3>(group, [&](auto panels_now) {
            multiply_group<decltype(panels_now)::value>(rows, pairs, a, a_r_stride, a_pair_stride,
                                                        b + static_cast<std::ptrdiff_t>(q) * panel_stride, panel_stride,
                                                        c + q * panel_width, ldc, accumulate, scale);
        });
        q += group;
    }
}

ATTNFUSE_TARGET_BF16 void pack_bf16_pairs(std::size_t depth, std::size_t cols, const bfloat16* b, std::ptrdiff_t p_stride,
                                          std::ptrdiff_t c_stride, bfloat16* packed) {
    const std::size_t pairs = (depth + 1) / 2, panels = (cols + panel_width - 1) / panel_width;
    for (std::size_t q = 0; q < panels; ++q) {
        bfloat16* out = packed + q * pairs * 2 * panel_width;
        const std::size_t c0 = q * panel_width, width = std::min(panel_width, cols - c0);
        const bfloat16* panel = b + static_cast<std::ptrdiff_t>(c0) * c_stride;
        if (c_stride == 1 && width == panel_width) {
            // two rows of 16 side by side, interleaved: each 32-bit lane (B(2j, c), B(2j+1, c))
            const __m512i order = _mm512_load_si512(interleave_halves);
            for (std::size_t j = 0; j < pairs; ++j) {
                const bfloat16* first = panel + static_cast<std::ptrdiff_t>(2 * j) * p_stride;
                // row 2j into 16-bit lanes 0..15, row 2j+1 into 16..31 (a masked
                // load touches only its lanes' addresses)
                __m512i both = _mm512_maskz_loadu_epi16(0x0000FFFFu, first);
                if (2 * j + 1 < depth) both = _mm512_mask_loadu_epi16(both, 0xFFFF0000u, first + p_stride - panel_width);
                _mm512_storeu_si512(out + j * 2 * panel_width, _mm512_permutexvar_epi16(order, both));
            }
            continue;
        }
        for (std::size_t j = 0; j < pairs; ++j)
            for (std::size_t c = 0; c < panel_width; ++c)
                for (std::size_t half_of_pair = 0; half_of_pair < 2; ++half_of_pair) {
                    const std::size_t p = 2 * j + half_of_pair;
                    out[(j * panel_width + c) * 2 + half_of_pair] =
                        c < width && p < depth ? panel[static_cast<std::ptrdiff_t>(p) * p_stride + static_cast<std::ptrdiff_t>(c) * c_stride]
                                               : bfloat16{};
                }
    }
}

ATTNFUSE_TARGET_BF16 void round_weight_pairs(const float* st, std::size_t keys, std::size_t queries, std::size_t ld, bfloat16* out) {
    // one conversion gives [row 2j | row 2j+1] as 32 bf16; the permutation
    // interleaves them into 16 pairs, query by query
    const __m512i order = _mm512_load_si512(interleave_halves);
    const std::size_t pairs = (keys + 1) / 2;
    for (std::size_t j = 0; j < pairs; ++j) {
        const float* first = st + 2 * j * ld;
        const bool second = 2 * j + 1 < keys;
        for (std::size_t g = 0; g < queries; g += panel_width) {
            const __m512 low = _mm512_loadu_ps(first + g);
            const __m512 high = second ? _mm512_loadu_ps(first + ld + g) : _mm512_setzero_ps();
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(high, low);
            _mm512_storeu_si512(out + (j * ld + g) * 2, _mm512_permutexvar_epi16(order, both));
        }
    }
}

#undef ATTNFUSE_TARGET_BF16

#else

bool bf16_products_available() { return false; }

[[noreturn]] static void not_built() {
    throw std::logic_error("attnfuse internal: bf16 products were called in a build without them (check bf16_products_available)");
}
void multiply_bf16_pairs(std::size_t, std::size_t, std::size_t, const bfloat16*, std::ptrdiff_t, std::ptrdiff_t, const bfloat16*,
                         float*, std::size_t, bool, float) {
    not_built();
}
void pack_bf16_pairs(std::size_t, std::size_t, const bfloat16*, std::ptrdiff_t, std::ptrdiff_t, bfloat16*) { not_built(); }
void round_weight_pairs(const float*, std::size_t, std::size_t, std::size_t, bfloat16*) { not_built(); }

#endif

}  // namespace ATTNFUSE_CPU_ISA
}  // namespace attnfuse::cpu::kernels
