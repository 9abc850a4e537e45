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
  such entries are written assuming +1, their inputs kept aside, and merged and patched in
  once the majority is known.

Where a cheaper operation is used it gives the same result for finite values (e.g. DARE's
``where(mask, δ/(1−p), 0)`` as ``δ/(1−p) · mask``: the only difference, −0 for +0, cannot
reach the output because the accumulator starts at +0). Any NaN/Inf in an input or a merged
chunk raises :class:`NonFiniteChunk`; the engine then recomputes that tensor with the
whole-tensor code, which raises the documented error (or, for a false alarm, returns its own
result), so errors and results match the reference path exactly.

Where numba is installed, TIES and task arithmetic / averaging run as compiled loops
(:mod:`dare_lab.engine.kernels`) with the same bits, and TIES thresholds of large tensors come from
one sampled-bracket pass over all models (:meth:`StreamedMerge._bracketed_thresholds`).

Memory per call: a handful of chunk buffers, plus |x| of one model for the whole tensor where a
top-k threshold is searched over the whole tensor.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np
import torch

from dare_lab.ops import merge as mergers
from dare_lab.ops.method import MergeMethod
from dare_lab.ops.seeding import tensor_generator
from dare_lab.ops.sparsify import MaskStream, keep_count, kth_largest, rank_from_top, sample_bracket

CHUNK = 1 << 18
BRACKET_MIN = 1 << 20          # tensors from this size find TIES thresholds by a sampled bracket
SAMPLE_BLOCKS, SAMPLE_WIDTH = 64, 1024   # the bracket's sample: 64 evenly spread blocks of 1024 entries
BRACKET_WIDEN = 1.5            # bracket half-width in units of kth_largest's (4 binomial σ + 8 ranks)
BRACKET_SHARE = 0.025          # share of entries inside such a bracket at worst (median k); capacity 6×
MAX_COUNTED_VALUES = 8         # tie-heavy brackets: up to this many values are counted instead of gathered
FUSED = importlib.util.find_spec("numba") is not None and not os.environ.get("DARE_LAB_NO_NUMBA")
"""Use the compiled loops (:mod:`dare_lab.engine.kernels`) where they apply; tests switch them off
to check that both paths give the same bits."""
_KERNELS: ModuleType | bool | None = None


_warming = 0                    # background rehearsals running (dare_lab.engine.warmup)
_warming_lock = threading.Lock()
defer_while_warming: Callable[[], bool] = lambda: True
"""Whether other threads take the torch path while a rehearsal compiles (warmup.MODE sets it)."""


def warming_started() -> None:
    """A background rehearsal compiles the loops: until :func:`warming_done`, other threads
    get no compiled loops (they take the torch path, same bits) instead of waiting on numba."""
    global _warming
    with _warming_lock:
        _warming += 1


def warming_done() -> None:
    global _warming
    with _warming_lock:
        _warming = max(0, _warming - 1)


def mark_rehearsal_thread() -> None:
    """This thread compiles: it gets the compiled loops while a rehearsal runs."""
    _local.rehearsal = True


def compiled_kernels() -> ModuleType | None:
    """:mod:`dare_lab.engine.kernels`, imported on first use (numba costs ~0.3 s to import, and merges
    without a compiled loop or DARE mask stream do not need it); None where it does not import,
    and None outside the rehearsal thread while a background rehearsal compiles."""
    global _KERNELS
    if _warming and not getattr(_local, "rehearsal", False) and defer_while_warming():
        return None
    if _KERNELS is None:
        try:
            from dare_lab.engine import kernels
            _KERNELS = kernels if kernels.AVAILABLE else False
        except ImportError:
            _KERNELS = False
    return _KERNELS or None

_local = threading.local()


class NonFiniteChunk(Exception):
    """A NaN/Inf was seen: recompute this tensor on the whole-tensor reference path."""


_NO_BITS = np.zeros(0, dtype=np.int16)


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


