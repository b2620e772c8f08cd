// GPT-2 in C++ with a hand-written backward, every projection a lora layer.
//
// The architecture and parameter names are Hugging Face's GPT2LMHeadModel
// (modeling_gpt2.py), so a checkpoint it saves loads as it is and a PEFT
// adapter made for it applies unchanged:
//
//   transformer.wte.weight (V, C)  transformer.wpe.weight (P, C)
//   transformer.h.L.ln_1.{weight,bias} (C)
//   transformer.h.L.attn.c_attn.{weight (C, 3C), bias (3C)}    Conv1D: y = x W + b, W stored (in, out)
//   transformer.h.L.attn.c_proj.{weight (C, C), bias (C)}
//   transformer.h.L.ln_2.{weight,bias} (C)
//   transformer.h.L.mlp.c_fc.{weight (C, 4C), bias (4C)}
//   transformer.h.L.mlp.c_proj.{weight (4C, C), bias (C)}
//   transformer.ln_f.{weight,bias} (C)                        logits = h wteᵀ (the head is tied to wte)
//
// Letters, as llm.c: B sequences, T tokens each, N = B·T rows, C channels, NH
// heads of HS = C / NH, V vocabulary, P positions, L layers. Every activation
// is a row-major (N, ·) matrix; a token's row is b·T + t.
//
// One layer, as GPT2Block computes it in eval mode (no dropout: the model has
// none besides the adapters' lora_dropout):
//   a = ln_1(x);  q,k,v = c_attn(a);  o = causal_attention(q, k, v);  r = x + c_proj(o)
//   m = ln_2(r);  f = c_fc(m);  g = gelu_tanh(f);  x' = r + mlp.c_proj(g)
//
// Each of the four projections is a Projection: the frozen Conv1D weight read
// in place (the checkpoint's (in, out) buffer, WeightLayout::in_out), and, when
// the module is adapted, a lora::LoRALinear or a lora::FusedLoRALinear (q, k,
// v slices of c_attn) over that same buffer. Full fine-tuning (train_base)
// instead gives every tensor of the model a gradient.
#pragma once

#include <lora/errors.hpp>
#include <lora/fused.hpp>
#include <lora/linear.hpp>
#include <lora/params.hpp>
#include <lora/types.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace gpt {

using lora::Index;
template <class S>
using Mat = lora::Matrix<S>;
template <class S>
using Vec = Eigen::Matrix<S, Eigen::Dynamic, 1>;
template <class S>
using Map = Eigen::Map<Mat<S>>;
template <class S>
using ConstMap = Eigen::Map<const Mat<S>>;
template <class S>
using RowMap = Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>>;
template <class S>
using ConstRowMap = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>;
// Q, K or V of one head: T rows of HS values, rows 3C apart inside c_attn's output.
template <class S>
using StridedMap = Eigen::Map<Mat<S>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class S>
using ConstStridedMap = Eigen::Map<const Mat<S>, Eigen::Unaligned, Eigen::OuterStride<>>;

// ---- configuration -----------------------------------------------------------------------------

/// The fields of Hugging Face's GPT2Config the model uses.
struct Config {
  int n_layer = 4;
  int n_head = 4;
  int n_embd = 128;
  int n_positions = 128;
  int vocab_size = 256;
  double layer_norm_epsilon = 1e-5;

  Index head_size() const { return n_embd / n_head; }

  /// Throws config_error naming `source` and the field for a size that is not positive, n_embd not a multiple of
  /// n_head, or an epsilon that is not a positive finite number.
  void check(const std::string& source) const {
    auto positive = [&](const char* name, int v) {
      if (v <= 0)
        throw lora::config_error(source + ": " + name + " must be a positive integer, got " + std::to_string(v));
    };
    positive("n_layer", n_layer);
    positive("n_head", n_head);
    positive("n_embd", n_embd);
    positive("n_positions", n_positions);
    positive("vocab_size", vocab_size);
    if (n_embd % n_head != 0)
      throw lora::config_error(source + ": n_embd (" + std::to_string(n_embd) + ") must be a multiple of n_head (" +
                               std::to_string(n_head) + ")");
    if (!(layer_norm_epsilon > 0) || !std::isfinite(layer_norm_epsilon))
      throw lora::config_error(source + ": layer_norm_epsilon must be a positive number, got " +
                               std::to_string(layer_norm_epsilon));
    constexpr long long limit = 1LL << 31;  // Index products below stay far from overflow
    if (static_cast<long long>(n_embd) * 4 * n_embd >= limit || static_cast<long long>(vocab_size) * n_embd >= limit ||
        static_cast<long long>(n_positions) * n_embd >= limit)
      throw lora::config_error(source + ": a weight of this config would hold 2^31 values or more");
  }

  /// config.json as transformers writes it for GPT2LMHeadModel (the fields it needs to build the model).
  nlohmann::ordered_json to_json() const {
    nlohmann::ordered_json j;
    j["activation_function"] = "gelu_new";
    j["architectures"] = {"GPT2LMHeadModel"};
    j["attn_pdrop"] = 0.0;
    j["bos_token_id"] = vocab_size - 1;
    j["embd_pdrop"] = 0.0;
    j["eos_token_id"] = vocab_size - 1;
    j["initializer_range"] = 0.02;
    j["layer_norm_epsilon"] = layer_norm_epsilon;
    j["model_type"] = "gpt2";
    j["n_ctx"] = n_positions;
    j["n_embd"] = n_embd;
    j["n_head"] = n_head;
    j["n_inner"] = nullptr;
    j["n_layer"] = n_layer;
    j["n_positions"] = n_positions;
    j["resid_pdrop"] = 0.0;
    j["tie_word_embeddings"] = true;
    j["torch_dtype"] = "float32";
    j["vocab_size"] = vocab_size;
    return j;
  }

