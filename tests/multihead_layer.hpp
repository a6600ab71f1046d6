// PyTorch's nn.MultiheadAttention forward pass (batch_first, bias on every
// projection, a causal attn_mask and a key_padding_mask, no dropout) as ONE
// attnfuse expression,
//
//   concat_heads(softmax(mask(scale((Wq*Xq + bq)^T (Wk*Xk + bk)), keep)) * (Wv*Xv + bv)^T) * Wo^T + bo
//
// bound straight onto torch's own tensors (in_proj_weight split by head
// without a copy, the key_padding_mask's bytes as the table of keys to drop),
// checked against a plain-loop implementation of the module's semantics
// that shares no code with attnfuse. One deliberate difference: a query whose
// every key is masked gets a context of 0 (attnfuse's rule on every
// backend), where torch returns NaN; the test states it.
#pragma once
#include <attnfuse/dsl.hpp>
#include <catch2/catch.hpp>
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "variants.hpp"

namespace attnfuse::testing {

struct multihead_case {
    std::size_t batch, heads, head_dim, n_q, n_k;
    bool causal;
    std::size_t embed() const { return heads * head_dim; }
};

// The module's tensors in torch's layouts: query [B][L][E], key and value
// [B][S][E], in_proj_weight [3E][E] (rows: q, then k, then v outputs),
// in_proj_bias [3E], out_proj.weight [E][E], out_proj.bias [E],
// key_padding_mask [B][S] (1: the key is padding, ignored).
struct multihead_tensors {
    std::vector<float> query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias;
    std::vector<std::uint8_t> key_padding_mask;
};

inline multihead_tensors multihead_inputs(const multihead_case& c, std::uint32_t seed) {
    variants::input_store in(seed);
    const std::size_t E = c.embed();
    auto copy = [](const float* p, std::size_t n) { return std::vector<float>(p, p + n); };
    multihead_tensors t;
    t.query = copy(in.random(c.batch * c.n_q * E), c.batch * c.n_q * E);
    t.key = copy(in.random(c.batch * c.n_k * E), c.batch * c.n_k * E);
    t.value = copy(in.random(c.batch * c.n_k * E), c.batch * c.n_k * E);
    t.in_proj_weight = copy(in.random(3 * E * E, 0.5f), 3 * E * E);
    t.in_proj_bias = copy(in.random(3 * E, 0.5f), 3 * E);
    t.out_proj_weight = copy(in.random(E * E, 0.5f), E * E);
    t.out_proj_bias = copy(in.random(E, 0.5f), E);
    // batch entry b pads its last b + 1 keys, and key 1 as well: a mask
    // that is no prefix length
    t.key_padding_mask.assign(c.batch * c.n_k, 0);
    for (std::size_t b = 0; b < c.batch; ++b)
        for (std::size_t s = 0; s < c.n_k; ++s)
            t.key_padding_mask[b * c.n_k + s] = (s + b + 1 >= c.n_k || (s == 1 && c.n_k > 2)) ? 1 : 0;
    return t;
}

// nn.MultiheadAttention's forward pass in plain loops and doubles:
// [B][L][E], batch-major.
inline std::vector<double> plain_multihead_attention(const multihead_case& c, const multihead_tensors& t) {
    const std::size_t E = c.embed(), d = c.head_dim, L = c.n_q, S = c.n_k;
    std::vector<double> out(c.batch * L * E);
    auto project = [&](const std::vector<float>& x, std::size_t n, std::size_t b, std::size_t block) {
        std::vector<double> p(n * E);
        for (std::size_t r = 0; r < n; ++r)
            for (std::size_t o = 0; o < E; ++o) {
                double sum = t.in_proj_bias[block * E + o];
                for (std::size_t e = 0; e < E; ++e) sum += double(t.in_proj_weight[(block * E + o) * E + e]) * x[(b * n + r) * E + e];
                p[r * E + o] = sum;
            }
        return p;
    };
    for (std::size_t b = 0; b < c.batch; ++b) {
        const std::vector<double> q = project(t.query, L, b, 0), k = project(t.key, S, b, 1), v = project(t.value, S, b, 2);
        std::vector<double> context(L * E, 0.0);
        for (std::size_t h = 0; h < c.heads; ++h)
            for (std::size_t l = 0; l < L; ++l) {
                std::vector<double> w(S, -std::numeric_limits<double>::infinity());
                double top = -std::numeric_limits<double>::infinity();
                for (std::size_t s = 0; s < S; ++s) {
                    if (t.key_padding_mask[b * S + s] || (c.causal && s > l)) continue;
                    double dot = 0;
                    for (std::size_t a = 0; a < d; ++a) dot += q[l * E + h * d + a] * k[s * E + h * d + a];
                    w[s] = dot / std::sqrt(double(d));
                    top = std::max(top, w[s]);
                }
                if (top == -std::numeric_limits<double>::infinity()) continue;  // every key masked: context 0 (torch: NaN)
                double total = 0;
                for (std::size_t s = 0; s < S; ++s) total += (w[s] = std::exp(w[s] - top));
                for (std::size_t s = 0; s < S; ++s)
                    for (std::size_t a = 0; a < d; ++a) context[l * E + h * d + a] += w[s] / total * v[s * E + h * d + a];
            }
        for (std::size_t l = 0; l < L; ++l)
            for (std::size_t o = 0; o < E; ++o) {
                double sum = t.out_proj_bias[o];
                for (std::size_t e = 0; e < E; ++e) sum += double(t.out_proj_weight[o * E + e]) * context[l * E + e];
                out[(b * L + l) * E + o] = sum;
            }
    }
    return out;
}

// The layer on a backend: run(e, options, bindings...) returns a run_result.
// Fused and unfused, causal and not, self- and cross-attention shapes.
template <class Run>
void check_multihead_layer(const Run& run) {
    matrix<"Xq"> Xq;
    matrix<"Xk"> Xk;
    matrix<"Xv"> Xv;
    matrix<"Wq"> Wq;
    matrix<"Wk"> Wk;
    matrix<"Wv"> Wv;
    matrix<"bq"> bq;
    matrix<"bk"> bk;
    matrix<"bv"> bv;
    matrix<"Wo"> Wo;
    matrix<"bo"> bo;
    matrix<"Pad"> Pad;  // torch's key_padding_mask, one row of bytes per batch entry
    const multihead_case cases[] = {{2, 3, 5, 37, 37, true}, {3, 4, 3, 19, 23, false}, {1, 1, 7, 1, 9, false}};
    for (const multihead_case& c : cases) {
        const multihead_tensors t = multihead_inputs(c, static_cast<std::uint32_t>(c.n_q * 7 + c.heads));
        const std::size_t E = c.embed(), d = c.head_dim, H = c.heads;
        // in_proj_weight's rows [h d, (h+1) d) of each block are head h's d x E projection
        const auto bindings = std::tuple{
            bind(Xq, col_major(t.query.data(), E, c.n_q, c.batch)), bind(Xk, col_major(t.key.data(), E, c.n_k, c.batch)),
            bind(Xv, col_major(t.value.data(), E, c.n_k, c.batch)),
            bind(Wq, row_major(t.in_proj_weight.data(), d, E, 1, H)), bind(Wk, row_major(t.in_proj_weight.data() + E * E, d, E, 1, H)),
            bind(Wv, row_major(t.in_proj_weight.data() + 2 * E * E, d, E, 1, H)),
            bind(bq, row_major(t.in_proj_bias.data(), d, 1, 1, H)), bind(bk, row_major(t.in_proj_bias.data() + E, d, 1, 1, H)),
            bind(bv, row_major(t.in_proj_bias.data() + 2 * E, d, 1, 1, H)),
            bind(Wo, row_major(t.out_proj_weight.data(), E, E)), bind(bo, row_major(t.out_proj_bias.data(), 1, E)),
            bind(Pad, row_major(t.key_padding_mask.data(), 1, c.n_k, c.batch))};
        const std::vector<double> expected = plain_multihead_attention(c, t);
        auto check = [&](const auto& keep) {
            const auto attention = softmax(mask(scale(transpose(Wq*Xq + bq)*(Wk*Xk + bk)), keep)) * transpose(Wv*Xv + bv);
            const auto layer = concat_heads(attention) * transpose(Wo) + bo;
            using Layer = std::remove_cvref_t<decltype(layer)>;
            for (const execution mode : {execution::fused, execution::unfused}) {
                INFO("multi-head layer B " << c.batch << " H " << H << " d " << d << " L " << c.n_q << " S " << c.n_k
                                           << (c.causal ? " causal" : "") << (mode == execution::fused ? " fused" : " unfused") << " | "
                                           << to_string(layer));
                const run_result r = std::apply([&](const auto&... b) { return run(layer, run_options{mode}, b...); }, bindings);
                REQUIRE(r.output.batch == c.batch);
                REQUIRE(r.output.heads == 1);
                REQUIRE(r.output.rows == c.n_q);
                REQUIRE(r.output.cols == E);
                CHECK(variants::relative_error(expected, r.output.values) <= 1e-4);
                const bool fused = mode == execution::fused;
                if (fused) CHECK(r.info.score_bytes == 0);
                // the fused attention, then the heads side by side, then W_o and its bias
                constexpr std::size_t fused_kernels = plan::kernel_count<Layer, plan::mode::fused>;
                STATIC_REQUIRE(plan::fused_kernel_count<Layer, plan::mode::fused> == 1);
                STATIC_REQUIRE(fused_kernels == 10);  // 3 projections + 3 biases, attention, concat, W_o, + bo
                if (fused) CHECK(std::count(r.info.kernels.begin(), r.info.kernels.end(), std::string("merge of the key shares")) +
                                     static_cast<std::ptrdiff_t>(fused_kernels) ==
                                 static_cast<std::ptrdiff_t>(r.info.kernels.size()));
            }
        };
        if (c.causal) check(causal && Pad[j] == 0);
        else check(Pad[j] == 0);
    }
}

// What a layer gets wrong is named: an input read after concat_heads has one
// head, and a query with every key padded gets the output bias alone.
template <class Run>
void check_multihead_layer_edges(const Run& run) {
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    matrix<"Wo"> Wo;
    matrix<"bo"> bo;
    matrix<"L"> Lk;
    variants::input_store in(77);
    const std::size_t batch = 2, heads = 3, d = 5, n = 21, E = heads * d;
    const auto q = bind(Q, col_major(in.random(batch * heads * d * n), d, n, batch, heads));
    const auto k = bind(K, col_major(in.random(batch * heads * d * n), d, n, batch, heads));
    const auto v = bind(V, row_major(in.random(batch * heads * n * d), n, d, batch, heads));
    const float* wo = in.random(E * E);
    const float* wo_per_head = in.random(heads * E * E);
    const float* bias = in.random(E);
    const std::vector<float> lengths{static_cast<float>(n), 0.0f};  // batch entry 1: every key padded
    const auto layer = concat_heads(softmax(mask(scale(Q^T*K), key_lengths(Lk))) * V) * Wo + bo;
    const auto b_o = bind(bo, row_major(bias, 1, E));
    const auto lk = bind(Lk, row_major(lengths.data(), 1, 1, batch));
    for (const execution mode : {execution::fused, execution::unfused}) {
        const run_result r = run(layer, run_options{mode}, q, k, v, bind(Wo, row_major(wo, E, E)), b_o, lk);
        const auto ref = reference::evaluate(layer, q, k, v, bind(Wo, row_major(wo, E, E)), b_o, lk);
        CHECK(variants::relative_error(ref.values, r.output.values) <= 1e-4);
        for (std::size_t t = 0; t < n; ++t)
            for (std::size_t c = 0; c < E; ++c) CHECK(r.output.at(1, 0, t, c) == bias[c]);
        // the heads set side by side are those of the inputs read inside
        // concat_heads: a binding the expression does not read adds none
        matrix<"unused"> Unused;
        const std::vector<float> six(6, 1.0f);
        const run_result stray = run(layer, run_options{mode}, q, k, v, bind(Wo, row_major(wo, E, E)), b_o, lk,
                                     bind(Unused, row_major(six.data(), 1, 1, 1, 6)));
        CHECK(stray.output.cols == E);
        CHECK(variants::relative_error(ref.values, stray.output.values) <= 1e-4);
        // W_o bound per head is read after concat_heads: which head would serve?
        try {
            (void)run(layer, run_options{mode}, q, k, v, bind(Wo, row_major(wo_per_head, E, E, 1, heads)), b_o, lk);
            FAIL("a per-head W_o after concat_heads ran");
        } catch (const shape_error& err) {
            const std::string what = err.what();
            CHECK(what.find("input Wo") != std::string::npos);
            CHECK(what.find("3 heads") != std::string::npos);
            CHECK(what.find("concat_heads") != std::string::npos);
        }
    }
}

}  // namespace attnfuse::testing
