// The weights of softmax or hard from the passes of row_pass.glsl, one
// invocation per element (b, h, i, j): operand 0 the scores, operand 1 the
// row maxima, operand 2 the row sums (softmax) or chosen columns (hard).
// softmax: -inf weighs exactly 0, a row of -inf is zeros, a row holding NaN
// or +inf is NaN. hard: one-hot at the first maximum; a row of -inf is
// zeros; NaN spoils the row. Follows element_prologue.glsl.
    float top = ld1(b, h, i, 0u);
#if defined(AF_HARD)
    OUT.d[idx] = isnan(top) ? 0.0 / 0.0 : (float(j) == ld2(b, h, i, 0u) ? 1.0 : 0.0);
#else
    if (isnan(top) || (isinf(top) && top > 0.0)) OUT.d[idx] = 0.0 / 0.0;
    else if (isinf(top)) OUT.d[idx] = 0.0;  // every key masked
    else OUT.d[idx] = exp(ld0(b, h, i, j) - top) / ld2(b, h, i, 0u);
#endif
}
