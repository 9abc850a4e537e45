"""DAREx-q's q chosen on data, as the paper does (Deng et al. 2024, official code vengdeng/DAREx).

A method whose sparsifier is ``darex`` with ``rescale_q: validation`` or ``rescale_q: analytical``
is resolved here, before the merge, into the same method with concrete numbers:

* ``validation`` (the paper's 1/q_v, ``find_q_encoder.py`` without ``--analytical``): for each
  fine-tuned model k alone, θ_PRE + m ⊙ δ_k / q (with the masks of seed :data:`SEARCH_SEED`, as
  the official code searches on its seed-0 drop and then uses the q for every seed) is scored on the taskpool's *validation* split of k's own tasks (the classification
  taskpool's fixed-seed 10 % of the training rows; never the test rows) for q on the official
  coarse-to-fine grid (:func:`dare_lab.ops.darex_q.q_grid_search`, q ∈ [1 − p, 1]); the best q
  is k's q for every tensor. Score: the mean over k's tasks of ``accuracy`` (else the task's first
  metric). Every q costs one sparsified model and one validation pass.
* ``analytical`` (``--analytical``, ``utils/analyticalq.py`` + ``utils/getwx.py``): the mean input
  x̄_j of every ``nn.Linear`` of fine-tuned model k over ``calibration`` unlabeled texts (its own
  tasks' training rows, one text per forward pass, x̄ = mean over texts of the per-text mean
  over tokens; the official code uses 50 random 128-token windows of WikiText-2), then per layer
  c_ij = δ_ij · x̄_j (plus the bias delta as a column) and the layer's q =
  :func:`dare_lab.ops.darex_q.darex_analytical_q` (η = ``q_eta``). Tensors the official code
  gives no q of their own (embeddings, LayerNorm, tensors of no linear layer) take the mean of
  the layers' q; a bias takes its weight's. Holds one model's tensors in memory (encoder scale).

Resolutions are cached per process (a sweep's TA and TIES jobs share them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from dare_lab.engine.pool import ModelPool
from dare_lab.ops.darex_q import darex_analytical_q, q_grid_search
from dare_lab.ops.method import MergeMethod, Merger

RULES_ON_DATA = ("validation", "analytical")
CALIBRATION_TEXTS = 50
"""Unlabeled texts per model for the analytical rule (the official code: 50 windows)."""
SKIP_NAMES = ("classifier", "lm_head", "bias", "LayerNorm", "embeddings")
"""Tensors the official analytical rule computes no q of its own for (substring match)."""

SEARCH_SEED = 0
"""The validation search scores q on this seed's masks (official: ``set_seed()``, seed 0); the
chosen q then serves every merge seed."""

_CACHE: dict[tuple, Any] = {}


def needs_resolution(method: Any) -> str | None:
    """The rule (``validation`` / ``analytical``) a method's DAREx q still needs, else None."""
    sp = getattr(method, "sparsifier", None)
    if not isinstance(method, MergeMethod) or sp is None or sp.kind != "darex":
        return None
    q = sp.rescale_q
    return q if isinstance(q, str) and q in RULES_ON_DATA else None


def _primary_score(metrics: Mapping[str, float]) -> float:
    """Mean over tasks of ``<task>/accuracy`` (else the task's first metric)."""
    tasks: dict[str, dict[str, float]] = {}
    for k, v in metrics.items():
        task, _, m = k.rpartition("/")
        tasks.setdefault(task, {})[m] = float(v)
    picked = [ms["accuracy"] if "accuracy" in ms else next(iter(ms.values())) for ms in tasks.values()]
    if not picked:
        raise ValueError("DAREx rescale_q=validation: the validation taskpool returned no metric")
    return float(np.mean(picked))


def _single(method: MergeMethod, q: float) -> MergeMethod:
    sp = replace(method.sparsifier, rescale_q=float(q), q_eta=None)
    return MergeMethod(name=f"darex_q{q:g}", sparsifier=sp, merger=Merger("task_arithmetic", scaling=1.0),
                       seed=SEARCH_SEED)


def validation_q(method: MergeMethod, pool: ModelPool, model: str, taskpool: Any, scope: Any = None,
                 log: Callable[[str], None] | None = print) -> tuple[float, list[tuple[float, float]]]:
    """The paper's 1/q_v for one model: (best q, [(q, validation score), …] in search order)."""
    from dare_lab.analysis.redundancy import evaluate_state, restrict_taskpool, sparsified_state, sub_pool

    if taskpool is None or not hasattr(taskpool, "with_split"):
        raise ValueError("DAREx rescale_q=validation needs a taskpool with a validation split "
                         "(a classification taskpool, e.g. taskpool=demo)")
    vt = restrict_taskpool(taskpool.with_split("validation"), model)
    sp = method.sparsifier
    key = ("validation", str(pool.base), str(pool.models[model]), model, float(sp.drop_rate),
           sp.sampler, sp.target, float(sp.q_step), float(sp.q_decay), repr(scope),
           tuple(getattr(t, "name", str(t)) for t in getattr(vt, "tasks", []) or []))
    if key in _CACHE:
        return _CACHE[key]
    sub, ref = sub_pool(pool, model), pool.models[model]

    def score(q: float) -> float:
        m = _single(method, q)
        state = sparsified_state(pool.base, ref, model, m, scope)
        s = _primary_score(evaluate_state(vt, state, sub, None, f"darex-{model}", pool.base, ref, m, scope))
        del state
        if log:
            log(f"[darex-q] {model} p={sp.drop_rate:g} search seed={SEARCH_SEED} q={q:.4f}: validation {s:.4f}")
        return s

    lower = float(1 - Fraction(repr(float(sp.drop_rate))))      # 1 − p on the decimal p
    _CACHE[key] = q_grid_search(score, lower, 1.0, float(sp.q_step), float(sp.q_decay))
    return _CACHE[key]


