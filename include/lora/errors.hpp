// Exception types. Bad input from a caller throws one of these, with a
// message that names what was expected and what came; the object the call
// was made on is left as it was. Internal invariants use assert.
#pragma once

#include <cstdint>
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace lora {

/// Base of every exception the library throws.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An argument has the wrong shape: "x: expected (N, 1024), got (32, 512)".
class shape_error : public error {
 public:
  using error::error;
};

/// A configuration value is out of range (r < 0, dropout outside [0, 1), ...).
class config_error : public error {
 public:
  using error::error;
};

/// The call is not allowed in the object's current state (training while
/// merged, merging a read-only weight, backward without a training forward).
class state_error : public error {
 public:
  using error::error;
};

/// A computation would produce non-finite values (an unsafe merge, a
/// non-finite gradient norm when asked to refuse one).
class numeric_error : public error {
 public:
  using error::error;
};

/// A file's contents are malformed or not what was asked for (a bad
/// safetensors header, a missing adapter tensor): "<file>: <what is wrong>".
class format_error : public error {
 public:
  using error::error;
};

/// The file system refused (a file that cannot be opened, a write that fails):
/// "<file>: <operation>: <reason>". A failed save leaves the previous file as it was.
class io_error : public error {
 public:
  using error::error;
};

/// A number as an error message writes it: shortest of fixed and scientific (1e-08, not 0.000000).
inline std::string value_string(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

/// `text` made safe to print on a terminal or in a one-line message: C0
/// controls (newline included), DEL and the C1 controls are escaped as \n,
/// \t, \r or \xNN; Unicode bidirectional overrides and isolates (U+202A-E,
/// U+2066-9), which reorder what a terminal shows, as \u202e; bytes that are
/// not UTF-8 as \xNN. Names read from files (tensor names, module paths,
/// config keys) go through it before they reach a message or a terminal.
inline std::string printable(std::string_view text) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(text.size());
  auto escape_byte = [&](unsigned char c) {
    out += "\\x";
    out += hex[c >> 4];
    out += hex[c & 15];
  };
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  for (std::size_t i = 0; i < n;) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      if (c == '\n') {
        out += "\\n";
      } else if (c == '\t') {
        out += "\\t";
      } else if (c == '\r') {
        out += "\\r";
      } else if (c < 0x20 || c == 0x7f) {
        escape_byte(c);
      } else {
        out += static_cast<char>(c);
      }
      ++i;
      continue;
    }
    // Decode one UTF-8 sequence strictly; anything else is escaped byte by byte.
    std::size_t len = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    std::uint32_t cp = len == 2 ? c & 0x1fu : len == 3 ? c & 0x0fu : c & 0x07u;
    bool ok = len != 0 && i + len <= n;
    for (std::size_t k = 1; ok && k < len; ++k) {
      if ((s[i + k] & 0xc0) != 0x80) ok = false;
      cp = (cp << 6) | (s[i + k] & 0x3fu);
    }
    if (ok &&
        ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff))))
      ok = false;
    if (!ok) {
      escape_byte(c);
      ++i;
      continue;
    }
    if ((cp >= 0x80 && cp <= 0x9f) || (cp >= 0x202a && cp <= 0x202e) || (cp >= 0x2066 && cp <= 0x2069)) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(cp));
      out += buf;
    } else {
      out.append(text.substr(i, len));
    }
    i += len;
  }
  return out;
}

}  // namespace lora
