// The GPT-2 of examples/gpt against finite differences (double) and against PyTorch
// (tests/golden/make_gpt_golden.py: a GPT-2 written from Hugging Face's modeling_gpt2.py, with a PEFT adapter).
#include <gpt/adapters.hpp>
#include <gpt/checkpoint.hpp>
#include <gpt/model.hpp>
#include <gpt/train.hpp>

#include <lora/peft.hpp>
#include <lora/safetensors.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

gpt::Config tiny_config() {
  gpt::Config c;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 8;
  c.n_positions = 8;
  c.vocab_size = 11;
  return c;
}

// Weights far from GPT-2's small init, so every path carries signal.
std::shared_ptr<gpt::Weights<double>> random_weights(const gpt::Config& c, std::uint64_t seed) {
  auto w = std::make_shared<gpt::Weights<double>>(gpt::Weights<double>::zeros(c));
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 0.4);
  for (std::size_t i = 0; i < w->specs.size(); ++i) {
    double* p = w->mutable_data(static_cast<int>(i));
    const bool ln_weight =
        w->specs[i].name.find("ln_") != std::string::npos && w->specs[i].name.find(".weight") != std::string::npos;
    for (lora::Index k = 0; k < w->specs[i].size(); ++k) p[k] = (ln_weight ? 1.0 : 0.0) + normal(rng);
  }
  return w;
}

struct Batch {
  std::vector<int> tokens, targets;
  lora::Index B, T;
};

Batch random_batch(const gpt::Config& c, lora::Index B, lora::Index T, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> id(0, c.vocab_size - 1);
  Batch b{{}, {}, B, T};
  for (lora::Index n = 0; n < B * T; ++n) {
    b.tokens.push_back(id(rng));
    b.targets.push_back(id(rng));
  }
  b.tokens[3] = b.tokens[1];  // a repeated id
  return b;
}

// Central differences for up to 48 entries of every trainable tensor (evenly spread), against backward().
void check_all_parameters(gpt::Model<double>& model, const Batch& b) {
  model.zero_grad();
  model.forward_loss(b.tokens.data(), b.targets.data(), b.B, b.T);
  model.backward();
  auto loss = [&] { return model.forward_loss(b.tokens.data(), b.targets.data(), b.B, b.T); };
  const double eps = 1e-6;
  int checked = 0;
  for (auto& p : model.parameters()) {
    const lora::Matrix<double> analytic = p.grad_matrix();
    CHECK(analytic.cwiseAbs().maxCoeff() > 0);  // every parameter gets signal
    const lora::Index step = std::max<lora::Index>(1, p.size() / 48);
    for (lora::Index k = 0; k < p.size(); k += step) {
      const double saved = p.value[k];
      p.value[k] = saved + eps;
      const double up = loss();
      p.value[k] = saved - eps;
      const double down = loss();
      p.value[k] = saved;
      const double numeric = (up - down) / (2 * eps);
      INFO(p.name << "[" << k << "]: analytic " << analytic.data()[k] << ", numeric " << numeric);
      CHECK(std::abs(analytic.data()[k] - numeric) <= 1e-8 + 1e-5 * std::abs(numeric));
      ++checked;
    }
  }
  CHECK(checked > 100);
}

}  // namespace

TEST_CASE("GPT: full fine-tuning gradients of every tensor match finite differences", "[gpt]") {
  const auto c = tiny_config();
  gpt::Model<double> model(random_weights(c, 1));
  model.set_train_base(true);
  const auto params = model.parameters();
  REQUIRE(params.size() == gpt::tensor_specs(c).size());
  check_all_parameters(model, random_batch(c, 2, 5, 2));
}

