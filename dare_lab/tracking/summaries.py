"""Summary tables that join many runs: an experiment's runs, a Hydra sweep's jobs.

Both are ``summary.csv`` + ``summary.md``, each written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dare_lab.tracking.files import atomic_write, flatten, rows_to_csv, rows_to_markdown, safe_name, write_table


WIDE_METRICS = 12
"""Up to this many metrics an experiment's ``summary.md`` is wide (a column per metric); past
it, long (a row per run and metric). ``summary.csv`` is always wide."""


def _locked(path: Path):
    """An exclusive lock (``filelock``) held while one writer rebuilds a summary."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not ours or damaged by hand: dare-lab writes these atomically


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - damaged by hand: the run joins without config columns
        return None


def write_summary(experiment_dir: str | Path) -> Path | None:
    """Join ``<experiment_dir>/*/metrics.json`` into ``summary.csv`` and ``summary.md``
    (each run's config from its ``config.json``, else its ``config.yaml``).

    Columns: ``run``, the flattened config keys whose values differ between runs (the swept
    knobs), then every metric (union over runs; in the Markdown, one row per metric when there
    are more than :data:`WIDE_METRICS`). Written atomically; returns the CSV path.
    """
    exp = Path(experiment_dir)
    with _locked(exp / ".summary.lock"):
        runs = []
        for mfile in sorted(exp.glob("*/metrics.json")):
            metrics = _read_json(mfile)
            if not isinstance(metrics, dict):
                continue
            cfg = _read_json(mfile.parent / "config.json")
            if cfg is None:   # a dare-lab run directory: its config.yaml (resolved, redacted)
                cfg = _read_yaml(mfile.parent / "config.yaml")
            runs.append((mfile.parent.name, flatten(cfg) if isinstance(cfg, dict) else {}, metrics))
        if not runs:
            return None
        cfg_keys = sorted({k for _, c, _ in runs for k in c})
        varying = [k for k in cfg_keys if len({json.dumps(c.get(k), default=str) for _, c, _ in runs}) > 1]
        metric_keys: list[str] = []
        for _, _, m in runs:
            metric_keys += [k for k in m if k not in metric_keys]
        rows = [{"run": name, **{k: cfg.get(k) for k in varying}, **{k: m.get(k) for k in metric_keys}}
                for name, cfg, m in runs]
        if len(metric_keys) <= WIDE_METRICS:
            md = rows_to_markdown(rows, ["run", *varying, *metric_keys])
        else:  # an analysis logs a metric per (model, method, p): one row per metric reads better
            long = [{"run": r["run"], **{k: r[k] for k in varying}, "metric": k, "value": r[k]}
                    for r in rows for k in metric_keys if r.get(k) is not None]
            md = rows_to_markdown(long, ["run", *varying, "metric", "value"])
        atomic_write(exp / "summary.md", md)
        return atomic_write(exp / "summary.csv", rows_to_csv(rows, ["run", *varying, *metric_keys]))


def _override_pairs(overrides: list[str]) -> dict[str, str]:
    """``["+method.drop_rate=0.9", "modelpool=x"]`` → ``{"method.drop_rate": "0.9", "modelpool": "x"}``."""
    pairs = {}
    for o in overrides:
        key, sep, value = str(o).partition("=")
        if sep:
            pairs[key.lstrip("+~")] = value
    return pairs


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of a Hydra sweep holding a ``metrics.json``, in job order:
    the job's name, its overrides (one string, and parsed as ``_overrides``), run identity and
    metrics."""
    from omegaconf import OmegaConf

    rows = []
    for job in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        metrics = _read_json(job / "metrics.json")
        if not isinstance(metrics, dict):
            continue
        row: dict[str, Any] = {"job": job.name}
        overrides = job / ".hydra" / "overrides.yaml"
        if overrides.exists():
            listed = [str(o) for o in OmegaConf.load(overrides)]
            row["overrides"] = " ".join(listed)
            row["_overrides"] = _override_pairs(listed)
        info = _read_json(job / "run.json")
        if isinstance(info, dict):
            row["run_id"] = info.get("run_id")
        row.update(metrics)
        rows.append(row)
    return rows


def swept_columns(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Override key → column name for the keys whose values differ between jobs (all override
    keys of a one-job sweep); a column is the key's last dotted part where that is unique
    (``method.drop_rate`` → ``drop_rate``), else the whole key."""
    pairs = [r.get("_overrides", {}) for r in rows]
    keys = list(dict.fromkeys(k for p in pairs for k in p))
    swept = [k for k in keys if len({p.get(k) for p in pairs}) > 1] or (keys if len(rows) == 1 else [])
    short = [k.rsplit(".", 1)[-1] for k in swept]
    return {k: (s if short.count(s) == 1 else k) for k, s in zip(swept, short)}


def pivot_rows(table: list[dict[str, Any]], on: str, keys: list[str], metrics: list[str]) -> list[dict[str, Any]]:
    """A wide table: one row per (other swept keys, metric), one column ``<on>=<value>`` per value
    of the swept column ``on``, in job order (a redundancy curve or a method × p grid)."""
    values = list(dict.fromkeys(r.get(on) for r in table))
    out: dict[tuple, dict[str, Any]] = {}
    for r in table:
        for m in metrics:
            if r.get(m) is None:
                continue
            ident = tuple(r.get(k) for k in keys) + (m,)
            row = out.setdefault(ident, {**{k: r.get(k) for k in keys}, "metric": m})
            row[f"{on}={r.get(on)}"] = r[m]
    return [dict(row, **{f"{on}={v}": row.get(f"{on}={v}") for v in values}) for row in out.values()]


def write_sweep_summary(sweep_dir: Path, pivot: str | None = None) -> Path | None:
    """The sweep as a paper table: ``summary.md`` has one row per job, one column per swept
    key and one per metric; ``summary.csv`` adds each job's overrides and run identity. With
    ``pivot`` (a swept column, e.g. ``drop_rate``) also ``summary_by_<pivot>.csv|md``: one
    column per value of it (:func:`pivot_rows`). Returns the Markdown path."""
    rows = collect_sweep(sweep_dir)
    if not rows:
        return None
    cols = swept_columns(rows)
    reserved = {"job", "overrides", "run_id", "_overrides"}
    metrics = list(dict.fromkeys(k for r in rows for k in r if k not in reserved and k not in cols.values()))
    table = [{"job": r["job"], **{c: r.get("_overrides", {}).get(k) for k, c in cols.items()},
              **{m: r.get(m) for m in metrics}, "overrides": r.get("overrides"), "run_id": r.get("run_id")} for r in rows]
    head = ["job", *cols.values(), *metrics]
    sweep_dir = Path(sweep_dir)
    atomic_write(sweep_dir / "summary.csv", rows_to_csv(table, [*head, "overrides", "run_id"]))
    atomic_write(sweep_dir / "summary.md", rows_to_markdown(table, head))
    if pivot:
        pivot = cols.get(pivot, pivot)  # a whole override key or its column name
        if pivot not in cols.values():
            raise ValueError(f"summary.pivot={pivot!r} is not a swept key of this sweep; swept: {list(cols.values())}")
        others = [c for c in cols.values() if c != pivot]
        numeric = [m for m in metrics if all(isinstance(r.get(m), (int, float)) or r.get(m) is None for r in table)]
        wide = pivot_rows(table, pivot, others, numeric)
        write_table(sweep_dir / f"summary_by_{safe_name(pivot)}", wide)
    return sweep_dir / "summary.md"
