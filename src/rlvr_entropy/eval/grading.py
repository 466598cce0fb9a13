"""Answer extraction and math equivalence (math-verify, imported lazily)."""
from __future__ import annotations

import re

_NUM = re.compile(r"(?:-?\d[\d,]*(?:\.\d+)?|-?\.\d+)(?:[eE][-+]?\d+)?")
_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)", re.S)


def _last_boxed(text: str) -> str | None:
    i = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if i < 0:
        return None
    j = text.index("{", i)
    depth = 0
    for pos in range(j, len(text)):
        ch = text[pos]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1:pos].strip()
    return None  # unbalanced


def extract_answer(text: str | None) -> str | None:
    """The final answer of a response: the last ``\\boxed{...}`` (nested braces handled), else the last
    "Answer: ..." line (DAPO template), else the last inline math span (``$...$``, ``$$...$$``, ``\\(...\\)``),
    else the last number (thousands commas removed, scientific notation kept). None when nothing is found."""
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    m = list(re.finditer(r"Answer\s*:\s*(.+)", text))
    if m:
        ans = m[-1].group(1).strip().rstrip(".").strip()
        ans = ans.strip("$").strip()
        if ans:
            return ans
    spans = [next(g for g in m.groups() if g is not None).strip() for m in _MATH.finditer(text)]
    spans = [x for x in spans if x]
    if spans:
        return spans[-1]
    nums = _NUM.findall(text)
    if nums:
        return nums[-1].replace(",", "").rstrip(".")
    return None


def _norm(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\(?:text|mathrm)\{([^}]*)\}", r"\1", s)
    s = s.replace("\\!", "").replace("\\,", "").replace(" ", "")
    s = s.rstrip(".")
    return s


def math_equal(a: str | None, b: str | None) -> bool:
    """Whether two math answers are equivalent, through math-verify (LaTeX, fractions, sets, intervals ...);
    falls back to a normalized string comparison when math-verify cannot parse either side."""
    if a is None or b is None:
        return False
    if _norm(a) == _norm(b):
        return True
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a dependency of the eval extra
        return False
    try:
        ga = parse(f"${b}$") or parse(b)
        pa = parse(f"${a}$") or parse(a)
        if not ga or not pa:
            return False
        return bool(verify(ga, pa))
    except Exception:  # math-verify raises on pathological inputs; treat as not equal
        return False
