// The CPU backend, fused and unfused, against the double-precision reference.
//
// Error measure, in every test here: the largest |cpu - reference| over the
// output, divided by the largest |reference| (or 1 when that is smaller):
// a relative error of the output as a whole. fp32 tolerance: 1e-4.
#include <attnfuse/cpu.hpp>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "element_storage.hpp"
#include "every_operation.hpp"
#include "multihead_layer.hpp"
#include "variants.hpp"

namespace af = attnfuse;
using af::cpu::execution;
using Catch::Matchers::Contains;

namespace {

constexpr double tolerance = 1e-4;

double relative_error(const af::reference::result& ref, const af::cpu::tensor& out) {
    REQUIRE(out.values.size() == ref.values.size());
    return af::variants::relative_error(ref.values, out.values);
}

// check_plan: the executed kernels are the plan's (false where the run falls
// back at run time, as a fused score broadcasting past its core does).
template <class E, class... B>
void check_modes(bool check_plan, const std::string& name, const E& e, double tol, const B&... bindings) {
    const auto ref = af::reference::evaluate(e, bindings...);
    for (const execution mode : {execution::fused, execution::unfused}) {
        const auto [out, info] = af::cpu::run(e, af::cpu::options{mode}, bindings...);
        INFO(name << " | " << af::to_string(e) << " | " << (mode == execution::fused ? "fused" : "unfused"));
        CHECK(relative_error(ref, out) <= af::variants::tolerance_of_run(tol, info));
        // the executed kernels are the plan's
        const std::size_t planned = mode == execution::fused ? af::plan::kernel_count<E, af::plan::mode::fused>
                                                             : af::plan::kernel_count<E, af::plan::mode::unfused>;
        if (check_plan) CHECK(info.kernels.size() == planned);
        // fused, no n_q x n_k score or weight matrix is ever materialised
        if (check_plan && mode == execution::fused) CHECK(info.score_bytes == 0);
    }
}

template <class E, class... B>
void check_both_modes(const std::string& name, const E& e, double tol, const B&... bindings) {
    check_modes(true, name, e, tol, bindings...);
}

}  // namespace

TEST_CASE("every variant runs fused and unfused on the CPU and agrees with the reference", "[cpu]") {
    const af::variants::shape shapes[] = {
        {2, 2, 7, 13, 5, 3},      // batch 2, heads 2
        {2, 3, 33, 65, 31, 7},    // past one register block and one key panel
        {1, 2, 127, 257, 33, 65}, // several query and key tiles, d_v past a panel
        {3, 2, 1, 1, 1, 1},       // one of everything
    };
    for (const auto& s : shapes) {
        af::variants::for_each(s, [&](const af::variants::variant& v, const auto& e, const auto&... bindings) {
            // scores near 1e4 carry an fp32 rounding of about 1e-3 in each score,
            // which softmax passes on: that row is held to finiteness and 1e-2.
            const bool huge_scores = v.name.find("1e4") != std::string::npos;
            check_both_modes(v.name, e, huge_scores ? 1e-2 : tolerance, bindings...);
        });
    }
}

TEST_CASE("every elementwise operation's vector face agrees with the reference at awkward inputs", "[cpu]") {
    for (const execution mode : {execution::fused, execution::unfused})
        af::testing::check_every_operation([&](const auto& e, const auto&... bindings) {
            return af::cpu::run(e, af::cpu::options{mode}, bindings...).output.values;
        });
}

TEST_CASE("nn.MultiheadAttention as one expression (concat_heads, W_o, biases, masks) agrees with a plain-loop module", "[cpu]") {
    const auto on_cpu = [](const auto& e, const af::run_options& o, const auto&... b) { return af::cpu::run(e, o, b...); };
    af::testing::check_multihead_layer(on_cpu);
    af::testing::check_multihead_layer_edges(on_cpu);
}

TEST_CASE("inputs stored as f16 and bf16 agree with the reference and stay within their format's error", "[cpu]") {
    af::testing::check_element_storage([](const auto& e, const af::run_options& o, const auto&... b) { return af::cpu::run(e, o, b...); },
                                       af::testing::stored_reads::fused_attention_inputs);
}

