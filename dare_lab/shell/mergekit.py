"""Run a mergekit YAML through dare_lab: ``dare-lab +experiment=mergekit mergekit=config.yml``.

The YAML's ``base_model``, ``models`` (with per-model ``parameters``), ``merge_method``,
global ``parameters`` and ``dtype`` / ``out_dtype`` become a dare_lab pool and method. dare_lab
keeps the paper's semantics; every place where mergekit's differ is printed once as a
``mergekit:`` note (and listed in :attr:`MergekitConfig.notes`):

| mergekit | dare_lab |
|---|---|
| ``linear`` (weights normalised by default) | task arithmetic on the deltas with w_k / Σ w (the same θ; any model may be the base) |
| ``task_arithmetic`` (``lambda``, ``normalize``) | ``task_arithmetic`` (λ = ``lambda``) |
| ``ties`` (``density`` = kept fraction) | ``ties``, ``retain_ratio`` = density |
| ``dare_linear`` / ``dare_ties`` (``density`` = 1 − p) | DARE, ``drop_rate`` = 1 − density, rescale ×1/(1−p); ``dare_ties``: TIES sign election without a trim (``retain_ratio`` = 1) |
| ``breadcrumbs`` / ``breadcrumbs_ties`` (``density``, ``gamma``) | ``sparsifier=breadcrumbs``, ``drop_rate`` = 1 − density, ``gamma`` |
| ``della`` / ``della_linear`` (``density``, ``epsilon``) | ``sparsifier=della`` (ranks per row), ``drop_rate`` = 1 − density, ``epsilon`` |
| ``normalize`` of a TIES-style merge | true: ``merge_func=mean`` (mergekit divides by Σ w of the agreeing models, dare_lab by their count: equal for unit weights); false: ``merge_func=sum`` |
| ``density`` / ``weight`` per model, ``{filter, value}`` lists | ``method.overrides`` (a filter is a substring of the tensor name) |

Not taken (one-line errors): slices / modules, gradients (lists of numbers over layers),
``int8_mask``, per-model ``epsilon`` / ``gamma``, other merge methods.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dare_lab.engine.pool import ModelPool
from dare_lab.ops.method import MergeMethod
from dare_lab.ops.presets import build_method

METHODS = {  # mergekit merge_method → (dare_lab sparsifier, merger)
    "linear": ("none", "task_arithmetic"),
    "task_arithmetic": ("none", "task_arithmetic"),
    "ties": ("none", "ties"),
    "dare_linear": ("dare", "task_arithmetic"),
    "dare_ties": ("dare", "ties"),
    "breadcrumbs": ("breadcrumbs", "task_arithmetic"),
    "breadcrumbs_ties": ("breadcrumbs", "ties"),
    "della_linear": ("della", "task_arithmetic"),
    "della": ("della", "ties"),
}
NORMALIZE_DEFAULT = {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False,
                     "breadcrumbs": False, "breadcrumbs_ties": False, "della_linear": False, "della": True}
PER_MODEL = ("weight", "density")
GLOBAL = ("weight", "density", "lambda", "normalize", "rescale", "int8_mask", "epsilon", "gamma")


class MergekitConfigError(ValueError):
    """A mergekit YAML dare_lab cannot run as written (one line, names the key)."""


@dataclass
class MergekitConfig:
    base: str
    models: dict[str, str]
    method: MergeMethod
    out_dtype: str | None
    notes: list[str] = field(default_factory=list)


def _name(ref: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(ref).rstrip("/").split("/")[-1]) or "model"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name)
    return name


def _entries(key: str, setting: Any) -> list[tuple[str | None, float]]:
    """A mergekit parameter value → [(substring filter or None, number)], first match first."""
    if isinstance(setting, bool) or isinstance(setting, (int, float)):
        return [(None, float(setting))]
    if isinstance(setting, list) and setting and all(isinstance(e, Mapping) for e in setting):
        out = []
        for e in setting:
            if not isinstance(e.get("value"), (int, float)) or isinstance(e.get("value"), bool):
                raise MergekitConfigError(f"mergekit: {key}: {e!r} needs a numeric value (gradients are not supported)")
            f = e.get("filter")
            out.append((None if f in (None, "*") else str(f), float(e["value"])))
        return out
    if isinstance(setting, list):
        raise MergekitConfigError(f"mergekit: {key}={setting!r} is a gradient over layers; dare_lab does not take "
                                  "gradients yet (give one value, or {filter, value} entries)")
    raise MergekitConfigError(f"mergekit: {key}={setting!r} is not a number")


def _overrides(key: str, entries: list[tuple[str | None, float]], knob: str, models: list[str],
               convert=lambda v: v) -> list[dict[str, Any]]:
    """mergekit takes the FIRST matching filter; dare_lab's overrides let the LAST win: emit
    them in reverse."""
    out = []
    for flt, value in reversed(entries):
        o: dict[str, Any] = {knob: convert(value)}
        if models:
            o["models"] = models
        if flt is not None:
            o["pattern"] = re.escape(flt)
        out.append(o)
    return out


def load(path: str | Path, seed: int = 0) -> MergekitConfig:
    """Read a mergekit YAML into a pool and a method (see the module docstring)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise MergekitConfigError(f"mergekit: config file {str(p)!r} does not exist")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise MergekitConfigError(f"mergekit: {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, Mapping):
        raise MergekitConfigError(f"mergekit: {p} must hold a mapping with merge_method and models")
    for key in ("slices", "modules"):
        if cfg.get(key):
            raise MergekitConfigError(f"mergekit: {key} are not supported (dare_lab merges whole models: use models:)")
    kind = cfg.get("merge_method")
    if kind not in METHODS:
        raise MergekitConfigError(f"mergekit: merge_method={kind!r} is not supported; choose one of {sorted(METHODS)}")
    listed = cfg.get("models")
    if not isinstance(listed, list) or not listed:
        raise MergekitConfigError("mergekit: models must be a non-empty list of {model: ..., parameters: ...}")
    params = dict(cfg.get("parameters") or {})
    for k in params:
        if k not in GLOBAL:
            raise MergekitConfigError(f"mergekit: parameters.{k} is not supported for {kind}; known: {list(GLOBAL)}")
    notes: list[str] = []
    base = cfg.get("base_model")
    taken: set[str] = set()
    models: dict[str, str] = {}
    per_model: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(listed):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise MergekitConfigError(f"mergekit: models[{i}] needs a model: key")
        ref = str(entry["model"])
        if base is not None and ref == str(base):
            continue  # mergekit lists the base among the models for some methods; it adds no delta
        name = _name(ref, taken)
        models[name] = ref
        mp = dict(entry.get("parameters") or {})
        for k in mp:
            if k not in PER_MODEL:
                raise MergekitConfigError(f"mergekit: models[{i}].parameters.{k} is not supported; known: {list(PER_MODEL)}")
        per_model[name] = mp
    if not models:
        raise MergekitConfigError("mergekit: no model to merge besides the base")
    if base is None:
        if kind != "linear":
            raise MergekitConfigError(f"mergekit: {kind} needs base_model")
        base = next(iter(models.values()))  # its own delta is 0 and its weight still counts in Σ w
        notes.append(f"linear without base_model: {base} serves as the base (the weighted average is the same θ)")
    sparsifier, merger = METHODS[kind]
    if params.get("int8_mask"):
        raise MergekitConfigError("mergekit: parameters.int8_mask is not supported (dare_lab keeps masks exact)")
    normalize = bool(params.get("normalize", NORMALIZE_DEFAULT[kind]))
    scaling = float(params.get("lambda", 1.0))
    names = list(per_model)

    def weight_entries(name: str) -> list[tuple[str | None, float]]:
        s = per_model[name].get("weight", params.get("weight"))
        if s is None:
            raise MergekitConfigError(f"mergekit: model {models[name]!r} has no weight (mergekit requires one)")
        return _entries(f"{name}.weight", s)

    def density_entries(name: str) -> list[tuple[str | None, float]]:
        s = per_model[name].get("density", params.get("density", 1.0))
        entries = _entries(f"{name}.density", s)
        for _, v in entries:
            if not 0.0 < v <= 1.0:
                raise MergekitConfigError(f"mergekit: {name}.density={v} is outside (0, 1]")
        return entries

    overrides: list[dict[str, Any]] = []
    weights: dict[str, float] = {}
    for name in names:
        w = weight_entries(name)
        plain = [v for f, v in w if f is None]
        weights[name] = plain[0] if plain else 1.0
        if any(f is not None for f, _ in w):
            overrides += _overrides(f"{name}.weight", w, "weight", [name])
    if normalize and kind in ("linear", "task_arithmetic", "dare_linear"):
        if any("weight" in o for o in overrides):
            raise MergekitConfigError("mergekit: normalize with filtered weights is not supported (the sum differs per tensor)")
        total = sum(weights.values())
        if total == 0:
            raise MergekitConfigError("mergekit: normalize with weights summing to 0")
        weights = {k: v / total for k, v in weights.items()}
    elif normalize and merger == "ties" and len(set(weights.values())) > 1:
        notes.append("ties with unequal weights: mergekit divides each entry by Σ w over the agreeing models, dare_lab "
                     "(the TIES paper's disjoint mean) by their count; mergekit's sign election uses the weighted "
                     "deltas, dare_lab's does not (set method.weighted_election=true for mergekit's election)")
    kwargs: dict[str, Any] = {"sparsifier": sparsifier, "merger": merger, "scaling": scaling, "seed": seed,
                              "weights": weights}
    if merger == "ties":
        kwargs["merge_func"] = "mean" if normalize else "sum"
    for knob, owner in (("epsilon", "della"), ("gamma", "breadcrumbs")):
        if knob in params:
            if sparsifier != owner:
                raise MergekitConfigError(f"mergekit: parameters.{knob} is not used by {kind} (only by {owner} methods)")
            kwargs[knob] = float(_entries(f"parameters.{knob}", params[knob])[0][1])
    if sparsifier in ("dare", "della", "breadcrumbs"):
        dens = {n: density_entries(n) for n in names}
        plain = [v for n in names for f, v in dens[n] if f is None]
        kwargs["drop_rate"] = 1.0 - (plain[0] if plain else 1.0)
        for n in names:
            overrides += _overrides(f"{n}.density", dens[n], "drop_rate", [n], lambda v: 1.0 - v)
        rescale = params.get("rescale", sparsifier != "breadcrumbs")
        if sparsifier == "dare" and rescale is False:
            kwargs["sparsifier"] = "drop_only"
            notes.append("rescale: false → DropOnly (the same mask, no rescale)")
        elif sparsifier == "breadcrumbs":
            kwargs["rescale"] = bool(rescale)
            notes.append("breadcrumbs: dare_lab keeps ⌈density·n⌉ entries, mergekit floor(density·n)"
                         + ("; its rescale keeps the L1 norm, dare_lab's is ×1/(1 − p)" if rescale else ""))
        elif sparsifier == "della" and rescale is False:
            raise MergekitConfigError("mergekit: della with rescale: false is not supported (DELLA rescales each kept "
                                      "entry by 1/p_i)")
        else:
            notes.append(f"{sparsifier.upper()} rescale: mergekit rescales each tensor to keep its L1 norm; dare_lab "
                         "divides each kept entry by its keep probability as the paper does (the masks also differ: "
                         "mergekit draws them with torch.bernoulli, dare_lab per (seed, model, tensor))")
        if merger == "ties":
            kwargs["retain_ratio"] = 1.0
            notes.append(f"{kind}: TIES sign election on the sparsified deltas without a magnitude trim, as mergekit does")
    elif merger == "ties":
        dens = {n: density_entries(n) for n in names}
        plain = [v for n in names for f, v in dens[n] if f is None]
        kwargs["retain_ratio"] = plain[0] if plain else 1.0
        for n in names:
            overrides += _overrides(f"{n}.density", dens[n], "retain_ratio", [n])
        notes.append("ties trim: mergekit keeps floor(density·n) entries of each tensor, dare_lab ⌈density·n⌉ "
                     "(the same wherever density·n is whole)")
    if merger == "ties":
        notes.append("sign election: where Σ δ = 0 mergekit elects +, dare_lab the tensor's majority sign")
    kwargs["overrides"] = overrides or None
    method = build_method(name=f"mergekit_{kind}", **kwargs)
    return MergekitConfig(base=str(base), models=models, method=method,
                          out_dtype=cfg.get("out_dtype") or cfg.get("dtype"), notes=notes)


_SHOWN: set[str] = set()


def _loaded(config: str | Path, seed: int = 0) -> MergekitConfig:
    mk = load(config, seed)
    for note in mk.notes:
        if note not in _SHOWN:
            _SHOWN.add(note)
            print(f"mergekit: {note}")
    return mk


def modelpool(config: str | Path, name: str = "mergekit") -> ModelPool:
    """``configs/modelpool/mergekit.yaml``: the YAML's base and models."""
    mk = _loaded(config)
    return ModelPool(base=mk.base, models=mk.models, name=name)


def method(config: str | Path, seed: int = 0) -> MergeMethod:
    """``configs/method/mergekit.yaml``: the YAML's merge method and parameters."""
    mk = _loaded(config, seed)
    if mk.out_dtype:
        note = f"the YAML saves in {mk.out_dtype}: pass engine.out_dtype={mk.out_dtype} to do the same"
        if note not in _SHOWN:
            _SHOWN.add(note)
            print(f"mergekit: {note}")
    return mk.method
