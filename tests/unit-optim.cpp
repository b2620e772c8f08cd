// Optimizers (AdamW, SGD), gradient clipping and learning-rate schedules:
// PyTorch golden runs, hand-computed single steps, state accounting, frozen
// weights, gradient accumulation and bad options.
#include <catch2/catch.hpp>
#include <lora/lora.hpp>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "golden.hpp"

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_optim {

using Catch::Contains;
using lora::Index;
using lora_test::max_rel_diff;
using lora_test::rel_diff;
using lora_test::tensor;
using lora_test::tolerance;
template <class S>
using Mat = lora::Matrix<S>;

namespace {

// The layer of make_golden.py: r = 3, alpha = 6 (s = 2), W, b, A, B from the file.
template <class S>
lora::LoRALinear<S> golden_layer(lora::BiasMode bias) {
  lora::LoraConfig cfg;
  cfg.r = 3;
  cfg.lora_alpha = 6;
  cfg.bias = bias;
  lora::LoRALinear<S> layer(tensor<S>("linear.W"), tensor<S>("linear.b"), cfg);
  layer.lora_A() = tensor<S>("linear.A");
  layer.lora_B() = tensor<S>("linear.B");
  return layer;
}

// Deterministic, platform-independent test data (no std::rand).
template <class S>
Mat<S> smooth_matrix(Index rows, Index cols, double seed) {
  Mat<S> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j)
      m(i, j) = static_cast<S>(std::sin(1.3 * static_cast<double>(i) + 0.7 * static_cast<double>(j) + seed));
  return m;
}

template <class S>
typename lora::AdamW<S>::Options adamw_options(double lr, double beta1, double beta2, double eps, double wd) {
  typename lora::AdamW<S>::Options o;
  o.lr = lr;
  o.beta1 = beta1;
  o.beta2 = beta2;
  o.eps = eps;
  o.weight_decay = wd;
  return o;
}

template <class S>
typename lora::SGD<S>::Options sgd_options(double lr, double momentum, double dampening, double wd, bool nesterov) {
  typename lora::SGD<S>::Options o;
  o.lr = lr;
  o.momentum = momentum;
  o.dampening = dampening;
  o.weight_decay = wd;
  o.nesterov = nesterov;
  return o;
}

// A (1, n) matrix of the given values.
template <class S>
Mat<S> row_of(std::initializer_list<double> values) {
  Mat<S> m(1, static_cast<Index>(values.size()));
  Index j = 0;
  for (double v : values) m(0, j++) = static_cast<S>(v);
  return m;
}

// A one-scalar parameter over caller-owned storage.
template <class S>
lora::ParameterList<S> scalar_parameter(S& value, S& grad) {
  return {{"p", &value, &grad, 1, 1}};
}

}  // namespace

// ---- PyTorch golden runs ----------------------------------------------------

TEMPLATE_TEST_CASE("AdamW: five MSE training steps match torch.optim.AdamW", "[optim][adamw][golden]", float, double) {
  using S = TestType;
  // Five chained float steps measured 6e-7 at worst, so the standard 1e-5 holds; a wrong
  // formula (eps placement, bias correction, decay) is off by more than 1e-3.
  const double tol = tolerance<S>;
  auto layer = golden_layer<S>(lora::BiasMode::all);
  REQUIRE(layer.parameters().size() == 3);  // A, B and the bias train
  const auto x = tensor<S>("linear.x");
  const auto target = tensor<S>("adamw.target");
  const auto losses = tensor("adamw.losses");
  lora::AdamW<S> opt(layer.parameters(), adamw_options<S>(0.05, 0.9, 0.99, 1e-8, 0.1));

  Mat<S> y(x.rows(), layer.out_features()), dy(x.rows(), layer.out_features());
  for (int step = 0; step < 5; ++step) {
    CAPTURE(step);
    layer.zero_grad();
    layer.forward(x, y);
    const S loss = lora::mse_loss<S>(y, target, dy);
    CHECK(rel_diff(loss, losses(0, step)) < tol);
    layer.backward(x, dy);
    opt.step();
  }
  CHECK(opt.step_count() == 5);
  CHECK(max_rel_diff(layer.lora_A(), tensor("adamw.A")) < tol);
  CHECK(max_rel_diff(layer.lora_B(), tensor("adamw.B")) < tol);
  CHECK(max_rel_diff(layer.bias(), tensor("adamw.b")) < tol);
}

