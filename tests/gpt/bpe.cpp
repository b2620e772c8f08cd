// gpt::BpeTokenizer, GPT-2's byte-level BPE (examples/gpt/bpe.hpp): every answer agrees with a port of OpenAI's
// encoder.py on Python's `regex` (tests/golden/make_bpe_golden.py, data in tests/data/gpt/bpe), small cases are
// worked out by hand, and bad files and ids are refused with messages that name them.
#include <catch2/catch.hpp>

#include <gpt/bpe.hpp>

#include "../test_files.hpp"

#include <nlohmann/json.hpp>

#if defined(__unix__)
#include <sys/stat.h>
#endif

#include <cstdint>
#include <fstream>
#include <future>
#include <string>
#include <utility>
#include <vector>

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_gpt_bpe {

using Catch::Contains;
using gpt::BpeTokenizer;
using lora_test::error_of;

namespace {

const std::string data_dir = std::string(LORA_TEST_DATA_DIR) + "/gpt/bpe";

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return nlohmann::json::parse(in);
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2)
    out += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  return out;
}

std::string show(const std::vector<int>& ids) {
  std::string out = "[";
  for (std::size_t i = 0; i < ids.size(); ++i) out += (i ? ", " : "") + std::to_string(ids[i]);
  return out + "]";
}

// Checks every case of <dir>/cases.json against `bpe`: pre-tokens, ids, and the round trip through decode.
// Returns one line per disagreement.
std::vector<std::string> check_cases(const BpeTokenizer& bpe, const std::string& dir, std::size_t& count) {
  std::vector<std::string> failures;
  const auto cases = read_json(dir + "/cases.json");
  count = cases.size();
  for (const auto& c : cases) {
    const bool raw = c.contains("hex");
    const std::string text = raw ? from_hex(c["hex"].get<std::string>()) : c["text"].get<std::string>();
    std::vector<std::string> pieces;
    for (const auto& p : c[raw ? "pieces_hex" : "pieces"]) pieces.push_back(raw ? from_hex(p) : p.get<std::string>());
    const auto expected = c["ids"].get<std::vector<int>>();
    const std::string name = "\"" + lora::printable(text) + "\": ";
    if (gpt::pretokenize(text) != pieces) failures.push_back(name + "pre-tokens differ");
    const std::string message = error_of([&] {
      const auto ids = bpe.encode(text);
      if (ids != expected) failures.push_back(name + "expected " + show(expected) + ", got " + show(ids));
      if (bpe.decode(ids) != text) failures.push_back(name + "decode(encode(text)) differs");
    });
    if (message != "accepted") failures.push_back(name + message);
  }
  return failures;
}

std::string first_lines(const std::vector<std::string>& lines, std::size_t n = 20) {
  std::string out;
  for (std::size_t i = 0; i < lines.size() && i < n; ++i) out += lines[i] + "\n";
  return out;
}

// A tokenizer folder with these two files in a scratch folder of its own.
std::string write_tokenizer(const std::string& name, const std::string& vocab_json, const std::string& merges_txt) {
  const auto dir = lora_test::scratch_dir("bpe-" + name);
  lora_test::write_text(dir / "vocab.json", vocab_json);
  lora_test::write_text(dir / "merges.txt", merges_txt);
  return dir.string();
}

// Ten tokens, four merges, worked by hand below. "Ġ" is the space's byte character (byte 32 -> U+0120).
BpeTokenizer hello_tokenizer() {
  return BpeTokenizer({{"h", 0},
                       {"e", 1},
                       {"l", 2},
                       {"o", 3},
                       {"\xc4\xa0", 4},  // Ġ
                       {"ll", 5},
                       {"he", 6},
                       {"hell", 7},
                       {"\xc4\xa0he", 8},  // Ġhe
                       {"<|endoftext|>", 9}},
                      {{"l", "l"}, {"h", "e"}, {"he", "ll"}, {"\xc4\xa0", "he"}});  // ranks 0, 1, 2, 3
}

}  // namespace

