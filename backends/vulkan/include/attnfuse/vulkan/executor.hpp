// Lowering of the planner's kernels to Vulkan compute dispatches: the same
// plan as the CPU, one generated shader per kernel.
#pragma once
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <utility>
#include <set>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

#include <attnfuse/bind.hpp>
#include <attnfuse/intervals.hpp>
#include <attnfuse/lower.hpp>
#include <attnfuse/plan.hpp>
#include <attnfuse/run.hpp>

#include "../vulkan.hpp"
#include "glsl.hpp"

namespace attnfuse::vulkan {

using attnfuse::execution;
using attnfuse::report;
using attnfuse::run_result;

using options = attnfuse::run_options;  // mode and key_splits

using glsl::storage_kind;

// A dense [batch][heads][rows][cols] array of f32, f16 or bf16 in a device's
// memory (16-bit elements two to a 32-bit word, the buffer rounded up to
// whole words): an input that stays there across runs (bind_resident), or a
// run's output left there (run_on_device). Owns its buffer; the device must
// outlive it.
class device_tensor {
public:
    device_tensor() = default;
    // Copies `host` (any layout) up, densely, in its own element type.
    template <storage_element El>
    device_tensor(device& dev, const tensor_view<El>& host, std::string_view what = "a device tensor")
        : owner_(&dev), storage_(glsl::storage_of<El>()), batch_(host.batch), heads_(host.heads), rows_(host.rows), cols_(host.cols) {
        (void)checked_span(host, std::string(what));  // strides that overflow are an error, not a read out of bounds
        std::vector<El> dense(batch_ * heads_ * rows_ * cols_);
        std::size_t n = 0;
        for (std::size_t b = 0; b < batch_; ++b)
            for (std::size_t h = 0; h < heads_; ++h)
                for (std::size_t r = 0; r < rows_; ++r)
                    for (std::size_t c = 0; c < cols_; ++c) dense[n++] = host.at(b, h, r, c);
        id_ = dev.create_buffer(stored_bytes(storage_, dense.size()), what);
        try {
            dev.upload(id_, dense.data(), dense.size() * sizeof(El));
        } catch (...) {
            reset();
            throw;
        }
    }
    // Adopts a dense buffer of `dev` holding `storage` elements.
    device_tensor(device& dev, device::buffer_id id, std::size_t batch, std::size_t heads, std::size_t rows, std::size_t cols,
                  storage_kind storage = storage_kind::f32)
        : owner_(&dev), id_(id), storage_(storage), batch_(batch), heads_(heads), rows_(rows), cols_(cols) {}
    // The bytes of a buffer of `count` such elements: whole 32-bit words.
    static std::size_t stored_bytes(storage_kind storage, std::size_t count) {
        return std::max<std::size_t>((count * glsl::bytes_of(storage) + 3) / 4 * 4, 4);
    }
    device_tensor(device_tensor&& o) noexcept { *this = std::move(o); }
    device_tensor& operator=(device_tensor&& o) noexcept {
        if (this != &o) {
            reset();
            owner_ = std::exchange(o.owner_, nullptr);
            id_ = o.id_;
            storage_ = o.storage_;
            batch_ = o.batch_, heads_ = o.heads_, rows_ = o.rows_, cols_ = o.cols_;
        }
        return *this;
    }
    device_tensor(const device_tensor&) = delete;
    device_tensor& operator=(const device_tensor&) = delete;
    ~device_tensor() { reset(); }

