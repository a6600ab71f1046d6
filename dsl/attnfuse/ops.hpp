// One functor per elementwise operation, carrying every face a backend needs:
// the scalar form (`apply`, templated so the reference runs it in double and
// the CPU in float), its spelling in formulas (`name`, `symbol`, precedence)
// and its GLSL spelling (`glsl`: a function name, or an infix operator).
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>

namespace attnfuse::op {

// Precedence used when printing formulas; higher binds tighter.
enum precedence : int { prec_or = 1, prec_and, prec_equality, prec_relational, prec_additive, prec_multiplicative, prec_unary, prec_atom };

// ---- unary -------------------------------------------------------------
struct negate {
    static constexpr std::string_view name = "-";
    static constexpr bool prefix = true;
    static constexpr std::string_view glsl = "-";
    template <class F> static constexpr F apply(F x) { return -x; }
};
struct logical_not {
    static constexpr std::string_view name = "!";
    static constexpr bool prefix = true;
    static constexpr std::string_view glsl = "af_not";
    template <class F> static constexpr F apply(F x) { return x != F(0) ? F(0) : F(1); }
};
#define ATTNFUSE_UNARY_FUNCTION(Tag, Name, Glsl, Body)                    \
    struct Tag {                                                          \
        static constexpr std::string_view name = Name;                    \
        static constexpr bool prefix = false;                             \
        static constexpr std::string_view glsl = Glsl;                    \
        template <class F> static F apply(F x) { using std::exp, std::log, std::tanh, std::abs, std::sqrt; Body } \
    };
ATTNFUSE_UNARY_FUNCTION(exp_, "exp", "exp", return exp(x);)
ATTNFUSE_UNARY_FUNCTION(log_, "log", "log", return log(x);)
ATTNFUSE_UNARY_FUNCTION(tanh_, "tanh", "af_tanh", return tanh(x);)
ATTNFUSE_UNARY_FUNCTION(sigmoid, "sigmoid", "af_sigmoid", return F(1) / (F(1) + exp(-x));)
ATTNFUSE_UNARY_FUNCTION(relu, "relu", "af_relu", return x > F(0) ? x : F(0);)
ATTNFUSE_UNARY_FUNCTION(abs_, "abs", "abs", return abs(x);)
ATTNFUSE_UNARY_FUNCTION(sqrt_, "sqrt", "sqrt", return sqrt(x);)
ATTNFUSE_UNARY_FUNCTION(square, "square", "af_square", return x * x;)
#undef ATTNFUSE_UNARY_FUNCTION

// ---- binary ------------------------------------------------------------
// `symbol` empty means the operation prints as a function call name(a, b).
#define ATTNFUSE_BINARY(Tag, Name, Symbol, Prec, Glsl, Body)              \
    struct Tag {                                                          \
        static constexpr std::string_view name = Name;                    \
        static constexpr std::string_view symbol = Symbol;                \
        static constexpr int prec = Prec;                                 \
        static constexpr std::string_view glsl = Glsl;                    \
        template <class F> static constexpr F apply(F a, F b) { Body }    \
    };
ATTNFUSE_BINARY(add, "add", "+", prec_additive, "+", return a + b;)
ATTNFUSE_BINARY(subtract, "subtract", "-", prec_additive, "-", return a - b;)
ATTNFUSE_BINARY(multiply, "hadamard", "%", prec_multiplicative, "*", return a * b;)
ATTNFUSE_BINARY(divide, "divide", "/", prec_multiplicative, "/", return a / b;)
// max/min propagate NaN from either side, so a NaN input never hides.
ATTNFUSE_BINARY(maximum, "max", "", prec_atom, "af_max", return (a != a || b != b) ? a + b : (a > b ? a : b);)
ATTNFUSE_BINARY(minimum, "min", "", prec_atom, "af_min", return (a != a || b != b) ? a + b : (a < b ? a : b);)
ATTNFUSE_BINARY(less, "less", "<", prec_relational, "af_lt", return a < b ? F(1) : F(0);)
ATTNFUSE_BINARY(less_equal, "less_equal", "<=", prec_relational, "af_le", return a <= b ? F(1) : F(0);)
ATTNFUSE_BINARY(greater, "greater", ">", prec_relational, "af_gt", return a > b ? F(1) : F(0);)
ATTNFUSE_BINARY(greater_equal, "greater_equal", ">=", prec_relational, "af_ge", return a >= b ? F(1) : F(0);)
ATTNFUSE_BINARY(equal, "equal", "==", prec_equality, "af_eq", return a == b ? F(1) : F(0);)
ATTNFUSE_BINARY(not_equal, "not_equal", "!=", prec_equality, "af_ne", return a != b ? F(1) : F(0);)
ATTNFUSE_BINARY(logical_and, "and", "&&", prec_and, "af_and", return (a != F(0) && b != F(0)) ? F(1) : F(0);)
ATTNFUSE_BINARY(logical_or, "or", "||", prec_or, "af_or", return (a != F(0) || b != F(0)) ? F(1) : F(0);)
#undef ATTNFUSE_BINARY

// ---- ternary -----------------------------------------------------------
struct select {
    static constexpr std::string_view name = "where";
    static constexpr std::string_view glsl = "af_select";
    template <class F> static constexpr F apply(F cond, F a, F b) { return cond != F(0) ? a : b; }
};

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
