// Fused attention with the rows in registers: each invocation owns R query
// rows whole (their queries, running maximum, sum and context), so that a
// row's softmax needs no other invocation and no barrier (shared memory
// only as an epilogue's scratch, each invocation its own: AF_ROLLED_EPILOGUE).
// Every invocation of a workgroup walks the same keys: each key and value
// element is read at an address uniform over the workgroup (a broadcast,
// which a CPU device such as llvmpipe does with one scalar load) and meets
// R rows per invocation, so each load feeds R multiply-adds per lane. The
// score tile of an invocation is R rows x BK keys, in registers. Where the
// workgroup is one subgroup of BK invocations, each loads one key of the
// tile and subgroupBroadcast hands it to the others (BROADCAST).
//
// Chosen by the host (vulkan::fused_design::register_rows; the default on
// CPU devices) where depth and d_v fit its registers; shaders/flash_attention.glsl
// (tiles staged in shared memory) serves the rest. The interface is that
// shader's: the same generated prelude, mode, epilogue, post factor and
// score term; operands 0, 1, 2 are queries (depth x n_q), keys (depth x n_k)
// and values (n_k x d_v); after the output's extents, P.u holds this
// dispatch's window of key tiles [begin, end), whether it resumes, then the
// live key tiles of every query tile and their run of mask-free ones. Shares
// (SHARES) write the same state as that shader's, for combine_splits.glsl.
//
// NaN and infinity follow softmax_rows: a NaN or +inf score makes its row
// NaN; a -inf one weighs exactly 0; a value row whose weight is 0 is never
// added, so a NaN or inf there reaches no output. A NaN or inf value whose
// weight is not 0 sets bit 2 of the status word: the host then runs the
// attention again with shaders/flash_attention.glsl, which adds it exactly.

layout(constant_id = 0) const uint D = 64u;       // depth of the queries and keys (exact)
layout(constant_id = 1) const uint DV = 64u;      // value columns (exact)
layout(constant_id = 2) const bool SHARES = false;
layout(constant_id = 3) const uint R = 8u;        // query rows per invocation
layout(constant_id = 4) const uint BK = 8u;       // keys per tile
layout(local_size_x_id = 5) in;                   // invocations per workgroup (WG)
// The workgroup is one subgroup of WG invocations, WG divides BK and
// BK <= 32: invocation t loads keys k0 + g WG + t and subgroupBroadcast
// shares them. Otherwise every invocation loads every key itself (the same
// address for all: a CPU device gathers it lane by lane, which is what the
// broadcast saves).
layout(constant_id = 6) const bool BROADCAST = false;

// F(l) for every invocation l of a subgroup, as constants (subgroupBroadcast's id must be one)
#define AF_LANES8(F, o) F(o + 0u) F(o + 1u) F(o + 2u) F(o + 3u) F(o + 4u) F(o + 5u) F(o + 6u) F(o + 7u)
#define AF_EACH_LANE(F) AF_LANES8(F, 0u) AF_LANES8(F, 8u) AF_LANES8(F, 16u) AF_LANES8(F, 24u)
// Few queries (decode): every invocation holds the same R rows, and the keys
// of a tile are spread over the invocations instead (invocation t takes keys
// k0 + g WG + t), each keeping its own running state of those rows; the
// subgroup merges the states at the end (subgroupMax, subgroupAdd). Needs
// the BROADCAST shape, and subgroup arithmetic and vote operations.
layout(constant_id = 7) const bool KEY_LANES = false;
const uint GROUPS = (BROADCAST || KEY_LANES) ? BK / gl_WorkGroupSize.x : 1u;  // keys each invocation loads per tile
const uint KT = KEY_LANES ? GROUPS : BK;  // keys of the invocation's score tile



// What a key past the end weighs: nothing.
#if defined(AF_RATIO) || defined(AF_POINTWISE)
#define AF_PAST_THE_END 0.0
#else
#define AF_PAST_THE_END NEG_INF
#endif

// An epilogue that reads memory (a bias table, ALiBi slopes, key lengths)
// is evaluated in a loop over the score tile rather than unrolled R x KT
// times, twice (masked and mask-free): llvmpipe's compile of the unrolled
// form took minutes. The host defines AF_ROLLED_EPILOGUE for those and
// counts the loop's R KT steps per tile against the driver's loop limit.
#if defined(AF_ROLLED_EPILOGUE)
shared float af_epilogue_scratch[R * KT * gl_WorkGroupSize.x];
#endif

