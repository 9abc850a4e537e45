"""A model pool: one pre-trained model and any number of fine-tuned (homologous) models.

Models are named by HF hub id or local directory; the pool's keys are the model names that
seed DARE masks and label per-task results.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelPool:
    """``base``: the pre-trained θ_PRE; ``models``: name → fine-tuned θ_SFT (id or path).

    ``prompts`` optionally maps a model name to its prompt template name (decoder track);
    ``extra`` carries anything a taskpool needs (e.g. per-model task names).
    """

    base: str
    models: dict[str, str]
    name: str = "pool"
    prompts: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.models, Mapping) or not self.models:
            raise ValueError(f"model pool {self.name!r} names no fine-tuned models")
        self.models = {str(k): str(v) for k, v in self.models.items()}
        self.base = str(self.base)

    def prepare(self) -> "ModelPool":
        """Hook for pools that must build or fetch their models first (returns the ready pool)."""
        return self
