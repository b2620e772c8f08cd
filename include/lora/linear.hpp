// LoRALinear: a frozen dense layer with a trainable low-rank path.
//
//   x (N, I), W (O, I), b (O), A (R, I), B (O, R), y (N, O)
//
//   forward:   H = drop(x) Aᵀ                       (N, R)
//              y = x Wᵀ + b + s · H Bᵀ              (N, O)
//   backward:  dB += s · dyᵀ H                      (O, R)
//              dA += s · (dy B)ᵀ drop(x)            (R, I)
//              db += Σ_rows dy                      (O)   only when the bias trains
//              dx  = dy W + s · ((dy B) A) ⊙ mask   (N, I)
//
// with s = lora_alpha / r (or lora_alpha / sqrt(r) with use_rslora), and
// drop(x) = x ⊙ mask, mask entries 0 or 1/(1-p), the same mask in forward and
// backward. W never gets a gradient buffer. Gradients add up across backward
// calls until zero_grad(), so micro-batch accumulation works.
//
// DoRA (config.use_dora; Liu et al. 2024, in PEFT's exact form): a trainable magnitude m (O), initialised to
// n = ‖W + s·B A‖ per output row, and with c = m / n (n recomputed at every forward and treated as a constant in
// backward, as PEFT detaches it, the paper's section 4.3):
//
//   forward:   Z = x Wᵀ + s · H Bᵀ                   (N, O)
//              y = b + c ⊙ Z                         (c broadcast over rows)
//   backward:  dm += Σ_rows (dy ⊙ Z) / n             (O)
//              D  = dy ⊙ c, then as above with D in place of dy:
//              dB += s · Dᵀ H,  dA += s · (D B)ᵀ x,  dx = D W + s · (D B) A
//
// With dropout in training, PEFT keeps the undropped base product and rescales the dropped one:
// y = x Wᵀ + b + (c − 1) ⊙ (drop(x) Wᵀ) + c ⊙ s · drop(x) Aᵀ Bᵀ, so Z = drop(x) Wᵀ + s·H Bᵀ and
// dx = dy W + mask ⊙ ((D − dy) W + s · (D B) A) (a second product with W each way, as in PEFT).
// n comes from small products, never from an O × I temporary:
// n_o² = ‖W_o‖² + 2s · B_o · (W Aᵀ)_o + s² · B_o (A Aᵀ) B_oᵀ, with ‖W_o‖² kept from construction.
// Merging writes W ← c ⊙ (W + s·B A) per output row; unmerge writes W ← W / c − s·B A.
//
// W is a FrozenWeight (<lora/weight.hpp>): owned or a view of the caller's
// buffer, stored (O, I) or, for a transformers Conv1D checkpoint (GPT-2),
// (I, O) as it is, without a copy; A and B have the same shapes either way.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/config.hpp>
#include <lora/detail/checks.hpp>
#include <lora/detail/random.hpp>
#include <lora/errors.hpp>
#include <lora/params.hpp>
#include <lora/types.hpp>
#include <lora/weight.hpp>

#include <array>
#include <cstdint>
#include <string>
#include <type_traits>

namespace lora {

template <class Scalar>
class LoRALinear {
  static_assert(std::is_floating_point_v<Scalar>, "LoRALinear<Scalar>: Scalar must be float, double or long double");

 public:
  using Mat = Matrix<Scalar>;
  using Row = RowVector<Scalar>;

  /// Owns a new W (O, I) and b (O), initialised like torch.nn.Linear from config.seed:
  /// U(-1/sqrt(I), 1/sqrt(I)).
  LoRALinear(Index in_features, Index out_features, const LoraConfig& config = {}, bool bias = true);

  /// Owns the given weight (O, I), without bias.
  explicit LoRALinear(Mat weight, const LoraConfig& config = {});

  /// Owns the given weight (O, I) and bias (O).
  LoRALinear(Mat weight, Row bias, const LoraConfig& config = {});

