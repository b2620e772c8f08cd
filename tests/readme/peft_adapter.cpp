// README.md's snippet under "Adapter files (PEFT)", built and run as written: extract_snippets.cmake cuts it out
// into peft_adapter.inc at build time. What the README leaves out is here: the frozen weights W_q and W_v, and a
// folder my-adapter to read, which this program writes first (ctest runs it in a folder of its own). Then it
// checks what the snippet promises: both modules loaded for inference, and my-adapter-v2 holding them again.
#include <lora/lora.hpp>

#include <cstdio>
#include <filesystem>
#include <map>
#include <string>

namespace {
int failed(const std::string& what) {
  std::fprintf(stderr, "README snippet (Adapter files): %s\n", what.c_str());
  return 1;
}
}  // namespace

int main() {
  namespace fs = std::filesystem;
  for (const char* dir : {"my-adapter", "my-adapter-v2"}) fs::remove_all(dir);
  using Mat = lora::Matrix<float>;
  const Mat W_q = Mat::Random(24, 16), W_v = Mat::Random(20, 16);  // (O, I), as the checkpoint has them

  // my-adapter: q_proj at rank 4 (alpha 8), v_proj at rank 2 through rank_pattern, B not zero.
  Mat saved_B_q, saved_A_v;
  {
    lora::peft::AdapterConfig config;
    config.r = 4;
    config.lora_alpha = 8;
    config.target_modules = {"q_proj", "v_proj"};
    config.rank_pattern = {{"v_proj", 2}};
    lora::LoRALinear<float> q(W_q, config.layer_config("model.layers.0.self_attn.q_proj"));
    lora::LoRALinear<float> v(W_v, config.layer_config("model.layers.0.self_attn.v_proj"));
    q.lora_B().setRandom();
    v.lora_B().setRandom();
    saved_B_q = q.lora_B();
    saved_A_v = v.lora_A();
    const std::map<std::string, lora::LoRALinear<float>*> layers{{"model.layers.0.self_attn.q_proj", &q},
                                                                 {"model.layers.0.self_attn.v_proj", &v}};
    lora::peft::save_adapter("my-adapter", layers, config);
  }

  lora::peft::LoadReport loaded;
  {
#include "peft_adapter.inc"
    if (q.is_training() || v.is_training()) return failed("load_adapter left a layer in training mode");
    if (v.rank() != 2) return failed("rank_pattern was not honoured: v_proj has rank " + std::to_string(v.rank()));
    loaded = report;
  }
  if (loaded.loaded.size() != 2)
    return failed("load_adapter loaded " + std::to_string(loaded.loaded.size()) + " modules");

  // my-adapter-v2 holds what was loaded: read it back into fresh layers.
  const auto config = lora::peft::AdapterConfig::read("my-adapter-v2/adapter_config.json");
  lora::LoRALinear<float> q(W_q, config.layer_config("model.layers.0.self_attn.q_proj"));
  lora::LoRALinear<float> v(W_v, config.layer_config("model.layers.0.self_attn.v_proj"));
  const std::map<std::string, lora::LoRALinear<float>*> layers{{"model.layers.0.self_attn.q_proj", &q},
                                                               {"model.layers.0.self_attn.v_proj", &v}};
  lora::peft::load_adapter("my-adapter-v2", layers);
  if (q.lora_B() != saved_B_q || v.lora_A() != saved_A_v) return failed("my-adapter-v2 does not hold my-adapter");
  std::puts("README snippet (Adapter files): built, ran, and my-adapter-v2 holds my-adapter");
}
