// Lowering of the planner's kernels to CPU loops. The templates here only
// walk the expression and run its pointwise parts; the heavy loops are the
// compiled kernels of kernels.hpp.
#pragma once
#include <omp.h>

#include <chrono>
#include <deque>
#include <map>
#include <set>
#include <memory>
#include <string>
#include <thread>
#include <typeinfo>
#include <vector>

#include <attnfuse/lower.hpp>
#include <attnfuse/plan.hpp>
#include <attnfuse/run.hpp>

#include "kernels.hpp"
#include "pointwise.hpp"

namespace attnfuse::cpu {

using attnfuse::execution;
using attnfuse::report;
using attnfuse::run_result;
using attnfuse::tensor;

using options = attnfuse::run_options;  // mode and threads

namespace detail {
inline namespace ATTNFUSE_CPU_ISA {

// The caller's output (run_into) where the root's fused kernel writes its
// rows as stored, rounded to f16 or bf16 or at the caller's fp32 strides,
// with no fp32 copy of the result (exactly one pointer is set).
struct root_output {
    float* f32 = nullptr;
    half* f16 = nullptr;
    bfloat16* bf16 = nullptr;
    std::ptrdiff_t row_stride = 0, col_stride = 0, batch_stride = 0, head_stride = 0;

    void store_row(std::size_t b, std::size_t h, std::size_t r, const float* values, std::size_t count) const {
        const std::ptrdiff_t base = static_cast<std::ptrdiff_t>(b) * batch_stride + static_cast<std::ptrdiff_t>(h) * head_stride +
                                    static_cast<std::ptrdiff_t>(r) * row_stride;
        for (std::size_t c = 0; c < count; ++c) {
            const std::ptrdiff_t n = base + static_cast<std::ptrdiff_t>(c) * col_stride;
            if (f32) f32[n] = values[c];
            else if (f16) f16[n] = from_float<half>(values[c]);
            else bf16[n] = from_float<bfloat16>(values[c]);
        }
    }
};
template <class El>
root_output root_output_of(const output_view<El>& out) {
    root_output o{nullptr, nullptr, nullptr, out.row_stride, out.col_stride, out.batch_stride, out.head_stride};
    if constexpr (std::is_same_v<El, half>) o.f16 = out.data;
    else if constexpr (std::is_same_v<El, bfloat16>) o.bf16 = out.data;
    else o.f32 = out.data;
    return o;
}

// A matrix the kernels read: a bound input, or an intermediate that the
// arena owns (all batch entries and heads, row-major with a padded stride).
template <class Env>
struct executor {
    Env env;  // its own copy: the lowering sets env.heads inside concat_heads
    options opt;
    report& info;
    std::deque<std::vector<float>> arena;

    // Nodes holding scores or weights (plan::collect_score_nodes).
    std::set<const void*> score_nodes;
    template <class E>
    void note_result(const E& e, const tensor_view<float>& v) {
        if (score_nodes.count(static_cast<const void*>(&e)))
            info.score_bytes += env.batch * env.heads * v.rows * static_cast<std::size_t>(v.row_stride) * sizeof(float);
    }

    // The node whose result is the run's output, and where that output goes:
    // its kernel writes there directly instead of into the arena.
    const void* root = nullptr;
    float* root_target = nullptr;
    const std::type_info* root_type = nullptr;

    // Where node `e` writes a dense rows x cols result: the caller's output
    // for the root, else a new intermediate.
    template <class E>
    tensor_view<float> destination(const E& e, std::size_t rows, std::size_t cols) {
        if (static_cast<const void*>(&e) == root && root_target && typeid(E) == *root_type) {
            const auto c = static_cast<std::ptrdiff_t>(cols), m = static_cast<std::ptrdiff_t>(rows * cols);
            return {root_target, rows, cols, env.batch, env.heads, c, 1, static_cast<std::ptrdiff_t>(env.heads) * m, m};
        }
        return allocate(rows, cols, cols);
    }

    tensor_view<float> allocate(std::size_t rows, std::size_t cols, std::size_t row_stride) {
        const std::size_t per_matrix = rows * row_stride;
        arena.emplace_back(env.batch * env.heads * per_matrix, 0.0f);
        info.intermediate_bytes += arena.back().size() * sizeof(float);
        const auto rs = static_cast<std::ptrdiff_t>(row_stride), pm = static_cast<std::ptrdiff_t>(per_matrix);
        return {arena.back().data(), rows, cols, env.batch, env.heads, rs, 1,
                static_cast<std::ptrdiff_t>(env.heads) * pm, pm};
    }
    float* matrix_of(const tensor_view<float>& v, std::size_t b, std::size_t h) const {
        return const_cast<float*>(matrix_base(v, env, b, h));
    }
    std::size_t heads_total() const { return env.batch * env.heads; }

    // A 16-bit input for a kernel that reads fp32: widened once per run
    // (bind.hpp's widened(), which owns the copy), with a note.
    std::map<std::string_view, binding<"", float>> widened_inputs;
    template <fixed_string Name, class El>
    tensor_view<float> widened_input(const tensor_view<El>& v) {
        if (const auto found = widened_inputs.find(Name.view()); found != widened_inputs.end()) return found->second.view;
        const binding<Name, float> wide = widened(binding<Name, El>{v});
        const std::size_t bytes = wide.owned->size() * sizeof(float);
        info.intermediate_bytes += bytes;
        info.notes.push_back("input " + std::string(Name.view()) + ": stored as " + std::string(wide.widened_from) +
                             "; a kernel of this run that reads f32 only read it widened (" + std::to_string(bytes) + " bytes)");
        widened_inputs.emplace(Name.view(), binding<"", float>{wide.view, wide.owned});
        return wide.view;
    }
    int threads() const { return static_cast<int>(opt.threads); }

    // run_into's output, where it is not the dense fp32 root_target: a root
    // fused attention writes there directly.
    const root_output* direct_root = nullptr;
    template <class E>
    const root_output* direct_output(const E& e) const {
        return direct_root && static_cast<const void*>(&e) == root && typeid(E) == *root_type ? direct_root : nullptr;
    }

    // A training forward's row statistics (run_for_training), which
    // the root attention's fused kernel writes, or, where it runs unfused,
    // the kernel of its softmax node.
    row_statistics* statistics = nullptr;
    const void* statistics_attention = nullptr;
    const void* statistics_softmax = nullptr;
    bool statistics_kept = false;
    template <class E>
    row_statistics* statistics_of(const E& e, const void* node) {
        if (!statistics || static_cast<const void*>(&e) != node) return nullptr;
        statistics_kept = true;
        return statistics;
    }
};

template <class E, class X> tensor_view<float> evaluate(const E& e, X& x);

// ---- preparing pointwise trees ---------------------------------------------
template <class Core, class E, class X>
auto prepare(const E& e, X& x) {
    if constexpr (!std::is_void_v<Core> && std::is_same_v<E, Core>) {
        return core_slot{};
    } else if constexpr (std::is_same_v<E, constant> || std::is_same_v<E, query_index> ||
                         std::is_same_v<E, key_index>) {
        return e;
    } else if constexpr (!is_pointwise_v<E>) {
        return memory_leaf{{}, evaluate(e, x), nullptr};
    } else if constexpr (has_kind_v<E, kind::scale_by_inner_extent>) {
        const double d = static_cast<double>(inner_extent(e, x.env));
        return make_node(kind::scale_by{{}, 1.0 / std::sqrt(d)}, prepare<Core>(e.template kid<0>(), x));
    } else {
        return std::apply([&](const auto&... kids) { return make_node(e.kind, prepare<Core>(kids, x)...); }, e.kids);
    }
}

// ---- unfused kernels ------------------------------------------------------------
template <class E, class X>
tensor_view<float> pointwise_loop(const E& e, X& x) {
    const runtime_shape shape = shape_of(e, x.env);
    const auto prepared = prepare<void>(e, x);
    x.info.kernels.push_back(plan::kernel_name<plan::pointwise_kernel<E>>::get(e));
    if (shape.cols == 1 && shape.rows > 1) {
        // a column (a per-query vector, local-p's centres): computed a
        // vector of rows at a time and stored densely, so that a fused kernel's
        // transposed score tile reads it with vector loads
        const std::size_t padded = kernels::round_up(shape.rows, simd::lanes), groups = padded / simd::lanes;
        tensor_view<float> out = x.allocate(padded, 1, 1);
        out.rows = shape.rows;
        const auto items = static_cast<std::ptrdiff_t>(x.heads_total() * groups);
#pragma omp parallel for schedule(static) num_threads(x.threads())
        for (std::ptrdiff_t item = 0; item < items; ++item) {
            const std::size_t bh = static_cast<std::size_t>(item) / groups, row = static_cast<std::size_t>(item) % groups * simd::lanes;
            const std::size_t b = bh / x.env.heads, h = bh % x.env.heads;
            const auto tree = at_head(prepared, x.env, b, h);
            simd::store(x.matrix_of(out, b, h) + row, lanes_of<lanes_along::queries>(tree, lane_position{row, 0, nullptr, static_cast<std::uint32_t>(bh)}));
        }
        return out;
    }
    const tensor_view<float> out = x.allocate(shape.rows, shape.cols, kernels::round_up(shape.cols, simd::lanes));
    const auto items = static_cast<std::ptrdiff_t>(x.heads_total() * shape.rows);
#pragma omp parallel for schedule(static) num_threads(x.threads())
    for (std::ptrdiff_t item = 0; item < items; ++item) {
        const std::size_t bh = static_cast<std::size_t>(item) / shape.rows, row = static_cast<std::size_t>(item) % shape.rows;
        const std::size_t b = bh / x.env.heads, h = bh % x.env.heads;
        const auto tree = at_head(prepared, x.env, b, h);
        float* dst = x.matrix_of(out, b, h) + static_cast<std::ptrdiff_t>(row) * out.row_stride;
        for (std::size_t c = 0; c < shape.cols; c += simd::lanes)
            simd::store(dst + c, lanes_of<lanes_along::keys>(tree, lane_position{row, c, nullptr, static_cast<std::uint32_t>(bh)}));
    }
    return out;
}

// C = A*B for every (batch, head), through the packed micro-kernel.
template <class X>
tensor_view<float> product_kernel(const tensor_view<float>& lhs, const tensor_view<float>& rhs, X& x) {
    const std::size_t m = lhs.rows, depth = lhs.cols, n = rhs.cols;
    const std::size_t panels = (n + kernels::panel_width - 1) / kernels::panel_width;
    const std::size_t packed_size = panels * kernels::panel_width * depth;
    const tensor_view<float> out = x.allocate(m, n, panels * kernels::panel_width);
    std::vector<float> packed(x.heads_total() * packed_size);
    x.info.intermediate_bytes += packed.size() * sizeof(float);
    const auto bhs = static_cast<std::ptrdiff_t>(x.heads_total());
    constexpr std::size_t rows_per_item = 8 * kernels::block_rows;
    const std::size_t row_items = (m + rows_per_item - 1) / rows_per_item;
    const auto items = static_cast<std::ptrdiff_t>(x.heads_total() * row_items);
#pragma omp parallel num_threads(x.threads())
    {
#pragma omp for schedule(static)
        for (std::ptrdiff_t bh = 0; bh < bhs; ++bh) {
            const std::size_t b = static_cast<std::size_t>(bh) / x.env.heads, h = static_cast<std::size_t>(bh) % x.env.heads;
            kernels::pack_panels(depth, n, matrix_base(rhs, x.env, b, h), rhs.row_stride, rhs.col_stride,
                                 packed.data() + static_cast<std::size_t>(bh) * packed_size);
        }
#pragma omp for schedule(dynamic)
        for (std::ptrdiff_t item = 0; item < items; ++item) {
            const std::size_t bh = static_cast<std::size_t>(item) / row_items;
            const std::size_t r0 = static_cast<std::size_t>(item) % row_items * rows_per_item;
            const std::size_t b = bh / x.env.heads, h = bh % x.env.heads;
            const float* a = matrix_base(lhs, x.env, b, h) + static_cast<std::ptrdiff_t>(r0) * lhs.row_stride;
            kernels::multiply_packed(std::min(rows_per_item, m - r0), panels, depth, a, lhs.row_stride, lhs.col_stride,
                                     packed.data() + bh * packed_size,
                                     x.matrix_of(out, b, h) + static_cast<std::ptrdiff_t>(r0) * out.row_stride,
                                     static_cast<std::size_t>(out.row_stride), false);
        }
    }
    return out;
}

// The rule of weights x values (plan::is_weighted_sum): a key whose weight
// is 0 contributes nothing, whatever its value. The packed product computes
// 0 * NaN = NaN, so a row left non-finite is summed again, skipping zero
// weights; rows with finite results (almost always all of them) cost a scan.
template <class X>
void skip_zero_weights(const tensor_view<float>& weights, const tensor_view<float>& values, const tensor_view<float>& out, X& x) {
    for (std::size_t b = 0; b < x.env.batch; ++b)
        for (std::size_t h = 0; h < x.env.heads; ++h) {
            const float *w = matrix_base(weights, x.env, b, h), *v = matrix_base(values, x.env, b, h);
            float* o = x.matrix_of(out, b, h);
            for (std::size_t r = 0; r < out.rows; ++r) {
                float* row = o + static_cast<std::ptrdiff_t>(r) * out.row_stride;
                if (std::all_of(row, row + out.cols, [](float y) { return std::isfinite(y); })) continue;
                for (std::size_t c = 0; c < out.cols; ++c) {
                    double sum = 0;
                    for (std::size_t k = 0; k < weights.cols; ++k) {
                        const float wk = w[static_cast<std::ptrdiff_t>(r) * weights.row_stride + static_cast<std::ptrdiff_t>(k) * weights.col_stride];
                        if (wk != 0.0f)
                            sum += static_cast<double>(wk) * v[static_cast<std::ptrdiff_t>(k) * values.row_stride + static_cast<std::ptrdiff_t>(c) * values.col_stride];
                    }
                    row[c] = static_cast<float>(sum);
                }
            }
        }
}

template <class X>
tensor_view<float> dense_copy(const tensor_view<float>& v, X& x) {
    const tensor_view<float> out = x.allocate(v.rows, v.cols, v.cols);
    for (std::size_t b = 0; b < x.env.batch; ++b)
        for (std::size_t h = 0; h < x.env.heads; ++h) {
            const float* src = matrix_base(v, x.env, b, h);
            float* dst = x.matrix_of(out, b, h);
            for (std::size_t r = 0; r < v.rows; ++r)
                for (std::size_t c = 0; c < v.cols; ++c)
                    dst[r * v.cols + c] = src[static_cast<std::ptrdiff_t>(r) * v.row_stride + static_cast<std::ptrdiff_t>(c) * v.col_stride];
        }
    return out;
}

// ---- the fused attention kernel -----------------------------------------------

// f(qf, kf) of a pairwise score, a vector of key lanes at a time.
template <class F>
vf combine_lanes(const F& f, vf q, vf k) {
    if constexpr (std::is_same_v<F, pair_query_feature>) return q;
    else if constexpr (std::is_same_v<F, pair_key_feature>) return k;
    else if constexpr (std::is_same_v<F, constant>) return simd::splat(static_cast<float>(f.value));
    else {
        using Op = typename F::kind_type::op;
        return std::apply([&](const auto&... kids) { return simd::apply<Op>(combine_lanes(kids, q, k)...); }, f.kids);
    }
}

// Tile extents of the fused kernel. The score tile is kept transposed,
// keys x queries: the keys (columns of a d x n_k matrix) are then the
// broadcast operand of the product and need no packing, the query tile is
// packed once for all key tiles, and the online softmax runs down columns
// with no horizontal reduction. 48 queries (three panels of 16) against 128
// keys keep one thread's tiles within its share of L2.
inline constexpr std::size_t query_tile = 3 * kernels::panel_width;
inline constexpr std::size_t key_tile = 128;
// Below this many queries (decode) the transposed tile would waste most of
// its lanes: the row-oriented path with dot products runs instead.
inline constexpr std::size_t few_queries = kernels::panel_width;

// One thread's working set in the fused kernel.
struct fused_scratch {
    std::vector<float> scores, packed, packed_values, accumulator, tile_max, best;
    std::vector<float> wide_queries, wide_keys, wide_values;  // tiles of 16-bit operands, widened
    std::vector<bfloat16> query_pairs, key_pairs, weight_pairs, value_pairs;  // operands of bf16 products
    std::vector<kernels::row_state> state;
    std::vector<std::size_t> best_index;
    std::vector<unsigned char> nan_seen;  // bytes: vector<bool> has no data()
};

// A block of a matrix as floats: entry (i, j) at data[i*i_stride + j*j_stride].
struct float_block {
    const float* data = nullptr;
    std::ptrdiff_t i_stride = 0, j_stride = 0;
};

// One (batch, head) matrix of a fused kernel's operand as stored: fp32, or
// f16 or bf16 (exactly one pointer is set).
struct stored_matrix {
    const float* f32 = nullptr;
    const half* f16 = nullptr;
    const bfloat16* bf16 = nullptr;
    std::ptrdiff_t row_stride = 0, col_stride = 0;

    float at(std::size_t r, std::size_t c) const {
        const std::ptrdiff_t n = static_cast<std::ptrdiff_t>(r) * row_stride + static_cast<std::ptrdiff_t>(c) * col_stride;
        return f32 ? f32[n] : f16 ? to_float(f16[n]) : to_float(bf16[n]);
    }
    // Entries (i0 + i, j) for i < count, j < width, where i runs along the
    // rows (by_rows) or the columns: fp32 in place; 16-bit widened into
    // `scratch` as count x ld floats, zero from width to padded.
    float_block block(bool by_rows, std::size_t i0, std::size_t count, std::size_t width, float* scratch, std::size_t ld,
                      std::size_t padded) const {
        const std::ptrdiff_t is = by_rows ? row_stride : col_stride, js = by_rows ? col_stride : row_stride;
        const std::ptrdiff_t first = static_cast<std::ptrdiff_t>(i0) * is;
        if (f32) return {f32 + first, is, js};
        with_16_bits([&](const auto* data) { kernels::widen_block(data + first, count, width, is, js, scratch, ld, padded); });
        return {scratch, static_cast<std::ptrdiff_t>(ld), 1};
    }
    // f(data) with the 16-bit pointer, whichever format it is
    template <class F> void with_16_bits(const F& f) const {
        if (f16) f(f16);
        else f(bf16);
    }

    // The kernels that read a 16-bit operand in place, widening in
    // registers: keys whose depth is contiguous, for the dot products of the
    // row-oriented (decode) path; value rows that are their own panels, for
    // the weighted sum.
    bool keys_in_place() const { return !f32 && row_stride == 1; }
    void dots_with_keys(std::size_t rows, std::size_t keys, std::size_t depth, const float* a, std::ptrdiff_t a_r_stride,
                        std::ptrdiff_t a_p_stride, std::size_t key0, float* s, std::size_t lds) const {
        const std::ptrdiff_t first = static_cast<std::ptrdiff_t>(key0) * col_stride;
        with_16_bits([&](const auto* data) { kernels::multiply_dots(rows, keys, depth, a, a_r_stride, a_p_stride, data + first, col_stride, s, lds); });
    }
    bool values_in_place(std::size_t d_v) const { return !f32 && col_stride == 1 && d_v % kernels::panel_width == 0; }
    void multiply_values(std::size_t rows, std::size_t d_v, std::size_t keys, const float* w, std::ptrdiff_t w_r_stride,
                         std::ptrdiff_t w_c_stride, std::size_t key0, float* acc, std::size_t ld_acc) const {
        const std::ptrdiff_t first = static_cast<std::ptrdiff_t>(key0) * row_stride;
        const std::size_t panels = d_v / kernels::panel_width;
        with_16_bits([&](const auto* data) {
            kernels::multiply_panels(rows, panels, keys, w, w_r_stride, w_c_stride, data + first, row_stride, kernels::panel_width, acc, ld_acc, true);
        });
    }
};

// An operand of the fused kernel: a bound input as the caller stored it
// (a 16-bit K/V cache is read at two bytes an element, a tile at a time,
// and never copied whole), or a computed fp32 intermediate.
struct stored_operand {
    tensor_view<float> f32;
    tensor_view<half> f16;
    tensor_view<bfloat16> bf16;

    template <class F> decltype(auto) visit(const F& f) const {
        if (f16.data) return f(f16);
        if (bf16.data) return f(bf16);
        return f(f32);
    }
    std::size_t rows() const { return visit([](const auto& v) { return v.rows; }); }
    std::size_t cols() const { return visit([](const auto& v) { return v.cols; }); }
    bool widened_by_tiles() const { return f16.data || bf16.data; }
    template <class Env>
    stored_matrix at(const Env& env, std::size_t b, std::size_t h) const {
        stored_matrix m;
        if (f16.data) m.f16 = matrix_base(f16, env, b, h);
        else if (bf16.data) m.bf16 = matrix_base(bf16, env, b, h);
        else m.f32 = matrix_base(f32, env, b, h);
        m.row_stride = visit([](const auto& v) { return v.row_stride; });
        m.col_stride = visit([](const auto& v) { return v.col_stride; });
        return m;
    }
};

// A part of the attention for the fused kernel: a bound input read as
// stored, anything else evaluated (to fp32) first.
template <class Part, class X>
stored_operand fused_operand(const Part& part, X& x) {
    stored_operand o;
    if constexpr (is_input_v<Part>) {
        const auto& v = x.env.template view<Part::name>();
        using El = std::remove_cvref_t<decltype(*v.data)>;
        if constexpr (std::is_same_v<El, half>) o.f16 = v;
        else if constexpr (std::is_same_v<El, bfloat16>) o.bf16 = v;
        else o.f32 = v;
    } else {
        o.f32 = evaluate(part, x);
    }
    return o;
}

// Everything one fused kernel reads, computed once before the tile loops.
template <class E, class X>
struct fused_operands {
    using parts = plan::attention_parts<E>;
    stored_operand queries, keys, values;
    tensor_view<float> feature_weights;

    fused_operands(const E& e, X& x)
        : queries(fused_operand(parts::queries(e), x)), keys(fused_operand(parts::keys(e), x)),
          values(fused_operand(parts::values(e), x)) {
        if constexpr (parts::core_kind::pairwise) feature_weights = evaluate(parts::feature_weights(e), x);
    }
};

template <class E, class X>
tensor_view<float> fused_attention(const E& e, X& x) {
    using parts = plan::attention_parts<E>;
    using Core = typename parts::core_type;
    using traits = typename parts::core_kind;
    constexpr bool hard = parts::hard;
    constexpr bool ratio = parts::ratio;
    constexpr bool plain_sum = parts::plain_sum;  // no maximum: ratio and pointwise weights
    constexpr bool with_dropout = parts::dropout;

    const auto& weights = parts::weights(e);
    const Core& core = parts::core(e);
    // (lower::fallback_reason has decided that this attention runs fused here)
    const fused_operands<E, X> in(e, x);
    // scale(core) folds into the packed query tile, as FlashAttention scales
    // Q; tiles whose masks keep everything run the epilogue without them.
    // (A pairwise score is not a product of the queries: nothing folds.)
    double core_factor = 1.0;
    const auto prepared = [&] {
        if constexpr (traits::pairwise) return prepare<Core>(parts::score(e), x);
        else return fold_core_scale(prepare<Core>(parts::score(e), x), core_factor);
    }();
    const auto unmasked = strip_masks(prepared);
    // the factor g of softmax(s) % g, applied to the weights after the sums
    const auto post_factor = [&] {
        if constexpr (parts::post_weighted) return prepare<void>(parts::post(e), x);
        else return constant(1.0);
    }();
    double ratio_offset = 0;
    if constexpr (ratio) ratio_offset = parts::ratio_offset(e);
    const auto query_factor = static_cast<float>(core_factor);
    x.info.kernels.push_back(plan::kernel_name<plan::fused_attention_kernel<E>>::get(e));

    const std::size_t n_q = in.queries.cols(), n_k = in.keys.cols(), depth = in.queries.rows(), d_v = in.values.cols();
    const bool transposed = n_q >= few_queries;
    const std::size_t dv_padded = kernels::round_up(d_v, kernels::panel_width);
    const std::size_t rows_per_tile = std::min(query_tile, n_q);
    const std::size_t rows_padded = kernels::round_up(rows_per_tile, kernels::panel_width);
    const std::size_t q_tiles = (n_q + rows_per_tile - 1) / rows_per_tile;
    const root_output* direct = x.direct_output(e);
    row_statistics* const kept = x.statistics_of(e, x.statistics_attention);
    const tensor_view<float> out = direct ? tensor_view<float>{nullptr, n_q, d_v, x.env.batch, x.env.heads} : x.destination(e, n_q, d_v);
    const auto items = static_cast<std::ptrdiff_t>(x.heads_total() * q_tiles);
    // the values are their own panels when rows are contiguous and 16-wide,
    // as a widened tile of 16-bit values always is
    const bool values_in_place =
        in.values.widened_by_tiles() || (in.values.f32.col_stride == 1 && d_v % kernels::panel_width == 0);
    // bf16 products (vdpbf16ps) where the CPU has them and the operands are
    // stored bf16: Q.K when both are, and the weights' product with a bf16
    // V, the weights rounded to bf16 first. The many-query path only: decode
    // is bound by memory, not by its products. The careful pass stays fp32.
    const bool bf16_allowed = x.opt.bf16_products && transposed && kernels::bf16_products_available();
    const bool bf16_scores = bf16_allowed && !traits::pairwise && in.queries.bf16.data && in.keys.bf16.data;
    const bool bf16_values = bf16_allowed && !hard && in.values.bf16.data;
    const std::size_t depth_pairs = (depth + 1) / 2;
    // keys are their own A operand when each key's depth is contiguous and even
    const bool keys_pairs_in_place = bf16_scores && in.keys.bf16.row_stride == 1 && depth % 2 == 0;
    const std::size_t query_pair_count = bf16_scores ? rows_padded * depth_pairs * 2 : 0;
    const std::size_t key_pair_count = bf16_scores && !keys_pairs_in_place ? key_tile * depth_pairs * 2 : 0;
    const std::size_t weight_pair_count = bf16_values ? key_tile * rows_padded : 0;
    const std::size_t value_pair_count = bf16_values ? key_tile * dv_padded : 0;

    double dropout_p = 0;
    std::uint32_t dropout_seed = 0;
    if constexpr (with_dropout) {
        dropout_p = weights.kind.p;
        dropout_seed = weights.kind.seed;
    }
    const std::uint32_t dropout_threshold = op::dropout_threshold(dropout_p);
    const float keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));