    // The values, widened to f32 (exactly) whatever the tensor stores.
    tensor download() const {
        tensor t;
        t.batch = batch_, t.heads = heads_, t.rows = rows_, t.cols = cols_;
        switch (storage_) {
        case storage_kind::f16: t.values = widened(download_stored<half>()); break;
        case storage_kind::bf16: t.values = widened(download_stored<bfloat16>()); break;
        case storage_kind::f32: t.values = download_stored<float>(); break;
        }
        return t;
    }
    // The values as stored, dense [batch][heads][rows][cols]; El must be the
    // stored element.
    template <storage_element El>
    std::vector<El> download_stored() const {
        if (!owner_) throw error("attnfuse: download of an empty device_tensor");
        if (glsl::storage_of<El>() != storage_)
            throw error("attnfuse: download_stored<" + std::string(element<El>::name) + ">() of a device_tensor that holds " +
                        std::string(glsl::name_of(storage_)));
        std::vector<El> values(batch_ * heads_ * rows_ * cols_);
        owner_->download(id_, values.data(), values.size() * sizeof(El));
        return values;
    }
    // The shape as a dense row-major view of element El (its data pointer is
    // not host memory).
    template <storage_element El = float>
    tensor_view<El> shape_view() const {
        tensor_view<El> v = row_major(reinterpret_cast<const El*>(this), rows_, cols_);
        v.batch = batch_, v.heads = heads_;
        v.head_stride = static_cast<std::ptrdiff_t>(rows_ * cols_);
        v.batch_stride = static_cast<std::ptrdiff_t>(heads_ * rows_ * cols_);
        return v;
    }
    device* owner() const { return owner_; }
    device::buffer_id buffer() const { return id_; }
    storage_kind storage() const { return storage_; }
    std::size_t batch() const { return batch_; }
    std::size_t heads() const { return heads_; }
    std::size_t rows() const { return rows_; }
    std::size_t cols() const { return cols_; }

private:
    template <class El>
    static std::vector<float> widened(const std::vector<El>& stored) {
        std::vector<float> out(stored.size());
        for (std::size_t n = 0; n < stored.size(); ++n) out[n] = to_float(stored[n]);
        return out;
    }
    void reset() {
        if (owner_) try {
                owner_->release(id_);
            } catch (...) {  // a destructor must not throw; the device's own failure shows on its next call
            }
        owner_ = nullptr;
    }
    device* owner_ = nullptr;
    device::buffer_id id_ = 0;
    storage_kind storage_ = storage_kind::f32;
    std::size_t batch_ = 0, heads_ = 0, rows_ = 0, cols_ = 0;
};

// An input already on the device, for vulkan::run: bind_resident(Q, t). The
// tensor must hold the matrix's declared element (a shape_error says so
// when the run starts otherwise).
template <fixed_string Name, std::size_t R, std::size_t C, class El>
struct resident_binding {
    static constexpr auto name = Name;
    static constexpr std::size_t rows_static = R, cols_static = C;
    using element_type = El;
    const device_tensor* tensor = nullptr;
    // the same tensor bound under another name (shared_input_backward)
    template <fixed_string Other>
    resident_binding<Other, R, C, El> renamed() const {
        return {tensor};
    }
    // the shape bound (shape_of_binding)
    tensor_view<El> shape_view() const {
        if (!tensor || !tensor->owner()) throw shape_error("input " + std::string(Name.view()) + ": bound to an empty device_tensor");
        return tensor->template shape_view<El>();
    }
};

template <fixed_string Name, std::size_t R, std::size_t C, class El>
resident_binding<Name, R, C, El> bind_resident(const matrix<Name, R, C, El>&, const device_tensor& t) {
    static_assert(glsl::buffer_element<El>, "attnfuse: a device_tensor holds f32, f16 or bf16; declare the matrix bound resident with one of them");
    return {&t};
}

template <class X> struct is_resident_binding : std::false_type {};
template <fixed_string N, std::size_t R, std::size_t C, class El>
struct is_resident_binding<resident_binding<N, R, C, El>> : std::true_type {};
template <class X>
concept a_vulkan_binding = a_binding<X> || is_resident_binding<std::remove_cvref_t<X>>::value;

// The result of run_on_device: the output left in device memory, the input
// of a later run (bind_resident) or of other Vulkan work.
struct device_run_result {
    device_tensor output;
    report info;
};

namespace detail {

using glsl::operand_slot;
using glsl::score_slot;

inline constexpr std::size_t local_size = 64;
// The fused kernel keeps its rows' contexts in registers: up to this d_v.
inline constexpr std::size_t max_fused_dv = 256;

// The fused kernel's tile (device::tile(), shaders/flash_attention.glsl)
// as the host plans with it.
namespace flash {
// Its specialization constants: ACC (context columns per invocation: d_v
// rounded up to VC, over LANES), SHARES, then BQ, BK, LANES, DC, VC, QMAX
// and the local size (constant_id 0 to 8).
inline std::vector<std::uint32_t> specialization(const fused_tile& tile, std::size_t d_v, bool shares) {
    const std::uint32_t per_lane = tile.value_columns / tile.lanes;
    const auto chunks = static_cast<std::uint32_t>((std::max<std::size_t>(d_v, 1) + tile.value_columns - 1) / tile.value_columns);
    return {chunks * per_lane, shares ? 1u : 0u,  tile.queries, tile.keys, tile.lanes, tile.depth_step, tile.value_columns,
            tile.resident_depth, static_cast<std::uint32_t>(tile.invocations())};
}
// Loop steps one invocation of the shader runs per key tile, and besides
// the tiles: what a dispatch's window of key tiles is sized by under a
// driver's loop limit. The default tile's figures are calibrated on llvmpipe
// (Mesa 22.3) with af_check_loops, with a margin (LLVM unrolls its short
// constant loops, which then count nothing). Any other tile is planned from
// a count of every loop of the shader as written, which over-counts: its
// windows are smaller than they need be, never too large.
inline std::size_t loop_steps_per_tile(const fused_tile& tile, std::size_t depth, std::size_t d_v) {
    const std::size_t chunks = (d_v + tile.value_columns - 1) / tile.value_columns;
    if (tile == fused_tile{}) return 112 + 2 * depth + 64 * chunks;
    const std::size_t steps = (depth + tile.depth_step - 1) / tile.depth_step, per_lane = tile.keys / tile.lanes,
                      per_row = tile.value_columns / tile.lanes, staging = tile.invocations();
    return 1 + 2 * per_lane + 4 * std::size_t{tile.keys} + chunks * per_row +
           steps * (1 + (std::size_t{tile.depth_step} * tile.queries + staging - 1) / staging +  // the two staging loops,
                    (std::size_t{tile.depth_step} * tile.keys + staging - 1) / staging +        // each its own ceiling
                    std::size_t{tile.depth_step} * (1 + per_lane)) +
           chunks * (1 + (std::size_t{tile.keys} * tile.value_columns + staging - 1) / staging + 2 * per_row * (1 + tile.keys));
}
inline std::size_t loop_steps_fixed(const fused_tile& tile, std::size_t d_v) {
    if (tile == fused_tile{}) return 256;
    const std::size_t chunks = (d_v + tile.value_columns - 1) / tile.value_columns, per_row = tile.value_columns / tile.lanes;
    return 64 + (std::size_t{tile.queries} * tile.resident_depth + tile.invocations() - 1) / tile.invocations() + 4 * chunks * per_row;
}
inline constexpr std::size_t merge_steps_per_share = 4;  // combine_splits.glsl's loops over the shares

// shaders/flash_rows.glsl keeps R rows of depth + d_v floats per invocation:
// R is chosen so that R (depth + d_v) stays within this many registers' worth
inline constexpr std::size_t rows_register_budget = 2048;
inline constexpr std::size_t rows_max_depth = 256;

// shaders/flash_matrix.glsl: WARPS warps of WARP invocations, 16 query rows
// each, over key tiles of 16 KF keys.
struct matrix_shape {
    std::size_t warps = 0, key_fragments = 0, warp = 0;
    bool cooperative = false;  // fragments_cooperative.glsl, else fragments_plain.glsl
};
inline constexpr std::size_t matrix_max_depth = 256;
inline std::size_t round_up16(std::size_t n) { return (n + 15) / 16 * 16; }
// Its shared arrays in bytes, as the shader declares them: the f16 tiles
// (floats in the plain fragments), the f32 score tile, scratch and row scales.
inline std::size_t matrix_shared_bytes(const matrix_shape& s, std::size_t depth, std::size_t d_v) {
    const std::size_t element = s.cooperative ? 2 : 4, bq = 16 * s.warps, bk = 16 * s.key_fragments;
    const std::size_t dp = round_up16(depth), vp = round_up16(d_v);
    return element * (bq * (dp + 8) + std::max(dp * (bk + 8), bk * (vp + 8)) + bq * (bk + 8)) +
           4 * (bq * (bk + 4) + s.warps * 16 * 20 + bq);
}
// Its specialization constants: D, DV, SHARES, WARPS, KF, WARP, the local size.
inline std::vector<std::uint32_t> matrix_specialization(const matrix_shape& s, std::size_t depth, std::size_t d_v, bool shares) {
    return {static_cast<std::uint32_t>(depth), static_cast<std::uint32_t>(d_v), shares ? 1u : 0u, static_cast<std::uint32_t>(s.warps),
            static_cast<std::uint32_t>(s.key_fragments), static_cast<std::uint32_t>(s.warp),
            static_cast<std::uint32_t>(s.warps * s.warp)};
}
// Loop steps of one invocation per key tile and besides, counted from every
// loop of the shader as written (the plain fragments' too, which llvmpipe
// may unroll): an over-count, so windows are smaller than they need be.
inline std::size_t matrix_loop_steps_per_tile(const matrix_shape& s, std::size_t depth, std::size_t d_v) {
    const std::size_t wg = s.warps * s.warp, per = 256 / s.warp, df = round_up16(depth) / 16, vf = round_up16(d_v) / 16;
    const std::size_t bq = 16 * s.warps, bk = 16 * s.key_fragments, kf = s.key_fragments;
    const auto over = [&](std::size_t n) { return (n + wg - 1) / wg + 1; };
    const std::size_t product = 1 + 17 * per;  // one AF_MMA
    return over(bk * 16 * df) + kf * (2 + 2 * per + df * product) + over(bq * bk) + 5 * bk + 5 + over(bk * 16 * vf) + vf * per +
           kf + vf * (2 + 3 * per + kf * product) + 1;
}
inline std::size_t matrix_loop_steps_fixed(const matrix_shape& s, std::size_t depth, std::size_t d_v) {
    const std::size_t wg = s.warps * s.warp, per = 256 / s.warp, df = round_up16(depth) / 16, vf = round_up16(d_v) / 16;
    return (16 * s.warps * 16 * df + wg - 1) / wg + 1 + df + 4 * vf * per + 64;
}
static_assert(shader_sources::flash_matrix.find("layout(constant_id = 0) const uint D ") != std::string_view::npos &&
                  shader_sources::flash_matrix.find("layout(constant_id = 1) const uint DV ") != std::string_view::npos &&
                  shader_sources::flash_matrix.find("layout(constant_id = 2) const bool SHARES") != std::string_view::npos &&
                  shader_sources::flash_matrix.find("layout(constant_id = 3) const uint WARPS ") != std::string_view::npos &&
                  shader_sources::flash_matrix.find("layout(constant_id = 4) const uint KF ") != std::string_view::npos &&
                  shader_sources::flash_matrix.find("layout(constant_id = 5) const uint WARP ") != std::string_view::npos &&
                  shader_sources::flash_matrix.find("layout(local_size_x_id = 6) in;") != std::string_view::npos &&
                  shader_sources::flash_matrix.find("//@fragments") != std::string_view::npos,
              "attnfuse internal: shaders/flash_matrix.glsl and vulkan::detail::flash disagree on the specialization constants");

// What of an attention decides whether flash_matrix.glsl can run it.
struct matrix_request {
    bool hard = false, pairwise = false;
    bool sixteen_bit_inputs = false;  // queries, keys and values stored as f16 or bf16
};

}  // namespace flash

// Which shader text a fused attention runs (fused_design, resolved per run).
enum class fused_kernel { staged_tiles, register_rows, matrix_plain, matrix_cooperative };

namespace flash {
// The fused kernel a run dispatches and the tiles the host plans it with.
struct kernel_shape {
    bool register_rows = false;         // flash_rows.glsl, else flash_attention.glsl
    std::size_t queries = 0;            // per workgroup: the query tile
    std::size_t keys = 0;               // per key tile
    std::size_t rows_per_invocation = 1;
    std::size_t invocations = 0;        // per workgroup
    bool broadcast = false;             // register rows: keys shared over the subgroup
    bool key_lanes = false;             // register rows, few queries: keys spread over the invocations
    bool matrix = false;                // flash_matrix.glsl
    matrix_shape fragments = {};
    std::string not_matrix;             // the design is matrix_tiles, but this attention runs staged: why
    fused_kernel kernel() const {
        if (matrix) return fragments.cooperative ? fused_kernel::matrix_cooperative : fused_kernel::matrix_plain;
        return register_rows ? fused_kernel::register_rows : fused_kernel::staged_tiles;
    }
};
// The matrix kernel's shape for this attention, or why it cannot run it.
inline std::variant<matrix_shape, std::string> matrix_shape_for(const device& dev, const matrix_request& request, std::size_t depth,
                                                                 std::size_t d_v, std::size_t n_q) {
    if (request.hard) return std::string("hard attention multiplies no weights by values");
    if (request.pairwise) return std::string("a pairwise (additive) score is no product of queries and keys");
    if (depth > matrix_max_depth || d_v > matrix_max_depth)
        return "depth " + std::to_string(depth) + " and d_v " + std::to_string(d_v) + ": the matrix kernel runs up to 256";
    if (!request.sixteen_bit_inputs && !dev.matrix_for_f32())
        return std::string("f32 inputs (device_options::design = matrix_tiles runs them too, rounded to f16)");
    const bool cooperative = dev.limits().cooperative_matrix;
    const std::size_t warp = cooperative ? dev.limits().subgroup_size : 32;
    const std::size_t invocations = std::min<std::size_t>(dev.limits().max_workgroup_invocations, 1024);
    for (std::size_t warps : {4, 2, 1}) {
        if (warps > 1 && 16 * warps / 2 >= n_q) continue;  // half the rows or more idle: fewer warps
        if (warps * warp > invocations) continue;
        for (std::size_t key_fragments : {2, 1}) {
            const matrix_shape s{warps, key_fragments, warp, cooperative};
            if (matrix_shared_bytes(s, depth, d_v) <= dev.limits().max_shared_memory) return s;
        }
    }
    return "depth " + std::to_string(depth) + " and d_v " + std::to_string(d_v) + ": its smallest tiles need " +
           std::to_string(matrix_shared_bytes({1, 1, warp, cooperative}, depth, d_v)) + " bytes of shared memory, the device has " +
           std::to_string(dev.limits().max_shared_memory);
}
inline kernel_shape shape_for(const device& dev, std::size_t depth, std::size_t d_v, std::size_t n_q, bool staged_only,
                              const matrix_request& request = {}) {
    std::string not_matrix;
    if (!staged_only && dev.design() == fused_design::matrix_tiles) {
        auto m = matrix_shape_for(dev, request, depth, d_v, n_q);
        if (const matrix_shape* s = std::get_if<matrix_shape>(&m)) {
            return {.queries = 16 * s->warps, .keys = 16 * s->key_fragments, .invocations = s->warps * s->warp, .matrix = true,
                    .fragments = *s, .not_matrix = {}};
        }
        not_matrix = std::get<std::string>(m);
    }
    if (!staged_only && dev.design() == fused_design::register_rows && depth <= rows_max_depth && d_v <= max_fused_dv) {
        const register_rows_shape& shape = dev.rows();
        const std::size_t wg = shape.invocations;
        const bool broadcast = dev.limits().subgroup_broadcast && wg == dev.limits().subgroup_size && shape.keys % wg == 0 &&
                               shape.keys <= 32;
        std::size_t r = std::min<std::size_t>(shape.rows, std::max<std::size_t>(1, rows_register_budget / (depth + d_v)));
        // fewer queries than a workgroup's invocations (decode): the keys go
        // over the invocations, each holding every row
        if (broadcast && dev.limits().subgroup_reduce && n_q < wg) {
            r = std::min(r, n_q);
            return {.register_rows = true, .queries = r, .keys = shape.keys, .rows_per_invocation = r, .invocations = wg,
                    .broadcast = true, .key_lanes = true, .matrix = false, .fragments = {}, .not_matrix = {}};
        }
        r = std::max<std::size_t>(1, std::min(r, (n_q + wg - 1) / wg));  // few queries: no idle row blocks
        return {.register_rows = true, .queries = r * wg, .keys = shape.keys, .rows_per_invocation = r, .invocations = wg,
                .broadcast = broadcast, .key_lanes = false, .matrix = false, .fragments = {}, .not_matrix = {}};
    }
    const fused_tile& tile = dev.tile();
    return {.queries = tile.queries, .keys = tile.keys, .invocations = tile.invocations(), .not_matrix = std::move(not_matrix)};
}
// flash_rows.glsl's specialization constants: D, DV, SHARES, R, BK, the local size, BROADCAST, KEY_LANES.
inline std::vector<std::uint32_t> rows_specialization(const kernel_shape& shape, std::size_t depth, std::size_t d_v, bool shares) {
    return {static_cast<std::uint32_t>(depth), static_cast<std::uint32_t>(d_v), shares ? 1u : 0u,
            static_cast<std::uint32_t>(shape.rows_per_invocation), static_cast<std::uint32_t>(shape.keys),
            static_cast<std::uint32_t>(shape.invocations), shape.broadcast ? 1u : 0u, shape.key_lanes ? 1u : 0u};
}
// Loop steps of flash_rows.glsl per key tile and besides, as llvmpipe
// (Mesa 22.3) counts them: its loops over rows and keys are unrolled
// ([[unroll]]), those over depth and value columns are not. Calibrated with
// af_check_loops on long key rows at depths 3 to 256 and 1 to 8 rows per
// invocation (a window of 426 tiles ran at depth = d_v = 64, one of 490 was
// cut short), with a margin; a miss is caught and redone in smaller windows.
inline std::size_t rows_loop_steps_per_tile(std::size_t depth, std::size_t d_v) { return depth + d_v + 16; }
inline std::size_t rows_loop_steps_fixed(const kernel_shape& shape, std::size_t depth, std::size_t d_v) {
    return shape.rows_per_invocation * (depth + 4 * d_v) + 64;  // queries, context and resumed state in, the merge, results out
}
static_assert(shader_sources::flash_rows.find("layout(constant_id = 0) const uint D ") != std::string_view::npos &&
                  shader_sources::flash_rows.find("layout(constant_id = 1) const uint DV ") != std::string_view::npos &&
                  shader_sources::flash_rows.find("layout(constant_id = 2) const bool SHARES") != std::string_view::npos &&
                  shader_sources::flash_rows.find("layout(constant_id = 3) const uint R ") != std::string_view::npos &&
                  shader_sources::flash_rows.find("layout(constant_id = 4) const uint BK ") != std::string_view::npos &&
                  shader_sources::flash_rows.find("layout(local_size_x_id = 5) in;") != std::string_view::npos &&
                  shader_sources::flash_rows.find("layout(constant_id = 6) const bool BROADCAST") != std::string_view::npos &&
                  shader_sources::flash_rows.find("layout(constant_id = 7) const bool KEY_LANES") != std::string_view::npos,
              "attnfuse internal: shaders/flash_rows.glsl and vulkan::detail::flash disagree on the specialization constants");
// The shader's constants are the ones specialization() gives, in its order.
static_assert(shader_sources::flash_attention.find("layout(constant_id = 0) const uint ACC") != std::string_view::npos &&
                  shader_sources::flash_attention.find("layout(constant_id = 1) const bool SHARES") != std::string_view::npos &&
                  shader_sources::flash_attention.find("layout(constant_id = 2) const uint BQ") != std::string_view::npos &&
                  shader_sources::flash_attention.find("layout(constant_id = 3) const uint BK") != std::string_view::npos &&
                  shader_sources::flash_attention.find("layout(constant_id = 4) const uint LANES") != std::string_view::npos &&
                  shader_sources::flash_attention.find("layout(constant_id = 5) const uint DC") != std::string_view::npos &&
                  shader_sources::flash_attention.find("layout(constant_id = 6) const uint VC") != std::string_view::npos &&
                  shader_sources::flash_attention.find("layout(constant_id = 7) const uint QMAX") != std::string_view::npos &&
                  shader_sources::flash_attention.find("layout(local_size_x_id = 8) in;") != std::string_view::npos,
              "attnfuse internal: shaders/flash_attention.glsl and vulkan::detail::flash disagree on the specialization constants");
}  // namespace flash

// A matrix on the device: a buffer and how to read it.
struct operand {
    device::buffer_id buffer = 0;
    std::uint32_t geometry[glsl::geometry_words] = {};  // rows, cols, batch, heads, strides, base (in elements)
    storage_kind storage = storage_kind::f32;           // how the kernel reads its elements (glsl::operand_declaration)
    std::size_t rows() const { return geometry[0]; }
    std::size_t cols() const { return geometry[1]; }
};

inline operand dense_operand(device::buffer_id id, std::size_t rows, std::size_t cols, std::size_t batch, std::size_t heads,
                             storage_kind storage = storage_kind::f32) {
    operand o;
    o.buffer = id;
    o.storage = storage;
    const auto m = static_cast<std::uint32_t>(rows * cols);
    const std::uint32_t g[] = {static_cast<std::uint32_t>(rows), static_cast<std::uint32_t>(cols), static_cast<std::uint32_t>(batch),
                               static_cast<std::uint32_t>(heads), static_cast<std::uint32_t>(cols), 1u,
                               static_cast<std::uint32_t>(heads) * m, m, 0u};
    std::memcpy(o.geometry, g, sizeof g);
    return o;
}

// What makes two uploads the same: the memory and the whole view of it.
using upload_key = std::tuple<const void*, std::size_t, std::size_t, std::size_t, std::size_t, std::ptrdiff_t, std::ptrdiff_t,
                              std::ptrdiff_t, std::ptrdiff_t>;

// Row statistics as the kernels hold them: each row's max and sum side by
// side (rows x 2 per (batch, head)).
inline std::vector<float> statistics_as_pairs(const row_statistics& s) {
    std::vector<float> pairs(2 * s.max.size());
    for (std::size_t row = 0; row < s.max.size(); ++row) {
        pairs[2 * row] = s.max[row];
        pairs[2 * row + 1] = s.sum[row];
    }
    return pairs;
}
inline row_statistics statistics_from_pairs(const std::vector<float>& pairs, std::size_t batch, std::size_t heads, std::size_t rows) {
    row_statistics s{batch, heads, rows, std::vector<float>(pairs.size() / 2), std::vector<float>(pairs.size() / 2)};
    for (std::size_t row = 0; row < s.max.size(); ++row) {
        s.max[row] = pairs[2 * row];
        s.sum[row] = pairs[2 * row + 1];
    }
    return s;
}

// A grid of workgroups and the invocations of each.
struct workgroups {
    std::array<std::size_t, 3> grid;
    std::size_t local_size;
};

template <class Env>
struct executor {
    device& dev;
    Env env;  // its own copy: the lowering sets env.heads inside concat_heads
    options opt;
    report& info;
    std::vector<device::buffer_id> owned;               // released at the end of the run
    std::map<upload_key, operand> uploaded;             // one upload per bound view
    std::map<std::string, operand> resident;            // inputs already on the device, by name
    bool all_from_disk = true;
    std::set<const void*> score_nodes;                  // plan::collect_score_nodes
    // Times this run's loop windows were halved after a shader reported that
    // the driver ended its loops early (af_check_loops): the run is redone.
    std::size_t halvings = 0;
    std::optional<device::buffer_id> status;            // the run's status word, host-visible
    // flash_rows.glsl found a NaN or inf value under a weight other than 0
    // (status bit 2): the run is redone with flash_attention.glsl, exact there
    bool staged_only = false;
    // A training forward's row statistics (run_for_training): the root
    // attention's fused kernel, or where it runs unfused the kernel of its
    // softmax node, writes each row's max and sum into `statistics` (n_q x 2
    // per (batch, head)).
    const void* statistics_attention = nullptr;
    const void* statistics_softmax = nullptr;
    std::optional<device::buffer_id> statistics;
    // Runs the kernel `source` that writes those statistics (rows x 2 per
    // (batch, head): max, sum) into a buffer of their own.
    void keep_statistics(const std::string& source, const std::vector<operand>& operands, const std::vector<std::uint32_t>& numbers,
                         std::size_t rows) {
        const std::size_t elements = env.batch * env.heads * rows * 2;
        statistics = buffer(std::max<std::size_t>(elements, 1) * sizeof(float), "the row statistics", false);
        launch("row_statistics", "the row statistics of the training forward (max, sum)", source, operands, numbers, *statistics, rows, 2,
               elements);
    }

