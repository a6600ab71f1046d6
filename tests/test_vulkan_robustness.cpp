// Regression tests for the Vulkan defects of the reliability issue: loops
// that a driver ends early (llvmpipe stops any shader loop after 65535
// iterations per invocation), uploads shared across views, the zero-weight
// rule and overflow, damaged cache files, one device used by several
// threads, and a buffer table that must not grow. Validation layers on: a
// message fails the test.
#include <attnfuse/cpu.hpp>
#include <attnfuse/vulkan/executor.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <set>
#include <thread>
#include <unistd.h>

#include "variants.hpp"
#include "vulkan_test_device.hpp"

namespace af = attnfuse;
namespace vk = attnfuse::vulkan;
namespace fs = std::filesystem;

namespace {

af::matrix<"Q"> Q;
af::matrix<"K"> K;
af::matrix<"V"> V;

using attnfuse::vulkan::testing::shared_device;

constexpr vk::execution both_modes[] = {vk::execution::fused, vk::execution::unfused};
const char* name(vk::execution m) { return m == vk::execution::fused ? "fused" : "unfused"; }

bool mentions(const std::vector<std::string>& notes, const std::string& word) {
    return std::any_of(notes.begin(), notes.end(), [&](const std::string& n) { return n.find(word) != std::string::npos; });
}

// A cache directory of this test's own, removed at the end.
struct scratch_cache {
    fs::path dir = fs::temp_directory_path() / ("attnfuse-cache-test-" + std::to_string(::getpid()));
    std::string previous;
    bool had_previous = false;
    scratch_cache() {
        fs::remove_all(dir);
        if (const char* p = std::getenv("XDG_CACHE_HOME")) previous = p, had_previous = true;
        ::setenv("XDG_CACHE_HOME", dir.c_str(), 1);
    }
    ~scratch_cache() {
        if (had_previous) ::setenv("XDG_CACHE_HOME", previous.c_str(), 1);
        else ::unsetenv("XDG_CACHE_HOME");
        std::error_code ignored;
        fs::remove_all(dir, ignored);
    }
    std::set<fs::path> spirv_files() const {
        std::set<fs::path> found;
        for (const auto& entry : fs::recursive_directory_iterator(dir))
            if (entry.path().extension() == ".spv") found.insert(entry.path());
        return found;
    }
};

}  // namespace

