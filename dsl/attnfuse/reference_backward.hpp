// The double-precision reference backward pass: the oracle of every
// backend's gradients, as reference::evaluate is of their outputs.
//
// backward(e, d_output, bindings...) is reverse-mode differentiation of
// reference::evaluate(e, bindings...): it returns the gradient of
// L = sum(d_output ∘ output) in every bound input the output depends on
// differentiably (gradient.hpp says which), each shaped as the input is
// bound. Like the forward it walks the tree with plain loops, one (batch,
// head) at a time, recomputing what it needs; it is slow on purpose and
// follows the forward node for node, so that it is obviously its
// derivative:
//   - a pointwise cluster is differentiated over the broadcast shape the
//     forward evaluates it on, through each operation's partials (ops.hpp),
//     and what the forward broadcast is summed back to its own shape;
//   - A*B gives dA = dY Bᵀ and dB = Aᵀ dY; a transpose transposes;
//   - softmax gives dS = P ∘ (dP − rowsum(dP ∘ P)): zero on masked entries
//     and on fully masked rows, NaN on rows the forward made NaN;
//   - hard passes nothing to its scores (gradient.hpp);
//   - a reduction by an operation chains that operation's partials along
//     the order the forward folded in (row_max: to the first maximum);
//   - pairwise(w, Qf, Kf, f) differentiates f at each pair of features,
//     never forming the n_q x n_k x d_a tensor;
//   - a lookup accumulates into the table entry each index rounded to;
//   - dropout multiplies by the forward's mask and 1/(1 - p).
// A zero incoming gradient passes zero, even through an infinite partial
// (a masked score's -inf), so that 0 * inf never makes a NaN.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "gradient.hpp"
#include "reference.hpp"

namespace attnfuse::reference {

// The gradient of one bound input, laid out as the input is bound: its own
// batch x heads matrices of rows x cols (a K/V shared by a group of query
// heads, or bound once for every batch entry, sums what every user of it
// sends).
struct input_gradient {
    std::string name;
    std::size_t batch = 0, heads = 0, rows = 0, cols = 0;
    std::vector<double> values;

    double at(std::size_t b, std::size_t h, std::size_t r, std::size_t c) const {
        return values[((b * heads + h) * rows + r) * cols + c];
    }
};

struct gradients {
    std::vector<input_gradient> inputs;      // in binding order: every input that gets a gradient
    std::vector<std::string> without;        // the bound inputs that get none

