// MultiLoRALinear: one frozen dense layer shared by any number of named adapters.
//
//   x (N, I), W (O, I), b (O), for adapter a: A_a (R_a, I), B_a (O, R_a), y (N, O)
//
//   active set S:          y   = x Wᵀ + b + Σ_{a∈S} s_a · (x A_aᵀ) B_aᵀ
//   mixed batch (row n     y_n = x_n Wᵀ + b + s_{a_n} · (x_n A_{a_n}ᵀ) B_{a_n}ᵀ
//   uses adapter a_n):           (no adapter term for a row marked base)
//   s_a = scale_a · lora_alpha_a / r_a   (/ sqrt(r_a) with rsLoRA; scale_a from set_scale, 1 by default)
//
// DoRA adapters (config.use_dora, PEFT's DoraLinearLayer) carry a magnitude m_a (O) and, computed when the
// adapter is published (W never changes here), c_a = m_a / ‖W + s_a·B_a A_a‖ per output row. Their term in
// either forward is PEFT's (c_a − 1) ⊙ x Wᵀ + c_a ⊙ s_a·(x A_aᵀ) B_aᵀ: alone, y = b + c_a ⊙ (x Wᵀ + s_a·H B_aᵀ),
// and a row of a mixed batch gets exactly that (PEFT refuses mixed batches with DoRA; the row-wise form is the
// same output each row would get from its adapter alone).
//
// The base product x Wᵀ runs once for the whole batch; the rows of a mixed
// batch are grouped by adapter so every low-rank product is a matrix-matrix
// product over all rows that use that adapter (the CPU analogue of punica's
// and S-LoRA's SGMV kernels).
//
// Serving and hot swap. The adapters, the active set and the scales live in
// one immutable snapshot behind a shared_ptr. Every eval forward takes the
// snapshot once (an atomic shared_ptr load) and computes with it alone;
// add / replace / remove / set_active_adapters / set_scale build a new
// snapshot and publish it with one atomic store. A reader therefore sees the
// old adapter set or the new one, never a half-written adapter, and waits at
// most for that pointer copy. Those calls are safe while other threads run
// the const forwards; structural calls from several threads at once are
// serialised by a mutex. An adapter costs r (I + O) scalars plus its name and
// config: the base weight is never copied.
//
// Training. train_adapter(name) picks one adapter to train and makes it the
// only active one. Its A and B are copied into a private LoRALinear that
// views W (so the published adapter is never written while readers may hold
// it); forward / backward / parameters() / zero_grad() go to that copy,
// exactly as for a LoRALinear, and only that adapter gets gradient buffers.
// eval() (or finish_training()) publishes the trained A and B as a new
// snapshot. The other adapters and W are never written.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/config.hpp>
#include <lora/detail/checks.hpp>
#include <lora/errors.hpp>
#include <lora/linear.hpp>
#include <lora/params.hpp>
#include <lora/types.hpp>
#include <lora/weight.hpp>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace lora {

/// One named adapter of a MultiLoRALinear, as published: immutable once a
/// layer holds it (readers share it through shared_ptr<const NamedAdapter>).
template <class Scalar>
struct NamedAdapter {
  std::string name;
  int id = -1;            ///< stable for the adapter's life in the layer, kept by replace_adapter
  LoraConfig config;      ///< r, lora_alpha, use_rslora; lora_dropout applies when it trains
  double scale = 1;       ///< runtime multiplier (set_scale), 1 as loaded
  Matrix<Scalar> lora_A;  ///< (R, I)
  Matrix<Scalar> lora_B;  ///< (O, R)
  /// DoRA (config.use_dora): the magnitude m (1, O), and c = m / ‖W + s·B A‖ (1, O) at this adapter's
  /// scaling, computed when it was published. Both empty without DoRA.
  Matrix<Scalar> magnitude;
  Matrix<Scalar> dora_scale;

  Index rank() const { return config.r; }
  /// s = scale · lora_alpha / r (or / sqrt(r) with rsLoRA).
  Scalar scaling() const { return static_cast<Scalar>(scale * config.scaling()); }
};

