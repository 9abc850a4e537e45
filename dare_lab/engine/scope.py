"""Which tensors are sparsified and merged; everything else is copied from the base model."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Task heads are never merged (paper and MergeLM): each task keeps its own head.
DEFAULT_EXCLUDE = (r"(^|\.)(classifier|score)(\.|$)",)
_EMBEDDING = re.compile(r"(embed|wte|wpe|shared)", re.IGNORECASE)


@dataclass(frozen=True)
class Scope:
    """Regex include/exclude on tensor names (``re.search``) and a ``linear_only`` switch.

    A tensor is merged iff it matches an include pattern, no exclude pattern, is floating
    point, and — with ``linear_only`` — is a 2-D ``.weight`` that is not an embedding.
    """

    include: Sequence[str] = (r".*",)
    exclude: Sequence[str] = field(default_factory=lambda: DEFAULT_EXCLUDE)
    linear_only: bool = False

    def __post_init__(self) -> None:
        for pat in (*self.include, *self.exclude):
            try:
                re.compile(pat)
            except re.error as exc:
                raise ValueError(f"invalid scope regex {pat!r}: {exc}") from None

    def selects(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> bool:
        if not dtype.is_floating_point:
            return False
        if not any(re.search(p, name) for p in self.include):
            return False
        if any(re.search(p, name) for p in self.exclude):
            return False
        if self.linear_only:
            return len(shape) == 2 and name.endswith(".weight") and not _EMBEDDING.search(name)
        return True

    def excludes_explicitly(self, name: str) -> bool:
        """True when an exclude pattern names this tensor (e.g. a task head)."""
        return any(re.search(p, name) for p in self.exclude)