TEST_CASE("GPT: LoRA gradients on c_attn slices, c_proj and c_fc match finite differences", "[gpt]") {
  const auto c = tiny_config();
  gpt::Model<double> model(random_weights(c, 3));
  lora::LoraConfig cfg;
  cfg.r = 2;
  cfg.lora_alpha = 4;
  cfg.init_lora_weights = lora::InitLoraWeights::random;  // B nonzero, so dA is not zero
  lora::LoraConfig frozen;
  frozen.r = 0;
  model.add_qkv_lora("transformer.h.0.attn.c_attn", cfg, frozen, cfg);
  model.add_lora("transformer.h.1.attn.c_attn", cfg);
  model.add_lora("transformer.h.0.attn.c_proj", cfg);
  model.add_lora("transformer.h.1.mlp.c_fc", cfg);
  model.add_lora("transformer.h.0.mlp.c_proj", cfg);
  REQUIRE(model.parameters().size() == 12);  // q and v slices: 4, four LoRALinear: 8
  check_all_parameters(model, random_batch(c, 2, 6, 4));
}

TEST_CASE("GPT: an adapter whose B is zero leaves the logits exactly the base model's", "[gpt]") {
  const auto c = tiny_config();
  auto w = random_weights(c, 5);
  gpt::Model<double> base(w), adapted(w);
  lora::LoraConfig cfg;
  cfg.r = 4;
  adapted.add_qkv_lora("transformer.h.1.attn.c_attn", cfg, cfg, cfg);
  adapted.add_lora("transformer.h.0.mlp.c_fc", cfg);
  const auto b = random_batch(c, 1, 8, 6);
  const lora::Matrix<double> want = base.forward(b.tokens.data(), 1, 8);
  CHECK(adapted.forward(b.tokens.data(), 1, 8) == want);
}

TEST_CASE("GPT: causal: a token's logits do not depend on later tokens", "[gpt]") {
  const auto c = tiny_config();
  gpt::Model<double> model(random_weights(c, 7));
  auto b = random_batch(c, 1, 7, 8);
  const lora::Matrix<double> before = model.forward(b.tokens.data(), 1, 7);
  b.tokens[6] = (b.tokens[6] + 1) % c.vocab_size;
  const lora::Matrix<double> after = model.forward(b.tokens.data(), 1, 7);
  CHECK(after.topRows(6) == before.topRows(6));
  CHECK(after.row(6) != before.row(6));
  // A shorter sequence gives the same rows for the positions it has.
  const lora::Matrix<double> prefix = model.forward(b.tokens.data(), 1, 4);
  CHECK((prefix - after.topRows(4)).cwiseAbs().maxCoeff() < 1e-12);
}

TEST_CASE("GPT: bad tokens, lengths and modules are refused by name", "[gpt]") {
  const auto c = tiny_config();
  gpt::Model<double> model(random_weights(c, 9));
  std::vector<int> tokens{1, 2, 11, 3};
  CHECK_THROWS_WITH(model.forward(tokens.data(), 1, 4),
                    Catch::Contains("token at position 2 is 11, expected an id in [0, 11)"));
  std::vector<int> long_tokens(9, 1);
  CHECK_THROWS_WITH(model.forward(long_tokens.data(), 1, 9), Catch::Contains("9 tokens are more than n_positions = 8"));
  lora::LoraConfig cfg;
  CHECK_THROWS_WITH(model.add_lora("transformer.h.0.attn.c_atn", cfg),
                    Catch::Contains("no projection named \"transformer.h.0.attn.c_atn\""));
  CHECK_THROWS_WITH(model.add_lora("transformer.wte", cfg), Catch::Contains("an embedding"));
  CHECK_THROWS_AS(model.backward(), lora::state_error);
  model.add_lora("transformer.h.0.mlp.c_fc", cfg);
  CHECK_THROWS_AS(model.set_train_base(true), lora::state_error);
}

// ---- against PyTorch ------------------------------------------------------------------------------

namespace {

const std::string golden_dir = std::string(LORA_TEST_DATA_DIR) + "/gpt/golden";

struct Golden {
  lora::safetensors::File file = lora::safetensors::File::open(golden_dir + "/golden.safetensors");

