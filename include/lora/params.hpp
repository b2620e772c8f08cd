// Parameter handles and accounting.
//
// A Parameter is a view of one trainable tensor and its gradient; optimizers
// and gradient clipping work on lists of them and size their state by them.
// Frozen weights are never handed out as Parameters and have no gradient.
#pragma once

#include <lora/types.hpp>

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lora {

template <class Scalar>
struct Parameter {
  // Built as {name, value, grad, rows, cols}; the group fields start at their defaults.
  Parameter(std::string name_, Scalar* value_, Scalar* grad_, Index rows_, Index cols_)
      : name(std::move(name_)), value(value_), grad(grad_), rows(rows_), cols(cols_) {}

  std::string name;  ///< "lora_A", "lora_B" or "bias" (a model prefixes the layer's path)
  Scalar* value;     ///< row-major (rows, cols), contiguous
  Scalar* grad;      ///< same layout as value; backward adds into it
  Index rows;
  Index cols;
  /// Its parameter group (PyTorch's param_groups, as LoRA+ makes them: lora::loraplus_groups): its learning rate
  /// is the optimizer's lr times lr_scale, and its weight decay this value instead of the optimizer's when set.
  /// Optimizer schedules set the optimizer's lr, so every group keeps its ratio to it, as LambdaLR keeps each
  /// group's ratio to its initial lr.
  double lr_scale = 1;
  std::optional<double> weight_decay;
  Index size() const { return rows * cols; }
  MatrixMap<Scalar> value_matrix() const { return MatrixMap<Scalar>(value, rows, cols); }
  MatrixMap<Scalar> grad_matrix() const { return MatrixMap<Scalar>(grad, rows, cols); }
};

template <class Scalar>
using ParameterList = std::vector<Parameter<Scalar>>;

/// Trainable and frozen scalar counts of a layer or a model.
struct ParameterCount {
  Index trainable = 0;
  Index frozen = 0;
  Index total() const { return trainable + frozen; }
  ParameterCount& operator+=(const ParameterCount& o) {
    trainable += o.trainable;
    frozen += o.frozen;
    return *this;
  }
};

/// 1234567 -> "1,234,567".
inline std::string with_thousands(std::uint64_t v) {
  const std::string digits = std::to_string(v);
  std::string out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}
inline std::string with_thousands(Index v) {
  const auto magnitude = v < 0 ? 0 - static_cast<std::uint64_t>(v) : static_cast<std::uint64_t>(v);
  return v < 0 ? '-' + with_thousands(magnitude) : with_thousands(magnitude);
}

/// PEFT's print_trainable_parameters() line:
/// "trainable params: 16,384 || all params: 1,064,960 || trainable%: 1.5385".
inline std::string trainable_summary(const ParameterCount& c) {
  char pct[32];
  std::snprintf(pct, sizeof pct, "%.4f",
                c.total() == 0 ? 0.0 : 100.0 * static_cast<double>(c.trainable) / static_cast<double>(c.total()));
  return "trainable params: " + with_thousands(c.trainable) + " || all params: " + with_thousands(c.total()) +
         " || trainable%: " + pct;
}

}  // namespace lora
