// LoRA adapters between PEFT's files and llama.cpp's GGUF adapters.
//
// A GGUF LoRA adapter, as llama.cpp's loader (src/llama-adapter.cpp) reads it:
//
//   general.architecture  "llama", "gpt2", ...: must be the base model's
//   general.type          "adapter"
//   adapter.type          "lora"
//   adapter.lora.alpha    f32; a module of rank r is applied at alpha / r
//                         (at 1 when alpha is 0), r = lora_b's ne[0]
//   <base tensor>.lora_a  ne {in, r}   A (r, in) as PyTorch holds it
//   <base tensor>.lora_b  ne {r, out}  B (out, r)
//   token_embd.weight.lora_a  ne {r, V}: Aᵀ of PEFT's lora_embedding_A (r, V)
//   token_embd.weight.lora_b  ne {r, d}: lora_embedding_B (d, r)
//
// where <base tensor> is the base model's own GGUF name ("blk.0.attn_q.weight").
// llama.cpp checks W.ne[0] == A.ne[0], W.ne[1] == B.ne[1], A.ne[1] == B.ne[0]
// (for token_embd: W.ne[0] == B.ne[1], W.ne[1] == A.ne[1]).
//
// export_adapter() writes such a file from a PEFT adapter, exactly where
// llama.cpp's own converter (convert_lora_to_gguf.py) is not:
//   - one alpha per file: every module's true PEFT scaling s (alpha / r, alpha
//     / sqrt(r) with use_rslora, rank_pattern / alpha_pattern) is reached by
//     multiplying B by s · r / alpha_file, so (alpha_file / r) · B' A = s · B A;
//     a plain adapter's factor is exactly 1 and its B is written as it is;
//   - LLaMA's q_proj and k_proj rows are reordered as llama.cpp's model
//     converter reorders the weight for its rotary layout (per head, the two
//     halves interleaved); the update B A follows when B's rows do;
//   - GPT-2's Conv1D modules (fan_in_fan_out) keep A and B as PEFT holds them:
//     the converter transposes the base weight to (out, in), which is already
//     the shape of B A (the official converter transposes the LoRA too, which
//     is wrong for c_attn and c_fc and silently transposes the square c_proj);
//   - DoRA is refused, with the reason; so are trained biases and
//     modules_to_save tensors, which a GGUF LoRA cannot carry.
// import_adapter() reads such a file back into a PEFT adapter (module paths,
// rows put back in PyTorch's order, the file's alpha as a rank/alpha pattern).
//
// Include <lora/gguf_adapter.hpp> directly; <lora/lora.hpp> does not include it.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/errors.hpp>
#include <lora/gguf.hpp>
#include <lora/peft.hpp>
#include <lora/types.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace lora::gguf {

// ---- architectures and tensor names ------------------------------------------------

/// The model families whose module names export_adapter() maps to GGUF names.
enum class Architecture { gpt2, llama };

inline const char* architecture_name(Architecture a) { return a == Architecture::gpt2 ? "gpt2" : "llama"; }

/// "gpt2, llama": what messages list as the known architectures.
inline std::string known_architectures() { return "gpt2, llama"; }

/// The architecture llama.cpp calls `name` (its general.architecture), or nullopt.
inline std::optional<Architecture> find_architecture(std::string_view name) {
  if (name == "gpt2") return Architecture::gpt2;
  if (name == "llama") return Architecture::llama;
  return std::nullopt;
}

/// find_architecture, or config_error naming what came and what is known.
inline Architecture parse_architecture(std::string_view name) {
  if (auto a = find_architecture(name)) return *a;
  throw config_error("unknown architecture \"" + printable(name) + "\": known are " + known_architectures());
}

/// How llama.cpp's model converter reorders a weight's output rows.
enum class RowOrder {
  as_is,
  rope_q,  ///< LLaMA's q_proj: per head (n_head), the two rotary halves interleaved
  rope_k,  ///< LLaMA's k_proj: the same per key/value head (n_head_kv)
};

/// Where a PEFT module lands in a GGUF model.
struct TensorTarget {
  std::string base;        ///< the base model's GGUF tensor, "blk.3.attn_q.weight"
  bool embedding = false;  ///< token_embd: A and B laid out as llm_build_inp_embd() wants them
  RowOrder rows = RowOrder::as_is;
};

