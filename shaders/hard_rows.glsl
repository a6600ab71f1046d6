// One-hot argmax of each row of operand 0 (ties: the lowest column; a row of
// -inf is zeros; NaN spoils the row). Follows row_prologue.glsl.
    float best = -1.0 / 0.0;
    uint at = cols;
    bool nan_row = false;
    for (uint j = 0u; j < cols; ++j) {
        float s = ld0(b, h, i, j);
        if (isnan(s)) nan_row = true;
        else if (s > best) { best = s; at = j; }
    }
    for (uint j = 0u; j < cols; ++j) OUT.d[out_row + j] = nan_row ? 0.0 / 0.0 : (j == at ? 1.0 : 0.0);
}
