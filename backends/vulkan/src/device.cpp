// The Vulkan device: instance (validation on request), one compute queue,
// buffers, pipelines from cached SPIR-V, batched dispatches with timestamps.
// Every Vulkan failure leaves as an attnfuse::vulkan exception naming the call
// and its VkResult.
#include <glslang/build_info.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>
#include <unistd.h>
#include <vulkan/vulkan_raii.hpp>

#include "attnfuse/vulkan.hpp"

namespace attnfuse::vulkan {

namespace {

[[noreturn]] void rethrow(const vk::SystemError& e, const std::string& what) {
    const auto result = static_cast<vk::Result>(e.code().value());
    const std::string message = "attnfuse: " + what + " failed: " + vk::to_string(result) + " (" + e.what() + ")";
    if (result == vk::Result::eErrorDeviceLost) throw device_lost_error(message + "; open a new attnfuse::vulkan::device");
    if (result == vk::Result::eErrorOutOfDeviceMemory || result == vk::Result::eErrorOutOfHostMemory)
        throw out_of_memory_error(message);
    throw error(message);
}

template <class F>
auto guarded(const std::string& what, F&& f) {
    try {
        return f();
    } catch (const vk::SystemError& e) {
        rethrow(e, what);
    }
}

std::uint64_t fnv1a(std::string_view text, std::uint64_t h = 1469598103934665603ull) {
    for (unsigned char c : text) h = (h ^ c) * 1099511628211ull;
    return h;
}

std::filesystem::path cache_directory() {
    if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) return std::filesystem::path(xdg) / "attnfuse";
    if (const char* home = std::getenv("HOME"); home && *home) return std::filesystem::path(home) / ".cache" / "attnfuse";
    return std::filesystem::temp_directory_path() / "attnfuse-cache";
}

// Cache files carry a header of their own: what they hold, for which key,
// how long it is and a checksum of it, so that a file cut short, garbled or
// swapped with another kernel's is recognised and rebuilt, never used.
struct cache_header {
    char magic[4];
    std::uint32_t format;
    std::uint64_t key;
    std::uint64_t bytes;
    std::uint64_t checksum;
};
constexpr std::uint32_t cache_format = 1;

std::uint64_t checksum(const void* data, std::size_t bytes) {
    return fnv1a(std::string_view(static_cast<const char*>(data), bytes));
}

// The payload of a cache file made for `key`, or nothing with `problem` set
// ("" when the file is simply absent).
std::optional<std::vector<char>> read_cache_file(const std::filesystem::path& file, const char (&magic)[5], std::uint64_t key,
                                                 std::string& problem) {
    problem.clear();
    std::ifstream in(file, std::ios::binary);
    if (!in) return std::nullopt;
    const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    cache_header h{};
    if (bytes.size() < sizeof h) {
        problem = "shorter than its header (" + std::to_string(bytes.size()) + " bytes)";
        return std::nullopt;
    }
    std::memcpy(&h, bytes.data(), sizeof h);
    if (std::memcmp(h.magic, magic, 4) != 0 || h.format != cache_format) {
        problem = "not an attnfuse cache file of this format";
        return std::nullopt;
    }
    if (h.key != key) {
        problem = "made for another kernel or device";
        return std::nullopt;
    }
    if (h.bytes != bytes.size() - sizeof h) {
        problem = "cut short or padded (" + std::to_string(bytes.size() - sizeof h) + " bytes where its header says " +
                  std::to_string(h.bytes) + ")";
        return std::nullopt;
    }
    if (h.checksum != checksum(bytes.data() + sizeof h, h.bytes)) {
        problem = "corrupted (its checksum does not match)";
        return std::nullopt;
    }
    return std::vector<char>(bytes.begin() + sizeof h, bytes.end());
}

// Written aside and renamed: processes running side by side never read half a file.
void write_cache_file(const std::filesystem::path& file, const char (&magic)[5], std::uint64_t key, const void* data,
                      std::size_t bytes, const void* owner) {
    std::error_code ignored;
    std::filesystem::create_directories(file.parent_path(), ignored);
    cache_header h{};
    std::memcpy(h.magic, magic, 4);
    h.format = cache_format;
    h.key = key;
    h.bytes = bytes;
    h.checksum = checksum(data, bytes);
    const auto temporary = file.string() + ".tmp" + std::to_string(fnv1a(std::to_string(reinterpret_cast<std::uintptr_t>(owner)) +
                                                                      std::to_string(::getpid())));
    {
        std::ofstream out(temporary, std::ios::binary);
        if (!out) return;
        out.write(reinterpret_cast<const char*>(&h), sizeof h);
        out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
        if (!out) return;
    }
    std::filesystem::rename(temporary, file, ignored);
}

bool env_flag(const char* name, std::string_view contains = "1") {
    const char* v = std::getenv(name);
    return v && std::string_view(v).find(contains) != std::string_view::npos;
}

VKAPI_ATTR VkBool32 VKAPI_CALL on_validation_message(VkDebugUtilsMessageSeverityFlagBitsEXT,
                                                     VkDebugUtilsMessageTypeFlagsEXT,
                                                     const VkDebugUtilsMessengerCallbackDataEXT* data, void* user);

}  // namespace

