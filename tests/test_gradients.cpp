// The reference backward pass against central finite differences of the
// reference forward, in double: each operation's partials, then every row
// of VARIANTS.md (variants.hpp) at small odd sizes, every bound input, every
// element. The loss is L = sum(dO ∘ output) for a fixed random dO, whose
// gradient is what backward(e, dO, ...) returns.
#include <attnfuse/dsl.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "variants.hpp"

namespace af = attnfuse;

namespace {

// Deterministic values in [-1, 1).
std::vector<double> random_doubles(std::size_t n, std::uint32_t seed) {
    std::uint32_t state = seed * 2654435761U + 7U;
    std::vector<double> out(n);
    for (double& x : out) {
        state = state * 1664525U + 1013904223U;
        x = static_cast<double>(state >> 8) / 8388608.0 - 1.0;
    }
    return out;
}

// ---- each operation's partials -------------------------------------------------

template <class Op, std::size_t N>
void check_partials_at(const std::array<double, N>& x) {
    const auto partials = std::apply([](auto... v) { return Op::partials(v...); }, x);
    for (std::size_t k = 0; k < N; ++k) {
        const double h = 1e-6;
        std::array<double, N> up = x, down = x;
        up[k] += h;
        down[k] -= h;
        const double fd = (std::apply([](auto... v) { return Op::apply(v...); }, up) -
                           std::apply([](auto... v) { return Op::apply(v...); }, down)) /
                          (2 * h);
        INFO(Op::name << " operand " << k << " at " << x[0] << (N > 1 ? ", " + std::to_string(x[1]) : std::string()));
        // detach is the identity whose partial is 0 by definition: no gradient passes it
        if constexpr (std::is_same_v<Op, af::op::detach>) CHECK(std::abs(fd - 1) <= 1e-7);
        else CHECK(std::abs(partials[k] - fd) <= 1e-7 * std::max(1.0, std::abs(fd)));
        // an operand the operation carries no gradient to has a zero partial, and the other way round
        if (!Op::carries_gradient[k]) CHECK(partials[k] == 0);
    }
}

template <class Op>
void check_partials() {
    // points away from every operation's kinks (0 for abs and relu, ties for max and min, a == b)
    // and inside every domain (log and sqrt take the positive ones)
    const double points[] = {-2.3, -0.7, 0.35, 1.1, 3.2};
    const double positive[] = {0.2, 0.9, 2.5};
    constexpr std::size_t arity = Op::carries_gradient.size();
    if constexpr (arity == 1) {
        if constexpr (std::is_same_v<Op, af::op::log_> || std::is_same_v<Op, af::op::sqrt_>)
            for (double x : positive) check_partials_at<Op, 1>({x});
        else
            for (double x : points) check_partials_at<Op, 1>({x});
    } else if constexpr (arity == 2) {
        for (double a : points)
            for (double b : positive) check_partials_at<Op, 2>({a, b});
    } else {
        for (double c : {0.0, 1.0})
            for (double a : points) check_partials_at<Op, 3>({c, a, -a / 2});
    }
}

template <class... Ops>
void check_every_partial(af::op::op_list<Ops...>) {
    (check_partials<Ops>(), ...);
}

// ---- whole expressions -----------------------------------------------------------

struct gradient_check {
    double worst = 0;            // max |backward - finite difference| over the largest |finite difference|
    std::size_t checked = 0;     // elements compared
    std::size_t at_kinks = 0;    // elements left out: a mask, an argmax or a lookup changed within the step
    double worst_without = 0;    // the largest finite difference of an input said to get no gradient
};

// Every input copied to float memory the check owns and perturbs (a bf16
// K/V cache is compared as the floats it holds), rebound under its name.
template <class B>
auto owned_copy(const B& b, std::deque<std::vector<float>>& store) {
    const auto& v = b.view;
    std::vector<float>& values = store.emplace_back();
    for (std::size_t bb = 0; bb < v.batch; ++bb)
        for (std::size_t h = 0; h < v.heads; ++h)
            for (std::size_t r = 0; r < v.rows; ++r)
                for (std::size_t c = 0; c < v.cols; ++c) values.push_back(af::to_float(v.at(bb, h, r, c)));
    return af::binding<B::name, float>{af::row_major(static_cast<const float*>(values.data()), v.rows, v.cols, v.batch, v.heads)};
}

template <class E, class... B>
gradient_check check_variant(const E& e, const B&... bindings) {
    gradient_check out;
    std::deque<std::vector<float>> store;
    const std::tuple<af::binding<B::name, float>...> copies{owned_copy(bindings, store)...};
    auto forward = [&] { return std::apply([&](const auto&... b) { return af::reference::evaluate(e, b...); }, copies); };
    af::reference::result d_output = forward();
    d_output.values = random_doubles(d_output.values.size(), 99);
    auto loss = [&] {
        const af::reference::result o = forward();
        double sum = 0;
        for (std::size_t n = 0; n < o.values.size(); ++n) sum += d_output.values[n] * o.values[n];
        return sum;
    };
    const af::reference::gradients g =
        std::apply([&](const auto&... b) { return af::reference::backward(e, d_output, b...); }, copies);

    std::size_t input = 0;
    auto check_input = [&](const auto& binding) {
        std::vector<float>& values = store[input++];
        const std::string name(std::remove_cvref_t<decltype(binding)>::name.view());
        const bool differentiable = g.has(name);
        double worst_difference = 0, largest = 0;
        for (std::size_t n = 0; n < values.size(); ++n) {
            const float x = values[n];
            // steps of at least 16 units in the last place, so that x ± step is a float near x ± h
            const double ulp = std::nextafter(std::abs(x), std::numeric_limits<float>::infinity()) - std::abs(x);
            const double h = std::max(std::ldexp(1.0, -12), 16 * ulp);
            auto central = [&](double step) {
                values[n] = static_cast<float>(x + step);
                const double up_at = values[n], up = loss();
                values[n] = static_cast<float>(x - step);
                const double down_at = values[n], down = loss();
                values[n] = x;
                return (up - down) / (up_at - down_at);
            };
            // Richardson on two pairs of steps: each estimate exact to O(h^4); where they disagree a
            // piecewise-constant part of the expression moved within the step, and the element is left out
            const double coarse = (4 * central(h / 2) - central(h)) / 3, fine = (4 * central(h / 8) - central(h / 4)) / 3;
            if (std::abs(coarse - fine) > 1e-8 * std::max(1.0, std::abs(fine))) {
                ++out.at_kinks;
                continue;
            }
            ++out.checked;
            if (!differentiable) {
                out.worst_without = std::max(out.worst_without, std::abs(fine));
                continue;
            }
            largest = std::max(largest, std::abs(fine));
            worst_difference = std::max(worst_difference, std::abs(g.of(name).values[n] - fine));
        }
        if (differentiable) out.worst = std::max(out.worst, worst_difference / std::max(largest, 1e-3));
    };
    std::apply([&](const auto&... b) { (check_input(b), ...); }, copies);
    return out;
}

}  // namespace

