// The Keras feed-forward attention layer (Raffel & Ellis): one score per time
// step from the state alone, e_t = tanh(w^T h_t + b_t), exp, the padding mask
// applied after exp, normalised with + epsilon; the context sums the states.
#include "example_support.hpp"

int main() {
    using namespace attnfuse;
    const std::size_t batch = 4, d = 10, steps = 23;
    matrix<"Hs"> Hs;  // states h_t as columns
    matrix<"w"> w;
    matrix<"bt"> bt;  // one bias per time step
    matrix<"L"> L;    // valid steps per sequence
    const auto h = example::values(batch * d * steps, 1), wv = example::values(d, 2), bv = example::values(steps, 3);
    const std::vector<float> lengths{23, 17, 1, 0};  // the last sequence is all padding: context 0
    auto bh = bind(Hs, col_major(h.data(), d, steps, batch));
    auto bw = bind(w, wv.data(), d, 1);
    auto bb = bind(bt, bv.data(), 1, steps);
    auto bl = bind(L, row_major(lengths.data(), 1, 1, batch));

    const auto kept = where(key_lengths(L), exp(tanh(w^T*Hs + bt)), 0);
    const auto context = kept / (row_sum(kept) + 1e-7) * transpose(Hs);
    return example::check("feed-forward attention with a padding mask", context, bh, bw, bb, bl) ? 0 : 1;
}
