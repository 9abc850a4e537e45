"""Encoder classification/regression taskpools: a generic CSV/JSONL one and GLUE.

Evaluation follows the paper (and MergeLM): task heads are never merged. For each task the
pool's fine-tuned model for that task supplies the head (``classifier.*`` / ``score.*``) and
the config (number of labels); every other tensor comes from the merged model being scored.

Splits (paper's GLUE recipe): ``test`` is the dataset's original validation/dev split;
``train``/``validation`` are a fixed-seed 90/10 division of the original training split
(:func:`train_val_split`). A task may also name its own files per split.

    taskpool = ClassificationTaskPool(tasks=[{"name": "tweets", "files": {"test": "t.csv"},
                                              "labels": ["negative", "neutral", "positive"]}])
    taskpool.evaluate(merged_dir, pool)   # {"tweets/accuracy": 0.71}
"""

from __future__ import annotations

import csv
import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dare_lab.engine.pool import ModelPool
from dare_lab.taskpool.metrics import GLUE_METRICS, check_metrics, compute_metrics

HEAD_PREFIXES = ("classifier.", "score.")
SPLITS = ("train", "validation", "test")
VAL_FRACTION = 0.1
SPLIT_SEED = 42


def is_head_key(name: str) -> bool:
    """Task-head tensors (never merged): ``classifier.*`` and ``score.*``."""
    return name.startswith(HEAD_PREFIXES)


def train_val_split(n: int, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-seed division of ``range(n)`` into (train, validation) index arrays (sorted).

    validation gets ``round(val_fraction · n)`` rows (at least 1 when n > 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is outside (0, 1)")
    perm = np.random.RandomState(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n))) if n > 1 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ----------------------------------------------------------------------------- data


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None
    labels: list  # int class ids or float scores

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: Sequence[int]) -> "Examples":
        return Examples([self.texts[i] for i in idx], None if self.pairs is None else [self.pairs[i] for i in idx],
                        [self.labels[i] for i in idx])


@dataclass
class TaskSpec:
    """One task: where its data lives, its columns, labels, metrics and which model's head scores it.

    Data comes from ``files`` (split → local .csv/.tsv/.jsonl/.json path) or from a hub
    ``dataset`` (+ ``subset``) whose split names are mapped by ``source_splits``
    (default ``{"train": "train", "test": "validation"}``). A missing ``validation`` split is
    the fixed-seed 10% of ``train``; when ``validation`` is derived, ``train`` is the other 90%.
    ``labels``: ordered class names when the label column holds strings (id = position).
    """

    name: str
    files: dict[str, str] = field(default_factory=dict)
    dataset: str | None = None
    subset: str | None = None
    source_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "validation"})
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None
    regression: bool = False
    metrics: tuple[str, ...] = ("accuracy",)
    model: str | None = None
    max_length: int = 128
    max_examples: int | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"task name {self.name!r} must be non-empty and contain no '/'")
        self.files = {str(k): str(v) for k, v in dict(self.files or {}).items()}
        for k in self.files:
            if k not in SPLITS:
                raise ValueError(f"task {self.name!r}: unknown split {k!r} in files; use {SPLITS}")
        if not self.files and not self.dataset:
            raise ValueError(f"task {self.name!r} names neither local files nor a hub dataset")
        self.source_splits = dict(self.source_splits or {})
        self.metrics = check_metrics(self.metrics)
        self.labels = None if self.labels is None else [str(x) for x in self.labels]

    @property
    def head_model(self) -> str:
        return self.model or self.name

    @property
    def num_labels(self) -> int | None:
        return 1 if self.regression else (len(self.labels) if self.labels else None)

    @classmethod
    def from_any(cls, obj: Any, name: str | None = None) -> "TaskSpec":
        if isinstance(obj, TaskSpec):
            return obj
        if not isinstance(obj, Mapping):
            try:
                from omegaconf import OmegaConf

                obj = OmegaConf.to_container(obj, resolve=True)
            except Exception:  # noqa: BLE001
                raise ValueError(f"task spec must be a mapping, got {type(obj).__name__}") from None
        d = dict(obj)
        if name is not None:
            d.setdefault("name", name)
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"task {d.get('name')!r}: unknown option(s) {bad}; known: {sorted(known)}")
        if "metrics" in d:
            d["metrics"] = tuple([d["metrics"]] if isinstance(d["metrics"], str) else d["metrics"])
        return cls(**d)


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"data file does not exist: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".json"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"data file {path} is not UTF-8 text") from None
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: row {i} is a JSON {_json_kind(row)}, expected an object "
                                     f"of columns (a list of {{\"text\": ..., \"label\": ...}} records)")
            return rows
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{i}: not valid JSON") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{i}: a JSON {_json_kind(row)}, expected an object of columns "
                                     f"(one {{\"text\": ..., \"label\": ...}} record per line)")
                rows.append(row)
        return rows
    raise ValueError(f"unsupported data file type {suffix!r} for {path}; use .csv, .tsv, .jsonl or .json")


