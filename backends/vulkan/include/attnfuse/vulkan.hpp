// The Vulkan backend's public face. No Vulkan or glslang header is included
// here: both stay inside the library.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
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

// The device ran out of memory for an allocation the message names.
class out_of_memory_error : public error {
public:
    using error::error;
};

// VK_ERROR_DEVICE_LOST: this device object is unusable; open a new one.
class device_lost_error : public error {
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

// The fused attention kernel's tile (shaders/flash_attention.glsl), given to
// its pipeline as specialization constants: one SPIR-V serves every shape,
// and a device may run another than the default.
struct fused_tile {
    std::uint32_t queries = 16;         // per workgroup (BQ)
    std::uint32_t keys = 32;            // per key tile (BK): at most 32, a multiple of lanes
    std::uint32_t lanes = 4;            // invocations per query row: queries x lanes per workgroup
    std::uint32_t depth_step = 32;      // depth staged at a time (DC)
    std::uint32_t value_columns = 64;   // value columns staged at a time (VC), a multiple of lanes
    std::uint32_t resident_depth = 128; // up to this depth the query tile stays in shared memory (QMAX)
    friend bool operator==(const fused_tile&, const fused_tile&) = default;

    std::size_t invocations() const { return std::size_t{queries} * lanes; }
    // every shared array of the shader, in bytes
    std::size_t shared_bytes() const {
        return 4 * (std::size_t{keys} * value_columns + std::size_t{queries} * resident_depth + std::size_t{queries} * (keys + 1) +
                    2 * std::size_t{queries} + 2);
    }
    // What the shader's code assumes of the shape, or an empty string when
    // it holds.
    std::string violation() const {
        if (queries == 0 || keys == 0 || lanes == 0 || depth_step == 0 || value_columns == 0 || resident_depth == 0)
            return "every extent must be at least 1";
        if (keys > 32) return "keys " + std::to_string(keys) + " > 32 (a tile's non-finite values are one bit per key)";
        if (keys % lanes || value_columns % lanes)
            return "lanes " + std::to_string(lanes) + " must divide keys (" + std::to_string(keys) + ") and value_columns (" +
                   std::to_string(value_columns) + ")";
        if (std::size_t{keys} * value_columns < std::size_t{depth_step} * (queries + keys))
            return "keys x value_columns (" + std::to_string(keys * value_columns) + ") must hold depth_step x (queries + keys) (" +
                   std::to_string(depth_step * (queries + keys)) + "): one staged step";
        return {};
    }
};

// Which fused attention shader a device runs.
enum class fused_design {
    // register_rows on CPU devices (lavapipe) that have subgroup ballot
    // operations; matrix_tiles for 16-bit inputs on devices with cooperative
    // matrices (device_limits::cooperative_matrix), staged_tiles for their
    // f32 inputs; staged_tiles elsewhere (the shape measured on an H200;
    // register rows there are unmeasured)
    automatic,
    // shaders/flash_attention.glsl: key and value tiles staged in shared
    // memory, several invocations per query row; device_options::tile
    staged_tiles,
    // shaders/flash_rows.glsl: each invocation owns whole query rows in
    // registers, and every key and value element is read once per workgroup
    // as a broadcast (no shared memory, no barrier); device_options::rows.
    // Up to a depth and d_v of 256; deeper attentions take staged_tiles.
    // Its SPIR-V declares subgroup ballot operations: a device without them
    // cannot open with it.
    register_rows,
    // shaders/flash_matrix.glsl: both products on 16x16 matrix fragments
    // with f16 operands and f32 sums, on cooperative matrices (tensor cores)
    // where the device has them, in plain code elsewhere (the same kernel,
    // which is how CI tests it on lavapipe). Chosen explicitly, it runs f32
    // inputs too, rounded to f16 for the products (results to about 1e-3).
    // Hard attention, pairwise (additive) scores, a depth or d_v past 256,
    // tiles past the shared memory, and numbers f16 cannot hold (the run is
    // then redone) take staged_tiles; the report names the reason.
    matrix_tiles,
};
std::string_view to_string(fused_design design);

// The shape of shaders/flash_rows.glsl, given to its pipeline as
// specialization constants.
struct register_rows_shape {
    std::uint32_t rows = 8;         // query rows per invocation, at most (fewer for deep rows or few queries)
    std::uint32_t invocations = 0;  // per workgroup; 0: the device's subgroup size
    std::uint32_t keys = 16;        // keys per tile: the granularity of mask skipping
    friend bool operator==(const register_rows_shape&, const register_rows_shape&) = default;
};

struct device_options {
    // Enable VK_LAYER_KHRONOS_validation (also on when VK_INSTANCE_LAYERS or
    // ATTNFUSE_VK_VALIDATION=1 ask for it); every message is counted.
    bool validation = false;
    // Plan for at most this many loop iterations per shader invocation, all
    // loops together (0: the driver's own limit, where one is known). Lower
    // than the driver's, it forces the key passes and chunked dispatches
    // that keep every shader within such a limit (tests use it at small
    // sizes); higher, the driver cuts loops short, af_check_loops sees it
    // and the run is redone in smaller pieces (tests use that too).
    std::uint32_t max_loop_iterations = 0;
    // The fused attention kernel's tile; a shape its code cannot run, or
    // one past the device's workgroup size, is an error when the device opens.
    fused_tile tile = {};
    fused_design design = fused_design::automatic;
    register_rows_shape rows = {};
    // Unfused products by shaders/product_tiled.glsl where the device has
    // subgroup ballot operations; false: one invocation per output element
    // (shaders/product.glsl), the earlier baseline, kept for comparison.
    bool tiled_products = true;
    // Read 16-bit inputs (f16, bf16) through 16-bit storage buffers where the
    // device has them (storageBuffer16BitAccess); false, or a device without
    // them: the shaders read such inputs as halves of 32-bit words, the same
    // values (tests use this to run that path on every device).
    bool sixteen_bit_storage = true;
    // The matrix_tiles design on cooperative matrices where the device has
    // them; false: its plain fragments everywhere (for comparison).
    bool cooperative_matrices = true;
};

struct device_limits {
    std::uint64_t max_storage_buffer_range = 0;
    std::uint32_t max_workgroup_count[3] = {0, 0, 0};
    std::uint32_t max_workgroup_invocations = 0;
    std::uint32_t max_shared_memory = 0;
    std::uint32_t max_push_constants = 0;  // bytes (maxPushConstantsSize, at least 128)
    std::uint32_t subgroup_size = 0;
    bool subgroup_broadcast = false;  // subgroup ballot operations in compute shaders (subgroupBroadcast)
    bool subgroup_reduce = false;     // subgroup arithmetic and vote operations in compute shaders (subgroupAdd, subgroupAny)
    // Loop iterations a shader invocation may run, all its loops together,
    // before the driver silently ends its loops: 65535 on Mesa's llvmpipe
    // (lavapipe); 0 where no such limit is known. Every kernel attnfuse
    // dispatches stays within it.
    std::uint32_t max_loop_iterations = 0;
    // storageBuffer16BitAccess: the device can read float16_t and uint16_t
    // members of storage buffers; `storage_16bit` whether this device was
    // opened with it (device_options::sixteen_bit_storage).
    bool storage_16bit_supported = false;
    bool storage_16bit = false;
    // VK_NV_cooperative_matrix with a 16x16x16 subgroup product of f16
    // operands into f32 (getCooperativeMatrixPropertiesNV), and the
    // shaderFloat16 and vulkanMemoryModel features its shaders declare;
    // `cooperative_matrix` whether this device was opened with them (the
    // matrix_tiles design and device_options::cooperative_matrices).
    bool cooperative_matrix_supported = false;
    bool cooperative_matrix = false;
    // what the device reports of cooperative matrices, for a run report:
    // "MxNxK A*B+C" per subgroup entry (empty without the extension)
    std::vector<std::string> cooperative_matrix_shapes;
};

// An open Vulkan device with a compute queue. The executor drives it through
// this small interface: buffers, kernels compiled from GLSL (SPIR-V cached on
// disk, pipelines in a VkPipelineCache), dispatches recorded into one
// command buffer and submitted together.
//
// Threads: one device may be used from several threads at once. Each call
// is serialised on the device, and vulkan::run holds the device for its
// whole length (exclusive()), so concurrent runs queue one after the other,
// each with its own buffers and results. For work that truly overlaps, open
// one device per thread.
class device {
public:
    explicit device(const device_info& which, device_options options = {});
    device();  // default_device()
    ~device();
    device(device&&) noexcept;
    device& operator=(device&&) noexcept;