struct device::impl {
    // every public call holds it; a run holds it throughout (exclusive())
    mutable std::recursive_mutex mutex;
    device_info info;
    device_limits limits;
    fused_tile tile;
    fused_design design = fused_design::staged_tiles;
    register_rows_shape rows;
    bool tiled_products = true;
    bool matrix_for_f32 = false;
    std::vector<std::string> notes;  // for the next run's report
    std::atomic<std::size_t> messages{0};
    std::mutex message_mutex;
    std::string last_message;

    vk::raii::Context context;
    vk::raii::Instance instance{nullptr};
    vk::raii::DebugUtilsMessengerEXT messenger{nullptr};
    vk::raii::PhysicalDevice physical{nullptr};
    vk::raii::Device dev{nullptr};
    vk::raii::Queue queue{nullptr};
    std::uint32_t family = 0;
    bool unified_memory = false;
    float timestamp_period = 0;
    bool has_timestamps = false;
    vk::raii::CommandPool pool{nullptr};
    vk::raii::CommandBuffer commands{nullptr};
    vk::raii::DescriptorPool descriptors{nullptr};
    vk::raii::PipelineCache pipeline_cache{nullptr};
    vk::raii::QueryPool queries{nullptr};
    std::filesystem::path pipeline_cache_file;
    std::string device_key;

    struct buffer {
        vk::raii::Buffer handle{nullptr};
        vk::raii::DeviceMemory memory{nullptr};
        void* mapped = nullptr;
        std::size_t bytes = 0;
    };
    std::vector<std::optional<buffer>> buffers;
    std::vector<buffer_id> free_slots;  // released entries of `buffers`, reused first

    struct kernel {
        vk::raii::DescriptorSetLayout set_layout{nullptr};
        vk::raii::PipelineLayout layout{nullptr};
        vk::raii::Pipeline pipeline{nullptr};
        std::uint32_t bindings = 0;
        bool from_disk = false;
    };
    std::vector<kernel> kernels;
    std::unordered_map<std::uint64_t, kernel_id> kernel_by_source;

    bool recording = false;
    std::vector<vk::raii::DescriptorSets> sets_in_flight;
    std::vector<buffer_id> buffers_in_flight;  // used by the recorded, unsubmitted dispatches
    double device_seconds_pending = 0;         // of submissions made before submit_and_wait

    bool in_flight(buffer_id id) const {
        return std::find(buffers_in_flight.begin(), buffers_in_flight.end(), id) != buffers_in_flight.end();
    }

    std::uint32_t memory_type(std::uint32_t allowed, vk::MemoryPropertyFlags wanted) const {
        const auto props = physical.getMemoryProperties();
        for (std::uint32_t t = 0; t < props.memoryTypeCount; ++t)
            if ((allowed & (1u << t)) && (props.memoryTypes[t].propertyFlags & wanted) == wanted) return t;
        return UINT32_MAX;
    }

    buffer make_buffer(std::size_t bytes, vk::MemoryPropertyFlags wanted, const std::string& what) {
        buffer b;
        b.bytes = bytes;
        const auto usage = vk::BufferUsageFlagBits::eStorageBuffer | vk::BufferUsageFlagBits::eTransferSrc |
                           vk::BufferUsageFlagBits::eTransferDst;
        b.handle = guarded("vkCreateBuffer for " + what, [&] {
            return vk::raii::Buffer(dev, vk::BufferCreateInfo({}, std::max<std::size_t>(bytes, 4), usage));
        });
        const auto req = b.handle.getMemoryRequirements();
        const std::uint32_t type = memory_type(req.memoryTypeBits, wanted);
        if (type == UINT32_MAX) throw error("attnfuse: no Vulkan memory type suits " + what);
        b.memory = guarded("vkAllocateMemory for " + what + " (" + std::to_string(bytes) + " bytes)",
                           [&] { return vk::raii::DeviceMemory(dev, vk::MemoryAllocateInfo(req.size, type)); });
        guarded("vkBindBufferMemory for " + what, [&] {
            b.handle.bindMemory(*b.memory, 0);
            if (wanted & vk::MemoryPropertyFlagBits::eHostVisible) b.mapped = b.memory.mapMemory(0, VK_WHOLE_SIZE);
            return 0;
        });
        return b;
    }

    void begin_if_needed() {
        if (recording) return;
        guarded("vkBeginCommandBuffer", [&] {
            commands.reset();
            commands.begin(vk::CommandBufferBeginInfo(vk::CommandBufferUsageFlagBits::eOneTimeSubmit));
            return 0;
        });
        if (has_timestamps) {
            commands.resetQueryPool(*queries, 0, 2);
            commands.writeTimestamp(vk::PipelineStageFlagBits::eTopOfPipe, *queries, 0);
        }
        recording = true;
    }

