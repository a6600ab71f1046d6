// Every row of VARIANTS.md as a DSL expression with inputs to run it on: the
// one catalogue that the zoo, the backend tests and the benchmarks walk.
//
//   attnfuse::variants::for_each(shape, [](const variant& v, const auto& expr, const auto&... bindings) { ... });
#pragma once
#include <attnfuse/dsl.hpp>
#include <attnfuse/element.hpp>
#include <attnfuse/run.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <memory>
#include <limits>
#include <string>
#include <vector>

namespace attnfuse::variants {

struct shape {
    std::size_t batch = 2;
    std::size_t heads = 2;
    std::size_t n_q = 7;
    std::size_t n_k = 13;
    std::size_t d = 5;    // d_k
    std::size_t d_v = 3;
};

// The error every attnfuse check reports: max |out - ref| over the largest
// |ref| (at least 1), a relative error of the output as a whole; a NaN where
// the other has none (or a size mismatch) is an infinite error.
inline double relative_error(const std::vector<double>& ref, const std::vector<float>& out) {
    if (ref.size() != out.size()) return std::numeric_limits<double>::infinity();
    double worst = 0, scale = 1;
    for (std::size_t n = 0; n < ref.size(); ++n) {
        if (std::isnan(ref[n]) != std::isnan(out[n])) return std::numeric_limits<double>::infinity();
        if (std::isnan(ref[n])) continue;
        worst = std::max(worst, std::abs(ref[n] - static_cast<double>(out[n])));
        scale = std::max(scale, std::abs(ref[n]));
    }
    return worst / scale;
}

// The tolerance of a run checked by relative_error: fp32_tolerance, unless
// the run rounded its weights to bf16 for their product with V (the CPU's
// bf16 products; report.notes says so), which is held to bf16's unit
// roundoff u = 2^-8 instead: each weight moves by at most u relatively, the
// catalogue's bf16 rows are softmax attention (weights summing to 1) and
// input_store's values lie in [-1, 1], so the output moves by at most u
// against a scale of at least 1.
inline double tolerance_of_run(double fp32_tolerance, const report& info) {
    for (const std::string& n : info.notes)
        if (n.find("the weights rounded to bf16") != std::string::npos)
            return std::max(fp32_tolerance, unit_roundoff<bfloat16>);
    return fp32_tolerance;
}

struct variant {
    std::string name;    // the row of VARIANTS.md
    std::string family;  // its table
};

// Deterministic inputs in [-scale, scale], kept alive for one variant's call.
class input_store {
public:
    explicit input_store(std::uint32_t seed) : state_(seed * 2654435761u + 1) {}
    const float* random(std::size_t count, float scale = 1.0f) {
        buffers_.emplace_back(count);
        for (float& x : buffers_.back()) x = scale * next();
        return buffers_.back().data();
    }
    const float* values(std::vector<float> v) {
        buffers_.push_back(std::move(v));
        return buffers_.back().data();
    }
    // The same values stored as El (f16, bf16), rounded to nearest even.
    template <class El>
    const El* stored(const float* values, std::size_t count) {
        auto narrow = std::make_shared<std::vector<El>>(count);
        for (std::size_t n = 0; n < count; ++n) (*narrow)[n] = from_float<El>(values[n]);
        narrow_.push_back(narrow);
        return narrow->data();
    }

private:
    float next() {  // xorshift32, uniform in [-1, 1)
        state_ ^= state_ << 13;
        state_ ^= state_ >> 17;
        state_ ^= state_ << 5;
        return static_cast<float>(state_ >> 8) / 8388608.0f - 1.0f;
    }
    std::uint32_t state_;
    std::deque<std::vector<float>> buffers_;
    std::deque<std::shared_ptr<const void>> narrow_;
};

template <class F>
void for_each(const shape& s, F&& f) {
    const std::size_t B = s.batch, H = s.heads, nq = s.n_q, nk = s.n_k, d = s.d, dv = s.d_v;
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    // Queries and keys as columns over the bytes of [n, d] row-major arrays.
    auto qkv = [&](input_store& in, float query_scale = 1.0f) {
        return std::tuple{bind(Q, col_major(in.random(B * H * d * nq, query_scale), d, nq, B, H)),
                          bind(K, col_major(in.random(B * H * d * nk), d, nk, B, H)),
                          bind(V, row_major(in.random(B * H * nk * dv), nk, dv, B, H))};
    };
    auto call = [&](const char* family, const char* name, const auto& expr, const auto& bindings) {
        std::apply([&](const auto&... b) { f(variant{name, family}, expr, b...); }, bindings);
    };
    auto with = [](auto tuple, auto... more) { return std::tuple_cat(tuple, std::tuple{more...}); };

    // ---- similarity functions ------------------------------------------------
    {
        input_store in(1);
        call("similarity", "dot product", softmax(Q^T*K)*V, qkv(in));
    }
    {
        input_store in(2);
        call("similarity", "scaled dot product", softmax(scale(Q^T*K))*V, qkv(in));
    }
    {
        input_store in(3);
        matrix<"W"> W;
        call("similarity", "general (Q^T W K)", softmax(Q^T*W*K)*V,
             with(qkv(in), bind(W, row_major(in.random(d * d, 0.5f), d, d))));
    }
    {
        input_store in(4);
        matrix<"w"> w;
        matrix<"W1"> W1;
        matrix<"W2"> W2;
        matrix<"b"> b;
        const std::size_t da = d + 2;
        call("similarity", "additive (Bahdanau)", softmax(additive(w, W1*Q + b, W2*K))*V,
             with(qkv(in), bind(w, row_major(in.random(da), da, 1)), bind(W1, row_major(in.random(da * d), da, d)),
                  bind(W2, row_major(in.random(da * d), da, d)), bind(b, row_major(in.random(da), da, 1))));
    }
    {
        input_store in(5);
        matrix<"Hs"> Hs;  // one sequence h as columns: d x n
        matrix<"W"> W;
        call("similarity", "self, general (h^T W h)", softmax(Hs^T*W*Hs)*transpose(Hs),
             std::tuple{bind(Hs, col_major(in.random(B * H * d * nk), d, nk, B, H)),
                        bind(W, row_major(in.random(d * d, 0.5f), d, d))});
    }
    {
        input_store in(6);
        matrix<"Hs"> Hs;
        matrix<"v"> v;
        matrix<"W"> W;
        const std::size_t da = d + 1;
        call("similarity", "self, query-free (v^T tanh(W h))", softmax(v^T*tanh(W*Hs))*transpose(Hs),
             std::tuple{bind(Hs, col_major(in.random(B * H * d * nk), d, nk, B, H)), bind(v, row_major(in.random(da), da, 1)),
                        bind(W, row_major(in.random(da * d), da, d))});
    }
    {
        input_store in(7);
        matrix<"Hs"> Hs;
        matrix<"w"> w;
        matrix<"bt"> bt;  // one bias per time step
        matrix<"L"> L;    // valid length per batch entry
        std::vector<float> lengths(B);
        for (std::size_t b = 0; b < B; ++b) lengths[b] = static_cast<float>(nk - (b % nk));
        const auto e = tanh(w^T*Hs + bt);
        const auto kept = where(key_lengths(L), exp(e), 0);
        call("similarity", "feed-forward (Raffel & Ellis)", kept / (row_sum(kept) + 1e-7) * transpose(Hs),
             std::tuple{bind(Hs, col_major(in.random(B * d * nk), d, nk, B)), bind(w, row_major(in.random(d), d, 1)),
                        bind(bt, row_major(in.random(nk), 1, nk)), bind(L, row_major(in.values(lengths), 1, 1, B))});
    }

    // ---- normalisations -------------------------------------------------------
    {
        input_store in(8);
        call("normalisation", "softmax (scores near 1e4)", softmax(Q^T*K)*V, qkv(in, 3e4f / float(d)));
    }
    {
        input_store in(9);
        matrix<"w"> w;
        call("normalisation", "weighted softmax (w^T (q . k))", softmax(pairwise(w, Q, K, qf * kf))*V,
             with(qkv(in), bind(w, row_major(in.random(d), d, 1))));
    }
    {
        input_store in(10);
        matrix<"L"> L;
        std::vector<float> lengths(B);
        for (std::size_t b = 0; b < B; ++b) lengths[b] = b == 0 ? 0.0f : static_cast<float>(nk - b % nk);  // batch 0: all masked
        call("normalisation", "masked softmax (lengths, one batch fully masked)",
             softmax(mask(scale(Q^T*K), key_lengths(L)))*V, with(qkv(in), bind(L, row_major(in.values(lengths), 1, 1, B))));
    }
    {
        input_store in(11);
        call("normalisation", "hard (one-hot argmax)", hard(Q^T*K)*V, qkv(in));
    }
    {
        input_store in(12);
        call("normalisation", "local-m (|j - i| <= 2)", softmax(mask(scale(Q^T*K), abs(j - i) <= 2))*V, qkv(in));
    }
    {
        input_store in(13);
        matrix<"vp"> vp;
        matrix<"Wp"> Wp;
        const double D = 2, sigma = D / 2;
        const auto p = double(nk) * sigmoid(transpose(vp^T*tanh(Wp*Q)));  // n_q x 1: the predicted centre
        const auto weights = softmax(mask(scale(Q^T*K), abs(j - p) <= D)) % exp(-square(j - p) / (2 * sigma * sigma));
        call("normalisation", "local-p (predictive, Gaussian)", weights * V,
             with(qkv(in), bind(vp, row_major(in.random(d), d, 1)), bind(Wp, row_major(in.random(d * d), d, d))));
    }

    // ---- how Q, K and V relate ------------------------------------------------------
    {
        input_store in(14);
        const float* source = in.random(B * H * nk * d);  // [n_k, d] encoder states: K and V
        call("relation", "source-target (K = V)", softmax(scale(Q^T*K))*V,
             std::tuple{bind(Q, col_major(in.random(B * H * d * nq), d, nq, B, H)), bind(K, col_major(source, d, nk, B, H)),
                        bind(V, row_major(source, nk, d, B, H))});
    }
    {
        input_store in(15);
        const float* x = in.random(B * H * nk * d);  // one tensor for Q, K and V
        call("relation", "self-attention (Q = K = V)", softmax(scale(Q^T*K))*V,
             std::tuple{bind(Q, col_major(x, d, nk, B, H)), bind(K, col_major(x, d, nk, B, H)), bind(V, row_major(x, nk, d, B, H))});
    }
    {
        input_store in(16);
        call("relation", "key-value (K != V)", softmax(scale(Q^T*K))*V, qkv(in));
    }
    {
        input_store in(17);
        // The whole multi-head layer: per-head projections W_q^i X, W_k^i X,
        // W_v^i X with one weight matrix per head (heads = H), inputs shared
        // by the heads; padding and future masks and dropout on the weights;
        // then the heads side by side and the output projection W_o with its
        // bias, once per batch entry.
        matrix<"X"> X;
        matrix<"Wq"> Wq;
        matrix<"Wk"> Wk;
        matrix<"Wv"> Wv;
        matrix<"L"> L;
        matrix<"Wo"> Wo;
        matrix<"bo"> bo;
        const std::size_t dm = d + 3;
        std::vector<float> lengths(B);
        for (std::size_t b = 0; b < B; ++b) lengths[b] = static_cast<float>(nk - b % nk);
        const auto heads_out = dropout(softmax(mask(scale(transpose(Wq*X)*(Wk*X)), causal && key_lengths(L))), 0.1, 1234) *
                               transpose(Wv*X);
        const auto e = concat_heads(heads_out) * Wo + bo;
        call("relation", "multi-head layer (projections, masks, dropout, concat, W_o)", e,
             std::tuple{bind(X, col_major(in.random(B * dm * nk), dm, nk, B)),
                        bind(Wq, row_major(in.random(H * d * dm, 0.5f), d, dm, 1, H)),
                        bind(Wk, row_major(in.random(H * d * dm, 0.5f), d, dm, 1, H)),
                        bind(Wv, row_major(in.random(H * dv * dm, 0.5f), dv, dm, 1, H)),
                        bind(L, row_major(in.values(lengths), 1, 1, B)),
                        bind(Wo, row_major(in.random(H * dv * dm, 0.5f), H * dv, dm)),
                        bind(bo, row_major(in.random(dm, 0.5f), 1, dm))});
    }

    // ---- modern variants -----------------------------------------------------------------
    {
        input_store in(18);
        call("modern", "causal", softmax(mask(scale(Q^T*K), causal))*V, qkv(in));
    }
    {
        input_store in(19);
        matrix<"Lk"> Lk;
        matrix<"Lq"> Lq;
        std::vector<float> klen(B), qlen(B);
        for (std::size_t b = 0; b < B; ++b) {
            klen[b] = static_cast<float>(nk - b % nk);
            qlen[b] = static_cast<float>(nq - (b + 1) % nq);
        }
        call("modern", "padding (key and query lengths)", softmax(mask(scale(Q^T*K), key_lengths(Lk) && query_lengths(Lq)))*V,
             with(qkv(in), bind(Lk, row_major(in.values(klen), 1, 1, B)), bind(Lq, row_major(in.values(qlen), 1, 1, B))));
    }
    {
        // the lengths as a model keeps them, int32 per batch entry: bind reads them into floats it owns
        input_store in(19);
        matrix<"Lk"> Lk;
        matrix<"Lq"> Lq;
        std::vector<std::int32_t> klen(B), qlen(B);
        for (std::size_t b = 0; b < B; ++b) {
            klen[b] = static_cast<std::int32_t>(nk - (b + 1) % nk);
            qlen[b] = static_cast<std::int32_t>(nq - b % nq);
        }
        call("modern", "padding (int32 lengths)", softmax(mask(scale(Q^T*K), key_lengths(Lk) && query_lengths(Lq)))*V,
             with(qkv(in), bind(Lk, row_major(klen.data(), 1, 1, B)), bind(Lq, row_major(qlen.data(), 1, 1, B))));
    }
    {
        input_store in(20);
        call("modern", "sliding window (w = 3)", softmax(mask(scale(Q^T*K), window(3)))*V, qkv(in));
    }
    {
        input_store in(21);
        matrix<"m"> m;  // one slope per head
        std::vector<float> slopes(H);
        for (std::size_t h = 0; h < H; ++h) slopes[h] = std::pow(2.0f, -8.0f * float(h + 1) / float(H));
        call("modern", "ALiBi", softmax(mask(scale(Q^T*K) - m * (i - j), causal))*V,
             with(qkv(in), bind(m, row_major(in.values(slopes), 1, 1, 1, H))));
    }
    {
        input_store in(22);
        matrix<"Bt"> Bt;  // per head, one entry per offset i - j in [-(n_k-1), n_q-1]
        const std::size_t length = nq + nk - 1;
        call("modern", "relative position bias", softmax(scale(Q^T*K) + Bt[i - j + double(nk - 1)])*V,
             with(qkv(in), bind(Bt, row_major(in.random(H * length), 1, length, 1, H))));
    }
    {
        input_store in(23);
        call("modern", "soft-capping (c = 5)", softmax(5 * tanh(Q^T*K / 5))*V, qkv(in, 3.0f));
    }
    {
        input_store in(24);
        const std::size_t kv_heads = H > 1 ? H / 2 : 1;  // pairs of query heads share a K/V head
        call("modern", "grouped-query (GQA)", softmax(scale(Q^T*K))*V,
             std::tuple{bind(Q, col_major(in.random(B * H * d * nq), d, nq, B, H)),
                        bind(K, col_major(in.random(B * kv_heads * d * nk), d, nk, B, kv_heads)),
                        bind(V, row_major(in.random(B * kv_heads * nk * dv), nk, dv, B, kv_heads))});
    }
    {
        input_store in(31);
        const std::size_t kv_heads = H > 1 ? H / 2 : 1;
        matrix<"K", dyn, dyn, bfloat16> K16;
        matrix<"V", dyn, dyn, bfloat16> V16;
        const std::size_t k_count = B * kv_heads * d * nk, v_count = B * kv_heads * nk * dv;
        call("modern", "grouped-query, K/V cache stored bf16", softmax(scale(Q^T*K16))*V16,
             std::tuple{bind(Q, col_major(in.random(B * H * d * nq), d, nq, B, H)),
                        bind(K16, col_major(in.stored<bfloat16>(in.random(k_count), k_count), d, nk, B, kv_heads)),
                        bind(V16, row_major(in.stored<bfloat16>(in.random(v_count), v_count), nk, dv, B, kv_heads))});
    }
    {
        input_store in(25);
        call("modern", "multi-query (MQA)", softmax(scale(Q^T*K))*V,
             std::tuple{bind(Q, col_major(in.random(B * H * d * nq), d, nq, B, H)),
                        bind(K, col_major(in.random(B * d * nk), d, nk, B, 1)),
                        bind(V, row_major(in.random(B * nk * dv), nk, dv, B, 1))});
    }
    {
        input_store in(26);
        call("modern", "decode (n_q = 1)", softmax(scale(Q^T*K))*V,
             std::tuple{bind(Q, col_major(in.random(B * H * d), d, 1, B, H)),
                        bind(K, col_major(in.random(B * H * d * nk), d, nk, B, H)),
                        bind(V, row_major(in.random(B * H * nk * dv), nk, dv, B, H))});
    }
    {
        input_store in(27);
        call("modern", "dropout (p = 0.25)", dropout(softmax(scale(Q^T*K)), 0.25, 77)*V, qkv(in));
    }
    // Pointwise weights, no row normalisation: one fused kernel each, and
    // masked tiles skipped (sigmoid(-inf) and relu(-inf)^2 are exactly 0).
    {
        input_store in(28);
        // Ramapuram et al. (2024): b = -log(n_k) keeps the sum of weights near 1 at the start of training
        call("modern", "sigmoid attention (causal, b = -log n_k)",
             sigmoid(mask(scale(Q^T*K), causal) - std::log(static_cast<double>(nk)))*V, qkv(in));
    }
    {
        input_store in(29);
        call("modern", "ReLU^2 attention (sliding window w = 3)", square(relu(mask(scale(Q^T*K), window(3))))*V, qkv(in));
    }
}

}  // namespace attnfuse::variants