TEST_CASE("Vulkan: long key rows are not cut short by a driver's loop limit", "[vulkan][limits]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    // The repro: Q = 0 gives equal weights, so column 1 is the mean of 0 .. n_k - 1.
    for (const std::size_t n_k : {std::size_t{20000}, std::size_t{100000}}) {
        const std::size_t d = 16, dv = 4;
        std::vector<float> qs(d, 0.0f), ks(d * n_k, 0.1f), values(n_k * dv, 1.0f);
        for (std::size_t r = 0; r < n_k; ++r) values[r * dv + 1] = static_cast<float>(r);
        auto q = af::bind(Q, af::col_major(qs.data(), d, 1));
        auto k = af::bind(K, af::col_major(ks.data(), d, n_k));
        auto v = af::bind(V, af::row_major(values.data(), n_k, dv));
        for (const auto mode : both_modes) {
            INFO(n_k << " keys, " << name(mode));
            const auto [out, info] = vk::run(*dev, softmax(Q^af::T*K)*V, vk::options{mode}, q, k, v);
            // the unfused product adds n_k weights in order: fp32 rounding grows with n_k
            CHECK(out.values[0] == Approx(1.0).epsilon(mode == vk::execution::fused ? 1e-5 : 2e-8 * static_cast<double>(n_k)));
            CHECK(out.values[1] == Approx((static_cast<double>(n_k) - 1) / 2).epsilon(1e-4));
            CHECK(dev->validation_messages() == 0);
        }
    }
    // The planned windows cover what the shaders really loop: long rows at
    // several depths and widths run without a retry.
    for (const auto& [d, dv] : {std::pair<std::size_t, std::size_t>{1, 1}, {16, 4}, {64, 64}, {128, 128}, {200, 256}}) {
        af::variants::input_store in(4);
        const std::size_t n_q = 17, n_k = 30011;
        auto q = af::bind(Q, af::col_major(in.random(d * n_q), d, n_q));
        auto k = af::bind(K, af::col_major(in.random(d * n_k), d, n_k));
        auto v = af::bind(V, af::row_major(in.random(n_k * dv), n_k, dv));
        const auto e = softmax(scale(Q^af::T*K))*V;
        const auto ref = af::reference::evaluate(e, q, k, v);
        for (const auto mode : both_modes) {
            INFO("d " << d << ", d_v " << dv << ", " << name(mode));
            const auto [out, info] = vk::run(*dev, e, vk::options{mode}, q, k, v);
            CHECK(af::variants::relative_error(ref.values, out.values) <= 1e-4);
            CHECK_FALSE(mentions(info.notes, "ran again"));
        }
    }
    // A plan that misjudges the driver's limit (here: told the limit is six
    // times llvmpipe's) is caught by af_check_loops: the run is redone in
    // smaller pieces, says so, and gives the right answer.
    if (dev->limits().max_loop_iterations == 65535) {
        vk::device_options optimistic{true};
        optimistic.max_loop_iterations = 400000;
        vk::device overconfident(vk::default_device(), optimistic);
        // depth and d_v 64: loops a driver keeps (its short ones it unrolls and
        // does not count); the unfused product's one loop is longer than 65535 too
        const std::size_t n_k = 100000, d = 64, dv = 64;
        std::vector<float> qs(d, 0.0f), ks(d * n_k, 0.1f), values(n_k * dv, 1.0f);
        for (std::size_t r = 0; r < n_k; ++r) values[r * dv + 1] = static_cast<float>(r);
        auto q = af::bind(Q, af::col_major(qs.data(), d, 1));
        auto k = af::bind(K, af::col_major(ks.data(), d, n_k));
        auto v = af::bind(V, af::row_major(values.data(), n_k, dv));
        for (const auto mode : both_modes) {
            INFO(name(mode) << " on a device told the limit is 400000");
            const auto [out, info] = vk::run(overconfident, softmax(Q^af::T*K)*V, vk::options{mode}, q, k, v);
            CHECK(out.values[1] == Approx((static_cast<double>(n_k) - 1) / 2).epsilon(1e-3));
            CHECK(mentions(info.notes, "ran again"));
        }
        CHECK(overconfident.validation_messages() == 0);
    }
    // Prefill's per-workgroup trip count at n 8192, d 128: one query tile runs
    // every key, as at any n_q.
    af::variants::input_store in(3);
    const std::size_t n_q = 33, n_k = 8192, d = 128;
    auto q = af::bind(Q, af::col_major(in.random(d * n_q), d, n_q));
    auto k = af::bind(K, af::col_major(in.random(d * n_k), d, n_k));
    auto v = af::bind(V, af::row_major(in.random(n_k * d), n_k, d));
    for (const auto& run_causal : {false, true}) {
        auto check = [&](const auto& e) {
            const auto ref = af::reference::evaluate(e, q, k, v);
            for (const auto mode : both_modes) {
                INFO("n_k 8192, d 128, " << name(mode) << (run_causal ? ", window" : ""));
                const auto out = vk::run(*dev, e, vk::options{mode}, q, k, v).output;
                CHECK(af::variants::relative_error(ref.values, out.values) <= 1e-4);
            }
        };
        if (run_causal) check(softmax(mask(scale(Q^af::T*K), af::j <= af::i + 8000))*V);
        else check(softmax(scale(Q^af::T*K))*V);
    }
    CHECK(dev->validation_messages() == 0);
}

TEST_CASE("Vulkan: every variant stays right when each shader may loop only a little", "[vulkan][limits]") {
    if (!shared_device()) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    // A budget far below any driver's forces key shares and chunked dispatches
    // at small sizes, so that their bookkeeping is tested on every commit.
    vk::device_options tight{true};
    tight.max_loop_iterations = 400;
    vk::device dev(vk::default_device(), tight);
    CHECK(dev.limits().max_loop_iterations == 400);
    bool split_somewhere = false;
    af::variants::for_each(af::variants::shape{2, 2, 21, 333, 31, 9}, [&](const af::variants::variant& v, const auto& e, const auto&... b) {
        const double tolerance = v.name.find("1e4") != std::string::npos ? 1e-2 : 1e-4;
        const auto ref = af::reference::evaluate(e, b...);
        for (const auto mode : both_modes) {
            INFO(v.name << " | " << af::to_string(e) << " | " << name(mode));
            const auto [out, info] = vk::run(dev, e, vk::options{mode}, b...);
            CHECK(af::variants::relative_error(ref.values, out.values) <= tolerance);
            if (mode == vk::execution::fused) CHECK(info.score_bytes == 0);
            split_somewhere = split_somewhere || std::any_of(info.kernels.begin(), info.kernels.end(), [](const std::string& k) {
                                  return k.find(" dispatches") != std::string::npos;
                              });
        }
    });
    CHECK(split_somewhere);
    CHECK(dev.validation_messages() == 0);
    INFO(dev.last_validation_message());
}

