// Which modules of a checkpoint a PEFT LoRA config adapts, chosen as PEFT's
// check_target_module_exists and inject_adapter choose them
// (src/peft/tuners/tuners_utils.py):
//
//   target_modules  a list: a module is chosen when its name equals an entry
//                   or ends with "." + an entry ("q_proj" takes
//                   "model.layers.0.self_attn.q_proj", "proj" does not);
//                   one string: a regex that must match the whole name
//                   (re.fullmatch); "all-linear" (any case): every Linear or
//                   Conv1D module except the output head (below)
//   exclude_modules a list or one regex, with the same two meanings; an
//                   excluded module is never chosen
//   modules_to_save never adapted: PEFT skips every name that
//                   re.match(rf"(^|.*\.){m}($|\..*)", name) takes
//   layers_to_transform, layers_pattern
//                   with a list target_modules, a module chosen by a "."-suffix
//                   (not by its exact name) is kept only when its layer index
//                   is listed (an int or a list of ints). The index is the
//                   number PEFT's re.match(rf".*?\.{pattern}\.(\d+)\.", name)
//                   captures for the first pattern that matches; with no
//                   layers_pattern (or an empty one), re.match(r".*?\.[^.]*\.(\d+)\.", name):
//                   the first number that has a '.' two segments before it
//                   and one after it ("model.layers.3.mlp.experts.1.w1" is
//                   layer 3; "h.0.attn.c_attn" has none, "transformer.h.0..."
//                   is layer 0). No index: not chosen.
//
// exclude_modules, layers_to_transform and layers_pattern are not fields of
// AdapterConfig: they are read from AdapterConfig::other, and a value of the
// wrong type is a config_error naming the key. As LoraConfig.__post_init__
// does, a string target_modules (all-linear too) with layers_to_transform or
// layers_pattern, and layers_pattern without layers_to_transform, are
// config_errors. When nothing is chosen, select_targets throws config_error
// naming the patterns, PEFT's reason (none matched, all matched were
// excluded, ...) and up to five of the checkpoint's module names, as PEFT
// raises NoMatchingPeftModuleError. PEFT only warns when exclude_modules
// excluded nothing; so does this (not at all: nothing is printed).
//
// Every regex goes through lora::detail::ModulePattern, the linear-time
// matcher of Python's re subset (ASCII \d \w \s; backreferences and
// lookaround refused with a config_error), never std::regex.
//
// Modules of a checkpoint: each tensor key ending in ".weight" whose tensor is
// 2-D, without the suffix, in the file's order. PEFT looks at module classes,
// which a safetensors file does not record, so "all-linear" decides by name:
//   * an embedding is a module whose last name component contains "embed"
//     (embed_tokens, word_embeddings, position_embeddings, embed_positions;
//     embed_out is GPT-NeoX's output head, below), or is "wte", "wpe"
//     (GPT-2), "shared" (T5) or "relative_attention_bias" (T5); embeddings
//     are not Linear, so all-linear leaves them out. Layer norms are 1-D and
//     are not modules here at all.
//   * the output head is what transformers' get_output_embeddings() returns,
//     recognised by name: a module named, or ending in "." and, "lm_head"
//     (LLaMA, GPT-2, T5, OPT, ...; GPT-2 checkpoints tie it to wte and store
//     no key for it), "lm_head.decoder" (RoBERTa, whose lm_head is a
//     container), "cls.predictions.decoder" (BERT), "vocab_projector"
//     (DistilBERT) or "embed_out" (GPT-NeoX). When the checkpoint has none and
//     task_type is "SEQ_CLS", PEFT leaves out the model's top-level `score`
//     or else `classifier` (SEQ_CLS_HEAD_NAMES); so does this.
//   TargetOptions::output_head names the head instead of the rule.
// Every other 2-D module counts as Linear or Conv1D (Conv1D's weight is 2-D
// too; nn.Conv1d/2d weights are 3-D and 4-D).
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/detail/pattern.hpp>
#include <lora/errors.hpp>
#include <lora/peft.hpp>
#include <lora/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lora::peft {

struct TargetOptions {
  /// The output head's module name, "" for none; unset: the naming rule above.
  std::optional<std::string> output_head;
  /// config.json's model_type. PEFT's _check_target_module_compatiblity
  /// refuses a module named out_proj or conv1d (last component) in the
  /// Mamba-based models "falcon_h1", "mamba", "mamba2", "falcon_mamba",
  /// "nemotron_h"; "" (unknown) skips the check.
  std::string model_type;
};

