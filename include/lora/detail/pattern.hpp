// PEFT's rank_pattern / alpha_pattern keys. PEFT's get_pattern_key gives a
// module the value of the first key for which Python's
//   re.match(rf"(.*\.)?({key})$", module)
// succeeds. The keys come from downloaded adapter_config.json files, so they
// are hostile input; std::regex recurses per character and backtracks
// exponentially on them. ModulePattern is a Thompson NFA run as a Pike VM:
// the set of live instructions advances one code point at a time, each
// instruction at most once per position, so a match costs
// O(len(program) x len(module)) time, and no part of matching recurses. The
// parser recurses once per nested group, at most max_group_depth deep. Two
// shortcuts keep common keys cheap: a key of literals and `.` is compared
// from the end of the module path without the NFA, and strings every match
// contains (the "self_attn." of "layers\.\d+\.self_attn\.q_proj") are looked
// for before the NFA runs.
//
// Supported, with Python 3.11 re's meaning (str pattern, no flags):
//   literals; `.` (any code point but '\n'); `\` + a non-alphanumeric
//   character as that character; \n \t \r \f \v \a \\ \xhh \uhhhh \Uhhhhhhhh;
//   \d \D \w \W \s \S; classes [...] and [^...] with ranges, escapes and the
//   shorthands inside ('\b' in a class is a backspace, ']' first is literal);
//   ^ \A (start), $ (end, or just before a final '\n'), \Z (end), \b, \B;
//   groups (...), (?:...), (?P<name>...), comments (?#...); |; the quantifiers
//   * + ? {m} {m,} {m,n} {,n} {,} and their lazy forms *? ... {m,n}?; a '{'
//   that does not start a repetition is a literal '{', as in Python.
// Refused with config_error, as outside the linear-time subset: backreferences
//   (\1, (?P=name)), lookahead and lookbehind, conditionals (?(...), inline
//   flags (?i) and (?i:...), atomic groups (?>...), possessive quantifiers
//   *+ ++ ?+ {m,n}+, octal escapes (\0, \101, [\1]), \N{name}, group names
//   that are not ASCII, groups nested more than max_group_depth deep, and keys
//   whose program (counted repetitions expanded) exceeds max_program_size.
// Refused as Python refuses them: every pattern re.compile rejects (bad
//   escapes such as \q, unbalanced parentheses, nothing to repeat, multiple
//   repeat, [z-a], {3,1}, ...). The key is parsed inside PEFT's wrapper, as
//   Python parses it, so a key such as "a)|(b" means what it means to PEFT.
// Deliberate differences from Python, besides the refusals:
//   \d \w \s \b \B and their negations have their ASCII meaning, as with
//   re.ASCII ([0-9], [A-Za-z0-9_], [ \t\n\r\f\v]); Python's str patterns also
//   take Unicode digits, letters and spaces. PEFT module paths are ASCII.
//   Keys and module paths must be valid UTF-8 (they are decoded to code
//   points, so `.` takes one code point, as in Python); anything else is refused.
// Lazy and greedy quantifiers compile alike: re.match backtracks through
// every way the pattern can match before it gives up, so the order it tries
// them in changes which match it returns, never whether there is one.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#error "lora/detail/pattern.hpp is internal; include <lora/peft.hpp> instead"
#endif

#include <lora/errors.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora::detail {

namespace pattern_impl {

/// Length of the strict UTF-8 sequence at s[i] (no overlongs, surrogates or
/// code points past U+10FFFF), its code point in `cp`; 0 when it is not one.
inline std::size_t utf8_sequence(std::string_view s, std::size_t i, char32_t& cp) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) {
    cp = c;
    return 1;
  }
  const std::size_t len = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
  if (len == 0 || i + len > s.size()) return 0;
  std::uint32_t v = len == 2 ? c & 0x1fu : len == 3 ? c & 0x0fu : c & 0x07u;
  for (std::size_t k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xc0) != 0x80) return 0;
    v = (v << 6) | (b & 0x3fu);
  }
  if (len == 3 && (v < 0x800 || (v >= 0xd800 && v <= 0xdfff))) return 0;
  if (len == 4 && (v < 0x10000 || v > 0x10ffff)) return 0;
  cp = v;
  return len;
}

/// Byte offset of the first byte of `s` that is not part of valid UTF-8, or npos.
inline std::size_t invalid_utf8_at(std::string_view s) {
  char32_t cp = 0;
  for (std::size_t i = 0, len = 0; i < s.size(); i += len)
    if ((len = utf8_sequence(s, i, cp)) == 0) return i;
  return std::string_view::npos;
}

inline std::string utf8(char32_t c) {
  if (c < 0x80) return std::string(1, static_cast<char>(c));
  const int n = c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
  std::string out(n, '\0');
  for (int k = n - 1; k > 0; --k, c >>= 6) out[k] = static_cast<char>(0x80 | (c & 0x3f));
  out[0] = static_cast<char>((n == 2 ? 0xc0 : n == 3 ? 0xe0 : 0xf0) | c);
  return out;
}

/// `text` quoted for a message: printable, and cut after 120 bytes.
inline std::string quoted(std::string_view text) {
  constexpr std::size_t shown = 120;
  if (text.size() <= shown) return "\"" + printable(text) + "\"";
  return "\"" + printable(text.substr(0, shown)) + "\"... (" + std::to_string(text.size()) + " bytes)";
}

