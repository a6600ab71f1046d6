// Lowering of the planner's kernels to Vulkan compute dispatches: the same
// plan as the CPU, one generated shader per kernel.
#pragma once
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <attnfuse/bind.hpp>
#include <attnfuse/plan.hpp>

#include "../vulkan.hpp"
#include "glsl.hpp"

namespace attnfuse::vulkan {

enum class execution { fused, unfused };

struct options {
    execution mode = execution::fused;
};

struct report {
    std::vector<std::string> kernels;    // in dispatch order
    std::size_t dispatches = 0;
    std::size_t intermediate_bytes = 0;  // device memory besides inputs, output and parameters
    std::size_t score_bytes = 0;         // of which n_q x n_k scores or weights (0 when fused)
    double device_seconds = 0;           // from timestamps
    double wall_seconds = 0;
    bool spirv_from_disk_cache = false;  // every kernel's SPIR-V came from an earlier process
    std::vector<std::string> notes;      // choices made at run time (fallbacks)
};

struct run_result {
    tensor output;
    report info;
};

namespace detail {

using glsl::operand_slot;
using glsl::score_slot;

inline constexpr std::size_t local_size = 64;
// The fused kernel keeps one query's context in registers: up to this d_v.
inline constexpr std::size_t max_fused_dv = 256;

// A matrix on the device: a buffer and how to read it.
struct operand {
    device::buffer_id buffer = 0;
    std::uint32_t geometry[glsl::geometry_words] = {};  // rows, cols, batch, heads, strides, base
    std::size_t rows() const { return geometry[0]; }
    std::size_t cols() const { return geometry[1]; }
};

inline operand dense_operand(device::buffer_id id, std::size_t rows, std::size_t cols, std::size_t batch, std::size_t heads) {
    operand o;
    o.buffer = id;
    const auto m = static_cast<std::uint32_t>(rows * cols);
    const std::uint32_t g[] = {static_cast<std::uint32_t>(rows), static_cast<std::uint32_t>(cols), static_cast<std::uint32_t>(batch),
                               static_cast<std::uint32_t>(heads), static_cast<std::uint32_t>(cols), 1u,
                               static_cast<std::uint32_t>(heads) * m, m, 0u};
    std::memcpy(o.geometry, g, sizeof g);
    return o;
}

template <class Env>
struct executor {
    device& dev;
    const Env& env;
    options opt;
    report& info;
    std::vector<device::buffer_id> owned;               // released at the end of the run
    std::map<const void*, operand> uploaded;            // one upload per bound array
    bool all_from_disk = true;
    std::set<const void*> score_nodes;                  // plan::collect_score_nodes

    ~executor() {
        for (auto id : owned) dev.release(id);
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
        const std::ptrdiff_t extents[4] = {static_cast<std::ptrdiff_t>(v.rows) - 1, static_cast<std::ptrdiff_t>(v.cols) - 1,
                                           static_cast<std::ptrdiff_t>(v.batch) - 1, static_cast<std::ptrdiff_t>(v.heads) - 1};
        const std::ptrdiff_t strides[4] = {v.row_stride, v.col_stride, v.batch_stride, v.head_stride};
        std::ptrdiff_t low = 0, high = 0;
        for (int a = 0; a < 4; ++a) {
            const std::ptrdiff_t reach = extents[a] * strides[a];
            (reach < 0 ? low : high) += reach;
        }
        const void* key = v.data + low;
        if (auto found = uploaded.find(key); found != uploaded.end() && found->second.geometry[0] == v.rows &&
                                             found->second.geometry[1] == v.cols && found->second.geometry[4] == static_cast<std::uint32_t>(v.row_stride) &&
                                             found->second.geometry[5] == static_cast<std::uint32_t>(v.col_stride))
            return found->second;
        const std::size_t count = static_cast<std::size_t>(high - low + 1);
        operand o;
        o.buffer = buffer(count * sizeof(float), "input " + name, false);
        dev.upload(o.buffer, v.data + low, count * sizeof(float));
        const std::uint32_t g[] = {static_cast<std::uint32_t>(v.rows), static_cast<std::uint32_t>(v.cols),
                                   static_cast<std::uint32_t>(v.batch), static_cast<std::uint32_t>(v.heads),
                                   static_cast<std::uint32_t>(v.row_stride), static_cast<std::uint32_t>(v.col_stride),
                                   static_cast<std::uint32_t>(v.batch_stride), static_cast<std::uint32_t>(v.head_stride),
                                   static_cast<std::uint32_t>(-low)};
        std::memcpy(o.geometry, g, sizeof g);
        uploaded.emplace(key, o);
        return o;
    }

