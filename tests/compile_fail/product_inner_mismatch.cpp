// Q is 64x7 and K is 32x9: Q^T*K multiplies 7x64 by 32x9.
#include <attnfuse/dsl.hpp>
using namespace attnfuse;
int main() {
#ifdef ATTNFUSE_KO
    matrix<"Q", 64, 7> Q;
    matrix<"K", 32, 9> K;
#else
    matrix<"Q", 32, 7> Q;
    matrix<"K", 32, 9> K;
#endif
    auto s = Q^T*K;
    (void)s;
}
