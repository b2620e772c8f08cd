// GPT-2's byte-level BPE tokenizer, encoding as OpenAI's encoder.py and Hugging Face's GPT2Tokenizer do, with
// GPT-2's files (vocab.json, merges.txt). tests/golden/make_bpe_golden.py is the oracle (a port of encoder.py on
// Python's `regex`); tests/unit-gpt-bpe.cpp checks this header against it.
//
// encode(text):
//   1. Pre-tokenise: cut the text into pieces with GPT-2's pattern
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      (the first alternative that matches at a position wins; every character is matched by one). A hand-written
//      scanner (piece_end) does it over code points sorted into letter, number, space (White_Space) or other by the
//      tables of unicode_tables.hpp, which are Python `regex`'s \p{L}, \p{N} and \s (Unicode 15.0).
//   2. Each piece's UTF-8 bytes become symbols, one per byte: bytes_to_unicode() names byte b by a printable
//      character, and vocabulary and merges are written in those characters (a space is "Ġ", a newline "Ċ").
//   3. BPE (bpe): while some adjacent pair of symbols is in merges.txt, take the pair with the lowest rank (line
//      order) and merge every occurrence of it, left to right, into one symbol; then look again. This is
//      encoder.py's bpe(), done with a heap of candidate pairs so that a long piece costs O(n log n), not O(n^2).
//   4. Each final symbol's string is looked up in vocab.json.
// decode(ids) is the reverse: the tokens' characters mapped back to their bytes, concatenated.
//
// Choices where the Python code has no answer, or a different one:
//   * Invalid UTF-8 in encode's input is encoded, not refused: each byte that is not part of a well-formed UTF-8
//     sequence (as Python's strict decoder judges: no overlong forms, no surrogates, nothing above U+10FFFF) is a
//     character of its own, of class "other" (like the lone surrogate Python's errors="surrogateescape" makes of it),
//     and keeps its own byte. decode(encode(bytes)) gives the bytes back for any input.
//   * decode returns the raw bytes; encoder.py's decode would replace invalid UTF-8 by U+FFFD (errors="replace").
//   * "<|endoftext|>" in the text is plain text here, as in encoder.py: it becomes ordinary tokens (seven in GPT-2:
//     "<" "|" "end" "of" "text" "|" ">"). Hugging Face's GPT2Tokenizer instead splits its registered special tokens
//     out of the text first (50256 for GPT-2). To get that, cut the text at the marker and put token_id(marker)
//     between the encoded parts.
//   * A merges.txt pair listed twice takes the rank of its last line (encoder.py's dict(zip(merges, ranks))).
//
// encode keeps a cache of short pieces behind a mutex: encode, decode and the other const members may be called
// from several threads at once.
#pragma once

#include "unicode_tables.hpp"

#include <lora/errors.hpp>
#include <lora/safetensors.hpp>  // and with it lora::detail::read_small_file (lora/detail/file.hpp is internal)

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <mutex>
#include <optional>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace gpt {

/// OpenAI's bytes_to_unicode(): the 188 printable bytes ('!'..'~', U+00A1..U+00AC, U+00AE..U+00FF) stand for
/// themselves; the other 68 bytes get U+0100, U+0101, ... in byte order (so byte 0 is U+0100, ' ' is U+0120 'Ġ').
inline const std::array<char32_t, 256>& bytes_to_unicode() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = printable ? static_cast<char32_t>(b) : next++;
    }
    return t;
  }();
  return table;
}

