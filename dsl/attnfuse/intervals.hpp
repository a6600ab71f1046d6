// Interval bounds of a score expression over a tile of queries x keys: how a
// fused kernel learns that a whole tile is masked (every score -inf) and
// skips it, for any mask written in i and j (causal, windows, lengths,
// local attention) without a rule per mask.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>

#include "element.hpp"
#include "expr.hpp"
#include "interval.hpp"

namespace attnfuse {

namespace detail {

// An operation with no `bounds` face is a compile error naming it (the Op of
// the instantiation): a guessed bound would let a kernel skip tiles it needs.
template <class Op> constexpr void no_bounds_rule() {
    static_assert(sizeof(Op) == 0, "attnfuse: this elementwise operation has no interval-bounds rule (it is the Op of "
                                   "this instantiation). Fix: give it a `static interval bounds(interval...)` face in "
                                   "dsl/attnfuse/ops.hpp, stating its monotonicity.");
}

template <class Op, class... I> interval apply_bounds(I... kids) {
    if constexpr (requires { Op::bounds(kids...); }) return Op::bounds(kids...);
    else {
        no_bounds_rule<Op>();
        return interval::everything();
    }
}

}  // namespace detail

// Bounds of a vector leaf over the tile of rows [row0, row1) and columns
// [col0, col1): a column (rows > 1) is read at the tile's rows, a row
// (cols > 1) at its columns, a single value as it is, each as its element
// type widens it. A NaN bounds nothing.
template <storage_element El>
interval vector_bounds(const El* base, std::size_t rows, std::size_t cols, std::ptrdiff_t row_stride,
                              std::ptrdiff_t col_stride, std::size_t row0, std::size_t row1, std::size_t col0, std::size_t col1) {
    const std::size_t from = rows > 1 ? row0 : (cols > 1 ? col0 : 0);
    const std::size_t to = rows > 1 ? std::min(row1, rows) : (cols > 1 ? std::min(col1, cols) : 1);
    const std::ptrdiff_t stride = rows > 1 ? row_stride : col_stride;
    interval out{std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity()};
    for (std::size_t n = from; n < to; ++n) {
        const double value = to_float(base[static_cast<std::ptrdiff_t>(n) * stride]);
        if (value != value) return interval::everything();
        out.lo = std::min(out.lo, value);
        out.hi = std::max(out.hi, value);
    }
    return out;
}

// Bounds of `e` for i in `rows` and j in `cols`. `leaf(x)` bounds every
// non-pointwise node (the core, inputs, computed operands), and
// `factor(x)` gives the run-time factor of a scale node.
template <class E, class Leaf, class Factor>
interval bounds(const E& e, interval rows, interval cols, const Leaf& leaf, const Factor& factor) {
    if constexpr (std::is_same_v<E, constant>) return e.value != e.value ? interval::everything() : interval::point(e.value);
    else if constexpr (std::is_same_v<E, query_index>) return rows;
    else if constexpr (std::is_same_v<E, key_index>) return cols;
    else if constexpr (!is_pointwise_v<E>) return leaf(e);
    else if constexpr (has_kind_template<E, kind::elementwise>::value) {
        using Op = typename E::kind_type::op;
        return std::apply([&](const auto&... kids) { return detail::apply_bounds<Op>(bounds(kids, rows, cols, leaf, factor)...); },
                          e.kids);
    } else if constexpr (has_kind_v<E, kind::scale_by_inner_extent> || has_kind_v<E, kind::scale_by>) {
        return detail::product_bounds(bounds(e.template kid<0>(), rows, cols, leaf, factor), interval::point(factor(e)));
    } else if constexpr (has_kind_v<E, kind::dropout>) {
        const interval a = bounds(e.template kid<0>(), rows, cols, leaf, factor);
        return detail::hull(detail::product_bounds(a, interval::point(1 / (1 - e.kind.p))), interval::point(0));
    } else if constexpr (has_kind_v<E, kind::lookup>) {
        return interval::everything();
    } else if constexpr (is_named_node<E>::value) {
        return bounds(e.template kid<0>(), rows, cols, leaf, factor);
    } else {
        static_assert(sizeof(E) == 0, "attnfuse: a pointwise node kind has no interval-bounds rule (the E of this instantiation)");
        return interval::everything();
    }
}

}  // namespace attnfuse
