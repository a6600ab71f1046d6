// A closed interval of doubles: the value range of an expression over a tile
// of queries x keys. Every elementwise operation states how it maps ranges
// (its `bounds` face, ops.hpp); intervals.hpp folds a whole tree with them.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>

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
// The range of a non-decreasing function: its values at the ends.
template <class F> interval increasing(interval a, F f) { return checked(f(a.lo), f(a.hi)); }

}  // namespace detail
}  // namespace attnfuse
