// Vulkan's backward pass of softmax attention and of pointwise weights
// (plan::attention_backward): fused, recomputing S and P from Q, K and each
// row's statistics, and unfused, one kernel per operation with S, P, dP and
// dS materialised. Pointwise weights P = w(S) keep no statistics: the first
// fused kernel and the unfused softmax passes are left out, and dS = dP ∘
// w'(S).
//
// Every kernel is shaders/attention_backward.glsl after two generated
// functions: the score's epilogue over its core s = Qᵀ K and the epilogue's
// derivative in s, chained through each operation's glsl_partials
// (glsl::emitter::dual). One walk of the prepared score writes both texts
// and the numbers they read, so a kernel's text is its expression type's
// alone, as in the forward.
//
// Fused, three kernels, none of which stores an n_q x n_k matrix:
//   1. per query row: max, sum and D = rowsum(dO ∘ O) over every key;
//   2. per query row of each Q source: dQ over the keys of every (batch,
//      head) it serves;
//   3. per key of each K/V source: dK and dV over the queries of every
//      (batch, head) it serves.
// Each walks only the keys (queries) its workgroup's block of rows can give
// a weight to: host-computed interval bounds of the score over each pair of
// blocks, as the forward's live key tiles (causal: half the pairs).
// Each invocation owns the gradient rows it writes, so no two write one
// element and no atomics are needed; an invocation keeps its query (or key
// and value) row and its gradient rows in registers, hence d, d_v <= 256.
// Long loops run in chunks within the driver's loop limit, each resuming the
// last (chunked_launch).
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <attnfuse/backward.hpp>

#include "executor.hpp"

