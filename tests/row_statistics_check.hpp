// A training forward's row statistics against the double reference's
// scores, for the CPU's and Vulkan's run_for_training alike.
#pragma once
#include <attnfuse/reference.hpp>
#include <attnfuse/run.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace attnfuse::testing {

// Each row's max, and its sum of exp(s - max) (relative); -inf and 0 where
// every key is masked.
template <class E, class... B>
void check_statistics(const row_statistics& got, const E& e, double tolerance, const B&... bindings) {
    const reference::result scores = reference::evaluate(plan::attention_parts<E>::score(e), bindings...);
    REQUIRE(got.batch == scores.batch);
    REQUIRE(got.heads == scores.heads);
    REQUIRE(got.rows == scores.rows);
    REQUIRE(got.max.size() == scores.batch * scores.heads * scores.rows);
    REQUIRE(got.sum.size() == got.max.size());
    double worst_max = 0, worst_sum = 0;
    for (std::size_t row = 0; row < got.max.size(); ++row) {
        const double* s = scores.values.data() + row * scores.cols;
        const double top = *std::max_element(s, s + scores.cols);
        if (std::isinf(top) && top < 0) {
            CHECK(got.max[row] == -std::numeric_limits<float>::infinity());
            CHECK(got.sum[row] == 0.0f);
            continue;
        }
        double sum = 0;
        for (std::size_t c = 0; c < scores.cols; ++c) sum += std::exp(s[c] - top);
        worst_max = std::max(worst_max, std::abs(got.max[row] - top) / std::max(1.0, std::abs(top)));
        worst_sum = std::max(worst_sum, std::abs(got.sum[row] - sum) / sum);
    }
    CHECK(worst_max <= tolerance);
    CHECK(worst_sum <= tolerance);
}

}  // namespace attnfuse::testing
