// The fragment interface of shaders/flash_matrix.glsl on cooperative
// matrices (GL_NV_cooperative_matrix; the generator enables the extensions):
// a warp is one subgroup of WARP invocations, operand fragments are 16x16
// f16 matrices, accumulators 16x16 f32, and a product is one
// coopMatMulAddNV (the tensor cores). The same interface as
// shaders/fragments_plain.glsl, which CI runs: only the place of the
// elements differs, so that AF_SYNC orders a warp's stores before its
// invocations read other invocations' elements. Loads and stores need
// 16-byte aligned offsets and strides, which the kernel's paddings keep.

#define AF_ELEMENT float16_t
const uint AF_EPI = 256u / WARP;
uint af_warp() { return gl_SubgroupID; }
uint af_lane() { return gl_SubgroupInvocationID; }

AF_ELEMENT af_to_fragment(float x, inout bool lost) {
    float16_t h = float16_t(x);
    lost = lost || (isinf(h) && !isinf(x));
    return h;
}

#define AF_ACCUMULATORS(name, n) fcoopmatNV<32, gl_ScopeSubgroup, 16, 16> name[n]
#define AF_OPERANDS(name, n) fcoopmatNV<16, gl_ScopeSubgroup, 16, 16> name[n]
#define AF_ZERO(acc, f) acc[f] = fcoopmatNV<32, gl_ScopeSubgroup, 16, 16>(0.0)
#define AF_LOAD(frag, f, TILE, at, stride) coopMatLoadNV(frag[f], TILE, at, stride, false)
#define AF_MMA(acc, f, a, fa, A_TILE, b, fb, B_TILE) acc[f] = coopMatMulAddNV(a[fa], b[fb], acc[f])
#define AF_STORE(acc, f, TILE, at, stride) coopMatStoreNV(acc[f], TILE, at, stride, false)
#define AF_SYNC() subgroupMemoryBarrierShared(); subgroupBarrier()
