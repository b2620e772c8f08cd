// GGUF: read and write the file format of ggml and llama.cpp (version 3),
// the format llama.cpp loads models and LoRA adapters from.
//
//   "GGUF"  u32 version (3)  i64 n_tensors  i64 n_kv
//   n_kv ×       key (string), i32 value type, value
//   n_tensors ×  name (string), u32 n_dims, i64 ne[n_dims], i32 ggml type, u64 offset
//   padding to the alignment, then the data section; each tensor's offset is
//   relative to its start and a multiple of the alignment
//
// Strings are a u64 byte count and the bytes (no terminator); an array is an
// i32 element type, a u64 count and the elements (an element that is itself
// an array carries its own type and count). Everything is little-endian. The
// alignment is the u32 value of "general.alignment", 32 when it is absent.
//
// Shapes: GGUF lists ne[0] first and ne[0] is the innermost (fastest-varying)
// dimension, the reverse of PyTorch. A PyTorch / row-major matrix (rows, cols)
// is stored with ne = {cols, rows}: W (O, I) of a Linear is ne = {I, O}.
// File::matrix() and Writer::add() do this reversal; TensorInfo::shape() gives
// the PyTorch order.
//
// The reader checks the whole header before it hands out anything and never
// allocates what the header merely claims: every count and string length is
// checked against the bytes left in the file first, element and byte counts
// and offsets are overflow-checked, tensors must be aligned, inside the data
// section and not overlap, names and keys unique, types known, bools 0 or 1,
// arrays nested at most max_array_depth deep. It also refuses what ggml's own
// reader refuses (versions other than 3, tensor names of 64 bytes or more,
// rows that are not whole blocks of a quantised type), so a file it accepts
// is one llama.cpp can open. A broken rule is a format_error
// "<file>: <what>". The writer lays files out as ggml's gguf_write_to_file
// does (tensors in the order added, each padded to the alignment), so the
// same content gives the same bytes; its Q8_0 is ggml's
// quantize_row_q8_0_ref, bit for bit.
//
// Include <lora/gguf.hpp> directly; <lora/lora.hpp> does not include it.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/detail/file.hpp>
#include <lora/errors.hpp>
#include <lora/quant.hpp>        // block_q8_0
#include <lora/safetensors.hpp>  // half / bfloat16 conversions, Access
#include <lora/types.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

namespace lora::gguf {

inline constexpr std::uint32_t version = 3;
inline constexpr std::uint32_t default_alignment = 32;
/// ggml's GGML_MAX_DIMS.
inline constexpr std::uint32_t max_dims = 4;
/// ggml keeps tensor names in char[GGML_MAX_NAME = 64] with the terminator.
inline constexpr std::size_t max_name_bytes = 63;
/// An array of arrays counts 2; deeper nesting is refused (ggml reads none).
inline constexpr int max_array_depth = 8;

using Access = lora::safetensors::Access;

// ---- value types -----------------------------------------------------------------

/// GGUF's metadata value types, with their numbers in the file.
enum class ValueType : std::uint32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};
inline constexpr std::uint32_t value_type_count = 13;

/// ggml's names: "u8", "i8", ..., "f64", "bool", "str", "arr".
inline const char* value_type_name(ValueType type) {
  static constexpr const char* names[] = {"u8",   "i8",  "u16", "i16", "u32", "i32", "f32",
                                          "bool", "str", "arr", "u64", "i64", "f64"};
  const auto i = static_cast<std::uint32_t>(type);
  return i < value_type_count ? names[i] : "unknown";
}

/// Bytes of one value in the file: 0 for strings and arrays (variable).
inline std::size_t value_type_size(ValueType type) {
  static constexpr std::size_t sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
  return sizes[static_cast<std::uint32_t>(type)];
}

namespace detail {
template <class T>
struct value_type_of;
template <>
struct value_type_of<std::uint8_t> : std::integral_constant<ValueType, ValueType::UINT8> {};
template <>
struct value_type_of<std::int8_t> : std::integral_constant<ValueType, ValueType::INT8> {};
template <>
struct value_type_of<std::uint16_t> : std::integral_constant<ValueType, ValueType::UINT16> {};
template <>
struct value_type_of<std::int16_t> : std::integral_constant<ValueType, ValueType::INT16> {};
template <>
struct value_type_of<std::uint32_t> : std::integral_constant<ValueType, ValueType::UINT32> {};
template <>
struct value_type_of<std::int32_t> : std::integral_constant<ValueType, ValueType::INT32> {};
template <>
struct value_type_of<float> : std::integral_constant<ValueType, ValueType::FLOAT32> {};
template <>
struct value_type_of<bool> : std::integral_constant<ValueType, ValueType::BOOL> {};
template <>
struct value_type_of<std::string> : std::integral_constant<ValueType, ValueType::STRING> {};
template <>
struct value_type_of<std::uint64_t> : std::integral_constant<ValueType, ValueType::UINT64> {};
template <>
struct value_type_of<std::int64_t> : std::integral_constant<ValueType, ValueType::INT64> {};
template <>
struct value_type_of<double> : std::integral_constant<ValueType, ValueType::FLOAT64> {};
}  // namespace detail

/// One metadata value: a scalar, a string, or an array (of scalars, of
/// strings, or of arrays). Numbers keep their exact bits (a NaN's payload too).
/// Built implicitly from the C++ type that names the GGUF type exactly:
/// std::uint32_t{32} is a u32, 1.5f an f32, 1.5 an f64, "llama" a str,
/// std::vector<float> an arr[f32], std::vector<Value> an arr[arr].
class Value {
 public:
  Value() = default;  // u8 0
  template <class T, class = std::void_t<decltype(detail::value_type_of<T>::value)>,
            class = std::enable_if_t<!std::is_same_v<T, std::string>>>
  Value(T v) : type_(detail::value_type_of<T>::value) {  // NOLINT: implicit by design
    std::uint64_t bits = 0;
    if constexpr (std::is_same_v<T, bool>) {
      bits = v ? 1 : 0;
    } else {
      std::memcpy(&bits, &v, sizeof v);
    }
    data_ = bits;
  }
  Value(std::string v) : type_(ValueType::STRING), data_(std::move(v)) {}  // NOLINT
  Value(const char* v) : Value(std::string(v)) {}                          // NOLINT
  template <class T, class = std::void_t<decltype(detail::value_type_of<T>::value)>>
  Value(const std::vector<T>& values)  // NOLINT
      : type_(ValueType::ARRAY), element_type_(detail::value_type_of<T>::value) {
    if constexpr (std::is_same_v<T, std::string>) {
      data_ = values;
    } else {
      std::vector<std::uint8_t> packed(values.size() * sizeof(T));
      for (std::size_t i = 0; i < values.size(); ++i) {
        if constexpr (std::is_same_v<T, bool>) {
          packed[i] = values[i] ? 1 : 0;
        } else {
          std::memcpy(packed.data() + i * sizeof(T), &values[i], sizeof(T));
        }
      }
      data_ = std::move(packed);
    }
  }
  /// An array of arrays; every element must be an array (config_error otherwise).
  Value(std::vector<Value> arrays) : type_(ValueType::ARRAY), element_type_(ValueType::ARRAY) {  // NOLINT
    for (const Value& a : arrays)
      if (!a.is_array())
        throw config_error(std::string("gguf::Value: an array of arrays holds a ") + value_type_name(a.type_));
    data_ = std::move(arrays);
  }

