// select_targets: which modules of a checkpoint a PEFT LoRA config adapts.
// The key lists below are written by hand from the transformers model
// classes (GPT-2, BERT, DistilBERT, LLaMA, Mixtral). The expected selections
// come from PEFT itself: tests/golden/make_targets_golden.py runs PEFT's own
// check_target_module_exists (read from the PEFT source, commit recorded in
// tests/data/targets/targets_golden.json) on the same names; the hand-written
// cases further down cite the PEFT lines they follow
// (src/peft/tuners/tuners_utils.py at that commit).
#include <catch2/catch.hpp>

#include <lora/targets.hpp>

#include "test_files.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_targets {

using Catch::Contains;
using lora::peft::AdapterConfig;
using lora::peft::select_targets;

namespace {

struct Key {
  std::string name;
  std::vector<std::uint64_t> shape;
};

// Shapes are small stand-ins; only the number of dimensions matters here.
const std::vector<std::uint64_t> mat = {4, 6}, vec = {4};

std::vector<Key> gpt2_keys(const std::string& p, int layers) {
  std::vector<Key> k = {{p + "wte.weight", mat}, {p + "wpe.weight", mat}};
  for (int i = 0; i < layers; ++i) {
    const std::string h = p + "h." + std::to_string(i) + ".";
    k.insert(k.end(), {{h + "ln_1.weight", vec},
                       {h + "ln_1.bias", vec},
                       {h + "attn.bias", {1, 1, 2, 2}},  // the causal mask buffer older checkpoints carry
                       {h + "attn.c_attn.weight", mat},
                       {h + "attn.c_attn.bias", vec},
                       {h + "attn.c_proj.weight", mat},
                       {h + "attn.c_proj.bias", vec},
                       {h + "ln_2.weight", vec},
                       {h + "ln_2.bias", vec},
                       {h + "mlp.c_fc.weight", mat},
                       {h + "mlp.c_fc.bias", vec},
                       {h + "mlp.c_proj.weight", mat},
                       {h + "mlp.c_proj.bias", vec}});
  }
  k.insert(k.end(), {{p + "ln_f.weight", vec}, {p + "ln_f.bias", vec}});
  return k;
}

std::vector<Key> bert_keys(int layers) {  // BertForPreTraining
  std::vector<Key> k = {{"bert.embeddings.word_embeddings.weight", mat},
                        {"bert.embeddings.position_embeddings.weight", mat},
                        {"bert.embeddings.token_type_embeddings.weight", mat},
                        {"bert.embeddings.LayerNorm.weight", vec},
                        {"bert.embeddings.LayerNorm.bias", vec}};
  for (int i = 0; i < layers; ++i) {
    const std::string l = "bert.encoder.layer." + std::to_string(i) + ".";
    for (const char* m :
         {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
          "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"}) {
      const bool norm = std::string(m).find("LayerNorm") != std::string::npos;
      k.push_back({l + m + ".weight", norm ? vec : mat});
      k.push_back({l + m + ".bias", vec});
    }
  }
  k.insert(k.end(), {{"bert.pooler.dense.weight", mat},
                     {"bert.pooler.dense.bias", vec},
                     {"cls.predictions.bias", vec},
                     {"cls.predictions.transform.dense.weight", mat},
                     {"cls.predictions.transform.dense.bias", vec},
                     {"cls.predictions.transform.LayerNorm.weight", vec},
                     {"cls.predictions.transform.LayerNorm.bias", vec},
                     {"cls.predictions.decoder.weight", mat},
                     {"cls.seq_relationship.weight", mat},
                     {"cls.seq_relationship.bias", vec}});
  return k;
}

std::vector<Key> distilbert_keys(int layers) {  // DistilBertForSequenceClassification
  std::vector<Key> k = {{"distilbert.embeddings.word_embeddings.weight", mat},
                        {"distilbert.embeddings.position_embeddings.weight", mat},
                        {"distilbert.embeddings.LayerNorm.weight", vec},
                        {"distilbert.embeddings.LayerNorm.bias", vec}};
  for (int i = 0; i < layers; ++i) {
    const std::string l = "distilbert.transformer.layer." + std::to_string(i) + ".";
    for (const char* m : {"attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "sa_layer_norm",
                          "ffn.lin1", "ffn.lin2", "output_layer_norm"}) {
      const bool norm = std::string(m).find("norm") != std::string::npos;
      k.push_back({l + m + ".weight", norm ? vec : mat});
      k.push_back({l + m + ".bias", vec});
    }
  }
  k.insert(k.end(), {{"pre_classifier.weight", mat},
                     {"pre_classifier.bias", vec},
                     {"classifier.weight", mat},
                     {"classifier.bias", vec}});
  return k;
}

std::vector<Key> llama_keys(int layers) {  // LlamaForCausalLM
  std::vector<Key> k = {{"model.embed_tokens.weight", mat}};
  for (int i = 0; i < layers; ++i) {
    const std::string l = "model.layers." + std::to_string(i) + ".";
    for (const char* m : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})
      k.push_back({l + m + ".weight", mat});
    k.insert(k.end(), {{l + "self_attn.rotary_emb.inv_freq", vec},
                       {l + "input_layernorm.weight", vec},
                       {l + "post_attention_layernorm.weight", vec}});
  }
  k.insert(k.end(), {{"model.norm.weight", vec}, {"lm_head.weight", mat}});
  return k;
}

