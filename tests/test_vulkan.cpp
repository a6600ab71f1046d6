// The Vulkan backend, fused and unfused, against the double-precision
// reference and against the CPU, on the default device (lavapipe in CI) with
// the validation layers on: a validation message fails the test.
//
// Error measure: max |vulkan - reference| / max(1, max |reference|); fp32
// tolerance 1e-4 (1e-2 for scores near 1e4, whose fp32 rounding softmax
// passes on).
#include <attnfuse/cpu.hpp>
#include <attnfuse/vulkan/executor.hpp>
#include <catch2/catch.hpp>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <set>
#include <unistd.h>

#include "every_operation.hpp"
#include "element_storage.hpp"
#include "multihead_layer.hpp"
#include "variants.hpp"
#include "vulkan_test_device.hpp"

namespace af = attnfuse;
namespace vk = attnfuse::vulkan;

namespace {

double relative_error(const std::vector<double>& ref, const std::vector<float>& out) {
    REQUIRE(out.size() == ref.size());
    return af::variants::relative_error(ref, out);
}

using attnfuse::vulkan::testing::shared_device;
using Catch::Matchers::Contains;

}  // namespace

// One test body for every backend: each gets the same expression, options and
// bindings through the shared run_options and report, and the same checks.
template <class F>
void for_each_backend(vk::device& dev, F&& f) {
    f("cpu", [](const auto& e, const af::run_options& o, const auto&... b) { return af::cpu::run(e, o, b...); });
    f("vulkan", [&dev](const auto& e, const af::run_options& o, const auto&... b) { return vk::run(dev, e, o, b...); });
}

// The planned kernels a report lists: besides them, Vulkan may add the merge
// of key shares and a copy to the output.
std::size_t planned_kernels_run(const af::report& info) {
    return static_cast<std::size_t>(std::count_if(info.kernels.begin(), info.kernels.end(), [](const std::string& k) {
        return k != "merge of the key shares" && k != "copy to the output";
    }));
}

// a fused attention fell back to separate kernels (a note says why)
bool ran_unfused(const af::report& info) {
    return std::any_of(info.notes.begin(), info.notes.end(), [](const std::string& n) { return n.find("ran unfused") != std::string::npos; });
}

TEST_CASE("every variant runs fused and unfused on Vulkan and agrees with the reference and the CPU", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    const af::variants::shape shapes[] = {{2, 2, 7, 13, 5, 3}, {1, 2, 33, 65, 31, 7}, {2, 1, 1, 3, 1, 1}};
    for (const auto& s : shapes) {
        af::variants::for_each(s, [&](const af::variants::variant& v, const auto& e, const auto&... bindings) {
            using E = std::remove_cvref_t<decltype(e)>;
            const double tolerance = v.name.find("1e4") != std::string::npos ? 1e-2 : 1e-4;
            const auto ref = af::reference::evaluate(e, bindings...);
            const auto cpu_run = af::cpu::run(e, bindings...);
            const auto& cpu = cpu_run.output;
            // a run whose weights were rounded to bf16 (the CPU's bf16 products) is held to that rounding
            const double cpu_tolerance = af::variants::tolerance_of_run(tolerance, cpu_run.info);
            for_each_backend(*dev, [&](const char* backend, const auto& run) {
                for (const auto mode : {af::execution::fused, af::execution::unfused}) {
                    INFO(v.name << " | " << af::to_string(e) << " | " << backend << (mode == af::execution::fused ? " fused" : " unfused"));
                    const auto [out, info] = run(e, af::run_options{mode}, bindings...);
                    const double run_tolerance = af::variants::tolerance_of_run(tolerance, info);
                    CHECK(relative_error(ref.values, out.values) <= run_tolerance);
                    if (mode == af::execution::fused) CHECK(info.score_bytes == 0);
                    else if (s.n_q > 1 && s.n_k > 1) CHECK(info.score_bytes > 0);
                    // the kernels that ran are the plan's, on every backend (a noted fallback aside)
                    const std::size_t planned = mode == af::execution::fused ? af::plan::kernel_count<E, af::plan::mode::fused>
                                                                             : af::plan::kernel_count<E, af::plan::mode::unfused>;
                    if (!ran_unfused(info)) CHECK(planned_kernels_run(info) == planned);
                    std::vector<double> cpu_values(cpu.values.begin(), cpu.values.end());
                    CHECK(relative_error(cpu_values, out.values) <= std::max(run_tolerance, cpu_tolerance));
                    CHECK(dev->validation_messages() == 0);
                    INFO(dev->last_validation_message());
                }
            });
        });
    }
}

TEST_CASE("Vulkan: inputs stored as f16 and bf16 agree with the reference and stay within their format's error", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    af::testing::check_element_storage([dev](const auto& e, const af::run_options& o, const auto&... b) { return vk::run(*dev, e, o, b...); },
                                       af::testing::stored_reads::every_kernel);
    CHECK(dev->validation_messages() == 0);
}

TEST_CASE("run_into on Vulkan rounds the result into a bf16 output, and refuses a wrong shape", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::size_t d = 5, n_q = 7, n_k = 9, d_v = 3;
    std::vector<float> q(d * n_q), k(d * n_k), v(n_k * d_v);
    for (std::size_t n = 0; n < q.size(); ++n) q[n] = std::sin(0.7 * double(n));
    for (std::size_t n = 0; n < k.size(); ++n) k[n] = std::cos(0.3 * double(n));
    for (std::size_t n = 0; n < v.size(); ++n) v[n] = std::sin(1.1 * double(n) + 0.5);
    const auto qb = af::bind(Q, af::row_major(q.data(), d, n_q));
    const auto kb = af::bind(K, af::row_major(k.data(), d, n_k));
    const auto vb = af::bind(V, af::row_major(v.data(), n_k, d_v));
    const auto e = softmax(scale(Q^af::T*K))*V;
    const auto ref = af::reference::evaluate(e, qb, kb, vb);
    std::vector<af::bfloat16> out(n_q * d_v);
    const af::report info = vk::run_into(*dev, e, af::output_row_major(out.data(), n_q, d_v), qb, kb, vb);
    for (std::size_t n = 0; n < out.size(); ++n)
        CHECK(std::abs(double(af::to_float(out[n])) - ref.values[n]) <= af::unit_roundoff<af::bfloat16> * std::abs(ref.values[n]) + 1e-4);
    CHECK_THAT(info.notes.back(), Catch::Matchers::Contains("output: stored as bf16"));
    CHECK_THROWS_WITH(vk::run_into(*dev, e, af::output_row_major(out.data(), d_v, n_q), qb, kb, vb),
                      Catch::Matchers::Contains("output: the expression gives 1 batch x 1 heads of 7x3 but the output is 1 batch x 1 heads of 3x7"));
}

