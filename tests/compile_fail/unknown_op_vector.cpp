// A new binary operation with no CPU vector face must not compile into the
// last branch's operation (it once became logical OR).
#include <attnfuse/cpu/simd.hpp>
using namespace attnfuse;
struct my_new_binary {
    static constexpr std::string_view name = "my_new_binary";
    static constexpr std::string_view symbol = "";
    static constexpr int prec = op::prec_atom;
    static constexpr std::string_view glsl = "my_new_binary";
    template <class F> static constexpr F apply(F a, F b) { return a - 2 * b; }
};
int main() {
    const cpu::simd::vf a = cpu::simd::splat(1.0f), b = cpu::simd::splat(2.0f);
#ifdef ATTNFUSE_KO
    return cpu::simd::apply<my_new_binary>(a, b)[0] > 0;
#else
    return cpu::simd::apply<op::logical_or>(a, b)[0] > 0;
#endif
}
