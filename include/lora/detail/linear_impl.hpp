// Definitions of LoRALinear; see <lora/linear.hpp> for the math and the API.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#error "lora/detail/linear_impl.hpp is internal; include <lora/lora.hpp>"
#endif

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace lora {

namespace detail {
// Independent random streams from one seed, so that a layer made by view()
// gets the same A as one that owns its weight, and dropout does not shift
// with initialisation.
enum Stream : std::uint64_t { stream_base = 0, stream_adapter = 1, stream_dropout = 2 };
inline std::uint64_t stream_seed(std::uint64_t seed, Stream s) {
  std::uint64_t state = seed ^ (0xA0761D6478BD642Full * (static_cast<std::uint64_t>(s) + 1));
  return splitmix64(state);
}

inline void check_features(const char* where, Index out_features, Index in_features) {
  if (out_features <= 0 || in_features <= 0)
    throw shape_error(std::string(where) + ": out_features and in_features must be positive, got out_features=" +
                      std::to_string(out_features) + ", in_features=" + std::to_string(in_features));
}

/// torch.nn.Dropout's mask for `mask`'s shape: each entry 0 with probability p, else 1 / (1 - p), drawn in
/// storage order from `rng` (every layer draws the same way, so equal seeds give equal masks).
template <class Scalar>
void draw_dropout_mask(Rng& rng, Scalar p, Matrix<Scalar>& mask) {
  const Scalar keep = Scalar(1) / (Scalar(1) - p);
  const double drop = static_cast<double>(p);
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = rng.uniform() < drop ? Scalar(0) : keep;
}

/// Throws state_error unless the last training forward had `rows` inputs (`cached` is -1 when none ran):
/// backward needs what that forward kept. `what` names the input ("batch"), `unit` its rows ("rows").
inline void check_cached_forward(const char* where, Index cached, Index rows, const char* what = "batch",
                                 const char* unit = "rows") {
  if (cached != rows)
    throw state_error(std::string(where) + ": needs the training-mode forward of the same " + what + " first; " +
                      (cached < 0 ? std::string("no forward was run")
                                  : "the last forward had " + std::to_string(cached) + " " + unit) +
                      ", backward got " + std::to_string(rows));
}
}  // namespace detail

template <class Scalar>
void LoRALinear<Scalar>::init_common(const LoraConfig& config, bool bias) {
  config.validate();
  config_ = config.with_seed();
  rank_ = config.r;
  scaling_ = static_cast<Scalar>(config.scaling());
  dropout_ = static_cast<Scalar>(config.lora_dropout);
  has_bias_ = bias;
  bias_trainable_ = bias && (config.bias == BiasMode::all || (config.bias == BiasMode::lora_only && rank_ > 0));
  dora_ = config.use_dora;
  if (dora_ && rank_ == 0)
    throw config_error("LoRALinear: use_dora needs r > 0 (DoRA rescales the adapted weight; with r = 0 there is none)");
  const Index n = rank_ * (in_ + out_) + (bias_trainable_ ? out_ : 0) + (dora_ ? out_ : 0);
  params_.setZero(n);
  grads_.setZero(n);
  if (has_bias_ && !bias_trainable_) bias_frozen_.setZero(out_);
  dropout_rng_.reseed(detail::stream_seed(*config_.seed, detail::stream_dropout));
  init_adapter();
  if (dora_ && weight_.out_features() > 0) init_dora();  // else the constructor calls it once W is there
}

template <class Scalar>
void LoRALinear<Scalar>::init_dora() {
  w_sq_norms_ = weight_.output_squared_norms();
  magnitude() = dora_norm("LoRALinear (use_dora)");
}

namespace detail {
/// A (R, I) and B (O, R) as config.init_lora_weights says, from config.seed's adapter stream (set: see with_seed()).
template <class Scalar>
void init_lora_weights(MatrixMap<Scalar> A, MatrixMap<Scalar> B, const LoraConfig& config) {
  const Index rank = A.rows(), in = A.cols();
  if (rank == 0) return;
  Rng rng(stream_seed(config.seed.value_or(0), stream_adapter));
  // kaiming_uniform_(a=sqrt(5)) on (R, I): gain sqrt(2/(1+5)), bound gain·sqrt(3/fan_in) = 1/sqrt(I).
  const double bound_A = 1.0 / std::sqrt(static_cast<double>(in));
  switch (config.init_lora_weights) {
    case InitLoraWeights::kaiming_uniform:
      for (Index i = 0; i < A.size(); ++i) A.data()[i] = static_cast<Scalar>(rng.uniform(-bound_A, bound_A));
      B.setZero();
      break;
    case InitLoraWeights::gaussian:
      for (Index i = 0; i < A.size(); ++i) A.data()[i] = static_cast<Scalar>(rng.normal() / rank);
      B.setZero();
      break;
    case InitLoraWeights::random: {
      const double bound_B = 1.0 / std::sqrt(static_cast<double>(rank));
      for (Index i = 0; i < A.size(); ++i) A.data()[i] = static_cast<Scalar>(rng.uniform(-bound_A, bound_A));
      for (Index i = 0; i < B.size(); ++i) B.data()[i] = static_cast<Scalar>(rng.uniform(-bound_B, bound_B));
      break;
    }
  }
}
}  // namespace detail

template <class Scalar>
void LoRALinear<Scalar>::init_adapter() {
  detail::init_lora_weights<Scalar>(lora_A(), lora_B(), config_);
}

template <class Scalar>
LoRALinear<Scalar>::LoRALinear(Index in_features, Index out_features, const LoraConfig& config, bool bias) {
  detail::check_features("LoRALinear", out_features, in_features);
  config.validate();
  in_ = in_features;
  out_ = out_features;
  init_common(config, bias);
  // torch.nn.Linear.reset_parameters: W and b ~ U(-1/sqrt(I), 1/sqrt(I)).
  detail::Rng rng(detail::stream_seed(*config_.seed, detail::stream_base));
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
  Mat W(out_, in_);
  for (Index i = 0; i < W.size(); ++i) W.data()[i] = static_cast<Scalar>(rng.uniform(-bound, bound));
  weight_ = FrozenWeight<Scalar>::owned(std::move(W));
  if (dora_) init_dora();
  if (has_bias_) {
    auto b = this->bias();
    for (Index i = 0; i < out_; ++i) b(0, i) = static_cast<Scalar>(rng.uniform(-bound, bound));
  }
}

template <class Scalar>
LoRALinear<Scalar>::LoRALinear(Mat weight, const LoraConfig& config) {
  detail::check_features("LoRALinear(weight)", weight.rows(), weight.cols());
  config.validate();
  in_ = weight.cols();
  out_ = weight.rows();
  weight_ = FrozenWeight<Scalar>::owned(std::move(weight));
  init_common(config, false);
}

template <class Scalar>
LoRALinear<Scalar>::LoRALinear(Mat weight, Row bias, const LoraConfig& config) {
  detail::check_features("LoRALinear(weight, bias)", weight.rows(), weight.cols());
  if (bias.size() != weight.rows())
    throw shape_error("LoRALinear(weight, bias): bias expected " + std::to_string(weight.rows()) +
                      " entries (out_features of weight " + shape_string(weight.rows(), weight.cols()) + "), got " +
                      std::to_string(bias.size()));
  config.validate();
  in_ = weight.cols();
  out_ = weight.rows();
  weight_ = FrozenWeight<Scalar>::owned(std::move(weight));
  init_common(config, true);
  this->bias() = bias;
}

template <class Scalar>
LoRALinear<Scalar>::LoRALinear(FrozenWeight<Scalar> weight, const LoraConfig& config) {
  if (weight.out_features() <= 0) throw shape_error("LoRALinear(FrozenWeight): the weight is empty");
  config.validate();
  in_ = weight.in_features();
  out_ = weight.out_features();
  weight_ = std::move(weight);
  init_common(config, false);
}

template <class Scalar>
LoRALinear<Scalar>::LoRALinear(FrozenWeight<Scalar> weight, Row bias, const LoraConfig& config) {
  if (weight.out_features() <= 0) throw shape_error("LoRALinear(FrozenWeight, bias): the weight is empty");
  if (bias.size() != weight.out_features())
    throw shape_error("LoRALinear(FrozenWeight, bias): bias expected " + std::to_string(weight.out_features()) +
                      " entries (out_features), got " + std::to_string(bias.size()));
  config.validate();
  in_ = weight.in_features();
  out_ = weight.out_features();
  weight_ = std::move(weight);
  init_common(config, true);
  this->bias() = bias;
}

template <class Scalar>
LoRALinear<Scalar> LoRALinear<Scalar>::view(const Scalar* weight, Index out_features, Index in_features,
                                            const LoraConfig& config, const Scalar* bias) {
  detail::check_features("LoRALinear::view", out_features, in_features);
  if (weight == nullptr) throw shape_error("LoRALinear::view: weight must not be null");
  auto w = FrozenWeight<Scalar>::view(weight, out_features, in_features);
  if (bias == nullptr) return LoRALinear(std::move(w), config);
  return LoRALinear(std::move(w), ConstMatrixMap<Scalar>(bias, 1, out_features), config);
}

template <class Scalar>
LoRALinear<Scalar> LoRALinear<Scalar>::mutable_view(Scalar* weight, Index out_features, Index in_features,
                                                    const LoraConfig& config, const Scalar* bias) {
  detail::check_features("LoRALinear::mutable_view", out_features, in_features);
  if (weight == nullptr) throw shape_error("LoRALinear::mutable_view: weight must not be null");
  auto w = FrozenWeight<Scalar>::mutable_view(weight, out_features, in_features);
  if (bias == nullptr) return LoRALinear(std::move(w), config);
  return LoRALinear(std::move(w), ConstMatrixMap<Scalar>(bias, 1, out_features), config);
}

template <class Scalar>
ParameterCount LoRALinear<Scalar>::parameter_count_for(Index in_features, Index out_features, const LoraConfig& config,
                                                       bool bias) {
  detail::check_features("LoRALinear::parameter_count_for", out_features, in_features);
  config.validate();
  const bool bias_trains =
      bias && (config.bias == BiasMode::all || (config.bias == BiasMode::lora_only && config.r > 0));
  ParameterCount c;
  c.trainable = static_cast<Index>(config.r) * (in_features + out_features) + (bias_trains ? out_features : 0) +
                (config.use_dora ? out_features : 0);
  c.frozen = out_features * in_features + (bias && !bias_trains ? out_features : 0);
  return c;
}

template <class Scalar>
ParameterList<Scalar> LoRALinear<Scalar>::parameters() {
  ParameterList<Scalar> list;
  if (rank_ > 0) {
    list.push_back({"lora_A", params_.data(), grads_.data(), rank_, in_});
    list.push_back({"lora_B", params_.data() + rank_ * in_, grads_.data() + rank_ * in_, out_, rank_});
  }
  if (bias_trainable_) {
    const Index off = rank_ * (in_ + out_);
    list.push_back({"bias", params_.data() + off, grads_.data() + off, 1, out_});
  }
  if (dora_) {
    const Index off = magnitude_offset();
    list.push_back({"lora_magnitude_vector", params_.data() + off, grads_.data() + off, 1, out_});
  }
  return list;
}

template <class Scalar>
void LoRALinear<Scalar>::check_forward_args(const char* where, const ConstRef<Scalar>& x,
                                            const MutRef<Scalar>& y) const {
  detail::check_shape(where, "x", x, -1, in_);
  detail::check_shape(where, "y", y, x.rows(), out_);
  detail::check_no_overlap(where, "y", y, "x", x);
}

// x (N, I), W (O, I), b (O), A (R, I), B (O, R) -> y (N, O)
template <class Scalar>
void LoRALinear<Scalar>::forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) const {
  const char* where = "LoRALinear::forward";
  if (training_)
    throw state_error(std::string(where) +
                      " on a const layer runs in eval mode only, but the layer is in training mode: call eval() first "
                      "(a training forward keeps activations for backward and needs a non-const layer)");
  check_forward_args(where, x, y);
  if (dora_ && !merged_) {
    dora_eval_forward(x, y);
    return;
  }
  Mat H, Bt;  // (N, R) and (R, O): small; locals so concurrent callers share nothing
  if (own_gemm_forward(x, x, y, H, Bt)) return;
  weight_.forward(x, y);
  if (has_bias_) y.rowwise() += bias().row(0);
  if (rank_ > 0 && !merged_) {
    H.noalias() = x * lora_A().transpose();
    y.noalias() += scaling_ * H * lora_B().transpose();
  }
}

