// GLSL for the kernels of a plan. The text depends only on the expression's
// type: every number of the expression (constants, scale factors, dropout
// parameters) is a parameter read from the kernel's parameters, in the
// order the tree is walked, so one compiled shader serves every value.
//
// Interface of every generated kernel (see shaders/prelude.glsl):
//   parameters P.u (push constants where they fit the device's limit, else
//              a buffer at binding 0): batch, heads, 9 words of geometry per
//              operand, the numbers of the tree (as float bits), the
//              output's rows and cols.
//   binding 1: the output, dense [batch][heads][rows][cols].
//   binding 2 + k: operand k.
//   binding 2 + operands: the run's status word (af_check_loops).
#pragma once
#include <bit>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <attnfuse/element.hpp>
#include <attnfuse/epilogue.hpp>
#include <attnfuse/expr.hpp>
#include <attnfuse/vulkan/shader_sources.hpp>

namespace attnfuse::vulkan::glsl {

inline constexpr std::size_t geometry_words = 9;
inline constexpr std::size_t header_words = 2;

// Where the fused kernel's score sits in its epilogue (epilogue.hpp).
using attnfuse::score_slot;
// A materialised operand, read through its accessor ld<k>.
struct operand_slot : expr_base {
    static constexpr std::size_t rows = dyn;
    static constexpr std::size_t cols = dyn;
    std::size_t index = 0;  // k: binding 2 + k
};

// A number as decimal text, in constant evaluation too (std::to_string is not constexpr).
constexpr std::string decimal(std::size_t v) {
    std::string s;
    do {
        s.insert(s.begin(), static_cast<char>('0' + v % 10));
        v /= 10;
    } while (v);
    return s;
}

// Is Op listed in op::all? Every operation must be: the tests run each one
// listed there on every backend (tests/every_operation.hpp).
template <class Op, class... Ops>
constexpr bool listed(op::op_list<Ops...>) {
    return (std::is_same_v<Op, Ops> || ...);
}

// Op's place in op::all: names the GLSL functions of its partials.
template <class Op, class First, class... Rest>
constexpr std::size_t op_index(op::op_list<First, Rest...>) {
    if constexpr (std::is_same_v<Op, First>) return 0;
    else {
        static_assert(sizeof...(Rest) > 0, "attnfuse: this operation is not listed in attnfuse::op::all (dsl/attnfuse/ops.hpp)");
        return 1 + op_index<Op>(op::op_list<Rest...>{});
    }
}

// How an operand's elements lie in its buffer (attnfuse/element.hpp): f32,
// or 16 bits each, little-endian, two to a 32-bit word.
enum class storage_kind : char { f32 = 'f', f16 = 'h', bf16 = 'b' };

// The elements a Vulkan buffer holds and every kernel reads as stored.
template <class El>
concept buffer_element = std::is_same_v<El, float> || std::is_same_v<El, half> || std::is_same_v<El, bfloat16>;

template <buffer_element El>
constexpr storage_kind storage_of() {
    if constexpr (std::is_same_v<El, half>) return storage_kind::f16;
    else if constexpr (std::is_same_v<El, bfloat16>) return storage_kind::bf16;
    else return storage_kind::f32;
}
constexpr std::string_view name_of(storage_kind k) { return k == storage_kind::f16 ? "f16" : k == storage_kind::bf16 ? "bf16" : "f32"; }
constexpr std::size_t bytes_of(storage_kind k) { return k == storage_kind::f32 ? 4 : 2; }

// Operand k's buffer and its reader rd<k>(element index), which widens a
// 16-bit element exactly. With `storage16` the device reads 16-bit members
// (storageBuffer16BitAccess: float16_t, uint16_t bf16 bits shifted up);
// without, the buffer is read as 32-bit words, each holding elements 2w and
// 2w + 1 in its low and high halves.
constexpr std::string operand_declaration(std::size_t k, storage_kind kind = storage_kind::f32, bool storage16 = false) {
    const std::string n = decimal(k), buffer = "layout(std430, binding = " + decimal(2 + k) + ") readonly buffer Operand" + n + " { ";
    const std::string block = "; } OP" + n + ";\n";
    if (kind == storage_kind::f32) return buffer + "float d[]" + block + "float rd" + n + "(int at) { return OP" + n + ".d[at]; }\n" +
                                          "float rd" + n + "(uint at) { return OP" + n + ".d[at]; }\n";
    std::string s;
    if (storage16 && kind == storage_kind::f16) s = buffer + "float16_t d[]" + block + "float rd" + n + "(int at) { return float(OP" + n + ".d[at]); }\n";
    else if (storage16) s = buffer + "uint16_t d[]" + block + "float rd" + n + "(int at) { return uintBitsToFloat(uint(OP" + n + ".d[at]) << 16u); }\n";
    else if (kind == storage_kind::f16)
        s = buffer + "uint d[]" + block + "float rd" + n + "(int at) { return unpackHalf2x16(OP" + n + ".d[at >> 1])[at & 1]; }\n";
    else
        s = buffer + "uint d[]" + block + "float rd" + n + "(int at) { uint w = OP" + n +
            ".d[at >> 1]; return uintBitsToFloat((at & 1) != 0 ? (w & 0xffff0000u) : (w << 16u)); }\n";
    return s + "float rd" + n + "(uint at) { return rd" + n + "(int(at)); }\n";
}

// `source` (a kernel with f32 operand declarations, as prelude() writes
// them) with operand k read as `kinds[k]`.
inline std::string with_operand_storage(std::string source, const std::vector<storage_kind>& kinds, bool storage16) {
    bool narrow = false;
    for (std::size_t k = 0; k < kinds.size(); ++k) {
        if (kinds[k] == storage_kind::f32) continue;
        const std::string f32 = operand_declaration(k);
        const std::size_t at = source.find(f32);
        if (at == std::string::npos) throw std::logic_error("attnfuse internal: a kernel without operand " + decimal(k) + "'s declaration");
        source.replace(at, f32.size(), operand_declaration(k, kinds[k], storage16));
        narrow = true;
    }
    if (narrow && storage16) {
        const std::string version = "#version 450\n";
        if (source.rfind(version, 0) != 0) throw std::logic_error("attnfuse internal: a kernel that does not start with #version 450");
        source.insert(version.size(), "#extension GL_EXT_shader_16bit_storage : require\n");
    }
    return source;
}

// The start of every generated kernel: the bindings, the shared helpers of
// shaders/prelude.glsl, and one accessor per operand.
// The parameters are `push_words` of push constants, or with 0 a buffer at
// binding 0 (then unused in the push-constant form).
constexpr std::string prelude(std::size_t operands, std::size_t numbers, std::size_t local_size, std::size_t push_words = 0) {
    // [[unroll]]; subgroup ballot, arithmetic and vote operations (shaders/flash_rows.glsl and
    // product_tiled.glsl, run only where the device has them)
    std::string s = "#version 450\n#extension GL_EXT_control_flow_attributes : enable\n#extension GL_KHR_shader_subgroup_ballot : enable\n"
                    "#extension GL_KHR_shader_subgroup_arithmetic : enable\n#extension GL_KHR_shader_subgroup_vote : enable\n";
    s += "#define NUM_OPERANDS " + decimal(operands) + "u\n";
    s += "#define NUM_NUMBERS " + decimal(numbers) + "u\n";
    s += "#define GEOMETRY_WORDS " + decimal(geometry_words) + "u\n";
    if (local_size > 0) s += "layout(local_size_x = " + decimal(local_size) + ") in;\n";  // 0: the body sets it (local_size_x_id)
    if (push_words > 0) s += "layout(push_constant, std430) uniform Params { uint u[" + decimal(push_words) + "]; } P;\n";
    else s += "layout(std430, binding = 0) readonly buffer Params { uint u[]; } P;\n";
    s += "layout(std430, binding = 1) buffer Output { float d[]; } OUT;\n";
    for (std::size_t k = 0; k < operands; ++k) s += operand_declaration(k);
    s += "layout(std430, binding = " + decimal(2 + operands) + ") buffer Status { uint flags; } AF_STATUS;\n";
    s += std::string(shader_sources::prelude);
    for (std::size_t k = 0; k < operands; ++k) {
        const std::string n = decimal(k);
        s += "float ld" + n + "(uint b, uint h, uint r, uint c) { return rd" + n + "(at_of(" + n + "u, b, h, r, c)); }\n";
        // a one-row or one-column table, indexed by a rounded, clamped number (NaN reads entry 0)
        s += "float lookup" + n + "(uint b, uint h, float index) { uint len = max(G(" + n + "u, 0u), G(" + n +
             "u, 1u)); float at = isnan(index) ? 0.0 : clamp(round(index), 0.0, float(len - 1u)); return G(" + n +
             "u, 0u) == 1u ? ld" + n + "(b, h, 0u, uint(at)) : ld" + n + "(b, h, uint(at), 0u); }\n";
    }
    return s;
}

// How many numbers and operand slots a prepared tree holds: the parameter
// words and bindings its text reads.
template <class E>
constexpr std::size_t numbers_in() {
    if constexpr (std::is_same_v<E, constant>) return 1;
    else if constexpr (is_node_v<E>) {
        constexpr std::size_t own = has_kind_v<E, kind::scale_by> ? 1 : has_kind_v<E, kind::dropout> ? 3 : 0;
        return own + []<class... K>(std::tuple<K...>*) { return (std::size_t{0} + ... + numbers_in<K>()); }(
                         static_cast<typename E::kids_type*>(nullptr));
    } else return 0;
}
template <class E>
constexpr std::size_t operands_in() {
    if constexpr (std::is_same_v<E, operand_slot>) return 1;
    else if constexpr (is_node_v<E>)
        return []<class... K>(std::tuple<K...>*) { return (std::size_t{0} + ... + operands_in<K>()); }(
            static_cast<typename E::kids_type*>(nullptr));
    else return 0;
}

// The GLSL expression of a prepared pointwise tree at (b, h, i, j), from its
// type alone (so that a static_assert can read it): the tree's numbers are
// read as NUM(first), NUM(first + 1), ... and its operand slots as ld<k>
// with k = first_operand, first_operand + 1, ..., both in walk order (kids
// left to right), the order in which prepare() appends the operands. `bh`
// names the flattened batch-head index, `qv`/`kv` the pairwise features.
//
// Given the tree itself and `values`, the same walk also appends the value
// of every number as the text reads it (float bits; dropout's seed and
// threshold as they are), and with `slots` the index each operand slot
// carries, in the order the text numbers them ld<first_operand>, ...: the
// parameters and the bindings a kernel is dispatched with come from the walk
// that wrote its text, so they cannot disagree with it.
struct emitter {
    std::size_t next_number = 0;
    std::size_t next_operand = 0;
    // The GLSL functions of the operations emitted so far (each operation's
    // glsl_definition, once), to be placed before the text that calls them.
    std::string definitions = {};
    // Emit strip_masks(tree) (epilogue.hpp), for tiles whose masks keep
    // everything, while numbering the slots as in the whole tree: what a
    // mask's condition reads is still counted, only not read.
    bool strip_masks = false;
    std::vector<std::uint32_t>* values = nullptr;
    std::vector<std::size_t>* slots = nullptr;

