// Every row of shared/VARIANTS.md as one DSL expression, evaluated by the
// double-precision reference and compared element by element with the same
// formula written out independently here with plain loops: nothing on the
// expected side calls an attnfuse evaluator (only the dropout hash of ops.hpp,
// which is the specification of the mask).
//
// Notation is the seeds': Q is d_k x n_q (queries as columns), K is d_k x n_k,
// V is n_k x d_v (values as rows), the context C = A^T V is n_q x d_v. Inside
// score expressions `i` is the query index (row of S^T) and `j` the key index.
// Sizes are odd on purpose (d = 5, n_q = 7, n_k = 11, 13, 61, 517, ...), with
// batch > 1 everywhere and heads > 1 wherever a variant has heads.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <attnfuse/dsl.hpp>

// `i`, `j`, `T`, `qf`, `kf`, `causal` are DSL names in this file: no local
// variable takes them, loops use b, h, r, c, a, t, u.
using namespace attnfuse;

namespace {

// ------------------------------------------------------------ inputs ---

// Deterministic values in [-1, 1), exactly representable as float (24 bits).
std::vector<float> random_floats(std::size_t n, std::uint32_t seed) {
    std::uint32_t state = seed * 2654435761U + 12345U;
    std::vector<float> out(n);
    for (float& x : out) {
        state = state * 1664525U + 1013904223U;
        x = static_cast<float>(static_cast<double>(state >> 8) / 8388608.0 - 1.0);
    }
    return out;
}

// batch x heads matrices of rows x cols, packed. `column_major` stores each
// matrix by columns: the seeds' d x n column-stacked Q and K then have the
// bytes of the Transformer's n x d row-major arrays.
struct host_tensor {
    std::size_t batch = 1, heads = 1, rows = 1, cols = 1;
    bool column_major = false;
    std::vector<float> data;

    std::size_t offset(std::size_t b, std::size_t h, std::size_t r, std::size_t c) const {
        return (b * heads + h) * rows * cols + (column_major ? c * rows + r : r * cols + c);
    }
    double operator()(std::size_t b, std::size_t h, std::size_t r, std::size_t c) const {
        return data[offset(b, h, r, c)];
    }
    float& at(std::size_t b, std::size_t h, std::size_t r, std::size_t c) { return data[offset(b, h, r, c)]; }
    tensor_view<float> view() const {
        return column_major ? col_major(data.data(), rows, cols, batch, heads)
                            : row_major(data.data(), rows, cols, batch, heads);
    }
};

host_tensor random_tensor(std::size_t batch, std::size_t heads, std::size_t rows, std::size_t cols, std::uint32_t seed,
                     bool column_major = false) {
    return {batch, heads, rows, cols, column_major, random_floats(batch * heads * rows * cols, seed)};
}
host_tensor filled(std::size_t batch, std::size_t heads, std::size_t rows, std::size_t cols, std::vector<float> values) {
    return {batch, heads, rows, cols, false, std::move(values)};
}

// ------------------------------------------ the independent side ---

struct mat {
    std::size_t rows = 0, cols = 0;
    std::vector<double> v;
    mat(std::size_t r, std::size_t c, double fill = 0) : rows(r), cols(c), v(r * c, fill) {}
    double& operator()(std::size_t r, std::size_t c) { return v[r * cols + c]; }
    double operator()(std::size_t r, std::size_t c) const { return v[r * cols + c]; }
};

// Matrix (b, h) of a tensor, its floats read as doubles.
mat slice(const host_tensor& x, std::size_t b, std::size_t h) {
    mat out(x.rows, x.cols);
    for (std::size_t r = 0; r < x.rows; ++r)
        for (std::size_t c = 0; c < x.cols; ++c) out(r, c) = x(b, h, r, c);
    return out;
}

mat mul(const mat& x, const mat& y) {
    REQUIRE(x.cols == y.rows);
    mat out(x.rows, y.cols);
    for (std::size_t r = 0; r < x.rows; ++r)
        for (std::size_t c = 0; c < y.cols; ++c)
            for (std::size_t a = 0; a < x.cols; ++a) out(r, c) += x(r, a) * y(a, c);
    return out;
}

mat trans(const mat& x) {
    mat out(x.cols, x.rows);
    for (std::size_t r = 0; r < x.rows; ++r)
        for (std::size_t c = 0; c < x.cols; ++c) out(c, r) = x(r, c);
    return out;
}

// x(r, c) = f(r, c, x(r, c)) everywhere.
template <class F>
mat map(mat x, F f) {
    for (std::size_t r = 0; r < x.rows; ++r)
        for (std::size_t c = 0; c < x.cols; ++c) x(r, c) = f(r, c, x(r, c));
    return x;
}

// Softmax along each row over the entries where keep(r, c) holds; the other
// entries, and every entry of a row where nothing is kept, get weight 0.
template <class Keep>
mat softmax_where(const mat& s, Keep keep) {
    mat out(s.rows, s.cols);
    for (std::size_t r = 0; r < s.rows; ++r) {
        double top = -std::numeric_limits<double>::infinity();
        for (std::size_t c = 0; c < s.cols; ++c)
            if (keep(r, c)) top = std::max(top, s(r, c));
        if (top == -std::numeric_limits<double>::infinity()) continue;
        double total = 0;
        for (std::size_t c = 0; c < s.cols; ++c)
            if (keep(r, c)) total += out(r, c) = std::exp(s(r, c) - top);
        for (std::size_t c = 0; c < s.cols; ++c) out(r, c) /= total;
    }
    return out;
}
mat softmax_all(const mat& s) {
    return softmax_where(s, [](std::size_t, std::size_t) { return true; });
}

// ------------------------------------------------------- comparing ---

constexpr double tolerance = 1e-9;  // relative, with an absolute floor at magnitudes below 1

// got(b, h, r, c) against expected(b, h) (a mat), every element.
template <class Got, class Expected>
void compare(std::size_t batch, std::size_t heads, std::size_t rows, std::size_t cols, Got got, Expected expected) {
    std::size_t compared = 0, bad = 0;
    std::string first;
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t h = 0; h < heads; ++h) {
            const mat want = expected(b, h);
            REQUIRE(want.rows == rows);
            REQUIRE(want.cols == cols);
            for (std::size_t r = 0; r < rows; ++r)
                for (std::size_t c = 0; c < cols; ++c, ++compared) {
                    const double g = got(b, h, r, c), w = want(r, c);
                    if (std::abs(g - w) <= tolerance * std::max(1.0, std::abs(w))) continue;  // NaN fails too
                    if (bad++ == 0) {
                        std::ostringstream s;
                        s.precision(17);
                        s << "first mismatch at (b=" << b << ", h=" << h << ", " << r << ", " << c << "): got " << g
                          << ", expected " << w;
                        first = s.str();
                    }
                }
        }
    INFO(first);
    CHECK(compared == batch * heads * rows * cols);
    CHECK(bad == 0);
}

