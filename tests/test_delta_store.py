"""Delta store: DARE-sparsified deltas saved as indices + values rebuild the merge bit for bit."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dare_lab.engine import merge_models
from dare_lab.engine.delta_store import SparseDelta, rebuild, save_sparse_deltas
from dare_lab.ops.presets import build_method
from dare_lab.pools.tiny import make_tiny_pool


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_tiny_pool(tmp_path_factory.mktemp("dstore"), "llama", n_models=2, seed=3, dtype=torch.bfloat16,
                          max_shard_size="40KB")


def tensors(path):
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("sampler,p", [("torch_rand", 0.9), ("geometric", 0.99), ("torch_rand", 0.5)])
def test_rebuild_equals_dare_task_arithmetic_merge(pool, tmp_path, sampler, p):
    stores = [save_sparse_deltas(pool.base, path, tmp_path / f"store-{m}", p, seed=11, sampler=sampler, name=m)
              for m, path in pool.models.items()]
    method = build_method("dare_task_arithmetic", drop_rate=p, seed=11, sampler=sampler, scaling=0.7)
    merged = tensors(merge_models(pool.base, pool.models, method, tmp_path / "merged"))
    rebuilt = tensors(rebuild(pool.base, stores, tmp_path / "rebuilt", scaling=0.7))
    assert merged.keys() == rebuilt.keys()
    for k in merged:
        assert torch.equal(merged[k].view(torch.int16), rebuilt[k].view(torch.int16)), k
    single = tensors(rebuild(pool.base, stores[:1], tmp_path / "single"))
    one = tensors(merge_models(pool.base, {"ft0": pool.models["ft0"]},
                               build_method("dare_task_arithmetic", drop_rate=p, seed=11, sampler=sampler), tmp_path / "one"))
    for k in one:
        assert torch.equal(one[k].view(torch.int16), single[k].view(torch.int16)), k


def test_store_holds_only_kept_entries(pool, tmp_path):
    store = save_sparse_deltas(pool.base, pool.models["ft0"], tmp_path / "s", 0.9, seed=0, name="ft0")
    sd = SparseDelta(store)
    kept = total = 0
    for name, t in tensors(store).items():
        if name.endswith("::values"):
            kept += t.numel()
            assert t.dtype == torch.bfloat16
        elif name.endswith("::gaps"):
            assert t.dtype == torch.int16
    for name, t in tensors(pool.base).items():
        if sd.indices(name) is not None:
            total += t.numel()
    assert abs(kept / total - 0.1) < 0.02
    assert sd.info["sampler"] == "torch_rand" and sd.info["drop_rate"] == 0.9


def test_rebuild_refuses_another_base(pool, tmp_path):
    store = save_sparse_deltas(pool.base, pool.models["ft0"], tmp_path / "s", 0.9, name="ft0")
    with pytest.raises(ValueError, match="another base"):
        rebuild(pool.models["ft1"], [store], tmp_path / "out")
