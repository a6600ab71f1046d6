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
#include <cmath>
#include <memory>

#include "variants.hpp"

namespace af = attnfuse;
namespace vk = attnfuse::vulkan;

namespace {

double relative_error(const std::vector<double>& ref, const std::vector<float>& out) {
    REQUIRE(out.size() == ref.size());
    double worst = 0, scale = 1;
    for (std::size_t n = 0; n < ref.size(); ++n) {
        if (std::isnan(ref[n]) != std::isnan(out[n])) return INFINITY;
        if (std::isnan(ref[n])) continue;
        worst = std::max(worst, std::abs(ref[n] - out[n]));
        scale = std::max(scale, std::abs(ref[n]));
    }
    return worst / scale;
}

vk::device* shared_device() {
    static std::unique_ptr<vk::device> dev = []() -> std::unique_ptr<vk::device> {
        try {
            return std::make_unique<vk::device>(vk::default_device(), vk::device_options{true});
        } catch (const vk::no_device_error&) {
            return nullptr;
        }
    }();
    return dev.get();
}

}  // namespace

TEST_CASE("every variant runs fused and unfused on Vulkan and agrees with the reference and the CPU", "[vulkan]") {
    vk::device* dev = shared_device();
    if (!dev) {
        WARN("SKIP: no Vulkan device");
        return;
    }
    const af::variants::shape shapes[] = {{2, 2, 7, 13, 5, 3}, {1, 2, 33, 65, 31, 7}, {2, 1, 1, 3, 1, 1}};
    for (const auto& s : shapes) {
        af::variants::for_each(s, [&](const af::variants::variant& v, const auto& e, const auto&... bindings) {
            const double tolerance = v.name.find("1e4") != std::string::npos ? 1e-2 : 1e-4;
            const auto ref = af::reference::evaluate(e, bindings...);
            const auto cpu = af::cpu::run(e, bindings...).output;
            for (const auto mode : {vk::execution::fused, vk::execution::unfused}) {
                INFO(v.name << " | " << af::to_string(e) << (mode == vk::execution::fused ? " | fused" : " | unfused"));
                const auto [out, info] = vk::run(*dev, e, vk::options{mode}, bindings...);
                CHECK(relative_error(ref.values, out.values) <= tolerance);
                std::vector<double> cpu_values(cpu.values.begin(), cpu.values.end());
                CHECK(relative_error(cpu_values, out.values) <= tolerance);
                CHECK(dev->validation_messages() == 0);
                INFO(dev->last_validation_message());
            }
        });
    }
}
