// attnfuse-bench: fused against unfused against the peers, in one process,
// over every variant family, both backends and n from 128 to 8192.
//
// Names: <family>/<backend>/<mode>/bh:<batch*heads>/nq:<n_q>/nk:<n_k>/d:<d>. Counters: GFLOPS (4 n_q n_k d per head: the two products, per
// second; masked variants count the dense FLOPs, so skipped tiles show as
// GFLOPS), intermediate_bytes (what the run allocated besides inputs and
// output) and, on Vulkan, dispatches and wall_ms.
//
// Flags besides Google Benchmark's:
//   --attnfuse_smoke      every row once at tiny sizes (CI: it must run, no timing)
//   --attnfuse_max_n=N    the largest n of the sweeps (default 8192)
#include <benchmark/benchmark.h>
#include <immintrin.h>
#include <cblas.h>
#include <omp.h>

#include <attnfuse/cpu.hpp>
#include <attnfuse/cpu/backward.hpp>
#include <attnfuse/cpu/kernels.hpp>
#include <attnfuse/cpu/simd.hpp>
#include <attnfuse/vulkan/backward.hpp>
#include <attnfuse/vulkan/executor.hpp>
#include <strings.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

namespace af = attnfuse;
namespace vk = attnfuse::vulkan;

namespace {

bool smoke = false;
std::size_t max_n = 8192;

struct problem {
    std::size_t bh, n_q, n_k, d;
    std::vector<float> q, k, v;           // [bh, n, d] row-major each
    std::vector<float> slopes;            // ALiBi: one per head
    std::vector<float> w, w1, w2, bias;   // additive: d_a = d
    problem(std::size_t bh_, std::size_t nq, std::size_t nk, std::size_t d_)
        : bh(bh_), n_q(nq), n_k(nk), d(d_), q(bh * nq * d_), k(bh * nk * d_), v(bh * nk * d_), slopes(bh), w(d_), w1(d_ * d_),
          w2(d_ * d_), bias(d_) {
        std::uint32_t s = 12345;
        auto next = [&] {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            return static_cast<float>(s >> 8) / 8388608.0f - 1.0f;
        };
        for (auto* buf : {&q, &k, &v, &w, &w1, &w2, &bias})
            for (float& x : *buf) x = next();
        for (float& x : w1) x /= std::sqrt(static_cast<float>(d));
        for (float& x : w2) x /= std::sqrt(static_cast<float>(d));
        for (std::size_t h = 0; h < bh; ++h) slopes[h] = std::exp2(-8.0f * float(h % 8 + 1) / 8.0f);
    }
    double flops() const { return 4.0 * double(bh) * double(n_q) * double(n_k) * double(d); }
};

// The variant families of VARIANTS.md, one representative each.
enum class family { sdpa, causal, window, alibi, softcap, hard, additive, sigmoid, relu2 };
constexpr family all_families[] = {family::sdpa, family::causal,   family::window,  family::alibi, family::softcap,
                                   family::hard, family::additive, family::sigmoid, family::relu2};
const char* family_name(family f) {
    switch (f) {
        case family::sdpa: return "sdpa";
        case family::causal: return "sdpa_causal";
        case family::window: return "sliding_window";
        case family::alibi: return "alibi";
        case family::softcap: return "softcap";
        case family::hard: return "hard";
        case family::additive: return "additive";
        case family::sigmoid: return "sigmoid_causal";
        case family::relu2: return "relu_squared";
    }
    return "?";
}

// Calls run(expression, bindings...) for family F over p; Q, K and V come
// from `qkv` (host views, or resident device tensors on Vulkan).
// El: the element Q, K and V are stored as.
template <family F, class El = float, class QKV, class Run>
auto with_family(const problem& p, const QKV& qkv, Run&& run) {
    using af::i;
    using af::j;
    using af::T;
    af::matrix<"Q", af::dyn, af::dyn, El> Q;
    af::matrix<"K", af::dyn, af::dyn, El> K;
    af::matrix<"V", af::dyn, af::dyn, El> V;
    const auto& [q, k, v] = qkv;
    if constexpr (F == family::sdpa) return run(softmax(scale(Q^T*K))*V, q, k, v);
    else if constexpr (F == family::causal) return run(softmax(mask(scale(Q^T*K), af::causal))*V, q, k, v);
    else if constexpr (F == family::window) return run(softmax(mask(scale(Q^T*K), af::window(256)))*V, q, k, v);
    else if constexpr (F == family::alibi) {
        af::matrix<"m"> m;
        return run(softmax(mask(scale(Q^T*K) - m * (i - j), af::causal))*V, q, k, v,
                   af::bind(m, af::row_major(p.slopes.data(), 1, 1, 1, p.bh)));
    } else if constexpr (F == family::softcap) return run(softmax(30 * tanh(scale(Q^T*K) / 30))*V, q, k, v);
    else if constexpr (F == family::hard) return run(hard(scale(Q^T*K))*V, q, k, v);
    // pointwise weights, no row normalisation (Ramapuram et al.'s b = -log n)
    else if constexpr (F == family::sigmoid)
        return run(sigmoid(mask(scale(Q^T*K), af::causal) - std::log(static_cast<double>(p.n_k)))*V, q, k, v);
    else if constexpr (F == family::relu2) return run(square(relu(scale(Q^T*K)))*V, q, k, v);
    else {
        af::matrix<"w"> w;
        af::matrix<"W1"> W1;
        af::matrix<"W2"> W2;
        af::matrix<"b"> b;
        return run(softmax(additive(w, W1*Q + b, W2*K))*V, q, k, v, af::bind(w, af::row_major(p.w.data(), p.d, 1)),
                   af::bind(W1, af::row_major(p.w1.data(), p.d, p.d)), af::bind(W2, af::row_major(p.w2.data(), p.d, p.d)),
                   af::bind(b, af::row_major(p.bias.data(), p.d, 1)));
    }
}

// Q, K as columns over the [bh, n, d] arrays, V as rows, heads = bh.
template <class El>
auto host_qkv(const El* q, const El* k, const El* v, const problem& p) {
    return std::tuple{af::bind(af::matrix<"Q", af::dyn, af::dyn, El>{}, af::col_major(q, p.d, p.n_q, 1, p.bh)),
                      af::bind(af::matrix<"K", af::dyn, af::dyn, El>{}, af::col_major(k, p.d, p.n_k, 1, p.bh)),
                      af::bind(af::matrix<"V", af::dyn, af::dyn, El>{}, af::row_major(v, p.n_k, p.d, 1, p.bh))};
}
auto host_qkv(const problem& p) { return host_qkv(p.q.data(), p.k.data(), p.v.data(), p); }

// The problem's inputs stored as El (rounded to nearest even).
template <class El>
std::vector<El> stored_as(const std::vector<float>& values) {
    std::vector<El> out(values.size());
    for (std::size_t n = 0; n < values.size(); ++n) out[n] = af::from_float<El>(values[n]);
    return out;
}

void set_counters(benchmark::State& state, double flops, std::size_t intermediate) {
    state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["intermediate_bytes"] = static_cast<double>(intermediate);
}

// El: Q, K and V stored as f32, f16 or bf16 (a name's "_f16" or "_bf16").
template <family F, class El = float>
void attnfuse_cpu(benchmark::State& state, af::run_options options) {
    const problem p(state.range(0), state.range(1), state.range(2), state.range(3));
    // 16-bit copies only for 16-bit rows; f32 rows read the problem's arrays
    std::vector<El> q, k, v;
    if constexpr (!std::is_same_v<El, float>) q = stored_as<El>(p.q), k = stored_as<El>(p.k), v = stored_as<El>(p.v);
    const auto qkv = [&] {
        if constexpr (std::is_same_v<El, float>) return host_qkv(p);
        else return host_qkv(q.data(), k.data(), v.data(), p);
    }();
    std::size_t intermediate = 0;
    // one untimed run first: thread scratch, page faults; and whether its
    // products ran in bf16, for the label
    with_family<F, El>(p, qkv, [&](const auto& e, const auto&... b) {
        const auto info = af::cpu::run(e, options, b...).info;
        for (const auto& note : info.notes)
            if (note.find("bf16 products") != std::string::npos) state.SetLabel("bf16 products");
        return info.kernels.size();
    });
    for (auto _ : state) {
        with_family<F, El>(p, qkv, [&](const auto& e, const auto&... b) {
            const auto r = af::cpu::run(e, options, b...);
            benchmark::DoNotOptimize(r.output.values.data());
            intermediate = r.info.intermediate_bytes;
            return 0;
        });
    }
    set_counters(state, p.flops(), intermediate);
}

// The backward pass (cpu::backward: the gradients of Q, K and V) after one
// untimed forward and one untimed backward; dO is the forward's output, a
// fixed gradient of the output's shape. GFLOPS count 2.5 times the forward's
// FLOPs (the five products against the forward's two), as FlashAttention does.
// from_training_forward: the backward reads the row statistics of the
// training forward's result (run_for_training) instead of computing them.
// Attentions without row statistics (pointwise weights, hard) start from run.
template <family F>
void attnfuse_cpu_backward(benchmark::State& state, af::run_options options, bool from_training_forward = false) {
    const problem p(state.range(0), state.range(1), state.range(2), state.range(3));
    const auto qkv = host_qkv(p);
    std::size_t intermediate = 0;
    with_family<F>(p, qkv, [&](const auto& e, const auto&... b) {
        const af::training_result forward = [&] {
            if constexpr (af::plan::keeps_statistics_v<decltype(e)>) return af::cpu::run_for_training(e, b...);
            else return af::training_result{af::cpu::run(e, b...).output, {}, {}};
        }();
        const af::tensor& d_output = forward.output;
        auto backward = [&] {
            return from_training_forward ? af::cpu::backward(e, forward, d_output, options, b...)
                                         : af::cpu::backward(e, forward.output, d_output, options, b...);
        };
        (void)backward();
        for (auto _ : state) {
            const af::backward_result g = backward();
            benchmark::DoNotOptimize(g.inputs.data());
            intermediate = g.info.intermediate_bytes;
        }
        return 0;
    });
    set_counters(state, 2.5 * p.flops(), intermediate);
}

vk::device* bench_device() {
    static std::unique_ptr<vk::device> dev = []() -> std::unique_ptr<vk::device> {
        try {
            return std::make_unique<vk::device>();
        } catch (const vk::error&) {
            return nullptr;
        }
    }();
    return dev.get();
}

// Vulkan: Q, K and V stay on the device, so the time of each iteration is
// the device's own (timestamps around the submissions); the wall time of a
// run is a counter. El: Q, K and V stored as f32, f16 or bf16 there (the
// output stays f32).
template <family F, class El = float>
void attnfuse_vulkan_rows(benchmark::State& state, vk::device& dev, vk::execution mode) {
    const problem p(state.range(0), state.range(1), state.range(2), state.range(3));
    std::vector<El> q16, k16, v16;
    if constexpr (!std::is_same_v<El, float>) q16 = stored_as<El>(p.q), k16 = stored_as<El>(p.k), v16 = stored_as<El>(p.v);
    const auto [hq, hk, hv] = [&] {
        if constexpr (std::is_same_v<El, float>) return host_qkv(p);
        else return host_qkv(q16.data(), k16.data(), v16.data(), p);
    }();
    const vk::device_tensor q(dev, hq.view, "Q"), k(dev, hk.view, "K"), v(dev, hv.view, "V");
    const auto resident = std::tuple{vk::bind_resident(af::matrix<"Q", af::dyn, af::dyn, El>{}, q),
                                     vk::bind_resident(af::matrix<"K", af::dyn, af::dyn, El>{}, k),
                                     vk::bind_resident(af::matrix<"V", af::dyn, af::dyn, El>{}, v)};
    vk::report last;
    // one untimed run first: compilation (glslang, and the driver's own, which
    // lavapipe may do at the first dispatch)
    with_family<F, El>(p, resident, [&](const auto& e, const auto&... b) { return vk::run_on_device(dev, e, {mode}, b...).info.dispatches; });
    for (auto _ : state) {
        with_family<F, El>(p, resident, [&](const auto& e, const auto&... b) {
            auto r = vk::run_on_device(dev, e, {mode}, b...);
            state.SetIterationTime(std::max(r.info.device_seconds, 1e-9));
            last = r.info;
            return 0;
        });
    }
    set_counters(state, p.flops(), last.intermediate_bytes);
    state.counters["dispatches"] = static_cast<double>(last.dispatches);
    state.counters["wall_ms"] = last.wall_seconds * 1e3;
}

// Vulkan from host inputs, uploaded every call (the wall time, a counter,
// holds it): each iteration is the device's own time of one call, after one
// untimed call (compilation). `prepare(dev, e, bindings...)` does what comes
// before (a forward, for a backward) and returns the call, which returns its
// report; a call does `flop_factor` times the forward's FLOPs.
template <family F, class Prepare>
void attnfuse_vulkan_host_inputs(benchmark::State& state, double flop_factor, const Prepare& prepare) {
    auto* dev = bench_device();
    if (!dev) {
        state.SkipWithError("no Vulkan device");
        return;
    }
    const problem p(state.range(0), state.range(1), state.range(2), state.range(3));
    const auto qkv = host_qkv(p);
    vk::report last;
    try {
        with_family<F>(p, qkv, [&](const auto& e, const auto&... b) {
            const auto call = prepare(*dev, e, b...);
            (void)call();
            for (auto _ : state) {
                last = call();
                state.SetIterationTime(std::max(last.device_seconds, 1e-9));
            }
            return 0;
        });
    } catch (const vk::error& e) {
        state.SkipWithError(e.what());
        return;
    }
    set_counters(state, flop_factor * p.flops(), last.intermediate_bytes);
    state.counters["dispatches"] = static_cast<double>(last.dispatches);
    state.counters["wall_ms"] = last.wall_seconds * 1e3;
}

// Vulkan's backward pass (vulkan::backward), dO the training forward's
// output; given its statistics, or from the output alone.
template <family F>
void attnfuse_vulkan_backward(benchmark::State& state, vk::execution mode, bool from_training_forward = false) {
    attnfuse_vulkan_host_inputs<F>(state, 2.5, [=](vk::device& dev, const auto& e, const auto&... b) {
        auto forward = std::make_shared<const af::training_result>([&] {
            if constexpr (af::plan::keeps_statistics_v<decltype(e)>) return vk::run_for_training(dev, e, b...);
            else return af::training_result{vk::run(dev, e, b...).output, {}, {}};
        }());
        return [=, &dev] {
            return (from_training_forward ? vk::backward(dev, e, *forward, forward->output, {mode}, b...)
                                          : vk::backward(dev, e, forward->output, forward->output, {mode}, b...))
                .info;
        };
    });
}

// Vulkan's forward, as run() (training false) or as the training forward
// that also keeps each row's statistics (run_for_training).
template <family F>
void attnfuse_vulkan_forward(benchmark::State& state, vk::execution mode, bool training) {
    attnfuse_vulkan_host_inputs<F>(state, 1.0, [=](vk::device& dev, const auto& e, const auto&... b) {
        return [=, &dev] { return training ? vk::run_for_training(dev, e, {mode}, b...).info : vk::run(dev, e, {mode}, b...).info; };
    });
}

// The same device opened with the earlier shaders: the staged-tiles fused
// kernel and the one-element-per-invocation product (the baselines the
// register-rows shader and the tiled product are measured against).
vk::device* earlier_shaders_device() {
    static std::unique_ptr<vk::device> dev = []() -> std::unique_ptr<vk::device> {
        try {
            return std::make_unique<vk::device>(vk::default_device(),
                                                vk::device_options{.design = vk::fused_design::staged_tiles, .tiled_products = false});
        } catch (const vk::error&) {
            return nullptr;
        }
    }();
    return dev.get();
}

template <family F, class El = float>
void attnfuse_vulkan(benchmark::State& state, vk::execution mode, bool earlier_shaders = false) {
    auto* dev = earlier_shaders ? earlier_shaders_device() : bench_device();
    if (!dev) {
        state.SkipWithError("no Vulkan device");
        return;
    }
    try {
        attnfuse_vulkan_rows<F, El>(state, *dev, mode);
    } catch (const vk::error& e) {  // beyond this device's limits (lavapipe's 128 MiB per binding): a row with its reason
        state.SkipWithError(e.what());
    }
}

// The loops a person writes first: one query row at a time, scores, softmax,
// weighted sum, single-threaded. The baseline of the naive row.
void naive_loops(benchmark::State& state) {
    const problem p(state.range(0), state.range(1), state.range(2), state.range(3));
    std::vector<float> scores(p.n_k), out(p.bh * p.n_q * p.d);
    const float scale = 1.0f / std::sqrt(static_cast<float>(p.d));
    for (auto _ : state) {
        for (std::size_t h = 0; h < p.bh; ++h)
            for (std::size_t r = 0; r < p.n_q; ++r) {
                const float* qr = &p.q[(h * p.n_q + r) * p.d];
                float top = -INFINITY;
                for (std::size_t c = 0; c < p.n_k; ++c) {
                    float s = 0;
                    for (std::size_t a = 0; a < p.d; ++a) s += qr[a] * p.k[(h * p.n_k + c) * p.d + a];
                    scores[c] = s * scale;
                    top = std::max(top, scores[c]);
                }
                float total = 0;
                for (auto& s : scores) total += (s = std::exp(s - top));
                float* o = &out[(h * p.n_q + r) * p.d];
                std::fill(o, o + p.d, 0.0f);
                for (std::size_t c = 0; c < p.n_k; ++c)
                    for (std::size_t a = 0; a < p.d; ++a) o[a] += scores[c] / total * p.v[(h * p.n_k + c) * p.d + a];
            }
        benchmark::DoNotOptimize(out.data());
    }
    set_counters(state, p.flops(), scores.size() * sizeof(float));
}

// What a C++ user would write instead: OpenBLAS sgemm for both products and
// a vectorized softmax between them, heads in parallel.
struct openblas_attention {
    const problem& p;
    std::vector<float> scores, out;
    explicit openblas_attention(const problem& p_)
        : p(p_), scores(static_cast<std::size_t>(omp_get_max_threads()) * p.n_q * p.n_k), out(p.bh * p.n_q * p.d) {
        openblas_set_num_threads(1);
    }
    void run() {
        const std::size_t nq = p.n_q, nk = p.n_k, d = p.d;
        const float scale = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel for schedule(dynamic)
        for (std::ptrdiff_t h = 0; h < static_cast<std::ptrdiff_t>(p.bh); ++h) {
            float* s = scores.data() + static_cast<std::size_t>(omp_get_thread_num()) * nq * nk;
            const auto n_q = static_cast<int>(nq), n_k = static_cast<int>(nk), dd = static_cast<int>(d);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n_q, n_k, dd, scale, p.q.data() + h * nq * d, dd,
                        p.k.data() + h * nk * d, dd, 0.0f, s, n_k);
            af::cpu::kernels::softmax_rows(s, nq, nk, nk);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n_q, dd, n_k, 1.0f, s, n_k, p.v.data() + h * nk * d, dd,
                        0.0f, out.data() + h * nq * d, dd);
        }
        benchmark::DoNotOptimize(out.data());
    }
};