def _json_kind(x: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(x), type(x).__name__)


def _load_hub_rows(spec: TaskSpec, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.dataset, spec.subset, split=split)
    except Exception as exc:  # noqa: BLE001
        raise FileNotFoundError(f"task {spec.name!r}: cannot load hub dataset {spec.dataset!r} "
                                f"(subset {spec.subset!r}, split {split!r}): {type(exc).__name__}: {str(exc)[:200]}") from None
    return ds.to_list()


def _rows_to_examples(spec: TaskSpec, rows: list[dict], where: str) -> Examples:
    if not rows:
        raise ValueError(f"task {spec.name!r}: {where} holds no rows")
    cols = [spec.text_column, spec.label_column] + ([spec.text_pair_column] if spec.text_pair_column else [])
    for c in cols:
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"task {spec.name!r}: row {i} of {where} is not a record of columns")
            if c not in row:
                first = "" if i == 0 else f" (row {i})"
                raise ValueError(f"task {spec.name!r}: column {c!r} not found in {where}{first}; "
                                 f"columns are {sorted(map(str, row))}")
    texts = [str(r[spec.text_column]) for r in rows]
    pairs = [str(r[spec.text_pair_column]) for r in rows] if spec.text_pair_column else None
    raw = [r[spec.label_column] for r in rows]
    if spec.regression:
        try:
            labels = [float(x) for x in raw]
        except (TypeError, ValueError):
            raise ValueError(f"task {spec.name!r}: regression label column {spec.label_column!r} in {where} is not numeric") from None
    elif spec.labels:
        index = {name: i for i, name in enumerate(spec.labels)}
        labels = []
        for x in raw:
            key = str(x)
            if key in index:
                labels.append(index[key])
            elif isinstance(x, (int, np.integer)) or key.lstrip("-").isdigit():
                labels.append(int(key))
            else:
                raise ValueError(f"task {spec.name!r}: label {x!r} in {where} is not one of {spec.labels}")
        bad = [y for y in labels if not 0 <= y < len(spec.labels)]
        if bad:
            raise ValueError(f"task {spec.name!r}: label id {bad[0]} in {where} is outside 0..{len(spec.labels) - 1}")
    else:
        try:
            labels = [int(x) for x in raw]
        except (TypeError, ValueError):
            raise ValueError(f"task {spec.name!r}: labels in {where} are not integers; give the class names as `labels`") from None
    return Examples(texts, pairs, labels)


