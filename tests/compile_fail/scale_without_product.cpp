#include <attnfuse/dsl.hpp>
using namespace attnfuse;
int main() {
    matrix<"S"> S;
#ifdef ATTNFUSE_KO
    auto e = softmax(scale(S));
#else
    auto e = softmax(scale(S, 0.125));
#endif
    (void)e;
}
