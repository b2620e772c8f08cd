// Adapter files: train two adapted projections, save them as a PEFT adapter,
// load the folder into freshly built layers, and merge it into a base
// safetensors file the way lora-merge does. Exits non-zero if the reloaded
// adapter or the merged file does not reproduce the trained layers.
#include <lora/lora.hpp>

#include <cstdio>
#include <filesystem>
#include <map>
#include <string>

int main() {
  using Mat = lora::Matrix<float>;
  namespace peft = lora::peft;
  const lora::Index D = 64, N = 256;
  const std::string q_path = "model.layers.0.self_attn.q_proj", v_path = "model.layers.0.self_attn.v_proj";

  std::srand(3);
  const Mat Wq = Mat::Random(D, D) / 8.0f, Wv = Mat::Random(D, D) / 8.0f;
  const Mat x = Mat::Random(N, D);
  const Mat target = x * (Wq + Mat::Random(D, 2) * Mat::Random(2, D) / 4.0f).transpose();

  lora::LoraConfig cfg;
  cfg.r = 4;
  cfg.lora_alpha = 8;
  lora::LoRALinear<float> q(Wq, cfg), v(Wv, cfg);
  std::map<std::string, lora::LoRALinear<float>*> model{{q_path, &q}, {v_path, &v}};

  // Train both adapters towards the same low-rank shift of q.
  lora::ParameterList<float> params = q.parameters();
  for (auto& p : v.parameters()) params.push_back(p);
  lora::AdamW<float> opt(params, {/*lr*/ 1e-2, 0.9, 0.999, 1e-8, /*weight_decay*/ 0.0});
  Mat y(N, D), dy(N, D);
  for (int step = 0; step < 50; ++step) {
    q.zero_grad();
    v.zero_grad();
    for (auto* layer : {&q, &v}) {
      layer->forward(x, y);
      lora::mse_loss<float>(y, target, dy);
      layer->backward(x, dy);
    }
    opt.step();
  }
  q.eval();
  v.eval();

  const auto dir = std::filesystem::temp_directory_path() / "lora-example-adapter";
  peft::AdapterConfig config;
  config.task_type = "CAUSAL_LM";
  peft::save_adapter(dir.string(), model, config);
  std::printf("saved %s/{adapter_model.safetensors, adapter_config.json}\n", dir.string().c_str());

  // A fresh model: base weights plus whatever the saved config says each module needs.
  auto saved = peft::AdapterConfig::read((dir / "adapter_config.json").string());
  lora::LoRALinear<float> q2(Wq, saved.layer_config(q_path)), v2(Wv, saved.layer_config(v_path));
  std::map<std::string, lora::LoRALinear<float>*> fresh{{q_path, &q2}, {v_path, &v2}};
  auto report = peft::load_adapter(dir.string(), fresh);
  q2.eval();
  v2.eval();
  const bool same = q2.forward(x) == q.forward(x) && v2.forward(x) == v.forward(x);
  std::printf("loaded %zu modules; outputs equal the trained layers bit for bit: %s\n", report.loaded.size(),
              same ? "yes" : "NO");

  // Merge into a base file holding the two weights, as lora-merge does, and compare with merge().
  lora::safetensors::Writer base;
  base.add(q_path + ".weight", Wq);
  base.add(v_path + ".weight", Wv);
  base.save((dir / "base.safetensors").string());
  auto merged = peft::merge_adapter_file((dir / "base.safetensors").string(), dir.string(),
                                         (dir / "merged.safetensors").string());
  auto file = lora::safetensors::File::open((dir / "merged.safetensors").string());
  q.merge();
  const float diff = (file.view<float>(q_path + ".weight") - q.weight()).cwiseAbs().maxCoeff();
  std::printf("merged %zu weights; max |merged file - W + s·B·A| = %.3g\n", merged.merged.size(), diff);

  std::filesystem::remove_all(dir);
  return same && diff < 1e-5f ? 0 : 1;
}