TEST_CASE("every operation's partials agree with finite differences", "[gradients]") {
    check_every_partial(af::op::all{});
}

TEST_CASE("the reference backward agrees with finite differences on every variant", "[gradients]") {
    // odd sizes, batch and heads > 1 (GQA halves the heads of K and V)
    const af::variants::shape shape{.batch = 2, .heads = 2, .n_q = 5, .n_k = 7, .d = 3, .d_v = 2};
    std::size_t variants = 0;
    af::variants::for_each(shape, [&](const af::variants::variant& v, const auto& expr, const auto&... bindings) {
        const gradient_check c = check_variant(expr, bindings...);
        ++variants;
        INFO(v.name << ": worst relative difference " << c.worst << " over " << c.checked << " elements, " << c.at_kinks
                    << " at kinks, largest finite difference of an input without gradient " << c.worst_without);
        CHECK(c.worst <= 1e-6);
        CHECK(c.worst_without <= 1e-9);
        CHECK(c.checked > 0);
        // kinks are where a mask edge or an argmax moves: a few elements at most
        CHECK(c.at_kinks * 50 <= c.checked + c.at_kinks);
        WARN(v.name << ": " << c.worst << " (" << c.checked << " checked, " << c.at_kinks << " at kinks)");
    });
    CHECK(variants >= 30);
}

