#!/usr/bin/python3
"""Writes tests/data/gpt/bpe/: a small GPT-2-format byte-level BPE vocabulary
and what OpenAI's encoder.py makes of test strings with it, the oracle for
examples/gpt/bpe.hpp (tests/unit-gpt-bpe.cpp). The tests read only the output
files; run this again with Debian bookworm's /usr/bin/python3 (3.11) and
python3-regex (regex 2022.10.31, Unicode 15.0):
    /usr/bin/python3 tests/golden/make_bpe_golden.py

  vocab.json, merges.txt  GPT-2's formats. Trained here: byte-level BPE on
                 /usr/share/common-licenses/GPL-3 (Debian's base-files; its
                 SHA-256 is checked so the output is the same everywhere) and
                 hand-written lines with accents, CJK, emoji, other digits;
                 MERGES merges, the most frequent pair first (ties: the
                 smallest pair). Ids: the 256 byte characters in
                 bytes_to_unicode's order, merged tokens in merge order,
                 "<|endoftext|>" last, as GPT-2's vocabulary is laid out.
  cases.json     [{"text", "ids", "pieces"}]: hand-picked strings and seeded
                 random ones, "ids" from Encoder.encode below (a port of
                 encoder.py), "pieces" the pre-tokens regex.findall gives.
                 Byte strings that are not UTF-8 come as {"hex", "ids",
                 "pieces_hex"}: they are decoded with errors="surrogateescape"
                 (each byte of an invalid sequence becomes one lone surrogate,
                 which the pattern classes as neither letter, number nor
                 space) and each pre-token encoded back the same way, so every
                 byte keeps its own byte token. That is the rule bpe.hpp
                 documents for invalid UTF-8.
  shuffled/      vocab.json, merges.txt, cases.json as above (300 short
                 texts and 5 of 3000 letters, one piece each), for merges
                 that no training run makes: made from pairs of tokens over
                 "ab" and the space, then put in random order, so a merge can
                 rank before the merges that make its parts, one pair comes
                 twice (the later rank counts, as dict(zip(...)) has it) and
                 one merge's result is missing from the vocabulary, leaving a
                 gap in the ids (texts that would need it are skipped; with
                 these merges BPE always merges it further). It checks the
                 merge loop's order of work: each round merges every
                 occurrence of the lowest-ranked pair left to right before
                 any pair a merge made is looked at (10 of the short texts
                 come out otherwise when merges are made one at a time).
  classes.json   {"L": [...], "N": [...], "S": [...], "O": [...]}: code points
                 and the class `regex` gives them (\\p{L}, \\p{N}, \\s, other):
                 the first and last of every run of one class, their
                 neighbours, and seeded random ones.
Random parts are seeded, so the files are the same on every run.
"""
import hashlib
import json
import os
import random
import sys

import regex

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "data", "gpt", "bpe"))
GPL = "/usr/share/common-licenses/GPL-3"
GPL_SHA256 = "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986"
MERGES = 300

# GPT-2's pre-tokenisation pattern, as in encoder.py.
PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

HAND_WRITTEN = [
    "Café naïve façade — déjà vu, résumé; Straße, Größe, Maß.",
    "Ωmega and Ωhm: ΑΒΓ αβγ, Привет, мир! Здравствуйте.",
    "中文分词测试：你好，世界。日本語のテキストです。한국어 문장입니다.",
    "Emoji 😀😀 👍🏽 🇫🇷 ❤️ and symbols ©®™ € £ ¥ §.",
    "Digits 0123456789, ٠١٢٣٤٥٦٧٨٩ and ०१२३४५६७८९, ½ ¾ Ⅻ ².",
    "It's, don't, we're, I've, I'm, you'll, he'd. IT'S DON'T.",
    "Tabs\tand\tnew\nlines\n\n  indented   spaced    words   \n",
    "e\u0301 a\u0308 combining marks: cafe\u0301, n\u0303, \u0915\u093f.",
    "non\u00a0breaking\u3000ideographic\u2028separator\u0085next.",
]

