#include "attnfuse/cpu/kernels.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "attnfuse/cpu/simd.hpp"
#include "with_count.hpp"
#include <attnfuse/ops.hpp>

namespace attnfuse::cpu::kernels {
inline namespace ATTNFUSE_CPU_ISA {

using simd::vf;
constexpr float minus_inf = -std::numeric_limits<float>::infinity();

void pack_panels(std::size_t depth, std::size_t cols, const float* b, std::ptrdiff_t p_stride, std::ptrdiff_t c_stride,
                 float* packed) {
    const std::size_t panels = (cols + panel_width - 1) / panel_width;
    for (std::size_t q = 0; q < panels; ++q) {
        float* out = packed + q * depth * panel_width;
        const std::size_t c0 = q * panel_width, width = std::min(panel_width, cols - c0);
        if (c_stride == 1 && width == panel_width) {
            for (std::size_t p = 0; p < depth; ++p)
                std::copy_n(b + static_cast<std::ptrdiff_t>(p) * p_stride + static_cast<std::ptrdiff_t>(c0), panel_width,
                            out + p * panel_width);
            continue;
        }
        for (std::size_t p = 0; p < depth; ++p) {
            const float* row = b + static_cast<std::ptrdiff_t>(p) * p_stride;
            for (std::size_t c = 0; c < width; ++c) out[p * panel_width + c] = row[static_cast<std::ptrdiff_t>(c0 + c) * c_stride];
            for (std::size_t c = width; c < panel_width; ++c) out[p * panel_width + c] = 0.0f;
        }
    }
}

namespace {

// The micro-kernel: R rows x P panels (P*16 columns) of C over the whole
// depth, its R * P * panel_vectors accumulators held in registers: per depth
// step P*16 columns of B are loaded once and each of the R entries of A is
// broadcast once, so the loads per FMA fall as R and P grow, until the
// accumulators fill the register file (16 vector registers with AVX2, 32
// with AVX-512).
constexpr int panel_vectors = static_cast<int>(panel_width) / simd::lanes;

template <int R, int P, class BEl>
inline void micro(std::size_t depth, const float* a, std::ptrdiff_t r_stride, std::ptrdiff_t p_stride, const BEl* b,
                  std::ptrdiff_t b_p_stride, std::ptrdiff_t b_panel_stride, float* c, std::size_t ldc, bool accumulate) {
    constexpr int V = P * panel_vectors;
    vf acc[R][V];
    // the P panels of C are side by side: vector v of row r is at c + r*ldc + v*lanes
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? simd::load(c + r * ldc + v * simd::lanes) : vf{};
    for (std::size_t p = 0; p < depth; ++p) {
        const BEl* bp = b + static_cast<std::ptrdiff_t>(p) * b_p_stride;
        vf bv[V];  // widened as loaded where B is stored 16-bit
        for (int v = 0; v < V; ++v) bv[v] = simd::load(bp + (v / panel_vectors) * b_panel_stride + (v % panel_vectors) * simd::lanes);
        const float* ap = a + static_cast<std::ptrdiff_t>(p) * p_stride;
        for (int r = 0; r < R; ++r) {
            const vf x = simd::splat(ap[r * r_stride]);
            for (int v = 0; v < V; ++v) acc[r][v] += x * bv[v];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) simd::store(c + r * ldc + v * simd::lanes, acc[r][v]);
}

// Rows per micro-kernel call for a group of P panels: the most that keep
// the accumulators, the B vectors and a broadcast within the register file.
template <int P>
constexpr int block_rows_for() {
    if constexpr (simd::lanes == 16) return P == 3 ? 8 : P == 2 ? 12 : 16;  // 24, 24 and 16 of 32 zmm registers
    else return static_cast<int>(block_rows);                              // 12 of 16 ymm registers (P is 1)
}
// Panels side by side in one micro-kernel call.
constexpr int widest_panel_group = simd::lanes == 16 ? 3 : 1;

template <int P, class BEl>
void multiply_panel_group(std::size_t rows, std::size_t depth, const float* a, std::ptrdiff_t r_stride, std::ptrdiff_t p_stride,
                          const BEl* b, std::ptrdiff_t b_p_stride, std::ptrdiff_t b_panel_stride, float* c, std::size_t ldc,
                          bool accumulate) {
    constexpr int R = block_rows_for<P>();
    std::size_t r = 0;
    for (; r + R <= rows; r += R)
        micro<R, P, BEl>(depth, a + static_cast<std::ptrdiff_t>(r) * r_stride, r_stride, p_stride, b, b_p_stride, b_panel_stride,
                    c + r * ldc, ldc, accumulate);
    const std::size_t left = rows - r;
    if (left == 0) return;
    const float* ar = a + static_cast<std::ptrdiff_t>(r) * r_stride;
    float* cr = c + r * ldc;
    // the last rows: one call of the micro-kernel with exactly `left` rows
    with_count<R - 1>(left, [&](auto rows_left) {
        micro<decltype(rows_left)::value, P, BEl>(depth, ar, r_stride, p_stride, b, b_p_stride, b_panel_stride, cr, ldc, accumulate);
    });
}

// For one or two rows of C (decode's weighted sum of values) the product
// is a stream over B: up to few_rows_panels<R> panels go in one pass, so
// that each row of B (a value row) is read once, in order, rather than a
// few panels at a time in several passes. At 16 lanes that is 8 panels (8
// or 16 accumulators of 32 registers); at 8 lanes 8 accumulators (4 panels
// for one row, 2 for two), which leave room for the B vectors in 16.
template <int R>
constexpr int few_rows_panels = simd::lanes == 16 ? 8 : 8 / (panel_vectors * R);

template <int R, class BEl>
void multiply_few_rows(std::size_t panels, std::size_t depth, const float* a, std::ptrdiff_t r_stride, std::ptrdiff_t p_stride,
                       const BEl* b, std::ptrdiff_t b_p_stride, std::ptrdiff_t b_panel_stride, float* c, std::size_t ldc,
                       bool accumulate) {
    for (std::size_t q = 0; q < panels;) {
        const std::size_t group = std::min<std::size_t>(few_rows_panels<R>, panels - q);
        const BEl* bq = b + static_cast<std::ptrdiff_t>(q) * b_panel_stride;
        float* cq = c + q * panel_width;
        with_count<few_rows_panels<R>>(group, [&](auto panels_now) {
            micro<R, decltype(panels_now)::value, BEl>(depth, a, r_stride, p_stride, bq, b_p_stride, b_panel_stride, cq, ldc, accumulate);
        });
        q += group;
    }
}

template <class BEl>
void multiply_panels_of(std::size_t rows, std::size_t panels, std::size_t depth, const float* a, std::ptrdiff_t r_stride,
                        std::ptrdiff_t p_stride, const BEl* b, std::ptrdiff_t b_p_stride, std::ptrdiff_t b_panel_stride, float* c,
                        std::size_t ldc, bool accumulate) {
    if (rows == 1) return multiply_few_rows<1>(panels, depth, a, r_stride, p_stride, b, b_p_stride, b_panel_stride, c, ldc, accumulate);
    if (rows == 2) return multiply_few_rows<2>(panels, depth, a, r_stride, p_stride, b, b_p_stride, b_panel_stride, c, ldc, accumulate);
    for (std::size_t q = 0; q < panels;) {
        const BEl* bq = b + static_cast<std::ptrdiff_t>(q) * b_panel_stride;
        float* cq = c + q * panel_width;
        const std::size_t group = std::min<std::size_t>(widest_panel_group, panels - q);
        with_count<widest_panel_group>(group, [&](auto panels_now) {
            multiply_panel_group<decltype(panels_now)::value>(rows, depth, a, r_stride, p_stride, bq, b_p_stride, b_panel_stride, cq, ldc, accumulate);
        });
        q += group;
    }
}

}  // namespace

void multiply_panels(std::size_t rows, std::size_t panels, std::size_t depth, const float* a, std::ptrdiff_t r_stride,
                     std::ptrdiff_t p_stride, const float* b, std::ptrdiff_t b_p_stride, std::ptrdiff_t b_panel_stride,
                     float* c, std::size_t ldc, bool accumulate) {
    multiply_panels_of(rows, panels, depth, a, r_stride, p_stride, b, b_p_stride, b_panel_stride, c, ldc, accumulate);
}
void multiply_panels(std::size_t rows, std::size_t panels, std::size_t depth, const float* a, std::ptrdiff_t r_stride,
                     std::ptrdiff_t p_stride, const half* b, std::ptrdiff_t b_p_stride, std::ptrdiff_t b_panel_stride,
                     float* c, std::size_t ldc, bool accumulate) {
    multiply_panels_of(rows, panels, depth, a, r_stride, p_stride, b, b_p_stride, b_panel_stride, c, ldc, accumulate);
}
void multiply_panels(std::size_t rows, std::size_t panels, std::size_t depth, const float* a, std::ptrdiff_t r_stride,
                     std::ptrdiff_t p_stride, const bfloat16* b, std::ptrdiff_t b_p_stride, std::ptrdiff_t b_panel_stride,
                     float* c, std::size_t ldc, bool accumulate) {
    multiply_panels_of(rows, panels, depth, a, r_stride, p_stride, b, b_p_stride, b_panel_stride, c, ldc, accumulate);
}

namespace {

template <class El>
void widen_rows(const El* src, std::size_t rows, std::size_t cols, std::ptrdiff_t i_stride, std::ptrdiff_t j_stride, float* dst,
                std::size_t ld, std::size_t padded_cols) {
    for (std::size_t i = 0; i < rows; ++i) {
        const El* row = src + static_cast<std::ptrdiff_t>(i) * i_stride;
        float* out = dst + i * ld;
        std::size_t j = 0;
        if (j_stride == 1)
            for (; j + simd::lanes <= cols; j += simd::lanes) simd::store(out + j, simd::load(row + j));
        for (; j < cols; ++j) out[j] = to_float(row[static_cast<std::ptrdiff_t>(j) * j_stride]);
        for (; j < padded_cols; ++j) out[j] = 0.0f;
    }
}

}  // namespace

void widen_block(const half* src, std::size_t rows, std::size_t cols, std::ptrdiff_t i_stride, std::ptrdiff_t j_stride,
                 float* dst, std::size_t ld, std::size_t padded_cols) {
    widen_rows(src, rows, cols, i_stride, j_stride, dst, ld, padded_cols);
}
void widen_block(const bfloat16* src, std::size_t rows, std::size_t cols, std::ptrdiff_t i_stride, std::ptrdiff_t j_stride,
                 float* dst, std::size_t ld, std::size_t padded_cols) {
    widen_rows(src, rows, cols, i_stride, j_stride, dst, ld, padded_cols);
}

void multiply_packed(std::size_t rows, std::size_t panels, std::size_t depth, const float* a, std::ptrdiff_t r_stride,
                     std::ptrdiff_t p_stride, const float* packed_b, float* c, std::size_t ldc, bool accumulate) {
    multiply_panels(rows, panels, depth, a, r_stride, p_stride, packed_b, panel_width,
                    static_cast<std::ptrdiff_t>(depth * panel_width), c, ldc, accumulate);
}

namespace {

// s[r][c] = a(r, :) . b(c, :), each b column's depth contiguous (b_p_stride
// 1) and b stored as BEl (widened as loaded). A row of a with a stride is
// gathered first, so that both operands load as vectors.
template <class BEl>
void multiply_dots_of(std::size_t rows, std::size_t cols, std::size_t depth, const float* a, std::ptrdiff_t a_r_stride,
                      std::ptrdiff_t a_p_stride, const BEl* b, std::ptrdiff_t b_c_stride, float* s, std::size_t lds) {
    constexpr std::size_t w = simd::lanes, gathered_max = 1024;
    float gathered[gathered_max];
    for (std::size_t r = 0; r < rows; ++r) {
        const float* ar = a + static_cast<std::ptrdiff_t>(r) * a_r_stride;
        std::ptrdiff_t ar_stride = a_p_stride;
        if (a_p_stride != 1 && depth <= gathered_max) {
            for (std::size_t p = 0; p < depth; ++p) gathered[p] = ar[static_cast<std::ptrdiff_t>(p) * a_p_stride];
            ar = gathered;
            ar_stride = 1;
        }
        const bool contiguous = ar_stride == 1;
        for (std::size_t c = 0; c < cols; ++c) {
            const BEl* bc = b + static_cast<std::ptrdiff_t>(c) * b_c_stride;
            float sum = 0;
            std::size_t p = 0;
            if (contiguous) {
                vf acc0{}, acc1{};
                for (; p + 2 * w <= depth; p += 2 * w) {
                    acc0 += simd::load(ar + p) * simd::load(bc + p);
                    acc1 += simd::load(ar + p + w) * simd::load(bc + p + w);
                }
                for (; p + w <= depth; p += w) acc0 += simd::load(ar + p) * simd::load(bc + p);
                sum = simd::horizontal_sum(acc0 + acc1);
            }
            for (; p < depth; ++p) sum += ar[static_cast<std::ptrdiff_t>(p) * ar_stride] * to_float(bc[p]);
            s[r * lds + c] = sum;
        }
    }
}

}  // namespace

void multiply_dots(std::size_t rows, std::size_t cols, std::size_t depth, const float* a, std::ptrdiff_t a_r_stride,
                   std::ptrdiff_t a_p_stride, const float* b, std::ptrdiff_t b_c_stride, std::ptrdiff_t b_p_stride,
                   float* s, std::size_t lds) {
    if (b_p_stride == 1) return multiply_dots_of(rows, cols, depth, a, a_r_stride, a_p_stride, b, b_c_stride, s, lds);
    for (std::size_t r = 0; r < rows; ++r) {
        const float* ar = a + static_cast<std::ptrdiff_t>(r) * a_r_stride;
        for (std::size_t c = 0; c < cols; ++c) {
            const float* bc = b + static_cast<std::ptrdiff_t>(c) * b_c_stride;
            float sum = 0;
            for (std::size_t p = 0; p < depth; ++p)
                sum += ar[static_cast<std::ptrdiff_t>(p) * a_p_stride] * bc[static_cast<std::ptrdiff_t>(p) * b_p_stride];
            s[r * lds + c] = sum;
        }
    }
}
void multiply_dots(std::size_t rows, std::size_t cols, std::size_t depth, const float* a, std::ptrdiff_t a_r_stride,
                   std::ptrdiff_t a_p_stride, const half* b, std::ptrdiff_t b_c_stride, float* s, std::size_t lds) {
    multiply_dots_of(rows, cols, depth, a, a_r_stride, a_p_stride, b, b_c_stride, s, lds);
}
void multiply_dots(std::size_t rows, std::size_t cols, std::size_t depth, const float* a, std::ptrdiff_t a_r_stride,
                   std::ptrdiff_t a_p_stride, const bfloat16* b, std::ptrdiff_t b_c_stride, float* s, std::size_t lds) {
    multiply_dots_of(rows, cols, depth, a, a_r_stride, a_p_stride, b, b_c_stride, s, lds);
}

void online_softmax_step(float* s, std::size_t rows, std::size_t cols, std::size_t lds, row_state* state, float* o,
                         std::size_t ldo, std::size_t o_cols) {
    const std::size_t vcols = round_up(cols, simd::lanes);
    for (std::size_t r = 0; r < rows; ++r) {
        float* sr = s + r * lds;
        for (std::size_t c = cols; c < vcols; ++c) sr[c] = minus_inf;
        vf vmax = simd::splat(minus_inf);
        vf nan_lanes = vf{};
        for (std::size_t c = 0; c < vcols; c += simd::lanes) {
            const vf x = simd::load(sr + c);
            vmax = simd::max(vmax, x);
            nan_lanes = (x != x) ? simd::splat(1.0f) : nan_lanes;
        }
        float tile_max = simd::horizontal_max(vmax);
        if (simd::horizontal_sum(nan_lanes) > 0) tile_max = std::numeric_limits<float>::quiet_NaN();
        row_state& st = state[r];
        const float new_max = std::isnan(tile_max) ? tile_max : std::max(st.max, tile_max);
        float* orow = o + r * ldo;
        if (new_max == minus_inf) {  // every key so far masked: weights stay 0
            for (std::size_t c = 0; c < vcols; c += simd::lanes) simd::store(sr + c, vf{});
            continue;
        }
        const float alpha = st.max == minus_inf ? 0.0f : std::exp(st.max - new_max);
        const vf m = simd::splat(new_max);
        vf total = vf{};
        for (std::size_t c = 0; c < vcols; c += simd::lanes) {
            const vf p = simd::exp_nonpositive(simd::load(sr + c) - m);
            total += p;
            simd::store(sr + c, p);
        }
        st.sum = st.sum * alpha + simd::horizontal_sum(total);
        st.max = new_max;
        if (alpha == 0.0f) {  // what came before now weighs exactly 0: gone, whatever it held (a NaN value row too)
            for (std::size_t c = 0; c < o_cols; c += simd::lanes) simd::store(orow + c, vf{});
        } else if (alpha != 1.0f) {
            const vf va = simd::splat(alpha);
            for (std::size_t c = 0; c < o_cols; c += simd::lanes) simd::store(orow + c, simd::load(orow + c) * va);
        }
    }
}

void online_softmax_columns(float* st, std::size_t keys, std::size_t queries, std::size_t ld, const float* tile_max,
                            row_state* state, float* o, std::size_t ldo, std::size_t o_cols) {
    constexpr float nan = std::numeric_limits<float>::quiet_NaN();
    const std::size_t groups = round_up(queries, simd::lanes);
    // per query: the new maximum, the factor that rescales what came before,
    // and the value subtracted before exp (0 where nothing is kept yet, so
    // that exp(-inf - 0) is 0 rather than NaN)
    float subtract[256];
    float* sub = groups <= 256 ? subtract : new float[groups];
    for (std::size_t q = 0; q < groups; ++q) {
        if (q >= queries) {
            sub[q] = 0.0f;
            continue;
        }
        row_state& s = state[q];
        const float m = std::isnan(tile_max[q]) ? nan : std::max(s.max, tile_max[q]);
        const float alpha = (s.max == minus_inf || std::isnan(m)) ? (std::isnan(m) ? nan : 0.0f) : std::exp(s.max - m);
        sub[q] = m == minus_inf ? 0.0f : m;
        if (m != minus_inf && alpha != 1.0f) {
            float* row = o + q * ldo;
            const vf va = simd::splat(alpha);
            // alpha 0: what came before now weighs exactly 0, gone whatever it held (a NaN value row too)
            for (std::size_t c = 0; c < o_cols; c += simd::lanes) simd::store(row + c, alpha == 0.0f ? vf{} : simd::load(row + c) * va);
        }
        s.sum *= (m == minus_inf ? 1.0f : alpha);
        s.max = m;
    }
    // in memory order, eight vectors of queries at a time
    constexpr std::size_t batch = 8;
    for (std::size_t g0 = 0; g0 < groups; g0 += batch * simd::lanes) {
        const std::size_t count = std::min(batch, (groups - g0) / simd::lanes);
        vf m[batch], total[batch];
        for (std::size_t g = 0; g < count; ++g) {
            m[g] = simd::load(sub + g0 + g * simd::lanes);
            total[g] = vf{};
        }
        for (std::size_t k = 0; k < keys; ++k) {
            float* row = st + k * ld + g0;
            for (std::size_t g = 0; g < count; ++g) {
                const vf p = simd::exp_nonpositive(simd::load(row + g * simd::lanes) - m[g]);
                total[g] += p;
                simd::store(row + g * simd::lanes, p);
            }
        }
        for (std::size_t g = 0; g < count; ++g)
            for (std::size_t l = 0; l < simd::lanes && g0 + g * simd::lanes + l < queries; ++l)
                state[g0 + g * simd::lanes + l].sum += total[g][l];
    }
    if (sub != subtract) delete[] sub;
}

void accumulate_column_sums(const float* st, std::size_t keys, std::size_t queries, std::size_t ld, row_state* state) {
    for (std::size_t k = 0; k < keys; ++k)
        for (std::size_t q = 0; q < queries; ++q) state[q].sum += st[k * ld + q];
}

void accumulate_row_sums(const float* s, std::size_t rows, std::size_t cols, std::size_t lds, row_state* state) {
    for (std::size_t r = 0; r < rows; ++r) {
        float total = 0;
        for (std::size_t c = 0; c < cols; ++c) total += s[r * lds + c];
        state[r].sum += total;
    }
}

void dropout_tile(float* p, std::size_t rows, std::size_t cols, std::ptrdiff_t r_stride, std::ptrdiff_t c_stride,
                  std::uint32_t seed, std::uint32_t threshold, float keep_scale, std::uint32_t batch_head,
                  std::size_t row0, std::size_t col0) {
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < cols; ++c) {
            const std::uint32_t bits = op::dropout_bits(seed, batch_head, static_cast<std::uint32_t>(row0 + r),
                                                        static_cast<std::uint32_t>(col0 + c));
            float& x = p[static_cast<std::ptrdiff_t>(r) * r_stride + static_cast<std::ptrdiff_t>(c) * c_stride];
            x = op::dropout_keeps(bits, threshold) ? x * keep_scale : 0.0f;
        }
}

void running_argmax_columns(const float* st, std::size_t keys, std::size_t queries, std::size_t ld, std::size_t key0,
                            float* best, std::size_t* index, unsigned char* nan_seen) {
    for (std::size_t k = 0; k < keys; ++k)
        for (std::size_t q = 0; q < queries; ++q) {
            const float x = st[k * ld + q];
            if (x != x) nan_seen[q] = 1;
            else if (x > best[q]) {  // strictly: ties keep the earlier key; -inf never wins
                best[q] = x;
                index[q] = key0 + k;
            }
        }
}

void softmax_rows(float* s, std::size_t rows, std::size_t cols, std::size_t lds, float* row_max, float* row_sum) {
    for (std::size_t r = 0; r < rows; ++r) {
        row_state st{minus_inf, 0.0f};
        float* sr = s + r * lds;
        // one online step over the whole row, with no accumulator to rescale
        float top = minus_inf;
        bool nan = false;
        for (std::size_t c = 0; c < cols; ++c) {
            nan = nan || std::isnan(sr[c]);
            top = std::max(top, sr[c]);
        }
        if (nan || top == std::numeric_limits<float>::infinity()) {
            std::fill_n(sr, cols, std::numeric_limits<float>::quiet_NaN());
            if (row_max) row_max[r] = row_sum[r] = std::numeric_limits<float>::quiet_NaN();
            continue;
        }
        if (top == minus_inf) {
            std::fill_n(sr, cols, 0.0f);
            if (row_max) row_max[r] = minus_inf, row_sum[r] = 0.0f;
            continue;
        }
        const vf m = simd::splat(top);
        std::size_t c = 0;
        vf total = vf{};
        for (; c + simd::lanes <= cols; c += simd::lanes) {
            const vf p = simd::exp_nonpositive(simd::load(sr + c) - m);
            total += p;
            simd::store(sr + c, p);
        }
        st.sum = simd::horizontal_sum(total);
        for (; c < cols; ++c) st.sum += (sr[c] = std::exp(sr[c] - top));
        if (row_max) row_max[r] = top, row_sum[r] = st.sum;
        const float inv = 1.0f / st.sum;
        for (c = 0; c < cols; ++c) sr[c] *= inv;
    }
}

void hard_rows(float* s, std::size_t rows, std::size_t cols, std::size_t lds) {
    for (std::size_t r = 0; r < rows; ++r) {
        float best = minus_inf;
        std::size_t index = cols;
        unsigned char nan = 0;
        running_argmax(s + r * lds, 1, cols, lds, 0, &best, &index, &nan);
        for (std::size_t c = 0; c < cols; ++c)
            s[r * lds + c] = nan ? std::numeric_limits<float>::quiet_NaN() : (c == index ? 1.0f : 0.0f);
    }
}

void running_argmax(const float* s, std::size_t rows, std::size_t cols, std::size_t lds, std::size_t col0, float* best,
                    std::size_t* index, unsigned char* nan_seen) {
    for (std::size_t r = 0; r < rows; ++r) {
        const float* sr = s + r * lds;
        for (std::size_t c = 0; c < cols; ++c) {
            const float x = sr[c];
            if (x != x) nan_seen[r] = 1;
            else if (x > best[r]) {  // strictly: ties keep the earlier column; -inf never wins
                best[r] = x;
                index[r] = col0 + c;
            }
        }
    }
}

}  // namespace ATTNFUSE_CPU_ISA
}  // namespace attnfuse::cpu::kernels