TEST_CASE("Vulkan: nn.MultiheadAttention as one expression agrees with a plain-loop module", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    const auto on_vulkan = [dev](const auto& e, const af::run_options& o, const auto&... b) { return vk::run(*dev, e, o, b...); };
    af::testing::check_multihead_layer(on_vulkan);
    af::testing::check_multihead_layer_edges(on_vulkan);
    CHECK(dev->validation_messages() == 0);
}

TEST_CASE("Vulkan: every elementwise operation's GLSL face agrees with the reference at awkward inputs", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    af::testing::check_every_operation([&](const auto& e, const auto&... bindings) {
        return vk::run(*dev, e, bindings...).output.values;
    });
    CHECK(dev->validation_messages() == 0);
}

TEST_CASE("Vulkan: fully masked rows are zero, a NaN query spoils only its row, a broadcast score is whole", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::variants::input_store in(44);
    const std::size_t n = 37, d = 9;
    const float* random_queries = in.random(d * n);
    std::vector<float> qdata(random_queries, random_queries + d * n);
    qdata[d * 25 + 2] = std::nanf("");  // query 25 (queries below 20 see no key)
    auto q = af::bind(Q, af::col_major(qdata.data(), d, n));
    auto k = af::bind(K, af::col_major(in.random(d * n), d, n));
    auto v = af::bind(V, af::row_major(in.random(n * d), n, d));
    for (const auto mode : {vk::execution::fused, vk::execution::unfused}) {
        const auto out = vk::run(*dev, softmax(mask(scale(Q^af::T*K), af::i >= 20 && af::causal))*V, vk::options{mode}, q, k, v).output;
        for (std::size_t r = 0; r < n; ++r)
            for (std::size_t c = 0; c < d; ++c) {
                INFO("row " << r);
                CHECK(std::isnan(out.at(0, 0, r, c)) == (r == 25));
                if (r < 20) CHECK(out.at(0, 0, r, c) == 0.0f);
            }
    }
    af::matrix<"B"> B;
    auto q1 = af::bind(Q, af::col_major(in.random(4), 4, 1));
    auto k5 = af::bind(K, af::col_major(in.random(20), 4, 5));
    auto v5 = af::bind(V, af::row_major(in.random(10), 5, 2));
    auto b = af::bind(B, af::row_major(in.random(15), 3, 5));
    const auto e = softmax(Q^af::T*K + B)*V;
    const auto ref = af::reference::evaluate(e, q1, k5, v5, b);
    for (const auto mode : {vk::execution::fused, vk::execution::unfused})
        CHECK(relative_error(ref.values, vk::run(*dev, e, vk::options{mode}, q1, k5, v5, b).output.values) <= 1e-4);
    CHECK(dev->validation_messages() == 0);
}

TEST_CASE("Vulkan: every generated shader passes spirv-val; a second device reads SPIR-V from the disk cache", "[vulkan]") {
    if (!shared_device()) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    const auto dump = std::filesystem::temp_directory_path() / ("attnfuse-dump-" + std::to_string(::getpid()));
    ::setenv("ATTNFUSE_DUMP_SHADERS", dump.c_str(), 1);
    {
        vk::device fresh;  // a new device compiles (or loads) and dumps every kernel it meets
        af::variants::for_each(af::variants::shape{2, 2, 5, 9, 3, 2}, [&](const af::variants::variant&, const auto& e, const auto&... b) {
            for (const auto mode : {vk::execution::fused, vk::execution::unfused}) (void)vk::run(fresh, e, vk::options{mode}, b...);
        });
    }
    ::unsetenv("ATTNFUSE_DUMP_SHADERS");
    std::size_t checked = 0;
    for (const auto& entry : std::filesystem::directory_iterator(dump)) {
        if (entry.path().extension() != ".spv") continue;
        INFO(entry.path());
        CHECK(std::system((std::string(ATTNFUSE_SPIRV_VAL) + " --target-env vulkan1.1 " + entry.path().string()).c_str()) == 0);
        ++checked;
    }
    CHECK(checked >= 8);  // pointwise, product, softmax, hard, reductions, pairwise, fused, copy at least
    std::filesystem::remove_all(dump);

    // a new device is a new process as far as compilation goes
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::vector<float> data(64, 0.25f);
    vk::device second;
    const auto r = vk::run(second, softmax(scale(Q^af::T*K))*V, af::bind(Q, data.data(), 4, 4), af::bind(K, data.data(), 4, 4),
                           af::bind(V, data.data(), 4, 4));
    CHECK(r.info.spirv_from_disk_cache);
    CHECK(r.info.dispatches == 1);
}

TEST_CASE("dropout draws the same mask on the CPU and on Vulkan, at the expected keep rate", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::variants::input_store in(88);
    const std::size_t batch = 2, heads = 3, n_q = 57, n_k = 91, d = 8;
    auto q = af::bind(Q, af::col_major(in.random(batch * heads * d * n_q), d, n_q, batch, heads));
    auto k = af::bind(K, af::col_major(in.random(batch * heads * d * n_k), d, n_k, batch, heads));
    const double p = 0.3;
    const auto weights = dropout(softmax(scale(Q^af::T*K)), p, 4242);  // the weights themselves, n_q x n_k
    const auto on_cpu = af::cpu::run(weights, q, k).output;
    const auto on_gpu = vk::run(*dev, weights, q, k).output;
    REQUIRE(on_cpu.values.size() == on_gpu.values.size());
    std::size_t kept = 0, differ = 0;
    for (std::size_t n = 0; n < on_cpu.values.size(); ++n) {
        kept += on_cpu.values[n] != 0.0f;
        differ += (on_cpu.values[n] != 0.0f) != (on_gpu.values[n] != 0.0f);
    }
    CHECK(differ == 0);
    // keep rate 1 - p within 5 standard deviations of a binomial
    const double total = static_cast<double>(on_cpu.values.size()), rate = static_cast<double>(kept) / total;
    CHECK(std::abs(rate - (1 - p)) <= 5 * std::sqrt(p * (1 - p) / total));
    // and another seed draws another mask
    const auto other = af::cpu::run(dropout(softmax(scale(Q^af::T*K)), p, 4243), q, k).output;
    std::size_t changed = 0;
    for (std::size_t n = 0; n < other.values.size(); ++n) changed += (other.values[n] != 0.0f) != (on_cpu.values[n] != 0.0f);
    CHECK(changed > other.values.size() / 4);
}

