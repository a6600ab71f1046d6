// The Vulkan layer's foundations: device discovery and GLSL to SPIR-V.
#include <attnfuse/cpu.hpp>
#include <attnfuse/vulkan.hpp>
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

namespace vk = attnfuse::vulkan;
using Catch::Matchers::Contains;

namespace {

constexpr const char* axpy_shader = R"(#version 450
layout(local_size_x = 64) in;
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) buffer Y { float y[]; };
layout(push_constant) uniform Params { float alpha; uint n; } params;
void main() {
    uint id = gl_GlobalInvocationID.x;
    if (id < params.n) y[id] += params.alpha * x[id];
}
)";

// Runs spirv-val on the words; true when it accepts them.
bool spirv_val_accepts(const std::vector<std::uint32_t>& words, const std::string& path) {
    {
        std::ofstream out(path, std::ios::binary);
        out.write(reinterpret_cast<const char*>(words.data()), static_cast<std::streamsize>(words.size() * 4));
    }
    const std::string command = std::string(ATTNFUSE_SPIRV_VAL) + " --target-env vulkan1.1 " + path;
    const int status = std::system(command.c_str());
    std::remove(path.c_str());
    return status == 0;
}

}  // namespace

TEST_CASE("glslang compiles a compute shader to SPIR-V that spirv-val accepts", "[vulkan]") {
    const auto words = vk::compile_compute_shader(axpy_shader, "axpy");
    REQUIRE(words.size() > 5);
    CHECK(words[0] == 0x07230203u);  // the SPIR-V magic number
    CHECK(spirv_val_accepts(words, "attnfuse_test_axpy.spv"));
}

TEST_CASE("a shader glslang rejects is an internal error that shows the log and source", "[vulkan]") {
    CHECK_THROWS_MATCHES(vk::compile_compute_shader("#version 450\nvoid main() { undefined_name = 1; }\n", "broken"),
                         vk::shader_compile_error, Catch::Matchers::Predicate<std::exception>([](const std::exception& e) {
                             const std::string what = e.what();
                             return what.find("broken") != std::string::npos &&
                                    what.find("undefined_name") != std::string::npos;
                         }));
}

TEST_CASE("device discovery lists the Vulkan devices and honours ATTNFUSE_VK_DEVICE", "[vulkan]") {
    std::vector<vk::device_info> devices;
    try {
        devices = vk::list_devices();
    } catch (const vk::no_device_error& e) {
        CHECK_THAT(e.what(), Contains("mesa-vulkan-drivers"));
        WARN("SKIP: no Vulkan device here: " << e.what());
        return;
    }
    for (const auto& d : devices) {
        INFO(d.index << ": " << d.name << " (" << vk::to_string(d.kind) << ")");
        CHECK(!d.name.empty());
        CHECK(d.api_version >= (1u << 22 | 1u << 12));
    }
    const auto chosen = vk::default_device();
    CHECK(chosen.has_compute_queue);

    ::setenv("ATTNFUSE_VK_DEVICE", "0", 1);
    CHECK(vk::default_device().index == 0);
    ::setenv("ATTNFUSE_VK_DEVICE", devices[0].name.substr(0, 4).c_str(), 1);
    CHECK(vk::default_device().name.find(devices[0].name.substr(0, 4)) != std::string::npos);
    ::setenv("ATTNFUSE_VK_DEVICE", "no such device name", 1);
    CHECK_THROWS_WITH(vk::default_device(), Contains("matches no Vulkan device") && Contains(devices[0].name));
    ::unsetenv("ATTNFUSE_VK_DEVICE");
}

TEST_CASE("the CPU backend reports this machine", "[cpu]") {
    const auto m = attnfuse::cpu::this_machine();
    CHECK(m.threads >= 1);
    CHECK_THAT(attnfuse::cpu::describe(m), Contains("threads"));
}

TEST_CASE("a device runs a kernel: buffers, push constants, timestamps, no validation message", "[vulkan]") {
    std::unique_ptr<vk::device> dev;
    try {
        dev = std::make_unique<vk::device>(vk::default_device(), vk::device_options{true});
    } catch (const vk::no_device_error& e) {
        WARN("SKIP: no Vulkan device here: " << e.what());
        return;
    }
    const std::uint32_t n = 1000;  // not a multiple of the workgroup size
    std::vector<float> x(n), y(n);
    for (std::uint32_t k = 0; k < n; ++k) {
        x[k] = static_cast<float>(k);
        y[k] = 1.0f;
    }
    const auto bx = dev->create_buffer(n * 4, "x"), by = dev->create_buffer(n * 4, "y");
    dev->upload(bx, x.data(), n * 4);
    dev->upload(by, y.data(), n * 4);
    const auto kernel = dev->kernel(axpy_shader, "axpy", 2, 8);
    struct {
        float alpha;
        std::uint32_t n;
    } params{0.5f, n};
    dev->dispatch(kernel, {bx, by}, &params, sizeof params, (n + 63) / 64);
    dev->dispatch(kernel, {bx, by}, &params, sizeof params, (n + 63) / 64);
    const double seconds = dev->submit_and_wait();
    CHECK(seconds >= 0);
    dev->download(by, y.data(), n * 4);
    for (std::uint32_t k = 0; k < n; ++k) REQUIRE(y[k] == 1.0f + static_cast<float>(k));  // two dispatches of y += x/2
    // the same source again is the same pipeline
    CHECK(dev->kernel(axpy_shader, "axpy", 2, 8) == kernel);
    CHECK(dev->validation_messages() == 0);
    INFO(dev->last_validation_message());
}

TEST_CASE("a second device finds the SPIR-V in the disk cache", "[vulkan]") {
    try {
        vk::device first;
        (void)first.kernel(axpy_shader, "axpy", 2, 8);
    } catch (const vk::no_device_error& e) {
        WARN("SKIP: no Vulkan device here: " << e.what());
        return;
    }
    vk::device second;  // as a new process would: nothing compiled in it yet
    CHECK(second.kernel_from_disk_cache(second.kernel(axpy_shader, "axpy", 2, 8)));
}

TEST_CASE("buffers beyond maxStorageBufferRange are refused with a clear error", "[vulkan]") {
    std::unique_ptr<vk::device> dev;
    try {
        dev = std::make_unique<vk::device>();
    } catch (const vk::no_device_error& e) {
        WARN("SKIP: no Vulkan device here: " << e.what());
        return;
    }
    const auto too_big = static_cast<std::size_t>(dev->limits().max_storage_buffer_range) + 4;
    CHECK_THROWS_AS(dev->create_buffer(too_big, "the score matrix"), vk::out_of_memory_error);
    CHECK_THROWS_WITH(dev->create_buffer(too_big, "the score matrix"), Contains("the score matrix") && Contains("maxStorageBufferRange"));
}
