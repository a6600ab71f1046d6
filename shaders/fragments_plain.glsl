// The fragment interface of shaders/flash_matrix.glsl in plain code, for
// every device: what shaders/fragments_cooperative.glsl does with
// cooperative matrices, on 16x16 tiles in shared memory. A warp is WARP
// consecutive invocations (not necessarily a subgroup: nothing here crosses
// invocations). An operand fragment is where its tile lies, (first element,
// row stride), and the product reads the tile from shared memory; an
// accumulator fragment is AF_EPI floats per invocation, element
// e = lane + WARP x of the tile (row e / 16, column e % 16) in slot x: the
// same layout the kernel reads back after AF_STORE, so that no other
// invocation's writes are read and AF_SYNC has nothing to wait for.
//
// Shared tiles hold floats rounded to f16 (af_to_fragment), so that both
// implementations multiply the same numbers: only the order of the f32 sums
// differs.

#define AF_ELEMENT float
const uint AF_EPI = 256u / WARP;  // accumulator elements per invocation and fragment
uint af_warp() { return gl_LocalInvocationID.x / WARP; }
uint af_lane() { return gl_LocalInvocationID.x % WARP; }

// x as the f16 the tile holds; `lost` notes a finite x beyond f16's range
AF_ELEMENT af_to_fragment(float x, inout bool lost) {
    float h = unpackHalf2x16(packHalf2x16(vec2(x, 0.0))).x;
    lost = lost || (isinf(h) && !isinf(x));
    return h;
}

#define AF_ACCUMULATORS(name, n) float name[(n) * AF_EPI]
#define AF_OPERANDS(name, n) uvec2 name[n]
#define AF_ZERO(acc, f) [[dont_unroll]] for (uint af_x = 0u; af_x < AF_EPI; ++af_x) acc[(f) * AF_EPI + af_x] = 0.0
#define AF_LOAD(frag, f, TILE, at, stride) frag[f] = uvec2(at, stride)
#define AF_MMA(acc, f, a, fa, A_TILE, b, fb, B_TILE)                                                          \
    {                                                                                                         \
        uvec2 af_a = a[fa], af_b = b[fb];                                                                     \
        [[dont_unroll]] for (uint af_x = 0u; af_x < AF_EPI; ++af_x) {                                              \
            uint af_e = af_lane() + WARP * af_x, af_r = af_a.x + (af_e / 16u) * af_a.y, af_c = af_b.x + af_e % 16u; \
            float af_s = acc[(f) * AF_EPI + af_x];                                                            \
            [[dont_unroll]] for (uint af_k = 0u; af_k < 16u; ++af_k)                                               \
                af_s = fma(A_TILE[af_r + af_k], B_TILE[af_c + af_k * af_b.y], af_s);                          \
            acc[(f) * AF_EPI + af_x] = af_s;                                                                  \
        }                                                                                                     \
    }
#define AF_STORE(acc, f, TILE, at, stride)                                                                    \
    [[dont_unroll]] for (uint af_x = 0u; af_x < AF_EPI; ++af_x) {                                                  \
        uint af_e = af_lane() + WARP * af_x;                                                                  \
        TILE[(at) + (af_e / 16u) * (stride) + af_e % 16u] = acc[(f) * AF_EPI + af_x];                         \
    }
#define AF_SYNC()