/// How add_weighted_adapter combines adapters (PEFT's combination_type).
enum class Combination {
  /// Equal ranks r: A = Σ sign(wᵢsᵢ)·sqrt|wᵢsᵢ|·Aᵢ, B = Σ sqrt|wᵢsᵢ|·Bᵢ (rank r). As PEFT,
  /// the product BA then holds cross terms Bᵢ Aⱼ when several adapters are combined.
  linear,
  /// Ranks add up: A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁ B₂ ...], so B A = Σ wᵢ sᵢ Bᵢ Aᵢ exactly.
  cat,
  /// Truncated SVD of Σ wᵢ sᵢ Bᵢ Aᵢ to svd_rank: B = U_r Σ_r, A = V_rᵀ. Two differences from
  /// PEFT's code (read at huggingface/peft 0027783): PEFT weights each get_delta_weight(), which
  /// already holds sᵢ, by wᵢ·sᵢ again (Σ wᵢ sᵢ² Bᵢ Aᵢ; the same whenever every sᵢ = 1), and PEFT
  /// turns a single source adapter into `linear`, ignoring svd_rank; here one adapter is truncated
  /// to svd_rank, which is how an adapter is compressed to a lower rank.
  svd,
};

inline const char* combination_name(Combination c) {
  switch (c) {
    case Combination::linear:
      return "linear";
    case Combination::cat:
      return "cat";
    case Combination::svd:
      return "svd";
  }
  return "?";
}

template <class Scalar>
class MultiLoRALinear {
  static_assert(std::is_floating_point_v<Scalar>,
                "MultiLoRALinear<Scalar>: Scalar must be float, double or long double");

 public:
  using Mat = Matrix<Scalar>;
  using Row = RowVector<Scalar>;
  using AdapterPtr = std::shared_ptr<const NamedAdapter<Scalar>>;

  /// Marks a row of a mixed batch that runs the base layer alone (PEFT's "__base__").
  static constexpr const char* base_name = "__base__";
  static constexpr int base_id = -1;

  /// Owns W (O, I), without bias / with bias (O).
  explicit MultiLoRALinear(Mat weight);
  MultiLoRALinear(Mat weight, Row bias);
  /// Wraps a row-major (O, I) buffer the caller owns and never writes to it; the
  /// bias, when given, is copied. The buffer must outlive the layer.
  static MultiLoRALinear view(const Scalar* weight, Index out_features, Index in_features,
                              const Scalar* bias = nullptr);
  /// Any frozen weight (<lora/weight.hpp>): owned or viewed, (O, I) or (I, O) as a Conv1D checkpoint stores it;
  /// bias (O) or none (empty). MultiLoRALinear never writes W.
  explicit MultiLoRALinear(FrozenWeight<Scalar> weight, Row bias = Row());

  MultiLoRALinear(MultiLoRALinear&&) noexcept = default;
  MultiLoRALinear& operator=(MultiLoRALinear&&) noexcept = default;

  // ---- adapters ----------------------------------------------------------------

  /// Adds a fresh adapter initialised from config (B = 0 by default, so the
  /// layer's output does not change). Not active until set_active_adapters.
  /// Throws config_error for a duplicate or reserved name, or config.bias != none
  /// (the base bias is shared by every adapter and stays frozen).
  void add_adapter(const std::string& name, const LoraConfig& config);
  /// Adds an adapter with the given A (R, I) and B (O, R); R must equal config.r. With config.use_dora,
  /// `magnitude` (1, O) is DoRA's m; left empty it starts as ‖W + s·B A‖ per row (PEFT's init).
  void add_adapter(const std::string& name, const LoraConfig& config, const ConstRef<Scalar>& lora_A,
                   const ConstRef<Scalar>& lora_B, const Matrix<Scalar>& magnitude = Matrix<Scalar>());
  /// Replaces an existing adapter's weights and config (hot swap); keeps its id,
  /// its scale and whether it is active. Readers see the old or the new one.
  void replace_adapter(const std::string& name, const LoraConfig& config, const ConstRef<Scalar>& lora_A,
                       const ConstRef<Scalar>& lora_B, const Matrix<Scalar>& magnitude = Matrix<Scalar>());
  /// Removes an adapter (and drops it from the active set). Forwards already
  /// running keep the snapshot they took.
  void remove_adapter(const std::string& name);