template <class Expected>
void check_close(const reference::result& got, std::size_t batch, std::size_t heads, Expected expected) {
    REQUIRE(got.batch == batch);
    REQUIRE(got.heads == heads);
    REQUIRE(got.values.size() == batch * heads * got.rows * got.cols);
    compare(batch, heads, got.rows, got.cols,
            [&](std::size_t b, std::size_t h, std::size_t r, std::size_t c) { return got.at(b, h, r, c); }, expected);
}

// ------------------------------------------- the usual Q, K and V ---

// The inputs of most rows, in the seeds' notation.
constexpr matrix<"Q"> Q{};  // d_k x n_q
constexpr matrix<"K"> K{};  // d_k x n_k
constexpr matrix<"V"> V{};  // n_k x d_v

struct qkv {
    host_tensor q, k, v;
};
// Q (d x n_q) and K (d x n_k) column-major, V (n_k x d_v) row-major; K and V
// have kv_heads heads (0: as many as Q).
qkv make_qkv(std::size_t batch, std::size_t heads, std::size_t d, std::size_t nq, std::size_t nk, std::size_t dv,
             std::uint32_t seed, std::size_t kv_heads = 0) {
    if (kv_heads == 0) kv_heads = heads;
    return {random_tensor(batch, heads, d, nq, seed, true), random_tensor(batch, kv_heads, d, nk, seed + 1, true),
            random_tensor(batch, kv_heads, nk, dv, seed + 2)};
}

template <class E, class... More>
reference::result eval_qkv(const E& e, const qkv& x, const More&... more) {
    return reference::evaluate(e, bind(Q, x.q.view()), bind(K, x.k.view()), bind(V, x.v.view()), more...);
}

// factor * q_tau . k_t for (b, h), independently.
mat qk_scores(const qkv& x, std::size_t b, std::size_t h, double factor, std::size_t kv_head) {
    return map(mul(trans(slice(x.q, b, h)), slice(x.k, b, kv_head)),
               [&](std::size_t, std::size_t, double s) { return s * factor; });
}
mat qk_scores(const qkv& x, std::size_t b, std::size_t h, double factor) { return qk_scores(x, b, h, factor, h); }

}  // namespace

// =========================================================================
// Similarity functions f_sim
// =========================================================================

TEST_CASE("f_sim dot product: S^T = Q^T K", "[variants]") {
    const std::size_t batch = 2, heads = 3;
    const qkv x = make_qkv(batch, heads, 5, 7, 11, 3, 10);
    const auto scores = Q^T*K;
    const auto attention = softmax(Q^T*K)*V;

    check_close(eval_qkv(scores, x), batch, heads, [&](auto b, auto h) { return qk_scores(x, b, h, 1.0); });
    check_close(eval_qkv(attention, x), batch, heads,
                [&](auto b, auto h) { return mul(softmax_all(qk_scores(x, b, h, 1.0)), slice(x.v, b, h)); });
}

TEST_CASE("f_sim scaled dot product: s = q.k / sqrt(d_k)", "[variants]") {
    const std::size_t batch = 2, heads = 3, d = 5;
    const qkv x = make_qkv(batch, heads, d, 7, 11, 3, 20);
    const auto scores = scale(Q^T*K);
    const auto attention = softmax(scale(Q^T*K))*V;

    const double factor = 1.0 / std::sqrt(double(d));
    check_close(eval_qkv(scores, x), batch, heads, [&](auto b, auto h) { return qk_scores(x, b, h, factor); });
    check_close(eval_qkv(attention, x), batch, heads,
                [&](auto b, auto h) { return mul(softmax_all(qk_scores(x, b, h, factor)), slice(x.v, b, h)); });
}

TEST_CASE("f_sim general / multiplicative (Luong): S^T = Q^T W K", "[variants]") {
    const std::size_t batch = 2, heads = 3, dq = 4, dk = 6, nq = 7, nk = 11, dv = 3;
    const host_tensor q = random_tensor(batch, heads, dq, nq, 30, true), k = random_tensor(batch, heads, dk, nk, 31, true),
                 v = random_tensor(batch, heads, nk, dv, 32), w = random_tensor(1, 1, dq, dk, 33);  // W shared
    matrix<"W"> W;
    const auto scores = Q^T*W*K;
    const auto attention = softmax(Q^T*W*K)*V;

    auto expected_scores = [&](std::size_t b, std::size_t h) {
        mat s(nq, nk);
        for (std::size_t t = 0; t < nq; ++t)
            for (std::size_t u = 0; u < nk; ++u)
                for (std::size_t a = 0; a < dq; ++a)
                    for (std::size_t c = 0; c < dk; ++c) s(t, u) += q(b, h, a, t) * w(0, 0, a, c) * k(b, h, c, u);
        return s;
    };
    auto run = [&](const auto& e) {
        return reference::evaluate(e, bind(Q, q.view()), bind(K, k.view()), bind(V, v.view()), bind(W, w.view()));
    };
    check_close(run(scores), batch, heads, expected_scores);
    check_close(run(attention), batch, heads,
                [&](auto b, auto h) { return mul(softmax_all(expected_scores(b, h)), slice(v, b, h)); });
}

