// Optimizers and gradient clipping over the trainable parameters only.
//
// An optimizer is built from a ParameterList (layer.parameters() or
// model.parameters()) and holds state sized by those tensors alone: the
// frozen weights cost it nothing. The tensors must outlive the optimizer.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/errors.hpp>
#include <lora/params.hpp>
#include <lora/types.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace lora {

namespace detail {
inline void check_option(bool ok, const char* optimizer, const char* what, double got) {
  if (!ok) throw config_error(std::string(optimizer) + ": " + what + ", got " + value_string(got));
}
}  // namespace detail

/// torch.optim.SGD: g ← g + wd·p; with momentum, buf ← g on the first step, then
/// buf ← momentum·buf + (1 - dampening)·g; g ← nesterov ? g + momentum·buf : buf; p ← p - lr·g.
template <class Scalar>
class SGD {
 public:
  struct Options {
    double lr = 1e-3;
    double momentum = 0;
    double dampening = 0;
    double weight_decay = 0;
    bool nesterov = false;
  };

  explicit SGD(ParameterList<Scalar> params, const Options& options) : params_(std::move(params)), opt_(options) {
    detail::check_option(opt_.lr >= 0, "SGD", "lr must be >= 0", opt_.lr);
    detail::check_option(opt_.momentum >= 0, "SGD", "momentum must be >= 0", opt_.momentum);
    detail::check_option(opt_.weight_decay >= 0, "SGD", "weight_decay must be >= 0", opt_.weight_decay);
    detail::check_option(opt_.dampening >= 0 && opt_.dampening <= 1, "SGD", "dampening must be in [0, 1]",
                         opt_.dampening);
    detail::check_option(!opt_.nesterov || opt_.momentum > 0, "SGD", "nesterov needs momentum > 0; momentum",
                         opt_.momentum);
    detail::check_option(!opt_.nesterov || opt_.dampening == 0, "SGD", "nesterov needs dampening = 0; dampening",
                         opt_.dampening);
    if (opt_.momentum != 0)
      for (const auto& p : params_) momentum_.push_back(Vector<Scalar>::Zero(p.size()));
  }

  void step() {
    const Scalar lr = static_cast<Scalar>(opt_.lr), mu = static_cast<Scalar>(opt_.momentum);
    const Scalar damp = static_cast<Scalar>(1 - opt_.dampening), wd = static_cast<Scalar>(opt_.weight_decay);
    for (std::size_t k = 0; k < params_.size(); ++k) {
      auto& p = params_[k];
      Eigen::Map<Vector<Scalar>> value(p.value, p.size());
      Eigen::Map<const Vector<Scalar>> grad(p.grad, p.size());
      if (mu == 0) {
        if (wd != 0)
          value -= lr * (grad + wd * value);
        else
          value -= lr * grad;
        continue;
      }
      auto& buf = momentum_[k];
      if (steps_ == 0)
        buf = grad + wd * value;
      else
        buf = mu * buf + damp * (grad + wd * value);
      if (opt_.nesterov)
        value -= lr * (grad + wd * value + mu * buf);
      else
        value -= lr * buf;
    }
    ++steps_;
  }

  void zero_grad() {
    for (auto& p : params_) std::fill(p.grad, p.grad + p.size(), Scalar(0));
  }
  double lr() const { return opt_.lr; }
  void set_lr(double lr) {
    detail::check_option(lr >= 0, "SGD::set_lr", "lr must be >= 0", lr);
    opt_.lr = lr;
  }
  const Options& options() const { return opt_; }
  /// Bytes of optimizer state (the momentum buffers).
  std::size_t state_bytes() const {
    std::size_t n = 0;
    for (const auto& m : momentum_) n += static_cast<std::size_t>(m.size()) * sizeof(Scalar);
    return n;
  }

 private:
  ParameterList<Scalar> params_;
  Options opt_;
  std::vector<Vector<Scalar>> momentum_;
  long steps_ = 0;
};

/// torch.optim.AdamW (amsgrad=False, maximize=False), step t = 1, 2, ...:
///   p ← p · (1 - lr·wd)                                  (decoupled weight decay)
///   m ← β1·m + (1 - β1)·g,  v ← β2·v + (1 - β2)·g²
///   p ← p - (lr / (1 - β1ᵗ)) · m / (sqrt(v) / sqrt(1 - β2ᵗ) + eps)   (eps after the root)
template <class Scalar>
class AdamW {
 public:
  struct Options {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 1e-2;
  };

  explicit AdamW(ParameterList<Scalar> params) : AdamW(std::move(params), Options{}) {}
  AdamW(ParameterList<Scalar> params, const Options& options) : params_(std::move(params)), opt_(options) {
    detail::check_option(opt_.lr >= 0, "AdamW", "lr must be >= 0", opt_.lr);
    detail::check_option(opt_.beta1 >= 0 && opt_.beta1 < 1, "AdamW", "beta1 must be in [0, 1)", opt_.beta1);
    detail::check_option(opt_.beta2 >= 0 && opt_.beta2 < 1, "AdamW", "beta2 must be in [0, 1)", opt_.beta2);
    detail::check_option(opt_.eps >= 0, "AdamW", "eps must be >= 0", opt_.eps);
    detail::check_option(opt_.weight_decay >= 0, "AdamW", "weight_decay must be >= 0", opt_.weight_decay);
    for (const auto& p : params_) {
      exp_avg_.push_back(Vector<Scalar>::Zero(p.size()));
      exp_avg_sq_.push_back(Vector<Scalar>::Zero(p.size()));
    }
  }

