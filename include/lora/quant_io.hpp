// Low-precision weights in safetensors files: BF16 / F16 tensors viewed in
// place, and NF4 weights in the layout transformers saves for a bitsandbytes
// 4-bit model (what PEFT's QLoRA users have on disk).
//
// bitsandbytes' layout, for a weight named W (e.g. "model.layers.0.mlp.down_proj.weight"):
//   W                                      U8 (ceil(n / 2), 1)  two NF4 codes a byte, element 2k in the high nibble
//   W.absmax                               F32 (blocks)         or U8 (blocks) when double-quantised
//   W.quant_map                            F32 (16)             the NF4 code table
//   W.nested_absmax                        F32 (ceil(blocks / nested_blocksize))   double quantisation only
//   W.nested_quant_map                     F32 (256)                               double quantisation only
//   W.quant_state.bitsandbytes__nf4        U8 (bytes)           JSON: {"quant_type": "nf4", "blocksize": 64,
//                                                               "dtype": "float32", "shape": [O, I],
//                                                               "nested_blocksize": 256, "nested_dtype": "float32",
//                                                               "nested_offset": ...} (json.dumps' spacing)
// Only NF4 is read ("fp4" and any other tag is refused, naming it).
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/errors.hpp>
#include <lora/quant.hpp>
#include <lora/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace lora::safetensors {

/// The 2-D tensor `name` of dtype F32, BF16 or F16 as a QuantizedMatrix viewing the file's bytes in place (no
/// copy, no conversion): valid while `file` (or a copy of it) lives. Throws format_error for another dtype or a
/// tensor that is not 2-D, state_error for a file opened with Access::read (nothing mapped).
inline QuantizedMatrix view_low_precision(const File& file, std::string_view name) {
  const TensorInfo& t = file.at(name);
  WeightFormat format;
  switch (t.dtype) {
    case Dtype::F32:
      format = WeightFormat::f32;
      break;
    case Dtype::BF16:
      format = WeightFormat::bf16;
      break;
    case Dtype::F16:
      format = WeightFormat::f16;
      break;
    default:
      throw format_error(file.source() + ": tensor \"" + std::string(name) + "\" is " + dtype_name(t.dtype) +
                         ", expected F32, BF16 or F16 to view in place");
  }
  if (t.shape.size() != 2)
    throw format_error(file.source() + ": tensor \"" + std::string(name) + "\" has " + std::to_string(t.shape.size()) +
                       " dimensions, expected 2 (a weight matrix)");
  return QuantizedMatrix::view(format, file.bytes(t), static_cast<Index>(t.shape[0]), static_cast<Index>(t.shape[1]));
}

namespace detail_nf4 {

inline std::string suffix_key(const std::string& weight) { return weight + ".quant_state.bitsandbytes__nf4"; }

inline const TensorInfo& need(const File& f, const std::string& name, Dtype dtype, const std::string& what) {
  const TensorInfo* t = f.find(name);
  if (t == nullptr)
    throw format_error(f.source() + ": the NF4 weight needs tensor \"" + name + "\" (" + what + "), which is missing");
  if (t->dtype != dtype)
    throw format_error(f.source() + ": tensor \"" + name + "\" (" + what + ") is " + dtype_name(t->dtype) +
                       ", expected " + dtype_name(dtype));
  return *t;
}

inline std::vector<std::uint8_t> bytes_of(const File& f, const TensorInfo& t) {
  std::vector<std::uint8_t> out(static_cast<std::size_t>(t.nbytes()));
  if (!out.empty()) f.read_bytes(t, 0, out.data(), out.size());
  return out;
}
inline std::vector<float> floats_of(const File& f, const TensorInfo& t) {
  const auto raw = bytes_of(f, t);
  std::vector<float> out(raw.size() / 4);
  std::memcpy(out.data(), raw.data(), out.size() * 4);
  return out;
}

// The quant state of `weight` (its W.quant_state.bitsandbytes__nf4 tensor), parsed: format_error when it is
// missing, not U8, or not JSON.
inline nlohmann::json quant_state(const File& f, const std::string& weight) {
  const auto bytes = bytes_of(f, need(f, suffix_key(weight), Dtype::U8, "the quant state, JSON"));
  try {
    return nlohmann::json::parse(bytes.begin(), bytes.end());
  } catch (const nlohmann::json::exception& e) {
    throw format_error(f.source() + ": the quant state of \"" + weight + "\" is not JSON: " + e.what());
  }
}

// Python's repr of a double (the shortest text that reads back as the same double), as json.dumps writes it.
inline std::string python_float(double v) {
  char text[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(text, sizeof text, "%.*g", precision, v);
    if (std::strtod(text, nullptr) == v) break;
  }
  std::string s = text;
  const auto e = s.find('e');
  if (e != std::string::npos) {  // Python: 1e-05, not 1e-5; a mantissa without '.' stays so
    std::string mant = s.substr(0, e), exp = s.substr(e + 1);
    const char sign = exp[0] == '-' ? '-' : '+';
    if (exp[0] == '-' || exp[0] == '+') exp = exp.substr(1);
    while (exp.size() > 1 && exp[0] == '0') exp = exp.substr(1);
    if (exp.size() < 2) exp = "0" + exp;
    return mant + "e" + sign + exp;
  }
  if (s.find('.') == std::string::npos) s += ".0";
  return s;
}

}  // namespace detail_nf4