template <class Scalar>
bool LoRALinear<Scalar>::own_gemm_forward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& xa, MutRef<Scalar> y,
                                          Mat& H, Mat& Bt) const {
  if constexpr (std::is_same_v<Scalar, float>) {
    if (!weight_.forward_takes_terms(x.rows())) return false;
    // One pass over y: the bias and the term s·H Bᵀ are added to each tile of y in registers after W's sum
    // (against three passes: the product, += b, += s·H Bᵀ), and H = xa Aᵀ is computed inside the GEMM, a row
    // block just before its tiles. At B = 0 the term adds +0 after W's sum and the bias: the base model's bits.
    const bool adapter = rank_ > 0 && !merged_;
    detail::LowRankTerm term;
    detail::LowRankInput input;
    if (adapter) {
      H.resize(x.rows(), rank_);
      Bt.resize(rank_, out_);
      Bt.noalias() = scaling_ * lora_B().transpose();
      term = detail::LowRankTerm{0, out_, rank_, H.data(), H.outerStride(), Bt.data(), Bt.outerStride()};
      const auto A = lora_A();
      input = detail::LowRankInput{xa.data(), xa.outerStride(), A.data(),       A.outerStride(),
                                   rank_,     H.data(),         H.outerStride()};
    }
    weight_.forward_with_terms(x, y, false, &term, adapter ? 1 : 0, adapter ? &input : nullptr,
                               has_bias_ ? bias().data() : nullptr);
    return true;
  } else {
    (void)x, (void)xa, (void)y, (void)H, (void)Bt;
    return false;
  }
}