TEST_CASE("BPE: every case of the oracle encodes to encoder.py's ids and decodes back", "[bpe]") {
  const auto bpe = BpeTokenizer::load(data_dir);
  CHECK(bpe.vocab_size() == 557);  // 256 bytes + 300 merges + <|endoftext|>
  CHECK(bpe.token_id("<|endoftext|>") == 556);
  CHECK(bpe.token_id("\xc4\xa0the") == 266);  // "Ġthe"
  CHECK_FALSE(bpe.token_id("not a token").has_value());
  std::size_t count = 0;
  const auto failures = check_cases(bpe, data_dir, count);
  CHECK(count == 702);
  INFO(failures.size() << " of " << count << " cases disagree:\n" << first_lines(failures));
  CHECK(failures.empty());
}

TEST_CASE("BPE: merges in any rank order are applied round by round, as encoder.py does", "[bpe]") {
  // shuffled/: merges that rank before the merges that make their parts, a pair listed twice, a gap in the ids.
  const auto bpe = BpeTokenizer::load(data_dir + "/shuffled");
  std::size_t count = 0;
  const auto failures = check_cases(bpe, data_dir + "/shuffled", count);
  CHECK(count == 305);
  INFO(failures.size() << " of " << count << " cases disagree:\n" << first_lines(failures));
  CHECK(failures.empty());

  int known = 0, gap = -1;
  for (int id = 0; id < bpe.vocab_size(); ++id) {
    if (error_of([&] { bpe.decode({id}); }) == "accepted") {
      ++known;
    } else {
      gap = id;
    }
  }
  CHECK(known == bpe.vocab_size() - 1);
  CHECK_THAT(error_of([&] { bpe.decode({gap}); }), Contains("id " + std::to_string(gap) + " at position 0"));
}

TEST_CASE("BPE: letters, numbers and spaces are the code points of regex's L, N and White_Space", "[bpe]") {
  using gpt::detail::CharClass;
  const auto classes = read_json(data_dir + "/classes.json");
  const std::vector<std::pair<std::string, CharClass>> names = {
      {"L", CharClass::letter}, {"N", CharClass::number}, {"S", CharClass::space}, {"O", CharClass::other}};
  std::size_t checked = 0;
  std::vector<std::string> failures;
  for (const auto& [name, cls] : names) {
    for (const auto& cp : classes[name]) {
      ++checked;
      if (gpt::detail::char_class(cp.get<std::uint32_t>()) != cls)
        failures.push_back("U+" + std::to_string(cp.get<std::uint32_t>()) + " (decimal): expected " + name);
    }
  }
  CHECK(checked > 5000);
  INFO(first_lines(failures));
  CHECK(failures.empty());
}

TEST_CASE("BPE: hand-worked cases with a ten-token vocabulary", "[bpe]") {
  const auto bpe = hello_tokenizer();
  CHECK(bpe.vocab_size() == 10);
  // "hello": h e l l o -> (l,l) rank 0: h e ll o -> (h,e) rank 1: he ll o -> (he,ll) rank 2: hell o; (hell,o) has no
  // rank: hell=7, o=3.
  CHECK(bpe.encode("hello") == std::vector<int>{7, 3});
  // " hello" is one piece: Ġ h e l l o -> Ġ h e ll o -> Ġ he ll o; now (he,ll) rank 2 beats (Ġ,he) rank 3:
  // Ġ hell o = 4, 7, 3.
  CHECK(bpe.encode(" hello") == std::vector<int>{4, 7, 3});
  // " he": Ġ h e -> Ġ he -> (Ġ,he) rank 3: Ġhe = 8.
  CHECK(bpe.encode(" he") == std::vector<int>{8});
  // "lll": (l,l) merges left to right, once: ll l = 5, 2.
  CHECK(bpe.encode("lll") == std::vector<int>{5, 2});
  // "hello hello": pieces "hello", " hello".
  CHECK(bpe.encode("hello hello") == std::vector<int>{7, 3, 4, 7, 3});
  // "he  he": pieces "he", " ", " he" (the first space stays behind: \s+(?!\S)) = 6, 4, 8.
  CHECK(bpe.encode("he  he") == std::vector<int>{6, 4, 8});
  CHECK(bpe.encode("").empty());
  CHECK(bpe.decode({7, 3, 4, 7, 3}) == "hello hello");
  CHECK(bpe.decode({9}) == "<|endoftext|>");
  CHECK(bpe.decode({}).empty());
  CHECK(bpe.token_id("<|endoftext|>") == 9);
}