# Strings for cases.json, chosen for the pattern's corners.
TEXTS = [
    "", " ", "  ", "a", " a", "Hello world", "Hello, world!", "hello  world", "hello   world", "hello\tworld",
    "trailing space ", "trailing spaces   ", " leading", "   leading three", "\n", "\n\n", "a\n\nb", "a\n\n\nb",
    "line one\nline two\n", " \n \n", "\t\t", "\r\n", "a \r\nb", "x  \n  y",
    # contractions: lowercase only, ASCII apostrophe only
    "it's", "don't", "we're", "I've", "I'm", "you'll", "he'd", "IT'S", "DON'T", "We'Re", "'s", "'t", "'re", "'ve",
    "'m", "'ll", "'d", "'S", "'x", "'", "''", "'''s", "?'s", " 's", "a's'", "'ss", "'lll", "'rev", "it’s", "rock'n'roll",
    "can't've", "y'all'd've",
    # numbers and punctuation runs
    "123", " 123", "1234567890", "3.14159", "1,000,000", "2024-01-01", "v2.0", "a1b2c3", "abc123def", "...", "?!?!",
    " ...", "a...b", "--foo--", "(hello)", "[x]{y}<z>", "#include <stdio.h>", "x=y+z*2", "$100 & 50%", "@user #tag",
    "emails: a.b@c.de", "https://example.com/path?q=1&r=2", "C++17", "a_b", "__init__", "~/.bashrc",
    # non-ASCII letters and numbers
    "é", "café", " café", "naïve", "Straße", "ß", "Ω", "Ωmega", "ΑΒΓ", "Привет мир", "中文", "你好，世界", "日本語",
    "한국어", "العربية", "עברית", "ไทย", "हिन्दी",
    "e\u0301", "cafe\u0301", " e\u0301\u0301", "\u0301", "a\u0308b", "\u0915\u093f", "x\u20dd",
    "٣", "٠١٢", " ٣٤", "a٣", "०१२", "½", "²", "Ⅻ", "3½", "①②", "\U0001D7D8", "x²", "٣a",
    # spaces that are White_Space but not ASCII; control characters that are not
    "a\u00a0b", "\u00a0", " \u00a0", "\u00a0\u00a0x", "a\u3000b", "\u3000", "a\u2028b", "a\u0085b", "a\u2003b",
    "a\u200bb", "a\u1680b", "a\x1cb", "a\x1fb", "a\x0bb\x0cc", "\x00", "a\x00b", "\x7f", "\x1b[0m",
    # emoji and other symbols
    "😀", " 😀", "😀😀", "a😀b", "👍🏽", "🇫🇷", "❤️", "👨‍👩‍👧", "©®™", "€100", "£5", "→ ←",
    # the special token is plain text here
    "<|endoftext|>", "a<|endoftext|>b", " <|endoftext|>",
    # longer mixed text
    "The GNU General Public License is a free, copyleft license for software and other kinds of works.",
    "  You may convey verbatim copies of the Program's source code as you receive it, in any medium.\n\n",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "                                                                x",
    "================================================================",
    "thethethethethethethethethethethethethethethethethethethethethe",
    "0000000000000000000000000000000000000000000000000000000000000000",
] + HAND_WRITTEN

# Byte strings that are not UTF-8 (hex), for the surrogateescape rule.
BYTES = [
    b"\xff", b"\x80", b"a\xffb", b" \xff", b"  \xff", b"\xff ", b"!\x80?", b"\x80's", b"word\xfe word", b"\xe2\x82",
    b"\xe2\x82A", b"\xe2\x82 A", b"\xc0\xaf", b"\xc1\x81", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\x9f\xbf",
    b"\xf0\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf4\x8f\xbf\xbf", b"\xf5\x80\x80\x80", b"\xf0\x9f\x98", b"\xf0\x9f\x98x",
    b"\xc3", b"caf\xc3", b"\xc3\xa9\xa9", b"\xa9\xc3\xa9", b"1\xff2", b"\xff123", b"\xffabc", b" \xff\xfe!",
    b"\n\xff\n", b"caf\xe9 latin-1", b"\xc3\x28", b"\xe2\x28\xa1", b"\xf0\x28\x8c\x28", b"'\xffs",
]