  /// Reads the fields from a parsed config.json. Refuses (config_error naming `source` and the key) a missing or
  /// non-integer size, an activation other than GPT-2's tanh GELU, an n_inner other than 4·n_embd, and untied
  /// embeddings, which this model does not implement.
  static Config from_json(const nlohmann::json& j, const std::string& source) {
    if (!j.is_object())
      throw lora::config_error(source + ": expected a JSON object, got " + std::string(j.type_name()));
    Config c;
    auto integer = [&](const char* key, int& out) {
      auto it = j.find(key);
      if (it == j.end()) throw lora::config_error(source + ": \"" + key + "\" is missing");
      if (!it->is_number_integer())
        throw lora::config_error(source + ": \"" + key + "\" must be an integer, got " + it->dump());
      const auto v = it->get<long long>();
      if (v <= 0 || v > (1LL << 30))
        throw lora::config_error(source + ": \"" + key + "\" must be in [1, 2^30], got " + std::to_string(v));
      out = static_cast<int>(v);
    };
    integer("n_layer", c.n_layer);
    integer("n_head", c.n_head);
    integer("n_embd", c.n_embd);
    integer("n_positions", c.n_positions);
    integer("vocab_size", c.vocab_size);
    if (auto it = j.find("layer_norm_epsilon"); it != j.end()) {
      if (!it->is_number()) throw lora::config_error(source + ": \"layer_norm_epsilon\" must be a number");
      c.layer_norm_epsilon = it->get<double>();
    }
    if (auto it = j.find("model_type"); it != j.end() && *it != "gpt2")
      throw lora::config_error(source + ": model_type must be \"gpt2\", got " + it->dump());
    if (auto it = j.find("activation_function"); it != j.end() && *it != "gelu_new" && *it != "gelu_pytorch_tanh")
      throw lora::config_error(source + ": activation_function must be \"gelu_new\" (GPT-2's tanh GELU), got " +
                               it->dump());
    if (auto it = j.find("n_inner"); it != j.end() && !it->is_null() && *it != 4 * c.n_embd)
      throw lora::config_error(source + ": n_inner must be null or 4 * n_embd = " + std::to_string(4 * c.n_embd) +
                               ", got " + it->dump());
    if (auto it = j.find("tie_word_embeddings"); it != j.end() && *it != true)
      throw lora::config_error(source + ": tie_word_embeddings must be true (GPT-2's head is wte)");
    c.check(source);
    return c;
  }
};

// ---- parameters --------------------------------------------------------------------------------

/// The tensors of one block, in the order of the checkpoint's names (per_block of them).
enum BlockTensor : int {
  ln_1_weight,
  ln_1_bias,
  c_attn_weight,
  c_attn_bias,
  attn_c_proj_weight,
  attn_c_proj_bias,
  ln_2_weight,
  ln_2_bias,
  c_fc_weight,
  c_fc_bias,
  mlp_c_proj_weight,
  mlp_c_proj_bias,
  per_block
};

struct TensorSpec {
  std::string name;          ///< "transformer.h.0.attn.c_attn.weight"
  std::vector<Index> shape;  ///< as in the checkpoint: (in, out) for Conv1D weights, (n) for vectors
  Index offset = 0;          ///< into a Weights' owned buffer
  Index size() const {
    Index n = 1;
    for (Index d : shape) n *= d;
    return n;
  }
};

/// Every tensor of a GPT2LMHeadModel checkpoint (the tied head has none), in the order they are listed:
/// wte, wpe, then per block ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj (weight, bias each), then ln_f.
inline std::vector<TensorSpec> tensor_specs(const Config& c) {
  const Index C = c.n_embd;
  std::vector<TensorSpec> t;
  t.push_back({"transformer.wte.weight", {c.vocab_size, C}});
  t.push_back({"transformer.wpe.weight", {c.n_positions, C}});
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string h = "transformer.h." + std::to_string(l) + ".";
    t.push_back({h + "ln_1.weight", {C}});
    t.push_back({h + "ln_1.bias", {C}});
    t.push_back({h + "attn.c_attn.weight", {C, 3 * C}});
    t.push_back({h + "attn.c_attn.bias", {3 * C}});
    t.push_back({h + "attn.c_proj.weight", {C, C}});
    t.push_back({h + "attn.c_proj.bias", {C}});
    t.push_back({h + "ln_2.weight", {C}});
    t.push_back({h + "ln_2.bias", {C}});
    t.push_back({h + "mlp.c_fc.weight", {C, 4 * C}});
    t.push_back({h + "mlp.c_fc.bias", {4 * C}});
    t.push_back({h + "mlp.c_proj.weight", {4 * C, C}});
    t.push_back({h + "mlp.c_proj.bias", {C}});
  }
  t.push_back({"transformer.ln_f.weight", {C}});
  t.push_back({"transformer.ln_f.bias", {C}});
  Index offset = 0;
  for (auto& s : t) {
    s.offset = offset;
    offset += s.size();
  }
  return t;
}

inline int wte_index() { return 0; }
inline int wpe_index() { return 1; }
inline int block_index(int layer, BlockTensor k) { return 2 + layer * per_block + k; }
inline int ln_f_weight_index(const Config& c) { return 2 + c.n_layer * per_block; }
inline int ln_f_bias_index(const Config& c) { return 3 + c.n_layer * per_block; }

/// A model's parameters: either owned in one flat buffer (trainable, writable), or read in place from memory
/// someone else keeps alive (a mapped checkpoint, `keep_alive`). data[i] is tensor i of tensor_specs(config).
template <class S>
struct Weights {
  Config config;
  std::vector<TensorSpec> specs;
  std::vector<const S*> data;
  Vec<S> owned;                            ///< empty when viewed
  std::shared_ptr<const void> keep_alive;  ///< what a view reads from