TEST_CASE("Vulkan: one array bound as two inputs of other batch and head counts is uploaded as each", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    af::variants::input_store in(21);
    const std::size_t n = 19, d = 6;
    const float* data = in.random(2 * 2 * d * n);
    const auto e = softmax(scale(Q^af::T*K))*V;
    auto v = af::bind(V, af::row_major(in.random(2 * 2 * n * d), n, d, 2, 2));
    // the same memory as Q with batch 2 and as K with batch 1; then with other head counts
    const std::pair<af::tensor_view<float>, af::tensor_view<float>> cases[] = {
        {af::col_major(data, d, n, 2, 1), af::col_major(data, d, n, 1, 1)},
        {af::col_major(data, d, n, 1, 2), af::col_major(data, d, n, 1, 1)},
        {af::col_major(data, d, n, 2, 2), af::strided(data, d, n, 1, static_cast<std::ptrdiff_t>(d), 2, 2, 0, static_cast<std::ptrdiff_t>(d * n))},
    };
    for (const auto& [qv, kv] : cases) {
        auto q = af::bind(Q, qv);
        auto k = af::bind(K, kv);
        const auto ref = af::reference::evaluate(e, q, k, v);
        for (const auto mode : both_modes) {
            INFO(name(mode));
            CHECK(af::variants::relative_error(ref.values, vk::run(*dev, e, vk::options{mode}, q, k, v).output.values) <= 1e-4);
        }
    }
}

TEST_CASE("Vulkan: a NaN value at a zero-weight key reaches no row; fused output does not overflow", "[vulkan][numerics]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
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
        for (const auto mode : both_modes)
            for (const std::size_t shares : {std::size_t{0}, std::size_t{3}}) {
                const auto out = vk::run(*dev, e, vk::options{.mode = mode, .key_splits = shares}, q, k, v).output;
                for (std::size_t r = 0; r < n; ++r)
                    for (std::size_t c = 0; c < dv; ++c) {
                        INFO(name(mode) << ", " << shares << " shares: NaN at key " << poisoned << ", row " << r);
                        REQUIRE(std::isnan(out.at(0, 0, r, c)) == (r >= poisoned && c == 3));
                    }
            }
    }
    // hard(): a NaN at a key never chosen
    {
        std::vector<float> qs(6, 1.0f), ks{0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f}, values(12, 1.0f);
        values[4] = std::nanf("");
        auto q1 = af::bind(Q, af::col_major(qs.data(), 1, 6));
        auto k1 = af::bind(K, af::col_major(ks.data(), 1, 6));
        auto v1 = af::bind(V, af::row_major(values.data(), 6, 2));
        for (const auto mode : both_modes) {
            INFO(name(mode));
            for (float x : vk::run(*dev, hard(Q^af::T*K)*V, vk::options{mode}, q1, k1, v1).output.values) CHECK(x == 1.0f);
        }
    }
    // a NaN value row whose weight later falls to exactly 0 (a key 1000 higher comes after)
    {
        const std::size_t n_k = 256;
        std::vector<float> qs{1.0f}, ks(n_k, -1e4f), values(n_k * 2, 1.0f);
        ks[0] = 0.0f;
        ks[200] = 1000.0f;
        values[200 * 2 + 1] = 5.0f;
        values[0] = std::nanf("");
        auto q1 = af::bind(Q, af::col_major(qs.data(), 1, 1));
        auto k1 = af::bind(K, af::col_major(ks.data(), 1, n_k));
        auto v1 = af::bind(V, af::row_major(values.data(), n_k, 2));
        for (const auto mode : both_modes)
            for (const std::size_t shares : {std::size_t{1}, std::size_t{3}}) {
                INFO(name(mode) << ", " << shares << " shares");
                const auto out = vk::run(*dev, softmax(Q^af::T*K)*V, vk::options{.mode = mode, .key_splits = shares}, q1, k1, v1).output;
                CHECK(out.values[0] == 1.0f);
                CHECK(out.values[1] == 5.0f);
            }
    }
    // Q = 0, V = 3e38: the normalised result is 3e38
    {
        const std::size_t n_q = 8, n_k = 100, depth = 20;
        std::vector<float> qs(depth * n_q, 0.0f), ks(depth * n_k, 0.5f), values(n_k * dv, 3e38f);
        auto q1 = af::bind(Q, af::col_major(qs.data(), depth, n_q));
        auto k1 = af::bind(K, af::col_major(ks.data(), depth, n_k));
        auto v1 = af::bind(V, af::row_major(values.data(), n_k, dv));
        for (const auto mode : both_modes)
            for (const std::size_t shares : {std::size_t{0}, std::size_t{2}}) {
                INFO(name(mode) << ", " << shares << " shares");
                for (float x : vk::run(*dev, softmax(scale(Q^af::T*K))*V, vk::options{.mode = mode, .key_splits = shares}, q1, k1, v1).output.values) {
                    REQUIRE(std::isfinite(x));
                    CHECK(x == Approx(3e38).epsilon(1e-5));
                }
            }
    }
    CHECK(dev->validation_messages() == 0);
}

