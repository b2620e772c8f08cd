// LoRAEmbedding: a frozen embedding table with PEFT's embedding LoRA.
//
//   ids (N) in [0, V), table E (V, d), A (R, V), B (d, R), y (N, d)
//
//   forward:   H[n]  = A[:, ids[n]]ᵀ                      (N, R)   a gather: no product with V
//              y[n]  = E[ids[n]] + s · H[n] Bᵀ             (N, d)
//   backward:  dB   += s · dyᵀ H                           (d, R)
//              dA[:, ids[n]] += s · (dy B)[n]ᵀ             only the columns the batch used; repeated ids add up
//   merge:     E    += s · (B A)ᵀ                          (V, d)   as PEFT's get_delta_weight (transposed)
//
// As PEFT's lora.Embedding: lora_embedding_A is (r, num_embeddings) and
// lora_embedding_B (embedding_dim, r), A starts at zero and B normal(0, 1)
// (with init_lora_weights = True; "random" draws both normal), no dropout
// is applied (PEFT creates the dropout layer but its embedding forward does
// not use it), and a padding index, when given, gets no gradient in A, as
// F.embedding(padding_idx=...) does. The cost of forward and backward grows
// with N, R and d, never with V.
//
// DoRA (config.use_dora), as PEFT's DoraEmbeddingLayer / DoraEmbeddingVariant: a trainable magnitude m (d), one
// per embedding dimension, initialised to n; with n_j = ‖E[:, j] + s · (B A)ᵀ[:, j]‖ over the V ids (the norm of
// row j of the embedding's (d, V) weight, as PEFT takes it with fan_in_fan_out) and c = m / n,
//
//   forward:   y[n]  = c ⊙ (E[ids[n]] + s · H[n] Bᵀ)                 n held constant in backward, as PEFT detaches it
//   backward:  dm   += Σ_n dy[n] ⊙ (E[ids[n]] + s · H[n] Bᵀ) / n,  then LoRA's backward with dy ⊙ c
//   merge:     E    ← (E + s · (B A)ᵀ) ⊙ c per column;  unmerge: E ← E / c − s · (B A)ᵀ
//
// n comes from ‖E[:, j]‖² (kept), A E (R, d) and A Aᵀ (R, R), so each forward costs R · V · d more than LoRA's:
// a norm over the whole table depends on all of A, as it does in PEFT.
//
// The table is a FrozenWeight stored (V, d): an embedding is the linear map
// one_hot(ids) E with I = V inputs and O = d outputs stored (I, O), so an
// owned table, a view of a checkpoint's buffer and merging work as for the
// other layers.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/config.hpp>
#include <lora/detail/checks.hpp>
#include <lora/detail/random.hpp>
#include <lora/errors.hpp>
#include <lora/linear.hpp>
#include <lora/params.hpp>
#include <lora/types.hpp>
#include <lora/weight.hpp>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lora {

template <class Scalar>
class LoRAEmbedding {
  static_assert(std::is_floating_point_v<Scalar>, "LoRAEmbedding<Scalar>: Scalar must be float, double or long double");

 public:
  using Mat = Matrix<Scalar>;

  /// Owns the table (V, d).
  explicit LoRAEmbedding(Mat table, const LoraConfig& config = {}, std::optional<Index> padding_idx = std::nullopt)
      : LoRAEmbedding(FrozenWeight<Scalar>::owned(check_table(std::move(table)), WeightLayout::in_out), config,
                      padding_idx) {}

  /// Any table: a FrozenWeight whose outputs are the embedding dimension d and whose inputs are the V ids,
  /// stored (V, d), e.g. FrozenWeight<float>::view(ptr, d, V, WeightLayout::in_out) over a checkpoint's
  /// wte / embed_tokens tensor, or mutable_view to allow merging.
  explicit LoRAEmbedding(FrozenWeight<Scalar> table, const LoraConfig& config = {},
                         std::optional<Index> padding_idx = std::nullopt);