    // Also on the way out of an exception: release submits recorded work and
    // may throw itself, which must not escape a destructor.
    ~executor() {
        for (auto id : owned) try {
                dev.release(id);
            } catch (...) {
            }
    }

    // How many iterations of a loop whose every iteration costs `per_iteration`
    // loop steps one invocation may run, besides `fixed` steps of its own,
    // within the device's limit on loop iterations (unbounded without one).
    // A quarter of the limit is kept back for what the estimate misses.
    std::size_t loop_window(std::size_t per_iteration, std::size_t fixed = 64) const {
        // a device with no known limit that still cut a loop short is given llvmpipe's
        const std::size_t limit = dev.limits().max_loop_iterations ? dev.limits().max_loop_iterations : halvings ? 65535 : 0;
        if (limit == 0) return std::numeric_limits<std::uint32_t>::max();
        const std::size_t usable = (limit / 4 * 3) >> halvings;
        return std::max<std::size_t>(1, usable > fixed ? (usable - fixed) / std::max<std::size_t>(per_iteration, 1) : 1);
    }

    device::buffer_id status_buffer() {
        if (!status) {
            status = dev.create_buffer(4, "the run's status word", true);
            owned.push_back(*status);
            const std::uint32_t zero = 0;
            dev.upload(*status, &zero, 4);
        }
        return *status;
    }

    bool uploaded_buffer(device::buffer_id id) const {
        for (const auto& [key, o] : uploaded)
            if (o.buffer == id) return true;
        return false;
    }

    device::buffer_id buffer(std::size_t bytes, const std::string& what, bool intermediate) {
        const auto id = dev.create_buffer(bytes, what);
        owned.push_back(id);
        if (intermediate) info.intermediate_bytes += bytes;
        return id;
    }

    // An input's memory span goes up once; its strides come along unchanged.
    template <class El>
    operand upload(const tensor_view<El>& v, const std::string& name) {
        if (auto found = resident.find(name); found != resident.end()) return found->second;
        const element_span span = checked_span(v, name);  // overflow-checked: a wrapped span would upload too little
        // an axis of extent 1 reaches nothing: its stride is 0 here, whatever the view says
        auto stride = [](std::size_t extent, std::ptrdiff_t s) { return extent > 1 ? s : std::ptrdiff_t{0}; };
        const std::ptrdiff_t rs = stride(v.rows, v.row_stride), cs = stride(v.cols, v.col_stride),
                             bs = stride(v.batch, v.batch_stride), hs = stride(v.heads, v.head_stride);
        const upload_key key{v.data, v.rows, v.cols, v.batch, v.heads, rs, cs, bs, hs};
        if (auto found = uploaded.find(key); found != uploaded.end()) return found->second;
        const std::size_t count = span.count();
        if (count > dev.limits().max_storage_buffer_range / sizeof(El))
            throw out_of_memory_error("attnfuse: input " + name + " spans " + std::to_string(count) + " elements of " +
                                      std::to_string(sizeof(El)) + " bytes, more than this device's maxStorageBufferRange (" +
                                      std::to_string(dev.limits().max_storage_buffer_range) + " bytes) for one binding");
        operand o;
        o.storage = glsl::storage_of<El>();
        // as stored: 16-bit elements go up as they are, read by every kernel
        o.buffer = buffer(device_tensor::stored_bytes(o.storage, count), "input " + name, false);
        dev.upload(o.buffer, v.data + span.low, count * sizeof(El));
        if (o.storage != storage_kind::f32 && !dev.limits().storage_16bit) note_word_reads(name, o.storage);
        // within one binding every offset fits the shader's 32-bit int
        const std::uint32_t g[] = {static_cast<std::uint32_t>(v.rows), static_cast<std::uint32_t>(v.cols),
                                   static_cast<std::uint32_t>(v.batch), static_cast<std::uint32_t>(v.heads),
                                   static_cast<std::uint32_t>(rs), static_cast<std::uint32_t>(cs),
                                   static_cast<std::uint32_t>(bs), static_cast<std::uint32_t>(hs),
                                   static_cast<std::uint32_t>(-span.low)};
        std::memcpy(o.geometry, g, sizeof g);
        uploaded.emplace(key, o);
        return o;
    }

    // A 16-bit input on a device opened without 16-bit storage buffers.
    void note_word_reads(const std::string& name, storage_kind storage) {
        const std::string note = "input " + name + ": stored as " + std::string(glsl::name_of(storage)) +
                                 ", read in place as halves of 32-bit words (" + dev.info().name +
                                 (dev.limits().storage_16bit_supported ? " was opened without 16-bit storage buffers)"
                                                                       : " has no 16-bit storage buffers)");
        if (std::find(info.notes.begin(), info.notes.end(), note) == info.notes.end()) info.notes.push_back(note);
    }

    // The words a kernel's P.u holds (as the second launch builds them): the
    // outer extents, each operand's geometry, the numbers, the output's extents.
    static std::size_t parameter_words(std::size_t operands, std::size_t numbers) {
        return glsl::header_words + operands * glsl::geometry_words + numbers + 2;
    }

    // Compiles (once) and dispatches `body` over `invocations` threads (one
    // dimension, `local_size` per workgroup), with `operands` bound from
    // binding 2 and `numbers` after their geometry. The parameters go in
    // push constants, recorded with the dispatch, where they fit the
    // device's limit; else in a buffer.
    void launch(const std::string& name, const std::string& description, const std::string& body, const std::vector<operand>& operands,
                const std::vector<std::uint32_t>& numbers, device::buffer_id output, std::size_t out_rows, std::size_t out_cols,
                std::size_t invocations) {
        const std::size_t groups = (invocations + local_size - 1) / local_size;
        // two dimensions of workgroups, so that large outputs stay within
        // maxComputeWorkGroupCount[0]
        const std::size_t max_x = std::min<std::size_t>(dev.limits().max_workgroup_count[0], 65535);
        const std::size_t gx = std::min(groups, max_x), gy = (groups + max_x - 1) / max_x;
        const std::size_t words = parameter_words(operands.size(), numbers.size());
        const bool push = words * 4 <= dev.limits().max_push_constants;
        launch(name, description, glsl::prelude(operands.size(), numbers.size(), local_size, push ? words : 0) + body, operands, numbers,
               output, out_rows, out_cols, {gx, gy, 1}, {}, {}, push);
    }

