// Training checkpoints: all a run needs to continue bit for bit, in one
// safetensors file written atomically.
//
//   lora::TrainingState state;  // or, to resume: auto state = lora::load_checkpoint(path, model, opt);
//   for (; state.step < total; ++state.step) {
//     if (state.step > 0 && state.step % 1000 == 0) lora::save_checkpoint(path, model, opt, state);
//     opt.set_lr(base_lr * lora::cosine_schedule_with_warmup(state.step, warmup, total));
//     ... batch (state.epoch, state.batch): forward, backward, clip, opt.step(), opt.zero_grad() ...
//     ... advance state.batch, and state.epoch at the end of an epoch ...
//   }
//
// The model is a Sequential<S>, a LoRALinear<S>, or a std::map<std::string,
// LoRALinear<S>*> from module path to layer (as peft::save_adapter takes);
// the optimizer an AdamW<S> or SGD<S> built over exactly the model's
// trainable tensors, in any order. The frozen W and b are not saved (they
// come from the base model): a 64-bit fingerprint of each layer's frozen
// tensors checks that the checkpoint is loaded onto the same base. Gradients are not saved:
// save between optimizer steps; loading sets them to zero.
//
// Format. S is F32 for float, F64 for double. A layer is named "<L>": its
// index in a Sequential ("0", "2", ...), its module path in a map, "" for a
// lone LoRALinear, and "<L>." below is empty for "". A parameter <P> is
// "<L>.lora_A", "<L>.lora_B" or "<L>.bias", as Sequential::parameters() names
// them. Letters: I in_features, O out_features, R rank.
//
//   model.<L>.lora_A              S   [R, I]   A, only when R > 0
//   model.<L>.lora_B              S   [O, R]   B, only when R > 0
//   model.<L>.bias                S   [1, O]   b, only when the bias trains
//   model.<L>.dropout_rng         U64 [4]      the layer's dropout stream: xoshiro256++ state words
//   optimizer.exp_avg.<P>         S   as <P>   AdamW's m
//   optimizer.exp_avg_sq.<P>      S   as <P>   AdamW's v
//   optimizer.momentum_buffer.<P> S   as <P>   SGD's buffer, only when momentum != 0
//   __metadata__ {"lora_checkpoint": one JSON object, as a string:
//     "format_version"  1
//     "scalar"          "F32" or "F64"
//     "training"        {"step", "epoch", "batch": integers; "rng": string}: the TrainingState
//     "optimizer"       {"kind": "AdamW" or "SGD", "step": steps taken (AdamW's t; SGD: 0 until
//                       its first step, which fills the buffers), "hyperparameters": AdamW
//                       {"lr", "beta1", "beta2", "eps", "weight_decay"} or SGD {"lr", "momentum",
//                       "dampening", "weight_decay", "nesterov" (boolean)}; lr is the current one}
//     "layers"          {"<L>": {"in_features", "out_features", "r", "scaling", "lora_dropout",
//                       "base": 16 hex digits, the fingerprint of the frozen W (and b, when b
//                       exists and does not train)}}}
//
// Numbers in the JSON are written shortest-round-trip, so each double reads
// back exactly. Loading checks the whole file against the model and the
// optimizer before it changes anything, and lists every mismatch at once
// (format_error with what was expected and what came): tensor names, dtypes
// and shapes, the optimizer kind and its hyperparameter keys, the layers'
// shapes, scaling, dropout and base. The file's hyperparameters and step
// count then replace the optimizer's, as torch's load_state_dict does.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/errors.hpp>
#include <lora/linear.hpp>
#include <lora/optim.hpp>
#include <lora/params.hpp>
#include <lora/safetensors.hpp>
#include <lora/sequential.hpp>
#include <lora/types.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace lora {

/// Where the training loop stands, saved beside the model and optimizer.
struct TrainingState {
  long step = 0;    ///< scheduler (global) steps taken: the step to pass to a schedule next; >= 0
  long epoch = 0;   ///< the caller's data position: epoch ...
  long batch = 0;   ///< ... and the next batch within it
  std::string rng;  ///< the caller's own generator as text, e.g. `out << engine` / `in >> engine` for a std engine
};

inline constexpr int checkpoint_format_version = 1;