void openblas_unfused(benchmark::State& state) {
    const problem p(state.range(0), state.range(1), state.range(2), state.range(3));
    openblas_attention peer(p);
    for (auto _ : state) peer.run();
    set_counters(state, p.flops(), peer.scores.size() * sizeof(float));
}

// The same peer with OpenBLAS's kernels for another core (SkylakeX: its
// AVX-512 ones). OpenBLAS chooses its kernels once, when the library
// loads, from OPENBLAS_CORETYPE, so this row runs in a child process: this
// very binary, started again with the variable set for the child alone
// (--attnfuse_openblas_child). The child checks its output against
// attnfuse's fused one, times the same loop and prints the seconds per
// iteration and the core OpenBLAS reports; the parent reports that time.
std::string self_path;

int openblas_child(const char* spec) {
    std::size_t bh = 0, nq = 0, nk = 0, d = 0, iterations = 0;
    if (std::sscanf(spec, "%zu,%zu,%zu,%zu,%zu", &bh, &nq, &nk, &d, &iterations) != 5) return 2;
    const problem p(bh, nq, nk, d);
    openblas_attention peer(p);
    peer.run();
    const auto [q, k, v] = host_qkv(p);
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const auto fused = af::cpu::run(softmax(scale(Q^af::T*K))*V, q, k, v);
    double worst = 0;
    for (std::size_t n = 0; n < peer.out.size(); ++n) worst = std::max(worst, double(std::abs(peer.out[n] - fused.output.values[n])));
    const auto start = std::chrono::steady_clock::now();
    for (std::size_t it = 0; it < iterations; ++it) peer.run();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / double(iterations);
    std::printf("%.9g %.3g %s\n", seconds, worst, openblas_get_corename());
    return 0;
}

