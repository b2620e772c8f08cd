// safetensors: read and write the tensor file format of Hugging Face's
// `safetensors` (the format of every PEFT adapter and most base models).
//
//   8 bytes   N, little-endian u64, the header length
//   N bytes   UTF-8 JSON: {"__metadata__": {str: str}, name: {"dtype": "F32",
//             "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
//   the rest  tensor data, little-endian, row-major, back to back; offsets are
//             relative to the start of this part
//
// The reader checks the whole header before it hands out anything and never
// reads or allocates what the header merely claims: every tensor must lie
// inside the file, the offsets must tile the data exactly (no overlap, no
// hole, no trailing bytes), each tensor's byte range must equal its
// shape × dtype size (computed with overflow checks), names are unique and
// `__metadata__` holds strings only. A rule it breaks is reported as
// format_error "<file>: <what>". The writer produces what the reference
// writer does: header padded with spaces to a multiple of 8, tensors sorted
// by decreasing dtype alignment then name, placed back to back.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/detail/file.hpp>
#include <lora/detail/half.hpp>
#include <lora/errors.hpp>
#include <lora/params.hpp>
#include <lora/types.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "lora/safetensors.hpp assumes a little-endian host"
#endif

namespace lora::safetensors {

/// The reference implementation's dtypes, in its order (increasing alignment).
enum class Dtype { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

inline constexpr std::uint64_t max_header_size = 100'000'000;

inline const char* dtype_name(Dtype dtype) {
  static constexpr const char* names[] = {"BOOL", "U8",  "I8",  "F8_E5M2", "F8_E4M3", "I16", "U16", "F16",
                                          "BF16", "I32", "U32", "F32",     "F64",     "I64", "U64"};
  return names[static_cast<int>(dtype)];
}

inline std::size_t dtype_size(Dtype dtype) {
  static constexpr std::size_t sizes[] = {1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 8, 8, 8};
  return sizes[static_cast<int>(dtype)];
}

inline std::optional<Dtype> parse_dtype(std::string_view name) {
  for (int i = 0; i <= static_cast<int>(Dtype::U64); ++i)
    if (name == dtype_name(static_cast<Dtype>(i))) return static_cast<Dtype>(i);
  return std::nullopt;
}

/// F16, BF16, F32, F64: the dtypes the reader converts to a floating-point matrix.
inline bool is_float(Dtype dtype) {
  return dtype == Dtype::F16 || dtype == Dtype::BF16 || dtype == Dtype::F32 || dtype == Dtype::F64;
}

// ---- half precision --------------------------------------------------------------
// The conversions live in <lora/detail/half.hpp> (the quantised weights use them too); these are their names here.
using lora::detail::bf16_to_float;
using lora::detail::float_to_bf16;
using lora::detail::float_to_half;
using lora::detail::half_to_float;

// ---- the header ------------------------------------------------------------------

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::uint64_t> shape;
  std::uint64_t data_begin = 0;  ///< offsets relative to the start of the data part
  std::uint64_t data_end = 0;