  bool is_owned() const { return owned.size() > 0; }
  Index total_size() const { return specs.empty() ? 0 : specs.back().offset + specs.back().size(); }
  S* mutable_data(int i) {
    if (!is_owned()) throw lora::state_error("gpt::Weights: the weights are a read-only view of a checkpoint");
    return owned.data() + specs[i].offset;
  }

  /// Zero-filled owned weights for `config` (checked).
  static Weights zeros(const Config& config) {
    config.check("gpt::Weights");
    Weights w;
    w.config = config;
    w.specs = tensor_specs(config);
    w.owned = Vec<S>::Zero(w.total_size());
    for (const auto& s : w.specs) w.data.push_back(w.owned.data() + s.offset);
    return w;
  }

  /// GPT-2's initialisation (GPT2PreTrainedModel._init_weights): weights N(0, 0.02), the residual projections
  /// (attn.c_proj, mlp.c_proj) N(0, 0.02 / sqrt(2 L)), biases 0, layer norms weight 1 and bias 0.
  static Weights initialized(const Config& config, std::uint64_t seed) {
    Weights w = zeros(config);
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    auto fill = [&](int i, double std) {
      S* p = w.mutable_data(i);
      for (Index k = 0; k < w.specs[i].size(); ++k) p[k] = static_cast<S>(std * normal(rng));
    };
    auto ones = [&](int i) { std::fill_n(w.mutable_data(i), w.specs[i].size(), S(1)); };
    const double residual = 0.02 / std::sqrt(2.0 * config.n_layer);
    fill(wte_index(), 0.02);
    fill(wpe_index(), 0.01);  // as GPT-2's released weights and HF's _init_weights for wpe (0.02 there) roughly
    for (int l = 0; l < config.n_layer; ++l) {
      ones(block_index(l, ln_1_weight));
      ones(block_index(l, ln_2_weight));
      fill(block_index(l, c_attn_weight), 0.02);
      fill(block_index(l, attn_c_proj_weight), residual);
      fill(block_index(l, c_fc_weight), 0.02);
      fill(block_index(l, mlp_c_proj_weight), residual);
    }
    ones(ln_f_weight_index(config));
    return w;
  }
};

// ---- kernels: forward and backward side by side ------------------------------------------------

/// inp (N, C), weight and bias (C) -> out (N, C); mean and rstd (N) kept for backward.
template <class S>
void layernorm_forward(const Mat<S>& inp, const S* weight, const S* bias, S eps, Mat<S>& out, Vec<S>& mean,
                       Vec<S>& rstd) {
  const Index N = inp.rows(), C = inp.cols();
  ConstRowMap<S> w(weight, C), b(bias, C);
  for (Index n = 0; n < N; ++n) {
    const auto x = inp.row(n);
    const S m = x.mean();
    const S var = (x.array() - m).square().mean();  // biased, as torch.nn.LayerNorm
    const S r = S(1) / std::sqrt(var + eps);
    out.row(n) = ((x.array() - m) * r * w.array() + b.array()).matrix();
    mean(n) = m;
    rstd(n) = r;
  }
}

/// dout (N, C) -> dinp (N, C) added into; dweight, dbias (C) added into when not null.
template <class S>
void layernorm_backward(const Mat<S>& inp, const S* weight, const Vec<S>& mean, const Vec<S>& rstd, const Mat<S>& dout,
                        Mat<S>& dinp, S* dweight, S* dbias) {
  const Index N = inp.rows(), C = inp.cols();
  ConstRowMap<S> w(weight, C);
  Eigen::Array<S, 1, Eigen::Dynamic> norm(C), dnorm(C);
  for (Index n = 0; n < N; ++n) {
    // forward: out = norm * w + b,  norm = (x - mean) * rstd
    norm = (inp.row(n).array() - mean(n)) * rstd(n);
    dnorm = dout.row(n).array() * w.array();
    if (dweight) RowMap<S>(dweight, C).array() += dout.row(n).array() * norm;
    if (dbias) RowMap<S>(dbias, C).array() += dout.row(n).array();
    // d norm_j / d x_i = rstd (δ_ij − 1/C − norm_i norm_j / C)
    const S dnorm_mean = dnorm.mean();
    const S dnorm_norm_mean = (dnorm * norm).mean();
    dinp.row(n).array() += rstd(n) * (dnorm - dnorm_mean - norm * dnorm_norm_mean);
  }
}

/// GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³))). inp, out (N, 4C). A row at a time with
/// Eigen's vectorised tanh (libm's scalar tanhf took 40% of a training step).
template <class S>
void gelu_forward(const Mat<S>& inp, Mat<S>& out) {
  const S k = static_cast<S>(std::sqrt(2.0 / 3.14159265358979323846)), c = S(0.044715);
  Eigen::Array<S, 1, Eigen::Dynamic> t(inp.cols());
  for (Index n = 0; n < inp.rows(); ++n) {
    const auto x = inp.row(n).array();
    t = (k * (x + c * x.cube())).tanh();
    out.row(n).array() = S(0.5) * x * (S(1) + t);
  }
}

template <class S>
void gelu_backward(const Mat<S>& inp, const Mat<S>& dout, Mat<S>& dinp) {
  const S k = static_cast<S>(std::sqrt(2.0 / 3.14159265358979323846)), c = S(0.044715);
  Eigen::Array<S, 1, Eigen::Dynamic> t(inp.cols());
  for (Index n = 0; n < inp.rows(); ++n) {
    const auto x = inp.row(n).array();
    // forward: out = 0.5 x (1 + tanh u), u = k (x + c x³)
    // d out / dx = 0.5 (1 + tanh u) + 0.5 x (1 − tanh² u) k (1 + 3 c x²)
    t = (k * (x + c * x.cube())).tanh();
    dinp.row(n).array() = dout.row(n).array() *
                          (S(0.5) * (S(1) + t) + S(0.5) * k * x * (S(1) - t.square()) * (S(1) + S(3) * c * x.square()));
  }
}

