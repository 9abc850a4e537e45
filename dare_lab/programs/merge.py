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


class FineTuned:
    """``method=sft``: no merge — each fine-tuned model is scored as it is, read from its own
    checkpoint (bit-identical to it), the SFT row of a paper table.

    Encoders (a taskpool with ``evaluate_models``): each task scored by its own fine-tuned model
    (``model``: only the tasks whose head model is ``model``). Decoders and lm-eval: the pool
    model ``model``, or every pool model in turn (keys ``<model>/<task>/<metric>``).
    """

    def __init__(self, name: str = "sft", model: str | None = None) -> None:
        self.name, self.model = str(name), (None if model is None else str(model))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model}


def score_finetuned(method: FineTuned, pool: ModelPool, taskpool: Any) -> dict[str, Any]:
    """The metrics of ``method=sft`` (see :class:`FineTuned`)."""
    from dare_lab.engine.sources import resolve_model_dir

    if taskpool is None:
        raise ValueError("method=sft scores the fine-tuned models as they are: choose a taskpool (taskpool=...)")
    if method.model is not None and method.model not in pool.models:
        raise ValueError(f"method.model={method.model}: the model pool has no such model (it has {sorted(pool.models)})")
    metrics: dict[str, Any] = {}
    if hasattr(taskpool, "evaluate_models"):  # encoders: each task by its own model, its own head
        tasks = [t.name for t in taskpool.tasks if method.model is None or t.head_model == method.model]
        if not tasks:
            raise ValueError(f"method.model={method.model}: no task of the taskpool is scored by this model")
        metrics.update(taskpool.evaluate_models(pool, tasks=tasks))
        for extra in getattr(taskpool, "also_splits", ()):
            for k, v in taskpool.with_split(extra).evaluate_models(pool, tasks=tasks).items():
                task, metric = k.split("/", 1)
                metrics[f"{task}/{extra}_{metric}"] = v
    else:
        names = [method.model] if method.model is not None else list(pool.models)
        for m in names:
            res = taskpool.evaluate(resolve_model_dir(pool.models[m]), pool)
            metrics.update(res if len(names) == 1 else {f"{m}/{k}": v for k, v in res.items()})
    if method.model is not None:
        metrics["sft/model"] = method.model
    return metrics


SAVE_CHOICES = ("true", "false", "auto")


def save_setting(cfg: DictConfig) -> bool | str:
    """``output.save``: true, false or auto (a string ``"false"`` is an error, as for every boolean)."""
    node = cfg.get("output", {}).get("save", "auto") if hasattr(cfg, "get") else "auto"
    if isinstance(node, bool) or node is None:
        return "auto" if node is None else node
    if node == "auto":
        return "auto"
    got = "a string" if isinstance(node, str) else f"a {type(node).__name__}"
    raise ValueError(f"output.save={node!r}: expected true, false or auto, got {got}")


def _backend(taskpool: Any) -> tuple[str | None, dict]:
    """(backend name, options) of a generation / lm-eval taskpool; (None, {}) for others."""
    if hasattr(taskpool, "backend_name"):  # lm-eval
        return str(taskpool.backend_name), dict(getattr(taskpool, "backend_opts", {}) or {})
    spec = getattr(taskpool, "backend", None)
    if spec is None or hasattr(spec, "generate"):
        return (None, {}) if spec is None else ("object", {})
    from dare_lab.taskpool.generation.backends import route_backend_spec

    name, opts = route_backend_spec(spec)
    return str(name), dict(opts or {})


def evaluation_route(taskpool: Any) -> str:
    """How a merged model that is not saved is evaluated: ``memory`` (the state dict: encoder
    taskpools; a model object: HF-backend generation and lm-eval) or ``files`` (a backend that
    reads a directory, vLLM: a temporary directory, removed after)."""
    if taskpool is None:
        return "none"
    if hasattr(taskpool, "evaluate_state_dict"):
        return "memory"
    name, _ = _backend(taskpool)
    return "memory" if name == "hf" else "files"


