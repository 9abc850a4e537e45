"""Delta sparsifiers: DARE, DropOnly and magnitude pruning (MP).

All functions are pure: tensor in, new tensor out, computed in the input's dtype (callers
pass float32 or wider, see ``dare_lab.engine``). They apply equally to a delta
δ = θ_SFT − θ_PRE or, for the paper's §4.7 ablation, to θ_SFT itself.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

SAMPLERS = ("torch_rand",)


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
    """Bernoulli(1−p) keep mask: entry kept iff u ≥ p with u ~ U[0, 1) drawn in float32.

    Drawing u in float32 (never bf16/fp16) keeps the keep probability at 1−p to 2⁻²⁴.
    """
    if sampler != "torch_rand":
        raise ValueError(f"unknown mask sampler {sampler!r}; choose one of {SAMPLERS}")
    u = torch.rand(shape, generator=generator, dtype=torch.float32, device=generator.device)
    return u >= p


def dare(delta: torch.Tensor, p: float, generator: torch.Generator, rescale: bool = True, sampler: str = "torch_rand") -> torch.Tensor:
    """DARE: drop each entry with probability p, rescale survivors by 1/(1−p).

    ``dare(δ, p)_i = m_i · δ_i / (1 − p)`` with ``m_i ~ Bernoulli(1 − p)``; p = 0 returns δ
    itself (bit for bit, no random draw). ``rescale=False`` is DropOnly.
    """
    p = check_drop_rate(p, rescale)
    if p == 0.0:
        return delta
    mask = keep_mask(delta.shape, p, generator, sampler)
    kept = delta / (1.0 - p) if rescale else delta
    return torch.where(mask, kept, torch.zeros((), dtype=delta.dtype, device=delta.device))


def drop_only(delta: torch.Tensor, p: float, generator: torch.Generator, sampler: str = "torch_rand") -> torch.Tensor:
    """DropOnly: the DARE mask without rescaling, ``m_i · δ_i``."""
    return dare(delta, p, generator, rescale=False, sampler=sampler)


def keep_count(n: int, p: float) -> int:
    """Number of entries kept at drop rate p: ⌈(1−p)·n⌉, computed exactly on the decimal p."""
    return math.ceil((1 - Fraction(repr(float(p)))) * n)


def top_magnitude_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k largest |x| entries (ties: lowest flat index first).

    Uses a k-th value threshold, not a full sort, so it runs in O(n).
    """
    n = x.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    flat = x.detach().abs().flatten()
    threshold = torch.kthvalue(flat, n - k + 1).values  # k-th largest
    keep = flat > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        ties = torch.nonzero(flat == threshold).flatten()[:missing]
        keep[ties] = True
    return keep.view(x.shape)


def magnitude_prune(delta: torch.Tensor, p: float, rescale: bool = False) -> torch.Tensor:
    """MP: keep the ⌈(1−p)n⌉ largest |δ| of the tensor, zero the rest; optional ×1/(1−p)."""
    p = check_drop_rate(p, rescale)
    if p == 0.0:
        return delta
    keep = top_magnitude_mask(delta, keep_count(delta.numel(), p))
    kept = delta / (1.0 - p) if rescale else delta
    return torch.where(keep, kept, torch.zeros((), dtype=delta.dtype, device=delta.device))