    // One thread's scratch: the whole extra memory of the fused kernel.
    const std::size_t score_floats = key_tile * std::max(rows_padded, key_tile);
    const std::size_t scratch_floats = score_floats + depth * std::max(rows_padded, key_tile) +
                                       (values_in_place ? 0 : key_tile * dv_padded) + rows_padded * dv_padded +
                                       4 * rows_padded + (in.queries.widened_by_tiles() ? rows_per_tile * depth : 0) +
                                       (in.keys.widened_by_tiles() ? key_tile * depth : 0) +
                                       (in.values.widened_by_tiles() ? key_tile * dv_padded : 0);
    std::size_t threads_used = 1;

#pragma omp parallel num_threads(x.threads())
    {
#pragma omp single
        threads_used = static_cast<std::size_t>(omp_get_num_threads());
        // scratch kept by each thread from run to run: no allocation, no
        // page faults on the hot path
        thread_local fused_scratch scratch;
        auto& [s, packed, packed_values, acc, tile_max, best, wide_queries, wide_keys, wide_values, query_pairs, key_pairs,
               weight_pairs, value_pairs, state, best_index, nan_seen] = scratch;
        for (auto [v, n] : {std::pair{&query_pairs, query_pair_count}, std::pair{&key_pairs, key_pair_count},
                            std::pair{&weight_pairs, weight_pair_count}, std::pair{&value_pairs, value_pair_count}})
            v->resize(std::max(v->size(), n));
        if (in.queries.widened_by_tiles()) wide_queries.resize(std::max(wide_queries.size(), rows_per_tile * depth));
        if (in.keys.widened_by_tiles()) wide_keys.resize(std::max(wide_keys.size(), key_tile * depth));
        if (in.values.widened_by_tiles()) wide_values.resize(std::max(wide_values.size(), key_tile * dv_padded));
        s.resize(std::max(s.size(), score_floats));
        packed.resize(std::max(packed.size(), depth * std::max(rows_padded, key_tile)));
        packed_values.resize(std::max(packed_values.size(), values_in_place ? 0 : key_tile * dv_padded));
        acc.resize(std::max(acc.size(), rows_padded * dv_padded));
        for (auto* v : {&tile_max, &best}) v->resize(std::max(v->size(), rows_padded));
        state.resize(std::max(state.size(), rows_padded));
        best_index.resize(std::max(best_index.size(), rows_padded));
        nan_seen.resize(std::max(nan_seen.size(), rows_padded));

#pragma omp for schedule(dynamic)
        for (std::ptrdiff_t item = 0; item < items; ++item) {
            const std::size_t bh = static_cast<std::size_t>(item) / q_tiles;
            const std::size_t q0 = static_cast<std::size_t>(item) % q_tiles * rows_per_tile;
            const std::size_t rows = std::min(rows_per_tile, n_q - q0);
            const std::size_t b = bh / x.env.heads, h = bh % x.env.heads;
            const auto tree = at_head(prepared, x.env, b, h);
            const auto tree_unmasked = at_head(unmasked, x.env, b, h);
            const auto post_tree = at_head(post_factor, x.env, b, h);
            // Q's tile (d x rows: query stride q_qs, depth stride q_ds) as
            // floats; K's and V's are read a key tile at a time below
            const float_block q_block =
                in.queries.at(x.env, b, h).block(false, q0, rows, depth, wide_queries.data(), depth, depth);
            const float* q_base = q_block.data;
            const std::ptrdiff_t q_qs = q_block.i_stride, q_ds = q_block.j_stride;
            const stored_matrix k_stored = in.keys.at(x.env, b, h), v_stored = in.values.at(x.env, b, h);
            const float* w_base = traits::pairwise ? matrix_base(in.feature_weights, x.env, b, h) : nullptr;
            const auto batch_head = static_cast<std::uint32_t>(bh);

            // One pass over the key tiles. The careful pass (run again only when
            // the fast one left a non-finite context) keeps the context
            // normalised as it goes, so that it cannot overflow while the
            // result is finite, and reads no value row whose weight is 0.
            auto compute = [&](bool careful) {
            if (careful) packed_values.resize(std::max(packed_values.size(), key_tile * dv_padded));
            const bool bf16_scores_now = bf16_scores && !careful, bf16_values_now = bf16_values && !careful;
            std::fill_n(acc.begin(), rows_padded * dv_padded, 0.0f);
            for (std::size_t r = 0; r < rows_padded; ++r) {
                state[r] = {-std::numeric_limits<float>::infinity(), 0.0f};
                best[r] = -std::numeric_limits<float>::infinity();
                best_index[r] = n_k;
                nan_seen[r] = 0;
            }
            // the query tile, packed once: panels of 16 queries x depth
            if (bf16_scores_now) {
                const stored_matrix q_stored = in.queries.at(x.env, b, h);
                kernels::pack_bf16_pairs(depth, rows, q_stored.bf16 + static_cast<std::ptrdiff_t>(q0) * q_stored.col_stride,
                                         q_stored.row_stride, q_stored.col_stride, query_pairs.data());
            } else if (transposed && !traits::pairwise) {
                kernels::pack_panels(depth, rows, q_base, q_ds, q_qs, packed.data());
                if (query_factor != 1.0f)
                    for (std::size_t n = 0; n < depth * rows_padded; ++n) packed[n] *= query_factor;
            }
            // a pairwise score reads its query features a vector of
            // queries at a time: packed once as [depth][rows_padded] (the last row repeated
            // into the padding), so that each read is one vector load
            if (transposed && traits::pairwise)
                for (std::size_t a = 0; a < depth; ++a)
                    for (std::size_t g = 0; g < rows_padded; ++g)
                        packed[a * rows_padded + g] = q_base[static_cast<std::ptrdiff_t>(a) * q_ds +
                                                             static_cast<std::ptrdiff_t>(std::min(g, rows - 1)) * q_qs];

            for (std::size_t k0 = 0; k0 < n_k; k0 += key_tile) {
                const std::size_t cols = std::min(key_tile, n_k - k0);
                // a tile whose every weight is zero (every score -inf; every x 0
                // for a ratio) contributes nothing: skip it
                const interval tile = tile_bounds(tree, q0, q0 + rows, k0, k0 + cols);
                if (plain_sum ? tile.surely_zero() : tile.all_minus_infinity()) continue;
                // the key tile as floats (keys x depth: key stride k_ks, depth
                // stride k_ds), unless the dot products read 16-bit keys in place
                const bool keys_in_place = !transposed && !traits::pairwise && k_stored.keys_in_place();
                const float_block k_block = keys_in_place || bf16_scores_now
                                                ? float_block{}
                                                : k_stored.block(false, k0, cols, depth, wide_keys.data(), depth, depth);
                const float* k_tile = k_block.data;
                const std::ptrdiff_t k_ks = k_block.i_stride, k_ds = k_block.j_stride;

                // ---- scores, with the epilogue inlined -------------------------------------
                if (transposed) {
                    // st(key, query), leading dimension rows_padded
                    if constexpr (traits::pairwise) {
                        const auto& combine = core.kind.combine;
                        // the feature weights and each key's features, read once per key rather than per query group
                        float w_at[256], k_at[256];
                        const bool small = depth <= 256;
                        if (small)
                            for (std::size_t a = 0; a < depth; ++a) w_at[a] = w_base[static_cast<std::ptrdiff_t>(a) * in.feature_weights.row_stride];
                        for (std::size_t k = 0; k < cols; ++k) {
                            if (small)
                                for (std::size_t a = 0; a < depth; ++a)
                                    k_at[a] = k_tile[static_cast<std::ptrdiff_t>(a) * k_ds + static_cast<std::ptrdiff_t>(k) * k_ks];
                            for (std::size_t g = 0; g < rows_padded; g += simd::lanes) {
                                vf sum{};
                                for (std::size_t a = 0; a < depth; ++a) {
                                    const float ka = small ? k_at[a] : k_tile[static_cast<std::ptrdiff_t>(a) * k_ds +
                                                                              static_cast<std::ptrdiff_t>(k) * k_ks];
                                    const float wa = small ? w_at[a] : w_base[static_cast<std::ptrdiff_t>(a) * in.feature_weights.row_stride];
                                    sum += simd::splat(wa) * combine_lanes(combine, simd::load(packed.data() + a * rows_padded + g), simd::splat(ka));
                                }
                                simd::store(s.data() + k * rows_padded + g, sum);
                            }
                        }
                    } else if (bf16_scores_now) {
                        // keys (one A row each, depth pairs contiguous) against the query pairs;
                        // the scale, which the fp32 path folds into Q, is applied to the sums
                        const bfloat16* keys = k_stored.bf16 + static_cast<std::ptrdiff_t>(k0) * k_stored.col_stride;
                        std::ptrdiff_t key_stride = k_stored.col_stride;
                        if (!keys_pairs_in_place) {
                            const std::size_t even = 2 * depth_pairs;
                            for (std::size_t k = 0; k < cols; ++k)
                                for (std::size_t a = 0; a < even; ++a)
                                    key_pairs[k * even + a] = a < depth ? keys[static_cast<std::ptrdiff_t>(k) * k_stored.col_stride +
                                                                               static_cast<std::ptrdiff_t>(a) * k_stored.row_stride]
                                                                        : bfloat16{};
                            keys = key_pairs.data();
                            key_stride = static_cast<std::ptrdiff_t>(even);
                        }
                        kernels::multiply_bf16_pairs(cols, rows_padded / kernels::panel_width, depth_pairs, keys, key_stride, 2,
                                                     query_pairs.data(), s.data(), rows_padded, false, query_factor);
                    } else {
                        kernels::multiply_panels(cols, rows_padded / kernels::panel_width, depth, k_tile, k_ks, k_ds,
                                                 packed.data(), kernels::panel_width,
                                                 static_cast<std::ptrdiff_t>(depth * kernels::panel_width), s.data(),
                                                 rows_padded, false);
                    }
                    // epilogue and the column maxima in one pass, in memory order
                    auto epilogue_and_maxima = [&](const auto& epilogue) {
                        using tree_type = std::remove_cvref_t<decltype(epilogue)>;
                        constexpr std::size_t max_groups = query_tile / simd::lanes;
                        const std::size_t groups = rows_padded / simd::lanes;
                        vf top[max_groups], nan[max_groups];
                        for (std::size_t g = 0; g < groups; ++g) {
                            top[g] = simd::splat(-std::numeric_limits<float>::infinity());
                            nan[g] = vf{};
                        }
                        for (std::size_t k = 0; k < cols; ++k) {
                            float* row = s.data() + k * rows_padded;
                            for (std::size_t g = 0; g < groups; ++g) {
                                vf v;
                                if constexpr (std::is_same_v<tree_type, core_slot>) v = simd::load(row + g * simd::lanes);
                                else {
                                    v = lanes_of<lanes_along::queries>(epilogue, lane_position{q0 + g * simd::lanes, k0 + k, row + g * simd::lanes, batch_head});
                                    simd::store(row + g * simd::lanes, v);
                                }
                                top[g] = simd::max(top[g], v);
                                nan[g] = v != v ? simd::splat(1.0f) : nan[g];
                            }
                        }
                        for (std::size_t g = 0; g < groups; ++g)
                            simd::store(tile_max.data() + g * simd::lanes,
                                        nan[g] != 0.0f ? simd::splat(std::numeric_limits<float>::quiet_NaN()) : top[g]);
                    };
                    if (masks_keep_all(tree, q0, q0 + rows, k0, k0 + cols)) epilogue_and_maxima(tree_unmasked);
                    else epilogue_and_maxima(tree);
                } else {
                    // s(query, key), leading dimension key_tile: dot products, no packing
                    if constexpr (traits::pairwise) {
                        const auto& combine = core.kind.combine;
                        for (std::size_t r = 0; r < rows; ++r)
                            for (std::size_t c = 0; c < cols; c += simd::lanes) {
                                vf sum{};
                                for (std::size_t a = 0; a < depth; ++a) {
                                    vf ka;
                                    for (int l = 0; l < simd::lanes; ++l) {
                                        const std::size_t k = std::min(c + static_cast<std::size_t>(l), cols - 1);
                                        ka[l] = k_tile[static_cast<std::ptrdiff_t>(a) * k_ds +
                                                       static_cast<std::ptrdiff_t>(k) * k_ks];
                                    }
                                    const float qa = q_base[static_cast<std::ptrdiff_t>(a) * q_ds + static_cast<std::ptrdiff_t>(r) * q_qs];
                                    sum += simd::splat(w_base[static_cast<std::ptrdiff_t>(a) * in.feature_weights.row_stride]) *
                                           combine_lanes(combine, simd::splat(qa), ka);
                                }
                                simd::store(s.data() + r * key_tile + c, sum);
                            }
                    } else {
                        if (keys_in_place) k_stored.dots_with_keys(rows, cols, depth, q_base, q_qs, q_ds, k0, s.data(), key_tile);
                        else kernels::multiply_dots(rows, cols, depth, q_base, q_qs, q_ds, k_tile, k_ks, k_ds, s.data(), key_tile);
                        if (query_factor != 1.0f)
                            for (std::size_t r = 0; r < rows; ++r)
                                for (std::size_t c = 0; c < cols; ++c) s[r * key_tile + c] *= query_factor;
                    }
                    if constexpr (!std::is_same_v<std::remove_cvref_t<decltype(prepared)>, core_slot>) {
                        for (std::size_t r = 0; r < rows; ++r) {
                            float* sr = s.data() + r * key_tile;
                            for (std::size_t c = 0; c < cols; c += simd::lanes)
                                simd::store(sr + c, lanes_of<lanes_along::keys>(tree, lane_position{q0 + r, k0 + c, sr + c, batch_head}));
                        }
                    }
                }

                // ---- normalisation and the weighted sum of values -------------------------------
                if constexpr (hard) {
                    if (transposed)
                        kernels::running_argmax_columns(s.data(), cols, rows, rows_padded, k0, best.data(), best_index.data(), nan_seen.data());
                    else
                        kernels::running_argmax(s.data(), rows, cols, key_tile, k0, best.data(), best_index.data(), nan_seen.data());
                } else {
                    if constexpr (parts::pointwise) {
                        // the weights are the epilogue's values, summed as they are
                    } else if constexpr (ratio) {
                        if (transposed) kernels::accumulate_column_sums(s.data(), cols, rows, rows_padded, state.data());
                        else kernels::accumulate_row_sums(s.data(), rows, cols, key_tile, state.data());
                    } else {
                        // the careful pass keeps each row's sum before the step (best[] is free outside hard)
                        if (careful)
                            for (std::size_t r = 0; r < rows; ++r) best[r] = state[r].sum;
                        if (transposed)
                            kernels::online_softmax_columns(s.data(), cols, rows, rows_padded, tile_max.data(), state.data(), acc.data(),
                                                            dv_padded, dv_padded);
                        else
                            kernels::online_softmax_step(s.data(), rows, cols, key_tile, state.data(), acc.data(), dv_padded, dv_padded);
                    }
                    // weight (query r, key c) sits at s[r*ws_r + c*ws_c]
                    const std::ptrdiff_t ws_r = transposed ? 1 : static_cast<std::ptrdiff_t>(key_tile);
                    const std::ptrdiff_t ws_c = transposed ? static_cast<std::ptrdiff_t>(rows_padded) : 1;
                    if (careful && !plain_sum)  // context normalised by the running sum: acc = sum p v / l
                        for (std::size_t r = 0; r < rows; ++r) {
                            const float l_new = state[r].sum;
                            if (!(l_new > 0.0f)) continue;  // nothing kept yet, or a NaN row: nothing to scale
                            const float keep = best[r] / l_new, inverse = 1.0f / l_new;
                            for (std::size_t c = 0; c < dv_padded; ++c) acc[r * dv_padded + c] *= keep;
                            for (std::size_t k = 0; k < cols; ++k) s[r * static_cast<std::size_t>(ws_r) + k * static_cast<std::size_t>(ws_c)] *= inverse;
                        }
                    if constexpr (parts::post_weighted) {
                        if (transposed) {
                            for (std::size_t k = 0; k < cols; ++k)
                                for (std::size_t g = 0; g < rows_padded; g += simd::lanes) {
                                    float* at = s.data() + k * rows_padded + g;
                                    simd::store(at, simd::load(at) * lanes_of<lanes_along::queries>(post_tree, lane_position{q0 + g, k0 + k, nullptr, batch_head}));
                                }
                        } else {
                            for (std::size_t r = 0; r < rows; ++r)
                                for (std::size_t c = 0; c < cols; c += simd::lanes) {
                                    float* at = s.data() + r * key_tile + c;
                                    simd::store(at, simd::load(at) * lanes_of<lanes_along::keys>(post_tree, lane_position{q0 + r, k0 + c, nullptr, batch_head}));
                                }
                        }
                    }
                    if constexpr (with_dropout)
                        kernels::dropout_tile(s.data(), rows, cols, ws_r, ws_c, dropout_seed, dropout_threshold, keep_scale,
                                              batch_head, q0, k0);
                    // the value tile as floats (keys x d_v: key stride v_ks, column
                    // stride v_cs), unless the product reads 16-bit values in place
                    const bool values_16_in_place = !careful && v_stored.values_in_place(d_v);
                    const float_block v_block = values_16_in_place || bf16_values_now
                                                    ? float_block{}
                                                    : v_stored.block(true, k0, cols, d_v, wide_values.data(), dv_padded, dv_padded);
                    const float* v_tile = v_block.data;
                    const std::ptrdiff_t v_ks = v_block.i_stride, v_cs = v_block.j_stride;
                    if (careful) {
                        // non-finite value rows are left out of the product and
                        // added back only where their weight is not zero
                        kernels::pack_panels(cols, d_v, v_tile, v_ks, v_cs, packed_values.data());
                        unsigned char bad[key_tile] = {};
                        bool any_bad = false;
                        for (std::size_t n = 0; n < (dv_padded / kernels::panel_width) * cols * kernels::panel_width; ++n)
                            if (!std::isfinite(packed_values[n])) {
                                bad[n / kernels::panel_width % cols] = 1;
                                packed_values[n] = 0.0f;
                                any_bad = true;
                            }
                        kernels::multiply_panels(rows, dv_padded / kernels::panel_width, cols, s.data(), ws_r, ws_c,
                                                 packed_values.data(), kernels::panel_width,
                                                 static_cast<std::ptrdiff_t>(cols * kernels::panel_width), acc.data(), dv_padded, true);
                        for (std::size_t k = 0; any_bad && k < cols; ++k) {
                            if (!bad[k]) continue;
                            for (std::size_t r = 0; r < rows; ++r) {
                                const float w = s[r * static_cast<std::size_t>(ws_r) + k * static_cast<std::size_t>(ws_c)];
                                if (w == 0.0f) continue;
                                for (std::size_t c = 0; c < d_v; ++c) {  // the entries the product left out
                                    const float value = v_tile[static_cast<std::ptrdiff_t>(k) * v_ks + static_cast<std::ptrdiff_t>(c) * v_cs];
                                    if (!std::isfinite(value)) acc[r * dv_padded + c] += w * value;
                                }
                            }
                        }
                    } else if (bf16_values_now) {
                        // the weights rounded to bf16 in pairs of keys, against V's tile in pairs of rows
                        kernels::round_weight_pairs(s.data(), cols, rows_padded, rows_padded, weight_pairs.data());
                        kernels::pack_bf16_pairs(cols, d_v, v_stored.bf16 + static_cast<std::ptrdiff_t>(k0) * v_stored.row_stride,
                                                 v_stored.row_stride, v_stored.col_stride, value_pairs.data());
                        kernels::multiply_bf16_pairs(rows, dv_padded / kernels::panel_width, (cols + 1) / 2, weight_pairs.data(), 2,
                                                     static_cast<std::ptrdiff_t>(2 * rows_padded), value_pairs.data(), acc.data(),
                                                     dv_padded, true, 1.0f);
                    } else if (values_16_in_place) {
                        v_stored.multiply_values(rows, d_v, cols, s.data(), ws_r, ws_c, k0, acc.data(), dv_padded);
                    } else if (values_in_place) {
                        kernels::multiply_panels(rows, dv_padded / kernels::panel_width, cols, s.data(), ws_r, ws_c, v_tile,
                                                 v_ks, kernels::panel_width, acc.data(), dv_padded, true);
                    } else {
                        kernels::pack_panels(cols, d_v, v_tile, v_ks, v_cs, packed_values.data());
                        kernels::multiply_panels(rows, dv_padded / kernels::panel_width, cols, s.data(), ws_r, ws_c,
                                                 packed_values.data(), kernels::panel_width,
                                                 static_cast<std::ptrdiff_t>(cols * kernels::panel_width), acc.data(), dv_padded, true);
                    }
                }
            }

            };  // compute
            compute(false);
            // A non-finite context with finite inputs means overflow; with
            // non-finite values it may hold a zero-weight key's NaN: either
            // way the careful pass decides (a NaN row stays NaN there too).
            bool careful = false;
            if constexpr (!hard) {
                bool finite = true;
                for (std::size_t r = 0; r < rows && finite; ++r)
                    for (std::size_t c = 0; c < d_v; ++c) finite = finite && std::isfinite(acc[r * dv_padded + c]);
                if (!finite) {
                    careful = true;
                    compute(true);
                }
            }

            for (std::size_t r = 0; r < rows; ++r) {
                // the row in place in the accumulator, then to the output
                float* row = acc.data() + r * dv_padded;
                if constexpr (hard) {
                    for (std::size_t c = 0; c < d_v; ++c)
                        row[c] = nan_seen[r] ? std::numeric_limits<float>::quiet_NaN()
                                 : best_index[r] < n_k ? v_stored.at(best_index[r], c)
                                                       : 0.0f;
                } else {
                    // a row with every key masked has sum 0: its context is 0
                    const float denominator = state[r].sum + static_cast<float>(ratio_offset);
                    float inverse = parts::pointwise ? 1.0f : denominator == 0.0f ? 0.0f : 1.0f / denominator;
                    if (careful && !plain_sum) inverse = state[r].sum == 0.0f ? 0.0f : 1.0f;  // normalised as it went
                    for (std::size_t c = 0; c < d_v; ++c) row[c] *= inverse;
                }
                if (direct) direct->store_row(b, h, q0 + r, row, d_v);
                else std::copy_n(row, d_v, x.matrix_of(out, b, h) + static_cast<std::ptrdiff_t>(q0 + r) * out.row_stride);
                if constexpr (!hard && !plain_sum)
                    if (kept) {
                        kept->max[bh * n_q + q0 + r] = state[r].max;
                        kept->sum[bh * n_q + q0 + r] = state[r].sum;
                    }
            }
        }
    }
    const std::size_t pair_count = query_pair_count + key_pair_count + weight_pair_count + value_pair_count;
    x.info.intermediate_bytes += threads_used * (scratch_floats * sizeof(float) + pair_count * sizeof(bfloat16));
    if (bf16_scores || bf16_values)
        x.info.notes.push_back(std::string("fused attention: bf16 products (AVX512-BF16) for ") +
                               (bf16_scores && bf16_values ? "Q.K and the weights' product with V"
                                : bf16_scores              ? "Q.K"
                                                           : "the weights' product with V") +
                               (bf16_values ? ", the weights rounded to bf16 for it" : "") +
                               "; options.bf16_products = false keeps them fp32");
    return out;
}

// ---- concat_heads ---------------------------------------------------------------------
// Head h of every batch entry goes to columns [h*d, (h+1)*d) of one matrix
// per batch entry (x.env.heads is 1 here, the per-head scope has ended).
template <class E, class X>
tensor_view<float> concat_heads_kernel(const E& e, const tensor_view<float>& per_head, X& x) {
    x.info.kernels.push_back(plan::kernel_name<plan::node_kernel<E>>::get(e));
    const std::size_t heads = x.env.bound_heads, rows = per_head.rows, cols = per_head.cols;
    const tensor_view<float> out = x.destination(e, rows, heads * cols);
    const auto items = static_cast<std::ptrdiff_t>(x.env.batch * heads);
#pragma omp parallel for schedule(static) num_threads(x.threads())
    for (std::ptrdiff_t item = 0; item < items; ++item) {
        const std::size_t b = static_cast<std::size_t>(item) / heads, h = static_cast<std::size_t>(item) % heads;
        // an operand with fewer heads (one shared by every head) serves consecutive heads
        const std::size_t source_b = per_head.batch == 1 ? 0 : b, source_h = h / (heads / per_head.heads);
        const float* src = per_head.data + static_cast<std::ptrdiff_t>(source_b) * per_head.batch_stride +
                           static_cast<std::ptrdiff_t>(source_h) * per_head.head_stride;
        float* dst = x.matrix_of(out, b, 0) + h * cols;
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < cols; ++c)
                dst[static_cast<std::ptrdiff_t>(r) * out.row_stride + static_cast<std::ptrdiff_t>(c)] =
                    src[static_cast<std::ptrdiff_t>(r) * per_head.row_stride + static_cast<std::ptrdiff_t>(c) * per_head.col_stride];
    }
    return out;
}

