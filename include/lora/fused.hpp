// FusedLoRALinear: LoRA on output slices of a fused projection.
//
// GPT-2 stores q, k and v as one projection c_attn, W (3d, d) (as a Conv1D,
// (d, 3d)), while the LoRA paper adapts Wq and Wv only. This layer wraps the
// fused W and gives each slice of its outputs its own adapter (its own A, B,
// rank and lora_alpha), or none (a frozen slice, which costs nothing beyond
// the base product), as loralib's MergedLinear(enable_lora=[True, False,
// True]) does.
//
//   x (N, I), W (O, I) with O = Σ_k O_k, slice k = outputs [o_k, o_k + O_k)
//   A_k (R_k, I), B_k (O_k, R_k) for the adapted slices; A = [A_1; A_2; ...] (R, I), R = Σ R_k
//
//   forward:   H   = drop(x) Aᵀ                           (N, R)   one product for all slices
//              y   = x Wᵀ + b;  y_k += s_k · H_k B_kᵀ      (N, O_k) H_k: the columns of slice k
//   backward:  G_k = s_k · dy_k B_k                        (N, R_k)
//              dB_k += s_k · dy_kᵀ H_k                     (O_k, R_k)
//              dA   += Gᵀ drop(x)                          (R, I)   G = [G_1 G_2 ...]
//              dx   = dy W + (G A) ⊙ mask                  (N, I)
//   merge:     W_k += s_k · B_k A_k on each adapted slice  (unmerge subtracts what was added)
//
// Cost. The flops beyond the base product are 2·N·R·(I + O_k) in forward,
// 1.4% of it at GPT-2's sizes with q and v adapted; the rest is how fast the
// thin products run and memory traffic. So the adapters' products run on the
// base product's GEMM (detail/gemm.hpp: oneDNN, twice Eigen's speed at these
// shapes), the low-rank terms are written into y and dx first, and the base
// product is added last (y += x Wᵀ, dx += dy W): it reads and writes y or dx
// once either way, so the adapters add one write of y's adapted slices and
// of dx to the base product's traffic. Where the weight runs the library's own
// GEMM (FrozenWeight::forward_takes_terms: a float weight such as GPT-2's
// c_attn, at the shapes detail/kgemm.hpp names), the forward adds the
// slices' terms inside it instead, to each tile of y while it is in registers:
// no write of y for them, and the base model's bits at B = 0.
//
// One dropout mask serves every slice (drop(x) is taken once, as in
// loralib's MergedLinear and PEFT's LoRA on the fused module).
//
// DoRA (use_dora on the adapted slices, all or none) is PEFT's DoRA on the fused module, the one LoRA to_lora()
// gives: a trainable magnitude m (O) over every output, frozen slices' outputs included (PEFT trains those too),
// n = ‖W + Σ_k s_k B_k A_k‖ per output row (‖W_o‖ on a frozen slice), c = m / n held constant in backward, and
//   forward:   y = b + c ⊙ Z,  Z = x Wᵀ + [s_k · H_k B_kᵀ]
//   backward:  dm += Σ_n dy ⊙ Z / n, then the backward above with dy ⊙ c
//   merge:     W ← c ⊙ (W + Σ_k s_k B_k A_k) per row;  unmerge: W ← W / c − Σ_k s_k B_k A_k
// With dropout it is PEFT's form, y = x Wᵀ + b + (c − 1) ⊙ (drop(x) Wᵀ) + c ⊙ [s_k · H_k B_kᵀ], which costs a
// second base product in forward and in backward, as in LoRALinear.
//
// In a PEFT file the fused module is one exact LoRA (to_lora()): A stacked,
// B block-placed, rank R, with the slices' common scaling (or scaling 1 and
// each s_k folded into B when the slices' scalings differ), so PEFT,
// lora-merge and every other reader apply it unchanged; from_lora() recovers
// the slices from such a LoRA when its B is zero outside the slices' blocks.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/config.hpp>
#include <lora/detail/checks.hpp>
#include <lora/detail/gemm.hpp>
#include <lora/detail/kgemm.hpp>
#include <lora/detail/random.hpp>
#include <lora/errors.hpp>
#include <lora/linear.hpp>
#include <lora/params.hpp>
#include <lora/types.hpp>
#include <lora/weight.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora {

/// One slice of a fused projection's outputs: its name ("q", "k", "v"), its number of outputs, and its adapter's
/// config; config.r = 0 makes it a frozen slice. lora_dropout must be the same for every adapted slice (one mask
/// serves them all) and config.bias must be none (the fused bias stays frozen).
struct FusedSlice {
  std::string name;
  Index out_features = 0;
  LoraConfig config;
};

/// A run of a fused projection's outputs and the adapter columns (ranks) it uses: rank_count 0 for a frozen run.
struct OutputBlock {
  Index out_begin = 0, out_count = 0;
  Index rank_begin = 0, rank_count = 0;
};

