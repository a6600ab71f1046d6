// attnfuse: helpers every generated kernel shares. Embedded at build time
// (backends/vulkan/CMakeLists.txt) after the generated binding declarations.
//
// Parameters P.u (push constants where they fit the device's limit, else a
// buffer at binding 0): [0] batch, [1] heads, then GEOMETRY_WORDS words of
// geometry per operand (rows, cols, batch, heads, row stride, col stride,
// batch stride, head stride, base offset), then the expression's numbers
// (float bits), then the output's rows and cols.

uint BATCH() { return P.u[0]; }
uint HEADS() { return P.u[1]; }
uint G(uint k, uint f) { return P.u[2u + GEOMETRY_WORDS * k + f]; }
int GI(uint k, uint f) { return int(P.u[2u + GEOMETRY_WORDS * k + f]); }
float NUM(uint n) { return uintBitsToFloat(P.u[2u + GEOMETRY_WORDS * NUM_OPERANDS + n]); }
uint NUMU(uint n) { return P.u[2u + GEOMETRY_WORDS * NUM_OPERANDS + n]; }
uint OUT_R() { return P.u[2u + GEOMETRY_WORDS * NUM_OPERANDS + NUM_NUMBERS]; }
uint OUT_C() { return P.u[3u + GEOMETRY_WORDS * NUM_OPERANDS + NUM_NUMBERS]; }

// The head of an operand with `heads_k` heads that query head h of `heads`
// reads: consecutive query heads share one (grouped-query attention). Exact
// for every count below 2^24, without an integer division: llvmpipe's
// compile of a shader that divides integers at every operand read took
// minutes. The float quotients are within 1 of the true ones, and the
// integer steps correct that.
uint af_head_of(uint h, uint heads, uint heads_k) {
    if (heads_k == heads) return h;
    uint group = uint(float(heads) / float(heads_k) + 0.5);  // heads_k divides heads: an exact quotient
    uint q = uint(float(h) / float(group));
    if (q * group > h) q -= 1u;
    if ((q + 1u) * group <= h) q += 1u;
    return q;
}

// The element of operand k serving output (b, h, r, c): extents of 1
// broadcast, fewer heads are shared by consecutive query heads.
int at_of(uint k, uint b, uint h, uint r, uint c) {
    uint bb = G(k, 2u) == 1u ? 0u : b;
    uint hh = af_head_of(h, HEADS(), G(k, 3u));
    uint rr = G(k, 0u) == 1u ? 0u : r;
    uint cc = G(k, 1u) == 1u ? 0u : c;
    return GI(k, 8u) + int(bb) * GI(k, 6u) + int(hh) * GI(k, 7u) + int(rr) * GI(k, 4u) + int(cc) * GI(k, 5u);
}

// The operations of attnfuse::op a kernel uses are defined after this file,
// each by its own struct's glsl_definition (vulkan/glsl.hpp: emitter).

// The same hash as attnfuse::op::dropout_bits: one dropout mask on every backend.
uint af_mix32(uint x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}
float af_dropout(float x, uint seed, uint threshold, float keep_scale, uint bh, uint row, uint col) {
    uint bits = af_mix32(seed ^ af_mix32(bh ^ af_mix32(row ^ af_mix32(col + 0x9e3779b9u))));
    return (bits >> 8) >= threshold ? x * keep_scale : 0.0;
}

// Invocation index over a two-dimensional grid of workgroups.
uint invocation() {
    return (gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x) * gl_WorkGroupSize.x + gl_LocalInvocationID.x;
}

// Some drivers end every loop of an invocation, silently, once its loops
// have run a number of iterations in all: llvmpipe after 65535. The host
// sizes every loop to stay under the device's limit; this check, at the end
// of each kernel, catches a miss: a loop of two trips runs once when the
// limit was reached, and the run is then redone in smaller pieces.
void af_check_loops() {
    uint trips = 2u + (P.u[0] >> 31u);  // 2, but not known to the compiler
    uint ran = 0u;
    for (uint z = 0u; z < trips; ++z) ran += min(P.u[0], 1u);
    if (ran != trips) atomicOr(AF_STATUS.flags, 1u);
}
