// The CPU's backward pass of softmax attention and of pointwise weights
// (plan::attention_backward): fused, FlashAttention-2 style, and unfused,
// one kernel per operation.
//
// Fused, with S = epilogue(f Qᵀ K) (f the folded scale) and 64 x 64 tiles:
//   1. per query tile: each row's max m and 1/l of the softmax over every
//      key tile, and D = rowsum(dO ∘ O);
//   2. per K/V (batch, head), each key tile in turn, over every query tile
//      of every head it serves: P = exp(S - m) / l, dV += Pᵀ dO,
//      dP = dO Vᵀ, dS = P ∘ (dP - D) ∘ ∂epilogue, dK += f Q dS and
//      dQ += f K dSᵀ. The pass owns the dK and dV of its keys and the dQ of
//      the heads it serves, so no two threads write one gradient.
// Where that ownership fails (queries shared by several heads) or there are
// fewer K/V heads than threads, 2. leaves dQ to a third pass, per query tile
// over every key tile, that recomputes P and dS for it.
// S and P are never stored whole: extra memory is a few tiles per thread
// and three floats per query row. Tiles every mask removes are skipped, and
// tiles every mask keeps run the epilogue without its masks, as in the
// forward. Dropout multiplies P and dP by the forward's mask.
// The unfused pass materialises S, P, dP and dS whole, one kernel each.
// Pointwise weights P = w(S) (sigmoid, ReLU^2) keep no row statistics: step
// 1. is skipped, P is the epilogue's value and dS = dP ∘ w'(S), and a tile
// is skipped where the weights are surely 0 rather than the scores -inf.
//
// ∂epilogue, the derivative of the score's pointwise part in its core, is
// chained through each operation's partials (ops.hpp), lane by lane; where
// the epilogue without its masks is the core itself, it is 1.
#pragma once
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <attnfuse/backward.hpp>

#include "executor.hpp"

