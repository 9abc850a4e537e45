"""The streamed merge: every tensor through ``MergeMethod.merge_tensor``, chunk by chunk.

Merged tensors stream through :class:`dare_lab.engine.streamed.StreamedMerge`: inputs are
``pread`` per chunk (nothing mapped), output chunks ``pwrite``-n in place into pre-sized shards,
so peak memory is the interpreter plus a few chunk buffers per worker thread (TIES adds its
tensor's output in a staging buffer, patched there once the majority sign is known, and |δ| of
one tensor in fp32 where its threshold is searched over the whole tensor). Results are bit for bit those of the
whole-tensor path (:func:`_merge_one_reference`), which also handles NaN/Inf errors.
TIES with ``trim_scope: model`` first finds each model's whole-model threshold in streamed passes
(:mod:`dare_lab.engine.global_trim`), then merges every tensor on the whole-tensor path with those
thresholds. See docs/performance.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import torch

from dare_lab.engine.lora import is_adapter_dir, open_model
from dare_lab.engine.global_trim import RESTART, FixedTrimMerge, ModelTrim, StreamedDeltas, model_thresholds
from dare_lab.engine.plan import TensorPlan, plan_merge
from dare_lab.engine.scope import Scope
from dare_lab.engine.sources import CheckpointReader, ChunkReader, StateDictSource, TensorSource
from dare_lab.engine.validate import validate_output, validate_pool
from dare_lab.engine.writer import AtomicDir, ShardedSafetensorsWriter
from dare_lab.engine import warmup
from dare_lab.ops.method import MergeMethod
from dare_lab.engine.streamed import CHUNK, NonFiniteChunk, StreamedMerge, workspace

_COPY_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
MERGE_MARKER = "dare_lab_merge.json"
_SKIP_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", MERGE_MARKER)
_SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def _own_output_file(name: str) -> bool:
    """A file name a merged output of this engine can hold (for outputs whose metadata predates
    its ``files`` list): shards, index, metadata, model card, files copied from the base."""
    return bool(_SHARD.fullmatch(name)) or name in ("model.safetensors.index.json", MERGE_MARKER, "README.md") \
        or (name.endswith(_COPY_SUFFIXES) and not name.startswith("."))

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class NonFiniteError(ValueError):
    """NaN or Inf found in an input tensor or a delta."""


def as_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 / None → torch dtype (None stays None)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


def _target_dtype(plan: TensorPlan, out_dtype: torch.dtype | None) -> torch.dtype:
    return out_dtype if (out_dtype is not None and plan.base_dtype.is_floating_point) else plan.base_dtype


def _merge_one_reference(plan: TensorPlan, base: TensorSource, models: Mapping[str, TensorSource], method: MergeMethod,
                         dtype: torch.dtype, out_dtype: torch.dtype | None,
                         thresholds: Mapping[str, float] | None = None) -> torch.Tensor:
    """The whole-tensor path: load every input tensor, ``method.merge_tensor``, cast.
    ``thresholds``: whole-model TIES thresholds (``trim_scope: model``)."""
    target = _target_dtype(plan, out_dtype)
    if not plan.merge:
        t = base.get(plan.name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"NaN/Inf in tensor {plan.name!r} of the base model {base.label!r}")
        return t.to(target)
    theta0, thetas = _load_inputs(plan, base, models, dtype)
    if thresholds is None:
        merged = method.merge_tensor(plan.name, theta0, thetas)
    else:
        merged = method.merge_tensor(plan.name, theta0, thetas, thresholds=thresholds)
    if not torch.isfinite(merged).all():
        raise NonFiniteError(f"NaN/Inf in the merged tensor {plan.name!r}")
    return merged.to(target)


def _load_inputs(plan: TensorPlan, base: TensorSource, models: Mapping[str, TensorSource],
                 dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """θ_PRE and every θ_k of one merged tensor in the compute dtype, checked finite."""
    theta0 = base.get(plan.name, dtype)
    if not torch.isfinite(theta0).all():
        raise NonFiniteError(f"NaN/Inf in tensor {plan.name!r} of the base model {base.label!r}")
    thetas: dict[str, torch.Tensor] = {}
    for m, src_name in plan.sources.items():
        t = models[m].get(src_name, dtype)
        if plan.rows is not None:
            t = t[: plan.rows]
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"NaN/Inf in the delta of tensor {plan.name!r} of model {m!r}")
        thetas[m] = t
    return theta0, thetas


def _whole_model_trim(plans: list[TensorPlan], base: TensorSource, models: Mapping[str, TensorSource],
                      method: MergeMethod, dtype: torch.dtype, threads: int) -> ModelTrim:
    """TIES ``trim_scope: model``: each model's threshold over all its merged tensors, found in
    streamed passes over the tensors, chunk by chunk (the streamed merge's reads and sparsifier
    draws; sparsifiers it does not stream, and NaN/Inf, take the whole-tensor loads)."""
    if getattr(method, "overrides", None):
        raise ValueError("TIES trim_scope=model does not combine with method.overrides (per-model / per-tensor "
                         "knobs); use trim_scope=tensor or drop the overrides")
    names = list(models)

    def whole(plan: TensorPlan):
        theta0, thetas = _load_inputs(plan, base, models, dtype)   # raises the documented NaN/Inf errors
        yield from zip(thetas, method.sparsified_deltas(plan.name, theta0, thetas))

    def deltas_of(plan: TensorPlan):
        if not _streams(plan, method):
            yield from whole(plan)
            return
        readers = [_chunk_reader(base, plan.name, "in_base")]
        try:
            readers += [_chunk_reader(models[m], plan.sources[m], f"in_{i}") for i, m in enumerate(names)]
            job = StreamedDeltas(method, plan.name, math.prod(plan.shape), names, readers[0], readers[1:], dtype,
                                 _CHUNK or CHUNK)
            try:
                for k, d in job.pieces():
                    yield names[k], d
                return
            except NonFiniteChunk:
                pass
        finally:
            for r in readers:
                r.close()
        yield RESTART
        yield from whole(plan)

    merged = [p for p in plans if p.merge]
    return model_thresholds(deltas_of, merged, list(models), method.merger.retain_ratio, dtype,
                            run=lambda ps, work: _run_all(list(ps), work, threads))


# Streamed fast path (``dare_lab.engine.streamed``); tests switch it off to compare with the reference.
_FAST = True
_CHUNK = None   # entries per chunk (None: dare_lab.engine.streamed.CHUNK); tests shrink it


def _streams(plan: TensorPlan, method: MergeMethod) -> bool:
    """Whether this tensor goes through the streamed fast path (else the whole-tensor path)."""
    return (_FAST and plan.merge and getattr(method, "streamable", True) and method.sparsifier.streamed
            and getattr(method.merger, "streamed", True))


def _chunk_reader(src: TensorSource, name: str, key: str):
    if hasattr(src, "chunk_reader"):
        return src.chunk_reader(name, key)
    return ChunkReader.of_tensor(src.get(name))


def _into(flat: torch.Tensor) -> tuple[Callable[[int, torch.Tensor], None], Callable[[torch.Tensor, torch.Tensor], None]]:
    """``emit`` / ``patch`` callbacks for :meth:`StreamedMerge.run` that merge into the flat
    in-memory tensor ``flat`` (cast to its dtype); a chunk already in place (``emit_into``) is kept."""
    def emit(s: int, chunk: torch.Tensor) -> None:
        dst = flat[s: s + chunk.numel()]
        if chunk.data_ptr() != dst.data_ptr() or chunk.dtype != dst.dtype:
            dst.copy_(chunk)

    def patch(idx: torch.Tensor, vals: torch.Tensor) -> None:
        flat[idx] = vals.to(flat.dtype)
    return emit, patch


def _merge_one(plan: TensorPlan, base: TensorSource, models: Mapping[str, TensorSource], method: MergeMethod,
               dtype: torch.dtype, out_dtype: torch.dtype | None,
               writer: ShardedSafetensorsWriter | None = None,
               thresholds: Mapping[str, float] | None = None) -> torch.Tensor | None:
    """Merge one tensor; with ``writer`` it is written (returns None), else returned.
    ``thresholds`` (TIES ``trim_scope: model``): each model's whole-model threshold.

    Merged tensors stream chunk by chunk through :class:`StreamedMerge` (inputs ``pread`` per
    chunk, output chunks ``pwrite``-n in place); a NaN/Inf anywhere sends the tensor back through
    :func:`_merge_one_reference`, which raises the documented error.
    """
    thresholds = thresholds if plan.merge else None
    if not _streams(plan, method):  # per-model/tensor knobs: reference path
        t = _merge_one_reference(plan, base, models, method, dtype, out_dtype, thresholds)
        if writer is None:
            return t
        writer.write(plan.name, t)
        return None
    target = _target_dtype(plan, out_dtype)
    n = math.prod(plan.shape)
    names = list(plan.sources)
    readers = [_chunk_reader(base, plan.name, "in_base")]
    try:
        readers += [_chunk_reader(models[m], plan.sources[m], f"in_{i}") for i, m in enumerate(names)]
        if thresholds is None:
            job = StreamedMerge(method, plan.name, n, names, readers[0], readers[1:], dtype, _CHUNK or CHUNK)
        else:   # TIES trim_scope: model — the streamed TIES with each model's whole-model cut
            job = FixedTrimMerge(method, plan.name, n, names, readers[0], readers[1:], dtype, _CHUNK or CHUNK,
                                 thresholds=[thresholds[m] for m in names])
        if writer is not None and method.merger.kind == "ties":
            # TIES patches entries once the tensor's majority sign is known: merge into the
            # writer's staging buffer, patch there, write once (no read-back of written data)
            staged = writer.staged(plan.name)
            job.emit_into = staged
            try:
                job.run(*_into(staged))
            except NonFiniteChunk:
                writer.write(plan.name, _merge_one_reference(plan, base, models, method, dtype, out_dtype, thresholds))
                return None
            _complete_digests(readers)
            writer.write_staged(plan.name, staged.view(plan.shape))
            return None
        if writer is not None:
            job.emit_dtype = target

            def emit(s: int, chunk: torch.Tensor) -> None:
                if chunk.dtype != target:
                    chunk = workspace("out", job.chunk, target)[: chunk.numel()].copy_(chunk)
                writer.write_range(plan.name, s, chunk)

            def patch_file(idx: torch.Tensor, vals: torch.Tensor) -> None:
                writer.patch(plan.name, idx, vals)
            try:
                job.run(emit, patch_file)
            except NonFiniteChunk:
                writer.write(plan.name, _merge_one_reference(plan, base, models, method, dtype, out_dtype, thresholds))
                return None
            _complete_digests(readers)
            writer.done(plan.name)
            return None
        result = torch.empty(n, dtype=target)
        job.emit_dtype = target
        if method.merger.kind == "ties":
            job.emit_into = result
        try:
            job.run(*_into(result))
            _complete_digests(readers)
            result = result.view(plan.shape)
        except NonFiniteChunk:
            result = _merge_one_reference(plan, base, models, method, dtype, out_dtype, thresholds)
    finally:
        for r in readers:
            r.close()
    return result


def _complete_digests(readers) -> None:
    """After a streamed tensor: each file-backed input reader hands its source the xxh3_128 of the
    tensor's bytes, hashed as they were read (the content fingerprint in ``dare_lab_merge.json``)."""
    for r in readers:
        done = getattr(r, "complete_digest", None)
        if done is not None:
            done()


