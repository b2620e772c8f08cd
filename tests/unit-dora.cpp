// DoRA in LoRALinear (config.use_dora): forward, backward, merge and unmerge against PEFT's DoraLinearLayer and
// DoraLinearVariant computed by PyTorch (tests/golden/make_golden.py, "dora.*"), in both weight layouts and in
// float and double; the dropout path against PEFT's formula written out here with the layer's own mask, and its
// gradients against central differences of that formula; the norm without an O × I temporary against the dense
// one; and the refusals, which change nothing.
#include <catch2/catch.hpp>
#include <lora/init.hpp>
#include <lora/lora.hpp>

#include <cmath>
#include <string>

#include "golden.hpp"

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_dora {

using Catch::Contains;
using lora::Index;
using lora_test::max_rel_diff;
using lora_test::tensor;
using lora_test::tolerance;
template <class S>
using Mat = lora::Matrix<S>;

namespace {

lora::LoraConfig dora_config(double dropout = 0) {
  lora::LoraConfig c;
  c.r = 3;
  c.lora_alpha = 6;  // s = 2, as make_golden.py
  c.use_dora = true;
  c.bias = lora::BiasMode::all;
  c.lora_dropout = dropout;
  c.seed = 5;
  return c;
}

/// The golden layer: W and b from "dora.*", owned (O, I) or a Conv1D-style (I, O) view of `store`, with the
/// golden A and B and m = m0 (reset_magnitude).
template <class S>
lora::LoRALinear<S> golden_layer(bool conv1d, Mat<S>& store, double dropout = 0) {
  const Mat<S> W = tensor<S>("dora.W");
  const lora::RowVector<S> b = tensor<S>("dora.b");
  lora::LoRALinear<S> layer = [&] {
    if (!conv1d) return lora::LoRALinear<S>(W, b, dora_config(dropout));
    store = W.transpose();
    return lora::LoRALinear<S>(
        lora::FrozenWeight<S>::mutable_view(store.data(), W.rows(), W.cols(), lora::WeightLayout::in_out), b,
        dora_config(dropout));
  }();
  layer.lora_A() = tensor<S>("dora.A");
  layer.lora_B() = tensor<S>("dora.B");
  layer.reset_magnitude();
  return layer;
}

/// W + s·B A as (O, I), row norms: the dense way the layer avoids.
Mat<double> dense_norm(const Mat<double>& W, const Mat<double>& A, const Mat<double>& B, double s) {
  return (W + s * B * A).rowwise().norm().transpose();
}

}  // namespace

TEMPLATE_TEST_CASE("DoRA forward and backward match PEFT's DoraLinearLayer in PyTorch", "[dora][golden]", float,
                   double) {
  using S = TestType;
  const bool conv1d = GENERATE(false, true);
  CAPTURE(conv1d);
  Mat<S> store;
  auto layer = golden_layer<S>(conv1d, store);
  REQUIRE(layer.use_dora());
  CHECK(max_rel_diff(layer.magnitude(), tensor("dora.m0")) < tolerance<S>);
  CHECK(max_rel_diff(layer.weight_norm(), tensor("dora.m0")) < tolerance<S>);
  layer.magnitude() = tensor<S>("dora.m");

  const Mat<S> x = tensor<S>("dora.x");
  Mat<S> y(x.rows(), layer.out_features()), dx(x.rows(), layer.in_features());
  layer.zero_grad();
  layer.forward(x, y);
  CHECK(max_rel_diff(y, tensor("dora.y")) < tolerance<S>);
  layer.backward(x, tensor<S>("dora.dy"), dx);
  CHECK(max_rel_diff(dx, tensor("dora.dx")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dA(), tensor("dora.dA")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dB(), tensor("dora.dB")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dmagnitude(), tensor("dora.dm")) < tolerance<S>);
  CHECK(max_rel_diff(layer.db(), tensor("dora.db")) < tolerance<S>);

  // Eval mode gives the same output, from a const layer.
  layer.eval();
  const auto& const_layer = layer;
  CHECK(max_rel_diff(const_layer.forward(x), tensor("dora.y")) < tolerance<S>);
}

TEST_CASE("DoRA merge and unmerge match PEFT's merge_safe and unmerge in both layouts", "[dora][golden]") {
  const bool conv1d = GENERATE(false, true);
  CAPTURE(conv1d);
  Mat<double> store;
  auto layer = golden_layer<double>(conv1d, store);
  layer.magnitude() = tensor("dora.m");
  layer.eval();
  const Mat<double> x = tensor("dora.x");
  const Mat<double> W0 = layer.frozen_weight().to_dense();
  layer.merge();
  REQUIRE(layer.is_merged());
  CHECK(max_rel_diff(layer.frozen_weight().to_dense(), tensor("dora.merged_W")) < 1e-12);
  CHECK(max_rel_diff(layer.forward(x), tensor("dora.y")) < 1e-12);
  layer.unmerge();
  CHECK(max_rel_diff(layer.frozen_weight().to_dense(), W0) < 1e-14);
  CHECK(max_rel_diff(layer.forward(x), tensor("dora.y")) < 1e-12);
}

TEST_CASE("A new DoRA layer starts exactly at the base model", "[dora]") {
  lora::LoraConfig c;
  c.r = 4;
  c.lora_alpha = 8;
  c.seed = 3;
  lora::LoRALinear<float> plain(9, 7, c);
  c.use_dora = true;
  lora::LoRALinear<float> dora(9, 7, c);
  REQUIRE(Mat<float>(dora.frozen_weight().to_dense()) == Mat<float>(plain.frozen_weight().to_dense()));
  // B = 0: m is ‖W‖ per row, so m / n is exactly 1 and the output is the base output bit for bit.
  CHECK(max_rel_diff(dora.magnitude(), plain.frozen_weight().to_dense().rowwise().norm().transpose()) < 1e-6);
  Mat<float> x = Mat<float>::Random(5, 9);
  CHECK(Mat<float>(dora.forward(x)) == Mat<float>(plain.forward(x)));
  CHECK(dora.parameter_count().trainable == plain.parameter_count().trainable + 7);
  CHECK(lora::LoRALinear<float>::parameter_count_for(9, 7, c, true).trainable == 4 * (9 + 7) + 7);
  const auto params = dora.parameters();
  REQUIRE(params.size() == 3);
  CHECK(params[2].name == "lora_magnitude_vector");
  CHECK(params[2].rows == 1);
  CHECK(params[2].cols == 7);
}

TEST_CASE("DoRA's norm from small products equals the dense norm of W + s B A", "[dora]") {
  const bool conv1d = GENERATE(false, true);
  CAPTURE(conv1d);
  lora::LoraConfig c;
  c.r = 5;
  c.lora_alpha = 3;
  c.use_rslora = true;
  c.use_dora = true;
  c.init_lora_weights = lora::InitLoraWeights::random;  // B != 0
  c.seed = 9;
  const Mat<double> W = Mat<double>::Random(40, 30);
  const Mat<double> stored = conv1d ? Mat<double>(W.transpose()) : W;
  lora::LoRALinear<double> layer(
      lora::FrozenWeight<double>::owned(stored, conv1d ? lora::WeightLayout::in_out : lora::WeightLayout::out_in), c);
  const Mat<double> want = dense_norm(W, layer.lora_A(), layer.lora_B(), layer.scaling());
  CHECK(max_rel_diff(layer.weight_norm(), want) < 1e-13);
  CHECK(max_rel_diff(layer.magnitude(), want) < 1e-13);
  layer.lora_B() *= -3;  // the norm follows B; the magnitude does not until reset
  const Mat<double> moved = dense_norm(W, layer.lora_A(), layer.lora_B(), layer.scaling());
  CHECK(max_rel_diff(layer.weight_norm(), moved) < 1e-13);
  CHECK(max_rel_diff(layer.magnitude(), want) < 1e-13);
  layer.reset_magnitude();
  CHECK(max_rel_diff(layer.magnitude(), moved) < 1e-13);
}

TEST_CASE("DoRA's dm and dx pass finite differences in both layouts, with and without dropout", "[dora][gradcheck]") {
  const bool conv1d = GENERATE(false, true);
  const double dropout = GENERATE(0.0, 0.3);
  CAPTURE(conv1d, dropout);
  Mat<double> store;
  auto layer = golden_layer<double>(conv1d, store, dropout);
  layer.magnitude() = tensor("dora.m");
  const auto result = lora::check_layer_gradients(layer, tensor("dora.x"));
  INFO(result.describe());
  CHECK(result.dm.checked == 4);
  CHECK(result.dm.ok());
  CHECK(result.dx.ok());
  CHECK(result.db.ok());
  // dA and dB hold n constant, as PEFT does, so the layer's own finite differences (which move n) disagree:
  // the check below makes sure the layer's gradient is the detached one, not the full derivative.
  CHECK_FALSE(result.dB.ok());
}

TEST_CASE("DoRA with dropout is PEFT's formula, with the layer's mask, and its gradients hold n constant",
          "[dora][gradcheck]") {
  const bool conv1d = GENERATE(false, true);
  CAPTURE(conv1d);
  const double p = 0.4;
  Mat<double> store;
  auto layer = golden_layer<double>(conv1d, store, p);
  layer.magnitude() = tensor("dora.m");
  const Mat<double> x = tensor("dora.x"), W = tensor("dora.W"), dy = tensor("dora.dy");
  const lora::RowVector<double> b = tensor("dora.b");
  const double s = layer.scaling();

  // The mask the layer will draw: the same generator from the same state.
  lora::detail::Rng rng(1);
  rng.set_state(layer.dropout_rng_state());
  Mat<double> mask(x.rows(), x.cols());
  lora::detail::draw_dropout_mask(rng, p, mask);
  const Mat<double> xd = x.cwiseProduct(mask);

  // PEFT with dropout: result + (c − 1) ⊙ (drop(x) Wᵀ) + c ⊙ s·drop(x) Aᵀ Bᵀ, n detached (n0 below).
  const Mat<double> n0 = dense_norm(W, layer.lora_A(), layer.lora_B(), s);
  Mat<double> A = layer.lora_A(), B = layer.lora_B();
  lora::RowVector<double> m = layer.magnitude();
  auto peft = [&](const Mat<double>& xx) {
    const Mat<double> xxd = xx.cwiseProduct(mask);
    const lora::RowVector<double> c = m.cwiseQuotient(n0);
    Mat<double> out = xx * W.transpose();
    out.rowwise() += b;
    Mat<double> base_d = xxd * W.transpose();
    Mat<double> lora = s * (xxd * A.transpose()) * B.transpose();
    for (Index o = 0; o < out.cols(); ++o) out.col(o) += (c(o) - 1) * base_d.col(o) + c(o) * lora.col(o);
    return out;
  };
  Mat<double> y(x.rows(), layer.out_features()), dx(x.rows(), layer.in_features());
  layer.zero_grad();
  layer.forward(x, y);
  CHECK(max_rel_diff(y, peft(x)) < 1e-13);
  layer.backward(x, dy, dx);

  Mat<double> xv = x;
  auto loss = [&] { return (peft(xv).array() * dy.array()).sum(); };
  const Mat<double> dA = layer.dA(), dB = layer.dB(), dx_got = dx;
  const lora::RowVector<double> dm = layer.dmagnitude();
  CHECK(lora::check_gradient(loss, A.data(), dA.data(), A.size()).ok());
  CHECK(lora::check_gradient(loss, B.data(), dB.data(), B.size()).ok());
  CHECK(lora::check_gradient(loss, m.data(), dm.data(), m.size()).ok());
  CHECK(lora::check_gradient(loss, xv.data(), dx_got.data(), xv.size()).ok());
}

TEST_CASE("DoRA needs one forward per backward, as its cache becomes the scaled gradient", "[dora]") {
  Mat<double> store;
  auto layer = golden_layer<double>(false, store);
  const Mat<double> x = tensor("dora.x"), dy = tensor("dora.dy");
  Mat<double> y(x.rows(), 4);
  layer.forward(x, y);
  layer.backward(x, dy);
  CHECK_THROWS_AS(layer.backward(x, dy), lora::state_error);
  layer.forward(x, y);
  CHECK_NOTHROW(layer.backward(x, dy));
}

TEST_CASE("DoRA refuses a zero row, a zero magnitude at merge and a read-only weight, changing nothing",
          "[dora][errors]") {
  Mat<double> W = Mat<double>::Random(4, 6);
  W.row(2).setZero();
  lora::LoraConfig c = dora_config();
  // PEFT gives NaN outputs for that row (m = n = 0); here construction says which row.
  CHECK_THROWS_WITH(lora::LoRALinear<double>(W, c), Contains("output row 2") && Contains("NaN"));
  CHECK_THROWS_AS(lora::LoRALinear<double>(W, c), lora::numeric_error);

  c.r = 0;
  CHECK_THROWS_AS(lora::LoRALinear<double>(Mat<double>::Random(4, 6), c), lora::config_error);

  Mat<double> store;
  auto layer = golden_layer<double>(false, store);
  const Mat<double> before = layer.frozen_weight().to_dense();
  layer.magnitude()(0, 1) = 0;
  CHECK_THROWS_WITH(layer.merge(), Contains("output row 1"));
  CHECK_FALSE(layer.is_merged());
  CHECK(layer.frozen_weight().to_dense() == before);

  const Mat<double> Wg = tensor("dora.W");
  auto view = lora::LoRALinear<double>::view(Wg.data(), Wg.rows(), Wg.cols(), dora_config());
  CHECK_THROWS_AS(view.merge(), lora::state_error);
  CHECK(Mat<double>(view.frozen_weight().to_dense()) == Wg);

  lora::LoRALinear<double> plain(Mat<double>::Random(4, 6), lora::LoraConfig{});
  CHECK_THROWS_WITH(plain.reset_magnitude(), Contains("use_dora is off"));
}

TEST_CASE("The layers without DoRA refuse use_dora", "[dora][errors]") {
  lora::LoraConfig c = dora_config();
  c.bias = lora::BiasMode::none;
  const Mat<float> table = Mat<float>::Random(10, 4);
  CHECK_THROWS_WITH(
      lora::LoRAEmbedding<float>(lora::FrozenWeight<float>::view(table.data(), 4, 10, lora::WeightLayout::in_out), c),
      Contains("use_dora"));
  lora::MultiLoRALinear<float> multi(Mat<float>::Random(4, 6));
  CHECK_THROWS_WITH(multi.add_adapter("a", c), Contains("use_dora"));
  CHECK(multi.adapter_names().empty());
}

TEST_CASE("PiSSA with DoRA: the magnitude starts at the norms of the original W, as PEFT orders them", "[dora][init]") {
  const Mat<double> W = tensor("dora.W");
  lora::LoRALinear<double> layer(W, dora_config());
  lora::pissa_init(layer);
  CHECK(max_rel_diff(layer.magnitude(), W.rowwise().norm().transpose()) < 1e-12);
  const Mat<double> x = tensor("dora.x");
  layer.eval();
  CHECK(max_rel_diff(layer.forward(x), Mat<double>(x * W.transpose())) < 1e-12);
}

TEST_CASE("LoRA+ puts DoRA's magnitude with lora_B, as PEFT's create_loraplus_optimizer does", "[dora][optim]") {
  Mat<double> store;
  auto layer = golden_layer<double>(false, store);
  const auto groups = lora::loraplus_groups(layer.parameters(), 1e-3, lora::LoraPlusOptions{16, 1e-6, 0.1});
  for (const auto& p : groups) {
    CAPTURE(p.name);
    if (p.name == "lora_A") CHECK(p.lr_scale == 1);
    if (p.name == "lora_B" || p.name == "lora_magnitude_vector") {
      CHECK(p.lr_scale == 16);
      REQUIRE(p.weight_decay.has_value());
      CHECK(*p.weight_decay == Approx(0.1));
    }
  }
}

}  // namespace unit_dora