std::vector<Key> mixtral_keys(int layers, int experts) {  // MixtralForCausalLM
  std::vector<Key> k = {{"model.embed_tokens.weight", mat}};
  for (int i = 0; i < layers; ++i) {
    const std::string l = "model.layers." + std::to_string(i) + ".";
    for (const char* m :
         {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "block_sparse_moe.gate"})
      k.push_back({l + m + ".weight", mat});
    for (int e = 0; e < experts; ++e)
      for (const char* w : {"w1", "w2", "w3"})
        k.push_back({l + "block_sparse_moe.experts." + std::to_string(e) + "." + w + ".weight", mat});
    k.insert(k.end(), {{l + "input_layernorm.weight", vec}, {l + "post_attention_layernorm.weight", vec}});
  }
  k.insert(k.end(), {{"model.norm.weight", vec}, {"lm_head.weight", mat}});
  return k;
}

const std::map<std::string, std::vector<Key>>& checkpoints() {
  static const std::map<std::string, std::vector<Key>> c = {
      {"gpt2", gpt2_keys("", 2)}, {"gpt2_transformer", gpt2_keys("transformer.", 2)},
      {"bert", bert_keys(2)},     {"distilbert_seq_cls", distilbert_keys(2)},
      {"llama", llama_keys(12)},  {"mixtral", mixtral_keys(2, 2)}};
  return c;
}

// A safetensors file image holding `keys` (F16 zeros of each shape).
lora::safetensors::File file_of(const std::vector<Key>& keys) {
  lora::safetensors::Writer w;
  for (const auto& k : keys) {
    std::uint64_t n = 1;
    for (auto d : k.shape) n *= d;
    w.add(k.name, lora::Matrix<float>::Zero(1, static_cast<lora::Index>(n)), lora::safetensors::Dtype::F16, k.shape);
  }
  return lora::safetensors::File::from_bytes(w.serialize());
}

const nlohmann::json& golden() {
  static const nlohmann::json j = [] {
    std::ifstream in(std::string(LORA_TEST_DATA_DIR) + "/targets/targets_golden.json", std::ios::binary);
    REQUIRE(in.good());
    return nlohmann::json::parse(in);
  }();
  return j;
}

AdapterConfig config_of(nlohmann::json j) {
  j["peft_type"] = "LORA";
  return AdapterConfig::parse(j.dump());
}

std::vector<std::string> modules_of(const std::string& arch) {
  return golden()["architectures"][arch]["modules"].get<std::vector<std::string>>();
}