def _run_all(plans: list[TensorPlan], work: Callable[[TensorPlan], torch.Tensor | None], threads: int,
             tick: Callable[[], None] | None = None) -> list[torch.Tensor | None]:
    """Run ``work`` over all plans on ``threads`` threads; results in plan order.

    Tensors start largest first (so no thread is left with a big one at the end); after a
    failure nothing new starts and the error of the first failing tensor in plan order is raised.
    """
    results: list[torch.Tensor | None] = [None] * len(plans)
    if threads <= 1:
        for i, p in enumerate(plans):
            results[i] = work(p)
            if tick:
                tick()
        return results
    order = sorted(range(len(plans)), key=lambda i: -math.prod(plans[i].shape))
    errors: dict[int, BaseException] = {}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dare-lab-merge") as pool:
        futures = {pool.submit(work, plans[i]): i for i in order}
        for fut in as_completed(futures):
            if fut.cancelled():
                continue
            i = futures[fut]
            exc = fut.exception()
            if exc is not None:
                errors[i] = exc
                for other in futures:
                    other.cancel()
                continue
            results[i] = fut.result()
            if tick:
                tick()
    if errors:
        raise errors[min(errors)]
    return results


class _TorchThreads:
    """One intra-op torch thread per merge worker while merging (restored afterwards).

    The workers are the parallelism: chunk-sized ops gain nothing from OpenMP, and its
    barriers stall badly when the cores are shared (measured: 10x slower under load).
    """

    def __init__(self, workers: int):
        self.workers, self.saved = workers, None

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            torch.set_num_threads(self.saved)


