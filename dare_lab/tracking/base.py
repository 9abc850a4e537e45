"""The tracker interface: one object per run, shared by the CLI and the analysis programs.

A run belongs to an *experiment* (a W&B group, a ``results/<experiment>/`` folder). Every
method takes plain Python values so programs never import wandb themselves::

    tracker.start(experiment="fig3_redundancy", run_name="demo", config=resolved_cfg_dict)
    tracker.log_metrics({"sst2/accuracy": 0.91}, step=None)
    tracker.log_table("redundancy", rows=[{"p": 0.9, "mean": 0.9}, ...])   # list of dicts
    tracker.log_line("curve", x=[0, .5], ys={"dare": [1, .9]}, xname="p", yname="acc")
    tracker.log_image("curve_png", "path/to/plot.png")
    tracker.finish(summary=None)

Trackers start lazily (the first ``log_*`` starts a run under experiment ``default``) and
``finish`` is idempotent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def table_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> list[str]:
    """Columns of a list-of-dicts table: ``columns`` if given, else first-seen key order."""
    if columns is not None:
        return [str(c) for c in columns]
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def plain(v: Any) -> Any:
    """Make a value JSON/CSV friendly (tensors, numpy scalars, paths)."""
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return v
    return v


class Tracker:
    """Base class and no-op implementation (``tracker=none``)."""

    experiment: str | None = None
    run_name: str | None = None

    def __init__(self, experiment: str | None = None, run_name: str | None = None) -> None:
        self.experiment = experiment
        self.run_name = run_name
        self.started = False
        self.finished = False
        self.failed = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, experiment: str | None = None, run_name: str | None = None,
              config: Mapping[str, Any] | None = None) -> "Tracker":
        if self.started:
            return self
        self.experiment = str(experiment or self.experiment or "default")
        self.run_name = run_name or self.run_name
        self.started = True
        self._start(dict(config or {}))
        return self

    def _ensure(self) -> None:
        if not self.started:
            self.start()

    def finish(self, summary: Mapping[str, Any] | None = None, failed: bool = False) -> None:
        """End the run (idempotent); ``failed``: the run raised (W&B records exit code 1)."""
        if self.finished or not self.started:
            self.finished = True
            return
        self.finished = True
        self.failed = bool(failed)
        self._finish(dict(summary or {}))

    # -- logging ---------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._ensure()
        self._log_metrics({str(k): plain(v) for k, v in metrics.items()}, step)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
        self._ensure()
        cols = table_columns(rows, columns)
        self._log_table(name, [{c: plain(r.get(c)) for c in cols} for r in rows], cols)

    def log_line(self, name: str, x: Sequence[float], ys: Mapping[str, Sequence[float]], xname: str = "x",
                 yname: str = "y", title: str | None = None) -> None:
        self._ensure()
        self._log_line(name, [float(v) for v in x], {k: [float(v) for v in vs] for k, vs in ys.items()},
                       xname, yname, title or name)

    def log_image(self, name: str, path: str | Path, caption: str | None = None) -> None:
        self._ensure()
        self._log_image(name, Path(path), caption)

    @property
    def run_dir(self) -> Path | None:
        """The local results folder of this run (None when nothing is written locally)."""
        return None

    # -- hooks (no-ops here) ---------------------------------------------------------------
    def _start(self, config: dict[str, Any]) -> None: ...
    def _finish(self, summary: dict[str, Any]) -> None: ...
    def _log_metrics(self, metrics: dict[str, Any], step: int | None) -> None: ...
    def _log_table(self, name: str, rows: list[dict[str, Any]], columns: list[str]) -> None: ...
    def _log_line(self, name: str, x: list[float], ys: dict[str, list[float]], xname: str, yname: str, title: str) -> None: ...
    def _log_image(self, name: str, path: Path, caption: str | None) -> None: ...


class NullTracker(Tracker):
    """Logs nothing anywhere (``tracker=none``)."""