std::string error_of(const std::vector<std::string>& modules, const AdapterConfig& c,
                     const lora::peft::TargetOptions& o = {}) {
  try {
    select_targets(modules, c, o);
  } catch (const lora::config_error& e) {
    return e.what();
  }
  return "";
}

using Names = std::vector<std::string>;

}  // namespace

TEST_CASE("targets: a checkpoint's modules are its 2-D .weight tensors, in file order", "[targets]") {
  for (const auto& [arch, keys] : checkpoints()) {
    INFO(arch);
    const auto file = file_of(keys);
    const Names modules = lora::peft::checkpoint_modules(file);
    // The same names as the golden file's hand-written list (from the model classes), in the file's order.
    Names expected = modules_of(arch);
    std::sort(expected.begin(), expected.end());
    Names sorted = modules;
    std::sort(sorted.begin(), sorted.end());
    CHECK(sorted == expected);
    Names in_file_order;
    for (const auto& t : file.tensors())
      if (std::find(modules.begin(), modules.end(), t.name.substr(0, t.name.rfind('.'))) != modules.end() &&
          t.name.size() > 7 && t.name.compare(t.name.size() - 7, 7, ".weight") == 0)
        in_file_order.push_back(t.name.substr(0, t.name.size() - 7));
    CHECK(modules == in_file_order);
  }
  // By hand: GPT-2's layer norms (1-D), biases and the 4-D attn.bias buffer are not modules.
  CHECK(lora::peft::checkpoint_modules(file_of(gpt2_keys("", 1))) ==
        Names{"h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj", "wpe", "wte"});
  // A ".weight" key that is the whole name is no module; "x.weights" is not ".weight".
  CHECK(lora::peft::checkpoint_modules(file_of({{"weight", mat}, {"x.weights", mat}, {"y.weight", mat}})) ==
        Names{"y"});

  const auto dir = lora_test::scratch_dir("targets");
  lora::safetensors::Writer w;
  w.add("model.layers.0.self_attn.q_proj.weight", lora::Matrix<float>::Zero(2, 3));
  w.add("model.norm.weight", lora::Matrix<float>::Zero(1, 3), lora::safetensors::Dtype::F32, {3});
  w.save((dir / "model.safetensors").string());
  CHECK(lora::peft::checkpoint_modules((dir / "model.safetensors").string()) ==
        Names{"model.layers.0.self_attn.q_proj"});
}

TEST_CASE("targets: every golden case selects what PEFT's check_target_module_exists selects", "[targets]") {
  const auto& g = golden();
  REQUIRE(g["cases"].size() >= 100);
  std::size_t selected = 0, refused = 0;
  for (const auto& c : g["cases"]) {
    const std::string arch = c["arch"];
    INFO(arch << " " << c["config"].dump());
    const AdapterConfig config = config_of(c["config"]);
    const auto& e = c["expected"];
    // The golden's own module order (the model's), and the order a checkpoint file has.
    const Names modules = modules_of(arch);
    const Names file_modules = lora::peft::checkpoint_modules(file_of(checkpoints().at(arch)));
    if (e.contains("selected")) {
      const Names want = e["selected"].get<Names>();
      CHECK(select_targets(modules, config) == want);
      Names want_in_file_order;
      for (const auto& m : file_modules)
        if (std::find(want.begin(), want.end(), m) != want.end()) want_in_file_order.push_back(m);
      CHECK(select_targets(file_of(checkpoints().at(arch)), config) == want_in_file_order);
      ++selected;
      continue;
    }
    const std::string message = error_of(modules, config);
    REQUIRE_FALSE(message.empty());
    ++refused;
    if (e.contains("config_error")) {  // LoraConfig.__post_init__
      const std::string why = e["config_error"];
      CHECK_THAT(message, Contains(why.find("without") != std::string::npos ? "without layers_to_transform"
                                                                            : "cannot be used when target_modules"));
      continue;
    }
    // inject_adapter's NoMatchingPeftModuleError: the same branch, the patterns, and module names.
    const std::string why = e["none"];
    const std::map<std::string, std::string> phrase = {{"all excluded", "every module is excluded"},
                                                       {"no target_modules", "target_modules is empty or missing"},
                                                       {"not found", "it matches none of them"},
                                                       {"unmatched and excluded", "are excluded"}};
    CHECK_THAT(message, Contains(phrase.at(why)));
    const auto& tm = c["config"]["target_modules"];
    if (tm.is_string()) CHECK_THAT(message, Contains(tm.get<std::string>()));
    if (tm.is_array())
      for (const auto& t : tm) CHECK_THAT(message, Contains("\"" + t.get<std::string>() + "\""));
    CHECK_THAT(message, Contains("its modules include [\"" + modules.front() + "\""));
  }
  CHECK(selected > 60);
  CHECK(refused > 15);
}

