// README.md's snippet under "Several adapters on one base", built and run as written: extract_snippets.cmake cuts
// it out into multi_adapter.inc at build time. What the README leaves out is here: the `peft` alias of the snippet
// before it, the frozen weights W_q and W_v, a batch x of four rows with its output y, and the folders adapters/sql
// and adapters/chat, which this program writes first (ctest runs it in a folder of its own). Then it checks the
// mixed batch row by row against products computed here in double from the saved matrices, and reads adapters/mix.
#include <lora/lora.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace {
using Mat = lora::Matrix<float>;
using MatD = lora::Matrix<double>;
const char* const q_path = "model.layers.0.self_attn.q_proj";
const char* const v_path = "model.layers.0.self_attn.v_proj";

struct Saved {
  MatD A, B;  // q_proj's
  double s = 0;
};

// Writes adapters/<name> for q_proj and v_proj at rank r, lora_alpha alpha, B not zero; returns q_proj's.
Saved write_adapter(const std::string& name, int r, double alpha, const Mat& W_q, const Mat& W_v) {
  lora::peft::AdapterConfig config;
  config.r = r;
  config.lora_alpha = alpha;
  lora::LoRALinear<float> q(W_q, config.layer_config(q_path)), v(W_v, config.layer_config(v_path));
  q.lora_B().setRandom();
  v.lora_B().setRandom();
  const std::map<std::string, lora::LoRALinear<float>*> layers{{q_path, &q}, {v_path, &v}};
  lora::peft::save_adapter("adapters/" + name, layers, config);
  return {q.lora_A().cast<double>(), q.lora_B().cast<double>(), alpha / r};
}

int failed(const std::string& what) {
  std::fprintf(stderr, "README snippet (Several adapters): %s\n", what.c_str());
  return 1;
}
}  // namespace

int main() {
  std::filesystem::remove_all("adapters");
  namespace peft = lora::peft;  // from the snippet before it
  const Mat W_q = Mat::Random(24, 16), W_v = Mat::Random(20, 16);
  const Mat x = Mat::Random(4, 16);
  Mat y(4, 24);  // (N, O): forward writes into it
  const Saved sql = write_adapter("sql", 8, 16, W_q, W_v), chat = write_adapter("chat", 4, 4, W_q, W_v);

#include "multi_adapter.inc"

  // y is the last forward's: rows sql, base, chat, sql. chat runs at set_scale 0.5.
  const MatD xd = x.cast<double>(), base = xd * W_q.cast<double>().transpose();
  auto with = [&](const Saved& a, double scale, int row) -> Eigen::RowVectorXd {
    return base.row(row) + scale * a.s * (xd.row(row) * a.A.transpose()) * a.B.transpose();
  };
  const std::vector<Eigen::RowVectorXd> expected{with(sql, 1, 0), base.row(1), with(chat, 0.5, 2), with(sql, 1, 3)};
  for (int row = 0; row < 4; ++row) {
    const double error = (y.row(row).cast<double>() - expected[row]).cwiseAbs().maxCoeff();
    if (!(error < 1e-4 * (1 + expected[row].cwiseAbs().maxCoeff())))
      return failed("row " + std::to_string(row) + " of the mixed batch is off by " + std::to_string(error));
  }
  // adapters/mix is the svd combination at rank 8 with lora_alpha = r, read back into a fresh layer.
  lora::MultiLoRALinear<float> fresh(W_q);
  lora::MultiLoRALinear<float> fresh_v(W_v);
  peft::load_adapter("adapters/mix", "mix",
                     std::map<std::string, lora::MultiLoRALinear<float>*>{{q_path, &fresh}, {v_path, &fresh_v}});
  const auto mix = fresh.adapter("mix");
  if (mix->rank() != 8 || mix->config.lora_alpha != 8) return failed("adapters/mix is not rank 8 with lora_alpha 8");
  std::puts("README snippet (Several adapters): built, ran, and the mixed batch matches row by row");
}
