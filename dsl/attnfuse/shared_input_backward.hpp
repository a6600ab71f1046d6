// The backward pass of an attention that reads one input in several places
// (self-attention over one sequence h: softmax(h^T W h) * transpose(h)),
// for any backend, from the backend's own backward: every place an input is
// read becomes an input of its own, bound to the same memory (the values
// transpose(h) to a transposed view of it), the backend differentiates that
// attention, and each input's gradient is the sum over its places, the
// values' transposed back. Nothing is copied but the gradients; nothing here
// knows a backend.
#pragma once
#include <array>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bind.hpp"
#include "bias_factor_backward.hpp"
#include "expr.hpp"
#include "gradient.hpp"
#include "hard_backward.hpp"
#include "plan.hpp"
#include "projected_backward.hpp"
#include "run.hpp"

namespace attnfuse {

namespace plan {

// The backward a backend runs as such: the dot-core attention, the cores
// over a projection through it (general, activated keys, bilinear
// pairwise), a learned factor of a positional bias over any of them, hard
// attention.
template <class E>
inline constexpr bool direct_backward_v = attention_backward_v<E> || general_attention_backward_v<E> ||
                                          activated_keys_attention_backward_v<E> || bilinear_attention_backward_v<E> ||
                                          bias_factor_attention_backward_v<E> || hard_attention_backward_v<E>;

}  // namespace plan

namespace detail {

// Name `@` K: the input read at place K of a tree (K < 1000).
template <fixed_string Name, std::size_t K>
constexpr auto place_name() {
    static_assert(K < 1000, "attnfuse: an expression reads inputs in at most 1000 places");
    constexpr std::size_t digits = K < 10 ? 1 : K < 100 ? 2 : 3;
    char text[Name.size() + 1 + digits + 1]{};
    for (std::size_t n = 0; n < Name.size(); ++n) text[n] = Name.chars[n];
    text[Name.size()] = '@';
    std::size_t k = K;
    for (std::size_t n = digits; n-- > 0; k /= 10) text[Name.size() + 1 + n] = static_cast<char>('0' + k % 10);
    return fixed_string<sizeof text>(text);
}

// How many inputs a tree reads (each place counted).
template <class E> struct places : std::integral_constant<std::size_t, 0> {};
template <fixed_string N, std::size_t R, std::size_t C, class El>
struct places<matrix<N, R, C, El>> : std::integral_constant<std::size_t, 1> {};
template <class Kind, class... Kids>
struct places<node<Kind, Kids...>> : std::integral_constant<std::size_t, (places<Kids>::value + ... + 0)> {};

// The tree with the input at place Start + k renamed place_name<its name, Start + k>.
template <std::size_t Start, class E>
constexpr auto each_place_named(const E& e) {
    if constexpr (is_input_v<E>) {
        return matrix<place_name<E::name, Start>(), E::rows, E::cols, typename E::element_type>{};
    } else if constexpr (is_node_v<E>) {
        return std::apply(
            [&](const auto&... kids) {
                constexpr std::size_t count = sizeof...(kids);
                constexpr std::array<std::size_t, count + 1> first = [] {
                    std::array<std::size_t, count + 1> at{};
                    std::size_t n = 0, k = 0;
                    ((at[k++] = n, n += places<std::remove_cvref_t<decltype(kids)>>::value), ...);
                    at[count] = n;
                    return at;
                }();
                return [&]<std::size_t... I>(std::index_sequence<I...>) {
                    return make_node(e.kind, each_place_named<Start + first[I]>(std::get<I>(e.kids))...);
                }(std::make_index_sequence<count>{});
            },
            e.kids);
    } else {
        return e;
    }
}

// The input type at place K of E, in the same order.
template <std::size_t K, class E> struct input_at_place;
template <std::size_t K, fixed_string N, std::size_t R, std::size_t C, class El>
struct input_at_place<K, matrix<N, R, C, El>> {
    using type = matrix<N, R, C, El>;
};
template <std::size_t K, class Kind, class First, class... Rest>
struct input_at_place<K, node<Kind, First, Rest...>> {
    using type = typename std::conditional_t<(K < places<First>::value), input_at_place<K, First>,
                                             input_at_place<K - places<First>::value, node<Kind, Rest...>>>::type;
};

// softmax(...) * transpose(X): values read transposed from an input.
template <class E> struct transposed_values : std::false_type {};
template <class N, class X>
struct transposed_values<node<kind::product, N, node<kind::transpose, X>>> : std::bool_constant<is_input_v<X>> {};

// E with every place its own input: the values of transposed_values an input
// of their own too, of the transposed shape, at the last place.
template <class E>
constexpr auto separated(const E& e) {
    if constexpr (transposed_values<E>::value) {
        using X = std::remove_cvref_t<decltype(e.template kid<1>().template kid<0>())>;
        constexpr std::size_t last = places<std::remove_cvref_t<decltype(e.template kid<0>())>>::value;
        return make_node(kind::product{}, each_place_named<0>(e.template kid<0>()),
                         matrix<place_name<X::name, last>(), X::cols, X::rows, typename X::element_type>{});
    } else {
        return each_place_named<0>(e);
    }
}
template <class E> using separated_t = decltype(separated(std::declval<const E&>()));

// Does some input have two places, or are the values read transposed?
template <class E, std::size_t... K>
constexpr bool some_input_shared(std::index_sequence<K...>) {
    if constexpr (sizeof...(K) == 0) return false;
    else {
        constexpr std::array<std::string_view, sizeof...(K)> names{input_at_place<K, E>::type::name.view()...};
        for (std::size_t a = 0; a < names.size(); ++a)
            for (std::size_t b = a + 1; b < names.size(); ++b)
                if (names[a] == names[b]) return true;
        return false;
    }
}
template <class E> constexpr bool reads_an_input_twice() {
    return transposed_values<E>::value || some_input_shared<E>(std::make_index_sequence<places<E>::value>{});
}

// A binding of the same memory under the name of place `Renamed`, the view
// transposed if asked.
template <class Renamed, bool Transposed, class B>
auto bound_again(const B& b) {
    constexpr auto name = Renamed::name;
    if constexpr (requires { b.view.batch; }) {
        auto view = b.view;
        if constexpr (Transposed) {
            std::swap(view.rows, view.cols);
            std::swap(view.row_stride, view.col_stride);
        }
        return binding<name, std::remove_cvref_t<decltype(*view.data)>>{view, b.owned, b.widened_from};
    } else {
        if constexpr (Transposed)
            throw std::invalid_argument("attnfuse: the backward of an attention whose values are transpose(" +
                                        std::string(B::name.view()) + ") reads them through a transposed view; bind " +
                                        std::string(B::name.view()) + " in host memory for it");
        return b.template renamed<name>();
    }
}

// t (rows x cols per matrix) transposed, each matrix of it.
inline tensor transposed(const tensor& t) {
    tensor out{t.batch, t.heads, t.cols, t.rows, std::vector<float>(t.values.size())};
    const std::size_t per = t.rows * t.cols;
    for (std::size_t m = 0; m < t.batch * t.heads; ++m)
        for (std::size_t r = 0; r < t.rows; ++r)
            for (std::size_t c = 0; c < t.cols; ++c) out.values[m * per + c * t.rows + r] = t.values[m * per + r * t.cols + c];
    return out;
}

}  // namespace detail

namespace plan {

// An attention that reads some input in two places, or its values
// transposed from an input, whose every place made an input of its own is
// one a backend differentiates as such.
template <class E> struct shared_input_backward {
    static constexpr bool value = [] {
        if constexpr (!is_node_v<E> || direct_backward_v<E>) return false;
        else if constexpr (!detail::reads_an_input_twice<E>()) return false;
        else return direct_backward_v<detail::separated_t<E>>;
    }();
};
template <class E> inline constexpr bool shared_input_backward_v = shared_input_backward<std::remove_cvref_t<E>>::value;

}  // namespace plan

// The backward of an attention of plan::shared_input_backward_v<E> as the
// header says. `backward(expression, bindings...)` is the backend's backward
// with the output, dO, statistics and options already given.
template <class E, class Backward, class... Bindings>
backward_result shared_input_backward(const E& e, const Backward& backward, const Bindings&... bindings) {
    static_assert(plan::shared_input_backward_v<E>, "attnfuse internal: shared_input_backward of an attention outside its form");
    const auto apart = detail::separated(e);
    using Apart = std::remove_cvref_t<decltype(apart)>;
    constexpr std::size_t count = detail::places<Apart>::value;
    constexpr bool values_transposed = detail::transposed_values<E>::value;
    // the original input at each place (the transposed values last)
    auto original_at = []<std::size_t K>(std::integral_constant<std::size_t, K>) {
        if constexpr (values_transposed && K + 1 == count)
            return std::type_identity<std::remove_cvref_t<decltype(std::declval<const E&>().template kid<1>().template kid<0>())>>{};
        else return std::type_identity<typename detail::input_at_place<K, E>::type>{};
    };
    backward_result inner = [&]<std::size_t... K>(std::index_sequence<K...>) {
        return backward(apart, detail::bound_again<typename detail::input_at_place<K, Apart>::type, values_transposed && K + 1 == count>(
                                   detail::binding_named<decltype(original_at(std::integral_constant<std::size_t, K>{}))::type::name>(
                                       bindings...))...);
    }(std::make_index_sequence<count>{});

    backward_result result;
    result.info = std::move(inner.info);
    auto hand_out = [&]<class B>(std::type_identity<B>) {
        const std::string name(B::name.view());
        tensor sum;
        bool any = false;
        [&]<std::size_t... K>(std::index_sequence<K...>) {
            auto add = [&]<std::size_t P>(std::integral_constant<std::size_t, P>) {
                using Original = typename decltype(original_at(std::integral_constant<std::size_t, P>{}))::type;
                using Place = typename detail::input_at_place<P, Apart>::type;
                if constexpr (Original::name == B::name) {
                    if (!inner.has(Place::name.view())) return;
                    tensor g = values_transposed && P + 1 == count ? detail::transposed(inner.of(Place::name.view()))
                                                                   : inner.of(Place::name.view());
                    if (!any) sum = std::move(g);
                    else
                        for (std::size_t n = 0; n < sum.values.size(); ++n) sum.values[n] += g.values[n];
                    any = true;
                }
            };
            (add(std::integral_constant<std::size_t, K>{}), ...);
        }(std::make_index_sequence<count>{});
        if (any) result.inputs.push_back({name, std::move(sum)});
        else result.without.push_back(name);
    };
    (hand_out(std::type_identity<std::remove_cvref_t<Bindings>>{}), ...);
    return result;
}

}  // namespace attnfuse
