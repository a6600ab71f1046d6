// The attnfuse DSL: expressions, their printing, bindings and the
// double-precision reference evaluator and its backward pass. No backend code.
#pragma once
#include "expr.hpp"       // IWYU pragma: export
#include "to_string.hpp"  // IWYU pragma: export
#include "bind.hpp"       // IWYU pragma: export
#include "reference.hpp"  // IWYU pragma: export
#include "reference_backward.hpp"  // IWYU pragma: export
