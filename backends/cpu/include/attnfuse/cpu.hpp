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

// What this process can use: worker threads, the vector extensions the
// processor reports, and the width the kernels were built for (chosen at
// configure time: ATTNFUSE_ARCH_FLAGS).
struct machine {
    std::size_t threads = 1;
    bool avx2 = false;
    bool fma = false;
    bool f16c = false;
    bool avx512f = false;
    bool avx512bf16 = false;
    const char* kernel_width = "";
    // the fused kernel multiplies bf16 operands with vdpbf16ps (a 16-lane
    // build on a CPU with AVX512-BF16; options.bf16_products)
    bool bf16_products = false;
};
machine this_machine();
std::string describe(const machine& m);

}  // namespace attnfuse::cpu
