"""lm-eval (EleutherAI lm-evaluation-harness) as a taskpool.

Runs any lm-eval task list on a merged model — from the engine's output directory or in
memory (``HFLM(pretrained=model_object)``) — with the HF backend, or with lm-eval's vLLM
model in a **fresh worker process per evaluated model** (vLLM cannot start twice in one
process). ``tasks: open_llm_leaderboard`` expands to the Open LLM Leaderboard (v1) six with
their few-shot counts: ARC-Challenge 25, HellaSwag 10, MMLU 5, TruthfulQA-MC2 0,
Winogrande 5, GSM8K 5. Local task YAMLs (``include_path``; with ``include_defaults: false``
only those are indexed) run offline on local data (``dataset_path: json`` + ``data_files``).

Metrics: ``"<task>/<metric>"`` from lm-eval's results, the filter suffix ``,none`` dropped
(other filters kept as ``<metric>_<filter>``), e.g. ``arc_challenge/acc_norm``; the
example count is ``<task>/n``.

Files, in lm-eval's own formats (``output_dir``, or the Hydra run directory):
``lm_eval/results.json`` (the ``simple_evaluate`` results dict as ``lm_eval --output_path`` writes
it, through lm-eval's ``EvaluationTracker``), ``lm_eval/results.md`` (``lm_eval.utils.make_table``,
also printed) and, with ``log_samples: true``, ``lm_eval/samples_<task>.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dare_lab.engine.pool import ModelPool
from dare_lab.taskpool.base import plain_config
from dare_lab.taskpool.generation.backends import (BackendUnavailable, Worker, WorkerError, check_backend_spec, one_line,
                                                   route_backend_spec, vllm_available)
from dare_lab.taskpool.generation.data import is_local_dataset, local_data_files
from dare_lab.tracking.files import atomic_write

log = logging.getLogger(__name__)

PRESETS: dict[str, list[dict[str, Any]]] = {
    "open_llm_leaderboard": [
        {"task": "arc_challenge", "num_fewshot": 25},
        {"task": "hellaswag", "num_fewshot": 10},
        {"task": "mmlu", "num_fewshot": 5},
        {"task": "truthfulqa_mc2", "num_fewshot": 0},
        {"task": "winogrande", "num_fewshot": 5},
        {"task": "gsm8k", "num_fewshot": 5},
    ],
}


def expand_tasks(tasks: Any, num_fewshot: int | None) -> list[dict[str, Any]]:
    """Names / presets / ``{task, num_fewshot}`` → list of ``{task, num_fewshot}``."""
    tasks = plain_config(tasks)
    if isinstance(tasks, (str, Mapping)):
        tasks = [tasks]
    out: list[dict[str, Any]] = []
    for t in tasks or []:
        if isinstance(t, str) and t in PRESETS:
            out += [dict(p) for p in PRESETS[t]] if num_fewshot is None else [{**p, "num_fewshot": num_fewshot} for p in PRESETS[t]]
        elif isinstance(t, str):
            out.append({"task": t, "num_fewshot": num_fewshot})
        elif isinstance(t, Mapping) and "task" in t:
            bad = set(t) - {"task", "num_fewshot"}
            if bad:
                raise ValueError(f"lm-eval task entry {dict(t)}: unknown key(s) {sorted(bad)}; allowed task, num_fewshot")
            out.append({"task": str(t["task"]), "num_fewshot": t.get("num_fewshot", num_fewshot)})
        else:
            raise ValueError(f"lm-eval task entry {t!r} must be a task name, a preset {sorted(PRESETS)} or {{task, num_fewshot}}")
    if not out:
        raise ValueError("lm-eval taskpool lists no tasks")
    return out


def flatten_results(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` → ``{"task/metric": value}`` (floats only, ``,none`` dropped)."""
    flat: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            name = "n" if name == "sample_len" else name
            flat[f"{task}/{name}"] = float(value)
    return flat


# keys of lm-eval's results dict that hold one entry per task (merged over the shot groups)
PER_TASK_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                 "samples")


