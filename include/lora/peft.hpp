// PEFT adapter files: a folder with adapter_model.safetensors and
// adapter_config.json, exactly as Hugging Face PEFT writes and reads them.
//
//   keys    base_model.model.<module path>.lora_A.weight   A (R, I)
//           base_model.model.<module path>.lora_B.weight   B (O, R)
//           base_model.model.<module path>.bias            b (O), with bias "lora_only" / "all"
//   file    __metadata__ {"format": "pt"}; F32 unless asked otherwise
//   config  json.dumps(config, indent=2, sort_keys=True): peft_type "LORA", r,
//           lora_alpha, target_modules, rank_pattern / alpha_pattern (per-module
//           rank and alpha, PEFT's regex match "(.*\.)?(<key>)$"), use_rslora, ...
//
// The adapter name ("default") never appears in saved keys. fan_in_fan_out
// (GPT-2's Conv1D) stores the base weight (I, O); the adapter tensors keep
// their shapes and the delta merged into such a weight is s·(B A)ᵀ.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/config.hpp>
#include <lora/detail/file.hpp>
#include <lora/detail/pattern.hpp>
#include <lora/embedding.hpp>
#include <lora/errors.hpp>
#include <lora/init.hpp>
#include <lora/linear.hpp>
#include <lora/multi.hpp>
#include <lora/safetensors.hpp>
#include <lora/types.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora::peft {

inline constexpr const char* config_file_name = "adapter_config.json";
inline constexpr const char* weights_file_name = "adapter_model.safetensors";
inline constexpr const char* key_prefix = "base_model.model.";
/// adapter_config.json is refused above this size (PEFT writes a few KiB; a
/// rank_pattern for every module of a 70B model is a few hundred).
inline constexpr std::size_t max_config_bytes = 8u << 20;
/// ... and above this nesting of arrays and objects (PEFT's own reach 3).
inline constexpr int max_config_depth = 64;

/// adapter_config.json for peft_type "LORA". Keys the library does not use
/// are kept in `other` and written back unchanged.
struct AdapterConfig {
  int r = 8;
  double lora_alpha = 8;
  double lora_dropout = 0;
  /// Module-name suffixes to adapt (PEFT's list form); `target_modules_regex` when the file gives one string.
  std::vector<std::string> target_modules;
  std::optional<std::string> target_modules_regex;
  bool fan_in_fan_out = false;
  BiasMode bias = BiasMode::none;
  bool use_rslora = false;
  /// DoRA: every module also has "<path>.lora_magnitude_vector" (O), PEFT's one flag for the whole adapter.
  bool use_dora = false;
  /// Per-module rank and alpha, in file order (the first matching key wins, as in PEFT).
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  nlohmann::json init_lora_weights = true;
  std::optional<std::string> task_type;
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::vector<std::string>> modules_to_save;
  bool inference_mode = true;
  nlohmann::json other = nlohmann::json::object();
  /// What the reader had to assume ("r is missing: assumed 8, PEFT's default").
  std::vector<std::string> assumed;

  /// Rank of one module: rank_pattern's first matching key, else r.
  /// Throws config_error for a key the matcher refuses (parse() refuses
  /// those up front) or a module path over ModulePattern::max_module_bytes.
  int rank_for(const std::string& module) const {
    for (const auto& [pattern, rank] : rank_pattern)
      if (key_matches(pattern, module)) return rank;
    return r;
  }
  double alpha_for(const std::string& module) const {
    for (const auto& [pattern, alpha] : alpha_pattern)
      if (key_matches(pattern, module)) return alpha;
    return lora_alpha;
  }
  double scaling_for(const std::string& module) const {
    int rank = rank_for(module);
    if (rank == 0) return 0;
    double alpha = alpha_for(module);
    return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / rank;
  }

  /// What PEFT's from_pretrained does to the base weight of every linear module this adapter adapts, before it
  /// loads A and B, as init_lora_weights says:
  /// - none: true, false, "gaussian", "orthogonal", "eva", "mica" set only A and B, which the file then replaces;
  /// - pissa / olora: "pissa" and "olora" replace W by the residual W − s·B0 A0 of their (deterministic)
  ///   initialisation, and the adapter was trained over that residual; the library computes it the same way.
  /// Throws config_error, naming `where`, for the inits that rewrite the base in a way no one can reproduce from
  /// the base alone ("pissa_niter_K" from torch's random numbers, "corda" from activation statistics, "loftq" by
  /// quantising it, "lora_ga" from gradients) and for a value PEFT does not define. Embedding modules are never
  /// rewritten (PEFT's lora.Embedding runs none of these).
  ResidualInit residual_init(const std::string& where) const;

  /// The LoraConfig a LoRALinear for `module` needs to reproduce this adapter.
  LoraConfig layer_config(const std::string& module) const {
    LoraConfig c;
    c.r = rank_for(module);
    c.lora_alpha = alpha_for(module);
    c.lora_dropout = lora_dropout;
    c.use_rslora = use_rslora;
    c.use_dora = use_dora;
    c.bias = bias;
    return c;
  }

  /// PEFT's get_pattern_key: `key` matches `module` when
  /// re.match(rf"(.*\.)?({key})$", module) does in Python. Keys are matched
  /// in time linear in the module path's length, with bounded stack, by
  /// lora::detail::ModulePattern, which takes the subset of Python's re
  /// that PEFT configs use and throws config_error naming anything else
  /// (backreferences, lookaround, inline flags). Compiles `key` each call:
  /// rank_for / alpha_for use the keys parse() compiled once.
  static bool pattern_matches(const std::string& key, const std::string& module) {
    return lora::detail::ModulePattern(key).matches(module);
  }

  /// Parses adapter_config.json text; throws format_error naming `source`.
  /// Refuses text over max_config_bytes or nested over max_config_depth.
  static AdapterConfig parse(const std::string& text, const std::string& source = "adapter_config.json");
  /// Reads and parses a config file; anything but a regular file of at most
  /// max_config_bytes is refused before it is read.
  static AdapterConfig read(const std::string& path);

 private:
  static AdapterConfig parse_object(const nlohmann::ordered_json& j, const std::string& source);
  bool key_matches(const std::string& key, const std::string& module) const {
    if (compiled_)
      if (auto it = compiled_->find(key); it != compiled_->end()) return it->second.matches(module);
    return pattern_matches(key, module);  // a key added after parse()
  }
  /// The rank_pattern / alpha_pattern keys parse() compiled, by key text; shared by copies (never changed).
  std::shared_ptr<const std::map<std::string, lora::detail::ModulePattern>> compiled_;

 public:
  /// PEFT's layout: indent 2, keys sorted, no trailing newline.
  std::string to_json() const;
  void save(const std::string& path) const { stage(path).commit(); }
  lora::detail::StagedFile stage(const std::string& path) const {
    std::string text = to_json();
    return lora::detail::StagedFile(path, [&](lora::detail::FileSink& sink) { sink.write(text.data(), text.size()); });
  }
};

inline const char* bias_name(BiasMode b) {
  return b == BiasMode::none ? "none" : b == BiasMode::all ? "all" : "lora_only";
}

namespace detail {
/// The deepest nesting of arrays and objects in JSON `text` (strings
/// skipped), found without building anything, so a hostile config is
/// refused before a recursive parser or dump() sees it. Stops counting past `limit`.
inline int json_nesting_depth(const std::string& text, int limit) {
  int depth = 0, deepest = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
      if (deepest > limit) return deepest;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}
}  // namespace detail

inline AdapterConfig AdapterConfig::parse(const std::string& text, const std::string& source) {
  using json = nlohmann::ordered_json;
  auto fail = [&](const std::string& what) -> void { throw format_error(source + ": " + what); };
  if (text.size() > max_config_bytes)
    fail("the config is " + std::to_string(text.size()) + " bytes, more than the limit of " +
         std::to_string(max_config_bytes));
  if (detail::json_nesting_depth(text, max_config_depth) > max_config_depth)
    fail("arrays and objects nest more than " + std::to_string(max_config_depth) +
         " levels deep, past the limit for an adapter config");
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number such as 1e400
    throw format_error(source + ": not valid JSON: " + printable(std::string(e.what()).substr(0, 200)));
  }
  if (!j.is_object()) fail(std::string("expected a JSON object, got ") + j.type_name());
  try {
    return parse_object(j, source);
  } catch (const json::exception& e) {  // a value of a type the checks above did not expect
    throw format_error(source + ": " + printable(std::string(e.what()).substr(0, 200)));
  }
}