    // `body` over an explicit grid of workgroups of `local_size` invocations,
    // its prelude written as the one above writes it, with `extra` words
    // after the output's extents (whose count the text does not hold: then
    // the parameters go in a buffer).
    void launch(const std::string& name, const std::string& description, const std::string& body, const std::vector<operand>& operands,
                const std::vector<std::uint32_t>& numbers, device::buffer_id output, std::size_t out_rows, std::size_t out_cols,
                const workgroups& grid, const std::vector<std::uint32_t>& extra = {}) {
        const std::size_t words = parameter_words(operands.size(), numbers.size());
        const bool push = extra.empty() && words * 4 <= dev.limits().max_push_constants;
        launch(name, description, glsl::prelude(operands.size(), numbers.size(), grid.local_size, push ? words : 0) + body, operands,
               numbers, output, out_rows, out_cols, grid.grid, extra, {}, push);
    }

    // A whole `source` (prelude included) over an explicit grid of
    // workgroups, with `extra` words after the output's extents and
    // `specialization` constants (constant_id 0..); `push` when the
    // source's prelude declared its parameters as push constants.
    void launch(const std::string& name, const std::string& description, const std::string& source, const std::vector<operand>& operands,
                const std::vector<std::uint32_t>& numbers, device::buffer_id output, std::size_t out_rows, std::size_t out_cols,
                std::array<std::size_t, 3> grid, const std::vector<std::uint32_t>& extra, const std::vector<std::uint32_t>& specialization,
                bool push = false) {
        std::vector<std::uint32_t> params{static_cast<std::uint32_t>(env.batch), static_cast<std::uint32_t>(env.heads)};
        for (const auto& o : operands) params.insert(params.end(), o.geometry, o.geometry + glsl::geometry_words);
        params.insert(params.end(), numbers.begin(), numbers.end());
        params.push_back(static_cast<std::uint32_t>(out_rows));
        params.push_back(static_cast<std::uint32_t>(out_cols));
        params.insert(params.end(), extra.begin(), extra.end());
        const std::size_t push_bytes = push ? params.size() * 4 : 0;

        std::vector<storage_kind> kinds;
        for (const auto& o : operands) kinds.push_back(o.storage);
        const bool all_f32 = std::all_of(kinds.begin(), kinds.end(), [](storage_kind k) { return k == storage_kind::f32; });
        const auto built = std::chrono::steady_clock::now();
        const auto kernel = dev.kernel(all_f32 ? source : glsl::with_operand_storage(source, kinds, dev.limits().storage_16bit), name, static_cast<std::uint32_t>(3 + operands.size()), static_cast<std::uint32_t>(push_bytes),
                                       specialization);
        info.build_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - built).count();
        all_from_disk = all_from_disk && dev.kernel_from_disk_cache(kernel);

