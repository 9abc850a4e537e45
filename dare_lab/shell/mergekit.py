"""Run a mergekit YAML through dare_lab: ``dare-lab +experiment=mergekit mergekit=config.yml``.

The YAML's ``base_model``, ``models`` (with per-model ``parameters``), ``merge_method``,
global ``parameters`` and ``dtype`` / ``out_dtype`` become a dare_lab pool and method. By default
(``mergekit_semantics=paper``) dare_lab keeps the paper's semantics and every place where
mergekit's differ is printed once as a ``mergekit:`` note (and listed in
:attr:`MergekitConfig.notes`); ``mergekit_semantics=mergekit`` takes mergekit's rule at each of
those places instead (third column; read from mergekit 0.1.5's source) and prints that it did.

| mergekit | dare_lab (``paper``) | dare_lab (``mergekit``) |
|---|---|---|
| ``linear`` (``normalize`` default true) | task arithmetic on the deltas with w_k / Σ w (the same θ; any model may be the base) | ``merger=linear``: Σ w_k θ_k / Σ w_k on the models' own tensors, mergekit's op order (a listed ``base_model`` is one of the averaged models) |
| ``task_arithmetic`` (``lambda``, ``normalize``) | ``task_arithmetic`` (λ = ``lambda``) | ``merger=gta``, ``consensus=none``: λ·Σ w_k δ_k (÷ Σ w_k with ``normalize``) |
| ``ties`` (``density`` = kept fraction) | ``ties``, ``retain_ratio`` = density, ⌈density·n⌉ kept | ``sparsifier=magnitude`` (``drop_rate`` = 1 − density, ``count_rule=mergekit``: max(1, int(density·n)) kept) + ``merger=gta``, ``consensus=sum`` |
| ``dare_linear`` / ``dare_ties`` (``density`` = 1 − p, ``rescale`` default true) | DARE, ``drop_rate`` = 1 − density, ×1/(1−p); ``dare_ties``: TIES election without a trim (``retain_ratio`` = 1) | DARE's mask with ``rescale=l1`` (each tensor × ‖δ‖₁/‖δ̂‖₁; ``rescale: false`` = DropOnly) + ``gta`` (``consensus`` none / sum) |
| ``breadcrumbs`` / ``breadcrumbs_ties`` (``density``, ``gamma``) | ``sparsifier=breadcrumbs``, ``drop_rate`` = 1 − density, ``gamma``, ⌈·⌉ counts | the same with ``count_rule=mergekit`` (int(density·n) kept, int(γ·n) off the top) and ``rescale=l1`` where ``rescale: true`` |
| ``della`` / ``della_linear`` (``density``, ``epsilon`` default 0.15) | ``sparsifier=della`` (ranks per row), ``drop_rate`` = 1 − density, ε (dare_lab default ½·min(p, 1−p)), ×1/(1−p_i) | DELLA's probabilities with ``rescale=l1``, ε default 0.15, + ``gta`` |
| ``normalize`` of a TIES-style merge | true: ``merge_func=mean`` (÷ the count of agreeing models); false: ``merge_func=sum`` | ``gta`` ``normalize``: ÷ Σ w_k over the agreeing models (0 → 1) |
| TIES sign election | sign(Σ δ_k) (weights do not vote), Σ = 0: the tensor's majority sign | sign(Σ w_k δ_k), Σ = 0 elects +; agreement on sign(w_k δ_k) |
| ``density`` / ``weight`` per model, ``{filter, value}`` lists (first match wins, per-model before global) | ``method.overrides`` (a filter is a substring of the tensor name) | the same |
| gradients (``weight: [0, 0.5, 1]``: interpolated at t = i/(L − 1) for layer i of L, t = 0 outside the layers) | one ``method.overrides`` entry per layer (``layers: [i]``, :func:`dare_lab.ops.overrides.layer_index`), L from the model's config | the same |
| ``dtype`` (the compute dtype) | float32 (``engine`` compute dtype); ``out_dtype`` / ``dtype`` printed as ``engine.out_dtype`` to pass | the same (with ``dtype: bfloat16`` mergekit rounds every step to bf16: results agree to bf16 rounding only) |
| random masks (``dare_*``, ``della*``) | dare_lab's per-(seed, model, tensor) draws | the same (mergekit draws with ``torch.bernoulli``: only the rule is mergekit's) |

``slices`` are taken in one form: a single slice whose sources each cover every layer of their
model (``layer_range: [0, L]``), which is what mergekit makes of ``models:``; its ``parameters``
rank between the sources' and the global ones, its ``base_model`` is the base.

Evidence: with ``mergekit_semantics=mergekit`` the outputs of real ``mergekit-yaml`` 0.1.5 on a
tiny Llama (tests/fixtures/mergekit: linear, task_arithmetic with and without gradients and
filters, ties with and without a density gradient and a negative weight, bf16 output,
breadcrumbs with the L1 rescale, breadcrumbs_ties; dare_ties and della run through mergekit's code
with dare_lab's mask in place of its ``torch.bernoulli`` draw) are reproduced bit for bit in float32.

Not taken (one-line errors): several slices or partial layer ranges, ``modules``, per-model
``epsilon`` / ``gamma``, gradients of ``epsilon`` / ``gamma`` / ``lambda`` / ``normalize``,
``della`` with ``rescale: false``, other merge methods; ``int8_mask`` only with
``mergekit_semantics=mergekit`` (it changes no value).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dare_lab.engine.pool import ModelPool
from dare_lab.ops.method import MergeMethod
from dare_lab.ops.presets import build_method
from dare_lab.ops.sparsify import drop_rate_of

METHODS = {  # mergekit merge_method → (dare_lab sparsifier, merger) under the paper's semantics
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
MERGEKIT_SPARSIFIER = {"task_arithmetic": "none", "ties": "magnitude"}   # the rest: as METHODS
NORMALIZE_DEFAULT = {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False,
                     "breadcrumbs": False, "breadcrumbs_ties": False, "della_linear": False, "della": True}
RESCALE_DEFAULT = {"dare": True, "della": True, "breadcrumbs": False, "none": False}
PER_MODEL = ("weight", "density")
GLOBAL = ("weight", "density", "lambda", "normalize", "rescale", "int8_mask", "epsilon", "gamma")
SEMANTICS = ("paper", "mergekit")
"""``paper`` (default): dare_lab's formulas, mergekit's differences printed; ``mergekit``:
mergekit's rule at every such place (module docstring)."""


