// attnfuse-bench: fused against unfused against the peers, in one process.
//
// Names: <variant>/<backend>/<mode>/bh:<batch*heads>/n:<n>/d:<d>. Counters:
// GFLOPS (4 n_q n_k d per head, the two products, per second) and
// intermediate_bytes (what the run allocated besides inputs and output).
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <omp.h>

#include <attnfuse/cpu.hpp>
#include <attnfuse/cpu/kernels.hpp>
#include <attnfuse/cpu/simd.hpp>
#include <attnfuse/vulkan/executor.hpp>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace af = attnfuse;

namespace {

struct problem {
    std::size_t bh, n_q, n_k, d;
    std::vector<float> q, k, v;  // [bh, n, d] row-major each
    problem(std::size_t bh_, std::size_t nq, std::size_t nk, std::size_t d_)
        : bh(bh_), n_q(nq), n_k(nk), d(d_), q(bh * nq * d_), k(bh * nk * d_), v(bh * nk * d_) {
        std::uint32_t s = 12345;
        auto next = [&] {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            return static_cast<float>(s >> 8) / 8388608.0f - 1.0f;
        };
        for (auto* buf : {&q, &k, &v})
            for (float& x : *buf) x = next();
    }
    double flops() const { return 4.0 * double(bh) * double(n_q) * double(n_k) * double(d); }
    // Q, K as columns over the [bh, n, d] arrays, V as rows, heads = bh
    auto bound() const {
        return std::tuple{af::bind(af::matrix<"Q">{}, af::col_major(q.data(), d, n_q, 1, bh)),
                          af::bind(af::matrix<"K">{}, af::col_major(k.data(), d, n_k, 1, bh)),
                          af::bind(af::matrix<"V">{}, af::row_major(v.data(), n_k, d, 1, bh))};
    }
};

void set_counters(benchmark::State& state, double flops, std::size_t intermediate) {
    state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["intermediate_bytes"] = static_cast<double>(intermediate);
}

template <bool Causal>
void attnfuse_cpu(benchmark::State& state, af::cpu::execution mode, std::size_t bh, std::size_t nq, std::size_t nk,
                  std::size_t d) {
    const problem p(bh, nq, nk, d);
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const auto [q, k, v] = p.bound();
    std::size_t intermediate = 0;
    for (auto _ : state) {
        af::cpu::run_result r = Causal ? af::cpu::run(softmax(mask(scale(Q^af::T*K), af::causal))*V, {mode, 0}, q, k, v)
                                       : af::cpu::run(softmax(scale(Q^af::T*K))*V, {mode, 0}, q, k, v);
        benchmark::DoNotOptimize(r.output.values.data());
        intermediate = r.info.intermediate_bytes;
    }
    set_counters(state, p.flops(), intermediate);  // causal counts the dense FLOPs: speedup shows as GFLOPS
}

attnfuse::vulkan::device* bench_device() {
    static std::unique_ptr<attnfuse::vulkan::device> dev = []() -> std::unique_ptr<attnfuse::vulkan::device> {
        try {
            return std::make_unique<attnfuse::vulkan::device>();
        } catch (const attnfuse::vulkan::error&) {
            return nullptr;
        }
    }();
    return dev.get();
}

// Vulkan: the time of each iteration is the device's (timestamps around the
// one submission); wall time, uploads and downloads included, is a counter.
template <bool Causal>
void attnfuse_vulkan(benchmark::State& state, attnfuse::vulkan::execution mode, std::size_t bh, std::size_t nq, std::size_t nk,
                     std::size_t d) {
    auto* dev = bench_device();
    if (!dev) {
        state.SkipWithError("no Vulkan device");
        return;
    }
    const problem p(bh, nq, nk, d);
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const auto [q, k, v] = p.bound();
    attnfuse::vulkan::report last;
    for (auto _ : state) {
        attnfuse::vulkan::run_result r =
            Causal ? attnfuse::vulkan::run(*dev, softmax(mask(scale(Q^af::T*K), af::causal))*V, {mode}, q, k, v)
                   : attnfuse::vulkan::run(*dev, softmax(scale(Q^af::T*K))*V, {mode}, q, k, v);
        state.SetIterationTime(r.info.device_seconds);
        last = r.info;
    }
    set_counters(state, p.flops(), last.intermediate_bytes);
    state.counters["dispatches"] = static_cast<double>(last.dispatches);
    state.counters["wall_ms"] = last.wall_seconds * 1e3;
}

// What a C++ user would write instead: OpenBLAS sgemm for both products and
// a vectorized softmax between them, heads in parallel.
void openblas_unfused(benchmark::State& state, std::size_t bh, std::size_t nq, std::size_t nk, std::size_t d) {
    const problem p(bh, nq, nk, d);
    const int threads = omp_get_max_threads();
    std::vector<float> scores(static_cast<std::size_t>(threads) * nq * nk), out(bh * nq * d);
    openblas_set_num_threads(1);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    for (auto _ : state) {
#pragma omp parallel for schedule(dynamic)
        for (std::ptrdiff_t h = 0; h < static_cast<std::ptrdiff_t>(bh); ++h) {
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
    set_counters(state, p.flops(), scores.size() * sizeof(float));
}

// This machine's fp32 FMA peak on every core: ten independent chains of
// eight-lane FMAs per thread, so that latency never limits throughput.
void peak_fma(benchmark::State& state) {
    using af::cpu::simd::vf;
    constexpr int chains = 10;
    constexpr long steps = 1 << 20;
    const int threads = omp_get_max_threads();
    float sink = 0;
    for (auto _ : state) {
#pragma omp parallel reduction(+ : sink)
        {
            vf acc[chains];
            for (int c = 0; c < chains; ++c) acc[c] = af::cpu::simd::splat(1.0f + 0.001f * float(c + omp_get_thread_num()));
            const vf a = af::cpu::simd::splat(0.999999f), b = af::cpu::simd::splat(1e-7f);
            for (long s = 0; s < steps; ++s)
                for (int c = 0; c < chains; ++c) acc[c] = acc[c] * a + b;
            for (int c = 0; c < chains; ++c) sink += acc[c][0];
        }
        benchmark::DoNotOptimize(sink);
    }
    const double flops = 2.0 * af::cpu::simd::lanes * chains * double(steps) * threads;
    state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["threads"] = threads;
}

void register_all() {
    using af::cpu::execution;
    benchmark::RegisterBenchmark("peak/cpu/fma", peak_fma)->UseRealTime()->Unit(benchmark::kMillisecond);
    struct shape_args {
        std::size_t bh, n, d;
    };
    for (const shape_args s : {shape_args{8, 2048, 64}, shape_args{1, 4096, 128}, shape_args{8, 512, 64}}) {
        const auto args = std::vector<std::int64_t>{std::int64_t(s.bh), std::int64_t(s.n), std::int64_t(s.d)};
        auto add = [&](const std::string& name, auto fn) {
            benchmark::RegisterBenchmark(name.c_str(), fn)->ArgNames({"bh", "n", "d"})->Args(args)->UseRealTime()->Unit(
                benchmark::kMillisecond);
        };
        add("sdpa/cpu/fused", [s](benchmark::State& st) { attnfuse_cpu<false>(st, execution::fused, s.bh, s.n, s.n, s.d); });
        add("sdpa/cpu/unfused", [s](benchmark::State& st) { attnfuse_cpu<false>(st, execution::unfused, s.bh, s.n, s.n, s.d); });
        add("sdpa/cpu/openblas_unfused", [s](benchmark::State& st) { openblas_unfused(st, s.bh, s.n, s.n, s.d); });
        add("sdpa_causal/cpu/fused", [s](benchmark::State& st) { attnfuse_cpu<true>(st, execution::fused, s.bh, s.n, s.n, s.d); });
        add("sdpa_causal/cpu/unfused", [s](benchmark::State& st) { attnfuse_cpu<true>(st, execution::unfused, s.bh, s.n, s.n, s.d); });
    }
    // Vulkan on the default device; on lavapipe (two CPU cores) a few iterations
    for (const shape_args s : {shape_args{8, 2048, 64}, shape_args{8, 512, 64}}) {
        const auto args = std::vector<std::int64_t>{std::int64_t(s.bh), std::int64_t(s.n), std::int64_t(s.d)};
        auto add = [&](const std::string& name, auto fn) {
            benchmark::RegisterBenchmark(name.c_str(), fn)->ArgNames({"bh", "n", "d"})->Args(args)->UseManualTime()->Iterations(3)->Unit(
                benchmark::kMillisecond);
        };
        using attnfuse::vulkan::execution;
        add("sdpa/vulkan/fused", [s](benchmark::State& st) { attnfuse_vulkan<false>(st, execution::fused, s.bh, s.n, s.n, s.d); });
        add("sdpa/vulkan/unfused", [s](benchmark::State& st) { attnfuse_vulkan<false>(st, execution::unfused, s.bh, s.n, s.n, s.d); });
        add("sdpa_causal/vulkan/fused", [s](benchmark::State& st) { attnfuse_vulkan<true>(st, execution::fused, s.bh, s.n, s.n, s.d); });
    }
    // decode: one query against a 4096-entry cache, 32 heads
    auto decode_args = std::vector<std::int64_t>{32, 1, 4096, 128};
    auto add_decode = [&](const std::string& name, auto fn) {
        benchmark::RegisterBenchmark(name.c_str(), fn)->ArgNames({"bh", "nq", "nk", "d"})->Args(decode_args)->UseRealTime()->Unit(
            benchmark::kMillisecond);
    };
    add_decode("decode/cpu/fused", [](benchmark::State& st) { attnfuse_cpu<false>(st, execution::fused, 32, 1, 4096, 128); });
    add_decode("decode/cpu/unfused", [](benchmark::State& st) { attnfuse_cpu<false>(st, execution::unfused, 32, 1, 4096, 128); });
    add_decode("decode/cpu/openblas_unfused", [](benchmark::State& st) { openblas_unfused(st, 32, 1, 4096, 128); });
}

}  // namespace

int main(int argc, char** argv) {
    register_all();
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
