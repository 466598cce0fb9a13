"""Answer extraction and math equivalence for real model outputs (math-verify, imported lazily).

``extract_answer`` precedence (the first rule that yields an answer wins):

1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces handled);
2. the last answer marker: ``Answer:``, ``Final Answer:``, ``the (final) answer is``, GSM8K's ``####``.
   Repeated markers collapse ("Answer: Answer: 42" -> 42; the echoed template, ``$Answer (without quotes) where
   $Answer is the answer ...``, counts as a marker); a marker with nothing after it on its line takes the next
   non-empty line; a marker with nothing at all, or with only a sentence (prose of more than three words and no
   number or math), is skipped (the one before it is tried, then rule 3). The answer ends with its line or its
   first sentence ("The final answer is 4. The mechanic earned $18 more" -> 4);
3. the last candidate in the text, by position: the last inline math span (``$...$``, ``$$...$$``, ``\\(...\\)``,
   ``\\[...\\]``) or the last number outside math spans, whichever ends later.

A ``$`` is a math delimiter only when what it encloses reads as math (no prose words) and the closing ``$`` is
not followed by a digit; otherwise it is a currency sign, as is ``\\$``: "$3 each ... = $18, then a $2 tip, so he
pays 20" has no math span and its answer is 20.

Every extracted answer is then cleaned (``clean_answer``): markdown emphasis, surrounding math delimiters,
currency signs and trailing punctuation are dropped, ``\\text{...}`` is unwrapped, valid thousands separators are
removed (1,000 -> 1000; "3,4" is left alone), an answer in prose keeps its number ("20 dollars" -> 20, "Janet makes
18 dollars every day" -> 18; the first number after the last "=", "which is", "equals" or "that is" when there is
one: "2 times 5, which is 10" -> 10), a pure arithmetic chain keeps its result ("3 * 6 = 18" -> 18; "x = 5" is
kept as an equation), and closing braces that close nothing are dropped.

``math_equal`` cleans both sides the same way, compares normalized strings, then exact decimals (18.00 = 18),
percent-insensitively (25% = 25), then through math-verify (LaTeX, fractions, sets, intervals, equations).
"""
from __future__ import annotations

import re
from fractions import Fraction

# A number: valid thousands groups or plain digits, optional decimals, fraction, exponent. No sign after a word
# character ("16-3" is 16 and 3, not 16 and -3).
_NUM_BODY = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
_NUM = re.compile(r"(?<![\w.])-?" + _NUM_BODY + r"|(?<![\w.])-?\.\d+")
_NUM_IN_PROSE = re.compile(r"(?<![\w.\\])-?" + _NUM_BODY + r"(?:\s*/\s*\d+(?![\d,]))?%?|(?<![\w.])-?\.\d+%?")
_FULL_NUM = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")

_MARKER = re.compile(r"(?:\banswer\s*(?:is\b\s*)?[:：]|\banswer\s+is\b|^[ \t]*####)", re.IGNORECASE | re.MULTILINE)
# In a prose answer the number comes after the last of these ("2 times 5, which is 10" -> 10).
_RESULT_WORDS = re.compile(r"=|\bwhich\s+is\b|\bequals\b|\bthat\s+is\b", re.IGNORECASE)
# The DAPO/GSM8K instruction echoed back: 'Answer: $Answer (without quotes) where $Answer is the answer ...'.
_TEMPLATE_ECHO = re.compile(r"\(\s*with(?:out)?\s+quotes\s*\)|\bwhere\s+\$?Answer\s+is\s+the\s+answer\b.*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_MAX_WORD_ANSWER = 3  # a prose answer without a number or math: at most this many words ("Evelyn", "Monday")
# A leading marker (or the echoed template placeholder) inside an answer: dropped, repeatedly.
_LEADING_MARKER = re.compile(
    r"^\s*(?:\*\*|__)?\s*(?:\$?answer\b|(?:the\s+)?(?:final\s+)?answer\s+is\b|final\s+answer\b|####)"
    r"\s*(?:\*\*|__)?\s*[:：]?\s*(?:\*\*|__)?\s*", re.IGNORECASE)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_MATH_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "lim", "max", "min", "gcd", "lcm",
               "mod", "det", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "pi", "deg", "sqrt", "frac",
               "np", "inf", "infty"}
_PROSE_TOKEN = re.compile(r"[A-Za-z]{2,}")


