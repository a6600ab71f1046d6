// The backward pass of softmax attention (vulkan/backward.hpp), after the
// generated epilogue(s, b, h, bh, i, j) and epilogue_slope(...) (its
// derivative in the core s, through each operation's glsl_partials). With
// AF_POINTWISE the weights are the epilogue's values themselves (sigmoid,
// ReLU^2 attention): no row statistics exist, nor are any read.
//
// Operands: 0 Q (d x n_q), 1 K (d x n_k), 2 V (n_k x d_v), 3 dO (n_q x
// d_v), 4 the row statistics (n_q x 3: max, sum, D = rowsum(dO o O)), or O
// where AF_BWD_STATS (or, from a training forward's, AF_BWD_GIVEN_STATISTICS)
// computes them; the unfused kernels put their own
// matrices in slots 0 to 4 (each mode says which). The epilogue's own
// operands follow. Words after the epilogue's numbers, from AF_WORDS: n_q,
// n_k, the batches and heads one (batch, head) of an input serves, the
// dropout seed, threshold and keep scale (AF_DROPOUT), the offset of dV in
// the output; then the chunk of the loop this dispatch runs (AF_CHUNK: begin,
// end, resume), which the host cuts to the driver's loop limit
// (af_check_loops).
//
// AF_D and AF_DV, the depth and d_v, size the rows an invocation keeps;
// AF_R, AF_WG and AF_KT shape the fused kernels' work (below).

uint AF_NQ() { return NUMU(AF_WORDS); }
uint AF_NK() { return NUMU(AF_WORDS + 1u); }
uint AF_SERVED_BATCHES() { return NUMU(AF_WORDS + 2u); }
uint AF_SERVED_HEADS() { return NUMU(AF_WORDS + 3u); }
float af_dropped(float x, uint bh, uint i, uint j) {
#if defined(AF_DROPOUT)
    return af_dropout(x, NUMU(AF_WORDS + 4u), NUMU(AF_WORDS + 5u), uintBitsToFloat(NUMU(AF_WORDS + 6u)), bh, i, j);
#else
    return x;
#endif
}
#if defined(AF_POINTWISE)
float af_weight(float s, float top, float total) { return s; }
// statistic k (max, sum, D) of row `row`: none for pointwise weights
float af_stat(uint b, uint h, uint row, uint k) { return 0.0; }
#else
// The softmax weight of score s in a row of statistics (max, sum): 0 in a
// row every mask removed (its sum is 0).
float af_weight(float s, float top, float total) { return total == 0.0 ? 0.0 : exp(s - top) / total; }
float af_stat(uint b, uint h, uint row, uint k) { return ld4(b, h, row, k); }
#endif
// (batch, head) u of those that input source (sb, sh) serves (an input of
// batch 1 serves every batch; of fewer heads, consecutive groups of heads).
uvec2 af_served(uint u, uint sb, uint sh) {
    uint group = AF_SERVED_HEADS();
    return uvec2(AF_SERVED_BATCHES() == 1u ? sb : u / group, sh * group + u % group);
}

