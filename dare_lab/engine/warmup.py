"""Compile the merge's numba loops in the background while the torch path merges.

Why: a fresh install's first merge used to wait ~30 s on its first tensor while numba compiled
the loops it needed. The compiled loops and the torch code give the same bits (tested in
``tests/test_perf_equivalence.py``), so nothing forces a merge to wait: merge_models starts one
background thread that *rehearses* each kind of tensor the merge will stream (same method, same
number of models, same storage and output dtypes; synthetic data), which compiles exactly the
loop specialisations the merge needs, or loads them from numba's on-disk cache (``cache=True``,
keyed by numba on the source file, the signature and the CPU). While it runs, tensors take the
torch path; tensors that start after it finishes take the compiled loops. A process whose merge
ends first waits for the compile before it exits (once per install and kind of merge).

Once a kind has been rehearsed, a small marker beside numba's cache (keyed by the numba version,
the kernels' source files, the CPU, the method and the kind) says its loops load from disk in
about a second: later merges of that kind skip the background path and take the compiled loops
from the first tensor (the torch path of a large first tensor, e.g. an LLM's embedding, is slower
and holds whole-tensor temporaries). A stale or missing marker only costs speed, never bits.

The background compile pays only where a core is free for it. With no core beyond the merge's
threads it shares them: the compile runs slower and the threads it slows are on the slower torch
path, so the first merge takes longer than compiling first (measured on 2 cores, 2 threads, 1 B
pool: TIES 9.08 vs 8.05 s, DARE + TA 5.08 vs 4.38 s, DARE + TIES 7.08 vs 5.98 s, task arithmetic
2.90 vs 2.97 s). :data:`MODE` ``auto`` (the default) therefore compiles in the background only
when the process may use more cores than the merge has threads, and otherwise waits.

``DARE_LAB_COMPILE`` (or :data:`MODE`) = ``background`` / ``wait`` forces one behaviour. ``wait``:
the first tensor compiles what it needs and every tensor takes the compiled loops (the tests of
the compiled path use it).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from dare_lab.engine import streamed
from dare_lab.engine.plan import TensorPlan
from dare_lab.engine.sources import ChunkReader, TensorSource
from dare_lab.ops.method import MergeMethod

log = logging.getLogger(__name__)

MODES = ("auto", "background", "wait")
MODE = os.environ.get("DARE_LAB_COMPILE", "auto")
"""``auto`` (default: ``background`` when a core is free beyond the merge's threads, else
``wait``), ``background`` or ``wait``."""
SMALL = 8192
streamed.defer_while_warming = lambda: MODE != "wait"   # "wait": every tensor takes the compiled loops


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolved_mode(threads: int) -> str:
    """:data:`MODE` for a merge on ``threads`` threads: ``auto`` becomes ``background`` when a
    core is free for the compile (more available cores than threads), else ``wait``."""
    if MODE not in MODES:
        raise ValueError(f"DARE_LAB_COMPILE must be one of {', '.join(MODES)}, got {MODE!r}")
    if MODE != "auto":
        return MODE
    return "background" if available_cores() > threads else "wait"

_lock = threading.Lock()
_done: set[tuple] = set()          # rehearsal keys compiled (or loaded) in this process
_history: list[dict] = []          # what each rehearsal did, for benchmarks and tests


def _kind(plan: TensorPlan, base: TensorSource, models: Mapping[str, TensorSource],
          target: torch.dtype) -> tuple:
    """What decides the compiled specialisations of one tensor: its dtypes and whether it is
    large enough for the sampled-bracket threshold pass."""
    dtypes = tuple(models[m].dtype(src) for m, src in plan.sources.items())
    big = math.prod(plan.shape) >= streamed.BRACKET_MIN
    return base.dtype(plan.name), dtypes, target, big


def _method_key(method: MergeMethod) -> tuple:
    return repr(method.sparsifier), repr(method.merger)


def marker_dir() -> Path:
    """Where the warm markers live: numba's cache directory of the kernels (``NUMBA_CACHE_DIR``
    or the kernels' ``__pycache__``), so that removing numba's cache removes them too;
    ``DARE_LAB_WARM_DIR`` overrides it (tests)."""
    env = os.environ.get("DARE_LAB_WARM_DIR") or os.environ.get("NUMBA_CACHE_DIR")
    return Path(env) if env else Path(streamed.__file__).resolve().parent / "__pycache__"


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _code_identity() -> tuple:
    """The numba version and the kernels' source files (size, mtime): once per process."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        numba_version = version("numba")
    except PackageNotFoundError:
        numba_version = "none"
    here = Path(streamed.__file__).resolve().parent
    return numba_version, tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                for f in (here / "kernels.py", here / "streamed.py"))