  std::uint64_t numel() const {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;  // validated not to overflow
    return n;
  }
  std::uint64_t nbytes() const { return data_end - data_begin; }
};

/// "[2304, 8]", the way messages write a safetensors shape.
inline std::string shape_text(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

struct Header {
  std::vector<TensorInfo> tensors;  ///< in data order
  std::map<std::string, std::string> metadata;
  bool has_metadata = false;
  std::uint64_t header_size = 0;  ///< N
};

namespace detail {

/// Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF).
/// Returns the offset of the first bad byte, or npos.
inline std::size_t first_invalid_utf8(const std::uint8_t* s, std::size_t n) {
  std::size_t i = 0;
  while (i < n) {
    std::uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    std::uint32_t lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;
      if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;
      if (c == 0xf4) hi = 0x8f;
    } else {
      return i;
    }
    if (n - i < len) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if (s[i + k] < 0x80 || s[i + k] > 0xbf) return i;
    i += len;
  }
  return std::string::npos;
}

inline const char* json_type_name(nlohmann::json::value_t t) {
  using value_t = nlohmann::json::value_t;
  switch (t) {
    case value_t::null:
      return "null";
    case value_t::object:
      return "an object";
    case value_t::array:
      return "an array";
    case value_t::string:
      return "a string";
    case value_t::boolean:
      return "a boolean";
    case value_t::number_integer:
      return "a negative integer";
    case value_t::number_unsigned:
      return "an unsigned integer";
    case value_t::number_float:
      return "a floating-point number";
    default:
      return "a binary value";
  }
}

/// Builds the header straight from the JSON tokens (SAX), so a hostile header
/// never becomes a big DOM: it is refused at the first token that breaks the
/// schema, and nesting is bounded by the schema itself.
class HeaderHandler : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit HeaderHandler(Header& header) : header_(header) {}

  const std::string& error() const { return error_; }

  bool null() override { return scalar(nlohmann::json::value_t::null); }
  bool boolean(bool) override { return scalar(nlohmann::json::value_t::boolean); }
  bool number_integer(number_integer_t) override { return scalar(nlohmann::json::value_t::number_integer); }
  bool number_unsigned(number_unsigned_t v) override {
    if (state_ == State::shape) {
      current_.shape.push_back(v);
      return true;
    }
    if (state_ == State::offsets) {
      if (offsets_seen_ >= 2)
        return fail("tensor \"" + printable(current_.name) + "\": data_offsets must have 2 entries");
      (offsets_seen_ == 0 ? current_.data_begin : current_.data_end) = v;
      ++offsets_seen_;
      return true;
    }
    return scalar(nlohmann::json::value_t::number_unsigned);
  }
  bool number_float(number_float_t, const string_t&) override { return scalar(nlohmann::json::value_t::number_float); }
  bool binary(binary_t&) override { return scalar(nlohmann::json::value_t::binary); }

  bool string(string_t& value) override {
    if (state_ == State::metadata) {
      header_.metadata[pending_key_] = value;
      return true;
    }
    if (state_ == State::tensor && field_ == Field::dtype) {
      auto dtype = parse_dtype(value);
      if (!dtype)
        return fail("tensor \"" + printable(current_.name) + "\": unknown dtype \"" + printable(value) + "\"");
      current_.dtype = *dtype;
      return true;
    }
    return scalar(nlohmann::json::value_t::string);
  }

  bool start_object(std::size_t) override {
    switch (state_) {
      case State::start:
        state_ = State::root;
        return true;
      case State::root:
        if (pending_key_ == "__metadata__") {
          if (header_.has_metadata) return fail("duplicate key \"__metadata__\"");
          header_.has_metadata = true;
          state_ = State::metadata;
        } else {
          current_ = TensorInfo{};
          current_.name = pending_key_;
          fields_seen_ = 0;
          state_ = State::tensor;
        }
        return true;
      default:
        return scalar(nlohmann::json::value_t::object);
    }
  }

  bool key(string_t& key) override {
    if (state_ == State::root) {
      if (!names_.insert(key).second)
        return fail(key == "__metadata__" ? std::string("duplicate key \"__metadata__\"")
                                          : "duplicate tensor name \"" + printable(key) + "\"");
      pending_key_ = key;
      return true;
    }
    if (state_ == State::metadata) {
      if (header_.metadata.count(key)) return fail("\"__metadata__\" has the key \"" + printable(key) + "\" twice");
      pending_key_ = key;
      return true;
    }
    // State::tensor
    int bit;
    if (key == "dtype") {
      field_ = Field::dtype, bit = 1;
    } else if (key == "shape") {
      field_ = Field::shape, bit = 2;
    } else if (key == "data_offsets") {
      field_ = Field::offsets, bit = 4;
    } else {
      return fail("tensor \"" + printable(current_.name) + "\": unexpected field \"" + printable(key) +
                  "\" (expected dtype, shape, data_offsets)");
    }
    if (fields_seen_ & bit)
      return fail("tensor \"" + printable(current_.name) + "\": field \"" + printable(key) + "\" given twice");
    fields_seen_ |= bit;
    return true;
  }

  bool end_object() override {
    if (state_ == State::metadata) {
      state_ = State::root;
      return true;
    }
    if (state_ == State::tensor) {
      if (fields_seen_ != 7) {
        std::string missing;
        if (!(fields_seen_ & 1)) missing += " dtype";
        if (!(fields_seen_ & 2)) missing += " shape";
        if (!(fields_seen_ & 4)) missing += " data_offsets";
        return fail("tensor \"" + printable(current_.name) + "\": missing field(s):" + missing);
      }
      header_.tensors.push_back(std::move(current_));
      state_ = State::root;
      return true;
    }
    state_ = State::done;  // the root object
    return true;
  }

  bool start_array(std::size_t) override {
    if (state_ == State::tensor && field_ == Field::shape) {
      state_ = State::shape;
      return true;
    }
    if (state_ == State::tensor && field_ == Field::offsets) {
      state_ = State::offsets;
      offsets_seen_ = 0;
      return true;
    }
    return scalar(nlohmann::json::value_t::array);
  }

  bool end_array() override {
    if (state_ == State::offsets && offsets_seen_ != 2)
      return fail("tensor \"" + printable(current_.name) + "\": data_offsets must have 2 entries, got " +
                  std::to_string(offsets_seen_));
    state_ = State::tensor;
    return true;
  }

  bool parse_error(std::size_t position, const std::string&, const nlohmann::json::exception& e) override {
    if (error_.empty()) {
      // "[json.exception.parse_error.101] parse error at line 1, column 5: <reason>"
      std::string what = e.what();
      auto colon = what.find(": ");
      std::string reason = colon == std::string::npos ? std::string() : what.substr(colon + 2, 160);
      error_ = "header is not valid JSON (at byte " + std::to_string(position) + " of the header)" +
               (reason.empty() ? "" : ": " + reason);
    }
    return false;
  }

 private:
  enum class State { start, root, metadata, tensor, shape, offsets, done };
  enum class Field { dtype, shape, offsets };

  bool fail(std::string message) {
    if (error_.empty()) error_ = std::move(message);
    return false;
  }

  // A value where the schema wants something else.
  bool scalar(nlohmann::json::value_t got) {
    const char* type = json_type_name(got);
    switch (state_) {
      case State::start:
        return fail(std::string("header must be a JSON object, got ") + type);
      case State::root:
        if (pending_key_ == "__metadata__") return fail(std::string("\"__metadata__\" must be an object, got ") + type);
        return fail("tensor \"" + pending_key_ + "\": expected an object, got " + type);
      case State::metadata:
        if (pending_key_ == "dtype" || pending_key_ == "shape" || pending_key_ == "data_offsets")
          return fail("a tensor may not be named \"__metadata__\" (its values must all be strings; \"" + pending_key_ +
                      "\" is " + type + ")");
        return fail("\"__metadata__\" values must be strings; \"" + pending_key_ + "\" is " + type);
      case State::tensor:
        if (field_ == Field::dtype)
          return fail("tensor \"" + printable(current_.name) + "\": dtype must be a string, got " + type);
        return fail("tensor \"" + printable(current_.name) +
                    "\": " + (field_ == Field::shape ? "shape" : "data_offsets") +
                    " must be an array of unsigned integers, got " + type);
      case State::shape:
        return fail("tensor \"" + printable(current_.name) + "\": shape entries must be unsigned integers, got " +
                    type);
      case State::offsets:
        return fail("tensor \"" + printable(current_.name) +
                    "\": data_offsets entries must be unsigned integers, got " + type);
      default:
        return fail(std::string("unexpected ") + type + " after the header object");
    }
  }

  Header& header_;
  std::string error_;
  State state_ = State::start;
  Field field_ = Field::dtype;
  int fields_seen_ = 0;
  int offsets_seen_ = 0;
  std::string pending_key_;
  TensorInfo current_;
  std::set<std::string> names_;
};

}  // namespace detail

