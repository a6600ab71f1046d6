// Storage elements (dsl/attnfuse/element.hpp): f16 and bf16 against an
// independent decoding of their bits, and rounding to nearest even checked
// at every boundary between two neighbouring values of each format; the
// reference and widened() read stored values exactly.
#include <attnfuse/dsl.hpp>
#include <catch2/catch.hpp>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace af = attnfuse;

namespace {

// The value of a bit pattern, decoded from its fields in double (shares no
// code with element.hpp). Infinity decodes as the power of two just past
// the largest finite value: where rounding to nearest places it.
double decode(std::uint16_t bits, int exponent_bits, int fraction_bits) {
    const int exponent_mask = (1 << exponent_bits) - 1, bias = exponent_mask / 2;
    const int exponent = (bits >> fraction_bits) & exponent_mask, fraction = bits & ((1 << fraction_bits) - 1);
    const double sign = (bits >> 15) ? -1.0 : 1.0;
    if (exponent == 0) return sign * std::ldexp(fraction, 1 - bias - fraction_bits);
    return sign * std::ldexp((1 << fraction_bits) + fraction, exponent - bias - fraction_bits);
}

template <class T>
void check_every_boundary(int exponent_bits, int fraction_bits) {
    const std::uint16_t infinity = static_cast<std::uint16_t>(((1 << exponent_bits) - 1) << fraction_bits);
    for (std::uint32_t magnitude = 0; magnitude < infinity; ++magnitude)
        for (const std::uint16_t sign : {std::uint16_t{0}, std::uint16_t{0x8000}}) {
            const auto bits = static_cast<std::uint16_t>(sign | magnitude), next = static_cast<std::uint16_t>(bits + 1);
            const double x = decode(bits, exponent_bits, fraction_bits), y = decode(next, exponent_bits, fraction_bits);
            INFO(af::element<T>::name << " bits 0x" << std::hex << bits);
            // widening is exact, signed zero included
            const float wide = af::to_float(T{bits});
            REQUIRE(static_cast<double>(wide) == x);
            REQUIRE(std::signbit(wide) == (sign != 0));
            REQUIRE(af::from_float<T>(wide).bits == bits);
            // halfway to the next value (exact in float: one more bit than T)
            const auto midpoint = static_cast<float>((x + y) / 2);
            REQUIRE(static_cast<double>(midpoint) == (x + y) / 2);
            const std::uint16_t even = (bits & 1u) ? next : bits;
            REQUIRE(af::from_float<T>(midpoint).bits == even);
            const float toward = sign ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
            REQUIRE(af::from_float<T>(std::nextafter(midpoint, toward)).bits == bits);
            REQUIRE(af::from_float<T>(std::nextafter(midpoint, -toward)).bits == next);
        }
}

}  // namespace

TEST_CASE("f16 widens exactly and rounds to nearest even at every boundary", "[elements]") {
    check_every_boundary<af::half>(5, 10);
    // the limits, by name
    CHECK(af::to_float(af::half{0x7bff}) == 65504.0f);
    CHECK(af::from_float<af::half>(65519.99f).bits == 0x7bff);
    CHECK(af::from_float<af::half>(65520.0f).bits == 0x7c00);  // ties to the even 2^16: infinity
    CHECK(af::to_float(af::half{0x0001}) == std::ldexp(1.0f, -24));
    CHECK(af::from_float<af::half>(std::ldexp(1.0f, -25)).bits == 0x0000);
    CHECK(af::from_float<af::half>(std::nextafter(std::ldexp(1.0f, -25), 1.0f)).bits == 0x0001);
    CHECK(af::from_float<af::half>(std::numeric_limits<float>::denorm_min()).bits == 0x0000);
    CHECK(af::from_float<af::half>(-std::numeric_limits<float>::infinity()).bits == 0xfc00);
    CHECK(af::from_float<af::half>(std::numeric_limits<float>::max()).bits == 0x7c00);
    static_assert(af::element<af::half>::narrow(1.0f).bits == 0x3c00 && af::element<af::half>::widen(af::half{0xc000}) == -2.0f,
                  "the conversions are constant expressions");
}

TEST_CASE("bf16 widens exactly and rounds to nearest even at every boundary", "[elements]") {
    check_every_boundary<af::bfloat16>(8, 7);
    CHECK(af::from_float<af::bfloat16>(std::numeric_limits<float>::max()).bits == 0x7f80);
    CHECK(af::from_float<af::bfloat16>(1.0f + std::ldexp(1.0f, -8)).bits == 0x3f80);  // a tie, to the even 1
    CHECK(af::from_float<af::bfloat16>(std::numeric_limits<float>::denorm_min()).bits == 0x0000);
    CHECK(af::from_float<af::bfloat16>(std::ldexp(1.0f, -133)).bits == 0x0001);  // bf16 keeps fp32's subnormals
}