TEST_CASE("Vulkan fused tiles at odd sizes: partial tiles, skipped tiles, deep and wide heads, per-batch lengths", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"L"> L;
    using af::i;
    using af::j;
    af::variants::input_store in(71);
    // d crosses the 32-deep staging steps, d_v the 64-column value steps
    const std::size_t depths[][2] = {{1, 1}, {33, 65}, {17, 130}, {7, 256}};
    std::size_t case_index = 0;
    for (const std::size_t n : {1, 3, 31, 33, 65, 127, 257}) {
        const auto [d, dv] = depths[case_index++ % 4];
        const std::size_t batch = 2, heads = 1, n_q = n, n_k = n + 2;
        auto q = af::bind(Q, af::col_major(in.random(batch * heads * d * n_q), d, n_q, batch, heads));
        auto k = af::bind(K, af::col_major(in.random(batch * heads * d * n_k), d, n_k, batch, heads));
        auto v = af::bind(V, af::row_major(in.random(batch * heads * n_k * dv), n_k, dv, batch, heads));
        const std::vector<float> lengths{static_cast<float>(n_k / 3), static_cast<float>(n_k)};
        auto l = af::bind(L, af::row_major(lengths.data(), 1, 1, batch));
        auto check = [&](const char* what, const auto& e, const auto&... bindings) {
            INFO(what << " n " << n << " d " << d << " d_v " << dv << " | " << af::to_string(e));
            const auto ref = af::reference::evaluate(e, bindings...);
            vk::options one_share{vk::execution::fused};
            one_share.key_splits = 1;  // the one-dispatch kernel on every device (shares: the next test)
            const auto [out, info] = vk::run(*dev, e, one_share, bindings...);
            CHECK(info.dispatches == 1);
            CHECK(info.score_bytes == 0);
            CHECK(relative_error(ref.values, out.values) <= 1e-4);
        };
        check("sdpa", softmax(scale(Q^af::T*K))*V, q, k, v);
        check("causal", softmax(mask(scale(Q^af::T*K), af::causal))*V, q, k, v);
        check("sliding window", softmax(mask(scale(Q^af::T*K), af::window(40)))*V, q, k, v);
        check("local-m", softmax(mask(scale(Q^af::T*K), abs(j - i) <= 2))*V, q, k, v);
        check("key lengths per batch", softmax(mask(scale(Q^af::T*K), af::key_lengths(L)))*V, q, k, v, l);
        // a limit per query (a column): the host reads it over each tile's queries
        std::vector<float> limits(n_q);
        for (std::size_t r = 0; r < n_q; ++r) limits[r] = static_cast<float>(r / 2);
        af::matrix<"C"> C;
        check("key limit per query", softmax(mask(scale(Q^af::T*K), j <= C))*V, q, k, v, af::bind(C, af::row_major(limits.data(), n_q, 1)));
        check("hard", hard(mask(Q^af::T*K, af::causal))*V, q, k, v);
        const auto x = where(af::causal, exp(scale(Q^af::T*K)), 0);
        check("ratio", x / (row_sum(x) + 1e-6) * V, q, k, v);
    }
    CHECK(dev->validation_messages() == 0);
}

TEST_CASE("Vulkan: inputs already on the device, output left on the device", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::variants::input_store in(72);
    const std::size_t batch = 2, heads = 3, n = 45, d = 11;
    const auto qv = af::col_major(in.random(batch * heads * d * n), d, n, batch, heads);
    const auto kv = af::col_major(in.random(batch * heads * d * n), d, n, batch, heads);
    const auto vv = af::row_major(in.random(batch * heads * n * d), n, d, batch, heads);
    const auto e = softmax(mask(scale(Q^af::T*K), af::causal))*V;
    const auto ref = af::reference::evaluate(e, af::bind(Q, qv), af::bind(K, kv), af::bind(V, vv));

    const vk::device_tensor keys(*dev, kv, "K"), values(*dev, vv, "V");  // a KV cache that stays on the device
    for (const auto mode : {vk::execution::fused, vk::execution::unfused}) {
        auto [kept, info] = vk::run_on_device(*dev, e, vk::options{mode}, af::bind(Q, qv), vk::bind_resident(K, keys),
                                              vk::bind_resident(V, values));
        CHECK(kept.rows() == n);
        CHECK(kept.cols() == d);
        CHECK(kept.batch() == batch);
        CHECK(kept.heads() == heads);
        CHECK(relative_error(ref.values, kept.download().values) <= 1e-4);
        // the kept output is the values of a second run: out * out^T... here, softmax(Q^T K) * out
        const auto again = vk::run(*dev, softmax(mask(scale(Q^af::T*K), af::causal))*V, vk::options{mode}, af::bind(Q, qv),
                                   vk::bind_resident(K, keys), vk::bind_resident(V, kept));
        const auto out_host = kept.download();
        const auto ref2 = af::reference::evaluate(e, af::bind(Q, qv), af::bind(K, kv),
                                                  af::bind(V, af::row_major(out_host.values.data(), n, d, batch, heads)));
        CHECK(relative_error(ref2.values, again.output.values) <= 1e-4);
    }
    // a resident input's shape is checked like a host one's
    af::matrix<"K", 11, af::dyn> K11;
    const vk::device_tensor wrong(*dev, af::col_major(in.random(5 * n), 5, n), "K of depth 5");
    CHECK_THROWS_AS(vk::run(*dev, softmax(scale(Q^af::T*K11))*V, af::bind(Q, qv), vk::bind_resident(K11, wrong), af::bind(V, vv)),
                    af::shape_error);
    CHECK(dev->validation_messages() == 0);
}

