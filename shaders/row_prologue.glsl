// One invocation per output row (b, h, i); out_row is where the row starts.
void main() {
    uint idx = invocation();
    uint rows = OUT_R(), cols = OUT_C();
    if (idx >= BATCH() * HEADS() * rows) return;
    uint i = idx % rows; uint t = idx / rows;
    uint h = t % HEADS(); uint b = t / HEADS();
    uint bh = b * HEADS() + h;
    uint out_row = ((b * HEADS() + h) * rows + i) * cols;
