// lora-merge --base BASE.safetensors --adapter DIR --out OUT.safetensors [--scale X] [--dtype F32|BF16|F16]
// Writes the base file with each adapted weight replaced by W + X · s · B A
// (float accumulation, each tensor in its own dtype), every other tensor and
// the metadata copied through: PEFT's merge_and_unload, llama.cpp's
// export-lora. A bitsandbytes 4-bit (NF4) base is written dequantised, in --dtype. On bad input: exit status 1,
// one line on stderr, no output file.
#include <lora/peft.hpp>
#include <lora/quant_io.hpp>  // merging into a bitsandbytes 4-bit base

#include <CLI/CLI.hpp>

#include "cli.hpp"

#include <cstdio>
#include <optional>
#include <string>

int main(int argc, char** argv) {
  CLI::App app{"Merge a PEFT LoRA adapter into a base safetensors file.", "lora-merge"};
  std::string base, adapter, out;
  double scale = 1.0;
  app.add_option("--base", base, "base model weights (.safetensors)")->required();
  app.add_option("--adapter", adapter, "PEFT adapter folder (or its adapter_model.safetensors)")->required();
  app.add_option("--out", out, "merged weights to write (.safetensors)")->required();
  lora_tools::add_finite_option(app, "--scale", scale, "multiplies the adapter's delta (default 1)");
  std::string dtype;
  app.add_option("--dtype", dtype,
                 "the dtype of a bitsandbytes 4-bit (NF4) base's weights in the output, which is written dequantised: "
                 "F32, BF16 or F16 (default: each weight's quant state dtype)")
      ->check(CLI::IsMember({"F32", "BF16", "F16"}));
  if (auto status = lora_tools::parse(app, argc, argv)) return *status;

  try {
    std::optional<lora::safetensors::Dtype> dequantized;
    if (!dtype.empty()) dequantized = lora::safetensors::parse_dtype(dtype);
    auto report = lora::peft::merge_adapter_file(base, adapter, out, scale, dequantized);
    for (const auto& [module, tensor] : report.merged)
      std::printf("merged %s -> %s\n", lora::printable(module).c_str(), lora::printable(tensor).c_str());
    for (const auto& [from, tensor] : report.replaced)
      std::printf("replaced %s <- %s\n", lora::printable(tensor).c_str(), lora::printable(from).c_str());
    for (const auto& [tensor, written] : report.dequantized)
      std::printf("dequantized %s (4-bit NF4 -> %s)\n", lora::printable(tensor).c_str(), written.c_str());
    for (const auto& tensor : report.added)
      std::printf("added %s (from the adapter; the base has none)\n", lora::printable(tensor).c_str());
    std::printf("wrote %s: %zu merged, %zu copied unchanged\n", lora::printable(out).c_str(), report.merged.size(),
                report.copied);
  } catch (const std::exception& e) {
    lora_tools::report_error(app.get_name(), e.what());
    return 1;
  }
  return 0;
}