// The rules by hand, each with the PEFT line it follows.

TEST_CASE("targets: a list entry is an exact name or a dot-suffix", "[targets]") {
  const Names llama = modules_of("llama");
  // tuners_utils.py 2328-2332: `key in target_modules`, else key.endswith(f".{target_key}").
  const Names q = select_targets(llama, config_of({{"target_modules", {"q_proj"}}}));
  REQUIRE(q.size() == 12);
  CHECK(q.front() == "model.layers.0.self_attn.q_proj");
  CHECK(q.back() == "model.layers.11.self_attn.q_proj");
  CHECK(select_targets(llama, config_of({{"target_modules", {"lm_head"}}})) == Names{"lm_head"});
  // "proj" is no "."-suffix of "q_proj"; "s.1.self_attn.q_proj" is not one of "layers.1.self_attn.q_proj".
  CHECK_THROWS_AS(select_targets(llama, config_of({{"target_modules", {"proj"}}})), lora::config_error);
  CHECK_THROWS_AS(select_targets(llama, config_of({{"target_modules", {"s.1.self_attn.q_proj"}}})), lora::config_error);
  CHECK(select_targets(llama, config_of({{"target_modules", {"layers.1.self_attn.q_proj"}}})) ==
        Names{"model.layers.1.self_attn.q_proj"});
  // GPT-2: the hub checkpoint has no "transformer." prefix; the suffix rule takes both.
  CHECK(select_targets(modules_of("gpt2"), config_of({{"target_modules", {"c_attn"}}})) ==
        Names{"h.0.attn.c_attn", "h.1.attn.c_attn"});
  CHECK(select_targets(modules_of("gpt2_transformer"), config_of({{"target_modules", {"c_attn"}}})) ==
        Names{"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"});
}