def bytes_to_unicode():
    """encoder.py's table: printable bytes keep their code point, the others get 256, 257, ... in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    cs = [chr(n) for n in cs]
    return dict(zip(bs, cs))


def get_pairs(word):
    pairs = set()
    prev_char = word[0]
    for char in word[1:]:
        pairs.add((prev_char, char))
        prev_char = char
    return pairs


class Encoder:
    """OpenAI's gpt-2/src/encoder.py Encoder, encode side, with its errors= made a parameter of encode."""

    def __init__(self, encoder, bpe_merges):
        self.encoder = encoder
        self.byte_encoder = bytes_to_unicode()
        self.bpe_ranks = dict(zip(bpe_merges, range(len(bpe_merges))))
        self.cache = {}
        self.pat = PAT

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = get_pairs(word)

        if not pairs:
            return token

        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                    new_word.extend(word[i:j])
                    i = j
                except ValueError:
                    new_word.extend(word[i:])
                    break

                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            new_word = tuple(new_word)
            word = new_word
            if len(word) == 1:
                break
            else:
                pairs = get_pairs(word)
        word = " ".join(word)
        self.cache[token] = word
        return word

    def encode(self, text, errors="strict"):
        bpe_tokens = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8", errors))
            bpe_tokens.extend(self.encoder[bpe_token] for bpe_token in self.bpe(token).split(" "))
        return bpe_tokens


def train(text, merges):
    """Byte-level BPE: count the pre-tokens, then merge the most frequent adjacent pair `merges` times."""
    b2u = bytes_to_unicode()
    counts = {}
    for piece in regex.findall(PAT, text):
        word = tuple(b2u[b] for b in piece.encode("utf-8"))
        counts[word] = counts.get(word, 0) + 1
    words = list(counts.items())
    out = []
    for _ in range(merges):
        pairs = {}
        for word, n in words:
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        out.append(best)
        merged = []
        for word, n in words:
            new, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            merged.append((tuple(new), n))
        words = merged
    return out


def char_class(c):
    if regex.fullmatch(r"\p{L}", c):
        return "L"
    if regex.fullmatch(r"\p{N}", c):
        return "N"
    if regex.fullmatch(r"\s", c):
        return "S"
    return "O"


def classes():
    """Code points at the edges of every run of one class, their neighbours, and random ones, by class."""
    cls = [char_class(chr(cp)) for cp in range(0x110000)]
    picked = set(range(0, 0x100))
    for cp in range(1, 0x110000):
        if cls[cp] != cls[cp - 1]:
            picked.update({cp - 2, cp - 1, cp, cp + 1})
    rng = random.Random(2)
    picked.update(rng.randrange(0x110000) for _ in range(3000))
    picked.update({0x10FFFF, 0xD800, 0xDFFF})
    out = {"L": [], "N": [], "S": [], "O": []}
    for cp in sorted(p for p in picked if 0 <= p < 0x110000):
        out[cls[cp]].append(cp)
    return out


def random_texts(rng):
    """Seeded random strings from pieces that meet at the pattern's edges, and from random code points."""
    alphabet = [
        "a", "b", "e", "t", "s", "S", "d", "l", "m", "r", "v", "x", "the", "ing", "'", "’", " ", " ", " ", "  ", "\t",
        "\n", "\r", "\x0b", "\x1c", "\x00", "1", "9", "42", "٣", "½", "Ⅻ", "²", "é", "e\u0301", "\u0301", "ß", "Ω",
        "中", "文", "😀", "👍🏽", "\u00a0", "\u3000", "\u2028", "\u0085", "\u200b", "!", "?", ".", "-", "'s", "'t",
        "'re", "'ve", "'m", "'ll", "'d", "'S", "<|endoftext|>", "\U0001E030", "\U00031350", "\uffff", "\U0010FFFF",
    ]
    out = [
        "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 14))) for _ in range(300)
    ]
    for _ in range(100):
        chars = []
        for _ in range(rng.randrange(1, 8)):
            cp = rng.randrange(0x110000)
            while 0xD800 <= cp <= 0xDFFF:
                cp = rng.randrange(0x110000)
            chars.append(rng.choice(["", " ", "a", "1", "!", "  "]) + chr(cp))
        out.append("".join(chars))
    return out


def random_bytes(rng):
    pool = [b"a", b" ", b"'s", b"1", b"!", b"\n", b"\xc3\xa9", b"\xe4\xb8\xad", b"\xf0\x9f\x98\x80"]
    out = []
    for _ in range(120):
        parts = []
        for _ in range(rng.randrange(1, 10)):
            if rng.random() < 0.5:
                parts.append(bytes([rng.randrange(0x80, 0x100)]))
            else:
                parts.append(rng.choice(pool))
        out.append(b"".join(parts))
    return out


