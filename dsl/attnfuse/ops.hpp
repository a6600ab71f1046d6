// Every elementwise operation of the DSL, each defined once, in one struct
// that carries every face a stage of the lowering reads:
//
//   name, prefix / symbol, prec   how to_string prints it;
//   apply<F>(x...)                the scalar meaning: the reference runs it in
//                                 double, a backend's scalar fallback in float;
//   lanes<L>(v...)                the vector form, written against a lane
//                                 algebra L (below) that each CPU vector width
//                                 provides, so one text serves every width;
//   glsl, glsl_infix,             its GLSL spelling, and the GLSL function it
//   glsl_definition               calls when GLSL has no such builtin;
//   bounds(interval...)           how it maps value ranges (its monotonicity,
//                                 stated, never assumed), for tile skipping;
//   partials<F>(x...)             the derivative face: the partial derivative
//                                 of the result in each operand, at x, which
//                                 the backward pass chains (the reference in
//                                 double);
//   carries_gradient              per operand, whether a gradient flows to it
//                                 at all: false where the result is piecewise
//                                 constant in it (comparisons, logic, a
//                                 where's condition), so that an input read
//                                 only there gets no gradient.
//   glsl_partials                 the derivative face in GLSL: each partial
//                                 as a GLSL expression of the operands a, b
//                                 and c, which the Vulkan backward chains
//                                 (it may call the operation's own
//                                 glsl_definition, no other's).
//
// A stage that needs a face an operation lacks stops the build with a
// static_assert naming the stage and the operation.
//
// The lane algebra L: L::vec is a vector of floats with + - * / (also with a
// float) and comparisons giving lane masks; L::splat(x), L::pick(mask, a, b),
// L::truth(mask) (1 or 0 per lane), L::is_nan(a), L::max, L::min, L::fma,
// L::exp, L::tanh, and L::each<Op>(a...) (lane by lane through Op::apply).
#pragma once
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>

#include "interval.hpp"

