"""Delta sparsifiers: DARE, DropOnly and magnitude pruning (MP).

All functions are pure: tensor in, new tensor out, computed in the input's dtype (callers
pass float32 or wider, see ``dare_lab.engine``). They apply equally to a delta
δ = θ_SFT − θ_PRE or, for the paper's §4.7 ablation, to θ_SFT itself.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from types import ModuleType

import numpy as np
import torch

SAMPLERS = ("torch_rand", "geometric")
"""Mask samplers. ``torch_rand`` (default): keep iff u ≥ p, u = ``torch.rand`` float32, one draw per
entry. ``geometric``: the same Bernoulli(1−p) law drawn as geometric gaps between kept entries
(one float64 draw per *kept* entry, so its cost falls with p); different masks than torch_rand."""


def check_drop_rate(p: float, rescale: bool) -> float:
    """Validate a drop rate: p ∈ [0, 1) when kept entries are rescaled by 1/(1−p), else [0, 1]."""
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"drop rate must be a number, got {p!r}") from None
    if math.isnan(p) or p < 0.0 or p > 1.0 or (rescale and p >= 1.0):
        bound = "[0, 1)" if rescale else "[0, 1]"
        raise ValueError(f"drop rate p={p} is outside {bound}" + (" (rescaling by 1/(1-p) needs p < 1)" if rescale and p == 1.0 else ""))
    return p


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator, sampler: str = "torch_rand") -> torch.Tensor:
    """Bernoulli(1−p) keep mask, each entry independently.

    torch_rand: entry kept iff u ≥ p with u ~ U[0, 1) drawn in float32 (never bf16/fp16:
    that keeps the keep probability at 1−p to 2⁻²⁴). geometric: see :class:`GeometricStream`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown mask sampler {sampler!r}; choose one of {SAMPLERS}")
    if sampler == "geometric":
        n = math.prod(shape)
        mask = torch.zeros(n, dtype=torch.bool, device=generator.device)
        mask[GeometricStream(p, generator, n).take(n)] = True
        return mask.view(shape)
    u = torch.rand(shape, generator=generator, dtype=torch.float32, device=generator.device)
    return u >= p


class GeometricStream:
    """Kept positions of a Bernoulli(1−p) mask over a flat tensor, read front to back.

    The gap G before each kept entry is geometric, P(G = g) = p^g (1−p), drawn by inversion
    G = ⌊ln(1−u) / ln p⌋ with u ~ U[0, 1) in float64 (one draw per kept entry; exact up to
    float64 rounding, ≤ 2⁻⁵⁰ per draw), which makes every entry independently kept with
    probability 1−p. Gaps are drawn in batches whose size depends only on p, so the mask is a
    function of (p, generator state) alone: reading it in chunks of any size gives the same mask.
    """

    def __init__(self, p: float, generator: torch.Generator, n: int | None = None):
        self.p = float(p)
        self.gen = generator
        self.log_p = math.log(self.p) if 0.0 < self.p < 1.0 else 0.0
        # batch size: a function of (p, n) only, so chunking never changes the mask
        expect = (1.0 - self.p) * (n if n is not None else 1 << 16)
        self.batch = max(16, min(math.ceil((1.0 - self.p) * 65536), math.ceil(expect + 4 * math.sqrt(expect) + 8)))
        self.pending = torch.empty(0, dtype=torch.int64)
        self.last = -1          # absolute position of the last drawn kept entry
        self.cursor = 0         # next position to hand out

    def _refill(self) -> None:
        u = torch.rand(self.batch, generator=self.gen, dtype=torch.float64, device=self.gen.device)
        gaps = torch.log1p(u.neg_()).div_(self.log_p).floor_().add_(1.0).to(torch.int64)
        pos = gaps.cumsum_(0).add_(self.last)
        self.last = int(pos[-1])
        self.pending = pos if self.pending.numel() == 0 else torch.cat([self.pending, pos])

    def take(self, count: int) -> torch.Tensor:
        """Kept positions in [cursor, cursor + count), relative to cursor (int64, ascending)."""
        start, stop = self.cursor, self.cursor + count
        self.cursor = stop
        if self.p >= 1.0:
            return torch.empty(0, dtype=torch.int64)
        if self.p <= 0.0:
            return torch.arange(count, dtype=torch.int64)
        while self.last < stop - 1:
            self._refill()
        cut = int(torch.searchsorted(self.pending, stop))
        out = self.pending[:cut] - start
        self.pending = self.pending[cut:]
        return out


