// Fused attention whose two products run on 16x16 matrix fragments: on
// cooperative matrices (tensor cores) where the device has them
// (shaders/fragments_cooperative.glsl), in plain code elsewhere
// (shaders/fragments_plain.glsl, which CI runs on lavapipe). The generator
// puts one of the two in front of this text, after the prelude, the mode
// and the epilogue (the interface of shaders/flash_attention.glsl).
//
// A workgroup is WARPS warps over BQ = 16 WARPS query rows of one (batch,
// head), each warp its 16 rows. Per key tile of BK = 16 KF keys:
//   S = Q^T K     from f16 tiles into f32 accumulators (the queries staged
//                 once, scaled, their fragments loaded once)
//   epilogue      the expression's score around the core, element by
//                 element over the f32 score tile in shared memory (rows
//                 padded against bank conflicts), masked tiles skipped
//                 whole (af_key_tiles)
//   softmax       online, in f32, one invocation per row (as the staged
//                 shader): the weights, divided by the running sum, to f16
//   O += P V      on fragments, each 16x16 product stored to the warp's
//                 scratch and added, rescaled, to the context the
//                 invocations keep in registers (AF_EPI elements of each
//                 16 x 16 block of the warp's 16 x DV).
// Depth and value columns are padded to 16 with zeros. Shares (SHARES)
// write the state shaders/flash_attention.glsl writes, for
// combine_splits.glsl and for the next dispatch to resume.
//
// f16 holds what the products read: a finite query, key, value or weight
// beyond its range, or a NaN or inf value (which a weight of 0 must not
// meet), sets bit 4 of the status word, and the host runs the attention
// again with the staged f32 shader. Hard attention has no product and runs
// there too.

layout(constant_id = 0) const uint D = 64u;       // depth of the queries and keys (exact)
layout(constant_id = 1) const uint DV = 64u;      // value columns (exact)
layout(constant_id = 2) const bool SHARES = false;
layout(constant_id = 3) const uint WARPS = 4u;    // warps per workgroup, 16 query rows each
layout(constant_id = 4) const uint KF = 2u;       // key fragments per tile
layout(constant_id = 5) const uint WARP = 32u;    // invocations per warp: 16, 32 or 64 (cooperative: the subgroup size)
layout(local_size_x_id = 6) in;                   // WARPS * WARP

const uint BQ = 16u * WARPS;
const uint BK = 16u * KF;
const uint DF = (D + 15u) / 16u;   // depth fragments
const uint VF = (DV + 15u) / 16u;  // value-column fragments
const uint DP = 16u * DF, VP = 16u * VF;
// row strides of the shared tiles, padded: 16 bytes more than a row (which
// keeps cooperative loads aligned and moves each row to other banks)
const uint Q_STRIDE = DP + 8u, K_STRIDE = BK + 8u, V_STRIDE = VP + 8u, P_STRIDE = BK + 8u;
const uint S_STRIDE = BK + 4u, SCRATCH_STRIDE = 20u;
const uint KV_ELEMENTS = DP * K_STRIDE > BK * V_STRIDE ? DP * K_STRIDE : BK * V_STRIDE;

const float NEG_INF = -1.0 / 0.0;
const float MAX_FLOAT = 3.40282347e38;

// (the generator puts the fragment implementation here: it reads WARP)
//@fragments

shared AF_ELEMENT query_tile[BQ * Q_STRIDE];   // [query][depth], scaled
shared AF_ELEMENT key_value_tile[KV_ELEMENTS]; // keys [depth][key], then values [key][column]
shared AF_ELEMENT weight_tile[BQ * P_STRIDE];  // [query][key]
shared float score_tile[BQ * S_STRIDE];        // [query][key], f32
shared float scratch[WARPS * 16u * SCRATCH_STRIDE];  // each warp's product of P and a V fragment
shared float row_scale[BQ];                    // per row: rescale of the context, then the final factor