/// Parses and checks the header of a file of `size` bytes whose first
/// `available` bytes are at `data` (the whole image, or at least the length
/// prefix and the header); never reads past `available`. `source` names the
/// file in messages.
inline Header parse_header(const std::uint8_t* data, std::size_t available, const std::string& source,
                           std::uint64_t size) {
  auto fail = [&](const std::string& what) { throw format_error(source + ": " + what); };
  if (size < 8) fail("file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  if (available < 8) fail("internal: the 8-byte header length was not read");
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if ((n > max_header_size || n > size - 8) && (available < 9 || data[8] != '{')) {
    // Not even the start of a JSON header: another kind of file, not a damaged safetensors one.
    std::string first;
    for (int i = 0; i < 8; ++i) first += static_cast<char>(data[i]);
    fail("not a safetensors file: it does not start with a header length and a JSON header (its first 8 bytes, \"" +
         printable(first) + "\", would claim a header of " + with_thousands(n) + " bytes in a file of " +
         with_thousands(size) + ")");
  }
  if (n > max_header_size)
    fail("header length " + with_thousands(n) + " exceeds the limit of " + with_thousands(max_header_size) + " bytes");
  if (n > size - 8)
    fail("header length " + with_thousands(n) + " runs past the end of the file (" + with_thousands(size) +
         " bytes, so at most " + with_thousands(size - 8) + ")");
  if (n > available - 8) fail("internal: the header was not read in full");
  const std::uint8_t* text = data + 8;
  if (auto bad = detail::first_invalid_utf8(text, n); bad != std::string::npos)
    fail("header is not valid UTF-8 (byte " + std::to_string(bad) + " of the header)");

  Header header;
  header.header_size = n;
  detail::HeaderHandler handler(header);
  bool ok = nlohmann::json::sax_parse(text, text + n, &handler, nlohmann::json::input_format_t::json, true);
  if (!ok) fail(handler.error().empty() ? std::string("header is not valid JSON") : handler.error());

  // Tile check in data order; JSON order is free.
  std::stable_sort(header.tensors.begin(), header.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return std::pair(a.data_begin, a.data_end) < std::pair(b.data_begin, b.data_end);
  });
  const std::uint64_t data_size = size - 8 - n;
  std::uint64_t expected_begin = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& t : header.tensors) {
    std::string name = "tensor \"" + printable(t.name) + "\": ";
    if (t.data_end < t.data_begin)
      fail(name + "data_offsets [" + std::to_string(t.data_begin) + ", " + std::to_string(t.data_end) +
           "] end before they begin");
    std::uint64_t numel = 1;
    for (auto d : t.shape)
      if (__builtin_mul_overflow(numel, d, &numel))
        fail(name + "shape " + shape_text(t.shape) + " has more elements than 64 bits can count");
    std::uint64_t nbytes = 0;
    if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(dtype_size(t.dtype)), &nbytes))
      fail(name + "shape " + shape_text(t.shape) + " of " + dtype_name(t.dtype) + " overflows a 64-bit byte count");
    if (t.data_end - t.data_begin != nbytes)
      fail(name + dtype_name(t.dtype) + " " + shape_text(t.shape) + " needs " + std::to_string(nbytes) +
           " bytes, data_offsets [" + std::to_string(t.data_begin) + ", " + std::to_string(t.data_end) + "] give " +
           std::to_string(t.data_end - t.data_begin));
    if (t.data_begin < expected_begin)
      fail(name + "data_offsets [" + std::to_string(t.data_begin) + ", " + std::to_string(t.data_end) +
           "] overlap tensor \"" + printable(previous->name) + "\" (which ends at " + std::to_string(expected_begin) +
           ")");
    if (t.data_begin > expected_begin)
      fail(name + "data_offsets begin at " + std::to_string(t.data_begin) + ", leaving a hole of " +
           std::to_string(t.data_begin - expected_begin) + " bytes after " +
           (previous ? "tensor \"" + printable(previous->name) + "\"" : std::string("the header")));
    expected_begin = t.data_end;
    previous = &t;
  }
  if (expected_begin > data_size)
    fail("file is truncated: the tensors need " + with_thousands(expected_begin) + " bytes of data, the file has " +
         with_thousands(data_size));
  if (expected_begin < data_size)
    fail("trailing bytes: the tensors cover " + with_thousands(expected_begin) + " bytes of data, the file has " +
         with_thousands(data_size));
  return header;
}

