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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

try:
    import xxhash
except ImportError:  # pragma: no cover - a declared dependency; the fingerprint says so when missing
    xxhash = None

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


class CheckpointFormatError(ValueError):
    """A checkpoint file whose contents are not what its format says (one line, names the file)."""


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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def header_shape_problem(header: Any) -> str | None:
    """What is wrong with the *shape* of a parsed safetensors header (valid JSON of the wrong
    structure or types), or None: the header must be an object; ``__metadata__``, if present, an
    object of strings; every other entry an object with ``dtype`` a known dtype code, ``shape`` a
    list of non-negative integers and ``data_offsets`` two non-negative integers [start, end],
    start <= end. The one check the lazy reader and the validator share."""
    if not isinstance(header, dict):
        return f"(not a JSON object but a {type(header).__name__})"
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        return "(__metadata__ is not an object of strings)"
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return f"(tensor {name!r}: entry is a {type(info).__name__}, not an object)"
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                return f"(tensor {name!r}: no {key})"
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str):
            return f"(tensor {name!r}: dtype is not a string: {code!r})"
        if code not in SAFE_DTYPES:
            return f"(tensor {name!r}: unsupported dtype {code})"
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            return f"(tensor {name!r}: shape is not a list of non-negative integers: {json.dumps(shape)[:80]})"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            return f"(tensor {name!r}: data_offsets is not two non-negative integers: {json.dumps(offsets)[:80]})"
        if offsets[1] < offsets[0]:
            return f"(tensor {name!r}: data_offsets end {offsets[1]} is before start {offsets[0]})"
    return None


def checked_safetensors_header(file: Path) -> tuple[dict, int, int]:
    """:func:`raw_safetensors_header` whose JSON also has the right structure and types
    (:func:`header_shape_problem`), ``__metadata__`` removed; any problem is a HeaderError."""
    header, n, size = raw_safetensors_header(file)
    problem = header_shape_problem(header)
    if problem:
        raise HeaderError("corrupt", problem)
    header.pop("__metadata__", None)
    return header, n, size


