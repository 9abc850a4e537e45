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
from dare_lab.ops.darex_q import DAREX_Q_RULES
from dare_lab.ops.seeding import tensor_generator
from dare_lab.ops.sparsify import (COUNT_RULES, RANK_SCOPES, SAMPLERS, breadcrumbs, check_della_epsilon,
                                   check_drop_rate, check_gamma, check_rescale, check_rescale_q, dare, darex, della,
                                   magnitude_prune)

SPARSIFIERS = ("none", "dare", "drop_only", "magnitude", "della", "breadcrumbs", "darex")
STREAMED_KINDS = ("none", "dare", "drop_only", "magnitude")
"""Sparsifiers the engine's chunked fast path implements; any other kind runs through its
whole-tensor reference path (``engine/merge.py: _merge_one_reference``), same per-tensor seeds."""
DETERMINISTIC_KINDS = ("none", "magnitude", "breadcrumbs")
"""Sparsifiers that draw no random numbers (one seed is enough in the analyses)."""
DEFAULT_GAMMA = 0.01
"""Breadcrumbs' default outlier fraction γ (mergekit's default)."""
MERGERS = ("average", "task_arithmetic", "ties", "linear", "gta")
STREAMED_MERGERS = ("average", "task_arithmetic", "ties")
"""Mergers the engine's chunked fast path implements; ``linear`` and ``gta`` (mergekit's rules)
run through the whole-tensor reference path."""
CONSENSUS = ("none", "sum")
"""``gta``'s sign consensus: ``none`` (every entry counts) or ``sum`` (mergekit's TIES-style
election on the weighted deltas, Σ = 0 elects +)."""
TRIM_SCOPES = ("tensor", "model")
"""TIES' trim scope: ``tensor`` (default: the top k of |δ_k| in each tensor, as mergekit and peft)
or ``model`` (the official TIES code / MergeLM: one threshold per model over all its merged
tensors, :func:`dare_lab.ops.merge.model_trim_rank`, found by the engine in a streamed pre-pass)."""
TARGETS = ("delta", "finetuned")


