"""``MergeMethod.merge_tensor`` evaluated chunk by chunk, bit for bit.

The engine streams a tensor as flat chunks of a few hundred thousand entries, read straight
from the checkpoint files, and this module applies the method's formula to each chunk with the
same torch operations as the whole-tensor code in :mod:`dare_lab.ops` (all element-wise, so a
chunk gives the same bits as the same entries of the whole tensor). Only three things in the
formula are not element-wise, and each is carried across chunks exactly:

- DARE masks: a per-tensor :class:`~dare_lab.ops.sparsify.MaskStream` continues the same
  generator stream from chunk to chunk (same masks as ``keep_mask`` on the whole tensor);
- exact-count top-k (magnitude pruning, TIES trim): the k-th largest |x| and the number of
  entries above it are found in a pre-pass (:func:`~dare_lab.ops.sparsify.kth_largest`), and
  ties at the threshold are kept in flat-index order while streaming;
- TIES' majority sign (used only where the summed sign is 0): counted exactly while streaming;
  such entries are written assuming +1 and their values for −1 / 0 kept aside and patched in
  once the majority is known.

Where a cheaper operation is used it gives the same result for finite values (e.g. DARE's
``where(mask, δ/(1−p), 0)`` as ``δ/(1−p) · mask``: the only difference, −0 for +0, cannot
reach the output because the accumulator starts at +0). Any NaN/Inf in an input or a merged
chunk raises :class:`NonFiniteChunk`; the engine then recomputes that tensor with the
whole-tensor code, which raises the documented error (or, for a false alarm, returns its own
result), so errors and results match the reference path exactly.

Memory per call: a handful of chunk buffers, plus |x| of one model for the whole tensor while
a top-k threshold is searched.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from dare_lab.ops import merge as mergers
from dare_lab.ops.method import MergeMethod
from dare_lab.ops.seeding import tensor_generator
from dare_lab.ops.sparsify import MaskStream, keep_count, kth_largest

CHUNK = 1 << 18

_local = threading.local()


class NonFiniteChunk(Exception):
    """A NaN/Inf was seen: recompute this tensor on the whole-tensor reference path."""


def workspace(key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch buffer reused across chunks and tensors (no fresh pages per chunk)."""
    cache = getattr(_local, "bufs", None)
    if cache is None:
        cache = _local.bufs = {}
    buf = cache.get((key, dtype))
    if buf is None or buf.numel() < numel:
        buf = cache[(key, dtype)] = torch.empty(max(numel, 1), dtype=dtype)
    return buf[:numel]


def _bools(key: str, numel: int) -> np.ndarray:
    """A per-thread bool scratch array (numpy view of a :func:`workspace` buffer)."""
    return workspace(key, numel, torch.bool).numpy()


def release_workspace() -> None:
    """Drop this thread's scratch buffers."""
    _local.bufs = {}


class TopKStream:
    """Streams ``top_magnitude_mask(x, k)`` given the exact threshold and the count above it."""

    def __init__(self, n: int, k: int, threshold: float | None = None, greater: int = 0):
        self.all, self.none = k >= n, k <= 0
        self.threshold, self.quota = threshold, k - greater

    def mask(self, a: torch.Tensor) -> torch.Tensor:
        """Keep mask of a chunk of |x| (chunks must come in flat order)."""
        if self.all:
            return torch.ones_like(a, dtype=torch.bool)
        if self.none:
            return torch.zeros_like(a, dtype=torch.bool)
        return torch.from_numpy(self._keep(a.numpy(), np.empty(a.numel(), dtype=bool)))

    def trim_(self, x: torch.Tensor, a: torch.Tensor, keep: np.ndarray) -> None:
        """Zero the entries of chunk ``x`` that the mask drops, in place (``a`` = |x|, ``keep`` a
        bool scratch of the chunk's size). ``x · keep`` equals ``where(keep, x, 0)`` up to the
        sign of 0, which no later step can see (see the module docstring)."""
        if self.all:
            return
        if self.none:
            x.zero_()
            return
        xn = x.numpy()
        np.multiply(xn, self._keep(a.numpy(), keep), out=xn)

    def _keep(self, an: np.ndarray, keep: np.ndarray) -> np.ndarray:
        # numpy: its compares into bool buffers run several times faster than torch's on CPU
        np.greater(an, self.threshold, out=keep)
        if self.quota > 0:
            eq = np.equal(an, self.threshold)
            c = int(np.count_nonzero(eq))
            if c and c <= self.quota:
                keep |= eq
                self.quota -= c
            elif c:
                keep[np.flatnonzero(eq)[: self.quota]] = True
                self.quota = 0
        return keep


