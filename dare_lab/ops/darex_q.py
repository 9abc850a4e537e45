"""DAREx-q's own choices of the rescale q (Deng et al. 2024, "DARE the Extreme", arXiv 2410.09344;
official code github.com/vengdeng/DAREx: ``find_q_encoder.py``, ``utils/analyticalq.py``).

Pure functions of the ops ring; the data they need (validation scores, mean input activations)
is gathered by :mod:`dare_lab.analysis.darex_q`, which resolves a method's ``rescale_q`` rule
into concrete numbers before the merge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import torch

from dare_lab.ops.sparsify import check_drop_rate

DAREX_Q_RULES = ("auto", "validation", "analytical")
"""How DAREx's q is chosen when it is not given as a number:

``auto``: dare_lab's own per-tensor closed form (:func:`dare_lab.ops.sparsify.darex_auto_q`) — data-free, *not* the paper's.
``validation``: the paper's 1/q_v — one q per model, the best of a coarse-to-fine grid scored on a
validation split (:func:`q_grid_search`). ``analytical``: the paper's per-layer q from its
output-change bound (:func:`darex_analytical_q`), which needs each linear layer's mean input
activation on a few unlabeled inputs and the bound's η. The paper has no rule that uses neither
data nor a tuned η; ``validation`` and ``analytical`` are resolved before the merge by
:mod:`dare_lab.analysis.darex_q`."""

Q_PATIENCE = 3
"""The official grid search stops a pass after more than this many consecutive grid points score
below the best so far."""


def _grid(lo: float, hi: float, step: float) -> list[float]:
    """``numpy.arange(lo, hi, step)`` as the official search uses it (float values, hi excluded)."""
    return [float(v) for v in np.arange(lo, hi, step)]


def q_grid_search(score: Callable[[float], float], lower: float, upper: float = 1.0, step: float = 0.1,
                  decay: float = 0.1, patience: int = Q_PATIENCE) -> tuple[float, list[tuple[float, float]]]:
    """The paper's search for q on a validation set (official ``find_optimal_param``): the
    highest-scoring q, and every (q, score) evaluated, in order.

    Pass 1 scores q = lower, lower + step, … ≤ upper; pass 2 refines around the best q* of pass 1
    with step·decay over [max(lower + step·decay, q* − step·(1 − decay)), q* + step). A pass stops
    once more than ``patience`` consecutive points score below the best of that pass. Points
    outside [lower, upper] are skipped (the official code only bounds pass 2 from below); a q
    scored twice keeps its first score. Ties: the first q evaluated wins.
    """
    if not (step > 0 and 0 < decay <= 1 and lower <= upper):
        raise ValueError(f"DAREx q search needs step > 0, 0 < decay <= 1 and lower <= upper "
                         f"(got step={step}, decay={decay}, lower={lower}, upper={upper})")
    tol = 1e-12
    scores: dict[float, float] = {}
    history: list[tuple[float, float]] = []

    def run(points: list[float]) -> None:
        best, worse = -math.inf, 0
        for q in points:
            if q < lower - tol or q > upper + tol:
                continue
            q = min(max(q, lower), upper)
            key = round(q, 12)
            if key not in scores:
                scores[key] = float(score(q))
                history.append((q, scores[key]))
            s = scores[key]
            if s >= best:
                best, worse = s, 0
            else:
                worse += 1
            if worse > patience:
                break

    run(_grid(lower, upper + step, step))
    q1 = max(history, key=lambda qs: qs[1])[0]            # first of the best (max keeps the first)
    lo2 = max(lower + step * decay, q1 - step * (1 - decay))
    run(_grid(lo2, q1 + step, step * decay))
    best_q, _ = max(history, key=lambda qs: qs[1])
    return best_q, history


ANALYTICAL_PROB = 0.95
"""γ of the paper's bound (the probability it holds), official default."""
ANALYTICAL_STOP = 0.8
"""The official per-layer scan over q stops once this share of rows has stopped improving
(against outlier rows)."""
ANALYTICAL_START = 10000.0
"""The objective a row must beat at the first q (official initial value): a row whose objective
stays above it keeps q = 1 − p."""


def bernoulli_phi(p: float) -> float:
    """φ(p) = (1 − 2p) / ln((1 − p)/p), the Bernoulli sub-Gaussian variance factor of the paper's
    bound (Kearns–Saul); φ(½) = ½, its limit (the official code divides 0 by 0 there)."""
    p = float(p)
    if p == 0.5:
        return 0.5
    return (1.0 - 2.0 * p) / math.log((1.0 - p) / p)


def analytical_q_grid(p: float) -> list[float]:
    """The q values the per-layer rule scans: 0.001·k for k from ⌈1000·(1 − p)⌉ to 998 (official:
    ``range(int((1 − p)·1000), 999)``, whose float truncation can start one step below 1 − p)."""
    k0 = math.ceil((1 - Fraction(repr(float(p)))) * 1000)
    return [k * 0.001 for k in range(k0, 999)]


def darex_analytical_q_rows(c: torch.Tensor, p: float, eta: float, prob: float = ANALYTICAL_PROB,
                            stop: float = ANALYTICAL_STOP) -> torch.Tensor:
    """Per-row q of the paper's analytical rule (official ``analytical_resolve_new``), float64.

    ``c``: one layer's c_ij = δ_ij · x̄_j (row i = output neuron, x̄_j = mean input activation j
    on the calibration inputs; the bias delta as one more column with x = 1). For each row the
    q on :func:`analytical_q_grid` minimising
    ``| η·(1 − (1−p)/q)·Σ_j c_ij + η²·φ(p)·Σ_j c_ij² / (4q²) + ln(2/(1 − γ)) |``
    is kept (ties: the larger q). Rows start at q = 1 − p; the scan stops after the first q at
    which the share of rows whose objective has stopped decreasing (ever reached ≥ its best)
    is ≥ ``stop``. Computed in float64 (the official code works in float16).
    """
    p = check_drop_rate(p, rescale=True)
    if not (math.isfinite(float(eta)) and float(eta) > 0):
        raise ValueError(f"DAREx analytical eta={eta!r} must be a number > 0")
    c = c.detach().to(torch.float64).reshape(c.shape[0], -1)
    s1, s2 = c.sum(dim=1), c.square().sum(dim=1)
    eta, keep = float(eta), 1.0 - p
    const = math.log(2.0 / (1.0 - prob))
    phi = bernoulli_phi(p)
    q_rows = torch.full((c.shape[0],), keep, dtype=torch.float64)
    best = torch.full((c.shape[0],), ANALYTICAL_START, dtype=torch.float64)
    stopped = torch.zeros(c.shape[0], dtype=torch.bool)
    for q in analytical_q_grid(p):
        res = (eta * (1.0 - keep / q) * s1 + eta * eta * phi * s2 / (4.0 * q * q) + const).abs()
        better, not_better = res <= best, res >= best
        best = torch.where(better, res, best)
        q_rows = torch.where(better, torch.tensor(q, dtype=torch.float64), q_rows)
        stopped |= not_better
        if stopped.double().mean() >= stop:
            break
    return q_rows


def darex_analytical_q(c: torch.Tensor, p: float, eta: float, prob: float = ANALYTICAL_PROB,
                       stop: float = ANALYTICAL_STOP) -> float:
    """One layer's q of the paper's analytical rule: the mean of :func:`darex_analytical_q_rows`."""
    return float(darex_analytical_q_rows(c, p, eta, prob, stop).mean())
