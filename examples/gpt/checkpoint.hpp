// A GPT-2 checkpoint folder as Hugging Face writes one: config.json and model.safetensors.
//
//   load_model(dir, mode)  config.json checked (gpt::Config::from_json), then every tensor of tensor_specs() found
//                          in model.safetensors under its name, with or without the "transformer." prefix
//                          (GPT2LMHeadModel saves "transformer.h.0...", GPT2Model and the hub's gpt2 "h.0..."),
//                          its shape checked. F32 tensors are read in place from the mapped file
//                          (LoadMode::view) or copied (LoadMode::copy, for training the base); F16, BF16 and
//                          F64 are converted. The causal-mask buffers old checkpoints carry (attn.bias,
//                          attn.masked_bias) and a tied lm_head.weight are skipped; any other tensor is refused.
//   save_model(dir, w)     config.json and model.safetensors (F32, GPT2LMHeadModel's names, {"format": "pt"}),
//                          both staged and then renamed into place: a failed save leaves the old files.
#pragma once

#include "model.hpp"

#include <lora/detail/file.hpp>
#include <lora/errors.hpp>
#include <lora/safetensors.hpp>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace gpt {

enum class LoadMode {
  view,  ///< F32 tensors stay in the mapped file (read-only; the weights cannot train)
  copy,  ///< every tensor copied into one owned, writable buffer
};

inline Config read_config(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "config.json").string();
  std::string text;
  try {
    text = lora::detail::read_small_file(path, 1u << 20, "config.json");
  } catch (const lora::io_error& e) {
    throw lora::io_error(std::string(e.what()) + " (a model folder holds config.json and model.safetensors)");
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw lora::format_error(path + ": not valid JSON: " + e.what());
  }
  return Config::from_json(j, path);
}

/// The checkpoint's name for a spec's tensor: with "transformer." when the file has it so, else without.
inline const lora::safetensors::TensorInfo* find_tensor(const lora::safetensors::File& file, const std::string& name) {
  if (const auto* t = file.find(name)) return t;
  const std::string prefix = "transformer.";
  if (name.compare(0, prefix.size(), prefix) == 0) return file.find(name.substr(prefix.size()));
  return nullptr;
}