  std::vector<int> ids(const std::string& name) const {
    const auto& t = file.at(name);
    REQUIRE(t.dtype == lora::safetensors::Dtype::I64);
    std::vector<std::int64_t> raw(t.numel());
    file.read_bytes(t, 0, raw.data(), raw.size() * sizeof(std::int64_t));
    return std::vector<int>(raw.begin(), raw.end());
  }
  lora::Matrix<double> matrix(const std::string& name) const { return file.matrix<double>(name); }
  double scalar(const std::string& name) const {
    double v = 0;
    file.convert_into(file.at(name), &v);
    return v;
  }
};

// max |a − b| / max(1, max |b|): the error relative to the logits' scale.
double relative_error(const lora::Matrix<double>& a, const lora::Matrix<double>& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  return (a - b).cwiseAbs().maxCoeff() / std::max(1.0, b.cwiseAbs().maxCoeff());
}

// The golden logits (B, T, V) as B·T rows of V.
lora::Matrix<double> logits_rows(const Golden& g, const std::string& name, lora::Index V) {
  const auto& t = g.file.at(name);
  lora::Matrix<double> m(static_cast<lora::Index>(t.numel()) / V, V);
  g.file.convert_into(t, m.data());
  return m;
}

}  // namespace

TEST_CASE("GPT: logits, loss and every full fine-tuning gradient equal PyTorch's GPT-2", "[gpt][golden]") {
  const Golden g;
  auto w = std::make_shared<gpt::Weights<double>>(gpt::load_model<double>(golden_dir + "/model", gpt::LoadMode::copy));
  const auto& c = w->config;
  REQUIRE(c.n_layer == 2);
  REQUIRE(c.n_head == 3);
  gpt::Model<double> model(w);
  model.set_train_base(true);
  const auto tokens = g.ids("tokens"), targets = g.ids("targets");
  const lora::Index B = 2, T = static_cast<lora::Index>(tokens.size()) / 2;
  CHECK(relative_error(model.forward(tokens.data(), B, T), logits_rows(g, "logits", c.vocab_size)) < 1e-12);
  model.zero_grad();
  const double loss = model.forward_loss(tokens.data(), targets.data(), B, T);
  CHECK(std::abs(loss - g.scalar("loss")) < 1e-12);
  model.backward();
  int checked = 0;
  for (auto& p : model.parameters()) {
    const lora::Matrix<double> want = g.matrix("grad." + p.name);
    const lora::Matrix<double> got = Eigen::Map<const lora::Matrix<double>>(p.grad, want.rows(), want.cols());
    INFO(p.name);
    CHECK(relative_error(got, want) < 1e-11);
    ++checked;
  }
  CHECK(checked == 2 + 12 * c.n_layer + 2);
}

TEST_CASE("GPT: a PEFT adapter on c_attn, c_proj and c_fc gives PyTorch's logits and LoRA gradients", "[gpt][golden]") {
  const Golden g;
  auto w = std::make_shared<gpt::Weights<double>>(gpt::load_model<double>(golden_dir + "/model", gpt::LoadMode::copy));
  gpt::Model<double> model(w);
  gpt::load_adapter(model, golden_dir + "/adapter", /*trainable=*/true);
  int adapted = 0;
  for (const auto& p : model.projections()) adapted += p.adapted();
  CHECK(adapted == 4 * w->config.n_layer);  // "c_proj" takes attn.c_proj and mlp.c_proj, as in PEFT
  const auto tokens = g.ids("tokens"), targets = g.ids("targets");
  const lora::Index B = 2, T = static_cast<lora::Index>(tokens.size()) / 2;
  model.eval();
  CHECK(relative_error(model.forward(tokens.data(), B, T), logits_rows(g, "logits_adapter", w->config.vocab_size)) <
        1e-12);
  model.train();
  model.zero_grad();
  CHECK(std::abs(model.forward_loss(tokens.data(), targets.data(), B, T) - g.scalar("loss_adapter")) < 1e-12);
  model.backward();
  int checked = 0;
  for (auto& p : model.parameters()) {
    const lora::Matrix<double> want = g.matrix("grad." + p.name);
    INFO(p.name);
    CHECK(relative_error(Eigen::Map<const lora::Matrix<double>>(p.grad, want.rows(), want.cols()), want) < 1e-11);
    ++checked;
  }
  CHECK(checked == 2 * 4 * w->config.n_layer);
  // Disabled, the adapter leaves the base model's logits exactly.
  model.enable_adapters(false);
  CHECK(relative_error(model.forward(tokens.data(), B, T), logits_rows(g, "logits", w->config.vocab_size)) < 1e-12);
}