/// qkv (N, 3C) -> out (N, C); att (B·NH, T·T) keeps the softmax probabilities (zero above the diagonal).
template <class S>
void attention_forward(const Mat<S>& qkv, Index B, Index T, Index NH, Mat<S>& att, Mat<S>& out) {
  const Index C3 = qkv.cols(), C = C3 / 3, HS = C / NH;
  const S scale = S(1) / std::sqrt(static_cast<S>(HS));
  Mat<S> scores(T, T);
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < NH; ++h) {
      const S* base = qkv.data() + b * T * C3 + h * HS;
      ConstStridedMap<S> q(base, T, HS, Eigen::OuterStride<>(C3));
      ConstStridedMap<S> k(base + C, T, HS, Eigen::OuterStride<>(C3));
      ConstStridedMap<S> v(base + 2 * C, T, HS, Eigen::OuterStride<>(C3));
      scores.noalias() = scale * (q * k.transpose());  // (T, T)
      Map<S> p(att.data() + (b * NH + h) * T * T, T, T);
      for (Index t = 0; t < T; ++t) {  // causal softmax: position t sees 0..t
        const auto row = scores.row(t).head(t + 1);
        const S mx = row.maxCoeff();
        p.row(t).head(t + 1) = (row.array() - mx).exp().matrix();
        p.row(t).head(t + 1) /= p.row(t).head(t + 1).sum();
        p.row(t).tail(T - t - 1).setZero();
      }
      StridedMap<S> o(out.data() + b * T * C + h * HS, T, HS, Eigen::OuterStride<>(C));
      o.noalias() = p * v;
    }
}

/// dout (N, C) -> dqkv (N, 3C), written.
template <class S>
void attention_backward(const Mat<S>& qkv, const Mat<S>& att, const Mat<S>& dout, Index B, Index T, Index NH,
                        Mat<S>& dqkv) {
  const Index C3 = qkv.cols(), C = C3 / 3, HS = C / NH;
  const S scale = S(1) / std::sqrt(static_cast<S>(HS));
  Mat<S> dp(T, T), ds(T, T);
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < NH; ++h) {
      const Index at = b * T * C3 + h * HS;
      ConstStridedMap<S> q(qkv.data() + at, T, HS, Eigen::OuterStride<>(C3));
      ConstStridedMap<S> k(qkv.data() + at + C, T, HS, Eigen::OuterStride<>(C3));
      ConstStridedMap<S> v(qkv.data() + at + 2 * C, T, HS, Eigen::OuterStride<>(C3));
      StridedMap<S> dq(dqkv.data() + at, T, HS, Eigen::OuterStride<>(C3));
      StridedMap<S> dk(dqkv.data() + at + C, T, HS, Eigen::OuterStride<>(C3));
      StridedMap<S> dv(dqkv.data() + at + 2 * C, T, HS, Eigen::OuterStride<>(C3));
      ConstMap<S> p(att.data() + (b * NH + h) * T * T, T, T);
      ConstStridedMap<S> d_o(dout.data() + b * T * C + h * HS, T, HS, Eigen::OuterStride<>(C));
      // forward: o = p v
      dv.noalias() = p.transpose() * d_o;
      dp.noalias() = d_o * v.transpose();
      // forward: p = softmax(s) per row, so ds = p ⊙ (dp − Σ_j dp ⊙ p); zero where p is (above the diagonal)
      for (Index t = 0; t < T; ++t) {
        const S dot = p.row(t).dot(dp.row(t));
        ds.row(t) = (p.row(t).array() * (dp.row(t).array() - dot)).matrix();
      }
      // forward: s = scale · q kᵀ
      dq.noalias() = scale * (ds * k);
      dk.noalias() = scale * (ds.transpose() * q);
    }
}

// ---- projections ---------------------------------------------------------------------------------

/// One Conv1D module (W (I, O) as stored, b (O)) and what adapts it: nothing, a LoRALinear, or a FusedLoRALinear.
template <class S>
class Projection {
 public:
  Projection(std::string name, const S* weight, const S* bias, Index in, Index out)
      : name_(std::move(name)), weight_(weight), bias_(bias), in_(in), out_(out) {}

  const std::string& name() const { return name_; }
  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  const S* weight() const { return weight_; }
  const S* bias() const { return bias_; }
  lora::FrozenWeight<S> frozen_weight() const {
    return lora::FrozenWeight<S>::view(weight_, out_, in_, lora::WeightLayout::in_out);
  }
  lora::RowVector<S> bias_row() const { return ConstRowMap<S>(bias_, out_); }

  bool adapted() const { return lora_ || fused_; }
  /// Off: forward and backward are the base module's alone (PEFT's disable_adapter()); the adapter is kept.
  void enable_adapter(bool on) { enabled_ = on; }
  lora::LoRALinear<S>* lora() { return lora_.get(); }
  const lora::LoRALinear<S>* lora() const { return lora_.get(); }
  lora::FusedLoRALinear<S>* fused() { return fused_.get(); }
  const lora::FusedLoRALinear<S>* fused() const { return fused_.get(); }

  void set_lora(std::unique_ptr<lora::LoRALinear<S>> layer) {
    fused_.reset();
    lora_ = std::move(layer);
  }
  void set_fused(std::unique_ptr<lora::FusedLoRALinear<S>> layer) {
    lora_.reset();
    fused_ = std::move(layer);
  }
  void remove_adapter() {
    lora_.reset();
    fused_.reset();
  }

  /// x (N, I) -> y (N, O): y = x W + b, plus the adapter's term.
  void forward(const Mat<S>& x, Mat<S>& y) {
    if (enabled_ && lora_) return lora_->forward(x, y);
    if (enabled_ && fused_) return fused_->forward(x, y);
    y.noalias() = x * ConstMap<S>(weight_, in_, out_);
    y.rowwise() += ConstRowMap<S>(bias_, out_);
  }

