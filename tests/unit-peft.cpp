// PEFT adapter files: the fixture written by another tool, golden data from
// PyTorch (tests/golden/make_adapter_golden.py), byte-exact PEFT layout on
// save, round trips, structural checks that report every problem at once.
#include <catch2/catch.hpp>
#include <lora/peft.hpp>
#include <lora/sequential.hpp>

#include "test_files.hpp"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_peft {

using Catch::Contains;
namespace st = lora::safetensors;
namespace peft = lora::peft;
namespace fs = std::filesystem;
using Mat = lora::Matrix<float>;

namespace {

const std::string data_dir = LORA_TEST_DATA_DIR;
const std::string golden_dir = data_dir + "/peft/golden";
const std::string tiny_lora = data_dir + "/peft/tiny_lora";

using lora_test::write_text;

using lora_test::read_bytes;

fs::path scratch_dir(const std::string& name) { return lora_test::scratch_dir("peft-" + name); }

const std::vector<std::string> golden_modules = {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                                 "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"};

// The golden model's layers, built from the base weights (stored (in, out) by Conv1D, so transposed
// to (out, in)) and the LoraConfig the adapter's config gives each module.
struct GoldenModel {
  std::vector<std::unique_ptr<lora::LoRALinear<float>>> layers;
  std::map<std::string, lora::LoRALinear<float>*> model;

  explicit GoldenModel(const peft::AdapterConfig& config) {
    auto forward = st::File::open(golden_dir + "/forward.safetensors");
    for (const auto& path : golden_modules) {
      Mat W = forward.matrix<float>(path + ".weight_out_in");
      lora::RowVector<float> b = forward.matrix<float>(path + ".bias");
      layers.push_back(std::make_unique<lora::LoRALinear<float>>(W, b, config.layer_config(path)));
      model[path] = layers.back().get();
    }
  }
};

}  // namespace

TEST_CASE("peft reads the fixture adapter written by another tool", "[peft]") {
  auto adapter = peft::read_adapter<float>(tiny_lora);
  REQUIRE(adapter.modules.size() == 12);
  const auto* attn = adapter.find("transformer.h.0.attn.c_attn");
  REQUIRE(attn != nullptr);
  CHECK(attn->A.rows() == 8);
  CHECK(attn->A.cols() == 768);
  CHECK(attn->B.rows() == 2304);
  CHECK(attn->B.cols() == 8);
  CHECK(attn->scaling == 2.0);  // lora_alpha 16 / r 8
  const auto* proj = adapter.find("transformer.h.5.attn.c_proj");
  REQUIRE(proj != nullptr);
  CHECK(proj->out_features() == 768);
  // 6 blocks x (c_attn 8·768 + 2304·8, c_proj 8·768 + 768·8)
  CHECK(adapter.parameter_count() == 221184);
  CHECK(adapter.other_tensors.empty());
  CHECK_FALSE(adapter.file->has_metadata());
  // Its config has a key PEFT does not know ("alpha"): tolerated and kept.
  CHECK(adapter.config.other.at("alpha") == 16);
  CHECK(adapter.config.lora_dropout == 0.1);
  CHECK(adapter.config.target_modules == std::vector<std::string>{"c_attn", "c_proj"});
  CHECK(adapter.config.assumed.empty());
}

TEST_CASE("peft golden: rank_pattern and alpha_pattern are honoured", "[peft]") {
  auto adapter = peft::read_adapter<double>(golden_dir + "/adapter");
  REQUIRE(adapter.modules.size() == 4);
  CHECK(adapter.find("transformer.h.0.attn.c_attn")->r == 4);
  CHECK(adapter.find("transformer.h.0.attn.c_attn")->scaling == 2.0);  // 8 / 4
  CHECK(adapter.find("transformer.h.0.attn.c_proj")->r == 2);          // rank_pattern {"c_proj": 2}
  CHECK(adapter.find("transformer.h.0.attn.c_proj")->scaling == 4.0);  // 8 / 2
  CHECK(adapter.find("transformer.h.1.attn.c_proj")->scaling == 1.5);  // alpha_pattern {"h.1.attn.c_proj": 3}
  REQUIRE(adapter.other_tensors.size() == 1);  // the modules_to_save head is handed over, not dropped
  CHECK(adapter.other_tensors[0].name == "base_model.model.score.weight");
  CHECK(adapter.file->matrix<float>("base_model.model.score.weight").rows() == 3);
}