namespace detail {

inline std::vector<std::string> split_dots(const std::string& s) {
  std::vector<std::string> parts;
  std::size_t begin = 0;
  for (std::size_t at; (at = s.find('.', begin)) != std::string::npos; begin = at + 1)
    parts.push_back(s.substr(begin, at - begin));
  parts.push_back(s.substr(begin));
  return parts;
}

/// A layer number as Hugging Face writes it: decimal digits, no leading zero, at most 9 of them.
inline bool is_layer_number(const std::string& s) {
  if (s.empty() || s.size() > 9 || (s.size() > 1 && s[0] == '0')) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

struct NameRule {
  const char* hf;    ///< module path after "<prefix>" with N for the layer: "layers.N.self_attn.q_proj"
  const char* gguf;  ///< GGUF tensor with N: "blk.N.attn_q.weight"
  bool embedding;
  RowOrder rows;
};

// gguf-py's tensor_mapping.py for these architectures; llama.cpp's converter transposes GPT-2's Conv1D weights
// (c_attn, c_proj, c_fc) to (out, in), which is the orientation PEFT's A and B already have.
inline const std::vector<NameRule>& name_rules(Architecture a) {
  static const std::vector<NameRule> llama = {
      {"embed_tokens", "token_embd.weight", true, RowOrder::as_is},
      {"layers.N.self_attn.q_proj", "blk.N.attn_q.weight", false, RowOrder::rope_q},
      {"layers.N.self_attn.k_proj", "blk.N.attn_k.weight", false, RowOrder::rope_k},
      {"layers.N.self_attn.v_proj", "blk.N.attn_v.weight", false, RowOrder::as_is},
      {"layers.N.self_attn.o_proj", "blk.N.attn_output.weight", false, RowOrder::as_is},
      {"layers.N.mlp.gate_proj", "blk.N.ffn_gate.weight", false, RowOrder::as_is},
      {"layers.N.mlp.up_proj", "blk.N.ffn_up.weight", false, RowOrder::as_is},
      {"layers.N.mlp.down_proj", "blk.N.ffn_down.weight", false, RowOrder::as_is},
  };
  static const std::vector<NameRule> gpt2 = {
      {"wte", "token_embd.weight", true, RowOrder::as_is},
      {"h.N.attn.c_attn", "blk.N.attn_qkv.weight", false, RowOrder::as_is},
      {"h.N.attn.c_proj", "blk.N.attn_output.weight", false, RowOrder::as_is},
      {"h.N.mlp.c_fc", "blk.N.ffn_up.weight", false, RowOrder::as_is},
      {"h.N.mlp.c_proj", "blk.N.ffn_down.weight", false, RowOrder::as_is},
  };
  return a == Architecture::llama ? llama : gpt2;
}

/// The prefix the transformer body has inside the *ForCausalLM model ("model." for LLaMA, "transformer." for
/// GPT-2); module paths may come with it or without it (a bare LlamaModel / GPT2Model was adapted).
inline const char* body_prefix(Architecture a) { return a == Architecture::llama ? "model." : "transformer."; }

/// Matches `parts` against a rule's dotted pattern; `layer` receives the N.
inline bool match_rule(const std::vector<std::string>& parts, const char* pattern, std::string& layer) {
  const auto want = split_dots(pattern);
  if (want.size() != parts.size()) return false;
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (want[i] == "N") {
      if (!is_layer_number(parts[i])) return false;
      layer = parts[i];
    } else if (want[i] != parts[i]) {
      return false;
    }
  }
  return true;
}

inline std::string fill_layer(const char* pattern, const std::string& layer) {
  std::string s = pattern;
  const auto n = s.find('N');
  return n == std::string::npos ? s : s.substr(0, n) + layer + s.substr(n + 1);
}

}  // namespace detail

/// The GGUF tensor a PEFT module path adapts in a model of architecture `a`,
/// or nullopt when llama.cpp has no LoRA target for it. Paths are taken with
/// or without the *ForCausalLM body prefix ("model.layers.0.self_attn.q_proj"
/// or "layers.0.self_attn.q_proj"); "lm_head" is the output projection.
inline std::optional<TensorTarget> tensor_target(Architecture a, const std::string& module_path) {
  if (module_path == "lm_head") return TensorTarget{"output.weight", false, RowOrder::as_is};
  std::string rest = module_path;
  const std::string prefix = detail::body_prefix(a);
  if (rest.compare(0, prefix.size(), prefix) == 0) rest = rest.substr(prefix.size());
  const auto parts = detail::split_dots(rest);
  for (const auto& rule : detail::name_rules(a)) {
    std::string layer;
    if (detail::match_rule(parts, rule.hf, layer))
      return TensorTarget{detail::fill_layer(rule.gguf, layer), rule.embedding, rule.rows};
  }
  return std::nullopt;
}

