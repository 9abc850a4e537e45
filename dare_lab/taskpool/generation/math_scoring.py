"""GSM8K and MATH scoring under two protocols.

``paper`` — the rules of the DARE paper's official code (MergeLM,
``utils/evaluate_llms_utils.py`` and ``inference_llms_instruct_math_code.py``), re-implemented
here rule by rule (docs/decoder.md lists each rule with the MergeLM line it follows):

* GSM8K: the prediction is read only after the last exact ``"The answer is: "``; the first
  ``[sign]digits[one of . , /]digits`` there is the number; ``a/b`` is evaluated as a fraction
  (``a/0`` gives ``a``); every prediction is rounded to an int with Python's ``round``
  (half to even) and compared with ``==`` to the int after the first ``"#### "`` of the
  reference. No marker / no number: invalid, counted wrong.
* MATH: the text after the last ``"The answer is: "``, cut at the first ``".\\n"``, one
  trailing period dropped; compared to the last ``\\boxed{}`` of the reference solution with
  Hendrycks' ``is_equiv`` (string equality after ``strip_string``; raw strings when the
  normalisation raises).
* Where MergeLM itself would crash (``"3/00"``, a fraction too large for a float) the item is
  counted wrong and flagged ``crash`` in the details.

``lenient`` — HuggingFace's ``math-verify`` (``pip install math-verify``, part of the
``decoder`` extra) parses the answer — the line after the last "the answer is" (any case) if
the output has one, else wherever math-verify finds it (boxed, "final answer", last
expression) — and compares it symbolically / numerically with the gold (no rounding).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

PROTOCOLS = ("paper", "lenient")
PAPER_MARKER = "The answer is: "
#: MergeLM's stop strings for GSM8K and MATH (vLLM ``SamplingParams(stop=...)``)
PAPER_MATH_STOPS = ["Instruction:", "Instruction", "Response:", "Response"]


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown scoring protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    return protocol


@dataclass(frozen=True)
class Verdict:
    """One scored output: ``pred`` (what was extracted), ``correct``, ``invalid`` (no answer
    found: counted wrong), ``crash`` (MergeLM would have raised here: counted wrong)."""

    pred: object
    correct: bool
    invalid: bool = False
    crash: str | None = None

    def as_dict(self) -> dict:
        d = {"pred": self.pred, "correct": self.correct, "invalid": self.invalid}
        if self.crash:
            d["crash"] = self.crash
        return d


class PaperCrash(Exception):
    """MergeLM's scorer would raise on this input (the paper's run would abort)."""


# ----------------------------------------------------------------------------- GSM8K, paper

# sign, digits, at most one of . , / then digits — the only number shape the paper reads
_PAPER_NUMBER = re.compile(r"[-+]?\d*[.,/]?\d+")


def _numeric_text(s: str) -> bool:
    """True if ``float`` accepts the text or it is a single character with a numeric value."""
    try:
        float(s)
        return True
    except ValueError:
        pass
    try:
        unicodedata.numeric(s)
    except (TypeError, ValueError):
        return False
    return True


def paper_gsm8k_gold(answer: str | int) -> int:
    """The gold int of a GSM8K ``answer`` field: the text after the first ``"#### "``, commas
    removed, through ``int``. A plain number (e.g. gsm_symbolic's answers) is taken whole."""
    if isinstance(answer, bool):
        raise ValueError(f"GSM8K gold must be a number or an answer text, got {answer!r}")
    if isinstance(answer, int):
        return answer
    text = str(answer)
    parts = text.split("#### ")
    tail = parts[1] if len(parts) > 1 else text
    try:
        return int(tail.replace(",", ""))
    except ValueError:
        raise ValueError(f"GSM8K gold is not an integer after '#### ': {text[-80:]!r}") from None


def paper_gsm8k_extract(completion: str) -> int | None:
    """The paper's prediction (an int) or None; raises :class:`PaperCrash` where MergeLM raises."""
    pieces = (completion or "").split(PAPER_MARKER)
    if len(pieces) < 2:
        return None
    found = _PAPER_NUMBER.search(pieces[-1].strip())
    if found is None:
        return None
    token = found.group()
    if "/" in token:
        top, bottom = token.split("/")[0], token.split("/")[1]
        if not (_numeric_text(top) and _numeric_text(bottom)):
            return None
        if bottom == "0":
            return round(float(top.replace(",", "")))
        try:
            value = Fraction(token.replace(",", ""))
        except ZeroDivisionError:  # "3/00": MergeLM's Fraction raises "Denominator cannot be 0"
            raise PaperCrash(f"denominator of {token!r} is zero") from None
        try:
            return round(float(value.numerator / value.denominator))
        except OverflowError:
            raise PaperCrash(f"fraction {token[:20]}... does not fit a float") from None
    number = float(token.replace(",", ""))
    if number == float("inf"):
        return None
    return round(number)


def paper_gsm8k_score(completion: str, gold: int) -> Verdict:
    try:
        pred = paper_gsm8k_extract(completion)
    except PaperCrash as e:
        return Verdict(None, False, True, str(e))
    if pred is None:
        return Verdict(None, False, True)
    return Verdict(pred, float(pred) == float(gold))


# ----------------------------------------------------------------------------- MATH, paper

def paper_last_boxed(text: str | None) -> str | None:
    """``\\boxed{...}`` (with its braces) of the last ``\\boxed`` — or, if none, the last
    ``\\fbox`` — up to the brace that balances; None when no brace closes."""
    if text is None:
        return None
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for pos in range(start, len(text)):
        ch = text[pos]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:pos + 1]
    return None