// The fused kernels: workgroup (x, y) takes AF_WG invocations of AF_R rows
// (queries, or keys for AF_BWD_DKV) each, rows x AF_WG AF_R + r AF_WG + t of
// invocation t, of (batch, head) source y, and walks the other side AF_KT
// rows at a time. Each element of a walked row feeds AF_R multiply-adds per
// invocation, and each element of the invocation's own rows AF_KT. The
// source comes from the workgroup's id, so the walked rows' addresses are
// uniform over the workgroup. Rows past the end compute on the last row and
// write nothing; walked rows past the end weigh nothing. The epilogue runs once per tile in a loop through this
// invocation's scratch rather than unrolled AF_R AF_KT times (which
// llvmpipe takes seconds to compile per shader); the loops over the AF_R and
// AF_KT rows are unrolled and select rather than branch.
uint af_row(uint r) { return gl_WorkGroupID.x * AF_WG * AF_R + r * AF_WG + gl_LocalInvocationID.x; }
// The keys [x, y) that block `block` of queries (AF_WG AF_R rows, a
// workgroup's) of (b, h) bh can give a weight to, or with of_keys the queries
// that block `block` of keys can: outside them every score is -inf, every
// pointwise weight 0 (the
// host's interval bounds of the score, in the words after the output's
// extents: whether they vary by (b, h), the query blocks, the key blocks,
// then the pairs, the queries' blocks first).
uvec2 af_live(bool of_keys, uint bh, uint block) {
    uint at = 2u + GEOMETRY_WORDS * NUM_OPERANDS + NUM_NUMBERS + 2u;
    bool varies = P.u[at] != 0u;
    uint query_blocks = P.u[at + 1u], key_blocks = P.u[at + 2u], v = varies ? bh : 0u;
    uint pair = of_keys ? (varies ? BATCH() * HEADS() : 1u) * query_blocks + v * key_blocks + block : v * query_blocks + block;
    return uvec2(P.u[at + 3u + 2u * pair], P.u[at + 4u + 2u * pair]);
}
#define AF_TILE (AF_R * AF_KT)
// What each fused kernel does to one element (i, j) of a tile: the same
// function whether the tile's elements run unrolled in registers
// (AF_BWD_REGISTERS, which the host sets where the epilogue reads no memory)
// or in a loop through scratch (llvmpipe takes minutes to compile an
// unrolled epilogue that reads a table at every element).
// The weight of key j for query i and the core's gradient f (dS o slope), dS
// = P o (dP - D): a zero weight passes zero, even where dP or the slope is not finite.
// Pointwise weights: dP o slope, a zero slope passing zero. Walked rows past
// the live end (or n_k, n_q) get no gradient: the callers pass 0 for them.
float af_core_gradient(float s, float p, float dp, float dd, uint b, uint h, uint bh, uint i, uint j) {
#if defined(AF_POINTWISE)
    float slope = epilogue_slope(s, b, h, bh, i, j);
    return slope == 0.0 ? 0.0 : dp * slope;
#else
    float ds = p == 0.0 ? 0.0 : p * (af_dropped(dp, bh, i, j) - dd);
    return ds == 0.0 ? 0.0 : ds * epilogue_slope(s, b, h, bh, i, j);
#endif
}
#if (defined(AF_BWD_STATS) || defined(AF_BWD_DQ) || defined(AF_BWD_DKV)) && !defined(AF_BWD_REGISTERS)
shared float af_scratch[3u * AF_TILE * AF_WG];
// plane k of element e of this invocation's scratch
#define AF_SCRATCH(k, e) af_scratch[((k) * AF_TILE + (e)) * AF_WG + gl_LocalInvocationID.x]
#endif
// F(u) for each walked row u < AF_KT of a tile, u a constant (the tile's arrays stay in
// registers); AF_LOAD(u), defined at each loop, reads walked row u's element at hand
#define AF_LANES8(F, o) F(o + 0u) F(o + 1u) F(o + 2u) F(o + 3u) F(o + 4u) F(o + 5u) F(o + 6u) F(o + 7u)
#define AF_EACH_WALKED(F) AF_LANES8(F, 0u) AF_LANES8(F, 8u) AF_LANES8(F, 16u) AF_LANES8(F, 24u)
#if defined(AF_BWD_STATS)
// Per query row of each (b, h): max and sum of exp(s - max) over this
// chunk's keys, online, and D = dO_i . O_i (operand 4 is O). The output is
// n_q x 3 per (b, h).
void main() {
    uint n_q = AF_NQ(), n_k = AF_NK(), bh = gl_WorkGroupID.y, b = bh / HEADS(), h = bh % HEADS();
    bool resume = NUMU(AF_CHUNK + 2u) != 0u;
    uint rows[AF_R];
    float top[AF_R], total[AF_R], q[AF_R * AF_D];
    [[unroll]] for (uint r = 0u; r < AF_R; ++r) {
        rows[r] = min(af_row(r), n_q - 1u);
        uint at = 3u * (bh * n_q + rows[r]);
        top[r] = resume ? OUT.d[at] : uintBitsToFloat(0xff800000u);
        total[r] = resume ? OUT.d[at + 1u] : 0.0;
        for (uint c = 0u; c < AF_D; ++c) q[r * AF_D + c] = ld0(b, h, c, rows[r]);
    }
    int k_base = at_of(1u, b, h, 0u, 0u), k_rs = GI(1u, 4u), k_cs = GI(1u, 5u);
    uvec2 live = af_live(false, bh, gl_WorkGroupID.x);
    uint j_end = min(NUMU(AF_CHUNK + 1u), live.y);
    for (uint j0 = max(NUMU(AF_CHUNK), live.x); j0 < j_end; j0 += AF_KT) {
        float raw[AF_TILE];
        [[unroll]] for (uint e = 0u; e < AF_TILE; ++e) raw[e] = 0.0;
        for (uint c = 0u; c < AF_D; ++c) {
#define AF_LOAD(u) rd1(k_base + int(min(j0 + (u), n_k - 1u)) * k_cs + int(c) * k_rs)
#define AF_STEP(u) if ((u) < AF_KT) { float kc = AF_LOAD(u); [[unroll]] for (uint r = 0u; r < AF_R; ++r) raw[r * AF_KT + (u)] += q[r * AF_D + c] * kc; }
            AF_EACH_WALKED(AF_STEP)
#undef AF_STEP
#undef AF_LOAD
        }
#if defined(AF_BWD_REGISTERS)
        // each row's tile at once: its max, then one rescale of the sum
        [[unroll]] for (uint r = 0u; r < AF_R; ++r) {
            float was = top[r], next = was;
            [[unroll]] for (uint u = 0u; u < AF_KT; ++u) {
                float s = epilogue(raw[r * AF_KT + u], b, h, bh, rows[r], j0 + u);
                bool counted = j0 + u < j_end && !(isinf(s) && s < 0.0);  // masked, or past the chunk: weighs nothing
                raw[r * AF_KT + u] = counted ? s : uintBitsToFloat(0xff800000u);
                next = counted && s > next ? s : next;  // a NaN score leaves the max, and makes the sum NaN
            }
            float sum = was == next ? total[r] : total[r] * exp(was - next);
            [[unroll]] for (uint u = 0u; u < AF_KT; ++u) {
                float s = raw[r * AF_KT + u];
                sum += isinf(s) && s < 0.0 ? 0.0 : exp(s - next);
            }
            top[r] = next;
            total[r] = sum;
        }
#else
        [[unroll]] for (uint e = 0u; e < AF_TILE; ++e) AF_SCRATCH(0u, e) = raw[e];
        [[dont_unroll]] for (uint e = 0u; e < AF_TILE; ++e) {
            uint r = e / AF_KT, j = j0 + e % AF_KT;
            float s = epilogue(AF_SCRATCH(0u, e), b, h, bh, rows[r], j);
            bool counted = j < j_end && !(isinf(s) && s < 0.0);  // masked, or past the chunk: weighs nothing
            float was = top[r];
            float next = counted && s > was ? s : was;  // a NaN score leaves the max, and makes the sum NaN
            total[r] = (was == next ? total[r] : total[r] * exp(was - next)) + (counted ? exp(s - next) : 0.0);
            top[r] = next;
        }
#endif
    }
    [[unroll]] for (uint r = 0u; r < AF_R; ++r) {
        if (af_row(r) >= n_q) continue;
        uint at = 3u * (bh * n_q + rows[r]);
        float dd = resume ? OUT.d[at + 2u] : 0.0;
        if (!resume)
            for (uint c = 0u; c < AF_DV; ++c) dd += ld3(b, h, rows[r], c) * ld4(b, h, rows[r], c);
        OUT.d[at] = top[r];
        OUT.d[at + 1u] = total[r];
        OUT.d[at + 2u] = dd;
    }
    af_check_loops();
}
#endif