/// The dtype a bitsandbytes 4-bit weight computes in, from its quant state's "dtype" ("float32", "bfloat16",
/// "float16"): what dequantising it gives in PyTorch. Throws format_error for another value or a missing state.
inline Dtype nf4_compute_dtype(const File& file, const std::string& weight) {
  const nlohmann::json state = detail_nf4::quant_state(file, weight);
  const std::string dtype = state.is_object() && state.contains("dtype") && state["dtype"].is_string()
                                ? state["dtype"].get<std::string>()
                                : std::string("(none)");
  if (dtype == "float32") return Dtype::F32;
  if (dtype == "bfloat16") return Dtype::BF16;
  if (dtype == "float16") return Dtype::F16;
  throw format_error(file.source() + ": the quant state of \"" + weight + "\" has dtype \"" + dtype +
                     "\", expected float32, bfloat16 or float16");
}

/// True when the file holds a bitsandbytes 4-bit weight named `weight` (its quant_state tensor exists).
inline bool has_nf4(const File& file, const std::string& weight) {
  return file.find(detail_nf4::suffix_key(weight)) != nullptr;
}

/// Reads the bitsandbytes NF4 weight `weight` (the packed tensor's name, e.g. "model.layers.0.mlp.down_proj.weight")
/// into a QuantizedMatrix of the saved shape (O, I), copying its tensors. Every tensor's dtype and size is checked
/// against the quant state (format_error / shape_error naming the tensor, what was expected and what came).
inline QuantizedMatrix read_nf4(const File& file, const std::string& weight) {
  using detail_nf4::need;
  const std::string& src = file.source();
  const nlohmann::json state = detail_nf4::quant_state(file, weight);
  const auto field = [&](const char* key) -> const nlohmann::json& {
    if (!state.is_object() || !state.contains(key))
      throw format_error(src + ": the quant state of \"" + weight + "\" has no \"" + key + "\"");
    return state[key];
  };
  const auto& type = field("quant_type");
  if (!type.is_string() || type.get<std::string>() != "nf4")
    throw format_error(src + ": \"" + weight + "\" is quantised as " + type.dump() +
                       "; only bitsandbytes' \"nf4\" is supported (not fp4 or other tags)");
  const auto& shape = field("shape");
  if (!shape.is_array() || shape.size() != 2 || !shape[0].is_number_unsigned() || !shape[1].is_number_unsigned())
    throw format_error(src + ": the quant state of \"" + weight + "\" has shape " + shape.dump() +
                       ", expected [out_features, in_features]");
  const auto& block = field("blocksize");
  if (!block.is_number_integer())
    throw format_error(src + ": the quant state of \"" + weight + "\" has blocksize " + block.dump());
  const Index rows = shape[0].get<Index>(), cols = shape[1].get<Index>(), block_size = block.get<Index>();

  const TensorInfo& packed_t = need(file, weight, Dtype::U8, "the packed 4-bit codes");
  const TensorInfo& map_t = need(file, weight + ".quant_map", Dtype::F32, "the NF4 code table");
  if (map_t.numel() != 16)
    throw shape_error(src + ": \"" + weight + ".quant_map\" has " + std::to_string(map_t.numel()) +
                      " values, expected 16");
  std::array<float, 16> code{};
  const auto map = detail_nf4::floats_of(file, map_t);
  std::copy(map.begin(), map.end(), code.begin());
  auto packed = detail_nf4::bytes_of(file, packed_t);
  const bool nested = state.contains("nested_offset");
  if (!nested) {
    const TensorInfo& absmax_t = need(file, weight + ".absmax", Dtype::F32, "the absmax of each block");
    return QuantizedMatrix::nf4(rows, cols, block_size, std::move(packed), detail_nf4::floats_of(file, absmax_t), code);
  }
  const auto& offset = field("nested_offset");
  const auto& nested_block = field("nested_blocksize");
  if (!offset.is_number() || !nested_block.is_number_integer())
    throw format_error(src + ": the quant state of \"" + weight + "\" has nested_offset " + offset.dump() +
                       " and nested_blocksize " + nested_block.dump() + ", expected numbers");
  const TensorInfo& absmax_t = need(file, weight + ".absmax", Dtype::U8, "the 8-bit quantised absmax of each block");
  const TensorInfo& nabs_t = need(file, weight + ".nested_absmax", Dtype::F32, "the absmax of each nested block");
  const TensorInfo& nmap_t = need(file, weight + ".nested_quant_map", Dtype::F32, "the 8-bit dynamic map");
  if (nmap_t.numel() != 256)
    throw shape_error(src + ": \"" + weight + ".nested_quant_map\" has " + std::to_string(nmap_t.numel()) +
                      " values, expected 256");
  std::array<float, 256> nested_code{};
  const auto nmap = detail_nf4::floats_of(file, nmap_t);
  std::copy(nmap.begin(), nmap.end(), nested_code.begin());
  return QuantizedMatrix::nf4_double(rows, cols, block_size, std::move(packed), detail_nf4::bytes_of(file, absmax_t),
                                     detail_nf4::floats_of(file, nabs_t), nested_code,
                                     static_cast<float>(offset.get<double>()), nested_block.get<Index>(), code);
}