// The fused shader's text is a constant expression of the expression's type.
namespace shader_text {
af::matrix<"Q"> Q;
af::matrix<"K"> K;
af::matrix<"V"> V;
af::matrix<"m"> m;
using af::i;
using af::j;
using sdpa = decltype(softmax(scale(Q^af::T*K))*V);
using softcapped = decltype(softmax(30 * tanh(scale(Q^af::T*K) / 30))*V);
using alibi = decltype(softmax(mask(scale(Q^af::T*K) - m * (i - j), af::causal))*V);
using hard_causal = decltype(hard(mask(Q^af::T*K, af::causal))*V);
// scale(core) is folded onto the queries (the planner's epilogue.hpp): the epilogue reads the score as it is
static_assert(vk::fused_shader_source<sdpa>().find("float epilogue(float s, uint b, uint h, uint bh, uint i, uint j) { return s; }") !=
              std::string::npos);
static_assert(vk::fused_shader_source<sdpa>().find("#define AF_QUERY_SCALE 1u") != std::string::npos);  // after post_factor's 1
static_assert(vk::fused_shader_source<sdpa>().find("#define AF_SOFTMAX") != std::string::npos);
static_assert(vk::fused_shader_source<softcapped>().find("af_tanh(") != std::string::npos);
static_assert(vk::fused_shader_source<softcapped>().find("#define NUM_OPERANDS 3u") != std::string::npos);
// ALiBi's slopes are the fourth operand, read at (b, h, i, j)
static_assert(vk::fused_shader_source<alibi>().find("ld3(b, h, i, j)") != std::string::npos);
static_assert(vk::fused_shader_source<alibi>().find("#define NUM_OPERANDS 4u") != std::string::npos);
static_assert(vk::fused_shader_source<hard_causal>().find("#define AF_HARD") != std::string::npos);
static_assert(vk::fused_shader_source<hard_causal>().find("af_select(") != std::string::npos);
// Tiles whose masks keep everything run the epilogue without them
// (epilogue_unmasked), its operands and numbers numbered as the whole one's.
af::matrix<"L"> L;
using windowed_capped = decltype(softmax(mask(30 * tanh(scale(Q^af::T*K) / 30), af::window(3)))*V);
using padded_alibi = decltype(softmax(mask(scale(Q^af::T*K) - m * (i - j), j < L))*V);
template <class E>
constexpr std::string unmasked_epilogue() {
    const std::string text = vk::fused_shader_source<E>();
    const std::size_t at = text.find("float epilogue_unmasked(float s");
    if (at == std::string::npos) return "(none)";
    return text.substr(at, text.find('\n', at) - at);
}
static_assert(unmasked_epilogue<sdpa>() == "(none)");  // no mask, nothing to strip
static_assert(unmasked_epilogue<alibi>().find("{ return (s - (ld3(b, h, i, j) * (float(i) - float(j)))); }") != std::string::npos);
// the window's width is NUM(0): the cap reads NUM(1) and NUM(2) stripped or not
static_assert(unmasked_epilogue<windowed_capped>().find("NUM(1u) * af_tanh((s / NUM(2u)))") != std::string::npos);
static_assert(unmasked_epilogue<windowed_capped>().find("NUM(0u)") == std::string::npos);
// the lengths L are ld3, read by the condition only: the slopes stay ld4
static_assert(unmasked_epilogue<padded_alibi>().find("ld4(b, h, i, j)") != std::string::npos);
static_assert(unmasked_epilogue<padded_alibi>().find("ld3") == std::string::npos);
static_assert(vk::fused_shader_source<padded_alibi>().find("#define AF_UNMASKED") != std::string::npos);
}  // namespace shader_text

TEST_CASE("Vulkan: tiles whose masks keep everything run the epilogue without them, and agree", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    using namespace shader_text;
    af::variants::input_store in(91);
    // tiles of 16 queries x 32 keys: full, partial and dead ones, and a last
    // partial tile each way; two batch entries with other lengths
    const std::size_t batch = 2, heads = 2, n_q = 50, n_k = 97, d = 7;
    const auto q = af::bind(Q, af::col_major(in.random(batch * heads * d * n_q), d, n_q, batch, heads));
    const auto k = af::bind(K, af::col_major(in.random(batch * heads * d * n_k), d, n_k, batch, heads));
    const auto v = af::bind(V, af::row_major(in.random(batch * heads * n_k * d), n_k, d, batch, heads));
    const std::vector<float> slopes{0.25f, 0.0625f}, lengths{97.0f, 40.0f};
    const auto slope = af::bind(m, af::row_major(slopes.data(), 1, 1, 1, heads));
    const auto length = af::bind(L, af::row_major(lengths.data(), 1, 1, batch));
    auto agree = [&](const auto& e, const auto&... bindings) {
        INFO(af::to_string(e));
        const auto ref = af::reference::evaluate(e, bindings...);
        const auto [out, info] = vk::run(*dev, e, bindings...);
        CHECK(relative_error(ref.values, out.values) <= 1e-4);
        CHECK(info.score_bytes == 0);
    };
    agree(softmax(mask(30 * tanh(scale(Q^af::T*K) / 30), af::window(40)))*V, q, k, v);
    agree(softmax(mask(scale(Q^af::T*K) - m * (i - j), j < L && af::causal))*V, q, k, v, slope, length);
    CHECK(dev->validation_messages() == 0);
}

TEST_CASE("the fused shader text a static_assert reads is the text that runs", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    using namespace shader_text;
    const auto dump = std::filesystem::temp_directory_path() / ("attnfuse-text-" + std::to_string(::getpid()));
    ::setenv("ATTNFUSE_DUMP_SHADERS", dump.c_str(), 1);
    af::variants::input_store in(73);
    const std::size_t n = 19, d = 5;
    const std::vector<float> slopes{0.5f};
    vk::fused_design design = vk::fused_design::automatic;
    {
        vk::device fresh;  // compiles (or loads) and dumps what it runs
        design = fresh.design();
        (void)vk::run(fresh, softmax(mask(scale(Q^af::T*K) - m * (i - j), af::causal))*V, af::bind(Q, af::col_major(in.random(d * n), d, n)),
                      af::bind(K, af::col_major(in.random(d * n), d, n)), af::bind(V, af::row_major(in.random(n * d), n, d)),
                      af::bind(m, af::row_major(slopes.data(), 1, 1)));
    }
    ::unsetenv("ATTNFUSE_DUMP_SHADERS");
    bool found = false;
    for (const auto& entry : std::filesystem::directory_iterator(dump)) {
        if (entry.path().extension() != ".comp" || entry.path().filename().string().rfind("fused_attention", 0) != 0) continue;
        std::ifstream in_file(entry.path());
        const std::string text((std::istreambuf_iterator<char>(in_file)), std::istreambuf_iterator<char>());
        // f32 inputs: a device whose automatic design is matrix tiles runs them staged
        CHECK(text == vk::fused_shader_source<alibi>(design == vk::fused_design::matrix_tiles ? vk::fused_design::staged_tiles : design));
        found = true;
    }
    CHECK(found);
    std::filesystem::remove_all(dump);
}

TEST_CASE("Vulkan fused attention with its keys split over workgroups agrees with the reference", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"L"> L;
    af::matrix<"G"> G;
    af::variants::input_store in(74);
    for (const std::size_t n_k : {65, 257}) {
        const std::size_t batch = 2, heads = 2, n_q = n_k == 65 ? 1 : 37, d = 19, dv = 70;
        auto q = af::bind(Q, af::col_major(in.random(batch * heads * d * n_q), d, n_q, batch, heads));
        auto k = af::bind(K, af::col_major(in.random(batch * heads * d * n_k), d, n_k, batch, heads));
        auto v = af::bind(V, af::row_major(in.random(batch * heads * n_k * dv), n_k, dv, batch, heads));
        auto g = af::bind(G, af::row_major(in.random(n_q * n_k), n_q, n_k));
        const std::vector<float> lengths{0.0f, static_cast<float>(n_k / 3)};  // batch 0: every key masked
        auto l = af::bind(L, af::row_major(lengths.data(), 1, 1, batch));
        for (const std::size_t splits : {2, 3, 5}) {
            auto check = [&](const char* what, const auto& e, const auto&... bindings) {
                INFO(what << " n_k " << n_k << " splits " << splits << " | " << af::to_string(e));
                const auto ref = af::reference::evaluate(e, bindings...);
                vk::options split{vk::execution::fused};
                split.key_splits = splits;
                const auto [out, info] = vk::run(*dev, e, split, bindings...);
                CHECK(info.dispatches == 2);
                CHECK(info.score_bytes == 0);
                CHECK(relative_error(ref.values, out.values) <= 1e-4);
            };
            check("sdpa", softmax(scale(Q^af::T*K))*V, q, k, v);
            check("causal", softmax(mask(scale(Q^af::T*K), af::causal))*V, q, k, v);
            check("key lengths", softmax(mask(scale(Q^af::T*K), af::key_lengths(L)))*V, q, k, v, l);
            check("hard", hard(mask(Q^af::T*K, af::window(20)))*V, q, k, v);
            check("dropout", dropout(softmax(scale(Q^af::T*K)), 0.2, 99)*V, q, k, v);
            check("post factor", (softmax(scale(Q^af::T*K)) % G)*V, q, k, v, g);
            const auto x = where(af::causal, exp(scale(Q^af::T*K)), 0);
            check("ratio", x / (row_sum(x) + 0.5) * V, q, k, v);
        }
    }
    CHECK(dev->validation_messages() == 0);
}

