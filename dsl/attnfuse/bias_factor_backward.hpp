// The backward of a softmax attention whose score adds a learned factor of a
// positional bias: a term L*H (or H*L) with L a bound input of one value
// per (batch, head) or per query row and H a function of the positions and
// of inputs that carry no gradient, reached from the score through linear
// operations only (sums, differences, negation, scale(., c), products and
// quotients by gradient-free factors, masks): ALiBi's slope m in
// scale(Q^T*K) - m*(i - j), for any backend, from its own run and backward.
//
// With L read under detach the attention is one the backend's backward runs
// (the dot core, say), which gives every other gradient. L's own is
//   dL = sum_ij dS_ij G_ij,   G = d score / d L (H through the path: its
//                             signs, factors and masks, as an expression),
// and with dS = P ∘ (dP - D), dP = dO V^T, D = rowsum(dO ∘ O), each row's
// share is dO_i . A_i - D_i B_i for A = (P % G) V and B = (P % G) 1: two
// forwards of the post-weighted attention softmax(s) % G, fused when the
// backward is, so nothing of n_q x n_k is added to what the inner backward
// keeps. A factor of one value per key would need a sum over each column
// of dS ∘ G, which no forward gives: it is refused, naming the factor.
#pragma once
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
#include "to_string.hpp"

