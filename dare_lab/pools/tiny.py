"""Tiny random-init model pools built offline (tests, CI and the pre-demo default job).

Fine-tuned models are base + small Gaussian noise, like real homologous SFT models whose
deltas are small; each has its own random task head.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dare_lab.engine.pool import ModelPool

CORPUS = [
    "the movie was great and the actors were wonderful",
    "a terrible plot with boring characters and bad music",
    "stocks rose as the market rallied on strong earnings",
    "the team won the final match after a late goal",
    "def add(a, b): return a + b",
    "question: what is 2 plus 3? answer: 5",
    "Natalia sold clips to 48 of her friends in April and half as many in May.",
] * 4


def make_tokenizer(out_dir: str | Path, kind: str = "bert", vocab_size: int = 120):
    """Train a tiny tokenizer offline (``tokenizers``) and save it in HF format."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if kind == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = __import__("tokenizers").decoders.ByteLevel()
        special = ["<unk>", "<s>", "</s>", "<pad>"]
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(arch: str, vocab_size: int, num_labels: int = 2):
    from transformers import BertConfig, LlamaConfig

    if arch == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    raise ValueError(f"unknown tiny arch {arch!r}; choose bert or llama")


def _model_class(arch: str):
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    return BertForSequenceClassification if arch == "bert" else LlamaForCausalLM


def make_tiny_pool(root: str | Path, arch: str = "bert", n_models: int = 2, seed: int = 0, noise: float = 0.01,
                   max_shard_size: str | None = None, dtype: torch.dtype = torch.float32) -> ModelPool:
    """Write ``root/base`` and ``root/ft{i}`` (i < n_models) and return their pool.

    ``max_shard_size`` (e.g. "20KB") makes sharded safetensors with an index.
    """
    root = Path(root)
    tok = make_tokenizer(root / "tokenizer", "bert" if arch == "bert" else "bpe")
    cfg = tiny_config(arch, len(tok))
    cls = _model_class(arch)
    torch.manual_seed(seed)
    base = cls(cfg).to(dtype).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    base.save_pretrained(root / "base", **kwargs)
    tok.save_pretrained(root / "base")
    models = {}
    for i in range(n_models):
        gen = torch.Generator().manual_seed(seed * 1000 + i + 1)
        ft = cls(cfg).to(dtype).eval()
        state = {}
        for name, t in base.state_dict().items():
            if t.is_floating_point() and not name.startswith(("classifier", "score")):
                state[name] = t + noise * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(dtype)
            elif name.startswith(("classifier", "score")):
                state[name] = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(dtype) * 0.1
            else:
                state[name] = t.clone()
        ft.load_state_dict(state)
        ft.save_pretrained(root / f"ft{i}", **kwargs)
        tok.save_pretrained(root / f"ft{i}")
        models[f"ft{i}"] = str(root / f"ft{i}")
    return ModelPool(base=str(root / "base"), models=models, name=f"tiny_{arch}")


def cached_tiny_pool(cache_dir: str | Path, arch: str = "bert", n_models: int = 2, seed: int = 0) -> ModelPool:
    """A tiny pool built once under ``cache_dir`` (safe for a sweep's parallel jobs) and reused."""
    from dare_lab.pools.cache import build_once

    root = build_once(Path(cache_dir).expanduser() / f"tiny_{arch}_k{n_models}_s{seed}",
                      lambda tmp: make_tiny_pool(tmp, arch, n_models, seed), marker="base/config.json")
    models = {f"ft{i}": str(root / f"ft{i}") for i in range(n_models)}
    return ModelPool(base=str(root / "base"), models=models, name=f"tiny_{arch}")
