#!/usr/bin/python3
"""Writes tests/data/peft/pattern_golden.json: what Python's re answers for
PEFT's rank_pattern / alpha_pattern matching, the oracle for
include/lora/detail/pattern.hpp (tests/unit-pattern.cpp). The tests read only
the output file; run this again with Python 3.11 (standard library only):
    python3 tests/golden/make_pattern_golden.py

PEFT's get_pattern_key takes a key of rank_pattern / alpha_pattern for a
module when
    re.match(rf"(.*\\.)?({key})$", module) is not None
so every answer here is exactly that call. The output holds:
  cases          [key, module, expected]: hand-picked keys (PEFT's own kind,
                 anchors, $ before a final newline, newlines inside the module,
                 the empty key, lazy quantifiers, '{' literals, classes,
                 escapes, Unicode) against hand-picked modules; random
                 patterns from the supported grammar against random and
                 constructed subjects (each with its lazy twin, which must
                 answer alike); random strings of regex characters, whatever
                 Python makes of them.
  ascii_differs  [key, module, expected, expected_with_re_ASCII]: the cases
                 where \\d \\w \\s \\b take Unicode characters by default; the
                 C++ matcher gives the re.ASCII answer (its documented
                 difference).
  refused        [key, construct]: keys Python accepts that the C++ matcher
                 refuses (outside its linear-time subset, or too large);
                 `construct` is a word its message must contain.
  python_rejects [key, Python's message]: keys re.compile rejects, which the
                 C++ matcher must refuse too.
Random parts are seeded, so the file is the same on every run.
"""
import json
import os
import random
import re
import signal
import sys
import warnings
from re import _constants as sre_c
from re import _parser as sre_parse

assert sys.version_info[:2] == (3, 11), "the oracle is Python 3.11's re"

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "data", "peft", "pattern_golden.json")
rng = random.Random(20260312)


class Timeout(Exception):
    pass


def _on_alarm(*_):
    raise Timeout()


signal.signal(signal.SIGALRM, _on_alarm)
warnings.simplefilter("ignore", FutureWarning)  # "possible nested set" and the like: Python still accepts them


def peft_match(key, module, flags=0):
    """PEFT's test, or None when Python backtracks for longer than half a second."""
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        return re.match(rf"(.*\.)?({key})$", module, flags) is not None
    except Timeout:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def python_error(key):
    """Python's message when it refuses PEFT's pattern around `key`, else None."""
    try:
        re.compile(rf"(.*\.)?({key})$")
        return None
    except (re.error, OverflowError, RecursionError) as e:
        return f"{type(e).__name__}: {e}"


OCTAL = set("01234567")


# What the C++ matcher refuses although Python accepts it, found from Python's own parse tree
# (and its tokens, for octal escapes, which the tree stores as plain literals).
def unsupported_constructs(key):
    found = set()

    def walk(items):
        for op, av in items:
            if op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
                found.add("lookahead assertion" if av[0] == 1 else "lookbehind assertion")
                walk(av[1])
            elif op is sre_c.GROUPREF:
                found.add("backreference")
            elif op is sre_c.GROUPREF_EXISTS:
                found.add("conditional group")
            elif op is sre_c.ATOMIC_GROUP:
                found.add("atomic group")
                walk(av)
            elif op is sre_c.POSSESSIVE_REPEAT:
                found.add("possessive quantifier")
                walk(av[2])
            elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT):
                walk(av[2])
            elif op is sre_c.SUBPATTERN:
                if av[1] or av[2]:
                    found.add("inline flags")
                walk(av[3])
            elif op is sre_c.BRANCH:
                for b in av[1]:
                    walk(b)

    walk(sre_parse.parse(rf"(.*\.)?({key})$"))
    # Python's tokens: a backslash and the character after it are one; comments (?#...) hold no escapes;
    # in a class every \0-\7 is octal.
    i, in_class, class_start = 0, False, 0
    while i < len(key):
        c = key[i]
        if c == "\\":
            e, after = key[i + 1:i + 2], key[i + 2:i + 4]  # a last backslash escapes the wrapper's ")"
            if e == "N":
                found.add("named character escape")
            elif e == "0" or (e and e in "1234567" and (in_class or (len(after) == 2 and set(after) <= OCTAL))):
                found.add("octal escape")  # outside a class, \1 to \99 are backreferences (in the tree)
            i += 2
        elif in_class:
            in_class = not (c == "]" and i > class_start)  # ']' first in a class is a literal
            i += 1
        elif c == "[":
            i += 2 if key.startswith("[^", i) else 1
            in_class, class_start = True, i
        elif key.startswith("(?#", i):
            i += 3
            while i < len(key) and key[i] != ")":
                i += 2 if key[i] == "\\" else 1
            i += 1
        else:
            i += 1
    return found