  /// dy (N, O) -> dx (N, I), written; the adapter's dA, dB added into; dW, db added into when given (full
  /// fine-tuning of an unadapted module).
  void backward(const Mat<S>& x, const Mat<S>& dy, Mat<S>& dx, S* dweight, S* dbias) {
    if (enabled_ && lora_) return lora_->backward(x, dy, dx);
    if (enabled_ && fused_) return fused_->backward(x, dy, dx);
    // forward: y = x W + b
    dx.noalias() = dy * ConstMap<S>(weight_, in_, out_).transpose();
    if (dweight) Map<S>(dweight, in_, out_).noalias() += x.transpose() * dy;
    if (dbias) RowMap<S>(dbias, out_) += dy.colwise().sum();
  }

 private:
  std::string name_;
  const S* weight_;
  const S* bias_;
  Index in_, out_;
  bool enabled_ = true;
  std::unique_ptr<lora::LoRALinear<S>> lora_;
  std::unique_ptr<lora::FusedLoRALinear<S>> fused_;
};

// ---- the model -----------------------------------------------------------------------------------

/// GPT2LMHeadModel over shared weights. Several models may share one Weights (each with its own adapters and
/// activations) and run at the same time in different threads, as long as none trains the base.
template <class S>
class Model {
 public:
  static constexpr const char* projection_suffixes[4] = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"};

  explicit Model(std::shared_ptr<Weights<S>> weights) : w_(std::move(weights)) {
    const Config& c = w_->config;
    c.check("gpt::Model");
    const Index C = c.n_embd;
    const Index sizes[4][2] = {{C, 3 * C}, {C, C}, {C, 4 * C}, {4 * C, C}};
    const BlockTensor tensors[4] = {c_attn_weight, attn_c_proj_weight, c_fc_weight, mlp_c_proj_weight};
    for (int l = 0; l < c.n_layer; ++l)
      for (int p = 0; p < 4; ++p) {
        const int wi = block_index(l, tensors[p]);
        proj_.emplace_back(module_name(l, p), w_->data[wi], w_->data[wi + 1], sizes[p][0], sizes[p][1]);
      }
  }

  const Config& config() const { return w_->config; }
  const Weights<S>& weights() const { return *w_; }
  Weights<S>& mutable_weights() { return *w_; }
  std::shared_ptr<Weights<S>> shared_weights() const { return w_; }

  static std::string module_name(int layer, int p) {
    return "transformer.h." + std::to_string(layer) + "." + projection_suffixes[p];
  }

  /// The checkpoint's modules as PEFT sees them (2-D weights, without ".weight"): wte, wpe and the four Conv1D
  /// projections of every block, in checkpoint order. What lora::peft::select_targets chooses from.
  std::vector<std::string> module_names() const {
    std::vector<std::string> out{"transformer.wte", "transformer.wpe"};
    for (const auto& p : proj_) out.push_back(p.name());
    return out;
  }

  std::vector<Projection<S>>& projections() { return proj_; }
  const std::vector<Projection<S>>& projections() const { return proj_; }
  /// The projection of that name; throws config_error naming it and the model's module names otherwise.
  Projection<S>& projection(const std::string& name) {
    for (auto& p : proj_)
      if (p.name() == name) return p;
    std::string hint = name == "transformer.wte" || name == "transformer.wpe"
                           ? " (an embedding: this model adapts Conv1D projections only; its head is tied to wte)"
                           : "";
    throw lora::config_error("gpt::Model: no projection named \"" + lora::printable(name) + "\"" + hint +
                             "; the projections are " + proj_.front().name() + ", ..., " + proj_.back().name());
  }

  /// Adapts one projection with a LoRALinear over its weight, in place.
  lora::LoRALinear<S>& add_lora(const std::string& module, const lora::LoraConfig& cfg) {
    Projection<S>& p = projection(module);
    if (train_base_) throw lora::state_error("gpt::Model::add_lora: the model fine-tunes every weight (train_base)");
    p.set_lora(std::make_unique<lora::LoRALinear<S>>(p.frozen_weight(), p.bias_row(), cfg));
    p.lora()->train(training_);
    return *p.lora();
  }

  /// Adapts the q, k, v slices of one c_attn: a config with r = 0 leaves that slice frozen.
  lora::FusedLoRALinear<S>& add_qkv_lora(const std::string& module, const lora::LoraConfig& q,
                                         const lora::LoraConfig& k, const lora::LoraConfig& v) {
    Projection<S>& p = projection(module);
    if (train_base_) throw lora::state_error("gpt::Model::add_qkv_lora: the model fine-tunes every weight");
    if (p.out_features() != 3 * p.in_features())
      throw lora::config_error("gpt::Model::add_qkv_lora: \"" + module + "\" is not a fused q, k, v projection");
    const Index C = p.in_features();
    p.set_fused(std::make_unique<lora::FusedLoRALinear<S>>(
        p.frozen_weight(), std::vector<lora::FusedSlice>{{"q", C, q}, {"k", C, k}, {"v", C, v}}, p.bias_row()));
    p.fused()->train(training_);
    return *p.fused();
  }

  void remove_adapters() {
    for (auto& p : proj_) p.remove_adapter();
  }
  /// Off: the pretrained model exactly, adapters kept (PEFT's `with model.disable_adapter():`).
  void enable_adapters(bool on) {
    for (auto& p : proj_) p.enable_adapter(on);
  }

  /// Full fine-tuning: every tensor of the model gets a gradient (the weights must be owned, no adapter).
  void set_train_base(bool on) {
    if (on) {
      if (!w_->is_owned()) throw lora::state_error("gpt::Model: full fine-tuning needs owned (not viewed) weights");
      for (const auto& p : proj_)
        if (p.adapted()) throw lora::state_error("gpt::Model: full fine-tuning of a model with adapters");
      dweights_ = Vec<S>::Zero(w_->total_size());
    } else {
      dweights_.resize(0);
    }
    train_base_ = on;
  }
  bool trains_base() const { return train_base_; }

