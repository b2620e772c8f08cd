// Optimizers and gradient clipping over the trainable parameters only.
//
// An optimizer is built from a ParameterList (layer.parameters() or
// model.parameters()) and holds state sized by those tensors alone: the
// frozen weights cost it nothing. The tensors must outlive the optimizer.
//
// state() / load_state() expose an optimizer's whole state (options, step
// count, per-parameter buffers in the order of parameters()) for checkpoints
// (<lora/checkpoint.hpp>); load_state() replaces it as torch's
// optimizer.load_state_dict() does, hyperparameters included.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/errors.hpp>
#include <lora/params.hpp>
#include <lora/types.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace lora {

namespace detail {
inline void check_option(bool ok, const char* optimizer, const char* what, double got) {
  if (!ok) throw config_error(std::string(optimizer) + ": " + what + ", got " + value_string(got));
}

/// Checks that `buffers` holds one vector per parameter, each of the parameter's size.
template <class Scalar>
void check_state_buffers(const char* where, const char* what, const std::vector<Vector<Scalar>>& buffers,
                         const ParameterList<Scalar>& params) {
  if (buffers.size() != params.size())
    throw shape_error(std::string(where) + ": " + what + " expected " + std::to_string(params.size()) +
                      " buffers (one per parameter), got " + std::to_string(buffers.size()));
  for (std::size_t k = 0; k < params.size(); ++k)
    if (buffers[k].size() != params[k].size())
      throw shape_error(std::string(where) + ": " + what + "[" + std::to_string(k) + "] (parameter \"" +
                        params[k].name + "\") expected " + std::to_string(params[k].size()) + " values, got " +
                        std::to_string(buffers[k].size()));
}

inline void check_step_count(const char* where, long step) {
  if (step < 0) throw config_error(std::string(where) + ": step must be >= 0, got " + std::to_string(step));
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

  /// Everything step() depends on besides the parameters and their gradients.
  struct State {
    Options options;
    long step = 0;  ///< steps taken; while 0, the next step sets each momentum buffer to its gradient
    std::vector<Vector<Scalar>> momentum_buffer;  ///< one per parameter when momentum != 0, else none
  };

  explicit SGD(ParameterList<Scalar> params, const Options& options) : params_(std::move(params)) {
    check_options(options, "SGD");
    state_.options = options;
    if (options.momentum != 0)
      for (const auto& p : params_) state_.momentum_buffer.push_back(Vector<Scalar>::Zero(p.size()));
  }

  /// Throws config_error naming the first option out of range; `where` starts the message.
  static void check_options(const Options& o, const char* where) {
    detail::check_option(o.lr >= 0, where, "lr must be >= 0", o.lr);
    detail::check_option(o.momentum >= 0, where, "momentum must be >= 0", o.momentum);
    detail::check_option(o.weight_decay >= 0, where, "weight_decay must be >= 0", o.weight_decay);
    detail::check_option(o.dampening >= 0 && o.dampening <= 1, where, "dampening must be in [0, 1]", o.dampening);
    detail::check_option(!o.nesterov || o.momentum > 0, where, "nesterov needs momentum > 0; momentum", o.momentum);
    detail::check_option(!o.nesterov || o.dampening == 0, where, "nesterov needs dampening = 0; dampening",
                         o.dampening);
  }

  void step() {
    const Options& opt = state_.options;
    const Scalar mu = static_cast<Scalar>(opt.momentum), damp = static_cast<Scalar>(1 - opt.dampening);
    for (std::size_t k = 0; k < params_.size(); ++k) {
      auto& p = params_[k];
      // The parameter's group (Parameter::lr_scale, weight_decay; 1 and the optimizer's unless LoRA+ set them).
      const Scalar lr = static_cast<Scalar>(opt.lr * p.lr_scale);
      const Scalar wd = static_cast<Scalar>(p.weight_decay.value_or(opt.weight_decay));
      Eigen::Map<Vector<Scalar>> value(p.value, p.size());
      Eigen::Map<const Vector<Scalar>> grad(p.grad, p.size());
      if (mu == 0) {
        if (wd != 0)
          value -= lr * (grad + wd * value);
        else
          value -= lr * grad;
        continue;
      }
      auto& buf = state_.momentum_buffer[k];
      if (state_.step == 0)
        buf = grad + wd * value;
      else
        buf = mu * buf + damp * (grad + wd * value);
      if (opt.nesterov)
        value -= lr * (grad + wd * value + mu * buf);
      else
        value -= lr * buf;
    }
    ++state_.step;
  }

  void zero_grad() {
    for (auto& p : params_) std::fill(p.grad, p.grad + p.size(), Scalar(0));
  }
  double lr() const { return state_.options.lr; }
  void set_lr(double lr) {
    detail::check_option(lr >= 0, "SGD::set_lr", "lr must be >= 0", lr);
    state_.options.lr = lr;
  }
  const Options& options() const { return state_.options; }
  long step_count() const { return state_.step; }
  /// The tensors this optimizer updates, in the order of its state's buffers.
  const ParameterList<Scalar>& parameters() const { return params_; }
  /// Bytes of optimizer state (the momentum buffers).
  std::size_t state_bytes() const {
    std::size_t n = 0;
    for (const auto& m : state_.momentum_buffer) n += static_cast<std::size_t>(m.size()) * sizeof(Scalar);
    return n;
  }

  const State& state() const { return state_; }

  /// Replaces options, step count and momentum buffers. Throws config_error
  /// (an option out of range, a negative step) or shape_error (buffers that do
  /// not fit parameters()) and then leaves the optimizer as it was.
  void load_state(State state) {
    const char* where = "SGD::load_state";
    check_options(state.options, where);
    detail::check_step_count(where, state.step);
    if (state.options.momentum != 0)
      detail::check_state_buffers(where, "momentum_buffer", state.momentum_buffer, params_);
    else if (!state.momentum_buffer.empty())
      throw shape_error(std::string(where) + ": momentum_buffer expected none (momentum is 0), got " +
                        std::to_string(state.momentum_buffer.size()));
    state_ = std::move(state);
  }

 private:
  ParameterList<Scalar> params_;
  State state_;
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

  /// Everything step() depends on besides the parameters and their gradients.
  struct State {
    Options options;
    long step = 0;                           ///< t: steps taken
    std::vector<Vector<Scalar>> exp_avg;     ///< m, one per parameter
    std::vector<Vector<Scalar>> exp_avg_sq;  ///< v, one per parameter
  };

  explicit AdamW(ParameterList<Scalar> params) : AdamW(std::move(params), Options{}) {}
  AdamW(ParameterList<Scalar> params, const Options& options) : params_(std::move(params)) {
    check_options(options, "AdamW");
    state_.options = options;
    for (const auto& p : params_) {
      state_.exp_avg.push_back(Vector<Scalar>::Zero(p.size()));
      state_.exp_avg_sq.push_back(Vector<Scalar>::Zero(p.size()));
    }
  }

  /// Throws config_error naming the first option out of range; `where` starts the message.
  static void check_options(const Options& o, const char* where) {
    detail::check_option(o.lr >= 0, where, "lr must be >= 0", o.lr);
    detail::check_option(o.beta1 >= 0 && o.beta1 < 1, where, "beta1 must be in [0, 1)", o.beta1);
    detail::check_option(o.beta2 >= 0 && o.beta2 < 1, where, "beta2 must be in [0, 1)", o.beta2);
    detail::check_option(o.eps >= 0, where, "eps must be >= 0", o.eps);
    detail::check_option(o.weight_decay >= 0, where, "weight_decay must be >= 0", o.weight_decay);
  }

  void step() {
    const Options& opt = state_.options;
    const long t = ++state_.step;
    // Computed in double as PyTorch does for its Python-float hyperparameters.
    const double bias_correction1 = 1 - std::pow(opt.beta1, static_cast<double>(t));
    const double bias_correction2 = 1 - std::pow(opt.beta2, static_cast<double>(t));
    const Scalar bc2_sqrt = static_cast<Scalar>(std::sqrt(bias_correction2));
    const Scalar b1 = static_cast<Scalar>(opt.beta1), b2 = static_cast<Scalar>(opt.beta2);
    const Scalar eps = static_cast<Scalar>(opt.eps);
    for (std::size_t k = 0; k < params_.size(); ++k) {
      auto& p = params_[k];
      // The parameter's group (Parameter::lr_scale, weight_decay; 1 and the optimizer's unless LoRA+ set them).
      const double lr = opt.lr * p.lr_scale;
      const Scalar step_size = static_cast<Scalar>(lr / bias_correction1);
      const Scalar decay = static_cast<Scalar>(1 - lr * p.weight_decay.value_or(opt.weight_decay));
      Eigen::Map<Vector<Scalar>> value(p.value, p.size());
      Eigen::Map<const Vector<Scalar>> grad(p.grad, p.size());
      auto m = state_.exp_avg[k].array();
      auto v = state_.exp_avg_sq[k].array();
      value *= decay;
      m = b1 * m + (Scalar(1) - b1) * grad.array();
      v = b2 * v + (Scalar(1) - b2) * grad.array().square();
      value.array() -= step_size * m / (v.sqrt() / bc2_sqrt + eps);
    }
  }

  void zero_grad() {
    for (auto& p : params_) std::fill(p.grad, p.grad + p.size(), Scalar(0));
  }
  double lr() const { return state_.options.lr; }
  void set_lr(double lr) {
    detail::check_option(lr >= 0, "AdamW::set_lr", "lr must be >= 0", lr);
    state_.options.lr = lr;
  }
  const Options& options() const { return state_.options; }
  long step_count() const { return state_.step; }
  /// The tensors this optimizer updates, in the order of its state's buffers.
  const ParameterList<Scalar>& parameters() const { return params_; }
  /// Bytes of optimizer state (two moments per trainable scalar).
  std::size_t state_bytes() const {
    std::size_t n = 0;
    for (const auto& m : state_.exp_avg) n += 2 * static_cast<std::size_t>(m.size()) * sizeof(Scalar);
    return n;
  }

  const State& state() const { return state_; }

  /// Replaces options, step count and both moments. Throws config_error (an
  /// option out of range, a negative step) or shape_error (moments that do not
  /// fit parameters()) and then leaves the optimizer as it was.
  void load_state(State state) {
    const char* where = "AdamW::load_state";
    check_options(state.options, where);
    detail::check_step_count(where, state.step);
    detail::check_state_buffers(where, "exp_avg", state.exp_avg, params_);
    detail::check_state_buffers(where, "exp_avg_sq", state.exp_avg_sq, params_);
    state_ = std::move(state);
  }

 private:
  ParameterList<Scalar> params_;
  State state_;
};

/// LoRA+ (Hayou et al. 2024), as PEFT's create_loraplus_optimizer groups the parameters.
struct LoraPlusOptions {
  /// ηB / ηA: lora_B (and every 1-D parameter, a bias) trains at lr · lr_ratio. PEFT requires it; the paper
  /// suggests 2^4.
  double lr_ratio = 16;
  /// The learning rate of embedding adapters (lora_embedding_A / _B), absolute: PEFT's loraplus_lr_embedding.
  double lr_embedding = 1e-6;
  /// Every group's weight decay but the biases' (0): PEFT's loraplus_weight_decay, which replaces the optimizer's.
  double weight_decay = 0;
};

/// Puts `params` into LoRA+'s four groups, for an optimizer whose lr is `lr`
/// (the embedding group's lr is absolute, so it is stored as a multiple of
/// this one; a schedule scales all four together):
///   embedding   lora_embedding_A / _B                  lr_embedding   weight_decay
///   B           lora_B, lora_magnitude_vector (DoRA)   lr · lr_ratio  weight_decay
///   B, no decay 1-D parameters (biases)                lr · lr_ratio  0
///   A           everything else (lora_A)               lr             weight_decay
/// Parameters are recognised by name (prefixed names too: "3.lora_B", "q.lora_A"). Throws config_error for an lr
/// or lr_embedding that is not > 0, a ratio that is not > 0, a weight decay < 0.
template <class Scalar>
ParameterList<Scalar> loraplus_groups(ParameterList<Scalar> params, double lr, const LoraPlusOptions& options = {}) {
  const char* where = "loraplus_groups";
  detail::check_option(lr > 0 && std::isfinite(lr), where, "lr must be > 0", lr);
  detail::check_option(options.lr_ratio > 0 && std::isfinite(options.lr_ratio), where, "lr_ratio must be > 0",
                       options.lr_ratio);
  detail::check_option(options.lr_embedding > 0 && std::isfinite(options.lr_embedding), where,
                       "lr_embedding must be > 0", options.lr_embedding);
  detail::check_option(options.weight_decay >= 0, where, "weight_decay must be >= 0", options.weight_decay);
  auto ends_with = [](const std::string& s, const char* suffix) {
    const std::size_t n = std::strlen(suffix);
    return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
  };
  for (auto& p : params) {
    if (p.name.find("lora_embedding_") != std::string::npos) {
      p.lr_scale = options.lr_embedding / lr;
      p.weight_decay = options.weight_decay;
    } else if (ends_with(p.name, "bias")) {  // PEFT: 1-D, and "bias" in the name keeps it out of decay
      p.lr_scale = options.lr_ratio;
      p.weight_decay = 0.0;
    } else if (p.name.find("lora_B") != std::string::npos ||
               p.name.find("lora_magnitude_vector") != std::string::npos) {
      // PEFT: lora_B, and every other 1-D parameter (DoRA's magnitude), train at lr · lr_ratio with decay
      p.lr_scale = options.lr_ratio;
      p.weight_decay = options.weight_decay;
    } else {
      p.lr_scale = 1;
      p.weight_decay = options.weight_decay;
    }
  }
  return params;
}

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
