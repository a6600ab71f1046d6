// A training forward keeps softmax row statistics: an attention without a
// softmax (hard's one-hot weights here) must be refused at compile time.
#include <attnfuse/cpu.hpp>
using namespace attnfuse;
int main() {
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    float data[4] = {1, 2, 3, 4};
#ifdef ATTNFUSE_KO
    auto r = cpu::run_for_training(hard(Q^T*K)*V, bind(Q, data, 2, 2), bind(K, data, 2, 2), bind(V, data, 2, 2));
#else
    auto r = cpu::run_for_training(softmax(Q^T*K)*V, bind(Q, data, 2, 2), bind(K, data, 2, 2), bind(V, data, 2, 2));
#endif
    (void)r;
}
