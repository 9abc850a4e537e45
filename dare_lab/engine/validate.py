"""Up-front pool validation: everything that can be checked from file headers, before any merge.

:func:`plan_merge` already checks names, shapes, float dtypes of merged tensors and
vocabulary sizes; :class:`~dare_lab.engine.sources.CheckpointReader` checks that each
safetensors header parses and that its declared sizes fit in the file. This module adds the
checks that make a file *loadable*, so a damaged input fails in seconds with one line instead
of after minutes of merging:

- every safetensors file: each tensor's byte span equals shape × dtype size, spans are
  contiguous from 0 without overlap, and the file ends exactly where the last span ends
  (what the safetensors library itself enforces when a tensor is read);
- sharded checkpoints: every tensor the index names is in the shard it names, and no tensor
  is stored in two shards;
- dtypes agree between the base and every model for tensors copied from the base (an integer
  buffer in one and floats in the other is a different checkpoint format, not a fine-tune).

NaN/Inf in the inputs are checked while streaming (every input tensor is tested before it
is used; the output directory is then never committed), because finding them needs the data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from dare_lab.engine.plan import PoolMismatchError, TensorPlan
from dare_lab.engine.sources import (SAFE_DTYPES, SAFE_INDEX, CheckpointFormatError, HeaderError, TensorSource,
                                     checked_safetensors_header)


class CorruptCheckpointError(CheckpointFormatError):
    """A checkpoint file whose header does not describe its bytes."""


def _itemsize(code: str) -> int:
    return torch.empty((), dtype=SAFE_DTYPES[code]).element_size()


def check_safetensors_file(file: Path, label: str) -> dict[str, dict]:
    """Check one safetensors file's layout from its header; returns the header (name → dtype, shape, offsets)."""
    try:
        header, n, size = checked_safetensors_header(file)
    except HeaderError as e:
        what = {"truncated": "is truncated", "corrupt": "has a corrupt header"}[e.kind]
        raise CorruptCheckpointError(f"model {label!r}: {file.name} {what} {e.detail}") from None
    spans = []
    for name, info in header.items():
        code, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * _itemsize(code) or start < 0:
            raise CorruptCheckpointError(
                f"model {label!r}: {file.name}: tensor {name!r} declares {end - start} bytes for shape {shape} {code} "
                f"({numel * _itemsize(code)} expected)")
        spans.append((start, end, name))
    spans.sort()
    pos = 0
    for start, end, name in spans:
        if start != pos:
            what = "overlaps the previous tensor" if start < pos else f"leaves a gap of {start - pos} bytes"
            raise CorruptCheckpointError(f"model {label!r}: {file.name}: tensor {name!r} {what}")
        pos = end
    if 8 + n + pos != size:
        if 8 + n + pos > size:
            raise CorruptCheckpointError(f"model {label!r}: {file.name} is truncated (tensors need {8 + n + pos} bytes, file has {size})")
        raise CorruptCheckpointError(f"model {label!r}: {file.name} has {size - 8 - n - pos} bytes after its last tensor")
    return header


def check_files(src: TensorSource) -> None:
    """Layout checks of every safetensors file of a checkpoint directory (no-op for other sources)."""
    files_of = getattr(src, "_file_of", None)
    path = getattr(src, "path", None)
    if not files_of or path is None:
        return
    files = sorted({f for f in files_of.values() if Path(f).suffix == ".safetensors"})
    seen: dict[str, Path] = {}
    for f in files:
        for name in check_safetensors_file(Path(f), src.label):
            if name in seen:
                raise CorruptCheckpointError(f"model {src.label!r}: tensor {name!r} is stored twice ({seen[name].name} and {Path(f).name})")
            seen[name] = Path(f)
    index = Path(path) / SAFE_INDEX
    if files and index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CorruptCheckpointError(f"model {src.label!r}: corrupt index {index.name}") from None
        if not isinstance(weight_map, dict):
            raise CorruptCheckpointError(f"model {src.label!r}: corrupt index {index.name} (weight_map is not an object)")
        for name, shard in weight_map.items():
            where = seen.get(name)
            if where is None or where.name != Path(shard).name:
                raise CorruptCheckpointError(f"model {src.label!r}: {index.name} names tensor {name!r} in {shard}, which does not hold it")


def check_dtypes(base: TensorSource, models: Mapping[str, TensorSource], plans: list[TensorPlan]) -> None:
    """Tensors copied from the base must not be floats in one checkpoint and integers in another."""
    for p in plans:
        if p.merge:
            continue
        for m, src in models.items():
            names = set(src.names()) if not hasattr(src, "_info") else src._info  # noqa: SLF001
            if p.name in names:
                got = src.dtype(p.name)
                if got.is_floating_point != p.base_dtype.is_floating_point:
                    raise PoolMismatchError(f"dtype mismatch in {p.name!r}: base has {p.base_dtype}, model {m!r} has {got}")


def validate_pool(base: TensorSource, models: Mapping[str, TensorSource], plans: list[TensorPlan]) -> None:
    """Every header-level check not already done by the readers and :func:`plan_merge`."""
    for src in (base, *models.values()):
        check_files(src)
    check_dtypes(base, models, plans)


def validate_output(out_dir: str | Path, entries) -> None:
    """Re-check a written (not yet renamed) output from disk before it is committed.

    Every shard's layout (as :func:`check_safetensors_file`), every planned tensor stored
    exactly once with its planned shape and dtype, the index (when sharded) naming each tensor's
    shard and the total size. Raises RuntimeError: a failure here is a write error, not bad input.
    """
    out = Path(out_dir)
    codes = {v: k for k, v in SAFE_DTYPES.items()}
    files = sorted(out.glob("*.safetensors"))
    try:
        where: dict[str, str] = {}
        declared: dict[str, tuple[list[int], str]] = {}
        for f in files:
            for name, info in check_safetensors_file(f, "output").items():
                if name in where:
                    raise CorruptCheckpointError(f"tensor {name!r} is stored twice")
                where[name] = f.name
                declared[name] = (list(info["shape"]), info["dtype"])
        planned = {name: ([int(x) for x in shape], codes[dtype]) for name, shape, dtype in entries}
        if declared != planned:
            extra, missing = sorted(set(declared) - set(planned)), sorted(set(planned) - set(declared))
            bad = [n for n in planned if n in declared and declared[n] != planned[n]]
            raise CorruptCheckpointError(f"output does not match the plan (missing {missing[:3]}, extra {extra[:3]}, "
                                         f"changed {bad[:3]})")
        index = out / SAFE_INDEX
        if len(files) > 1 or index.exists():
            data = json.loads(index.read_text())
            if data["weight_map"] != where:
                raise CorruptCheckpointError(f"{SAFE_INDEX} does not match the shards' headers")
            total = sum(f.stat().st_size for f in files)
            if not 0 < data["metadata"]["total_size"] <= total:
                raise CorruptCheckpointError(f"{SAFE_INDEX} declares total_size {data['metadata']['total_size']}, shards hold {total} bytes")
        elif files != [out / "model.safetensors"]:
            raise CorruptCheckpointError(f"single-file output must be model.safetensors, found {[f.name for f in files]}")
    except (CorruptCheckpointError, OSError, ValueError, KeyError) as exc:
        raise RuntimeError(f"merged output in {out} failed its final check, not committed: {exc}") from None