TEST_CASE("f_sim additive / concat (Bahdanau): s = w^T tanh(W1 q + W2 k + b)", "[variants]") {
    const std::size_t batch = 2, heads = 3, dq = 4, dk = 6, da = 5, nq = 7, nk = 11, dv = 3;
    const host_tensor q = random_tensor(batch, heads, dq, nq, 40, true), k = random_tensor(batch, heads, dk, nk, 41, true),
                 v = random_tensor(batch, heads, nk, dv, 42);
    const host_tensor w1 = random_tensor(1, 1, da, dq, 43), w2 = random_tensor(1, 1, da, dk, 44),
                 bias_values = random_tensor(1, 1, da, 1, 45), w_values = random_tensor(1, 1, da, 1, 46);
    matrix<"W1"> W1;
    matrix<"W2"> W2;
    matrix<"b"> bias;
    matrix<"w"> w;
    const auto scores = additive(w, W1*Q + bias, W2*K);
    const auto attention = softmax(additive(w, W1*Q + bias, W2*K))*V;

    auto expected_scores = [&](std::size_t b, std::size_t h) {
        mat s(nq, nk);
        for (std::size_t t = 0; t < nq; ++t)
            for (std::size_t u = 0; u < nk; ++u)
                for (std::size_t a = 0; a < da; ++a) {
                    double pre = 0;
                    for (std::size_t c = 0; c < dq; ++c) pre += w1(0, 0, a, c) * q(b, h, c, t);
                    pre += bias_values(0, 0, a, 0);
                    for (std::size_t c = 0; c < dk; ++c) pre += w2(0, 0, a, c) * k(b, h, c, u);
                    s(t, u) += w_values(0, 0, a, 0) * std::tanh(pre);
                }
        return s;
    };
    auto run = [&](const auto& e) {
        return reference::evaluate(e, bind(Q, q.view()), bind(K, k.view()), bind(V, v.view()), bind(W1, w1.view()),
                                   bind(W2, w2.view()), bind(bias, bias_values.view()), bind(w, w_values.view()));
    };
    check_close(run(scores), batch, heads, expected_scores);
    check_close(run(attention), batch, heads,
                [&](auto b, auto h) { return mul(softmax_all(expected_scores(b, h)), slice(v, b, h)); });
}

TEST_CASE("f_sim self, general: e_ti = h_t^T W h_i over one sequence h", "[variants]") {
    const std::size_t batch = 2, heads = 3, d = 5, n = 13;
    const host_tensor hs = random_tensor(batch, heads, d, n, 50, true), w = random_tensor(1, heads, d, d, 51);
    matrix<"H"> H;
    matrix<"W"> W;
    // One input H in every role: queries and keys are its columns, the values
    // its columns too (rows of H^T).
    const auto attention = softmax(H^T*W*H)*(H^T);

    const auto got = reference::evaluate(attention, bind(H, hs.view()), bind(W, w.view()));
    check_close(got, batch, heads, [&](auto b, auto h) {
        mat e(n, n);
        for (std::size_t t = 0; t < n; ++t)
            for (std::size_t u = 0; u < n; ++u)
                for (std::size_t a = 0; a < d; ++a)
                    for (std::size_t c = 0; c < d; ++c) e(t, u) += hs(b, h, a, t) * w(0, h, a, c) * hs(b, h, c, u);
        return mul(softmax_all(e), trans(slice(hs, b, h)));
    });
}

TEST_CASE("f_sim self, query-free: e_i = v^T tanh(W h_i)", "[variants]") {
    const std::size_t batch = 3, heads = 2, d = 5, da = 4, n = 13;
    const host_tensor hs = random_tensor(batch, heads, d, n, 60, true), w = random_tensor(1, 1, da, d, 61),
                 v_values = random_tensor(1, 1, da, 1, 62);
    matrix<"H"> H;
    matrix<"W"> W;
    matrix<"v"> v;
    // One score per position (1 x n), softmax along it, context 1 x d.
    const auto attention = softmax(v^T*tanh(W*H))*(H^T);

    const auto got = reference::evaluate(attention, bind(H, hs.view()), bind(W, w.view()), bind(v, v_values.view()));
    check_close(got, batch, heads, [&](auto b, auto h) {
        mat e(1, n);
        for (std::size_t u = 0; u < n; ++u)
            for (std::size_t a = 0; a < da; ++a) {
                double pre = 0;
                for (std::size_t c = 0; c < d; ++c) pre += w(0, 0, a, c) * hs(b, h, c, u);
                e(0, u) += v_values(0, 0, a, 0) * std::tanh(pre);
            }
        return mul(softmax_all(e), trans(slice(hs, b, h)));
    });
}

TEST_CASE("f_sim feed-forward (Raffel & Ellis): e_t = tanh(w^T h_t + b_t), mask after exp, + eps", "[variants]") {
    // The seed's Keras layer: x is (samples, steps, features), i.e. per sample
    // a T x d row-major array = the d x T column-stacked H; b has one entry
    // per time step; the padding mask multiplies exp(e) before normalising.
    const std::size_t batch = 3, d = 5, steps = 13;
    const double eps = 1e-7;  // K.epsilon()
    const host_tensor hs = random_tensor(batch, 1, d, steps, 70, true), w_values = random_tensor(1, 1, d, 1, 71),
                 b_values = random_tensor(1, 1, 1, steps, 72);
    const host_tensor lengths = filled(batch, 1, 1, 1, {13, 6, 0});  // the last sequence is all padding
    matrix<"H"> H;
    matrix<"w"> w;
    matrix<"bt"> bt;
    matrix<"L"> L;
    const auto a = where(key_lengths(L), exp(tanh(w^T*H + bt)), 0.0);  // 1 x T
    const auto attention = a / (row_sum(a) + eps) * (H^T);              // 1 x d

    const auto got = reference::evaluate(attention, bind(H, hs.view()), bind(w, w_values.view()),
                                         bind(bt, b_values.view()), bind(L, lengths.view()));
    check_close(got, batch, 1, [&](auto b, auto) {
        mat weights(1, steps);
        double total = 0;
        for (std::size_t t = 0; t < steps; ++t) {
            double e = b_values(0, 0, 0, t);
            for (std::size_t c = 0; c < d; ++c) e += w_values(0, 0, c, 0) * hs(b, 0, c, t);
            weights(0, t) = double(t) < lengths(b, 0, 0, 0) ? std::exp(std::tanh(e)) : 0.0;
            total += weights(0, t);
        }
        return mul(map(weights, [&](std::size_t, std::size_t, double x) { return x / (total + eps); }),
                   trans(slice(hs, b, 0)));
    });
}

// =========================================================================
// Normalisations f_norm
// =========================================================================

