// C++ reads W*K^T as (W*K)^T.
#include <attnfuse/dsl.hpp>
using namespace attnfuse;
int main() {
    matrix<"W", 4, 4> W;
    matrix<"K", 4, 4> K;
#ifdef ATTNFUSE_KO
    auto e = W*K^T;
#else
    auto e = W*(K^T);
#endif
    (void)e;
}
