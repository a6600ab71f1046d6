#include <attnfuse/dsl.hpp>
using namespace attnfuse;
int main() {
#ifdef ATTNFUSE_KO
    matrix<"K", dyn, dyn, double> K;  // no attnfuse::element<double>: storage is f32, f16 or bf16
#else
    matrix<"K", dyn, dyn, half> K;
#endif
    matrix<"Q"> Q;
    auto e = Q^T*K;
    (void)e;
}