def _is_fresh_cpu(gen: torch.Generator) -> bool:
    """A CPU generator in the state ``manual_seed(initial_seed())`` leaves (nothing drawn yet)."""
    if gen.device.type != "cpu":
        return False
    return torch.equal(gen.get_state(), torch.Generator().manual_seed(gen.initial_seed()).get_state())


@functools.cache
def compiled_rand_is_torchs(kernels: ModuleType) -> bool:
    """Whether the compiled MT19937 (``kernels.mt_uniforms``) draws exactly what this torch's
    ``torch.rand`` draws: checked once per process over 2000 draws in uneven pieces, across
    state twists (a torch whose CPU generator changed keeps its own draws)."""
    seed = 0x5EED_2311_0309
    gen = torch.Generator().manual_seed(seed)
    ref = torch.cat([torch.rand(k, generator=gen) for k in (1, 623, 700, 676)]).numpy()
    state = np.empty(kernels.MT_N + 1, dtype=np.uint32)
    kernels.mt_seed(seed & 0xFFFFFFFF, state)
    got = np.empty_like(ref)
    for s, e in ((0, 5), (5, 1300), (1300, 2000)):
        kernels.mt_uniforms(state, got[s:e])
    return bool(np.array_equal(got, ref))


class MaskStream:
    """A tensor's DARE mask, produced chunk by chunk in flat order (same mask as :func:`keep_mask`).

    torch_rand: ``torch.rand`` on the CPU is serial per generator and fills elements in order,
    so consecutive draws of sizes a, b equal one draw of a + b (tested). With ``kernels``
    (:mod:`dare_lab.engine.kernels`) and a fresh CPU generator, the same uniforms come from the
    compiled MT19937 seeded like torch's (several times faster; ``generator`` is then not
    advanced) — only where this torch's ``torch.rand`` is checked to draw exactly those.
    """

    def __init__(self, p: float, generator: torch.Generator, sampler: str = "torch_rand", n: int | None = None,
                 kernels: ModuleType | None = None):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown mask sampler {sampler!r}; choose one of {SAMPLERS}")
        self.p, self.gen, self.sampler = float(p), generator, sampler
        self.geo = GeometricStream(p, generator, n) if sampler == "geometric" else None
        self.kern, self.mt = kernels, None
        if kernels is not None and sampler == "torch_rand" and _is_fresh_cpu(generator) and compiled_rand_is_torchs(kernels):
            self.mt = np.empty(kernels.MT_N + 1, dtype=np.uint32)
            kernels.mt_seed(generator.initial_seed() & 0xFFFFFFFF, self.mt)

    def uniforms(self, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """torch_rand only: the next ``count`` float32 uniforms (keep iff u ≥ p)."""
        if self.mt is not None:
            buf = torch.empty(count, dtype=torch.float32) if out is None else out[:count]
            self.kern.mt_uniforms(self.mt, buf.numpy())
            return buf
        if out is None:
            return torch.rand(count, generator=self.gen, dtype=torch.float32, device=self.gen.device)
        return torch.rand(count, generator=self.gen, dtype=torch.float32, device=self.gen.device, out=out[:count])

    def indices(self, count: int) -> torch.Tensor:
        """geometric only: kept positions among the next ``count`` entries."""
        return self.geo.take(count)

    def mask(self, count: int) -> torch.Tensor:
        if self.geo is not None:
            m = torch.zeros(count, dtype=torch.bool)
            m[self.geo.take(count)] = True
            return m
        return self.uniforms(count) >= self.p


def dare(delta: torch.Tensor, p: float, generator: torch.Generator, rescale: bool | str = True,
         sampler: str = "torch_rand") -> torch.Tensor:
    """DARE: drop each entry with probability p, rescale survivors by 1/(1−p).

    ``dare(δ, p)_i = m_i · δ_i / (1 − p)`` with ``m_i ~ Bernoulli(1 − p)``; p = 0 returns δ
    itself (bit for bit, no random draw). ``rescale=False`` is DropOnly; ``rescale="l1"`` is
    mergekit's ``dare_*``: the same mask, then the whole tensor × ‖δ‖₁/‖m⊙δ‖₁ (:func:`l1_rescaled`).
    """
    rescale = check_rescale(rescale)
    p = check_drop_rate(p, rescale is True)
    if p == 0.0:
        return delta
    return _masked(delta, keep_mask(delta.shape, p, generator, sampler), p, rescale)


def drop_only(delta: torch.Tensor, p: float, generator: torch.Generator, sampler: str = "torch_rand") -> torch.Tensor:
    """DropOnly: the DARE mask without rescaling, ``m_i · δ_i``."""
    return dare(delta, p, generator, rescale=False, sampler=sampler)


def keep_count(n: int, p: float) -> int:
    """Number of entries kept at drop rate p: ⌈(1−p)·n⌉, computed exactly on the decimal p."""
    return math.ceil((1 - Fraction(repr(float(p)))) * n)


COUNT_RULES = ("ceil", "mergekit")
"""How many entries magnitude pruning (MP, TIES' trim as a sparsifier) and Breadcrumbs keep:
``ceil`` (default): ⌈(1−p)·n⌉ on the decimal p; ``mergekit``: mergekit's ``int(density · n)``
evaluated in float64 with density = the decimal 1 − p (:func:`mergekit_keep_count`)."""
RESCALES = (False, True, "l1")
"""Sparsifier rescale rules: False (none), True (×1/(1−p); DARE / DELLA / DAREx always
rescale by their own rule) or ``"l1"``: mergekit's ``rescale_norm: l1`` (:func:`l1_rescaled`)
in place of any per-entry factor."""
L1_EPS = 1e-7
"""mergekit's tolerance: an L1 norm below it (before or after the mask) skips the rescale."""


def density_of(p: float) -> float:
    """The density 1 − p as the decimal it stands for (the nearest float to 1 − decimal(p)):
    a mergekit density d mapped to p = :func:`drop_rate_of` (d) comes back as d itself."""
    return float(1 - Fraction(repr(float(p))))


def drop_rate_of(density: float) -> float:
    """The drop rate p = 1 − density on the decimal density (inverse of :func:`density_of`)."""
    return float(1 - Fraction(repr(float(density))))


def mergekit_keep_count(n: int, p: float) -> int:
    """mergekit's ``magnitude`` (TIES' trim) count at density d = 1 − p: ``max(1, int(d * n))``
    in float64 (floor after float rounding: d = 0.57, n = 100 keeps 56; at least one entry),
    0 at d = 0 (mergekit 0.1.5)."""
    d = density_of(p)
    return 0 if d <= 0 or n == 0 else max(1, int(d * n))


def check_rescale(rescale) -> bool | str:
    """Validate a sparsifier rescale rule (:data:`RESCALES`)."""
    if isinstance(rescale, str) and rescale.lower() in ("l1", "true", "false"):
        return {"l1": "l1", "true": True, "false": False}[rescale.lower()]
    if isinstance(rescale, bool):
        return rescale
    raise ValueError(f"sparsifier rescale={rescale!r} is not a rescale rule; choose true, false or l1")


def l1_rescaled(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """mergekit's L1 rescale: the sparsified ``kept`` × ‖δ‖₁ / ‖kept‖₁ (both sums in δ's
    dtype, the ratio a 0-dim tensor), ``kept`` unchanged where either norm is < 1e-7."""
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return kept
    return kept * (before / after)


def _masked(delta: torch.Tensor, keep: torch.Tensor, p: float, rescale) -> torch.Tensor:
    """δ on the kept entries, then the rescale rule: True ×1/(1−p), False none, "l1" mergekit's."""
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    if rescale is True:
        return torch.where(keep, delta / (1.0 - p), zero)
    kept = torch.where(keep, delta, zero)
    return l1_rescaled(delta, kept) if rescale == "l1" else kept


def sample_bracket(sample: torch.Tensor, n: int, k: int, widen: float = 1.0) -> tuple[float, float]:
    """Bounds [lo, hi] that hold the k-th largest of ``n`` values with high probability, read off
    a sorted sample of them: the sample ranks ± 4·``widen`` binomial standard deviations (+8)
    around the target's (±inf where that runs off the sample)."""
    m = len(sample)
    centre = (n - k) / n * m          # sample rank of the target (from the bottom)
    margin = widen * (4.0 * math.sqrt(m * (k / n) * (1 - k / n)) + 8)
    lo_i, hi_i = int(centre - margin), int(centre + margin)
    lo = float(sample[lo_i]) if lo_i >= 0 else -math.inf
    hi = float(sample[hi_i]) if hi_i < m else math.inf
    return lo, hi


def rank_from_top(cand: np.ndarray | torch.Tensor, r: int) -> tuple[float, int]:
    """The r-th largest value of ``cand`` (1 ≤ r ≤ len) and how many entries exceed it; numpy's
    introselect on numpy input (≈ 8x faster than ``torch.kthvalue`` on one CPU thread). May
    reorder a numpy ``cand`` in place."""
    if isinstance(cand, np.ndarray):
        i = cand.shape[0] - r
        cand.partition(i)
        thr = cand[i]
        return float(thr), int(np.count_nonzero(cand[i + 1:] > thr))
    thr = torch.kthvalue(cand, cand.numel() - r + 1).values
    return float(thr), int(torch.count_nonzero(cand > thr))


def kth_largest(a: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Exact k-th largest value of a flat tensor without NaN, and how many entries exceed it.

    Equals ``torch.kthvalue(a, n−k+1)`` but runs in a few vectorised passes instead of a
    selection over the whole tensor (≈ 20 ns per entry on CPU): a fixed-seed sample brackets the
    value, one pass counts the entries above the bracket and gathers those inside it, and the
    answer is selected among the gathered ones; a bracket that misses is widened and retried.
    """
    n = a.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if n <= 1 << 16:
        thr = torch.kthvalue(a, n - k + 1).values
        return thr, int((a > thr).sum())
    m = min(1 << 16, n // 8)
    g = torch.Generator(device=a.device).manual_seed(n ^ 0x5EED)
    # numpy's sorts, selections, compares, counts and boolean gathers run 2-20x faster than
    # torch's on one CPU thread; slices keep the boolean temporaries small (cache-sized)
    on_numpy = a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64)
    vals = a.detach().numpy() if on_numpy else a
    sample = a[torch.randint(n, (m,), generator=g, device=a.device)]
    sample = torch.from_numpy(np.sort(sample.numpy())) if on_numpy else sample.sort().values
    step = 1 << 16 if on_numpy else 1 << 22
    count = np.count_nonzero if on_numpy else torch.count_nonzero
    widen = 1.0
    while True:
        lo, hi = sample_bracket(sample, n, k, widen)
        above, parts = 0, []
        v = lo if lo != -math.inf else float(sample[0])
        if v == (hi if hi != math.inf else float(sample[m - 1])):
            # the bracket holds one value (a tie-heavy tensor, e.g. mostly zeros after DARE):
            # count the entries above and at it instead of gathering them
            inside = 0
            for s in range(0, n, step):
                part = vals[s: s + step]
                above += int(count(part > v))
                inside += int(count(part == v))
            if 1 <= k - above <= inside:
                return torch.tensor(v, dtype=a.dtype, device=a.device), above
            above = 0
        for s in range(0, n, step):
            part = vals[s: s + step]
            if hi != math.inf:
                above += int(count(part > hi))
            sel = part >= lo
            sel &= part <= hi
            parts.append(part[sel])
        cand = np.concatenate(parts) if on_numpy else torch.cat(parts)
        r = k - above                 # rank of the target among cand, from the top
        if 1 <= r <= len(cand):
            thr, greater = rank_from_top(cand, r)
            return torch.tensor(thr, dtype=a.dtype, device=a.device), greater + above
        if lo == -math.inf and hi == math.inf:
            # only NaN can get here (comparisons with NaN are false): defer to kthvalue
            thr = torch.kthvalue(a, n - k + 1).values
            return thr, int(torch.count_nonzero(a > thr))
        widen *= 8


def top_magnitude_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k largest |x| entries (ties: lowest flat index first).

    Uses an exact k-th value threshold (:func:`kth_largest`), not a full sort.
    """
    n = x.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    flat = x.detach().abs().flatten()
    threshold, greater = kth_largest(flat, k)
    keep = flat > threshold
    missing = k - greater
    if missing > 0:  # ties at the threshold: the lowest flat indices
        ties = torch.nonzero(flat == threshold).flatten()[:missing]
        keep[ties] = True
    return keep.view(x.shape)


def magnitude_prune(delta: torch.Tensor, p: float, rescale: bool | str = False, count: str = "ceil") -> torch.Tensor:
    """MP: keep the ⌈(1−p)n⌉ largest |δ| of the tensor, zero the rest; optional ×1/(1−p)
    (``rescale=True``) or mergekit's L1 rescale (``"l1"``). ``count="mergekit"``: keep
    mergekit's ``max(1, int(density·n))`` instead (:func:`mergekit_keep_count`)."""
    rescale = check_rescale(rescale)
    p = check_drop_rate(p, rescale is True)
    if p == 0.0:
        return delta
    k = _count(delta.numel(), p, count)
    return _masked(delta, top_magnitude_mask(delta, k), p, rescale)


def _count(n: int, p: float, count: str) -> int:
    if count not in COUNT_RULES:
        raise ValueError(f"unknown count rule {count!r}; choose one of {COUNT_RULES}")
    return mergekit_keep_count(n, p) if count == "mergekit" else keep_count(n, p)


# ---------------------------------------------------------------------------------------------
# Beyond the paper: DELLA (MagPrune), Model Breadcrumbs, DAREx-q
# ---------------------------------------------------------------------------------------------

RANK_SCOPES = ("row", "tensor")
"""Where DELLA ranks magnitudes: ``row`` (default: each slice ``x[i]`` along the first dimension,
i.e. each output neuron of a linear weight, ranked on its own; a 1-D tensor is one row) — what
the DELLA authors' code runs as ``della`` (their mergekit fork, ``rank_magnitude_sampling``) and
what mergekit does — or ``tensor`` (one ranking over all entries: their "layer" variant)."""


def check_della_epsilon(p: float, epsilon: float) -> float:
    """Validate DELLA's spread ε at drop rate p: every keep probability (1−p) ± ε must lie in
    (0, 1], i.e. 0 ≤ ε ≤ p and ε < 1 − p."""
    try:
        eps = float(epsilon)
    except (TypeError, ValueError):
        raise ValueError(f"DELLA epsilon must be a number, got {epsilon!r}") from None
    p = float(p)
    if math.isnan(eps) or math.isinf(eps) or eps < 0.0 or eps > p or Fraction(repr(eps)) >= 1 - Fraction(repr(p)):
        raise ValueError(f"DELLA epsilon={eps} at p={p} must satisfy 0 <= epsilon <= p and epsilon < 1-p "
                         f"(keep probabilities (1-p) +- epsilon in (0, 1])")
    return eps


def magnitude_rank_norm(x: torch.Tensor, scope: str = "row") -> torch.Tensor:
    """Normalised magnitude rank r̃_i ∈ [0, 1] of every entry (float64, shape of ``x``).

    Entries are ordered by |x| ascending, ties by flat index *descending*: of two equal
    magnitudes the lower index ranks higher (is kept more), as :func:`top_magnitude_mask` and MP
    keep the lowest index first (the same order read from the other end); r̃_i = r_i / (m − 1) with r_i ∈
    {0, …, m−1} the position in that order within its group of m entries (the whole tensor,
    or one row for ``scope="row"``). A group of one entry gets r̃ = 1/2.
    """
    if scope not in RANK_SCOPES:
        raise ValueError(f"unknown DELLA rank scope {scope!r}; choose one of {RANK_SCOPES}")
    rows = x.shape[0] if (scope == "row" and x.dim() >= 2) else 1
    mag = x.detach().abs().reshape(rows, -1)
    m = mag.shape[1]
    if m == 1:
        return torch.full(x.shape, 0.5, dtype=torch.float64, device=x.device)
    # ascending |x|, ties: higher index first (a stable sort of the reversed rows, mapped back)
    order = (m - 1) - torch.sort(mag.flip(1), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m, device=x.device).expand(rows, m).contiguous())
    return (ranks.to(torch.float64) / (m - 1)).reshape(x.shape)


def della_drop_probabilities(x: torch.Tensor, p: float, epsilon: float, scope: str = "row") -> torch.Tensor:
    """DELLA's per-entry drop probabilities p_i = p + ε − 2ε·r̃_i (float64, shape of ``x``):
    keep probability 1 − p_i = (1−p) − ε + 2ε·r̃_i, from (1−p)−ε for the smallest |x| to
    (1−p)+ε for the largest (r̃: :func:`magnitude_rank_norm`)."""
    p = check_drop_rate(p, rescale=True)
    eps = check_della_epsilon(p, epsilon)
    if eps == 0.0:
        return torch.full(x.shape, p, dtype=torch.float64, device=x.device)
    return (p + eps) - (2.0 * eps) * magnitude_rank_norm(x, scope)


def della(delta: torch.Tensor, p: float, epsilon: float, generator: torch.Generator,
          rescale: bool | str = True, scope: str = "row") -> torch.Tensor:
    """DELLA / MagPrune (Deep et al. 2024): magnitude-ranked drop probabilities around p.

    ``della(δ, p, ε)_i = m_i · δ_i / (1 − p_i)``, ``m_i ~ Bernoulli(1 − p_i)``,
    ``p_i = p + ε − 2ε·r̃_i`` with r̃_i ∈ [0, 1] the normalised magnitude rank (largest |δ|
    kept most; ties: the lower flat index ranks higher, as in MP), per row (``scope="row"``, default) or over
    the whole tensor (``scope="tensor"``). The keep test is DARE's: ``u_i ≥ p_i`` with
    ``u ~ torch.rand`` float32 from ``generator`` (p_i rounded to float32), so ε = 0 gives
    DARE's mask and values bit for bit. Survivors are rescaled by their own 1/(1 − p_i) (the
    DELLA authors' code; mergekit instead rescales the whole tensor to its L1 norm), ``rescale=False``
    skips it, ``rescale="l1"`` is mergekit's (the same mask, then the whole tensor ×
    ‖δ‖₁/‖m⊙δ‖₁, :func:`l1_rescaled`). p ∈ [0, 1), ε ∈ [0, min(p, 1−p)); p = 0 returns δ itself.
    """
    rescale = check_rescale(rescale)
    p = check_drop_rate(p, rescale=True)
    eps = check_della_epsilon(p, epsilon)
    if p == 0.0:
        return delta
    if eps == 0.0:
        return dare(delta, p, generator, rescale=rescale)
    drop = della_drop_probabilities(delta, p, eps, scope)
    u = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=generator.device)
    mask = u >= drop.to(torch.float32)
    if rescale == "l1":
        return _masked(delta, mask, p, "l1")
    kept = delta / (1.0 - drop).to(delta.dtype) if rescale else delta
    return torch.where(mask, kept, torch.zeros((), dtype=delta.dtype, device=delta.device))


def breadcrumbs_counts(n: int, p: float, gamma: float) -> tuple[int, int, int]:
    """(outliers dropped from the top, entries kept, entries dropped from the bottom) for a
    tensor of n entries: kept k = ⌈(1−p)·n⌉ (MP's count), top t = min(⌊γ·n⌋, n − k), bottom
    n − k − t; computed exactly on the decimal p and γ."""
    k = keep_count(n, p)
    t = min(math.floor(Fraction(repr(float(gamma))) * n), n - k)
    return t, k, n - k - t


def check_gamma(gamma: float) -> float:
    """Validate Breadcrumbs' outlier fraction γ ∈ [0, 1)."""
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"breadcrumbs gamma must be a number, got {gamma!r}") from None
    if math.isnan(g) or not 0.0 <= g < 1.0:
        raise ValueError(f"breadcrumbs gamma={g} is outside [0, 1)")
    return g


