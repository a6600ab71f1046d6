// The CPU's backward pass, fused and unfused, against the double-precision
// reference backward (itself checked against finite differences in
// test_gradients): every variant of the form it covers, at odd sizes that
// cross its 64-query and 64-key tiles, every gradient within 1e-4 relative.
#include <attnfuse/cpu.hpp>
#include <attnfuse/cpu/backward.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "variants.hpp"

namespace af = attnfuse;
using af::cpu::execution;

namespace {

// Deterministic values in [-1, 1).
std::vector<float> random_floats(std::size_t n, std::uint32_t seed) {
    std::uint32_t state = seed * 2654435761U + 3U;
    std::vector<float> out(n);
    for (float& x : out) {
        state = state * 1664525U + 1013904223U;
        x = static_cast<float>(static_cast<double>(state >> 8) / 8388608.0 - 1.0);
    }
    return out;
}

struct compared {
    std::size_t variants = 0;     // checked against the reference
    std::size_t outside = 0;      // outside the form the CPU's backward covers: refused with a message
};

template <class E, class... B>
void check_backward(const std::string& name, const E& e, double tolerance, compared& count, const B&... bindings) {
    if constexpr (!af::plan::attention_backward_v<E>) {
        // refused before anything is read (no forward is instantiated for these: it costs compile time)
        CHECK_THROWS_WITH(af::cpu::backward(e, af::tensor{}, af::tensor{}, bindings...), Catch::Contains("reference::backward"));
        ++count.outside;
    } else {
        const af::run_result forward = af::cpu::run(e, bindings...);
        af::tensor d_output = forward.output;
        d_output.values = random_floats(d_output.values.size(), 5);
        af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                          std::vector<double>(d_output.values.begin(), d_output.values.end())};
        const af::reference::gradients expected = af::reference::backward(e, d_reference, bindings...);
        for (const execution mode : {execution::fused, execution::unfused}) {
            const af::backward_result got = af::cpu::backward(e, forward.output, d_output, af::cpu::options{mode}, bindings...);
            INFO(name << " | " << (mode == execution::fused ? "fused" : "unfused"));
            CHECK(got.without == expected.without);
            REQUIRE(got.inputs.size() == expected.inputs.size());
            for (const af::reference::input_gradient& want : expected.inputs) {
                INFO("gradient of " << want.name);
                const af::tensor& have = got.of(want.name);
                CHECK(have.batch == want.batch);
                CHECK(have.heads == want.heads);
                CHECK(have.rows == want.rows);
                CHECK(have.cols == want.cols);
                CHECK(af::variants::relative_error(want.values, have.values) <= tolerance);
            }
            if (mode == execution::fused) CHECK(got.info.score_bytes == 0);
            else CHECK(got.info.score_bytes > 0);
        }
        ++count.variants;
    }
}

}  // namespace

TEST_CASE("the CPU backward, fused and unfused, agrees with the reference backward", "[cpu][backward]") {
    const af::variants::shape shapes[] = {
        {2, 2, 7, 13, 5, 3},    // smaller than a tile
        {1, 2, 70, 150, 20, 9}, // partial tiles both ways, three key tiles
    };
    for (const auto& s : shapes) {
        compared count;
        af::variants::for_each(s, [&](const af::variants::variant& v, const auto& e, const auto&... bindings) {
            // scores near 1e4: each fp32 score is rounded by about 1e-3, which softmax passes on
            const bool huge_scores = v.name.find("1e4") != std::string::npos;
            check_backward(v.name, e, huge_scores ? 1e-2 : 1e-4, count, bindings...);
        });
        // the rows it covers: dot product, scaled, scores near 1e4, masked softmax, local-m, the three
        // relations, causal, both paddings, sliding window, soft-capping, GQA (f32 and bf16), MQA, decode, dropout
        CHECK(count.variants == 18);
        CHECK(count.variants + count.outside >= 30);
    }
}

