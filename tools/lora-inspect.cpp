// lora-inspect DIR_OR_FILE: what a PEFT LoRA adapter holds. Prints the
// config, one row per adapted module (path, in, out, r, alpha, scaling; under
// a LoRA on a fused projection whose B is made of slices, as FusedLoRALinear
// saves q and v inside c_attn, the slices and their ranks), the tensors that
// are not LoRA matrices, and the LoRA parameter count. On a bad file: exit
// status 1 and one line on stderr naming the file and the problem. Every
// string read from the file is printed escaped (lora::printable), so a name
// holding an escape sequence or a newline cannot drive the terminal.
#include <lora/fused.hpp>
#include <lora/peft.hpp>

#include <CLI/CLI.hpp>

#include "cli.hpp"

#include <algorithm>
#include <cstdio>
#include <string>

namespace {

std::string number(double v) { return lora::value_string(v); }

/// "first..last" of `count` indices from `begin`.
std::string range(lora::Index begin, lora::Index count) {
  return std::to_string(begin) + ".." + std::to_string(begin + count - 1);
}

/// A string from the file as the terminal gets it.
std::string shown(const std::string& text) { return lora::printable(text); }

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Print what a PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) holds.",
               "lora-inspect"};
  std::string path;
  app.add_option("DIR_OR_FILE", path, "adapter folder, or its adapter_model.safetensors")->required();
  if (auto status = lora_tools::parse(app, argc, argv)) return *status;

  try {
    auto adapter = lora::peft::read_adapter<double>(path);
    const auto& c = adapter.config;
    std::string targets;
    if (c.target_modules_regex) {
      targets = "\"" + shown(*c.target_modules_regex) + "\" (regex)";
    } else {
      for (const auto& t : c.target_modules) targets += (targets.empty() ? "" : ", ") + shown(t);
      targets = "[" + targets + "]";
    }
    std::printf("adapter: %s\n", shown(adapter.source).c_str());
    std::printf(
        "config: peft_type LORA, r %d, lora_alpha %s, lora_dropout %s, use_rslora %s, use_dora %s, "
        "fan_in_fan_out %s, bias %s\n",
        c.r, number(c.lora_alpha).c_str(), number(c.lora_dropout).c_str(), c.use_rslora ? "true" : "false",
        c.use_dora ? "true" : "false", c.fan_in_fan_out ? "true" : "false", lora::peft::bias_name(c.bias));
    std::printf("target_modules: %s\n", targets.c_str());
    if (!c.rank_pattern.empty() || !c.alpha_pattern.empty()) {
      std::string patterns;
      for (const auto& [k, v] : c.rank_pattern) patterns += " r[" + shown(k) + "]=" + std::to_string(v);
      for (const auto& [k, v] : c.alpha_pattern) patterns += " alpha[" + shown(k) + "]=" + number(v);
      std::printf("patterns:%s\n", patterns.c_str());
    }
    if (!c.init_lora_weights.is_boolean()) {
      // PiSSA / OLoRA and friends: what loading the adapter does to the base, as PEFT's from_pretrained does it.
      const std::string value = shown(c.init_lora_weights.dump().substr(0, 80));
      try {
        if (c.residual_init("init_lora_weights") == lora::ResidualInit::none)
          std::printf("init_lora_weights: %s (sets only A and B: the file replaces them, the base is untouched)\n",
                      value.c_str());
        else
          std::printf(
              "init_lora_weights: %s: trained over the base's residual W - s*B0*A0, which loading and "
              "lora-merge compute from the base first, as PEFT does\n",
              value.c_str());
      } catch (const lora::config_error& e) {
        std::printf("init_lora_weights: %s: cannot be loaded or merged: %s\n", value.c_str(), shown(e.what()).c_str());
      }
    }
    if (c.task_type) std::printf("task_type: %s\n", shown(*c.task_type).c_str());
    if (c.base_model_name_or_path)
      std::printf("base_model_name_or_path: %s\n", shown(*c.base_model_name_or_path).c_str());
    for (const auto& note : c.assumed) std::printf("note: %s\n", shown(note).c_str());
    if (!c.other.empty()) {
      std::string keys;
      for (const auto& [k, v] : c.other.items()) keys += " " + shown(k);
      std::printf("config keys kept, not used:%s\n", keys.c_str());
    }

    std::size_t width = 6;
    for (const auto& m : adapter.modules) width = std::max(width, shown(m.path).size());
    std::printf("\n%-*s %8s %8s %5s %8s %9s\n", static_cast<int>(width), "module", "in", "out", "r", "alpha",
                "scaling");
    for (const auto& m : adapter.modules) {
      // An embedding's "in" is its vocabulary (lora_embedding_A's columns), "out" its embedding dimension.
      // DoRA: a magnitude per output (per embedding dimension for an embedding).
      std::printf("%-*s %8lld %8lld %5d %8s %9s%s%s\n", static_cast<int>(width), shown(m.path).c_str(),
                  static_cast<long long>(m.in_features()), static_cast<long long>(m.out_features()), m.r,
                  number(m.lora_alpha).c_str(), number(m.scaling).c_str(), m.embedding ? "  embedding" : "",
                  m.magnitude.size() > 0 ? "  DoRA magnitude" : "");
      if (m.embedding) continue;
      std::string slices;
      for (const auto& block : lora::output_blocks(m.B)) {
        slices += slices.empty() ? "  slices: outputs " : ", outputs ";
        slices += range(block.out_begin, block.out_count);
        slices += block.rank_count == 0 ? " frozen" : " ranks " + range(block.rank_begin, block.rank_count);
      }
      if (!slices.empty()) std::printf("%s\n", slices.c_str());
    }
    std::printf("\nnon-LoRA tensors: %zu\n", adapter.other_tensors.size());
    for (const auto& t : adapter.other_tensors)
      std::printf("  %s %s %s\n", shown(t.name).c_str(), lora::safetensors::dtype_name(t.dtype),
                  lora::safetensors::shape_text(t.shape).c_str());
    std::printf("trainable params: %s\n", lora::with_thousands(adapter.parameter_count()).c_str());
  } catch (const std::exception& e) {
    lora_tools::report_error(app.get_name(), e.what());
    return 1;
  }
  return 0;
}