cases = []
ascii_differs = []
seen = set()


def add(key, module):
    if (key, module) in seen:
        return
    seen.add((key, module))
    expected = peft_match(key, module)
    expected_ascii = peft_match(key, module, re.ASCII)
    if expected is None or expected_ascii is None:
        # A skipped case would make the file depend on the machine's speed.
        sys.exit(f"Python took over 0.5 s on {key!r} / {module!r}: take the case out")
    if expected == expected_ascii:
        cases.append([key, module, expected])
    else:
        ascii_differs.append([key, module, expected, expected_ascii])


def cross(keys, modules, wrap_literals=True):
    for k in keys:
        assert python_error(k) is None, k
        for m in modules:
            add(k, m)
        # The same key as a group takes the C++ matcher's full engine rather than its literal fast path.
        if wrap_literals and not any(c in k for c in "()[]{}|^$*+?"):
            for m in modules:
                add(f"(?:{k})", m)


def make_lazy(text):
    # Every quantifier lazy: a '?' after each * + ? and repetition that is not lazy already. Done token by
    # token so that escapes, classes and group openers stay as they are.
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            out.append(text[i:i + 2])
            i += 2
        elif c == "[":
            j = i + 1
            if text[j:j + 1] == "^":
                j += 1
            if text[j:j + 1] == "]":
                j += 1
            while text[j] != "]":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("(?:", i):
            out.append("(?:")
            i += 3
        elif text.startswith("(?P<", i):
            j = text.index(">", i) + 1
            out.append(text[i:j])
            i = j
        elif c in "*+?}":
            out.append(c + "?")
            i += 2 if text[i + 1:i + 2] == "?" else 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


# ---- hand-picked ----------------------------------------------------------------------------------

peft_modules = [
    "q_proj", "v_proj", "k_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
    "model.layers.10.self_attn.q_proj", "model.layers.01.self_attn.q_proj", "model.layers.1.mlp.down_proj",
    "model.layers.17.self_attn.v_proj", "model.layers.17.self_attn.k_proj",
    "base_model.model.model.layers.0.self_attn.q_proj", "transformer.h.0.attn.c_attn", "transformer.h.10.attn.c_attn",
    "lm_head", "model.layers.0.self_attn.q_proj\n", "model.layers.0.self_attn.q_proj\n\n",
    "model\nlayers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj.base_layer", "xq_proj",
    "model.layers.0.self_attnXq_proj", "", ".", "model.layers.0.self_attn.", "layers.0.self_attn.q_proj",
    "model.layers.1.mlp.gate_proj", "model.layers.99.mlp.up_proj", "model_layers_0_self_attn_q_proj",
]
peft_keys = [
    "q_proj", "v_proj", "model.layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj", "self_attn.q_proj",
    r"layers\.\d+\.mlp\..*", r"^model\.layers\.1\.", r"^model\.layers\.1\..*",
    r"model\.layers\.(0|1|2)\.self_attn\.(q|k|v)_proj", r"layers\.[0-9]+\.self_attn\.[qkv]_proj", "(q|v)_proj",
    r"layers\.17\.self_attn\.(q|v)_proj", "lm_head", "transformer.h.0.attn.c_attn", r"h\.\d\.attn\.c_attn",
    r"h\.\d+\.attn\.c_attn", ".*", ".*_proj", "", r"\w+_proj", r"layers\.\d{1,2}\.mlp\.(gate|up|down)_proj",
    "model.layers.1", "layers.1.mlp", "mlp.down_proj$", r"q_proj\Z", r"\bq_proj", r"\Bq_proj", "(?:q|k)_proj",
    "(?P<which>q|v)_proj", "[qv]_proj", "[^k]_proj", "q_proj|v_proj", "model.layers.0.self_attn.q_proj|lm_head",
    r"model\.layers\.0\.self_attn\.q_proj", r"layers\.0\.self_attn\.q_proj", "model.layers.[0-9].self_attn.q_proj",
]
cross(peft_keys, peft_modules)

