"""Readers: .bin checkpoints only through weights_only=True; the Python API mirrors the command."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dare_lab
from dare_lab.engine import CheckpointReader, merge_state_dicts
from dare_lab.ops.presets import build_method


def to_bin(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    torch.save(sd, dst / "pytorch_model.bin")
    return str(dst)


def test_bin_checkpoint_merges_like_safetensors(tiny_bert_pool, tmp_path):
    binned = to_bin(tiny_bert_pool.models["ft0"], tmp_path / "ft0_bin")
    reader = CheckpointReader(binned)
    assert reader.dtype("bert.pooler.dense.weight") == torch.float32
    a = dare_lab.merge(tiny_bert_pool.base, {"ft0": binned}, method="dare_task_arithmetic", drop_rate=0.5, out_dir=None)
    b = dare_lab.merge(tiny_bert_pool.base, {"ft0": tiny_bert_pool.models["ft0"]}, method="dare_task_arithmetic", drop_rate=0.5, out_dir=None)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_bin_with_pickled_code_is_refused(tiny_bert_pool, tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"w": torch.zeros(2), "x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"cannot load pytorch_model.bin with weights_only=True"):
        CheckpointReader(d, label="evil")


def test_api_merge_equals_state_dict_merge(tiny_bert_pool):
    pool = tiny_bert_pool
    base = load_file(Path(pool.base) / "model.safetensors")
    fts = {m: load_file(Path(p) / "model.safetensors") for m, p in pool.models.items()}
    expected = merge_state_dicts(base, fts, build_method("dare_ties", drop_rate=0.3, retain_ratio=0.4, seed=9))
    got = dare_lab.merge(pool.base, pool.models, method="dare_ties", drop_rate=0.3, retain_ratio=0.4, seed=9)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_linear_only_scope_leaves_embeddings_and_norms_at_base(tiny_bert_pool):
    pool = tiny_bert_pool
    base = load_file(Path(pool.base) / "model.safetensors")
    got = dare_lab.merge(pool.base, pool.models, method="task_arithmetic", linear_only=True)
    assert torch.equal(got["bert.embeddings.word_embeddings.weight"], base["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(got["bert.encoder.layer.0.attention.output.LayerNorm.weight"], base["bert.encoder.layer.0.attention.output.LayerNorm.weight"])
    assert not torch.equal(got["bert.encoder.layer.0.attention.self.query.weight"], base["bert.encoder.layer.0.attention.self.query.weight"])
