"""DARE, DropOnly and magnitude pruning: exact values, exact counts, the Bernoulli law."""

import math

import pytest
import torch

from dare_lab.ops import dare, drop_only, keep_count, keep_mask, magnitude_prune, tensor_generator, tensor_seed


def gen(seed=0, model="m", tensor="t"):
    return tensor_generator(seed, model, tensor)


def test_seed_and_mask_are_pinned_for_a_seed():
    # Golden values: a change of hashing or sampler silently changes every published mask.
    assert tensor_seed(0, "m", "t") == 2797702680889235645
    mask = keep_mask((16,), 0.5, gen()).int().tolist()
    assert mask == [0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_dare_keep_rate_within_4_sigma_and_kept_entries_exact(p):
    n = 200_000
    delta = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 5.0  # no zeros
    out = dare(delta, p, gen(tensor=f"p{p}"))
    kept = out != 0
    rate = kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 4 * sigma
    assert torch.equal(out[kept], delta[kept] / (1 - p))
    assert out.dtype == torch.float64


def test_dare_is_unbiased_over_seeds():
    delta = torch.linspace(-1, 1, 64, dtype=torch.float64)
    acc = torch.zeros_like(delta)
    seeds = 4000
    for s in range(seeds):
        acc += dare(delta, 0.5, gen(seed=s))
    mean = acc / seeds
    # per entry: Var = δ²·p/(1−p) / seeds → σ ≤ 1/sqrt(4000) ≈ 0.016
    assert torch.allclose(mean, delta, atol=4 * 1.0 / math.sqrt(seeds))


def test_p_zero_is_identity_bit_for_bit():
    delta = torch.randn(33, 7)
    assert dare(delta, 0.0, gen()) is delta
    assert drop_only(delta, 0.0, gen()) is delta
    assert magnitude_prune(delta, 0.0) is delta


def test_drop_only_uses_dare_mask_without_rescale():
    delta = torch.randn(1000, dtype=torch.float64) + 3.0
    a = dare(delta, 0.7, gen())
    b = drop_only(delta, 0.7, gen())
    assert torch.equal(a != 0, b != 0)
    kept = b != 0
    assert torch.equal(b[kept], delta[kept])


def test_mask_draw_is_float32_whatever_the_input_dtype():
    # bf16 uniforms would make p=0.9 behave as 0.8999…; the mask must not depend on dtype.
    x32 = torch.randn(4096) + 4.0
    xb = x32.to(torch.bfloat16)
    m32 = dare(x32, 0.9, gen()) != 0
    mb = dare(xb, 0.9, gen()) != 0
    assert torch.equal(m32, mb)


@pytest.mark.parametrize("p,n", [(0.5, 10), (0.7, 10), (0.9, 10), (0.9, 1000), (0.99, 1000), (0.33, 7)])
def test_magnitude_prune_keeps_exactly_the_largest(p, n):
    delta = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    out = magnitude_prune(delta, p)
    k = math.ceil(round((1 - p) * n, 9))
    assert keep_count(n, p) == k
    kept = out != 0
    assert int(kept.sum()) == k
    expected = torch.argsort(delta.abs(), descending=True)[:k]
    assert set(expected.tolist()) == set(torch.nonzero(kept).flatten().tolist())
    assert torch.equal(out[kept], delta[kept])


def test_magnitude_prune_ties_break_by_lowest_index_and_optional_rescale():
    delta = torch.tensor([1.0, -2.0, 2.0, 1.0, -1.0, 0.5])
    out = magnitude_prune(delta, 0.5)  # keep 3: |2|,|2| and the first |1|
    assert out.tolist() == [1.0, -2.0, 2.0, 0.0, 0.0, 0.0]
    out = magnitude_prune(delta, 0.5, rescale=True)
    assert out.tolist() == [2.0, -4.0, 4.0, 0.0, 0.0, 0.0]


def test_keep_count_is_exact_on_decimal_rates():
    assert keep_count(10, 0.7) == 3  # float (1-0.7)*10 = 3.0000000000000004 would give 4
    assert keep_count(10, 0.9) == 1
    assert keep_count(3, 0.5) == 2
    assert keep_count(100, 0.99) == 1


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dare_rejects_drop_rates_outside_unit_interval(p):
    with pytest.raises(ValueError, match="drop rate"):
        dare(torch.ones(3), p, gen())


def test_drop_only_accepts_p_one_but_not_above():
    assert torch.equal(drop_only(torch.ones(5), 1.0, gen()), torch.zeros(5))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        drop_only(torch.ones(5), 1.01, gen())
