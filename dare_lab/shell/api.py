"""One call that does what ``dare-lab`` does, for scripts and notebooks.

    >>> import dare_lab
    >>> dare_lab.merge("path/or/hub-id/of/base", {"math": "...", "code": "..."},
    ...                method="dare_ties", drop_rate=0.9, retain_ratio=0.2, out_dir="merged")

Per-tensor ops live in :mod:`dare_lab.ops` (``dare``, ``drop_only``, ``magnitude_prune``,
``task_arithmetic``, ``ties`` …), like peft's merge utilities.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dare_lab.engine import DEFAULT_EXCLUDE, Scope, merge_models
from dare_lab.ops.presets import build_method

ENGINE_KEYS = frozenset(p.name for p in inspect.signature(merge_models).parameters.values()
                        if p.kind is p.KEYWORD_ONLY and p.name != "scope")


def merge(
    base: str | os.PathLike,
    models: Mapping[str, str | os.PathLike],
    method: str = "dare_task_arithmetic",
    out_dir: str | os.PathLike | None = None,
    *,
    include: Sequence[str] = (r".*",),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    linear_only: bool = False,
    **kwargs: Any,
) -> Path | dict[str, torch.Tensor]:
    """Merge fine-tuned ``models`` (name → HF id or directory) into ``base``.

    ``method`` is a preset name (see :data:`dare_lab.ops.presets.PRESETS`). ``kwargs`` are the
    engine's settings, with :func:`dare_lab.engine.merge_models`' defaults (``dtype``,
    ``out_dtype``, ``threads``, ``max_shard_size``, ``vocab_policy``, ``overwrite``,
    ``progress``), and the method's knobs (``drop_rate``, ``scaling``, ``retain_ratio``,
    ``merge_func``, ``seed`` …, documented in :mod:`dare_lab.ops.presets`). Returns the output
    directory, or the merged state dict when ``out_dir`` is None.
    """
    engine = {k: kwargs.pop(k) for k in list(kwargs) if k in ENGINE_KEYS}
    built = build_method(name=method, **kwargs)
    scope = Scope(include=tuple(include), exclude=tuple(exclude), linear_only=linear_only)
    return merge_models(base, dict(models), built, out_dir, scope=scope, **engine)