TEST_CASE("the CPU backward of a fully masked row is zero, and its errors name what is wrong", "[cpu][backward]") {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::vector<float> q = random_floats(4 * 9, 1), k = random_floats(4 * 11, 2), v = random_floats(11 * 3, 3);
    const auto bq = af::bind(Q, af::col_major(q.data(), 4, 9));
    const auto bk = af::bind(K, af::col_major(k.data(), 4, 11));
    const auto bv = af::bind(V, v.data(), 11, 3);
    // queries 0 and 1 keep no key
    const auto e = af::softmax(af::mask(af::scale(Q^af::T*K), af::i >= 2)) * V;
    const af::run_result forward = af::cpu::run(e, bq, bk, bv);
    af::tensor d_output = forward.output;
    d_output.values.assign(d_output.values.size(), 1.0f);
    for (const execution mode : {execution::fused, execution::unfused}) {
        const af::backward_result g = af::cpu::backward(e, forward.output, d_output, af::cpu::options{mode}, bq, bk, bv);
        for (const af::named_gradient& input : g.inputs)
            for (float x : input.values.values) CHECK(std::isfinite(x));
        for (std::size_t a = 0; a < 4; ++a) CHECK(g.of("Q").at(0, 0, a, 0) == 0.0f);
    }
    af::tensor wrong = d_output;
    wrong.rows = 8;
    CHECK_THROWS_AS(af::cpu::backward(e, forward.output, wrong, bq, bk, bv), af::shape_error);
    CHECK_THROWS_WITH(af::cpu::backward(e, forward.output, wrong, bq, bk, bv), Catch::Contains("d_output") && Catch::Contains("8x3"));
}

TEST_CASE("the CPU backward of queries shared by every head takes the pass that gives dQ its own", "[cpu][backward]") {
    // one query head for two K/V heads: the dQ of both heads goes to one gradient, which the
    // one-pass kernel (each K/V head writing the dQ of the heads it serves) cannot own
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::size_t batch = 2, heads = 2, d = 6, n_q = 67, n_k = 71, d_v = 5;
    const std::vector<float> q = random_floats(batch * d * n_q, 11), k = random_floats(batch * heads * d * n_k, 12),
                             v = random_floats(batch * heads * n_k * d_v, 13);
    const auto bq = af::bind(Q, af::col_major(q.data(), d, n_q, batch, 1));
    const auto bk = af::bind(K, af::col_major(k.data(), d, n_k, batch, heads));
    const auto bv = af::bind(V, af::row_major(v.data(), n_k, d_v, batch, heads));
    const auto e = af::softmax(af::mask(af::scale(Q^af::T*K), af::causal)) * V;
    const af::run_result forward = af::cpu::run(e, bq, bk, bv);
    af::tensor d_output = forward.output;
    d_output.values = random_floats(d_output.values.size(), 14);
    const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                            std::vector<double>(d_output.values.begin(), d_output.values.end())};
    const af::reference::gradients expected = af::reference::backward(e, d_reference, bq, bk, bv);
    for (const execution mode : {execution::fused, execution::unfused}) {
        const af::backward_result got = af::cpu::backward(e, forward.output, d_output, af::cpu::options{mode}, bq, bk, bv);
        INFO((mode == execution::fused ? "fused" : "unfused"));
        CHECK(got.of("Q").heads == 1);
        for (const char* name : {"Q", "K", "V"}) {
            INFO("gradient of " << name);
            CHECK(af::variants::relative_error(expected.of(name).values, got.of(name).values) <= 1e-4);
        }
        if (mode == execution::fused) CHECK(std::any_of(got.info.kernels.begin(), got.info.kernels.end(), [](const std::string& k) {
            return k.find("per query tile: dQ") != std::string::npos;
        }));
    }
}

TEST_CASE("the CPU backward gives Q and K no gradient where the score reads its core only through a comparison", "[cpu][backward]") {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::vector<float> q = random_floats(3 * 5, 1), k = random_floats(3 * 7, 2), v = random_floats(7 * 2, 3);
    const auto bq = af::bind(Q, af::col_major(q.data(), 3, 5));
    const auto bk = af::bind(K, af::col_major(k.data(), 3, 7));
    const auto bv = af::bind(V, v.data(), 7, 2);
    const auto e = af::softmax(af::elementwise<af::op::greater>(Q^af::T*K, 0.0)) * V;
    const af::run_result forward = af::cpu::run(e, bq, bk, bv);
    for (const execution mode : {execution::fused, execution::unfused}) {
        const af::backward_result g = af::cpu::backward(e, forward.output, forward.output, af::cpu::options{mode}, bq, bk, bv);
        CHECK(g.without == std::vector<std::string>{"Q", "K"});
        CHECK(g.has("V"));
        CHECK_THROWS_WITH(g.of("Q"), Catch::Contains("no gradient"));
    }
}