TEST_CASE("BPE: each round merges all of one pair before the pairs it makes", "[bpe]") {
  // Ranks: (ab,a) 0, (a,b) 1. "abab": only (a,b) is present, so the round merges both: ab ab = 2, 2; (ab,ab) has no
  // rank. Merging one occurrence at a time would give aba b = 3, 1.
  const BpeTokenizer bpe({{"a", 0}, {"b", 1}, {"ab", 2}, {"aba", 3}}, {{"ab", "a"}, {"a", "b"}});
  CHECK(bpe.encode("abab") == std::vector<int>{2, 2});
  // "aba": ab a -> (ab,a) rank 0: aba = 3.
  CHECK(bpe.encode("aba") == std::vector<int>{3});

  // A pair listed twice takes its later rank: (a,b) 2, (b,c) 1, so "abc" is a bc = 0, 4.
  const BpeTokenizer twice({{"a", 0}, {"b", 1}, {"c", 2}, {"ab", 3}, {"bc", 4}}, {{"a", "b"}, {"b", "c"}, {"a", "b"}});
  CHECK(twice.encode("abc") == std::vector<int>{0, 4});
}

TEST_CASE("BPE: bytes_to_unicode is encoder.py's table", "[bpe]") {
  const auto& t = gpt::bytes_to_unicode();
  CHECK(t[32] == 0x120);  // 'Ġ'
  CHECK(t[10] == 0x10A);  // 'Ċ'
  CHECK(t[33] == U'!');
  CHECK(t[0] == 0x100);
  CHECK(t[127] == 0x121);  // the 34th byte that is not printable
  CHECK(t[160] == 0x142);
  CHECK(t[173] == 0x143);  // the soft hyphen, the last one
  CHECK(t[0xA1] == 0xA1);
  CHECK(t[0xFF] == 0xFF);
  CHECK(gpt::byte_symbol(32) == "\xc4\xa0");
  CHECK(gpt::byte_symbol(10) == "\xc4\x8a");
  std::vector<bool> seen(0x144);
  for (char32_t c : t) {
    REQUIRE(c < seen.size());
    CHECK_FALSE(seen[c]);
    seen[c] = true;
  }
}

TEST_CASE("BPE: pre-tokens follow GPT-2's pattern", "[bpe]") {
  using V = std::vector<std::string>;
  CHECK(gpt::pretokenize("I'm  here\n\n") == V{"I", "'m", " ", " here", "\n\n"});
  CHECK(gpt::pretokenize("IT'S it's") == V{"IT", "'", "S", " it", "'s"});  // contractions are lowercase only
  CHECK(gpt::pretokenize("x \t y") == V{"x", " \t", " y"});                // the last space goes with the word
  CHECK(gpt::pretokenize("a\n b") == V{"a", "\n", " b"});                  // a run of one before a word: \s+
  CHECK(gpt::pretokenize("caf\xc3\xa9 42!?") == V{"caf\xc3\xa9", " 42", "!?"});
  CHECK(gpt::pretokenize("e\xcc\x81") == V{"e", "\xcc\x81"});  // a combining mark is not a letter
  CHECK(gpt::pretokenize("a\xc2\xa0") == V{"a", "\xc2\xa0"});  // U+00A0 is White_Space
  CHECK(gpt::pretokenize("x\x1c") == V{"x", "\x1c"});          // U+001C is not (in `regex`)
  CHECK(gpt::pretokenize("").empty());
}