inline AdapterConfig AdapterConfig::parse_object(const nlohmann::ordered_json& j, const std::string& source) {
  using json = nlohmann::ordered_json;
  auto fail = [&](const std::string& what) -> void { throw format_error(source + ": " + what); };

  AdapterConfig c;
  auto type_error = [&](const char* key, const char* want, const json& v) {
    fail(std::string("\"") + key + "\" must be " + want + ", got " + v.dump().substr(0, 80));
  };
  auto get_bool = [&](const char* key, bool& out) {
    if (!j.contains(key) || j[key].is_null()) return;
    if (!j[key].is_boolean()) type_error(key, "true or false", j[key]);
    out = j[key].get<bool>();
  };
  auto get_string = [&](const char* key, std::optional<std::string>& out) {
    if (!j.contains(key) || j[key].is_null()) return;
    if (!j[key].is_string()) type_error(key, "a string or null", j[key]);
    out = j[key].get<std::string>();
  };
  auto string_list = [&](const char* key, const json& v) {
    std::vector<std::string> out;
    if (!v.is_array()) type_error(key, "a list of strings", v);
    for (const auto& s : v) {
      if (!s.is_string()) type_error(key, "a list of strings", v);
      out.push_back(s.get<std::string>());
    }
    return out;
  };

  if (!j.contains("peft_type")) fail("\"peft_type\" is missing (expected \"LORA\"); PEFT requires it");
  if (!j["peft_type"].is_string() || j["peft_type"] != "LORA")
    fail("peft_type must be \"LORA\", got " + j["peft_type"].dump() +
         " (only LoRA adapters are supported; AdaLoRA, IA3, prompt tuning are not)");

  if (!j.contains("r") || j["r"].is_null()) {
    c.assumed.push_back("r is missing: assumed 8, PEFT's default");
  } else if (!j["r"].is_number_integer() || j["r"].get<std::int64_t>() <= 0 || j["r"].get<std::int64_t>() > 1 << 20) {
    type_error("r", "a positive integer", j["r"]);
  } else {
    c.r = j["r"].get<int>();
  }
  if (!j.contains("lora_alpha") || j["lora_alpha"].is_null()) {
    c.assumed.push_back("lora_alpha is missing: assumed 8, PEFT's default");
  } else if (!j["lora_alpha"].is_number() || !std::isfinite(j["lora_alpha"].get<double>())) {
    type_error("lora_alpha", "a number", j["lora_alpha"]);
  } else {
    c.lora_alpha = j["lora_alpha"].get<double>();
  }
  if (j.contains("lora_dropout") && !j["lora_dropout"].is_null()) {
    const auto& v = j["lora_dropout"];
    if (!v.is_number() || !(v.get<double>() >= 0 && v.get<double>() < 1))
      type_error("lora_dropout", "a number in [0, 1)", v);
    c.lora_dropout = v.get<double>();
  }
  if (j.contains("target_modules") && !j["target_modules"].is_null()) {
    if (j["target_modules"].is_string())
      c.target_modules_regex = j["target_modules"].get<std::string>();
    else
      c.target_modules = string_list("target_modules", j["target_modules"]);
  }
  get_bool("fan_in_fan_out", c.fan_in_fan_out);
  get_bool("use_rslora", c.use_rslora);
  get_bool("inference_mode", c.inference_mode);
  get_bool("use_dora", c.use_dora);
  if (j.contains("bias") && !j["bias"].is_null()) {
    const auto& v = j["bias"];
    if (v == "none")
      c.bias = BiasMode::none;
    else if (v == "all")
      c.bias = BiasMode::all;
    else if (v == "lora_only")
      c.bias = BiasMode::lora_only;
    else
      type_error("bias", "\"none\", \"all\" or \"lora_only\"", v);
  }
  auto compiled = std::make_shared<std::map<std::string, lora::detail::ModulePattern>>();
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    if (!j.contains(key) || j[key].is_null()) continue;
    if (!j[key].is_object()) type_error(key, "an object", j[key]);
    for (const auto& [pattern, value] : j[key].items()) {
      if (compiled->find(pattern) == compiled->end()) {
        try {
          compiled->emplace(pattern, lora::detail::ModulePattern(pattern));
        } catch (const config_error& e) {
          fail(std::string(key) + ": " + e.what());
        }
      }
      if (std::string(key) == "rank_pattern") {
        if (!value.is_number_integer() || value.get<std::int64_t>() < 0 || value.get<std::int64_t>() > 1 << 20)
          fail("rank_pattern[\"" + printable(pattern) + "\"] must be a non-negative integer, got " + value.dump());
        c.rank_pattern.emplace_back(pattern, value.get<int>());
      } else {
        if (!value.is_number() || !std::isfinite(value.get<double>()))
          fail("alpha_pattern[\"" + printable(pattern) + "\"] must be a number, got " + value.dump());
        c.alpha_pattern.emplace_back(pattern, value.get<double>());
      }
    }
  }
  c.compiled_ = std::move(compiled);
  if (j.contains("init_lora_weights")) c.init_lora_weights = nlohmann::json::parse(j["init_lora_weights"].dump());
  get_string("task_type", c.task_type);
  get_string("base_model_name_or_path", c.base_model_name_or_path);
  if (j.contains("modules_to_save") && !j["modules_to_save"].is_null())
    c.modules_to_save = string_list("modules_to_save", j["modules_to_save"]);

  static const char* known[] = {"peft_type",
                                "r",
                                "lora_alpha",
                                "lora_dropout",
                                "target_modules",
                                "fan_in_fan_out",
                                "use_rslora",
                                "inference_mode",
                                "use_dora",
                                "bias",
                                "rank_pattern",
                                "alpha_pattern",
                                "init_lora_weights",
                                "task_type",
                                "base_model_name_or_path",
                                "modules_to_save"};
  for (const auto& item : j.items()) {
    // Not a structured binding: clang before 16 cannot capture one in a lambda.
    const std::string& key = item.key();
    if (std::find_if(std::begin(known), std::end(known), [&](const char* k) { return key == k; }) == std::end(known))
      c.other[key] = nlohmann::json::parse(item.value().dump());
  }
  return c;
}

inline ResidualInit AdapterConfig::residual_init(const std::string& where) const {
  if (init_lora_weights.is_boolean()) return ResidualInit::none;
  const std::string value = init_lora_weights.is_string() ? init_lora_weights.get<std::string>() : std::string();
  std::string lower = value;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (value == "pissa") return ResidualInit::pissa;
  if (lower == "olora") return ResidualInit::olora;  // PEFT compares "olora" (and "mica") lower-cased
  if (value == "gaussian" || value == "orthogonal" || value == "eva" || lower == "mica") return ResidualInit::none;
  std::string why;
  if (value.compare(0, 11, "pissa_niter") == 0)
    why =
        "PEFT's fast PiSSA: the residual comes from torch.svd_lowrank's random sketch, which no one can draw "
        "again; convert the adapter to a plain LoRA in PEFT (save_pretrained with "
        "path_initial_model_for_weight_conversion) or with peft::convert_residual_adapter";
  else if (value.compare(0, 5, "corda") == 0)
    why =
        "CorDA: the residual comes from activation statistics of data the file does not hold; convert the "
        "adapter to a plain LoRA first";
  else if (value == "loftq")
    why =
        "LoftQ: the base is replaced by its quantised residual; load such an adapter over the quantised base "
        "PEFT saved with it";
  else if (value == "lora_ga")
    why =
        "LoRA-GA: the residual comes from gradients on data the file does not hold; convert the adapter to a "
        "plain LoRA first";
  else
    why =
        "not a value PEFT defines (true, false, \"gaussian\", \"eva\", \"olora\", \"pissa\", "
        "\"pissa_niter_K\", \"corda\", \"loftq\", \"orthogonal\", \"mica\", \"lora_ga\"), so what it does to "
        "the base weight is unknown";
  throw config_error(where + ": init_lora_weights " + printable(init_lora_weights.dump().substr(0, 80)) + ": " + why);
}

inline AdapterConfig AdapterConfig::read(const std::string& path) {
  return parse(lora::detail::read_small_file(path, max_config_bytes, "the config"), path);
}

inline std::string AdapterConfig::to_json() const {
  nlohmann::json j = other;  // std::map underneath: keys come out sorted, as sort_keys=True
  // Python writes an int alpha as 16, not 16.0; keep integral values integral.
  auto number = [](double v) {
    if (v == std::floor(v) && std::abs(v) < 1e15) return nlohmann::json(static_cast<std::int64_t>(v));
    return nlohmann::json(v);
  };
  auto pattern = [&](const auto& list) {
    nlohmann::json o = nlohmann::json::object();
    for (const auto& [k, v] : list) o[k] = number(v);
    return o;
  };
  // Every key a PEFT LoraConfig writes, with PEFT's defaults where the library has no say.
  for (const char* key :
       {"auto_mapping", "layer_replication", "layers_pattern", "layers_to_transform", "megatron_config", "revision"})
    if (!j.contains(key)) j[key] = nullptr;
  if (!j.contains("loftq_config")) j["loftq_config"] = nlohmann::json::object();
  if (!j.contains("megatron_core")) j["megatron_core"] = "megatron.core";
  j["alpha_pattern"] = pattern(alpha_pattern);
  j["base_model_name_or_path"] = base_model_name_or_path ? nlohmann::json(*base_model_name_or_path) : nullptr;
  j["bias"] = bias_name(bias);
  j["fan_in_fan_out"] = fan_in_fan_out;
  j["inference_mode"] = inference_mode;
  j["init_lora_weights"] = init_lora_weights;
  j["lora_alpha"] = number(lora_alpha);
  j["lora_dropout"] = lora_dropout;
  j["modules_to_save"] = modules_to_save ? nlohmann::json(*modules_to_save) : nullptr;
  j["peft_type"] = "LORA";
  j["r"] = r;
  j["rank_pattern"] = pattern(rank_pattern);
  if (target_modules_regex)
    j["target_modules"] = *target_modules_regex;
  else
    j["target_modules"] = target_modules;
  j["task_type"] = task_type ? nlohmann::json(*task_type) : nullptr;
  j["use_dora"] = use_dora;
  j["use_rslora"] = use_rslora;
  return j.dump(2, ' ', true);
}

// ---- the tensors -------------------------------------------------------------------

/// One adapted module as read from a file.
template <class Scalar>
struct ModuleAdapter {
  std::string path;     ///< module path, e.g. "transformer.h.0.attn.c_attn"
  Matrix<Scalar> A;     ///< (R, I)
  Matrix<Scalar> B;     ///< (O, R)
  Matrix<Scalar> bias;  ///< (1, O) when the file holds the module's bias, else empty
  /// DoRA's lora_magnitude_vector (1, O) when the adapter is DoRA (config use_dora), else empty.
  Matrix<Scalar> magnitude;
  int r = 0;
  double lora_alpha = 0;
  double scaling = 0;
  /// An embedding adapter (lora_embedding_A (R, V), lora_embedding_B (d, R)): the base tensor <path>.weight is
  /// the (V, d) table, so merging adds (s B A)ᵀ whatever fan_in_fan_out says, as PEFT does.
  bool embedding = false;
  Index in_features() const { return A.cols(); }
  Index out_features() const { return B.rows(); }
};

/// A whole adapter read into memory.
template <class Scalar>
struct Adapter {
  AdapterConfig config;
  std::vector<ModuleAdapter<Scalar>> modules;  ///< sorted by path
  /// Tensors that are not LoRA matrices (a modules_to_save head such as
  /// base_model.model.score.weight, biases of unadapted layers): never dropped,
  /// read them from `file`.
  std::vector<safetensors::TensorInfo> other_tensors;
  std::optional<safetensors::File> file;
  std::string source;

  const ModuleAdapter<Scalar>* find(const std::string& path) const {
    for (const auto& m : modules)
      if (m.path == path) return &m;
    return nullptr;
  }
  /// LoRA matrices (and DoRA magnitudes) only, as PEFT's "trainable params" counts an adapter.
  std::uint64_t parameter_count() const {
    std::uint64_t n = 0;
    for (const auto& m : modules) n += static_cast<std::uint64_t>(m.A.size() + m.B.size() + m.magnitude.size());
    return n;
  }
};

