"""Shared test set-up: never touch the network, never need a W&B key."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert_pool(tmp_path_factory):
    """Base + 2 tiny random BERT classifiers (single-file safetensors)."""
    from dare_lab.pools.tiny import make_tiny_pool

    return make_tiny_pool(tmp_path_factory.mktemp("tiny_bert"), "bert", n_models=2, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_pool(tmp_path_factory):
    """Base + 2 tiny random Llama models, written as sharded safetensors with an index."""
    from dare_lab.pools.tiny import make_tiny_pool

    return make_tiny_pool(tmp_path_factory.mktemp("tiny_llama"), "llama", n_models=2, seed=0, max_shard_size="20KB")