@dataclass(frozen=True)
class Sparsifier:
    """Which entries of each model's delta survive.

    kind: none | dare (×1/(1−p)) | drop_only (no rescale) | magnitude (MP, exact count)
    | della (MagPrune: keep probabilities (1−p) ± ε by magnitude rank, ×1/(1−p_i))
    | breadcrumbs (drop the top-γ outliers and the smallest |δ|, keep ⌈(1−p)n⌉)
    | darex (DARE's mask, ×1/q). Formulas: :mod:`dare_lab.ops.sparsify`.
    drop_rate: p. rescale: true/false only read for ``magnitude`` and ``breadcrumbs`` (DARE and
    DELLA always, DropOnly never rescales; DAREx rescales by 1/q); ``"l1"`` (any kind but none
    and darex): mergekit's rule instead — the masked tensor × ‖δ‖₁/‖δ̂‖₁, no per-entry factor.
    count_rule (magnitude, breadcrumbs): ``ceil`` ⌈(1−p)n⌉ kept (default) or ``mergekit``
    (its ``int(density·n)``: :mod:`dare_lab.ops.sparsify`).
    target: delta (default) or finetuned (paper §4.7).
    epsilon: DELLA's ε (None: ½·min(p, 1−p), the middle of its valid range); rank_scope: DELLA
    ranks per ``row`` (default, the authors' code) or per ``tensor``. gamma: Breadcrumbs' γ (None: 0.01).
    rescale_q: DAREx's q — a number in [1−p, 1]; ``"auto"`` / None (dare_lab's per-tensor
    data-free proxy, :func:`dare_lab.ops.sparsify.darex_auto_q`, not the paper's); the paper's
    rules ``"validation"`` (one q per model, grid search on a validation split) or
    ``"analytical"`` (one q per layer from the paper's bound, needs calibration inputs and
    ``q_eta``), both resolved before the merge by :mod:`dare_lab.analysis.darex_q` into a
    mapping; or a mapping model name → number, "auto", or {tensor name: number}.
    q_eta: η of the analytical rule (> 0). q_step, q_decay: the validation grid's step and
    refinement factor (official defaults 0.1, 0.1).
    """

    kind: str = "none"
    drop_rate: float = 0.0
    rescale: bool | str = False
    target: str = "delta"
    sampler: str = "torch_rand"
    epsilon: float | None = None
    gamma: float | None = None
    rescale_q: float | str | Mapping[str, Any] | None = None
    rank_scope: str = "row"
    count_rule: str = "ceil"
    q_eta: float | None = None
    q_step: float = 0.1
    q_decay: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in SPARSIFIERS:
            raise ValueError(f"unknown sparsifier {self.kind!r}; choose one of {SPARSIFIERS}")
        object.__setattr__(self, "rescale", check_rescale(self.rescale))
        if self.rescale == "l1" and self.kind in ("none", "darex"):
            raise ValueError(f"rescale=l1 does not apply to sparsifier={self.kind} (choose dare, drop_only, magnitude, "
                             "della or breadcrumbs)")
        if self.count_rule not in COUNT_RULES:
            raise ValueError(f"unknown count_rule {self.count_rule!r}; choose one of {COUNT_RULES}")
        if self.count_rule != "ceil" and self.kind not in ("magnitude", "breadcrumbs"):
            raise ValueError(f"count_rule={self.count_rule!r} applies only to sparsifier=magnitude or breadcrumbs, "
                             f"not {self.kind}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown sparsifier target {self.target!r}; choose one of {TARGETS}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown mask sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if self.kind != "none":
            check_drop_rate(self.drop_rate, self.rescales)
        for knob, kind, unset in (("epsilon", "della", None), ("rank_scope", "della", "row"),
                                  ("gamma", "breadcrumbs", None), ("rescale_q", "darex", None),
                                  ("q_eta", "darex", None), ("q_step", "darex", 0.1), ("q_decay", "darex", 0.1)):
            if getattr(self, knob) != unset and self.kind != kind:
                raise ValueError(f"{knob}={getattr(self, knob)!r} applies only to sparsifier={kind}, not {self.kind}")
        if self.kind == "della":
            if self.rank_scope not in RANK_SCOPES:
                raise ValueError(f"unknown DELLA rank_scope {self.rank_scope!r}; choose one of {RANK_SCOPES}")
            if self.sampler != "torch_rand":
                raise ValueError(f"sampler={self.sampler!r} is not available for sparsifier=della (torch_rand only)")
            check_della_epsilon(self.drop_rate, self.della_epsilon)
        if self.kind == "breadcrumbs":
            check_gamma(self.outlier_fraction)
        if self.kind == "darex":
            self._check_darex()

    def _check_darex(self) -> None:
        rule = self.rescale_q if isinstance(self.rescale_q, str) else None
        if rule is not None and rule not in DAREX_Q_RULES:
            raise ValueError(f"DAREx rescale_q={rule!r} must be a number in [1-p, 1] or 'auto', 'validation' or 'analytical'")
        for knob in ("q_step", "q_decay"):
            v = getattr(self, knob)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
                raise ValueError(f"DAREx {knob}={v!r} must be a number in (0, 1]")
        eta = self.q_eta
        if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float))
                                or not 0.0 < float(eta) < float("inf")):
            raise ValueError(f"DAREx q_eta={eta!r} must be a number > 0")
        if rule == "analytical" and eta is None:
            raise ValueError("DAREx rescale_q=analytical needs q_eta (the bound's eta, a number > 0; "
                             "the paper tunes it per task, e.g. 0.27 to 1.01)")
        if eta is not None and rule != "analytical":
            raise ValueError(f"DAREx q_eta={eta!r} applies only to rescale_q=analytical")
        if rule is not None:
            return
        qs = self.rescale_q.items() if isinstance(self.rescale_q, Mapping) else [(None, self.rescale_q)]
        for model, q in qs:
            where = f" (model {model!r})" if model else ""
            if q is None or (isinstance(q, str) and q == "auto"):
                continue
            if isinstance(q, Mapping) and model is not None:   # a resolved per-layer q: tensor name → number
                for tensor, qt in q.items():
                    if isinstance(qt, (bool, str)) or qt is None:
                        raise ValueError(f"DAREx rescale_q={qt!r} (model {model!r}, tensor {tensor!r}) "
                                         "must be a number in [1-p, 1]")
                    try:
                        check_rescale_q(qt, self.drop_rate)
                    except ValueError as e:
                        raise ValueError(f"{e} (model {model!r}, tensor {tensor!r})") from None
                continue
            if isinstance(q, (bool, str, Mapping)):
                raise ValueError(f"DAREx rescale_q={q!r}{where} must be a number in [1-p, 1] or 'auto'")
            try:
                check_rescale_q(q, self.drop_rate)
            except ValueError as e:
                raise ValueError(f"{e}{where}") from None

    @property
    def rescales(self) -> bool:
        """Whether kept entries are divided by their keep probability (needs p < 1)."""
        if self.rescale == "l1":
            return False
        return self.kind in ("dare", "della", "darex") or (self.kind in ("magnitude", "breadcrumbs") and self.rescale)

    @property
    def streamed(self) -> bool:
        """Whether the engine's chunked fast path implements this kind (:data:`STREAMED_KINDS`;
        the L1 rescale and mergekit's counts take the reference path)."""
        return self.kind in STREAMED_KINDS and self.rescale != "l1" and self.count_rule == "ceil"

    @property
    def della_epsilon(self) -> float:
        """DELLA's ε: the given value, or ½·min(p, 1−p) when unset."""
        if self.epsilon is not None:
            return float(self.epsilon)
        return 0.5 * min(float(self.drop_rate), 1.0 - float(self.drop_rate))

    @property
    def outlier_fraction(self) -> float:
        """Breadcrumbs' γ: the given value, or :data:`DEFAULT_GAMMA` when unset."""
        return DEFAULT_GAMMA if self.gamma is None else float(self.gamma)

    def q_for(self, model: str, tensor: str | None = None) -> float | str:
        """DAREx's q for one model (and tensor): a number, or "auto" (dare_lab's per-tensor proxy).
        A rule still to be chosen on data (validation, analytical) is an error here."""
        q = self.rescale_q
        if isinstance(q, str) and q in ("validation", "analytical"):
            raise ValueError(f"DAREx rescale_q={q} is chosen on data before the merge "
                             "(dare_lab.analysis.darex_q.resolve_rescale_q; the dare-lab merge program does it)")
        if isinstance(q, Mapping):
            if model not in q:
                raise ValueError(f"DAREx rescale_q names no value for model {model!r} (it names {sorted(q)})")
            q = q[model]
            if isinstance(q, Mapping):
                if tensor not in q:
                    raise ValueError(f"DAREx rescale_q of model {model!r} names no value for tensor {tensor!r}")
                q = q[tensor]
        return "auto" if q is None or (isinstance(q, str) and q == "auto") else float(q)

    def apply(self, x: torch.Tensor, seed: int, model: str, tensor: str) -> torch.Tensor:
        """Sparsify one tensor of one model; the mask is seeded by (seed, model, tensor)."""
        if self.kind == "none" or self.drop_rate == 0.0:
            return x
        l1 = self.rescale == "l1"
        if self.kind == "magnitude":
            return magnitude_prune(x, self.drop_rate, rescale=self.rescale, count=self.count_rule)
        if self.kind == "breadcrumbs":
            return breadcrumbs(x, self.drop_rate, self.outlier_fraction, rescale=self.rescale, count=self.count_rule)
        gen = tensor_generator(seed, model, tensor, device=x.device)
        if self.kind == "della":
            return della(x, self.drop_rate, self.della_epsilon, gen, rescale="l1" if l1 else True, scope=self.rank_scope)
        if self.kind == "darex":
            return darex(x, self.drop_rate, gen, self.q_for(model, tensor), sampler=self.sampler)
        return dare(x, self.drop_rate, gen, rescale="l1" if l1 else self.kind == "dare", sampler=self.sampler)