/// The slices a single LoRA's B (O, R) on a fused module is made of, as FusedLoRALinear::to_lora() lays them
/// out: runs of consecutive outputs that use disjoint ranges of B's columns, or none (a frozen run). Empty
/// when B is not so made (one run using every column, as an ordinary LoRA's B; or runs whose columns overlap).
/// What lora-inspect prints under a fused module; B is read once, O·R entries.
template <class Derived>
std::vector<OutputBlock> output_blocks(const Eigen::MatrixBase<Derived>& B) {
  std::vector<OutputBlock> runs;
  Index last = -1;  // the last column the current run uses
  for (Index o = 0; o < B.rows(); ++o) {
    Index first_nz = -1, last_nz = -1;
    for (Index c = 0; c < B.cols(); ++c)
      if (B(o, c) != 0) {
        if (first_nz < 0) first_nz = c;
        last_nz = c;
      }
    const bool frozen = first_nz < 0;
    bool joins = false;
    if (!runs.empty()) {
      const OutputBlock& run = runs.back();
      if (frozen)
        joins = run.rank_count == 0;
      else
        joins = run.rank_count > 0 && first_nz <= last && last_nz >= run.rank_begin;  // the column ranges overlap
    }
    if (joins) {
      OutputBlock& run = runs.back();
      ++run.out_count;
      if (!frozen) {
        const Index begin = std::min(run.rank_begin, first_nz);
        last = std::max(last, last_nz);
        run.rank_begin = begin;
        run.rank_count = last - begin + 1;
      }
    } else {
      runs.push_back({o, 1, frozen ? 0 : first_nz, frozen ? 0 : last_nz - first_nz + 1});
      if (!frozen) last = last_nz;
    }
  }
  // Slices only when there are several runs and no two adapted runs share a column.
  std::vector<std::pair<Index, Index>> used;
  for (const auto& run : runs)
    if (run.rank_count > 0) used.emplace_back(run.rank_begin, run.rank_begin + run.rank_count);
  std::sort(used.begin(), used.end());
  for (std::size_t k = 1; k < used.size(); ++k)
    if (used[k].first < used[k - 1].second) return {};
  if (runs.size() < 2 || used.empty()) return {};
  return runs;
}

template <class Scalar>
class FusedLoRALinear {
  static_assert(std::is_floating_point_v<Scalar>,
                "FusedLoRALinear<Scalar>: Scalar must be float, double or long double");

 public:
  using Mat = Matrix<Scalar>;
  using Row = RowVector<Scalar>;

  /// Wraps the fused weight (owned or viewed, (O, I) or (I, O)) with the slices in output order; their
  /// out_features must add up to O. bias: (O), or empty for none. Throws shape_error / config_error naming the
  /// slice for sizes that do not add up, an empty or repeated name, unequal dropout, a trainable bias mode.
  FusedLoRALinear(FrozenWeight<Scalar> weight, std::vector<FusedSlice> slices, Row bias = Row());

  // ---- forward / backward -------------------------------------------------