namespace attnfuse::cpu {
namespace detail {
inline namespace ATTNFUSE_CPU_ISA {

// Does a prepared tree read the score slot?
template <class E> struct holds_slot : std::is_same<E, core_slot> {};
template <class Kind, class... Kids> struct holds_slot<node<Kind, Kids...>> : std::bool_constant<(holds_slot<Kids>::value || ...)> {};

// A vector of lanes of a prepared tree and its derivative in the score slot.
struct dual {
    vf value;
    vf slope;
};

template <class E>
dual dual_lanes_of(const E& e, const lane_position& at) {
    if constexpr (std::is_same_v<E, core_slot>) {
        return {simd::load(at.core), simd::splat(1.0f)};
    } else if constexpr (!holds_slot<E>::value) {
        return {lanes_of<lanes_along::keys>(e, at), vf{}};
    } else if constexpr (has_kind_template<E, kind::elementwise>::value) {
        using Op = typename E::kind_type::op;
        return std::apply(
            [&](const auto&... kids) {
                const dual parts[] = {dual_lanes_of(kids, at)...};
                return [&]<std::size_t... I>(std::index_sequence<I...>) {
                    dual out{simd::apply<Op>(parts[I].value...), vf{}};
                    for (int l = 0; l < simd::lanes; ++l) {
                        const auto partials = Op::partials(parts[I].value[l]...);
                        float slope = 0;
                        ((slope += parts[I].slope[l] == 0.0f ? 0.0f : parts[I].slope[l] * partials[I]), ...);
                        out.slope[l] = slope;
                    }
                    return out;
                }(std::index_sequence_for<decltype(kids)...>{});
            },
            e.kids);
    } else if constexpr (has_kind_v<E, kind::scale_by>) {
        const dual d = dual_lanes_of(e.template kid<0>(), at);
        const auto factor = static_cast<float>(e.kind.factor);
        return {d.value * factor, d.slope * factor};
    } else if constexpr (has_kind_v<E, kind::dropout>) {
        // the forward's mask (lanes along the keys) on the value and the slope alike
        dual out = dual_lanes_of(e.template kid<0>(), at);
        const std::uint32_t threshold = op::dropout_threshold(e.kind.p);
        const float keep_scale = static_cast<float>(1.0 / (1.0 - e.kind.p));
        for (int l = 0; l < simd::lanes; ++l) {
            const auto bits = op::dropout_bits(e.kind.seed, at.batch_head, static_cast<std::uint32_t>(at.row),
                                               static_cast<std::uint32_t>(at.col + static_cast<std::size_t>(l)));
            const bool keep = op::dropout_keeps(bits, threshold);
            out.value[l] = keep ? out.value[l] * keep_scale : 0.0f;
            out.slope[l] = keep ? out.slope[l] * keep_scale : 0.0f;
        }
        return out;
    } else if constexpr (is_named_node<E>::value) {
        return dual_lanes_of(e.template kid<0>(), at);
    } else {
        // a lookup reads no slot: its index gets no gradient
        static_assert(sizeof(E) == 0, "attnfuse: the CPU backward has no derivative rule for this pointwise node of a score");
        return dual{};
    }
}

// C (rows x cols, leading dimension ldc) = or += A (rows x depth) B (depth x cols),
// A(r, p) = a[r*ar + p*ap] and B(p, c) = b[p*bp + c*bc] in any layout: B packed
// into `packing` (panels of 16 columns), then the micro-kernel.
inline void multiply_any(std::size_t rows, std::size_t cols, std::size_t depth, const float* a, std::ptrdiff_t ar, std::ptrdiff_t ap,
                         const float* b, std::ptrdiff_t bp, std::ptrdiff_t bc, float* c, std::size_t ldc, bool accumulate,
                         std::vector<float>& packing) {
    const std::size_t panels = (cols + kernels::panel_width - 1) / kernels::panel_width;
    packing.resize(std::max(packing.size(), panels * kernels::panel_width * depth));
    kernels::pack_panels(depth, cols, b, bp, bc, packing.data());
    kernels::multiply_panels(rows, panels, depth, a, ar, ap, packing.data(), kernels::panel_width,
                             static_cast<std::ptrdiff_t>(depth * kernels::panel_width), c, ldc, accumulate);
}

inline constexpr std::size_t backward_tile = 64;  // queries and keys per tile: four panels

// One (batch, head) of Q (d x n_q), K (d x n_k), V (n_k x d_v), and what the
// backward reads and writes for it.
struct head_operands {
    const float *q, *k, *v;
    std::ptrdiff_t q_ds, q_qs, k_ds, k_ks, v_ks, v_cs;  // depth/query, depth/key, key/column strides
};

// given: the training forward's row statistics, or nullptr (the fused pass computes them)
template <class E, class... Bindings>
backward_result attention_backward(const E& e, const tensor& output, const tensor& d_output, const row_statistics* given,
                                   const options& opt, const Bindings&... bindings) {
    using parts = plan::attention_parts<E>;
    using Core = typename parts::core_type;
    constexpr bool with_dropout = parts::dropout;
    // pointwise weights w(score): no normalisation, so no row statistics
    constexpr bool pointwise = parts::pointwise;
    using Env = environment<Bindings...>;
    const auto start = std::chrono::steady_clock::now();
    Env env(bindings...);
    settle_heads(e, env);
    const runtime_shape shape = shape_of(e, env);
    check_backward_operands(output, d_output, env.batch, env.heads, shape);
    if (given) check_given_statistics(*given, env.batch, env.heads, shape.rows);

    backward_result result;
    report& info = result.info;
    const options o = with_threads_clamped(opt);
    info.threads = o.threads;
    executor<Env> x{env, o, info, {}, {}, nullptr, nullptr, &typeid(void), {}};
    const int threads = static_cast<int>(o.threads);

    const Core& core = parts::core(e);
    const auto& q_input = core.template kid<0>().template kid<0>();
    const auto& k_input = core.template kid<1>();
    const auto& v_input = parts::values(e);
    using QI = std::remove_cvref_t<decltype(q_input)>;
    using KI = std::remove_cvref_t<decltype(k_input)>;
    using VI = std::remove_cvref_t<decltype(v_input)>;
    const tensor_view<float> qv = env.template view<QI::name>(), kv = env.template view<KI::name>(), vv = env.template view<VI::name>();
    if (kv.batch != vv.batch || kv.heads != vv.heads)
        throw std::invalid_argument("attnfuse: cpu::backward needs K and V bound with the same batch and heads (K " +
                                    std::to_string(kv.batch) + " x " + std::to_string(kv.heads) + ", V " + std::to_string(vv.batch) +
                                    " x " + std::to_string(vv.heads) + "); reference::backward takes any");

    // the score's pointwise part with its core as a slot, the scale folded out as in the forward
    double factor_d = 1.0;
    const auto prepared = fold_core_scale(prepare<Core>(parts::score(e), x), factor_d);
    const auto unmasked = strip_masks(prepared);
    // Without its masks the epilogue is the core itself (scaled dot product, causal, windows,
    // lengths): its slope is 1 wherever a softmax weight is not 0, and nothing computes it.
    // Pointwise weights always chain their slope, which is 0 where a mask removes a key.
    constexpr bool unit_slope = !pointwise && std::is_same_v<std::remove_cvref_t<decltype(unmasked)>, core_slot>;
    const auto factor = static_cast<float>(factor_d);
    double dropout_p = 0;
    std::uint32_t dropout_seed = 0;
    if constexpr (with_dropout) {
        dropout_p = parts::weights(e).kind.p;
        dropout_seed = parts::weights(e).kind.seed;
    }
    const std::uint32_t dropout_threshold = op::dropout_threshold(dropout_p);
    const float keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));

    const std::size_t n_q = qv.cols, n_k = kv.cols, depth = qv.rows, d_v = vv.cols, heads = env.heads;
    const std::size_t tile = backward_tile;
    const std::size_t q_tiles = (n_q + tile - 1) / tile, k_tiles = (n_k + tile - 1) / tile;
    const std::size_t d_pad = kernels::round_up(depth, kernels::panel_width), dv_pad = kernels::round_up(d_v, kernels::panel_width);
    const bool fused = o.mode == execution::fused;

    auto operands_of = [&](std::size_t b, std::size_t h) {
        return head_operands{matrix_base(qv, env, b, h), matrix_base(kv, env, b, h), matrix_base(vv, env, b, h),
                             qv.row_stride, qv.col_stride, kv.row_stride, kv.col_stride, vv.row_stride, vv.col_stride};
    };
    // One (batch, head) as the kernels read it: its index, its operands and its epilogue with
    // and without masks
    auto head_of = [&](std::size_t b, std::size_t h) {
        return std::tuple{b * heads + h, operands_of(b, h), at_head(prepared, env, b, h), at_head(unmasked, env, b, h)};
    };
    // body(b, h) for every (batch, head) of the output that (batch, head) `source` of an operand serves
    auto for_each_served = [&](const tensor_view<float>& operand, std::size_t source, const auto& body) {
        const std::size_t sb = source / operand.heads, sh = source % operand.heads;
        for (std::size_t b = 0; b < env.batch; ++b)
            for (std::size_t h = 0; h < heads; ++h)
                if (env.source_batch(operand, b) == sb && env.source_head(operand, h) == sh) body(b, h);
    };
    const float* out_values = output.values.data();
    const float* d_out_values = d_output.values.data();
    auto d_out_row = [&](std::size_t bh, std::size_t r) { return d_out_values + (bh * n_q + r) * d_v; };

