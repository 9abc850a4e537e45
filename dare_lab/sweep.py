"""Hydra callback that joins every run of a sweep into one summary table.

The table (``summary.csv`` and ``summary.md`` in the sweep directory) has one row per job
directory holding a ``metrics.json``, in job order, with the job's overrides and run
identity. It is rewritten atomically after every job and at the end of the sweep, so a
sweep killed midway leaves the table of the jobs it finished, and a resumed sweep (see
``resume`` in the config) writes every row exactly once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
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
        try:
            metrics = json.loads(metrics_file.read_text())
        except ValueError:
            continue  # not ours or damaged by hand: written atomically by dare-lab
        row: dict[str, Any] = {"job": job.name}
        overrides = job / ".hydra" / "overrides.yaml"
        if overrides.exists():
            row["overrides"] = " ".join(OmegaConf.load(overrides))
        info = job / "run.json"
        if info.exists():
            try:
                row["run_id"] = json.loads(info.read_text()).get("run_id")
            except ValueError:
                pass
        row.update(metrics)
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


class _RedactFilter(logging.Filter):
    """Masks secrets in the launcher's log lines (they list each job's overrides)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from dare_lab.run_identity import redact_text

        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


_LAUNCHER_LOGGERS = ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_joblib_launcher._core",
                     "hydra._internal.utils", "hydra")


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for name in _LAUNCHER_LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, _RedactFilter) for f in logger.filters):
                logger.addFilter(_RedactFilter())

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        try:
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            if not str(hc.mode).endswith("MULTIRUN"):
                return
            write_summary(Path(hc.sweep.dir))
        except Exception:  # noqa: BLE001 - the end-of-sweep summary is still written
            return

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        if path is not None:
            print(f"dare-lab: sweep summary written to {path} (and summary.csv)")