    // Compiles (once) and dispatches `body` over `invocations` threads, with
    // `operands` bound from binding 2 and `numbers` after their geometry.
    void launch(const std::string& name, const std::string& description, const std::string& body, const std::vector<operand>& operands,
                const std::vector<std::uint32_t>& numbers, device::buffer_id output, std::size_t out_rows, std::size_t out_cols,
                std::size_t invocations) {
        const std::string source = glsl::prelude(operands.size(), numbers.size(), local_size) + body;
        const auto kernel = dev.kernel(source, name, static_cast<std::uint32_t>(2 + operands.size()), 0);
        all_from_disk = all_from_disk && dev.kernel_from_disk_cache(kernel);

        std::vector<std::uint32_t> params{static_cast<std::uint32_t>(env.batch), static_cast<std::uint32_t>(env.heads)};
        for (const auto& o : operands) params.insert(params.end(), o.geometry, o.geometry + glsl::geometry_words);
        params.insert(params.end(), numbers.begin(), numbers.end());
        params.push_back(static_cast<std::uint32_t>(out_rows));
        params.push_back(static_cast<std::uint32_t>(out_cols));
        const auto p = buffer(params.size() * 4, "kernel parameters", false);
        dev.upload(p, params.data(), params.size() * 4);
        std::vector<device::buffer_id> bindings{p, output};
        for (const auto& o : operands) bindings.push_back(o.buffer);
        // two dimensions of workgroups, so that large outputs stay within
        // maxComputeWorkGroupCount[0]
        const std::size_t groups = (invocations + local_size - 1) / local_size;
        const std::size_t max_x = std::min<std::size_t>(dev.limits().max_workgroup_count[0], 65535);
        const std::size_t gx = std::min(groups, max_x), gy = (groups + max_x - 1) / max_x;
        dev.dispatch(kernel, bindings, nullptr, 0, static_cast<std::uint32_t>(std::max<std::size_t>(gx, 1)),
                     static_cast<std::uint32_t>(std::max<std::size_t>(gy, 1)));
        info.kernels.push_back(description);
        ++info.dispatches;
    }

};

// Every number of a prepared tree, in the emitter's walk order.
template <class E>
void collect_numbers(const E& e, std::vector<std::uint32_t>& out) {
    auto as_bits = [](double v) {
        const auto f = static_cast<float>(v);
        std::uint32_t u;
        std::memcpy(&u, &f, 4);
        return u;
    };
    if constexpr (std::is_same_v<E, constant>) out.push_back(as_bits(e.value));
    else if constexpr (has_kind_v<E, kind::scale_by>) {
        collect_numbers(e.template kid<0>(), out);
        out.push_back(as_bits(e.kind.factor));
    } else if constexpr (has_kind_v<E, kind::dropout>) {
        collect_numbers(e.template kid<0>(), out);
        out.push_back(e.kind.seed);
        out.push_back(op::dropout_threshold(e.kind.p));
        out.push_back(as_bits(1.0 / (1.0 - e.kind.p)));
    } else if constexpr (is_node_v<E>) {
        std::apply([&](const auto&... kids) { (collect_numbers(kids, out), ...); }, e.kids);
    }
}

template <class E, class X> operand evaluate(const E& e, X& x);

// Replaces non-pointwise operands by operand slots (appending them to
// `operands`), the core by the score slot, and scale(e) by its number.
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
        return std::apply([&](const auto&... kids) { return make_node(e.kind, prepare<Core>(kids, x, operands)...); }, e.kids);
    }
}

inline std::string element_prologue() { return std::string(shader_sources::element_prologue); }
inline std::string row_prologue() { return std::string(shader_sources::row_prologue); }

template <class X>
device::buffer_id output_buffer(X& x, std::size_t rows, std::size_t cols, const std::string& what) {
    return x.buffer(std::max<std::size_t>(x.env.batch * x.env.heads * rows * cols, 1) * sizeof(float), what, true);
}

template <class E, class X>
operand pointwise_kernel(const E& e, X& x) {
    const runtime_shape shape = shape_of(e, x.env);
    std::vector<operand> operands;
    const auto tree = prepare<void>(e, x, operands);
    std::vector<std::uint32_t> numbers;
    collect_numbers(tree, numbers);
    glsl::emitter emit;
    const std::string body = element_prologue() +
                             "    OUT.d[idx] = " + emit(tree) + ";\n}\n";
    const auto out = output_buffer(x, shape.rows, shape.cols, "the result of " + to_string(e));
    x.launch("pointwise", plan::kernel_name<plan::pointwise_kernel<E>>::get(e), body, operands, numbers, out, shape.rows, shape.cols,
             x.env.batch * x.env.heads * shape.rows * shape.cols);
    return dense_operand(out, shape.rows, shape.cols, x.env.batch, x.env.heads);
}