/// Parses and checks the header of a whole file image of `size` bytes.
inline Header parse_header(const std::uint8_t* data, std::size_t size, const std::string& source = "<memory>") {
  return parse_header(data, size, source, size);
}

// ---- reading ---------------------------------------------------------------------

/// How File::open reaches the tensors.
enum class Access {
  /// Memory-map the file: zero-copy bytes() and view(). The file must not be
  /// truncated while the File lives: the kernel answers a read of a page the
  /// file lost with SIGBUS, which ends the process.
  map,
  /// Read the header, then copy each tensor with pread() when it is asked
  /// for: no bytes() or view(), but a file that shrinks or changes underneath
  /// gives an io_error naming it (check_unchanged() also notices rewrites).
  /// The tools and the PEFT loaders read untrusted files this way.
  read
};

/// A checked safetensors file. open() maps the file (or reads it on demand,
/// Access::read); tensors are converted (matrix()) or, mapped, seen without a
/// copy (view()). Anything that is not a regular file (a FIFO, a device) is
/// refused before it is read.
class File {
 public:
  /// Opens and checks `path`; throws io_error or format_error.
  static File open(const std::string& path, Access access = Access::map) {
    if (access == Access::map) return File(lora::detail::FileBytes::open(path), path);
    auto bytes = lora::detail::FileBytes::open_for_reads(path);
    if (bytes->data() != nullptr) return File(std::move(bytes), path);  // no pread on this platform: mapped
    // The length prefix, then at most the header it claims (bounded by the limit and the file's size).
    const std::uint64_t size = bytes->size();
    // Nine bytes: the length, and whether a JSON header seems to follow it (parse_header tells another kind of
    // file from a damaged safetensors one by that byte).
    std::vector<std::uint8_t> head(static_cast<std::size_t>(std::min<std::uint64_t>(size, 9)));
    bytes->read(0, head.data(), head.size());
    if (head.size() >= 8) {
      std::uint64_t n = 0;
      for (int i = 7; i >= 0; --i) n = (n << 8) | head[static_cast<std::size_t>(i)];
      if (n <= max_header_size && n <= size - 8) {
        head.resize(8 + static_cast<std::size_t>(n));
        if (n > 0) bytes->read(8, head.data() + 8, static_cast<std::size_t>(n));
      }
    }
    return File(std::move(bytes), path, std::move(head));
  }

