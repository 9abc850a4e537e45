"""The compiled MT19937 draws exactly torch.rand's uniforms (so DARE masks stay the same)."""

import types

import pytest
import torch

import dare_lab.ops.sparsify as sparsify
from dare_lab.engine import merge_state_dicts
from dare_lab.engine import kernels as fused
from dare_lab.ops import tensor_generator
from dare_lab.ops.method import MergeMethod, Merger, Sparsifier
from dare_lab.ops.sparsify import MaskStream

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="numba not installed")

PIECES = (1, 622, 1, 3000, 624, 50_000, 7)   # across state twists, at and off their borders


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32 + 5, 2**62 + 11])
def test_compiled_stream_equals_torch_rand_piece_by_piece(seed):
    gen = torch.Generator().manual_seed(seed)
    want = torch.rand(sum(PIECES), generator=gen)
    stream = MaskStream(0.9, torch.Generator().manual_seed(seed), kernels=fused)
    assert stream.mt is not None
    got = torch.cat([stream.uniforms(k) for k in PIECES])
    assert torch.equal(got, want)


def test_compiled_stream_fills_a_workspace_and_gives_the_same_mask():
    stream = MaskStream(0.8, tensor_generator(3, "m0", "w"), kernels=fused)
    buf = torch.full((5000,), -1.0)
    u = stream.uniforms(4000, buf)
    assert u.data_ptr() == buf.data_ptr() and (buf[4000:] == -1).all()
    torch_stream = MaskStream(0.8, tensor_generator(3, "m0", "w"))
    assert torch.equal(u, torch_stream.uniforms(4000))
    assert torch.equal(stream.mask(777), torch_stream.mask(777))


def test_a_generator_already_drawn_from_keeps_torch_draws():
    gen = torch.Generator().manual_seed(9)
    torch.rand(10, generator=gen)
    stream = MaskStream(0.5, gen, kernels=fused)
    assert stream.mt is None
    expect = torch.Generator().manual_seed(9)
    torch.rand(10, generator=expect)
    assert torch.equal(stream.uniforms(100), torch.rand(100, generator=expect))


def test_a_stream_that_differs_from_torch_is_never_used():
    """A torch whose CPU generator changed: the self-check fails and torch.rand stays in use."""
    def wrong(state, out):
        fused.mt_uniforms(state, out)
        out[3] = 0.5
    broken = types.ModuleType("broken")
    broken.MT_N, broken.mt_seed, broken.mt_uniforms = fused.MT_N, fused.mt_seed, wrong
    assert sparsify.compiled_rand_is_torchs(fused)
    assert not sparsify.compiled_rand_is_torchs(broken)
    stream = MaskStream(0.5, torch.Generator().manual_seed(4), kernels=broken)
    assert stream.mt is None
    assert torch.equal(stream.uniforms(10), torch.rand(10, generator=torch.Generator().manual_seed(4)))


def test_streamed_dare_merges_draw_from_the_compiled_stream(monkeypatch):
    from dare_lab.engine import warmup

    monkeypatch.setattr(warmup, "MODE", "wait")  # compiled from the first tensor (no background rehearsal)
    calls = []
    orig = fused.mt_uniforms
    monkeypatch.setattr(fused, "mt_uniforms", lambda state, out: calls.append(out.shape[0]) or orig(state, out))
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(300, 200, generator=g)}
    models = {m: {"w": base["w"] + 0.01 * torch.randn(300, 200, generator=g)} for m in ("a", "b")}
    # TIES with a trim draws each mask twice: once for the thresholds of the sparsified δ, once to merge
    for merger, passes in ((Merger("task_arithmetic"), 1), (Merger("task_arithmetic", weights=(0.5, 2.0)), 1),
                           (Merger("ties", retain_ratio=1.0), 1), (Merger("ties", retain_ratio=0.5), 2)):
        calls.clear()
        merge_state_dicts(base, models, MergeMethod("d", Sparsifier("dare", 0.9), merger, seed=1))
        assert sum(calls) == passes * 2 * 300 * 200, merger