inline bool is_word(char32_t c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

inline bool is_one_of(char32_t c, std::string_view chars) {
  return c < 0x80 && chars.find(static_cast<char>(c)) != std::string_view::npos;
}

// Zero-width conditions: begin is ^ and \A, end is $, end_of_string is \Z.
enum class Anchor : std::uint8_t { begin, end, end_of_string, word_boundary, not_word_boundary };

using Ranges = std::vector<std::pair<char32_t, char32_t>>;

/// A set of code points: sorted disjoint ranges, and a bitmap for ASCII.
struct CharClass {
  Ranges ranges;
  std::uint64_t ascii[2] = {0, 0};

  bool contains(char32_t c) const {
    if (c < 128) return (ascii[c >> 6] >> (c & 63)) & 1u;
    auto it = std::upper_bound(ranges.begin(), ranges.end(), std::make_pair(c, char32_t{0x10ffff}));
    return it != ranges.begin() && c <= std::prev(it)->second;
  }

  /// Sorts and merges `ranges` (complemented over U+0000..U+10FFFF when `negate`) and fills the bitmap.
  void finish(bool negate) {
    std::sort(ranges.begin(), ranges.end());
    Ranges merged;
    for (const auto& r : ranges) {
      if (!merged.empty() && r.first <= merged.back().second + 1)
        merged.back().second = std::max(merged.back().second, r.second);
      else
        merged.push_back(r);
    }
    if (negate) {
      Ranges complement;
      char32_t next = 0;
      for (const auto& r : merged) {
        if (r.first > next) complement.emplace_back(next, r.first - 1);
        next = r.second + 1;
      }
      if (next <= 0x10ffff) complement.emplace_back(next, 0x10ffff);
      merged.swap(complement);
    }
    ranges.swap(merged);
    ascii[0] = ascii[1] = 0;
    for (const auto& r : ranges)
      for (char32_t c = r.first; c <= r.second && c < 128; ++c) ascii[c >> 6] |= std::uint64_t{1} << (c & 63);
  }
};

/// \d \w \s with their ASCII meaning, or the complement for \D \W \S.
inline Ranges category_ranges(char32_t letter) {
  CharClass c;
  if (letter == 'd' || letter == 'D')
    c.ranges = {{'0', '9'}};
  else if (letter == 'w' || letter == 'W')
    c.ranges = {{'0', '9'}, {'A', 'Z'}, {'_', '_'}, {'a', 'z'}};
  else
    c.ranges = {{'\t', '\r'}, {' ', ' '}};
  c.finish(letter == 'D' || letter == 'W' || letter == 'S');
  return c.ranges;
}

/// The parsed pattern. Groups stay as nodes because Python's "multiple
/// repeat" check tells `a**` (an error) from `(?:a*)*` (fine).
struct Node {
  enum class Kind : std::uint8_t { empty, literal, any, char_class, assertion, group, concat, alternate, repeat };
  static constexpr std::uint64_t unbounded = ~std::uint64_t{0};
  Kind kind = Kind::empty;
  char32_t ch = 0;                 // literal
  std::uint32_t index = 0;         // char_class: index into the class list
  Anchor anchor = Anchor::begin;   // assertion
  std::uint64_t min = 0, max = 0;  // repeat
  std::vector<Node> children;
};

// Python refuses a repetition count of 2**32 - 1 or more.
constexpr std::uint64_t python_max_repeat = 4294967295u;

/// A recursive-descent copy of Python 3.11's re/_parser.py, run over PEFT's
/// whole pattern "(.*\.)?(" + key + ")$" (or prefix + key + suffix) so that
/// the key is read exactly as Python reads it. Throws config_error for what
/// Python rejects and for what is outside the linear-time subset.
class Parser {
 public:
  Parser(std::string_view key, std::size_t max_depth, std::u32string_view prefix = U"(.*\\.)?(",
         std::u32string_view suffix = U")$")
      : key_(key), max_depth_(max_depth), prefix_length_(prefix.size()) {
    source_.assign(prefix.begin(), prefix.end());
    char32_t cp = 0;
    for (std::size_t i = 0, len = 0; i < key.size(); i += len) {
      len = utf8_sequence(key, i, cp);
      source_.push_back(cp);
      key_offsets_.push_back(i);
    }
    source_.insert(source_.end(), suffix.begin(), suffix.end());
  }

  Node parse() {
    Node root = parse_alternation(0);
    if (pos_ < source_.size()) invalid("unbalanced parenthesis", pos_);
    return root;
  }

  std::vector<CharClass> classes;

 private:
  struct Token {
    char32_t c = 0;
    bool escaped = false;  // a backslash and the character after it
    bool is(char32_t x) const { return !escaped && c == x; }
  };

  std::string_view key_;
  std::size_t max_depth_;
  std::size_t prefix_length_;  // code points of the text before the key
  std::vector<char32_t> source_;
  std::vector<std::size_t> key_offsets_;  // byte offset in the key of each code point of it
  std::size_t pos_ = 0;
  std::set<std::string> group_names_;

  std::string where(std::size_t at) const {
    if (at < prefix_length_ || at - prefix_length_ >= key_offsets_.size()) return "at the end of the key";
    return "at byte " + std::to_string(key_offsets_[at - prefix_length_]);
  }

  [[noreturn]] void invalid(const std::string& what, std::size_t at) const {
    throw config_error("pattern key " + pattern_impl::quoted(key_) +
                       " is not a valid Python regular expression: " + what + " (" + where(at) + ")");
  }

  [[noreturn]] void unsupported(const std::string& what, std::size_t at) const {
    throw config_error("pattern key " + pattern_impl::quoted(key_) + ": " + what + " (" + where(at) +
                       ") is not supported; only a linear-time subset of Python's re is (literals, ., classes, "
                       "\\d \\w \\s, anchors, groups, |, greedy and lazy quantifiers)");
  }

  static std::string text(const Token& t) { return (t.escaped ? "\\" : "") + printable(utf8(t.c)); }

  // Python's tokenizer: "\x" is one token; a lone backslash at the end is an error.
  bool peek(Token& t) const {
    if (pos_ >= source_.size()) return false;
    if (source_[pos_] != '\\') {
      t = {source_[pos_], false};
      return true;
    }
    if (pos_ + 1 >= source_.size()) invalid("bad escape (end of pattern)", pos_);
    t = {source_[pos_ + 1], true};
    return true;
  }
  bool get(Token& t) {
    if (!peek(t)) return false;
    pos_ += t.escaped ? 2 : 1;
    return true;
  }
  bool next_in(std::string_view chars) const {
    Token t;
    return peek(t) && !t.escaped && is_one_of(t.c, chars);
  }
  bool match(char c) {
    if (!next_in(std::string_view(&c, 1))) return false;
    ++pos_;
    return true;
  }

  Node parse_alternation(std::size_t depth) {
    Node alt;
    alt.kind = Node::Kind::alternate;
    alt.children.push_back(parse_sequence(depth));
    while (match('|')) alt.children.push_back(parse_sequence(depth));
    if (alt.children.size() == 1) return std::move(alt.children.front());
    return alt;
  }

  Node parse_sequence(std::size_t depth) {
    Node seq;
    seq.kind = Node::Kind::concat;
    auto& items = seq.children;
    Token t;
    while (peek(t) && !t.is('|') && !t.is(')')) {
      const std::size_t start = pos_;
      get(t);
      if (t.escaped) {
        items.push_back(parse_escape(t, start));
      } else if (!is_one_of(t.c, ".[{()*+?^$")) {
        items.push_back(literal(t.c));
      } else if (t.c == '[') {
        items.push_back(parse_class(start));
      } else if (is_one_of(t.c, "*+?{")) {
        parse_repeat(t.c, start, items);
      } else if (t.c == '.') {
        items.emplace_back().kind = Node::Kind::any;
      } else if (t.c == '(') {
        parse_group(start, depth, items);
      } else {
        items.push_back(assertion(t.c == '^' ? Anchor::begin : Anchor::end));
      }
    }
    if (items.size() == 1) return std::move(items.front());
    if (items.empty()) seq.kind = Node::Kind::empty;
    return seq;
  }

  static Node literal(char32_t c) {
    Node n;
    n.kind = Node::Kind::literal;
    n.ch = c;
    return n;
  }
  static Node assertion(Anchor a) {
    Node n;
    n.kind = Node::Kind::assertion;
    n.anchor = a;
    return n;
  }
  Node char_class(Ranges ranges, bool negate) {
    Node n;
    n.kind = Node::Kind::char_class;
    n.index = static_cast<std::uint32_t>(classes.size());
    classes.emplace_back().ranges = std::move(ranges);
    classes.back().finish(negate);
    return n;
  }

  // \x, \u, \U: exactly `digits` hex digits follow.
  char32_t hex_escape(const Token& t, std::size_t start, int digits) {
    std::uint32_t v = 0;
    std::string seen = text(t);
    for (Token h; static_cast<int>(seen.size()) < digits + 2 && next_in("0123456789abcdefABCDEF");) {
      get(h);
      seen += static_cast<char>(h.c);
      v = v * 16 + static_cast<std::uint32_t>(h.c <= '9' ? h.c - '0' : (h.c | 0x20) - 'a' + 10);
    }
    if (static_cast<int>(seen.size()) != digits + 2) invalid("incomplete escape " + seen, start);
    if (v > 0x10ffff) invalid("bad escape " + seen, start);
    return v;
  }

  // An escape that stands for one code point: \a \f \n \r \t \v, hex and
  // Unicode escapes, `\` + a character that is not an ASCII letter or digit.
  // Digits are octal escapes in a class, backreferences or octal outside.
  char32_t escaped_literal(const Token& t, std::size_t start, bool in_class) {
    const char32_t c = t.c;
    const std::size_t control = std::string_view("afnrtv").find(c < 0x80 ? static_cast<char>(c) : '\0');
    if (control != std::string_view::npos) return static_cast<unsigned char>("\a\f\n\r\t\v"[control]);
    if (c == 'x' || c == 'u' || c == 'U') return hex_escape(t, start, c == 'x' ? 2 : c == 'u' ? 4 : 8);
    if (c == 'N') unsupported("the named character escape \\N{...}", start);
    if (c >= '0' && c <= '9') {
      if (in_class && c >= '8') invalid("bad escape " + text(t), start);
      // Python: three octal digits are an octal escape, other digits a group reference.
      const auto octal = [&](std::size_t i) { return i < source_.size() && source_[i] >= '0' && source_[i] <= '7'; };
      if (in_class || c == '0' || (c <= '7' && octal(pos_) && octal(pos_ + 1)))
        unsupported("the octal escape " + text(t), start);
      unsupported("the backreference " + text(t), start);
    }
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) invalid("bad escape " + text(t), start);
    return c;
  }

  Node parse_escape(const Token& t, std::size_t start) {
    if (t.c == 'A') return assertion(Anchor::begin);
    if (t.c == 'Z') return assertion(Anchor::end_of_string);
    if (t.c == 'b') return assertion(Anchor::word_boundary);
    if (t.c == 'B') return assertion(Anchor::not_word_boundary);
    if (is_one_of(t.c, "dDsSwW")) return char_class(category_ranges(t.c), false);
    return literal(escaped_literal(t, start, false));
  }

  // One member of a class: a code point, or a shorthand's ranges (not a literal, so not a range end).
  struct ClassItem {
    bool is_literal = true;
    char32_t c = 0;
    Ranges ranges;
  };

  ClassItem class_item(const Token& t, std::size_t start) {
    if (!t.escaped) return {true, t.c, {}};
    if (t.c == 'b') return {true, '\b', {}};
    if (t.c == '\\') return {true, '\\', {}};
    if (is_one_of(t.c, "dDsSwW")) return {false, 0, category_ranges(t.c)};
    return {true, escaped_literal(t, start, true), {}};  // \A \B \Z are bad escapes here
  }

  Node parse_class(std::size_t open) {
    const bool negate = match('^');
    Ranges ranges;
    for (bool first = true;; first = false) {
      const std::size_t start = pos_;
      Token t, u;
      if (!get(t)) invalid("unterminated character set", open);
      if (t.is(']') && !first) break;  // ']' first is a literal
      ClassItem lo = class_item(t, start);
      if (!match('-')) {
        ranges.insert(ranges.end(), lo.ranges.begin(), lo.ranges.end());
        if (lo.is_literal) ranges.emplace_back(lo.c, lo.c);
        continue;
      }
      const std::size_t second = pos_;
      if (!get(u)) invalid("unterminated character set", open);
      if (u.is(']')) {  // "a-]": 'a' and '-'
        ranges.insert(ranges.end(), lo.ranges.begin(), lo.ranges.end());
        if (lo.is_literal) ranges.emplace_back(lo.c, lo.c);
        ranges.emplace_back('-', '-');
        break;
      }
      ClassItem hi = class_item(u, second);
      if (!lo.is_literal || !hi.is_literal || hi.c < lo.c)
        invalid("bad character range " + text(t) + "-" + text(u), start);
      ranges.emplace_back(lo.c, hi.c);
    }
    return char_class(std::move(ranges), negate);
  }

  // Decimal digits as Python's int() reads them, saturated (Python refuses anything this large anyway).
  static std::uint64_t number(const std::string& digits) {
    std::uint64_t v = 0;
    for (char d : digits) v = std::min<std::uint64_t>(v * 10 + static_cast<std::uint64_t>(d - '0'), 1ull << 40);
    return v;
  }

  void parse_repeat(char32_t q, std::size_t start, std::vector<Node>& items) {
    std::uint64_t min = q == '+' ? 1 : 0, max = q == '?' ? 1 : Node::unbounded;
    if (q == '{') {
      const std::size_t here = pos_;
      std::string lo, hi;
      Token d;
      while (next_in("0123456789") && get(d)) lo += static_cast<char>(d.c);
      if (match(',')) {
        while (next_in("0123456789") && get(d)) hi += static_cast<char>(d.c);
      } else {
        hi = lo;
      }
      if (pos_ == here || !match('}')) {  // "{}", "{x", "{1,2": a literal '{', and parsing goes on after it
        items.push_back(literal('{'));
        pos_ = here;
        return;
      }
      if (!lo.empty() && (min = number(lo)) >= python_max_repeat) invalid("the repetition number is too large", start);
      if (!hi.empty() && (max = number(hi)) >= python_max_repeat) invalid("the repetition number is too large", start);
      if (max < min) invalid("min repeat greater than max repeat", start);
    }
    if (items.empty() || items.back().kind == Node::Kind::assertion) invalid("nothing to repeat", start);
    if (items.back().kind == Node::Kind::repeat) invalid("multiple repeat", start);
    if (!match('?') && next_in("+"))
      unsupported("the possessive quantifier " + printable(utf8(q)) + (q == '{' ? "...}+" : "+"), start);
    Node r;
    r.kind = Node::Kind::repeat;
    r.min = min;
    r.max = max;
    r.children.push_back(std::move(items.back()));
    items.back() = std::move(r);
  }

  void parse_group(std::size_t start, std::size_t depth, std::vector<Node>& items) {
    Token t, u;
    if (match('?')) {
      if (!get(t)) invalid("unexpected end of pattern", start);
      if (t.is('P') && match('<')) {
        parse_group_name(start);
      } else if (t.is('P') && match('=')) {
        unsupported("the named backreference (?P=...)", start);
      } else if (t.is('P')) {
        if (!get(u)) invalid("unexpected end of pattern", start);
        invalid("unknown extension ?P" + text(u), start);
      } else if (t.is('#')) {  // a comment, and no item: "a(?#c)*" repeats the 'a'
        do {
          if (!get(u)) invalid("missing ), unterminated comment", start);
        } while (!u.is(')'));
        return;
      } else if (t.is('=') || t.is('!')) {
        unsupported("the lookahead assertion (?" + text(t) + "...)", start);
      } else if (t.is('<')) {
        if (!get(u)) invalid("unexpected end of pattern", start);
        if (!u.is('=') && !u.is('!')) invalid("unknown extension ?<" + text(u), start);
        unsupported("the lookbehind assertion (?<" + text(u) + "...)", start);
      } else if (t.is('(')) {
        unsupported("the conditional group (?(...)...)", start);
      } else if (t.is('>')) {
        unsupported("the atomic group (?>...)", start);
      } else if (!t.escaped && is_one_of(t.c, "iLmsxatu-")) {
        unsupported("the inline flags (?" + text(t) + "...)", start);
      } else if (!t.is(':')) {
        invalid("unknown extension ?" + text(t), start);
      }
    }
    if (depth + 1 > max_depth_)
      unsupported("groups nested more than " + std::to_string(max_depth_ - 1) + " deep", start);
    Node group;
    group.kind = Node::Kind::group;
    group.children.push_back(parse_alternation(depth + 1));
    if (!match(')')) invalid("missing ), unterminated subpattern", start);
    items.push_back(std::move(group));
  }

  // (?P<name>: Python takes any identifier; this takes the ASCII ones.
  void parse_group_name(std::size_t start) {
    std::string name;
    bool bad = false, non_ascii = false;
    for (Token t;;) {
      if (!get(t)) invalid(name.empty() ? "missing group name" : "missing >, unterminated name", start);
      if (t.is('>')) break;
      non_ascii |= t.c >= 0x80;
      bad |= t.escaped || (t.c < 0x80 && (!is_word(t.c) || (name.empty() && t.c >= '0' && t.c <= '9')));
      name += text(t);
    }
    if (name.empty()) invalid("missing group name", start);
    if (bad) invalid("bad character in group name " + pattern_impl::quoted(name), start);
    if (non_ascii) unsupported("the group name " + pattern_impl::quoted(name) + " (not ASCII)", start);
    if (!group_names_.insert(name).second) invalid("redefinition of group name " + pattern_impl::quoted(name), start);
  }
};