  /// x (N, I) -> y (N, O). Training mode: dropout, and H and the mask kept for backward.
  void forward(const ConstRef<Scalar>& x, MutRef<Scalar> y);
  /// Eval-mode forward: no dropout, nothing cached, safe from several threads at once.
  void forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) const;
  Mat forward(const ConstRef<Scalar>& x) const {
    detail::check_shape("FusedLoRALinear::forward", "x", x, -1, in_);
    Mat y(x.rows(), out_);
    forward(x, y);
    return y;
  }
  /// dy (N, O) -> dx (N, I); adds into every adapted slice's dA and dB.
  void backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy, MutRef<Scalar> dx);
  void backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy);
  void zero_grad() { grads_.setZero(); }

  void train(bool mode = true) { training_ = mode; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }
  void set_dropout_seed(std::uint64_t seed) { dropout_rng_.reseed(seed); }

  /// W_k += s_k · B_k A_k on every adapted slice, once. With safe_merge every slice's sum is checked finite
  /// before any is written. Throws state_error for a read-only view.
  void merge(bool safe_merge = true);
  /// Subtracts exactly what merge() added.
  void unmerge();
  bool is_merged() const { return merged_; }

  // ---- slices and tensors ------------------------------------------------------

  const std::vector<FusedSlice>& slices() const { return slices_; }
  /// The index of the slice named `name`; throws config_error listing the names for an unknown one.
  std::size_t slice_index(const std::string& name) const;
  /// The first output of slice k, and its rank (0 for a frozen slice).
  Index slice_offset(std::size_t k) const { return out_offset_.at(k); }
  Index slice_rank(std::size_t k) const { return slices_.at(k).config.r; }
  Scalar slice_scaling(std::size_t k) const { return scaling_.at(k); }

  /// A_k (R_k, I), B_k (O_k, R_k) and their gradients; (0, I) / (O_k, 0) for a frozen slice.
  MatrixMap<Scalar> lora_A(std::size_t k) { return MatrixMap<Scalar>(params_.data() + a_at(k), slice_rank(k), in_); }
  ConstMatrixMap<Scalar> lora_A(std::size_t k) const {
    return ConstMatrixMap<Scalar>(params_.data() + a_at(k), slice_rank(k), in_);
  }
  MatrixMap<Scalar> lora_B(std::size_t k) {
    return MatrixMap<Scalar>(params_.data() + b_at_.at(k), slices_[k].out_features, slice_rank(k));
  }
  ConstMatrixMap<Scalar> lora_B(std::size_t k) const {
    return ConstMatrixMap<Scalar>(params_.data() + b_at_.at(k), slices_[k].out_features, slice_rank(k));
  }
  ConstMatrixMap<Scalar> dA(std::size_t k) const {
    return ConstMatrixMap<Scalar>(grads_.data() + a_at(k), slice_rank(k), in_);
  }
  ConstMatrixMap<Scalar> dB(std::size_t k) const {
    return ConstMatrixMap<Scalar>(grads_.data() + b_at_.at(k), slices_[k].out_features, slice_rank(k));
  }
  /// Every slice's A stacked in slice order: (R, I).
  ConstMatrixMap<Scalar> stacked_A() const { return ConstMatrixMap<Scalar>(params_.data(), rank_, in_); }

  /// "<slice>.lora_A" and "<slice>.lora_B" of every adapted slice, with their gradients, and DoRA's
  /// "lora_magnitude_vector" (1, O).
  ParameterList<Scalar> parameters();

  // ---- DoRA ---------------------------------------------------------------------------

  bool use_dora() const { return dora_; }
  /// DoRA's magnitude m (1, O) over every output; empty without DoRA.
  MatrixMap<Scalar> magnitude() { return MatrixMap<Scalar>(params_.data() + m_at_, 1, dora_ ? out_ : 0); }
  ConstMatrixMap<Scalar> magnitude() const {
    return ConstMatrixMap<Scalar>(params_.data() + m_at_, 1, dora_ ? out_ : 0);
  }
  ConstMatrixMap<Scalar> dmagnitude() const {
    return ConstMatrixMap<Scalar>(grads_.data() + m_at_, 1, dora_ ? out_ : 0);
  }
  /// n = ‖W + Σ_k s_k B_k A_k‖ per output row (1, O), from the current W and adapters.
  Row weight_norm() const;
  /// m ← n (PEFT's init: the layer then outputs what it would without DoRA).
  void reset_magnitude();

  const FrozenWeight<Scalar>& frozen_weight() const { return weight_; }
  ConstMatrixMap<Scalar> bias() const { return ConstMatrixMap<Scalar>(bias_.data(), has_bias_ ? 1 : 0, out_); }
  bool has_bias() const { return has_bias_; }
  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  /// R = Σ R_k.
  Index rank() const { return rank_; }
  ParameterCount parameter_count() const {
    return {rank_ * in_ + b_size_ + (dora_ ? out_ : 0), out_ * in_ + (has_bias_ ? out_ : 0)};
  }

  // ---- one LoRA on the fused module (PEFT files, MultiLoRALinear) -----------------------------------

  /// The exact single LoRA on the fused module: a LoRALinear over a read-only view of W (and the bias), with
  /// A = the stacked A (R, I), B (O, R) holding (s_k / s) · B_k in slice k's rows and columns and zeros
  /// elsewhere, and r = R, so s·B·A = Σ_k s_k B_k A_k placed in the slices' rows. Its scaling s is the slices'
  /// own when they all share one (lora_alpha s·R, or s·sqrt(R) with use_rslora, as the other layers of the file
  /// have it), so B's blocks are the B_k exactly and a file PEFT wrote saves back byte for byte; otherwise s = 1
  /// and each s_k is folded into B. Save it with peft::save_adapter under the fused module's path, or add its A
  /// and B to a MultiLoRALinear. This layer must outlive it.
  LoRALinear<Scalar> to_lora(bool use_rslora = false) const;

  /// Takes the slices back from a single LoRA on the fused module (one read from a PEFT file): its rank must be
  /// R, the rows of A in slice order, and B zero outside each slice's block (rows of slice k, columns of slice
  /// k), exactly. B_k = (s / s_k) · its block. Throws config_error naming the first entry that breaks this, or a
  /// rank that differs; nothing changes then.
  void from_lora(const LoRALinear<Scalar>& single);

 private:
  Index a_at(std::size_t k) const { return a_row_.at(k) * in_; }
  void check_forward_args(const char* where, const ConstRef<Scalar>& x, const MutRef<Scalar>& y) const;
  void backward_impl(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy, MutRef<Scalar>* dx);
  /// H = xa Aᵀ, and y = b + [s_k · H_k B_kᵀ] (0 for a frozen slice) row by row; then y += x Wᵀ. Where the weight
  /// runs the own GEMM (forward_takes_terms), one product instead: y = x Wᵀ + b with H and the slices' terms
  /// computed inside it.
  /// With DoRA (unmerged) y = b + c ⊙ Z, and Z is copied into *Z when Z is given.
  void forward_impl(const ConstRef<Scalar>& x, const ConstRef<Scalar>& xa, Mat& H, std::vector<Mat>& Bt,
                    std::vector<detail::LowRankTerm>& terms, MutRef<Scalar> y, Mat* Z = nullptr, Row* norm = nullptr,
                    Row* scale = nullptr) const;
  /// The fused module's B (O, R): s_k · B_k in slice k's rows and columns, zero elsewhere, from `params`.
  Mat placed_B(const Vector<Scalar>& params, const std::vector<Scalar>& scaling) const;
  Row dora_norm(const char* where) const;

  FrozenWeight<Scalar> weight_;
  std::vector<FusedSlice> slices_;
  std::vector<Index> out_offset_, a_row_, b_at_;  // per slice: first output, first row of A, offset of B in params_
  std::vector<Scalar> scaling_;                   // s_k, 0 for a frozen slice
  Index in_ = 0, out_ = 0, rank_ = 0, b_size_ = 0;
  Scalar dropout_ = 0;
  bool dora_ = false;
  Index m_at_ = 0;                                       // offset of DoRA's m in params_
  Eigen::Matrix<double, Eigen::Dynamic, 1> w_sq_norms_;  // DoRA: ‖W_o‖², recomputed when W changes
  bool has_bias_ = false;
  Row bias_;

  Vector<Scalar> params_;  // [A (R·I) | B_1 | B_2 | ... | m (O), DoRA]
  Vector<Scalar> grads_;   // same layout

  bool training_ = true;
  bool merged_ = false;
  Vector<Scalar> merged_params_;  // the adapters as merged
  std::vector<Scalar> merged_scaling_;
  Row merged_dora_scale_;  // DoRA: c of the merge
  detail::Rng dropout_rng_;

  Index cached_rows_ = -1;
  Mat H_, G_, mask_, x_dropped_;
  std::vector<Mat> Bt_;  // s_k · B_kᵀ per slice, in a training forward (kept: a steady-state step allocates nothing)
  std::vector<detail::LowRankTerm> terms_;  // the slices' terms for the own GEMM's forward (forward_takes_terms)
  Vector<Scalar> dBt_;                      // dB_kᵀ of one slice, in backward (the largest slice's size)
  Mat Z_, D_;                               // DoRA: Z of the last training forward, and dy ⊙ c
  Row dora_norm_, dora_scale_;              // DoRA: n and c of the last training forward
};

