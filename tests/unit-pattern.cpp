// ModulePattern, PEFT's rank_pattern / alpha_pattern matcher: every answer
// agrees with Python's re (tests/golden/make_pattern_golden.py), refusals
// name the key and the construct, and hostile keys finish.
#include <catch2/catch.hpp>

// The header is internal: the tests reach it as <lora/peft.hpp> does.
#define LORA_INSIDE_LIBRARY
#include <lora/detail/pattern.hpp>

#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_pattern {

using Catch::Contains;
using lora::detail::ModulePattern;

namespace {

const nlohmann::json& golden() {
  static const nlohmann::json j = [] {
    std::ifstream in(std::string(LORA_TEST_DATA_DIR) + "/peft/pattern_golden.json", std::ios::binary);
    REQUIRE(in.good());
    return nlohmann::json::parse(in);
  }();
  return j;
}

bool matches(const std::string& key, const std::string& module) { return ModulePattern(key).matches(module); }

// The message of the config_error that compiling `key` throws, or "" when it compiles.
std::string refusal(const std::string& key) {
  try {
    ModulePattern p(key);
  } catch (const lora::config_error& e) {
    return e.what();
  }
  return "";
}

// "key / module: expected ..." for a failure list, printable on one line.
std::string describe(const std::string& key, const std::string& module, const std::string& what) {
  return "\"" + lora::printable(key) + "\" / \"" + lora::printable(module) + "\": " + what;
}

std::string first_lines(const std::vector<std::string>& lines, std::size_t n = 20) {
  std::string out;
  for (std::size_t i = 0; i < lines.size() && i < n; ++i) out += lines[i] + "\n";
  return out;
}

}  // namespace

TEST_CASE("pattern matches PEFT keys as Python re.match does around them", "[pattern]") {
  // A plain key is a suffix that starts at a '.' or at the start.
  CHECK(matches("q_proj", "model.layers.0.self_attn.q_proj"));
  CHECK(matches("q_proj", "q_proj"));
  CHECK_FALSE(matches("q_proj", "model.layers.0.self_attn.xq_proj"));
  CHECK_FALSE(matches("q_proj", "model.layers.0.self_attn.q_proj.base_layer"));
  // '.' in a key is any character but '\n'.
  CHECK(matches("layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"));
  CHECK(matches("layers.0.self_attn.q_proj", "model.layersX0.self_attn.q_proj"));
  CHECK_FALSE(matches("layers\\.0\\.self_attn\\.q_proj", "model.layersX0.self_attn.q_proj"));
  // Regex keys, as PEFT writes them.
  CHECK(matches("layers\\.\\d+\\.mlp\\..*", "model.layers.12.mlp.down_proj"));
  CHECK_FALSE(matches("layers\\.\\d+\\.mlp\\..*", "model.layers.12.self_attn.q_proj"));
  CHECK(matches("layers\\.17\\.self_attn\\.(q|v)_proj", "model.layers.17.self_attn.v_proj"));
  CHECK_FALSE(matches("layers\\.17\\.self_attn\\.(q|v)_proj", "model.layers.17.self_attn.k_proj"));
  // ^ anchors at the start of the module path, so the optional prefix must be empty.
  CHECK(matches("^model\\.layers\\.1\\..*", "model.layers.1.mlp.up_proj"));
  CHECK_FALSE(matches("^model\\.layers\\.1\\..*", "base_model.model.layers.1.mlp.up_proj"));
  // $ also matches just before a final '\n'; (.*\.) does not cross a newline.
  CHECK(matches("q_proj", "model.q_proj\n"));
  CHECK_FALSE(matches("q_proj", "model.q_proj\n\n"));
  CHECK_FALSE(matches("q_proj", "mod\nel.q_proj"));
  CHECK_FALSE(matches("q_proj\\Z", "model.q_proj\n"));
  // The empty key matches "" and paths that end in '.'.
  CHECK(matches("", ""));
  CHECK(matches("", "model."));
  CHECK_FALSE(matches("", "model"));
  // A '{' that does not start a repetition is a literal.
  CHECK(matches("a{1,2", "a{1,2"));
  CHECK(matches("a{,2}", "aa"));
  // The key is read inside PEFT's wrapper, as Python reads it: "a)|(b" is "(.*\.)?(a)|(b)$".
  CHECK(matches("a)|(b", "x.ab"));
  CHECK(matches("a)|(b", "x.a"));
  CHECK_FALSE(matches("a)|(b", "x.b"));
  // `.` takes one code point.
  CHECK(matches("x.y", "x\xc3\xa9y"));
  CHECK(ModulePattern("q_proj").key() == "q_proj");
}

