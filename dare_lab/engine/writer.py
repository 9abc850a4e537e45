"""Sharded safetensors output written in place, tensor by tensor, then renamed atomically.

Every output shape and dtype is known before the first tensor is merged, so each shard's
header (with all data offsets) is written first and tensors are then written straight to
their offsets (``os.pwrite``): no shard is buffered in memory, workers may finish in any
order, and the output directory appears only when complete.

The page-aligned middle of each write goes through ``O_DIRECT`` where the file system takes
it (the header is padded so tensor data starts on a page): no page-cache pages are allocated
and dirtied for the output, which on a virtual machine costs more than the merge arithmetic
(measured: 1.8 GB in 1.4 s direct vs 5.8 s + 1.0 s sync buffered). Unaligned heads and tails,
patches and file systems without ``O_DIRECT`` (tmpfs) use plain buffered writes. A direct
write blocks until the device has the data, so chunk writes are copied into one of a few
page-aligned buffers and written behind by one background thread while the merge goes on
(a background failure is raised by the next write or by :meth:`ShardedSafetensorsWriter.finish`).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from dare_lab.engine.sources import SAFE_DTYPES, pread_exact

_DTYPE_CODE = {v: k for k, v in SAFE_DTYPES.items()}


ALIGN = 4096            # page size: O_DIRECT offsets, lengths and memory must be aligned to the block size
DIRECT_MIN = 64 << 10   # writes with less aligned middle than this stay buffered


def _pwrite_all(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf)
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class ShardedSafetensorsWriter:
    """Plan shards from (name, shape, dtype), pre-write headers, accept tensors in any order."""

    def __init__(self, tmp_dir: Path, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int | str = "5GB",
                 direct: bool = True):
        self.dir = Path(tmp_dir)
        from huggingface_hub import split_state_dict_into_shards_factory

        # huggingface_hub's own plan (the one save_pretrained uses): tensors in order, a new shard
        # when the next would pass the limit, a tensor larger than the limit alone in its shard
        specs = {name: (shape, dtype) for name, shape, dtype in entries}
        split = split_state_dict_into_shards_factory(specs, get_storage_size=lambda e: tensor_nbytes(*e),
                                                     filename_pattern="model{suffix}.safetensors",
                                                     max_shard_size=max_shard_size)
        files = split.filename_to_tensors or {"model.safetensors": []}
        shards = [[(name, *specs[name]) for name in names] for names in files.values()]
        self.files: list[Path] = []
        self._where: dict[str, tuple[Path, int, int, torch.dtype, tuple[int, ...]]] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        self._dirty: dict[Path, int] = {}
        self._syncs: list = []
        self._syncer = None
        self.direct = direct
        self._dfds: dict[Path, int | None] = {}
        self._local = threading.local()
        self._behind = None                      # the write-behind thread (see :meth:`_write_behind`)
        self._slots = threading.Semaphore(self.WRITE_BEHIND)
        self._spare: list[np.ndarray] = []
        self._staged_exec = None                 # the staged write-behind thread (see :meth:`write_staged`)
        self._staged_slots = threading.Semaphore(self.STAGED_BEHIND)
        self._stage_spares: list[np.ndarray] = []
        self._inflight: list = []
        self._error: BaseException | None = None
        for fname, shard in zip(files, shards):
            self._write_header(self.dir / fname, shard)
        self.total_size = sum(tensor_nbytes(s, d) for _, s, d in entries)

    def _write_header(self, file: Path, shard: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        spans = []
        for name, shape, dtype in shard:
            nb = tensor_nbytes(shape, dtype)
            header[name] = {"dtype": _DTYPE_CODE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nb]}
            spans.append((name, offset, nb, dtype, tuple(shape)))
            offset += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % ALIGN)   # data from a page boundary (JSON allows the spaces)
        with open(file, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            fh.truncate(8 + len(raw) + offset)
        base = 8 + len(raw)
        for name, off, nb, dtype, shape in spans:
            self._where[name] = (file, base + off, nb, dtype, shape)
            self._pending.add(name)
        self.files.append(file)

    SYNC_EVERY = 256 << 20   # start a background fdatasync of a shard after this many new bytes
    WRITE_BEHIND = 8         # copied direct writes in flight at most (a chunk and a page each)

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDWR)
            return fd

    def _direct_fd(self, file: Path) -> int | None:
        """An ``O_DIRECT`` descriptor of the shard, or None (not supported / switched off)."""
        if not self.direct or not hasattr(os, "O_DIRECT"):
            return None
        with self._lock:
            if file not in self._dfds:
                try:
                    self._dfds[file] = os.open(file, os.O_WRONLY | os.O_DIRECT)
                except OSError:
                    self._dfds[file] = None
            return self._dfds[file]

    def _staging(self, nbytes: int) -> np.ndarray:
        """A page-aligned per-thread byte buffer (direct writes need aligned memory): this
        thread's, else the smallest spare that fits (one a staged write-behind gave back), else a
        new one."""
        buf = getattr(self._local, "stage", None)
        if buf is None or buf.shape[0] < nbytes:
            with self._lock:
                fits = [i for i, b in enumerate(self._stage_spares) if b.shape[0] >= nbytes]
                buf = self._stage_spares.pop(min(fits, key=lambda i: self._stage_spares[i].shape[0])) if fits else None
            if buf is None:
                buf = np.frombuffer(mmap.mmap(-1, max(nbytes, 1 << 20)), dtype=np.uint8)
            self._local.stage = buf
        return buf

    def _pwrite(self, file: Path, data: torch.Tensor, offset: int) -> None:
        raw = data.detach().contiguous().view(-1).view(torch.uint8).numpy()
        n = raw.shape[0]
        a0, a1 = -(-offset // ALIGN) * ALIGN, (offset + n) // ALIGN * ALIGN   # the page-aligned middle
        dfd = self._direct_fd(file) if a1 - a0 >= DIRECT_MIN else None
        if dfd is not None:
            if (raw.ctypes.data - offset) % ALIGN == 0:   # already page-phased (see :meth:`staged`): no copy
                try:
                    _pwrite_all(dfd, raw[a0 - offset: a1 - offset], a0)
                except OSError:      # e.g. EINVAL: this file system takes no direct writes after all
                    self.direct = False
                    dfd = None
            else:
                self._write_behind(file, dfd, raw, offset, a0, a1)
        if dfd is None:
            a0 = a1 = offset + n
        fd = self._fd(file)
        _pwrite_all(fd, raw[: a0 - offset], offset)
        _pwrite_all(fd, raw[a1 - offset:], a1)
        buffered = n - (a1 - a0)
        with self._lock:
            self._dirty[file] = self._dirty.get(file, 0) + buffered
            if self._dirty[file] >= self.SYNC_EVERY:
                # flush written pages while compute goes on, so the final fsync has little left
                self._dirty[file] = 0
                if self._syncer is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._syncer = ThreadPoolExecutor(1, thread_name_prefix="dare-lab-sync")
                self._syncs.append(self._syncer.submit(os.fdatasync, fd))

    def _write_behind(self, file: Path, dfd: int, raw: np.ndarray, offset: int, a0: int, a1: int) -> None:
        """Copy the aligned middle of ``raw`` into a page-aligned buffer and let one background
        thread write it (``O_DIRECT`` blocks until the device has it; the merge goes on meanwhile).
        At most ``WRITE_BEHIND`` buffers are in flight: a fast merge then waits for the disk."""
        if self._error is not None:
            raise self._error
        self._slots.acquire()
        try:
            with self._lock:
                buf = self._spare.pop() if self._spare else None
                if self._behind is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._behind = ThreadPoolExecutor(1, thread_name_prefix="dare-lab-write")
            if buf is None or buf.shape[0] < a1 - a0:
                buf = np.frombuffer(mmap.mmap(-1, max(a1 - a0, 1 << 20)), dtype=np.uint8)
            buf[: a1 - a0] = raw[a0 - offset: a1 - offset]
            fut = self._behind.submit(self._direct_job, file, dfd, buf, a1 - a0, a0)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._inflight = [f for f in self._inflight if not f.done()] + [fut]

    def _direct_job(self, file: Path, dfd: int, buf: np.ndarray, n: int, at: int) -> None:
        try:
            try:
                _pwrite_all(dfd, buf[:n], at)
            except OSError:          # e.g. EINVAL: this file system takes no direct writes after all
                self.direct = False
                _pwrite_all(self._fd(file), buf[:n], at)
        except BaseException as exc:
            self._error = self._error or exc
            raise
        finally:
            with self._lock:
                self._spare.append(buf)
            self._slots.release()

    def _drain(self) -> None:
        """Wait for every write-behind; raise the first error one of them hit."""
        with self._lock:
            pending, self._inflight = self._inflight, []
        for fut in pending:
            fut.exception()
        if self._error is not None:
            raise self._error

    def staged(self, name: str) -> torch.Tensor:
        """A flat per-thread buffer for the whole tensor ``name`` (planned dtype), laid out in
        memory so that :meth:`write` can send it to the file without a copy; valid until this
        thread's next ``staged`` or buffered-copy write."""
        file, offset, nbytes, dtype, shape = self._where[name]
        phase = offset % ALIGN
        buf = self._staging(phase + nbytes)
        return torch.from_numpy(buf[phase: phase + nbytes]).view(dtype)

    def _whole(self, name: str, tensor: torch.Tensor) -> tuple[Path, int, int]:
        """(file, offset, bytes) of the whole tensor ``name``, after checking ``tensor`` is as planned."""
        file, offset, nbytes, dtype, shape = self._where[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r}: planned {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        return file, offset, nbytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor at its planned offset (thread-safe; any order)."""
        file, offset, _ = self._whole(name, tensor)
        self._pwrite(file, tensor, offset)
        self.done(name)

    STAGED_BEHIND = 2             # staged tensors written behind at most at once (each holds its buffer)
    STAGED_BEHIND_MAX = 256 << 20  # larger staged tensors are written by the calling thread

    def write_staged(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor``, which lies in this thread's :meth:`staged` buffer, behind: the buffer
        goes to a background thread with it (a direct write blocks until the device has the
        data) and this thread's next ``staged`` takes another buffer (a spare once one is back).
        At most :data:`STAGED_BEHIND` are in flight; a tensor over :data:`STAGED_BEHIND_MAX`
        bytes, or without direct writes, is written at once (:meth:`write`): the extra memory
        stays bounded. A background failure is raised by the next write or by :meth:`finish`."""
        file, offset, nbytes = self._whole(name, tensor)
        buf = getattr(self._local, "stage", None)
        inside = buf is not None and buf.ctypes.data <= tensor.data_ptr() < buf.ctypes.data + buf.shape[0]
        if not inside or nbytes > self.STAGED_BEHIND_MAX or self._direct_fd(file) is None:
            self.write(name, tensor)
            return
        if self._error is not None:
            raise self._error
        self._staged_slots.acquire()
        try:
            self._local.stage = None          # the buffer now belongs to the background write
            with self._lock:
                if self._staged_exec is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._staged_exec = ThreadPoolExecutor(1, thread_name_prefix="dare-lab-write-staged")
            fut = self._staged_exec.submit(self._staged_job, file, name, tensor, offset, buf)
        except BaseException:
            self._staged_slots.release()
            raise
        with self._lock:
            self._inflight = [f for f in self._inflight if not f.done()] + [fut]

    def _staged_job(self, file: Path, name: str, tensor: torch.Tensor, offset: int, buf: np.ndarray) -> None:
        try:
            self._pwrite(file, tensor, offset)   # page-phased (see :meth:`staged`): no copy
            self.done(name)
        except BaseException as exc:
            self._error = self._error or exc
            raise
        finally:
            with self._lock:
                spares = self._stage_spares
                spares.append(buf)
                if len(spares) > self.STAGED_BEHIND:   # keep the largest few
                    spares.pop(min(range(len(spares)), key=lambda i: spares[i].shape[0]))
            self._staged_slots.release()

    def write_range(self, name: str, start: int, chunk: torch.Tensor) -> None:
        """Write flat entries [start, start + len(chunk)) of a tensor; call :meth:`done` after the last."""
        file, offset, nbytes, dtype, shape = self._where[name]
        if chunk.dtype != dtype:
            raise ValueError(f"tensor {name!r}: planned {dtype}, got a chunk of {chunk.dtype}")
        size = chunk.element_size()
        if start < 0 or (start + chunk.numel()) * size > nbytes:
            raise ValueError(f"tensor {name!r}: entries [{start}, {start + chunk.numel()}) are out of range")
        self._pwrite(file, chunk, offset + start * size)

    def patch(self, name: str, idx: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite entries ``idx`` (ascending) of an already written tensor: the span they
        cover is read back, patched in memory and written again (one read, one write)."""
        if idx.numel() == 0:
            return
        file, offset, nbytes, dtype, shape = self._where[name]
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        size = torch.empty((), dtype=dtype).element_size()
        if lo < 0 or hi * size > nbytes:
            raise ValueError(f"tensor {name!r}: patch entries [{lo}, {hi}) are out of range")
        span = torch.empty(hi - lo, dtype=dtype)
        self._drain()    # read back what is on disk, not what is still in flight
        pread_exact(self._fd(file), span, offset + lo * size)
        span[idx - lo] = values.to(dtype)
        self._pwrite(file, span, offset + lo * size)

    def done(self, name: str) -> None:
        with self._lock:
            self._pending.discard(name)

    def close(self) -> None:
        """Wait for write-behinds and background syncs, close the shard files (idempotent;
        raises the first error a background write hit)."""
        try:
            self._drain()
        finally:
            for attr in ("_staged_exec", "_behind"):   # staged writes first: their copies never go behind
                pool = getattr(self, attr)
                if pool is not None:
                    pool.shutdown()
                    setattr(self, attr, None)
            for fut in self._syncs:
                fut.result()
            self._syncs = []
            if self._syncer is not None:
                self._syncer.shutdown()
                self._syncer = None
            self._close_fds()

    def _close_fds(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._dfds.values()]:
                if fd is not None:
                    os.close(fd)
            self._fds, self._dfds = {}, {}

    def finish(self) -> dict[str, str]:
        """Check completeness and sizes, write the index (if sharded); returns the weight map."""
        self.close()
        if self._pending:
            raise RuntimeError(f"output incomplete: {len(self._pending)} tensors never written, e.g. {sorted(self._pending)[0]!r}")
        weight_map = {name: where[0].name for name, where in self._where.items()}
        for file in self.files:
            expected = max(off + nb for f, off, nb, _, _ in self._where.values() if f == file)
            if file.stat().st_size != expected:
                raise RuntimeError(f"shard {file.name} has {file.stat().st_size} bytes, expected {expected}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return weight_map


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the platform or file system cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: some file systems refuse fsync on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OverwriteRefused(FileExistsError):
    """``overwrite`` was asked to replace something that is not a previous output of this kind."""


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_replaceable(target: Path, marker: str | None = None, inputs: Mapping[str, Path] | None = None,
                      own_file: Callable[[str], bool] | None = None) -> None:
    """Raise :class:`OverwriteRefused` (one line, the reason) unless the existing ``target`` may be
    replaced: it must not be the file system root, the home or current directory or hold one of
    them, must not be an input (``inputs``: what → directory), hold one or lie inside one, and
    must be a directory that is empty or a previous output of this kind: it holds the ``marker``
    metadata file (a JSON object written by dare_lab) and only the files such an output has (the
    ``files`` list the metadata records, or, for older metadata, names ``own_file`` accepts)."""
    t = target
    why = f"refusing to overwrite {t}:"
    specials = [("the file system root", Path(t.anchor)), ("the home directory", Path.home().resolve()),
                ("the current working directory", Path.cwd().resolve())]
    for what, place in specials:
        if t == place:
            raise OverwriteRefused(f"{why} it is {what}")
        if _inside(place, t):
            raise OverwriteRefused(f"{why} it contains {what} ({place})")
    for what, place in (inputs or {}).items():
        place = Path(place).expanduser().resolve()
        if t == place:
            raise OverwriteRefused(f"{why} it is an input ({what})")
        if _inside(place, t):
            raise OverwriteRefused(f"{why} it contains an input ({what}: {place})")
        if _inside(t, place):
            raise OverwriteRefused(f"{why} it lies inside an input ({what}: {place})")
    if not t.is_dir():
        raise OverwriteRefused(f"{why} it is not a directory")
    entries = sorted(os.listdir(t))
    if not entries:
        return
    if marker is None:
        raise OverwriteRefused(f"{why} it is a non-empty directory ({len(entries)} entries)")
    meta_file = t / marker
    if not meta_file.is_file():
        raise OverwriteRefused(f"{why} it is a non-empty directory that is not a dare_lab output (no {marker})")
    try:
        meta = json.loads(meta_file.read_bytes())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not ("method" in meta or "format" in meta):
        raise OverwriteRefused(f"{why} its {marker} is not dare_lab metadata")
    listed = meta.get("files")
    allowed = (lambda n: n in listed) if isinstance(listed, list) else (own_file or (lambda n: n == marker))
    for name in entries:
        if not allowed(name) or not (t / name).is_file() or (t / name).is_symlink():
            raise OverwriteRefused(f"{why} it holds {name!r}, which is not part of a dare_lab output "
                                   f"(move it away or choose another output path)")


class AtomicDir:
    """A temporary sibling directory renamed onto ``target`` only by :meth:`commit`.

    Used as a context manager: any exception removes the temporary directory, so a failed
    run leaves either the previous complete output or nothing. With ``overwrite`` an existing
    target is replaced only if :func:`check_replaceable` accepts it (checked here, before any
    work, and again just before the commit).
    """

    def __init__(self, target: str | os.PathLike, overwrite: bool = False, *, marker: str | None = None,
                 inputs: Mapping[str, Path] | Sequence[Path] | None = None,
                 own_file: Callable[[str], bool] | None = None):
        self.target = Path(target).expanduser().resolve()
        if inputs is not None and not isinstance(inputs, Mapping):
            inputs = {f"input {i}: {p}": Path(p) for i, p in enumerate(inputs)}
        self.guard = {"marker": marker, "inputs": inputs, "own_file": own_file}
        self.overwrite = overwrite
        if os.path.lexists(self.target) and not overwrite:
            raise self._exists()
        if os.path.lexists(self.target):
            check_replaceable(self.target, **self.guard)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.committed = False

    def _exists(self) -> FileExistsError:
        return FileExistsError(f"output directory already exists: {self.target} (output.overwrite=true replaces "
                               "a previous dare_lab output; Python: overwrite=True)")

    def __enter__(self) -> Path:
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> Path:
        for f in self.tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if os.path.lexists(self.target):
            if not self.overwrite:   # appeared while this run worked (another process)
                raise self._exists()
            check_replaceable(self.target, **self.guard)   # still a previous output (another process)?
            if exchange(self.tmp, self.target):     # one atomic step: the target is never missing
                shutil.rmtree(self.tmp, ignore_errors=True)   # now holds the previous output
            else:
                trash = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(self.target, trash)
                os.replace(self.tmp, self.target)
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)
        _fsync_dir(self.target.parent)
        self.committed = True
        return self.target

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
