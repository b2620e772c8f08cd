// lora-import-gguf --gguf FILE --out DIR [--n-head N] [--n-head-kv N]
// Writes a GGUF LoRA adapter (llama.cpp's format) as a PEFT adapter folder:
// module paths as Hugging Face names them, A and B in PyTorch's shapes, q/k
// rows back in PyTorch's order, the file's alpha with a rank pattern where
// ranks differ. On bad input: exit status 1, the problems on stderr, nothing
// written.
#include <lora/gguf_adapter.hpp>

#include <CLI/CLI.hpp>

#include "cli.hpp"

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  CLI::App app{"Convert a GGUF LoRA adapter (llama.cpp) into a PEFT adapter folder.", "lora-import-gguf"};
  std::string gguf, out;
  int n_head = 0, n_head_kv = 0;
  app.add_option("--gguf", gguf, "GGUF LoRA adapter to read")->required();
  app.add_option("--out", out, "PEFT adapter folder to write")->required();
  app.add_option("--n-head", n_head, "LLaMA: the base model's num_attention_heads (needed for attn_q, attn_k)")
      ->check(CLI::PositiveNumber);
  app.add_option("--n-head-kv", n_head_kv, "LLaMA: num_key_value_heads, when it differs from --n-head")
      ->check(CLI::PositiveNumber);
  if (auto status = lora_tools::parse(app, argc, argv)) return *status;

  try {
    lora::gguf::ImportOptions options;
    options.n_head = n_head;
    options.n_head_kv = n_head_kv;
    const auto adapter = lora::gguf::import_adapter_file(gguf, out, options);
    for (const auto& m : adapter.modules)
      std::printf("%s -> %s  r %d  scaling %.6g\n", lora::printable(m.path).c_str(),
                  (lora::peft::key_prefix + m.path + (m.embedding ? ".lora_embedding_A/B" : ".lora_A/B")).c_str(), m.r,
                  m.scaling);
    std::printf("wrote %s: %zu module(s), r %d, lora_alpha %.6g\n", lora::printable(out).c_str(),
                adapter.modules.size(), adapter.config.r, adapter.config.lora_alpha);
  } catch (const std::exception& e) {
    lora_tools::report_error(app.get_name(), e.what());
    return 1;
  }
  return 0;
}
