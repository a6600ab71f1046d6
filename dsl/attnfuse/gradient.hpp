// What the backward pass of an expression is, decided from its type: which
// operand of each node a gradient flows to, and so which named inputs get a
// gradient at all. Every evaluator of gradients (the reference, and the
// backends after it) reads these rules; nothing here knows of a backend.
//
// The rules, by kind of node:
//   elementwise   to the operands its operation's carries_gradient names
//                 (ops.hpp): not to a comparison's or a logical operation's
//                 operands, nor to a where's condition, since the result is
//                 piecewise constant there; masks and lengths pass nothing;
//   lookup        to the table (accumulated per index), not to the index;
//   pairwise      to w, and to a feature where the combining function
//                 passes a gradient to qf or kf (not through detach);
//   hard          to nothing: one-hot weights are piecewise constant in the
//                 scores, so the scores (and the Q and K under them) get no
//                 gradient, while V and a post factor still do;
//   every other   to every operand (products, transposes, scales, softmax,
//                 dropout with the forward's mask, reductions, concat_heads).
#pragma once
#include <cstddef>
#include <string>
#include <string_view>
#include <type_traits>

#include "expr.hpp"
#include "plan.hpp"

namespace attnfuse {

// Does a gradient flow from node E to its operand number I?
template <class E, std::size_t I> struct carries_gradient_to : std::true_type {};
template <class Op, class... Kids, std::size_t I>
struct carries_gradient_to<node<kind::elementwise<Op>, Kids...>, I> : std::bool_constant<Op::carries_gradient[I]> {};
template <class Table, class Index, std::size_t I>
struct carries_gradient_to<node<kind::lookup, Table, Index>, I> : std::bool_constant<I == 0> {};
template <class Scores, std::size_t I>
struct carries_gradient_to<node<kind::hard, Scores>, I> : std::false_type {};

// Does a pairwise score's combining function pass a gradient to Feature (qf
// or kf): along operands that carry one (not through detach or a comparison)?
template <class F, class Feature> struct combine_carries_to : std::is_same<F, Feature> {};
template <class Kind, class... Kids, class Feature>
struct combine_carries_to<node<Kind, Kids...>, Feature> : std::bool_constant<(combine_carries_to<Kids, Feature>::value || ...)> {};
template <class Op, class... Kids, class Feature>
struct combine_carries_to<node<kind::elementwise<Op>, Kids...>, Feature> {
private:
    template <std::size_t... I>
    static constexpr bool any(std::index_sequence<I...>) {
        return ((Op::carries_gradient[I] && combine_carries_to<std::tuple_element_t<I, std::tuple<Kids...>>, Feature>::value) || ...);
    }

public:
    static constexpr bool value = any(std::index_sequence_for<Kids...>{});
};
// pairwise(w, Qf, Kf, f): to w always (the score is linear in it), to the
// features where f passes one to qf or kf
template <class Combine, class W, class QF, class KF, std::size_t I>
struct carries_gradient_to<node<kind::pairwise<Combine>, W, QF, KF>, I>
    : std::bool_constant<I == 0 || combine_carries_to<Combine, std::conditional_t<I == 1, pair_query_feature, pair_key_feature>>::value> {};

// Does the output of E depend differentiably on the input named Name: is
// there a path from E to it along which every node carries a gradient?
template <class E, fixed_string Name> struct gets_gradient : std::false_type {};
template <fixed_string N, std::size_t R, std::size_t C, class El, fixed_string Name>
struct gets_gradient<matrix<N, R, C, El>, Name> : std::bool_constant<N == Name> {};
template <class Kind, class... Kids, fixed_string Name>
struct gets_gradient<node<Kind, Kids...>, Name> {
private:
    template <std::size_t... I>
    static constexpr bool any(std::index_sequence<I...>) {
        return ((carries_gradient_to<node<Kind, Kids...>, I>::value &&
                 gets_gradient<std::tuple_element_t<I, std::tuple<Kids...>>, Name>::value) ||
                ...);
    }

public:
    static constexpr bool value = any(std::index_sequence_for<Kids...>{});
};
template <class E, fixed_string Name>
inline constexpr bool gets_gradient_v = gets_gradient<std::remove_cvref_t<E>, Name>::value;

// What asking for the gradient of such an input says.
inline std::string no_gradient_message(std::string_view name) {
    return "attnfuse: input " + std::string(name) +
           " gets no gradient: the output reads it only where it is piecewise constant in it (a mask or length, "
           "a lookup's index, the scores of hard), or not at all";
}

// ---- the attentions whose backward runs as backend kernels ----------------
namespace plan {

// Is an input reached from E, outside the subtree Core, along a path that
// carries a gradient?
template <class E, class Core> struct differentiable_outside : std::bool_constant<is_input_v<E>> {};
template <class Kind, class... Kids, class Core>
struct differentiable_outside<node<Kind, Kids...>, Core> {
private:
    template <std::size_t... I>
    static constexpr bool any(std::index_sequence<I...>) {
        return ((carries_gradient_to<node<Kind, Kids...>, I>::value &&
                 differentiable_outside<std::tuple_element_t<I, std::tuple<Kids...>>, Core>::value) ||
                ...);
    }

public:
    static constexpr bool value = !std::is_same_v<node<Kind, Kids...>, Core> && any(std::index_sequence_for<Kids...>{});
};

template <class Core> struct plain_dot_core : std::false_type {
    static constexpr bool distinct_from(std::string_view) { return false; }
};
template <class X, class Y>
struct plain_dot_core<node<kind::product, node<kind::transpose, X>, Y>> {
    static constexpr bool value = [] {
        if constexpr (is_input_v<X> && is_input_v<Y>) return !(X::name == Y::name);
        else return false;
    }();
    // names an input neither side is
    static constexpr bool distinct_from(std::string_view name) {
        if constexpr (value) return name != X::name.view() && name != Y::name.view();
        else return false;
    }
};

// softmax(score)*V, dropout(softmax(score), p, seed)*V, or pointwise
// weights w(score)*V with no row normalisation (sigmoid attention, ReLU^2
// attention), whose score is one core of the form CoreForm accepts
// (CoreForm<core>::value, and distinct_from(name) for V's name) under
// pointwise operations (scale, masks, biases, soft-capping) whose other
// inputs get no gradient, and V a bound input of its own. Pointwise weights
// need no row statistics: the core's gradient is dP times the weights'
// slope, element by element.
template <template <class> class CoreForm, class E, bool = attention_pattern<E>::matches>
struct weighted_attention_over : std::false_type {};
template <template <class> class CoreForm, class E> struct weighted_attention_over<CoreForm, E, true> {
private:
    using parts = attention_parts<E>;
    using core = typename parts::core_type;
    using score = typename normaliser<typename parts::weights_type>::score;
    using values = typename attention_pattern<E>::values;
    static constexpr bool distinct_values() {
        if constexpr (is_input_v<values>) return CoreForm<core>::distinct_from(values::name.view());
        else return false;
    }

public:
    static constexpr bool value = !parts::hard && !parts::ratio && !parts::post_weighted && CoreForm<core>::value &&
                                  distinct_values() && !differentiable_outside<score, core>::value;
};

// The dot-product core Q^T*K of two bound inputs: the FlashAttention-2
// backward (recompute S and P tile by tile from Q, K and, for a softmax,
// each row's statistics), and its unfused counterpart.
template <class E> using attention_backward = weighted_attention_over<plain_dot_core, E>;
template <class E> inline constexpr bool attention_backward_v = attention_backward<std::remove_cvref_t<E>>::value;

}  // namespace plan

// What a backend's backward says of an expression outside plan::attention_backward.
inline std::string outside_attention_backward(std::string_view backend, const std::string& expression) {
    return "attnfuse: " + std::string(backend) +
           "::backward covers softmax(score)*V, dropout(softmax(score), p, seed)*V and pointwise weights w(score)*V "
           "(sigmoid, ReLU^2) whose score is one Q^T*K of two bound inputs "
           "(or one Q^T*W*K of three, one X^T*f(W*Y) of keys an activated projection, or one pairwise(w, Q, K, qf * kf)) "
           "under pointwise operations whose other inputs get no gradient (scale, masks, lengths, soft-capping, detach), with V bound, "
           "or a softmax of such a score plus a learned factor of a positional bias (m*(i - j), m one value per (batch, head) or per query row), "
           "and hard(score)*V of any score with V bound; and any of these reading one input in several places, "
           "its values perhaps transposed (softmax(h^T*W*h)*transpose(h)), or with Q, K or V linear projections W*X or W*X + b "
           "of bound inputs (transpose(Wq*X)*(Wk*X), transpose(Wv*X)), or under an output projection "
           "concat_heads(attention)*Wo + bo (Wo perhaps transposed, bo and concat_heads perhaps absent); `" +
           expression + "` is not of that form. reference::backward differentiates every expression";
}

}  // namespace attnfuse
