// DoRA beyond LoRALinear (unit-dora.cpp).
// LoRAEmbedding: forward, backward, merge and unmerge against PEFT's DoraEmbeddingLayer and DoraEmbeddingVariant
// computed by PyTorch (tests/golden/make_golden.py, "dora_embedding.*"), the magnitude's gradient against central
// differences, PEFT files with an embedding magnitude (make_dora_golden.py, "embedding"), and the refusals.
// MultiLoRALinear: DoRA adapters against LoRALinear's DoRA (itself checked against PyTorch) and against PEFT's
// formula for several active adapters, row by row in mixed batches, in training, and from PEFT's DoRA files.
// FusedLoRALinear: DoRA slices against the one DoRA LoRALinear on the fused module that to_lora() gives.
#include <catch2/catch.hpp>
#include <lora/lora.hpp>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "golden.hpp"
#include "test_files.hpp"

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_dora_layers {

using Catch::Contains;
using lora::Index;
using lora_test::max_rel_diff;
using lora_test::tensor;
using lora_test::tolerance;
template <class S>
using Mat = lora::Matrix<S>;

namespace {

lora::LoraConfig dora_config(int r = 2, double alpha = 4) {
  lora::LoraConfig c;
  c.r = r;
  c.lora_alpha = alpha;  // s = 2 at r = 2, as make_golden.py
  c.use_dora = true;
  c.seed = 5;
  return c;
}

std::vector<Index> golden_ids() {
  const Mat<double> m = tensor("dora_embedding.ids");
  std::vector<Index> ids;
  for (Index i = 0; i < m.size(); ++i) ids.push_back(static_cast<Index>(m(i)));
  return ids;
}

/// The golden layer over a mutable view of `table` (the golden E), padding index 0, with the golden A and B and
/// m = m0 (reset_magnitude).
template <class S>
lora::LoRAEmbedding<S> golden_layer(Mat<S>& table) {
  table = tensor<S>("dora_embedding.E");
  lora::LoRAEmbedding<S> layer(
      lora::FrozenWeight<S>::mutable_view(table.data(), table.cols(), table.rows(), lora::WeightLayout::in_out),
      dora_config(), Index{0});
  layer.lora_A() = tensor<S>("dora_embedding.A");
  layer.lora_B() = tensor<S>("dora_embedding.B");
  layer.reset_magnitude();
  return layer;
}

}  // namespace

TEMPLATE_TEST_CASE("DoRA on an embedding matches PEFT's DoraEmbeddingLayer in PyTorch, repeated ids and padding",
                   "[dora][embedding][golden]", float, double) {
  using S = TestType;
  Mat<S> table;
  auto layer = golden_layer<S>(table);
  REQUIRE(layer.use_dora());
  CHECK(max_rel_diff(layer.magnitude(), tensor("dora_embedding.m0")) < tolerance<S>);
  CHECK(max_rel_diff(layer.weight_norm(), tensor("dora_embedding.m0")) < tolerance<S>);
  layer.magnitude() = tensor<S>("dora_embedding.m");

  const auto ids = golden_ids();
  Mat<S> y(static_cast<Index>(ids.size()), layer.embedding_dim());
  layer.zero_grad();
  layer.forward(ids, y);
  CHECK(max_rel_diff(y, tensor("dora_embedding.y")) < tolerance<S>);
  layer.backward(ids, tensor<S>("dora_embedding.dy"));
  CHECK(max_rel_diff(layer.dA(), tensor("dora_embedding.dA")) < tolerance<S>);  // no gradient for padding id 0
  CHECK(max_rel_diff(layer.dB(), tensor("dora_embedding.dB")) < tolerance<S>);
  CHECK(max_rel_diff(layer.dmagnitude(), tensor("dora_embedding.dm")) < tolerance<S>);

  // Eval mode gives the same output from a const layer; merged, the table alone gives it.
  layer.eval();
  const auto& const_layer = layer;
  CHECK(max_rel_diff(const_layer.forward(ids), tensor("dora_embedding.y")) < tolerance<S>);
  const Mat<S> before = table;
  layer.merge();
  CHECK(max_rel_diff(table, tensor("dora_embedding.merged_E")) < tolerance<S>);
  CHECK(max_rel_diff(const_layer.forward(ids), tensor("dora_embedding.y")) < tolerance<S>);
  layer.unmerge();
  CHECK(max_rel_diff(table, before) < tolerance<S>);
  CHECK(max_rel_diff(const_layer.forward(ids), tensor("dora_embedding.y")) < tolerance<S>);
}

TEST_CASE("A new DoRA embedding starts at the table, with m the norms of its columns", "[dora][embedding]") {
  const Mat<float> E = Mat<float>::Random(13, 5);
  lora::LoraConfig plain_config = dora_config(4, 8);
  plain_config.use_dora = false;
  lora::LoRAEmbedding<float> plain(E, plain_config);
  lora::LoRAEmbedding<float> dora(E, dora_config(4, 8));
  // A = 0 (PEFT's init): n is ‖E[:, j]‖, m / n is exactly 1 and the output is the table's rows bit for bit.
  CHECK(max_rel_diff(dora.magnitude(), E.colwise().norm()) < 1e-6);
  CHECK(dora.lora_B() == plain.lora_B());
  const std::vector<Index> ids{12, 0, 4, 4};
  dora.eval();
  plain.eval();
  CHECK(Mat<float>(dora.forward(ids)) == Mat<float>(plain.forward(ids)));
  CHECK(dora.parameter_count().trainable == plain.parameter_count().trainable + 5);
  const auto params = dora.parameters();
  REQUIRE(params.size() == 3);
  CHECK(params[2].name == "lora_magnitude_vector");
  CHECK(params[2].rows == 1);
  CHECK(params[2].cols == 5);
  // LoRA+: PEFT's create_loraplus_optimizer puts an embedding's magnitude (a 1-D parameter held by a ModuleDict,
  // not by the Embedding) with lora_B, at lr · ratio; A and B go to the embedding group.
  const auto groups = lora::loraplus_groups(dora.parameters(), 0.01);
  CHECK(groups[0].lr_scale == Approx(1e-6 / 0.01));
  CHECK(groups[1].lr_scale == Approx(1e-6 / 0.01));
  CHECK(groups[2].lr_scale == Approx(16));
}

TEST_CASE("DoRA embedding: dm passes finite differences, and dA, dB are LoRA's with n held constant",
          "[dora][embedding][gradcheck]") {
  std::srand(4);
  const Mat<double> E = Mat<double>::Random(9, 4);
  lora::LoRAEmbedding<double> layer(E, dora_config(3, 6), Index{8});
  layer.lora_A() = Mat<double>::Random(3, 9);
  layer.magnitude().array() *= 1.3;
  const std::vector<Index> ids{2, 7, 2, 8, 5, 2};
  const Mat<double> P = Mat<double>::Random(6, 4);
  Mat<double> y(6, 4);
  auto loss = [&] {
    layer.forward(ids, y);
    return y.cwiseProduct(P).sum();
  };
  loss();
  layer.zero_grad();
  layer.backward(ids, P);
  const auto params = layer.parameters();
  const auto& m = params[2];
  const Mat<double> dm = Eigen::Map<const Mat<double>>(m.grad, m.rows, m.cols);
  const auto result = lora::check_gradient(loss, m.value, dm.data(), m.size());
  INFO(result.describe(m.name));
  CHECK(result.ok());

  // With n frozen at the forward's value, y = c ⊙ (E[ids] + s·H Bᵀ) is LoRA's output scaled per column: the same
  // gradients as a plain embedding whose B is c ⊙ B (row j times c_j), given dy.
  const Mat<double> c = layer.magnitude().cwiseQuotient(layer.weight_norm());
  lora::LoraConfig plain_config = dora_config(3, 6);
  plain_config.use_dora = false;
  lora::LoRAEmbedding<double> plain(E, plain_config, Index{8});
  plain.lora_A() = layer.lora_A();
  plain.lora_B() = c.transpose().asDiagonal() * layer.lora_B();
  Mat<double> y_plain(6, 4);
  plain.forward(ids, y_plain);
  plain.zero_grad();
  plain.backward(ids, P);
  CHECK(max_rel_diff(layer.dA(), plain.dA()) < 1e-13);  // padding id 8 gets none in either
  CHECK(layer.dA().col(8).isZero(0));
  // dB: plain's dB' = dL/d(c⊙B), and dL/dB = c ⊙ dB' per row.
  CHECK(max_rel_diff(layer.dB(), Mat<double>(c.transpose().asDiagonal() * plain.dB())) < 1e-13);
}

TEST_CASE("DoRA embedding refuses a zero column, a zero magnitude at merge and a read-only table, changing nothing",
          "[dora][embedding][errors]") {
  Mat<double> E = Mat<double>::Random(8, 3);
  E.col(1).setZero();
  CHECK_THROWS_WITH(lora::LoRAEmbedding<double>(E, dora_config()),
                    Contains("embedding dimension 1") && Contains("NaN"));

  Mat<double> table = Mat<double>::Random(8, 3);
  const Mat<double> before = table;
  lora::LoRAEmbedding<double> layer(
      lora::FrozenWeight<double>::mutable_view(table.data(), 3, 8, lora::WeightLayout::in_out), dora_config());
  layer.lora_A() = Mat<double>::Random(2, 8);
  layer.magnitude()(0, 2) = 0;
  CHECK_THROWS_WITH(layer.merge(), Contains("embedding dimension 2") && Contains("left unchanged"));
  CHECK_FALSE(layer.is_merged());
  CHECK(table == before);

  lora::LoRAEmbedding<double> viewed = lora::LoRAEmbedding<double>::view(before.data(), 8, 3, dora_config());
  CHECK_THROWS_WITH(viewed.merge(), Contains("read-only"));
  CHECK_FALSE(viewed.is_merged());

  lora::LoraConfig rank_zero = dora_config();
  rank_zero.r = 0;
  CHECK_THROWS_WITH(lora::LoRAEmbedding<double>(before, rank_zero), Contains("use_dora needs r > 0"));
}

namespace {
namespace st = lora::safetensors;
const std::string dora_dir = std::string(LORA_TEST_DATA_DIR) + "/peft/dora";
const std::string embed_path = "model.embed_tokens", q_path = "model.layers.0.self_attn.q_proj";
}  // namespace

TEST_CASE("DoRA embedding adapters as PEFT saves them load, give PEFT's outputs, save back and merge as PEFT's",
          "[dora][embedding][peft][golden]") {
  const auto base = st::File::open(dora_dir + "/base_embedding.safetensors");
  const auto forward = st::File::open(dora_dir + "/forward_embedding.safetensors");
  const auto want_merged = st::File::open(dora_dir + "/merged_embedding.safetensors");
  const auto adapter = lora::peft::read_adapter<float>(dora_dir + "/embedding");
  REQUIRE(adapter.config.use_dora);
  REQUIRE(adapter.modules.size() == 2);
  REQUIRE(adapter.find(embed_path) != nullptr);
  CHECK(adapter.find(embed_path)->embedding);
  CHECK(adapter.find(embed_path)->magnitude.cols() == 6);

  // Owned copies of the base tensors, so that the layers' merge can be checked too.
  const Mat<float> wte = base.matrix<float>(embed_path + ".weight"), W_q = base.matrix<float>(q_path + ".weight");
  lora::LoRAEmbedding<float> emb(wte, adapter.config.layer_config(embed_path));
  lora::LoRALinear<float> q(W_q, adapter.config.layer_config(q_path));
  REQUIRE(emb.use_dora());
  const std::map<std::string, lora::LoRALinear<float>*> linears{{q_path, &q}};
  const std::map<std::string, lora::LoRAEmbedding<float>*> embeddings{{embed_path, &emb}};
  const auto report = lora::peft::load_adapter(dora_dir + "/embedding", linears, embeddings);
  CHECK(report.loaded.size() == 2);
  CHECK(emb.magnitude() == adapter.find(embed_path)->magnitude);

  const Mat<float> id_values = forward.matrix<float>(embed_path + ".ids");
  std::vector<Index> ids;
  for (Index i = 0; i < id_values.size(); ++i) ids.push_back(static_cast<Index>(id_values(i)));
  CHECK(max_rel_diff(std::as_const(emb).forward(ids), forward.matrix<float>(embed_path + ".y")) < 1e-5);
  const Mat<float> x = forward.matrix<float>(q_path + ".x");
  CHECK(max_rel_diff(std::as_const(q).forward(x), forward.matrix<float>(q_path + ".y")) < 1e-5);

  // Saved from the layers and from the adapter as read: PEFT's bytes, both files.
  const auto dir = lora_test::scratch_dir("dora-embedding-peft");
  lora::peft::save_adapter((dir / "out").string(), linears, embeddings, adapter.config);
  lora::peft::save_adapter((dir / "held").string(), adapter);
  for (const char* name : {"adapter_model.safetensors", "adapter_config.json"}) {
    CAPTURE(name);
    const auto want = lora_test::read_bytes(dora_dir + "/embedding/" + name);
    CHECK(lora_test::read_bytes((dir / "out" / name).string()) == want);
    CHECK(lora_test::read_bytes((dir / "held" / name).string()) == want);
  }

  // lora-merge's merge_adapter_file and the layers' own merge give PEFT's merge_safe.
  const std::string out = (dir / "merged.safetensors").string();
  lora::peft::merge_adapter_file(dora_dir + "/base_embedding.safetensors", dora_dir + "/embedding", out);
  const auto got = st::File::open(out);
  for (const auto& t : want_merged.tensors()) {
    CAPTURE(t.name);
    CHECK(max_rel_diff(got.matrix<float>(t.name), want_merged.matrix<float>(t.name)) < 2e-6);
  }
  emb.merge();
  q.merge();
  CHECK(max_rel_diff(emb.table(), want_merged.matrix<float>(embed_path + ".weight")) < 2e-6);
  CHECK(max_rel_diff(q.frozen_weight().stored(), want_merged.matrix<float>(q_path + ".weight")) < 2e-6);
  emb.unmerge();
  CHECK(max_rel_diff(emb.table(), wte) < 1e-6);
  std::filesystem::remove_all(dir);
}

TEST_CASE("DoRA embedding files that do not fit are refused with what was expected, and nothing loads",
          "[dora][embedding][peft][errors]") {
  const auto dir = lora_test::scratch_dir("dora-embedding-bad");
  const auto source = st::File::open(dora_dir + "/embedding/adapter_model.safetensors");
  const std::string key = "base_model.model." + embed_path + ".lora_magnitude_vector";
  std::filesystem::create_directories(dir / "a");
  std::filesystem::copy_file(dora_dir + "/embedding/adapter_config.json", dir / "a" / "adapter_config.json");
  st::Writer w;
  for (const auto& t : source.tensors()) {
    if (t.name == key)
      w.add(t.name, Mat<float>::Ones(1, 5), st::Dtype::F32, {5});
    else
      w.add(t.name, source.matrix<float>(t.name), st::Dtype::F32, t.shape);
  }
  w.save((dir / "a" / "adapter_model.safetensors").string());
  CHECK_THAT(lora_test::error_of([&] { lora::peft::read_adapter<float>((dir / "a").string()); }),
             Contains("embed_tokens.lora_magnitude_vector: expected [6] (embedding_dim), got F32 [5]"));

  // A DoRA embedding file into an embedding built without DoRA: refused, and neither layer changes.
  const auto config = lora::peft::AdapterConfig::read(dora_dir + "/embedding/adapter_config.json");
  const auto base = st::File::open(dora_dir + "/base_embedding.safetensors");
  lora::LoraConfig plain = config.layer_config(embed_path);
  plain.use_dora = false;
  lora::LoRAEmbedding<float> emb(base.matrix<float>(embed_path + ".weight"), plain);
  lora::LoRALinear<float> q(base.matrix<float>(q_path + ".weight"), config.layer_config(q_path));
  const Mat<float> emb_B = emb.lora_B(), q_A = q.lora_A();
  CHECK_THAT(lora_test::error_of([&] {
               lora::peft::load_adapter(dora_dir + "/embedding",
                                        std::map<std::string, lora::LoRALinear<float>*>{{q_path, &q}},
                                        std::map<std::string, lora::LoRAEmbedding<float>*>{{embed_path, &emb}});
             }),
             Contains("embed_tokens: the file's adapter is DoRA (lora_magnitude_vector), the layer was built without "
                      "use_dora"));
  CHECK(emb.lora_B() == emb_B);
  CHECK(q.lora_A() == q_A);
  std::filesystem::remove_all(dir);
}

// ---- MultiLoRALinear ------------------------------------------------------------------------------------------

namespace {

lora::LoraConfig multi_config(int r, double alpha, bool dora, bool rslora = false) {
  lora::LoraConfig c;
  c.r = r;
  c.lora_alpha = alpha;
  c.use_dora = dora;
  c.use_rslora = rslora;
  c.seed = 11 + r;
  return c;
}

/// c = m / ‖W + s·B A‖ per row, the dense way.
Mat<double> dense_scale(const Mat<double>& W, const Mat<double>& A, const Mat<double>& B, double s,
                        const Mat<double>& m) {
  return m.cwiseQuotient((W + s * B * A).rowwise().norm().transpose());
}

struct MultiCase {
  Mat<double> W = Mat<double>::Random(6, 5);
  lora::RowVector<double> b = lora::RowVector<double>::Random(6);
  std::map<std::string, lora::LoraConfig> configs{
      {"a", multi_config(2, 4, true)}, {"b", multi_config(3, 5, true, true)}, {"p", multi_config(2, 2, false)}};
  std::map<std::string, Mat<double>> A, B, m;
  lora::MultiLoRALinear<double> multi{Mat<double>(W), b};

  MultiCase() {
    for (const auto& [name, c] : configs) {
      A[name] = Mat<double>::Random(c.r, 5);
      B[name] = Mat<double>::Random(6, c.r);
      if (c.use_dora) m[name] = 2 * Mat<double>::Random(1, 6).cwiseAbs().array() + 0.5;
      multi.add_adapter(name, c, A[name], B[name], c.use_dora ? m[name] : Mat<double>());
    }
  }
  /// A LoRALinear with adapter `name`'s A, B and magnitude, at scaling · scale.
  lora::LoRALinear<double> single(const std::string& name, double scale = 1) const {
    lora::LoraConfig c = configs.at(name);
    c.lora_alpha *= scale;
    lora::LoRALinear<double> layer(W, b, c);
    layer.lora_A() = A.at(name);
    layer.lora_B() = B.at(name);
    if (c.use_dora) layer.magnitude() = m.at(name);
    layer.eval();
    return layer;
  }
};

}  // namespace

TEST_CASE("MultiLoRALinear DoRA adapters: alone, with others as PEFT sums them, and row by row in a mixed batch",
          "[dora][multi]") {
  std::srand(21);
  MultiCase t;
  const Mat<double> x = Mat<double>::Random(5, 5);
  for (const std::string name : {"a", "b", "p"}) {
    CAPTURE(name);
    t.multi.set_adapter(name);
    CHECK(max_rel_diff(t.multi.forward(x), t.single(name).forward(x)) < 1e-12);
  }
  const auto a = t.multi.adapter("a");
  CHECK(max_rel_diff(a->dora_scale, dense_scale(t.W, t.A["a"], t.B["a"], 2.0, t.m["a"])) < 1e-12);
  CHECK(t.multi.adapter_parameter_count() == 2 * 11 + 6 + 3 * 11 + 6 + 2 * 11);

  // Several active: PEFT adds each DoRA adapter's (c − 1) ⊙ x Wᵀ + c ⊙ s·H Bᵀ to x Wᵀ + b.
  t.multi.set_active_adapters({"a", "p", "b"});
  const Mat<double> base = x * t.W.transpose();
  Mat<double> want = base.rowwise() + t.b;
  for (const std::string name : {"a", "p", "b"}) {
    const auto& c = t.configs[name];
    const double s = c.use_rslora ? c.lora_alpha / std::sqrt(double(c.r)) : c.lora_alpha / c.r;
    const Mat<double> low = s * x * t.A[name].transpose() * t.B[name].transpose();
    if (!c.use_dora) {
      want += low;
      continue;
    }
    const Mat<double> scale = dense_scale(t.W, t.A[name], t.B[name], s, t.m[name]);
    want.array() += base.array().rowwise() * (scale.array() - 1).row(0) + low.array().rowwise() * scale.array().row(0);
  }
  CHECK(max_rel_diff(t.multi.forward(x), want) < 1e-12);

  // A mixed batch: each row as its adapter alone gives it (PEFT refuses DoRA here; the row-wise form is exact).
  const std::vector<std::string> rows{"a", "b", lora::MultiLoRALinear<double>::base_name, "p", "a"};
  Mat<double> mixed(5, 6);
  t.multi.forward(x, rows, mixed);
  for (Index n = 0; n < 5; ++n) {
    CAPTURE(n);
    const Mat<double> xn = x.row(n);
    const Mat<double> expected = rows[n] == lora::MultiLoRALinear<double>::base_name
                                     ? Mat<double>((xn * t.W.transpose()).rowwise() + t.b)
                                     : Mat<double>(t.single(rows[n]).forward(xn));
    CHECK(max_rel_diff(mixed.row(n), expected) < 1e-12);
  }

  // set_scale changes s, and with it n: the output is a LoRALinear's at lora_alpha · scale.
  t.multi.set_scale("b", 0.5);
  t.multi.set_adapter("b");
  CHECK(max_rel_diff(t.multi.forward(x), t.single("b", 0.5).forward(x)) < 1e-12);
}

TEST_CASE("MultiLoRALinear DoRA: a new adapter starts at the base, training matches LoRALinear's DoRA and publishes m",
          "[dora][multi]") {
  std::srand(22);
  const Mat<double> W = Mat<double>::Random(6, 5);
  lora::MultiLoRALinear<double> multi{Mat<double>(W)};
  multi.add_adapter("fresh", multi_config(2, 4, true));
  const auto fresh = multi.adapter("fresh");
  CHECK(max_rel_diff(fresh->magnitude, W.rowwise().norm().transpose()) < 1e-14);
  multi.set_adapter("fresh");
  const Mat<double> x = Mat<double>::Random(7, 5), dy = Mat<double>::Random(7, 6);
  CHECK(max_rel_diff(multi.forward(x), Mat<double>(x * W.transpose())) < 1e-14);

  // Trained through the layer against a LoRALinear with the same A, B and m: the same gradients, m included.
  const Mat<double> B = Mat<double>::Random(6, 2), m = Mat<double>::Random(1, 6).cwiseAbs().array() + 1;
  multi.replace_adapter("fresh", multi_config(2, 4, true), fresh->lora_A, B, m);
  lora::LoRALinear<double> ref(W, multi_config(2, 4, true));
  ref.lora_A() = fresh->lora_A;
  ref.lora_B() = B;
  ref.magnitude() = m;
  multi.train_adapter("fresh");
  multi.zero_grad();
  ref.zero_grad();
  Mat<double> y(7, 6), y_ref(7, 6), dx(7, 5), dx_ref(7, 5);
  multi.forward(x, y);
  ref.forward(x, y_ref);
  CHECK(max_rel_diff(y, y_ref) < 1e-14);
  multi.backward(x, dy, dx);
  ref.backward(x, dy, dx_ref);
  CHECK(max_rel_diff(dx, dx_ref) < 1e-14);
  auto params = multi.parameters();
  REQUIRE(params.size() == 3);
  CHECK(params[2].name == "fresh.lora_magnitude_vector");
  CHECK(max_rel_diff(Eigen::Map<const Mat<double>>(params[2].grad, 1, 6), ref.dmagnitude()) < 1e-14);
  // One SGD step on each, then eval() publishes the trained magnitude and its new c.
  for (auto& p : params)
    Eigen::Map<Mat<double>>(p.value, p.rows, p.cols) -= 0.1 * Eigen::Map<Mat<double>>(p.grad, p.rows, p.cols);
  for (auto& p : ref.parameters())
    Eigen::Map<Mat<double>>(p.value, p.rows, p.cols) -= 0.1 * Eigen::Map<Mat<double>>(p.grad, p.rows, p.cols);
  multi.eval();
  ref.eval();
  CHECK(max_rel_diff(multi.adapter("fresh")->magnitude, ref.magnitude()) < 1e-14);
  CHECK(max_rel_diff(multi.forward(x), ref.forward(x)) < 1e-13);
}

TEST_CASE("MultiLoRALinear loads PEFT's DoRA files as a named adapter, gives PEFT's outputs and saves them back",
          "[dora][multi][peft][golden]") {
  const auto base = st::File::open(dora_dir + "/base.safetensors");
  const auto forward = st::File::open(dora_dir + "/forward.safetensors");
  const std::vector<std::string> paths{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"};
  std::vector<std::unique_ptr<lora::MultiLoRALinear<float>>> layers;
  std::map<std::string, lora::MultiLoRALinear<float>*> model;
  for (const auto& path : paths) {
    const auto w = base.view<float>(path + ".weight");
    layers.push_back(std::make_unique<lora::MultiLoRALinear<float>>(
        lora::FrozenWeight<float>::view(w.data(), w.rows(), w.cols()), base.matrix<float>(path + ".bias")));
    layers.back()->add_adapter("other", multi_config(2, 2, false));  // a plain adapter beside it
    model[path] = layers.back().get();
  }
  const auto report = lora::peft::load_adapter(dora_dir + "/linear", "dora", model);
  CHECK(report.loaded.size() == 2);
  for (const auto& path : paths) {
    CAPTURE(path);
    model[path]->set_adapter("dora");
    const Mat<float> x = forward.matrix<float>(path + ".x");
    CHECK(max_rel_diff(model[path]->forward(x), forward.matrix<float>(path + ".y")) < 1e-5);
  }
  const auto dir = lora_test::scratch_dir("dora-multi-peft");
  const auto config = lora::peft::AdapterConfig::read(dora_dir + "/linear/adapter_config.json");
  lora::peft::save_adapter((dir / "out").string(), "dora", model, config);
  for (const char* name : {"adapter_model.safetensors", "adapter_config.json"}) {
    CAPTURE(name);
    CHECK(lora_test::read_bytes((dir / "out" / name).string()) == lora_test::read_bytes(dora_dir + "/linear/" + name));
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("MultiLoRALinear refuses a misshapen or unasked-for magnitude and combining DoRA adapters, changing nothing",
          "[dora][multi][errors]") {
  std::srand(23);
  lora::MultiLoRALinear<double> multi{Mat<double>(Mat<double>::Random(6, 5))};
  const Mat<double> A = Mat<double>::Random(2, 5), B = Mat<double>::Random(6, 2);
  CHECK_THROWS_WITH(multi.add_adapter("d", multi_config(2, 4, true), A, B, Mat<double>::Ones(1, 5)),
                    Contains("adapter \"d\": DoRA's magnitude expected 6 entries (out_features), got 5"));
  CHECK_THROWS_WITH(multi.add_adapter("d", multi_config(2, 4, false), A, B, Mat<double>::Ones(1, 6)),
                    Contains("a DoRA magnitude was given, but config.use_dora is false"));
  CHECK(multi.adapter_names().empty());
  multi.add_adapter("d", multi_config(2, 4, true), A, B);
  multi.add_adapter("p", multi_config(2, 4, false), A, B);
  CHECK_THROWS_WITH(multi.add_weighted_adapter({"p", "d"}, {1.0, 1.0}, "sum", lora::Combination::cat),
                    Contains("adapter \"d\" is DoRA"));
  CHECK(multi.adapter_names() == std::vector<std::string>{"d", "p"});
}

// ---- FusedLoRALinear ------------------------------------------------------------------------------------------

namespace {

/// q (r 2, alpha 4) and v (r 3, alpha 9, so s differs) adapted with DoRA, k frozen: d = 4 outputs each, I = 5.
std::vector<lora::FusedSlice> dora_slices(bool dora = true) {
  lora::LoraConfig q = multi_config(2, 4, dora), v = multi_config(3, 9, dora), k;
  k.r = 0;
  return {{"q", 4, q}, {"k", 4, k}, {"v", 4, v}};
}

}  // namespace

TEST_CASE("Fused DoRA slices are PEFT's DoRA on the fused module: forward, backward and merge as to_lora()'s layer",
          "[dora][fused]") {
  std::srand(31);
  Mat<double> W = Mat<double>::Random(12, 5);
  const Mat<double> W0 = W;
  const lora::RowVector<double> b = lora::RowVector<double>::Random(12);
  lora::FusedLoRALinear<double> fused(lora::FrozenWeight<double>::mutable_view(W.data(), 12, 5), dora_slices(), b);
  REQUIRE(fused.use_dora());
  // A new layer: B = 0, so m = ‖W_o‖ on every row (the frozen slice's too) and the output is the base's.
  CHECK(max_rel_diff(fused.magnitude(), W0.rowwise().norm().transpose()) < 1e-14);
  CHECK(fused.parameter_count().trainable == 2 * 5 + 4 * 2 + 3 * 5 + 4 * 3 + 12);
  const Mat<double> x = Mat<double>::Random(7, 5), dy = Mat<double>::Random(7, 12);
  fused.eval();
  CHECK(max_rel_diff(fused.forward(x), Mat<double>((x * W0.transpose()).rowwise() + b)) < 1e-14);

  fused.lora_B(0) = Mat<double>::Random(4, 2);
  fused.lora_B(2) = Mat<double>::Random(4, 3);
  fused.magnitude().array() *= 1 + 0.3 * Mat<double>::Random(1, 12).array();
  // The single DoRA LoRA on the fused module (its n and c are the fused layer's), over an owned copy of W.
  const auto single_view = fused.to_lora();
  REQUIRE(single_view.use_dora());
  CHECK(single_view.magnitude() == fused.magnitude());
  CHECK(max_rel_diff(fused.weight_norm(), single_view.weight_norm()) < 1e-14);
  lora::LoRALinear<double> single(W0, b, single_view.config());
  single.lora_A() = single_view.lora_A();
  single.lora_B() = single_view.lora_B();
  single.magnitude() = single_view.magnitude();
  single.eval();
  CHECK(max_rel_diff(fused.forward(x), single.forward(x)) < 1e-13);

  fused.train();
  single.train();
  fused.zero_grad();
  single.zero_grad();
  Mat<double> y(7, 12), y_single(7, 12), dx(7, 5), dx_single(7, 5);
  fused.forward(x, y);
  single.forward(x, y_single);
  CHECK(max_rel_diff(y, y_single) < 1e-13);
  fused.backward(x, dy, dx);
  single.backward(x, dy, dx_single);
  CHECK(max_rel_diff(dx, dx_single) < 1e-13);
  CHECK(max_rel_diff(fused.dmagnitude(), single.dmagnitude()) < 1e-13);
  // single's B block for slice k is (s_k / s) B_k, A is the stacked A: dB_k = (s_k / s) · its block of dB.
  CHECK(max_rel_diff(fused.dA(0), single.dA().topRows(2)) < 1e-13);
  CHECK(max_rel_diff(fused.dA(2), single.dA().bottomRows(3)) < 1e-13);
  const double s = single.scaling();
  CHECK(max_rel_diff(fused.dB(0), Mat<double>(fused.slice_scaling(0) / s * single.dB().block(0, 0, 4, 2))) < 1e-13);
  CHECK(max_rel_diff(fused.dB(2), Mat<double>(fused.slice_scaling(2) / s * single.dB().block(8, 2, 4, 3))) < 1e-13);
  const auto params = fused.parameters();
  REQUIRE(params.size() == 5);
  CHECK(params[4].name == "lora_magnitude_vector");

  // merge: W ← c ⊙ (W + Σ s_k B_k A_k), as the single layer's merge; unmerge gives W back.
  fused.eval();
  single.eval();
  const Mat<double> y_eval = fused.forward(x);
  fused.merge();
  single.merge();
  CHECK(max_rel_diff(W, single.frozen_weight().to_dense()) < 1e-13);
  CHECK(max_rel_diff(fused.forward(x), y_eval) < 1e-13);
  fused.unmerge();
  CHECK(max_rel_diff(W, W0) < 1e-14);
  CHECK(max_rel_diff(fused.forward(x), y_eval) < 1e-13);

  // from_lora takes m back with A and B; a LoRA without DoRA is refused, and nothing changes.
  lora::FusedLoRALinear<double> back(lora::FrozenWeight<double>::view(W0.data(), 12, 5), dora_slices(), b);
  back.from_lora(single_view);
  CHECK(back.magnitude() == fused.magnitude());
  back.eval();
  CHECK(max_rel_diff(back.forward(x), y_eval) < 1e-13);
  lora::FusedLoRALinear<double> plain(lora::FrozenWeight<double>::view(W0.data(), 12, 5), dora_slices(false), b);
  const auto plain_single = plain.to_lora();
  const Mat<double> m_before = back.magnitude();
  CHECK_THROWS_WITH(back.from_lora(plain_single), Contains("the slices are DoRA, the LoRA is not"));
  CHECK(back.magnitude() == m_before);
  CHECK_THROWS_WITH(plain.from_lora(single_view), Contains("the LoRA is DoRA"));
}

TEST_CASE("Fused DoRA with dropout is PEFT's form: the same step as to_lora()'s layer under the same mask",
          "[dora][fused]") {
  std::srand(32);
  const Mat<double> W = Mat<double>::Random(12, 5);
  const lora::RowVector<double> b = lora::RowVector<double>::Random(12);
  auto slices = dora_slices();
  slices[0].config.lora_dropout = slices[2].config.lora_dropout = 0.3;
  lora::FusedLoRALinear<double> fused(lora::FrozenWeight<double>::view(W.data(), 12, 5), slices, b);
  fused.lora_B(0) = Mat<double>::Random(4, 2);
  fused.lora_B(2) = Mat<double>::Random(4, 3);
  fused.magnitude().array() *= 1 + 0.3 * Mat<double>::Random(1, 12).array();
  const auto view = fused.to_lora();
  REQUIRE(view.config().lora_dropout == Approx(0.3));
  lora::LoRALinear<double> single(W, b, view.config());
  single.lora_A() = view.lora_A();
  single.lora_B() = view.lora_B();
  single.magnitude() = view.magnitude();
  fused.train();
  single.train();
  fused.set_dropout_seed(99);  // the same draws: both take an (N, I) mask from the same generator
  single.set_dropout_seed(99);
  const Mat<double> x = Mat<double>::Random(9, 5), dy = Mat<double>::Random(9, 12);
  Mat<double> y(9, 12), y_single(9, 12), dx(9, 5), dx_single(9, 5);
  fused.zero_grad();
  single.zero_grad();
  fused.forward(x, y);
  single.forward(x, y_single);
  CHECK(max_rel_diff(y, y_single) < 1e-13);
  fused.eval();
  CHECK(max_rel_diff(y, fused.forward(x)) > 1e-3);  // the mask did drop something
  fused.train();
  fused.backward(x, dy, dx);
  single.backward(x, dy, dx_single);
  CHECK(max_rel_diff(dx, dx_single) < 1e-13);
  CHECK(max_rel_diff(fused.dmagnitude(), single.dmagnitude()) < 1e-13);
  CHECK(max_rel_diff(fused.dA(0), single.dA().topRows(2)) < 1e-13);
  const double s = single.scaling();
  CHECK(max_rel_diff(fused.dB(2), Mat<double>(fused.slice_scaling(2) / s * single.dB().block(8, 2, 4, 3))) < 1e-13);
}

TEST_CASE("Fused DoRA refuses slices that disagree on use_dora, a frozen DoRA slice and a zero row",
          "[dora][fused][errors]") {
  const Mat<float> W = Mat<float>::Random(12, 5);
  const auto weight = lora::FrozenWeight<float>::view(W.data(), 12, 5);
  auto slices = dora_slices();
  slices[2].config.use_dora = false;
  CHECK_THROWS_WITH(lora::FusedLoRALinear<float>(weight, slices),
                    Contains("slice 2 (\"v\") is not DoRA") && Contains("all adapted slices or none"));
  slices = dora_slices();
  slices[1].config.use_dora = true;
  CHECK_THROWS_WITH(lora::FusedLoRALinear<float>(weight, slices), Contains("\"k\") is frozen (r = 0)"));
  // A zero row of W (B = 0 at the start) has no norm to divide by: refused with the row.
  Mat<float> zero_row = W;
  zero_row.row(6).setZero();
  CHECK_THROWS_WITH(
      lora::FusedLoRALinear<float>(lora::FrozenWeight<float>::view(zero_row.data(), 12, 5), dora_slices()),
      Contains("output row 6"));
}

}  // namespace unit_dora_layers