TEST_CASE("GPT: LoRA on the q and v slices of c_attn gives PyTorch's MergedLinear logits and gradients",
          "[gpt][golden]") {
  const Golden g;
  auto w = std::make_shared<gpt::Weights<double>>(gpt::load_model<double>(golden_dir + "/model", gpt::LoadMode::view));
  gpt::Model<double> model(w);
  lora::LoraConfig cfg, off;
  cfg.r = 2;
  cfg.lora_alpha = 4;
  off.r = 0;
  for (int l = 0; l < w->config.n_layer; ++l) {
    const std::string name = gpt::Model<double>::module_name(l, 0);
    auto& fused = model.add_qkv_lora(name, cfg, off, cfg);
    for (const char* slice : {"q", "v"}) {
      const auto k = fused.slice_index(slice);
      fused.lora_A(k) = g.matrix("slices." + name + "." + slice + ".lora_A");
      fused.lora_B(k) = g.matrix("slices." + name + "." + slice + ".lora_B");
    }
  }
  const auto tokens = g.ids("tokens"), targets = g.ids("targets");
  const lora::Index B = 2, T = static_cast<lora::Index>(tokens.size()) / 2;
  model.zero_grad();
  CHECK(std::abs(model.forward_loss(tokens.data(), targets.data(), B, T) - g.scalar("loss_slices")) < 1e-12);
  model.backward();
  int checked = 0;
  for (auto& p : model.parameters()) {
    const lora::Matrix<double> want = g.matrix("grad_slices." + p.name);
    INFO(p.name);
    CHECK(relative_error(Eigen::Map<const lora::Matrix<double>>(p.grad, want.rows(), want.cols()), want) < 1e-11);
    ++checked;
  }
  CHECK(checked == 4 * w->config.n_layer);
  model.eval();
  CHECK(relative_error(model.forward(tokens.data(), B, T), logits_rows(g, "logits_slices", w->config.vocab_size)) <
        1e-12);
}

TEST_CASE("GPT: float models, F16 and BF16 checkpoints and greedy decoding agree with PyTorch", "[gpt][golden]") {
  const Golden g;
  const auto tokens = g.ids("tokens");
  const lora::Index B = 2, T = static_cast<lora::Index>(tokens.size()) / 2;
  for (const auto& [folder, logits] : {std::pair<std::string, std::string>{"model", "logits"},
                                       {"model_f16", "logits_f16"},
                                       {"model_bf16", "logits_bf16"}}) {
    auto w = std::make_shared<gpt::Weights<float>>(gpt::load_model<float>(golden_dir + "/" + folder));
    CHECK_FALSE(w->is_owned());
    gpt::Model<float> model(w);
    const lora::Matrix<double> got = model.forward(tokens.data(), B, T).cast<double>();
    INFO(folder);
    CHECK(relative_error(got, logits_rows(g, logits, w->config.vocab_size)) < 1e-5);
  }
  auto w = std::make_shared<gpt::Weights<float>>(gpt::load_model<float>(golden_dir + "/model"));
  gpt::Model<float> model(w);
  gpt::load_adapter(model, golden_dir + "/adapter");
  const lora::Matrix<double> got = model.forward(tokens.data(), B, T).cast<double>();
  CHECK(relative_error(got, logits_rows(g, "logits_adapter", w->config.vocab_size)) < 1e-5);
  model.remove_adapters();
  CHECK(gpt::generate(model, g.ids("generate.prompt"), 5, 0.0, 0, 1) == g.ids("generate.greedy"));
}

// ---- checkpoint folders and bad input -----------------------------------------------------------------