class MergekitConfigError(ValueError):
    """A mergekit YAML dare_lab cannot run as written (one line, names the key)."""


@dataclass
class MergekitConfig:
    base: str
    models: dict[str, str]
    method: MergeMethod
    out_dtype: str | None
    notes: list[str] = field(default_factory=list)
    semantics: str = "paper"


def _name(ref: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(ref).rstrip("/").split("/")[-1]) or "model"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name)
    return name


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _gradient(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_number(e) for e in v)


def _entries(key: str, setting: Any) -> list[tuple[str | None, float | list[float]]]:
    """A mergekit parameter value → [(substring filter or None, number or gradient)], first match
    first (mergekit's ``evaluate_setting``)."""
    if _number(setting):
        return [(None, float(setting))]
    if _gradient(setting):
        return [(None, [float(e) for e in setting])]
    if isinstance(setting, Mapping) and "value" in setting:
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, Mapping) for e in setting):
        out = []
        for e in setting:
            v = e.get("value")
            if not (_number(v) or _gradient(v)):
                raise MergekitConfigError(f"mergekit: {key}: {dict(e)!r} needs a numeric value or a list of numbers")
            f = e.get("filter")
            out.append((None if f in (None, "*") else str(f), float(v) if _number(v) else [float(x) for x in v]))
        return out
    raise MergekitConfigError(f"mergekit: {key}={setting!r} is not a number, a gradient (list of numbers) or "
                              "a list of {filter, value}")