  bool has_adapter(const std::string& name) const;
  /// Names in the order they were added.
  std::vector<std::string> adapter_names() const;
  std::size_t adapter_count() const;
  /// The published adapter (a snapshot: later replacements do not change it).
  AdapterPtr adapter(const std::string& name) const;
  /// The adapter's stable id, for the id form of the mixed-batch forward.
  int adapter_id(const std::string& name) const;

  /// Sets the adapters whose paths forward() sums (PEFT's set_adapter with a list).
  /// An empty list gives the base output. Throws for an unknown or repeated name.
  void set_active_adapters(const std::vector<std::string>& names);
  void set_adapter(const std::string& name) { set_active_adapters({name}); }
  std::vector<std::string> active_adapters() const;

  /// PEFT's set_scale: s_a = scale · lora_alpha / r (rsLoRA: / sqrt(r)). Must be finite.
  void set_scale(const std::string& name, double scale);
  double scale(const std::string& name) const;

  /// Turns every adapter off (forward gives x Wᵀ + b) without forgetting the active set.
  void disable_adapters() { set_enabled(false); }
  void enable_adapters() { set_enabled(true); }
  bool adapters_enabled() const;

  /// PEFT's add_weighted_adapter: a new adapter `new_name` from `adapters` with
  /// `weights`, with lora_alpha = r so its scaling is 1 (use_rslora off; PEFT
  /// fixed the same overscaling in its #3449). svd_rank 0 means the largest
  /// rank among the sources. Not activated. Throws config_error naming the
  /// adapter for an unknown or duplicate name, unequal ranks for linear, weights
  /// that are not finite, or (svd) weights that cancel to a zero update.
  void add_weighted_adapter(const std::vector<std::string>& adapters, const std::vector<double>& weights,
                            const std::string& new_name, Combination combination, int svd_rank = 0);

  // ---- forward --------------------------------------------------------------------

