// Training an attention layer with the fused backward pass, on the CPU and
// on the default Vulkan device: a toy "previous token" task. Each sequence is n random tokens; the layer sees
// each token's embedding and a one-hot position (X, d_x x n), projects them
// to queries and keys (Q = Wq X, K = Wk X), and reads the token embeddings
// as values:
//
//   O = softmax(mask(scale(Q^T*K), causal)) * V
//
// The target of position i is the embedding of token i-1 (of token 0 at
// i = 0), which the layer can only produce by learning to put its weight on
// the key one position back. Plain SGD on Wq and Wk for a few hundred steps
// drives the mean squared error down. On each backend the forward is a
// training forward (run_for_training), whose row statistics spare the
// backward its first pass over the keys. Either way the
// backward gives dQ and dK, and the projections' gradients are dQ Xᵀ and
// dK Xᵀ. At the first step each backend's fused gradients are checked
// against the double-precision reference backward. Both runs start from
// the same weights and see the same batches. Exits non-zero if the loss
// does not fall on a backend or a check fails.
#include <attnfuse/cpu.hpp>
#include <attnfuse/cpu/backward.hpp>
#include <attnfuse/vulkan/backward.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <vector>

namespace af = attnfuse;

namespace {

constexpr std::size_t batch = 8, n = 12, vocabulary = 10, embedding = 6, depth = 8;
constexpr std::size_t d_x = embedding + n;  // token embedding, then one-hot position

struct generator {
    std::uint32_t state;
    float uniform() {  // [-1, 1)
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        return static_cast<float>(state >> 8) / 8388608.0f - 1.0f;
    }
    std::size_t token() { return static_cast<std::size_t>((uniform() + 1.0f) * 0.5f * vocabulary) % vocabulary; }
};

// W (depth x d_x, row-major) times each sequence's X (d_x x n, row-major): depth x n per batch entry.
std::vector<float> project(const std::vector<float>& w, const std::vector<float>& x) {
    std::vector<float> out(batch * depth * n, 0.0f);
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t a = 0; a < depth; ++a)
            for (std::size_t k = 0; k < d_x; ++k)
                for (std::size_t r = 0; r < n; ++r) out[(b * depth + a) * n + r] += w[a * d_x + k] * x[(b * d_x + k) * n + r];
    return out;
}

// dW = sum over the batch of dP Xᵀ, for P = W X.
std::vector<float> projection_gradient(const af::tensor& d_projected, const std::vector<float>& x) {
    std::vector<float> out(depth * d_x, 0.0f);
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t a = 0; a < depth; ++a)
            for (std::size_t k = 0; k < d_x; ++k)
                for (std::size_t r = 0; r < n; ++r) out[a * d_x + k] += d_projected.at(b, 0, a, r) * x[(b * d_x + k) * n + r];
    return out;
}