namespace {

std::string fresh_dir(const std::string& name) {
  const std::string dir = std::string(LORA_TEST_TMP_DIR) + "/gpt/" + name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// The golden model's folder with model.safetensors rewritten by `edit` (name, matrix) -> keep?
template <class Edit>
std::string edited_model(const std::string& name, Edit edit) {
  const std::string dir = fresh_dir(name);
  std::filesystem::copy_file(golden_dir + "/model/config.json", dir + "/config.json");
  const auto file = lora::safetensors::File::open(golden_dir + "/model/model.safetensors");
  lora::safetensors::Writer w;
  for (const auto& t : file.tensors()) {
    lora::Matrix<float> m(1, static_cast<lora::Index>(t.numel()));
    file.convert_into(t, m.data());
    std::vector<std::uint64_t> shape = t.shape;
    if (edit(t.name, m, shape)) w.add(t.name, m, lora::safetensors::Dtype::F32, shape);
  }
  w.save(dir + "/model.safetensors");
  return dir;
}

}  // namespace

TEST_CASE("GPT: a saved model reads back bit for bit, F32 in place", "[gpt]") {
  const auto w = gpt::load_model<float>(golden_dir + "/model", gpt::LoadMode::copy);
  CHECK(w.is_owned());
  const std::string dir = fresh_dir("saved");
  gpt::save_model(dir, w);
  const auto back = gpt::load_model<float>(dir);
  CHECK_FALSE(back.is_owned());  // viewed in the mapped file
  REQUIRE(back.specs.size() == w.specs.size());
  for (std::size_t i = 0; i < w.specs.size(); ++i)
    CHECK(std::equal(w.data[i], w.data[i] + w.specs[i].size(), back.data[i]));
  CHECK(back.config.to_json() == w.config.to_json());
  // The hub's GPT-2 layout: names without "transformer.", the causal-mask buffers beside them.
  const std::string hub = edited_model("hub", [](const std::string&, lora::Matrix<float>&, auto&) { return true; });
  {
    const auto file = lora::safetensors::File::open(golden_dir + "/model/model.safetensors");
    lora::safetensors::Writer writer;
    for (const auto& t : file.tensors()) {
      lora::Matrix<float> m(1, static_cast<lora::Index>(t.numel()));
      file.convert_into(t, m.data());
      writer.add(t.name.substr(std::string("transformer.").size()), m, lora::safetensors::Dtype::F32, t.shape);
    }
    writer.add("h.0.attn.bias", lora::Matrix<float>::Ones(1, 4), lora::safetensors::Dtype::F32, {1, 1, 2, 2});
    writer.save(hub + "/model.safetensors");
  }
  const auto from_hub = gpt::load_model<float>(hub);
  for (std::size_t i = 0; i < w.specs.size(); ++i)
    CHECK(std::equal(w.data[i], w.data[i] + w.specs[i].size(), from_hub.data[i]));
}

TEST_CASE("GPT: a checkpoint that is not the model config.json describes is refused by name", "[gpt]") {
  const auto missing = edited_model(
      "missing", [](const std::string& name, auto&, auto&) { return name != "transformer.h.1.mlp.c_fc.bias"; });
  CHECK_THROWS_WITH(
      gpt::load_model<float>(missing),
      Catch::Contains("tensor \"transformer.h.1.mlp.c_fc.bias\" is missing") && Catch::Contains("shape [96]"));
  const auto wrong = edited_model("wrong-shape", [](const std::string& name, lora::Matrix<float>&, auto& shape) {
    if (name == "transformer.h.0.attn.c_proj.weight") shape = {12, 48};
    return true;
  });
  CHECK_THROWS_WITH(gpt::load_model<float>(wrong),
                    Catch::Contains("tensor \"transformer.h.0.attn.c_proj.weight\" has shape [12, 48], config.json's "
                                    "model needs [24, 24]"));
  const auto extra = edited_model("extra", [](const std::string&, auto&, auto&) { return true; });
  {
    lora::safetensors::Writer w;
    const auto file = lora::safetensors::File::open(extra + "/model.safetensors");
    for (const auto& t : file.tensors())
      w.add(t.name, file.matrix<float>(t.name), lora::safetensors::Dtype::F32, t.shape);
    w.add("transformer.h.2.ln_1.weight", lora::Matrix<float>::Ones(1, 24), lora::safetensors::Dtype::F32, {24});
    w.save(extra + "/model.safetensors");
  }
  CHECK_THROWS_WITH(gpt::load_model<float>(extra),
                    Catch::Contains("\"transformer.h.2.ln_1.weight\" is not part of a GPT-2 model"));
  const auto nan = edited_model("nan", [](const std::string& name, lora::Matrix<float>& m, auto&) {
    if (name == "transformer.wpe.weight") m(0, 5) = std::numeric_limits<float>::quiet_NaN();
    return true;
  });
  CHECK_THROWS_WITH(gpt::load_model<float>(nan),
                    Catch::Contains("\"transformer.wpe.weight\" holds a non-finite value at index 5"));
}

TEST_CASE("GPT: config.json missing, unreadable or inconsistent is refused with the file and the field", "[gpt]") {
  const std::string dir = fresh_dir("config");
  CHECK_THROWS_WITH(gpt::read_config(dir), Catch::Contains(dir + "/config.json") && Catch::Contains("config.json"));
  write_text(dir + "/config.json", "{\"n_layer\": 2,");
  CHECK_THROWS_AS(gpt::read_config(dir), lora::format_error);
  write_text(dir + "/config.json",
             R"({"model_type": "gpt2", "n_layer": 2, "n_head": 5, "n_embd": 24, "n_positions": 16, "vocab_size": 37})");
  CHECK_THROWS_WITH(gpt::read_config(dir), Catch::Contains("n_embd (24) must be a multiple of n_head (5)"));
  write_text(dir + "/config.json",
             R"({"model_type": "gpt2", "n_layer": 2, "n_head": 3, "n_embd": 24, "vocab_size": 37})");
  CHECK_THROWS_WITH(gpt::read_config(dir), Catch::Contains("\"n_positions\" is missing"));
  write_text(
      dir + "/config.json",
      R"({"model_type": "gpt2", "n_layer": 2.5, "n_head": 3, "n_embd": 24, "n_positions": 16, "vocab_size": 37})");
  CHECK_THROWS_WITH(gpt::read_config(dir), Catch::Contains("\"n_layer\" must be an integer, got 2.5"));
  write_text(dir + "/config.json", R"({"model_type": "llama", "n_layer": 2, "n_head": 3, "n_embd": 24,
                                       "n_positions": 16, "vocab_size": 37})");
  CHECK_THROWS_WITH(gpt::read_config(dir), Catch::Contains("model_type must be \"gpt2\""));
}

