// The lowering every backend shares. A backend is a few hooks:
//
//   struct hooks {
//       using operand = ...;                            // a computed matrix, as the backend holds it
//       static operand input(const E&, X&);             // a bound input (a view, or an upload)
//       static operand transposed(operand);             // the same memory, rows and columns swapped
//       static operand fused_attention(const E&, X&);   // one planned fused kernel
//       static operand pointwise(const E&, X&);         // one planned pointwise loop
//       static operand node(const E&, X&);              // one kernel for one node
//       static operand concat_heads(const E&, const operand& per_head, X&);
//                                  // the heads of `per_head` side by side, in one head
//       static void result(const E&, const operand&, X&);  // the report's accounting
//       static lower::capabilities capabilities(const X&);
//       template <class El> static constexpr bool reads = ...;  // element types its kernels read as stored
//   };
//
// and lower::evaluate<hooks>(e, x) walks the plan: it decides, once for
// every backend, which node runs as which kernel, and where a matched
// attention must fall back to separate kernels (against what the backend
// declares it can run), noting why. X, the backend's run state, holds
// `env` (the bindings, its own copy: the walk sets env.heads inside each
// concat_heads), `opt` (run_options) and `info` (report).
#pragma once
#include <cstddef>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#include "bind.hpp"
#include "plan.hpp"
#include "run.hpp"
#include "to_string.hpp"

namespace attnfuse::lower {

// What a backend's fused attention kernel can hold.
struct capabilities {
    std::size_t max_fused_dv = std::numeric_limits<std::size_t>::max();  // widest value rows
    std::size_t shared_memory_bytes = std::numeric_limits<std::size_t>::max();  // what the device offers
    std::size_t fused_shared_bytes = 0;  // what the fused kernel needs of it
};

// Why the matched attention `e` cannot run as one fused kernel here, or an
// empty string when it can. The pattern matches types; these are the
// conditions on values and on the backend.
template <class E, class Env>
std::string fallback_reason(const E& e, const Env& env, const capabilities& can) {
    using parts = plan::attention_parts<E>;
    // the two x of a ratio must be the same x (not j < 5 over j < 3)
    if (!parts::fusable(e)) return "the two x of x / (row_sum(x) + c) differ in their numbers";
    // the tiles cover the core's queries and keys: a score or a factor g of
    // softmax(s) % g that broadcasts past them is computed in full
    const runtime_shape weights = shape_of(parts::weights(e), env), core = shape_of(parts::core(e), env);
    if (weights != core)
        return "its weights (" + shape_to_string(weights) + ") broadcast past its query-key product (" + shape_to_string(core) + ")";
    const std::size_t d_v = shape_of(parts::values(e), env).cols;
    if (d_v > can.max_fused_dv)
        return "d_v " + std::to_string(d_v) + " > " + std::to_string(can.max_fused_dv) + ", the widest value rows the fused kernel holds";
    if (can.shared_memory_bytes < can.fused_shared_bytes)
        return "the device offers " + std::to_string(can.shared_memory_bytes) + " bytes of shared memory, the fused kernel needs " +
               std::to_string(can.fused_shared_bytes);
    return {};
}

// A binding as the backend's kernels will read it: as it is where they
// read its element type (Hooks::reads<El>), else widened to fp32 once for
// this run (element.hpp), so that every element type runs on every backend.
// Anything else (a backend's own kind of binding) passes through.
template <class Hooks, class B>
auto readable(const B& b) {
    if constexpr (is_binding<B>::value) {
        using El = std::remove_cvref_t<decltype(*b.view.data)>;
        if constexpr (Hooks::template reads<El>) return b;
        else return widened(b);
    } else {
        return b;
    }
}

// The report's account of readable(): a note per widened input, and the
// fp32 copies counted as intermediate memory.
template <class Env>
void note_widened(const Env& env, report& info) {
    std::apply(
        [&](const auto&... b) {
            auto note = [&](const auto& one) {
                if (one.widened_from.empty()) return;
                const std::size_t bytes = one.owned->size() * sizeof(float);
                info.notes.push_back("input " + std::string(one.name.view()) + ": stored as " + std::string(one.widened_from) +
                                     ", which this backend's kernels do not read; widened to f32 for this run (" +
                                     std::to_string(bytes) + " bytes)");
                info.intermediate_bytes += bytes;
            };
            (note(b), ...);
        },
        env.bindings);
}

// Inside concat_heads the kernels run over every bound head; outside it,
// once per batch entry (bind.hpp: settle_heads).
template <class Env>
class per_head_scope {
public:
    explicit per_head_scope(Env& env) : env_(env), outside_(env.heads) { env.heads = env.bound_heads; }
    ~per_head_scope() { env_.heads = outside_; }
    per_head_scope(const per_head_scope&) = delete;
    per_head_scope& operator=(const per_head_scope&) = delete;

private:
    Env& env_;
    std::size_t outside_;
};

template <class Hooks, class E, class X>
typename Hooks::operand evaluate(const E& e, X& x) {
    if constexpr (is_input_v<E>) {
        return Hooks::input(e, x);
    } else if constexpr (has_kind_v<E, kind::transpose>) {
        return Hooks::transposed(evaluate<Hooks>(e.template kid<0>(), x));
    } else if constexpr (has_kind_v<E, kind::concat_heads>) {
        typename Hooks::operand per_head;
        {
            const per_head_scope scope(x.env);
            per_head = evaluate<Hooks>(e.template kid<0>(), x);
        }
        typename Hooks::operand o = Hooks::concat_heads(e, per_head, x);
        Hooks::result(e, o, x);
        return o;
    } else {
        typename Hooks::operand o;
        if constexpr (plan::fuses_as_attention_v<E>) {
            if (x.opt.mode == execution::unfused) {
                o = Hooks::node(e, x);
            } else if (const std::string why = fallback_reason(e, x.env, Hooks::capabilities(x)); !why.empty()) {
                x.info.notes.push_back("`" + to_string(e) + "` ran unfused: " + why);
                o = Hooks::node(e, x);
            } else {
                o = Hooks::fused_attention(e, x);
            }
        } else if constexpr (is_pointwise_v<E>) {
            o = Hooks::pointwise(e, x);
        } else {
            o = Hooks::node(e, x);
        }
        Hooks::result(e, o, x);
        return o;
    }
}

}  // namespace attnfuse::lower
