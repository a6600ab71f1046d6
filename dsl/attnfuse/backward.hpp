// What the backends' backward passes run, and the parts of them that are
// compositions of a backend's own run and kernels (shared, so that each
// backend only passes its run in): the general core through the dot-core
// backward (projected_backward.hpp), and hard attention
// (hard_backward.hpp).
#pragma once
#include "gradient.hpp"
#include "hard_backward.hpp"
#include "projected_backward.hpp"

namespace attnfuse::plan {

// Does a backend's backward run E: the dot-core attention, the general core
// through it, or hard attention?
template <class E>
inline constexpr bool backend_backward_v = attention_backward_v<E> || general_attention_backward_v<E> || hard_attention_backward_v<E>;

}  // namespace attnfuse::plan