template <class Scalar>
FusedLoRALinear<Scalar>::FusedLoRALinear(FrozenWeight<Scalar> weight, std::vector<FusedSlice> slices, Row bias)
    : weight_(std::move(weight)), slices_(std::move(slices)) {
  const char* where = "FusedLoRALinear";
  in_ = weight_.in_features();
  out_ = weight_.out_features();
  if (out_ <= 0) throw shape_error(std::string(where) + ": the weight is empty");
  if (slices_.empty()) throw config_error(std::string(where) + ": give at least one slice");
  Index sum = 0;
  bool first_adapted = true;
  for (std::size_t k = 0; k < slices_.size(); ++k) {
    FusedSlice& slice = slices_[k];
    const std::string name = "slice " + std::to_string(k) + " (\"" + slice.name + "\")";
    if (slice.name.empty()) throw config_error(std::string(where) + ": slice " + std::to_string(k) + " has no name");
    for (std::size_t j = 0; j < k; ++j)
      if (slices_[j].name == slice.name)
        throw config_error(std::string(where) + ": two slices are named \"" + slice.name + "\"");
    if (slice.out_features <= 0)
      throw shape_error(std::string(where) + ": " + name + " must have outputs, got " +
                        std::to_string(slice.out_features));
    slice.config.validate();
    if (slice.config.bias != BiasMode::none)
      throw config_error(std::string(where) + ": " + name +
                         ": bias must be none (the fused bias is shared by the slices and stays frozen)");
    slice.config = slice.config.with_seed();
    out_offset_.push_back(sum);
    sum += slice.out_features;
    if (slice.config.r > 0) {
      if (first_adapted) {
        dropout_ = static_cast<Scalar>(slice.config.lora_dropout);
        dropout_rng_.reseed(detail::stream_seed(*slice.config.seed, detail::stream_dropout));
        dora_ = slice.config.use_dora;
        first_adapted = false;
      } else if (static_cast<Scalar>(slice.config.lora_dropout) != dropout_) {
        throw config_error(std::string(where) + ": " + name + " has lora_dropout " +
                           std::to_string(slice.config.lora_dropout) + ", an earlier slice " +
                           std::to_string(static_cast<double>(dropout_)) + "; one dropout mask serves every slice");
      } else if (slice.config.use_dora != dora_) {
        throw config_error(std::string(where) + ": " + name + (dora_ ? " is not DoRA" : " is DoRA") +
                           ", an earlier slice " + (dora_ ? "is" : "is not") +
                           "; DoRA's magnitude belongs to the fused module (as PEFT's does), so all adapted slices or "
                           "none take use_dora");
      }
    } else if (slice.config.use_dora) {
      throw config_error(std::string(where) + ": " + name + " is frozen (r = 0) but asks for use_dora");
    }
  }
  if (sum != out_)
    throw shape_error(std::string(where) + ": the slices have " + std::to_string(sum) +
                      " outputs in all, the weight has " + std::to_string(out_));
  if (bias.size() != 0 && bias.size() != out_)
    throw shape_error(std::string(where) + ": bias expected " + std::to_string(out_) + " entries, got " +
                      std::to_string(bias.size()));
  has_bias_ = bias.size() != 0;
  bias_ = std::move(bias);
  for (const auto& slice : slices_) {
    a_row_.push_back(rank_);
    rank_ += slice.config.r;
    scaling_.push_back(slice.config.r > 0 ? static_cast<Scalar>(slice.config.scaling()) : Scalar(0));
  }
  Index at = rank_ * in_;
  for (const auto& slice : slices_) {
    b_at_.push_back(at);
    at += slice.out_features * slice.config.r;
  }
  b_size_ = at - rank_ * in_;
  m_at_ = at;
  if (dora_) at += out_;
  params_.setZero(at);
  grads_.setZero(at);
  for (std::size_t k = 0; k < slices_.size(); ++k)
    if (slice_rank(k) > 0) detail::init_lora_weights<Scalar>(lora_A(k), lora_B(k), slices_[k].config);
  if (dora_) {  // PEFT's init: m = n of the new adapters
    w_sq_norms_ = weight_.output_squared_norms();
    magnitude() = dora_norm("FusedLoRALinear (use_dora)");
  }
}

