"""Pure formulas of the data-aware mergers: Fisher merging and RegMean.

Fisher merging (Matena & Raffel 2022), element-wise per tensor:

    θ* = Σ_k λ_k (F_k + ε) θ_k / Σ_k λ_k (F_k + ε)

F_k: diagonal Fisher of model k on its own task; λ_k: per-model scaling coefficient;
ε (``min_fisher``, 1e-6 as in MergeLM) keeps entries with zero Fisher everywhere at the
λ-weighted mean instead of 0/0. With ε = 0 an entry whose Fisher is exactly zero in every model
(Σ_k λ_k F_k = 0) takes the λ-weighted mean Σ_k λ_k θ_k / Σ_k λ_k; :func:`zero_fisher_floor` makes
the round-off of mathematically-zero gradients (attention key biases: ~1e-20 of the largest
entry in float32) exactly zero first.

RegMean (Jin et al. 2023), per linear layer y = x Wᵀ (torch layout W: out × in):

    G̃_k = diag(G_k) + α (G_k − diag(G_k))          (α: off-diagonal scale)
    W*ᵀ = (Σ_k G̃_k)⁺ Σ_k G̃_k W_kᵀ   ⇔   W* = (Σ_k W_k G̃_k)(Σ_k G̃_k)⁺

G_k = X_kᵀ X_k: Gram matrix of the layer's inputs on model k's examples. The solve is in float64
and rank-revealing: Σ G̃ = V diag(λ) Vᵀ, eigenvalues λ_i ≤ rcond·max λ count as zero (default
rcond = n·eps_float64, numpy's ``pinv``/``matrix_rank`` convention), so a singular or numerically
singular Gram sum gives the minimum-norm least-squares solution and the rank is reported.
Non-linear parameters (biases, LayerNorm, embeddings) are averaged.

Every function here is a fixed sequence of element-wise operations and float64 LAPACK calls:
run at a fixed thread count it is bit-for-bit reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def zero_fisher_floor(fisher: Mapping[str, torch.Tensor], rtol: float) -> tuple[dict[str, torch.Tensor], int]:
    """Entries F ≤ rtol · max F (max over every tensor of this model's Fisher) set to exactly 0.

    A gradient that is mathematically zero (e.g. an attention key bias: softmax is shift
    invariant) comes out of float32 back-propagation as round-off, its square ~1e-20 of the
    model's largest Fisher entry; real entries of a tiny BERT go down to ~1e-14. rtol = 0 keeps
    the Fisher as it is. Returns the cleaned Fisher and the number of entries zeroed (that
    were not already zero).
    """
    if rtol < 0:
        raise ValueError(f"zero_fisher_rtol must be >= 0, got {rtol}")
    if rtol == 0 or not fisher:
        return dict(fisher), 0
    top = max(float(f.max()) for f in fisher.values() if f.numel())
    floor = rtol * top
    out, zeroed = {}, 0
    for k, f in fisher.items():
        small = f <= floor
        zeroed += int((small & (f != 0)).sum())
        out[k] = torch.where(small, torch.zeros((), dtype=f.dtype), f)
    return out, zeroed


def fisher_merge(params: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor],
                 scalings: Sequence[float] | float | None = None, min_fisher: float = 1e-6) -> torch.Tensor:
    """θ* = Σ_k λ_k (F_k + ε) θ_k / Σ_k λ_k (F_k + ε), element-wise in the params' dtype (float32 or wider).

    ε = 0: entries with Σ_k λ_k F_k = 0 take the λ-weighted mean Σ_k λ_k θ_k / Σ_k λ_k.
    """
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
        mean = torch.zeros_like(params[0])
        for l, p in zip(lam, params):
            mean.add_(p * l)
        mean.div_(sum(lam))
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones((), dtype=den.dtype)), mean)
    return num / den


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = diag(G) + α (G − diag(G))."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"RegMean alpha={alpha} is outside [0, 1]")
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"a Gram matrix must be square, got shape {tuple(gram.shape)}")
    diag = torch.diag(torch.diagonal(gram))
    return diag + alpha * (gram - diag)


def psd_solve(a: torch.Tensor, b: torch.Tensor, rcond: float | None = None) -> tuple[torch.Tensor, int]:
    """Minimum-norm least-squares X of A X = B for a symmetric positive semi-definite A (float64).

    A = V diag(λ) Vᵀ; eigenvalues λ_i ≤ rcond · max λ (default rcond = n · eps_float64) are
    treated as zero, so X = V diag(1/λ_i on the rest) Vᵀ B = A⁺ B. Returns (X, rank).
    """
    n = a.shape[0]
    a = a.to(torch.float64)
    a = (a + a.T) / 2  # exact symmetry (round-off of the sums)
    evals, evecs = torch.linalg.eigh(a)
    top = float(evals.abs().max()) if n else 0.0
    tol = (n * torch.finfo(torch.float64).eps if rcond is None else float(rcond)) * top
    keep = evals > tol
    rank = int(keep.sum())
    if rank == 0:
        return torch.zeros((n, b.shape[1]), dtype=torch.float64, device=a.device), 0
    v = evecs[:, keep]
    x = v @ ((v.T @ b.to(torch.float64)) / evals[keep][:, None])
    return x, rank


def regmean_merge_rank(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 1.0,
                       rcond: float | None = None) -> tuple[torch.Tensor, int]:
    """(W*, rank of Σ_k G̃_k) with W* = (Σ_k W_k G̃_k)(Σ_k G̃_k)⁺ (see :func:`psd_solve`)."""
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
    sol, rank = psd_solve(sum_g, sum_gw, rcond)
    return sol.T.contiguous().to(out_dtype), rank


def regmean_merge(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 1.0,
                  rcond: float | None = None) -> torch.Tensor:
    """W* = (Σ_k W_k G̃_k)(Σ_k G̃_k)⁺ for torch-layout linear weights W_k (out × in).

    Solved in float64 by a rank-revealing eigen-decomposition (:func:`psd_solve`): a singular
    Σ G̃ gives the minimum-norm least-squares solution. Returned in the weights' dtype.
    """
    return regmean_merge_rank(weights, grams, alpha, rcond)[0]


def average_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Plain mean (1/K) Σ_k θ_k (RegMean's rule for non-linear parameters)."""
    acc = torch.zeros_like(params[0])
    for p in params:
        acc.add_(p)
    return acc / len(params)
