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

    def preflight(self, pool: ModelPool | None) -> None:
        """Check every input ``evaluate`` will need, cheaply and before the merge: data files
        exist and parse with the right schema, hub datasets are available (offline: cached),
        each task's head model is in the pool and its label count matches the task's.
        Raise ValueError / FileNotFoundError with one line naming the culprit.

        ``pool`` is None when the pool is not built yet (a packaged pool, checked before a
        sweep's first job): check what does not need the models. The default checks nothing;
        ``dare-lab`` calls it for every job of a sweep before job 0 starts, and the merge
        program calls it again (with the built pool) just before merging."""
        return None


def preflight(taskpool: Any, pool: ModelPool | None) -> None:
    """``taskpool.preflight(pool)`` where the taskpool defines it (taskpools need not subclass :class:`TaskPool`)."""
    check = getattr(taskpool, "preflight", None)
    if callable(check):
        check(pool)


def plain_config(x: Any) -> Any:
    """An OmegaConf node as plain dicts/lists (resolved); anything else as it is."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return x
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x
