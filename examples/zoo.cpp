// attnfuse-zoo, the README's main job. For now it shows the DSL end to end:
// an expression, its formula, its shape and its double-precision reference
// result on small inputs, plus the machine's CPU and Vulkan devices.
#include <attnfuse/cpu.hpp>
#include <attnfuse/dsl.hpp>
#include <attnfuse/vulkan.hpp>
#include <cstdio>
#include <vector>

namespace af = attnfuse;

int main() {
    using af::matrix, af::T, af::causal;
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;

    // Two heads, d_k = 3, four queries, five keys, d_v = 2, stored the way a
    // Transformer codebase stores them: [heads, n, d] row-major.
    const std::size_t heads = 2, d = 3, n_q = 4, n_k = 5, d_v = 2;
    std::vector<float> q(heads * n_q * d), k(heads * n_k * d), v(heads * n_k * d_v);
    for (std::size_t x = 0; x < q.size(); ++x) q[x] = static_cast<float>((x * 7 % 11) - 5) / 5.0f;
    for (std::size_t x = 0; x < k.size(); ++x) k[x] = static_cast<float>((x * 5 % 13) - 6) / 6.0f;
    for (std::size_t x = 0; x < v.size(); ++x) v[x] = static_cast<float>(x % 7) - 3.0f;

    // Row-major n x d is column-major d x n: the seeds' Q and K, no copy.
    auto bq = af::bind(Q, af::col_major(q.data(), d, n_q, 1, heads));
    auto bk = af::bind(K, af::col_major(k.data(), d, n_k, 1, heads));
    auto bv = af::bind(V, af::row_major(v.data(), n_k, d_v, 1, heads));

    auto show = [&](const auto& expr) {
        const auto r = af::reference::evaluate(expr, bq, bk, bv);
        std::printf("\n%s\n  shape: %zu batch x %zu heads x %zux%zu\n", af::to_string(expr).c_str(), r.batch,
                    r.heads, r.rows, r.cols);
        for (std::size_t h = 0; h < r.heads; ++h) {
            std::printf("  head %zu:\n", h);
            for (std::size_t row = 0; row < r.rows; ++row) {
                std::printf("   ");
                for (std::size_t col = 0; col < r.cols; ++col) std::printf(" %9.5f", r.at(0, h, row, col));
                std::printf("\n");
            }
        }
    };
    std::printf("attnfuse zoo (reference evaluator, double precision)\n");
    show(softmax(scale(Q^T*K))*V);
    show(softmax(mask(scale(Q^T*K), causal))*V);
    show(hard(Q^T*K)*V);

    std::printf("\nCPU: %s\n", af::cpu::describe(af::cpu::this_machine()).c_str());
    try {
        for (const auto& dev : af::vulkan::list_devices())
            std::printf("Vulkan device %zu: %s (%s, Vulkan %s)\n", dev.index, dev.name.c_str(),
                        std::string(af::vulkan::to_string(dev.kind)).c_str(),
                        af::vulkan::api_version_to_string(dev.api_version).c_str());
        std::printf("default Vulkan device: %s\n", af::vulkan::default_device().name.c_str());
    } catch (const af::vulkan::error& e) {
        std::printf("Vulkan: %s\n", e.what());
    }
    return 0;
}
