"""Hydra callback that joins every run of a sweep into one summary table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dare_lab.results import markdown_table, write_atomic


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory holding a ``metrics.json``: its overrides and metrics."""
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        metrics_file = job / "metrics.json"
        if not metrics_file.exists():
            continue
        row: dict[str, Any] = {"job": job.name}
        overrides = job / ".hydra" / "overrides.yaml"
        if overrides.exists():
            row["overrides"] = " ".join(OmegaConf.load(overrides))
        row.update(json.loads(metrics_file.read_text()))
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path) -> Path | None:
    rows = collect_sweep(sweep_dir)
    if not rows:
        return None
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(sweep_dir / "summary.csv", buf.getvalue())
    return write_atomic(sweep_dir / "summary.md", markdown_table(rows, columns))


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        if path is not None:
            print(f"dare-lab: sweep summary written to {path} (and summary.csv)")
