#include <thread>

#include "attnfuse/cpu.hpp"
#include "attnfuse/cpu/kernels.hpp"
#include "attnfuse/cpu/simd.hpp"

namespace attnfuse::cpu {

machine this_machine() {
    machine m;
    m.threads = std::max(1u, std::thread::hardware_concurrency());
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    m.avx2 = __builtin_cpu_supports("avx2");
    m.fma = __builtin_cpu_supports("fma");
    m.f16c = __builtin_cpu_supports("f16c");
    m.avx512f = __builtin_cpu_supports("avx512f");
    m.avx512bf16 = __builtin_cpu_supports("avx512bf16");
#endif
    m.kernel_width = simd::width_name;
    m.bf16_products = kernels::bf16_products_available();
    return m;
}

std::string describe(const machine& m) {
    std::string s = std::to_string(m.threads) + " threads";
    if (m.avx2) s += ", AVX2";
    if (m.fma) s += ", FMA";
    if (m.f16c) s += ", F16C";
    if (m.avx512f) s += ", AVX-512F";
    if (m.avx512bf16) s += ", AVX512-BF16";
    s += std::string("; kernels built for ") + m.kernel_width;
    if (m.bf16_products) s += ", bf16 products with vdpbf16ps";
    return s;
}

}  // namespace attnfuse::cpu
