// The default Vulkan device with the validation layers on, opened once per
// test program (nullptr where there is none): the device the Vulkan tests share.
#pragma once
#include <attnfuse/vulkan.hpp>
#include <memory>

namespace attnfuse::vulkan::testing {

inline device* shared_device() {
    static std::unique_ptr<device> dev = []() -> std::unique_ptr<device> {
        try {
            return std::make_unique<device>(default_device(), device_options{true});
        } catch (const no_device_error&) {
            return nullptr;
        }
    }();
    return dev.get();
}

}  // namespace attnfuse::vulkan::testing
