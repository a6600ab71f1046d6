// Vulkan's backward pass, fused and unfused, against the double-precision
// reference backward (itself checked against finite differences in
// test_gradients): every variant of the form it covers, at odd sizes, every
// gradient within 1e-4 relative; and each operation's GLSL derivative face
// (glsl_partials) through a score that applies it.
#include <attnfuse/cpu.hpp>
#include <attnfuse/cpu/backward.hpp>
#include <attnfuse/vulkan.hpp>
#include <attnfuse/vulkan/backward.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "bias_factor_cases.hpp"
#include "hard_attention_inputs.hpp"
#include "layer_backward_cases.hpp"
#include "projected_core_inputs.hpp"
#include "row_statistics_check.hpp"
#include "variants.hpp"
#include "vulkan_test_device.hpp"

namespace af = attnfuse;
namespace vk = attnfuse::vulkan;
using af::execution;
using vk::testing::shared_device;

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

// Q (d x n_q), K (d x n_k) and V (n_k x d_v) of 2 batch entries and 2 heads
// at odd sizes, from three seeds in a row.
struct small_inputs {
    static constexpr std::size_t batch = 2, heads = 2, d = 5, n_q = 37, n_k = 45, d_v = 3;
    std::vector<float> q, k, v;
    explicit small_inputs(std::uint32_t seed)
        : q(random_floats(batch * heads * d * n_q, seed)), k(random_floats(batch * heads * d * n_k, seed + 1)),
          v(random_floats(batch * heads * n_k * d_v, seed + 2)) {}
    auto bind_q() const { return af::bind(af::matrix<"Q">{}, af::col_major(q.data(), d, n_q, batch, heads)); }
    auto bind_k() const { return af::bind(af::matrix<"K">{}, af::col_major(k.data(), d, n_k, batch, heads)); }
    auto bind_v() const { return af::bind(af::matrix<"V">{}, af::row_major(v.data(), n_k, d_v, batch, heads)); }
};

af::tensor rounded(const af::reference::result& r) {
    return {r.batch, r.heads, r.rows, r.cols, std::vector<float>(r.values.begin(), r.values.end())};
}

// Both modes of vulkan::backward against the reference; false where the
// expression is outside the form it covers (then it must say so).
template <class E, class... B>
bool check_backward(vk::device& dev, const std::string& name, const E& e, double tolerance, const std::vector<execution>& modes,
                    const B&... bindings) {
    if constexpr (!af::plan::backend_backward_v<E>) {
        CHECK_THROWS_WITH(vk::backward(dev, e, af::tensor{}, af::tensor{}, bindings...), Catch::Contains("reference::backward"));
        return false;
    } else {
        const af::tensor output = rounded(af::reference::evaluate(e, bindings...));
        af::tensor d_output = output;
        d_output.values = random_floats(d_output.values.size(), 5);
        const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                                std::vector<double>(d_output.values.begin(), d_output.values.end())};
        const af::reference::gradients expected = af::reference::backward(e, d_reference, bindings...);
        for (const execution mode : modes) {
            const af::backward_result got = vk::backward(dev, e, output, d_output, vk::options{mode}, bindings...);
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
        return true;
    }
}

}  // namespace

TEST_CASE("the Vulkan backward, fused and unfused, agrees with the reference backward", "[vulkan][backward]") {
    vk::device* dev = shared_device();
    if (!dev) return;
    // smaller than a fused kernel's workgroup of rows, and crossing them (one depth: each
    // fused kernel's text holds d and d_v, and llvmpipe compiles each text in seconds)
    for (const af::variants::shape& s : {af::variants::shape{2, 2, 7, 13, 5, 3}, af::variants::shape{1, 2, 37, 70, 5, 3}}) {
        std::size_t covered = 0, outside = 0;
        af::variants::for_each(s, [&](const af::variants::variant& v, const auto& e, const auto&... bindings) {
            const bool huge_scores = v.name.find("1e4") != std::string::npos;
            (check_backward(*dev, v.name, e, huge_scores ? 1e-2 : 1e-4, {execution::fused, execution::unfused}, bindings...) ? covered : outside) += 1;
        });
        CHECK(covered == 27);  // the rows cpu::backward covers
        CHECK(covered + outside >= 30);
    }
}

