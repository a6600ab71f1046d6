// The reference evaluator against values computed by hand: every operator,
// broadcasting, masks and both normalisations.
#include <attnfuse/dsl.hpp>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace af = attnfuse;
using af::matrix;
using Catch::Matchers::WithinAbs;

namespace {

// Every value of a single-batch, single-head result, row by row.
std::vector<double> values_of(const af::reference::result& r) { return r.values; }

void require_values(const af::reference::result& r, std::size_t rows, std::size_t cols,
                    const std::vector<double>& expected, double tolerance = 1e-12) {
    REQUIRE(r.rows == rows);
    REQUIRE(r.cols == cols);
    REQUIRE(r.values.size() == expected.size());
    for (std::size_t n = 0; n < expected.size(); ++n) {
        INFO("element " << n);
        CHECK_THAT(r.values[n], WithinAbs(expected[n], tolerance));
    }
}

}  // namespace

TEST_CASE("matrix product and transpose by hand", "[reference]") {
    matrix<"A"> A;
    matrix<"B"> B;
    const std::vector<float> a{1, 2, 3, 4, 5, 6};       // 2x3: [1 2 3; 4 5 6]
    const std::vector<float> b{7, 8, 9, 10, 11, 12};    // 3x2: [7 8; 9 10; 11 12]
    auto ba = af::bind(A, a.data(), 2, 3);
    auto bb = af::bind(B, b.data(), 3, 2);
    require_values(af::reference::evaluate(A*B, ba, bb), 2, 2, {58, 64, 139, 154});
    require_values(af::reference::evaluate(af::transpose(A), ba), 3, 2, {1, 4, 2, 5, 3, 6});
    // A^T*A: (3x2)(2x3)
    require_values(af::reference::evaluate(A^af::T*A, ba), 3, 3, {17, 22, 27, 22, 29, 36, 27, 36, 45});
    // W*(K^T) spelled with parentheses
    require_values(af::reference::evaluate(A*(A^af::T), ba), 2, 2, {14, 32, 32, 77});
}

TEST_CASE("elementwise arithmetic with scalars, rows and columns broadcast", "[reference]") {
    matrix<"A"> A;
    matrix<"r"> r;  // 1x3 row vector
    matrix<"c"> c;  // 2x1 column vector
    const std::vector<float> a{1, 2, 3, 4, 5, 6}, row{10, 20, 30}, col{100, 200};
    auto ba = af::bind(A, a.data(), 2, 3);
    auto br = af::bind(r, row.data(), 1, 3);
    auto bc = af::bind(c, col.data(), 2, 1);
    require_values(af::reference::evaluate(A + r, ba, br), 2, 3, {11, 22, 33, 14, 25, 36});
    require_values(af::reference::evaluate(A - c, ba, bc), 2, 3, {-99, -98, -97, -196, -195, -194});
    require_values(af::reference::evaluate(A % r, ba, br), 2, 3, {10, 40, 90, 40, 100, 180});
    require_values(af::reference::evaluate(A / 2, ba), 2, 3, {0.5, 1, 1.5, 2, 2.5, 3});
    require_values(af::reference::evaluate(2 * A - 1, ba), 2, 3, {1, 3, 5, 7, 9, 11});
    require_values(af::reference::evaluate(-A, ba), 2, 3, {-1, -2, -3, -4, -5, -6});
    require_values(af::reference::evaluate(af::hadamard(A, A), ba), 2, 3, {1, 4, 9, 16, 25, 36});
    // a row plus a column broadcasts to a matrix
    require_values(af::reference::evaluate(r + c, br, bc), 2, 3, {110, 120, 130, 210, 220, 230});
}