def load_split(spec: TaskSpec, split: str, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED) -> Examples:
    """Rows of one split (``train`` / ``validation`` / ``test``) as :class:`Examples`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")

    def source(name: str) -> Examples | None:
        if name in spec.files:
            path = Path(spec.files[name]).expanduser()
            return _rows_to_examples(spec, _read_rows(path), str(path))
        if spec.dataset and name in spec.source_splits:
            hub_split = spec.source_splits[name]
            return _rows_to_examples(spec, _load_hub_rows(spec, hub_split), f"{spec.dataset}[{hub_split}]")
        return None

    has_val = "validation" in spec.files or (spec.dataset is not None and "validation" in spec.source_splits)
    if split == "test" or has_val:
        ex = source(split)
    else:  # train / validation derived from the training split
        full = source("train")
        if full is None:
            raise ValueError(f"task {spec.name!r} has no train split to derive {split!r} from")
        tr, va = train_val_split(len(full), val_fraction, seed)
        ex = full.take(tr if split == "train" else va)
    if ex is None:
        raise ValueError(f"task {spec.name!r} has no {split!r} split (files: {sorted(spec.files)}, hub: {spec.dataset})")
    if spec.max_examples is not None and split != "train" and len(ex) > spec.max_examples:
        ex = ex.take(range(spec.max_examples))
    return ex


# ----------------------------------------------------------------------------- models


def read_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (safetensors, sharded or not, or .bin)."""
    from dare_lab.engine.sources import CheckpointReader

    reader = CheckpointReader(model_dir)
    return {n: reader.get(n) for n in reader.names()}


def load_body_into(model: torch.nn.Module, body: Mapping[str, torch.Tensor], label: str = "merged model") -> None:
    """Copy every non-head tensor of ``body`` into ``model`` (its head is left untouched).

    Keys without the model's base prefix (a bare ``BertModel`` checkpoint) are mapped onto it.
    Raises ValueError naming the first missing or mis-shaped tensor.
    """
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    mapped: dict[str, torch.Tensor] = {}
    for k, v in body.items():
        if is_head_key(k):
            continue
        key = k if k in own or not prefix else f"{prefix}.{k}"
        if key not in own:
            if key.endswith(("position_ids", "token_type_ids")):  # buffers some versions save
                continue
            raise ValueError(f"{label}: tensor {k!r} has no counterpart in the task model ({type(model).__name__})")
        if tuple(own[key].shape) != tuple(v.shape):
            raise ValueError(f"{label}: tensor {k!r} has shape {tuple(v.shape)}, the task model expects {tuple(own[key].shape)}")
        mapped[key] = v
    missing = [k for k in own if not is_head_key(k) and k not in mapped and not k.endswith(("position_ids", "token_type_ids"))]
    if missing:
        raise ValueError(f"{label}: body tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v.to(own[k].dtype))


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.inference_mode()
def predict(model: torch.nn.Module, encodings: list[dict[str, torch.Tensor]], regression: bool, device: torch.device) -> np.ndarray:
    """Predictions for pre-tokenized batches: argmax class id, or the scalar output for regression."""
    model.eval()
    out = []
    for batch in encodings:
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        out.append(logits[:, 0].float().cpu() if regression else logits.argmax(-1).cpu())
    return torch.cat(out).numpy()


def encode_batches(tokenizer, ex: Examples, max_length: int, batch_size: int) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    """Tokenize once, sort by length (less padding), pad per batch. Returns (batches, order)."""
    enc = tokenizer(ex.texts, ex.pairs, truncation=True, max_length=max_length) if ex.pairs is not None else \
        tokenizer(ex.texts, truncation=True, max_length=max_length)
    order = np.argsort([len(x) for x in enc["input_ids"]], kind="stable")
    batches = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        feats = [{k: enc[k][i] for k in enc.keys()} for i in idx]
        batches.append(dict(tokenizer.pad(feats, return_tensors="pt")))
    return batches, order


def head_labels(ref: str) -> int:
    """The label count of a classifier checkpoint, from its ``config.json`` (no weights loaded)."""
    from dare_lab.engine.sources import resolve_model_dir

    cfg_file = resolve_model_dir(ref) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model {ref!r} has no config.json (needed for its task head)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"model {ref!r}: config.json is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"model {ref!r}: config.json holds a JSON {_json_kind(cfg)}, expected an object")
    n = cfg.get("num_labels")
    if n is None and isinstance(cfg.get("id2label"), dict):
        n = len(cfg["id2label"])
    if n is None:
        n = 2  # transformers' default head
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"model {ref!r}: config.json num_labels={n!r} is not a positive integer")
    return n