    double submit() {
        if (!recording) return 0;
        if (has_timestamps) commands.writeTimestamp(vk::PipelineStageFlagBits::eBottomOfPipe, *queries, 1);
        recording = false;
        guarded("vkEndCommandBuffer", [&] {
            commands.end();
            return 0;
        });
        vk::raii::Fence fence = guarded("vkCreateFence", [&] { return vk::raii::Fence(dev, vk::FenceCreateInfo()); });
        guarded("vkQueueSubmit", [&] {
            queue.submit(vk::SubmitInfo({}, {}, *commands), *fence);
            return 0;
        });
        // A bound on the wait, so that a runaway kernel is an error rather
        // than a hang: 10 minutes (lavapipe runs on the CPU and is slow).
        const vk::Result waited = guarded("vkWaitForFences", [&] {
            return dev.waitForFences(*fence, VK_TRUE, 600ull * 1000 * 1000 * 1000);
        });
        sets_in_flight.clear();
        buffers_in_flight.clear();
        if (waited == vk::Result::eTimeout) throw error("attnfuse: a Vulkan submission did not finish within 10 minutes (VK_TIMEOUT)");
        if (!has_timestamps) return 0;
        const auto [result, stamps] = guarded("vkGetQueryPoolResults", [&] {
            return queries.getResults<std::uint64_t>(0, 2, 2 * sizeof(std::uint64_t), sizeof(std::uint64_t), vk::QueryResultFlagBits::e64);
        });
        if (result != vk::Result::eSuccess) return 0;
        const double seconds = static_cast<double>(stamps[1] - stamps[0]) * timestamp_period * 1e-9;
        device_seconds_pending += seconds;
        return seconds;
    }

    void transfer(buffer& target, buffer& source, std::size_t bytes, std::size_t target_offset, std::size_t source_offset) {
        const bool was_recording = recording;
        if (was_recording) submit();  // keep order with what came before
        begin_if_needed();
        commands.copyBuffer(*source.handle, *target.handle, vk::BufferCopy(source_offset, target_offset, bytes));
        // a copy is no kernel's work: device time counts dispatches only (an
        // upload or download between runs would otherwise land in the next)
        device_seconds_pending -= submit();
    }
};

namespace {
VKAPI_ATTR VkBool32 VKAPI_CALL on_validation_message(VkDebugUtilsMessageSeverityFlagBitsEXT severity,
                                                     VkDebugUtilsMessageTypeFlagsEXT,
                                                     const VkDebugUtilsMessengerCallbackDataEXT* data, void* user) {
    if (severity < VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT) return VK_FALSE;
    auto* self = static_cast<device::impl*>(user);
    self->messages.fetch_add(1);
    std::lock_guard lock(self->message_mutex);
    self->last_message = data && data->pMessage ? data->pMessage : "(no text)";
    return VK_FALSE;
}
}  // namespace

device::device() : device(default_device()) {}