// ---- the remaining kernels, one per node -----------------------------------------
template <class E, class X>
tensor_view<float> node_kernel(const E& e, X& x) {
    if constexpr (has_kind_v<E, kind::product>) {
        const tensor_view<float> a = evaluate(e.template kid<0>(), x), b = evaluate(e.template kid<1>(), x);
        x.info.kernels.push_back(plan::kernel_name<plan::node_kernel<E>>::get(e));
        const tensor_view<float> out = product_kernel(a, b, x);
        if constexpr (plan::is_weighted_sum_v<E>) skip_zero_weights(a, b, out, x);
        return out;
    } else if constexpr (has_kind_v<E, kind::softmax> || has_kind_v<E, kind::hard>) {
        const tensor_view<float> in = evaluate(e.template kid<0>(), x);
        x.info.kernels.push_back(plan::kernel_name<plan::node_kernel<E>>::get(e));
        const tensor_view<float> out = dense_copy(in, x);
        row_statistics* const kept = x.statistics_of(e, x.statistics_softmax);
        const auto bhs = static_cast<std::ptrdiff_t>(x.heads_total());
#pragma omp parallel for schedule(static) num_threads(x.threads())
        for (std::ptrdiff_t bh = 0; bh < bhs; ++bh) {
            float* m = x.matrix_of(out, static_cast<std::size_t>(bh) / x.env.heads, static_cast<std::size_t>(bh) % x.env.heads);
            if constexpr (has_kind_v<E, kind::softmax>) {
                kernels::softmax_rows(m, out.rows, out.cols, out.cols, kept ? kept->max.data() + bh * out.rows : nullptr,
                                      kept ? kept->sum.data() + bh * out.rows : nullptr);
            } else {
                kernels::hard_rows(m, out.rows, out.cols, out.cols);
            }
        }
        return out;
    } else if constexpr (has_kind_template<E, kind::reduce_along_rows>::value ||
                         has_kind_template<E, kind::reduce_along_cols>::value) {
        using Op = typename E::kind_type::op;
        constexpr bool along_rows = has_kind_template<E, kind::reduce_along_rows>::value;
        const tensor_view<float> in = evaluate(e.template kid<0>(), x);
        x.info.kernels.push_back(plan::kernel_name<plan::node_kernel<E>>::get(e));
        const std::size_t rows = along_rows ? in.rows : 1, cols = along_rows ? 1 : in.cols;
        const tensor_view<float> out = x.allocate(rows, cols, cols);
        for (std::size_t b = 0; b < x.env.batch; ++b)
            for (std::size_t h = 0; h < x.env.heads; ++h) {
                const float* src = matrix_base(in, x.env, b, h);
                float* dst = x.matrix_of(out, b, h);
                const std::size_t outer = along_rows ? in.rows : in.cols, inner = along_rows ? in.cols : in.rows;
                const std::ptrdiff_t outer_stride = along_rows ? in.row_stride : in.col_stride;
                const std::ptrdiff_t inner_stride = along_rows ? in.col_stride : in.row_stride;
                for (std::size_t o = 0; o < outer; ++o) {
                    const float* line = src + static_cast<std::ptrdiff_t>(o) * outer_stride;
                    float acc = line[0];
                    for (std::size_t n = 1; n < inner; ++n) acc = Op::apply(acc, line[static_cast<std::ptrdiff_t>(n) * inner_stride]);
                    dst[o] = acc;
                }
            }
        return out;
    } else {
        static_assert(has_kind_template<E, kind::pairwise>::value, "attnfuse internal: the CPU has no kernel for this node");
        const tensor_view<float> w = evaluate(e.template kid<0>(), x), qf_ = evaluate(e.template kid<1>(), x),
                                 kf_ = evaluate(e.template kid<2>(), x);
        x.info.kernels.push_back(plan::kernel_name<plan::node_kernel<E>>::get(e));
        const tensor_view<float> out = x.allocate(qf_.cols, kf_.cols, kf_.cols);
        for (std::size_t b = 0; b < x.env.batch; ++b)
            for (std::size_t h = 0; h < x.env.heads; ++h) {
                const float *wp = matrix_base(w, x.env, b, h), *qp = matrix_base(qf_, x.env, b, h), *kp = matrix_base(kf_, x.env, b, h);
                float* dst = x.matrix_of(out, b, h);
                for (std::size_t r = 0; r < qf_.cols; ++r)
                    for (std::size_t c = 0; c < kf_.cols; ++c) {
                        float sum = 0;
                        for (std::size_t a = 0; a < qf_.rows; ++a)
                            sum += wp[static_cast<std::ptrdiff_t>(a) * w.row_stride] *
                                   combine_lanes(e.kind.combine,
                                                 simd::splat(qp[static_cast<std::ptrdiff_t>(a) * qf_.row_stride + static_cast<std::ptrdiff_t>(r) * qf_.col_stride]),
                                                 simd::splat(kp[static_cast<std::ptrdiff_t>(a) * kf_.row_stride + static_cast<std::ptrdiff_t>(c) * kf_.col_stride]))[0];
                        dst[r * kf_.cols + c] = sum;
                    }
            }
        return out;
    }
}