TEST_CASE("Vulkan: a swapped, truncated or garbled SPIR-V cache entry is detected, recompiled, rewritten and reported", "[vulkan][cache]") {
    if (!shared_device()) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    scratch_cache cache;
    af::variants::input_store in(13);
    const std::size_t n = 23, d = 5;
    auto q = af::bind(Q, af::col_major(in.random(d * n), d, n));
    auto k = af::bind(K, af::col_major(in.random(d * n), d, n));
    auto v = af::bind(V, af::row_major(in.random(n * d), n, d));
    const auto first = softmax(scale(Q^af::T*K))*V;
    const auto second = hard(mask(Q^af::T*K, af::causal))*V;
    const auto ref = af::reference::evaluate(first, q, k, v);
    {
        vk::device dev;
        (void)vk::run(dev, first, q, k, v);
    }
    const auto first_files = cache.spirv_files();
    REQUIRE(first_files.size() == 1);
    {
        vk::device dev;
        (void)vk::run(dev, second, q, k, v);
    }
    std::set<fs::path> second_files;
    for (const auto& f : cache.spirv_files())
        if (!first_files.count(f)) second_files.insert(f);
    REQUIRE(second_files.size() == 1);
    const fs::path target = *first_files.begin(), other = *second_files.begin();

    auto read_all = [](const fs::path& p) {
        std::ifstream file(p, std::ios::binary);
        return std::vector<char>(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
    };
    auto write_all = [](const fs::path& p, const std::vector<char>& bytes) {
        std::ofstream(p, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    };
    const std::vector<char> good = read_all(target);
    std::vector<char> halved(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(good.size() / 2 / 4 * 4));
    std::vector<char> garbled = good;
    for (std::size_t n2 = 64; n2 < garbled.size(); ++n2) garbled[n2] = static_cast<char>((n2 * 131) & 0xff);
    const std::pair<const char*, std::vector<char>> damages[] = {
        {"another kernel's SPIR-V", read_all(other)}, {"cut in half", halved}, {"a garbled body", garbled}, {"empty", {}}};
    for (const auto& [what, bytes] : damages) {
        INFO("the cache entry holds " << what);
        write_all(target, bytes);
        {
            vk::device dev(vk::default_device(), vk::device_options{true});
            const auto [out, info] = vk::run(dev, first, q, k, v);
            CHECK(af::variants::relative_error(ref.values, out.values) <= 1e-4);
            CHECK_FALSE(info.spirv_from_disk_cache);
            CHECK(mentions(info.notes, "cache"));
            CHECK(dev.validation_messages() == 0);
        }
        // healed: the next process reads it
        vk::device dev;
        const auto [out, info] = vk::run(dev, first, q, k, v);
        CHECK(info.spirv_from_disk_cache);
        CHECK_FALSE(mentions(info.notes, "cache"));
        CHECK(af::variants::relative_error(ref.values, out.values) <= 1e-4);
    }
    // a damaged pipeline cache costs time only
    for (const auto& entry : fs::recursive_directory_iterator(cache.dir))
        if (entry.path().extension() == ".bin") write_all(entry.path(), std::vector<char>(300, 'x'));
    vk::device dev(vk::default_device(), vk::device_options{true});
    CHECK(af::variants::relative_error(ref.values, vk::run(dev, first, q, k, v).output.values) <= 1e-4);
    CHECK(dev.validation_messages() == 0);
}

TEST_CASE("Vulkan: one device shared by four threads gives every run its own right answer", "[vulkan][threads]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    constexpr int threads = 4, runs = 50;
    struct problem {
        std::vector<float> q, k, v;
        std::vector<double> expected;
    };
    const std::size_t n_q = 9, n_k = 37, d = 5, dv = 3;
    std::vector<problem> problems(threads);
    for (int t = 0; t < threads; ++t) {
        af::variants::input_store in(100 + static_cast<std::uint32_t>(t));
        const float *q = in.random(d * n_q), *k = in.random(d * n_k), *v = in.random(n_k * dv);
        problems[static_cast<std::size_t>(t)] = {{q, q + d * n_q}, {k, k + d * n_k}, {v, v + n_k * dv}, {}};
        auto& p = problems[static_cast<std::size_t>(t)];
        p.expected = af::reference::evaluate(softmax(mask(scale(Q^af::T*K), af::causal))*V, af::bind(Q, af::col_major(p.q.data(), d, n_q)),
                                             af::bind(K, af::col_major(p.k.data(), d, n_k)), af::bind(V, af::row_major(p.v.data(), n_k, dv)))
                         .values;
    }
    std::atomic<int> wrong{0}, failed{0};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            const problem& p = problems[static_cast<std::size_t>(t)];
            auto q = af::bind(Q, af::col_major(p.q.data(), d, n_q));
            auto k = af::bind(K, af::col_major(p.k.data(), d, n_k));
            auto v = af::bind(V, af::row_major(p.v.data(), n_k, dv));
            for (int r = 0; r < runs; ++r) {
                try {
                    const auto mode = (r + t) % 3 == 0 ? vk::execution::unfused : vk::execution::fused;
                    if (r % 5 == 4) {  // results left on the device, and inputs resident there, too
                        const vk::device_tensor resident_k(*dev, k.view);
                        const auto out = vk::run_on_device(*dev, softmax(mask(scale(Q^af::T*K), af::causal))*V, vk::options{mode}, q,
                                                           vk::bind_resident(K, resident_k), v);
                        if (af::variants::relative_error(p.expected, out.output.download().values) > 1e-4) ++wrong;
                    } else {
                        const auto out = vk::run(*dev, softmax(mask(scale(Q^af::T*K), af::causal))*V, vk::options{mode}, q, k, v).output;
                        if (af::variants::relative_error(p.expected, out.values) > 1e-4) ++wrong;
                    }
                } catch (const std::exception&) {
                    ++failed;
                }
            }
        });
    for (auto& t : pool) t.join();
    CHECK(wrong == 0);
    CHECK(failed == 0);
    CHECK(dev->validation_messages() == 0);
    INFO(dev->last_validation_message());
}

TEST_CASE("Vulkan: a long-lived device reuses the slots of released buffers", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    af::variants::input_store in(17);
    const std::size_t n = 11, d = 4;
    auto q = af::bind(Q, af::col_major(in.random(d * n), d, n));
    auto k = af::bind(K, af::col_major(in.random(d * n), d, n));
    auto v = af::bind(V, af::row_major(in.random(n * d), n, d));
    const auto e = softmax(scale(Q^af::T*K))*V;
    for (int r = 0; r < 20; ++r) (void)vk::run(*dev, e, vk::options{vk::execution::unfused}, q, k, v);
    const std::size_t slots = dev->buffer_slots();
    for (int r = 0; r < 300; ++r) {
        (void)vk::run(*dev, e, vk::options{r % 2 ? vk::execution::unfused : vk::execution::fused}, q, k, v);
        const vk::device_tensor t(*dev, q.view);
    }
    CHECK(dev->buffer_slots() <= slots + 2);
}
