// Every elementwise operation of attnfuse::op::all, run by a backend at
// awkward inputs (signed zeros, tiny and huge magnitudes, infinities, NaN),
// against the reference rounded to float. Unary operations read a row of
// 19 values; binary ones the 19 x 19 grid of that row against the same
// values as a column (broadcasting both ways); `where` a grid with a
// condition of 0, 1 and NaN. An operation added to ops.hpp is covered here
// without a line of test.
#pragma once
#include <attnfuse/dsl.hpp>
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <vector>

namespace attnfuse::testing {

inline const std::vector<float>& awkward_values() {
    constexpr float inf = std::numeric_limits<float>::infinity();
    static const std::vector<float> v{-inf, -1000.0f, -100.0f, -20.0f, -3.5f, -1.0f, -1e-3f, -0.0f, 0.0f, 1e-3f,
                                      0.7f, 1.0f, 2.0f, 5.0f, 20.0f, 100.0f, 1000.0f, inf, std::numeric_limits<float>::quiet_NaN()};
    return v;
}

// |out - ref| within `tolerance` of max(1, |ref|), ref rounded to float first
// (so that an overflow to inf is the reference's answer too); NaN matches NaN;
// an exact zero matches a zero of the same sign (1/x tells them apart).
inline bool agrees(double ref, float out, double tolerance) {
    const float rounded = static_cast<float>(ref);
    if (std::isnan(rounded) || std::isnan(out)) return std::isnan(rounded) && std::isnan(out);
    if (std::isinf(rounded) || std::isinf(out)) return rounded == out;
    if (ref == 0.0 && out == 0.0f) return std::signbit(ref) == std::signbit(out);
    return std::abs(static_cast<double>(out) - ref) <= tolerance * std::max(1.0, std::abs(ref));
}

template <class Op, class Run>
void check_operation(const Run& run) {
    matrix<"X"> X;
    matrix<"Y"> Y;
    matrix<"C"> C;
    const std::vector<float>& v = awkward_values();
    const std::size_t n = v.size();
    std::vector<float> cond(n);
    for (std::size_t r = 0; r < n; ++r) cond[r] = r % 3 == 0 ? 0.0f : r % 3 == 1 ? 1.0f : std::numeric_limits<float>::quiet_NaN();
    auto x = bind(X, row_major(v.data(), 1, n));
    auto y = bind(Y, row_major(v.data(), n, 1));
    auto c = bind(C, row_major(cond.data(), n, 1));
    auto compare = [&](const auto& e, const auto&... bindings) {
        const auto ref = reference::evaluate(e, bindings...);
        const std::vector<float> out = run(e, bindings...);
        REQUIRE(out.size() == ref.values.size());
        for (std::size_t k = 0; k < out.size(); ++k) {
            INFO(Op::name << " at element " << k << " (row " << k / ref.cols << ", column " << k % ref.cols << "): reference "
                          << ref.values[k] << ", backend " << out[k]);
            // 1e-6: the CPU's exp and tanh polynomials and erf's 1.5e-7 formula, in float
            CHECK(agrees(ref.values[k], out[k], 1e-6));
        }
    };
    if constexpr (requires { Op::apply(0.0); }) compare(elementwise<Op>(X), x);
    else if constexpr (requires { Op::apply(0.0, 0.0); }) compare(elementwise<Op>(Y, X), x, y);
    else compare(elementwise<Op>(C, Y, X), x, y, c);
}

template <class Run, class... Ops>
void check_every_operation(const Run& run, op::op_list<Ops...>) {
    (check_operation<Ops>(run), ...);
}

template <class Run>
void check_every_operation(const Run& run) {
    check_every_operation(run, op::all{});
}

}  // namespace attnfuse::testing
