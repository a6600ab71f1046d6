// Binding caller-owned memory to an expression's named inputs, and the
// run-time shape rules every evaluator shares (the reference and both
// backends): shapes of every node, the outer batch and head extents, and the
// errors that name the operand and both shapes.
#pragma once
#include <algorithm>
#include <cstddef>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "expr.hpp"
#include "to_string.hpp"

namespace attnfuse {

// A read-only view of caller-owned memory: `batch` x `heads` matrices of
// rows x cols, at any strides (in elements). Nothing is copied.
template <class Element>
struct tensor_view {
    const Element* data = nullptr;
    std::size_t rows = 0;
    std::size_t cols = 0;
    std::size_t batch = 1;
    std::size_t heads = 1;
    std::ptrdiff_t row_stride = 0;
    std::ptrdiff_t col_stride = 1;
    std::ptrdiff_t batch_stride = 0;
    std::ptrdiff_t head_stride = 0;

    const Element& at(std::size_t b, std::size_t h, std::size_t r, std::size_t c) const {
        return data[static_cast<std::ptrdiff_t>(b) * batch_stride + static_cast<std::ptrdiff_t>(h) * head_stride +
                    static_cast<std::ptrdiff_t>(r) * row_stride + static_cast<std::ptrdiff_t>(c) * col_stride];
    }
};

// Packed rows: element (b, h, r, c) at ((b*heads + h)*rows + r)*cols + c.
template <class Element>
tensor_view<Element> row_major(const Element* data, std::size_t rows, std::size_t cols, std::size_t batch = 1,
                               std::size_t heads = 1) {
    const auto r = static_cast<std::ptrdiff_t>(rows), c = static_cast<std::ptrdiff_t>(cols),
               h = static_cast<std::ptrdiff_t>(heads);
    return {data, rows, cols, batch, heads, c, 1, h * r * c, r * c};
}

// Packed columns: element (r, c) at c*rows + r. A d x n matrix of column
// vectors (the seeds' Q and K) stored this way has the bytes of an n x d
// row-major array (the Transformer paper's Q and K).
template <class Element>
tensor_view<Element> col_major(const Element* data, std::size_t rows, std::size_t cols, std::size_t batch = 1,
                               std::size_t heads = 1) {
    const auto r = static_cast<std::ptrdiff_t>(rows), c = static_cast<std::ptrdiff_t>(cols),
               h = static_cast<std::ptrdiff_t>(heads);
    return {data, rows, cols, batch, heads, 1, r, h * r * c, r * c};
}

// Any layout, every number named (C++20 designated initializers, in this
// order; what is left out of an axis of extent 1 does not matter):
//
//   // the heads of a [batch, n, heads*d] tensor, as d x n matrices, without a copy
//   strided(data, layout{.rows = d, .cols = n, .row_stride = 1, .col_stride = heads * d,
//                        .batch = batch, .heads = heads, .batch_stride = n * heads * d, .head_stride = d})
//
// A stride an axis of more than one element needs but the layout leaves
// out is a shape_error naming it, never a silent broadcast of element 0.
struct layout {
    static constexpr std::ptrdiff_t unset = std::numeric_limits<std::ptrdiff_t>::min();
    std::size_t rows = 0, cols = 0;
    std::ptrdiff_t row_stride = unset, col_stride = unset;  // in elements
    std::size_t batch = 1, heads = 1;
    std::ptrdiff_t batch_stride = unset, head_stride = unset;
};

template <class Element>
tensor_view<Element> strided(const Element* data, const layout& l) {
    auto stride = [](std::size_t extent, std::ptrdiff_t s, const char* name) -> std::ptrdiff_t {
        if (s != layout::unset) return s;
        if (extent > 1)
            throw shape_error(std::string("strided(data, layout): the layout has ") + std::to_string(extent) + " " + name +
                              "s but no " + name + "_stride; give ." + name + "_stride");
        return 0;
    };
    return {data, l.rows, l.cols, l.batch, l.heads, stride(l.rows, l.row_stride, "row"), stride(l.cols, l.col_stride, "col"),
            stride(l.batch, l.batch_stride, "batch"), stride(l.heads, l.head_stride, "head")};
}

// The same with positional numbers (rows, cols, row_stride, col_stride,
// batch, heads, batch_stride, head_stride); prefer the layout above, which
// names each.
template <class Element>
tensor_view<Element> strided(const Element* data, std::size_t rows, std::size_t cols, std::ptrdiff_t row_stride,
                             std::ptrdiff_t col_stride, std::size_t batch = 1, std::size_t heads = 1,
                             std::ptrdiff_t batch_stride = 0, std::ptrdiff_t head_stride = 0) {
    return {data, rows, cols, batch, heads, row_stride, col_stride, batch_stride, head_stride};
}

// An owning result of any backend: batch x heads matrices of rows x cols,
// row-major.
struct tensor {
    std::size_t batch = 0, heads = 0, rows = 0, cols = 0;
    std::vector<float> values;
    float at(std::size_t b, std::size_t h, std::size_t r, std::size_t c) const {
        return values[((b * heads + h) * rows + r) * cols + c];
    }
};

// Caller-owned memory a run writes its result into, as stored: float, half
// or bfloat16 (rounded to nearest, ties to even), at any strides, like
// tensor_view but writable. run_into on each backend takes one.
template <class Element>
struct output_view {
    Element* data = nullptr;
    std::size_t rows = 0;
    std::size_t cols = 0;
    std::size_t batch = 1;
    std::size_t heads = 1;
    std::ptrdiff_t row_stride = 0;
    std::ptrdiff_t col_stride = 1;
    std::ptrdiff_t batch_stride = 0;
    std::ptrdiff_t head_stride = 0;