// Training: y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ, keeping H and the mask for backward.
template <class Scalar>
void LoRALinear<Scalar>::forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) {
  if (!training_) {
    std::as_const(*this).forward(x, y);
    return;
  }
  const char* where = "LoRALinear::forward";
  if (merged_)
    throw state_error(std::string(where) +
                      ": the layer is merged (W already holds s·B·A), so training it would count the adapter twice; "
                      "call unmerge() before training, or eval() for inference");
  check_forward_args(where, x, y);
  const Index N = x.rows();
  cached_rows_ = -1;  // invalid until this forward completes
  if (dora_) {
    // n first: a zero norm throws before anything is kept.
    dora_norm_ = dora_norm(where);
    dora_scale_ = magnitude().row(0).cwiseQuotient(dora_norm_);
    const bool from_output = dora_output_backward_ && dropout_ == 0 && (magnitude().array() != 0).all();
    Z_.resize(from_output ? 0 : N, from_output ? 0 : out_);
    H_.resize(N, rank_);
    if (dropout_ > 0) {
      // y = x Wᵀ + b + (c − 1) ⊙ (drop(x) Wᵀ) + c ⊙ s·H Bᵀ = x Wᵀ − drop(x) Wᵀ + b + c ⊙ Z
      draw_dropout(x);
      H_.noalias() = x_dropped_ * lora_A().transpose();
      weight_.forward(x_dropped_, Z_);
      weight_.forward(x, y);
      y -= Z_;
      Z_.noalias() += scaling_ * H_ * lora_B().transpose();
      y.array() += Z_.array().rowwise() * dora_scale_.array();
    } else if (from_output) {
      // y = b + c ⊙ Z computed in y; backward recovers c ⊙ Z as y − b, so no copy of Z is kept.
      dora_m_ = magnitude();
      H_.noalias() = x * lora_A().transpose();
      weight_.forward(x, y);
      y.noalias() += scaling_ * H_ * lora_B().transpose();
      y.array().rowwise() *= dora_scale_.array();
    } else {
      // y = b + c ⊙ Z, Z = x Wᵀ + s·H Bᵀ
      H_.noalias() = x * lora_A().transpose();
      weight_.forward(x, Z_);
      Z_.noalias() += scaling_ * H_ * lora_B().transpose();
      y.array() = Z_.array().rowwise() * dora_scale_.array();
    }
    dora_z_kept_ = !from_output;
    if (has_bias_) y.rowwise() += bias().row(0);
    cached_rows_ = N;
    return;
  }
  // x_dropped_ = drop(x) when there is dropout; H = xa Aᵀ then, in the own GEMM or on its own.
  const bool dropped = rank_ > 0 && dropout_ > 0;
  if (dropped) draw_dropout(x);
  const ConstRef<Scalar> xa = dropped ? ConstRef<Scalar>(x_dropped_) : x;
  if (!own_gemm_forward(x, xa, y, H_, Bt_)) {
    weight_.forward(x, y);
    if (has_bias_) y.rowwise() += bias().row(0);
    if (rank_ > 0) {
      H_.resize(N, rank_);
      H_.noalias() = xa * lora_A().transpose();
      y.noalias() += scaling_ * H_ * lora_B().transpose();
    }
  }
  cached_rows_ = N;
}

