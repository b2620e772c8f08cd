// LoRALinear layers over the base weights of a golden model, for the tests that load PEFT folders into them
// (unit-dora.cpp, unit-residual-files.cpp).
#pragma once

#include <lora/lora.hpp>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace lora_test {

/// The layers of one model and the map load_adapter / save_adapter take.
struct LinearModel {
  std::vector<std::unique_ptr<lora::LoRALinear<float>>> layers;
  std::map<std::string, lora::LoRALinear<float>*> by_path;
};

/// The base tensor's name for a module path: GPT-2's checkpoints have no "transformer." prefix.
inline std::string base_tensor(const std::string& path) {
  return path.rfind("transformer.", 0) == 0 ? path.substr(12) : path;
}

/// A LoRALinear per module path over "<base_tensor(path)>.weight" of `base`: a read-only view of the mmap'd file,
/// or an owned copy when `writable` (merging and residual loads write it); stored (in, out) when the adapter's
/// config says fan_in_fan_out. Each layer gets the config's layer_config(path), and "<name>.bias" when `with_bias`.
inline LinearModel linear_model(const lora::safetensors::File& base, const lora::peft::AdapterConfig& config,
                                const std::vector<std::string>& paths, bool writable, bool with_bias) {
  LinearModel model;
  const auto layout = config.fan_in_fan_out ? lora::WeightLayout::in_out : lora::WeightLayout::out_in;
  for (const auto& path : paths) {
    const std::string name = base_tensor(path);
    const auto w = base.view<float>(name + ".weight");
    const lora::Index out = config.fan_in_fan_out ? w.cols() : w.rows();
    const lora::Index in = config.fan_in_fan_out ? w.rows() : w.cols();
    auto weight = writable ? lora::FrozenWeight<float>::owned(w, layout)
                           : lora::FrozenWeight<float>::view(w.data(), out, in, layout);
    model.layers.push_back(
        with_bias ? std::make_unique<lora::LoRALinear<float>>(std::move(weight), base.matrix<float>(name + ".bias"),
                                                              config.layer_config(path))
                  : std::make_unique<lora::LoRALinear<float>>(std::move(weight), config.layer_config(path)));
    model.by_path[path] = model.layers.back().get();
  }
  return model;
}

}  // namespace lora_test