device::device(const device_info& which, device_options options) : impl_(std::make_unique<impl>()) {
    impl& d = *impl_;
    d.info = which;
    const bool validation = options.validation || env_flag("ATTNFUSE_VK_VALIDATION") ||
                            env_flag("VK_INSTANCE_LAYERS", "VK_LAYER_KHRONOS_validation");
    try {
        std::vector<const char*> layers, extensions;
        bool debug_utils = false;
        for (const auto& e : d.context.enumerateInstanceExtensionProperties())
            if (std::strcmp(e.extensionName, VK_EXT_DEBUG_UTILS_EXTENSION_NAME) == 0) debug_utils = true;
        if (validation) {
            bool found = false;
            for (const auto& l : d.context.enumerateInstanceLayerProperties())
                found = found || std::strcmp(l.layerName, "VK_LAYER_KHRONOS_validation") == 0;
            if (!found) throw error("attnfuse: validation asked for, but VK_LAYER_KHRONOS_validation is not installed (apt-get install vulkan-validationlayers)");
            layers.push_back("VK_LAYER_KHRONOS_validation");
        }
        if (debug_utils) extensions.push_back(VK_EXT_DEBUG_UTILS_EXTENSION_NAME);
        const vk::ApplicationInfo app("attnfuse", 1, "attnfuse", 1, VK_API_VERSION_1_1);
        d.instance = vk::raii::Instance(d.context, vk::InstanceCreateInfo({}, &app, layers, extensions));
        if (debug_utils) {
            using sev = vk::DebugUtilsMessageSeverityFlagBitsEXT;
            using type = vk::DebugUtilsMessageTypeFlagBitsEXT;
            d.messenger = vk::raii::DebugUtilsMessengerEXT(
                d.instance, vk::DebugUtilsMessengerCreateInfoEXT({}, sev::eWarning | sev::eError,
                                                                 type::eGeneral | type::eValidation | type::ePerformance,
                                                                 &on_validation_message, &d));
        }
        vk::raii::PhysicalDevices physicals(d.instance);
        if (which.index >= physicals.size()) throw no_device_error("attnfuse: Vulkan device " + std::to_string(which.index) + " is gone");
        d.physical = std::move(physicals[which.index]);

        const auto families = d.physical.getQueueFamilyProperties();
        d.family = UINT32_MAX;
        for (std::uint32_t f = 0; f < families.size(); ++f)
            if (families[f].queueFlags & vk::QueueFlagBits::eCompute) {
                d.family = f;
                break;
            }
        if (d.family == UINT32_MAX) throw no_device_error("attnfuse: " + which.name + " has no compute queue");
        d.has_timestamps = families[d.family].timestampValidBits > 0;

        const auto props = d.physical.getProperties();
        d.timestamp_period = props.limits.timestampPeriod;
        d.limits.max_storage_buffer_range = props.limits.maxStorageBufferRange;
        for (int a = 0; a < 3; ++a) d.limits.max_workgroup_count[a] = props.limits.maxComputeWorkGroupCount[a];
        d.limits.max_workgroup_invocations = props.limits.maxComputeWorkGroupInvocations;
        d.limits.max_shared_memory = props.limits.maxComputeSharedMemorySize;
        d.limits.max_push_constants = props.limits.maxPushConstantsSize;
        const auto sub = d.physical.getProperties2<vk::PhysicalDeviceProperties2, vk::PhysicalDeviceSubgroupProperties>();
        const auto& subgroups = sub.get<vk::PhysicalDeviceSubgroupProperties>();
        d.limits.subgroup_size = subgroups.subgroupSize;
        d.limits.subgroup_broadcast = (subgroups.supportedStages & vk::ShaderStageFlagBits::eCompute) &&
                                      (subgroups.supportedOperations & vk::SubgroupFeatureFlagBits::eBallot);
        d.limits.subgroup_reduce = (subgroups.supportedStages & vk::ShaderStageFlagBits::eCompute) &&
                                   (subgroups.supportedOperations & vk::SubgroupFeatureFlagBits::eArithmetic) &&
                                   (subgroups.supportedOperations & vk::SubgroupFeatureFlagBits::eVote);
        // llvmpipe ends every shader loop once an invocation has run 65535
        // iterations of its loops in all (LP_MAX_TGSI_LOOP_ITERATIONS), silently
        const auto driver_id = d.physical.getProperties2<vk::PhysicalDeviceProperties2, vk::PhysicalDeviceDriverProperties>()
                                   .get<vk::PhysicalDeviceDriverProperties>().driverID;
        const bool llvmpipe = driver_id == vk::DriverId::eMesaLlvmpipe || std::string_view(props.deviceName.data()).find("llvmpipe") != std::string_view::npos;
        const std::uint32_t driver_cap = llvmpipe ? 65535u : 0u;
        d.limits.max_loop_iterations = options.max_loop_iterations == 0 ? driver_cap : options.max_loop_iterations;
        if (const std::string why = options.tile.violation(); !why.empty())
            throw error("attnfuse: device_options::tile cannot run: " + why);
        if (options.tile.invocations() > d.limits.max_workgroup_invocations || options.tile.invocations() > props.limits.maxComputeWorkGroupSize[0])
            throw error("attnfuse: device_options::tile has " + std::to_string(options.tile.invocations()) +
                        " invocations per workgroup (queries x lanes), more than " + std::string(props.deviceName.data()) + " runs (" +
                        std::to_string(std::min(d.limits.max_workgroup_invocations, props.limits.maxComputeWorkGroupSize[0])) + ")");
        d.tile = options.tile;

        // Cooperative matrices (shaders/fragments_cooperative.glsl): the NV
        // extension with a 16x16x16 subgroup product of f16 into f32, and the
        // features its SPIR-V declares (Float16, VulkanMemoryModel). Asked
        // for through their KHR extensions, which stay listed on 1.2 drivers:
        // the instance asks for Vulkan 1.1.
        std::set<std::string, std::less<>> device_extensions;
        for (const auto& e : d.physical.enumerateDeviceExtensionProperties()) device_extensions.insert(e.extensionName.data());
        const bool has_nv_matrix = device_extensions.count(VK_NV_COOPERATIVE_MATRIX_EXTENSION_NAME) > 0 &&
                                   device_extensions.count(VK_KHR_VULKAN_MEMORY_MODEL_EXTENSION_NAME) > 0 &&
                                   device_extensions.count(VK_KHR_SHADER_FLOAT16_INT8_EXTENSION_NAME) > 0 &&
                                   props.apiVersion >= VK_API_VERSION_1_1;
        if (has_nv_matrix) {
            const auto features = d.physical.getFeatures2<vk::PhysicalDeviceFeatures2, vk::PhysicalDeviceCooperativeMatrixFeaturesNV,
                                                          vk::PhysicalDeviceVulkanMemoryModelFeatures,
                                                          vk::PhysicalDeviceShaderFloat16Int8Features>();
            const bool enabled = features.get<vk::PhysicalDeviceCooperativeMatrixFeaturesNV>().cooperativeMatrix &&
                                 features.get<vk::PhysicalDeviceVulkanMemoryModelFeatures>().vulkanMemoryModel &&
                                 features.get<vk::PhysicalDeviceShaderFloat16Int8Features>().shaderFloat16;
            bool sixteen = false;
            for (const auto& p : d.physical.getCooperativeMatrixPropertiesNV()) {
                d.limits.cooperative_matrix_shapes.push_back(std::to_string(p.MSize) + "x" + std::to_string(p.NSize) + "x" +
                                                             std::to_string(p.KSize) + " " + vk::to_string(p.AType) + "*" +
                                                             vk::to_string(p.BType) + "+" + vk::to_string(p.CType) +
                                                             (p.scope == vk::ScopeNV::eSubgroup ? "" : " (" + vk::to_string(p.scope) + ")"));
                sixteen = sixteen || (p.MSize == 16 && p.NSize == 16 && p.KSize == 16 && p.AType == vk::ComponentTypeNV::eFloat16 &&
                                      p.BType == vk::ComponentTypeNV::eFloat16 && p.CType == vk::ComponentTypeNV::eFloat32 &&
                                      p.DType == vk::ComponentTypeNV::eFloat32 && p.scope == vk::ScopeNV::eSubgroup);
            }
            // the kernel's warps are subgroups of 16 to 64 invocations over 256-element fragments
            const std::uint32_t warp = d.limits.subgroup_size;
            d.limits.cooperative_matrix_supported = enabled && sixteen && warp >= 16 && warp <= 64 && 256 % warp == 0;
        }
        d.design = options.design != fused_design::automatic ? options.design
                   : d.limits.cooperative_matrix_supported && options.cooperative_matrices ? fused_design::matrix_tiles
                   : props.deviceType == vk::PhysicalDeviceType::eCpu && d.limits.subgroup_broadcast ? fused_design::register_rows
                                                                                                     : fused_design::staged_tiles;
        d.matrix_for_f32 = options.design == fused_design::matrix_tiles;
        d.limits.cooperative_matrix = d.design == fused_design::matrix_tiles && d.limits.cooperative_matrix_supported &&
                                      options.cooperative_matrices;
        if (d.design == fused_design::register_rows && !d.limits.subgroup_broadcast)
            throw error("attnfuse: device_options::design register_rows needs subgroup ballot operations in compute shaders, which " +
                        std::string(props.deviceName.data()) + " does not report");
        d.rows = options.rows;
        d.tiled_products = options.tiled_products;
        if (d.rows.invocations == 0) d.rows.invocations = std::max(d.limits.subgroup_size, 1u);
        if (d.rows.rows == 0 || d.rows.keys == 0)
            throw error("attnfuse: device_options::rows cannot run: rows and keys must be at least 1");
        if (d.rows.invocations > d.limits.max_workgroup_invocations || d.rows.invocations > props.limits.maxComputeWorkGroupSize[0])
            throw error("attnfuse: device_options::rows has " + std::to_string(d.rows.invocations) +
                        " invocations per workgroup, more than " + std::string(props.deviceName.data()) + " runs (" +
                        std::to_string(std::min(d.limits.max_workgroup_invocations, props.limits.maxComputeWorkGroupSize[0])) + ")");
        d.unified_memory = props.deviceType == vk::PhysicalDeviceType::eCpu ||
                           props.deviceType == vk::PhysicalDeviceType::eIntegratedGpu;

        // 16-bit storage buffers are core in Vulkan 1.1, a feature to ask for
        vk::PhysicalDevice16BitStorageFeatures sixteen_bit;
        if (props.apiVersion >= VK_API_VERSION_1_1) {
            const auto features = d.physical.getFeatures2<vk::PhysicalDeviceFeatures2, vk::PhysicalDevice16BitStorageFeatures>();
            d.limits.storage_16bit_supported = features.get<vk::PhysicalDevice16BitStorageFeatures>().storageBuffer16BitAccess;
        }
        d.limits.storage_16bit = d.limits.storage_16bit_supported && options.sixteen_bit_storage;
        sixteen_bit.storageBuffer16BitAccess = d.limits.storage_16bit;

        const float priority = 1.0f;
        const vk::DeviceQueueCreateInfo queue_info({}, d.family, 1, &priority);
        std::vector<const char*> enabled_extensions;
        vk::DeviceCreateInfo create({}, queue_info);
        void* chain = d.limits.storage_16bit ? &sixteen_bit : nullptr;
        vk::PhysicalDeviceCooperativeMatrixFeaturesNV matrix_features(true);
        vk::PhysicalDeviceVulkanMemoryModelFeatures memory_model(true);
        vk::PhysicalDeviceShaderFloat16Int8Features float16(true);
        if (d.limits.cooperative_matrix) {
            enabled_extensions = {VK_NV_COOPERATIVE_MATRIX_EXTENSION_NAME, VK_KHR_VULKAN_MEMORY_MODEL_EXTENSION_NAME,
                                  VK_KHR_SHADER_FLOAT16_INT8_EXTENSION_NAME};
            matrix_features.pNext = chain;
            memory_model.pNext = &matrix_features;
            float16.pNext = &memory_model;
            chain = &float16;
        }
        create.pNext = chain;
        create.setPEnabledExtensionNames(enabled_extensions);
        d.dev = vk::raii::Device(d.physical, create);
        d.queue = vk::raii::Queue(d.dev, d.family, 0);
        d.pool = vk::raii::CommandPool(d.dev, vk::CommandPoolCreateInfo(vk::CommandPoolCreateFlagBits::eResetCommandBuffer, d.family));
        d.commands = std::move(vk::raii::CommandBuffers(d.dev, vk::CommandBufferAllocateInfo(*d.pool, vk::CommandBufferLevel::ePrimary, 1))[0]);
        const vk::DescriptorPoolSize sizes(vk::DescriptorType::eStorageBuffer, 4096);
        d.descriptors = vk::raii::DescriptorPool(d.dev, vk::DescriptorPoolCreateInfo(vk::DescriptorPoolCreateFlagBits::eFreeDescriptorSet, 512, sizes));
        if (d.has_timestamps) d.queries = vk::raii::QueryPool(d.dev, vk::QueryPoolCreateInfo({}, vk::QueryType::eTimestamp, 2));

        const auto driver = d.physical.getProperties2<vk::PhysicalDeviceProperties2, vk::PhysicalDeviceDriverProperties>()
                                .get<vk::PhysicalDeviceDriverProperties>();
        d.device_key = std::string(props.deviceName.data()) + "|" + driver.driverInfo.data() + "|" +
                       std::to_string(props.driverVersion);
        d.pipeline_cache_file = cache_directory() / ("pipelines-" + std::to_string(fnv1a(d.device_key)) + ".bin");
        std::string problem;
        const auto initial = read_cache_file(d.pipeline_cache_file, "AFPC", fnv1a(d.device_key), problem);
        if (!problem.empty())
            d.notes.push_back("the pipeline cache " + d.pipeline_cache_file.string() + " was " + problem +
                              ": started empty, and it is rewritten when this device closes");
        d.pipeline_cache = vk::raii::PipelineCache(
            d.dev, initial ? vk::PipelineCacheCreateInfo({}, initial->size(), initial->data()) : vk::PipelineCacheCreateInfo());
    } catch (const vk::SystemError& e) {
        rethrow(e, "opening Vulkan device " + which.name);
    }
}