TEST_CASE("which inputs get a gradient is decided from the expression", "[gradients]") {
    using af::matrix;
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    matrix<"L"> L;
    matrix<"Bt"> Bt;
    // lengths reach the output only through a comparison; a lookup's index gets nothing, its table does
    const auto masked = af::softmax(af::mask(af::scale(Q^af::T*K) + Bt[af::i - af::j + 4.0], af::key_lengths(L))) * V;
    STATIC_REQUIRE(af::gets_gradient_v<decltype(masked), "Q">);
    STATIC_REQUIRE(af::gets_gradient_v<decltype(masked), "K">);
    STATIC_REQUIRE(af::gets_gradient_v<decltype(masked), "V">);
    STATIC_REQUIRE(af::gets_gradient_v<decltype(masked), "Bt">);
    STATIC_REQUIRE_FALSE(af::gets_gradient_v<decltype(masked), "L">);
    // hard's one-hot weights are piecewise constant in the scores: Q and K get none, V does
    const auto one_hot = af::hard(Q^af::T*K) * V;
    STATIC_REQUIRE_FALSE(af::gets_gradient_v<decltype(one_hot), "Q">);
    STATIC_REQUIRE_FALSE(af::gets_gradient_v<decltype(one_hot), "K">);
    STATIC_REQUIRE(af::gets_gradient_v<decltype(one_hot), "V">);
    // a where's condition gets none, its branches do
    const auto chosen = af::where(Q > 0, K, V);
    STATIC_REQUIRE_FALSE(af::gets_gradient_v<decltype(chosen), "Q">);
    STATIC_REQUIRE(af::gets_gradient_v<decltype(chosen), "K">);

    const std::vector<float> q{0.5f, -0.25f, 0.75f, 1.0f}, k{0.1f, 0.2f, -0.3f, 0.4f, 0.5f, -0.6f}, v{1, 2, 3, 4, 5, 6};
    const std::vector<float> lengths{2};
    const auto bq = af::bind(Q, af::col_major(q.data(), 2, 2));
    const auto bk = af::bind(K, af::col_major(k.data(), 2, 3));
    const auto bv = af::bind(V, v.data(), 3, 2);
    const auto bl = af::bind(L, lengths.data(), 1, 1);
    const auto no_table = af::softmax(af::mask(af::scale(Q^af::T*K), af::key_lengths(L))) * V;
    af::reference::result d_output = af::reference::evaluate(no_table, bq, bk, bv, bl);
    d_output.values.assign(d_output.values.size(), 1.0);
    const af::reference::gradients g = af::reference::backward(no_table, d_output, bq, bk, bv, bl);
    CHECK(g.has("Q"));
    CHECK(g.of("K").cols == 3);
    CHECK_FALSE(g.has("L"));
    REQUIRE(g.without == std::vector<std::string>{"L"});
    CHECK_THROWS_WITH(g.of("L"), Catch::Contains("input L gets no gradient"));
    CHECK_THROWS_WITH(g.of("X"), Catch::Contains("no input named X"));
    // the key masked by the length gets no weight, so its value row gets no gradient
    const af::reference::input_gradient& dv = g.of("V");
    CHECK(dv.at(0, 0, 2, 0) == 0.0);
    CHECK(dv.at(0, 0, 2, 1) == 0.0);
    // with d_output = 1 everywhere, each column of dV sums the weights of every query: n_q
    CHECK(std::abs(dv.at(0, 0, 0, 0) + dv.at(0, 0, 1, 0) - 2.0) < 1e-12);
}

