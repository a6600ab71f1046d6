#include <attnfuse/dsl.hpp>
using namespace attnfuse;
int main() {
    matrix<"A", 5, 9> A;
#ifdef ATTNFUSE_KO
    matrix<"B", 6, 9> B;
#else
    matrix<"B", 1, 9> B;  // a row vector broadcasts over the rows
#endif
    auto e = A + B;
    (void)e;
}
