// PEFT adapters trained from a PiSSA or OLoRA start (init_lora_weights "pissa" / "olora"): loading one rewrites
// each module's W to its residual first, as PEFT's from_pretrained does; lora-merge does the same; the conversion
// to a plain LoRA for the original base (PEFT's path_initial_model_for_weight_conversion) writes PEFT's files byte
// for byte; the inits no one can reproduce are refused. The oracle is tests/golden/make_pissa_golden.py, which
// writes PEFT's pissa_init / olora_init / subtract_mutated_init out in PyTorch.
#include <catch2/catch.hpp>
#include <lora/gguf_adapter.hpp>
#include <lora/init.hpp>
#include <lora/lora.hpp>

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "golden.hpp"
#include "peft_models.hpp"
#include "test_files.hpp"

namespace unit_residual_files {

using Catch::Contains;
using lora::Index;
template <class S>
using Mat = lora::Matrix<S>;
namespace st = lora::safetensors;
namespace peft = lora::peft;

namespace {

const std::string data_dir = std::string(LORA_TEST_DATA_DIR) + "/peft/pissa";

const std::map<std::string, std::vector<std::string>> module_paths = {
    {"pissa", {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}},
    {"olora", {"transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"}},
};

using lora_test::base_tensor;

/// The layers of one golden model over its base weights: owned copies (writable: a residual load rewrites them),
/// or read-only views of the mmap'd base file. (in, out) for the Conv1D case.
lora_test::LinearModel make_model(const st::File& base, const std::string& which, bool writable) {
  return lora_test::linear_model(base, peft::AdapterConfig::read(data_dir + "/" + which + "/adapter_config.json"),
                                 module_paths.at(which), writable, false);
}

/// Copies folder `from` to `to` with adapter_config.json's init_lora_weights replaced by `value` (JSON text).
void copy_with_init(const std::string& from, const std::filesystem::path& to, const std::string& value) {
  std::filesystem::create_directories(to);
  std::filesystem::copy_file(from + "/adapter_model.safetensors", to / "adapter_model.safetensors");
  auto config = peft::AdapterConfig::read(from + "/adapter_config.json");
  config.init_lora_weights = nlohmann::json::parse(value);
  config.save((to / "adapter_config.json").string());
}

}  // namespace

TEST_CASE("PiSSA and OLoRA adapters load over the residual PEFT computes, and give PEFT's outputs",
          "[pissa][peft][golden]") {
  const std::string which = GENERATE(std::string("pissa"), std::string("olora"));
  CAPTURE(which);
  const auto base = st::File::open(data_dir + "/base.safetensors");
  const auto forward = st::File::open(data_dir + "/forward.safetensors");
  const auto merged = st::File::open(data_dir + "/merged_" + which + ".safetensors");
  const auto adapter = peft::read_adapter<float>(data_dir + "/" + which);
  CHECK(adapter.config.residual_init("x") ==
        (which == "pissa" ? lora::ResidualInit::pissa : lora::ResidualInit::olora));

  auto model = make_model(base, which, true);
  const auto report = peft::load_adapter(data_dir + "/" + which, model.by_path);
  CHECK(report.loaded == module_paths.at(which));
  CHECK(report.rewritten == module_paths.at(which));
  for (const auto& [path, layer] : model.by_path) {
    CAPTURE(path);
    CHECK(layer->lora_A() == adapter.find(path)->A);
    // The base is no longer W: W − s·B0 A0 + s·B A is PEFT's merged weight.
    const Mat<float> x = forward.matrix<float>(path + ".x");
    CHECK(lora_test::max_rel_diff(std::as_const(*layer).forward(x), forward.matrix<float>(path + ".y")) < 2e-5);
    layer->merge();
    CHECK(lora_test::max_rel_diff(layer->frozen_weight().stored(),
                                  merged.matrix<float>(base_tensor(path) + ".weight")) < 2e-5);
  }
}

TEST_CASE("lora-merge merges PiSSA and OLoRA adapters into the residual, as PEFT's from_pretrained then merge",
          "[pissa][peft][golden]") {
  const std::string which = GENERATE(std::string("pissa"), std::string("olora"));
  CAPTURE(which);
  const auto dir = lora_test::scratch_dir("residual-merge-" + which);
  const std::string out = (dir / "merged.safetensors").string();
  const auto report = peft::merge_adapter_file(data_dir + "/base.safetensors", data_dir + "/" + which, out);
  CHECK(report.merged.size() == 2);
  const auto got = st::File::open(out);
  const auto want = st::File::open(data_dir + "/merged_" + which + ".safetensors");
  REQUIRE(got.tensors().size() == want.tensors().size());
  for (const auto& t : want.tensors()) {
    CAPTURE(t.name);
    CHECK(lora_test::max_rel_diff(got.matrix<float>(t.name), want.matrix<float>(t.name)) < 2e-5);
  }
  // The converted plain LoRA on the original base gives the same weights.
  const std::string out2 = (dir / "merged-converted.safetensors").string();
  peft::merge_adapter_file(data_dir + "/base.safetensors", data_dir + "/" + which + "_converted", out2);
  const auto got2 = st::File::open(out2);
  for (const auto& t : want.tensors()) {
    CAPTURE(t.name);
    CHECK(lora_test::max_rel_diff(got2.matrix<float>(t.name), want.matrix<float>(t.name)) < 2e-5);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("Converting to a plain LoRA writes PEFT's files byte for byte (OLoRA on Conv1D: the corrected ones)",
          "[pissa][peft][golden]") {
  const std::string which = GENERATE(std::string("pissa"), std::string("olora"));
  CAPTURE(which);
  const auto dir = lora_test::scratch_dir("residual-convert-" + which);
  const auto converted = peft::convert_residual_adapter(peft::read_adapter<float>(data_dir + "/" + which),
                                                        peft::read_adapter<float>(data_dir + "/" + which + "_initial"));
  CHECK(converted.config.residual_init("x") == lora::ResidualInit::none);
  peft::save_adapter((dir / "files").string(), converted);

  const auto base = st::File::open(data_dir + "/base.safetensors");
  auto model = make_model(base, which, true);
  peft::load_adapter(data_dir + "/" + which, model.by_path);
  const auto config = peft::AdapterConfig::read(data_dir + "/" + which + "/adapter_config.json");
  peft::save_adapter_converted((dir / "layers").string(), model.by_path, data_dir + "/" + which + "_initial", config);
  for (const char* name : {"adapter_model.safetensors", "adapter_config.json"}) {
    CAPTURE(name);
    const auto want = lora_test::read_bytes(data_dir + "/" + which + "_converted/" + name);
    CHECK(lora_test::read_bytes((dir / "files" / name).string()) == want);
    CHECK(lora_test::read_bytes((dir / "layers" / name).string()) == want);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("Converting keeps DoRA magnitudes, biases and embeddings, so the result applies whole", "[pissa][peft]") {
  // A DoRA layer with a trained bias, PiSSA-initialised over a random W, then "trained".
  lora::LoraConfig c;
  c.r = 2;
  c.lora_alpha = 4;
  c.use_dora = true;
  c.bias = lora::BiasMode::lora_only;
  c.seed = 7;
  const Mat<double> W = Mat<double>::Random(6, 5);
  lora::LoRALinear<double> layer(lora::FrozenWeight<double>::owned(W), Mat<double>::Random(1, 6), c);
  lora::pissa_init(layer);
  std::map<std::string, lora::LoRALinear<double>*> model{{"m.q", &layer}};
  const auto dir = lora_test::scratch_dir("residual-dora");
  peft::AdapterConfig config;
  config.init_lora_weights = "pissa";
  peft::save_adapter((dir / "initial").string(), model, config, st::Dtype::F64);
  layer.lora_A() += Mat<double>::Random(2, 5) * 0.1;
  layer.lora_B() += Mat<double>::Random(6, 2) * 0.1;
  layer.magnitude() *= 1.1;
  layer.bias().array() += 0.5;
  peft::save_adapter_converted((dir / "plain").string(), model, (dir / "initial").string(), config, st::Dtype::F64);

  // The converted adapter over the original W gives the trained layer's outputs.
  const auto plain = peft::read_adapter<double>((dir / "plain").string());
  CHECK(plain.config.r == 4);
  CHECK(plain.config.lora_alpha == 8);
  CHECK(plain.config.use_dora);
  lora::LoRALinear<double> fresh(lora::FrozenWeight<double>::owned(W), Mat<double>::Zero(1, 6),
                                 plain.config.layer_config("m.q"));
  peft::load_adapter((dir / "plain").string(), std::map<std::string, lora::LoRALinear<double>*>{{"m.q", &fresh}});
  const Mat<double> x = Mat<double>::Random(4, 5);
  layer.eval();
  CHECK(lora_test::max_rel_diff(fresh.forward(x), layer.forward(x)) < 1e-12);
  std::filesystem::remove_all(dir);
}

TEST_CASE("Residual adapters that cannot be applied as PEFT does are refused, and nothing changes",
          "[pissa][peft][errors]") {
  const auto dir = lora_test::scratch_dir("residual-bad");
  const auto base = st::File::open(data_dir + "/base.safetensors");

  SECTION("a read-only view cannot take the residual") {
    auto model = make_model(base, "pissa", false);
    const std::string message = lora_test::error_of([&] { peft::load_adapter(data_dir + "/pissa", model.by_path); });
    CHECK_THAT(message, Contains("init_lora_weights \"pissa\"") && Contains("read-only"));
    for (const auto& [path, layer] : model.by_path) CHECK(layer->lora_B().isZero());
  }

  SECTION("inits no one can reproduce from the base alone") {
    for (const std::string value : {"\"pissa_niter_4\"", "\"corda\"", "\"loftq\"", "\"lora_ga\"", "\"fancy\"", "3"}) {
      CAPTURE(value);
      const auto folder = dir / ("init-" + std::to_string(std::hash<std::string>{}(value)));
      copy_with_init(data_dir + "/pissa", folder, value);
      auto model = make_model(base, "pissa", true);
      const Mat<float> before = model.layers[0]->frozen_weight().stored();
      const std::string message = lora_test::error_of([&] { peft::load_adapter(folder.string(), model.by_path); });
      CHECK_THAT(message, Contains("init_lora_weights " + value));
      CHECK(model.layers[0]->frozen_weight().stored() == before);
      CHECK(model.layers[0]->lora_B().isZero());
      CHECK_THAT(lora_test::error_of([&] {
                   peft::merge_adapter_file(data_dir + "/base.safetensors", folder.string(),
                                            (dir / "never.safetensors").string());
                 }),
                 Contains("init_lora_weights " + value));
      CHECK_FALSE(std::filesystem::exists(dir / "never.safetensors"));
    }
    // The fast PiSSA message says what to do instead.
    copy_with_init(data_dir + "/pissa", dir / "niter", "\"pissa_niter_4\"");
    auto model = make_model(base, "pissa", true);
    CHECK_THAT(lora_test::error_of([&] { peft::load_adapter((dir / "niter").string(), model.by_path); }),
               Contains("random") && Contains("convert"));
  }

  SECTION("inits that leave the base alone load as plain adapters") {
    for (const std::string value : {"true", "false", "\"gaussian\"", "\"orthogonal\"", "\"eva\"", "\"mica\""}) {
      CAPTURE(value);
      const auto folder = dir / ("plain-" + std::to_string(std::hash<std::string>{}(value)));
      copy_with_init(data_dir + "/pissa", folder, value);
      auto model = make_model(base, "pissa", false);  // read-only views: nothing is rewritten
      const auto report = peft::load_adapter(folder.string(), model.by_path);
      CHECK(report.rewritten.empty());
      CHECK(report.loaded.size() == 2);
    }
  }

  SECTION("a shared base, GGUF, OLoRA on a square Conv1D weight, r too large") {
    const auto adapter = peft::read_adapter<float>(data_dir + "/pissa");
    std::vector<std::unique_ptr<lora::MultiLoRALinear<float>>> multis;
    std::map<std::string, lora::MultiLoRALinear<float>*> multi_model;
    for (const auto& path : module_paths.at("pissa")) {
      multis.push_back(std::make_unique<lora::MultiLoRALinear<float>>(
          lora::FrozenWeight<float>::owned(base.matrix<float>(base_tensor(path) + ".weight"))));
      multi_model[path] = multis.back().get();
    }
    CHECK_THAT(lora_test::error_of([&] { peft::load_adapter(adapter, "p", multi_model); }),
               Contains("shared with other adapters"));
    for (const auto& [path, layer] : multi_model) CHECK_FALSE(layer->has_adapter("p"));
    lora::gguf::Writer writer;
    CHECK_THAT(lora_test::error_of([&] { lora::gguf::export_adapter(adapter, lora::gguf::ExportOptions{}, writer); }),
               Contains("residual") && Contains("convert"));

    lora::LoraConfig c;
    c.r = 2;
    lora::LoRALinear<float> square(
        lora::FrozenWeight<float>::owned(Mat<float>::Random(5, 5), lora::WeightLayout::in_out), c);
    const Mat<float> before = square.frozen_weight().stored();
    CHECK_THAT(lora_test::error_of([&] { lora::olora_init(square); }),
               Contains("olora_init") && Contains("square") && Contains("(in, out)"));
    CHECK(square.frozen_weight().stored() == before);
    const Mat<float> w = Mat<float>::Random(6, 4);
    CHECK_THAT(lora_test::error_of(
                   [&] { lora::peft_init_factors<float>(w, false, lora::ResidualInit::pissa, 5, 1.0, "c_fc"); }),
               Contains("c_fc") && Contains("r 5"));
  }

  SECTION("a conversion whose initial adapter does not fit, and rsLoRA with patterns") {
    copy_with_init(data_dir + "/olora_initial", dir / "other", "\"olora\"");
    CHECK_THAT(lora_test::error_of([&] {
                 peft::convert_residual_adapter(peft::read_adapter<float>(data_dir + "/pissa"),
                                                peft::read_adapter<float>((dir / "other").string()));
               }),
               Contains("model.layers.0.self_attn.q_proj") && Contains("no linear module"));
    auto trained = peft::read_adapter<float>(data_dir + "/pissa");
    trained.config.use_rslora = true;
    CHECK_THAT(lora_test::error_of([&] {
                 peft::convert_residual_adapter(std::move(trained),
                                                peft::read_adapter<float>(data_dir + "/pissa_initial"));
               }),
               Contains("rsLoRA") && Contains("pattern"));
  }
  std::filesystem::remove_all(dir);
}

}  // namespace unit_residual_files
