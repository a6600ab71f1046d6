// The planner, from expression types alone: this test links the DSL and no
// backend, so every decision it checks is made before any backend lowers it.
#include <attnfuse/dsl.hpp>
#include <attnfuse/plan.hpp>
#include <catch2/catch.hpp>

namespace af = attnfuse;

TEST_CASE("the planner's decisions", "[plan]") {
    using af::plan::kernel_count;
    using af::plan::mode;
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    af::matrix<"W"> W;
    af::matrix<"w"> w;
    using sdpa = decltype(softmax(scale(Q^af::T*K))*V);
    STATIC_REQUIRE(kernel_count<sdpa, mode::fused> == 1);
    STATIC_REQUIRE(kernel_count<sdpa, mode::unfused> == 4);  // product, scale, softmax, product
    STATIC_REQUIRE(kernel_count<decltype(softmax(mask(scale(Q^af::T*K), af::causal))*V)> == 1);
    STATIC_REQUIRE(kernel_count<decltype(hard(Q^af::T*K)*V)> == 1);
    STATIC_REQUIRE(kernel_count<decltype(dropout(softmax(Q^af::T*K), 0.1, 1)*V)> == 1);
    // general score: the projection W^T Q is its own kernel, then one fused kernel
    STATIC_REQUIRE(kernel_count<decltype(softmax(Q^af::T*W*K)*V)> == 2);
    // additive: both projections, then the fused pairwise kernel
    STATIC_REQUIRE(kernel_count<decltype(softmax(additive(w, W*Q, W*K))*V)> == 3);
    // two query-key products in one score: not the fused shape; falls back to unfused kernels
    STATIC_REQUIRE(af::plan::fused_kernel_count<decltype(softmax(Q^af::T*K + (Q^af::T*K))*V), mode::fused> == 0);
    STATIC_REQUIRE(kernel_count<decltype(softmax(Q^af::T*K + (Q^af::T*K))*V)> == 5);
    // a softmax not followed by *V is not fused
    STATIC_REQUIRE(kernel_count<decltype(softmax(Q^af::T*K))> == 2);
    // weights multiplied by a pointwise factor after the softmax (local-p's Gaussian): still one kernel
    STATIC_REQUIRE(kernel_count<decltype((softmax(mask(Q^af::T*K, abs(af::j - af::i) <= 2)) % exp(-square(af::j - af::i)))*V)> == 1);
    // the Keras feed-forward normalisation x / (row_sum(x) + eps): one kernel
    using keras = decltype(where(af::j < 5, exp(tanh(w^af::T*K)), 0) / (row_sum(where(af::j < 5, exp(tanh(w^af::T*K)), 0)) + 1e-7)*V);
    STATIC_REQUIRE(kernel_count<keras> == 1);
    // unfused: w^T*K twice (x appears twice), x, row_sum(x), the division, *V
    STATIC_REQUIRE(kernel_count<keras, mode::unfused> == 6);

    // pointwise weights, no row normalisation (sigmoid, ReLU^2 attention): one kernel
    using sigmoid_attention = decltype(sigmoid(mask(scale(Q^af::T*K), af::causal) - 5.0)*V);
    STATIC_REQUIRE(af::plan::attention_parts<sigmoid_attention>::pointwise);
    STATIC_REQUIRE(kernel_count<sigmoid_attention> == 1);
    STATIC_REQUIRE(af::plan::fused_kernel_count<sigmoid_attention, mode::fused> == 1);
    STATIC_REQUIRE(kernel_count<sigmoid_attention, mode::unfused> == 3);  // product, the pointwise weights, *V
    using relu2_attention = decltype(square(relu(scale(Q^af::T*K)))*V);
    STATIC_REQUIRE(kernel_count<relu2_attention> == 1);
    STATIC_REQUIRE(af::plan::is_weighted_sum_v<relu2_attention>);  // a zero weight skips its value row
    // a weight expression with a computed operand (a row_sum of other scores) still fuses, after the
    // operand's kernels: W^T*K, its exp, the row_sum, then the fused kernel
    STATIC_REQUIRE(kernel_count<decltype(exp(Q^af::T*K) / (row_sum(exp(W^af::T*K)) + 1)*V)> == 4);
    // the more particular rules win: softmax(s) % g is a softmax, x / (row_sum(x) + c) a ratio
    STATIC_REQUIRE(!af::plan::attention_parts<keras>::pointwise);
    STATIC_REQUIRE(af::plan::attention_parts<keras>::ratio);
    // a bare product is no attention, and two cores in the weights are not one kernel
    STATIC_REQUIRE(!af::plan::fuses_as_attention_v<decltype((Q^af::T*K)*V)>);
    STATIC_REQUIRE(!af::plan::fuses_as_attention_v<decltype(sigmoid(Q^af::T*K + (Q^af::T*K))*V)>);
}