// Several blocks of rows on each side (a fused kernel's workgroup takes 64 on
// lavapipe), so that the fused kernels' walks skip the key blocks a query
// block gives no weight to, and the query blocks a key block gets none from,
// on the masks whose bounds differ block by block: lengths per batch entry,
// causal, a window, and a fully masked batch entry.
TEST_CASE("the Vulkan fused backward skips masked blocks of rows and agrees with the reference", "[vulkan][backward]") {
    vk::device* dev = shared_device();
    if (!dev) return;
    std::size_t checked = 0;
    af::variants::for_each(af::variants::shape{2, 2, 150, 141, 5, 3}, [&](const af::variants::variant& v, const auto& e, const auto&... bindings) {
        for (const char* masked : {"causal", "window", "padding", "lengths", "ALiBi"})
            if (v.name.find(masked) != std::string::npos) {
                checked += check_backward(*dev, v.name, e, 1e-4, {execution::fused}, bindings...) ? 1 : 0;
                return;
            }
    });
    CHECK(checked >= 5);
}

namespace {

// softmax(score) * V with `Op` applied to s = scale(Qᵀ K) once (the form the
// backward covers reads its core once), in each operand in turn: at u =
// 0.3 s + 1.2, inside the domain of log and sqrt, against constants (0.9,
// which max and min see on both sides; a where's condition of 1 or 0).
template <class Op>
void check_partials(vk::device& dev, std::size_t& checked) {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::size_t d = 3, n_q = 5, n_k = 7, d_v = 2;
    const std::vector<float> q = random_floats(d * n_q, 21), k = random_floats(d * n_k, 22), v = random_floats(n_k * d_v, 23);
    const auto bq = af::bind(Q, af::col_major(q.data(), d, n_q));
    const auto bk = af::bind(K, af::col_major(k.data(), d, n_k));
    const auto bv = af::bind(V, v.data(), n_k, d_v);
    const auto u = af::elementwise<af::op::add>(af::scale(Q^af::T*K) * 0.3, 1.2);
    auto check = [&](const char* which, const auto& score) {
        INFO("operation " << Op::name << ", the core in operand " << which);
        // unfused: its core-gradient kernel calls the same generated slope as the fused ones
        if (check_backward(dev, std::string(Op::name), af::softmax(score) * V, 1e-4, {execution::unfused}, bq, bk, bv)) ++checked;
    };
    if constexpr (requires { Op::apply(0.0); }) {
        check("a", af::elementwise<Op>(u));
    } else if constexpr (requires { Op::apply(0.0, 0.0); }) {
        check("a", af::elementwise<Op>(u, 0.9));
        check("b", af::elementwise<Op>(0.9, u));
    } else {
        check("b", af::elementwise<Op>(1.0, u, 0.9));
        check("c", af::elementwise<Op>(0.0, 0.9, u));
    }
}

template <class... Ops>
std::size_t check_every_partial(vk::device& dev, af::op::op_list<Ops...>) {
    std::size_t checked = 0;
    (check_partials<Ops>(dev, checked), ...);
    return checked;
}

}  // namespace

TEST_CASE("each operation's GLSL derivative agrees with its partials through the reference backward", "[vulkan][backward]") {
    vk::device* dev = shared_device();
    if (!dev) return;
    // 13 unary operations (detach among them: Q and K get none), 14 binary ones and `where`,
    // each operand that can hold the core
    CHECK(check_every_partial(*dev, af::op::all{}) == 13 + 2 * 14 + 2);
}

namespace {

// Q shared by both heads of each batch entry, K and V per head, causal: the dQ
// kernel sums over the heads a Q source serves, the unfused pass through its
// source-sum kernel.
struct shared_queries {
    static constexpr std::size_t batch = 2, heads = 2, d = 6, n_q = 23, n_k = 41, d_v = 5;
    std::vector<float> q = random_floats(batch * d * n_q, 11), k = random_floats(batch * heads * d * n_k, 12),
                       v = random_floats(batch * heads * n_k * d_v, 13);
};

template <class E, class... B>
void check_against_reference(vk::device& dev, const E& e, const B&... bindings) {
    const af::tensor output = rounded(af::reference::evaluate(e, bindings...));
    af::tensor d_output = output;
    d_output.values = random_floats(d_output.values.size(), 14);
    const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                            std::vector<double>(d_output.values.begin(), d_output.values.end())};
    const af::reference::gradients expected = af::reference::backward(e, d_reference, bindings...);
    for (const execution mode : {execution::fused, execution::unfused}) {
        const af::backward_result got = vk::backward(dev, e, output, d_output, vk::options{mode}, bindings...);
        INFO((mode == execution::fused ? "fused" : "unfused"));
        for (const char* input : {"Q", "K", "V"}) {
            INFO("gradient of " << input);
            CHECK(got.of(input).batch == expected.of(input).batch);
            CHECK(got.of(input).heads == expected.of(input).heads);
            CHECK(af::variants::relative_error(expected.of(input).values, got.of(input).values) <= 1e-4);
        }
    }
}

}  // namespace

