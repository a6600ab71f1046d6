// A Transformer multi-head self-attention block: per-head projections
// without bias (one weight matrix per head, bound with heads = h), scaled
// dot product, padding and future masks, dropout on the weights, then the
// output projection. Concatenating the heads and multiplying by W_o is the
// sum over heads of head_i * W_o^i, the last step, done here in C++.
#include "example_support.hpp"

int main() {
    using namespace attnfuse;
    const std::size_t batch = 2, heads = 4, d_model = 24, d_head = 6, n = 29;
    matrix<"X"> X;    // the sequence, d_model x n (columns)
    matrix<"Wq"> Wq;  // d_head x d_model, one per head
    matrix<"Wk"> Wk;
    matrix<"Wv"> Wv;
    matrix<"Wo"> Wo;  // d_head x d_model, one per head: W_o's rows for head i
    matrix<"L"> L;
    const auto x = example::values(batch * d_model * n, 1), wq = example::values(heads * d_head * d_model, 2, 0.4f),
               wk = example::values(heads * d_head * d_model, 3, 0.4f), wv = example::values(heads * d_head * d_model, 4, 0.4f),
               wo = example::values(heads * d_head * d_model, 5, 0.4f);
    const std::vector<float> lengths{29, 20};
    auto bx = bind(X, col_major(x.data(), d_model, n, batch));
    auto bq = bind(Wq, row_major(wq.data(), d_head, d_model, 1, heads));
    auto bk = bind(Wk, row_major(wk.data(), d_head, d_model, 1, heads));
    auto bv = bind(Wv, row_major(wv.data(), d_head, d_model, 1, heads));
    auto bo = bind(Wo, row_major(wo.data(), d_head, d_model, 1, heads));
    auto bl = bind(L, row_major(lengths.data(), 1, 1, batch));

    // each head's contribution to the output: attention(W_q X, W_k X, W_v X) W_o^i
    const auto head = dropout(softmax(mask(scale(transpose(Wq*X)*(Wk*X)), causal && key_lengths(L))), 0.1, 2024) *
                      transpose(Wv*X) * Wo;
    bool ok = example::check("multi-head self-attention, one head's projected output", head, bx, bq, bk, bv, bo, bl);

    // the same block with biases on the projections (one bias column per head)
    matrix<"bq"> bq_;
    matrix<"bk"> bk_;
    matrix<"bv"> bv_;
    const auto biases = example::values(3 * heads * d_head, 6);
    const auto with_bias = dropout(softmax(mask(scale(transpose(Wq*X + bq_)*(Wk*X + bk_)), causal && key_lengths(L))), 0.1, 2024) *
                           transpose(Wv*X + bv_) * Wo;
    ok = example::check("multi-head self-attention with projection biases", with_bias, bx, bq, bk, bv, bo, bl,
                        bind(bq_, row_major(biases.data(), d_head, 1, 1, heads)),
                        bind(bk_, row_major(biases.data() + heads * d_head, d_head, 1, 1, heads)),
                        bind(bv_, row_major(biases.data() + 2 * heads * d_head, d_head, 1, 1, heads))) && ok;

    // concat + W_o: the sum over heads
    const auto per_head = cpu::run(head, bx, bq, bk, bv, bo, bl).output;
    std::vector<float> out(batch * n * d_model, 0.0f);
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t t = 0; t < n; ++t)
                for (std::size_t c = 0; c < d_model; ++c) out[(b * n + t) * d_model + c] += per_head.at(b, h, t, c);
    std::printf("  block output: %zu x %zu per sequence, out[0][0] = %.6f\n", n, d_model, out[0]);
    return ok ? 0 : 1;
}
