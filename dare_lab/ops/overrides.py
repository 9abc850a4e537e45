"""Per-model and per-tensor values of a merge method's knobs (mergekit's per-model
``parameters`` and tensor filters, in dare_lab's own terms).

An override names the knobs it sets and where they apply::

    {models: [math], drop_rate: 0.95}            # every tensor of model "math"
    {pattern: "mlp\\.", retain_ratio: 0.5}        # tensors whose name matches (re.search), every model
    {models: [code], pattern: "embed", weight: 0}
    {layers: [0, 1], pattern: "mlp", weight: 0.5}  # only tensors of transformer layers 0 and 1

``layers`` matches a tensor's layer index: the number after a ``layers.`` / ``layer.`` / ``h.`` /
``blocks.`` / ``block.`` name segment (``model.layers.3.mlp.up_proj.weight`` → 3,
:func:`layer_index`); a tensor outside the layers (embeddings, final norm, heads) never matches.
mergekit's gradients (a list of values interpolated over the layers) import as one override per
layer (:mod:`dare_lab.shell.mergekit`).

For a (model, tensor) pair the method's own value is the start; every matching override is
applied in the order listed, so a later entry wins (list the general ones first).

| knob | where it may vary | formula it changes |
|---|---|---|
| ``drop_rate`` | model and tensor | p of the sparsifier for that model's delta |
| ``weight`` | model and tensor | w_k of task arithmetic / TIES |
| ``retain_ratio`` | model and tensor | TIES' kept fraction k of that model's trimmed delta |
| ``scaling`` | tensor only | λ of task arithmetic / TIES for that tensor |
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from dare_lab.ops import merge as mergers
from dare_lab.ops.method import MergeMethod
from dare_lab.ops.sparsify import check_drop_rate

MODEL_KNOBS = ("drop_rate", "weight", "retain_ratio")
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(tensor: str) -> int | None:
    """The transformer layer index of a tensor name (first match of :data:`LAYER_RE`), or None."""
    m = LAYER_RE.search(tensor)
    return None if m is None else int(m.group(1))
TENSOR_KNOBS = ("scaling",)


@dataclass(frozen=True)
class ParamOverride:
    """``values`` (knob → number) for the ``models`` listed (empty: every model) and the
    tensors whose name matches ``pattern`` (None: every tensor)."""

    values: tuple[tuple[str, float], ...]
    models: tuple[str, ...] = ()
    pattern: str | None = None
    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError(f"method.overrides entry {self.where()} sets no knob; give one of "
                             f"{list(MODEL_KNOBS + TENSOR_KNOBS)}")
        for knob, value in self.values:
            if knob not in MODEL_KNOBS + TENSOR_KNOBS:
                raise ValueError(f"method.overrides: unknown knob {knob!r}; choose from {list(MODEL_KNOBS + TENSOR_KNOBS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"method.overrides: {knob}={value!r} {self.where()} is not a finite number")
            if knob in TENSOR_KNOBS and self.models:
                raise ValueError(f"method.overrides: {knob} applies to whole tensors, not to models {list(self.models)}")
            if knob == "retain_ratio" and not 0.0 < value <= 1.0:
                raise ValueError(f"method.overrides: retain_ratio={value} {self.where()} is outside (0, 1]")
        for i in self.layers:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"method.overrides: layers={list(self.layers)} must be layer indices (integers >= 0)")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"method.overrides: pattern {self.pattern!r} is not a regular expression ({e})") from None

    def where(self) -> str:
        parts = [f"models={list(self.models)}" if self.models else "", f"pattern={self.pattern!r}" if self.pattern else "",
                 f"layers={list(self.layers)}" if self.layers else ""]
        return "(" + (", ".join(p for p in parts if p) or "everywhere") + ")"

    def applies(self, model: str | None, tensor: str) -> bool:
        if self.models and model not in self.models:
            return False
        if self.layers and layer_index(tensor) not in self.layers:
            return False
        return self.pattern is None or re.search(self.pattern, tensor) is not None


def parse_overrides(entries: Sequence[Mapping[str, Any]] | None) -> tuple[ParamOverride, ...]:
    """Config entries (``{models, pattern, <knob>: value ...}``) → :class:`ParamOverride` s."""
    out = []
    for i, e in enumerate(entries or ()):
        if not isinstance(e, Mapping):
            raise ValueError(f"method.overrides[{i}] must be a mapping like {{models: [a], drop_rate: 0.9}}, got {e!r}")
        e = dict(e)
        models = e.pop("models", None) or ()
        if isinstance(models, str):
            models = (models,)
        pattern = e.pop("pattern", None)
        layers = e.pop("layers", None)
        layers = () if layers is None else ((layers,) if isinstance(layers, int) else tuple(layers))
        out.append(ParamOverride(values=tuple(e.items()), models=tuple(str(m) for m in models),
                                 pattern=None if pattern is None else str(pattern), layers=layers))
    return tuple(out)


@dataclass(frozen=True)
class OverriddenMethod(MergeMethod):
    """A :class:`MergeMethod` whose knobs vary by model and tensor (see the module docstring).

    The engine runs it through its whole-tensor reference path (``streamable`` is False), with
    the same per-(seed, model, tensor) masks as the uniform method.
    """

    overrides: tuple[ParamOverride, ...] = field(default_factory=tuple)
    streamable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for o in self.overrides:
            for knob, value in o.values:
                if knob == "drop_rate" and self.sparsifier.kind != "none":
                    try:
                        check_drop_rate(float(value), self.sparsifier.rescales)
                    except ValueError as e:
                        raise ValueError(f"method.overrides: drop_rate={value} {o.where()}: {e}") from None
                if knob == "drop_rate" and self.sparsifier.kind == "none":
                    raise ValueError(f"method.overrides sets drop_rate {o.where()} but the method has no sparsifier")
                if knob == "retain_ratio" and self.merger.kind != "ties":
                    raise ValueError(f"method.overrides sets retain_ratio {o.where()} but the merger is {self.merger.kind}")

    def check_models(self, names: Sequence[str]) -> None:
        """A model named by an override must be in the pool (a typo would silently do nothing)."""
        unknown = sorted({m for o in self.overrides for m in o.models} - set(names))
        if unknown:
            raise ValueError(f"method.overrides names models {unknown} that are not in the pool {sorted(names)}")

    def value(self, knob: str, model: str | None, tensor: str, default: float) -> float:
        v = default
        for o in self.overrides:
            if o.applies(model, tensor):
                v = dict(o.values).get(knob, v)
        return float(v)

    def merge_tensor(self, tensor_name: str, base: torch.Tensor, finetuned: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sp, mg = self.sparsifier, self.merger
        names = list(finetuned)
        if isinstance(mg.weights, Mapping):
            w0 = [float(mg.weights[m]) for m in names]
        else:
            w0 = list(mg.weights) if mg.weights is not None else [1.0] * len(names)
        weights = [self.value("weight", m, tensor_name, w) for m, w in zip(names, w0)]
        scaling = self.value("scaling", None, tensor_name, mg.scaling)
        if mg.kind == "linear":
            return mergers.linear([finetuned[m] for m in names], weights, mg.normalize)
        deltas = []
        for m in names:
            sp_m = replace(sp, drop_rate=self.value("drop_rate", m, tensor_name, sp.drop_rate)) if sp.kind != "none" else sp
            theta = finetuned[m]
            if sp.target == "finetuned":
                deltas.append(sp_m.apply(theta, self.seed, m, tensor_name) - base)
            else:
                deltas.append(sp_m.apply(theta - base, self.seed, m, tensor_name))
        if mg.kind == "average":
            return mergers.average(base, deltas)
        if mg.kind == "task_arithmetic":
            return mergers.task_arithmetic(base, deltas, scaling, weights)
        if mg.kind == "gta":
            return mergers.gta(base, deltas, weights, mg.consensus, mg.normalize, scaling)
        ratios = [self.value("retain_ratio", m, tensor_name, mg.retain_ratio) for m in names]
        return mergers.ties(base, deltas, ratios, scaling, mg.merge_func, weights, mg.weighted_election)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["overrides"] = [{"models": list(o.models), "pattern": o.pattern, **({"layers": list(o.layers)} if o.layers else {}),
                           **dict(o.values)} for o in self.overrides]
        return d