TEST_CASE("targets: one string is a regex over the whole name", "[targets]") {
  const Names llama = modules_of("llama");
  // utils/other.py match_target_against_key: re.fullmatch(target_pattern, key).
  const Names qv = select_targets(llama, config_of({{"target_modules", R"(.*\.(q|v)_proj)"}}));
  CHECK(qv.size() == 24);
  // "q_proj" as a string must match a whole name: none is.
  CHECK_THAT(error_of(llama, config_of({{"target_modules", "q_proj"}})), Contains("\"q_proj\""));
  // A prefix of the name is not enough (fullmatch, not match).
  CHECK_THROWS_AS(select_targets(llama, config_of({{"target_modules", R"(model\.layers\.0)"}})), lora::config_error);
  CHECK(select_targets(llama, config_of({{"target_modules", R"(model\.layers\.0\.self_attn\.[qk]_proj)"}})) ==
        Names{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"});
  // An alternation at the top covers the whole name in each branch.
  CHECK(select_targets(llama, config_of({{"target_modules", "lm_head|model.embed_tokens"}})) ==
        Names{"model.embed_tokens", "lm_head"});
  // Outside the linear-time subset, or not Python: a config_error that names target_modules.
  CHECK_THAT(error_of(llama, config_of({{"target_modules", R"((q)_proj\1)"}})), Contains("target_modules"));
  CHECK_THAT(error_of(llama, config_of({{"target_modules", R"(.*(?=q_proj))"}})), Contains("lookahead"));
  CHECK_THAT(error_of(llama, config_of({{"target_modules", "(q_proj"}})), Contains("missing ), unterminated"));
  // Parsed by itself, as re.fullmatch parses it: ")|(" is unbalanced even though "(?:" + it + ")" would not be.
  CHECK_THAT(error_of(llama, config_of({{"target_modules", "q_proj)|(v_proj"}})), Contains("unbalanced"));
}

TEST_CASE("targets: exclude_modules and modules_to_save", "[targets]") {
  const Names llama = modules_of("llama");
  // tuners_utils.py 2306-2312: a string is re.fullmatch, a list exact or dot-suffix, checked first.
  const Names some = select_targets(llama, config_of({{"target_modules", {"q_proj", "v_proj"}},
                                                      {"exclude_modules", R"(.*\.layers\.([2-9]|1[01])\..*)"}}));
  CHECK(some == Names{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                      "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"});
  CHECK(select_targets(llama, config_of({{"target_modules", {"q_proj", "v_proj"}}, {"exclude_modules", {"q_proj"}}}))
            .size() == 12);
  // A string "q_proj" excludes only a module named exactly "q_proj": here none.
  CHECK(select_targets(llama, config_of({{"target_modules", {"q_proj"}}, {"exclude_modules", "q_proj"}})).size() == 12);
  // 2317-2320: modules_to_save: re.match(rf"(^|.*\.){m}($|\..*)", key) never gets an adapter.
  CHECK(select_targets(llama, config_of({{"target_modules", {"q_proj", "lm_head"}}, {"modules_to_save", {"lm_head"}}}))
            .size() == 12);
  // "layers" is a whole component of every layer's name: all of them are skipped.
  CHECK_THAT(error_of(llama, config_of({{"target_modules", {"q_proj"}}, {"modules_to_save", {"layers"}}})),
             Contains("are excluded"));
  // "classifier" does not take "pre_classifier" ((^|.*\.) before it).
  const Names distil = modules_of("distilbert_seq_cls");
  const Names heads = select_targets(
      distil, config_of({{"target_modules", {"pre_classifier", "classifier"}}, {"modules_to_save", {"classifier"}}}));
  CHECK(heads == Names{"pre_classifier"});
  // 1025-1029: everything excluded.
  CHECK_THAT(error_of(llama, config_of({{"target_modules", {"q_proj"}}, {"exclude_modules", ".*"}})),
             Contains("every module is excluded"));
  // Types: what exclude_modules must be is named.
  CHECK_THAT(error_of(llama, config_of({{"target_modules", {"q_proj"}}, {"exclude_modules", 3}})),
             Contains("exclude_modules must be a string or a list of strings, got 3"));
  CHECK_THAT(error_of(llama, config_of({{"target_modules", {"q_proj"}}, {"exclude_modules", {"a", 1}}})),
             Contains("exclude_modules must be a string or a list of strings"));
  CHECK_THAT(error_of(llama, config_of({{"target_modules", {"q_proj"}}, {"exclude_modules", "(?i)q_proj"}})),
             Contains("exclude_modules"));
}

TEST_CASE("targets: layers_to_transform picks the layer index with PEFT's regexes", "[targets]") {
  const Names llama = modules_of("llama");
  // 2334-2364: with no layers_pattern, re.match(r".*?\.[^.]*\.(\d+)\.", key): "model.layers.10." is layer 10.
  CHECK(select_targets(llama, config_of({{"target_modules", {"q_proj"}}, {"layers_to_transform", {10, 0}}})) ==
        Names{"model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj"});
  CHECK(select_targets(llama, config_of({{"target_modules", {"q_proj"}}, {"layers_to_transform", 1}})) ==
        Names{"model.layers.1.self_attn.q_proj"});
  // With layers_pattern: rf".*?\.{pattern}\.(\d+)\."; "model.layers" needs a '.' before "model": none.
  CHECK(select_targets(
            llama,
            config_of({{"target_modules", {"q_proj"}}, {"layers_to_transform", {11}}, {"layers_pattern", "layers"}})) ==
        Names{"model.layers.11.self_attn.q_proj"});
  CHECK_THAT(error_of(llama, config_of({{"target_modules", {"q_proj"}},
                                        {"layers_to_transform", {1}},
                                        {"layers_pattern", "model.layers"}})),
             Contains("it matches none of them"));
  // A name given exactly is not filtered by layer (2328: `key in target_modules` comes first).
  CHECK(select_targets(llama, config_of({{"target_modules", {"model.layers.5.self_attn.q_proj", "v_proj"}},
                                         {"layers_to_transform", {0}}})) ==
        Names{"model.layers.0.self_attn.v_proj", "model.layers.5.self_attn.q_proj"});
  // GPT-2 without "transformer.": "h.0.attn.c_attn" has no '.' before "h", so no layer index, nothing chosen.
  CHECK_THROWS_AS(
      select_targets(modules_of("gpt2"), config_of({{"target_modules", {"c_attn"}}, {"layers_to_transform", {0}}})),
      lora::config_error);
  // MoE: the lazy .*? takes the layer, not the expert.
  CHECK(select_targets(modules_of("mixtral"), config_of({{"target_modules", {"w2"}}, {"layers_to_transform", {0}}})) ==
        Names{"model.layers.0.block_sparse_moe.experts.0.w2", "model.layers.0.block_sparse_moe.experts.1.w2"});
  // Leading zeros: int("01") == 1.
  CHECK(select_targets(Names{"m.layers.01.q", "m.layers.1.q", "m.layers.10.q"},
                       config_of({{"target_modules", {"q"}}, {"layers_to_transform", {1}}})) ==
        Names{"m.layers.01.q", "m.layers.1.q"});

  // LoraConfig.__post_init__ (lora/config.py 1019-1029).
  CHECK_THAT(error_of(llama, config_of({{"target_modules", ".*q_proj"}, {"layers_to_transform", {0}}})),
             Contains("cannot be used when target_modules is a string"));
  CHECK_THAT(error_of(llama, config_of({{"target_modules", "all-linear"}, {"layers_pattern", "layers"}})),
             Contains("cannot be used when target_modules is a string"));
  CHECK_THAT(error_of(llama, config_of({{"target_modules", {"q_proj"}}, {"layers_pattern", "layers"}})),
             Contains("without layers_to_transform"));
  // Types.
  for (const nlohmann::json& bad :
       {nlohmann::json("1"), nlohmann::json({1.5}), nlohmann::json(true), nlohmann::json({{"a", 1}})})
    CHECK_THAT(error_of(llama, config_of({{"target_modules", {"q_proj"}}, {"layers_to_transform", bad}})),
               Contains("layers_to_transform must be an integer or a list of integers, got " + bad.dump()));
  CHECK_THAT(
      error_of(llama, config_of({{"target_modules", {"q_proj"}}, {"layers_to_transform", {0}}, {"layers_pattern", 7}})),
      Contains("layers_pattern must be a string or a list of strings, got 7"));
  // A '|' at the top would split PEFT's regex (and PEFT then calls int(None)): refused, grouped is fine.
  CHECK_THAT(
      error_of(
          llama,
          config_of({{"target_modules", {"q_proj"}}, {"layers_to_transform", {0}}, {"layers_pattern", "h|layers"}})),
      Contains("outside a group"));
  CHECK(select_targets(llama, config_of({{"target_modules", {"q_proj"}},
                                         {"layers_to_transform", {0}},
                                         {"layers_pattern", "(h|layers)"}})) ==
        Names{"model.layers.0.self_attn.q_proj"});
  // A pattern that can end at either of two numbers leaves the choice to Python's backtracking order: refused.
  CHECK_THAT(error_of(Names{"a.x.1.y.2.z"},
                      config_of({{"target_modules", {"z"}}, {"layers_to_transform", {1}}, {"layers_pattern", "x.*"}})),
             Contains("more than one layer index (1 and 2)"));
  // ... but not when both ends give the same number.
  CHECK(
      select_targets(Names{"a.x.1.y.1.z"},
                     config_of({{"target_modules", {"z"}}, {"layers_to_transform", {1}}, {"layers_pattern", "x.*"}})) ==
      Names{"a.x.1.y.1.z"});
}

TEST_CASE("targets: all-linear leaves out embeddings and the output head, by name", "[targets]") {
  using lora::peft::is_embedding_name;
  using lora::peft::is_output_head_name;
  for (const char* e : {"wte", "transformer.wpe", "model.embed_tokens", "bert.embeddings.word_embeddings",
                        "bert.embeddings.token_type_embeddings", "model.decoder.embed_positions", "shared",
                        "gpt_neox.embed_in", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"})
    CHECK(is_embedding_name(e));
  for (const char* l : {"embed_out", "h.0.attn.c_attn", "model.layers.0.self_attn.q_proj", "lm_head",
                        "bert.embeddings.project", "cls.predictions.decoder", "wtex"})
    CHECK_FALSE(is_embedding_name(l));
  for (const char* h : {"lm_head", "lm_head.decoder", "roberta_wrapper.lm_head.decoder", "cls.predictions.decoder",
                        "vocab_projector", "embed_out", "language_model.lm_head"})
    CHECK(is_output_head_name(h));
  for (const char* n : {"lm_head.dense", "cls.predictions.transform.dense", "cls.seq_relationship", "my_lm_head",
                        "classifier", "score", "decoder"})
    CHECK_FALSE(is_output_head_name(n));

  // 2382-2442: Linear and Conv1D modules, minus get_output_embeddings(): LLaMA loses lm_head and the embedding.
  const Names llama = modules_of("llama");
  const Names all = select_targets(llama, config_of({{"target_modules", "all-linear"}}));
  CHECK(all.size() == 12 * 7);
  CHECK(std::find(all.begin(), all.end(), "lm_head") == all.end());
  CHECK(std::find(all.begin(), all.end(), "model.embed_tokens") == all.end());
  // 2392: compared in lower case.
  CHECK(select_targets(llama, config_of({{"target_modules", "All-Linear"}})) == all);
  // GPT-2: every Conv1D, neither wte nor wpe (Embedding); the tied lm_head has no key.
  CHECK(select_targets(modules_of("gpt2"), config_of({{"target_modules", "all-linear"}})) ==
        Names{"h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj", "h.1.attn.c_attn",
              "h.1.attn.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"});
  // BERT pretraining: the decoder (output embedding) is out, seq_relationship and the pooler are Linear and in.
  const Names bert = select_targets(modules_of("bert"), config_of({{"target_modules", "all-linear"}}));
  CHECK(std::find(bert.begin(), bert.end(), "cls.predictions.decoder") == bert.end());
  CHECK(std::find(bert.begin(), bert.end(), "cls.seq_relationship") != bert.end());
  CHECK(std::find(bert.begin(), bert.end(), "bert.pooler.dense") != bert.end());
  // 2420-2428: no output embedding and task_type SEQ_CLS: the top-level `score`, else `classifier`, is out.
  const Names distil = modules_of("distilbert_seq_cls");
  const Names cls = select_targets(distil, config_of({{"target_modules", "all-linear"}, {"task_type", "SEQ_CLS"}}));
  CHECK(cls.back() == "pre_classifier");
  CHECK(select_targets(distil, config_of({{"target_modules", "all-linear"}})).back() == "classifier");
  // RoBERTa's classifier is a container: PEFT removes the name "classifier", which is no Linear, so its
  // dense and out_proj stay; and lm_head.dense stays while lm_head.decoder is the head.
  const Names roberta = {"roberta.embeddings.word_embeddings", "roberta.encoder.layer.0.attention.self.query",
                         "classifier.dense", "classifier.out_proj"};
  CHECK(select_targets(roberta, config_of({{"target_modules", "all-linear"}, {"task_type", "SEQ_CLS"}})) ==
        Names{"roberta.encoder.layer.0.attention.self.query", "classifier.dense", "classifier.out_proj"});
  CHECK(select_targets(Names{"roberta.encoder.layer.0.output.dense", "lm_head.dense", "lm_head.decoder"},
                       config_of({{"target_modules", "all-linear"}})) ==
        Names{"roberta.encoder.layer.0.output.dense", "lm_head.dense"});
  // A head named by the caller instead of by the rule; "" says there is none.
  lora::peft::TargetOptions o;
  o.output_head = "model.layers.11.mlp.down_proj";
  const Names named = select_targets(llama, config_of({{"target_modules", "all-linear"}}), o);
  CHECK(named.size() == 12 * 7);
  CHECK(std::find(named.begin(), named.end(), "lm_head") != named.end());
  CHECK(std::find(named.begin(), named.end(), "model.layers.11.mlp.down_proj") == named.end());
  o.output_head = "";
  CHECK(select_targets(llama, config_of({{"target_modules", "all-linear"}}), o).size() == 12 * 7 + 1);
  // exclude_modules applies to the list all-linear becomes.
  CHECK(select_targets(llama, config_of({{"target_modules", "all-linear"},
                                         {"exclude_modules", {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}}}))
            .size() == 12 * 4);
}

TEST_CASE("targets: nothing selected names the patterns and some module names", "[targets]") {
  const Names llama = modules_of("llama");
  const std::string message = error_of(llama, config_of({{"target_modules", {"query", "value"}}}));
  CHECK_THAT(message, Contains("target_modules [\"query\", \"value\"]"));
  CHECK_THAT(message, Contains("of the checkpoint's 86"));
  // Five names, with different last components first.
  CHECK_THAT(message, Contains("its modules include [\"model.embed_tokens\", \"model.layers.0.self_attn.q_proj\", "
                               "\"model.layers.0.self_attn.k_proj\", \"model.layers.0.self_attn.v_proj\", "
                               "\"model.layers.0.self_attn.o_proj\"]"));
  const std::string with_layers = error_of(
      llama, config_of({{"target_modules", {"q_proj"}}, {"layers_to_transform", {40}}, {"layers_pattern", "layers"}}));
  CHECK_THAT(with_layers, Contains("layers_to_transform [40]"));
  CHECK_THAT(with_layers, Contains("layers_pattern \"layers\""));
  CHECK_THAT(error_of(Names{}, config_of({{"target_modules", {"q_proj"}}})), Contains("no module"));
  CHECK_THAT(error_of(Names{"only"}, config_of({{"target_modules", {"x"}}})), Contains("include [\"only\"]"));
  CHECK_THAT(error_of(llama, config_of(nlohmann::json::object())), Contains("empty or missing"));
}

TEST_CASE("targets: out_proj and conv1d are refused for Mamba-based models, as PEFT does", "[targets]") {
  const Names mamba = {"backbone.embeddings", "backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.x_proj",
                       "backbone.layers.0.mixer.dt_proj", "backbone.layers.0.mixer.out_proj"};
  lora::peft::TargetOptions o;
  o.model_type = "mamba";
  CHECK_THAT(error_of(mamba, config_of({{"target_modules", {"in_proj", "out_proj"}}}), o),
             Contains("incompatible with Mamba"));
  CHECK(select_targets(mamba, config_of({{"target_modules", {"in_proj", "x_proj"}}}), o).size() == 2);
  o.model_type = "llama";
  CHECK(select_targets(mamba, config_of({{"target_modules", {"in_proj", "out_proj"}}}), o).size() == 2);
}

}  // namespace unit_targets