    // A number as float bits, NUM(k) in the text; a word as it is, NUMU(k).
    constexpr std::string number(double v) { return "NUM(" + decimal(record(std::bit_cast<std::uint32_t>(static_cast<float>(v)))) + "u)"; }
    constexpr std::string word(std::uint32_t v) { return "NUMU(" + decimal(record(v)) + "u)"; }

    // A tree's value and its derivative in the score slot s, as GLSL text.
    struct dual_text {
        std::string value, slope;
    };
    // The dual of a tree of type E: its value numbered as emit<E>() numbers
    // it (each number recorded once), and its derivative in s chained
    // through each operation's glsl_partials, "0.0" where E does not read s.
    // A zero derivative passes zero through an infinite partial (af_chain),
    // as the reference's chain does. Masks keep theirs (no strip_masks here).
    template <class E>
    constexpr dual_text dual(const E* e = nullptr) {
        if constexpr (std::is_same_v<E, score_slot>) return {"s", "1.0"};
        else if constexpr (!reads_score<E>()) return {emit<E>(e), "0.0"};
        else if constexpr (has_kind_template<E, kind::elementwise>::value) return elementwise_dual(e);  // masks too: a select
        else if constexpr (has_kind_v<E, kind::scale_by>) {
            const dual_text x = dual<kid_t<E, 0>>(kid<0>(e));
            const std::string factor = number(e ? e->kind.factor : 0.0);
            return {"(" + x.value + " * " + factor + ")", "(" + x.slope + " * " + factor + ")"};
        } else if constexpr (has_kind_v<E, kind::dropout>) {
            const dual_text x = dual<kid_t<E, 0>>(kid<0>(e));
            const std::string seed = word(e ? e->kind.seed : 0u);
            const std::string threshold = word(e ? op::dropout_threshold(e->kind.p) : 0u);
            const std::string keep = number(e ? 1.0 / (1.0 - e->kind.p) : 0.0);
            const std::string rest = ", " + seed + ", " + threshold + ", " + keep + ", bh, i, j)";
            return {"af_dropout(" + x.value + rest, "af_dropout(" + x.slope + rest};
        } else if constexpr (has_kind_v<E, kind::lookup>) {
            return {emit<E>(e), "0.0"};  // a table's entry is piecewise constant in its index
        } else if constexpr (is_named_node<E>::value) {
            return dual<kid_t<E, 0>>(kid<0>(e));
        } else {
            static_assert(sizeof(E) == 0, "attnfuse: the GLSL derivative has no rule for this pointwise node (the E of this instantiation)");
            return {};
        }
    }
    // Does a tree of type E read the score slot?
    template <class E>
    static constexpr bool reads_score() {
        if constexpr (std::is_same_v<E, score_slot>) return true;
        else if constexpr (is_node_v<E>)
            return []<class... K>(std::tuple<K...>*) { return (false || ... || reads_score<K>()); }(static_cast<typename E::kids_type*>(nullptr));
        else return false;
    }