template <class Scalar>
void LoRALinear<Scalar>::draw_dropout(const ConstRef<Scalar>& x) {
  mask_.resize(x.rows(), in_);
  x_dropped_.resize(x.rows(), in_);
  detail::draw_dropout_mask(dropout_rng_, dropout_, mask_);
  x_dropped_ = x.cwiseProduct(mask_);
}

template <class Scalar>
typename LoRALinear<Scalar>::Mat LoRALinear<Scalar>::forward(const ConstRef<Scalar>& x) {
  detail::check_shape("LoRALinear::forward", "x", x, -1, in_);
  Mat y(x.rows(), out_);
  forward(x, y);
  return y;
}

template <class Scalar>
typename LoRALinear<Scalar>::Mat LoRALinear<Scalar>::forward(const ConstRef<Scalar>& x) const {
  detail::check_shape("LoRALinear::forward", "x", x, -1, in_);
  Mat y(x.rows(), out_);
  forward(x, y);
  return y;
}

template <class Scalar>
void LoRALinear<Scalar>::backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy, MutRef<Scalar> dx) {
  detail::check_shape("LoRALinear::backward", "dx", dx, x.rows(), in_);
  detail::check_no_overlap("LoRALinear::backward", "dx", dx, "dy", dy);
  backward_impl(x, nullptr, dy, &dx);
}

