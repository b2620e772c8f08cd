// LoRAEmbedding: PEFT's embedding LoRA over a frozen table. PyTorch golden data is in unit-golden.cpp; here:
// initialisation as PEFT does it, finite differences, cost that does not grow with V, merging, bad input.
#include <catch2/catch.hpp>
#include <lora/lora.hpp>

#include "test_files.hpp"

#include <chrono>
#include <cstdlib>
#include <limits>
#include <map>
#include <string>
#include <vector>

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_embedding {

using Catch::Contains;
using lora::Index;
template <class S>
using Mat = lora::Matrix<S>;

namespace {
lora::LoraConfig make_config(int r, double alpha, std::uint64_t seed = 3) {
  lora::LoraConfig c;
  c.r = r;
  c.lora_alpha = alpha;
  c.seed = seed;
  return c;
}
}  // namespace

TEST_CASE("a new embedding adapter starts as PEFT's: A zero, B normal, output the table's rows", "[embedding]") {
  std::srand(1);
  const Mat<float> E = Mat<float>::Random(50, 6);
  lora::LoRAEmbedding<float> layer(E, make_config(4, 8));
  CHECK(layer.num_embeddings() == 50);
  CHECK(layer.embedding_dim() == 6);
  CHECK(layer.lora_A().isZero(0));
  CHECK_FALSE(layer.lora_B().isZero(0));
  CHECK(layer.parameter_count().trainable == 4 * (50 + 6));
  layer.eval();
  const std::vector<Index> ids{3, 49, 3, 0};
  const Mat<float> y = layer.forward(ids);
  for (Index n = 0; n < 4; ++n) CHECK(y.row(n) == E.row(ids[static_cast<std::size_t>(n)]));
  CHECK(layer.parameters()[0].name == "lora_embedding_A");
}

TEST_CASE("embedding gradients match finite differences, repeated ids included", "[embedding][gradcheck]") {
  std::srand(2);
  lora::LoRAEmbedding<double> layer(Mat<double>::Random(9, 4), make_config(3, 6));
  layer.lora_A() = Mat<double>::Random(3, 9);
  const std::vector<Index> ids{2, 7, 2, 2, 5};
  const Mat<double> P = Mat<double>::Random(5, 4);
  Mat<double> y(5, 4);
  auto loss = [&] {
    layer.forward(ids, y);
    return y.cwiseProduct(P).sum();
  };
  loss();
  layer.zero_grad();
  layer.backward(ids, P);
  for (auto& p : layer.parameters()) {
    const Mat<double> analytic = Eigen::Map<const Mat<double>>(p.grad, p.rows, p.cols);
    const auto result = lora::check_gradient(loss, p.value, analytic.data(), p.size());
    INFO(result.describe(p.name));
    CHECK(result.ok());
  }
  CHECK(layer.dA().col(0).isZero(0));  // an id the batch did not use
  CHECK_FALSE(layer.dA().col(2).isZero(0));
}

TEST_CASE("embedding forward and backward do not grow with the vocabulary", "[embedding]") {
  // Not a timing test: it counts work. The per-step work touches N rows of the table and N columns of A, so a
  // vocabulary 2000 times larger must not change the result for the same ids, and the gradient of A is zero
  // outside the ids used: nothing was written there.
  const Index d = 8, N = 16;
  std::vector<Index> ids;
  for (Index n = 0; n < N; ++n) ids.push_back((n * 7) % 10);
  std::srand(5);
  const Mat<float> small_table = Mat<float>::Random(10, d);
  Mat<float> big_table = Mat<float>::Zero(20000, d);
  big_table.topRows(10) = small_table;
  lora::LoRAEmbedding<float> small(small_table, make_config(4, 4)), big(big_table, make_config(4, 4));
  big.lora_A().leftCols(10) = small.lora_A() = Mat<float>::Random(4, 10);
  big.lora_B() = small.lora_B();
  Mat<float> y_small(N, d), y_big(N, d);
  small.forward(ids, y_small);
  big.forward(ids, y_big);
  CHECK(y_small == y_big);
  const Mat<float> dy = Mat<float>::Random(N, d);
  small.backward(ids, dy);
  big.backward(ids, dy);
  CHECK(big.dA().leftCols(10) == small.dA());
  CHECK(big.dA().rightCols(20000 - 10).isZero(0));
  CHECK(big.dB() == small.dB());
}

TEST_CASE("embedding merge adds s (B A) transposed to the table, and unmerge takes it back", "[embedding][merge]") {
  std::srand(6);
  Mat<double> E = Mat<double>::Random(12, 5);
  const Mat<double> original = E;
  auto layer = lora::LoRAEmbedding<double>(
      lora::FrozenWeight<double>::mutable_view(E.data(), 5, 12, lora::WeightLayout::in_out), make_config(2, 3));
  layer.lora_A() = Mat<double>::Random(2, 12);
  const std::vector<Index> ids{0, 11, 4};
  layer.eval();
  const Mat<double> unmerged = layer.forward(ids);
  layer.merge();
  const Mat<double> BA = layer.lora_B() * layer.lora_A();
  for (Index v = 0; v < 12; ++v)
    for (Index j = 0; j < 5; ++j) CHECK(std::abs(E(v, j) - (original(v, j) + 1.5 * BA(j, v))) < 1e-14);
  CHECK((layer.forward(ids) - unmerged).cwiseAbs().maxCoeff() < 1e-12);
  layer.unmerge();
  CHECK((E - original).cwiseAbs().maxCoeff() < 1e-14);

  const std::vector<float> host(12 * 5, 0.5f);
  auto view = lora::LoRAEmbedding<float>::view(host.data(), 12, 5, make_config(2, 3));
  REQUIRE_THROWS_AS(view.merge(), lora::state_error);
  CHECK(view.table().data() == host.data());
}

TEST_CASE("embedding refuses ids out of range, naming the position and the id, and leaves y alone", "[embedding]") {
  lora::LoRAEmbedding<float> layer(Mat<float>::Ones(10, 3), make_config(2, 2));
  Mat<float> y = Mat<float>::Constant(3, 3, 7);
  REQUIRE_THROWS_AS(layer.forward({1, 10, 2}, y), lora::shape_error);
  REQUIRE_THROWS_WITH(layer.forward({1, 10, 2}, y), Contains("token id 10 at position 1") && Contains("[0, 10)"));
  REQUIRE_THROWS_WITH(layer.forward({-1, 0, 2}, y), Contains("token id -1 at position 0"));
  CHECK(y == Mat<float>::Constant(3, 3, 7));
  REQUIRE_THROWS_WITH(layer.backward({1, 2}, Mat<float>::Zero(2, 3)), Contains("no forward was run"));
  REQUIRE_THROWS_WITH(lora::LoRAEmbedding<float>(Mat<float>::Ones(10, 3), make_config(2, 2), 10),
                      Contains("padding_idx 10"));
  REQUIRE_THROWS_AS(lora::LoRAEmbedding<float>(Mat<float>()), lora::shape_error);
  REQUIRE_THROWS_WITH(lora::LoRAEmbedding<float>(lora::FrozenWeight<float>::owned(Mat<float>::Ones(3, 10))),
                      Contains("WeightLayout::in_out"));
}

TEST_CASE("embedding adapters round trip through PEFT files beside linear layers, and merge into a base file",
          "[embedding][peft]") {
  namespace fs = std::filesystem;
  const auto dir = lora_test::scratch_dir("embedding-peft");
  std::srand(9);
  const Index V = 11, d = 4;
  const Mat<float> wte = Mat<float>::Random(V, d), W_q = Mat<float>::Random(d, d);
  lora::LoRAEmbedding<float> emb(wte, make_config(2, 4));
  emb.lora_A() = Mat<float>::Random(2, V);
  lora::LoRALinear<float> q(W_q, make_config(3, 3));
  q.lora_B() = Mat<float>::Random(d, 3);
  const std::map<std::string, lora::LoRALinear<float>*> linears{{"model.layers.0.self_attn.q_proj", &q}};
  const std::map<std::string, lora::LoRAEmbedding<float>*> embeddings{{"model.embed_tokens", &emb}};
  lora::peft::save_adapter((dir / "a").string(), linears, embeddings);

  // The file holds PEFT's keys, without a .weight suffix for the embedding.
  const auto file = lora::safetensors::File::open((dir / "a" / "adapter_model.safetensors").string());
  REQUIRE(file.find("base_model.model.model.embed_tokens.lora_embedding_A") != nullptr);
  REQUIRE(file.find("base_model.model.model.embed_tokens.lora_embedding_B") != nullptr);
  const auto config = lora::peft::AdapterConfig::read((dir / "a" / "adapter_config.json").string());
  CHECK_FALSE(config.fan_in_fan_out);
  CHECK(config.scaling_for("model.embed_tokens") == Approx(2.0));
  CHECK(config.scaling_for("model.layers.0.self_attn.q_proj") == Approx(1.0));

  lora::LoRAEmbedding<float> emb2(wte, config.layer_config("model.embed_tokens"));
  lora::LoRALinear<float> q2(W_q, config.layer_config("model.layers.0.self_attn.q_proj"));
  const auto report = lora::peft::load_adapter(
      (dir / "a").string(), std::map<std::string, lora::LoRALinear<float>*>{{"model.layers.0.self_attn.q_proj", &q2}},
      std::map<std::string, lora::LoRAEmbedding<float>*>{{"model.embed_tokens", &emb2}});
  CHECK(report.loaded.size() == 2);
  CHECK(emb2.lora_A() == emb.lora_A());
  CHECK(emb2.lora_B() == emb.lora_B());
  CHECK_FALSE(emb2.is_training());
  // Saved again from what was loaded: the same bytes, both files.
  lora::peft::save_adapter((dir / "b").string(),
                           std::map<std::string, lora::LoRALinear<float>*>{{"model.layers.0.self_attn.q_proj", &q2}},
                           std::map<std::string, lora::LoRAEmbedding<float>*>{{"model.embed_tokens", &emb2}}, config);
  for (const char* name : {"adapter_model.safetensors", "adapter_config.json"})
    CHECK(lora_test::read_bytes((dir / "a" / name).string()) == lora_test::read_bytes((dir / "b" / name).string()));

  // Loaded into the wrong kind of layer, or left out: refused, naming the module, and nothing changes.
  lora::LoRALinear<float> wrong(Mat<float>(wte.transpose()), config.layer_config("model.embed_tokens"));
  const Mat<float> before = wrong.lora_A();
  try {
    lora::peft::load_adapter((dir / "a").string(),
                             std::map<std::string, lora::LoRALinear<float>*>{{"model.layers.0.self_attn.q_proj", &q2},
                                                                             {"model.embed_tokens", &wrong}});
    FAIL("loaded an embedding adapter into a LoRALinear");
  } catch (const lora::format_error& e) {
    CHECK_THAT(e.what(), Contains("model.embed_tokens: the file has an embedding adapter"));
  }
  CHECK(wrong.lora_A() == before);
  REQUIRE_THROWS_WITH(lora::peft::load_adapter((dir / "a").string(), linears),
                      Contains("unexpected: base_model.model.model.embed_tokens.lora_embedding_A / _B"));

  // lora-merge's merge_adapter_file adds s (B A)ᵀ to the (V, d) table, as the layer's merge does.
  lora::safetensors::Writer base;
  base.add("model.embed_tokens.weight", wte);
  base.add("model.layers.0.self_attn.q_proj.weight", W_q);
  base.save((dir / "base.safetensors").string());
  lora::peft::merge_adapter_file((dir / "base.safetensors").string(), (dir / "a").string(),
                                 (dir / "merged.safetensors").string());
  const auto merged = lora::safetensors::File::open((dir / "merged.safetensors").string());
  Mat<float> table = wte;
  lora::LoRAEmbedding<float> mergeable(
      lora::FrozenWeight<float>::mutable_view(table.data(), d, V, lora::WeightLayout::in_out), emb.config());
  mergeable.lora_A() = emb.lora_A();
  mergeable.lora_B() = emb.lora_B();
  mergeable.eval();
  mergeable.merge();
  CHECK((merged.matrix<float>("model.embed_tokens.weight") - table).cwiseAbs().maxCoeff() < 1e-6f);
  fs::remove_all(dir);
}

}  // namespace unit_embedding
