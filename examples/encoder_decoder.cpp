// One decoder step of an encoder-decoder translator: the decoder states (the
// queries) attend over the encoder states h_t (keys and values) with
// Bahdanau's additive score and with Luong's general score.
#include "example_support.hpp"

int main() {
    using namespace attnfuse;
    const std::size_t batch = 3, d = 16, d_a = 24, source_len = 37, target_len = 5;
    matrix<"S"> S;   // decoder states, d x target_len (columns)
    matrix<"H"> H;   // encoder states, d x source_len (columns)
    matrix<"Hv"> Hv; // the same encoder states as rows: the values
    matrix<"w"> w;
    matrix<"W1"> W1;
    matrix<"W2"> W2;
    matrix<"b"> b;
    matrix<"W"> W;
    const auto s = example::values(batch * d * target_len, 1), h = example::values(batch * d * source_len, 2),
               wv = example::values(d_a, 3), w1 = example::values(d_a * d, 4, 0.3f), w2 = example::values(d_a * d, 5, 0.3f),
               bv = example::values(d_a, 6), wg = example::values(d * d, 7, 0.3f);
    auto bs = bind(S, col_major(s.data(), d, target_len, batch));
    auto bh = bind(H, col_major(h.data(), d, source_len, batch));
    auto bhv = bind(Hv, row_major(h.data(), source_len, d, batch));  // same bytes, read as rows
    auto bw = bind(w, wv.data(), d_a, 1);
    auto bw1 = bind(W1, w1.data(), d_a, d);
    auto bw2 = bind(W2, w2.data(), d_a, d);
    auto bb = bind(b, bv.data(), d_a, 1);
    auto bW = bind(W, wg.data(), d, d);

    bool ok = example::check("Bahdanau: c = softmax(w^T tanh(W1 s + W2 h + b)) h", softmax(additive(w, W1*S + b, W2*H))*Hv,
                             bs, bh, bhv, bw, bw1, bw2, bb);
    ok = example::check("Luong general: c = softmax(s^T W h) h", softmax(S^T*W*H)*Hv, bs, bh, bhv, bW) && ok;
    return ok ? 0 : 1;
}
