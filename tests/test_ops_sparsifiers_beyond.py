"""DELLA (MagPrune), Model Breadcrumbs and DAREx-q against direct references (issue 16).

References are written out independently of dare_lab.ops.sparsify: magnitude ranks by a
Python sort on (|x|, index), keep probabilities and rescale factors from the formulas,
kept index sets for a fixed seed, and the DAREx q rule by brute force over a grid.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dare_lab.ops import breadcrumbs, dare, darex, darex_auto_q, della, della_drop_probabilities, drop_only
from dare_lab.ops import magnitude_prune, tensor_generator
from dare_lab.ops.method import DETERMINISTIC_KINDS, SPARSIFIERS, STREAMED_KINDS, MergeMethod, Merger, Sparsifier
from dare_lab.ops.presets import PRESETS, build_method
from dare_lab.ops.sparsify import breadcrumbs_counts, magnitude_rank_norm

NEW_PRESETS = ("della_task_arithmetic", "della_ties", "breadcrumbs_task_arithmetic", "breadcrumbs_ties",
               "darex_task_arithmetic", "darex_ties")


def gen(seed=0, model="m", tensor="t"):
    return tensor_generator(seed, model, tensor)


# ----------------------------------------------------------------------------- references


def ref_rank_norm(values):
    """r̃_i = position of i in the order (|x| ascending, index descending) / (n − 1)."""
    n = len(values)
    order = sorted(range(n), key=lambda i: (abs(values[i]), -i))
    rank = [0] * n
    for pos, i in enumerate(order):
        rank[i] = pos
    return [r / (n - 1) for r in rank]


def ref_della(x, p, eps, seed, model, name):
    """DELLA written out: keep iff u ≥ p_i (u float32 per-tensor stream), survivors ÷ (1 − p_i)."""
    flat = x.flatten().tolist()
    drop = torch.tensor([p + eps - 2 * eps * r for r in ref_rank_norm(flat)], dtype=torch.float64)
    u = torch.rand(x.numel(), generator=tensor_generator(seed, model, name), dtype=torch.float32)
    keep = u >= drop.to(torch.float32)
    vals = x.flatten() / (1 - drop).to(torch.float32)
    return torch.where(keep, vals, torch.zeros(())).view_as(x), keep.view_as(x), drop.view_as(x)


def ref_breadcrumbs_kept(values, p, gamma):
    """Kept index set: order by (|x| descending, index ascending); drop the first t, keep the next k."""
    import math
    from fractions import Fraction
    n = len(values)
    k = math.ceil((1 - Fraction(repr(p))) * n)
    t = min(math.floor(Fraction(repr(gamma)) * n), n - k)
    order = sorted(range(n), key=lambda i: (-abs(values[i]), i))
    return set(order[t:t + k])


# ----------------------------------------------------------------------------- DELLA


def test_della_keep_probabilities_follow_magnitude_rank_with_lowest_index_ties():
    x = torch.tensor([0.3, -0.1, 0.5, 0.1, -0.2])
    # |x| ascending, ties: the lower index ranks higher (MP keeps the lowest index first):
    # 3 (.1), 1 (.1), 4 (.2), 0 (.3), 2 (.5) -> r̃ = [.75, .25, 1, 0, .5]
    assert magnitude_rank_norm(x).tolist() == [0.75, 0.25, 1.0, 0.0, 0.5]
    keep = 1 - della_drop_probabilities(x, 0.6, 0.2)
    torch.testing.assert_close(keep, torch.tensor([0.5, 0.3, 0.6, 0.2, 0.4], dtype=torch.float64), rtol=0, atol=1e-12)
    assert keep.min() > 0 and keep.max() <= 1
    # keep probabilities average to 1 − p (ranks spread evenly over [0, 1])
    y = torch.randn(1001)
    assert abs(float((1 - della_drop_probabilities(y, 0.9, 0.05)).mean()) - 0.1) < 1e-12


def test_della_mask_and_rescale_match_the_written_out_reference():
    torch.manual_seed(0)
    x = torch.randn(37, 23)
    x[0, :5] = 0.25                                  # ties
    for p, eps in ((0.5, 0.3), (0.9, 0.05), (0.99, 0.004)):
        got = della(x, p, eps, tensor_generator(4, "math", "w"), scope="tensor")
        ref, keep, drop = ref_della(x, p, eps, 4, "math", "w")
        assert torch.equal(got != 0, keep)            # exact kept index set for this seed
        assert torch.equal(got, ref)
        kept = keep & (x != 0)
        factors = got[kept] / x[kept]                 # each survivor ÷ its own keep probability
        torch.testing.assert_close(factors.double(), 1 / (1 - drop[kept]), rtol=1e-6, atol=0)


def test_della_keeps_large_magnitudes_more_often():
    x = torch.linspace(-1, 1, 20001)
    got = della(x, 0.5, 0.4, gen())
    small, large = x.abs() < 0.2, x.abs() > 0.8
    frac_small = float((got[small] != 0).float().mean())
    frac_large = float((got[large] != 0).float().mean())
    assert frac_small < 0.25 < 0.75 < frac_large   # keep ≈ 0.1..0.26 vs 0.74..0.9


def test_della_row_scope_ranks_each_row_alone():
    x = torch.tensor([[1.0, 2.0, 3.0], [30.0, 20.0, 10.0]])
    assert magnitude_rank_norm(x, "row").tolist() == [[0.0, 0.5, 1.0], [1.0, 0.5, 0.0]]
    assert magnitude_rank_norm(x, "tensor").tolist() == [[0.0, 0.2, 0.4], [1.0, 0.8, 0.6]]


def test_della_row_scope_mask_matches_per_row_reference():
    torch.manual_seed(3)
    x = torch.randn(6, 9)
    p, eps = 0.7, 0.25
    drop = torch.tensor([[p + eps - 2 * eps * r for r in ref_rank_norm(row.tolist())] for row in x], dtype=torch.float64)
    u = torch.rand(x.shape, generator=tensor_generator(0, "m", "w"), dtype=torch.float32)
    ref = torch.where(u >= drop.to(torch.float32), x / (1 - drop).to(torch.float32), torch.zeros(()))
    assert torch.equal(della(x, p, eps, tensor_generator(0, "m", "w"), scope="row"), ref)


def test_della_is_unbiased_per_entry():
    x = torch.randn(40)
    acc = torch.zeros(40, dtype=torch.float64)
    n = 4000
    for s in range(n):
        acc += della(x, 0.8, 0.15, tensor_generator(s, "m", "w")).double()
    # E[m_i / (1 − p_i)] = 1: the mean over seeds approaches δ (standard error ≈ |δ|·sqrt(p_i/(1−p_i)/n))
    keep = 1 - della_drop_probabilities(x, 0.8, 0.15)
    se = x.abs().double() * torch.sqrt((1 - keep) / keep / n)
    assert bool(((acc / n - x.double()).abs() <= 5 * se + 1e-12).all())


def test_della_epsilon_zero_is_dare_and_p_zero_is_identity():
    x = torch.randn(64, 33)
    for p in (0.3, 0.9):
        assert torch.equal(della(x, p, 0.0, gen()), dare(x, p, gen()))
    assert della(x, 0.0, 0.0, gen()) is x


# ----------------------------------------------------------------------------- Breadcrumbs


def test_breadcrumbs_exact_kept_set_with_ties_at_both_cuts():
    vals = [0.9, -0.9, 0.9, 0.5, 0.1, -0.1, 0.1, 0.3, 0.2, -0.05, 0.7, 0.6, 0.4, 0.1, 0.8, -0.2, 0.35, 0.15, 0.25, 0.1]
    x = torch.tensor(vals)
    # n = 20, p = 0.5, γ = 0.1: t = 2 outliers (indices 0 and 1 of the three 0.9s), k = 10 kept
    assert breadcrumbs_counts(20, 0.5, 0.1) == (2, 10, 8)
    got = breadcrumbs(x, 0.5, 0.1)
    kept = set(torch.nonzero(got).flatten().tolist())
    assert kept == ref_breadcrumbs_kept(vals, 0.5, 0.1)
    assert 2 in kept and 0 not in kept and 1 not in kept
    assert torch.equal(got[list(kept)], x[list(kept)])             # no rescale by default
    for p, g in ((0.9, 0.05), (0.3, 0.5), (0.75, 0.0), (0.99, 0.01)):
        y = torch.randn(400).round(decimals=1)                       # many ties
        kept = set(torch.nonzero(breadcrumbs(y, p, g)).flatten().tolist())
        nonzero_ref = {i for i in ref_breadcrumbs_kept(y.tolist(), p, g) if y[i] != 0}
        assert kept == nonzero_ref, (p, g)


def test_breadcrumbs_counts_gamma_zero_identity_and_rescale():
    assert breadcrumbs_counts(20, 0.1, 0.5) == (2, 18, 0)           # outliers capped at n − k
    assert breadcrumbs_counts(1000, 0.9, 0.01) == (10, 100, 890)
    x = torch.randn(50, 7)
    assert torch.equal(breadcrumbs(x, 0.8, 0.0), magnitude_prune(x, 0.8))
    assert breadcrumbs(x, 0.0, 0.3) is x
    plain, scaled = breadcrumbs(x, 0.8, 0.02), breadcrumbs(x, 0.8, 0.02, rescale=True)
    assert torch.equal(scaled, torch.where(plain != 0, x / (1 - 0.8), torch.zeros(())))


# ----------------------------------------------------------------------------- DAREx-q


def test_darex_rescales_by_one_over_q_on_dares_mask():
    x = torch.randn(80, 41)
    p = 0.99
    d = dare(x, p, gen(1, "code", "w"))
    got = darex(x, p, gen(1, "code", "w"), q=0.25)
    assert torch.equal(got != 0, d != 0)
    assert torch.equal(got, torch.where(d != 0, x / 0.25, torch.zeros(())))
    assert torch.equal(darex(x, p, gen(1, "code", "w"), q=1 - p), d)   # q = 1 − p: DARE bit for bit
    assert torch.equal(darex(x, p, gen(1, "code", "w"), q=0.01), d)    # the decimal 1 − p
    assert torch.equal(darex(x, p, gen(1, "code", "w"), q=1.0), drop_only(x, p, gen(1, "code", "w")))
    assert darex(x, 0.0, gen(), q=1.0) is x


def _mean_square_change(d, p, q):
    """E‖h‖², h_i = Σ_j (m_ij/q − 1) δ_ij: written out from the mask's first two moments."""
    c = 1 - p
    rows = d.double().reshape(d.shape[0], -1) if d.dim() >= 2 else d.double().reshape(-1, 1)
    mean = (c / q - 1) * rows.sum(1)
    var = (p * c / q ** 2) * rows.square().sum(1)
    return float((mean.square() + var).sum())