# ----------------------------------------------------------------------------- taskpools


# Shared by every taskpool of one process: a Hydra sweep's jobs run in one process (basic
# launcher) and each builds its own taskpool; without this each job re-read, re-tokenised and
# re-loaded the same tasks' data and head models. Keys carry the files' (size, mtime), so a
# changed file is read again; head models are few (least recently used dropped beyond the cap).
_SHARED_DATA: dict[tuple, Any] = {}
_SHARED_MODELS: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()
MAX_SHARED_MODELS = 8


def _stat_key(paths: Sequence[str | Path]) -> tuple:
    """(path, size, mtime_ns) of each file (or of each file directly in a directory)."""
    out = []
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        for f in files:
            try:
                st = f.stat()
                out.append((str(f), st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((str(f), None, None))
    return tuple(out)


def _task_key(task: "TaskSpec") -> tuple:
    return repr(task), _stat_key([v for v in (task.files or {}).values()])


def clear_shared_cache() -> None:
    """Forget the data and head models shared across this process's taskpools."""
    _SHARED_DATA.clear()
    _SHARED_MODELS.clear()


class ClassificationTaskPool:
    """Scores a (merged) encoder on several classification/regression tasks.

    tasks: list of task specs (mappings or :class:`TaskSpec`), or a mapping name → spec.
    split: which split to score (``test`` by default; ``validation`` for model selection).
    Each task's head and config come from ``pool.models[task.model or task.name]``.
    """

    def __init__(self, tasks: Sequence[Any] | Mapping[str, Any], split: str = "test", batch_size: int = 64,
                 device: str = "cpu", max_examples: int | None = None, progress: bool = False,
                 also_splits: Sequence[str] = ()):
        if isinstance(tasks, Mapping) or hasattr(tasks, "items") and not isinstance(tasks, (list, tuple)):
            specs = [TaskSpec.from_any(v, name=str(k)) for k, v in tasks.items()]
        else:
            specs = [TaskSpec.from_any(t) for t in tasks]
        if not specs:
            raise ValueError("classification taskpool has no tasks")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names in {names}")
        if max_examples is not None:
            for s in specs:
                s.max_examples = max_examples if s.max_examples is None else min(s.max_examples, max_examples)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for extra in also_splits:
            if extra not in SPLITS or extra == split:
                raise ValueError(f"also_splits: {extra!r} must be one of {SPLITS} other than split={split!r}")
        self.tasks = specs
        self.split = split
        self.also_splits = tuple(also_splits)
        self.batch_size = int(batch_size)
        self.device = _device(device)
        self.progress = progress
        self._examples: dict[str, Examples] = {}
        self._encoded: dict[tuple, tuple[list, np.ndarray]] = {}
        self._task_models: dict[tuple[str, str], torch.nn.Module] = {}
        self._other: dict[str, ClassificationTaskPool] = {}

    # -- data
    def examples(self, task: TaskSpec) -> Examples:
        if task.name not in self._examples:
            key = ("examples", _task_key(task), self.split)
            if key not in _SHARED_DATA:
                _SHARED_DATA[key] = load_split(task, self.split)
            self._examples[task.name] = _SHARED_DATA[key]
        return self._examples[task.name]

    def _encoded_for(self, task: TaskSpec, head_dir: str) -> tuple[list, np.ndarray]:
        from transformers import AutoTokenizer

        key = (task.name, self.split, str(head_dir), task.max_length, self.batch_size)
        if key not in self._encoded:
            shared = ("encoded", _task_key(task), self.split, _stat_key([head_dir]), task.max_length, self.batch_size)
            if shared not in _SHARED_DATA:
                tok = AutoTokenizer.from_pretrained(head_dir)
                _SHARED_DATA[shared] = encode_batches(tok, self.examples(task), task.max_length, self.batch_size)
            self._encoded[key] = _SHARED_DATA[shared]
        return self._encoded[key]

    def task_model(self, task: TaskSpec, pool: ModelPool) -> tuple[torch.nn.Module, str]:
        """The fine-tuned model that owns ``task``'s head (loaded once, cached)."""
        from transformers import AutoModelForSequenceClassification

        if task.head_model not in pool.models:
            raise ValueError(f"task {task.name!r}: model pool has no model {task.head_model!r} to take its head from "
                             f"(pool models: {sorted(pool.models)}); set the task's `model`")
        ref = pool.models[task.head_model]
        key = (task.name, ref)
        if key not in self._task_models:
            from dare_lab.engine.sources import resolve_model_dir

            path = str(resolve_model_dir(ref))
            shared = (path, _stat_key([path]), str(self.device))
            model = _SHARED_MODELS.pop(shared, None)
            if model is None:
                model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
                model = model.to(self.device).eval()
                model._dare_lab_path = path  # type: ignore[attr-defined]
            _SHARED_MODELS[shared] = model       # most recently used last
            while len(_SHARED_MODELS) > MAX_SHARED_MODELS:
                _SHARED_MODELS.popitem(last=False)
            n = model.config.num_labels
            if task.num_labels is not None and n != task.num_labels:
                raise ValueError(f"task {task.name!r} has {task.num_labels} labels but model {ref!r} has a {n}-way head")
            self._task_models[key] = model
        model = self._task_models[key]
        return model, model._dare_lab_path  # type: ignore[attr-defined]

    # -- checks before the merge
    def preflight(self, pool: ModelPool | None) -> None:
        """Load and check every split :meth:`evaluate` will score (files exist and parse, the
        columns and labels match the spec, hub datasets are available offline) and, with a pool,
        that each task's head model is in it and its label count fits the task. Raises
        ValueError / FileNotFoundError naming the task. Loaded rows are kept for ``evaluate``."""
        for task in self.tasks:
            for split in (self.split, *self.also_splits):
                ex = self.examples(task) if split == self.split else self.with_split(split).examples(task)
                if pool is not None:
                    self._check_head(task, pool, ex, split)

    def _check_head(self, task: TaskSpec, pool: ModelPool, ex: Examples, split: str) -> None:
        if task.head_model not in pool.models:
            raise ValueError(f"task {task.name!r}: model pool has no model {task.head_model!r} to take its head from "
                             f"(pool models: {sorted(pool.models)}); set the task's `model`")
        ref = pool.models[task.head_model]
        n = head_labels(ref)
        if task.num_labels is not None and n != task.num_labels:
            raise ValueError(f"task {task.name!r} has {task.num_labels} labels but model {ref!r} has a {n}-way head")
        if not task.regression and ex.labels:
            top = max(int(y) for y in ex.labels)
            if top >= n or min(int(y) for y in ex.labels) < 0:
                raise ValueError(f"task {task.name!r}: label id {top} in its {split} data does not fit "
                                 f"the {n}-way head of model {ref!r}")

    # -- scoring
    def score(self, model: torch.nn.Module, task: TaskSpec, tokenizer_dir: str) -> dict[str, float]:
        """Metrics of a complete model (body + head) on one task."""
        batches, order = self._encoded_for(task, tokenizer_dir)
        preds_sorted = predict(model, batches, task.regression, self.device)
        preds = np.empty_like(preds_sorted)
        preds[order] = preds_sorted
        return compute_metrics(task.metrics, preds, self.examples(task).labels)

    def _select(self, tasks: Sequence[str] | None) -> list[TaskSpec]:
        if tasks is None:
            return self.tasks
        names = [t.name for t in self.tasks]
        for n in tasks:
            if n not in names:
                raise ValueError(f"taskpool has no task {n!r}; it has {names}")
        return [t for t in self.tasks if t.name in tasks]

    def evaluate_state_dict(self, body: Mapping[str, torch.Tensor], pool: ModelPool, label: str = "merged model",
                            tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Score an in-memory merged body: each task = this body + the task model's own head.

        ``tasks`` restricts scoring to those task names (default: all).
        """
        results: dict[str, float] = {}
        for task in self._select(tasks):
            model, path = self.task_model(task, pool)
            model._dare_lab_own_body = False  # type: ignore[attr-defined]
            load_body_into(model, body, label)  # every body tensor is overwritten; the head is kept
            for m, v in self.score(model, task, path).items():
                results[f"{task.name}/{m}"] = v
        return results

    def evaluate(self, model_dir: str | Path, pool: ModelPool) -> dict[str, float]:
        """Score the merged model in ``model_dir`` (merged body + each task's own head).

        Keys ``<task>/<metric>`` for ``split``, plus ``<task>/<split>_<metric>`` for each of
        ``also_splits`` (e.g. ``validation`` for hyperparameter selection, see :func:`select_best`).
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"merged model directory does not exist: {model_dir}")
        body = read_state_dict(model_dir)
        results = self.evaluate_state_dict(body, pool, label=str(model_dir))
        for extra in self.also_splits:
            other = self.with_split(extra)
            for k, v in other.evaluate_state_dict(body, pool, label=str(model_dir)).items():
                task, metric = k.split("/", 1)
                results[f"{task}/{extra}_{metric}"] = v
        return results

    def with_split(self, split: str) -> "ClassificationTaskPool":
        """The same tasks on another split (shares the loaded task models)."""
        if split not in self._other:
            other = ClassificationTaskPool(self.tasks, split=split, batch_size=self.batch_size, device=str(self.device))
            other._task_models = self._task_models
            self._other[split] = other
        return self._other[split]

    def evaluate_models(self, pool: ModelPool, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Each task scored by its own fine-tuned model (the individual-model baseline)."""
        results: dict[str, float] = {}
        for task in self._select(tasks):
            model, path = self.task_model(task, pool)
            if not getattr(model, "_dare_lab_own_body", True):  # a merged body was loaded: put its own back
                load_body_into(model, read_state_dict(path), path)
                model._dare_lab_own_body = True  # type: ignore[attr-defined]
            for m, v in self.score(model, task, path).items():
                results[f"{task.name}/{m}"] = v
        return results


# ----------------------------------------------------------------------------- GLUE

GLUE_DATASET = "nyu-mll/glue"

# task → (text column, pair column, number of labels (1 = regression), hub split used as test)
GLUE_TASKS: dict[str, tuple[str, str | None, int, str]] = {
    "cola": ("sentence", None, 2, "validation"),
    "sst2": ("sentence", None, 2, "validation"),
    "mrpc": ("sentence1", "sentence2", 2, "validation"),
    "stsb": ("sentence1", "sentence2", 1, "validation"),
    "qqp": ("question1", "question2", 2, "validation"),
    "mnli": ("premise", "hypothesis", 3, "validation_matched"),
    "qnli": ("question", "sentence", 2, "validation"),
    "rte": ("sentence1", "sentence2", 2, "validation"),
}
GLUE_LABELS = {
    "cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
}


def glue_task(name: str, files: Mapping[str, str] | None = None, dataset: str = GLUE_DATASET,
              model: str | None = None, max_length: int = 128, max_examples: int | None = None) -> TaskSpec:
    """The paper's spec of one GLUE task (hub id ``nyu-mll/glue``; ``files`` for local copies)."""
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose from {sorted(GLUE_TASKS)}")
    text, pair, n, test_split = GLUE_TASKS[name]
    return TaskSpec(name=name, files=dict(files or {}), dataset=None if files else dataset, subset=name,
                    source_splits={"train": "train", "test": test_split}, text_column=text, text_pair_column=pair,
                    label_column="label", labels=GLUE_LABELS.get(name), regression=n == 1,
                    metrics=GLUE_METRICS[name], model=model, max_length=max_length, max_examples=max_examples)


class GlueTaskPool(ClassificationTaskPool):
    """GLUE with the paper's metrics: CoLA MCC; SST-2/QNLI/RTE acc; MNLI matched acc;
    MRPC/QQP acc + F1; STS-B Pearson + Spearman.

    tasks: GLUE task names (default all eight). models: task → pool key owning its head
    (default: the task name). files: task → {split: local file} (offline copies in the hub schema).
    """

    def __init__(self, tasks: Sequence[str] = tuple(GLUE_TASKS), split: str = "test", batch_size: int = 64,
                 device: str = "cpu", max_examples: int | None = None, models: Mapping[str, str] | None = None,
                 files: Mapping[str, Mapping[str, str]] | None = None, dataset: str = GLUE_DATASET,
                 max_length: int = 128, progress: bool = False, also_splits: Sequence[str] = ()):
        models, files = dict(models or {}), dict(files or {})
        specs = [glue_task(t, files.get(t), dataset, models.get(t), max_length) for t in tasks]
        super().__init__(specs, split=split, batch_size=batch_size, device=device, max_examples=max_examples,
                         progress=progress, also_splits=also_splits)


def mean_score(results: Mapping[str, float]) -> float:
    """Average over tasks of each task's mean metric (NaN metrics skipped)."""
    per_task: dict[str, list[float]] = {}
    for k, v in results.items():
        task = k.split("/", 1)[0]
        if not math.isnan(v):
            per_task.setdefault(task, []).append(v)
    vals = [sum(v) / len(v) for v in per_task.values() if v]
    return sum(vals) / len(vals) if vals else float("nan")


def select_best(sweep_dir: str | Path, select_on: str = "validation") -> dict[str, Any]:
    """Pick the sweep job with the best mean ``<task>/<select_on>_<metric>`` (the paper's protocol).

    Reads the sweep's ``summary.csv`` (one row per job), writes ``best.json`` next to it with
    the chosen job, its overrides, its selection score and its test metrics (``<task>/<metric>``).
    """
    sweep_dir = Path(sweep_dir)
    summary = sweep_dir / "summary.csv"
    if not summary.exists():
        raise FileNotFoundError(f"no summary.csv in sweep directory {sweep_dir}")
    with open(summary, newline="") as fh:
        rows = list(csv.DictReader(fh))
    prefix = f"{select_on}_"
    best, best_score = None, -math.inf
    for row in rows:
        vals = []
        for k, v in row.items():
            if "/" in k and k.split("/", 1)[1].startswith(prefix) and v not in ("", None):
                try:
                    x = float(v)
                except ValueError:
                    continue
                if not math.isnan(x):
                    vals.append(x)
        if vals and sum(vals) / len(vals) > best_score:
            best, best_score = row, sum(vals) / len(vals)
    if best is None:
        raise ValueError(f"{summary}: no job reports '<task>/{prefix}<metric>' columns "
                         f"(set taskpool.also_splits=[{select_on}])")
    tasks = {k.split("/", 1)[0] for k in best if "/" in k and k.split("/", 1)[1].startswith(prefix)}
    test = {}
    for k, v in best.items():
        if "/" in k and k.split("/", 1)[0] in tasks and not k.split("/", 1)[1].startswith(tuple(f"{s}_" for s in SPLITS)) \
                and v not in ("", None):
            try:
                test[k] = float(v)
            except ValueError:
                pass
    out = {"job": best.get("job"), "overrides": best.get("overrides"), f"{select_on}_score": best_score,
           "test": test, "trials": len(rows)}
    (sweep_dir / "best.json").write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":  # python -m dare_lab.taskpool.classification select-best <sweep_dir>
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "select-best":
        sys.exit("usage: python -m dare_lab.taskpool.classification select-best <sweep_dir>")
    try:
        print(json.dumps(select_best(sys.argv[2]), indent=2))
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
