// Serve many: one frozen base, several PEFT adapters loaded onto it by name,
// and a mixed batch in which every row picks its own adapter.
//
// Three adapters ("sql", "summarize", "translate", ranks 2, 4 and 8) are
// trained elsewhere -- here: on LoRALinear copies of the base's q_proj and
// v_proj -- and saved as three PEFT folders. All three are loaded onto one
// pair of MultiLoRALinear layers, and one mixed forward per layer answers a
// 12-row batch. Prints the memory the base and each adapter take, a table of
// row / adapter that ran / max |y - base| (the adapter's effect) / max |y -
// the original LoRALinear| (0 up to rounding), then a weighted "cat"
// combination and a hot swap, each checked, and "serve_many: OK". Exits 1 if
// a served row differs from its reference by more than 1e-5.
#include <lora/lora.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

using Mat = lora::Matrix<float>;
using Multi = lora::MultiLoRALinear<float>;
namespace peft = lora::peft;

namespace {

const std::string q_path = "model.layers.0.self_attn.q_proj", v_path = "model.layers.0.self_attn.v_proj";
const float tolerance = 1e-5f;

// One adapter as its trainer left it: a LoRALinear per projection.
struct Trained {
  std::unique_ptr<lora::LoRALinear<float>> q, v;
};

// Trains q and v towards their own random rank-r shift of the base, as a fine-tuning job elsewhere would.
Trained train(const Mat& Wq, const Mat& Wv, int r, std::uint64_t seed, const Mat& x, float& first, float& last) {
  lora::LoraConfig cfg;
  cfg.r = r;
  cfg.lora_alpha = 2.0 * r;
  cfg.seed = seed;
  Trained t{std::make_unique<lora::LoRALinear<float>>(Wq, cfg), std::make_unique<lora::LoRALinear<float>>(Wv, cfg)};
  const lora::Index D = Wq.rows();
  const Mat target_q = x * (Wq + Mat::Random(D, r) * Mat::Random(r, D) / 4.0f).transpose();
  const Mat target_v = x * (Wv + Mat::Random(D, r) * Mat::Random(r, D) / 4.0f).transpose();
  lora::ParameterList<float> params = t.q->parameters();
  for (auto& p : t.v->parameters()) params.push_back(p);
  lora::AdamW<float> opt(params, {/*lr*/ 2e-2, 0.9, 0.999, 1e-8, /*weight_decay*/ 0.0});
  Mat y(x.rows(), D), dy(x.rows(), D);
  for (int step = 0; step < 40; ++step) {
    t.q->zero_grad();
    t.v->zero_grad();
    float loss = 0;
    for (auto [layer, target] : {std::pair{t.q.get(), &target_q}, std::pair{t.v.get(), &target_v}}) {
      layer->forward(x, y);
      loss += lora::mse_loss<float>(y, *target, dy);
      layer->backward(x, dy);
    }
    if (step == 0) first = loss;
    last = loss;
    opt.step();
  }
  t.q->eval();
  t.v->eval();
  return t;
}

float max_abs(const Mat& a) { return a.size() == 0 ? 0.0f : a.cwiseAbs().maxCoeff(); }

}  // namespace