        const device::buffer_id p = push ? output : buffer(params.size() * 4, "kernel parameters", false);
        if (!push) dev.upload(p, params.data(), params.size() * 4);
        std::vector<device::buffer_id> bindings{p, output};  // binding 0 unused with push constants
        for (const auto& o : operands) bindings.push_back(o.buffer);
        bindings.push_back(status_buffer());
        for (int a = 0; a < 3; ++a)
            if (grid[a] > dev.limits().max_workgroup_count[a])
                throw error("attnfuse: " + description + " needs " + std::to_string(grid[a]) + " workgroups along dimension " +
                            std::to_string(a) + ", more than this device's maxComputeWorkGroupCount[" + std::to_string(a) + "] = " +
                            std::to_string(dev.limits().max_workgroup_count[a]));
        dev.dispatch(kernel, bindings, push ? params.data() : nullptr, push_bytes, static_cast<std::uint32_t>(std::max<std::size_t>(grid[0], 1)),
                     static_cast<std::uint32_t>(std::max<std::size_t>(grid[1], 1)), static_cast<std::uint32_t>(std::max<std::size_t>(grid[2], 1)));
        if (!description.empty()) info.kernels.push_back(description);  // one entry per planned kernel, however many dispatches
        ++info.dispatches;
    }
};

template <class E, class X> operand evaluate(const E& e, X& x);

// Replaces non-pointwise operands by operand slots (appending them to
// `operands`, the slot holding where), the core by the score slot, and
// scale(e) by its number. The kernel binds the operands in the order its
// text reads the slots (glsl::emitter's `slots`), whatever order this was.
template <class Core, class E, class X>
auto prepare(const E& e, X& x, std::vector<operand>& operands) {
    if constexpr (!std::is_void_v<Core> && std::is_same_v<E, Core>) {
        return score_slot{};
    } else if constexpr (std::is_same_v<E, constant> || std::is_same_v<E, query_index> || std::is_same_v<E, key_index> ||
                         std::is_same_v<E, pair_query_feature> || std::is_same_v<E, pair_key_feature>) {
        return e;
    } else if constexpr (!is_pointwise_v<E>) {
        operands.push_back(evaluate(e, x));
        operand_slot slot;
        slot.index = operands.size() - 1;
        return slot;
    } else if constexpr (has_kind_v<E, kind::scale_by_inner_extent>) {
        const double d = static_cast<double>(inner_extent(e, x.env));
        return make_node(kind::scale_by{{}, 1.0 / std::sqrt(d)}, prepare<Core>(e.template kid<0>(), x, operands));
    } else {
        // kids left to right (a braced list is evaluated in order)
        auto kids = std::apply([&](const auto&... k) { return std::tuple{prepare<Core>(k, x, operands)...}; }, e.kids);
        return std::apply([&](auto&&... k) { return make_node(e.kind, std::move(k)...); }, std::move(kids));
    }
}

// The type prepare<Core>(e, ...) returns, from the types alone.
template <class Core, class E>
constexpr auto prepared_type() {
    if constexpr (!std::is_void_v<Core> && std::is_same_v<E, Core>) return std::type_identity<score_slot>{};
    else if constexpr (std::is_same_v<E, constant> || std::is_same_v<E, query_index> || std::is_same_v<E, key_index> ||
                       std::is_same_v<E, pair_query_feature> || std::is_same_v<E, pair_key_feature>)
        return std::type_identity<E>{};
    else if constexpr (!is_pointwise_v<E>) return std::type_identity<operand_slot>{};
    else if constexpr (has_kind_v<E, kind::scale_by_inner_extent>)
        return std::type_identity<node<kind::scale_by, typename decltype(prepared_type<Core, std::tuple_element_t<0, typename E::kids_type>>())::type>>{};
    else
        return []<class K, class... Kids>(node<K, Kids...>*) {
            return std::type_identity<node<K, typename decltype(prepared_type<Core, Kids>())::type...>>{};
        }(static_cast<E*>(nullptr));
}
template <class Core, class E>
using prepared_t = typename decltype(prepared_type<Core, std::remove_cvref_t<E>>())::type;

// The fused kernel's epilogue as the shader reads it: the prepared score, with
// scale(core) folded onto the queries where it can be (epilogue.hpp; a
// pairwise score is no product of the queries: nothing folds). One decision
// for the shader text and for the run that collects its numbers.
template <class E>
struct fused_epilogue {
    using parts = plan::attention_parts<E>;
    using prepared = prepared_t<typename parts::core_type, decltype(parts::score(std::declval<const E&>()))>;
    static constexpr bool folds_scale = !parts::core_kind::pairwise && holds_scaled_core<prepared>::value;
    using type = std::conditional_t<folds_scale, folded_t<prepared>, prepared>;
};

inline std::string element_prologue() { return std::string(shader_sources::element_prologue); }
// shaders/row_pass.glsl, which takes maxima with op::maximum's GLSL face
inline std::string row_pass_source() {
    return std::string(op::maximum::glsl_definition) + "\n" + element_prologue() + std::string(shader_sources::row_pass);
}

template <class X>
device::buffer_id output_buffer(X& x, std::size_t rows, std::size_t cols, const std::string& what) {
    return x.buffer(std::max<std::size_t>(x.env.batch * x.env.heads * rows * cols, 1) * sizeof(float), what, true);
}

// The bindings of a kernel: its `fixed` first operands, then the prepared
// ones in the order its text reads their slots.
inline std::vector<operand> in_text_order(const std::vector<operand>& prepared, std::size_t fixed, const std::vector<std::size_t>& slots) {
    std::vector<operand> bound(prepared.begin(), prepared.begin() + static_cast<std::ptrdiff_t>(fixed));
    for (const std::size_t s : slots) bound.push_back(prepared.at(s));
    if (bound.size() != prepared.size()) throw error("attnfuse internal: a kernel's text reads other operands than were prepared for it");
    return bound;
}

template <class E, class X>
operand pointwise_kernel(const E& e, X& x) {
    const runtime_shape shape = shape_of(e, x.env);
    std::vector<operand> prepared;
    const auto tree = prepare<void>(e, x, prepared);
    std::vector<std::uint32_t> numbers;
    std::vector<std::size_t> slots;
    glsl::emitter emit{0, 0, {}, false, &numbers, &slots};
    const std::string value = emit(tree);
    const std::vector<operand> operands = in_text_order(prepared, 0, slots);
    const std::string body = emit.definitions + element_prologue() + "    OUT.d[idx] = " + value + ";\n}\n";
    const auto out = output_buffer(x, shape.rows, shape.cols, "the result of " + to_string(e));
    x.launch("pointwise", plan::kernel_name<plan::pointwise_kernel<E>>::get(e), body, operands, numbers, out, shape.rows, shape.cols,
             x.env.batch * x.env.heads * shape.rows * shape.cols);
    return dense_operand(out, shape.rows, shape.cols, x.env.batch, x.env.heads);
}

// Dispatches `body` (which reads NUMU(AF_CHUNK) .. NUMU(AF_CHUNK + 2u): a
// chunk [begin, end) of a loop over `extent` and whether it resumes from
// OUT) as many times as the device's loop limit needs, each chunk within
// loop_window(per_iteration). The kernel is named once in the report. Over
// `invocations` of 64, or with `grid`, over its workgroups (and then with
// `extra` words after the output's extents, as launch takes them).
template <class X>
void chunked_launch(X& x, const std::string& kernel, const std::string& description, const std::string& body,
                    const std::vector<operand>& operands, std::vector<std::uint32_t> numbers, device::buffer_id out, std::size_t rows,
                    std::size_t cols, std::size_t invocations, std::size_t extent, std::size_t per_iteration,
                    const std::optional<workgroups>& grid = std::nullopt, const std::vector<std::uint32_t>& extra = {}) {
    const std::size_t window = x.loop_window(per_iteration);
    const std::size_t base = numbers.size(), pieces = (extent + window - 1) / window;
    numbers.resize(base + 3);
    const std::string source = "#define AF_CHUNK " + glsl::decimal(base) + "u\n" + body;
    for (std::size_t piece = 0, k0 = 0; piece < std::max<std::size_t>(pieces, 1); ++piece, k0 += window) {
        numbers[base] = static_cast<std::uint32_t>(k0);
        numbers[base + 1] = static_cast<std::uint32_t>(std::min(extent, k0 + window));
        numbers[base + 2] = piece > 0 ? 1u : 0u;
        const std::string what = piece == 0 ? description + (pieces > 1 ? " (in " + std::to_string(pieces) + " dispatches)" : "") : "";
        if (grid) x.launch(kernel, what, source, operands, numbers, out, rows, cols, *grid, extra);
        else x.launch(kernel, what, source, operands, numbers, out, rows, cols, invocations);
    }
}

// C = A * B by shaders/product_tiled.glsl where the device shares values
// over a subgroup (at most 32 wide): R rows x a subgroup of columns per
// invocation, the inner extent chunked as chunked_launch does. Returns false
// where it does not apply (then shaders/product.glsl runs).
template <class X>
bool tiled_product(X& x, const std::string& description, bool weighted_sum, const std::vector<operand>& operands, device::buffer_id out,
                   std::size_t rows, std::size_t cols, std::size_t extent) {
    const device_limits& limits = x.dev.limits();
    if (x.staged_only || !x.dev.tiled_products() || !limits.subgroup_broadcast || limits.subgroup_size == 0 || limits.subgroup_size > 32)
        return false;
    const std::size_t wg = limits.subgroup_size, r = std::max<std::size_t>(1, 32 / wg);
    const std::array<std::size_t, 3> grid{(cols + wg - 1) / wg, (rows + wg * r - 1) / (wg * r), x.env.batch * x.env.heads};
    for (int a = 0; a < 3; ++a)
        if (grid[a] > limits.max_workgroup_count[a]) return false;
    // the loop over the inner extent is the only one a driver keeps
    const std::size_t window = x.loop_window(2, 64 + 2 * r * wg);
    const std::size_t pieces = (extent + window - 1) / window;
    std::vector<std::uint32_t> numbers(3);
    const std::size_t words = x.parameter_words(operands.size(), numbers.size());
    const bool push = words * 4 <= limits.max_push_constants;
    const std::string source = glsl::prelude(operands.size(), numbers.size(), 0, push ? words : 0) + "#define AF_CHUNK 0u\n" +
                               (weighted_sum ? "#define AF_WEIGHTED_SUM\n" : "") + std::string(shader_sources::product_tiled);
    const std::vector<std::uint32_t> specialization{static_cast<std::uint32_t>(r), static_cast<std::uint32_t>(wg)};
    for (std::size_t piece = 0, k0 = 0; piece < std::max<std::size_t>(pieces, 1); ++piece, k0 += window) {
        numbers[0] = static_cast<std::uint32_t>(k0);
        numbers[1] = static_cast<std::uint32_t>(std::min(extent, k0 + window));
        numbers[2] = piece > 0 ? 1u : 0u;
        x.launch("product_tiled",
                 piece == 0 ? description + " [tiled: " + std::to_string(r) + " x " + std::to_string(wg) + " per invocation]" +
                                  (pieces > 1 ? " (in " + std::to_string(pieces) + " dispatches)" : "")
                            : "",
                 source, operands, numbers, out, rows, cols, grid, {}, specialization, push);
    }
    return true;
}
static_assert(shader_sources::product_tiled.find("layout(constant_id = 0) const uint R ") != std::string_view::npos &&
                  shader_sources::product_tiled.find("layout(local_size_x_id = 1) in;") != std::string_view::npos,
              "attnfuse internal: shaders/product_tiled.glsl and tiled_product disagree on the specialization constants");

template <class E, class X>
operand node_kernel(const E& e, X& x) {
    const runtime_shape shape = shape_of(e, x.env);
    std::vector<operand> operands;
    std::apply([&](const auto&... kids) { (operands.push_back(evaluate(kids, x)), ...); }, e.kids);
    const std::string name = plan::kernel_name<plan::node_kernel<E>>::get(e);
    const std::size_t bh = x.env.batch * x.env.heads;
    const std::size_t elements = bh * shape.rows * shape.cols;
    const auto out = output_buffer(x, shape.rows, shape.cols, "the result of " + to_string(e));
    if constexpr (has_kind_v<E, kind::product>) {
        // weights x values: a zero weight skips its value row (plan::is_weighted_sum)
        const std::string mode = plan::is_weighted_sum_v<E> ? "#define AF_WEIGHTED_SUM\n" : "";
        if (!tiled_product(x, name, plan::is_weighted_sum_v<E>, operands, out, shape.rows, shape.cols, operands[0].cols()))
            chunked_launch(x, "product", name, mode + element_prologue() + std::string(shader_sources::product), operands, {}, out,
                       shape.rows, shape.cols, elements, operands[0].cols(), 1);
    } else if constexpr (has_kind_v<E, kind::softmax> || has_kind_v<E, kind::hard>) {
        // three passes, each bounded: the row maxima, then the sums (softmax)
        // or the first column at the maximum (hard), then every weight at once
        constexpr bool hard = has_kind_v<E, kind::hard>;
        if (hard && shape.cols >= (std::size_t{1} << 24))
            throw error("attnfuse: unfused hard() over " + std::to_string(shape.cols) + " keys: the chosen column travels as a float, "
                        "exact below 2^24; run it fused");
        const auto rows_of = [&](const char* what) { return x.buffer(std::max<std::size_t>(bh * shape.rows, 1) * sizeof(float), what, true); };
        const auto top = rows_of("the row maxima"), second = rows_of(hard ? "the chosen columns" : "the row sums");
        const std::string pass = row_pass_source();
        chunked_launch(x, "row_max", name, "#define AF_MAX\n" + pass, {operands[0]}, {}, top, shape.rows, 1, bh * shape.rows,
                       shape.cols, 1);
        const operand top_operand = dense_operand(top, shape.rows, 1, x.env.batch, x.env.heads);
        chunked_launch(x, hard ? "row_first_at" : "row_sum_exp", "", (hard ? "#define AF_ROW_FIRST_AT\n" : "#define AF_ROW_SUM_EXP\n") + pass,
                       {operands[0], top_operand}, {}, second, shape.rows, 1, bh * shape.rows, shape.cols, 1);
        x.launch(hard ? "hard_write" : "softmax_write", "", (hard ? "#define AF_HARD\n" : "") + element_prologue() + std::string(shader_sources::row_write),
                 {operands[0], top_operand, dense_operand(second, shape.rows, 1, x.env.batch, x.env.heads)}, {}, out, shape.rows,
                 shape.cols, elements);
        if (!hard && x.statistics_softmax == static_cast<const void*>(&e))  // a training forward's: the row maxima and sums side by side
            x.keep_statistics(element_prologue() + "    OUT.d[idx] = j == 0u ? ld0(b, h, i, 0u) : ld1(b, h, i, 0u);\n}\n",
                              {top_operand, dense_operand(second, shape.rows, 1, x.env.batch, x.env.heads)}, {}, shape.rows);
    } else if constexpr (has_kind_template<E, kind::reduce_along_rows>::value || has_kind_template<E, kind::reduce_along_cols>::value) {
        constexpr bool along_rows = has_kind_template<E, kind::reduce_along_rows>::value;
        constexpr bool sum = std::is_same_v<typename E::kind_type::op, op::add>;
        const std::string mode = std::string(sum ? "#define AF_SUM\n" : "#define AF_MAX\n") + (along_rows ? "" : "#define AF_ALONG_COLS\n");
        chunked_launch(x, along_rows ? "reduce_rows" : "reduce_cols", name, mode + row_pass_source(),
                       operands, {}, out, shape.rows, shape.cols, elements, along_rows ? operands[0].cols() : operands[0].rows(), 1);
    } else {
        static_assert(has_kind_template<E, kind::pairwise>::value, "attnfuse internal: Vulkan has no kernel for this node");
        std::vector<std::uint32_t> numbers;
        glsl::emitter emit{0, 0, {}, false, &numbers};
        const std::string term = emit(e.kind.combine);
        const std::string body = emit.definitions + element_prologue() +
                                 "    float acc = NUMU(AF_CHUNK + 2u) != 0u ? OUT.d[idx] : 0.0;\n"
                                 "    uint a_end = NUMU(AF_CHUNK + 1u);\n"
                                 "    for (uint a = NUMU(AF_CHUNK); a < a_end; ++a) {\n"
                                 "        float qv = ld1(b, h, a, i), kv = ld2(b, h, a, j);\n        acc += ld0(b, h, a, 0u) * " +
                                 term + ";\n    }\n    OUT.d[idx] = acc;\n    af_check_loops();\n}\n";
        chunked_launch(x, "pairwise", name, body, operands, numbers, out, shape.rows, shape.cols, elements, operands[1].rows(), 1);
    }
    return dense_operand(out, shape.rows, shape.cols, x.env.batch, x.env.heads);
}

// The live key tiles of every query tile: interval bounds of the score over
// each (query tile, key tile), with the vectors among the inputs (key
// lengths, ALiBi slopes) read from host memory; tiles whose every score is
// -inf (every x 0 for a ratio) are left out at both ends of the row.
// Returns {vary by batch x head, query tiles, then per query tile the first
// and end live key tile and the first and end of its full ones}.
template <bool Ratio, class S, class X>
std::vector<std::uint32_t> live_key_tiles(const S& score, X& x, std::size_t n_q, std::size_t n_k, std::size_t bq, std::size_t bk) {
    const std::size_t qtiles = (n_q + bq - 1) / bq, ktiles = (n_k + bk - 1) / bk;
    bool reads_vectors = false;  // then the bounds depend on the batch and head
    std::size_t b = 0, h = 0;
    std::size_t tile_q0 = 0, tile_q1 = 0, tile_k0 = 0, tile_k1 = 0;  // the tile being bounded
    auto leaf = [&](const auto& node) -> interval {
        using N = std::remove_cvref_t<decltype(node)>;
        if constexpr (is_input_v<N>) {
            if (x.resident.count(std::string(N::name.view()))) return interval::everything();
            const auto v = x.env.template view<N::name>();
            if (v.rows > 1 && v.cols > 1) return interval::everything();
            reads_vectors = true;
            const auto* base = v.data + (v.batch == 1 ? 0 : static_cast<std::ptrdiff_t>(b) * v.batch_stride) +
                                static_cast<std::ptrdiff_t>(h / (x.env.heads / v.heads)) * v.head_stride;
            return vector_bounds(base, v.rows, v.cols, v.row_stride, v.col_stride, tile_q0, tile_q1, tile_k0, tile_k1);
        } else {
            return interval::everything();
        }
    };
    auto factor = [&](const auto& node) -> double {
        using N = std::remove_cvref_t<decltype(node)>;
        if constexpr (has_kind_v<N, kind::scale_by_inner_extent>) return 1.0 / std::sqrt(static_cast<double>(inner_extent(node, x.env)));
        else return node.kind.factor;
    };
    interval rows, cols;
    auto select_tile = [&](std::size_t qt, std::size_t kt) {
        tile_q0 = qt * bq, tile_q1 = std::min(n_q, qt * bq + bq);
        tile_k0 = kt * bk, tile_k1 = std::min(n_k, kt * bk + bk);
        rows = {static_cast<double>(tile_q0), static_cast<double>(tile_q1 - 1)};
        cols = {static_cast<double>(tile_k0), static_cast<double>(tile_k1 - 1)};
    };
    auto dead = [&](std::size_t qt, std::size_t kt) {
        select_tile(qt, kt);
        const interval tile = bounds(score, rows, cols, leaf, factor);
        return Ratio ? tile.surely_zero() : tile.all_minus_infinity();
    };
    // every mask keeps the whole tile: the shader runs the epilogue without them
    auto full = [&](std::size_t qt, std::size_t kt) {
        select_tile(qt, kt);
        return masks_keep_all(score, [&](const auto& keep) { return bounds(keep, rows, cols, leaf, factor); });
    };
    std::vector<std::uint32_t> table{0u, static_cast<std::uint32_t>(qtiles)};
    // per query tile: the live key tiles [first, end), and within them the
    // first run of full ones [full_first, full_end) (causal: the tiles left
    // of the diagonal; a window: its middle)
    auto fill = [&] {
        for (std::size_t qt = 0; qt < qtiles; ++qt) {
            std::size_t first = 0, end = ktiles;
            while (first < end && dead(qt, first)) ++first;
            while (end > first && dead(qt, end - 1)) --end;
            std::size_t full_first = first, full_end = first;
            if constexpr (holds_mask<S>::value) {
                while (full_first < end && !full(qt, full_first)) ++full_first;
                full_end = full_first;
                while (full_end < end && full(qt, full_end)) ++full_end;
            }
            for (const std::size_t word : {first, end, full_first, full_end}) table.push_back(static_cast<std::uint32_t>(word));
        }
    };
    fill();
    if (reads_vectors && x.env.batch * x.env.heads > 1) {
        table.resize(2);
        table[0] = 1u;
        for (b = 0; b < x.env.batch; ++b)
            for (h = 0; h < x.env.heads; ++h) fill();
    }
    return table;
}

// How many shares the keys of a fused attention are split into: `requested`
// when the caller chose; else, on a GPU whose queries x heads give fewer
// than 256 workgroups (decode, short prompts), enough shares for about 1024,
// each keeping at least 4 key tiles. Never on a CPU device, whose threads
// the workgroups already outnumber, nor where queries x heads fill a GPU
// already: measured on an H200, splitting 512 or 1024 workgroups gained
// nothing and the merge cost a little.
inline std::size_t key_splits(const device& dev, std::size_t requested, std::size_t workgroups, std::size_t key_tiles) {
    if (key_tiles < 2) return 1;
    if (requested) return std::min(requested, key_tiles);
    if (dev.info().kind == device_kind::cpu) return 1;
    constexpr std::size_t enough = 256, target = 1024;
    if (workgroups >= enough) return 1;
    return std::clamp<std::size_t>((target + workgroups - 1) / workgroups, 1, std::max<std::size_t>(1, std::min<std::size_t>(64, key_tiles / 4)));
}

// shaders/flash_matrix.glsl with its fragment implementation in place.
constexpr std::string matrix_kernel_text(bool cooperative) {
    std::string text(shader_sources::flash_matrix);
    const std::string_view marker = "//@fragments";
    const std::string_view fragments = cooperative ? shader_sources::fragments_cooperative : shader_sources::fragments_plain;
    text.replace(text.find(marker), marker.size(), fragments);
    return text;
}
// The extensions fragments_cooperative.glsl needs, after #version.
inline constexpr std::string_view cooperative_extensions =
    "#extension GL_NV_cooperative_matrix : require\n#extension GL_KHR_memory_scope_semantics : require\n"
    "#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require\n#extension GL_KHR_shader_subgroup_basic : require\n";

// The fused kernel's whole GLSL source: the prelude, the mode, the generated
// epilogue (and the epilogue without its masks), post factor and score term,
// then shaders/flash_attention.glsl (or the kernel's other text). One walk writes the text and, given the
// run's prepared trees and numbers, the parameter words it reads, in order.
// From the type alone (no values) it is a constant expression, so that a
// static_assert can read it (tests/test_vulkan.cpp does).
template <class E>
struct fused_shader {
    using parts = plan::attention_parts<E>;
    using Core = typename parts::core_type;
    using traits = typename parts::core_kind;
    static constexpr bool folds_scale = fused_epilogue<E>::folds_scale;  // scale(core) moves onto the staged queries
    using Tree = typename fused_epilogue<E>::type;
    using Post = typename decltype([] {
        if constexpr (parts::post_weighted) return std::type_identity<prepared_t<void, decltype(parts::post(std::declval<const E&>()))>>{};
        else return std::type_identity<constant>{};
    }())::type;
    using Combine = typename decltype([] {
        if constexpr (traits::pairwise) return std::type_identity<std::remove_cvref_t<decltype(std::declval<const Core&>().kind.combine)>>{};
        else return std::type_identity<constant>{};
    }())::type;
    static constexpr std::size_t first_operand = traits::pairwise ? 4 : 3;
    static constexpr std::size_t operands = first_operand + glsl::operands_in<Tree>() + glsl::operands_in<Post>();
    // flash_rows.glsl runs such an epilogue in a loop (AF_ROLLED_EPILOGUE)
    static constexpr bool epilogue_reads_memory = glsl::operands_in<Tree>() > 0;

