// What every backend's run takes and gives, defined once: the execution mode
// (the planner's), one set of options and one report. cpu::options and
// vulkan::options are this type; a field a backend has no use for is
// ignored there (threads on Vulkan, key_splits on the CPU), and a report
// field it has nothing to say about stays 0 (the CPU has no device time).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "bind.hpp"
#include "gradient.hpp"
#include "plan.hpp"

namespace attnfuse {

// fused: the plan's kernels; unfused: every non-pointwise node its own kernel.
using execution = plan::mode;

struct run_options {
    execution mode = execution::fused;
    // Positional initialisation stops here: run_options{mode} is fine, and
    // every other field is named ({.mode = m, .threads = 2}), so that a
    // number meant for one backend's field cannot land in another's.
    struct name_the_fields_after_mode {
        explicit name_the_fields_after_mode() = default;
    } positional_stop{};
    // CPU: threads; 0 is OpenMP's default (OMP_NUM_THREADS, else every
    // hardware thread), and more than the hardware runs is clamped to it.
    std::size_t threads = 0;
    // Vulkan: workgroups the keys of a fused attention are split over (a
    // second dispatch merges them, as in FlashDecoding); 0 chooses per
    // device: on a GPU, enough to fill it when queries x heads alone would
    // not (decode, short sequences); none on a CPU device.
    std::size_t key_splits = 0;
    // Where Q and K, or V, are stored bf16 and the device multiplies bf16
    // pairs natively (the CPU's AVX512-BF16), run those products in bf16,
    // with fp32 sums: Q.K exactly as in fp32 but for rounding order, the
    // weights rounded to bf16 (nearest, a relative error of at most 2^-8
    // each) for their product with V, as FlashAttention rounds P to its
    // inputs' type. false keeps every product fp32; report.notes says when
    // bf16 products ran.
    bool bf16_products = true;
};

// What a run did.
struct report {
    std::vector<std::string> kernels;    // the planned kernels, in execution order
    std::size_t dispatches = 0;          // kernel launches (a planned kernel may take several)
    std::size_t intermediate_bytes = 0;  // memory allocated besides inputs and the output
    std::size_t score_bytes = 0;         // of which n_q x n_k scores or weights (0 when fused)
    double wall_seconds = 0;             // the whole call, build_seconds included
    double device_seconds = 0;           // a device's own timestamps (0 on the CPU)
    // Of wall_seconds, the first-run cost: compiling shaders (or reading
    // their SPIR-V from the disk cache) and building pipelines. 0 once a
    // device has met every kernel of the expression, and on the CPU.
    double build_seconds = 0;
    bool spirv_from_disk_cache = false;  // every kernel's SPIR-V came from an earlier process
    std::size_t threads = 0;             // CPU threads that ran the kernels
    std::vector<std::string> notes;      // choices made at run time (fallbacks, retries)
};

// Each query row's softmax statistics, kept by a training forward
// (cpu::run_for_training): per (batch, head, query row), index
// (b * heads + h) * rows + i, the largest of the row's scores (after the
// score's pointwise operations, before dropout) and the sum of
// exp(score - max) over its keys. The weights are exp(s - max) / sum. A row
// every mask removes has max -inf and sum 0, a row with a NaN score NaN.
struct row_statistics {
    std::size_t batch = 0, heads = 0, rows = 0;
    std::vector<float> max, sum;

