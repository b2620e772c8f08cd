// PEFT adapter folders for the GPT-2 of model.hpp, with GPT2LMHeadModel's module names
// ("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"), as PEFT reads and writes them.
#pragma once

#include "model.hpp"

#include <lora/errors.hpp>
#include <lora/peft.hpp>
#include <lora/targets.hpp>

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace gpt {

/// Adds to `model` the LoRA layers a PEFT adapter folder describes, chosen by its own target_modules rules over
/// the model's module names (lora::peft::select_targets), then loads its tensors (lora::peft::load_adapter:
/// every missing or unexpected module and every shape mismatch is reported before anything is loaded).
template <class S>
void load_adapter(Model<S>& model, const std::string& dir, bool trainable = false) {
  namespace peft = lora::peft;
  for (const auto& p : model.projections())
    if (p.adapted())
      throw lora::state_error("gpt::load_adapter: the model already has an adapter on \"" + p.name() + "\"");
  const auto config = peft::AdapterConfig::read((std::filesystem::path(dir) / peft::config_file_name).string());
  const auto modules = peft::select_targets(model.module_names(), config);
  std::map<std::string, lora::LoRALinear<S>*> layers;
  for (const auto& m : modules) {
    if (m == "transformer.wte" || m == "transformer.wpe")
      throw lora::config_error(dir + ": the adapter adapts the embedding \"" + m +
                               "\"; this example adapts the Conv1D projections only");
    layers[m] = &model.add_lora(m, config.layer_config(m));
  }
  peft::LoadOptions options;
  options.is_trainable = trainable;
  try {
    peft::load_adapter(dir, layers, options);
  } catch (...) {
    model.remove_adapters();
    throw;
  }
}

/// The model's adapters as one PEFT folder: fused q, k, v slices as the exact LoRA on c_attn (to_lora()).
template <class S>
void save_adapter(Model<S>& model, const std::string& dir, const std::string& base_model) {
  namespace peft = lora::peft;
  std::vector<std::unique_ptr<lora::LoRALinear<S>>> exported;
  std::map<std::string, lora::LoRALinear<S>*> layers;
  std::vector<std::string> suffixes;
  for (auto& p : model.projections()) {
    if (p.lora()) layers[p.name()] = p.lora();
    if (p.fused()) {
      exported.push_back(std::make_unique<lora::LoRALinear<S>>(p.fused()->to_lora()));
      layers[p.name()] = exported.back().get();
    }
    if (p.adapted()) {
      const std::string suffix = p.name().substr(p.name().find('.', p.name().find(".h.") + 3) + 1);
      if (std::find(suffixes.begin(), suffixes.end(), suffix) == suffixes.end()) suffixes.push_back(suffix);
    }
  }
  peft::AdapterConfig config;
  config.task_type = "CAUSAL_LM";
  config.base_model_name_or_path = base_model;
  std::sort(suffixes.begin(), suffixes.end());
  config.target_modules = suffixes;  // "attn.c_proj", not "c_proj", which would take mlp.c_proj too
  peft::save_adapter(dir, layers, config);
}

}  // namespace gpt
