"""Mergers of (sparsified) deltas: average, task arithmetic and TIES; and mergekit's two rules,
``linear`` (a weighted average of the models' own tensors) and ``gta`` (its generalized task
arithmetic, in its operation order).

Each takes the pre-trained tensor and a list of deltas δ̂_k of one tensor name and returns
the merged tensor. They are per-tensor by construction: TIES' trim is per tensor by default
(``trim_scope="tensor"``); for the official TIES code's / MergeLM's whole-model trim
(``trim_scope="model"``) the engine first finds each model's threshold over all its merged
tensors (:mod:`dare_lab.engine.global_trim`, streamed) and TIES then trims each tensor with
that fixed threshold (:func:`ties_trim_threshold`, ``ties(..., thresholds=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch

from dare_lab.ops.sparsify import keep_count, top_magnitude_mask

TIES_MERGE_FUNCS = ("mean", "sum", "max")


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} model weights for {n} models")
    return [float(w) for w in weights]


def average(base: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """θ = θ_PRE + (1/K) Σ_k δ̂_k."""
    acc = torch.zeros_like(base)
    for d in deltas:
        acc.add_(d)
    return base + acc.div_(len(deltas))


def task_arithmetic(base: torch.Tensor, deltas: Sequence[torch.Tensor], scaling: float = 1.0,
                    weights: Sequence[float] | None = None) -> torch.Tensor:
    """θ = θ_PRE + λ Σ_k w_k δ̂_k (w_k = 1 by default)."""
    acc = torch.zeros_like(base)
    for w, d in zip(_weights(len(deltas), weights), deltas):
        acc.add_(d, alpha=w)
    return base + acc.mul_(scaling)


def ties_trim(delta: torch.Tensor, retain_ratio: float) -> torch.Tensor:
    """Keep the top ⌈k·n⌉ entries of |δ| in this tensor (k = retain_ratio), zero the rest."""
    if not 0.0 < retain_ratio <= 1.0:
        raise ValueError(f"TIES retain_ratio={retain_ratio} is outside (0, 1]")
    keep = top_magnitude_mask(delta, keep_count(delta.numel(), 1.0 - retain_ratio))
    return torch.where(keep, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def model_trim_rank(n: int, retain_ratio: float) -> int:
    """Whole-model TIES trim (``trim_scope="model"``): the rank r, from the bottom, of the
    threshold among a model's n merged entries: r = ⌊(1 − k)·n⌋ (k = retain_ratio, exact on the
    decimal k). The model keeps every entry with |δ| ≥ t, t = the r-th smallest |δ| (1-based)
    over all n entries — ties at t are all kept, so at least n − r + 1 entries survive; r = 0
    (k = 1, or n < 1/(1−k)) keeps everything. This is MergeLM's ``ties_merging``
    (``num_mask_params = int(n · mask_rate)``, ``kthvalue(num_mask_params)``, keep ``>=``) with
    mask_rate = 1 − k; the official TIES code takes r = n − ⌊k·n⌋ instead, one rank higher
    where k·n is not an integer."""
    if not 0.0 < float(retain_ratio) <= 1.0:
        raise ValueError(f"TIES retain_ratio={retain_ratio} is outside (0, 1]")
    return math.floor((1 - Fraction(repr(float(retain_ratio)))) * int(n))


def ties_trim_threshold(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the entries with |δ| ≥ ``threshold`` (a model's whole-model threshold, see
    :func:`model_trim_rank`), zero the rest; a threshold of 0 keeps everything."""
    keep = delta.abs() >= threshold
    return torch.where(keep, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def ties_elect(trimmed: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elected sign per entry: sign(Σ_k δ_k); entries whose sum is 0 take the tensor's majority sign."""
    total = torch.zeros_like(trimmed[0])
    for t in trimmed:
        total.add_(t)
    sign = torch.sign(total)
    return torch.where(sign == 0, majority_sign(sign), sign)


def majority_sign(sign: torch.Tensor) -> torch.Tensor:
    """sign(#positive − #negative) of a tensor of signs, counted exactly in int64 (a float32
    sum of ±1 loses exactness past 2²⁴ entries); a 0-dim tensor of ``sign``'s dtype."""
    balance = int(torch.count_nonzero(sign > 0)) - int(torch.count_nonzero(sign < 0))
    return torch.tensor(float((balance > 0) - (balance < 0)), dtype=sign.dtype, device=sign.device)


def ties_disjoint_merge(trimmed: Sequence[torch.Tensor], sign: torch.Tensor, merge_func: str = "mean",
                        weights: Sequence[float] | None = None) -> torch.Tensor:
    """Combine the entries whose sign agrees with the elected one.

    mean: Σ_k w_k δ_k [agree] / Σ_k [agree]; sum: Σ_k w_k δ_k [agree];
    max: the agreeing w_k δ_k of largest magnitude. Entries with no agreeing model are 0.
    """
    if merge_func not in TIES_MERGE_FUNCS:
        raise ValueError(f"unknown TIES merge_func {merge_func!r}; choose one of {TIES_MERGE_FUNCS}")
    ws = _weights(len(trimmed), weights)
    acc = torch.zeros_like(sign)
    count = torch.zeros_like(sign)
    for w, t in zip(ws, trimmed):
        agree = (torch.sign(t) == sign) & (t != 0)
        contrib = torch.where(agree, t * w, torch.zeros((), dtype=t.dtype))
        if merge_func == "max":
            acc = torch.where(contrib.abs() > acc.abs(), contrib, acc)
        else:
            acc.add_(contrib)
            count.add_(agree.to(count.dtype))
    if merge_func == "mean":
        acc.div_(count.clamp_(min=1))
    return acc


def ties(base: torch.Tensor, deltas: Sequence[torch.Tensor], retain_ratio: float | Sequence[float] = 0.2,
         scaling: float = 1.0, merge_func: str = "mean", weights: Sequence[float] | None = None,
         weighted_election: bool = False, thresholds: Sequence[float] | None = None) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023), per tensor: trim → elect sign → disjoint merge.

    θ = θ_PRE + λ · disjoint_merge(trim_{k_k}(δ_k)). ``retain_ratio`` is one k for every model
    or one per model. Per-model weights scale the merged entries but do not change the sign
    election unless ``weighted_election`` is set. With ``thresholds`` (one per model: the
    whole-model thresholds of ``trim_scope="model"``) the trim keeps |δ_k| ≥ t_k instead
    (:func:`ties_trim_threshold`) and ``retain_ratio`` is not used.
    """
    if thresholds is not None:
        if len(thresholds) != len(deltas):
            raise ValueError(f"got {len(thresholds)} TIES trim thresholds for {len(deltas)} models")
        trimmed = [ties_trim_threshold(d, float(t)) for d, t in zip(deltas, thresholds)]
    else:
        ratios = [retain_ratio] * len(deltas) if isinstance(retain_ratio, (int, float)) else list(retain_ratio)
        if len(ratios) != len(deltas):
            raise ValueError(f"got {len(ratios)} TIES retain ratios for {len(deltas)} models")
        trimmed = [ties_trim(d, float(r)) for d, r in zip(deltas, ratios)]
    ws = _weights(len(deltas), weights)
    electors = [t * w for w, t in zip(ws, trimmed)] if weighted_election else trimmed
    sign = ties_elect(electors)
    merged = ties_disjoint_merge(trimmed, sign, merge_func, ws)
    return base + merged.mul_(scaling)


GTA_CONSENSUS = ("none", "sum")


def _stacked_weights(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """The weights as a tensor of the stacked inputs' dtype, broadcast over their entries."""
    w = torch.tensor([float(x) for x in weights], dtype=like.dtype, device=like.device)
    return w.view(-1, *([1] * (like.dim() - 1)))


def linear(thetas: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
           normalize: bool = True) -> torch.Tensor:
    """mergekit's ``linear``: θ = Σ_k w_k θ_k / Σ_k w_k (``normalize``) or Σ_k w_k θ_k, on the
    models' own tensors, in mergekit 0.1.5's order of operations: w_k rounded to float32
    (float64 for float64 inputs), accumulated from 0 in the models' order (``addcmul``), one
    division by the float32 Σ_k w_k, the result cast back to the inputs' dtype."""
    first = thetas[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(_weights(len(thetas), weights), dtype=torch.float64, device=first.device).to(dtype)
    if normalize and float(w.sum()) == 0.0:
        raise ValueError("merger=linear with normalize: the weights sum to 0")
    result = torch.zeros_like(first, dtype=dtype)
    for theta, c in zip(thetas, w.unbind(0)):
        result.addcmul_(theta, c)
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)


def gta(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
        consensus: str = "none", normalize: bool = False, scaling: float = 1.0) -> torch.Tensor:
    """mergekit's generalized task arithmetic (``task_arithmetic``, ``ties``, ``dare_*``,
    ``breadcrumbs*``, ``della*`` after their sparsifier), in its order of operations.

    With D_k = w_k·δ̂_k (the product in the deltas' dtype, w_k rounded to it):
    consensus ``sum``: the elected sign e = +1 where Σ_k D_k ≥ 0 (Σ = 0 elects +), else −1;
    model k agrees where sign(D_k) = e (a zero entry never agrees); mixed = Σ_k D_k·[agree],
    divisor = Σ_k w_k·[agree] (0 → 1). consensus ``none``: mixed = Σ_k D_k, divisor = Σ_k w_k
    (|·| < 1e-8 → 1). θ = θ_PRE + λ·mixed / divisor with ``normalize``, θ_PRE + λ·mixed without
    (λ applied only when ≠ 1, after the division; sums over the models in order).
    """
    if consensus not in GTA_CONSENSUS:
        raise ValueError(f"unknown gta consensus {consensus!r}; choose one of {GTA_CONSENSUS}")
    stacked = torch.stack(list(deltas), dim=0)
    w = _stacked_weights(_weights(len(deltas), weights), stacked)
    weighted = stacked * w
    if consensus == "sum":
        elected = (weighted.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
        agree = (weighted.sign() == elected).to(stacked.dtype)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if scaling != 1:
        mixed *= scaling
    return base + mixed
