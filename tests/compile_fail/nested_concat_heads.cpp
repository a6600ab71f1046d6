#include <attnfuse/dsl.hpp>
using namespace attnfuse;
int main() {
    matrix<"Q"> Q;
    matrix<"K"> K;
    matrix<"V"> V;
    const auto heads = softmax(scale(Q^T*K))*V;
#ifdef ATTNFUSE_KO
    auto layer = concat_heads(concat_heads(heads));  // the inner one already left a single head
#else
    auto layer = concat_heads(heads);
#endif
    (void)layer;
}
