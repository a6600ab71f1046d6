// The CPU's fused kernel reads Q, K and V stored as f16 or bf16 as they are
// (a tile at a time, widened into its scratch): every path it has for them,
// at both formats, against the double-precision reference.
//
// Tolerances, for each case:
//   - against the reference over the same stored values (which it reads
//     exactly): only the kernels' fp32 arithmetic differs, so 1e-4 of the
//     output's scale, as every fp32 test;
//   - for the softmax families (dense, causal, sliding window, soft-capped),
//     also against the reference over the fp32 values before rounding,
//     within the bound the format's unit roundoff u gives (element_storage.hpp
//     derives it): each stored value is off by at most u relatively, so a
//     score moves by at most delta = 2u max_ij sum_a |q_ai||k_aj| / sqrt(d)
//     (soft-capping is 1-Lipschitz and masks drop keys, so the same holds),
//     the weights of a row by e^(2 delta) - 1 in their 1-norm, and the output
//     by that times max|v|, plus u max|v| from V's own rounding:
//     error <= (e^(2 delta) - 1 + u) max|v| + 1e-4 scale
//     (and u max|v| more where bf16 products rounded the weights, below).
//     u is 2^-11 for f16 and 2^-8 for bf16.
//   - where the fused kernel ran bf16 products (report.notes says so; it
//     must where the CPU has them, for 16 queries or more), its weights were
//     rounded to bf16 for their product with V: each weight w by at most
//     u|w|, so output (r, c) moves by at most u sum_k |w_rk| |v_kc|, which for
//     these families' non-negative weights is u times the reference over
//     |V|. That bound, per element, plus 1e-4 of the scale.
// Sizes are odd and cross every tile: 301 keys (three key tiles, the last
// partial), 53 queries (a full query tile and a partial one) or 1, 2 and 3
// (decode's dot products and its one- and two-row value streams), depth 67
// (not a multiple of a vector: the widening's and the dot products' scalar
// tails run). Value columns are 35 (widened a tile at a time into padded
// panels) or 48 and 32 (multiples of a panel: the value rows are read in
// place, widened in registers). Two batch entries of four query heads share
// two K/V heads, so a wrong head or batch mapping shows.
#include <attnfuse/cpu.hpp>
#include <attnfuse/reference.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "element_storage.hpp"
#include "variants.hpp"

namespace af = attnfuse;
using af::causal;
using af::dyn;
using af::execution;

