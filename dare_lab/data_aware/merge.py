"""Fisher merging and RegMean over a model pool, with or without DARE first.

For each fine-tuned model k, one at a time:
  1. θ'_k = θ_PRE + DARE(θ_k − θ_PRE, p) when ``drop_rate`` > 0 (the same per-tensor seeded
     masks as the streamed engine; heads are never sparsified nor merged);
  2. statistics of θ'_k on ``num_examples`` examples of its own task (the task whose ``model``
     — default its name — is k), read from the task's ``split`` (default ``train``):
     diagonal Fisher, or the Gram matrix of every linear layer's inputs;
then the formulas of :mod:`dare_lab.ops.data_aware` combine the models tensor by tensor.
The merged model keeps the base's task head (each task is evaluated with its own head).

Before any statistic is computed the task ↔ model mapping is checked (one task per pool model:
two tasks naming one model, a task naming a model the pool lacks, a pool model without a task,
or a task without data are one-line errors) and every task's data is loaded. The statistics
and solves run at ``threads`` torch threads (default 1) whatever the caller's setting, so the
reduction order — hence the result, bit for bit — does not depend on the thread count.
``report`` (after a merge) holds the N used per model, each RegMean layer's rank and the Fisher
entries zeroed as round-off; ``merge`` writes it to ``dare_lab_merge.json``.

Built from ``configs/method/{fisher,regmean,dare_fisher,dare_regmean}.yaml``; the merge
program calls ``merge(pool, out_dir, **engine_kwargs)``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dare_lab.data_aware.statistics import (
    FISHER_ESTIMATORS,
    GRAM_NORMALIZE,
    SHORT_DATA,
    examples_used,
    fisher_diagonal,
    gram_matrices,
)
from dare_lab.engine.scope import DEFAULT_EXCLUDE
from dare_lab.engine.pool import ModelPool
from dare_lab.ops.data_aware import average_params, fisher_merge, regmean_merge_rank, zero_fisher_floor
from dare_lab.ops.method import MergeMethod, Merger, Sparsifier

KINDS = ("fisher", "regmean")
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_WEIGHT_FILES = re.compile(r"(\.safetensors|\.bin|\.safetensors\.index\.json|\.bin\.index\.json|\.pt|\.pth)$")


@contextlib.contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run the block at ``n`` torch intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DataAwareMerge:
    """Fisher merging (``kind="fisher"``) or RegMean (``kind="regmean"``), optionally after DARE.

    fisher:  θ* = Σ_k λ_k (F_k + ε) θ_k / Σ_k λ_k (F_k + ε); ``scaling`` = λ (one value or one
             per model, pool order); ``normalize_fisher`` divides each F_k by its global L2 norm;
             entries F_k ≤ ``zero_fisher_rtol`` · max F_k are round-off of zero gradients and set
             to 0 (ε = 0: entries zero in every model take the λ-weighted mean).
    regmean: W* = (Σ_k W_k G̃_k)(Σ_k G̃_k)⁺ for linear weights, G̃ = diag G + α·offdiag G,
             G_k = Σ XᵀX (``normalize="sum"``, the paper's) or Σ XᵀX / N_k (``"mean"``);
             eigenvalues ≤ ``rcond`` · max count as zero (null: n·eps_float64); every other
             parameter is averaged.
    drop_rate: DARE p applied to each model's delta first (0: plain Fisher/RegMean).
    on_short_data: a task with fewer than ``num_examples`` examples: ``warn`` (use them all) or ``error``.
    threads: torch threads for the statistics and solves (fixed, so results do not depend on the caller's).
    compute_dtype: dtype of the statistics' forward/backward passes (float32; float64 ≈ 2× the time,
             for layers so ill-conditioned that float32 activations limit W, e.g. a pooler at α = 1).
    """

    def __init__(self, kind: str, tasks: Sequence[Any] | Mapping[str, Any] | None = None, name: str | None = None,
                 num_examples: int = 256, scaling: float | Sequence[float] = 1.0, alpha: float = 0.9,
                 min_fisher: float = 1e-6, normalize_fisher: bool = False, estimator: str = "exact",
                 drop_rate: float = 0.0, seed: int = 0, split: str = "train", batch_size: int = 16,
                 max_length: int | None = None, device: str = "cpu", exclude: Sequence[str] = DEFAULT_EXCLUDE,
                 progress: bool = False, normalize: str = "sum", on_short_data: str = "warn",
                 zero_fisher_rtol: float = 1e-16, rcond: float | None = None, threads: int = 1,
                 compute_dtype: str = "float32"):
        if kind not in KINDS:
            raise ValueError(f"unknown data-aware merge {kind!r}; choose one of {KINDS}")
        if int(num_examples) < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"RegMean alpha={alpha} is outside [0, 1]")
        if estimator not in FISHER_ESTIMATORS:
            raise ValueError(f"unknown Fisher estimator {estimator!r}; choose one of {FISHER_ESTIMATORS}")
        if normalize not in GRAM_NORMALIZE:
            raise ValueError(f"unknown RegMean normalize={normalize!r}; choose one of {GRAM_NORMALIZE}")
        if on_short_data not in SHORT_DATA:
            raise ValueError(f"unknown on_short_data={on_short_data!r}; choose one of {SHORT_DATA}")
        if not float(zero_fisher_rtol) >= 0:
            raise ValueError(f"zero_fisher_rtol must be >= 0, got {zero_fisher_rtol}")
        if rcond is not None and not float(rcond) >= 0:
            raise ValueError(f"rcond must be >= 0 or null, got {rcond}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown compute_dtype={compute_dtype!r}; choose one of {sorted(COMPUTE_DTYPES)}")
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.kind = kind
        self.name = name or (f"dare_{kind}" if drop_rate else kind)
        self.sparsifier = Sparsifier("dare", float(drop_rate)) if drop_rate else Sparsifier()
        self.tasks = tasks
        self.num_examples = int(num_examples)
        self.scaling = scaling
        self.alpha = float(alpha)
        self.min_fisher = float(min_fisher)
        self.normalize_fisher = bool(normalize_fisher)
        self.estimator = estimator
        self.drop_rate = float(drop_rate)
        self.seed = int(seed)
        self.split = split
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.device = device
        self.exclude = tuple(exclude)
        self.progress = progress
        self.normalize = normalize
        self.on_short_data = on_short_data
        self.zero_fisher_rtol = float(zero_fisher_rtol)
        self.rcond = None if rcond is None else float(rcond)
        self.threads = int(threads)
        self.compute_dtype = compute_dtype
        self.report: dict[str, Any] = {}

    # ------------------------------------------------------------------ pieces
    def is_head(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.exclude)

    def sparsify(self, base: Mapping[str, torch.Tensor], model: str, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """θ' = θ_PRE + DARE(θ − θ_PRE, p) per tensor (heads and non-float tensors untouched)."""
        if not self.drop_rate:
            return dict(sd)
        method = MergeMethod(self.name, self.sparsifier, Merger("task_arithmetic", 1.0), self.seed)
        out = {}
        for k, v in sd.items():
            if self.is_head(k) or not v.is_floating_point() or k not in base or base[k].shape != v.shape:
                out[k] = v
            else:
                out[k] = method.merge_tensor(k, base[k].float(), {model: v.float()}).to(v.dtype)
        return out

    def _scalings(self, names: Sequence[str]) -> list[float]:
        s = self.scaling
        if isinstance(s, (int, float)):
            return [float(s)] * len(names)
        s = list(s)
        if len(s) != len(names):
            raise ValueError(f"{self.name}: {len(s)} scaling coefficients for {len(names)} models {list(names)}")
        return [float(x) for x in s]

    def combine(self, base: Mapping[str, torch.Tensor], models: Mapping[str, Mapping[str, torch.Tensor]],
                stats: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The merged state dict from (already sparsified) models and their statistics."""
        names = list(models)
        missing = [m for m in names if m not in stats]
        if missing:
            raise ValueError(f"{self.name}: no statistics for model {missing[0]!r}")
        stats = dict(stats)
        report = {"ranks": {}, "fisher_zeroed": {}}
        if self.kind == "fisher":
            for m in names:
                stats[m], report["fisher_zeroed"][m] = zero_fisher_floor(stats[m], self.zero_fisher_rtol)
        if self.kind == "fisher" and self.normalize_fisher:
            for m in names:
                norm = torch.sqrt(sum(f.double().pow(2).sum() for f in stats[m].values())).float()
                stats[m] = {k: f / norm for k, f in stats[m].items()} if norm > 0 else stats[m]
        lam = self._scalings(names)
        out: dict[str, torch.Tensor] = {}
        for k, b in base.items():
            if self.is_head(k) or not b.is_floating_point():
                out[k] = b
                continue
            for m in names:
                if k not in models[m]:
                    raise ValueError(f"{self.name}: tensor {k!r} is missing in model {m!r}")
                if models[m][k].shape != b.shape:
                    raise ValueError(f"{self.name}: tensor {k!r} of model {m!r} has shape {tuple(models[m][k].shape)}, "
                                     f"base has {tuple(b.shape)}")
            thetas = [models[m][k].float() for m in names]
            if self.kind == "fisher" and all(k in stats[m] for m in names):
                merged = fisher_merge(thetas, [stats[m][k] for m in names], lam, self.min_fisher)
            elif self.kind == "regmean" and all(k in stats[m] for m in names):
                merged, rank = regmean_merge_rank(thetas, [stats[m][k] for m in names], self.alpha, self.rcond)
                report["ranks"][k] = {"rank": rank, "dim": int(b.shape[1])}
            else:
                merged = average_params(thetas)
            out[k] = merged.to(b.dtype)
        if self.kind == "regmean":
            report.pop("fisher_zeroed")
            deficient = {k: r for k, r in report["ranks"].items() if r["rank"] < r["dim"]}
            if deficient:
                import warnings

                k, r = next(iter(deficient.items()))
                warnings.warn(f"{self.name}: {len(deficient)} layer(s) with a singular Gram sum (e.g. {k}: rank "
                              f"{r['rank']} of {r['dim']}); their weights are the minimum-norm solution", stacklevel=2)
        else:
            report.pop("ranks")
        self.report.update(report)
        return out

    # ------------------------------------------------------------------ driver
    def _task_of(self, pool: ModelPool | None = None) -> dict[str, Any]:
        from dare_lab.taskpool.classification import TaskSpec

        tasks = self.tasks
        if tasks is None and pool is not None:
            tasks = pool.extra.get("tasks")  # pools that know their tasks (the encoder demo) carry them
        if tasks is None:
            raise ValueError(f"{self.name} needs data: set the method's `tasks` (one per pool model)")
        if isinstance(tasks, Mapping) or (hasattr(tasks, "items") and not isinstance(tasks, (list, tuple))):
            specs = [TaskSpec.from_any(v, name=str(k)) for k, v in tasks.items()]
        else:
            from dare_lab.taskpool.classification import GLUE_TASKS, glue_task

            specs = [glue_task(t) if isinstance(t, str) and t in GLUE_TASKS else TaskSpec.from_any(t) for t in tasks]
        task_of: dict[str, Any] = {}
        for s in specs:
            if s.head_model in task_of:
                raise ValueError(f"{self.name}: tasks {task_of[s.head_model].name!r} and {s.name!r} both name model "
                                 f"{s.head_model!r}; give each pool model exactly one task (set the task's `model`)")
            task_of[s.head_model] = s
        if pool is not None:
            unknown = [m for m in task_of if m not in pool.models]
            if unknown:
                raise ValueError(f"{self.name}: task {task_of[unknown[0]].name!r} names model {unknown[0]!r}, which is "
                                 f"not in the pool {sorted(pool.models)}")
            missing = [m for m in pool.models if m not in task_of]
            if missing:
                raise ValueError(f"{self.name}: no task names pool model {missing[0]!r} (tasks cover {sorted(task_of)}); "
                                 f"set the task's `model`")
        return task_of

    def task_data(self, pool: ModelPool) -> tuple[dict[str, Any], dict[str, Any]]:
        """(task per pool model, its examples), checked before any statistic: one-line errors."""
        from dare_lab.taskpool.classification import load_split

        task_of = self._task_of(pool)
        data = {}
        for m in pool.models:
            t = task_of[m]
            try:
                ex = load_split(t, self.split)
            except (ValueError, FileNotFoundError, OSError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ValueError(f"{self.name}: task {t.name!r} (model {m!r}) has no usable {self.split!r} data: "
                                 f"{first}") from None
            if len(ex) == 0:
                raise ValueError(f"{self.name}: task {t.name!r} (model {m!r}) has no {self.split!r} examples")
            data[m] = ex
        return task_of, data

    def statistics(self, model_dir: str | Path, sd: Mapping[str, torch.Tensor], task, examples=None,
                   num_examples: int | None = None) -> dict[str, torch.Tensor]:
        """Fisher or Gram statistics of the model in ``model_dir`` with weights ``sd`` on ``task``."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dare_lab.taskpool.classification import load_split

        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
        model.load_state_dict({k: v for k, v in sd.items() if k in model.state_dict()}, strict=False)
        model = model.to(COMPUTE_DTYPES[self.compute_dtype])
        tok = AutoTokenizer.from_pretrained(model_dir)
        if examples is None:
            examples = load_split(task, self.split)
        n = num_examples or examples_used(self.num_examples, examples, self.on_short_data, f"{self.name}: task {task.name!r}")
        max_length = self.max_length or task.max_length
        if self.kind == "fisher":
            return fisher_diagonal(model, tok, examples, n, max_length, task.regression,
                                   self.estimator, self.exclude, self.device, self.progress)
        return gram_matrices(model, tok, examples, n, max_length, self.batch_size, self.exclude,
                             self.device, self.progress, normalize=self.normalize)

    def merge_pool(self, pool: ModelPool) -> dict[str, torch.Tensor]:
        """In-memory merge of ``pool``: statistics one model at a time, then :meth:`combine`."""
        from dare_lab.engine.sources import resolve_model_dir
        from dare_lab.taskpool.classification import read_state_dict

        task_of, data = self.task_data(pool)
        used = {m: examples_used(self.num_examples, data[m], self.on_short_data,
                                 f"{self.name}: task {task_of[m].name!r} (model {m!r})") for m in pool.models}
        self.report = {"num_examples_used": used, "tasks": {m: t.name for m, t in task_of.items()},
                       "threads": self.threads}
        base = read_state_dict(pool.base)
        models, stats = {}, {}
        with fixed_threads(self.threads):
            for m, ref in pool.models.items():
                path = resolve_model_dir(ref)
                sd = self.sparsify(base, m, read_state_dict(path))
                stats[m] = self.statistics(path, sd, task_of[m], data[m], used[m])
                models[m] = sd
            return self.combine(base, models, stats)

    def merge(self, pool: ModelPool, out_dir: str | Path, *, overwrite: bool = False, max_shard_size: int | str = "5GB",
              **_engine: Any) -> Path:
        """Merge ``pool`` and write an HF directory atomically (config + tokenizer from the base)."""
        from dare_lab.engine import AtomicDir, ShardedSafetensorsWriter
        from dare_lab.engine.merge import MERGE_MARKER
        from dare_lab.engine.sources import resolve_model_dir

        base_dir = resolve_model_dir(pool.base)
        inputs = {"base model": base_dir, **{f"model {m!r}": resolve_model_dir(ref) for m, ref in pool.models.items()}}
        # checked before the statistics: replaces only a previous dare_lab output, never an input
        atomic = AtomicDir(out_dir, overwrite=overwrite, marker=MERGE_MARKER, inputs=inputs)
        merged = self.merge_pool(pool)
        with atomic as tmp:
            writer = ShardedSafetensorsWriter(tmp, [(k, tuple(v.shape), v.dtype) for k, v in merged.items()], max_shard_size)
            for k, v in merged.items():
                writer.write(k, v)
            writer.finish()
            for f in base_dir.iterdir():
                if f.is_file() and not _WEIGHT_FILES.search(f.name) and f.name not in ("README.md", "dare_lab_merge.json"):
                    shutil.copy2(f, tmp / f.name)
            meta = {"method": self.describe(), "base": str(pool.base), "models": dict(pool.models),
                    "statistics": self.report}
            meta["files"] = sorted({f.name for f in tmp.iterdir()} | {MERGE_MARKER})
            (tmp / MERGE_MARKER).write_text(json.dumps(meta, indent=2, default=str))
            return atomic.commit()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "drop_rate": self.drop_rate, "seed": self.seed,
                "num_examples": self.num_examples, "scaling": self.scaling, "alpha": self.alpha,
                "min_fisher": self.min_fisher, "normalize_fisher": self.normalize_fisher, "estimator": self.estimator,
                "split": self.split, "normalize": self.normalize, "on_short_data": self.on_short_data,
                "zero_fisher_rtol": self.zero_fisher_rtol, "rcond": self.rcond, "threads": self.threads,
                "compute_dtype": self.compute_dtype}


def fisher(**kwargs: Any) -> DataAwareMerge:
    return DataAwareMerge("fisher", **kwargs)


def regmean(**kwargs: Any) -> DataAwareMerge:
    return DataAwareMerge("regmean", **kwargs)
