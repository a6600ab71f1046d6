// The compile-time fusion planner. From an expression's type it derives which
// kernels run, what each computes and which intermediates are materialised.
// Both backends lower the same plan; nothing here knows of either.
//
// Rules:
//  * normalise(score)*V, with normalise one of softmax, hard, dropout on a
//    softmax, softmax(s) % g, x / (row_sum(x) + c), or none (pointwise
//    weights: any pointwise function of the score), and score a pointwise
//    epilogue around exactly one query-key core (X^T*Y, X^T*W*Y, or a
//    pairwise score), is ONE fused kernel: tiles of queries against tiles of
//    keys with a running maximum and sum (or a running argmax, or plain
//    sums); the n_q x n_k score matrix is never written to memory.
//  * A maximal tree of pointwise nodes is one loop.
//  * Every other node (products of weights with inputs, reductions, a
//    normalisation not followed by *V) is its own kernel; a transpose is a
//    view of its operand, never a kernel.
//  * Anything the fused rule does not match falls back to these kernels.
//  * In unfused mode every non-pointwise node is its own kernel, so that a
//    comparison with the fused mode isolates fusion.
#pragma once
#include <string>
#include <type_traits>
#include <vector>

#include "expr.hpp"
#include "to_string.hpp"

namespace attnfuse::plan {

enum class mode { fused, unfused };

template <class... Ts> struct list {
    static constexpr std::size_t size = sizeof...(Ts);
};
template <class... Ls> struct concat;
template <> struct concat<> { using type = list<>; };
template <class... A> struct concat<list<A...>> { using type = list<A...>; };
template <class... A, class... B, class... Rest>
struct concat<list<A...>, list<B...>, Rest...> : concat<list<A..., B...>, Rest...> {};
template <class... Ls> using concat_t = typename concat<Ls...>::type;

// ------------------------------------------------ the nodes of a cluster ---
// The non-pointwise nodes reached from E through pointwise nodes: what a
// pointwise loop reads.
template <class E, bool Pointwise = is_pointwise_v<E>> struct cluster_operands { using type = list<E>; };
template <class E> struct cluster_operands<E, true> { using type = list<>; };  // constants, i, j
template <class Kind, class... Kids> struct cluster_operands<node<Kind, Kids...>, true> {
    using type = concat_t<typename cluster_operands<Kids>::type...>;
};
template <class E> using cluster_operands_t = typename cluster_operands<E>::type;

// ------------------------------------------------- query-key cores ---
template <class E> struct core_traits { static constexpr bool is_core = false; };
// X^T*Y: the dot-product core, s[q, k] = x_q . y_k.
template <class X, class Y> struct core_traits<node<kind::product, node<kind::transpose, X>, Y>> {
    static constexpr bool is_core = true;
    static constexpr bool pairwise = false;
    static constexpr bool general = false;
};
// X^T*W*Y: the general (bilinear) core; W^T*X is projected first.
template <class X, class W, class Y>
struct core_traits<node<kind::product, node<kind::product, node<kind::transpose, X>, W>, Y>> {
    static constexpr bool is_core = true;
    static constexpr bool pairwise = false;
    static constexpr bool general = true;
};
template <class F, class W, class QF, class KF> struct core_traits<node<kind::pairwise<F>, W, QF, KF>> {
    static constexpr bool is_core = true;
    static constexpr bool pairwise = true;
    static constexpr bool general = false;
};

template <class L> struct count_cores;
template <class... Ts> struct count_cores<list<Ts...>> {
    static constexpr std::size_t value = (std::size_t{core_traits<Ts>::is_core} + ... + 0);
};
template <class L> struct first_core;
template <class T0, class... Ts> struct first_core<list<T0, Ts...>> {
    using type = std::conditional_t<core_traits<T0>::is_core, T0, typename first_core<list<Ts...>>::type>;
};
template <> struct first_core<list<>> { using type = void; };

// ------------------------------------------------ normalisations ---
// softmax and hard as such; dropout on a softmax; a softmax whose weights are
// then multiplied by a pointwise factor g (Luong's local-p Gaussian, applied
// after the windowed softmax without renormalising); the ratio
// x / (row_sum(x) + c) of the Keras feed-forward layer (no maximum taken);
// and pointwise weights, any pointwise function of one core with no row
// normalisation at all (sigmoid attention sigmoid(s + b), ReLU^2 attention
// square(relu(s))): the context is the plain weighted sum.
enum class normalisation { none, softmax, hard, ratio, pointwise };

// Pointwise weights: what no more particular rule below matches.
template <class N, bool = is_node_v<N> && is_pointwise_v<N>> struct pointwise_weights {
    static constexpr normalisation norm = normalisation::none;
};
template <class N> struct pointwise_weights<N, true> {
    static constexpr normalisation norm =
        count_cores<cluster_operands_t<N>>::value == 1 ? normalisation::pointwise : normalisation::none;
    static constexpr bool dropout = false;
    using score = N;
    using post = void;
};
template <class N> struct normaliser : pointwise_weights<N> {};
template <class S> struct normaliser<node<kind::softmax, S>> {
    static constexpr normalisation norm = normalisation::softmax;
    static constexpr bool dropout = false;
    using score = S;
    using post = void;
};
template <class S> struct normaliser<node<kind::hard, S>> {
    static constexpr normalisation norm = normalisation::hard;
    static constexpr bool dropout = false;
    using score = S;
    using post = void;
};
template <class S> struct normaliser<node<kind::dropout, node<kind::softmax, S>>> {
    static constexpr normalisation norm = normalisation::softmax;
    static constexpr bool dropout = true;
    using score = S;
    using post = void;
};
template <class S, class G> struct normaliser<node<kind::elementwise<op::multiply>, node<kind::softmax, S>, G>> {
    static constexpr normalisation norm = normalisation::softmax;
    static constexpr bool dropout = false;
    using score = S;
    using post = G;
};
template <class X>
struct normaliser<node<kind::elementwise<op::divide>, X,
                       node<kind::elementwise<op::add>, node<kind::reduce_along_rows<op::add>, X>, constant>>> {
    static constexpr normalisation norm = normalisation::ratio;
    static constexpr bool dropout = false;
    using score = X;
    using post = void;
};

// normalise(score)*V, fused or not: the context as a weighted sum of value
// rows. Every backend, mode and the reference follow one rule for it: a key
// whose weight is exactly 0 (masked, not chosen by hard, dropped by dropout,
// zeroed by a post factor) is never read, so a NaN or inf in its value row
// reaches no output; a weight that is merely small still multiplies.
template <class E> struct is_weighted_sum : std::false_type {};
template <class N, class V>
struct is_weighted_sum<node<kind::product, N, V>> : std::bool_constant<normaliser<N>::norm != normalisation::none> {};
template <class E> inline constexpr bool is_weighted_sum_v = is_weighted_sum<std::remove_cvref_t<E>>::value;

template <class G> struct operands_of_post { using type = cluster_operands_t<G>; };
template <> struct operands_of_post<void> { using type = list<>; };

// ---------------------------------------------------- the fused rule ---
template <class E> struct attention_pattern {
    static constexpr bool matches = false;
};
template <class N, class V> struct attention_pattern<node<kind::product, N, V>> {
private:
    static constexpr bool normalised = normaliser<N>::norm != normalisation::none;
    template <class M, bool> struct detail_ { static constexpr bool ok = false; using core = void; };
    template <class M> struct detail_<M, true> {
        using operands = cluster_operands_t<typename normaliser<M>::score>;
        // one core in the score, none in a post factor
        static constexpr bool ok = count_cores<operands>::value == 1 &&
                                   count_cores<typename operands_of_post<typename normaliser<M>::post>::type>::value == 0;
        using core = typename first_core<operands>::type;
    };
    using found = detail_<N, normalised>;

public:
    static constexpr bool matches = found::ok;
    using weights = N;
    using values = V;
    using core = typename found::core;
};

template <class E> inline constexpr bool fuses_as_attention_v = attention_pattern<std::remove_cvref_t<E>>::matches;

// ------------------------------------------------ a fused kernel's parts ---
// How a backend reads a matched attention expression: its weights, score,
// core and values, and the core's operands as the kernel consumes them.
template <class Core, class E>
const Core* find_core(const E& e) {
    if constexpr (std::is_same_v<E, Core>) {
        return &e;
    } else if constexpr (is_node_v<E> && is_pointwise_v<E>) {
        const Core* found = nullptr;
        std::apply([&](const auto&... kids) { ((found = found ? found : find_core<Core>(kids)), ...); }, e.kids);
        return found;
    } else {
        return nullptr;
    }
}

// Two trees of one type differ only in their numbers (constants, factors,
// dropout's parameters, window widths): equal when those are.
template <class K>
bool same_kind_values(const K& a, const K& b) {
    if constexpr (std::is_same_v<K, kind::scale_by>) return a.factor == b.factor;
    else if constexpr (std::is_same_v<K, kind::dropout>) return a.p == b.p && a.seed == b.seed;
    else if constexpr (requires { a.parameter; }) return a.parameter == b.parameter && a.has_parameter == b.has_parameter;
    else if constexpr (requires { a.combine; }) return same_numbers(a.combine, b.combine);
    else return true;
}
template <class E>
bool same_numbers(const E& a, const E& b) {
    if constexpr (std::is_same_v<E, constant>) return a.value == b.value || (a.value != a.value && b.value != b.value);
    else if constexpr (is_node_v<E>) {
        if (!same_kind_values(a.kind, b.kind)) return false;
        return std::apply([&](const auto&... x) { return std::apply([&](const auto&... y) { return (same_numbers(x, y) && ...); }, b.kids); },
                          a.kids);
    } else return true;
}

template <class E>
struct attention_parts {
    using pattern = attention_pattern<E>;
    using weights_type = typename pattern::weights;
    using core_type = typename pattern::core;
    using core_kind = core_traits<core_type>;
    static constexpr bool hard = normaliser<weights_type>::norm == normalisation::hard;
    static constexpr bool ratio = normaliser<weights_type>::norm == normalisation::ratio;
    // pointwise weights: the score is the weights themselves, summed as they are
    static constexpr bool pointwise = normaliser<weights_type>::norm == normalisation::pointwise;
    // no running maximum: the weights are the epilogue's values (ratio, pointwise)
    static constexpr bool plain_sum = ratio || pointwise;
    static constexpr bool dropout = normaliser<weights_type>::dropout;
    using post_type = typename normaliser<weights_type>::post;
    static constexpr bool post_weighted = !std::is_void_v<post_type>;

