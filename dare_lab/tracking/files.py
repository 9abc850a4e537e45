"""Result files a reader never sees half of: atomic text/bytes, JSON, CSV and Markdown tables.

Every writer of results (the shell's run directories, sweep summaries, the local tracker,
plots) goes through :func:`atomic_write`: a uniquely named temporary sibling (so concurrent
writers never share one), fsync, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dare_lab.tracking.base import plain

_UMASK = os.umask(0o022)
os.umask(_UMASK)
"""The process umask at import: result files get the mode a plain ``open`` would give them
(``mkstemp`` alone makes them owner-only, unreadable to collaborators on a shared machine)."""

_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def safe_name(name: str) -> str:
    """A file-system-safe version of a run/table name."""
    s = _SAFE.sub("_", str(name)).strip("._")
    return s[:150] or "run"


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to a temporary sibling, fsync, then rename: readers never see half a file.

    After SIGKILL only a hidden ``.<name>.*.tmp`` can remain; on any exception it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def json_text(data: Any) -> str:
    """The canonical JSON text of results files (sorted keys, 2-space indent)."""
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write(path, json_text(data))


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of ``rows``, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r))


def rows_to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts → CSV text (full precision; missing cells empty)."""
    columns = list(columns) if columns is not None else columns_of(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else plain(r.get(c)) for c in columns])
    return buf.getvalue()


def rows_to_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts → a Markdown table (floats to 6 significant digits, ``|`` escaped)."""
    columns = list(columns) if columns is not None else columns_of(rows)

    def cell(v: Any) -> str:
        return _cell(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(stem: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """``<stem>.csv`` and ``<stem>.md`` of the same rows, each atomic; returns the CSV path."""
    stem = Path(stem)
    columns = list(columns) if columns is not None else columns_of(rows)
    atomic_write(stem.with_name(stem.name + ".md"), rows_to_markdown(rows, columns))
    return atomic_write(stem.with_name(stem.name + ".csv"), rows_to_csv(rows, columns))


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings → dotted keys; lists become their JSON text."""
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