  /// Views a row-major (V, d) buffer the caller owns; never written (merge() throws).
  static LoRAEmbedding view(const Scalar* table, Index num_embeddings, Index embedding_dim,
                            const LoraConfig& config = {}, std::optional<Index> padding_idx = std::nullopt) {
    return LoRAEmbedding(FrozenWeight<Scalar>::view(table, embedding_dim, num_embeddings, WeightLayout::in_out), config,
                         padding_idx);
  }

  // ---- forward / backward -------------------------------------------------

  /// ids (N) -> y (N, d). Training mode keeps H for backward. Throws shape_error naming the position and the
  /// id for an id outside [0, V), before writing y.
  void forward(const std::vector<Index>& ids, MutRef<Scalar> y);
  /// Eval-mode forward: nothing cached, safe from several threads at once.
  void forward(const std::vector<Index>& ids, MutRef<Scalar> y) const;
  Mat forward(const std::vector<Index>& ids) const {
    Mat y(static_cast<Index>(ids.size()), dim_);
    forward(ids, y);
    return y;
  }
  /// dy (N, d): adds into dB and into the columns of dA that `ids` (the last training forward's) used.
  void backward(const std::vector<Index>& ids, const ConstRef<Scalar>& dy);
  void zero_grad() { grads_.setZero(); }

