// C = A * B with a register tile per invocation: a workgroup is one subgroup
// of WG invocations and owns WG columns of C (j0 .. j0 + WG - 1) and R * WG
// rows; invocation t holds rows i0 + t + WG r of those columns. At each step
// k it reads its rows' A(i, k) and one element of B's row k, B(k, j0 + t),
// which subgroupBroadcast hands to the others: R + 1 loads for R x WG
// multiply-adds. The inner extent runs over the chunk [NUMU(AF_CHUNK),
// NUMU(AF_CHUNK + 1)); NUMU(AF_CHUNK + 2) set resumes from the partial sums
// in OUT (the host cuts a long inner extent so that no invocation loops past
// the driver's limit). Grid: (column blocks, row blocks, batch x heads).
//
// With AF_WEIGHTED_SUM (weights x values) a value that is NaN or inf is
// added as 0, so that a zero weight never meets it; a row whose weight of
// such a value is not 0 sets bit 2 of the status word, and the host runs the
// product again with shaders/product.glsl, which adds it exactly.
// Follows the generated prelude (operand 0 is A, 1 is B).

layout(constant_id = 0) const uint R = 4u;  // rows per invocation
layout(local_size_x_id = 1) in;             // WG: the subgroup size, at most 32

#define AF_LANES8(F, o) F(o + 0u) F(o + 1u) F(o + 2u) F(o + 3u) F(o + 4u) F(o + 5u) F(o + 6u) F(o + 7u)
#define AF_EACH_LANE(F) AF_LANES8(F, 0u) AF_LANES8(F, 8u) AF_LANES8(F, 16u) AF_LANES8(F, 24u)
const uint WG = gl_WorkGroupSize.x;

void main() {
    uint t = gl_LocalInvocationID.x;
    uint rows = OUT_R(), cols = OUT_C();
    uint bh = gl_WorkGroupID.z;
    uint h = bh % HEADS(), b = bh / HEADS();
    uint j0 = gl_WorkGroupID.x * WG, i0 = gl_WorkGroupID.y * WG * R;
    int a_at = at_of(0u, b, h, 0u, 0u), a_rs = G(0u, 0u) == 1u ? 0 : GI(0u, 4u), a_cs = G(0u, 1u) == 1u ? 0 : GI(0u, 5u);
    int b_at = at_of(1u, b, h, 0u, 0u), b_rs = G(1u, 0u) == 1u ? 0 : GI(1u, 4u), b_cs = G(1u, 1u) == 1u ? 0 : GI(1u, 5u);
    uint my_col = min(j0 + t, cols - 1u);  // past the end: a real column, never written
    bool resume = NUMU(AF_CHUNK + 2u) != 0u;

    float acc[R * 32u];
    int a_row[R];
    [[unroll]] for (uint r = 0u; r < R; ++r) {
        uint i = min(i0 + t + WG * r, rows - 1u);
        a_row[r] = a_at + int(i) * a_rs;
        [[unroll]] for (uint l = 0u; l < WG; ++l) {
            uint j = min(j0 + l, cols - 1u);
            acc[r * 32u + l] = resume ? OUT.d[(bh * rows + i) * cols + j] : 0.0;
        }
    }
    bool lost[R];  // AF_WEIGHTED_SUM: a NaN or inf value met a weight other than 0
    [[unroll]] for (uint r = 0u; r < R; ++r) lost[r] = false;

    uint k_end = NUMU(AF_CHUNK + 1u);
    for (uint k = NUMU(AF_CHUNK); k < k_end; ++k) {
        float a[R];
        [[unroll]] for (uint r = 0u; r < R; ++r) a[r] = rd0(a_row[r] + int(k) * a_cs);
        float mine = rd1(b_at + int(k) * b_rs + int(my_col) * b_cs);
#if defined(AF_WEIGHTED_SUM)
        bool finite = abs(mine) <= 3.40282347e38;
        mine = finite ? mine : 0.0;
        bool any_bad = subgroupBallot(!finite).x != 0u;
        [[unroll]] for (uint r = 0u; r < R; ++r) lost[r] = lost[r] || (any_bad && a[r] != 0.0);
#endif
#define AF_COLUMN(l) if (l < WG) { float bv = subgroupBroadcast(mine, l); [[unroll]] for (uint r = 0u; r < R; ++r) acc[r * 32u + l] += a[r] * bv; }
        AF_EACH_LANE(AF_COLUMN)
    }
    af_check_loops();

    bool redo = false;
    [[unroll]] for (uint r = 0u; r < R; ++r) {
        uint i = i0 + t + WG * r;
        if (i >= rows) continue;
        redo = redo || lost[r];
        [[unroll]] for (uint l = 0u; l < WG; ++l)
            if (j0 + l < cols) OUT.d[(bh * rows + i) * cols + j0 + l] = acc[r * 32u + l];
    }
    if (redo) atomicOr(AF_STATUS.flags, 2u);
    af_check_loops();
}