template <class Scalar>
typename FusedLoRALinear<Scalar>::Mat FusedLoRALinear<Scalar>::placed_B(const Vector<Scalar>& params,
                                                                        const std::vector<Scalar>& scaling) const {
  Mat B = Mat::Zero(out_, rank_);
  for (std::size_t k = 0; k < slices_.size(); ++k)
    if (slice_rank(k) > 0)
      B.block(out_offset_[k], a_row_[k], slices_[k].out_features, slice_rank(k)) =
          scaling[k] * ConstMatrixMap<Scalar>(params.data() + b_at_[k], slices_[k].out_features, slice_rank(k));
  return B;
}

template <class Scalar>
typename FusedLoRALinear<Scalar>::Row FusedLoRALinear<Scalar>::dora_norm(const char* where) const {
  return weight_.low_rank_row_norms(where, "output row", dora_ ? w_sq_norms_ : weight_.output_squared_norms(),
                                    Scalar(1), placed_B(params_, scaling_), stacked_A());
}

template <class Scalar>
typename FusedLoRALinear<Scalar>::Row FusedLoRALinear<Scalar>::weight_norm() const {
  const char* where = "FusedLoRALinear::weight_norm";
  if (merged_) throw state_error(std::string(where) + ": the layer is merged (W holds the adapters); unmerge() first");
  return dora_norm(where);
}

template <class Scalar>
void FusedLoRALinear<Scalar>::reset_magnitude() {
  const char* where = "FusedLoRALinear::reset_magnitude";
  if (!dora_) throw state_error(std::string(where) + ": the layer has no magnitude (use_dora is off)");
  if (merged_) throw state_error(std::string(where) + ": the layer is merged; unmerge() first");
  magnitude() = dora_norm(where);
}

template <class Scalar>
std::size_t FusedLoRALinear<Scalar>::slice_index(const std::string& name) const {
  std::string names;
  for (std::size_t k = 0; k < slices_.size(); ++k) {
    if (slices_[k].name == name) return k;
    names += (k ? ", \"" : "\"") + slices_[k].name + "\"";
  }
  throw config_error("FusedLoRALinear: no slice named \"" + name + "\"; the slices are " + names);
}

template <class Scalar>
ParameterList<Scalar> FusedLoRALinear<Scalar>::parameters() {
  ParameterList<Scalar> list;
  for (std::size_t k = 0; k < slices_.size(); ++k) {
    if (slice_rank(k) == 0) continue;
    const Index r = slice_rank(k), o = slices_[k].out_features;
    list.push_back({slices_[k].name + ".lora_A", params_.data() + a_at(k), grads_.data() + a_at(k), r, in_});
    list.push_back({slices_[k].name + ".lora_B", params_.data() + b_at_[k], grads_.data() + b_at_[k], o, r});
  }
  if (dora_) list.push_back({"lora_magnitude_vector", params_.data() + m_at_, grads_.data() + m_at_, 1, out_});
  return list;
}

template <class Scalar>
void FusedLoRALinear<Scalar>::check_forward_args(const char* where, const ConstRef<Scalar>& x,
                                                 const MutRef<Scalar>& y) const {
  detail::check_shape(where, "x", x, -1, in_);
  detail::check_shape(where, "y", y, x.rows(), out_);
  detail::check_no_overlap(where, "y", y, "x", x);
}