  /// Checks a file image held in memory.
  static File from_bytes(std::vector<std::uint8_t> bytes, const std::string& source = "<memory>") {
    return File(lora::detail::FileBytes::adopt(std::move(bytes)), source);
  }

  const std::string& source() const { return source_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  bool has_metadata() const { return header_.has_metadata; }
  std::uint64_t header_size() const { return header_.header_size; }

  const TensorInfo* find(std::string_view name) const {
    auto it = index_.find(std::string(name));
    return it == index_.end() ? nullptr : &header_.tensors[it->second];
  }
  const TensorInfo& at(std::string_view name) const {
    const TensorInfo* t = find(name);
    if (t == nullptr) throw format_error(source_ + ": no tensor named \"" + printable(name) + "\"");
    return *t;
  }

  /// The raw little-endian bytes of a tensor, inside the map; Access::read
  /// files have none (state_error): use read_bytes().
  const std::uint8_t* bytes(const TensorInfo& t) const {
    if (bytes_->data() == nullptr)
      throw state_error(source_ + ": opened with Access::read, which maps nothing; use read_bytes() or matrix()");
    return data_start() + t.data_begin;
  }

  /// Copies bytes [offset, offset + n) of tensor `t`'s data into `out`.
  void read_bytes(const TensorInfo& t, std::uint64_t offset, void* out, std::size_t n) const {
    if (offset > t.nbytes() || n > t.nbytes() - offset)
      throw config_error(source_ + ": read of bytes [" + std::to_string(offset) + ", " + std::to_string(offset + n) +
                         ") of tensor \"" + printable(t.name) + "\", which has " + std::to_string(t.nbytes()));
    bytes_->read(8 + header_.header_size + t.data_begin + offset, out, n);
  }

  /// Throws io_error when a file opened with Access::read was truncated or
  /// rewritten since it was opened; a no-op for mapped files.
  void check_unchanged() const { bytes_->check_unchanged(); }

  /// A tensor of dtype F16, BF16, F32 or F64 as a (rows, cols) matrix of
  /// Scalar: 2-D tensors keep their shape, 1-D ones become (1, n), 0-D (1, 1).
  template <class Scalar>
  Matrix<Scalar> matrix(std::string_view name) const {
    const TensorInfo& t = at(name);
    auto [rows, cols] = matrix_shape(t);
    Matrix<Scalar> out(rows, cols);
    convert_into(t, out.data());
    return out;
  }

  /// Converts tensor `t` into `out`, which has room for t.numel() values.
  template <class Scalar>
  void convert_into(const TensorInfo& t, Scalar* out) const {
    if (!is_float(t.dtype))
      throw format_error(source_ + ": tensor \"" + printable(t.name) + "\" has dtype " + dtype_name(t.dtype) +
                         ", expected one of F16, BF16, F32, F64");
    const std::size_t n = static_cast<std::size_t>(t.numel());
    if (bytes_->data() == nullptr) {  // Access::read: convert chunk by chunk from a small buffer
      const std::size_t width = dtype_size(t.dtype), chunk = (std::size_t{1} << 16) / width;
      std::vector<std::uint8_t> buffer(chunk * width);
      for (std::size_t begin = 0; begin < n; begin += chunk) {
        const std::size_t count = std::min(chunk, n - begin);
        read_bytes(t, begin * width, buffer.data(), count * width);
        convert_values(t.dtype, buffer.data(), count, out + begin);
      }
      return;
    }
    convert_values(t.dtype, bytes(t), n, out);
  }

 private:
  template <class Scalar>
  static void convert_values(Dtype dtype, const std::uint8_t* p, std::size_t n, Scalar* out) {
    for (std::size_t i = 0; i < n; ++i) {
      switch (dtype) {
        case Dtype::F16:
          out[i] = static_cast<Scalar>(half_to_float(load<std::uint16_t>(p + 2 * i)));
          break;
        case Dtype::BF16:
          out[i] = static_cast<Scalar>(bf16_to_float(load<std::uint16_t>(p + 2 * i)));
          break;
        case Dtype::F32:
          out[i] = static_cast<Scalar>(load<float>(p + 4 * i));
          break;
        default:
          out[i] = static_cast<Scalar>(load<double>(p + 8 * i));
          break;
      }
    }
  }

 public:
  /// A zero-copy view of a tensor whose dtype is exactly Scalar's (F32 for
  /// float, F64 for double); throws format_error otherwise or when the data is
  /// not aligned for Scalar. Valid while this File (or a copy) lives.
  template <class Scalar>
  ConstMatrixMap<Scalar> view(std::string_view name) const {
    static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>, "view<float> or view<double>");
    const TensorInfo& t = at(name);
    Dtype want = std::is_same_v<Scalar, float> ? Dtype::F32 : Dtype::F64;
    if (t.dtype != want)
      throw format_error(source_ + ": tensor \"" + printable(t.name) + "\" is " + dtype_name(t.dtype) +
                         ", a view needs " + dtype_name(want) + " (use matrix<>() to convert)");
    const std::uint8_t* p = bytes(t);
    if (reinterpret_cast<std::uintptr_t>(p) % alignof(Scalar) != 0)
      throw format_error(source_ + ": tensor \"" + printable(t.name) +
                         "\" is not aligned for a view (use matrix<>() to copy)");
    auto [rows, cols] = matrix_shape(t);
    return ConstMatrixMap<Scalar>(reinterpret_cast<const Scalar*>(p), rows, cols);
  }