TEST_CASE("peft golden: a loaded adapter computes what PyTorch computed", "[peft]") {
  auto config = peft::AdapterConfig::read(golden_dir + "/adapter/adapter_config.json");
  GoldenModel g(config);
  auto report = peft::load_adapter(golden_dir + "/adapter", g.model);
  CHECK(report.loaded.size() == 4);
  REQUIRE(report.other_tensors.size() == 1);
  CHECK(report.other_tensors[0].name == "base_model.model.score.weight");
  auto forward = st::File::open(golden_dir + "/forward.safetensors");
  for (const auto& path : golden_modules) {
    INFO(path);
    auto& layer = *g.model.at(path);
    layer.eval();
    Mat x = forward.matrix<float>(path + ".x");
    Mat y = layer.forward(x);
    Mat expected = forward.matrix<float>(path + ".y");
    CHECK((y - expected).cwiseAbs().maxCoeff() <= 1e-5f * (1.0f + expected.cwiseAbs().maxCoeff()));
  }
}

TEST_CASE("peft golden: merge_into matches PEFT's merge, with fan_in_fan_out", "[peft]") {
  auto adapter = peft::read_adapter<float>(golden_dir + "/adapter");
  REQUIRE(adapter.config.fan_in_fan_out);
  auto base = st::File::open(golden_dir + "/base.safetensors");
  auto merged = st::File::open(golden_dir + "/merged.safetensors");
  auto half = st::File::open(golden_dir + "/merged_half.safetensors");
  for (const auto& m : adapter.modules) {
    const std::string name = m.path.substr(std::string("transformer.").size()) + ".weight";
    INFO(name);
    Mat W = base.matrix<float>(name);  // (in, out)
    Mat W_half = W;
    peft::merge_into<float>(W, m, 1.0, true);
    peft::merge_into<float>(W_half, m, 0.5, true);
    CHECK((W - merged.matrix<float>(name)).cwiseAbs().maxCoeff() <= 1e-5f);
    CHECK((W_half - half.matrix<float>(name)).cwiseAbs().maxCoeff() <= 1e-5f);
    Mat wrong = Mat::Zero(W.rows() + 1, W.cols());
    CHECK_THROWS_WITH(peft::merge_into<float>(wrong, m, 1.0, true), Contains("(in, out) with fan_in_fan_out"));
  }
}

TEST_CASE("peft save writes exactly PEFT's files", "[peft]") {
  // Load the Python-written adapter into layers, save it back: both files must come out byte for byte.
  auto config = peft::AdapterConfig::read(golden_dir + "/adapter/adapter_config.json");
  GoldenModel g(config);
  peft::load_adapter(golden_dir + "/adapter", g.model);
  auto source = st::File::open(golden_dir + "/adapter/adapter_model.safetensors");
  std::map<std::string, Mat> extra{
      {"base_model.model.score.weight", source.matrix<float>("base_model.model.score.weight")}};
  fs::path dir = scratch_dir("save");
  peft::save_adapter((dir / "out").string(), g.model, config, st::Dtype::F32, extra);
  CHECK(read_bytes((dir / "out" / "adapter_model.safetensors").string()) ==
        read_bytes(golden_dir + "/adapter/adapter_model.safetensors"));
  auto text = [](const std::string& path) {
    auto b = read_bytes(path);
    return std::string(b.begin(), b.end());
  };
  CHECK(text((dir / "out" / "adapter_config.json").string()) == text(golden_dir + "/adapter/adapter_config.json"));
  fs::remove_all(dir);
}