TEST_CASE("scaled dot-product and causal attention at every awkward size", "[cpu]") {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::size_t sizes[] = {1, 2, 3, 7, 31, 33, 65, 127, 257};
    for (std::size_t n : sizes)
        for (std::size_t d : {std::size_t{1}, std::size_t{7}, std::size_t{33}, std::size_t{65}}) {
            af::variants::input_store in(static_cast<std::uint32_t>(n * 131 + d));
            const std::size_t batch = 2, heads = 1;
            auto q = af::bind(Q, af::col_major(in.random(batch * d * n), d, n, batch, heads));
            auto k = af::bind(K, af::col_major(in.random(batch * d * n), d, n, batch, heads));
            auto v = af::bind(V, af::row_major(in.random(batch * n * d), n, d, batch, heads));
            check_both_modes("sdpa n=" + std::to_string(n) + " d=" + std::to_string(d), softmax(scale(Q^af::T*K))*V,
                             tolerance, q, k, v);
            check_both_modes("causal n=" + std::to_string(n) + " d=" + std::to_string(d),
                             softmax(mask(scale(Q^af::T*K), af::causal))*V, tolerance, q, k, v);
        }
}

TEST_CASE("fully masked rows give zeros, never NaN", "[cpu]") {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::variants::input_store in(5);
    const std::size_t n = 70, d = 9;
    auto q = af::bind(Q, af::col_major(in.random(d * n), d, n));
    auto k = af::bind(K, af::col_major(in.random(d * n), d, n));
    auto v = af::bind(V, af::row_major(in.random(n * d), n, d));
    // queries below 50 see no key at all
    const auto e = softmax(mask(scale(Q^af::T*K), af::i >= 50 && af::causal))*V;
    for (const execution mode : {execution::fused, execution::unfused}) {
        const auto [out, info] = af::cpu::run(e, af::cpu::options{mode}, q, k, v);
        for (std::size_t r = 0; r < n; ++r)
            for (std::size_t c = 0; c < d; ++c) {
                const float x = out.at(0, 0, r, c);
                REQUIRE(!std::isnan(x));
                if (r < 50) REQUIRE(x == 0.0f);
            }
        const auto hard_out = af::cpu::run(hard(mask(Q^af::T*K, af::i >= 50))*V, af::cpu::options{mode}, q, k, v).output;
        for (std::size_t c = 0; c < d; ++c) CHECK(hard_out.at(0, 0, 3, c) == 0.0f);
    }
}

TEST_CASE("a NaN in one query affects only that query's output", "[cpu]") {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::variants::input_store in(6);
    const std::size_t n = 61, d = 11;
    const float* random_queries = in.random(d * n);
    std::vector<float> qdata(random_queries, random_queries + d * n);
    qdata[d * 17 + 3] = std::numeric_limits<float>::quiet_NaN();     // query 17
    auto q = af::bind(Q, af::col_major(qdata.data(), d, n));
    auto k = af::bind(K, af::col_major(in.random(d * n), d, n));
    auto v = af::bind(V, af::row_major(in.random(n * d), n, d));
    for (const execution mode : {execution::fused, execution::unfused}) {
        const auto out = af::cpu::run(softmax(scale(Q^af::T*K))*V, af::cpu::options{mode}, q, k, v).output;
        for (std::size_t r = 0; r < n; ++r)
            for (std::size_t c = 0; c < d; ++c) {
                INFO("row " << r << (mode == execution::fused ? " fused" : " unfused"));
                CHECK(std::isnan(out.at(0, 0, r, c)) == (r == 17));
            }
    }
}

TEST_CASE("wrong sizes at run time throw shape_error before any kernel runs", "[cpu]") {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::vector<float> data(4096, 0.5f);
    auto q = af::bind(Q, af::col_major(data.data(), 8, 10));
    auto k = af::bind(K, af::col_major(data.data(), 8, 12));
    auto v_bad = af::bind(V, af::row_major(data.data(), 11, 4));
    for (const execution mode : {execution::fused, execution::unfused})
        CHECK_THROWS_MATCHES(af::cpu::run(softmax(scale(Q^af::T*K))*V, af::cpu::options{mode}, q, k, v_bad),
                             af::shape_error,
                             Catch::Matchers::Message("matrix product in `softmax(scale(Q^T*K))*V`: left operand "
                                                      "`softmax(scale(Q^T*K))` is 10x12, right operand `V` is 11x4; "
                                                      "columns of the left must equal rows of the right"));
}

