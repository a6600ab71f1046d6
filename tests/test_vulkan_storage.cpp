// 16-bit storage on Vulkan: f16 and bf16 inputs read as stored by every
// kernel (through 16-bit storage buffers, and as halves of 32-bit words on a
// device opened without them), device_tensor of each element, and 16-bit
// outputs rounded on the device exactly as element<T>::narrow rounds; and
// the shaders' mapping of query heads to shared heads.
#include <attnfuse/dsl.hpp>
#include <attnfuse/reference.hpp>
#include <attnfuse/vulkan/executor.hpp>
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "element_storage.hpp"
#include "variants.hpp"
#include "vulkan_test_device.hpp"

namespace af = attnfuse;
namespace vk = attnfuse::vulkan;
using af::dyn;
using af::i;
using af::j;
using vk::testing::shared_device;
using Catch::Matchers::Contains;

namespace {

// The default device again, opened without 16-bit storage buffers: the
// shaders read 16-bit inputs as halves of 32-bit words there.
vk::device* word_reading_device() {
    static std::unique_ptr<vk::device> dev = []() -> std::unique_ptr<vk::device> {
        try {
            vk::device_options o{true};
            o.sixteen_bit_storage = false;
            return std::make_unique<vk::device>(vk::default_device(), o);
        } catch (const vk::no_device_error&) {
            return nullptr;
        }
    }();
    return dev.get();
}

template <class El>
std::vector<El> stored(const std::vector<float>& values) {
    return af::testing::stored<El>(values.data(), values.size());
}

std::vector<float> widened_values(const std::vector<af::half>& v) {
    std::vector<float> out;
    for (auto x : v) out.push_back(af::to_float(x));
    return out;
}

}  // namespace

TEST_CASE("Vulkan: every kernel reads f16 and bf16 inputs as stored, with and without 16-bit storage buffers", "[vulkan]") {
    vk::device* dev = shared_device();
    vk::device* words = word_reading_device();
    if (!dev || !words) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    INFO(dev->info().name << ": 16-bit storage buffers " << (dev->limits().storage_16bit ? "on" : "off"));
    CHECK_FALSE(words->limits().storage_16bit);
    // Odd extents, and views that start at an odd element and step by odd
    // strides, so that the word reads take high and low halves alike.
    const std::size_t B = 2, H = 2, n_q = 13, n_k = 21, d = 7, d_v = 5, pad = 1;
    af::variants::input_store in(501);
    auto values = [&](std::size_t n) {
        const float* p = in.random(n);
        return std::vector<float>(p, p + n);
    };
    const auto q = stored<af::bfloat16>(values(B * H * d * n_q + pad));
    const auto k = stored<af::half>(values(B * H * d * n_k + pad));
    const auto v = stored<af::half>(values(B * H * n_k * d_v + pad));
    std::vector<float> slope_values(H);
    for (std::size_t h = 0; h < H; ++h) slope_values[h] = std::pow(2.0f, -4.0f * float(h + 1) / float(H));
    const auto m = stored<af::bfloat16>(slope_values);
    af::matrix<"Q", dyn, dyn, af::bfloat16> Q;
    af::matrix<"K", dyn, dyn, af::half> K;
    af::matrix<"V", dyn, dyn, af::half> V;
    af::matrix<"m", dyn, dyn, af::bfloat16> M;
    const auto qb = af::bind(Q, af::col_major(q.data() + pad, d, n_q, B, H));
    const auto kb = af::bind(K, af::col_major(k.data() + pad, d, n_k, B, H));
    const auto vb = af::bind(V, af::row_major(v.data() + pad, n_k, d_v, B, H));
    const auto mb = af::bind(M, af::row_major(m.data(), 1, 1, 1, H));

    // `stored`: the notes the word-reading device gives, e.g. "K: stored as f16"
    auto agree = [&](const std::vector<std::string>& stored, const auto& e, const auto&... b) {
        const auto ref = af::reference::evaluate(e, b...);
        for (const af::execution mode : {af::execution::fused, af::execution::unfused}) {
            INFO((mode == af::execution::fused ? "fused" : "unfused"));
            const auto on_storage = vk::run(*dev, e, vk::options{mode}, b...);
            const auto on_words = vk::run(*words, e, vk::options{mode}, b...);
            CHECK(af::variants::relative_error(ref.values, on_storage.output.values) <= 1e-4);
            // the same values read two ways: the same arithmetic, the same bits
            CHECK(on_storage.output.values == on_words.output.values);
            CHECK_FALSE(af::testing::notes_name(on_storage.info, "widened"));
            CHECK_FALSE(af::testing::notes_name(on_words.info, "widened"));
            if (dev->limits().storage_16bit) CHECK_FALSE(af::testing::notes_name(on_storage.info, "halves of 32-bit words"));
            for (const std::string& input : stored)
                CHECK(af::testing::notes_name(on_words.info, "input " + input + ", read in place as halves of 32-bit words"));
        }
    };
    SECTION("causal attention with bf16 ALiBi slopes") { agree({"Q: stored as bf16", "K: stored as f16", "V: stored as f16", "m: stored as bf16"}, softmax(mask(scale(Q^af::T*K) - M * (i - j), af::causal))*V, qb, kb, vb, mb); }
    SECTION("products of 16-bit operands (the product kernels)") { agree({"Q: stored as bf16", "K: stored as f16", "V: stored as f16"}, (Q^af::T*K)*V * 0.5, qb, kb, vb); }
    SECTION("a transposed 16-bit operand in a pointwise kernel") { agree({"K: stored as f16"}, af::transpose(K) * 2.0 + 1.0, kb); }
    SECTION("a 16-bit input as the whole expression (the copy kernel)") { agree({"V: stored as f16"}, V^af::T, vb); }
    CHECK(dev->validation_messages() == 0);
    CHECK(words->validation_messages() == 0);
}