int main() {
  const lora::Index D = 96, N_train = 128;
  std::srand(5);
  const Mat Wq = Mat::Random(D, D) / 8.0f, Wv = Mat::Random(D, D) / 8.0f;

  // ---- three adapters trained elsewhere, saved as PEFT folders ----
  const std::vector<std::string> names = {"sql", "summarize", "translate"};
  const std::vector<int> ranks = {2, 4, 8};
  const auto tmp = std::filesystem::temp_directory_path() /
                   ("lora-serve-many-" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
  // Removes the folder however main leaves.
  struct Cleanup {
    std::filesystem::path dir;
    ~Cleanup() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } cleanup{tmp};

  const Mat x_train = Mat::Random(N_train, D);
  std::map<std::string, Trained> original;
  for (std::size_t k = 0; k < names.size(); ++k) {
    float first = 0, last = 0;
    original[names[k]] = train(Wq, Wv, ranks[k], 11 + k, x_train, first, last);
    std::map<std::string, lora::LoRALinear<float>*> layers{{q_path, original[names[k]].q.get()},
                                                           {v_path, original[names[k]].v.get()}};
    peft::AdapterConfig config;
    config.task_type = "CAUSAL_LM";
    peft::save_adapter((tmp / names[k]).string(), layers, config);
    std::printf("trained %-9s (r=%d): loss %.4f -> %.4f, saved to %s\n", names[k].c_str(), ranks[k], first, last,
                (tmp / names[k]).string().c_str());
  }

  // ---- one base, all three loaded onto it by name ----
  Multi q(Wq), v(Wv);
  std::map<std::string, Multi*> model{{q_path, &q}, {v_path, &v}};
  for (const auto& name : names) peft::load_adapter((tmp / name).string(), name, model);

  // The base weights are held once; each adapter adds only r (I + O) scalars per layer.
  const lora::Index base_scalars = Wq.size() + Wv.size();
  std::printf("\nbase q_proj + v_proj: %s scalars, shared by every adapter\n",
              lora::with_thousands(base_scalars).c_str());
  for (const auto& name : names) {
    const lora::Index n = q.adapter(name)->lora_A.size() + q.adapter(name)->lora_B.size() +
                          v.adapter(name)->lora_A.size() + v.adapter(name)->lora_B.size();
    std::printf("  adapter %-9s r=%d: %6s scalars (%.1f%% of the base)\n", name.c_str(), q.adapter(name)->config.r,
                lora::with_thousands(n).c_str(), 100.0 * n / base_scalars);
  }
  const lora::Index all = q.adapter_parameter_count() + v.adapter_parameter_count();
  std::printf("  all %zu adapters: %s scalars; served as %zu separate models they would need %s\n", names.size(),
              lora::with_thousands(all).c_str(), names.size(),
              lora::with_thousands(static_cast<lora::Index>(names.size()) * base_scalars + all).c_str());

  // ---- a mixed batch: each row names its adapter, "__base__" for none ----
  const std::vector<std::string> rows = {"sql",      "__base__",  "translate", "summarize", "sql",       "translate",
                                         "__base__", "summarize", "sql",       "translate", "summarize", "sql"};
  const lora::Index N = static_cast<lora::Index>(rows.size());
  const Mat x = Mat::Random(N, D);
  Mat yq(N, D), yv(N, D);
  q.forward(x, rows, yq);  // one base product for all rows, one low-rank product per adapter group
  v.forward(x, rows, yv);
  const Mat base_q = x * Wq.transpose(), base_v = x * Wv.transpose();

  bool ok = true;
  std::printf("\nrow  adapter     max|y - base|  max|y - original LoRALinear|\n");
  for (lora::Index n = 0; n < N; ++n) {
    const std::string& name = rows[n];
    const bool is_base = name == Multi::base_name;
    // The reference: the row through the layer the adapter was trained in, or the bare base product.
    const Mat ref_q = is_base ? Mat(base_q.row(n)) : original.at(name).q->forward(x.row(n));
    const Mat ref_v = is_base ? Mat(base_v.row(n)) : original.at(name).v->forward(x.row(n));
    const float effect = std::max(max_abs(yq.row(n) - base_q.row(n)), max_abs(yv.row(n) - base_v.row(n)));
    const float diff = std::max(max_abs(yq.row(n) - ref_q), max_abs(yv.row(n) - ref_v));
    std::printf("%3ld  %-10s  %13.4f  %.2g\n", static_cast<long>(n), name.c_str(), effect, diff);
    // An adapter row must differ from the base, or the comparison would prove nothing.
    if (diff > tolerance || (!is_base && effect < 1e-2f)) ok = false;
  }

  // ---- weighted combination: "cat" stacks two adapters, so its delta is exactly their sum ----
  for (Multi* layer : {&q, &v})
    layer->add_weighted_adapter({"sql", "translate"}, {1.0, 1.0}, "sql+translate", lora::Combination::cat);
  const Mat x1 = x.row(0);
  Mat y1(1, D);
  q.forward(x1, std::vector<std::string>{"sql+translate"}, y1);
  const Mat base1 = x1 * Wq.transpose();
  const Mat sum1 =
      base1 + (original.at("sql").q->forward(x1) - base1) + (original.at("translate").q->forward(x1) - base1);
  const float cat_diff = max_abs(y1 - sum1);
  std::printf(
      "\nadd_weighted_adapter(cat): \"sql+translate\" r=%d; max |delta - (delta_sql + delta_translate)| = %.2g\n",
      q.adapter("sql+translate")->config.r, cat_diff);
  ok = ok && cat_diff <= tolerance;

  // ---- hot swap: "summarize" gets sql's weights; its id stays, readers see old or new, never half ----
  const int id_before = q.adapter_id("summarize");
  for (Multi* layer : {&q, &v}) {
    auto sql = layer->adapter("sql");
    layer->replace_adapter("summarize", sql->config, sql->lora_A, sql->lora_B);
  }
  Mat y2(1, D);
  q.forward(x1, std::vector<int>{q.adapter_id("summarize")}, y2);
  const float swap_diff = max_abs(y2 - original.at("sql").q->forward(x1));
  std::printf("replace_adapter: \"summarize\" now serves sql's weights (id %d -> %d); max |y - sql| = %.2g\n",
              id_before, q.adapter_id("summarize"), swap_diff);
  ok = ok && swap_diff <= tolerance && q.adapter_id("summarize") == id_before;

  std::printf("\nserve_many: %s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
