// The inputs both backends' tests of the projected cores read (keys that are
// an activated projection, the bilinear pairwise score): Q of two heads over
// K and V of one (grouped-query), Q also of depth d_a against the keys W K,
// and the projection W and the feature weights w shared by every batch entry
// and head.
#pragma once
#include <cstddef>
#include <vector>

#include <attnfuse/bind.hpp>

namespace attnfuse::testing {

struct projected_core_inputs {
    static constexpr std::size_t batch = 2, heads = 2, d = 5, d_a = 7, d_v = 3;
    std::size_t n_q, n_k;
    std::vector<float> q, q_deep, k, v, weights, features;

    // random(n, seed): n deterministic values in [-1, 1)
    template <class Random>
    projected_core_inputs(std::size_t queries, std::size_t keys, const Random& random)
        : n_q(queries), n_k(keys), q(random(batch * heads * d * n_q, 61)), q_deep(random(batch * heads * d_a * n_q, 66)),
          k(random(batch * d * n_k, 62)), v(random(batch * n_k * d_v, 63)), weights(random(d_a * d, 64)), features(random(d, 65)) {}

    auto bind_q() const { return bind(matrix<"Q">{}, col_major(q.data(), d, n_q, batch, heads)); }
    auto bind_q_deep() const { return bind(matrix<"Q">{}, col_major(q_deep.data(), d_a, n_q, batch, heads)); }
    auto bind_k() const { return bind(matrix<"K">{}, col_major(k.data(), d, n_k, batch, 1)); }
    auto bind_v() const { return bind(matrix<"V">{}, row_major(v.data(), n_k, d_v, batch, 1)); }
    auto bind_projection() const { return bind(matrix<"W">{}, row_major(weights.data(), d_a, d)); }
    auto bind_features() const { return bind(matrix<"w">{}, row_major(features.data(), d, 1)); }
};

}  // namespace attnfuse::testing