TEST_CASE("Vulkan: the fused kernel runs the tile shape its device was opened with (specialization constants)", "[vulkan]") {
    vk::device* shared = shared_device();
    if (!shared) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    // unlike the default on every axis: half the queries and keys, two lanes,
    // an odd depth step (its staging loops end unevenly over the lanes), and
    // queries resident up to depth 24 only
    const vk::fused_tile small{.queries = 8, .keys = 16, .lanes = 2, .depth_step = 7, .value_columns = 32, .resident_depth = 24};
    REQUIRE(small.violation().empty());
    vk::device dev(shared->info(), vk::device_options{.validation = true, .tile = small, .design = vk::fused_design::staged_tiles});
    REQUIRE(dev.tile() == small);
    REQUIRE(dev.design() == vk::fused_design::staged_tiles);
    SECTION("variants of every normaliser, against the reference") {
        const std::set<std::string> chosen = {"scaled dot product", "causal", "hard (one-hot argmax)",
                                              "masked softmax (lengths, one batch fully masked)",
                                              "sigmoid attention (causal, b = -log n_k)", "dropout (p = 0.25)"};
        // depth 17: queries resident; depth 33: staged with the keys at every step
        for (const std::size_t depth : {std::size_t{17}, std::size_t{33}})
        af::variants::for_each({2, 2, 9, 37, depth, 40}, [&](const af::variants::variant& v, const auto& e, const auto&... bindings) {
            if (!chosen.count(v.name)) return;
            using E = std::remove_cvref_t<decltype(e)>;
            const auto ref = af::reference::evaluate(e, bindings...);
            const auto [out, info] = vk::run(dev, e, af::run_options{af::execution::fused}, bindings...);
            INFO(v.name << " | depth " << depth << " | " << af::to_string(e));
            CHECK(relative_error(ref.values, out.values) <= 1e-4);
            CHECK(info.notes.empty());
            CHECK(planned_kernels_run(info) == af::plan::kernel_count<E, af::plan::mode::fused>);
        });
        CHECK(dev.validation_messages() == 0);
        INFO(dev.last_validation_message());
    }
    SECTION("key shares, and a key row long enough for several dispatches, planned from the tile's loop count") {
        af::matrix<"Q"> Q;
        af::matrix<"K"> K;
        af::matrix<"V"> V;
        const std::size_t d = 33, n_q = 11, n_k = 3001, d_v = 40;
        af::variants::input_store in(5);
        const auto q = af::bind(Q, af::col_major(in.random(d * n_q), d, n_q));
        const auto k = af::bind(K, af::col_major(in.random(d * n_k), d, n_k));
        const auto v = af::bind(V, af::row_major(in.random(n_k * d_v), n_k, d_v));
        const auto e = softmax(scale(Q^af::T*K))*V;
        const auto ref = af::reference::evaluate(e, q, k, v);
        for (const std::size_t shares : {std::size_t{1}, std::size_t{3}}) {
            const auto [out, info] = vk::run(dev, e, af::run_options{.mode = af::execution::fused, .key_splits = shares}, q, k, v);
            INFO(shares << " shares: " << Catch::Detail::stringify(info.kernels));
            CHECK(relative_error(ref.values, out.values) <= 1e-4);
            // had the window outgrown llvmpipe's loop limit, the run would have been redone with a note
            CHECK(info.notes.empty());
            if (dev.limits().max_loop_iterations) CHECK(info.dispatches > 2);  // several windows, then the merge
        }
        CHECK(dev.validation_messages() == 0);
    }
}

TEST_CASE("Vulkan: the register-rows fused shader at shapes unlike its default, with and without the subgroup broadcast", "[vulkan]") {
    vk::device* shared = shared_device();
    if (!shared) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    if (!shared->limits().subgroup_broadcast) {
        WARN("SKIP: no subgroup ballot operations: the register-rows shader does not run here");
        return;
    }
    const std::uint32_t sub = shared->limits().subgroup_size;
    // 3 rows of 5 invocations and 7-key tiles: every key read by every
    // invocation; a subgroup of invocations and tiles of twice as many keys:
    // each invocation loads two keys of a tile and broadcasts them
    for (const vk::register_rows_shape shape : {vk::register_rows_shape{3, 5, 7}, vk::register_rows_shape{2, sub, 2 * sub}}) {
        vk::device dev(shared->info(), vk::device_options{.validation = true, .design = vk::fused_design::register_rows, .rows = shape});
        REQUIRE(dev.design() == vk::fused_design::register_rows);
        REQUIRE(dev.rows() == shape);
        const bool broadcast = shape.invocations == sub;
        INFO(shape.rows << " rows x " << shape.invocations << " invocations, " << shape.keys << "-key tiles");
        const std::set<std::string> chosen = {"scaled dot product", "additive (Bahdanau)", "causal", "hard (one-hot argmax)",
                                              "masked softmax (lengths, one batch fully masked)", "ALiBi", "soft-capping (c = 5)",
                                              "sigmoid attention (causal, b = -log n_k)", "dropout (p = 0.25)", "grouped-query (GQA)",
                                              "weighted softmax (w^T (q . k))", "local-p (predictive, Gaussian)"};
        af::variants::for_each({2, 2, 19, 37, 13, 11}, [&](const af::variants::variant& v, const auto& e, const auto&... bindings) {
            if (!chosen.count(v.name)) return;
            using E = std::remove_cvref_t<decltype(e)>;
            const auto ref = af::reference::evaluate(e, bindings...);
            const auto [out, info] = vk::run(dev, e, af::run_options{af::execution::fused}, bindings...);
            INFO(v.name << " | " << af::to_string(e) << " | " << Catch::Detail::stringify(info.kernels));
            CHECK(relative_error(ref.values, out.values) <= 1e-4);
            CHECK(info.notes.empty());
            CHECK(planned_kernels_run(info) == af::plan::kernel_count<E, af::plan::mode::fused>);
            if constexpr (af::plan::fuses_as_attention_v<E>) {
                const bool named = std::any_of(info.kernels.begin(), info.kernels.end(), [&](const std::string& k) {
                    return k.find("[register rows") != std::string::npos &&
                           (k.find("keys broadcast over the subgroup") != std::string::npos) == broadcast;
                });
                CHECK(named);
            }
        });
        // key shares, and windows: a device told a small loop limit plans
        // several dispatches of the same row, each resuming the last's state
        af::matrix<"Q"> Q;
        af::matrix<"K"> K;
        af::matrix<"V"> V;
        // 13 queries: rows over the invocations; 3: keys over them (decode's shape)
        for (const std::size_t n_q : {std::size_t{13}, std::size_t{3}}) {
        const std::size_t d = 21, n_k = 1001, d_v = 9;
        af::variants::input_store in(6);
        const auto q = af::bind(Q, af::col_major(in.random(d * n_q), d, n_q));
        const auto k = af::bind(K, af::col_major(in.random(d * n_k), d, n_k));
        const auto v = af::bind(V, af::row_major(in.random(n_k * d_v), n_k, d_v));
        const auto e = softmax(scale(Q^af::T*K))*V;
        const auto ref = af::reference::evaluate(e, q, k, v);
        vk::device tight(shared->info(), vk::device_options{.max_loop_iterations = 4000, .design = vk::fused_design::register_rows, .rows = shape});
        for (const std::size_t shares : {std::size_t{1}, std::size_t{3}}) {
            const auto [out, info] = vk::run(tight, e, af::run_options{.mode = af::execution::fused, .key_splits = shares}, q, k, v);
            INFO(shares << " shares: " << Catch::Detail::stringify(info.kernels));
            CHECK(relative_error(ref.values, out.values) <= 1e-4);
            CHECK(info.notes.empty());
            CHECK(info.dispatches > 2);  // several windows, then the merge
            if (broadcast && shared->limits().subgroup_reduce)
                CHECK((info.kernels.front().find("keys spread over the subgroup") != std::string::npos) == (n_q < sub));
        }
        }
        CHECK(dev.validation_messages() == 0);
        INFO(dev.last_validation_message());
    }
}