TEMPLATE_TEST_CASE("SGD: three nesterov momentum steps match torch.optim.SGD", "[optim][sgd][golden]", float, double) {
  using S = TestType;
  // float: the gradients here are large (|dB| ~ 10) and momentum carries each step's rounding
  // into the next; three steps measured 3.6e-6, so 2e-5 rather than 1e-5 for some headroom.
  const double tol = sizeof(S) == 4 ? 2e-5 : 1e-10;
  auto layer = golden_layer<S>(lora::BiasMode::none);  // the bias exists but is frozen
  REQUIRE(layer.parameters().size() == 2);
  const auto x = tensor<S>("linear.x");
  const auto target = tensor<S>("adamw.target");
  const Mat<S> b0 = layer.bias();
  lora::SGD<S> opt(layer.parameters(), sgd_options<S>(0.05, 0.9, 0.0, 0.01, true));

  Mat<S> y(x.rows(), layer.out_features()), dy(x.rows(), layer.out_features());
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    layer.forward(x, y);
    lora::mse_loss<S>(y, target, dy);
    layer.backward(x, dy);
    opt.step();
  }
  CHECK(max_rel_diff(layer.lora_A(), tensor("sgd.A")) < tol);
  CHECK(max_rel_diff(layer.lora_B(), tensor("sgd.B")) < tol);
  CHECK(layer.bias() == b0);
}

// ---- hand-computed steps ------------------------------------------------------

TEMPLATE_TEST_CASE("AdamW: hand-computed steps on one scalar", "[optim][adamw]", float, double) {
  using S = TestType;
  const double tol = sizeof(S) == 4 ? 1e-6 : 1e-14;

  SECTION("first step: bias correction, eps after the root, decoupled decay") {
    // p = 1, g = 0.5, lr = 0.1, beta1 = 0.9, beta2 = 0.99, eps = 0.5 (large on purpose), wd = 0.1:
    //   p <- p (1 - lr wd) = 0.99
    //   m = 0.1 * 0.5 = 0.05,  v = 0.01 * 0.25 = 0.0025
    //   m_hat = m / (1 - 0.9) = 0.5,  sqrt(v) / sqrt(1 - 0.99) = 0.05 / 0.1 = 0.5
    //   p <- 0.99 - 0.1 * 0.5 / (0.5 + 0.5) = 0.99 - 0.05 = 0.94
    // (eps added before the bias correction, (sqrt(v) + eps) / sqrt(bc2) = 5.5, would give 0.99 - 0.00909;
    //  decay applied after the update or coupled into g would not give 0.94 either.)
    S p = 1, g = S(0.5);
    lora::AdamW<S> opt(scalar_parameter(p, g), adamw_options<S>(0.1, 0.9, 0.99, 0.5, 0.1));
    opt.step();
    CHECK(std::abs(p - 0.94) < tol);
    CHECK(g == S(0.5));  // the optimizer never touches the gradient
  }

  SECTION("a constant gradient moves by lr * |g| / (|g| + eps) every step") {
    // With g constant, the bias-corrected moments are exactly m_hat = g and v_hat = g² at every t,
    // so each step is lr * g / (|g| + eps) = 0.1 * 0.5 / 1.0 = 0.05 (wd = 0): 1 -> 0.95 -> 0.90 -> 0.85.
    // Without bias correction the first step would be 0.1 * 0.05 / (0.05 + 0.5) = 0.00909.
    S p = 1, g = S(0.5);
    lora::AdamW<S> opt(scalar_parameter(p, g), adamw_options<S>(0.1, 0.9, 0.99, 0.5, 0.0));
    const double expected[] = {0.95, 0.90, 0.85};
    for (double e : expected) {
      opt.step();
      CHECK(std::abs(p - e) < tol);
    }
  }

  SECTION("decoupled weight decay shrinks a parameter with zero gradient by (1 - lr wd)") {
    // p = 2, g = 0, lr = 0.1, wd = 0.01: m = v = 0, so only the decay acts: p = 2 (1 - 0.001) = 1.998.
    // Adam with L2 (g += wd p = 0.02) would instead step by about lr: p = 1.9.
    S p = 2, g = 0;
    lora::AdamW<S> opt(scalar_parameter(p, g), adamw_options<S>(0.1, 0.9, 0.999, 1e-8, 0.01));
    opt.step();
    CHECK(std::abs(p - 1.998) < tol);
    opt.step();
    CHECK(std::abs(p - 1.998 * 0.999) < tol);  // 1.996002
  }
}