TEST_CASE("elementwise functions at known points", "[reference]") {
    matrix<"x"> x;
    const std::vector<float> v{-2, 0, 1, 4};
    auto bx = af::bind(x, v.data(), 1, 4);
    const double e = std::exp(1.0);
    require_values(af::reference::evaluate(exp(x), bx), 1, 4, {1 / (e * e), 1, e, e * e * e * e}, 1e-9);
    require_values(af::reference::evaluate(log(abs(x) + 1), bx), 1, 4, {std::log(3.0), 0, std::log(2.0), std::log(5.0)});
    require_values(af::reference::evaluate(af::tanh(x), bx), 1, 4, {std::tanh(-2.0), 0, std::tanh(1.0), std::tanh(4.0)});
    require_values(af::reference::evaluate(af::sigmoid(x), bx), 1, 4,
                   {1 / (1 + e * e), 0.5, 1 / (1 + 1 / e), 1 / (1 + std::exp(-4.0))});
    require_values(af::reference::evaluate(af::relu(x), bx), 1, 4, {0, 0, 1, 4});
    require_values(af::reference::evaluate(af::abs(x), bx), 1, 4, {2, 0, 1, 4});
    require_values(af::reference::evaluate(af::sqrt(af::abs(x)), bx), 1, 4, {std::sqrt(2.0), 0, 1, 2});
    require_values(af::reference::evaluate(af::square(x), bx), 1, 4, {4, 0, 1, 16});
    require_values(af::reference::evaluate(af::max(x, 0.5), bx), 1, 4, {0.5, 0.5, 1, 4});
    require_values(af::reference::evaluate(af::min(x, 0.5), bx), 1, 4, {-2, 0, 0.5, 0.5});
    // softplus(x) = log(1 + e^x); erf by its series' known values
    require_values(af::reference::evaluate(af::softplus(x), bx), 1, 4,
                   {std::log(1 + 1 / (e * e)), std::log(2.0), std::log(1 + e), std::log(1 + e * e * e * e)});
    require_values(af::reference::evaluate(af::erf(x), bx), 1, 4,
                   {-0.995322265018952734, 0, 0.842700792949714869, 0.999999984582742100}, 1e-15);
}

TEST_CASE("lengths bound from integer arrays mask as float ones do; an inexact integer is an error", "[reference]") {
    matrix<"S"> S;
    matrix<"L"> L;
    const std::vector<float> scores(2 * 4 * 5, 1.0f);  // batch 2 of 4 x 5
    const std::vector<float> as_floats{3, 5};
    const std::vector<std::int32_t> as_int32{3, 5};
    const std::vector<std::int64_t> as_int64{3, 5};
    const auto e = softmax(mask(S, key_lengths(L)));
    const auto bs = af::bind(S, af::row_major(scores.data(), 4, 5, 2));
    const auto ref = af::reference::evaluate(e, bs, af::bind(L, af::row_major(as_floats.data(), 1, 1, 2)));
    CHECK(af::reference::evaluate(e, bs, af::bind(L, af::row_major(as_int32.data(), 1, 1, 2))).values == ref.values);
    // the binding owns its floats: the integers may go away after bind
    auto bound = [&] {
        std::vector<std::int64_t> temporary = as_int64;
        return af::bind(L, temporary.data(), 1, 1, 2);
    }();
    CHECK(af::reference::evaluate(e, bs, bound).values == ref.values);
    const std::vector<std::int32_t> too_long{3, (1 << 24) + 1};
    CHECK_THROWS_WITH(af::bind(L, af::row_major(too_long.data(), 1, 1, 2)), Catch::Matchers::Contains("not exact as a float"));
}

TEST_CASE("softplus keeps its tails: no overflow for large x, no lost value for very negative x", "[reference]") {
    matrix<"x"> x;
    const float inf = std::numeric_limits<float>::infinity();
    const std::vector<float> v{-1000, -40, 40, 1000, -inf, inf};
    auto bx = af::bind(x, v.data(), 1, 6);
    const auto r = af::reference::evaluate(af::softplus(x), bx);
    CHECK(r.values[0] == 0.0);  // e^-1000 underflows; log1p(0) is exactly 0
    CHECK_THAT(r.values[1], Catch::Matchers::WithinRel(std::exp(-40.0), 1e-12));
    CHECK_THAT(r.values[2], WithinAbs(40.0, 1e-12));
    CHECK(r.values[3] == 1000.0);
    CHECK(r.values[4] == 0.0);
    CHECK(r.values[5] == inf);
}

TEST_CASE("comparisons, logic and where", "[reference]") {
    matrix<"x"> x;
    const std::vector<float> v{-2, 0, 1, 4};
    auto bx = af::bind(x, v.data(), 1, 4);
    require_values(af::reference::evaluate(x < 1, bx), 1, 4, {1, 1, 0, 0});
    require_values(af::reference::evaluate(x <= 1, bx), 1, 4, {1, 1, 1, 0});
    require_values(af::reference::evaluate(x > 0, bx), 1, 4, {0, 0, 1, 1});
    require_values(af::reference::evaluate(x >= 0, bx), 1, 4, {0, 1, 1, 1});
    require_values(af::reference::evaluate(x == 1, bx), 1, 4, {0, 0, 1, 0});
    require_values(af::reference::evaluate(x != 1, bx), 1, 4, {1, 1, 0, 1});
    require_values(af::reference::evaluate((x > -1) && (x < 2), bx), 1, 4, {0, 1, 1, 0});
    require_values(af::reference::evaluate((x < -1) || (x > 2), bx), 1, 4, {1, 0, 0, 1});
    require_values(af::reference::evaluate(!(x > 0), bx), 1, 4, {1, 1, 0, 0});
    require_values(af::reference::evaluate(where(x > 0, x, 10), bx), 1, 4, {10, 10, 1, 4});
}

