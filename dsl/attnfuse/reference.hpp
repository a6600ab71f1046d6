// The double-precision reference evaluator: the oracle of every test.
//
// It walks the tree with plain loops, one (batch, head) at a time. It is kept
// simple enough to be obviously right, so it is slow on purpose. A maximal
// cluster of pointwise nodes (elementwise operations, scale, masks, lookups,
// dropout) is evaluated over the broadcast shape of its operands, and `i`, `j`
// are the row and column of that shape: inside a score expression, the query
// and the key index.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "bind.hpp"
#include "plan.hpp"

namespace attnfuse::reference {

struct dense {
    std::size_t rows = 0;
    std::size_t cols = 0;
    std::vector<double> values;

    dense() = default;
    dense(std::size_t r, std::size_t c, double fill = 0) : rows(r), cols(c), values(r * c, fill) {}
    double& operator()(std::size_t r, std::size_t c) { return values[r * cols + c]; }
    double operator()(std::size_t r, std::size_t c) const { return values[r * cols + c]; }
    // Reads with broadcasting: an extent of 1 repeats.
    double broadcast_at(std::size_t r, std::size_t c) const {
        return (*this)(rows == 1 ? 0 : r, cols == 1 ? 0 : c);
    }
};

// Every output matrix, batch-major then head.
struct result {
    std::size_t batch = 0;
    std::size_t heads = 0;
    std::size_t rows = 0;
    std::size_t cols = 0;
    std::vector<double> values;

    double at(std::size_t b, std::size_t h, std::size_t r, std::size_t c) const {
        return values[((b * heads + h) * rows + r) * cols + c];
    }
};

namespace detail {

template <class Env>
struct context {
    const Env& env;
    std::size_t b = 0;
    std::size_t h = 0;
};

using attnfuse::is_pointwise;

template <class E, class Env> dense materialize(const E& e, const context<Env>& ctx);

// Inverted dropout on a cluster's values in place (and on their gradients in
// the backward, which the same mask and factor scale): an entry is kept and
// divided by 1 - p, or set to 0.
template <class Env>
void drop(dense& m, const kind::dropout& k, const context<Env>& ctx) {
    const double keep_scale = 1.0 / (1.0 - k.p);
    const std::uint32_t threshold = op::dropout_threshold(k.p);
    const auto batch_head = static_cast<std::uint32_t>(ctx.b * ctx.env.heads + ctx.h);
    for (std::size_t r = 0; r < m.rows; ++r)
        for (std::size_t c = 0; c < m.cols; ++c) {
            const std::uint32_t bits = op::dropout_bits(k.seed, batch_head, static_cast<std::uint32_t>(r), static_cast<std::uint32_t>(c));
            m(r, c) = op::dropout_keeps(bits, threshold) ? m(r, c) * keep_scale : 0.0;
        }
}

// A pointwise node evaluated at every position of a rows x cols cluster.
template <class E, class Env>
dense fill(const E& e, const context<Env>& ctx, std::size_t rows, std::size_t cols) {
    dense out(rows, cols);
    if constexpr (std::is_same_v<E, constant>) {
        out.values.assign(rows * cols, e.value);
    } else if constexpr (std::is_same_v<E, query_index>) {
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < cols; ++c) out(r, c) = static_cast<double>(r);
    } else if constexpr (std::is_same_v<E, key_index>) {
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < cols; ++c) out(r, c) = static_cast<double>(c);
    } else if constexpr (!is_pointwise<E>::value) {
        const dense whole = materialize(e, ctx);
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < cols; ++c) out(r, c) = whole.broadcast_at(r, c);
    } else if constexpr (has_kind_template<E, kind::elementwise>::value) {
        using Op = typename E::kind_type::op;
        constexpr std::size_t arity = std::tuple_size_v<decltype(e.kids)>;  // outside the lambda: see below
        std::apply(
            [&](const auto&... kids) {
                const std::vector<dense> parts{fill(kids, ctx, rows, cols)...};
                for (std::size_t n = 0; n < rows * cols; ++n) {
                    // branching on the node's arity, a constant of the enclosing template, keeps each
                    // discarded branch uninstantiated (clang rejects it when the test is the pack's size)
                    if constexpr (arity == 1) out.values[n] = Op::apply(parts[0].values[n]);
                    else if constexpr (arity == 2)
                        out.values[n] = Op::apply(parts[0].values[n], parts[1].values[n]);
                    else out.values[n] = Op::apply(parts[0].values[n], parts[1].values[n], parts[2].values[n]);
                }
            },
            e.kids);
    } else if constexpr (has_kind_v<E, kind::scale_by_inner_extent> || has_kind_v<E, kind::scale_by>) {
        double factor = 1;
        if constexpr (has_kind_v<E, kind::scale_by>) factor = e.kind.factor;
        else factor = 1.0 / std::sqrt(static_cast<double>(inner_extent(e, ctx.env)));
        out = fill(e.template kid<0>(), ctx, rows, cols);
        for (double& v : out.values) v *= factor;
    } else if constexpr (has_kind_v<E, kind::dropout>) {
        out = fill(e.template kid<0>(), ctx, rows, cols);
        drop(out, e.kind, ctx);
    } else if constexpr (has_kind_v<E, kind::lookup>) {
        const dense table = materialize(e.template kid<0>(), ctx);
        const dense index = fill(e.template kid<1>(), ctx, rows, cols);
        const double last = static_cast<double>(table.values.size() - 1);
        for (std::size_t n = 0; n < rows * cols; ++n) {
            const double at = std::nearbyint(std::fmin(std::fmax(index.values[n], 0.0), last));
            out.values[n] = table.values[static_cast<std::size_t>(at)];
        }
    } else if constexpr (is_named_node<E>::value) {
        out = fill(e.template kid<0>(), ctx, rows, cols);
    } else {
        static_assert(sizeof(E) == 0, "attnfuse: the reference has no rule for this pointwise node (the E of this instantiation)");
    }
    return out;
}

