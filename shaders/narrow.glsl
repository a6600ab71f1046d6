// attnfuse: a dense f32 result rounded to 16-bit elements, two to each
// 32-bit word of OUT (element 2w in the low half; the word's bits stored
// through OUT's float array, a move that keeps them), as attnfuse::element<T>::
// narrow rounds them on the host: to nearest, ties to even, NaN kept quiet.
// Integer arithmetic on the bits, so every device gives the same halves.
// P: OUT_R() is the element count; AF_F16 or AF_BF16 picks the format.

uint af_narrow_bf16(float x) {
    uint u = floatBitsToUint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16u) | 0x40u;
    return (u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u;
}

uint af_narrow_f16(float x) {
    uint u = floatBitsToUint(x);
    uint sign = (u >> 16u) & 0x8000u, magnitude = u & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return sign | 0x7e00u | ((magnitude >> 13u) & 0x3ffu);  // NaN, quiet
    if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // from 65520 up: infinity
    if (magnitude >= 0x38800000u) {  // a normal half: rebias, round 23 fraction bits to 10
        uint v = magnitude - 0x38000000u;
        v += 0x0fffu + ((v >> 13u) & 1u);
        return sign | (v >> 13u);
    }
    if (magnitude < 0x33000000u) return sign;  // below 2^-25: zero
    uint shift = 126u - (magnitude >> 23u);  // a subnormal half, in units of 2^-24
    uint significand = (magnitude & 0x7fffffu) | 0x800000u;
    uint units = significand >> shift;
    uint rest = significand & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (units & 1u) != 0u)) ++units;
    return sign | units;
}

uint af_narrow(float x) {
#ifdef AF_F16
    return af_narrow_f16(x);
#else
    return af_narrow_bf16(x);
#endif
}

void main() {
    uint w = invocation(), count = OUT_R();
    if (2u * w >= count) return;
    uint low = af_narrow(rd0(2u * w));
    uint high = 2u * w + 1u < count ? af_narrow(rd0(2u * w + 1u)) : 0u;
    OUT.d[w] = uintBitsToFloat(low | (high << 16u));
}
