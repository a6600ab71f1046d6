// The expression layer itself: spelling, printing, static shapes, run-time
// shape errors and value semantics.
#include <attnfuse/dsl.hpp>
#include <catch2/catch.hpp>
#include <string>
#include <vector>

namespace af = attnfuse;
using af::dyn;
using af::matrix;
using af::T;
using Catch::Matchers::Contains;

TEST_CASE("the seed spelling prints back as written", "[expressions]") {
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    matrix<"W"> W;
    matrix<"B"> B;
    matrix<"m"> m;
    CHECK(af::to_string(softmax(scale(Q^T*K))*V) == "softmax(scale(Q^T*K))*V");
    CHECK(af::to_string(softmax(Q^T*W*K)*V) == "softmax(Q^T*W*K)*V");
    CHECK(af::to_string(softmax(mask(scale(Q^T*K), af::causal))*V) == "softmax(mask(scale(Q^T*K), causal))*V");
    CHECK(af::to_string(softmax(mask(Q^T*K, af::window(16)))*V) == "softmax(mask(Q^T*K, window(16)))*V");
    CHECK(af::to_string(Q^T*K + B) == "Q^T*K + B");
    CHECK(af::to_string(B + (Q^T*K)) == "B + (Q^T*K)");  // parenthesised, as C++ needs
    CHECK(af::to_string(W*(K^T)) == "W*(K^T)");
    CHECK(af::to_string(af::transpose(W*K)) == "transpose(W*K)");
    CHECK(af::to_string(Q^T*K - m*(af::i - af::j)) == "Q^T*K - m*(i - j)");
    CHECK(af::to_string(hard(Q^T*K)*V) == "hard(Q^T*K)*V");
    CHECK(af::to_string(30 * af::tanh(Q^T*K / 30)) == "30*tanh(Q^T*K/30)");
    CHECK(af::to_string(scale(Q^T*K, 0.125)) == "scale(Q^T*K, 0.125)");
    CHECK(af::to_string(row_sum(exp(B)) + 1e-07) == "row_sum(exp(B)) + 1e-07");
    CHECK(af::to_string(B[af::i - af::j + 4]) == "B[i - j + 4]");
    CHECK(af::to_string(dropout(softmax(Q^T*K), 0.1, 42)) == "dropout(softmax(Q^T*K), 0.1, 42)");
    CHECK(af::to_string(additive(W, Q, K)) == "additive(W, Q, K)");
    CHECK(af::to_string(pairwise(W, Q, K, af::qf % af::kf)) == "pairwise(W, Q, K, qf*kf)");  // both scalars: * is elementwise
    CHECK(af::to_string((Q^T*K) % B) == "Q^T*K%B");  // same precedence, left to right: C++ reads it so too
}

TEST_CASE("static shapes follow the product, transpose and broadcast rules", "[expressions]") {
    matrix<"Q", 64, dyn> Q;
    matrix<"K", 64, 100> K;
    matrix<"V", 100, 32> V;
    using scores = decltype(Q^T*K);
    STATIC_REQUIRE(scores::rows == dyn);
    STATIC_REQUIRE(scores::cols == 100);
    using context = decltype(softmax(scale(Q^T*K))*V);
    STATIC_REQUIRE(context::cols == 32);
    using reduced = decltype(row_sum(K));
    STATIC_REQUIRE(reduced::rows == 64);
    STATIC_REQUIRE(reduced::cols == 1);
    matrix<"r", 1, 100> r;
    using broadcast = decltype(K + r);
    STATIC_REQUIRE(broadcast::rows == 64);
    STATIC_REQUIRE(broadcast::cols == 100);
    // `*` with a number or an index is elementwise, between matrices it is the product
    STATIC_REQUIRE(af::has_kind_v<decltype(K*V), af::kind::product>);
    STATIC_REQUIRE(!af::has_kind_v<decltype(2*K), af::kind::product>);
    STATIC_REQUIRE(!af::has_kind_v<decltype(K*af::i), af::kind::product>);
}

