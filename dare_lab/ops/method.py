"""A merge method = a sparsifier applied to each model's delta + a merger of the results.

``MergeMethod.merge_tensor`` is the whole per-tensor formula; the streamed engine calls it
once per tensor name and knows nothing else about methods. Any sparsifier may precede any
merger (DARE is a plug-in):

    δ_k   = θ_k − θ_PRE                              (target="delta", float32)
    δ̂_k  = sparsify(δ_k; p, seed, model_k, tensor)
    θ     = merger(θ_PRE, [δ̂_1 … δ̂_K])

With ``target="finetuned"`` (paper §4.7) the sparsifier acts on θ_k itself and the merger
sees δ̂_k = sparsify(θ_k) − θ_PRE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from dare_lab.ops import merge as mergers
from dare_lab.ops.seeding import tensor_generator
from dare_lab.ops.sparsify import SAMPLERS, check_drop_rate, dare, magnitude_prune

SPARSIFIERS = ("none", "dare", "drop_only", "magnitude")
MERGERS = ("average", "task_arithmetic", "ties")
TARGETS = ("delta", "finetuned")


@dataclass(frozen=True)
class Sparsifier:
    """Which entries of each model's delta survive.

    kind: none | dare (×1/(1−p)) | drop_only (no rescale) | magnitude (MP, exact count).
    drop_rate: p. rescale: only read for ``magnitude`` (DARE always, DropOnly never rescales).
    target: delta (default) or finetuned (paper §4.7).
    """

    kind: str = "none"
    drop_rate: float = 0.0
    rescale: bool = False
    target: str = "delta"
    sampler: str = "torch_rand"

    def __post_init__(self) -> None:
        if self.kind not in SPARSIFIERS:
            raise ValueError(f"unknown sparsifier {self.kind!r}; choose one of {SPARSIFIERS}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown sparsifier target {self.target!r}; choose one of {TARGETS}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown mask sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if self.kind != "none":
            check_drop_rate(self.drop_rate, self.rescales)

    @property
    def rescales(self) -> bool:
        return self.kind == "dare" or (self.kind == "magnitude" and self.rescale)

    def apply(self, x: torch.Tensor, seed: int, model: str, tensor: str) -> torch.Tensor:
        """Sparsify one tensor of one model; the mask is seeded by (seed, model, tensor)."""
        if self.kind == "none" or self.drop_rate == 0.0:
            return x
        if self.kind == "magnitude":
            return magnitude_prune(x, self.drop_rate, rescale=self.rescale)
        gen = tensor_generator(seed, model, tensor, device=x.device)
        return dare(x, self.drop_rate, gen, rescale=self.kind == "dare", sampler=self.sampler)


@dataclass(frozen=True)
class Merger:
    """How the sparsified deltas combine.

    average: θ_PRE + mean_k δ̂_k. task_arithmetic: θ_PRE + λ Σ_k w_k δ̂_k.
    ties: θ_PRE + λ · disjoint_merge(trim_k(δ̂_k)) with retain ratio k and sign election.
    """

    kind: str = "task_arithmetic"
    scaling: float = 1.0
    retain_ratio: float = 0.2
    merge_func: str = "mean"
    weights: tuple[float, ...] | None = None
    weighted_election: bool = False

    def __post_init__(self) -> None:
        if self.kind not in MERGERS:
            raise ValueError(f"unknown merger {self.kind!r}; choose one of {MERGERS}")
        if self.kind == "ties":
            if not 0.0 < float(self.retain_ratio) <= 1.0:
                raise ValueError(f"TIES retain_ratio={self.retain_ratio} is outside (0, 1]")
            if self.merge_func not in mergers.TIES_MERGE_FUNCS:
                raise ValueError(f"unknown TIES merge_func {self.merge_func!r}; choose one of {mergers.TIES_MERGE_FUNCS}")

    def apply(self, base: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.kind == "average":
            return mergers.average(base, deltas)
        if self.kind == "task_arithmetic":
            return mergers.task_arithmetic(base, deltas, self.scaling, self.weights)
        return mergers.ties(base, deltas, self.retain_ratio, self.scaling, self.merge_func,
                            self.weights, self.weighted_election)


@dataclass(frozen=True)
class MergeMethod:
    """A sparsifier, a merger and the seed: everything the per-tensor formula needs."""

    name: str = "task_arithmetic"
    sparsifier: Sparsifier = field(default_factory=Sparsifier)
    merger: Merger = field(default_factory=Merger)
    seed: int = 0
    streamable: ClassVar[bool] = True   # one set of knobs for every tensor: the engine may stream it in chunks

    def merge_tensor(self, tensor_name: str, base: torch.Tensor, finetuned: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Merge one tensor: ``finetuned`` maps model name → θ_k (same dtype/shape as ``base``)."""
        sp = self.sparsifier
        deltas = []
        for model, theta in finetuned.items():
            if sp.target == "finetuned":
                deltas.append(sp.apply(theta, self.seed, model, tensor_name) - base)
            else:
                deltas.append(sp.apply(theta - base, self.seed, model, tensor_name))
        return self.merger.apply(base, deltas)

    def describe(self) -> dict[str, Any]:
        """Plain dict of every knob (for model cards and metadata)."""
        from dataclasses import asdict

        sp = asdict(self.sparsifier)
        sp["rescale"] = self.sparsifier.rescales   # what is applied (DARE always rescales), not the MP-only flag
        return {"name": self.name, "seed": self.seed, "sparsifier": sp, "merger": asdict(self.merger)}