TEST_CASE("f_norm softmax: a = exp(s) / sum exp(s), stable at large scores", "[variants]") {
    const std::size_t batch = 2, heads = 3;
    const qkv x = make_qkv(batch, heads, 5, 7, 11, 3, 80);
    // Scores in the hundreds: exp without subtracting the row maximum overflows.
    const auto weights = softmax(scale(Q^T*K, 1000.0));
    const auto attention = weights*V;
    double largest = 0;
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t h = 0; h < heads; ++h)
            for (double s : qk_scores(x, b, h, 1000.0).v) largest = std::max(largest, s);
    REQUIRE(largest > 710);  // exp(710) is already past the largest double

    const auto got = eval_qkv(weights, x);
    check_close(got, batch, heads, [&](auto b, auto h) { return softmax_all(qk_scores(x, b, h, 1000.0)); });
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t r = 0; r < got.rows; ++r) {
                double total = 0;
                for (std::size_t c = 0; c < got.cols; ++c) total += got.at(b, h, r, c);
                CHECK(total == Approx(1.0).epsilon(1e-12));
            }
    check_close(eval_qkv(attention, x), batch, heads,
                [&](auto b, auto h) { return mul(softmax_all(qk_scores(x, b, h, 1000.0)), slice(x.v, b, h)); });
}

TEST_CASE("f_norm weighted softmax: softmax of w^T e_tt' with e = q (.) k vector-valued", "[variants]") {
    const std::size_t batch = 2, heads = 3, d = 5, nq = 7, nk = 11;
    const qkv x = make_qkv(batch, heads, d, nq, nk, 3, 90);
    const host_tensor w_values = random_tensor(1, 1, d, 1, 93);
    matrix<"w"> w;
    const auto attention = softmax(pairwise(w, Q, K, qf % kf))*V;

    check_close(eval_qkv(attention, x, bind(w, w_values.view())), batch, heads, [&](auto b, auto h) {
        mat s(nq, nk);
        for (std::size_t t = 0; t < nq; ++t)
            for (std::size_t u = 0; u < nk; ++u)
                for (std::size_t a = 0; a < d; ++a)
                    s(t, u) += w_values(0, 0, a, 0) * (x.q(b, h, a, t) * x.k(b, h, a, u));
        return mul(softmax_all(s), slice(x.v, b, h));
    });
}

TEST_CASE("f_norm masked softmax: weight exactly 0, fully masked row gives zero context", "[variants]") {
    const std::size_t batch = 3, heads = 2, nq = 7, nk = 11;
    const qkv x = make_qkv(batch, heads, 5, nq, nk, 3, 100);
    // A Keras-style key mask (1 keep, 0 padding) per sequence, shared by the
    // heads; the last sequence masks every key. Queries past Lq are masked too.
    std::vector<float> keep_keys(batch * nk);
    for (std::size_t b = 0; b < 2; ++b)
        for (std::size_t c = 0; c < nk; ++c) keep_keys[b * nk + c] = (c + b) % 3 == 0 ? 0.0f : 1.0f;
    const host_tensor mask_values = filled(batch, 1, 1, nk, keep_keys), query_len = filled(batch, 1, 1, 1, {7, 3, 7});
    matrix<"M"> M;
    matrix<"Lq"> Lq;
    const auto weights = softmax(mask(scale(Q^T*K), M && query_lengths(Lq)));
    const auto attention = weights*V;

    auto keep = [&](std::size_t b, std::size_t r, std::size_t c) {
        return mask_values(b, 0, 0, c) != 0 && double(r) < query_len(b, 0, 0, 0);
    };
    auto expected_weights = [&](std::size_t b, std::size_t h) {
        return softmax_where(qk_scores(x, b, h, 1 / std::sqrt(5.0)),
                             [&](std::size_t r, std::size_t c) { return keep(b, r, c); });
    };
    const auto w = eval_qkv(weights, x, bind(M, mask_values.view()), bind(Lq, query_len.view()));
    const auto ctx = eval_qkv(attention, x, bind(M, mask_values.view()), bind(Lq, query_len.view()));
    check_close(w, batch, heads, expected_weights);
    check_close(ctx, batch, heads, [&](auto b, auto h) { return mul(expected_weights(b, h), slice(x.v, b, h)); });

    std::size_t not_zero = 0, empty_rows = 0;
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t r = 0; r < nq; ++r) {
                bool any = false;
                for (std::size_t c = 0; c < nk; ++c) {
                    any = any || keep(b, r, c);
                    if (!keep(b, r, c) && w.at(b, h, r, c) != 0.0) ++not_zero;
                }
                if (any) continue;
                ++empty_rows;
                for (std::size_t c = 0; c < ctx.cols; ++c)
                    if (ctx.at(b, h, r, c) != 0.0) ++not_zero;  // NaN counts too
            }
    CHECK(empty_rows == heads * (4 + nq));  // sequence 1 from row 3 on, all of sequence 2
    CHECK(not_zero == 0);
}

TEST_CASE("f_norm hard: one-hot argmax, ties to the lowest t", "[variants]") {
    const std::size_t batch = 2, heads = 2, d = 5, nq = 7, nk = 11;
    qkv x = make_qkv(batch, heads, d, nq, nk, 3, 110);
    // Keys 4 and 9 identical and long: they tie, and win for many queries.
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t a = 0; a < d; ++a) x.k.at(b, h, a, 9) = x.k.at(b, h, a, 4) = 4 * x.k.at(b, h, a, 4);
    const auto weights = hard(Q^T*K);
    const auto attention = hard(Q^T*K)*V;

    std::size_t ties = 0;
    auto one_hot = [&](std::size_t b, std::size_t h) {
        const mat s = qk_scores(x, b, h, 1.0);
        mat out(nq, nk);
        for (std::size_t r = 0; r < nq; ++r) {
            std::size_t best = 0;
            for (std::size_t c = 1; c < nk; ++c)
                if (s(r, c) > s(r, best)) best = c;
            out(r, best) = 1;
            if (best == 4 && s(r, 9) == s(r, 4)) ++ties;
        }
        return out;
    };
    const auto w = eval_qkv(weights, x);
    check_close(w, batch, heads, one_hot);
    CHECK(ties > 0);
    for (double value : w.values) CHECK((value == 0.0 || value == 1.0));
    check_close(eval_qkv(attention, x), batch, heads,
                [&](auto b, auto h) { return mul(one_hot(b, h), slice(x.v, b, h)); });
}