TEST_CASE("the indices i and j are the row and column of the score", "[reference]") {
    matrix<"S"> S;
    const std::vector<float> zeros(12, 0.0f);
    auto bs = af::bind(S, zeros.data(), 3, 4);
    require_values(af::reference::evaluate(S + af::i, bs), 3, 4, {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2});
    require_values(af::reference::evaluate(S + af::j, bs), 3, 4, {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3});
    require_values(af::reference::evaluate(S + (af::i - af::j) * 2, bs), 3, 4,
                   {0, -2, -4, -6, 2, 0, -2, -4, 4, 2, 0, -2});
    require_values(af::reference::evaluate(where(af::causal, 1, 0) + S, bs), 3, 4, {1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0});
    require_values(af::reference::evaluate(where(af::window(1), 1, 0) + S, bs), 3, 4,
                   {1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0});
}

TEST_CASE("scale divides by the square root of the product's inner extent", "[reference]") {
    matrix<"Q"> Q;
    matrix<"K"> K;
    const std::vector<float> ones(4 * 2, 1.0f);  // d_k = 4
    auto bq = af::bind(Q, af::col_major(ones.data(), 4, 2));
    auto bk = af::bind(K, af::col_major(ones.data(), 4, 2));
    require_values(af::reference::evaluate(scale(Q^af::T*K), bq, bk), 2, 2, {2, 2, 2, 2});  // 4 / sqrt(4)
    require_values(af::reference::evaluate(scale(Q^af::T*K, 0.25), bq, bk), 2, 2, {1, 1, 1, 1});
    require_values(af::reference::evaluate(scale(Q^af::T*K + 4), bq, bk), 2, 2, {4, 4, 4, 4});
}

TEST_CASE("softmax by hand: masked entries exactly zero, no overflow, fully masked rows zero", "[reference]") {
    matrix<"S"> S;
    // row 0: [0, ln 3]          -> [1/4, 3/4]
    // row 1: [1e4, 1e4 - ln 3]  -> [3/4, 1/4] without overflow
    const std::vector<float> s{0.0f, static_cast<float>(std::log(3.0)), 1e4f, 1e4f - static_cast<float>(std::log(3.0))};
    auto bs = af::bind(S, s.data(), 2, 2);
    const auto r = af::reference::evaluate(softmax(S), bs);
    require_values(r, 2, 2, {0.25, 0.75, 0.75, 0.25}, 1e-3);  // ln 3 rounded to float, and 1e4 - ln 3 too

    // causal mask: row 0 keeps only key 0
    const auto masked = af::reference::evaluate(softmax(mask(S, af::causal)), bs);
    CHECK(masked.values[0] == 1.0);
    CHECK(masked.values[1] == 0.0);

    // every key masked: weights and context are zero, not NaN
    const auto none = af::reference::evaluate(softmax(mask(S, S > 1e9)), bs);
    for (double v : none.values) CHECK(v == 0.0);
}

TEST_CASE("hard attention is a one-hot argmax with ties to the lowest index", "[reference]") {
    matrix<"S"> S;
    const std::vector<float> s{1, 3, 3, -1, 5, 2, 2, 2, 2};
    auto bs = af::bind(S, s.data(), 3, 3);
    require_values(af::reference::evaluate(hard(S), bs), 3, 3, {0, 1, 0, 0, 1, 0, 1, 0, 0});
    // masking the winner moves the choice; a fully masked row is zero
    require_values(af::reference::evaluate(hard(mask(S, af::j != 1)), bs), 3, 3, {0, 0, 1, 0, 0, 1, 1, 0, 0});
    require_values(af::reference::evaluate(hard(mask(S, af::i != 2)), bs), 3, 3, {0, 1, 0, 0, 1, 0, 0, 0, 0});
}