TEMPLATE_TEST_CASE("SGD: hand-computed plain, weight decay, momentum and nesterov steps", "[optim][sgd]", float,
                   double) {
  using S = TestType;
  const double tol = sizeof(S) == 4 ? 1e-6 : 1e-14;
  S p = 1, g = S(0.5);

  SECTION("plain: p <- p - lr g") {
    lora::SGD<S> opt(scalar_parameter(p, g), sgd_options<S>(0.1, 0, 0, 0, false));
    opt.step();  // 1 - 0.1 * 0.5
    CHECK(std::abs(p - 0.95) < tol);
    CHECK(opt.state_bytes() == 0);  // no momentum, no state
  }
  SECTION("weight decay adds wd p to the gradient") {
    lora::SGD<S> opt(scalar_parameter(p, g), sgd_options<S>(0.1, 0, 0, 0.1, false));
    opt.step();  // g' = 0.5 + 0.1 * 1 = 0.6; 1 - 0.06
    CHECK(std::abs(p - 0.94) < tol);
  }
  SECTION("momentum: buf = g on the first step, dampening only from the second") {
    lora::SGD<S> opt(scalar_parameter(p, g), sgd_options<S>(0.1, 0.9, 0.5, 0, false));
    opt.step();  // buf = 0.5 (not (1 - 0.5) * 0.5); p = 1 - 0.05 = 0.95
    CHECK(std::abs(p - 0.95) < tol);
    opt.step();  // buf = 0.9 * 0.5 + 0.5 * 0.5 = 0.7; p = 0.95 - 0.07 = 0.88
    CHECK(std::abs(p - 0.88) < tol);
  }
  SECTION("nesterov: p <- p - lr (g + momentum buf)") {
    lora::SGD<S> opt(scalar_parameter(p, g), sgd_options<S>(0.1, 0.9, 0, 0, true));
    opt.step();  // buf = 0.5; g + 0.9 * 0.5 = 0.95; p = 1 - 0.095 = 0.905
    CHECK(std::abs(p - 0.905) < tol);
    opt.step();  // buf = 0.9 * 0.5 + 0.5 = 0.95; g + 0.9 * 0.95 = 1.355; p = 0.905 - 0.1355 = 0.7695
    CHECK(std::abs(p - 0.7695) < tol);
  }
}

// ---- state, frozen weights, accumulation ----------------------------------------

TEMPLATE_TEST_CASE("optimizer state is sized by the adapter, not the frozen weight", "[optim]", float, double) {
  using S = TestType;
  lora::LoraConfig cfg;
  cfg.r = 8;
  cfg.lora_alpha = 16;
  lora::LoRALinear<S> layer(1024, 1024, cfg, /*bias=*/false);
  // A (8, 1024) + B (1024, 8) = 16384 trainable scalars against 1,048,576 frozen ones.
  Index trainable = 0;
  for (const auto& p : layer.parameters()) trainable += p.size();
  REQUIRE(trainable == 16384);
  const lora::AdamW<S> adamw(layer.parameters());
  CHECK(adamw.state_bytes() == 2 * 16384 * sizeof(S));  // exp_avg and exp_avg_sq
  const lora::SGD<S> sgd(layer.parameters(), sgd_options<S>(0.1, 0.9, 0, 0, false));
  CHECK(sgd.state_bytes() == 16384 * sizeof(S));  // one momentum buffer
}

TEMPLATE_TEST_CASE("100 AdamW steps leave the frozen W and bias bit-identical while the loss falls", "[optim][adamw]",
                   float, double) {
  using S = TestType;
  lora::LoraConfig cfg;
  cfg.r = 4;
  cfg.lora_alpha = 8;
  cfg.seed = 3;
  lora::LoRALinear<S> layer(8, 6, cfg);  // bias exists, BiasMode::none: frozen
  const Mat<S> W0 = layer.weight();
  const Mat<S> b0 = layer.bias();
  const Mat<S> x = smooth_matrix<S>(16, 8, 0.1);
  const Mat<S> target = x * smooth_matrix<S>(8, 6, 2.0);  // a linear map the adapter can partly learn

  lora::AdamW<S> opt(layer.parameters(), adamw_options<S>(1e-2, 0.9, 0.999, 1e-8, 1e-2));
  Mat<S> y(16, 6), dy(16, 6);
  S first_loss = 0, last_loss = 0;
  for (int step = 0; step < 100; ++step) {
    opt.zero_grad();
    layer.forward(x, y);
    last_loss = lora::mse_loss<S>(y, target, dy);
    if (step == 0) first_loss = last_loss;
    layer.backward(x, dy);
    opt.step();
  }
  CHECK(layer.weight() == W0);
  CHECK(layer.bias() == b0);
  INFO("loss " << first_loss << " -> " << last_loss);
  CHECK(last_loss < S(0.5) * first_loss);
}

TEMPLATE_TEST_CASE("gradients of two half-batches add up to the full batch's, and zero_grad clears them",
                   "[optim][linear]", float, double) {
  using S = TestType;
  lora::LoraConfig cfg;
  cfg.r = 3;
  cfg.lora_alpha = 6;
  cfg.bias = lora::BiasMode::all;
  cfg.init_lora_weights = lora::InitLoraWeights::random;  // B != 0: dA is not zero
  lora::LoRALinear<S> layer(5, 4, cfg);
  const Mat<S> x = smooth_matrix<S>(6, 5, 0.3);
  const Mat<S> dy = smooth_matrix<S>(6, 4, 1.7);  // dy given directly: no loss normalisation involved

  Mat<S> y(6, 4), y_half(3, 4);
  layer.forward(x, y);
  layer.backward(x, dy);
  const Mat<S> dA_full = layer.dA(), dB_full = layer.dB(), db_full = layer.db();
  REQUIRE(dA_full.cwiseAbs().maxCoeff() > 0.1);
  REQUIRE(dB_full.cwiseAbs().maxCoeff() > 0.1);
  REQUIRE(db_full.cwiseAbs().maxCoeff() > 0.1);

  layer.zero_grad();
  CHECK((layer.dA().array() == 0).all());
  CHECK((layer.dB().array() == 0).all());
  CHECK((layer.db().array() == 0).all());

  layer.forward(x.topRows(3), y_half);
  layer.backward(x.topRows(3), dy.topRows(3));
  const Mat<S> dA_first = layer.dA();
  layer.forward(x.bottomRows(3), y_half);
  layer.backward(x.bottomRows(3), dy.bottomRows(3));
  CHECK(max_rel_diff(layer.dA(), dA_full) < tolerance<S>);
  CHECK(max_rel_diff(layer.dB(), dB_full) < tolerance<S>);
  CHECK(max_rel_diff(layer.db(), db_full) < tolerance<S>);
  CHECK(max_rel_diff(dA_first, dA_full) > 1e-3);  // the first half alone is not the whole

  // The optimizer's zero_grad clears the same buffers.
  lora::AdamW<S> opt(layer.parameters());
  opt.zero_grad();
  CHECK((layer.dA().array() == 0).all());
  CHECK((layer.dB().array() == 0).all());
  CHECK((layer.db().array() == 0).all());
}