namespace detail {

inline void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

/// The classes GPT-2's pattern tells apart: \p{L}, \p{N}, \s, and everything else.
enum class CharClass : std::uint8_t { letter, number, space, other };

template <std::size_t N>
bool in_ranges(const unicode::Range (&ranges)[N], std::uint32_t cp) {
  const auto* it =
      std::upper_bound(ranges, ranges + N, cp, [](std::uint32_t c, const unicode::Range& r) { return c < r.first; });
  return it != ranges && cp <= (it - 1)->last;
}

/// The class of code point `cp` as Python's `regex` sees it.
inline CharClass char_class(std::uint32_t cp) {
  if (cp < 0x80) {  // ASCII without a search; U+001C..U+001F are not \s in `regex` (they are in str.isspace)
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return CharClass::letter;
    if (cp >= '0' && cp <= '9') return CharClass::number;
    if (cp == ' ' || (cp >= '\t' && cp <= '\r')) return CharClass::space;
    return CharClass::other;
  }
  if (in_ranges(unicode::letter, cp)) return CharClass::letter;
  if (in_ranges(unicode::number, cp)) return CharClass::number;
  if (in_ranges(unicode::space, cp)) return CharClass::space;
  return CharClass::other;
}

/// One character of the text: its length in bytes and its class.
struct Unit {
  std::size_t size;
  CharClass cls;
};

/// The character at byte `i` of `s` (i < s.size()): a well-formed UTF-8 sequence, or one byte of class "other"
/// when the bytes there are not one (the documented rule for invalid UTF-8; a continuation byte after a bad lead
/// byte is then a character of its own too, as with Python's surrogateescape).
inline Unit unit_at(std::string_view s, std::size_t i) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = byte(i);
  if (c < 0x80) return {1, char_class(c)};
  std::size_t len = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the range of the second byte; later ones are 0x80..0xBF
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;  // overlong
    if (c == 0xED) hi = 0x9F;  // surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;  // overlong
    if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
  }
  if (len == 0 || i + len > s.size() || byte(i + 1) < lo || byte(i + 1) > hi) return {1, CharClass::other};
  std::uint32_t cp = c & (len == 2 ? 0x1Fu : len == 3 ? 0x0Fu : 0x07u);
  for (std::size_t k = 1; k < len; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return {1, CharClass::other};
    cp = (cp << 6) | (byte(i + k) & 0x3Fu);
  }
  return {len, char_class(cp)};
}

/// The end of the pre-token that starts at byte `i` of `s` (i < s.size()): GPT-2's pattern, alternative by
/// alternative, as `regex` tries them.
inline std::size_t piece_end(std::string_view s, std::size_t i) {
  const std::size_t n = s.size();
  // 's|'t|'re|'ve|'m|'ll|'d: lowercase ASCII only.
  if (s[i] == '\'' && i + 1 < n) {
    const char c = s[i + 1];
    if (c == 's' || c == 't' || c == 'm' || c == 'd') return i + 2;
    if (i + 2 < n && ((c == 'r' && s[i + 2] == 'e') || (c == 'v' && s[i + 2] == 'e') || (c == 'l' && s[i + 2] == 'l')))
      return i + 3;
  }
  // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional U+0020, then a run of one class that is not space.
  const std::size_t k = s[i] == ' ' && i + 1 < n ? i + 1 : i;
  const Unit first = unit_at(s, k);
  if (first.cls != CharClass::space) {
    std::size_t j = k + first.size;
    while (j < n) {
      const Unit u = unit_at(s, j);
      if (u.cls != first.cls) break;
      j += u.size;
    }
    return j;
  }
  // Here s[i] is whitespace. `\s+(?!\S)` takes the whole run when it ends the text, else all of it but its last
  // character, which then goes with what follows (" word"); a run of one before a non-space falls to `\s+`.
  std::size_t j = i, last = i;
  while (j < n) {
    const Unit u = unit_at(s, j);
    if (u.cls != CharClass::space) break;
    last = j;
    j += u.size;
  }
  if (j == n) return n;
  return last > i ? last : j;
}

}  // namespace detail

/// The UTF-8 of the character bytes_to_unicode() gives byte `b`.
inline std::string byte_symbol(std::uint8_t b) {
  std::string out;
  detail::append_utf8(out, bytes_to_unicode()[b]);
  return out;
}

/// `text` cut into GPT-2's pre-tokens (byte strings that concatenate to `text`): step 1 of encode.
inline std::vector<std::string> pretokenize(std::string_view text) {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t j = detail::piece_end(text, i);
    out.emplace_back(text.substr(i, j - i));
    i = j;
  }
  return out;
}