  void train(bool mode = true) {
    training_ = mode;
    for (auto& p : proj_) {
      if (p.lora()) p.lora()->train(mode);
      if (p.fused()) p.fused()->train(mode);
    }
  }
  void eval() { train(false); }

  /// The trainable tensors with their gradients, named by module path ("transformer.h.0.attn.c_attn.q.lora_A",
  /// or the checkpoint's tensor names under full fine-tuning).
  lora::ParameterList<S> parameters() {
    lora::ParameterList<S> out;
    if (train_base_) {
      for (std::size_t i = 0; i < w_->specs.size(); ++i) {
        const auto& s = w_->specs[i];
        const Index rows = s.shape.size() == 2 ? s.shape[0] : 1, cols = s.shape.back();
        out.emplace_back(s.name, w_->mutable_data(static_cast<int>(i)), dweights_.data() + s.offset, rows, cols);
      }
      return out;
    }
    for (auto& p : proj_) {
      lora::ParameterList<S> list;
      if (p.lora()) list = p.lora()->parameters();
      if (p.fused()) list = p.fused()->parameters();
      for (auto& param : list) {
        param.name = p.name() + "." + param.name;
        out.push_back(std::move(param));
      }
    }
    return out;
  }

  void zero_grad() {
    if (train_base_) dweights_.setZero();
    for (auto& p : proj_) {
      if (p.lora()) p.lora()->zero_grad();
      if (p.fused()) p.fused()->zero_grad();
    }
  }

  /// Trainable and frozen scalar counts (frozen: the base; trainable: adapters, or the base under full FT).
  lora::ParameterCount parameter_count() const {
    lora::ParameterCount c;
    const Index base = w_->total_size();
    Index adapters = 0;
    for (const auto& p : proj_) {
      if (p.lora()) adapters += p.lora()->parameter_count().trainable;
      if (p.fused()) adapters += p.fused()->parameter_count().trainable;
    }
    c.trainable = train_base_ ? base : adapters;
    c.frozen = train_base_ ? 0 : base;
    return c;
  }

  /// tokens (B, T), row-major, each in [0, V), T ≤ n_positions -> logits (B·T, V), valid until the next forward.
  /// Throws config_error naming the position and the id of a token out of range, or T past n_positions.
  const Mat<S>& forward(const int* tokens, Index B, Index T) {
    check_tokens(tokens, B, T);
    const Config& c = config();
    const Index C = c.n_embd, N = B * T, L = c.n_layer, NH = c.n_head;
    resize(B, T);
    tokens_.assign(tokens, tokens + N);
    // forward: x = wte[token] + wpe[t]
    ConstMap<S> wte(w_->data[wte_index()], c.vocab_size, C), wpe(w_->data[wpe_index()], c.n_positions, C);
    Mat<S>& x0 = acts_[0].x;
    for (Index n = 0; n < N; ++n) x0.row(n) = wte.row(tokens[n]) + wpe.row(n % T);
    const S eps = static_cast<S>(c.layer_norm_epsilon);
    for (Index l = 0; l < L; ++l) {
      LayerActs& a = acts_[l];
      const Mat<S>& x = a.x;
      Mat<S>& next = l + 1 < L ? acts_[l + 1].x : xL_;
      block_forward(l, x, a, tmp_, next,
                    [&](const Mat<S>& qkv, Mat<S>& atty) { attention_forward(qkv, B, T, NH, a.att, atty); });
    }
    layernorm_forward(xL_, w_->data[ln_f_weight_index(c)], w_->data[ln_f_bias_index(c)], eps, lnf_, lnf_mean_,
                      lnf_rstd_);
    // forward: logits = lnf wteᵀ (the tied head)
    logits_.noalias() = lnf_ * wte.transpose();
    return logits_;
  }

  /// forward, then the mean cross-entropy of predicting targets (B, T) (each in [0, V)); keeps what backward needs.
  S forward_loss(const int* tokens, const int* targets, Index B, Index T) {
    forward(tokens, B, T);
    const Index N = B * T, V = config().vocab_size;
    for (Index n = 0; n < N; ++n)
      if (targets[n] < 0 || targets[n] >= V)
        throw lora::config_error("gpt::Model::forward_loss: target at position " + std::to_string(n) + " is " +
                                 std::to_string(targets[n]) + ", expected an id in [0, " + std::to_string(V) + ")");
    targets_.assign(targets, targets + N);
    dlogits_.resize(N, V);
    double loss = 0;
    for (Index n = 0; n < N; ++n) {
      const auto row = logits_.row(n);
      const S mx = row.maxCoeff();
      dlogits_.row(n) = (row.array() - mx).exp().matrix();
      const S sum = dlogits_.row(n).sum();
      loss += static_cast<double>(std::log(sum) + mx - row(targets[n]));
      // d loss / d logits = (softmax − onehot) / N
      dlogits_.row(n) /= sum * static_cast<S>(N);
      dlogits_(n, targets[n]) -= S(1) / static_cast<S>(N);
    }
    has_loss_ = true;
    return static_cast<S>(loss / static_cast<double>(N));
  }

