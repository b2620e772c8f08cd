// LoRALinear and Sequential against values PyTorch computed
// (tests/golden/make_golden.py -> tests/data/golden.txt).
#include <catch2/catch.hpp>
#include <lora/lora.hpp>

#include "golden.hpp"

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_golden {

using lora_test::max_rel_diff;
using lora_test::tensor;

namespace {
// float carries ~7 digits; double matches to rounding.
template <class S>
constexpr double tolerance = sizeof(S) == 4 ? 2e-5 : 1e-12;

lora::LoraConfig golden_config() {
  lora::LoraConfig c;
  c.r = 3;
  c.lora_alpha = 6;
  return c;
}

std::vector<int> labels_from(const lora::Matrix<double>& m) {
  std::vector<int> out;
  for (lora::Index i = 0; i < m.size(); ++i) out.push_back(static_cast<int>(m.data()[i]));
  return out;
}
}  // namespace

TEMPLATE_TEST_CASE("LoRALinear forward and backward match PyTorch", "[golden][linear]", float, double) {
  using S = TestType;
  auto cfg = golden_config();
  cfg.bias = lora::BiasMode::all;
  lora::LoRALinear<S> layer(tensor<S>("linear.W"), tensor<S>("linear.b"), cfg);
  layer.lora_A() = tensor<S>("linear.A");
  layer.lora_B() = tensor<S>("linear.B");
  const auto x = tensor<S>("linear.x");
  const auto dy = tensor<S>("linear.dy");

  lora::Matrix<S> y(x.rows(), layer.out_features()), dx(x.rows(), x.cols());
  layer.forward(x, y);
  layer.backward(x, dy, dx);
  CHECK(max_rel_diff(y, tensor("linear.y")) < tolerance<S>);
  CHECK(max_rel_diff(dx, tensor("linear.dx")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dA(), tensor("linear.dA")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dB(), tensor("linear.dB")) < tolerance<S>);
  CHECK(max_rel_diff(layer.db(), tensor("linear.db")) < tolerance<S>);

  // Eval and merged forwards give the same y.
  layer.eval();
  CHECK(max_rel_diff(layer.forward(x), tensor("linear.y")) < tolerance<S>);
  layer.merge();
  CHECK(max_rel_diff(layer.forward(x), tensor("linear.y")) < 10 * tolerance<S>);
}

TEMPLATE_TEST_CASE("rsLoRA forward matches PyTorch", "[golden][linear]", float, double) {
  using S = TestType;
  auto cfg = golden_config();
  cfg.use_rslora = true;
  lora::LoRALinear<S> layer(tensor<S>("linear.W"), tensor<S>("linear.b"), cfg);
  layer.lora_A() = tensor<S>("linear.A");
  layer.lora_B() = tensor<S>("linear.B");
  layer.eval();
  CHECK(max_rel_diff(layer.forward(tensor<S>("linear.x")), tensor("linear.y_rslora")) < tolerance<S>);
}

TEMPLATE_TEST_CASE("two-layer model with GELU and cross-entropy matches PyTorch", "[golden][sequential]", float,
                   double) {
  using S = TestType;
  const auto cfg = golden_config();
  lora::Sequential<S> model;
  model.add(lora::LoRALinear<S>(tensor<S>("mlp.W1"), tensor<S>("mlp.b1"), cfg))
      .add(lora::GELU{})
      .add(lora::LoRALinear<S>(tensor<S>("mlp.W2"), tensor<S>("mlp.b2"), cfg));
  model.linear(0).lora_A() = tensor<S>("mlp.A1");
  model.linear(0).lora_B() = tensor<S>("mlp.B1");
  model.linear(2).lora_A() = tensor<S>("mlp.A2");
  model.linear(2).lora_B() = tensor<S>("mlp.B2");
  const auto x = tensor<S>("linear.x");
  const auto labels = labels_from(tensor("mlp.labels"));  // one row is -100: ignored

  const auto& logits = model.forward(x);
  CHECK(max_rel_diff(logits, tensor("mlp.logits")) < tolerance<S>);
  lora::Matrix<S> dlogits(logits.rows(), logits.cols()), dx(x.rows(), x.cols());
  const S loss = lora::cross_entropy<S>(logits, labels, dlogits);
  CHECK(max_rel_diff(lora::Matrix<S>::Constant(1, 1, loss), tensor("mlp.loss")) < tolerance<S>);
  model.backward(dlogits, dx);
  CHECK(max_rel_diff(model.linear(0).dA(), tensor("mlp.dA1")) < tolerance<S>);
  CHECK(max_rel_diff(model.linear(0).dB(), tensor("mlp.dB1")) < tolerance<S>);
  CHECK(max_rel_diff(model.linear(2).dA(), tensor("mlp.dA2")) < tolerance<S>);
  CHECK(max_rel_diff(model.linear(2).dB(), tensor("mlp.dB2")) < tolerance<S>);
  CHECK(max_rel_diff(dx, tensor("mlp.dx")) < tolerance<S>);
}

TEMPLATE_TEST_CASE("LoRA over a Conv1D weight (in, out) viewed in place matches PyTorch", "[golden][weight]", float,
                   double) {
  using S = TestType;
  lora::Matrix<S> W = tensor<S>("conv1d.W");  // (I, O), as transformers' Conv1D stores it
  const lora::Index I = W.rows(), O = W.cols();
  lora::LoraConfig cfg;
  cfg.r = 2;
  cfg.lora_alpha = 4;
  lora::LoRALinear<S> layer(lora::FrozenWeight<S>::mutable_view(W.data(), O, I, lora::WeightLayout::in_out),
                            tensor<S>("conv1d.b"), cfg);
  layer.lora_A() = tensor<S>("conv1d.A");
  layer.lora_B() = tensor<S>("conv1d.B");
  const auto x = tensor<S>("conv1d.x");
  lora::Matrix<S> y(x.rows(), O), dx(x.rows(), I);
  layer.forward(x, y);
  layer.backward(x, tensor<S>("conv1d.dy"), dx);
  CHECK(max_rel_diff(y, tensor("conv1d.y")) < tolerance<S>);
  CHECK(max_rel_diff(dx, tensor("conv1d.dx")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dA(), tensor("conv1d.dA")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dB(), tensor("conv1d.dB")) < tolerance<S>);
  layer.eval();
  layer.merge();
  CHECK(max_rel_diff(W, tensor("conv1d.merged_W")) < tolerance<S>);  // PEFT's W + transpose(s B A)
}

TEMPLATE_TEST_CASE("LoRA on the q and v slices of a fused Conv1D projection matches PyTorch", "[golden][fused]", float,
                   double) {
  using S = TestType;
  lora::Matrix<S> W = tensor<S>("fused.W");  // (I, 3d)
  const lora::Index I = W.rows(), O = W.cols(), d = O / 3;
  lora::LoraConfig q, k, v;
  q.r = 2;
  q.lora_alpha = 4;
  k.r = 0;
  v.r = 3;
  v.lora_alpha = 6;
  v.use_rslora = true;
  lora::FusedLoRALinear<S> layer(lora::FrozenWeight<S>::mutable_view(W.data(), O, I, lora::WeightLayout::in_out),
                                 {{"q", d, q}, {"k", d, k}, {"v", d, v}}, tensor<S>("fused.b"));
  layer.lora_A(0) = tensor<S>("fused.Aq");
  layer.lora_B(0) = tensor<S>("fused.Bq");
  layer.lora_A(2) = tensor<S>("fused.Av");
  layer.lora_B(2) = tensor<S>("fused.Bv");
  const auto x = tensor<S>("fused.x");
  lora::Matrix<S> y(x.rows(), O), dx(x.rows(), I);
  layer.forward(x, y);
  layer.backward(x, tensor<S>("fused.dy"), dx);
  CHECK(max_rel_diff(y, tensor("fused.y")) < tolerance<S>);
  CHECK(max_rel_diff(dx, tensor("fused.dx")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dA(0), tensor("fused.dAq")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dB(0), tensor("fused.dBq")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dA(2), tensor("fused.dAv")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dB(2), tensor("fused.dBv")) < tolerance<S>);
  layer.eval();
  layer.merge();
  CHECK(max_rel_diff(W, tensor("fused.merged_W")) < tolerance<S>);
}

TEMPLATE_TEST_CASE("embedding LoRA with repeated ids and a padding index matches PyTorch", "[golden][embedding]", float,
                   double) {
  using S = TestType;
  lora::Matrix<S> E = tensor<S>("embedding.E");  // (V, d)
  lora::LoraConfig cfg;
  cfg.r = 2;
  cfg.lora_alpha = 4;
  lora::LoRAEmbedding<S> layer(
      lora::FrozenWeight<S>::mutable_view(E.data(), E.cols(), E.rows(), lora::WeightLayout::in_out), cfg, 0);
  layer.lora_A() = tensor<S>("embedding.A");
  layer.lora_B() = tensor<S>("embedding.B");
  const auto ids_matrix = tensor("embedding.ids");
  std::vector<lora::Index> ids;
  for (lora::Index i = 0; i < ids_matrix.size(); ++i) ids.push_back(static_cast<lora::Index>(ids_matrix(0, i)));
  lora::Matrix<S> y(static_cast<lora::Index>(ids.size()), E.cols());
  layer.forward(ids, y);
  layer.backward(ids, tensor<S>("embedding.dy"));
  CHECK(max_rel_diff(y, tensor("embedding.y")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dA(), tensor("embedding.dA")) < tolerance<S>);  // id 4 three times, id 0 padding
  CHECK(max_rel_diff(layer.dB(), tensor("embedding.dB")) < tolerance<S>);
  layer.eval();
  layer.merge();
  CHECK(max_rel_diff(E, tensor("embedding.merged_E")) < tolerance<S>);
}

}  // namespace unit_golden
