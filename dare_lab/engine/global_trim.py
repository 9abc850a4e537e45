"""Whole-model TIES trim thresholds (``trim_scope: model``), found in streaming.

The official TIES code and MergeLM trim each model's task vector over *all* its merged
parameters at once: with n the number of merged entries of a model (every in-scope tensor,
flattened together; task heads are out of scope as always) and k the retain ratio, the model
keeps exactly the entries with |δ̂| ≥ t, where t is the r-th smallest |δ̂| over the n entries,
r = ⌊(1 − k)·n⌋ (:func:`dare_lab.ops.merge.model_trim_rank`; r = 0 keeps everything). Every
entry equal to t is kept, so the kept set depends on t alone: no order among tensors or tie
quota is involved, and the TIES step of each tensor then only needs t per model.

t is found exactly without holding the model: a radix selection on the bit patterns of |δ̂|.
For non-negative IEEE floats the bit pattern, read as an integer, orders like the value, so
one pass over all tensors histograms the top 16 bits of every |δ̂| (65 536 counters per
model), which fixes the 16-bit bucket holding the r-th smallest entry and how many entries lie
below it; the next pass histograms the next 16 bits of the entries in that bucket only, and so
on: 2 passes for float32 compute, 4 for float64. Each pass streams every tensor chunk by chunk
(:class:`StreamedDeltas`: the streamed merge's own reads and per-(seed, model, tensor)
sparsifier draws, so δ̂ is bit for bit the one the merge trims); memory is a few chunk buffers
and 65 536 counters per model and worker — flat in the model size, never the whole model.

The merge itself then streams as per-tensor TIES does (:class:`FixedTrimMerge`: the streamed
TIES with each model's cut fixed at "keep |δ̂| ≥ t", every tie kept), and the tensor's own
sign election and majority sign are unchanged. (Both references also take the sign of entries
whose trimmed deltas sum to exactly 0 from a majority over the whole model; dare_lab keeps the
tensor's majority there, as for ``trim_scope: tensor`` — it matters only at exact cancellations.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dare_lab.engine.streamed import NonFiniteChunk, StreamedMerge, TopKStream, _finite, workspace
from dare_lab.ops.merge import model_trim_rank

DIGIT_BITS = 16
SLICE = 1 << 22          # entries of |δ̂| turned into bit digits at a time
_BITS = {torch.float32: (torch.int32, np.float32, 32), torch.float64: (torch.int64, np.float64, 64)}
RESTART = object()
"""Yielded by a ``deltas_of`` iterator to discard what it yielded for this tensor so far (a
streamed pass that fell back to whole tensors after a false NaN/Inf alarm)."""


class StreamedDeltas(StreamedMerge):
    """δ̂_k of one tensor chunk by chunk, through the streamed merge's own sparsifier code (the
    same bits as the whole-tensor sparsifier; magnitude pruning finds its per-tensor threshold
    first, as the merge does). A NaN/Inf raises :class:`NonFiniteChunk`."""

    def pieces(self) -> Iterable[tuple[int, torch.Tensor]]:
        """(model index, δ̂ of one chunk) — each piece valid until the next is drawn."""
        self.trim = False                       # only the sparsifier's own thresholds are needed
        self.prepare()
        K = len(self.models)
        masks = [self._streams(k) for k in range(K)]
        mags = [self._fresh_mag(k) for k in range(K)]
        for s, e in self._chunks():
            bf = self._base(s, e)
            for k in range(K):
                d = self._sparsified(k, masks[k], mags[k], bf, self._theta(k, s, e),
                                     workspace(f"x{k}", self.chunk, self.dtype)[: e - s])
                if not _finite(d):
                    raise NonFiniteChunk
                yield k, d


def keep_from(n: int, threshold: float) -> TopKStream:
    """The streamed TIES cut "keep |δ̂| ≥ threshold" (every tie kept; 0 keeps everything)."""
    if threshold <= 0.0:
        return TopKStream(n, n)
    cut = TopKStream(n, 1)
    cut.all = cut.none = False
    cut.threshold, cut.quota = float(threshold), n       # a tie quota no tensor can use up
    return cut


class FixedTrimMerge(StreamedMerge):
    """The streamed TIES merge of one tensor with each model's whole-model threshold as its cut
    (``thresholds`` in model order); election, majority sign and disjoint merge unchanged."""

    def __init__(self, *args, thresholds: Sequence[float], **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed = [float(t) for t in thresholds]
        if len(self.fixed) != len(self.models):
            raise ValueError(f"got {len(self.fixed)} TIES trim thresholds for {len(self.models)} models")
        self.trim = any(t > 0.0 for t in self.fixed)

    def prepare(self) -> None:
        for k in range(len(self.models)):
            if self.mag_k is not None:
                self.mag[k] = self._threshold(k, self.mag_k, after_sparsify=False)
            self.cut[k] = keep_from(self.n, self.fixed[k]) if self.trim else None


@dataclass
class _Selection:
    """One model's radix selection: the bit prefix fixed so far, the rank still sought among the
    entries sharing that prefix (1-based, from the bottom), and the entries found below it."""

    rank: int = 0
    prefix: int = 0
    below: int = 0
    done: bool = False
    hist: np.ndarray = field(default_factory=lambda: np.zeros(1 << DIGIT_BITS, np.int64))


@dataclass
class ModelTrim:
    """Result of :func:`model_thresholds`: per model its threshold t, the number of merged
    entries n, the rank r of t from the bottom and how many entries it keeps (#|δ̂| ≥ t)."""

    retain_ratio: float
    entries: int
    rank: int
    thresholds: dict[str, float]
    kept: dict[str, int]

    def describe(self) -> dict[str, Any]:
        return {"scope": "model", "retain_ratio": self.retain_ratio, "entries": self.entries, "rank": self.rank,
                "thresholds": dict(self.thresholds), "kept": dict(self.kept)}


def _digit_hist(a: torch.Tensor, sel: _Selection, shift: int, width: int) -> np.ndarray:
    """Histogram of bits [shift, shift+16) of |δ̂| (flat, compute dtype) over the entries whose
    higher bits equal ``sel.prefix`` (all entries on the first pass)."""
    int_dtype = _BITS[a.dtype][0]
    hist = np.zeros(1 << DIGIT_BITS, np.int64)
    top = shift + DIGIT_BITS
    for s in range(0, a.numel(), SLICE):
        bits = a[s: s + SLICE].abs().view(int_dtype).numpy()
        if top < width:
            bits = bits[(bits >> top) == sel.prefix]
        hist += np.bincount(((bits >> shift) & 0xFFFF).astype(np.intp), minlength=1 << DIGIT_BITS)
    return hist


def model_thresholds(deltas_of: Callable[[Any], Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]],
                     plans: Sequence[Any], models: Iterable[str], retain_ratio: float, dtype: torch.dtype,
                     run: Callable[[Sequence[Any], Callable[[Any], None]], Any] | None = None) -> ModelTrim:
    """Each model's whole-model TIES threshold over the merged tensors ``plans``.

    ``deltas_of(plan)`` gives the δ̂ of that tensor (compute dtype, the exact values the merge
    trims): a mapping model name → tensor, or an iterable of (model name, piece) whose pieces
    of a model cover its tensor once, in any order (:data:`RESTART` discards what came before);
    ``run(plans, work)`` calls ``work(plan)`` for every plan, in any order and on any number of
    threads (default: a plain loop). Exact: t is the r-th smallest |δ̂| of the model over all n
    entries, r = ⌊(1 − k)·n⌋ (t = 0, keep all, where r = 0).
    """
    if dtype not in _BITS:
        raise ValueError(f"whole-model TIES trim needs float32 or float64 compute, got {dtype}")
    width = _BITS[dtype][2]
    names = list(models)
    sels = {m: _Selection() for m in names}
    lock = threading.Lock()
    run = run or (lambda ps, work: [work(p) for p in ps])
    total = [0]
    shift = width - DIGIT_BITS
    first = True
    while shift >= 0:
        active = [m for m in names if not sels[m].done]
        if not active:
            break

        def work(plan, shift=shift, active=active, first=first) -> None:
            local = {m: np.zeros(1 << DIGIT_BITS, np.int64) for m in active}
            count = 0
            got = deltas_of(plan)
            for item in (got.items() if isinstance(got, Mapping) else got):
                if item is RESTART:
                    for h in local.values():
                        h[:] = 0
                    count = 0
                    continue
                m, d = item
                if m not in local:
                    continue
                d = d.detach().reshape(-1)
                if d.dtype != dtype:
                    d = d.to(dtype)
                local[m] += _digit_hist(d.contiguous(), sels[m], shift, width)
                if m == active[0]:
                    count += d.numel()
            with lock:
                for m, h in local.items():
                    sels[m].hist += h
                if first:
                    total[0] += count
        run(plans, work)
        if first:
            n = total[0]
            rank = model_trim_rank(n, retain_ratio) if n else 0
            for m in names:
                sels[m].rank = rank
                sels[m].done = rank == 0
        for m in active:
            s = sels[m]
            if s.done:
                continue
            cum = np.cumsum(s.hist)
            digit = int(np.searchsorted(cum, s.rank))     # first bucket whose cumulative count reaches the rank
            under = int(cum[digit - 1]) if digit else 0
            s.rank -= under
            s.below += under
            s.prefix = (s.prefix << DIGIT_BITS) | digit
            s.hist[:] = 0
        first = False
        shift -= DIGIT_BITS
    int_np, float_np = {32: np.uint32, 64: np.uint64}[width], _BITS[dtype][1]
    n = total[0]
    thresholds, kept = {}, {}
    for m in names:
        s = sels[m]
        if s.rank == 0 or n == 0:
            thresholds[m], kept[m] = 0.0, n
        else:
            thresholds[m] = float(np.array([s.prefix], dtype=int_np).view(float_np)[0])
            kept[m] = n - s.below
    return ModelTrim(float(retain_ratio), n, model_trim_rank(n, retain_ratio) if n else 0, thresholds, kept)