device::~device() {
    if (!impl_) return;
    try {  // keep the pipelines for the next process; a failure here only costs time later
        const auto data = impl_->pipeline_cache.getData();
        write_cache_file(impl_->pipeline_cache_file, "AFPC", fnv1a(impl_->device_key), data.data(), data.size(), this);
    } catch (...) {
    }
}

device::device(device&&) noexcept = default;
device& device::operator=(device&&) noexcept = default;

std::unique_lock<std::recursive_mutex> device::exclusive() const { return std::unique_lock(impl_->mutex); }
std::vector<std::string> device::take_notes() {
    std::lock_guard lock(impl_->mutex);
    return std::exchange(impl_->notes, {});
}
std::size_t device::buffer_slots() const {
    std::lock_guard lock(impl_->mutex);
    return impl_->buffers.size();
}

const device_info& device::info() const { return impl_->info; }
const device_limits& device::limits() const { return impl_->limits; }
const fused_tile& device::tile() const { return impl_->tile; }
fused_design device::design() const { return impl_->design; }
const register_rows_shape& device::rows() const { return impl_->rows; }
bool device::tiled_products() const { return impl_->tiled_products; }
bool device::matrix_for_f32() const { return impl_->matrix_for_f32; }
std::size_t device::validation_messages() const { return impl_->messages.load(); }
std::string device::last_validation_message() const {
    std::lock_guard lock(impl_->message_mutex);
    return impl_->last_message;
}