#if defined(AF_BWD_DQ)
// dQ per query row of each Q source: the sum over the (b, h) it serves and
// their keys of f(dS) K_j, recomputing S, P and dP. Writes dQ laid out as Q
// is bound (sources x d x n_q).
void main() {
    uint n_q = AF_NQ(), n_k = AF_NK();
    uint source = gl_WorkGroupID.y, source_heads = G(0u, 3u), sb = source / source_heads, sh = source % source_heads;
    bool resume = NUMU(AF_CHUNK + 2u) != 0u;
    uint rows[AF_R];
    float acc[AF_R * AF_D], q[AF_R * AF_D], dout[AF_R * AF_DV], top[AF_R], total[AF_R], dd[AF_R];
    [[unroll]] for (uint r = 0u; r < AF_R; ++r) {
        rows[r] = min(af_row(r), n_q - 1u);
        for (uint c = 0u; c < AF_D; ++c) acc[r * AF_D + c] = resume ? OUT.d[(source * AF_D + c) * n_q + rows[r]] : 0.0;
    }
    // the chunk runs over (served (b, h), key j) flattened
    uint t = NUMU(AF_CHUNK), t_end = NUMU(AF_CHUNK + 1u);
    while (t < t_end) {
        uint u0 = t / n_k, j_begin = t - u0 * n_k;
        uint j_end = min(n_k, j_begin + (t_end - t));
        t += j_end - j_begin;
        uvec2 served = af_served(u0, sb, sh);
        uint b = served.x, h = served.y, bh = b * HEADS() + h;
        [[unroll]] for (uint r = 0u; r < AF_R; ++r) {
            top[r] = af_stat(b, h, rows[r], 0u);
            total[r] = af_stat(b, h, rows[r], 1u);
            dd[r] = af_stat(b, h, rows[r], 2u);
            for (uint c = 0u; c < AF_D; ++c) q[r * AF_D + c] = ld0(b, h, c, rows[r]);
            for (uint c = 0u; c < AF_DV; ++c) dout[r * AF_DV + c] = ld3(b, h, rows[r], c);
        }
        int k_base = at_of(1u, b, h, 0u, 0u), k_rs = GI(1u, 4u), k_cs = GI(1u, 5u);
        int v_base = at_of(2u, b, h, 0u, 0u), v_rs = GI(2u, 4u), v_cs = GI(2u, 5u);
        uvec2 live = af_live(false, bh, gl_WorkGroupID.x);
        uint j_live_end = min(j_end, live.y);
        for (uint j0 = max(j_begin, live.x); j0 < j_live_end; j0 += AF_KT) {
            float raw[AF_TILE], dp[AF_TILE], g[AF_TILE];
            [[unroll]] for (uint e = 0u; e < AF_TILE; ++e) raw[e] = dp[e] = 0.0;
#define AF_LOAD(u) rd1(k_base + int(min(j0 + (u), n_k - 1u)) * k_cs + int(c) * k_rs)
            for (uint c = 0u; c < AF_D; ++c) {
#define AF_STEP(u) if ((u) < AF_KT) { float kc = AF_LOAD(u); [[unroll]] for (uint r = 0u; r < AF_R; ++r) raw[r * AF_KT + (u)] += q[r * AF_D + c] * kc; }
                AF_EACH_WALKED(AF_STEP)
#undef AF_STEP
            }
#undef AF_LOAD
#define AF_LOAD(u) rd2(v_base + int(min(j0 + (u), n_k - 1u)) * v_rs + int(c) * v_cs)
            for (uint c = 0u; c < AF_DV; ++c) {
#define AF_STEP(u) if ((u) < AF_KT) { float vc = AF_LOAD(u); [[unroll]] for (uint r = 0u; r < AF_R; ++r) dp[r * AF_KT + (u)] += dout[r * AF_DV + c] * vc; }
                AF_EACH_WALKED(AF_STEP)
#undef AF_STEP
            }
#undef AF_LOAD
#if defined(AF_BWD_REGISTERS)
            [[unroll]] for (uint r = 0u; r < AF_R; ++r) {
                [[unroll]] for (uint u = 0u; u < AF_KT; ++u) {
                    uint e = r * AF_KT + u, j = j0 + u;
                    float p = j < j_live_end ? af_weight(epilogue(raw[e], b, h, bh, rows[r], j), top[r], total[r]) : 0.0;
                    g[e] = j < j_live_end ? af_core_gradient(raw[e], p, dp[e], dd[r], b, h, bh, rows[r], j) : 0.0;
                }
            }
#else
            [[unroll]] for (uint e = 0u; e < AF_TILE; ++e) {
                AF_SCRATCH(0u, e) = raw[e];
                AF_SCRATCH(1u, e) = dp[e];
            }
            [[dont_unroll]] for (uint e = 0u; e < AF_TILE; ++e) {
                uint r = e / AF_KT, j = j0 + e % AF_KT;
                float s = AF_SCRATCH(0u, e);
                float p = j < j_live_end ? af_weight(epilogue(s, b, h, bh, rows[r], j), top[r], total[r]) : 0.0;
                AF_SCRATCH(2u, e) = j < j_live_end ? af_core_gradient(s, p, AF_SCRATCH(1u, e), dd[r], b, h, bh, rows[r], j) : 0.0;
            }
            [[unroll]] for (uint e = 0u; e < AF_TILE; ++e) g[e] = AF_SCRATCH(2u, e);
#endif
#define AF_LOAD(u) rd1(k_base + int(min(j0 + (u), n_k - 1u)) * k_cs + int(c) * k_rs)
            for (uint c = 0u; c < AF_D; ++c) {
#define AF_STEP(u) if ((u) < AF_KT) { float kc = AF_LOAD(u); [[unroll]] for (uint r = 0u; r < AF_R; ++r) acc[r * AF_D + c] += g[r * AF_KT + (u)] * kc; }
                AF_EACH_WALKED(AF_STEP)
#undef AF_STEP
            }
#undef AF_LOAD
        }
    }
    [[unroll]] for (uint r = 0u; r < AF_R; ++r) {
        if (af_row(r) >= n_q) continue;
        for (uint c = 0u; c < AF_D; ++c) OUT.d[(source * AF_D + c) * n_q + rows[r]] = acc[r * AF_D + c];
    }
    af_check_loops();
}
#endif