TEST_CASE("f_norm local-m (monotonic): softmax over |t - tau| <= D", "[variants]") {
    const std::size_t batch = 2, heads = 3, nq = 7, nk = 11;
    const double D = 2;
    const qkv x = make_qkv(batch, heads, 5, nq, nk, 3, 120);
    const auto attention = softmax(mask(scale(Q^T*K), abs(j - i) <= D))*V;

    check_close(eval_qkv(attention, x), batch, heads, [&](auto b, auto h) {
        const mat a = softmax_where(qk_scores(x, b, h, 1 / std::sqrt(5.0)), [&](std::size_t r, std::size_t c) {
            return std::abs(double(c) - double(r)) <= D;
        });
        return mul(a, slice(x.v, b, h));
    });
}

TEST_CASE("f_norm local-p (predictive): p = n_k sigmoid(v_p^T tanh(W_p q)), window and Gaussian", "[variants]") {
    const std::size_t batch = 2, heads = 3, d = 5, dp = 4, nq = 7, nk = 11;
    const double D = 2, sigma = D / 2;
    const qkv x = make_qkv(batch, heads, d, nq, nk, 3, 130);
    const host_tensor wp_values = random_tensor(1, 1, dp, d, 133), vp_values = random_tensor(1, 1, dp, 1, 134);
    matrix<"Wp"> Wp;
    matrix<"vp"> vp;
    // p_tau in (0, n_k) with keys at t = 0 .. n_k - 1; no renormalisation
    // after the Gaussian, as in Luong et al.
    const auto p = double(nk) * sigmoid(transpose(vp^T*tanh(Wp*Q)));  // n_q x 1
    const auto weights = softmax(mask(scale(Q^T*K), abs(j - p) <= D)) % exp(-square(j - p) / (2 * sigma * sigma));
    const auto attention = weights*V;

    auto expected_weights = [&](std::size_t b, std::size_t h) {
        std::vector<double> pos(nq);
        for (std::size_t t = 0; t < nq; ++t) {
            double y = 0;
            for (std::size_t a = 0; a < dp; ++a) {
                double pre = 0;
                for (std::size_t c = 0; c < d; ++c) pre += wp_values(0, 0, a, c) * x.q(b, h, c, t);
                y += vp_values(0, 0, a, 0) * std::tanh(pre);
            }
            pos[t] = double(nk) / (1 + std::exp(-y));
        }
        const mat a = softmax_where(qk_scores(x, b, h, 1 / std::sqrt(double(d))), [&](std::size_t r, std::size_t c) {
            return std::abs(double(c) - pos[r]) <= D;
        });
        return map(a, [&](std::size_t r, std::size_t c, double value) {
            return value * std::exp(-(double(c) - pos[r]) * (double(c) - pos[r]) / (2 * sigma * sigma));
        });
    };
    auto run = [&](const auto& e) { return eval_qkv(e, x, bind(Wp, wp_values.view()), bind(vp, vp_values.view())); };
    check_close(run(weights), batch, heads, expected_weights);
    check_close(run(attention), batch, heads,
                [&](auto b, auto h) { return mul(expected_weights(b, h), slice(x.v, b, h)); });
}

// =========================================================================
// How Q, K and V relate
// =========================================================================

TEST_CASE("relation source-target: Q != K = V (one encoder buffer bound as K and V)", "[variants]") {
    const std::size_t batch = 2, heads = 3, d = 5, nq = 7, nk = 13;
    const host_tensor target = random_tensor(batch, heads, d, nq, 140, true);  // decoder states, d x n_q
    const host_tensor source = random_tensor(batch, heads, nk, d, 141);        // encoder states h_t as rows
    const auto attention = softmax(scale(Q^T*K))*V;

    // The same bytes are K (d x n_k, by columns) and V (n_k x d, by rows): no copy.
    const auto got = reference::evaluate(attention, bind(Q, target.view()),
                                         bind(K, col_major(source.data.data(), d, nk, batch, heads)),
                                         bind(V, source.view()));
    check_close(got, batch, heads, [&](auto b, auto h) {
        const mat src = slice(source, b, h);
        return mul(softmax_all(map(mul(trans(slice(target, b, h)), trans(src)),
                                   [&](std::size_t, std::size_t, double s) { return s / std::sqrt(double(d)); })),
                   src);
    });
}

TEST_CASE("relation self-attention: Q = K = V, one tensor bound to all three", "[variants]") {
    const std::size_t batch = 2, heads = 3, d = 5, n = 13;
    const host_tensor seq = random_tensor(batch, heads, n, d, 150);  // n x d rows: the d x n column-stacked X
    matrix<"X"> X;
    const auto attention = softmax(scale(Q^T*K))*V;
    const auto single_input = softmax(scale(X^T*X))*(X^T);

    const auto columns = col_major(seq.data.data(), d, n, batch, heads);
    auto expected = [&](std::size_t b, std::size_t h) {
        const mat rows = slice(seq, b, h);
        const mat s = map(mul(rows, trans(rows)),
                          [&](std::size_t, std::size_t, double v) { return v / std::sqrt(double(d)); });
        return mul(softmax_all(s), rows);
    };
    check_close(reference::evaluate(attention, bind(Q, columns), bind(K, columns), bind(V, seq.view())), batch, heads,
                expected);
    check_close(reference::evaluate(single_input, bind(X, columns)), batch, heads, expected);
}

TEST_CASE("relation key-value: K != V, both from the source", "[variants]") {
    const std::size_t batch = 2, heads = 3, d = 5, nq = 7, nk = 11, dv = 4;
    const qkv x = make_qkv(batch, heads, d, nq, nk, dv, 160);  // separate K (5 x 11) and V (11 x 4)
    const auto attention = softmax(scale(Q^T*K))*V;

    check_close(eval_qkv(attention, x), batch, heads, [&](auto b, auto h) {
        return mul(softmax_all(qk_scores(x, b, h, 1 / std::sqrt(double(d)))), slice(x.v, b, h));
    });
}