namespace {

using af::testing::notes_name;

struct shape {
    std::size_t n_q, n_k, d, d_v;
};
constexpr std::size_t batch = 2, heads = 4, kv_heads = 2;

// The K/V head that serves query head h of batch entry b, as an index into
// the batch x kv_heads matrices.
std::size_t kv_matrix(std::size_t b, std::size_t h) { return b * kv_heads + h / (heads / kv_heads); }

// The fp32 inputs a case starts from, and their stored copies.
template <class El>
struct stored_inputs {
    std::vector<float> q, k, v;
    std::vector<El> q16, k16, v16;
    stored_inputs(const shape& s, std::uint32_t seed, float value_spike = 0) {
        af::variants::input_store in(seed);
        const float* qr = in.random(batch * heads * s.d * s.n_q);
        const float* kr = in.random(batch * kv_heads * s.d * s.n_k);
        const float* vr = in.random(batch * kv_heads * s.n_k * s.d_v);
        q.assign(qr, qr + batch * heads * s.d * s.n_q);
        k.assign(kr, kr + batch * kv_heads * s.d * s.n_k);
        v.assign(vr, vr + batch * kv_heads * s.n_k * s.d_v);
        // sixteen value rows near the format's largest finite value: the
        // fused kernel's fast pass overflows on their sum and its careful
        // pass runs
        if (value_spike != 0)
            for (std::size_t kv = 0; kv < batch * kv_heads; ++kv)
                for (std::size_t key = 10; key < 26; ++key) v[(kv * s.n_k + key) * s.d_v] = value_spike;
        q16 = af::testing::stored<El>(q.data(), q.size());
        k16 = af::testing::stored<El>(k.data(), k.size());
        v16 = af::testing::stored<El>(v.data(), v.size());
    }
};

// Q as columns (d x n_q); K as columns, either each key's d values
// contiguous or each feature's n_k keys contiguous (a strided read); V rows,
// contiguous or as columns.
template <class El>
auto views(const stored_inputs<El>& in, const shape& s, bool keys_contiguous, bool values_contiguous) {
    const auto k_view = keys_contiguous ? af::col_major(in.k16.data(), s.d, s.n_k, batch, kv_heads)
                                        : af::row_major(in.k16.data(), s.d, s.n_k, batch, kv_heads);
    const auto v_view = values_contiguous ? af::row_major(in.v16.data(), s.n_k, s.d_v, batch, kv_heads)
                                          : af::col_major(in.v16.data(), s.n_k, s.d_v, batch, kv_heads);
    return std::tuple{af::col_major(in.q16.data(), s.d, s.n_q, batch, heads), k_view, v_view};
}

// The bound of the header: how far rounding the inputs to El may move a
// softmax family's output.
template <class El>
double storage_bound(const stored_inputs<El>& in, const shape& s, const std::vector<double>& exact, bool weights_rounded) {
    const double u = af::unit_roundoff<El>;
    double largest_score = 0, largest_value = 0, scale = 1;
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t r = 0; r < s.n_q; ++r)
                for (std::size_t c = 0; c < s.n_k; ++c) {
                    double sum = 0;
                    for (std::size_t a = 0; a < s.d; ++a)
                        sum += std::abs(double(in.q[((b * heads + h) * s.n_q + r) * s.d + a])) *
                               std::abs(double(in.k[(kv_matrix(b, h) * s.n_k + c) * s.d + a]));
                    largest_score = std::max(largest_score, sum / std::sqrt(double(s.d)));
                }
    for (float x : in.v) largest_value = std::max(largest_value, double(std::abs(x)));
    for (double o : exact) scale = std::max(scale, std::abs(o));
    // bf16 products round each weight too: at most u max|v| more
    return (std::expm1(4 * u * largest_score) + (weights_rounded ? 2 : 1) * u) * largest_value + 1e-4 * scale;
}

// For bf16 products: every |out - exact| within u * weighted_magnitude (the
// reference over |V|) plus 1e-4 of the output's scale.
bool within_weight_rounding(const std::vector<double>& exact, const std::vector<double>& weighted_magnitude,
                            const std::vector<float>& out) {
    double scale = 1;
    for (double o : exact) scale = std::max(scale, std::abs(o));
    const double u = af::unit_roundoff<af::bfloat16>;
    for (std::size_t n = 0; n < out.size(); ++n)
        if (!(std::abs(double(out[n]) - exact[n]) <= u * weighted_magnitude[n] + 1e-4 * scale)) return false;
    return out.size() == exact.size();
}

double worst_difference(const std::vector<double>& exact, const std::vector<float>& out) {
    if (exact.size() != out.size()) return std::numeric_limits<double>::infinity();
    double worst = 0;
    for (std::size_t n = 0; n < out.size(); ++n) worst = std::max(worst, std::abs(double(out[n]) - exact[n]));
    return worst;
}