namespace attnfuse::op {

// Precedence used when printing formulas; higher binds tighter.
enum precedence : int { prec_or = 1, prec_and, prec_equality, prec_relational, prec_additive, prec_multiplicative, prec_unary, prec_atom };

// ---- unary -------------------------------------------------------------
struct negate {
    static constexpr std::string_view name = "-";
    static constexpr bool prefix = true;
    static constexpr std::string_view glsl = "-";
    static constexpr bool glsl_infix = true;
    static constexpr std::string_view glsl_definition = "";
    template <class F> static constexpr F apply(F x) { return -x; }
    template <class L> static typename L::vec lanes(typename L::vec a) { return -a; }
    static interval bounds(interval a) { return {-a.hi, -a.lo}; }
    static constexpr std::array<bool, 1> carries_gradient{true};
    template <class F> static constexpr std::array<F, 1> partials(F) { return {F(-1)}; }
    static constexpr std::array<std::string_view, 1> glsl_partials{"-1.0"};
};
struct logical_not {
    static constexpr std::string_view name = "!";
    static constexpr bool prefix = true;
    static constexpr std::string_view glsl = "af_not";
    static constexpr bool glsl_infix = false;
    static constexpr std::string_view glsl_definition = "float af_not(float a) { return a != 0.0 ? 0.0 : 1.0; }";
    template <class F> static constexpr F apply(F x) { return x != F(0) ? F(0) : F(1); }
    template <class L> static typename L::vec lanes(typename L::vec a) { return L::truth(a == 0.0f); }
    static interval bounds(interval a) { return detail::truth(a.surely_zero(), a.surely_nonzero()); }
    static constexpr std::array<bool, 1> carries_gradient{false};
    template <class F> static constexpr std::array<F, 1> partials(F) { return {F(0)}; }
    static constexpr std::array<std::string_view, 1> glsl_partials{"0.0"};
};

// A function f(x): printed as name(x), GLSL spelling Glsl (defined by
// GlslDefinition when not a builtin).
#define ATTNFUSE_UNARY_FUNCTION(Tag, Name, Glsl, GlslDefinition)            \
    struct Tag {                                                           \
        static constexpr std::string_view name = Name;                     \
        static constexpr bool prefix = false;                              \
        static constexpr std::string_view glsl = Glsl;                     \
        static constexpr bool glsl_infix = false;                          \
        static constexpr std::string_view glsl_definition = GlslDefinition; \
        static constexpr std::array<bool, 1> carries_gradient{true};

ATTNFUSE_UNARY_FUNCTION(exp_, "exp", "exp", "")
    template <class F> static F apply(F x) { using std::exp; return exp(x); }
    template <class L> static typename L::vec lanes(typename L::vec a) { return L::exp(a); }
    static interval bounds(interval a) { return detail::increasing(a, [](double v) { return std::exp(v); }); }
    template <class F> static std::array<F, 1> partials(F x) { using std::exp; return {exp(x)}; }
    static constexpr std::array<std::string_view, 1> glsl_partials{"exp(a)"};
};
ATTNFUSE_UNARY_FUNCTION(log_, "log", "log", "")
    template <class F> static F apply(F x) { using std::log; return log(x); }
    template <class L> static typename L::vec lanes(typename L::vec a) { return L::template each<log_>(a); }
    static interval bounds(interval a) { return detail::increasing(a, [](double v) { return std::log(v); }); }
    template <class F> static std::array<F, 1> partials(F x) { return {F(1) / x}; }
    static constexpr std::array<std::string_view, 1> glsl_partials{"1.0 / a"};
};
ATTNFUSE_UNARY_FUNCTION(tanh_, "tanh", "af_tanh", "float af_tanh(float x) { return x > 15.0 ? 1.0 : (x < -15.0 ? -1.0 : tanh(x)); }")
    template <class F> static F apply(F x) { using std::tanh; return tanh(x); }
    template <class L> static typename L::vec lanes(typename L::vec a) { return L::tanh(a); }
    static interval bounds(interval a) { return detail::increasing(a, [](double v) { return std::tanh(v); }); }
    template <class F> static std::array<F, 1> partials(F x) { using std::tanh; const F t = tanh(x); return {F(1) - t * t}; }
    static constexpr std::array<std::string_view, 1> glsl_partials{"1.0 - af_tanh(a) * af_tanh(a)"};
};
ATTNFUSE_UNARY_FUNCTION(sigmoid, "sigmoid", "af_sigmoid", "float af_sigmoid(float x) { return 1.0 / (1.0 + exp(-x)); }")
    template <class F> static F apply(F x) { using std::exp; return F(1) / (F(1) + exp(-x)); }
    template <class L> static typename L::vec lanes(typename L::vec a) { return 1.0f / (1.0f + L::exp(-a)); }
    static interval bounds(interval a) { return detail::increasing(a, [](double v) { return apply(v); }); }
    template <class F> static std::array<F, 1> partials(F x) { const F s = apply(x); return {s * (F(1) - s)}; }
    static constexpr std::array<std::string_view, 1> glsl_partials{"af_sigmoid(a) * (1.0 - af_sigmoid(a))"};
};
ATTNFUSE_UNARY_FUNCTION(relu, "relu", "af_relu", "float af_relu(float x) { return x > 0.0 ? x : 0.0; }")
    template <class F> static F apply(F x) { return x > F(0) ? x : F(0); }
    template <class L> static typename L::vec lanes(typename L::vec a) { return L::pick(a > 0.0f, a, L::splat(0.0f)); }
    static interval bounds(interval a) { return detail::increasing(a, [](double v) { return apply(v); }); }
    template <class F> static std::array<F, 1> partials(F x) { return {x > F(0) ? F(1) : F(0)}; }
    static constexpr std::array<std::string_view, 1> glsl_partials{"a > 0.0 ? 1.0 : 0.0"};
};
ATTNFUSE_UNARY_FUNCTION(abs_, "abs", "abs", "")
    template <class F> static F apply(F x) { using std::abs; return abs(x); }
    // 0 - a, not -a: |-0| is +0, as std::abs and GLSL's abs give
    template <class L> static typename L::vec lanes(typename L::vec a) { return L::pick(a <= 0.0f, 0.0f - a, a); }
    static interval bounds(interval a) {  // decreasing below 0, increasing above
        if (a.lo >= 0) return a;
        if (a.hi <= 0) return {-a.hi, -a.lo};
        return {0, std::max(-a.lo, a.hi)};
    }
    template <class F> static std::array<F, 1> partials(F x) { return {x > F(0) ? F(1) : (x < F(0) ? F(-1) : F(0))}; }
    static constexpr std::array<std::string_view, 1> glsl_partials{"a > 0.0 ? 1.0 : (a < 0.0 ? -1.0 : 0.0)"};
};
ATTNFUSE_UNARY_FUNCTION(sqrt_, "sqrt", "sqrt", "")
    template <class F> static F apply(F x) { using std::sqrt; return sqrt(x); }
    template <class L> static typename L::vec lanes(typename L::vec a) { return L::template each<sqrt_>(a); }
    static interval bounds(interval a) { return detail::increasing(a, [](double v) { return std::sqrt(v); }); }
    template <class F> static std::array<F, 1> partials(F x) { using std::sqrt; return {F(0.5) / sqrt(x)}; }
    static constexpr std::array<std::string_view, 1> glsl_partials{"0.5 / sqrt(a)"};
};
ATTNFUSE_UNARY_FUNCTION(square, "square", "af_square", "float af_square(float x) { return x * x; }")
    template <class F> static F apply(F x) { return x * x; }
    template <class L> static typename L::vec lanes(typename L::vec a) { return a * a; }
    static interval bounds(interval a) {  // the square of |x|, which is increasing
        const interval m = abs_::bounds(a);
        return {m.lo * m.lo, m.hi * m.hi};
    }
    template <class F> static std::array<F, 1> partials(F x) { return {F(2) * x}; }
    static constexpr std::array<std::string_view, 1> glsl_partials{"2.0 * a"};
};
// softplus(x) = log(1 + e^x), written so that neither e^x overflows nor
// 1 + e^-|x| loses a small term: max(x, 0) + log1p(e^-|x|), with log1p(e)
// as log(u) * e / (u - 1), u = 1 + e rounded (Goldberg's correction: the
// rounding of u cancels), and e itself where u rounds to 1.
ATTNFUSE_UNARY_FUNCTION(softplus, "softplus", "af_softplus",
                        "float af_softplus(float x) { float e = exp(-abs(x)); float u = 1.0 + e; "
                        "float tail = u == 1.0 ? e : log(u) * e / (u - 1.0); "
                        "return isnan(x) ? x : max(x, 0.0) + tail; }")
    template <class F> static F apply(F x) {
        using std::exp, std::log1p;
        return x > F(0) ? x + log1p(exp(-x)) : log1p(exp(x));  // NaN takes the second branch and stays NaN
    }
    template <class L> static typename L::vec lanes(typename L::vec a) {
        const typename L::vec e = L::exp(L::pick(a < 0.0f, a, -a));  // e^-|x|
        const typename L::vec u = 1.0f + e;
        const typename L::vec tail = L::pick(u == 1.0f, e, L::template each<log_>(u) * e / (u - 1.0f));
        return L::pick(L::is_nan(a), a, L::max(a, L::splat(0.0f)) + tail);
    }
    static interval bounds(interval a) { return detail::increasing(a, [](double v) { return apply(v); }); }
    template <class F> static std::array<F, 1> partials(F x) { return {sigmoid::apply(x)}; }  // d softplus = sigmoid
    static constexpr std::array<std::string_view, 1> glsl_partials{"1.0 / (1.0 + exp(-a))"};
};
// erf on every backend by one formula (GLSL has no erf): below |x| = 0.5 its
// odd Taylor series, so that erf(0) is 0 and small x keep their sign and
// relative precision; above, Abramowitz and Stegun 7.1.26 (absolute error
// 1.5e-7): sign(x) (1 - t (a1 + t (a2 + ...)) e^-x^2), t = 1/(1 + p|x|).
ATTNFUSE_UNARY_FUNCTION(erf_, "erf", "af_erf",
                        "float af_erf(float x) { float a = abs(x); float z = x * x; "
                        "float series = x * (1.1283791671 + z * (-0.3761263890 + z * (0.1128379167 + z * (-0.0268661706 + z * (0.0052239776 + z * -0.0008548327))))); "
                        "float t = 1.0 / (1.0 + 0.3275911 * a); "
                        "float p = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))); "
                        "float y = 1.0 - p * exp(-z); "
                        "return isnan(x) ? x : (a < 0.5 ? series : (x < 0.0 ? -y : y)); }")
    template <class F> static F apply(F x) { using std::erf; return erf(x); }
    template <class L> static typename L::vec lanes(typename L::vec x) {
        using V = typename L::vec;
        const V magnitude = L::pick(x <= 0.0f, 0.0f - x, x);
        const V z = x * x;
        // 2/sqrt(pi) (x - x^3/3 + x^5/10 - x^7/42 + x^9/216 - x^11/1320)
        V series = L::fma(z, L::splat(-0.0008548327f), L::splat(0.0052239776f));
        series = L::fma(z, series, L::splat(-0.0268661706f));
        series = L::fma(z, series, L::splat(0.1128379167f));
        series = L::fma(z, series, L::splat(-0.3761263890f));
        series = L::fma(z, series, L::splat(1.1283791671f)) * x;
        const V t = 1.0f / L::fma(magnitude, L::splat(0.3275911f), L::splat(1.0f));
        V p = L::fma(t, L::splat(1.061405429f), L::splat(-1.453152027f));
        p = L::fma(t, p, L::splat(1.421413741f));
        p = L::fma(t, p, L::splat(-0.284496736f));
        p = L::fma(t, p, L::splat(0.254829592f));
        const V y = 1.0f - t * p * L::exp(-z);
        return L::pick(L::is_nan(x), x, L::pick(magnitude < 0.5f, series, L::pick(x < 0.0f, -y, y)));
    }
    static interval bounds(interval a) { return detail::increasing(a, [](double v) { return std::erf(v); }); }
    template <class F> static std::array<F, 1> partials(F x) { using std::exp; return {F(1.1283791670955126) * exp(-x * x)}; }
    static constexpr std::array<std::string_view, 1> glsl_partials{"1.1283791671 * exp(-a * a)"};
};
#undef ATTNFUSE_UNARY_FUNCTION