namespace detail {

template <class>
inline constexpr bool checkpoint_unsupported = false;

/// The model forms a checkpoint takes, each with its Scalar and its layers.
template <class Model>
struct CheckpointModel {
  static_assert(checkpoint_unsupported<Model>,
                "lora checkpoints take a Sequential<S>, a LoRALinear<S> or a std::map<std::string, LoRALinear<S>*>");
};

template <class Scalar>
struct NamedLayer {
  std::string name;  ///< "<L>" of the format
  LoRALinear<Scalar>* layer;
  std::string prefix() const { return name.empty() ? name : name + '.'; }
};

template <class S>
struct CheckpointModel<Sequential<S>> {
  using Scalar = S;
  static std::vector<NamedLayer<S>> layers(Sequential<S>& model) {
    std::vector<NamedLayer<S>> out;
    for (std::size_t i = 0; i < model.size(); ++i)
      if (auto* l = std::get_if<LoRALinear<S>>(&model[i])) out.push_back({std::to_string(i), l});
    return out;
  }
};

template <class S>
struct CheckpointModel<LoRALinear<S>> {
  using Scalar = S;
  static std::vector<NamedLayer<S>> layers(LoRALinear<S>& layer) { return {{std::string(), &layer}}; }
};

template <class S>
struct CheckpointModel<std::map<std::string, LoRALinear<S>*>> {
  using Scalar = S;
  static std::vector<NamedLayer<S>> layers(const std::map<std::string, LoRALinear<S>*>& model) {
    std::vector<NamedLayer<S>> out;
    std::set<const LoRALinear<S>*> seen;
    for (const auto& [path, layer] : model) {
      if (path.empty()) throw config_error("checkpoint: a module path of the model is empty");
      if (layer == nullptr) throw config_error("checkpoint: module \"" + path + "\" is a null pointer");
      if (!seen.insert(layer).second)
        throw config_error("checkpoint: module \"" + path + "\" is a layer the model already holds under another path");
      out.push_back({path, layer});
    }
    return out;
  }
};

/// The optimizers a checkpoint takes: their kind, hyperparameters and state buffers.
template <class Optimizer>
struct CheckpointOptimizer {
  static_assert(checkpoint_unsupported<Optimizer>, "lora checkpoints take an AdamW<S> or an SGD<S>");
};

template <class S>
struct CheckpointOptimizer<AdamW<S>> {
  using Scalar = S;
  using Options = typename AdamW<S>::Options;
  using State = typename AdamW<S>::State;
  static constexpr const char* kind = "AdamW";
  static std::vector<const char*> hyperparameter_keys() { return {"beta1", "beta2", "eps", "lr", "weight_decay"}; }
  static std::vector<std::pair<const char*, double>> numbers(const Options& o) {
    return {{"lr", o.lr}, {"beta1", o.beta1}, {"beta2", o.beta2}, {"eps", o.eps}, {"weight_decay", o.weight_decay}};
  }
  static nlohmann::ordered_json hyperparameters(const Options& o) {
    nlohmann::ordered_json j;
    for (const auto& [key, value] : numbers(o)) j[key] = value;
    return j;
  }
  /// Reads the keys hyperparameter_keys() names (checked present); `number` / `boolean` read one.
  template <class Number, class Boolean>
  static Options read(Number&& number, Boolean&&) {
    Options o;
    o.lr = number("lr");
    o.beta1 = number("beta1");
    o.beta2 = number("beta2");
    o.eps = number("eps");
    o.weight_decay = number("weight_decay");
    return o;
  }
  /// The state's buffers by the name the format gives them (const or not, as `s`).
  template <class StateRef>
  static auto buffers(StateRef& s) {
    return std::vector<std::pair<const char*, decltype(&s.exp_avg)>>{{"exp_avg", &s.exp_avg},
                                                                     {"exp_avg_sq", &s.exp_avg_sq}};
  }
};

template <class S>
struct CheckpointOptimizer<SGD<S>> {
  using Scalar = S;
  using Options = typename SGD<S>::Options;
  using State = typename SGD<S>::State;
  static constexpr const char* kind = "SGD";
  static std::vector<const char*> hyperparameter_keys() {
    return {"dampening", "lr", "momentum", "nesterov", "weight_decay"};
  }
  static std::vector<std::pair<const char*, double>> numbers(const Options& o) {
    return {{"lr", o.lr}, {"momentum", o.momentum}, {"dampening", o.dampening}, {"weight_decay", o.weight_decay}};
  }
  static nlohmann::ordered_json hyperparameters(const Options& o) {
    nlohmann::ordered_json j;
    for (const auto& [key, value] : numbers(o)) j[key] = value;
    j["nesterov"] = o.nesterov;
    return j;
  }
  template <class Number, class Boolean>
  static Options read(Number&& number, Boolean&& boolean) {
    Options o;
    o.lr = number("lr");
    o.momentum = number("momentum");
    o.dampening = number("dampening");
    o.weight_decay = number("weight_decay");
    o.nesterov = boolean("nesterov");
    return o;
  }
  /// None without momentum, as the optimizer keeps none.
  template <class StateRef>
  static auto buffers(StateRef& s) {
    std::vector<std::pair<const char*, decltype(&s.momentum_buffer)>> out;
    if (s.options.momentum != 0) out.push_back({"momentum_buffer", &s.momentum_buffer});
    return out;
  }
};

/// A fingerprint of bytes, 8-byte little-endian words at a time (the last
/// zero-padded): h = rotl(h + w·P2, 31)·P1 per word (xxHash64's round), then
/// the byte count mixed in and splitmix64's finalizer. Not cryptographic: it
/// catches a checkpoint loaded onto the wrong base, not a forged one.
inline std::uint64_t fingerprint(std::uint64_t h, const void* data, std::size_t n) {
  constexpr std::uint64_t P1 = 0x9E3779B185EBCA87ull, P2 = 0xC2B2AE3D27D4EB4Full;
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; i += 8) {
    std::uint64_t w = 0;
    std::memcpy(&w, p + i, std::min<std::size_t>(8, n - i));
    h += w * P2;
    h = (h << 31) | (h >> 33);
    h *= P1;
  }
  h ^= n;
  h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
  h = (h ^ (h >> 27)) * 0x94D049BB133111EBull;
  return h ^ (h >> 31);
}