// One family at format El over every shape and layout. make(Q, K, V) builds
// the expression over any three inputs; softmax_family: the storage bound
// applies; weighted_sum: the weights multiply V (every family but hard).
template <class El, class Make>
void check_family(const char* family, const Make& make, bool softmax_family, bool weighted_sum = true) {
    // (depth 64, even: bf16 products read each key's pairs in place)
    const shape shapes[] = {{53, 301, 67, 35}, {53, 301, 67, 48}, {53, 301, 64, 35}, {3, 301, 67, 35}, {3, 301, 67, 48}, {2, 301, 67, 32}, {1, 301, 67, 48}};
    af::matrix<"Q", dyn, dyn, El> Q;
    af::matrix<"K", dyn, dyn, El> K;
    af::matrix<"V", dyn, dyn, El> V;
    const auto e = make(Q, K, V);
    for (const shape& s : shapes)
        for (const bool keys_contiguous : {true, false})
            for (const bool values_contiguous : {true, false}) {
                const stored_inputs<El> in(s, std::uint32_t(s.n_q * 7 + s.d_v + keys_contiguous * 2 + values_contiguous));
                const auto [qv, kv, vv] = views(in, s, keys_contiguous, values_contiguous);
                const auto qb = af::bind(Q, qv);
                const auto kb = af::bind(K, kv);
                const auto vb = af::bind(V, vv);
                const auto ref = af::reference::evaluate(e, qb, kb, vb);
                std::vector<El> v_magnitude(in.v16);
                for (El& x : v_magnitude) x = af::element<El>::narrow(std::abs(af::to_float(x)));
                auto magnitude_view = vv;  // V's layout over |V|
                magnitude_view.data = v_magnitude.data();
                const auto weighted_magnitude = af::reference::evaluate(e, qb, kb, af::bind(V, magnitude_view)).values;
                for (const execution mode : {execution::fused, execution::unfused}) {
                    INFO(family << " at " << af::element<El>::name << ", n_q " << s.n_q << (keys_contiguous ? ", keys contiguous" : ", keys strided")
                                << (values_contiguous ? ", value rows contiguous" : ", value rows strided")
                                << (mode == execution::fused ? ", fused" : ", unfused"));
                    const auto [out, info] = af::cpu::run(e, af::run_options{mode}, qb, kb, vb);
                    const bool bf16_products = std::is_same_v<El, af::bfloat16> && mode == execution::fused &&
                                               af::cpu::this_machine().bf16_products && s.n_q >= 16;
                    CHECK(notes_name(info, "fused attention: bf16 products") == bf16_products);
                    if (bf16_products && weighted_sum) {
                        CHECK(notes_name(info, "the weights rounded to bf16"));
                        CHECK(within_weight_rounding(ref.values, weighted_magnitude, out.values));
                    } else {
                        CHECK(af::variants::relative_error(ref.values, out.values) <= 1e-4);
                    }
                    // the fused kernel read them as stored: nothing widened whole
                    const bool as_stored = mode == execution::fused;
                    CHECK(notes_name(info, "input Q: stored as") == !as_stored);
                    CHECK(notes_name(info, "input K: stored as") == !as_stored);
                    CHECK(notes_name(info, "input V: stored as") == !as_stored);
                    // the unrounded inputs, in the layout of the contiguous case
                    if (softmax_family && keys_contiguous && values_contiguous) {
                        af::matrix<"Qf"> Qf;
                        af::matrix<"Kf"> Kf;
                        af::matrix<"Vf"> Vf;
                        const auto exact = af::reference::evaluate(
                            make(Qf, Kf, Vf), af::bind(Qf, af::col_major(in.q.data(), s.d, s.n_q, batch, heads)),
                            af::bind(Kf, af::col_major(in.k.data(), s.d, s.n_k, batch, kv_heads)),
                            af::bind(Vf, af::row_major(in.v.data(), s.n_k, s.d_v, batch, kv_heads)));
                        const double bound = storage_bound(in, s, exact.values, bf16_products), worst = worst_difference(exact.values, out.values);
                        INFO("against the unrounded inputs: error " << worst << ", bound " << bound);
                        CHECK(worst <= bound);
                    }
                }
            }
}

