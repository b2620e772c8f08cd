// PiSSA and OLoRA initialisation (<lora/init.hpp>) against PEFT's pissa_init / olora_init computed by PyTorch
// (tests/golden/make_golden.py, "init.*"), both weight layouts; the randomised SVD against the full one; the
// conversion of a trained adapter into a plain LoRA for the original W; and the refusals, which change nothing.
#include <catch2/catch.hpp>
#include <lora/init.hpp>
#include <lora/lora.hpp>

#include <Eigen/QR>

#include <cmath>
#include <string>

#include "golden.hpp"

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_init {

using Catch::Contains;
using lora::Index;
using lora_test::max_rel_diff;
using lora_test::tensor;
using lora_test::tolerance;
template <class S>
using Mat = lora::Matrix<S>;

namespace {

lora::LoraConfig init_config(int r = 3) {
  lora::LoraConfig c;
  c.r = r;
  c.lora_alpha = 2.0 * r;  // s = 2, as make_golden.py
  c.seed = 11;
  return c;
}

/// A layer over W (O, I): owned (O, I), or a mutable view of a Conv1D-style (I, O) buffer `store`.
template <class S>
lora::LoRALinear<S> layer_over(const Mat<S>& w, bool conv1d, Mat<S>& store, int r = 3) {
  if (!conv1d) return lora::LoRALinear<S>(w, init_config(r));
  store = w.transpose();
  return lora::LoRALinear<S>(
      lora::FrozenWeight<S>::mutable_view(store.data(), w.rows(), w.cols(), lora::WeightLayout::in_out),
      init_config(r));
}

/// Largest difference of the rank-1 terms B[:, k] A[k, :] (the sign-free part of a singular triplet).
template <class S>
double max_term_diff(const Mat<S>& A, const Mat<S>& B, const Mat<double>& A_ref, const Mat<double>& B_ref) {
  double worst = 0;
  for (Index k = 0; k < A.rows(); ++k) {
    const Mat<double> got = B.col(k).template cast<double>() * A.row(k).template cast<double>();
    const Mat<double> want = B_ref.col(k) * A_ref.row(k);
    worst = std::max(worst, max_rel_diff(got, want));
  }
  return worst;
}

}  // namespace

TEMPLATE_TEST_CASE("pissa_init and olora_init match PEFT's, W stored (out, in) or (in, out)", "[init][golden]", float,
                   double) {
  using S = TestType;
  const double tol = sizeof(S) == 4 ? 2e-5 : 1e-10;
  for (const char* tag : {"tall", "wide"}) {
    for (bool conv1d : {false, true}) {
      CAPTURE(tag, conv1d);
      const std::string at = std::string("init.") + tag + ".";
      const Mat<S> W = tensor<S>(at + "W");
      const Mat<S> x =
          Mat<S>::NullaryExpr(4, W.cols(), [](Index i, Index j) { return S(std::sin(0.7 * (9 * i + j))); });
      {
        Mat<S> store;
        auto layer = layer_over(W, conv1d, store);
        const Mat<S> y_before = layer.forward(x);  // B = 0: x Wᵀ
        lora::pissa_init(layer);
        CHECK(max_term_diff<S>(layer.lora_A(), layer.lora_B(), tensor(at + "pissa_A"), tensor(at + "pissa_B")) < tol);
        CHECK(max_rel_diff(layer.frozen_weight().to_dense(), tensor(at + "pissa_W")) < tol);
        CHECK(max_rel_diff(layer.forward(x), y_before) < tol);  // the residual plus the adapter is W
      }
      {
        Mat<S> store;
        auto layer = layer_over(W, conv1d, store);
        const Mat<S> y_before = layer.forward(x);
        lora::olora_init(layer);
        CHECK(max_rel_diff(layer.lora_A(), tensor(at + "olora_A")) < tol);  // Householder signs as LAPACK's
        CHECK(max_rel_diff(layer.lora_B(), tensor(at + "olora_B")) < tol);
        CHECK(max_rel_diff(layer.frozen_weight().to_dense(), tensor(at + "olora_W")) < tol);
        CHECK(max_rel_diff(layer.forward(x), y_before) < tol);
      }
    }
  }
}

TEST_CASE("pissa_init with niter: the randomised SVD finds the full SVD's top triplets", "[init]") {
  // W = U diag(σ) Vᵀ with σ_k = 10^-k: with q = r and 4 power iterations the range finder's error is about
  // (σ_r+1 / σ_r)^9 = 1e-9 of the top singular value.
  const Index O = 40, I = 30, r = 3;
  const Mat<double> g1 = Mat<double>::NullaryExpr(O, I, [](Index i, Index j) { return std::sin(1.3 * (I * i + j)); });
  const Mat<double> g2 = Mat<double>::NullaryExpr(I, I, [](Index i, Index j) { return std::cos(0.9 * (I * i + j)); });
  Eigen::HouseholderQR<Eigen::MatrixXd> q1(g1), q2(g2);
  const Eigen::MatrixXd U = q1.householderQ() * Eigen::MatrixXd::Identity(O, I);
  const Eigen::MatrixXd V = q2.householderQ() * Eigen::MatrixXd::Identity(I, I);
  Eigen::VectorXd sigma(I);
  for (Index k = 0; k < I; ++k) sigma(k) = std::pow(10.0, -static_cast<double>(k));
  const Mat<double> W = U * sigma.asDiagonal() * V.transpose();

  lora::LoRALinear<double> full(W, init_config(r)), randomised(W, init_config(r));
  lora::pissa_init(full);
  lora::pissa_init(randomised, 4);
  const Mat<double> d_full = full.lora_B() * full.lora_A(), d_rand = randomised.lora_B() * randomised.lora_A();
  CHECK((d_full - d_rand).cwiseAbs().maxCoeff() < 1e-7);
  CHECK((full.frozen_weight().to_dense() - randomised.frozen_weight().to_dense()).cwiseAbs().maxCoeff() < 1e-7);
  // The sketch is drawn from the layer's seed: the same seed, the same adapter.
  lora::LoRALinear<double> again(W, init_config(r));
  lora::pissa_init(again, 4);
  CHECK(again.lora_A() == randomised.lora_A());
}

TEST_CASE("init_with_residual refusals change nothing", "[init][errors]") {
  const Mat<double> W = tensor("init.tall.W");  // (7, 5)
  {
    auto view = lora::LoRALinear<double>(lora::FrozenWeight<double>::view(W.data(), W.rows(), W.cols()), init_config());
    const Mat<double> A = view.lora_A();
    CHECK_THROWS_WITH(lora::pissa_init(view), Contains("pissa_init") && Contains("read-only view"));
    CHECK_THROWS_AS(lora::olora_init(view), lora::state_error);
    CHECK(view.lora_A() == A);
    CHECK(view.lora_B().isZero());
  }
  {
    lora::LoRALinear<double> big(W, init_config(6));  // r 6 > min(7, 5)
    CHECK_THROWS_WITH(lora::olora_init(big), Contains("olora_init: r 6 is more than min(in 5, out 7)"));
    CHECK(big.frozen_weight().to_dense() == W);
  }
  {
    lora::LoRALinear<double> merged(W, init_config());
    merged.eval();
    merged.merge();
    CHECK_THROWS_WITH(lora::pissa_init(merged), Contains("pissa_init") && Contains("merged"));
  }
  {
    lora::LoRALinear<double> layer(W, init_config());
    const Mat<double> A = Mat<double>::Constant(3, 5, 1e308), B = Mat<double>::Constant(7, 3, 1e308);
    CHECK_THROWS_AS(layer.init_with_residual(A, B), lora::numeric_error);
    CHECK(layer.frozen_weight().to_dense() == W);
    CHECK(layer.lora_B().isZero());
    CHECK_THROWS_WITH(layer.init_with_residual(Mat<double>(2, 5), Mat<double>(7, 2)),
                      Contains("A (3, 5) and B (7, 3)") && Contains("got A (2, 5), B (7, 2)"));
  }
}

TEST_CASE("residual_to_lora: a trained PiSSA adapter as a plain LoRA of rank 2r for the original W", "[init][golden]") {
  const Mat<double> W = tensor("init.wide.W");  // (4, 9)
  for (bool rslora : {false, true}) {
    CAPTURE(rslora);
    auto config = init_config();
    config.use_rslora = rslora;
    lora::LoRALinear<double> layer(W, config);
    lora::pissa_init(layer);
    const Mat<double> A0 = layer.lora_A(), B0 = layer.lora_B();
    // "Training": any change of A and B.
    layer.lora_A().array() += 0.25;
    layer.lora_B().array() -= 0.5;
    const auto plain = lora::residual_to_lora(layer, A0, B0);
    CHECK(plain.config.r == 6);
    CHECK(plain.config.lora_alpha == Approx(rslora ? config.lora_alpha * std::sqrt(2.0) : 2 * config.lora_alpha));
    CHECK(plain.config.scaling() == Approx(layer.scaling()));
    // The original W plus the plain LoRA is the residual plus the trained adapter.
    const Mat<double> want = layer.frozen_weight().to_dense() + layer.scaling() * layer.lora_B() * layer.lora_A();
    const Mat<double> got = W + plain.config.scaling() * plain.B * plain.A;
    CHECK(max_rel_diff(got, want) < 1e-12);
  }
}

}  // namespace unit_init