def mergekit_breadcrumbs_counts(n: int, p: float, gamma: float) -> tuple[int, int, int]:
    """mergekit's ``magnitude_outliers`` counts (top dropped, kept, bottom dropped) at density
    d = 1 − p (mergekit 0.1.5, float64 as it computes them): kept ``int(d·n)``, bottom
    ``max(0, n − kept − int(γ·n))``, top the rest (so the top shrinks to n − kept when ⌊γn⌋ is
    too large). dare_lab's :func:`breadcrumbs_counts` with ⌊·⌋ for ⌈·⌉."""
    target = int(density_of(p) * n)
    bottom = max(0, n - target - int(float(gamma) * n))
    return n - bottom - target, target, bottom


def breadcrumbs(delta: torch.Tensor, p: float, gamma: float, rescale: bool | str = False,
                count: str = "ceil") -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the largest-|δ| outliers *and* the
    smallest |δ| of each tensor, keep the band in between.

    Order the n entries by |δ| descending, ties by flat index ascending (MP's order). The first
    t = min(⌊γ·n⌋, n − k) are outliers (dropped), the next k = ⌈(1−p)·n⌉ are kept, the remaining
    n − k − t (smallest) are dropped: p is the total dropped fraction (density 1−p, as for every
    sparsifier here), of which γ comes off the top. γ = 0 is MP exactly; p = 0 returns δ itself.
    ``rescale=True`` adds ×1/(1−p) (the paper does not rescale), ``"l1"`` is mergekit's optional
    L1-norm rescale. ``count="mergekit"``: mergekit's counts (:func:`mergekit_breadcrumbs_counts`).
    Deterministic: no generator.
    """
    rescale = check_rescale(rescale)
    p = check_drop_rate(p, rescale is True)
    g = check_gamma(gamma)
    if p == 0.0:
        return delta
    if count not in COUNT_RULES:
        raise ValueError(f"unknown count rule {count!r}; choose one of {COUNT_RULES}")
    counts = mergekit_breadcrumbs_counts if count == "mergekit" else breadcrumbs_counts
    t, k, _ = counts(delta.numel(), p, g)
    keep = top_magnitude_mask(delta, t + k)
    if t > 0:
        keep &= ~top_magnitude_mask(delta, t)
    return _masked(delta, keep, p, rescale)


def check_rescale_q(q: float, p: float) -> float:
    """Validate a DAREx rescale q at drop rate p: 1 − p ≤ q ≤ 1 (rescale 1/q between no
    rescale and DARE's 1/(1−p))."""
    try:
        q = float(q)
    except (TypeError, ValueError):
        raise ValueError(f"DAREx rescale_q must be a number or 'auto', got {q!r}") from None
    p = float(p)
    if math.isnan(q) or q > 1.0 or q <= 0.0 or Fraction(repr(q)) < 1 - Fraction(repr(p)):
        raise ValueError(f"DAREx rescale_q={q} is outside [1-p, 1] = [{float(1 - Fraction(repr(p))):g}, 1] at p={p}")
    return q


def darex_auto_q(delta: torch.Tensor, p: float) -> float:
    """dare_lab's data-free, per-tensor choice of DAREx's q (see :func:`darex`).

    Treat the tensor as a linear map whose output i is row ``δ[i]`` (first dimension; a 1-D
    tensor: each entry its own output) and feed it the constant input x = 1. Dropping with keep
    probability c = 1 − p and rescaling by 1/q changes output i by h_i = Σ_j (m_ij/q − 1) δ_ij,
    whose mean square over the mask is E‖h‖² = (c/q − 1)²·A + p·c/q²·B with A = Σ_i (Σ_j δ_ij)²
    and B = Σ_ij δ_ij². Its minimiser over 1/q is q* = c + p·B/A, clipped to [1 − p, 1]
    (A = 0: q = 1). Computed in float64; q* = 1 − p (DARE) when rows are coherent (A ≫ B),
    q* → 1 (DropOnly) when row sums cancel (A ≲ B).
    """
    p = float(p)
    c = 1.0 - p
    if p == 0.0:
        return 1.0
    d = delta.detach().to(torch.float64)
    rows = d.reshape(d.shape[0], -1) if d.dim() >= 2 else d.reshape(-1, 1)
    a = float(rows.sum(dim=1).square().sum())
    b = float(rows.square().sum())
    if a == 0.0 or not math.isfinite(a) or not math.isfinite(b):
        return 1.0
    return min(1.0, max(float(1 - Fraction(repr(p))), c + p * b / a))


def darex(delta: torch.Tensor, p: float, generator: torch.Generator, q: float | str = "auto",
          sampler: str = "torch_rand") -> torch.Tensor:
    """DAREx-q (Deng et al. 2024, "DARE the Extreme"): DARE's mask, survivors rescaled by 1/q
    instead of 1/(1 − p).

    ``darex(δ, p, q)_i = m_i · δ_i / q`` with DARE's mask ``m_i ~ Bernoulli(1 − p)`` (same
    generator, same draws: q = 1 − p is DARE bit for bit, q = 1 is DropOnly). ``q`` is a number
    in [1 − p, 1] or ``"auto"``: :func:`darex_auto_q`, a closed-form per-tensor stand-in for the
    paper's choice of q (the paper picks q on a validation set, or as the q minimising the
    change of the model's last-layer outputs on a batch of unlabeled inputs; here the "input" is
    the constant vector and the "layer" the tensor itself, so no data is needed). p ∈ [0, 1);
    p = 0 returns δ itself.
    """
    p = check_drop_rate(p, rescale=True)
    if p == 0.0:
        return delta
    qv = darex_auto_q(delta, p) if (isinstance(q, str) and q == "auto") else check_rescale_q(q, p)
    mask = keep_mask(delta.shape, p, generator, sampler)
    is_dare = Fraction(repr(qv)) == 1 - Fraction(repr(p))     # q = 1 − p on the decimals: DARE's own division
    kept = delta / (1.0 - p) if is_dare else (delta if qv == 1.0 else delta / qv)
    return torch.where(mask, kept, torch.zeros((), dtype=delta.dtype, device=delta.device))