    static const weights_type& weights(const E& e) { return e.template kid<0>(); }
    static const auto& values(const E& e) { return e.template kid<1>(); }
    // the score under softmax(s), hard(s), dropout(softmax(s)), softmax(s) % g,
    // the x of x / (row_sum(x) + c), or pointwise weights as they are
    static const auto& score(const E& e) {
        if constexpr (pointwise) return weights(e);
        else if constexpr (dropout || post_weighted) return weights(e).template kid<0>().template kid<0>();
        else return weights(e).template kid<0>();
    }
    // the softmax(s) of softmax(s), dropout(softmax(s)) and softmax(s) % g,
    // whose rows a training forward keeps the statistics of
    static const auto& softmax_node(const E& e)
        requires(!hard && !plain_sum)
    {
        if constexpr (dropout || post_weighted) return weights(e).template kid<0>();
        else return weights(e);
    }
    // g of softmax(s) % g
    static const auto& post(const E& e)
        requires post_weighted
    {
        return weights(e).template kid<1>();
    }
    // c of x / (row_sum(x) + c)
    static double ratio_offset(const E& e)
        requires ratio
    {
        return weights(e).template kid<1>().template kid<1>().value;
    }
    // The pattern matches types; whether a kernel may run it also depends on
    // values: the two x of a ratio must be the same x (not j < 5 over j < 3).
    static bool fusable(const E& e) {
        if constexpr (ratio) return same_numbers(score(e), weights(e).template kid<1>().template kid<0>().template kid<0>());
        else return true;
    }
    static const core_type& core(const E& e) { return *find_core<core_type>(score(e)); }
    // The queries as columns (d x n_q): X of X^T*Y, the projection W^T*X of
    // X^T*W*Y, the query features of a pairwise score.
    static auto queries(const E& e) {
        const core_type& c = core(e);
        if constexpr (core_kind::pairwise) return c.template kid<1>();
        else if constexpr (core_kind::general)
            return make_node(kind::product{}, transpose(c.template kid<0>().template kid<1>()),
                             c.template kid<0>().template kid<0>().template kid<0>());
        else return c.template kid<0>().template kid<0>();
    }
    // The keys as columns (d x n_k).
    static const auto& keys(const E& e) {
        if constexpr (core_kind::pairwise) return core(e).template kid<2>();
        else return core(e).template kid<1>();
    }
    // A pairwise score's feature weights w (d_a x 1).
    static const auto& feature_weights(const E& e)
        requires core_kind::pairwise
    {
        return core(e).template kid<0>();
    }
};

// A softmax attention (softmax(s), dropout(softmax(s)) or softmax(s) % g,
// times V) at the root of E: what a training forward keeps row statistics
// of (cpu::run_for_training).
template <class E, bool = attention_pattern<E>::matches> struct keeps_statistics : std::false_type {};
template <class E>
struct keeps_statistics<E, true> : std::bool_constant<!attention_parts<E>::hard && !attention_parts<E>::plain_sum> {};
template <class E> inline constexpr bool keeps_statistics_v = keeps_statistics<std::remove_cvref_t<E>>::value;

// The nodes whose results are an attention's n_q x n_k scores or weights
// (the weights, what they normalise, the score, its core), for every
// attention in the tree: a backend counts what it materialises of them.
template <class E, class Out>
void collect_score_nodes(const E& e, Out& out) {
    if constexpr (is_node_v<E>) {
        if constexpr (fuses_as_attention_v<E>) {
            using parts = attention_parts<E>;
            const auto& w = parts::weights(e);
            out.insert(static_cast<const void*>(&w));
            if constexpr (is_node_v<typename parts::weights_type>) out.insert(static_cast<const void*>(&w.template kid<0>()));
            out.insert(static_cast<const void*>(&parts::score(e)));
            out.insert(static_cast<const void*>(&parts::core(e)));
        }
        std::apply([&](const auto&... kids) { (collect_score_nodes(kids, out), ...); }, e.kids);
    }
}

// ------------------------------------------------------------ kernels ---
// One type per kernel; E is the node it computes.
template <class E> struct fused_attention_kernel { using expr = E; };
template <class E> struct pointwise_kernel { using expr = E; };
template <class E> struct node_kernel { using expr = E; };

template <class E, mode M> struct kernels;
template <class E, mode M> using kernels_t = typename kernels<std::remove_cvref_t<E>, M>::type;

template <class L, mode M> struct kernels_of_all;
template <class... Ts, mode M> struct kernels_of_all<list<Ts...>, M> {
    using type = concat_t<kernels_t<Ts, M>...>;
};

// The operands a fused attention kernel reads, each computed first when it
// is not a bound input: the core's two sides, every other leaf of the score
// epilogue, and the values.
template <class Core> struct core_operands;
template <class X, class Y> struct core_operands<node<kind::product, node<kind::transpose, X>, Y>> {
    using type = list<X, Y>;
};
template <class X, class W, class Y>
struct core_operands<node<kind::product, node<kind::product, node<kind::transpose, X>, W>, Y>> {
    // Q^T*W*K is (W^T*Q)^T*K: the projection W^T*Q is its own kernel.
    using type = list<node<kind::product, node<kind::transpose, W>, X>, Y>;
};
template <class F, class W, class QF, class KF> struct core_operands<node<kind::pairwise<F>, W, QF, KF>> {
    using type = list<W, QF, KF>;
};

template <class L, class Drop> struct without;
template <class... Ts, class Drop> struct without<list<Ts...>, Drop> {
    using type = concat_t<std::conditional_t<std::is_same_v<Ts, Drop>, list<>, list<Ts>>...>;
};

template <class E, mode M, bool Leaf = !is_node_v<E>, bool Fused = (M == mode::fused && fuses_as_attention_v<E>),
          bool Pointwise = is_pointwise_v<E>>
struct kernels_impl;
// bound inputs and pointwise leaves run nothing
template <class E, mode M, bool F, bool P> struct kernels_impl<E, M, true, F, P> { using type = list<>; };
template <class E, mode M, bool P> struct kernels_impl<E, M, false, true, P> {
    using pattern = attention_pattern<E>;
    using side = typename without<cluster_operands_t<typename normaliser<typename pattern::weights>::score>,
                                  typename pattern::core>::type;
    using post = typename operands_of_post<typename normaliser<typename pattern::weights>::post>::type;
    using type = concat_t<typename kernels_of_all<typename core_operands<typename pattern::core>::type, M>::type,
                          typename kernels_of_all<side, M>::type, typename kernels_of_all<post, M>::type,
                          kernels_t<typename pattern::values, M>, list<fused_attention_kernel<E>>>;
};
template <class E, mode M> struct kernels_impl<E, M, false, false, true> {
    using type = concat_t<typename kernels_of_all<cluster_operands_t<E>, M>::type, list<pointwise_kernel<E>>>;
};
// A transpose is a view of its operand (strides swapped), never a kernel.
template <class X, mode M> struct kernels_impl<node<kind::transpose, X>, M, false, false, false> {
    using type = kernels_t<X, M>;
};
template <class Kind, class... Kids, mode M> struct kernels_impl<node<Kind, Kids...>, M, false, false, false> {
    using type = concat_t<kernels_t<Kids, M>..., list<node_kernel<node<Kind, Kids...>>>>;
};
template <class E, mode M> struct kernels {
    using type = typename kernels_impl<E, M>::type;
};

template <class E, mode M = mode::fused>
inline constexpr std::size_t kernel_count = kernels_t<E, M>::size;

template <class E, mode M = mode::fused> struct count_fused;
template <class E, mode M> inline constexpr std::size_t fused_kernel_count = count_fused<E, M>::value;
template <class L> struct count_fused_in;
template <class... Ks> struct count_fused_in<list<Ks...>> {
    template <class K> struct is_fused : std::false_type {};
    template <class X> struct is_fused<fused_attention_kernel<X>> : std::true_type {};
    static constexpr std::size_t value = (std::size_t{is_fused<Ks>::value} + ... + 0);
};
template <class E, mode M> struct count_fused : count_fused_in<kernels_t<E, M>> {};

// ------------------------------------------------------------ printing ---
template <class K> struct kernel_name;
template <class E> struct kernel_name<fused_attention_kernel<E>> {
    static std::string get(const E& e) { return "fused attention: " + to_string(e); }
};
template <class E> struct kernel_name<pointwise_kernel<E>> {
    static std::string get(const E& e) { return "pointwise loop: " + to_string(e); }
};
template <class E> struct kernel_name<node_kernel<E>> {
    static std::string get(const E& e) { return "kernel: " + to_string(e); }
};

}  // namespace attnfuse::plan