    // the gradients, laid out as Q, K and V are bound
    tensor dq{qv.batch, qv.heads, qv.rows, qv.cols, std::vector<float>(qv.batch * qv.heads * qv.rows * qv.cols)};
    tensor dk{kv.batch, kv.heads, kv.rows, kv.cols, std::vector<float>(kv.batch * kv.heads * kv.rows * kv.cols)};
    tensor dvt{vv.batch, vv.heads, vv.rows, vv.cols, std::vector<float>(vv.batch * vv.heads * vv.rows * vv.cols)};
    // each row's softmax statistics and D = rowsum(dO ∘ O)
    std::vector<float> row_max(pointwise ? 0 : env.batch * heads * n_q), row_inverse(row_max.size()), row_d(row_max.size());
    info.intermediate_bytes += 3 * row_max.size() * sizeof(float);

    // Scores s (rows x cols at s, leading dimension lds) for queries q0.., keys k0..: the
    // epilogue's values, and its slopes where wanted; false when every mask removes the tile.
    // The epilogue over a tile of f Qᵀ K (rows x cols at s, leading dimension lds), in
    // place, and its slopes into `slope` where wanted; tiles every mask keeps run it without them.
    auto epilogue_of = [&](std::size_t bh, std::size_t q0, std::size_t rows, std::size_t k0, std::size_t cols, float* s, float* slope,
                           std::size_t lds, const auto& tree, const auto& tree_unmasked) {
        const auto batch_head = static_cast<std::uint32_t>(bh);
        if constexpr (unit_slope) slope = nullptr;
        auto run_epilogue = [&](const auto& epilogue) {
            using T = std::remove_cvref_t<decltype(epilogue)>;
            for (std::size_t r = 0; r < rows; ++r) {
                float* sr = s + r * lds;
                float* gr = slope ? slope + r * lds : nullptr;
                for (std::size_t c = 0; c < cols; c += simd::lanes) {
                    if (factor != 1.0f) simd::store(sr + c, simd::load(sr + c) * factor);
                    if constexpr (std::is_same_v<T, core_slot>) {
                        if (gr) simd::store(gr + c, simd::splat(1.0f));
                    } else {
                        const lane_position at{q0 + r, k0 + c, sr + c, batch_head};
                        if (gr) {
                            const dual d = dual_lanes_of(epilogue, at);
                            simd::store(sr + c, d.value);
                            simd::store(gr + c, d.slope);
                        } else {
                            simd::store(sr + c, lanes_of<lanes_along::keys>(epilogue, at));
                        }
                    }
                }
            }
        };
        if (masks_keep_all(tree, q0, q0 + rows, k0, k0 + cols)) run_epilogue(tree_unmasked);
        else run_epilogue(tree);
    };
    // Does no key of the tile get a weight (every score -inf; every pointwise weight surely 0,
    // and so its slope)?
    auto weightless = [&](const auto& tree, std::size_t q0, std::size_t rows, std::size_t k0, std::size_t cols) {
        const interval bounds = tile_bounds(tree, q0, q0 + rows, k0, k0 + cols);
        return pointwise ? bounds.surely_zero() : bounds.all_minus_infinity();
    };
    // The scores of queries q0.., keys k0..: the product, then the epilogue; false when the
    // tile is weightless.
    auto scores = [&](const head_operands& hd, std::size_t bh, std::size_t q0, std::size_t rows, std::size_t k0, std::size_t cols,
                      float* s, float* slope, std::size_t lds, std::vector<float>& packing, const auto& tree, const auto& tree_unmasked) {
        if (weightless(tree, q0, rows, k0, cols)) return false;
        multiply_any(rows, cols, depth, hd.q + static_cast<std::ptrdiff_t>(q0) * hd.q_qs, hd.q_qs, hd.q_ds,
                     hd.k + static_cast<std::ptrdiff_t>(k0) * hd.k_ks, hd.k_ds, hd.k_ks, s, lds, false, packing);
        epilogue_of(bh, q0, rows, k0, cols, s, slope, lds, tree, tree_unmasked);
        return true;
    };
    // s to the weights P in place (pointwise weights are s itself), 0 past `cols`
    auto weights_of = [&](std::size_t bh, std::size_t q0, std::size_t rows, std::size_t cols, float* s, std::size_t lds) {
        if constexpr (pointwise) {
            for (std::size_t r = 0; r < rows; ++r) std::fill(s + r * lds + cols, s + (r + 1) * lds, 0.0f);
            return;
        }
        for (std::size_t r = 0; r < rows; ++r) {
            const std::size_t row = bh * n_q + q0 + r;
            const float top = row_max[row], inverse = row_inverse[row];
            float* sr = s + r * lds;
            if (inverse == 0.0f) std::fill_n(sr, cols, 0.0f);  // every key masked: no weight
            else
                for (std::size_t c = 0; c < cols; c += simd::lanes)
                    simd::store(sr + c, simd::exp_nonpositive(simd::load(sr + c) - top) * inverse);
            std::fill(sr + cols, sr + lds, 0.0f);
        }
    };
    // The weights as the forward multiplied V by: p itself, or with dropout its dropped copy in
    // `into` (a tile, leading dimension `tile`).
    auto dropped = [&](std::size_t bh, std::size_t q0, std::size_t rows, std::size_t k0, std::size_t cols, const float* p,
                       float* into) -> const float* {
        if constexpr (!with_dropout) return p;
        std::copy_n(p, rows * tile, into);
        kernels::dropout_tile(into, rows, cols, static_cast<std::ptrdiff_t>(tile), 1, dropout_seed, dropout_threshold, keep_scale,
                              static_cast<std::uint32_t>(bh), q0, k0);
        return into;
    };
    // dP (in dp) to the core's gradient f (dS ∘ slope), dS = P ∘ (dP - D); p the undropped
    // weights. Pointwise weights: f (dP ∘ slope), and a zero slope passes zero even where dP
    // is not finite.
    auto core_gradient = [&](std::size_t bh, std::size_t q0, std::size_t rows, std::size_t k0, std::size_t cols, const float* p,
                             float* dp, const float* slope, std::size_t lds) {
        if constexpr (pointwise) {
            const vf zero{};
            for (std::size_t r = 0; r < rows; ++r) {
                const float* gr = slope + r * lds;
                float* dr = dp + r * lds;
                for (std::size_t c = 0; c < cols; c += simd::lanes) {
                    const vf g = simd::load(gr + c);
                    simd::store(dr + c, g == 0.0f ? zero : simd::load(dr + c) * g * factor);
                }
                std::fill(dr + cols, dr + lds, 0.0f);
            }
            return;
        }
        if constexpr (with_dropout)
            kernels::dropout_tile(dp, rows, cols, static_cast<std::ptrdiff_t>(lds), 1, dropout_seed, dropout_threshold, keep_scale,
                                  static_cast<std::uint32_t>(bh), q0, k0);
        for (std::size_t r = 0; r < rows; ++r) {
            const float d = row_d[bh * n_q + q0 + r];
            const float* pr = p + r * lds;
            const float* gr = slope + r * lds;
            float* dr = dp + r * lds;
            // a zero weight passes zero, even where dP or the slope is infinite (past `cols` the weights are 0)
            const vf zero{}, d_lanes = simd::splat(d);
            for (std::size_t c = 0; c < cols; c += simd::lanes) {
                const vf pc = simd::load(pr + c);
                const vf ds = pc == 0.0f ? zero : pc * (simd::load(dr + c) - d_lanes);
                if constexpr (unit_slope) simd::store(dr + c, ds * factor);
                else simd::store(dr + c, ds == 0.0f ? zero : ds * simd::load(gr + c) * factor);
            }
            std::fill(dr + kernels::round_up(cols, simd::lanes), dr + lds, 0.0f);
        }
    };

