// Trainable parameters, adapter checkpoint size and optimizer state of LoRA
// against full fine-tuning, for the seed example and the models of the LoRA
// paper. Prints two Markdown tables (bench/RESULTS.md holds them as printed).
//
//   bench_params            the tables
//   bench_params --smoke    the same (it runs in milliseconds; the flag exists for .ci/run's uniformity)
#include "params_table.hpp"

#include "bench_common.hpp"

#include <cstdio>
#include <string>

namespace {
std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

std::string millions(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  return buf;
}
}  // namespace

int main(int argc, char** argv) {
  lora_bench::take_options(argc, argv);
  if (argc > 1) {
    std::fprintf(stderr, "usage: %s [--smoke]\n", argv[0]);
    return 2;
  }
  using lora::with_thousands;
  const auto rows = lora_bench::params_table();

  std::puts("## Trainable parameters");
  std::puts("");
  std::puts("Counted by the library: a real `LoRALinear<float>` for the seed example, and");
  std::puts("`LoRALinear<float>::parameter_count_for` (a shape-only dry run) summed over every adapted");
  std::puts("(d, d) projection of every layer for the paper's models. *Frozen* is the adapted projections'");
  std::puts("weights and biases only; the rest of each model is frozen too and not counted here.");
  std::puts("");
  std::puts("| case | layers | d | adapted | r | trainable | frozen | frozen / trainable | paper |");
  std::puts("|---|---:|---:|---|---:|---:|---:|---:|---:|");
  for (const auto& row : rows) {
    const auto& m = row.model;
    char paper[32] = "-";
    if (m.paper_millions > 0)
      std::snprintf(paper, sizeof paper, "%.*fM%s", m.paper_decimals, m.paper_millions,
                    row.paper_differs ? " (*)" : "");
    std::printf("| %s | %d | %lld | %s | %d | %s | %s | %.0fx | %s |\n", m.name.c_str(), m.layers,
                static_cast<long long>(m.d_model), join(m.adapted).c_str(), m.r,
                with_thousands(row.count.trainable).c_str(), with_thousands(row.count.frozen).c_str(), row.ratio(),
                paper);
  }
  std::puts("");
  for (const auto& row : rows)
    if (row.paper_differs) {
      const auto& m = row.model;
      std::printf(
          "(*) %s: the paper prints %.*fM; the shapes give %d layers x %zu matrices x r=%d x (%lld + %lld) = %s "
          "(%s).\n",
          m.name.c_str(), m.paper_decimals, m.paper_millions, m.layers, m.adapted.size(), m.r,
          static_cast<long long>(m.d_model), static_cast<long long>(m.d_model),
          with_thousands(row.count.trainable).c_str(), millions(static_cast<double>(row.count.trainable)).c_str());
    }

  std::puts("");
  std::puts("## Checkpoint and optimizer state");
  std::puts("");
  std::puts("Adapter checkpoint: the trainable tensors alone, fp32 and fp16. AdamW state: two fp32 moments per");
  std::puts("trained scalar (`AdamW::state_bytes()` for the seed example), for LoRA, for full fine-tuning of the");
  std::puts("same projections, and for full fine-tuning of the whole model at its published size.");
  std::puts("");
  std::puts(
      "| case | r | adapter fp32 | adapter fp16 | AdamW state, LoRA | AdamW state, full FT (same projections) | "
      "AdamW state, full FT (whole model) |");
  std::puts("|---|---:|---:|---:|---:|---:|---:|");
  for (const auto& row : rows) {
    const auto& m = row.model;
    std::string whole = "-";
    if (m.published_total > 0)
      whole = lora_bench::bytes_string(2 * sizeof(float) * m.published_total) + " (" + millions(m.published_total) +
              " params, " + m.published_src + ")";
    std::printf("| %s | %d | %s | %s | %s | %s | %s |\n", m.name.c_str(), m.r,
                lora_bench::bytes_string(static_cast<double>(row.adapter_bytes_fp32())).c_str(),
                lora_bench::bytes_string(static_cast<double>(row.adapter_bytes_fp16())).c_str(),
                lora_bench::bytes_string(static_cast<double>(row.adamw_state_lora)).c_str(),
                lora_bench::bytes_string(static_cast<double>(row.adamw_state_full)).c_str(), whole.c_str());
  }
  return 0;
}
