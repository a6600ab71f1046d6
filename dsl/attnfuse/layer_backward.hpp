// The backward pass of a multi-head attention layer, for any backend, from
// the backend's own run and backward (nothing here knows a backend):
//
//   * an attention whose queries, keys or values are linear projections
//     W*X or W*X + b of bound inputs (the layer's per-head W_q^i X, W_k^i Y,
//     W_v^i Y): each projection runs once and is bound as an input of its
//     own, the backend differentiates the attention over them as it would
//     over bound Q, K and V (FlashAttention's backward never sees the
//     projections), and each projection's gradient dP gives dW = dP X^T,
//     dX = W^T dP and db = dP summed along the bias's broadcast dimension,
//     each summed over the places and the (batch, head)s its input serves;
//   * the output projection concat_heads(A) * W_o + b_o (W_o perhaps
//     transposed, b_o perhaps absent, concat_heads perhaps absent) of such an
//     attention A: A runs once more, the products give dW_o = C^T dY and
//     dC = dY W_o^T for the heads side by side C, db_o = dY summed over its
//     rows, and dC split back into heads is A's output gradient.
//
// The intermediates are the projections (d x n per (batch, head)), A's
// output and C: nothing of n_q x n_k is added to what the attention's own
// backward keeps.
#pragma once
#include <algorithm>
#include <array>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bind.hpp"
#include "expr.hpp"
#include "gradient.hpp"
#include "plan.hpp"
#include "projected_backward.hpp"
#include "run.hpp"
#include "shared_input_backward.hpp"

