// lora-inspect DIR_OR_FILE: what a PEFT LoRA adapter holds. Prints the
// config, one row per adapted module (path, in, out, r, alpha, scaling), the
// tensors that are not LoRA matrices, and the LoRA parameter count. On a bad
// file: exit status 1 and one line on stderr naming the file and the problem.
#include <lora/peft.hpp>

#include <CLI/CLI.hpp>

#include "cli.hpp"

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <string>

namespace {

std::string number(double v) { return lora::value_string(v); }

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Print what a PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) holds."};
  std::string path;
  app.add_option("DIR_OR_FILE", path, "adapter folder, or its adapter_model.safetensors")->required();
  CLI11_PARSE(app, argc, argv);

  try {
    auto adapter = lora::peft::read_adapter<double>(path);
    const auto& c = adapter.config;
    std::string targets;
    if (c.target_modules_regex) {
      targets = "\"" + *c.target_modules_regex + "\" (regex)";
    } else {
      for (const auto& t : c.target_modules) targets += (targets.empty() ? "" : ", ") + t;
      targets = "[" + targets + "]";
    }
    std::printf("adapter: %s\n", adapter.source.c_str());
    std::printf(
        "config: peft_type LORA, r %d, lora_alpha %s, lora_dropout %s, use_rslora %s, fan_in_fan_out %s, "
        "bias %s\n",
        c.r, number(c.lora_alpha).c_str(), number(c.lora_dropout).c_str(), c.use_rslora ? "true" : "false",
        c.fan_in_fan_out ? "true" : "false", lora::peft::bias_name(c.bias));
    std::printf("target_modules: %s\n", targets.c_str());
    if (!c.rank_pattern.empty() || !c.alpha_pattern.empty()) {
      std::string patterns;
      for (const auto& [k, v] : c.rank_pattern) patterns += " r[" + k + "]=" + std::to_string(v);
      for (const auto& [k, v] : c.alpha_pattern) patterns += " alpha[" + k + "]=" + number(v);
      std::printf("patterns:%s\n", patterns.c_str());
    }
    if (c.task_type) std::printf("task_type: %s\n", c.task_type->c_str());
    if (c.base_model_name_or_path) std::printf("base_model_name_or_path: %s\n", c.base_model_name_or_path->c_str());
    for (const auto& note : c.assumed) std::printf("note: %s\n", note.c_str());
    if (!c.other.empty()) {
      std::string keys;
      for (const auto& [k, v] : c.other.items()) keys += " " + k;
      std::printf("config keys kept, not used:%s\n", keys.c_str());
    }

    std::size_t width = 6;
    for (const auto& m : adapter.modules) width = std::max(width, m.path.size());
    std::printf("\n%-*s %8s %8s %5s %8s %9s\n", static_cast<int>(width), "module", "in", "out", "r", "alpha",
                "scaling");
    for (const auto& m : adapter.modules)
      std::printf("%-*s %8lld %8lld %5d %8s %9s\n", static_cast<int>(width), m.path.c_str(),
                  static_cast<long long>(m.in_features()), static_cast<long long>(m.out_features()), m.r,
                  number(m.lora_alpha).c_str(), number(m.scaling).c_str());
    std::printf("\nnon-LoRA tensors: %zu\n", adapter.other_tensors.size());
    for (const auto& t : adapter.other_tensors)
      std::printf("  %s %s %s\n", t.name.c_str(), lora::safetensors::dtype_name(t.dtype),
                  lora::safetensors::shape_text(t.shape).c_str());
    std::printf("trainable params: %s\n", lora::with_thousands(adapter.parameter_count()).c_str());
  } catch (const std::exception& e) {
    std::cerr << "lora-inspect: " << lora_tools::one_line(e.what()) << '\n';
    return 1;
  }
  return 0;
}