// Pike VM instructions. literal, any and char_class consume one code point;
// split, jump and assertion do not; match ends the search with success.
enum class Op : std::uint8_t { literal, any, char_class, split, jump, assertion, match };

struct Instruction {
  Op op = Op::match;
  Anchor anchor = Anchor::begin;  // assertion
  std::uint32_t x = 0;            // literal: the code point; char_class: its index; split, jump: a target
  std::uint32_t y = 0;            // split: the second target
};

/// Thompson's construction. size() comes first, saturated at `limit`, so a
/// key such as (a{1000}){1000} is refused before anything is built.
class Compiler {
 public:
  explicit Compiler(std::vector<Instruction>& program) : program_(program) {}

  static std::uint64_t size(const Node& n, std::uint64_t limit) {
    using K = Node::Kind;
    const auto add = [limit](std::uint64_t a, std::uint64_t b) { return std::min(limit, a + b); };
    const auto mul = [limit](std::uint64_t a, std::uint64_t b) { return a && b > limit / a ? limit : a * b; };
    if (n.kind == K::empty) return 0;
    if (n.kind == K::group) return size(n.children.front(), limit);
    if (n.kind == K::concat || n.kind == K::alternate) {
      // An alternation has a split and a jump per branch but the last.
      std::uint64_t s = n.kind == K::alternate ? 2 * (n.children.size() - 1) : 0;
      for (const auto& c : n.children) s = add(s, size(c, limit));
      return s;
    }
    if (n.kind == K::repeat) {
      const std::uint64_t body = size(n.children.front(), limit);
      if (body == 0) return 0;  // the body matches "" and nothing else, with no condition: so does the repeat
      return add(mul(n.min, body), n.max == Node::unbounded ? body + 2 : mul(n.max - n.min, body + 1));
    }
    return 1;
  }

