"""Glue shared by the analysis programs: pools, taskpools, scope, tracker, paper references."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dare_lab import tracking


def cfg_get(cfg: Any, dotted: str, default: Any = None) -> Any:
    v = OmegaConf.select(cfg, dotted, default=default) if OmegaConf.is_config(cfg) else default
    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v, resolve=True)
    return default if v is None else v


def build_pool(cfg: DictConfig):
    from dare_lab.programs.merge import build_pool as _build

    return _build(cfg)


def build_taskpool(cfg: DictConfig):
    """The configured taskpool, or the label-free :class:`FidelityTaskPool` when none is set."""
    node = cfg.get("taskpool") if hasattr(cfg, "get") else None
    if node is not None and "_target_" in node:
        from hydra.utils import instantiate

        return instantiate(node, _convert_="all")
    from dare_lab.analysis.fidelity import FidelityTaskPool

    return FidelityTaskPool(**cfg_get(cfg, "analysis.fidelity", {}))


def build_scope(cfg: DictConfig):
    from dare_lab.engine import Scope

    s = cfg_get(cfg, "engine.scope", None)
    if not s:
        return Scope()
    return Scope(include=tuple(s.get("include", (".*",))), exclude=tuple(s.get("exclude", ())),
                 linear_only=bool(s.get("linear_only", False)))


class TrackedRun:
    """The active tracker (started by the CLI) or one of our own from ``cfg.tracker``.

    Local results are always written: when the configured tracker writes nothing locally
    (``tracker=none``), a :class:`LocalTracker` writes them into ``run_dir`` (the ``dare-lab``
    run's directory: one tree with its config and metrics), or, called without one (the Python
    API), under ``results/<experiment>/<run>/``.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path | None = None):
        self.tracker = tracking.current()
        self.owned = self.tracker is None
        run_name = cfg.get("run_name") if hasattr(cfg, "get") else None
        if self.owned:
            self.tracker = tracking.from_config(cfg, run_name=run_name)
        self.tracker._ensure()
        own_local = self.tracker if isinstance(self.tracker, tracking.LocalTracker) else getattr(self.tracker, "local", None)
        self.mirror = not (isinstance(own_local, tracking.LocalTracker) and own_local.run_dir is not None)
        self.in_run_dir = run_dir is not None
        if self.mirror:  # e.g. a NullTracker or W&B without local mirror: still keep local results
            self.local = tracking.LocalTracker(run_dir=run_dir)
            self.local.start(tracking.experiment_name(cfg), run_name, OmegaConf.to_container(cfg, resolve=True))
        else:
            self.local = own_local
        self.dir: Path = self.local.run_dir

    def trackers(self):
        return [self.tracker, self.local] if self.mirror else [self.tracker]

    def table(self, name: str, rows, columns=None) -> Path:
        for t in self.trackers():
            t.log_table(name, rows, columns)
        return self.local.table_path(name, "md")

    def image(self, name: str, path: Path) -> None:
        for t in self.trackers():
            t.log_image(name, path)

    def plot_path(self, name: str) -> Path:
        from dare_lab.tracking.files import safe_name

        return self.dir / "plots" / f"{safe_name(name)}.png"

    def close(self, cfg: DictConfig, metrics: dict[str, Any], ours: Mapping[str, Any], shown: str = "") -> dict[str, Any]:
        """The end every analysis program shares: the paper's numbers beside ``ours`` (printed and
        logged as ``paper_reference``), where the outputs went, the trackers finished; returns
        ``metrics`` (with ``results_dir`` when not in a dare-lab run directory)."""
        refs = print_references(cfg, ours)
        if refs:
            self.table("paper_reference", refs)
        # under dare-lab the run directory is printed once, by the CLI, after the metrics
        text = shown + ("" if self.in_run_dir else f"results: {self.dir}")
        if text:
            print("\n" + text.rstrip("\n"))
        self.finish(metrics)
        if not self.in_run_dir:   # the Python API's caller learns where the results went
            metrics["results_dir"] = str(self.dir)
        return metrics

    def finish(self, metrics: Mapping[str, Any]) -> None:
        nums = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.owned:
            self.tracker.log_metrics(nums)
            self.tracker.finish()
        if self.mirror:
            self.local.log_metrics(nums)
            self.local.finish()


def print_table(title: str, md_path: Path) -> None:
    print(f"\n== {title} ({md_path})")
    print(md_path.read_text())


def print_references(cfg: DictConfig, ours: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Print ``cfg.reference`` (the paper's numbers for this experiment) beside ours.

    ``reference``: {source: str, notes: [str], values: {key: paper value}}; ``ours`` maps the
    same keys to our measurements. Returns the side-by-side rows.
    """
    ref = cfg_get(cfg, "reference", None)
    if not ref:
        return []
    print(f"\n== Paper reference: {ref.get('source', '')}")
    for note in ref.get("notes", []) or []:
        print(f"  paper: {note}")
    rows = []
    for key, paper in (ref.get("values") or {}).items():
        mine = ours.get(key)
        rows.append({"quantity": key, "paper": paper, "ours": mine})
        shown = f"{mine:.4f}" if isinstance(mine, float) else ("n/a (not measured here)" if mine is None else mine)
        print(f"  {key}: paper {paper} | ours {shown}")
    return rows
