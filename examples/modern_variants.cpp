// The variants fused-attention libraries are asked for: causal, sliding
// window, ALiBi, a relative position bias table, soft-capping, grouped-query
// attention and decode against a long cache.
#include "example_support.hpp"

int main() {
    using namespace attnfuse;
    const std::size_t heads = 4, kv_heads = 2, d = 16, n = 45, cache = 300;
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    matrix<"m"> m;   // ALiBi slope per head
    matrix<"Bt"> Bt; // bias per offset i - j, per head
    const auto q = example::values(heads * d * n, 1), k = example::values(heads * d * n, 2), v = example::values(heads * n * d, 3);
    std::vector<float> slopes(heads);
    for (std::size_t h = 0; h < heads; ++h) slopes[h] = std::pow(2.0f, -8.0f * float(h + 1) / float(heads));
    const auto table = example::values(heads * (2 * n - 1), 4);
    auto bq = bind(Q, col_major(q.data(), d, n, 1, heads));
    auto bk = bind(K, col_major(k.data(), d, n, 1, heads));
    auto bv = bind(V, row_major(v.data(), n, d, 1, heads));
    auto bm = bind(m, row_major(slopes.data(), 1, 1, 1, heads));
    auto bt = bind(Bt, row_major(table.data(), 1, 2 * n - 1, 1, heads));

    bool ok = example::check("causal", softmax(mask(scale(Q^T*K), causal))*V, bq, bk, bv);
    ok = example::check("sliding window of 8", softmax(mask(scale(Q^T*K), window(8)))*V, bq, bk, bv) && ok;
    ok = example::check("ALiBi", softmax(mask(scale(Q^T*K) - m*(i - j), causal))*V, bq, bk, bv, bm) && ok;
    ok = example::check("relative position bias", softmax(scale(Q^T*K) + Bt[i - j + double(n - 1)])*V, bq, bk, bv, bt) && ok;
    ok = example::check("soft-capping at 30", softmax(30 * tanh(scale(Q^T*K) / 30))*V, bq, bk, bv) && ok;

    // grouped-query: K and V bound with 2 heads serve the 4 query heads
    const auto kg = example::values(kv_heads * d * n, 5), vg = example::values(kv_heads * n * d, 6);
    ok = example::check("grouped-query (4 query heads, 2 K/V heads)", softmax(scale(Q^T*K))*V, bq,
                        bind(K, col_major(kg.data(), d, n, 1, kv_heads)), bind(V, row_major(vg.data(), n, d, 1, kv_heads))) && ok;

    // decode: one new query against a cache of 300 keys
    const auto q1 = example::values(heads * d, 7), kc = example::values(heads * d * cache, 8), vc = example::values(heads * cache * d, 9);
    ok = example::check("decode (n_q = 1, cache of 300)", softmax(scale(Q^T*K))*V, bind(Q, col_major(q1.data(), d, 1, 1, heads)),
                        bind(K, col_major(kc.data(), d, cache, 1, heads)), bind(V, row_major(vc.data(), cache, d, 1, heads))) && ok;
    return ok ? 0 : 1;
}