/// The fingerprint of a layer's frozen tensors: W as stored (and its layout, when (I, O)), and b when it exists
/// and does not train.
template <class Scalar>
std::string base_fingerprint(const LoRALinear<Scalar>& layer) {
  const auto& frozen = layer.frozen_weight();
  std::uint64_t h = 0;
  if (const LowPrecisionStorage* q = frozen.is_quantized() ? frozen.low_precision() : nullptr) {
    // bf16, q8_0, NF4, ...: the format's name and the values it decodes to, row by row (no dense copy of W).
    const std::string format = format_name(q->format());
    h = fingerprint(h, format.data(), format.size());
    std::vector<float> row(static_cast<std::size_t>(q->cols()));
    for (Index r = 0; r < q->rows(); ++r) {
      q->decode(r, 0, q->cols(), row.data());
      h = fingerprint(h, row.data(), row.size() * sizeof(float));
    }
  } else {
    const auto W = frozen.stored();
    h = fingerprint(h, W.data(), static_cast<std::size_t>(W.size()) * sizeof(Scalar));
  }
  if (layer.weight_layout() == WeightLayout::in_out) {
    const char tag[] = "in_out";
    h = fingerprint(h, tag, sizeof tag - 1);
  }
  if (layer.has_bias() && !layer.bias_trainable()) {
    const auto b = layer.bias();
    h = fingerprint(h, b.data(), static_cast<std::size_t>(b.size()) * sizeof(Scalar));
  }
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(h));
  return text;
}

/// One tensor the checkpoint of a model and optimizer holds.
struct ExpectedTensor {
  safetensors::Dtype dtype;
  std::vector<std::uint64_t> shape;
};

inline std::string tensor_text(safetensors::Dtype dtype, const std::vector<std::uint64_t>& shape) {
  return std::string(safetensors::dtype_name(dtype)) + " " + safetensors::shape_text(shape);
}

/// The model's trainable tensors, named <P> as the format says, and the
/// optimizer's index of each (the optimizer must hold exactly these, in any order).
template <class Scalar>
struct Bound {
  std::vector<NamedLayer<Scalar>> layers;
  ParameterList<Scalar> params;        ///< in the model's order, with full names
  std::vector<std::size_t> opt_index;  ///< opt_index[i]: params[i] in optimizer.parameters()
};