  /// An array of numbers or bools from its packed little-endian bytes (what
  /// the file holds); `packed.size()` must be a multiple of the element size.
  static Value packed_array(ValueType element_type, std::vector<std::uint8_t> packed) {
    const std::size_t width = element_type == ValueType::STRING || element_type == ValueType::ARRAY ? 0
                              : static_cast<std::uint32_t>(element_type) < value_type_count
                                  ? value_type_size(element_type)
                                  : 0;
    if (width == 0 || packed.size() % width != 0)
      throw config_error(std::string("gguf::Value::packed_array: ") + std::to_string(packed.size()) +
                         " bytes are not whole values of type " + value_type_name(element_type));
    Value v;
    v.type_ = ValueType::ARRAY;
    v.element_type_ = element_type;
    v.data_ = std::move(packed);
    return v;
  }

  ValueType type() const { return type_; }
  bool is_array() const { return type_ == ValueType::ARRAY; }
  /// The type of an array's elements (ARRAY for an array of arrays).
  ValueType element_type() const { return element_type_; }

  /// "u32", "str", "arr[f32]", "arr[arr]": the way messages name a value's type.
  std::string type_text() const {
    if (!is_array()) return value_type_name(type_);
    return std::string("arr[") + value_type_name(element_type_) + "]";
  }

  /// The number of elements of an array; 1 for anything else.
  std::size_t size() const {
    if (!is_array()) return 1;
    if (element_type_ == ValueType::STRING) return std::get<std::vector<std::string>>(data_).size();
    if (element_type_ == ValueType::ARRAY) return std::get<std::vector<Value>>(data_).size();
    return std::get<std::vector<std::uint8_t>>(data_).size() / value_type_size(element_type_);
  }

  /// The value as T, which must name its type exactly (format_error otherwise).
  template <class T>
  T get() const {
    constexpr ValueType want = detail::value_type_of<T>::value;
    if (type_ != want) throw format_error("the value is " + type_text() + ", expected " + value_type_name(want));
    if constexpr (std::is_same_v<T, std::string>) {
      return std::get<std::string>(data_);
    } else if constexpr (std::is_same_v<T, bool>) {
      return std::get<std::uint64_t>(data_) != 0;
    } else {
      T v;
      const std::uint64_t bits = std::get<std::uint64_t>(data_);
      std::memcpy(&v, &bits, sizeof v);
      return v;
    }
  }

  /// The elements of an array of T (numbers, bools or strings).
  template <class T>
  std::vector<T> array() const {
    constexpr ValueType want = detail::value_type_of<T>::value;
    if (!is_array() || element_type_ != want)
      throw format_error("the value is " + type_text() + ", expected arr[" + value_type_name(want) + "]");
    if constexpr (std::is_same_v<T, std::string>) {
      return std::get<std::vector<std::string>>(data_);
    } else {
      const auto& packed = std::get<std::vector<std::uint8_t>>(data_);
      std::vector<T> out(packed.size() / sizeof(T));
      for (std::size_t i = 0; i < out.size(); ++i) {
        if constexpr (std::is_same_v<T, bool>) {
          out[i] = packed[i] != 0;
        } else {
          std::memcpy(&out[i], packed.data() + i * sizeof(T), sizeof(T));
        }
      }
      return out;
    }
  }

  /// The elements of an array of arrays.
  const std::vector<Value>& arrays() const {
    if (!is_array() || element_type_ != ValueType::ARRAY)
      throw format_error("the value is " + type_text() + ", expected arr[arr]");
    return std::get<std::vector<Value>>(data_);
  }

  /// Element `i` of an array of any type, as a Value of its own.
  Value element(std::size_t i) const {
    if (!is_array() || i >= size())
      throw config_error("gguf::Value::element(" + std::to_string(i) + ") of a " + type_text() + " of " +
                         std::to_string(size()) + " element(s)");
    if (element_type_ == ValueType::STRING) return Value(std::get<std::vector<std::string>>(data_)[i]);
    if (element_type_ == ValueType::ARRAY) return std::get<std::vector<Value>>(data_)[i];
    const std::size_t width = value_type_size(element_type_);
    std::uint64_t bits = 0;
    std::memcpy(&bits, std::get<std::vector<std::uint8_t>>(data_).data() + i * width, width);
    Value v;
    v.type_ = element_type_;
    v.data_ = bits;
    return v;
  }

  /// Arrays nested in this value: 0 for a scalar, 1 for an array of scalars.
  int depth() const {
    if (!is_array()) return 0;
    int deepest = 0;
    if (element_type_ == ValueType::ARRAY)
      for (const Value& a : std::get<std::vector<Value>>(data_)) deepest = std::max(deepest, a.depth());
    return 1 + deepest;
  }

  /// Same type and the same bits (so a NaN equals itself, and 0.0 is not -0.0).
  bool operator==(const Value& o) const {
    return type_ == o.type_ && (!is_array() || element_type_ == o.element_type_) && data_ == o.data_;
  }
  bool operator!=(const Value& o) const { return !(*this == o); }