namespace detail {

enum class KeyKind { lora_A, lora_B, embedding_A, embedding_B, bias, magnitude, no_module_path, other };

/// Splits a saved key into (module path, kind).
inline std::pair<std::string, KeyKind> classify_key(const std::string& key) {
  auto ends_with = [&](const std::string& suffix) {
    return key.size() > suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  const std::string prefix = key_prefix;
  const bool embedding =
      key.find("lora_embedding_A") != std::string::npos || key.find("lora_embedding_B") != std::string::npos;
  if (key.compare(0, prefix.size(), prefix) != 0) return {key, embedding ? KeyKind::no_module_path : KeyKind::other};
  // "<prefix><path><suffix>" with a non-empty path: "base_model.model.lora_A.weight" names no module.
  // Embedding adapters (PEFT's lora.Embedding) have no ".weight" suffix.
  for (auto [suffix, kind] : {std::pair<const char*, KeyKind>{".lora_A.weight", KeyKind::lora_A},
                              {".lora_B.weight", KeyKind::lora_B},
                              {".lora_embedding_A", KeyKind::embedding_A},
                              {".lora_embedding_B", KeyKind::embedding_B},
                              {".lora_magnitude_vector", KeyKind::magnitude},
                              {".bias", KeyKind::bias}}) {
    const std::size_t n = std::strlen(suffix);
    if (ends_with(suffix) && key.size() > prefix.size() + n)
      return {key.substr(prefix.size(), key.size() - prefix.size() - n), kind};
  }
  if (ends_with("lora_A.weight") || ends_with("lora_B.weight") || embedding ||
      key.find("lora_magnitude_vector") != std::string::npos)
    return {key, KeyKind::no_module_path};
  return {key, KeyKind::other};
}

inline std::string shape_of(const safetensors::TensorInfo& t) { return safetensors::shape_text(t.shape); }

/// "dir/adapter_model.safetensors" and "dir/adapter_config.json" from a folder or from the .safetensors file.
inline std::pair<std::string, std::string> adapter_paths(const std::string& dir_or_file) {
  namespace fs = std::filesystem;
  fs::path p(dir_or_file);
  std::error_code ec;
  if (fs::is_directory(p, ec)) {
    fs::path weights = p / weights_file_name;
    if (!fs::exists(weights, ec) && fs::exists(p / "adapter_model.bin", ec))
      throw format_error(dir_or_file +
                         ": holds adapter_model.bin (a PyTorch pickle), which is not supported: pickles can run "
                         "code; re-save the adapter with safe_serialization=True");
    return {weights.string(), (p / config_file_name).string()};
  }
  fs::path folder = p.has_parent_path() ? p.parent_path() : fs::path(".");
  return {p.string(), (folder / config_file_name).string()};
}

/// Throws format_error "<head>N problem(s):" with one indented line per problem, when there are any.
/// Each problem is one line: names from the file in it are escaped (printable), so none can break the list.
inline void throw_problems(const std::string& head, const std::vector<std::string>& problems) {
  if (problems.empty()) return;
  std::string message = printable(head) + std::to_string(problems.size()) + " problem(s):";
  for (const auto& p : problems) message += "\n  " + printable(p);
  throw format_error(message);
}

/// Adds an "unexpected" problem for every module of the adapter that no layer of the model takes.
template <class Scalar, class Layer>
void add_unexpected_modules(const Adapter<Scalar>& adapter, const std::map<std::string, Layer*>& model,
                            std::vector<std::string>& problems) {
  for (const auto& m : adapter.modules)
    if (model.find(m.path) == model.end())
      problems.push_back("unexpected: " + std::string(key_prefix) + m.path + ".lora_A.weight / .lora_B.weight " +
                         "(no layer with that module path)");
}

}  // namespace detail

/// Reads a PEFT adapter (a folder, or its adapter_model.safetensors with
/// adapter_config.json beside it). Checks every module at once and throws
/// format_error listing all problems: an A without its B, 2-D shapes, ranks
/// that disagree with the config, DoRA magnitudes missing, misshapen or present without use_dora.
template <class Scalar>
Adapter<Scalar> read_adapter(const std::string& dir_or_file) {
  auto [weights_path, config_path] = detail::adapter_paths(dir_or_file);
  Adapter<Scalar> adapter;
  adapter.source = weights_path;
  // The tensors first, so a bad file is named as such. Read, not mapped: the file may change underneath.
  adapter.file = safetensors::File::open(weights_path, safetensors::Access::read);
  adapter.config = AdapterConfig::read(config_path);
  const safetensors::File& file = *adapter.file;

  std::map<std::string, std::pair<const safetensors::TensorInfo*, const safetensors::TensorInfo*>> found;
  std::map<std::string, std::pair<const safetensors::TensorInfo*, const safetensors::TensorInfo*>> embeddings;
  std::map<std::string, const safetensors::TensorInfo*> biases;
  std::map<std::string, const safetensors::TensorInfo*> magnitudes;
  std::vector<std::string> problems;
  for (const auto& t : file.tensors()) {
    auto [path, kind] = detail::classify_key(t.name);
    switch (kind) {
      case detail::KeyKind::lora_A:
        found[path].first = &t;
        break;
      case detail::KeyKind::lora_B:
        found[path].second = &t;
        break;
      case detail::KeyKind::bias:
        biases[path] = &t;
        break;
      case detail::KeyKind::embedding_A:
        embeddings[path].first = &t;
        break;
      case detail::KeyKind::embedding_B:
        embeddings[path].second = &t;
        break;
      case detail::KeyKind::magnitude:
        magnitudes[path] = &t;
        break;
      case detail::KeyKind::no_module_path:
        problems.push_back(printable(t.name) + ": a LoRA matrix with no module path (expected " + key_prefix +
                           "<module path>.lora_A.weight / .lora_B.weight, .lora_embedding_A / _B, or "
                           ".lora_magnitude_vector)");
        break;
      default:
        adapter.other_tensors.push_back(t);
        break;
    }
  }
  for (const auto& [path, pair] : embeddings) {
    if (found.count(path) != 0) {
      problems.push_back(path + ": has both lora_A/lora_B and lora_embedding_A/B; a module is one or the other");
      continue;
    }
    found[path] = pair;
  }
  for (const auto& [path, pair] : found) {
    const bool embedding = embeddings.count(path) != 0;
    const std::string name_A = embedding ? "lora_embedding_A" : "lora_A",
                      name_B = embedding ? "lora_embedding_B" : "lora_B";
    const auto* a = pair.first;
    const auto* b = pair.second;
    if (a == nullptr || b == nullptr) {
      problems.push_back(path + ": has " + (a ? name_A : name_B) + " but no " + (a ? name_B : name_A));
      continue;
    }
    if (!safetensors::is_float(a->dtype) || !safetensors::is_float(b->dtype)) {
      problems.push_back(path + ": " + name_A + "/" + name_B + " must be F16, BF16, F32 or F64, got " +
                         safetensors::dtype_name(a->dtype) + "/" + safetensors::dtype_name(b->dtype));
      continue;
    }
    if (a->shape.size() != 2 || b->shape.size() != 2) {
      problems.push_back(path + ": " + name_A + " " + detail::shape_of(*a) + " and " + name_B + " " +
                         detail::shape_of(*b) + " must both be 2-D");
      continue;
    }
    int rank = 0;
    try {
      rank = adapter.config.rank_for(path);
    } catch (const config_error& e) {  // a module path too long to match patterns against
      problems.push_back(path + ": " + e.what());
      continue;
    }
    if (a->shape[0] != b->shape[1] || a->shape[0] != static_cast<std::uint64_t>(rank)) {
      problems.push_back(path + ": " + name_A + " " + detail::shape_of(*a) + " and " + name_B + " " +
                         detail::shape_of(*b) + " do not have the rank the config gives this module (" +
                         std::to_string(rank) + ")");
      continue;
    }
    if (a->shape[1] == 0 || b->shape[0] == 0) {
      problems.push_back(path + ": lora_A " + detail::shape_of(*a) + " / lora_B " + detail::shape_of(*b) +
                         " have a zero dimension");
      continue;
    }
    ModuleAdapter<Scalar> m;
    m.path = path;
    m.embedding = embedding;
    m.r = rank;
    m.lora_alpha = adapter.config.alpha_for(path);
    m.scaling = adapter.config.scaling_for(path);
    m.A = file.matrix<Scalar>(a->name);
    m.B = file.matrix<Scalar>(b->name);
    if (auto it = biases.find(path); it != biases.end()) {
      const auto* t = it->second;
      if (!safetensors::is_float(t->dtype) || t->shape.size() != 1 || t->shape[0] != b->shape[0])
        problems.push_back(path + ".bias: expected " + safetensors::shape_text({b->shape[0]}) + ", got " +
                           safetensors::dtype_name(t->dtype) + " " + detail::shape_of(*t));
      else
        m.bias = file.matrix<Scalar>(t->name);
      biases.erase(it);
    }
    if (auto it = magnitudes.find(path); it != magnitudes.end()) {
      const auto* t = it->second;
      if (!adapter.config.use_dora)
        problems.push_back(path + ".lora_magnitude_vector: a DoRA magnitude, but the config's use_dora is false");
      else if (!safetensors::is_float(t->dtype) || t->shape.size() != 1 || t->shape[0] != b->shape[0])
        problems.push_back(path + ".lora_magnitude_vector: expected " + safetensors::shape_text({b->shape[0]}) +
                           (embedding ? " (embedding_dim), got " : " (out_features), got ") +
                           safetensors::dtype_name(t->dtype) + " " + detail::shape_of(*t));
      else
        m.magnitude = file.matrix<Scalar>(t->name);
      magnitudes.erase(it);
    } else if (adapter.config.use_dora) {
      problems.push_back(path + ": the config says use_dora (DoRA) but the file has no " + key_prefix + path +
                         ".lora_magnitude_vector");
    }
    adapter.modules.push_back(std::move(m));
  }
  for (const auto& [path, t] : magnitudes)
    problems.push_back(printable(t->name) + ": a DoRA magnitude for a module with no lora_A / lora_B");
  for (const auto& [path, t] : biases) adapter.other_tensors.push_back(*t);  // biases of unadapted layers
  if (problems.empty() && adapter.modules.empty())
    problems.push_back(std::string("no LoRA module: no ") + key_prefix +
                       "<module path>.lora_A.weight / .lora_B.weight pair among its " +
                       std::to_string(file.tensors().size()) + " tensor(s)");
  detail::throw_problems(weights_path + ": ", problems);
  return adapter;
}

/// What load_adapter found besides the LoRA matrices it loaded.
struct LoadReport {
  std::vector<std::string> loaded;                     ///< module paths
  std::vector<safetensors::TensorInfo> other_tensors;  ///< handed to the caller, never dropped
  std::vector<std::string> assumed;                    ///< config defaults the reader assumed
  std::vector<std::string> missing;     ///< non-strict loads: layers the file has no adapter for (left as they were)
  std::vector<std::string> unexpected;  ///< non-strict loads: adapter modules no layer took
  /// Modules whose layer stores W in the other layout than the config's fan_in_fan_out says. The adapter's A and
  /// B do not depend on it, so they load either way; PEFT likewise overrides the flag by the module's type (with a
  /// warning). Listed because a transformers Conv1D weight viewed (out, in) by mistake shows up here (a square
  /// one would otherwise go unnoticed): build such layers over FrozenWeight<>::view(..., WeightLayout::in_out).
  std::vector<std::string> layout_differs;
  /// Modules whose frozen W load_adapter replaced by its PiSSA / OLoRA residual W − s·B0 A0 before loading, as
  /// PEFT's from_pretrained does for init_lora_weights "pissa" / "olora" (AdapterConfig::residual_init). Their W is
  /// no longer the base's: convert_residual_adapter gives a plain LoRA for the original base.
  std::vector<std::string> rewritten;
};

/// How load_adapter treats the model, as PEFT's from_pretrained / load_adapter arguments do.
struct LoadOptions {
  /// PEFT's is_trainable. false (PEFT's default): the loaded layers are switched to eval(), so lora_dropout
  /// stays off and forward gives the same output on every call; true: they are left in training mode.
  bool is_trainable = false;
  /// true: every adapted layer must find its module in the file and every module a layer (else nothing is
  /// loaded). false, as load_state_dict(strict=False): the layers that match are loaded, the rest are listed
  /// in LoadReport::missing / unexpected. Shapes and scalings must agree either way.
  bool strict = true;
};

/// Loads an adapter into the given layers (module path -> layer), checking
/// everything first and reporting every problem at once (missing keys,
/// unexpected keys, shape mismatches with expected and actual shapes,
/// scaling that the layer was not built with); no layer changes unless all
/// checks pass. Non-LoRA tensors come back in the report. The layers are
/// left for inference (eval()) unless options.is_trainable.
/// An adapter trained from a PiSSA or OLoRA start (init_lora_weights "pissa" / "olora") is loaded as PEFT loads
/// it: each linear layer's W is first replaced by its residual, computed from W as PEFT computes it, so those
/// layers need a writable weight (owned or mutable_view; a read-only view is a problem like the others). The
/// inits that cannot be reproduced ("pissa_niter_K", "corda", "loftq", "lora_ga") are refused.
template <class Scalar>
LoadReport load_adapter(const std::string& dir_or_file, const std::map<std::string, LoRALinear<Scalar>*>& model,
                        const std::map<std::string, LoRAEmbedding<Scalar>*>& embeddings,
                        const LoadOptions& options = {}) {
  Adapter<Scalar> adapter = read_adapter<Scalar>(dir_or_file);
  std::vector<std::string> problems;
  LoadReport report;
  // PiSSA / OLoRA: PEFT rewrites each linear module's W to its residual before loading A and B (see residual_init).
  ResidualInit rewrite = ResidualInit::none;
  try {
    rewrite = adapter.config.residual_init("adapter_config.json");
  } catch (const config_error& e) {
    problems.push_back(e.what());
  }
  std::map<std::string, std::pair<Matrix<Scalar>, Matrix<Scalar>>> initial;  // module path -> (A0, B0)
  // What every layer kind shares: a module for each adapted layer, shapes, scaling, merged state.
  auto check = [&](const std::string& path, const auto& layer, bool want_embedding) -> const ModuleAdapter<Scalar>* {
    const std::string name_A = want_embedding ? ".lora_embedding_A" : ".lora_A.weight",
                      name_B = want_embedding ? ".lora_embedding_B" : ".lora_B.weight";
    const ModuleAdapter<Scalar>* m = adapter.find(path);
    if (m == nullptr) {
      if (options.strict)
        problems.push_back("missing: " + std::string(key_prefix) + path + name_A + " / " + name_B);
      else
        report.missing.push_back(path);
      return nullptr;
    }
    if (m->embedding != want_embedding) {
      problems.push_back(path + (m->embedding ? ": the file has an embedding adapter (lora_embedding_A/B) for it, the "
                                                "layer is a LoRALinear"
                                              : ": the file has a linear adapter (lora_A/lora_B) for it, the layer is "
                                                "a LoRAEmbedding"));
      return nullptr;
    }
    if (m->A.rows() != layer.rank() || m->A.cols() != layer.lora_A().cols())
      problems.push_back(path + name_A + ": expected " + shape_string(layer.rank(), layer.lora_A().cols()) + ", got " +
                         shape_string(m->A.rows(), m->A.cols()));
    if (m->B.rows() != layer.lora_B().rows() || m->B.cols() != layer.rank())
      problems.push_back(path + name_B + ": expected " + shape_string(layer.lora_B().rows(), layer.rank()) + ", got " +
                         shape_string(m->B.rows(), m->B.cols()));
    const double layer_scaling = static_cast<double>(layer.scaling());
    if (std::abs(layer_scaling - m->scaling) > 1e-6 * std::max(1.0, std::abs(m->scaling)))
      problems.push_back(path + ": the file's scaling is " + value_string(m->scaling) + " (lora_alpha " +
                         value_string(m->lora_alpha) + ", r " + std::to_string(m->r) +
                         (adapter.config.use_rslora ? ", rsLoRA" : "") + "), the layer was built with " +
                         value_string(layer_scaling) + "; build it with AdapterConfig::layer_config(\"" + path + "\")");
    if (layer.is_merged()) problems.push_back(path + ": the layer is merged; unmerge() it before loading");
    if (layer.use_dora() != (m->magnitude.size() > 0))
      problems.push_back(path + (layer.use_dora() ? ": the layer is DoRA (use_dora), the file's adapter is not"
                                                  : ": the file's adapter is DoRA (lora_magnitude_vector), the layer "
                                                    "was built without use_dora; build it with "
                                                    "AdapterConfig::layer_config(\"" +
                                                        path + "\")"));
    else if (layer.use_dora() && m->magnitude.size() != layer.lora_B().rows())
      problems.push_back(path + ".lora_magnitude_vector: expected " + std::to_string(layer.lora_B().rows()) +
                         (want_embedding ? " entries (embedding_dim), got " : " entries (out_features), got ") +
                         std::to_string(m->magnitude.size()));
    return m;
  };
  for (const auto& [path, layer] : model) {
    if (layer->rank() == 0) continue;
    const ModuleAdapter<Scalar>* m = check(path, *layer, false);
    if (m == nullptr) continue;
    if (m->bias.size() > 0 && !layer->bias_trainable())
      problems.push_back(path + ".bias: the file has a trained bias, the layer's bias does not train (bias mode " +
                         std::string(bias_name(adapter.config.bias)) + ")");
    if ((layer->weight_layout() == WeightLayout::in_out) != adapter.config.fan_in_fan_out)
      report.layout_differs.push_back(path);
    if (rewrite != ResidualInit::none && layer->rank() == m->A.rows()) {
      const std::string where = path + " (init_lora_weights " + adapter.config.init_lora_weights.dump() +
                                ": PEFT rewrites W to its residual before loading)";
      try {
        layer->check_init_with_residual(where.c_str());
        auto factors =
            peft_init_factors<Scalar>(layer->frozen_weight().to_dense(), layer->weight_layout() == WeightLayout::in_out,
                                      rewrite, layer->rank(), static_cast<double>(layer->scaling()), where);
        if (!factors.first.allFinite() || !factors.second.allFinite())
          problems.push_back(where + ": the initial factors of W are not finite (is W?)");
        initial.emplace(path, std::move(factors));
      } catch (const error& e) {
        problems.push_back(e.what());
      }
    }
  }
  for (const auto& [path, layer] : embeddings) {
    if (model.count(path) != 0) problems.push_back(path + ": given both as a LoRALinear and as a LoRAEmbedding");
    if (layer->rank() > 0) check(path, *layer, true);
  }
  for (const auto& m : adapter.modules) {
    if (model.count(m.path) != 0 || embeddings.count(m.path) != 0) continue;
    if (options.strict)
      problems.push_back("unexpected: " + std::string(key_prefix) + m.path +
                         (m.embedding ? ".lora_embedding_A / _B" : ".lora_A.weight / .lora_B.weight") +
                         " (no layer with that module path)");
    else
      report.unexpected.push_back(m.path);
  }
  detail::throw_problems(adapter.source + ": cannot load into this model, ", problems);
  for (const auto& [path, layer] : model) {
    if (layer->rank() == 0) continue;
    const ModuleAdapter<Scalar>* m = adapter.find(path);
    if (m == nullptr) continue;  // non-strict: listed in report.missing
    if (auto it = initial.find(path); it != initial.end()) {
      layer->init_with_residual(it->second.first, it->second.second);  // W − s·B0 A0 (and DoRA's m, replaced below)
      it->second = {};
      report.rewritten.push_back(path);
    }
    layer->lora_A() = m->A;
    layer->lora_B() = m->B;
    if (m->magnitude.size() > 0) layer->magnitude() = m->magnitude;
    if (m->bias.size() > 0) layer->bias() = m->bias;
    layer->train(options.is_trainable);
    report.loaded.push_back(path);
  }
  for (const auto& [path, layer] : embeddings) {
    if (layer->rank() == 0) continue;
    const ModuleAdapter<Scalar>* m = adapter.find(path);
    if (m == nullptr) continue;
    layer->lora_A() = m->A;
    layer->lora_B() = m->B;
    if (m->magnitude.size() > 0) layer->magnitude() = m->magnitude;
    layer->train(options.is_trainable);
    report.loaded.push_back(path);
  }
  report.other_tensors = adapter.other_tensors;
  report.assumed = adapter.config.assumed;
  return report;
}

/// load_adapter for a model of LoRALinear layers only.
template <class Scalar>
LoadReport load_adapter(const std::string& dir_or_file, const std::map<std::string, LoRALinear<Scalar>*>& model,
                        const LoadOptions& options = {}) {
  return load_adapter(dir_or_file, model, std::map<std::string, LoRAEmbedding<Scalar>*>{}, options);
}

namespace detail {
/// target_modules, when the caller gave none: the distinct last components of the adapted paths.
template <class Scalar>
void finish_target_modules(const std::map<std::string, LoRALinear<Scalar>*>& model, AdapterConfig& config) {
  if (!config.target_modules.empty() || config.target_modules_regex) return;
  std::vector<std::string> names;
  for (const auto& [path, layer] : model) {
    if (layer->rank() == 0) continue;
    auto dot = path.rfind('.');
    names.push_back(dot == std::string::npos ? path : path.substr(dot + 1));
  }
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  config.target_modules = names;
}
}  // namespace detail

/// The config save_adapter writes for a model: r and lora_alpha are the most
/// common values, rank_pattern / alpha_pattern list the modules that differ,
/// target_modules the distinct last components of the paths. Fields of
/// `base` that a model cannot tell (task_type, base_model_name_or_path,
/// modules_to_save, explicit target_modules, other) are kept.
template <class Scalar>
AdapterConfig config_for(const std::map<std::string, LoRALinear<Scalar>*>& model, AdapterConfig base = {}) {
  std::map<int, int> rank_votes;
  std::map<double, int> alpha_votes;
  bool first = true;
  for (const auto& [path, layer] : model) {
    const LoraConfig& c = layer->config();
    if (c.r == 0) continue;
    rank_votes[c.r]++;
    alpha_votes[c.lora_alpha]++;
    if (first) {
      base.use_rslora = c.use_rslora;
      base.use_dora = c.use_dora;
      base.lora_dropout = c.lora_dropout;
      base.bias = c.bias;
      first = false;
    } else if (c.use_dora != base.use_dora) {
      throw config_error("peft::save_adapter: layer \"" + path +
                         "\" disagrees with the others on use_dora; one PEFT adapter has one setting");
    } else if (c.use_rslora != base.use_rslora) {
      throw config_error("peft::save_adapter: layer \"" + path +
                         "\" disagrees with the others on use_rslora; one PEFT adapter has one setting");
    } else if (c.bias != base.bias) {
      throw config_error("peft::save_adapter: layer \"" + path +
                         "\" disagrees with the others on the bias mode; one PEFT adapter has one setting");
    }
  }
  if (first) throw config_error("peft::save_adapter: no layer with r > 0 to save");
  // fan_in_fan_out says how the base checkpoint stores W, for merging tools: (in, out) when a layer stores it so
  // (a Conv1D weight viewed in place); otherwise as the caller's config says (a Conv1D weight copied transposed).
  for (const auto& [path, layer] : model)
    if (layer->config().r != 0 && layer->weight_layout() == WeightLayout::in_out) base.fan_in_fan_out = true;
  // Keep the caller's r, lora_alpha and patterns when they already give every layer its rank and alpha
  // (a loaded adapter saved back keeps its file's patterns); otherwise derive them.
  bool base_fits = true;
  for (const auto& [path, layer] : model) {
    const LoraConfig& c = layer->config();
    if (c.r != 0 && (base.rank_for(path) != c.r || base.alpha_for(path) != c.lora_alpha)) base_fits = false;
  }
  if (base_fits) {
    detail::finish_target_modules(model, base);
    base.assumed.clear();
    return base;
  }
  auto most = [](const auto& votes) {
    return std::max_element(votes.begin(), votes.end(), [](auto& a, auto& b) { return a.second < b.second; })->first;
  };
  base.r = most(rank_votes);
  base.lora_alpha = most(alpha_votes);
  base.rank_pattern.clear();
  base.alpha_pattern.clear();
  for (const auto& [path, layer] : model) {
    const LoraConfig& c = layer->config();
    if (c.r == 0) continue;
    if (c.r != base.r) base.rank_pattern.emplace_back(path, c.r);
    if (c.lora_alpha != base.lora_alpha) base.alpha_pattern.emplace_back(path, c.lora_alpha);
  }
  detail::finish_target_modules(model, base);
  base.assumed.clear();
  return base;
}

/// Writes `dir`/adapter_model.safetensors and `dir`/adapter_config.json as
/// PEFT does (creating `dir`): both are written to temporaries in full
/// before either is renamed into place. `extra` adds non-LoRA tensors
/// under their full names (a modules_to_save head). The files a failed save
/// would have replaced stay as they were.
/// With embedding layers too: each saved as PEFT saves lora.Embedding, "<path>.lora_embedding_A" (R, V) and
/// "<path>.lora_embedding_B" (d, R), its r and lora_alpha in the config like any module's.
template <class Scalar>
void save_adapter(const std::string& dir, const std::map<std::string, LoRALinear<Scalar>*>& model,
                  const std::map<std::string, LoRAEmbedding<Scalar>*>& embeddings, const AdapterConfig& base = {},
                  safetensors::Dtype dtype = safetensors::Dtype::F32,
                  const std::map<std::string, Matrix<Scalar>>& extra = {}) {
  // The config is derived from every module: an embedding counts as a LoRALinear over its table would.
  std::vector<std::unique_ptr<LoRALinear<Scalar>>> stand_ins;
  std::map<std::string, LoRALinear<Scalar>*> all = model;
  for (const auto& [path, layer] : embeddings) {
    if (model.count(path) != 0)
      throw config_error("peft::save_adapter: \"" + path + "\" is given both as a LoRALinear and as a LoRAEmbedding");
    stand_ins.push_back(std::make_unique<LoRALinear<Scalar>>(layer->frozen_weight().read_only_view(), layer->config()));
    all[path] = stand_ins.back().get();
  }
  AdapterConfig config = config_for(all, base);
  // fan_in_fan_out is about the linear layers' base tensors; an embedding table is (V, d) whatever it says.
  config.fan_in_fan_out = base.fan_in_fan_out;
  for (const auto& [path, layer] : model)
    if (layer->rank() > 0 && layer->weight_layout() == WeightLayout::in_out) config.fan_in_fan_out = true;
  safetensors::Writer writer;
  writer.set_metadata("format", "pt");
  for (const auto& [path, layer] : embeddings) {
    if (layer->is_merged())
      throw state_error("peft::save_adapter: layer \"" + path + "\" is merged; save before merging or unmerge()");
    if (layer->rank() == 0) continue;
    writer.add(key_prefix + path + ".lora_embedding_A", layer->lora_A(), dtype);
    writer.add(key_prefix + path + ".lora_embedding_B", layer->lora_B(), dtype);
    if (layer->use_dora())
      writer.add(key_prefix + path + ".lora_magnitude_vector", layer->magnitude(), dtype,
                 {static_cast<std::uint64_t>(layer->embedding_dim())});
  }
  for (const auto& [path, layer] : model) {
    if (layer->is_merged())
      throw state_error("peft::save_adapter: layer \"" + path + "\" is merged; save before merging or unmerge()");
    const std::string key = key_prefix + path;
    if (layer->rank() > 0) {
      writer.add(key + ".lora_A.weight", layer->lora_A(), dtype);
      writer.add(key + ".lora_B.weight", layer->lora_B(), dtype);
    }
    if (layer->use_dora())
      writer.add(key + ".lora_magnitude_vector", layer->magnitude(), dtype,
                 {static_cast<std::uint64_t>(layer->out_features())});
    if (layer->bias_trainable())
      writer.add(key + ".bias", layer->bias(), dtype, {static_cast<std::uint64_t>(layer->out_features())});
  }
  for (const auto& [name, tensor] : extra) writer.add(name, tensor, dtype);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw io_error(dir + ": cannot create the folder: " + ec.message());
  // Both files are written in full before either replaces its old version.
  auto weights = writer.stage((std::filesystem::path(dir) / weights_file_name).string());
  auto config_file = config.stage((std::filesystem::path(dir) / config_file_name).string());
  weights.commit();
  config_file.commit();
}

/// save_adapter for a model of LoRALinear layers only.
template <class Scalar>
void save_adapter(const std::string& dir, const std::map<std::string, LoRALinear<Scalar>*>& model,
                  const AdapterConfig& base = {}, safetensors::Dtype dtype = safetensors::Dtype::F32,
                  const std::map<std::string, Matrix<Scalar>>& extra = {}) {
  save_adapter(dir, model, std::map<std::string, LoRAEmbedding<Scalar>*>{}, base, dtype, extra);
}

// ---- several adapters on one base ----------------------------------------------------

/// Loads `adapter` (read_adapter's, or gguf::import_adapter's) as adapter `name` into every layer of a
/// multi-adapter model (module path -> layer), each module with the r and
/// lora_alpha the config's patterns give it. Checks everything first and
/// reports every problem at once (a name the layer already has, missing and
/// unexpected modules, shapes with expected and actual, a trained bias, which
/// a shared base cannot take); no layer changes unless all checks pass.
template <class Scalar>
LoadReport load_adapter(const Adapter<Scalar>& adapter, const std::string& name,
                        const std::map<std::string, MultiLoRALinear<Scalar>*>& model) {
  std::vector<std::string> problems;
  try {
    if (adapter.config.residual_init("adapter_config.json") != ResidualInit::none)
      problems.push_back("adapter_config.json: init_lora_weights " + adapter.config.init_lora_weights.dump() +
                         ": PEFT rewrites the base weights to a residual before loading this adapter, which a base "
                         "shared with other adapters cannot take (PEFT warns against it too); load it into LoRALinear "
                         "layers, or convert it to a plain LoRA (peft::convert_residual_adapter)");
  } catch (const config_error& e) {
    problems.push_back(e.what());
  }
  for (const auto& [path, layer] : model) {
    if (layer->has_adapter(name)) problems.push_back(path + ": already has an adapter named \"" + name + "\"");
    const ModuleAdapter<Scalar>* m = adapter.find(path);
    if (m == nullptr) {
      problems.push_back("missing: " + std::string(key_prefix) + path + ".lora_A.weight / .lora_B.weight");
      continue;
    }
    if (m->A.cols() != layer->in_features())
      problems.push_back(path + ".lora_A.weight: expected " + shape_string(m->r, layer->in_features()) + ", got " +
                         shape_string(m->A.rows(), m->A.cols()));
    if (m->B.rows() != layer->out_features())
      problems.push_back(path + ".lora_B.weight: expected " + shape_string(layer->out_features(), m->r) + ", got " +
                         shape_string(m->B.rows(), m->B.cols()));
    if (m->bias.size() > 0)
      problems.push_back(path + ".bias: the adapter trained the bias (bias mode " +
                         std::string(bias_name(adapter.config.bias)) +
                         "), but every adapter of a multi-adapter layer shares the frozen base bias");
  }
  detail::add_unexpected_modules(adapter, model, problems);
  detail::throw_problems(adapter.source + ": cannot load adapter \"" + name + "\" into this model, ", problems);
  LoadReport report;
  for (const auto& [path, layer] : model)
    if ((layer->weight_layout() == WeightLayout::in_out) != adapter.config.fan_in_fan_out)
      report.layout_differs.push_back(path);
  try {
    for (const auto& [path, layer] : model) {
      const ModuleAdapter<Scalar>* m = adapter.find(path);
      LoraConfig config = adapter.config.layer_config(path);
      config.bias = BiasMode::none;
      layer->add_adapter(name, config, m->A, m->B, m->magnitude);  // DoRA: the file's magnitude (else empty)
      report.loaded.push_back(path);
    }
  } catch (...) {
    // Another thread added the same name in between: leave every layer as it was.
    for (const auto& path : report.loaded) model.at(path)->remove_adapter(name);
    throw;
  }
  report.other_tensors = adapter.other_tensors;
  report.assumed = adapter.config.assumed;
  return report;
}

/// load_adapter for an adapter read from `dir_or_file` (read_adapter).
template <class Scalar>
LoadReport load_adapter(const std::string& dir_or_file, const std::string& name,
                        const std::map<std::string, MultiLoRALinear<Scalar>*>& model) {
  return load_adapter(read_adapter<Scalar>(dir_or_file), name, model);
}

/// Writes an adapter held in memory (read_adapter's, or one built or
/// converted, as gguf::import_adapter builds one) as a PEFT folder: every
/// module's A and B (lora_embedding_A/B for embeddings), its bias, the other
/// tensors copied from `adapter.file`, and the config. Atomic, as
/// save_adapter for layers.
template <class Scalar>
void save_adapter(const std::string& dir, const Adapter<Scalar>& adapter,
                  safetensors::Dtype dtype = safetensors::Dtype::F32) {
  safetensors::Writer writer;
  writer.set_metadata("format", "pt");
  for (const auto& m : adapter.modules) {
    const std::string key = key_prefix + m.path;
    writer.add(key + (m.embedding ? ".lora_embedding_A" : ".lora_A.weight"), m.A, dtype);
    writer.add(key + (m.embedding ? ".lora_embedding_B" : ".lora_B.weight"), m.B, dtype);
    if (m.bias.size() > 0) writer.add(key + ".bias", m.bias, dtype, {static_cast<std::uint64_t>(m.bias.size())});
    if (m.magnitude.size() > 0)
      writer.add(key + ".lora_magnitude_vector", m.magnitude, dtype, {static_cast<std::uint64_t>(m.magnitude.size())});
  }
  if (!adapter.other_tensors.empty() && !adapter.file)
    throw state_error("peft::save_adapter: the adapter lists other tensors but holds no file to copy them from");
  for (const auto& t : adapter.other_tensors) writer.add_from(t.name, *adapter.file, t);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw io_error(dir + ": cannot create the folder: " + ec.message());
  auto weights = writer.stage((std::filesystem::path(dir) / weights_file_name).string());
  auto config_file = adapter.config.stage((std::filesystem::path(dir) / config_file_name).string());
  weights.commit();
  config_file.commit();
}

/// PEFT's conversion of an adapter trained from a PiSSA or OLoRA start into a plain LoRA for the original base
/// (save_pretrained with path_initial_model_for_weight_conversion, its subtract_mutated_init). `trained` was
/// trained over the residual W − s·B0 A0; `initial` holds A0 and B0 (the adapter saved right after the
/// initialisation). Every linear module becomes
///   A' = [A; A0] (2r, I),  B' = [B, −B0] (O, 2r),   so  s·B' A' = s·(B A − B0 A0),
/// at the same scaling: r doubled, lora_alpha doubled (times √2 with rsLoRA), rank_pattern and alpha_pattern
/// values doubled, init_lora_weights true. PEFT keeps only lora_A and lora_B; this keeps the rest too, so the
/// result applies whole: DoRA magnitudes as they are (exact, since ‖W + s·B' A'‖ = ‖W − s·B0 A0 + s·B A‖), trained
/// biases, embedding modules (PEFT never rewrites an embedding; their A and B are padded with zeros to the doubled
/// rank) and other tensors. Refused as PEFT refuses it: rsLoRA with rank_pattern or alpha_pattern (config_error).
/// Refused with format_error listing every problem: a linear module `initial` lacks, or whose A0 / B0 shapes or
/// scaling differ from the trained module's.
/// OLoRA on a square Conv1D weight (fan_in_fan_out) is the exception to PEFT's formula: its residual there is
/// W − s·(B0 A0)ᵀ (see peft_init_factors), so the module becomes A' = [A; B0ᵀ], B' = [B, −A0ᵀ], which applies to the
/// original base as the trained adapter applies to PEFT's residual; PEFT's own conversion subtracts B0 A0 there.
template <class Scalar>
Adapter<Scalar> convert_residual_adapter(Adapter<Scalar> trained, const Adapter<Scalar>& initial) {
  AdapterConfig& config = trained.config;
  if (config.use_rslora && (!config.rank_pattern.empty() || !config.alpha_pattern.empty()))
    throw config_error("peft::convert_residual_adapter: " + trained.source +
                       " uses rsLoRA with rank_pattern or alpha_pattern, which PEFT's conversion refuses too "
                       "(doubling a pattern's alpha would not keep its rsLoRA scaling)");
  std::vector<std::string> problems;
  auto is_olora = [](const AdapterConfig& c) {  // residual_init's classification; the refused inits are not OLoRA
    try {
      return c.residual_init("adapter_config.json") == ResidualInit::olora;
    } catch (const config_error&) {
      return false;
    }
  };
  const bool olora_transposed = config.fan_in_fan_out && (is_olora(config) || is_olora(initial.config));
  for (auto& m : trained.modules) {
    const Index r = m.A.rows();
    if (m.embedding) {  // no residual: the same product at rank 2r
      Matrix<Scalar> A = Matrix<Scalar>::Zero(2 * r, m.A.cols()), B = Matrix<Scalar>::Zero(m.B.rows(), 2 * r);
      A.topRows(r) = m.A;
      B.leftCols(r) = m.B;
      m.A = std::move(A);
      m.B = std::move(B);
    } else {
      const ModuleAdapter<Scalar>* m0 = initial.find(m.path);
      if (m0 == nullptr || m0->embedding) {
        problems.push_back(m.path + ": " + initial.source + " has no linear module of that path (lora_A / lora_B)");
        continue;
      }
      if (m0->A.rows() != r || m0->A.cols() != m.A.cols() || m0->B.rows() != m.B.rows() || m0->B.cols() != r) {
        problems.push_back(m.path + ": the initial adapter's A0 and B0 must be " + shape_string(r, m.A.cols()) +
                           " and " + shape_string(m.B.rows(), r) + " as the trained ones, got " +
                           shape_string(m0->A.rows(), m0->A.cols()) + " and " +
                           shape_string(m0->B.rows(), m0->B.cols()));
        continue;
      }
      if (std::abs(m0->scaling - m.scaling) > 1e-6 * std::max(1.0, std::abs(m.scaling))) {
        problems.push_back(m.path + ": the initial adapter's scaling is " + value_string(m0->scaling) +
                           ", the trained one's " + value_string(m.scaling));
        continue;
      }
      Matrix<Scalar> A(2 * r, m.A.cols()), B(m.B.rows(), 2 * r);
      if (olora_transposed && m.A.cols() == m.B.rows()) {
        A << m.A, m0->B.transpose();
        B << m.B, -m0->A.transpose();
      } else {
        A << m.A, m0->A;
        B << m.B, -m0->B;
      }
      m.A = std::move(A);
      m.B = std::move(B);
    }
    m.r = 2 * static_cast<int>(r);
    m.lora_alpha *= config.use_rslora ? std::sqrt(2.0) : 2.0;
  }
  detail::throw_problems(trained.source + ": cannot convert it to a plain LoRA with " + initial.source + ", ",
                         problems);
  config.r *= 2;
  config.lora_alpha *= config.use_rslora ? std::sqrt(2.0) : 2.0;
  for (auto& [key, rank] : config.rank_pattern) rank *= 2;
  for (auto& [key, alpha] : config.alpha_pattern) alpha *= 2;
  config.init_lora_weights = true;
  return trained;
}

/// save_adapter for a model trained from a PiSSA / OLoRA start (its W the residuals), written as the plain LoRA
/// for the original base that convert_residual_adapter gives with the initial adapter read from `initial_dir`:
/// what PEFT's save_pretrained(dir, path_initial_model_for_weight_conversion = initial_dir) writes. Unlike PEFT it
/// leaves initial_dir's files as they are. Atomic, as save_adapter.
template <class Scalar>
void save_adapter_converted(const std::string& dir, const std::map<std::string, LoRALinear<Scalar>*>& model,
                            const std::string& initial_dir, const AdapterConfig& base = {},
                            safetensors::Dtype dtype = safetensors::Dtype::F32) {
  Adapter<Scalar> trained;
  trained.config = config_for(model, base);
  trained.source = "the model";
  for (const auto& [path, layer] : model) {
    if (layer->is_merged())
      throw state_error("peft::save_adapter_converted: layer \"" + path + "\" is merged; unmerge() it first");
    if (layer->rank() == 0) continue;
    ModuleAdapter<Scalar> m;
    m.path = path;
    m.A = layer->lora_A();
    m.B = layer->lora_B();
    if (layer->bias_trainable()) m.bias = layer->bias();
    if (layer->use_dora()) m.magnitude = layer->magnitude();
    m.r = layer->rank();
    m.lora_alpha = layer->config().lora_alpha;
    m.scaling = static_cast<double>(layer->scaling());
    trained.modules.push_back(std::move(m));
  }
  save_adapter(dir, convert_residual_adapter(std::move(trained), read_adapter<Scalar>(initial_dir)), dtype);
}

/// Writes adapter `name` of a multi-adapter model in PEFT's format, as
/// save_adapter does for LoRALinear layers (atomically, both files staged
/// first). Each module keeps its own r and lora_alpha; a runtime set_scale
/// is not saved (PEFT does not save it either).
template <class Scalar>
void save_adapter(const std::string& dir, const std::string& name,
                  const std::map<std::string, MultiLoRALinear<Scalar>*>& model, const AdapterConfig& base = {},
                  safetensors::Dtype dtype = safetensors::Dtype::F32) {
  std::vector<std::unique_ptr<LoRALinear<Scalar>>> views;
  std::map<std::string, LoRALinear<Scalar>*> single;
  for (const auto& [path, layer] : model) {
    if (!layer->has_adapter(name))
      throw config_error("peft::save_adapter: layer \"" + path + "\" has no adapter named \"" + name + "\"");
    auto a = layer->adapter(name);
    // A LoRALinear over the layer's W with this adapter's A and B: the single-adapter writer does the rest.
    views.push_back(std::make_unique<LoRALinear<Scalar>>(layer->frozen_weight().read_only_view(), a->config));
    views.back()->lora_A() = a->lora_A;
    views.back()->lora_B() = a->lora_B;
    if (a->config.use_dora) views.back()->magnitude() = a->magnitude;
    single[path] = views.back().get();
  }
  save_adapter(dir, single, base, dtype);
}

// ---- merging into a base weight ------------------------------------------------------

/// W += scale · s · B A for a weight stored (O, I), or W += scale · s · (B A)ᵀ
/// for one stored (I, O) (fan_in_fan_out). Shapes are checked first. A DoRA module (m.magnitude) then
/// rescales every output o by magnitude_o / ‖W_o + scale · s · (B A)_o‖, as PEFT's merge does; a zero norm
/// throws numeric_error naming the output and leaves `weight` as it was.
template <class Scalar, class AccScalar = Scalar>
void merge_into(MutRef<Scalar> weight, const ModuleAdapter<AccScalar>& m, double scale, bool fan_in_fan_out) {
  const Index O = m.out_features(), I = m.in_features();
  const Index rows = fan_in_fan_out ? I : O, cols = fan_in_fan_out ? O : I;
  if (weight.rows() != rows || weight.cols() != cols)
    throw shape_error("peft::merge_into(\"" + m.path + "\"): weight expected " + shape_string(rows, cols) +
                      (fan_in_fan_out ? " (in, out) with fan_in_fan_out" : " (out, in)") + ", got " +
                      shape_string(weight.rows(), weight.cols()));
  const AccScalar s = static_cast<AccScalar>(scale * m.scaling);
  Matrix<AccScalar> delta(O, I);
  delta.noalias() = m.B * m.A;
  if (m.magnitude.size() == 0) {
    if (fan_in_fan_out)
      weight += (s * delta.transpose()).template cast<Scalar>();
    else
      weight += (s * delta).template cast<Scalar>();
    return;
  }
  if (m.magnitude.size() != O)
    throw shape_error("peft::merge_into(\"" + m.path + "\"): lora_magnitude_vector expected " + std::to_string(O) +
                      " entries, got " + std::to_string(m.magnitude.size()));
  // delta ← W + s·B A as (O, I) in Scalar (what the plain merge stores), then each row scaled by m / ‖row‖.
  Matrix<Scalar> sum(O, I);
  if (fan_in_fan_out)
    sum = weight.transpose() + (s * delta).template cast<Scalar>();
  else
    sum = weight + (s * delta).template cast<Scalar>();
  Eigen::Matrix<double, Eigen::Dynamic, 1> factor(O);
  for (Index o = 0; o < O; ++o) {
    const double norm = std::sqrt(sum.row(o).template cast<double>().squaredNorm());
    factor(o) = static_cast<double>(m.magnitude(0, o)) / norm;
    if (!(norm > 0) || !std::isfinite(factor(o)))
      throw numeric_error("peft::merge_into(\"" + m.path + "\"): DoRA's norm ‖W + s·B A‖ of output " +
                          std::to_string(o) + " is " + value_string(norm) + " and its magnitude " +
                          value_string(static_cast<double>(m.magnitude(0, o))) +
                          ", so the merged row is not finite (PEFT gives NaN there); nothing was changed");
  }
  for (Index o = 0; o < O; ++o) sum.row(o) *= static_cast<Scalar>(factor(o));
  if (fan_in_fan_out)
    weight = sum.transpose();
  else
    weight = sum;
}

}  // namespace lora::peft

