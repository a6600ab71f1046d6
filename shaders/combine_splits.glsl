// Merges the shares of a fused attention whose keys were split over
// workgroups (shaders/flash_attention.glsl with gl_NumWorkGroups.z > 1):
// one invocation per output element (b, h, i, c). Operand 0 holds, per
// (batch x head, query, share), [maximum (or best score), sum (or the best
// key / 4096), NaN flag, context (normalised by the share's sum for softmax;
// for hard, the best key % 4096)...]; operand 1 is the values (hard reads
// the chosen row). NUMU(0) is the number of shares, NUM(1) a ratio's offset,
// NUMU(2) the context's columns. Follows element_prologue.glsl; the generator
// defines the mode. AF_ROW_STATISTICS writes, instead of the output, a
// softmax row's statistics as a training forward keeps them (row_statistics):
// column 0 the largest score, 1 the sum of exp(score - max); NaN for a row
// with a NaN score.
    uint splits = NUMU(0u), stride = NUMU(2u) + 3u, keys = G(1u, 0u);
    uint base = (bh * rows + i) * splits * stride;
    bool nan_row = false;
    for (uint s = 0u; s < splits; ++s) nan_row = nan_row || rd0(base + s * stride + 2u) != 0.0;
#if defined(AF_HARD)
    // the earliest share wins a tie, as the earliest key does within one
    float best = -1.0 / 0.0;
    uint best_at = keys;
    for (uint s = 0u; s < splits; ++s) {
        float v = rd0(base + s * stride);
        if (v > best) { best = v; best_at = uint(rd0(base + s * stride + 1u)) * 4096u + uint(rd0(base + s * stride + 3u)); }
    }
    OUT.d[idx] = nan_row ? 0.0 / 0.0 : (best_at < keys ? ld1(b, h, best_at, j) : 0.0);
#elif defined(AF_POINTWISE)
    float acc = 0.0;  // plain sums of weighted values
    for (uint s = 0u; s < splits; ++s) acc += rd0(base + s * stride + 3u + j);
    OUT.d[idx] = acc;
#elif defined(AF_RATIO)
    float l = 0.0, acc = 0.0;
    for (uint s = 0u; s < splits; ++s) {
        l += rd0(base + s * stride + 1u);
        acc += rd0(base + s * stride + 3u + j);
    }
    float denominator = l + NUM(1u);
    OUT.d[idx] = denominator == 0.0 ? 0.0 : acc / denominator;
#else
    float m = -1.0 / 0.0;
    for (uint s = 0u; s < splits; ++s) m = max(m, rd0(base + s * stride));
    // each share's context is already a convex combination of value rows: the
    // merge weighs them by their sums, so it cannot overflow either
    float l = 0.0;
    for (uint s = 0u; s < splits; ++s) {
        float ms = rd0(base + s * stride);
        l += isinf(ms) ? 0.0 : rd0(base + s * stride + 1u) * exp(ms - m);  // a share with every key masked weighs 0
    }
#if defined(AF_ROW_STATISTICS)
    OUT.d[idx] = nan_row ? 0.0 / 0.0 : (j == 0u ? m : l);
#else
    float acc = 0.0;
    for (uint s = 0u; s < splits && l > 0.0; ++s) {
        float ms = rd0(base + s * stride);
        float weight = isinf(ms) ? 0.0 : rd0(base + s * stride + 1u) * exp(ms - m) / l;
        if (weight != 0.0) acc += rd0(base + s * stride + 3u + j) * weight;
    }
    OUT.d[idx] = nan_row ? 0.0 / 0.0 : acc;
#endif
#endif
    af_check_loops();
}
