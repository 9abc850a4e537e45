"""DAREx-q's own choices of q (Deng et al. 2024; official code vengdeng/DAREx) against direct
references: the validation grid search, the analytical per-layer rule, and their resolution
into a merge (exact q for constructed cases, exact masks and rescale for a seed)."""
import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dare_lab.analysis.darex_q import SEARCH_SEED, layer_qs, mean_linear_inputs, needs_resolution, resolve_rescale_q
from dare_lab.ops.darex_q import (analytical_q_grid, bernoulli_phi, darex_analytical_q, darex_analytical_q_rows,
                                  q_grid_search)
from dare_lab.ops.method import Sparsifier
from dare_lab.ops.presets import build_method
from dare_lab.ops.seeding import tensor_generator
from dare_lab.ops.sparsify import darex


# --- the validation grid search (official find_optimal_param) ---------------------------------

def test_q_grid_search_coarse_then_fine_exact_path():
    seen = []

    def score(q):
        seen.append(q)
        return -abs(q - 0.37)

    q, hist = q_grid_search(score, lower=0.01)
    # pass 1: 0.01, 0.11, …; best 0.41; four worse in a row (0.51 … 0.81) stop it. Pass 2 from
    # max(0.01 + 0.01, 0.41 - 0.09) = 0.32 in steps of 0.01: best 0.37; 0.38 … 0.41 (0.41 already
    # scored, not again) stop it
    coarse = [round(0.01 + 0.1 * i, 2) for i in range(9)]
    fine = [round(0.32 + 0.01 * i, 2) for i in range(9)]
    assert [round(v, 10) for v in seen] == coarse + fine
    assert q == pytest.approx(0.37, abs=1e-12)
    assert [h[0] for h in hist] == seen                       # every q once, in order
    assert max(hist, key=lambda h: h[1])[0] == q


def test_q_grid_search_ties_keep_the_first_and_bounds_hold():
    q, hist = q_grid_search(lambda q: 1.0, lower=0.1)
    assert q == pytest.approx(0.1)                            # constant score: the first q evaluated
    assert all(0.1 - 1e-12 <= h[0] <= 1.0 + 1e-12 for h in hist)
    q, hist = q_grid_search(lambda q: q, lower=0.5)           # increasing: the upper end, 1.0
    assert q == pytest.approx(1.0)
    assert max(h[0] for h in hist) <= 1.0 + 1e-12
    with pytest.raises(ValueError, match="step > 0"):
        q_grid_search(lambda q: q, lower=0.5, step=0.0)


# --- the analytical per-layer rule (official analytical_resolve_new) --------------------------

def reference_rows(c: np.ndarray, p: float, eta: float, prob: float = 0.95, stop: float = 0.8) -> np.ndarray:
    """The official loop, written out in numpy float64."""
    keep = 1 - p
    q_o = np.full(c.shape[0], keep)
    best = np.full(c.shape[0], 10000.0)
    stopped = np.zeros(c.shape[0])
    phi = 0.5 if p == 0.5 else (1 - 2 * p) / math.log((1 - p) / p)   # p = ½: the limit (official: 0/0)
    start = math.ceil(round((1 - p) * 1000, 9))
    for k in range(start, 999):
        q = k * 0.001
        t1 = (1 - keep / q) * c.sum(axis=1)
        t2 = eta ** 2 * phi * (c ** 2).sum(axis=1) / (4 * q ** 2) + math.log(2 / (1 - prob))
        res = np.abs(eta * t1 + t2)
        s, l_ = res <= best, res >= best
        best[s] = res[s]
        q_o[s] = q
        stopped[l_] = 1
        if stopped.mean() >= stop:
            break
    return q_o


def test_analytical_rows_equal_the_official_loop():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(40, 7, generator=g, dtype=torch.float64) * 3 - 1.5
    for p, eta in ((0.9, 0.37), (0.99, 1.01), (0.5, 0.27)):
        got = darex_analytical_q_rows(c, p, eta)
        assert torch.equal(got, torch.from_numpy(reference_rows(c.numpy(), p, eta)))
        assert darex_analytical_q(c, p, eta) == float(got.mean())


def test_analytical_q_of_a_constructed_row_is_the_root():
    # one row, s2 negligible: |eta (1 - 0.1/q) s1 + L| = 0 at 1 - 0.1/q = 1/2, i.e. q = 0.2
    L = math.log(2 / 0.05)
    c = torch.full((1, 1_000_000), -2 * L / 1_000_000, dtype=torch.float64)
    assert darex_analytical_q(c, 0.9, 1.0) == 200 * 0.001
    assert analytical_q_grid(0.9)[0] == 100 * 0.001            # starts at 1 - p exactly (not 0.099)
    assert analytical_q_grid(0.999)[0] == 0.001
    assert bernoulli_phi(0.5) == 0.5 and bernoulli_phi(0.1) == pytest.approx(bernoulli_phi(0.9))
    with pytest.raises(ValueError, match="eta"):
        darex_analytical_q(c, 0.9, 0.0)


def test_mean_linear_inputs_and_layer_qs_against_direct_computation():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 4)
            self.b = torch.nn.Linear(4, 2, bias=False)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    net = Toy()
    xs = [torch.randn(1, 5, 3), torch.randn(1, 2, 3)]
    xbar = mean_linear_inputs(net, [{"x": x} for x in xs])
    assert torch.allclose(xbar["a"], (xs[0][0].mean(0) + xs[1][0].mean(0)) / 2)
    h = [torch.relu(net.a(x))[0].mean(0) for x in xs]
    assert torch.allclose(xbar["b"], (h[0] + h[1]) / 2)

    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    base["emb.LayerNorm.weight"] = torch.ones(3)
    tuned = {k: v + 0.01 * torch.randn(v.shape) for k, v in base.items()}
    qs = layer_qs(base, tuned, xbar, 0.9, 0.5)
    ca = torch.cat([(tuned["a.weight"] - base["a.weight"]).double() * xbar["a"].double(),
                    (tuned["a.bias"] - base["a.bias"]).double().reshape(-1, 1)], dim=1)
    cb = (tuned["b.weight"] - base["b.weight"]).double() * xbar["b"].double()
    assert qs["a.weight"] == darex_analytical_q(ca, 0.9, 0.5) == qs["a.bias"]
    assert qs["b.weight"] == darex_analytical_q(cb, 0.9, 0.5)
    assert qs["emb.LayerNorm.weight"] == float(np.mean([qs["a.weight"], qs["b.weight"]]))


