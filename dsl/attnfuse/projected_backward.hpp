// The backward pass of an attention whose core is the general score
// X^T W Y (Luong's multiplicative attention), for any backend, from the
// backend's own run and dot-core backward: it is the same attention over
// the projected queries P = W^T X (X^T W Y = P^T Y), so the dot-core
// backward of that attention gives dP, dY and dV, and the projection gives
// dX = W dP and dW = X dP^T, each summed over the (batch, head)s its input
// serves. The projections are products of d x n_q; nothing of n_q x n_k is
// added to what the dot-core backward keeps. Nothing here knows a backend:
// each passes its run and its backward in.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "bind.hpp"
#include "expr.hpp"
#include "gradient.hpp"
#include "plan.hpp"
#include "run.hpp"

namespace attnfuse {

namespace plan {

// X, W and Y of a general core X^T*W*Y, and whether they are three bound
// inputs of three names.
template <class Core> struct general_core_parts {
    static constexpr bool distinct = false;
    static constexpr bool distinct_from(std::string_view) { return false; }
};
template <class X, class W, class Y>
struct general_core_parts<node<kind::product, node<kind::product, node<kind::transpose, X>, W>, Y>> {
    using queries = X;
    using weights = W;
    using keys = Y;
    static constexpr bool distinct = [] {
        if constexpr (is_input_v<X> && is_input_v<W> && is_input_v<Y>)
            return !(X::name == W::name) && !(X::name == Y::name) && !(W::name == Y::name);
        else return false;
    }();
    // names an input none of the three is
    static constexpr bool distinct_from(std::string_view name) {
        if constexpr (distinct) return name != X::name.view() && name != W::name.view() && name != Y::name.view();
        else return false;
    }
};

// The same attentions over one X^T*W*Y of three bound inputs, V a fourth:
// a backend runs their backward as general_core_backward does.
template <class Core> struct distinct_general_core : std::bool_constant<general_core_parts<Core>::distinct> {
    static constexpr bool distinct_from(std::string_view name) { return general_core_parts<Core>::distinct_from(name); }
};
template <class E> using general_attention_backward = weighted_attention_over<distinct_general_core, E>;
template <class E> inline constexpr bool general_attention_backward_v = general_attention_backward<std::remove_cvref_t<E>>::value;

}  // namespace plan

namespace detail {

// Rebuilds a tree with its node of type Target replaced by `replacement`.
template <class Target, class E, class R>
constexpr auto replace_node(const E& e, const R& replacement) {
    if constexpr (std::is_same_v<E, Target>) {
        return replacement;
    } else if constexpr (is_node_v<E>) {
        return std::apply([&](const auto&... kids) { return make_node(e.kind, replace_node<Target>(kids, replacement)...); }, e.kids);
    } else {
        return e;
    }
}

// t (batch x heads matrices) summed over the (batch, head)s that an input of
// `batch` x `heads` serves: an input of batch 1 serves every batch entry,
// one of fewer heads groups of consecutive heads.
inline tensor summed_to(tensor t, std::size_t batch, std::size_t heads) {
    if (t.batch == batch && t.heads == heads) return t;
    const std::size_t per = t.rows * t.cols, group = t.heads / heads;
    tensor out{batch, heads, t.rows, t.cols, std::vector<float>(batch * heads * per, 0.0f)};
    for (std::size_t b = 0; b < t.batch; ++b)
        for (std::size_t h = 0; h < t.heads; ++h) {
            const float* from = t.values.data() + (b * t.heads + h) * per;
            float* to = out.values.data() + ((batch == 1 ? 0 : b) * heads + h / group) * per;
            for (std::size_t m = 0; m < per; ++m) to[m] += from[m];
        }
    return out;
}

// The batch and heads input Name is bound with.
template <fixed_string Name, class... Bindings>
std::pair<std::size_t, std::size_t> bound_extents(const Bindings&... bindings) {
    std::pair<std::size_t, std::size_t> extents{1, 1};
    auto note = [&](const auto& b) {
        if constexpr (std::remove_cvref_t<decltype(b)>::name == Name) {
            const bound_shape s = shape_of_binding(b);
            extents = {s.batch, s.heads};
        }
    };
    (note(bindings), ...);
    return extents;
}

// What a second run adds to a backward's report.
inline void add_run(report& into, const report& run) {
    into.kernels.insert(into.kernels.end(), run.kernels.begin(), run.kernels.end());
    into.dispatches += run.dispatches;
    into.intermediate_bytes += run.intermediate_bytes;
    into.wall_seconds += run.wall_seconds;
    into.device_seconds += run.device_seconds;
    into.build_seconds += run.build_seconds;
    into.notes.insert(into.notes.end(), run.notes.begin(), run.notes.end());
}

}  // namespace detail

// The backward of a general-core attention (plan::general_attention_backward_v<E>)
// as the header says. `run(expression, bindings...)` is the backend's
// run_result-returning run; `backward(expression, bindings...)` its dot-core
// backward with the output, dO, statistics and options already given.
template <class E, class Run, class Backward, class... Bindings>
backward_result general_core_backward(const E& e, const Run& run, const Backward& backward, const Bindings&... bindings) {
    static_assert(plan::general_attention_backward_v<E>, "attnfuse internal: general_core_backward of an attention outside its form");
    using core = typename plan::attention_parts<E>::core_type;
    using general = plan::general_core_parts<core>;
    using X = typename general::queries;
    using W = typename general::weights;
    using Y = typename general::keys;
    const X x{};
    const W w{};
    const matrix<"projected_queries"> projected{};
    const matrix<"projected_queries_gradient"> projected_gradient{};

    const run_result p = run(transpose(w) * x, bindings...);  // W^T X: d_k x n_q per (batch, head)
    const auto over_projected = detail::replace_node<core>(e, transpose(projected) * Y{});
    static_assert(plan::attention_backward_v<decltype(over_projected)>,
                  "attnfuse internal: the general core over its projected queries is not a dot-core attention");
    const auto bound_projection = bind(projected, row_major(p.output.values.data(), p.output.rows, p.output.cols, p.output.batch, p.output.heads));
    backward_result inner = backward(over_projected, bound_projection, bindings...);

    backward_result result;
    result.info = std::move(inner.info);
    detail::add_run(result.info, p.info);
    result.info.intermediate_bytes += p.output.values.size() * sizeof(float);
    tensor dx, dw;
    const bool flows = inner.has("projected_queries");
    if (flows) {
        const tensor& dp = inner.of("projected_queries");
        const auto bound_gradient = bind(projected_gradient, row_major(dp.values.data(), dp.rows, dp.cols, dp.batch, dp.heads));
        const run_result through_w = run(w * projected_gradient, bound_gradient, bindings...);          // W dP: d_q x n_q
        const run_result through_x = run(x * transpose(projected_gradient), bound_gradient, bindings...);  // X dP^T: d_q x d_k
        for (const report* r : {&through_w.info, &through_x.info}) detail::add_run(result.info, *r);
        const auto [x_batch, x_heads] = detail::bound_extents<X::name>(bindings...);
        const auto [w_batch, w_heads] = detail::bound_extents<W::name>(bindings...);
        dx = detail::summed_to(through_w.output, x_batch, x_heads);
        dw = detail::summed_to(through_x.output, w_batch, w_heads);
    }
    auto hand_out = [&]<class B>(std::type_identity<B>) {
        const std::string name(B::name.view());
        if (name == X::name.view() || name == W::name.view()) {
            if (flows) result.inputs.push_back({name, std::move(name == X::name.view() ? dx : dw)});
            else result.without.push_back(name);
        } else if (inner.has(name)) {
            for (named_gradient& g : inner.inputs)
                if (g.name == name) result.inputs.push_back(std::move(g));
        } else {
            result.without.push_back(name);
        }
    };
    (hand_out(std::type_identity<Bindings>{}), ...);
    return result;
}

}  // namespace attnfuse