template <class Scalar>
void FusedLoRALinear<Scalar>::forward_impl(const ConstRef<Scalar>& x, const ConstRef<Scalar>& xa, Mat& H,
                                           std::vector<Mat>& Bt, std::vector<detail::LowRankTerm>& terms,
                                           MutRef<Scalar> y, Mat* Z, Row* norm, Row* scale) const {
  const Index N = x.rows();
  const bool adapters = rank_ > 0 && !merged_;
  const bool dora = dora_ && adapters;
  Row n_local, c_local;
  if (dora) {  // before y is written: a zero norm throws with y as it was
    Row& n = norm ? *norm : n_local;
    Row& c = scale ? *scale : c_local;
    n = dora_norm("FusedLoRALinear::forward");
    c = magnitude().row(0).cwiseQuotient(n);
  }
  bool own_gemm = false;
  if constexpr (std::is_same_v<Scalar, float>) own_gemm = !dora && weight_.forward_takes_terms(N);
  if (adapters) {
    H.resize(N, rank_);
    // On the own GEMM, H = xa Aᵀ is computed inside it, each row block just before its tiles (detail/kgemm.hpp).
    if (!own_gemm)
      detail::product<Scalar>("FusedLoRALinear::forward", Scalar(1), xa, false, stacked_A(), true, false, H);
    // B_kᵀ (R_k, O_k) row-major, so each row of y_k is a sum of R_k contiguous rows: written once, never read.
    // (Measured against oneDNN's product into y's slices and the bias added after, 2026-12-05 on the Emerald
    // Rapids Xeon: the fused forward 1.043-1.074 against 1.072-1.094 of the base product.)
    Bt.resize(slices_.size());
    for (std::size_t k = 0; k < slices_.size(); ++k)
      if (slice_rank(k) > 0) Bt[k] = scaling_[k] * lora_B(k).transpose();
  }
  if constexpr (std::is_same_v<Scalar, float>) {
    if (own_gemm) {
      // One pass over y. The own GEMM adds each slice's H_k (s_k B_kᵀ) to its tile of y after W's sum, while the
      // tile is in registers: no pass over y for them, and at B = 0 the base model's bits (detail/kgemm.hpp). The
      // bias is added in the same registers after W's sum: the same float sum as y = b and the product added into
      // it (the base model's path), without that pass over y (5% of this forward at 512 x 768 -> 2304). With no
      // adapter (all slices frozen, or merged) the call is the same without terms, so the layer rounds as it does
      // at B = 0 at every depth.
      terms.clear();
      for (std::size_t k = 0; adapters && k < slices_.size(); ++k)
        if (slice_rank(k) > 0)
          terms.push_back(detail::LowRankTerm{out_offset_[k], slices_[k].out_features, slice_rank(k),
                                              H.data() + a_row_[k], H.outerStride(), Bt[k].data(),
                                              slices_[k].out_features});
      const auto A = stacked_A();
      const detail::LowRankInput input{xa.data(), xa.outerStride(), A.data(),       A.outerStride(),
                                       rank_,     H.data(),         H.outerStride()};
      weight_.forward_with_terms(x, y, false, terms.data(), terms.size(), adapters ? &input : nullptr,
                                 has_bias_ ? bias_.data() : nullptr);
      return;
    }
  }
  for (Index row = 0; row < N; ++row) {
    for (std::size_t k = 0; k < slices_.size(); ++k) {
      auto y_k = y.row(row).segment(out_offset_[k], slices_[k].out_features);
      if (adapters && slice_rank(k) > 0)
        y_k.noalias() = H.row(row).segment(a_row_[k], slice_rank(k)) * Bt[k];
      else
        y_k.setZero();
      if (has_bias_ && !dora) y_k += bias_.segment(out_offset_[k], slices_[k].out_features);
    }
  }
  weight_.forward_add(x, y);
  if (!dora) return;
  // y holds Z = x Wᵀ + [s_k · H_k B_kᵀ]: y = b + c ⊙ Z
  if (Z != nullptr) *Z = y;
  y.array().rowwise() *= (scale ? *scale : c_local).array();
  if (has_bias_) y.rowwise() += bias_;
}

template <class Scalar>
void FusedLoRALinear<Scalar>::forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) const {
  const char* where = "FusedLoRALinear::forward";
  if (training_)
    throw state_error(std::string(where) +
                      " on a const layer runs in eval mode only, but the layer is in training mode: call eval() first");
  check_forward_args(where, x, y);
  Mat H;  // locals: concurrent callers share nothing
  std::vector<Mat> Bt;
  std::vector<detail::LowRankTerm> terms;
  forward_impl(x, x, H, Bt, terms, y);
}

template <class Scalar>
void FusedLoRALinear<Scalar>::forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) {
  if (!training_) {
    std::as_const(*this).forward(x, y);
    return;
  }
  const char* where = "FusedLoRALinear::forward";
  if (merged_) throw state_error(std::string(where) + ": the layer is merged; call unmerge() before training");
  check_forward_args(where, x, y);
  const Index N = x.rows();
  cached_rows_ = -1;
  if (rank_ > 0 && dropout_ > 0) {
    mask_.resize(N, in_);
    x_dropped_.resize(N, in_);
    detail::draw_dropout_mask(dropout_rng_, dropout_, mask_);
    x_dropped_ = x.cwiseProduct(mask_);
    if (dora_) {
      // y = x Wᵀ − drop(x) Wᵀ + b + c ⊙ Z with Z = drop(x) Wᵀ + [s_k · H_k B_kᵀ], H = drop(x) Aᵀ
      dora_norm_ = dora_norm(where);
      dora_scale_ = magnitude().row(0).cwiseQuotient(dora_norm_);
      H_.resize(N, rank_);
      H_.noalias() = x_dropped_ * stacked_A().transpose();
      Z_.resize(N, out_);
      weight_.forward(x_dropped_, Z_);
      weight_.forward(x, y);
      y -= Z_;
      for (std::size_t k = 0; k < slices_.size(); ++k)
        if (slice_rank(k) > 0)
          Z_.middleCols(out_offset_[k], slices_[k].out_features).noalias() +=
              scaling_[k] * H_.middleCols(a_row_[k], slice_rank(k)) * lora_B(k).transpose();
      y.array() += Z_.array().rowwise() * dora_scale_.array();
      if (has_bias_) y.rowwise() += bias_;
    } else {
      forward_impl(x, x_dropped_, H_, Bt_, terms_, y);
    }
  } else if (dora_) {
    forward_impl(x, x, H_, Bt_, terms_, y, &Z_, &dora_norm_, &dora_scale_);
  } else {
    forward_impl(x, x, H_, Bt_, terms_, y);
  }
  cached_rows_ = N;
}

template <class Scalar>
void FusedLoRALinear<Scalar>::backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy, MutRef<Scalar> dx) {
  detail::check_shape("FusedLoRALinear::backward", "dx", dx, x.rows(), in_);
  detail::check_no_overlap("FusedLoRALinear::backward", "dx", dx, "dy", dy);
  backward_impl(x, dy, &dx);
}

template <class Scalar>
void FusedLoRALinear<Scalar>::backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy) {
  backward_impl(x, dy, nullptr);
}

