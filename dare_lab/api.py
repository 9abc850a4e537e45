"""One call that does what ``dare-lab`` does, for scripts and notebooks.

    >>> import dare_lab
    >>> dare_lab.merge("path/or/hub-id/of/base", {"math": "...", "code": "..."},
    ...                method="dare_ties", drop_rate=0.9, retain_ratio=0.2, out_dir="merged")

Per-tensor ops live in :mod:`dare_lab.ops` (``dare``, ``drop_only``, ``magnitude_prune``,
``task_arithmetic``, ``ties`` …), like peft's merge utilities.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dare_lab.engine import DEFAULT_EXCLUDE, Scope, merge_models
from dare_lab.methods import build_method


def merge(
    base: str | os.PathLike,
    models: Mapping[str, str | os.PathLike],
    method: str = "dare_task_arithmetic",
    out_dir: str | os.PathLike | None = None,
    *,
    include: Sequence[str] = (r".*",),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    linear_only: bool = False,
    dtype: str | torch.dtype = "float32",
    out_dtype: str | torch.dtype | None = None,
    threads: int = 2,
    max_shard_size: int | str = "5GB",
    vocab_policy: str = "error",
    overwrite: bool = False,
    progress: bool = False,
    **method_kwargs: Any,
) -> Path | dict[str, torch.Tensor]:
    """Merge fine-tuned ``models`` (name → HF id or directory) into ``base``.

    ``method`` is a preset name (see :data:`dare_lab.methods.PRESETS`); ``method_kwargs``
    are its knobs (``drop_rate``, ``scaling``, ``retain_ratio``, ``merge_func``, ``seed`` …,
    documented in :mod:`dare_lab.methods`). Returns the output directory, or the merged
    state dict when ``out_dir`` is None.
    """
    built = build_method(name=method, **method_kwargs)
    scope = Scope(include=tuple(include), exclude=tuple(exclude), linear_only=linear_only)
    return merge_models(base, dict(models), built, out_dir, scope=scope, dtype=dtype, out_dtype=out_dtype,
                        threads=threads, max_shard_size=max_shard_size, vocab_policy=vocab_policy,
                        overwrite=overwrite, progress=progress)