// Trains from the initial weights for `steps` steps; `forward(bindings)` and
// `backward(forward, d_output, bindings)` are the backend's. Returns the
// first and last loss, or nothing when the gradient check fails.
template <class Layer, class Forward, class Backward>
std::optional<std::pair<double, double>> train(const char* backend, const Layer& layer, const Forward& forward, const Backward& backward) {
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    generator random{2024};
    std::vector<float> embeddings(vocabulary * embedding);
    for (float& e : embeddings) e = random.uniform();
    std::vector<float> wq(depth * d_x), wk(depth * d_x);
    for (float& w : wq) w = 0.3f * random.uniform();
    for (float& w : wk) w = 0.3f * random.uniform();

    const float learning_rate = 2.0f;
    const int steps = 400;
    double first_loss = 0, last_loss = 0;
    std::printf("%s:\n", backend);
    for (int step = 0; step <= steps; ++step) {
        // a fresh batch of sequences: X = [embedding; one-hot position], V = the embeddings as rows
        std::vector<float> x(batch * d_x * n, 0.0f), v(batch * n * embedding), target(batch * n * embedding);
        for (std::size_t b = 0; b < batch; ++b) {
            std::size_t tokens[n];
            for (std::size_t r = 0; r < n; ++r) tokens[r] = random.token();
            for (std::size_t r = 0; r < n; ++r) {
                const float* e = embeddings.data() + tokens[r] * embedding;
                const float* previous = embeddings.data() + tokens[r == 0 ? 0 : r - 1] * embedding;
                for (std::size_t c = 0; c < embedding; ++c) {
                    x[(b * d_x + c) * n + r] = e[c];
                    v[(b * n + r) * embedding + c] = e[c];
                    target[(b * n + r) * embedding + c] = previous[c];
                }
                x[(b * d_x + embedding + r) * n + r] = 1.0f;
            }
        }
        const std::vector<float> q = project(wq, x), k = project(wk, x);
        const auto bq = af::bind(Q, af::row_major(q.data(), depth, n, batch));
        const auto bk = af::bind(K, af::row_major(k.data(), depth, n, batch));
        const auto bv = af::bind(V, af::row_major(v.data(), n, embedding, batch));
        const auto forward_result = forward(bq, bk, bv);
        const af::tensor& output = forward_result.output;

        // mean squared error and its gradient in the output
        af::tensor d_output = output;
        double loss = 0;
        const double count = static_cast<double>(batch * n);
        for (std::size_t m = 0; m < target.size(); ++m) {
            const double error = output.values[m] - target[m];
            loss += error * error / count;
            d_output.values[m] = static_cast<float>(2 * error / count);
        }
        if (step == 0) first_loss = loss;
        last_loss = loss;
        if (step % 100 == 0) std::printf("  step %3d  loss %.5f\n", step, loss);
        if (step == steps) break;

        const af::backward_result g = backward(forward_result, d_output, bq, bk, bv);
        if (step == 0) {
            const af::reference::result d_reference{d_output.batch, d_output.heads, d_output.rows, d_output.cols,
                                                    std::vector<double>(d_output.values.begin(), d_output.values.end())};
            const af::reference::gradients reference = af::reference::backward(layer, d_reference, bq, bk, bv);
            // max |fused - reference| over the largest |reference|, per input (the gradients here are small)
            double worst = 0;
            for (const char* name : {"Q", "K", "V"}) {
                const std::vector<double>& want = reference.of(name).values;
                const std::vector<float>& have = g.of(name).values;
                double difference = 0, largest = 0;
                for (std::size_t m = 0; m < want.size(); ++m) {
                    difference = std::max(difference, std::abs(want[m] - have[m]));
                    largest = std::max(largest, std::abs(want[m]));
                }
                worst = std::max(worst, difference / largest);
            }
            std::printf("  fused gradients against the double-precision reference: %.2e relative (tolerance 1e-4)\n", worst);
            if (!(worst <= 1e-4)) return std::nullopt;
        }
        const std::vector<float> dwq = projection_gradient(g.of("Q"), x), dwk = projection_gradient(g.of("K"), x);
        for (std::size_t m = 0; m < wq.size(); ++m) {
            wq[m] -= learning_rate * dwq[m];
            wk[m] -= learning_rate * dwk[m];
        }
    }
    std::printf("  loss %.5f -> %.5f (%.1f%% of the first)\n", first_loss, last_loss, 100.0 * last_loss / first_loss);
    return std::pair{first_loss, last_loss};
}

std::unique_ptr<af::vulkan::device> vulkan_device() {
    try {
        return std::make_unique<af::vulkan::device>();
    } catch (const af::vulkan::error& e) {
        std::printf("(no Vulkan: %s)\n", e.what());
        return nullptr;
    }
}

}  // namespace

int main() {
    using af::T;
    af::matrix<"Q"> Q;
    af::matrix<"K"> K;
    af::matrix<"V"> V;
    const auto layer = af::softmax(af::mask(af::scale(Q^T*K), af::causal)) * V;
    std::printf("training softmax(mask(scale(Q^T*K), causal))*V, Q = Wq X, K = Wk X, on the previous-token task\n");
    std::printf("batch %zu, n %zu, d %zu, plain SGD (learning rate 2.0) for 400 steps, gradients from the fused backward\n", batch, n,
                depth);
    // the layer must have learned the task on each backend: a fifth of the first loss at most
    auto learned = [](const std::optional<std::pair<double, double>>& losses) { return losses && losses->second <= 0.2 * losses->first; };
    bool ok = learned(train(
        "cpu (a training forward with its row statistics, cpu::backward from its result)", layer,
        [&](const auto&... b) { return af::cpu::run_for_training(layer, b...); },
        [&](const af::training_result& forward, const af::tensor& d_output, const auto&... b) { return af::cpu::backward(layer, forward, d_output, b...); }));
    if (const auto dev = vulkan_device()) {
        const std::string name = "vulkan on " + dev->info().name + " (a training forward, vulkan::backward from its result)";
        ok = learned(train(
                 name.c_str(), layer, [&](const auto&... b) { return af::vulkan::run_for_training(*dev, layer, b...); },
                 [&](const af::training_result& forward, const af::tensor& d_output, const auto&... b) {
                     return af::vulkan::backward(*dev, layer, forward, d_output, b...);
                 })) &&
             ok;
    }
    return ok ? 0 : 1;
}
