"""Delta compression: store a model as its DARE-sparsified delta against a base, rebuild it later.

A fine-tuned model θ_k is kept as the positions DARE keeps (mask seeded per (seed, model,
tensor) exactly as in a merge) and θ_k's own values there, in its storage dtype:

    <T>::gaps    int16   gap before each kept entry − 32768 (gaps ≤ 65535; else <T>::index int64)
    <T>::values  θ_k[kept] in the checkpoint's dtype (bf16: 2 bytes)

so a kept entry costs 2 + 2 bytes instead of 2 bytes for every entry: a ratio ≈ 2(1−p) of the
dense bf16 checkpoint (0.2 at p = 0.9, 0.02 at p = 0.99). The delta itself is recomputed at
rebuild time in float32, exactly: δ̂ = (θ_k − θ_PRE)/(1−p) on kept entries, 0 elsewhere.

:func:`rebuild` writes θ_PRE + λ Σ_k δ̂_k — for one store the DARE model itself, for several
the DARE + task-arithmetic merge — bit for bit equal to ``merge_models`` with the same seed,
sampler and drop rate (tested).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dare_lab.engine.plan import plan_merge
from dare_lab.engine.scope import Scope
from dare_lab.engine.sources import CheckpointReader
from dare_lab.engine.writer import AtomicDir, ShardedSafetensorsWriter
from dare_lab.ops.seeding import tensor_generator
from dare_lab.ops.sparsify import MaskStream, check_drop_rate

FORMAT = "dare_lab.sparse_delta/1"
_CHUNK = 1 << 20


def base_id(src: CheckpointReader) -> str:
    """Identity of a base checkpoint: its index plus the first MiB of every weight file."""
    import hashlib

    h = hashlib.sha256(src.fingerprint().encode())
    for f in sorted({src._file_of[n] for n in src.names()}):
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def _kept_indices(n: int, p: float, seed: int, model: str, tensor: str, sampler: str) -> torch.Tensor:
    stream = MaskStream(p, tensor_generator(seed, model, tensor), sampler, n)
    parts = []
    for s in range(0, n, _CHUNK):
        m = min(_CHUNK, n - s)
        if stream.geo is not None:
            parts.append(stream.indices(m) + s)
        else:
            parts.append(torch.nonzero(stream.uniforms(m) >= p).flatten() + s)
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def save_sparse_deltas(base: str | os.PathLike, model: str | os.PathLike, out_dir: str | os.PathLike, drop_rate: float,
                       seed: int = 0, sampler: str = "torch_rand", name: str | None = None, scope: Scope | None = None,
                       overwrite: bool = False, shard_bytes: int = 1 << 30) -> Path:
    """Save the DARE-sparsified delta of ``model`` against ``base`` (indices + values, safetensors).

    ``name`` is the model name that seeds the masks (default: the model directory's name), as
    the key of ``models`` does in ``merge_models``. Tensors outside ``scope`` are not stored
    (a rebuild copies them from the base).
    """
    p = check_drop_rate(drop_rate, rescale=True)
    name = name or Path(model).name
    base_src, src = CheckpointReader(base, "base"), CheckpointReader(model, name)
    plans = plan_merge(base_src, {name: src}, scope or Scope())
    meta = {"format": FORMAT, "drop_rate": p, "seed": int(seed), "sampler": sampler, "model": name,
            "model_ref": str(model), "base_id": base_id(base_src), "rescale": "1/(1-p)"}
    atomic = AtomicDir(out_dir, overwrite=overwrite, marker="dare_lab_delta.json",
                       inputs={"base model": base_src.path, f"model {name!r}": src.path},
                       own_file=lambda f: f == "dare_lab_delta.json" or (f.startswith("deltas-") and f.endswith(".safetensors")))
    with atomic as tmp:
        shard: dict[str, torch.Tensor] = {}
        used, files, weight_map = 0, 0, {}

        def flush() -> None:
            nonlocal shard, used, files
            if shard:
                files += 1
                fname = f"deltas-{files:05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"dare_lab": json.dumps(meta)})
                weight_map.update({k: fname for k in shard})
                shard, used = {}, 0

        for plan in plans:
            if not plan.merge:
                continue
            theta = src.get(plan.sources[name]).reshape(-1)
            if plan.rows is not None:
                theta = theta[: math.prod(plan.shape)]
            idx = _kept_indices(theta.numel(), p, seed, name, plan.name, sampler) if p > 0 else torch.arange(theta.numel())
            gaps = torch.diff(idx, prepend=torch.tensor([-1])) - 1
            if idx.numel() == 0 or int(gaps.max()) <= 65535:
                shard[f"{plan.name}::gaps"] = (gaps - 32768).to(torch.int16)
            else:
                shard[f"{plan.name}::index"] = idx
            shard[f"{plan.name}::values"] = theta[idx].clone()
            used += idx.numel() * (2 + theta.element_size())
            if used >= shard_bytes:
                flush()
        flush()
        (tmp / "dare_lab_delta.json").write_text(json.dumps({**meta, "weight_map": weight_map}, indent=1))
        return atomic.commit()


class SparseDelta:
    """A saved store: ``delta(tensor, base_fp32)`` → dense δ̂ in float32 (None if not stored)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        info = json.loads((self.path / "dare_lab_delta.json").read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"{self.path}: not a dare_lab sparse delta store")
        self.info, self.p, self.map = info, float(info["drop_rate"]), info["weight_map"]

    def _get(self, key: str) -> torch.Tensor:
        with safe_open(self.path / self.map[key], framework="pt") as fh:
            return fh.get_tensor(key)

    def indices(self, tensor: str) -> torch.Tensor | None:
        if f"{tensor}::gaps" in self.map:
            return torch.cumsum(self._get(f"{tensor}::gaps").to(torch.int64) + 32769, 0) - 1
        if f"{tensor}::index" in self.map:
            return self._get(f"{tensor}::index")
        return None

    def delta(self, tensor: str, base: torch.Tensor) -> torch.Tensor | None:
        idx = self.indices(tensor)
        if idx is None:
            return None
        flat = base.reshape(-1)
        vals = self._get(f"{tensor}::values").to(base.dtype) - flat[idx]
        if self.p > 0:
            vals = vals / (1.0 - self.p)
        out = torch.zeros_like(flat)
        out[idx] = vals
        return out.view(base.shape)


def rebuild(base: str | os.PathLike, stores: Sequence[str | os.PathLike], out_dir: str | os.PathLike, scaling: float = 1.0,
            out_dtype: torch.dtype | None = None, overwrite: bool = False, max_shard_size: int | str = "5GB") -> Path:
    """Write θ_PRE + λ Σ_k δ̂_k as an HF checkpoint (the same bits as a DARE + TA merge)."""
    from dare_lab.engine.merge import _copy_model_files

    base_src = CheckpointReader(base, "base")
    # summed in sorted model-name order, as merge_models does: the store order cannot change bits
    deltas = sorted((SparseDelta(s) for s in stores), key=lambda d: str(d.info.get("model", "")))
    ident = base_id(base_src)
    for d in deltas:
        if d.info["base_id"] != ident:
            raise ValueError(f"store {d.path} was made against another base checkpoint")
    names = base_src.names()
    entries = [(n, tuple(base_src.shape(n)), out_dtype if (out_dtype and base_src.dtype(n).is_floating_point) else base_src.dtype(n))
               for n in names]
    from dare_lab.engine.merge import _own_output_file

    atomic = AtomicDir(out_dir, overwrite=overwrite, marker="dare_lab_rebuild.json",
                       inputs={"base model": base_src.path, **{f"store {d.path}": d.path for d in deltas}},
                       own_file=lambda f: f == "dare_lab_rebuild.json" or _own_output_file(f))
    with atomic as tmp:
        writer = ShardedSafetensorsWriter(tmp, entries, max_shard_size)
        try:
            for n, _, target in entries:
                raw = base_src.get(n)
                parts = [d.delta(n, raw.to(torch.float32)) for d in deltas] if raw.is_floating_point() else []
                if not any(x is not None for x in parts):
                    writer.write(n, raw.to(target))
                    continue
                theta0 = raw.to(torch.float32)
                acc = torch.zeros_like(theta0)
                for x in parts:
                    if x is not None:
                        acc.add_(x, alpha=1.0)
                writer.write(n, (theta0 + acc.mul_(scaling)).to(target))
            writer.finish()
        finally:
            writer.close()
        _copy_model_files(base_src.path, tmp, out_dtype)
        (tmp / "dare_lab_rebuild.json").write_text(json.dumps({"base": str(base), "stores": [str(s) for s in stores],
                                                                "scaling": scaling}, indent=1))
        return atomic.commit()