namespace lora::peft {

/// What merge_adapter_file did: each adapted module and the base tensor it went into.
struct MergeReport {
  std::vector<std::pair<std::string, std::string>> merged;       ///< (module path, base tensor name)
  std::vector<std::pair<std::string, std::string>> replaced;     ///< (adapter tensor, base tensor) taken whole
  std::vector<std::string> added;                                ///< adapter tensors the base lacked, added
  std::vector<std::pair<std::string, std::string>> dequantized;  ///< (4-bit weight, dtype written) not merged
  std::size_t copied = 0;                                        ///< tensors copied through unchanged
};

/// The base tensor `name` ("h.0.attn.c_attn.weight"), or the same without a
/// leading "transformer." / "model." when the base file lacks it.
inline const safetensors::TensorInfo* find_base_tensor(const safetensors::File& base, const std::string& name) {
  if (const auto* t = base.find(name)) return t;
  for (const char* prefix : {"transformer.", "model."}) {
    const std::string p = prefix;
    if (name.size() > p.size() && name.compare(0, p.size(), p) == 0)
      if (const auto* t = base.find(name.substr(p.size()))) return t;
  }
  return nullptr;
}

/// The base tensor a module's weight lives in: find_base_tensor(path + ".weight").
inline const safetensors::TensorInfo* find_base_weight(const safetensors::File& base, const std::string& path) {
  return find_base_tensor(base, path + ".weight");
}

namespace detail {

/// The first value of `values` (n of them) that is not finite once stored as
/// `dtype` (an F16 overflows past 65504), or npos.
template <class Scalar>
std::size_t first_unrepresentable(const Scalar* values, std::size_t n, safetensors::Dtype dtype) {
  for (std::size_t i = 0; i < n; ++i) {
    const Scalar v = values[i];
    bool ok = std::isfinite(v);
    if (ok && dtype == safetensors::Dtype::F16)
      ok = (safetensors::float_to_half(static_cast<float>(v)) & 0x7c00u) != 0x7c00u;
    else if (ok && dtype == safetensors::Dtype::BF16)
      ok = (safetensors::float_to_bf16(static_cast<float>(v)) & 0x7f80u) != 0x7f80u;
    else if (ok && dtype != safetensors::Dtype::F64)
      ok = std::isfinite(static_cast<float>(v));
    if (!ok) return i;
  }
  return std::string::npos;
}

}  // namespace detail

/// lora-merge: writes `out_path`, the base file with each adapted weight
/// replaced by W + scale · s · B A (transposed for fan_in_fan_out), where W is first replaced by its PiSSA /
/// OLoRA residual for an adapter with init_lora_weights "pissa" / "olora", as PEFT loads it (the other inits that
/// rewrite the base are refused: AdapterConfig::residual_init),
/// accumulated in float (double for F64) and stored in the weight's own
/// dtype. The adapter's other tensors go in too, as PEFT's merge_and_unload
/// keeps them: a bias it trained, a modules_to_save head, biases trained with
/// bias "all" on modules without LoRA replace the base's tensor of that name
/// (shape checked, converted to the base's dtype), or are added when the base
/// has none. Every other tensor and the metadata are copied through unchanged.
///
/// Refuses (format_error, listing every problem) before writing anything:
/// modules with no base weight, or one of the wrong shape or dtype; two
/// adapter tensors that land on one base tensor; adapter tensors outside
/// "base_model.model."; a result that is not finite in its dtype (huge or
/// non-finite adapter values, a scale that overflows, an F16 weight pushed
/// past 65504), named with the tensor and the first bad element. Both files
/// are read with Access::read, so one that is truncated or rewritten while
/// the merge runs gives io_error and no output; the output is written
/// atomically.
///
/// A base quantised by bitsandbytes to 4 bits (NF4, in transformers' layout: <lora/quant_io.hpp>) is written
/// dequantised: each NF4 weight, merged or not, becomes a plain tensor of its logical shape in `dequantized_dtype`
/// (F32, BF16 or F16; by default the dtype its quant state names), and its side tensors (absmax, quant_map, nested_*,
/// quant_state) are dropped. Merging into 4 bits again would lose the adapter's smallest changes. Other
/// bitsandbytes tags (fp4) are refused.
///
/// (A template only so that a file including this header pays for compiling it when it calls it.)
template <class Acc = double>
MergeReport merge_adapter_file(const std::string& base_path, const std::string& adapter_path,
                               const std::string& out_path, double scale = 1.0,
                               std::optional<safetensors::Dtype> dequantized_dtype = std::nullopt) {
  static_assert(std::is_same_v<Acc, double>, "merge_adapter_file reads the adapter in double");
  if (!std::isfinite(scale)) throw config_error("merge_adapter_file: scale must be finite, got " + value_string(scale));
  if (dequantized_dtype && *dequantized_dtype != safetensors::Dtype::F32 &&
      *dequantized_dtype != safetensors::Dtype::BF16 && *dequantized_dtype != safetensors::Dtype::F16)
    throw config_error(std::string("merge_adapter_file: 4-bit weights are written as F32, BF16 or F16, not ") +
                       safetensors::dtype_name(*dequantized_dtype));
  Adapter<Acc> adapter = read_adapter<Acc>(adapter_path);
  safetensors::File base = safetensors::File::open(base_path, safetensors::Access::read);
  const bool fan_in_fan_out = adapter.config.fan_in_fan_out;

  struct Job {
    const ModuleAdapter<Acc>* module;
    const safetensors::TensorInfo* weight;
    const safetensors::TensorInfo* bias;
  };
  struct Whole {  // an adapter tensor that replaces a base tensor or is added
    const safetensors::TensorInfo* source;
    const safetensors::TensorInfo* target;  // null: added under `name`
    std::string name;
  };
  std::vector<Job> jobs;
  std::vector<Whole> wholes;
  std::vector<std::string> problems;
  ResidualInit rewrite = ResidualInit::none;  // PiSSA / OLoRA: W becomes its residual first, as PEFT loads it
  try {
    rewrite = adapter.config.residual_init("adapter_config.json");
  } catch (const config_error& e) {
    problems.push_back(e.what());
  }
  // W (stored (rows, cols)) ← W − s·B0 A0, PEFT's PiSSA / OLoRA residual of it, in the precision of `stored`.
  auto subtract_initial = [&](auto& stored, const ModuleAdapter<Acc>& m, const std::string& what) {
    using T = typename std::decay_t<decltype(stored)>::Scalar;
    const Matrix<T> w = fan_in_fan_out ? Matrix<T>(stored.transpose()) : Matrix<T>(stored);
    const auto [A0, B0] = peft_init_factors<T>(w, fan_in_fan_out, rewrite, m.r, m.scaling, what);
    const Matrix<T> delta = static_cast<T>(m.scaling) * (B0 * A0);  // (O, I)
    if (fan_in_fan_out)
      stored -= delta.transpose();
    else
      stored -= delta;
  };
  // bitsandbytes 4-bit weights (W beside W.quant_state.bitsandbytes__<tag>): checked up front, decoded when written,
  // in `out_dtype`; their side tensors are dropped.
  struct Nf4 {
    Index rows, cols;
    safetensors::Dtype out_dtype;
  };
  std::map<std::string, Nf4> nf4;
  std::set<std::string> nf4_side;  // every tensor of every 4-bit weight, the packed codes included
  const std::string state_tag = ".quant_state.bitsandbytes__";
  for (const auto& t : base.tensors()) {
    const auto pos = t.name.rfind(state_tag);
    if (pos == std::string::npos || pos == 0) continue;
    const std::string weight = t.name.substr(0, pos), tag = t.name.substr(pos + state_tag.size());
    for (const char* side : {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"})
      nf4_side.insert(weight + side);
    nf4_side.insert(t.name);
    const auto& access = safetensors::nf4_access();
    try {
      if (tag != "nf4")
        throw format_error(base_path + ": \"" + weight + "\" is quantised as bitsandbytes' \"" + tag +
                           "\"; only \"nf4\" is supported");
      if (access.decode == nullptr)
        throw state_error(base_path + ": \"" + weight +
                          "\" is a bitsandbytes 4-bit weight; include <lora/quant_io.hpp> to merge into a 4-bit base "
                          "(lora-merge does)");
      const auto [rows, cols] = access.shape(base, weight);
      nf4.emplace(weight, Nf4{rows, cols, dequantized_dtype ? *dequantized_dtype : access.compute_dtype(base, weight)});
    } catch (const error& e) {
      problems.push_back(e.what());
    }
  }
  std::map<std::string, std::string> claimed;  // base tensor -> what writes it
  auto claim = [&](const std::string& tensor, const std::string& by) {
    auto [it, fresh] = claimed.emplace(tensor, by);
    if (!fresh)
      problems.push_back(by + " and " + it->second + " both map to base tensor \"" + tensor +
                         "\" (one of the two paths has a leading transformer./model. the other lacks)");
    return fresh;
  };
  for (const auto& m : adapter.modules) {
    const auto* w = find_base_weight(base, m.path);
    if (w == nullptr) {
      problems.push_back(m.path + ": no base tensor \"" + m.path +
                         ".weight\" (nor without a leading transformer./model.)");
      continue;
    }
    const std::uint64_t O = static_cast<std::uint64_t>(m.out_features()),
                        I = static_cast<std::uint64_t>(m.in_features());
    const bool in_out = fan_in_fan_out || m.embedding;  // an embedding table is (V, d): (in, out)
    const std::vector<std::uint64_t> want =
        in_out ? std::vector<std::uint64_t>{I, O} : std::vector<std::uint64_t>{O, I};
    if (nf4_side.count(w->name) && !nf4.count(w->name)) continue;  // a 4-bit weight refused above, or a side tensor
    if (const auto it = nf4.find(w->name); it != nf4.end()) {      // its logical shape is in the quant state
      const std::vector<std::uint64_t> shape = {static_cast<std::uint64_t>(it->second.rows),
                                                static_cast<std::uint64_t>(it->second.cols)};
      if (shape != want) {
        problems.push_back(m.path + ": the 4-bit base weight \"" + w->name + "\" is " + safetensors::shape_text(shape) +
                           ", the adapter needs " + safetensors::shape_text(want));
        continue;
      }
    } else if (w->shape != want) {
      problems.push_back(m.path + ": base tensor \"" + w->name + "\" is " + safetensors::shape_text(w->shape) +
                         ", the adapter needs " + safetensors::shape_text(want) +
                         (m.embedding      ? " (num_embeddings, embedding_dim)"
                          : fan_in_fan_out ? " (in, out), fan_in_fan_out"
                                           : " (out, in)"));
      continue;
    }
    if (!safetensors::is_float(w->dtype) && !nf4.count(w->name)) {
      problems.push_back(m.path + ": base tensor \"" + w->name + "\" has dtype " + safetensors::dtype_name(w->dtype) +
                         ", expected F16, BF16, F32 or F64");
      continue;
    }
    if (!claim(w->name, "module " + m.path)) continue;
    const safetensors::TensorInfo* b = nullptr;
    if (m.bias.size() > 0) {
      std::string bias_name = w->name.substr(0, w->name.size() - std::string(".weight").size()) + ".bias";
      b = base.find(bias_name);
      if (b == nullptr || b->shape != std::vector<std::uint64_t>{O} || !safetensors::is_float(b->dtype)) {
        problems.push_back(m.path + ": the adapter trained a bias but the base has no float tensor \"" + bias_name +
                           "\" of shape [" + std::to_string(O) + "]");
        continue;
      }
      if (!claim(b->name, "the bias of module " + m.path)) continue;
    }
    jobs.push_back({&m, w, b});
  }
  // The adapter's other tensors: modules_to_save heads, biases of modules without LoRA.
  const safetensors::File& adapter_file = *adapter.file;
  const std::string prefix = key_prefix;
  for (const auto& t : adapter.other_tensors) {
    if (t.name.compare(0, prefix.size(), prefix) != 0 || t.name.size() == prefix.size()) {
      problems.push_back("adapter tensor \"" + t.name + "\" is not under \"" + prefix +
                         "\": neither a LoRA matrix nor a module of the model, so it has no place in the base");
      continue;
    }
    const std::string name = t.name.substr(prefix.size());
    const auto* target = find_base_tensor(base, name);
    if (target != nullptr) {
      if (target->shape != t.shape) {
        problems.push_back("adapter tensor \"" + t.name + "\" is " + safetensors::shape_text(t.shape) +
                           ", the base tensor \"" + target->name + "\" it replaces is " +
                           safetensors::shape_text(target->shape));
        continue;
      }
      if (safetensors::is_float(target->dtype) != safetensors::is_float(t.dtype) ||
          (!safetensors::is_float(t.dtype) && t.dtype != target->dtype)) {
        problems.push_back("adapter tensor \"" + t.name + "\" has dtype " + safetensors::dtype_name(t.dtype) +
                           ", the base tensor \"" + target->name + "\" it replaces " +
                           safetensors::dtype_name(target->dtype));
        continue;
      }
      if (!claim(target->name, "adapter tensor " + t.name)) continue;
    } else if (!claim(name, "adapter tensor " + t.name)) {
      continue;
    }
    wholes.push_back({&t, target, target ? target->name : name});
  }
  detail::throw_problems(base_path + ": cannot merge " + adapter.source + ", ", problems);

  // Compute everything and check it is finite in its dtype before writing a byte.
  safetensors::Writer writer;
  if (base.has_metadata())
    for (const auto& [k, v] : base.metadata()) writer.set_metadata(k, v);
  MergeReport report;
  auto not_finite = [&](const std::string& what, const safetensors::TensorInfo& tensor, std::size_t at,
                        const std::string& detail) {
    const std::uint64_t cols = tensor.shape.size() >= 2 ? tensor.shape.back() : 0;
    std::string where = cols ? "[" + std::to_string(at / cols) + ", " + std::to_string(at % cols) + "]"
                             : "[" + std::to_string(at) + "]";
    problems.push_back(what + ": the result is not finite in " + safetensors::dtype_name(tensor.dtype) + " (first at " +
                       where + ": " + detail + "); nothing was written");
  };
  for (const Job& job : jobs) {
    const auto& m = *job.module;
    const auto* w = job.weight;
    const auto nf4_it = nf4.find(w->name);
    const Nf4* q4 = nf4_it != nf4.end() ? &nf4_it->second : nullptr;
    const Index rows = q4 ? q4->rows : static_cast<Index>(w->shape[0]),
                cols = q4 ? q4->cols : static_cast<Index>(w->shape[1]);
    const safetensors::Dtype out_dtype = q4 ? q4->out_dtype : w->dtype;
    const std::vector<std::uint64_t> out_shape =
        q4 ? std::vector<std::uint64_t>{static_cast<std::uint64_t>(rows), static_cast<std::uint64_t>(cols)} : w->shape;
    // The base weight in float or double: decoded from 4 bits, or converted from its dtype.
    auto load_base = [&](auto* out) {
      using T = std::remove_pointer_t<decltype(out)>;
      if (q4) {
        const Matrix<float> d = safetensors::nf4_access().decode(base, w->name);
        Eigen::Map<Matrix<T>>(out, rows, cols) = d.template cast<T>();
      } else {
        base.convert_into(*w, out);
      }
    };
    const std::string what = m.path + " -> " + w->name;
    Matrix<Acc> merged(rows, cols);
    const bool residual = rewrite != ResidualInit::none && !m.embedding;
    if (w->dtype == safetensors::Dtype::F64) {
      load_base(merged.data());
      if (residual) try {
          subtract_initial(merged, m, what + " (init_lora_weights residual)");
        } catch (const error& e) {
          problems.push_back(e.what());
          continue;
        }
      merge_into<Acc, Acc>(merged, m, scale, fan_in_fan_out || m.embedding);
    } else {  // float accumulation, as PEFT does for a float32 base and llama.cpp's export-lora
      const float s = static_cast<float>(scale * m.scaling);
      if (!std::isfinite(s)) {
        problems.push_back(what + ": scale " + value_string(scale) + " x scaling " + value_string(m.scaling) + " = " +
                           value_string(scale * m.scaling) + " does not fit a float");
        continue;
      }
      Matrix<float> w32(rows, cols);
      load_base(w32.data());
      if (residual) try {  // in float, as PEFT's pissa_init / olora_init compute it
          subtract_initial(w32, m, what + " (init_lora_weights residual)");
        } catch (const error& e) {
          problems.push_back(e.what());
          continue;
        }
      ModuleAdapter<float> m32;
      m32.path = m.path;
      m32.A = m.A.template cast<float>();
      m32.B = m.B.template cast<float>();
      m32.magnitude = m.magnitude.template cast<float>();
      m32.scaling = m.scaling;
      merge_into<float, float>(w32, m32, scale, fan_in_fan_out || m.embedding);
      merged = w32.cast<double>();
    }
    const std::size_t bad =
        detail::first_unrepresentable(merged.data(), static_cast<std::size_t>(merged.size()), out_dtype);
    if (bad != std::string::npos) {
      Matrix<Acc> original(rows, cols);
      load_base(original.data());
      not_finite(what, *w, bad,
                 "base " + value_string(original.data()[bad]) + " + delta " +
                     value_string(merged.data()[bad] - original.data()[bad]) + " = " +
                     value_string(merged.data()[bad]) +
                     (std::isfinite(original.data()[bad]) ? "" : "; the base weight is already not finite there"));
      continue;
    }
    writer.add(w->name, merged, out_dtype, out_shape);  // back to the weight's own dtype (4 bits: out_dtype)
    if (job.bias != nullptr) {
      const std::size_t b =
          detail::first_unrepresentable(m.bias.data(), static_cast<std::size_t>(m.bias.size()), job.bias->dtype);
      if (b != std::string::npos) {
        not_finite(m.path + ".bias -> " + job.bias->name, *job.bias, b, "value " + value_string(m.bias.data()[b]));
        continue;
      }
      writer.add(job.bias->name, m.bias, job.bias->dtype, job.bias->shape);
    }
    report.merged.emplace_back(m.path, w->name);
  }
  for (const Whole& whole : wholes) {
    const auto& t = *whole.source;
    const safetensors::Dtype dtype = whole.target ? whole.target->dtype : t.dtype;
    if (safetensors::is_float(t.dtype)) {
      Matrix<Acc> values(1, static_cast<Index>(t.numel()));
      adapter_file.convert_into(t, values.data());
      const std::size_t bad =
          detail::first_unrepresentable(values.data(), static_cast<std::size_t>(values.size()), dtype);
      if (bad != std::string::npos) {
        not_finite("adapter tensor " + t.name + " -> " + whole.name, t, bad,
                   "value " + value_string(values.data()[bad]));
        continue;
      }
      writer.add(whole.name, values, dtype, t.shape);
    } else {
      writer.add_from(whole.name, adapter_file, t);
    }
    if (whole.target)
      report.replaced.emplace_back(t.name, whole.name);
    else
      report.added.push_back(whole.name);
  }
  for (const auto& [weight, q4] : nf4) {  // the 4-bit weights no adapter touched: decoded
    if (claimed.count(weight)) continue;
    writer.add(weight, safetensors::nf4_access().decode(base, weight), q4.out_dtype,
               {static_cast<std::uint64_t>(q4.rows), static_cast<std::uint64_t>(q4.cols)});
    report.dequantized.emplace_back(weight, safetensors::dtype_name(q4.out_dtype));
  }
  detail::throw_problems(base_path + ": cannot merge " + adapter.source + ", ", problems);
  for (const auto& t : base.tensors()) {
    if (claimed.count(t.name) || nf4_side.count(t.name)) continue;
    writer.add_from(t.name, base, t);  // streamed from the base while the output is written
    ++report.copied;
  }
  auto staged = writer.stage(out_path);
  base.check_unchanged();  // a base rewritten in place while it was copied: refuse what was staged
  adapter_file.check_unchanged();
  staged.commit();
  return report;
}

}  // namespace lora::peft