    // ---- 1. statistics -----------------------------------------------------------------
    // A row's max, 1/sum (NaN where a score is NaN or +inf; 0 where every
    // mask removes the row) and D = rowsum(dO ∘ O).
    auto keep_row_statistics = [&](std::size_t row, float top, float sum, bool bad) {
        row_max[row] = bad ? std::numeric_limits<float>::quiet_NaN() : top;
        row_inverse[row] = bad ? std::numeric_limits<float>::quiet_NaN() : sum > 0.0f ? 1.0f / sum : 0.0f;
        const float* o_row = out_values + row * d_v;
        const float* g_row = d_out_values + row * d_v;
        float d = 0;
        for (std::size_t c = 0; c < d_v; ++c) d += o_row[c] * g_row[c];
        row_d[row] = d;
    };
    if (pointwise) {
        // pointwise weights: no row statistics
    } else if (fused && given) {
        // the forward's: only D is left to compute
        const auto rows = static_cast<std::ptrdiff_t>(row_max.size());
#pragma omp parallel for schedule(static) num_threads(threads)
        for (std::ptrdiff_t row = 0; row < rows; ++row) {
            const float top = given->max[row], sum = given->sum[row];
            keep_row_statistics(static_cast<std::size_t>(row), top, sum,
                                std::isnan(top) || std::isnan(sum) || top == std::numeric_limits<float>::infinity());
        }
        info.kernels.push_back("backward statistics: the forward's max and sum, rowsum(dO ∘ O)");
    } else {
        const auto items = static_cast<std::ptrdiff_t>(env.batch * heads * q_tiles);
#pragma omp parallel num_threads(threads)
        {
            std::vector<float> s(tile * tile), packing;
#pragma omp for schedule(dynamic)
            for (std::ptrdiff_t item = 0; item < items; ++item) {
                const std::size_t bh = static_cast<std::size_t>(item) / q_tiles, q0 = static_cast<std::size_t>(item) % q_tiles * tile;
                const std::size_t rows = std::min(tile, n_q - q0);
                const auto [_, hd, tree, tree_unmasked] = head_of(bh / heads, bh % heads);
                float top[tile], sum[tile];
                bool nan[tile] = {};
                std::fill_n(top, tile, -std::numeric_limits<float>::infinity());
                std::fill_n(sum, tile, 0.0f);
                for (std::size_t k0 = 0; k0 < n_k; k0 += tile) {
                    const std::size_t cols = std::min(tile, n_k - k0);
                    if (!scores(hd, bh, q0, rows, k0, cols, s.data(), nullptr, tile, packing, tree, tree_unmasked)) continue;
                    const std::size_t lanes_end = kernels::round_up(cols, simd::lanes);
                    for (std::size_t r = 0; r < rows; ++r) {
                        float* sr = s.data() + r * tile;
                        std::fill(sr + cols, sr + lanes_end, -std::numeric_limits<float>::infinity());
                        vf top_lanes = simd::splat(top[r]), nan_lanes{};
                        for (std::size_t c = 0; c < lanes_end; c += simd::lanes) {
                            const vf v = simd::load(sr + c);
                            nan_lanes = v != v ? simd::splat(1.0f) : nan_lanes;
                            top_lanes = simd::max(top_lanes, v);
                        }
                        float m = top[r];
                        for (int l = 0; l < simd::lanes; ++l) {
                            nan[r] = nan[r] || nan_lanes[l] != 0.0f;
                            m = std::max(m, top_lanes[l]);
                        }
                        if (m == -std::numeric_limits<float>::infinity() || nan[r]) continue;  // nothing kept yet, or NaN
                        vf added{};
                        for (std::size_t c = 0; c < lanes_end; c += simd::lanes) added += simd::exp_nonpositive(simd::load(sr + c) - m);
                        float total = 0;
                        for (int l = 0; l < simd::lanes; ++l) total += added[l];
                        sum[r] = sum[r] * std::exp(top[r] - m) + total;
                        top[r] = m;
                    }
                }
                for (std::size_t r = 0; r < rows; ++r)
                    keep_row_statistics(bh * n_q + q0 + r, top[r], sum[r], nan[r] || top[r] == std::numeric_limits<float>::infinity());
            }
        }
        info.kernels.push_back("backward statistics: each row's softmax max and sum, rowsum(dO ∘ O)");
    }

