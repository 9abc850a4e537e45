"""Delta statistics (paper Fig. 10, 18–20 and Table 6): how large is δ = θ_SFT − θ_PRE?

Streams over the tensors of one (base, fine-tuned) pair, one tensor at a time, in float32:

* exact over *all* in-scope entries: count, min, max, mean |δ|, ‖δ‖₂ / ‖θ_PRE‖₂, the share
  of entries with |δ| ≤ each threshold (0.002, 0.005, …) and a |δ| histogram on fixed
  log-spaced bins (so nothing but the bin counts is kept);
* from a seeded random *sample* of entries (``fraction``; the paper used 10 %): the signed
  quantiles 0 %, 10 %, …, 100 % of δ (Table 6) and the 1 % / 99 % quantiles. Entry i of
  tensor t is sampled iff u < fraction with u ~ U[0,1) from the generator seeded by
  (seed, model, t), drawn chunk by chunk; the sample is capped at ``max_samples`` by
  uniform thinning (each kept value survives with probability ½ and later draws use half
  the rate), so it stays a uniform sample. 0 % / 100 % are the exact min / max.

The verdict applies the paper's rule of thumb: DARE is safe when SFT deltas stay within about
0.002–0.005 (§4.6; continued pre-training moves them to ≈ 0.03 and DARE fails); it warns when
the deltas are as large as the weights themselves, i.e. the chosen "pre-trained" model is
probably not the fine-tuned model's real backbone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dare_lab.ops.seeding import tensor_generator

DECILES = tuple(i / 10 for i in range(11))
THRESHOLDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.03)
CHUNK = 1 << 22  # entries per streamed chunk (16 MiB of float32)
# log10 |δ| bin edges: an underflow bin [0, 1e-9), then 10 bins per decade up to 1e1
LOG_EDGES = np.concatenate([[0.0], np.logspace(-9, 1, 101)])


@dataclass
class DeltaStats:
    model: str
    n_total: int = 0
    n_tensors: int = 0
    n_sampled: int = 0
    fraction: float = 1.0
    effective_fraction: float = 1.0
    min: float = math.inf
    max: float = -math.inf
    sum_abs: float = 0.0
    sum_sq: float = 0.0
    base_sum_sq: float = 0.0
    n_zero: int = 0
    below: dict[float, int] = field(default_factory=dict)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(LOG_EDGES) - 1, dtype=np.int64))
    quantiles: dict[float, float] = field(default_factory=dict)
    per_tensor: list[dict[str, Any]] = field(default_factory=list)
    sample: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / max(self.n_total, 1)

    @property
    def rel_norm(self) -> float:
        """‖δ‖₂ / ‖θ_PRE‖₂ over all in-scope tensors."""
        return math.sqrt(self.sum_sq) / math.sqrt(self.base_sum_sq) if self.base_sum_sq > 0 else math.inf

    def share_within(self, t: float) -> float:
        return self.below.get(t, 0) / max(self.n_total, 1)

    def typical_range(self) -> float:
        """max(|q1 %|, |q99 %|): the range that holds 98 % of the deltas."""
        return max(abs(self.quantiles.get(0.01, 0.0)), abs(self.quantiles.get(0.99, 0.0)))

    def decile_row(self, digits: int = 6) -> dict[str, Any]:
        """One row of the paper's Table 6: model, then δ at 0 %, 10 %, …, 100 %."""
        row: dict[str, Any] = {"model": self.model}
        for q in DECILES:
            row[f"{round(q * 100)}%"] = round(self.quantiles[q], digits) if q in self.quantiles else None
        return row

    def summary(self) -> dict[str, float]:
        out = {"n_total": float(self.n_total), "n_sampled": float(self.n_sampled), "fraction": self.fraction,
               "effective_fraction": self.effective_fraction, "min": self.min, "max": self.max,
               "mean_abs": self.mean_abs, "rel_norm": self.rel_norm, "typical_range": self.typical_range(),
               "share_zero": self.n_zero / max(self.n_total, 1)}
        for t in sorted(self.below):
            out[f"share_abs_le_{t:g}"] = self.share_within(t)
        for q, v in sorted(self.quantiles.items()):
            out[f"q{q * 100:g}"] = v
        return out