#if defined(AF_BWD_DKV)
// dK and dV per key of each K/V source (K and V bound alike): the sums over
// the (b, h) it serves and their queries, recomputing S and P. Writes dK
// (sources x d x n_k) then, from word AF_WORDS + 7, dV (sources x n_k x
// d_v), laid out as K and V are bound.
void main() {
    uint n_q = AF_NQ(), n_k = AF_NK();
    uint source = gl_WorkGroupID.y, source_heads = G(1u, 3u), sb = source / source_heads, sh = source % source_heads;
    uint dv_at = NUMU(AF_WORDS + 7u);
    bool resume = NUMU(AF_CHUNK + 2u) != 0u;
    uint keys[AF_R];
    float dk[AF_R * AF_D], dv[AF_R * AF_DV], k[AF_R * AF_D], v[AF_R * AF_DV];
    [[unroll]] for (uint r = 0u; r < AF_R; ++r) {
        keys[r] = min(af_row(r), n_k - 1u);
        for (uint c = 0u; c < AF_D; ++c) dk[r * AF_D + c] = resume ? OUT.d[(source * AF_D + c) * n_k + keys[r]] : 0.0;
        for (uint c = 0u; c < AF_DV; ++c) dv[r * AF_DV + c] = resume ? OUT.d[dv_at + (source * n_k + keys[r]) * AF_DV + c] : 0.0;
    }
    uint t = NUMU(AF_CHUNK), t_end = NUMU(AF_CHUNK + 1u);
    while (t < t_end) {
        uint u0 = t / n_q, i_begin = t - u0 * n_q;
        uint i_end = min(n_q, i_begin + (t_end - t));
        t += i_end - i_begin;
        uvec2 served = af_served(u0, sb, sh);
        uint b = served.x, h = served.y, bh = b * HEADS() + h;
        [[unroll]] for (uint r = 0u; r < AF_R; ++r) {
            for (uint c = 0u; c < AF_D; ++c) k[r * AF_D + c] = ld1(b, h, c, keys[r]);
            for (uint c = 0u; c < AF_DV; ++c) v[r * AF_DV + c] = ld2(b, h, keys[r], c);
        }
        int q_base = at_of(0u, b, h, 0u, 0u), q_rs = GI(0u, 4u), q_cs = GI(0u, 5u);
        int o_base = at_of(3u, b, h, 0u, 0u), o_rs = GI(3u, 4u), o_cs = GI(3u, 5u);
        uvec2 live = af_live(true, bh, gl_WorkGroupID.x);
        uint i_live_end = min(i_end, live.y);
        for (uint i0 = max(i_begin, live.x); i0 < i_live_end; i0 += AF_KT) {
            float raw[AF_TILE], dp[AF_TILE], kept[AF_TILE], g[AF_TILE];
            [[unroll]] for (uint e = 0u; e < AF_TILE; ++e) raw[e] = dp[e] = 0.0;
#define AF_LOAD(u) rd0(q_base + int(min(i0 + (u), n_q - 1u)) * q_cs + int(c) * q_rs)
            for (uint c = 0u; c < AF_D; ++c) {
#define AF_STEP(u) if ((u) < AF_KT) { float qc = AF_LOAD(u); [[unroll]] for (uint r = 0u; r < AF_R; ++r) raw[r * AF_KT + (u)] += qc * k[r * AF_D + c]; }
                AF_EACH_WALKED(AF_STEP)
#undef AF_STEP
            }
#undef AF_LOAD
#if defined(AF_BWD_REGISTERS)
            float weight[AF_TILE];
            [[unroll]] for (uint u = 0u; u < AF_KT; ++u) {
                uint i = i0 + u, row = min(i, n_q - 1u);
                float top = af_stat(b, h, row, 0u), total = af_stat(b, h, row, 1u);
                [[unroll]] for (uint r = 0u; r < AF_R; ++r) {
                    uint e = r * AF_KT + u;
                    weight[e] = i < i_live_end ? af_weight(epilogue(raw[e], b, h, bh, i, keys[r]), top, total) : 0.0;
                    kept[e] = af_dropped(weight[e], bh, i, keys[r]);
                }
            }
#else
            // weights (plane 1) and dropped weights (plane 2) of the tile, the scores in plane 0
            [[unroll]] for (uint e = 0u; e < AF_TILE; ++e) AF_SCRATCH(0u, e) = raw[e];
            [[dont_unroll]] for (uint e = 0u; e < AF_TILE; ++e) {
                uint r = e / AF_KT, i = i0 + e % AF_KT, row = min(i, n_q - 1u);
                float p = i < i_live_end ? af_weight(epilogue(AF_SCRATCH(0u, e), b, h, bh, i, keys[r]), af_stat(b, h, row, 0u), af_stat(b, h, row, 1u)) : 0.0;
                AF_SCRATCH(1u, e) = p;
                AF_SCRATCH(2u, e) = af_dropped(p, bh, i, keys[r]);
            }
            [[unroll]] for (uint e = 0u; e < AF_TILE; ++e) kept[e] = AF_SCRATCH(2u, e);
#endif
#define AF_LOAD(u) rd3(o_base + int(min(i0 + (u), n_q - 1u)) * o_rs + int(c) * o_cs)
            for (uint c = 0u; c < AF_DV; ++c) {
#define AF_STEP(u) if ((u) < AF_KT) { float oc = AF_LOAD(u); [[unroll]] for (uint r = 0u; r < AF_R; ++r) { dv[r * AF_DV + c] += kept[r * AF_KT + (u)] * oc; dp[r * AF_KT + (u)] += oc * v[r * AF_DV + c]; } }
                AF_EACH_WALKED(AF_STEP)
#undef AF_STEP
            }
#undef AF_LOAD
#if defined(AF_BWD_REGISTERS)
            [[unroll]] for (uint u = 0u; u < AF_KT; ++u) {
                uint i = i0 + u;
                float dd = af_stat(b, h, min(i, n_q - 1u), 2u);
                [[unroll]] for (uint r = 0u; r < AF_R; ++r) {
                    uint e = r * AF_KT + u;
                    g[e] = i < i_live_end ? af_core_gradient(raw[e], weight[e], dp[e], dd, b, h, bh, i, keys[r]) : 0.0;
                }
            }
#else
            [[unroll]] for (uint e = 0u; e < AF_TILE; ++e) AF_SCRATCH(2u, e) = dp[e];
            [[dont_unroll]] for (uint e = 0u; e < AF_TILE; ++e) {
                uint r = e / AF_KT, i = i0 + e % AF_KT, row = min(i, n_q - 1u);
                AF_SCRATCH(1u, e) = i < i_live_end ? af_core_gradient(AF_SCRATCH(0u, e), AF_SCRATCH(1u, e), AF_SCRATCH(2u, e), af_stat(b, h, row, 2u), b, h, bh, i, keys[r]) : 0.0;
            }
            [[unroll]] for (uint e = 0u; e < AF_TILE; ++e) g[e] = AF_SCRATCH(1u, e);
#endif
#define AF_LOAD(u) rd0(q_base + int(min(i0 + (u), n_q - 1u)) * q_cs + int(c) * q_rs)
            for (uint c = 0u; c < AF_D; ++c) {
#define AF_STEP(u) if ((u) < AF_KT) { float qc = AF_LOAD(u); [[unroll]] for (uint r = 0u; r < AF_R; ++r) dk[r * AF_D + c] += g[r * AF_KT + (u)] * qc; }
                AF_EACH_WALKED(AF_STEP)
#undef AF_STEP
            }
#undef AF_LOAD
        }
    }
    [[unroll]] for (uint r = 0u; r < AF_R; ++r) {
        if (af_row(r) >= n_k) continue;
        for (uint c = 0u; c < AF_D; ++c) OUT.d[(source * AF_D + c) * n_k + keys[r]] = dk[r * AF_D + c];
        for (uint c = 0u; c < AF_DV; ++c) OUT.d[dv_at + (source * n_k + keys[r]) * AF_DV + c] = dv[r * AF_DV + c];
    }
    af_check_loops();
}
#endif

