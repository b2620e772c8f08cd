// LoRALinear: hand-computed case, initialisation, modes, merge, views,
// accounting and bad input (several threads: unit-threads.cpp).
#include <catch2/catch.hpp>
#include <lora/lora.hpp>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "gradient_checks.hpp"

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_linear {

using Catch::Contains;
using lora::Index;
template <class S>
using Mat = lora::Matrix<S>;

namespace {

lora::LoraConfig make_config(int r, double alpha, double dropout = 0.0, std::uint64_t seed = 7) {
  lora::LoraConfig c;
  c.r = r;
  c.lora_alpha = alpha;
  c.lora_dropout = dropout;
  c.seed = seed;
  return c;
}

template <class S>
Mat<S> random_matrix(Index rows, Index cols, unsigned seed) {
  std::srand(seed);
  return Mat<S>::Random(rows, cols);
}

// A layer with nonzero B, so the LoRA path changes the output.
template <class S>
lora::LoRALinear<S> adapted_layer(Index in, Index out, int r, double alpha, double dropout = 0.0) {
  lora::LoRALinear<S> layer(in, out, make_config(r, alpha, dropout));
  layer.lora_B() = random_matrix<S>(out, r, 11);
  return layer;
}

// x Wᵀ + b with W's own product (FrozenWeight::forward: oneDNN's sgemm for float under LORA_USE_DNNL, Eigen's
// otherwise), whose bits the layer's base output must have.
template <class S>
Mat<S> base_output(const lora::LoRALinear<S>& layer, const Mat<S>& x) {
  Mat<S> y(x.rows(), layer.out_features());
  lora::FrozenWeight<S>::view(layer.weight().data(), layer.out_features(), layer.in_features()).forward(x, y);
  if (layer.has_bias()) y.rowwise() += layer.bias().row(0);
  return y;
}

}  // namespace

TEST_CASE("hand-computed forward and backward", "[linear]") {
  // W = [[1,2],[3,4]], b = [0.5,-0.5], A = [[1,-1]], B = [[2],[1]], r = 1, alpha = 2 -> s = 2
  // x = [[1,1],[2,0]]
  // x Wᵀ + b = [[3.5, 6.5], [2.5, 5.5]]; H = x Aᵀ = [[0],[2]]; s·H Bᵀ = [[0,0],[8,4]]
  Mat<double> W(2, 2), x(2, 2), dy(2, 2);
  W << 1, 2, 3, 4;
  x << 1, 1, 2, 0;
  dy << 1, 0, 0, 1;
  lora::RowVector<double> b(2);
  b << 0.5, -0.5;
  auto cfg = make_config(1, 2.0);
  cfg.bias = lora::BiasMode::all;
  lora::LoRALinear<double> layer(W, b, cfg);
  layer.lora_A() << 1, -1;
  layer.lora_B() << 2, 1;
  REQUIRE(layer.scaling() == 2.0);

  Mat<double> y(2, 2);
  layer.forward(x, y);
  Mat<double> y_expected(2, 2);
  y_expected << 3.5, 6.5, 10.5, 9.5;
  CHECK(y == y_expected);

  // dB = s·dyᵀH = 2·[[0],[2]] = [[0],[4]]; G = dy B = [[2],[1]]; dA = s·Gᵀx = 2·[4, 2]
  // dx = dy W + s·G A = [[1,2],[3,4]] + 2·[[2,-2],[1,-1]] = [[5,-2],[5,2]]; db = Σ_rows dy = [1, 1]
  Mat<double> dx(2, 2);
  layer.backward(x, dy, dx);
  Mat<double> dA_expected(1, 2), dB_expected(2, 1), dx_expected(2, 2), db_expected(1, 2);
  dA_expected << 8, 4;
  dB_expected << 0, 4;
  dx_expected << 5, -2, 5, 2;
  db_expected << 1, 1;
  CHECK(layer.dA() == dA_expected);
  CHECK(layer.dB() == dB_expected);
  CHECK(layer.db() == db_expected);
  CHECK(dx == dx_expected);

  // Gradients accumulate until zero_grad().
  layer.forward(x, y);
  layer.backward(x, dy);
  CHECK(layer.dA() == 2 * dA_expected);
  CHECK(layer.dB() == 2 * dB_expected);
  CHECK(layer.db() == 2 * db_expected);
  layer.zero_grad();
  CHECK(layer.dA().isZero(0));
  CHECK(layer.dB().isZero(0));
  CHECK(layer.db().isZero(0));
}

TEST_CASE("on the own GEMM, LoRALinear adds its bias and term inside the product, and B = 0 gives the base bits",
          "[linear][kgemm]") {
  // Shapes where W's x Wᵀ runs the library's own GEMM (detail/kgemm.hpp) and the layer's forward adds b and
  // s·H Bᵀ to each tile of y in registers, H = drop(x) Aᵀ computed inside it: 512 x 300 -> 1560 in both layouts
  // (one block of depth; 1560 is not a multiple of its 48-column panels), and W (O, I) at 64 x 1100 -> 800 (read
  // transposed, two blocks of depth).
  using lora::FrozenWeight;
  using lora::WeightLayout;
  struct Shape {
    Index n, in, out;
  };
  auto max_diff = [](const Mat<double>& a, const Mat<double>& b) { return (a - b).cwiseAbs().maxCoeff(); };
  bool ran = false;
  unsigned seed = 600;
  for (const Shape& sh : {Shape{512, 300, 1560}, Shape{64, 1100, 800}}) {
    for (const WeightLayout layout : {WeightLayout::out_in, WeightLayout::in_out}) {
      INFO("N=" << sh.n << " I=" << sh.in << " O=" << sh.out
                << (layout == WeightLayout::out_in ? " W (O, I)" : " W (I, O)"));
      const Mat<float> W = random_matrix<float>(sh.out, sh.in, ++seed), Wt = W.transpose();
      const auto weight =
          FrozenWeight<float>::view(layout == WeightLayout::out_in ? W.data() : Wt.data(), sh.out, sh.in, layout);
      if (!weight.forward_takes_terms(sh.n)) continue;
      ran = true;
      const Mat<float> x = random_matrix<float>(sh.n, sh.in, ++seed), dy = random_matrix<float>(sh.n, sh.out, ++seed);
      const lora::RowVector<float> bias = random_matrix<float>(1, sh.out, ++seed);
      // The base model as the layer computes it off the own GEMM: W's product, then the bias.
      Mat<float> base(sh.n, sh.out), y(sh.n, sh.out);
      weight.forward(x, base);
      base.rowwise() += bias;
      lora::LoRALinear<float> layer(weight, bias, make_config(4, 8));
      for (bool training : {false, true}) {
        INFO((training ? "training" : "eval") << " forward at B = 0");
        if (training)
          layer.train();
        else
          layer.eval();
        layer.forward(x, y);
        CHECK(y == base);
      }
      // With B set: a double reference, and the same layer with the own GEMM turned off (three passes over y).
      layer.lora_B() = random_matrix<float>(sh.out, 4, ++seed);
      layer.eval();
      layer.forward(x, y);
      Mat<float> off(sh.n, sh.out);
      lora::detail::KGemm::set_enabled(false);
      layer.forward(x, off);
      lora::detail::KGemm::set_enabled(true);
      Mat<double> want = x.cast<double>() * W.cast<double>().transpose() +
                         double(layer.scaling()) * x.cast<double>() * layer.lora_A().cast<double>().transpose() *
                             layer.lora_B().cast<double>().transpose();
      want.rowwise() += bias.cast<double>();
      const double tol = 2e-6 * double(sh.in);
      CHECK(max_diff(y.cast<double>(), want) < tol);
      CHECK(max_diff(y.cast<double>(), off.cast<double>()) < tol);
      // Training with dropout: two layers with the same seed draw the same masks, so the own GEMM's forward and the
      // other path's give the same y (to rounding), and the same dx and gradients after one backward.
      lora::LoRALinear<float> on(weight, bias, make_config(4, 8, 0.2, 77)),
          other(weight, bias, make_config(4, 8, 0.2, 77));
      on.lora_B() = other.lora_B() = layer.lora_B();
      Mat<float> y_on(sh.n, sh.out), y_other(sh.n, sh.out), dx_on(sh.n, sh.in), dx_other(sh.n, sh.in);
      on.forward(x, y_on);
      on.backward(x, dy, dx_on);
      lora::detail::KGemm::set_enabled(false);
      other.forward(x, y_other);
      other.backward(x, dy, dx_other);
      lora::detail::KGemm::set_enabled(true);
      CHECK(y_on != y_other);  // the two paths did run: their roundings differ somewhere
      CHECK(max_diff(y_on.cast<double>(), y_other.cast<double>()) < tol);
      CHECK(max_diff(dx_on.cast<double>(), dx_other.cast<double>()) < 2e-6 * double(sh.out));
      lora_test::check_same_gradients(on, other, 1e-4f);
    }
  }
  if (!ran) WARN("this CPU has no AVX-512 (or the build has no x86 kernels): the own GEMM does not run here");
}

TEST_CASE("on the own GEMM, LoRALinear's backward computes G = dy B and adds s·G A inside dx = dy W",
          "[linear][kgemm]") {
  // Shapes where dx = dy W runs the library's own GEMM (FrozenWeight::backward_takes_terms): W (I, O) read
  // transposed at 64 x 800 -> 300 (one block of depth) and 64 x 800 -> 1100 (two blocks), W (O, I) as it is at
  // 512 x 1560 -> 300 (1560 columns of dx: not a multiple of the 48-column panels). Without dropout, then with.
  using lora::FrozenWeight;
  using lora::WeightLayout;
  if (!lora::detail::KGemm::cpu_supported()) {
    WARN("this CPU has no AVX-512 (or the build has no x86 kernels): the own GEMM does not run here");
    return;
  }
  struct Case {
    Index n, in, out;
    WeightLayout layout;
  };
  auto max_diff = [](const Mat<double>& a, const Mat<double>& b) { return (a - b).cwiseAbs().maxCoeff(); };
  unsigned seed = 700;
  for (const Case& c : {Case{64, 800, 300, WeightLayout::in_out}, Case{64, 800, 1100, WeightLayout::in_out},
                        Case{512, 1560, 300, WeightLayout::out_in}}) {
    INFO("N=" << c.n << " I=" << c.in << " O=" << c.out
              << (c.layout == WeightLayout::out_in ? " W (O, I)" : " W (I, O)"));
    const Mat<float> W = random_matrix<float>(c.out, c.in, ++seed), Wt = W.transpose();
    const auto weight =
        FrozenWeight<float>::view(c.layout == WeightLayout::out_in ? W.data() : Wt.data(), c.out, c.in, c.layout);
    REQUIRE(weight.backward_takes_terms(c.n));
    const Mat<float> x = random_matrix<float>(c.n, c.in, ++seed), dy = random_matrix<float>(c.n, c.out, ++seed);
    const lora::RowVector<float> bias = random_matrix<float>(1, c.out, ++seed);
    Mat<float> y(c.n, c.out), dx(c.n, c.in), dx_other(c.n, c.in);

    // B = 0: G = 0, and s·G A adds +0 after W's sum: dx is W's product bit for bit.
    lora::LoRALinear<float> fresh(weight, bias, make_config(4, 8));
    Mat<float> base(c.n, c.in);
    weight.backward(dy, base);
    fresh.forward(x, y);
    fresh.backward(x, dy, dx);
    CHECK(dx == base);

    // B set: a double reference, and the same layer with the own GEMM turned off (G on Eigen, two passes over dx).
    lora::LoRALinear<float> on(weight, bias, make_config(4, 8)), other(weight, bias, make_config(4, 8)),
        no_dx(weight, bias, make_config(4, 8));
    on.lora_B() = other.lora_B() = no_dx.lora_B() = random_matrix<float>(c.out, 4, ++seed);
    on.forward(x, y);
    on.backward(x, dy, dx);
    no_dx.forward(x, y);
    no_dx.backward(x, dy);  // no dx asked: G on Eigen
    lora::detail::KGemm::set_enabled(false);
    other.forward(x, y);
    other.backward(x, dy, dx_other);
    lora::detail::KGemm::set_enabled(true);
    const double s = double(on.scaling());
    const Mat<double> xd = x.cast<double>(), dyd = dy.cast<double>(), A = on.lora_A().cast<double>(),
                      B = on.lora_B().cast<double>();
    const Mat<double> want_dx = dyd * W.cast<double>() + s * dyd * B * A;
    const double tol = 2e-6 * double(c.out);
    CHECK(max_diff(dx.cast<double>(), want_dx) < tol);
    CHECK(max_diff(dx.cast<double>(), dx_other.cast<double>()) < tol);
    CHECK(dx != dx_other);  // the two paths did run: their roundings differ somewhere
    const Mat<double> want_dA = s * (dyd * B).transpose() * xd, want_dB = s * dyd.transpose() * (xd * A.transpose());
    CHECK(max_diff(on.dA().cast<double>(), want_dA) < 1e-5 * want_dA.cwiseAbs().maxCoeff());
    CHECK(max_diff(on.dB().cast<double>(), want_dB) < 1e-5 * want_dB.cwiseAbs().maxCoeff());
    lora_test::check_same_gradients(on, other, 1e-5f);
    lora_test::check_same_gradients(on, no_dx, 1e-5f);
    // dx may be x's own buffer: x is read (for dA) before dx is written, as with separate buffers.
    lora::LoRALinear<float> in_place(weight, bias, make_config(4, 8));
    in_place.lora_B() = on.lora_B();
    Mat<float> buffer = x;
    in_place.forward(buffer, y);
    in_place.backward(buffer, dy, buffer);
    CHECK(max_diff(buffer.cast<double>(), want_dx) < tol);
    lora_test::check_same_gradients(in_place, on, 1e-5f);

    // Dropout, the same seed in every layer (so the same masks): G inside the GEMM, s·(G A) ⊙ mask added after it.
    // The own GEMM's layer, the other path's and a layer asked for no dx agree on dx and every gradient.
    lora::LoRALinear<float> d_on(weight, bias, make_config(4, 8, 0.2, 91)),
        d_other(weight, bias, make_config(4, 8, 0.2, 91)), d_no_dx(weight, bias, make_config(4, 8, 0.2, 91));
    d_on.lora_B() = d_other.lora_B() = d_no_dx.lora_B() = on.lora_B();
    d_on.forward(x, y);
    d_on.backward(x, dy, dx);
    d_no_dx.forward(x, y);
    d_no_dx.backward(x, dy);
    lora::detail::KGemm::set_enabled(false);
    d_other.forward(x, y);
    d_other.backward(x, dy, dx_other);
    lora::detail::KGemm::set_enabled(true);
    CHECK(max_diff(dx.cast<double>(), dx_other.cast<double>()) < tol);
    CHECK(max_diff(dx.cast<double>(), want_dx) > 100 * tol);  // the mask acted
    lora_test::check_same_gradients(d_on, d_other, 1e-5f);
    lora_test::check_same_gradients(d_on, d_no_dx, 1e-5f);
  }
}

TEST_CASE("scaling is alpha / r, or alpha / sqrt(r) with rsLoRA", "[linear]") {
  auto cfg = make_config(4, 8.0);
  CHECK(lora::LoRALinear<float>(6, 5, cfg).scaling() == 2.0f);
  cfg.use_rslora = true;
  CHECK(lora::LoRALinear<float>(6, 5, cfg).scaling() == 4.0f);
  cfg.r = 0;
  CHECK(lora::LoRALinear<float>(6, 5, cfg).scaling() == 0.0f);
}

TEST_CASE("default init: A ~ U(-1/sqrt(I), 1/sqrt(I)), B = 0, and seeds reproduce", "[linear][init]") {
  const Index I = 400, O = 50;
  lora::LoRALinear<double> layer(I, O, make_config(16, 16));
  const double bound = 1.0 / std::sqrt(double(I));
  const auto A = layer.lora_A();
  CHECK(layer.lora_B().isZero(0));
  CHECK(A.cwiseAbs().maxCoeff() <= bound);
  // 6400 uniform draws: max close to the bound, mean near 0, variance near bound²/3.
  CHECK(A.cwiseAbs().maxCoeff() > 0.99 * bound);
  CHECK(std::abs(A.mean()) < 0.05 * bound);
  const double var = (A.array() - A.mean()).square().mean();
  CHECK(var == Approx(bound * bound / 3).epsilon(0.05));

  lora::LoRALinear<double> same(I, O, make_config(16, 16));
  CHECK(same.lora_A() == layer.lora_A());
  CHECK(same.weight() == layer.weight());
  lora::LoRALinear<double> other(I, O, make_config(16, 16, 0.0, /*seed*/ 8));
  CHECK(other.lora_A() != layer.lora_A());

  // A layer over a view gets the same A as one owning its weight: init streams are independent.
  const Mat<double> W = layer.weight();
  auto viewed = lora::LoRALinear<double>::view(W.data(), O, I, make_config(16, 16));
  CHECK(viewed.lora_A() == layer.lora_A());
}

TEST_CASE("gaussian init: A ~ N(0, 1/r) with B = 0, and random init: B nonzero", "[linear][init]") {
  auto cfg = make_config(4, 4);
  cfg.init_lora_weights = lora::InitLoraWeights::gaussian;
  lora::LoRALinear<double> layer(5000, 10, cfg);
  const auto A = layer.lora_A();
  const double sd = std::sqrt((A.array() - A.mean()).square().mean());
  CHECK(sd == Approx(1.0 / 4).epsilon(0.03));  // 20000 draws: sd's relative error ~ 0.5%
  CHECK(std::abs(A.mean()) < 0.01);
  CHECK(layer.lora_B().isZero(0));

  cfg.init_lora_weights = lora::InitLoraWeights::random;
  lora::LoRALinear<double> noisy(50, 10, cfg);
  CHECK(noisy.lora_B().cwiseAbs().minCoeff() > 0);
  CHECK(noisy.lora_B().cwiseAbs().maxCoeff() <= 1.0 / std::sqrt(4.0));
}

TEMPLATE_TEST_CASE("B = 0 at init gives exactly the base output, even with dropout", "[linear]", float, double) {
  auto cfg = make_config(8, 16, 0.5);
  lora::LoRALinear<TestType> layer(12, 9, cfg);
  const Mat<TestType> x = random_matrix<TestType>(5, 12, 3);
  Mat<TestType> y(5, 9);
  layer.forward(x, y);
  CHECK(y == base_output(layer, x));
  layer.eval();
  layer.forward(x, y);
  CHECK(y == base_output(layer, x));
}

TEST_CASE("dropout: masks are 0 or 1/(1-p), about p of them zero, reproducible by seed", "[linear][dropout]") {
  // I = O = R = 1, W = 0, A = B = 1, alpha = 1: y = drop(x), so y shows the mask for x = 1.
  const double p = 0.3;
  lora::LoRALinear<double> layer(Mat<double>::Zero(1, 1), make_config(1, 1, p));
  layer.lora_A()(0, 0) = 1;
  layer.lora_B()(0, 0) = 1;
  const Index N = 20000;
  const Mat<double> x = Mat<double>::Ones(N, 1);
  Mat<double> y(N, 1);
  layer.set_dropout_seed(5);
  layer.forward(x, y);
  const Index zeros = (y.array() == 0).count();
  const Index kept = (y.array() == 1 / (1 - p)).count();
  CHECK(zeros + kept == N);
  const double sigma = std::sqrt(N * p * (1 - p));  // ~65
  CHECK(std::abs(double(zeros) - N * p) < 5 * sigma);

  Mat<double> again(N, 1);
  layer.forward(x, again);
  CHECK(again != y);  // a new mask per forward
  layer.set_dropout_seed(5);
  layer.forward(x, again);
  CHECK(again == y);  // the same mask after reseeding

  layer.eval();  // no dropout in eval mode
  layer.forward(x, again);
  CHECK(again == x);
}

TEMPLATE_TEST_CASE("merge: merged forward equals unmerged, unmerge restores W, merge is idempotent", "[linear][merge]",
                   float, double) {
  auto layer = adapted_layer<TestType>(64, 48, 8, 16);
  layer.eval();
  const Mat<TestType> x = random_matrix<TestType>(7, 64, 4);
  const Mat<TestType> W0 = layer.weight();
  const Mat<TestType> y_unmerged = layer.forward(x);

  layer.merge();
  REQUIRE(layer.is_merged());
  const Mat<TestType> W_merged = layer.weight();
  const Mat<TestType> delta = (layer.scaling() * layer.lora_B() * layer.lora_A()).eval();
  CHECK((W_merged - W0 - delta).cwiseAbs().maxCoeff() <= 1e-6 * (1 + W0.cwiseAbs().maxCoeff()));
  const Mat<TestType> y_merged = layer.forward(x);
  CHECK((y_merged - y_unmerged).cwiseAbs().maxCoeff() <= 1e-5 * (1 + y_unmerged.cwiseAbs().maxCoeff()));

  layer.merge();  // second call does nothing
  CHECK(layer.weight() == W_merged);

  layer.unmerge();
  CHECK_FALSE(layer.is_merged());
  CHECK((layer.weight() - W0).norm() <= 1e-6 * W0.norm());
  CHECK(layer.forward(x).isApprox(y_unmerged, TestType(1e-5)));
  layer.unmerge();  // not merged: nothing happens
  CHECK((layer.weight() - W0).norm() <= 1e-6 * W0.norm());
}

TEST_CASE("unmerge subtracts what merge added even if A and B changed in between", "[linear][merge]") {
  auto layer = adapted_layer<double>(10, 6, 2, 4);
  const Mat<double> W0 = layer.weight();
  layer.merge();
  layer.lora_A() *= 3;  // e.g. an optimizer step on a merged layer
  layer.lora_B().setConstant(9);
  layer.unmerge();
  CHECK((layer.weight() - W0).cwiseAbs().maxCoeff() < 1e-14);
}

TEST_CASE("safe merge refuses a non-finite result and leaves W untouched", "[linear][merge]") {
  auto layer = adapted_layer<float>(8, 5, 2, 4);
  const Mat<float> W0 = layer.weight();
  layer.lora_B()(1, 0) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(layer.merge(), lora::numeric_error);
  CHECK(layer.weight() == W0);
  CHECK_FALSE(layer.is_merged());

  layer.lora_B()(1, 0) = std::numeric_limits<float>::max();  // finite, but W + s·B·A overflows
  layer.lora_A().setConstant(std::numeric_limits<float>::max());
  REQUIRE_THROWS_WITH(layer.merge(), Contains("non-finite"));
  CHECK(layer.weight() == W0);
}

TEST_CASE("safe merge of a wide layer works block by block and still checks every row first", "[linear][merge]") {
  // I = 32768: the safe merge handles s·B·A a few rows at a time (2 here), so rows 0..3 are
  // checked and found finite before the bad row 4; they must still be left untouched.
  auto layer = adapted_layer<double>(32768, 5, 3, 6);
  const Mat<double> W0 = layer.weight();
  const Mat<double> delta = (layer.scaling() * layer.lora_B() * layer.lora_A()).eval();
  layer.merge();
  CHECK((layer.weight() - W0 - delta).cwiseAbs().maxCoeff() < 1e-15);
  layer.unmerge();
  CHECK((layer.weight() - W0).cwiseAbs().maxCoeff() < 1e-15);

  const Mat<double> W1 = layer.weight();
  layer.lora_B()(4, 2) = std::numeric_limits<double>::infinity();
  REQUIRE_THROWS_WITH(layer.merge(), Contains("non-finite") && Contains("rows 4..4"));
  CHECK(layer.weight() == W1);
  CHECK_FALSE(layer.is_merged());
}

TEST_CASE("training a merged layer is an error that changes nothing", "[linear][merge]") {
  auto layer = adapted_layer<double>(6, 4, 2, 2);
  layer.merge();
  const Mat<double> W_merged = layer.weight();
  const Mat<double> x = random_matrix<double>(3, 6, 5);
  Mat<double> y = Mat<double>::Constant(3, 4, 42);
  REQUIRE(layer.is_training());
  REQUIRE_THROWS_AS(layer.forward(x, y), lora::state_error);
  REQUIRE_THROWS_WITH(layer.forward(x, y), Contains("unmerge()"));
  CHECK(y == Mat<double>::Constant(3, 4, 42));
  CHECK(layer.weight() == W_merged);
  CHECK(layer.is_merged());
  Mat<double> dx(3, 6);
  REQUIRE_THROWS_AS(layer.backward(x, Mat<double>::Ones(3, 4), dx), lora::state_error);
  CHECK(layer.dA().isZero(0));
}

TEST_CASE("eval() never merges and a const layer refuses a training forward", "[linear]") {
  auto layer = adapted_layer<double>(6, 4, 2, 2, 0.2);
  const Mat<double> W0 = layer.weight();
  layer.eval();
  CHECK_FALSE(layer.is_merged());
  CHECK(layer.weight() == W0);
  layer.train();
  const auto& const_layer = layer;
  const Mat<double> x = random_matrix<double>(2, 6, 1);
  Mat<double> y(2, 4);
  REQUIRE_THROWS_AS(const_layer.forward(x, y), lora::state_error);
  REQUIRE_THROWS_WITH(const_layer.forward(x, y), Contains("eval()"));
}

TEST_CASE("a read-only view is never written, never copied, and refuses merge", "[linear][view]") {
  const Index O = 6, I = 5;
  std::vector<float> host(O * I);
  for (std::size_t i = 0; i < host.size(); ++i) host[i] = 0.01f * float(i) - 0.1f;
  const std::vector<float> original = host;
  auto cfg = make_config(3, 6);
  auto layer = lora::LoRALinear<float>::view(host.data(), O, I, cfg);
  CHECK(layer.weight().data() == host.data());  // no copy
  CHECK(layer.weight_is_view());
  CHECK_FALSE(layer.weight_is_writable());

  // 20 AdamW steps on a regression target: the adapter moves, the host weight does not.
  lora::AdamW<float> opt(layer.parameters(), {0.05, 0.9, 0.999, 1e-8, 0.1});
  const Mat<float> x = random_matrix<float>(8, I, 2), target = random_matrix<float>(8, O, 3);
  Mat<float> y(8, O), dy(8, O), dx(8, I);
  for (int step = 0; step < 20; ++step) {
    layer.forward(x, y);
    lora::mse_loss<float>(y, target, dy);
    layer.backward(x, dy, dx);
    opt.step();
    opt.zero_grad();
  }
  CHECK_FALSE(layer.lora_B().isZero(0));
  CHECK(host == original);

  REQUIRE_THROWS_AS(layer.merge(), lora::state_error);
  REQUIRE_THROWS_WITH(layer.merge(), Contains("mutable_view"));
  CHECK(host == original);
  CHECK_FALSE(layer.is_merged());

  // The view follows the host's buffer.
  host[0] += 1.0f;
  CHECK(layer.weight()(0, 0) == host[0]);
}

TEST_CASE("a mutable view merges in place and unmerges back", "[linear][view]") {
  const Index O = 4, I = 3;
  std::vector<double> host = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  const std::vector<double> original = host;
  auto layer = lora::LoRALinear<double>::mutable_view(host.data(), O, I, make_config(2, 2));
  layer.lora_B().setOnes();
  layer.lora_A() << 1, 0, 0, 0, 1, 0;  // s·B·A = [[1,1,0], ...] for every row (s = 1)
  layer.merge();
  CHECK(host[0] == 2);
  CHECK(host[1] == 3);
  CHECK(host[2] == 3);
  layer.unmerge();
  CHECK(host == original);
}

TEST_CASE("r = 0 is a plain frozen linear layer", "[linear]") {
  auto cfg = make_config(0, 8);
  lora::LoRALinear<double> layer(5, 3, cfg);
  CHECK(layer.parameters().empty());
  CHECK(layer.parameter_count().trainable == 0);
  CHECK(layer.parameter_count().frozen == 5 * 3 + 3);
  const Mat<double> x = random_matrix<double>(4, 5, 9), dy = random_matrix<double>(4, 3, 10);
  Mat<double> y(4, 3), dx(4, 5);
  layer.forward(x, y);
  CHECK(y == base_output(layer, x));
  layer.backward(x, dy, dx);
  CHECK(dx.isApprox(dy * layer.weight()));
  const Mat<double> W0 = layer.weight();
  layer.merge();
  CHECK(layer.weight() == W0);
}

TEST_CASE("bias modes decide which biases train, as loralib and PEFT", "[linear][params]") {
  auto count = [](int r, lora::BiasMode mode) {
    auto cfg = make_config(r, 8);
    cfg.bias = mode;
    lora::LoRALinear<float> layer(10, 6, cfg);
    return std::make_pair(layer.bias_trainable(), layer.parameter_count());
  };
  // r = 2: A 2·10 + B 6·2 = 32; bias 6; W 60
  CHECK(count(2, lora::BiasMode::none).first == false);
  CHECK(count(2, lora::BiasMode::none).second.trainable == 32);
  CHECK(count(2, lora::BiasMode::none).second.frozen == 66);
  CHECK(count(2, lora::BiasMode::all).second.trainable == 38);
  CHECK(count(2, lora::BiasMode::all).second.frozen == 60);
  CHECK(count(2, lora::BiasMode::lora_only).second.trainable == 38);
  CHECK(count(0, lora::BiasMode::all).second.trainable == 6);        // all: unadapted layers too
  CHECK(count(0, lora::BiasMode::lora_only).second.trainable == 0);  // lora_only: adapted layers only
  CHECK(count(0, lora::BiasMode::lora_only).second.frozen == 66);
}

TEST_CASE("parameter accounting: the seed example and PEFT's summary line", "[linear][params]") {
  // d = k = 1024, r = 8: 16,384 trainable of 1,048,576 frozen, 64 times fewer.
  auto cfg = make_config(8, 8);
  lora::LoRALinear<float> layer(1024, 1024, cfg, /*bias*/ false);
  CHECK(layer.parameter_count().trainable == 16384);
  CHECK(layer.parameter_count().frozen == 1048576);
  CHECK(lora::trainable_summary(layer.parameter_count()) ==
        "trainable params: 16,384 || all params: 1,064,960 || trainable%: 1.5385");
  // The shape-only count allocates nothing and agrees.
  const auto dry = lora::LoRALinear<float>::parameter_count_for(12288, 12288, cfg, false);
  CHECK(dry.trainable == 8 * (12288 + 12288));
  CHECK(dry.frozen == Index(12288) * 12288);

  lora::Sequential<float> model;
  model.add(lora::LoRALinear<float>(16, 32, cfg)).add(lora::ReLU{}).add(lora::LoRALinear<float>(32, 4, cfg));
  // trainable 8·(16+32) + 8·(32+4) = 672; frozen 16·32 + 32 + 32·4 + 4 = 676
  CHECK(model.parameter_count().trainable == 672);
  CHECK(model.parameter_count().frozen == 676);
  CHECK(model.summary() == "trainable params: 672 || all params: 1,348 || trainable%: 49.8516");
}

TEST_CASE("Sequential's backward is its layers' backward chained by hand, dx in any buffer", "[linear][sequential]") {
  // Sequential passes gradients through two buffers used in turn; chaining copies of its layers by hand, each
  // gradient in its own matrix, must give the same dx and the same dA, dB and db, bit for bit.
  auto l0 = adapted_layer<double>(6, 9, 3, 6, 0.25), l1 = adapted_layer<double>(9, 5, 2, 2);
  auto trained_bias = make_config(2, 4);
  trained_bias.bias = lora::BiasMode::all;
  lora::LoRALinear<double> l2(5, 4, trained_bias);
  l2.lora_B() = random_matrix<double>(4, 2, 12);
  for (auto* l : {&l0, &l1, &l2}) l->set_dropout_seed(7);
  auto h0 = l0, h1 = l1, h2 = l2;  // the hand-chained copies, dropout sequence included
  lora::Sequential<double> model;
  model.add(std::move(l0)).add(lora::ReLU{}).add(std::move(l1)).add(lora::GELU{}).add(std::move(l2));
  const Mat<double> x = random_matrix<double>(7, 6, 3), dy = random_matrix<double>(7, 4, 4);
  Mat<double> dx(7, 6);
  model.forward(x);
  model.backward(dy, dx);

  Mat<double> a1(7, 9), a2(7, 9), a3(7, 5), a4(7, 5), y(7, 4), g4(7, 5), g3(7, 5), g2(7, 9), g1(7, 9), g0(7, 6);
  h0.forward(x, a1);
  lora::ReLU::forward<double>(a1, a2);
  h1.forward(a2, a3);
  lora::GELU::forward<double>(a3, a4);
  h2.forward(a4, y);
  h2.backward(a4, dy, g4);
  lora::GELU::backward<double>(a3, g4, g3);
  h1.backward(a2, g3, g2);
  lora::ReLU::backward<double>(a1, g2, g1);
  h0.backward(x, g1, g0);
  CHECK(dx == g0);
  CHECK(model.linear(0).dA() == h0.dA());
  CHECK(model.linear(0).dB() == h0.dB());
  CHECK(model.linear(2).dA() == h1.dA());
  CHECK(model.linear(4).dB() == h2.dB());
  REQUIRE(h2.db().size() == 4);
  CHECK(model.linear(4).db() == h2.db());
  CHECK_FALSE(g0.isZero(0));

  // Without dx (and the first dropout mask again) the gradients are the same again.
  model.zero_grad();
  model.linear(0).set_dropout_seed(7);
  model.forward(x);
  model.backward(dy);
  CHECK(model.linear(0).dA() == h0.dA());
  CHECK(model.linear(4).dB() == h2.dB());

  // One layer, dx written over dy itself: the same dx as into a buffer of its own.
  lora::Sequential<double> one;
  one.add(adapted_layer<double>(5, 5, 2, 4));
  const Mat<double> x1 = random_matrix<double>(3, 5, 5), dy1 = random_matrix<double>(3, 5, 6);
  Mat<double> own(3, 5), shared = dy1;
  one.forward(x1);
  one.backward(dy1, own);
  one.forward(x1);
  one.backward(shared, shared);
  CHECK(shared == own);
}

TEST_CASE("bad configuration throws config_error naming the value", "[linear][errors]") {
  auto cfg = make_config(-1, 8);
  REQUIRE_THROWS_AS(lora::LoRALinear<float>(4, 4, cfg), lora::config_error);
  REQUIRE_THROWS_WITH(lora::LoRALinear<float>(4, 4, cfg), Contains("r must be >= 0") && Contains("-1"));
  for (double p : {1.0, -0.1, 1.5, std::nan("")}) {
    cfg = make_config(2, 8, p);
    REQUIRE_THROWS_WITH(lora::LoRALinear<float>(4, 4, cfg), Contains("lora_dropout must be in [0, 1)"));
  }
  for (double a : {std::numeric_limits<double>::infinity(), std::nan("")}) {
    cfg = make_config(2, a);
    REQUIRE_THROWS_WITH(lora::LoRALinear<float>(4, 4, cfg), Contains("lora_alpha must be finite"));
  }
  REQUIRE_THROWS_AS(lora::LoRALinear<float>(0, 4, make_config(2, 2)), lora::shape_error);
  REQUIRE_THROWS_AS(lora::LoRALinear<float>::view(nullptr, 4, 4), lora::shape_error);
  lora::RowVector<float> short_bias(3);
  REQUIRE_THROWS_WITH(lora::LoRALinear<float>(Mat<float>::Zero(4, 5), short_bias, make_config(2, 2)),
                      Contains("expected 4") && Contains("got 3"));
}

TEST_CASE("bad shapes throw shape_error naming expected and actual shapes, and the layer is unchanged",
          "[linear][errors]") {
  auto layer = adapted_layer<double>(5, 4, 2, 2);
  const Mat<double> A0 = layer.lora_A(), B0 = layer.lora_B();
  Mat<double> y(3, 4);
  const Mat<double> wrong_x = Mat<double>::Ones(3, 6);
  REQUIRE_THROWS_AS(layer.forward(wrong_x, y), lora::shape_error);
  REQUIRE_THROWS_WITH(layer.forward(wrong_x, y), Contains("x expected shape (N, 5), got (3, 6)"));
  const Mat<double> x = Mat<double>::Ones(3, 5);
  Mat<double> wrong_y(3, 5);
  REQUIRE_THROWS_WITH(layer.forward(x, wrong_y), Contains("y expected shape (3, 4), got (3, 5)"));

  // backward before any forward, with another batch size, or with a wrong dy
  Mat<double> dx(3, 5);
  REQUIRE_THROWS_WITH(layer.backward(x, Mat<double>::Ones(3, 4), dx), Contains("no forward was run"));
  layer.forward(x, y);
  const Mat<double> x2 = Mat<double>::Ones(2, 5);
  Mat<double> dx2(2, 5);
  REQUIRE_THROWS_WITH(layer.backward(x2, Mat<double>::Ones(2, 4), dx2), Contains("had 3 rows") && Contains("got 2"));
  REQUIRE_THROWS_WITH(layer.backward(x, Mat<double>::Ones(3, 3), dx), Contains("dy expected shape (3, 4), got (3, 3)"));
  Mat<double> wrong_dx(3, 4);
  REQUIRE_THROWS_WITH(layer.backward(x, Mat<double>::Ones(3, 4), wrong_dx),
                      Contains("dx expected shape (3, 5), got (3, 4)"));
  CHECK(layer.dA().isZero(0));
  CHECK(layer.dB().isZero(0));
  CHECK(layer.lora_A() == A0);
  CHECK(layer.lora_B() == B0);

  // An output that overlaps its input would be read after being written.
  Mat<double> square(3, 4);
  lora::LoRALinear<double> sq(4, 4, make_config(2, 2));
  REQUIRE_THROWS_WITH(sq.forward(square, square), Contains("must not overlap"));
}

// Two layers from one LoraConfig used to get bit-identical W and A (every seed defaulted to 0).
TEST_CASE("layers built from one config start different, reproducibly, unless a seed is given", "[linear][seed]") {
  lora::LoraConfig c;
  c.r = 4;
  lora::manual_seed(123);
  lora::LoRALinear<float> a(16, 8, c), b(16, 8, c);
  CHECK(a.weight() != b.weight());
  CHECK(a.lora_A() != b.lora_A());
  REQUIRE(a.config().seed.has_value());
  REQUIRE(b.config().seed.has_value());
  CHECK(*a.config().seed != *b.config().seed);
  // The same program order gives the same numbers: manual_seed restarts the sequence.
  lora::manual_seed(123);
  lora::LoRALinear<float> a2(16, 8, c), b2(16, 8, c);
  CHECK(a2.weight() == a.weight());
  CHECK(a2.lora_A() == a.lora_A());
  CHECK(b2.lora_A() == b.lora_A());
  CHECK(*a2.config().seed == *a.config().seed);
  // A layer's own seed pins its numbers whatever else was built before it, and the seed it used rebuilds it.
  c.seed = 9;
  lora::LoRALinear<float> p(16, 8, c), q(16, 8, c);
  CHECK(p.weight() == q.weight());
  CHECK(p.lora_A() == q.lora_A());
  lora::LoRALinear<float> again(16, 8, a.config());
  CHECK(again.weight() == a.weight());
  CHECK(again.lora_A() == a.lora_A());
  // Adapters added to a multi-adapter layer without a seed differ too.
  c.seed.reset();
  lora::MultiLoRALinear<float> multi(lora::Matrix<float>::Zero(8, 16));
  multi.add_adapter("x", c);
  multi.add_adapter("y", c);
  CHECK(multi.adapter("x")->lora_A != multi.adapter("y")->lora_A);
}

}  // namespace unit_linear