// ---- gradient clipping ------------------------------------------------------------

TEMPLATE_TEST_CASE("clip_grad_norm matches torch.nn.utils.clip_grad_norm_", "[optim][clip][golden]", float, double) {
  using S = TestType;
  // clip.g1 / clip.g2: the gradients before clip_grad_norm_; clip.*_clipped: after.
  const double max_norm = 1.5;
  const double golden_norm = tensor("clip.norm")(0, 0);
  REQUIRE(golden_norm > max_norm);  // the golden case does clip
  Mat<S> g1 = tensor("clip.g1").cast<S>(), g2 = tensor("clip.g2").cast<S>();
  Mat<S> v1 = Mat<S>::Zero(3, 2), v2 = Mat<S>::Zero(1, 4);
  const lora::ParameterList<S> params{{"p1", v1.data(), g1.data(), 3, 2}, {"p2", v2.data(), g2.data(), 1, 4}};

  SECTION("over max_norm: scaled, and the norm before clipping returned") {
    const double norm = lora::clip_grad_norm(params, max_norm);
    CHECK(rel_diff(norm, golden_norm) < tolerance<S>);
    CHECK(max_rel_diff(g1, tensor("clip.g1_clipped")) < tolerance<S>);
    CHECK(max_rel_diff(g2, tensor("clip.g2_clipped")) < tolerance<S>);
    CHECK((v1.array() == 0).all());  // values untouched
    CHECK((v2.array() == 0).all());
  }
  SECTION("under max_norm: gradients unchanged, bit for bit") {
    const Mat<S> g1_before = g1, g2_before = g2;
    const double norm = lora::clip_grad_norm(params, 100.0);
    CHECK(rel_diff(norm, golden_norm) < tolerance<S>);
    CHECK(g1 == g1_before);
    CHECK(g2 == g2_before);
  }
}

TEMPLATE_TEST_CASE("clip_grad_norm: hand-computed 2-norm, 1-norm and infinity norm", "[optim][clip]", float, double) {
  using S = TestType;
  Mat<S> g1 = row_of<S>({3, -4}), g2 = row_of<S>({1});
  Mat<S> v1 = Mat<S>::Zero(1, 2), v2 = Mat<S>::Zero(1, 1);
  const lora::ParameterList<S> params{{"a", v1.data(), g1.data(), 1, 2}, {"b", v2.data(), g2.data(), 1, 1}};

  SECTION("2-norm: sqrt(9 + 16 + 1)") {
    const double norm = lora::clip_grad_norm(params, 1.0);
    CHECK(rel_diff(norm, std::sqrt(26.0)) < tolerance<S>);
    const double c = 1.0 / (std::sqrt(26.0) + 1e-6);  // torch: max_norm / (norm + 1e-6)
    CHECK(rel_diff(g1(0, 0), 3 * c) < tolerance<S>);
    CHECK(rel_diff(g1(0, 1), -4 * c) < tolerance<S>);
    CHECK(rel_diff(g2(0, 0), c) < tolerance<S>);
  }
  SECTION("1-norm: 3 + 4 + 1") {
    const double norm = lora::clip_grad_norm(params, 2.0, 1.0);
    CHECK(rel_diff(norm, 8.0) < tolerance<S>);
    const double c = 2.0 / (8.0 + 1e-6);
    CHECK(rel_diff(g1(0, 1), -4 * c) < tolerance<S>);
  }
  SECTION("infinity norm: the largest |g| over all parameters") {
    const double norm = lora::clip_grad_norm(params, 2.0, std::numeric_limits<double>::infinity());
    CHECK(norm == 4.0);
    const double c = 2.0 / (4.0 + 1e-6);
    CHECK(rel_diff(g1(0, 0), 3 * c) < tolerance<S>);
    CHECK(rel_diff(g1(0, 1), -4 * c) < tolerance<S>);
    CHECK(rel_diff(g2(0, 0), c) < tolerance<S>);
  }
}