def gradient_value(values: list[float], t: float) -> float:
    """mergekit's interpolation of a gradient at t ∈ [0, 1] (``evaluate_setting``): position
    t·(n − 1) between its two neighbouring values, in float64."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def layer_t(i: int, num_layers: int) -> float:
    """mergekit's t of layer i among num_layers (t = 1 for a single layer)."""
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def num_layers_of(ref: str) -> int:
    """The number of transformer layers of a model (its config: ``num_hidden_layers``, ``n_layer``
    or ``num_layers``), as mergekit reads it to place a gradient's values."""
    cfg_path = Path(ref) / "config.json"
    try:
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(ref).to_dict()
    except Exception as e:  # noqa: BLE001 - any failure is the same one-line error
        raise MergekitConfigError(f"mergekit: a gradient needs the layer count of {ref!r}, whose config could not "
                                  f"be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    raise MergekitConfigError(f"mergekit: a gradient needs the layer count of {ref!r}; its config has none of "
                              "num_hidden_layers / n_layer / num_layers")


class _Resolver:
    """A knob's value per (model, tensor) as mergekit resolves it — the model's own setting,
    then the global one, first matching filter within each — as a uniform value and
    ``method.overrides`` entries (dare_lab's overrides let the LAST match win: emitted from the
    lowest precedence up, each list reversed; a gradient adds one entry per layer)."""

    def __init__(self, layers: callable):
        self.layers = layers   # () → the number of layers (read only when a gradient needs it)

    def resolve(self, knob: str, name: str, sources: list[tuple[str, Any]], convert, default: float | None,
                check=lambda key, v: None) -> tuple[float | None, list[dict[str, Any]]]:
        parsed = [(key, _entries(key, setting)) for key, setting in sources if setting is not None]
        for key, entries in parsed:
            for _, v in entries:
                for x in (v if isinstance(v, list) else [v]):
                    check(key, x)
        if not parsed:
            return default, []
        top = parsed[0][1]
        if len(top) == 1 and top[0][0] is None and not isinstance(top[0][1], list):
            return convert(top[0][1]), []           # one unfiltered number: every tensor
        if len(top) == 1 and top[0][0] is None:
            parsed = parsed[:1]                     # an unfiltered gradient: lower scopes never reached
        overrides: list[dict[str, Any]] = []
        for _, entries in reversed(parsed):
            for flt, v in reversed(entries):
                where: dict[str, Any] = {"models": [name]}
                if flt is not None:
                    where["pattern"] = re.escape(flt)
                if not isinstance(v, list):
                    overrides.append({**where, knob: convert(v)})
                    continue
                n = self.layers()
                overrides.append({**where, knob: convert(gradient_value(v, 0.0))})   # outside the layers: t = 0
                overrides += [{**where, "layers": [i], knob: convert(gradient_value(v, layer_t(i, n)))}
                              for i in range(n)]
        return default, overrides


def _one_slice(slices: Any) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
    """The one form of ``slices`` dare_lab takes: a single output slice whose sources each cover
    every layer of their model, ``layer_range: [0, L]`` (L from the model's config) — the same
    merge as ``models:`` (mergekit turns ``models:`` into exactly that slice). Returns the
    sources as ``models`` entries, the slice's parameters and its base_model."""
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], Mapping):
        n = len(slices) if isinstance(slices, list) else "?"
        raise MergekitConfigError(f"mergekit: slices: dare_lab takes one slice covering every layer of each model "
                                  f"(got {n} slices; stacking or cutting layers is not a merge of whole models)")
    sl = slices[0]
    extra = sorted(set(sl) - {"sources", "parameters", "base_model"})
    if extra:
        raise MergekitConfigError(f"mergekit: slices[0].{extra[0]} is not supported")
    sources = sl.get("sources")
    if not isinstance(sources, list) or not sources:
        raise MergekitConfigError("mergekit: slices[0].sources must be a non-empty list of {model, layer_range}")
    listed = []
    for j, src in enumerate(sources):
        if not isinstance(src, Mapping) or "model" not in src:
            raise MergekitConfigError(f"mergekit: slices[0].sources[{j}] needs a model: key")
        rng = src.get("layer_range")
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) for x in rng)):
            raise MergekitConfigError(f"mergekit: slices[0].sources[{j}].layer_range={rng!r} must be [start, end]")
        n = num_layers_of(str(src["model"]))
        if rng != [0, n]:
            raise MergekitConfigError(f"mergekit: slices[0].sources[{j}].layer_range={rng} does not cover every layer "
                                      f"of {src['model']} ([0, {n}]); dare_lab merges whole models")
        listed.append({"model": src["model"], "parameters": src.get("parameters") or {}})
    return listed, dict(sl.get("parameters") or {}), sl.get("base_model")