    // The text of `e`, and its numbers into `values` when set.
    template <class E>
    constexpr std::string operator()(const E& e) {
        return emit<E>(&e);
    }

    // The text of a tree of type E; its numbers too when `e` is given.
    template <class E>
    constexpr std::string emit(const E* e = nullptr) {
        if constexpr (std::is_same_v<E, constant>) return number(e ? e->value : 0.0);
        else if constexpr (std::is_same_v<E, query_index>) return "float(i)";
        else if constexpr (std::is_same_v<E, key_index>) return "float(j)";
        else if constexpr (std::is_same_v<E, score_slot>) return "s";
        else if constexpr (std::is_same_v<E, pair_query_feature>) return "qv";
        else if constexpr (std::is_same_v<E, pair_key_feature>) return "kv";
        else if constexpr (std::is_same_v<E, operand_slot>) return "ld" + decimal(slot(e)) + "(b, h, i, j)";
        else if constexpr (is_mask<E>::value) {
            if (!strip_masks) return elementwise<op::select>(e);
            next_number += numbers_in<kid_t<E, 0>>();
            next_operand += operands_in<kid_t<E, 0>>();
            std::string kept = emit<kid_t<E, 1>>(kid<1>(e));
            next_number += numbers_in<kid_t<E, 2>>();
            return kept;
        } else if constexpr (has_kind_template<E, kind::elementwise>::value) {
            return elementwise<typename E::kind_type::op>(e);
        } else if constexpr (has_kind_v<E, kind::scale_by>) {
            const std::string x = emit<kid_t<E, 0>>(kid<0>(e));
            return "(" + x + " * " + number(e ? e->kind.factor : 0.0) + ")";
        } else if constexpr (has_kind_v<E, kind::dropout>) {
            const std::string x = emit<kid_t<E, 0>>(kid<0>(e));
            const std::string seed = word(e ? e->kind.seed : 0u);
            const std::string threshold = word(e ? op::dropout_threshold(e->kind.p) : 0u);
            const std::string keep = number(e ? 1.0 / (1.0 - e->kind.p) : 0.0);
            return "af_dropout(" + x + ", " + seed + ", " + threshold + ", " + keep + ", bh, i, j)";
        } else if constexpr (has_kind_v<E, kind::lookup>) {
            static_assert(std::is_same_v<kid_t<E, 0>, operand_slot>, "attnfuse internal: a lookup table is an operand");
            const std::string table = decimal(slot(kid<0>(e)));
            return "lookup" + table + "(b, h, " + emit<kid_t<E, 1>>(kid<1>(e)) + ")";
        } else if constexpr (is_named_node<E>::value) {
            return emit<kid_t<E, 0>>(kid<0>(e));
        } else {
            static_assert(sizeof(E) == 0, "attnfuse: the GLSL emitter has no rule for this pointwise node (the E of this instantiation)");
            return {};
        }
    }

private:
    template <class E, std::size_t N>
    using kid_t = std::tuple_element_t<N, typename E::kids_type>;
    template <std::size_t N, class E>
    static constexpr const kid_t<E, N>* kid(const E* e) {
        return e ? &std::get<N>(e->kids) : nullptr;
    }