TEMPLATE_TEST_CASE("clip_grad_norm: a non-finite norm throws when asked and leaves the gradients",
                   "[optim][clip][errors]", float, double) {
  using S = TestType;
  const S inf = std::numeric_limits<S>::infinity(), nan = std::numeric_limits<S>::quiet_NaN();
  const auto which = GENERATE(std::make_pair(0, 2.0), std::make_pair(1, 2.0),
                              std::make_pair(0, std::numeric_limits<double>::infinity()),
                              std::make_pair(1, std::numeric_limits<double>::infinity()));
  const S bad = which.first == 0 ? inf : nan;
  const double norm_type = which.second;
  CAPTURE(bad, norm_type);
  Mat<S> g1 = row_of<S>({1, 0}), g2 = row_of<S>({2});
  g1(0, 1) = bad;
  Mat<S> v1 = Mat<S>::Zero(1, 2), v2 = Mat<S>::Zero(1, 1);
  const lora::ParameterList<S> params{{"a", v1.data(), g1.data(), 1, 2}, {"b", v2.data(), g2.data(), 1, 1}};

  REQUIRE_THROWS_AS(lora::clip_grad_norm(params, 1.0, norm_type, true), lora::numeric_error);
  CHECK(g1(0, 0) == 1);
  CHECK((std::isnan(bad) ? std::isnan(g1(0, 1)) : g1(0, 1) == bad));
  CHECK(g2(0, 0) == 2);
}

TEST_CASE("clip_grad_norm: a NaN gradient makes the infinity norm NaN, as in torch", "[optim][clip]") {
  // torch: the inf-norm of a tensor holding NaN is NaN (max propagates NaN), so clip_grad_norm_
  // returns NaN and, with error_if_nonfinite, raises. A plain std::max(total, NaN) would keep total.
  Mat<double> g = row_of<double>({1, 0, 2}), v = Mat<double>::Zero(1, 3);
  g(0, 1) = std::numeric_limits<double>::quiet_NaN();
  const lora::ParameterList<double> params{{"a", v.data(), g.data(), 1, 3}};
  const Mat<double> g_before = g;
  CHECK_THROWS_AS(lora::clip_grad_norm(params, 1.0, std::numeric_limits<double>::infinity(), true),
                  lora::numeric_error);
  g = g_before;
  CHECK(std::isnan(lora::clip_grad_norm(params, 1.0, std::numeric_limits<double>::infinity())));
}

TEST_CASE("clip_grad_norm of float gradients whose squares overflow float still clips", "[optim][clip]") {
  // |g| = 5e20 is a float (max ~3.4e38), but g² is not: the norm must not come out infinite,
  // or every gradient is scaled by max_norm / inf = 0 instead of being clipped to max_norm.
  Mat<float> g = row_of<float>({3e20, 4e20}), v = Mat<float>::Zero(1, 2);
  const lora::ParameterList<float> params{{"a", v.data(), g.data(), 1, 2}};
  const double norm = lora::clip_grad_norm(params, 1.0);
  CHECK(rel_diff(norm / 5e20, 1.0) < 1e-6);
  CHECK(std::abs(g(0, 0) - 0.6f) < 1e-6f);
  CHECK(std::abs(g(0, 1) - 0.8f) < 1e-6f);
}

TEST_CASE("clip_grad_norm: bad max_norm or norm_type throws config_error naming it", "[optim][clip][errors]") {
  Mat<double> g = row_of<double>({3, 4}), v = Mat<double>::Zero(1, 2);
  const Mat<double> g_before = g;
  const lora::ParameterList<double> params{{"a", v.data(), g.data(), 1, 2}};
  REQUIRE_THROWS_AS(lora::clip_grad_norm(params, -1.0), lora::config_error);
  REQUIRE_THROWS_WITH(lora::clip_grad_norm(params, -1.0), Contains("max_norm") && Contains("-1"));
  REQUIRE_THROWS_AS(lora::clip_grad_norm(params, std::nan("")), lora::config_error);
  REQUIRE_THROWS_AS(lora::clip_grad_norm(params, 1.0, 0.0), lora::config_error);
  REQUIRE_THROWS_WITH(lora::clip_grad_norm(params, 1.0, -2.0), Contains("norm_type") && Contains("-2"));
  CHECK(g == g_before);
}

// ---- schedules ----------------------------------------------------------------------