TEST_CASE("GPT: an adapter made for another model size is refused, and the model keeps no adapter", "[gpt]") {
  gpt::Config other;
  other.n_layer = 2;
  other.n_head = 2;
  other.n_embd = 16;
  other.n_positions = 16;
  other.vocab_size = 37;
  gpt::Model<float> small(std::make_shared<gpt::Weights<float>>(gpt::Weights<float>::initialized(other, 1)));
  lora::LoraConfig cfg;
  cfg.r = 4;
  lora::LoraConfig off;
  off.r = 0;
  for (int l = 0; l < 2; ++l) small.add_qkv_lora(gpt::Model<float>::module_name(l, 0), cfg, off, cfg);
  const std::string dir = fresh_dir("other-size-adapter");
  gpt::save_adapter(small, dir, "small");
  auto w = std::make_shared<gpt::Weights<float>>(gpt::load_model<float>(golden_dir + "/model"));
  gpt::Model<float> model(w);
  CHECK_THROWS_WITH(gpt::load_adapter(model, dir),
                    Catch::Contains("transformer.h.0.attn.c_attn.lora_A.weight: expected (8, 24), got (8, 16)"));
  for (const auto& p : model.projections()) CHECK_FALSE(p.adapted());
  // Saved and read back on a model of its own size, it is the same adapter.
  gpt::Model<float> again(small.shared_weights());
  gpt::load_adapter(again, dir);
  std::vector<int> tokens{1, 5, 9, 2, 36, 0};
  small.eval();
  const lora::Matrix<float> want = small.forward(tokens.data(), 1, 6);
  CHECK((again.forward(tokens.data(), 1, 6) - want).cwiseAbs().maxCoeff() < 1e-6f);
}