TEST_CASE("detach passes no gradient: an input read only under it gets none, inside a pairwise combination too", "[gradients]") {
    using af::matrix;
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    matrix<"w"> w;
    matrix<"m"> m;
    using frozen_slopes = decltype(af::softmax(af::scale(Q^af::T*K) - af::detach(m) * (af::i - af::j)) * V);
    STATIC_REQUIRE_FALSE(af::gets_gradient_v<frozen_slopes, "m">);
    STATIC_REQUIRE(af::gets_gradient_v<frozen_slopes, "K">);
    // the query features under detach: Q gets none, K and w do
    const auto frozen_queries = af::softmax(af::pairwise(w, Q, K, af::detach(af::sqrt(af::qf)) * af::kf)) * V;
    STATIC_REQUIRE_FALSE(af::gets_gradient_v<decltype(frozen_queries), "Q">);
    STATIC_REQUIRE(af::gets_gradient_v<decltype(frozen_queries), "K">);
    STATIC_REQUIRE(af::gets_gradient_v<decltype(frozen_queries), "w">);
    // a query feature of 0, where sqrt's partial is infinite: detach's 0 adds nothing, not 0 * inf
    const std::vector<float> q{0.0f, 0.25f, 0.5f, 1.0f}, k{0.1f, 0.2f, -0.3f, 0.4f, 0.5f, -0.6f}, v{1, 2, 3, 4, 5, 6}, weights{0.7f, -0.4f};
    const auto bq = af::bind(Q, af::col_major(q.data(), 2, 2));
    const auto bk = af::bind(K, af::col_major(k.data(), 2, 3));
    const auto bv = af::bind(V, v.data(), 3, 2);
    const auto bw = af::bind(w, weights.data(), 2, 1);
    af::reference::result d_output = af::reference::evaluate(frozen_queries, bq, bk, bv, bw);
    d_output.values.assign(d_output.values.size(), 1.0);
    const af::reference::gradients g = af::reference::backward(frozen_queries, d_output, bq, bk, bv, bw);
    CHECK(g.without == std::vector<std::string>{"Q"});
    for (const char* name : {"K", "V", "w"})
        for (const double x : g.of(name).values) CHECK(std::isfinite(x));
}

TEST_CASE("the reference backward of a fully masked row is zero, not NaN", "[gradients]") {
    using af::matrix;
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    const std::vector<float> q{0.5f, -0.25f, 0.75f, 1.0f}, k{0.1f, 0.2f, -0.3f, 0.4f, 0.5f, -0.6f}, v{1, 2, 3, 4, 5, 6};
    const auto bq = af::bind(Q, af::col_major(q.data(), 2, 2));
    const auto bk = af::bind(K, af::col_major(k.data(), 2, 3));
    const auto bv = af::bind(V, v.data(), 3, 2);
    // query 0 keeps no key: its weights are 0 and its output row 0; query 1 keeps every key
    const auto e = af::softmax(af::mask(Q^af::T*K, af::i >= 1)) * V;
    af::reference::result d_output = af::reference::evaluate(e, bq, bk, bv);
    d_output.values.assign(d_output.values.size(), 1.0);
    const af::reference::gradients g = af::reference::backward(e, d_output, bq, bk, bv);
    for (const af::reference::input_gradient& input : g.inputs)
        for (double x : input.values) CHECK(std::isfinite(x));
    CHECK(g.of("Q").at(0, 0, 0, 0) == 0.0);  // query 0 (column 0 of Q) moves nothing
    CHECK(g.of("Q").at(0, 0, 1, 0) == 0.0);
    CHECK(g.of("Q").at(0, 0, 0, 1) != 0.0);
}

TEST_CASE("the reference backward names a d_output of the wrong shape", "[gradients]") {
    using af::matrix;
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    const std::vector<float> q(6, 0.5f), k(9, 0.25f), v(6, 1.0f);
    const auto bq = af::bind(Q, af::col_major(q.data(), 3, 2));
    const auto bk = af::bind(K, af::col_major(k.data(), 3, 3));
    const auto bv = af::bind(V, v.data(), 3, 2);
    const auto e = af::softmax(af::scale(Q^af::T*K)) * V;
    af::reference::result wrong{1, 1, 3, 2, std::vector<double>(6, 1.0)};
    CHECK_THROWS_AS(af::reference::backward(e, wrong, bq, bk, bv), af::shape_error);
    CHECK_THROWS_WITH(af::reference::backward(e, wrong, bq, bk, bv),
                      Catch::Contains("d_output") && Catch::Contains("2x2") && Catch::Contains("3x2"));
}