 private:
  File(std::shared_ptr<const lora::detail::FileBytes> bytes, std::string source)
      : bytes_(std::move(bytes)), source_(std::move(source)) {
    header_ = parse_header(bytes_->data(), bytes_->size(), source_);
    for (std::size_t i = 0; i < header_.tensors.size(); ++i) index_.emplace(header_.tensors[i].name, i);
  }
  File(std::shared_ptr<const lora::detail::FileBytes> bytes, std::string source, std::vector<std::uint8_t> head)
      : bytes_(std::move(bytes)), source_(std::move(source)) {
    header_ = parse_header(head.data(), head.size(), source_, bytes_->size());
    for (std::size_t i = 0; i < header_.tensors.size(); ++i) index_.emplace(header_.tensors[i].name, i);
  }

  const std::uint8_t* data_start() const { return bytes_->data() + 8 + header_.header_size; }

  std::pair<Index, Index> matrix_shape(const TensorInfo& t) const {
    if (t.shape.size() > 2)
      throw format_error(source_ + ": tensor \"" + printable(t.name) + "\" has shape " + shape_text(t.shape) +
                         ", expected at most 2 dimensions");
    constexpr auto limit = static_cast<std::uint64_t>(std::numeric_limits<Index>::max());
    for (auto d : t.shape)
      if (d > limit)
        throw format_error(source_ + ": tensor \"" + printable(t.name) + "\" is too large for this platform");
    if (t.shape.size() == 2) return {static_cast<Index>(t.shape[0]), static_cast<Index>(t.shape[1])};
    if (t.shape.size() == 1) return {1, static_cast<Index>(t.shape[0])};
    return {1, 1};
  }

  template <class T>
  static T load(const std::uint8_t* p) {
    T v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }

  std::shared_ptr<const lora::detail::FileBytes> bytes_;
  std::string source_;
  Header header_;
  std::unordered_map<std::string, std::size_t> index_;
};

// ---- writing ---------------------------------------------------------------------

/// Collects tensors and writes them as one safetensors file, the way the
/// reference writer lays them out. Tensors added by add() are converted and
/// owned; add_bytes() borrows bytes the caller keeps alive until save().
class Writer {
 public:
  void set_metadata(const std::string& key, const std::string& value) {
    metadata_[key] = value;
    has_metadata_ = true;
  }