    // Where each (batch, head) has its own queries and the K/V (batch, head)s
    // keep every thread busy, one pass per K/V (batch, head) computes dK, dV
    // and the dQ of the queries it serves together: five products per pair of
    // tiles. Otherwise dQ takes its own pass (3. below), recomputing S and dP.
    const bool one_pass = fused && qv.batch == env.batch && qv.heads == heads && kv.batch * kv.heads >= o.threads;
    if (one_pass) {
        const auto items = static_cast<std::ptrdiff_t>(kv.batch * kv.heads);
        const std::size_t panel = kernels::panel_width;
#pragma omp parallel num_threads(threads)
        {
            std::vector<float> s(tile * tile), slope(tile * tile), p(tile * tile), dp(tile * tile), core_packed(tile * tile),
                dq_tile(depth * tile);
            std::vector<float> keys_for_scores(d_pad * tile), values_for_dp(dv_pad * tile);
            // dK and dV of the key tile, transposed (depth x keys, d_v x keys), so that the products
            // read Q and dO in place as their broadcast operand and the weights as their panels
            std::vector<float> dk_acc(depth * tile), dv_acc(d_v * tile);
#pragma omp for schedule(dynamic)
            for (std::ptrdiff_t item = 0; item < items; ++item) {
                const auto source = static_cast<std::size_t>(item);
                for (std::size_t k0 = 0; k0 < n_k; k0 += tile) {
                const std::size_t cols = std::min(tile, n_k - k0), key_panels = (cols + panel - 1) / panel;
                std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
                std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
                bool packed = false;
                for_each_served(kv, source, [&](std::size_t b, std::size_t h) {
                    const auto [bh, hd, tree, tree_unmasked] = head_of(b, h);
                    const float* k_tile = hd.k + static_cast<std::ptrdiff_t>(k0) * hd.k_ks;
                    float* dq_out = dq.values.data() + bh * depth * n_q;  // Q is bound per (batch, head) here
                    for (std::size_t q0 = 0; q0 < n_q; q0 += tile) {
                        const std::size_t rows = std::min(tile, n_q - q0);
                        if (weightless(tree, q0, rows, k0, cols)) continue;
                        if (!packed) {  // this key tile's K and V, once for every query tile
                            kernels::pack_panels(depth, cols, k_tile, hd.k_ds, hd.k_ks, keys_for_scores.data());
                            kernels::pack_panels(d_v, cols, hd.v + static_cast<std::ptrdiff_t>(k0) * hd.v_ks, hd.v_cs, hd.v_ks,
                                                 values_for_dp.data());
                            packed = true;
                        }
                        // S = Qᵀ K
                        kernels::multiply_panels(rows, key_panels, depth, hd.q + static_cast<std::ptrdiff_t>(q0) * hd.q_qs, hd.q_qs,
                                                 hd.q_ds, keys_for_scores.data(), static_cast<std::ptrdiff_t>(panel),
                                                 static_cast<std::ptrdiff_t>(depth * panel), s.data(), tile, false);
                        epilogue_of(bh, q0, rows, k0, cols, s.data(), slope.data(), tile, tree, tree_unmasked);
                        weights_of(bh, q0, rows, cols, s.data(), tile);
                        const float* weights = dropped(bh, q0, rows, k0, cols, s.data(), p.data());
                        // dVᵀ += dOᵀ P: the weights, rows of 64 keys, are their own panels
                        kernels::multiply_panels(d_v, key_panels, rows, d_out_row(bh, q0), 1, static_cast<std::ptrdiff_t>(d_v), weights,
                                                 static_cast<std::ptrdiff_t>(tile), static_cast<std::ptrdiff_t>(panel), dv_acc.data(),
                                                 tile, true);
                        // dP = dO Vᵀ
                        kernels::multiply_panels(rows, key_panels, d_v, d_out_row(bh, q0), static_cast<std::ptrdiff_t>(d_v), 1,
                                                 values_for_dp.data(), static_cast<std::ptrdiff_t>(panel),
                                                 static_cast<std::ptrdiff_t>(d_v * panel), dp.data(), tile, false);
                        core_gradient(bh, q0, rows, k0, cols, s.data(), dp.data(), slope.data(), tile);
                        // dKᵀ += Q dCore
                        kernels::multiply_panels(depth, key_panels, rows, hd.q + static_cast<std::ptrdiff_t>(q0) * hd.q_qs, hd.q_ds,
                                                 hd.q_qs, dp.data(), static_cast<std::ptrdiff_t>(tile), static_cast<std::ptrdiff_t>(panel),
                                                 dk_acc.data(), tile, true);
                        // dQᵀ's share of this key tile, added into dQ as bound (depth x n_q): only
                        // this item writes the dQ of the heads its K/V serves
                        // (dQᵀ = K dCoreᵀ: K read in place, dCoreᵀ packed, so that the tile adds into dQ
                        // along its rows)
                        kernels::pack_panels(cols, rows, dp.data(), 1, static_cast<std::ptrdiff_t>(tile), core_packed.data());
                        kernels::multiply_panels(depth, (rows + panel - 1) / panel, cols, k_tile, hd.k_ds, hd.k_ks, core_packed.data(),
                                                 static_cast<std::ptrdiff_t>(panel), static_cast<std::ptrdiff_t>(cols * panel),
                                                 dq_tile.data(), tile, false);
                        for (std::size_t a = 0; a < depth; ++a) {
                            float* to = dq_out + a * n_q + q0;
                            const float* from = dq_tile.data() + a * tile;
                            for (std::size_t r = 0; r < rows; ++r) to[r] += from[r];
                        }
                    }
                });
                float* dk_out = dk.values.data() + source * depth * n_k;
                float* dv_out = dvt.values.data() + source * n_k * d_v;
                for (std::size_t a = 0; a < depth; ++a) std::copy_n(dk_acc.data() + a * tile, cols, dk_out + a * n_k + k0);
                for (std::size_t c = 0; c < cols; ++c)
                    for (std::size_t a = 0; a < d_v; ++a) dv_out[(k0 + c) * d_v + a] = dv_acc[a * tile + c];
                }  // key tiles
            }
        }
        info.kernels.push_back("fused backward, per K/V head: dK, dV and dQ of " + to_string(e));
        info.intermediate_bytes += static_cast<std::size_t>(threads) * sizeof(float) *
                                   (6 * tile * tile + tile * (d_pad + dv_pad + 2 * depth + d_v));
    } else if (fused) {
        // ---- 2. dK and dV, per key tile of each K/V (batch, head) --------------------------
        {
            const auto items = static_cast<std::ptrdiff_t>(kv.batch * kv.heads * k_tiles);
#pragma omp parallel num_threads(threads)
            {
                std::vector<float> s(tile * tile), slope(tile * tile), p(tile * tile), dp(tile * tile), packing;
                std::vector<float> dk_acc(tile * d_pad), dv_acc(tile * dv_pad);
#pragma omp for schedule(dynamic)
                for (std::ptrdiff_t item = 0; item < items; ++item) {
                    const std::size_t source = static_cast<std::size_t>(item) / k_tiles, k0 = static_cast<std::size_t>(item) % k_tiles * tile;
                    const std::size_t cols = std::min(tile, n_k - k0);
                    std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
                    std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
                    for_each_served(kv, source, [&](std::size_t b, std::size_t h) {
                        const auto [bh, hd, tree, tree_unmasked] = head_of(b, h);
                        for (std::size_t q0 = 0; q0 < n_q; q0 += tile) {
                            const std::size_t rows = std::min(tile, n_q - q0);
                            if (!scores(hd, bh, q0, rows, k0, cols, s.data(), slope.data(), tile, packing, tree, tree_unmasked)) continue;
                            weights_of(bh, q0, rows, cols, s.data(), tile);
                            const float* weights = dropped(bh, q0, rows, k0, cols, s.data(), p.data());
                            // dV += Pᵀ dO (the weights as the forward used them)
                            multiply_any(cols, d_v, rows, weights, 1, static_cast<std::ptrdiff_t>(tile), d_out_row(bh, q0),
                                         static_cast<std::ptrdiff_t>(d_v), 1, dv_acc.data(), dv_pad, true, packing);
                            // dP = dO Vᵀ
                            multiply_any(rows, cols, d_v, d_out_row(bh, q0), static_cast<std::ptrdiff_t>(d_v), 1,
                                         hd.v + static_cast<std::ptrdiff_t>(k0) * hd.v_ks, hd.v_cs, hd.v_ks, dp.data(), tile, false, packing);
                            core_gradient(bh, q0, rows, k0, cols, s.data(), dp.data(), slope.data(), tile);
                            // dK += dCoreᵀ Qᵀ: (keys x queries)(queries x depth)
                            multiply_any(cols, depth, rows, dp.data(), 1, static_cast<std::ptrdiff_t>(tile),
                                         hd.q + static_cast<std::ptrdiff_t>(q0) * hd.q_qs, hd.q_qs, hd.q_ds, dk_acc.data(), d_pad, true,
                                         packing);
                        }
                    });
                    float* dk_out = dk.values.data() + source * depth * n_k;
                    float* dv_out = dvt.values.data() + source * n_k * d_v;
                    for (std::size_t c = 0; c < cols; ++c) {
                        for (std::size_t a = 0; a < depth; ++a) dk_out[a * n_k + k0 + c] = dk_acc[c * d_pad + a];
                        for (std::size_t a = 0; a < d_v; ++a) dv_out[(k0 + c) * d_v + a] = dv_acc[c * dv_pad + a];
                    }
                }
            }
            info.kernels.push_back("fused backward, per key tile: dK, dV of " + to_string(e));
        }
        // ---- 3. dQ, per query tile of each Q (batch, head) ---------------------------------
        {
            const auto items = static_cast<std::ptrdiff_t>(qv.batch * qv.heads * q_tiles);
#pragma omp parallel num_threads(threads)
            {
                std::vector<float> s(tile * tile), slope(tile * tile), dp(tile * tile), packing, dq_acc(tile * d_pad);
#pragma omp for schedule(dynamic)
                for (std::ptrdiff_t item = 0; item < items; ++item) {
                    const std::size_t source = static_cast<std::size_t>(item) / q_tiles, q0 = static_cast<std::size_t>(item) % q_tiles * tile;
                    const std::size_t rows = std::min(tile, n_q - q0);
                    std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
                    for_each_served(qv, source, [&](std::size_t b, std::size_t h) {
                        const auto [bh, hd, tree, tree_unmasked] = head_of(b, h);
                        for (std::size_t k0 = 0; k0 < n_k; k0 += tile) {
                            const std::size_t cols = std::min(tile, n_k - k0);
                            if (!scores(hd, bh, q0, rows, k0, cols, s.data(), slope.data(), tile, packing, tree, tree_unmasked)) continue;
                            weights_of(bh, q0, rows, cols, s.data(), tile);
                            multiply_any(rows, cols, d_v, d_out_row(bh, q0), static_cast<std::ptrdiff_t>(d_v), 1,
                                         hd.v + static_cast<std::ptrdiff_t>(k0) * hd.v_ks, hd.v_cs, hd.v_ks, dp.data(), tile, false, packing);
                            core_gradient(bh, q0, rows, k0, cols, s.data(), dp.data(), slope.data(), tile);
                            // dQᵀ += dCore Kᵀ: (queries x keys)(keys x depth)
                            multiply_any(rows, depth, cols, dp.data(), static_cast<std::ptrdiff_t>(tile), 1,
                                         hd.k + static_cast<std::ptrdiff_t>(k0) * hd.k_ks, hd.k_ks, hd.k_ds, dq_acc.data(), d_pad, true,
                                         packing);
                        }
                    });
                    float* dq_out = dq.values.data() + source * depth * n_q;
                    for (std::size_t r = 0; r < rows; ++r)
                        for (std::size_t a = 0; a < depth; ++a) dq_out[a * n_q + q0 + r] = dq_acc[r * d_pad + a];
                }
            }
            info.kernels.push_back("fused backward, per query tile: dQ of " + to_string(e));
        }
        info.intermediate_bytes += static_cast<std::size_t>(threads) * sizeof(float) *
                                   (5 * tile * tile + tile * (d_pad + dv_pad) + tile * std::max(d_pad, dv_pad));
    } else {
        // ---- unfused: S, P, dP and dS whole, each its own kernel ---------------------------
        // (pointwise weights: P is S, which holds the weights already)
        const std::size_t ld = kernels::round_up(n_k, kernels::panel_width), whole = env.batch * heads * n_q * ld;
        const std::size_t matrices = pointwise ? 3 : 4;
        std::vector<float> s(whole), slope(whole), p(pointwise ? 0 : whole), dp(whole);
        info.intermediate_bytes += matrices * whole * sizeof(float);
        info.score_bytes += matrices * whole * sizeof(float);
        const auto bhs = static_cast<std::ptrdiff_t>(env.batch * heads);
        std::vector<float>& weights = pointwise ? s : p;
        auto at = [&](std::vector<float>& m, std::size_t bh) { return m.data() + bh * n_q * ld; };
        auto each_head = [&](const auto& body) {
#pragma omp parallel num_threads(threads)
            {
                std::vector<float> packing;
#pragma omp for schedule(static)
                for (std::ptrdiff_t bh = 0; bh < bhs; ++bh) body(static_cast<std::size_t>(bh), packing);
            }
        };
        each_head([&](std::size_t bh, std::vector<float>& packing) {  // S and its slopes: Qᵀ K and the epilogue
            const auto [_, hd, tree, tree_unmasked] = head_of(bh / heads, bh % heads);
            float* sb = at(s, bh);
            float* gb = at(slope, bh);
            if (!scores(hd, bh, 0, n_q, 0, n_k, sb, gb, ld, packing, tree, tree_unmasked))  // weightless: no weight, no slope
                std::fill_n(sb, n_q * ld, pointwise ? 0.0f : -std::numeric_limits<float>::infinity());
        });
        info.kernels.push_back("backward: the scores and their slopes of " + to_string(parts::score(e)));
        each_head([&](std::size_t bh, std::vector<float>&) {  // P
            if constexpr (!pointwise) std::copy_n(at(s, bh), n_q * ld, at(weights, bh));
            weights_of(bh, 0, n_q, n_k, at(weights, bh), ld);
        });
        info.kernels.push_back(pointwise ? "backward: the weights P = S (pointwise, as they are)" : "backward: the weights P");
        each_head([&](std::size_t bh, std::vector<float>& packing) {  // dP = dO Vᵀ
            const head_operands hd = operands_of(bh / heads, bh % heads);
            multiply_any(n_q, n_k, d_v, d_out_row(bh, 0), static_cast<std::ptrdiff_t>(d_v), 1, hd.v, hd.v_cs, hd.v_ks, at(dp, bh), ld,
                         false, packing);
        });
        info.kernels.push_back("backward: dP = dO Vᵀ");
        each_head([&](std::size_t bh, std::vector<float>&) { core_gradient(bh, 0, n_q, 0, n_k, at(weights, bh), at(dp, bh), at(slope, bh), ld); });
        info.kernels.push_back(pointwise ? "backward: dS = dP ∘ w'(S), through the weights" : "backward: dS = P ∘ (dP − D), through the epilogue");
        if constexpr (with_dropout)
            each_head([&](std::size_t bh, std::vector<float>&) {
                kernels::dropout_tile(at(weights, bh), n_q, n_k, static_cast<std::ptrdiff_t>(ld), 1, dropout_seed, dropout_threshold, keep_scale,
                                      static_cast<std::uint32_t>(bh), 0, 0);
            });
        // dV = Pᵀ dO and dK = dSᵀ Qᵀ per K/V source, dQᵀ = dS Kᵀ per Q source, summed over the heads they serve
        auto per_source = [&](const tensor_view<float>& operand, const auto& body) {
            const auto sources = static_cast<std::ptrdiff_t>(operand.batch * operand.heads);
#pragma omp parallel num_threads(threads)
            {
                std::vector<float> packing;
#pragma omp for schedule(static)
                for (std::ptrdiff_t source = 0; source < sources; ++source)
                    for_each_served(operand, static_cast<std::size_t>(source), [&](std::size_t b, std::size_t h) {
                        body(static_cast<std::size_t>(source), b * heads + h, packing);
                    });
            }
        };
        per_source(vv, [&](std::size_t source, std::size_t bh, std::vector<float>& packing) {
            std::vector<float> acc(n_k * dv_pad);
            multiply_any(n_k, d_v, n_q, at(weights, bh), 1, static_cast<std::ptrdiff_t>(ld), d_out_row(bh, 0), static_cast<std::ptrdiff_t>(d_v), 1,
                         acc.data(), dv_pad, false, packing);
            float* out = dvt.values.data() + source * n_k * d_v;
            for (std::size_t c = 0; c < n_k; ++c)
                for (std::size_t a = 0; a < d_v; ++a) out[c * d_v + a] += acc[c * dv_pad + a];
        });
        info.kernels.push_back("backward: dV = Pᵀ dO");
        per_source(kv, [&](std::size_t source, std::size_t bh, std::vector<float>& packing) {
            const head_operands hd = operands_of(bh / heads, bh % heads);
            std::vector<float> acc(n_k * d_pad);
            multiply_any(n_k, depth, n_q, at(dp, bh), 1, static_cast<std::ptrdiff_t>(ld), hd.q, hd.q_qs, hd.q_ds, acc.data(), d_pad, false,
                         packing);
            float* out = dk.values.data() + source * depth * n_k;
            for (std::size_t c = 0; c < n_k; ++c)
                for (std::size_t a = 0; a < depth; ++a) out[a * n_k + c] += acc[c * d_pad + a];
        });
        info.kernels.push_back("backward: dK = dSᵀ Qᵀ");
        per_source(qv, [&](std::size_t source, std::size_t bh, std::vector<float>& packing) {
            const head_operands hd = operands_of(bh / heads, bh % heads);
            std::vector<float> acc(n_q * d_pad);
            multiply_any(n_q, depth, n_k, at(dp, bh), static_cast<std::ptrdiff_t>(ld), 1, hd.k, hd.k_ks, hd.k_ds, acc.data(), d_pad, false,
                         packing);
            float* out = dq.values.data() + source * depth * n_q;
            for (std::size_t r = 0; r < n_q; ++r)
                for (std::size_t a = 0; a < depth; ++a) out[a * n_q + r] += acc[r * d_pad + a];
        });
        info.kernels.push_back("backward: dQ = dS Kᵀ");
    }

