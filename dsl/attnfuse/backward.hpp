// What the backends' backward passes run, and the parts of them that are
// compositions of a backend's own run and kernels (shared, so that each
// backend only passes its run in): the general core through the dot-core
// backward (projected_backward.hpp), hard attention (hard_backward.hpp), and
// an input read in several places (shared_input_backward.hpp).
#pragma once
#include "gradient.hpp"
#include "hard_backward.hpp"
#include "projected_backward.hpp"
#include "shared_input_backward.hpp"

namespace attnfuse::plan {

// Does a backend's backward run E: the dot-core attention, the general core
// through it, hard attention, or one of them over an input read in several
// places?
template <class E> inline constexpr bool backend_backward_v = direct_backward_v<E> || shared_input_backward_v<E>;

}  // namespace attnfuse::plan