template <class Scalar, class Optimizer>
Bound<Scalar> bind_optimizer(const char* where, std::vector<NamedLayer<Scalar>> layers, const Optimizer& opt) {
  Bound<Scalar> b;
  b.layers = std::move(layers);
  for (const auto& l : b.layers)
    for (auto p : l.layer->parameters()) {
      p.name = l.prefix() + p.name;
      b.params.push_back(std::move(p));
    }
  const ParameterList<Scalar>& held = opt.parameters();
  std::map<const Scalar*, std::size_t> by_value;
  for (std::size_t k = 0; k < held.size(); ++k)
    if (!by_value.emplace(held[k].value, k).second)
      throw config_error(std::string(where) + ": the optimizer holds the tensor \"" + held[k].name + "\" twice");
  for (const auto& p : b.params) {
    auto it = by_value.find(p.value);
    if (it == by_value.end() || held[it->second].size() != p.size())
      throw config_error(std::string(where) + ": the model's trainable tensor \"" + p.name +
                         "\" is not one the optimizer updates; build the optimizer from the model's parameters()");
    b.opt_index.push_back(it->second);
  }
  if (held.size() != b.params.size())
    throw config_error(std::string(where) + ": the optimizer updates " + std::to_string(held.size()) +
                       " tensors, the model has " + std::to_string(b.params.size()) +
                       " trainable ones; build the optimizer from the model's parameters()");
  return b;
}

template <class Scalar>
constexpr safetensors::Dtype scalar_dtype() {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "lora checkpoints hold float or double tensors");
  return std::is_same_v<Scalar, float> ? safetensors::Dtype::F32 : safetensors::Dtype::F64;
}

inline std::vector<std::uint64_t> matrix_shape(const Index rows, const Index cols) {
  return {static_cast<std::uint64_t>(rows), static_cast<std::uint64_t>(cols)};
}

/// Every tensor a checkpoint of `b` holds, with optimizer buffers `buffer_names`.
template <class Scalar>
std::map<std::string, ExpectedTensor> expected_tensors(const Bound<Scalar>& b,
                                                       const std::vector<std::string>& buffer_names) {
  constexpr auto dtype = scalar_dtype<Scalar>();
  std::map<std::string, ExpectedTensor> out;
  for (const auto& l : b.layers) out["model." + l.prefix() + "dropout_rng"] = {safetensors::Dtype::U64, {4}};
  for (const auto& p : b.params) {
    out["model." + p.name] = {dtype, matrix_shape(p.rows, p.cols)};
    for (const auto& buffer : buffer_names)
      out["optimizer." + buffer + "." + p.name] = {dtype, matrix_shape(p.rows, p.cols)};
  }
  return out;
}

/// Throws format_error "<head>N problem(s):" and one line per problem, when there are any.
inline void throw_checkpoint_problems(const std::string& head, const std::vector<std::string>& problems) {
  if (problems.empty()) return;
  std::string message = head + std::to_string(problems.size()) + " problem(s):";
  for (const auto& p : problems) message += "\n  " + p;
  throw format_error(message);
}

/// Typed reads of the metadata JSON; a wrong type or a missing key is a format_error naming the key.
class JsonReader {
 public:
  explicit JsonReader(std::string source) : source_(std::move(source)) {}

  [[noreturn]] void fail(const std::string& what) const { throw format_error(source_ + ": " + what); }