/// The modules of a checkpoint: keys "<module>.weight" of 2-D tensors, in the file's order.
inline std::vector<std::string> checkpoint_modules(const lora::safetensors::File& file) {
  static constexpr std::string_view suffix = ".weight";
  std::vector<std::string> out;
  for (const auto& t : file.tensors())
    if (t.shape.size() == 2 && t.name.size() > suffix.size() &&
        std::string_view(t.name).substr(t.name.size() - suffix.size()) == suffix)
      out.push_back(t.name.substr(0, t.name.size() - suffix.size()));
  return out;
}

/// checkpoint_modules of the safetensors file at `path` (only its header is read).
inline std::vector<std::string> checkpoint_modules(const std::string& path) {
  return checkpoint_modules(lora::safetensors::File::open(path, lora::safetensors::Access::read));
}

namespace detail {

inline std::string_view last_component(std::string_view module) {
  const auto dot = module.rfind('.');
  return dot == std::string_view::npos ? module : module.substr(dot + 1);
}

inline bool is_or_ends_with(std::string_view module, std::string_view name) {
  if (module == name) return true;
  return module.size() > name.size() && module.substr(module.size() - name.size()) == name &&
         module[module.size() - name.size() - 1] == '.';
}

}  // namespace detail

/// all-linear's naming rule for an embedding (see the top of this file).
inline bool is_embedding_name(std::string_view module) {
  const std::string_view last = detail::last_component(module);
  if (last == "embed_out") return false;
  return last.find("embed") != std::string_view::npos || last == "wte" || last == "wpe" || last == "shared" ||
         last == "relative_attention_bias";
}

/// all-linear's naming rule for the output head (see the top of this file).
inline bool is_output_head_name(std::string_view module) {
  for (std::string_view head :
       {"lm_head", "lm_head.decoder", "cls.predictions.decoder", "vocab_projector", "embed_out"})
    if (detail::is_or_ends_with(module, head)) return true;
  return false;
}

namespace detail {

inline std::string quote_list(const std::vector<std::string>& names) {
  std::string s = "[";
  for (std::size_t i = 0; i < names.size(); ++i) s += (i ? ", \"" : "\"") + printable(names[i]) + "\"";
  return s + "]";
}

/// A JSON value for a message: compact, cut after 120 bytes.
inline std::string shown_json(const nlohmann::json& v) {
  const std::string text = printable(v.dump());
  return text.size() <= 120 ? text : text.substr(0, 120) + "... (" + std::to_string(text.size()) + " bytes)";
}

/// config.other[key], or nullptr when it is missing or null.
inline const nlohmann::json* other_value(const AdapterConfig& config, const char* key) {
  const auto it = config.other.find(key);
  return it == config.other.end() || it->is_null() ? nullptr : &*it;
}

[[noreturn]] inline void wrong_type(const char* key, const char* expected, const nlohmann::json& v) {
  throw config_error(std::string("adapter config: ") + key + " must be " + expected + ", got " + shown_json(v));
}

/// A string or a list of strings (exclude_modules, layers_pattern): the list, and whether it was one string.
inline std::vector<std::string> strings(const char* key, const nlohmann::json& v, bool& one_string) {
  one_string = v.is_string();
  if (one_string) return {v.get<std::string>()};
  if (!v.is_array()) wrong_type(key, "a string or a list of strings", v);
  std::vector<std::string> out;
  for (const auto& item : v) {
    if (!item.is_string()) wrong_type(key, "a string or a list of strings", v);
    out.push_back(item.get<std::string>());
  }
  return out;
}

/// A regex from the config, compiled as Python's re.fullmatch / re.match takes it; errors name the key.
template <class Make>
lora::detail::ModulePattern compile(const std::string& where, Make&& make) {
  try {
    return make();
  } catch (const config_error& e) {
    throw config_error("adapter config: " + where + ": " + e.what());
  }
}

/// Whether `pattern`, which compiles by itself, has a '|' outside every group:
/// PEFT pastes it into rf".*?\.{pattern}\.(\d+)\." without a group.
inline bool top_level_alternation(std::string_view pattern) {
  int depth = 0;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\') {
      ++i;
    } else if (c == '[') {  // a class: '^' and a first ']' are part of it
      ++i;
      if (i < pattern.size() && pattern[i] == '^') ++i;
      if (i < pattern.size() && pattern[i] == ']') ++i;
      for (; i < pattern.size() && pattern[i] != ']'; ++i)
        if (pattern[i] == '\\') ++i;
    } else if (c == '(' && pattern.compare(i, 3, "(?#") == 0) {
      i = pattern.find(')', i);
      if (i == std::string_view::npos) return false;
    } else if (c == '(') {
      ++depth;
    } else if (c == ')') {
      --depth;
    } else if (c == '|' && depth == 0) {
      return true;
    }
  }
  return false;
}