template <class Scalar>
void LoRALinear<Scalar>::backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy) {
  backward_impl(x, nullptr, dy, nullptr);
}

template <class Scalar>
void LoRALinear<Scalar>::backward_with_output(const ConstRef<Scalar>& x, const ConstRef<Scalar>& y,
                                              const ConstRef<Scalar>& dy, MutRef<Scalar> dx) {
  const char* where = "LoRALinear::backward_with_output";
  detail::check_shape(where, "y", y, x.rows(), out_);
  detail::check_shape(where, "dx", dx, x.rows(), in_);
  detail::check_no_overlap(where, "dx", dx, "dy", dy);
  detail::check_no_overlap(where, "dx", dx, "y", y);
  backward_impl(x, &y, dy, &dx);
}

template <class Scalar>
void LoRALinear<Scalar>::backward_with_output(const ConstRef<Scalar>& x, const ConstRef<Scalar>& y,
                                              const ConstRef<Scalar>& dy) {
  detail::check_shape("LoRALinear::backward_with_output", "y", y, x.rows(), out_);
  backward_impl(x, &y, dy, nullptr);
}

// x (N, I), dy (N, O) -> dx (N, I); dA (R, I) +=, dB (O, R) +=, db (O) +=
template <class Scalar>
void LoRALinear<Scalar>::backward_impl(const ConstRef<Scalar>& x, const ConstRef<Scalar>* y, const ConstRef<Scalar>& dy,
                                       MutRef<Scalar>* dx) {
  const char* where = "LoRALinear::backward";
  if (!training_)
    throw state_error(std::string(where) + ": the layer is in eval mode; call train() and run forward again");
  if (merged_) throw state_error(std::string(where) + ": the layer is merged; call unmerge() before training");
  detail::check_shape(where, "x", x, -1, in_);
  detail::check_shape(where, "dy", dy, x.rows(), out_);
  detail::check_cached_forward(where, cached_rows_, x.rows());
  if (dora_ && !dora_z_kept_ && y == nullptr)
    throw state_error(
        "LoRALinear::backward: this DoRA layer keeps no copy of Z (set_dora_output_backward): call "
        "backward_with_output(x, y, dy[, dx]) with the forward's output y");

  if (bias_trainable_) {
    // forward: y = ... + b (broadcast over rows), so db += Σ_rows dy
    MatrixMap<Scalar>(grads_.data() + rank_ * (in_ + out_), 1, out_) += dy.colwise().sum();
  }
  if (dora_) {
    dora_backward(x, y, dy, dx);
    return;
  }
  // dx = dy W + s·(G A) ⊙ mask, and G, on the own GEMM where it runs; the rest below then skips them. Not when dx
  // shares x's buffer: dA reads x below, and the path below reads all of x before it writes dx.
  const bool dx_done = dx != nullptr && !detail::overlap(*dx, x) && own_gemm_backward(dy, *dx);
  if (rank_ > 0) {
    MatrixMap<Scalar> dA(grads_.data(), rank_, in_);
    MatrixMap<Scalar> dB(grads_.data() + rank_ * in_, out_, rank_);
    // forward: y += s · H Bᵀ, so dB += s · dyᵀ H and dH = s · dy B (kept unscaled in G)
    if (!dx_done) {
      G_.resize(x.rows(), rank_);
      G_.noalias() = dy * lora_B();
    }
    dB.noalias() += scaling_ * dy.transpose() * H_;
    // forward: H = drop(x) Aᵀ, so dA += dHᵀ drop(x) = s · Gᵀ drop(x)
    if (dropout_ > 0)
      dA.noalias() += scaling_ * G_.transpose() * x_dropped_;
    else
      dA.noalias() += scaling_ * G_.transpose() * x;
  }
  if (dx != nullptr && !dx_done) {
    // forward: y = x Wᵀ + s · (x ⊙ mask) Aᵀ Bᵀ, so dx = dy W + s · (G A) ⊙ mask
    weight_.backward(dy, *dx);
    if (rank_ > 0) {
      if (dropout_ > 0) {
        dx_lora_.resize(x.rows(), in_);
        dx_lora_.noalias() = G_ * lora_A();
        *dx += scaling_ * dx_lora_.cwiseProduct(mask_);
      } else {
        dx->noalias() += scaling_ * G_ * lora_A();
      }
    }
  }
}

