#include <algorithm>
#include <cstdlib>
#include <string>
#include <vulkan/vulkan_raii.hpp>

#include "attnfuse/vulkan.hpp"

namespace attnfuse::vulkan {

std::string_view to_string(device_kind kind) {
    switch (kind) {
        case device_kind::discrete_gpu: return "discrete GPU";
        case device_kind::integrated_gpu: return "integrated GPU";
        case device_kind::virtual_gpu: return "virtual GPU";
        case device_kind::cpu: return "CPU";
        case device_kind::other: break;
    }
    return "other";
}

std::string_view to_string(fused_design design) {
    switch (design) {
        case fused_design::automatic: return "automatic";
        case fused_design::staged_tiles: return "staged tiles";
        case fused_design::register_rows: return "register rows";
        case fused_design::matrix_tiles: return "matrix tiles";
    }
    return "unknown";
}

std::string api_version_to_string(std::uint32_t v) {
    return std::to_string(VK_API_VERSION_MAJOR(v)) + "." + std::to_string(VK_API_VERSION_MINOR(v)) + "." +
           std::to_string(VK_API_VERSION_PATCH(v));
}

namespace {

constexpr const char* install_hint =
    "install a Vulkan driver; without a GPU, Mesa's software device lavapipe: "
    "apt-get install mesa-vulkan-drivers libvulkan1";

device_kind kind_of(vk::PhysicalDeviceType t) {
    switch (t) {
        case vk::PhysicalDeviceType::eDiscreteGpu: return device_kind::discrete_gpu;
        case vk::PhysicalDeviceType::eIntegratedGpu: return device_kind::integrated_gpu;
        case vk::PhysicalDeviceType::eVirtualGpu: return device_kind::virtual_gpu;
        case vk::PhysicalDeviceType::eCpu: return device_kind::cpu;
        default: return device_kind::other;
    }
}

int preference(device_kind k) {
    switch (k) {
        case device_kind::discrete_gpu: return 0;
        case device_kind::integrated_gpu: return 1;
        case device_kind::virtual_gpu: return 2;
        case device_kind::cpu: return 3;
        case device_kind::other: break;
    }
    return 4;
}

}  // namespace

std::vector<device_info> list_devices() {
    std::vector<device_info> out;
    try {
        vk::raii::Context context;
        vk::ApplicationInfo app{"attnfuse", 1, "attnfuse", 1, VK_API_VERSION_1_1};
        vk::InstanceCreateInfo create{{}, &app};
        vk::raii::Instance instance(context, create);
        std::size_t index = 0;
        for (const auto& physical : instance.enumeratePhysicalDevices()) {
            const auto props2 =
                physical.getProperties2<vk::PhysicalDeviceProperties2, vk::PhysicalDeviceDriverProperties>();
            const auto& props = props2.get<vk::PhysicalDeviceProperties2>().properties;
            const auto& driver = props2.get<vk::PhysicalDeviceDriverProperties>();
            device_info info;
            info.index = index++;
            info.name = props.deviceName.data();
            info.kind = kind_of(props.deviceType);
            info.api_version = props.apiVersion;
            info.driver = std::string(driver.driverName.data()) + " " + driver.driverInfo.data();
            for (const auto& family : physical.getQueueFamilyProperties())
                info.has_compute_queue = info.has_compute_queue || bool(family.queueFlags & vk::QueueFlagBits::eCompute);
            out.push_back(std::move(info));
        }
    } catch (const vk::SystemError& e) {
        throw no_device_error(std::string("attnfuse: cannot create a Vulkan instance (") + e.what() + "); " +
                              install_hint);
    }
    if (out.empty()) throw no_device_error(std::string("attnfuse: the Vulkan loader found no device; ") + install_hint);
    return out;
}

device_info default_device() {
    std::vector<device_info> devices = list_devices();
    if (const char* wanted = std::getenv("ATTNFUSE_VK_DEVICE"); wanted && *wanted) {
        const std::string w(wanted);
        const bool numeric = std::all_of(w.begin(), w.end(), [](char c) { return c >= '0' && c <= '9'; });
        for (const auto& d : devices)
            if ((numeric && std::to_string(d.index) == w) || (!numeric && d.name.find(w) != std::string::npos))
                return d;
        std::string names;
        for (const auto& d : devices) names += "\n  " + std::to_string(d.index) + ": " + d.name;
        throw no_device_error("attnfuse: ATTNFUSE_VK_DEVICE=" + w + " matches no Vulkan device; the devices are:" +
                              names);
    }
    std::stable_sort(devices.begin(), devices.end(),
                     [](const device_info& a, const device_info& b) { return preference(a.kind) < preference(b.kind); });
    for (const auto& d : devices)
        if (d.has_compute_queue) return d;
    throw no_device_error(std::string("attnfuse: no Vulkan device has a compute queue; ") + install_hint);
}

}  // namespace attnfuse::vulkan
