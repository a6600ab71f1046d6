// to_string(expr): the formula back, in the DSL's own spelling, with the
// parentheses that C++ would need to read it the same way.
#pragma once
#include <charconv>
#include <cmath>
#include <string>

#include "expr.hpp"

namespace attnfuse {
namespace detail {

struct printed {
    std::string text;
    int prec = op::prec_atom;
    // Starts with `X^T` unparenthesised. C++ reads `X ^ rest`, so such text
    // stays correct as the left operand of arithmetic and comparisons, and
    // needs parentheses on the right of any operator or left of && and ||.
    bool caret_led = false;
};

inline std::string number_to_string(double v) {
    if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
    if (std::isnan(v)) return "nan";
    char buffer[64];
    auto result = std::to_chars(buffer, buffer + sizeof buffer, v);
    return std::string(buffer, result.ptr);
}

inline std::string parenthesised(const printed& p, bool wrap) { return wrap ? "(" + p.text + ")" : p.text; }

inline printed infix(const printed& left, std::string_view symbol, int prec, const printed& right) {
    const bool low_for_caret = prec <= op::prec_and;
    const bool wrap_left = left.prec < prec || (left.caret_led && low_for_caret);
    const bool wrap_right = right.prec <= prec || right.caret_led;
    return {parenthesised(left, wrap_left) + std::string(symbol) + parenthesised(right, wrap_right), prec,
            left.caret_led && !wrap_left};
}

inline printed call(std::string_view name, std::initializer_list<std::string> args) {
    std::string text(name);
    text += '(';
    bool first = true;
    for (const auto& a : args) {
        if (!first) text += ", ";
        text += a;
        first = false;
    }
    text += ')';
    return {text, op::prec_atom, false};
}

template <class E> printed print(const E& e);

template <fixed_string N, std::size_t R, std::size_t C, class El>
printed print_leaf(const matrix<N, R, C, El>&) { return {std::string(N.view())}; }
inline printed print_leaf(const constant& c) {
    return {number_to_string(c.value), c.value < 0 ? int(op::prec_unary) : int(op::prec_atom)};
}
inline printed print_leaf(const query_index&) { return {"i"}; }
inline printed print_leaf(const key_index&) { return {"j"}; }
inline printed print_leaf(const transpose_marker&) { return {"T"}; }
inline printed print_leaf(const pair_query_feature&) { return {"qf"}; }
inline printed print_leaf(const pair_key_feature&) { return {"kf"}; }

template <class Op, class... Kids>
printed print_node(const node<kind::elementwise<Op>, Kids...>& n) {
    if constexpr (sizeof...(Kids) == 1) {
        const printed a = print(n.template kid<0>());
        if constexpr (Op::prefix) {
            const bool wrap = a.prec < op::prec_unary || a.caret_led;
            return {std::string(Op::name) + parenthesised(a, wrap), op::prec_unary};
        } else {
            return call(Op::name, {a.text});
        }
    } else if constexpr (sizeof...(Kids) == 2) {
        const printed a = print(n.template kid<0>()), b = print(n.template kid<1>());
        using left = std::tuple_element_t<0, std::tuple<Kids...>>;
        using right = std::tuple_element_t<1, std::tuple<Kids...>>;
        if constexpr (Op::symbol.empty()) return call(Op::name, {a.text, b.text});
        else if constexpr (std::is_same_v<Op, op::multiply> && (is_scalar_like_v<left> || is_scalar_like_v<right>))
            return infix(a, "*", Op::prec, b);  // scaling by a number prints as the user wrote it
        else if constexpr (Op::prec == op::prec_multiplicative) return infix(a, Op::symbol, Op::prec, b);
        else return infix(a, " " + std::string(Op::symbol) + " ", Op::prec, b);
    } else {
        using otherwise = std::tuple_element_t<2, std::tuple<Kids...>>;
        if constexpr (std::is_same_v<otherwise, constant>) {
            if (n.template kid<2>().value == minus_infinity)  // mask(s, keep) builds where(keep, s, -inf)
                return call("mask", {print(n.template kid<1>()).text, print(n.template kid<0>()).text});
        }
        return call(Op::name, {print(n.template kid<0>()).text, print(n.template kid<1>()).text,
                               print(n.template kid<2>()).text});
    }
}

template <class A, class B>
printed print_node(const node<kind::product, A, B>& n) {
    return infix(print(n.template kid<0>()), "*", op::prec_multiplicative, print(n.template kid<1>()));
}

template <class A>
printed print_node(const node<kind::transpose, A>& n) {
    if constexpr (is_input_v<A>) return {print(n.template kid<0>()).text + "^T", op::prec_atom, true};
    else return call("transpose", {print(n.template kid<0>()).text});
}

template <class A>
printed print_node(const node<kind::concat_heads, A>& n) { return call("concat_heads", {print(n.template kid<0>()).text}); }

template <class A>
printed print_node(const node<kind::scale_by_inner_extent, A>& n) { return call("scale", {print(n.template kid<0>()).text}); }
template <class A>
printed print_node(const node<kind::scale_by, A>& n) {
    return call("scale", {print(n.template kid<0>()).text, number_to_string(n.kind.factor)});
}
template <class A>
printed print_node(const node<kind::softmax, A>& n) { return call("softmax", {print(n.template kid<0>()).text}); }
template <class A>
printed print_node(const node<kind::hard, A>& n) { return call("hard", {print(n.template kid<0>()).text}); }

template <class Op, class A>
printed print_node(const node<kind::reduce_along_rows<Op>, A>& n) {
    return call(std::is_same_v<Op, op::add> ? "row_sum" : "row_max", {print(n.template kid<0>()).text});
}
template <class Op, class A>
printed print_node(const node<kind::reduce_along_cols<Op>, A>& n) {
    return call(std::is_same_v<Op, op::add> ? "col_sum" : "col_max", {print(n.template kid<0>()).text});
}

template <class F, class W, class QF, class KF>
printed print_node(const node<kind::pairwise<F>, W, QF, KF>& n) {
    const std::string w = print(n.template kid<0>()).text, q = print(n.template kid<1>()).text,
                      k = print(n.template kid<2>()).text;
    if constexpr (std::is_same_v<F, decltype(tanh(qf + kf))>) return call("additive", {w, q, k});
    else return call("pairwise", {w, q, k, print(n.kind.combine).text});
}

template <class Table, class Index>
printed print_node(const node<kind::lookup, Table, Index>& n) {
    return {print(n.template kid<0>()).text + "[" + print(n.template kid<1>()).text + "]", op::prec_atom};
}

template <class A>
printed print_node(const node<kind::dropout, A>& n) {
    return call("dropout", {print(n.template kid<0>()).text, number_to_string(n.kind.p), std::to_string(n.kind.seed)});
}

template <fixed_string Label, class A>
printed print_node(const node<kind::named<Label>, A>& n) {
    if (n.kind.has_parameter) return call(Label.view(), {number_to_string(n.kind.parameter)});
    return {std::string(Label.view())};
}

template <class E>
printed print(const E& e) {
    if constexpr (is_node_v<E>) return print_node(e);
    else return print_leaf(e);
}

}  // namespace detail

template <class E>
    requires expression<E>
std::string to_string(const E& e) {
    return detail::print(e).text;
}

}  // namespace attnfuse