/// The inverse: the module path (with the body prefix, as a *ForCausalLM
/// model names it) of GGUF base tensor `base`, or nullopt.
inline std::optional<std::string> module_path(Architecture a, const std::string& base) {
  if (base == "output.weight") return std::string("lm_head");
  const auto parts = detail::split_dots(base);
  for (const auto& rule : detail::name_rules(a)) {
    std::string layer;
    if (detail::match_rule(parts, rule.gguf, layer)) return detail::body_prefix(a) + detail::fill_layer(rule.hf, layer);
  }
  return std::nullopt;
}

/// Reorders the rows of `m` as llama.cpp's LLaMA converter reorders q_proj /
/// k_proj weights (LlamaModel.permute: reshape(heads, 2, rows / heads / 2,
/// cols).swapaxes(1, 2)): within each head of hd rows, row i·hd/2 + j moves
/// to 2j + i. `inverse` undoes it. Throws shape_error when rows is not a
/// multiple of 2·heads.
template <class Derived>
Matrix<typename Derived::Scalar> rope_rows(const Eigen::MatrixBase<Derived>& m, Index heads, bool inverse = false) {
  if (heads <= 0 || m.rows() % (2 * heads) != 0)
    throw shape_error("rope row order: " + std::to_string(m.rows()) + " rows are not whole pairs of halves of " +
                      std::to_string(heads) + " heads");
  const Index hd = m.rows() / heads, half = hd / 2;
  Matrix<typename Derived::Scalar> out(m.rows(), m.cols());
  for (Index h = 0; h < heads; ++h)
    for (Index i = 0; i < 2; ++i)
      for (Index j = 0; j < half; ++j) {
        const Index torch_row = h * hd + i * half + j, gguf_row = h * hd + 2 * j + i;
        if (inverse)
          out.row(torch_row) = m.row(gguf_row);
        else
          out.row(gguf_row) = m.row(torch_row);
      }
  return out;
}

// ---- export --------------------------------------------------------------------------

struct ExportOptions {
  Architecture architecture = Architecture::llama;
  /// F32, F16, BF16 or Q8_0. With Q8_0 a tensor whose rows are not whole
  /// blocks of 32 (lora_b's ne[0] is the rank) is written F16, as llama.cpp's
  /// converter falls back.
  TensorType type = TensorType::F32;
  /// LLaMA's num_attention_heads and num_key_value_heads (0: n_head): needed
  /// when q_proj or k_proj is adapted.
  int n_head = 0;
  int n_head_kv = 0;
};

/// One module as written.
struct ExportedModule {
  std::string module;  ///< PEFT module path
  std::string tensor;  ///< GGUF base tensor
  int rank = 0;
  double scaling = 0;  ///< PEFT's s for this module
  double factor = 1;   ///< multiplied into B so that alpha_file / rank reproduces s
  TensorType type_a = TensorType::F32, type_b = TensorType::F32;
  RowOrder rows = RowOrder::as_is;
};

struct ExportReport {
  float alpha = 0;  ///< adapter.lora.alpha written
  std::vector<ExportedModule> modules;
};

/// ggml's llama_ftype of a file whose tensors are mostly `type` (general.file_type).
inline std::uint32_t file_type_of(TensorType type) {
  switch (type) {
    case TensorType::F16:
      return 1;  // LLAMA_FTYPE_MOSTLY_F16
    case TensorType::Q8_0:
      return 7;  // LLAMA_FTYPE_MOSTLY_Q8_0
    case TensorType::BF16:
      return 32;  // LLAMA_FTYPE_MOSTLY_BF16
    default:
      return 0;  // LLAMA_FTYPE_ALL_F32
  }
}

inline constexpr const char* dora_refusal =
    "a DoRA adapter (use_dora, lora_magnitude_vector) cannot be a GGUF LoRA adapter: DoRA rescales each output row "
    "of W + s B A by m / |W + s B A|, which depends on W and is not a low-rank update B A that llama.cpp could add; "
    "merge it into the base model instead (lora-merge)";

