"""Mask samplers: the streamed masks equal whole-tensor masks, and 'geometric' has the Bernoulli(1−p) law.

The geometric sampler draws the gap before each kept entry, G = ⌊ln(1−u)/ln p⌋, so its masks
differ from torch_rand's; what must hold is the law: every entry kept independently with
probability 1−p. Checked with tolerance bands of 4–5 σ (false alarm rate < 1e-4 per check).
"""

import math

import pytest
import torch

from dare_lab.ops import tensor_generator
from dare_lab.ops.method import MergeMethod, Sparsifier
from dare_lab.ops.sparsify import SAMPLERS, MaskStream, keep_mask


def gen(seed=0, model="m", tensor="t"):
    return tensor_generator(seed, model, tensor)


def test_samplers_registered_and_torch_rand_is_default():
    assert SAMPLERS[0] == "torch_rand" and "geometric" in SAMPLERS
    assert Sparsifier("dare", 0.9).sampler == "torch_rand"
    assert MergeMethod(sparsifier=Sparsifier("dare", 0.9, sampler="geometric")).describe()["sparsifier"]["sampler"] == "geometric"


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
def test_stream_in_chunks_equals_whole_tensor_mask(sampler, p):
    n = 300_007
    whole = keep_mask((n,), p, gen(tensor=f"{p}"), sampler)
    for sizes in ([4096] * 100, [1, 17, 65_536, 100_000, 7]):
        stream = MaskStream(p, gen(tensor=f"{p}"), sampler, n)
        parts, done = [], 0
        for size in sizes + [n]:
            size = min(size, n - done)
            if size <= 0:
                break
            parts.append(stream.mask(size))
            done += size
        assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_geometric_keep_rate(p):
    n = 2_000_000
    rate = keep_mask((n,), p, gen(tensor=f"rate{p}"), "geometric").double().mean().item()
    assert abs(rate - (1 - p)) < 4.5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_geometric_gaps_are_geometric_chi_square(p):
    n = 3_000_000
    idx = torch.nonzero(keep_mask((n,), p, gen(tensor=f"gap{p}"), "geometric")).flatten()
    gaps = torch.diff(idx) - 1                       # dropped entries between kept ones
    m = gaps.numel()
    # bins of equal expected mass under P(G ≥ g) = p^g, last bin open-ended
    bins = 20
    edges = [0]
    for b in range(1, bins):
        edges.append(max(edges[-1] + 1, math.ceil(math.log(1 - b / bins) / math.log(p))))
    chi2, dof = 0.0, 0
    for b in range(len(edges)):
        lo, hi = edges[b], edges[b + 1] if b + 1 < len(edges) else None
        expected = m * (p ** lo - (p ** hi if hi is not None else 0.0))
        observed = int(((gaps >= lo) & (gaps < hi)).sum()) if hi is not None else int((gaps >= lo).sum())
        chi2 += (observed - expected) ** 2 / expected
        dof += 1
    dof -= 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_geometric_entries_independent(p):
    n = 2_000_000
    x = keep_mask((n,), p, gen(tensor=f"ind{p}"), "geometric").double()
    q = 1 - p
    sd = math.sqrt(p * q)
    for lag in (1, 2, 3, 64):
        cov = ((x[lag:] - q) * (x[:-lag] - q)).mean().item()
        assert abs(cov / (sd * sd)) < 5 / math.sqrt(n), lag
    # pairs of consecutive entries: all four outcomes at their product probabilities
    a, b = x[0::2].bool(), x[1::2].bool()
    m = a.numel()
    for va in (False, True):
        for vb in (False, True):
            pr = (q if va else p) * (q if vb else p)
            got = int(((a == va) & (b == vb)).sum())
            assert abs(got - m * pr) < 5 * math.sqrt(m * pr * (1 - pr))


def test_geometric_first_positions_and_seeds_uniform():
    # position bias at the start of a tensor (e.g. an off-by-one in the first gap) and
    # independence across tensors/models: the first 8 entries over many seeds are kept at rate 1−p
    p, seeds = 0.7, 5_000
    hits = torch.zeros(8, dtype=torch.float64)
    both = 0
    for s in range(seeds):
        a = keep_mask((8,), p, gen(seed=s, model="a"), "geometric")
        b = keep_mask((8,), p, gen(seed=s, model="b"), "geometric")
        hits += a.double()
        both += int(a[0] and b[0])
    q = 1 - p
    assert torch.all((hits / seeds - q).abs() < 4.5 * math.sqrt(p * q / seeds))
    assert abs(both / seeds - q * q) < 4.5 * math.sqrt(q * q * (1 - q * q) / seeds)


def test_geometric_edge_rates():
    assert not keep_mask((1000,), 1.0, gen(), "geometric").any()
    assert MaskStream(0.0, gen(), "geometric").indices(5).tolist() == [0, 1, 2, 3, 4]