template <class Scalar>
bool LoRALinear<Scalar>::own_gemm_backward(const ConstRef<Scalar>& dy, MutRef<Scalar> dx) {
  if constexpr (std::is_same_v<Scalar, float>) {
    if (!weight_.backward_takes_terms(dy.rows())) return false;
    // G = dy B is computed inside the GEMM from the rows of dy it reads anyway. Without dropout, s·G A is added to
    // each tile of dx in registers after W's sum: one pass over dx (against W's product, then += s·G A). With
    // dropout the mask multiplies G A, which is then no low-rank term: it is added after, as off the own GEMM.
    const bool fold = rank_ > 0 && dropout_ == 0;
    detail::LowRankTerm term;
    detail::LowRankInput input;
    if (rank_ > 0) {
      G_.resize(dy.rows(), rank_);
      Bt_plain_.resize(rank_, out_);
      Bt_plain_ = lora_B().transpose();
      input = detail::LowRankInput{dy.data(), dy.outerStride(), Bt_plain_.data(), Bt_plain_.outerStride(),
                                   rank_,     G_.data(),        G_.outerStride()};
    }
    if (fold) {
      sA_.resize(rank_, in_);
      sA_.noalias() = scaling_ * lora_A();
      term = detail::LowRankTerm{0, in_, rank_, G_.data(), G_.outerStride(), sA_.data(), sA_.outerStride()};
    }
    weight_.backward_with_terms(dy, dx, &term, fold ? 1 : 0, rank_ > 0 ? &input : nullptr);
    if (rank_ > 0 && dropout_ > 0) {
      dx_lora_.resize(dy.rows(), in_);
      dx_lora_.noalias() = G_ * lora_A();
      dx += scaling_ * dx_lora_.cwiseProduct(mask_);
    }
    return true;
  } else {
    (void)dy, (void)dx;
    return false;
  }
}

// DoRA: dy (N, O) with Z (N, O) and c, n of the forward -> dm, dA, dB +=, dx
template <class Scalar>
void LoRALinear<Scalar>::dora_backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>* y, const ConstRef<Scalar>& dy,
                                       MutRef<Scalar>* dx) {
  MatrixMap<Scalar> dA(grads_.data(), rank_, in_);
  MatrixMap<Scalar> dB(grads_.data() + rank_ * in_, out_, rank_);
  MatrixMap<Scalar> dm(grads_.data() + magnitude_offset(), 1, out_);
  if (!dora_z_kept_) {
    // Z ⊙ c = y − b (y: the forward's output): dm += Σ_rows dy ⊙ Z / n = Σ_rows dy ⊙ (y − b) / m
    if (has_bias_)
      dm.array() += (dy.array() * (y->array().rowwise() - bias().row(0).array())).colwise().sum() / dora_m_.array();
    else
      dm.array() += (dy.array() * y->array()).colwise().sum() / dora_m_.array();
    cached_rows_ = -1;
    // D = dy ⊙ c without an (N, O) buffer: G = D B = dy (c ⊙ B), dB += s·Dᵀ H = s·c ⊙ (dyᵀ H), dx in row blocks.
    const Mat Bc = dora_scale_.transpose().asDiagonal() * lora_B();  // (O, R)
    G_.resize(x.rows(), rank_);
    G_.noalias() = dy * Bc;
    Mat dyH(out_, rank_);
    dyH.noalias() = dy.transpose() * H_;
    dB.noalias() += scaling_ * (dora_scale_.transpose().asDiagonal() * dyH);
    dA.noalias() += scaling_ * G_.transpose() * x;
    if (dx == nullptr) return;
    // Blocks of at least 256 rows: Eigen's GEMM packs W again for every call and runs slower on short panels
    // (64-row blocks made a 4096² step 1.7 times slower); 256 rows of a 4096-wide D are 4 MiB, once per backward.
    const Index block = std::min<Index>(x.rows(), std::max<Index>(256, Index(1 << 18) / std::max<Index>(1, out_)));
    Mat D(std::min(block, x.rows()), out_);
    for (Index i = 0; i < x.rows(); i += block) {
      const Index k = std::min(block, x.rows() - i);
      auto d = D.topRows(k);
      d.array() = dy.middleRows(i, k).array().rowwise() * dora_scale_.array();
      weight_.backward(d, dx->middleRows(i, k));
    }
    dx->noalias() += scaling_ * G_ * lora_A();
    return;
  }
  // forward: y = b + (m / n) ⊙ Z with n constant, so dm += Σ_rows dy ⊙ Z / n
  dm.array() += (dy.array() * Z_.array()).colwise().sum() / dora_norm_.array();
  // and dZ = dy ⊙ c =: D, kept in Z's buffer (Z is spent: a second backward needs a new forward)
  Z_.array() = dy.array().rowwise() * dora_scale_.array();
  cached_rows_ = -1;
  // Z = (drop(x)) Wᵀ + s·H Bᵀ: dB += s·Dᵀ H, dH = s·D B (G unscaled), dA += s·Gᵀ drop(x)
  G_.resize(x.rows(), rank_);
  G_.noalias() = Z_ * lora_B();
  dB.noalias() += scaling_ * Z_.transpose() * H_;
  if (dropout_ > 0)
    dA.noalias() += scaling_ * G_.transpose() * x_dropped_;
  else
    dA.noalias() += scaling_ * G_.transpose() * x;
  if (dx == nullptr) return;
  if (dropout_ > 0) {
    // y = x Wᵀ − drop(x) Wᵀ + b + c ⊙ Z: dx = dy W + mask ⊙ (D W − dy W + s·G A)
    weight_.backward(dy, *dx);
    dx_lora_.resize(x.rows(), in_);
    weight_.backward(Z_, dx_lora_);
    dx_lora_.noalias() += scaling_ * G_ * lora_A();
    dx_lora_ -= *dx;
    *dx += dx_lora_.cwiseProduct(mask_);
  } else {
    // dx = D W + s·G A
    weight_.backward(Z_, *dx);
    dx->noalias() += scaling_ * G_ * lora_A();
  }
}

