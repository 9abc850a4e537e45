"""Redundancy curves: sparsified single models, evaluation bookkeeping, mean ± std, findings."""

import math

import pytest
import torch

from dare_lab.analysis import redundancy as R
from dare_lab.engine.pool import ModelPool
from dare_lab.pools.tiny import make_tiny_pool


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    return make_tiny_pool(tmp_path_factory.mktemp("tiny_red"), "bert", n_models=2, seed=0)


class CountingTaskPool:
    """Scores = share of in-scope delta entries that survived (no data needed); counts calls."""

    def __init__(self, base_sd):
        self.base = base_sd
        self.calls = []

    def evaluate_state_dict(self, body, pool, label="m"):
        (name,) = pool.models  # the pool is reduced to the model being scored
        self.calls.append(name)
        w = "bert.encoder.layer.0.intermediate.dense.weight"
        kept = (body[w] != self.base[w]).double().mean().item()
        return {f"{name}/kept": kept}


def _sd(path):
    from safetensors.torch import load_file
    return load_file(f"{path}/model.safetensors")


def test_single_model_sparsification(tiny_pool):
    base, ft = _sd(tiny_pool.base), _sd(tiny_pool.models["ft0"])
    w = "bert.encoder.layer.0.intermediate.dense.weight"
    dare = R.sparsified_state(tiny_pool.base, tiny_pool.models["ft0"], "ft0", R.single_model_method("dare", 0.5, 0))
    drop = R.sparsified_state(tiny_pool.base, tiny_pool.models["ft0"], "ft0", R.single_model_method("drop_only", 0.5, 0))
    d, dd, d0 = dare[w] - base[w], drop[w] - base[w], ft[w] - base[w]
    kept = dd != 0
    assert 0.4 < kept.double().mean() < 0.6
    assert torch.equal(d != 0, kept)  # same seeded mask for DARE and DropOnly
    assert torch.allclose(d[kept], 2 * d0[kept], atol=1e-6) and torch.allclose(dd[kept], d0[kept], atol=1e-6)
    # heads are never sparsified/merged; p = 0 reproduces the SFT model
    assert torch.equal(dare["classifier.weight"], base["classifier.weight"])
    sft = R.sparsified_state(tiny_pool.base, tiny_pool.models["ft0"], "ft0", R.single_model_method("dare", 0.0))
    assert torch.allclose(sft[w], ft[w], atol=1e-7)
    # §4.7: target=finetuned drops entries of θ_SFT itself
    fin = R.sparsified_state(tiny_pool.base, tiny_pool.models["ft0"], "ft0",
                             R.single_model_method("drop_only", 0.5, 0, target="finetuned"))
    zero = fin[w] == 0
    assert 0.4 < zero.double().mean() < 0.6 and torch.equal(fin[w][~zero], ft[w][~zero])


def test_curves_bookkeeping_and_summary(tiny_pool):
    tp = CountingTaskPool(_sd(tiny_pool.base))
    rows = R.redundancy_curves(tiny_pool, tp, drop_rates=[0.0, 0.5, 0.9], seeds=[0, 1, 2], log=None)
    # per model: p=0 once, DARE/DropOnly 2 rates × 3 seeds each, MP 2 rates × 1 seed
    assert sorted(tp.calls) == sorted(["ft0"] * 15 + ["ft1"] * 15)
    summary = R.summarize(rows)
    by = {(r["model"], r["method"], r["p"]): r for r in summary}
    assert by[("ft0", "dare", 0.0)]["mean"] == 1.0 and by[("ft0", "dare", 0.0)]["n_seeds"] == 1
    for m in ("dare", "drop_only"):
        r = by[("ft0", m, 0.9)]
        assert r["n_seeds"] == 3 and 0.05 < r["mean"] < 0.15 and r["std"] > 0
        vals = [x["value"] for x in rows if (x["model"], x["method"], x["p"]) == ("ft0", m, 0.9)]
        assert r["mean"] == pytest.approx(sum(vals) / 3)
        assert r["std"] == pytest.approx(math.sqrt(sum((v - r["mean"]) ** 2 for v in vals) / 3))
    mp = by[("ft0", "magnitude", 0.5)]
    assert mp["n_seeds"] == 1 and mp["std"] == 0.0 and mp["mean"] == pytest.approx(0.5, abs=0.01)
    wide = R.pivot(summary, [0.0, 0.5, 0.9])
    assert len(wide) == 6 and set(wide[0]) == {"model", "metric", "method", "p=0", "p=0.5", "p=0.9"}
    assert "±" in next(r for r in wide if r["method"] == "dare")["p=0.9"]
    assert R.primary_metrics(summary) == {"ft0": ["ft0/kept"], "ft1": ["ft1/kept"]}
    text = "\n".join(R.findings(summary))
    assert "ft0 ft0/kept: SFT 1.0000" in text


def test_findings_follow_the_metrics_direction():
    """A lower NLL is better: DARE near SFT's NLL keeps it, DropOnly's larger NLL is worse."""
    def row(metric, method, p, mean):
        return {"model": "bbc", "metric": metric, "method": method, "p": p, "mean": mean, "std": 0.0, "n_seeds": 1}

    summary = []
    for metric, sft, dare, drop, mp in (("bbc/gold_nll", 0.51, 0.515, 5.15, 0.40), ("bbc/accuracy", 0.83, 0.83, 0.38, 0.90)):
        summary.append(row(metric, "dare", 0.0, sft))
        summary += [row(metric, "dare", 0.9, dare), row(metric, "drop_only", 0.9, drop), row(metric, "magnitude", 0.9, mp)]
    summary.append(row("bbc/gold_nll", "dare", 0.99, 0.60))   # 0.09 above SFT's NLL: no longer kept
    text = "\n".join(R.findings(summary))
    assert "bbc bbc/gold_nll (lower is better): SFT 0.5100; DARE stays within 0.01 of SFT up to p=0.9\n" in text
    assert "p=0.9: DARE 0.5150 vs DropOnly 5.1500 → rescaling helps" in text
    assert "p=0.9: DARE 0.5150 vs MP 0.4000 → DARE not better" in text
    assert "bbc bbc/accuracy: SFT 0.8300; DARE stays within 0.01 of SFT up to p=0.9\n" in text
    assert "p=0.9: DARE 0.8300 vs DropOnly 0.3800 → rescaling helps" in text
    assert "p=0.9: DARE 0.8300 vs MP 0.9000 → DARE not better" in text
    assert R.lower_is_better("word_perplexity") and R.lower_is_better("tweets/gold_nll")
    assert not R.lower_is_better("bbc/accuracy") and not R.lower_is_better("macro_f1")


def test_restrict_taskpool_and_unknown_model(tiny_pool):
    class Task:
        def __init__(self, name, model=None):
            self.name, self.model = name, model

        @property
        def head_model(self):
            return self.model or self.name

    class TP:
        tasks = [Task("ft0"), Task("news", "ft1")]

    assert [t.name for t in R.restrict_taskpool(TP(), "ft1").tasks] == ["news"]
    assert len(TP.tasks) == 2
    with pytest.raises(ValueError, match="not in pool"):
        R.redundancy_curves(tiny_pool, TP(), models=["nope"], log=None)
    pool = ModelPool(base="b", models={"a": "x"}, prompts={"a": "alpaca", "c": "x"})
    assert R.sub_pool(pool, "a").prompts == {"a": "alpaca"}