TEST_CASE("row and column reductions", "[reference]") {
    matrix<"A"> A;
    const std::vector<float> a{1, 5, 3, 4, 2, 6};
    auto ba = af::bind(A, a.data(), 2, 3);
    require_values(af::reference::evaluate(row_sum(A), ba), 2, 1, {9, 12});
    require_values(af::reference::evaluate(row_max(A), ba), 2, 1, {5, 6});
    require_values(af::reference::evaluate(col_sum(A), ba), 1, 3, {5, 7, 9});
    require_values(af::reference::evaluate(col_max(A), ba), 1, 3, {4, 5, 6});
    // normalising by a reduction broadcasts the column back over the row
    require_values(af::reference::evaluate(A / row_sum(A), ba), 2, 3, {1.0 / 9, 5.0 / 9, 3.0 / 9, 4.0 / 12, 2.0 / 12, 6.0 / 12});
}

TEST_CASE("key and query lengths mask per batch entry", "[reference]") {
    matrix<"S"> S;
    matrix<"Lk"> Lk;
    matrix<"Lq"> Lq;
    const std::vector<float> zeros(2 * 2 * 3, 0.0f);  // two batch entries of 2x3
    const std::vector<float> key_len{2, 3}, query_len{1, 2};
    auto bs = af::bind(S, af::row_major(zeros.data(), 2, 3, 2));
    auto bl = af::bind(Lk, af::row_major(key_len.data(), 1, 1, 2));
    auto bq = af::bind(Lq, af::row_major(query_len.data(), 1, 1, 2));
    const auto r = af::reference::evaluate(softmax(mask(S, key_lengths(Lk) && query_lengths(Lq))), bs, bl, bq);
    REQUIRE(r.batch == 2);
    // batch 0: two keys valid, only query 0
    CHECK(r.at(0, 0, 0, 0) == 0.5);
    CHECK(r.at(0, 0, 0, 1) == 0.5);
    CHECK(r.at(0, 0, 0, 2) == 0.0);
    for (std::size_t c = 0; c < 3; ++c) CHECK(r.at(0, 0, 1, c) == 0.0);
    // batch 1: three keys, both queries
    for (std::size_t q = 0; q < 2; ++q)
        for (std::size_t c = 0; c < 3; ++c) CHECK_THAT(r.at(1, 0, q, c), WithinAbs(1.0 / 3, 1e-15));
}

TEST_CASE("pairwise additive score by hand", "[reference]") {
    matrix<"w"> w;
    matrix<"A"> A;  // query features, d_a x n_q = 2x1
    matrix<"B"> B;  // key features, d_a x n_k = 2x2
    const std::vector<float> wv{1, 2}, av{0.5f, -1}, bv{0.5f, 1, 0, 1};  // B = [0.5 1; 0 1]
    auto bw = af::bind(w, wv.data(), 2, 1);
    auto ba = af::bind(A, av.data(), 2, 1);
    auto bb = af::bind(B, bv.data(), 2, 2);
    // s[0,0] = 1*tanh(0.5+0.5) + 2*tanh(-1+0); s[0,1] = 1*tanh(0.5+1) + 2*tanh(-1+1)
    require_values(af::reference::evaluate(additive(w, A, B), bw, ba, bb), 1, 2,
                   {std::tanh(1.0) + 2 * std::tanh(-1.0), std::tanh(1.5)}, 1e-7);
    // a custom combining function: w . (a*b)
    require_values(af::reference::evaluate(pairwise(w, A, B, af::qf % af::kf), bw, ba, bb), 1, 2, {0.25, 0.5 - 2});
}

TEST_CASE("table lookup rounds and clamps its index", "[reference]") {
    matrix<"S"> S;
    matrix<"B"> B;
    const std::vector<float> zeros(2 * 3, 0.0f), table{10, 20, 30};
    auto bs = af::bind(S, zeros.data(), 2, 3);
    auto bt = af::bind(B, table.data(), 1, 3);
    // index i - j + 1: row 0 -> 1, 0, -1(clamped 0); row 1 -> 2, 1, 0
    require_values(af::reference::evaluate(S + B[af::i - af::j + 1], bs, bt), 2, 3, {20, 10, 10, 30, 20, 10});
}

TEST_CASE("dropout keeps the hashed positions and rescales them", "[reference]") {
    matrix<"S"> S;
    const std::vector<float> ones(3 * 5, 1.0f);
    auto bs = af::bind(S, ones.data(), 3, 5);
    require_values(af::reference::evaluate(dropout(S, 0.0, 7), bs), 3, 5, std::vector<double>(15, 1.0));
    require_values(af::reference::evaluate(dropout(S, 1.0, 7), bs), 3, 5, std::vector<double>(15, 0.0));
    const auto r = af::reference::evaluate(dropout(S, 0.5, 7), bs);
    const std::uint32_t threshold = af::op::dropout_threshold(0.5);
    for (std::size_t row = 0; row < 3; ++row)
        for (std::size_t col = 0; col < 5; ++col) {
            const bool kept = af::op::dropout_keeps(
                af::op::dropout_bits(7, 0, static_cast<std::uint32_t>(row), static_cast<std::uint32_t>(col)), threshold);
            CHECK(r.at(0, 0, row, col) == (kept ? 2.0 : 0.0));
        }
}

