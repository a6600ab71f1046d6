// C = A * B, one element per invocation, over the chunk [NUMU(0), NUMU(1))
// of the inner extent; NUMU(2) set resumes from the partial sum in OUT (the
// host cuts a long inner extent into chunks: no invocation loops past the
// driver's limit). With AF_WEIGHTED_SUM (weights x values) a zero weight
// skips its value: a NaN there reaches no output. Follows element_prologue.glsl.
    float acc = NUMU(2u) != 0u ? OUT.d[idx] : 0.0;
    uint k_end = NUMU(1u);
    for (uint k = NUMU(0u); k < k_end; ++k) {
#if defined(AF_WEIGHTED_SUM)
        float w = ld0(b, h, i, k);
        if (w != 0.0) acc += w * ld1(b, h, k, j);
#else
        acc += ld0(b, h, i, k) * ld1(b, h, k, j);
#endif
    }
    OUT.d[idx] = acc;
    af_check_loops();
}
