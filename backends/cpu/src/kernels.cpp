#include "attnfuse/cpu/kernels.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "attnfuse/cpu/simd.hpp"
#include <attnfuse/ops.hpp>

namespace attnfuse::cpu::kernels {

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

// The micro-kernel: R rows x 16 columns of C over the whole depth.
template <int R>
inline void micro(std::size_t depth, const float* a, std::ptrdiff_t r_stride, std::ptrdiff_t p_stride, const float* b,
                  std::ptrdiff_t b_p_stride, float* c, std::size_t ldc, bool accumulate) {
    vf lo[R], hi[R];
    for (int r = 0; r < R; ++r) {
        if (accumulate) {
            lo[r] = simd::load(c + r * ldc);
            hi[r] = simd::load(c + r * ldc + 8);
        } else {
            lo[r] = vf{};
            hi[r] = vf{};
        }
    }
    for (std::size_t p = 0; p < depth; ++p) {
        const float* bp = b + static_cast<std::ptrdiff_t>(p) * b_p_stride;
        const vf b0 = simd::load(bp), b1 = simd::load(bp + 8);
        const float* ap = a + static_cast<std::ptrdiff_t>(p) * p_stride;
        for (int r = 0; r < R; ++r) {
            const vf x = simd::splat(ap[r * r_stride]);
            lo[r] += x * b0;
            hi[r] += x * b1;
        }
    }
    for (int r = 0; r < R; ++r) {
        simd::store(c + r * ldc, lo[r]);
        simd::store(c + r * ldc + 8, hi[r]);
    }
}

}  // namespace

void multiply_panels(std::size_t rows, std::size_t panels, std::size_t depth, const float* a, std::ptrdiff_t r_stride,
                     std::ptrdiff_t p_stride, const float* b, std::ptrdiff_t b_p_stride, std::ptrdiff_t b_panel_stride,
                     float* c, std::size_t ldc, bool accumulate) {
    for (std::size_t q = 0; q < panels; ++q) {
        const float* bq = b + static_cast<std::ptrdiff_t>(q) * b_panel_stride;
        float* cq = c + q * panel_width;
        std::size_t r = 0;
        for (; r + block_rows <= rows; r += block_rows)
            micro<6>(depth, a + static_cast<std::ptrdiff_t>(r) * r_stride, r_stride, p_stride, bq, b_p_stride, cq + r * ldc,
                     ldc, accumulate);
        const float* ar = a + static_cast<std::ptrdiff_t>(r) * r_stride;
        float* cr = cq + r * ldc;
        switch (rows - r) {
            case 5: micro<5>(depth, ar, r_stride, p_stride, bq, b_p_stride, cr, ldc, accumulate); break;
            case 4: micro<4>(depth, ar, r_stride, p_stride, bq, b_p_stride, cr, ldc, accumulate); break;
            case 3: micro<3>(depth, ar, r_stride, p_stride, bq, b_p_stride, cr, ldc, accumulate); break;
            case 2: micro<2>(depth, ar, r_stride, p_stride, bq, b_p_stride, cr, ldc, accumulate); break;
            case 1: micro<1>(depth, ar, r_stride, p_stride, bq, b_p_stride, cr, ldc, accumulate); break;
            default: break;
        }
    }
}

void multiply_packed(std::size_t rows, std::size_t panels, std::size_t depth, const float* a, std::ptrdiff_t r_stride,
                     std::ptrdiff_t p_stride, const float* packed_b, float* c, std::size_t ldc, bool accumulate) {
    multiply_panels(rows, panels, depth, a, r_stride, p_stride, packed_b, panel_width,
                    static_cast<std::ptrdiff_t>(depth * panel_width), c, ldc, accumulate);
}

void multiply_dots(std::size_t rows, std::size_t cols, std::size_t depth, const float* a, std::ptrdiff_t a_r_stride,
                   std::ptrdiff_t a_p_stride, const float* b, std::ptrdiff_t b_c_stride, std::ptrdiff_t b_p_stride,
                   float* s, std::size_t lds) {
    const bool contiguous = a_p_stride == 1 && b_p_stride == 1;
    for (std::size_t r = 0; r < rows; ++r) {
        const float* ar = a + static_cast<std::ptrdiff_t>(r) * a_r_stride;
        for (std::size_t c = 0; c < cols; ++c) {
            const float* bc = b + static_cast<std::ptrdiff_t>(c) * b_c_stride;
            float sum = 0;
            std::size_t p = 0;
            if (contiguous) {
                vf acc0{}, acc1{};
                for (; p + 16 <= depth; p += 16) {
                    acc0 += simd::load(ar + p) * simd::load(bc + p);
                    acc1 += simd::load(ar + p + 8) * simd::load(bc + p + 8);
                }
                for (; p + 8 <= depth; p += 8) acc0 += simd::load(ar + p) * simd::load(bc + p);
                sum = simd::horizontal_sum(acc0 + acc1);
            }
            for (; p < depth; ++p)
                sum += ar[static_cast<std::ptrdiff_t>(p) * a_p_stride] * bc[static_cast<std::ptrdiff_t>(p) * b_p_stride];
            s[r * lds + c] = sum;
        }
    }
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
    // in memory order, eight groups of eight queries at a time
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

void softmax_rows(float* s, std::size_t rows, std::size_t cols, std::size_t lds) {
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
            continue;
        }
        if (top == minus_inf) {
            std::fill_n(sr, cols, 0.0f);
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

}  // namespace attnfuse::cpu::kernels
