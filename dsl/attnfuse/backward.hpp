// What the backends' backward passes run, and the parts of them that are
// compositions of a backend's own run and kernels (shared, so that each
// backend only passes its run and its dot-core backward in): the cores over
// a projection through the dot-core backward (the general core, activated
// keys, the bilinear pairwise score: projected_backward.hpp), a learned
// factor of a positional bias (bias_factor_backward.hpp), hard attention
// (hard_backward.hpp), an input read in several places
// (shared_input_backward.hpp), and the multi-head layer: operands that are
// linear projections, and the output projection (layer_backward.hpp).
#pragma once
#include "gradient.hpp"
#include "hard_backward.hpp"
#include "layer_backward.hpp"
#include "projected_backward.hpp"
#include "shared_input_backward.hpp"

namespace attnfuse::plan {

// Does a backend's backward run E: the dot-core attention, the general core
// through it, hard attention, or one of them over an input read in several
// places, over projected operands, or under an output projection?
template <class E>
inline constexpr bool backend_backward_v =
    kernel_backward_v<E> || projected_operands_backward_v<E> || output_projection_backward_v<E>;

// Is E's backward one of the compositions, rather than the dot-core kernels themselves?
template <class E> inline constexpr bool composed_backward_v = backend_backward_v<E> && !attention_backward_v<E>;

}  // namespace attnfuse::plan

namespace attnfuse {

// The backward of a composition (plan::composed_backward_v<E>), for output
// and d_output of the forward's shape. `run(expression, bindings...)` is the
// backend's run_result-returning run, in the mode asked for;
// `backward(expression, bindings...)` its backward with the output, dO,
// statistics and options already given; `backward_of(expression, output,
// d_output, bindings...)` its backward of another output and gradient.
template <class E, class Run, class Backward, class BackwardOf, class... Bindings>
backward_result composed_backward(const E& e, const tensor& output, const tensor& d_output, const Run& run, const Backward& backward,
                                  const BackwardOf& backward_of, const Bindings&... bindings) {
    static_assert(plan::composed_backward_v<E>, "attnfuse internal: composed_backward of an attention that is no composition");
    if constexpr (plan::output_projection_backward_v<E> && !plan::kernel_backward_v<E>)
        return output_projection_backward(e, output, d_output, run, backward_of, bindings...);
    else if constexpr (plan::projected_operands_backward_v<E>) return projected_operands_backward(e, run, backward, bindings...);
    else if constexpr (plan::hard_attention_backward_v<E>) return hard_attention_backward(e, output, d_output, run, bindings...);
    else if constexpr (plan::shared_input_backward_v<E>) return shared_input_backward(e, backward, bindings...);
    else if constexpr (plan::bias_factor_attention_backward_v<E>) return bias_factor_backward(e, output, d_output, run, backward, bindings...);
    else if constexpr (plan::general_attention_backward_v<E>) return general_core_backward(e, run, backward, bindings...);
    else if constexpr (plan::activated_keys_attention_backward_v<E>) return activated_keys_backward(e, run, backward, bindings...);
    else return bilinear_backward(e, run, backward, bindings...);
}

}  // namespace attnfuse
