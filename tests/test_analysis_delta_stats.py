"""Delta statistics: exact deciles on a constructed delta, seeded sampling, verdicts."""

import math

import numpy as np
import pytest
import torch

from dare_lab.analysis.delta_stats import DECILES, delta_statistics, verdict
from dare_lab.engine import StateDictSource


def _pair(deltas: dict[str, torch.Tensor], base_scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {k: base_scale * torch.randn(v.shape, generator=g) for k, v in deltas.items()}
    ft = {k: base[k] + v for k, v in deltas.items()}
    return StateDictSource(base, "base"), StateDictSource(ft, "ft")


def _known_deltas():
    # 1001 values -0.005 … +0.005 in steps of 1e-5, shuffled over two tensors: the q-quantile
    # (linear interpolation) is exactly -0.005 + q·0.01.
    vals = (torch.arange(1001, dtype=torch.float64) - 500) * 1e-5
    perm = torch.randperm(1001, generator=torch.Generator().manual_seed(1))
    vals = vals[perm].float()
    return {"layer.0.weight": vals[:600].reshape(20, 30), "layer.1.weight": vals[600:].reshape(401)}


def test_exact_deciles_on_constructed_delta():
    base, ft = _pair(_known_deltas(), base_scale=0.0)  # base = 0: no float rounding in θ − θ_PRE
    st = delta_statistics(base, ft, "ft", fraction=1.0)
    assert st.n_total == 1001 and st.n_sampled == 1001 and st.n_tensors == 2
    for q in DECILES:
        assert st.quantiles[q] == pytest.approx(-0.005 + q * 0.01, abs=1e-7), q
    row = st.decile_row()
    assert list(row) == ["model", *[f"{i * 10}%" for i in range(11)]]
    assert row["50%"] == pytest.approx(0.0, abs=1e-7) and row["100%"] == pytest.approx(0.005, abs=1e-7)
    # exact threshold shares: |δ| ≤ 0.002 holds for 401 of 1001 values (−200 … 200 steps)
    assert st.share_within(0.002) == pytest.approx(401 / 1001, abs=2 / 1001)
    assert st.share_within(0.005) == 1.0
    assert st.hist.sum() == 1001


def test_sampling_fraction_respected_and_seeded():
    g = torch.Generator().manual_seed(3)
    deltas = {f"t{i}": 0.001 * torch.randn(200, 100, generator=g) for i in range(5)}  # 100k entries
    base, ft = _pair(deltas)
    a = delta_statistics(base, ft, "ft", fraction=0.1, seed=0, keep_sample=True)
    b = delta_statistics(base, ft, "ft", fraction=0.1, seed=0, keep_sample=True)
    c = delta_statistics(base, ft, "ft", fraction=0.1, seed=1, keep_sample=True)
    n = a.n_total
    assert n == 100_000
    # binomial(100k, 0.1): sd ≈ 95; 5 sd tolerance
    assert abs(a.n_sampled - 0.1 * n) < 5 * math.sqrt(n * 0.1 * 0.9)
    assert np.array_equal(a.sample, b.sample) and a.quantiles == b.quantiles
    assert not np.array_equal(a.sample[:100], c.sample[:100])
    # exact parts do not depend on sampling
    assert a.min == c.min and a.max == c.max and a.below == c.below
    # the sampled deciles estimate the true ones
    full = torch.cat([v.flatten() for v in deltas.values()]).double().numpy()
    for q in (0.1, 0.5, 0.9):
        assert a.quantiles[q] == pytest.approx(np.quantile(full, q), abs=2e-4)


def test_sample_cap_thins_uniformly():
    g = torch.Generator().manual_seed(4)
    deltas = {"a": 0.001 * torch.randn(50_000, generator=g), "b": 0.001 * torch.randn(50_000, generator=g)}
    base, ft = _pair(deltas)
    st = delta_statistics(base, ft, "ft", fraction=1.0, max_samples=20_000)
    assert st.n_sampled <= 20_000 and st.n_sampled > 5_000
    assert st.effective_fraction < 1.0
    assert st.quantiles[0.5] == pytest.approx(0.0, abs=1e-4)


def test_verdicts_small_large_and_wrong_backbone():
    g = torch.Generator().manual_seed(5)
    small = _pair({"w": 0.0005 * torch.randn(100, 100, generator=g)})
    st = delta_statistics(*small, "sft", fraction=1.0)
    assert "within 0.002" in verdict(st) and st.warnings == []
    mid = _pair({"w": 0.006 * torch.randn(100, 100, generator=g)})
    st = delta_statistics(*mid, "cpt", fraction=1.0)
    assert "may fail" in verdict(st)
    # deltas as large as the weights: the "base" is not this model's backbone
    wrong = _pair({"w": 0.05 * torch.randn(100, 100, generator=g)}, base_scale=0.05)
    st = delta_statistics(*wrong, "other", fraction=1.0)
    assert any("not this model's real backbone" in w for w in st.warnings)
    assert "expected to fail" in verdict(st)


def test_heads_are_out_of_scope_and_names_align():
    g = torch.Generator().manual_seed(6)
    base = {"encoder.w": torch.randn(10, 10, generator=g)}
    ft = {"bert.encoder.w": base["encoder.w"] + 0.001, "classifier.weight": torch.randn(3, 10, generator=g)}
    st = delta_statistics(StateDictSource(base, "b"), StateDictSource(ft, "f"), "f", fraction=1.0)
    assert st.n_total == 100 and st.min == pytest.approx(0.001, abs=1e-6)