    hand_out_attention_gradients<E, QI, KI, VI>(result, std::move(dq), std::move(dk), std::move(dvt), bindings...);
    info.dispatches = info.kernels.size();
    info.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return result;
}

}  // namespace ATTNFUSE_CPU_ISA
}  // namespace detail

namespace detail {
template <class E, class... Bindings>
backward_result backward_given(const E& e, const tensor& output, const tensor& d_output, const row_statistics* given, const options& opt,
                               const Bindings&... bindings) {
    attnfuse::check::no_pending_transpose<E>();
    if constexpr (plan::composed_backward_v<E>) {
        return composed_backward(
            e, output, d_output, [&](const auto& x, const auto&... b) { return cpu::run(x, opt, b...); },
            [&](const auto& x, const auto&... b) { return backward_given(x, output, d_output, given, opt, b...); },
            [&](const auto& x, const tensor& o, const tensor& d_o, const auto&... b) { return backward_given(x, o, d_o, nullptr, opt, b...); },
            bindings...);
    } else if constexpr (!plan::attention_backward_v<E>) {
        throw std::invalid_argument(outside_attention_backward("cpu", to_string(e)));
    } else {
        auto as_f32 = [](const auto& b) {
            if constexpr (std::is_same_v<std::remove_cvref_t<decltype(*b.view.data)>, float>) return b;
            else return widened(b);
        };
        return attention_backward(e, output, d_output, given, opt, as_f32(bindings)...);
    }
}
}  // namespace detail