  /// Adds a floating-point matrix as `dtype` (F32, F64, F16 or BF16). The
  /// shape written is (rows, cols) unless `shape` says otherwise (same element
  /// count), e.g. {O} for a bias.
  template <class Derived>
  void add(const std::string& name, const Eigen::MatrixBase<Derived>& m, Dtype dtype = Dtype::F32,
           std::vector<std::uint64_t> shape = {}) {
    if (!is_float(dtype))
      throw config_error(std::string("safetensors::Writer::add: dtype must be F16, BF16, F32 or F64, got ") +
                         dtype_name(dtype));
    if (shape.empty()) shape = {static_cast<std::uint64_t>(m.rows()), static_cast<std::uint64_t>(m.cols())};
    std::uint64_t numel = 1;
    for (auto d : shape) numel *= d;
    if (numel != static_cast<std::uint64_t>(m.size()))
      throw shape_error("safetensors::Writer::add(\"" + name + "\"): shape " + shape_text(shape) + " holds " +
                        std::to_string(numel) + " values, the matrix " + std::to_string(m.size()));
    check_new_name(name);
    Entry e{name, dtype, std::move(shape), {}, nullptr, 0};
    e.owned.resize(static_cast<std::size_t>(m.size()) * dtype_size(dtype));
    std::uint8_t* out = e.owned.data();
    std::size_t k = 0;
    for (Index r = 0; r < m.rows(); ++r) {  // row-major order whatever m's storage
      for (Index c = 0; c < m.cols(); ++c, ++k) {
        double v = static_cast<double>(m(r, c));
        switch (dtype) {
          case Dtype::F16:
            store(out + 2 * k, float_to_half(static_cast<float>(v)));
            break;
          case Dtype::BF16:
            store(out + 2 * k, float_to_bf16(static_cast<float>(v)));
            break;
          case Dtype::F32:
            store(out + 4 * k, static_cast<float>(v));
            break;
          default:
            store(out + 8 * k, v);
            break;
        }
      }
    }
    e.size = e.owned.size();
    entries_.push_back(std::move(e));
  }

  /// Adds raw little-endian bytes (borrowed, not copied): for copying tensors
  /// of any dtype through unchanged.
  void add_bytes(const std::string& name, Dtype dtype, std::vector<std::uint64_t> shape, const std::uint8_t* data,
                 std::size_t size) {
    std::uint64_t numel = 1;
    for (auto d : shape) numel *= d;
    if (numel * dtype_size(dtype) != size)
      throw shape_error("safetensors::Writer::add_bytes(\"" + name + "\"): " + dtype_name(dtype) + " " +
                        shape_text(shape) + " needs " + std::to_string(numel * dtype_size(dtype)) + " bytes, got " +
                        std::to_string(size));
    check_new_name(name);
    entries_.push_back(Entry{name, dtype, std::move(shape), {}, data, size});
  }

  /// As add_bytes, but the writer keeps `bytes` (moved in) until it is destroyed.
  void add_owned_bytes(const std::string& name, Dtype dtype, std::vector<std::uint64_t> shape,
                       std::vector<std::uint8_t> bytes) {
    std::uint64_t numel = 1;
    for (auto d : shape) numel *= d;
    if (numel * dtype_size(dtype) != bytes.size())
      throw shape_error("safetensors::Writer::add_owned_bytes(\"" + name + "\"): " + dtype_name(dtype) + " " +
                        shape_text(shape) + " needs " + std::to_string(numel * dtype_size(dtype)) + " bytes, got " +
                        std::to_string(bytes.size()));
    check_new_name(name);
    const std::size_t size = bytes.size();
    entries_.push_back(Entry{name, dtype, std::move(shape), std::move(bytes), nullptr, size});
  }

  /// Adds tensor `t` of `file` unchanged under `name`, read from the file
  /// while save() writes (so an Access::read file is streamed, never held in
  /// memory whole). Borrows `file`: keep it alive until save().
  void add_from(const std::string& name, const File& file, const TensorInfo& t) {
    check_new_name(name);
    Entry e{name, t.dtype, t.shape, {}, nullptr, static_cast<std::size_t>(t.nbytes())};
    e.file = &file;
    e.tensor = &t;
    entries_.push_back(std::move(e));
  }

  std::size_t size() const { return entries_.size(); }