  /// The bytes this value takes in a file after its type tag (the element
  /// type and count first, for arrays).
  template <class Sink>
  void write_to(Sink&& sink) const {
    auto put = [&](std::uint64_t v, std::size_t n) {
      std::uint8_t b[8] = {};
      for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<std::uint8_t>(v >> (8 * i));
      sink(b, n);
    };
    auto put_string = [&](const std::string& s) {
      put(s.size(), 8);
      sink(s.data(), s.size());
    };
    if (!is_array()) {
      if (type_ == ValueType::STRING) {
        put_string(std::get<std::string>(data_));
      } else {
        put(std::get<std::uint64_t>(data_), value_type_size(type_));
      }
      return;
    }
    put(static_cast<std::uint32_t>(element_type_), 4);
    put(size(), 8);
    if (element_type_ == ValueType::STRING) {
      for (const std::string& s : std::get<std::vector<std::string>>(data_)) put_string(s);
    } else if (element_type_ == ValueType::ARRAY) {
      for (const Value& a : std::get<std::vector<Value>>(data_)) a.write_to(sink);
    } else {
      const auto& packed = std::get<std::vector<std::uint8_t>>(data_);
      sink(packed.data(), packed.size());
    }
  }

 private:
  friend class Parser;
  ValueType type_ = ValueType::UINT8;
  ValueType element_type_ = ValueType::UINT8;
  // Scalars: their bits; str: the string; arrays: packed bytes, strings or arrays.
  std::variant<std::uint64_t, std::string, std::vector<std::uint8_t>, std::vector<std::string>, std::vector<Value>>
      data_ = std::uint64_t{0};
};

struct KeyValue {
  std::string key;
  Value value;
};

// ---- tensor types ------------------------------------------------------------------

/// ggml's tensor types (enum ggml_type), with their numbers in the file.
/// Numbers ggml removed (4, 5, 31-33, 36-38) are refused by the reader.
enum class TensorType : std::uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,
  NVFP4 = 40,
  Q1_0 = 41,
  Q2_0 = 42,
};
inline constexpr std::uint32_t tensor_type_count = 43;  // GGML_TYPE_COUNT

/// A type's storage as ggml.c's type_traits give it: `block_size` values are
/// stored in `type_size` bytes, and a row (ne[0] values) holds whole blocks.
struct TypeTraits {
  const char* name;
  std::uint32_t block_size;
  std::uint32_t type_size;
};

/// The traits of ggml type number `type`, or nullopt for a number ggml
/// removed or does not have.
inline std::optional<TypeTraits> type_traits(std::uint32_t type) {
  static constexpr TypeTraits table[tensor_type_count] = {
      {"f32", 1, 4},      {"f16", 1, 2},        {"q4_0", 32, 18},    {"q4_1", 32, 20},     {nullptr, 0, 0},
      {nullptr, 0, 0},    {"q5_0", 32, 22},     {"q5_1", 32, 24},    {"q8_0", 32, 34},     {"q8_1", 32, 36},
      {"q2_K", 256, 84},  {"q3_K", 256, 110},   {"q4_K", 256, 144},  {"q5_K", 256, 176},   {"q6_K", 256, 210},
      {"q8_K", 256, 292}, {"iq2_xxs", 256, 66}, {"iq2_xs", 256, 74}, {"iq3_xxs", 256, 98}, {"iq1_s", 256, 50},
      {"iq4_nl", 32, 18}, {"iq3_s", 256, 110},  {"iq2_s", 256, 82},  {"iq4_xs", 256, 136}, {"i8", 1, 1},
      {"i16", 1, 2},      {"i32", 1, 4},        {"i64", 1, 8},       {"f64", 1, 8},        {"iq1_m", 256, 56},
      {"bf16", 1, 2},     {nullptr, 0, 0},      {nullptr, 0, 0},     {nullptr, 0, 0},      {"tq1_0", 256, 54},
      {"tq2_0", 256, 66}, {nullptr, 0, 0},      {nullptr, 0, 0},     {nullptr, 0, 0},      {"mxfp4", 32, 17},
      {"nvfp4", 64, 36},  {"q1_0", 128, 18},    {"q2_0", 64, 18},
  };
  if (type >= tensor_type_count || table[type].name == nullptr) return std::nullopt;
  return table[type];
}
inline TypeTraits type_traits(TensorType type) { return *type_traits(static_cast<std::uint32_t>(type)); }

/// ggml's name of a type: "f32", "f16", "bf16", "q8_0", ...
inline const char* tensor_type_name(TensorType type) { return type_traits(type).name; }

/// The type ggml calls `name` ("q8_0", case as ggml writes it), or nullopt.
inline std::optional<TensorType> parse_tensor_type(std::string_view name) {
  for (std::uint32_t i = 0; i < tensor_type_count; ++i)
    if (auto t = type_traits(i); t && name == t->name) return static_cast<TensorType>(i);
  return std::nullopt;
}

/// F32, F16, BF16, Q8_0: the types File::matrix() converts and Writer::add() writes.
inline bool is_convertible(TensorType type) {
  return type == TensorType::F32 || type == TensorType::F16 || type == TensorType::BF16 || type == TensorType::Q8_0;
}

/// ggml's block_q8_0 (<lora/quant.hpp> holds the block and its conversions; these are their names here).
inline constexpr std::size_t q8_0_block = static_cast<std::size_t>(lora::quant::q8_0_block);
using lora::quant::dequantize_q8_0_block;
using lora::quant::quantize_q8_0_block;

// ---- the header ------------------------------------------------------------------

struct TensorInfo {
  std::string name;
  /// GGUF order: ne[0] is the innermost dimension (a row-major matrix (rows,
  /// cols) has ne = {cols, rows}); ne.size() is n_dims.
  std::vector<std::uint64_t> ne;
  TensorType type = TensorType::F32;
  std::uint64_t offset = 0;  ///< from the start of the data section
  std::uint64_t nbytes = 0;  ///< computed from ne and the type

  std::uint64_t numel() const {
    std::uint64_t n = 1;
    for (auto d : ne) n *= d;  // validated not to overflow
    return n;
  }
  /// PyTorch order, outermost first: ne reversed.
  std::vector<std::uint64_t> shape() const { return {ne.rbegin(), ne.rend()}; }
};

