// Shared by the compiled kernels: how a run-time count of rows or panels
// picks the micro-kernel instantiation it needs.
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

namespace attnfuse::cpu::kernels {

// f(std::integral_constant<int, n>{}) for a run-time n in [1, N].
template <int N, class F>
inline void with_count(std::size_t n, const F& f) {
    [&]<int... I>(std::integer_sequence<int, I...>) {
        (void)((n == static_cast<std::size_t>(I + 1) ? (f(std::integral_constant<int, I + 1>{}), true) : false) || ...);
    }(std::make_integer_sequence<int, N>{});
}

}  // namespace attnfuse::cpu::kernels
