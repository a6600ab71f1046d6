// The backward pass of an attention whose core is the general score
// X^T W Y (Luong's multiplicative attention), for any backend, from the
// backend's own run and dot-core backward: it is the same attention over
// the projected queries P = W^T X (X^T W Y = P^T Y), so the dot-core
// backward of that attention gives dP, dY and dV, and the projection gives
// dX = W dP and dW = X dP^T, each summed over the (batch, head)s its input
// serves. The projections are products of d x n_q; nothing of n_q x n_k is
// added to what the dot-core backward keeps. Nothing here knows a backend:
// each passes its run and its backward in.
#pragma once
#include <algorithm>
#include <array>
#include <cstddef>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bind.hpp"
#include "expr.hpp"
#include "gradient.hpp"
#include "plan.hpp"
#include "run.hpp"

namespace attnfuse {

namespace plan {

// Are A, B and C three bound inputs of three names (value), and does a name
// name none of them (distinct_from)? The cores over a projection read three.
template <class A, class B, class C> struct three_distinct_inputs {
    static constexpr bool value = [] {
        if constexpr (is_input_v<A> && is_input_v<B> && is_input_v<C>)
            return !(A::name == B::name) && !(A::name == C::name) && !(B::name == C::name);
        else return false;
    }();
    static constexpr bool distinct_from(std::string_view name) {
        if constexpr (value) return name != A::name.view() && name != B::name.view() && name != C::name.view();
        else return false;
    }
};

// X, W and Y of a general core X^T*W*Y, and whether they are three bound
// inputs of three names.
template <class Core> struct general_core_parts {
    static constexpr bool distinct = false;
    static constexpr bool distinct_from(std::string_view) { return false; }
};
template <class X, class W, class Y>
struct general_core_parts<node<kind::product, node<kind::product, node<kind::transpose, X>, W>, Y>> : three_distinct_inputs<X, W, Y> {
    using queries = X;
    using weights = W;
    using keys = Y;
    static constexpr bool distinct = three_distinct_inputs<X, W, Y>::value;
};

// The same attentions over one X^T*W*Y of three bound inputs, V a fourth:
// a backend runs their backward as general_core_backward does.
template <class Core> struct distinct_general_core : std::bool_constant<general_core_parts<Core>::distinct> {
    static constexpr bool distinct_from(std::string_view name) { return general_core_parts<Core>::distinct_from(name); }
};
template <class E> using general_attention_backward = weighted_attention_over<distinct_general_core, E>;
template <class E> inline constexpr bool general_attention_backward_v = general_attention_backward<std::remove_cvref_t<E>>::value;

// f(W*Y): a pointwise activation f of the projection W*Y of two bound inputs,
// f a chain of elementwise operations each of whose operands but one (the
// chain's, carrying a gradient) is a number; the identity is a chain too.
template <class F> struct activation_chain : std::false_type {
    using weights = void;
    using inputs = void;
};
template <class W, class Y> struct activation_chain<node<kind::product, W, Y>> {
    static constexpr bool value = is_input_v<W> && is_input_v<Y> && !(W::name == Y::name);
    using weights = W;
    using inputs = Y;
};
template <class Op, class... Kids> struct activation_chain<node<kind::elementwise<Op>, Kids...>> {
private:
    static constexpr std::size_t numbers = (std::size_t{std::is_same_v<Kids, constant>} + ...);
    static constexpr std::size_t link = [] {
        constexpr std::array<bool, sizeof...(Kids)> is_number{std::is_same_v<Kids, constant>...};
        for (std::size_t a = 0; a < is_number.size(); ++a)
            if (!is_number[a]) return a;
        return is_number.size();
    }();
    using below = std::conditional_t<(link < sizeof...(Kids)), std::tuple_element_t<std::min(link, sizeof...(Kids) - 1), std::tuple<Kids...>>,
                                     constant>;

public:
    static constexpr bool value = numbers + 1 == sizeof...(Kids) && Op::carries_gradient[std::min(link, sizeof...(Kids) - 1)] &&
                                  activation_chain<below>::value;
    // the operand the chain runs through
    static constexpr std::size_t operand = link;
    using weights = typename activation_chain<below>::weights;
    using inputs = typename activation_chain<below>::inputs;
};

// X^T * f(W*Y) of three bound inputs of three names: keys that are an
// activated projection, as the query-free self score v^T tanh(W h) is.
template <class Core> struct activated_keys_core : std::false_type {
    static constexpr bool distinct_from(std::string_view) { return false; }
};
template <class X, class F>
    requires(activation_chain<F>::value)
struct activated_keys_core<node<kind::product, node<kind::transpose, X>, F>>
    : three_distinct_inputs<X, typename activation_chain<F>::weights, typename activation_chain<F>::inputs> {
    using queries = X;
    using activated = F;
    using weights = typename activation_chain<F>::weights;
    using keys = typename activation_chain<F>::inputs;
};
template <class E> using activated_keys_attention_backward = weighted_attention_over<activated_keys_core, E>;
template <class E>
inline constexpr bool activated_keys_attention_backward_v = activated_keys_attention_backward<std::remove_cvref_t<E>>::value;

// pairwise(w, X, Y, qf * kf) of three bound inputs of three names: the
// weighted dot product sum_a w_a X_aq Y_ak, which is (w % X)^T Y.
template <class Core> struct bilinear_pairwise_core : std::false_type {
    static constexpr bool distinct_from(std::string_view) { return false; }
};
template <class Combine> inline constexpr bool feature_product_v =
    std::is_same_v<Combine, node<kind::elementwise<op::multiply>, pair_query_feature, pair_key_feature>> ||
    std::is_same_v<Combine, node<kind::elementwise<op::multiply>, pair_key_feature, pair_query_feature>>;
template <class Combine, class Wt, class X, class Y>
    requires feature_product_v<Combine>
struct bilinear_pairwise_core<node<kind::pairwise<Combine>, Wt, X, Y>> : three_distinct_inputs<Wt, X, Y> {
    using weights = Wt;
    using queries = X;
    using keys = Y;
};
template <class E> using bilinear_attention_backward = weighted_attention_over<bilinear_pairwise_core, E>;
template <class E> inline constexpr bool bilinear_attention_backward_v = bilinear_attention_backward<std::remove_cvref_t<E>>::value;

}  // namespace plan

namespace detail {

// Rebuilds a tree with its node of type Target replaced by `replacement`.
template <class Target, class E, class R>
constexpr auto replace_node(const E& e, const R& replacement) {
    if constexpr (std::is_same_v<E, Target>) {
        return replacement;
    } else if constexpr (is_node_v<E>) {
        return std::apply([&](const auto&... kids) { return make_node(e.kind, replace_node<Target>(kids, replacement)...); }, e.kids);
    } else {
        return e;
    }
}

// t (batch x heads matrices) summed over the (batch, head)s that an input of
// `batch` x `heads` serves: an input of batch 1 serves every batch entry,
// one of fewer heads groups of consecutive heads.
inline tensor summed_to(tensor t, std::size_t batch, std::size_t heads) {
    if (t.batch == batch && t.heads == heads) return t;
    const std::size_t per = t.rows * t.cols, group = t.heads / heads;
    tensor out{batch, heads, t.rows, t.cols, std::vector<float>(batch * heads * per, 0.0f)};
    for (std::size_t b = 0; b < t.batch; ++b)
        for (std::size_t h = 0; h < t.heads; ++h) {
            const float* from = t.values.data() + (b * t.heads + h) * per;
            float* to = out.values.data() + ((batch == 1 ? 0 : b) * heads + h / group) * per;
            for (std::size_t m = 0; m < per; ++m) to[m] += from[m];
        }
    return out;
}

// The binding of input Name.
template <fixed_string Name, class... Bindings>
const auto& binding_named(const Bindings&... bindings) {
    constexpr std::size_t at = [] {
        constexpr std::array<bool, sizeof...(Bindings)> hits{(std::remove_cvref_t<Bindings>::name == Name)...};
        for (std::size_t n = 0; n < hits.size(); ++n)
            if (hits[n]) return n;
        return hits.size();
    }();
    static_assert(at < sizeof...(Bindings), "attnfuse: an input of the expression has no binding; bind every input the expression reads");
    return std::get<at>(std::forward_as_tuple(bindings...));
}

// The batch and heads input Name is bound with.
template <fixed_string Name, class... Bindings>
std::pair<std::size_t, std::size_t> bound_extents(const Bindings&... bindings) {
    std::pair<std::size_t, std::size_t> extents{1, 1};
    auto note = [&](const auto& b) {
        if constexpr (std::remove_cvref_t<decltype(b)>::name == Name) {
            const bound_shape s = shape_of_binding(b);
            extents = {s.batch, s.heads};
        }
    };
    (note(bindings), ...);
    return extents;
}

// What a second run adds to a backward's report.
inline void add_run(report& into, const report& run) {
    into.kernels.insert(into.kernels.end(), run.kernels.begin(), run.kernels.end());
    into.dispatches += run.dispatches;
    into.intermediate_bytes += run.intermediate_bytes;
    into.score_bytes += run.score_bytes;
    into.wall_seconds += run.wall_seconds;
    into.device_seconds += run.device_seconds;
    into.build_seconds += run.build_seconds;
    into.notes.insert(into.notes.end(), run.notes.begin(), run.notes.end());
}

// Hands each binding its gradient after a composed backward: an input in
// `owned` (one the composition replaced by a projection) its entry of
// `computed`, or none where no gradient reached the projection; any other
// input the inner backward's.
template <class... Bindings>
void hand_out_composed(backward_result& result, backward_result& inner, std::vector<named_gradient> computed,
                       std::initializer_list<std::string_view> owned) {
    auto hand_out = [&]<class B>(std::type_identity<B>) {
        const std::string name(B::name.view());
        if (std::find(owned.begin(), owned.end(), std::string_view(name)) != owned.end()) {
            auto at = std::find_if(computed.begin(), computed.end(), [&](const named_gradient& g) { return g.name == name; });
            if (at != computed.end()) result.inputs.push_back(std::move(*at));
            else result.without.push_back(name);
        } else if (inner.has(name)) {
            for (named_gradient& g : inner.inputs)
                if (g.name == name) result.inputs.push_back(std::move(g));
        } else {
            result.without.push_back(name);
        }
    };
    (hand_out(std::type_identity<std::remove_cvref_t<Bindings>>{}), ...);
}

}  // namespace detail

// The backward of a general-core attention (plan::general_attention_backward_v<E>)
// as the header says. `run(expression, bindings...)` is the backend's
// run_result-returning run; `backward(expression, bindings...)` its dot-core
// backward with the output, dO, statistics and options already given.
template <class E, class Run, class Backward, class... Bindings>
backward_result general_core_backward(const E& e, const Run& run, const Backward& backward, const Bindings&... bindings) {
    static_assert(plan::general_attention_backward_v<E>, "attnfuse internal: general_core_backward of an attention outside its form");
    using core = typename plan::attention_parts<E>::core_type;
    using general = plan::general_core_parts<core>;
    using X = typename general::queries;
    using W = typename general::weights;
    using Y = typename general::keys;
    const X x{};
    const W w{};
    const matrix<"projected_queries"> projected{};
    const matrix<"projected_queries_gradient"> projected_gradient{};

    const run_result p = run(transpose(w) * x, bindings...);  // W^T X: d_k x n_q per (batch, head)
    const auto over_projected = detail::replace_node<core>(e, transpose(projected) * Y{});
    static_assert(plan::attention_backward_v<decltype(over_projected)>,
                  "attnfuse internal: the general core over its projected queries is not a dot-core attention");
    const auto bound_projection = bind(projected, row_major(p.output.values.data(), p.output.rows, p.output.cols, p.output.batch, p.output.heads));
    backward_result inner = backward(over_projected, bound_projection, bindings...);

    backward_result result;
    result.info = std::move(inner.info);
    detail::add_run(result.info, p.info);
    result.info.intermediate_bytes += p.output.values.size() * sizeof(float);
    std::vector<named_gradient> computed;
    if (inner.has("projected_queries")) {
        const tensor& dp = inner.of("projected_queries");
        const auto bound_gradient = bind(projected_gradient, row_major(dp.values.data(), dp.rows, dp.cols, dp.batch, dp.heads));
        const run_result through_w = run(w * projected_gradient, bound_gradient, bindings...);          // W dP: d_q x n_q
        const run_result through_x = run(x * transpose(projected_gradient), bound_gradient, bindings...);  // X dP^T: d_q x d_k
        for (const report* r : {&through_w.info, &through_x.info}) detail::add_run(result.info, *r);
        const auto [x_batch, x_heads] = detail::bound_extents<X::name>(bindings...);
        const auto [w_batch, w_heads] = detail::bound_extents<W::name>(bindings...);
        computed.push_back({std::string(X::name.view()), detail::summed_to(through_w.output, x_batch, x_heads)});
        computed.push_back({std::string(W::name.view()), detail::summed_to(through_x.output, w_batch, w_heads)});
    }
    detail::hand_out_composed<Bindings...>(result, inner, std::move(computed), {X::name.view(), W::name.view()});
    return result;
}


namespace detail {

// f(z) of an activation chain (plan::activation_chain) at one value z of
// its projection, in double, from each operation's apply.
template <class F>
double activation_at(const F& f, double z);

// The operands of the chain's outermost operation at z, its chain operand's value among them.
template <class F>
auto activation_operands(const F& f, double z) {
    constexpr std::size_t link = plan::activation_chain<F>::operand;
    const double below = activation_at(std::get<link>(f.kids), z);
    return [&]<std::size_t... I>(std::index_sequence<I...>) {
        auto operand = [&]<std::size_t A>(std::integral_constant<std::size_t, A>) -> double {
            if constexpr (A == link) return below;
            else return std::get<A>(f.kids).value;
        };
        return std::array<double, sizeof...(I)>{operand(std::integral_constant<std::size_t, I>{})...};
    }(std::make_index_sequence<std::tuple_size_v<decltype(f.kids)>>{});
}

template <class F>
double activation_at(const F& f, double z) {
    if constexpr (has_kind_v<F, kind::product>) {
        return z;
    } else {
        using Op = typename F::kind_type::op;
        return std::apply([](auto... at) { return static_cast<double>(Op::apply(at...)); }, activation_operands(f, z));
    }
}

// A gradient g of f(z) passed down the chain to z, outermost operation
// first, as the reference chains it: a zero gradient stays zero through an
// infinite partial.
template <class F>
double activation_gradient(const F& f, double z, double g) {
    if constexpr (has_kind_v<F, kind::product>) {
        return g;
    } else {
        using Op = typename F::kind_type::op;
        constexpr std::size_t link = plan::activation_chain<F>::operand;
        const double partial = std::apply([](auto... at) { return static_cast<double>(Op::partials(at...)[link]); }, activation_operands(f, z));
        return activation_gradient(std::get<link>(f.kids), z, g == 0.0 ? 0.0 : g * partial);
    }
}

// A tensor bound under Name, as a row-major host view of its values.
template <fixed_string Name>
auto bound_tensor(const tensor& t) {
    return bind(matrix<Name>{}, row_major(t.values.data(), t.rows, t.cols, t.batch, t.heads));
}

}  // namespace detail

// The backward of an attention whose keys are an activated projection,
// X^T * f(W*Y) (plan::activated_keys_attention_backward_v<E>; the query-free
// self score v^T tanh(W h)), for any backend: the backend runs Z = W*Y, the
// keys f(Z) follow on the host (d_a x n_k, no more), the dot-core backward of
// the same attention over those keys gives dX, the keys' gradient dF and dV,
// dF passed down the chain gives dZ = dF % f'(Z) (as the reference chains
// it), and the projection gives dW = dZ Y^T and dY = W^T dZ, each summed over
// the (batch, head)s its input serves. Nothing of n_q x n_k is added to what
// the dot-core backward keeps.
template <class E, class Run, class Backward, class... Bindings>
backward_result activated_keys_backward(const E& e, const Run& run, const Backward& backward, const Bindings&... bindings) {
    static_assert(plan::activated_keys_attention_backward_v<E>,
                  "attnfuse internal: activated_keys_backward of an attention outside its form");
    using core = typename plan::attention_parts<E>::core_type;
    using form = plan::activated_keys_core<core>;
    using X = typename form::queries;
    using W = typename form::weights;
    using Y = typename form::keys;
    const auto& activation = plan::attention_parts<E>::core(e).template kid<1>();

    // only W and Y bound: the projection has their batch and heads, which the keys must have
    const run_result z = run(W{} * Y{}, detail::binding_named<W::name>(bindings...), detail::binding_named<Y::name>(bindings...));
    using Values = typename plan::attention_pattern<E>::values;
    const auto [values_batch, values_heads] = detail::bound_extents<Values::name>(bindings...);
    if (z.output.batch != values_batch || z.output.heads != values_heads)
        throw std::invalid_argument("attnfuse: the backward of activated keys f(" + std::string(W::name.view()) + "*" +
                                    std::string(Y::name.view()) + ") runs them as keys of batch " + std::to_string(z.output.batch) +
                                    " and heads " + std::to_string(z.output.heads) + ", those of " + std::string(W::name.view()) +
                                    " and " + std::string(Y::name.view()) + " together, and needs the values " +
                                    std::string(Values::name.view()) + " bound with the same (they have batch " +
                                    std::to_string(values_batch) + " and heads " + std::to_string(values_heads) +
                                    "); reference::backward takes any");
    tensor keys = z.output;
    for (float& key : keys.values) key = static_cast<float>(detail::activation_at(activation, key));
    const auto over_activated = detail::replace_node<core>(e, transpose(X{}) * matrix<"activated_keys">{});
    static_assert(plan::attention_backward_v<decltype(over_activated)>,
                  "attnfuse internal: the attention over its activated keys is not a dot-core attention");
    backward_result inner = backward(over_activated, detail::bound_tensor<"activated_keys">(keys), bindings...);

    backward_result result;
    result.info = std::move(inner.info);
    detail::add_run(result.info, z.info);
    result.info.intermediate_bytes += 2 * keys.values.size() * sizeof(float);  // Z and the keys
    std::vector<named_gradient> computed;
    if (inner.has("activated_keys")) {
        tensor dz = inner.of("activated_keys");
        for (std::size_t n = 0; n < dz.values.size(); ++n)
            dz.values[n] = static_cast<float>(detail::activation_gradient(activation, z.output.values[n], dz.values[n]));
        const auto bound_gradient = detail::bound_tensor<"projection_gradient">(dz);
        const matrix<"projection_gradient"> projection_gradient{};
        // only the operands bound: the products have dZ's batch and heads, not those of every input
        const auto& bound_w = detail::binding_named<W::name>(bindings...);
        const auto& bound_y = detail::binding_named<Y::name>(bindings...);
        const run_result through_y = run(projection_gradient * transpose(Y{}), bound_gradient, bound_y);  // dZ Y^T: d_a x d
        const run_result through_w = run(transpose(W{}) * projection_gradient, bound_gradient, bound_w);  // W^T dZ: d x n_k
        for (const report* r : {&through_y.info, &through_w.info}) detail::add_run(result.info, *r);
        const auto [w_batch, w_heads] = detail::bound_extents<W::name>(bindings...);
        const auto [y_batch, y_heads] = detail::bound_extents<Y::name>(bindings...);
        computed.push_back({std::string(W::name.view()), detail::summed_to(through_y.output, w_batch, w_heads)});
        computed.push_back({std::string(Y::name.view()), detail::summed_to(through_w.output, y_batch, y_heads)});
    }
    detail::hand_out_composed<Bindings...>(result, inner, std::move(computed), {W::name.view(), Y::name.view()});
    return result;
}

// The backward of a bilinear pairwise score pairwise(w, X, Y, qf * kf)
// (plan::bilinear_attention_backward_v<E>), for any backend: it is the
// dot-core attention over the weighted queries P = w % X, whose backward
// gives dP, dY and dV; then dX = w % dP and dw = the row sums of X % dP,
// each summed over the (batch, head)s its input serves.
template <class E, class Run, class Backward, class... Bindings>
backward_result bilinear_backward(const E& e, const Run& run, const Backward& backward, const Bindings&... bindings) {
    static_assert(plan::bilinear_attention_backward_v<E>, "attnfuse internal: bilinear_backward of an attention outside its form");
    using core = typename plan::attention_parts<E>::core_type;
    using form = plan::bilinear_pairwise_core<core>;
    using Wt = typename form::weights;
    using X = typename form::queries;
    using Y = typename form::keys;

    const run_result p = run(Wt{} % X{}, detail::binding_named<Wt::name>(bindings...),
                             detail::binding_named<X::name>(bindings...));  // d x n_q per (batch, head) of w and X
    const auto over_weighted = detail::replace_node<core>(e, transpose(matrix<"weighted_queries">{}) * Y{});
    static_assert(plan::attention_backward_v<decltype(over_weighted)>,
                  "attnfuse internal: the pairwise score over its weighted queries is not a dot-core attention");
    backward_result inner = backward(over_weighted, detail::bound_tensor<"weighted_queries">(p.output), bindings...);

    backward_result result;
    result.info = std::move(inner.info);
    detail::add_run(result.info, p.info);
    result.info.intermediate_bytes += p.output.values.size() * sizeof(float);
    std::vector<named_gradient> computed;
    if (inner.has("weighted_queries")) {
        const auto bound_gradient = detail::bound_tensor<"weighted_queries_gradient">(inner.of("weighted_queries"));
        const matrix<"weighted_queries_gradient"> weighted_gradient{};
        const run_result through_w = run(Wt{} % weighted_gradient, bound_gradient, detail::binding_named<Wt::name>(bindings...));  // w % dP
        const run_result products = run(X{} % weighted_gradient, bound_gradient, detail::binding_named<X::name>(bindings...));  // X % dP
        for (const report* r : {&through_w.info, &products.info}) detail::add_run(result.info, *r);
        const tensor& xp = products.output;
        tensor row_sums{xp.batch, xp.heads, xp.rows, 1, std::vector<float>(xp.batch * xp.heads * xp.rows, 0.0f)};
        for (std::size_t m = 0; m < xp.batch * xp.heads; ++m)
            for (std::size_t r = 0; r < xp.rows; ++r) {
                double sum = 0;
                for (std::size_t c = 0; c < xp.cols; ++c) sum += xp.values[(m * xp.rows + r) * xp.cols + c];
                row_sums.values[m * xp.rows + r] = static_cast<float>(sum);
            }
        const auto [x_batch, x_heads] = detail::bound_extents<X::name>(bindings...);
        const auto [w_batch, w_heads] = detail::bound_extents<Wt::name>(bindings...);
        computed.push_back({std::string(X::name.view()), detail::summed_to(through_w.output, x_batch, x_heads)});
        computed.push_back({std::string(Wt::name.view()), detail::summed_to(std::move(row_sums), w_batch, w_heads)});
    }
    detail::hand_out_composed<Bindings...>(result, inner, std::move(computed), {Wt::name.view(), X::name.view()});
    return result;
}

}  // namespace attnfuse