// n_o = ‖W_o + s·(B A)_o‖ = sqrt(‖W_o‖² + 2s·B_o·(A Wᵀ)ᵀ_o + s²·B_o (A Aᵀ) B_oᵀ): products of R rows, no O × I sum.
template <class Scalar>
typename LoRALinear<Scalar>::Row LoRALinear<Scalar>::dora_norm(const char* where) const {
  return weight_.low_rank_row_norms(where, "output row", dora_ ? w_sq_norms_ : weight_.output_squared_norms(), scaling_,
                                    lora_B(), lora_A());
}

template <class Scalar>
typename LoRALinear<Scalar>::Row LoRALinear<Scalar>::weight_norm() const {
  if (merged_) throw state_error("LoRALinear::weight_norm: the layer is merged (W holds the adapter); unmerge() first");
  return dora_norm("LoRALinear::weight_norm");
}

template <class Scalar>
void LoRALinear<Scalar>::reset_magnitude() {
  const char* where = "LoRALinear::reset_magnitude";
  if (!dora_) throw state_error(std::string(where) + ": the layer has no magnitude (use_dora is off)");
  if (merged_) throw state_error(std::string(where) + ": the layer is merged; unmerge() first");
  magnitude() = dora_norm(where);
}

// Eval: y = b + (m / n) ⊙ (x Wᵀ + s·x Aᵀ Bᵀ), with locals only (const, thread-safe).
template <class Scalar>
void LoRALinear<Scalar>::dora_eval_forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) const {
  const Row c = magnitude().row(0).cwiseQuotient(dora_norm("LoRALinear::forward"));
  weight_.forward(x, y);
  const Mat H = x * lora_A().transpose();
  y.noalias() += scaling_ * H * lora_B().transpose();
  y.array().rowwise() *= c.array();
  if (has_bias_) y.rowwise() += bias().row(0);
}

template <class Scalar>
void LoRALinear<Scalar>::merge(bool safe_merge) {
  if (merged_ || rank_ == 0) return;
  if (dora_) {
    // W ← c ⊙ (W + s·B A) per output row, c = m / n (PEFT's DoraLinearVariant.merge_safe)
    const char* where = "LoRALinear::merge";
    weight_.require_writable(where);  // before n is computed
    const Row c = magnitude().row(0).cwiseQuotient(dora_norm(where));
    weight_.merge_dora(where, "output row", scaling_, lora_B(), lora_A(), c, safe_merge);
    merged_dora_scale_ = c;
    merged_A_ = lora_A();
    merged_B_ = lora_B();
    merged_scaling_ = scaling_;
    merged_ = true;
    return;
  }
  // W is untouched unless every entry of W + s·B·A is finite (safe_merge), and no temporary the size of W is made.
  weight_.add_low_rank("LoRALinear::merge", scaling_, lora_B(), lora_A(), 0, safe_merge);
  merged_A_ = lora_A();
  merged_B_ = lora_B();
  merged_scaling_ = scaling_;
  merged_ = true;
}

template <class Scalar>
void LoRALinear<Scalar>::check_init_with_residual(const char* where) const {
  if (merged_)
    throw state_error(std::string(where) + ": the layer is merged; unmerge() first, so that W is the base weight");
  weight_.require_writable(where);
  if (rank_ <= 0 || rank_ > std::min(in_, out_))
    throw config_error(std::string(where) + ": r " + std::to_string(rank_) + " is more than min(in " +
                       std::to_string(in_) + ", out " + std::to_string(out_) + "), or not > 0");
}