  void emit(const Node& n) {
    using K = Node::Kind;
    if (n.kind == K::literal) push({Op::literal, Anchor::begin, static_cast<std::uint32_t>(n.ch), 0});
    if (n.kind == K::any) push({Op::any, Anchor::begin, 0, 0});
    if (n.kind == K::char_class) push({Op::char_class, Anchor::begin, n.index, 0});
    if (n.kind == K::assertion) push({Op::assertion, n.anchor, 0, 0});
    if (n.kind == K::group || n.kind == K::concat)
      for (const auto& c : n.children) emit(c);
    if (n.kind == K::alternate) {
      // split L1, L2 / L1: branch / jump end / L2: split ... / the last branch / end:
      std::vector<std::uint32_t> jumps;
      for (std::size_t i = 0; i + 1 < n.children.size(); ++i) {
        const std::uint32_t split = push({Op::split, Anchor::begin, here() + 1, 0});
        emit(n.children[i]);
        jumps.push_back(push({Op::jump, Anchor::begin, 0, 0}));
        program_[split].y = here();
      }
      emit(n.children.back());
      for (auto j : jumps) program_[j].x = here();
    }
    if (n.kind == K::repeat && size(n.children.front(), 1) != 0) {
      const Node& body = n.children.front();
      for (std::uint64_t i = 0; i < n.min; ++i) emit(body);
      if (n.max == Node::unbounded) {  // loop: split body, out / body / jump loop / out:
        const std::uint32_t loop = push({Op::split, Anchor::begin, here() + 1, 0});
        emit(body);
        push({Op::jump, Anchor::begin, loop, 0});
        program_[loop].y = here();
      } else {  // each optional copy may skip to the end: split body, end / body / split ...
        std::vector<std::uint32_t> splits;
        for (std::uint64_t i = n.min; i < n.max; ++i) {
          splits.push_back(push({Op::split, Anchor::begin, here() + 1, 0}));
          emit(body);
        }
        for (auto s : splits) program_[s].y = here();
      }
    }
  }

