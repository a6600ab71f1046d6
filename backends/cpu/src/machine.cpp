#include <thread>

#include "attnfuse/cpu.hpp"

namespace attnfuse::cpu {

machine this_machine() {
    machine m;
    m.threads = std::max(1u, std::thread::hardware_concurrency());
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    m.avx2 = __builtin_cpu_supports("avx2");
    m.fma = __builtin_cpu_supports("fma");
    m.avx512f = __builtin_cpu_supports("avx512f");
#endif
    return m;
}

std::string describe(const machine& m) {
    std::string s = std::to_string(m.threads) + " threads";
    if (m.avx2) s += ", AVX2";
    if (m.fma) s += ", FMA";
    if (m.avx512f) s += ", AVX-512F";
    return s;
}

}  // namespace attnfuse::cpu