TEST_CASE("linear and cosine schedules with warmup: hand-computed multipliers", "[optim][schedule]") {
  using lora::cosine_schedule_with_warmup;
  using lora::linear_schedule_with_warmup;
  const double pi = 3.14159265358979323846;
  // warmup 10, total 110: the decay runs over 100 steps.
  SECTION("warmup: step / warmup, the same for both") {
    double (*const schedules[])(long, long, long) = {
        linear_schedule_with_warmup, [](long s, long w, long t) { return cosine_schedule_with_warmup(s, w, t); }};
    for (auto f : schedules) {
      CHECK(f(0, 10, 110) == 0.0);
      CHECK(f(5, 10, 110) == 0.5);
      CHECK(f(10, 10, 110) == 1.0);
    }
  }
  SECTION("linear decay") {
    CHECK(linear_schedule_with_warmup(35, 10, 110) == 0.75);  // 75 / 100
    CHECK(linear_schedule_with_warmup(60, 10, 110) == 0.5);   // 50 / 100
    CHECK(linear_schedule_with_warmup(110, 10, 110) == 0.0);
    CHECK(linear_schedule_with_warmup(150, 10, 110) == 0.0);  // clamped, never negative
  }
  SECTION("cosine decay") {
    CHECK(cosine_schedule_with_warmup(35, 10, 110) == Approx(0.5 * (1 + std::cos(pi * 0.25))).margin(1e-15));
    CHECK(cosine_schedule_with_warmup(60, 10, 110) == Approx(0.5).margin(1e-15));
    CHECK(cosine_schedule_with_warmup(110, 10, 110) == Approx(0.0).margin(1e-15));
    // Past the end, Hugging Face's formula keeps following the cosine (it rises again):
    // step 120 -> progress 1.1 -> 0.5 (1 + cos(1.1 pi)) = 0.0245.
    CHECK(cosine_schedule_with_warmup(120, 10, 110) == Approx(0.5 * (1 + std::cos(pi * 1.1))).margin(1e-15));
    // num_cycles = 1: a full cosine, back to 1 at the end.
    CHECK(cosine_schedule_with_warmup(60, 10, 110, 1.0) == Approx(0.0).margin(1e-15));
    CHECK(cosine_schedule_with_warmup(110, 10, 110, 1.0) == Approx(1.0).margin(1e-15));
  }
  SECTION("warmup 0 starts at the full rate") {
    CHECK(linear_schedule_with_warmup(0, 0, 100) == 1.0);
    CHECK(linear_schedule_with_warmup(50, 0, 100) == 0.5);
    CHECK(cosine_schedule_with_warmup(0, 0, 100) == 1.0);
    CHECK(cosine_schedule_with_warmup(50, 0, 100) == Approx(0.5).margin(1e-15));
    CHECK(linear_schedule_with_warmup(0, 0, 0) == 0.0);  // nothing to train: no division by zero
  }
}

TEST_CASE("schedules: negative warmup or total steps throw config_error naming them", "[optim][schedule][errors]") {
  REQUIRE_THROWS_AS(lora::linear_schedule_with_warmup(0, -1, 10), lora::config_error);
  REQUIRE_THROWS_AS(lora::linear_schedule_with_warmup(0, 1, -10), lora::config_error);
  REQUIRE_THROWS_AS(lora::cosine_schedule_with_warmup(0, -1, 10), lora::config_error);
  REQUIRE_THROWS_AS(lora::cosine_schedule_with_warmup(0, 1, -10), lora::config_error);
  REQUIRE_THROWS_WITH(lora::linear_schedule_with_warmup(0, -3, 10), Contains("warmup_steps=-3"));
  REQUIRE_THROWS_WITH(lora::cosine_schedule_with_warmup(0, 1, -7), Contains("total_steps=-7"));
}

TEST_CASE("schedules: a negative step throws config_error instead of a multiplier outside [0, 1]",
          "[optim][schedule][errors]") {
  // step counts scheduler steps taken so far; -5 is a caller bug. Unchecked, warmup gives -0.5
  // (a negative learning rate) and warmup 0 gives 1.05.
  CHECK_THROWS_AS(lora::linear_schedule_with_warmup(-5, 10, 110), lora::config_error);
  CHECK_THROWS_AS(lora::cosine_schedule_with_warmup(-5, 10, 110), lora::config_error);
  CHECK_THROWS_AS(lora::linear_schedule_with_warmup(-5, 0, 100), lora::config_error);
}

// ---- bad options ----------------------------------------------------------------------

