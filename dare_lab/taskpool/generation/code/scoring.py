"""HumanEval / MBPP: completion → program, execution in the sandbox, pass@k.

pass@k is the unbiased estimator of Chen et al. (2021): with n samples of which c pass,
pass@k = 1 − C(n−c, k) / C(n, k), computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i).
With greedy decoding (the paper) n = 1 and pass@1 is the fraction of problems solved.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from dare_lab.taskpool.generation.code.sandbox import ExecResult, Sandbox

# HumanEval's usual stop sequences for models that continue the function body
HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert "]


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
    """Mean over problems of pass@k given (n, c) per problem."""
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts])) if counts else 0.0


def extract_code(text: str) -> str:
    """The first fenced code block (```python … ``` or ``` … ```), else the text itself."""
    m = re.search(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", text, re.S)
    return m.group(1) if m else text


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def _imports(prompt: str) -> str:
    return "".join(line + "\n" for line in prompt.splitlines() if line.startswith(("import ", "from ")))


def humaneval_program(problem: dict, completion: str, mode: str = "auto") -> str:
    """A runnable check program for one HumanEval problem.

    ``mode``: ``body`` (completion continues the prompt: prompt + completion), ``full``
    (completion holds the whole function; the prompt's imports are prepended) or ``auto``
    (``full`` when the extracted code defines the entry point, else ``body``).
    """
    entry = problem["entry_point"]
    code = extract_code(completion)
    if mode == "auto":
        mode = "full" if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M) else "body"
    if mode == "full":
        head = _imports(problem["prompt"]) + code
    elif mode == "body":
        head = problem["prompt"] + truncate_at_stops(code, HUMANEVAL_STOPS)
    else:
        raise ValueError(f"unknown HumanEval program mode {mode!r}; choose auto, body or full")
    return f"{head}\n\n{problem['test']}\n\ncheck({entry})\n"


def mbpp_program(problem: dict, completion: str) -> str:
    """MBPP: setup code + extracted code + the problem's assert statements."""
    code = extract_code(completion)
    setup = problem.get("test_setup_code") or ""
    tests = "\n".join(problem["test_list"])
    return f"{setup}\n{code}\n\n{tests}\n"


def mbpp_instruction(problem: dict) -> str:
    """The MBPP prompt used by the paper's code-alpaca evaluation: task text + its tests."""
    tests = "\n".join(problem["test_list"])
    return f"{problem['text']}\nYour code should pass these tests:\n\n{tests}"


def run_programs(programs: Sequence[str], sandbox: Sandbox | None = None, workers: int | None = None) -> list[ExecResult]:
    return (sandbox or Sandbox()).run_many(programs, workers=workers)
