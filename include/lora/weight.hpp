// FrozenWeight: the frozen W of a layer, however it is stored.
//
// Every layer that wraps a frozen weight (LoRALinear, MultiLoRALinear) holds
// one FrozenWeight and reaches W only through the operations below, so how W
// is stored is decided here and nowhere else:
//
//   forward    y  = x Wᵀ          x (N, I)  -> y  (N, O)
//   backward   dx = dy W          dy (N, O) -> dx (N, I)
//   merge      W += s · B A       B (O, R), A (R, I), on all of W or on a slice of its outputs
//
// Layouts. W is (O, I) as torch.nn.Linear stores it, or (I, O) as
// transformers' Conv1D (GPT-2 and the models built on it) stores it, which
// PEFT calls fan_in_fan_out. The layout is only how the buffer is read: the
// products above use it as it is (Eigen reads the stored matrix transposed
// where needed), so a Conv1D checkpoint's buffer is never copied or
// transposed in memory, and the adapter's A (R, I) and B (O, R) have the
// same shapes in both layouts, as in PEFT.
//
// Ownership. A FrozenWeight owns its buffer (a Matrix moved in), or views
// one the caller owns: read-only (view: never written, merging throws), or
// writable (mutable_view: merge and unmerge write it in place, the only
// writes ever made). A view's buffer must outlive every layer that holds it.
//
// Precision. A FrozenWeight<float> may instead hold W in a low-precision
// format (quantized(): bf16, f16, q8_0, NF4), in either layout, through the
// LowPrecisionStorage interface below, which <lora/quant.hpp>'s
// QuantizedMatrix implements with its kernels (that header is not part of
// <lora/lora.hpp>: only code that makes low-precision weights compiles
// them). Its products decode W a tile at a time and compute in float; W is
// never dequantised as a whole. Such a weight is never written: merging into
// it is refused (state_error), since rounding the sum back to the format
// would lose the adapter's smallest changes.
#pragma once

#include <lora/errors.hpp>
#include <lora/types.hpp>

#include <lora/detail/gemm.hpp>
#include <lora/detail/kgemm.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora {

/// Which library runs FrozenWeight<float>'s dense products (forward, backward) in this build: oneDNN's sgemm when
/// LORA_USE_DNNL is defined (lora::dnnl), else Eigen's product, which EIGEN_USE_BLAS (lora::openblas) hands to the
/// BLAS. For benchmarks and programs that report what they ran on.
inline const char* float_gemm_backend() {
#if defined(LORA_USE_DNNL)
  return "oneDNN sgemm";
#elif defined(EIGEN_USE_BLAS)
  return "Eigen with EIGEN_USE_BLAS";
#else
  return "Eigen";
#endif
}

/// How a frozen weight's buffer is laid out (row-major).
enum class WeightLayout {
  out_in,  ///< (O, I): torch.nn.Linear, safetensors checkpoints of most models
  in_out,  ///< (I, O): transformers' Conv1D (GPT-2), PEFT's fan_in_fan_out
};

inline const char* layout_name(WeightLayout layout) {
  return layout == WeightLayout::out_in ? "(out, in)" : "(in, out) (fan_in_fan_out)";
}

/// How a frozen weight's values are stored.
enum class WeightFormat { f32, bf16, f16, q8_0, nf4 };

inline const char* format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::f32:
      return "f32";
    case WeightFormat::bf16:
      return "bf16";
    case WeightFormat::f16:
      return "f16";
    case WeightFormat::q8_0:
      return "q8_0";
    case WeightFormat::nf4:
      return "nf4";
  }
  return "?";
}

/// "f32", "bf16", "f16", "q8_0" or "nf4" (as format_name writes them); nullopt for anything else.
inline std::optional<WeightFormat> parse_format(std::string_view name) {
  for (WeightFormat f :
       {WeightFormat::f32, WeightFormat::bf16, WeightFormat::f16, WeightFormat::q8_0, WeightFormat::nf4})
    if (name == format_name(f)) return f;
  return std::nullopt;
}

