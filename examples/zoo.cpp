// attnfuse-zoo, the README's main job: every variant of VARIANTS.md at a
// modest size, fused and unfused, with its error against the
// double-precision reference, its time, its intermediate memory and its
// kernels. Exits non-zero when an error exceeds its tolerance.
//
// Times tell what a user gets: `first` is the first run of the expression in
// this process (on Vulkan it includes `build`, compiling shaders and building
// pipelines, which later runs skip; on the CPU, the first touch of the
// kernels' scratch); `ms` is the median of the warm runs after it; `x` is the
// unfused median over the fused one (above 1: fusion is faster).
//
// Rows whose mode ends in "bwd" are the backward pass (cpu::backward and
// vulkan::backward, for the variants they cover): the gradients of every input against the
// reference backward's, for a fixed output gradient; their `ms` leaves out
// the forward they start from.
//
//   attnfuse-zoo [--json] [--list-devices] [--device <index or name>]
#include <attnfuse/cpu.hpp>
#include <attnfuse/cpu/backward.hpp>
#include <attnfuse/vulkan/backward.hpp>
#include <attnfuse/dsl.hpp>
#include <attnfuse/vulkan.hpp>
#include <attnfuse/vulkan/executor.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "variants.hpp"

namespace af = attnfuse;

namespace {

struct row {
    std::string variant, family, backend, mode, formula;
    double first_ms = 0, build_ms = 0, milliseconds = 0, error = 0, tolerance = 0;
    double speedup = 0;  // unfused over fused median, on the fused row
    std::size_t intermediate_bytes = 0, score_bytes = 0, kernels = 0;
    bool fused() const { return mode.rfind("fused", 0) == 0; }
    // within tolerance, and a fused row materialises no score matrix
    bool ok() const { return error <= tolerance && (!fused() || score_bytes == 0); }
};

std::string json_escape(const std::string& s) {
    std::string out;
    for (char c : s) {
        if (c == '"' || c == '\\') out += '\\';
        out += c;
    }
    return out;
}

void list_devices() {
    std::printf("CPU: %s\n", af::cpu::describe(af::cpu::this_machine()).c_str());
    try {
        for (const auto& dev : af::vulkan::list_devices())
            std::printf("Vulkan device %zu: %s (%s, Vulkan %s, %s)\n", dev.index, dev.name.c_str(),
                        std::string(af::vulkan::to_string(dev.kind)).c_str(),
                        af::vulkan::api_version_to_string(dev.api_version).c_str(), dev.driver.c_str());
        std::printf("default Vulkan device: %s\n", af::vulkan::default_device().name.c_str());
    } catch (const af::vulkan::error& e) {
        std::printf("Vulkan: %s\n", e.what());
    }
}

// The first run, then the median of `warm` more; `run()` returns the run's
// output, its report's wall seconds and (Vulkan) build seconds, or a
// backward_result (its report's wall seconds).
template <class Run>
auto timed(int warm, Run&& run) {
    auto wall_of = [](const auto& result) {
        if constexpr (requires { result.wall; }) return result.wall;
        else return result.info.wall_seconds;
    };
    auto first = run();
    std::vector<double> ms;
    for (int n = 0; n < warm; ++n) ms.push_back(wall_of(run()) * 1e3);
    std::sort(ms.begin(), ms.end());
    const double median = ms.empty() ? wall_of(first) * 1e3 : ms[ms.size() / 2];
    return std::tuple{std::move(first), median};
}

}  // namespace