def mean_linear_inputs(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Module name → mean input x̄ of every ``nn.Linear``: per batch the mean over its tokens, then
    the running mean over batches (official ``WrappedGPT.add_batch``), float32."""
    sums: dict[str, torch.Tensor] = {}
    count = {"n": 0}
    hooks = []

    def hook(name: str):
        def fn(_mod, inp, _out):
            x = inp[0].detach().to(torch.float32)
            x = x.reshape(-1, x.shape[-1]).mean(dim=0)
            sums[name] = sums[name] + x if name in sums else x
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
                count["n"] += 1
    finally:
        for h in hooks:
            h.remove()
    return {k: v / count["n"] for k, v in sums.items()}


def layer_qs(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], xbar: Mapping[str, torch.Tensor],
             p: float, eta: float) -> dict[str, float]:
    """Every tensor's q by the analytical rule (see the module doc), from the two state dicts and
    the mean linear inputs. Tensors of no linear layer take the mean of the layers' q."""
    qs: dict[str, float] = {}
    for mod, x in xbar.items():
        wname = f"{mod}.weight"
        if wname not in tuned or wname not in base or any(s in wname for s in SKIP_NAMES):
            continue
        c = (tuned[wname].to(torch.float64) - base[wname].to(torch.float64)) * x.to(torch.float64).reshape(1, -1)
        bname = f"{mod}.bias"
        if bname in tuned and bname in base:
            c = torch.cat([c, (tuned[bname].to(torch.float64) - base[bname].to(torch.float64)).reshape(-1, 1)], dim=1)
        qs[wname] = darex_analytical_q(c, p, eta)
    if not qs:
        raise ValueError("DAREx rescale_q=analytical: no linear layer of the model has a delta to compute q from")
    mean_q = float(np.mean(list(qs.values())))
    out: dict[str, float] = {}
    for name in tuned:
        if name in qs:
            out[name] = qs[name]
        elif name.endswith(".bias") and name[:-5] + ".weight" in qs:
            out[name] = qs[name[:-5] + ".weight"]
        else:
            out[name] = mean_q
    return out


def analytical_q(method: MergeMethod, pool: ModelPool, model: str, taskpool: Any,
                 calibration: int = CALIBRATION_TEXTS) -> dict[str, float]:
    """The paper's per-layer q for one model: tensor name → q."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dare_lab.analysis.redundancy import restrict_taskpool
    from dare_lab.engine.sources import resolve_model_dir
    from dare_lab.taskpool.classification import read_state_dict

    if taskpool is None or not hasattr(taskpool, "with_split"):
        raise ValueError("DAREx rescale_q=analytical needs a classification taskpool for its unlabeled "
                         "calibration texts (the training rows of the model's own tasks)")
    sp = method.sparsifier
    tr = restrict_taskpool(taskpool.with_split("train"), model)
    key = ("analytical", str(pool.base), str(pool.models[model]), model, float(sp.drop_rate), float(sp.q_eta),
           int(calibration), tuple(t.name for t in tr.tasks))
    if key in _CACHE:
        return _CACHE[key]
    path = resolve_model_dir(pool.models[model])
    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    batches = []
    for task in tr.tasks:
        ex = tr.examples(task)
        n = min(int(calibration), len(ex))
        for i in range(n):
            enc = tok(ex.texts[i], ex.pairs[i], truncation=True, max_length=task.max_length, return_tensors="pt") \
                if ex.pairs is not None else tok(ex.texts[i], truncation=True, max_length=task.max_length, return_tensors="pt")
            batches.append(dict(enc))
    if not batches:
        raise ValueError(f"DAREx rescale_q=analytical: model {model!r} has no training texts to calibrate on")
    xbar = mean_linear_inputs(net, batches)
    del net
    base = read_state_dict(resolve_model_dir(pool.base))
    tuned = read_state_dict(path)
    _CACHE[key] = layer_qs(base, tuned, xbar, float(sp.drop_rate), float(sp.q_eta))
    return _CACHE[key]


def resolve_rescale_q(method: MergeMethod, pool: ModelPool, taskpool: Any, scope: Any = None,
                      log: Callable[[str], None] | None = print) -> tuple[MergeMethod, dict[str, Any]]:
    """The method with its DAREx rule replaced by the chosen numbers (model → q for
    ``validation``, model → {tensor → q} for ``analytical``), and metrics naming them
    (``darex/<model>/q`` or ``darex/<model>/q_mean``)."""
    rule = needs_resolution(method)
    if rule is None:
        return method, {}
    sp = method.sparsifier
    chosen: dict[str, Any] = {}
    info: dict[str, Any] = {"darex/rule": rule}
    for model in pool.models:
        if rule == "validation":
            q, hist = validation_q(method, pool, model, taskpool, scope, log)
            chosen[model] = float(q)
            info[f"darex/{model}/q"] = float(q)
            info[f"darex/{model}/q_evaluations"] = len(hist)
        else:
            per = analytical_q(method, pool, model, taskpool)
            chosen[model] = per
            info[f"darex/{model}/q_mean"] = float(np.mean(list(per.values())))
        if log:
            shown = info.get(f"darex/{model}/q", info.get(f"darex/{model}/q_mean"))
            log(f"[darex-q] {model}: rescale_q={rule} → q {'' if rule == 'validation' else 'mean '}{shown:.4f}")
    return replace(method, sparsifier=replace(sp, rescale_q=chosen, q_eta=None)), info