def test_darex_auto_q_minimises_the_output_change_and_is_clipped():
    torch.manual_seed(1)
    for d in (torch.randn(30, 50) * 0.01 + 0.004, torch.randn(30, 50) * 0.01 + 0.001, torch.randn(16, 8, 3)):
        for p in (0.5, 0.9, 0.99):
            q = darex_auto_q(d, p)
            assert 1 - p - 1e-15 <= q <= 1.0
            grid = torch.linspace(1 - p, 1.0, 2001).tolist()
            best = min(grid, key=lambda g: _mean_square_change(d, p, g))
            assert _mean_square_change(d, p, q) <= _mean_square_change(d, p, best) * (1 + 1e-9)
    # closed form on constant rows: A = R·(m v)², B = R·m·v² -> q = (1 − p) + p/m
    assert darex_auto_q(torch.full((4, 10), 0.3), 0.9) == pytest.approx(0.1 + 0.9 / 10, rel=1e-12)
    assert darex_auto_q(torch.tensor([[1.0, -1.0], [2.0, -2.0]]), 0.9) == 1.0          # row sums cancel
    assert darex_auto_q(torch.randn(100), 0.9) == pytest.approx(1.0)                   # 1-D: each entry alone
    assert darex_auto_q(torch.zeros(3, 3), 0.9) == 1.0