class _Sampler:
    """Seeded Bernoulli(fraction) sample of streamed values with a size cap (uniform thinning)."""

    def __init__(self, fraction: float, seed: int, model: str, max_samples: int):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"sampling fraction must be in (0, 1], got {fraction}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.fraction, self.seed, self.model, self.max = float(fraction), int(seed), model, int(max_samples)
        self.rate = self.fraction
        self.parts: list[torch.Tensor] = []
        self.n = 0
        self.thin_gen = tensor_generator(seed, model, "\x00thinning")

    def add(self, name: str, flat: torch.Tensor) -> int:
        gen = tensor_generator(self.seed, self.model, name) if self.rate < 1.0 else None
        taken = 0
        for start in range(0, flat.numel(), CHUNK):
            chunk = flat[start:start + CHUNK]
            if gen is not None:
                chunk = chunk[torch.rand(chunk.numel(), generator=gen) < self.rate]
            self.parts.append(chunk.clone())
            self.n += chunk.numel()
            taken += chunk.numel()
            while self.n > self.max:
                self._thin()
                if gen is None:
                    gen = tensor_generator(self.seed, self.model, name + "\x00after-thinning")
        return taken

    def _thin(self) -> None:
        allv = torch.cat(self.parts) if self.parts else torch.empty(0)
        keep = torch.rand(allv.numel(), generator=self.thin_gen) < 0.5
        allv = allv[keep]
        self.parts, self.n, self.rate = [allv], allv.numel(), self.rate / 2

    def values(self) -> np.ndarray:
        if not self.parts:
            return np.empty(0, dtype=np.float32)
        return torch.cat(self.parts).numpy()


def _pairs(base: Any, model: Any, model_name: str, scope: Any):
    """(base name, model tensor name) of every tensor that would be merged (engine's plan)."""
    from dare_lab.engine.plan import plan_merge
    from dare_lab.engine.scope import Scope

    plans = plan_merge(base, {model_name: model}, scope or Scope())
    return [(p.name, p.sources[model_name], p.rows) for p in plans if p.merge and model_name in p.sources]


