"""Masks depend only on (seed, model name, tensor name): not on tensor order, thread count,
storage dtype or the rest of the pool; different models get independent masks."""

import math

import torch
from safetensors.torch import load_file

from dare_lab.engine import merge_models, merge_state_dicts
from dare_lab.ops.presets import build_method
from dare_lab.pools.tiny import make_tiny_pool

DARE = build_method("dare_task_arithmetic", drop_rate=0.5, seed=5)


def sd_of(path):
    from pathlib import Path

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_same_output_for_1_and_2_threads_and_any_tensor_order(tiny_llama_pool, tmp_path):
    pool = tiny_llama_pool
    a = merge_models(pool.base, pool.models, DARE, tmp_path / "t1", threads=1)
    b = merge_models(pool.base, pool.models, DARE, tmp_path / "t2", threads=2)
    sa, sb = sd_of(a), sd_of(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    base, fts = sd_of(pool.base), {m: sd_of(p) for m, p in pool.models.items()}
    rev = lambda d: dict(reversed(list(d.items())))  # noqa: E731
    fwd = merge_state_dicts(base, fts, DARE)
    bwd = merge_state_dicts(rev(base), {m: rev(sd) for m, sd in reversed(list(fts.items()))}, DARE)
    assert all(torch.equal(fwd[k], bwd[k]) for k in fwd)
    assert all(torch.equal(fwd[k], sa[k]) for k in fwd)


def test_masks_do_not_depend_on_storage_dtype(tmp_path):
    p32 = make_tiny_pool(tmp_path / "f32", "llama", n_models=1, seed=1, noise=0.5)
    p16 = make_tiny_pool(tmp_path / "bf16", "llama", n_models=1, seed=1, noise=0.5, dtype=torch.bfloat16)
    m32 = merge_models(p32.base, p32.models, DARE, None)
    m16 = merge_models(p16.base, p16.models, DARE, None)
    b32, b16 = sd_of(p32.base), sd_of(p16.base)
    f32, f16 = sd_of(p32.models["ft0"]), sd_of(p16.models["ft0"])
    checked = 0
    for k in m32:
        live = (f32[k] != b32[k]) & (f16[k].float() != b16[k].float())  # entries with a delta in both
        kept32 = (m32[k].float() != b32[k]) & live
        kept16 = (m16[k].float() != b16[k].float()) & live
        assert torch.equal(kept32, kept16), k
        checked += int(live.sum())
    assert checked > 1000


def test_mask_of_a_model_does_not_depend_on_the_rest_of_the_pool(tiny_bert_pool):
    pool = tiny_bert_pool
    base = sd_of(pool.base)
    fts = {m: sd_of(p) for m, p in pool.models.items()}
    method = build_method("dare_task_arithmetic", drop_rate=0.7, seed=2)
    both = merge_state_dicts(base, fts, method, dtype="float64")
    alone = {m: merge_state_dicts(base, {m: fts[m]}, method, dtype="float64") for m in fts}
    for k, v in both.items():
        if k.startswith("classifier"):
            continue
        b = base[k].double()
        summed = b + (alone["ft0"][k].double() - b) + (alone["ft1"][k].double() - b)
        assert torch.allclose(v.double(), summed, atol=1e-6), k


def test_masks_of_different_models_are_independent():
    from dare_lab.ops import Sparsifier

    sp = Sparsifier("drop_only", 0.5)
    x = torch.ones(100_000)
    ma = sp.apply(x, 0, "model_a", "w") != 0
    mb = sp.apply(x, 0, "model_b", "w") != 0
    assert not torch.equal(ma, mb)
    both = (ma & mb).double().mean().item()  # independent: P = 0.25
    assert abs(both - 0.25) < 4 * math.sqrt(0.25 * 0.75 / x.numel())
    assert torch.equal(ma, sp.apply(x, 0, "model_a", "w") != 0)  # and reproducible
