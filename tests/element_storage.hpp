// Inputs stored as f16 and bf16, one test body for every backend: `run(e,
// run_options, bindings...)` returns a run_result. Each case is checked
// twice:
//   - against the reference over the same stored values (which it reads
//     exactly): the fp32 arithmetic's tolerance, 1e-4 of the output's scale;
//   - for scaled dot-product attention, also against the reference over the
//     fp32 values before they were rounded to storage, within a bound derived
//     from the format's unit roundoff u: each stored value carries a relative
//     error of at most u, so a score q.k/sqrt(d) moves by at most
//     delta = 2u * max_ij sum_a |q_ai| |k_aj| / sqrt(d) (to first order), a
//     softmax row's weights by at most e^(2 delta) - 1 in their 1-norm, and
//     the output by that times max|v|, plus u max|v| from V's own rounding.
// Sizes are odd and GQA shares K and V over pairs of query heads.
// `reads` says which kernels of the backend read 16-bit inputs as stored
// (no widened copy, no note about widening); any other is widened per run,
// with a note naming the input and "widened".
#pragma once
#include <attnfuse/dsl.hpp>
#include <catch2/catch.hpp>
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "variants.hpp"

namespace attnfuse::testing {

template <class El>
std::vector<El> stored(const float* values, std::size_t count) {
    std::vector<El> out(count);
    for (std::size_t n = 0; n < count; ++n) out[n] = from_float<El>(values[n]);
    return out;
}

inline bool notes_name(const report& info, const std::string& text) {
    return std::any_of(info.notes.begin(), info.notes.end(), [&](const std::string& n) { return n.find(text) != std::string::npos; });
}
// A note that `input` (e.g. "K: stored as f16") was widened to f32 for the run.
inline bool widened(const report& info, const std::string& input) {
    return std::any_of(info.notes.begin(), info.notes.end(), [&](const std::string& n) {
        return n.find("input " + input) != std::string::npos && n.find("widened") != std::string::npos;
    });
}

enum class stored_reads { fused_attention_inputs, every_kernel };

template <class Run>
void check_element_storage(const Run& run, stored_reads reads) {
    const std::size_t B = 2, H = 4, H_kv = 2, n_q = 37, n_k = 45, d = 19, d_v = 13;
    variants::input_store in(77);
    const float* q = in.random(B * H * d * n_q);
    const float* k = in.random(B * H_kv * d * n_k);
    const float* v = in.random(B * H_kv * n_k * d_v);
    const float* table = in.random(H * (n_q + n_k - 1), 0.5f);
    std::vector<float> slope_values(H);
    for (std::size_t h = 0; h < H; ++h) slope_values[h] = std::pow(2.0f, -8.0f * float(h + 1) / float(H));

    SECTION("GQA, causal, a bf16 position-bias table and f16 ALiBi slopes, K and V f16, Q bf16") {
        const auto q16 = stored<bfloat16>(q, B * H * d * n_q);
        const auto k16 = stored<half>(k, B * H_kv * d * n_k), v16 = stored<half>(v, B * H_kv * n_k * d_v);
        const auto t16 = stored<bfloat16>(table, H * (n_q + n_k - 1));
        const auto m16 = stored<half>(slope_values.data(), H);
        matrix<"Q", dyn, dyn, bfloat16> Q;
        matrix<"K", dyn, dyn, half> K;
        matrix<"V", dyn, dyn, half> V;
        matrix<"Bt", dyn, dyn, bfloat16> Bt;
        matrix<"m", dyn, dyn, half> m;
        const auto e = softmax(mask(scale(Q^T*K) + Bt[i - j + double(n_k - 1)] - m * (i - j), causal))*V;
        const auto qb = bind(Q, col_major(q16.data(), d, n_q, B, H));
        const auto kb = bind(K, col_major(k16.data(), d, n_k, B, H_kv));
        const auto vb = bind(V, row_major(v16.data(), n_k, d_v, B, H_kv));
        const auto tb = bind(Bt, row_major(t16.data(), 1, n_q + n_k - 1, 1, H));
        const auto mb = bind(m, row_major(m16.data(), 1, 1, 1, H));
        const auto ref = reference::evaluate(e, qb, kb, vb, tb, mb);
        for (const execution mode : {execution::fused, execution::unfused}) {
            INFO((mode == execution::fused ? "fused" : "unfused"));
            const auto [out, info] = run(e, run_options{mode}, qb, kb, vb, tb, mb);
            CHECK(variants::relative_error(ref.values, out.values) <= 1e-4);
            const bool every = reads == stored_reads::every_kernel;
            const bool as_stored = every || mode == execution::fused;
            CHECK(widened(info, "K: stored as f16") == !as_stored);
            CHECK(widened(info, "V: stored as f16") == !as_stored);
            CHECK(widened(info, "Q: stored as bf16") == !as_stored);
            CHECK(widened(info, "Bt: stored as bf16") == !every);  // a table the epilogue reads
            CHECK(widened(info, "m: stored as f16") == !every);
            // widened copies are memory the run allocated
            if (!as_stored) CHECK(info.intermediate_bytes >= (q16.size() + k16.size() + v16.size()) * sizeof(float));
        }
    }

    SECTION("a projection and a bias: W bf16, X f16, b f32 (a product kernel and a pointwise loop)") {
        const std::size_t rows = 23, inner = 17, cols = 29;
        const float* w = in.random(rows * inner, 0.5f);
        const float* x = in.random(inner * cols);
        const float* bias = in.random(rows);
        const auto w16 = stored<bfloat16>(w, rows * inner);
        const auto x16 = stored<half>(x, inner * cols);
        matrix<"W", dyn, dyn, bfloat16> W;
        matrix<"X", dyn, dyn, half> X;
        matrix<"b"> b;
        const auto e = W*X + b;
        const auto wb = bind(W, row_major(w16.data(), rows, inner));
        const auto xb = bind(X, col_major(x16.data(), inner, cols));
        const auto bb = bind(b, row_major(bias, rows, 1));
        const auto ref = reference::evaluate(e, wb, xb, bb);
        for (const execution mode : {execution::fused, execution::unfused}) {
            const auto [out, info] = run(e, run_options{mode}, wb, xb, bb);
            CHECK(variants::relative_error(ref.values, out.values) <= 1e-4);
            CHECK(widened(info, "X: stored as f16") == (reads != stored_reads::every_kernel));
            CHECK(widened(info, "W: stored as bf16") == (reads != stored_reads::every_kernel));
            CHECK_FALSE(notes_name(info, "input b:"));  // f32 is read as it is
        }
    }

    SECTION("scaled dot product within the storage error of each format, against the unrounded fp32 inputs") {
        matrix<"Qf"> Qf;
        matrix<"Kf"> Kf;
        matrix<"Vf"> Vf;
        const auto exact = reference::evaluate(softmax(scale(Qf^T*Kf))*Vf, bind(Qf, col_major(q, d, n_q, B, H)),
                                               bind(Kf, col_major(k, d, n_k, B, H_kv)), bind(Vf, row_major(v, n_k, d_v, B, H_kv)));
        double largest_score_magnitude = 0, largest_value = 0, largest_output = 1;
        for (std::size_t bh = 0; bh < B * H; ++bh) {
            const std::size_t bkv = (bh / H) * H_kv + (bh % H) / (H / H_kv);
            for (std::size_t r = 0; r < n_q; ++r)
                for (std::size_t c = 0; c < n_k; ++c) {
                    double sum = 0;
                    for (std::size_t a = 0; a < d; ++a) sum += std::abs(q[(bh * n_q + r) * d + a]) * std::abs(k[(bkv * n_k + c) * d + a]);
                    largest_score_magnitude = std::max(largest_score_magnitude, sum / std::sqrt(double(d)));
                }
        }
        for (std::size_t n = 0; n < B * H_kv * n_k * d_v; ++n) largest_value = std::max(largest_value, double(std::abs(v[n])));
        for (double o : exact.values) largest_output = std::max(largest_output, std::abs(o));
        auto check_format = [&](auto element_tag) {
            using El = decltype(element_tag);
            const double u = unit_roundoff<El>;
            const double delta = 2 * u * largest_score_magnitude;
            const double bound = (std::expm1(2 * delta) + u) * largest_value + 1e-4 * largest_output;
            const auto q16 = stored<El>(q, B * H * d * n_q), k16 = stored<El>(k, B * H_kv * d * n_k), v16 = stored<El>(v, B * H_kv * n_k * d_v);
            matrix<"Q", dyn, dyn, El> Q;
            matrix<"K", dyn, dyn, El> K;
            matrix<"V", dyn, dyn, El> V;
            for (const execution mode : {execution::fused, execution::unfused}) {
                const auto [out, info] = run(softmax(scale(Q^T*K))*V, run_options{mode}, bind(Q, col_major(q16.data(), d, n_q, B, H)),
                                             bind(K, col_major(k16.data(), d, n_k, B, H_kv)), bind(V, row_major(v16.data(), n_k, d_v, B, H_kv)));
                REQUIRE(out.values.size() == exact.values.size());
                double worst = 0;
                for (std::size_t n = 0; n < out.values.size(); ++n) worst = std::max(worst, std::abs(double(out.values[n]) - exact.values[n]));
                INFO(element<El>::name << (mode == execution::fused ? " fused" : " unfused") << ": error " << worst << ", bound " << bound);
                CHECK(worst <= bound);
            }
        };
        check_format(half{});
        check_format(bfloat16{});
    }
}

}  // namespace attnfuse::testing