int main(int argc, char** argv) {
    bool json = false;
    for (int a = 1; a < argc; ++a) {
        if (!std::strcmp(argv[a], "--json")) json = true;
        else if (!std::strcmp(argv[a], "--list-devices")) {
            list_devices();
            return 0;
        } else if (!std::strcmp(argv[a], "--device") && a + 1 < argc) {
            ::setenv("ATTNFUSE_VK_DEVICE", argv[++a], 1);  // the same choice rule as every other program
        } else {
            std::fprintf(stderr, "usage: attnfuse-zoo [--json] [--list-devices] [--device <index or name substring>]\n");
            return 2;
        }
    }
    std::unique_ptr<af::vulkan::device> gpu;
    std::string vulkan_status;
    try {
        gpu = std::make_unique<af::vulkan::device>();
        vulkan_status = "Vulkan device: " + gpu->info().name;
    } catch (const af::vulkan::error& e) {
        vulkan_status = std::string("no Vulkan rows: ") + e.what();
    }

    constexpr int warm_runs_cpu = 7, warm_runs_vulkan = 3;
    // batch 2, heads 4, 100 queries, 333 keys, d_k 48, d_v 40: several tiles, none full
    const af::variants::shape shape{2, 4, 100, 333, 48, 40};
    std::vector<row> rows;
    af::variants::for_each(shape, [&](const af::variants::variant& v, const auto& e, const auto&... bindings) {
        if (!json) std::fprintf(stderr, "  running %-52s\r", v.name.c_str());
        const auto ref = af::reference::evaluate(e, bindings...);
        // scores near 1e4 carry fp32 rounding of ~1e-3 per score into softmax
        const double tolerance = v.name.find("1e4") != std::string::npos ? 1e-2 : 1e-4;
        struct outcome {
            af::tensor out;
            double wall, build;
            std::size_t intermediate, scores, kernels;
            double tolerance;  // the run's: bf16-rounded weights loosen it (variants::tolerance_of_run)
        };
        for (const auto mode : {af::cpu::execution::fused, af::cpu::execution::unfused}) {
            const auto [first, median] = timed(warm_runs_cpu, [&] {
                auto [out, info] = af::cpu::run(e, af::cpu::options{mode}, bindings...);
                return outcome{std::move(out), info.wall_seconds, 0, info.intermediate_bytes, info.score_bytes, info.kernels.size(),
                               af::variants::tolerance_of_run(tolerance, info)};
            });
            rows.push_back({v.name, v.family, "cpu", mode == af::cpu::execution::fused ? "fused" : "unfused", af::to_string(e),
                            first.wall * 1e3, 0, median, af::variants::relative_error(ref.values, first.out.values), first.tolerance, 0,
                            first.intermediate, first.scores, first.kernels});
        }
        if (gpu)
            for (const auto mode : {af::vulkan::execution::fused, af::vulkan::execution::unfused}) {
                const auto [first, median] = timed(warm_runs_vulkan, [&] {
                    auto [out, info] = af::vulkan::run(*gpu, e, af::vulkan::options{mode}, bindings...);
                    return outcome{std::move(out), info.wall_seconds, info.build_seconds, info.intermediate_bytes, info.score_bytes, info.dispatches,
                                   af::variants::tolerance_of_run(tolerance, info)};
                });
                rows.push_back({v.name, v.family, "vk", mode == af::vulkan::execution::fused ? "fused" : "unfused", af::to_string(e),
                                first.wall * 1e3, first.build * 1e3, median, af::variants::relative_error(ref.values, first.out.values),
                                first.tolerance, 0, first.intermediate, first.scores, first.kernels});
            }
        if constexpr (af::plan::backend_backward_v<std::remove_cvref_t<decltype(e)>>) {
            // the backward of the fused forward's output, for a fixed output gradient in [-1, 1)
            const af::tensor output = af::cpu::run(e, bindings...).output;
            af::tensor d_output = output;
            for (std::size_t n = 0; n < d_output.values.size(); ++n) d_output.values[n] = static_cast<float>(std::sin(0.7 * double(n)));
            const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                                    std::vector<double>(d_output.values.begin(), d_output.values.end())};
            const af::reference::gradients expected = af::reference::backward(e, d_reference, bindings...);
            // both modes of one backend's backward(mode), each gradient against the reference
            auto backward_rows = [&](const char* backend, int warm, const auto& backward) {
                for (const auto mode : {af::execution::fused, af::execution::unfused}) {
                    const auto [first, median] = timed(warm, [&] { return backward(mode); });
                    double error = 0;  // the worst input's
                    for (const af::reference::input_gradient& want : expected.inputs)
                        error = std::max(error, af::variants::relative_error(want.values, first.of(want.name).values));
                    rows.push_back({v.name, v.family, backend, mode == af::execution::fused ? "fused bwd" : "unfused bwd", af::to_string(e),
                                    first.info.wall_seconds * 1e3, first.info.build_seconds * 1e3, median, error, tolerance, 0,
                                    first.info.intermediate_bytes, first.info.score_bytes, first.info.dispatches});
                }
            };
            backward_rows("cpu", warm_runs_cpu, [&](af::execution mode) { return af::cpu::backward(e, output, d_output, af::cpu::options{mode}, bindings...); });
            if (gpu)
                backward_rows("vk", warm_runs_vulkan, [&](af::execution mode) {
                    return af::vulkan::backward(*gpu, e, output, d_output, af::vulkan::options{mode}, bindings...);
                });
        }
    });
    // fused rows carry the ratio of the unfused median to theirs
    for (auto& r : rows)
        if (r.fused())
            for (const auto& u : rows)
                if (u.mode == "un" + r.mode && u.variant == r.variant && u.backend == r.backend) r.speedup = u.milliseconds / r.milliseconds;

    bool all_ok = true;
    for (const auto& r : rows) all_ok = all_ok && r.ok();
    if (json) {
        std::printf("[\n");
        for (std::size_t n = 0; n < rows.size(); ++n) {
            const row& r = rows[n];
            std::printf("  {\"variant\": \"%s\", \"family\": \"%s\", \"backend\": \"%s\", \"mode\": \"%s\", \"expression\": \"%s\", "
                        "\"first_ms\": %.4f, \"build_ms\": %.4f, \"ms\": %.4f, \"unfused_over_fused\": %.3f, "
                        "\"error\": %.3e, \"tolerance\": %.0e, \"intermediate_bytes\": %zu, \"score_bytes\": %zu, \"kernels\": %zu}%s\n",
                        json_escape(r.variant).c_str(), r.family.c_str(), r.backend.c_str(), r.mode.c_str(),
                        json_escape(r.formula).c_str(), r.first_ms, r.build_ms, r.milliseconds, r.speedup, r.error, r.tolerance,
                        r.intermediate_bytes, r.score_bytes, r.kernels, n + 1 < rows.size() ? "," : "");
        }
        std::printf("]\n");
    } else {
        std::fprintf(stderr, "%70s\r", "");
        std::printf("attnfuse zoo: batch %zu, heads %zu, n_q %zu, n_k %zu, d_k %zu, d_v %zu; error = max|out - ref| / max(1, max|ref|)\n\n",
                    shape.batch, shape.heads, shape.n_q, shape.n_k, shape.d, shape.d_v);
        std::printf("%-48s %-4s %-11s %9s %9s %9s %6s %10s %14s %12s %7s\n", "variant", "on", "mode", "first ms", "build ms", "ms", "x",
                    "error", "intermediate B", "score B", "kernels");
        std::printf("(on: cpu, or vk for %s; first ms: the first run in this process, build ms of it compiling shaders and building\n"
                    " pipelines; ms: median of %d (cpu) or %d (vk) warm runs after it; x: unfused ms / fused ms; score B: bytes of\n"
                    " n_q x n_k scores or weights materialised; kernels: kernels run, or dispatches on Vulkan; bwd: the backward\n"
                    " pass, its error the worst input gradient's against the reference backward)\n",
                    gpu ? gpu->info().name.c_str() : "no Vulkan device", warm_runs_cpu, warm_runs_vulkan);
        for (const auto& r : rows) {
            char ratio[16] = "";
            if (r.fused()) std::snprintf(ratio, sizeof ratio, "%.2f", r.speedup);
            std::printf("%-48s %-4s %-11s %9.3f %9.3f %9.3f %6s %10.2e %14zu %12zu %7zu%s\n", r.variant.c_str(), r.backend.c_str(),
                        r.mode.c_str(), r.first_ms, r.build_ms, r.milliseconds, ratio, r.error, r.intermediate_bytes, r.score_bytes,
                        r.kernels, r.ok() ? "" : "  <-- over tolerance");
        }
        std::printf("\n");
        list_devices();
        std::printf("%s\n", vulkan_status.c_str());
        std::printf("\n%s\n", all_ok ? "every error within tolerance" : "SOME ERRORS EXCEED THEIR TOLERANCE");
    }
    return all_ok ? 0 : 1;
}