TEST_CASE("relation multi-head: projections, per-head scaled dot, padding + future masks, dropout, concat, W_o",
          "[variants]") {
    // The seed's Keras MultiHeadAttention layer (no biases), plus an output
    // projection. Weights are stored as Keras stores them: Wq, Wk, Wv are
    // d_model x (heads * d_h), Wo is (heads * d_h) x d_model. Head h uses
    // columns [h d_h, (h+1) d_h) of Wq: in the seeds' notation W_q^h =
    // (that block)^T, a d_h x d_model strided view of the same bytes. W_o is
    // applied per head inside the expression (rows [h d_h, (h+1) d_h) of Wo,
    // a row-major view per head), and the concat-then-project is the sum of
    // those per-head products over h, done below after the reference call:
    // concat(head_1 .. head_H) Wo = sum_h head_h Wo[h d_h : (h+1) d_h, :].
    const std::size_t batch = 2, heads = 3, dm = 8, dh = 3, nq = 7, nk = 11, width = heads * dh;
    const double p = 0.2;
    const std::uint32_t seed = 77;
    const std::vector<float> xs = random_floats(batch * nq * dm, 170), ys = random_floats(batch * nk * dm, 171),
                             wq = random_floats(dm * width, 172), wk = random_floats(dm * width, 173),
                             wv = random_floats(dm * width, 174), wo = random_floats(width * dm, 175);
    const host_tensor lengths = filled(batch, 1, 1, 1, {11, 4});
    matrix<"X"> X;
    matrix<"Y"> Y;
    matrix<"Wq"> Wq;
    matrix<"Wk"> Wk;
    matrix<"Wv"> Wv;
    matrix<"Wo"> Wo;
    matrix<"L"> L;
    const auto weights = dropout(softmax(mask(scale(transpose(Wq*X)*(Wk*Y)), causal && key_lengths(L))), p, seed);
    const auto per_head = weights*transpose(Wv*Y)*Wo;  // head_h W_o^h, n_q x d_model

    auto block = [&](const std::vector<float>& w) {  // head h's d_h x d_model W^h of a Keras weight
        return strided(w.data(), dh, dm, 1, static_cast<std::ptrdiff_t>(width), 1, heads, 0,
                       static_cast<std::ptrdiff_t>(dh));
    };
    const auto got = reference::evaluate(
        per_head, bind(X, col_major(xs.data(), dm, nq, batch)), bind(Y, col_major(ys.data(), dm, nk, batch)),
        bind(Wq, block(wq)), bind(Wk, block(wk)), bind(Wv, block(wv)), bind(Wo, row_major(wo.data(), dh, dm, 1, heads)),
        bind(L, lengths.view()));
    REQUIRE(got.batch == batch);
    REQUIRE(got.heads == heads);
    REQUIRE(got.rows == nq);
    REQUIRE(got.cols == dm);

    auto keras = [&](std::size_t b, std::size_t) {
        auto project = [&](const std::vector<float>& in, std::size_t n, const std::vector<float>& w) {
            mat out(n, width);  // in[b] (n x d_model) times w (d_model x width)
            for (std::size_t t = 0; t < n; ++t)
                for (std::size_t c = 0; c < width; ++c)
                    for (std::size_t a = 0; a < dm; ++a)
                        out(t, c) += double(in[(b * n + t) * dm + a]) * double(w[a * width + c]);
            return out;
        };
        const mat ql = project(xs, nq, wq), kl = project(ys, nk, wk), vl = project(ys, nk, wv);
        mat concat(nq, width);
        for (std::size_t h = 0; h < heads; ++h) {
            mat s(nq, nk);
            for (std::size_t t = 0; t < nq; ++t)
                for (std::size_t u = 0; u < nk; ++u) {
                    for (std::size_t c = 0; c < dh; ++c) s(t, u) += ql(t, h * dh + c) * kl(u, h * dh + c);
                    s(t, u) /= std::sqrt(double(dh));
                }
            mat a = softmax_where(s, [&](std::size_t t, std::size_t u) {
                return u <= t && double(u) < lengths(b, 0, 0, 0);  // future mask and padding mask
            });
            a = map(a, [&](std::size_t t, std::size_t u, double value) {
                const auto bits = op::dropout_bits(seed, static_cast<std::uint32_t>(b * heads + h),
                                                   static_cast<std::uint32_t>(t), static_cast<std::uint32_t>(u));
                return op::dropout_keeps(bits, op::dropout_threshold(p)) ? value / (1 - p) : 0.0;
            });
            for (std::size_t t = 0; t < nq; ++t)
                for (std::size_t c = 0; c < dh; ++c)
                    for (std::size_t u = 0; u < nk; ++u) concat(t, h * dh + c) += a(t, u) * vl(u, h * dh + c);
        }
        mat out(nq, dm);
        for (std::size_t t = 0; t < nq; ++t)
            for (std::size_t m = 0; m < dm; ++m)
                for (std::size_t c = 0; c < width; ++c) out(t, m) += concat(t, c) * double(wo[c * dm + m]);
        return out;
    };
    compare(batch, 1, nq, dm,
            [&](std::size_t b, std::size_t, std::size_t r, std::size_t c) {
                double sum = 0;
                for (std::size_t h = 0; h < heads; ++h) sum += got.at(b, h, r, c);
                return sum;
            },
            keras);

    // The same layer as one expression: concat_heads, then the whole Wo
    // (width x d_model, one head), as Keras applies it.
    const auto layer = concat_heads(weights*transpose(Wv*Y)) * Wo;
    const auto whole = reference::evaluate(
        layer, bind(X, col_major(xs.data(), dm, nq, batch)), bind(Y, col_major(ys.data(), dm, nk, batch)),
        bind(Wq, block(wq)), bind(Wk, block(wk)), bind(Wv, block(wv)), bind(Wo, row_major(wo.data(), width, dm)),
        bind(L, lengths.view()));
    REQUIRE(whole.batch == batch);
    REQUIRE(whole.heads == 1);
    REQUIRE(whole.rows == nq);
    REQUIRE(whole.cols == dm);
    compare(batch, 1, nq, dm, [&](std::size_t b, std::size_t, std::size_t r, std::size_t c) { return whole.at(b, 0, r, c); }, keras);
}

// =========================================================================
// Modern variants
// =========================================================================

TEST_CASE("modern causal: j <= i", "[variants]") {
    const std::size_t batch = 2, heads = 3, nq = 7, nk = 11;
    const qkv x = make_qkv(batch, heads, 5, nq, nk, 3, 180);
    const auto attention = softmax(mask(scale(Q^T*K), causal))*V;

    check_close(eval_qkv(attention, x), batch, heads, [&](auto b, auto h) {
        const mat a = softmax_where(qk_scores(x, b, h, 1 / std::sqrt(5.0)),
                                    [](std::size_t r, std::size_t c) { return c <= r; });
        return mul(a, slice(x.v, b, h));
    });
}