def _read_safetensors_header(file: Path) -> dict:
    """Parse and sanity-check a safetensors header (structure and types, declared sizes must fit
    in the file); every problem is a one-line :class:`CheckpointFormatError` naming the file."""
    try:
        header, n, size = checked_safetensors_header(file)
    except HeaderError as e:
        what = {"truncated": "truncated safetensors file", "corrupt": "corrupt safetensors header"}[e.kind]
        raise CheckpointFormatError(f"{file}: {what} {e.detail}") from None
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointFormatError(f"{file}: truncated safetensors file (tensors need {8 + n + end} bytes, file has {size})")
    return header


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def index_entry_file(model_dir: Path, index: Path, entry: Any, label: str) -> Path:
    """The shard file an index entry names, which must resolve inside the model directory: a
    plain relative path (no ``..``, not absolute) whose real path (symlinks followed) lies in the
    directory. A hub-cache snapshot (``…/snapshots/<rev>``) may also link into its repository's
    ``blobs/``, as the hub cache does for every file."""
    if not isinstance(entry, str) or not entry:
        raise CheckpointFormatError(f"model {label!r}: {index.name} entry {entry!r} is not a file name")
    rel = Path(entry)
    if rel.is_absolute() or ".." in rel.parts or "\\" in entry:
        raise CheckpointFormatError(f"model {label!r}: {index.name} entry {entry!r} points outside the model directory")
    file = model_dir / rel
    real, root = file.resolve(), model_dir.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(_inside(real, a) for a in allowed):
        raise CheckpointFormatError(f"model {label!r}: {index.name} entry {entry!r} resolves outside the model directory "
                                    f"(to {real})")
    return file


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
        self._digests: dict[str, tuple[str, int]] = {}   # tensor → (xxh3_128 of its bytes, byte count)
        self._scan()

    def _scan(self) -> None:
        p = self.path
        if (p / SAFE_INDEX).exists() or (p / SAFE_SINGLE).exists():
            files = self._files_from(p / SAFE_INDEX, p / SAFE_SINGLE)
            for f in files:
                with open(f, "rb") as fh:
                    data_start = 8 + int.from_bytes(fh.read(8), "little")
                for name, info in _read_safetensors_header(f).items():
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
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise CheckpointFormatError(f"model {self.label!r}: corrupt index {index}") from None
            if not isinstance(weight_map, dict):
                raise CheckpointFormatError(f"model {self.label!r}: corrupt index {index} (weight_map is not an object)")
            # each distinct shard name is checked once, in index order (an index repeats it for
            # every tensor: resolving symlinks ~600 times took ~0.05 s of a 1B merge's start-up)
            checked: dict[str, Path] = {}
            for entry in weight_map.values():
                if not isinstance(entry, str) or entry not in checked:
                    checked[entry] = index_entry_file(index.parent, index, entry, self.label)  # raises if bad
            files = sorted(set(checked.values()))
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
            self._record(name, *tensor_digest(t))
            return t.to(dtype) if dtype is not None else t.clone()
        from safetensors import safe_open

        with safe_open(f, framework="pt") as fh:
            t = fh.get_tensor(name)
        self._record(name, *tensor_digest(t))
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t

    def fingerprint(self) -> str:
        """sha256 of the checkpoint's index (or single-file header): the file layout, not the weights."""
        return hashlib.sha256(self._index_bytes).hexdigest()

    def reset_digests(self) -> None:
        """Forget the tensor digests recorded so far (a merge starts with none: a file may have
        changed since an earlier merge that used this reader)."""
        with self._lock:
            self._digests = {}

    def _record(self, name: str, digest: str, nbytes: int) -> None:
        with self._lock:
            self._digests[name] = (digest, nbytes)

    def _digest_of(self, name: str) -> tuple[str, int]:
        """This tensor's digest: the one recorded while the merge read it, else computed now."""
        got = self._digests.get(name)
        if got is not None:
            return got
        where = self.locate(name)
        if where is None:
            self.get(name)
        else:
            with self.chunk_reader(name, "digest") as r:
                r.complete_digest()
        return self._digests[name]

    def content_fingerprint(self, names) -> dict[str, Any]:
        """xxh3_128 over ``names`` (sorted): each tensor's name, dtype, shape, byte count and the
        xxh3_128 of its data bytes as stored (storage dtype, flat order). The per-tensor digests
        are those computed on the bytes the merge read (see :class:`ChunkReader`); a tensor it
        did not read is read now. Independent of thread count, tensor order and file layout."""
        if xxhash is None:
            return {"content_xxh3_128": "unavailable (xxhash not installed)"}
        h = xxhash.xxh3_128()
        total = 0
        names = sorted(set(names))
        for name in names:
            digest, nbytes = self._digest_of(name)
            total += nbytes
            h.update(f"{name}\t{str(self.dtype(name)).removeprefix('torch.')}\t{list(self.shape(name))}\t{nbytes}\t{digest}\n".encode())
        return {"content_xxh3_128": h.hexdigest(), "tensors_hashed": len(names), "bytes_hashed": total,
                "tensors_not_hashed": len(self._info) - len(names)}

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
        numel = 1
        for d in self.shape(name):
            numel *= d
        sink = (lambda digest, nbytes: self._record(name, digest, nbytes)) if xxhash is not None else None
        return ChunkReader(where[0], where[1], self.dtype(name), key, total=numel, sink=sink)


def tensor_digest(t: torch.Tensor) -> tuple[str, int]:
    """(xxh3_128 hex digest, byte count) of a tensor's bytes in flat (row-major) order."""
    if xxhash is None:
        return "", 0
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return xxhash.xxh3_128_hexdigest(raw), int(raw.nbytes)


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

    With a ``sink``, a file-backed reader also hashes (xxh3_128) the bytes it reads, in flat
    order, while they are in cache: each read that continues where the hashed prefix ends
    extends it (later passes over the same tensor, which start again at 0, are not hashed
    twice). :meth:`complete_digest` hashes whatever of the ``total`` entries no read covered and
    hands ``sink(digest, nbytes)`` the digest of the whole tensor's bytes.
    """

    def __init__(self, file: Path | None, offset: int = 0, dtype: torch.dtype | None = None, key: str = "in",
                 tensor: torch.Tensor | None = None, total: int = 0,
                 sink: Callable[[str, int], None] | None = None):
        self.flat = None if tensor is None else tensor.detach().reshape(-1)
        self.total, self.sink = total, sink
        self._hash = xxhash.xxh3_128() if (sink is not None and file is not None) else None
        self._upto = 0
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
        if self._hash is not None and start == self._upto and stop > start:
            self._hash.update(buf.view(torch.uint8).numpy())
            self._upto = stop
        return buf

    def complete_digest(self) -> None:
        """Hash the entries no read covered yet (none after a full pass) and report the digest."""
        if self._hash is None:
            return
        if self._upto < self.total:
            from dare_lab.engine.streamed import CHUNK, workspace

            for s in range(self._upto, self.total, CHUNK):
                e = min(self.total, s + CHUNK)
                buf = workspace("digest_tail", e - s, self.dtype)
                pread_exact(self.fd, buf, self.offset + s * self.itemsize)
                self._hash.update(buf.view(torch.uint8).numpy())
            self._upto = self.total
        self.sink(self._hash.hexdigest(), self.total * self.itemsize)
        self._hash = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
