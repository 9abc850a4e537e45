"""Summary tables that join many runs: an experiment's runs, a Hydra sweep's jobs.

Both are ``summary.csv`` + ``summary.md`` written atomically by :func:`files.write_table`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dare_lab.tracking.files import flatten, write_table


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows
            pass
        yield


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not ours or damaged by hand: dare-lab writes these atomically


def write_summary(experiment_dir: str | Path) -> Path | None:
    """Join ``<experiment_dir>/*/metrics.json`` into ``summary.csv`` and ``summary.md``.

    Columns: ``run``, the flattened config keys whose values differ between runs (the swept
    knobs), then every metric (union over runs). Written atomically; returns the CSV path.
    """
    exp = Path(experiment_dir)
    with _locked(exp / ".summary.lock"):
        runs = []
        for mfile in sorted(exp.glob("*/metrics.json")):
            metrics = _read_json(mfile)
            if not isinstance(metrics, dict):
                continue
            cfg = _read_json(mfile.parent / "config.json")
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
        return write_table(exp / "summary", rows, ["run", *varying, *metric_keys])


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of a Hydra sweep holding a ``metrics.json``, in job order:
    the job's name, overrides, run identity and metrics."""
    from omegaconf import OmegaConf

    rows = []
    for job in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        metrics = _read_json(job / "metrics.json")
        if not isinstance(metrics, dict):
            continue
        row: dict[str, Any] = {"job": job.name}
        overrides = job / ".hydra" / "overrides.yaml"
        if overrides.exists():
            row["overrides"] = " ".join(OmegaConf.load(overrides))
        info = _read_json(job / "run.json")
        if isinstance(info, dict):
            row["run_id"] = info.get("run_id")
        row.update(metrics)
        rows.append(row)
    return rows


def write_sweep_summary(sweep_dir: Path) -> Path | None:
    """``summary.csv`` / ``summary.md`` of :func:`collect_sweep` in the sweep directory; returns the Markdown path."""
    rows = collect_sweep(sweep_dir)
    if not rows:
        return None
    write_table(Path(sweep_dir) / "summary", rows)
    return Path(sweep_dir) / "summary.md"