// detach(x): x itself, through which no gradient flows (PyTorch's detach,
// JAX's stop_gradient): the backward treats what it reads as a constant,
// as a model does with frozen ALiBi slopes or a fixed bias table.
struct detach {
    static constexpr std::string_view name = "detach";
    static constexpr bool prefix = false;
    static constexpr std::string_view glsl = "af_detach";
    static constexpr bool glsl_infix = false;
    static constexpr std::string_view glsl_definition = "float af_detach(float x) { return x; }";
    template <class F> static constexpr F apply(F x) { return x; }
    template <class L> static typename L::vec lanes(typename L::vec a) { return a; }
    static interval bounds(interval a) { return a; }
    static constexpr std::array<bool, 1> carries_gradient{false};
    template <class F> static constexpr std::array<F, 1> partials(F) { return {F(0)}; }
    static constexpr std::array<std::string_view, 1> glsl_partials{"0.0"};
};

// ---- binary ------------------------------------------------------------
// `symbol` empty means the operation prints as a function call name(a, b);
// Carries is whether a gradient flows to the operands.
#define ATTNFUSE_BINARY(Tag, Name, Symbol, Prec, Glsl, GlslInfix, GlslDefinition, Carries) \
    struct Tag {                                                                 \
        static constexpr std::string_view name = Name;                           \
        static constexpr std::string_view symbol = Symbol;                       \
        static constexpr int prec = Prec;                                        \
        static constexpr std::string_view glsl = Glsl;                           \
        static constexpr bool glsl_infix = GlslInfix;                            \
        static constexpr std::string_view glsl_definition = GlslDefinition;      \
        static constexpr std::array<bool, 2> carries_gradient{Carries, Carries};

ATTNFUSE_BINARY(add, "add", "+", prec_additive, "+", true, "", true)
    template <class F> static constexpr F apply(F a, F b) { return a + b; }
    template <class L> static typename L::vec lanes(typename L::vec a, typename L::vec b) { return a + b; }
    static interval bounds(interval a, interval b) { return detail::checked(a.lo + b.lo, a.hi + b.hi); }
    template <class F> static constexpr std::array<F, 2> partials(F, F) { return {F(1), F(1)}; }
    static constexpr std::array<std::string_view, 2> glsl_partials{"1.0", "1.0"};
};
ATTNFUSE_BINARY(subtract, "subtract", "-", prec_additive, "-", true, "", true)
    template <class F> static constexpr F apply(F a, F b) { return a - b; }
    template <class L> static typename L::vec lanes(typename L::vec a, typename L::vec b) { return a - b; }
    static interval bounds(interval a, interval b) { return detail::checked(a.lo - b.hi, a.hi - b.lo); }
    template <class F> static constexpr std::array<F, 2> partials(F, F) { return {F(1), F(-1)}; }
    static constexpr std::array<std::string_view, 2> glsl_partials{"1.0", "-1.0"};
};
ATTNFUSE_BINARY(multiply, "hadamard", "%", prec_multiplicative, "*", true, "", true)
    template <class F> static constexpr F apply(F a, F b) { return a * b; }
    template <class L> static typename L::vec lanes(typename L::vec a, typename L::vec b) { return a * b; }
    static interval bounds(interval a, interval b) { return detail::product_bounds(a, b); }
    template <class F> static constexpr std::array<F, 2> partials(F a, F b) { return {b, a}; }
    static constexpr std::array<std::string_view, 2> glsl_partials{"b", "a"};
};
ATTNFUSE_BINARY(divide, "divide", "/", prec_multiplicative, "/", true, "", true)
    template <class F> static constexpr F apply(F a, F b) { return a / b; }
    template <class L> static typename L::vec lanes(typename L::vec a, typename L::vec b) { return a / b; }
    static interval bounds(interval a, interval b) {
        if (b.lo > 0 || b.hi < 0) return detail::product_bounds(a, {1 / b.hi, 1 / b.lo});
        return interval::everything();
    }
    template <class F> static constexpr std::array<F, 2> partials(F a, F b) { return {F(1) / b, -a / (b * b)}; }
    static constexpr std::array<std::string_view, 2> glsl_partials{"1.0 / b", "-a / (b * b)"};
};
// max/min propagate NaN from either side, so a NaN input never hides.
ATTNFUSE_BINARY(maximum, "max", "", prec_atom, "af_max", false,
                "float af_max(float a, float b) { return (isnan(a) || isnan(b)) ? a + b : max(a, b); }", true)
    template <class F> static constexpr F apply(F a, F b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }
    template <class L> static typename L::vec lanes(typename L::vec a, typename L::vec b) {
        return L::pick(L::is_nan(a) | L::is_nan(b), a + b, L::max(a, b));
    }
    static interval bounds(interval a, interval b) { return {std::max(a.lo, b.lo), std::max(a.hi, b.hi)}; }
    // the gradient goes to the side taken, to a on a tie (as max's subgradient may)
    template <class F> static constexpr std::array<F, 2> partials(F a, F b) { return b > a ? std::array<F, 2>{F(0), F(1)} : std::array<F, 2>{F(1), F(0)}; }
    static constexpr std::array<std::string_view, 2> glsl_partials{"b > a ? 0.0 : 1.0", "b > a ? 1.0 : 0.0"};
};
ATTNFUSE_BINARY(minimum, "min", "", prec_atom, "af_min", false,
                "float af_min(float a, float b) { return (isnan(a) || isnan(b)) ? a + b : min(a, b); }", true)
    template <class F> static constexpr F apply(F a, F b) { return (a != a || b != b) ? a + b : (a < b ? a : b); }
    template <class L> static typename L::vec lanes(typename L::vec a, typename L::vec b) {
        return L::pick(L::is_nan(a) | L::is_nan(b), a + b, L::min(a, b));
    }
    static interval bounds(interval a, interval b) { return {std::min(a.lo, b.lo), std::min(a.hi, b.hi)}; }
    template <class F> static constexpr std::array<F, 2> partials(F a, F b) { return b < a ? std::array<F, 2>{F(0), F(1)} : std::array<F, 2>{F(1), F(0)}; }
    static constexpr std::array<std::string_view, 2> glsl_partials{"b < a ? 0.0 : 1.0", "b < a ? 1.0 : 0.0"};
};
// Comparisons and logic give 1 or 0.
#define ATTNFUSE_COMPARISON(Tag, Name, Symbol, Prec, Glsl, Test, SurelyTrue, SurelyFalse)                              \
    ATTNFUSE_BINARY(Tag, Name, Symbol, Prec, Glsl, false,                                                               \
                    "float " Glsl "(float a, float b) { return (" #Test ") ? 1.0 : 0.0; }", false)                      \
        template <class F> static constexpr F apply(F a, F b) { return (Test) ? F(1) : F(0); }                           \
        template <class L> static typename L::vec lanes(typename L::vec a, typename L::vec b) { return L::truth(Test); } \
        static interval bounds(interval a, interval b) { return detail::truth(SurelyTrue, SurelyFalse); }               \
        template <class F> static constexpr std::array<F, 2> partials(F, F) { return {F(0), F(0)}; }                     \
        static constexpr std::array<std::string_view, 2> glsl_partials{"0.0", "0.0"};                                   \
    };