def paper_unbox(s: str | None) -> str | None:
    """The inside of ``\\boxed{...}``; None for anything else (``\\fbox{}`` included)."""
    head = "\\boxed{"
    if not isinstance(s, str) or not s.startswith(head) or not s.endswith("}") or len(s) < len(head) + 1:
        return None
    return s[len(head):-1]


def paper_math_gold(solution: str) -> str | None:
    """The paper's MATH gold: the inside of the reference solution's last ``\\boxed{}``."""
    return paper_unbox(paper_last_boxed(solution))


def paper_math_extract(completion: str) -> str | None:
    """Text after the last marker, before the first ``".\\n"``, stripped, one final "." off."""
    pieces = (completion or "").split(PAPER_MARKER)
    if len(pieces) < 2:
        return None
    ans = pieces[-1].split(".\n")[0].strip()
    if ans.endswith("."):
        ans = ans[:-1]
    return ans.strip()


def _brace_fracs(s: str) -> str:
    """``\\frac12`` → ``\\frac{1}{2}``, ``\\frac1{2}`` → ``\\frac{1}{2}``; unchanged when a
    ``\\frac`` has fewer than two characters after it (IndexError when it has none)."""
    chunks = s.split("\\frac")
    out = [chunks[0]]
    for chunk in chunks[1:]:
        out.append("\\frac")
        if chunk[0] == "{":  # IndexError on an empty chunk, as in the paper
            out.append(chunk)
            continue
        if len(chunk) < 2:
            return s
        first, second, rest = chunk[0], chunk[1], chunk[2:]
        out.append("{" + first + "}" + (second if second == "{" else "{" + second + "}") + rest)
    return "".join(out)


def _slash_to_frac(s: str) -> str:
    """``a/b`` (one slash, integers that print back identically) → ``\\frac{a}{b}``; a side
    that is not an integer raises ValueError (the paper does not catch it here)."""
    sides = s.split("/")
    if len(sides) != 2:
        return s
    a, b = int(sides[0]), int(sides[1])
    if s != f"{a}/{b}":
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _drop_units(s: str) -> str:
    """Cut from ``\\text{ `` on; two of them fail an assertion in the paper."""
    if "\\text{ " not in s:
        return s
    pieces = s.split("\\text{ ")
    if len(pieces) != 2:
        raise AssertionError("more than one '\\text{ ' unit")
    return pieces[0]


def _brace_sqrt(s: str) -> str:
    """``\\sqrt3`` → ``\\sqrt{3}`` (the next character only); IndexError if nothing follows."""
    if "\\sqrt" not in s:
        return s
    chunks = s.split("\\sqrt")
    out = [chunks[0]]
    for chunk in chunks[1:]:
        out.append("\\sqrt" + chunk if chunk[0] == "{" else "\\sqrt{" + chunk[0] + "}" + chunk[1:])
    return "".join(out)


