"""Hydra callback that joins every run of a sweep into one summary table
(:func:`dare_lab.tracking.summaries.write_sweep_summary`) and masks secrets in launcher logs.

The table (``summary.csv`` and ``summary.md`` in the sweep directory) has one row per job
directory holding a ``metrics.json``, in job order, with the job's overrides and run
identity. It is rewritten atomically after every job and at the end of the sweep, so a
sweep killed midway leaves the table of the jobs it finished, and a resumed sweep (see
``resume`` in the config) writes every row exactly once.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import sys
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


class PivotError(ValueError):
    """``summary.pivot`` names no swept key (one line; checked before job 0)."""


def _swept_keys(overrides: list[str]) -> list[str]:
    sweeps = ("range(", "choice(", "interval(", "glob(")
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides
            if "=" in o and ("," in o.split("=", 1)[1] or o.split("=", 1)[1].startswith(sweeps))]


def check_pivot(pivot: Any, overrides: list[str]) -> str | None:
    """``pivot`` when it is None or a swept key of ``overrides`` (whole or its last dotted part)."""
    if pivot is None:
        return None
    swept = _swept_keys(overrides)
    if not isinstance(pivot, str) or (pivot not in swept and pivot not in [k.rsplit(".", 1)[-1] for k in swept]):
        raise PivotError(f"summary.pivot={pivot!r} is not a swept key; swept: {swept}")
    return pivot


def _pivot(config: DictConfig) -> str | None:
    from omegaconf import OmegaConf

    return check_pivot(OmegaConf.select(config, "summary.pivot", default=None),
                       list(OmegaConf.select(config, "hydra.overrides.task") or []))


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
        pivot = _pivot(config)
        path = write_sweep_summary(Path(config.hydra.sweep.dir), pivot)
        if path is not None:
            extra = f", summary_by_{pivot.rsplit('.', 1)[-1]}.md" if pivot else ""
            print(f"dare-lab: sweep summary written to {path} (and summary.csv{extra})")


# ---------------------------------------------------------------- run/sweep directory guard
#
# Before Hydra creates a run's (or a sweep's) directory, :class:`RunDirGuard` records whether
# it already existed and what it held, and takes an exclusive lock on it (``filelock``), so
#  - a failing run removes only what it created (``cli.run_job`` asks :func:`job_dir_state`);
#  - a second run or sweep into the same directory refuses at once with one line, exit 2.

LOCK_NAME = ".dare_lab.lock"
STATE_ENV = "DARE_LAB_DIR_STATE"  # the sweep directory's state, for launchers that run jobs in other processes
_MAX_ENV_ENTRIES = 2000

_STATE: dict[str, Any] = {}   # {"dir": abs path, "existed": bool, "entries": set[str] | None}
_LOCKS: list[Any] = []


def _snapshot(path: Path) -> dict[str, Any]:
    path = Path(os.path.abspath(path))
    existed = path.exists()
    entries: set[str] | None = set()
    if existed:
        try:
            entries = {p.name for p in path.iterdir()}
        except OSError:
            entries = None  # unreadable: everything counts as pre-existing
    return {"dir": str(path), "existed": existed, "entries": entries}


def job_dir_state(run_dir: Path) -> dict[str, Any]:
    """Whether ``run_dir`` existed before this run and which entries it held then.

    ``{"existed": bool, "entries": set | None}``; ``entries=None`` means "unknown": treat every
    entry as pre-existing. Without a recorded state (a run started without :class:`RunDirGuard`)
    the directory counts as pre-existing with unknown contents — nothing is removed.
    """
    state = _STATE or _state_from_env()
    run_dir = Path(os.path.abspath(run_dir))
    if not state:
        return {"existed": True, "entries": None}
    top = Path(state["dir"])
    if run_dir == top:
        return {"existed": state["existed"], "entries": state["entries"]}
    try:
        rel = run_dir.relative_to(top)
    except ValueError:
        return {"existed": True, "entries": None}
    if not state["existed"]:
        return {"existed": False, "entries": set()}
    if state["entries"] is None or rel.parts[0] in state["entries"]:
        return {"existed": True, "entries": None}  # a job directory of an earlier sweep: keep all of it
    return {"existed": False, "entries": set()}


def _state_from_env() -> dict[str, Any]:
    raw = os.environ.get(STATE_ENV)
    if not raw:
        return {}
    try:
        d = json.loads(raw)
        return {"dir": d["dir"], "existed": bool(d["existed"]),
                "entries": None if d["entries"] is None else set(d["entries"])}
    except (ValueError, KeyError, TypeError):
        return {}


_ERRNO_WORDS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EDQUOT: "disk quota exceeded", errno.ENOENT: "no such file or directory",
                errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory", errno.EEXIST: "already exists",
                errno.ENAMETOOLONG: "file name too long", errno.ENOTEMPTY: "directory not empty",
                errno.EMFILE: "too many open files", errno.EIO: "input/output error", errno.EXDEV: "cross-device link"}


def os_error_line(exc: OSError) -> str:
    """One line for an environment error: what happened, to which path, and the errno name."""
    name = errno.errorcode.get(exc.errno or -1)
    if exc.errno in _ERRNO_WORDS and exc.filename is not None:
        where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 else "")
        return f"{_ERRNO_WORDS[exc.errno]} ({name}): {where}"
    text = " ".join(str(exc).split())
    return f"{text} ({name})" if name and name not in text else text


def failed_run_dir() -> Path | None:
    """The run directory of the single run in progress in this process (None in sweeps: a
    sweep's finished jobs are never removed because a later step failed)."""
    if _STATE.get("what") == "run":
        return Path(_STATE["dir"])
    return None


class DirectoryBusy(RuntimeError):
    """Another dare-lab run or sweep holds the directory."""


def lock_directory(path: Path, what: str) -> None:
    """Take the exclusive lock of ``path`` (created if needed) or raise :class:`DirectoryBusy` at once."""
    import filelock

    path.mkdir(parents=True, exist_ok=True)
    lock_file = path / LOCK_NAME
    created = not lock_file.exists()
    lock = filelock.FileLock(str(lock_file), timeout=0, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise DirectoryBusy(f"{what} directory {path} is in use by another dare-lab run or sweep "
                            f"(lock {lock_file}); wait for it or choose another directory") from None
    _LOCKS.append((lock, lock_file, created))
    if len(_LOCKS) == 1:
        atexit.register(release_locks)


def release_locks() -> None:
    while _LOCKS:
        lock, lock_file, created = _LOCKS.pop()
        if created:  # leave no lock file behind in a directory that had none
            try:
                os.unlink(lock_file)
            except OSError:
                pass
        try:
            lock.release(force=True)
        except Exception:  # noqa: BLE001
            pass


def _refuse(exc: BaseException) -> None:
    from dare_lab.shell.run_identity import redact_text

    msg = " ".join(str(exc).split())
    if isinstance(exc, OSError):
        msg = os_error_line(exc)
    print(f"dare-lab: error: {redact_text(msg)}", file=sys.stderr)
    sys.exit(2)


class RunDirGuard(Callback):
    """Records the run/sweep directory's prior state and locks it (see module notes above)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._guard(Path(str(config.hydra.run.dir)), "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._guard(Path(str(config.hydra.sweep.dir)), "sweep")
        entries = _STATE["entries"]
        os.environ[STATE_ENV] = json.dumps({
            "dir": _STATE["dir"], "existed": _STATE["existed"],
            "entries": None if entries is None or len(entries) > _MAX_ENV_ENTRIES else sorted(entries)})

    def _guard(self, path: Path, what: str) -> None:
        release_locks()  # a new run in this process: the previous one (if any) is over
        _STATE.clear()
        _STATE.update(_snapshot(path))
        _STATE["what"] = what
        try:
            lock_directory(Path(_STATE["dir"]), what)
        except (DirectoryBusy, OSError) as exc:
            _refuse(exc)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_locks()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_locks()