namespace attnfuse {

namespace detail {

template <class... T> struct type_list {};

// List with U appended where it is not in it yet.
template <class List, class... U> struct with_types {
    using type = List;
};
template <class... T, class U, class... Rest> struct with_types<type_list<T...>, U, Rest...> {
    using type = typename with_types<std::conditional_t<(std::is_same_v<T, U> || ...), type_list<T...>, type_list<T..., U>>, Rest...>::type;
};
template <class List, class... Lists> struct joined {
    using type = List;
};
template <class List, class... U, class... Rest> struct joined<List, type_list<U...>, Rest...> {
    using type = typename joined<typename with_types<List, U...>::type, Rest...>::type;
};

}  // namespace detail

namespace plan {

// The attentions a backend's backward runs without this header's compositions.
template <class E> inline constexpr bool kernel_backward_v = direct_backward_v<E> || shared_input_backward_v<E>;

// W*X or W*X + b of bound inputs of distinct names, b broadcast along a
// dimension of 1 (one bias per output row, as nn.Linear's).
template <class P> struct linear_projection : std::false_type {
    static constexpr bool biased = false;
};
template <class W, class X>
    requires(is_input_v<W> && is_input_v<X>)
struct linear_projection<node<kind::product, W, X>> : std::bool_constant<!(W::name == X::name)> {
    static constexpr bool biased = false;
    using weights = W;
    using inputs = X;
};
template <class W, class X, class B>
    requires(is_input_v<W> && is_input_v<X> && is_input_v<B>)
struct linear_projection<node<kind::elementwise<op::add>, node<kind::product, W, X>, B>>
    : std::bool_constant<!(W::name == X::name) && !(W::name == B::name) && !(X::name == B::name)> {
    static constexpr bool biased = true;
    using weights = W;
    using inputs = X;
    using bias = B;
};

// The projections a tree reads, outermost first, each type once; the biased
// ones first, so that binding a plain W*X cannot break a W*X + b around it.
template <class E, bool Biased> struct projections_in {
    using type = detail::type_list<>;
};
template <class Kind, class... Kids, bool Biased> struct projections_in<node<Kind, Kids...>, Biased> {
    using type = std::conditional_t<linear_projection<node<Kind, Kids...>>::value,
                                    std::conditional_t<linear_projection<node<Kind, Kids...>>::biased == Biased,
                                                       detail::type_list<node<Kind, Kids...>>, detail::type_list<>>,
                                    typename detail::joined<detail::type_list<>, typename projections_in<Kids, Biased>::type...>::type>;
};
template <class E>
using projections_of = typename detail::joined<typename projections_in<E, true>::type, typename projections_in<E, false>::type>::type;

}  // namespace plan

namespace detail {

// The name projection K is bound under.
template <std::size_t K> constexpr auto projection_name() { return place_name<"projection", K>(); }

// e with projection K onwards (of the list) replaced by its bound input.
template <std::size_t K, class E>
constexpr auto with_projections_bound(const E& e, type_list<>) {
    return e;
}
template <std::size_t K, class E, class P, class... Rest>
constexpr auto with_projections_bound(const E& e, type_list<P, Rest...>) {
    return with_projections_bound<K + 1>(replace_node<P>(e, matrix<projection_name<K>()>{}), type_list<Rest...>{});
}
template <class E> using projections_bound_t =
    decltype(with_projections_bound<0>(std::declval<const E&>(), plan::projections_of<E>{}));

template <std::size_t K, class List> struct type_at;
template <std::size_t K, class T, class... Rest> struct type_at<K, type_list<T, Rest...>> : type_at<K - 1, type_list<Rest...>> {};
template <class T, class... Rest> struct type_at<0, type_list<T, Rest...>> {
    using type = T;
};
template <class List> struct list_size;
template <class... T> struct list_size<type_list<T...>> : std::integral_constant<std::size_t, sizeof...(T)> {};

}  // namespace detail

namespace plan {

// An attention some of whose operands are linear projections, which a
// backend differentiates once they are bound inputs.
template <class E> struct projected_operands_backward {
    static constexpr bool value = [] {
        if constexpr (!is_node_v<E> || kernel_backward_v<E> || std::is_same_v<projections_of<E>, detail::type_list<>>) return false;
        else return kernel_backward_v<detail::projections_bound_t<E>>;
    }();
};
template <class E> inline constexpr bool projected_operands_backward_v = projected_operands_backward<std::remove_cvref_t<E>>::value;

// An attention whose backward a backend runs, its operands perhaps projections.
template <class E> inline constexpr bool attention_layer_core_v = kernel_backward_v<E> || projected_operands_backward_v<E>;

// Heads * W_o, Heads * transpose(W_o), and either + b_o (b_o + either), for
// Heads concat_heads(A) or A, A an attention of attention_layer_core_v.
template <class E> struct output_projection_parts : std::false_type {};
template <class Heads> struct layer_heads {
    using attention = Heads;
    static constexpr bool concatenated = false;
    template <class H> static const auto& attention_of(const H& heads) { return heads; }
};
template <class A> struct layer_heads<node<kind::concat_heads, A>> {
    using attention = A;
    static constexpr bool concatenated = true;
    template <class H> static const auto& attention_of(const H& heads) { return heads.template kid<0>(); }
};
template <class Heads, class Wo, bool Transposed>
struct output_product : std::bool_constant<attention_layer_core_v<typename layer_heads<Heads>::attention>> {
    using heads = layer_heads<Heads>;
    using weights = Wo;
    using bias = void;
    static constexpr bool transposed = Transposed;
    template <class E> static const auto& product_of(const E& e) { return e; }
};
template <class Heads, class Wo>
    requires is_input_v<Wo>
struct output_projection_parts<node<kind::product, Heads, Wo>> : output_product<Heads, Wo, false> {};
template <class Heads, class Wo>
    requires is_input_v<Wo>
struct output_projection_parts<node<kind::product, Heads, node<kind::transpose, Wo>>> : output_product<Heads, Wo, true> {};
template <class P, class B>
    requires(is_input_v<B> && output_projection_parts<P>::value)
struct output_projection_parts<node<kind::elementwise<op::add>, P, B>> : output_projection_parts<P> {
    using bias = B;
    template <class E> static const auto& product_of(const E& e) { return e.template kid<0>(); }
};
template <class B, class P>
    requires(is_input_v<B> && output_projection_parts<P>::value)
struct output_projection_parts<node<kind::elementwise<op::add>, B, P>> : output_projection_parts<P> {
    using bias = B;
    template <class E> static const auto& product_of(const E& e) { return e.template kid<1>(); }
};
template <class E>
inline constexpr bool output_projection_backward_v = output_projection_parts<std::remove_cvref_t<E>>::value;

}  // namespace plan

namespace detail {

// g (a bias's gradient before broadcasting) summed along each dimension the
// bias of shape s has only one of, then over the (batch, head)s it serves.
inline tensor summed_to_bias(const tensor& g, const bound_shape& s) {
    const std::size_t rows = s.rows == 1 ? 1 : g.rows, cols = s.cols == 1 ? 1 : g.cols;
    std::vector<double> sums(g.batch * g.heads * rows * cols, 0.0);
    for (std::size_t m = 0; m < g.batch * g.heads; ++m)
        for (std::size_t r = 0; r < g.rows; ++r)
            for (std::size_t c = 0; c < g.cols; ++c)
                sums[(m * rows + (rows == 1 ? 0 : r)) * cols + (cols == 1 ? 0 : c)] += g.values[(m * g.rows + r) * g.cols + c];
    tensor out{g.batch, g.heads, rows, cols, std::vector<float>(sums.begin(), sums.end())};
    return summed_to(std::move(out), s.batch, s.heads);
}

// Adds g to the gradient named `name` in `into`, or adds the entry.
inline void accumulate_gradient(std::vector<named_gradient>& into, const std::string& name, tensor g) {
    for (named_gradient& have : into)
        if (have.name == name) {
            if (have.values.values.size() != g.values.size())
                throw std::logic_error("attnfuse internal: two parts of the gradient of " + name + " differ in shape");
            for (std::size_t n = 0; n < g.values.size(); ++n) have.values.values[n] += g.values[n];
            return;
        }
    into.push_back({name, std::move(g)});
}

// Hands each binding the sum of its gradients from `computed` and from the
// inner backward, or none where neither has one.
template <class... Bindings>
void hand_out_summed(backward_result& result, backward_result& inner, std::vector<named_gradient>& computed) {
    for (named_gradient& g : inner.inputs) accumulate_gradient(computed, g.name, std::move(g.values));
    auto hand_out = [&]<class B>(std::type_identity<B>) {
        const std::string name(B::name.view());
        auto at = std::find_if(computed.begin(), computed.end(), [&](const named_gradient& g) { return g.name == name; });
        if (at != computed.end()) result.inputs.push_back(std::move(*at));
        else result.without.push_back(name);
    };
    (hand_out(std::type_identity<std::remove_cvref_t<Bindings>>{}), ...);
}

}  // namespace detail

// The backward of an attention over projections
// (plan::projected_operands_backward_v<E>), as the header says. `run` and
// `backward` as for general_core_backward.
template <class E, class Run, class Backward, class... Bindings>
backward_result projected_operands_backward(const E& e, const Run& run, const Backward& backward, const Bindings&... bindings) {
    static_assert(plan::projected_operands_backward_v<E>, "attnfuse internal: projected_operands_backward outside its form");
    using projections = plan::projections_of<E>;
    constexpr std::size_t count = detail::list_size<projections>::value;
    const auto over_bound = detail::with_projections_bound<0>(e, projections{});

    backward_result result;
    std::vector<named_gradient> computed;
    [&]<std::size_t... K>(std::index_sequence<K...>) {
        // each projection from its own operands only: it has their batch and heads, not every input's
        auto forward = [&]<std::size_t P>(std::integral_constant<std::size_t, P>) {
            using Projection = typename detail::type_at<P, projections>::type;
            using form = plan::linear_projection<Projection>;
            const auto& w = detail::binding_named<form::weights::name>(bindings...);
            const auto& x = detail::binding_named<form::inputs::name>(bindings...);
            using W = typename form::weights;
            using X = typename form::inputs;
            if constexpr (form::biased) {
                using B = typename form::bias;
                static_assert(std::is_same_v<decltype(W{} * X{} + B{}), Projection>);
                return run(W{} * X{} + B{}, w, x, detail::binding_named<B::name>(bindings...));
            } else {
                static_assert(std::is_same_v<decltype(W{} * X{}), Projection>);
                return run(W{} * X{}, w, x);
            }
        };
        const std::array<run_result, count> projected{forward(std::integral_constant<std::size_t, K>{})...};
        backward_result inner = backward(over_bound, detail::bound_tensor<detail::projection_name<K>()>(projected[K].output)..., bindings...);
        result.info = std::move(inner.info);
        for (const run_result& p : projected) {
            detail::add_run(result.info, p.info);
            result.info.intermediate_bytes += p.output.values.size() * sizeof(float);
        }
        auto through = [&]<std::size_t P>(std::integral_constant<std::size_t, P>) {
            constexpr auto name = detail::projection_name<P>();
            if (!inner.has(name.view())) return;
            using form = plan::linear_projection<typename detail::type_at<P, projections>::type>;
            using W = typename form::weights;
            using X = typename form::inputs;
            const matrix<"projection_gradient"> gradient{};
            const tensor& dp = inner.of(name.view());
            const auto bound_gradient = detail::bound_tensor<"projection_gradient">(dp);
            const auto& w = detail::binding_named<W::name>(bindings...);
            const auto& x = detail::binding_named<X::name>(bindings...);
            const run_result through_x = run(gradient * transpose(X{}), bound_gradient, x);  // dW = dP X^T
            const run_result through_w = run(transpose(W{}) * gradient, bound_gradient, w);  // dX = W^T dP
            for (const report* r : {&through_x.info, &through_w.info}) detail::add_run(result.info, *r);
            const bound_shape ws = shape_of_binding(w), xs = shape_of_binding(x);
            detail::accumulate_gradient(computed, std::string(W::name.view()), detail::summed_to(through_x.output, ws.batch, ws.heads));
            detail::accumulate_gradient(computed, std::string(X::name.view()), detail::summed_to(through_w.output, xs.batch, xs.heads));
            if constexpr (form::biased) {
                using B = typename form::bias;
                detail::accumulate_gradient(computed, std::string(B::name.view()),
                                            detail::summed_to_bias(dp, shape_of_binding(detail::binding_named<B::name>(bindings...))));
            }
        };
        (through(std::integral_constant<std::size_t, K>{}), ...);
        detail::hand_out_summed<Bindings...>(result, inner, computed);
    }(std::make_index_sequence<count>{});
    return result;
}

namespace detail {

// The heads of t (batch x heads of rows x cols) side by side: batch x 1 of rows x heads*cols.
inline tensor heads_side_by_side(const tensor& t) {
    tensor out{t.batch, 1, t.rows, t.heads * t.cols, std::vector<float>(t.values.size())};
    for (std::size_t b = 0; b < t.batch; ++b)
        for (std::size_t h = 0; h < t.heads; ++h)
            for (std::size_t r = 0; r < t.rows; ++r)
                for (std::size_t c = 0; c < t.cols; ++c)
                    out.values[(b * t.rows + r) * out.cols + h * t.cols + c] = t.values[((b * t.heads + h) * t.rows + r) * t.cols + c];
    return out;
}

// The inverse: t (batch x 1 of rows x heads*cols) split into `heads` heads.
inline tensor heads_apart(const tensor& t, std::size_t heads) {
    const std::size_t cols = t.cols / heads;
    tensor out{t.batch, heads, t.rows, cols, std::vector<float>(t.values.size())};
    for (std::size_t b = 0; b < t.batch; ++b)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t r = 0; r < t.rows; ++r)
                for (std::size_t c = 0; c < cols; ++c)
                    out.values[((b * heads + h) * t.rows + r) * cols + c] = t.values[(b * t.rows + r) * t.cols + h * cols + c];
    return out;
}

}  // namespace detail