def paper_strip_string(s: str) -> str:
    """Hendrycks' normalisation as MergeLM applies it (may raise; see :func:`paper_is_equiv`)."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    s = _drop_units(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _brace_sqrt(s)
    s = s.replace(" ", "")
    s = _brace_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def paper_is_equiv(pred: str | None, gold: str | None) -> bool:
    """String equality after :func:`paper_strip_string`; raw equality if it raises."""
    if pred is None and gold is None:
        return True
    if pred is None or gold is None:
        return False
    try:
        return paper_strip_string(pred) == paper_strip_string(gold)
    except Exception:  # noqa: BLE001 - the paper falls back to the raw strings on any error
        return pred == gold


def paper_math_score(completion: str, gold: str | None) -> Verdict:
    pred = paper_math_extract(completion)
    if pred is None:
        return Verdict(None, False, True)
    return Verdict(pred, paper_is_equiv(pred, gold))


# ----------------------------------------------------------------------------- lenient (math-verify)

def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise ImportError("the lenient scorer needs 'math-verify': pip install 'dare_lab[decoder]' "
                          "(or pip install math-verify)") from None
    return math_verify


def _timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may arm
    return 5 if threading.current_thread() is threading.main_thread() else None


_ANCHOR = "the answer is"


def lenient_candidates(output: str) -> list[str]:
    """What math-verify is asked to parse: when the output states "the answer is" (any case,
    any punctuation after it), that statement's line, read both as text and as LaTeX
    (``$line$``); otherwise the whole output (math-verify's own anchors: boxed, "final
    answer", last expression)."""
    output = output or ""
    found = output.lower().rfind(_ANCHOR)
    if found >= 0:
        line = output[found + len(_ANCHOR):].lstrip(" :").split("\n")[0].strip()
        if line.endswith("."):
            line = line[:-1].rstrip()
        if line:
            return [line, f"${line}$"]
    return [output]


def lenient_equal(output: str, gold: str) -> tuple[bool, str | None]:
    """math-verify: parse the gold (``$gold$``) and each candidate of the output
    (:func:`lenient_candidates`); correct if ``verify`` accepts any parsed candidate.
    Returns (correct, the matching — else the first — parsed prediction)."""
    mv = _math_verify()
    t = _timeout()
    gold_parsed = mv.parse(f"${gold}$", parsing_timeout=t)
    parsed = [p for p in (mv.parse(c, parsing_timeout=t) for c in lenient_candidates(output)) if p]
    if not parsed:
        return False, None
    for p in parsed:
        if gold_parsed and mv.verify(gold_parsed, p, timeout_seconds=t):
            return True, str(p[-1])
    return False, str(parsed[0][-1])


def lenient_gsm8k_gold(answer: str | int | float) -> str:
    """The number after the last ``####`` (commas removed), or the plain answer."""
    if isinstance(answer, (int, float)):
        return str(answer)
    return str(answer).split("####")[-1].strip().replace(",", "")


def lenient_gsm8k_score(output: str, answer: str | int | float) -> Verdict:
    ok, pred = lenient_equal(output, lenient_gsm8k_gold(answer))
    return Verdict(pred, ok, pred is None)


def lenient_math_gold(record: dict) -> str | None:
    """A MATH record's ``answer`` field, else the inside of its solution's last box."""
    if record.get("answer") not in (None, ""):
        return str(record["answer"])
    return paper_math_gold(math_solution(record))


def lenient_math_score(output: str, gold: str | None) -> Verdict:
    if gold is None:
        return Verdict(None, False, False)
    ok, pred = lenient_equal(output, gold)
    return Verdict(pred, ok, pred is None)


# ----------------------------------------------------------------------------- records

def math_problem(record: dict) -> str:
    """MATH problem text: MergeLM's file calls it ``instruction``, Hendrycks/H4 ``problem``."""
    for key in ("instruction", "problem"):
        if record.get(key) not in (None, ""):
            return record[key]
    raise ValueError(f"MATH record has neither 'instruction' nor 'problem': {str(record)[:80]!r}")


def math_solution(record: dict) -> str:
    """Reference solution: MergeLM's ``output``, Hendrycks/H4 ``solution``."""
    for key in ("output", "solution"):
        if record.get(key) not in (None, ""):
            return record[key]
    if record.get("answer") not in (None, ""):
        return "\\boxed{" + str(record["answer"]) + "}"
    raise ValueError(f"MATH record has no 'output', 'solution' or 'answer': {str(record)[:80]!r}")


def gsm8k_score(output: str, answer: str | int, protocol: str = "paper") -> Verdict:
    """Score one GSM8K output against the record's ``answer`` field."""
    if check_protocol(protocol) == "paper":
        return paper_gsm8k_score(output, paper_gsm8k_gold(answer))
    return lenient_gsm8k_score(output, answer)


def math_score(output: str, record: dict, protocol: str = "paper") -> Verdict:
    """Score one MATH output against its record (gold from the solution's last box)."""
    if check_protocol(protocol) == "paper":
        return paper_math_score(output, paper_math_gold(math_solution(record)))
    return lenient_math_score(output, lenient_math_gold(record))
