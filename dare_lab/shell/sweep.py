"""Hydra callback that joins every run of a sweep into one summary table
(:func:`dare_lab.tracking.summaries.write_sweep_summary`) and masks secrets in launcher logs.

The table (``summary.csv`` and ``summary.md`` in the sweep directory) has one row per job
directory holding a ``metrics.json``, in job order, with the job's overrides and run
identity. It is rewritten atomically after every job and at the end of the sweep, so a
sweep killed midway leaves the table of the jobs it finished, and a resumed sweep (see
``resume`` in the config) writes every row exactly once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dare_lab.tracking.summaries import write_sweep_summary


class _RedactFilter(logging.Filter):
    """Masks secrets in the launcher's log lines (they list each job's overrides)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from dare_lab.shell.run_identity import redact_text

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
            write_sweep_summary(Path(hc.sweep.dir))
        except Exception:  # noqa: BLE001 - the end-of-sweep summary is still written
            return

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_sweep_summary(Path(config.hydra.sweep.dir))
        if path is not None:
            print(f"dare-lab: sweep summary written to {path} (and summary.csv)")
