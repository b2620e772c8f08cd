// Exception types. Bad input from a caller throws one of these, with a
// message that names what was expected and what came; the object the call
// was made on is left as it was. Internal invariants use assert.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

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

}  // namespace lora