TEST_CASE("GPT: decoding with the key/value cache gives forward()'s logits, with and without adapters", "[gpt]") {
  const auto c = tiny_config();
  auto w = random_weights(c, 11);
  gpt::Model<double> model(w);
  lora::LoraConfig cfg;
  cfg.r = 2;
  cfg.init_lora_weights = lora::InitLoraWeights::random;
  lora::LoraConfig off;
  off.r = 0;
  for (bool adapted : {false, true}) {
    if (adapted) {
      model.add_qkv_lora("transformer.h.0.attn.c_attn", cfg, off, cfg);
      model.add_lora("transformer.h.1.mlp.c_proj", cfg);
    }
    model.eval();
    const auto b = random_batch(c, 1, 8, 12);
    const lora::Matrix<double> full = model.forward(b.tokens.data(), 1, 8);
    model.reset_cache();
    const lora::Matrix<double> first = model.forward_next(b.tokens.data(), 3);  // a prompt of 3
    CHECK((first - full.topRows(3)).cwiseAbs().maxCoeff() < 1e-12);
    for (lora::Index t = 3; t < 8; ++t) {  // then one token at a time
      const lora::Matrix<double> row = model.forward_next(b.tokens.data() + t, 1);
      INFO("position " << t << (adapted ? ", adapted" : ""));
      CHECK((row - full.row(t)).cwiseAbs().maxCoeff() < 1e-12);
    }
    CHECK_THROWS_WITH(model.forward_next(b.tokens.data(), 1),
                      Catch::Contains("9 positions are more than n_positions = 8"));
    // Greedy decoding past n_positions: the cache, then the sliding window, as forward() over the last 8 tokens.
    std::vector<int> seq(b.tokens.begin(), b.tokens.begin() + 5);
    const auto got = gpt::generate(model, seq, 10, 0.0, 0, 1);
    model.eval();
    for (int want_index = 0; want_index < 10; ++want_index) {
      const lora::Index T = std::min<lora::Index>(8, static_cast<lora::Index>(seq.size()));
      const lora::Matrix<double> logits = model.forward(seq.data() + seq.size() - T, 1, T);
      int next = 0;
      logits.row(T - 1).maxCoeff(&next);
      CHECK(got[static_cast<std::size_t>(want_index)] == next);
      seq.push_back(next);
    }
  }
}

TEST_CASE("GPT: an adapter the model saves, merged by lora-merge's code, gives the adapted model's logits", "[gpt]") {
  auto w = std::make_shared<gpt::Weights<float>>(gpt::load_model<float>(golden_dir + "/model"));
  gpt::Model<float> model(w);
  lora::LoraConfig cfg;
  cfg.r = 2;
  cfg.lora_alpha = 4;
  cfg.init_lora_weights = lora::InitLoraWeights::random;  // B nonzero: the adapter changes the logits
  lora::LoraConfig off;
  off.r = 0;
  model.add_qkv_lora("transformer.h.0.attn.c_attn", cfg, off, cfg);  // saved as one LoRA on c_attn, B in blocks
  model.add_lora("transformer.h.1.attn.c_proj", cfg);
  const std::string adapter = fresh_dir("merge-adapter"), merged = fresh_dir("merged");
  gpt::save_adapter(model, adapter, golden_dir + "/model");
  const auto config = lora::peft::AdapterConfig::read(adapter + "/adapter_config.json");
  CHECK(config.fan_in_fan_out);
  CHECK(config.target_modules == std::vector<std::string>{"attn.c_attn", "attn.c_proj"});  // not mlp.c_proj
  lora::peft::merge_adapter_file(golden_dir + "/model/model.safetensors", adapter, merged + "/model.safetensors");
  std::filesystem::copy_file(golden_dir + "/model/config.json", merged + "/config.json");
  gpt::Model<float> merged_model(std::make_shared<gpt::Weights<float>>(gpt::load_model<float>(merged)));
  std::vector<int> tokens{3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8};
  model.eval();
  const lora::Matrix<float> want = model.forward(tokens.data(), 1, 12);
  model.enable_adapters(false);
  const lora::Matrix<float> base = model.forward(tokens.data(), 1, 12);
  CHECK((want - base).cwiseAbs().maxCoeff() > 1e-2f);
  CHECK((merged_model.forward(tokens.data(), 1, 12) - want).cwiseAbs().maxCoeff() < 1e-4f);
}