template <class El>
void check_every_family() {
    check_family<El>("dense", [](const auto& Q, const auto& K, const auto& V) { return softmax(scale(Q^af::T*K))*V; }, true);
    check_family<El>("causal", [](const auto& Q, const auto& K, const auto& V) { return softmax(mask(scale(Q^af::T*K), causal))*V; }, true);
    check_family<El>("sliding window", [](const auto& Q, const auto& K, const auto& V) {
        return softmax(mask(scale(Q^af::T*K), af::window(40)))*V;
    }, true);
    check_family<El>("soft-capped", [](const auto& Q, const auto& K, const auto& V) { return softmax(30 * tanh(scale(Q^af::T*K) / 30))*V; }, true);
    check_family<El>("hard", [](const auto& Q, const auto& K, const auto& V) { return hard(scale(Q^af::T*K))*V; }, false, false);
    check_family<El>("sigmoid, causal", [](const auto& Q, const auto& K, const auto& V) {
        return sigmoid(mask(scale(Q^af::T*K), causal) - 5.7)*V;
    }, false);
    check_family<El>("dropout", [](const auto& Q, const auto& K, const auto& V) { return dropout(softmax(scale(Q^af::T*K)), 0.25, 91)*V; }, false);
}

}  // namespace

TEST_CASE("the fused kernel reads f16 Q, K and V as stored on every path", "[cpu][storage]") { check_every_family<af::half>(); }

TEST_CASE("the fused kernel reads bf16 Q, K and V as stored on every path", "[cpu][storage]") { check_every_family<af::bfloat16>(); }

TEST_CASE("bf16 value rows near fp32's largest value take the careful pass and stay finite", "[cpu][storage]") {
    // 48 value columns: the fast pass reads the value rows in place, the careful one widens them
    const shape s{53, 301, 67, 48};
    const stored_inputs<af::bfloat16> in(s, 5, 3.0e38f);
    af::matrix<"Q", dyn, dyn, af::bfloat16> Q;
    af::matrix<"K", dyn, dyn, af::bfloat16> K;
    af::matrix<"V", dyn, dyn, af::bfloat16> V;
    const auto e = softmax(scale(Q^af::T*K))*V;
    for (const bool decode : {false, true}) {
        const shape at{decode ? std::size_t{1} : s.n_q, s.n_k, s.d, s.d_v};
        const auto [qv, kv, vv] = views(in, at, true, true);
        const auto qb = af::bind(Q, qv);
        const auto kb = af::bind(K, kv);
        const auto vb = af::bind(V, vv);
        const auto ref = af::reference::evaluate(e, qb, kb, vb);
        // the case is what it claims: some row's unnormalised sum of weighted
        // values (what the fast pass accumulates) exceeds fp32's range
        double largest_sum = 0;
        for (std::size_t b = 0; b < batch; ++b)
            for (std::size_t h = 0; h < heads; ++h)
                for (std::size_t r = 0; r < at.n_q; ++r) {
                    const std::size_t kv = kv_matrix(b, h);
                    std::vector<double> score(at.n_k);
                    for (std::size_t c = 0; c < at.n_k; ++c) {
                        double dot = 0;
                        for (std::size_t a = 0; a < at.d; ++a)
                            dot += double(af::to_float(in.q16[((b * heads + h) * at.n_q + r) * at.d + a])) *
                                   double(af::to_float(in.k16[(kv * at.n_k + c) * at.d + a]));
                        score[c] = dot / std::sqrt(double(at.d));
                    }
                    const double top = *std::max_element(score.begin(), score.end());
                    double sum = 0;
                    for (std::size_t c = 0; c < at.n_k; ++c)
                        sum += std::exp(score[c] - top) * double(af::to_float(in.v16[(kv * at.n_k + c) * at.d_v]));
                    largest_sum = std::max(largest_sum, sum);
                }
        REQUIRE(largest_sum > double(std::numeric_limits<float>::max()));
        const auto [out, info] = af::cpu::run(e, af::run_options{execution::fused}, qb, kb, vb);
        INFO((decode ? "decode" : "prefill"));
        CHECK(std::all_of(out.values.begin(), out.values.end(), [](float x) { return std::isfinite(x); }));
        CHECK(af::variants::relative_error(ref.values, out.values) <= 1e-4);
    }
}

