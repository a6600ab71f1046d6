// The CPU backend's public face.
#pragma once
#include <cstddef>
#include <string>

namespace attnfuse::cpu {

// What this process can use: worker threads and the vector extensions the
// processor reports.
struct machine {
    std::size_t threads = 1;
    bool avx2 = false;
    bool fma = false;
    bool avx512f = false;
};
machine this_machine();
std::string describe(const machine& m);

}  // namespace attnfuse::cpu
