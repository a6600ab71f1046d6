// C = A * B, one element per invocation. Follows element_prologue.glsl.
    float acc = 0.0;
    uint depth = G(0u, 1u);
    for (uint k = 0u; k < depth; ++k) acc += ld0(b, h, i, k) * ld1(b, h, k, j);
    OUT.d[idx] = acc;
}