def _scalar(params: Mapping[str, Any], key: str, default: Any, kind: str) -> Any:
    v = params.get(key, default)
    if isinstance(v, (list, Mapping)):
        raise MergekitConfigError(f"mergekit: parameters.{key}={v!r}: dare_lab takes one value for {key} "
                                  "(no gradient or filter)")
    return v


def load(path: str | Path, seed: int = 0, semantics: str = "paper") -> MergekitConfig:
    """Read a mergekit YAML into a pool and a method (see the module docstring)."""
    import yaml

    if semantics not in SEMANTICS:
        raise MergekitConfigError(f"mergekit: semantics={semantics!r} is not one of {list(SEMANTICS)} "
                                  "(mergekit_semantics=paper|mergekit)")
    exact = semantics == "mergekit"
    p = Path(path)
    if not p.is_file():
        raise MergekitConfigError(f"mergekit: config file {str(p)!r} does not exist")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise MergekitConfigError(f"mergekit: {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, Mapping):
        raise MergekitConfigError(f"mergekit: {p} must hold a mapping with merge_method and models")
    if cfg.get("modules"):
        raise MergekitConfigError("mergekit: modules are not supported (dare_lab merges whole models: use models: or "
                                  "one slice)")
    kind = cfg.get("merge_method")
    if kind not in METHODS:
        raise MergekitConfigError(f"mergekit: merge_method={kind!r} is not supported; choose one of {sorted(METHODS)}")
    notes: list[str] = []
    base = cfg.get("base_model")
    slice_params: dict[str, Any] = {}
    if cfg.get("slices"):
        if cfg.get("models"):
            raise MergekitConfigError("mergekit: give models: or slices:, not both (as mergekit)")
        listed, slice_params, slice_base = _one_slice(cfg["slices"])
        base = slice_base if slice_base is not None else base
        notes.append("slices: one slice over every layer of each model = models: with the slice's parameters "
                     "between the models' and the global ones")
    else:
        listed = cfg.get("models")
    if not isinstance(listed, list) or not listed:
        raise MergekitConfigError("mergekit: models must be a non-empty list of {model: ..., parameters: ...}")
    params = dict(cfg.get("parameters") or {})
    for where, ps in (("parameters", params), ("slices[0].parameters", slice_params)):
        for k in ps:
            if k not in GLOBAL:
                raise MergekitConfigError(f"mergekit: {where}.{k} is not supported for {kind}; known: {list(GLOBAL)}")
    shared = {**params, **slice_params}   # a slice's shared values come first (mergekit's precedence)
    taken: set[str] = set()
    models: dict[str, str] = {}
    per_model: dict[str, dict[str, Any]] = {}
    keep_base = exact and kind == "linear"    # mergekit's linear averages a listed base like any model
    for i, entry in enumerate(listed):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise MergekitConfigError(f"mergekit: models[{i}] needs a model: key")
        ref = str(entry["model"])
        if base is not None and ref == str(base) and not keep_base:
            continue  # mergekit lists the base among the models for some methods; it adds no delta
        name = _name(ref, taken)
        models[name] = ref
        mp = dict(entry.get("parameters") or {})
        for k in mp:
            if k not in PER_MODEL:
                raise MergekitConfigError(f"mergekit: models[{i}].parameters.{k} is not supported; known: {list(PER_MODEL)}")
        per_model[name] = mp
    if keep_base and base is not None and str(base) not in models.values():
        # mergekit adds the base as one more input of the average, weighted by the global weight
        name = _name(str(base), taken)
        models[name] = str(base)
        per_model[name] = {}
        notes.append(f"semantics=mergekit: linear averages base_model {base} too, as mergekit adds it as an input "
                     "(weight: the global parameters.weight)")
    if not models:
        raise MergekitConfigError("mergekit: no model to merge besides the base")
    if base is None:
        if kind != "linear":
            raise MergekitConfigError(f"mergekit: {kind} needs base_model")
        base = next(iter(models.values()))  # its own delta is 0 and its weight still counts in Σ w
        if not exact:
            notes.append(f"linear without base_model: {base} serves as the base (the weighted average is the same θ)")
    if shared.get("int8_mask") and not exact:
        raise MergekitConfigError("mergekit: parameters.int8_mask is not supported with mergekit_semantics=paper "
                                  "(dare_lab keeps masks exact; with mergekit_semantics=mergekit it changes no value)")
    normalize = _scalar(shared, "normalize", NORMALIZE_DEFAULT[kind], kind)
    scaling = float(_scalar(shared, "lambda", 1.0, kind))
    if not isinstance(normalize, bool):
        raise MergekitConfigError(f"mergekit: parameters.normalize={normalize!r} must be true or false")
    names = list(per_model)
    layers_cache: list[int] = []

    def layer_count() -> int:
        if not layers_cache:
            layers_cache.append(num_layers_of(str(base)))
        return layers_cache[0]

    res = _Resolver(layer_count)
    overrides: list[dict[str, Any]] = []

    def check_density(key: str, v: float) -> None:
        if not 0.0 < v <= 1.0:
            raise MergekitConfigError(f"mergekit: {key}: density={v} is outside (0, 1]")

    weights: dict[str, float] = {}
    for name in names:
        srcs = [(f"{name}.weight", per_model[name].get("weight")), ("slices[0].parameters.weight",
                slice_params.get("weight")), ("parameters.weight", params.get("weight"))]
        if all(v is None for _, v in srcs):
            raise MergekitConfigError(f"mergekit: model {models[name]!r} has no weight (mergekit requires one)")
        w, o = res.resolve("weight", name, srcs, float, 1.0)
        weights[name] = w
        overrides += o
    varying_w = any("weight" in o for o in overrides)

    sparsifier, merger = METHODS[kind]
    if exact:
        sparsifier = MERGEKIT_SPARSIFIER.get(kind, sparsifier)
    kwargs: dict[str, Any] = {"sparsifier": sparsifier, "scaling": scaling, "seed": seed, "weights": weights}
    for knob, owner in (("epsilon", "della"), ("gamma", "breadcrumbs")):
        if knob in shared:
            if METHODS[kind][0] != owner:
                raise MergekitConfigError(f"mergekit: parameters.{knob} is not used by {kind} (only by {owner} methods)")
            kwargs[knob] = float(_scalar(shared, knob, None, kind))
    if exact and METHODS[kind][0] == "della" and "epsilon" not in kwargs:
        kwargs["epsilon"] = 0.15          # mergekit's default ε
    if exact and METHODS[kind][0] == "breadcrumbs" and "gamma" not in kwargs:
        kwargs["gamma"] = 0.01
    rescale = _scalar(shared, "rescale", RESCALE_DEFAULT[METHODS[kind][0]], kind)
    if not isinstance(rescale, bool):
        raise MergekitConfigError(f"mergekit: parameters.rescale={rescale!r} must be true or false")

    def densities(knob: str, convert) -> float:
        """Each model's density as ``knob`` (converted): the first model's uniform value for the
        method, an override for every other value (mergekit's default density 1 where no filter
        of a model's own list matches and no global value does)."""
        vals, per = {}, {}
        for n in names:
            srcs = [(f"{n}.density", per_model[n].get("density")),
                    ("slices[0].parameters.density", slice_params.get("density")),
                    ("parameters.density", params.get("density"))]
            vals[n], per[n] = res.resolve(knob, n, srcs, convert, convert(1.0), check_density)
        first = vals[names[0]]
        for n in names:
            if vals[n] != first:
                overrides.append({"models": [n], knob: vals[n]})
            overrides.extend(per[n])
        return first

    if exact:
        return _load_mergekit(kind, cfg, base, models, kwargs, weights, overrides, varying_w, normalize, rescale,
                              densities, notes)

    kwargs["merger"] = merger
    if normalize and kind in ("linear", "task_arithmetic", "dare_linear"):
        if varying_w:
            raise MergekitConfigError("mergekit: normalize with filtered or per-layer weights is not supported with "
                                      "mergekit_semantics=paper (the sum differs per tensor); use "
                                      "mergekit_semantics=mergekit")
        total = sum(weights.values())
        if total == 0:
            raise MergekitConfigError("mergekit: normalize with weights summing to 0")
        kwargs["weights"] = {k: v / total for k, v in weights.items()}
    elif normalize and merger == "ties" and (len(set(weights.values())) > 1 or varying_w):
        notes.append("ties with unequal weights: mergekit divides each entry by Σ w over the agreeing models, dare_lab "
                     "(the TIES paper's disjoint mean) by their count; mergekit's sign election uses the weighted "
                     "deltas, dare_lab's does not (mergekit_semantics=mergekit takes mergekit's rule)")
    if merger == "ties":
        kwargs["merge_func"] = "mean" if normalize else "sum"
    if sparsifier in ("dare", "della", "breadcrumbs"):
        kwargs["drop_rate"] = densities("drop_rate", drop_rate_of)
        if sparsifier == "dare" and rescale is False:
            kwargs["sparsifier"] = "drop_only"
            notes.append("rescale: false → DropOnly (the same mask, no rescale)")
        elif sparsifier == "breadcrumbs":
            kwargs["rescale"] = bool(rescale)
            notes.append("breadcrumbs: dare_lab keeps ⌈density·n⌉ entries, mergekit int(density·n)"
                         + ("; its rescale keeps the L1 norm, dare_lab's is ×1/(1 − p)" if rescale else ""))
        elif sparsifier == "della" and rescale is False:
            raise MergekitConfigError("mergekit: della with rescale: false is not supported (DELLA rescales each kept "
                                      "entry by 1/p_i)")
        else:
            notes.append(f"{sparsifier.upper()} rescale: mergekit rescales each tensor to keep its L1 norm; dare_lab "
                         "divides each kept entry by its keep probability as the paper does (the masks also differ: "
                         "mergekit draws them with torch.bernoulli, dare_lab per (seed, model, tensor))")
        if sparsifier == "della" and "epsilon" not in kwargs:
            notes.append("della: mergekit's default epsilon is 0.15, dare_lab's ½·min(p, 1 − p)")
        if merger == "ties":
            kwargs["retain_ratio"] = 1.0
            notes.append(f"{kind}: TIES sign election on the sparsified deltas without a magnitude trim, as mergekit does")
    elif merger == "ties":
        kwargs["retain_ratio"] = densities("retain_ratio", float)
        notes.append("ties trim: mergekit keeps int(density·n) entries of each tensor (at least 1), dare_lab "
                     "⌈density·n⌉ (the same wherever density·n is whole)")
    if merger == "ties":
        notes.append("sign election: where Σ δ = 0 mergekit elects +, dare_lab the tensor's majority sign")
    if cfg.get("dtype") not in (None, "float32"):
        notes.append(f"dtype: mergekit computes in {cfg['dtype']}, dare_lab in float32")
    kwargs["overrides"] = overrides or None
    method = build_method(name=f"mergekit_{kind}", **kwargs)
    return MergekitConfig(base=str(base), models=models, method=method,
                          out_dtype=cfg.get("out_dtype") or cfg.get("dtype"), notes=notes)


def _load_mergekit(kind, cfg, base, models, kwargs, weights, overrides, varying_w, normalize, rescale, densities,
                   notes) -> MergekitConfig:
    """``mergekit_semantics=mergekit``: each difference of the module docstring's table taken as
    mergekit's rule (third column)."""
    sp = kwargs["sparsifier"]
    tag = "semantics=mergekit: "
    if kind == "linear":
        kwargs.update(merger="linear", normalize=normalize)
        notes.append(tag + "linear = Σ w_k θ_k" + (" / Σ w_k" if normalize else "") + " on the models' own tensors, "
                     "mergekit's order of operations (merger=linear)")
    else:
        consensus = "sum" if METHODS[kind][1] == "ties" else "none"
        kwargs.update(merger="gta", consensus=consensus, normalize=normalize)
        notes.append(tag + f"{kind} combines as mergekit's generalized task arithmetic (merger=gta, "
                     f"consensus={consensus}, normalize={str(normalize).lower()}): w_k·δ_k summed"
                     + (", sign elected on Σ w_k δ_k with 0 → +, agreement on sign(w_k δ_k)" if consensus == "sum" else "")
                     + (", ÷ Σ w_k" + (" of the agreeing models" if consensus == "sum" else "") if normalize else ""))
    if sp != "none":
        kwargs["drop_rate"] = densities("drop_rate", drop_rate_of)
        if sp in ("magnitude", "breadcrumbs"):
            kwargs["count_rule"] = "mergekit"
            notes.append(tag + ("ties trim = magnitude pruning with mergekit's count max(1, int(density·n))"
                                if sp == "magnitude" else
                                "breadcrumbs counts: int(density·n) kept, int(gamma·n) off the top")
                         + " (count_rule=mergekit)")
        if sp == "della" and rescale is False:
            raise MergekitConfigError("mergekit: della with rescale: false is not supported (dare_lab's DELLA rescales "
                                      "by 1/p_i or, with rescale=l1, by the L1 norm)")
        if rescale:
            kwargs["rescale"] = "l1"
            notes.append(tag + f"{sp} rescale = mergekit's L1 norm: each sparsified tensor × ‖δ‖₁/‖δ̂‖₁ (rescale=l1)")
        elif sp == "dare":
            kwargs["sparsifier"] = "drop_only"
            notes.append(tag + "rescale: false → DropOnly (the same mask, no rescale)")
        if sp in ("dare", "della"):
            notes.append(tag + "the random masks are dare_lab's per-(seed, model, tensor) draws (mergekit draws with "
                         "torch.bernoulli): the rule is mergekit's, the mask is not")
        if sp == "della":
            notes.append(tag + f"della epsilon = {kwargs['epsilon']} (mergekit's default 0.15 unless given)")
    if cfg.get("dtype") not in (None, "float32"):
        notes.append(tag + f"mergekit computes in dtype {cfg['dtype']}, dare_lab in float32: results agree to "
                     f"{cfg['dtype']} rounding, not bit for bit")
    elif cfg.get("dtype") is None:
        notes.append(tag + "no dtype: mergekit computes in the checkpoints' stored dtype, dare_lab in float32 (the "
                     "same bits for float32 checkpoints; add dtype: float32 to make mergekit match)")
    if (cfg.get("parameters") or {}).get("int8_mask"):
        notes.append(tag + "int8_mask only changes mergekit's mask storage, no value")
    kwargs["overrides"] = overrides or None
    method = build_method(name=f"mergekit_{kind}", **kwargs)
    return MergekitConfig(base=str(base), models=models, method=method,
                          out_dtype=cfg.get("out_dtype") or cfg.get("dtype"), notes=notes, semantics="mergekit")


_SHOWN: set[str] = set()


def _loaded(config: str | Path, seed: int = 0, semantics: str = "paper") -> MergekitConfig:
    mk = load(config, seed, semantics)
    for note in mk.notes:
        if note not in _SHOWN:
            _SHOWN.add(note)
            print(f"mergekit: {note}")
    return mk


def modelpool(config: str | Path, name: str = "mergekit", semantics: str = "paper") -> ModelPool:
    """``configs/modelpool/mergekit.yaml``: the YAML's base and models."""
    mk = _loaded(config, semantics=semantics)
    return ModelPool(base=mk.base, models=mk.models, name=name)


def method(config: str | Path, seed: int = 0, semantics: str = "paper") -> MergeMethod:
    """``configs/method/mergekit.yaml``: the YAML's merge method and parameters."""
    mk = _loaded(config, seed, semantics)
    if mk.out_dtype:
        note = f"the YAML saves in {mk.out_dtype}: pass engine.out_dtype={mk.out_dtype} to do the same"
        if note not in _SHOWN:
            _SHOWN.add(note)
            print(f"mergekit: {note}")
    return mk.method