# `.` in a key: any code point but '\n', also in the literal fast path (keys with dots and no other metacharacter).
dot_modules = [
    "a.b", "aXb", "a\nb", "aéb", "a😀b", "x.a.b", "x\na.b", "x.aéb", "a.b\n", "a.b\n\n", "\n", ".", "..", "x..",
    "é", "😀", "x.😀", "a.b.c", "xa.b", "x.a.b\n", "\n.a.b", "x\n.a.b", "a..b", "a.b.", "ab", "a", "",
]
dot_keys = ["a.b", r"a\.b", ".", "..", "a.", ".a", "é.b", "a.b.c", "a..b", r"a\..", "😀", " ", "a b", r"\ ",
            r"\-", r"\#", "#", "-", "a,b", "a=b", ":", r"\"", "'", "a/b", r"\\", r"a\\b", "}", "]", r"\}", r"\]"]
cross(dot_keys, dot_modules + ["a\\b", "}", "]", " ", "-", "#", "a,b", ":", "\"", "a/b", "x.}", "x.]"])

anchor_modules = ["", "a", "a\n", "a\n\n", "\na", "x.a", "x.a\n", "xa", "a.", ".a", "a b", "\n", "é", "aé", "ab",
                  "x.ab", "a\nb", "\n\n", "_", "x._"]
anchor_keys = ["^a", "a$", "^a$", r"\Aa", r"a\Z", r"\Aa\Z", r"a$\n", r"a\n$", r"a\n\Z", r"a\Z\n", "$", "^", r"\Z",
               r"\A", "^$", r"\b", r"\B", r"a\b", r"\ba", r"a\B", r"\Ba", r"\b\b", r"\B\B", "(^|x)a", r"a($|\n)",
               r"(?:^.*\.)?a", r"(?:^)*a", r"(?:$)+", "a$$", "^^a", r"\b_", r"_\b", r"(\b)", "$|a", r"a|\Z",
               r"^(?:a|)$"]
cross(anchor_keys, anchor_modules)

newline_modules = ["a\nb", "\n", "\n\n", "a\n", "\na", "x.a\nb", "x\n.a", "a.b\nc", " \t\n", "a\r\n", "\r", ""]
newline_keys = [".*", "(.*)", "[^x]*", r"\n", r"a\nb", "a.b", r"[\n]", r"\s+", r"\S+", r"[^\n]*", r"(.|\n)*",
                r"\n?", r"a\r\n", r"[\s\S]*", r".*\n"]
cross(newline_keys, newline_modules)

cross([""], ["", ".", "x.", "x.\n", "\n", "x\n.", "a", "a.b.", "..", "\n\n", ".\n", "a.b", "é.", "\n.", ".\n\n"])

lazy_modules = ["", "a", "aa", "aaa", "aaaa", "ab", "aab", "abc", "ac", "abac", "x.a", "x.aa", "q_proj",
                "x.q_proj", "layers.1.mlp", "layers.12.mlp", "model.layers.12.mlp", "a\n", "b"]
for greedy in ["a*", "a+b", "(a|ab)*c", "a{2,3}", ".*_proj", "(?:x.)?a", "a?", r"layers\.\d+\.mlp",
               "(a*)*", "a{,2}", "a{2,}", "(?:a|b)+", "[ab]*c?", "(a+)+", "(?:a|ab)(?:c|bcd)(?:d*)"]:
    lazy = make_lazy(greedy)
    cross([greedy, lazy], lazy_modules)
    # Lazy or greedy, re.match finds a match when there is one: the twins answer alike.
    assert all(peft_match(greedy, m) == peft_match(lazy, m) for m in lazy_modules), greedy