class _Bracket:
    """One model's threshold search in :meth:`StreamedMerge._bracketed_thresholds`: the bracket
    [lo, hi], the counted values with #(|δ| > v) / #(|δ| ≥ v), or the gathered entries."""

    def __init__(self, lo: float, hi: float, vals: np.ndarray, gather: bool, n: int = 0):
        self.lo, self.hi = np.float32(lo), np.float32(hi)
        self.vals = vals.astype(np.float32)
        self.gt = np.zeros(self.vals.shape[0], np.int64)
        self.ge = np.zeros(self.vals.shape[0], np.int64)
        self.gather = gather
        self.cand = np.empty(max(1 << 16, int(n * 6 * BRACKET_SHARE)) if gather else 1, np.float32)
        self.above = self.inside = 0

    def result(self, keep: int) -> tuple[float, int] | None:
        """(k-th largest |δ|, #entries above it), or None where the counts do not pin it."""
        if not self.gather:
            hit = np.flatnonzero((self.gt < keep) & (keep <= self.ge))
            return (float(self.vals[hit[0]]), int(self.gt[hit[0]])) if hit.shape[0] else None
        r = keep - self.above          # rank among the gathered entries, from the top
        if not 1 <= r <= self.inside <= self.cand.shape[0]:
            return None
        thr, greater = rank_from_top(self.cand[: self.inside], r)
        return thr, greater + self.above

    def between(self, keep: int, n: int) -> "_Bracket | None":
        """A gathering bracket strictly between the counted values around the k-th largest (a
        value v with #(|δ| > v) ≥ k lies below it; one with #(|δ| ≥ v) < k above), within [lo, hi]."""
        below = self.vals[self.gt >= keep]
        above = self.vals[self.ge < keep]
        lo = np.nextafter(below.max(), np.float32(np.inf)) if below.shape[0] else self.lo
        hi = np.nextafter(above.min(), np.float32(-np.inf)) if above.shape[0] else self.hi
        lo, hi = max(lo, self.lo), min(hi, self.hi)
        return _Bracket(lo, hi, np.zeros(0, np.float32), gather=True, n=n) if lo <= hi else None


