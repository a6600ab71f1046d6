// `B + Q^T*K` would parse as (B + Q)^T*K.
#include <attnfuse/dsl.hpp>
using namespace attnfuse;
int main() {
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"B"> B;
#ifdef ATTNFUSE_KO
    auto e = B + Q^T*K;
#else
    auto e = B + (Q^T*K);
#endif
    (void)e;
}
