"""GenerationTaskPool: generate with a backend, score GSM8K/MATH/HumanEval/MBPP/AlpacaEval.

Built by Hydra from ``configs/taskpool/{gsm8k,gsm_symbolic,math,humaneval,mbpp,alpacaeval,decoder*}.yaml``.
``evaluate(model, pool)`` accepts the engine's output directory (or a hub id) or an
in-memory ``PreTrainedModel`` (HF backend only; the tokenizer then comes from ``tokenizer``
or the pool's base model). One backend (one vLLM worker process) serves all tasks of one
evaluated model and is closed afterwards. Metrics: ``"<task>/accuracy"`` (the configured
``protocol``), ``"<task>/accuracy_lenient"`` (GSM8K/MATH with ``report_lenient: true``),
``"<task>/pass@1"``, ``"alpacaeval/win_rate"`` (when judged), ``"<task>/n"``.

``protocol`` (taskpool-wide, or per task): ``paper`` (default) is the DARE paper's official
scoring (MergeLM): its prompt for every model, its stop strings and budgets, its answer
extraction and code post-processing; ``lenient`` uses the model's template and the lenient
scorers (math-verify). See docs/decoder.md.
With ``output_dir`` each task's generations go to ``<task>.jsonl`` and the metrics to
``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dare_lab.engine.pool import ModelPool
from dare_lab.taskpool.base import plain_config
from dare_lab.taskpool.generation.code.sandbox import Sandbox, SandboxLimits
from dare_lab.taskpool.generation.alpaca_eval import build_judge
from dare_lab.taskpool.generation.backends import WorkerError, make_backend
from dare_lab.taskpool.generation.data import load_records
from dare_lab.taskpool.generation.prompts import resolve_template
from dare_lab.taskpool.generation.tasks import check_protocol, get_task

log = logging.getLogger(__name__)
_TASK_KEYS = {"name", "source", "limit", "max_new_tokens", "prompt", "prompt_model", "stop", "protocol", "report_lenient"}


class GenerationTaskPool:
    """``tasks``: names or ``{name, source, limit, max_new_tokens, prompt, prompt_model, stop, protocol,
    report_lenient}``.

    ``backend``: ``"hf"`` / ``"vllm"`` or ``{name, **options}`` (HF: batch_size, dtype, device,
    max_input_tokens; vLLM: tensor_parallel_size, dtype, gpu_memory_utilization, max_model_len).
    ``protocol``: ``paper`` (default) or ``lenient`` for every task (a task's own ``protocol`` wins).
    ``report_lenient``: also report ``<task>/accuracy_lenient`` (math-verify) for GSM8K/MATH.
    ``prompt`` / ``prompt_model``: template for every task under ``lenient`` (see
    ``prompts.resolve_template``); under ``paper`` each task uses the paper's prompt.
    ``limit``: first n records of every task; ``max_new_tokens``: override every task's budget.
    ``sandbox``: SandboxLimits fields plus ``isolation`` and ``workers``; ``judge``: AlpacaEval judge.
    """

    def __init__(self, tasks: Sequence[str | Mapping] | str, backend: str | Mapping | None = "hf", *,
                 prompt: str | None = None, prompt_model: str | None = None, limit: int | None = None,
                 max_new_tokens: int | None = None, output_dir: str | None = None, tokenizer: str | None = None,
                 sandbox: Mapping | None = None, judge: Any = None, name: str = "generation",
                 protocol: str = "paper", report_lenient: bool = False) -> None:
        self.protocol = check_protocol(protocol)
        self.report_lenient = bool(report_lenient)
        tasks = plain_config(tasks)
        tasks = [tasks] if isinstance(tasks, (str, Mapping)) else list(tasks or [])
        if not tasks:
            raise ValueError("generation taskpool lists no tasks")
        self.tasks = []
        for t in tasks:
            spec = {"name": t} if isinstance(t, str) else dict(t)
            bad = set(spec) - _TASK_KEYS
            if bad:
                raise ValueError(f"generation task {spec.get('name')!r}: unknown option(s) {sorted(bad)}; allowed {sorted(_TASK_KEYS)}")
            get_task(spec.get("name", ""), check_protocol(spec.get("protocol") or self.protocol))  # validates name and protocol
            self.tasks.append(spec)
        self.backend = plain_config(backend)
        self.prompt, self.prompt_model, self.limit = prompt, prompt_model, limit
        self.max_new_tokens, self.output_dir, self.tokenizer, self.name = max_new_tokens, output_dir, tokenizer, name
        sb = dict(plain_config(sandbox) or {})
        self.workers = sb.pop("workers", None)
        isolation = sb.pop("isolation", "auto")
        self.sandbox_limits = SandboxLimits(**sb)
        self.sandbox_isolation = isolation
        self.judge_spec = plain_config(judge)
        self.last_outputs: dict[str, list[dict]] = {}
        self.timings: dict[str, float] = {}

    def evaluate(self, model_dir: Any, pool: ModelPool | None = None) -> dict[str, float]:
        in_memory = isinstance(model_dir, torch.nn.Module)
        if not in_memory:
            model_dir = str(model_dir)
        tokenizer = self.tokenizer
        if tokenizer is None and in_memory:
            if pool is None:
                raise ValueError("evaluating an in-memory model needs a tokenizer: set taskpool.tokenizer or pass the model pool")
            tokenizer = pool.base
        out_dir = Path(self.output_dir) if self.output_dir else None
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
        metrics: dict[str, float] = {}
        sandbox = None
        judge = judge_note = None
        backend = make_backend(self.backend, model_dir, tokenizer)
        try:
            for spec in self.tasks:
                task = get_task(spec["name"], spec.get("protocol") or self.protocol)
                name = task.name
                if task.protocol == "paper":
                    template = task.paper_template
                    if spec.get("prompt", self.prompt):
                        log.warning("%s: protocol paper uses the paper's prompt (%s), not prompt=%r; set protocol: "
                                    "lenient to choose the template", name, template, spec.get("prompt", self.prompt))
                else:
                    template = resolve_template(pool, spec.get("prompt", self.prompt),
                                                spec.get("prompt_model", self.prompt_model), task.template)
                records = load_records(spec.get("source", task.source), spec.get("limit", self.limit))
                tok = getattr(backend, "tokenizer", None)
                if template == "chat" and tok is None:
                    from transformers import AutoTokenizer

                    tok = AutoTokenizer.from_pretrained(model_dir)
                prompts = [task.prompt(r, template, tok) for r in records]
                budget = int(spec.get("max_new_tokens") or self.max_new_tokens or task.max_new_tokens)
                stops = list(spec["stop"] if spec.get("stop") is not None else task.stops(template))
                t0 = time.perf_counter()
                try:
                    outputs = backend.generate(prompts, budget, stops)
                except WorkerError as e:  # a dead / hung vLLM worker: say which task it was serving
                    raise WorkerError(f"task {name}: {e}") from None
                gen_s = time.perf_counter() - t0
                self.timings[name] = gen_s
                ctx: dict[str, Any] = {"output_dir": out_dir, "generator": Path(model_dir).name if not in_memory else "in_memory",
                                       "workers": self.workers,
                                       "report_lenient": bool(spec.get("report_lenient", self.report_lenient))}
                if name in ("humaneval", "mbpp"):
                    sandbox = sandbox or Sandbox(self.sandbox_limits, self.sandbox_isolation)
                    ctx["sandbox"] = sandbox
                if name == "alpacaeval":
                    if judge_note is None:
                        judge, judge_note = build_judge(self.judge_spec)
                    ctx.update(judge=judge, judge_note=judge_note)
                task_metrics, details = task.score(records, [[o] for o in outputs], ctx)
                for k, v in task_metrics.items():
                    metrics[f"{name}/{k}"] = float(v)
                metrics[f"{name}/n"] = float(len(records))
                rows = [{"prompt": p, "output": o, **d} for p, o, d in zip(prompts, outputs, details)]
                self.last_outputs[name] = rows
                log.info("%s: %s (%d records, protocol %s, template %s, %.1fs generation)", name,
                         {k: v for k, v in task_metrics.items()}, len(records), task.protocol, template, gen_s)
                if out_dir:
                    with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
                        for row in rows:
                            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                close()
        if out_dir:
            (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