void main() {
    uint t = gl_LocalInvocationID.x;
    uint warp = af_warp(), lane = af_lane();
    uint q0 = gl_WorkGroupID.x * BQ;
    uint bh = gl_WorkGroupID.y;
    uint h = bh % HEADS(), b = bh / HEADS();
    uint n_q = G(0u, 1u), keys = G(1u, 1u);
    uint wg = gl_WorkGroupSize.x;
    af_layout ql = af_layout_of(0u, b, h), kl = af_layout_of(1u, b, h), vl = af_layout_of(2u, b, h);
    af_key_range range = af_key_tiles(bh, gl_WorkGroupID.x, SHARES);
    uint splits = range.splits, split = range.split;
    bool lost = false;  // a number f16 does not hold (af_to_fragment), or a NaN or inf value

    // the row state: invocation r < BQ keeps row q0 + r's
    uint i = q0 + t;
    bool row_live = t < BQ && i < n_q;
    float m = NEG_INF, l = 0.0;
    bool nan_row = false;
    // the context: element x of block f is row 16 warp + e / 16, column 16 f + e % 16 (e = lane + WARP x)
    float o[VF * AF_EPI];
    for (uint x = 0u; x < VF * AF_EPI; ++x) o[x] = 0.0;
    if (range.resume) {  // the state this share's previous dispatch left
        if (row_live) {
            uint at = ((bh * n_q + i) * splits + split) * (DV + 3u);
            m = OUT.d[at];
            l = OUT.d[at + 1u];
            nan_row = OUT.d[at + 2u] != 0.0;
        }
        for (uint x = 0u; x < VF * AF_EPI; ++x) {
            uint e = lane + WARP * (x % AF_EPI), row = q0 + 16u * warp + e / 16u, c = 16u * (x / AF_EPI) + e % 16u;
            if (row < n_q && c < DV) o[x] = OUT.d[((bh * n_q + row) * splits + split) * (DV + 3u) + 3u + c];
        }
    }

    float query_scale = QUERY_SCALE();
    for (uint e = t; e < BQ * DP; e += wg) {  // depth runs fastest: rows of row-major Q are read in order
        uint q = e / DP, a = e % DP;
        float x = (a < D && q0 + q < n_q) ? rd0(ql.base + int(a) * ql.row_stride + int(q0 + q) * ql.col_stride) * query_scale : 0.0;
        query_tile[q * Q_STRIDE + a] = af_to_fragment(x, lost);
    }
    barrier();
    AF_OPERANDS(query_fragments, DF);
    for (uint f = 0u; f < DF; ++f) AF_LOAD(query_fragments, f, query_tile, 16u * warp * Q_STRIDE + 16u * f, Q_STRIDE);

    for (uint tile = range.first; tile < range.end; ++tile) {
        uint k0 = tile * BK;
        // ---- the keys, then S = Q^T K into the score tile ----
        barrier();  // the last tile's values are read
        for (uint e = t; e < BK * DP; e += wg) {
            uint k = e / DP, a = e % DP;
            float x = (a < D && k0 + k < keys) ? rd1(kl.base + int(a) * kl.row_stride + int(k0 + k) * kl.col_stride) : 0.0;
            key_value_tile[a * K_STRIDE + k] = af_to_fragment(x, lost);
        }
        barrier();
        {
            AF_ACCUMULATORS(scores, KF);
            AF_OPERANDS(key_fragment, 1);
            for (uint kf = 0u; kf < KF; ++kf) {
                AF_ZERO(scores, kf);
                for (uint f = 0u; f < DF; ++f) {
                    AF_LOAD(key_fragment, 0, key_value_tile, 16u * f * K_STRIDE + 16u * kf, K_STRIDE);
                    AF_MMA(scores, kf, query_fragments, f, query_tile, key_fragment, 0, key_value_tile);
                }
                AF_STORE(scores, kf, score_tile, 16u * warp * S_STRIDE + 16u * kf, S_STRIDE);
            }
        }
        barrier();
        // ---- the epilogue, element by element ----
        bool unmasked = false;
#if defined(AF_UNMASKED)
        unmasked = tile >= range.full_first && tile < range.full_end;  // uniform
#endif
        for (uint e = t; e < BQ * BK; e += wg) {
            uint r = e / BK, k = e % BK, row = q0 + r, j = k0 + k;
            float x = score_tile[r * S_STRIDE + k];
#if defined(AF_UNMASKED)
            x = unmasked ? epilogue_unmasked(x, b, h, bh, row, j) : epilogue(x, b, h, bh, row, j);
#else
            x = epilogue(x, b, h, bh, row, j);
#endif
            score_tile[r * S_STRIDE + k] = (row < n_q && j < keys) ? x : 0.0;
        }
        barrier();

        // ---- each row's running state; scores become weights ----
        if (t < BQ) {
            uint live = min(BK, keys - k0);
            float scale = 1.0;
            float p_row[BK];
#if defined(AF_POINTWISE)
            for (uint k = 0u; k < BK; ++k) p_row[k] = k < live ? score_tile[t * S_STRIDE + k] : 0.0;  // the epilogue's values are the weights
#elif defined(AF_RATIO)
            for (uint k = 0u; k < BK; ++k) {  // x / (row_sum(x) + c): plain sums, no maximum
                p_row[k] = k < live ? score_tile[t * S_STRIDE + k] : 0.0;
                l += p_row[k];
            }
#else
            float top = m;
            for (uint k = 0u; k < live; ++k) {
                float x = score_tile[t * S_STRIDE + k];
                bool bad = isnan(x) || (isinf(x) && x > 0.0);  // as softmax_rows: the row is NaN
                nan_row = nan_row || bad;
                top = bad ? top : max(top, x);
            }
            float alpha = isinf(m) ? 0.0 : exp(m - top);
            float l_new = l * alpha;
            for (uint k = 0u; k < BK; ++k) {
                float x = score_tile[t * S_STRIDE + k];
                float p = (k >= live || isnan(x) || isinf(x) || isinf(top)) ? 0.0 : exp(x - top);  // -inf (masked) weighs exactly 0
                p_row[k] = p;
                l_new += p;
            }
            // the context stays sum(p v) / l (see shaders/flash_attention.glsl)
            float inverse = l_new > 0.0 ? 1.0 / l_new : 0.0;
            scale = l * alpha * inverse;
            l = l_new;
            m = top;
            for (uint k = 0u; k < BK; ++k) {
                float p = p_row[k] * inverse;
#if defined(AF_DROPOUT)
                p = af_dropout(p, NUMU(AF_DROPOUT), NUMU(AF_DROPOUT + 1u), NUM(AF_DROPOUT + 2u), bh, i, k0 + k);
#endif
#if defined(AF_POST)
                if (k < live && row_live) p *= post_factor(b, h, bh, i, k0 + k);  // after the sum: no renormalisation
#endif
                p_row[k] = p;
            }
#endif
            for (uint k = 0u; k < BK; ++k) weight_tile[t * P_STRIDE + k] = af_to_fragment(row_live ? p_row[k] : 0.0, lost);
            row_scale[t] = scale;
        }
        // ---- the values ----
        for (uint e = t; e < BK * VP; e += wg) {
            uint k = e / VP, c = e % VP;
            float v = (k0 + k < keys && c < DV) ? rd2(vl.base + int(k0 + k) * vl.row_stride + int(c) * vl.col_stride) : 0.0;
            lost = lost || !(abs(v) <= MAX_FLOAT);  // NaN or inf: 0 x NaN would reach the output
            key_value_tile[k * V_STRIDE + c] = af_to_fragment(v, lost);
        }
        barrier();

        // ---- O = O scale + P V ----
        for (uint x = 0u; x < VF * AF_EPI; ++x) {
            float s = row_scale[16u * warp + (lane + WARP * (x % AF_EPI)) / 16u];
            o[x] = s == 0.0 ? 0.0 : o[x] * s;  // a scale of 0: what came before weighs 0, whatever it held
        }
        {
            AF_OPERANDS(weight_fragments, KF);
            for (uint kf = 0u; kf < KF; ++kf) AF_LOAD(weight_fragments, kf, weight_tile, 16u * warp * P_STRIDE + 16u * kf, P_STRIDE);
            AF_ACCUMULATORS(product, 1);
            AF_OPERANDS(value_fragment, 1);
            for (uint vf = 0u; vf < VF; ++vf) {
                AF_ZERO(product, 0);
                for (uint kf = 0u; kf < KF; ++kf) {
                    AF_LOAD(value_fragment, 0, key_value_tile, 16u * kf * V_STRIDE + 16u * vf, V_STRIDE);
                    AF_MMA(product, 0, weight_fragments, kf, weight_tile, value_fragment, 0, key_value_tile);
                }
                AF_SYNC();  // the warp read the last block's scratch
                AF_STORE(product, 0, scratch, 16u * warp * SCRATCH_STRIDE, SCRATCH_STRIDE);
                AF_SYNC();
                for (uint x = 0u; x < AF_EPI; ++x) {
                    uint e = lane + WARP * x;
                    o[vf * AF_EPI + x] += scratch[16u * warp * SCRATCH_STRIDE + (e / 16u) * SCRATCH_STRIDE + e % 16u];
                }
            }
        }
    }

    af_check_loops();
    if (lost) atomicOr(AF_STATUS.flags, 4u);  // the host runs it again with the staged f32 shader

    if (SHARES) {  // a share of split keys: the rows' state and context
        if (row_live) {
            uint at = ((bh * n_q + i) * splits + split) * (DV + 3u);
            OUT.d[at] = m;
            OUT.d[at + 1u] = l;
            OUT.d[at + 2u] = nan_row ? 1.0 : 0.0;
        }
        for (uint x = 0u; x < VF * AF_EPI; ++x) {
            uint e = lane + WARP * (x % AF_EPI), row = q0 + 16u * warp + e / 16u, c = 16u * (x / AF_EPI) + e % 16u;
            if (row < n_q && c < DV) OUT.d[((bh * n_q + row) * splits + split) * (DV + 3u) + 3u + c] = o[x];
        }
        af_check_loops();  // the writes' loops too
        return;
    }

    // ---- the rows' results ----
    barrier();  // every invocation has read row_scale
    if (t < BQ) {
#if defined(AF_POINTWISE)
        row_scale[t] = 1.0;
#elif defined(AF_RATIO)
        float denominator = l + NUM(AF_RATIO);
        row_scale[t] = denominator == 0.0 ? 0.0 : 1.0 / denominator;
#else
        row_scale[t] = nan_row ? 0.0 / 0.0 : (l == 0.0 ? 0.0 : 1.0);  // normalised as it went; every key masked: 0
#endif
    }
    barrier();
    for (uint x = 0u; x < VF * AF_EPI; ++x) {
        uint e = lane + WARP * (x % AF_EPI), r = 16u * warp + e / 16u, c = 16u * (x / AF_EPI) + e % 16u;
        if (q0 + r < n_q && c < DV) OUT.d[(bh * n_q + q0 + r) * DV + c] = o[x] * row_scale[r];
    }
    af_check_loops();  // the output loops too
}
