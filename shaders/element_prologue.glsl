// One invocation per output element (b, h, i, j).
void main() {
    uint idx = invocation();
    uint rows = OUT_R(), cols = OUT_C();
    if (idx >= BATCH() * HEADS() * rows * cols) return;
    uint j = idx % cols; uint t = idx / cols;
    uint i = t % rows; t /= rows;
    uint h = t % HEADS(); uint b = t / HEADS();
    uint bh = b * HEADS() + h;
