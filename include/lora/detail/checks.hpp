// Argument checks shared by the layers: each throws with a message that
// names the argument, the expected shape and the shape that came. They take
// `const char*` and build strings only on failure: they run in every training
// step, which must not allocate.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#error "lora/detail/checks.hpp is internal; include <lora/lora.hpp>"
#endif

#include <lora/errors.hpp>
#include <lora/types.hpp>

#include <cstddef>
#include <functional>
#include <string>

namespace lora::detail {

/// Writes "(N, 1024)" style text where a negative extent means "any".
inline std::string expected_shape(Index rows, Index cols) {
  auto part = [](Index v, const char* any) { return v < 0 ? std::string(any) : std::to_string(v); };
  return '(' + part(rows, "N") + ", " + part(cols, "?") + ')';
}

/// Throws shape_error unless m is (rows, cols); a negative rows accepts any row count.
template <class Derived>
void check_shape(const char* where, const char* name, const Eigen::MatrixBase<Derived>& m, Index rows, Index cols) {
  if ((rows >= 0 && m.rows() != rows) || m.cols() != cols)
    throw shape_error(std::string(where) + ": " + name + " expected shape " + expected_shape(rows, cols) + ", got " +
                      shape_string(m.rows(), m.cols()));
}

/// First and one-past-last byte a (possibly strided) row-major view touches.
template <class Derived>
std::pair<const char*, const char*> byte_span(const Eigen::MatrixBase<Derived>& m) {
  const char* begin = reinterpret_cast<const char*>(m.derived().data());
  if (m.size() == 0) return {begin, begin};
  const Index last = (m.rows() - 1) * m.derived().outerStride() + (m.cols() - 1) * m.derived().innerStride();
  return {begin, begin + (last + 1) * static_cast<Index>(sizeof(typename Derived::Scalar))};
}

/// Whether two views share any byte.
template <class A, class B>
bool overlap(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  const auto x = byte_span(a);
  const auto y = byte_span(b);
  std::less<const char*> lt;
  return lt(x.first, y.second) && lt(y.first, x.second);
}

/// Throws shape_error when an output would overwrite an input it is computed from.
template <class A, class B>
void check_no_overlap(const char* where, const char* out_name, const Eigen::MatrixBase<A>& out, const char* in_name,
                      const Eigen::MatrixBase<B>& in) {
  if (overlap(out, in))
    throw shape_error(std::string(where) + ": " + out_name + " must not overlap " + in_name +
                      " (the output is written while the input is still being read)");
}

}  // namespace lora::detail