TEST_CASE("Vulkan: a NaN or inf value under a weight other than 0 reaches the output exactly; under a weight of 0 it reaches nothing", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::size_t d = 5, n = 37, d_v = 3;
    af::variants::input_store in(8);
    const auto q = af::bind(Q, af::col_major(in.random(d * n), d, n));
    const auto k = af::bind(K, af::col_major(in.random(d * n), d, n));
    const float* drawn = in.random(n * d_v);
    std::vector<float> values(drawn, drawn + n * d_v);
    const std::size_t bad_key = 20;
    values[bad_key * d_v + 1] = std::numeric_limits<float>::infinity();
    values[bad_key * d_v + 2] = std::numeric_limits<float>::quiet_NaN();
    const auto v = af::bind(V, af::row_major(values.data(), n, d_v));
    // causal: rows before the bad key weigh it 0 and stay finite; the rest
    // have +inf in column 1 and NaN in column 2, and column 0 as usual
    const auto e = softmax(mask(scale(Q^af::T*K), af::causal))*V;
    const auto ref = af::reference::evaluate(e, q, k, v);
    for (const auto mode : {af::execution::fused, af::execution::unfused}) {
    const auto [out, info] = vk::run(*dev, e, af::run_options{mode}, q, k, v);
    INFO((mode == af::execution::fused ? "fused" : "unfused") << ": " << Catch::Detail::stringify(info.kernels));
    for (std::size_t i = 0; i < n; ++i) {
        INFO("row " << i);
        CHECK(out.values[i * d_v] == Approx(ref.values[i * d_v]).epsilon(1e-4));
        if (i < bad_key) {
            CHECK(std::isfinite(out.values[i * d_v + 1]));
            CHECK(std::isfinite(out.values[i * d_v + 2]));
        } else {
            CHECK(std::isinf(out.values[i * d_v + 1]));
            CHECK(out.values[i * d_v + 1] > 0);
            CHECK(std::isnan(out.values[i * d_v + 2]));
        }
        CHECK(std::isinf(ref.values[i * d_v + 1]) == std::isinf(out.values[i * d_v + 1]));
    }
    // the register-rows shader and the tiled product add such values as 0, and say so
    if ((mode == af::execution::fused && dev->design() == vk::fused_design::register_rows) ||
        (mode == af::execution::unfused && dev->limits().subgroup_broadcast && dev->limits().subgroup_size <= 32))
        CHECK(Catch::Detail::stringify(info.notes).find("ran again with the staged-tiles fused shader") != std::string::npos);
    }
    // keys from 30 on masked for every row: the bad key weighs 0 everywhere,
    // nothing is lost and nothing is run again
    std::vector<float> masked_values(drawn, drawn + n * d_v);
    masked_values[33 * d_v + 1] = std::numeric_limits<float>::infinity();
    masked_values[33 * d_v + 2] = std::numeric_limits<float>::quiet_NaN();
    const auto masked_v = af::bind(V, af::row_major(masked_values.data(), n, d_v));
    const auto masked = softmax(mask(scale(Q^af::T*K), af::j < 30))*V;
    const auto masked_ref = af::reference::evaluate(masked, q, k, masked_v);
    for (const auto mode : {af::execution::fused, af::execution::unfused}) {
        const auto [clean, clean_info] = vk::run(*dev, masked, af::run_options{mode}, q, k, masked_v);
        CHECK(relative_error(masked_ref.values, clean.values) <= 1e-4);
        CHECK(std::all_of(clean.values.begin(), clean.values.end(), [](float x) { return std::isfinite(x); }));
        CHECK(clean_info.notes.empty());
    }
    CHECK(dev->validation_messages() == 0);
}

TEST_CASE("Vulkan: a tile shape the fused kernel cannot run is an error when the device opens", "[vulkan]") {
    vk::device* shared = shared_device();
    if (!shared) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    auto open = [&](const vk::fused_tile& tile) { vk::device dev(shared->info(), vk::device_options{.tile = tile}); };
    CHECK_THROWS_WITH(open({.keys = 64}), Contains("device_options::tile cannot run: keys 64 > 32"));
    CHECK_THROWS_WITH(open({.keys = 30}), Contains("lanes 4 must divide keys (30)"));
    CHECK_THROWS_WITH(open({.queries = 8, .keys = 8, .depth_step = 32, .value_columns = 4}), Contains("must hold depth_step x (queries + keys)"));
    CHECK_THROWS_WITH(open({.lanes = 0}), Contains("every extent must be at least 1"));
    CHECK_THROWS_WITH(open({.resident_depth = 0}), Contains("every extent must be at least 1"));
    CHECK_THROWS_WITH(open({.queries = 512, .depth_step = 2}), Contains("invocations per workgroup (queries x lanes), more than"));
}

