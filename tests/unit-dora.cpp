// DoRA in LoRALinear (config.use_dora; LoRAEmbedding's is in unit-dora-layers.cpp): forward, backward, merge and
// unmerge against PEFT's DoraLinearLayer and DoraLinearVariant computed by PyTorch (tests/golden/make_golden.py,
// "dora.*"), in both weight layouts and in float and double; the dropout path against PEFT's formula written out here
// with the layer's own mask, and its gradients against central differences of that formula; the norm without an O × I
// temporary against the dense one; and the refusals, which change nothing.
#include <catch2/catch.hpp>
#include <lora/gguf_adapter.hpp>
#include <lora/init.hpp>
#include <lora/lora.hpp>

#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "golden.hpp"
#include "peft_models.hpp"
#include "test_files.hpp"

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

TEST_CASE("DoRA without a copy of Z: backward from the forward's output gives PEFT's gradients", "[dora][golden]") {
  using S = double;
  const bool conv1d = GENERATE(false, true);
  CAPTURE(conv1d);
  Mat<S> store;
  auto layer = golden_layer<S>(conv1d, store);
  layer.magnitude() = tensor<S>("dora.m");
  layer.set_dora_output_backward(true);
  const Mat<S> x = tensor<S>("dora.x"), dy = tensor<S>("dora.dy");
  Mat<S> y(x.rows(), layer.out_features()), dx(x.rows(), layer.in_features());
  layer.zero_grad();
  layer.forward(x, y);
  CHECK(max_rel_diff(y, tensor("dora.y")) < tolerance<S>);
  // Without y there is nothing to recover Z from, and nothing changes.
  CHECK_THROWS_WITH(layer.backward(x, dy, dx), Contains("backward_with_output"));
  CHECK(layer.dmagnitude().isZero());
  CHECK(layer.db().isZero());
  CHECK(layer.dA().isZero());
  layer.backward_with_output(x, y, dy, dx);
  CHECK(max_rel_diff(dx, tensor("dora.dx")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dA(), tensor("dora.dA")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dB(), tensor("dora.dB")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dmagnitude(), tensor("dora.dm")) < tolerance<S>);
  CHECK(max_rel_diff(layer.db(), tensor("dora.db")) < tolerance<S>);

  // With dropout the copy is kept anyway (y − b is not c ⊙ Z there), so plain backward works.
  Mat<S> store2;
  auto dropped = golden_layer<S>(conv1d, store2, 0.3);
  dropped.set_dora_output_backward(true);
  dropped.forward(x, y);
  CHECK_NOTHROW(dropped.backward(x, dy, dx));
}

