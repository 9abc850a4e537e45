"""Fine-tune a pre-trained encoder into a task model (homologous pools for merging).

Defaults follow the paper's GLUE recipe: 10 epochs, AdamW with weight decay 0.01 (not on
biases/LayerNorm), linear warmup (``warmup_ratio`` of all steps) then linear decay, learning
rate from config. The task's original training split is divided 90/10 into train/validation
with a fixed seed (:func:`dare_lab.taskpool.classification.train_val_split`); the original
validation split is the test split. Works for any ``AutoModelForSequenceClassification``
architecture (BERT, RoBERTa, MPNet, ...), classification and regression (STS-B).

Output directory: an HF model (task head included) + tokenizer, ``train_log.jsonl`` (one
line per logging step and per epoch) and ``finetune.json`` (written last: its presence marks
a finished run, which later calls reuse). An interrupted run resumes from ``_checkpoint/``
(saved after every epoch and every ``save_every_steps`` steps).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dare_lab.taskpool.classification import (
    Examples,
    TaskSpec,
    encode_batches,
    load_split,
    predict,
)
from dare_lab.taskpool.metrics import compute_metrics

DONE_FILE = "finetune.json"
LOG_FILE = "train_log.jsonl"
CKPT_DIR = "_checkpoint"


@dataclass
class FinetuneConfig:
    epochs: float = 10
    learning_rate: float = 1e-5
    batch_size: int = 16
    eval_batch_size: int = 64
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int | None = None  # default: the task's max_length
    max_train_examples: int | None = None  # fixed-seed subsample of the training split
    max_eval_examples: int | None = None
    seed: int = 0
    eval_every_epoch: bool = True
    select_best: bool = False  # keep the epoch with the best validation score
    save_every_steps: int = 0
    log_every_steps: int = 50
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} is outside [0, 1)")

    @classmethod
    def from_any(cls, obj: Any) -> "FinetuneConfig":
        if obj is None:
            return cls()
        if isinstance(obj, FinetuneConfig):
            return obj
        if not isinstance(obj, dict):
            from omegaconf import OmegaConf

            obj = OmegaConf.to_container(obj, resolve=True)
        known = {f.name for f in fields(cls)}
        bad = sorted(set(obj) - known)
        if bad:
            raise ValueError(f"unknown fine-tuning option(s) {bad}; known: {sorted(known)}")
        return cls(**obj)



@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' load report and weight-loading bars off for a load whose differences are
    intended (a new task head); warnings and errors after it are shown again."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()

def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n or n.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _score(model, batches_order, examples: Examples, task: TaskSpec, device) -> dict[str, float]:
    batches, order = batches_order
    sorted_preds = predict(model, batches, task.regression, device)
    preds = np.empty_like(sorted_preds)
    preds[order] = sorted_preds
    return compute_metrics(task.metrics, preds, examples.labels)


def _is_done(out: Path) -> dict | None:
    f = out / DONE_FILE
    if f.exists():
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            return None
    return None


def finetune(base: str | Path, task: TaskSpec | dict, out_dir: str | Path, config: FinetuneConfig | dict | None = None,
             overwrite: bool = False, stop_after_steps: int | None = None) -> dict:
    """Fine-tune ``base`` on ``task``; write the task model to ``out_dir``. Returns the summary.

    A finished ``out_dir`` (``finetune.json`` present) is reused unless ``overwrite``.
    ``stop_after_steps`` ends this call after that many optimizer steps, leaving a checkpoint
    that the next call resumes from (returns ``{"status": "interrupted", "step": n}``).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    from dare_lab.engine.sources import resolve_model_dir

    task = TaskSpec.from_any(task)
    cfg = FinetuneConfig.from_any(config)
    out = Path(out_dir).expanduser()
    if overwrite and out.exists():
        shutil.rmtree(out)
    done = _is_done(out)
    if done is not None:
        return done
    base_path = resolve_model_dir(base)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    max_length = cfg.max_length or task.max_length
    _set_seed(cfg.seed)

    # data
    train = load_split(task, "train")
    if cfg.max_train_examples is not None and len(train) > cfg.max_train_examples:
        idx = np.sort(np.random.RandomState(cfg.seed).choice(len(train), cfg.max_train_examples, replace=False))
        train = train.take(idx)
    val = load_split(task, "validation")
    if cfg.max_eval_examples is not None and len(val) > cfg.max_eval_examples:
        val = val.take(range(cfg.max_eval_examples))
    num_labels = task.num_labels
    if num_labels is None:
        num_labels = int(max(train.labels)) + 1
        if num_labels < 2:
            raise ValueError(f"task {task.name!r}: training labels hold a single class")

    tok = AutoTokenizer.from_pretrained(base_path)
    kwargs: dict[str, Any] = {"num_labels": num_labels,
                              "problem_type": "regression" if task.regression else "single_label_classification"}
    if task.labels and not task.regression:
        kwargs["id2label"] = dict(enumerate(task.labels))
        kwargs["label2id"] = {n: i for i, n in enumerate(task.labels)}
    with quiet_transformers():  # the head is replaced on purpose: no "MISMATCH … Reinit" load report
        model = AutoModelForSequenceClassification.from_pretrained(
            base_path, dtype=torch.float32, ignore_mismatched_sizes=True, **kwargs).to(device)  # a new head of the right size

    enc = tok(train.texts, train.pairs, truncation=True, max_length=max_length) if train.pairs is not None else \
        tok(train.texts, truncation=True, max_length=max_length)
    feats = [{k: enc[k][i] for k in enc.keys()} for i in range(len(train))]
    labels = torch.tensor(train.labels, dtype=torch.float32 if task.regression else torch.long)
    val_batches = encode_batches(tok, val, max_length, cfg.eval_batch_size)

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)

    # resume
    ckpt = out / CKPT_DIR
    old = out / (CKPT_DIR + ".old")
    if not (ckpt / "state.json").exists() and (old / "state.json").exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        old.rename(ckpt)  # killed between the two renames of save_ckpt: the previous checkpoint
    step, best, best_epoch = 0, -math.inf, None
    best_state: dict[str, torch.Tensor] | None = None
    if (ckpt / "state.json").exists():
        state = json.loads((ckpt / "state.json").read_text())
        from safetensors.torch import load_file

        model.load_state_dict(load_file(ckpt / "model.safetensors", device=str(device)), strict=False)
        extra = torch.load(ckpt / "optim.pt", weights_only=True, map_location=device)
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        step, best, best_epoch = state["step"], state["best"], state["best_epoch"]
        if (ckpt / "best.safetensors").exists():
            best_state = load_file(ckpt / "best.safetensors")
    log = open(out / LOG_FILE, "a", encoding="utf-8")

    def save_ckpt() -> None:
        from safetensors.torch import save_file

        tmp = out / (CKPT_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        if best_state is not None:
            save_file(best_state, tmp / "best.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "best": best, "best_epoch": best_epoch}))
        shutil.rmtree(old, ignore_errors=True)
        if ckpt.exists():
            ckpt.rename(old)  # keep the previous checkpoint until the new one is in place
        tmp.rename(ckpt)
        shutil.rmtree(old, ignore_errors=True)

    def write(rec: dict) -> None:
        log.write(json.dumps(rec) + "\n")
        log.flush()

    from tqdm.auto import tqdm

    t0 = time.time()
    bar = tqdm(total=total_steps, initial=step, desc=f"fine-tune {task.name}", disable=not cfg.progress, unit="step")
    val_metrics: dict[str, float] = {}
    first_step = step
    while step < total_steps:
        epoch = step // steps_per_epoch
        gen = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
        perm = torch.randperm(len(train), generator=gen).tolist()
        start = (step - epoch * steps_per_epoch) * cfg.batch_size  # resume inside an epoch
        model.train()
        running = 0.0
        for s in range(start, len(perm), cfg.batch_size):
            if step >= total_steps:
                break
            idx = perm[s:s + cfg.batch_size]
            batch = dict(tok.pad([feats[i] for i in idx], return_tensors="pt"))
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch, labels=labels[idx].to(device)).loss
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running += float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if cfg.log_every_steps and step % cfg.log_every_steps == 0:
                write({"step": step, "epoch": step / steps_per_epoch, "loss": float(loss.detach()),
                       "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 2)})
            if cfg.save_every_steps and step % cfg.save_every_steps == 0 and step % steps_per_epoch:
                save_ckpt()
            if stop_after_steps is not None and step - first_step >= stop_after_steps and step % steps_per_epoch:
                save_ckpt()
                bar.close()
                log.close()
                return {"status": "interrupted", "step": step, "total_steps": total_steps}
        end_of_epoch = step % steps_per_epoch == 0 or step >= total_steps
        if end_of_epoch:
            rec = {"epoch": math.ceil(step / steps_per_epoch), "step": step, "elapsed_s": round(time.time() - t0, 2)}
            if cfg.eval_every_epoch or step >= total_steps:
                val_metrics = _score(model, val_batches, val, task, device)
                rec.update({f"validation/{k}": v for k, v in val_metrics.items()})
                primary = float(np.nanmean(list(val_metrics.values())))
                if cfg.select_best and primary > best:
                    best, best_epoch = primary, rec["epoch"]
                    best_state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
            write(rec)
            save_ckpt()
    bar.close()
    if cfg.select_best and best_state is not None:
        model.load_state_dict(best_state)
        val_metrics = _score(model, val_batches, val, task, device)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    summary = {"status": "done", "task": task.name, "base": str(base), "out_dir": str(out), "steps": step,
               "train_examples": len(train), "validation_examples": len(val),
               "validation": val_metrics, "best_epoch": best_epoch, "train_seconds": round(time.time() - t0, 2),
               "config": asdict(cfg), "task_spec": asdict(task)}
    log.close()
    (out / DONE_FILE).write_text(json.dumps(summary, indent=2, default=str))
    shutil.rmtree(ckpt, ignore_errors=True)
    return summary


def run(cfg) -> dict[str, float]:
    """Hydra program: ``train: {base, out_dir, tasks: {name: spec}, config: {...}}``.

    Each task model goes to ``<out_dir>/<task>``; returns ``{"<task>/validation_<metric>": v}``.
    """
    from omegaconf import OmegaConf

    t = cfg.train
    tasks = OmegaConf.to_container(t.tasks, resolve=True)
    results: dict[str, float] = {}
    for name, spec in tasks.items():
        summary = finetune(t.base, TaskSpec.from_any(spec, name=name), Path(t.out_dir) / name, t.get("config"))
        for k, v in summary["validation"].items():
            results[f"{name}/validation_{k}"] = v
    return results