// The combining function of a pairwise score, at one pair of features.
template <class F>
double combine_at(const F& f, double q, double k) {
    if constexpr (std::is_same_v<F, pair_query_feature>) return q;
    else if constexpr (std::is_same_v<F, pair_key_feature>) return k;
    else if constexpr (std::is_same_v<F, constant>) return f.value;
    else if constexpr (has_kind_template<F, kind::elementwise>::value) {
        using Op = typename F::kind_type::op;
        return std::apply([&](const auto&... kids) { return Op::apply(combine_at(kids, q, k)...); }, f.kids);
    } else {
        static_assert(has_kind_template<F, kind::elementwise>::value,
                      "attnfuse: pairwise(w, Qf, Kf, f) needs f built from qf, kf, numbers and elementwise "
                      "operations only.");
        return 0;
    }
}

inline void softmax_rows(dense& s) {
    for (std::size_t r = 0; r < s.rows; ++r) {
        double top = -std::numeric_limits<double>::infinity();
        bool nan = false;
        for (std::size_t c = 0; c < s.cols; ++c) {
            nan = nan || std::isnan(s(r, c));
            top = std::fmax(top, s(r, c));
        }
        if (nan || top == std::numeric_limits<double>::infinity()) {
            for (std::size_t c = 0; c < s.cols; ++c) s(r, c) = std::numeric_limits<double>::quiet_NaN();
            continue;
        }
        if (top == -std::numeric_limits<double>::infinity()) {  // every key masked: weight 0, context 0
            for (std::size_t c = 0; c < s.cols; ++c) s(r, c) = 0;
            continue;
        }
        double total = 0;
        for (std::size_t c = 0; c < s.cols; ++c) total += (s(r, c) = std::exp(s(r, c) - top));
        for (std::size_t c = 0; c < s.cols; ++c) s(r, c) /= total;
    }
}

inline void hard_rows(dense& s) {
    for (std::size_t r = 0; r < s.rows; ++r) {
        bool nan = false;
        std::size_t best = s.cols;
        for (std::size_t c = 0; c < s.cols; ++c) {
            nan = nan || std::isnan(s(r, c));
            if (s(r, c) != -std::numeric_limits<double>::infinity() && (best == s.cols || s(r, c) > s(r, best)))
                best = c;  // strict >: ties keep the lowest index
        }
        for (std::size_t c = 0; c < s.cols; ++c)
            s(r, c) = nan ? std::numeric_limits<double>::quiet_NaN() : (c == best ? 1.0 : 0.0);
    }
}