class BpeTokenizer {
 public:
  /// Ids must be in [0, max_id]: decode keeps one entry per id up to the largest.
  static constexpr int max_id = (1 << 24) - 1;

  /// Reads <dir>/vocab.json (a JSON object: token -> integer id) and <dir>/merges.txt (an optional first line
  /// "#version: ..."; then one "first second" pair per line, ranked by line order; blank lines are skipped, a
  /// trailing '\r' is dropped). Throws io_error when a file cannot be read and format_error, naming the file, when
  /// its contents are not that.
  static BpeTokenizer load(const std::string& dir) {
    const std::string vocab_path = (std::filesystem::path(dir) / "vocab.json").string();
    const std::string merges_path = (std::filesystem::path(dir) / "merges.txt").string();
    auto vocab = read_vocab(vocab_path);
    auto merges = read_merges(merges_path);
    try {
      return BpeTokenizer(std::move(vocab), merges);
    } catch (const lora::config_error& e) {  // read_merges has checked the merges: this is about the vocabulary
      throw lora::format_error(vocab_path + ": " + e.what());
    }
  }

  /// Whether <dir> has vocab.json or merges.txt, of whatever kind (a dangling link too): its model then uses BPE,
  /// and load() reads both, refusing one that is missing or no regular file by name, rather than the model
  /// falling back to bytes.
  static bool available(const std::string& dir) {
    const std::filesystem::path d(dir);
    std::error_code ec;
    return std::filesystem::exists(std::filesystem::symlink_status(d / "vocab.json", ec)) ||
           std::filesystem::exists(std::filesystem::symlink_status(d / "merges.txt", ec));
  }

  /// `vocab`: token (written in bytes_to_unicode's characters, or any string of them such as "<|endoftext|>") ->
  /// id; `merges`: pairs of tokens, rank = index. Throws config_error for an id outside [0, max_id], an id given
  /// to two tokens, a token with a character that is not one of bytes_to_unicode's 256, and a merge with an empty
  /// side.
  BpeTokenizer(std::unordered_map<std::string, int> vocab,
               const std::vector<std::pair<std::string, std::string>>& merges)
      : vocab_(std::move(vocab)) {
    for (int b = 0; b < 256; ++b) intern(byte_symbol(static_cast<std::uint8_t>(b)));

    for (const auto& [token, id] : vocab_) {
      if (id < 0 || id > max_id)
        throw lora::config_error("BPE vocabulary: token \"" + lora::printable(token) + "\": expected an id in [0, " +
                                 std::to_string(max_id) + "], got " + std::to_string(id));
      if (static_cast<std::size_t>(id) >= id_bytes_.size()) id_bytes_.resize(static_cast<std::size_t>(id) + 1);
      if (id_bytes_[id])
        throw lora::config_error("BPE vocabulary: expected one token per id, got id " + std::to_string(id) +
                                 " for both \"" + lora::printable(token) + "\" and \"" +
                                 lora::printable(token_with_id(id, token)) + "\"");
      id_bytes_[id] = token_bytes(token);
    }

    for (std::size_t rank = 0; rank < merges.size(); ++rank) {
      const auto& [a, b] = merges[rank];
      if (a.empty() || b.empty())
        throw lora::config_error("BPE merge " + std::to_string(rank) + ": expected two non-empty tokens, got \"" +
                                 lora::printable(a) + "\" and \"" + lora::printable(b) + "\"");
      const int left = intern(a), right = intern(b), result = intern(a + b);
      // A pair listed again takes the later rank, as encoder.py's dict(zip(merges, ranks)).
      merges_[pair_key(left, right)] = Merge{static_cast<int>(rank), result};
    }

    symbol_token_.reserve(symbols_.size());
    for (const auto& symbol : symbols_) {
      const auto it = vocab_.find(symbol);
      symbol_token_.push_back(it == vocab_.end() ? -1 : it->second);
    }
  }

