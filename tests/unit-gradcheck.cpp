// Finite-difference checks (central differences, double) of every hand-written
// backward: LoRALinear over shapes, dropout and bias; activations; a Sequential.
#include <catch2/catch.hpp>
#include <lora/lora.hpp>

#include <cstdlib>

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_gradcheck {

using lora::Index;
using Mat = lora::Matrix<double>;

namespace {
Mat random_matrix(Index rows, Index cols, unsigned seed) {
  std::srand(seed);
  return Mat::Random(rows, cols);
}
}  // namespace

TEST_CASE("LoRALinear backward matches finite differences", "[gradcheck][linear]") {
  struct Shape {
    Index N, I, O;
    int r;
  };
  // N = 1; r = 1; I != O both ways; r larger than min(I, O).
  const Shape shape =
      GENERATE(Shape{1, 5, 4, 3}, Shape{3, 4, 6, 1}, Shape{4, 3, 2, 5}, Shape{2, 7, 3, 2}, Shape{5, 6, 6, 8});
  const double dropout = GENERATE(0.0, 0.3);
  const bool bias = GENERATE(false, true);
  const bool rslora = GENERATE(false, true);
  CAPTURE(shape.N, shape.I, shape.O, shape.r, dropout, bias, rslora);

  lora::LoraConfig cfg;
  cfg.r = shape.r;
  cfg.lora_alpha = 3.0;
  cfg.lora_dropout = dropout;
  cfg.use_rslora = rslora;
  cfg.bias = bias ? lora::BiasMode::all : lora::BiasMode::none;
  cfg.init_lora_weights = lora::InitLoraWeights::random;  // B != 0: every path carries gradient
  cfg.seed = 42;
  lora::LoRALinear<double> layer(shape.I, shape.O, cfg, bias);
  const Mat x = random_matrix(shape.N, shape.I, 17);

  const auto result = lora::check_layer_gradients(layer, x);
  INFO(result.describe());
  CHECK(result.dA.ok());
  CHECK(result.dB.ok());
  CHECK(result.dx.ok());
  CHECK(result.db.ok());
  CHECK(result.dA.checked == shape.r * shape.I);
  CHECK(result.dB.checked == shape.O * shape.r);
  CHECK(result.db.checked == (bias ? shape.O : 0));
  CHECK(result.dx.checked == shape.N * shape.I);
}

TEST_CASE("the gradient checker catches a wrong gradient", "[gradcheck]") {
  // f(v) = Σ v², gradient 2v; hand it 2v with one entry off by 1e-3.
  lora::Vector<double> v(4);
  v << 0.5, -1.0, 2.0, 0.25;
  lora::Vector<double> good = 2 * v, bad = 2 * v;
  bad(2) += 1e-3;
  auto loss = [&] { return v.squaredNorm(); };
  const auto ok = lora::check_gradient(loss, v.data(), good.data(), 4);
  CHECK(ok.ok());
  const auto wrong = lora::check_gradient(loss, v.data(), bad.data(), 4);
  CHECK_FALSE(wrong.ok());
  CHECK(wrong.failures == 1);
  CHECK(wrong.worst_index == 2);
  CHECK(v == lora::Vector<double>((lora::Vector<double>(4) << 0.5, -1.0, 2.0, 0.25).finished()));  // restored
}

TEST_CASE("activation backward matches finite differences", "[gradcheck][activations]") {
  Mat x = random_matrix(4, 6, 23) * 3;
  const Mat P = random_matrix(4, 6, 24);
  Mat y(4, 6), dx(4, 6);
  SECTION("GELU") {
    auto loss = [&] {
      lora::GELU::forward<double>(x, y);
      return (y.array() * P.array()).sum();
    };
    lora::GELU::backward<double>(x, P, dx);
    const auto r = lora::check_gradient(loss, x.data(), dx.data(), x.size());
    INFO(r.describe("GELU dx"));
    CHECK(r.ok());
  }
  SECTION("ReLU") {
    auto loss = [&] {
      lora::ReLU::forward<double>(x, y);
      return (y.array() * P.array()).sum();
    };
    lora::ReLU::backward<double>(x, P, dx);
    const auto r = lora::check_gradient(loss, x.data(), dx.data(), x.size());
    INFO(r.describe("ReLU dx"));
    CHECK(r.ok());
  }
}

TEST_CASE("Sequential backward matches finite differences through every layer", "[gradcheck][sequential]") {
  lora::LoraConfig cfg;
  cfg.r = 3;
  cfg.lora_alpha = 6;
  cfg.lora_dropout = 0.2;
  cfg.bias = lora::BiasMode::all;
  cfg.init_lora_weights = lora::InitLoraWeights::random;
  lora::Sequential<double> model;
  cfg.seed = 1;
  model.add(lora::LoRALinear<double>(5, 8, cfg)).add(lora::GELU{});
  cfg.seed = 2;
  model.add(lora::LoRALinear<double>(8, 6, cfg)).add(lora::ReLU{});
  cfg.seed = 3;
  model.add(lora::LoRALinear<double>(6, 3, cfg));

  Mat x = random_matrix(4, 5, 31);
  const std::vector<int> labels = {0, 2, 1, 2};
  Mat dlogits(4, 3), dx(4, 5);
  auto loss = [&] {
    for (std::size_t i : {0u, 2u, 4u}) model.linear(i).set_dropout_seed(100 + i);
    return lora::cross_entropy<double>(model.forward(x), labels);
  };
  model.zero_grad();
  for (std::size_t i : {0u, 2u, 4u}) model.linear(i).set_dropout_seed(100 + i);
  lora::cross_entropy<double>(model.forward(x), labels, dlogits);
  model.backward(dlogits, dx);

  auto params = model.parameters();
  REQUIRE(params.size() == 9);  // A, B, bias per adapted layer
  for (auto& p : params) {
    const Mat analytic = p.grad_matrix();
    const auto r = lora::check_gradient(loss, p.value, analytic.data(), p.size());
    INFO(r.describe(p.name));
    CHECK(r.ok());
  }
  const auto r = lora::check_gradient(loss, x.data(), dx.data(), dx.size());
  INFO(r.describe("dx"));
  CHECK(r.ok());
}

}  // namespace unit_gradcheck
