// Planning decisions on a fused kernel's score epilogue, made once for every
// backend. A backend first replaces the core of the score by `score_slot`
// (and its other operands by leaves of its own), then:
//   * fold_core_scale: scale(core) becomes a factor on the queries, as
//     FlashAttention scales Q: one multiply per query element instead of
//     one per score;
//   * strip_masks: the epilogue with every mask(s, keep) removed, for tiles
//     whose masks keep everything (the backend decides which tiles those are
//     from interval bounds).
#pragma once
#include <limits>
#include <type_traits>

#include "expr.hpp"
#include "interval.hpp"

namespace attnfuse {

// The score tile of a fused kernel, read where its core stood.
struct score_slot : expr_base {
    static constexpr std::size_t rows = dyn;
    static constexpr std::size_t cols = dyn;
};

// Does the tree read the score through scale(core), with the factor
// resolved (kind::scale_by)? Then the factor can move to the queries.
template <class E> struct holds_scaled_core : std::false_type {};
template <> struct holds_scaled_core<node<kind::scale_by, score_slot>> : std::true_type {};
template <class Kind, class... Kids>
struct holds_scaled_core<node<Kind, Kids...>> : std::bool_constant<(holds_scaled_core<Kids>::value || ...)> {};

template <class E>
auto fold_core_scale(const E& e, double& factor) {
    if constexpr (std::is_same_v<E, node<kind::scale_by, score_slot>>) {
        factor = e.kind.factor;
        return score_slot{};
    } else if constexpr (is_node_v<E> && holds_scaled_core<E>::value) {
        return std::apply([&](const auto&... kids) { return make_node(e.kind, fold_core_scale(kids, factor)...); }, e.kids);
    } else {
        return e;
    }
}
template <class E> using folded_t = decltype(fold_core_scale(std::declval<const E&>(), std::declval<double&>()));

// mask(s, keep) is where(keep, s, -inf).
template <class E> struct is_mask : std::false_type {};
template <class C, class S> struct is_mask<node<kind::elementwise<op::select>, C, S, constant>> : std::true_type {};

template <class E> struct holds_mask : is_mask<E> {};
template <class Kind, class... Kids>
struct holds_mask<node<Kind, Kids...>>
    : std::bool_constant<is_mask<node<Kind, Kids...>>::value || (holds_mask<Kids>::value || ...)> {};

// True when every mask(s, keep) of the tree keeps the whole tile (and its
// -inf branch is a true -inf), so that strip_masks(tree) computes the same
// scores there. `keep_bounds(keep)` bounds a mask's condition over the tile.
// Only the pointwise epilogue is looked at: a mask inside an operand computed
// by its own kernel (the core, a projection) is not the epilogue's.
template <class E, class Bounds>
bool masks_keep_all(const E& e, const Bounds& keep_bounds) {
    if constexpr (is_mask<E>::value) {
        return e.template kid<2>().value == -std::numeric_limits<double>::infinity() &&
               keep_bounds(e.template kid<0>()).surely_nonzero() && masks_keep_all(e.template kid<1>(), keep_bounds);
    } else if constexpr (is_node_v<E> && is_pointwise_v<E>) {
        return std::apply([&](const auto&... kids) { return (masks_keep_all(kids, keep_bounds) && ...); }, e.kids);
    } else {
        return true;
    }
}

template <class E>
auto strip_masks(const E& e) {
    if constexpr (is_mask<E>::value) return strip_masks(e.template kid<1>());
    else if constexpr (is_node_v<E>)
        return std::apply([&](const auto&... kids) { return make_node(e.kind, strip_masks(kids)...); }, e.kids);
    else return e;
}

}  // namespace attnfuse
