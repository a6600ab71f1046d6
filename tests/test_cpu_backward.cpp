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
#include <limits>
#include <string>
#include <vector>

#include "bias_factor_cases.hpp"
#include "hard_attention_inputs.hpp"
#include "layer_backward_cases.hpp"
#include "projected_core_inputs.hpp"
#include "row_statistics_check.hpp"
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
    if constexpr (!af::plan::backend_backward_v<E>) {
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

            // the training forward of a softmax: the same output, with each row's statistics,
            // which the backward then reads instead of recomputing (pointwise weights keep none)
            if constexpr (af::plan::keeps_statistics_v<E>) {
                const af::training_result training = af::cpu::run_for_training(e, af::cpu::options{mode}, bindings...);
                CHECK(training.output.values == af::cpu::run(e, af::cpu::options{mode}, bindings...).output.values);
                af::testing::check_statistics(training.statistics, e, tolerance, bindings...);
                for (const execution backward_mode : {execution::fused, execution::unfused}) {
                    INFO("from the training forward's result, backward " << (backward_mode == execution::fused ? "fused" : "unfused"));
                    const af::backward_result given = af::cpu::backward(e, training, d_output, af::cpu::options{backward_mode}, bindings...);
                    REQUIRE(given.inputs.size() == expected.inputs.size());
                    for (const af::reference::input_gradient& want : expected.inputs)
                        CHECK(af::variants::relative_error(want.values, given.of(want.name).values) <= tolerance);
                    if (backward_mode == execution::fused)
                        CHECK(std::any_of(given.info.kernels.begin(), given.info.kernels.end(),
                                          [](const std::string& k) { return k.find("the forward's max and sum") != std::string::npos; }));
                }
            }
        }
        ++count.variants;
    }
}