  /// Eval forward with the active adapters summed: x (N, I) -> y (N, O). Safe
  /// from several threads at once and against concurrent hot swaps.
  void forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) const;
  Mat forward(const ConstRef<Scalar>& x) const;

  /// Mixed batch: row n uses adapter row_adapters[n] alone (base_name for none),
  /// whatever the active set. Unknown names throw config_error naming the row.
  void forward(const ConstRef<Scalar>& x, const std::vector<std::string>& row_adapters, MutRef<Scalar> y) const;
  /// As above with adapter ids (adapter_id(); base_id for none).
  void forward(const ConstRef<Scalar>& x, const std::vector<int>& row_ids, MutRef<Scalar> y) const;

  /// Training forward (when training and an adapter was chosen with
  /// train_adapter) or the eval forward otherwise. Safe to call from several
  /// threads, also while another thread calls train_adapter / eval /
  /// finish_training: training forwards are serialised with those calls, and
  /// an eval-mode call is the const forward. Threads that must serve while
  /// another trains call the const overload (std::as_const(layer).forward),
  /// which never runs the trainer.
  void forward(const ConstRef<Scalar>& x, MutRef<Scalar> y);

  // ---- training -----------------------------------------------------------------------

  /// Chooses the adapter that trains, makes it the only active one and switches
  /// to training mode. A previously trained adapter is published first.
  void train_adapter(const std::string& name);
  /// The trained adapter's name, or "" when none is chosen.
  std::string trained_adapter() const {
    std::lock_guard<std::mutex> lock(*trainer_lock_);
    return trained_name_;
  }
  void backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy, MutRef<Scalar> dx);
  void backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy);
  void zero_grad();
  /// The trained adapter's lora_A and lora_B with their gradients, named "<adapter>.lora_A" / ".lora_B".
  ParameterList<Scalar> parameters();
  /// dA / dB of the trained adapter.
  ConstMatrixMap<Scalar> dA() const;
  ConstMatrixMap<Scalar> dB() const;

  void train(bool mode = true);
  /// Leaves training mode and publishes the trained adapter's A and B.
  void eval() { train(false); }
  bool is_training() const { return training_->load(); }
  /// Publishes the trained adapter and frees its gradient buffers; parameters()
  /// handed out before become invalid.
  void finish_training();

  // ---- shape and accounting -----------------------------------------------------------

  /// W (O, I). Throws state_error when W is stored (I, O): use frozen_weight() there.
  ConstMatrixMap<Scalar> weight() const {
    if (weight_.layout() != WeightLayout::out_in)
      throw state_error(
          "MultiLoRALinear::weight: W is stored (in, out) (fan_in_fan_out), so there is no (out, in) matrix to map; "
          "use frozen_weight().stored() for the buffer as it is, or frozen_weight().to_dense() for an (out, in) copy");
    return weight_.stored();
  }
  const FrozenWeight<Scalar>& frozen_weight() const { return weight_; }
  WeightLayout weight_layout() const { return weight_.layout(); }
  /// b (1, O); empty when the layer has no bias.
  ConstMatrixMap<Scalar> bias() const { return ConstMatrixMap<Scalar>(bias_.data(), has_bias_ ? 1 : 0, out_); }
  bool has_bias() const { return has_bias_; }
  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  /// Scalars held by the adapters' A and B (and DoRA magnitudes): Σ r_a (I + O) (+ O).
  Index adapter_parameter_count() const;

 private:
  struct State {
    std::vector<AdapterPtr> adapters;  // in the order added
    std::vector<std::string> active;
    bool enabled = true;
  };
  using StatePtr = std::shared_ptr<const State>;

  StatePtr snapshot() const { return std::atomic_load(&state_); }
  void publish(StatePtr next) { std::atomic_store(&state_, std::move(next)); }
  static const AdapterPtr* find(const State& s, const std::string& name);
  const AdapterPtr& require(const State& s, const std::string& name, const char* where) const;
  std::string known_names(const State& s) const;
  AdapterPtr make_adapter(const char* where, const std::string& name, int id, const LoraConfig& config,
                          const ConstRef<Scalar>& A, const ConstRef<Scalar>& B, double scale,
                          const Matrix<Scalar>& magnitude) const;
  /// DoRA: c = m / ‖W + s·B A‖ for `a` (its config, scale, A, B and magnitude set). Called with writers_ held.
  void set_dora_scale(const char* where, NamedAdapter<Scalar>& a) const;
  void check_new_name(const char* where, const State& s, const std::string& name) const;
  void set_enabled(bool enabled);
  /// Throws state_error when `name` is the adapter being trained (its published copy would go stale).
  void check_not_training(const char* where, const std::string& name) const;
  /// Publishes `now` with the adapter named a->name replaced by a.
  void publish_replacing(const State& now, AdapterPtr a);
  void publish_trained_locked();
  LoRALinear<Scalar>& trainer(const char* where);
  const LoRALinear<Scalar>& trainer(const char* where) const;
  /// Adds s · (x_rows A_aᵀ) B_aᵀ for each group of rows; row_adapter[n] indexes state.adapters or is -1.
  void forward_grouped(const ConstRef<Scalar>& x, const State& state, const std::vector<int>& row_adapter,
                       MutRef<Scalar> y) const;
  void base_forward(const char* where, const ConstRef<Scalar>& x, MutRef<Scalar> y) const;

  Index in_ = 0, out_ = 0;
  FrozenWeight<Scalar> weight_;  // never written
  bool has_bias_ = false;
  Row bias_;

  StatePtr state_;                                               // read with atomic_load, replaced with atomic_store
  mutable Eigen::Matrix<double, Eigen::Dynamic, 1> w_sq_norms_;  // DoRA: ‖W_o‖², computed once, under writers_
  std::unique_ptr<std::mutex> writers_ = std::make_unique<std::mutex>();
  int next_id_ = 0;

  // The training state. training_ is atomic so the non-const forward can tell, without a lock, that it
  // serves (the common case); trainer_ and trained_name_ are read and written under trainer_lock_.
  std::unique_ptr<std::atomic<bool>> training_ = std::make_unique<std::atomic<bool>>(false);
  std::unique_ptr<std::mutex> trainer_lock_ = std::make_unique<std::mutex>();
  std::string trained_name_;
  std::unique_ptr<LoRALinear<Scalar>> trainer_;  // views W; holds the trained adapter's A, B and gradients
};

}  // namespace lora

#include <lora/detail/multi_impl.hpp>
