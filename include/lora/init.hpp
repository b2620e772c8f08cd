// PiSSA and OLoRA: adapters that start from the principal directions of W
// instead of zero, as PEFT initialises them (init_lora_weights = "pissa",
// "pissa_niter_K", "olora"), and PEFT's conversion of such an adapter, after
// training, into a plain LoRA for the original W.
//
//   PiSSA (Meng et al. 2024):  W = U S Vᵀ;  A = sqrt(S_r / s) V_rᵀ,  B = U_r sqrt(S_r / s)
//                              (PEFT's pissa_init: the top r singular triplets, S divided by the scaling s);
//                              "pissa_niter_K" takes them from torch.svd_lowrank(W, q = r, niter = K), a randomised
//                              range finder (Halko et al. 2011, algorithm 4.4 with K power iterations)
//   OLoRA (Büyükakyüz 2024):   W = Q R (Householder QR);  B = Q[:, :r],  A = R[:r, :]
//
// and in both W becomes the residual W − s·B A, so the layer's output does
// not change. Everything is computed on W as (out, in), whatever its storage
// layout (PEFT's olora_init skips the transpose it does for PiSSA, so on a
// Conv1D weight it factors the stored (in, out) matrix and gives A and B the
// wrong shapes unless in == out; this one does not).
//
// Include <lora/init.hpp> directly; <lora/lora.hpp> does not include it.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/errors.hpp>
#include <lora/linear.hpp>
#include <lora/types.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <utility>