  /// The gradients of the last forward_loss, added into the adapters' (or, under full FT, the base's) buffers.
  void backward() {
    if (!has_loss_) throw lora::state_error("gpt::Model::backward: call forward_loss first");
    has_loss_ = false;
    const Config& c = config();
    const Index C = c.n_embd, N = B_ * T_, L = c.n_layer, NH = c.n_head;
    S* dw = train_base_ ? dweights_.data() : nullptr;
    auto grad = [&](int i) -> S* { return dw ? dw + w_->specs[i].offset : nullptr; };
    ConstMap<S> wte(w_->data[wte_index()], c.vocab_size, C);
    // forward: logits = lnf wteᵀ
    dlnf_.noalias() = dlogits_ * wte;
    if (dw) Map<S>(grad(wte_index()), c.vocab_size, C).noalias() += dlogits_.transpose() * lnf_;
    dx_.setZero(N, C);
    layernorm_backward(xL_, w_->data[ln_f_weight_index(c)], lnf_mean_, lnf_rstd_, dlnf_, dx_,
                       grad(ln_f_weight_index(c)), grad(ln_f_bias_index(c)));
    for (Index l = L - 1; l >= 0; --l) {
      LayerActs& a = acts_[l];
      // forward: x' = res + mlp.c_proj(gelu(c_fc(ln_2(res)))), so dres = dx' + the path through the MLP
      dres_ = dx_;
      proj_[4 * l + 3].backward(a.fch_gelu, dx_, dbig_, grad(block_index(l, mlp_c_proj_weight)),
                                grad(block_index(l, mlp_c_proj_bias)));
      gelu_backward(a.fch, dbig_, dbig2_);
      proj_[4 * l + 2].backward(a.ln2, dbig2_, tmp_, grad(block_index(l, c_fc_weight)),
                                grad(block_index(l, c_fc_bias)));
      layernorm_backward(a.res, w_->data[block_index(l, ln_2_weight)], a.ln2_mean, a.ln2_rstd, tmp_, dres_,
                         grad(block_index(l, ln_2_weight)), grad(block_index(l, ln_2_bias)));
      // forward: res = x + attn.c_proj(attention(c_attn(ln_1(x))))
      dx_ = dres_;
      proj_[4 * l + 1].backward(a.atty, dres_, tmp_, grad(block_index(l, attn_c_proj_weight)),
                                grad(block_index(l, attn_c_proj_bias)));
      attention_backward(a.qkv, a.att, tmp_, B_, T_, NH, dqkv_);
      proj_[4 * l + 0].backward(a.ln1, dqkv_, tmp_, grad(block_index(l, c_attn_weight)),
                                grad(block_index(l, c_attn_bias)));
      layernorm_backward(a.x, w_->data[block_index(l, ln_1_weight)], a.ln1_mean, a.ln1_rstd, tmp_, dx_,
                         grad(block_index(l, ln_1_weight)), grad(block_index(l, ln_1_bias)));
    }
    if (dw) {
      // forward: x = wte[token] + wpe[t]
      Map<S> dwte(grad(wte_index()), c.vocab_size, C), dwpe(grad(wpe_index()), c.n_positions, C);
      for (Index n = 0; n < N; ++n) {
        dwte.row(tokens_[n]) += dx_.row(n);
        dwpe.row(n % T_) += dx_.row(n);
      }
    }
  }

  // ---- decoding with a key/value cache ----------------------------------------------------------------

  /// Forgets the cached keys and values: the next forward_next starts at position 0.
  void reset_cache() { cached_ = 0; }
  /// Positions held in the cache.
  Index cached_positions() const { return cached_; }

  /// Eval-mode decoding: feeds `count` more tokens of one sequence at the next positions, keeping every layer's keys
  /// and values, so a new token costs one row's products and one attention row instead of the whole sequence.
  /// Returns their logits (count, V), the rows forward() gives for those positions. Throws config_error for an id
  /// out of range or a sequence past n_positions (reset_cache() first). Adapters apply as in forward().
  const Mat<S>& forward_next(const int* tokens, Index count) {
    const Config& c = config();
    const Index C = c.n_embd, NH = c.n_head, HS = C / NH, P = c.n_positions;
    if (count <= 0) throw lora::shape_error("gpt::Model::forward_next: expected at least one token");
    if (cached_ + count > P)
      throw lora::config_error("gpt::Model::forward_next: " + std::to_string(cached_ + count) +
                               " positions are more than n_positions = " + std::to_string(P));
    for (Index n = 0; n < count; ++n)
      if (tokens[n] < 0 || tokens[n] >= c.vocab_size)
        throw lora::config_error("gpt::Model::forward_next: token at position " + std::to_string(n) + " is " +
                                 std::to_string(tokens[n]) + ", expected an id in [0, " + std::to_string(c.vocab_size) +
                                 ")");
    if (cache_k_.size() != static_cast<std::size_t>(c.n_layer)) {
      cache_k_.assign(c.n_layer, Mat<S>(P, C));
      cache_v_.assign(c.n_layer, Mat<S>(P, C));
    }
    const S eps = static_cast<S>(c.layer_norm_epsilon), scale = S(1) / std::sqrt(static_cast<S>(HS));
    ConstMap<S> wte(w_->data[wte_index()], c.vocab_size, C), wpe(w_->data[wpe_index()], P, C);
    Mat<S>& x = step_x_;
    x.resize(count, C);
    step_tmp_.resize(count, C);
    size_block(step_, count, C);
    Eigen::Matrix<S, 1, Eigen::Dynamic> scores;
    for (Index n = 0; n < count; ++n) x.row(n) = wte.row(tokens[n]) + wpe.row(cached_ + n);
    for (Index l = 0; l < c.n_layer; ++l) {
      // the block as in forward(), attending over the cached keys and values of the positions before
      block_forward(l, x, step_, step_tmp_, x, [&](const Mat<S>& qkv, Mat<S>& atty) {
        cache_k_[l].middleRows(cached_, count) = qkv.middleCols(C, C);
        cache_v_[l].middleRows(cached_, count) = qkv.rightCols(C);
        for (Index n = 0; n < count; ++n) {  // the token at position p = cached_ + n sees keys 0..p
          const Index seen = cached_ + n + 1;
          for (Index h = 0; h < NH; ++h) {
            const auto q = qkv.row(n).segment(h * HS, HS);
            const auto keys = cache_k_[l].block(0, h * HS, seen, HS);
            scores.noalias() = scale * (q * keys.transpose());
            scores = (scores.array() - scores.maxCoeff()).exp().matrix();
            scores /= scores.sum();
            atty.row(n).segment(h * HS, HS).noalias() = scores * cache_v_[l].block(0, h * HS, seen, HS);
          }
        }
      });
    }
    Mat<S>& a = step_.ln1;  // free after the blocks: the final layer norm's output
    Vec<S>& mean = step_.ln1_mean;
    Vec<S>& rstd = step_.ln1_rstd;
    layernorm_forward(x, w_->data[ln_f_weight_index(c)], w_->data[ln_f_bias_index(c)], eps, a, mean, rstd);
    next_logits_.noalias() = a * wte.transpose();
    cached_ += count;
    return next_logits_;
  }