    const device_info& info() const;
    const device_limits& limits() const;
    const fused_tile& tile() const;  // the fused attention kernel's, as opened
    fused_design design() const;     // the fused attention shader it runs: never automatic
    const register_rows_shape& rows() const;  // flash_rows.glsl's shape, invocations resolved
    bool tiled_products() const;               // device_options::tiled_products, as opened
    // matrix_tiles runs f32 inputs too (the design was asked for), not only
    // f16 and bf16 ones (automatic)
    bool matrix_for_f32() const;

    using buffer_id = std::uint32_t;
    using kernel_id = std::uint32_t;

    // Holds the device for the calling thread until the lock is released
    // (recursive: the holder's own calls go through).
    std::unique_lock<std::recursive_mutex> exclusive() const;

    // `what` names the allocation in an out-of-memory error. A host-visible
    // buffer is mapped memory the host reads without a copy (small status
    // words); others live where the device computes fastest.
    buffer_id create_buffer(std::size_t bytes, std::string_view what, bool host_visible = false);
    void upload(buffer_id, const void* data, std::size_t bytes, std::size_t offset = 0);
    void download(buffer_id, void* data, std::size_t bytes, std::size_t offset = 0);
    void release(buffer_id);
    std::size_t buffer_bytes(buffer_id) const;
    // Slots of the buffer table, live or released: released slots are reused,
    // so a long-lived device does not grow.
    std::size_t buffer_slots() const;

    // A compute kernel from GLSL with `bindings` storage buffers (binding 0..),
    // `push_bytes` of push constants and 32-bit specialization constants
    // (constant_id 0, 1, ...). Compiled once per device object; SPIR-V comes
    // from the disk cache when any earlier device compiled it, and one SPIR-V
    // serves every specialization.
    kernel_id kernel(const std::string& glsl, std::string_view name, std::uint32_t bindings, std::uint32_t push_bytes,
                     const std::vector<std::uint32_t>& specialization = {});
    bool kernel_from_disk_cache(kernel_id) const;
    // What the device noticed since the last call and a run report should
    // say: a damaged cache file found, recompiled and rewritten, say.
    std::vector<std::string> take_notes();

    void dispatch(kernel_id, const std::vector<buffer_id>& buffers, const void* push, std::size_t push_bytes,
                  std::uint32_t groups_x, std::uint32_t groups_y = 1, std::uint32_t groups_z = 1);
    // Submits what was recorded and waits; returns the device seconds of
    // every submission of dispatches since the last call (an upload into a
    // buffer that a recorded dispatch reads submits early), measured with
    // timestamps (0 where the queue has none). Staging copies are not
    // counted.
    double submit_and_wait();

    std::size_t validation_messages() const;
    std::string last_validation_message() const;

    struct impl;  // opaque: Vulkan stays inside the library

private:
    std::unique_ptr<impl> impl_;
};

}  // namespace attnfuse::vulkan
