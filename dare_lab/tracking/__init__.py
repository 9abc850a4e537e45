"""Experiment tracking: one :class:`Tracker` interface, W&B / local / null implementations.

The CLI builds the tracker of each run or sweep job from ``cfg.tracker``
(``tracker=wandb|local|none``) with :func:`for_run`, which also makes it the *active* tracker;
programs log their tables and plots to :func:`current` (or, run stand-alone, start their own
with :func:`from_config`), and the CLI logs the run's metrics and finishes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dare_lab.tracking.base import NullTracker, Tracker
from dare_lab.tracking.files import atomic_write, read_csv, rows_to_csv, rows_to_markdown, write_table
from dare_lab.tracking.local import LocalTracker
from dare_lab.tracking.summaries import write_summary
from dare_lab.tracking.wandb_tracker import WandbTracker, resolve_mode

_ACTIVE: list[Tracker] = []


def activate(tracker: Tracker) -> Tracker:
    """Make ``tracker`` the one :func:`current` returns (until it finishes)."""
    _ACTIVE.append(tracker)
    return tracker


def current() -> Tracker | None:
    """The active, unfinished tracker, if any."""
    while _ACTIVE and _ACTIVE[-1].finished:
        _ACTIVE.pop()
    return _ACTIVE[-1] if _ACTIVE else None


def experiment_name(cfg: Any, default: str = "default") -> str:
    """``cfg.experiment_name`` (set by every ``configs/experiment/*.yaml``) or ``default``."""
    try:
        name = cfg.get("experiment_name") if hasattr(cfg, "get") else None
    except Exception:  # noqa: BLE001
        name = None
    return str(name or default)


def from_config(cfg: Any, experiment: str | None = None, run_name: str | None = None, start: bool = True) -> Tracker:
    """Build the tracker of ``cfg.tracker`` (a ``_target_`` node; LocalTracker when it has none),
    start it under ``experiment`` (default ``cfg.experiment_name``) with the resolved config,
    and make it active."""
    node = cfg.get("tracker") if hasattr(cfg, "get") else None
    if node is None or "_target_" not in node:  # tracker=none: local results only
        tracker: Tracker = LocalTracker()
    else:
        from hydra.utils import instantiate

        tracker = instantiate(node, _convert_="all")
    if start:
        try:
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        except Exception:  # noqa: BLE001
            config = {}
        tracker.start(experiment or tracker.experiment or experiment_name(cfg), run_name, config if isinstance(config, Mapping) else {})
    return activate(tracker)


def for_run(cfg: Any, run_dir: str | Path, config: Mapping[str, Any], run_name: str | None = None,
            group: str | None = None) -> Tracker | None:
    """The tracker ``dare-lab`` gives a run (or one sweep job): ``cfg.tracker`` built with its
    files in ``run_dir`` (unless the config names a ``root``), started with ``config`` (the
    resolved, redacted config) and made active, so every program logs to it through
    :func:`current`. ``group`` (a sweep) and ``run_name`` apply where the config leaves them
    null. ``tracker=none`` (no ``_target_``): None, nothing is started."""
    import inspect

    node = cfg.get("tracker") if hasattr(cfg, "get") else None
    if node is None or "_target_" not in node:
        return None
    from hydra.utils import get_class, instantiate

    try:
        params = inspect.signature(get_class(node["_target_"])).parameters
    except Exception:  # noqa: BLE001 - instantiate reports a bad target
        params = {}
    extra: dict[str, Any] = {}
    if "run_dir" in params and node.get("root") is None:
        extra["run_dir"] = str(run_dir)
    if "group" in params and group and node.get("group") is None:
        extra["group"] = group
    tracker: Tracker = instantiate(node, _convert_="all", **extra)
    tracker.start(tracker.experiment or experiment_name(cfg), run_name, dict(config))
    return activate(tracker)


__all__ = [
    "Tracker", "NullTracker", "LocalTracker", "WandbTracker", "resolve_mode", "activate", "current",
    "from_config", "for_run", "experiment_name", "write_summary", "atomic_write", "read_csv", "rows_to_csv", "rows_to_markdown",
    "write_table",
]