    // What a run reads the numbers from.
    struct values {
        const Tree* tree = nullptr;
        const Post* post = nullptr;
        const Combine* combine = nullptr;
        double ratio_offset = 0;
        kind::dropout dropout = {};
        double query_factor = 1;
    };

    // The source; with `given`, also its parameter numbers into `numbers`
    // and the prepared operands' indices, as the text reads them, into `slots`.
    static constexpr std::string text(const values* given = nullptr, std::vector<std::uint32_t>* numbers = nullptr,
                                      std::vector<std::size_t>* slots = nullptr, fused_kernel kernel = fused_kernel::staged_tiles,
                                      bool rolled_epilogue = epilogue_reads_memory) {
        const bool register_rows = kernel == fused_kernel::register_rows;
        glsl::emitter emit{0, first_operand, {}, false, numbers, slots};
        std::string modes, functions;
        if constexpr (holds_mask<Tree>::value) {
            // for key tiles whose masks keep every score (live_key_tiles' full
            // ranges): the epilogue without them, its slots numbered as the whole one's
            modes += "#define AF_UNMASKED\n";
            glsl::emitter unmasked{0, first_operand, {}, true};
            functions += "float epilogue_unmasked(float s, uint b, uint h, uint bh, uint i, uint j) { return " +
                         unmasked.template emit<Tree>() + "; }\n";
            emit.definitions = unmasked.definitions;
        }
        functions += "float epilogue(float s, uint b, uint h, uint bh, uint i, uint j) { return " +
                     emit.template emit<Tree>(given ? given->tree : nullptr) + "; }\n";
        functions += "float post_factor(uint b, uint h, uint bh, uint i, uint j) { return " +
                     emit.template emit<Post>(given ? given->post : nullptr) + "; }\n";
        if constexpr (parts::pointwise) {
            modes += "#define AF_POINTWISE\n";
        } else if constexpr (parts::ratio) {
            modes += "#define AF_RATIO " + glsl::decimal(emit.next_number) + "u\n";
            (void)emit.number(given ? given->ratio_offset : 0.0);
        } else if constexpr (parts::hard) {
            modes += "#define AF_HARD\n";
        } else {
            modes += "#define AF_SOFTMAX\n";
        }
        if constexpr (parts::post_weighted) modes += "#define AF_POST\n";
        if (register_rows && rolled_epilogue) modes += "#define AF_ROLLED_EPILOGUE\n";
        if constexpr (traits::pairwise)
            functions += "float score_term(uint b, uint h, uint a, float qv, float kv) { return ld3(b, h, a, 0u) * " +
                         emit.template emit<Combine>(given ? given->combine : nullptr) + "; }\n";
        else
            functions += "float score_term(uint b, uint h, uint a, float qv, float kv) { return qv * kv; }\n";
        if constexpr (parts::dropout) {
            modes += "#define AF_DROPOUT " + glsl::decimal(emit.next_number) + "u\n";  // seed, threshold, keep scale
            (void)emit.word(given ? given->dropout.seed : 0u);
            (void)emit.word(given ? op::dropout_threshold(given->dropout.p) : 0u);
            (void)emit.number(given ? 1.0 / (1.0 - given->dropout.p) : 0.0);
        }
        if constexpr (folds_scale) {
            modes += "#define AF_QUERY_SCALE " + glsl::decimal(emit.next_number) + "u\n";
            (void)emit.number(given ? given->query_factor : 0.0);
        }
        if (emit.next_operand != operands) throw error("attnfuse internal: the fused epilogue's operand slots are miscounted");
        functions = modes + emit.definitions + functions;  // the operations' GLSL functions before their first use
        std::string head = glsl::prelude(operands, emit.next_number, 0);  // the shader sets its local size
        if (kernel == fused_kernel::matrix_cooperative) head.insert(head.find('\n') + 1, cooperative_extensions);
        // (if, not ?: over strings: g++ 12's constant evaluation frees such temporaries twice)
        std::string body;
        if (kernel == fused_kernel::register_rows) body = shader_sources::flash_rows;
        else if (kernel == fused_kernel::staged_tiles) body = shader_sources::flash_attention;
        else body = matrix_kernel_text(kernel == fused_kernel::matrix_cooperative);
        return head + functions + std::string(shader_sources::fused_common) + body;
    }
};

template <class E>
constexpr std::string fused_attention_source(fused_kernel kernel) {
    return fused_shader<E>::text(nullptr, nullptr, nullptr, kernel);
}

// FlashAttention-style (shaders/flash_attention.glsl): a workgroup per (query
// tile, batch x head), key and value tiles in shared memory, running maximum
// and sum per row, the epilogue inlined; the n_q x n_k scores are never
// written.
template <class E, class X>
operand fused_attention(const E& e, X& x) {
    using parts = plan::attention_parts<E>;
    using Core = typename parts::core_type;
    using traits = typename parts::core_kind;
    constexpr bool ratio = parts::ratio;
    constexpr bool with_dropout = parts::dropout;
    const auto& weights = parts::weights(e);
    const Core& core = parts::core(e);
    // (lower::fallback_reason has decided that this attention runs fused
    // here: its weights cover the core's tiles, d_v fits, the shared memory too)
    const std::size_t d_v = shape_of(parts::values(e), x.env).cols;

    // operands 0, 1, 2: queries, keys, values (and 3: feature weights of a
    // pairwise score); then the epilogue's own operands
    std::vector<operand> operands{evaluate(parts::queries(e), x), evaluate(parts::keys(e), x), evaluate(parts::values(e), x)};
    if constexpr (traits::pairwise) operands.push_back(evaluate(parts::feature_weights(e), x));
    const std::size_t n_q = operands[0].cols(), n_k = operands[1].cols();
    // scale(core) folds into the queries (the factor is the last number)
    constexpr bool folds_scale = fused_epilogue<E>::folds_scale;
    double query_factor = 1.0;
    const auto tree = [&] {
        if constexpr (folds_scale) return fold_core_scale(prepare<Core>(parts::score(e), x, operands), query_factor);
        else return prepare<Core>(parts::score(e), x, operands);
    }();
    // g of softmax(s) % g, read after the score's numbers
    const auto post_factor = [&] {
        if constexpr (parts::post_weighted) return prepare<void>(parts::post(e), x, operands);
        else return constant(1.0);
    }();
    // the text and its numbers from one walk (the text is the type's alone)
    static_assert(std::is_same_v<std::remove_cvref_t<decltype(tree)>, typename fused_shader<E>::Tree>);
    typename fused_shader<E>::values given{&tree, &post_factor};
    if constexpr (ratio) given.ratio_offset = parts::ratio_offset(e);
    if constexpr (traits::pairwise) given.combine = &core.kind.combine;
    if constexpr (with_dropout) given.dropout = weights.kind;
    given.query_factor = query_factor;
    std::vector<std::uint32_t> numbers;
    std::vector<std::size_t> slots;
    const std::size_t depth = operands[0].rows();
    const flash::matrix_request request{parts::hard, traits::pairwise,
                                        operands[0].storage != storage_kind::f32 && operands[1].storage != storage_kind::f32 &&
                                            operands[2].storage != storage_kind::f32};
    const flash::kernel_shape shape = flash::shape_for(x.dev, depth, d_v, n_q, x.staged_only, request);
    // an epilogue that reads memory runs in a loop through shared memory, where that fits
    const std::size_t tile_keys = shape.key_lanes ? shape.keys / shape.invocations : shape.keys;
    const std::size_t epilogue_steps = shape.rows_per_invocation * tile_keys;
    const bool rolled_epilogue = shape.register_rows && fused_shader<E>::epilogue_reads_memory &&
                                 epilogue_steps * shape.invocations * sizeof(float) <= x.dev.limits().max_shared_memory;
    const std::string source = fused_shader<E>::text(&given, &numbers, &slots, shape.kernel(), rolled_epilogue);
    operands = in_text_order(operands, fused_shader<E>::first_operand, slots);
    // the window of key tiles a dispatch covers, then whether it resumes, then the live tiles
    std::vector<std::uint32_t> extra{0u, 0u, 0u};
    const std::vector<std::uint32_t> live = live_key_tiles<parts::plain_sum>(parts::score(e), x, n_q, n_k, shape.queries, shape.keys);
    extra.insert(extra.end(), live.begin(), live.end());
    const fused_tile& tile = x.dev.tile();
    const auto out = output_buffer(x, n_q, d_v, "the result of " + to_string(e));
    const std::size_t qtiles = (n_q + shape.queries - 1) / shape.queries;
    const std::size_t bh = x.env.batch * x.env.heads;
    const std::size_t key_tiles = (n_k + shape.keys - 1) / shape.keys;
    // Within the device's loop limit an invocation runs `window` key tiles; a
    // longer row runs as several dispatches over consecutive windows, each
    // resuming the state the one before left (the merge reads the last).
    const std::size_t window =
        shape.matrix ? x.loop_window(flash::matrix_loop_steps_per_tile(shape.fragments, depth, d_v),
                                     flash::matrix_loop_steps_fixed(shape.fragments, depth, d_v))
        : shape.register_rows ? x.loop_window(flash::rows_loop_steps_per_tile(depth, d_v) + (rolled_epilogue ? epilogue_steps : 0),
                                              flash::rows_loop_steps_fixed(shape, depth, d_v))
                              : x.loop_window(flash::loop_steps_per_tile(tile, depth, d_v), flash::loop_steps_fixed(tile, d_v));
    const std::size_t passes = (key_tiles + window - 1) / window;
    const std::size_t splits =
        std::min(key_splits(x.dev, x.opt.key_splits, qtiles * bh, key_tiles), x.loop_window(flash::merge_steps_per_share));
    // a training forward's statistics come from the merge of the shares' states
    const bool keeps_statistics = x.statistics_attention == static_cast<const void*>(&e);
    const bool shared_state = splits > 1 || passes > 1 || keeps_statistics;
    const std::vector<std::uint32_t> specialization =
        shape.matrix          ? flash::matrix_specialization(shape.fragments, depth, d_v, shared_state)
        : shape.register_rows ? flash::rows_specialization(shape, depth, d_v, shared_state)
                              : flash::specialization(tile, d_v, shared_state);
    const std::string name = plan::kernel_name<plan::fused_attention_kernel<E>>::get(e) +
                             (shape.matrix ? " [matrix tiles: " + std::to_string(shape.queries) + " queries x " + std::to_string(shape.keys) +
                                                 " keys, " +
                                                 (shape.fragments.cooperative ? "cooperative matrices 16x16x16 f16*f16+f32, subgroups of " +
                                                                                    std::to_string(shape.fragments.warp)
                                                                              : std::string("plain fragments, f16 operands and f32 sums")) +
                                                 "]"
                              : shape.key_lanes ? " [register rows: " + std::to_string(shape.rows_per_invocation) +
                                                    " in every invocation, keys spread over the subgroup]"
                              : shape.register_rows ? " [register rows: " + std::to_string(shape.rows_per_invocation) + " per invocation" +
                                                          (shape.broadcast ? ", keys broadcast over the subgroup" : "") +
                                                          (rolled_epilogue ? ", the epilogue in a loop]" : "]")
                              : shape.not_matrix.empty() ? std::string(" [staged tiles]")
                                                         : " [staged tiles, not matrix tiles: " + shape.not_matrix + "]");
    if (!shared_state) {
        extra[1] = static_cast<std::uint32_t>(key_tiles);
        x.launch("fused_attention", name, source, operands, numbers, out, n_q, d_v, {qtiles, bh, 1}, extra, specialization);
        return dense_operand(out, n_q, d_v, x.env.batch, x.env.heads);
    }
    // each share's state and context, then one merge
    const auto shares = x.buffer(bh * n_q * splits * (d_v + 3) * sizeof(float), "the key shares of " + to_string(e), true);
    for (std::size_t pass = 0; pass < passes; ++pass) {
        extra[0] = static_cast<std::uint32_t>(pass * window);
        extra[1] = static_cast<std::uint32_t>(std::min(key_tiles, (pass + 1) * window));
        extra[2] = pass > 0 ? 1u : 0u;
        std::string what;
        if (pass == 0) {
            what = name + " (keys in " + std::to_string(splits) + " shares";
            if (passes > 1) what += ", " + std::to_string(passes) + " dispatches of " + std::to_string(window) + " key tiles";
            what += ")";
        }
        x.launch("fused_attention", what, source, operands, numbers, shares, n_q, d_v, {qtiles, bh, splits}, extra, specialization);
    }
    std::string mode = parts::pointwise ? "#define AF_POINTWISE\n" : ratio ? "#define AF_RATIO\n" : parts::hard ? "#define AF_HARD\n" : "#define AF_SOFTMAX\n";
    const float offset = [&] {
        if constexpr (ratio) return static_cast<float>(parts::ratio_offset(e));
        else return 0.0f;
    }();
    std::uint32_t offset_bits;
    std::memcpy(&offset_bits, &offset, 4);
    const std::vector<std::uint32_t> merge_numbers{static_cast<std::uint32_t>(splits), offset_bits, static_cast<std::uint32_t>(d_v)};
    x.launch("combine_splits", "merge of the key shares", mode + element_prologue() + std::string(shader_sources::combine_splits),
             {dense_operand(shares, 1, 1, 1, 1), operands[2]}, merge_numbers, out, n_q, d_v, bh * n_q * d_v);
    if constexpr (!parts::hard && !parts::plain_sum)
        if (keeps_statistics)
            x.keep_statistics("#define AF_ROW_STATISTICS\n" + element_prologue() + std::string(shader_sources::combine_splits),
                              {dense_operand(shares, 1, 1, 1, 1), operands[2]}, merge_numbers, n_q);
    return dense_operand(out, n_q, d_v, x.env.batch, x.env.heads);
}

// Head h of every batch entry to columns [h*d, (h+1)*d) of one matrix per
// batch entry (x.env.heads is 1 here, the per-head scope has ended).
template <class E, class X>
operand concat_heads_kernel(const E& e, const operand& per_head, X& x) {
    const std::size_t heads = x.env.bound_heads, rows = per_head.rows(), cols = per_head.cols();
    const auto out = output_buffer(x, rows, heads * cols, "the result of " + to_string(e));
    // an operand with fewer heads (one shared by every head) serves consecutive heads
    const std::string body = element_prologue() +
                             "    uint d = NUMU(0u), head = j / d, c = j % d;\n"
                             "    uint sb = G(0u, 2u) == 1u ? 0u : b, sh = af_head_of(head, NUMU(1u), G(0u, 3u));\n"
                             "    OUT.d[idx] = rd0(GI(0u, 8u) + int(sb) * GI(0u, 6u) + int(sh) * GI(0u, 7u) + int(i) * GI(0u, 4u) + int(c) * GI(0u, 5u));\n"
                             "}\n";
    x.launch("concat_heads", plan::kernel_name<plan::node_kernel<E>>::get(e), body, {per_head},
             {static_cast<std::uint32_t>(cols), static_cast<std::uint32_t>(heads)}, out, rows, heads * cols,
             x.env.batch * rows * heads * cols);
    return dense_operand(out, rows, heads * cols, x.env.batch, 1);
}

// Vulkan's hooks for the shared lowering (attnfuse/lower.hpp).
struct hooks {
    using operand = detail::operand;
    template <class E, class X>
    static operand input(const E&, X& x) {
        return x.upload(x.env.template view<E::name>(), std::string(E::name.view()));
    }
    static operand transposed(operand o) {
        std::swap(o.geometry[0], o.geometry[1]);
        std::swap(o.geometry[4], o.geometry[5]);
        return o;
    }
    template <class E, class X> static operand fused_attention(const E& e, X& x) { return detail::fused_attention(e, x); }
    template <class E, class X> static operand pointwise(const E& e, X& x) { return pointwise_kernel(e, x); }
    template <class E, class X> static operand node(const E& e, X& x) { return node_kernel(e, x); }
    template <class E, class X> static operand concat_heads(const E& e, const operand& per_head, X& x) {
        return concat_heads_kernel(e, per_head, x);
    }
    template <class E, class X> static void result(const E& e, const operand& o, X& x) {
        if (x.score_nodes.count(static_cast<const void*>(&e))) x.info.score_bytes += x.dev.buffer_bytes(o.buffer);
    }
    // every kernel reads f32, f16 and bf16 buffers as they are (glsl::operand_declaration)
    template <class El> static constexpr bool reads = glsl::buffer_element<El>;
    // the context of a row lives in registers (up to max_fused_dv), its tiles in shared memory
    template <class X> static lower::capabilities capabilities(const X& x) {
        return {max_fused_dv, x.dev.limits().max_shared_memory, x.dev.tile().shared_bytes()};
    }
};

template <class E, class X>
operand evaluate(const E& e, X& x) {
    return lower::evaluate<hooks>(e, x);
}

}  // namespace detail