def test_darex_per_model_q_through_the_sparsifier():
    x = torch.randn(20, 10)
    sp = Sparsifier(kind="darex", drop_rate=0.9, rescale_q={"a": 0.2, "b": "auto"})
    ga = sp.apply(x, 3, "a", "w")
    ref = darex(x, 0.9, tensor_generator(3, "a", "w"), q=0.2)
    assert torch.equal(ga, ref)
    gb = sp.apply(x, 3, "b", "w")
    assert torch.equal(gb, darex(x, 0.9, tensor_generator(3, "b", "w"), q=darex_auto_q(x, 0.9)))
    with pytest.raises(ValueError, match="no value for model 'c'"):
        sp.apply(x, 3, "c", "w")


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="della", drop_rate=0.9, epsilon=0.2), r"epsilon=0.2 at p=0.9 must satisfy"),
    (dict(kind="della", drop_rate=0.3, epsilon=0.31), r"epsilon=0.31 at p=0.3"),
    (dict(kind="della", drop_rate=0.99, epsilon=0.01), r"epsilon=0.01 at p=0.99"),
    (dict(kind="della", drop_rate=0.9, epsilon=-0.01), r"epsilon=-0.01"),
    (dict(kind="della", drop_rate=1.0), r"outside \[0, 1\)"),
    (dict(kind="della", drop_rate=0.9, rank_scope="col"), r"rank_scope 'col'"),
    (dict(kind="dare", drop_rate=0.9, rank_scope="tensor"), r"rank_scope='tensor' applies only to sparsifier=della"),
    (dict(kind="della", drop_rate=0.9, sampler="geometric"), r"not available for sparsifier=della"),
    (dict(kind="breadcrumbs", drop_rate=0.9, gamma=1.0), r"gamma=1.0 is outside \[0, 1\)"),
    (dict(kind="breadcrumbs", drop_rate=1.0, rescale=True), r"outside \[0, 1\)"),
    (dict(kind="darex", drop_rate=0.9, rescale_q=0.05), r"rescale_q=0.05 is outside \[1-p, 1\] = \[0.1, 1\]"),
    (dict(kind="darex", drop_rate=0.9, rescale_q=1.5), r"rescale_q=1.5 is outside"),
    (dict(kind="darex", drop_rate=0.9, rescale_q="median"), r"must be a number in \[1-p, 1\] or 'auto'"),
    (dict(kind="darex", drop_rate=0.9, rescale_q={"a": 0.01}), r"outside .* \(model 'a'\)"),
    (dict(kind="dare", drop_rate=0.9, epsilon=0.01), r"epsilon=0.01 applies only to sparsifier=della"),
    (dict(kind="magnitude", drop_rate=0.9, gamma=0.01), r"gamma=0.01 applies only to sparsifier=breadcrumbs"),
    (dict(kind="della", drop_rate=0.9, rescale_q=0.5), r"rescale_q=0.5 applies only to sparsifier=darex"),
])
def test_bad_knobs_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        Sparsifier(**kwargs)
    assert "\n" not in str(e.value)


