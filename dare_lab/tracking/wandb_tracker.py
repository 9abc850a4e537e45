"""Weights & Biases tracker: offline unless a key is present; always mirrors to local results.

Mode: the ``mode`` argument if given (online | offline | disabled), else ``$WANDB_MODE``,
else ``online`` when ``$WANDB_API_KEY`` is set, else ``offline`` (no network, no prompt;
``wandb sync <dir>`` uploads later). Runs are grouped by experiment (``group``), named by
run, and tables / line plots / images are logged as ``wandb.Table`` /
``wandb.plot.line_series`` / ``wandb.Image``. Everything is also written by a
:class:`LocalTracker` unless ``local=False``.

Under ``dare-lab`` every program logs here (``tracker=wandb``): one W&B run per run or sweep
job, written under the run directory (``<run dir>/wandb/offline-run-*``), ``group`` = the
sweep (``<experiment>/<sweep dir name>``; single runs: the experiment), ``name`` = the job's
overrides (``method.drop_rate=0.9,method.seed=1``), config = the resolved, redacted config,
metrics, tables and images as the program logs them, and the run's metrics as its summary.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dare_lab.tracking.base import Tracker
from dare_lab.tracking.local import LocalTracker


def resolve_mode(mode: str | None) -> str:
    if mode:
        mode = str(mode).lower()
    else:
        mode = os.environ.get("WANDB_MODE", "").lower() or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "dryrun":
        mode = "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"W&B mode {mode!r}: choose online, offline or disabled")
    return mode


class WandbTracker(Tracker):
    def __init__(self, project: str = "dare_lab", entity: str | None = None, mode: str | None = None,
                 group: str | None = None, tags: Sequence[str] = (), dir: str | Path | None = None,  # noqa: A002
                 job_type: str | None = None, local: bool = True, root: str | Path | None = None,
                 experiment: str | None = None, run_name: str | None = None, run_dir: str | Path | None = None) -> None:
        super().__init__(experiment, run_name)
        self.project, self.entity, self.group = project, entity, group
        self.mode = resolve_mode(mode)
        self.tags, self.job_type = list(tags or ()), job_type
        self.dir = dir if dir is not None else run_dir  # dare-lab: <run dir>/wandb/offline-run-*
        self.local = LocalTracker(root=root, experiment=experiment, run_name=run_name, run_dir=run_dir) if local else None
        self.run = None

    @property
    def run_dir(self) -> Path | None:
        return self.local.run_dir if self.local else None

    @property
    def wandb_dir(self) -> Path | None:
        """The W&B run folder (``.../wandb/offline-run-*``), once started."""
        if self.run is None or self.mode == "disabled":
            return None
        return Path(self.run.dir).parent

    def _start(self, config: dict[str, Any]) -> None:
        if self.local:
            self.local.start(self.experiment, self.run_name, config)
            self.run_name = self.local.run_name
        import wandb

        wdir = self.dir
        if wdir is None and self.local:
            wdir = self.local.experiment_dir
        if wdir is not None:
            Path(wdir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.project, entity=self.entity, group=self.group or self.experiment,
                              name=self.run_name, job_type=self.job_type, tags=self.tags or None,
                              config=config, dir=str(wdir) if wdir else None, mode=self.mode,
                              reinit="create_new")

    def _log_metrics(self, metrics, step) -> None:
        if self.local:
            self.local.log_metrics(metrics, step)
        nums = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}
        if nums:
            self.run.log(nums, step=step)

    def _log_table(self, name, rows, columns) -> None:
        if self.local:
            self.local.log_table(name, rows, columns)
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def _log_line(self, name, x, ys, xname, yname, title) -> None:
        if self.local:
            self.local.log_line(name, x, ys, xname, yname, title)
        import wandb

        keys = list(ys)
        self.run.log({name: wandb.plot.line_series(xs=x, ys=[ys[k] for k in keys], keys=keys, title=title, xname=xname)})

    def _log_image(self, name, path, caption) -> None:
        if self.local:
            self.local.log_image(name, path, caption)
        import wandb

        self.run.log({name: wandb.Image(str(path), caption=caption)})

    def _finish(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            if summary:
                self.run.summary.update(summary)
            self.run.finish(exit_code=1 if self.failed else 0)
        if self.local:
            self.local.finish(summary)
