// Finite-difference gradient checks (central differences, double), for the
// library's layers and for any layer a user writes.
//
//   numeric_i = (L(θ + eps·e_i) - L(θ - eps·e_i)) / (2 eps)
//   passes when |analytic_i - numeric_i| <= atol + rtol · |numeric_i| for every i
//   (torch.autograd.gradcheck's criterion).
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/detail/random.hpp>
#include <lora/linear.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <string>
#include <type_traits>

namespace lora {

namespace detail {
/// T itself, in a context that takes no part in template argument deduction (std::type_identity_t, C++20).
template <class T>
struct identity {
  using type = T;
};
template <class T>
using identity_t = typename identity<T>::type;
}  // namespace detail

struct GradCheckOptions {
  double eps = 1e-6;
  double atol = 1e-7;
  double rtol = 1e-5;
};

struct GradCheckResult {
  Index checked = 0;
  Index failures = 0;      ///< entries outside atol + rtol·|numeric|
  Index worst_index = -1;  ///< entry with the largest |analytic - numeric|
  double max_abs_error = 0;
  double analytic_at_worst = 0;
  double numeric_at_worst = 0;
  bool ok() const { return failures == 0; }
  std::string describe(const std::string& name) const {
    return name + ": " + std::to_string(checked) + " entries, " + std::to_string(failures) +
           " outside tolerance, worst at " + std::to_string(worst_index) + " (analytic " +
           std::to_string(analytic_at_worst) + ", numeric " + std::to_string(numeric_at_worst) + ")";
  }
};

/// Checks `analytic` (n entries) against central differences of `loss()` with
/// respect to `values` (n entries), perturbing each entry in place and restoring it.
/// `loss` must compute the scalar loss from the current values.
template <class LossFn>
GradCheckResult check_gradient(LossFn&& loss, double* values, const double* analytic, Index n,
                               const GradCheckOptions& opt = {}) {
  GradCheckResult r;
  r.checked = n;
  for (Index i = 0; i < n; ++i) {
    const double saved = values[i];
    values[i] = saved + opt.eps;
    const double up = loss();
    values[i] = saved - opt.eps;
    const double down = loss();
    values[i] = saved;
    const double numeric = (up - down) / (2 * opt.eps);
    const double err = std::abs(analytic[i] - numeric);
    if (!(err <= opt.atol + opt.rtol * std::abs(numeric))) ++r.failures;
    if (err > r.max_abs_error || r.worst_index < 0 || std::isnan(err)) {
      r.max_abs_error = err;
      r.worst_index = i;
      r.analytic_at_worst = analytic[i];
      r.numeric_at_worst = numeric;
    }
  }
  return r;
}

/// Results of check_layer_gradients: one per tensor (empty when it has no entries).
struct LayerGradCheck {
  GradCheckResult dA, dB, db, dm, dx;  ///< dm: DoRA's magnitude
  bool ok() const { return dA.ok() && dB.ok() && db.ok() && dm.ok() && dx.ok(); }
  std::string describe() const {
    return dA.describe("dA") + "; " + dB.describe("dB") + "; " + db.describe("db") + "; " + dm.describe("dm") + "; " +
           dx.describe("dx");
  }
};

/// Checks a LoRALinear<double>'s backward on input x with the loss L = Σ y ⊙ P for a
/// fixed random P (so dy = P). Dropout masks are held fixed by reseeding before
/// every forward. The layer is put in training mode, its gradients are zeroed and
/// left holding the analytic values.
///
/// With DoRA, dm and dx are exact derivatives and check as any other; dA and dB are not: they are PEFT's
/// gradients with n = ‖W + s·B A‖ held constant (the paper's section 4.3), while central differences of the
/// layer move n with A and B, so those two results show the difference and fail by design.
///
/// A template (Scalar deduced from the layer, double only) rather than a plain
/// function, so that including this header costs nothing until it is called:
/// a non-template function would instantiate all of LoRALinear<double> in
/// every file that includes <lora/lora.hpp>.
template <class Scalar>
LayerGradCheck check_layer_gradients(LoRALinear<Scalar>& layer, const detail::identity_t<ConstRef<Scalar>>& x_in,
                                     std::uint64_t seed = 1, const GradCheckOptions& opt = {}) {
  static_assert(std::is_same_v<Scalar, double>, "check_layer_gradients needs a LoRALinear<double>");
  const Index N = x_in.rows();
  Matrix<double> x = x_in;
  Matrix<double> P(N, layer.out_features());
  detail::Rng rng(seed);
  for (Index i = 0; i < P.size(); ++i) P.data()[i] = rng.uniform(-1, 1);

  layer.train();
  Matrix<double> y(N, layer.out_features()), dx(N, layer.in_features());
  auto loss = [&] {
    layer.set_dropout_seed(seed);
    layer.forward(x, y);
    return (y.array() * P.array()).sum();
  };
  loss();
  layer.zero_grad();
  layer.backward(x, P, dx);

  LayerGradCheck out;
  for (auto& p : layer.parameters()) {
    const Matrix<double> analytic = p.grad_matrix();  // the perturbed forwards do not touch grads, but copy anyway
    GradCheckResult r = check_gradient(loss, p.value, analytic.data(), p.size(), opt);
    if (p.name == "lora_A") out.dA = r;
    if (p.name == "lora_B") out.dB = r;
    if (p.name == "bias") out.db = r;
    if (p.name == "lora_magnitude_vector") out.dm = r;
  }
  out.dx = check_gradient(loss, x.data(), dx.data(), dx.size(), opt);
  return out;
}

}  // namespace lora