TEST_CASE("Vulkan: values wider than the fused kernel holds run unfused, each operand computed once", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"W"> W;
    af::variants::input_store in(75);
    const std::size_t n = 21, d = 6, wide = 257;  // d_v 257 > 256
    auto q = af::bind(Q, af::col_major(in.random(d * n), d, n));
    auto k = af::bind(K, af::col_major(in.random(d * n), d, n));
    auto v = af::bind(V, af::row_major(in.random(n * d), n, d));
    auto w = af::bind(W, af::row_major(in.random(d * wide), d, wide));
    const auto e = softmax(scale(Q^af::T*K))*(V*W);
    const auto ref = af::reference::evaluate(e, q, k, v, w);
    const auto [out, info] = vk::run(*dev, e, vk::options{vk::execution::fused}, q, k, v, w);
    CHECK(relative_error(ref.values, out.values) <= 1e-4);
    CHECK(info.notes.size() == 1);
    CHECK(info.kernels.size() == 5);  // V*W once, then the four kernels of unfused attention
    CHECK(info.dispatches == 7);      // softmax is three bounded passes: row maxima, sums, weights
    CHECK(dev->validation_messages() == 0);
}

// ---- the matrix-tiles fused kernel (shaders/flash_matrix.glsl) ----
// Lavapipe runs its plain fragments (fragments_plain.glsl): the same tiling,
// indexing, masking and softmax as on cooperative matrices, with the same
// f16 operands and f32 sums. Its error against the reference is f16's:
// queries, keys, values and weights rounded to 11 bits, so scores move by
// about 2^-11 of sum |q k| and the output by as much of its scale.
namespace {
vk::device open_matrix_device(const vk::device& shared, std::uint32_t max_loop_iterations = 0) {
    vk::device dev(shared.info(), vk::device_options{.validation = true, .max_loop_iterations = max_loop_iterations,
                                                     .design = vk::fused_design::matrix_tiles});
    REQUIRE(dev.design() == vk::fused_design::matrix_tiles);
    return dev;
}
bool ran_matrix_tiles(const af::report& info) {
    return std::any_of(info.kernels.begin(), info.kernels.end(), [](const std::string& k) { return k.find("[matrix tiles: ") != std::string::npos; });
}
}  // namespace

TEST_CASE("Vulkan: the matrix-tiles fused kernel runs every variant at odd sizes, within f16's error", "[vulkan][matrix]") {
    vk::device* shared = shared_device();
    if (!shared) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    vk::device dev = open_matrix_device(*shared);
    // (1, 1, 70, 150, 40, 20): several warps' query rows and key tiles, partial ones each way
    const af::variants::shape shapes[] = {{2, 2, 7, 13, 5, 3}, {1, 2, 33, 65, 31, 7}, {2, 1, 1, 3, 1, 1}, {1, 1, 70, 150, 40, 20}};
    std::size_t on_matrix = 0;
    double worst = 0;
    for (const auto& s : shapes) {
        af::variants::for_each(s, [&](const af::variants::variant& v, const auto& e, const auto&... bindings) {
            using E = std::remove_cvref_t<decltype(e)>;
            // scores near 1e4: f16 operands move them by units, and softmax
            // passes that on; such attentions need f32 (staged tiles)
            if (v.name.find("1e4") != std::string::npos) return;
            const auto ref = af::reference::evaluate(e, bindings...);
            const auto [out, info] = vk::run(dev, e, af::run_options{af::execution::fused}, bindings...);
            INFO(v.name << " | " << af::to_string(e) << " | " << Catch::Detail::stringify(info.kernels) << " | "
                        << Catch::Detail::stringify(info.notes));
            const double error = relative_error(ref.values, out.values);
            CHECK(error <= 1e-2);
            if constexpr (af::plan::fuses_as_attention_v<E>) {
                using parts = af::plan::attention_parts<E>;
                const bool matrix = ran_matrix_tiles(info);
                if (parts::hard) CHECK(Catch::Detail::stringify(info.kernels).find("not matrix tiles: hard attention") != std::string::npos);
                else if (parts::core_kind::pairwise)
                    CHECK(Catch::Detail::stringify(info.kernels).find("not matrix tiles: a pairwise (additive) score") != std::string::npos);
                else if (!ran_unfused(info)) CHECK(matrix);
                if (matrix) {
                    ++on_matrix;
                    worst = std::max(worst, error);
                    CHECK(Catch::Detail::stringify(info.kernels).find("plain fragments") != std::string::npos);
                }
            }
            CHECK(dev.validation_messages() == 0);
            INFO(dev.last_validation_message());
        });
    }
    CHECK(on_matrix >= 40);
    WARN("matrix tiles, plain fragments: " << on_matrix << " runs, worst error " << worst << " of the output's scale");
}

TEST_CASE("Vulkan: the matrix-tiles kernel reads f16 inputs as its operands, within the weights' rounding", "[vulkan][matrix]") {
    vk::device* shared = shared_device();
    if (!shared) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    vk::device dev = open_matrix_device(*shared);
    const std::size_t B = 2, H = 2, n_q = 45, n_k = 77, d = 37, d_v = 19;
    af::variants::input_store in(811);
    const auto q = af::testing::stored<af::half>(in.random(B * H * d * n_q), B * H * d * n_q);
    const auto k = af::testing::stored<af::half>(in.random(B * H * d * n_k), B * H * d * n_k);
    const auto v = af::testing::stored<af::half>(in.random(B * H * n_k * d_v), B * H * n_k * d_v);
    af::matrix<"Q", af::dyn, af::dyn, af::half> Q;
    af::matrix<"K", af::dyn, af::dyn, af::half> K;
    af::matrix<"V", af::dyn, af::dyn, af::half> V;
    af::matrix<"m"> M;
    const std::vector<float> slopes{0.25f, 0.0625f};
    const auto qb = af::bind(Q, af::col_major(q.data(), d, n_q, B, H));
    const auto kb = af::bind(K, af::col_major(k.data(), d, n_k, B, H));
    const auto vb = af::bind(V, af::row_major(v.data(), n_k, d_v, B, H));
    const auto mb = af::bind(M, af::row_major(slopes.data(), 1, 1, 1, H));
    using af::i;
    using af::j;
    // the inputs are exact in f16; the weights (at most 1, summing to 1) are
    // rounded to f16 before they meet the values: the output moves by at
    // most 2^-11 of the values' scale, plus f32 sums
    auto agree = [&](const auto& e, const auto&... b) {
        const auto ref = af::reference::evaluate(e, b...);
        const auto [out, info] = vk::run(dev, e, vk::options{vk::execution::fused}, b...);
        INFO(af::to_string(e) << " | " << Catch::Detail::stringify(info.kernels));
        CHECK(relative_error(ref.values, out.values) <= 1e-3);
        CHECK(ran_matrix_tiles(info));
        CHECK(info.notes.empty());
    };
    agree(softmax(scale(Q^af::T*K))*V, qb, kb, vb);
    agree(softmax(mask(scale(Q^af::T*K) - M * (i - j), af::causal))*V, qb, kb, vb, mb);
    agree(softmax(mask(scale(Q^af::T*K), af::window(9)))*V, qb, kb, vb);
    agree(softmax(5 * tanh(scale(Q^af::T*K) / 5))*V, qb, kb, vb);
    CHECK(dev.validation_messages() == 0);
}