def test_presets_defaults_and_p_zero_identity():
    assert {"della", "breadcrumbs", "darex"} <= set(SPARSIFIERS)
    assert not {"della", "breadcrumbs", "darex"} & set(STREAMED_KINDS)
    assert "breadcrumbs" in DETERMINISTIC_KINDS
    for name in NEW_PRESETS:
        assert name in PRESETS
        assert Path(f"configs/method/{name}.yaml").exists() or (Path(__file__).parents[1] / "configs" / "method" / f"{name}.yaml").exists()
        m = build_method(name)
        assert not m.sparsifier.streamed
        x = torch.randn(9, 4)
        zero = build_method(name, drop_rate=0.0)
        assert zero.sparsifier.apply(x, 0, "a", "t") is x
    assert build_method("della_ties").sparsifier.della_epsilon == pytest.approx(0.05)
    assert build_method("breadcrumbs_ties").sparsifier.outlier_fraction == 0.01
    assert build_method("della_ties").sparsifier.rank_scope == "row"          # the DELLA authors' della
    # DELLA's own merge: elect + disjoint mean with no second trim; other TIES presets keep 0.2
    assert build_method("della_ties").merger.retain_ratio == 1.0 == build_method("breadcrumbs_ties").merger.retain_ratio
    assert build_method("dare_ties").merger.retain_ratio == 0.2 == build_method("darex_ties").merger.retain_ratio
    assert build_method("della_ties", retain_ratio=0.3).merger.retain_ratio == 0.3
    assert build_method("darex_ties", drop_rate=0.99, rescale_q=0.02).sparsifier.q_for("x") == 0.02


