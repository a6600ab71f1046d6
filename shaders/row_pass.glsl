// One pass over a chunk [NUMU(AF_CHUNK), NUMU(AF_CHUNK + 1u)) of each row of
// operand 0 (each column with AF_ALONG_COLS), resuming from the state the
// previous chunk left in OUT when NUMU(AF_CHUNK + 2u) is set. The host cuts
// a long row into chunks so that no invocation loops past the driver's limit
// (shaders/prelude.glsl, af_check_loops). The generator defines the mode:
//   AF_SUM, AF_MAX        the reductions row_sum, row_max (col_* along columns)
//   AF_ROW_SUM_EXP        sum of exp(x - m), m = operand 1 (the row maxima): softmax's sum
//   AF_ROW_FIRST_AT       the first column holding the row maximum (operand 1),
//                         as a float, or cols when the row is -inf throughout: hard's choice
// Follows element_prologue.glsl; the output is rows x 1 (1 x cols along columns).
    uint k_begin = NUMU(AF_CHUNK), k_end = NUMU(AF_CHUNK + 1u);
    bool resume = NUMU(AF_CHUNK + 2u) != 0u;
#if defined(AF_ALONG_COLS)
#define AF_AT(k) ld0(b, h, k, j)
#else
#define AF_AT(k) ld0(b, h, i, k)
#endif
#if defined(AF_ROW_FIRST_AT)
    float top = ld1(b, h, i, 0u);
    float none = float(G(0u, 1u));
    float acc = resume ? OUT.d[idx] : none;
    bool live = !(isinf(top) && top < 0.0);  // a row of -inf chooses nothing
    for (uint k = k_begin; k < k_end; ++k)
        if (acc == none && live && AF_AT(k) == top) acc = float(k);
#elif defined(AF_ROW_SUM_EXP)
    float top = ld1(b, h, i, 0u);
    float acc = resume ? OUT.d[idx] : 0.0;
    if (!isinf(top) && !isnan(top))  // otherwise softmax's write pass ignores the sum
        for (uint k = k_begin; k < k_end; ++k) acc += exp(AF_AT(k) - top);
#else
    float acc = resume ? OUT.d[idx] : AF_AT(k_begin);
    for (uint k = resume ? k_begin : k_begin + 1u; k < k_end; ++k) {
        float v = AF_AT(k);
#if defined(AF_SUM)
        acc = acc + v;
#else
        acc = af_max(acc, v);  // NaN wins: a row holding NaN stays NaN
#endif
    }
#endif
    OUT.d[idx] = acc;
    af_check_loops();
}
