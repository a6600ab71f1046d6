#include <attnfuse/dsl.hpp>
using namespace attnfuse;
int main() {
    matrix<"Q"> Q;
    matrix<"K"> K;
    float data[4] = {1, 2, 3, 4};
#ifdef ATTNFUSE_KO
    auto s = T*K;  // the Q^ part is missing
#else
    auto s = Q^T*K;
#endif
    auto r = reference::evaluate(s, bind(Q, data, 2, 2), bind(K, data, 2, 2));
    (void)r;
}
