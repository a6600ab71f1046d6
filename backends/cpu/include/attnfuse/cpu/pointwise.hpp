// Pointwise trees prepared for the CPU: every non-pointwise operand replaced
// by a leaf reading memory, every scale(e) resolved to its number, the core
// of a fused score replaced by a slot reading the score tile. The same
// vectorized evaluation serves the unfused pointwise loops and the fused
// kernel's epilogue.
#pragma once
#include <algorithm>
#include <cstdint>

#include <attnfuse/bind.hpp>
#include <attnfuse/epilogue.hpp>
#include <attnfuse/intervals.hpp>

#include "simd.hpp"

namespace attnfuse::cpu::detail {
inline namespace ATTNFUSE_CPU_ISA {

using simd::vf;

// The score tile of a fused kernel, read where its core stood (epilogue.hpp).
using core_slot = attnfuse::score_slot;

// A materialised operand (an input or an intermediate) read with broadcast.
struct memory_leaf : expr_base {
    static constexpr std::size_t rows = dyn;
    static constexpr std::size_t cols = dyn;
    tensor_view<float> view;
    const float* base = nullptr;  // this (batch, head)'s matrix, set by at_head
};

// Where one vector of lanes sits. Lanes run along the keys (row fixed,
// columns col .. col+lanes-1) or, in the fused kernel's transposed score
// tile, along the queries (rows row .. row+lanes-1, column fixed).
enum class lanes_along { keys, queries };

struct lane_position {
    std::size_t row = 0;
    std::size_t col = 0;
    const float* core = nullptr;  // the score tile's lanes
    std::uint32_t batch_head = 0;
};

template <class El, class Env>
const El* matrix_base(const tensor_view<El>& v, const Env& env, std::size_t b, std::size_t h) {
    return v.data + static_cast<std::ptrdiff_t>(env.source_batch(v, b)) * v.batch_stride +
           static_cast<std::ptrdiff_t>(env.source_head(v, h)) * v.head_stride;
}

// Points every memory leaf of a prepared tree at one (batch, head).
template <class E, class Env>
E at_head(E e, const Env& env, std::size_t b, std::size_t h) {
    if constexpr (std::is_same_v<E, memory_leaf>) {
        e.base = matrix_base(e.view, env, b, h);
        return e;
    } else if constexpr (is_node_v<E>) {
        std::apply([&](auto&... kids) { ((kids = at_head(kids, env, b, h)), ...); }, e.kids);
        return e;
    } else {
        return e;
    }
}

template <lanes_along Along>
[[gnu::always_inline]] inline vf read_leaf(const memory_leaf& m, std::size_t row, std::size_t col) {
    const tensor_view<float>& v = m.view;
    constexpr bool over_keys = Along == lanes_along::keys;
    // the fixed index, then the lanes' extent and stride
    const std::size_t fixed = over_keys ? row : col, first = over_keys ? col : row;
    const std::size_t fixed_extent = over_keys ? v.rows : v.cols, lane_extent = over_keys ? v.cols : v.rows;
    const std::ptrdiff_t fixed_stride = over_keys ? v.row_stride : v.col_stride;
    const std::ptrdiff_t lane_stride = over_keys ? v.col_stride : v.row_stride;
    const float* p = m.base + (fixed_extent == 1 ? 0 : static_cast<std::ptrdiff_t>(fixed) * fixed_stride);
    if (lane_extent == 1) return simd::splat(*p);
    if (lane_stride == 1 && first + simd::lanes <= lane_extent) return simd::load(p + first);
    vf out;
    if (first + simd::lanes <= lane_extent) {  // a whole vector of a strided operand (a column in a transposed tile)
        const float* at = p + static_cast<std::ptrdiff_t>(first) * lane_stride;
        for (int l = 0; l < simd::lanes; ++l) out[l] = at[static_cast<std::ptrdiff_t>(l) * lane_stride];
        return out;
    }
    for (int l = 0; l < simd::lanes; ++l) {
        const std::size_t n = std::min(first + static_cast<std::size_t>(l), lane_extent - 1);  // past the end: clamp
        out[l] = p[static_cast<std::ptrdiff_t>(n) * lane_stride];
    }
    return out;
}

// One vector of lanes of a prepared pointwise tree.
template <lanes_along Along, class E>
vf lanes_of(const E& e, const lane_position& at) {
    constexpr bool over_keys = Along == lanes_along::keys;
    if constexpr (std::is_same_v<E, constant>) return simd::splat(static_cast<float>(e.value));
    else if constexpr (std::is_same_v<E, query_index>)
        return over_keys ? simd::splat(static_cast<float>(at.row)) : simd::iota(static_cast<float>(at.row));
    else if constexpr (std::is_same_v<E, key_index>)
        return over_keys ? simd::iota(static_cast<float>(at.col)) : simd::splat(static_cast<float>(at.col));
    else if constexpr (std::is_same_v<E, core_slot>) return simd::load(at.core);
    else if constexpr (std::is_same_v<E, memory_leaf>) return read_leaf<Along>(e, at.row, at.col);
    else if constexpr (has_kind_template<E, kind::elementwise>::value) {
        using Op = typename E::kind_type::op;
        return std::apply([&](const auto&... kids) { return simd::apply<Op>(lanes_of<Along>(kids, at)...); }, e.kids);
    } else if constexpr (has_kind_v<E, kind::scale_by>) {
        return lanes_of<Along>(e.template kid<0>(), at) * static_cast<float>(e.kind.factor);
    } else if constexpr (has_kind_v<E, kind::dropout>) {
        vf x = lanes_of<Along>(e.template kid<0>(), at);
        const std::uint32_t threshold = op::dropout_threshold(e.kind.p);
        const float keep_scale = static_cast<float>(1.0 / (1.0 - e.kind.p));
        for (int l = 0; l < simd::lanes; ++l) {
            const auto lane = static_cast<std::size_t>(l);
            const auto bits = op::dropout_bits(e.kind.seed, at.batch_head, static_cast<std::uint32_t>(at.row + (over_keys ? 0 : lane)),
                                               static_cast<std::uint32_t>(at.col + (over_keys ? lane : 0)));
            x[l] = op::dropout_keeps(bits, threshold) ? x[l] * keep_scale : 0.0f;
        }
        return x;
    } else if constexpr (has_kind_v<E, kind::lookup>) {
        const memory_leaf& table = e.template kid<0>();
        const vf index = lanes_of<Along>(e.template kid<1>(), at);
        const std::size_t length = std::max(table.view.rows, table.view.cols);
        const std::ptrdiff_t stride = table.view.rows == 1 ? table.view.col_stride : table.view.row_stride;
        // as the reference's nearbyint(fmin(fmax(index, 0), length - 1)), a vector at once:
        // max(NaN, 0) is 0 here too, so a NaN index reads entry 0; below 2^23,
        // adding and taking away 2^23 rounds half to even, as nearbyint does
        const vf clamped = simd::min(simd::max(index, simd::splat(0.0f)), simd::splat(static_cast<float>(length - 1)));
        const vf rounded = clamped < 8388608.0f ? (clamped + 8388608.0f) - 8388608.0f : clamped;
        simd::vi entry = __builtin_convertvector(rounded, simd::vi);
        const auto last = static_cast<std::int32_t>(std::min<std::size_t>(length - 1, INT32_MAX));
        entry = entry > last ? last : entry;  // float(length - 1) may round up past the table
        vf out;
        for (int l = 0; l < simd::lanes; ++l) out[l] = table.base[static_cast<std::ptrdiff_t>(entry[l]) * stride];
        return out;
    } else if constexpr (is_named_node<E>::value) {
        return lanes_of<Along>(e.template kid<0>(), at);
    } else {
        static_assert(sizeof(E) == 0, "attnfuse: the CPU has no vector rule for this pointwise node (the E of this instantiation)");
        return vf{};
    }
}

// Bounds of a prepared tree over a tile, for skipping fully masked tiles.
// Memory leaves of one value are exact; vectors are scanned over the tile.
template <class E>
interval tile_bounds(const E& e, std::size_t row0, std::size_t row1, std::size_t col0, std::size_t col1) {
    auto leaf = [&](const auto& x) -> interval {
        using X = std::remove_cvref_t<decltype(x)>;
        if constexpr (std::is_same_v<X, memory_leaf>) {
            const tensor_view<float>& v = x.view;
            if (v.rows > 1 && v.cols > 1) return interval::everything();
            return vector_bounds(x.base, v.rows, v.cols, v.row_stride, v.col_stride, row0, row1, col0, col1);
        } else {
            return interval::everything();
        }
    };
    auto factor = [](const auto& x) { return x.kind.factor; };
    return bounds(e, {static_cast<double>(row0), static_cast<double>(row1 - 1)},
                  {static_cast<double>(col0), static_cast<double>(col1 - 1)}, leaf, factor);
}

// True when every mask(s, keep) of the tree keeps the whole tile
// (epilogue.hpp), bounded by this tile's rows and columns.
template <class E>
bool masks_keep_all(const E& e, std::size_t row0, std::size_t row1, std::size_t col0, std::size_t col1) {
    return attnfuse::masks_keep_all(e, [&](const auto& keep) { return tile_bounds(keep, row0, row1, col0, col1); });
}

}  // namespace ATTNFUSE_CPU_ISA
}  // namespace attnfuse::cpu::detail