  /// Wraps a row-major (O, I) buffer the caller owns, without copying it. The
  /// library never writes to it; merge() throws. The bias, when given, is copied
  /// (it is O scalars and may train). The buffer must outlive the layer.
  static LoRALinear view(const Scalar* weight, Index out_features, Index in_features, const LoraConfig& config = {},
                         const Scalar* bias = nullptr);

  /// As view(), but merge() / unmerge() may write W in place (the only writes ever made).
  static LoRALinear mutable_view(Scalar* weight, Index out_features, Index in_features, const LoraConfig& config = {},
                                 const Scalar* bias = nullptr);

  /// Any frozen weight: owned or viewed, (O, I) or (I, O), e.g. a GPT-2 Conv1D weight viewed in place with
  /// FrozenWeight<float>::view(ptr, O, I, WeightLayout::in_out). Without bias / with bias (O), copied.
  explicit LoRALinear(FrozenWeight<Scalar> weight, const LoraConfig& config = {});
  LoRALinear(FrozenWeight<Scalar> weight, Row bias, const LoraConfig& config = {});

  // ---- forward / backward -------------------------------------------------

  /// x (N, I) -> y (N, O); y must be sized (N, O) and must not overlap x.
  /// Training mode: applies dropout and keeps H and the mask for backward().
  /// Eval mode: same as the const overload.
  void forward(const ConstRef<Scalar>& x, MutRef<Scalar> y);

  /// Eval-mode forward: no dropout, nothing cached, safe from several threads
  /// at once. Throws state_error if the layer is in training mode.
  void forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) const;

  /// Allocating conveniences: return y (N, O).
  Mat forward(const ConstRef<Scalar>& x);
  Mat forward(const ConstRef<Scalar>& x) const;

