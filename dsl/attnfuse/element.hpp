// The element types an input can be stored in, each defined once with every
// face a stage reads:
//
//   template <> struct element<T> {
//       static constexpr std::string_view name;     // as reports and errors print it
//       static constexpr int significand_bits;      // with the implicit bit: the unit roundoff is 2^-bits
//       static constexpr float widen(T);            // exact: every value of T is a float
//       static constexpr T narrow(float);           // round to nearest, ties to even; NaN stays NaN
//   };
//
// Arithmetic is fp32 everywhere; storage may be narrower. A backend declares
// which elements its kernels read as they are (`hooks::reads<T>`, see
// lower.hpp); an input of any other element is widened to fp32 once per run,
// with a note in the report, so every element type runs on every backend.
#pragma once
#include <bit>
#include <concepts>
#include <cstdint>
#include <string_view>

namespace attnfuse {

// IEEE 754 binary16: 1 sign, 5 exponent, 10 fraction bits (largest finite
// 65504, smallest subnormal 2^-24), as a model stores them: one 16-bit
// member, no padding, so std::memcpy turns an array of std::uint16_t into
// halves.
struct half {
    std::uint16_t bits = 0;
    friend constexpr bool operator==(half, half) = default;
};

// bfloat16: the top 16 bits of an fp32 (1 sign, 8 exponent, 7 fraction bits),
// fp32's range at 8 bits of precision.
struct bfloat16 {
    std::uint16_t bits = 0;
    friend constexpr bool operator==(bfloat16, bfloat16) = default;
};

static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2, "attnfuse: 16-bit storage must be 16 bits");

// Not defined for a type that is no storage element.
template <class T> struct element;

template <>
struct element<float> {
    static constexpr std::string_view name = "f32";
    static constexpr int significand_bits = 24;
    static constexpr float widen(float x) { return x; }
    static constexpr float narrow(float x) { return x; }
};

template <>
struct element<half> {
    static constexpr std::string_view name = "f16";
    static constexpr int significand_bits = 11;
    static constexpr float widen(half x) {
        const std::uint32_t sign = static_cast<std::uint32_t>(x.bits & 0x8000u) << 16;
        std::uint32_t exponent = (x.bits >> 10) & 0x1fu, fraction = x.bits & 0x3ffu;
        if (exponent == 0x1fu) return std::bit_cast<float>(sign | 0x7f800000u | (fraction << 13));  // inf, NaN with its payload
        if (exponent == 0) {
            if (fraction == 0) return std::bit_cast<float>(sign);
            // a subnormal: shift its leading 1 up to the implicit bit
            int e = 1;
            while (!(fraction & 0x400u)) {
                fraction <<= 1;
                --e;
            }
            return std::bit_cast<float>(sign | static_cast<std::uint32_t>(e + 112) << 23 | (fraction & 0x3ffu) << 13);
        }
        return std::bit_cast<float>(sign | (exponent + 112u) << 23 | fraction << 13);
    }
    static constexpr half narrow(float f) {
        const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
        const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
        const std::uint32_t magnitude = u & 0x7fffffffu;
        auto make = [sign](std::uint32_t bits) { return half{static_cast<std::uint16_t>(sign | bits)}; };
        // NaN: quiet, with the payload's top bits (a payload only in the low
        // bits would otherwise read as infinity)
        if (magnitude > 0x7f800000u) return make(0x7e00u | ((magnitude >> 13) & 0x3ffu));
        // from 65520 (halfway between 65504 and 2^16, which ties to the even
        // 2^16) upward, infinity
        if (magnitude >= 0x477ff000u) return make(0x7c00u);
        if (magnitude >= 0x38800000u) {  // a normal half (>= 2^-14): rebias, round 23 fraction bits to 10
            std::uint32_t v = magnitude - 0x38000000u;
            v += 0x0fffu + ((v >> 13) & 1u);
            return make(v >> 13);
        }
        if (magnitude < 0x33000000u) return make(0);  // below 2^-25: zero (2^-25 itself ties to 0 below)
        // a subnormal half: the value in units of 2^-24, rounded to nearest even
        const std::uint32_t exponent = magnitude >> 23, shift = 126u - exponent;  // 14..24
        const std::uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
        std::uint32_t units = significand >> shift;
        const std::uint32_t rest = significand & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
        if (rest > halfway || (rest == halfway && (units & 1u))) ++units;
        return make(units);
    }
};

template <>
struct element<bfloat16> {
    static constexpr std::string_view name = "bf16";
    static constexpr int significand_bits = 8;
    static constexpr float widen(bfloat16 x) { return std::bit_cast<float>(static_cast<std::uint32_t>(x.bits) << 16); }
    static constexpr bfloat16 narrow(float f) {
        const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<std::uint16_t>((u >> 16) | 0x40u)};  // NaN: quiet
        return {static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
    }
};

template <class T>
concept storage_element = requires(T x) {
    { element<T>::name } -> std::convertible_to<std::string_view>;
    { element<T>::widen(x) } -> std::same_as<float>;
};

// The unit roundoff of an element type: half the distance from 1 to the next value.
template <storage_element T>
inline constexpr double unit_roundoff = 1.0 / static_cast<double>(std::uint64_t{1} << element<T>::significand_bits);

template <storage_element T>
constexpr float to_float(T x) {
    return element<T>::widen(x);
}
template <storage_element T>
constexpr T from_float(float x) {
    return element<T>::narrow(x);
}

}  // namespace attnfuse