ATTNFUSE_COMPARISON(less, "less", "<", prec_relational, "af_lt", a < b, a.hi < b.lo, a.lo >= b.hi)
ATTNFUSE_COMPARISON(less_equal, "less_equal", "<=", prec_relational, "af_le", a <= b, a.hi <= b.lo, a.lo > b.hi)
ATTNFUSE_COMPARISON(greater, "greater", ">", prec_relational, "af_gt", a > b, a.lo > b.hi, a.hi <= b.lo)
ATTNFUSE_COMPARISON(greater_equal, "greater_equal", ">=", prec_relational, "af_ge", a >= b, a.lo >= b.hi, a.hi < b.lo)
ATTNFUSE_COMPARISON(equal, "equal", "==", prec_equality, "af_eq", a == b,
                    a.lo == a.hi && b.lo == b.hi && a.lo == b.lo, a.hi < b.lo || b.hi < a.lo)
ATTNFUSE_COMPARISON(not_equal, "not_equal", "!=", prec_equality, "af_ne", a != b,
                    a.hi < b.lo || b.hi < a.lo, a.lo == a.hi && b.lo == b.hi && a.lo == b.lo)
#undef ATTNFUSE_COMPARISON
ATTNFUSE_BINARY(logical_and, "and", "&&", prec_and, "af_and", false,
                "float af_and(float a, float b) { return (a != 0.0 && b != 0.0) ? 1.0 : 0.0; }", false)
    template <class F> static constexpr F apply(F a, F b) { return (a != F(0) && b != F(0)) ? F(1) : F(0); }
    template <class L> static typename L::vec lanes(typename L::vec a, typename L::vec b) { return L::truth((a != 0.0f) & (b != 0.0f)); }
    static interval bounds(interval a, interval b) {
        return detail::truth(a.surely_nonzero() && b.surely_nonzero(), a.surely_zero() || b.surely_zero());
    }
    template <class F> static constexpr std::array<F, 2> partials(F, F) { return {F(0), F(0)}; }
    static constexpr std::array<std::string_view, 2> glsl_partials{"0.0", "0.0"};
};
ATTNFUSE_BINARY(logical_or, "or", "||", prec_or, "af_or", false,
                "float af_or(float a, float b) { return (a != 0.0 || b != 0.0) ? 1.0 : 0.0; }", false)
    template <class F> static constexpr F apply(F a, F b) { return (a != F(0) || b != F(0)) ? F(1) : F(0); }
    template <class L> static typename L::vec lanes(typename L::vec a, typename L::vec b) { return L::truth((a != 0.0f) | (b != 0.0f)); }
    static interval bounds(interval a, interval b) {
        return detail::truth(a.surely_nonzero() || b.surely_nonzero(), a.surely_zero() && b.surely_zero());
    }
    template <class F> static constexpr std::array<F, 2> partials(F, F) { return {F(0), F(0)}; }
    static constexpr std::array<std::string_view, 2> glsl_partials{"0.0", "0.0"};
};
#undef ATTNFUSE_BINARY