void openblas_core_unfused(benchmark::State& state, const char* core) {
    const problem p(state.range(0), state.range(1), state.range(2), state.range(3));
    const std::size_t iterations = smoke ? 1 : std::max<std::size_t>(3, static_cast<std::size_t>(2e9 / p.flops() * 50));
    std::string quoted_path;  // inside single quotes for the shell: ' becomes '\''
    for (const char c : self_path) quoted_path += c == '\'' ? std::string("'\\''") : std::string(1, c);
    const std::string command = "OPENBLAS_CORETYPE=" + std::string(core) + " '" + quoted_path + "' --attnfuse_openblas_child=" +
                                std::to_string(p.bh) + "," + std::to_string(p.n_q) + "," + std::to_string(p.n_k) + "," +
                                std::to_string(p.d) + "," + std::to_string(iterations);
    double seconds = 0, worst = 0;
    char corename[64] = {};
    if (FILE* child = popen(command.c_str(), "r")) {
        if (std::fscanf(child, "%lf %lf %63s", &seconds, &worst, corename) != 3) seconds = 0;
        pclose(child);
    }
    if (!(seconds > 0)) {
        state.SkipWithError("the OpenBLAS child process gave no timing");
        return;
    }
    // OpenBLAS built without DYNAMIC_ARCH ignores the variable: then this row would be the other one under a wrong name
    if (strcasecmp(corename, core) != 0) {
        state.SkipWithError(("OpenBLAS ran its " + std::string(corename) + " kernels, not " + core).c_str());
        return;
    }
    // the same problem as attnfuse's fused kernel: they agree within fp32 rounding, else this row is not the same computation
    if (!(worst <= 1e-3)) {
        state.SkipWithError(("OpenBLAS (" + std::string(corename) + ") differs from attnfuse by " + std::to_string(worst)).c_str());
        return;
    }
    for (auto _ : state) state.SetIterationTime(seconds);
    set_counters(state, p.flops(), std::size_t(omp_get_max_threads()) * p.n_q * p.n_k * sizeof(float));
    state.SetLabel(std::string("OpenBLAS core ") + corename);
}