TEST_CASE("the Vulkan backward sums a shared input's gradient over the heads and batches it serves, in chunks", "[vulkan][backward]") {
    vk::device* shared = shared_device();
    if (!shared) return;
    // a loop budget far below any driver's: every fused kernel runs in many chunks, each resuming the last
    vk::device_options tight{true};
    tight.max_loop_iterations = 400;
    vk::device small_loops(vk::default_device(), tight);
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const shared_queries s;
    const auto e = af::softmax(af::mask(af::scale(Q^af::T*K), af::causal)) * V;
    for (vk::device* dev : {shared, &small_loops}) {
        INFO("loop limit " << dev->limits().max_loop_iterations);
        // Q: one head per batch entry, shared by both heads
        check_against_reference(*dev, e, af::bind(Q, af::col_major(s.q.data(), s.d, s.n_q, s.batch, 1)),
                                af::bind(K, af::col_major(s.k.data(), s.d, s.n_k, s.batch, s.heads)),
                                af::bind(V, af::row_major(s.v.data(), s.n_k, s.d_v, s.batch, s.heads)));
        // K and V: one (batch, head) shared by every query head and batch entry
        check_against_reference(*dev, e, af::bind(Q, af::col_major(s.k.data(), s.d, s.n_k, s.batch, s.heads)),
                                af::bind(K, af::col_major(s.q.data(), s.d, s.n_q, 1, 1)),
                                af::bind(V, af::row_major(s.v.data(), s.n_q, s.d_v, 1, 1)));
    }
    const af::backward_result chunked = [&] {
        const auto bq = af::bind(Q, af::col_major(s.q.data(), s.d, s.n_q, s.batch, 1));
        const auto bk = af::bind(K, af::col_major(s.k.data(), s.d, s.n_k, s.batch, s.heads));
        const auto bv = af::bind(V, af::row_major(s.v.data(), s.n_k, s.d_v, s.batch, s.heads));
        const af::tensor output = rounded(af::reference::evaluate(e, bq, bk, bv));
        return vk::backward(small_loops, e, output, output, bq, bk, bv);
    }();
    CHECK(chunked.info.dispatches > chunked.info.kernels.size());
}

TEST_CASE("the Vulkan backward of a fully masked row is zero, and its errors name what is wrong", "[vulkan][backward]") {
    vk::device* dev = shared_device();
    if (!dev) return;
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::vector<float> q = random_floats(4 * 9, 1), k = random_floats(4 * 11, 2), v = random_floats(11 * 3, 3);
    const auto bq = af::bind(Q, af::col_major(q.data(), 4, 9));
    const auto bk = af::bind(K, af::col_major(k.data(), 4, 11));
    const auto bv = af::bind(V, v.data(), 11, 3);
    // queries 0 and 1 keep no key
    const auto e = af::softmax(af::mask(af::scale(Q^af::T*K), af::i >= 2)) * V;
    const af::tensor output = rounded(af::reference::evaluate(e, bq, bk, bv));
    af::tensor d_output = output;
    d_output.values.assign(d_output.values.size(), 1.0f);
    for (const execution mode : {execution::fused, execution::unfused}) {
        const af::backward_result g = vk::backward(*dev, e, output, d_output, vk::options{mode}, bq, bk, bv);
        for (const af::named_gradient& input : g.inputs)
            for (float x : input.values.values) CHECK(std::isfinite(x));
        for (std::size_t a = 0; a < 4; ++a) CHECK(g.of("Q").at(0, 0, a, 0) == 0.0f);
    }
    af::tensor wrong = d_output;
    wrong.rows = 8;
    CHECK_THROWS_AS(vk::backward(*dev, e, output, wrong, bq, bk, bv), af::shape_error);
    CHECK_THROWS_WITH(vk::backward(*dev, e, output, wrong, bq, bk, bv), Catch::Contains("d_output") && Catch::Contains("8x3"));
    // K and V of different batch extents, and rows wider than an invocation keeps
    const std::vector<float> v2 = random_floats(2 * 11 * 3, 4);
    const auto bv2 = af::bind(V, af::row_major(v2.data(), 11, 3, 2, 1));
    const af::tensor output2 = rounded(af::reference::evaluate(e, bq, bk, bv2));
    CHECK_THROWS_WITH(vk::backward(*dev, e, output2, output2, bq, bk, bv2), Catch::Contains("same batch and heads"));
    const std::vector<float> wide_q(300 * 9, 0.01f), wide_k(300 * 11, 0.01f);
    const auto wq = af::bind(Q, af::col_major(wide_q.data(), 300, 9));
    const auto wk = af::bind(K, af::col_major(wide_k.data(), 300, 11));
    CHECK_THROWS_WITH(vk::backward(*dev, e, output, d_output, wq, wk, bv), Catch::Contains("d = 300"));
}