    bool has(std::string_view name) const {
        for (const input_gradient& g : inputs)
            if (g.name == name) return true;
        return false;
    }
    const input_gradient& of(std::string_view name) const {
        for (const input_gradient& g : inputs)
            if (g.name == name) return g;
        for (const std::string& n : without)
            if (n == name) throw std::invalid_argument(no_gradient_message(n));
        throw std::invalid_argument("attnfuse: no input named " + std::string(name) + " is bound");
    }
};

namespace detail {

using gradient_sinks = std::vector<std::vector<double>>;  // one per binding, laid out as bound

// d * partial, with a zero d passing zero whatever the partial.
inline double chained(double d, double partial) { return d == 0 ? 0.0 : d * partial; }

template <class E, class Env>
void push(const E& e, const context<Env>& ctx, const dense& dy, gradient_sinks& sinks);

// The derivative of fill(e, ctx, rows, cols): dy is rows x cols.
template <class E, class Env>
void pull(const E& e, const context<Env>& ctx, std::size_t rows, std::size_t cols, const dense& dy, gradient_sinks& sinks) {
    if constexpr (std::is_same_v<E, constant> || std::is_same_v<E, query_index> || std::is_same_v<E, key_index>) {
        return;
    } else if constexpr (!is_pointwise<E>::value) {
        // fill repeated the node's whole value over the cluster: sum back what it repeated
        const runtime_shape s = shape_of(e, ctx.env);
        dense d(s.rows, s.cols);
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < cols; ++c) d(s.rows == 1 ? 0 : r, s.cols == 1 ? 0 : c) += dy(r, c);
        push(e, ctx, d, sinks);
    } else if constexpr (has_kind_template<E, kind::elementwise>::value) {
        using Op = typename E::kind_type::op;
        constexpr std::size_t arity = std::tuple_size_v<decltype(e.kids)>;
        std::vector<dense> parts;
        std::apply([&](const auto&... kids) { (parts.push_back(fill(kids, ctx, rows, cols)), ...); }, e.kids);
        auto partial_of = [&](std::size_t n) {
            if constexpr (arity == 1) return Op::partials(parts[0].values[n]);
            else if constexpr (arity == 2) return Op::partials(parts[0].values[n], parts[1].values[n]);
            else return Op::partials(parts[0].values[n], parts[1].values[n], parts[2].values[n]);
        };
        auto each_kid = [&]<std::size_t... I>(std::index_sequence<I...>) {
            auto one = [&]<std::size_t K>(std::integral_constant<std::size_t, K>) {
                if constexpr (Op::carries_gradient[K]) {
                    dense d(rows, cols);
                    for (std::size_t n = 0; n < rows * cols; ++n) d.values[n] = chained(dy.values[n], partial_of(n)[K]);
                    pull(e.template kid<K>(), ctx, rows, cols, d, sinks);
                }
            };
            (one(std::integral_constant<std::size_t, I>{}), ...);
        };
        each_kid(std::make_index_sequence<arity>{});
    } else if constexpr (has_kind_v<E, kind::scale_by_inner_extent> || has_kind_v<E, kind::scale_by>) {
        double factor = 1;
        if constexpr (has_kind_v<E, kind::scale_by>) factor = e.kind.factor;
        else factor = 1.0 / std::sqrt(static_cast<double>(inner_extent(e, ctx.env)));
        dense d = dy;
        for (double& v : d.values) v *= factor;
        pull(e.template kid<0>(), ctx, rows, cols, d, sinks);
    } else if constexpr (has_kind_v<E, kind::dropout>) {
        dense d = dy;
        drop(d, e.kind, ctx);  // the forward's mask and factor
        pull(e.template kid<0>(), ctx, rows, cols, d, sinks);
    } else if constexpr (has_kind_v<E, kind::lookup>) {
        const dense table = materialize(e.template kid<0>(), ctx);
        const dense index = fill(e.template kid<1>(), ctx, rows, cols);
        dense d_table(table.rows, table.cols);
        const double last = static_cast<double>(table.values.size() - 1);
        for (std::size_t n = 0; n < rows * cols; ++n) {
            const double at = std::nearbyint(std::fmin(std::fmax(index.values[n], 0.0), last));
            d_table.values[static_cast<std::size_t>(at)] += dy.values[n];
        }
        push(e.template kid<0>(), ctx, d_table, sinks);
    } else if constexpr (is_named_node<E>::value) {
        pull(e.template kid<0>(), ctx, rows, cols, dy, sinks);
    } else {
        static_assert(sizeof(E) == 0, "attnfuse: the reference backward has no rule for this pointwise node (the E of this instantiation)");
    }
}

// A combining function's value and its partials in the query and the key feature.
struct combined {
    double value = 0, d_query = 0, d_key = 0;
};
template <class F>
combined combine_with_partials(const F& f, double q, double k) {
    if constexpr (std::is_same_v<F, pair_query_feature>) return {q, 1, 0};
    else if constexpr (std::is_same_v<F, pair_key_feature>) return {k, 0, 1};
    else if constexpr (std::is_same_v<F, constant>) return {f.value, 0, 0};
    else {
        using Op = typename F::kind_type::op;
        return std::apply(
            [&](const auto&... kids) {
                const std::array<combined, sizeof...(kids)> parts{combine_with_partials(kids, q, k)...};
                return [&]<std::size_t... I>(std::index_sequence<I...>) {
                    const auto partials = Op::partials(parts[I].value...);
                    combined out{Op::apply(parts[I].value...), 0, 0};
                    // an operand the operation carries no gradient to (detach's, a comparison's) adds nothing,
                    // not 0 * inf
                    auto pull = [&]<std::size_t A>(std::integral_constant<std::size_t, A>) {
                        if constexpr (Op::carries_gradient[A]) {
                            out.d_query += chained(parts[A].d_query, partials[A]);
                            out.d_key += chained(parts[A].d_key, partials[A]);
                        }
                    };
                    (pull(std::integral_constant<std::size_t, I>{}), ...);
                    return out;
                }(std::make_index_sequence<sizeof...(kids)>{});
            },
            f.kids);
    }
}

template <class E, class Env>
void push(const E& e, const context<Env>& ctx, const dense& dy, gradient_sinks& sinks) {
    if constexpr (is_input_v<E>) {
        constexpr std::size_t index = attnfuse::detail::binding_index<E::name, std::remove_cvref_t<decltype(ctx.env.bindings)>>();
        const auto& v = ctx.env.template view<E::name>();
        const std::size_t b = ctx.env.source_batch(v, ctx.b), h = ctx.env.source_head(v, ctx.h);
        std::vector<double>& sink = sinks[index];
        for (std::size_t r = 0; r < v.rows; ++r)
            for (std::size_t c = 0; c < v.cols; ++c) sink[((b * v.heads + h) * v.rows + r) * v.cols + c] += dy(r, c);
    } else if constexpr (is_pointwise<E>::value) {
        const runtime_shape s = shape_of(e, ctx.env);
        pull(e, ctx, s.rows, s.cols, dy, sinks);
    } else if constexpr (has_kind_v<E, kind::product>) {
        const dense a = materialize(e.template kid<0>(), ctx), b = materialize(e.template kid<1>(), ctx);
        dense da(a.rows, a.cols), db(b.rows, b.cols);
        for (std::size_t r = 0; r < a.rows; ++r)
            for (std::size_t c = 0; c < b.cols; ++c) {
                const double d = dy(r, c);
                if (d == 0) continue;
                for (std::size_t k = 0; k < a.cols; ++k) {
                    da(r, k) += chained(d, b(k, c));
                    db(k, c) += chained(d, a(r, k));
                }
            }
        push(e.template kid<0>(), ctx, da, sinks);
        push(e.template kid<1>(), ctx, db, sinks);
    } else if constexpr (has_kind_v<E, kind::transpose>) {
        dense d(dy.cols, dy.rows);
        for (std::size_t r = 0; r < dy.rows; ++r)
            for (std::size_t c = 0; c < dy.cols; ++c) d(c, r) = dy(r, c);
        push(e.template kid<0>(), ctx, d, sinks);
    } else if constexpr (has_kind_v<E, kind::concat_heads>) {
        Env per_head_env = ctx.env;
        per_head_env.heads = per_head_env.bound_heads;
        const runtime_shape s = shape_of(e.template kid<0>(), per_head_env);
        for (std::size_t h = 0; h < per_head_env.heads; ++h) {
            dense d(s.rows, s.cols);
            for (std::size_t r = 0; r < s.rows; ++r)
                for (std::size_t c = 0; c < s.cols; ++c) d(r, c) = dy(r, h * s.cols + c);
            push(e.template kid<0>(), context<Env>{per_head_env, ctx.b, h}, d, sinks);
        }
    } else if constexpr (has_kind_v<E, kind::softmax>) {
        dense p = materialize(e.template kid<0>(), ctx);
        softmax_rows(p);
        dense d(p.rows, p.cols);
        for (std::size_t r = 0; r < p.rows; ++r) {
            double weighted = 0;  // rowsum(dP ∘ P)
            for (std::size_t c = 0; c < p.cols; ++c) weighted += chained(dy(r, c), p(r, c));
            for (std::size_t c = 0; c < p.cols; ++c) d(r, c) = chained(p(r, c), dy(r, c) - weighted);
        }
        push(e.template kid<0>(), ctx, d, sinks);
    } else if constexpr (has_kind_v<E, kind::hard>) {
        return;  // piecewise constant in its scores (gradient.hpp)
    } else if constexpr (has_kind_template<E, kind::reduce_along_rows>::value ||
                         has_kind_template<E, kind::reduce_along_cols>::value) {
        using Op = typename E::kind_type::op;
        constexpr bool along_rows = has_kind_template<E, kind::reduce_along_rows>::value;
        const dense a = materialize(e.template kid<0>(), ctx);
        dense da(a.rows, a.cols);
        const std::size_t lines = along_rows ? a.rows : a.cols, length = along_rows ? a.cols : a.rows;
        // element n of line `line`: along a row when reducing rows, down a column otherwise
        auto offset = [&](std::size_t line, std::size_t n) { return along_rows ? line * a.cols + n : n * a.cols + line; };
        for (std::size_t line = 0; line < lines; ++line) {
            // the forward's fold, acc_n = Op(acc_{n-1}, a_n), replayed, then its partials chained backwards
            std::vector<double> acc(length);
            acc[0] = a.values[offset(line, 0)];
            for (std::size_t n = 1; n < length; ++n) acc[n] = Op::apply(acc[n - 1], a.values[offset(line, n)]);
            double g = along_rows ? dy(line, 0) : dy(0, line);
            for (std::size_t n = length - 1; n >= 1; --n) {
                const auto partials = Op::partials(acc[n - 1], a.values[offset(line, n)]);
                da.values[offset(line, n)] = chained(g, partials[1]);
                g = chained(g, partials[0]);
            }
            da.values[offset(line, 0)] = g;
        }
        push(e.template kid<0>(), ctx, da, sinks);
    } else if constexpr (has_kind_template<E, kind::pairwise>::value) {
        const dense w = materialize(e.template kid<0>(), ctx), q = materialize(e.template kid<1>(), ctx),
                    k = materialize(e.template kid<2>(), ctx);
        dense dw(w.rows, w.cols), dq(q.rows, q.cols), dk(k.rows, k.cols);
        for (std::size_t r = 0; r < q.cols; ++r)
            for (std::size_t c = 0; c < k.cols; ++c) {
                const double d = dy(r, c);
                if (d == 0) continue;
                for (std::size_t f = 0; f < q.rows; ++f) {
                    const combined at = combine_with_partials(e.kind.combine, q(f, r), k(f, c));
                    dw(f, 0) += chained(d, at.value);
                    dq(f, r) += chained(chained(d, w(f, 0)), at.d_query);
                    dk(f, c) += chained(chained(d, w(f, 0)), at.d_key);
                }
            }
        push(e.template kid<0>(), ctx, dw, sinks);
        push(e.template kid<1>(), ctx, dq, sinks);
        push(e.template kid<2>(), ctx, dk, sinks);
    } else {
        static_assert(is_pointwise<E>::value, "attnfuse internal: the reference backward has no rule for this node");
    }
}

}  // namespace detail