/// A matrix S (rows, cols, row-major) stored in low precision, as a FrozenWeight<float> uses it. Immutable.
/// <lora/quant.hpp> implements it (QuantizedMatrix::storage()); another backend could.
class LowPrecisionStorage {
 public:
  virtual ~LowPrecisionStorage() = default;
  virtual WeightFormat format() const = 0;
  virtual Index rows() const = 0;
  virtual Index cols() const = 0;
  /// Bytes kept for the values (blocks and scales included).
  virtual std::size_t bytes() const = 0;
  /// True when the bytes are a buffer the caller owns (a view of a mapped file).
  virtual bool is_view() const = 0;
  /// count values of S's row `row` from column `col`, decoded to float.
  virtual void decode(Index row, Index col, Index count, float* out) const = 0;
  /// C (M, N) = A (M, K) · op(S), or += with accumulate; op(S) = Sᵀ when `transposed` (S is (N, K)), else S (K, N).
  /// A and C are row-major with leading dimensions lda and ldc.
  virtual void product(const float* A, Index lda, Index M, Index K, bool transposed, float* C, Index ldc,
                       bool accumulate) const = 0;
  /// New values (rows · cols floats, row-major) stored the same way (format, blocks, products): a lossy merge's
  /// rounding. Throws numeric_error for a non-finite value.
  virtual std::shared_ptr<const LowPrecisionStorage> requantize(const float* values) const = 0;
};

/// What LoRALinear::merge_quantized() reports: the largest error rounding the merged weight back to its format made,
/// |W'_q − W'| with W' the merged weight in float, at output `row` and input `col` (W as (O, I)); and the largest
/// |s · (B A)| entry, the size of the update it was added to.
struct QuantizedMergeReport {
  WeightFormat format = WeightFormat::f32;
  double max_abs_error = 0;
  Index row = 0, col = 0;
  double max_abs_update = 0;
};

template <class Scalar>
class FrozenWeight {
  static_assert(std::is_floating_point_v<Scalar>, "FrozenWeight<Scalar>: Scalar must be float, double or long double");

 public:
  using Mat = Matrix<Scalar>;

  /// An empty weight (0 x 0), to be assigned.
  FrozenWeight() = default;

  /// Owns `stored`, which is (O, I) for out_in and (I, O) for in_out.
  static FrozenWeight owned(Mat stored, WeightLayout layout = WeightLayout::out_in) {
    FrozenWeight w(Kind::owned, layout, stored.data(), out_of(stored, layout), in_of(stored, layout), "owned");
    w.owned_ = std::move(stored);
    w.data_ = w.owned_.data();
    return w;
  }

  /// Views a row-major buffer of O·I scalars the caller owns, laid out as `layout` says; never writes it.
  static FrozenWeight view(const Scalar* data, Index out_features, Index in_features,
                           WeightLayout layout = WeightLayout::out_in) {
    return FrozenWeight(Kind::view, layout, data, out_features, in_features, "view");
  }

  /// As view(), but merge() / unmerge() of a layer holding it may write the buffer in place.
  static FrozenWeight mutable_view(Scalar* data, Index out_features, Index in_features,
                                   WeightLayout layout = WeightLayout::out_in) {
    return FrozenWeight(Kind::mutable_view, layout, data, out_features, in_features, "mutable_view");
  }

  /// W in a low-precision format (FrozenWeight<float> only): `stored` is (O, I) for out_in and (I, O) for in_out.
  /// Pass a QuantizedMatrix (<lora/quant.hpp>: owned bytes, or a view over a mapped BF16 tensor) or any
  /// LowPrecisionStorage. Never written: merging is refused.
  template <class Stored>
  static FrozenWeight quantized(const Stored& stored, WeightLayout layout = WeightLayout::out_in) {
    if constexpr (std::is_convertible_v<Stored, std::shared_ptr<const LowPrecisionStorage>>)
      return from_storage(stored, layout);
    else
      return from_storage(stored.storage(), layout);
  }

  // A copy of an owned weight owns a copy of the buffer; a copy of a view views the same buffer. data_ always
  // points at the weight's own buffer when it owns one (Eigen moves the allocation on a move).
  FrozenWeight(const FrozenWeight& other) { *this = other; }
  FrozenWeight(FrozenWeight&& other) noexcept { *this = std::move(other); }
  FrozenWeight& operator=(const FrozenWeight& other) {
    if (this == &other) return *this;
    owned_ = other.owned_;
    lp_ = other.lp_;
    take_shape(other);
    return *this;
  }
  FrozenWeight& operator=(FrozenWeight&& other) noexcept {
    if (this == &other) return *this;
    owned_ = std::move(other.owned_);
    lp_ = std::move(other.lp_);
    take_shape(other);
    other.data_ = nullptr;
    other.out_ = other.in_ = 0;
    return *this;
  }