TEST_CASE("batch and head broadcasting, grouped heads", "[reference]") {
    matrix<"A"> A;
    matrix<"B"> B;
    // A: batch 2, heads 4 of 1x1 with value 100*b + h; B: batch 1, heads 2 of 1x1 with value h
    std::vector<float> a(8), b{0.5f, 0.25f};
    for (std::size_t bi = 0; bi < 2; ++bi)
        for (std::size_t h = 0; h < 4; ++h) a[bi * 4 + h] = static_cast<float>(100 * bi + h);
    auto ba = af::bind(A, af::row_major(a.data(), 1, 1, 2, 4));
    auto bb = af::bind(B, af::row_major(b.data(), 1, 1, 1, 2));
    const auto r = af::reference::evaluate(A + B, ba, bb);
    REQUIRE(r.batch == 2);
    REQUIRE(r.heads == 4);
    // heads 0,1 share B's head 0; heads 2,3 share B's head 1
    CHECK(r.at(0, 0, 0, 0) == 0.5);
    CHECK(r.at(0, 1, 0, 0) == 1.5);
    CHECK(r.at(0, 2, 0, 0) == 2.25);
    CHECK(r.at(1, 3, 0, 0) == 103.25);
}

TEST_CASE("views: row-major, column-major and strided describe the same matrix without copies", "[reference]") {
    matrix<"X"> X;
    const std::vector<float> rm{1, 2, 3, 4, 5, 6};  // 2x3 row-major == 3x2 column-major
    const auto as_rows = af::reference::evaluate(af::transpose(X), af::bind(X, af::row_major(rm.data(), 2, 3)));
    const auto as_cols = af::reference::evaluate(X, af::bind(X, af::col_major(rm.data(), 3, 2)));
    CHECK(as_rows.values == as_cols.values);
    // every other column of a 2x6 buffer
    const std::vector<float> wide{1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0};
    const auto picked = af::reference::evaluate(X, af::bind(X, af::strided(wide.data(), 2, 3, 6, 2)));
    CHECK(values_of(picked) == std::vector<double>{1, 2, 3, 4, 5, 6});
    // the same with every stride named
    const auto named = af::reference::evaluate(X, af::bind(X, af::strided(wide.data(), af::layout{.rows = 2, .cols = 3, .row_stride = 6, .col_stride = 2})));
    CHECK(values_of(named) == std::vector<double>{1, 2, 3, 4, 5, 6});
}

TEST_CASE("a named layout: heads split out of [batch, n, heads*d] without a copy; a missing stride is an error", "[reference]") {
    // batch 2, n 3, heads 2, d 2: element (b, t, h, f) at ((b*3 + t)*2 + h)*2 + f
    const std::size_t batch = 2, n = 3, heads = 2, d = 2;
    std::vector<float> data(batch * n * heads * d);
    for (std::size_t k = 0; k < data.size(); ++k) data[k] = static_cast<float>(k);
    const auto v = af::strided(data.data(), af::layout{.rows = d, .cols = n, .row_stride = 1, .col_stride = static_cast<std::ptrdiff_t>(heads * d),
                                                       .batch = batch, .heads = heads,
                                                       .batch_stride = static_cast<std::ptrdiff_t>(n * heads * d),
                                                       .head_stride = static_cast<std::ptrdiff_t>(d)});
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t t = 0; t < n; ++t)
                for (std::size_t f = 0; f < d; ++f) CHECK(v.at(b, h, f, t) == static_cast<float>(((b * n + t) * heads + h) * d + f));
    // heads > 1 with no head stride would read head 0 for every head: refused, naming the stride
    CHECK_THROWS_WITH(af::strided(data.data(), af::layout{.rows = d, .cols = n, .row_stride = 1, .col_stride = 4, .heads = heads}),
                      Catch::Matchers::Contains("head_stride"));
    CHECK_THROWS_AS(af::strided(data.data(), af::layout{.rows = d, .cols = n, .col_stride = 4}), af::shape_error);
    // an axis of one element needs no stride
    CHECK(af::strided(data.data(), af::layout{.rows = 1, .cols = n, .col_stride = 4}).row_stride == 0);
}