/// One layers_pattern entry P: `whole` is re.match(rf".*?\.{P}\.(\d+)\.", name); `span` tells whether P
/// can take exactly the text between two dots of the name (it is matched on ".<text>.").
struct LayerPattern {
  std::string text;
  lora::detail::ModulePattern whole;
  lora::detail::ModulePattern span;
};

inline LayerPattern layer_pattern(const std::string& p) {
  const std::string where = "layers_pattern \"" + printable(p) + "\"";
  // Python must take P by itself: then P pasted between regex text reads as P in a group, unless it has a top-level |.
  compile(where, [&] { return lora::detail::ModulePattern::fullmatch(p); });
  if (top_level_alternation(p))
    throw config_error("adapter config: " + where +
                       " has a '|' outside a group, which splits PEFT's regex rf\".*?\\.{pattern}\\.(\\d+)\\.\" (PEFT "
                       "then fails on a missing group); write (?:a|b)");
  return {p,
          compile(where, [&] { return lora::detail::ModulePattern::match_joined(U".*?\\.(?:", p, U")\\.(\\d+)\\."); }),
          compile(where, [&] { return lora::detail::ModulePattern::match_joined(U"\\.(?:", p, U")\\.\\Z"); })};
}

/// The layer index PEFT's re.match(rf".*?\.{P}\.(\d+)\.", name).group(1) gives, as decimal digits without leading
/// zeros, or nothing when the regex does not match. Python takes the first '.' (lazy .*?, which does not cross a
/// '\n') from which P, a '.', digits and a '.' follow; the digits are then a whole segment of the name. When P
/// could end at two segments with different numbers from that '.', Python's choice depends on the order its
/// backtracking tries P's alternatives, which this matcher does not follow: a config_error then.
inline std::optional<std::string> layer_index(const LayerPattern& p, const std::string& name) {
  if (!p.whole.matches(name)) return std::nullopt;
  const std::size_t n = name.size();
  for (std::size_t i = 0; i < n && name[i] != '\n'; ++i) {
    if (name[i] != '.') continue;
    std::set<std::string> values;
    for (std::size_t d = i + 2; d < n; ++d) {
      if (name[d - 1] != '.') continue;
      std::size_t e = d;
      while (e < n && name[e] >= '0' && name[e] <= '9') ++e;
      if (e == d || e == n || name[e] != '.') continue;
      if (!p.span.matches(std::string_view(name).substr(i, d - i))) continue;
      std::size_t z = d;
      while (z + 1 < e && name[z] == '0') ++z;
      values.insert(name.substr(z, e - z));
    }
    if (values.size() > 1)
      throw config_error("adapter config: layers_pattern \"" + printable(p.text) + "\" gives module \"" +
                         printable(name) + "\" more than one layer index (" + *values.begin() + " and " +
                         *values.rbegin() +
                         "); Python's choice depends on its backtracking order, which is not supported");
    if (!values.empty()) return *values.begin();
  }
  return std::nullopt;  // not reached: `whole` matched, so some '.' above has a candidate
}

enum class Verdict { matched, unmatched, excluded };

/// check_target_module_exists for one AdapterConfig.
struct TargetRules {
  std::optional<lora::detail::ModulePattern> target_regex;
  std::set<std::string> targets;  // list form; all-linear: the chosen module names
  std::optional<lora::detail::ModulePattern> exclude_regex;
  std::set<std::string> excludes;
  std::vector<lora::detail::ModulePattern> saved;  // modules_to_save
  bool use_layers = false;
  std::set<std::string> layers;  // layers_to_transform, as decimal digits
  std::vector<LayerPattern> layer_patterns;

  static bool in_list(const std::set<std::string>& list, const std::string& name) {
    if (list.count(name)) return true;
    for (const auto& entry : list)
      if (name.size() > entry.size() && name[name.size() - entry.size() - 1] == '.' &&
          name.compare(name.size() - entry.size(), entry.size(), entry) == 0)
        return true;
    return false;
  }