TEST_CASE("the Vulkan backward of an input read in several places is the sum over its places", "[vulkan][backward]") {
    vk::device* dev = shared_device();
    if (!dev) return;
    // self-attention over one sequence X: the values transpose(X), and X on the device as
    // queries and keys with V of its own
    af::matrix<"X"> X;
    af::matrix<"V"> V;
    const std::size_t batch = 2, heads = 2, d = 5, n = 69, d_v = 3;
    const std::vector<float> x = random_floats(batch * heads * d * n, 51), v = random_floats(batch * heads * n * d_v, 52);
    const auto x_view = af::col_major(x.data(), d, n, batch, heads);
    const auto bx = af::bind(X, x_view);
    const auto bv = af::bind(V, af::row_major(v.data(), n, d_v, batch, heads));
    const vk::device_tensor resident_x(*dev, x_view, "X");
    // the reference reads host_bindings; vk::backward the bindings given
    auto check = [&](const auto& e, const auto& host_bindings, const auto&... bindings) {
        std::apply(
            [&](const auto&... b) {
                const af::tensor output = rounded(af::reference::evaluate(e, b...));
                af::tensor d_output = output;
                d_output.values = random_floats(d_output.values.size(), 53);
                const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                                        std::vector<double>(d_output.values.begin(), d_output.values.end())};
                const af::reference::gradients want = af::reference::backward(e, d_reference, b...);
                for (const execution mode : {execution::fused, execution::unfused}) {
                    INFO(af::to_string(e) << " | " << (mode == execution::fused ? "fused" : "unfused"));
                    const af::backward_result got = vk::backward(*dev, e, output, d_output, vk::options{mode}, bindings...);
                    CHECK(got.without == want.without);
                    REQUIRE(got.inputs.size() == want.inputs.size());
                    for (const af::reference::input_gradient& w : want.inputs) {
                        INFO("gradient of " << w.name);
                        CHECK(af::variants::relative_error(w.values, got.of(w.name).values) <= 1e-4);
                    }
                }
            },
            host_bindings);
    };
    const auto self = af::softmax(af::mask(af::scale(X^af::T*X), af::causal))*af::transpose(X);
    check(self, std::tuple{bx}, bx);
    check(af::softmax(af::scale(X^af::T*X))*V, std::tuple{bx, bv}, vk::bind_resident(X, resident_x), bv);
    // transposed values are read through a host view
    const af::tensor output = rounded(af::reference::evaluate(self, bx));
    CHECK_THROWS_WITH(vk::backward(*dev, self, output, output, vk::bind_resident(X, resident_x)), Catch::Contains("host memory"));
}