def merge_results(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several ``simple_evaluate`` results (one per shot group) → one results dict in lm-eval's layout.

    The per-task sections (:data:`PER_TASK_KEYS`) are united; run-level entries (``config``,
    ``git_hash``, ``date``, environment and tokenizer info) come from the first group, except
    ``config.batch_sizes``, which lists every group's.
    """
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key in PER_TASK_KEYS:
                merged.setdefault(key, {}).update(value)
            elif key not in merged:
                merged[key] = dict(value) if key == "config" and isinstance(value, Mapping) else value
            elif key == "config" and isinstance(value, Mapping) and part is not parts[0]:
                merged["config"]["batch_sizes"] = list(merged["config"].get("batch_sizes") or []) + list(
                    value.get("batch_sizes") or [])
    return merged


def result_tables(results: Mapping[str, Any]) -> str:
    """lm-eval's own ``make_table`` text (plus its groups table when there are groups)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def write_lm_eval_files(results: dict[str, Any], tracker: Any, out_dir: Path) -> tuple[list[Path], str]:
    """Write ``results.json`` (what ``lm_eval --output_path`` writes), ``results.md`` (``make_table``)
    and, when ``results`` holds samples, ``samples_<task>.jsonl`` into ``out_dir``.

    lm-eval's own :class:`EvaluationTracker` writes the files (JSON-safe via
    ``handle_non_serializable``, samples sanitized as lm-eval does, ``task_hashes`` and the run's
    ``model_source`` / ``model_name`` / ``total_evaluation_time_seconds`` added) into a temporary
    sibling directory; they are then renamed without lm-eval's timestamp. The tracker only logs a
    warning when it cannot write, so a missing file is raised here.
    """
    import tempfile

    out_dir.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None)
    table = result_tables(results)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    written: list[Path] = []
    try:
        tracker.output_path = str(tmp / "results.json")
        tracker.save_results_aggregated(results=results, samples=samples)
        made = tmp / f"results_{getattr(tracker, 'date_id', '')}.json"  # lm-eval's name: results_<date_id>.json
        if not made.is_file():
            raise OSError(f"lm-eval could not write its results JSON into {tmp} (see lm-eval's warning above)")
        os.replace(made, out_dir / "results.json")
        written.append(out_dir / "results.json")
        for task in (samples or {}):
            tracker.save_results_samples(task_name=task, samples=samples[task])
            made = tmp / f"samples_{task}_{tracker.date_id}.jsonl"
            if not made.is_file():
                raise OSError(f"lm-eval could not write the samples of {task} into {tmp} (see lm-eval's warning above)")
            os.replace(made, out_dir / f"samples_{task}.jsonl")
            written.append(out_dir / f"samples_{task}.jsonl")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write(out_dir / "results.md", table.rstrip("\n") + "\n")
    written.append(out_dir / "results.md")
    return written, table


def _run(lm: Any, groups: dict[Any, list[str]], opts: dict) -> dict[str, float]:
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    include = opts.get("include_path")
    tm = TaskManager(include_path=include, include_defaults=bool(opts.get("include_defaults", True)))
    for names in groups.values():
        unknown = [n for n in names if n not in tm.all_tasks]
        if unknown:
            where = f" (include_path={include}, include_defaults={opts.get('include_defaults', True)})"
            raise ValueError(f"unknown lm-eval task(s) {unknown}{where}")
    tracker = EvaluationTracker()  # no output_path: nothing is written until write_lm_eval_files
    log_samples = bool(opts.get("log_samples", False))
    parts = []
    for shots, names in groups.items():
        res = simple_evaluate(model=lm, model_args=opts.get("model_args"), tasks=names, num_fewshot=shots,
                              limit=opts.get("limit"), task_manager=tm, log_samples=log_samples,
                              evaluation_tracker=tracker, bootstrap_iters=int(opts.get("bootstrap_iters", 0)),
                              apply_chat_template=opts.get("apply_chat_template", False),
                              gen_kwargs=opts.get("gen_kwargs"), random_seed=opts.get("seed", 0),
                              numpy_random_seed=opts.get("seed", 0), torch_random_seed=opts.get("seed", 0),
                              fewshot_random_seed=opts.get("seed", 0))
        parts.append(res)
    results = merge_results(parts)
    metrics = flatten_results(results["results"])
    if opts.get("results_dir"):
        files, table = write_lm_eval_files(results, tracker, Path(opts["results_dir"]))
        print(table)
        print(f"dare-lab: lm-eval results in {files[0].parent} ({', '.join(f.name for f in files)})")
    else:
        results.pop("samples", None)
        print(result_tables(results))
    return metrics


# options only one lm-eval backend takes; timeout_s / poll_s are dare_lab's (the vLLM worker's)
EXCLUSIVE_OPTIONS: dict[str, frozenset[str]] = {
    "hf": frozenset({"parallelize", "device_map", "max_memory_per_gpu", "max_cpu_memory", "offload_folder", "peft",
                     "delta", "autogptq"}),
    "vllm": frozenset({"tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "data_parallel_size",
                       "swap_space", "quantization", "timeout_s", "poll_s"}),
}


def _vllm_worker(conn, model_dir: str, vllm_args: dict, groups: dict, opts: dict) -> None:  # spawned process
    try:
        from lm_eval.models.vllm_causallms import VLLM

        lm = VLLM(pretrained=model_dir, **vllm_args)
        conn.send(("ok", _run(lm, groups, opts)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(e).__name__}: {one_line(e)}"))


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"taskpool.{key}={value!r}: expected true or false")
    return value