TEST_CASE("pattern agrees with Python's re on every golden case", "[pattern][golden]") {
  const auto& cases = golden().at("cases");
  REQUIRE(cases.size() > 15000);
  std::map<std::string, ModulePattern> compiled;
  std::vector<std::string> failures;
  std::size_t matching = 0;
  for (const auto& c : cases) {
    const auto key = c.at(0).get<std::string>();
    const auto module = c.at(1).get<std::string>();
    const bool expected = c.at(2).get<bool>();
    matching += expected;
    auto it = compiled.find(key);
    if (it == compiled.end()) {
      try {
        it = compiled.emplace(key, ModulePattern(key)).first;
      } catch (const lora::config_error& e) {
        failures.push_back(describe(key, module, std::string("refused: ") + e.what()));
        continue;
      }
    }
    if (it->second.matches(module) != expected)
      failures.push_back(
          describe(key, module, expected ? "Python matches, this does not" : "this matches, Python does not"));
  }
  INFO(first_lines(failures));
  CHECK(failures.empty());
  // Both answers are well represented, so a matcher that always says one thing fails.
  CHECK(matching > 3000);
  CHECK(cases.size() - matching > 3000);
}

TEST_CASE("pattern gives re.ASCII answers where Unicode classes differ", "[pattern][golden]") {
  const auto& cases = golden().at("ascii_differs");
  REQUIRE(cases.size() > 50);
  std::vector<std::string> failures;
  for (const auto& c : cases) {
    const auto key = c.at(0).get<std::string>();
    const auto module = c.at(1).get<std::string>();
    const bool unicode = c.at(2).get<bool>(), ascii = c.at(3).get<bool>();
    REQUIRE(unicode != ascii);
    if (matches(key, module) != ascii) failures.push_back(describe(key, module, "not re.ASCII's answer"));
  }
  INFO(first_lines(failures));
  CHECK(failures.empty());
}

TEST_CASE("pattern refuses keys outside its linear-time subset, naming key and construct", "[pattern][golden]") {
  const auto& refused = golden().at("refused");
  REQUIRE(refused.size() > 100);
  std::vector<std::string> failures;
  for (const auto& r : refused) {
    const auto key = r.at(0).get<std::string>();
    const auto construct = r.at(1).get<std::string>();
    const std::string message = refusal(key);
    if (message.empty())
      failures.push_back(describe(key, "", "accepted"));
    else if (message.find("\"" + lora::printable(key.substr(0, 120))) == std::string::npos ||
             message.find(construct) == std::string::npos ||
             message.find("linear-time subset of Python's re") == std::string::npos ||
             message.find("not a valid Python regular expression") != std::string::npos)
      failures.push_back(describe(key, "", "message \"" + message + "\" does not name the key and " + construct));
  }
  INFO(first_lines(failures));
  CHECK(failures.empty());
}

TEST_CASE("pattern refuses every key Python's re rejects", "[pattern][golden]") {
  const auto& rejects = golden().at("python_rejects");
  REQUIRE(rejects.size() > 300);
  std::vector<std::string> failures;
  for (const auto& r : rejects) {
    const auto key = r.at(0).get<std::string>();
    const std::string message = refusal(key);
    if (message.empty())
      failures.push_back(describe(key, "", "accepted; Python: " + r.at(1).get<std::string>()));
    else if (message.find("\"" + lora::printable(key)) == std::string::npos)
      failures.push_back(describe(key, "", "message \"" + message + "\" does not name the key"));
  }
  INFO(first_lines(failures));
  CHECK(failures.empty());
}

TEST_CASE("pattern messages say where in the key and what", "[pattern]") {
  CHECK(refusal("a{3,1}") ==
        "pattern key \"a{3,1}\" is not a valid Python regular expression: min repeat greater than max repeat "
        "(at byte 1)");
  CHECK_THAT(refusal("layers\\.(?=0)"), Contains("pattern key \"layers\\.(?=0)\": the lookahead assertion (?=...) "
                                                 "(at byte 8) is not supported; only a linear-time subset"));
  CHECK_THAT(refusal("q_proj\\"), Contains("missing ), unterminated subpattern (at the end of the key)"));
  CHECK_THAT(refusal("\xc3\xa9\\q"), Contains("bad escape \\q (at byte 2)"));
  CHECK_THAT(refusal("[z-a]"), Contains("bad character range z-a (at byte 1)"));
  // Control characters in the key are escaped in the message.
  CHECK_THAT(refusal("\n)"), Contains("pattern key \"\\n)\" is not a valid"));
  CHECK_THAT(refusal("a\xff"), Contains("pattern key \"a\\xff\" is not valid UTF-8 (at byte 1)"));
  CHECK_THAT(refusal(std::string(1025, 'a')), Contains("is 1025 bytes, more than the limit of 1024"));
}