  void step() {
    ++t_;
    // Computed in double as PyTorch does for its Python-float hyperparameters.
    const double bias_correction1 = 1 - std::pow(opt_.beta1, static_cast<double>(t_));
    const double bias_correction2 = 1 - std::pow(opt_.beta2, static_cast<double>(t_));
    const Scalar step_size = static_cast<Scalar>(opt_.lr / bias_correction1);
    const Scalar bc2_sqrt = static_cast<Scalar>(std::sqrt(bias_correction2));
    const Scalar decay = static_cast<Scalar>(1 - opt_.lr * opt_.weight_decay);
    const Scalar b1 = static_cast<Scalar>(opt_.beta1), b2 = static_cast<Scalar>(opt_.beta2);
    const Scalar eps = static_cast<Scalar>(opt_.eps);
    for (std::size_t k = 0; k < params_.size(); ++k) {
      auto& p = params_[k];
      Eigen::Map<Vector<Scalar>> value(p.value, p.size());
      Eigen::Map<const Vector<Scalar>> grad(p.grad, p.size());
      auto m = exp_avg_[k].array();
      auto v = exp_avg_sq_[k].array();
      value *= decay;
      m = b1 * m + (Scalar(1) - b1) * grad.array();
      v = b2 * v + (Scalar(1) - b2) * grad.array().square();
      value.array() -= step_size * m / (v.sqrt() / bc2_sqrt + eps);
    }
  }

  void zero_grad() {
    for (auto& p : params_) std::fill(p.grad, p.grad + p.size(), Scalar(0));
  }
  double lr() const { return opt_.lr; }
  void set_lr(double lr) {
    detail::check_option(lr >= 0, "AdamW::set_lr", "lr must be >= 0", lr);
    opt_.lr = lr;
  }
  const Options& options() const { return opt_; }
  long step_count() const { return t_; }
  /// Bytes of optimizer state (two moments per trainable scalar).
  std::size_t state_bytes() const {
    std::size_t n = 0;
    for (const auto& m : exp_avg_) n += 2 * static_cast<std::size_t>(m.size()) * sizeof(Scalar);
    return n;
  }

 private:
  ParameterList<Scalar> params_;
  Options opt_;
  std::vector<Vector<Scalar>> exp_avg_, exp_avg_sq_;
  long t_ = 0;
};

/// torch.nn.utils.clip_grad_norm_: the norm of all gradients together (p = norm_type,
/// infinity for the max norm); if it exceeds max_norm, every gradient is scaled by
/// max_norm / (norm + 1e-6) (a NaN norm makes them NaN, as in torch). Returns the norm before clipping. With
/// error_if_nonfinite, a NaN or infinite norm throws numeric_error and leaves the
/// gradients as they were.
template <class Scalar>
double clip_grad_norm(const ParameterList<Scalar>& params, double max_norm, double norm_type = 2.0,
                      bool error_if_nonfinite = false) {
  if (!(max_norm >= 0) || !std::isfinite(max_norm))
    throw config_error("clip_grad_norm: max_norm must be finite and >= 0, got " + value_string(max_norm));
  if (!(norm_type > 0))
    throw config_error("clip_grad_norm: norm_type must be > 0 (or infinity), got " + value_string(norm_type));
  double total = 0;
  const bool inf_norm = std::isinf(norm_type);
  for (const auto& p : params) {
    Eigen::Map<const Vector<Scalar>> g(p.grad, p.size());
    if (inf_norm) {
      // NaN propagates, as torch's max does: std::max(total, NaN) would drop it.
      const double m = p.size() ? static_cast<double>(g.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>()) : 0.0;
      if (std::isnan(m) || m > total) total = m;
    } else if (norm_type == 2.0) {
      // In double: float squares overflow from |g| ~ 1.8e19, long before the norm itself does.
      total += g.template cast<double>().squaredNorm();
    } else {
      total += g.template cast<double>().array().abs().pow(norm_type).sum();
    }
  }
  if (!inf_norm) total = norm_type == 2.0 ? std::sqrt(total) : std::pow(total, 1.0 / norm_type);
  if (error_if_nonfinite && !std::isfinite(total))
    throw numeric_error("clip_grad_norm: the total gradient norm is " + value_string(total) +
                        "; gradients left unchanged");
  const double coef = max_norm / (total + 1e-6);
  if (!(coef >= 1.0)) {  // also when NaN: as torch, a NaN norm spreads to the gradients
    const Scalar c = static_cast<Scalar>(coef);
    for (const auto& p : params) Eigen::Map<Vector<Scalar>>(p.grad, p.size()) *= c;
  }
  return total;
}

}  // namespace lora