TEST_CASE("the Vulkan backward of keys that are an activated projection, and of a bilinear pairwise score, through the dot-core backward",
          "[vulkan][backward]") {
    vk::device* dev = shared_device();
    if (!dev) return;
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"W"> W;
    af::matrix<"w"> w;
    const af::testing::projected_core_inputs in(37, 70, random_floats);
    const auto bq = in.bind_q();
    const auto bq_deep = in.bind_q_deep();
    const auto bk = in.bind_k();
    const auto bv = in.bind_v();
    const auto bw_projection = in.bind_projection();
    const auto bw_features = in.bind_features();
    const std::vector<execution> both{execution::fused, execution::unfused};
    CHECK(check_backward(*dev, "activated keys", af::softmax(af::mask(af::scale(Q^af::T*(2 * af::tanh(W*K / 3))), af::causal))*V, 1e-4,
                         both, bq_deep, bk, bv, bw_projection));
    CHECK(check_backward(*dev, "activated keys, pointwise weights", af::sigmoid(Q^af::T*af::relu(W*K) - 2)*V, 1e-4, both, bq_deep, bk, bv,
                         bw_projection));
    CHECK(check_backward(*dev, "bilinear pairwise", af::softmax(af::mask(af::pairwise(w, Q, K, af::kf * af::qf), af::window(9)))*V, 1e-4,
                         both, bq, bk, bv, bw_features));
}

TEST_CASE("the Vulkan backward of a learned factor of a positional bias: ALiBi's slopes, a factor per query row", "[vulkan][backward]") {
    vk::device* dev = shared_device();
    if (!dev) return;
    const std::vector<execution> both{execution::fused, execution::unfused};
    af::testing::for_each_bias_factor_case(37, 70, random_floats, [&](const char* name, const auto& e, const auto&... bindings) {
        CHECK(check_backward(*dev, name, e, 1e-4, both, bindings...));
    });
    // a factor of one value per key: a message naming it
    af::testing::with_per_key_factor(random_floats, [&](const auto& per_key_bias, const auto&... bindings) {
        const af::tensor out = rounded(af::reference::evaluate(per_key_bias, bindings...));
        CHECK_THROWS_WITH(vk::backward(*dev, per_key_bias, out, out, bindings...),
                          Catch::Contains("bias factor c") && Catch::Contains("bound 1 x 41"));
    });
}

TEST_CASE("the Vulkan backward of a multi-head layer: projections of the operands and the output projection", "[vulkan][backward]") {
    vk::device* dev = shared_device();
    if (!dev) return;
    const std::vector<execution> both{execution::fused, execution::unfused};
    af::testing::for_each_layer_case(9, 13, random_floats, [&](const char* name, const auto& e, const auto&... bindings) {
        CHECK(check_backward(*dev, name, e, 1e-4, both, bindings...));
        const af::tensor output = rounded(af::reference::evaluate(e, bindings...));
        af::tensor wrong = output;
        wrong.rows += 1;
        wrong.values.resize(wrong.batch * wrong.heads * wrong.rows * wrong.cols);
        CHECK_THROWS_AS(vk::backward(*dev, e, output, wrong, bindings...), af::shape_error);
    });
}

TEST_CASE("the Vulkan backward of hard attention sends each row's dO to the value row it chose", "[vulkan][backward]") {
    vk::device* dev = shared_device();
    if (!dev) return;
    // four query heads over two K/V heads, whole-number scores with many ties (the lowest key
    // wins), queries 0 and 1 with every key masked, and V bound in host memory or on the device
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    using inputs = af::testing::hard_attention_inputs;
    constexpr std::size_t batch = inputs::batch, heads = inputs::heads, kv_heads = inputs::kv_heads, d = inputs::d, n_q = inputs::n_q,
                          n_k = inputs::n_k, d_v = inputs::d_v;
    const inputs in(random_floats);
    const std::vector<float>&q = in.q, &k = in.k, &v = in.v;
    const auto bq = af::bind(Q, af::col_major(q.data(), d, n_q, batch, heads));
    const auto bk = af::bind(K, af::col_major(k.data(), d, n_k, batch, kv_heads));
    const auto v_view = af::row_major(v.data(), n_k, d_v, batch, kv_heads);
    const auto bv = af::bind(V, v_view);
    const vk::device_tensor values(*dev, v_view, "V");
    const auto e = af::hard(af::mask(Q^af::T*K, af::i >= 2)) * V;
    const af::tensor output = rounded(af::reference::evaluate(e, bq, bk, bv));
    af::tensor d_output = output;
    d_output.values = random_floats(d_output.values.size(), 44);
    const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                            std::vector<double>(d_output.values.begin(), d_output.values.end())};
    const af::reference::gradients expected = af::reference::backward(e, d_reference, bq, bk, bv);
    for (const execution mode : {execution::fused, execution::unfused}) {
        INFO((mode == execution::fused ? "fused" : "unfused"));
        for (const af::backward_result& got : {vk::backward(*dev, e, output, d_output, vk::options{mode}, bq, bk, bv),
                                               vk::backward(*dev, e, output, d_output, vk::options{mode}, bq, bk, vk::bind_resident(V, values))}) {
            CHECK(got.without == std::vector<std::string>{"Q", "K"});
            CHECK(got.of("V").heads == kv_heads);
            CHECK(af::variants::relative_error(expected.of("V").values, got.of("V").values) <= 1e-6);
            if (mode == execution::fused) CHECK(got.info.score_bytes == 0);
            else CHECK(got.info.score_bytes > 0);
        }
    }
}