device::buffer_id device::create_buffer(std::size_t bytes, std::string_view what, bool host_visible) {
    impl& d = *impl_;
    std::lock_guard lock(d.mutex);
    const std::string name(what);
    if (bytes > d.limits.max_storage_buffer_range)
        throw out_of_memory_error("attnfuse: " + name + " needs " + std::to_string(bytes) + " bytes, more than this device's maxStorageBufferRange (" +
                                  std::to_string(d.limits.max_storage_buffer_range) + " bytes) for one binding");
    const auto wanted = d.unified_memory || host_visible
                            ? vk::MemoryPropertyFlagBits::eHostVisible | vk::MemoryPropertyFlagBits::eHostCoherent
                            : vk::MemoryPropertyFlags(vk::MemoryPropertyFlagBits::eDeviceLocal);
    auto made = d.make_buffer(bytes, wanted, name);
    if (!d.free_slots.empty()) {
        const buffer_id id = d.free_slots.back();
        d.free_slots.pop_back();
        d.buffers[id].emplace(std::move(made));
        return id;
    }
    d.buffers.emplace_back(std::move(made));
    return static_cast<buffer_id>(d.buffers.size() - 1);
}

namespace {
template <class Buffers>
auto& live_buffer(Buffers& buffers, device::buffer_id id) {
    if (id >= buffers.size() || !buffers[id]) throw error("attnfuse internal: buffer " + std::to_string(id) + " is not a live buffer of this device");
    return *buffers[id];
}
}  // namespace