class LMEvalTaskPool:
    """``tasks``: lm-eval task names, presets (``open_llm_leaderboard``) or ``{task, num_fewshot}``.

    ``backend``: ``{name: hf|vllm, hf: {...}, vllm: {...}}`` (or just the name): only the block
    of the chosen backend is used (flat keys apply to it too). HF: batch_size, device, dtype,
    max_length, any ``HFLM`` argument; vLLM: tensor_parallel_size, gpu_memory_utilization, dtype
    (``auto``), max_model_len, any lm-eval ``VLLM`` argument, plus ``timeout_s`` (the whole
    evaluation in the worker; ``None``: no limit; default 12 h) and ``poll_s``. A vLLM worker
    that dies or hangs is a one-line :class:`WorkerError` naming the model and the tasks.
    ``include_path``: directories of local task YAMLs; ``include_defaults: false`` indexes only
    those (fast, offline). ``limit``: examples per task (int or fraction).

    Files (``output_dir``; ``null``: the Hydra run directory under ``dare-lab``, nothing outside
    Hydra): ``lm_eval_metrics.json`` (the flat metrics) and ``lm_eval/`` with ``results.json``
    (lm-eval's own results layout, all shot groups in one file), ``results.md`` (lm-eval's
    ``make_table``, also printed) and, with ``log_samples: true``, ``samples_<task>.jsonl``
    (lm-eval's per-sample records). A later evaluation into the same directory replaces them.
    """

    def __init__(self, tasks: Any = "open_llm_leaderboard", num_fewshot: int | None = None, *, limit: int | float | None = None,
                 backend: str | Mapping = "hf", include_path: str | Sequence[str] | None = None, include_defaults: bool = True,
                 apply_chat_template: bool = False, gen_kwargs: str | dict | None = None, bootstrap_iters: int = 0,
                 tokenizer: str | None = None, output_dir: str | None = None, log_samples: bool = False, seed: int = 0,
                 num_threads: int | None = None, name: str = "lm_eval") -> None:
        self.tasks = expand_tasks(tasks, num_fewshot)
        self.backend_spec = plain_config(backend)
        self.backend_name, self.backend_opts = route_backend_spec(self.backend_spec, exclusive=EXCLUSIVE_OPTIONS,
                                                                  what="lm-eval")
        self.worker_target = _vllm_worker  # the vLLM worker's entry (a module-level function; tests swap it)
        inc = plain_config(include_path)
        if inc is not None:
            inc = [str(p) for p in ([inc] if isinstance(inc, (str, os.PathLike)) else inc)]
            for p in inc:
                if not Path(p).exists():
                    raise FileNotFoundError(f"lm-eval include_path {p} does not exist")
        self.opts = {"include_path": inc, "include_defaults": include_defaults, "limit": limit,
                     "apply_chat_template": apply_chat_template, "gen_kwargs": plain_config(gen_kwargs),
                     "bootstrap_iters": bootstrap_iters, "seed": seed, "log_samples": _flag(log_samples, "log_samples")}
        self.tokenizer, self.output_dir, self.name = tokenizer, output_dir, name
        self.num_threads = num_threads  # CPU intra-op threads during evaluation (None: torch's default)

    def preflight(self, pool: ModelPool | None = None) -> None:
        """Before the merge: lm-eval (and vLLM for ``backend.name: vllm``) is installed, the
        backend's typed options (``taskpool.backend.hf.trust_remote_code`` a real boolean, vLLM
        counts positive integers), ``num_fewshot`` / ``limit`` in range, ``include_path`` exists,
        and every task name resolves with lm-eval's ``TaskManager(include_path, include_defaults)``
        (indexing lm-eval's own tasks takes ~15 s; ``include_defaults: false`` is instant).
        One-line ValueError / FileNotFoundError."""
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError("taskpool (lm-eval): the lm-eval package is not installed: pip install 'dare_lab[lmeval]'")
        check_backend_spec(self.backend_spec, exclusive=EXCLUSIVE_OPTIONS, what="lm-eval")
        for t in self.tasks:
            shots = t.get("num_fewshot")
            if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
                raise ValueError(f"lm-eval task {t['task']}: num_fewshot={shots!r}: expected a non-negative integer")
        limit = self.opts.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
                                  or (isinstance(limit, float) and limit > 1)):
            raise ValueError(f"taskpool.limit={limit!r}: expected a positive integer (examples per task) or a fraction in (0, 1]")
        inc = self.opts.get("include_path")
        for p in inc or []:
            if not Path(p).exists():
                raise FileNotFoundError(f"taskpool.include_path: {p} does not exist")
        if not isinstance(self.opts.get("include_defaults"), bool):
            raise ValueError(f"taskpool.include_defaults={self.opts.get('include_defaults')!r}: expected true or false")
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_path=inc, include_defaults=self.opts["include_defaults"])
        known = set(tm.all_tasks)
        unknown = [t["task"] for t in self.tasks if t["task"] not in known]
        if unknown:
            import difflib

            hint = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            raise ValueError(f"unknown lm-eval task(s) {unknown} (include_path={inc}, include_defaults="
                             f"{self.opts['include_defaults']})" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        for t in self.tasks:  # local task YAMLs: their data files exist
            entry = getattr(tm, "task_index", {}).get(t["task"])
            cfg = getattr(entry, "cfg", None)
            if not isinstance(cfg, Mapping):
                continue
            source = {"path": cfg.get("dataset_path"), **dict(cfg.get("dataset_kwargs") or {})}
            if source["path"] and is_local_dataset(source):
                for f in local_data_files(source):
                    if not any(c in f for c in "*?[") and not Path(f).expanduser().exists():
                        raise FileNotFoundError(f"lm-eval task {t['task']} ({getattr(entry, 'yaml_path', '?')}): "
                                                f"data file {f} does not exist")

    def _groups(self) -> dict[Any, list[str]]:
        groups: dict[Any, list[str]] = {}
        for t in self.tasks:
            groups.setdefault(t["num_fewshot"], []).append(t["task"])
        return groups

    def _hf_lm(self, model: Any, pool: ModelPool | None):
        from lm_eval.models.huggingface import HFLM

        opts = dict(self.backend_opts)
        opts.setdefault("batch_size", 8)
        opts.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        opts.setdefault("dtype", "float32")
        if isinstance(model, torch.nn.Module):
            tok = self.tokenizer or (pool.base if pool is not None else None)
            if tok is None:
                raise ValueError("evaluating an in-memory model needs a tokenizer: set taskpool.tokenizer or pass the model pool")
            if isinstance(tok, (str, os.PathLike)):
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(tok))
            opts.pop("device", None)
            opts.pop("dtype", None)
            return HFLM(pretrained=model, tokenizer=tok, **opts)
        if self.tokenizer:
            opts["tokenizer"] = self.tokenizer
        return HFLM(pretrained=str(model), **opts)

    def _vllm_evaluate(self, model_dir: str, groups: dict[Any, list[str]], run_opts: dict) -> dict[str, float]:
        ok, reason = vllm_available()
        if not ok:
            raise BackendUnavailable(f"lm-eval vLLM backend unavailable: {reason}")
        opts = dict(self.backend_opts)
        timeout_s = opts.pop("timeout_s", 12 * 3600.0)
        poll_s = float(opts.pop("poll_s", 1.0))
        opts.setdefault("dtype", "auto")
        names = [n for group in groups.values() for n in group]
        worker = Worker(self.worker_target, (model_dir, opts, groups, run_opts),
                        f"lm-eval vLLM worker for {model_dir} (tasks {', '.join(names)})", poll_s=poll_s)
        try:
            kind, payload = worker.wait(f"evaluating {', '.join(names)}", timeout_s)
        finally:
            worker.close(msg=None, grace_s=30)
        if kind != "ok":
            raise WorkerError(f"lm-eval with vLLM failed on {model_dir} (tasks {', '.join(names)}): {payload}")
        return payload

    def resolved_output_dir(self) -> Path | None:
        """``output_dir``, or the Hydra run directory when it is unset and Hydra is running."""
        if self.output_dir:
            return Path(self.output_dir).expanduser()
        try:
            from hydra.core.hydra_config import HydraConfig

            return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
        except Exception:  # noqa: BLE001 - Hydra absent or not running
            return None

    def evaluate(self, model_dir: Any, pool: ModelPool | None = None) -> dict[str, float]:
        groups = self._groups()
        out = self.resolved_output_dir()
        in_memory = isinstance(model_dir, torch.nn.Module)
        opts = {**self.opts, "results_dir": str(out / "lm_eval") if out else None,
                # recorded as lm-eval's config.model_args / model_name (the LM object is built here)
                "model_args": {"pretrained": "in_memory" if in_memory else str(model_dir), "backend": self.backend_name}}
        if self.backend_name == "hf":
            before = torch.get_num_threads()
            if self.num_threads:
                torch.set_num_threads(int(self.num_threads))
            try:
                metrics = _run(self._hf_lm(model_dir, pool), groups, opts)
            finally:
                torch.set_num_threads(before)
        else:
            if in_memory:
                raise TypeError("lm-eval vLLM backend needs a model directory, got an in-memory model; use backend hf")
            metrics = self._vllm_evaluate(str(model_dir), groups, opts)
        if out:
            atomic_write(out / "lm_eval_metrics.json", json.dumps(metrics, indent=2))
        return metrics