    Element& at(std::size_t b, std::size_t h, std::size_t r, std::size_t c) const {
        return data[static_cast<std::ptrdiff_t>(b) * batch_stride + static_cast<std::ptrdiff_t>(h) * head_stride +
                    static_cast<std::ptrdiff_t>(r) * row_stride + static_cast<std::ptrdiff_t>(c) * col_stride];
    }
    tensor_view<Element> as_input() const {
        return {data, rows, cols, batch, heads, row_stride, col_stride, batch_stride, head_stride};
    }
};

// Packed rows, as row_major; any layout, as strided.
template <class Element>
output_view<Element> output_row_major(Element* data, std::size_t rows, std::size_t cols, std::size_t batch = 1,
                                      std::size_t heads = 1) {
    const tensor_view<Element> v = row_major(static_cast<const Element*>(data), rows, cols, batch, heads);
    return {data, v.rows, v.cols, v.batch, v.heads, v.row_stride, v.col_stride, v.batch_stride, v.head_stride};
}
template <class Element>
output_view<Element> output_strided(Element* data, const layout& l) {
    const tensor_view<Element> v = strided(static_cast<const Element*>(data), l);
    return {data, v.rows, v.cols, v.batch, v.heads, v.row_stride, v.col_stride, v.batch_stride, v.head_stride};
}

// The lowest and highest element offsets a view reaches from its data
// pointer, and how many elements lie between them. An axis of extent 1
// reaches nothing, whatever its stride. Throws shape_error, naming `name`,
// when the arithmetic would overflow or the span exceeds what an address can
// hold: a stride of 2^62 over two rows is an error, never a wrapped span.
struct element_span {
    std::ptrdiff_t low = 0, high = 0;
    std::size_t count() const { return static_cast<std::size_t>(high - low) + 1; }
};
template <class Element>
element_span checked_span(const tensor_view<Element>& v, const std::string& name) {
    const std::size_t extents[4] = {v.rows, v.cols, v.batch, v.heads};
    const std::ptrdiff_t strides[4] = {v.row_stride, v.col_stride, v.batch_stride, v.head_stride};
    const char* axes[4] = {"row", "column", "batch", "head"};
    constexpr std::ptrdiff_t limit = std::numeric_limits<std::ptrdiff_t>::max() / static_cast<std::ptrdiff_t>(sizeof(Element));
    element_span span;
    for (int a = 0; a < 4; ++a) {
        if (extents[a] <= 1) continue;
        std::ptrdiff_t reach = 0, width = 0;
        const bool overflow = extents[a] - 1 > static_cast<std::size_t>(limit) ||
                              __builtin_mul_overflow(static_cast<std::ptrdiff_t>(extents[a] - 1), strides[a], &reach) ||
                              (reach < 0 ? __builtin_add_overflow(span.low, reach, &span.low) : __builtin_add_overflow(span.high, reach, &span.high)) ||
                              __builtin_sub_overflow(span.high, span.low, &width) || width >= limit;
        if (overflow)
            throw shape_error((name == "output" ? name : "input " + name) + ": " + axes[a] + " stride " + std::to_string(strides[a]) + " over " +
                              std::to_string(extents[a]) + " " + axes[a] + "s reaches past what an address can hold (" +
                              std::to_string(v.batch) + " batch x " + std::to_string(v.heads) + " heads of " +
                              shape_to_string(v.rows, v.cols) + ")");
    }
    return span;
}

// A run's output memory against the result's shape: a null pointer, other
// extents or a span past what an address holds are shape_errors naming
// "output" and both shapes.
template <class Element>
void check_output(const output_view<Element>& out, std::size_t batch, std::size_t heads, std::size_t rows, std::size_t cols) {
    const auto extents = [](std::size_t b, std::size_t h, std::size_t r, std::size_t c) {
        return std::to_string(b) + " batch x " + std::to_string(h) + " heads of " + shape_to_string(r, c);
    };
    if (out.data == nullptr) throw shape_error("output: a null pointer");
    if (out.batch != batch || out.heads != heads || out.rows != rows || out.cols != cols)
        throw shape_error("output: the expression gives " + extents(batch, heads, rows, cols) + " but the output is " +
                          extents(out.batch, out.heads, out.rows, out.cols) + "; give an output of the result's shape");
    (void)checked_span(out.as_input(), "output");
}

// Writes an fp32 result (any strides) into an output, each value rounded
// to the output's element.
template <class Element>
void store_into(const tensor_view<float>& result, const output_view<Element>& out) {
    for (std::size_t b = 0; b < out.batch; ++b)
        for (std::size_t h = 0; h < out.heads; ++h)
            for (std::size_t r = 0; r < out.rows; ++r)
                for (std::size_t c = 0; c < out.cols; ++c) out.at(b, h, r, c) = from_float<Element>(result.at(b, h, r, c));
}

template <fixed_string Name, class Element>
struct binding {
    static constexpr auto name = Name;
    tensor_view<Element> view;
    // The values behind `view` when the binding made them (from integers,
    // or widened from a narrower element); empty when the view is the
    // caller's memory.
    std::shared_ptr<const std::vector<Element>> owned = {};
    // The element the caller stored, when `owned` holds it widened to fp32
    // (widened() below); empty otherwise.
    std::string_view widened_from = {};
};

template <class X> struct is_binding : std::false_type {};
template <fixed_string N, class El> struct is_binding<binding<N, El>> : std::true_type {};
template <class X>
concept a_binding = is_binding<std::remove_cvref_t<X>>::value;

// The extents an input is bound with, from a binding of any kind: a host
// binding's view, or the shape_view() a backend's own binding (of device
// memory, say) gives of itself.
struct bound_shape {
    std::size_t batch = 1, heads = 1, rows = 0, cols = 0;
};
template <class B>
bound_shape shape_of_binding(const B& b) {
    if constexpr (requires { b.view.batch; }) {
        return {b.view.batch, b.view.heads, b.view.rows, b.view.cols};
    } else {
        const auto v = b.shape_view();
        return {v.batch, v.heads, v.rows, v.cols};
    }
}

// bind(Q, view): checks the view against Q's declared static shape.
template <fixed_string Name, std::size_t R, std::size_t C, class El>
binding<Name, El> bind(const matrix<Name, R, C, El>&, tensor_view<El> view) {
    auto fail = [&](const std::string& why) {
        throw shape_error("input " + std::string(Name.view()) + ": " + why);
    };
    if (view.data == nullptr) fail("bound to a null pointer");
    if (view.rows == 0 || view.cols == 0 || view.batch == 0 || view.heads == 0)
        fail("bound with an empty extent (" + std::to_string(view.batch) + " batch x " + std::to_string(view.heads) +
             " heads of " + shape_to_string(view.rows, view.cols) + ")");
    if ((R != dyn && R != view.rows) || (C != dyn && C != view.cols))
        fail("declared " + shape_to_string(R, C) + " but bound to " + shape_to_string(view.rows, view.cols));
    (void)checked_span(view, std::string(Name.view()));
    return {view};
}
template <fixed_string Name, std::size_t R, std::size_t C, class El>
binding<Name, El> bind(const matrix<Name, R, C, El>& m, const El* data, std::size_t rows, std::size_t cols,
                       std::size_t batch = 1, std::size_t heads = 1) {
    return bind(m, row_major(data, rows, cols, batch, heads));
}

namespace detail {

// A view's values as floats, row-major, for a binding to own: each made by
// convert(value, batch, head, row, col), which may throw naming where.
template <class El, class Convert>
std::shared_ptr<const std::vector<float>> floats_of(const tensor_view<El>& v, const Convert& convert) {
    auto values = std::make_shared<std::vector<float>>();
    values->reserve(v.batch * v.heads * v.rows * v.cols);
    for (std::size_t b = 0; b < v.batch; ++b)
        for (std::size_t h = 0; h < v.heads; ++h)
            for (std::size_t r = 0; r < v.rows; ++r)
                for (std::size_t c = 0; c < v.cols; ++c) values->push_back(convert(v.at(b, h, r, c), b, h, r, c));
    return values;
}

}  // namespace detail

// An integer array for a float input (key and query lengths, positions, as
// a model keeps them): read once into floats, which the binding owns, so the
// integers may go away after bind. Every value must be exact as a float
// (|v| <= 2^24); a larger one is an error naming the input, the value and
// where it is, never a rounded length.
template <fixed_string Name, std::size_t R, std::size_t C, class Int>
    requires std::is_integral_v<Int> && (!std::is_same_v<Int, bool>)
binding<Name, float> bind(const matrix<Name, R, C, float>& m, tensor_view<Int> ints) {
    const std::string name(Name.view());
    if (ints.data == nullptr) throw shape_error("input " + name + ": bound to a null pointer");
    (void)checked_span(ints, name);
    const auto values = detail::floats_of(ints, [&](Int v, std::size_t b, std::size_t h, std::size_t r, std::size_t c) {
        constexpr long double exact = 16777216.0L;  // 2^24
        if (static_cast<long double>(v) > exact || static_cast<long double>(v) < -exact)
            throw shape_error("input " + name + ": the integer " + std::to_string(v) + " at (batch " + std::to_string(b) + ", head " +
                              std::to_string(h) + ", " + std::to_string(r) + ", " + std::to_string(c) +
                              ") is not exact as a float (|v| > 2^24)");
        return static_cast<float>(v);
    });
    binding<Name, float> bound = bind(m, row_major(static_cast<const float*>(values->data()), ints.rows, ints.cols, ints.batch, ints.heads));
    bound.owned = values;
    return bound;
}
template <fixed_string Name, std::size_t R, std::size_t C, class Int>
    requires std::is_integral_v<Int> && (!std::is_same_v<Int, bool>)
binding<Name, float> bind(const matrix<Name, R, C, float>& m, const Int* data, std::size_t rows, std::size_t cols,
                          std::size_t batch = 1, std::size_t heads = 1) {
    return bind(m, row_major(data, rows, cols, batch, heads));
}

// The same input widened to fp32, once, into memory the binding owns: the
// values are exact (every half and bfloat16 is a float), laid out row-major.
// The lowering calls it for an element the backend's kernels do not read.
template <fixed_string Name, class El>
binding<Name, float> widened(const binding<Name, El>& b) {
    const tensor_view<El>& v = b.view;
    const auto values = detail::floats_of(v, [](El x, auto...) { return to_float(x); });
    binding<Name, float> wide{row_major(static_cast<const float*>(values->data()), v.rows, v.cols, v.batch, v.heads)};
    wide.owned = values;
    wide.widened_from = element<El>::name;
    return wide;
}

namespace detail {

template <fixed_string Name, class Tuple, std::size_t I = 0>
constexpr std::size_t binding_index() {
    if constexpr (I == std::tuple_size_v<Tuple>) return I;
    else if constexpr (std::tuple_element_t<I, Tuple>::name == Name) return I;
    else return binding_index<Name, Tuple, I + 1>();
}

}  // namespace detail

namespace check {
template <fixed_string input_name, bool bound>
constexpr void input_bound() {
    static_assert(bound, "attnfuse: an input of the expression has no binding (its name is the input_name in this "
                         "instantiation). Fix: pass bind(X, view) for every named input.");
}
template <class E>
constexpr void no_pending_transpose() {
    static_assert(!holds_marker_v<E>,
                  "attnfuse: the expression holds a `T` that no `X^T` consumed (as in `auto s = T*K;`). "
                  "Write the whole `Q^T*K`, or transpose(Q)*K.");
}
}  // namespace check

// The bound inputs of one evaluation, found by name at compile time.
template <class... Bindings>
struct environment {
    std::tuple<Bindings...> bindings;
    std::size_t batch = 1;  // outer extents every expression broadcasts over
    // The heads of what is being evaluated: the bound heads, except outside
    // every concat_heads of an expression, where it is 1 (settle_heads).
    std::size_t heads = 1;
    std::size_t bound_heads = 1;  // the most heads an input is bound with: what concat_heads sets side by side