// The CPU's hooks for the shared lowering (attnfuse/lower.hpp).
struct hooks {
    using operand = tensor_view<float>;
    template <class E, class X>
    static operand input(const E&, X& x) {
        const auto& v = x.env.template view<E::name>();
        if constexpr (std::is_same_v<std::remove_cvref_t<decltype(*v.data)>, float>) return v;
        else return x.template widened_input<E::name>(v);  // a kernel that reads fp32 only
    }
    static operand transposed(operand v) {
        std::swap(v.rows, v.cols);
        std::swap(v.row_stride, v.col_stride);
        return v;
    }
    template <class E, class X> static operand fused_attention(const E& e, X& x) { return detail::fused_attention(e, x); }
    template <class E, class X> static operand pointwise(const E& e, X& x) { return pointwise_loop(e, x); }
    template <class E, class X> static operand node(const E& e, X& x) { return node_kernel(e, x); }
    template <class E, class X> static operand concat_heads(const E& e, const operand& per_head, X& x) {
        return concat_heads_kernel(e, per_head, x);
    }
    template <class E, class X> static void result(const E& e, const operand& v, X& x) { x.note_result(e, v); }
    // the fused kernel's tiles live in each thread's scratch: any d_v
    template <class X> static lower::capabilities capabilities(const X&) { return {}; }
    // The fused kernel reads f16 and bf16 inputs as stored (Q, K and V, a
    // tile at a time); any other kernel that reads one gets it widened to
    // fp32 once per run (executor::widened_input).
    template <class El>
    static constexpr bool reads = std::is_same_v<El, float> || std::is_same_v<El, half> || std::is_same_v<El, bfloat16>;
};