// This machine's fp32 FMA peak on every core at a vector width: Chains
// independent chains of FMAs per thread, enough that latency never limits
// throughput (two FMA pipes x four cycles need eight; twenty at 16 lanes
// still fit the 32 registers with the two constants). The build's width
// (peak/cpu/fma) and 8 lanes (peak/cpu/fma_8_lanes, AVX2's ymm registers)
// are both measured, so the AVX-512 kernels are read against the peak they
// can reach and against the AVX2 one. (Disassembled: vfmadd...ps on zmm and
// on ymm registers, no memory operands.)
template <class Vec, int Chains>
void peak_fma(benchmark::State& state) {
    constexpr int lanes = sizeof(Vec) / sizeof(float);
    constexpr long steps = 1 << 20;
    const int threads = omp_get_max_threads();
    float sink = 0;
    for (auto _ : state) {
#pragma omp parallel reduction(+ : sink)
        {
            Vec acc[Chains];
            for (int c = 0; c < Chains; ++c)
                for (int l = 0; l < lanes; ++l) acc[c][l] = 1.0f + 0.001f * float(c + omp_get_thread_num());
            Vec a, b;
            for (int l = 0; l < lanes; ++l) a[l] = 0.999999f, b[l] = 1e-7f;
            // unrolled whole, so that the chains stay in registers (left to
            // itself, GCC interchanges these loops at 20 chains and runs each
            // chain through memory)
            for (long s = 0; s < steps; ++s) {
#pragma GCC unroll 32
                for (int c = 0; c < Chains; ++c) acc[c] = acc[c] * a + b;
            }
            for (int c = 0; c < Chains; ++c) sink += acc[c][0];
        }
        benchmark::DoNotOptimize(sink);
    }
    const double flops = 2.0 * lanes * Chains * double(steps) * threads;
    state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["threads"] = threads;
}
typedef float eight_lanes __attribute__((vector_size(32)));