  /// GPT-2's token ids of `utf8_text` (which need not be valid UTF-8: see the header comment). Throws config_error
  /// when a piece BPE leaves is not in the vocabulary (a vocabulary without all 256 byte tokens, or without a
  /// merge's result).
  std::vector<int> encode(std::string_view utf8_text) const {
    std::vector<int> ids;
    for (std::size_t i = 0; i < utf8_text.size();) {
      const std::size_t j = detail::piece_end(utf8_text, i);
      encode_piece(utf8_text.substr(i, j - i), i, ids);
      i = j;
    }
    return ids;
  }

  /// The bytes of the tokens `ids`, concatenated. Throws config_error for an id that is not in the vocabulary.
  std::string decode(const std::vector<int>& ids) const {
    std::string out;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const int id = ids[i];
      if (id < 0 || static_cast<std::size_t>(id) >= id_bytes_.size() || !id_bytes_[id])
        throw lora::config_error("BPE decode: expected ids of the vocabulary (" + std::to_string(vocab_.size()) +
                                 " tokens, ids below " + std::to_string(vocab_size()) + "), got id " +
                                 std::to_string(id) + " at position " + std::to_string(i));
      out += *id_bytes_[id];
    }
    return out;
  }

  /// The largest id + 1 (GPT-2: 50257).
  int vocab_size() const { return static_cast<int>(id_bytes_.size()); }

  /// The id of `token` as vocab.json writes it ("<|endoftext|>", "Ġthe"), if it has one.
  std::optional<int> token_id(const std::string& token) const {
    const auto it = vocab_.find(token);
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }

 private:
  struct Merge {
    int rank;
    int result;  // the symbol the pair becomes
  };

  // Pieces up to this long are cached; the cache starts again when it holds this many.
  static constexpr std::size_t cached_piece_bytes = 64;
  static constexpr std::size_t cache_entries = 1 << 18;

  // The cache of encode_piece, guarded by its mutex. Copies of a tokenizer start with an empty one.
  struct Cache {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int>> ids;
    Cache() = default;
    Cache(const Cache&) {}
    Cache& operator=(const Cache&) { return *this; }
  };

  static std::uint64_t pair_key(int left, int right) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(left)) << 32) | static_cast<std::uint32_t>(right);
  }

  // The id of a symbol string, made up when new. Symbols 0..255 are the bytes.
  int intern(const std::string& symbol) {
    const auto [it, added] = symbol_ids_.emplace(symbol, static_cast<int>(symbols_.size()));
    if (added) symbols_.push_back(symbol);
    return it->second;
  }

  // Another token of vocab_ than `not_this` with id `id`, for the message about an id given twice.
  std::string token_with_id(int id, const std::string& not_this) const {
    for (const auto& [token, i] : vocab_)
      if (i == id && token != not_this) return token;
    return not_this;
  }

  // The bytes a vocabulary token stands for: each of its characters mapped back through bytes_to_unicode.
  static std::string token_bytes(const std::string& token) {
    static const std::array<int, 0x144> byte_of = [] {  // bytes_to_unicode's inverse; its image ends at U+0143
      std::array<int, 0x144> inverse{};
      inverse.fill(-1);
      for (int b = 0; b < 256; ++b) inverse[bytes_to_unicode()[b]] = b;
      return inverse;
    }();
    std::string out;
    for (std::size_t i = 0; i < token.size();) {
      // Decode one code point strictly; anything else is refused below.
      const auto c = static_cast<unsigned char>(token[i]);
      std::uint32_t cp = 0x110000;
      std::size_t len = 1;
      if (c < 0x80) {
        cp = c;
      } else if (c >= 0xC2 && c <= 0xDF && i + 1 < token.size() && (token[i + 1] & 0xC0) == 0x80) {
        cp = ((c & 0x1Fu) << 6) | (static_cast<unsigned char>(token[i + 1]) & 0x3Fu);
        len = 2;
      }
      if (cp >= byte_of.size() || byte_of[cp] < 0)
        throw lora::config_error("BPE vocabulary: token \"" + lora::printable(token) +
                                 "\": expected characters of bytes_to_unicode (U+0021..U+0143), got " +
                                 describe_char(token, i) + " at byte " + std::to_string(i));
      out += static_cast<char>(byte_of[cp]);
      i += len;
    }
    return out;
  }

  // "U+4E2D" for the character at byte i of s, or "byte 0xff" when it is not UTF-8.
  static std::string describe_char(const std::string& s, std::size_t i) {
    const detail::Unit u = detail::unit_at(s, i);
    const auto c = static_cast<unsigned char>(s[i]);
    char buf[16];
    if (c >= 0x80 && u.size == 1) {
      std::snprintf(buf, sizeof buf, "byte 0x%02x", c);
      return buf;
    }
    std::uint32_t cp = u.size == 1 ? c : c & (u.size == 2 ? 0x1Fu : u.size == 3 ? 0x0Fu : 0x07u);
    for (std::size_t k = 1; k < u.size; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3Fu);
    std::snprintf(buf, sizeof buf, "U+%04X", static_cast<unsigned>(cp));
    return buf;
  }

  // Appends the token ids of one pre-token, which starts at byte `offset` of the text.
  void encode_piece(std::string_view piece, std::size_t offset, std::vector<int>& out) const {
    const bool cacheable = piece.size() <= cached_piece_bytes;
    std::string key;
    if (cacheable) {
      key.assign(piece);
      std::lock_guard<std::mutex> lock(cache_.mutex);
      const auto it = cache_.ids.find(key);
      if (it != cache_.ids.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const std::size_t start = out.size();
    for (const int symbol : bpe(piece)) {
      const int id = symbol_token_[symbol];
      if (id < 0)
        throw lora::config_error("BPE encode: expected every piece BPE leaves to be in the vocabulary, got \"" +
                                 lora::printable(symbols_[symbol]) + "\" (from the text's bytes \"" +
                                 lora::printable(piece) + "\" at byte " + std::to_string(offset) + "), which is not");
      out.push_back(id);
    }
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_.mutex);
      if (cache_.ids.size() >= cache_entries) cache_.ids.clear();
      cache_.ids.emplace(std::move(key), std::vector<int>(out.begin() + static_cast<std::ptrdiff_t>(start), out.end()));
    }
  }

  // encoder.py's bpe() on the byte symbols of `piece`: rounds, each of which merges every occurrence of the
  // lowest-ranked pair present, left to right, before any pair those merges make is looked at. The symbols live in
  // a linked list over their first byte positions; a heap holds (rank, position) of candidate pairs. An entry whose
  // pair has changed since it was pushed is stale and skipped: a position's symbol only ever grows, so comparing
  // the two symbols finds every stale entry.
  std::vector<int> bpe(std::string_view piece) const {
    const int n = static_cast<int>(piece.size());
    std::vector<int> symbol(piece.size()), next(piece.size()), prev(piece.size());
    for (int i = 0; i < n; ++i) {
      symbol[i] = static_cast<unsigned char>(piece[i]);
      next[i] = i + 1;  // n: none
      prev[i] = i - 1;  // -1: none
    }
    struct Candidate {
      int rank, pos, left, right;
      bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
    const auto push = [&](int pos) {
      if (pos < 0 || next[pos] >= n) return;
      const auto it = merges_.find(pair_key(symbol[pos], symbol[next[pos]]));
      if (it != merges_.end()) heap.push({it->second.rank, pos, symbol[pos], symbol[next[pos]]});
    };
    // Dead positions (merged into their left neighbour) have prev == -2.
    const auto current = [&](const Candidate& c) {
      return prev[c.pos] != -2 && symbol[c.pos] == c.left && next[c.pos] < n && symbol[next[c.pos]] == c.right;
    };
    for (int i = 0; i + 1 < n; ++i) push(i);

    std::vector<Candidate> round;
    while (!heap.empty()) {
      if (!current(heap.top())) {
        heap.pop();
        continue;
      }
      const int rank = heap.top().rank;  // one pair per rank, so the round is one pair's occurrences
      round.clear();
      while (!heap.empty() && heap.top().rank == rank) {
        round.push_back(heap.top());
        heap.pop();
      }
      const int result = merges_.find(pair_key(round.front().left, round.front().right))->second.result;
      for (const Candidate& c : round) {  // by position: left to right
        if (!current(c)) continue;        // stale, or its left symbol went into the merge just before
        const int right = next[c.pos];
        symbol[c.pos] = result;
        next[c.pos] = next[right];
        if (next[right] < n) prev[next[right]] = c.pos;
        prev[right] = -2;
        // The new pairs have other ranks than this one (a merged symbol is longer than either side).
        push(prev[c.pos]);
        push(c.pos);
      }
    }
    std::vector<int> out;
    for (int i = 0; i < n; i = next[i]) out.push_back(symbol[i]);
    return out;
  }

  /// GPT-2's vocab.json is 1 MB and merges.txt 456 KB: 64 MiB bounds any real tokenizer. The library's reader
  /// refuses a FIFO, a device or a directory by name instead of blocking on it or reading it until memory runs out.
  static constexpr std::size_t max_file_bytes = std::size_t(64) << 20;
  static std::string read_file(const std::string& path) {
    return lora::detail::read_small_file(path, max_file_bytes, "a tokenizer file");
  }

  static std::unordered_map<std::string, int> read_vocab(const std::string& path) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(read_file(path));
    } catch (const nlohmann::json::exception& e) {
      throw lora::format_error(path + ": expected JSON, got a parse error: " + e.what());
    }
    if (!j.is_object())
      throw lora::format_error(path + ": expected a JSON object of token -> id, got " + std::string(j.type_name()));
    std::unordered_map<std::string, int> vocab;
    vocab.reserve(j.size());
    for (const auto& [token, value] : j.items()) {
      // is_number_integer() is false for 1.5 and true; 1e3 parses as a float, as Python would.
      if (!value.is_number_integer()) {
        std::string shown = value.dump();
        if (shown.size() > 40) shown = shown.substr(0, 37) + "...";
        throw lora::format_error(path + ": token \"" + lora::printable(token) + "\": expected an integer id, got " +
                                 value.type_name() + " " + lora::printable(shown));
      }
      const bool in_range = value.is_number_unsigned()
                                ? value.get<std::uint64_t>() <= std::uint64_t{max_id}
                                : value.get<std::int64_t>() >= 0 && value.get<std::int64_t>() <= std::int64_t{max_id};
      if (!in_range)
        throw lora::format_error(path + ": token \"" + lora::printable(token) + "\": expected an id in [0, " +
                                 std::to_string(max_id) + "], got " + value.dump());
      vocab[token] = value.get<int>();
    }
    return vocab;
  }

  static std::vector<std::pair<std::string, std::string>> read_merges(const std::string& path) {
    const std::string text = read_file(path);
    std::vector<std::pair<std::string, std::string>> merges;
    std::size_t line_no = 0;
    for (std::size_t start = 0; start < text.size();) {
      std::size_t end = text.find('\n', start);
      if (end == std::string::npos) end = text.size();
      std::string_view line(text.data() + start, end - start);
      start = end + 1;
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.empty() || (line_no == 1 && line.substr(0, 8) == "#version")) continue;
      const std::size_t space = line.find(' ');
      if (space == 0 || space == std::string_view::npos || space + 1 == line.size() ||
          line.find(' ', space + 1) != std::string_view::npos)
        throw lora::format_error(path + ":" + std::to_string(line_no) +
                                 ": expected two tokens separated by one space, got \"" + lora::printable(line) + "\"");
      merges.emplace_back(line.substr(0, space), line.substr(space + 1));
    }
    return merges;
  }

  std::unordered_map<std::string, int> vocab_;
  std::vector<std::optional<std::string>> id_bytes_;  // by id: the bytes it decodes to; empty for a gap
  std::vector<std::string> symbols_;                  // by symbol id: the string (bytes_to_unicode's characters)
  std::unordered_map<std::string, int> symbol_ids_;
  std::vector<int> symbol_token_;  // by symbol id: its vocabulary id, or -1
  std::unordered_map<std::uint64_t, Merge> merges_;
  mutable Cache cache_;
};

}  // namespace gpt