template <class E, class X>
operand node_kernel(const E& e, X& x) {
    const runtime_shape shape = shape_of(e, x.env);
    std::vector<operand> operands;
    std::apply([&](const auto&... kids) { (operands.push_back(evaluate(kids, x)), ...); }, e.kids);
    std::vector<std::uint32_t> numbers;
    std::string body, name;
    std::size_t invocations = x.env.batch * x.env.heads * shape.rows * shape.cols;
    if constexpr (has_kind_v<E, kind::product>) {
        name = "product";
        body = element_prologue() + std::string(shader_sources::product);
    } else if constexpr (has_kind_v<E, kind::softmax>) {
        name = "softmax_rows";
        invocations = x.env.batch * x.env.heads * shape.rows;
        body = row_prologue() + std::string(shader_sources::softmax_rows);
    } else if constexpr (has_kind_v<E, kind::hard>) {
        name = "hard_rows";
        invocations = x.env.batch * x.env.heads * shape.rows;
        body = row_prologue() + std::string(shader_sources::hard_rows);
    } else if constexpr (has_kind_template<E, kind::reduce_along_rows>::value || has_kind_template<E, kind::reduce_along_cols>::value) {
        constexpr bool along_rows = has_kind_template<E, kind::reduce_along_rows>::value;
        constexpr bool sum = std::is_same_v<typename E::kind_type::op, op::add>;
        name = along_rows ? "reduce_rows" : "reduce_cols";
        const std::string combine = sum ? "acc + v" : "af_max(acc, v)";
        body = element_prologue() + (along_rows ? "    uint n = G(0u, 1u); float acc = ld0(b, h, i, 0u);\n    for (uint k = 1u; k < n; ++k) { float v = ld0(b, h, i, k); acc = " + combine + "; }\n"
                                                : "    uint n = G(0u, 0u); float acc = ld0(b, h, 0u, j);\n    for (uint k = 1u; k < n; ++k) { float v = ld0(b, h, k, j); acc = " + combine + "; }\n") +
               "    OUT.d[idx] = acc;\n}\n";
    } else {
        static_assert(has_kind_template<E, kind::pairwise>::value, "attnfuse internal: Vulkan has no kernel for this node");
        name = "pairwise";
        collect_numbers(e.kind.combine, numbers);
        glsl::emitter emit;
        body = element_prologue() + "    float acc = 0.0;\n    uint depth = G(1u, 0u);\n    for (uint a = 0u; a < depth; ++a) {\n        float qv = ld1(b, h, a, i), kv = ld2(b, h, a, j);\n        acc += ld0(b, h, a, 0u) * " +
               emit(e.kind.combine) + ";\n    }\n    OUT.d[idx] = acc;\n}\n";
    }
    body = body;
    const auto out = output_buffer(x, shape.rows, shape.cols, "the result of " + to_string(e));
    x.launch(name, plan::kernel_name<plan::node_kernel<E>>::get(e), body, operands, numbers, out, shape.rows, shape.cols, invocations);
    return dense_operand(out, shape.rows, shape.cols, x.env.batch, x.env.heads);
}