    template <class Op, class E>
    constexpr std::string elementwise(const E* e) {
        static_assert(requires { Op::glsl; Op::glsl_infix; },
                      "attnfuse: this elementwise operation has no GLSL face (it is the Op of this instantiation). Fix: give it "
                      "`glsl`, `glsl_infix` and `glsl_definition` in dsl/attnfuse/ops.hpp.");
        static_assert(listed<Op>(op::all{}), "attnfuse: this elementwise operation is not listed in attnfuse::op::all "
                                             "(dsl/attnfuse/ops.hpp), which the tests run on every backend. Fix: add it there.");
        if (!Op::glsl_definition.empty() && definitions.find(Op::glsl_definition) == std::string::npos) {
            definitions += Op::glsl_definition;
            definitions += '\n';
        }
        constexpr std::size_t arity = std::tuple_size_v<typename E::kids_type>;
        std::string args[arity];
        [&]<std::size_t... N>(std::index_sequence<N...>) {
            ((args[N] = emit<kid_t<E, N>>(kid<N>(e))), ...);  // left to right
        }(std::make_index_sequence<arity>{});
        return spelled<Op>(args, arity);
    }
    template <class Op>
    static constexpr std::string spelled(const std::string* args, std::size_t arity) {
        if constexpr (Op::glsl_infix) {
            if (arity == 2) return "(" + args[0] + " " + std::string(Op::glsl) + " " + args[1] + ")";
            return "(" + std::string(Op::glsl) + args[0] + ")";
        } else {
            std::string call = std::string(Op::glsl) + "(";
            for (std::size_t a = 0; a < arity; ++a) call += (a ? ", " : "") + args[a];
            return call + ")";
        }
    }