std::size_t device::buffer_bytes(buffer_id id) const {
    std::lock_guard lock(impl_->mutex);
    return live_buffer(impl_->buffers, id).bytes;
}

void device::upload(buffer_id id, const void* data, std::size_t bytes, std::size_t offset) {
    impl& d = *impl_;
    std::lock_guard lock(d.mutex);
    auto& b = live_buffer(d.buffers, id);
    if (b.mapped) {
        // a host write must not race a recorded dispatch that reads this buffer;
        // a buffer no recorded dispatch uses (new parameters) is written at once
        if (d.recording && d.in_flight(id)) d.submit();
        std::memcpy(static_cast<char*>(b.mapped) + offset, data, bytes);
        return;
    }
    auto staging = d.make_buffer(bytes, vk::MemoryPropertyFlagBits::eHostVisible | vk::MemoryPropertyFlagBits::eHostCoherent, "a staging buffer");
    std::memcpy(staging.mapped, data, bytes);
    d.transfer(b, staging, bytes, offset, 0);
}

void device::download(buffer_id id, void* data, std::size_t bytes, std::size_t offset) {
    impl& d = *impl_;
    std::lock_guard lock(d.mutex);
    auto& b = live_buffer(d.buffers, id);
    if (d.recording) d.submit();
    if (b.mapped) {
        std::memcpy(data, static_cast<const char*>(b.mapped) + offset, bytes);
        return;
    }
    auto staging = d.make_buffer(bytes, vk::MemoryPropertyFlagBits::eHostVisible | vk::MemoryPropertyFlagBits::eHostCoherent, "a staging buffer");
    d.transfer(staging, b, bytes, 0, offset);
    std::memcpy(data, staging.mapped, bytes);
}

void device::release(buffer_id id) {
    impl& d = *impl_;
    std::lock_guard lock(d.mutex);
    (void)live_buffer(d.buffers, id);
    if (d.recording) d.submit();
    d.buffers[id].reset();
    d.free_slots.push_back(id);
}

device::kernel_id device::kernel(const std::string& glsl, std::string_view name, std::uint32_t bindings, std::uint32_t push_bytes,
                                 const std::vector<std::uint32_t>& specialization) {
    impl& d = *impl_;
    std::lock_guard lock(d.mutex);
    const std::string version = std::to_string(GLSLANG_VERSION_MAJOR) + "." + std::to_string(GLSLANG_VERSION_MINOR) + "." +
                                std::to_string(GLSLANG_VERSION_PATCH);
    const std::uint64_t key = fnv1a(d.device_key, fnv1a(version, fnv1a(glsl)));
    std::string specialized = std::to_string(key);
    for (auto v : specialization) specialized += "," + std::to_string(v);
    const std::uint64_t pipeline_key = fnv1a(specialized);
    if (auto found = d.kernel_by_source.find(pipeline_key); found != d.kernel_by_source.end()) return found->second;

    // SPIR-V: from the disk cache, else glslang (and into the cache)
    const auto cache_file = cache_directory() / ("spirv-" + std::to_string(key) + ".spv");
    std::vector<std::uint32_t> spirv;
    bool from_disk = false;
    std::string problem;
    if (const auto cached = read_cache_file(cache_file, "AFSV", key, problem)) {
        if (cached->size() % 4 == 0 && cached->size() >= 20) {
            spirv.resize(cached->size() / 4);
            std::memcpy(spirv.data(), cached->data(), cached->size());
            from_disk = spirv[0] == 0x07230203u;
        }
        if (!from_disk) problem = "not SPIR-V";
    }
    if (!from_disk) {
        spirv = compile_compute_shader(glsl, name);
        write_cache_file(cache_file, "AFSV", key, spirv.data(), spirv.size() * 4, this);
        if (!problem.empty())
            d.notes.push_back("the SPIR-V cache file " + cache_file.string() + " of kernel " + std::string(name) + " was " + problem +
                              ": recompiled and rewritten");
    }
    if (const char* dump = std::getenv("ATTNFUSE_DUMP_SHADERS"); dump && *dump) {
        std::error_code ignored;
        std::filesystem::create_directories(dump, ignored);
        const std::string base = std::string(dump) + "/" + std::string(name) + "-" + std::to_string(key);
        std::ofstream(base + ".comp") << glsl;
        std::ofstream(base + ".spv", std::ios::binary)
            .write(reinterpret_cast<const char*>(spirv.data()), static_cast<std::streamsize>(spirv.size() * 4));
    }

    return guarded("creating the pipeline of kernel " + std::string(name), [&] {
        impl::kernel k;
        k.bindings = bindings;
        k.from_disk = from_disk;
        std::vector<vk::DescriptorSetLayoutBinding> slots;
        for (std::uint32_t b = 0; b < bindings; ++b)
            slots.emplace_back(b, vk::DescriptorType::eStorageBuffer, 1, vk::ShaderStageFlagBits::eCompute);
        k.set_layout = vk::raii::DescriptorSetLayout(d.dev, vk::DescriptorSetLayoutCreateInfo({}, slots));
        const vk::PushConstantRange range(vk::ShaderStageFlagBits::eCompute, 0, push_bytes);
        vk::PipelineLayoutCreateInfo layout_info({}, *k.set_layout);
        if (push_bytes) layout_info.setPushConstantRanges(range);
        k.layout = vk::raii::PipelineLayout(d.dev, layout_info);
        const vk::raii::ShaderModule module(d.dev, vk::ShaderModuleCreateInfo({}, spirv));
        std::vector<vk::SpecializationMapEntry> entries;
        for (std::uint32_t c = 0; c < specialization.size(); ++c) entries.emplace_back(c, c * 4, 4);
        const vk::SpecializationInfo constants(static_cast<std::uint32_t>(entries.size()), entries.data(), specialization.size() * 4,
                                               specialization.data());
        vk::PipelineShaderStageCreateInfo stage({}, vk::ShaderStageFlagBits::eCompute, *module, "main");
        if (!specialization.empty()) stage.setPSpecializationInfo(&constants);
        k.pipeline = vk::raii::Pipeline(d.dev, d.pipeline_cache, vk::ComputePipelineCreateInfo({}, stage, *k.layout));
        d.kernels.push_back(std::move(k));
        const auto id = static_cast<kernel_id>(d.kernels.size() - 1);
        d.kernel_by_source.emplace(pipeline_key, id);
        return id;
    });
}