  const nlohmann::json& member(const nlohmann::json& object, const std::string& where, const char* key) const {
    auto it = object.find(key);
    if (it == object.end()) fail(where + ": missing \"" + key + "\"");
    return *it;
  }
  const nlohmann::json& object(const nlohmann::json& parent, const std::string& where, const char* key) const {
    const auto& v = member(parent, where, key);
    if (!v.is_object()) fail(where + "." + key + ": expected an object, got " + v.type_name());
    return v;
  }
  long integer(const nlohmann::json& parent, const std::string& where, const char* key, long min) const {
    const auto& v = member(parent, where, key);
    const std::string name = where + "." + key;
    long out = 0;
    if (v.is_number_unsigned()) {
      if (v.get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<long>::max()))
        fail(name + ": expected an integer that fits a long, got " + v.dump());
      out = static_cast<long>(v.get<std::uint64_t>());
    } else if (v.is_number_integer()) {
      const std::int64_t i = v.get<std::int64_t>();
      if (i < std::numeric_limits<long>::min()) fail(name + ": expected an integer that fits a long, got " + v.dump());
      out = static_cast<long>(i);
    } else {
      fail(name + ": expected an integer, got " + std::string(v.type_name()));
    }
    if (out < min) fail(name + ": expected an integer >= " + std::to_string(min) + ", got " + std::to_string(out));
    return out;
  }
  double number(const nlohmann::json& parent, const std::string& where, const char* key) const {
    const auto& v = member(parent, where, key);
    if (!v.is_number()) fail(where + "." + key + ": expected a number, got " + v.type_name());
    return v.get<double>();
  }
  bool boolean(const nlohmann::json& parent, const std::string& where, const char* key) const {
    const auto& v = member(parent, where, key);
    if (!v.is_boolean()) fail(where + "." + key + ": expected true or false, got " + v.type_name());
    return v.get<bool>();
  }
  std::string string(const nlohmann::json& parent, const std::string& where, const char* key) const {
    const auto& v = member(parent, where, key);
    if (!v.is_string()) fail(where + "." + key + ": expected a string, got " + v.type_name());
    return v.get<std::string>();
  }
  /// Refuses an object whose keys are not exactly `keys` (sorted), naming both sets.
  void exact_keys(const nlohmann::json& object, const std::string& where, std::vector<const char*> keys) const {
    std::string want, got;
    for (const char* k : keys) want += (want.empty() ? "" : ", ") + std::string(k);
    for (const auto& item : object.items()) got += (got.empty() ? "" : ", ") + printable(item.key());
    if (want != got) fail(where + ": expected the keys " + want + "; got " + (got.empty() ? "none" : got));
  }

 private:
  std::string source_;
};

inline constexpr const char* checkpoint_metadata_key = "lora_checkpoint";
inline constexpr int checkpoint_max_json_depth = 8;  // the format nests 3 deep

}  // namespace detail

/// Writes a checkpoint of `model`, `opt` and `state` to `path` (a temporary
/// file beside it, flushed, fsync'ed and renamed into place: a failed save
/// leaves an older checkpoint at `path` as it was). Throws config_error when
/// `opt` does not update exactly the model's trainable tensors or `state.step`
/// is negative, state_error for a merged layer, io_error when the write fails.
template <class Model, class Optimizer>
void save_checkpoint(const std::string& path, const Model& model, const Optimizer& opt, const TrainingState& state) {
  using Traits = detail::CheckpointOptimizer<Optimizer>;
  using Scalar = typename detail::CheckpointModel<Model>::Scalar;
  static_assert(std::is_same_v<Scalar, typename Traits::Scalar>,
                "save_checkpoint: the model and the optimizer must have the same Scalar");
  const char* where = "save_checkpoint";
  // parameters() hands out writable views, so layers() takes the model non-const; nothing here writes through them.
  const auto b = detail::bind_optimizer(where, detail::CheckpointModel<Model>::layers(const_cast<Model&>(model)), opt);
  if (state.step < 0)
    throw config_error(std::string(where) + ": TrainingState::step counts steps taken and must be >= 0, got " +
                       std::to_string(state.step));
  for (const auto& l : b.layers)
    if (l.layer->is_merged())
      throw state_error(std::string(where) + ": layer \"" + l.name +
                        "\" is merged (W holds s·B·A); unmerge() before saving, so W is the base again");
  const auto& s = opt.state();
  for (const auto& [key, value] : Traits::numbers(s.options))
    if (!std::isfinite(value))
      throw config_error(std::string(where) + ": the optimizer's " + key + " is " + value_string(value) +
                         "; a checkpoint holds finite hyperparameters only");

  nlohmann::ordered_json meta;
  meta["format_version"] = checkpoint_format_version;
  meta["scalar"] = safetensors::dtype_name(detail::scalar_dtype<Scalar>());
  meta["training"] = {{"step", state.step}, {"epoch", state.epoch}, {"batch", state.batch}, {"rng", state.rng}};
  meta["optimizer"] = {
      {"kind", Traits::kind}, {"step", s.step}, {"hyperparameters", Traits::hyperparameters(s.options)}};
  nlohmann::ordered_json layers = nlohmann::ordered_json::object();
  for (const auto& l : b.layers) {
    const auto& c = l.layer->config();
    layers[l.name] = {{"in_features", l.layer->in_features()},
                      {"out_features", l.layer->out_features()},
                      {"r", l.layer->rank()},
                      {"scaling", c.scaling()},
                      {"lora_dropout", c.lora_dropout},
                      {"base", detail::base_fingerprint(*l.layer)}};
  }
  meta["layers"] = std::move(layers);

  safetensors::Writer writer;
  constexpr auto dtype = detail::scalar_dtype<Scalar>();
  auto bytes_of = [](const Scalar* p) { return reinterpret_cast<const std::uint8_t*>(p); };
  std::vector<std::array<std::uint64_t, 4>> rng_words;  // borrowed by the writer until save()
  rng_words.reserve(b.layers.size());
  try {
    writer.set_metadata(detail::checkpoint_metadata_key, meta.dump());
    for (const auto& l : b.layers) {
      rng_words.push_back(l.layer->dropout_rng_state());
      writer.add_bytes("model." + l.prefix() + "dropout_rng", safetensors::Dtype::U64, {4},
                       reinterpret_cast<const std::uint8_t*>(rng_words.back().data()), sizeof(rng_words.back()));
    }
    for (std::size_t i = 0; i < b.params.size(); ++i) {
      const auto& p = b.params[i];
      const auto bytes = static_cast<std::size_t>(p.size()) * sizeof(Scalar);
      writer.add_bytes("model." + p.name, dtype, detail::matrix_shape(p.rows, p.cols), bytes_of(p.value), bytes);
      for (const auto& [name, buffers] : Traits::buffers(s))
        writer.add_bytes("optimizer." + std::string(name) + "." + p.name, dtype, detail::matrix_shape(p.rows, p.cols),
                         bytes_of((*buffers)[b.opt_index[i]].data()), bytes);
    }
    writer.save(path);
  } catch (const nlohmann::json::exception& e) {  // a name or TrainingState::rng that is not UTF-8
    throw config_error(std::string(where) + ": " + path + ": " + e.what());
  }
}