TEST_CASE("options.bf16_products = false keeps every product of bf16 operands fp32", "[cpu][storage]") {
    const shape s{53, 301, 64, 48};
    const stored_inputs<af::bfloat16> in(s, 17);
    af::matrix<"Q", dyn, dyn, af::bfloat16> Q;
    af::matrix<"K", dyn, dyn, af::bfloat16> K;
    af::matrix<"V", dyn, dyn, af::bfloat16> V;
    const auto e = softmax(mask(scale(Q^af::T*K), causal))*V;
    const auto [qv, kv, vv] = views(in, s, true, true);
    const auto qb = af::bind(Q, qv);
    const auto kb = af::bind(K, kv);
    const auto vb = af::bind(V, vv);
    const auto ref = af::reference::evaluate(e, qb, kb, vb);
    const auto [out, info] = af::cpu::run(e, {.mode = execution::fused, .bf16_products = false}, qb, kb, vb);
    CHECK_FALSE(notes_name(info, "bf16 products"));
    CHECK(af::variants::relative_error(ref.values, out.values) <= 1e-4);
    // and with them (where the CPU has them) the note names what ran
    const auto [out16, info16] = af::cpu::run(e, {.mode = execution::fused}, qb, kb, vb);
    CHECK(notes_name(info16, "bf16 products (AVX512-BF16) for Q.K and the weights' product with V") ==
          af::cpu::this_machine().bf16_products);
}

// run_into: the result written into the caller's memory as stored. Bound:
// the fp32 result within 1e-4 of the scale (or the bf16 products' bound),
// then rounded once to the output's element: u |ref| more per element.
template <class Out>
void check_output_element() {
    const shape s{53, 301, 67, 35};
    const stored_inputs<af::bfloat16> in(s, 29);
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"Q", dyn, dyn, af::bfloat16> Q16;
    af::matrix<"K", dyn, dyn, af::bfloat16> K16;
    af::matrix<"V", dyn, dyn, af::bfloat16> V16;
    const auto qb = af::bind(Q, af::col_major(in.q.data(), s.d, s.n_q, batch, heads));
    const auto kb = af::bind(K, af::col_major(in.k.data(), s.d, s.n_k, batch, kv_heads));
    const auto vb = af::bind(V, af::row_major(in.v.data(), s.n_k, s.d_v, batch, kv_heads));
    const auto [q16, k16, v16] = views(in, s, true, true);
    const auto qb16 = af::bind(Q16, q16);
    const auto kb16 = af::bind(K16, k16);
    const auto vb16 = af::bind(V16, v16);
    const auto e = softmax(mask(scale(Q^af::T*K), causal))*V;
    const auto e16 = softmax(mask(scale(Q16^af::T*K16), causal))*V16;
    const double u = std::is_same_v<Out, float> ? 0.0 : af::unit_roundoff<Out>;
    const std::size_t count = batch * heads * s.n_q * s.d_v;
    for (const bool sixteen_bit_inputs : {false, true})
        for (const bool interleaved : {false, true})
            for (const execution mode : {execution::fused, execution::unfused}) {
                INFO(af::element<Out>::name << " output, " << (sixteen_bit_inputs ? "bf16" : "f32") << " inputs, "
                                            << (interleaved ? "[batch, n_q, heads * d_v]" : "row-major per head") << ", "
                                            << (mode == execution::fused ? "fused" : "unfused"));
                // poisoned, so that an element left unwritten shows
                std::vector<Out> memory(count + 7, af::from_float<Out>(std::numeric_limits<float>::quiet_NaN()));
                const auto out = interleaved ? af::output_strided(memory.data() + 7, af::layout{.rows = s.n_q, .cols = s.d_v,
                                                                                                .row_stride = std::ptrdiff_t(heads * s.d_v),
                                                                                                .col_stride = 1, .batch = batch, .heads = heads,
                                                                                                .batch_stride = std::ptrdiff_t(s.n_q * heads * s.d_v),
                                                                                                .head_stride = std::ptrdiff_t(s.d_v)})
                                             : af::output_row_major(memory.data() + 7, s.n_q, s.d_v, batch, heads);
                const af::report info = sixteen_bit_inputs ? af::cpu::run_into(e16, {.mode = mode}, out, qb16, kb16, vb16)
                                                           : af::cpu::run_into(e, {.mode = mode}, out, qb, kb, vb);
                const auto ref = sixteen_bit_inputs ? af::reference::evaluate(e16, qb16, kb16, vb16) : af::reference::evaluate(e, qb, kb, vb);
                std::vector<af::bfloat16> v_abs(in.v16);
                for (auto& x : v_abs) x = af::from_float<af::bfloat16>(std::abs(af::to_float(x)));
                auto magnitude_view = v16;
                magnitude_view.data = v_abs.data();
                const auto weighted = af::reference::evaluate(e16, qb16, kb16, af::bind(V16, magnitude_view)).values;
                const bool weights_rounded = notes_name(info, "the weights rounded to bf16");
                CHECK(weights_rounded == (sixteen_bit_inputs && mode == execution::fused && af::cpu::this_machine().bf16_products));
                double scale = 1;
                for (double x : ref.values) scale = std::max(scale, std::abs(x));
                std::size_t bad = 0;
                for (std::size_t b = 0; b < batch; ++b)
                    for (std::size_t h = 0; h < heads; ++h)
                        for (std::size_t r = 0; r < s.n_q; ++r)
                            for (std::size_t c = 0; c < s.d_v; ++c) {
                                const std::size_t n = ((b * heads + h) * s.n_q + r) * s.d_v + c;
                                const double got = af::to_float(out.at(b, h, r, c)), want = ref.values[n];
                                const double bound = u * std::abs(want) + 1e-4 * scale +
                                                     (weights_rounded ? af::unit_roundoff<af::bfloat16> * weighted[n] : 0.0);
                                if (!(std::abs(got - want) <= bound)) ++bad;
                            }
                CHECK(bad == 0);
                // nothing written outside the output
                for (std::size_t n = 0; n < 7; ++n) CHECK(std::isnan(af::to_float(memory[n])));
                // a fused root writes the caller's memory as stored; an unfused
                // one (or a strided fp32 output) says that it wrote fp32 first
                const bool dense_f32 = std::is_same_v<Out, float> && !interleaved;
                CHECK(notes_name(info, "output: ") == (mode == execution::unfused && !dense_f32));
                if (mode == execution::fused) {
                    const auto plain = sixteen_bit_inputs ? af::cpu::run(e16, {.mode = mode}, qb16, kb16, vb16).info
                                                          : af::cpu::run(e, {.mode = mode}, qb, kb, vb).info;
                    CHECK(info.intermediate_bytes == plain.intermediate_bytes);  // no fp32 copy of the result
                }
            }
}

