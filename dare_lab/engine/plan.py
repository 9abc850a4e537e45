"""Plan a merge from headers alone: which tensors merge, which copy, and every error up front.

Nothing is read or written before the whole pool checks out (shapes, missing tensors,
vocabulary sizes), so bad input fails fast and leaves no output behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from dare_lab.engine.scope import Scope
from dare_lab.engine.sources import TensorSource

VOCAB_POLICIES = ("error", "truncate")


class PoolMismatchError(ValueError):
    """Input models that cannot be merged tensor by tensor."""


@dataclass
class TensorPlan:
    name: str                       # output (= base) name; also the name that seeds masks
    shape: tuple[int, ...]
    base_dtype: torch.dtype
    merge: bool                     # False: copied from the base model
    sources: dict[str, str] = field(default_factory=dict)  # model → its tensor name
    rows: int | None = None         # vocab truncation: keep the first ``rows`` rows


def _vocab_like(name: str) -> bool:
    return any(k in name for k in ("embed", "wte", "lm_head", "word_embeddings", "output.weight", "shared"))


def _counterparts(names: set[str], base_names: set[str]) -> dict[str, str]:
    """Map base tensor names to a model's names.

    Identity when the names overlap; when the base is a bare encoder ("embeddings.…") and the
    model a task model ("bert.embeddings.…"), the model's first name component is dropped.
    """
    if names & base_names:
        return {n: n for n in names}
    return {n.partition(".")[2]: n for n in names if "." in n}


def plan_merge(base: TensorSource, models: Mapping[str, TensorSource], scope: Scope,
               vocab_policy: str = "error") -> list[TensorPlan]:
    """Validate the pool against the base and return one :class:`TensorPlan` per output tensor."""
    if vocab_policy not in VOCAB_POLICIES:
        raise ValueError(f"unknown vocab_policy {vocab_policy!r}; choose one of {VOCAB_POLICIES}")
    if not models:
        raise PoolMismatchError("the model pool has no fine-tuned models")
    base_names = base.names()
    plans: list[TensorPlan] = []
    model_names = {m: set(src.names()) for m, src in models.items()}
    lookup = {m: _counterparts(names, set(base_names)) for m, names in model_names.items()}
    for name in base_names:
        shape, dtype = tuple(base.shape(name)), base.dtype(name)
        merge = scope.selects(name, shape, dtype)
        plan = TensorPlan(name, shape, dtype, merge)
        if merge:
            missing = []
            for m, src in models.items():
                cand = lookup[m].get(name)
                if cand is None:
                    missing.append(m)
                    continue
                mshape = tuple(src.shape(cand))
                if not src.dtype(cand).is_floating_point:
                    raise PoolMismatchError(f"tensor {name!r} of model {m!r} has non-float dtype {src.dtype(cand)}")
                if mshape != shape:
                    if (vocab_policy == "truncate" and _vocab_like(name) and len(shape) == len(mshape)
                            and mshape[1:] == shape[1:] and mshape[0] >= shape[0]):
                        plan.rows = shape[0]
                    elif _vocab_like(name) and mshape[1:] == shape[1:]:
                        raise PoolMismatchError(
                            f"vocabulary mismatch in {name!r}: model {m!r} has {mshape[0]} rows, base has {shape[0]} "
                            f"(set vocab_policy=truncate to keep the base's {shape[0]} rows)")
                    else:
                        raise PoolMismatchError(f"shape mismatch in {name!r}: model {m!r} has {list(mshape)}, base has {list(shape)}")
                plan.sources[m] = cand
            if missing and len(missing) == len(models):
                plan.merge = False  # e.g. an MLM head only the base has: nothing to merge, copy it
            elif missing:
                raise PoolMismatchError(f"tensor {name!r} is missing in model {missing[0]!r}")
        plans.append(plan)
    planned = {p.name for p in plans}
    for m, table in lookup.items():
        known = {cand for base_name, cand in table.items() if base_name in planned}
        for cand in sorted(model_names[m] - known):
            if not scope.excludes_explicitly(cand) and scope.selects(cand, models[m].shape(cand), models[m].dtype(cand)):
                raise PoolMismatchError(f"tensor {cand!r} of model {m!r} is missing in the base model")
    if not any(p.merge for p in plans):
        raise PoolMismatchError("no tensor is selected for merging: check scope include/exclude")
    return plans
