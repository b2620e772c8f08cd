// What the command-line tools share.
#pragma once

#include <algorithm>
#include <string>

namespace lora_tools {

/// An error message on one line: the library lists several problems on
/// indented lines; a tool's stderr gets one line, problems joined by "; ".
inline std::string one_line(std::string text) {
  for (std::size_t at; (at = text.find(":\n  ")) != std::string::npos;) text.replace(at, 4, ": ");
  for (std::size_t at; (at = text.find("\n  ")) != std::string::npos;) text.replace(at, 3, "; ");
  std::replace(text.begin(), text.end(), '\n', ' ');
  return text;
}

}  // namespace lora_tools