TEST_CASE("bad optimizer options throw config_error naming the option and the value", "[optim][errors]") {
  double p = 1, g = 0;
  const auto params = scalar_parameter(p, g);

  REQUIRE_THROWS_AS(lora::AdamW<double>(params, adamw_options<double>(-0.1, 0.9, 0.999, 1e-8, 0)), lora::config_error);
  REQUIRE_THROWS_WITH(lora::AdamW<double>(params, adamw_options<double>(-0.1, 0.9, 0.999, 1e-8, 0)),
                      Contains("lr") && Contains("-0.1"));
  REQUIRE_THROWS_AS(lora::AdamW<double>(params, adamw_options<double>(0.1, 1.0, 0.999, 1e-8, 0)), lora::config_error);
  REQUIRE_THROWS_WITH(lora::AdamW<double>(params, adamw_options<double>(0.1, 1.0, 0.999, 1e-8, 0)),
                      Contains("beta1") && Contains("got 1"));
  REQUIRE_THROWS_WITH(lora::AdamW<double>(params, adamw_options<double>(0.1, 0.9, 1.5, 1e-8, 0)),
                      Contains("beta2") && Contains("1.5"));
  REQUIRE_THROWS_WITH(lora::AdamW<double>(params, adamw_options<double>(0.1, 0.9, 0.999, -1.0, 0)),
                      Contains("eps") && Contains("-1"));
  REQUIRE_THROWS_WITH(lora::AdamW<double>(params, adamw_options<double>(0.1, 0.9, 0.999, 1e-8, -0.25)),
                      Contains("weight_decay") && Contains("-0.25"));
  REQUIRE_THROWS_AS(lora::AdamW<double>(params, adamw_options<double>(std::nan(""), 0.9, 0.999, 1e-8, 0)),
                    lora::config_error);

  REQUIRE_THROWS_AS(lora::SGD<double>(params, sgd_options<double>(-0.1, 0, 0, 0, false)), lora::config_error);
  REQUIRE_THROWS_WITH(lora::SGD<double>(params, sgd_options<double>(-0.1, 0, 0, 0, false)),
                      Contains("lr") && Contains("-0.1"));
  REQUIRE_THROWS_WITH(lora::SGD<double>(params, sgd_options<double>(0.1, -0.5, 0, 0, false)),
                      Contains("momentum") && Contains("-0.5"));
  REQUIRE_THROWS_AS(lora::SGD<double>(params, sgd_options<double>(0.1, 0, 0, 0, true)), lora::config_error);
  REQUIRE_THROWS_WITH(lora::SGD<double>(params, sgd_options<double>(0.1, 0, 0, 0, true)),
                      Contains("nesterov") && Contains("momentum") && Contains("got 0"));

  SECTION("set_lr rejects a negative rate and keeps the old one") {
    lora::AdamW<double> adamw(params, adamw_options<double>(0.1, 0.9, 0.999, 1e-8, 0));
    REQUIRE_THROWS_WITH(adamw.set_lr(-2.0), Contains("lr") && Contains("-2"));
    CHECK(adamw.lr() == 0.1);
    lora::SGD<double> sgd(params, sgd_options<double>(0.1, 0, 0, 0, false));
    REQUIRE_THROWS_AS(sgd.set_lr(-2.0), lora::config_error);
    CHECK(sgd.lr() == 0.1);
  }
}

TEST_CASE("SGD: nesterov with dampening throws config_error naming dampening and its value", "[optim][errors]") {
  double p = 1, g = 0;
  // momentum is fine here; the offending value is dampening = 0.5, so the message must say so.
  REQUIRE_THROWS_AS(lora::SGD<double>(scalar_parameter(p, g), sgd_options<double>(0.1, 0.9, 0.5, 0, true)),
                    lora::config_error);
  REQUIRE_THROWS_WITH(lora::SGD<double>(scalar_parameter(p, g), sgd_options<double>(0.1, 0.9, 0.5, 0, true)),
                      Contains("dampening") && Contains("0.5"));
}

// ---- LoRA+ -----------------------------------------------------------------------

TEMPLATE_TEST_CASE("LoRA+: four AdamW and SGD steps in PEFT's parameter groups match PyTorch",
                   "[optim][loraplus][golden]", float, double) {
  using S = TestType;
  // The linear layer (A, B and its bias train) and the embedding layer of make_golden.py, one optimizer; PEFT's
  // groups: lora_A at lr, lora_B and the bias at 4 lr (the bias without decay), the embedding at 1e-3. The
  // optimizer's own weight_decay (0.3) must not be used: LoRA+'s (0.1) replaces it.
  for (const char* kind : {"adamw", "sgd"}) {
    CAPTURE(kind);
    auto layer = golden_layer<S>(lora::BiasMode::all);
    Mat<S> E = tensor<S>("embedding.E");
    lora::LoraConfig ecfg;
    ecfg.r = 2;
    ecfg.lora_alpha = 4;
    lora::LoRAEmbedding<S> emb(
        lora::FrozenWeight<S>::mutable_view(E.data(), E.cols(), E.rows(), lora::WeightLayout::in_out), ecfg, 0);
    emb.lora_A() = tensor<S>("embedding.A");
    emb.lora_B() = tensor<S>("embedding.B");
    auto params = layer.parameters();
    for (auto& p : emb.parameters()) params.push_back(p);
    lora::LoraPlusOptions plus;
    plus.lr_ratio = 4;
    plus.lr_embedding = 1e-3;
    plus.weight_decay = 0.1;
    params = lora::loraplus_groups(params, 0.05, plus);
    const bool adamw = std::string(kind) == "adamw";
    lora::AdamW<S> adam(params, adamw_options<S>(0.05, 0.9, 0.99, 1e-8, 0.3));
    lora::SGD<S> sgd(params, sgd_options<S>(0.05, 0.9, 0.0, 0.3, true));

    const auto x = tensor<S>("linear.x");
    const auto target = tensor<S>("adamw.target");
    const auto emb_target = tensor<S>("loraplus.emb_target");
    const auto ids_matrix = tensor("embedding.ids");
    std::vector<Index> ids;
    for (Index i = 0; i < ids_matrix.size(); ++i) ids.push_back(static_cast<Index>(ids_matrix(0, i)));
    Mat<S> y(x.rows(), layer.out_features()), dy(x.rows(), layer.out_features());
    Mat<S> ye(static_cast<Index>(ids.size()), E.cols()), dye(ye.rows(), ye.cols());
    for (int step = 0; step < 4; ++step) {
      layer.zero_grad();
      emb.zero_grad();
      layer.forward(x, y);
      lora::mse_loss<S>(y, target, dy);
      layer.backward(x, dy);
      emb.forward(ids, ye);
      lora::mse_loss<S>(ye, emb_target, dye);
      emb.backward(ids, dye);
      if (adamw)
        adam.step();
      else
        sgd.step();
    }
    // Four chained float steps with large gradients (as the SGD golden test above): 2e-5.
    const double tol = sizeof(S) == 4 ? 2e-5 : 1e-10;
    const std::string at = std::string("loraplus.") + kind + ".";
    CHECK(max_rel_diff(layer.lora_A(), tensor(at + "A")) < tol);
    CHECK(max_rel_diff(layer.lora_B(), tensor(at + "B")) < tol);
    CHECK(max_rel_diff(layer.bias(), tensor(at + "b")) < tol);
    CHECK(max_rel_diff(emb.lora_A(), tensor(at + "emb_A")) < tol);
    CHECK(max_rel_diff(emb.lora_B(), tensor(at + "emb_B")) < tol);
  }
}

