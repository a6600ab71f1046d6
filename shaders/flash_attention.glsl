// FlashAttention-style fused attention: a workgroup per (tile of BQ queries,
// batch x head). Key and value tiles are staged in shared memory; each
// query row keeps a running maximum and sum (or argmax), its context in
// registers, and the n_q x n_k scores are never written. A softmax row's
// context is kept normalised by its running sum (a convex combination of
// value rows: it cannot overflow while the result is finite), and a value
// row whose weight is 0 is never added: a NaN there reaches no output.
// Embedded at build time; the generator puts in front of it the prelude, the mode
// (AF_SOFTMAX, AF_HARD, AF_RATIO or AF_POINTWISE, with AF_DROPOUT and AF_POST), and
//   float score_term(uint b, uint h, uint a, float qv, float kv)  one term of the core's sum
//   float epilogue(float s, uint b, uint h, uint bh, uint i, uint j)  the score around the core
//   float epilogue_unmasked(...)  the same without its masks (with AF_UNMASKED)
//   float post_factor(uint b, uint h, uint bh, uint i, uint j)     g of softmax(s) % g
// Operands 0, 1, 2 are queries (depth x n_q), keys (depth x n_k) and values
// (n_k x d_v). After the output's extents, P.u holds this dispatch's window
// of key tiles [begin, end) and whether it resumes the state an earlier
// dispatch left (the host runs a long key row as several dispatches, so
// that no invocation loops past the driver's limit), then the live key
// tiles of every query tile (host-computed interval bounds of the score),
// so that wholly masked tiles are never loaded, and the run of them whose
// masks keep everything, where epilogue_unmasked (AF_UNMASKED) runs.

// Context columns per invocation: d_v rounded up to VC, over LANES lanes.
layout(constant_id = 0) const uint ACC = 16u;
// Keys split over workgroups (z) or over dispatches: write this share's
// state for combine_splits.glsl (and for the next dispatch to resume). A
// constant, so that the one-share pipeline carries none of it.
layout(constant_id = 1) const bool SHARES = false;

// The tile shape (vulkan::fused_tile), set when the pipeline is built: one
// SPIR-V serves every shape. The host checks what the code assumes: BK <= 32
// (bad_keys holds one bit per key of a tile), LANES divides BK and VC, and
// BK * VC >= DC * (BQ + BK) (stage holds a step's queries and keys).
layout(constant_id = 2) const uint BQ = 16u;     // queries per workgroup
layout(constant_id = 3) const uint BK = 32u;     // keys per tile
layout(constant_id = 4) const uint LANES = 4u;   // invocations per query row
layout(constant_id = 5) const uint DC = 32u;     // depth staged per step
layout(constant_id = 6) const uint VC = 64u;     // value columns staged per step
layout(constant_id = 7) const uint QMAX = 128u;  // up to this depth the query tile is staged once
layout(local_size_x_id = 8) in;                  // BQ * LANES
const uint KEYS_PER_LANE = BK / LANES;
const uint STAGE_FLOATS = BK * VC;

shared float query_tile[BQ * QMAX];     // the workgroup's queries, when depth <= QMAX

shared float stage[STAGE_FLOATS];       // queries and keys, then values
shared float weights[BQ * (BK + 1u)];   // scores, then weights, of the tile
shared float row_scale[BQ];             // per row: rescale of the context
shared uint row_best[BQ];               // per row (hard): the chosen key
shared uint bad_keys[2];                // keys of the staged values holding NaN or inf, by step parity



