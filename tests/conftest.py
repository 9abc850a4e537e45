"""Shared test set-up: never touch the network, never need a W&B key."""
import os
import socket

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


@pytest.fixture
def no_network(monkeypatch):
    """Fail on any connection that leaves this machine (local IPC stays allowed)."""
    attempts = []
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "localhost", "::1"):
            attempts.append(address)
            raise OSError(f"network disabled in tests: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield attempts
    assert attempts == []


@pytest.fixture(scope="session")
def noisy_bert_trio(tmp_path_factory):
    """A tiny BERT base and two "fine-tuned" models a, b: base + N(0, 0.05²) on the body, each
    with its own random head (2 and 3 labels): the data-aware merges' pool. Read-only."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from dare_lab.taskpool.classification import read_state_dict
    from dare_lab.train.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("noisy_bert")
    base = make_tiny_bert(root / "base", num_labels=2, seed=0)
    a = make_tiny_bert(root / "a", num_labels=2, seed=1)
    b = make_tiny_bert(root / "b", num_labels=3, seed=2)
    base_sd = read_state_dict(base)
    for i, d in enumerate((a, b)):
        m = AutoModelForSequenceClassification.from_pretrained(d)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for k, v in m.state_dict().items():
                if not k.startswith("classifier"):
                    v.copy_(base_sd[k] + 0.05 * torch.randn(v.shape, generator=g))
        m.save_pretrained(d)
    return base, a, b


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on a busy 2-core box torch's default threads are ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