TEST_CASE("pattern refuses module paths it cannot match", "[pattern]") {
  const ModulePattern literal("q_proj"), regex("(q|v)_proj");
  for (const auto* p : {&literal, &regex}) {
    CHECK(p->matches(std::string(4089, 'a') + ".q_proj"));  // 4096 bytes: the limit
    CHECK_THROWS_WITH(p->matches(std::string(4090, 'a') + ".q_proj"),
                      Contains("is 4097 bytes, more than the limit of 4096"));
    CHECK_THROWS_WITH(p->matches("model.\xc0\xae.q_proj"), Contains("is not valid UTF-8 (at byte 6)"));
    CHECK_THROWS_WITH(p->matches("model.\xed\xa0\x80.q_proj"), Contains("is not valid UTF-8"));  // a surrogate
  }
}

// Each of these takes exponential time in a backtracking engine (Python and
// std::regex alike) or overflows std::regex's stack. There is no timing
// assertion: a hang fails the test by ctest's timeout.
TEST_CASE("pattern hostile keys finish", "[pattern]") {
  // Subjects of 4096 bytes. The ones that do not match hold the string the key requires (the 'b' of
  // "(a+)+b"), so the NFA runs rather than the check for required strings ending the search.
  const std::string as(4096, 'a');
  const auto with = [](const char* head) { return head + std::string(4096 - std::strlen(head), 'a'); };
  CHECK(matches("(a+)+b", std::string(4095, 'a') + "b"));
  CHECK_FALSE(matches("(a+)+b", with("b")));
  CHECK_FALSE(matches("(a+)+b", as));
  CHECK_FALSE(matches("(a*)*c", with("c")));
  CHECK(matches("(a|aa)+$", as));
  CHECK_FALSE(matches("(a|aa)+$", with("b")));
  CHECK_FALSE(matches("(.*)*x", with("x")));
  CHECK(matches("((((a*)*)*)*)*", as));
  CHECK_FALSE(matches("((((a*)*)*)*)*", with("b")));
  CHECK(matches("(?:a|a)*(?:a|a)*(?:a|a)*", as));
  CHECK_FALSE(matches("(?:a|a)*(?:a|a)*(?:a|a)*", with("b")));
  CHECK_FALSE(matches("(?:a*)*\\b(?:a*)*\\b(?:a*)*", with("_")));  // assertions: the NFA without shortcuts
  std::string dots;
  for (int i = 0; i < 2048; ++i) dots += "a.";
  CHECK(matches("(.*\\.)*", dots));
  CHECK_FALSE(matches("(.*\\.)*b", "b" + dots.substr(1)));

  // A 1024-byte key of nested stars, and one as close to the program limit as a key gets.
  std::string stars;
  while (stars.size() + 5 <= ModulePattern::max_key_bytes) stars += "(a*)*";
  stars += std::string(ModulePattern::max_key_bytes - stars.size(), 'a');
  REQUIRE(stars.size() == ModulePattern::max_key_bytes);
  CHECK(matches(stars, as));
  CHECK_FALSE(matches(stars, with("b")));
  CHECK(matches(".{0,9980}", as));
  CHECK_FALSE(matches(".{0,9980}b", with("b")));
  // After i characters a thread waits in every copy from the i-th on: thousands of live threads per character.
  CHECK(matches("(?:a?){9000}", as));
  CHECK_FALSE(matches("(?:a?){9000}b", with("b")));

  // Deep nesting is refused before it costs stack; 32 levels are fine.
  const std::string deep32 = std::string(32, '(') + "a" + std::string(32, ')');
  CHECK(matches(deep32, "a"));
  CHECK_THAT(refusal(std::string(33, '(') + "a" + std::string(33, ')')), Contains("nested more than 32 deep"));
  CHECK_THAT(refusal(std::string(512, '(') + std::string(512, ')')), Contains("nested more than 32 deep"));
  CHECK_THAT(refusal(std::string(1024, '(')), Contains("nested more than 32 deep"));
  // Counted repetitions are expanded, so their product is capped.
  CHECK_THAT(refusal("(a{1000}){1000}"), Contains("more than 20000 NFA instructions"));
  CHECK_THAT(refusal("((((a{99}){99}){99}){99}){99}"), Contains("more than 20000 NFA instructions"));
  CHECK_THAT(refusal("a{4294967294}"), Contains("more than 20000 NFA instructions"));
  // ... except of what matches only "": Python takes 4294967294 empty steps here, this takes none.
  CHECK(matches("(?:){4294967294}", "x."));
  CHECK_FALSE(matches("(?:){4294967294}", "x"));
  CHECK(matches("((?:){4294967294}){4294967294}", ""));
}

}  // namespace unit_pattern
