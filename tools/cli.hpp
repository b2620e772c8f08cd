// What the command-line tools share: reading the command line and reporting
// a refusal the way the README promises: exit status 1, and on stderr a first
// line "<tool>: <message>" that says what failed, followed by one indented
// line per problem when the library found several; every control character
// escaped.
#pragma once

#include <lora/errors.hpp>

#include <CLI/CLI.hpp>

#include <cmath>
#include <iostream>
#include <locale>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

// The CMake project's version, defined by tools/CMakeLists.txt.
#ifndef LORA_TOOLS_VERSION
#error "LORA_TOOLS_VERSION is not defined: build the tools with tools/CMakeLists.txt"
#endif

namespace lora_tools {

/// An error message as the lines the tools print. The library lists several
/// problems on lines indented by two spaces after a summary ending in ':'.
/// One problem stays on the summary's line ("...: 1 problem(s): X"); two or
/// more keep a line each, so a long list reads (and greps) one per line.
/// Every line is escaped (lora::printable): a newline or an escape sequence
/// in a name from a file or the command line shows as \n or \x1b and cannot
/// break a line or forge one.
inline std::vector<std::string> error_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::size_t begin = 0;
  for (std::size_t at; (at = text.find("\n  ", begin)) != std::string::npos; begin = at + 3)
    lines.push_back(text.substr(begin, at - begin));
  lines.push_back(text.substr(begin));
  if (lines.size() == 2) lines = {lines[0] + " " + lines[1]};
  for (std::size_t i = 0; i < lines.size(); ++i) lines[i] = (i == 0 ? "" : "  ") + lora::printable(lines[i]);
  return lines;
}

/// A refusal on stderr: "<tool>: <message>", then the problems, if several,
/// one per indented line.
inline void report_error(const std::string& tool, const std::string& message) {
  std::string out;
  for (const auto& line : error_lines(message)) out += (out.empty() ? tool + ": " : std::string()) + line + '\n';
  std::cerr << out;
}

/// `text` as a double when all of it is one finite number ("0.5", "-2",
/// "1e-3"), read in the "C" locale whatever the user's; nothing for "", " 1",
/// "2x", "nan", "inf" or "1e400".
inline std::optional<double> finite_number(const std::string& text) {
  std::istringstream in(text);
  in.imbue(std::locale::classic());
  double value = 0;
  if (!(in >> std::noskipws >> value) || !in.eof() || !std::isfinite(value)) return std::nullopt;
  return value;
}

/// Adds option `name` that reads a finite number into `value` (left as it is
/// when the option is not given). Anything finite_number refuses, and giving
/// the option twice, is a command-line error naming the option and the text.
inline CLI::Option* add_finite_option(CLI::App& app, const std::string& name, double& value,
                                      const std::string& description) {
  auto set = [&value, name](const std::string& text) {
    const auto number = finite_number(text);
    if (!number) throw CLI::ValidationError(name, "expected a finite number such as 0.5, got \"" + text + "\"");
    value = *number;
  };
  return app.add_option_function<std::string>(name, set, description)
      ->type_name("NUMBER")
      ->multi_option_policy(CLI::MultiOptionPolicy::Throw);
}

/// Reads the command line in place of CLI11_PARSE, after adding --version
/// ("<app name> <project version>"). Returns nothing when the tool should go
/// on, or the status main returns: 0 after printing --help or --version on
/// stdout; 1 for any command-line error, reported as report_error does
/// (CLI11's own message without its "Run with --help" line; an unknown
/// argument before a missing required one).
inline std::optional<int> parse(CLI::App& app, int argc, char** argv) {
  app.set_version_flag("--version", app.get_name() + " " + LORA_TOOLS_VERSION);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // CLI11 checks what is missing before what is unknown, and lists unknown
    // arguments backwards. A typo (--adaptr) is the cause of "--adapter is
    // required", so unknown arguments are reported first, in the order given.
    const auto unknown = app.remaining();
    const bool missing_or_unknown =
        dynamic_cast<const CLI::RequiredError*>(&e) != nullptr || dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr;
    if (unknown.empty() || !missing_or_unknown) {
      report_error(app.get_name(), e.what());
    } else {
      std::string message = unknown.size() > 1 ? "The following arguments were not expected:"
                                               : "The following argument was not expected:";
      for (const auto& argument : unknown) message += " " + argument;
      report_error(app.get_name(), message);
    }
    return 1;
  }
  return std::nullopt;
}

}  // namespace lora_tools