TEST_CASE("LoRA+: groups by name, hand-computed SGD steps, a schedule scales every group", "[optim][loraplus]") {
  double a = 1, b = 1, bias = 1, ea = 1, ga = 0.5, gb = 0.5, gbias = 0.5, gea = 0.5;
  lora::ParameterList<double> params = {{"0.lora_A", &a, &ga, 1, 1},
                                        {"0.lora_B", &b, &gb, 1, 1},
                                        {"0.bias", &bias, &gbias, 1, 1},
                                        {"wte.lora_embedding_A", &ea, &gea, 1, 1}};
  lora::LoraPlusOptions plus;
  plus.lr_ratio = 8;
  plus.lr_embedding = 0.02;
  plus.weight_decay = 0.5;
  const auto grouped = lora::loraplus_groups(params, 0.1, plus);
  CHECK(grouped[0].lr_scale == 1);
  CHECK(grouped[0].weight_decay == 0.5);
  CHECK(grouped[1].lr_scale == 8);
  CHECK(grouped[1].weight_decay == 0.5);
  CHECK(grouped[2].lr_scale == 8);
  CHECK(grouped[2].weight_decay == 0.0);
  CHECK(grouped[3].lr_scale == Approx(0.2));
  CHECK(grouped[3].weight_decay == 0.5);
  CHECK(params[1].lr_scale == 1);  // the list given is not changed

  // Plain SGD, lr 0.1, p <- p - lr_g (g + wd_g p): by hand.
  lora::SGD<double>::Options o;
  o.lr = 0.1;
  o.weight_decay = 7;  // replaced by every group's own
  lora::SGD<double> sgd(grouped, o);
  sgd.step();
  CHECK(a == Approx(1 - 0.1 * (0.5 + 0.5)));    // 0.9
  CHECK(b == Approx(1 - 0.8 * (0.5 + 0.5)));    // 0.2
  CHECK(bias == Approx(1 - 0.8 * 0.5));         // 0.6, no decay
  CHECK(ea == Approx(1 - 0.02 * (0.5 + 0.5)));  // 0.98
  sgd.set_lr(0.05);                             // a schedule halves every group's lr
  sgd.step();
  CHECK(a == Approx(0.9 - 0.05 * (0.5 + 0.5 * 0.9)));
  CHECK(b == Approx(0.2 - 0.4 * (0.5 + 0.5 * 0.2)));
  CHECK(bias == Approx(0.6 - 0.4 * 0.5));
  CHECK(ea == Approx(0.98 - 0.01 * (0.5 + 0.5 * 0.98)));

  CHECK_THROWS_WITH(lora::loraplus_groups(params, 0.0, plus), Contains("lr must be > 0, got 0"));
  plus.lr_ratio = -1;
  CHECK_THROWS_WITH(lora::loraplus_groups(params, 0.1, plus), Contains("lr_ratio must be > 0, got -1"));
  plus.lr_ratio = 8;
  plus.lr_embedding = std::nan("");
  CHECK_THROWS_WITH(lora::loraplus_groups(params, 0.1, plus), Contains("lr_embedding must be > 0, got nan"));
  plus.lr_embedding = 1e-6;
  plus.weight_decay = -0.1;
  CHECK_THROWS_WITH(lora::loraplus_groups(params, 0.1, plus), Contains("weight_decay must be >= 0, got -0.1"));
}

}  // namespace unit_optim
