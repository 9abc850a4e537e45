"""The taskpool interface: evaluate a merged model, return flat metrics.

A taskpool is built from ``configs/taskpool/*.yaml`` via ``_target_``. ``evaluate`` receives
the merged model's directory (as written by the engine) and the model pool, so encoder
taskpools can attach each task's own head from its fine-tuned model (heads are never merged).
Metric keys are ``"<task>/<metric>"``; values are floats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dare_lab.engine.pool import ModelPool


@runtime_checkable
class TaskPool(Protocol):
    def evaluate(self, model_dir: Path, pool: ModelPool) -> dict[str, float]:
        """Score the merged model in ``model_dir``; keys ``"<task>/<metric>"``."""
        ...


def plain_config(x: Any) -> Any:
    """An OmegaConf node as plain dicts/lists (resolved); anything else as it is."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return x
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x