template <class Scalar>
void FusedLoRALinear<Scalar>::backward_impl(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy, MutRef<Scalar>* dx) {
  const char* where = "FusedLoRALinear::backward";
  if (!training_)
    throw state_error(std::string(where) + ": the layer is in eval mode; call train() and run forward again");
  detail::check_shape(where, "x", x, -1, in_);
  detail::check_shape(where, "dy", dy, x.rows(), out_);
  detail::check_cached_forward(where, cached_rows_, x.rows());
  const Index N = x.rows();
  // DoRA: y = b + c ⊙ Z with c constant, so dm += Σ dy ⊙ Z / n, and Z's gradient dy ⊙ c goes where dy went
  if (dora_) {
    MatrixMap<Scalar>(grads_.data() + m_at_, 1, out_).array() +=
        (dy.array() * Z_.array()).colwise().sum() / dora_norm_.array();
    D_ = dy.array().rowwise() * dora_scale_.array();
  }
  const ConstRef<Scalar> dz = dora_ ? ConstRef<Scalar>(D_) : dy;
  if (rank_ > 0) {
    // forward: y_k += s_k · H_k B_kᵀ, so dB_k += s_k · dy_kᵀ H_k and dH_k = s_k · dy_k B_k (= G_k); and
    // H = drop(x) Aᵀ, so dA += Gᵀ drop(x), all slices in one product. dB_kᵀ (R_k, O_k) is the product's wide
    // shape: 1.6x (Eigen) to 2.7x (oneDNN) faster than dB_k's (O_k, R_k), and it is added into dB_k after.
    G_.resize(N, rank_);
    const ConstRef<Scalar> xa = dropout_ > 0 ? ConstRef<Scalar>(x_dropped_) : x;
    const char* name = "FusedLoRALinear::backward";
    for (std::size_t k = 0; k < slices_.size(); ++k) {
      if (slice_rank(k) == 0) continue;
      const Index O_k = slices_[k].out_features, R_k = slice_rank(k);
      const auto dy_k = dz.middleCols(out_offset_[k], O_k);
      if (dBt_.size() < R_k * O_k) dBt_.resize(R_k * O_k);  // grow-only: slices of other shapes reuse it
      MatrixMap<Scalar> dBt(dBt_.data(), R_k, O_k);
      detail::product<Scalar>(name, scaling_[k], H_.middleCols(a_row_[k], R_k), true, dy_k, false, false, dBt);
      MatrixMap<Scalar>(grads_.data() + b_at_[k], O_k, R_k) += dBt.transpose();
      detail::product<Scalar>(name, scaling_[k], dy_k, false, lora_B(k), false, false, G_.middleCols(a_row_[k], R_k));
    }
    detail::product<Scalar>(name, Scalar(1), G_, true, xa, false, true, MatrixMap<Scalar>(grads_.data(), rank_, in_));
  }
  if (dx != nullptr) {
    if (rank_ > 0) {
      // dx = (G A) ⊙ mask + dy W: the low-rank term written first (after every read of x, so dx may be x's
      // buffer), the base product added into it.
      if (dora_ && dropout_ > 0) {
        // y = x Wᵀ − drop(x) Wᵀ + b + c ⊙ Z: dx = dy W + mask ⊙ ((dy ⊙ (c − 1)) W + G A)
        Mat low(N, in_);
        weight_.backward(Mat(dy.array().rowwise() * (dora_scale_.array() - Scalar(1))), low);
        low.noalias() += G_ * stacked_A();
        weight_.backward(dy, *dx);
        *dx += low.cwiseProduct(mask_);
        return;
      }
      detail::product<Scalar>("FusedLoRALinear::backward", Scalar(1), G_, false, stacked_A(), false, false, *dx);
      if (dropout_ > 0) dx->array() *= mask_.array();
      weight_.backward_add(dz, *dx);
    } else {
      weight_.backward(dz, *dx);
    }
  }
}

template <class Scalar>
void FusedLoRALinear<Scalar>::merge(bool safe_merge) {
  if (merged_ || rank_ == 0) return;
  const char* where = "FusedLoRALinear::merge";
  weight_.require_writable(where);
  if (dora_) {
    // W ← c ⊙ (W + Σ_k s_k B_k A_k) per row, c = m / n (PEFT's DoraLinearVariant.merge_safe on the fused module)
    const Row c = magnitude().row(0).cwiseQuotient(dora_norm(where));
    weight_.merge_dora(where, "output row", Scalar(1), placed_B(params_, scaling_), stacked_A(), c, safe_merge);
    merged_dora_scale_ = c;
    merged_params_ = params_;
    merged_scaling_ = scaling_;
    merged_ = true;
    return;
  }
  if (safe_merge)
    for (std::size_t k = 0; k < slices_.size(); ++k)
      if (slice_rank(k) > 0) weight_.check_low_rank_finite(where, scaling_[k], lora_B(k), lora_A(k), out_offset_[k]);
  for (std::size_t k = 0; k < slices_.size(); ++k)
    if (slice_rank(k) > 0) weight_.add_low_rank(where, scaling_[k], lora_B(k), lora_A(k), out_offset_[k]);
  merged_params_ = params_;
  merged_scaling_ = scaling_;
  merged_ = true;
}

