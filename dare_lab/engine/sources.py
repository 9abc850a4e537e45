"""Lazy tensor sources: HF checkpoint directories (or hub ids) and in-memory state dicts.

A source lists names, shapes and dtypes from file headers without reading data, and reads
one tensor on demand. Safetensors files are opened per tensor: keeping handles open makes
every mapped input page count toward peak RSS.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

SAFE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TensorSource(Protocol):
    label: str

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor: ...


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes")


_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*(?:@[\w.\-/]+)?$")
"""``name``, ``org/name``, either with ``@revision`` (a branch, tag or commit)."""


def resolve_model_dir(ref: str | os.PathLike) -> Path:
    """A local directory as is; a hub id via the HF cache (downloaded when online).

    Raises FileNotFoundError with a one-line message naming the reference otherwise.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    text = str(ref)
    if path.exists():
        raise FileNotFoundError(f"model {text!r} is a file, expected a model directory")
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path does not exist: {text}")
    from huggingface_hub import snapshot_download

    repo, _, revision = text.partition("@")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
    try:
        local = snapshot_download(repo, revision=revision or None, allow_patterns=patterns,
                                  local_files_only=_hub_offline())
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        why = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if _hub_offline() else type(exc).__name__
        raise FileNotFoundError(f"model {text!r} is not a local directory and cannot be fetched from the hub: {why}") from None
    if not any(Path(local).glob("*.safetensors")):
        patterns = ["*.json", "*.bin", "*.model", "*.txt", "tokenizer*"]
        local = snapshot_download(repo, revision=revision or None, allow_patterns=patterns,
                                  local_files_only=_hub_offline())
    return Path(local)


class HeaderError(ValueError):
    """A safetensors header that cannot be read: ``kind`` is truncated | corrupt, ``detail`` why."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind} {detail}")
        self.kind, self.detail = kind, detail


def raw_safetensors_header(file: Path) -> tuple[Any, int, int]:
    """(parsed JSON header, its length in bytes, file size); the one reader of the 8-byte length
    and JSON header that the lazy reader and the validator share (each words its own errors)."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise HeaderError("truncated", f"({size} bytes)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise HeaderError("corrupt", f"(declares {n} header bytes, file has {size})")
        try:
            return json.loads(fh.read(n)), n, size
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HeaderError("corrupt", "(not JSON)") from None


def _read_safetensors_header(file: Path) -> dict:
    """Parse and sanity-check a safetensors header (declared sizes must fit in the file)."""
    try:
        header, n, size = raw_safetensors_header(file)
    except HeaderError as e:
        what = {"truncated": "truncated safetensors file", "corrupt": "corrupt safetensors header"}[e.kind]
        raise ValueError(f"{file}: {what} {e.detail}") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{file}: truncated safetensors file (tensors need {8 + n + end} bytes, file has {size})")
    return header