brace_modules = ["a{", "a{x}", "a{1,2", "aa", "a", "", "{", "}", "{}", "a{}", "x", "x{", "a{ 1}", "aaa", "a{1}",
                 "{1", "ab", "a{1,2}{", "aaa{", "a{,", "a{,}", "a{1 }", "x.{", "{1}", "aa{", "a{{", "a{2}b"]
brace_keys = ["a{", "a{x}", "a{1,2", "a{,2}", "a{2,}", "a{,}", "{", "}", "{}", "a{}", "x{1}", "a{1}{", "a{ 1}",
              "a{1 }", "a{01}", "{1", "a{1,2}{", "a*{", "a{2}b{,1}", r"\{1\}", "a{,", "a{0}", "a{0,0}",
              "a{{", "a{}{", "(a){", "a{1,}?", "a{,1}?", "{1x", r"a\{2}", "a{2\\}", "a{a}"]
cross(brace_keys, brace_modules)

class_modules = ["a", "b", "c", "d", "z", "]", "-", "1", "_", ".", "\n", "\b", "A", "B", "é", "ê", "ë", "x.a",
                 "\\", "$", "^", "[", "&", "/", "😀", " ", "C", "\t", ",", "ab", ""]
class_keys = ["[a-c]", "[^a-c]", "[]a]", "[^]a]", "[]-a]", "[a-]", "[-a]", r"[\d]", r"[\D]", r"[\w.]", r"[^\W_]",
              r"[\s]", r"[\b]", r"[\x41-\x43]", r"[\u00e9]", "[é-ë]", r"[\]]", r"[\\]", "[.]", "[$^]", r"[a\-z]",
              "[--/]", "[[]", "[&&]", r"[\n]", r"[^\n]", r"[\U0001F600]", "[^]]", r"[\^]", "[a^]", "[^^]",
              r"[\S\s]", r"[^\d\s]", "[ab]", "[a]", "[^a]", r"[\.]", r"[\-]", "[a-a]", r"[\x00-\x7f]", "[-]",
              "[^-]", r"[a-c\d]", "[\t]", r"[\t-\r]", "[a|b]", r"[\(\)]", "[()]", "[*+?{}]", "[😀]"]
cross(class_keys, class_modules)

escape_modules = ["A", "é", "😀", "\t", "\n", "\r", "\f", "\v", "\a", ".", "-", " ", "\\", "#", "_", "%", "x.A",
                  "a", "\x00", "AA", "\x7f", "'", "\"", "é\n", "x"]
escape_keys = [r"\x41", r"\u00e9", r"\U0001F600", r"\t", r"\n", r"\r", r"\f", r"\v", r"\a", r"\.", r"\-", r"\ ",
               r"\é", r"\\", r"\#", r"\_", r"\%", r"\x00", r"\x7F", r"\x411", r"\u00E9", r"\'", "\\\"", r"\d", r"\D",
               r"\w", r"\W", r"\s", r"\S", "\\\n", "\\\t", r"\$", r"\^", r"\*", r"\+", r"\?", r"\(", r"\)", r"\[",
               r"\{", r"\|"]
cross(escape_keys, escape_modules)

unicode_modules = ["é", "e", "日本", "😀", "x.😀", "xé", "ab", "日", "本", "é.é", "x.日本", "日本\n", "e\u0301", "Ω",
                   "ω", "٣", "x", "", "__", "a٣"]
unicode_keys = ["é", "é.", "..", "😀", "日本", "[日-本]", ".{2}", r"\w", r"\w+", r"\d", r"\s", ".", r"\W", r"\b.",
                "e.", "[^a]", "(?:é|e)", "日.", "[Ω-ω]", "Ω|ω", r"\u65e5\u672c", r"\U0001f600"]
