// The Vulkan backend's public face. No Vulkan or glslang header is included
// here: both stay inside the library.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace attnfuse::vulkan {

// A Vulkan call failed; the message names the call and the VkResult.
class error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// No Vulkan device (or no loader) on this machine.
class no_device_error : public error {
public:
    using error::error;
};

// glslang rejected a generated shader: an internal bug, never a user error.
class shader_compile_error : public error {
public:
    using error::error;
};

enum class device_kind { discrete_gpu, integrated_gpu, virtual_gpu, cpu, other };
std::string_view to_string(device_kind kind);

struct device_info {
    std::size_t index = 0;      // position in the loader's enumeration
    std::string name;           // e.g. "llvmpipe (LLVM 15.0.6, 256 bits)"
    device_kind kind = device_kind::other;
    std::uint32_t api_version = 0;
    std::string driver;         // driver name and version, where the device reports them
    bool has_compute_queue = false;
};

std::string api_version_to_string(std::uint32_t version);

// Every physical device the Vulkan loader sees. Throws no_device_error when
// the loader is missing or finds none.
std::vector<device_info> list_devices();

// The device attnfuse uses by default: ATTNFUSE_VK_DEVICE (an index or a
// substring of the name) when set, else the first discrete GPU, then
// integrated, virtual, then CPU devices such as lavapipe.
device_info default_device();

// GLSL compute shader text to SPIR-V words (Vulkan 1.1 target), with glslang.
std::vector<std::uint32_t> compile_compute_shader(std::string_view glsl_source, std::string_view name = "shader");

}  // namespace attnfuse::vulkan