// Both modes of cpu::backward of e against the reference backward, for a
// random output gradient.
template <class E, class... B>
void check_both_modes(const E& e, const B&... bindings) {
    const af::run_result forward = af::cpu::run(e, bindings...);
    af::tensor d_output = forward.output;
    d_output.values = random_floats(d_output.values.size(), 53);
    const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                            std::vector<double>(d_output.values.begin(), d_output.values.end())};
    const af::reference::gradients expected = af::reference::backward(e, d_reference, bindings...);
    for (const execution mode : {execution::fused, execution::unfused}) {
        INFO(af::to_string(e) << " | " << (mode == execution::fused ? "fused" : "unfused"));
        const af::backward_result got = af::cpu::backward(e, forward.output, d_output, af::cpu::options{mode}, bindings...);
        CHECK(got.without == expected.without);
        REQUIRE(got.inputs.size() == expected.inputs.size());
        for (const af::reference::input_gradient& want : expected.inputs) {
            INFO("gradient of " << want.name);
            CHECK(got.of(want.name).rows == want.rows);
            CHECK(got.of(want.name).heads == want.heads);
            CHECK(af::variants::relative_error(want.values, got.of(want.name).values) <= 1e-4);
        }
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
        // the rows it covers: dot product, scaled, general, self-general (h^T W h), self query-free
        // (v^T tanh(W h)), weighted softmax (pairwise q . k), scores near 1e4,
        // masked softmax, hard, local-m, the three relations, causal, both paddings, sliding window,
        // ALiBi, soft-capping, GQA (f32 and bf16), MQA, decode, dropout, sigmoid and ReLU^2 attention,
        // the multi-head layer
        CHECK(count.variants == 27);
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

TEST_CASE("the CPU backward of pointwise weights over a batch entry with every key masked gives it no gradient", "[cpu][backward]") {
    // sigmoid(-inf) is 0: a weightless (batch, head) has weights 0, not the -inf of a masked softmax score
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"L"> L;
    const std::size_t batch = 2, d = 4, n_q = 9, n_k = 11, d_v = 3;
    const std::vector<float> q = random_floats(batch * d * n_q, 61), k = random_floats(batch * d * n_k, 62),
                             v = random_floats(batch * n_k * d_v, 63), lengths{0.0f, 7.0f};
    const auto bq = af::bind(Q, af::col_major(q.data(), d, n_q, batch));
    const auto bk = af::bind(K, af::col_major(k.data(), d, n_k, batch));
    const auto bv = af::bind(V, af::row_major(v.data(), n_k, d_v, batch));
    const auto bl = af::bind(L, af::row_major(lengths.data(), 1, 1, batch));
    const auto e = af::sigmoid(af::mask(af::scale(Q^af::T*K), af::key_lengths(L))) * V;
    const af::run_result forward = af::cpu::run(e, bq, bk, bv, bl);
    af::tensor d_output = forward.output;
    d_output.values = random_floats(d_output.values.size(), 64);
    const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                            std::vector<double>(d_output.values.begin(), d_output.values.end())};
    const af::reference::gradients expected = af::reference::backward(e, d_reference, bq, bk, bv, bl);
    for (const execution mode : {execution::fused, execution::unfused}) {
        INFO((mode == execution::fused ? "fused" : "unfused"));
        const af::backward_result got = af::cpu::backward(e, forward.output, d_output, af::cpu::options{mode}, bq, bk, bv, bl);
        for (const char* name : {"Q", "K", "V"}) {
            INFO("gradient of " << name);
            CHECK(af::variants::relative_error(expected.of(name).values, got.of(name).values) <= 1e-4);
        }
        for (std::size_t n = 0; n < n_k * d_v; ++n) CHECK(got.of("V").values[n] == 0.0f);  // batch entry 0
    }
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

TEST_CASE("the CPU backward of an input read in several places is the sum over its places", "[cpu][backward]") {
    // self-attention over one sequence X (d x n): X the queries, the keys and, transposed, the
    // values; and X as queries and keys with V of its own
    af::matrix<"X"> X;
    af::matrix<"V"> V;
    const std::size_t batch = 2, heads = 2, d = 5, n = 69, d_v = 3;
    const std::vector<float> x = random_floats(batch * heads * d * n, 51), v = random_floats(batch * heads * n * d_v, 52);
    const auto bx = af::bind(X, af::col_major(x.data(), d, n, batch, heads));
    const auto bv = af::bind(V, af::row_major(v.data(), n, d_v, batch, heads));
    STATIC_REQUIRE(af::plan::backend_backward_v<decltype(af::softmax(af::scale(X^af::T*X))*af::transpose(X))>);
    check_both_modes(af::softmax(af::mask(af::scale(X^af::T*X), af::causal))*af::transpose(X), bx);
    check_both_modes(af::softmax(af::scale(X^af::T*X))*V, bx, bv);
}

TEST_CASE("the CPU backward of keys that are an activated projection, and of a bilinear pairwise score, through the dot-core backward",
          "[cpu][backward]") {
    // tiles crossed both ways
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"W"> W;
    af::matrix<"w"> w;
    const af::testing::projected_core_inputs in(67, 131, random_floats);
    const auto bq = in.bind_q();
    const auto bq_deep = in.bind_q_deep();
    const auto bk = in.bind_k();
    const auto bv = in.bind_v();
    const auto bw_projection = in.bind_projection();
    const auto bw_features = in.bind_features();

    // numbers inside the activation, a causal mask, pointwise weights
    check_both_modes(af::softmax(af::mask(af::scale(Q^af::T*(2 * af::tanh(W*K / 3))), af::causal))*V, bq_deep, bk, bv, bw_projection);
    check_both_modes(af::sigmoid(Q^af::T*af::relu(W*K) - 2)*V, bq_deep, bk, bv, bw_projection);
    // the features' product in either order, under a window
    check_both_modes(af::softmax(af::mask(af::pairwise(w, Q, K, af::kf * af::qf), af::window(9)))*V, bq, bk, bv, bw_features);
    check_both_modes(af::softmax(af::scale(af::pairwise(w, Q, K, af::qf * af::kf), 0.5))*V, bq, bk, bv, bw_features);
    // any other combination of the features is not a dot product: refused, pointing to the reference
    STATIC_REQUIRE_FALSE(af::plan::backend_backward_v<decltype(af::softmax(af::pairwise(w, Q, K, af::qf - af::kf))*V)>);
    // keys that are an elementwise function of an input, not of a projection: refused at run
    // time, as before there were activated keys (these once stopped the build instead)
    CHECK_THROWS_WITH(af::cpu::backward(af::softmax(Q^af::T*af::tanh(K))*V, af::tensor{}, af::tensor{}, bq, bk, bv),
                      Catch::Contains("reference::backward"));
    CHECK_THROWS_WITH(af::cpu::backward(af::softmax(Q^af::T*(K / 8))*V, af::tensor{}, af::tensor{}, bq, bk, bv),
                      Catch::Contains("reference::backward"));
    // values of fewer heads than the keys W K of a per-head W: a message naming all three
    const std::vector<float> per_head = random_floats(2 * in.d_a * in.d, 67);
    const auto bw_per_head = af::bind(W, af::row_major(per_head.data(), in.d_a, in.d, 1, 2));
    const auto per_head_keys = af::softmax(Q^af::T*af::tanh(W*K))*V;
    const af::tensor out = af::cpu::run(per_head_keys, bq_deep, bk, bv, bw_per_head).output;
    CHECK_THROWS_WITH(af::cpu::backward(per_head_keys, out, out, bq_deep, bk, bv, bw_per_head),
                      Catch::Contains("values V") && Catch::Contains("W and K"));
}

TEST_CASE("the CPU backward of a learned factor of a positional bias: ALiBi's slopes, a factor per query row", "[cpu][backward]") {
    // tiles crossed both ways
    af::testing::for_each_bias_factor_case(67, 131, random_floats, [](const char* name, const auto& e, const auto&... bindings) {
        INFO(name);
        check_both_modes(e, bindings...);
    });
    // a factor of one value per key: no forward gives its gradient, so a message naming it
    af::testing::with_per_key_factor(random_floats, [](const auto& per_key_bias, const auto&... bindings) {
        const af::tensor out = af::cpu::run(per_key_bias, bindings...).output;
        CHECK_THROWS_WITH(af::cpu::backward(per_key_bias, out, out, bindings...),
                          Catch::Contains("bias factor c") && Catch::Contains("bound 1 x 41") && Catch::Contains("detach(c)"));
    });
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"m"> m;
    const af::testing::projected_core_inputs in(23, 41, random_floats);
    // under soft-capping the bias's gradient is not linear in the score's: refused, pointing to the reference
    const float slope = 0.25f;
    const auto bm = af::bind(m, af::row_major(&slope, 1, 1));
    // read under detach, the slopes get no gradient (and the attention is the dot core's)
    using frozen = decltype(af::softmax(af::mask(af::scale(Q^af::T*K) - af::detach(m) * (af::i - af::j), af::causal))*V);
    STATIC_REQUIRE_FALSE(af::gets_gradient_v<frozen, "m">);
    STATIC_REQUIRE(af::gets_gradient_v<frozen, "Q">);
    STATIC_REQUIRE(af::plan::attention_backward_v<frozen>);
    const auto capped = af::softmax(8 * af::tanh((af::scale(Q^af::T*K) - m * (af::i - af::j)) / 8))*V;
    STATIC_REQUIRE_FALSE(af::plan::backend_backward_v<decltype(capped)>);
    CHECK_THROWS_WITH(af::cpu::backward(capped, af::tensor{}, af::tensor{}, in.bind_q(), in.bind_k(), in.bind_v(), bm),
                      Catch::Contains("reference::backward"));
}

TEST_CASE("the CPU backward of a multi-head layer: projections of the operands and the output projection", "[cpu][backward]") {
    af::testing::for_each_layer_case(9, 13, random_floats, [](const char* name, const auto& e, const auto&... bindings) {
        INFO(name);
        STATIC_REQUIRE(af::plan::backend_backward_v<std::remove_cvref_t<decltype(e)>>);
        check_both_modes(e, bindings...);
        // an output gradient of another shape is named before anything runs
        af::tensor output = af::cpu::run(e, bindings...).output, wrong = output;
        wrong.cols += 1;
        wrong.values.resize(wrong.batch * wrong.heads * wrong.rows * wrong.cols);
        CHECK_THROWS_AS(af::cpu::backward(e, output, wrong, bindings...), af::shape_error);
        CHECK_THROWS_WITH(af::cpu::backward(e, output, wrong, bindings...), Catch::Contains("d_output"));
    });
    // the attention under W_o must be one the backend differentiates: a soft-capped score plus a trained slope is not
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"m"> m;
    af::matrix<"Wo"> Wo;
    using capped = decltype(af::concat_heads(af::softmax(8 * af::tanh((af::scale(Q^af::T*K) - m * (af::i - af::j)) / 8))*V) * Wo);
    STATIC_REQUIRE_FALSE(af::plan::backend_backward_v<capped>);
    // the attentions the kernels run as such stay theirs
    using plain = decltype(af::softmax(af::scale(Q^af::T*K))*V);
    STATIC_REQUIRE_FALSE(af::plan::projected_operands_backward_v<plain>);
    STATIC_REQUIRE(af::plan::output_projection_backward_v<decltype(af::concat_heads(af::softmax(af::scale(Q^af::T*K))*V) * Wo)>);
}

TEST_CASE("the CPU backward of activated keys chains a zero gradient through an infinite partial as the reference does",
          "[cpu][backward]") {
    // W and K nonnegative and key 4 all zero: Z = W K is 0 there, where sqrt's partial is
    // infinite and square's is 0; the reference passes 0 on, not 0 * inf
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"W"> W;
    const af::testing::projected_core_inputs in(23, 41, random_floats);
    std::vector<float> k = in.k, weights = in.weights;
    for (float& x : k) x = std::abs(x);
    for (float& x : weights) x = std::abs(x);
    for (std::size_t b = 0; b < in.batch; ++b)
        for (std::size_t a = 0; a < in.d; ++a) k[(b * in.n_k + 4) * in.d + a] = 0.0f;
    const auto bk = af::bind(K, af::col_major(k.data(), in.d, in.n_k, in.batch, 1));
    const auto bw = af::bind(W, af::row_major(weights.data(), in.d_a, in.d));
    check_both_modes(af::softmax(Q^af::T*af::square(af::sqrt(W*K)))*af::matrix<"V">{}, in.bind_q_deep(), bk, in.bind_v(), bw);
}

TEST_CASE("the CPU backward of hard attention sends each row's dO to the value row it chose", "[cpu][backward]") {
    // four query heads over two K/V heads, whole-number scores with many ties (the lowest key
    // wins), and queries 0 and 1 with every key masked (no key chosen, no gradient)
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    using inputs = af::testing::hard_attention_inputs;
    constexpr std::size_t batch = inputs::batch, heads = inputs::heads, kv_heads = inputs::kv_heads, d = inputs::d, n_q = inputs::n_q,
                          n_k = inputs::n_k, d_v = inputs::d_v;
    inputs in(random_floats);
    std::vector<float>& q = in.q;
    const std::vector<float>&k = in.k, &v = in.v;
    const auto bk = af::bind(K, af::col_major(k.data(), d, n_k, batch, kv_heads));
    const auto bv = af::bind(V, af::row_major(v.data(), n_k, d_v, batch, kv_heads));
    const auto e = af::hard(af::mask(Q^af::T*K, af::i >= 2)) * V;
    {
        const auto bq = af::bind(Q, af::col_major(q.data(), d, n_q, batch, heads));
        const af::run_result forward = af::cpu::run(e, bq, bk, bv);
        af::tensor d_output = forward.output;
        d_output.values = random_floats(d_output.values.size(), 44);
        const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                                std::vector<double>(d_output.values.begin(), d_output.values.end())};
        const af::reference::gradients expected = af::reference::backward(e, d_reference, bq, bk, bv);
        for (const execution mode : {execution::fused, execution::unfused}) {
            INFO((mode == execution::fused ? "fused" : "unfused"));
            const af::backward_result got = af::cpu::backward(e, forward.output, d_output, af::cpu::options{mode}, bq, bk, bv);
            CHECK(got.without == std::vector<std::string>{"Q", "K"});
            CHECK(got.of("V").heads == kv_heads);
            CHECK(af::variants::relative_error(expected.of("V").values, got.of("V").values) <= 1e-6);
            if (mode == execution::fused) CHECK(got.info.score_bytes == 0);
            else CHECK(got.info.score_bytes > 0);
        }
        af::tensor wrong = d_output;
        wrong.cols = 4;
        CHECK_THROWS_WITH(af::cpu::backward(e, forward.output, wrong, bq, bk, bv), Catch::Contains("d_output") && Catch::Contains("70x4"));
    }
    {
        // Q and K of one batch entry serving values of two: the output has the values' batch
        const auto bq = af::bind(Q, af::col_major(q.data(), d, n_q, 1, heads));
        const auto bk1 = af::bind(K, af::col_major(k.data(), d, n_k, 1, kv_heads));
        const af::run_result forward = af::cpu::run(e, bq, bk1, bv);
        REQUIRE(forward.output.batch == batch);
        af::tensor d_output = forward.output;
        d_output.values = random_floats(d_output.values.size(), 45);
        const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                                std::vector<double>(d_output.values.begin(), d_output.values.end())};
        const af::reference::gradients expected = af::reference::backward(e, d_reference, bq, bk1, bv);
        const af::backward_result got = af::cpu::backward(e, forward.output, d_output, bq, bk1, bv);
        CHECK(af::variants::relative_error(expected.of("V").values, got.of("V").values) <= 1e-6);
    }
    // a NaN score in a row (query 5 of batch 1, head 3): its weights are NaN, so every value
    // row of the K/V head it reads gets NaN where that row's dO is not 0, as in the reference
    q[((1 * heads + 3) * n_q + 5) * d] = std::numeric_limits<float>::quiet_NaN();
    const auto bq = af::bind(Q, af::col_major(q.data(), d, n_q, batch, heads));
    const af::run_result forward = af::cpu::run(e, bq, bk, bv);
    af::tensor d_output = forward.output;
    d_output.values.assign(d_output.values.size(), 0.0f);
    d_output.values[((1 * heads + 3) * n_q + 5) * d_v + 2] = 1.0f;
    const af::backward_result got = af::cpu::backward(e, forward.output, d_output, bq, bk, bv);
    const af::tensor& dv = got.of("V");
    for (std::size_t source = 0; source < batch * kv_heads; ++source)
        for (std::size_t t = 0; t < n_k; ++t)
            for (std::size_t c = 0; c < d_v; ++c) {
                const float x = dv.values[(source * n_k + t) * d_v + c];
                if (source == 1 * kv_heads + 1 && c == 2) CHECK(std::isnan(x));
                else CHECK(x == 0.0f);
            }
}

