// Softmax of each row of operand 0: -inf weighs exactly 0, a row of -inf is
// zeros, a row holding NaN or +inf is NaN. Follows row_prologue.glsl.
    float top = -1.0 / 0.0;
    bool nan_row = false;
    for (uint j = 0u; j < cols; ++j) {
        float s = ld0(b, h, i, j);
        nan_row = nan_row || isnan(s);
        top = max(top, s);
    }
    if (nan_row || (isinf(top) && top > 0.0)) {
        for (uint j = 0u; j < cols; ++j) OUT.d[out_row + j] = 0.0 / 0.0;
        return;
    }
    if (isinf(top)) {  // every key masked
        for (uint j = 0u; j < cols; ++j) OUT.d[out_row + j] = 0.0;
        return;
    }
    float total = 0.0;
    for (uint j = 0u; j < cols; ++j) total += exp(ld0(b, h, i, j) - top);
    for (uint j = 0u; j < cols; ++j) OUT.d[out_row + j] = exp(ld0(b, h, i, j) - top) / total;
}
