"""Writing run results: atomic JSON/text files and the run's metric summary."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary sibling, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:  # also on KeyboardInterrupt; after SIGKILL only a hidden ``.name.tmp-*`` can remain
        if tmp.exists():
            tmp.unlink()
    return path


def json_text(data: Any) -> str:
    """The canonical JSON text of results files (sorted keys, 2-space indent)."""
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_atomic(path, json_text(data))


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows of dicts → a Markdown table (floats to 4 decimals)."""
    if not rows:
        return ""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
