// One run of a fused attention on the default Vulkan device, in a process of
// its own: tests/second_process_cache.cmake runs it twice over an empty
// cache folder and reads whether the second process found every kernel's
// SPIR-V on disk (the run report says so).
#include <attnfuse/vulkan/executor.hpp>
#include <cstdio>
#include <vector>

int main() {
    namespace af = attnfuse;
    try {
        af::vulkan::device dev;
        af::matrix<"Q"> Q;
        af::matrix<"K"> K;
        af::matrix<"V"> V;
        const std::vector<float> data(8 * 13, 0.25f);
        const auto r = af::vulkan::run(dev, softmax(mask(scale(Q^af::T*K), af::causal))*V, af::bind(Q, data.data(), 8, 13),
                                       af::bind(K, data.data(), 8, 13), af::bind(V, data.data(), 13, 8));
        std::printf("spirv_from_disk_cache=%d dispatches=%zu\n", r.info.spirv_from_disk_cache ? 1 : 0, r.info.dispatches);
        return 0;
    } catch (const af::vulkan::no_device_error& e) {
        std::printf("SKIP: %s\n", e.what());
        return 0;
    }
}