    bool empty() const { return max.empty(); }
    // log(sum over the keys of exp(score)), -inf for a row every mask removes
    float log_sum_exp(std::size_t index) const { return sum[index] == 0.0f ? max[index] : max[index] + std::log(sum[index]); }
};

struct run_result {
    tensor output;
    report info;
};

// What a training forward returns: the output, the report, and each query
// row's statistics, which a backward pass given this result reads instead of
// recomputing them, and which merge_attentions() merges by.
struct training_result {
    tensor output;
    report info;
    row_statistics statistics;
};

namespace check {
// Row statistics exist for a softmax attention at the root.
template <class E>
constexpr void keeps_statistics() {
    static_assert(plan::keeps_statistics_v<E>,
                  "attnfuse: run_for_training keeps the row statistics of a softmax attention at the root: softmax(s)*V, "
                  "dropout(softmax(s), p, seed)*V or (softmax(s) % g)*V. For any other expression call run(); "
                  "reference::backward differentiates it");
}
}  // namespace check

// The attention over the union of two disjoint sets of keys, from training
// forwards over each (run_for_training): exact, as
// FlashDecoding merges its key splits. Each row is the two rows weighted by
// their shares of the merged sum, exp(max_x - max) sum_x, and the result
// carries the merged statistics, so merges chain. A row every mask removed
// in one part takes the other's; in both, it is 0. Both parts must come from
// one expression over the same queries (their outputs and statistics of one
// shape: a shape_error names both otherwise).
inline training_result merge_attentions(const training_result& first, const training_result& second) {
    const tensor &a = first.output, &b = second.output;
    const auto extents = [](const tensor& t) {
        return std::to_string(t.batch) + " batch x " + std::to_string(t.heads) + " heads of " + shape_to_string(t.rows, t.cols);
    };
    if (a.batch != b.batch || a.heads != b.heads || a.rows != b.rows || a.cols != b.cols)
        throw shape_error("merge_attentions: the first part's output is " + extents(a) + " but the second's is " + extents(b) +
                          "; merge the parts of one attention over the same queries");
    const std::size_t rows = a.batch * a.heads * a.rows;
    for (const training_result* part : {&first, &second}) {
        const row_statistics& st = part->statistics;
        if (st.max.size() != rows || st.sum.size() != rows)
            throw shape_error("merge_attentions: the " + std::string(part == &first ? "first" : "second") + " part keeps statistics of " +
                              std::to_string(st.max.size()) + " rows, but its output has " + std::to_string(rows) +
                              " rows; give the results of run_for_training unchanged");
    }
    training_result merged;
    merged.output = a;
    merged.statistics = first.statistics;
    for (std::size_t r = 0; r < rows; ++r) {
        const float max_a = first.statistics.max[r], max_b = second.statistics.max[r];
        const float sum_a = first.statistics.sum[r], sum_b = second.statistics.sum[r];
        float* out = merged.output.values.data() + r * a.cols;
        const float* row_b = b.values.data() + r * b.cols;
        if (std::isnan(max_a) || std::isnan(max_b) || std::isnan(sum_a) || std::isnan(sum_b)) {
            std::fill_n(out, a.cols, std::numeric_limits<float>::quiet_NaN());
            merged.statistics.max[r] = merged.statistics.sum[r] = std::numeric_limits<float>::quiet_NaN();
            continue;
        }
        const float top = std::max(max_a, max_b);
        // a part every mask removed (sum 0) weighs 0, never exp(-inf - -inf)
        const float weight_a = sum_a == 0.0f ? 0.0f : sum_a * std::exp(max_a - top);
        const float weight_b = sum_b == 0.0f ? 0.0f : sum_b * std::exp(max_b - top);
        const float total = weight_a + weight_b;
        const float share_a = total == 0.0f ? 0.0f : weight_a / total, share_b = total == 0.0f ? 0.0f : weight_b / total;
        for (std::size_t c = 0; c < a.cols; ++c)
            out[c] = (share_a == 0.0f ? 0.0f : share_a * out[c]) + (share_b == 0.0f ? 0.0f : share_b * row_b[c]);
        merged.statistics.max[r] = top;
        merged.statistics.sum[r] = total;
    }
    merged.info.kernels = {"merge_attentions: each row weighted by its part's share of the merged softmax sum"};
    return merged;
}

// A backward pass's output and d_output must have the expression's
// batch, heads and shape (a shape_error names both otherwise).
inline void check_backward_operands(const tensor& output, const tensor& d_output, std::size_t batch, std::size_t heads,
                                    runtime_shape shape) {
    const auto extents = [](std::size_t b, std::size_t h, std::size_t r, std::size_t c) {
        return std::to_string(b) + " batch x " + std::to_string(h) + " heads of " + shape_to_string(r, c);
    };
    for (auto [name, t] : {std::pair{"output", &output}, std::pair{"d_output", &d_output}})
        if (t->batch != batch || t->heads != heads || t->rows != shape.rows || t->cols != shape.cols ||
            t->values.size() != batch * heads * shape.rows * shape.cols)
            throw shape_error(std::string(name) + ": the expression gives " + extents(batch, heads, shape.rows, shape.cols) + " but " +
                              name + " is " + extents(t->batch, t->heads, t->rows, t->cols) +
                              "; give the forward's output and its gradient, of the output's shape");
}

// A forward result's statistics that a backward pass reads must be those of
// the expression's rows (a shape_error names both otherwise).
inline void check_given_statistics(const row_statistics& given, std::size_t batch, std::size_t heads, std::size_t n_q) {
    const std::size_t rows = batch * heads * n_q;
    if (given.batch != batch || given.heads != heads || given.rows != n_q || given.max.size() != rows || given.sum.size() != rows)
        throw shape_error("the forward's statistics: the expression has " + std::to_string(batch) + " batch x " + std::to_string(heads) +
                          " heads of " + std::to_string(n_q) + " query rows but the statistics are of " + std::to_string(given.batch) +
                          " x " + std::to_string(given.heads) + " of " + std::to_string(given.rows) + " (" +
                          std::to_string(given.max.size()) + " kept); give the result of this expression's training forward");
}

// What a backend's backward pass returns: the gradient of
// sum(d_output ∘ output) in every bound input the output depends on
// differentiably (gradient.hpp says which), each laid out as the input is
// bound (its own batch x heads matrices of rows x cols, row-major), and the
// names of the bound inputs that get none.
struct named_gradient {
    std::string name;
    tensor values;
};
struct backward_result {
    std::vector<named_gradient> inputs;
    std::vector<std::string> without;
    report info;

    bool has(std::string_view name) const {
        for (const named_gradient& g : inputs)
            if (g.name == name) return true;
        return false;
    }
    const tensor& of(std::string_view name) const {
        for (const named_gradient& g : inputs)
            if (g.name == name) return g.values;
        for (const std::string& n : without)
            if (n == name) throw std::invalid_argument(no_gradient_message(n));
        throw std::invalid_argument("attnfuse: no input named " + std::string(name) + " is bound");
    }
};

// A backend's attention backward hands out its gradients of Q, K and V to
// every bound input: each its own where gets_gradient_v says it gets one
// (a score that passes its core only through comparisons gives Q and K
// none), every other input none.
template <class E, class QI, class KI, class VI, class... Bindings>
void hand_out_attention_gradients(backward_result& result, tensor&& dq, tensor&& dk, tensor&& dv, const Bindings&...) {
    auto hand_out = [&]<class B>(std::type_identity<B>) {
        const std::string name(B::name.view());
        if (!gets_gradient_v<E, B::name>) result.without.push_back(name);
        else if (name == QI::name.view()) result.inputs.push_back({name, std::move(dq)});
        else if (name == KI::name.view()) result.inputs.push_back({name, std::move(dk)});
        else if (name == VI::name.view()) result.inputs.push_back({name, std::move(dv)});
        else result.without.push_back(name);
    };
    (hand_out(std::type_identity<Bindings>{}), ...);
}

}  // namespace attnfuse