    explicit environment(Bindings... bs) : bindings(std::move(bs)...) {
        std::apply([&](const auto&... b) { ((batch = std::max(batch, b.view.batch)), ...); }, bindings);
        std::apply([&](const auto&... b) { ((heads = std::max(heads, b.view.heads)), ...); }, bindings);
        bound_heads = heads;
        std::apply([&](const auto&... b) { (check_outer(b), ...); }, bindings);
    }

    template <fixed_string Name>
    const auto& view() const {
        constexpr std::size_t index = detail::binding_index<Name, std::tuple<Bindings...>>();
        check::input_bound<Name, index < sizeof...(Bindings)>();
        if constexpr (index < sizeof...(Bindings)) return (std::get<index>(bindings).view);
        else return unbound_view_;
    }

    // Which of an input's own batch entries and heads serves output (b, h):
    // an extent of 1 broadcasts; fewer heads than the output are shared by
    // consecutive groups of query heads (grouped- and multi-query attention).
    template <class El>
    std::size_t source_batch(const tensor_view<El>& v, std::size_t b) const { return v.batch == 1 ? 0 : b; }
    template <class El>
    std::size_t source_head(const tensor_view<El>& v, std::size_t h) const { return h / (heads / v.heads); }

private:
    tensor_view<float> unbound_view_{};  // only named after a failed input_bound check

