"""Redundancy curves (paper Fig. 3, 4, 8, 9, 11, 12): score vs drop rate, per model.

For every fine-tuned model k of a pool, every sparsifier (DARE, DropOnly, MP), every drop
rate p and every seed, the single sparsified model

    θ̂_k = θ_PRE + S(θ_k − θ_PRE; p, seed)          (target="delta", paper §4.2–4.5)
    θ̂_k = S(θ_k; p, seed)                            (target="finetuned", paper §4.7)

is made by the engine (a one-model pool merged with task arithmetic, λ = 1) and scored by
the taskpool on *that model's own* tasks. p = 0 is evaluated once per model (every method is
the identity there); MP is deterministic, so it is evaluated for the first seed only.
Results are raw rows (one per evaluation) and a summary with mean ± std over seeds.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dare_lab.engine.pool import ModelPool
from dare_lab.ops.method import DETERMINISTIC_KINDS, MergeMethod, Merger, Sparsifier

DROP_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
METHODS = ("dare", "drop_only", "magnitude")
DETERMINISTIC = DETERMINISTIC_KINDS    # none, magnitude, breadcrumbs: one seed is enough


def single_model_method(kind: str, p: float, seed: int = 0, target: str = "delta", rescale: bool = False,
                        knobs: Mapping[str, Any] | None = None) -> MergeMethod:
    """Task arithmetic with λ = 1 over a one-model pool: θ_PRE + S(δ) (or S(θ_SFT) for target=finetuned).

    ``knobs``: the sparsifier's own knobs (della: epsilon, rank_scope; breadcrumbs: gamma; darex:
    rescale_q), used for p > 0; unset ones take their defaults (:class:`Sparsifier`)."""
    extra = dict(knobs or {}) if p > 0 else {}
    if isinstance(extra.get("rescale_q"), str) and extra["rescale_q"] in ("validation", "analytical"):
        raise ValueError(f"analysis knobs: darex rescale_q={extra['rescale_q']} (the paper's rule, chosen on data) is "
                         "resolved by the merge program only (method=darex_qv_*); here give a number, auto or a mapping")
    sp = Sparsifier(kind=kind if p > 0 else "none", drop_rate=float(p), rescale=bool(rescale), target=target, **extra)
    return MergeMethod(name=f"{kind}_p{p:g}", sparsifier=sp, merger=Merger("task_arithmetic", scaling=1.0), seed=int(seed))


def sparsified_state(base: Any, model_ref: Any, model_name: str, method: MergeMethod, scope: Any = None) -> dict:
    """The sparsified single model as an in-memory state dict (base model's tensor names)."""
    from dare_lab.engine import merge_models

    return merge_models(base, {model_name: model_ref}, method, None, scope=scope, threads=1)


def sub_pool(pool: ModelPool, model_name: str) -> ModelPool:
    """The pool reduced to one fine-tuned model (keeps base, prompts and extras)."""
    return ModelPool(base=pool.base, models={model_name: pool.models[model_name]}, name=f"{pool.name}/{model_name}",
                     prompts={k: v for k, v in pool.prompts.items() if k == model_name}, extra=dict(pool.extra))


def restrict_taskpool(taskpool: Any, model_name: str) -> Any:
    """A shallow copy of ``taskpool`` keeping only the tasks owned by ``model_name``.

    Taskpools with a ``tasks`` list whose items name their model (``head_model``, ``model``
    or ``name``) are restricted (caches are shared); others are returned unchanged and score
    every task they have.
    """
    tasks = getattr(taskpool, "tasks", None)
    if not isinstance(tasks, list) or not tasks:
        return taskpool

    def owner(t: Any) -> str | None:
        for attr in ("head_model", "model", "name"):
            v = getattr(t, attr, None) if not isinstance(t, Mapping) else t.get(attr)
            if v:
                return str(v)
        return None

    mine = [t for t in tasks if owner(t) == model_name]
    if not mine:
        return taskpool
    clone = copy.copy(taskpool)
    clone.tasks = mine
    return clone


def evaluate_state(taskpool: Any, state: dict, pool: ModelPool, work_dir: Path, tag: str,
                   base: Any = None, model_ref: Any = None, method: MergeMethod | None = None, scope: Any = None) -> dict[str, float]:
    """Score an in-memory sparsified model: ``evaluate_state_dict`` when the taskpool has it,
    else the engine writes the model to a temporary directory for ``evaluate``."""
    if hasattr(taskpool, "evaluate_state_dict"):
        return dict(taskpool.evaluate_state_dict(state, pool))
    from dare_lab.engine import merge_models

    out = Path(tempfile.mkdtemp(prefix=f"{tag}.", dir=work_dir))
    shutil.rmtree(out)
    try:
        model_name = next(iter(pool.models))
        merge_models(base, {model_name: model_ref}, method, out, scope=scope, threads=1)
        return dict(taskpool.evaluate(out, pool))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def redundancy_curves(pool: ModelPool, taskpool: Any, methods: Sequence[str] = METHODS,
                      drop_rates: Sequence[float] = DROP_RATES, seeds: Sequence[int] = (0, 1, 2), target: str = "delta",
                      scope: Any = None, models: Sequence[str] | None = None, rescale_mp: bool = False,
                      work_dir: str | Path | None = None, log: Callable[[str], None] | None = print,
                      knobs: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Raw rows ``{model, metric, method, p, seed, value}``, one per (evaluation, metric).

    ``knobs``: per sparsifier kind, its own knobs (e.g. ``{"della": {"epsilon": 0.005}}``)."""
    drop_rates = [float(p) for p in drop_rates]
    seeds = [int(s) for s in seeds] or [0]
    names = list(models) if models else list(pool.models)
    for n in names:
        if n not in pool.models:
            raise ValueError(f"model {n!r} is not in pool {pool.name!r} ({sorted(pool.models)})")
    work = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        sp, tp, ref = sub_pool(pool, name), restrict_taskpool(taskpool, name), pool.models[name]
        cache: dict[tuple, dict[str, float]] = {}

        def score(kind: str, p: float, seed: int) -> dict[str, float]:
            key = ("none", 0.0, 0) if p == 0.0 else (kind, p, seed)
            if key not in cache:
                method = single_model_method(kind, p, seed, target, rescale_mp and kind == "magnitude",
                                             (knobs or {}).get(kind))
                state = sparsified_state(pool.base, ref, name, method, scope)
                cache[key] = evaluate_state(tp, state, sp, work, f"{name}-{kind}-{p:g}-{seed}", pool.base, ref, method, scope)
                del state
                if log:
                    shown = ", ".join(f"{k}={v:.4f}" for k, v in cache[key].items())
                    log(f"[redundancy] {name} {kind if p else 'sft'} p={p:g} seed={seed}: {shown}")
            return cache[key]

        for kind in methods:
            for p in drop_rates:
                for seed in (seeds[:1] if (kind in DETERMINISTIC or p == 0.0) else seeds):
                    for metric, value in score(kind, p, seed).items():
                        rows.append({"model": name, "metric": metric, "method": kind, "p": p, "seed": seed,
                                     "target": target, "value": float(value)})
    return rows


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std (population std, ddof=0) over seeds per (model, metric, method, p)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["metric"], r["method"], float(r["p"])), []).append(float(r["value"]))
    out = []
    for (model, metric, method, p), vals in groups.items():
        a = np.asarray(vals, dtype=np.float64)
        out.append({"model": model, "metric": metric, "method": method, "p": p, "mean": float(a.mean()),
                    "std": float(a.std()), "n_seeds": int(a.size)})
    return out


def sft_scores(summary: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """(model, metric) → score at p = 0 (the SFT model itself)."""
    return {(r["model"], r["metric"]): r["mean"] for r in summary if r["p"] == 0.0}


def pivot(summary: Sequence[Mapping[str, Any]], drop_rates: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Paper-style wide table: one row per (model, metric, method), one ``mean±std`` cell per p."""
    rates = sorted({float(r["p"]) for r in summary}) if drop_rates is None else [float(p) for p in drop_rates]
    table: dict[tuple, dict[str, Any]] = {}
    for r in summary:
        key = (r["model"], r["metric"], r["method"])
        row = table.setdefault(key, {"model": key[0], "metric": key[1], "method": key[2]})
        cell = f"{r['mean']:.4f}" if r["n_seeds"] <= 1 or r["std"] == 0 else f"{r['mean']:.4f}±{r['std']:.4f}"
        row[f"p={r['p']:g}"] = cell
    cols = ["model", "metric", "method", *[f"p={p:g}" for p in rates]]
    return [{c: row.get(c, "") for c in cols} for row in table.values()]


def primary_metrics(summary: Sequence[Mapping[str, Any]], prefer: Sequence[str] = ("accuracy", "agreement", "pass@1", "f1")) -> dict[str, list[str]]:
    """model → the metric per task to plot (the first of ``prefer`` the task has, else its first)."""
    by_model: dict[str, dict[str, list[str]]] = {}
    for r in summary:
        task, _, m = r["metric"].rpartition("/")
        lst = by_model.setdefault(r["model"], {}).setdefault(task, [])
        if r["metric"] not in lst:
            lst.append(r["metric"])
    out: dict[str, list[str]] = {}
    for model, tasks in by_model.items():
        for task, metrics in tasks.items():
            chosen = next((f"{task}/{p}" if task else p for p in prefer if (f"{task}/{p}" if task else p) in metrics), metrics[0])
            out.setdefault(model, []).append(chosen)
    return out


def curve(summary: Sequence[Mapping[str, Any]], model: str, metric: str, method: str,
          drop_rates: Sequence[float]) -> tuple[list[float], list[float]]:
    idx = {float(r["p"]): r for r in summary if r["model"] == model and r["metric"] == metric and r["method"] == method}
    mean = [idx[p]["mean"] if p in idx else math.nan for p in drop_rates]
    std = [idx[p]["std"] if p in idx else 0.0 for p in drop_rates]
    return mean, std


LOWER_IS_BETTER = ("nll", "loss", "perplexity", "ppl", "bits_per_byte", "error")
"""Metric name endings (after the task prefix) for which a smaller value is better."""


def lower_is_better(metric: str) -> bool:
    """True for losses, NLLs, perplexities and error rates (``bbc/gold_nll``, ``word_perplexity``)."""
    name = metric.rsplit("/", 1)[-1].split(",", 1)[0].lower()
    return name.endswith(LOWER_IS_BETTER)


def findings(summary: Sequence[Mapping[str, Any]], tolerance: float = 0.01) -> list[str]:
    """Plain-language checks of the paper's claims on these curves (per model and metric).

    "Better" follows the metric's direction: for a loss or NLL (:func:`lower_is_better`) DARE
    keeps the SFT score while it stays at most ``tolerance`` above it, and helps when it is lower."""
    lines = []
    sft = sft_scores(summary)
    for (model, metric), s in sorted(sft.items()):
        sign = -1.0 if lower_is_better(metric) else 1.0   # compare sign · value: larger is better
        def at(method: str, p: float) -> float | None:
            for r in summary:
                if (r["model"], r["metric"], r["method"], r["p"]) == (model, metric, method, p):
                    return r["mean"]
            return None

        dare_ok = [p for p in sorted({r["p"] for r in summary if r["method"] == "dare"})
                   if p > 0 and (v := at("dare", p)) is not None and sign * (v - s) >= -tolerance]
        max_ok = max(dare_ok) if dare_ok else 0.0
        direction = " (lower is better)" if sign < 0 else ""
        lines.append(f"{model} {metric}{direction}: SFT {s:.4f}; DARE stays within {tolerance:g} of SFT up to p={max_ok:g}")
        for p in (0.5, 0.9, 0.99):
            d, o, m = at("dare", p), at("drop_only", p), at("magnitude", p)
            if d is not None and o is not None:
                gain = sign * (d - o)
                lines.append(f"  p={p:g}: DARE {d:.4f} vs DropOnly {o:.4f} → rescaling "
                             f"{'helps' if gain > 1e-9 else 'does not help' if gain < -1e-9 else 'ties'}")
            if d is not None and m is not None:
                lines.append(f"  p={p:g}: DARE {d:.4f} vs MP {m:.4f} → DARE {'better' if sign * (d - m) > 1e-9 else 'not better'}")
    return lines
