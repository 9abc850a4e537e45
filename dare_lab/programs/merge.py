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
from dare_lab.taskpool.base import preflight

_MISSING = object()
_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def typed_setting(cfg: Any, key: str, kind: type, default: Any = _MISSING, allow_none: bool = False) -> Any:
    """The value of the dotted config ``key``, checked to be of ``kind`` (bool, int, float, str, list).

    A string is never a boolean or a number (``output.overwrite="false"`` is an error, not
    ``True``), a boolean is never a number, NaN is never a number; an int is accepted as a float.
    Errors are one line naming the key as written on the command line::

        output.overwrite='false': expected true or false, got a string
    """
    import math

    from omegaconf import ListConfig

    node: Any = cfg
    for part in key.split("."):
        try:
            node = node.get(part) if node is not None and hasattr(node, "get") else None
        except Exception:  # noqa: BLE001
            node = None
        if node is None:
            break
    if node is None:
        if default is not _MISSING and (default is not None or allow_none):
            return default
        if allow_none:
            return None
        raise ValueError(f"{key}=null: expected {_KIND_WORDS.get(kind, kind.__name__)}")
    ok = {bool: isinstance(node, bool),
          int: isinstance(node, int) and not isinstance(node, bool),
          float: isinstance(node, (int, float)) and not isinstance(node, bool) and not (isinstance(node, float) and math.isnan(node)),
          str: isinstance(node, str),
          list: isinstance(node, (list, tuple, ListConfig))}.get(kind, isinstance(node, kind))
    if not ok:
        got = "a string" if isinstance(node, str) else ("NaN" if isinstance(node, float) and math.isnan(node)
                                                        else f"a {type(node).__name__}")
        raise ValueError(f"{key}={node!r}: expected {_KIND_WORDS.get(kind, kind.__name__)}, got {got}")
    return float(node) if kind is float else node


def engine_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The engine section of the config as ``merge_models`` keyword arguments (typed: see :func:`typed_setting`)."""
    e = cfg.engine
    include = typed_setting(cfg, "engine.scope.include", list)
    exclude = typed_setting(cfg, "engine.scope.exclude", list)
    for name, pats in (("include", include), ("exclude", exclude)):
        for p in pats:
            if not isinstance(p, str):
                raise ValueError(f"engine.scope.{name}: every pattern must be a string, got {p!r}")
    scope = Scope(include=tuple(include), exclude=tuple(exclude),
                  linear_only=typed_setting(cfg, "engine.scope.linear_only", bool, default=False))
    threads = typed_setting(cfg, "engine.threads", int)
    if threads < 1:
        raise ValueError(f"engine.threads={threads}: expected an integer >= 1")
    return {"scope": scope, "dtype": typed_setting(cfg, "engine.dtype", str),
            "out_dtype": typed_setting(cfg, "engine.out_dtype", str, allow_none=True), "threads": threads,
            "max_shard_size": e.max_shard_size, "vocab_policy": typed_setting(cfg, "engine.vocab_policy", str)}


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
        return merge_models(pool.base, pool.models, method, out_dir,
                            overwrite=typed_setting(cfg, "output.overwrite", bool, default=False),
                            progress=typed_setting(cfg, "output.progress", bool, default=True), **kwargs)
    if hasattr(method, "merge"):
        return method.merge(pool, out_dir, **kwargs)
    raise TypeError(f"method config built a {type(method).__name__}: expected a MergeMethod or an object with .merge()")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Merge the configured pool with the configured method; evaluate if a taskpool is set.

    Every input is checked before the merge (the method, typed settings, the pool, the
    taskpool's :func:`preflight`). A merged model that is complete stays whatever fails after
    it: the error carries ``dare_lab_kept = [path]`` and ``dare-lab`` prints the path.
    """
    model_dir = typed_setting(cfg, "output.model_dir", str, allow_none=True)
    kwargs_check = engine_kwargs(cfg)  # noqa: F841 - typed before anything heavy
    typed_setting(cfg, "output.overwrite", bool, default=False)
    typed_setting(cfg, "output.progress", bool, default=True)
    if isinstance(cfg.get("method"), DictConfig) and "drop_rate" in cfg.method and cfg.method.drop_rate is None:
        raise ValueError("method.drop_rate=null: expected a number in [0, 1) (null would silently become "
                         "the preset's default)")
    method = instantiate(cfg.method, _convert_="all")
    pool = build_pool(cfg)
    taskpool = build_taskpool(cfg)
    if taskpool is not None:
        preflight(taskpool, pool)
    out_dir = Path(model_dir).expanduser() if model_dir else run_dir / "merged"
    started = time.perf_counter()
    merged = merge_pool(pool, method, out_dir, cfg)
    metrics: dict[str, Any] = {"merge/seconds": round(time.perf_counter() - started, 3)}
    print(f"dare-lab: merged model written to {merged}")
    try:
        if taskpool is not None:
            metrics.update(taskpool.evaluate(merged, pool))
        metrics["method"] = OmegaConf.to_container(cfg.method, resolve=True).get("name", "custom")
    except BaseException as exc:
        exc.dare_lab_kept = [Path(merged)]  # type: ignore[attr-defined]
        raise
    return metrics