def delta_statistics(base: Any, model: Any, model_name: str = "model", *, fraction: float = 0.1, seed: int = 0,
                     scope: Any = None, max_samples: int = 5_000_000, thresholds: Sequence[float] = THRESHOLDS,
                     quantiles: Sequence[float] = (*DECILES, 0.01, 0.99), keep_sample: bool = False,
                     per_tensor: bool = True) -> DeltaStats:
    """Streamed statistics of δ = θ_model − θ_base over the tensors the merge would touch.

    ``base``/``model``: HF dirs, hub ids or engine tensor sources. ``fraction``: the sampled
    share of entries for the quantiles (1.0 = exact). Memory: one tensor + the capped sample.
    """
    from dare_lab.engine.sources import CheckpointReader

    b = base if hasattr(base, "get") else CheckpointReader(base, label="base")
    m = model if hasattr(model, "get") else CheckpointReader(model, label=model_name)
    stats = DeltaStats(model=model_name, fraction=float(fraction), below={float(t): 0 for t in thresholds})
    sampler = _Sampler(fraction, seed, model_name, max_samples)
    edges = torch.tensor(LOG_EDGES, dtype=torch.float64)
    for name, src, rows in _pairs(b, m, model_name, scope):
        theta0 = b.get(name, torch.float32)
        theta = m.get(src, torch.float32)
        if rows is not None:
            theta = theta[:rows]
        delta = (theta - theta0).flatten()
        if not torch.isfinite(delta).all():
            raise ValueError(f"NaN/Inf in the delta of tensor {name!r} of model {model_name!r}")
        n = delta.numel()
        stats.n_total += n
        stats.n_tensors += 1
        dmin, dmax = float(delta.min()), float(delta.max())
        stats.min, stats.max = min(stats.min, dmin), max(stats.max, dmax)
        absd = delta.abs()
        sum_abs = float(absd.double().sum())
        stats.sum_abs += sum_abs
        stats.sum_sq += float(delta.double().square().sum())
        stats.base_sum_sq += float(theta0.double().square().sum())
        stats.n_zero += int((delta == 0).sum())
        for t in stats.below:
            stats.below[t] += int((absd <= t).sum())
        for start in range(0, n, CHUNK):
            a = absd[start:start + CHUNK].double()
            idx = torch.bucketize(a, edges, right=True) - 1
            stats.hist += torch.bincount(idx.clamp_(0, len(LOG_EDGES) - 2), minlength=len(LOG_EDGES) - 1).numpy()
        sampler.add(name, delta)
        if per_tensor:
            stats.per_tensor.append({"tensor": name, "numel": n, "min": dmin, "max": dmax, "mean_abs": sum_abs / max(n, 1),
                                     "rel_norm": float(delta.norm() / theta0.norm()) if float(theta0.norm()) > 0 else math.inf})
    if stats.n_total == 0:
        raise ValueError(f"model {model_name!r}: no tensor in scope to compare with the base")
    sample = sampler.values()
    stats.n_sampled = int(sample.size)
    stats.effective_fraction = sampler.rate
    for q in quantiles:
        q = float(q)
        if q == 0.0:
            stats.quantiles[q] = stats.min
        elif q == 1.0:
            stats.quantiles[q] = stats.max
        elif sample.size:
            stats.quantiles[q] = float(np.quantile(sample.astype(np.float64), q))
    if keep_sample:
        stats.sample = sample
    stats.warnings = verdict_warnings(stats)
    return stats


def verdict(stats: DeltaStats, safe_range: tuple[float, float] = (0.002, 0.005)) -> str:
    """One line applying the paper's rule of thumb to the typical delta range (1 %–99 %)."""
    lo, hi = safe_range
    r = stats.typical_range()
    within = f"{100 * stats.share_within(hi):.1f}% of |δ| ≤ {hi:g}" if hi in stats.below else ""
    head = f"{stats.model}: 98% of deltas within ±{r:.3g} ({within}; max |δ| {max(abs(stats.min), abs(stats.max)):.3g})"
    if r <= lo:
        return head + f" → within {lo:g}: DARE should drop 90–99% of deltas safely (paper §4.2)."
    if r <= hi:
        return head + f" → within {hi:g}: DARE should be safe up to p≈0.9; check p=0.99 (paper §4.6)."
    if r <= 0.03:
        return head + f" → larger than {hi:g}: DARE may fail at high p, as for continued-pretrained models (≈0.03, paper §4.6)."
    return head + " → far beyond the paper's SFT ranges: DARE is expected to fail; check the base model."


def verdict_warnings(stats: DeltaStats, rel_norm_limit: float = 0.5, range_limit: float = 0.03) -> list[str]:
    warns = []
    if stats.rel_norm > rel_norm_limit:
        warns.append(f"WARNING {stats.model}: ‖δ‖/‖θ_PRE‖ = {stats.rel_norm:.2f} > {rel_norm_limit}: the deltas are as large as "
                     "the weights; the chosen pre-trained model is probably not this model's real backbone (paper §4.6).")
    if stats.typical_range() > range_limit:
        warns.append(f"WARNING {stats.model}: typical |δ| {stats.typical_range():.3g} > {range_limit}: beyond continued "
                     "pre-training ranges; is the pre-trained model the right backbone?")
    if stats.n_zero == stats.n_total:
        warns.append(f"WARNING {stats.model}: every delta is exactly 0: the model equals the base.")
    return warns