// ---- ternary -----------------------------------------------------------
struct select {
    static constexpr std::string_view name = "where";
    static constexpr std::string_view glsl = "af_select";
    static constexpr bool glsl_infix = false;
    static constexpr std::string_view glsl_definition = "float af_select(float c, float a, float b) { return c != 0.0 ? a : b; }";
    template <class F> static constexpr F apply(F cond, F a, F b) { return cond != F(0) ? a : b; }
    template <class L> static typename L::vec lanes(typename L::vec c, typename L::vec a, typename L::vec b) { return L::pick(c != 0.0f, a, b); }
    static interval bounds(interval c, interval a, interval b) {
        if (c.surely_nonzero()) return a;
        if (c.surely_zero()) return b;
        return detail::hull(a, b);
    }
    static constexpr std::array<bool, 3> carries_gradient{false, true, true};
    template <class F> static constexpr std::array<F, 3> partials(F cond, F, F) {
        return {F(0), cond != F(0) ? F(1) : F(0), cond != F(0) ? F(0) : F(1)};
    }
    static constexpr std::array<std::string_view, 3> glsl_partials{"0.0", "a != 0.0 ? 1.0 : 0.0", "a != 0.0 ? 0.0 : 1.0"};
};

// Every operation above, for the stages that emit a definition of each
// (the GLSL prelude): an operation is added by adding it here too.
template <class... Ops> struct op_list {};
using all = op_list<negate, logical_not, exp_, log_, tanh_, sigmoid, relu, abs_, sqrt_, square, softplus, erf_, detach, add, subtract,
                    multiply, divide, maximum, minimum, less, less_equal, greater, greater_equal, equal, not_equal, logical_and,
                    logical_or, select>;

// ---- dropout's random stream -------------------------------------------
// A counter-based hash of (seed, batch*heads+head, row, column), written in
// 32-bit integer arithmetic that GLSL spells the same way, so every backend
// draws the same mask for one seed. (lowbias32, a well-mixed integer hash.)
constexpr std::uint32_t mix32(std::uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}
constexpr std::uint32_t dropout_bits(std::uint32_t seed, std::uint32_t batch_head, std::uint32_t row, std::uint32_t col) {
    return mix32(seed ^ mix32(batch_head ^ mix32(row ^ mix32(col + 0x9e3779b9U))));
}
// The draw is the hash's top 24 bits; an element is kept when the draw is at
// least the threshold, computed once on the host so that every backend
// compares the same integers: keep rate 1 - p.
constexpr std::uint32_t dropout_threshold(double p) {
    const double scaled = p * 16777216.0;
    auto t = static_cast<std::uint32_t>(scaled);
    return static_cast<double>(t) < scaled ? t + 1 : t;
}
constexpr bool dropout_keeps(std::uint32_t bits, std::uint32_t threshold) { return (bits >> 8) >= threshold; }

}  // namespace attnfuse::op