// Key u of an invocation's score tile: of the tile's own keys, or (key
// lanes) of the invocation's GROUPS of them.
uint key_at(uint k0, uint u) { return KEY_LANES ? k0 + u * gl_WorkGroupSize.x + gl_LocalInvocationID.x : k0 + u; }

const float NEG_INF = -1.0 / 0.0;
const float MAX_FLOAT = 3.40282347e38;

void main() {
    uint wg = gl_WorkGroupSize.x;
    uint t = gl_LocalInvocationID.x;
    uint q0 = gl_WorkGroupID.x * (KEY_LANES ? 1u : wg) * R;
    uint row_step = KEY_LANES ? 1u : wg, row_lane = KEY_LANES ? 0u : t;  // row r of this invocation: q0 + row_lane + row_step r
    uint bh = gl_WorkGroupID.y;
    uint h = bh % HEADS(), b = bh / HEADS();
    uint n_q = G(0u, 1u), keys = G(1u, 1u);
    // where this (batch, head)'s queries, keys and values start, and their
    // strides (0 along an extent of 1, which broadcasts): uniform, read once
    af_layout ql = af_layout_of(0u, b, h), kl = af_layout_of(1u, b, h), vl = af_layout_of(2u, b, h);
    int q_at = ql.base, q_rs = ql.row_stride, q_cs = ql.col_stride;
    int k_at = kl.base, k_rs = kl.row_stride, k_cs = kl.col_stride;
    int v_at = vl.base, v_rs = vl.row_stride, v_cs = vl.col_stride;

    af_key_range range = af_key_tiles(bh, gl_WorkGroupID.x, SHARES);
    uint first_tile = range.first, end_tile = range.end, full_first = range.full_first, full_end = range.full_end;
    uint splits = range.splits, split = range.split;
    bool resume = range.resume;

    // the invocation's rows: q0 + row_lane + row_step * r
    float q[R * D];
    float acc[R * DV];
    float m[R], l[R];
    bool nan_row[R];
    bool value_lost[R];  // a NaN or inf value met a weight other than 0: added as 0
#if defined(AF_HARD)
    float best[R];
    uint best_at[R];
#endif
    float query_scale = QUERY_SCALE();
    [[unroll]] for (uint r = 0u; r < R; ++r) {
        uint i = q0 + row_lane + row_step * r;
        uint row = min(i, n_q - 1u);  // a row past the end computes row n_q - 1 and writes nothing
        for (uint a = 0u; a < D; ++a) q[r * D + a] = rd0(q_at + int(a) * q_rs + int(row) * q_cs) * query_scale;
        for (uint c = 0u; c < DV; ++c) acc[r * DV + c] = 0.0;
        m[r] = NEG_INF;
        l[r] = 0.0;
        nan_row[r] = false;
        value_lost[r] = false;
#if defined(AF_HARD)
        best[r] = NEG_INF;
        best_at[r] = keys;
#endif
        if (resume && (!KEY_LANES || t == 0u)) {  // the state this share's previous dispatch left (key lanes: on the first)
            uint at = ((bh * n_q + row) * splits + split) * (DV + 3u);
#if defined(AF_HARD)
            best[r] = OUT.d[at];
            best_at[r] = uint(OUT.d[at + 1u]) * 4096u + uint(OUT.d[at + 3u]);
#else
            m[r] = OUT.d[at];
            l[r] = OUT.d[at + 1u];
            for (uint c = 0u; c < DV; ++c) acc[r * DV + c] = OUT.d[at + 3u + c];
#endif
            nan_row[r] = OUT.d[at + 2u] != 0.0;
        }
    }

    for (uint tile = first_tile; tile < end_tile; ++tile) {
        uint k0 = tile * BK;
        // ---- the scores: R rows x BK keys, each key element one broadcast ----
        float s[R * KT];
        [[unroll]] for (uint e = 0u; e < R * KT; ++e) s[e] = 0.0;
        uint own_keys[GROUPS];  // past the end: a real key, weighed 0 below
        [[unroll]] for (uint g = 0u; g < GROUPS; ++g) own_keys[g] = min(k0 + g * wg + t, keys - 1u);
        for (uint a = 0u; a < D; ++a) {
            if (KEY_LANES) {
                [[unroll]] for (uint g = 0u; g < GROUPS; ++g) {
                    float kv = rd1(k_at + int(a) * k_rs + int(own_keys[g]) * k_cs);
                    [[unroll]] for (uint r = 0u; r < R; ++r) s[r * KT + g] += score_term(b, h, a, q[r * D + a], kv);
                }
            } else if (BROADCAST) {
                // each invocation loads its own key's element, and the subgroup
                // shares them: one load per invocation serves the tile's BK keys
                [[unroll]] for (uint g = 0u; g < GROUPS; ++g) {
                    float mine = rd1(k_at + int(a) * k_rs + int(own_keys[g]) * k_cs);
#define AF_SCORE(l) if (l < wg) { float kv = subgroupBroadcast(mine, l); [[unroll]] for (uint r = 0u; r < R; ++r) s[r * KT + g * wg + l] += score_term(b, h, a, q[r * D + a], kv); }
                    AF_EACH_LANE(AF_SCORE)
                }
            } else {
                [[unroll]] for (uint u = 0u; u < KT; ++u) {
                    uint j = min(k0 + u, keys - 1u);
                    float kv = rd1(k_at + int(a) * k_rs + int(j) * k_cs);
                    [[unroll]] for (uint r = 0u; r < R; ++r) s[r * KT + u] += score_term(b, h, a, q[r * D + a], kv);
                }
            }
        }
        bool unmasked = false;
#if defined(AF_UNMASKED)
        unmasked = tile >= full_first && tile < full_end;  // uniform
#endif
#if defined(AF_ROLLED_EPILOGUE)
        // the scores through shared memory, the epilogue once in a loop
        [[unroll]] for (uint e = 0u; e < R * KT; ++e) af_epilogue_scratch[e * wg + t] = s[e];
        [[dont_unroll]] for (uint e = 0u; e < R * KT; ++e) {
            uint i = q0 + row_lane + row_step * (e / KT), j = key_at(k0, e % KT);
            float x = af_epilogue_scratch[e * wg + t];
#if defined(AF_UNMASKED)
            if (unmasked) x = epilogue_unmasked(x, b, h, bh, i, j);
            else x = epilogue(x, b, h, bh, i, j);
#else
            x = epilogue(x, b, h, bh, i, j);
#endif
            af_epilogue_scratch[e * wg + t] = j < keys ? x : AF_PAST_THE_END;
        }
        [[unroll]] for (uint e = 0u; e < R * KT; ++e) s[e] = af_epilogue_scratch[e * wg + t];
#else
        [[unroll]] for (uint r = 0u; r < R; ++r) {
            uint i = q0 + row_lane + row_step * r;
            [[unroll]] for (uint u = 0u; u < KT; ++u) {
                uint j = key_at(k0, u);
#if defined(AF_UNMASKED)
                float x = unmasked ? epilogue_unmasked(s[r * KT + u], b, h, bh, i, j) : epilogue(s[r * KT + u], b, h, bh, i, j);
#else
                float x = epilogue(s[r * KT + u], b, h, bh, i, j);
#endif
                s[r * KT + u] = j < keys ? x : AF_PAST_THE_END;
            }
        }
#endif

        // ---- each row's running state; scores become weights ----
        float scale[R];  // of what came before: l_old alpha / l_new, which is 1 - share
        float share[R];  // the tile's weights' sum / l_new
        [[unroll]] for (uint r = 0u; r < R; ++r) {
            uint i = q0 + row_lane + row_step * r;
            scale[r] = 1.0;
            share[r] = 0.0;
#if defined(AF_HARD)
            [[unroll]] for (uint u = 0u; u < KT; ++u) {
                float x = s[r * KT + u];
                bool nan_x = isnan(x);
                nan_row[r] = nan_row[r] || nan_x;
                bool better = !nan_x && x > best[r];  // the earliest key wins a tie
                best_at[r] = better ? key_at(k0, u) : best_at[r];
                best[r] = better ? x : best[r];
            }
#elif defined(AF_RATIO)
            [[unroll]] for (uint u = 0u; u < KT; ++u) l[r] += s[r * KT + u];  // x / (row_sum(x) + c): plain sums
#elif !defined(AF_POINTWISE)
            float top = m[r];
            [[unroll]] for (uint u = 0u; u < KT; ++u) {
                float x = s[r * KT + u];
                bool bad = isnan(x) || (isinf(x) && x > 0.0);  // as softmax_rows: the row is NaN
                nan_row[r] = nan_row[r] || bad;
                top = bad ? top : max(top, x);
            }
            float alpha = isinf(m[r]) ? 0.0 : exp(m[r] - top);
            float l_new = l[r] * alpha;
            [[unroll]] for (uint u = 0u; u < KT; ++u) {
                float x = s[r * KT + u];
                float p = (isnan(x) || isinf(x) || isinf(top)) ? 0.0 : exp(x - top);  // -inf (masked) weighs exactly 0
                s[r * KT + u] = p;
                l_new += p;
            }
            // the context stays sum(p v) / l: what came before is rescaled by
            // l_old alpha / l_new and this tile's weights divided by l_new, so
            // that no partial sum overflows while the result is finite
            float inverse = l_new > 0.0 ? 1.0 / l_new : 0.0;
            scale[r] = l[r] * alpha * inverse;
            l[r] = l_new;
            m[r] = top;
            [[unroll]] for (uint u = 0u; u < KT; ++u) {
                uint j = key_at(k0, u);
                float p = s[r * KT + u] * inverse;
                share[r] += p;
#if defined(AF_DROPOUT)
                p = af_dropout(p, NUMU(AF_DROPOUT), NUMU(AF_DROPOUT + 1u), NUM(AF_DROPOUT + 2u), bh, i, j);
#endif
#if defined(AF_POST)
                p = j < keys && i < n_q ? p * post_factor(b, h, bh, i, j) : p;  // after the sum: no renormalisation
#endif
                s[r * KT + u] = p;
            }
#endif
        }

#if !defined(AF_HARD)
        // ---- context += weights x values, each value element one broadcast ----
        // A NaN or inf value is added as 0 here, so that a weight of 0 never
        // meets it; the keys holding one are noted, and a row whose weight of
        // such a key is not 0 has the run redone by the staged shader, which
        // adds those values exactly (rare: branches here would halve the speed).
        bool my_value_bad[GROUPS];  // BROADCAST: this invocation's keys
        [[unroll]] for (uint g = 0u; g < GROUPS; ++g) my_value_bad[g] = false;
        uint bad_keys = 0u;         // otherwise: a bit per key of the tile
        for (uint c = 0u; c < DV; ++c) {
            float sum[R];
            // acc (1 - share) rather than acc scale: the rounding of scale, a
            // ratio near 1 at every tile, would drift over long rows. A scale
            // of exactly 0 (a new maximum far above the old): what came before
            // weighs 0 now, whatever it held.
            [[unroll]] for (uint r = 0u; r < R; ++r) {
                float before = acc[r * DV + c];
                sum[r] = scale[r] == 0.0 ? 0.0 : fma(-before, share[r], before);
            }
            if (KEY_LANES) {
                [[unroll]] for (uint g = 0u; g < GROUPS; ++g) {
                    float vv = rd2(v_at + int(own_keys[g]) * v_rs + int(c) * v_cs);
                    bool finite = abs(vv) <= MAX_FLOAT;
                    my_value_bad[g] = my_value_bad[g] || !finite;
                    vv = finite ? vv : 0.0;
                    [[unroll]] for (uint r = 0u; r < R; ++r) sum[r] += s[r * KT + g] * vv;
                }
            } else if (BROADCAST) {
                [[unroll]] for (uint g = 0u; g < GROUPS; ++g) {
                    float mine = rd2(v_at + int(own_keys[g]) * v_rs + int(c) * v_cs);
                    bool finite = abs(mine) <= MAX_FLOAT;
                    my_value_bad[g] = my_value_bad[g] || !finite;
                    mine = finite ? mine : 0.0;
#define AF_VALUE(l) if (l < wg) { float vv = subgroupBroadcast(mine, l); [[unroll]] for (uint r = 0u; r < R; ++r) sum[r] += s[r * KT + g * wg + l] * vv; }
                    AF_EACH_LANE(AF_VALUE)
                }
            } else {
                [[unroll]] for (uint u = 0u; u < KT; ++u) {
                    float vv = rd2(v_at + int(min(k0 + u, keys - 1u)) * v_rs + int(c) * v_cs);
                    bool finite = abs(vv) <= MAX_FLOAT;
                    bad_keys |= finite ? 0u : 1u << u;
                    vv = finite ? vv : 0.0;
                    [[unroll]] for (uint r = 0u; r < R; ++r) sum[r] += s[r * KT + u] * vv;
                }
            }
            [[unroll]] for (uint r = 0u; r < R; ++r) acc[r * DV + c] = sum[r];
        }
        if (KEY_LANES)  // bit u: this invocation's key u
            [[unroll]] for (uint g = 0u; g < GROUPS; ++g) bad_keys |= my_value_bad[g] ? 1u << g : 0u;
        else if (BROADCAST)
            [[unroll]] for (uint g = 0u; g < GROUPS; ++g) bad_keys |= subgroupBallot(my_value_bad[g]).x << (g * wg);
        [[unroll]] for (uint r = 0u; r < R; ++r)
            [[unroll]] for (uint u = 0u; u < KT; ++u) value_lost[r] = value_lost[r] || (((bad_keys >> u) & 1u) != 0u && s[r * KT + u] != 0.0);
#endif
    }

    af_check_loops();

    if (KEY_LANES) {  // ---- the subgroup's states of each row, merged into every invocation's ----
        [[unroll]] for (uint r = 0u; r < R; ++r) {
            nan_row[r] = subgroupAny(nan_row[r]);
            value_lost[r] = subgroupAny(value_lost[r]);
#if defined(AF_HARD)
            float top = subgroupMax(best[r]);
            best_at[r] = subgroupMin(best[r] == top ? best_at[r] : 0xffffffffu);  // the earliest key wins a tie
            best[r] = top;
#elif defined(AF_RATIO) || defined(AF_POINTWISE)
            l[r] = subgroupAdd(l[r]);
            for (uint c = 0u; c < DV; ++c) acc[r * DV + c] = subgroupAdd(acc[r * DV + c]);
#else
            // each context is normalised by its own sum: weighed by their
            // shares of the whole sum they make a convex combination again
            float top = subgroupMax(m[r]);
            float mass = isinf(m[r]) ? 0.0 : l[r] * exp(m[r] - top);
            float total = subgroupAdd(mass);
            float weight = total > 0.0 ? mass / total : 0.0;
            for (uint c = 0u; c < DV; ++c) acc[r * DV + c] = subgroupAdd(weight == 0.0 ? 0.0 : acc[r * DV + c] * weight);
            m[r] = top;
            l[r] = total;
#endif
        }
    }
    bool redo = false;
    [[unroll]] for (uint r = 0u; r < R; ++r) redo = redo || (value_lost[r] && q0 + row_lane + row_step * r < n_q);
    if (redo) atomicOr(AF_STATUS.flags, 2u);  // the host runs it again with the staged shader

    [[unroll]] for (uint r = 0u; r < R; ++r) {
        uint i = q0 + row_lane + row_step * r;
        if (i >= n_q || (KEY_LANES && t != 0u)) continue;
        if (SHARES) {  // a share of split keys: the row's state and context
            uint at = ((bh * n_q + i) * splits + split) * (DV + 3u);
#if defined(AF_HARD)
            OUT.d[at] = best[r];
            OUT.d[at + 1u] = float(best_at[r] / 4096u);  // two exact halves: the key as one float would round past 2^24
            OUT.d[at + 3u] = float(best_at[r] % 4096u);
#else
            OUT.d[at] = m[r];
            OUT.d[at + 1u] = l[r];
            for (uint c = 0u; c < DV; ++c) OUT.d[at + 3u + c] = acc[r * DV + c];
#endif
            OUT.d[at + 2u] = nan_row[r] ? 1.0 : 0.0;
            continue;
        }
        uint out_row = (bh * n_q + i) * DV;
#if defined(AF_HARD)
        for (uint c = 0u; c < DV; ++c)
            OUT.d[out_row + c] = nan_row[r] ? 0.0 / 0.0 : (best_at[r] < keys ? ld2(b, h, best_at[r], c) : 0.0);
#else
#if defined(AF_POINTWISE)
        float inverse = 1.0;
#elif defined(AF_RATIO)
        float denominator = l[r] + NUM(AF_RATIO);
        float inverse = denominator == 0.0 ? 0.0 : 1.0 / denominator;
#else
        float inverse = nan_row[r] ? 0.0 / 0.0 : (l[r] == 0.0 ? 0.0 : 1.0);  // normalised as it went; every key masked: 0
#endif
        for (uint c = 0u; c < DV; ++c) OUT.d[out_row + c] = acc[r * DV + c] * inverse;
#endif
    }
    af_check_loops();  // the output loops too
}