TEST_CASE("peft round trip: save then load gives identical tensors and config", "[peft]") {
  lora::LoraConfig c;
  c.r = 3;
  c.lora_alpha = 6;
  c.use_rslora = true;
  c.bias = lora::BiasMode::lora_only;
  c.seed = 5;
  lora::LoRALinear<double> q(5, 7, c, true), v(5, 4, c, true);
  c.r = 2;  // a different rank: goes to rank_pattern
  c.seed = 6;
  lora::LoRALinear<double> o(7, 5, c, true);
  for (auto* layer : {&q, &v, &o}) {
    layer->lora_B().setRandom();
    layer->bias().setRandom();
  }
  std::map<std::string, lora::LoRALinear<double>*> model{
      {"model.layers.0.self_attn.q_proj", &q}, {"model.layers.0.self_attn.v_proj", &v}, {"model.layers.0.o", &o}};
  fs::path dir = scratch_dir("roundtrip");
  peft::AdapterConfig base;
  base.task_type = "CAUSAL_LM";
  peft::save_adapter(dir.string(), model, base, st::Dtype::F64);

  auto saved = peft::AdapterConfig::read((dir / "adapter_config.json").string());
  CHECK(saved.r == 3);
  CHECK(saved.lora_alpha == 6);
  CHECK(saved.use_rslora);
  CHECK(saved.bias == lora::BiasMode::lora_only);
  CHECK(saved.rank_for("model.layers.0.o") == 2);
  CHECK(saved.target_modules == std::vector<std::string>{"o", "q_proj", "v_proj"});
  CHECK(saved.task_type == std::optional<std::string>("CAUSAL_LM"));
  CHECK(saved.to_json() == peft::config_for(model, base).to_json());

  lora::LoRALinear<double> q2(5, 7, saved.layer_config("model.layers.0.self_attn.q_proj"), true);
  lora::LoRALinear<double> v2(5, 4, saved.layer_config("model.layers.0.self_attn.v_proj"), true);
  lora::LoRALinear<double> o2(7, 5, saved.layer_config("model.layers.0.o"), true);
  std::map<std::string, lora::LoRALinear<double>*> model2{
      {"model.layers.0.self_attn.q_proj", &q2}, {"model.layers.0.self_attn.v_proj", &v2}, {"model.layers.0.o", &o2}};
  peft::load_adapter(dir.string(), model2);
  for (const auto& [path, layer] : model) {
    INFO(path);
    CHECK(model2.at(path)->lora_A() == layer->lora_A());  // bit-identical in F64
    CHECK(model2.at(path)->lora_B() == layer->lora_B());
    CHECK(model2.at(path)->bias() == layer->bias());
    CHECK(model2.at(path)->scaling() == layer->scaling());
  }
  // The saved file obeys every rule of the reader, and has PEFT's keys and metadata.
  auto file = st::File::open((dir / "adapter_model.safetensors").string());
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.at("base_model.model.model.layers.0.o.lora_A.weight").shape == std::vector<std::uint64_t>{2, 7});
  CHECK(file.at("base_model.model.model.layers.0.self_attn.v_proj.bias").shape == std::vector<std::uint64_t>{4});
  CHECK(file.tensors().size() == 9);
  fs::remove_all(dir);
}

TEST_CASE("peft save in F16 and BF16", "[peft]") {
  lora::LoraConfig c;
  c.r = 2;
  lora::LoRALinear<float> layer(4, 3, c, false);
  layer.lora_B().setConstant(1.0f / 3.0f);
  std::map<std::string, lora::LoRALinear<float>*> model{{"fc", &layer}};
  fs::path dir = scratch_dir("half");
  for (auto dtype : {st::Dtype::F16, st::Dtype::BF16}) {
    peft::save_adapter(dir.string(), model, {}, dtype);
    auto file = st::File::open((dir / "adapter_model.safetensors").string());
    CHECK(file.at("base_model.model.fc.lora_B.weight").dtype == dtype);
    float third = file.matrix<float>("base_model.model.fc.lora_B.weight")(0, 0);
    CHECK(third == (dtype == st::Dtype::F16 ? st::half_to_float(st::float_to_half(1.0f / 3.0f))
                                            : st::bf16_to_float(st::float_to_bf16(1.0f / 3.0f))));
    CHECK(third != 1.0f / 3.0f);
  }
  fs::remove_all(dir);
}