def test_analyses_build_single_model_methods_for_the_new_kinds():
    from dare_lab.analysis.redundancy import DETERMINISTIC, single_model_method

    assert "breadcrumbs" in DETERMINISTIC and "della" not in DETERMINISTIC
    m = single_model_method("della", 0.99, seed=2, knobs={"epsilon": 0.005})
    assert m.sparsifier.kind == "della" and m.sparsifier.della_epsilon == 0.005
    assert single_model_method("della", 0.0, knobs={"epsilon": 0.005}).sparsifier.kind == "none"
    assert single_model_method("darex", 0.999).sparsifier.q_for("a") == "auto"
    assert single_model_method("breadcrumbs", 0.9, knobs={"gamma": 0.05}).sparsifier.outlier_fraction == 0.05


# ----------------------------------------------------------------------------- engine end to end


def _load(path):
    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_engine_merge_equals_merge_tensor_per_tensor(tiny_bert_pool, preset):
    from dare_lab.engine import merge_models

    pool = tiny_bert_pool
    method = build_method(preset, drop_rate=0.9, seed=5, scaling=0.7, retain_ratio=0.5)
    out = merge_models(pool.base, dict(pool.models), method, None, threads=1)
    base, fts = _load(pool.base), {m: _load(p) for m, p in sorted(pool.models.items())}
    merged = 0
    for name, b in base.items():
        if name not in out:
            continue
        if name.startswith("classifier") or not b.is_floating_point():
            assert torch.equal(out[name], b), name
            continue
        expect = method.merge_tensor(name, b.float(), {m: sd[name].float() for m, sd in fts.items()}).to(b.dtype)
        assert torch.equal(out[name], expect), name
        merged += 1
    assert merged > 10


class _KeptShare:
    """Scores a sparsified single model by the share of one weight's delta entries that survived."""

    W = "bert.encoder.layer.0.intermediate.dense.weight"

    def __init__(self, base_sd):
        self.base = base_sd

    def evaluate_state_dict(self, body, pool, label="m"):
        (name,) = pool.models
        return {f"{name}/kept": (body[self.W] != self.base[self.W]).double().mean().item()}


def test_redundancy_curves_run_the_new_kinds(tiny_bert_pool, tmp_path):
    from dare_lab.analysis.redundancy import redundancy_curves

    pool = tiny_bert_pool
    rows = redundancy_curves(pool, _KeptShare(_load(pool.base)), methods=("della", "breadcrumbs", "darex"),
                             drop_rates=(0.0, 0.9, 0.99), seeds=(0, 1), models=["ft0"], work_dir=tmp_path, log=None,
                             knobs={"della": {"epsilon": 0.005}, "breadcrumbs": {"gamma": 0.05}})
    seeds = {(r["method"], r["p"]): sorted(x["seed"] for x in rows if (x["method"], x["p"]) == (r["method"], r["p"]))
             for r in rows}
    assert seeds[("breadcrumbs", 0.9)] == [0] and seeds[("della", 0.9)] == [0, 1] and seeds[("darex", 0.99)] == [0, 1]
    kept = {(r["method"], r["p"], r["seed"]): r["value"] for r in rows}
    assert kept[("breadcrumbs", 0.9, 0)] == pytest.approx(0.1, abs=1e-3)   # exact count ⌈0.1·n⌉ of n
    assert 0.07 < kept[("della", 0.9, 0)] < 0.13 and 0.003 < kept[("darex", 0.99, 1)] < 0.02
    assert kept[("della", 0.0, 0)] > 0.99                                   # p = 0 is the SFT model