namespace lora {

namespace detail {

/// The thin Q (m, k) of a Householder QR of x (m, k), m >= k: LAPACK's geqrf + orgqr, as torch.linalg.qr.
template <class Mat>
Mat thin_q(const Mat& x) {
  Eigen::HouseholderQR<Mat> qr(x);
  return qr.householderQ() * Mat::Identity(x.rows(), x.cols());
}

/// torch's get_approximate_basis(A, q, niter): an orthonormal basis Q (m, q) of A's range from a Gaussian sketch
/// and `niter` power iterations, each re-orthonormalised.
template <class Mat>
Mat approximate_basis(const Mat& a, Index q, int niter, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  Mat r(a.cols(), q);
  for (Index i = 0; i < r.size(); ++i) r.data()[i] = static_cast<typename Mat::Scalar>(normal(rng));
  Mat basis = thin_q<Mat>(a * r);
  for (int i = 0; i < niter; ++i) {
    basis = thin_q<Mat>(a.transpose() * basis);
    basis = thin_q<Mat>(a * basis);
  }
  return basis;
}

}  // namespace detail

/// The top-r singular triplets of w (O, I): u (O, r), s (r), v (I, r).
template <class Scalar>
struct TopSingular {
  Matrix<Scalar> u;
  Vector<Scalar> s;
  Matrix<Scalar> v;
};

namespace detail {
/// top_singular in double (a template so that only a file that calls it compiles it).
template <class Double>
TopSingular<double> top_singular_double(const Matrix<double>& w, Index r, int niter, std::uint64_t seed) {
  static_assert(std::is_same_v<Double, double>, "top_singular_double works in double");
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;  // column-major: what Eigen's solvers prefer
  const Mat a = w;
  TopSingular<double> out;
  if (niter < 0) {
    Eigen::BDCSVD<Mat> svd(a, Eigen::ComputeThinU | Eigen::ComputeThinV);
    out.u = svd.matrixU().leftCols(r);
    out.s = svd.singularValues().head(r);
    out.v = svd.matrixV().leftCols(r);
    return out;
  }
  // torch's _svd_lowrank for m < n or n > q (every LoRA shape): the basis of Aᵀ's range, then the SVD of A Q.
  const Mat q = detail::approximate_basis<Mat>(a.transpose(), r, niter, seed);  // (I, r)
  Eigen::JacobiSVD<Mat> svd(a * q, Eigen::ComputeThinU | Eigen::ComputeThinV);  // (O, r): small
  out.u = svd.matrixU();
  out.s = svd.singularValues();
  out.v = q * svd.matrixV();
  return out;
}
}  // namespace detail

/// The top r singular triplets of `w`: with niter < 0 from a full SVD (Eigen's
/// BDCSVD, as torch.linalg.svd), otherwise as torch.svd_lowrank(w, q = r,
/// niter) computes them (the sketch drawn from `seed`). Computed in double for every Scalar and rounded: Eigen's
/// SVDs and QR cost about 25 s of compile time per scalar type in every file that uses them.
template <class Scalar>
TopSingular<Scalar> top_singular(const Matrix<Scalar>& w, Index r, int niter, std::uint64_t seed) {
  if constexpr (!std::is_same_v<Scalar, double>) {
    const TopSingular<double> d = top_singular<double>(w.template cast<double>(), r, niter, seed);
    return {d.u.template cast<Scalar>(), d.s.template cast<Scalar>(), d.v.template cast<Scalar>()};
  } else {
    return detail::top_singular_double<double>(w, r, niter, seed);
  }
}

/// PEFT's pissa_init on `layer`: A and B from W's top r singular triplets,
/// W replaced by the residual W − s·B A (niter < 0: "pissa", a full SVD;
/// niter = K: "pissa_niter_K", the randomised one, seeded by the layer's
/// seed). The layer's output is unchanged up to rounding. Needs an unmerged
/// layer with r <= min(in, out) over a writable weight (owned or
/// mutable_view); throws state_error or config_error otherwise, and then
/// changes nothing.
template <class Scalar>
void pissa_init(LoRALinear<Scalar>& layer, int niter = -1) {
  const char* where = niter < 0 ? "pissa_init" : "pissa_init (niter)";
  layer.check_init_with_residual(where);
  const Index r = layer.rank();
  const auto svd = top_singular<Scalar>(layer.frozen_weight().to_dense(), r, niter, *layer.config().seed);
  const Vector<Scalar> root = (svd.s.array() / static_cast<Scalar>(layer.scaling())).sqrt().matrix();
  const Matrix<Scalar> A = root.asDiagonal() * svd.v.transpose();  // (r, I)
  const Matrix<Scalar> B = svd.u * root.asDiagonal();              // (O, r)
  layer.init_with_residual(A, B);
}

/// PEFT's olora_init on `layer`: W = Q R, B = Q[:, :r], A = R[:r, :], W
/// replaced by W − s·B A. Same requirements as pissa_init. W is factored as (O, I) in both layouts, except that a
/// square weight stored (I, O) is refused (config_error): PEFT's olora_init factors that stored matrix and its
/// adapter then no longer starts at the base model's output, so neither result would agree with a PEFT file.
template <class Scalar>
void olora_init(LoRALinear<Scalar>& layer) {
  layer.check_init_with_residual("olora_init");
  if (layer.weight_layout() == WeightLayout::in_out && layer.in_features() == layer.out_features())
    throw config_error(
        "olora_init: a square weight stored (in, out) (a Conv1D weight): PEFT's olora_init factors "
        "the stored matrix there, so its adapter does not start at the base model's output, and an "
        "adapter started otherwise would not load as PEFT loads an \"olora\" one; use PiSSA, or a "
        "transposed (out, in) copy of the weight");
  // In double for every Scalar, as top_singular; W (O, I) factored as it is, as PEFT's olora_init does.
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
  const Mat w = layer.frozen_weight().to_dense().template cast<double>();
  Eigen::HouseholderQR<Mat> qr(w);
  const Index r = layer.rank(), k = std::min(w.rows(), w.cols());
  const Mat q = qr.householderQ() * Mat::Identity(w.rows(), k);
  const Matrix<Scalar> B = q.leftCols(r).template cast<Scalar>();
  const Matrix<Scalar> A =
      Mat(qr.matrixQR().topRows(r).template triangularView<Eigen::Upper>()).template cast<Scalar>();
  layer.init_with_residual(A, B);
}

/// What PEFT's from_pretrained does to a module's base weight before it loads an adapter's A and B: nothing, or
/// PiSSA's or OLoRA's initialisation, which leaves the residual W − s·B0 A0 in the base (A0 and B0 are then
/// overwritten by the file's A and B).
enum class ResidualInit { none, pissa, olora };

namespace detail {
/// peft_init_factors in double (a template so that only a file that calls it compiles it).
template <class Double>
std::pair<Matrix<Double>, Matrix<Double>> residual_factors(const Matrix<Double>& w, bool stored_in_out,
                                                           ResidualInit kind, Index r, double scaling,
                                                           const std::string& where) {
  static_assert(std::is_same_v<Double, double>, "residual_factors factors in double");
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
  if (kind == ResidualInit::pissa) {
    const auto svd = top_singular<double>(w, r, -1, 0);
    const Vector<double> root = (svd.s.array() / scaling).sqrt().matrix();
    return {root.asDiagonal() * svd.v.transpose(), svd.u * root.asDiagonal()};
  }
  if (kind != ResidualInit::olora) throw config_error(where + ": no PiSSA or OLoRA initialisation asked for");
  stored_in_out = stored_in_out && w.rows() == w.cols();
  const Mat stored = stored_in_out ? Mat(w.transpose()) : Mat(w);
  Eigen::HouseholderQR<Mat> qr(stored);
  const Index k = std::min(stored.rows(), stored.cols());
  const Mat q = qr.householderQ() * Mat::Identity(stored.rows(), k);
  const Mat rr = qr.matrixQR().topRows(r).template triangularView<Eigen::Upper>();
  if (stored_in_out) return {q.leftCols(r).transpose(), rr.transpose()};  // Wᵀ − s·Q_r R_r = (W − s·R_rᵀ Q_rᵀ)ᵀ
  return {rr, q.leftCols(r)};
}
}  // namespace detail

/// The initial adapter (A0 (r, I), B0 (O, r)) PEFT's pissa_init / olora_init compute from a module's weight, so
/// that its residual is W − s·B0 A0 with W (O, I). `w` is W (O, I); `stored_in_out` says that the checkpoint stores
/// it (I, O) (fan_in_fan_out, a Conv1D weight). PiSSA factors W (PEFT transposes a Conv1D weight first). OLoRA
/// factors the stored matrix as it is, as PEFT's olora_init does: for a square Conv1D weight that is Wᵀ = Q R, and
/// PEFT's residual is then W − s·(Q_r R_r)ᵀ, returned here as B0 = R_rᵀ, A0 = Q_rᵀ. (PEFT's A and B are Q_r and R_r
/// themselves, whose product it adds untransposed, so its OLoRA on a Conv1D weight does not start at the base
/// model's output; olora_init refuses that case. On a Conv1D weight that is not square PEFT's shapes do not fit
/// the layer at all, and W (O, I) is factored as olora_init does.) Throws config_error, naming `where`, for r
/// outside 1..min(O, I).
///
/// The factors are computed in double for every Scalar, then rounded: Eigen's BDCSVD and HouseholderQR take
/// about 25 s of compile time per scalar type in every file that loads or merges adapter files (lora-merge took
/// 109 s to compile with float and double, 66 s with double alone), and rounded double factors are as close to
/// PEFT's float32 ones as Eigen's float factors would be.
template <class Scalar>
std::pair<Matrix<Scalar>, Matrix<Scalar>> peft_init_factors(const Matrix<Scalar>& w, bool stored_in_out,
                                                            ResidualInit kind, Index r, double scaling,
                                                            const std::string& where) {
  if (r <= 0 || r > std::min(w.rows(), w.cols()))
    throw config_error(where + ": r " + std::to_string(r) + " must be in 1..min(out " + std::to_string(w.rows()) +
                       ", in " + std::to_string(w.cols()) + ") for PiSSA or OLoRA");
  if constexpr (std::is_same_v<Scalar, double>) {
    return detail::residual_factors<double>(w, stored_in_out, kind, r, scaling, where);
  } else {
    auto [A0, B0] = detail::residual_factors<double>(w.template cast<double>(), stored_in_out, kind, r, scaling, where);
    return {A0.template cast<Scalar>(), B0.template cast<Scalar>()};
  }
}

/// A plain LoRA: A (R, I), B (O, R) and the config that gives its scaling.
template <class Scalar>
struct PlainLora {
  Matrix<Scalar> A;
  Matrix<Scalar> B;
  LoraConfig config;
};

/// PEFT's subtract_mutated_init (save_pretrained with path_initial_model_for_weight_conversion): a layer trained
/// from a PiSSA / OLoRA start (A0, B0) over the residual W − s·B0 A0 applies to the original W as the plain LoRA
///   A' = [A; A0] (2r, I),  B' = [B, −B0] (O, 2r),
/// since s·B' A' = s·(B A − B0 A0). Rank 2r at the same scaling: lora_alpha doubled, or times √2 with rsLoRA.
template <class Scalar>
PlainLora<Scalar> residual_to_lora(const LoRALinear<Scalar>& trained, const ConstRef<std::common_type_t<Scalar>>& A0,
                                   const ConstRef<std::common_type_t<Scalar>>& B0) {  // Scalar from the layer only
  const Index r = trained.rank();
  if (A0.rows() != r || A0.cols() != trained.in_features() || B0.rows() != trained.out_features() || B0.cols() != r)
    throw shape_error("residual_to_lora: the initial adapter must be A0 " + shape_string(r, trained.in_features()) +
                      " and B0 " + shape_string(trained.out_features(), r) + ", got A0 " +
                      shape_string(A0.rows(), A0.cols()) + ", B0 " + shape_string(B0.rows(), B0.cols()));
  PlainLora<Scalar> out;
  out.A.resize(2 * r, trained.in_features());
  out.A << trained.lora_A(), A0;
  out.B.resize(trained.out_features(), 2 * r);
  out.B << trained.lora_B(), -B0;
  out.config = trained.config();
  out.config.r = 2 * r;
  out.config.lora_alpha *= trained.config().use_rslora ? std::sqrt(2.0) : 2.0;
  return out;
}

}  // namespace lora