TEST_CASE("Sequential trains DoRA layers from their outputs, with the gradients of the layers alone",
          "[dora][sequential]") {
  lora::LoraConfig c = dora_config();
  c.init_lora_weights = lora::InitLoraWeights::random;
  const Mat<double> W1 = Mat<double>::Random(6, 5), W2 = Mat<double>::Random(3, 6);
  const lora::RowVector<double> b1 = lora::RowVector<double>::Random(6), b2 = lora::RowVector<double>::Random(3);
  lora::Sequential<double> model;
  model.add(lora::LoRALinear<double>(W1, b1, c));
  model.add(lora::GELU{});
  c.seed = 6;
  model.add(lora::LoRALinear<double>(W2, b2, c));
  // The same layers, driven by hand with the default copy of Z.
  lora::LoRALinear<double> l1 = model.linear(0), l2 = model.linear(2);
  l1.set_dora_output_backward(false);
  l2.set_dora_output_backward(false);
  const Mat<double> x = Mat<double>::Random(4, 5), dy = Mat<double>::Random(4, 3);
  model.train();
  model.zero_grad();
  const Mat<double> out = model.forward(x);
  Mat<double> dx_model(4, 5);
  model.backward(dy, dx_model);
  CHECK(model.linear(0).dora_output_backward());

  Mat<double> h(4, 6), g(4, 6), y(4, 3), dh(4, 6), dg(4, 6), dx(4, 5);
  l1.zero_grad();
  l2.zero_grad();
  l1.forward(x, h);
  lora::GELU::forward<double>(h, g);
  l2.forward(g, y);
  CHECK(max_rel_diff(out, y) < 1e-14);
  l2.backward(g, dy, dg);
  lora::GELU::backward<double>(h, dg, dh);
  l1.backward(x, dh, dx);
  CHECK(max_rel_diff(dx_model, dx) < 1e-12);
  CHECK(max_rel_diff(model.linear(0).dmagnitude(), l1.dmagnitude()) < 1e-12);
  CHECK(max_rel_diff(model.linear(2).dmagnitude(), l2.dmagnitude()) < 1e-12);
  CHECK(max_rel_diff(model.linear(0).dA(), l1.dA()) < 1e-12);
  CHECK(max_rel_diff(model.linear(2).dB(), l2.dB()) < 1e-12);
  CHECK(max_rel_diff(model.linear(0).db(), l1.db()) < 1e-12);
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
  lora::LoraConfig plain = c;
  plain.use_dora = false;
  const Mat<float> W = Mat<float>::Random(8, 6);
  CHECK_THROWS_WITH(
      lora::FusedLoRALinear<float>(lora::FrozenWeight<float>::view(W.data(), 8, 6), {{"q", 4, c}, {"v", 4, plain}}),
      Contains("use_dora"));
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

namespace {

namespace st = lora::safetensors;
const std::string dora_dir = std::string(LORA_TEST_DATA_DIR) + "/peft/dora";

/// Largest |a - b| / max(1, |b|) between two float matrices.
double max_diff(const Mat<float>& a, const Mat<float>& b) { return max_rel_diff(a, b); }

/// The layers of one golden model (tests/golden/make_dora_golden.py) over its base weights, viewed in place in
/// the mmap'd base file ((in, out) for the Conv1D case), or owned copies, each with the config's layer_config.
lora_test::LinearModel dora_model(const st::File& base, const std::string& which, bool writable_copy = false) {
  const std::vector<std::string> paths =
      which == "linear" ? std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
                        : std::vector<std::string>{"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"};
  return lora_test::linear_model(base, lora::peft::AdapterConfig::read(dora_dir + "/" + which + "/adapter_config.json"),
                                 paths, writable_copy, true);
}

}  // namespace

TEST_CASE("DoRA adapters as PEFT saves them load, give PEFT's outputs and save back byte for byte",
          "[dora][peft][golden]") {
  const std::string which = GENERATE(std::string("linear"), std::string("conv1d"));
  CAPTURE(which);
  const auto base = st::File::open(dora_dir + "/base.safetensors");
  const auto forward = st::File::open(dora_dir + "/forward.safetensors");
  const auto adapter = lora::peft::read_adapter<float>(dora_dir + "/" + which);
  REQUIRE(adapter.config.use_dora);
  REQUIRE(adapter.modules.size() == 2);
  for (const auto& m : adapter.modules) CHECK(m.magnitude.cols() == m.B.rows());

  auto model = dora_model(base, which);
  const auto report = lora::peft::load_adapter(dora_dir + "/" + which, model.by_path);
  CHECK(report.loaded.size() == 2);
  CHECK(report.layout_differs.empty());
  for (const auto& [path, layer] : model.by_path) {
    CAPTURE(path);
    CHECK_FALSE(layer->is_training());
    CHECK(layer->magnitude() == adapter.find(path)->magnitude);
    const Mat<float> x = forward.matrix<float>(path + ".x");
    CHECK(max_diff(std::as_const(*layer).forward(x), forward.matrix<float>(path + ".y")) < 1e-5);
  }
  const auto dir = lora_test::scratch_dir("dora-peft-" + which);
  lora::peft::save_adapter((dir / "out").string(), model.by_path, adapter.config);
  lora::peft::save_adapter((dir / "held").string(), adapter);
  for (const char* name : {"adapter_model.safetensors", "adapter_config.json"}) {
    CAPTURE(name);
    const auto want = lora_test::read_bytes(dora_dir + "/" + which + "/" + name);
    CHECK(lora_test::read_bytes((dir / "out" / name).string()) == want);
    CHECK(lora_test::read_bytes((dir / "held" / name).string()) == want);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("DoRA merges as PEFT's merge_safe does: lora-merge's file and the layer's own merge",
          "[dora][peft][golden]") {
  const std::string which = GENERATE(std::string("linear"), std::string("conv1d"));
  CAPTURE(which);
  const auto dir = lora_test::scratch_dir("dora-merge-" + which);
  const std::string out = (dir / "merged.safetensors").string();
  const auto report = lora::peft::merge_adapter_file(dora_dir + "/base.safetensors", dora_dir + "/" + which, out);
  CHECK(report.merged.size() == 2);
  const auto got = st::File::open(out);
  const auto want = st::File::open(dora_dir + "/merged_" + which + ".safetensors");
  REQUIRE(got.tensors().size() == want.tensors().size());
  for (const auto& t : want.tensors()) {
    CAPTURE(t.name);
    CHECK(max_diff(got.matrix<float>(t.name), want.matrix<float>(t.name)) < 2e-6);
  }

  const auto base = st::File::open(dora_dir + "/base.safetensors");
  auto model = dora_model(base, which, true);
  lora::peft::load_adapter(dora_dir + "/" + which, model.by_path);
  for (const auto& [path, layer] : model.by_path) {
    CAPTURE(path);
    const Mat<float> before = layer->frozen_weight().stored();
    layer->merge();
    const std::string name = lora_test::base_tensor(path);
    CHECK(max_diff(layer->frozen_weight().stored(), want.matrix<float>(name + ".weight")) < 2e-6);
    layer->unmerge();
    CHECK(max_diff(layer->frozen_weight().stored(), before) < 1e-6);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("DoRA files that do not fit are refused with what was expected, and nothing loads", "[dora][peft][errors]") {
  const auto dir = lora_test::scratch_dir("dora-bad");
  const auto source = st::File::open(dora_dir + "/linear/adapter_model.safetensors");
  const std::string q = "base_model.model.model.layers.0.self_attn.q_proj";
  auto write = [&](const std::string& config_from, const std::map<std::string, Mat<float>>& replace) {
    std::filesystem::create_directories(dir / "a");
    std::filesystem::copy_file(dora_dir + "/" + config_from + "/adapter_config.json", dir / "a" / "adapter_config.json",
                               std::filesystem::copy_options::overwrite_existing);
    st::Writer w;
    for (const auto& t : source.tensors()) {
      auto it = replace.find(t.name);
      if (it == replace.end())
        w.add(t.name, source.matrix<float>(t.name), st::Dtype::F32, t.shape);
      else if (it->second.size() > 0)
        w.add(t.name, it->second, st::Dtype::F32, {static_cast<std::uint64_t>(it->second.size())});
    }
    w.save((dir / "a" / "adapter_model.safetensors").string());
  };
  auto error = [&] { return lora_test::error_of([&] { lora::peft::read_adapter<float>((dir / "a").string()); }); };

  write("linear", {{q + ".lora_magnitude_vector", Mat<float>::Ones(1, 5)}});
  CHECK_THAT(error(), Contains("q_proj.lora_magnitude_vector: expected [6] (out_features), got F32 [5]"));
  write("linear", {{q + ".lora_magnitude_vector", Mat<float>()}});
  CHECK_THAT(error(), Contains("the config says use_dora (DoRA) but the file has no") && Contains("q_proj"));

  // A DoRA file into layers built without DoRA (and the reverse) is refused before any layer changes.
  const auto base = st::File::open(dora_dir + "/base.safetensors");
  auto model = dora_model(base, "linear");
  lora::LoraConfig plain_config = model.by_path.begin()->second->config();
  plain_config.use_dora = false;
  const Mat<float> w = model.by_path.begin()->second->frozen_weight().to_dense();
  lora::LoRALinear<float> plain(w, plain_config);
  const Mat<float> A_before = plain.lora_A();
  std::map<std::string, lora::LoRALinear<float>*> mixed = model.by_path;
  mixed.begin()->second = &plain;
  const std::string message = lora_test::error_of([&] { lora::peft::load_adapter(dora_dir + "/linear", mixed); });
  CHECK_THAT(message,
             Contains("the file's adapter is DoRA (lora_magnitude_vector), the layer was built without use_dora"));
  CHECK(plain.lora_A() == A_before);

  const auto adapter = lora::peft::read_adapter<float>(dora_dir + "/linear");

  // GGUF has no place for a magnitude: the exporter says why and writes nothing.
  lora::gguf::Writer writer;
  CHECK_THAT(lora_test::error_of([&] { lora::gguf::export_adapter(adapter, lora::gguf::ExportOptions{}, writer); }),
             Contains("a DoRA adapter") && Contains("merge it into the base model"));
  std::filesystem::remove_all(dir);
}

}  // namespace unit_dora