cross(unicode_keys, unicode_modules + ["\u00a0", "\u2003", "\x1c", "\x85"])

group_modules = ["a", "b", "ab", "ba", "c", "ac", "bc", "abc", "x.ab", "x.b", "", "aa", "x", "x.a", "a.b"]
group_keys = ["a|b", "a|", "|a", "(a|b)c", "a)(b", "a)|(b", "a)|(b.*", "x)|(.*", "(a)(b)", "()", "(?:)", "(a|)",
              "(?#comment)a", "a(?#c)*", r"(?#a\)b)a", "(?P<n>a)(?P<m>b)", "a||b", "((a))", "(?:(?:a)|b)c",
              "(?:a)*", "()*", "(?:)*b", "a|b|c|ab|abc", r"x\.a|b", "(a)|b", "a)|.(b", ")|(", "a)*(b", "a)?(b",
              "(((a)))|b", ")(", "a)(", "a(?:)b", "(?P<_>a)", "(?P<a1>a|b)+"]
cross(group_keys, group_modules)

repeat_modules = ["a" * n for n in range(0, 9)] + ["ab" * n for n in range(1, 5)] + ["b", "aab", "x.aaa", "aaab"]
repeat_keys = ["a{0}", "a{2}", "a{2,3}", "(ab){2}", "(a|b){3,}", "(a*)*", "(a*)+b", "(a|aa)+", "(?:a?){3}a{3}",
               "(?:a{2}){2}", "a{1,1}", "(?:a|){4}", "(?:a{0,2}){3}", "(?:ab|a)*b?", "a+a+a+",
               "(a?)*", "(a?){2,}?", "(?:a*b*)*", "(?:(?:a)*)*", "(a+)+b", "(a*)*c", "(.*)*x", "((((a*)*)*)*)*",
               "(?:){100000}", "(?:){3}a", "(?:){0}", "(?:(?:){5}){7}", "a{0}b", "(?:a{0})*", "(?:$){3}",
               r"(?:\b){2,}a"]
cross(repeat_keys, repeat_modules)

# ---- random patterns from the supported grammar --------------------------------------------------

ALPHABET = ["a", "b", ".", "_", "1", "\n", "é", " ", "Z"]


def literal_text(c):
    return re.escape(c) if c != " " else c


class Gen:
    """Random pattern text with a sampler of subjects it may match (anchors are ignored by the sampler)."""

    def __init__(self, r):
        self.r = r
        self.groups = 0

    def atom(self, depth):
        r = self.r
        kind = r.choices(["lit", "dot", "class", "short", "group", "anchor"], [8, 2, 2, 1, 3 if depth < 3 else 0, 1])[0]
        if kind == "lit":
            c = r.choice(ALPHABET)
            return literal_text(c), lambda c=c: c, False
        if kind == "dot":
            return ".", lambda: r.choice([c for c in ALPHABET if c != "\n"]), False
        if kind == "short":
            s = r.choice(["d", "D", "w", "W", "s", "S"])
            members = [c for c in ALPHABET if re.fullmatch("\\" + s, c, re.ASCII)] or ["?"]
            return "\\" + s, lambda: r.choice(members), False
        if kind == "class":
            parts = []
            for _ in range(r.randint(1, 3)):
                p = r.choice(["lit", "range", "short"])
                if p == "lit":
                    parts.append(re.escape(r.choice(ALPHABET + ["-", "]", "^"])))
                elif p == "range":
                    lo, hi = sorted(r.sample("ab_1Zé", 2))
                    parts.append(lo + "-" + hi)
                else:
                    parts.append("\\" + r.choice("dDwWsS"))
            text = "[" + ("^" if r.random() < 0.3 else "") + "".join(parts) + "]"
            members = [c for c in ALPHABET + ["-", "]", "^"] if re.fullmatch(text, c, re.ASCII)] or ["?"]
            return text, lambda: r.choice(members), False
        if kind == "anchor":
            return r.choice(["^", "$", r"\A", r"\Z", r"\b", r"\B"]), lambda: "", True
        text, sample = self.alternation(depth + 1)
        opener = r.choice(["(", "(?:", "(?P<g%d>" % self.groups])
        self.groups += 1
        return opener + text + ")", sample, False

    def quantified(self, depth):
        r = self.r
        text, sample, is_anchor = self.atom(depth)
        if is_anchor or r.random() < 0.6:
            return text, sample
        q = r.choice(["*", "+", "?", "{m}", "{m,}", "{m,n}", "{,n}"])
        m = r.randint(0, 2)
        n = m + r.randint(0, 2)
        lo, hi = {"*": (0, 3), "+": (1, 3), "?": (0, 1), "{m}": (m, m), "{m,}": (m, m + 2), "{m,n}": (m, n),
                  "{,n}": (0, n)}[q]
        q = q.replace("m", str(m)).replace("n", str(n))
        if r.random() < 0.3:
            q += "?"
        return text + q, lambda: "".join(sample() for _ in range(r.randint(lo, hi)))

    def sequence(self, depth):
        items = [self.quantified(depth) for _ in range(self.r.randint(0 if depth else 1, 3))]
        return "".join(t for t, _ in items), lambda: "".join(s() for _, s in items)

    def alternation(self, depth):
        branches = [self.sequence(depth) for _ in range(1 if self.r.random() < 0.7 else self.r.randint(2, 3))]
        return "|".join(t for t, _ in branches), lambda: self.r.choice(branches)[1]()