    template <class E>
    constexpr dual_text elementwise_dual(const E* e) {
        using Op = typename E::kind_type::op;
        static_assert(requires { Op::glsl_partials; }, "attnfuse: this elementwise operation has no GLSL derivative face (it is the Op of "
                                                       "this instantiation). Fix: give it `glsl_partials` in dsl/attnfuse/ops.hpp.");
        constexpr std::size_t arity = std::tuple_size_v<typename E::kids_type>;
        dual_text kids[arity];
        [&]<std::size_t... N>(std::index_sequence<N...>) {
            ((kids[N] = dual<kid_t<E, N>>(kid<N>(e))), ...);  // left to right, as emit walks
        }(std::make_index_sequence<arity>{});
        std::string values[arity];
        for (std::size_t a = 0; a < arity; ++a) values[a] = kids[a].value;
        dual_text out{spelled<Op>(values, arity), {}};
        if (!Op::glsl_definition.empty()) define(std::string(Op::glsl_definition));
        define("float af_chain(float slope, float partial) { return slope == 0.0 ? 0.0 : slope * partial; }");
        const std::string index = decimal(op_index<Op>(op::all{}));
        const char* names[] = {"a", "b", "c"};
        for (std::size_t a = 0; a < arity; ++a) {
            if (kids[a].slope == "0.0" || !Op::carries_gradient[a]) continue;
            const std::string function = "af_d" + index + "_" + decimal(a);
            std::string params, call = function + "(";
            for (std::size_t p = 0; p < arity; ++p) {
                params += std::string(p ? ", " : "") + "float " + names[p];
                call += (p ? ", " : "") + values[p];
            }
            define("float " + function + "(" + params + ") { return " + std::string(Op::glsl_partials[a]) + "; }");
            const std::string term = "af_chain(" + kids[a].slope + ", " + call + "))";
            out.slope = out.slope.empty() ? term : "(" + out.slope + " + " + term + ")";
        }
        if (out.slope.empty()) out.slope = "0.0";
        return out;
    }
    constexpr void define(const std::string& definition) {
        if (definitions.find(definition) == std::string::npos) definitions += definition + "\n";
    }

    constexpr std::size_t record(std::uint32_t v) {
        if (values) values->push_back(v);
        return next_number++;
    }
    constexpr std::size_t slot(const operand_slot* s) {
        if (slots && s) slots->push_back(s->index);
        return next_operand++;
    }
};

}  // namespace attnfuse::vulkan::glsl