 private:
  std::vector<Instruction>& program_;

  std::uint32_t here() const { return static_cast<std::uint32_t>(program_.size()); }
  std::uint32_t push(Instruction i) {
    program_.push_back(i);
    return here() - 1;
  }
};

/// Strings every match contains: runs of consecutive literals in a
/// concatenation that must match (not under | or an optional repeat). A
/// module path without one of them cannot match, so matches() looks for
/// them before it runs the NFA.
inline void required_literals(const Node& n, std::vector<std::string>& out) {
  using K = Node::Kind;
  if (n.kind == K::literal) out.push_back(utf8(n.ch));
  if (n.kind == K::group || (n.kind == K::repeat && n.min > 0)) required_literals(n.children.front(), out);
  if (n.kind != K::concat) return;
  std::string run;
  for (const auto& c : n.children) {
    if (c.kind == K::literal) {
      run += utf8(c.ch);
      continue;
    }
    if (!run.empty()) out.push_back(std::move(run));
    run.clear();
    required_literals(c, out);
  }
  if (!run.empty()) out.push_back(std::move(run));
}

}  // namespace pattern_impl

/// One rank_pattern / alpha_pattern key, compiled once, matched against
/// module paths as PEFT matches it. Copyable; matches() is const and keeps
/// no state, so one pattern may be used from several threads.
class ModulePattern {
 public:
  static constexpr std::size_t max_key_bytes = 1024;      // longer keys are refused
  static constexpr std::size_t max_module_bytes = 4096;   // longer module paths are refused by matches()
  static constexpr std::size_t max_group_depth = 32;      // groups nested in the key
  static constexpr std::size_t max_program_size = 20000;  // NFA instructions, PEFT's wrapper included