def _last_boxed(text: str) -> str | None:
    """Content of the last non-empty, balanced ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``)."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*(\{|\s+)", text))):
        if m.group(1).strip() != "{":  # \boxed 5
            tok = re.match(r"[^\s$]+", text[m.end():])
            if tok:
                return tok.group(0)
            continue
        depth = 0
        for pos in range(m.end() - 1, len(text)):
            ch = text[pos]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    inner = text[m.end():pos].strip()
                    if inner:
                        return inner
                    break
        # unbalanced (a truncated response) or empty (the template's \boxed{}): the one before
    return None


def _prose_words(s: str) -> list[str]:
    """Words of two or more letters outside LaTeX commands and \\text{...}, other than math function names."""
    s = _TEXT_CMD.sub(" ", s)
    s = re.sub(r"\\[A-Za-z]+", " ", s)
    return [w for w in _PROSE_TOKEN.findall(s) if w.lower() not in _MATH_FUNCS]


def _reads_as_math(content: str) -> bool:
    c = content.strip()
    return bool(c) and "\n\n" not in content and len(c) <= 400 and not _prose_words(c)


def math_spans(text: str) -> list[tuple[int, int, str]]:
    """Inline math spans ``(start, end, content)`` in order: ``\\(...\\)``, ``\\[...\\]``, ``$$...$$`` and
    ``$...$``, where a ``$`` pair counts only when its content reads as math and the closing ``$`` is not followed
    by a digit. Escaped ``\\$`` and every other ``$`` are text (currency)."""
    spans, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("\\(", i) or text.startswith("\\[", i):
            close = "\\)" if text[i + 1] == "(" else "\\]"
            j = text.find(close, i + 2)
            if j >= 0:
                spans.append((i, j + 2, text[i + 2:j].strip()))
                i = j + 2
                continue
            i += 2
            continue
        if text.startswith("\\$", i):
            i += 2
            continue
        if text.startswith("$$", i):
            j = text.find("$$", i + 2)
            if j >= 0 and _reads_as_math(text[i + 2:j].replace("\n", " ")):
                spans.append((i, j + 2, text[i + 2:j].strip()))
                i = j + 2
                continue
            i += 2
            continue
        if text[i] == "$":
            j = i + 1
            while j < n and (text[j] != "$" or text[j - 1] == "\\"):
                j += 1
            if j < n and _reads_as_math(text[i + 1:j]) and not (j + 1 < n and text[j + 1].isdigit()) \
                    and not text.startswith("$$", j):
                spans.append((i, j + 1, text[i + 1:j].strip()))
                i = j + 1
                continue
        i += 1
    return spans


def _unwrap_math(s: str) -> str:
    s = s.strip()
    for a, b in (("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]"), ("$", "$")):
        if len(s) >= len(a) + len(b) and s.startswith(a) and s.endswith(b):
            inner = s[len(a):len(s) - len(b)]
            if a != "$" or "$" not in inner:
                return inner.strip()
    return s


def _strip_decorations(s: str) -> str:
    s = s.strip()
    for _ in range(4):  # "**Answer:** $18$." and the like
        prev = s
        s = _LEADING_MARKER.sub("", s, count=1) if _LEADING_MARKER.match(s) else s
        s = s.strip().strip("*_`\"'“”").strip()
        s = re.sub(r"[\s.,;:!]+$", "", s)
        s = _unwrap_math(s)
        if s == prev:
            break
    return s


def _arithmetic_result(s: str) -> str:
    """'3 * 6 = 18' -> '18' when everything left of the last '=' is numbers and operators."""
    if "=" not in s or any(op in s for op in ("<", ">", "\\le", "\\ge", "\\ne")):
        return s
    lhs, rhs = s.rsplit("=", 1)
    lhs_letters = re.sub(r"\\(?:times|cdot|div|frac|dfrac|tfrac|left|right|sqrt)", "", lhs)
    if rhs.strip() and lhs.strip() and not re.search(r"[A-Za-z]", lhs_letters) and not re.search(r"[A-Za-z]", rhs):
        return rhs.strip()
    return s


def _balance_braces(s: str) -> str:
    """Drop trailing backslashes and closing braces that close nothing ("40}\\" from a marker inside \\text{})."""
    s = s.rstrip("\\ ")
    while s.endswith("}") and s.count("}") > s.count("{"):
        s = s[:-1].rstrip("\\ ")
    return s


def clean_answer(s: str | None) -> str | None:
    """Normalize an extracted answer (see the module docstring): None when nothing is left."""
    if s is None:
        return None
    s = re.sub(r"\\(?:boxed|fbox)\{\s*\}", " ", s)  # an empty \boxed{} is the template's
    s = _strip_decorations(_TEMPLATE_ECHO.sub(" ", s))
    # A math span inside prose ("the total is $\frac{3}{4}$ cups"): the last span.
    spans = math_spans(s)
    if spans and _prose_words(s[:spans[-1][0]] + " " + s[spans[-1][1]:]):
        s = spans[-1][2]
    s = s.replace("\\$", "").replace("$", "")
    s = _TEXT_CMD.sub(lambda m: " " + m.group(1) + " ", s) if _prose_words(s) or "\\text" in s else s
    s = re.sub(r"\\(?:,|!|;|:|quad|qquad)|~", " ", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"[\s.,;:!]+$", "", s)
    s = re.sub(r"[\s.,;:!]+$", "", _balance_braces(s))
    if _prose_words(s):
        cuts = list(_RESULT_WORDS.finditer(s))
        tail = s[cuts[-1].end():] if cuts else s
        m = _NUM_IN_PROSE.search(tail) or _NUM_IN_PROSE.search(s)
        if m:
            s = m.group(0)
        elif len(s.split()) > _MAX_WORD_ANSWER:
            return None  # a sentence, not an answer
    s = _arithmetic_result(s)
    s = re.sub(r"\s*/\s*", "/", s) if re.fullmatch(r"-?\d+\s*/\s*\d+", s) else s
    if _FULL_NUM.fullmatch(s):
        s = s.replace(",", "")
    s = s.strip()
    return s or None


def _marker_answer(text: str) -> str | None:
    for m in reversed(list(_MARKER.finditer(text))):
        rest = text[m.end():]
        line, _, after = rest.partition("\n")
        if not _strip_decorations(line):
            nxt = next((x for x in after.split("\n") if x.strip()), "")
            line = nxt if not _MARKER.search(nxt) else ""
        line = _SENTENCE_END.split(line, maxsplit=1)[0]  # "The final answer is 4. The mechanic earned $18 more"
        ans = clean_answer(line)
        if ans:
            return ans
    return None


def extract_answer(text: str | None) -> str | None:
    """The final answer of a response (precedence in the module docstring), cleaned; None when nothing is
    found."""
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed:
        ans = clean_answer(boxed)
        if ans:
            return ans
    ans = _marker_answer(text)
    if ans:
        return ans
    spans = math_spans(text)
    span_end = spans[-1][1] if spans else -1
    masked = list(text)
    for a, b, _ in spans:
        masked[a:b] = " " * (b - a)
    nums = list(_NUM.finditer("".join(masked)))
    if nums and nums[-1].end() > span_end:
        return clean_answer(nums[-1].group(0))
    if spans:
        for _, _, content in reversed(spans):
            ans = clean_answer(content)
            if ans:
                return ans
    return None


def _norm(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox)\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:d|t)frac", r"\\frac", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace(" ", "")
    s = s.rstrip(".")
    return s


def _decimal(s: str) -> Fraction | None:
    s = s.strip()
    if s.endswith("\\%"):
        s = s[:-2]
    elif s.endswith("%"):
        s = s[:-1]
    if not _FULL_NUM.fullmatch(s) and not re.fullmatch(r"-?\d+(?:\.\d+)?[eE][-+]?\d+", s):
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(a: str | None, b: str | None) -> bool:
    """Whether two math answers are equivalent: both are cleaned like extracted answers (currency, units and
    trailing words, thousands separators, markers), then compared as normalized strings, as exact decimals
    (percent signs ignored), and finally through math-verify (LaTeX, fractions, sets, intervals, equations).
    ``b`` is the reference (math-verify's gold side)."""
    if a is None or b is None:
        return False
    if _norm(a) == _norm(b):
        return True
    ca, cb = clean_answer(a), clean_answer(b)
    if ca is None or cb is None:
        return False
    if _norm(ca) == _norm(cb):
        return True
    da, db = _decimal(ca), _decimal(cb)
    if da is not None and db is not None:
        return da == db
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a dependency of the eval extra
        return False
    try:
        for x, y in ((ca, cb), (a, b)):
            gold = parse(f"${y}$") or parse(y)
            pred = parse(f"${x}$") or parse(x)
            if gold and pred and verify(gold, pred):
                return True
        return False
    except Exception:  # math-verify raises on pathological inputs; treat as not equal
        return False