TEST_CASE("half conversions match torch on the golden values", "[peft][safetensors]") {
  auto f = st::File::open(golden_dir + "/conversions.safetensors");
  auto values = f.view<float>("f32");
  const auto& f16 = f.at("f16");
  const auto& bf16 = f.at("bf16");
  REQUIRE(static_cast<lora::Index>(f16.numel()) == values.size());
  std::size_t mismatches = 0;
  for (lora::Index i = 0; i < values.size(); ++i) {
    std::uint16_t h, b;
    std::memcpy(&h, f.bytes(f16) + 2 * i, 2);
    std::memcpy(&b, f.bytes(bf16) + 2 * i, 2);
    if (st::float_to_half(values(0, i)) != h || st::float_to_bf16(values(0, i)) != b) ++mismatches;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("peft load reports every problem at once and changes no layer", "[peft]") {
  auto config = peft::AdapterConfig::read(golden_dir + "/adapter/adapter_config.json");
  GoldenModel g(config);
  // c_attn of block 1 gets the wrong width; block 1's c_proj is left out (unexpected in the file);
  // an extra module has nothing in the file (missing); block 0's c_proj has the wrong alpha.
  Mat W = Mat::Zero(18, 5);
  lora::LoRALinear<float> narrow(W, config.layer_config("transformer.h.1.attn.c_attn"));
  lora::LoraConfig wrong_alpha = config.layer_config("transformer.h.0.attn.c_proj");
  wrong_alpha.lora_alpha = 1;
  lora::LoRALinear<float> proj(6, 6, wrong_alpha);
  lora::LoRALinear<float> extra(6, 6, config.layer_config("transformer.h.2.attn.c_attn"));
  auto model = g.model;
  model["transformer.h.1.attn.c_attn"] = &narrow;
  model["transformer.h.0.attn.c_proj"] = &proj;
  model.erase("transformer.h.1.attn.c_proj");
  model["transformer.h.2.attn.c_attn"] = &extra;
  const Mat A_before = g.model.at("transformer.h.0.attn.c_attn")->lora_A();
  std::string message;
  try {
    peft::load_adapter(golden_dir + "/adapter", model);
  } catch (const lora::format_error& e) {
    message = e.what();
  }
  CHECK_THAT(message, Contains("4 problem(s)"));
  CHECK_THAT(message, Contains("transformer.h.1.attn.c_attn.lora_A.weight: expected (4, 5), got (4, 6)"));
  CHECK_THAT(message, Contains("missing: base_model.model.transformer.h.2.attn.c_attn.lora_A.weight"));
  CHECK_THAT(message, Contains("unexpected: base_model.model.transformer.h.1.attn.c_proj.lora_A.weight"));
  CHECK_THAT(message, Contains("transformer.h.0.attn.c_proj: the file's scaling is 4"));
  CHECK(g.model.at("transformer.h.0.attn.c_attn")->lora_A() == A_before);  // nothing was loaded
}

TEST_CASE("peft config: defaults assumed are reported, bad values refused", "[peft]") {
  auto c = peft::AdapterConfig::parse(R"({"peft_type": "LORA", "target_modules": "q|v"})");
  CHECK(c.r == 8);
  CHECK(c.lora_alpha == 8);
  REQUIRE(c.assumed.size() == 2);
  CHECK_THAT(c.assumed[0], Contains("r is missing: assumed 8"));
  CHECK_THAT(c.assumed[1], Contains("lora_alpha is missing: assumed 8"));
  CHECK(c.target_modules_regex == std::optional<std::string>("q|v"));
  CHECK_THAT(c.to_json(), Contains("\"target_modules\": \"q|v\""));

  auto bad = [](const std::string& text) {
    try {
      peft::AdapterConfig::parse(text, "cfg.json");
    } catch (const lora::format_error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  CHECK_THAT(bad(R"({"r": 8})"), Contains("cfg.json: \"peft_type\" is missing"));
  CHECK_THAT(bad(R"({"peft_type": "IA3"})"), Contains("peft_type must be \"LORA\", got \"IA3\""));
  CHECK_THAT(bad(R"({"peft_type": "LORA", "r": 0})"), Contains("\"r\" must be a positive integer, got 0"));
  CHECK_THAT(bad(R"({"peft_type": "LORA", "r": "8"})"), Contains("\"r\" must be a positive integer"));
  CHECK_THAT(bad(R"({"peft_type": "LORA", "lora_dropout": 1.5})"), Contains("a number in [0, 1)"));
  CHECK_THAT(bad(R"({"peft_type": "LORA", "bias": "some"})"), Contains("\"bias\" must be \"none\""));
  CHECK(peft::AdapterConfig::parse(R"({"peft_type": "LORA", "use_dora": true})").use_dora);
  CHECK_THAT(bad(R"({"peft_type": "LORA", "use_dora": 1})"), Contains("\"use_dora\" must be true or false"));
  CHECK_THAT(bad(R"({"peft_type": "LORA", "rank_pattern": {"q": -1}})"), Contains("must be a non-negative integer"));
  CHECK_THAT(bad(R"({"peft_type": "LORA", "rank_pattern": {"(": 2}})"),
             Contains("cfg.json: rank_pattern: pattern key \"(\" is not a valid Python regular expression"));
  // A construct Python accepts but a linear-time matcher cannot run is refused by name, not matched wrongly.
  CHECK_THAT(bad(R"({"peft_type": "LORA", "alpha_pattern": {"(q)_\\1": 2}})"),
             Contains("cfg.json: alpha_pattern: pattern key") && Contains("backreference"));
  CHECK_THAT(bad(R"({"peft_type": "LORA", "target_modules": [1]})"), Contains("must be a list of strings"));
  CHECK_THAT(bad("[1]"), Contains("expected a JSON object"));
  CHECK_THAT(bad("{"), Contains("cfg.json: not valid JSON"));
}

TEST_CASE("peft refuses a DoRA magnitude without use_dora, broken embedding adapters, pickles, half adapters",
          "[peft]") {
  fs::path dir = scratch_dir("unsupported");
  write_text((dir / "adapter_config.json").string(), R"({"peft_type": "LORA", "r": 2, "lora_alpha": 2})");
  Mat A = Mat::Ones(2, 3), B = Mat::Ones(4, 2), m = Mat::Ones(1, 4);
  auto save = [&](const std::vector<std::pair<std::string, Mat>>& tensors) {
    st::Writer w;
    for (const auto& [name, t] : tensors) w.add(name, t);
    w.save((dir / "adapter_model.safetensors").string());
  };
  auto message = [&]() {
    try {
      peft::read_adapter<float>(dir.string());
    } catch (const lora::error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  save({{"base_model.model.fc.lora_A.weight", A},
        {"base_model.model.fc.lora_B.weight", B},
        {"base_model.model.fc.lora_magnitude_vector", m}});
  CHECK_THAT(message(), Contains("fc.lora_magnitude_vector: a DoRA magnitude, but the config's use_dora is false"));
  // An embedding adapter reads (lora_embedding_A (r, V), lora_embedding_B (d, r)); broken ones are named.
  save({{"base_model.model.emb.lora_embedding_A", A}, {"base_model.model.emb.lora_embedding_B", B}});
  CHECK(message() == "accepted");
  CHECK(peft::read_adapter<float>(dir.string()).modules.at(0).embedding);
  save({{"base_model.model.emb.lora_embedding_A", A}});
  CHECK_THAT(message(), Contains("emb: has lora_embedding_A but no lora_embedding_B"));
  save({{"base_model.model.emb.lora_embedding_A", A}, {"base_model.model.emb.lora_embedding_B", Mat::Ones(4, 3)}});
  CHECK_THAT(message(), Contains("emb: lora_embedding_A [2, 3] and lora_embedding_B [4, 3] do not have the rank"));
  save({{"base_model.model.emb.lora_embedding_A", A},
        {"base_model.model.emb.lora_embedding_B", B},
        {"base_model.model.emb.lora_A.weight", A},
        {"base_model.model.emb.lora_B.weight", B}});
  CHECK_THAT(message(), Contains("emb: has both lora_A/lora_B and lora_embedding_A/B"));
  save({{"base_model.model.lora_embedding_A", A}, {"base_model.model.emb.lora_B.weight", B}});
  CHECK_THAT(message(), Contains("base_model.model.lora_embedding_A: a LoRA matrix with no module path"));
  save({{"base_model.model.fc.lora_A.weight", A}, {"base_model.model.up.lora_B.weight", B}});
  std::string two = message();
  CHECK_THAT(two, Contains("2 problem(s)"));
  CHECK_THAT(two, Contains("fc: has lora_A but no lora_B"));
  CHECK_THAT(two, Contains("up: has lora_B but no lora_A"));
  save({{"base_model.model.fc.lora_A.weight", Mat::Ones(3, 3)}, {"base_model.model.fc.lora_B.weight", B}});
  CHECK_THAT(message(), Contains("do not have the rank the config gives this module (2)"));
  fs::remove(dir / "adapter_model.safetensors");
  write_text((dir / "adapter_model.bin").string(), "pickle");
  CHECK_THAT(message(), Contains("adapter_model.bin (a PyTorch pickle), which is not supported"));
  fs::remove_all(dir);
}

TEST_CASE("merge_adapter_file matches PyTorch's merged weights and copies the rest through", "[peft][merge]") {
  fs::path dir = scratch_dir("merge");
  struct Case {
    const char* base;
    const char* expected;
    double scale;
    float tolerance;
  };
  // BF16: torch rounded (W + delta) in float32 to bfloat16; allow one bf16 step where a tie falls differently.
  for (const Case& c : {Case{"base.safetensors", "merged.safetensors", 1.0, 1e-5f},
                        Case{"base.safetensors", "merged_half.safetensors", 0.5, 1e-5f},
                        Case{"base_bf16.safetensors", "merged_bf16.safetensors", 1.0, 1.0f / 128}}) {
    INFO(c.expected);
    const std::string out = (dir / "out.safetensors").string();
    auto report = peft::merge_adapter_file(golden_dir + "/" + c.base, golden_dir + "/adapter", out, c.scale);
    CHECK(report.merged.size() == 4);
    CHECK(report.copied == 6);
    auto got = st::File::open(out);
    auto expected = st::File::open(golden_dir + "/" + c.expected);
    auto base = st::File::open(golden_dir + "/" + c.base);
    CHECK(got.metadata() == base.metadata());
    // PyTorch's expected file leaves out the adapter's modules_to_save head, which the merge adds as PEFT's
    // merge_and_unload keeps it (checked in unit-untrusted.cpp).
    REQUIRE(got.tensors().size() == expected.tensors().size() + 1);
    CHECK(report.added == std::vector<std::string>{"score.weight"});
    std::size_t differing = 0;
    for (const auto& t : expected.tensors()) {
      INFO(t.name);
      const auto& g = got.at(t.name);
      CHECK(g.dtype == t.dtype);
      CHECK(g.shape == t.shape);
      if (!st::is_float(t.dtype)) {
        CHECK(std::memcmp(got.bytes(g), expected.bytes(t), t.nbytes()) == 0);
        continue;
      }
      Mat a = got.matrix<float>(t.name), b = expected.matrix<float>(t.name);
      CHECK((a - b).cwiseAbs().maxCoeff() <= c.tolerance * (1.0f + b.cwiseAbs().maxCoeff()));
      if (std::memcmp(got.bytes(g), base.bytes(base.at(t.name)), t.nbytes()) != 0) ++differing;
    }
    CHECK(differing == 4);  // exactly the four adapted weights changed; biases, wte, the I64 mask did not
  }
  CHECK(lora_test::count_files(dir) == 1);
  CHECK_THROWS_WITH(
      peft::merge_adapter_file(golden_dir + "/base.safetensors", tiny_lora, (dir / "never.safetensors").string()),
      Contains("12 problem(s)"));
  CHECK_FALSE(fs::exists(dir / "never.safetensors"));
  fs::remove_all(dir);
}

TEST_CASE("peft save is atomic: a failed write leaves the old adapter whole", "[peft][atomic]") {
  fs::path dir = scratch_dir("atomic");
  lora::LoraConfig small_config;
  small_config.r = 2;
  lora::LoRALinear<float> small(4, 3, small_config, false);
  std::map<std::string, lora::LoRALinear<float>*> small_model{{"fc", &small}};
  peft::save_adapter(dir.string(), small_model);
  const auto weights = read_bytes((dir / "adapter_model.safetensors").string());
  const auto config = read_bytes((dir / "adapter_config.json").string());

  lora::LoraConfig big_config;
  big_config.r = 64;
  lora::LoRALinear<float> big(256, 256, big_config, false);  // 128 KiB of adapter
  std::map<std::string, lora::LoRALinear<float>*> big_model{{"fc", &big}};
  std::string message;
  {
    lora_test::FileSizeLimit limit(64 * 1024);
    REQUIRE(limit.ok());
    try {
      peft::save_adapter(dir.string(), big_model);
    } catch (const lora::io_error& e) {
      message = e.what();
    }
  }
  CHECK_THAT(message,
             Contains("adapter_model.safetensors: the file would be larger than the process's file-size limit"));
  CHECK(read_bytes((dir / "adapter_model.safetensors").string()) == weights);  // neither file replaced
  CHECK(read_bytes((dir / "adapter_config.json").string()) == config);
  CHECK(lora_test::count_files(dir) == 2);  // no temporaries left behind

  // The second file failing must not let the first replace its old version either: small weights, a config
  // made large by a key PEFT does not know.
  small.lora_B().setConstant(0.5f);
  peft::AdapterConfig large_config;
  large_config.other["notes"] = std::string(100 * 1024, 'x');
  message.clear();
  {
    lora_test::FileSizeLimit limit(64 * 1024);
    REQUIRE(limit.ok());
    try {
      peft::save_adapter(dir.string(), small_model, large_config);
    } catch (const lora::io_error& e) {
      message = e.what();
    }
  }
  CHECK_THAT(message, Contains("adapter_config.json: the file would be larger than the process's file-size limit"));
  CHECK(read_bytes((dir / "adapter_model.safetensors").string()) == weights);
  CHECK(read_bytes((dir / "adapter_config.json").string()) == config);
  CHECK(lora_test::count_files(dir) == 2);

  peft::save_adapter(dir.string(), big_model);
  CHECK(peft::read_adapter<float>(dir.string()).find("fc")->r == 64);
  fs::remove_all(dir);
}

// load_adapter left layers in training mode: an adapter with lora_dropout gave a different output on every call.
TEST_CASE("peft load_adapter loads for inference unless asked to train, and can load non-strictly", "[peft][load]") {
  const fs::path dir = scratch_dir("load-modes");
  lora::LoraConfig c;
  c.r = 2;
  c.lora_alpha = 4;
  c.lora_dropout = 0.5;
  lora::LoRALinear<float> q(6, 4, c, false), v(6, 4, c, false);
  q.lora_B().setConstant(0.5f);
  v.lora_B().setConstant(-0.25f);
  peft::save_adapter(dir.string(), std::map<std::string, lora::LoRALinear<float>*>{{"m.q", &q}, {"m.v", &v}});
  const Mat x = Mat::Random(3, 6);

  lora::LoRALinear<float> q2(q.weight(), c), v2(v.weight(), c);
  std::map<std::string, lora::LoRALinear<float>*> model{{"m.q", &q2}, {"m.v", &v2}};
  REQUIRE(q2.is_training());  // a new layer trains, as a new torch module does
  peft::load_adapter(dir.string(), model);
  CHECK_FALSE(q2.is_training());
  Mat y1(3, 4), y2(3, 4), expected(3, 4);
  q2.forward(x, y1);
  q2.forward(x, y2);
  q.eval();
  q.forward(x, expected);
  CHECK(y1 == y2);  // no dropout: the same output on every call
  CHECK(y1 == expected);

  peft::LoadOptions train;
  train.is_trainable = true;
  peft::load_adapter(dir.string(), model, train);
  CHECK(q2.is_training());
  CHECK(v2.is_training());

  // Non-strict: a model with one layer the file lacks and without one the file has loads what matches.
  lora::LoRALinear<float> q3(q.weight(), c), extra(6, 4, c, false);
  const Mat extra_A = extra.lora_A(), extra_B = extra.lora_B();
  std::map<std::string, lora::LoRALinear<float>*> partial{{"m.q", &q3}, {"m.extra", &extra}};
  CHECK_THROWS_WITH(peft::load_adapter(dir.string(), partial),
                    Contains("2 problem(s)") && Contains("missing: base_model.model.m.extra.lora_A.weight") &&
                        Contains("unexpected: base_model.model.m.v.lora_A.weight"));
  CHECK(q3.lora_B() != q.lora_B());  // strict: nothing loaded
  peft::LoadOptions loose;
  loose.strict = false;
  auto report = peft::load_adapter(dir.string(), partial, loose);
  CHECK(report.loaded == std::vector<std::string>{"m.q"});
  CHECK(report.missing == std::vector<std::string>{"m.extra"});
  CHECK(report.unexpected == std::vector<std::string>{"m.v"});
  CHECK(q3.lora_A() == q.lora_A());
  CHECK(q3.lora_B() == q.lora_B());
  CHECK(extra.lora_A() == extra_A);  // left as it was
  CHECK(extra.lora_B() == extra_B);
  CHECK(extra.is_training());
  // Shapes must agree even then.
  lora::LoRALinear<float> wide(7, 4, c, false);
  std::map<std::string, lora::LoRALinear<float>*> wrong{{"m.q", &wide}};
  CHECK_THROWS_WITH(peft::load_adapter(dir.string(), wrong, loose),
                    Contains("m.q.lora_A.weight: expected (2, 7), got (2, 6)"));
  fs::remove_all(dir);
}

// A Sequential's parameters are named "0.lora_A": it could not be saved as a PEFT adapter.
TEST_CASE("peft: a Sequential with named layers saves and loads as a PEFT adapter", "[peft][sequential]") {
  const fs::path dir = scratch_dir("sequential");
  lora::LoraConfig c;
  c.r = 2;
  c.lora_alpha = 4;
  c.seed = 11;
  auto build = [&] {
    lora::Sequential<float> model;
    model.add("model.layers.0.mlp.up_proj", lora::LoRALinear<float>(6, 8, c))
        .add(lora::GELU{})
        .add("model.layers.0.mlp.down_proj", lora::LoRALinear<float>(8, 3, c));
    return model;
  };
  auto model = build();
  CHECK_THROWS_WITH(model.add("model.layers.0.mlp.up_proj", lora::LoRALinear<float>(3, 3, c)),
                    Contains("a layer is already named \"model.layers.0.mlp.up_proj\""));
  CHECK(model.size() == 3);
  for (auto& [name, layer] : model.named_linears()) layer->lora_B().setRandom();
  peft::save_adapter(dir.string(), model.named_linears());
  const auto saved = peft::read_adapter<float>(dir.string());
  REQUIRE(saved.modules.size() == 2);
  CHECK(saved.modules[0].path == "model.layers.0.mlp.down_proj");
  CHECK(saved.modules[1].path == "model.layers.0.mlp.up_proj");

  auto other = build();  // the same seed: the same frozen W
  peft::load_adapter(dir.string(), other.named_linears());
  const Mat x = Mat::Random(4, 6);
  Mat y1(4, 3), y2(4, 3);
  model.eval();
  model.forward(x, y1);  // the (x, y) form, as LoRALinear::forward
  other.forward(x, y2);
  CHECK(y1 == y2);
  CHECK(y1 == model.forward(x));
  Mat wrong(4, 5);
  CHECK_THROWS_WITH(model.forward(x, wrong), Contains("Sequential::forward: y expected shape (4, 3), got (4, 5)"));
  fs::remove_all(dir);
}

}  // namespace unit_peft