template <class E, class X>
tensor_view<float> evaluate(const E& e, X& x) {
    return lower::evaluate<hooks>(e, x);
}

}  // namespace ATTNFUSE_CPU_ISA
}  // namespace detail
}  // namespace attnfuse::cpu

namespace attnfuse::cpu {

namespace detail {
inline namespace ATTNFUSE_CPU_ISA {

// More threads than the machine runs at once never speeds up these kernels,
// and a huge request would make OpenMP allocate per-thread state for each:
// the options with threads clamped to the hardware (0: OpenMP's default),
// which the report then states.
inline options with_threads_clamped(options o) {
    const std::size_t hardware = std::max(1u, std::thread::hardware_concurrency());
    if (o.threads == 0) o.threads = static_cast<std::size_t>(std::max(1, omp_get_max_threads()));
    o.threads = std::min(o.threads, hardware);
    return o;
}

// into: run_into's output (nullptr: the result goes to run_result.output);
// statistics: where a training forward keeps its rows' statistics, or nullptr.
template <class Out, class E, class... Bindings>
run_result run_readable(const E& e, const options& opt, std::chrono::steady_clock::time_point start, const output_view<Out>* into,
                        row_statistics* statistics, const Bindings&... bindings) {
    using Env = environment<Bindings...>;
    Env env(bindings...);
    settle_heads(e, env);
    const runtime_shape shape = shape_of(e, env);  // every shape error, before any work
    if (into) check_output(*into, env.batch, env.heads, shape.rows, shape.cols);
    run_result result;
    report& info = result.info;
    const options o = with_threads_clamped(opt);
    info.threads = o.threads;
    lower::note_widened(env, info);
    {
        tensor& out = result.output;
        out.batch = env.batch;
        out.heads = env.heads;
        out.rows = shape.rows;
        out.cols = shape.cols;
        // where the root's kernel writes: run_result's dense fp32 tensor, a
        // dense fp32 output of the caller's, or (root_output) the caller's
        // output as stored
        const auto c = static_cast<std::ptrdiff_t>(shape.cols), m = static_cast<std::ptrdiff_t>(shape.rows * shape.cols);
        const bool dense_f32_into = [&] {
            if constexpr (std::is_same_v<Out, float>)
                return into && (shape.rows == 1 || into->row_stride == c) && (shape.cols == 1 || into->col_stride == 1) &&
                       (env.heads == 1 || into->head_stride == m) &&
                       (env.batch == 1 || into->batch_stride == static_cast<std::ptrdiff_t>(env.heads) * m);
            else return false;
        }();
        float* root_target = nullptr;
        if (!into) {
            out.values.resize(env.batch * env.heads * shape.rows * shape.cols);
            root_target = out.values.data();
        } else if constexpr (std::is_same_v<Out, float>) {
            if (dense_f32_into) root_target = into->data;
        }
        root_output direct;
        if (into) direct = root_output_of(*into);
        detail::executor<Env> x{env, o, info, {}, {}, &e, root_target, &typeid(E), {}};
        if (into && !dense_f32_into) x.direct_root = &direct;
        if constexpr (plan::keeps_statistics_v<E>)
            if (statistics) {
                using parts = plan::attention_parts<E>;
                const std::size_t rows = env.batch * env.heads * shape.rows;
                *statistics = {env.batch, env.heads, shape.rows, std::vector<float>(rows), std::vector<float>(rows)};
                x.statistics = statistics;
                x.statistics_attention = &e;
                x.statistics_softmax = &parts::softmax_node(e);
            }
        plan::collect_score_nodes(e, x.score_nodes);
        const tensor_view<float> v = detail::evaluate(e, x);
        if (x.statistics && !x.statistics_kept)
            throw std::logic_error("attnfuse internal: the CPU ran `" + to_string(e) + "` without keeping its row statistics");
        if (v.rows != shape.rows || v.cols != shape.cols)
            throw std::logic_error("attnfuse internal: the CPU computed " + shape_to_string(v.rows, v.cols) + " for a " +
                                   shape_to_string(shape) + " result");
        if (v.data == nullptr) {
            // the root's fused kernel wrote the caller's output as stored
        } else if (into && v.data != root_target) {
            // the last kernel wrote fp32 elsewhere (an intermediate, or the output is an input)
            store_into(v, *into);
            if (!dense_f32_into)
                info.notes.push_back(std::is_same_v<Out, float>
                                         ? std::string("output: strided; the last kernel wrote a dense fp32 result, copied into it")
                                         : "output: stored as " + std::string(element<Out>::name) +
                                               "; the last kernel wrote an fp32 result, rounded into it");
        } else if (v.data != root_target) {  // the last kernel wrote elsewhere (or the output is an input): copy
            for (std::size_t b = 0; b < env.batch; ++b)
                for (std::size_t h = 0; h < env.heads; ++h) {
                    const float* src = detail::matrix_base(v, env, b, h);
                    float* dst = root_target + (b * env.heads + h) * shape.rows * shape.cols;
                    for (std::size_t r = 0; r < shape.rows; ++r)
                        for (std::size_t col = 0; col < shape.cols; ++col)
                            dst[r * shape.cols + col] =
                                src[static_cast<std::ptrdiff_t>(r) * v.row_stride + static_cast<std::ptrdiff_t>(col) * v.col_stride];
                }
        }
        // the last kernel's buffer held the output, not an intermediate
        if (!x.arena.empty() && x.arena.back().data() == v.data && (!into || dense_f32_into))
            info.intermediate_bytes -= x.arena.back().size() * sizeof(float);
    }
    info.dispatches = info.kernels.size();  // one launch per kernel on the CPU
    info.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return result;
}

}  // namespace ATTNFUSE_CPU_ISA
}  // namespace detail

// Runs `e` on the CPU over the bound inputs (caller-owned, not copied; a
// 16-bit input read by a kernel other than the fused attention's is widened
// once for the run, and report.notes says so).
template <class E, class... Bindings>
    requires expression<E> && (a_binding<Bindings> && ...)
run_result run(const E& e, const options& opt, const Bindings&... bindings) {
    attnfuse::check::no_pending_transpose<E>();
    const auto start = std::chrono::steady_clock::now();
    return detail::run_readable<float>(e, opt, start, nullptr, nullptr, lower::readable<detail::hooks>(bindings)...);
}

template <class E, class... Bindings>
    requires expression<E> && (a_binding<Bindings> && ...)
run_result run(const E& e, const Bindings&... bindings) {
    return run(e, options{}, bindings...);
}

// The training forward: run(), and each query row's softmax statistics
// (training_result::statistics), which the fused kernel writes as it
// finishes a row (unfused, the softmax kernel), for a softmax attention at
// the root (plan::keeps_statistics_v; anything else does not compile). The
// output is the same as run()'s.
template <class E, class... Bindings>
    requires expression<E> && (a_binding<Bindings> && ...)
training_result run_for_training(const E& e, const options& opt, const Bindings&... bindings) {
    attnfuse::check::no_pending_transpose<E>();
    attnfuse::check::keeps_statistics<E>();
    const auto start = std::chrono::steady_clock::now();
    training_result result;
    run_result run = detail::run_readable<float>(e, opt, start, nullptr, &result.statistics, lower::readable<detail::hooks>(bindings)...);
    result.output = std::move(run.output);
    result.info = std::move(run.info);
    return result;
}
template <class E, class... Bindings>
    requires expression<E> && (a_binding<Bindings> && ...)
training_result run_for_training(const E& e, const Bindings&... bindings) {
    return run_for_training(e, options{}, bindings...);
}

// Runs `e` and writes its result into the caller's `out` as stored (f32,
// f16 or bf16, rounded to nearest even; any strides), which must have the
// result's batch, heads and shape (a shape_error names both otherwise). A
// fused attention at the root writes its rows there directly, with no fp32
// copy of the result; any other last kernel writes an fp32 result, which is
// then rounded into `out` (report.notes says so; a dense fp32 `out` is
// written directly by any kernel). Returns the report.
template <class Out, class E, class... Bindings>
    requires expression<E> && storage_element<Out> && (a_binding<Bindings> && ...)
report run_into(const E& e, const options& opt, const output_view<Out>& out, const Bindings&... bindings) {
    attnfuse::check::no_pending_transpose<E>();
    const auto start = std::chrono::steady_clock::now();
    return detail::run_readable<Out>(e, opt, start, &out, nullptr, lower::readable<detail::hooks>(bindings)...).info;
}
template <class Out, class E, class... Bindings>
    requires expression<E> && storage_element<Out> && (a_binding<Bindings> && ...)
report run_into(const E& e, const output_view<Out>& out, const Bindings&... bindings) {
    return run_into(e, options{}, out, bindings...);
}

}  // namespace attnfuse::cpu
