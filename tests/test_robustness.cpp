// Regression tests for the defects of the reliability issue that live in the
// DSL, the reference or the CPU backend: the rule for a key whose weight is
// zero, an accumulator that must not overflow, strides whose span overflows,
// and the CPU's thread count. Run under AddressSanitizer and UBSan in CI.
#include <attnfuse/cpu.hpp>
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

#include "variants.hpp"

namespace af = attnfuse;

namespace {

af::matrix<"Q"> Q;
af::matrix<"K"> K;
af::matrix<"V"> V;

constexpr af::cpu::execution both_modes[] = {af::cpu::execution::fused, af::cpu::execution::unfused};
const char* name(af::cpu::execution m) { return m == af::cpu::execution::fused ? "fused" : "unfused"; }

}  // namespace

// The rule: the context is the sum over the keys whose weight is not zero.
// A key whose weight is exactly 0 (masked, not chosen by hard(), dropped)
// is never read, so a NaN in its value row reaches no output; a weight that
// is merely small still multiplies.
TEST_CASE("a NaN value at a key whose weight is zero reaches no row, on every mode and the reference", "[numerics]") {
    af::variants::input_store in(5);
    const std::size_t n = 200, d = 16, dv = 8;
    auto q = af::bind(Q, af::col_major(in.random(d * n), d, n));
    auto k = af::bind(K, af::col_major(in.random(d * n), d, n));
    for (const std::size_t poisoned : {std::size_t{199}, std::size_t{100}}) {
        const float* random_values = in.random(n * dv);
        std::vector<float> values(random_values, random_values + n * dv);
        values[poisoned * dv + 3] = std::nanf("");
        auto v = af::bind(V, af::row_major(values.data(), n, dv));
        const auto e = softmax(mask(scale(Q^af::T*K), af::causal))*V;
        // under causal masking, row r reads keys 0..r: only rows >= poisoned see the NaN, in its column
        auto check = [&](auto at, const char* who) {
            for (std::size_t r = 0; r < n; ++r)
                for (std::size_t c = 0; c < dv; ++c) {
                    INFO(who << ": NaN at key " << poisoned << ", row " << r << ", column " << c);
                    REQUIRE(std::isnan(at(r, c)) == (r >= poisoned && c == 3));
                }
        };
        const auto ref = af::reference::evaluate(e, q, k, v);
        check([&](std::size_t r, std::size_t c) { return ref.at(0, 0, r, c); }, "reference");
        for (const auto mode : both_modes) {
            const auto out = af::cpu::run(e, af::cpu::options{mode}, q, k, v).output;
            check([&](std::size_t r, std::size_t c) { return static_cast<double>(out.at(0, 0, r, c)); }, name(mode));
            INFO(name(mode));
            CHECK(af::variants::relative_error(ref.values, out.values) <= 1e-4);
        }
    }
}

TEST_CASE("hard(): a NaN value at a key never chosen reaches no row; a chosen one does", "[numerics]") {
    const std::size_t n = 6, d = 1, dv = 2;
    // query r prefers key r (scores q_r * k_j with increasing keys pick the last key for q > 0)
    std::vector<float> qs(n, 1.0f), ks{0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f};
    std::vector<float> values(n * dv, 1.0f);
    values[2 * dv] = std::nanf("");  // key 2 is never the argmax
    auto q = af::bind(Q, af::col_major(qs.data(), d, n));
    auto k = af::bind(K, af::col_major(ks.data(), d, n));
    auto v = af::bind(V, af::row_major(values.data(), n, dv));
    const auto e = hard(Q^af::T*K)*V;
    const auto ref = af::reference::evaluate(e, q, k, v);
    for (double x : ref.values) CHECK(x == 1.0);
    for (const auto mode : both_modes) {
        INFO(name(mode));
        for (float x : af::cpu::run(e, af::cpu::options{mode}, q, k, v).output.values) CHECK(x == 1.0f);
    }
    values[5 * dv] = std::nanf("");  // the chosen key
    const auto ref_nan = af::reference::evaluate(e, q, k, v);
    for (std::size_t n2 = 0; n2 < ref_nan.values.size(); ++n2) CHECK(std::isnan(ref_nan.values[n2]) == (n2 % dv == 0));
    for (const auto mode : both_modes) {
        INFO(name(mode));
        const auto out = af::cpu::run(e, af::cpu::options{mode}, q, k, v).output;
        for (std::size_t n2 = 0; n2 < out.values.size(); ++n2) CHECK(std::isnan(out.values[n2]) == (n2 % dv == 0));
    }
}

TEST_CASE("a small but non-zero weight still multiplies a NaN value", "[numerics]") {
    // scores 0 and -20: the second key's weight is about 2e-9, not zero
    std::vector<float> qs{1.0f}, ks{0.0f, -20.0f}, values{1.0f, std::nanf("")};
    auto q = af::bind(Q, af::col_major(qs.data(), 1, 1));
    auto k = af::bind(K, af::col_major(ks.data(), 1, 2));
    auto v = af::bind(V, af::row_major(values.data(), 2, 1));
    const auto e = softmax(Q^af::T*K)*V;
    CHECK(std::isnan(af::reference::evaluate(e, q, k, v).values[0]));
    for (const auto mode : both_modes) {
        INFO(name(mode));
        CHECK(std::isnan(af::cpu::run(e, af::cpu::options{mode}, q, k, v).output.values[0]));
    }
}