TEST_CASE("the Vulkan backward reads a training forward's statistics", "[vulkan][backward][training]") {
    vk::device* dev = shared_device();
    if (!dev) return;
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const small_inputs in(31);
    const auto bq = in.bind_q();
    const auto bk = in.bind_k();
    const auto bv = in.bind_v();
    // queries 0 to 2 keep no key: their statistics are -inf and 0
    const auto e = af::softmax(af::mask(af::mask(af::scale(Q^af::T*K), af::causal), af::i >= 3)) * V;
    const af::training_result training = af::cpu::run_for_training(e, bq, bk, bv);
    CHECK(training.statistics.max[0] == -std::numeric_limits<float>::infinity());
    af::tensor d_output = training.output;
    d_output.values = random_floats(d_output.values.size(), 34);
    const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                            std::vector<double>(d_output.values.begin(), d_output.values.end())};
    const af::reference::gradients expected = af::reference::backward(e, d_reference, bq, bk, bv);
    const af::backward_result got = vk::backward(*dev, e, training, d_output, bq, bk, bv);
    CHECK(std::any_of(got.info.kernels.begin(), got.info.kernels.end(),
                      [](const std::string& k) { return k.find("the forward's max and sum") != std::string::npos; }));
    CHECK(std::none_of(got.info.kernels.begin(), got.info.kernels.end(),
                       [](const std::string& k) { return k.find("over every key, and D") != std::string::npos; }));
    for (const char* name : {"Q", "K", "V"}) {
        INFO("gradient of " << name);
        const af::tensor& have = got.of(name);
        for (float x : have.values) CHECK(std::isfinite(x));
        CHECK(af::variants::relative_error(expected.of(name).values, have.values) <= 1e-4);
    }
    af::training_result wrong = training;
    wrong.statistics.heads = 1;
    CHECK_THROWS_AS(vk::backward(*dev, e, wrong, d_output, bq, bk, bv), af::shape_error);
}