TEST_CASE("a training forward keeps each row's statistics, and merge_attentions joins attentions over disjoint keys exactly",
          "[cpu][backward][training]") {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::size_t batch = 2, heads = 3, d = 7, n_q = 69, d_v = 5;
    const std::size_t first_keys = 37, second_keys = 58, n_k = first_keys + second_keys;
    const std::vector<float> q = random_floats(batch * heads * d * n_q, 21), k = random_floats(batch * heads * d * n_k, 22),
                             v = random_floats(batch * heads * n_k * d_v, 23);
    // the keys split in two: K is d x n_k column-major per (batch, head), so keys [0, first) come
    // first in each matrix; the parts are copies of those columns
    std::vector<float> k1, k2, v1, v2;
    for (std::size_t m = 0; m < batch * heads; ++m) {
        const float* km = k.data() + m * d * n_k;
        const float* vm = v.data() + m * n_k * d_v;
        k1.insert(k1.end(), km, km + d * first_keys);
        k2.insert(k2.end(), km + d * first_keys, km + d * n_k);
        v1.insert(v1.end(), vm, vm + first_keys * d_v);
        v2.insert(v2.end(), vm + first_keys * d_v, vm + n_k * d_v);
    }
    const auto bq = af::bind(Q, af::col_major(q.data(), d, n_q, batch, heads));
    const auto soft_capped = af::softmax(2.5 * af::tanh(af::scale(Q^af::T*K) / 2.5)) * V;
    const af::training_result whole = af::cpu::run_for_training(soft_capped, bq, af::bind(K, af::col_major(k.data(), d, n_k, batch, heads)),
                                              af::bind(V, af::row_major(v.data(), n_k, d_v, batch, heads)));
    const af::training_result first = af::cpu::run_for_training(soft_capped, bq, af::bind(K, af::col_major(k1.data(), d, first_keys, batch, heads)),
                                              af::bind(V, af::row_major(v1.data(), first_keys, d_v, batch, heads)));
    const af::training_result second =
        af::cpu::run_for_training(soft_capped, af::cpu::options{execution::unfused}, bq,
                     af::bind(K, af::col_major(k2.data(), d, second_keys, batch, heads)),
                     af::bind(V, af::row_major(v2.data(), second_keys, d_v, batch, heads)));
    const af::training_result merged = af::merge_attentions(first, second);
    const std::vector<double> whole_output(whole.output.values.begin(), whole.output.values.end());
    CHECK(af::variants::relative_error(whole_output, merged.output.values) <= 1e-6);
    for (std::size_t row = 0; row < whole.statistics.max.size(); ++row) {
        // each part's scores are their own products, rounded in another order
        CHECK(std::abs(merged.statistics.max[row] - whole.statistics.max[row]) <= 1e-6f);
        CHECK(std::abs(merged.statistics.sum[row] - whole.statistics.sum[row]) <= 1e-5f * whole.statistics.sum[row]);
    }
    // a part whose every key a mask removed weighs nothing: the other part is the merge
    af::training_result nothing_kept = second;
    std::fill(nothing_kept.statistics.max.begin(), nothing_kept.statistics.max.end(), -std::numeric_limits<float>::infinity());
    std::fill(nothing_kept.statistics.sum.begin(), nothing_kept.statistics.sum.end(), 0.0f);
    std::fill(nothing_kept.output.values.begin(), nothing_kept.output.values.end(), 0.0f);
    CHECK(af::merge_attentions(first, nothing_kept).output.values == first.output.values);
    const af::training_result both_empty = af::merge_attentions(nothing_kept, nothing_kept);
    for (float x : both_empty.output.values) CHECK(x == 0.0f);

    // what is wrong is named
    af::training_result no_statistics = second;
    no_statistics.statistics = {};
    CHECK_THROWS_WITH(af::merge_attentions(first, no_statistics),
                      Catch::Contains("second part keeps statistics of 0 rows") && Catch::Contains("run_for_training"));
    af::training_result fewer_rows = first;
    fewer_rows.output.rows = 3;
    CHECK_THROWS_AS(af::merge_attentions(first, fewer_rows), af::shape_error);
    const auto bk = af::bind(K, af::col_major(k.data(), d, n_k, batch, heads));
    const auto bv = af::bind(V, af::row_major(v.data(), n_k, d_v, batch, heads));
    af::training_result wrong = whole;
    wrong.statistics.rows = 5;
    CHECK_THROWS_WITH(af::cpu::backward(soft_capped, wrong, whole.output, bq, bk, bv),
                      Catch::Contains("the forward's statistics") && Catch::Contains("69 query rows"));
}
