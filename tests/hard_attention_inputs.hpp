// The inputs both backends' hard-attention backward tests read: four query
// heads over two K/V heads, and whole-number queries and keys, so that the
// scores are exact in fp32 and in double and tie often (the lowest key wins).
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace attnfuse::testing {

struct hard_attention_inputs {
    static constexpr std::size_t batch = 2, heads = 4, kv_heads = 2, d = 3, n_q = 70, n_k = 75, d_v = 5;
    std::vector<float> q, k, v;

    // random(n, seed): n deterministic values in [-1, 1)
    template <class Random>
    explicit hard_attention_inputs(const Random& random)
        : q(whole(random(batch * heads * d * n_q, 41))), k(whole(random(batch * kv_heads * d * n_k, 42))),
          v(random(batch * kv_heads * n_k * d_v, 43)) {}

private:
    static std::vector<float> whole(std::vector<float> x) {
        for (float& value : x) value = std::round(value * 1.5f);
        return x;
    }
};

}  // namespace attnfuse::testing