/// Adds `adapter` to `writer` as a GGUF LoRA adapter (metadata and tensors).
/// Checks everything first and throws format_error listing every problem:
/// modules with no GGUF name for the architecture (all of them, with the
/// names it knows), a trained bias, tensors that are not LoRA matrices,
/// q_proj / k_proj without n_head, rows that are not whole heads, two modules
/// on one GGUF tensor, values that are not finite or overflow the type. The
/// writer is left as it was when anything is refused.
template <class Scalar>
ExportReport export_adapter(const peft::Adapter<Scalar>& adapter, const ExportOptions& options, Writer& writer) {
  if (!is_convertible(options.type))
    throw config_error(std::string("gguf::export_adapter: type must be f32, f16, bf16 or q8_0, got ") +
                       tensor_type_name(options.type));
  const std::string arch = architecture_name(options.architecture);
  bool dora = adapter.config.use_dora;
  for (const auto& m : adapter.modules) dora = dora || m.magnitude.size() > 0;
  if (dora) throw format_error(adapter.source + ": " + dora_refusal);
  try {
    if (adapter.config.residual_init("adapter_config.json") != ResidualInit::none)
      throw format_error(adapter.source + ": init_lora_weights " + adapter.config.init_lora_weights.dump() +
                         ": the adapter was trained over PiSSA's / OLoRA's residual of the base, which PEFT writes "
                         "into the base when it loads it; llama.cpp adds an adapter to the original base, so convert "
                         "it to a plain LoRA first (peft::convert_residual_adapter)");
  } catch (const config_error& e) {
    throw format_error(adapter.source + ": cannot export to GGUF: " + e.what());
  }
  std::vector<std::string> problems, unmapped;
  std::map<std::string, std::string> claimed;  // GGUF tensor -> module
  struct Planned {
    const peft::ModuleAdapter<Scalar>* m;
    TensorTarget target;
  };
  std::vector<Planned> plan;
  for (const auto& m : adapter.modules) {
    auto target = tensor_target(options.architecture, m.path);
    if (!target) {
      unmapped.push_back(m.path);
      continue;
    }
    if (target->embedding != m.embedding)
      problems.push_back(m.path + ": " +
                         (m.embedding ? "an embedding adapter (lora_embedding_A/B), but " + target->base +
                                            " takes a linear LoRA (lora_A/B)"
                                      : "a linear LoRA (lora_A/B), but " + target->base +
                                            " is the token embedding, which takes lora_embedding_A/B"));
    if (auto [it, fresh] = claimed.emplace(target->base, m.path); !fresh)
      problems.push_back(m.path + ": lands on " + target->base + ", which " + it->second + " adapts too");
    if (m.bias.size() > 0)
      problems.push_back(m.path + ".bias: the adapter trained the bias (bias \"" +
                         peft::bias_name(adapter.config.bias) + "\"), which a GGUF LoRA adapter cannot carry");
    if (target->rows != RowOrder::as_is) {
      const int heads = target->rows == RowOrder::rope_k && options.n_head_kv > 0 ? options.n_head_kv : options.n_head;
      if (options.n_head <= 0)
        problems.push_back(m.path + ": llama.cpp reorders " + (target->rows == RowOrder::rope_q ? "q_proj" : "k_proj") +
                           " rows for its rotary layout per attention head; give the base model's "
                           "num_attention_heads (n_head) and num_key_value_heads (n_head_kv)");
      else if (m.B.rows() % (2 * heads) != 0)
        problems.push_back(m.path + ": " + std::to_string(m.B.rows()) + " output rows are not " +
                           std::to_string(heads) + " heads of an even size");
    }
    if (!m.A.allFinite() || !m.B.allFinite()) problems.push_back(m.path + ": lora_A or lora_B holds non-finite values");
    plan.push_back({&m, *target});
  }
  if (!unmapped.empty()) {
    std::string list;
    for (const auto& p : unmapped) list += (list.empty() ? "" : ", ") + p;
    std::string known;
    for (const auto& rule : detail::name_rules(options.architecture))
      known += std::string(known.empty() ? "" : ", ") + rule.hf;
    problems.push_back(std::to_string(unmapped.size()) + " module(s) with no GGUF tensor in " + arch + ": " + list +
                       " (known: " + known + ", lm_head; with or without \"" +
                       detail::body_prefix(options.architecture) + "\"; N a layer number)");
  }
  for (const auto& t : adapter.other_tensors)
    problems.push_back(t.name + ": not a LoRA matrix (a modules_to_save or bias tensor), which a GGUF LoRA adapter " +
                       "cannot carry");
  peft::detail::throw_problems(adapter.source + ": cannot export to GGUF, ", problems);

  // One alpha for the file, as llama.cpp's converter writes it: the config's lora_alpha.
  const double file_alpha = adapter.config.lora_alpha;
  ExportReport report;
  report.alpha = static_cast<float>(file_alpha);
  Writer staged = writer;
  staged.set("general.architecture", arch);
  staged.set("general.type", "adapter");
  staged.set("adapter.type", "lora");
  staged.set("adapter.lora.alpha", report.alpha);
  staged.set("general.file_type", file_type_of(options.type));
  if (options.type == TensorType::Q8_0) staged.set("general.quantization_version", std::uint32_t{2});
  auto type_for = [&](std::uint64_t ne0) {
    return options.type == TensorType::Q8_0 && ne0 % q8_0_block != 0 ? TensorType::F16 : options.type;
  };
  auto check_range = [&](const std::string& what, const Matrix<double>& x, TensorType type) {
    const double limit = type == TensorType::F16                               ? 65504.0
                         : type == TensorType::F32 || type == TensorType::Q8_0 ? std::numeric_limits<float>::max()
                                                                               : 3.3895313892515355e38;
    if (x.size() > 0 && x.cwiseAbs().maxCoeff() > limit)
      problems.push_back(what + ": a value " + std::to_string(x.cwiseAbs().maxCoeff()) + " overflows " +
                         tensor_type_name(type));
  };
  for (const auto& [m, target] : plan) {
    ExportedModule e;
    e.module = m->path;
    e.tensor = target.base;
    e.rank = m->r;
    e.scaling = m->scaling;
    // llama.cpp applies alpha_file / r (1 when alpha_file is 0).
    const double applied = file_alpha != 0 ? file_alpha / m->r : 1.0;
    e.factor = m->scaling / applied;
    e.rows = target.rows;
    Matrix<double> B = m->B.template cast<double>();
    if (e.factor != 1.0) B *= e.factor;
    if (target.rows != RowOrder::as_is) {
      const int heads = target.rows == RowOrder::rope_k && options.n_head_kv > 0 ? options.n_head_kv : options.n_head;
      B = rope_rows(B, heads);
    }
    Matrix<double> A = m->A.template cast<double>();
    if (target.embedding) A.transposeInPlace();  // (V, r): ne {r, V}, rows fetched by token id
    e.type_a = type_for(static_cast<std::uint64_t>(A.cols()));
    e.type_b = type_for(static_cast<std::uint64_t>(B.cols()));
    check_range(m->path + " lora_a", A, e.type_a);
    check_range(m->path + " lora_b", B, e.type_b);
    if (!problems.empty()) continue;
    // ne given in full, so a rank of 1 stays a 2-D {in, 1} as PyTorch's shape says.
    staged.add(target.base + ".lora_a", A, e.type_a,
               {static_cast<std::uint64_t>(A.cols()), static_cast<std::uint64_t>(A.rows())});
    staged.add(target.base + ".lora_b", B, e.type_b,
               {static_cast<std::uint64_t>(B.cols()), static_cast<std::uint64_t>(B.rows())});
    report.modules.push_back(e);
  }
  peft::detail::throw_problems(adapter.source + ": cannot export to GGUF, ", problems);
  writer = std::move(staged);
  return report;
}