// One invocation per query row: scores against every key with the epilogue
// inlined, running maximum and sum (or argmax), the context in registers;
// the n_q x n_k scores are never written.
template <class E, class X>
operand fused_attention(const E& e, X& x) {
    using parts = plan::attention_parts<E>;
    using Core = typename parts::core_type;
    using traits = typename parts::core_kind;
    constexpr bool hard = parts::hard;
    constexpr bool ratio = parts::ratio;
    constexpr bool with_dropout = parts::dropout;
    const auto& weights = parts::weights(e);
    const Core& core = parts::core(e);
    // one invocation per query of the core: a score that broadcasts past the
    // core's extents runs unfused
    // (the weights' shape: a factor g of softmax(s) % g broadcasts too)
    if (!parts::fusable(e) || shape_of(parts::weights(e), x.env) != shape_of(core, x.env)) return node_kernel(e, x);

    // operands 0, 1, 2: queries, keys, values (and 3: feature weights of a
    // pairwise score); then the epilogue's own operands
    std::vector<operand> operands{evaluate(parts::queries(e), x), evaluate(parts::keys(e), x), evaluate(parts::values(e), x)};
    if constexpr (traits::pairwise) operands.push_back(evaluate(parts::feature_weights(e), x));
    const std::size_t n_q = operands[0].cols(), d_v = operands[2].cols();
    if (d_v > max_fused_dv) {
        x.info.notes.push_back("d_v " + std::to_string(d_v) + " > " + std::to_string(max_fused_dv) + ": `" + to_string(e) +
                               "` ran unfused");
        return node_kernel(e, x);
    }
    const auto tree = prepare<Core>(parts::score(e), x, operands);
    // g of softmax(s) % g (a number 1 otherwise), read after the score's numbers
    const auto post_factor = [&] {
        if constexpr (parts::post_weighted) return prepare<void>(parts::post(e), x, operands);
        else return constant(1.0);
    }();
    std::vector<std::uint32_t> numbers;
    collect_numbers(tree, numbers);
    collect_numbers(post_factor, numbers);
    if constexpr (ratio) collect_numbers(constant(parts::ratio_offset(e)), numbers);
    if constexpr (traits::pairwise) collect_numbers(core.kind.combine, numbers);
    if constexpr (with_dropout) {
        numbers.push_back(weights.kind.seed);
        numbers.push_back(op::dropout_threshold(weights.kind.p));
        const auto keep = static_cast<float>(1.0 / (1.0 - weights.kind.p));
        std::uint32_t bits;
        std::memcpy(&bits, &keep, 4);
        numbers.push_back(bits);
    }
    glsl::emitter emit;
    const std::string epilogue = emit(tree);
    const std::string post = emit(post_factor);
    const std::string offset = ratio ? emit(constant(0.0)) : std::string();
    std::string score;
    if constexpr (traits::pairwise) {
        score = "        float s = 0.0;\n        for (uint a = 0u; a < depth; ++a) {\n            float qv = ld0(b, h, a, i), kv = ld1(b, h, a, j);\n            s += ld3(b, h, a, 0u) * " +
                emit(core.kind.combine) + ";\n        }\n";
    } else {
        score = "        float s = 0.0;\n        for (uint a = 0u; a < depth; ++a) s += ld0(b, h, a, i) * ld1(b, h, a, j);\n";
    }
    std::string body = row_prologue();
    body += "    uint depth = G(0u, 0u), keys = G(1u, 1u), dv = G(2u, 1u);\n";
    body += "    float acc[" + std::to_string(max_fused_dv) + "];\n    for (uint c = 0u; c < dv; ++c) acc[c] = 0.0;\n";
    body += "    float m = -1.0 / 0.0, l = 0.0; uint best_at = keys; bool nan_row = false;\n";
    body += "    for (uint j = 0u; j < keys; ++j) {\n" + score + "        s = " + epilogue + ";\n";
    if constexpr (hard) {
        body += "        if (isnan(s)) nan_row = true; else if (s > m) { m = s; best_at = j; }\n    }\n";
        body += "    for (uint c = 0u; c < dv; ++c) OUT.d[out_row + c] = nan_row ? 0.0 / 0.0 : (best_at < keys ? ld2(b, h, best_at, c) : 0.0);\n}\n";
    } else if constexpr (ratio) {
        // x / (row_sum(x) + c): plain sums, no maximum
        body += "        l += s;\n        for (uint c = 0u; c < dv; ++c) acc[c] += s * ld2(b, h, j, c);\n    }\n";
        body += "    float denominator = l + " + offset + ";\n    float inverse = denominator == 0.0 ? 0.0 : 1.0 / denominator;\n";
        body += "    for (uint c = 0u; c < dv; ++c) OUT.d[out_row + c] = acc[c] * inverse;\n}\n";
    } else {
        body += "        if (isnan(s)) { nan_row = true; continue; }\n        if (isinf(s) && s < 0.0) continue;  // masked: weight exactly 0\n";
        body += "        float next = max(m, s);\n        float alpha = isinf(m) ? 0.0 : exp(m - next);\n        float p = exp(s - next);\n";
        body += "        l = l * alpha + p;\n";
        if constexpr (with_dropout) {
            const std::size_t first = numbers.size() - 3;
            body += "        p = af_dropout(p, NUMU(" + std::to_string(first) + "u), NUMU(" + std::to_string(first + 1) + "u), NUM(" +
                    std::to_string(first + 2) + "u), bh, i, j);\n";
        }
        if constexpr (parts::post_weighted) body += "        p *= " + post + ";  // after the sum: no renormalisation\n";
        body += "        for (uint c = 0u; c < dv; ++c) acc[c] = acc[c] * alpha + p * ld2(b, h, j, c);\n        m = next;\n    }\n";
        body += "    float inverse = l == 0.0 ? 0.0 : 1.0 / l;  // every key masked: context 0\n";
        body += "    for (uint c = 0u; c < dv; ++c) OUT.d[out_row + c] = nan_row ? 0.0 / 0.0 : acc[c] * inverse;\n}\n";
    }
    const auto out = output_buffer(x, n_q, d_v, "the result of " + to_string(e));
    x.launch("fused_attention", plan::kernel_name<plan::fused_attention_kernel<E>>::get(e), body, operands, numbers, out, n_q, d_v,
             x.env.batch * x.env.heads * n_q);
    return dense_operand(out, n_q, d_v, x.env.batch, x.env.heads);
}

