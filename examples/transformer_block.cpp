// A Transformer multi-head self-attention block as one expression, the way
// nn.MultiheadAttention computes it: per-head projections with biases (one
// weight matrix and one bias column per head, bound with heads = h), scaled
// dot product, padding and future masks, dropout on the weights, the heads
// side by side (concat_heads), the output projection W_o and its bias, and
// the residual. Everything after concat_heads runs once per batch entry.
#include "example_support.hpp"

int main() {
    using namespace attnfuse;
    const std::size_t batch = 2, heads = 4, d_model = 24, d_head = 6, n = 29;
    matrix<"X"> X;    // the sequence, d_model x n (columns)
    matrix<"Wq"> Wq;  // d_head x d_model, one per head
    matrix<"Wk"> Wk;
    matrix<"Wv"> Wv;
    matrix<"bq"> bq;  // d_head x 1, one per head
    matrix<"bk"> bk;
    matrix<"bv"> bv;
    matrix<"Wo"> Wo;  // d_model x (heads * d_head), as torch's out_proj.weight
    matrix<"bo"> bo;  // 1 x d_model
    matrix<"L"> L;
    const auto x = example::values(batch * d_model * n, 1), wq = example::values(heads * d_head * d_model, 2, 0.4f),
               wk = example::values(heads * d_head * d_model, 3, 0.4f), wv = example::values(heads * d_head * d_model, 4, 0.4f),
               wo = example::values(d_model * heads * d_head, 5, 0.4f), biases = example::values(3 * heads * d_head + d_model, 6);
    const std::vector<float> lengths{29, 20};
    const auto bindings = std::tuple{bind(X, col_major(x.data(), d_model, n, batch)),
                                     bind(Wq, row_major(wq.data(), d_head, d_model, 1, heads)),
                                     bind(Wk, row_major(wk.data(), d_head, d_model, 1, heads)),
                                     bind(Wv, row_major(wv.data(), d_head, d_model, 1, heads)),
                                     bind(bq, row_major(biases.data(), d_head, 1, 1, heads)),
                                     bind(bk, row_major(biases.data() + heads * d_head, d_head, 1, 1, heads)),
                                     bind(bv, row_major(biases.data() + 2 * heads * d_head, d_head, 1, 1, heads)),
                                     bind(Wo, row_major(wo.data(), d_model, heads * d_head)),
                                     bind(bo, row_major(biases.data() + 3 * heads * d_head, 1, d_model)),
                                     bind(L, row_major(lengths.data(), 1, 1, batch))};

    // each head: attention(W_q X + b_q, W_k X + b_k, W_v X + b_v), n x d_head
    const auto head = dropout(softmax(mask(scale(transpose(Wq*X + bq)*(Wk*X + bk)), causal && key_lengths(L))), 0.1, 2024) *
                      transpose(Wv*X + bv);
    // the block: heads side by side (n x heads*d_head), W_o, its bias, the residual (n x d_model)
    const auto block = concat_heads(head) * transpose(Wo) + bo + transpose(X);
    const bool ok = std::apply([&](const auto&... b) { return example::check("multi-head self-attention block", block, b...); },
                               bindings);

    const auto out = std::apply([&](const auto&... b) { return cpu::run(block, b...); }, bindings).output;
    std::printf("  block output: %zu batch x %zu heads of %zu x %zu, out[0][0] = %.6f\n", out.batch, out.heads, out.rows, out.cols,
                out.values[0]);
    return ok ? 0 : 1;
}
