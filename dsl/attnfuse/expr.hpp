// The expression tree: leaves (named inputs, constants, the indices i and j),
// one regular interior node `node<Kind, Kids...>`, and the operators and
// functions users write. Nothing here knows of any backend.
//
// Every node stores its operands by value: leaves are empty or hold a number,
// so copying is free and `auto e = softmax(scale(Q^T*K))*V;` never dangles.
#pragma once
#include <concepts>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>

#include "element.hpp"
#include "fixed_string.hpp"
#include "ops.hpp"
#include "shape.hpp"

namespace attnfuse {

struct expr_base {};

template <class E>
concept expression = std::derived_from<std::remove_cvref_t<E>, expr_base>;
template <class X>
concept arithmetic = std::is_arithmetic_v<std::remove_cvref_t<X>>;
template <class X>
concept operand = expression<X> || arithmetic<X>;

// ---------------------------------------------------------------- leaves ---

// A named input: a matrix with a logical shape rows x cols (each static or
// `dyn`), repeated over the outer batch and head dimensions when bound, and
// stored as Element: float, half or bfloat16 (element.hpp; the arithmetic is
// fp32 whatever the storage).
template <fixed_string Name, std::size_t Rows = dyn, std::size_t Cols = dyn, class Element = float>
struct matrix : expr_base {
    static_assert(storage_element<Element>,
                  "attnfuse: a matrix is stored as float (f32), attnfuse::half (f16) or attnfuse::bfloat16 (bf16); "
                  "another element type needs its attnfuse::element<T> faces (dsl/attnfuse/element.hpp)");
    static constexpr std::size_t rows = Rows;
    static constexpr std::size_t cols = Cols;
    static constexpr auto name = Name;
    using element_type = Element;