def _open(ref: str | os.PathLike | TensorSource, label: str, base: TensorSource | None = None) -> TensorSource:
    """A source as is; a PEFT LoRA adapter directory (pool members only) as θ_PRE + scale·B·A
    over ``base`` (:mod:`dare_lab.engine.lora`); else a lazy checkpoint reader."""
    if hasattr(ref, "get") and hasattr(ref, "names"):
        return ref  # already a source
    if is_adapter_dir(ref):
        return open_model(ref, label, base)
    return CheckpointReader(ref, label=label)


class ModelConfigError(ValueError):
    """A model's ``config.json`` that exists but cannot be used (one line, names the model)."""


def _model_type(src: TensorSource) -> str | None:
    path = getattr(src, "path", None)
    cfg = Path(path) / "config.json" if path is not None else None
    if cfg is None or not os.path.lexists(cfg):
        return None
    if cfg.is_dir():
        raise ModelConfigError(f"model {src.label!r}: config.json is a directory, expected a JSON file ({cfg})")
    if not cfg.is_file():
        raise ModelConfigError(f"model {src.label!r}: config.json is not a regular file ({cfg})")
    try:
        data = json.loads(cfg.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelConfigError(f"model {src.label!r}: config.json is not valid JSON") from None
    except OSError as exc:
        raise ModelConfigError(f"model {src.label!r}: config.json cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"model {src.label!r}: config.json is not a JSON object (it holds a {_json_kind(data)})")
    kind = data.get("model_type")
    if kind is not None and not isinstance(kind, str):
        raise ModelConfigError(f"model {src.label!r}: config.json model_type is not a string ({json.dumps(kind)[:60]})")
    return kind


def _json_kind(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def check_architectures(base: TensorSource, models: Mapping[str, TensorSource]) -> None:
    """Fail fast when a fine-tuned model's config names another architecture than the base's."""
    expected = _model_type(base)
    for m, src in models.items():
        got = _model_type(src)
        if expected and got and got != expected:
            raise ValueError(f"architecture mismatch: base is {expected!r}, model {m!r} is {got!r}")


def canonical_order(method: MergeMethod, names: list[str]) -> tuple[MergeMethod, list[str]]:
    """The models in sorted name order, and the method with its per-model weights in that order.

    Every sum over models (task arithmetic, TIES' election and disjoint mean, averaging) runs in
    this order on every path, so a pool listed in any order merges to the same bits (float
    addition is not associative: with K >= 3 the listing order changed the low bits). Positional
    weights belong to the models in their listing order and are carried along; name-keyed
    weights (a mapping model → w) must name exactly the pool's models."""
    order = sorted(names)
    w = method.merger.weights
    if w is None:
        return method, order
    if isinstance(w, Mapping):
        missing, extra = [m for m in order if m not in w], sorted(set(map(str, w)) - set(order))
        if missing or extra:
            raise ValueError(f"method weights must name exactly the pool's models {order}: "
                             + (f"no weight for {missing[0]!r}" if missing else f"weight for unknown model {extra[0]!r}"))
        by_name = {str(m): float(v) for m, v in w.items()}
    else:
        if len(w) != len(names):
            raise ValueError(f"got {len(w)} model weights for {len(names)} models")
        by_name = {m: float(v) for m, v in zip(names, w)}
    merger = replace(method.merger, weights=tuple(by_name[m] for m in order))
    return replace(method, merger=merger), order


def merge_models(
    base: str | os.PathLike | TensorSource,
    models: Mapping[str, str | os.PathLike | TensorSource],
    method: MergeMethod,
    out_dir: str | os.PathLike | None = None,
    *,
    scope: Scope | None = None,
    dtype: str | torch.dtype = torch.float32,
    out_dtype: str | torch.dtype | None = None,
    threads: int = 2,
    max_shard_size: int | str = "5GB",
    vocab_policy: str = "error",
    overwrite: bool = False,
    progress: bool = False,
) -> Path | dict[str, torch.Tensor]:
    """Merge ``models`` (name → HF dir / hub id / source) into ``base`` with ``method``.

    With ``out_dir`` writes a sharded safetensors HF directory (config and tokenizer copied
    from the base, a model card and ``dare_lab_merge.json`` metadata) atomically and returns
    its path; with ``out_dir=None`` returns the merged state dict in memory.
    ``dtype`` is the compute dtype (float32 or float64); ``out_dtype`` the saved dtype
    (default: each tensor keeps the base model's storage dtype).
    """
    dtype, out_dtype = as_dtype(dtype), as_dtype(out_dtype)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute dtype must be float32 or float64, got {dtype}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    warmup.resolved_mode(threads)   # a bad DARE_LAB_COMPILE fails before anything is read
    scope = scope or Scope()
    base_src = _open(base, "base")
    srcs = {str(m): _open(ref, str(m), base_src) for m, ref in models.items()}
    method, order = canonical_order(method, list(srcs))
    srcs = {m: srcs[m] for m in order}   # every path accumulates in this order: listing order cannot change bits
    for src in (base_src, *srcs.values()):
        if hasattr(src, "reset_digests"):
            src.reset_digests()   # content fingerprints cover what this merge reads
    check_architectures(base_src, srcs)
    plans = plan_merge(base_src, srcs, scope, vocab_policy)
    validate_pool(base_src, srcs, plans)  # file layouts and dtypes, before any heavy work
    atomic = None
    if out_dir is not None:   # an existing output is checked (may it be replaced?) before any merging
        inputs = {("base model" if x is base_src else f"model {m!r}"): Path(x.path)
                  for m, x in [("base", base_src), *srcs.items()] if getattr(x, "path", None) is not None}
        atomic = AtomicDir(out_dir, overwrite=overwrite, marker=MERGE_MARKER, inputs=inputs, own_file=_own_output_file)
    if hasattr(method, "check_models"):
        method.check_models(list(srcs))
    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plans), desc="merge", unit="tensor")
    tick = bar.update if bar is not None else None
    # numba compiles (or loads) the loops this merge needs, in the background where a core is
    # free for it (tensors take the torch path, same bits, until it is done)
    compiled = warmup.start(plans, base_src, srcs, method, dtype, lambda p: _target_dtype(p, out_dtype),
                            lambda p: _streams(p, method), threads)
    try:
        trim = thr = None
        if getattr(method.merger, "trim_scope", "tensor") == "model":
            with _TorchThreads(threads):
                trim = _whole_model_trim(plans, base_src, srcs, method, dtype, threads)
            thr = trim.thresholds
        if out_dir is None:
            with _TorchThreads(threads):
                results = _run_all(plans, lambda p: _merge_one(p, base_src, srcs, method, dtype, out_dtype,
                                                               thresholds=thr), threads, tick)
            compiled()
            return {p.name: t for p, t in zip(plans, results)}
        entries = [(p.name, p.shape, _target_dtype(p, out_dtype)) for p in plans]
        with atomic as tmp:
            writer = ShardedSafetensorsWriter(tmp, entries, max_shard_size)
            try:
                with _TorchThreads(threads):
                    _run_all(plans, lambda p: _merge_one(p, base_src, srcs, method, dtype, out_dtype, writer, thr),
                             threads, tick)
                compiled()
                writer.finish()
            finally:
                writer.close()
            base_dir = getattr(base_src, "path", None)
            if base_dir is not None:
                _copy_model_files(Path(base_dir), tmp, out_dtype)
            meta = _metadata(method, base_src, srcs, scope, dtype, out_dtype, plans, time.perf_counter() - started)
            if trim is not None:
                meta["ties_trim"] = trim.describe()
            meta["files"] = sorted({f.name for f in tmp.iterdir()} | {"README.md", MERGE_MARKER})
            (tmp / MERGE_MARKER).write_text(json.dumps(meta, indent=2, default=str))
            (tmp / "README.md").write_text(model_card(meta))
            validate_output(tmp, entries)  # shards, headers and index re-read from disk before the rename
            return atomic.commit()
    finally:
        if bar is not None:
            bar.close()


def merge_state_dicts(
    base: Mapping[str, torch.Tensor],
    models: Mapping[str, Mapping[str, torch.Tensor]],
    method: MergeMethod,
    *,
    scope: Scope | None = None,
    dtype: str | torch.dtype = torch.float32,
    out_dtype: str | torch.dtype | None = None,
    vocab_policy: str = "error",
) -> dict[str, torch.Tensor]:
    """In-memory merge of state dicts: the same plan and formula as :func:`merge_models`."""
    return merge_models(StateDictSource(base, "base"), {m: StateDictSource(sd, m) for m, sd in models.items()},
                        method, None, scope=scope, dtype=dtype, out_dtype=out_dtype, threads=1,
                        vocab_policy=vocab_policy)


def _copy_model_files(base_dir: Path, out: Path, out_dtype: torch.dtype | None) -> None:
    """Copy config, generation config and tokenizer files; record the saved dtype in config."""
    for f in sorted(base_dir.iterdir()):
        if f.is_file() and f.suffix in _COPY_SUFFIXES and f.name not in _SKIP_FILES:
            shutil.copyfile(f, out / f.name)
    cfg_file = out / "config.json"
    if out_dtype is not None and cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
        name = str(out_dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = name
        cfg_file.write_text(json.dumps(cfg, indent=2))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import dare_lab

    try:
        tf = version("transformers")  # not ``import transformers``: that alone costs seconds
    except PackageNotFoundError:
        tf = "not installed"
    return {"dare_lab": dare_lab.__version__, "torch": torch.__version__, "transformers": tf}


def _metadata(method: MergeMethod, base: TensorSource, models: Mapping[str, TensorSource], scope: Scope,
              dtype: torch.dtype, out_dtype: torch.dtype | None, plans: list[TensorPlan], seconds: float) -> dict:
    fp = lambda s: s.fingerprint() if hasattr(s, "fingerprint") else "in-memory"  # noqa: E731

    def content(s: TensorSource, names) -> dict:
        return s.content_fingerprint(names) if hasattr(s, "content_fingerprint") else {"content_xxh3_128": "in-memory"}

    described = method.describe()
    if method.merger.weights is not None:   # name-keyed: the positional tuple is in sorted-name order
        described["merger"]["weights"] = dict(zip(models, method.merger.weights))
    read = {m: [p.sources[m] for p in plans if p.merge and m in p.sources] for m in models}
    return {
        "format": "dare_lab_merge/1",
        "method": described,
        "base": {"ref": getattr(base, "ref", base.label), "index_sha256": fp(base), **content(base, [p.name for p in plans])},
        "models": {m: {"ref": getattr(s, "ref", s.label), "index_sha256": fp(s), **content(s, read[m])}
                   for m, s in models.items()},
        "accumulation_order": list(models),
        "scope": {"include": list(scope.include), "exclude": list(scope.exclude), "linear_only": scope.linear_only},
        "compute_dtype": str(dtype), "out_dtype": str(out_dtype) if out_dtype else "same as base",
        "tensors": {"merged": sum(p.merge for p in plans), "copied_from_base": sum(not p.merge for p in plans)},
        "seconds": round(seconds, 3),
        "versions": _versions(),
    }


def model_card(meta: dict) -> str:
    """A short README naming the method, its parameters, the inputs and the seed."""
    m = meta["method"]
    lines = [
        "---", "tags: [merge, dare, dare_lab]", "---", "",
        f"# Merged model: {m['name']}", "",
        "Made with [dare_lab](https://arxiv.org/abs/2311.03099) (DARE: drop and rescale deltas, then merge).", "",
        f"- base (θ_PRE): `{meta['base']['ref']}`",
        *[f"- fine-tuned `{k}`: `{v['ref']}`" for k, v in meta["models"].items()],
        f"- sparsifier: {m['sparsifier']}",
        f"- merger: {m['merger']}",
        f"- seed: {m['seed']}",
        f"- compute dtype: {meta['compute_dtype']}; saved dtype: {meta['out_dtype']}",
        f"- tensors merged: {meta['tensors']['merged']}; copied from base: {meta['tensors']['copied_from_base']}",
        f"- versions: {meta['versions']}", "",
    ]
    return "\n".join(lines)
