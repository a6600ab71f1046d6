// A new elementwise operation with no interval-bounds rule must not compile
// into a tile-skipping bound (it once fell through to "monotone").
#include <attnfuse/dsl.hpp>
#include <attnfuse/intervals.hpp>
using namespace attnfuse;
struct my_new_op {
    static constexpr std::string_view name = "my_new_op";
    static constexpr bool prefix = false;
    static constexpr std::string_view glsl = "my_new_op";
    template <class F> static F apply(F x) { return x * x * x; }
};
int main() {
    auto leaf = [](const auto&) { return interval::everything(); };
    auto factor = [](const auto&) { return 1.0; };
#ifdef ATTNFUSE_KO
    const auto e = elementwise<my_new_op>(j - i);
#else
    const auto e = elementwise<op::exp_>(j - i);
#endif
    return bounds(e, interval{0, 3}, interval{0, 3}, leaf, factor).hi > 0 ? 0 : 1;
}