def shuffled(rng):
    """The merges and vocabulary of shuffled/ and its cases."""
    b2u = bytes_to_unicode()
    merges = []
    while len(merges) < 40:
        # a pair that can occur: two adjacent parts of a piece such as "Ġabba"
        piece = rng.choice(["", "Ġ"]) + "".join(rng.choice("ab") for _ in range(6))
        i = rng.randrange(len(piece) - 1)
        j = rng.randrange(i + 2, min(len(piece), i + 6) + 1)
        k = rng.randrange(i + 1, j)
        pair = (piece[i:k], piece[k:j])
        if pair not in merges:
            merges.append(pair)
    rng.shuffle(merges)
    merges.append(merges[3])  # a pair twice: its rank is the later one
    vocab = {}
    for c in sorted(b2u.values()):
        vocab[c] = len(vocab)
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    dropped = merges[-2][0] + merges[-2][1]
    del vocab[dropped]  # one result not in the vocabulary: the ids keep a gap
    enc = Encoder(vocab, merges)
    cases = []
    while len(cases) < 300:
        text = "".join(rng.choice("aab ") for _ in range(rng.randrange(1, 40)))
        try:
            ids = enc.encode(text)
        except KeyError:
            continue
        cases.append({"text": text, "ids": ids, "pieces": regex.findall(PAT, text)})
    while len(cases) < 305:  # long pieces: past the C++ cache, where O(n^2) would show
        text = "".join(rng.choice("ab") for _ in range(3000))
        try:
            cases.append({"text": text, "ids": enc.encode(text), "pieces": [text]})
        except KeyError:
            pass
    return vocab, merges, cases, dropped


def write_vocab(folder, vocab, merges):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def write_cases(folder, cases):
    with open(os.path.join(folder, "cases.json"), "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(c, ensure_ascii=True) for c in cases) + "\n]\n")


def main():
    with open(GPL, "rb") as f:
        gpl = f.read()
    if hashlib.sha256(gpl).hexdigest() != GPL_SHA256:
        sys.exit(f"{GPL} is not the file this data was made from (SHA-256 {GPL_SHA256})")
    corpus = gpl.decode("utf-8") + "\n" + "\n".join(HAND_WRITTEN * 4)
    merges = train(corpus, MERGES)

    b2u = bytes_to_unicode()
    vocab = {}
    for c in sorted(b2u.values()):  # sorted code points: bytes_to_unicode's printable-first order
        vocab[c] = len(vocab)
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)

    enc = Encoder(vocab, merges)
    rng = random.Random(1)
    cases = []
    for text in TEXTS + random_texts(rng):
        ids = enc.encode(text)
        cases.append({"text": text, "ids": ids, "pieces": regex.findall(PAT, text)})
    for raw in BYTES + random_bytes(rng):
        try:
            raw.decode("utf-8")
            continue  # valid UTF-8 comes as "text"
        except UnicodeDecodeError:
            pass
        text = raw.decode("utf-8", "surrogateescape")
        pieces = [p.encode("utf-8", "surrogateescape") for p in regex.findall(PAT, text)]
        assert b"".join(pieces) == raw
        cases.append({"hex": raw.hex(), "ids": enc.encode(text, "surrogateescape"), "pieces_hex": [p.hex() for p in pieces]})
    for case in cases:  # the pattern covers every character, so the pieces are the whole text
        if "text" in case:
            assert "".join(case["pieces"]) == case["text"]

    write_vocab(OUT, vocab, merges)
    write_cases(OUT, cases)
    odd_vocab, odd_merges, odd_cases, dropped = shuffled(random.Random(3))
    write_vocab(os.path.join(OUT, "shuffled"), odd_vocab, odd_merges)
    write_cases(os.path.join(OUT, "shuffled"), odd_cases)
    with open(os.path.join(OUT, "classes.json"), "w", encoding="utf-8") as f:
        json.dump(classes(), f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}: {len(vocab)} tokens, {len(merges)} merges, {len(cases)} cases; shuffled/: "
          f"{len(odd_vocab)} tokens, {len(odd_merges)} merges, {len(odd_cases)} cases, {dropped!r} not in the vocabulary")


if __name__ == "__main__":
    main()