TEST_CASE("modern padding: per-sequence key lengths and query lengths", "[variants]") {
    const std::size_t batch = 3, heads = 2, nq = 7, nk = 11;
    const qkv x = make_qkv(batch, heads, 5, nq, nk, 3, 190);
    const host_tensor key_len = filled(batch, 1, 1, 1, {11, 4, 1}), query_len = filled(batch, 1, 1, 1, {7, 5, 0});
    matrix<"Lk"> Lk;
    matrix<"Lq"> Lq;
    const auto attention = softmax(mask(scale(Q^T*K), key_lengths(Lk) && query_lengths(Lq)))*V;

    const auto got = eval_qkv(attention, x, bind(Lk, key_len.view()), bind(Lq, query_len.view()));
    check_close(got, batch, heads, [&](auto b, auto h) {
        const mat a = softmax_where(qk_scores(x, b, h, 1 / std::sqrt(5.0)), [&](std::size_t r, std::size_t c) {
            return double(c) < key_len(b, 0, 0, 0) && double(r) < query_len(b, 0, 0, 0);
        });
        return mul(a, slice(x.v, b, h));
    });
    for (std::size_t h = 0; h < heads; ++h)  // padded query rows: exactly zero
        for (std::size_t r = 5; r < nq; ++r)
            for (std::size_t c = 0; c < got.cols; ++c) CHECK(got.at(1, h, r, c) == 0.0);
}

TEST_CASE("modern sliding window: j in [i - w, i]", "[variants]") {
    const std::size_t batch = 2, heads = 3, nq = 7, nk = 11, w = 3;
    const qkv x = make_qkv(batch, heads, 5, nq, nk, 3, 200);
    const auto attention = softmax(mask(scale(Q^T*K), window(w)))*V;

    check_close(eval_qkv(attention, x), batch, heads, [&](auto b, auto h) {
        const mat a = softmax_where(qk_scores(x, b, h, 1 / std::sqrt(5.0)),
                                    [&](std::size_t r, std::size_t c) { return c <= r && c + w >= r; });
        return mul(a, slice(x.v, b, h));
    });
}

TEST_CASE("modern ALiBi: s_ij - m_h (i - j), one slope per head", "[variants]") {
    const std::size_t batch = 2, heads = 4, nq = 7, nk = 11;
    const qkv x = make_qkv(batch, heads, 5, nq, nk, 3, 210);
    std::vector<float> slopes(heads);
    for (std::size_t h = 0; h < heads; ++h) slopes[h] = std::exp2(-8.0f * float(h + 1) / float(heads));
    const host_tensor slope_values = filled(1, heads, 1, 1, slopes);
    matrix<"m"> m;
    const auto attention = softmax(mask(scale(Q^T*K) - m*(i - j), causal))*V;

    check_close(eval_qkv(attention, x, bind(m, slope_values.view())), batch, heads, [&](auto b, auto h) {
        const mat s = map(qk_scores(x, b, h, 1 / std::sqrt(5.0)), [&](std::size_t r, std::size_t c, double v) {
            return v - slope_values(0, h, 0, 0) * (double(r) - double(c));
        });
        return mul(softmax_where(s, [](std::size_t r, std::size_t c) { return c <= r; }), slice(x.v, b, h));
    });
}

TEST_CASE("modern relative position bias: s_ij + B[h, i - j] from a learned table", "[variants]") {
    const std::size_t batch = 2, heads = 3, nq = 7, nk = 11;
    const qkv x = make_qkv(batch, heads, 5, nq, nk, 3, 220);
    matrix<"B"> Bias;
    auto expected = [&](const host_tensor& table, long offset) {
        return [&, table, offset](std::size_t b, std::size_t h) {
            const long last = long(table.cols) - 1;
            const mat s = map(qk_scores(x, b, h, 1 / std::sqrt(5.0)), [&](std::size_t r, std::size_t c, double v) {
                return v + table(0, h, 0, std::size_t(std::clamp(long(r) - long(c) + offset, 0L, last)));
            });
            return mul(softmax_all(s), slice(x.v, b, h));
        };
    };
    SECTION("a table entry for every i - j in [-(n_k - 1), n_q - 1]") {
        const host_tensor table = random_tensor(1, heads, 1, nq + nk - 1, 223);  // one row per head
        const auto attention = softmax(scale(Q^T*K) + Bias[i - j + double(nk - 1)])*V;
        check_close(eval_qkv(attention, x, bind(Bias, table.view())), batch, heads, expected(table, long(nk) - 1));
    }
    SECTION("a shorter table: distances past +-3 clamp to the last bucket") {
        const host_tensor table = random_tensor(1, heads, 1, 7, 224);
        const auto attention = softmax(scale(Q^T*K) + Bias[i - j + 3])*V;
        check_close(eval_qkv(attention, x, bind(Bias, table.view())), batch, heads, expected(table, 3));
    }
}

TEST_CASE("modern soft-capping: c tanh(s / c)", "[variants]") {
    const std::size_t batch = 2, heads = 3;
    const double cap = 0.5;
    const qkv x = make_qkv(batch, heads, 5, 7, 11, 3, 230);
    const auto attention = softmax(cap * tanh(scale(Q^T*K) / cap))*V;

    check_close(eval_qkv(attention, x), batch, heads, [&](auto b, auto h) {
        const mat s = map(qk_scores(x, b, h, 1 / std::sqrt(5.0)),
                          [&](std::size_t, std::size_t, double v) { return cap * std::tanh(v / cap); });
        return mul(softmax_all(s), slice(x.v, b, h));
    });
}

TEST_CASE("modern grouped / multi-query attention: query heads share K/V heads", "[variants]") {
    const std::size_t batch = 2, heads = 6;
    const auto attention = softmax(scale(Q^T*K))*V;
    for (std::size_t kv_heads : {std::size_t{1}, std::size_t{2}, std::size_t{3}}) {  // MQA, GQA, GQA
        INFO("K/V heads: " << kv_heads);
        const qkv x = make_qkv(batch, heads, 5, 7, 11, 3, 240 + std::uint32_t(kv_heads), kv_heads);
        check_close(eval_qkv(attention, x), batch, heads, [&](auto b, auto h) {
            const std::size_t group = h / (heads / kv_heads);  // consecutive query heads share one K/V head
            return mul(softmax_all(qk_scores(x, b, h, 1 / std::sqrt(5.0), group)), slice(x.v, b, group));
        });
    }
}

