// Elementwise activations with hand-written backward.
//
//   x (N, C) -> y (N, C); backward: dy (N, C) -> dx (N, C), needs the forward's x.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/detail/checks.hpp>
#include <lora/types.hpp>

#include <cmath>

namespace lora {

/// y = max(x, 0)
struct ReLU {
  static constexpr const char* name = "ReLU";

  template <class Scalar>
  static void forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) {
    detail::check_shape("ReLU::forward", "y", y, x.rows(), x.cols());
    y = x.cwiseMax(Scalar(0));
  }

  template <class Scalar>
  static void backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy, MutRef<Scalar> dx) {
    detail::check_shape("ReLU::backward", "dy", dy, x.rows(), x.cols());
    detail::check_shape("ReLU::backward", "dx", dx, x.rows(), x.cols());
    // forward: y = max(x, 0), so dx = dy where x > 0, else 0
    dx = (x.array() > Scalar(0)).select(dy, Scalar(0));
  }
};

/// GELU, tanh form (torch.nn.GELU(approximate="tanh"), GPT-2's "gelu_new"):
/// y = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x³)
struct GELU {
  static constexpr const char* name = "GELU";

  template <class Scalar>
  static Scalar value(Scalar x) {
    const Scalar u = kC<Scalar> * (x + Scalar(0.044715) * x * x * x);
    return Scalar(0.5) * x * (Scalar(1) + std::tanh(u));
  }

  /// dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh² u) · sqrt(2/pi) (1 + 3 · 0.044715 x²)
  template <class Scalar>
  static Scalar derivative(Scalar x) {
    const Scalar u = kC<Scalar> * (x + Scalar(0.044715) * x * x * x);
    const Scalar t = std::tanh(u);
    return Scalar(0.5) * (Scalar(1) + t) +
           Scalar(0.5) * x * (Scalar(1) - t * t) * kC<Scalar> * (Scalar(1) + Scalar(3 * 0.044715) * x * x);
  }

  template <class Scalar>
  static void forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) {
    detail::check_shape("GELU::forward", "y", y, x.rows(), x.cols());
    y = x.unaryExpr([](Scalar v) { return value(v); });
  }

  template <class Scalar>
  static void backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy, MutRef<Scalar> dx) {
    detail::check_shape("GELU::backward", "dy", dy, x.rows(), x.cols());
    detail::check_shape("GELU::backward", "dx", dx, x.rows(), x.cols());
    // forward: y = gelu(x), so dx = dy ⊙ gelu'(x)
    dx = dy.binaryExpr(x, [](Scalar g, Scalar v) { return g * derivative(v); });
  }

 private:
  template <class Scalar>
  static constexpr Scalar kC = Scalar(0.7978845608028654);  // sqrt(2 / pi)
};

}  // namespace lora