@dataclass(frozen=True)
class Merger:
    """How the sparsified deltas combine.

    average: θ_PRE + mean_k δ̂_k. task_arithmetic: θ_PRE + λ Σ_k w_k δ̂_k.
    ties: θ_PRE + λ · disjoint_merge(trim_k(δ̂_k)) with retain ratio k and sign election;
    ``trim_scope`` says over what the top k is taken: each tensor, or the whole model
    (:data:`TRIM_SCOPES`; ``model`` needs the per-model thresholds, given by the engine).
    linear (mergekit's ``linear``): θ = Σ_k w_k θ_k / Σ_k w_k (``normalize``) or Σ_k w_k θ_k, on
    the models' own weights (no base; sparsifier none). gta (mergekit's generalized task
    arithmetic, its operation order in the compute dtype): θ = θ_PRE + λ·Σ_k w_k δ̂_k a_k / D with
    a_k = [sign(w_k δ̂_k) = e], e = + where Σ_k w_k δ̂_k ≥ 0 else − (``consensus=sum``; a_k = 1
    for ``none``), D = Σ_k w_k a_k (0 → 1; ``none``: |Σ w| < 1e-8 → 1) when ``normalize``, else 1
    (:func:`dare_lab.ops.merge.gta`, :func:`dare_lab.ops.merge.linear`).
    """

    kind: str = "task_arithmetic"
    scaling: float = 1.0
    retain_ratio: float = 0.2
    merge_func: str = "mean"
    weights: tuple[float, ...] | Mapping[str, float] | None = None   # positional (pool order) or name-keyed
    weighted_election: bool = False
    trim_scope: str = "tensor"
    consensus: str = "none"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.kind not in MERGERS:
            raise ValueError(f"unknown merger {self.kind!r}; choose one of {MERGERS}")
        if not isinstance(self.consensus, str) or self.consensus not in CONSENSUS:
            raise ValueError(f"unknown gta consensus {self.consensus!r}; choose one of {CONSENSUS}")
        if self.consensus != "none" and self.kind != "gta":
            raise ValueError(f"consensus={self.consensus!r} applies only to merger=gta, not {self.kind}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"merger normalize={self.normalize!r} must be true or false")
        if self.normalize and self.kind not in ("gta", "linear"):
            raise ValueError(f"normalize=true applies only to merger=gta or linear, not {self.kind}")
        if not isinstance(self.trim_scope, str) or self.trim_scope not in TRIM_SCOPES:
            raise ValueError(f"unknown TIES trim_scope {self.trim_scope!r}; choose one of {TRIM_SCOPES}")
        if self.trim_scope != "tensor" and self.kind != "ties":
            raise ValueError(f"trim_scope={self.trim_scope!r} applies only to merger=ties, not {self.kind}")
        if self.kind == "ties":
            if not 0.0 < float(self.retain_ratio) <= 1.0:
                raise ValueError(f"TIES retain_ratio={self.retain_ratio} is outside (0, 1]")
            if self.merge_func not in mergers.TIES_MERGE_FUNCS:
                raise ValueError(f"unknown TIES merge_func {self.merge_func!r}; choose one of {mergers.TIES_MERGE_FUNCS}")

    def apply(self, base: torch.Tensor, deltas: Sequence[torch.Tensor],
              thresholds: Sequence[float] | None = None) -> torch.Tensor:
        """``thresholds``: with ``trim_scope="model"``, each model's whole-model TIES threshold
        (in the order of ``deltas``); required there, refused otherwise."""
        if (thresholds is not None) != (self.trim_scope == "model"):
            raise ValueError("TIES trim_scope=model needs each model's whole-model threshold (merge through "
                             "dare_lab.engine, which computes them)" if thresholds is None
                             else f"trim thresholds given but trim_scope={self.trim_scope!r}")
        if self.kind == "average":
            return mergers.average(base, deltas)
        if self.kind == "task_arithmetic":
            return mergers.task_arithmetic(base, deltas, self.scaling, self.weights)
        if self.kind == "gta":
            return mergers.gta(base, deltas, self.weights, self.consensus, self.normalize, self.scaling)
        if self.kind == "linear":
            raise ValueError("merger=linear averages the models' own tensors: use MergeMethod.merge_tensor")
        return mergers.ties(base, deltas, self.retain_ratio, self.scaling, self.merge_func,
                            self.weights, self.weighted_election, thresholds)

    @property
    def streamed(self) -> bool:
        """Whether the engine's chunked fast path implements this merger (:data:`STREAMED_MERGERS`)."""
        return self.kind in STREAMED_MERGERS


@dataclass(frozen=True)
class MergeMethod:
    """A sparsifier, a merger and the seed: everything the per-tensor formula needs."""

    name: str = "task_arithmetic"
    sparsifier: Sparsifier = field(default_factory=Sparsifier)
    merger: Merger = field(default_factory=Merger)
    seed: int = 0
    streamable: ClassVar[bool] = True   # one set of knobs for every tensor: the engine may stream it in chunks

    def __post_init__(self) -> None:
        if self.merger.kind == "linear" and self.sparsifier.kind != "none":
            raise ValueError(f"merger=linear averages the models' own tensors: it takes no sparsifier "
                             f"(got {self.sparsifier.kind}; use merger=gta for a sparsified task arithmetic)")

    def merge_tensor(self, tensor_name: str, base: torch.Tensor, finetuned: Mapping[str, torch.Tensor],
                     thresholds: Mapping[str, float] | None = None) -> torch.Tensor:
        """Merge one tensor: ``finetuned`` maps model name → θ_k (same dtype/shape as ``base``);
        ``thresholds`` maps model name → whole-model TIES threshold (``trim_scope="model"`` only)."""
        merger = self.merger
        if isinstance(merger.weights, Mapping):   # name-keyed weights: in the order of ``finetuned``
            missing = [m for m in finetuned if m not in merger.weights]
            if missing:
                raise ValueError(f"no weight for model {missing[0]!r} (weights name {sorted(merger.weights)})")
            from dataclasses import replace

            merger = replace(merger, weights=tuple(float(merger.weights[m]) for m in finetuned))
        if merger.kind == "linear":
            return mergers.linear(list(finetuned.values()), merger.weights, merger.normalize)
        deltas = self.sparsified_deltas(tensor_name, base, finetuned)
        return merger.apply(base, deltas, None if thresholds is None else [float(thresholds[m]) for m in finetuned])

    def sparsified_deltas(self, tensor_name: str, base: torch.Tensor,
                          finetuned: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """δ̂_k of one tensor for every model (in the order of ``finetuned``): what the merger sees."""
        sp = self.sparsifier
        deltas = []
        for model, theta in finetuned.items():
            if sp.target == "finetuned":
                deltas.append(sp.apply(theta, self.seed, model, tensor_name) - base)
            else:
                deltas.append(sp.apply(theta - base, self.seed, model, tensor_name))
        return deltas

    def describe(self) -> dict[str, Any]:
        """Plain dict of every knob (for model cards and metadata)."""
        from dataclasses import asdict

        sp = asdict(self.sparsifier)
        sp["rescale"] = "l1" if self.sparsifier.rescale == "l1" else self.sparsifier.rescales   # what is applied (DARE always rescales), not the MP-only flag
        return {"name": self.name, "seed": self.seed, "sparsifier": sp, "merger": asdict(self.merger)}
