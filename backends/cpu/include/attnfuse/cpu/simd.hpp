// Float vectors of the build's width (GCC vector extensions) and the vector
// face of every elementwise operation of the DSL. The width follows the ISA
// the build targets (ATTNFUSE_ARCH_FLAGS, chosen at configure time): 16
// lanes, one zmm register, where AVX-512F is on (x86-64-v4); 8 lanes
// otherwise, one ymm register with AVX2 (x86-64-v3) or two SSE registers at
// the baseline. Every kernel is written against `lanes`, never a number.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__) || defined(__FMA__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include <attnfuse/element.hpp>
#include <attnfuse/ops.hpp>

#include "width.hpp"

namespace attnfuse::cpu::simd {
inline namespace ATTNFUSE_CPU_ISA {

#if defined(__AVX512F__)
inline constexpr int lanes = 16;
inline constexpr const char* width_name = "AVX-512 (16 lanes)";
#elif defined(__AVX2__)
inline constexpr int lanes = 8;
inline constexpr const char* width_name = "AVX2 (8 lanes)";
#else
inline constexpr int lanes = 8;
inline constexpr const char* width_name = "baseline SSE (8 lanes in two registers)";
#endif
typedef float vf __attribute__((vector_size(4 * lanes)));
typedef std::int32_t vi __attribute__((vector_size(4 * lanes)));
typedef std::uint32_t vu __attribute__((vector_size(4 * lanes)));

namespace detail {
// {f(0), f(1), ..., f(lanes - 1)}, spelled lane by lane
template <class F, std::size_t... L>
inline vf each_lane(const F& f, std::index_sequence<L...>) {
    return vf{f(static_cast<int>(L))...};
}
}  // namespace detail

// Spelled lane by lane: `vf{} + x` would cost an add, since 0 + x is not x for x = -0.
inline vf splat(float x) {
    return detail::each_lane([x](int) { return x; }, std::make_index_sequence<lanes>{});
}
inline vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// A vector of 16-bit values widened to floats (exact): F16C's vcvtph2ps for
// f16 where the build has it; bf16 by a zero extension and a 16-bit shift.
typedef std::uint16_t vh __attribute__((vector_size(2 * lanes)));
inline vf load(const bfloat16* p) {
    vh h;
    std::memcpy(&h, p, sizeof h);
    const vu bits = __builtin_convertvector(h, vu) << 16;
    vf v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}
inline vf load(const half* p) {
#if defined(__AVX512F__)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    vf v;
    for (int l = 0; l < lanes; ++l) v[l] = to_float(p[l]);
    return v;
#endif
}
inline vf iota(float start) {
    return detail::each_lane([](int l) { return static_cast<float>(l); }, std::make_index_sequence<lanes>{}) + start;
}
inline vf from_mask(vi mask) { return mask ? splat(1.0f) : splat(0.0f); }
inline vf max(vf a, vf b) { return a > b ? a : b; }
inline vf min(vf a, vf b) { return a < b ? a : b; }
inline float horizontal_max(vf v) {
    float m = v[0];
    for (int l = 1; l < lanes; ++l) m = v[l] > m ? v[l] : m;
    return m;
}
inline float horizontal_sum(vf v) {
    float s = 0;
    for (int l = 0; l < lanes; ++l) s += v[l];
    return s;
}

// Fused multiply-add, asked for explicitly: the kernels' rounding does not
// depend on the user's -ffp-contract.
inline vf fma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
    return _mm256_fmadd_ps(a, b, c);
#else
    return a * b + c;
#endif
}

// exp with a relative error of about 2 ulp on [-87, 88]; exactly 0 below
// (so exp(-inf) is 0, the weight of a masked key), +inf above, NaN kept.
inline vf exp(vf x) {
    const vf clamped = min(max(x, splat(-87.0f)), splat(88.0f));
    // n = round(x * log2(e)), as floor(t + 0.5) from a truncating conversion
    const vf t = fma(clamped, splat(1.44269504088896341f), splat(0.5f));
    vf fl = __builtin_convertvector(__builtin_convertvector(t, vi), vf);
    fl = fl > t ? fl - 1.0f : fl;
    // r = x - n ln 2 in two parts (Cephes), then exp(r) by a degree-7 polynomial
    const vf r = fma(fl, splat(2.12194440e-4f), fma(fl, splat(-0.693359375f), clamped));
    vf p = splat(1.9875691500e-4f);
    p = fma(p, r, splat(1.3981999507e-3f));
    p = fma(p, r, splat(8.3334519073e-3f));
    p = fma(p, r, splat(4.1665795894e-2f));
    p = fma(p, r, splat(1.6666665459e-1f));
    p = fma(p, r, splat(5.0000001201e-1f));
    p = fma(p * r, r, r) + 1.0f;
    const vi exponent = (__builtin_convertvector(fl, vi) + 127) << 23;
    vf scale;
    std::memcpy(&scale, &exponent, sizeof scale);
    vf result = p * scale;
    result = x < -87.0f ? splat(0.0f) : result;
    result = x > 88.0f ? splat(INFINITY) : result;
    return x != x ? x : result;
}

// exp for softmax weights, where the argument s - max is <= 0, -inf or NaN:
// 17 vector operations instead of exp's 27. exp(-inf) and anything below
// -87 give exactly 0; NaN stays NaN.
inline vf exp_nonpositive(vf x) {
    const vf clamped = x < -87.0f ? splat(-87.0f) : x;
    // n = round(x log2 e): adding 1.5 * 2^23 rounds to an integer in the low mantissa bits
    const vf shifted = fma(clamped, splat(1.44269504088896341f), splat(12582912.0f));
    const vf n = shifted - 12582912.0f;
    const vf r = fma(n, splat(2.12194440e-4f), fma(n, splat(-0.693359375f), clamped));  // |r| <= ln2 / 2
    // Taylor to r^6: relative error below 2e-7 on |r| <= 0.35
    vf p = splat(1.0f / 720.0f);
    p = fma(p, r, splat(1.0f / 120.0f));
    p = fma(p, r, splat(1.0f / 24.0f));
    p = fma(p, r, splat(1.0f / 6.0f));
    p = fma(p, r, splat(0.5f));
    p = fma(p, r, splat(1.0f));
    p = fma(p, r, splat(1.0f));
    vu bits, n_bits;  // unsigned: wrap-around is defined (it happens for NaN, whose result is replaced below)
    std::memcpy(&bits, &p, sizeof p);
    std::memcpy(&n_bits, &shifted, sizeof shifted);
    bits += n_bits << 23;  // multiply by 2^n: the low bits of `shifted` are n
    vf result;
    std::memcpy(&result, &bits, sizeof result);
    result = x < -87.0f ? splat(0.0f) : result;
    return x != x ? x : result;  // a NaN with a payload would not survive the exponent addition
}

inline vf tanh(vf x) {
    // tanh(x) = 1 - 2/(exp(2x)+1), saturated where exp overflows
    const vf e = exp(min(x, splat(44.0f)) * 2.0f);
    const vf t = 1.0f - 2.0f / (e + 1.0f);
    return (x != x) | (x == 0.0f) ? x : t;  // NaN stays; tanh(-0) is -0
}

// The lane algebra of attnfuse::op (ops.hpp): what an operation's `lanes`
// face is written against, here at `lanes` lanes.
struct algebra {
    using vec = vf;
    static vf splat(float x) { return simd::splat(x); }
    static vf pick(vi mask, vf a, vf b) { return mask ? a : b; }
    static vf truth(vi mask) { return from_mask(mask); }
    static vi is_nan(vf a) { return a != a; }
    static vf max(vf a, vf b) { return simd::max(a, b); }
    static vf min(vf a, vf b) { return simd::min(a, b); }
    static vf fma(vf a, vf b, vf c) { return simd::fma(a, b, c); }
    static vf exp(vf a) { return simd::exp(a); }
    static vf tanh(vf a) { return simd::tanh(a); }
    template <class Op, class... V> static vf each(V... a) {
        vf out;
        for (int l = 0; l < lanes; ++l) out[l] = Op::apply(a[l]...);
        return out;
    }
};

// An operation without a `lanes` face: a compile error whose instantiation
// names it, never a silent fall-through to another operation.
template <class Op> constexpr void no_vector_face() {
    static_assert(sizeof(Op) == 0, "attnfuse: this elementwise operation has no CPU vector face (it is the Op of this "
                                   "instantiation). Fix: give it a `lanes` face in dsl/attnfuse/ops.hpp.");
}

// The vector face of op::Op: same meaning as Op::apply, lane by lane.
template <class Op, class... V> vf apply(V... a) {
    if constexpr (requires { Op::template lanes<algebra>(a...); }) return Op::template lanes<algebra>(a...);
    else {
        no_vector_face<Op>();
        return vf{};
    }
}

}  // namespace ATTNFUSE_CPU_ISA
}  // namespace attnfuse::cpu::simd