namespace attnfuse {

namespace plan {

// Does no gradient flow from E to any input?
template <class E> inline constexpr bool gradient_free_v = !differentiable_outside<E, void>::value;

// L*H or H*L: a bound input L times a gradient-free H that holds no product.
template <class T> struct bias_factor_term : std::false_type {};
template <class A, class B> struct bias_factor_term<node<kind::elementwise<op::multiply>, A, B>> {
private:
    template <class F, class H> static constexpr bool factor_times() {
        if constexpr (is_input_v<F>) return gradient_free_v<H> && !holds_product<H>::value;
        else return false;
    }

public:
    static constexpr bool factor_first = factor_times<A, B>();
    static constexpr bool value = factor_first || factor_times<B, A>();
    using factor = std::conditional_t<factor_first, A, B>;
};

// Does operand I of Node pass the gradient of Node to it linearly, by a
// factor that is an expression of the other operands holding no product and
// no gradient (what bias_slope below builds)?
template <class Node, std::size_t I> struct linear_in_operand : std::false_type {};
template <class A, class B, std::size_t I> struct linear_in_operand<node<kind::elementwise<op::add>, A, B>, I> : std::true_type {};
template <class A, class B, std::size_t I> struct linear_in_operand<node<kind::elementwise<op::subtract>, A, B>, I> : std::true_type {};
template <class A> struct linear_in_operand<node<kind::elementwise<op::negate>, A>, 0> : std::true_type {};
template <class A, class B, std::size_t I>
struct linear_in_operand<node<kind::elementwise<op::multiply>, A, B>, I> {
    using other = std::conditional_t<I == 0, B, A>;
    static constexpr bool value = gradient_free_v<other> && !holds_product<other>::value;
};
template <class A, class B>
struct linear_in_operand<node<kind::elementwise<op::divide>, A, B>, 0>
    : std::bool_constant<gradient_free_v<B> && !holds_product<B>::value> {};
template <class C, class A, class B, std::size_t I>
struct linear_in_operand<node<kind::elementwise<op::select>, C, A, B>, I> : std::bool_constant<I != 0 && !holds_product<C>::value> {};
template <class A> struct linear_in_operand<node<kind::scale_by, A>, 0> : std::true_type {};
template <fixed_string Label, class A> struct linear_in_operand<node<kind::named<Label>, A>, 0> : std::true_type {};

// The one bias term a score reaches along operands that pass it linearly, or void.
template <class S, bool = bias_factor_term<S>::value> struct find_bias_term {
    using type = void;
};
template <class S> struct find_bias_term<S, true> {
    using type = S;
};
template <class Kind, class... Kids> struct find_bias_term<node<Kind, Kids...>, false> {
private:
    static constexpr std::array<bool, sizeof...(Kids)> holds{!std::is_void_v<typename find_bias_term<Kids>::type>...};
    static constexpr std::size_t count = (std::size_t{!std::is_void_v<typename find_bias_term<Kids>::type>} + ...);

public:
    // the operand the path to the term runs through
    static constexpr std::size_t path_operand = [] {
        for (std::size_t k = 0; k < holds.size(); ++k)
            if (holds[k]) return k;
        return std::size_t{0};
    }();
    using type = std::conditional_t<count == 1 && linear_in_operand<node<Kind, Kids...>, path_operand>::value,
                                    typename find_bias_term<std::tuple_element_t<path_operand, std::tuple<Kids...>>>::type, void>;
};

// How many places of E read the input named Name.
template <class E, fixed_string Name> struct reads_of : std::integral_constant<std::size_t, 0> {};
template <fixed_string N, std::size_t R, std::size_t C, class El, fixed_string Name>
struct reads_of<matrix<N, R, C, El>, Name> : std::integral_constant<std::size_t, N == Name ? 1 : 0> {};
template <class Kind, class... Kids, fixed_string Name>
struct reads_of<node<Kind, Kids...>, Name> : std::integral_constant<std::size_t, (reads_of<Kids, Name>::value + ... + 0)> {};

}  // namespace plan

namespace detail {

// The bias term with its factor read under detach.
template <class Term>
constexpr auto detached_term(const Term& t) {
    if constexpr (plan::bias_factor_term<Term>::factor_first) return elementwise<op::multiply>(detach(t.template kid<0>()), t.template kid<1>());
    else return elementwise<op::multiply>(t.template kid<0>(), detach(t.template kid<1>()));
}

// d s / d L for a score s holding the bias term L*H once along linear
// operands (plan::find_bias_term): H passed up the path, as an expression.
template <class S>
constexpr auto bias_slope(const S& s) {
    if constexpr (plan::bias_factor_term<S>::value) {
        if constexpr (plan::bias_factor_term<S>::factor_first) return s.template kid<1>();
        else return s.template kid<0>();
    } else {
        constexpr std::size_t at = plan::find_bias_term<S>::path_operand;
        const auto below = bias_slope(s.template kid<at>());
        using Kind = typename S::kind_type;
        if constexpr (std::is_same_v<Kind, kind::elementwise<op::subtract>>) {
            if constexpr (at == 0) return below;
            else return elementwise<op::negate>(below);
        } else if constexpr (std::is_same_v<Kind, kind::elementwise<op::negate>>) {
            return elementwise<op::negate>(below);
        } else if constexpr (std::is_same_v<Kind, kind::elementwise<op::multiply>>) {
            if constexpr (at == 0) return elementwise<op::multiply>(below, s.template kid<1>());
            else return elementwise<op::multiply>(s.template kid<0>(), below);
        } else if constexpr (std::is_same_v<Kind, kind::elementwise<op::divide>>) {
            return elementwise<op::divide>(below, s.template kid<1>());
        } else if constexpr (std::is_same_v<Kind, kind::elementwise<op::select>>) {
            if constexpr (at == 1) return where(s.template kid<0>(), below, constant(0.0));
            else return where(s.template kid<0>(), constant(0.0), below);
        } else if constexpr (std::is_same_v<Kind, kind::scale_by>) {
            return scale(below, s.kind.factor);
        } else {
            return below;  // a sum, or a named node
        }
    }
}

}  // namespace detail

namespace plan {

// A softmax attention (no dropout, no post factor) whose score holds one
// bias term L*H along linear operands, L read nowhere else, and which with L
// detached is an attention a backend's backward runs as such.
template <class E, bool = attention_pattern<E>::matches> struct bias_factor_attention_backward : std::false_type {};
template <class E> struct bias_factor_attention_backward<E, true> {
private:
    using parts = attention_parts<E>;
    static constexpr bool plain_softmax = !parts::hard && !parts::plain_sum && !parts::dropout && !parts::post_weighted;
    using score = typename normaliser<typename parts::weights_type>::score;

public:
    using term = typename find_bias_term<score>::type;
    static constexpr bool value = [] {
        if constexpr (plain_softmax && !std::is_void_v<term>) {
            using factor = typename bias_factor_term<term>::factor;
            using detached = decltype(detail::replace_node<term>(std::declval<const E&>(), detail::detached_term(std::declval<const term&>())));
            return reads_of<E, factor::name>::value == 1 &&
                   (attention_backward_v<detached> || general_attention_backward_v<detached> ||
                    activated_keys_attention_backward_v<detached> || bilinear_attention_backward_v<detached>);
        } else {
            return false;
        }
    }();
};
template <class E> inline constexpr bool bias_factor_attention_backward_v = bias_factor_attention_backward<std::remove_cvref_t<E>>::value;

}  // namespace plan

// The backward of plan::bias_factor_attention_backward_v<E> as the header
// says, for the forward's output and d_output. `run(expression, bindings...)`
// is the backend's run_result-returning run in the backward's mode;
// `backward(expression, bindings...)` its backward with the output, dO,
// statistics and options already given.
template <class E, class Run, class Backward, class... Bindings>
backward_result bias_factor_backward(const E& e, const tensor& output, const tensor& d_output, const Run& run, const Backward& backward,
                                     const Bindings&... bindings) {
    using form = plan::bias_factor_attention_backward<E>;
    static_assert(form::value, "attnfuse internal: bias_factor_backward of an attention outside its form");
    using parts = plan::attention_parts<E>;
    using Term = typename form::term;
    using Factor = typename plan::bias_factor_term<Term>::factor;
    using Values = typename plan::attention_pattern<E>::values;
    const std::string factor_name(Factor::name.view());

    const auto& term = *plan::find_core<Term>(parts::score(e));
    const bound_shape factor_shape = shape_of_binding(detail::binding_named<Factor::name>(bindings...));
    const bound_shape values_shape = shape_of_binding(detail::binding_named<Values::name>(bindings...));
    const std::size_t n_q = output.rows, n_k = values_shape.rows, d_v = output.cols;
    const auto detached = detail::replace_node<Term>(e, detail::detached_term(term));
    // the inner backward checks the output and dO against the expression first
    backward_result inner = backward(detached, bindings...);
    if (factor_shape.cols != 1 || (factor_shape.rows != 1 && factor_shape.rows != n_q))
        throw std::invalid_argument("attnfuse: backward gives the bias factor " + factor_name + " of " + to_string(term) +
                                    " a gradient when it has one value per (batch, head) or per query row (1 x 1 or " +
                                    std::to_string(n_q) + " x 1), but it is bound " + std::to_string(factor_shape.rows) + " x " +
                                    std::to_string(factor_shape.cols) + "; read it under detach(" + factor_name +
                                    ") if it is not trained, or reference::backward takes any");

    // A = (P % G) V and B = (P % G) 1, the softmax's P as the forward has it
    using Detached = std::remove_cvref_t<decltype(detached)>;
    const auto slope_weighted = hadamard(plan::attention_parts<Detached>::weights(detached), detail::bias_slope(parts::score(e)));
    const run_result weighted_values = run(slope_weighted * Values{}, bindings...);
    const tensor ones{1, 1, n_k, 1, std::vector<float>(n_k, 1.0f)};
    const run_result weight_sums =
        run(slope_weighted * matrix<"bias_factor_ones">{}, detail::bound_tensor<"bias_factor_ones">(ones), bindings...);
    const std::size_t heads_out = output.batch * output.heads, rows = factor_shape.rows;
    if (weighted_values.output.values.size() != output.values.size() || weight_sums.output.values.size() != heads_out * n_q)
        throw std::logic_error("attnfuse internal: the bias factor's forwards have other extents than the attention's output");

    // each row's share dO_i . A_i - D_i B_i, per (batch, head) of the output, summed to the factor's rows
    tensor shares{output.batch, output.heads, rows, 1, std::vector<float>(heads_out * rows, 0.0f)};
    for (std::size_t m = 0; m < heads_out; ++m) {
        double total = 0;
        for (std::size_t r = 0; r < n_q; ++r) {
            const std::size_t row = m * n_q + r;
            double d = 0, through_values = 0;
            for (std::size_t c = 0; c < d_v; ++c) {
                const double g = d_output.values[row * d_v + c];
                d += g * output.values[row * d_v + c];
                through_values += g * weighted_values.output.values[row * d_v + c];
            }
            const double share = through_values - d * weight_sums.output.values[row];
            if (rows == 1) total += share;
            else shares.values[m * rows + r] = static_cast<float>(share);
        }
        if (rows == 1) shares.values[m] = static_cast<float>(total);
    }

    backward_result result;
    result.info = std::move(inner.info);
    for (const report* r : {&weighted_values.info, &weight_sums.info}) detail::add_run(result.info, *r);
    result.info.intermediate_bytes +=
        (weighted_values.output.values.size() + weight_sums.output.values.size() + ones.values.size() + shares.values.size()) * sizeof(float);
    std::vector<named_gradient> computed;
    computed.push_back({factor_name, detail::summed_to(std::move(shares), factor_shape.batch, factor_shape.heads)});
    detail::hand_out_composed<Bindings...>(result, inner, std::move(computed), {Factor::name.view()});
    return result;
}

}  // namespace attnfuse
