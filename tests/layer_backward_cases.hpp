// The multi-head layers both backends' backward tests run (layer_backward.hpp):
// nn.MultiheadAttention's form (a bias on every projection, W_o transposed,
// cross-attention under a causal mask and a table of padded keys, read as
// bytes); self-attention over grouped-query projections with dropout and no
// output bias; one projection for queries and keys (tied weights, so one
// input read in two places) under b_o + C*W_o; ALiBi's slopes trained under
// projections; projected queries over bound keys and values with no output
// projection; and one head of bound Q, K, V times W_o with no concat_heads.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include <attnfuse/dsl.hpp>

namespace attnfuse::testing {

struct layer_inputs {
    static constexpr std::size_t batch = 2, heads = 4, d = 5, d_v = 3, d_model = 7, d_out = 6;
    std::size_t n_q, n_k;
    std::vector<float> xq, xk, wq, wk, wv, bq, bk, bv, wo, wo_t, bo, slopes;
    std::vector<std::uint8_t> padded;  // 1: the key is padding
    // bo holds d_model values: the layers with W_o of d_model columns read them all, torch's form its first d_out

    // random(n, seed): n deterministic values in [-1, 1)
    template <class Random>
    layer_inputs(std::size_t queries, std::size_t keys, const Random& random)
        : n_q(queries), n_k(keys), xq(random(batch * d_model * n_q, 81)), xk(random(batch * d_model * n_k, 82)),
          wq(random(heads * d * d_model, 83)), wk(random(heads * d * d_model, 84)), wv(random(heads * d_v * d_model, 85)),
          bq(random(heads * d, 86)), bk(random(heads * d, 87)), bv(random(heads * d, 88)), wo(random(heads * d_v * d_model, 89)),
          wo_t(random(d_out * heads * d, 90)), bo(random(d_model, 91)), slopes{0.5f, 0.25f, 0.125f, 0.0625f},
          padded(batch * keys, 0) {
        // batch entry b pads its last b + 2 keys and key 1: no prefix length
        for (std::size_t b = 0; b < batch; ++b)
            for (std::size_t s = 0; s < n_k; ++s) padded[b * n_k + s] = (s + b + 2 >= n_k || s == 1) ? 1 : 0;
    }
};

// check(name, expression, bindings...) for each layer, at n_q x n_k (n_q <= n_k).
template <class Random, class Check>
void for_each_layer_case(std::size_t n_q, std::size_t n_k, const Random& random, const Check& check) {
    const layer_inputs in(n_q, n_k, random);
    constexpr std::size_t B = layer_inputs::batch, H = layer_inputs::heads, d = layer_inputs::d, dv = layer_inputs::d_v,
                          dm = layer_inputs::d_model;
    const matrix<"Xq"> Xq;
    const matrix<"Xk"> Xk;
    const matrix<"Wq"> Wq;
    const matrix<"Wk"> Wk;
    const matrix<"Wv"> Wv;
    const matrix<"bq"> bq;
    const matrix<"bk"> bk;
    const matrix<"bv"> bv;
    const matrix<"Wo"> Wo;
    const matrix<"bo"> bo;
    const matrix<"Pad"> Pad;
    const matrix<"m"> m;
    const auto xq = bind(Xq, col_major(in.xq.data(), dm, n_q, B));
    const auto xk = bind(Xk, col_major(in.xk.data(), dm, n_k, B));
    const auto wq = bind(Wq, row_major(in.wq.data(), d, dm, 1, H));
    const auto wk = bind(Wk, row_major(in.wk.data(), d, dm, 1, H));
    const auto wv = bind(Wv, row_major(in.wv.data(), dv, dm, 1, H));
    const auto wo = bind(Wo, row_major(in.wo.data(), H * dv, dm));

    // torch's layout: W_o is d_out x (heads d), applied transposed; the values of depth d
    const auto wv_deep = bind(Wv, row_major(in.wq.data(), d, dm, 1, H));
    check("nn.MultiheadAttention's form, cross-attention",
          concat_heads(softmax(mask(scale(transpose(Wq*Xq + bq)*(Wk*Xk + bk)), causal && Pad[j] == 0)) * transpose(Wv*Xk + bv)) *
                  transpose(Wo) + bo,
          xq, xk, wq, wk, wv_deep, bind(bq, row_major(in.bq.data(), d, 1, 1, H)), bind(bk, row_major(in.bk.data(), d, 1, 1, H)),
          bind(bv, row_major(in.bv.data(), d, 1, 1, H)), bind(Wo, row_major(in.wo_t.data(), layer_inputs::d_out, H * d)),
          bind(bo, row_major(in.bo.data(), 1, layer_inputs::d_out)), bind(Pad, row_major(in.padded.data(), 1, n_k, B)));

    // keys and values of two heads, each serving two query heads
    check("self-attention, grouped-query projections, dropout",
          concat_heads(dropout(softmax(mask(scale(transpose(Wq*Xk)*(Wk*Xk)), window(5))), 0.2, 99) * transpose(Wv*Xk)) * Wo, xk, wq,
          bind(Wk, row_major(in.wk.data(), d, dm, 1, H / 2)), bind(Wv, row_major(in.wv.data(), dv, dm, 1, H / 2)), wo);

    check("one projection for queries and keys, b_o first",
          bo + concat_heads(softmax(mask(scale(transpose(Wq*Xk)*(Wq*Xk)), causal)) * transpose(Wv*Xk)) * Wo, xk, wq, wv, wo,
          bind(bo, row_major(in.bo.data(), 1, dm)));

    check("ALiBi's slopes trained under projections",
          concat_heads(softmax(mask(scale(transpose(Wq*Xq)*(Wk*Xk)) - m * (i - j), causal)) * transpose(Wv*Xk)) * Wo + bo, xq, xk, wq, wk,
          wv, wo, bind(bo, row_major(in.bo.data(), 1, dm)), bind(m, row_major(in.slopes.data(), 1, 1, 1, H)));

    // projected queries of depth d over bound keys and values of one head (multi-query), no output projection
    const matrix<"K"> K;
    const matrix<"V"> V;
    const std::vector<float> keys = random(B * d * n_k, 92), values = random(B * n_k * dv, 93);
    const auto bound_k = bind(K, col_major(keys.data(), d, n_k, B));
    const auto bound_v = bind(V, row_major(values.data(), n_k, dv, B));
    check("projected queries over bound keys and values", softmax(scale(transpose(Wq*Xq + bq)*K))*V, xq, wq,
          bind(bq, row_major(in.bq.data(), d, 1, 1, H)), bound_k, bound_v);

    // one head: no concat_heads, W_o straight after the attention
    const matrix<"Q"> Q;
    const std::vector<float> queries = random(B * d * n_q, 94);
    check("one head of bound Q, K, V times W_o", (softmax(mask(scale(Q^T*K), causal))*V) * Wo, bind(Q, col_major(queries.data(), d, n_q, B)),
          bound_k, bound_v, bind(Wo, row_major(in.wo.data(), dv, dm)));
}

}  // namespace attnfuse::testing
