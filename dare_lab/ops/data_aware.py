"""Pure formulas of the data-aware mergers: Fisher merging and RegMean.

Fisher merging (Matena & Raffel 2022), element-wise per tensor:

    θ* = Σ_k λ_k (F_k + ε) θ_k / Σ_k λ_k (F_k + ε)

F_k: diagonal Fisher of model k on its own task; λ_k: per-model scaling coefficient;
ε (``min_fisher``, 1e-6 as in MergeLM) keeps entries with zero Fisher everywhere at the
λ-weighted mean instead of 0/0.

RegMean (Jin et al. 2023), per linear layer y = x Wᵀ (torch layout W: out × in):

    G̃_k = diag(G_k) + α (G_k − diag(G_k))          (α: off-diagonal scale)
    W*ᵀ = (Σ_k G̃_k)⁻¹ Σ_k G̃_k W_kᵀ   ⇔   W* = (Σ_k W_k G̃_k)(Σ_k G̃_k)⁻¹

G_k = X_kᵀ X_k: Gram matrix of the layer's inputs on model k's examples. Non-linear
parameters (biases, LayerNorm, embeddings) are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _scalings(n: int, scalings: Sequence[float] | float | None) -> list[float]:
    if scalings is None:
        return [1.0] * n
    if isinstance(scalings, (int, float)):
        return [float(scalings)] * n
    if len(scalings) != n:
        raise ValueError(f"got {len(scalings)} scaling coefficients for {n} models")
    out = [float(s) for s in scalings]
    if any(s < 0 for s in out) or not any(s > 0 for s in out):
        raise ValueError(f"scaling coefficients must be >= 0 with at least one > 0, got {out}")
    return out


def fisher_merge(params: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor],
                 scalings: Sequence[float] | float | None = None, min_fisher: float = 1e-6) -> torch.Tensor:
    """θ* = Σ_k λ_k (F_k + ε) θ_k / Σ_k λ_k (F_k + ε) (element-wise; float32 or wider in, same out)."""
    if len(params) != len(fishers) or not params:
        raise ValueError(f"fisher_merge needs one Fisher per model, got {len(params)} models and {len(fishers)} Fishers")
    if min_fisher < 0:
        raise ValueError(f"min_fisher must be >= 0, got {min_fisher}")
    lam = _scalings(len(params), scalings)
    num = torch.zeros_like(params[0])
    den = torch.zeros_like(params[0])
    for l, p, f in zip(lam, params, fishers):
        if f.shape != p.shape:
            raise ValueError(f"Fisher shape {tuple(f.shape)} does not match parameter shape {tuple(p.shape)}")
        w = (f.to(p.dtype) + min_fisher) * l
        num.add_(w * p)
        den.add_(w)
    if min_fisher == 0:  # 0/0 entries (no model has Fisher there): fall back to the λ-weighted mean
        mean = sum(l * p for l, p in zip(lam, params)) / sum(lam)
        return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), mean)
    return num / den


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = diag(G) + α (G − diag(G))."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"RegMean alpha={alpha} is outside [0, 1]")
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"a Gram matrix must be square, got shape {tuple(gram.shape)}")
    diag = torch.diag(torch.diagonal(gram))
    return diag + alpha * (gram - diag)


def regmean_merge(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    """W* = (Σ_k W_k G̃_k)(Σ_k G̃_k)⁻¹ for torch-layout linear weights W_k (out × in).

    Solved in float64 as a linear system (no explicit inverse); a singular Σ G̃ falls back to
    the pseudo-inverse (least-norm solution). Returned in the weights' dtype.
    """
    if len(weights) != len(grams) or not weights:
        raise ValueError(f"regmean_merge needs one Gram matrix per model, got {len(weights)} and {len(grams)}")
    out_dtype = weights[0].dtype
    sum_g = torch.zeros(grams[0].shape, dtype=torch.float64, device=weights[0].device)
    sum_gw = torch.zeros((weights[0].shape[1], weights[0].shape[0]), dtype=torch.float64, device=weights[0].device)
    for w, g in zip(weights, grams):
        if w.ndim != 2 or g.shape != (w.shape[1], w.shape[1]):
            raise ValueError(f"Gram matrix of shape {tuple(g.shape)} does not fit a weight of shape {tuple(w.shape)}")
        w = w.to(torch.float64)  # Gram sums are badly conditioned: solve in float64
        gt = reduce_off_diagonal(g.to(torch.float64), alpha)
        sum_g.add_(gt)
        sum_gw.add_(gt @ w.T)
    try:
        sol, info = torch.linalg.solve_ex(sum_g, sum_gw)
        if int(info) != 0 or not torch.isfinite(sol).all():
            raise RuntimeError
    except RuntimeError:
        sol = torch.linalg.pinv(sum_g) @ sum_gw
    return sol.T.contiguous().to(out_dtype)


def average_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Plain mean (1/K) Σ_k θ_k (RegMean's rule for non-linear parameters)."""
    acc = torch.zeros_like(params[0])
    for p in params:
        acc.add_(p)
    return acc / len(params)