template <class Scalar>
void LoRALinear<Scalar>::init_with_residual(const ConstRef<Scalar>& A, const ConstRef<Scalar>& B) {
  const char* where = "LoRALinear::init_with_residual";
  check_init_with_residual(where);
  if (A.rows() != rank_ || A.cols() != in_ || B.rows() != out_ || B.cols() != rank_)
    throw shape_error(std::string(where) + ": expected A " + shape_string(rank_, in_) + " and B " +
                      shape_string(out_, rank_) + ", got A " + shape_string(A.rows(), A.cols()) + ", B " +
                      shape_string(B.rows(), B.cols()));
  if (!A.allFinite() || !B.allFinite()) throw numeric_error(std::string(where) + ": A or B holds a non-finite value");
  // W − s·B A, checked finite before anything is written.
  weight_.add_low_rank(where, -scaling_, B, A, 0, true);
  lora_A() = A;
  lora_B() = B;
  if (dora_) init_dora();  // PEFT adds DoRA after PiSSA / OLoRA: m = ‖W_res + s·B A‖ = ‖W‖ per row
}

template <class Scalar>
QuantizedMergeReport LoRALinear<Scalar>::merge_quantized() {
  const char* where = "LoRALinear::merge_quantized";
  if (!weight_.is_quantized())
    throw state_error(std::string(where) + ": W is stored in float, so nothing is lost to rounding; use merge()");
  if (merged_) throw state_error(std::string(where) + ": the layer is merged already; unmerge() first");
  QuantizedMergeReport report;
  report.format = weight_.format();
  if (rank_ == 0) return report;
  // The exact merged weight, in float and in W's stored layout, by the float merge itself.
  const WeightLayout layout = weight_.layout();
  const Mat dense = weight_.to_dense();  // (O, I)
  FrozenWeight<Scalar> exact =
      FrozenWeight<Scalar>::owned(layout == WeightLayout::out_in ? dense : Mat(dense.transpose()), layout);
  Row c;
  if (dora_) {
    c = magnitude().row(0).cwiseQuotient(dora_norm(where));
    exact.merge_dora(where, "output row", scaling_, lora_B(), lora_A(), c, true);
  } else {
    exact.add_low_rank(where, scaling_, lora_B(), lora_A(), 0, true);
  }
  const auto E = exact.stored();
  std::shared_ptr<const LowPrecisionStorage> rounded;
  if constexpr (std::is_same_v<Scalar, float>) rounded = weight_.low_precision()->requantize(E.data());
  std::vector<float> row(static_cast<std::size_t>(E.cols()));
  for (Index r = 0; r < E.rows(); ++r) {
    rounded->decode(r, 0, E.cols(), row.data());
    for (Index k = 0; k < E.cols(); ++k) {
      const double err = std::abs(static_cast<double>(row[static_cast<std::size_t>(k)]) - static_cast<double>(E(r, k)));
      if (err > report.max_abs_error) {
        report.max_abs_error = err;
        report.row = layout == WeightLayout::out_in ? r : k;
        report.col = layout == WeightLayout::out_in ? k : r;
      }
    }
  }
  report.max_abs_update = (scaling_ * (lora_B() * lora_A())).cwiseAbs().maxCoeff();
  unmerged_weight_ = std::move(weight_);
  if constexpr (std::is_same_v<Scalar, float>) weight_ = FrozenWeight<Scalar>::quantized(rounded, layout);
  merged_dora_scale_ = c;
  merged_A_ = lora_A();
  merged_B_ = lora_B();
  merged_scaling_ = scaling_;
  merged_ = true;
  return report;
}

template <class Scalar>
void LoRALinear<Scalar>::unmerge() {
  if (!merged_) return;
  if (unmerged_weight_.out_features() > 0) {  // merge_quantized(): the original W, exactly
    weight_ = std::move(unmerged_weight_);
    unmerged_weight_ = FrozenWeight<Scalar>();
    merged_dora_scale_.resize(0);
    merged_A_.resize(0, 0);
    merged_B_.resize(0, 0);
    merged_ = false;
    return;
  }
  if (dora_) {
    // W ← W / c − s·B A (PEFT's DoraLinearVariant.unmerge); ‖W_o‖² again, as rounding moved W by a few ulps
    weight_.add_low_rank_scaled("LoRALinear::unmerge", -merged_scaling_, merged_B_, merged_A_,
                                merged_dora_scale_.data(), nullptr);
    w_sq_norms_ = weight_.output_squared_norms();
    merged_dora_scale_.resize(0);
  } else {
    weight_.add_low_rank("LoRALinear::unmerge", -merged_scaling_, merged_B_, merged_A_);
  }
  merged_A_.resize(0, 0);
  merged_B_.resize(0, 0);
  merged_ = false;
}

}  // namespace lora
