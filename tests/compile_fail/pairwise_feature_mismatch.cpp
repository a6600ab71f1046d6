#include <attnfuse/dsl.hpp>
using namespace attnfuse;
int main() {
    matrix<"w", 8, 1> w;
    matrix<"W1", 8, 16> W1;
    matrix<"Q", 16> Q;
    matrix<"K", 16> K;
#ifdef ATTNFUSE_KO
    matrix<"W2", 6, 16> W2;
#else
    matrix<"W2", 8, 16> W2;
#endif
    auto e = additive(w, W1*Q, W2*K);
    (void)e;
}
