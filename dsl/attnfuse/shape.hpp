// Extents that are known at compile time or only at run time, the broadcast
// rule shared by every elementwise operation, and the run-time shape error.
#pragma once
#include <cstddef>
#include <stdexcept>
#include <string>

namespace attnfuse {

// An extent only known once inputs are bound.
inline constexpr std::size_t dyn = static_cast<std::size_t>(-1);

// A user's shape mistake found at run time. The message names the operand and
// both shapes; internal bugs use other exception types.
class shape_error : public std::invalid_argument {
public:
    using std::invalid_argument::invalid_argument;
};

struct runtime_shape {
    std::size_t rows = 1;
    std::size_t cols = 1;
    friend bool operator==(const runtime_shape&, const runtime_shape&) = default;
};

inline std::string extent_to_string(std::size_t e) { return e == dyn ? std::string("dyn") : std::to_string(e); }

inline std::string shape_to_string(std::size_t rows, std::size_t cols) {
    return extent_to_string(rows) + "x" + extent_to_string(cols);
}
inline std::string shape_to_string(runtime_shape s) { return shape_to_string(s.rows, s.cols); }

namespace detail {

// Two static extents are compatible when equal or when one is 1 (broadcast).
// A dynamic extent is compatible with anything until it is known.
constexpr bool extents_broadcast(std::size_t a, std::size_t b) {
    return a == dyn || b == dyn || a == b || a == 1 || b == 1;
}

constexpr std::size_t broadcast_extent(std::size_t a, std::size_t b) {
    if (a == b) return a;
    if (a == 1) return b;
    if (b == 1) return a;
    if (a == dyn) return b;  // b > 1: a must be 1 or b, either way the result is b
    if (b == dyn) return a;
    return dyn;  // incompatible; callers static_assert before asking
}

constexpr bool extents_agree(std::size_t a, std::size_t b) { return a == dyn || b == dyn || a == b; }

inline std::size_t broadcast_runtime(std::size_t a, std::size_t b, bool& ok) {
    if (a == b || b == 1) return a;
    if (a == 1) return b;
    ok = false;
    return a;
}

}  // namespace detail
}  // namespace attnfuse