  /// Compiles PEFT's "(.*\.)?(key)$" around `key`; throws config_error naming
  /// the key, the byte offset in it and what is invalid or not supported.
  explicit ModulePattern(std::string_view key) : ModulePattern(key, U"(.*\\.)?(", U")$", false) {}

  /// re.fullmatch(pattern, module) is not None (PEFT's target_modules and
  /// exclude_modules strings): `pattern` is parsed alone, as Python compiles
  /// it, then matched as re.match("(?:" + pattern + r")\Z", module) would.
  static ModulePattern fullmatch(std::string_view pattern) { return ModulePattern(pattern, U"(?:", U")\\Z", true); }

  /// re.match(prefix + pattern + suffix, module) is not None: `prefix` and
  /// `suffix` are regex text joined to `pattern` without a group, as PEFT's
  /// f-strings join them (rf".*?\.{pattern}\.(\d+)\."), and parsed as one.
  static ModulePattern match_joined(std::u32string_view prefix, std::string_view pattern, std::u32string_view suffix) {
    return ModulePattern(pattern, prefix, suffix, false);
  }

  /// re.match(rf"(.*\.)?({key})$", module) is not None, as Python 3.11
  /// decides it (with the ASCII classes above); for fullmatch() and
  /// match_joined(), the call each names. Throws config_error for a module
  /// path over max_module_bytes or not valid UTF-8.
  bool matches(std::string_view module) const {
    if (module.size() > max_module_bytes)
      throw config_error("module path " + pattern_impl::quoted(module) + " is " + std::to_string(module.size()) +
                         " bytes, more than the limit of " + std::to_string(max_module_bytes) +
                         " for pattern matching");
    bool ascii = true;
    for (char c : module) ascii &= static_cast<unsigned char>(c) < 0x80;
    const std::size_t bad = ascii ? std::string_view::npos : pattern_impl::invalid_utf8_at(module);
    if (bad != std::string_view::npos)
      throw config_error("module path " + pattern_impl::quoted(module) + " is not valid UTF-8 (at byte " +
                         std::to_string(bad) + ")");
    if (literal_) return match_literal(module);
    for (const auto& r : required_)
      if (module.find(r) == std::string_view::npos) return false;
    if (ascii) return run(module.data(), module.size());
    std::u32string text;
    char32_t cp = 0;
    for (std::size_t i = 0, len = 0; i < module.size(); i += len) {
      len = pattern_impl::utf8_sequence(module, i, cp);
      text.push_back(cp);
    }
    return run(text.data(), text.size());
  }

  const std::string& key() const { return key_; }