TEST_CASE("Q^T*K means transpose(Q)*K, and T*K+B keeps C++'s precedence", "[expressions]") {
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"B"> B;
    STATIC_REQUIRE(std::is_same_v<decltype(Q^T*K), decltype(af::transpose(Q)*K)>);
    STATIC_REQUIRE(std::is_same_v<decltype(Q^T*K + B), decltype(af::transpose(Q)*K + B)>);
    STATIC_REQUIRE(std::is_same_v<decltype(Q^T), decltype(af::transpose(Q))>);
}

TEST_CASE("run-time shape mismatches throw shape_error naming the operand and both shapes", "[expressions]") {
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    const std::vector<float> data(64, 1.0f);
    auto q = af::bind(Q, af::col_major(data.data(), 4, 3));
    auto k = af::bind(K, af::col_major(data.data(), 5, 6));  // d_k differs
    auto v = af::bind(V, af::row_major(data.data(), 6, 2));
    REQUIRE_THROWS_MATCHES(af::reference::evaluate(softmax(Q^T*K)*V, q, k, v), af::shape_error,
                           Catch::Matchers::Message("matrix product in `Q^T*K`: left operand `Q^T` is 3x4, right "
                                                    "operand `K` is 5x6; columns of the left must equal rows of "
                                                    "the right"));
    auto k_ok = af::bind(K, af::col_major(data.data(), 4, 6));
    auto v_bad = af::bind(V, af::row_major(data.data(), 7, 2));
    try {
        (void)af::reference::evaluate(softmax(Q^T*K)*V, q, k_ok, v_bad);
        FAIL("no exception");
    } catch (const af::shape_error& e) {
        CHECK_THAT(e.what(), Contains("`V` is 7x2") && Contains("is 3x6"));
    }
    matrix<"B"> B;
    auto b = af::bind(B, af::row_major(data.data(), 2, 6));
    try {
        (void)af::reference::evaluate(Q^T*K + B, q, k_ok, b);
        FAIL("no exception");
    } catch (const af::shape_error& e) {
        CHECK_THAT(e.what(), Contains("`B` is 2x6") && Contains("3x6"));
    }
}

TEST_CASE("binding checks the declared shape and the outer extents", "[expressions]") {
    matrix<"Q", 64, dyn> Q;
    const std::vector<float> data(1024, 0.0f);
    CHECK_THROWS_MATCHES(af::bind(Q, af::col_major(data.data(), 32, 8)), af::shape_error,
                         Catch::Matchers::Message("input Q: declared 64xdyn but bound to 32x8"));
    CHECK_THROWS_AS(af::bind(Q, af::tensor_view<float>{}), af::shape_error);
    matrix<"A"> A;
    matrix<"B"> B;
    auto a = af::bind(A, af::row_major(data.data(), 2, 2, 3));
    auto b = af::bind(B, af::row_major(data.data(), 2, 2, 2));
    CHECK_THROWS_WITH(af::reference::evaluate(A + B, a, b), Contains("input B: batch extent 2"));
    auto c = af::bind(A, af::row_major(data.data(), 2, 2, 1, 4));
    auto d = af::bind(B, af::row_major(data.data(), 2, 2, 1, 3));
    CHECK_THROWS_WITH(af::reference::evaluate(A + B, c, d), Contains("3 heads do not divide the 4 heads"));
}

namespace {
// Builds an expression from temporaries and returns it: nothing may dangle.
auto make_attention() {
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    return softmax(scale(Q^T*K) - 0.5 * (af::i - af::j))*V;
}
}  // namespace

TEST_CASE("expressions hold their operands by value", "[expressions]") {
    auto e = make_attention();
    auto copy = e;
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    const std::vector<float> data{1, 2, 3, 4, 5, 6, 7, 8, 9};
    auto q = af::bind(Q, data.data(), 3, 3);
    auto k = af::bind(K, data.data(), 3, 3);
    auto v = af::bind(V, data.data(), 3, 3);
    CHECK(af::reference::evaluate(e, q, k, v).values == af::reference::evaluate(copy, q, k, v).values);
    CHECK(af::to_string(e) == "softmax(scale(Q^T*K) - 0.5*(i - j))*V");
}
