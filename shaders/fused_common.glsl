// What both fused attention shaders (flash_attention.glsl, flash_rows.glsl)
// read of their parameters the same way. Follows the generated prelude,
// mode and epilogue, before the shader's own text.
//
// After the output's extents, P.u holds this dispatch's window of key tiles
// [begin, end) and whether it resumes the state an earlier dispatch left,
// then the live key tiles of every query tile (host-computed interval
// bounds of the score) and the run of them whose masks keep everything.

uint WINDOW() { return 4u + GEOMETRY_WORDS * NUM_OPERANDS + NUM_NUMBERS; }
uint RANGES() { return WINDOW() + 3u; }

// scale(core) folded onto the queries as they are loaded (as FlashAttention
// scales Q): the epilogue then reads the scaled score as it is.
float QUERY_SCALE() {
#if defined(AF_QUERY_SCALE)
    return NUM(AF_QUERY_SCALE);
#else
    return 1.0;
#endif
}

// The key tiles this workgroup visits: the live ones of its query tile
// (query_tile), its share of them when the keys are split over workgroups
// (z; `shares`: the shader's SHARES), within this dispatch's window; and the
// run where no mask applies.
struct af_key_range {
    uint first, end;            // key tiles [first, end)
    uint full_first, full_end;  // tiles whose masks keep every score
    uint splits, split;         // shares of the keys, and this workgroup's
    bool resume;                // continue the state a previous dispatch left
};
af_key_range af_key_tiles(uint bh, uint query_tile, bool shares) {
    af_key_range k;
    uint qtiles = P.u[RANGES() + 1u];
    uint range_at = RANGES() + 2u + 4u * ((P.u[RANGES()] != 0u ? bh * qtiles : 0u) + query_tile);
    uint live_first = P.u[range_at], live_end = P.u[range_at + 1u];
    k.full_first = P.u[range_at + 2u];
    k.full_end = P.u[range_at + 3u];
    k.splits = shares ? gl_NumWorkGroups.z : 1u;
    k.split = shares ? gl_WorkGroupID.z : 0u;
    uint per_split = (live_end - live_first + k.splits - 1u) / k.splits;
    k.first = min(live_end, live_first + k.split * per_split);
    k.end = min(live_end, k.first + per_split);
    k.first = max(k.first, P.u[WINDOW()]);
    k.end = min(k.end, P.u[WINDOW() + 1u]);
    k.resume = shares && P.u[WINDOW() + 2u] != 0u;
    return k;
}

// Operand k's element (row, col) of this (batch, head) is at base + row *
// row_stride + col * col_stride; a stride is 0 along an extent of 1 (it
// broadcasts). Read once, outside the loops.
struct af_layout {
    int base, row_stride, col_stride;
};
af_layout af_layout_of(uint k, uint b, uint h) {
    return af_layout(at_of(k, b, h, 0u, 0u), G(k, 0u) == 1u ? 0 : GI(k, 4u), G(k, 1u) == 1u ? 0 : GI(k, 5u));
}