/// Reads the PEFT adapter in `adapter_dir` and writes it to `out` as a GGUF
/// LoRA adapter (atomically; nothing is written when anything is refused).
inline ExportReport export_adapter_file(const std::string& adapter_dir, const std::string& out,
                                        const ExportOptions& options) {
  peft::Adapter<double> adapter;
  try {
    adapter = peft::read_adapter<double>(adapter_dir);
  } catch (const format_error& e) {
    if (std::string(e.what()).find("DoRA") == std::string::npos) throw;
    throw format_error(adapter_dir + ": " + dora_refusal + " (" + e.what() + ")");
  }
  Writer writer;
  ExportReport report = export_adapter(adapter, options, writer);
  writer.save(out);
  return report;
}

// ---- import --------------------------------------------------------------------------

struct ImportOptions {
  /// LLaMA's num_attention_heads / num_key_value_heads (0: n_head): needed to
  /// put attn_q / attn_k rows back in PyTorch's order.
  int n_head = 0;
  int n_head_kv = 0;
};

/// Reads a GGUF LoRA adapter (general.type "adapter", adapter.type "lora",
/// a known general.architecture) into a PEFT adapter: module paths as a
/// *ForCausalLM model names them, A and B in PyTorch's shapes and order, r
/// the most common rank with rank_pattern for the others and lora_alpha the
/// file's (llama.cpp's scaling alpha / r for every module; with alpha 0 each
/// module's alpha is its rank, scaling 1). GPT-2 adapters get fan_in_fan_out.
/// Throws format_error listing every problem: tensors that are not
/// <name>.lora_a / .lora_b, a pair missing a half, tensors of no known module,
/// shapes llama.cpp's loader would refuse, types it cannot convert, attn_q /
/// attn_k without n_head.
template <class Scalar>
peft::Adapter<Scalar> import_adapter(const File& file, const ImportOptions& options = {}) {
  auto text = [&](const char* key) -> std::string {
    const Value* v = file.find_value(key);
    if (v == nullptr) throw format_error(file.source() + ": no key \"" + key + "\": not a GGUF LoRA adapter");
    if (v->type() != ValueType::STRING)
      throw format_error(file.source() + ": \"" + key + "\" is " + v->type_text() + ", expected str");
    return v->get<std::string>();
  };
  if (auto type = text("general.type"); type != "adapter")
    throw format_error(file.source() + ": general.type is \"" + printable(type) + "\", expected \"adapter\"");
  if (auto type = text("adapter.type"); type != "lora")
    throw format_error(file.source() + ": adapter.type is \"" + printable(type) + "\", expected \"lora\"");
  const std::string arch_name = text("general.architecture");
  const auto arch = find_architecture(arch_name);
  if (!arch)
    throw format_error(file.source() + ": general.architecture \"" + printable(arch_name) +
                       "\" is not one this importer knows (" + known_architectures() + ")");
  double alpha = 0;  // llama.cpp reads a missing alpha as 0
  if (const Value* v = file.find_value("adapter.lora.alpha")) {
    if (v->type() != ValueType::FLOAT32)
      throw format_error(file.source() + ": adapter.lora.alpha is " + v->type_text() + ", expected f32");
    alpha = v->get<float>();
    if (!std::isfinite(alpha))
      throw format_error(file.source() + ": adapter.lora.alpha is " + std::to_string(alpha) + ", not finite");
  }

  std::vector<std::string> problems;
  std::map<std::string, std::pair<const TensorInfo*, const TensorInfo*>> pairs;
  auto ends_with = [](const std::string& s, const std::string& suffix) {
    return s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  for (const auto& t : file.tensors()) {
    if (ends_with(t.name, ".lora_a"))
      pairs[t.name.substr(0, t.name.size() - 7)].first = &t;
    else if (ends_with(t.name, ".lora_b"))
      pairs[t.name.substr(0, t.name.size() - 7)].second = &t;
    else
      problems.push_back(t.name +
                         ": not a .lora_a / .lora_b tensor (llama.cpp skips *_norm.weight vectors; a PEFT "
                         "LoRA has no place for them)");
  }
  peft::Adapter<Scalar> adapter;
  adapter.source = file.source();
  std::map<int, int> rank_count;
  for (const auto& [base, pair] : pairs) {
    const auto [a, b] = pair;
    if (a == nullptr || b == nullptr) {
      problems.push_back(base + ": has " + (a ? ".lora_a" : ".lora_b") + " but no " + (a ? ".lora_b" : ".lora_a"));
      continue;
    }
    const auto path = module_path(*arch, base);
    if (!path) {
      problems.push_back(base + ": no " + arch_name + " module adapts this tensor");
      continue;
    }
    const auto target = *tensor_target(*arch, *path);
    if (a->ne.size() != 2 || b->ne.size() != 2) {
      problems.push_back(base + ": lora_a ne " + ne_text(a->ne) + " and lora_b ne " + ne_text(b->ne) +
                         " must both be 2-D");
      continue;
    }
    if (!is_convertible(a->type) || !is_convertible(b->type)) {
      problems.push_back(base + ": lora_a / lora_b are " + tensor_type_name(a->type) + " / " +
                         tensor_type_name(b->type) + ", expected f32, f16, bf16 or q8_0");
      continue;
    }
    // Rank: lora_b's ne[0], as llama.cpp takes it; lora_a must agree (ne[1], or ne[0] for token_embd).
    const std::uint64_t rank = b->ne[0], a_rank = target.embedding ? a->ne[0] : a->ne[1];
    if (rank != a_rank || rank == 0 || rank > 1u << 20) {
      problems.push_back(
          base + ": lora_a ne " + ne_text(a->ne) + " and lora_b ne " + ne_text(b->ne) +
          (target.embedding ? " (token_embd: A is ne {r, V}, B ne {r, d})" : " (A is ne {in, r}, B ne {r, out})") +
          " disagree on the rank");
      continue;
    }
    int heads = 0;
    if (target.rows != RowOrder::as_is) {
      heads = target.rows == RowOrder::rope_k && options.n_head_kv > 0 ? options.n_head_kv : options.n_head;
      if (options.n_head <= 0) {
        problems.push_back(base +
                           ": llama.cpp keeps its rows in rotary order; give the base model's "
                           "num_attention_heads (n_head) and num_key_value_heads (n_head_kv) to undo it");
        continue;
      }
      if (b->ne[1] % (2 * static_cast<std::uint64_t>(heads)) != 0) {
        problems.push_back(base + ": " + std::to_string(b->ne[1]) + " output rows are not " + std::to_string(heads) +
                           " heads of an even size");
        continue;
      }
    }
    peft::ModuleAdapter<Scalar> m;
    m.path = *path;
    m.embedding = target.embedding;
    m.r = static_cast<int>(rank);
    m.A = file.matrix<Scalar>(a->name);  // (r, in), or (V, r) for token_embd
    if (target.embedding) m.A.transposeInPlace();
    m.B = file.matrix<Scalar>(b->name);  // (out, r)
    if (heads > 0) m.B = rope_rows(m.B, heads, true);
    ++rank_count[m.r];
    adapter.modules.push_back(std::move(m));
  }
  if (problems.empty() && adapter.modules.empty())
    problems.push_back("no .lora_a / .lora_b pair among its " + std::to_string(file.tensors().size()) + " tensor(s)");
  peft::detail::throw_problems(file.source() + ": cannot import the GGUF LoRA adapter, ", problems);

  // The most common rank is r (the smallest of equals); the others go in rank_pattern under their escaped paths.
  int r = 0, best = 0;
  for (const auto& [rank, count] : rank_count)
    if (count > best) r = rank, best = count;
  peft::AdapterConfig& config = adapter.config;
  config.r = r;
  config.lora_alpha = alpha != 0 ? alpha : r;
  std::set<std::string> targets;
  bool linear = false;
  for (auto& m : adapter.modules) {
    std::string key;
    for (char c : m.path) key += c == '.' ? std::string("\\.") : std::string(1, c);
    if (m.r != r) config.rank_pattern.emplace_back(key, m.r);
    if (alpha == 0 && m.r != r) config.alpha_pattern.emplace_back(key, m.r);
    m.lora_alpha = alpha != 0 ? alpha : m.r;
    m.scaling = m.lora_alpha / m.r;
    targets.insert(m.path.substr(m.path.rfind('.') + 1));
    linear = linear || !m.embedding;
  }
  config.target_modules.assign(targets.begin(), targets.end());
  config.fan_in_fan_out = *arch == Architecture::gpt2 && linear;
  std::sort(adapter.modules.begin(), adapter.modules.end(),
            [](const auto& x, const auto& y) { return x.path < y.path; });
  return adapter;
}

/// import_adapter from a file, written to `out_dir` as a PEFT adapter folder
/// (adapter_model.safetensors in `dtype`, adapter_config.json; atomically).
inline peft::Adapter<double> import_adapter_file(const std::string& gguf_path, const std::string& out_dir,
                                                 const ImportOptions& options = {},
                                                 safetensors::Dtype dtype = safetensors::Dtype::F32) {
  File file = File::open(gguf_path, Access::read);
  peft::Adapter<double> adapter = import_adapter<double>(file, options);
  file.check_unchanged();
  peft::save_adapter(out_dir, adapter, dtype);
  return adapter;
}

}  // namespace lora::gguf