TEST_CASE("Vulkan: device_tensor holds f32, f16 or bf16; bind_resident checks the element", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    const std::size_t B = 1, H = 3, rows = 5, cols = 3;  // 45 elements: an odd count of halves
    std::vector<float> values(B * H * rows * cols);
    for (std::size_t n = 0; n < values.size(); ++n) values[n] = std::sin(0.37 * double(n)) * 3.0f;
    const auto halves = stored<af::half>(values);
    const auto brains = stored<af::bfloat16>(values);
    const vk::device_tensor h16(*dev, af::row_major(halves.data(), rows, cols, B, H), "K in f16");
    const vk::device_tensor b16(*dev, af::row_major(brains.data(), rows, cols, B, H), "K in bf16");
    CHECK(h16.storage() == vk::storage_kind::f16);
    CHECK(b16.storage() == vk::storage_kind::bf16);
    CHECK(dev->buffer_bytes(h16.buffer()) == 92);  // 45 halves in 23 words
    CHECK(h16.download_stored<af::half>() == halves);
    CHECK(b16.download_stored<af::bfloat16>() == brains);
    CHECK(h16.download().values == widened_values(halves));
    CHECK_THROWS_WITH(h16.download_stored<float>(), Contains("download_stored<f32>() of a device_tensor that holds f16"));

    // resident K and V in f16 give what host bindings of the same values give
    const std::size_t d = rows, n_q = 4;  // n_k = cols
    std::vector<float> qv(H * d * n_q);
    for (std::size_t n = 0; n < qv.size(); ++n) qv[n] = std::cos(0.21 * double(n));
    af::matrix<"Q"> Q;
    af::matrix<"K", dyn, dyn, af::half> K;
    af::matrix<"V", dyn, dyn, af::half> V;
    const auto e = softmax(scale(Q^af::T*K))*af::transpose(V);  // V: d_v x n_k here, read transposed
    const auto qb = af::bind(Q, af::row_major(qv.data(), d, n_q, B, H));
    const auto kb = af::bind(K, af::row_major(halves.data(), rows, cols, B, H));
    const auto vb = af::bind(V, af::row_major(halves.data(), rows, cols, B, H));
    for (const af::execution mode : {af::execution::fused, af::execution::unfused}) {
        const auto host = vk::run(*dev, e, vk::options{mode}, qb, kb, vb);
        const auto resident = vk::run(*dev, e, vk::options{mode}, qb, vk::bind_resident(K, h16), vk::bind_resident(V, h16));
        CHECK(resident.output.values == host.output.values);
        CHECK(af::variants::relative_error(af::reference::evaluate(e, qb, kb, vb).values, resident.output.values) <= 1e-4);
    }
    CHECK_THROWS_WITH(vk::run(*dev, e, qb, vk::bind_resident(K, b16), vk::bind_resident(V, h16)),
                      Contains("input K: declared f16 but bound to a device_tensor that holds bf16"));
    CHECK(dev->validation_messages() == 0);
}