// The gradient of sum(d_output ∘ output) in every bound input, where output
// = run(e, bindings...).output: Q, K and V of a softmax attention
// (plan::attention_backward_v<E>), fused (the default) or unfused. 16-bit
// inputs are widened once for the pass. An expression outside that form is a
// std::invalid_argument naming it (reference::backward differentiates every
// expression); output and d_output of another shape are shape_errors.
template <class E, class... Bindings>
    requires expression<E> && (a_binding<Bindings> && ...)
backward_result backward(const E& e, const tensor& output, const tensor& d_output, const options& opt, const Bindings&... bindings) {
    return detail::backward_given(e, output, d_output, nullptr, opt, bindings...);
}
template <class E, class... Bindings>
    requires expression<E> && (a_binding<Bindings> && ...)
backward_result backward(const E& e, const tensor& output, const tensor& d_output, const Bindings&... bindings) {
    return backward(e, output, d_output, options{}, bindings...);
}

// The same from a training forward's result (run_for_training): its row
// statistics spare the fused pass its first walk over the keys. The unfused
// pass recomputes everything either way.
template <class E, class... Bindings>
    requires expression<E> && (a_binding<Bindings> && ...)
backward_result backward(const E& e, const training_result& forward, const tensor& d_output, const options& opt, const Bindings&... bindings) {
    return detail::backward_given(e, forward.output, d_output, &forward.statistics, opt, bindings...);
}
template <class E, class... Bindings>
    requires expression<E> && (a_binding<Bindings> && ...)
backward_result backward(const E& e, const training_result& forward, const tensor& d_output, const Bindings&... bindings) {
    return backward(e, forward, d_output, options{}, bindings...);
}

}  // namespace attnfuse::cpu