#if defined(__AVX512F__)
// The bf16 dot-product peak (vdpbf16ps: per fp32 lane two bf16 products
// added to the sum, 4 flops), the line bf16 products are read against; run
// where the CPU has AVX512-BF16 (cpu::machine::bf16_products). 20 chains
// per thread, as for the fp32 peak. (Disassembled: vdpbf16ps on zmm
// registers, no memory operands.)
__attribute__((target("avx512f,avx512bf16"))) void peak_bf16_dot(benchmark::State& state) {
    constexpr int chains = 20;
    constexpr long steps = 1 << 20;
    const int threads = omp_get_max_threads();
    float sink = 0;
    for (auto _ : state) {
#pragma omp parallel reduction(+ : sink)
        {
            __m512 acc[chains];
            for (int c = 0; c < chains; ++c) acc[c] = _mm512_set1_ps(1.0f + 0.001f * float(c + omp_get_thread_num()));
            const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.999f), _mm512_set1_ps(0.998f));
            const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-7f), _mm512_set1_ps(2e-7f));
            for (long s = 0; s < steps; ++s) {
#pragma GCC unroll 32
                for (int c = 0; c < chains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
            }
            for (int c = 0; c < chains; ++c) sink += acc[c][0];
        }
        benchmark::DoNotOptimize(sink);
    }
    const double flops = 4.0 * 16 * chains * double(steps) * threads;
    state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["threads"] = threads;
}
#endif

