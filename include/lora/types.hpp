// Matrix types and shape letters used by every header of the library.
//
// Shapes follow PyTorch and PEFT exactly:
//   N rows (batch), I in_features, O out_features, R rank,
//   x (N, I), W (O, I), b (O), A (R, I), B (O, R), y (N, O).
// Storage is row-major, so a buffer written by PyTorch or read from a
// safetensors file maps onto these types without a copy.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <sstream>
#include <string>

namespace lora {

using Index = Eigen::Index;

/// The one matrix type of the library: dynamic size, row-major.
template <class Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A row vector, used for the bias `b (O)` so that `y.rowwise() += b` needs no transpose.
template <class Scalar>
using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic, Eigen::RowMajor>;

/// Flat parameter / gradient storage.
template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

template <class Scalar>
using MatrixMap = Eigen::Map<Matrix<Scalar>>;
template <class Scalar>
using ConstMatrixMap = Eigen::Map<const Matrix<Scalar>>;

/// Read-only view of any row-major matrix argument (a Matrix, a Map, a block of rows).
template <class Scalar>
using ConstRef = Eigen::Ref<const Matrix<Scalar>>;
/// Writable view of an output argument; its shape must already be right.
template <class Scalar>
using MutRef = Eigen::Ref<Matrix<Scalar>>;

/// "(rows, cols)", the way every error message writes a shape.
inline std::string shape_string(Index rows, Index cols) {
  std::ostringstream s;
  s << '(' << rows << ", " << cols << ')';
  return s.str();
}

}  // namespace lora