 private:
  // `alone`: the key must also parse by itself (fullmatch: Python compiles it alone).
  ModulePattern(std::string_view key, std::u32string_view prefix, std::u32string_view suffix, bool alone) : key_(key) {
    if (key.size() > max_key_bytes)
      throw config_error("pattern key " + pattern_impl::quoted(key) + " is " + std::to_string(key.size()) +
                         " bytes, more than the limit of " + std::to_string(max_key_bytes));
    const std::size_t bad = pattern_impl::invalid_utf8_at(key);
    if (bad != std::string_view::npos)
      throw config_error("pattern key " + pattern_impl::quoted(key) + " is not valid UTF-8 (at byte " +
                         std::to_string(bad) + ")");
    if (prefix == U"(.*\\.)?(" && suffix == U")$" && compile_literal(key)) return;
    if (alone)
      pattern_impl::Parser(key, max_group_depth, U"", U"").parse();         // Python's errors for the pattern by itself
    pattern_impl::Parser parser(key, max_group_depth + 1, prefix, suffix);  // the wrapper's group is one level
    const pattern_impl::Node root = parser.parse();
    if (pattern_impl::Compiler::size(root, max_program_size + 1) + 1 > max_program_size)
      throw config_error("pattern key " + pattern_impl::quoted(key) + " compiles to more than " +
                         std::to_string(max_program_size) +
                         " NFA instructions (counted repetitions are expanded), more than this matcher allows; only a "
                         "linear-time subset of Python's re is supported");
    pattern_impl::Compiler(program_).emit(root);
    program_.push_back({Op::match, Anchor::begin, 0, 0});
    precompute_closures();
    classes_ = std::move(parser.classes);
    // The longest few required strings, and none that is part of a longer one.
    std::vector<std::string> required;
    pattern_impl::required_literals(root, required);
    std::sort(required.begin(), required.end(), [](const auto& a, const auto& b) { return a.size() > b.size(); });
    for (const auto& r : required) {
      if (required_.size() == 4) break;
      if (std::none_of(required_.begin(), required_.end(), [&](const auto& s) { return s.find(r) != s.npos; }))
        required_.push_back(r);
    }
  }

  using Instruction = pattern_impl::Instruction;
  using Op = pattern_impl::Op;
  using Anchor = pattern_impl::Anchor;
  static constexpr char32_t any_code_point = 0xffffffff;  // `.` in literal_items_

  std::string key_;
  bool literal_ = false;
  std::vector<char32_t> literal_items_;  // the fast path's code points, any_code_point for `.`
  std::vector<Instruction> program_;
  std::vector<pattern_impl::CharClass> classes_;
  std::vector<std::string> required_;  // UTF-8 strings every match contains
  // What follow() finds from a root (0, or the instruction after a consuming
  // one) when no assertion is on the way and it is small, found once: the
  // consuming instructions closure_pcs_[begin, end) and whether match is reached.
  struct Closure {
    std::uint32_t begin = 0, end = 0;
    bool known = false, reaches_match = false;
  };
  std::vector<Closure> closures_;
  std::vector<std::uint32_t> closure_pcs_;

  // Fast path: a key of literal characters, `.` and escaped ASCII punctuation
  // (most PEFT keys: "q_proj", "model.layers.0.self_attn.q_proj") matches a
  // fixed number of code points, so "(.*\.)?(key)$" holds exactly when the
  // module ends with them, or with them and one '\n' ($), and what comes
  // before them is empty or ends with a '.' and has no '\n' (.* stops at one).
  bool compile_literal(std::string_view key) {
    std::vector<char32_t> items;
    for (std::size_t i = 0; i < key.size();) {
      const auto b = static_cast<unsigned char>(key[i]);
      if (b == '\\') {
        if (i + 1 >= key.size()) return false;
        const auto e = static_cast<unsigned char>(key[i + 1]);
        if (e >= 0x80 || pattern_impl::is_word(e)) return false;
        items.push_back(e);
        i += 2;
      } else if (pattern_impl::is_one_of(b, "^$*+?{}[]|()")) {
        return false;
      } else if (b == '.') {
        items.push_back(any_code_point);
        ++i;
      } else {
        char32_t cp = 0;
        i += pattern_impl::utf8_sequence(key, i, cp);
        items.push_back(cp);
      }
    }
    literal_items_ = std::move(items);
    literal_ = true;
    return true;
  }

  bool match_literal(std::string_view m) const {
    for (std::size_t tail = 0; tail < 2; ++tail) {
      if (tail == 1 && (m.empty() || m.back() != '\n')) break;
      std::size_t pos = m.size() - tail;
      bool ok = true;
      for (std::size_t k = literal_items_.size(); ok && k-- > 0;) {
        if (pos == 0) {
          ok = false;
          break;
        }
        std::size_t begin = pos - 1;  // back one code point
        while (begin > 0 && (static_cast<unsigned char>(m[begin]) & 0xc0) == 0x80) --begin;
        char32_t cp = 0;
        pattern_impl::utf8_sequence(m, begin, cp);
        ok = literal_items_[k] == any_code_point ? cp != '\n' : cp == literal_items_[k];
        pos = begin;
      }
      if (ok && (pos == 0 || (m[pos - 1] == '.' && m.substr(0, pos).find('\n') == std::string_view::npos))) return true;
    }
    return false;
  }

  template <class Char>
  static char32_t code_point(Char c) {
    if constexpr (std::is_same_v<Char, char>) return static_cast<unsigned char>(c);
    return c;
  }

