// What every example does after writing its expression: run it fused on the
// CPU and on the default Vulkan device, unfused too, and compare each with
// the double-precision reference.
#pragma once
#include <attnfuse/cpu.hpp>
#include <attnfuse/dsl.hpp>
#include <attnfuse/vulkan/executor.hpp>

#include <cmath>
#include <cstdio>
#include <memory>
#include <string>

#include "variants.hpp"

namespace example {

inline attnfuse::vulkan::device* gpu() {
    static std::unique_ptr<attnfuse::vulkan::device> dev = []() -> std::unique_ptr<attnfuse::vulkan::device> {
        try {
            return std::make_unique<attnfuse::vulkan::device>();
        } catch (const attnfuse::vulkan::error& e) {
            std::printf("(no Vulkan: %s)\n", e.what());
            return nullptr;
        }
    }();
    return dev.get();
}

// Runs `e` every way; returns false (and says so) when an error exceeds 1e-4.
template <class E, class... B>
bool check(const std::string& name, const E& e, const B&... bindings) {
    namespace af = attnfuse;
    const auto ref = af::reference::evaluate(e, bindings...);
    std::printf("%s\n  %s\n", name.c_str(), af::to_string(e).c_str());
    bool ok = true;
    auto report = [&](const char* where, double error, std::size_t kernels, std::size_t score_bytes) {
        std::printf("  %-16s error %.2e, %zu kernel(s), %zu bytes of scores\n", where, error, kernels, score_bytes);
        ok = ok && error <= 1e-4;
    };
    for (const auto mode : {af::cpu::execution::fused, af::cpu::execution::unfused}) {
        const auto r = af::cpu::run(e, af::cpu::options{mode}, bindings...);
        report(mode == af::cpu::execution::fused ? "cpu fused" : "cpu unfused", attnfuse::variants::relative_error(ref.values, r.output.values), r.info.kernels.size(),
               r.info.score_bytes);
    }
    if (auto* dev = gpu())
        for (const auto mode : {af::vulkan::execution::fused, af::vulkan::execution::unfused}) {
            const auto r = af::vulkan::run(*dev, e, af::vulkan::options{mode}, bindings...);
            report(mode == af::vulkan::execution::fused ? "vulkan fused" : "vulkan unfused", attnfuse::variants::relative_error(ref.values, r.output.values),
                   r.info.dispatches, r.info.score_bytes);
        }
    return ok;
}

// Deterministic values in [-scale, scale).
inline std::vector<float> values(std::size_t count, unsigned seed, float scale = 1.0f) {
    std::vector<float> v(count);
    unsigned s = seed * 2654435761u + 1;
    for (float& x : v) {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        x = scale * (static_cast<float>(s >> 8) / 8388608.0f - 1.0f);
    }
    return v;
}

}  // namespace example