TEST_CASE("Vulkan: 16-bit outputs are rounded on the device as element<T>::narrow rounds them", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    // Values at every edge of both formats: ties to even either way, the
    // largest half and the first value that rounds to infinity, the smallest
    // subnormal half and halfway below it, f16 subnormal ties, signed zeros,
    // infinities, NaN, fp32 values bf16 rounds up into the next binade.
    const float inf = std::numeric_limits<float>::infinity();
    std::vector<float> x{1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 65504.0f, 65519.0f, 65520.0f, -65520.0f, 0x1p-24f, 0x1p-25f,
                         3 * 0x1p-26f, 0x1p-25f + 0x1p-30f, 5 * 0x1p-25f, 0.0f, -0.0f, inf, -inf, std::nanf(""), 1.0f + 0x1p-8f,
                         1.0f + 3 * 0x1p-8f, 0x1.ff8p127f, -3.0e38f, 1e-3f, -0.1f, 3.14159f};
    af::variants::input_store in(3);
    const float* more = in.random(40);
    x.insert(x.end(), more, more + 40);  // 63 values: an odd count
    af::matrix<"X"> X;
    const auto xb = af::bind(X, af::row_major(x.data(), 7, 9));
    const auto e = X * 1.0;
    const auto f32 = vk::run(*dev, e, xb).output.values;
    auto rounds_as_host = [&](auto element_tag) {
        using El = decltype(element_tag);
        INFO(af::element<El>::name);
        auto [out, info] = vk::run_on_device<El>(*dev, e, vk::options{}, xb);
        CHECK(out.storage() == vk::glsl::storage_of<El>());
        const std::vector<El> device_rounded = out.template download_stored<El>();
        REQUIRE(device_rounded.size() == f32.size());
        for (std::size_t n = 0; n < f32.size(); ++n) {
            INFO("value " << f32[n]);
            CHECK(device_rounded[n].bits == af::from_float<El>(f32[n]).bits);
        }
        CHECK(af::testing::notes_name(info, std::string("output: stored as ") + std::string(af::element<El>::name) + ", rounded on the device"));

        // run_into a strided 16-bit output: every element in place, nothing else written
        const El poison{0x5a5a};
        std::vector<El> strided(7 * 11 + 3, poison);
        const af::report into = vk::run_into(*dev, e, af::output_view<El>{strided.data() + 3, 7, 9, 1, 1, 11, 1, 0, 0}, xb);
        for (std::size_t r = 0; r < 7; ++r)
            for (std::size_t c = 0; c < 11; ++c) {
                const El got = strided[3 + r * 11 + c];
                if (c < 9) CHECK(got.bits == device_rounded[r * 9 + c].bits);
                else CHECK(got.bits == poison.bits);
            }
        for (std::size_t n = 0; n < 3; ++n) CHECK(strided[n].bits == poison.bits);
        CHECK(af::testing::notes_name(into, "rounded on the device"));
        CHECK_THROWS_WITH(vk::run_into(*dev, e, af::output_view<El>{strided.data(), 9, 7, 1, 1, 7, 1, 0, 0}, xb),
                          Contains("output: the expression gives 1 batch x 1 heads of 7x9 but the output is 1 batch x 1 heads of 9x7"));
    };
    rounds_as_host(af::half{});
    rounds_as_host(af::bfloat16{});
    CHECK(dev->validation_messages() == 0);
}

TEST_CASE("Vulkan: attention on f16 and bf16 inputs within each format's storage error", "[vulkan]") {
    vk::device* words = word_reading_device();
    if (!words) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    // the element-storage checks of every backend, on the word-reading path
    af::testing::check_element_storage([words](const auto& e, const af::run_options& o, const auto&... b) { return vk::run(*words, e, o, b...); },
                                       af::testing::stored_reads::every_kernel);
    CHECK(words->validation_messages() == 0);
}

TEST_CASE("Vulkan: grouped-query heads at groups of 1, 3, 4 and 12 (the shaders' head mapping)", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    const std::size_t H = 12, n_q = 9, n_k = 11, d = 5;
    af::variants::input_store in(12);
    const float* q = in.random(H * d * n_q);
    const float* k = in.random(H * d * n_k);
    const float* v = in.random(H * n_k * d);
    const float* slopes = in.random(H);
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"m"> M;
    for (const std::size_t kv_heads : {std::size_t{12}, std::size_t{4}, std::size_t{3}, std::size_t{1}}) {
        INFO(kv_heads << " key and value heads for " << H << " query heads");
        const auto qb = af::bind(Q, af::col_major(q, d, n_q, 1, H));
        const auto kb = af::bind(K, af::col_major(k, d, n_k, 1, kv_heads));
        const auto vb = af::bind(V, af::row_major(v, n_k, d, 1, kv_heads));
        const auto mb = af::bind(M, af::row_major(slopes, 1, 1, 1, kv_heads));  // an epilogue operand with its own heads
        const auto e = softmax(mask(scale(Q^af::T*K) - M * (i - j), af::causal))*V;
        const auto ref = af::reference::evaluate(e, qb, kb, vb, mb);
        for (const af::execution mode : {af::execution::fused, af::execution::unfused}) {
            INFO((mode == af::execution::fused ? "fused" : "unfused"));
            CHECK(af::variants::relative_error(ref.values, vk::run(*dev, e, vk::options{mode}, qb, kb, vb, mb).output.values) <= 1e-4);
        }
    }
    CHECK(dev->validation_messages() == 0);
}
