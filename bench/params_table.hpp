// The parameter and checkpoint-size table of bench/params, as data, so that
// tests/unit-params-table.cpp checks the very rows the program prints.
//
// Every count comes from the library: the seed example builds a real
// LoRALinear and AdamW; the published models, too large to build here, are
// counted with LoRALinear::parameter_count_for, the allocation-free dry run of
// the same shape, summed over every adapted matrix of every layer.
#pragma once

#include <lora/lora.hpp>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace lora_bench {

using lora::Index;

/// A model's LoRA setup: `layers` blocks, each with `adapted.size()` square
/// (d_model, d_model) projections adapted at rank r.
struct ModelCase {
  std::string name;
  int layers;
  Index d_model;
  std::vector<std::string> adapted;  ///< e.g. {"Wq", "Wv"}
  int r;
  bool bias;                  ///< the projections have a (frozen) bias, as in these models
  double paper_millions;      ///< trainable parameters as the LoRA paper prints them, 0 when it prints none
  int paper_decimals;         ///< decimals the paper prints (0.35M: 2)
  double published_total;     ///< the whole model's published parameter count, 0 when not applicable
  const char* published_src;  ///< where that count comes from
};

struct ParamRow {
  ModelCase model;
  lora::ParameterCount count;  ///< trainable: the adapters; frozen: the adapted projections' W (and b)
  std::size_t adamw_state_lora = 0;
  std::size_t adamw_state_full = 0;  ///< AdamW on the same projections' W and b instead
  bool paper_differs = false;        ///< our count, rounded as the paper rounds, is not the paper's figure

  double ratio() const { return static_cast<double>(count.frozen) / static_cast<double>(count.trainable); }
  std::size_t adapter_bytes_fp32() const { return static_cast<std::size_t>(count.trainable) * 4; }
  std::size_t adapter_bytes_fp16() const { return static_cast<std::size_t>(count.trainable) * 2; }
};

inline lora::LoraConfig rank_config(int r) {
  lora::LoraConfig c;
  c.r = r;
  c.lora_alpha = 2 * r;
  return c;
}

/// AdamW keeps two moments per trainable scalar: state bytes for n fp32 scalars.
inline std::size_t adamw_bytes(Index n) { return 2 * sizeof(float) * static_cast<std::size_t>(n); }

inline ParamRow count_row(const ModelCase& m) {
  ParamRow row{m, {}, 0, 0, false};
  const auto cfg = rank_config(m.r);
  for (int layer = 0; layer < m.layers; ++layer)
    for (std::size_t k = 0; k < m.adapted.size(); ++k)
      row.count += lora::LoRALinear<float>::parameter_count_for(m.d_model, m.d_model, cfg, m.bias);
  row.adamw_state_lora = adamw_bytes(row.count.trainable);
  row.adamw_state_full = adamw_bytes(row.count.frozen);
  if (m.paper_millions > 0) {
    const double scale = std::pow(10.0, m.paper_decimals);
    const double ours = std::round(static_cast<double>(row.count.trainable) / 1e6 * scale) / scale;
    row.paper_differs = std::abs(ours - m.paper_millions) > 0.5 / scale;
  }
  return row;
}

/// The seed example: one real 1024 x 1024 LoRALinear (no bias), r = 8, and a real AdamW on it.
inline ParamRow seed_row() {
  const ModelCase m{"seed example (README)", 1, 1024, {"W"}, 8, false, 0, 0, 0, ""};
  lora::LoRALinear<float> layer(1024, 1024, rank_config(8), false);
  lora::AdamW<float> opt(layer.parameters());
  ParamRow row{m, layer.parameter_count(), opt.state_bytes(), 0, false};
  // Full fine-tuning: AdamW over W itself (the gradient buffer only has to exist, not to be right).
  lora::Matrix<float> W = layer.weight(), dW = lora::Matrix<float>::Zero(1024, 1024);
  lora::AdamW<float> full({{"weight", W.data(), dW.data(), 1024, 1024}});
  row.adamw_state_full = full.state_bytes();
  return row;
}

/// The models of the LoRA paper (Hu et al. 2021, Tables 2-4), adapting Wq and Wv.
inline std::vector<ModelCase> paper_models() {
  const std::vector<std::string> qv = {"Wq", "Wv"};
  return {
      {"RoBERTa-base", 12, 768, qv, 8, true, 0.3, 1, 125e6, "RoBERTa paper"},
      {"RoBERTa-large", 24, 1024, qv, 8, true, 0.8, 1, 355e6, "RoBERTa paper"},
      {"DeBERTa-XXL", 48, 1536, qv, 16, true, 4.7, 1, 1.5e9, "DeBERTa paper"},
      {"GPT-2 Medium", 24, 1024, qv, 4, true, 0.35, 2, 354.92e6, "LoRA paper, Table 3"},
      {"GPT-2 Large", 36, 1280, qv, 4, true, 0.77, 2, 774.03e6, "LoRA paper, Table 3"},
      {"GPT-3 175B", 96, 12288, qv, 1, true, 4.7, 1, 175255.8e6, "LoRA paper, Table 4"},
      {"GPT-3 175B", 96, 12288, qv, 4, true, 18.9, 1, 175255.8e6, "LoRA paper, Table 4"},
      {"GPT-3 175B", 96, 12288, qv, 8, true, 37.7, 1, 175255.8e6, "LoRA paper, Table 4"},
  };
}

inline std::vector<ParamRow> params_table() {
  std::vector<ParamRow> rows{seed_row()};
  for (const auto& m : paper_models()) rows.push_back(count_row(m));
  return rows;
}

/// 1536 -> "1.5 KiB"; bytes as a reader compares them.
inline std::string bytes_string(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return buf;
}

}  // namespace lora_bench