  Verdict check(const std::string& name) const {
    if (exclude_regex ? exclude_regex->matches(name) : in_list(excludes, name)) return Verdict::excluded;
    for (const auto& m : saved)
      if (m.matches(name)) return Verdict::excluded;
    if (target_regex) return target_regex->matches(name) ? Verdict::matched : Verdict::unmatched;
    if (targets.count(name)) return Verdict::matched;  // an exact name: layers_to_transform does not apply
    if (!in_list(targets, name)) return Verdict::unmatched;
    if (!use_layers) return Verdict::matched;
    for (const auto& p : layer_patterns)
      if (auto index = layer_index(p, name)) return layers.count(*index) ? Verdict::matched : Verdict::unmatched;
    return Verdict::unmatched;
  }
};

/// Up to `count` module names, with different last components where there are enough.
inline std::vector<std::string> examples(const std::vector<std::string>& modules, std::size_t count) {
  std::vector<std::string> out;
  std::set<std::string_view> seen;
  for (const auto& m : modules)
    if (out.size() < count && seen.insert(last_component(m)).second) out.push_back(m);
  for (const auto& m : modules)
    if (out.size() < count && std::find(out.begin(), out.end(), m) == out.end()) out.push_back(m);
  return out;
}

}  // namespace detail

/// The modules of `modules` (a checkpoint's, in its order) that PEFT adapts for
/// `config`, in the same order. Throws config_error for a wrong-typed
/// exclude_modules / layers_to_transform / layers_pattern, a combination
/// LoraConfig refuses, a regex outside the matcher's subset, and when nothing
/// is chosen (naming the patterns, why, and a few module names).
inline std::vector<std::string> select_targets(const std::vector<std::string>& modules, const AdapterConfig& config,
                                               const TargetOptions& options = {}) {
  using lora::detail::ModulePattern;
  detail::TargetRules rules;
  const bool string_target = config.target_modules_regex.has_value();
  const std::string target_text =
      string_target ? "\"" + printable(*config.target_modules_regex) + "\"" : detail::quote_list(config.target_modules);
  const bool all_linear = [&] {
    if (!string_target) return false;
    std::string lower = *config.target_modules_regex;
    for (char& c : lower) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
    return lower == "all-linear";
  }();

  // exclude_modules, layers_to_transform, layers_pattern: config.other, checked as LoraConfig checks them.
  std::string notes;  // what the message about no match adds
  if (const auto* v = detail::other_value(config, "exclude_modules")) {
    bool one = false;
    auto list = detail::strings("exclude_modules", *v, one);
    if (one && !list.front().empty())
      rules.exclude_regex = detail::compile("exclude_modules", [&] { return ModulePattern::fullmatch(list.front()); });
    if (!one) rules.excludes.insert(list.begin(), list.end());
    if (!list.empty() && !(one && list.front().empty())) notes += ", exclude_modules " + detail::shown_json(*v);
  }
  const nlohmann::json* layers = detail::other_value(config, "layers_to_transform");
  const nlohmann::json* pattern = detail::other_value(config, "layers_pattern");
  if (layers) {
    if (layers->is_number_integer()) {
      rules.layers.insert(layers->dump());  // decimal digits, as layer_index() gives them
      rules.use_layers = true;
    } else if (layers->is_array()) {
      for (const auto& item : *layers) {
        if (!item.is_number_integer())
          detail::wrong_type("layers_to_transform", "an integer or a list of integers", *layers);
        rules.layers.insert(item.dump());
      }
      rules.use_layers = !layers->empty();
    } else {
      detail::wrong_type("layers_to_transform", "an integer or a list of integers", *layers);
    }
    notes += ", layers_to_transform " + detail::shown_json(*layers);
  }
  std::vector<std::string> patterns;
  if (pattern) {
    bool one = false;
    patterns = detail::strings("layers_pattern", *pattern, one);
    if (one && patterns.front().empty()) patterns.clear();
    notes += ", layers_pattern " + detail::shown_json(*pattern);
  }
  if (string_target && layers)
    throw config_error("adapter config: layers_to_transform " + detail::shown_json(*layers) +
                       " cannot be used when target_modules is a string (" + target_text + "), as in PEFT");
  if (string_target && pattern)
    throw config_error("adapter config: layers_pattern " + detail::shown_json(*pattern) +
                       " cannot be used when target_modules is a string (" + target_text + "), as in PEFT");
  if (!patterns.empty() && !layers)
    throw config_error("adapter config: layers_pattern " + detail::shown_json(*pattern) +
                       " is given without layers_to_transform; PEFT requires both");
  if (rules.use_layers) {
    if (patterns.empty()) patterns.push_back("[^.]*");  // PEFT's r".*?\.[^.]*\.(\d+)\."
    for (const auto& p : patterns) rules.layer_patterns.push_back(detail::layer_pattern(p));
  }
  if (config.modules_to_save)
    for (const auto& m : *config.modules_to_save)
      rules.saved.push_back(detail::compile("modules_to_save \"" + printable(m) + "\"", [&] {
        return ModulePattern::match_joined(U"(^|.*\\.)", m, U"($|\\..*)");
      }));

  if (modules.empty())
    throw config_error("target_modules " + target_text + ": the checkpoint has no module (no 2-D \".weight\" tensor)");
  if (all_linear) {  // _maybe_include_all_linear_layers, with the naming rules above
    for (const auto& m : modules)
      if (!is_embedding_name(m)) rules.targets.insert(m);
    bool head = false;  // PEFT: get_output_embeddings() is not None
    if (options.output_head) {
      head = !options.output_head->empty();
      rules.targets.erase(*options.output_head);
    } else {
      for (const auto& m : modules)
        if (is_output_head_name(m)) head |= rules.targets.erase(m) > 0;
    }
    if (!head && config.task_type && *config.task_type == "SEQ_CLS") {
      for (const char* name : {"score", "classifier"}) {  // SEQ_CLS_HEAD_NAMES: the first top-level module found
        const std::string top(name);
        const bool exists = std::any_of(modules.begin(), modules.end(), [&](const std::string& m) {
          return m == top || m.compare(0, top.size() + 1, top + ".") == 0;
        });
        if (!exists) continue;
        rules.targets.erase(top);
        break;
      }
    }
  } else if (string_target) {
    if (!config.target_modules_regex->empty())
      rules.target_regex =
          detail::compile("target_modules", [&] { return ModulePattern::fullmatch(*config.target_modules_regex); });
  } else {
    rules.targets.insert(config.target_modules.begin(), config.target_modules.end());
  }

  std::vector<std::string> chosen;
  std::size_t excluded = 0, unmatched = 0;
  for (const auto& m : modules) {
    const detail::Verdict v = rules.check(m);
    if (v == detail::Verdict::matched) chosen.push_back(m);
    excluded += v == detail::Verdict::excluded;
    unmatched += v == detail::Verdict::unmatched;
  }
  if (chosen.empty()) {  // inject_adapter's NoMatchingPeftModuleError
    const bool no_targets = string_target ? config.target_modules_regex->empty() : config.target_modules.empty();
    std::string why;
    if (excluded > 0 && unmatched == 0)
      why = "every module is excluded (exclude_modules, modules_to_save)";
    else if (excluded == 0 && no_targets)
      why =
          "target_modules is empty or missing (PEFT then takes per-architecture defaults, which a checkpoint's "
          "names do not give: list the modules)";
    else if (excluded == 0)
      why = "it matches none of them";
    else
      why =
          std::to_string(excluded) + " are excluded (exclude_modules, modules_to_save) and the other ones do not match";
    throw config_error("target_modules " + target_text + notes + " selects no module of the checkpoint's " +
                       std::to_string(modules.size()) + ": " + why + "; its modules include " +
                       detail::quote_list(detail::examples(modules, 5)));
  }
  static const std::set<std::string> mamba = {"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"};
  if (mamba.count(options.model_type))
    for (const auto& m : chosen) {
      const std::string_view last = detail::last_component(m);
      if (last == "out_proj" || last == "conv1d")
        throw config_error("target_modules " + target_text + " selects \"" + printable(m) + "\": a module named " +
                           std::string(last) + " is incompatible with Mamba-based models (model_type \"" +
                           printable(options.model_type) + "\"), as PEFT says; exclude it");
    }
  return chosen;
}

/// select_targets over checkpoint_modules(file).
inline std::vector<std::string> select_targets(const lora::safetensors::File& file, const AdapterConfig& config,
                                               const TargetOptions& options = {}) {
  return select_targets(checkpoint_modules(file), config, options);
}

}  // namespace lora::peft