  /// The gradient of the last backward's loss with respect to the token embeddings' sum (N, C): the input of block 0.
  const Mat<S>& input_gradient() const { return dx_; }

 private:
  struct LayerActs {
    Mat<S> x, ln1, qkv, att, atty, res, ln2, fch, fch_gelu;
    Vec<S> ln1_mean, ln1_rstd, ln2_mean, ln2_rstd;
  };

  /// The buffers of `a` that block_forward writes, sized for N rows (a.x and the attention's a.att are forward()'s).
  static void size_block(LayerActs& a, Index N, Index C) {
    a.ln1.resize(N, C);
    a.qkv.resize(N, 3 * C);
    a.atty.resize(N, C);
    a.res.resize(N, C);
    a.ln2.resize(N, C);
    a.fch.resize(N, 4 * C);
    a.fch_gelu.resize(N, 4 * C);
    for (Vec<S>* v : {&a.ln1_mean, &a.ln1_rstd, &a.ln2_mean, &a.ln2_rstd}) v->resize(N);
  }

  /// Block l on x (N, C): res = x + attn.c_proj(attention(c_attn(ln_1(x)))), out = res + mlp.c_proj(gelu(c_fc(
  /// ln_2(res)))), keeping in `a` (sized by size_block) what backward needs; `tmp` is scratch (N, C). `attend(qkv,
  /// atty)` is the causal attention: over the whole sequence in forward(), over the key/value cache in forward_next().
  /// out may be x.
  template <class Attend>
  void block_forward(Index l, const Mat<S>& x, LayerActs& a, Mat<S>& tmp, Mat<S>& out, Attend&& attend) {
    const S eps = static_cast<S>(config().layer_norm_epsilon);
    layernorm_forward(x, w_->data[block_index(l, ln_1_weight)], w_->data[block_index(l, ln_1_bias)], eps, a.ln1,
                      a.ln1_mean, a.ln1_rstd);
    proj_[4 * l + 0].forward(a.ln1, a.qkv);
    attend(a.qkv, a.atty);
    proj_[4 * l + 1].forward(a.atty, tmp);
    a.res = x + tmp;
    layernorm_forward(a.res, w_->data[block_index(l, ln_2_weight)], w_->data[block_index(l, ln_2_bias)], eps, a.ln2,
                      a.ln2_mean, a.ln2_rstd);
    proj_[4 * l + 2].forward(a.ln2, a.fch);
    gelu_forward(a.fch, a.fch_gelu);
    proj_[4 * l + 3].forward(a.fch_gelu, tmp);
    out = a.res + tmp;
  }

  void check_tokens(const int* tokens, Index B, Index T) const {
    const Config& c = config();
    if (B <= 0 || T <= 0)
      throw lora::shape_error("gpt::Model::forward: expected B, T >= 1, got B = " + std::to_string(B) +
                              ", T = " + std::to_string(T));
    if (T > c.n_positions)
      throw lora::config_error("gpt::Model::forward: " + std::to_string(T) +
                               " tokens are more than n_positions = " + std::to_string(c.n_positions));
    for (Index n = 0; n < B * T; ++n)
      if (tokens[n] < 0 || tokens[n] >= c.vocab_size)
        throw lora::config_error("gpt::Model::forward: token at position " + std::to_string(n) + " is " +
                                 std::to_string(tokens[n]) + ", expected an id in [0, " + std::to_string(c.vocab_size) +
                                 ")");
  }

  void resize(Index B, Index T) {
    const Config& c = config();
    const Index C = c.n_embd, N = B * T;
    B_ = B;
    T_ = T;
    acts_.resize(c.n_layer);
    for (auto& a : acts_) {
      a.x.resize(N, C);
      a.att.resize(B * c.n_head, T * T);
      size_block(a, N, C);
    }
    xL_.resize(N, C);
    lnf_.resize(N, C);
    lnf_mean_.resize(N);
    lnf_rstd_.resize(N);
    logits_.resize(N, c.vocab_size);
    tmp_.resize(N, C);
    dres_.resize(N, C);
    dbig_.resize(N, 4 * C);
    dbig2_.resize(N, 4 * C);
    dqkv_.resize(N, 3 * C);
    dlnf_.resize(N, C);
  }

  std::shared_ptr<Weights<S>> w_;
  std::vector<Projection<S>> proj_;  // 4 per block: c_attn, attn.c_proj, c_fc, mlp.c_proj
  bool train_base_ = false, training_ = true, has_loss_ = false;
  Vec<S> dweights_;  // the base's gradients under full fine-tuning, laid out as Weights::owned
  Index B_ = 0, T_ = 0;
  std::vector<int> tokens_, targets_;
  std::vector<LayerActs> acts_;
  Mat<S> xL_, lnf_, logits_, dlogits_, tmp_, dres_, dbig_, dbig2_, dqkv_, dlnf_, dx_;
  Vec<S> lnf_mean_, lnf_rstd_;
  std::vector<Mat<S>> cache_k_, cache_v_;  // per layer: keys and values of the cached positions (P, C)
  Index cached_ = 0;
  Mat<S> next_logits_;
  LayerActs step_;  // forward_next's block buffers (count rows), apart from forward()'s
  Mat<S> step_x_, step_tmp_;
};

}  // namespace gpt
