"""Named merge methods (presets) and the builder the Hydra method configs call.

Each knob, with its formula (δ_k = θ_k − θ_PRE, computed in float32):

- ``sparsifier``: none | dare (keep w.p. 1−p, ×1/(1−p)) | drop_only (same mask, no rescale)
  | magnitude (keep the ⌈(1−p)n⌉ largest |δ| per tensor; ×1/(1−p) only if ``rescale``)
  | della (keep w.p. (1−p) − ε + 2ε·r̃_i by normalised magnitude rank r̃_i, ×1/(1 − p_i))
  | breadcrumbs (drop the top ⌊γn⌋ outliers and the smallest |δ|, keep ⌈(1−p)n⌉ per tensor)
  | darex (DARE's mask, ×1/q instead of 1/(1−p)).
- ``epsilon`` (della): ε ∈ [0, min(p, 1−p)), null = ½·min(p, 1−p). ``rank_scope`` (della):
  row (default) | tensor. ``gamma`` (breadcrumbs): outlier fraction γ ∈ [0, 1), null = 0.01.
  ``rescale_q`` (darex): q ∈ [1−p, 1]; ``auto`` (default: dare_lab's per-tensor data-free proxy,
  not the paper's); the paper's ``validation`` (one q per model: coarse-to-fine grid, step
  ``q_step``, refinement ``q_decay``, scored on the taskpool's validation split) or ``analytical``
  (per-layer q from the paper's bound with η = ``q_eta``, on mean input activations of
  calibration texts); or a mapping model name → q.
- ``rescale``: false | true (×1/(1−p), magnitude / breadcrumbs; DARE and DELLA always rescale
  by their own rule) | l1 (mergekit's rule for dare, drop_only, magnitude, della, breadcrumbs:
  the masked tensor × ‖δ‖₁/‖δ̂‖₁, skipped where a norm is < 1e-7; no per-entry factor).
  ``count_rule`` (magnitude, breadcrumbs): ceil (⌈(1−p)n⌉ kept) | mergekit (its ``int(density·n)``).
- ``drop_rate``: p, the fraction of delta entries dropped (not a density: density = 1−p).
- ``target``: delta (default) or finetuned (paper §4.7: sparsify θ_k itself).
- ``merger``: average (θ_PRE + mean_k δ̂_k) | task_arithmetic (θ_PRE + λ Σ_k w_k δ̂_k)
  | ties (θ_PRE + λ · disjoint mean of the sign-agreeing, top-``retain_ratio`` entries)
  | linear (mergekit's: Σ w_k θ_k / Σ w_k over the models' own tensors; ``normalize``)
  | gta (mergekit's generalized task arithmetic: θ_PRE + λ·Σ w_k δ̂_k a_k / D, ``consensus`` none |
  sum — a_k = [sign(w_k δ̂_k) = e], e = + where Σ w_k δ̂_k ≥ 0 — and ``normalize``: D = Σ w_k a_k).
- ``scaling``: λ. ``retain_ratio``: TIES' k, the kept fraction of each tensor's |δ| (default 0.2;
  1, no second trim, for della_ties and breadcrumbs_ties: their sparsifier is the trim, as in DELLA).
- ``trim_scope`` (ties): tensor (default: top k of |δ̂_k| per tensor, mergekit / peft) | model (the
  official TIES code / MergeLM: keep |δ̂_k| ≥ t_k, t_k the ⌊(1−k)·n⌋-th smallest |δ̂_k| over all n
  merged entries of model k, ties at t_k kept; found by the engine in streamed passes).
- ``overrides``: per-model / per-tensor-pattern values of ``drop_rate``, ``weight``,
  ``retain_ratio`` and ``scaling`` (:mod:`dare_lab.ops.overrides`; later entries win).
- ``weights``: optional per-model w_k (task arithmetic and TIES; never changes TIES' sign
  election unless ``weighted_election``): a list in the pool's listing order, or a mapping
  model name → w_k. ``seed``: seeds every per-tensor mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dare_lab.ops.method import MergeMethod, Merger, Sparsifier
from dare_lab.ops.sparsify import check_rescale

PRESETS: dict[str, dict[str, Any]] = {
    "average": {"sparsifier": "none", "merger": "average"},
    "task_arithmetic": {"sparsifier": "none", "merger": "task_arithmetic"},
    "ties": {"sparsifier": "none", "merger": "ties"},
    "dare_average": {"sparsifier": "dare", "merger": "average"},
    "dare_task_arithmetic": {"sparsifier": "dare", "merger": "task_arithmetic"},
    "dare_ties": {"sparsifier": "dare", "merger": "ties"},
    "drop_only_task_arithmetic": {"sparsifier": "drop_only", "merger": "task_arithmetic"},
    "magnitude_task_arithmetic": {"sparsifier": "magnitude", "merger": "task_arithmetic"},
    "della_task_arithmetic": {"sparsifier": "della", "merger": "task_arithmetic"},
    "della_ties": {"sparsifier": "della", "merger": "ties", "retain_ratio": 1.0},
    "breadcrumbs_task_arithmetic": {"sparsifier": "breadcrumbs", "merger": "task_arithmetic"},
    "breadcrumbs_ties": {"sparsifier": "breadcrumbs", "merger": "ties", "retain_ratio": 1.0},
    "darex_task_arithmetic": {"sparsifier": "darex", "merger": "task_arithmetic"},
    "darex_ties": {"sparsifier": "darex", "merger": "ties"},
}


def build_method(
    name: str = "dare_task_arithmetic",
    sparsifier: str | None = None,
    drop_rate: float | None = None,
    rescale: bool | str = False,
    target: str = "delta",
    sampler: str = "torch_rand",
    merger: str | None = None,
    scaling: float = 1.0,
    retain_ratio: float | None = None,
    merge_func: str = "mean",
    weights: Sequence[float] | Mapping[str, float] | None = None,
    weighted_election: bool = False,
    seed: int = 0,
    overrides: Sequence[Mapping[str, Any]] | None = None,
    epsilon: float | None = None,
    gamma: float | None = None,
    rescale_q: float | str | Mapping[str, float | str] | None = None,
    rank_scope: str = "row",
    q_eta: float | None = None,
    q_step: float = 0.1,
    q_decay: float = 0.1,
    trim_scope: str = "tensor",
    count_rule: str = "ceil",
    consensus: str = "none",
    normalize: bool = False,
) -> MergeMethod:
    """Build a :class:`MergeMethod` from a preset name plus plain overrides.

    ``sparsifier``/``merger`` default to the preset's; unknown preset names are accepted when
    both are given explicitly (custom combinations).
    """
    preset = PRESETS.get(name)
    if preset is None and (sparsifier is None or merger is None):
        raise ValueError(f"unknown merge method {name!r}; choose one of {sorted(PRESETS)} or set sparsifier and merger")
    sparsifier = sparsifier or preset["sparsifier"]
    merger = merger or preset["merger"]
    if drop_rate is None:
        drop_rate = 0.0 if sparsifier == "none" else 0.9
    if sparsifier == "none" and float(drop_rate) != 0.0:
        raise ValueError(f"drop_rate={drop_rate} has no effect with sparsifier=none (method {name!r}); use a dare_* method")
    if isinstance(rescale_q, Mapping):   # name-keyed q (an OmegaConf DictConfig too)
        rescale_q = {str(m): q for m, q in rescale_q.items()}
    sp = Sparsifier(kind=sparsifier, drop_rate=float(drop_rate),
                    rescale=check_rescale(rescale), target=target, sampler=sampler, count_rule=str(count_rule),
                    epsilon=None if epsilon is None else float(epsilon),
                    gamma=None if gamma is None else float(gamma), rescale_q=rescale_q, rank_scope=str(rank_scope),
                    q_eta=q_eta, q_step=q_step, q_decay=q_decay)
    if retain_ratio is None:   # the preset's (1.0 for della_ties / breadcrumbs_ties), else 0.2
        retain_ratio = (preset or {}).get("retain_ratio", 0.2)
    mg = Merger(kind=merger, scaling=float(scaling), retain_ratio=float(retain_ratio), merge_func=merge_func,
                weights=None if weights is None else (
                    {str(m): float(w) for m, w in weights.items()} if isinstance(weights, Mapping)
                    else tuple(float(w) for w in weights)),
                weighted_election=bool(weighted_election), trim_scope=trim_scope, consensus=str(consensus),
                normalize=normalize)
    if overrides and mg.trim_scope == "model":
        raise ValueError("TIES trim_scope=model does not combine with method.overrides (per-model / per-tensor "
                         "knobs); use trim_scope=tensor or drop the overrides")
    if overrides:  # per-model / per-tensor knob values (dare_lab.ops.overrides)
        from dare_lab.ops.overrides import OverriddenMethod, parse_overrides

        return OverriddenMethod(name=name, sparsifier=sp, merger=mg, seed=int(seed), overrides=parse_overrides(overrides))
    return MergeMethod(name=name, sparsifier=sp, merger=mg, seed=int(seed))
