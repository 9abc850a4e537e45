"""Tiny random-init BERT checkpoints and a synthetic task, for tests and smoke runs.

The synthetic "polarity" task: a sentence of random filler words plus exactly one cue word;
the label is 1 if the cue is positive ("good", "great", ...), else 0. A 2-layer BERT learns it
in a few hundred steps.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

FILLER = ["the", "a", "movie", "book", "plot", "actor", "song", "day", "food", "story", "city", "car",
          "was", "is", "very", "quite", "really", "and", "but", "then"]
POSITIVE = ["good", "great", "fine", "nice", "happy"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly"]
TOPICS = {"sport": ["match", "goal", "team", "coach"], "tech": ["chip", "code", "phone", "robot"],
          "food": ["bread", "soup", "cake", "rice"]}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocab_words() -> list[str]:
    words = FILLER + POSITIVE + NEGATIVE + [w for ws in TOPICS.values() for w in ws]
    return SPECIAL + sorted(set(words))


def make_tiny_bert(out_dir: str | Path, num_labels: int = 2, seed: int = 0, hidden: int = 32, layers: int = 2,
                   problem_type: str | None = None, arch: str = "bert") -> Path:
    """Write a random-init sequence classifier (``arch``: bert | roberta | mpnet) + WordPiece tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        MPNetConfig,
        PreTrainedTokenizerFast,
        RobertaConfig,
    )

    configs = {"bert": BertConfig, "roberta": RobertaConfig, "mpnet": MPNetConfig}
    if arch not in configs:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(configs)}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(vocab_words())}
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    tok.save_pretrained(out)
    extra = {"pad_token_id": vocab["[PAD]"], "bos_token_id": vocab["[CLS]"], "eos_token_id": vocab["[SEP]"]} \
        if arch != "bert" else {}
    cfg = configs[arch](vocab_size=len(vocab_words()), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=66,
                        num_labels=num_labels, problem_type=problem_type, **extra)
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(out)
    return out


def polarity_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": ["neg", "pos"][label]})
    return rows


def topic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    names = sorted(TOPICS)
    rows = []
    for _ in range(n):
        label = rng.randrange(len(names))
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS[names[label]]))
        rows.append({"text": " ".join(words), "label": names[label]})
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