    template <class B>
    void check_outer(const B& b) const {
        const std::string name(B::name.view());
        if (b.view.batch != 1 && b.view.batch != batch)
            throw shape_error("input " + name + ": batch extent " + std::to_string(b.view.batch) +
                              " does not broadcast against " + std::to_string(batch) + " (must be 1 or " +
                              std::to_string(batch) + ")");
        if (heads % b.view.heads != 0)
            throw shape_error("input " + name + ": " + std::to_string(b.view.heads) + " heads do not divide the " +
                              std::to_string(heads) + " heads of the other inputs (grouped heads must divide evenly)");
    }
};

namespace detail {

[[noreturn]] inline void throw_operand_mismatch(const std::string& what, const std::string& whole,
                                                const std::string& left, runtime_shape ls, const std::string& right,
                                                runtime_shape rs, const std::string& rule) {
    throw shape_error(what + " in `" + whole + "`: left operand `" + left + "` is " + shape_to_string(ls) +
                      ", right operand `" + right + "` is " + shape_to_string(rs) + "; " + rule);
}

}  // namespace detail

// Run-time shape of any node under an environment; throws shape_error.
template <class E, class Env>
runtime_shape shape_of(const E& e, const Env& env);

// Calls f(input) for every input e reads outside its concat_heads nodes.
template <class E, class F>
void for_each_input_outside_concat_heads(const E& e, const F& f) {
    if constexpr (is_input_v<E>) f(e);
    else if constexpr (is_node_v<E> && !has_kind_v<E, kind::concat_heads>)
        std::apply([&](const auto&... kids) { (for_each_input_outside_concat_heads(kids, f), ...); }, e.kids);
}

// Calls f(input) for every input e reads inside its concat_heads nodes.
template <class E, class F>
void for_each_input_inside_concat_heads(const E& e, const F& f, bool inside = false) {
    if constexpr (is_input_v<E>) {
        if (inside) f(e);
    } else if constexpr (is_node_v<E>) {
        const bool below = inside || has_kind_v<E, kind::concat_heads>;
        std::apply([&](const auto&... kids) { (for_each_input_inside_concat_heads(kids, f, below), ...); }, e.kids);
    }
}

// Every evaluator calls this once, before evaluating e: an expression holding
// concat_heads has one head per batch entry outside it (env.heads = 1), and
// an input read there must be bound with one head, else it is a shape_error
// naming it (which of its heads would serve the single one?). The heads set
// side by side are those of the inputs read inside (a binding the expression
// does not read changes nothing).
template <class E, class Env>
void settle_heads(const E& e, Env& env) {
    if constexpr (holds_concat_heads_v<E>) {
        std::size_t inside = 1;
        for_each_input_inside_concat_heads(e, [&](const auto& input) {
            inside = std::max(inside, env.template view<std::remove_cvref_t<decltype(input)>::name>().heads);
        });
        for_each_input_inside_concat_heads(e, [&](const auto& input) {
            using Input = std::remove_cvref_t<decltype(input)>;
            const std::size_t heads = env.template view<Input::name>().heads;
            if (inside % heads != 0)
                throw shape_error("input " + std::string(Input::name.view()) + ": " + std::to_string(heads) + " heads do not divide the " +
                                  std::to_string(inside) + " heads of the other inputs inside concat_heads (grouped heads must divide evenly)");
        });
        env.bound_heads = inside;
        for_each_input_outside_concat_heads(e, [&](const auto& input) {
            using Input = std::remove_cvref_t<decltype(input)>;
            const auto& v = env.template view<Input::name>();
            if (v.heads != 1)
                throw shape_error("input " + std::string(Input::name.view()) + ": bound with " + std::to_string(v.heads) +
                                  " heads but read outside concat_heads in `" + to_string(e) +
                                  "`, where there is one head per batch entry. Fix: bind it with heads = 1, or use it inside concat_heads");
        });
        env.heads = 1;
    }
}

// The inner extent of the first matrix product in e, depth first: the d_k of
// scale(e).
template <class E, class Env>
std::size_t inner_extent(const E& e, const Env& env) {
    if constexpr (has_kind_v<E, kind::product>) {
        return shape_of(e.template kid<0>(), env).cols;
    } else if constexpr (is_node_v<E>) {
        std::size_t found = 0;
        std::apply([&](const auto&... kids) { ((found = found ? found : inner_extent(kids, env)), ...); }, e.kids);
        return found;
    } else {
        return 0;
    }
}

template <class E, class Env>
runtime_shape shape_of(const E& e, const Env& env) {
    if constexpr (is_input_v<E>) {
        const auto& v = env.template view<E::name>();
        return {v.rows, v.cols};
    } else if constexpr (!is_node_v<E>) {
        return {1, 1};
    } else if constexpr (has_kind_template<E, kind::elementwise>::value) {
        runtime_shape result{1, 1};
        bool first = true;
        std::apply(
            [&](const auto&... kids) {
                auto merge = [&](const auto& kid) {
                    const runtime_shape s = shape_of(kid, env);
                    if (first) {
                        result = s;
                        first = false;
                        return;
                    }
                    bool ok = true;
                    runtime_shape merged{detail::broadcast_runtime(result.rows, s.rows, ok),
                                         detail::broadcast_runtime(result.cols, s.cols, ok)};
                    if (!ok)
                        throw shape_error("elementwise " + std::string(E::kind_type::op::name) + " in `" +
                                          to_string(e) + "`: operand `" + to_string(kid) + "` is " +
                                          shape_to_string(s) + " but the operands before it are " +
                                          shape_to_string(result) + "; extents must be equal or 1 to broadcast");
                    result = merged;
                };
                (merge(kids), ...);
            },
            e.kids);
        return result;
    } else if constexpr (has_kind_v<E, kind::product>) {
        const auto& a = e.template kid<0>();
        const auto& b = e.template kid<1>();
        const runtime_shape as = shape_of(a, env), bs = shape_of(b, env);
        if (as.cols != bs.rows)
            detail::throw_operand_mismatch("matrix product", to_string(e), to_string(a), as, to_string(b), bs,
                                           "columns of the left must equal rows of the right");
        return {as.rows, bs.cols};
    } else if constexpr (has_kind_v<E, kind::transpose>) {
        const runtime_shape s = shape_of(e.template kid<0>(), env);
        return {s.cols, s.rows};
    } else if constexpr (has_kind_v<E, kind::concat_heads>) {
        const runtime_shape s = shape_of(e.template kid<0>(), env);
        return {s.rows, s.cols * env.bound_heads};
    } else if constexpr (has_kind_template<E, kind::reduce_along_rows>::value) {
        return {shape_of(e.template kid<0>(), env).rows, 1};
    } else if constexpr (has_kind_template<E, kind::reduce_along_cols>::value) {
        return {1, shape_of(e.template kid<0>(), env).cols};
    } else if constexpr (has_kind_template<E, kind::pairwise>::value) {
        const runtime_shape w = shape_of(e.template kid<0>(), env), q = shape_of(e.template kid<1>(), env),
                            k = shape_of(e.template kid<2>(), env);
        if (q.rows != k.rows)
            detail::throw_operand_mismatch("pairwise score", to_string(e), to_string(e.template kid<1>()), q,
                                           to_string(e.template kid<2>()), k,
                                           "query and key features need the same number of rows d_a");
        if (w.rows != q.rows || w.cols != 1)
            throw shape_error("pairwise score in `" + to_string(e) + "`: weight `" + to_string(e.template kid<0>()) +
                              "` is " + shape_to_string(w) + " but must be " + shape_to_string(q.rows, 1) +
                              " (one weight per feature row)");
        return {q.cols, k.cols};
    } else if constexpr (has_kind_v<E, kind::lookup>) {
        const runtime_shape t = shape_of(e.template kid<0>(), env);
        if (t.rows != 1 && t.cols != 1)
            throw shape_error("table lookup `" + to_string(e) + "`: table `" + to_string(e.template kid<0>()) +
                              "` is " + shape_to_string(t) + " but must be one row or one column");
        return shape_of(e.template kid<1>(), env);
    } else {
        return shape_of(e.template kid<0>(), env);  // kinds that keep their operand's shape
    }
}

}  // namespace attnfuse