/// Adds an NF4 matrix to `writer` under `weight` in bitsandbytes' layout (the tensors above, the quant state as
/// json.dumps writes it, "dtype": "float32"), copied into the writer.
inline void add_nf4(Writer& writer, const std::string& weight, const QuantizedMatrix& q) {
  if (q.format() != WeightFormat::nf4)
    throw config_error("safetensors::add_nf4(\"" + weight + "\"): the matrix is " + format_name(q.format()) +
                       ", expected nf4");
  const auto as_bytes = [](const void* p, std::size_t n) {
    const auto* b = static_cast<const std::uint8_t*>(p);
    return std::vector<std::uint8_t>(b, b + n);
  };
  writer.add_owned_bytes(weight, Dtype::U8, {q.data_bytes(), 1}, as_bytes(q.data(), q.data_bytes()));
  if (q.double_quant()) {
    writer.add_owned_bytes(weight + ".absmax", Dtype::U8, {q.absmax_q().size()}, q.absmax_q());
    writer.add_owned_bytes(weight + ".nested_absmax", Dtype::F32, {q.nested_absmax().size()},
                           as_bytes(q.nested_absmax().data(), 4 * q.nested_absmax().size()));
    writer.add_owned_bytes(weight + ".nested_quant_map", Dtype::F32, {256}, as_bytes(q.nested_code().data(), 4 * 256));
  } else {
    const auto absmax = q.absmax();
    writer.add_owned_bytes(weight + ".absmax", Dtype::F32, {absmax.size()}, as_bytes(absmax.data(), 4 * absmax.size()));
  }
  writer.add_owned_bytes(weight + ".quant_map", Dtype::F32, {16}, as_bytes(q.code().data(), 4 * 16));
  std::string json = "{\"quant_type\": \"nf4\", \"blocksize\": " + std::to_string(q.block_size()) +
                     ", \"dtype\": \"float32\", \"shape\": [" + std::to_string(q.rows()) + ", " +
                     std::to_string(q.cols()) + "]";
  if (q.double_quant())
    json += ", \"nested_blocksize\": " + std::to_string(q.nested_block_size()) +
            ", \"nested_dtype\": \"float32\", \"nested_offset\": " +
            detail_nf4::python_float(static_cast<double>(q.offset()));
  json += "}";
  writer.add_owned_bytes(detail_nf4::suffix_key(weight), Dtype::U8, {json.size()}, as_bytes(json.data(), json.size()));
}

namespace detail_nf4 {
// Registers this header's NF4 reading with safetensors::nf4_access() (peft::merge_adapter_file reads through it).
inline const bool registered = [] {
  Nf4Access& access = nf4_access();
  access.shape = [](const File& file, const std::string& weight) {
    const QuantizedMatrix q = read_nf4(file, weight);
    return std::pair<Index, Index>(q.rows(), q.cols());
  };
  access.decode = [](const File& file, const std::string& weight) { return read_nf4(file, weight).dequantize(); };
  access.compute_dtype = [](const File& file, const std::string& weight) { return nf4_compute_dtype(file, weight); };
  return true;
}();
}  // namespace detail_nf4

}  // namespace lora::safetensors