TEST_CASE("BPE: bytes that are not UTF-8 are characters of their own and keep their bytes", "[bpe]") {
  using V = std::vector<std::string>;
  // Each bad byte is one "other" character: it joins punctuation, not letters, and a space before it.
  CHECK(gpt::pretokenize("a\xff z") == V{"a", "\xff", " z"});
  CHECK(gpt::pretokenize("!\x80? \xfe") == V{"!\x80?", " \xfe"});
  CHECK(gpt::pretokenize("caf\xc3") == V{"caf", "\xc3"});              // cut short at the end
  CHECK(gpt::pretokenize("\xe2\x82 A") == V{"\xe2\x82", " A"});        // cut short before a word
  CHECK(gpt::pretokenize("\xed\xa0\x80x") == V{"\xed\xa0\x80", "x"});  // a surrogate's encoding
  CHECK(gpt::pretokenize("x\xc1\x81") == V{"x", "\xc1\x81"});          // overlong 'A' is no letter
  CHECK(gpt::pretokenize("x\xe0\x81\x81") == V{"x", "\xe0\x81\x81"});
  CHECK(gpt::pretokenize("x\xf0\x80\x81\x81") == V{"x", "\xf0\x80\x81\x81"});
  CHECK(gpt::pretokenize("\xf4\x90\x80\x80") == V{"\xf4\x90\x80\x80"});  // above U+10FFFF
  const auto bpe = BpeTokenizer::load(data_dir);
  for (const std::string text : {"\xff", "a\xff z", "\xc3\xa9\xa9", "\xf0\x9f\x98"}) {
    const auto ids = bpe.encode(text);
    CHECK(bpe.decode(ids) == text);
  }
  CHECK(bpe.encode("\xff") == std::vector<int>{bpe.token_id("\xc3\xbf").value()});  // byte 0xFF's token "ÿ"
}

TEST_CASE("BPE: one tokenizer encodes from several threads at once", "[bpe]") {
  const auto bpe = BpeTokenizer::load(data_dir);
  const auto cases = read_json(data_dir + "/cases.json");
  std::string text;
  for (const auto& c : cases)
    if (c.contains("text")) text += c["text"].get<std::string>();
  const auto expected = bpe.encode(text);
  std::vector<std::future<std::vector<int>>> runs;
  for (int t = 0; t < 4; ++t) runs.push_back(std::async(std::launch::async, [&] { return bpe.encode(text); }));
  for (auto& r : runs) CHECK(r.get() == expected);
  const BpeTokenizer copy = bpe;  // starts with a cache of its own
  CHECK(copy.encode(text) == expected);
}

