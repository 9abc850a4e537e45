"""Answer extraction and equivalence for GSM8K (final number) and MATH (last ``\\boxed{}``).

GSM8K: the predicted answer is, in order of preference, the number after the last
``####``, after the last "The answer is", inside the last ``\\boxed{}``, or else the last
number in the text; commas, currency signs, units, percent signs and trailing periods are
dropped and the value compared numerically (|a − b| ≤ 1e-6·max(1, |b|)).

MATH: the predicted answer is the content of the last ``\\boxed{...}`` / ``\\fbox{...}``
(balanced braces), else what follows the last "The answer is"; both sides are normalised
as in Hendrycks et al.'s ``is_equiv`` (``\\dfrac``→``\\frac``, ``\\left``/``\\right``, units
in ``\\text{}``, degrees, ``\\$``, ``%``, spaces, ``a/b``→``\\frac{a}{b}``, ``\\frac12``→
``\\frac{1}{2}``, leading ``x =``) and then compared as strings, or numerically when both
sides evaluate to plain numbers (``\\frac{1}{2}`` == ``0.5``).
"""

from __future__ import annotations

import math
import re

_NUM = r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\$?\s*\.\d+"
_NUM_RE = re.compile(_NUM)


def _to_float(s: str) -> float | None:
    s = s.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if s.endswith("%"):
        s = s[:-1]
    frac = re.fullmatch(r"(-?\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", s)
    try:
        if frac:
            return float(frac.group(1)) / float(frac.group(2))
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def _first_number(text: str) -> float | None:
    m = re.search(r"-?\$?\s*\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+", text)
    if not m:
        return None
    token = re.sub(r"\s*/\s*", "/", m.group(0))
    # "1,2,3" style lists: a comma not followed by exactly three digits is a separator
    if re.search(r",(?!\d{3}(?:\D|$))", token):
        token = token.split(",")[0]
    return _to_float(token)


def _last_number(text: str) -> float | None:
    nums = list(_NUM_RE.finditer(text))
    for m in reversed(nums):
        token = m.group(0)
        if re.search(r",(?!\d{3}(?:\D|$))", token):
            token = token.split(",")[-1] or token.split(",")[0]
        v = _to_float(token)
        if v is not None:
            return v
    return None


def extract_gsm8k_answer(text: str) -> float | None:
    """The model's final numeric answer (see module docstring), or None."""
    if text is None:
        return None
    for pattern in (r"####\s*(.*)", r"[Tt]he (?:final )?answer is[:\s]*(.*)"):
        hits = re.findall(pattern, text)
        if hits:
            v = _first_number(hits[-1])
            if v is not None:
                return v
    boxed = last_boxed(text)
    if boxed is not None:
        v = _first_number(boxed.replace("\\!", "").replace("{,}", ","))
        if v is not None:
            return v
    return _last_number(text)


def gsm8k_reference(answer: str | int | float) -> float:
    """Gold value from a GSM8K ``answer`` field ("... #### 72") or a plain number."""
    if isinstance(answer, (int, float)):
        return float(answer)
    part = answer.split("####")[-1]
    v = _first_number(part)
    if v is None:
        raise ValueError(f"GSM8K reference answer has no number: {answer[-80:]!r}")
    return v


def numbers_equal(pred: float | None, gold: float) -> bool:
    return pred is not None and abs(pred - gold) <= 1e-6 * max(1.0, abs(gold))


def gsm8k_correct(output: str, gold: str | int | float) -> bool:
    return numbers_equal(extract_gsm8k_answer(output), gsm8k_reference(gold))


# ----------------------------------------------------------------------------- MATH

def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``) with balanced braces."""
    if text is None:
        return None
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    m = re.match(r"\\(?:boxed|fbox)\s*", rest)
    rest = rest[m.end():]
    if not rest.startswith("{"):
        tok = re.match(r"([^\s$]+)", rest)  # "\boxed 5"
        return tok.group(1) if tok else None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


def extract_math_answer(text: str) -> str | None:
    """Last boxed answer, else the text after the last "The answer is", else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    hits = re.findall(r"[Tt]he (?:final )?answer is[:\s]*(.+)", text or "")
    if hits:
        ans = hits[-1].strip()
        ans = re.sub(r"^\$+|\$+$", "", ans.rstrip(".").strip())
        return ans.rstrip(".").strip()
    return None


def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\frac"
        if sub.startswith("{") or len(sub) < 2:
            out += sub
            continue
        a, b, rest = sub[0], sub[1], sub[2:]
        if b == "{":
            out += "{" + a + "}" + b + rest
        else:
            out += "{" + a + "}{" + b + "}" + rest
    return out


def _fix_slash(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def normalize_math(s: str) -> str:
    """Hendrycks-style normalisation of a LaTeX answer string."""
    s = str(s).strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s.strip())  # trailing units
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    m = re.fullmatch(r"\s*[a-zA-Z]\w*\s*=\s*(.+)", s)  # "x = 5" → "5"
    if m and len(s.split("=")[0].strip()) <= 2:
        s = m.group(1)
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_slash(s)
    s = s.rstrip(".")
    return s


def _math_value(s: str) -> float | None:
    """Numeric value of a normalised answer that is a plain number or \\frac{a}{b}."""
    t = s.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", t)
    try:
        if m:
            v = float(m.group(2)) / float(m.group(3))
            return -v if m.group(1) else v
        if re.fullmatch(r"-?\d+(?:\.\d+)?", t):
            return float(t)
    except ZeroDivisionError:
        return None
    return None


def math_equiv(pred: str | None, gold: str) -> bool:
    """Normalised LaTeX equivalence (string, or numeric for plain numbers/fractions)."""
    if pred is None:
        return False
    a, b = normalize_math(pred), normalize_math(gold)
    if a == b:
        return True
    va, vb = _math_value(a), _math_value(b)
    return va is not None and vb is not None and math.isclose(va, vb, rel_tol=1e-6, abs_tol=1e-9)


def math_reference(example: dict) -> str:
    """Gold answer of a MATH record: its ``answer`` field, else the last box of ``solution``."""
    if example.get("answer") not in (None, ""):
        return str(example["answer"])
    boxed = last_boxed(example.get("solution", ""))
    if boxed is None:
        raise ValueError(f"MATH record has neither 'answer' nor a \\boxed{{}} solution: {str(example)[:80]!r}")
    return boxed


def math_correct(output: str, gold: str) -> bool:
    return math_equiv(extract_math_answer(output), gold)
