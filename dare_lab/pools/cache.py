"""Build a cached folder once, safely when a sweep's jobs run in parallel.

A launcher (submitit, joblib) may start several jobs that all find the same cache entry
missing. Each waits on one lock file per entry, re-checks, builds into a private temporary
folder and renames it into place: no job sees a half-built entry, and no job deletes an entry
it did not make (a folder that exists without its completion marker is refused, not removed).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def entry_lock(target: Path) -> Iterator[None]:
    """Hold the exclusive lock of one cache entry (``.<name>.lock`` beside it)."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        yield


def build_once(target: str | Path, build: Callable[[Path], None], marker: str = "config.json") -> Path:
    """Return ``target``, first running ``build(tmp)`` and renaming ``tmp`` to it if needed.

    ``marker`` is the file whose presence says a finished build lives at ``target``.
    """
    target = Path(target)
    if (target / marker).exists():
        return target
    with entry_lock(target):
        if (target / marker).exists():
            return target
        if target.exists():
            raise FileExistsError(f"{target} exists but holds no {marker} (not a finished build); "
                                  "remove it and rerun")
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            build(tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