#if defined(AF_BWD_SCORES) || defined(AF_BWD_DROPPED) || defined(AF_BWD_CORE_GRADIENT) || defined(AF_BWD_ROW_DOT) || \
    defined(AF_BWD_GIVEN_STATISTICS)
// The unfused kernels, one invocation per output element (b, h, i, j).
void main() {
    uint idx = invocation();
    uint rows = OUT_R(), cols = OUT_C();
    if (idx >= BATCH() * HEADS() * rows * cols) return;
    uint j = idx % cols; uint t = idx / cols;
    uint i = t % rows; t /= rows;
    uint h = t % HEADS(); uint b = t / HEADS();
    uint bh = b * HEADS() + h;
#if defined(AF_BWD_SCORES)
    OUT.d[idx] = epilogue(ld0(b, h, i, j), b, h, bh, i, j);  // 0: f Q^T K
#elif defined(AF_BWD_DROPPED)
    OUT.d[idx] = af_dropped(ld0(b, h, i, j), bh, i, j);  // 0: P
#elif defined(AF_BWD_ROW_DOT)
    float dd = 0.0;  // 0: dO, 1: O; the output n_q x 1
    for (uint c = 0u; c < AF_DV; ++c) dd += ld0(b, h, i, c) * ld1(b, h, i, c);
    OUT.d[idx] = dd;
#elif defined(AF_BWD_GIVEN_STATISTICS)
    // 0: dO, 1: O, 2: the training forward's (max, sum); the output the fused
    // kernels' statistics, n_q x 3: max, sum, D
    if (j < 2u) {
        OUT.d[idx] = ld2(b, h, i, j);
    } else {
        float dd = 0.0;
        for (uint c = 0u; c < AF_DV; ++c) dd += ld0(b, h, i, c) * ld1(b, h, i, c);
        OUT.d[idx] = dd;
    }
#else
    // 0: f Q^T K, 1: P, 2: dO V^T, 3: D; the core's gradient dS o slope
    OUT.d[idx] = af_core_gradient(ld0(b, h, i, j), ld1(b, h, i, j), ld2(b, h, i, j), ld3(b, h, i, 0u), b, h, bh, i, j);
#endif
}
#endif

#if defined(AF_BWD_SOURCE_SUM)
// One invocation per element (source, r, c) of an input's gradient: the sum
// of operand 0's (b, h, r, c) over the (b, h) the source serves. Operand 0 is
// dense over every (batch, head); the words after AF_WORDS + 3 are the
// sources' batch and heads, rows and cols.
void main() {
    uint idx = invocation();
    uint source_batch = NUMU(AF_WORDS + 8u), source_heads = NUMU(AF_WORDS + 9u);
    uint rows = NUMU(AF_WORDS + 10u), cols = NUMU(AF_WORDS + 11u);
    if (idx >= source_batch * source_heads * rows * cols) return;
    uint c = idx % cols, t = idx / cols, r = t % rows, source = t / rows;
    uint sb = source / source_heads, sh = source % source_heads;
    uint served = AF_SERVED_BATCHES() * AF_SERVED_HEADS();
    float acc = 0.0;
    for (uint u = 0u; u < served; ++u) {
        uvec2 bh = af_served(u, sb, sh);
        acc += rd0(int(((bh.x * HEADS() + bh.y) * rows + r) * cols + c));
    }
    OUT.d[idx] = acc;
}
#endif
