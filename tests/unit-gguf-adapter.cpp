// PEFT adapters to GGUF LoRA adapters and back (<lora/gguf_adapter.hpp>).
// The oracle is tests/data/gguf/adapters/ (tests/golden/make_gguf_adapter_golden.py): PEFT adapters for tiny
// LLaMA and GPT-2 models and the update llama.cpp must apply to every GGUF base tensor, computed by PyTorch from
// PEFT's get_delta_weight and llama.cpp's converter (q/k row permutation, Conv1D transpose). The exported files
// there were read by ggml's gguf reader with llama.cpp's loader checks (read_by_ggml.txt); the first test holds
// the exporter to those bytes.
#include <catch2/catch.hpp>
#include <lora/gguf_adapter.hpp>
#include <lora/multi.hpp>
#include <lora/peft.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "test_files.hpp"

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_gguf_adapter {

using Catch::Contains;
namespace gguf = lora::gguf;
namespace peft = lora::peft;
namespace fs = std::filesystem;
using MatD = lora::Matrix<double>;
using namespace lora_test;

namespace {

const std::string adapters_dir = std::string(LORA_TEST_DATA_DIR) + "/gguf/adapters";

struct Case {
  const char* name;
  gguf::Architecture arch;
};
const Case cases[] = {{"llama_plain", gguf::Architecture::llama},
                      {"llama_rslora", gguf::Architecture::llama},
                      {"gpt2", gguf::Architecture::gpt2}};

gguf::ExportOptions options_for(gguf::Architecture arch, gguf::TensorType type = gguf::TensorType::F32) {
  gguf::ExportOptions o;
  o.architecture = arch;
  o.type = type;
  o.n_head = 4;  // the golden models: 4 heads, 2 key/value heads
  o.n_head_kv = 2;
  return o;
}

std::vector<std::uint8_t> export_bytes(const std::string& adapter_dir, const gguf::ExportOptions& options,
                                       gguf::ExportReport* report = nullptr) {
  auto adapter = peft::read_adapter<double>(adapter_dir);
  gguf::Writer writer;
  auto r = gguf::export_adapter(adapter, options, writer);
  if (report) *report = r;
  return writer.serialize();
}

/// The update llama.cpp applies for the pair under `base` (PyTorch orientation of the base tensor), and the
/// rounding bound of the stored values per element (their type's unit roundoff, as the golden script bounds it).
void update_of(const gguf::File& file, const std::string& base, MatD& update, MatD& bound, double unit_a,
               double unit_b) {
  const float alpha = file.get<float>("adapter.lora.alpha");
  const MatD A = file.matrix<double>(base + ".lora_a"), B = file.matrix<double>(base + ".lora_b");
  const double rank = static_cast<double>(B.cols());
  const double scale = alpha != 0 ? static_cast<double>(alpha) / rank : 1.0;
  const bool embd = base == "token_embd.weight";
  // linear: A (r, in), B (out, r): scale · B A. token_embd: A (V, r) rows fetched by token, B (d, r): scale · A Bᵀ.
  update = embd ? MatD(scale * A * B.transpose()) : MatD(scale * B * A);
  const MatD absA = A.cwiseAbs(), absB = B.cwiseAbs();
  const MatD mag = embd ? MatD(absA * absB.transpose()) : MatD(absB * absA);
  bound = std::abs(scale) * mag * (unit_a + unit_b + unit_a * unit_b + 2 * (rank + 2) * std::ldexp(1.0, -24));
}

}  // namespace

TEST_CASE("gguf export: the library writes the files ggml's reader checked, byte for byte", "[gguf][adapter]") {
  for (const auto& c : cases) {
    std::vector<std::pair<const char*, gguf::TensorType>> types = {{"f32", gguf::TensorType::F32},
                                                                   {"f16", gguf::TensorType::F16}};
    if (std::string(c.name) == "llama_plain") types.push_back({"q8_0", gguf::TensorType::Q8_0});
    for (const auto& [suffix, type] : types) {
      CAPTURE(c.name, suffix);
      const auto golden = read_bytes(adapters_dir + "/" + c.name + "." + suffix + ".gguf");
      REQUIRE(!golden.empty());
      CHECK(export_bytes(adapters_dir + "/" + c.name, options_for(c.arch, type)) == golden);
    }
  }
  // And ggml's report on them says every check passed.
  std::ifstream report(adapters_dir + "/read_by_ggml.txt");
  std::string line;
  int files = 0, failures = 0;
  while (std::getline(report, line)) {
    files += line.find(" checks passed") != std::string::npos;
    failures += line.rfind("FAIL", 0) == 0;
  }
  CHECK(files == 7);
  CHECK(failures == 0);
}

TEST_CASE("gguf export: llama.cpp's update equals PEFT's for every module (PyTorch oracle)", "[gguf][adapter]") {
  const double f32 = std::ldexp(1.0, -24), f16 = std::ldexp(1.0, -11);
  for (const auto& c : cases) {
    for (const auto& [type, unit] : {std::pair{gguf::TensorType::F32, f32}, std::pair{gguf::TensorType::F16, f16}}) {
      CAPTURE(c.name, gguf::tensor_type_name(type));
      auto file = gguf::File::from_bytes(export_bytes(adapters_dir + "/" + c.name, options_for(c.arch, type)));
      CHECK(file.get<std::string>("general.type") == "adapter");
      CHECK(file.get<std::string>("adapter.type") == "lora");
      CHECK(file.get<std::string>("general.architecture") == gguf::architecture_name(c.arch));
      auto expected = lora::safetensors::File::open(adapters_dir + "/" + c.name + "_expected.safetensors");
      REQUIRE(file.tensors().size() == 2 * expected.tensors().size());
      for (const auto& t : expected.tensors()) {
        CAPTURE(t.name);
        const MatD want = expected.matrix<double>(t.name);
        MatD got, bound;
        update_of(file, t.name, got, bound, unit, unit);
        REQUIRE(got.rows() == want.rows());
        REQUIRE(got.cols() == want.cols());
        // PyTorch computed `want` in float: its own rounding counts once more.
        const MatD excess = (got - want).cwiseAbs() - 2 * bound;
        CHECK(excess.maxCoeff() <= 0);
      }
    }
  }
}

TEST_CASE("gguf export: scalings fold into B against one alpha, exactly 1 for a plain adapter", "[gguf][adapter]") {
  gguf::ExportReport plain, rs;
  export_bytes(adapters_dir + "/llama_plain", options_for(gguf::Architecture::llama), &plain);
  export_bytes(adapters_dir + "/llama_rslora", options_for(gguf::Architecture::llama), &rs);
  CHECK(plain.alpha == 16.0f);
  for (const auto& m : plain.modules) CHECK(m.factor == 1.0);
  // rsLoRA, r 8, alpha 16: s = 16 / sqrt(8); llama.cpp applies 16 / 8: B x sqrt(8). Hand-computed from the config:
  // q_proj (rank 4) s = 16 / 2 = 8, applied 16 / 4 = 4: x 2; v_proj (alpha 4) s = 4 / sqrt(8), applied 2.
  std::map<std::string, double> want = {{"model.layers.0.self_attn.k_proj", std::sqrt(8.0)},
                                        {"model.layers.0.self_attn.q_proj", 2.0},
                                        {"model.layers.0.self_attn.v_proj", 4.0 / std::sqrt(8.0) / 2.0},
                                        {"model.layers.1.mlp.down_proj", (16.0 / std::sqrt(2.0)) / 8.0},
                                        {"model.embed_tokens", 32.0 / std::sqrt(8.0) / 2.0}};
  int seen = 0;
  for (const auto& m : rs.modules)
    if (auto it = want.find(m.module); it != want.end()) {
      CAPTURE(m.module);
      CHECK(m.factor == Approx(it->second).epsilon(1e-12));
      ++seen;
    }
  CHECK(seen == 5);
}

TEST_CASE("gguf rope_rows: llama.cpp's per-head interleave, by hand, and its inverse", "[gguf][adapter]") {
  MatD m(8, 2);
  for (int i = 0; i < 8; ++i) m.row(i) << i, 10 * i;
  // 2 heads of 4 rows: halves [0 1 | 2 3] interleave to 0 2 1 3.
  const MatD p = gguf::rope_rows(m, 2);
  const int order[] = {0, 2, 1, 3, 4, 6, 5, 7};
  for (int i = 0; i < 8; ++i) CHECK(p(i, 0) == order[i]);
  CHECK(gguf::rope_rows(p, 2, true) == m);
  CHECK_THROWS_AS(gguf::rope_rows(m, 3), lora::shape_error);
  CHECK_THROWS_WITH(gguf::rope_rows(MatD(6, 1), 2), Contains("6 rows are not whole pairs of halves of 2 heads"));
}

TEST_CASE("gguf names: Hugging Face module paths to GGUF tensors and back", "[gguf][adapter]") {
  using A = gguf::Architecture;
  const std::vector<std::pair<std::string, std::string>> llama = {
      {"model.embed_tokens", "token_embd.weight"},
      {"model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"},
      {"model.layers.12.self_attn.k_proj", "blk.12.attn_k.weight"},
      {"model.layers.3.self_attn.v_proj", "blk.3.attn_v.weight"},
      {"model.layers.3.self_attn.o_proj", "blk.3.attn_output.weight"},
      {"model.layers.31.mlp.gate_proj", "blk.31.ffn_gate.weight"},
      {"model.layers.31.mlp.up_proj", "blk.31.ffn_up.weight"},
      {"model.layers.31.mlp.down_proj", "blk.31.ffn_down.weight"},
      {"lm_head", "output.weight"}};
  for (const auto& [path, name] : llama) {
    CAPTURE(path);
    auto t = gguf::tensor_target(A::llama, path);
    REQUIRE(t);
    CHECK(t->base == name);
    CHECK(gguf::module_path(A::llama, name) == path);
  }
  const std::vector<std::pair<std::string, std::string>> gpt2 = {
      {"transformer.wte", "token_embd.weight"},
      {"transformer.h.0.attn.c_attn", "blk.0.attn_qkv.weight"},
      {"transformer.h.11.attn.c_proj", "blk.11.attn_output.weight"},
      {"transformer.h.5.mlp.c_fc", "blk.5.ffn_up.weight"},
      {"transformer.h.5.mlp.c_proj", "blk.5.ffn_down.weight"}};
  for (const auto& [path, name] : gpt2) {
    CAPTURE(path);
    auto t = gguf::tensor_target(A::gpt2, path);
    REQUIRE(t);
    CHECK(t->base == name);
    CHECK(gguf::module_path(A::gpt2, name) == path);
  }
  // Without the *ForCausalLM body prefix (a bare LlamaModel / GPT2Model was adapted).
  CHECK(gguf::tensor_target(A::llama, "layers.2.self_attn.q_proj")->base == "blk.2.attn_q.weight");
  CHECK(gguf::tensor_target(A::gpt2, "h.2.attn.c_attn")->base == "blk.2.attn_qkv.weight");
  CHECK(gguf::tensor_target(A::llama, "model.layers.0.self_attn.q_proj")->rows == gguf::RowOrder::rope_q);
  CHECK(gguf::tensor_target(A::llama, "model.layers.0.self_attn.k_proj")->rows == gguf::RowOrder::rope_k);
  CHECK(gguf::tensor_target(A::llama, "model.embed_tokens")->embedding);
  for (const char* bad : {"model.layers.01.self_attn.q_proj", "model.layers.x.self_attn.q_proj",
                          "model.layers.0.self_attn.q_proj.base_layer", "model.layers.0.self_attn", "q_proj",
                          "model.layers.0.attn.c_attn", "model.layers.1234567890.self_attn.q_proj", ""})
    CHECK_FALSE(gguf::tensor_target(A::llama, bad));
  CHECK_FALSE(gguf::tensor_target(A::gpt2, "transformer.wpe"));  // llama.cpp adapts no position table
  CHECK_FALSE(gguf::tensor_target(A::gpt2, "transformer.h.0.self_attn.q_proj"));
  CHECK_FALSE(gguf::module_path(A::llama, "blk.0.attn_qkv.weight"));
  CHECK_FALSE(gguf::module_path(A::gpt2, "blk.0.attn_q.weight.lora_a"));
}

TEST_CASE("gguf import: the exported file comes back as the same PEFT update", "[gguf][adapter]") {
  for (const auto& c : cases) {
    CAPTURE(c.name);
    const auto original = peft::read_adapter<double>(adapters_dir + "/" + c.name);
    auto file = gguf::File::from_bytes(export_bytes(adapters_dir + "/" + c.name, options_for(c.arch)));
    gguf::ImportOptions io;
    io.n_head = 4;
    io.n_head_kv = 2;
    const auto imported = gguf::import_adapter<double>(file, io);
    REQUIRE(imported.modules.size() == original.modules.size());
    CHECK(imported.config.fan_in_fan_out == (c.arch == gguf::Architecture::gpt2));
    for (std::size_t i = 0; i < original.modules.size(); ++i) {
      const auto& o = original.modules[i];
      const auto& m = imported.modules[i];
      CAPTURE(o.path);
      CHECK(m.path == o.path);
      CHECK(m.embedding == o.embedding);
      CHECK(m.r == o.r);
      // The config's patterns give each module the rank and scaling import_adapter set.
      CHECK(imported.config.rank_for(m.path) == m.r);
      CHECK(imported.config.scaling_for(m.path) == Approx(m.scaling).epsilon(1e-12));
      const MatD want = o.scaling * o.B * o.A, got = m.scaling * m.B * m.A;
      CHECK((got - want).cwiseAbs().maxCoeff() <= 1e-6 * want.cwiseAbs().maxCoeff());
    }
    // Saved as a PEFT folder and read back by the library's PEFT reader: the same modules and scalings.
    const auto dir = scratch_dir(std::string("gguf-import-") + c.name);
    peft::save_adapter(dir.string(), imported);
    const auto again = peft::read_adapter<double>(dir.string());
    REQUIRE(again.modules.size() == imported.modules.size());
    for (std::size_t i = 0; i < again.modules.size(); ++i) {
      CHECK(again.modules[i].path == imported.modules[i].path);
      CHECK(again.modules[i].scaling == Approx(imported.modules[i].scaling).epsilon(1e-12));
      CHECK((again.modules[i].A - imported.modules[i].A).cwiseAbs().maxCoeff() <= 1e-7);
      CHECK((again.modules[i].B - imported.modules[i].B).cwiseAbs().maxCoeff() <= 1e-7);
    }
    fs::remove_all(dir);
  }
}

TEST_CASE("gguf import: into MultiLoRALinear layers by module name", "[gguf][adapter]") {
  const auto original = peft::read_adapter<double>(adapters_dir + "/gpt2");
  auto file = gguf::File::from_bytes(export_bytes(adapters_dir + "/gpt2", options_for(gguf::Architecture::gpt2)));
  auto imported = gguf::import_adapter<double>(file);
  // The embedding has no place in linear layers: drop it, load the rest as adapter "from_gguf".
  imported.modules.erase(
      std::remove_if(imported.modules.begin(), imported.modules.end(), [](const auto& m) { return m.embedding; }),
      imported.modules.end());
  std::map<std::string, std::unique_ptr<lora::MultiLoRALinear<double>>> layers;
  std::map<std::string, lora::MultiLoRALinear<double>*> model;
  std::mt19937 rng(7);
  std::normal_distribution<double> normal;
  for (const auto& m : imported.modules) {
    MatD w = MatD::NullaryExpr(m.B.rows(), m.A.cols(), [&] { return normal(rng); });
    layers[m.path] = std::make_unique<lora::MultiLoRALinear<double>>(w);
    model[m.path] = layers[m.path].get();
  }
  peft::load_adapter(imported, "from_gguf", model);
  for (const auto& [path, layer] : model) {
    CAPTURE(path);
    layer->set_adapter("from_gguf");
    const MatD x = MatD::NullaryExpr(3, layer->in_features(), [&] { return normal(rng); });
    const auto* o = original.find(path);
    REQUIRE(o != nullptr);
    const MatD W = layer->frozen_weight().to_dense();
    const MatD want = x * (W + o->scaling * o->B * o->A).transpose();
    CHECK((layer->forward(x) - want).cwiseAbs().maxCoeff() <= 1e-9 * want.cwiseAbs().maxCoeff());
  }
}

// ---- bad input --------------------------------------------------------------------------

TEST_CASE("gguf export refuses: unknown architecture, unmapped modules (all listed), nothing written",
          "[gguf][adapter][untrusted]") {
  CHECK_THROWS_WITH(gguf::parse_architecture("qwen2"),
                    Contains("unknown architecture \"qwen2\"") && Contains("known are gpt2, llama"));
  const auto dir = scratch_dir("gguf-export-refusals");
  const auto out = (dir / "out.gguf").string();
  write_text(out, "keep me");
  // The GPT-2 adapter exported as LLaMA: none of its modules has a LLaMA tensor.
  const std::string e =
      error_of([&] { gguf::export_adapter_file(adapters_dir + "/gpt2", out, options_for(gguf::Architecture::llama)); });
  CHECK_THAT(e, Contains("9 module(s) with no GGUF tensor in llama") && Contains("transformer.h.0.attn.c_attn") &&
                    Contains("transformer.h.1.mlp.c_proj") && Contains("transformer.wte") &&
                    Contains("known: embed_tokens, layers.N.self_attn.q_proj"));
  CHECK(read_bytes(out) == std::vector<std::uint8_t>{'k', 'e', 'e', 'p', ' ', 'm', 'e'});
  CHECK(count_files(dir) == 1);  // no temporary left either
  // q_proj and k_proj without the head counts.
  auto no_heads = options_for(gguf::Architecture::llama);
  no_heads.n_head = 0;
  const std::string h = error_of([&] { gguf::export_adapter_file(adapters_dir + "/llama_plain", out, no_heads); });
  CHECK_THAT(h, Contains("model.layers.0.self_attn.q_proj: llama.cpp reorders q_proj rows") &&
                    Contains("model.layers.1.self_attn.k_proj") && Contains("num_attention_heads"));
  // Head counts that do not divide the rows.
  auto bad_heads = options_for(gguf::Architecture::llama);
  bad_heads.n_head = 5;
  bad_heads.n_head_kv = 0;
  CHECK_THAT(error_of([&] { gguf::export_adapter_file(adapters_dir + "/llama_plain", out, bad_heads); }),
             Contains("64 output rows are not 5 heads of an even size"));
  auto q4 = options_for(gguf::Architecture::llama);
  q4.type = gguf::TensorType::Q4_0;
  CHECK_THAT(error_of([&] { gguf::export_adapter_file(adapters_dir + "/llama_plain", out, q4); }),
             Contains("type must be f32, f16, bf16 or q8_0, got q4_0"));
  CHECK(read_bytes(out) == std::vector<std::uint8_t>{'k', 'e', 'e', 'p', ' ', 'm', 'e'});
  CHECK(count_files(dir) == 1);
  fs::remove_all(dir);
}

TEST_CASE("gguf export refuses DoRA with the reason, biases, other tensors, values the type cannot hold",
          "[gguf][adapter][untrusted]") {
  const auto dir = scratch_dir("gguf-export-dora");
  // A DoRA config: the PEFT reader refuses it; the exporter says why GGUF cannot carry it.
  fs::copy(adapters_dir + "/gpt2", dir / "dora");
  std::string config = lora::detail::read_small_file((dir / "dora" / "adapter_config.json").string(), 1 << 20, "c");
  const auto at = config.find("\"use_dora\": false");
  REQUIRE(at != std::string::npos);
  config.replace(at, 17, "\"use_dora\": true");
  write_text(dir / "dora" / "adapter_config.json", config);
  const std::string e = error_of([&] {
    gguf::export_adapter_file((dir / "dora").string(), (dir / "out.gguf").string(),
                              options_for(gguf::Architecture::gpt2));
  });
  CHECK_THAT(e, Contains("a DoRA adapter") && Contains("is not a low-rank update B A") && Contains("use_dora"));
  CHECK_FALSE(fs::exists(dir / "out.gguf"));

  auto adapter = peft::read_adapter<double>(adapters_dir + "/gpt2");
  adapter.modules[0].bias = MatD::Ones(1, adapter.modules[0].B.rows());
  lora::safetensors::TensorInfo head;
  head.name = "base_model.model.score.weight";
  adapter.other_tensors.push_back(head);
  adapter.modules[1].B(0, 0) = std::nan("");
  gguf::Writer writer;
  writer.set("kept", std::uint32_t{1});
  const std::string p = error_of([&] { gguf::export_adapter(adapter, options_for(gguf::Architecture::gpt2), writer); });
  CHECK_THAT(p, Contains("3 problem(s)") &&
                    Contains("transformer.h.0.attn.c_attn.bias: the adapter trained the bias") &&
                    Contains("base_model.model.score.weight: not a LoRA matrix") &&
                    Contains("transformer.h.0.attn.c_proj: lora_A or lora_B holds non-finite values"));
  CHECK(writer.metadata().size() == 1);  // left as it was
  CHECK(writer.size() == 0);

  // B scaled past f16's range.
  auto big = peft::read_adapter<double>(adapters_dir + "/gpt2");
  big.modules[2].B *= 1e6;
  CHECK_THAT(error_of([&] {
               gguf::export_adapter(big, options_for(gguf::Architecture::gpt2, gguf::TensorType::F16), writer);
             }),
             Contains("transformer.h.0.mlp.c_fc lora_b: a value") && Contains("overflows f16"));
  CHECK(writer.size() == 0);
  fs::remove_all(dir);
}

TEST_CASE("gguf import refuses files llama.cpp would refuse or that are no LoRA adapter",
          "[gguf][adapter][untrusted]") {
  auto base_writer = [] {
    gguf::Writer w;
    w.set("general.architecture", "llama");
    w.set("general.type", "adapter");
    w.set("adapter.type", "lora");
    w.set("adapter.lora.alpha", 16.0f);
    return w;
  };
  auto import_error = [](gguf::Writer w, gguf::ImportOptions o = {}) {
    return error_of([&] { gguf::import_adapter<double>(gguf::File::from_bytes(w.serialize(), "x.gguf"), o); });
  };
  const MatD a = MatD::Ones(4, 64), b = MatD::Ones(64, 4);
  {
    auto w = base_writer();
    w.set("general.type", "model");
    CHECK_THAT(import_error(w), Contains("x.gguf: general.type is \"model\", expected \"adapter\""));
  }
  {
    gguf::Writer w;
    w.set("general.type", "adapter");
    CHECK_THAT(import_error(w), Contains("no key \"adapter.type\": not a GGUF LoRA adapter"));
  }
  {
    auto w = base_writer();
    w.set("general.architecture", "qwen2");
    CHECK_THAT(import_error(w), Contains("general.architecture \"qwen2\"") && Contains("(gpt2, llama)"));
  }
  {
    auto w = base_writer();
    w.set("adapter.lora.alpha", 16.0);
    CHECK_THAT(import_error(w), Contains("adapter.lora.alpha is f64, expected f32"));
  }
  {
    auto w = base_writer();
    w.add("blk.0.attn_v.weight.lora_a", a);    // no lora_b
    w.add("blk.0.attn_qkv.weight.lora_a", a);  // no LLaMA tensor
    w.add("blk.0.attn_qkv.weight.lora_b", b, gguf::TensorType::F32, {4, 64});
    w.add("blk.0.attn_norm.weight", MatD::Ones(1, 64));  // no LoRA tensor
    w.add("blk.0.ffn_up.weight.lora_a", a);              // ranks disagree
    w.add("blk.0.ffn_up.weight.lora_b", MatD::Ones(64, 3));
    w.add("blk.0.attn_q.weight.lora_a", a);  // rotary rows, no n_head
    w.add("blk.0.attn_q.weight.lora_b", b);
    const std::string e = import_error(w);
    CHECK_THAT(e, Contains("5 problem(s)") && Contains("blk.0.attn_v.weight: has .lora_a but no .lora_b") &&
                      Contains("blk.0.attn_qkv.weight: no llama module adapts this tensor") &&
                      Contains("blk.0.attn_norm.weight: not a .lora_a / .lora_b tensor") &&
                      Contains("blk.0.ffn_up.weight: lora_a ne [64, 4] and lora_b ne [3, 64]") &&
                      Contains("blk.0.attn_q.weight: llama.cpp keeps its rows in rotary order"));
  }
  {
    auto w = base_writer();
    w.add("blk.0.attn_v.weight.lora_a", a, gguf::TensorType::F32, {64, 2, 2});
    w.add("blk.0.attn_v.weight.lora_b", b);
    CHECK_THAT(import_error(w), Contains("must both be 2-D"));
  }
  {
    auto w = base_writer();
    CHECK_THAT(import_error(w), Contains("no .lora_a / .lora_b pair among its 0 tensor(s)"));
  }
}

}  // namespace unit_gguf_adapter