TEST_CASE("a NaN value row whose weight later falls to exactly 0 is dropped", "[numerics]") {
    // key 0 leads at first (its NaN value row enters the context), then key 200
    // scores 1000 higher: key 0's weight becomes exp(-1000) = 0, in double too
    const std::size_t n_k = 256, dv = 3;
    for (const std::size_t n_q : {std::size_t{1}, std::size_t{20}}) {  // the few-query and the tiled path
        std::vector<float> qs(n_q, 1.0f), ks(n_k, -1e4f), values(n_k * dv);
        ks[0] = 0.0f;
        ks[200] = 1000.0f;
        for (std::size_t n = 0; n < values.size(); ++n) values[n] = static_cast<float>(n % 7);
        values[0] = std::nanf("");
        auto q = af::bind(Q, af::col_major(qs.data(), 1, n_q));
        auto k = af::bind(K, af::col_major(ks.data(), 1, n_k));
        auto v = af::bind(V, af::row_major(values.data(), n_k, dv));
        const auto e = softmax(Q^af::T*K)*V;
        const auto ref = af::reference::evaluate(e, q, k, v);
        for (std::size_t c = 0; c < dv; ++c) REQUIRE(ref.values[c] == values[200 * dv + c]);
        for (const auto mode : both_modes) {
            INFO(name(mode) << ", " << n_q << " queries");
            CHECK(af::variants::relative_error(ref.values, af::cpu::run(e, af::cpu::options{mode}, q, k, v).output.values) <= 1e-6);
        }
    }
}

TEST_CASE("the fused accumulator does not overflow while the normalised result is finite", "[numerics]") {
    const std::size_t n_q = 8, n_k = 100, d = 20, dv = 8;
    std::vector<float> qs(d * n_q, 0.0f), ks(d * n_k, 0.5f), values(n_k * dv, 3e38f);
    for (std::size_t r = 0; r < n_k; r += 2) values[r * dv + 1] = -3e38f;  // mixed signs in one column
    auto q = af::bind(Q, af::col_major(qs.data(), d, n_q));
    auto k = af::bind(K, af::col_major(ks.data(), d, n_k));
    auto v = af::bind(V, af::row_major(values.data(), n_k, dv));
    for (const std::size_t queries : {n_q, std::size_t{1}}) {  // the tiled path and the few-query path
        auto q_n = af::bind(Q, af::col_major(qs.data(), d, queries));
        const auto e = softmax(scale(Q^af::T*K))*V;
        const auto ref = af::reference::evaluate(e, q_n, k, v);
        for (const auto mode : both_modes) {
            INFO(name(mode) << ", " << queries << " queries");
            const auto out = af::cpu::run(e, af::cpu::options{mode}, q_n, k, v).output;
            for (std::size_t n = 0; n < out.values.size(); ++n) {
                REQUIRE(std::isfinite(out.values[n]));
                CHECK(std::abs(out.values[n] - ref.values[n]) <= 1e-4 * 3e38);
            }
        }
    }
    (void)q;
}

TEST_CASE("a stride whose span overflows is a shape error naming the input", "[bind]") {
    const std::vector<float> data(16, 1.0f);
    const std::ptrdiff_t huge = std::ptrdiff_t{1} << 62;
    for (const auto& view : {af::strided(data.data(), 2, 2, huge, 1), af::strided(data.data(), 2, 3, 1, huge),
                             af::strided(data.data(), 2, 2, 2, 1, 3, 1, huge, 0),
                             af::strided(data.data(), 2, 2, -huge, -huge)}) {
        try {
            (void)af::bind(K, view);
            FAIL("no error for a stride of 2^62");
        } catch (const af::shape_error& e) {
            const std::string what = e.what();
            INFO(what);
            CHECK(what.find("input K") != std::string::npos);
            CHECK(what.find("stride") != std::string::npos);
        }
    }
    // a large stride along an extent of 1 reaches nothing: fine
    CHECK_NOTHROW(af::bind(K, af::strided(data.data(), 1, 4, huge, 1)));
}

TEST_CASE("cpu::options::threads beyond the machine is clamped, and the report says what ran", "[cpu]") {
    af::variants::input_store in(9);
    const std::size_t n = 40, d = 8;
    auto q = af::bind(Q, af::col_major(in.random(d * n), d, n));
    auto k = af::bind(K, af::col_major(in.random(d * n), d, n));
    auto v = af::bind(V, af::row_major(in.random(n * d), n, d));
    const auto e = softmax(scale(Q^af::T*K))*V;
    const auto ref = af::reference::evaluate(e, q, k, v);
    const std::size_t hardware = std::max(1u, std::thread::hardware_concurrency());
    for (const std::size_t threads : {std::size_t{1} << 31, (std::size_t{1} << 32) + 1, hardware + 1, std::size_t{1}}) {
        for (const auto mode : both_modes) {
            INFO(threads << " threads, " << name(mode));
            const auto [out, info] = af::cpu::run(e, af::cpu::options{.mode = mode, .threads = threads}, q, k, v);
            CHECK(info.threads >= 1);
            CHECK(info.threads <= hardware);
            CHECK(info.threads <= threads);
            CHECK(af::variants::relative_error(ref.values, out.values) <= 1e-5);
        }
    }
}
