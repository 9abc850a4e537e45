"""Local results: everything a run logs, as plain files under ``results/<experiment>/<run>/``.

Layout::

    results/<experiment>/
        summary.csv, summary.md        one row per finished run of the experiment (a sweep's
                                       join: run, the config keys that differ, all metrics);
                                       rewritten atomically under a file lock by each finish
        <run>/config.yaml|json         resolved config
        <run>/metrics.json             latest value of every metric (+ summary on finish)
        <run>/metrics_history.jsonl    every log_metrics call, with its step
        <run>/tables/<name>.csv|md     log_table
        <run>/lines/<name>.csv         log_line data, plus plots/<name>.png drawn from it
        <run>/plots/<name>.png         log_image (copied in unless already inside the run dir)

The root is ``results`` in the directory the command was started from (Hydra's original
cwd), or ``$DARE_LAB_RESULTS``, or the ``root`` argument.

With ``run_dir`` (what ``dare-lab`` passes: the Hydra run or sweep-job directory) the run's
files go straight into that one directory — ``tables/``, ``lines/``, ``plots/`` and
``metrics_history.jsonl`` — and ``config.yaml`` / ``metrics.json`` are left to the CLI, which
writes them (secrets redacted) when the run completes; no experiment summary is written (a
sweep's ``summary.csv|md`` joins its jobs).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dare_lab.tracking.base import Tracker, plain
from dare_lab.tracking.figures import line_plot
from dare_lab.tracking.files import atomic_write, rows_to_csv, safe_name, write_table
from dare_lab.tracking.summaries import write_summary


def _hydra_info() -> tuple[str | None, str | None]:
    """(original cwd, sweep job name) when running under Hydra, else (None, None)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None, None
        hc = HydraConfig.get()
        kept = [o for o in hc.overrides.task if not o.lstrip("+~").startswith(("experiment=", "run_name="))]
        name = None
        if str(hc.mode).endswith("MULTIRUN"):  # sweep jobs: "<job num>_<overrides>"; single runs: a timestamp
            name = f"{hc.job.num}_" + (",".join(sorted(kept)) or "job")
        return hc.runtime.cwd, name
    except Exception:  # noqa: BLE001 - Hydra absent or not running
        return None, None


def results_root(root: str | Path | None = None) -> Path:
    """Where results go: ``root``, else ``$DARE_LAB_RESULTS``, else ``results/``, relative to
    Hydra's original working directory when running under Hydra (one rule for the CLI's run
    directories, the experiment summaries and the local tracker)."""
    cwd, _ = _hydra_info()
    path = Path(root or os.environ.get("DARE_LAB_RESULTS") or "results")
    if not path.is_absolute() and cwd:
        path = Path(cwd) / path
    return path


class LocalTracker(Tracker):
    """Writes config, metrics, tables and plots under ``<root>/<experiment>/<run>/``."""

    def __init__(self, root: str | Path | None = None, experiment: str | None = None, run_name: str | None = None,
                 summary: bool = True, run_dir: str | Path | None = None) -> None:
        super().__init__(experiment, run_name)
        self.root = root
        self.fixed_dir = Path(run_dir) if run_dir is not None else None
        self.summary = summary and self.fixed_dir is None
        self.metrics: dict[str, Any] = {}
        self._dir: Path | None = None

    @property
    def run_dir(self) -> Path | None:
        return self._dir

    @property
    def experiment_dir(self) -> Path | None:
        return self._dir.parent if self._dir else None

    def _resolve_root(self) -> Path:
        return results_root(self.root)

    def _start(self, config: dict[str, Any]) -> None:
        if self.fixed_dir is not None:  # the CLI's run directory: config/metrics are the CLI's
            self._dir = self.fixed_dir
            self.run_name = self.run_name or self._dir.name
            self._dir.mkdir(parents=True, exist_ok=True)
            return
        _, hydra_name = _hydra_info()
        name = self.run_name or hydra_name or time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self.run_name = safe_name(name)
        self._dir = self._resolve_root() / safe_name(self.experiment) / self.run_name
        self._dir.mkdir(parents=True, exist_ok=True)
        self._write_config(config)

    def _write_config(self, config: dict[str, Any]) -> None:
        atomic_write(self._dir / "config.json", json.dumps(config, indent=2, default=str, sort_keys=True))
        try:
            from omegaconf import OmegaConf

            text = OmegaConf.to_yaml(OmegaConf.create(json.loads(json.dumps(config, default=str))))
        except Exception:  # noqa: BLE001 - yaml is a convenience copy
            text = json.dumps(config, indent=2, default=str)
        atomic_write(self._dir / "config.yaml", text)

    def _log_metrics(self, metrics: dict[str, Any], step: int | None) -> None:
        self.metrics.update(metrics)
        with open(self._dir / "metrics_history.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}, default=str) + "\n")
        if self.fixed_dir is None:
            atomic_write(self._dir / "metrics.json", json.dumps(self.metrics, indent=2, default=str, sort_keys=True))

    def table_path(self, name: str, ext: str = "csv") -> Path:
        return self._dir / "tables" / f"{safe_name(name)}.{ext}"

    def _log_table(self, name: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
        write_table(self.table_path(name, "csv").with_suffix(""), rows, columns)

    def _log_line(self, name, x, ys, xname, yname, title) -> None:
        rows = [{xname: xv, **{k: vs[i] for k, vs in ys.items()}} for i, xv in enumerate(x)]
        atomic_write(self._dir / "lines" / f"{safe_name(name)}.csv", rows_to_csv(rows, [xname, *ys]))
        line_plot(self._dir / "plots" / f"{safe_name(name)}.png", x, ys, xname=xname, yname=yname, title=title)

    def _log_image(self, name: str, path: Path, caption: str | None) -> None:
        dest = self._dir / "plots" / f"{safe_name(name)}{path.suffix or '.png'}"
        if path.resolve() != dest.resolve():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)

    def _finish(self, summary: dict[str, Any]) -> None:
        if summary:
            self.metrics.update({k: plain(v) for k, v in summary.items()})
        if self.fixed_dir is not None:
            return
        atomic_write(self._dir / "metrics.json", json.dumps(self.metrics, indent=2, default=str, sort_keys=True))
        if self.summary:
            write_summary(self._dir.parent)