/// "[4096, 11008]": ne as messages write it (GGUF order).
inline std::string ne_text(const std::vector<std::uint64_t>& ne) {
  std::string s = "[";
  for (std::size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s + "]";
}

struct Header {
  std::uint32_t version = 3;
  std::uint32_t alignment = default_alignment;
  std::vector<KeyValue> metadata;   ///< in file order
  std::vector<TensorInfo> tensors;  ///< in file order
  std::uint64_t data_offset = 0;    ///< where the data section starts in the file
  std::uint64_t file_size = 0;
};

/// Reads and checks the header of `bytes` (a mapped, in-memory or pread file).
class Parser {
 public:
  Parser(const lora::detail::FileBytes& bytes, std::string source)
      : bytes_(bytes), source_(std::move(source)), size_(bytes.size()) {}

  Header parse() {
    Header h;
    h.file_size = size_;
    std::uint8_t magic[4];
    raw(magic, 4, "the magic \"GGUF\"");
    if (std::memcmp(magic, "GGUF", 4) != 0)
      fail("not a GGUF file: it starts with \"" + printable(std::string_view(reinterpret_cast<char*>(magic), 4)) +
           "\", expected \"GGUF\"");
    h.version = number<std::uint32_t>("the version");
    if (h.version != version) {
      if (h.version == 1 || h.version == 2)
        fail("GGUF version " + std::to_string(h.version) + " is not supported, only version 3 (ggml reads no other)");
      if (h.version != 0 && (h.version & 0xffffu) == 0)
        fail("GGUF version " + std::to_string(h.version) + ": a big-endian file? Only little-endian version 3 is read");
      fail("GGUF version " + std::to_string(h.version) + ", expected 3");
    }
    const std::uint64_t n_tensors = count("tensor count", min_tensor_info_bytes, "tensor infos");
    const std::uint64_t n_kv = count("key-value count", min_kv_bytes, "key-value pairs");

    std::unordered_map<std::string, std::size_t> keys;
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      const std::string where = "key-value pair " + std::to_string(i) + " of " + std::to_string(n_kv);
      std::string key = string(where + ": the key");
      if (key.empty()) fail(where + ": the key is empty");
      if (auto [it, fresh] = keys.emplace(key, h.metadata.size()); !fresh)
        fail("duplicate key \"" + printable(key) + "\" (key-value pairs " + std::to_string(it->second) + " and " +
             std::to_string(i) + ")");
      const std::string context = "key \"" + printable(key) + "\"";
      const ValueType type = value_type(context + ": the value type", context + ": unknown value type ");
      Value value = read_value(type, context, 0);
      h.metadata.push_back({std::move(key), std::move(value)});
    }

    if (auto it = keys.find("general.alignment"); it != keys.end()) {
      const Value& a = h.metadata[it->second].value;
      if (a.type() != ValueType::UINT32) fail("general.alignment must be u32, got " + a.type_text());
      h.alignment = a.get<std::uint32_t>();
      if (h.alignment == 0 || (h.alignment & (h.alignment - 1)) != 0)
        fail("general.alignment is " + std::to_string(h.alignment) + ", expected a power of two");
    }

    std::unordered_map<std::string, std::size_t> names;
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      const std::string where = "tensor info " + std::to_string(i) + " of " + std::to_string(n_tensors);
      TensorInfo t;
      t.name = string(where + ": the name");
      if (t.name.size() > max_name_bytes)
        fail(where + ": the name \"" + printable(t.name) + "\" is " + std::to_string(t.name.size()) +
             " bytes, ggml allows at most " + std::to_string(max_name_bytes));
      if (auto [it, fresh] = names.emplace(t.name, h.tensors.size()); !fresh)
        fail("duplicate tensor name \"" + printable(t.name) + "\" (tensor infos " + std::to_string(it->second) +
             " and " + std::to_string(i) + ")");
      const std::string context = "tensor \"" + printable(t.name) + "\"";
      const auto n_dims = number<std::uint32_t>(context + ": n_dims");
      if (n_dims > max_dims)
        fail(context + ": " + std::to_string(n_dims) + " dimensions, GGUF allows at most " + std::to_string(max_dims));
      std::uint64_t numel = 1;
      bool overflow = false;
      for (std::uint32_t d = 0; d < n_dims; ++d) {
        const auto n = number<std::int64_t>(context + ": ne[" + std::to_string(d) + "]");
        if (n < 0) fail(context + ": ne[" + std::to_string(d) + "] is " + std::to_string(n) + ", expected 0 or more");
        t.ne.push_back(static_cast<std::uint64_t>(n));
        overflow = overflow || __builtin_mul_overflow(numel, static_cast<std::uint64_t>(n), &numel);
      }
      if (overflow || numel > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail(context + ": ne " + ne_text(t.ne) + " has more elements than a signed 64-bit count holds");
      const auto type = number<std::int32_t>(context + ": the ggml type");
      const auto traits = type < 0 ? std::nullopt : type_traits(static_cast<std::uint32_t>(type));
      if (!traits)
        fail(context + ": unknown ggml type " + std::to_string(type) +
             (type >= 0 && static_cast<std::uint32_t>(type) < tensor_type_count ? " (removed from ggml)" : "") +
             ", expected one of the ggml types 0 to " + std::to_string(tensor_type_count - 1));
      t.type = static_cast<TensorType>(type);
      const std::uint64_t row = t.ne.empty() ? 1 : t.ne[0];
      if (row % traits->block_size != 0)
        fail(context + ": " + traits->name + " stores rows in blocks of " + std::to_string(traits->block_size) +
             " values, ne[0] is " + std::to_string(row));
      if (__builtin_mul_overflow(numel / traits->block_size, std::uint64_t{traits->type_size}, &t.nbytes))
        fail(context + ": " + traits->name + " " + ne_text(t.ne) + " takes more bytes than 64 bits can count");
      t.offset = number<std::uint64_t>(context + ": the offset");
      h.tensors.push_back(std::move(t));
    }

    h.data_offset = pos_;
    if (n_tensors > 0) {
      h.data_offset = (pos_ + h.alignment - 1) / h.alignment * h.alignment;  // pos_ <= size_ < 2^63
      if (h.data_offset > size_)
        fail("file is truncated: the data section starts at byte " + std::to_string(h.data_offset) +
             " (padded to the alignment " + std::to_string(h.alignment) + "), the file ends at byte " +
             std::to_string(size_));
    }
    check_data(h);
    return h;
  }

 private:
  // A tensor info is at least an empty name (8), n_dims (4), the type (4) and the offset (8);
  // a key-value pair a one-byte key (8 + 1), the type (4) and a one-byte value.
  static constexpr std::uint64_t min_tensor_info_bytes = 24, min_kv_bytes = 14;

  [[noreturn]] void fail(const std::string& what) const { throw format_error(source_ + ": " + what); }

  std::uint64_t left() const { return size_ - pos_; }

  void raw(void* out, std::uint64_t n, const std::string& what) {
    if (n > left())
      fail("file is truncated: " + what + " at byte " + std::to_string(pos_) + " needs " + std::to_string(n) +
           " bytes, the file ends at byte " + std::to_string(size_));
    if (n == 0) return;
    auto* dst = static_cast<std::uint8_t*>(out);
    if (bytes_.data() != nullptr) {
      std::memcpy(dst, bytes_.data() + pos_, static_cast<std::size_t>(n));
      pos_ += n;
      return;
    }
    // pread: through a 64 KiB window, so a metadata section of small fields costs few reads.
    while (n > 0) {
      if (pos_ < window_begin_ || pos_ >= window_begin_ + window_.size()) {
        if (n >= window_capacity) {
          bytes_.read(pos_, dst, static_cast<std::size_t>(n));
          pos_ += n;
          return;
        }
        window_.resize(static_cast<std::size_t>(std::min<std::uint64_t>(window_capacity, left())));
        bytes_.read(pos_, window_.data(), window_.size());
        window_begin_ = pos_;
      }
      const auto at = static_cast<std::size_t>(pos_ - window_begin_);
      const auto take = static_cast<std::size_t>(std::min<std::uint64_t>(n, window_.size() - at));
      std::memcpy(dst, window_.data() + at, take);
      dst += take;
      pos_ += take;
      n -= take;
    }
  }

  template <class T>
  T number(const std::string& what) {
    T v;
    raw(&v, sizeof v, what);  // little-endian host (safetensors.hpp checks)
    return v;
  }

  std::string string(const std::string& what) {
    const auto n = number<std::uint64_t>(what + " length");
    if (n > left())
      fail(what + ": a string of " + std::to_string(n) + " bytes at byte " + std::to_string(pos_) +
           " runs past the end of the file (" + std::to_string(left()) + " bytes left)");
    std::string s(static_cast<std::size_t>(n), '\0');
    raw(s.data(), n, what);
    return s;
  }

  // A count (i64) that must be >= 0 and fit in what is left of the file, `unit` bytes at least each.
  std::uint64_t count(const std::string& what, std::uint64_t unit, const std::string& things) {
    const auto n = number<std::int64_t>("the " + what);
    if (n < 0) fail("the " + what + " is " + std::to_string(n) + ", expected 0 or more");
    const auto u = static_cast<std::uint64_t>(n);
    if (u > left() / unit)
      fail("the " + what + " is " + std::to_string(u) + ", but the rest of the file (" + std::to_string(left()) +
           " bytes) holds at most " + std::to_string(left() / unit) + " " + things + " of at least " +
           std::to_string(unit) + " bytes");
    return u;
  }

  ValueType value_type(const std::string& what, const std::string& unknown) {
    const auto t = number<std::int32_t>(what);
    if (t < 0 || static_cast<std::uint32_t>(t) >= value_type_count)
      fail(unknown + std::to_string(t) + " (GGUF's value types are 0 to " + std::to_string(value_type_count - 1) + ")");
    return static_cast<ValueType>(t);
  }

  Value read_value(ValueType type, const std::string& context, int depth) {
    Value v;
    v.type_ = type;
    if (type == ValueType::STRING) {
      v.data_ = string(context);
      return v;
    }
    if (type != ValueType::ARRAY) {
      std::uint64_t bits = 0;
      const std::uint64_t at = pos_;
      raw(&bits, value_type_size(type), context + ": the " + value_type_name(type) + " value");
      if (type == ValueType::BOOL && bits > 1)
        fail(context + ": bool value " + std::to_string(bits) + " at byte " + std::to_string(at) + ", expected 0 or 1");
      v.data_ = bits;
      return v;
    }
    if (depth + 1 > max_array_depth)
      fail(context + ": arrays nest more than " + std::to_string(max_array_depth) + " levels deep");
    const ValueType element =
        value_type(context + ": the array's element type", context + ": array of unknown value type ");
    v.element_type_ = element;
    const auto n = number<std::uint64_t>(context + ": the array's length");
    // A string takes at least its 8-byte length, an array its type and length.
    const std::uint64_t unit = element == ValueType::STRING  ? 8
                               : element == ValueType::ARRAY ? 12
                                                             : value_type_size(element);
    if (n > left() / unit)
      fail(context + ": an array of " + std::to_string(n) + " " + value_type_name(element) + " needs at least " +
           (n > std::numeric_limits<std::uint64_t>::max() / unit ? "more than 2^64" : std::to_string(n * unit)) +
           " bytes, the file has " + std::to_string(left()) + " left");
    if (element == ValueType::STRING) {
      std::vector<std::string> strings;
      for (std::uint64_t i = 0; i < n; ++i) strings.push_back(string(context + "[" + std::to_string(i) + "]"));
      v.data_ = std::move(strings);
    } else if (element == ValueType::ARRAY) {
      std::vector<Value> arrays;
      for (std::uint64_t i = 0; i < n; ++i)
        arrays.push_back(read_value(ValueType::ARRAY, context + "[" + std::to_string(i) + "]", depth + 1));
      v.data_ = std::move(arrays);
    } else {
      std::vector<std::uint8_t> packed(static_cast<std::size_t>(n * unit));
      const std::uint64_t at = pos_;
      raw(packed.data(), packed.size(), context + ": the array's values");
      if (element == ValueType::BOOL)
        for (std::size_t i = 0; i < packed.size(); ++i)
          if (packed[i] > 1)
            fail(context + "[" + std::to_string(i) + "]: bool value " + std::to_string(packed[i]) + " at byte " +
                 std::to_string(at + i) + ", expected 0 or 1");
      v.data_ = std::move(packed);
    }
    return v;
  }

  // Tensors aligned, inside the data section, and not overlapping one another.
  void check_data(const Header& h) const {
    const std::uint64_t data_size = h.file_size - h.data_offset;
    std::vector<const TensorInfo*> by_offset;
    for (const TensorInfo& t : h.tensors) {
      const std::string context = "tensor \"" + printable(t.name) + "\"";
      if (t.offset % h.alignment != 0)
        fail(context + ": offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
             std::to_string(h.alignment));
      if (t.offset > data_size || t.nbytes > data_size - t.offset)
        fail(context + ": " + std::to_string(t.nbytes) + " bytes at offset " + std::to_string(t.offset) +
             " run past the end of the data section (" + std::to_string(data_size) + " bytes from byte " +
             std::to_string(h.data_offset) + ")");
      if (t.nbytes > 0) by_offset.push_back(&t);
    }
    std::stable_sort(by_offset.begin(), by_offset.end(),
                     [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const TensorInfo& a = *by_offset[i - 1];
      const TensorInfo& b = *by_offset[i];
      if (b.offset < a.offset + a.nbytes)
        fail("tensors \"" + printable(a.name) + "\" (bytes [" + std::to_string(a.offset) + ", " +
             std::to_string(a.offset + a.nbytes) + ")) and \"" + printable(b.name) + "\" (bytes [" +
             std::to_string(b.offset) + ", " + std::to_string(b.offset + b.nbytes) + ")) of the data section overlap");
    }
  }

  static constexpr std::uint64_t window_capacity = std::uint64_t{1} << 16;
  const lora::detail::FileBytes& bytes_;
  std::string source_;
  std::uint64_t size_;
  std::uint64_t pos_ = 0;
  std::vector<std::uint8_t> window_;
  std::uint64_t window_begin_ = 0;
};

// ---- reading ---------------------------------------------------------------------

/// A checked GGUF file. open() maps it (or reads it on demand, Access::read);
/// tensors of type F32, F16, BF16 or Q8_0 convert to matrices; the raw bytes
/// of any type are there too. Anything that is not a regular file is refused
/// before it is read.
class File {
 public:
  /// Opens and checks `path`; throws io_error or format_error.
  static File open(const std::string& path, Access access = Access::map) {
    return File(
        access == Access::map ? lora::detail::FileBytes::open(path) : lora::detail::FileBytes::open_for_reads(path),
        path);
  }

  /// Checks a file image held in memory.
  static File from_bytes(std::vector<std::uint8_t> bytes, const std::string& source = "<memory>") {
    return File(lora::detail::FileBytes::adopt(std::move(bytes)), source);
  }

  const std::string& source() const { return source_; }
  std::uint32_t version() const { return header_.version; }
  std::uint32_t alignment() const { return header_.alignment; }
  /// Where the data section starts in the file.
  std::uint64_t data_offset() const { return header_.data_offset; }
  const std::vector<KeyValue>& metadata() const { return header_.metadata; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }

  const Value* find_value(std::string_view key) const {
    auto it = keys_.find(std::string(key));
    return it == keys_.end() ? nullptr : &header_.metadata[it->second].value;
  }
  const Value& value(std::string_view key) const {
    const Value* v = find_value(key);
    if (v == nullptr) throw format_error(source_ + ": no key \"" + printable(key) + "\"");
    return *v;
  }
  /// The value of `key` as T, which must name its GGUF type exactly.
  template <class T>
  T get(std::string_view key) const {
    const Value& v = value(key);
    if (v.type() != detail::value_type_of<T>::value)
      throw format_error(source_ + ": key \"" + printable(key) + "\" is " + v.type_text() + ", expected " +
                         value_type_name(detail::value_type_of<T>::value));
    return v.get<T>();
  }

  const TensorInfo* find(std::string_view name) const {
    auto it = names_.find(std::string(name));
    return it == names_.end() ? nullptr : &header_.tensors[it->second];
  }
  const TensorInfo& at(std::string_view name) const {
    const TensorInfo* t = find(name);
    if (t == nullptr) throw format_error(source_ + ": no tensor named \"" + printable(name) + "\"");
    return *t;
  }

  /// The raw bytes of a tensor, inside the map; Access::read files have none
  /// (state_error): use read_bytes().
  const std::uint8_t* bytes(const TensorInfo& t) const {
    if (bytes_->data() == nullptr)
      throw state_error(source_ + ": opened with Access::read, which maps nothing; use read_bytes() or matrix()");
    return bytes_->data() + header_.data_offset + t.offset;
  }

  /// Copies bytes [offset, offset + n) of tensor `t`'s data into `out`.
  void read_bytes(const TensorInfo& t, std::uint64_t offset, void* out, std::size_t n) const {
    if (offset > t.nbytes || n > t.nbytes - offset)
      throw config_error(source_ + ": read of bytes [" + std::to_string(offset) + ", " + std::to_string(offset + n) +
                         ") of tensor \"" + printable(t.name) + "\", which has " + std::to_string(t.nbytes));
    bytes_->read(header_.data_offset + t.offset + offset, out, n);
  }

  /// Throws io_error when a file opened with Access::read was truncated or
  /// rewritten since it was opened; a no-op for mapped files.
  void check_unchanged() const { bytes_->check_unchanged(); }

  /// A tensor of type F32, F16, BF16 or Q8_0 as a row-major (rows, cols)
  /// matrix: ne = {cols, rows} gives (rows, cols), ne = {n} gives (1, n) and
  /// a tensor of no dimensions (1, 1). Q8_0 is dequantised as ggml does.
  template <class Scalar>
  Matrix<Scalar> matrix(std::string_view name) const {
    const TensorInfo& t = at(name);
    if (t.ne.size() > 2)
      throw format_error(source_ + ": tensor \"" + printable(t.name) + "\" has ne " + ne_text(t.ne) +
                         ", a matrix needs at most 2 dimensions");
    constexpr auto limit = static_cast<std::uint64_t>(std::numeric_limits<Index>::max());
    for (auto d : t.ne)
      if (d > limit)
        throw format_error(source_ + ": tensor \"" + printable(t.name) + "\" is too large for this platform");
    const Index cols = t.ne.empty() ? 1 : static_cast<Index>(t.ne[0]);
    const Index rows = t.ne.size() < 2 ? 1 : static_cast<Index>(t.ne[1]);
    Matrix<Scalar> out(rows, cols);
    convert_into(t, out.data());
    return out;
  }

  /// Converts tensor `t` (F32, F16, BF16 or Q8_0) into `out`, which has room
  /// for t.numel() values, in file order (ne[0] fastest).
  template <class Scalar>
  void convert_into(const TensorInfo& t, Scalar* out) const {
    if (!is_convertible(t.type))
      throw format_error(source_ + ": tensor \"" + printable(t.name) + "\" is " + tensor_type_name(t.type) +
                         ", expected one of f32, f16, bf16, q8_0");
    const TypeTraits traits = type_traits(t.type);
    const std::uint64_t blocks = t.numel() / traits.block_size;
    if (bytes_->data() != nullptr) {
      convert_blocks(t.type, bytes(t), blocks, out);
      return;
    }
    // Access::read: a few blocks at a time through a small buffer.
    const std::uint64_t chunk = (std::uint64_t{1} << 16) / traits.type_size;
    std::vector<std::uint8_t> buffer(static_cast<std::size_t>(chunk * traits.type_size));
    for (std::uint64_t begin = 0; begin < blocks; begin += chunk) {
      const std::uint64_t count = std::min(chunk, blocks - begin);
      read_bytes(t, begin * traits.type_size, buffer.data(), static_cast<std::size_t>(count * traits.type_size));
      convert_blocks(t.type, buffer.data(), count, out + begin * traits.block_size);
    }
  }

 private:
  File(std::shared_ptr<const lora::detail::FileBytes> bytes, std::string source)
      : bytes_(std::move(bytes)), source_(std::move(source)) {
    header_ = Parser(*bytes_, source_).parse();
    for (std::size_t i = 0; i < header_.metadata.size(); ++i) keys_.emplace(header_.metadata[i].key, i);
    for (std::size_t i = 0; i < header_.tensors.size(); ++i) names_.emplace(header_.tensors[i].name, i);
  }

  template <class Scalar>
  static void convert_blocks(TensorType type, const std::uint8_t* p, std::uint64_t blocks, Scalar* out) {
    const auto n = static_cast<std::size_t>(blocks);
    switch (type) {
      case TensorType::F32:
        for (std::size_t i = 0; i < n; ++i) {
          float v;
          std::memcpy(&v, p + 4 * i, 4);
          out[i] = static_cast<Scalar>(v);
        }
        break;
      case TensorType::F16:
        for (std::size_t i = 0; i < n; ++i)
          out[i] = static_cast<Scalar>(lora::safetensors::half_to_float(load16(p + 2 * i)));
        break;
      case TensorType::BF16:
        for (std::size_t i = 0; i < n; ++i)
          out[i] = static_cast<Scalar>(lora::safetensors::bf16_to_float(load16(p + 2 * i)));
        break;
      default: {  // Q8_0
        float values[q8_0_block];
        for (std::size_t b = 0; b < n; ++b) {
          dequantize_q8_0_block(p + 34 * b, values);
          for (std::size_t j = 0; j < q8_0_block; ++j) out[b * q8_0_block + j] = static_cast<Scalar>(values[j]);
        }
      }
    }
  }
  static std::uint16_t load16(const std::uint8_t* p) { return static_cast<std::uint16_t>(p[0] | (p[1] << 8)); }

  std::shared_ptr<const lora::detail::FileBytes> bytes_;
  std::string source_;
  Header header_;
  std::unordered_map<std::string, std::size_t> keys_, names_;
};

// ---- writing ---------------------------------------------------------------------

/// Collects metadata and tensors and writes one GGUF file laid out as ggml's
/// writer lays it out: the keys and tensors in the order given, the data
/// section and every tensor padded with zeros to the alignment
/// ("general.alignment", a u32 power of two, 32 when not set). Tensors added
/// by add() are converted and owned; add_bytes() borrows bytes the caller
/// keeps alive until save(); add_from() reads them from a File while saving.
class Writer {
 public:
  /// Sets `key` to `value` (replacing an earlier value in its place).
  void set(const std::string& key, Value value) {
    if (key.empty()) throw config_error("gguf::Writer::set: the key is empty");
    if (value.depth() > max_array_depth)
      throw config_error("gguf::Writer::set(\"" + key + "\"): arrays nest more than " +
                         std::to_string(max_array_depth) + " levels deep");
    if (key == "general.alignment") {
      if (value.type() != ValueType::UINT32)
        throw config_error("gguf::Writer::set: general.alignment must be u32, got " + value.type_text());
      const auto a = value.get<std::uint32_t>();
      if (a == 0 || (a & (a - 1)) != 0)
        throw config_error("gguf::Writer::set: general.alignment must be a power of two, got " + std::to_string(a));
      alignment_ = a;
    }
    for (KeyValue& kv : metadata_)
      if (kv.key == key) {
        kv.value = std::move(value);
        return;
      }
    metadata_.push_back({key, std::move(value)});
  }

  std::uint32_t alignment() const { return alignment_; }
  const std::vector<KeyValue>& metadata() const { return metadata_; }

  /// Adds a matrix m (rows, cols) as `type` (F32, F16, BF16 or Q8_0). The ne
  /// written is {cols, rows} with trailing 1s dropped, as ggml writes it
  /// ((1, n) is written as ne = {n}), unless `ne` says otherwise (GGUF order,
  /// the same element count). Q8_0 needs ne[0] a multiple of 32 and finite values.
  template <class Derived>
  void add(const std::string& name, const Eigen::MatrixBase<Derived>& m, TensorType type = TensorType::F32,
           std::vector<std::uint64_t> ne = {}) {
    if (!is_convertible(type))
      throw config_error(std::string("gguf::Writer::add: type must be f32, f16, bf16 or q8_0, got ") +
                         tensor_type_name(type));
    if (ne.empty()) {
      ne = {static_cast<std::uint64_t>(m.cols()), static_cast<std::uint64_t>(m.rows())};
      while (ne.size() > 1 && ne.back() == 1) ne.pop_back();
    }
    const std::uint64_t nbytes = check_tensor(name, type, ne, "add");
    if (numel_of(ne) != static_cast<std::uint64_t>(m.size()))
      throw shape_error("gguf::Writer::add(\"" + name + "\"): ne " + ne_text(ne) + " holds " +
                        std::to_string(numel_of(ne)) + " values, the matrix " + std::to_string(m.size()));
    Entry e{name, type, std::move(ne), {}, nullptr, static_cast<std::size_t>(nbytes)};
    e.owned.resize(e.size);
    std::uint8_t* out = e.owned.data();
    float block[q8_0_block];
    std::size_t k = 0;
    for (Index r = 0; r < m.rows(); ++r) {  // row-major order whatever m's storage
      for (Index c = 0; c < m.cols(); ++c, ++k) {
        const float v = static_cast<float>(m(r, c));
        switch (type) {
          case TensorType::F32:
            std::memcpy(out + 4 * k, &v, 4);
            break;
          case TensorType::F16:
            store16(out + 2 * k, lora::safetensors::float_to_half(v));
            break;
          case TensorType::BF16:
            store16(out + 2 * k, lora::safetensors::float_to_bf16(v));
            break;
          default:  // Q8_0
            if (!std::isfinite(v))
              throw numeric_error("gguf::Writer::add(\"" + name + "\"): value (" + std::to_string(r) + ", " +
                                  std::to_string(c) + ") is " + value_string(v) + ", which q8_0 cannot store");
            block[k % q8_0_block] = v;
            if (k % q8_0_block == q8_0_block - 1) quantize_q8_0_block(block, out + 34 * (k / q8_0_block));
        }
      }
    }
    entries_.push_back(std::move(e));
  }

  /// Adds the raw bytes of a tensor of any type (borrowed, not copied).
  void add_bytes(const std::string& name, TensorType type, std::vector<std::uint64_t> ne, const std::uint8_t* data,
                 std::size_t size) {
    const std::uint64_t nbytes = check_tensor(name, type, ne, "add_bytes");
    if (nbytes != size)
      throw shape_error("gguf::Writer::add_bytes(\"" + name + "\"): " + tensor_type_name(type) + " " + ne_text(ne) +
                        " needs " + std::to_string(nbytes) + " bytes, got " + std::to_string(size));
    entries_.push_back(Entry{name, type, std::move(ne), {}, data, size});
  }

  /// Adds tensor `t` of `file` unchanged under `name`, read from the file while
  /// save() writes. Borrows `file`: keep it alive until save().
  void add_from(const std::string& name, const File& file, const TensorInfo& t) {
    check_tensor(name, t.type, t.ne, "add_from");
    Entry e{name, t.type, t.ne, {}, nullptr, static_cast<std::size_t>(t.nbytes)};
    e.file = &file;
    e.tensor = &t;
    entries_.push_back(std::move(e));
  }

  std::size_t size() const { return entries_.size(); }

  /// The whole file image.
  std::vector<std::uint8_t> serialize() const {
    std::vector<std::uint8_t> out;
    write_to([&](const void* p, std::size_t n) {
      auto b = static_cast<const std::uint8_t*>(p);
      out.insert(out.end(), b, b + n);
    });
    return out;
  }

  /// Writes the file atomically (temporary file beside it, fsync, rename).
  void save(const std::string& path) const { stage(path).commit(); }

  /// Writes the whole file to a temporary beside `path` without putting it in
  /// place yet (see lora::detail::StagedFile).
  lora::detail::StagedFile stage(const std::string& path) const {
    return lora::detail::StagedFile(
        path, [&](lora::detail::FileSink& sink) { write_to([&](const void* p, std::size_t n) { sink.write(p, n); }); });
  }

 private:
  struct Entry {
    std::string name;
    TensorType type;
    std::vector<std::uint64_t> ne;
    std::vector<std::uint8_t> owned;
    const std::uint8_t* borrowed;
    std::size_t size;
    const File* file = nullptr;  // add_from: copied from the file in chunks
    const TensorInfo* tensor = nullptr;
    const std::uint8_t* data() const { return borrowed ? borrowed : owned.data(); }
  };

  static std::uint64_t numel_of(const std::vector<std::uint64_t>& ne) {
    std::uint64_t n = 1;
    for (auto d : ne) n *= d;
    return n;
  }

  // The rules the reader applies, as config_error / shape_error; returns the byte count.
  std::uint64_t check_tensor(const std::string& name, TensorType type, const std::vector<std::uint64_t>& ne,
                             const char* call) const {
    const std::string where = std::string("gguf::Writer::") + call + "(\"" + printable(name) + "\")";
    if (name.size() > max_name_bytes)
      throw config_error(where + ": the name is " + std::to_string(name.size()) + " bytes, ggml allows at most " +
                         std::to_string(max_name_bytes));
    for (const Entry& e : entries_)
      if (e.name == name) throw config_error(where + ": a tensor of that name was added already");
    if (ne.size() > max_dims)
      throw shape_error(where + ": ne " + ne_text(ne) + " has more than " + std::to_string(max_dims) + " dimensions");
    std::uint64_t numel = 1;
    for (auto d : ne)
      if (__builtin_mul_overflow(numel, d, &numel) ||
          numel > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        throw shape_error(where + ": ne " + ne_text(ne) + " has more elements than a signed 64-bit count holds");
    const TypeTraits traits = type_traits(type);
    const std::uint64_t row = ne.empty() ? 1 : ne[0];
    if (row % traits.block_size != 0)
      throw shape_error(where + ": " + traits.name + " stores rows in blocks of " + std::to_string(traits.block_size) +
                        " values, ne[0] is " + std::to_string(row));
    std::uint64_t nbytes = 0;
    if (__builtin_mul_overflow(numel / traits.block_size, std::uint64_t{traits.type_size}, &nbytes) ||
        nbytes > std::numeric_limits<std::size_t>::max())
      throw shape_error(where + ": " + traits.name + " " + ne_text(ne) + " takes more bytes than this platform holds");
    return nbytes;
  }

  template <class Sink>
  void write_to(Sink&& sink) const {
    std::uint64_t written = 0;
    auto emit = [&](const void* p, std::size_t n) {
      sink(p, n);
      written += n;
    };
    auto put = [&](std::uint64_t v, std::size_t n) {
      std::uint8_t b[8] = {};
      for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<std::uint8_t>(v >> (8 * i));
      emit(b, n);
    };
    auto put_string = [&](const std::string& s) {
      put(s.size(), 8);
      emit(s.data(), s.size());
    };
    const std::vector<std::uint8_t> zeros(alignment_, 0);
    auto pad = [&] { emit(zeros.data(), static_cast<std::size_t>((alignment_ - written % alignment_) % alignment_)); };

    emit("GGUF", 4);
    put(version, 4);
    put(entries_.size(), 8);
    put(metadata_.size(), 8);
    for (const KeyValue& kv : metadata_) {
      put_string(kv.key);
      put(static_cast<std::uint32_t>(kv.value.type()), 4);
      kv.value.write_to(emit);
    }
    std::uint64_t offset = 0;
    for (const Entry& e : entries_) {
      put_string(e.name);
      put(e.ne.size(), 4);
      for (auto d : e.ne) put(d, 8);
      put(static_cast<std::uint32_t>(e.type), 4);
      put(offset, 8);
      offset += (e.size + alignment_ - 1) / alignment_ * alignment_;
    }
    pad();
    std::vector<std::uint8_t> buffer;
    for (const Entry& e : entries_) {
      if (e.file == nullptr) {
        emit(e.data(), e.size);
      } else {
        buffer.resize(std::min<std::size_t>(e.size, std::size_t{1} << 20));
        for (std::size_t done = 0; done < e.size; done += buffer.size()) {
          const std::size_t n = std::min(buffer.size(), e.size - done);
          e.file->read_bytes(*e.tensor, done, buffer.data(), n);
          emit(buffer.data(), n);
        }
      }
      pad();
    }
  }

  static void store16(std::uint8_t* p, std::uint16_t v) {
    p[0] = static_cast<std::uint8_t>(v & 0xff);
    p[1] = static_cast<std::uint8_t>(v >> 8);
  }

  std::vector<KeyValue> metadata_;
  std::vector<Entry> entries_;
  std::uint32_t alignment_ = default_alignment;
};

}  // namespace lora::gguf
