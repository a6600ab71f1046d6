// The attentions both backends' backward tests run with a learned factor of
// a positional bias (bias_factor_backward.hpp): ALiBi's slopes per head over
// grouped-query keys, a factor per (batch, head) and query row reached
// through a product, scale(., c) and a quotient under a window, the general
// core under a negated bias, one slope for every head in a where's other
// branch, and the slopes or a bias table read under detach (no gradient for
// them; Q, K and V through the dot-core backward); and a factor of one value
// per key, which is refused.
#pragma once
#include <cstddef>
#include <vector>

#include <attnfuse/dsl.hpp>

#include "projected_core_inputs.hpp"

namespace attnfuse::testing {

// check(name, expression, bindings...) for each attention, at n_q x n_k.
template <class Random, class Check>
void for_each_bias_factor_case(std::size_t n_q, std::size_t n_k, const Random& random, const Check& check) {
    const matrix<"Q"> Q;
    const matrix<"K"> K;
    const matrix<"V"> V;
    const matrix<"W"> W;
    const matrix<"m"> m;  // one slope per head
    const matrix<"r"> r;  // one factor per (batch, head) and query row
    const projected_core_inputs in(n_q, n_k, random);
    const std::size_t batch = projected_core_inputs::batch, heads = projected_core_inputs::heads;
    const std::vector<float> slopes{0.5f, 0.125f}, rows = random(batch * heads * n_q, 71);
    const auto bm = bind(m, row_major(slopes.data(), 1, 1, 1, heads));
    const auto br = bind(r, row_major(rows.data(), n_q, 1, batch, heads));
    check("ALiBi, GQA keys", softmax(mask(scale(Q^T*K) - m * (i - j), causal))*V, in.bind_q(), in.bind_k(), in.bind_v(), bm);
    check("a factor per query row, windowed", softmax(mask(scale(Q^T*K) + scale((j - i) * r, 0.5) / 4, window(9)))*V, in.bind_q(),
          in.bind_k(), in.bind_v(), br);
    check("general core, negated bias", softmax(-(m * (i - j)) + (Q^T*W*K))*V, in.bind_q_deep(), in.bind_projection(), in.bind_k(),
          in.bind_v(), bm);
    // the path in a where's other branch and through a product by a number; one slope for every head
    const float one_slope = 0.3f;
    const auto bs = bind(matrix<"s">{}, row_major(&one_slope, 1, 1));
    check("one slope, where's other branch", softmax(where(j > i, minus_infinity, scale(Q^T*K) - (matrix<"s">{} * (i - j)) * 0.5))*V,
          in.bind_q(), in.bind_k(), in.bind_v(), bs);
    // a fixed table read under detach: the dot-core backward, no gradient for it
    const std::vector<float> table = random(heads * (n_q + n_k - 1), 73);
    const auto bt = bind(matrix<"Bt">{}, row_major(table.data(), 1, n_q + n_k - 1, 1, heads));
    check("relative position bias, table detached", softmax(scale(Q^T*K) + detach(matrix<"Bt">{}[i - j + double(n_k - 1)]))*V,
          in.bind_q(), in.bind_k(), in.bind_v(), bt);
    check("ALiBi, slopes detached", softmax(mask(scale(Q^T*K) - detach(m) * (i - j), causal))*V, in.bind_q(), in.bind_k(), in.bind_v(),
          bm);
}

// refuse(expression, bindings...) for an attention whose bias factor c has
// one value per key (1 x 41), which the backends' backward refuses.
template <class Random, class Refuse>
void with_per_key_factor(const Random& random, const Refuse& refuse) {
    const matrix<"Q"> Q;
    const matrix<"K"> K;
    const matrix<"V"> V;
    const matrix<"c"> c;
    const projected_core_inputs in(23, 41, random);
    const std::vector<float> per_key = random(in.n_k, 72);
    refuse(softmax(scale(Q^T*K) + c * (0.1 * j))*V, in.bind_q(), in.bind_k(), in.bind_v(), bind(c, row_major(per_key.data(), 1, in.n_k)));
}

}  // namespace attnfuse::testing