class StreamedMerge:
    """One tensor of one merge: ``run(emit, patch)`` streams the merged tensor.

    ``read_base(s, e)`` / ``read_models[k](s, e)`` return storage-dtype chunks of the flat
    tensors; ``emit(s, merged)`` receives each merged chunk in the compute dtype (or in
    ``emit_dtype`` where set);
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
        # compiled loops: TIES (mean/sum) with any sparsifier; task arithmetic / average with unit
        # weights and no or torch_rand DARE / DropOnly on δ (weights ≠ 1 stay on torch, whose
        # add-with-alpha may fuse the multiply-add); float32 compute only
        self.dare_in_loop = self.random and sp.sampler == "torch_rand" and sp.target == "delta"
        ta_ok = mg.kind in ("task_arithmetic", "average") and all(w == 1.0 for w in self.weights) \
            and (not self.sparse or self.dare_in_loop)
        wanted = FUSED and dtype == torch.float32 and (
            (mg.kind == "ties" and mg.merge_func in ("mean", "sum")) or ta_ok)
        self.kern = compiled_kernels() if wanted else None
        self.fused = self.kern is not None
        # the compiled MT19937 draws torch.rand's uniforms several times faster, whichever path merges
        self.mt_kern = self.kern or (compiled_kernels() if self.random and FUSED and sp.sampler == "torch_rand"
                                     else None)
        self.emit_dtype: torch.dtype | None = None
        """Set to the saved dtype by a caller whose ``emit`` takes chunks in it: task arithmetic's
        compiled loop then rounds to bf16 itself (one pass less than emit casting)."""
        self.emit_into: torch.Tensor | None = None
        """Set by a caller whose ``emit`` copies each chunk into this flat tensor (the writer's
        staged buffer, an in-memory result): the compiled TIES loop then writes its chunks there
        itself (bf16 or the compute dtype) and ``emit`` gets that very slice."""

    # -- one model's sparsified delta on a chunk --------------------------------------------
    def _streams(self, k: int) -> MaskStream | None:
        if not self.random:
            return None
        gen = tensor_generator(self.method.seed, self.models[k], self.tensor)
        return MaskStream(self.sp.drop_rate, gen, self.sp.sampler, self.n, kernels=self.mt_kern)

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
            elif self.fused and self.sp.target == "delta":
                if not self.kern.abs_delta(self._kernel_input(th, "x0"), bf.numpy(), a[s:e].numpy()):
                    raise NonFiniteChunk
                continue
            else:
                x = scratch[: e - s].copy_(th)
                if self.sp.target == "delta":
                    x.sub_(bf)
            torch.abs(x, out=a[s:e])
        thr, greater = kth_largest(a, keep)
        return TopKStream(self.n, keep, float(thr), greater)

    def _bracketed_thresholds(self, keep: int) -> list[TopKStream | None]:
        """TIES trim thresholds of all models in one pass, without holding |δ| (compiled path).

        A block sample of each model's |δ| (spread over the whole tensor) brackets its k-th
        largest value (:func:`sample_bracket`). Where a few values tie heavily inside the
        bracket (bf16 checkpoints), one pass counts the entries above and at each of them, which
        pins the k-th value when it is one of them; otherwise (or when it lies between them: a
        second pass for that model, bracketed by the values around it) the pass counts the
        entries above the bracket and gathers those inside, and the k-th value is selected among
        them. A model whose bracket missed gets ``None``: the caller runs the exact whole-|δ|
        search for it.
        """
        K, n = len(self.models), self.n
        blocks, width = SAMPLE_BLOCKS, SAMPLE_WIDTH
        starts = [(j * (n - width)) // (blocks - 1) for j in range(blocks)]

        def sample_of(read: Reader) -> torch.Tensor:
            buf = workspace("sample", blocks * width, self.dtype)
            for j, s0 in enumerate(starts):
                buf[j * width:(j + 1) * width].copy_(read(s0, s0 + width))
            return buf

        base_sample = sample_of(self.read_base).clone()
        plans: dict[int, _Bracket] = {}
        for k in range(K):
            sample = sample_of(self.read_models[k]).sub_(base_sample).abs_().numpy()
            sample = np.sort(sample[~np.isnan(sample)])
            if sample.shape[0] < 2:
                return [None] * K
            lo, hi = sample_bracket(sample, n, keep, widen=BRACKET_WIDEN)
            inner = sample[(sample >= lo) & (sample <= hi)]
            uniq, mult = np.unique(inner, return_counts=True)
            top = np.argsort(-mult, kind="stable")[:MAX_COUNTED_VALUES]
            heavy = mult[top] * 20 >= inner.shape[0]             # values holding ≥ 5 % of the bracket
            if mult[top][heavy].sum() * 2 >= inner.shape[0]:     # together at least half of it: count them
                plans[k] = _Bracket(lo, hi, np.sort(uniq[top][heavy]), gather=False)
            else:
                plans[k] = _Bracket(lo, hi, np.zeros(0, np.float32), gather=True, n=n)
        self._bracket_pass(plans)
        out: list[TopKStream | None] = [p.result(keep) for k, p in sorted(plans.items())]
        # counted values that do not hold the k-th: gather between the two around it
        again = {k: p.between(keep, n) for k, p in plans.items() if out[k] is None and not p.gather}
        again = {k: p for k, p in again.items() if p is not None}
        if again:
            self._bracket_pass(again)
            for k, p in again.items():
                out[k] = p.result(keep)
        return [None if r is None else TopKStream(n, keep, r[0], r[1]) for r in out]

    def _bracket_pass(self, plans: dict[int, "_Bracket"]) -> None:
        T = workspace("T2", 2 * self.kern.BLOCK, torch.float32).view(2, self.kern.BLOCK).numpy()
        for s, e in self._chunks():
            b = self._kernel_input(self.read_base(s, e), "base")
            for k, p in plans.items():
                th = self._kernel_input(self.read_models[k](s, e), "x0")
                status, up, p.inside = self.kern.bracket_chunk(th, b, p.lo, p.hi, p.vals, p.gt, p.ge, p.gather, p.cand,
                                                           p.inside, T)
                if status:
                    raise NonFiniteChunk
                p.above += up

    def _kernel_input(self, raw: torch.Tensor, key: str) -> np.ndarray:
        """A storage-dtype chunk as the compiled loops read it: bf16 bits or float32 as they are
        (no conversion pass), other dtypes converted into the float32 workspace ``key``."""
        view = self.kern.kernel_view(raw)
        if view is None:
            view = workspace(key, self.chunk, torch.float32)[: raw.numel()].copy_(raw).numpy()
        return view

    def _model_rows(self, s: int, e: int) -> list[np.ndarray]:
        """Every model's chunk [s, e) as the compiled loops read it, one array type for all (the
        loops take a homogeneous tuple: mixed storage dtypes are all converted to float32)."""
        rows = [self._kernel_input(self.read_models[k](s, e), f"x{k}") for k in range(len(self.models))]
        if len({r.dtype for r in rows}) > 1:
            rows = [workspace(f"x{k}", self.chunk, torch.float32)[: e - s].copy_(self.read_models[k](s, e)).numpy()
                    for k in range(len(self.models))]
        return rows

    def _fresh_mag(self, k: int) -> TopKStream | None:
        st = self.mag[k]
        return None if st is None else TopKStream(self.n, self.mag_k, st.threshold, self.mag_k - st.quota)

    def prepare(self) -> None:
        keep = keep_count(self.n, 1.0 - self.mg.retain_ratio)
        if self.trim and self.fused and not self.sparse and self.sp.target == "delta" and 0 < keep < self.n \
                and self.n >= BRACKET_MIN:
            self.cut = self._bracketed_thresholds(keep)
            for k in range(len(self.models)):
                if self.cut[k] is None:     # the sample's bracket missed (rare): exact search over the whole |δ|
                    self.cut[k] = self._threshold(k, keep, after_sparsify=True)
            return
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

    # -- compiled TIES (mean / sum, float32) ---------------------------------------------------
    def _fused_state(self, cuts: list[TopKStream | None]) -> dict:
        """Per-tensor arrays of the compiled loop: trim mode, threshold and tie quota per model."""
        K = len(self.models)
        mode = np.full(K, self.kern.KEEP_ALL, dtype=np.int8)
        thr = np.zeros(K, dtype=np.float32)
        quota = np.zeros(K, dtype=np.int64)
        for k, c in enumerate(cuts):
            if c is None or c.all:
                continue
            if c.none:
                mode[k] = self.kern.KEEP_NONE
            else:
                mode[k], thr[k], quota[k] = self.kern.THRESHOLD, c.threshold, c.quota
        return {"mode": mode, "thr": thr, "quota": quota, "w": np.asarray(self.weights, dtype=np.float32),
                "D": workspace("D", K * self.chunk, torch.float32).view(K, self.chunk),
                "amb_idx": workspace("amb_idx", self.chunk, torch.int64).numpy(),
                "amb_t": workspace("amb_t", K * self.chunk, torch.float32).view(K, self.chunk).numpy(),
                "T": workspace("T", (K + 4) * self.kern.BLOCK, torch.float32).view(K + 4, self.kern.BLOCK).numpy()}

    def _ties_fused(self, s: int, e: int, masks: list, mags: list, st: dict,
                    emit: Callable[[int, torch.Tensor], None], amb: list) -> int:
        """One chunk of TIES through :func:`dare_lab.engine.kernels.ties_chunk`; returns its sign balance."""
        m, mg, K = e - s, self.mg, len(self.models)
        sp, U, raw_inputs = self.sp, self._uniforms(masks, m), not self.sparse or self.dare_in_loop
        if not raw_inputs:
            bf = self._base(s, e)
            D = st["D"]
            rows = []
            for k in range(K):
                x = self._sparsified(k, masks[k], mags[k], bf, self._theta(k, s, e), D[k, :m])
                if x.data_ptr() != D[k, :m].data_ptr():
                    D[k, :m].copy_(x)
                rows.append(D[k, :m].numpy())
            base = bf.numpy()
            base_at = bf.__getitem__
        else:   # raw inputs: δ = θ − base inside the loop, which also catches NaN/Inf in θ and base
            raw = self.read_base(s, e)
            base = self._kernel_input(raw, "base")
            rows = self._model_rows(s, e)

            def base_at(idx: torch.Tensor) -> torch.Tensor:
                return raw[idx].to(self.dtype)
        dest = self.emit_into
        out = workspace("dacc", self.chunk, self.dtype)[:m]
        bits, done = _NO_BITS, out
        if dest is not None and dest.dtype == torch.bfloat16:   # bf16 straight into the destination
            done = dest[s:e]
            bits = done.view(torch.int16).numpy()
        elif dest is not None and dest.dtype == self.dtype:
            out = done = dest[s:e]
        status, balance, n_amb = self.kern.ties_chunk(
            tuple(rows), m, base, raw_inputs, U, np.float32(sp.drop_rate), np.float32(1.0 - sp.drop_rate), self.rescale,
            st["mode"], st["thr"], st["quota"], st["w"],
            mg.weighted_election, mg.merge_func == "mean", np.float32(mg.scaling), mg.scaling != 1.0,
            out.numpy(), st["amb_idx"], st["amb_t"], st["T"], bits)
        if status:
            raise NonFiniteChunk
        emit(s, done)
        if n_amb:
            idx = torch.from_numpy(st["amb_idx"][:n_amb].copy())
            sub = [torch.from_numpy(st["amb_t"][k, :n_amb].copy()) for k in range(K)]
            amb.append((idx + s, base_at(idx), sub))
        return balance

    def _uniforms(self, masks: list, m: int) -> tuple[np.ndarray, ...]:
        """DARE inside the compiled loop: the next m uniforms of each model's mask stream (torch.rand's
        numbers, so the masks are the same), or K empty arrays for no DARE."""
        K = len(self.models)
        if not self.dare_in_loop:
            return (np.zeros(0, dtype=np.float32),) * K
        return tuple(masks[k].uniforms(m, workspace(f"u{k}", self.chunk, torch.float32)).numpy() for k in range(K))

    def _ta_fused(self, s: int, e: int, masks: list, emit: Callable[[int, torch.Tensor], None]) -> None:
        """One chunk of task arithmetic / averaging through :func:`dare_lab.engine.kernels.ta_chunk`."""
        m, mg, sp, K = e - s, self.mg, self.sp, len(self.models)
        base = self._kernel_input(self.read_base(s, e), "base")
        rows = self._model_rows(s, e)
        out = workspace("acc", self.chunk, self.dtype)[:m]
        out16 = workspace("out16", self.chunk, torch.bfloat16)[:m] if self.emit_dtype == torch.bfloat16 else None
        if self.kern.ta_chunk(tuple(rows), m, base, self._uniforms(masks, m), np.float32(sp.drop_rate),
                              np.float32(1.0 - sp.drop_rate), self.rescale, mg.kind == "average", np.float32(K),
                              np.float32(mg.scaling), mg.scaling != 1.0, out.numpy(),
                              _NO_BITS if out16 is None else out16.view(torch.int16).numpy()):
            raise NonFiniteChunk
        emit(s, out if out16 is None else out16)

    def _ambiguous(self, idx: torch.Tensor, s: int, bf: torch.Tensor, sub: list[torch.Tensor]) -> tuple:
        """What the patch needs at ``idx`` (chunk-relative) if the majority sign is not +1: the
        flat index, the base values and each model's trimmed δ (merged only when needed)."""
        return idx + s, bf[idx], sub

    def _patch_values(self, amb: list[tuple], majority: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged values of the ambiguous entries for the tensor's majority sign (−1 or 0)."""
        idx = torch.cat([a[0] for a in amb])
        sub = [torch.cat([a[2][k] for a in amb]) for k in range(len(self.models))]
        el = torch.full((idx.numel(),), float(majority), dtype=self.dtype)
        merged = mergers.ties_disjoint_merge(sub, el, self.mg.merge_func, self.weights).mul_(self.mg.scaling)
        return idx, torch.cat([a[1] for a in amb]) + merged

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
        amb: list[tuple] = []   # (flat index, base values, trimmed δ per model) of the sign-0 entries
        fstate = self._fused_state(cuts) if self.fused and mg.kind == "ties" else None
        for s, e in self._chunks():
            if self.fused and mg.kind != "ties":
                self._ta_fused(s, e, masks, emit)
                continue
            if self.fused:
                balance += self._ties_fused(s, e, masks, mags, fstate, emit, amb)
                continue
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
                amb.append(self._ambiguous(idx, s, bf, [t[idx] for t in trimmed]))
        if mg.kind == "ties" and amb:
            majority = (balance > 0) - (balance < 0)
            if majority != 1:
                idx, vals = self._patch_values(amb, majority)
                if not _finite(vals):
                    raise NonFiniteChunk
                if patch is None:
                    raise RuntimeError("TIES needs a patch callback")
                patch(idx, vals)