TEST_CASE("Vulkan: the matrix-tiles kernel over long key rows: windows of dispatches, key shares, decode", "[vulkan][matrix]") {
    vk::device* shared = shared_device();
    if (!shared) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    // a small loop limit: a key row runs as several dispatches, each resuming the last one's state
    vk::device tight = open_matrix_device(*shared, 30000);
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    for (const std::size_t n_q : {std::size_t{21}, std::size_t{1}}) {
        const std::size_t d = 24, n_k = 1001, d_v = 9;
        af::variants::input_store in(12);
        const auto q = af::bind(Q, af::col_major(in.random(d * n_q), d, n_q));
        const auto k = af::bind(K, af::col_major(in.random(d * n_k), d, n_k));
        const auto v = af::bind(V, af::row_major(in.random(n_k * d_v), n_k, d_v));
        const auto e = softmax(mask(scale(Q^af::T*K), af::j < 997 - af::i))*V;
        const auto ref = af::reference::evaluate(e, q, k, v);
        for (const std::size_t shares : {std::size_t{1}, std::size_t{3}}) {
            const auto [out, info] = vk::run(tight, e, af::run_options{.mode = af::execution::fused, .key_splits = shares}, q, k, v);
            INFO(n_q << " queries, " << shares << " shares: " << Catch::Detail::stringify(info.kernels));
            CHECK(relative_error(ref.values, out.values) <= 5e-3);
            CHECK(info.notes.empty());
            CHECK(ran_matrix_tiles(info));
            CHECK(info.dispatches > 2);  // several windows, then the merge
        }
    }
    CHECK(tight.validation_messages() == 0);
}

TEST_CASE("Vulkan: numbers f16 cannot hold send the matrix-tiles run to the staged f32 shader, which answers exactly", "[vulkan][matrix]") {
    vk::device* shared = shared_device();
    if (!shared) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    vk::device dev = open_matrix_device(*shared);
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::size_t d = 5, n = 37, d_v = 3;
    af::variants::input_store in(14);
    const float* drawn_q = in.random(d * n);
    const float* drawn_v = in.random(n * d_v);
    const auto k = af::bind(K, af::col_major(in.random(d * n), d, n));
    const auto e = softmax(mask(scale(Q^af::T*K), af::j < 30))*V;
    auto rerun = [&](const std::vector<float>& queries, const std::vector<float>& values) {
        const auto q = af::bind(Q, af::col_major(queries.data(), d, n));
        const auto v = af::bind(V, af::row_major(values.data(), n, d_v));
        const auto ref = af::reference::evaluate(e, q, k, v);
        const auto [out, info] = vk::run(dev, e, af::run_options{af::execution::fused}, q, k, v);
        INFO(Catch::Detail::stringify(info.kernels) << " | " << Catch::Detail::stringify(info.notes));
        CHECK(relative_error(ref.values, out.values) <= 1e-4);  // f32 throughout
        CHECK(Catch::Detail::stringify(info.notes).find("the matrix tiles' f16 operands could not hold a number") != std::string::npos);
        CHECK(Catch::Detail::stringify(info.kernels).find("[staged tiles") != std::string::npos);
    };
    std::vector<float> queries(drawn_q, drawn_q + d * n), values(drawn_v, drawn_v + n * d_v);
    // a NaN and an infinity under weights of 0 (keys from 30 on are masked)
    // in a key tile that is visited: nothing may reach the output
    std::vector<float> bad_values = values;
    bad_values[30 * d_v + 1] = std::numeric_limits<float>::infinity();
    bad_values[31 * d_v + 2] = std::numeric_limits<float>::quiet_NaN();
    rerun(queries, bad_values);
    // a query beyond f16's 65504 once scaled by 1 / sqrt(5)
    std::vector<float> huge_queries = queries;
    huge_queries[3 * d + 1] = 2e5f;
    rerun(huge_queries, values);
    CHECK(dev.validation_messages() == 0);
}

TEST_CASE("Vulkan: the cooperative-matrix fused kernel compiles and passes spirv-val for every kind of epilogue", "[vulkan][matrix]") {
    using namespace shader_text;
    const auto dir = std::filesystem::temp_directory_path() / ("attnfuse-coop-" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir);
    std::size_t checked = 0;
    auto validate = [&](const std::string& source, const char* what) {
        INFO(what);
        REQUIRE(source.find("coopMatMulAddNV") != std::string::npos);
        REQUIRE(source.find("#extension GL_NV_cooperative_matrix : require") != std::string::npos);
        const std::vector<std::uint32_t> spirv = vk::compile_compute_shader(source, what);
        const auto file = dir / (std::string("coop-") + std::to_string(checked++) + ".spv");
        std::ofstream(file, std::ios::binary).write(reinterpret_cast<const char*>(spirv.data()), std::streamsize(spirv.size() * 4));
        CHECK(std::system((std::string(ATTNFUSE_SPIRV_VAL) + " --target-env vulkan1.1 " + file.string()).c_str()) == 0);
    };
    validate(vk::fused_shader_source<sdpa>(vk::fused_design::matrix_tiles, true), "scaled dot product");
    validate(vk::fused_shader_source<softcapped>(vk::fused_design::matrix_tiles, true), "soft-capping");
    validate(vk::fused_shader_source<alibi>(vk::fused_design::matrix_tiles, true), "ALiBi, causal");
    using dropped = decltype(dropout(softmax(scale(Q^af::T*K)), 0.1, 7)*V);
    validate(vk::fused_shader_source<dropped>(vk::fused_design::matrix_tiles, true), "dropout");
    using ratio = decltype((relu(Q^af::T*K) / (row_sum(relu(Q^af::T*K)) + 1.0))*V);
    validate(vk::fused_shader_source<ratio>(vk::fused_design::matrix_tiles, true), "a ratio normaliser");
    std::filesystem::remove_all(dir);
    // the plain fragments are the same kernel: one text apart from the fragments
    const std::string plain = vk::fused_shader_source<alibi>(vk::fused_design::matrix_tiles);
    CHECK(plain.find("coopMat") == std::string::npos);
    CHECK(plain.find("layout(constant_id = 4) const uint KF") != std::string::npos);
}
