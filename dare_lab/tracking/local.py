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
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dare_lab.tracking.base import Tracker, plain, table_columns

_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def safe_name(name: str) -> str:
    """A file-system-safe version of a run/table name."""
    s = _SAFE.sub("_", str(name)).strip("._")
    return s[:150] or "run"


def atomic_write(path: str | Path, text: str | bytes) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def rows_to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else plain(r.get(c)) for c in columns])
    return buf.getvalue()


def rows_to_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out


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


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows
            pass
        yield


def write_summary(experiment_dir: str | Path) -> Path | None:
    """Join ``<experiment_dir>/*/metrics.json`` into ``summary.csv`` and ``summary.md``.

    Columns: ``run``, the flattened config keys whose values differ between runs (the swept
    knobs), then every metric (union over runs). Written atomically; returns the CSV path.
    """
    exp = Path(experiment_dir)
    with _locked(exp / ".summary.lock"):
        runs = []
        for mfile in sorted(exp.glob("*/metrics.json")):
            try:
                metrics = json.loads(mfile.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            cfg_file = mfile.parent / "config.json"
            cfg = {}
            if cfg_file.exists():
                with contextlib.suppress(OSError, json.JSONDecodeError):
                    cfg = flatten(json.loads(cfg_file.read_text()))
            runs.append((mfile.parent.name, cfg, metrics))
        if not runs:
            return None
        cfg_keys = sorted({k for _, c, _ in runs for k in c})
        varying = [k for k in cfg_keys if len({json.dumps(c.get(k), default=str) for _, c, _ in runs}) > 1]
        metric_keys: list[str] = []
        for _, _, m in runs:
            metric_keys += [k for k in m if k not in metric_keys]
        rows = []
        for name, cfg, m in runs:
            row: dict[str, Any] = {"run": name}
            row.update({k: cfg.get(k) for k in varying})
            row.update({k: m.get(k) for k in metric_keys})
            rows.append(row)
        cols = ["run", *varying, *metric_keys]
        atomic_write(exp / "summary.md", rows_to_markdown(rows, cols))
        return atomic_write(exp / "summary.csv", rows_to_csv(rows, cols))


class LocalTracker(Tracker):
    """Writes config, metrics, tables and plots under ``<root>/<experiment>/<run>/``."""

    def __init__(self, root: str | Path | None = None, experiment: str | None = None, run_name: str | None = None,
                 summary: bool = True) -> None:
        super().__init__(experiment, run_name)
        self.root = root
        self.summary = summary
        self.metrics: dict[str, Any] = {}
        self._dir: Path | None = None

    @property
    def run_dir(self) -> Path | None:
        return self._dir

    @property
    def experiment_dir(self) -> Path | None:
        return self._dir.parent if self._dir else None

    def _resolve_root(self) -> Path:
        cwd, _ = _hydra_info()
        root = self.root or os.environ.get("DARE_LAB_RESULTS") or "results"
        root = Path(root)
        if not root.is_absolute() and cwd:
            root = Path(cwd) / root
        return root

    def _start(self, config: dict[str, Any]) -> None:
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
        atomic_write(self._dir / "metrics.json", json.dumps(self.metrics, indent=2, default=str, sort_keys=True))

    def table_path(self, name: str, ext: str = "csv") -> Path:
        return self._dir / "tables" / f"{safe_name(name)}.{ext}"

    def _log_table(self, name: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
        atomic_write(self.table_path(name, "csv"), rows_to_csv(rows, columns))
        atomic_write(self.table_path(name, "md"), rows_to_markdown(rows, columns))

    def _log_line(self, name, x, ys, xname, yname, title) -> None:
        rows = [{xname: xv, **{k: vs[i] for k, vs in ys.items()}} for i, xv in enumerate(x)]
        atomic_write(self._dir / "lines" / f"{safe_name(name)}.csv", rows_to_csv(rows, [xname, *ys]))
        from dare_lab.analysis.plots import line_plot

        line_plot(self._dir / "plots" / f"{safe_name(name)}.png", x, ys, xname=xname, yname=yname, title=title)

    def _log_image(self, name: str, path: Path, caption: str | None) -> None:
        dest = self._dir / "plots" / f"{safe_name(name)}{path.suffix or '.png'}"
        if path.resolve() != dest.resolve():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)

    def _finish(self, summary: dict[str, Any]) -> None:
        if summary:
            self.metrics.update({k: plain(v) for k, v in summary.items()})
        atomic_write(self._dir / "metrics.json", json.dumps(self.metrics, indent=2, default=str, sort_keys=True))
        if self.summary:
            write_summary(self._dir.parent)
