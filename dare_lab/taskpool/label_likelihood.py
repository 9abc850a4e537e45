"""Short-answer tasks for causal LMs, scored exactly by label likelihood.

Each example is a prompt and one of a task's candidate label words. The model scores every
candidate by the summed log-probability of its tokens after the prompt (teacher forcing, no
sampling); the prediction is the argmax (ties: the first candidate), the metric is accuracy
(and macro-F1). One evaluation point is one forward pass per example when every candidate is a
single token, else one per (example, candidate): seconds for a few hundred short prompts.

The prompts (``PROMPTS``) are the ones the decoder demo fine-tunes on, so the demo's task models
are scored in the format they learned. A task is ``{name, labels, rows | file, prompt, model}``:
``rows`` a list of ``{"text", "label"}`` (or ``file``, a CSV/JSON/JSONL with those fields),
``prompt`` a ``str.format`` template with ``{text}`` (and optionally ``{labels}``, the label
words joined with ", "), ``model`` the pool member that is the task's own fine-tuned model
(default: the task name) for the SFT baseline.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dare_lab.engine.pool import ModelPool
from dare_lab.taskpool.base import plain_config
from dare_lab.taskpool.metrics import macro_f1

PROMPTS = {
    "sentiment": "Classify the sentiment of the tweet as {labels}.\nTweet: {text}\nSentiment:",
    "topic": "Classify the topic of the news article as {labels}.\nArticle: {text}\nTopic:",
    "plain": "{text}\nAnswer:",
}


def format_prompt(template: str, text: str, labels: Sequence[str]) -> str:
    """``template`` (a ``PROMPTS`` key or a format string with ``{text}``) filled in."""
    t = PROMPTS.get(template, template)
    if "{text}" not in t:
        raise ValueError(f"prompt {template!r} is neither one of {sorted(PROMPTS)} nor a template with {{text}}")
    return t.format(text=text, labels=", ".join(labels))


def label_target(label: str) -> str:
    """The continuation a label word is generated as (a leading space, like a word after "Sentiment:")."""
    return " " + label


@dataclass
class LabelTask:
    name: str
    labels: list[str]
    rows: list[dict] = field(default_factory=list)
    file: str | None = None
    prompt: str = "plain"
    model: str | None = None
    max_chars: int | None = None  # text cut to its first max_chars characters (None: whole)
    limit: int | None = None      # first `limit` rows only

    def __post_init__(self) -> None:
        self.labels = [str(x) for x in self.labels]
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task {self.name!r}: labels must be at least two distinct words, got {self.labels}")
        if not self.rows and not self.file:
            raise ValueError(f"task {self.name!r}: give rows or a file")
        format_prompt(self.prompt, "x", self.labels)

    @property
    def head_model(self) -> str:
        return self.model or self.name

    @classmethod
    def from_any(cls, obj: Any) -> "LabelTask":
        if isinstance(obj, LabelTask):
            return obj
        d = dict(plain_config(obj))
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"label task {d.get('name')!r}: unknown key(s) {unknown}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        if "name" not in d or "labels" not in d:
            raise ValueError(f"a label task needs name and labels, got keys {sorted(d)}")
        return cls(**d)

    def load_rows(self) -> list[dict]:
        rows = self.rows or _read_rows(Path(self.file), self.name)
        if self.limit is not None:
            rows = rows[: int(self.limit)]
        out = []
        for i, r in enumerate(rows):
            if "text" not in r or "label" not in r:
                raise ValueError(f"task {self.name!r}: row {i} lacks text/label (keys {sorted(r)})")
            label = str(r["label"])
            if label not in self.labels:
                raise ValueError(f"task {self.name!r}: row {i} has label {label!r}, not one of {self.labels}")
            text = str(r["text"])
            out.append({"text": text[: self.max_chars] if self.max_chars else text, "label": label})
        if not out:
            raise ValueError(f"task {self.name!r} has no rows")
        return out


def _read_rows(path: Path, task: str) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"task {task!r}: data file {path} does not exist")
    try:
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                return list(csv.DictReader(fh))
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ValueError("not a list of rows")
            return data
    except (ValueError, csv.Error) as e:
        raise ValueError(f"task {task!r}: cannot parse {path}: {e}") from None
    raise ValueError(f"task {task!r}: data file {path} must be .csv, .json or .jsonl")


def _encode(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    t_ids = tok(target, add_special_tokens=False)["input_ids"]
    if not t_ids:
        raise ValueError(f"label {target!r} encodes to no tokens")
    return p_ids, t_ids


@torch.no_grad()
def label_logprobs(model: torch.nn.Module, tok, prompts: Sequence[str], labels: Sequence[str],
                   batch_size: int = 16, max_prompt_tokens: int | None = None) -> torch.Tensor:
    """``[n_prompts, n_labels]`` summed log p(label tokens | prompt) in float64.

    Prompts longer than ``max_prompt_tokens`` keep their LAST tokens (the question stays).
    One sequence per prompt when every label is one token, else one per (prompt, label).
    """
    targets = [tok(label_target(x), add_special_tokens=False)["input_ids"] for x in labels]
    if any(not t for t in targets):
        raise ValueError(f"some label encodes to no tokens: {list(labels)}")
    single = all(len(t) == 1 for t in targets)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    dev = next(model.parameters()).device
    p_enc = []
    for p in prompts:
        ids = tok(p, add_special_tokens=True)["input_ids"]
        if max_prompt_tokens and len(ids) > max_prompt_tokens:
            ids = ids[-int(max_prompt_tokens):]
        p_enc.append(ids)
    # sequences: (prompt index, label index or -1 for all single-token labels, token ids, n prompt tokens)
    seqs = []
    for i, ids in enumerate(p_enc):
        if single:
            seqs.append((i, -1, ids, len(ids)))
        else:
            for j, t in enumerate(targets):
                seqs.append((i, j, ids + t, len(ids)))
    out = torch.full((len(prompts), len(labels)), float("nan"), dtype=torch.float64)
    first = torch.tensor([t[0] for t in targets])
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][2]))  # similar lengths together: little padding
    for s in range(0, len(order), batch_size):
        chunk = [seqs[k] for k in order[s:s + batch_size]]
        width = max(len(c[2]) for c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, _, x, _) in enumerate(chunk):
            ids[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
        # the positions whose next-token distribution is scored: the last prompt token (and the
        # label's own tokens but its last); only there is the vocabulary projection computed
        rows_, pos_ = [], []
        for r, (i, j, x, n_p) in enumerate(chunk):
            n = 1 if j < 0 else len(targets[j])
            rows_ += [r] * n
            pos_ += list(range(n_p - 1, n_p - 1 + n))
        logits = _logits_at(model, ids.to(dev), mask.to(dev), torch.tensor(rows_), torch.tensor(pos_))
        logp = torch.log_softmax(logits.to(torch.float64).cpu(), dim=-1)
        k = 0
        for r, (i, j, x, n_p) in enumerate(chunk):
            if j < 0:
                out[i] = logp[k, first]
                k += 1
            else:
                t = targets[j]
                out[i, j] = logp[torch.arange(k, k + len(t)), torch.tensor(t)].sum()
                k += len(t)
    return out


def _logits_at(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
               pos: torch.Tensor) -> torch.Tensor:
    """Next-token logits at ``(rows[k], pos[k])``: the decoder's hidden states there, then the output
    projection on those rows only (a full-vocabulary projection of every position is a fifth of a
    small LM's forward cost). Models without ``get_decoder`` / output embeddings: full logits."""
    get_dec = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if callable(get_dec) and head is not None and getattr(model.config, "final_logit_softcapping", None) is None:
        h = get_dec()(input_ids=ids, attention_mask=mask).last_hidden_state
        return head(h[rows.to(h.device), pos.to(h.device)])
    return model(input_ids=ids, attention_mask=mask).logits[rows, pos]


class LabelLikelihoodTaskPool:
    """Causal-LM short-answer tasks scored by label likelihood (see the module docstring).

    ``evaluate(model_dir, pool)`` loads a merged model from disk; ``evaluate_state_dict(state,
    pool)`` scores a state dict in memory on the pool base's architecture (tokenizer: the
    base's); ``evaluate_models(pool)`` scores each task with its own fine-tuned model.
    """

    def __init__(self, tasks: Sequence[Any] | Mapping[str, Any], batch_size: int = 16, device: str = "cpu",
                 max_prompt_tokens: int | None = 512, num_threads: int | None = None, name: str = "label_likelihood"):
        tasks = plain_config(tasks)
        if isinstance(tasks, Mapping):
            tasks = [dict(v, name=k) for k, v in tasks.items()]
        self.tasks = [LabelTask.from_any(t) for t in tasks]
        if not self.tasks:
            raise ValueError("a label-likelihood taskpool needs at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names repeat: {names}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = str(device)
        self.max_prompt_tokens = max_prompt_tokens
        self.num_threads = num_threads
        self.name = name
        self._rows: dict[str, list[dict]] = {}
        self._skeleton: dict[str, torch.nn.Module] = {}  # base architecture, reused by evaluate_state_dict

    # ---- inputs -------------------------------------------------------------------------
    def rows(self, task: LabelTask) -> list[dict]:
        if task.name not in self._rows:
            self._rows[task.name] = task.load_rows()
        return self._rows[task.name]

    def prompts(self, task: LabelTask) -> list[str]:
        return [format_prompt(task.prompt, r["text"], task.labels) for r in self.rows(task)]

    def examples(self, task: LabelTask):
        """The task's rows as ``.texts`` (the prompts the model sees) and ``.labels`` (probes such
        as the embedding-similarity analysis read the texts)."""
        from types import SimpleNamespace

        return SimpleNamespace(texts=self.prompts(task), labels=[r["label"] for r in self.rows(task)])

    def preflight(self, pool: ModelPool | None) -> None:
        """Every task's rows load with known labels; with a pool: the base has a tokenizer that
        encodes every label, and each task's own model (for the SFT baseline) is named in the pool
        when the task names one explicitly."""
        for t in self.tasks:
            self.rows(t)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"taskpool device {self.device!r} but CUDA is not available")
        if pool is None:
            return
        tok = self._tokenizer(pool.base)
        for t in self.tasks:
            for x in t.labels:
                if not tok(label_target(x), add_special_tokens=False)["input_ids"]:
                    raise ValueError(f"task {t.name!r}: label {x!r} encodes to no tokens with {pool.base}'s tokenizer")
            if t.model is not None and t.model not in pool.models:
                raise ValueError(f"task {t.name!r} names model {t.model!r}, not in the pool ({sorted(pool.models)})")

    # ---- models -------------------------------------------------------------------------
    @staticmethod
    def _tokenizer(ref: str):
        from transformers import AutoTokenizer

        p = Path(str(ref))
        if not (p / "tokenizer_config.json").exists() and not (p / "tokenizer.json").exists():
            raise FileNotFoundError(f"{ref} holds no tokenizer (tokenizer_config.json / tokenizer.json)")
        return AutoTokenizer.from_pretrained(str(ref))

    def _load(self, ref: str | Path) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32).to(self.device).eval()

    def _select(self, tasks: Sequence[str] | None) -> list[LabelTask]:
        if tasks is None:
            return list(self.tasks)
        known = {t.name: t for t in self.tasks}
        bad = [x for x in tasks if x not in known]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; this taskpool has {sorted(known)}")
        return [known[x] for x in tasks]

    def predict(self, model: torch.nn.Module, task: LabelTask, tok) -> list[str]:
        """The predicted label word of each row."""
        return [task.labels[i] for i in self._logprobs(model, task, tok).argmax(dim=1).tolist()]

    def _logprobs(self, model: torch.nn.Module, task: LabelTask, tok) -> torch.Tensor:
        before = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(int(self.num_threads))
        try:
            lp = label_logprobs(model, tok, self.prompts(task), task.labels, self.batch_size, self.max_prompt_tokens)
        finally:
            torch.set_num_threads(before)
        if torch.isnan(lp).any():  # pragma: no cover - every cell is written
            raise RuntimeError(f"task {task.name!r}: unscored label cells")
        return lp

    def score(self, model: torch.nn.Module, task: LabelTask, tok) -> dict[str, float]:
        rows = self.rows(task)
        lp = self._logprobs(model, task, tok)
        pred = lp.argmax(dim=1).tolist()  # torch.argmax returns the first maximal index
        gold = [task.labels.index(r["label"]) for r in rows]
        acc = sum(int(a == b) for a, b in zip(pred, gold)) / len(gold)
        nll = -float(lp[torch.arange(len(gold)), torch.tensor(gold)].mean())
        return {"accuracy": acc, "macro_f1": macro_f1(pred, gold), "gold_nll": nll}

    def _score_all(self, model, tok, tasks) -> dict[str, float]:
        out = {}
        for t in tasks:
            for k, v in self.score(model, t, tok).items():
                out[f"{t.name}/{k}"] = v
        return out

    def evaluate(self, model_dir: str | Path, pool: ModelPool) -> dict[str, float]:
        model = self._load(model_dir)
        tok_dir = model_dir if (Path(model_dir) / "tokenizer_config.json").exists() else pool.base
        return self._score_all(model, self._tokenizer(tok_dir), self.tasks)

    def evaluate_state_dict(self, state: Mapping[str, torch.Tensor], pool: ModelPool, label: str = "merged model",
                            tasks: Sequence[str] | None = None) -> dict[str, float]:
        key = str(pool.base)
        if key not in self._skeleton:
            self._skeleton.clear()
            self._skeleton[key] = self._load(pool.base)
        model = self._skeleton[key]  # every tensor is overwritten below: nothing of a previous state stays
        own = model.state_dict()
        missing = sorted(k for k in own if k not in state and not _tied_alias(model, k, state))
        if missing:
            raise ValueError(f"{label} lacks {len(missing)} tensor(s) of the base architecture, e.g. {missing[:3]}")
        unknown = sorted(k for k in state if k not in own)
        if unknown:
            raise ValueError(f"{label} has {len(unknown)} tensor(s) the base architecture lacks, e.g. {unknown[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(own[k].dtype))
        return self._score_all(model, self._tokenizer(pool.base), self._select(tasks))

    def evaluate_models(self, pool: ModelPool, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Each task scored by its own fine-tuned model (the SFT baseline)."""
        out = {}
        tok = self._tokenizer(pool.base)
        for t in self._select(tasks):
            if t.head_model not in pool.models:
                raise ValueError(f"task {t.name!r}: its model {t.head_model!r} is not in the pool ({sorted(pool.models)})")
            model = self._load(pool.models[t.head_model])
            for k, v in self.score(model, t, tok).items():
                out[f"{t.name}/{k}"] = v
        return out

    def with_split(self, split: str) -> "LabelLikelihoodTaskPool":  # pragma: no cover - one split only
        raise ValueError("a label-likelihood taskpool holds one split; build another for validation rows")


def _tied_alias(model: torch.nn.Module, key: str, state: Mapping) -> bool:
    """``lm_head.weight`` may be absent from a state dict when the model ties it to the embeddings."""
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def mean_accuracy(metrics: Mapping[str, float]) -> float:
    vals = [v for k, v in metrics.items() if k.endswith("/accuracy")]
    return float(sum(vals) / len(vals)) if vals else math.nan