TEST_CASE("modern decode: n_q = 1 (or a few) against a long K/V cache", "[variants]") {
    const std::size_t batch = 2, heads = 4, nk = 517;
    for (std::size_t nq : {std::size_t{1}, std::size_t{3}}) {
        INFO("n_q = " << nq);
        const qkv x = make_qkv(batch, heads, 5, nq, nk, 3, 250 + std::uint32_t(nq));
        // The new queries are the last n_q positions: causal, aligned at the end.
        const auto attention = softmax(mask(scale(Q^T*K), j <= i + double(nk - nq)))*V;
        check_close(eval_qkv(attention, x), batch, heads, [&](auto b, auto h) {
            const mat a = softmax_where(qk_scores(x, b, h, 1 / std::sqrt(5.0)),
                                        [&](std::size_t r, std::size_t c) { return c <= r + nk - nq; });
            return mul(a, slice(x.v, b, h));
        });
    }
}

TEST_CASE("modern dropout: on the weights, reproducible from a seed, the specified mask", "[variants]") {
    const std::size_t batch = 2, heads = 2, nq = 61, nk = 67;
    const double p = 0.3;
    const std::uint32_t seed = 2024;
    const qkv x = make_qkv(batch, heads, 5, nq, nk, 3, 260);
    const auto weights = dropout(softmax(scale(Q^T*K)), p, seed);
    const auto attention = dropout(softmax(scale(Q^T*K)), p, seed)*V;

    auto kept = [&](std::size_t b, std::size_t h, std::size_t r, std::size_t c) {
        const auto bits = op::dropout_bits(seed, std::uint32_t(b * heads + h), std::uint32_t(r), std::uint32_t(c));
        return op::dropout_keeps(bits, op::dropout_threshold(p));
    };
    auto expected_weights = [&](std::size_t b, std::size_t h) {
        return map(softmax_all(qk_scores(x, b, h, 1 / std::sqrt(5.0))),
                   [&](std::size_t r, std::size_t c, double a) { return kept(b, h, r, c) ? a / (1 - p) : 0.0; });
    };
    const auto first = eval_qkv(weights, x);
    check_close(first, batch, heads, expected_weights);
    check_close(eval_qkv(attention, x), batch, heads,
                [&](auto b, auto h) { return mul(expected_weights(b, h), slice(x.v, b, h)); });

    SECTION("the same seed gives the same weights, another seed others") {
        CHECK(eval_qkv(weights, x).values == first.values);
        CHECK(eval_qkv(dropout(softmax(scale(Q^T*K)), p, seed + 1), x).values != first.values);
    }
    SECTION("the kept set is exactly the hash's, and its rate is 1 - p") {
        std::size_t kept_count = 0, disagree = 0;
        for (std::size_t b = 0; b < batch; ++b)
            for (std::size_t h = 0; h < heads; ++h)
                for (std::size_t r = 0; r < nq; ++r)
                    for (std::size_t c = 0; c < nk; ++c) {
                        const bool nonzero = first.at(b, h, r, c) != 0.0;  // softmax weights are never 0 here
                        kept_count += nonzero;
                        disagree += nonzero != kept(b, h, r, c);
                    }
        CHECK(disagree == 0);
        const double n = double(batch * heads * nq * nk), rate = double(kept_count) / n;
        const double sd = std::sqrt(p * (1 - p) / n);  // about 0.0036 for these 16348 draws
        CHECK(std::abs(rate - (1 - p)) < 5 * sd);
    }
    SECTION("p = 0 (inference) leaves the weights untouched") {
        CHECK(eval_qkv(dropout(softmax(scale(Q^T*K)), 0.0, seed), x).values ==
              eval_qkv(softmax(scale(Q^T*K)), x).values);
    }
}

// =========================================================================
// The headline expression
// =========================================================================

TEST_CASE("headline: softmax(scale(Q^T*K))*V prints as written and is softmax(Q K^T / sqrt(d)) V", "[variants]") {
    const auto attention = softmax(scale(Q^T*K))*V;
    CHECK(to_string(attention) == "softmax(scale(Q^T*K))*V");

    // The Transformer's row-vector arrays: Q_rows (n_q x d), K_rows (n_k x d),
    // V (n_k x d_v), all row-major, batch x heads of them. Q_rows' bytes are
    // the seeds' d x n_q Q by columns, so Q binds col_major without a copy.
    const std::size_t batch = 2, heads = 3, d = 5, nq = 7, nk = 11, dv = 3;
    const std::vector<float> q_rows = random_floats(batch * heads * nq * d, 270),
                             k_rows = random_floats(batch * heads * nk * d, 271),
                             v_rows = random_floats(batch * heads * nk * dv, 272);
    const auto got = reference::evaluate(attention, bind(Q, col_major(q_rows.data(), d, nq, batch, heads)),
                                         bind(K, col_major(k_rows.data(), d, nk, batch, heads)),
                                         bind(V, row_major(v_rows.data(), nk, dv, batch, heads)));
    check_close(got, batch, heads, [&](auto b, auto h) {
        const std::size_t bh = b * heads + h;
        mat s(nq, nk);  // Q_rows K_rows^T / sqrt(d)
        for (std::size_t r = 0; r < nq; ++r)
            for (std::size_t c = 0; c < nk; ++c) {
                for (std::size_t a = 0; a < d; ++a)
                    s(r, c) += double(q_rows[(bh * nq + r) * d + a]) * double(k_rows[(bh * nk + c) * d + a]);
                s(r, c) /= std::sqrt(double(d));
            }
        mat out(nq, dv);
        const mat a = softmax_all(s);
        for (std::size_t r = 0; r < nq; ++r)
            for (std::size_t c = 0; c < dv; ++c)
                for (std::size_t u = 0; u < nk; ++u) out(r, c) += a(r, u) * double(v_rows[(bh * nk + u) * dv + c]);
        return out;
    });
}
