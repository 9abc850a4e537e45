"""The default program: build the pool and method from config, merge, evaluate, report.

config → pool + method → engine streams tensors through ops → merged model → taskpool.
A method built from config is either a per-tensor :class:`MergeMethod` (streamed by the
engine) or any object with ``merge(pool, out_dir, **engine_kwargs) -> Path`` (data-aware
methods such as Fisher and RegMean, which need models and data, not just tensors).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dare_lab.engine import Scope, merge_models
from dare_lab.engine.pool import ModelPool
from dare_lab.ops.method import MergeMethod


def engine_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The engine section of the config as ``merge_models`` keyword arguments."""
    e = cfg.engine
    scope = Scope(include=tuple(e.scope.include), exclude=tuple(e.scope.exclude), linear_only=bool(e.scope.linear_only))
    return {"scope": scope, "dtype": e.dtype, "out_dtype": e.out_dtype, "threads": int(e.threads),
            "max_shard_size": e.max_shard_size, "vocab_policy": e.vocab_policy}


def build_pool(cfg: DictConfig) -> ModelPool:
    pool = instantiate(cfg.modelpool, _convert_="all")
    if not isinstance(pool, ModelPool):
        raise TypeError(f"modelpool config built a {type(pool).__name__}, expected dare_lab.engine.pool.ModelPool")
    return pool.prepare()


def build_taskpool(cfg: DictConfig):
    tp = cfg.get("taskpool")
    if tp is None or "_target_" not in tp:
        return None
    return instantiate(tp, _convert_="all")


def merge_pool(pool: ModelPool, method: Any, out_dir: Path, cfg: DictConfig) -> Path:
    kwargs = engine_kwargs(cfg)
    if isinstance(method, MergeMethod):
        return merge_models(pool.base, pool.models, method, out_dir, overwrite=bool(cfg.output.overwrite),
                            progress=bool(cfg.output.progress), **kwargs)
    if hasattr(method, "merge"):
        return method.merge(pool, out_dir, **kwargs)
    raise TypeError(f"method config built a {type(method).__name__}: expected a MergeMethod or an object with .merge()")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Merge the configured pool with the configured method; evaluate if a taskpool is set."""
    pool = build_pool(cfg)
    method = instantiate(cfg.method, _convert_="all")
    taskpool = build_taskpool(cfg)
    out_dir = Path(cfg.output.model_dir) if cfg.output.get("model_dir") else run_dir / "merged"
    started = time.perf_counter()
    merged = merge_pool(pool, method, out_dir, cfg)
    metrics: dict[str, Any] = {"merge/seconds": round(time.perf_counter() - started, 3)}
    print(f"dare-lab: merged model written to {merged}")
    if taskpool is not None:
        metrics.update(taskpool.evaluate(merged, pool))
    metrics["method"] = OmegaConf.to_container(cfg.method, resolve=True).get("name", "custom")
    return metrics