template <class Scalar>
void FusedLoRALinear<Scalar>::unmerge() {
  if (!merged_) return;
  if (dora_) {
    // W ← W / c − Σ_k s_k B_k A_k (PEFT's unmerge); ‖W_o‖² again, as rounding moved W
    weight_.add_low_rank_scaled("FusedLoRALinear::unmerge", Scalar(-1), placed_B(merged_params_, merged_scaling_),
                                ConstMatrixMap<Scalar>(merged_params_.data(), rank_, in_), merged_dora_scale_.data(),
                                nullptr);
    w_sq_norms_ = weight_.output_squared_norms();
    merged_dora_scale_.resize(0);
    merged_params_.resize(0);
    merged_ = false;
    return;
  }
  for (std::size_t k = 0; k < slices_.size(); ++k) {
    if (slice_rank(k) == 0) continue;
    const ConstMatrixMap<Scalar> A(merged_params_.data() + a_at(k), slice_rank(k), in_);
    const ConstMatrixMap<Scalar> B(merged_params_.data() + b_at_[k], slices_[k].out_features, slice_rank(k));
    weight_.add_low_rank("FusedLoRALinear::unmerge", -merged_scaling_[k], B, A, out_offset_[k]);
  }
  merged_params_.resize(0);
  merged_ = false;
}

template <class Scalar>
LoRALinear<Scalar> FusedLoRALinear<Scalar>::to_lora(bool use_rslora) const {
  if (rank_ == 0) throw config_error("FusedLoRALinear::to_lora: no slice has an adapter");
  // The slices' common scaling when they share one (not 0, which B could not be recovered from), else 1.
  double common = 0;
  for (std::size_t k = 0; k < slices_.size(); ++k) {
    if (slice_rank(k) == 0) continue;
    const double s_k = static_cast<double>(scaling_[k]);
    if (common == 0) {
      common = s_k;
    } else if (s_k != common) {
      common = 1;
      break;
    }
  }
  if (common == 0) common = 1;
  LoraConfig c;
  c.r = static_cast<int>(rank_);
  c.lora_alpha = common * (use_rslora ? std::sqrt(static_cast<double>(rank_)) : static_cast<double>(rank_));
  c.use_rslora = use_rslora;
  c.lora_dropout = static_cast<double>(dropout_);
  c.use_dora = dora_;
  c.seed = 0;  // A and B are set below
  LoRALinear<Scalar> single = has_bias_ ? LoRALinear<Scalar>(weight_.read_only_view(), bias_, c)
                                        : LoRALinear<Scalar>(weight_.read_only_view(), c);
  single.lora_A() = stacked_A();
  auto B = single.lora_B();
  B.setZero();
  for (std::size_t k = 0; k < slices_.size(); ++k)
    if (slice_rank(k) > 0)
      B.block(out_offset_[k], a_row_[k], slices_[k].out_features, slice_rank(k)) =
          (scaling_[k] / single.scaling()) * lora_B(k);
  if (dora_) single.magnitude() = magnitude();  // the same n: s·B A is Σ_k s_k B_k A_k
  single.eval();
  return single;
}

template <class Scalar>
void FusedLoRALinear<Scalar>::from_lora(const LoRALinear<Scalar>& single) {
  const char* where = "FusedLoRALinear::from_lora";
  if (single.rank() != rank_ || single.in_features() != in_ || single.out_features() != out_)
    throw config_error(std::string(where) + ": the LoRA has rank " + std::to_string(single.rank()) + " over " +
                       shape_string(single.out_features(), single.in_features()) + ", the slices need rank " +
                       std::to_string(rank_) + " (the sum of their ranks) over " + shape_string(out_, in_));
  if (single.use_dora() != dora_)
    throw config_error(std::string(where) + (dora_ ? ": the slices are DoRA, the LoRA is not"
                                                   : ": the LoRA is DoRA (it has a magnitude), the slices are not; "
                                                     "build them with use_dora"));
  const auto B = single.lora_B();
  for (std::size_t k = 0; k < slices_.size(); ++k) {
    if (slice_rank(k) > 0 && scaling_[k] == Scalar(0))
      throw config_error(std::string(where) + ": slice \"" + slices_[k].name +
                         "\" has scaling 0 (lora_alpha 0), so its B cannot be recovered");
    for (Index o = out_offset_[k]; o < out_offset_[k] + slices_[k].out_features; ++o)
      for (Index c = 0; c < rank_; ++c) {
        const bool own = c >= a_row_[k] && c < a_row_[k] + slice_rank(k);
        if (!own && B(o, c) != Scalar(0))
          throw config_error(std::string(where) + ": lora_B[" + std::to_string(o) + ", " + std::to_string(c) + "] is " +
                             std::to_string(static_cast<double>(B(o, c))) + ", but output " + std::to_string(o) +
                             " belongs to slice \"" + slices_[k].name + "\", whose adapter has columns " +
                             std::to_string(a_row_[k]) + ".." + std::to_string(a_row_[k] + slice_rank(k) - 1) +
                             " only: this LoRA is not one adapter per slice; load it as one LoRALinear over the "
                             "fused weight instead");
      }
  }
  MatrixMap<Scalar>(params_.data(), rank_, in_) = single.lora_A();
  if (dora_) magnitude() = single.magnitude();
  for (std::size_t k = 0; k < slices_.size(); ++k)
    if (slice_rank(k) > 0)
      lora_B(k) =
          (single.scaling() / scaling_[k]) * B.block(out_offset_[k], a_row_[k], slices_[k].out_features, slice_rank(k));
}

}  // namespace lora
