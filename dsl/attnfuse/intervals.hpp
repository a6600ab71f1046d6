// Interval bounds of a score expression over a tile of queries x keys: how a
// fused kernel learns that a whole tile is masked (every score -inf) and
// skips it, for any mask written in i and j (causal, windows, lengths,
// local attention) without a rule per mask.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>

#include "expr.hpp"

namespace attnfuse {

struct interval {
    double lo = -std::numeric_limits<double>::infinity();
    double hi = std::numeric_limits<double>::infinity();

    static constexpr interval point(double v) { return {v, v}; }
    static constexpr interval everything() { return {}; }
    bool all_minus_infinity() const { return hi == -std::numeric_limits<double>::infinity(); }
    bool surely_nonzero() const { return lo > 0 || hi < 0; }
    bool surely_zero() const { return lo == 0 && hi == 0; }
};

namespace detail {

inline interval checked(double lo, double hi) {
    if (std::isnan(lo) || std::isnan(hi)) return interval::everything();
    return {lo, hi};
}
inline interval hull(interval a, interval b) { return {std::min(a.lo, b.lo), std::max(a.hi, b.hi)}; }
inline interval truth(bool surely_true, bool surely_false) {
    if (surely_true) return interval::point(1);
    if (surely_false) return interval::point(0);
    return {0, 1};
}
inline interval product_bounds(interval a, interval b) {
    const double c[4] = {a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi};
    for (double v : c)
        if (std::isnan(v)) return interval::everything();
    return {*std::min_element(c, c + 4), *std::max_element(c, c + 4)};
}

// The unary operations whose bounds are their values at the interval's ends:
// each is listed, never assumed.
template <class Op>
inline constexpr bool monotone_increasing = std::is_same_v<Op, op::exp_> || std::is_same_v<Op, op::log_> ||
                                            std::is_same_v<Op, op::tanh_> || std::is_same_v<Op, op::sigmoid> ||
                                            std::is_same_v<Op, op::relu> || std::is_same_v<Op, op::sqrt_>;

// An operation with no rule here is a compile error naming it (the Op of the
// instantiation): a guessed bound would let a kernel skip tiles it needs.
template <class Op> constexpr void no_bounds_rule() {
    static_assert(sizeof(Op) == 0, "attnfuse: this elementwise operation has no interval-bounds rule (it is the Op of "
                                   "this instantiation). Fix: add its branch to attnfuse::detail::apply_bounds, stating "
                                   "its monotonicity.");
}

template <class Op> interval apply_bounds(interval a) {
    if constexpr (std::is_same_v<Op, op::negate>) return {-a.hi, -a.lo};
    else if constexpr (std::is_same_v<Op, op::logical_not>) return truth(a.surely_zero(), a.surely_nonzero());
    else if constexpr (std::is_same_v<Op, op::abs_>) {
        if (a.lo >= 0) return a;
        if (a.hi <= 0) return {-a.hi, -a.lo};
        return {0, std::max(-a.lo, a.hi)};
    } else if constexpr (std::is_same_v<Op, op::square>) {
        const interval m = apply_bounds<op::abs_>(a);
        return {m.lo * m.lo, m.hi * m.hi};
    } else if constexpr (monotone_increasing<Op>) {
        return checked(Op::apply(a.lo), Op::apply(a.hi));
    } else {
        no_bounds_rule<Op>();
        return interval::everything();
    }
}

template <class Op> interval apply_bounds(interval a, interval b) {
    if constexpr (std::is_same_v<Op, op::add>) return checked(a.lo + b.lo, a.hi + b.hi);
    else if constexpr (std::is_same_v<Op, op::subtract>) return checked(a.lo - b.hi, a.hi - b.lo);
    else if constexpr (std::is_same_v<Op, op::multiply>) return product_bounds(a, b);
    else if constexpr (std::is_same_v<Op, op::divide>) {
        if (b.lo > 0 || b.hi < 0) return product_bounds(a, {1 / b.hi, 1 / b.lo});
        return interval::everything();
    } else if constexpr (std::is_same_v<Op, op::maximum>) return {std::max(a.lo, b.lo), std::max(a.hi, b.hi)};
    else if constexpr (std::is_same_v<Op, op::minimum>) return {std::min(a.lo, b.lo), std::min(a.hi, b.hi)};
    else if constexpr (std::is_same_v<Op, op::less>) return truth(a.hi < b.lo, a.lo >= b.hi);
    else if constexpr (std::is_same_v<Op, op::less_equal>) return truth(a.hi <= b.lo, a.lo > b.hi);
    else if constexpr (std::is_same_v<Op, op::greater>) return truth(a.lo > b.hi, a.hi <= b.lo);
    else if constexpr (std::is_same_v<Op, op::greater_equal>) return truth(a.lo >= b.hi, a.hi < b.lo);
    else if constexpr (std::is_same_v<Op, op::equal>)
        return truth(a.lo == a.hi && b.lo == b.hi && a.lo == b.lo, a.hi < b.lo || b.hi < a.lo);
    else if constexpr (std::is_same_v<Op, op::not_equal>)
        return truth(a.hi < b.lo || b.hi < a.lo, a.lo == a.hi && b.lo == b.hi && a.lo == b.lo);
    else if constexpr (std::is_same_v<Op, op::logical_and>)
        return truth(a.surely_nonzero() && b.surely_nonzero(), a.surely_zero() || b.surely_zero());
    else if constexpr (std::is_same_v<Op, op::logical_or>)
        return truth(a.surely_nonzero() || b.surely_nonzero(), a.surely_zero() && b.surely_zero());
    else {
        no_bounds_rule<Op>();
        return interval::everything();
    }
}

}  // namespace detail

// Bounds of a vector leaf over the tile of rows [row0, row1) and columns
// [col0, col1): a column (rows > 1) is read at the tile's rows, a row
// (cols > 1) at its columns, a single value as it is. A NaN bounds nothing.
inline interval vector_bounds(const float* base, std::size_t rows, std::size_t cols, std::ptrdiff_t row_stride,
                              std::ptrdiff_t col_stride, std::size_t row0, std::size_t row1, std::size_t col0, std::size_t col1) {
    const std::size_t from = rows > 1 ? row0 : (cols > 1 ? col0 : 0);
    const std::size_t to = rows > 1 ? std::min(row1, rows) : (cols > 1 ? std::min(col1, cols) : 1);
    const std::ptrdiff_t stride = rows > 1 ? row_stride : col_stride;
    interval out{std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity()};
    for (std::size_t n = from; n < to; ++n) {
        const double value = base[static_cast<std::ptrdiff_t>(n) * stride];
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
        auto kid = [&](const auto& k) { return bounds(k, rows, cols, leaf, factor); };
        if constexpr (std::tuple_size_v<decltype(e.kids)> == 1) return detail::apply_bounds<Op>(kid(e.template kid<0>()));
        else if constexpr (std::tuple_size_v<decltype(e.kids)> == 2)
            return detail::apply_bounds<Op>(kid(e.template kid<0>()), kid(e.template kid<1>()));
        else if constexpr (!std::is_same_v<Op, op::select>) {
            detail::no_bounds_rule<Op>();
            return interval::everything();
        } else {  // where(c, a, b)
            const interval c = kid(e.template kid<0>());
            if (c.surely_nonzero()) return kid(e.template kid<1>());
            if (c.surely_zero()) return kid(e.template kid<2>());
            return detail::hull(kid(e.template kid<1>()), kid(e.template kid<2>()));
        }
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