template <class S>
Weights<S> load_model(const std::string& dir, LoadMode mode = LoadMode::view) {
  namespace st = lora::safetensors;
  const Config config = read_config(dir);
  const std::string path = (std::filesystem::path(dir) / "model.safetensors").string();
  auto file = std::make_shared<st::File>(st::File::open(path));
  Weights<S> w;
  w.config = config;
  w.specs = tensor_specs(config);
  std::vector<std::string> problems;
  std::vector<const st::TensorInfo*> found(w.specs.size(), nullptr);
  std::vector<bool> used(file->tensors().size(), false);
  for (std::size_t i = 0; i < w.specs.size(); ++i) {
    const TensorSpec& s = w.specs[i];
    const st::TensorInfo* t = find_tensor(*file, s.name);
    if (!t) {
      problems.push_back("tensor \"" + s.name + "\" is missing (config.json's model needs it, shape " +
                         st::shape_text(std::vector<std::uint64_t>(s.shape.begin(), s.shape.end())) + ")");
      continue;
    }
    used[static_cast<std::size_t>(t - file->tensors().data())] = true;
    const std::vector<std::uint64_t> want(s.shape.begin(), s.shape.end());
    if (t->shape != want) {
      problems.push_back("tensor \"" + lora::printable(t->name) + "\" has shape " + st::shape_text(t->shape) +
                         ", config.json's model needs " + st::shape_text(want));
      continue;
    }
    if (!st::is_float(t->dtype)) {
      problems.push_back("tensor \"" + lora::printable(t->name) + "\" is " + st::dtype_name(t->dtype) +
                         ", expected F32, F16, BF16 or F64");
      continue;
    }
    found[i] = t;
  }
  for (std::size_t k = 0; k < file->tensors().size(); ++k) {
    if (used[k]) continue;
    const std::string& name = file->tensors()[k].name;
    auto ends_with = [&](const std::string& suffix) {
      return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    if (ends_with(".attn.bias") || ends_with(".attn.masked_bias") || name == "lm_head.weight") continue;
    problems.push_back("tensor \"" + lora::printable(name) + "\" is not part of a GPT-2 model with this config.json");
  }
  if (!problems.empty()) {
    std::string msg = path + ": not the GPT-2 model config.json describes:";
    for (const auto& p : problems) msg += "\n  " + p;
    throw lora::format_error(msg);
  }
  const st::Dtype own = std::is_same_v<S, float> ? st::Dtype::F32 : st::Dtype::F64;
  // Viewable: the scalar type itself, aligned; the rest is converted into one owned buffer.
  std::vector<bool> view(w.specs.size(), false);
  Index copied = 0;
  for (std::size_t i = 0; i < w.specs.size(); ++i) {
    view[i] = mode == LoadMode::view && found[i]->dtype == own &&
              reinterpret_cast<std::uintptr_t>(file->bytes(*found[i])) % alignof(S) == 0;
    if (!view[i]) copied += w.specs[i].size();
  }
  // Converted values go straight to where they will live (the model's own buffer, or one the views keep alive):
  // nothing is moved after the pointers into it are taken.
  auto converted = std::make_shared<Vec<S>>();
  Vec<S>& buffer = mode == LoadMode::copy ? w.owned : *converted;
  buffer.resize(mode == LoadMode::copy ? w.total_size() : copied);
  Index at = 0;
  w.data.resize(w.specs.size());
  for (std::size_t i = 0; i < w.specs.size(); ++i) {
    if (view[i]) {
      w.data[i] = reinterpret_cast<const S*>(file->bytes(*found[i]));
      continue;
    }
    S* out = buffer.data() + (mode == LoadMode::copy ? w.specs[i].offset : at);
    file->convert_into(*found[i], out);
    w.data[i] = out;
    at += w.specs[i].size();
  }
  if (mode != LoadMode::copy) {
    w.keep_alive = std::shared_ptr<const void>(
        new std::pair<std::shared_ptr<st::File>, std::shared_ptr<Vec<S>>>(file, converted), [](const void* p) {
          delete static_cast<const std::pair<std::shared_ptr<st::File>, std::shared_ptr<Vec<S>>>*>(p);
        });
  }
  for (std::size_t i = 0; i < w.specs.size(); ++i) {
    const S* p = w.data[i];
    for (Index k = 0; k < w.specs[i].size(); ++k)
      if (!std::isfinite(static_cast<double>(p[k])))
        throw lora::numeric_error(path + ": tensor \"" + w.specs[i].name + "\" holds a non-finite value at index " +
                                  std::to_string(k));
  }
  return w;
}

/// Writes config.json and model.safetensors into `dir` (created when missing); each file replaces its old
/// version only once both have been written in full.
template <class S>
void save_model(const std::string& dir, const Weights<S>& w) {
  namespace st = lora::safetensors;
  std::filesystem::create_directories(dir);
  st::Writer writer;
  writer.set_metadata("format", "pt");
  for (std::size_t i = 0; i < w.specs.size(); ++i) {
    const TensorSpec& s = w.specs[i];
    const Index rows = s.shape.size() == 2 ? s.shape[0] : 1, cols = s.shape.back();
    writer.add(s.name, ConstMap<S>(w.data[i], rows, cols), st::Dtype::F32,
               std::vector<std::uint64_t>(s.shape.begin(), s.shape.end()));
  }
  const std::string json = w.config.to_json().dump(2) + "\n";
  auto config = lora::detail::StagedFile((std::filesystem::path(dir) / "config.json").string(),
                                         [&](lora::detail::FileSink& sink) { sink.write(json.data(), json.size()); });
  auto model = writer.stage((std::filesystem::path(dir) / "model.safetensors").string());
  model.commit();
  config.commit();
}

}  // namespace gpt