# --- knobs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(rescale_q="median"), r"must be a number in \[1-p, 1\] or 'auto', 'validation' or 'analytical'"),
    (dict(rescale_q="analytical"), r"rescale_q=analytical needs q_eta"),
    (dict(rescale_q="validation", q_eta=0.3), r"q_eta=0.3 applies only to rescale_q=analytical"),
    (dict(rescale_q="analytical", q_eta=-1.0), r"q_eta=-1.0 must be a number > 0"),
    (dict(rescale_q="validation", q_step=0.0), r"q_step=0.0 must be a number in \(0, 1\]"),
    (dict(rescale_q="validation", q_decay=2.0), r"q_decay=2.0 must be a number in \(0, 1\]"),
    (dict(rescale_q={"a": {"w": 0.01}}), r"outside .* \(model 'a', tensor 'w'\)"),
])
def test_rule_knobs_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        Sparsifier(kind="darex", drop_rate=0.9, **kwargs)
    assert "\n" not in str(e.value)


def test_unresolved_rule_refuses_to_sparsify_and_dare_refuses_q_knobs():
    sp = Sparsifier(kind="darex", drop_rate=0.9, rescale_q="validation")
    with pytest.raises(ValueError, match="chosen on data before the merge"):
        sp.apply(torch.ones(4, 4), 0, "a", "w")
    with pytest.raises(ValueError, match="q_step=0.2 applies only to sparsifier=darex"):
        Sparsifier(kind="dare", drop_rate=0.9, q_step=0.2)
    assert needs_resolution(build_method("darex_ties", drop_rate=0.9, rescale_q="validation")) == "validation"
    assert needs_resolution(build_method("darex_ties", drop_rate=0.9)) is None
    assert needs_resolution(build_method("dare_ties", drop_rate=0.9)) is None


# --- resolution into a merge, on a tiny pool --------------------------------------------------

class SumTaskpool:
    """A validation 'taskpool' whose score is how close Σ of one tensor comes to the fine-tuned
    model's own Σ (so the best q is known in closed form per mask)."""

    def __init__(self, tensor, targets):
        self.tensor, self.targets = tensor, targets
        self.tasks = [SimpleNamespace(name=f"t_{m}", head_model=m) for m in targets]
        self.splits = []

    def with_split(self, split):
        self.splits.append(split)
        return self

    def evaluate_state_dict(self, state, pool):
        (model,) = pool.models
        s = float(state[self.tensor].double().sum())
        return {f"t_{model}/accuracy": -abs(s - self.targets[model]), f"t_{model}/macro_f1": 0.0}


def test_validation_rule_picks_the_direct_reference_q_and_merges_with_it(tiny_bert_pool):
    from dare_lab.analysis import darex_q as mod
    from dare_lab.engine import merge_models
    from dare_lab.taskpool.classification import read_state_dict
    from dare_lab.engine.sources import resolve_model_dir

    pool = tiny_bert_pool
    name = "bert.encoder.layer.0.attention.self.query.weight"
    base = read_state_dict(resolve_model_dir(pool.base))
    tuned = {m: read_state_dict(resolve_model_dir(r)) for m, r in pool.models.items()}
    p = 0.9
    targets = {m: float(tuned[m][name].double().sum()) for m in pool.models}
    tp = SumTaskpool(name, targets)
    method = build_method("darex_task_arithmetic", drop_rate=p, rescale_q="validation", seed=1, scaling=0.5)
    mod._CACHE.clear()
    resolved, info = resolve_rescale_q(method, pool, tp, log=None)
    assert tp.splits and set(tp.splits) == {"validation"}
    for m in pool.models:
        delta = tuned[m][name] - base[name]

        def score(q, m=m, delta=delta):     # direct: the seed-0 DARE mask, ÷ q, summed
            kept = darex(delta, p, tensor_generator(SEARCH_SEED, m, name), q=q)
            return -abs(float((base[name] + kept).double().sum()) - targets[m])

        want, hist = q_grid_search(score, float(1 - Fraction(repr(p))))
        assert resolved.sparsifier.rescale_q[m] == want
        assert info[f"darex/{m}/q"] == want and info[f"darex/{m}/q_evaluations"] == len(hist)
    assert info["darex/rule"] == "validation"
    # the merge: seed-1 masks, each model ÷ its own chosen q, exactly
    merged = merge_models(pool.base, pool.models, resolved, None, threads=1)
    want = base[name] + 0.5 * sum(darex(tuned[m][name] - base[name], p, tensor_generator(1, m, name),
                                        q=resolved.sparsifier.rescale_q[m]) for m in pool.models)
    assert torch.equal(merged[name], want)


def test_redundancy_knobs_refuse_the_rules_on_data():
    from dare_lab.analysis.redundancy import single_model_method

    with pytest.raises(ValueError, match="resolved by the merge program only"):
        single_model_method("darex", 0.9, knobs={"rescale_q": "validation"})
    assert single_model_method("darex", 0.9, knobs={"rescale_q": 0.5}).sparsifier.rescale_q == 0.5