TEST_CASE("the fused kernel's memory is independent of n; the unfused one holds the n x n scores", "[cpu]") {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    std::size_t fused_bytes[2] = {}, unfused_bytes[2] = {};
    const std::size_t sizes[2] = {200, 400};
    for (int which = 0; which < 2; ++which) {
        const std::size_t n = sizes[which], d = 16;
        af::variants::input_store in(9);
        auto q = af::bind(Q, af::col_major(in.random(d * n), d, n));
        auto k = af::bind(K, af::col_major(in.random(d * n), d, n));
        auto v = af::bind(V, af::row_major(in.random(n * d), n, d));
        const auto e = softmax(scale(Q^af::T*K))*V;
        fused_bytes[which] = af::cpu::run(e, af::cpu::options{.mode = execution::fused, .threads = 2}, q, k, v).info.intermediate_bytes;
        unfused_bytes[which] = af::cpu::run(e, af::cpu::options{.mode = execution::unfused, .threads = 2}, q, k, v).info.intermediate_bytes;
    }
    CHECK(fused_bytes[0] == fused_bytes[1]);
    CHECK(unfused_bytes[1] >= 4 * 400 * 400);  // at least one fp32 score matrix
    CHECK(unfused_bytes[1] > 3 * unfused_bytes[0]);
}

TEST_CASE("a score that broadcasts past its query-key product is computed in full", "[cpu]") {
    // Q^T*K is 1 x 5 and the bias B is 3 x 5: the score is 3 x 5
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"B"> B;
    af::variants::input_store in(31);
    auto q = af::bind(Q, af::col_major(in.random(4), 4, 1));
    auto k = af::bind(K, af::col_major(in.random(20), 4, 5));
    auto v = af::bind(V, af::row_major(in.random(10), 5, 2));
    auto b = af::bind(B, af::row_major(in.random(15), 3, 5));
    check_modes(false, "broadcast bias", softmax(Q^af::T*K + B)*V, tolerance, q, k, v, b);
    check_modes(false, "broadcast bias, transposed", af::transpose(softmax(Q^af::T*K + B)*V), tolerance, q, k, v, b);
}

TEST_CASE("NaN with a payload stays NaN through the softmax", "[cpu]") {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    std::uint32_t payload = 0x7FC00001u;
    float nan_with_payload;
    std::memcpy(&nan_with_payload, &payload, 4);
    const std::vector<float> q(4 * 2, 0.5f), k(4 * 8, nan_with_payload), v(8 * 2, 1.0f);
    for (const execution mode : {execution::fused, execution::unfused}) {
        const auto out = af::cpu::run(softmax(Q^af::T*K)*V, af::cpu::options{mode}, af::bind(Q, af::col_major(q.data(), 4, 2)),
                                      af::bind(K, af::col_major(k.data(), 4, 8)), af::bind(V, af::row_major(v.data(), 8, 2)))
                             .output;
        for (float x : out.values) CHECK(std::isnan(x));
    }
}

TEST_CASE("dropout refuses a probability outside [0, 1]", "[cpu]") {
    af::matrix<"S"> S;
    CHECK_THROWS_AS(dropout(S, 1.5, 1), std::invalid_argument);
    CHECK_THROWS_AS(dropout(S, -0.1, 1), std::invalid_argument);
    CHECK_THROWS_AS(dropout(S, std::nan(""), 1), std::invalid_argument);
}

TEST_CASE("fusion checks values the types cannot: a ratio's two x, a factor broadcasting past the core", "[cpu]") {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"G"> G;
    af::variants::input_store in(77);
    auto q = af::bind(Q, af::col_major(in.random(4 * 9), 4, 9));
    auto k = af::bind(K, af::col_major(in.random(4 * 11), 4, 11));
    auto v = af::bind(V, af::row_major(in.random(11 * 3), 11, 3));
    // the same type on both sides of the ratio, with different windows
    const auto numerator = where(af::j < 5, exp(Q^af::T*K), 0);
    const auto other = where(af::j < 3, exp(Q^af::T*K), 0);
    check_modes(false, "ratio with two different x", numerator / (row_sum(other) + 1e-3) * V, tolerance, q, k, v);
    // softmax over a 1-query core, multiplied by a 6-row factor
    auto q1 = af::bind(Q, af::col_major(in.random(4), 4, 1));
    auto g = af::bind(G, af::row_major(in.random(6 * 11), 6, 11));
    check_modes(false, "post factor broadcasting past the core", (softmax(Q^af::T*K) % G)*V, tolerance, q1, k, v, g);
}