    // Table lookup `B[i - j + offset]`: the index is rounded and clamped to
    // the table, which is one row or one column (per head when bound so).
    template <class Index>
        requires operand<Index>
    constexpr auto operator[](Index index) const;
};

// A number inside an expression.
struct constant : expr_base {
    static constexpr std::size_t rows = 1;
    static constexpr std::size_t cols = 1;
    double value = 0;
    constexpr explicit constant(double v = 0) : value(v) {}
};

// The query index (row of the score matrix) and the key index (its column),
// as values: FlexAttention's q_idx and kv_idx.
struct query_index : expr_base {
    static constexpr std::size_t rows = 1;
    static constexpr std::size_t cols = 1;
};
struct key_index : expr_base {
    static constexpr std::size_t rows = 1;
    static constexpr std::size_t cols = 1;
};

// The `T` of `Q^T`. C++ parses `Q^T*K` as `Q ^ (T*K)`: `T*K` builds a tree
// with this marker where Q^T belongs, and `Q ^ tree` puts transpose(Q) there.
struct transpose_marker : expr_base {
    static constexpr std::size_t rows = dyn;
    static constexpr std::size_t cols = dyn;
};

// The two features a pairwise score combines: element a of the query-side
// vector and element a of the key-side vector (see `pairwise`).
struct pair_query_feature : expr_base {
    static constexpr std::size_t rows = 1;
    static constexpr std::size_t cols = 1;
};
struct pair_key_feature : expr_base {
    static constexpr std::size_t rows = 1;
    static constexpr std::size_t cols = 1;
};

inline constexpr query_index i{};
inline constexpr key_index j{};
inline constexpr transpose_marker T{};
inline constexpr pair_query_feature qf{};
inline constexpr pair_key_feature kf{};

// ------------------------------------------------------ static checks ---
// Each check is a function template whose arguments are the shapes, so the
// compiler's "in instantiation of ... [with left_rows = 3; ...]" line names
// them beside the message.
namespace check {

template <std::size_t left_rows, std::size_t left_cols, std::size_t right_rows, std::size_t right_cols>
constexpr void product_shapes() {
    static_assert(detail::extents_agree(left_cols, right_rows),
                  "attnfuse: matrix product A*B needs columns(A) == rows(B); the shapes are the "
                  "left_rows x left_cols and right_rows x right_cols named in this instantiation. "
                  "Fix: transpose an operand (Q^T*K, transpose(x)) or correct an input's declared shape.");
}

template <std::size_t left_rows, std::size_t left_cols, std::size_t right_rows, std::size_t right_cols>
constexpr void broadcast_shapes() {
    static_assert(detail::extents_broadcast(left_rows, right_rows) && detail::extents_broadcast(left_cols, right_cols),
                  "attnfuse: elementwise operands must have equal extents or extent 1 (broadcast); the shapes "
                  "are the left_rows x left_cols and right_rows x right_cols named in this instantiation. "
                  "Fix: reduce or transpose one operand, or correct an input's declared shape.");
}

template <std::size_t weight_rows, std::size_t weight_cols, std::size_t query_rows, std::size_t key_rows>
constexpr void pairwise_shapes() {
    static_assert(detail::extents_agree(weight_rows, query_rows) && detail::extents_agree(query_rows, key_rows) &&
                      detail::extents_agree(weight_cols, 1),
                  "attnfuse: pairwise(w, Qf, Kf, f) needs w of shape d_a x 1 and Qf, Kf with d_a rows; the shapes "
                  "are the weight_rows x weight_cols, query_rows and key_rows named in this instantiation. "
                  "Fix: project both sides to the same d_a (W1*Q, W2*K) and pass w as a column.");
}

template <std::size_t table_rows, std::size_t table_cols>
constexpr void lookup_table_shape() {
    static_assert(table_rows == 1 || table_cols == 1 || table_rows == dyn || table_cols == dyn,
                  "attnfuse: table[index] needs a table of one row or one column; the shape is the "
                  "table_rows x table_cols named in this instantiation. Fix: bind one row per head.");
}

}  // namespace check

// ------------------------------------------------------------- kinds ---
// A kind says what an interior node computes: its static shape, its checks
// and its run-time parameters. Backends dispatch on it.
namespace kind {

template <class Op>
struct elementwise {
    using op = Op;
    template <class... K>
    static constexpr std::size_t rows() { return fold_rows<K...>(); }
    template <class... K>
    static constexpr std::size_t cols() { return fold_cols<K...>(); }
    template <class... K>
    static constexpr void check() { check_pairs<K...>(); }

private:
    template <class A, class... Rest>
    static constexpr std::size_t fold_rows() {
        if constexpr (sizeof...(Rest) == 0) return A::rows;
        else return detail::broadcast_extent(A::rows, fold_rows<Rest...>());
    }
    template <class A, class... Rest>
    static constexpr std::size_t fold_cols() {
        if constexpr (sizeof...(Rest) == 0) return A::cols;
        else return detail::broadcast_extent(A::cols, fold_cols<Rest...>());
    }
    template <class A, class... Rest>
    static constexpr void check_pairs() {
        if constexpr (sizeof...(Rest) > 0) {
            check::broadcast_shapes<A::rows, A::cols, fold_rows<Rest...>(), fold_cols<Rest...>()>();
            check_pairs<Rest...>();
        }
    }
};

struct product {
    template <class A, class B> static constexpr std::size_t rows() { return A::rows; }
    template <class A, class B> static constexpr std::size_t cols() { return B::cols; }
    template <class A, class B> static constexpr void check() { check::product_shapes<A::rows, A::cols, B::rows, B::cols>(); }
};

struct transpose {
    template <class A> static constexpr std::size_t rows() { return A::cols; }
    template <class A> static constexpr std::size_t cols() { return A::rows; }
    template <class A> static constexpr void check() {}
};

// Kinds whose result has the shape of their only operand.
struct same_shape {
    template <class A> static constexpr std::size_t rows() { return A::rows; }
    template <class A> static constexpr std::size_t cols() { return A::cols; }
    template <class A> static constexpr void check() {}
};

// scale(e): multiply by 1/sqrt(d_k), d_k the inner extent of the first matrix
// product found in e.
struct scale_by_inner_extent : same_shape {};
// scale(e, c): multiply by c.
struct scale_by : same_shape {
    double factor = 1;
};

// Normalisations along the key axis (each row of a score matrix).
struct softmax : same_shape {};
struct hard : same_shape {};

template <class Op>
struct reduce_along_rows {  // each row to one value: n x m -> n x 1
    using op = Op;
    template <class A> static constexpr std::size_t rows() { return A::rows; }
    template <class A> static constexpr std::size_t cols() { return 1; }
    template <class A> static constexpr void check() {}
};
template <class Op>
struct reduce_along_cols {  // each column to one value: n x m -> 1 x m
    using op = Op;
    template <class A> static constexpr std::size_t rows() { return 1; }
    template <class A> static constexpr std::size_t cols() { return A::cols; }
    template <class A> static constexpr void check() {}
};

// s[q, k] = sum_a w[a] * f(Qf[a, q], Kf[a, k]); f is an expression in qf, kf.
template <class Combine>
struct pairwise {
    Combine combine;
    template <class W, class QF, class KF> static constexpr std::size_t rows() { return QF::cols; }
    template <class W, class QF, class KF> static constexpr std::size_t cols() { return KF::cols; }
    template <class W, class QF, class KF>
    static constexpr void check() { check::pairwise_shapes<W::rows, W::cols, QF::rows, KF::rows>(); }
};

// table[index]: elementwise in the index.
struct lookup {
    template <class Table, class Index> static constexpr std::size_t rows() { return Index::rows; }
    template <class Table, class Index> static constexpr std::size_t cols() { return Index::cols; }
    template <class Table, class Index> static constexpr void check() { check::lookup_table_shape<Table::rows, Table::cols>(); }
};

// Inverted dropout on the operand: kept entries are divided by 1 - p.
struct dropout : same_shape {
    double p = 0;
    std::uint32_t seed = 0;
};

// concat_heads(e): the heads of e side by side, n x d per head becoming
// n x (heads*d) per batch entry (head h in columns [h*d, (h+1)*d)). The
// result has one head: what is built on it (W_o, a bias, a residual) runs
// once per batch entry. Its column count is known once the heads are bound.
struct concat_heads {
    template <class A> static constexpr std::size_t rows() { return A::rows; }
    template <class A> static constexpr std::size_t cols() { return dyn; }
    template <class A> static constexpr void check() {}
};

// A sub-expression that prints under a name (causal, window(w)).
template <fixed_string Label>
struct named : same_shape {
    static constexpr auto label = Label;
    double parameter = 0;
    bool has_parameter = false;
};

}  // namespace kind

// -------------------------------------------------------------- node ---

template <class Kind, class... Kids>
struct [[nodiscard]] node : expr_base {
    using kind_type = Kind;
    using kids_type = std::tuple<Kids...>;
    static constexpr std::size_t rows = Kind::template rows<Kids...>();
    static constexpr std::size_t cols = Kind::template cols<Kids...>();