def _is_sweep() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.initialized() and str(HydraConfig.get().mode).endswith("MULTIRUN")
    except Exception:  # noqa: BLE001
        return False


def resolve_save(cfg: DictConfig, taskpool: Any) -> bool:
    """``output.save``: true/false as given; auto: a sweep job (``-m``) whose taskpool evaluates in
    memory saves nothing, every other run saves. ``output.model_dir`` set means save (with
    ``output.save=false`` it is an error)."""
    save = save_setting(cfg)
    model_dir = typed_setting(cfg, "output.model_dir", str, allow_none=True)
    if save is False and model_dir:
        raise ValueError(f"output.model_dir={model_dir} with output.save=false: drop one (a model dir is "
                         "where a saved model goes)")
    if save == "auto":
        return bool(model_dir) or not (_is_sweep() and evaluation_route(taskpool) == "memory")
    return bool(save)


def causal_lm_from_state_dict(pool: ModelPool, state: dict, dtype: str | None = None) -> Any:
    """The base's architecture (its config, from its directory) with the merged ``state`` loaded:
    the in-memory model an HF backend evaluates (tied weights stay tied)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dare_lab.engine.sources import resolve_model_dir

    dt = getattr(torch, str(dtype or "float32").removeprefix("torch."), torch.float32)
    if not isinstance(dt, torch.dtype):
        dt = torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(pool.base)), dtype=dt)
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in result.missing_keys if k not in tied and not k.startswith("lm_head")]
    if result.unexpected_keys or missing:
        raise ValueError(f"the merged state dict does not fit the base's architecture: unexpected "
                         f"{result.unexpected_keys[:3]}, missing {missing[:3]}")
    if torch.cuda.is_available():
        model.to("cuda")
    return model.eval()


def evaluate_in_memory(taskpool: Any, state: dict, pool: ModelPool) -> dict[str, Any]:
    """Score a merged state dict that was never written: encoders as body + each task's own head
    (``evaluate_state_dict``, and its ``also_splits``); HF-backend taskpools on a model object."""
    if hasattr(taskpool, "evaluate_state_dict"):
        label = "in-memory merged model"
        res = dict(taskpool.evaluate_state_dict(state, pool, label=label))
        for extra in getattr(taskpool, "also_splits", ()):
            for k, v in taskpool.with_split(extra).evaluate_state_dict(state, pool, label=label).items():
                task, metric = k.split("/", 1)
                res[f"{task}/{extra}_{metric}"] = v
        return res
    _, opts = _backend(taskpool)
    model = causal_lm_from_state_dict(pool, state, opts.get("dtype") if opts.get("dtype") != "auto" else None)
    try:
        return dict(taskpool.evaluate(model, pool))
    finally:
        del model


EVAL_TMP = ".eval.tmp"  # inside the run dir: a merged model written only for a backend that reads files


def merge_in_memory(pool: ModelPool, method: Any, cfg: DictConfig) -> dict:
    kwargs = engine_kwargs(cfg)
    if isinstance(method, MergeMethod):
        kwargs.pop("max_shard_size", None)
        return merge_models(pool.base, pool.models, method, None,
                            progress=typed_setting(cfg, "output.progress", bool, default=True), **kwargs)
    if hasattr(method, "merge_pool"):
        return method.merge_pool(pool)
    raise TypeError(f"method config built a {type(method).__name__}: it cannot merge in memory; set output.save=true")


def log_metrics_table(metrics: dict[str, Any]) -> None:
    """The run's numeric metrics as one table (``metric``, ``value``) on the active tracker, if any."""
    from dare_lab import tracking

    tracker = tracking.current()
    if tracker is None:
        return
    rows = [{"metric": k, "value": float(v)} for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if rows:
        tracker.log_table("metrics", rows, ["metric", "value"])


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Merge the configured pool with the configured method; evaluate if a taskpool is set.

    Every input is checked before the merge (the method, typed settings, the pool, the
    taskpool's :func:`preflight`). A merged model that is complete stays whatever fails after
    it: the error carries ``dare_lab_kept = [path]`` and ``dare-lab`` prints the path.

    ``output.save`` (true | false | auto, see :func:`resolve_save`): a model that is not saved
    is evaluated in memory, or — for a backend that reads files (vLLM) — from a temporary
    directory ``<run dir>/.eval.tmp`` removed right after; nothing is written under ``merged/``.
    ``method=sft`` (:class:`FineTuned`) merges nothing and scores each fine-tuned model as is.
    """
    import shutil

    model_dir = typed_setting(cfg, "output.model_dir", str, allow_none=True)
    kwargs_check = engine_kwargs(cfg)  # noqa: F841 - typed before anything heavy
    typed_setting(cfg, "output.overwrite", bool, default=False)
    typed_setting(cfg, "output.progress", bool, default=True)
    save_setting(cfg)
    if isinstance(cfg.get("method"), DictConfig) and "drop_rate" in cfg.method and cfg.method.drop_rate is None:
        raise ValueError("method.drop_rate=null: expected a number in [0, 1) (null would silently become "
                         "the preset's default)")
    method = instantiate(cfg.method, _convert_="all")
    pool = build_pool(cfg)
    taskpool = build_taskpool(cfg)
    if taskpool is not None:
        preflight(taskpool, pool)
    method_name = OmegaConf.to_container(cfg.method, resolve=True).get("name", "custom")
    from dare_lab.analysis.darex_q import needs_resolution, resolve_rescale_q

    q_info: dict[str, Any] = {}
    if needs_resolution(method):   # DAREx-q's q chosen on data (the paper's rules), before the merge
        method, q_info = resolve_rescale_q(method, pool, taskpool, scope=engine_kwargs(cfg)["scope"])
    if isinstance(method, FineTuned):
        started = time.perf_counter()
        metrics = score_finetuned(method, pool, taskpool)
        metrics["eval/seconds"] = round(time.perf_counter() - started, 3)
        metrics["method"] = method_name
        log_metrics_table(metrics)
        return metrics
    save = resolve_save(cfg, taskpool)
    if not save:
        route = evaluation_route(taskpool)
        started = time.perf_counter()
        if route == "files":
            tmp = run_dir / EVAL_TMP
            shutil.rmtree(tmp, ignore_errors=True)  # a killed attempt's
            try:
                merged = merge_pool(pool, method, tmp, cfg)
                metrics = {"merge/seconds": round(time.perf_counter() - started, 3)}
                metrics.update(taskpool.evaluate(merged, pool))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            state = merge_in_memory(pool, method, cfg)
            metrics = {"merge/seconds": round(time.perf_counter() - started, 3)}
            if taskpool is not None:
                metrics.update(evaluate_in_memory(taskpool, state, pool))
            del state
        why = "a sweep job whose taskpool evaluates in memory" if save_setting(cfg) == "auto" else "output.save=false"
        print(f"dare-lab: merged model evaluated in memory and not saved ({why}; output.save=true keeps it)")
        metrics["method"] = method_name
        metrics.update(q_info)
        log_metrics_table(metrics)
        return metrics
    out_dir = Path(model_dir).expanduser() if model_dir else run_dir / "merged"
    started = time.perf_counter()
    merged = merge_pool(pool, method, out_dir, cfg)
    metrics: dict[str, Any] = {"merge/seconds": round(time.perf_counter() - started, 3)}
    print(f"dare-lab: merged model written to {merged}")
    try:
        if taskpool is not None:
            metrics.update(taskpool.evaluate(merged, pool))
        metrics["method"] = method_name
        metrics.update(q_info)
        log_metrics_table(metrics)
    except BaseException as exc:
        exc.dare_lab_kept = [Path(merged)]  # type: ignore[attr-defined]
        raise
    return metrics