// The Vulkan training forward: the output with each row's statistics, which
// the fused kernel keeps through its keys' shares (one or several) and the
// unfused softmax kernel writes, against the reference, in both modes; the
// backward of both backends given them; and merge_attentions of the
// attentions over two halves of the keys against the whole.
TEST_CASE("the Vulkan training forward keeps each row's statistics, fused and unfused", "[vulkan][backward][training]") {
    vk::device* dev = shared_device();
    if (!dev) return;
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const small_inputs in(41);
    const auto bq = in.bind_q();
    const auto bk = in.bind_k();
    const auto bv = in.bind_v();
    const std::size_t batch = small_inputs::batch, heads = small_inputs::heads, d = small_inputs::d, n_k = small_inputs::n_k,
                      d_v = small_inputs::d_v;
    const std::vector<float>&k = in.k, &v = in.v;
    // K and V of one head, which both query heads share (grouped-query attention)
    const auto bk_shared = af::bind(K, af::col_major(k.data(), d, n_k, batch, 1));
    const auto bv_shared = af::bind(V, af::row_major(v.data(), n_k, d_v, batch, 1));

    auto check = [&](const std::string& name, const auto& e, const auto&... bindings) {
        INFO(name);
        const af::reference::result want = af::reference::evaluate(e, bindings...);
        af::tensor d_output = rounded(want);
        d_output.values = random_floats(d_output.values.size(), 44);
        const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                                std::vector<double>(d_output.values.begin(), d_output.values.end())};
        const af::reference::gradients expected = af::reference::backward(e, d_reference, bindings...);
        for (const execution mode : {execution::fused, execution::unfused})
            for (const std::size_t splits : {std::size_t{1}, std::size_t{3}}) {
                if (mode == execution::unfused && splits > 1) continue;
                INFO((mode == execution::fused ? "fused, keys in " + std::to_string(splits) + " shares" : std::string("unfused")));
                const af::training_result training = vk::run_for_training(*dev, e, vk::options{.mode = mode, .key_splits = splits}, bindings...);
                CHECK(af::variants::relative_error(want.values, training.output.values) <= 1e-5);
                af::testing::check_statistics(training.statistics, e, 1e-5, bindings...);
                CHECK(std::any_of(training.info.kernels.begin(), training.info.kernels.end(),
                                  [](const std::string& k) { return k.find("row statistics of the training forward") != std::string::npos; }));
                const af::backward_result on_vulkan = vk::backward(*dev, e, training, d_output, bindings...);
                const af::backward_result on_cpu = af::cpu::backward(e, training, d_output, bindings...);
                for (const af::reference::input_gradient& g : expected.inputs) {
                    INFO("gradient of " << g.name);
                    CHECK(af::variants::relative_error(g.values, on_vulkan.of(g.name).values) <= 1e-4);
                    CHECK(af::variants::relative_error(g.values, on_cpu.of(g.name).values) <= 1e-4);
                }
            }
    };
    // queries 0 to 2 keep no key: their statistics are -inf and 0
    check("causal, the first rows fully masked", af::softmax(af::mask(af::mask(af::scale(Q^af::T*K), af::causal), af::i >= 3)) * V, bq, bk, bv);
    check("soft-capped, grouped-query", af::softmax(3 * af::tanh(Q^af::T*K / 3)) * V, bq, bk_shared, bv_shared);
    check("dropout", af::dropout(af::softmax(af::scale(Q^af::T*K)), 0.25, 9) * V, bq, bk, bv);

    // two halves of the keys, run apart and merged, against the whole
    const auto e = af::softmax(af::scale(Q^af::T*K)) * V;
    const std::size_t first_keys = 20, second_keys = n_k - first_keys;
    std::vector<float> k1, k2, v1, v2;
    for (std::size_t m = 0; m < batch * heads; ++m) {
        k1.insert(k1.end(), k.begin() + static_cast<std::ptrdiff_t>(m * d * n_k), k.begin() + static_cast<std::ptrdiff_t>(m * d * n_k + d * first_keys));
        k2.insert(k2.end(), k.begin() + static_cast<std::ptrdiff_t>(m * d * n_k + d * first_keys), k.begin() + static_cast<std::ptrdiff_t>((m + 1) * d * n_k));
        v1.insert(v1.end(), v.begin() + static_cast<std::ptrdiff_t>(m * n_k * d_v), v.begin() + static_cast<std::ptrdiff_t>(m * n_k * d_v + first_keys * d_v));
        v2.insert(v2.end(), v.begin() + static_cast<std::ptrdiff_t>(m * n_k * d_v + first_keys * d_v), v.begin() + static_cast<std::ptrdiff_t>((m + 1) * n_k * d_v));
    }
    const af::training_result whole = vk::run_for_training(*dev, e, bq, bk, bv);
    const af::training_result merged = af::merge_attentions(
        vk::run_for_training(*dev, e, bq, af::bind(K, af::col_major(k1.data(), d, first_keys, batch, heads)),
                             af::bind(V, af::row_major(v1.data(), first_keys, d_v, batch, heads))),
        vk::run_for_training(*dev, e, vk::options{af::execution::unfused}, bq, af::bind(K, af::col_major(k2.data(), d, second_keys, batch, heads)),
                             af::bind(V, af::row_major(v2.data(), second_keys, d_v, batch, heads))));
    CHECK(af::variants::relative_error(std::vector<double>(whole.output.values.begin(), whole.output.values.end()), merged.output.values) <= 1e-5);
    for (std::size_t row = 0; row < whole.statistics.max.size(); ++row) {
        CHECK(merged.statistics.max[row] == Approx(whole.statistics.max[row]).epsilon(1e-5));
        CHECK(merged.statistics.sum[row] == Approx(whole.statistics.sum[row]).epsilon(1e-5));
    }
}