    Kind kind;
    std::tuple<Kids...> kids;

    constexpr explicit node(Kind k, Kids... ks) : kind(k), kids(std::move(ks)...) { Kind::template check<Kids...>(); }

    template <std::size_t N>
    constexpr const auto& kid() const { return std::get<N>(kids); }
};

template <class E> struct is_node : std::false_type {};
template <class Kind, class... Kids> struct is_node<node<Kind, Kids...>> : std::true_type {};
template <class E> inline constexpr bool is_node_v = is_node<std::remove_cvref_t<E>>::value;

template <class E> struct is_input : std::false_type {};
template <fixed_string N, std::size_t R, std::size_t C, class El> struct is_input<matrix<N, R, C, El>> : std::true_type {};
template <class E> inline constexpr bool is_input_v = is_input<std::remove_cvref_t<E>>::value;

template <class E, template <class...> class KindTemplate> struct has_kind_template : std::false_type {};
template <template <class...> class KT, class... Args, class... Kids>
struct has_kind_template<node<KT<Args...>, Kids...>, KT> : std::true_type {};

template <class E, class Kind> struct has_kind : std::false_type {};
template <class Kind, class... Kids> struct has_kind<node<Kind, Kids...>, Kind> : std::true_type {};
template <class E, class Kind> inline constexpr bool has_kind_v = has_kind<std::remove_cvref_t<E>, Kind>::value;

// Does the tree hold the `T` marker (an unfinished `T*K`)?
template <class E> struct holds_marker : std::is_same<E, transpose_marker> {};
template <class Kind, class... Kids>
struct holds_marker<node<Kind, Kids...>> : std::bool_constant<(holds_marker<Kids>::value || ...)> {};
template <class E> inline constexpr bool holds_marker_v = holds_marker<std::remove_cvref_t<E>>::value;

// Does the tree hold a matrix product (what scale(e) infers d_k from)?
template <class E> struct holds_product : std::false_type {};
template <class Kind, class... Kids>
struct holds_product<node<Kind, Kids...>>
    : std::bool_constant<std::is_same_v<Kind, kind::product> || (holds_product<Kids>::value || ...)> {};

// Does the tree hold a concat_heads (does its result have one head)?
template <class E> struct holds_concat_heads : std::false_type {};
template <class Kind, class... Kids>
struct holds_concat_heads<node<Kind, Kids...>>
    : std::bool_constant<std::is_same_v<Kind, kind::concat_heads> || (holds_concat_heads<Kids>::value || ...)> {};
template <class E> inline constexpr bool holds_concat_heads_v = holds_concat_heads<std::remove_cvref_t<E>>::value;

// Scalar-like: no extent of its own (numbers, i, j and elementwise
// combinations of them). `*` with a scalar-like operand is elementwise.
template <class E> struct is_scalar_like : std::false_type {};
template <> struct is_scalar_like<constant> : std::true_type {};
template <> struct is_scalar_like<query_index> : std::true_type {};
template <> struct is_scalar_like<key_index> : std::true_type {};
template <> struct is_scalar_like<pair_query_feature> : std::true_type {};
template <> struct is_scalar_like<pair_key_feature> : std::true_type {};
template <class Op, class... Kids>
struct is_scalar_like<node<kind::elementwise<Op>, Kids...>> : std::bool_constant<(is_scalar_like<Kids>::value && ...)> {};
template <fixed_string L, class Kid>
struct is_scalar_like<node<kind::named<L>, Kid>> : is_scalar_like<Kid> {};
template <class E> inline constexpr bool is_scalar_like_v = is_scalar_like<std::remove_cvref_t<E>>::value;

// Pointwise: computed at each position from the same position of its
// operands (and of i, j). A maximal tree of pointwise nodes is one loop.
template <class E> struct is_pointwise : std::false_type {};
template <class Op, class... K> struct is_pointwise<node<kind::elementwise<Op>, K...>> : std::true_type {};
template <class A> struct is_pointwise<node<kind::scale_by_inner_extent, A>> : std::true_type {};
template <class A> struct is_pointwise<node<kind::scale_by, A>> : std::true_type {};
template <class A> struct is_pointwise<node<kind::dropout, A>> : std::true_type {};
template <fixed_string L, class A> struct is_pointwise<node<kind::named<L>, A>> : std::true_type {};
template <class Tb, class I> struct is_pointwise<node<kind::lookup, Tb, I>> : std::true_type {};
template <> struct is_pointwise<constant> : std::true_type {};
template <> struct is_pointwise<query_index> : std::true_type {};
template <> struct is_pointwise<key_index> : std::true_type {};
template <class E> inline constexpr bool is_pointwise_v = is_pointwise<std::remove_cvref_t<E>>::value;
// A sub-expression under a printed name (causal, window(w)): it computes its operand.
template <class E> struct is_named_node : std::false_type {};
template <fixed_string L, class A> struct is_named_node<node<kind::named<L>, A>> : std::true_type {};

// ----------------------------------------------------------- builders ---

template <class X>
constexpr auto as_expr(X&& x) {
    if constexpr (expression<X>) return std::remove_cvref_t<X>(std::forward<X>(x));
    else return constant(static_cast<double>(x));
}
template <class X> using expr_t = decltype(as_expr(std::declval<X>()));

template <class Kind, class... Kids>
constexpr auto make_node(Kind k, Kids&&... kids) {
    return node<Kind, expr_t<Kids>...>(k, as_expr(std::forward<Kids>(kids))...);
}

template <class Op, class... Args>
constexpr auto elementwise(Args&&... args) {
    return make_node(kind::elementwise<Op>{}, std::forward<Args>(args)...);
}

// Rebuilds a tree with `T` replaced by `replacement`; every node is
// constructed anew, so its shape checks run on the real operands.
template <class E, class X>
constexpr auto replace_marker(const E& e, const X& replacement) {
    if constexpr (std::is_same_v<E, transpose_marker>) {
        return replacement;
    } else if constexpr (is_node_v<E> && holds_marker_v<E>) {
        return std::apply([&](const auto&... kids) { return make_node(e.kind, replace_marker(kids, replacement)...); },
                          e.kids);
    } else {
        return e;
    }
}

template <class E>
    requires expression<E>
constexpr auto transpose(E&& e) {
    return make_node(kind::transpose{}, std::forward<E>(e));
}

// ---- matrix product, and `*` with a scalar -----------------------------
template <class A, class B>
    requires operand<A> && operand<B> && (expression<A> || expression<B>)
constexpr auto operator*(A&& a, B&& b) {
    if constexpr (arithmetic<A> || arithmetic<B> || is_scalar_like_v<A> || is_scalar_like_v<B>)
        return elementwise<op::multiply>(std::forward<A>(a), std::forward<B>(b));
    else
        return make_node(kind::product{}, std::forward<A>(a), std::forward<B>(b));
}

// ---- X^T ----------------------------------------------------------------
namespace check {
template <class Left>
constexpr void transpose_spelling() {
    static_assert(!has_kind_v<Left, kind::product>,
                  "attnfuse: `A*B^T` parses in C++ as `(A*B)^T`. Write `A*(B^T)` for A times B-transposed, "
                  "or `transpose(A*B)` for the transpose of the product.");
    static_assert(has_kind_v<Left, kind::product> || is_input_v<Left> || has_kind_v<Left, kind::transpose>,
                  "attnfuse: `x^T` applies to a named input only, because C++ gives `^` lower precedence than "
                  "every arithmetic operator (`a+Q^T*K` would mean `(a+Q)^T*K`). Write `transpose(x)`, or "
                  "parenthesise: `a + (Q^T*K)`.");
}
}  // namespace check

template <class A, class B>
    requires expression<A> && expression<B>
constexpr auto operator^(A&& a, B&& b) {
    using left = std::remove_cvref_t<A>;
    static_assert(holds_marker_v<B>,
                  "attnfuse: `^` is only the transpose spelling `X^T`; it has no other meaning in expressions.");
    check::transpose_spelling<left>();
    if constexpr (is_input_v<left> || has_kind_v<left, kind::transpose>)
        return replace_marker(std::remove_cvref_t<B>(std::forward<B>(b)), transpose(std::forward<A>(a)));
    else
        return std::remove_cvref_t<B>(std::forward<B>(b));  // unreachable after the failed check
}

// ---- elementwise arithmetic and comparisons ------------------------------
#define ATTNFUSE_BINARY_OPERATOR(Symbol, Op)                                                        \
    template <class A, class B>                                                                    \
        requires operand<A> && operand<B> && (expression<A> || expression<B>)                      \
    constexpr auto operator Symbol(A&& a, B&& b) {                                                 \
        return elementwise<Op>(std::forward<A>(a), std::forward<B>(b));                            \
    }
ATTNFUSE_BINARY_OPERATOR(+, op::add)
ATTNFUSE_BINARY_OPERATOR(-, op::subtract)
ATTNFUSE_BINARY_OPERATOR(%, op::multiply)  // elementwise (Hadamard) product, as in Armadillo
ATTNFUSE_BINARY_OPERATOR(/, op::divide)
ATTNFUSE_BINARY_OPERATOR(<, op::less)
ATTNFUSE_BINARY_OPERATOR(<=, op::less_equal)
ATTNFUSE_BINARY_OPERATOR(>, op::greater)
ATTNFUSE_BINARY_OPERATOR(>=, op::greater_equal)
ATTNFUSE_BINARY_OPERATOR(==, op::equal)
ATTNFUSE_BINARY_OPERATOR(!=, op::not_equal)
ATTNFUSE_BINARY_OPERATOR(&&, op::logical_and)
ATTNFUSE_BINARY_OPERATOR(||, op::logical_or)
#undef ATTNFUSE_BINARY_OPERATOR

template <class A>
    requires expression<A>
constexpr auto operator-(A&& a) {
    return elementwise<op::negate>(std::forward<A>(a));
}
template <class A>
    requires expression<A>
constexpr auto operator!(A&& a) {
    return elementwise<op::logical_not>(std::forward<A>(a));
}

template <class A, class B>
    requires operand<A> && operand<B> && (expression<A> || expression<B>)
constexpr auto hadamard(A&& a, B&& b) {
    return elementwise<op::multiply>(std::forward<A>(a), std::forward<B>(b));
}

#define ATTNFUSE_UNARY_FUNCTION(Name, Op)                          \
    template <class A>                                             \
        requires expression<A>                                     \
    constexpr auto Name(A&& a) {                                   \
        return elementwise<Op>(std::forward<A>(a));                \
    }
ATTNFUSE_UNARY_FUNCTION(exp, op::exp_)
ATTNFUSE_UNARY_FUNCTION(log, op::log_)
ATTNFUSE_UNARY_FUNCTION(tanh, op::tanh_)
ATTNFUSE_UNARY_FUNCTION(sigmoid, op::sigmoid)
ATTNFUSE_UNARY_FUNCTION(relu, op::relu)
ATTNFUSE_UNARY_FUNCTION(abs, op::abs_)
ATTNFUSE_UNARY_FUNCTION(sqrt, op::sqrt_)
ATTNFUSE_UNARY_FUNCTION(square, op::square)
ATTNFUSE_UNARY_FUNCTION(softplus, op::softplus)
ATTNFUSE_UNARY_FUNCTION(erf, op::erf_)
ATTNFUSE_UNARY_FUNCTION(detach, op::detach)
#undef ATTNFUSE_UNARY_FUNCTION

template <class A, class B>
    requires operand<A> && operand<B> && (expression<A> || expression<B>)
constexpr auto max(A&& a, B&& b) {
    return elementwise<op::maximum>(std::forward<A>(a), std::forward<B>(b));
}
template <class A, class B>
    requires operand<A> && operand<B> && (expression<A> || expression<B>)
constexpr auto min(A&& a, B&& b) {
    return elementwise<op::minimum>(std::forward<A>(a), std::forward<B>(b));
}

// where(cond, a, b): a where cond is non-zero, else b.
template <class C, class A, class B>
    requires operand<C> && operand<A> && operand<B>
constexpr auto where(C&& cond, A&& a, B&& b) {
    return elementwise<op::select>(std::forward<C>(cond), std::forward<A>(a), std::forward<B>(b));
}

inline constexpr double minus_infinity = -std::numeric_limits<double>::infinity();

// mask(s, keep): s where keep holds, else -inf, which every normalisation
// turns into a weight of exactly 0.
template <class S, class C>
    requires expression<S> && operand<C>
constexpr auto mask(S&& score, C&& keep) {
    return where(std::forward<C>(keep), std::forward<S>(score), minus_infinity);
}

// ---- masks on i and j ---------------------------------------------------
inline constexpr auto causal = make_node(kind::named<"causal">{}, j <= i);

// Sliding window: j in [i - w, i].
constexpr auto window(double width) {
    return make_node(kind::named<"window">{{}, width, true}, (j <= i) && (j >= i - width));
}
// Keys past each sequence's length are masked; `lengths` is a 1x1 input
// bound with one value per batch entry (or per head).
template <class L>
    requires expression<L>
constexpr auto key_lengths(L&& lengths) {
    return j < std::forward<L>(lengths);
}
template <class L>
    requires expression<L>
constexpr auto query_lengths(L&& lengths) {
    return i < std::forward<L>(lengths);
}

// ---- scale, normalisations, reductions -------------------------------------
namespace check {
template <class E>
constexpr void scale_has_product() {
    static_assert(holds_product<E>::value,
                  "attnfuse: scale(e) infers d_k from the matrix product inside e, and e has none. "
                  "Write scale(e, factor) with an explicit factor.");
}
}  // namespace check

template <class E>
    requires expression<E>
constexpr auto scale(E&& e) {
    check::scale_has_product<std::remove_cvref_t<E>>();
    return make_node(kind::scale_by_inner_extent{}, std::forward<E>(e));
}
template <class E>
    requires expression<E>
constexpr auto scale(E&& e, double factor) {
    return make_node(kind::scale_by{{}, factor}, std::forward<E>(e));
}

template <class E>
    requires expression<E>
constexpr auto softmax(E&& e) {
    return make_node(kind::softmax{}, std::forward<E>(e));
}
template <class E>
    requires expression<E>
constexpr auto hard(E&& e) {
    return make_node(kind::hard{}, std::forward<E>(e));
}

template <class E> requires expression<E>
constexpr auto row_sum(E&& e) { return make_node(kind::reduce_along_rows<op::add>{}, std::forward<E>(e)); }
template <class E> requires expression<E>
constexpr auto row_max(E&& e) { return make_node(kind::reduce_along_rows<op::maximum>{}, std::forward<E>(e)); }
template <class E> requires expression<E>
constexpr auto col_sum(E&& e) { return make_node(kind::reduce_along_cols<op::add>{}, std::forward<E>(e)); }
template <class E> requires expression<E>
constexpr auto col_max(E&& e) { return make_node(kind::reduce_along_cols<op::maximum>{}, std::forward<E>(e)); }

// ---- pairwise (additive) scores -------------------------------------------
// pairwise(w, Qf, Kf, f): s[q, k] = sum_a w[a] f(Qf[a, q], Kf[a, k]) where f is
// an expression in `qf` and `kf`. Bahdanau's w^T tanh(W1 q + W2 k + b) is
// additive(w, W1*Q + b, W2*K).
template <class W, class QF, class KF, class F>
    requires expression<W> && expression<QF> && expression<KF> && expression<F>
constexpr auto pairwise(W&& w, QF&& query_features, KF&& key_features, F&& combine) {
    return make_node(kind::pairwise<std::remove_cvref_t<F>>{std::forward<F>(combine)}, std::forward<W>(w),
                     std::forward<QF>(query_features), std::forward<KF>(key_features));
}
template <class W, class QF, class KF>
    requires expression<W> && expression<QF> && expression<KF>
constexpr auto additive(W&& w, QF&& query_features, KF&& key_features) {
    return pairwise(std::forward<W>(w), std::forward<QF>(query_features), std::forward<KF>(key_features),
                    tanh(qf + kf));
}

// ---- dropout ---------------------------------------------------------------
template <class E>
    requires expression<E>
constexpr auto dropout(E&& e, double p, std::uint32_t seed) {
    if (!(p >= 0.0 && p <= 1.0)) throw std::invalid_argument("attnfuse: dropout probability must be in [0, 1]");
    return make_node(kind::dropout{{}, p, seed}, std::forward<E>(e));
}

// ---- heads side by side -------------------------------------------------------
namespace check {
template <class E>
constexpr void heads_concatenated_once() {
    static_assert(!holds_concat_heads_v<E>,
                  "attnfuse: concat_heads(e) with a concat_heads inside e: the inner one already left a single head, "
                  "so there is nothing left to concatenate. Fix: concatenate once, after the per-head attention.");
}
}  // namespace check

template <class E>
    requires expression<E>
constexpr auto concat_heads(E&& e) {
    check::heads_concatenated_once<std::remove_cvref_t<E>>();
    return make_node(kind::concat_heads{}, std::forward<E>(e));
}

// ---- table lookup ------------------------------------------------------------
template <fixed_string Name, std::size_t R, std::size_t C, class El>
template <class Index>
    requires operand<Index>
constexpr auto matrix<Name, R, C, El>::operator[](Index index) const {
    return make_node(kind::lookup{}, *this, std::move(index));
}

}  // namespace attnfuse