TEST_CASE("NaN stays NaN, with its sign, whatever its payload", "[elements]") {
    for (std::uint32_t fraction = 1; fraction < 0x400u; ++fraction)
        for (const std::uint32_t sign : {0u, 0x8000u}) {
            const auto bits = static_cast<std::uint16_t>(sign | 0x7c00u | fraction);
            const float wide = af::to_float(af::half{bits});
            REQUIRE(std::isnan(wide));
            REQUIRE(std::signbit(wide) == (sign != 0));
        }
    // payloads only in the low bits a narrower fraction drops
    for (const std::uint32_t low : {0x7f800001u, 0x7f801fffu, 0xff800001u, 0x7f80ffffu, 0x7fc00000u}) {
        const float nan = std::bit_cast<float>(low);
        INFO("0x" << std::hex << low);
        const af::half h = af::from_float<af::half>(nan);
        const af::bfloat16 b = af::from_float<af::bfloat16>(nan);
        CHECK(std::isnan(af::to_float(h)));
        CHECK(std::isnan(af::to_float(b)));
        CHECK(std::signbit(af::to_float(h)) == std::signbit(nan));
        CHECK(std::signbit(af::to_float(b)) == std::signbit(nan));
    }
}

TEST_CASE("unit roundoff of each element", "[elements]") {
    CHECK(af::unit_roundoff<float> == std::ldexp(1.0, -24));
    CHECK(af::unit_roundoff<af::half> == std::ldexp(1.0, -11));
    CHECK(af::unit_roundoff<af::bfloat16> == std::ldexp(1.0, -8));
}

TEST_CASE("the reference and widened() read stored f16 and bf16 values exactly, at any layout", "[elements]") {
    af::matrix<"Q", af::dyn, af::dyn, af::bfloat16> Q;
    af::matrix<"K", af::dyn, af::dyn, af::half> K;
    af::matrix<"V", af::dyn, af::dyn, af::half> V;
    af::matrix<"Qf"> Qf;
    af::matrix<"Kf"> Kf;
    af::matrix<"Vf"> Vf;
    const std::size_t d = 5, n_q = 7, n_k = 11, d_v = 3, batch = 2, heads = 2;
    auto values = [](std::size_t count, double step) {
        std::vector<float> v(count);
        for (std::size_t i = 0; i < count; ++i) v[i] = static_cast<float>(std::sin(step * static_cast<double>(i + 1)) * 3.0);
        return v;
    };
    const std::vector<float> q = values(batch * heads * d * n_q, 0.37), k = values(batch * heads * d * n_k, 0.91),
                             v = values(batch * n_k * d_v, 1.3);
    std::vector<af::bfloat16> q16;
    std::vector<af::half> k16, v16;
    for (float x : q) q16.push_back(af::from_float<af::bfloat16>(x));
    for (float x : k) k16.push_back(af::from_float<af::half>(x));
    for (float x : v) v16.push_back(af::from_float<af::half>(x));
    std::vector<float> q_wide, k_wide, v_wide;
    for (auto x : q16) q_wide.push_back(af::to_float(x));
    for (auto x : k16) k_wide.push_back(af::to_float(x));
    for (auto x : v16) v_wide.push_back(af::to_float(x));
    // Q and K column-major (d x n), V row-major and shared by the heads
    const auto qb = af::bind(Q, af::col_major(q16.data(), d, n_q, batch, heads));
    const auto kb = af::bind(K, af::col_major(k16.data(), d, n_k, batch, heads));
    const auto vb = af::bind(V, af::row_major(v16.data(), n_k, d_v, batch, 1));
    const auto narrow = af::reference::evaluate(softmax(mask(scale(Q^af::T*K), af::causal))*V, qb, kb, vb);
    const auto wide = af::reference::evaluate(softmax(mask(scale(Qf^af::T*Kf), af::causal))*Vf,
                                              af::bind(Qf, af::col_major(q_wide.data(), d, n_q, batch, heads)),
                                              af::bind(Kf, af::col_major(k_wide.data(), d, n_k, batch, heads)),
                                              af::bind(Vf, af::row_major(v_wide.data(), n_k, d_v, batch, 1)));
    CHECK(narrow.values == wide.values);

    const af::binding<"K", float> k_read = af::widened(kb);
    CHECK(k_read.widened_from == "f16");
    REQUIRE(k_read.owned);
    CHECK(k_read.view.rows == d);
    CHECK(k_read.view.cols == n_k);
    CHECK(k_read.view.batch == batch);
    CHECK(k_read.view.heads == heads);
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t r = 0; r < d; ++r)
                for (std::size_t c = 0; c < n_k; ++c) REQUIRE(k_read.view.at(b, h, r, c) == af::to_float(kb.view.at(b, h, r, c)));
}