def mutate(s, r):
    if not s:
        return r.choice(ALPHABET)
    i = r.randrange(len(s))
    op = r.randrange(3)
    if op == 0:
        return s[:i] + s[i + 1:]
    if op == 1:
        return s[:i] + r.choice(ALPHABET) + s[i:]
    return s[:i] + r.choice(ALPHABET) + s[i + 1:]


random_keys = 0
for _ in range(420):
    g = Gen(rng)
    text, sample = g.alternation(0)
    if python_error(text) is not None:
        continue
    random_keys += 1
    subjects = set()
    for _ in range(3):
        s = sample()
        subjects.update({s, "x." + s, "a.b." + s, s + "\n", mutate(s, rng), "\n" + s})
    for _ in range(3):
        subjects.add("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6))))
    subjects = sorted(subjects)[:10]
    lazy = make_lazy(text)
    assert python_error(lazy) is None, (text, lazy)
    for s in subjects:
        add(text, s)
        if lazy != text:
            # Lazy or greedy, re.match finds a match when there is one: the twin must answer alike.
            assert peft_match(lazy, s) == peft_match(text, s), (text, lazy, s)
            add(lazy, s)

# ---- random strings of regex characters: whatever Python makes of them --------------------------------

FUZZ = list("aab.()[]{}|*+?^$\\-,0123:dwBbxéPN<>=!#iA Z\n") + [
    "(?:", "(?P<n>", "(?P<m>", "(?P=n)", "(?=", "(?<", "(?#", "\\1", "\\0", "\\x4", "\\u00e", "\\b", "\\B", "\\A",
    "\\Z", "\\d", "\\W", "\\s", "(?i", "{1,2}", "{,1}", "{2,}", "*?", "??", "+?", "*+"]
FUZZ_SUBJECTS = ["", "a", "b", "ab", "aa", "x.a", "a\n", "{", "a{1}", "é", "a.b", "0", "ba", "-", "\n", "a-b"]
python_rejects = []
refused = []
fuzz_rejected = fuzz_refused = 0
fuzz_seen = set()
for _ in range(2500):
    key = "".join(rng.choice(FUZZ) for _ in range(rng.randint(1, 7)))
    if key in fuzz_seen:
        continue
    fuzz_seen.add(key)
    err = python_error(key)
    if err is not None:
        if fuzz_rejected < 400:
            python_rejects.append([key, err])
            fuzz_rejected += 1
        continue
    found = unsupported_constructs(key)
    if found:
        if fuzz_refused < 150:
            refused.append([key, found.pop() if len(found) == 1 else "is not supported"])
            fuzz_refused += 1
        continue
    for s in rng.sample(FUZZ_SUBJECTS, 3):
        add(key, s)

# ---- refusals ----------------------------------------------------------------------------------

nested = "(" * 33 + "a" + ")" * 33
refused_by_hand = [
    ["(?=a)a", "lookahead assertion"], ["(?!b)a", "lookahead assertion"], ["(?<=a)b", "lookbehind assertion"],
    ["(?<!a)b", "lookbehind assertion"], [r"(a)\1", "backreference"], [r"\1", "backreference"],
    ["(?P<x>a)(?P=x)", "backreference"], [r"\0", "octal escape"], [r"\101", "octal escape"], [r"[\1]", "octal escape"],
    [r"[\101]", "octal escape"], ["(a)(?(3)a|b)", "conditional group"], ["(?i:a)", "inline flags"],
    ["(?s:.)", "inline flags"], ["(?-i:a)", "inline flags"], ["(?a:a)", "inline flags"], ["(?>a)", "atomic group"],
    ["a*+", "possessive quantifier"], ["a++", "possessive quantifier"], ["a?+", "possessive quantifier"],
    ["a{1,2}+", "possessive quantifier"], [r"\N{EM DASH}", "named character escape"],
    [r"[\N{EM DASH}]", "named character escape"], ["(?P<é>a)", "not ASCII"], [nested, "nested more than 32"],
    ["(a{1000}){1000}", "NFA instructions"], ["a{20000}", "NFA instructions"], ["x{0,100000}", "NFA instructions"],
    ["(?:a{100}){200,}", "NFA instructions"], ["a{4294967294}", "NFA instructions"],
]
for key, construct in refused_by_hand:
    assert python_error(key) is None, key
refused = refused_by_hand + refused

rejects_by_hand = [
    "(?i)a", "(?i)", "(", ")", "a)", "(a", "a\\", "\\q", "\\c", "\\x4", "\\x", "\\u12", "\\U0011000", "\\U00110000",
    "[z-a]", "a{3,1}", "*a", "a**", "a{1}{2}", "a*?*", "a???", "^*", "$+", "\\b+", "\\A?", "\\Z{2}", "\\B*", "[", "[]",
    "[^]", "[\\d-z]", "[a-\\w]", "(?P<1>a)", "(?P<>a)", "(?P<a>x)(?P<a>y)", "(?P", "(?P<a", "(?P<a-b>x)", "(?P>x)",
    "(?<a>b)", "(?", "(?z)", "(?)", "\\2", "\\3", "\\8", "[\\8]", "[\\A]", "[\\Z]", "[\\B]", "(?P=x)", "(?#abc",
    "a|*", "(*)", "a{4294967295}", "a{,99999999999}", "a{2,4294967295}", "\\N", "\\N{NO SUCH NAME}",
    "(?<=a+)b", "[a", "a]|[", "(?:", "(?:a", "x(?i)", "\\777", "[\\777]", "a{1,2}{3}", "(?P<a>a)\\2", "{,}", "{1}x",
    "a{3}{,}",
]
for key in rejects_by_hand:
    err = python_error(key)
    assert err is not None, key
    python_rejects.insert(0, [key, err])
python_rejects = sorted({k: e for k, e in python_rejects}.items(), key=lambda kv: (len(kv[0]), kv[0]))
python_rejects = [list(kv) for kv in python_rejects]

out = {
    "about": "re.match(rf\"(.*\\.)?({key})$\", module) is not None, by Python " + sys.version.split()[0] +
             "; written by tests/golden/make_pattern_golden.py",
    "cases": cases,
    "ascii_differs": ascii_differs,
    "refused": refused,
    "python_rejects": python_rejects,
}
os.makedirs(os.path.dirname(OUT), exist_ok=True)
with open(OUT, "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
    f.write("\n")
print(f"{len(cases)} cases ({random_keys} random keys, {sum(c[2] for c in cases)} matching), "
      f"{len(ascii_differs)} ASCII differences, {len(refused)} refused, {len(python_rejects)} Python rejects, "
      f"{os.path.getsize(OUT)} bytes -> {os.path.relpath(OUT)}")