class CheckpointReader:
    """Lazy reader of an HF model directory: sharded/single safetensors, or ``.bin`` files.

    ``.bin`` files load only with ``torch.load(weights_only=True, mmap=True)``.
    """

    def __init__(self, ref: str | os.PathLike, label: str | None = None):
        self.ref = str(ref)
        self.label = label or self.ref
        self.path = resolve_model_dir(ref)
        self._file_of: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._bin_cache: dict[Path, Mapping[str, torch.Tensor]] = {}
        self._offset: dict[str, int] = {}
        self._lock = threading.Lock()
        self._index_bytes = b""
        self._scan()

    def _scan(self) -> None:
        p = self.path
        if (p / SAFE_INDEX).exists() or (p / SAFE_SINGLE).exists():
            files = self._files_from(p / SAFE_INDEX, p / SAFE_SINGLE)
            for f in files:
                with open(f, "rb") as fh:
                    data_start = 8 + int.from_bytes(fh.read(8), "little")
                for name, info in _read_safetensors_header(f).items():
                    if info["dtype"] not in SAFE_DTYPES:
                        raise ValueError(f"{f}: tensor {name!r} has unsupported dtype {info['dtype']}")
                    self._file_of[name] = f
                    self._info[name] = (tuple(info["shape"]), SAFE_DTYPES[info["dtype"]])
                    self._offset[name] = data_start + int(info["data_offsets"][0])
        elif (p / BIN_INDEX).exists() or (p / BIN_SINGLE).exists():
            for f in self._files_from(p / BIN_INDEX, p / BIN_SINGLE):
                for name, t in self._load_bin(f).items():
                    self._file_of[name] = f
                    self._info[name] = (tuple(t.shape), t.dtype)
        else:
            raise FileNotFoundError(f"model {self.label!r}: no model.safetensors, safetensors index or pytorch_model.bin in {p}")
        if not self._info:
            raise ValueError(f"model {self.label!r}: checkpoint in {p} holds no tensors")

    def _files_from(self, index: Path, single: Path) -> list[Path]:
        if index.exists():
            self._index_bytes = index.read_bytes()
            try:
                weight_map = json.loads(self._index_bytes)["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise ValueError(f"model {self.label!r}: corrupt index {index}") from None
            files = sorted({index.parent / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise FileNotFoundError(f"model {self.label!r}: shard {f.name} named in {index.name} is missing")
            return files
        self._index_bytes = single.read_bytes()[:65536] if single.suffix == ".bin" else _header_bytes(single)
        return [single]

    def _load_bin(self, f: Path) -> Mapping[str, torch.Tensor]:
        with self._lock:
            if f not in self._bin_cache:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:  # noqa: BLE001
                    raise ValueError(f"model {self.label!r}: cannot load {f.name} with weights_only=True ({type(exc).__name__})") from None
                self._bin_cache[f] = sd
            return self._bin_cache[f]

    def names(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._info[name][1]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        f = self._file_of[name]
        if f.suffix == ".bin":
            t = self._load_bin(f)[name]
            return t.to(dtype) if dtype is not None else t.clone()
        from safetensors import safe_open

        with safe_open(f, framework="pt") as fh:
            t = fh.get_tensor(name)
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t

    def fingerprint(self) -> str:
        """sha256 of the checkpoint's index (or single-file header): identifies the input."""
        return hashlib.sha256(self._index_bytes).hexdigest()

    def locate(self, name: str) -> tuple[Path, int] | None:
        """(file, byte offset of the data) of a safetensors tensor; None for ``.bin`` files."""
        if name not in self._offset:
            return None
        return self._file_of[name], self._offset[name]

    def chunk_reader(self, name: str, key: str = "in") -> ChunkReader:
        """Flat-range reader of one tensor: ``pread`` from the file for safetensors (nothing mapped,
        so the input's pages never count toward this process's RSS), the loaded tensor otherwise."""
        where = self.locate(name)
        if where is None:
            return ChunkReader.of_tensor(self.get(name))
        return ChunkReader(where[0], where[1], self.dtype(name), key)


def _header_bytes(file: Path) -> bytes:
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return fh.read(min(n, 1 << 26))


class StateDictSource:
    """An in-memory state dict seen through the same interface as a checkpoint."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], label: str = "state_dict"):
        self.sd = state_dict
        self.label = label

    def names(self) -> list[str]:
        return list(self.sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sd[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.sd[name].dtype

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.sd[name].detach()
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t

    def fingerprint(self) -> str:
        return "in-memory"

    def chunk_reader(self, name: str, key: str = "in") -> ChunkReader:
        return ChunkReader.of_tensor(self.get(name))


def pread_exact(fd: int, out: torch.Tensor, pos: int) -> None:
    """Fill the contiguous CPU tensor ``out`` with the bytes of ``fd`` from offset ``pos``."""
    raw = out.view(torch.uint8).numpy()
    got = 0
    while got < raw.nbytes:
        n = os.preadv(fd, [raw[got:]], pos + got)
        if n <= 0:
            raise OSError(f"short read at byte {pos + got}")
        got += n


class ChunkReader:
    """``reader(start, stop)`` → entries [start, stop) of a tensor's flat data, storage dtype.

    File-backed readers ``pread`` into a per-thread buffer (the returned view is valid until
    the next call with the same key on this thread); in-memory ones return a slice.
    """

    def __init__(self, file: Path | None, offset: int = 0, dtype: torch.dtype | None = None, key: str = "in",
                 tensor: torch.Tensor | None = None):
        self.flat = None if tensor is None else tensor.detach().reshape(-1)
        self.fd = None
        if file is not None:
            self.fd = os.open(file, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self.offset, self.dtype, self.key = offset, dtype, key
        self.itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else 0

    @classmethod
    def of_tensor(cls, tensor: torch.Tensor) -> ChunkReader:
        return cls(None, tensor=tensor)

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        if self.flat is not None:
            return self.flat[start:stop]
        from dare_lab.engine.streamed import workspace

        buf = workspace(self.key, stop - start, self.dtype)
        pread_exact(self.fd, buf, self.offset + start * self.itemsize)
        return buf

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