Reader = Callable[[int, int], torch.Tensor]   # (start, stop) → storage-dtype flat chunk (a view, valid until the next call)


def _finite(x: torch.Tensor) -> bool:
    """False if x holds a NaN/Inf (a sum propagates them; a rare overflow of the sum is a false
    alarm that only costs a recomputation on the reference path)."""
    return math.isfinite(float(x.sum(dtype=torch.float32) if x.dtype == torch.float32 else x.sum()))


class StreamedMerge:
    """One tensor of one merge: ``run(emit, patch)`` streams the merged tensor.

    ``read_base(s, e)`` / ``read_models[k](s, e)`` return storage-dtype chunks of the flat
    tensors; ``emit(s, merged)`` receives each merged chunk in the compute dtype;
    ``patch(idx, values)`` (TIES only) overwrites single entries after all chunks.
    """

    def __init__(self, method: MergeMethod, tensor: str, n: int, models: Sequence[str], read_base: Reader,
                 read_models: Sequence[Reader], dtype: torch.dtype = torch.float32, chunk: int = CHUNK):
        self.method, self.tensor, self.n = method, tensor, n
        self.models, self.read_base, self.read_models = list(models), read_base, list(read_models)
        self.dtype, self.chunk = dtype, max(4096, chunk - chunk % 4096)
        sp, mg = method.sparsifier, method.merger
        self.sp, self.mg = sp, mg
        self.sparse = sp.kind != "none" and sp.drop_rate != 0.0
        self.random = self.sparse and sp.kind in ("dare", "drop_only")
        self.rescale = sp.kind == "dare" or (sp.kind == "magnitude" and sp.rescale)
        self.trim = mg.kind == "ties" and keep_count(n, 1.0 - mg.retain_ratio) < n
        self.weights = mergers._weights(len(self.models), mg.weights)
        self.mag: list[TopKStream | None] = [None] * len(self.models)
        self.cut: list[TopKStream | None] = [None] * len(self.models)
        self.mag_k = keep_count(n, sp.drop_rate) if self.sparse and sp.kind == "magnitude" else None

    # -- one model's sparsified delta on a chunk --------------------------------------------
    def _streams(self, k: int) -> MaskStream | None:
        if not self.random:
            return None
        gen = tensor_generator(self.method.seed, self.models[k], self.tensor)
        return MaskStream(self.sp.drop_rate, gen, self.sp.sampler, self.n)

    def _sparsified(self, k: int, mask: MaskStream | None, mag: TopKStream | None, bf: torch.Tensor,
                    th: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """δ̂_k on a chunk, in ``out`` (or a new tensor); ``bf`` = base chunk in compute dtype."""
        sp, m, p = self.sp, bf.numel(), self.sp.drop_rate
        if sp.target == "delta" and mask is not None and mask.geo is not None:
            idx = mask.indices(m)                     # geometric: touch kept entries only
            vals = th[idx].to(self.dtype) - bf[idx]
            if self.rescale:
                vals = vals / (1.0 - p)
            out.zero_()
            out[idx] = vals
            return out
        x = out.copy_(th)
        if sp.target == "delta":
            x.sub_(bf)
        if not self.sparse:
            pass
        elif mag is not None:
            keep = mag.mask(x.abs())
            kept = x / (1.0 - p) if self.rescale else x
            x = torch.where(keep, kept, torch.zeros((), dtype=x.dtype))
        elif mask.geo is None and sp.target == "delta":
            u = mask.uniforms(m, workspace("u", self.chunk, torch.float32)).ge_(p)
            if self.rescale:
                x.div_(1.0 - p)
            x.mul_(u)                                 # = where(u ≥ p, x, 0) up to the sign of 0
        else:
            keep = mask.mask(m)
            kept = x / (1.0 - p) if self.rescale else x
            x = torch.where(keep, kept, torch.zeros((), dtype=x.dtype))
        if sp.target == "finetuned":
            x = x - bf
        return x

    def _chunks(self):
        for s in range(0, self.n, self.chunk):
            yield s, min(self.n, s + self.chunk)

    def _base(self, s: int, e: int) -> torch.Tensor:
        raw = self.read_base(s, e)
        if not _finite(raw):
            raise NonFiniteChunk
        return workspace("base", self.chunk, self.dtype)[: e - s].copy_(raw)

    def _theta(self, k: int, s: int, e: int) -> torch.Tensor:
        raw = self.read_models[k](s, e)
        if not _finite(raw):
            raise NonFiniteChunk
        return raw

    # -- pre-passes: exact top-k thresholds ----------------------------------------------------
    def _threshold(self, k: int, keep: int, after_sparsify: bool) -> TopKStream:
        if keep >= self.n or keep <= 0:
            return TopKStream(self.n, keep)
        a = workspace("abs", self.n, self.dtype)
        mask, mag = (self._streams(k), self._fresh_mag(k)) if after_sparsify else (None, None)
        scratch = workspace("x0", self.chunk, self.dtype)
        for s, e in self._chunks():
            bf = self._base(s, e)
            th = self._theta(k, s, e)
            if after_sparsify:
                x = self._sparsified(k, mask, mag, bf, th, scratch[: e - s])
            else:
                x = scratch[: e - s].copy_(th)
                if self.sp.target == "delta":
                    x.sub_(bf)
            torch.abs(x, out=a[s:e])
        thr, greater = kth_largest(a, keep)
        return TopKStream(self.n, keep, float(thr), greater)

    def _fresh_mag(self, k: int) -> TopKStream | None:
        st = self.mag[k]
        return None if st is None else TopKStream(self.n, self.mag_k, st.threshold, self.mag_k - st.quota)

    def prepare(self) -> None:
        for k in range(len(self.models)):
            if self.mag_k is not None:
                self.mag[k] = self._threshold(k, self.mag_k, after_sparsify=False)
            if self.trim:
                self.cut[k] = self._threshold(k, keep_count(self.n, 1.0 - self.mg.retain_ratio), after_sparsify=True)

    def _disjoint_sum(self, trimmed: list[torch.Tensor], elected: torch.Tensor, m: int,
                      zero: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray | None]:
        """``ties_disjoint_merge`` (mean/sum) for an elected sign without zeros: agree = [t·s > 0]
        (= [sign(t) = s], t ≠ 0) as a 0/1 float, contributions t·w·agree.

        With ``zero`` (where the summed sign was 0 and +1 was assumed) also returns where that
        assumption can matter: some model agrees with +1 there. (A sum of the trimmed deltas that
        is exactly 0 with a nonzero entry needs a positive one, so this is "any t ≠ 0".)
        """
        acc = workspace("dacc", self.chunk, self.dtype)[:m].zero_()
        count = workspace("dcount", self.chunk, self.dtype)[:m].zero_()
        agree = workspace("agree", self.chunk, self.dtype)[:m]
        for w, t in zip(self.weights, trimmed):
            torch.mul(t, elected, out=agree).gt_(0.0)
            acc.addcmul_(t if w == 1.0 else t * w, agree)
            count.add_(agree)
        amb = None
        if zero is not None:
            amb = np.greater(count.numpy(), 0, out=_bools("amb", self.chunk)[:m])
            amb &= zero
        if self.mg.merge_func == "mean":
            acc.div_(count.clamp_(min=1))
        return acc, amb

    # -- the main pass ---------------------------------------------------------------------------
    def run(self, emit: Callable[[int, torch.Tensor], None],
            patch: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        self.prepare()
        K = len(self.models)
        masks = [self._streams(k) for k in range(K)]
        mags = [self._fresh_mag(k) for k in range(K)]
        cuts = list(self.cut)  # consumed by this pass only
        mg = self.mg
        balance = 0
        sum_dtype = self.dtype if self.chunk <= 1 << 24 else torch.float64
        amb: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for s, e in self._chunks():
            bf = self._base(s, e)
            m = e - s
            if mg.kind in ("task_arithmetic", "average"):
                acc = workspace("acc", self.chunk, self.dtype)[:m].zero_()
                for k in range(K):
                    d = self._sparsified(k, masks[k], mags[k], bf, self._theta(k, s, e), workspace("x0", self.chunk, self.dtype)[:m])
                    if mg.kind == "average":
                        acc.add_(d)
                    else:
                        acc.add_(d, alpha=self.weights[k])
                if mg.kind == "average":
                    acc.div_(K)
                else:
                    acc.mul_(mg.scaling)
                out = torch.add(bf, acc, out=acc)
                if not _finite(out):
                    raise NonFiniteChunk
                emit(s, out)
                continue
            # TIES
            trimmed = []
            for k in range(K):
                d = self._sparsified(k, masks[k], mags[k], bf, self._theta(k, s, e), workspace(f"x{k}", self.chunk, self.dtype)[:m])
                if cuts[k] is not None and not cuts[k].all:
                    cuts[k].trim_(d, torch.abs(d, out=workspace("tabs", self.chunk, self.dtype)[:m]), _bools("keep", self.chunk)[:m])
                trimmed.append(d)
            electors = [t * w for w, t in zip(self.weights, trimmed)] if mg.weighted_election else trimmed
            total = workspace("total", self.chunk, self.dtype)[:m]
            if K == 1:
                total.copy_(electors[0])
            else:
                torch.add(electors[0], electors[1], out=total)   # = (0 + e0) + e1 up to the sign of 0
                for t in electors[2:]:
                    total.add_(t)
            sign = torch.sign(total, out=total)
            balance += int(sign.sum(dtype=sum_dtype))   # #(+1) − #(−1): partial sums are integers ≤ m, exact
            sn = sign.numpy()
            zero = np.equal(sn, 0, out=_bools("zero", self.chunk)[:m])
            np.add(sn, zero, out=sn)                  # provisional majority +1 where the sum is 0
            elected = sign
            any_zero = bool(zero.any())
            amb_mask = None
            if mg.merge_func == "max":
                merged = mergers.ties_disjoint_merge(trimmed, elected, mg.merge_func, self.weights)
            else:
                merged, amb_mask = self._disjoint_sum(trimmed, elected, m, zero if any_zero and not mg.weighted_election else None)
            if mg.scaling != 1.0:
                merged.mul_(mg.scaling)
            out = torch.add(bf, merged, out=merged)
            if not _finite(out):
                raise NonFiniteChunk
            emit(s, out)
            if not any_zero:
                continue
            if amb_mask is not None:
                nonzero = amb_mask
            else:
                nonzero = np.not_equal(trimmed[0].numpy(), 0, out=_bools("nz", self.chunk)[:m])
                other = _bools("nz2", self.chunk)[:m]
                for t in trimmed[1:]:
                    nonzero |= np.not_equal(t.numpy(), 0, out=other)
                nonzero &= zero
            idx = torch.from_numpy(np.flatnonzero(nonzero))
            if idx.numel():
                sub = [t[idx] for t in trimmed]
                alts = []
                for maj in (-1.0, 0.0):
                    el = torch.full((idx.numel(),), maj, dtype=self.dtype)
                    alts.append(bf[idx] + mergers.ties_disjoint_merge(sub, el, mg.merge_func, self.weights).mul_(mg.scaling))
                amb.append((idx + s, alts[0], alts[1]))
        if mg.kind == "ties" and amb:
            majority = (balance > 0) - (balance < 0)
            if majority != 1:
                which = 1 if majority == -1 else 2
                idx = torch.cat([a[0] for a in amb])
                vals = torch.cat([a[which] for a in amb])
                if not _finite(vals):
                    raise NonFiniteChunk
                if patch is None:
                    raise RuntimeError("TIES needs a patch callback")
                patch(idx, vals)