TEST_CASE("BPE: files that are missing or malformed are refused with the file named", "[bpe]") {
  const std::string missing = lora_test::scratch_dir("bpe-missing").string();
  CHECK_FALSE(BpeTokenizer::available(missing));
  CHECK(BpeTokenizer::available(data_dir));
  CHECK_THROWS_AS(BpeTokenizer::load(missing), lora::io_error);
  CHECK_THAT(error_of([&] { BpeTokenizer::load(missing); }),
             Contains(missing + "/vocab.json: cannot open: No such file or directory"));

  const std::string good_vocab = R"({"a": 0, "b": 1, "ab": 2})";
  const std::string good_merges = "#version: 0.2\na b\n";
  CHECK(BpeTokenizer::load(write_tokenizer("good", good_vocab, good_merges)).encode("ab") == std::vector<int>{2});
  // Blank lines and "\r\n" line ends are read; no "#version" line is needed.
  CHECK(BpeTokenizer::load(write_tokenizer("crlf", good_vocab, "a b\r\n\r\n")).encode("abab") ==
        std::vector<int>{2, 2});

  const std::string no_merges = write_tokenizer("no-merges", good_vocab, "");
  std::filesystem::remove(std::filesystem::path(no_merges) / "merges.txt");
  // One of the two is enough to mean BPE, so the missing one is reported rather than bytes used instead.
  CHECK(BpeTokenizer::available(no_merges));
  CHECK_THAT(error_of([&] { BpeTokenizer::load(no_merges); }), Contains(no_merges + "/merges.txt: cannot open"));

  // A FIFO or a directory where vocab.json should be is refused by name, not read until it ends (it never would).
  const std::string fifo = write_tokenizer("fifo", good_vocab, good_merges);
  const std::string fifo_vocab = fifo + "/vocab.json";
  std::filesystem::remove(fifo_vocab);
#if defined(__unix__)
  REQUIRE(::mkfifo(fifo_vocab.c_str(), 0600) == 0);
  CHECK(BpeTokenizer::available(fifo));  // so `gpt generate` loads it and says what is wrong
  CHECK_THAT(error_of([&] { BpeTokenizer::load(fifo); }), Contains(fifo_vocab + ": not a regular file"));
  std::filesystem::remove(fifo_vocab);
#endif
  std::filesystem::create_directory(fifo_vocab);
  CHECK(BpeTokenizer::available(fifo));
  CHECK_THAT(error_of([&] { BpeTokenizer::load(fifo); }), Contains(fifo_vocab + ": not a regular file"));

  struct Bad {
    std::string vocab, merges, file, says;
  };
  const std::vector<Bad> bad = {
      {good_vocab, "#version: 0.2\na b\nab\n", "merges.txt:3",
       "expected two tokens separated by one space, got \"ab\""},
      {good_vocab, "a b c\n", "merges.txt:1", "got \"a b c\""},
      {good_vocab, "a  b\n", "merges.txt:1", "got \"a  b\""},
      {good_vocab, " a\n", "merges.txt:1", "got \" a\""},
      {good_vocab, "a b\n\na\tb\n", "merges.txt:3", "got \"a\\tb\""},  // blank lines count; a tab is no space
      {"[1, 2]", good_merges, "vocab.json", "expected a JSON object of token -> id, got array"},
      {R"({"a": 0, "b": 1.5})", good_merges, "vocab.json", "token \"b\": expected an integer id, got number 1.5"},
      {R"({"a": "0"})", good_merges, "vocab.json", "token \"a\": expected an integer id, got string \"0\""},
      {R"({"a": true})", good_merges, "vocab.json", "expected an integer id, got boolean true"},
      {R"({"a": -1})", good_merges, "vocab.json", "token \"a\": expected an id in [0, 16777215], got -1"},
      {R"({"a": 99999999999})", good_merges, "vocab.json", "got 99999999999"},
      {R"({"a": 0, "b": 0})", good_merges, "vocab.json", "expected one token per id, got id 0 for both"},
      {"{\"\xe4\xb8\xad\": 0}", good_merges, "vocab.json", "got U+4E2D at byte 0"},
      {R"({"a": 0,)", good_merges, "vocab.json", "expected JSON, got a parse error"},
  };
  for (std::size_t i = 0; i < bad.size(); ++i) {
    const std::string dir = write_tokenizer("bad-" + std::to_string(i), bad[i].vocab, bad[i].merges);
    INFO(bad[i].vocab << " / " << bad[i].merges);
    CHECK_THROWS_AS(BpeTokenizer::load(dir), lora::format_error);
    const std::string message = error_of([&] { BpeTokenizer::load(dir); });
    CHECK_THAT(message, Contains(dir + "/" + bad[i].file));
    CHECK_THAT(message, Contains(bad[i].says));
  }
}

TEST_CASE("BPE: unknown ids and pieces missing from the vocabulary are refused by name", "[bpe]") {
  const auto bpe = hello_tokenizer();
  CHECK_THROWS_AS(bpe.decode({7, 99}), lora::config_error);
  CHECK_THAT(error_of([&] { bpe.decode({7, 3, 99}); }), Contains("got id 99 at position 2"));
  CHECK_THAT(error_of([&] { bpe.decode({-1}); }), Contains("got id -1 at position 0"));
  CHECK_THAT(error_of([&] { bpe.decode({10}); }), Contains("ids below 10"));

  // "!" has no token here: the message names the piece and where it came from; the tab is escaped.
  CHECK_THROWS_AS(bpe.encode("hello!"), lora::config_error);
  CHECK_THAT(error_of([&] { bpe.encode("hello!"); }),
             Contains("got \"!\" (from the text's bytes \"!\" at byte 5), which is not"));
  CHECK_THAT(error_of([&] { bpe.encode("he\tx"); }),
             Contains("got \"\xc4\x89\" (from the text's bytes \"\\t\" at byte 2)"));

  CHECK_THAT(error_of([] { BpeTokenizer({{"a", -3}}, {}); }), Contains("token \"a\": expected an id in"));
  CHECK_THAT(error_of([] {
               BpeTokenizer({{"a", 0}}, {{"a", ""}});
             }),
             Contains("BPE merge 0: expected two non-empty tokens, got \"a\" and \"\""));
  CHECK_THAT(error_of([] { BpeTokenizer({{"a\xff", 0}}, {}); }), Contains("got byte 0xff at byte 1"));
}

}  // namespace unit_gpt_bpe