namespace detail {

// What the environment sees of a binding: resident inputs by their shape.
template <class B>
auto host_face(const B& b) {
    if constexpr (is_resident_binding<B>::value) {
        using El = typename B::element_type;
        if (!b.tensor || !b.tensor->owner()) throw shape_error("input " + std::string(B::name.view()) + ": bound to an empty device_tensor");
        if (b.tensor->storage() != glsl::storage_of<El>())
            throw shape_error("input " + std::string(B::name.view()) + ": declared " + std::string(element<El>::name) +
                              " but bound to a device_tensor that holds " + std::string(glsl::name_of(b.tensor->storage())) +
                              "; declare the matrix with the tensor's element, or make the tensor from " + std::string(element<El>::name) + " values");
        return attnfuse::bind(matrix<B::name, B::rows_static, B::cols_static, El>{}, b.tensor->template shape_view<El>());
    } else {
        return b;
    }
}

// A dense f32 result rounded on the device into a buffer of `storage`
// elements (shaders/narrow.glsl).
template <class X>
device::buffer_id narrowed_output(X& x, const operand& out, std::size_t count, storage_kind storage) {
    const auto narrow = x.buffer(device_tensor::stored_bytes(storage, count), "the output", false);
    x.launch("narrow", "rounding of the output to " + std::string(glsl::name_of(storage)),
             (storage == storage_kind::f16 ? "#define AF_F16\n" : "#define AF_BF16\n") + std::string(shader_sources::narrow), {out}, {},
             narrow, count, 1, (count + 1) / 2);  // an invocation per word of two halves
    return narrow;
}

template <bool OnDevice, class Out, class E, class... Bindings>
auto run_bound(device& dev, const E& e, const options& opt, const std::map<std::string, operand>& resident,
               std::chrono::steady_clock::time_point start, row_statistics* statistics, const Bindings&... bindings) {
    static_assert(OnDevice || std::is_same_v<Out, float>, "attnfuse internal: a host result is f32");
    using Env = environment<Bindings...>;
    Env env(bindings...);
    settle_heads(e, env);
    const runtime_shape shape = shape_of(e, env);
    std::conditional_t<OnDevice, device_run_result, run_result> result;
    // The whole run holds the device: another thread's run waits, so that
    // recorded work, buffers and the submission stay this run's own.
    const auto hold = dev.exclusive();
    std::vector<std::string> retries;
    bool staged_only = false;
    for (std::size_t halvings = 0;;) {
        result.info = {};
        bool cut_short = false, values_lost = false, f16_lost = false;
        {
            executor<Env> x{dev, env, opt, result.info, {}, {}, resident, true, {}, halvings, {}, staged_only, nullptr, nullptr, {}};
            if constexpr (plan::keeps_statistics_v<E>)
                if (statistics) {
                    x.statistics_attention = &e;
                    x.statistics_softmax = &plan::attention_parts<E>::softmax_node(e);
                }
            plan::collect_score_nodes(e, x.score_nodes);
            operand out = evaluate(e, x);
            if (statistics && !x.statistics)
                throw std::logic_error("attnfuse internal: Vulkan ran `" + to_string(e) + "` without keeping its row statistics");
            // the answer, dense and owned by this run: a last copy kernel when the
            // root was a view (an input, a transpose)
            const bool dense = out.geometry[4] == shape.cols && out.geometry[5] == 1 && out.geometry[8] == 0 &&
                               out.geometry[2] == env.batch && out.geometry[3] == env.heads &&
                               out.geometry[7] == shape.rows * shape.cols;
            const auto owned = std::find(x.owned.begin(), x.owned.end(), out.buffer);
            if (!dense || owned == x.owned.end() || x.uploaded_buffer(out.buffer)) {
                const auto copy = x.buffer(std::max<std::size_t>(env.batch * env.heads * shape.rows * shape.cols, 1) * sizeof(float), "the output", false);
                const std::string body = element_prologue() + "    OUT.d[idx] = ld0(b, h, i, j);\n}\n";
                x.launch("copy", "copy to the output", body, {out}, {}, copy, shape.rows, shape.cols, env.batch * env.heads * shape.rows * shape.cols);
                out = dense_operand(copy, shape.rows, shape.cols, env.batch, env.heads);
            } else if (result.info.intermediate_bytes >= dev.buffer_bytes(out.buffer)) {
                result.info.intermediate_bytes -= dev.buffer_bytes(out.buffer);  // the output is no intermediate
            }
            constexpr storage_kind out_storage = glsl::storage_of<Out>();
            if constexpr (out_storage != storage_kind::f32) {
                const std::size_t count = env.batch * env.heads * shape.rows * shape.cols;
                result.info.intermediate_bytes += dev.buffer_bytes(out.buffer);  // the f32 result is one now
                out = dense_operand(narrowed_output(x, out, count, out_storage), shape.rows, shape.cols, env.batch, env.heads, out_storage);
                result.info.notes.push_back("output: stored as " + std::string(glsl::name_of(out_storage)) + ", rounded on the device");
            }
            result.info.device_seconds = dev.submit_and_wait();
            if (x.status) {  // did the driver end a loop early (af_check_loops)?
                std::uint32_t flags = 0;
                dev.download(*x.status, &flags, sizeof flags);
                cut_short = (flags & 1u) != 0;
                values_lost = (flags & 2u) != 0;
                f16_lost = (flags & 4u) != 0;
            }
            if (!cut_short && !values_lost && !f16_lost) {
                if constexpr (OnDevice) {
                    x.owned.erase(std::find(x.owned.begin(), x.owned.end(), out.buffer));  // the result's now
                    result.output = device_tensor(dev, out.buffer, env.batch, env.heads, shape.rows, shape.cols, out.storage);
                } else {
                    tensor& t = result.output;
                    t.batch = env.batch;
                    t.heads = env.heads;
                    t.rows = shape.rows;
                    t.cols = shape.cols;
                    t.values.resize(env.batch * env.heads * shape.rows * shape.cols);
                    dev.download(out.buffer, t.values.data(), t.values.size() * sizeof(float));
                }
                result.info.spirv_from_disk_cache = x.all_from_disk;
                if (statistics) {
                    std::vector<float> max_and_sum(2 * env.batch * env.heads * shape.rows);
                    dev.download(*x.statistics, max_and_sum.data(), max_and_sum.size() * sizeof(float));
                    *statistics = statistics_from_pairs(max_and_sum, env.batch, env.heads, shape.rows);
                }
            }
        }
        if ((values_lost || f16_lost) && !cut_short) {
            if (staged_only) throw error("attnfuse internal: the staged fused shader reported values lost");
            staged_only = true;
            if (values_lost)
                retries.push_back("values held NaN or infinity under weights other than 0: ran again with the staged-tiles fused shader "
                                  "and the one-element-per-invocation product, which add them exactly");
            if (f16_lost)
                retries.push_back("the matrix tiles' f16 operands could not hold a number of this run (a query, key, weight or value "
                                  "beyond 65504, or a NaN or infinite value): ran again with the staged-tiles f32 shader");
            continue;
        }
        if (!cut_short) break;
        ++halvings;
        // every loop window is sized from the device's limit with a margin; a
        // driver that still ended one early gets the run again in pieces half
        // as large, and an error rather than an answer if that never suffices
        if (halvings == 5)
            throw error("attnfuse: running `" + to_string(e) + "`, a shader was cut short by " + dev.info().name +
                        "'s limit on loop iterations even in pieces 16 times smaller than planned; no result is returned");
        retries.push_back("a shader's loops were ended early by the driver's limit on loop iterations: ran again in pieces half as large");
    }
    result.info.notes.insert(result.info.notes.begin(), retries.begin(), retries.end());
    lower::note_widened(env, result.info);
    for (auto& note : dev.take_notes()) result.info.notes.push_back(std::move(note));
    result.info.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return result;
}

}  // namespace detail