bool device::kernel_from_disk_cache(kernel_id id) const {
    std::lock_guard lock(impl_->mutex);
    return impl_->kernels.at(id).from_disk;
}

void device::dispatch(kernel_id id, const std::vector<buffer_id>& buffers, const void* push, std::size_t push_bytes,
                      std::uint32_t gx, std::uint32_t gy, std::uint32_t gz) {
    impl& d = *impl_;
    std::lock_guard lock(d.mutex);
    const auto& k = d.kernels.at(id);
    for (int a = 0; a < 3; ++a) {
        const std::uint32_t g = a == 0 ? gx : a == 1 ? gy : gz;
        if (g > d.limits.max_workgroup_count[a])
            throw error("attnfuse internal: a dispatch of " + std::to_string(g) + " workgroups exceeds maxComputeWorkGroupCount[" +
                        std::to_string(a) + "] = " + std::to_string(d.limits.max_workgroup_count[a]));
    }
    if (gx == 0 || gy == 0 || gz == 0) return;
    guarded("recording a dispatch", [&] {
        d.begin_if_needed();
        vk::raii::DescriptorSets sets(d.dev, vk::DescriptorSetAllocateInfo(*d.descriptors, *k.set_layout));
        std::vector<vk::DescriptorBufferInfo> infos;
        infos.reserve(buffers.size());
        for (buffer_id b : buffers) infos.emplace_back(*live_buffer(d.buffers, b).handle, 0, VK_WHOLE_SIZE);
        std::vector<vk::WriteDescriptorSet> writes;
        for (std::uint32_t b = 0; b < buffers.size(); ++b)
            writes.emplace_back(*sets[0], b, 0, 1, vk::DescriptorType::eStorageBuffer, nullptr, &infos[b]);
        d.dev.updateDescriptorSets(writes, nullptr);
        d.commands.bindPipeline(vk::PipelineBindPoint::eCompute, *k.pipeline);
        d.commands.bindDescriptorSets(vk::PipelineBindPoint::eCompute, *k.layout, 0, *sets[0], nullptr);
        if (push_bytes)
            d.commands.pushConstants<std::uint8_t>(*k.layout, vk::ShaderStageFlagBits::eCompute, 0,
                                                   vk::ArrayProxy<const std::uint8_t>(static_cast<std::uint32_t>(push_bytes),
                                                                                      static_cast<const std::uint8_t*>(push)));
        d.commands.dispatch(gx, gy, gz);
        const vk::MemoryBarrier barrier(vk::AccessFlagBits::eShaderWrite, vk::AccessFlagBits::eShaderRead | vk::AccessFlagBits::eShaderWrite);
        d.commands.pipelineBarrier(vk::PipelineStageFlagBits::eComputeShader, vk::PipelineStageFlagBits::eComputeShader, {},
                                   barrier, nullptr, nullptr);
        d.sets_in_flight.push_back(std::move(sets));
        d.buffers_in_flight.insert(d.buffers_in_flight.end(), buffers.begin(), buffers.end());
        return 0;
    });
}

double device::submit_and_wait() {
    std::lock_guard lock(impl_->mutex);
    impl_->submit();
    const double total = impl_->device_seconds_pending;  // every submission since the last call
    impl_->device_seconds_pending = 0;
    return total;
}

}  // namespace attnfuse::vulkan