template <class E, class Env>
dense materialize(const E& e, const context<Env>& ctx) {
    if constexpr (is_input_v<E>) {
        const auto& v = ctx.env.template view<E::name>();
        const std::size_t b = ctx.env.source_batch(v, ctx.b), h = ctx.env.source_head(v, ctx.h);
        dense out(v.rows, v.cols);
        for (std::size_t r = 0; r < v.rows; ++r)
            for (std::size_t c = 0; c < v.cols; ++c) out(r, c) = static_cast<double>(to_float(v.at(b, h, r, c)));
        return out;
    } else if constexpr (is_pointwise<E>::value) {
        const runtime_shape s = shape_of(e, ctx.env);
        return fill(e, ctx, s.rows, s.cols);
    } else if constexpr (has_kind_v<E, kind::product>) {
        const dense a = materialize(e.template kid<0>(), ctx), b = materialize(e.template kid<1>(), ctx);
        dense out(a.rows, b.cols);
        constexpr bool weighted_sum = plan::is_weighted_sum_v<E>;  // zero weights skip their value rows
        for (std::size_t r = 0; r < a.rows; ++r)
            for (std::size_t c = 0; c < b.cols; ++c) {
                double sum = 0;
                for (std::size_t k = 0; k < a.cols; ++k)
                    if (!weighted_sum || a(r, k) != 0) sum += a(r, k) * b(k, c);
                out(r, c) = sum;
            }
        return out;
    } else if constexpr (has_kind_v<E, kind::transpose>) {
        const dense a = materialize(e.template kid<0>(), ctx);
        dense out(a.cols, a.rows);
        for (std::size_t r = 0; r < a.rows; ++r)
            for (std::size_t c = 0; c < a.cols; ++c) out(c, r) = a(r, c);
        return out;
    } else if constexpr (has_kind_v<E, kind::concat_heads>) {
        // each head of the operand, evaluated where the heads are the bound ones
        Env per_head_env = ctx.env;
        per_head_env.heads = per_head_env.bound_heads;
        const runtime_shape s = shape_of(e.template kid<0>(), per_head_env);
        dense out(s.rows, s.cols * per_head_env.heads);
        for (std::size_t h = 0; h < per_head_env.heads; ++h) {
            const dense head = materialize(e.template kid<0>(), context<Env>{per_head_env, ctx.b, h});
            for (std::size_t r = 0; r < s.rows; ++r)
                for (std::size_t c = 0; c < s.cols; ++c) out(r, h * s.cols + c) = head(r, c);
        }
        return out;
    } else if constexpr (has_kind_v<E, kind::softmax>) {
        dense s = materialize(e.template kid<0>(), ctx);
        softmax_rows(s);
        return s;
    } else if constexpr (has_kind_v<E, kind::hard>) {
        dense s = materialize(e.template kid<0>(), ctx);
        hard_rows(s);
        return s;
    } else if constexpr (has_kind_template<E, kind::reduce_along_rows>::value) {
        using Op = typename E::kind_type::op;
        const dense a = materialize(e.template kid<0>(), ctx);
        dense out(a.rows, 1);
        for (std::size_t r = 0; r < a.rows; ++r) {
            double acc = a(r, 0);
            for (std::size_t c = 1; c < a.cols; ++c) acc = Op::apply(acc, a(r, c));
            out(r, 0) = acc;
        }
        return out;
    } else if constexpr (has_kind_template<E, kind::reduce_along_cols>::value) {
        using Op = typename E::kind_type::op;
        const dense a = materialize(e.template kid<0>(), ctx);
        dense out(1, a.cols);
        for (std::size_t c = 0; c < a.cols; ++c) {
            double acc = a(0, c);
            for (std::size_t r = 1; r < a.rows; ++r) acc = Op::apply(acc, a(r, c));
            out(0, c) = acc;
        }
        return out;
    } else if constexpr (has_kind_template<E, kind::pairwise>::value) {
        shape_of(e, ctx.env);  // throws on mismatched features
        const dense w = materialize(e.template kid<0>(), ctx), q = materialize(e.template kid<1>(), ctx),
                    k = materialize(e.template kid<2>(), ctx);
        dense out(q.cols, k.cols);
        for (std::size_t r = 0; r < q.cols; ++r)
            for (std::size_t c = 0; c < k.cols; ++c) {
                double sum = 0;
                for (std::size_t a = 0; a < q.rows; ++a) sum += w(a, 0) * combine_at(e.kind.combine, q(a, r), k(a, c));
                out(r, c) = sum;
            }
        return out;
    } else {
        static_assert(is_pointwise<E>::value, "attnfuse internal: the reference has no rule for this node");
        return {};
    }
}

template <class E> struct holds_pair_feature : std::bool_constant<std::is_same_v<E, pair_query_feature> ||
                                                                  std::is_same_v<E, pair_key_feature>> {};
template <class Kind, class... Kids>
struct holds_pair_feature<node<Kind, Kids...>> : std::bool_constant<(holds_pair_feature<Kids>::value || ...)> {};

}  // namespace detail

namespace check {
template <class E>
constexpr void pair_features_inside_pairwise() {
    static_assert(!detail::holds_pair_feature<E>::value,
                  "attnfuse: qf and kf only mean something inside the combining function of pairwise(w, Qf, Kf, f).");
}
}  // namespace check

// Evaluates `e` in double precision over every batch entry and head.
template <class E, class... Bindings>
    requires expression<E>
result evaluate(const E& e, const Bindings&... bindings) {
    attnfuse::check::no_pending_transpose<E>();
    check::pair_features_inside_pairwise<E>();
    if constexpr (holds_marker_v<E> || detail::holds_pair_feature<E>::value) return {};  // stop at the first error
    else {
    environment<Bindings...> env(bindings...);
    settle_heads(e, env);
    const runtime_shape shape = shape_of(e, env);
    result out{env.batch, env.heads, shape.rows, shape.cols, {}};
    out.values.reserve(env.batch * env.heads * shape.rows * shape.cols);
    for (std::size_t b = 0; b < env.batch; ++b)
        for (std::size_t h = 0; h < env.heads; ++h) {
            const dense m = detail::materialize(e, detail::context<environment<Bindings...>>{env, b, h});
            out.values.insert(out.values.end(), m.values.begin(), m.values.end());
        }
    return out;
    }
}

}  // namespace attnfuse::reference
