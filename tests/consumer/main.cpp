// softmax(scale(Q^T*K))*V on the CPU and (when attnfuse was built with it)
// on the default Vulkan device, from an installed attnfuse, checked against
// the reference.
#include <attnfuse/cpu.hpp>
#include <attnfuse/dsl.hpp>
#ifdef CONSUMER_WITH_VULKAN
#include <attnfuse/vulkan/executor.hpp>
#endif
#include <cmath>
#include <cstdio>
#include <vector>

int main() {
    using namespace attnfuse;
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    const std::size_t d = 7, n = 33;
    std::vector<float> q(d * n), k(d * n), v(n * d);
    for (std::size_t x = 0; x < q.size(); ++x) {
        q[x] = std::sin(0.1f * float(x));
        k[x] = std::cos(0.07f * float(x));
        v[x] = std::sin(0.03f * float(x) + 1.0f);
    }
    const auto e = softmax(scale(Q^T*K))*V;
    auto bq = bind(Q, col_major(q.data(), d, n));
    auto bk = bind(K, col_major(k.data(), d, n));
    auto bv = bind(V, row_major(v.data(), n, d));
    const auto ref = reference::evaluate(e, bq, bk, bv);
    auto worst = [&](const std::vector<float>& out) {
        double w = 0;
        for (std::size_t x = 0; x < out.size(); ++x) w = std::max(w, std::abs(out[x] - ref.values[x]));
        return w;
    };
    const double cpu_error = worst(cpu::run(e, bq, bk, bv).output.values);
    std::printf("%s: cpu error %.3g\n", to_string(e).c_str(), cpu_error);
    if (!(cpu_error < 1e-5)) return 1;
#ifdef CONSUMER_WITH_VULKAN
    try {
        vulkan::device gpu;
        const double vk_error = worst(vulkan::run(gpu, e, bq, bk, bv).output.values);
        std::printf("vulkan (%s) error %.3g\n", gpu.info().name.c_str(), vk_error);
        if (!(vk_error < 1e-5)) return 1;
    } catch (const vulkan::no_device_error& err) {
        std::printf("SKIP vulkan: %s\n", err.what());
    }
#else
    std::printf("a CPU-only attnfuse: no Vulkan backend\n");
#endif
    return 0;
}