TEST_CASE("run_into writes the result as stored: f32, f16 and bf16 outputs, dense and interleaved", "[cpu][storage]") {
    check_output_element<float>();
    check_output_element<af::half>();
    check_output_element<af::bfloat16>();
}

TEST_CASE("run_into rejects an output of the wrong shape, naming both", "[cpu][storage]") {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const std::vector<float> q(5 * 7, 0.1f), k(5 * 9, 0.2f), v(9 * 3, 0.3f);
    std::vector<af::bfloat16> memory(7 * 4);
    const auto e = softmax(scale(Q^af::T*K))*V;
    const auto run = [&](const af::output_view<af::bfloat16>& out) {
        return af::cpu::run_into(e, out, af::bind(Q, af::row_major(q.data(), 5, 7)), af::bind(K, af::row_major(k.data(), 5, 9)),
                                 af::bind(V, af::row_major(v.data(), 9, 3)));
    };
    CHECK_THROWS_WITH(run(af::output_row_major(memory.data(), 7, 4)),
                      Catch::Matchers::Contains("output: the expression gives 1 batch x 1 heads of 7x3 but the output is 1 batch x 1 heads of 7x4"));
    CHECK_THROWS_WITH(run(af::output_row_major<af::bfloat16>(nullptr, 7, 3)), Catch::Matchers::Contains("output: a null pointer"));
    CHECK_NOTHROW(run(af::output_row_major(memory.data(), 7, 3)));
}