namespace detail {
// The inputs bound with bind_resident, by name, as operands.
template <class... Bindings>
std::map<std::string, operand> resident_inputs(const device& dev, const Bindings&... bindings) {
    std::map<std::string, operand> resident;
    auto note = [&](const auto& b) {
        using B = std::remove_cvref_t<decltype(b)>;
        if constexpr (is_resident_binding<B>::value) {
            if (b.tensor && b.tensor->owner() && b.tensor->owner() != &dev)
                throw error("attnfuse: input " + std::string(B::name.view()) + " lives on another Vulkan device than this run's");
            if (b.tensor && b.tensor->owner())
                resident.emplace(std::string(B::name.view()), dense_operand(b.tensor->buffer(), b.tensor->rows(), b.tensor->cols(),
                                                                            b.tensor->batch(), b.tensor->heads(), b.tensor->storage()));
        }
    };
    (note(bindings), ...);
    return resident;
}

template <bool OnDevice, class Out, class E, class... Bindings>
auto run_with(device& dev, const E& e, const options& opt, const Bindings&... bindings) {
    attnfuse::check::no_pending_transpose<E>();
    const auto start = std::chrono::steady_clock::now();
    return run_bound<OnDevice, Out>(dev, e, opt, resident_inputs(dev, bindings...), start, nullptr,
                                    lower::readable<hooks>(host_face(bindings))...);
}
}  // namespace detail

// The GLSL of the fused kernel that runs `E` (softmax(s)*V and its kin), as
// a constant expression of the type: static_assert(fused_shader_source<
// decltype(e)>().find("tanh") != std::string::npos) holds for a soft-capped
// score. Every number of the expression is a parameter, so one text serves
// every value. `design` picks the shader (device::design() says which a
// device runs); for matrix_tiles, `cooperative_matrices` picks its fragments
// (device_limits::cooperative_matrix says which a device runs).
template <class E>
    requires plan::fuses_as_attention_v<E>
constexpr std::string fused_shader_source(fused_design design = fused_design::staged_tiles, bool cooperative_matrices = false) {
    using detail::fused_kernel;
    return detail::fused_attention_source<E>(design == fused_design::register_rows  ? fused_kernel::register_rows
                                             : design != fused_design::matrix_tiles ? fused_kernel::staged_tiles
                                             : cooperative_matrices                 ? fused_kernel::matrix_cooperative
                                                                                    : fused_kernel::matrix_plain);
}

// Runs `e` on a Vulkan device: host inputs go up once (inputs bound with
// bind_resident are there already), every kernel of the plan is one
// dispatch, all recorded into one submission; the output comes back.
template <class E, class... Bindings>
    requires expression<E> && (a_vulkan_binding<Bindings> && ...)
run_result run(device& dev, const E& e, const options& opt, const Bindings&... bindings) {
    return detail::run_with<false, float>(dev, e, opt, bindings...);
}

// A training forward: run()'s output, and each query row's softmax
// statistics (max and sum), which the root attention's fused kernel keeps
// as it goes (its keys' shares merged by combine_splits.glsl) or, where it
// runs unfused, its softmax kernel. For a softmax attention at the root
// (plan::keeps_statistics_v; anything else does not compile). The result
// is what vulkan::backward and cpu::backward read, and what
// merge_attentions() merges by.
template <class E, class... Bindings>
    requires expression<E> && (a_vulkan_binding<Bindings> && ...)
training_result run_for_training(device& dev, const E& e, const options& opt, const Bindings&... bindings) {
    attnfuse::check::no_pending_transpose<E>();
    attnfuse::check::keeps_statistics<E>();
    const auto start = std::chrono::steady_clock::now();
    training_result result;
    run_result run = detail::run_bound<false, float>(dev, e, opt, detail::resident_inputs(dev, bindings...), start, &result.statistics,
                                                     lower::readable<detail::hooks>(detail::host_face(bindings))...);
    result.output = std::move(run.output);
    result.info = std::move(run.info);
    return result;
}
template <class E, class... Bindings>
    requires expression<E> && (a_vulkan_binding<Bindings> && ...)
training_result run_for_training(device& dev, const E& e, const Bindings&... bindings) {
    return run_for_training(dev, e, options{}, bindings...);
}

// The same, with the output left in device memory, stored as Out (f32; f16
// or bf16 rounded on the device, to nearest even as element<Out>::narrow).
template <class Out = float, class E, class... Bindings>
    requires expression<E> && glsl::buffer_element<Out> && (a_vulkan_binding<Bindings> && ...)
device_run_result run_on_device(device& dev, const E& e, const options& opt, const Bindings&... bindings) {
    return detail::run_with<true, Out>(dev, e, opt, bindings...);
}

template <class E, class... Bindings>
    requires expression<E> && (a_vulkan_binding<Bindings> && ...)
run_result run(device& dev, const E& e, const Bindings&... bindings) {
    return run(dev, e, options{}, bindings...);
}

// Runs `e` and writes its result into the caller's `out` as stored (f32,
// f16 or bf16, rounded to nearest even; any strides), which must have the
// result's batch, heads and shape (a shape_error names both otherwise, and
// nothing is written). The device computes in fp32; a 16-bit result is
// rounded there and comes back at 2 bytes an element (report.notes says so).
template <class Out, class E, class... Bindings>
    requires expression<E> && storage_element<Out> && (a_vulkan_binding<Bindings> && ...)
report run_into(device& dev, const E& e, const options& opt, const output_view<Out>& out, const Bindings&... bindings) {
    if constexpr (std::is_same_v<Out, float>) {
        run_result result = run(dev, e, opt, bindings...);
        const tensor& t = result.output;
        check_output(out, t.batch, t.heads, t.rows, t.cols);
        store_into(row_major(t.values.data(), t.rows, t.cols, t.batch, t.heads), out);
        return result.info;
    } else {
        device_run_result result = run_on_device<Out>(dev, e, opt, bindings...);
        const device_tensor& t = result.output;
        check_output(out, t.batch(), t.heads(), t.rows(), t.cols());
        const std::vector<Out> stored = t.template download_stored<Out>();
        std::size_t n = 0;
        for (std::size_t b = 0; b < t.batch(); ++b)
            for (std::size_t h = 0; h < t.heads(); ++h)
                for (std::size_t r = 0; r < t.rows(); ++r)
                    for (std::size_t c = 0; c < t.cols(); ++c) out.at(b, h, r, c) = stored[n++];
        return result.info;
    }
}
template <class Out, class E, class... Bindings>
    requires expression<E> && storage_element<Out> && (a_vulkan_binding<Bindings> && ...)
report run_into(device& dev, const E& e, const output_view<Out>& out, const Bindings&... bindings) {
    return run_into(dev, e, options{}, out, bindings...);
}

}  // namespace attnfuse::vulkan
