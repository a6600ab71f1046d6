#include <attnfuse/dsl.hpp>
using namespace attnfuse;
int main() {
    matrix<"Q"> Q;
    matrix<"K"> K;
    float data[4] = {1, 2, 3, 4};
#ifdef ATTNFUSE_KO
    auto r = reference::evaluate(Q^T*K, bind(Q, data, 2, 2));
#else
    auto r = reference::evaluate(Q^T*K, bind(Q, data, 2, 2), bind(K, data, 2, 2));
#endif
    (void)r;
}