// The Vulkan device's fp32 FMA peak, the line GFLOPS are read against:
// eight independent FMA chains per invocation, many workgroups, device time.
void peak_vulkan(benchmark::State& state) {
    auto* dev = bench_device();
    if (!dev) {
        state.SkipWithError("no Vulkan device");
        return;
    }
    constexpr int chains = 8, steps = 4096, local = 256;
    const std::string source = "#version 450\nlayout(local_size_x = " + std::to_string(local) +
                               ") in;\nlayout(std430, binding = 0) buffer Out { float d[]; } OUT;\nvoid main() {\n"
                               "    float a[" + std::to_string(chains) + "];\n"
                               "    for (int c = 0; c < " + std::to_string(chains) + "; ++c) a[c] = float(gl_GlobalInvocationID.x + c) * 1e-9;\n"
                               "    for (int s = 0; s < " + std::to_string(steps) + "; ++s)\n"
                               "        for (int c = 0; c < " + std::to_string(chains) + "; ++c) a[c] = fma(a[c], 0.999999, 1e-7);\n"
                               "    float sum = 0.0;\n    for (int c = 0; c < " + std::to_string(chains) + "; ++c) sum += a[c];\n"
                               "    OUT.d[gl_GlobalInvocationID.x] = sum;\n}\n";
    const std::uint32_t groups = smoke ? 1 : (dev->info().kind == vk::device_kind::cpu ? 64 : 16384);
    const auto kernel = dev->kernel(source, "peak_fma", 1, 0);
    const auto out = dev->create_buffer(std::size_t(groups) * local * sizeof(float), "peak output");
    dev->dispatch(kernel, {out}, nullptr, 0, groups);  // warm-up
    dev->submit_and_wait();
    for (auto _ : state) {
        dev->dispatch(kernel, {out}, nullptr, 0, groups);
        state.SetIterationTime(std::max(dev->submit_and_wait(), 1e-9));
    }
    dev->release(out);
    const double flops = 2.0 * chains * steps * double(groups) * local;
    state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Heads so that a row's work stays near that of bh 8 at n 2048 (the
// issue's reference shape), between 1 and 64.
std::size_t heads_for(std::size_t n) {
    const double bh = 8.0 * (2048.0 / double(n)) * (2048.0 / double(n));
    return static_cast<std::size_t>(std::clamp(bh, 1.0, 64.0));
}

std::vector<std::int64_t> arguments(std::size_t bh, std::size_t nq, std::size_t nk, std::size_t d) {
    return {std::int64_t(bh), std::int64_t(nq), std::int64_t(nk), std::int64_t(d)};
}

template <class Fn>
benchmark::internal::Benchmark* add(const std::string& name, const std::vector<std::int64_t>& args, Fn fn) {
    auto* b = benchmark::RegisterBenchmark(name.c_str(), fn);
    b->ArgNames({"bh", "nq", "nk", "d"})->Args(args)->Unit(benchmark::kMillisecond);
    if (smoke) b->Iterations(1);
    return b;
}

template <family F>
void register_family(const std::vector<std::size_t>& sizes, const std::vector<std::size_t>& depths, bool vulkan_on_cpu) {
    using af::cpu::execution;
    const std::string name = family_name(F);
    for (const std::size_t d : depths)
        for (const std::size_t n : sizes) {
            // additive: a tanh per (query, key, feature); its unfused form is scalar
            if (F == family::additive && n > 1024 && !smoke) continue;
            const std::size_t bh = smoke ? 2 : (F == family::additive ? std::max<std::size_t>(1, heads_for(n) / 16) : heads_for(n));
            const auto args = arguments(bh, n, n, d);
            add(name + "/cpu/fused", args, [](benchmark::State& st) { attnfuse_cpu<F>(st, {execution::fused}); })->UseRealTime();
            add(name + "/cpu/unfused", args, [](benchmark::State& st) { attnfuse_cpu<F>(st, {execution::unfused}); })->UseRealTime();
            // Q, K and V stored 16-bit, read as stored by the fused kernel
            add(name + "/cpu/fused_f16", args, [](benchmark::State& st) { attnfuse_cpu<F, af::half>(st, {execution::fused}); })->UseRealTime();
            add(name + "/cpu/fused_bf16", args, [](benchmark::State& st) { attnfuse_cpu<F, af::bfloat16>(st, {execution::fused}); })->UseRealTime();
            // the same bf16 storage with every product fp32: what bf16 products add
            if (F == family::sdpa && af::cpu::this_machine().bf16_products)
                add(name + "/cpu/fused_bf16_fp32_products", args, [](benchmark::State& st) {
                    attnfuse_cpu<F, af::bfloat16>(st, {.mode = execution::fused, .bf16_products = false});
                })->UseRealTime();
            // lavapipe runs shaders on this machine's cores: one head, n <= 1024,
            // d 64, and the reference shape for sdpa
            const bool reference_shape = F == family::sdpa && n == 2048 && d == 64;
            if (vulkan_on_cpu && !smoke && (n > 1024 || d != 64) && !reference_shape) continue;
            const auto vargs = vulkan_on_cpu && !smoke && !reference_shape ? arguments(1, n, n, d) : args;
            for (const auto mode : {vk::execution::fused, vk::execution::unfused}) {
                auto* b = add(name + "/vulkan/" + (mode == vk::execution::fused ? "fused" : "unfused"), vargs,
                              [mode](benchmark::State& st) { attnfuse_vulkan<F>(st, mode); });
                b->UseManualTime();
                if (!smoke) b->Iterations(vulkan_on_cpu ? 2 : 5);
            }
            // Q, K and V stored 16-bit on the device, read as stored
            if constexpr (F == family::sdpa)
                for (const auto& [row, run] : {std::pair<std::string, void (*)(benchmark::State&)>{
                                                   "fused_f16", [](benchmark::State& st) { attnfuse_vulkan<F, af::half>(st, vk::execution::fused); }},
                                               {"fused_bf16", [](benchmark::State& st) { attnfuse_vulkan<F, af::bfloat16>(st, vk::execution::fused); }}}) {
                    auto* b = add(name + "/vulkan/" + row, vargs, run);
                    b->UseManualTime();
                    if (!smoke) b->Iterations(vulkan_on_cpu ? 2 : 5);
                }
            // the earlier shaders on the same device: the staged-tiles fused
            // kernel and the one-element-per-invocation product
            if (F == family::sdpa)
                for (const auto mode : {vk::execution::fused, vk::execution::unfused}) {
                    auto* b = add(name + "/vulkan/" + (mode == vk::execution::fused ? "fused_staged" : "unfused_elementwise"), vargs,
                                  [mode](benchmark::State& st) { attnfuse_vulkan<F>(st, mode, true); });
                    b->UseManualTime();
                    if (!smoke) b->Iterations(vulkan_on_cpu ? 2 : 5);
                }
        }
}

void register_all() {
    using af::cpu::execution;
    {
        constexpr int chains = af::cpu::simd::lanes == 16 ? 20 : 10;
        auto* b = benchmark::RegisterBenchmark("peak/cpu/fma", peak_fma<af::cpu::simd::vf, chains>)->UseRealTime()->Unit(benchmark::kMillisecond);
        if (smoke) b->Iterations(1);
        if constexpr (af::cpu::simd::lanes != 8) {
            auto* narrow = benchmark::RegisterBenchmark("peak/cpu/fma_8_lanes", peak_fma<eight_lanes, 10>)->UseRealTime()->Unit(benchmark::kMillisecond);
            if (smoke) narrow->Iterations(1);
        }
#if defined(__AVX512F__)
        if (af::cpu::this_machine().bf16_products) {
            auto* dot = benchmark::RegisterBenchmark("peak/cpu/bf16_dot", peak_bf16_dot)->UseRealTime()->Unit(benchmark::kMillisecond);
            if (smoke) dot->Iterations(1);
        }
#endif
        auto* g = benchmark::RegisterBenchmark("peak/vulkan/fma", peak_vulkan)->UseManualTime()->Iterations(smoke ? 1 : 5)->Unit(
            benchmark::kMillisecond);
        (void)g;
    }
    std::vector<std::size_t> sizes, depths{64, 128};
    for (std::size_t n = 128; n <= max_n; n *= 2) sizes.push_back(n);
    if (smoke) sizes = {33}, depths = {16};
    const auto* dev = bench_device();
    const bool vulkan_on_cpu = dev && dev->info().kind == vk::device_kind::cpu;
    [&]<std::size_t... I>(std::index_sequence<I...>) {
        (register_family<all_families[I]>(sizes, depths, vulkan_on_cpu), ...);
    }(std::make_index_sequence<std::size(all_families)>{});
    for (const std::size_t d : depths)
        for (const std::size_t n : sizes) {
            const std::size_t bh = smoke ? 2 : heads_for(n);
            add("sdpa/cpu/openblas_unfused", arguments(bh, n, n, d), openblas_unfused)->UseRealTime();
            if (af::cpu::this_machine().avx512f)
                add("sdpa/cpu/openblas_skylakex_unfused", arguments(bh, n, n, d),
                    [](benchmark::State& st) { openblas_core_unfused(st, "SkylakeX"); })->UseManualTime()->Iterations(1);
            if (n <= 512) add("sdpa/cpu/naive_loops", arguments(1, n, n, d), naive_loops)->UseRealTime();
        }
    // the backward pass, fused against unfused, at the reference shape and a shorter one
    for (const std::size_t d : depths)
        for (const std::size_t n : smoke ? std::vector<std::size_t>{33} : std::vector<std::size_t>{512, 2048}) {
            const auto args = arguments(smoke ? 2 : 8, n, n, d);
            add("sdpa_backward/cpu/fused", args, [](benchmark::State& st) { attnfuse_cpu_backward<family::sdpa>(st, {execution::fused}); })->UseRealTime();
            add("sdpa_backward/cpu/unfused", args, [](benchmark::State& st) { attnfuse_cpu_backward<family::sdpa>(st, {execution::unfused}); })->UseRealTime();
            add("sdpa_causal_backward/cpu/fused", args, [](benchmark::State& st) { attnfuse_cpu_backward<family::causal>(st, {execution::fused}); })->UseRealTime();
            add("sdpa_causal_backward/cpu/unfused", args, [](benchmark::State& st) { attnfuse_cpu_backward<family::causal>(st, {execution::unfused}); })->UseRealTime();
            add("sdpa_backward/cpu/fused_from_training_forward", args,
                [](benchmark::State& st) { attnfuse_cpu_backward<family::sdpa>(st, {execution::fused}, true); })->UseRealTime();
            add("sdpa_causal_backward/cpu/fused_from_training_forward", args,
                [](benchmark::State& st) { attnfuse_cpu_backward<family::causal>(st, {execution::fused}, true); })->UseRealTime();
            // pointwise weights and hard attention (no row statistics)
            for (const auto mode : {execution::fused, execution::unfused}) {
                const std::string row = mode == execution::fused ? "fused" : "unfused";
                add("sigmoid_causal_backward/cpu/" + row, args,
                    [mode](benchmark::State& st) { attnfuse_cpu_backward<family::sigmoid>(st, {mode}); })->UseRealTime();
                add("hard_backward/cpu/" + row, args,
                    [mode](benchmark::State& st) { attnfuse_cpu_backward<family::hard>(st, {mode}); })->UseRealTime();
                // ALiBi with its slopes trained: the causal dot-core backward plus two forwards of softmax(s) % G
                add("alibi_backward/cpu/" + row, args,
                    [mode](benchmark::State& st) { attnfuse_cpu_backward<family::alibi>(st, {mode}); })->UseRealTime();
            }
            // lavapipe: d 64 only
            if (vulkan_on_cpu && !smoke && d != 64) continue;
            for (const auto mode : {vk::execution::fused, vk::execution::unfused}) {
                const std::string row = mode == vk::execution::fused ? "fused" : "unfused";
                for (auto* b : {add("sdpa_backward/vulkan/" + row, args,
                                    [mode](benchmark::State& st) { attnfuse_vulkan_backward<family::sdpa>(st, mode); }),
                                add("sdpa_causal_backward/vulkan/" + row, args,
                                    [mode](benchmark::State& st) { attnfuse_vulkan_backward<family::causal>(st, mode); }),
                                add("sigmoid_causal_backward/vulkan/" + row, args,
                                    [mode](benchmark::State& st) { attnfuse_vulkan_backward<family::sigmoid>(st, mode); }),
                                add("hard_backward/vulkan/" + row, args,
                                    [mode](benchmark::State& st) { attnfuse_vulkan_backward<family::hard>(st, mode); }),
                                add("alibi_backward/vulkan/" + row, args,
                                    [mode](benchmark::State& st) { attnfuse_vulkan_backward<family::alibi>(st, mode); })}) {
                    b->UseManualTime();
                    if (!smoke) b->Iterations(vulkan_on_cpu ? 2 : 5);
                }
            }
            // the training forward beside the plain one, and the backward given its statistics
            for (auto* b : {add("sdpa_backward/vulkan/fused_from_training_forward", args,
                                [](benchmark::State& st) { attnfuse_vulkan_backward<family::sdpa>(st, vk::execution::fused, true); }),
                            add("sdpa_forward/vulkan/fused", args,
                                [](benchmark::State& st) { attnfuse_vulkan_forward<family::sdpa>(st, vk::execution::fused, false); }),
                            add("sdpa_training_forward/vulkan/fused", args,
                                [](benchmark::State& st) { attnfuse_vulkan_forward<family::sdpa>(st, vk::execution::fused, true); }),
                            add("sdpa_forward/vulkan/unfused", args,
                                [](benchmark::State& st) { attnfuse_vulkan_forward<family::sdpa>(st, vk::execution::unfused, false); }),
                            add("sdpa_training_forward/vulkan/unfused", args,
                                [](benchmark::State& st) { attnfuse_vulkan_forward<family::sdpa>(st, vk::execution::unfused, true); })}) {
                b->UseManualTime();
                if (!smoke) b->Iterations(vulkan_on_cpu ? 2 : 5);
            }
        }
    // decode: one query per head against a growing cache, 32 heads, d 128
    std::vector<std::size_t> caches{1024, 4096, 16384};
    if (smoke) caches = {65};
    for (const std::size_t nk : caches) {
        const auto args = arguments(smoke ? 2 : 32, 1, nk, smoke ? 16 : 128);
        add("decode/cpu/fused", args, [](benchmark::State& st) { attnfuse_cpu<family::sdpa>(st, {execution::fused}); })->UseRealTime();
        add("decode/cpu/unfused", args, [](benchmark::State& st) { attnfuse_cpu<family::sdpa>(st, {execution::unfused}); })->UseRealTime();
        add("decode/cpu/fused_f16", args, [](benchmark::State& st) { attnfuse_cpu<family::sdpa, af::half>(st, {execution::fused}); })->UseRealTime();
        add("decode/cpu/fused_bf16", args, [](benchmark::State& st) { attnfuse_cpu<family::sdpa, af::bfloat16>(st, {execution::fused}); })->UseRealTime();
        add("decode/cpu/openblas_unfused", args, openblas_unfused)->UseRealTime();
        {
            auto* b = add("decode/vulkan/fused_f16", args, [](benchmark::State& st) { attnfuse_vulkan<family::sdpa, af::half>(st, vk::execution::fused); });
            b->UseManualTime();
            if (!smoke) b->Iterations(vulkan_on_cpu ? 2 : 5);
        }
        for (const bool earlier : {false, true})
            for (const auto mode : {vk::execution::fused, vk::execution::unfused}) {
                const std::string row = mode == vk::execution::fused ? (earlier ? "fused_staged" : "fused") : (earlier ? "unfused_elementwise" : "unfused");
                auto* b = add("decode/vulkan/" + row, args, [mode, earlier](benchmark::State& st) { attnfuse_vulkan<family::sdpa>(st, mode, earlier); });
                b->UseManualTime();
                if (!smoke) b->Iterations(vulkan_on_cpu ? 2 : 5);
            }
    }
}

std::string cpu_model() {
    std::ifstream info("/proc/cpuinfo");
    for (std::string line; std::getline(info, line);)
        if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos) return line.substr(line.find(':') + 2);
    return "unknown processor";
}

}  // namespace

int main(int argc, char** argv) {
    // our flags first, out of Google Benchmark's way
    if (argc == 2 && std::strncmp(argv[1], "--attnfuse_openblas_child=", 26) == 0) return openblas_child(argv[1] + 26);
    {
        char path[4096] = {};
        const ssize_t length = readlink("/proc/self/exe", path, sizeof path - 1);
        self_path = length > 0 ? std::string(path, static_cast<std::size_t>(length)) : std::string(argv[0]);
    }
    int kept = 1;
    for (int a = 1; a < argc; ++a) {
        if (std::strcmp(argv[a], "--attnfuse_smoke") == 0) smoke = true;
        else if (std::strncmp(argv[a], "--attnfuse_max_n=", 17) == 0) max_n = std::strtoul(argv[a] + 17, nullptr, 10);
        else argv[kept++] = argv[a];
    }
    argc = kept;
    register_all();
    benchmark::AddCustomContext("cpu", cpu_model() + ": " + af::cpu::describe(af::cpu::this_machine()));
    if (const auto* dev = bench_device()) benchmark::AddCustomContext("vulkan_device", dev->info().name + " (" + dev->info().driver + ")");
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