void main() {
    uint t = gl_LocalInvocationID.x;
    uint r = t / LANES, lane = t % LANES;
    uint q0 = gl_WorkGroupID.x * BQ;
    uint bh = gl_WorkGroupID.y;
    uint h = bh % HEADS(), b = bh / HEADS();
    uint depth = G(0u, 0u), n_q = G(0u, 1u), keys = G(1u, 1u), dv = G(2u, 1u);
    uint i = q0 + r;
    bool row_live = i < n_q;
    // where this (batch, head)'s queries, keys and values start, and their
    // strides (0 along an extent of 1, which broadcasts): read once here
    // rather than per element
    af_layout ql = af_layout_of(0u, b, h), kl = af_layout_of(1u, b, h), vl = af_layout_of(2u, b, h);
    int q_at = ql.base, q_rs = ql.row_stride, q_cs = ql.col_stride;
    int k_at = kl.base, k_rs = kl.row_stride, k_cs = kl.col_stride;
    int v_at = vl.base, v_rs = vl.row_stride, v_cs = vl.col_stride;

    af_key_range range = af_key_tiles(bh, gl_WorkGroupID.x, SHARES);
    uint first_tile = range.first, end_tile = range.end, full_first = range.full_first, full_end = range.full_end;
    uint splits = range.splits, split = range.split;
    bool resume = range.resume;
    uint share_at = ((bh * n_q + min(i, n_q - 1u)) * splits + split) * (dv + 3u);

    float acc[ACC];
    for (uint w = 0u; w < ACC; ++w) acc[w] = 0.0;
    // the row's state, kept by its lane 0
    float m = -1.0 / 0.0, l = 0.0, best = -1.0 / 0.0;
    uint best_at = keys;
    bool nan_row = false;
    if (resume && row_live) {  // the state this share's previous dispatch left
#if defined(AF_HARD)
        best = OUT.d[share_at];
        best_at = uint(OUT.d[share_at + 1u]) * 4096u + uint(OUT.d[share_at + 3u]);
#else
        m = OUT.d[share_at];
        l = OUT.d[share_at + 1u];
        for (uint chunk = 0u; chunk < ACC / (VC / LANES); ++chunk)
            for (uint w = 0u; w < VC / LANES; ++w) {
                uint c = chunk * VC + lane + LANES * w;
                if (c < dv) acc[chunk * (VC / LANES) + w] = OUT.d[share_at + 3u + c];
            }
#endif
        nan_row = OUT.d[share_at + 2u] != 0.0;
    }
    if (t == 0u) {
        bad_keys[0] = 0u;
        bad_keys[1] = 0u;
    }
    uint step = 0u;  // value chunks staged so far: picks the bad_keys slot

    bool queries_resident = depth <= QMAX;  // uniform
    float query_scale = QUERY_SCALE();
    if (queries_resident) {
        for (uint e = t; e < QMAX * BQ; e += BQ * LANES) {
            uint a = e % QMAX, q = e / QMAX;
            query_tile[a * BQ + q] = (a < depth && q0 + q < n_q) ? rd0(q_at + int(a) * q_rs + int(q0 + q) * q_cs) * query_scale : 0.0;
        }
    }

    for (uint tile = first_tile; tile < end_tile; ++tile) {
        uint k0 = tile * BK;
        // ---- scores of the tile: BQ x BK, KEYS_PER_LANE per invocation ----
        float s[KEYS_PER_LANE];
        for (uint u = 0u; u < KEYS_PER_LANE; ++u) s[u] = 0.0;
        for (uint a0 = 0u; a0 < depth; a0 += DC) {
            barrier();
            // depth runs fastest: rows of row-major Q and K are read in order
            for (uint e = t; e < DC * BQ && !queries_resident; e += BQ * LANES) {
                uint a = e % DC, q = e / DC;
                stage[a * BQ + q] = (a0 + a < depth && q0 + q < n_q) ? rd0(q_at + int(a0 + a) * q_rs + int(q0 + q) * q_cs) * query_scale : 0.0;
            }
            for (uint e = t; e < DC * BK; e += BQ * LANES) {
                uint a = e % DC, k = e / DC;
                stage[DC * BQ + a * BK + k] = (a0 + a < depth && k0 + k < keys) ? rd1(k_at + int(a0 + a) * k_rs + int(k0 + k) * k_cs) : 0.0;
            }
            barrier();
            uint steps = min(DC, depth - a0);
            for (uint a = 0u; a < steps; ++a) {
                float qv = queries_resident ? query_tile[(a0 + a) * BQ + r] : stage[a * BQ + r];
                for (uint u = 0u; u < KEYS_PER_LANE; ++u)
                    s[u] += score_term(b, h, a0 + a, qv, stage[DC * BQ + a * BK + lane + LANES * u]);
            }
        }
#if defined(AF_UNMASKED)
        if (tile >= full_first && tile < full_end) {  // uniform
            for (uint u = 0u; u < KEYS_PER_LANE; ++u) {
                uint k = lane + LANES * u, j = k0 + k;
                weights[r * (BK + 1u) + k] = (row_live && j < keys) ? epilogue_unmasked(s[u], b, h, bh, i, j) : 0.0;
            }
        } else
#endif
        for (uint u = 0u; u < KEYS_PER_LANE; ++u) {
            uint k = lane + LANES * u, j = k0 + k;
            weights[r * (BK + 1u) + k] = (row_live && j < keys) ? epilogue(s[u], b, h, bh, i, j) : 0.0;
        }
        barrier();

        // ---- the row's running state; scores become weights ----
        if (lane == 0u) {
            uint live = min(BK, keys - k0);
            float scale = 1.0;
#if defined(AF_HARD)
            for (uint k = 0u; k < live; ++k) {
                float x = weights[r * (BK + 1u) + k];
                if (isnan(x)) nan_row = true;
                else if (x > best) { best = x; best_at = k0 + k; }
            }
#elif defined(AF_POINTWISE)
            // pointwise weights: the epilogue's values are the weights
            for (uint k = live; k < BK; ++k) weights[r * (BK + 1u) + k] = 0.0;
#elif defined(AF_RATIO)
            // x / (row_sum(x) + c): plain sums, no maximum
            for (uint k = 0u; k < live; ++k) l += weights[r * (BK + 1u) + k];
            for (uint k = live; k < BK; ++k) weights[r * (BK + 1u) + k] = 0.0;
#else
            float top = m;
            for (uint k = 0u; k < live; ++k) {
                float x = weights[r * (BK + 1u) + k];
                if (isnan(x) || (isinf(x) && x > 0.0)) nan_row = true;  // as softmax_rows: NaN
                else top = max(top, x);
            }
            // masked scores (-inf) weigh exactly 0; a row masked so far keeps l = 0
            float alpha = isinf(m) ? 0.0 : exp(m - top);
            float l_new = l * alpha;
            for (uint k = 0u; k < live; ++k) {
                float x = weights[r * (BK + 1u) + k];
                float p = (!isnan(x) && !isinf(top) && !(isinf(x) && x < 0.0)) ? exp(x - top) : 0.0;
                weights[r * (BK + 1u) + k] = p;
                l_new += p;
            }
            // the context stays sum(p v) / l: what came before is rescaled by
            // l_old alpha / l_new, and this tile's weights are divided by
            // l_new before they meet the values (so that no partial sum
            // overflows while the result is finite)
            float inverse = l_new > 0.0 ? 1.0 / l_new : 0.0;
            scale = l * alpha * inverse;
            l = l_new;
            m = top;
            for (uint k = 0u; k < BK; ++k) {
                float p = k < live ? weights[r * (BK + 1u) + k] * inverse : 0.0;
#if defined(AF_DROPOUT)
                p = af_dropout(p, NUMU(AF_DROPOUT), NUMU(AF_DROPOUT + 1u), NUM(AF_DROPOUT + 2u), bh, i, k0 + k);
#endif
#if defined(AF_POST)
                if (k < live && row_live) p *= post_factor(b, h, bh, i, k0 + k);  // after the sum: no renormalisation
#endif
                weights[r * (BK + 1u) + k] = p;
            }
#endif
            row_scale[r] = scale;
        }
        barrier();

#if !defined(AF_HARD)
        // ---- context += weights x values, VC value columns at a time ----
        float scale = row_scale[r];
        // a scale of exactly 0 (a new maximum far above the old): what came
        // before weighs 0 now, and goes whatever it held (a NaN value row too)
        for (uint w = 0u; w < ACC; ++w) acc[w] = scale == 0.0 ? 0.0 : acc[w] * scale;
        for (uint chunk = 0u; chunk < ACC / (VC / LANES); ++chunk) {
            uint c0 = chunk * VC;
            if (c0 >= dv) break;  // uniform: every invocation agrees
            barrier();
            for (uint e = t; e < BK * VC; e += BQ * LANES) {
                uint k = e / VC, c = e % VC;
                float v = (k0 + k < keys && c0 + c < dv) ? rd2(v_at + int(k0 + k) * v_rs + int(c0 + c) * v_cs) : 0.0;
                if (!(abs(v) <= 3.40282347e38)) {  // NaN or inf: left out of the product, added back below where its weight is not 0
                    atomicOr(bad_keys[step & 1u], 1u << k);
                    v = 0.0;
                }
                stage[e] = v;
            }
            barrier();
            uint bad = bad_keys[step & 1u];
            if (t == 0u) bad_keys[(step + 1u) & 1u] = 0u;  // no one reads or writes that slot until the next barrier
            ++step;
            for (uint w = 0u; w < VC / LANES; ++w) {
                uint c = lane + LANES * w;
                float sum = 0.0;
                for (uint k = 0u; k < BK; ++k) sum += weights[r * (BK + 1u) + k] * stage[k * VC + c];
                acc[chunk * (VC / LANES) + w] += sum;
            }
            if (bad != 0u) {  // uniform: the non-finite values, where their weight is not 0
                for (uint w = 0u; w < VC / LANES; ++w) {
                    uint c = lane + LANES * w;
                    for (uint k = 0u; k < BK; ++k) {
                        float weight = weights[r * (BK + 1u) + k];
                        if (((bad >> k) & 1u) != 0u && weight != 0.0 && c0 + c < dv) {
                            float v = rd2(v_at + int(k0 + k) * v_rs + int(c0 + c) * v_cs);
                            if (!(abs(v) <= 3.40282347e38)) acc[chunk * (VC / LANES) + w] += weight * v;
                        }
                    }
                }
            }
        }
#endif
    }

    af_check_loops();

    // ---- a share of split keys: the row's state and context ----
    if (SHARES) {
        if (!row_live) return;
        uint at = share_at;
        if (lane == 0u) {
#if defined(AF_HARD)
            OUT.d[at] = best;
            OUT.d[at + 1u] = float(best_at / 4096u);  // two exact halves: the key as one float would round past 2^24
            OUT.d[at + 3u] = float(best_at % 4096u);
#else
            OUT.d[at] = m;
            OUT.d[at + 1u] = l;
#endif
            OUT.d[at + 2u] = nan_row ? 1.0 : 0.0;
        }
#if !defined(AF_HARD)
        for (uint chunk = 0u; chunk < ACC / (VC / LANES); ++chunk)
            for (uint w = 0u; w < VC / LANES; ++w) {
                uint c = chunk * VC + lane + LANES * w;
                if (c < dv) OUT.d[at + 3u + c] = acc[chunk * (VC / LANES) + w];
            }
#endif
        af_check_loops();  // the writes' loops too
        return;
    }

    // ---- the rows' results ----
    if (lane == 0u) {
#if defined(AF_HARD)
        row_best[r] = nan_row ? keys + 1u : best_at;
#elif defined(AF_POINTWISE)
        row_scale[r] = 1.0;
#elif defined(AF_RATIO)
        float denominator = l + NUM(AF_RATIO);
        row_scale[r] = denominator == 0.0 ? 0.0 : 1.0 / denominator;
#else
        row_scale[r] = nan_row ? 0.0 / 0.0 : (l == 0.0 ? 0.0 : 1.0);  // normalised as it went; every key masked: context 0
#endif
    }
    barrier();
    if (!row_live) return;
    uint out_row = (bh * n_q + i) * dv;
#if defined(AF_HARD)
    uint chosen = row_best[r];
    for (uint c = lane; c < dv; c += LANES)
        OUT.d[out_row + c] = chosen == keys + 1u ? 0.0 / 0.0 : (chosen < keys ? ld2(b, h, chosen, c) : 0.0);
#else
    float inverse = row_scale[r];
    for (uint chunk = 0u; chunk < ACC / (VC / LANES); ++chunk)
        for (uint w = 0u; w < VC / LANES; ++w) {
            uint c = chunk * VC + lane + LANES * w;
            if (c < dv) OUT.d[out_row + c] = acc[chunk * (VC / LANES) + w] * inverse;
        }
#endif
    af_check_loops();  // the output loops too
}