// The gradient of sum(d_output ∘ evaluate(e, bindings...)) in every bound
// input that gets one; d_output has the shape evaluate gives, else it is a
// shape_error naming both shapes.
template <class E, class... Bindings>
    requires expression<E>
gradients backward(const E& e, const result& d_output, const Bindings&... bindings) {
    attnfuse::check::no_pending_transpose<E>();
    check::pair_features_inside_pairwise<E>();
    if constexpr (holds_marker_v<E> || detail::holds_pair_feature<E>::value) return {};  // stop at the first error
    else {
        using env_type = environment<Bindings...>;
        env_type env(bindings...);
        settle_heads(e, env);
        const runtime_shape shape = shape_of(e, env);
        const auto extents = [](std::size_t b, std::size_t h, std::size_t r, std::size_t c) {
            return std::to_string(b) + " batch x " + std::to_string(h) + " heads of " + shape_to_string(r, c);
        };
        if (d_output.batch != env.batch || d_output.heads != env.heads || d_output.rows != shape.rows ||
            d_output.cols != shape.cols || d_output.values.size() != env.batch * env.heads * shape.rows * shape.cols)
            throw shape_error("d_output: the expression gives " + extents(env.batch, env.heads, shape.rows, shape.cols) +
                              " but d_output is " + extents(d_output.batch, d_output.heads, d_output.rows, d_output.cols) +
                              "; give the output gradient the output's shape");
        detail::gradient_sinks sinks;
        std::apply([&](const auto&... b) { (sinks.emplace_back(b.view.batch * b.view.heads * b.view.rows * b.view.cols, 0.0), ...); },
                   env.bindings);
        for (std::size_t b = 0; b < env.batch; ++b)
            for (std::size_t h = 0; h < env.heads; ++h) {
                dense dy(shape.rows, shape.cols);
                const std::size_t offset = (b * env.heads + h) * shape.rows * shape.cols;
                std::copy_n(d_output.values.begin() + static_cast<std::ptrdiff_t>(offset), shape.rows * shape.cols, dy.values.begin());
                detail::push(e, detail::context<env_type>{env, b, h}, dy, sinks);
            }
        gradients out;
        std::size_t index = 0;
        auto collect = [&]<class B>(const B& b) {
            std::vector<double>& sink = sinks[index++];
            if (attnfuse::detail::binding_index<B::name, std::tuple<Bindings...>>() != index - 1) return;  // a name bound twice: the first serves
            if constexpr (gets_gradient_v<E, B::name>)
                out.inputs.push_back({std::string(B::name.view()), b.view.batch, b.view.heads, b.view.rows, b.view.cols, std::move(sink)});
            else out.without.emplace_back(B::name.view());
        };
        std::apply([&](const auto&... b) { (collect(b), ...); }, env.bindings);
        return out;
    }
}

}  // namespace attnfuse::reference