  template <class Char>
  static bool holds(Anchor a, const Char* text, std::size_t n, std::size_t at) {
    if (a == Anchor::begin) return at == 0;
    if (a == Anchor::end) return at == n || (at + 1 == n && text[at] == '\n');
    if (a == Anchor::end_of_string) return at == n;
    if (n == 0) return false;  // Python: neither \b nor \B matches in an empty string
    const bool before = at > 0 && pattern_impl::is_word(code_point(text[at - 1]));
    const bool after = at < n && pattern_impl::is_word(code_point(text[at]));
    return (before != after) == (a == Anchor::word_boundary);
  }

  static bool consumes(Op op) { return op == Op::literal || op == Op::any || op == Op::char_class; }

  void precompute_closures() {
    constexpr std::size_t max_visits = 32;  // so this costs O(program size), whatever the program
    const auto p = static_cast<std::uint32_t>(program_.size());
    closures_.assign(p, {});
    std::vector<std::uint32_t> seen(p, 0), stack;
    for (std::uint32_t root = 0; root < p; ++root) {
      if (root != 0 && !consumes(program_[root - 1].op)) continue;
      Closure c;
      c.begin = static_cast<std::uint32_t>(closure_pcs_.size());
      c.known = true;
      stack.assign(1, root);
      for (std::size_t visits = 0; c.known && !stack.empty();) {
        const std::uint32_t pc = stack.back();
        stack.pop_back();
        if (seen[pc] == root + 1) continue;
        seen[pc] = root + 1;
        const Instruction& in = program_[pc];
        c.known = ++visits <= max_visits && in.op != Op::assertion;
        if (in.op == Op::jump) stack.push_back(in.x);
        if (in.op == Op::split) stack.insert(stack.end(), {in.y, in.x});
        if (in.op == Op::match) c.reaches_match = true;
        if (consumes(in.op)) closure_pcs_.push_back(pc);
      }
      if (!c.known) closure_pcs_.resize(c.begin);
      c.end = static_cast<std::uint32_t>(closure_pcs_.size());
      closures_[root] = c;
    }
  }

  // Adds to `threads` the consuming instructions reachable from `pc` without
  // consuming a character at position `at`; true when that reaches match.
  // mark[pc] == at + 1 once pc was visited for this position, so each
  // instruction is visited once and pushes at most two: `stack` needs
  // 2 * program size + 1 entries, `threads` program size.
  template <class Char>
  bool follow(std::uint32_t pc, const Char* text, std::size_t n, std::size_t at, std::uint32_t* mark,
              std::uint32_t* threads, std::size_t& count, std::uint32_t* stack) const {
    const auto stamp = static_cast<std::uint32_t>(at + 1);
    const Closure& known = closures_[pc];
    if (known.known) {  // the common case, kept small enough to inline
      for (std::uint32_t i = known.begin; i < known.end; ++i) {
        const std::uint32_t q = closure_pcs_[i];
        if (mark[q] != stamp) threads[count++] = q;
        mark[q] = stamp;
      }
      return known.reaches_match;
    }
    return follow_slowly(pc, text, n, at, mark, threads, count, stack);
  }

  template <class Char>
  bool follow_slowly(std::uint32_t pc, const Char* text, std::size_t n, std::size_t at, std::uint32_t* mark,
                     std::uint32_t* threads, std::size_t& count, std::uint32_t* stack) const {
    const auto stamp = static_cast<std::uint32_t>(at + 1);
    std::size_t top = 0;
    stack[top++] = pc;
    while (top > 0) {
      pc = stack[--top];
      if (mark[pc] == stamp) continue;
      mark[pc] = stamp;
      const Instruction& in = program_[pc];
      if (in.op == Op::jump) {
        stack[top++] = in.x;
      } else if (in.op == Op::split) {
        stack[top++] = in.y;
        stack[top++] = in.x;
      } else if (in.op == Op::assertion) {
        if (holds(in.anchor, text, n, at)) stack[top++] = pc + 1;
      } else if (in.op == Op::match) {
        return true;
      } else {
        threads[count++] = pc;
      }
    }
    return false;
  }

  // The Pike VM over `text`: bytes when the module is ASCII, else code points.
  template <class Char>
  bool run(const Char* text, std::size_t n) const {
    const std::size_t p = program_.size();
    // mark, the current and the next threads, the stack: in this frame for most keys, on the heap for large ones.
    constexpr std::size_t local_words = 1024;
    std::uint32_t local[local_words];
    std::vector<std::uint32_t> heap;
    std::uint32_t* memory = local;
    if (5 * p + 2 > local_words) {
      heap.resize(5 * p + 2);
      memory = heap.data();
    }
    std::fill(memory, memory + p, 0u);
    std::uint32_t *mark = memory, *current = memory + p, *next = memory + 2 * p, *stack = memory + 3 * p;
    std::size_t n_current = 0;
    if (follow(0, text, n, 0, mark, current, n_current, stack)) return true;
    for (std::size_t i = 0; i < n && n_current > 0; ++i) {
      const char32_t c = code_point(text[i]);
      std::size_t n_next = 0;
      for (std::size_t k = 0; k < n_current; ++k) {
        const Instruction& in = program_[current[k]];
        const bool step = in.op == Op::literal ? c == in.x : in.op == Op::any ? c != '\n' : classes_[in.x].contains(c);
        if (step && follow(current[k] + 1, text, n, i + 1, mark, next, n_next, stack)) return true;
      }
      std::swap(current, next);
      n_current = n_next;
    }
    return false;
  }
};

}  // namespace lora::detail
