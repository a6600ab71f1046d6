// Luong's local attention (monotonic and predictive) and hard attention.
#include "example_support.hpp"

int main() {
    using namespace attnfuse;
    const std::size_t heads = 2, d = 12, n = 41;
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    matrix<"vp"> vp;
    matrix<"Wp"> Wp;
    const auto q = example::values(heads * d * n, 1), k = example::values(heads * d * n, 2), v = example::values(heads * n * d, 3),
               vpv = example::values(d, 4), wpv = example::values(d * d, 5, 0.3f);
    auto bq = bind(Q, col_major(q.data(), d, n, 1, heads));
    auto bk = bind(K, col_major(k.data(), d, n, 1, heads));
    auto bv = bind(V, row_major(v.data(), n, d, 1, heads));
    auto bvp = bind(vp, vpv.data(), d, 1);
    auto bwp = bind(Wp, wpv.data(), d, d);

    const double D = 3;
    bool ok = example::check("local-m: softmax over |j - i| <= D", softmax(mask(scale(Q^T*K), abs(j - i) <= D))*V, bq, bk, bv);

    // local-p: a predicted centre p per query, the windowed softmax, then a
    // Gaussian around p (sigma = D/2) without renormalising
    const auto p = double(n) * sigmoid(transpose(vp^T*tanh(Wp*Q)));
    const auto local_p = (softmax(mask(scale(Q^T*K), abs(j - p) <= D)) % exp(-square(j - p) / (2 * (D / 2) * (D / 2))))*V;
    ok = example::check("local-p: predicted window and Gaussian", local_p, bq, bk, bv, bvp, bwp) && ok;

    ok = example::check("hard: the value of the best-scoring key", hard(Q^T*K)*V, bq, bk, bv) && ok;
    return ok ? 0 : 1;
}