namespace detail {

/// load_checkpoint_file's default `check`: accepts every checkpoint.
struct AcceptCheckpoint {
  void operator()(const TrainingState&) const {}
};

/// load_checkpoint(path, model, opt) over the safetensors::File that `open()` returns, called once the model has
/// been checked (bound to the optimizer, nothing merged): File::open(path) there, the bytes rank 0 sent in the
/// data-parallel load_checkpoint. `check(training)` runs on the file's TrainingState once the file has been parsed
/// and matched against the model and the optimizer, before a tensor is read or anything changes: whatever it
/// throws leaves both as they were (the data-parallel load_checkpoint refuses other options there). `path` names
/// the checkpoint in every message.
template <class Model, class Optimizer, class Open, class Check = AcceptCheckpoint>
TrainingState load_checkpoint_file(const std::string& path, Model& model, Optimizer& opt, Open&& open,
                                   Check&& check = Check{}) {
  using Traits = detail::CheckpointOptimizer<Optimizer>;
  using Scalar = typename detail::CheckpointModel<Model>::Scalar;
  static_assert(std::is_same_v<Scalar, typename Traits::Scalar>,
                "load_checkpoint: the model and the optimizer must have the same Scalar");
  using json = nlohmann::json;
  constexpr auto dtype = detail::scalar_dtype<Scalar>();
  const auto b = detail::bind_optimizer("load_checkpoint", detail::CheckpointModel<Model>::layers(model), opt);
  for (const auto& l : b.layers)
    if (l.layer->is_merged())
      throw state_error("load_checkpoint: layer \"" + l.name + "\" is merged; unmerge() before loading");

  const safetensors::File file = open();
  const detail::JsonReader read(path);
  auto meta_it = file.metadata().find(detail::checkpoint_metadata_key);
  if (meta_it == file.metadata().end())
    read.fail(std::string("not a lora checkpoint: its __metadata__ has no \"") + detail::checkpoint_metadata_key +
              "\" (a PEFT adapter is read with peft::load_adapter)");
  json meta;
  try {
    meta = json::parse(meta_it->second, [&](int depth, json::parse_event_t, json&) {
      if (depth > detail::checkpoint_max_json_depth)
        read.fail("\"lora_checkpoint\" nests more than " + std::to_string(detail::checkpoint_max_json_depth) +
                  " levels deep");
      return true;
    });
  } catch (const json::exception& e) {
    read.fail("\"lora_checkpoint\" is not valid JSON: " + printable(std::string(e.what()).substr(0, 200)));
  }
  if (!meta.is_object()) read.fail(std::string("\"lora_checkpoint\" must be a JSON object, got ") + meta.type_name());
  const std::string root = "lora_checkpoint";
  if (const long version = read.integer(meta, root, "format_version", 0); version != checkpoint_format_version)
    read.fail("format_version: expected " + std::to_string(checkpoint_format_version) + ", got " +
              std::to_string(version) + " (written by another version of the library)");

  std::vector<std::string> problems;
  if (const auto scalar = read.string(meta, root, "scalar"); scalar != safetensors::dtype_name(dtype))
    problems.push_back(std::string("scalar: expected ") + safetensors::dtype_name(dtype) + ", got \"" +
                       printable(scalar) + "\"");

  // The optimizer: its state is built here and handed over only once everything passed.
  const auto& o = read.object(meta, root, "optimizer");
  const std::string kind = read.string(o, root + ".optimizer", "kind");
  const bool same_kind = kind == Traits::kind;
  typename Traits::State state;
  if (!same_kind) {
    problems.push_back(std::string("optimizer: expected ") + Traits::kind + ", got \"" + printable(kind) + "\"");
  } else {
    const std::string where = root + ".optimizer.hyperparameters";
    const auto& h = read.object(o, root + ".optimizer", "hyperparameters");
    read.exact_keys(h, where, Traits::hyperparameter_keys());
    state.options = Traits::read([&](const char* key) { return read.number(h, where, key); },
                                 [&](const char* key) { return read.boolean(h, where, key); });
    try {
      Optimizer::check_options(state.options, where.c_str());
    } catch (const config_error& e) {
      read.fail(e.what());
    }
    state.step = read.integer(o, root + ".optimizer", "step", 0);
  }

  const auto& t = read.object(meta, root, "training");
  TrainingState training;
  training.step = read.integer(t, root + ".training", "step", 0);
  training.epoch = read.integer(t, root + ".training", "epoch", std::numeric_limits<long>::min());
  training.batch = read.integer(t, root + ".training", "batch", std::numeric_limits<long>::min());
  training.rng = read.string(t, root + ".training", "rng");

  // The layers: the same names, shapes, scaling, dropout and base.
  const auto& layers = read.object(meta, root, "layers");
  std::set<std::string> model_layers;
  for (const auto& l : b.layers) {
    model_layers.insert(l.name);
    auto it = layers.find(l.name);
    const std::string name = "layer \"" + printable(l.name) + "\"";
    if (it == layers.end()) {
      problems.push_back("missing: " + name);
      continue;
    }
    if (!it->is_object()) read.fail(root + ".layers." + printable(l.name) + ": expected an object");
    const std::string where = root + ".layers." + printable(l.name);
    const auto& c = l.layer->config();
    auto compare = [&](const char* what, const std::string& expected, const std::string& got) {
      if (expected != got) problems.push_back(name + ": " + what + " expected " + expected + ", got " + got);
    };
    compare("in_features", std::to_string(l.layer->in_features()),
            std::to_string(read.integer(*it, where, "in_features", 0)));
    compare("out_features", std::to_string(l.layer->out_features()),
            std::to_string(read.integer(*it, where, "out_features", 0)));
    compare("r", std::to_string(l.layer->rank()), std::to_string(read.integer(*it, where, "r", 0)));
    // Exact: a run resumed with another scaling or dropout would not continue the saved one.
    if (const double scaling = read.number(*it, where, "scaling"); scaling != c.scaling())
      problems.push_back(name + ": scaling expected " + value_string(c.scaling()) + " (lora_alpha / r), got " +
                         value_string(scaling));
    if (const double dropout = read.number(*it, where, "lora_dropout"); dropout != c.lora_dropout)
      problems.push_back(name + ": lora_dropout expected " + value_string(c.lora_dropout) + ", got " +
                         value_string(dropout));
    compare("base (fingerprint of the frozen W and b)", detail::base_fingerprint(*l.layer),
            printable(read.string(*it, where, "base")));
  }
  for (const auto& item : layers.items())
    if (!model_layers.count(item.key())) problems.push_back("unexpected: layer \"" + printable(item.key()) + "\"");

  // The tensors: exactly the expected names, each of the expected dtype and shape.
  std::vector<std::string> buffer_names;
  for (const auto& [name, buffers] : Traits::buffers(state)) buffer_names.push_back(name);
  if (!same_kind) buffer_names.clear();
  const auto expected = detail::expected_tensors(b, buffer_names);
  std::set<std::string> in_file;
  for (const auto& info : file.tensors()) {
    in_file.insert(info.name);
    auto it = expected.find(info.name);
    if (it == expected.end()) {
      if (same_kind || info.name.rfind("optimizer.", 0) != 0)
        problems.push_back("unexpected: " + printable(info.name) + " (" + detail::tensor_text(info.dtype, info.shape) +
                           ")");
    } else if (info.dtype != it->second.dtype || info.shape != it->second.shape) {
      problems.push_back(printable(info.name) + ": expected " +
                         detail::tensor_text(it->second.dtype, it->second.shape) + ", got " +
                         detail::tensor_text(info.dtype, info.shape));
    }
  }
  for (const auto& [name, e] : expected)
    if (!in_file.count(name))
      problems.push_back("missing: " + name + " (" + detail::tensor_text(e.dtype, e.shape) + ")");
  detail::throw_checkpoint_problems(path + ": cannot resume this model and optimizer from it, ", problems);
  check(std::as_const(training));

  // Read everything into temporaries.
  std::vector<Vector<Scalar>> values(b.params.size());
  auto read_tensor = [&](const std::string& name, Vector<Scalar>& out, Index size) {
    out.resize(size);
    const auto& info = file.at(name);
    file.read_bytes(info, 0, out.data(), static_cast<std::size_t>(size) * sizeof(Scalar));
  };
  for (std::size_t i = 0; i < b.params.size(); ++i)
    read_tensor("model." + b.params[i].name, values[i], b.params[i].size());
  for (const auto& [name, buffers] : Traits::buffers(state)) {
    buffers->resize(b.params.size());
    for (std::size_t i = 0; i < b.params.size(); ++i)
      read_tensor("optimizer." + std::string(name) + "." + b.params[i].name, (*buffers)[b.opt_index[i]],
                  b.params[i].size());
  }
  std::vector<std::array<std::uint64_t, 4>> rngs(b.layers.size());
  for (std::size_t i = 0; i < b.layers.size(); ++i) {
    const std::string name = "model." + b.layers[i].prefix() + "dropout_rng";
    file.read_bytes(file.at(name), 0, rngs[i].data(), sizeof(rngs[i]));
    if ((rngs[i][0] | rngs[i][1] | rngs[i][2] | rngs[i][3]) == 0)
      read.fail(printable(name) + ": the all-zero state, from which xoshiro256++ would draw only zeros");
  }
  file.check_unchanged();

  // Commit. load_state checks what was checked above, before it changes anything; the rest cannot fail.
  opt.load_state(std::move(state));
  for (std::size_t i = 0; i < b.params.size(); ++i) {
    const auto& p = b.params[i];
    std::memcpy(p.value, values[i].data(), static_cast<std::size_t>(p.size()) * sizeof(Scalar));
    std::fill(p.grad, p.grad + p.size(), Scalar(0));
  }
  for (std::size_t i = 0; i < b.layers.size(); ++i) b.layers[i].layer->set_dropout_rng_state(rngs[i]);
  return training;
}

}  // namespace detail

/// Loads a checkpoint written by save_checkpoint into `model` and `opt` and
/// returns its TrainingState. Everything is read and checked before anything
/// changes: on any error (format_error for a file that is not a checkpoint of
/// this model and optimizer, listing every mismatch; io_error; config_error as
/// for save_checkpoint) the model and the optimizer are left as they were.
/// On success the trainable tensors, the dropout streams, the optimizer's
/// whole state (hyperparameters, the current lr included, and its step count)
/// are the file's, and the gradients are zero.
template <class Model, class Optimizer>
TrainingState load_checkpoint(const std::string& path, Model& model, Optimizer& opt) {
  return detail::load_checkpoint_file(path, model, opt,
                                      [&] { return safetensors::File::open(path, safetensors::Access::read); });
}

}  // namespace lora