  /// The header (length prefix not included), padded with spaces to a multiple of 8.
  std::string header() const {
    std::string h = "{";
    bool first = true;
    if (has_metadata_) {
      h += "\"__metadata__\":{";
      bool first_key = true;
      for (const auto& [k, v] : metadata_) {
        h += (first_key ? "" : ",") + nlohmann::json(k).dump() + ":" + nlohmann::json(v).dump();
        first_key = false;
      }
      h += "}";
      first = false;
    }
    std::uint64_t offset = 0;
    for (const Entry* e : ordered()) {
      h += (first ? "" : ",") + nlohmann::json(e->name).dump() + ":{\"dtype\":\"" + dtype_name(e->dtype) +
           "\",\"shape\":[";
      for (std::size_t i = 0; i < e->shape.size(); ++i) h += (i ? "," : "") + std::to_string(e->shape[i]);
      h += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + e->size) + "]}";
      offset += e->size;
      first = false;
    }
    h += "}";
    h.append((8 - h.size() % 8) % 8, ' ');
    return h;
  }

  /// The whole file image.
  std::vector<std::uint8_t> serialize() const {
    std::vector<std::uint8_t> out;
    write_to([&](const void* p, std::size_t n) {
      auto b = static_cast<const std::uint8_t*>(p);
      out.insert(out.end(), b, b + n);
    });
    return out;
  }

  /// Writes the file atomically (temporary file beside it, then rename).
  void save(const std::string& path) const { stage(path).commit(); }

  /// Writes the whole file to a temporary beside `path` without putting it in
  /// place yet (see lora::detail::StagedFile): for saving several files together.
  lora::detail::StagedFile stage(const std::string& path) const {
    return lora::detail::StagedFile(
        path, [&](lora::detail::FileSink& sink) { write_to([&](const void* p, std::size_t n) { sink.write(p, n); }); });
  }

 private:
  struct Entry {
    std::string name;
    Dtype dtype;
    std::vector<std::uint64_t> shape;
    std::vector<std::uint8_t> owned;
    const std::uint8_t* borrowed;
    std::size_t size;
    const File* file = nullptr;  // add_from: copied from the file in chunks
    const TensorInfo* tensor = nullptr;
    const std::uint8_t* data() const { return borrowed ? borrowed : owned.data(); }
  };

  void check_new_name(const std::string& name) const {
    if (name == "__metadata__") throw config_error("safetensors::Writer: a tensor may not be named \"__metadata__\"");
    for (const Entry& e : entries_)
      if (e.name == name) throw config_error("safetensors::Writer: tensor \"" + name + "\" added twice");
  }

  // The reference order: larger dtypes first (alignment), then by name.
  std::vector<const Entry*> ordered() const {
    std::vector<const Entry*> order;
    for (const Entry& e : entries_) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
      if (a->dtype != b->dtype) return a->dtype > b->dtype;
      return a->name < b->name;
    });
    return order;
  }

  template <class Sink>
  void write_to(Sink&& sink) const {
    std::string h = header();
    std::uint8_t length[8];
    std::uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) length[i] = static_cast<std::uint8_t>(n >> (8 * i));
    sink(length, 8);
    sink(h.data(), h.size());
    std::vector<std::uint8_t> buffer;
    for (const Entry* e : ordered()) {
      if (e->file == nullptr) {
        sink(e->data(), e->size);
        continue;
      }
      buffer.resize(std::min<std::size_t>(e->size, std::size_t{1} << 20));
      for (std::size_t done = 0; done < e->size; done += buffer.size()) {
        const std::size_t n = std::min(buffer.size(), e->size - done);
        e->file->read_bytes(*e->tensor, done, buffer.data(), n);
        sink(buffer.data(), n);
      }
    }
  }

  template <class T>
  static void store(std::uint8_t* p, T v) {
    std::memcpy(p, &v, sizeof v);
  }

  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
  bool has_metadata_ = false;
};

/// Reading bitsandbytes' 4-bit weights lives in <lora/quant_io.hpp> (with the low-precision kernels), which fills
/// this in when it is included; peft::merge_adapter_file goes through it, so a program that never includes that
/// header never compiles the kernels, and one whose base holds 4-bit weights is told which header to include.
struct Nf4Access {
  /// The weight's logical (rows, cols), from its quant state, every tensor checked (throws format_error, shape_error).
  std::pair<Index, Index> (*shape)(const File& file, const std::string& weight) = nullptr;
  /// The weight decoded to float (rows, cols).
  Matrix<float> (*decode)(const File& file, const std::string& weight) = nullptr;
  /// The dtype the quant state says the weight computes in.
  Dtype (*compute_dtype)(const File& file, const std::string& weight) = nullptr;
};
inline Nf4Access& nf4_access() {
  static Nf4Access access;
  return access;
}

}  // namespace lora::safetensors
