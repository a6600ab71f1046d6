// The backward pass of hard attention hard(score)*V, for any backend, from
// the backend's own run. Its weights are one-hot and piecewise constant in
// the scores (gradient.hpp), so the score and everything under it get no
// gradient, and V gets dV = Aᵀ dO: each query row's dO added to the value
// row of the key it chose. Which key that is comes from the same
// attention over a column of key numbers, hard(score)*J with J_t = t + 1,
// run by the backend as the forward runs (fused: nothing of n_q x n_k
// stored; unfused: the backend's kernels per operation): the same scores and
// the same rule (ties to the lowest key, masks), so it chooses the forward's
// key. (A backend may pick another kernel for one value column than for
// d_v, whose scores may round differently: scores nearer than their
// rounding may then tie differently.) Its output
// is t + 1 for the chosen key, 0 for a row every mask removes (no key, no
// gradient) and NaN for a row with a NaN score, whose weights are NaN: every
// value row then gets NaN where dO is not 0, as the reference's product
// rule gives. Nothing here knows a backend: each passes its run in.
#pragma once
#include <chrono>
#include <cmath>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "bind.hpp"
#include "expr.hpp"
#include "gradient.hpp"
#include "plan.hpp"
#include "run.hpp"

namespace attnfuse {

namespace plan {

// hard(score)*V with V a bound input: any score, since none of it gets a gradient.
template <class E, bool = attention_pattern<E>::matches> struct hard_attention_backward : std::false_type {};
template <class E>
struct hard_attention_backward<E, true>
    : std::bool_constant<attention_parts<E>::hard && is_input_v<typename attention_pattern<E>::values>> {};
template <class E> inline constexpr bool hard_attention_backward_v = hard_attention_backward<std::remove_cvref_t<E>>::value;

}  // namespace plan

// The gradients of hard(score)*V (plan::hard_attention_backward_v<E>) for
// output and d_output of the forward's shape: dV laid out as V is bound,
// every other input none. `run(expression, bindings...)` is the backend's
// run_result-returning run, in the mode asked for.
template <class E, class Run, class... Bindings>
backward_result hard_attention_backward(const E& e, const tensor& output, const tensor& d_output, const Run& run,
                                        const Bindings&... bindings) {
    static_assert(plan::hard_attention_backward_v<E>, "attnfuse internal: hard_attention_backward of an attention outside its form");
    using parts = plan::attention_parts<E>;
    using V = std::remove_cvref_t<decltype(parts::values(e))>;
    const auto start = std::chrono::steady_clock::now();

    static_assert((... || (std::remove_cvref_t<Bindings>::name == V::name)),
                  "attnfuse: the values V of hard(score)*V have no binding; bind every input the expression reads");
    bound_shape values;
    auto note = [&](const auto& b) {
        if constexpr (std::remove_cvref_t<decltype(b)>::name == V::name) values = shape_of_binding(b);
    };
    (note(bindings), ...);
    const std::size_t v_batch = values.batch, v_heads = values.heads, n_k = values.rows, d_v = values.cols;
    if (n_k >= (std::size_t{1} << 24))
        throw std::invalid_argument("attnfuse: the backward of hard attention numbers its keys in f32, exact below 2^24 keys; " +
                                    std::string(V::name.view()) + " has " + std::to_string(n_k));

    // which key each query row chose: the same attention over the key numbers 1..n_k
    // (one column, read by every (batch, head) V is bound for, so that the output has the forward's batch and heads)
    std::vector<float> numbers(n_k);
    for (std::size_t t = 0; t < n_k; ++t) numbers[t] = static_cast<float>(t + 1);
    tensor_view<float> numbers_view = row_major(numbers.data(), n_k, 1);
    numbers_view.batch = v_batch, numbers_view.heads = v_heads, numbers_view.batch_stride = numbers_view.head_stride = 0;
    const matrix<"hard_key_numbers"> key_numbers{};
    const run_result chosen =
        run(make_node(kind::product{}, parts::weights(e), key_numbers), bind(key_numbers, numbers_view), bindings...);
    const tensor& picks = chosen.output;
    const std::size_t batch = picks.batch, heads = picks.heads, n_q = picks.rows;
    check_backward_operands(output, d_output, batch, heads, runtime_shape{n_q, d_v});

    tensor dv{v_batch, v_heads, n_k, d_v, std::vector<float>(v_batch * v_heads * n_k * d_v, 0.0f)};
    if (v_heads == 0 || heads % v_heads != 0 || (v_batch != 1 && v_batch != batch))
        throw std::logic_error("attnfuse internal: the backward of hard attention has " + std::to_string(batch) + " x " +
                               std::to_string(heads) + " rows of picks for values of " + std::to_string(v_batch) + " x " +
                               std::to_string(v_heads));
    const std::size_t group = heads / v_heads;
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t h = 0; h < heads; ++h) {
            float* to = dv.values.data() + ((v_batch == 1 ? 0 : b) * v_heads + h / group) * n_k * d_v;
            for (std::size_t i = 0; i < n_q; ++i) {
                const float pick = picks.values[(b * heads + h) * n_q + i];
                const float* from = d_output.values.data() + ((b * heads + h) * n_q + i) * d_v;
                if (std::isnan(pick)) {
                    for (std::size_t t = 0; t < n_k; ++t)
                        for (std::size_t c = 0; c < d_v; ++c)
                            if (from[c] != 0.0f) to[t * d_v + c] = std::numeric_limits<float>::quiet_NaN();
                } else if (pick != 0.0f) {
                    if (!(pick >= 1.0f && pick <= static_cast<float>(n_k) && pick == std::floor(pick)))
                        throw std::logic_error("attnfuse internal: the backward of hard attention read key number " + std::to_string(pick) +
                                               " for a row; the keys are 1.." + std::to_string(n_k));
                    const auto t = static_cast<std::size_t>(pick) - 1;
                    for (std::size_t c = 0; c < d_v; ++c) to[t * d_v + c] += from[c];
                }
            }
        }

    backward_result result;
    result.info = chosen.info;
    result.info.kernels.push_back("backward of hard attention: dO of each row added to the value row of the key it chose");
    result.info.intermediate_bytes += (numbers.size() + picks.values.size()) * sizeof(float);
    result.info.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    auto hand_out = [&]<class B>(std::type_identity<B>) {
        const std::string name(B::name.view());
        if (name == V::name.view() && gets_gradient_v<E, V::name>) result.inputs.push_back({name, std::move(dv)});
        else result.without.push_back(name);
    };
    (hand_out(std::type_identity<Bindings>{}), ...);
    return result;
}

}  // namespace attnfuse