  /// dy (N, O) -> dx (N, I); adds into dA, dB (and db). x must be the input of
  /// the last training-mode forward.
  void backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy, MutRef<Scalar> dx);

  /// As above without dx (a first layer, whose input needs no gradient).
  void backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy);

  /// backward(x, dy[, dx]) for a caller that still holds the forward's output y, unchanged: what a DoRA layer
  /// with set_dora_output_backward(true) needs (any other layer ignores y but its shape).
  void backward_with_output(const ConstRef<Scalar>& x, const ConstRef<Scalar>& y, const ConstRef<Scalar>& dy,
                            MutRef<Scalar> dx);
  void backward_with_output(const ConstRef<Scalar>& x, const ConstRef<Scalar>& y, const ConstRef<Scalar>& dy);

  /// Sets dA, dB, db (and DoRA's dm) to zero.
  void zero_grad() { grads_.setZero(); }

  // ---- modes ----------------------------------------------------------------

  void train(bool mode = true) { training_ = mode; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  /// W += s · B A, once (a second call does nothing); with DoRA W ← (m / n) ⊙ (W + s · B A) per output row,
  /// refused (numeric_error) when a magnitude is zero, as unmerge could not divide by it. With safe_merge the sum is
  /// checked finite first and W is left untouched if it is not (numeric_error).
  /// Throws state_error for a read-only view. A, B and s are remembered, so
  /// unmerge() restores W even if A or B changed in between.
  void merge(bool safe_merge = true);

  /// Merging into a low-precision W (FrozenWeight::quantized), which merge() refuses: W' = W + s · B A (DoRA:
  /// (m / n) ⊙ (W + s · B A)) is computed in float and rounded back to W's format (same NF4 block size and double
  /// quantisation), and replaces W. Rounding loses the adapter's smallest changes, so the report gives the largest
  /// |W'_q − W'| it made and where. The original W is kept (both are held while merged), so unmerge() restores it
  /// exactly. Throws state_error for a float W (use merge()) or a merged layer, numeric_error for a non-finite sum
  /// (nothing changes). Makes one float copy of W while it runs.
  QuantizedMergeReport merge_quantized();

  /// W -= s · B A with the A, B, s of the merge (DoRA: W ← W / c − s · B A with the c of the merge); after
  /// merge_quantized(), the original W back. Does nothing when not merged.
  void unmerge();
  bool is_merged() const { return merged_; }

  /// Makes A (R, I) and B (O, R) the adapter and W its residual W − s·B A, so the output does not change: the
  /// start of PiSSA and OLoRA (lora::pissa_init, lora::olora_init in <lora/init.hpp>). Checks everything first
  /// (check_init_with_residual, the shapes, a finite residual) and changes nothing when it throws.
  void init_with_residual(const ConstRef<Scalar>& A, const ConstRef<Scalar>& B);
  /// Throws, naming `where`, unless init_with_residual can run: state_error for a merged layer or a read-only
  /// weight, config_error unless 0 < r <= min(I, O).
  void check_init_with_residual(const char* where) const;

  // ---- DoRA -------------------------------------------------------------------

  bool use_dora() const { return dora_; }
  /// DoRA's magnitude m (1, O); empty without DoRA. Trainable, like A and B.
  MatrixMap<Scalar> magnitude() { return MatrixMap<Scalar>(params_.data() + magnitude_offset(), 1, dora_ ? out_ : 0); }
  ConstMatrixMap<Scalar> magnitude() const {
    return ConstMatrixMap<Scalar>(params_.data() + magnitude_offset(), 1, dora_ ? out_ : 0);
  }
  /// dm (1, O); empty without DoRA.
  ConstMatrixMap<Scalar> dmagnitude() const {
    return ConstMatrixMap<Scalar>(grads_.data() + magnitude_offset(), 1, dora_ ? out_ : 0);
  }
  /// n = ‖W + s·B A‖ per output row (1, O), from the current W, A and B (DoRA or not), without forming the sum.
  /// Throws numeric_error naming the first row whose norm is zero or not finite (PEFT would divide by it and
  /// give NaN outputs) and state_error when merged (W then holds the adapter).
  Row weight_norm() const;
  /// DoRA's backward needs Z (N, O). By default a training forward keeps a copy. With `on`, it keeps none
  /// (N·O scalars less per layer, so a DoRA step's memory is a LoRA step's) and backward_with_output recovers
  /// Z ⊙ m / n as y − b from the forward's y, which the caller must keep unchanged; backward without y then
  /// throws state_error. dm is then Σ_rows dy ⊙ (y − b) / m, which rounds as y − b does (a bias far larger than
  /// the outputs costs digits there). A forward with dropout, or with a zero magnitude, keeps the copy anyway.
  /// Sequential turns this on for its DoRA layers.
  void set_dora_output_backward(bool on = true) { dora_output_backward_ = on; }
  bool dora_output_backward() const { return dora_output_backward_; }
  /// m ← n, so that the layer's output is the plain LoRA output again: what construction does (with B = 0, m is
  /// ‖W‖ per row and the layer starts at the base model), and what PEFT does when it adds a DoRA adapter.
  void reset_magnitude();

  /// Restarts the dropout mask sequence (masks are drawn per training forward).
  void set_dropout_seed(std::uint64_t seed) { dropout_rng_.reseed(seed); }

  /// Where the dropout mask sequence stands (xoshiro256++'s four words), for
  /// checkpoints: set_dropout_rng_state(dropout_rng_state()) later makes the
  /// following masks repeat exactly.
  std::array<std::uint64_t, 4> dropout_rng_state() const { return dropout_rng_.state(); }
  /// Throws config_error for the all-zero state, from which xoshiro would draw zeros forever.
  void set_dropout_rng_state(const std::array<std::uint64_t, 4>& state) {
    if ((state[0] | state[1] | state[2] | state[3]) == 0)
      throw config_error("LoRALinear::set_dropout_rng_state: the state must not be all zero");
    dropout_rng_.set_state(state);
  }

  // ---- tensors ----------------------------------------------------------------

  /// W (O, I). Throws state_error when W is stored (I, O): use frozen_weight().stored() (the buffer as it is)
  /// or frozen_weight().to_dense() (an (O, I) copy) there.
  ConstMatrixMap<Scalar> weight() const {
    if (weight_.layout() != WeightLayout::out_in)
      throw state_error(
          "LoRALinear::weight: W is stored (in, out) (fan_in_fan_out), so there is no (out, in) matrix to map; use "
          "frozen_weight().stored() for the buffer as it is, or frozen_weight().to_dense() for an (out, in) copy");
    return weight_.stored();
  }
  /// The frozen weight: its layout, ownership, stored buffer, products.
  const FrozenWeight<Scalar>& frozen_weight() const { return weight_; }
  WeightLayout weight_layout() const { return weight_.layout(); }
  MatrixMap<Scalar> lora_A() { return MatrixMap<Scalar>(params_.data(), rank_, in_); }
  ConstMatrixMap<Scalar> lora_A() const { return ConstMatrixMap<Scalar>(params_.data(), rank_, in_); }
  MatrixMap<Scalar> lora_B() { return MatrixMap<Scalar>(params_.data() + rank_ * in_, out_, rank_); }
  ConstMatrixMap<Scalar> lora_B() const { return ConstMatrixMap<Scalar>(params_.data() + rank_ * in_, out_, rank_); }
  /// b (1, O); empty when the layer has no bias. Writable: a frozen bias is
  /// the layer's own copy, never the host's memory.
  MatrixMap<Scalar> bias() { return MatrixMap<Scalar>(bias_data(), has_bias_ ? 1 : 0, out_); }
  ConstMatrixMap<Scalar> bias() const {
    return ConstMatrixMap<Scalar>(const_cast<LoRALinear*>(this)->bias_data(), has_bias_ ? 1 : 0, out_);
  }

  ConstMatrixMap<Scalar> dA() const { return ConstMatrixMap<Scalar>(grads_.data(), rank_, in_); }
  ConstMatrixMap<Scalar> dB() const { return ConstMatrixMap<Scalar>(grads_.data() + rank_ * in_, out_, rank_); }
  /// db (1, O); empty unless the bias trains.
  ConstMatrixMap<Scalar> db() const {
    return ConstMatrixMap<Scalar>(grads_.data() + rank_ * (in_ + out_), bias_trainable_ ? 1 : 0, out_);
  }

  /// The trainable tensors (lora_A, lora_B, bias when it trains, lora_magnitude_vector with DoRA) with their gradients.
  ParameterList<Scalar> parameters();

  // ---- shape and accounting ----------------------------------------------------

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  Index rank() const { return rank_; }
  Scalar scaling() const { return scaling_; }
  const LoraConfig& config() const { return config_; }
  bool has_bias() const { return has_bias_; }
  bool bias_trainable() const { return bias_trainable_; }
  bool weight_is_view() const { return weight_.is_view(); }
  bool weight_is_writable() const { return weight_.is_writable(); }

  ParameterCount parameter_count() const { return parameter_count_for(in_, out_, config_, has_bias_); }

  /// Counts for a layer of this shape, computed from the shape alone (no allocation):
  /// for dry runs over models too large to build.
  static ParameterCount parameter_count_for(Index in_features, Index out_features, const LoraConfig& config, bool bias);

 private:
  void init_common(const LoraConfig& config, bool bias);
  void init_adapter();
  Scalar* bias_data() { return bias_trainable_ ? params_.data() + rank_ * (in_ + out_) : bias_frozen_.data(); }
  Index magnitude_offset() const { return rank_ * (in_ + out_) + (bias_trainable_ ? out_ : 0); }
  void init_dora();
  // n (1, O) from w_sq_norms_, A, B and s; throws numeric_error naming `where` and a row whose norm is zero.
  Row dora_norm(const char* where) const;
  // y = b + c ⊙ y (y holding Z) for eval.
  void dora_eval_forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) const;
  /// Training with dropout: draws mask_ and keeps x_dropped_ = x ⊙ mask_ (LoRA's and DoRA's).
  void draw_dropout(const ConstRef<Scalar>& x);
  /// y = x Wᵀ + b + s·(xa Aᵀ) Bᵀ as one product of the library's own GEMM, H = xa Aᵀ written into H on the way
  /// (detail/kgemm.hpp), when W takes terms at x's rows (FrozenWeight::forward_takes_terms); false (nothing done)
  /// otherwise. Bt is s·Bᵀ's workspace. Without the adapter (rank 0, or merged), y = x Wᵀ + b.
  bool own_gemm_forward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& xa, MutRef<Scalar> y, Mat& H, Mat& Bt) const;
  /// dx = dy W + s·(G A) ⊙ mask and G_ = dy B on the library's own GEMM (G_ computed inside it; without dropout
  /// s·G A added to each tile of dx in registers too), when W takes terms in its backward at dy's rows
  /// (FrozenWeight::backward_takes_terms); false (nothing done) otherwise.
  bool own_gemm_backward(const ConstRef<Scalar>& dy, MutRef<Scalar> dx);
  void check_forward_args(const char* where, const ConstRef<Scalar>& x, const MutRef<Scalar>& y) const;
  void dora_backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>* y, const ConstRef<Scalar>& dy,
                     MutRef<Scalar>* dx);
  void backward_impl(const ConstRef<Scalar>& x, const ConstRef<Scalar>* y, const ConstRef<Scalar>& dy,
                     MutRef<Scalar>* dx);

  Index in_ = 0, out_ = 0, rank_ = 0;
  LoraConfig config_;
  Scalar scaling_ = 0;
  Scalar dropout_ = 0;

  FrozenWeight<Scalar> weight_;

  bool has_bias_ = false;
  bool bias_trainable_ = false;
  Vector<Scalar> bias_frozen_;  // (O) when the bias exists and does not train

  Vector<Scalar> params_;  // [A (R·I) | B (O·R) | b (O) if it trains]
  Vector<Scalar> grads_;   // same layout

  bool training_ = true;  // like torch.nn.Module
  bool merged_ = false;
  Mat merged_A_, merged_B_;  // the adapter as merged, so unmerge() subtracts exactly what merge() added
  Scalar merged_scaling_ = 0;
  Row merged_dora_scale_;  // DoRA: c = m / n of the merge, so unmerge() divides by what merge() multiplied
  FrozenWeight<Scalar> unmerged_weight_;  // merge_quantized(): the W before the merge, put back by unmerge()

  bool dora_ = false;
  bool dora_output_backward_ = false;
  bool dora_z_kept_ = false;  // the last training forward kept Z in Z_ (else backward recovers it from y)
  Eigen::Matrix<double, Eigen::Dynamic, 1> w_sq_norms_;  // DoRA: ‖W_o‖² per output, recomputed when W changes

  detail::Rng dropout_rng_;

  // Workspace kept between forward and backward; resized only when N changes.
  Index cached_rows_ = -1;  // N of the last training forward, -1 when there is none
  Mat H_;                   // (N, R)  drop(x) Aᵀ
  Mat Bt_;                  // (R, O)  s·Bᵀ, the own GEMM's term (own_gemm_forward)
  Mat G_;                   // (N, R)  dy B
  Mat Bt_plain_;            // (R, O)  Bᵀ, and
  Mat sA_;                  // (R, I)  s·A: the own GEMM's input and term in backward (own_gemm_backward)
  Mat mask_;                // (N, I)  dropout mask, only when dropout > 0
  Mat x_dropped_;           // (N, I)  x ⊙ mask, only when dropout > 0
  Mat dx_lora_;             // (N, I)  (dy B) A before masking, only when dropout > 0
  Mat Z_;                   // (N, O)  DoRA: Z of the last training forward; backward turns it into dy ⊙ c
  Row dora_norm_;           // (1, O)  DoRA: n of the last training forward
  Row dora_scale_;          // (1, O)  DoRA: c = m / n of the last training forward
  Row dora_m_;              // (1, O)  DoRA: m of the last training forward, when Z is recovered from y
};

}  // namespace lora

#include <lora/detail/linear_impl.hpp>