template <class E, class X>
operand evaluate(const E& e, X& x) {
    if constexpr (is_input_v<E>) {
        static_assert(std::is_same_v<typename E::element_type, float>, "attnfuse: the Vulkan backend runs fp32 inputs");
        return x.upload(x.env.template view<E::name>(), std::string(E::name.view()));
    } else if constexpr (has_kind_v<E, kind::transpose>) {
        operand o = evaluate(e.template kid<0>(), x);
        std::swap(o.geometry[0], o.geometry[1]);
        std::swap(o.geometry[4], o.geometry[5]);
        return o;
    } else {
        operand o;
        if constexpr (plan::fuses_as_attention_v<E>) o = x.opt.mode == execution::fused ? fused_attention(e, x) : node_kernel(e, x);
        else if constexpr (is_pointwise_v<E>) o = pointwise_kernel(e, x);
        else o = node_kernel(e, x);
        if (x.score_nodes.count(static_cast<const void*>(&e))) x.info.score_bytes += x.dev.buffer_bytes(o.buffer);
        return o;
    }
}

}  // namespace detail

// Runs `e` on a Vulkan device: inputs go up once, every kernel of the plan is
// one dispatch, all recorded into one submission; the output comes back.
template <class E, class... Bindings>
    requires expression<E> && (a_binding<Bindings> && ...)
run_result run(device& dev, const E& e, const options& opt, const Bindings&... bindings) {
    attnfuse::check::no_pending_transpose<E>();
    using Env = environment<Bindings...>;
    const Env env(bindings...);
    const runtime_shape shape = shape_of(e, env);
    run_result result;
    const auto start = std::chrono::steady_clock::now();
    {
        detail::executor<Env> x{dev, env, opt, result.info, {}, {}, true, {}};
        plan::collect_score_nodes(e, x.score_nodes);
        detail::operand out = detail::evaluate(e, x);
        // the answer, dense: a last copy kernel when the root was a view (an input, a transpose)
        const bool dense = out.geometry[4] == shape.cols && out.geometry[5] == 1 && out.geometry[8] == 0 &&
                           out.geometry[2] == env.batch && out.geometry[3] == env.heads &&
                           out.geometry[7] == shape.rows * shape.cols;
        if (!dense) {
            const auto copy = x.buffer(env.batch * env.heads * shape.rows * shape.cols * sizeof(float), "the output", false);
            const std::string body = detail::element_prologue() + "    OUT.d[idx] = ld0(b, h, i, j);\n}\n";
            x.launch("copy", "copy to the output", body, {out}, {}, copy, shape.rows, shape.cols, env.batch * env.heads * shape.rows * shape.cols);
            out = detail::dense_operand(copy, shape.rows, shape.cols, env.batch, env.heads);
        } else if (result.info.intermediate_bytes >= dev.buffer_bytes(out.buffer)) {
            result.info.intermediate_bytes -= dev.buffer_bytes(out.buffer);  // the output is no intermediate
        }
        result.info.device_seconds = dev.submit_and_wait();
        tensor& t = result.output;
        t.batch = env.batch;
        t.heads = env.heads;
        t.rows = shape.rows;
        t.cols = shape.cols;
        t.values.resize(env.batch * env.heads * shape.rows * shape.cols);
        dev.download(out.buffer, t.values.data(), t.values.size() * sizeof(float));
        result.info.spirv_from_disk_cache = x.all_from_disk;
    }
    result.info.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return result;
}

template <class E, class... Bindings>
    requires expression<E> && (a_binding<Bindings> && ...)
run_result run(device& dev, const E& e, const Bindings&... bindings) {
    return run(dev, e, options{}, bindings...);
}

}  // namespace attnfuse::vulkan