namespace attnfuse::vulkan {
namespace detail {

// shaders/attention_backward.glsl keeps rows of d and d_v floats per invocation.
inline constexpr std::size_t backward_max_width = 256;
// Bound before the epilogue's own operands: Q, K, V, dO, and the row statistics (or O).
inline constexpr std::size_t backward_fixed_operands = 5;
// Words after the epilogue's numbers (attention_backward.glsl: AF_WORDS).
enum backward_word : std::size_t {
    word_n_q, word_n_k, word_served_batches, word_served_heads, word_seed, word_threshold, word_keep, word_dv_at,
    word_source_batch, word_source_heads, word_rows, word_cols, backward_words
};

// The generated functions every backward kernel starts with: the epilogue
// and its slope. With `tree`, its numbers into `numbers` and the operand
// slots, in the order the text reads them, into `slots`.
template <class Tree>
std::string backward_functions(const Tree* tree, std::vector<std::uint32_t>* numbers, std::vector<std::size_t>* slots) {
    glsl::emitter emit{0, backward_fixed_operands, {}, false, numbers, slots};
    const glsl::emitter::dual_text epilogue = emit.template dual<Tree>(tree);
    if (emit.next_number != glsl::numbers_in<Tree>() || emit.next_operand != backward_fixed_operands + glsl::operands_in<Tree>())
        throw error("attnfuse internal: the backward epilogue's numbers or operand slots are miscounted");
    const std::string signature = "(float s, uint b, uint h, uint bh, uint i, uint j) { return ";
    return emit.definitions + "float epilogue" + signature + epilogue.value + "; }\n" + "float epilogue_slope" + signature +
           epilogue.slope + "; }\n";
}

template <class E, class... Bindings>
backward_result attention_backward(device& dev, const E& e, const tensor& output, const tensor& d_output, const row_statistics* given,
                                   const options& opt, const std::map<std::string, operand>& resident, const Bindings&... bindings) {
    using parts = plan::attention_parts<E>;
    using Core = typename parts::core_type;
    constexpr bool with_dropout = parts::dropout;
    constexpr bool pointwise = parts::pointwise;
    using Env = environment<Bindings...>;
    const auto start = std::chrono::steady_clock::now();
    Env env(bindings...);
    settle_heads(e, env);
    const runtime_shape shape = shape_of(e, env);
    check_backward_operands(output, d_output, env.batch, env.heads, shape);
    if (given) check_given_statistics(*given, env.batch, env.heads, shape.rows);

    const Core& core = parts::core(e);
    const auto& q_input = core.template kid<0>().template kid<0>();
    const auto& k_input = core.template kid<1>();
    const auto& v_input = parts::values(e);
    using QI = std::remove_cvref_t<decltype(q_input)>;
    using KI = std::remove_cvref_t<decltype(k_input)>;
    using VI = std::remove_cvref_t<decltype(v_input)>;
    const auto qv = env.template view<QI::name>();
    const auto kv = env.template view<KI::name>();
    const auto vv = env.template view<VI::name>();
    if (kv.batch != vv.batch || kv.heads != vv.heads)
        throw std::invalid_argument("attnfuse: vulkan::backward needs K and V bound with the same batch and heads (K " +
                                    std::to_string(kv.batch) + " x " + std::to_string(kv.heads) + ", V " + std::to_string(vv.batch) +
                                    " x " + std::to_string(vv.heads) + "); reference::backward takes any");
    const std::size_t n_q = qv.cols, n_k = kv.cols, depth = qv.rows, d_v = vv.cols, bh = env.batch * env.heads;
    if (depth > backward_max_width || d_v > backward_max_width)
        throw std::invalid_argument("attnfuse: vulkan::backward keeps rows of d and d_v floats per invocation, at most " +
                                    std::to_string(backward_max_width) + " each; this attention has d = " + std::to_string(depth) +
                                    ", d_v = " + std::to_string(d_v) + ". cpu::backward takes any");
    const bool fused = opt.mode == execution::fused;

    backward_result result;
    const auto hold = dev.exclusive();
    std::vector<std::string> retries;
    for (std::size_t halvings = 0;;) {
        result = {};
        report& info = result.info;
        bool cut_short = false;
        {
            executor<Env> x{dev, env, opt, info, {}, {}, resident, true, {}, halvings, {}, false, nullptr, nullptr, {}};
            std::vector<operand> prepared{evaluate(q_input, x), evaluate(k_input, x), evaluate(v_input, x),
                                          x.upload(row_major(d_output.values.data(), n_q, d_v, env.batch, env.heads), "d_output"),
                                          x.upload(row_major(output.values.data(), n_q, d_v, env.batch, env.heads), "output")};
            const operand q = prepared[0], k = prepared[1], v = prepared[2], d_out = prepared[3], out = prepared[4];
            const auto tree = prepare<Core>(parts::score(e), x, prepared);
            using Tree = std::remove_cvref_t<decltype(tree)>;
            std::vector<std::uint32_t> numbers;
            std::vector<std::size_t> slots;
            const std::string functions = backward_functions<Tree>(&tree, &numbers, &slots);
            const std::vector<operand> bound = in_text_order(prepared, backward_fixed_operands, slots);
            // the kernel's operands with slots 0.. replaced
            auto with_slots = [&](std::initializer_list<operand> first) {
                std::vector<operand> ops = bound;
                std::copy(first.begin(), first.end(), ops.begin());
                return ops;
            };
            const std::size_t words_at = numbers.size();
            numbers.resize(words_at + backward_words);
            auto set = [&](backward_word w, std::uint32_t value) { numbers[words_at + w] = value; };
            auto set_float = [&](backward_word w, double value) {
                const auto f = static_cast<float>(value);
                std::uint32_t bits;
                std::memcpy(&bits, &f, 4);
                set(w, bits);
            };
            set(word_n_q, static_cast<std::uint32_t>(n_q));
            set(word_n_k, static_cast<std::uint32_t>(n_k));
            if constexpr (with_dropout) {
                const auto& dropout = parts::weights(e).kind;
                set(word_seed, dropout.seed);
                set(word_threshold, op::dropout_threshold(dropout.p));
                set_float(word_keep, 1.0 / (1.0 - dropout.p));
            }
            // what one (batch, head) source of an input serves
            auto serve = [&](const auto& view) {
                set(word_served_batches, static_cast<std::uint32_t>(view.batch == 1 ? env.batch : 1));
                set(word_served_heads, static_cast<std::uint32_t>(env.heads / view.heads));
            };
            // The fused kernels' workgroups: on a CPU device one subgroup, each invocation
            // keeping as many rows as fit rows_register_budget (as flash_rows.glsl does);
            // elsewhere 64 invocations of one row.
            const bool cpu_device = dev.info().kind == device_kind::cpu && dev.limits().subgroup_size > 0 && dev.limits().subgroup_size <= 64;
            const std::size_t wg = cpu_device ? dev.limits().subgroup_size : local_size;
            const std::size_t rows_per_invocation =
                cpu_device ? std::clamp<std::size_t>(flash::rows_register_budget / (2 * depth + 2 * d_v), 1, 8) : 1;
            // Rows the fused kernels walk at a time (AF_KT), and whether a tile's elements run
            // unrolled in registers (where the epilogue reads no memory) or in a loop through
            // scratch. Measured on lavapipe (bh 8, n 512, d 64, the three kernels' device time,
            // best of 12 in alternating processes): 2 rows through scratch 353 ms, 4 rows in
            // registers 252, 8 rows in registers shared by subgroupBroadcast 260; llvmpipe's
            // compile grows with the unrolled tile, AF_R AF_KT elements.
            const std::size_t tile_rows = 4;
            const bool registers = glsl::operands_in<Tree>() == 0;
            auto body = [&](const char* mode) {
                return "#define AF_WORDS " + glsl::decimal(words_at) + "u\n#define AF_D " + glsl::decimal(depth) + "u\n#define AF_DV " +
                       glsl::decimal(d_v) + "u\n#define AF_R " + glsl::decimal(rows_per_invocation) + "u\n#define AF_WG " +
                       glsl::decimal(wg) + "u\n#define AF_KT " + glsl::decimal(tile_rows) + "u\n" + (with_dropout ? "#define AF_DROPOUT\n" : "") + (pointwise ? "#define AF_POINTWISE\n" : "") +
                       (registers ? "#define AF_BWD_REGISTERS\n" : "") + "#define " + mode + "\n" + functions +
                       std::string(shader_sources::attention_backward);
            };
            // Loop steps an invocation of the fused kernels runs per row the loop walks, as
            // llvmpipe counts them: the loops over depth and value columns (those over the
            // AF_R rows are unrolled), with a margin, and a new (batch, head)'s rows once
            // per `extent` rows walked.
            auto per_key = [&](std::size_t extent) {
                return (2 * depth + d_v + 16) / tile_rows + 2 * rows_per_invocation + 1 +
                       (rows_per_invocation * (depth + d_v) + extent - 1) / std::max<std::size_t>(extent, 1);
            };
            // workgroups over `rows` rows of each of `sources`
            auto fused_grid = [&](std::size_t rows, std::size_t sources) {
                return workgroups{{(rows + wg * rows_per_invocation - 1) / (wg * rows_per_invocation), sources, 1}, wg};
            };
            // The live blocks (attention_backward.glsl: af_live): of each block of queries a
            // workgroup takes, the keys it can give a weight to, and of each block of keys the
            // queries; outside them every score is -inf (every pointwise weight 0). Words: whether they vary by (batch,
            // head), the query blocks, the key blocks, then [first, end) per block, queries'
            // first.
            auto live_blocks = [&] {
                const std::size_t block = wg * rows_per_invocation;
                const std::vector<std::uint32_t> tiles = live_key_tiles<parts::plain_sum>(parts::score(e), x, n_q, n_k, block, block);
                const std::size_t query_blocks = tiles[1], key_blocks = (n_k + block - 1) / block;
                const std::size_t tables = tiles[0] ? bh : 1;
                std::vector<std::uint32_t> words{tiles[0], static_cast<std::uint32_t>(query_blocks), static_cast<std::uint32_t>(key_blocks)};
                auto live = [&](std::size_t t, std::size_t qb) {
                    const std::size_t at = 2 + 4 * (t * query_blocks + qb);
                    return std::pair<std::size_t, std::size_t>{tiles[at], tiles[at + 1]};
                };
                for (std::size_t t = 0; t < tables; ++t)
                    for (std::size_t qb = 0; qb < query_blocks; ++qb) {
                        const auto [first, end] = live(t, qb);
                        words.push_back(static_cast<std::uint32_t>(std::min(first * block, n_k)));
                        words.push_back(static_cast<std::uint32_t>(std::min(end * block, n_k)));
                    }
                for (std::size_t t = 0; t < tables; ++t)
                    for (std::size_t kb = 0; kb < key_blocks; ++kb) {
                        std::size_t first = query_blocks, end = 0;
                        for (std::size_t qb = 0; qb < query_blocks; ++qb) {
                            const auto [k_first, k_end] = live(t, qb);
                            if (k_first <= kb && kb < k_end) first = std::min(first, qb), end = std::max(end, qb + 1);
                        }
                        if (first >= end) first = end = 0;
                        words.push_back(static_cast<std::uint32_t>(std::min(first * block, n_q)));
                        words.push_back(static_cast<std::uint32_t>(std::min(end * block, n_q)));
                    }
                return words;
            };
            const std::vector<std::uint32_t> live = fused ? live_blocks() : std::vector<std::uint32_t>{};
            auto gradient_buffer = [&](std::size_t floats, const std::string& what) {
                return x.buffer(std::max<std::size_t>(floats, 1) * sizeof(float), what, false);
            };
            const std::size_t q_sources = qv.batch * qv.heads, k_sources = kv.batch * kv.heads;
            device::buffer_id dq_buffer{}, dk_buffer{}, dv_buffer{};
            std::size_t dv_offset = 0;  // in floats
            const std::string name = to_string(e);

            if (fused) {
                // the rows' statistics of a softmax: max, sum, D (pointwise weights have none,
                // and the kernels read nothing in their slot)
                operand stats_operand = out;
                if (!pointwise) {
                    const auto stats = output_buffer(x, n_q, 3, "the row statistics of the backward of " + name);
                    stats_operand = dense_operand(stats, n_q, 3, env.batch, env.heads);
                    if (given) {
                        const std::vector<float> max_and_sum = statistics_as_pairs(*given);
                        const operand forward_statistics =
                            x.upload(row_major(max_and_sum.data(), n_q, 2, env.batch, env.heads), "the forward's row statistics");
                        x.launch("backward_given_statistics", "backward: the forward's max and sum of each row, and D = rowsum(dO ∘ O)",
                                 body("AF_BWD_GIVEN_STATISTICS"), with_slots({d_out, out, forward_statistics, out, out}), numbers, stats,
                                 n_q, 3, bh * n_q * 3);
                    } else {
                        chunked_launch(x, "backward_stats",
                                       "backward: each row's max and sum of the softmax over every key, and D = rowsum(dO ∘ O)",
                                       body("AF_BWD_STATS"), with_slots({q, k, v, d_out, out}), numbers, stats, n_q, 3, bh * n_q, n_k,
                                       depth / tile_rows + rows_per_invocation + 2, fused_grid(n_q, bh), live);
                    }
                }
                std::vector<operand> ops = with_slots({q, k, v, d_out, stats_operand});
                serve(qv);
                dq_buffer = gradient_buffer(q_sources * depth * n_q, "the gradient of " + std::string(QI::name.view()));
                chunked_launch(x, "backward_dq", "backward: dQ per query row of each Q source, recomputing S, P and dP over every key",
                               body("AF_BWD_DQ"), ops, numbers, dq_buffer, depth, n_q, q_sources * n_q,
                               numbers[words_at + word_served_batches] * numbers[words_at + word_served_heads] * n_k,
                               per_key(n_k), fused_grid(n_q, q_sources), live);
                serve(kv);
                dv_offset = k_sources * depth * n_k;
                set(word_dv_at, static_cast<std::uint32_t>(dv_offset));
                dk_buffer = dv_buffer = gradient_buffer(dv_offset + k_sources * n_k * d_v,
                                                        "the gradients of " + std::string(KI::name.view()) + " and " + std::string(VI::name.view()));
                chunked_launch(x, "backward_dkv", "backward: dK and dV per key of each K/V source, recomputing S and P over every query",
                               body("AF_BWD_DKV"), ops, numbers, dk_buffer, n_k, depth, k_sources * n_k,
                               numbers[words_at + word_served_batches] * numbers[words_at + word_served_heads] * n_q,
                               per_key(n_q), fused_grid(n_k, k_sources), live);
            } else {
                auto scores = [&](const std::string& what) {
                    const auto id = output_buffer(x, n_q, n_k, what + " of the backward of " + name);
                    info.score_bytes += dev.buffer_bytes(id);
                    return id;
                };
                auto dense = [&](device::buffer_id id, std::size_t rows, std::size_t cols) {
                    return dense_operand(id, rows, cols, env.batch, env.heads);
                };
                auto elementwise = [&](const char* mode, const std::string& description, std::initializer_list<operand> first,
                                       device::buffer_id into, std::size_t rows, std::size_t cols) {
                    x.launch("backward_elementwise", description, body(mode), with_slots(first), numbers, into, rows, cols,
                             bh * rows * cols);
                };
                auto product = [&](const std::string& description, const operand& a, const operand& b, device::buffer_id into,
                                   std::size_t rows, std::size_t cols, std::size_t inner) {
                    if (!tiled_product(x, description, false, {a, b}, into, rows, cols, inner))
                        chunked_launch(x, "product", description, element_prologue() + std::string(shader_sources::product), {a, b}, {},
                                       into, rows, cols, bh * rows * cols, inner, 1);
                };
                // S = epilogue(Qᵀ K), then P by the forward's softmax passes (pointwise
                // weights: P is S)
                const operand raw = evaluate(core, x);
                info.score_bytes += dev.buffer_bytes(raw.buffer);
                const auto s = scores(pointwise ? "the weights" : "the scores");
                elementwise("AF_BWD_SCORES", pointwise ? "backward: the weights P = w(Qᵀ K)" : "backward: S = epilogue(Qᵀ K)",
                            {raw, raw, raw, raw, raw}, s, n_q, n_k);
                const operand s_operand = dense(s, n_q, n_k);
                operand p_operand = s_operand;
                if (!pointwise) {
                    const auto top = output_buffer(x, n_q, 1, "the row maxima"), sum = output_buffer(x, n_q, 1, "the row sums");
                    const std::string pass = row_pass_source();
                    chunked_launch(x, "row_max", "backward: softmax of S", "#define AF_MAX\n" + pass, {s_operand}, {}, top, n_q, 1, bh * n_q,
                                   n_k, 1);
                    chunked_launch(x, "row_sum_exp", "", "#define AF_ROW_SUM_EXP\n" + pass, {s_operand, dense(top, n_q, 1)}, {}, sum, n_q,
                                   1, bh * n_q, n_k, 1);
                    const auto p = scores("the weights");
                    x.launch("softmax_write", "", element_prologue() + std::string(shader_sources::row_write),
                             {s_operand, dense(top, n_q, 1), dense(sum, n_q, 1)}, {}, p, n_q, n_k, bh * n_q * n_k);
                    p_operand = dense(p, n_q, n_k);
                }
                operand dropped = p_operand;
                if constexpr (with_dropout) {
                    const auto pd = scores("the dropped weights");
                    elementwise("AF_BWD_DROPPED", "backward: the dropped weights, with the forward's mask", {p_operand, p_operand, p_operand,
                                p_operand, p_operand}, pd, n_q, n_k);
                    dropped = dense(pd, n_q, n_k);
                }
                const auto dp = scores("dP");
                product("backward: dP = dO Vᵀ", d_out, hooks::transposed(v), dp, n_q, n_k, d_v);
                const operand dp_operand = dense(dp, n_q, n_k);
                operand row_d = dp_operand;  // pointwise weights read no D
                if (!pointwise) {
                    row_d = dense(output_buffer(x, n_q, 1, "D = rowsum(dO ∘ O)"), n_q, 1);
                    elementwise("AF_BWD_ROW_DOT", "backward: D = rowsum(dO ∘ O)", {d_out, out, out, out, out}, row_d.buffer, n_q, 1);
                }
                const auto ds = scores("dS");
                elementwise("AF_BWD_CORE_GRADIENT",
                            pointwise ? "backward: dS = dP ∘ w'(S), through the weights" : "backward: dS = P ∘ (dP − D), through the epilogue",
                            {raw, p_operand, dp_operand, row_d, raw}, ds, n_q, n_k);
                const operand ds_operand = dense(ds, n_q, n_k);
                // per (batch, head), then summed into each source where an input serves several
                auto per_source = [&](const auto& view, device::buffer_id full, std::size_t rows, std::size_t cols, const std::string& what) {
                    if (view.batch == env.batch && view.heads == env.heads) return full;
                    info.intermediate_bytes += dev.buffer_bytes(full);
                    const auto id = gradient_buffer(view.batch * view.heads * rows * cols, what);
                    serve(view);
                    set(word_source_batch, static_cast<std::uint32_t>(view.batch));
                    set(word_source_heads, static_cast<std::uint32_t>(view.heads));
                    set(word_rows, static_cast<std::uint32_t>(rows));
                    set(word_cols, static_cast<std::uint32_t>(cols));
                    x.launch("backward_source_sum", "backward: " + what + ", summed over the heads and batches it serves",
                             body("AF_BWD_SOURCE_SUM"), with_slots({dense(full, rows, cols)}), numbers, id, rows, cols,
                             view.batch * view.heads * rows * cols);
                    return id;
                };
                const auto full_dv = gradient_buffer(bh * n_k * d_v, "dV per head");
                product("backward: dV = Pᵀ dO", hooks::transposed(dropped), d_out, full_dv, n_k, d_v, n_q);
                const auto full_dk = gradient_buffer(bh * depth * n_k, "dK per head");
                product("backward: dK = Q dS", q, ds_operand, full_dk, depth, n_k, n_q);
                const auto full_dq = gradient_buffer(bh * depth * n_q, "dQ per head");
                product("backward: dQ = K dSᵀ", k, hooks::transposed(ds_operand), full_dq, depth, n_q, n_k);
                dv_buffer = per_source(vv, full_dv, n_k, d_v, "the gradient of " + std::string(VI::name.view()));
                dk_buffer = per_source(kv, full_dk, depth, n_k, "the gradient of " + std::string(KI::name.view()));
                dq_buffer = per_source(qv, full_dq, depth, n_q, "the gradient of " + std::string(QI::name.view()));
            }
            info.device_seconds = dev.submit_and_wait();
            if (x.status) {
                std::uint32_t flags = 0;
                dev.download(*x.status, &flags, sizeof flags);
                cut_short = (flags & 1u) != 0;
            }
            if (!cut_short) {
                auto fetch = [&](const auto& view, device::buffer_id id, std::size_t offset) {
                    tensor t{view.batch, view.heads, view.rows, view.cols, std::vector<float>(view.batch * view.heads * view.rows * view.cols)};
                    dev.download(id, t.values.data(), t.values.size() * sizeof(float), offset * sizeof(float));
                    return t;
                };
                tensor dq = fetch(qv, dq_buffer, 0), dk = fetch(kv, dk_buffer, 0), dv = fetch(vv, dv_buffer, dv_offset);
                hand_out_attention_gradients<E, QI, KI, VI>(result, std::move(dq), std::move(dk), std::move(dv), bindings...);
                result.info.spirv_from_disk_cache = x.all_from_disk;
            }
        }
        if (!cut_short) break;
        if (++halvings == 5)
            throw error("attnfuse: the backward of `" + to_string(e) + "`: a shader was cut short by " + dev.info().name +
                        "'s limit on loop iterations even in pieces 16 times smaller than planned; no result is returned");
        retries.push_back("a shader's loops were ended early by the driver's limit on loop iterations: ran again in pieces half as large");
    }
    result.info.notes.insert(result.info.notes.begin(), retries.begin(), retries.end());
    lower::note_widened(env, result.info);
    for (auto& note : dev.take_notes()) result.info.notes.push_back(std::move(note));
    result.info.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return result;
}

template <class E, class... Bindings>
backward_result backward_given(device& dev, const E& e, const tensor& output, const tensor& d_output, const row_statistics* given,
                               const options& opt, const Bindings&... bindings) {
    attnfuse::check::no_pending_transpose<E>();
    if constexpr (plan::composed_backward_v<E>) {
        return composed_backward(
            e, output, d_output, [&](const auto& x, const auto&... b) { return vulkan::run(dev, x, opt, b...); },
            [&](const auto& x, const auto&... b) { return backward_given(dev, x, output, d_output, given, opt, b...); },
            [&](const auto& x, const tensor& o, const tensor& d_o, const auto&... b) {
                return backward_given(dev, x, o, d_o, nullptr, opt, b...);
            },
            bindings...);
    } else if constexpr (!plan::attention_backward_v<E>) {
        throw std::invalid_argument(outside_attention_backward("vulkan", to_string(e)));
    } else {
        return detail::attention_backward(dev, e, output, d_output, given, opt, detail::resident_inputs(dev, bindings...),
                                          lower::readable<detail::hooks>(detail::host_face(bindings))...);
    }
}
}  // namespace detail

// The gradient of sum(d_output ∘ output) in every bound input, where output
// = run(dev, e, bindings...).output: Q, K and V of a softmax attention
// (plan::attention_backward_v<E>), fused (the default) or unfused, on `dev`.
// 16-bit inputs are read as stored. An expression outside that form is a
// std::invalid_argument naming it (reference::backward differentiates every
// expression), as are d or d_v above 256; output and d_output of another
// shape are shape_errors.
template <class E, class... Bindings>
    requires expression<E> && (a_vulkan_binding<Bindings> && ...)
backward_result backward(device& dev, const E& e, const tensor& output, const tensor& d_output, const options& opt,
                         const Bindings&... bindings) {
    return detail::backward_given(dev, e, output, d_output, nullptr, opt, bindings...);
}
template <class E, class... Bindings>
    requires expression<E> && (a_vulkan_binding<Bindings> && ...)
backward_result backward(device& dev, const E& e, const tensor& output, const tensor& d_output, const Bindings&... bindings) {
    return backward(dev, e, output, d_output, options{}, bindings...);
}

// The same from a training forward's result (vulkan::run_for_training or
// cpu::run_for_training): its row statistics spare the fused pass its
// first kernel over the keys. The unfused pass recomputes everything either
// way.
template <class E, class... Bindings>
    requires expression<E> && (a_vulkan_binding<Bindings> && ...)
backward_result backward(device& dev, const E& e, const training_result& forward, const tensor& d_output, const options& opt,
                         const Bindings&... bindings) {
    return detail::backward_given(dev, e, forward.output, d_output, &forward.statistics, opt,
                                  bindings...);
}
template <class E, class... Bindings>
    requires expression<E> && (a_vulkan_binding<Bindings> && ...)
backward_result backward(device& dev, const E& e, const training_result& forward, const tensor& d_output, const Bindings&... bindings) {
    return backward(dev, e, forward, d_output, options{}, bindings...);
}

}  // namespace attnfuse::vulkan
