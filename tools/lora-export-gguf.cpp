// lora-export-gguf --adapter DIR --arch llama|gpt2 --out FILE [--outtype f32|f16|bf16|q8_0]
//                  [--n-head N] [--n-head-kv N]
// Writes a PEFT LoRA adapter as a GGUF LoRA adapter that llama.cpp applies
// exactly (--lora, llama-server, llama-export-lora): tensors under the base
// model's GGUF names, every module's PEFT scaling (rsLoRA, rank and alpha
// patterns) folded into B against the file's one alpha, LLaMA's q/k rows in
// llama.cpp's rotary order. On bad input: exit status 1, the problems on
// stderr, no output file.
#include <lora/gguf_adapter.hpp>

#include <CLI/CLI.hpp>

#include "cli.hpp"

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  CLI::App app{"Convert a PEFT LoRA adapter into a GGUF LoRA adapter for llama.cpp.", "lora-export-gguf"};
  std::string adapter, arch, out, outtype = "f32";
  int n_head = 0, n_head_kv = 0;
  app.add_option("--adapter", adapter, "PEFT adapter folder (or its adapter_model.safetensors)")->required();
  app.add_option("--arch", arch, "the base model's llama.cpp architecture: " + lora::gguf::known_architectures())
      ->required();
  app.add_option("--out", out, "GGUF file to write")->required();
  app.add_option("--outtype", outtype, "tensor type: f32 (default), f16, bf16 or q8_0");
  app.add_option("--n-head", n_head, "LLaMA: the base model's num_attention_heads (needed for q_proj, k_proj)")
      ->check(CLI::PositiveNumber);
  app.add_option("--n-head-kv", n_head_kv, "LLaMA: num_key_value_heads, when it differs from --n-head")
      ->check(CLI::PositiveNumber);
  if (auto status = lora_tools::parse(app, argc, argv)) return *status;

  try {
    lora::gguf::ExportOptions options;
    options.architecture = lora::gguf::parse_architecture(arch);
    const auto type = lora::gguf::parse_tensor_type(outtype);
    if (!type || !lora::gguf::is_convertible(*type))
      throw lora::config_error("--outtype \"" + outtype + "\" is not one of f32, f16, bf16, q8_0");
    options.type = *type;
    options.n_head = n_head;
    options.n_head_kv = n_head_kv;
    const auto report = lora::gguf::export_adapter_file(adapter, out, options);
    for (const auto& m : report.modules) {
      std::printf("%s -> %s  r %d  scaling %.6g", lora::printable(m.module).c_str(), m.tensor.c_str(), m.rank,
                  m.scaling);
      if (m.factor != 1.0) std::printf("  B x %.6g", m.factor);
      if (m.rows != lora::gguf::RowOrder::as_is) std::printf("  rows in rotary order");
      std::printf("  %s/%s\n", lora::gguf::tensor_type_name(m.type_a), lora::gguf::tensor_type_name(m.type_b));
    }
    std::printf("wrote %s: %zu module(s), adapter.lora.alpha %.6g, architecture %s\n", lora::printable(out).c_str(),
                report.modules.size(), static_cast<double>(report.alpha), arch.c_str());
  } catch (const std::exception& e) {
    lora_tools::report_error(app.get_name(), e.what());
    return 1;
  }
  return 0;
}