  Index out_features() const { return out_; }
  Index in_features() const { return in_; }
  WeightLayout layout() const { return layout_; }
  /// True unless the buffer is the weight's own (a quantized weight counts as a view when its bytes are).
  bool is_view() const { return kind_ == Kind::quantized ? lp_->is_view() : kind_ != Kind::owned; }
  /// True when merging may write the buffer (owned or mutable_view).
  bool is_writable() const { return kind_ == Kind::owned || kind_ == Kind::mutable_view; }
  /// True when W is held in a low-precision format (quantized()).
  bool is_quantized() const { return kind_ == Kind::quantized; }
  /// The format W is stored in: f32 for a Scalar matrix (whatever Scalar is) unless quantized.
  WeightFormat format() const { return kind_ == Kind::quantized ? lp_->format() : WeightFormat::f32; }
  /// The low-precision storage of a quantized weight (null otherwise).
  const LowPrecisionStorage* low_precision() const { return lp_.get(); }
  /// Bytes of the stored weight (owned or viewed), in its format.
  std::size_t stored_bytes() const {
    if (kind_ == Kind::quantized) return lp_->bytes();
    return static_cast<std::size_t>(out_ * in_) * sizeof(Scalar);
  }

  /// A read-only view of the same buffer and layout (the caller keeps this weight alive).
  FrozenWeight read_only_view() const {
    if (kind_ == Kind::quantized) return *this;  // immutable, its bytes shared
    return view(data_, out_, in_, layout_);
  }

  /// The buffer as it is stored: (O, I) for out_in, (I, O) for in_out. Throws state_error for a quantized weight,
  /// which has no Scalar buffer (to_dense() decodes it).
  ConstMatrixMap<Scalar> stored() const {
    if (kind_ == Kind::quantized)
      throw state_error(std::string("FrozenWeight::stored: W is stored in ") + format_name(lp_->format()) +
                        ", not as a float matrix; use to_dense() for a decoded copy");
    return ConstMatrixMap<Scalar>(data_, stored_rows(), stored_cols());
  }

  /// Stored row r into out (stored_cols() values: row r of (O, I), or of (I, O) for in_out), decoded when quantized:
  /// an embedding's lookup of one token's vector.
  void stored_row(Index r, Scalar* out) const {
    if (kind_ == Kind::quantized) {
      if constexpr (std::is_same_v<Scalar, float>) lp_->decode(r, 0, stored_cols(), out);
      return;
    }
    std::copy(data_ + r * stored_cols(), data_ + (r + 1) * stored_cols(), out);
  }

  /// W as (O, I), copied (decoded when quantized): for inspection and tests, never used by the layers.
  Mat to_dense() const {
    if (kind_ == Kind::quantized) {
      Matrix<float> d(stored_rows(), stored_cols());
      for (Index r = 0; r < stored_rows(); ++r) lp_->decode(r, 0, stored_cols(), d.row(r).data());
      Mat w = d.template cast<Scalar>();
      if (layout_ == WeightLayout::out_in) return w;
      return w.transpose();
    }
    if (layout_ == WeightLayout::out_in) return stored();
    return stored().transpose();
  }