def _marker(key: tuple) -> Path:
    digest = hashlib.sha256(repr((_code_identity(), _cpu_name(), key)).encode()).hexdigest()[:24]
    return marker_dir() / f"dare_lab_warm-{digest}"


def _is_warm(key: tuple) -> bool:
    try:
        return _marker(key).exists()
    except OSError:
        return False


def _mark_warm(key: tuple) -> None:
    try:
        m = _marker(key)
        m.parent.mkdir(parents=True, exist_ok=True)
        m.touch()
    except OSError:  # a read-only install: the background path stays the default
        pass


def _rehearse(method: MergeMethod, kind: tuple, dtype: torch.dtype) -> None:
    """Stream one synthetic tensor of this kind through :class:`StreamedMerge` (compiled loops)."""
    base_dtype, model_dtypes, target, big = kind
    n = streamed.BRACKET_MIN if big else SMALL
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=gen) * 0.02
    thetas = [(base + torch.randn(n, generator=gen) * 1e-3).to(d) for d in model_dtypes]
    names = [f"warmup{k}" for k in range(len(model_dtypes))]
    job = streamed.StreamedMerge(method, "warmup", n, names, ChunkReader.of_tensor(base.to(base_dtype)),
                                 [ChunkReader.of_tensor(t) for t in thetas], dtype)
    job.emit_dtype = target
    out = torch.empty(n, dtype=target)

    def emit(s: int, chunk: torch.Tensor) -> None:
        out[s: s + chunk.numel()].copy_(chunk)

    def patch(idx: torch.Tensor, vals: torch.Tensor) -> None:
        out[idx] = vals.to(out.dtype)

    try:
        job.run(emit, patch)
    except streamed.NonFiniteChunk:  # pragma: no cover - synthetic data is finite
        pass


def _worker(jobs: list[tuple[tuple, MergeMethod, tuple, torch.dtype]]) -> None:
    streamed.mark_rehearsal_thread()
    try:
        if streamed.compiled_kernels() is None:  # numba does not import here: the torch path it is
            return
        for key, method, kind, dtype in jobs:
            t0 = time.perf_counter()
            try:
                _rehearse(method, kind, dtype)
                _mark_warm(key)
            except Exception as exc:  # noqa: BLE001 - a failed rehearsal only costs speed
                log.debug("numba warm-up of %s failed: %s", kind, exc)
            with _lock:
                _done.add(key)
                _history.append({"kind": repr(kind), "seconds": time.perf_counter() - t0})
    finally:
        streamed.release_workspace()
        streamed.warming_done()


def _nothing() -> None:
    return None


def start(plans: Iterable[TensorPlan], base: TensorSource, models: Mapping[str, TensorSource], method: MergeMethod,
          dtype: torch.dtype, target_of, streams, threads: int = 1) -> Callable[[], None]:
    """Start the background rehearsal for the streamed tensors of a merge, unless there is
    nothing to compile or :func:`resolved_mode` says to wait (the first tensors then compile
    what they need). Returns what the merge calls once it has succeeded: after a merge that
    waited, it marks the kinds the merge compiled warm (as a rehearsal does), so that a later
    merge of those kinds on more cores does not rehearse them again.

    ``target_of(plan)`` is a tensor's saved dtype, ``streams(plan)`` whether it streams,
    ``threads`` the merge's threads.
    """
    mode = resolved_mode(threads)
    if not streamed.FUSED or dtype != torch.float32:
        return _nothing
    mkey = _method_key(method)
    jobs, seen = [], set()
    for plan in plans:
        if not streams(plan):
            continue
        kind = _kind(plan, base, models, target_of(plan))
        key = (mkey, kind)
        if key in seen or key in _done:
            continue
        seen.add(key)
        jobs.append((key, method, kind, dtype))
    if not jobs or all(_is_warm(key) for key, *_ in jobs):
        return _nothing   # nothing to compile, or numba's cache has it: the compiled loops from the start
    if mode == "wait":
        def compiled() -> None:
            for key, *_ in jobs:
                _mark_warm(key)
            with _lock:
                _done.update(key for key, *_ in jobs)
        return compiled
    streamed.warming_started()
    # not a daemon: a process whose merge finished first waits for the compile at exit (which also
    # completes numba's on-disk cache for the next run); a daemon thread still inside LLVM when
    # the interpreter exits aborts the process
    threading.Thread(target=_worker, args=(jobs,), name="dare-lab-numba-warmup", daemon=False).start()
    return _nothing


def history() -> list[dict]:
    with _lock:
        return list(_history)