  void train(bool mode = true) { training_ = mode; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  /// E += s · (B A)ᵀ, once; safe_merge checks the result finite first and leaves E untouched otherwise.
  /// Throws state_error for a read-only table.
  void merge(bool safe_merge = true);
  void unmerge();
  bool is_merged() const { return merged_; }

  // ---- tensors ----------------------------------------------------------------

  /// lora_embedding_A (R, V) and lora_embedding_B (d, R), PEFT's names and shapes.
  MatrixMap<Scalar> lora_A() { return MatrixMap<Scalar>(params_.data(), rank_, vocab_); }
  ConstMatrixMap<Scalar> lora_A() const { return ConstMatrixMap<Scalar>(params_.data(), rank_, vocab_); }
  MatrixMap<Scalar> lora_B() { return MatrixMap<Scalar>(params_.data() + rank_ * vocab_, dim_, rank_); }
  ConstMatrixMap<Scalar> lora_B() const { return ConstMatrixMap<Scalar>(params_.data() + rank_ * vocab_, dim_, rank_); }
  ConstMatrixMap<Scalar> dA() const { return ConstMatrixMap<Scalar>(grads_.data(), rank_, vocab_); }
  ConstMatrixMap<Scalar> dB() const { return ConstMatrixMap<Scalar>(grads_.data() + rank_ * vocab_, dim_, rank_); }
  /// "lora_embedding_A" and "lora_embedding_B" with their gradients, and DoRA's "lora_magnitude_vector".
  ParameterList<Scalar> parameters();

  // ---- DoRA -------------------------------------------------------------------

  bool use_dora() const { return dora_; }
  /// DoRA's magnitude m (1, d); empty without DoRA. Trainable, like A and B.
  MatrixMap<Scalar> magnitude() { return MatrixMap<Scalar>(params_.data() + magnitude_offset(), 1, dora_ ? dim_ : 0); }
  ConstMatrixMap<Scalar> magnitude() const {
    return ConstMatrixMap<Scalar>(params_.data() + magnitude_offset(), 1, dora_ ? dim_ : 0);
  }
  /// dm (1, d); empty without DoRA.
  ConstMatrixMap<Scalar> dmagnitude() const {
    return ConstMatrixMap<Scalar>(grads_.data() + magnitude_offset(), 1, dora_ ? dim_ : 0);
  }
  /// n = ‖E[:, j] + s · (B A)ᵀ[:, j]‖ per embedding dimension j (1, d), from the current table, A and B.
  RowVector<Scalar> weight_norm() const;
  /// m ← n: the magnitude that makes the layer output what plain LoRA would (PEFT's init).
  void reset_magnitude();

  /// The table (V, d) as stored.
  ConstMatrixMap<Scalar> table() const { return table_.stored(); }
  const FrozenWeight<Scalar>& frozen_weight() const { return table_; }

  Index num_embeddings() const { return vocab_; }
  Index embedding_dim() const { return dim_; }
  Index rank() const { return rank_; }
  Scalar scaling() const { return scaling_; }
  const LoraConfig& config() const { return config_; }
  std::optional<Index> padding_idx() const { return padding_; }
  ParameterCount parameter_count() const { return {rank_ * (vocab_ + dim_) + (dora_ ? dim_ : 0), vocab_ * dim_}; }

 private:
  static Mat check_table(Mat table) {
    if (table.rows() <= 0 || table.cols() <= 0)
      throw shape_error("LoRAEmbedding: the table must be (num_embeddings, embedding_dim) with both positive, got " +
                        shape_string(table.rows(), table.cols()));
    return table;
  }
  void check_ids(const char* where, const std::vector<Index>& ids) const;
  void gather(const std::vector<Index>& ids, MutRef<Scalar> y, Mat& H) const;
  Index magnitude_offset() const { return rank_ * (vocab_ + dim_); }
  RowVector<Scalar> dora_norm(const char* where) const {
    return table_.low_rank_row_norms(where, "embedding dimension", dora_ ? w_sq_norms_ : table_.output_squared_norms(),
                                     scaling_, lora_B(), lora_A());
  }

  FrozenWeight<Scalar> table_;
  Index vocab_ = 0, dim_ = 0, rank_ = 0;
  LoraConfig config_;
  Scalar scaling_ = 0;
  std::optional<Index> padding_;
  Vector<Scalar> params_, grads_;  // [A (R·V) | B (d·R) | m (d), DoRA]
  bool dora_ = false;
  Eigen::Matrix<double, Eigen::Dynamic, 1> w_sq_norms_;  // DoRA: ‖E[:, j]‖², recomputed when E changes
  bool training_ = true;
  bool merged_ = false;
  Mat merged_A_, merged_B_;
  Scalar merged_scaling_ = 0;
  RowVector<Scalar> merged_dora_scale_;  // DoRA: c of the merge, so unmerge() divides by what merge() multiplied
  Index cached_rows_ = -1;
  Mat H_, G_;
  Mat Z_, D_;  // DoRA: (N, d) E[ids] + s·H Bᵀ of the last training forward, and dy ⊙ c
  RowVector<Scalar> dora_norm_, dora_scale_;  // DoRA: n and c = m / n of the last training forward
};

template <class Scalar>
LoRAEmbedding<Scalar>::LoRAEmbedding(FrozenWeight<Scalar> table, const LoraConfig& config,
                                     std::optional<Index> padding_idx)
    : table_(std::move(table)) {
  const char* where = "LoRAEmbedding";
  if (table_.out_features() <= 0) throw shape_error(std::string(where) + ": the table is empty");
  if (table_.layout() != WeightLayout::in_out)
    throw shape_error(std::string(where) +
                      ": the table must be stored (num_embeddings, embedding_dim), as FrozenWeight's "
                      "WeightLayout::in_out with out_features = embedding_dim");
  config.validate();
  if (config.use_dora && config.r == 0)
    throw config_error(std::string(where) + ": use_dora needs r > 0 (DoRA's magnitude rescales the adapter's output)");
  config_ = config.with_seed();
  dora_ = config.use_dora;
  vocab_ = table_.in_features();
  dim_ = table_.out_features();
  rank_ = config.r;
  scaling_ = static_cast<Scalar>(config.scaling());
  if (padding_idx && (*padding_idx < 0 || *padding_idx >= vocab_))
    throw shape_error(std::string(where) + ": padding_idx " + std::to_string(*padding_idx) + " is outside [0, " +
                      std::to_string(vocab_) + ")");
  padding_ = padding_idx;
  params_.setZero(rank_ * (vocab_ + dim_) + (dora_ ? dim_ : 0));
  grads_.setZero(params_.size());
  if (rank_ > 0) {
    // PEFT: zeros_(A), normal_(B) for init_lora_weights = True (and "gaussian"); randn for both when False.
    detail::Rng rng(detail::stream_seed(*config_.seed, detail::stream_adapter));
    if (config.init_lora_weights == InitLoraWeights::random)
      for (Index i = 0; i < rank_ * vocab_; ++i) params_[i] = static_cast<Scalar>(rng.normal());
    for (Index i = rank_ * vocab_; i < magnitude_offset(); ++i) params_[i] = static_cast<Scalar>(rng.normal());
  }
  if (dora_) {  // PEFT's DoraEmbeddingVariant.init: m = n of the new adapter
    w_sq_norms_ = table_.output_squared_norms();
    magnitude() = dora_norm("LoRAEmbedding (use_dora)");
  }
}

template <class Scalar>
ParameterList<Scalar> LoRAEmbedding<Scalar>::parameters() {
  ParameterList<Scalar> list;
  if (rank_ > 0) {
    list.push_back({"lora_embedding_A", params_.data(), grads_.data(), rank_, vocab_});
    list.push_back({"lora_embedding_B", params_.data() + rank_ * vocab_, grads_.data() + rank_ * vocab_, dim_, rank_});
  }
  if (dora_)
    list.push_back(
        {"lora_magnitude_vector", params_.data() + magnitude_offset(), grads_.data() + magnitude_offset(), 1, dim_});
  return list;
}

template <class Scalar>
RowVector<Scalar> LoRAEmbedding<Scalar>::weight_norm() const {
  const char* where = "LoRAEmbedding::weight_norm";
  if (merged_)
    throw state_error(std::string(where) + ": the layer is merged (the table holds the adapter); unmerge() first");
  return dora_norm(where);
}

template <class Scalar>
void LoRAEmbedding<Scalar>::reset_magnitude() {
  const char* where = "LoRAEmbedding::reset_magnitude";
  if (!dora_) throw state_error(std::string(where) + ": the layer has no magnitude (use_dora is off)");
  if (merged_) throw state_error(std::string(where) + ": the layer is merged; unmerge() first");
  magnitude() = dora_norm(where);
}

template <class Scalar>
void LoRAEmbedding<Scalar>::check_ids(const char* where, const std::vector<Index>& ids) const {
  for (std::size_t n = 0; n < ids.size(); ++n)
    if (ids[n] < 0 || ids[n] >= vocab_)
      throw shape_error(std::string(where) + ": token id " + std::to_string(ids[n]) + " at position " +
                        std::to_string(n) + " is outside [0, " + std::to_string(vocab_) + ")");
}

template <class Scalar>
void LoRAEmbedding<Scalar>::gather(const std::vector<Index>& ids, MutRef<Scalar> y, Mat& H) const {
  const auto A = lora_A();  // (R, V)
  const Index N = static_cast<Index>(ids.size());
  H.resize(N, rank_);
  for (Index n = 0; n < N; ++n) {
    table_.stored_row(ids[n], y.row(n).data());  // E[ids[n]] of E (V, d), decoded when stored in low precision
    if (rank_ > 0) H.row(n) = A.col(ids[n]).transpose();
  }
  if (rank_ > 0 && !merged_) y.noalias() += scaling_ * H * lora_B().transpose();
}

template <class Scalar>
void LoRAEmbedding<Scalar>::forward(const std::vector<Index>& ids, MutRef<Scalar> y) const {
  const char* where = "LoRAEmbedding::forward";
  if (training_)
    throw state_error(std::string(where) +
                      " on a const layer runs in eval mode only, but the layer is in training mode: call eval() first");
  detail::check_shape(where, "y", y, static_cast<Index>(ids.size()), dim_);
  check_ids(where, ids);
  RowVector<Scalar> c;
  if (dora_ && !merged_) c = magnitude().row(0).cwiseQuotient(dora_norm(where));
  Mat H;
  gather(ids, y, H);
  if (c.size() > 0) y.array().rowwise() *= c.array();
}

template <class Scalar>
void LoRAEmbedding<Scalar>::forward(const std::vector<Index>& ids, MutRef<Scalar> y) {
  if (!training_) {
    std::as_const(*this).forward(ids, y);
    return;
  }
  const char* where = "LoRAEmbedding::forward";
  if (merged_) throw state_error(std::string(where) + ": the layer is merged; call unmerge() before training");
  detail::check_shape(where, "y", y, static_cast<Index>(ids.size()), dim_);
  check_ids(where, ids);
  cached_rows_ = -1;
  if (dora_) {
    dora_norm_ = dora_norm(where);  // before y is written: a zero norm throws with y as it was
    dora_scale_ = magnitude().row(0).cwiseQuotient(dora_norm_);
  }
  gather(ids, y, H_);
  if (dora_) {
    Z_ = y;
    y.array().rowwise() *= dora_scale_.array();
  }
  cached_rows_ = static_cast<Index>(ids.size());
}

template <class Scalar>
void LoRAEmbedding<Scalar>::backward(const std::vector<Index>& ids, const ConstRef<Scalar>& dy) {
  const char* where = "LoRAEmbedding::backward";
  if (!training_)
    throw state_error(std::string(where) + ": the layer is in eval mode; call train() and run forward again");
  const Index N = static_cast<Index>(ids.size());
  detail::check_shape(where, "dy", dy, N, dim_);
  check_ids(where, ids);
  detail::check_cached_forward(where, cached_rows_, N, "ids", "ids");
  if (rank_ == 0) return;
  // DoRA: y = c ⊙ Z with c = m / n and n constant, so dm += Σ dy ⊙ Z / n, and Z's gradient is dy ⊙ c
  if (dora_) {
    MatrixMap<Scalar>(grads_.data() + magnitude_offset(), 1, dim_).array() +=
        (dy.array() * Z_.array()).colwise().sum() / dora_norm_.array();
    D_ = dy.array().rowwise() * dora_scale_.array();
  }
  const ConstRef<Scalar> dz = dora_ ? ConstRef<Scalar>(D_) : dy;
  // forward: Z = E[ids] + s · H Bᵀ, so dB += s · dzᵀ H and dH = s · dz B
  MatrixMap<Scalar>(grads_.data() + rank_ * vocab_, dim_, rank_).noalias() += scaling_ * dz.transpose() * H_;
  G_.resize(N, rank_);
  G_.noalias() = scaling_ * dz * lora_B();
  // forward: H[n] = A[:, ids[n]]ᵀ, so dA[:, ids[n]] += dH[n]ᵀ (F.embedding: none for the padding index)
  MatrixMap<Scalar> dA(grads_.data(), rank_, vocab_);
  for (Index n = 0; n < N; ++n)
    if (!padding_ || ids[n] != *padding_) dA.col(ids[n]) += G_.row(n).transpose();
}

template <class Scalar>
void LoRAEmbedding<Scalar>::merge(bool safe_merge) {
  if (merged_ || rank_ == 0) return;
  const char* where = "LoRAEmbedding::merge";
  if (dora_) {
    // E ← (E + s·(B A)ᵀ) ⊙ c per column, c = m / n (PEFT's DoraEmbeddingVariant.merge_safe)
    table_.require_writable(where);  // before n is computed
    const RowVector<Scalar> c = magnitude().row(0).cwiseQuotient(dora_norm(where));
    table_.merge_dora(where, "embedding dimension", scaling_, lora_B(), lora_A(), c, safe_merge);
    merged_dora_scale_ = c;
  } else {
    table_.add_low_rank(where, scaling_, lora_B(), lora_A(), 0, safe_merge);
  }
  merged_A_ = lora_A();
  merged_B_ = lora_B();
  merged_scaling_ = scaling_;
  merged_ = true;
}

template <class Scalar>
void LoRAEmbedding<Scalar>::unmerge() {
  if (!merged_) return;
  if (dora_) {
    // E ← E / c − s·(B A)ᵀ (PEFT's DoraEmbeddingVariant.unmerge); ‖E[:, j]‖² again, as rounding moved E
    table_.add_low_rank_scaled("LoRAEmbedding::unmerge", -merged_scaling_, merged_B_, merged_A_,
                               merged_dora_scale_.data(), nullptr);
    w_sq_norms_ = table_.output_squared_norms();
    merged_dora_scale_.resize(0);
  } else {
    table_.add_low_rank("LoRAEmbedding::unmerge", -merged_scaling_, merged_B_, merged_A_);
  }
  merged_A_.resize(0, 0);
  merged_B_.resize(0, 0);
  merged_ = false;
}

}  // namespace lora