// The backward of an output projection (plan::output_projection_backward_v<E>)
// as the header says, for output and d_output of the forward's shape. `run`
// as for general_core_backward; `backward_of(expression, output, d_output,
// bindings...)` the backend's backward of another output and its gradient.
template <class E, class Run, class BackwardOf, class... Bindings>
backward_result output_projection_backward(const E& e, const tensor& output, const tensor& d_output, const Run& run,
                                           const BackwardOf& backward_of, const Bindings&... bindings) {
    using parts = plan::output_projection_parts<E>;
    static_assert(parts::value, "attnfuse internal: output_projection_backward outside its form");
    using Wo = typename parts::weights;
    {
        environment<Bindings...> env(bindings...);
        settle_heads(e, env);
        check_backward_operands(output, d_output, env.batch, env.heads, shape_of(e, env));
    }
    const auto& heads = parts::product_of(e).template kid<0>();
    const auto& attention = parts::heads::attention_of(heads);

    const run_result attended = run(attention, bindings...);  // batch x heads of n_q x d_v
    const tensor side_by_side = parts::heads::concatenated ? detail::heads_side_by_side(attended.output) : attended.output;
    const auto bound_heads = detail::bound_tensor<"layer_heads">(side_by_side);
    const auto bound_gradient = detail::bound_tensor<"layer_output_gradient">(d_output);
    const matrix<"layer_heads"> c{};
    const matrix<"layer_output_gradient"> dy{};
    const auto& wo = detail::binding_named<Wo::name>(bindings...);
    // dC = dY W_o^T and dW_o = C^T dY, for the product C W_o; the transposes for C W_o^T
    const run_result through_wo = [&] {
        if constexpr (parts::transposed) return run(dy * Wo{}, bound_gradient, wo);
        else return run(dy * transpose(Wo{}), bound_gradient, wo);
    }();
    const run_result through_heads = [&] {
        if constexpr (parts::transposed) return run(transpose(dy) * c, bound_gradient, bound_heads);
        else return run(transpose(c) * dy, bound_heads, bound_gradient);
    }();
    const tensor d_attended =
        parts::heads::concatenated ? detail::heads_apart(through_wo.output, attended.output.heads) : through_wo.output;
    if (d_attended.values.size() != attended.output.values.size())
        throw std::logic_error("attnfuse internal: the output projection's gradient of its heads is not of their shape");
    backward_result inner = backward_of(attention, attended.output, d_attended, bindings...);

    backward_result result;
    result.info = std::move(inner.info);
    for (const report* r : {&attended.info, &through_wo.info, &through_heads.info}) detail::add_run(result.info, *r);
    result.info.intermediate_bytes += (attended.output.values.size() + side_by_side.values.size() + through_wo.output.values.size() +
                                       d_attended.values.size()) * sizeof(float);
    std::vector<named_gradient> computed;
    const bound_shape ws = shape_of_binding(wo);
    detail::accumulate_gradient(computed, std::string(Wo::name.view()), detail::summed_to(through_heads.output, ws.batch, ws.heads));
    if constexpr (!std::is_void_v<typename parts::bias>) {
        using B = typename parts::bias;
        detail::accumulate_gradient(computed, std::string(B::name.view()),
                                    detail::summed_to_bias(d_output, shape_of_binding(detail::binding_named<B::name>(bindings...))));
    }
    detail::hand_out_summed<Bindings...>(result, inner, computed);
    return result;
}

}  // namespace attnfuse
