"""Average, task arithmetic and TIES on hand-computed examples."""

import pytest
import torch

from dare_lab.ops.presets import PRESETS, build_method
from dare_lab.ops import MergeMethod, Merger, Sparsifier, average, task_arithmetic, ties, ties_trim

D1 = torch.tensor([3.0, -2.0, 1.0, 0.5])
D2 = torch.tensor([-1.0, 4.0, -1.0, 0.2])
D3 = torch.tensor([2.0, -1.0, -3.0, 0.1])
BASE = torch.tensor([10.0, 20.0, 30.0, 40.0])


def test_average_and_task_arithmetic():
    assert average(BASE, [D1, D2, D3]).tolist() == pytest.approx((BASE + (D1 + D2 + D3) / 3).tolist())
    assert task_arithmetic(BASE, [D1, D2], scaling=0.5).tolist() == pytest.approx([11.0, 21.0, 30.0, 40.35], abs=1e-5)
    assert task_arithmetic(BASE, [D1, D2], scaling=1.0, weights=[2.0, 0.0]).tolist() == [16.0, 16.0, 32.0, 41.0]


def test_ties_trim_elect_disjoint_mean_by_hand():
    # trim k=0.5 (2 of 4 per model): t1=[3,-2,0,0] t2=[-1,4,0,0] (tie |1| → lowest index) t3=[2,0,-3,0]
    # elect sign(Σ)=[+,+,-,0→majority +]; disjoint mean: [(3+2)/2, 4, -3, 0]
    out = ties(BASE, [D1, D2, D3], retain_ratio=0.5, scaling=1.0)
    assert out.tolist() == [12.5, 24.0, 27.0, 40.0]
    out = ties(BASE, [D1, D2, D3], retain_ratio=0.5, scaling=0.5)
    assert out.tolist() == [11.25, 22.0, 28.5, 40.0]
    assert ties(BASE, [D1, D2, D3], retain_ratio=0.5, merge_func="sum").tolist() == [15.0, 24.0, 27.0, 40.0]
    assert ties(BASE, [D1, D2, D3], retain_ratio=0.5, merge_func="max").tolist() == [13.0, 24.0, 27.0, 40.0]


def test_ties_weights_do_not_change_election_unless_asked():
    d1, d2 = torch.tensor([1.0]), torch.tensor([-2.0])
    base = torch.zeros(1)
    # unweighted election: 1 − 2 < 0 → only d2 agrees; weighted (3·1 − 2 > 0) → only d1
    assert ties(base, [d1, d2], retain_ratio=1.0, weights=[3.0, 1.0]).tolist() == [-2.0]
    assert ties(base, [d1, d2], retain_ratio=1.0, weights=[3.0, 1.0], weighted_election=True).tolist() == [3.0]


def test_ties_trim_is_per_tensor_not_global():
    big = torch.tensor([5.0, -6.0, 7.0, 8.0])
    small = torch.tensor([0.01, -0.02, 0.03, 0.04])
    per_tensor = [ties_trim(big, 0.5), ties_trim(small, 0.5)]
    # MergeLM-style global trim over the flattened pair keeps the top 50 % of all 8 entries
    flat = torch.cat([big, small])
    thr = flat.abs().sort(descending=True).values[3]
    global_trim = torch.where(flat.abs() >= thr, flat, torch.zeros(()))
    assert torch.equal(global_trim[4:], torch.zeros(4))  # global trim wipes the small tensor
    assert torch.equal(per_tensor[1], torch.tensor([0.0, 0.0, 0.03, 0.04]))
    assert per_tensor[0].tolist() == [0.0, 0.0, 7.0, 8.0]


def test_merge_method_applies_sparsifier_before_merger_with_per_model_masks():
    base = torch.zeros(1000, dtype=torch.float64)
    thetas = {"a": torch.full((1000,), 1.0, dtype=torch.float64), "b": torch.full((1000,), 1.0, dtype=torch.float64)}
    m = MergeMethod("x", Sparsifier("drop_only", 0.5), Merger("task_arithmetic", scaling=1.0), seed=7)
    out = m.merge_tensor("w", base, thetas)
    # each entry is m_a + m_b ∈ {0, 1, 2}; independent masks give all three values
    assert set(out.unique().tolist()) == {0.0, 1.0, 2.0}


def test_finetuned_target_sparsifies_theta_not_delta():
    base = torch.full((2000,), 1.0, dtype=torch.float64)
    theta = torch.full((2000,), 3.0, dtype=torch.float64)
    m = MergeMethod("x", Sparsifier("drop_only", 0.5, target="finetuned"), Merger("task_arithmetic"), seed=0)
    out = m.merge_tensor("w", base, {"a": theta})
    assert set(out.unique().tolist()) == {0.0, 3.0}  # dropped fine-tuned weights become 0, not θ_PRE


def test_presets_match_their_yaml_configs():
    from pathlib import Path

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1] / "configs" / "method"
    for name, preset in PRESETS.items():
        cfg = OmegaConf.load(root / f"{name}.yaml")
        assert cfg.name == name and cfg.sparsifier == preset["sparsifier"] and cfg.merger == preset["merger"]
        kwargs = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
        assert build_method(**kwargs).name == name


def test_build_method_errors():
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        build_method("nope")
    with pytest.raises(ValueError, match="no effect with sparsifier=none"):
        build_method("task_arithmetic", drop_rate=0.5)
    with pytest.raises(ValueError, match="retain_ratio=0.0"):
        build_method("ties", retain_ratio=0.0)
    with pytest.raises(ValueError, match=r"p=1.0 is outside \[0, 1\)"):
        build_method("dare_ties", drop_rate=1.0)