  /// y = x Wᵀ: x (N, I), y (N, O), y not overlapping x (the caller checks shapes).
  void forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) const {
    if (kind_ == Kind::quantized) return quantized_product(x, y, layout_ == WeightLayout::out_in, false);
    dense_product(x, y, layout_ == WeightLayout::out_in, false);
  }

  /// y = x Wᵀ for an x of a few rows (DoRA's A Wᵀ, R rows), W taken 128 outputs at a time: one product over all
  /// of W packs a copy of the whole of it, block by block each packed copy stays in cache. Measured on the Xeon
  /// (4096², R = 8, one thread): 9-12 ms against 19-26 ms for W (out, in), 19-22 against 27-36 for W (in, out).
  void forward_few_rows(const ConstRef<Scalar>& x, MutRef<Scalar> y) const {
    if (kind_ == Kind::quantized) return forward(x, y);
    constexpr Index block = 128;
    const Index outputs = layout_ == WeightLayout::out_in ? stored().rows() : stored().cols();
    for (Index o = 0; o < outputs; o += block) {
      const Index n = std::min(block, outputs - o);
      if (layout_ == WeightLayout::out_in)
        y.middleCols(o, n).noalias() = x * stored().middleRows(o, n).transpose();
      else
        y.middleCols(o, n).noalias() = x * stored().middleCols(o, n);
    }
  }

  /// dx = dy W: dy (N, O), dx (N, I).
  void backward(const ConstRef<Scalar>& dy, MutRef<Scalar> dx) const {
    if (kind_ == Kind::quantized) return quantized_product(dy, dx, layout_ == WeightLayout::in_out, false);
    dense_product(dy, dx, layout_ == WeightLayout::in_out, false);
  }

  /// True when forward() and forward_add() run the library's own GEMM (<lora/detail/kgemm.hpp>) for an x of
  /// `rows` rows: a float W, stored (I, O) (GPT-2's Conv1D) or (O, I) (read transposed), at the shapes
  /// KGemm::eligible() names for its layout, on a CPU with AVX-512. forward_with_terms() can then add low-rank
  /// terms inside that product, rounded as forward() rounds.
  bool forward_takes_terms(Index rows) const {
    return std::is_same_v<Scalar, float> && kind_ != Kind::quantized &&
           detail::KGemm::eligible(rows, in_, out_, layout_ == WeightLayout::out_in);
  }
  /// y = x Wᵀ (+ y when `accumulate`) + Σ terms, each term's product added inside the GEMM after W's sum; call
  /// only when forward_takes_terms(x.rows()) (the caller checks shapes; terms lie within y's columns). With
  /// `input`, the GEMM first writes the terms' H = input X · Aᵀ, a row block at a time (detail::LowRankInput).
  /// A bias (O entries) is added to each row after W's sum (and y's old value), in the GEMM's registers: no pass
  /// over y for it: the same float sum as forward() followed by y += b, and at depths of one block the same as y = b
  /// followed by the accumulating product.
  void forward_with_terms(const ConstRef<Scalar>& x, MutRef<Scalar> y, bool accumulate,
                          const detail::LowRankTerm* terms, std::size_t n_terms,
                          const detail::LowRankInput* input = nullptr, const Scalar* bias = nullptr) const {
    own_product(x, y, layout_ == WeightLayout::out_in, accumulate, terms, n_terms, input, bias);
  }

  /// True when backward() runs the library's own GEMM for a dy of `rows` rows, as forward_takes_terms() says for
  /// forward(): backward_with_terms() can then add low-rank terms inside dx = dy W.
  bool backward_takes_terms(Index rows) const {
    return std::is_same_v<Scalar, float> && kind_ != Kind::quantized &&
           detail::KGemm::eligible(rows, out_, in_, layout_ == WeightLayout::in_out);
  }
  /// dx = dy W + Σ terms, each term's product added inside the GEMM after W's sum; with `input`, the GEMM first
  /// writes H = input X · Aᵀ (a term's H, or one kept for later), a row block at a time. Call only when
  /// backward_takes_terms(dy.rows()) (the caller checks shapes; terms lie within dx's columns).
  void backward_with_terms(const ConstRef<Scalar>& dy, MutRef<Scalar> dx, const detail::LowRankTerm* terms,
                           std::size_t n_terms, const detail::LowRankInput* input = nullptr) const {
    own_product(dy, dx, layout_ == WeightLayout::in_out, false, terms, n_terms, input);
  }

  /// y += x Wᵀ and dx += dy W. Eigen's `=` product zeroes its destination and then adds into it, so a layer
  /// that writes its other terms (bias, adapters) into y first and adds the base product last makes no extra
  /// pass over y for them.
  void forward_add(const ConstRef<Scalar>& x, MutRef<Scalar> y) const {
    if (kind_ == Kind::quantized) return quantized_product(x, y, layout_ == WeightLayout::out_in, true);
    dense_product(x, y, layout_ == WeightLayout::out_in, true);
  }
  void backward_add(const ConstRef<Scalar>& dy, MutRef<Scalar> dx) const {
    if (kind_ == Kind::quantized) return quantized_product(dy, dx, layout_ == WeightLayout::in_out, true);
    dense_product(dy, dx, layout_ == WeightLayout::in_out, true);
  }

  /// W[out_begin : out_begin + O', :] += s · B A with B (O', R) and A (R, I): all of W when B has O rows, one
  /// slice of a fused projection's outputs otherwise. In blocks of about 64 Ki scalars, so no temporary the
  /// size of W is made. With check_finite, a first pass checks that every sum is finite and throws
  /// numeric_error (naming `where` and the rows) before anything is written. Throws state_error for a
  /// read-only view and shape_error for shapes that do not fit.
  void add_low_rank(const char* where, Scalar s, const ConstRef<Scalar>& B, const ConstRef<Scalar>& A,
                    Index out_begin = 0, bool check_finite = false) {
    require_writable(where);
    check_low_rank_shapes(where, B, A, out_begin);
    if (check_finite) low_rank_pass(where, s, B, A, out_begin, false);
    low_rank_pass(where, s, B, A, out_begin, true);
  }

  /// Per output o: W_o ← (W_o / divide_first_o + s · (B A)_o) · multiply_after_o, either vector (B.rows()
  /// entries, one per output of the slice at out_begin) null for all ones: DoRA's merge (multiply_after = m / n)
  /// and unmerge (divide_first = m / n, then s negative), one pass in the same blocks as add_low_rank, with the
  /// same optional finiteness check before anything is written.
  void add_low_rank_scaled(const char* where, Scalar s, const ConstRef<Scalar>& B, const ConstRef<Scalar>& A,
                           const Scalar* divide_first, const Scalar* multiply_after, bool check_finite = false) {
    require_writable(where);
    check_low_rank_shapes(where, B, A, 0);
    if (check_finite) low_rank_pass(where, s, B, A, 0, false, divide_first, multiply_after);
    low_rank_pass(where, s, B, A, 0, true, divide_first, multiply_after);
  }

  /// DoRA's merge: W_o ← c_o · (W_o + s · (B A)_o) for every output o, in add_low_rank_scaled's pass. Refused,
  /// before anything is written, for a read-only view (state_error) and when some c_o is zero or not finite
  /// (numeric_error naming `where` and the `output`, as "output row"): unmerge could not divide by it.
  void merge_dora(const char* where, const char* output, Scalar s, const ConstRef<Scalar>& B, const ConstRef<Scalar>& A,
                  const RowVector<Scalar>& c, bool check_finite) {
    require_writable(where);
    for (Index o = 0; o < c.size(); ++o)
      if (!(c(o) != 0) || !std::isfinite(static_cast<double>(c(o))))
        throw numeric_error(std::string(where) + ": DoRA's scale m / n of " + output + " " + std::to_string(o) +
                            " is " + value_string(static_cast<double>(c(o))) +
                            "; merging would make it impossible to unmerge; W is left unchanged");
    add_low_rank_scaled(where, s, B, A, nullptr, c.data(), check_finite);
  }

  /// ‖W_o‖² for every output o (the squared norm of W's row o as (O, I)), accumulated in double: one pass over W.
  Eigen::Matrix<double, Eigen::Dynamic, 1> output_squared_norms() const {
    Eigen::Matrix<double, Eigen::Dynamic, 1> out(out_);
    if (kind_ == Kind::quantized) {  // decoded a stored row at a time
      out.setZero();
      std::vector<float> row(static_cast<std::size_t>(stored_cols()));
      for (Index r = 0; r < stored_rows(); ++r) {
        lp_->decode(r, 0, stored_cols(), row.data());
        if (layout_ == WeightLayout::out_in) {
          double s = 0;
          for (float v : row) s += static_cast<double>(v) * static_cast<double>(v);
          out(r) = s;
        } else {
          for (Index o = 0; o < out_; ++o) out(o) += static_cast<double>(row[o]) * static_cast<double>(row[o]);
        }
      }
    } else if (layout_ == WeightLayout::out_in) {
      for (Index o = 0; o < out_; ++o) out(o) = stored().row(o).template cast<double>().squaredNorm();
    } else {
      out.setZero();
      for (Index i = 0; i < in_; ++i) out += stored().row(i).transpose().template cast<double>().cwiseAbs2();
    }
    return out;
  }

  /// DoRA's norm n_o = ‖W_o + s · (B A)_o‖ for every output o (1, O), without forming W + s·B A: it is
  /// w_sq_o (‖W_o‖², from output_squared_norms, kept by the caller) + 2s·B_o (A Wᵀ)_o + s²·B_o (A Aᵀ) B_oᵀ,
  /// accumulated in double; A Wᵀ is R rows (forward_few_rows). Throws numeric_error naming `where` and the
  /// `output` (its kind, as "output row") when a norm is zero or not finite: m / n is undefined there.
  RowVector<Scalar> low_rank_row_norms(const char* where, const char* output,
                                       const Eigen::Matrix<double, Eigen::Dynamic, 1>& w_sq, Scalar s,
                                       const ConstRef<Scalar>& B, const ConstRef<Scalar>& A) const {
    check_low_rank_shapes(where, B, A, 0);
    if (B.rows() != out_ || w_sq.size() != out_)
      throw shape_error(std::string(where) + ": DoRA's norm needs B and ‖W_o‖² for all " + std::to_string(out_) +
                        " outputs, got " + std::to_string(B.rows()) + " and " + std::to_string(w_sq.size()));
    const Index R = A.rows();
    Matrix<Scalar> P(R, out_);  // A Wᵀ (R, O)
    forward_few_rows(A, P);
    const Matrix<Scalar> BAAt = B * (A * A.transpose());  // (O, R)
    const double sd = static_cast<double>(s);
    RowVector<Scalar> n(out_);
    for (Index o = 0; o < out_; ++o) {
      double cross = 0, quad = 0;
      for (Index k = 0; k < R; ++k) {
        cross += static_cast<double>(B(o, k)) * static_cast<double>(P(k, o));
        quad += static_cast<double>(B(o, k)) * static_cast<double>(BAAt(o, k));
      }
      const double sq = w_sq(o) + 2 * sd * cross + sd * sd * quad;
      n(o) = static_cast<Scalar>(std::sqrt(std::max(sq, 0.0)));
      if (!(n(o) > 0) || !std::isfinite(static_cast<double>(n(o))))
        throw numeric_error(std::string(where) + ": DoRA's norm ‖W + s·B A‖ of " + output + " " + std::to_string(o) +
                            " is " + value_string(static_cast<double>(n(o))) +
                            ", so m / n is undefined there (PEFT divides by it and gives NaN outputs); a zero " +
                            output + " of W with B = 0 cannot take DoRA");
    }
    return n;
  }

  /// Throws state_error, naming `where`, unless merging may write the buffer.
  void require_writable(const char* where) const {
    if (kind_ == Kind::quantized)
      throw state_error(std::string(where) + ": the weight is stored in " + format_name(lp_->format()) +
                        " and is never written: rounding W + s·B A back to " + format_name(lp_->format()) +
                        " would lose the adapter's smallest changes; serve the adapter unmerged, or merge into a "
                        "float copy of W (to_dense())");
    if (!is_writable())
      throw state_error(std::string(where) +
                        ": the weight is a read-only view of the host's memory and is never written; wrap it as a "
                        "mutable_view to allow merging, or serve the adapter unmerged");
  }

  /// Throws numeric_error, as add_low_rank(..., check_finite = true) would, when W + s·B·A (on the slice at
  /// out_begin) has a non-finite entry; writes nothing. For a layer that adds several slices: check them all,
  /// then add them all, so that a refusal leaves W as it was.
  void check_low_rank_finite(const char* where, Scalar s, const ConstRef<Scalar>& B, const ConstRef<Scalar>& A,
                             Index out_begin = 0) const {
    if (kind_ == Kind::quantized) require_writable(where);
    check_low_rank_shapes(where, B, A, out_begin);
    const_cast<FrozenWeight*>(this)->low_rank_pass(where, s, B, A, out_begin, false);
  }

 private:
  enum class Kind { owned, view, mutable_view, quantized };

  static FrozenWeight from_storage(std::shared_ptr<const LowPrecisionStorage> stored, WeightLayout layout) {
    static_assert(std::is_same_v<Scalar, float>, "FrozenWeight::quantized: low-precision weights compute in float");
    if (!stored || stored->rows() <= 0 || stored->cols() <= 0)
      throw shape_error("FrozenWeight::quantized: the weight is empty");
    FrozenWeight w;
    w.kind_ = Kind::quantized;
    w.layout_ = layout;
    w.out_ = layout == WeightLayout::out_in ? stored->rows() : stored->cols();
    w.in_ = layout == WeightLayout::out_in ? stored->cols() : stored->rows();
    w.lp_ = std::move(stored);
    return w;
  }

  // y (=|+=) x · op(S), S the stored float matrix, op = Sᵀ when `transposed`: detail::product, so oneDNN's sgemm
  // for float under LORA_USE_DNNL, Eigen's product otherwise.
  // The library's own GEMM instead for x · S at the shapes where it is measured as fast (detail/kgemm.hpp).
  void dense_product(const ConstRef<Scalar>& x, MutRef<Scalar> y, bool transposed, bool accumulate) const {
    if (std::is_same_v<Scalar, float> && detail::KGemm::eligible(x.rows(), x.cols(), y.cols(), transposed))
      return own_product(x, y, transposed, accumulate, nullptr, 0);
    detail::product<Scalar>("FrozenWeight", Scalar(1), x, false, stored(), transposed, accumulate, y);
  }

  // y (=|+=) x · S + the terms on the own GEMM, S the stored float matrix (K, N): dense_product's x · S and
  // forward_with_terms. Does nothing for double, which never gets here (eligible shapes are float only).
  void own_product(const ConstRef<Scalar>& x, MutRef<Scalar> y, bool transposed, bool accumulate,
                   const detail::LowRankTerm* terms, std::size_t n_terms, const detail::LowRankInput* input = nullptr,
                   const Scalar* bias = nullptr) const {
    if constexpr (std::is_same_v<Scalar, float>)
      detail::KGemm::run(x.rows(), y.cols(), x.cols(), x.data(), x.outerStride(), {data_, stored_cols(), transposed},
                         y.data(), y.outerStride(), accumulate, terms, n_terms, input, bias);
    else
      (void)x, (void)y, (void)transposed, (void)accumulate, (void)terms, (void)n_terms, (void)input, (void)bias;
  }

  // y (=|+=) x · op(S), S the stored matrix: op = Sᵀ when `transposed` (S is (rows of y's columns, x's columns)).
  void quantized_product(const ConstRef<Scalar>& x, MutRef<Scalar> y, bool transposed, bool accumulate) const {
    if constexpr (std::is_same_v<Scalar, float>) {
      lp_->product(x.data(), x.outerStride(), x.rows(), x.cols(), transposed, y.data(), y.outerStride(), accumulate);
    } else {
      (void)x, (void)y, (void)transposed, (void)accumulate;
    }
  }

  FrozenWeight(Kind kind, WeightLayout layout, const Scalar* data, Index out_features, Index in_features,
               const char* how)
      : kind_(kind), layout_(layout), out_(out_features), in_(in_features), data_(const_cast<Scalar*>(data)) {
    if (out_features <= 0 || in_features <= 0)
      throw shape_error(std::string("FrozenWeight::") + how +
                        ": out_features and in_features must be positive, got out_features=" +
                        std::to_string(out_features) + ", in_features=" + std::to_string(in_features));
    if (data == nullptr) throw shape_error(std::string("FrozenWeight::") + how + ": the weight must not be null");
  }
  void take_shape(const FrozenWeight& other) {
    kind_ = other.kind_;
    layout_ = other.layout_;
    out_ = other.out_;
    in_ = other.in_;
    data_ = kind_ == Kind::owned ? owned_.data() : other.data_;
  }
  void check_low_rank_shapes(const char* where, const ConstRef<Scalar>& B, const ConstRef<Scalar>& A,
                             Index out_begin) const {
    if (A.cols() != in_ || B.cols() != A.rows() || out_begin < 0 || out_begin + B.rows() > out_)
      throw shape_error(std::string(where) + ": cannot add B " + shape_string(B.rows(), B.cols()) + " times A " +
                        shape_string(A.rows(), A.cols()) + " at output " + std::to_string(out_begin) +
                        " of a weight with " + std::to_string(out_) + " outputs and " + std::to_string(in_) +
                        " inputs");
  }

  // One pass over W's slice in blocks of stored rows (outputs for out_in, inputs for in_out) of about 64 Ki
  // scalars: adds s·B·A when `write`, else only checks that every sum is finite (and writes nothing).
  void low_rank_pass(const char* where, Scalar s, const ConstRef<Scalar>& B, const ConstRef<Scalar>& A, Index out_begin,
                     bool write, const Scalar* divide_first = nullptr, const Scalar* multiply_after = nullptr) {
    MatrixMap<Scalar> W(data_, stored_rows(), stored_cols());
    const Index outs = B.rows();
    const Index rows = layout_ == WeightLayout::out_in ? outs : in_;
    const Index cols = layout_ == WeightLayout::out_in ? in_ : outs;
    const Index block = std::max<Index>(1, std::min<Index>(rows, Index(1 << 16) / std::max<Index>(1, cols)));
    Mat delta(block, cols);
    for (Index i = 0; i < rows; i += block) {
      const Index k = std::min(block, rows - i);
      auto d = delta.topRows(k);
      if (layout_ == WeightLayout::out_in)
        d.noalias() = s * B.middleRows(i, k) * A;  // rows out_begin + i .. of W (O, I)
      else
        d.noalias() = s * A.middleCols(i, k).transpose() * B.transpose();  // rows i.. of W (I, O), our columns
      auto target =
          layout_ == WeightLayout::out_in ? W.block(out_begin + i, 0, k, cols) : W.block(i, out_begin, k, cols);
      if (divide_first != nullptr || multiply_after != nullptr) {
        // The block's outputs: its rows for (O, I), its columns for (I, O). d becomes the new value of the block.
        const Index first_out = layout_ == WeightLayout::out_in ? i : 0;
        const Index n_out = layout_ == WeightLayout::out_in ? k : cols;
        using Col = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
        using RowA = Eigen::Map<const Eigen::Array<Scalar, 1, Eigen::Dynamic>>;
        if (layout_ == WeightLayout::out_in) {
          if (divide_first != nullptr)
            d.array() += target.array().colwise() / Col(divide_first + first_out, n_out);
          else
            d += target;
          if (multiply_after != nullptr) d.array().colwise() *= Col(multiply_after + first_out, n_out);
        } else {
          if (divide_first != nullptr)
            d.array() += target.array().rowwise() / RowA(divide_first + first_out, n_out);
          else
            d += target;
          if (multiply_after != nullptr) d.array().rowwise() *= RowA(multiply_after + first_out, n_out);
        }
        if (write) {
          target = d;
          continue;
        }
        if (!d.allFinite())
          throw numeric_error(std::string(where) + ": the merged weight has non-finite entries in the block of " +
                              (layout_ == WeightLayout::out_in ? "rows " : "stored (in, out) rows ") +
                              std::to_string(i) + ".." + std::to_string(i + k - 1) +
                              " (A, B, W or the magnitude hold inf/NaN, or a product overflows); W is left unchanged");
        continue;
      }
      if (write) {
        target += d;
      } else if (!(target + d).allFinite()) {
        const std::string what = layout_ == WeightLayout::out_in ? " in rows " : " in stored (in, out) rows ";
        const Index first = layout_ == WeightLayout::out_in ? out_begin + i : i;
        throw numeric_error(std::string(where) + ": W + s·B·A has non-finite entries" + what + std::to_string(first) +
                            ".." + std::to_string(first + k - 1) +
                            " (A, B or W hold inf/NaN, or the sum overflows); W is left unchanged");
      }
    }
  }
  static Index out_of(const Mat& m, WeightLayout layout) {
    return layout == WeightLayout::out_in ? m.rows() : m.cols();
  }
  static Index in_of(const Mat& m, WeightLayout layout) { return layout == WeightLayout::out_in ? m.cols() : m.rows(); }
  Index stored_rows() const { return layout_ == WeightLayout::out_in ? out_ : in_; }
  Index stored_cols() const { return layout_ == WeightLayout::out_in ? in_ : out_; }

  Kind kind_ = Kind::owned;
  WeightLayout layout_ = WeightLayout::out_in;
  Index out_ = 0, in_ = 0;
  Mat owned_;
  std::shared_ptr<const LowPrecisionStorage> lp_;  // kind_ == quantized
  Scalar* data_ = nullptr;  // owned_.data(), or the caller's buffer (written only when mutable_view)
};

}  // namespace lora
