// The CPU backend: run any expression fused (the default) or unfused.
//
//   auto [out, info] = attnfuse::cpu::run(softmax(scale(Q^T*K))*V, bind(Q, q), bind(K, k), bind(V, v));
//   auto unfused = attnfuse::cpu::run(e, {.mode = attnfuse::cpu::execution::unfused}, ...);
#pragma once
#include <cstddef>
#include <string>

#include <attnfuse/dsl.hpp>

#include "cpu/executor.hpp"

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
