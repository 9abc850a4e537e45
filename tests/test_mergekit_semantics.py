"""``mergekit_semantics=mergekit``: mergekit's own rules, bit for bit.

Two kinds of evidence: (1) the outputs of real mergekit (0.1.5, float32) on a tiny Llama pool,
committed under tests/fixtures/mergekit/ (README there), which dare_lab must reproduce exactly —
``mergekit-yaml`` itself for the deterministic methods, and for DARE-TIES and DELLA mergekit's
code with its random draw replaced by dare_lab's mask (``*_masked``); (2) this file's own float64 references of each rule, written from mergekit's
source (L1 rescale, int(density·n) counts, weighted election with 0 → +, Σ w·[agree]
normalisation, linear, gradients), for the knobs one at a time and for the random-mask methods
(DARE, DELLA) given dare_lab's mask.
"""

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dare_lab.engine.merge import merge_models
from dare_lab.ops import merge as mergers
from dare_lab.ops import tensor_generator
from dare_lab.ops.method import Merger, MergeMethod, Sparsifier
from dare_lab.ops.overrides import parse_overrides
from dare_lab.ops.presets import build_method
from dare_lab.ops.sparsify import (breadcrumbs, dare, della, density_of, drop_rate_of, keep_mask, l1_rescaled,
                                   magnitude_prune, mergekit_breadcrumbs_counts, mergekit_keep_count)
from dare_lab.shell import mergekit as mk

FX = Path(__file__).parent / "fixtures" / "mergekit"
CASES = sorted(p.stem for p in (FX / "cases").glob("*.yml"))
FIXTURE_TORCH = "2.13.0"   # the torch the fixtures were made with (README there)
SAME_TORCH = torch.__version__.split("+")[0] == FIXTURE_TORCH


def _assert_matches(got, want):
    """Bit for bit under the fixtures' torch; under another torch (which may sum in another
    order) within a few ulps of the saved dtype."""
    assert set(want) <= set(got)
    for name, w in want.items():
        assert got[name].dtype == w.dtype, name
        diff = (got[name].double() - w.double()).abs().max().item()
        if SAME_TORCH:
            assert torch.equal(got[name], w), (name, diff)
        else:
            ulp = 2.0 ** -7 if w.dtype == torch.bfloat16 else 2.0 ** -21
            assert torch.allclose(got[name].double(), w.double(), rtol=ulp, atol=1e-7), (name, diff)


def _case(tmp_path, case):
    p = tmp_path / f"{case}.yml"
    p.write_text((FX / "cases" / f"{case}.yml").read_text().replace("{pool}", str(FX / "pool")))
    return p


# -- (1) real mergekit-yaml outputs ----------------------------------------------------------

def test_fixtures_are_there():
    assert {"linear", "task_arithmetic", "task_arithmetic_gradient", "ties", "ties_gradient", "breadcrumbs",
            "breadcrumbs_ties", "dare_ties_masked", "della_masked"} <= set(CASES)
    assert sum(f.stat().st_size for f in FX.rglob("*") if f.is_file()) < 200_000


@pytest.mark.parametrize("case", CASES)
def test_mergekit_semantics_reproduce_mergekit_yaml_bit_for_bit(tmp_path, case):
    m = mk.load(_case(tmp_path, case), semantics="mergekit")
    assert m.semantics == "mergekit" and any(n.startswith("semantics=mergekit") for n in m.notes)
    got = merge_models(m.base, m.models, m.method, None, out_dtype=m.out_dtype)
    want = load_file(str(FX / "out" / f"{case}.safetensors"))
    assert set(got) == set(want)
    _assert_matches(got, want)


@pytest.mark.parametrize("case", ["ties", "breadcrumbs", "breadcrumbs_ties", "ties_gradient", "dare_ties_masked",
                                  "della_masked"])
def test_paper_semantics_differ_where_the_notes_say(tmp_path, case):
    m = mk.load(_case(tmp_path, case))   # default: paper
    assert m.semantics == "paper" and m.notes and not any(n.startswith("semantics=mergekit") for n in m.notes)
    got = merge_models(m.base, m.models, m.method, None, out_dtype=m.out_dtype)
    want = load_file(str(FX / "out" / f"{case}.safetensors"))
    assert max((got[k].double() - want[k].double()).abs().max().item() for k in want) > 1e-3


def test_cli_mergekit_semantics_prints_and_reproduces(tmp_path):
    cfg = _case(tmp_path, "ties")
    out = tmp_path / "merged"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", DARE_LAB_RESULTS=str(tmp_path / "results"))
    proc = subprocess.run(["dare-lab", "+experiment=mergekit", f"mergekit={cfg}", "mergekit_semantics=mergekit",
                           "engine.out_dtype=bfloat16", f"output.model_dir={out}", "output.progress=false",
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mergekit: semantics=mergekit: ties combines as mergekit's generalized task arithmetic" in proc.stdout
    assert "count_rule=mergekit" in proc.stdout
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(str(f)))
    _assert_matches(got, load_file(str(FX / "out" / "ties.safetensors")))


def test_bad_semantics_is_a_one_line_error(tmp_path):
    with pytest.raises(mk.MergekitConfigError, match=r"semantics='exact' is not one of \['paper', 'mergekit'\]"):
        mk.load(_case(tmp_path, "ties"), semantics="exact")


# -- (2) the rules one at a time, against float64 references written from mergekit's source ---

def _ref_l1(delta, mask):
    d = delta.double()
    masked = d * mask.double()
    before, after = d.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def test_l1_rescale_given_a_mask():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 33, generator=g)
    mask = torch.rand(64, 33, generator=g) < 0.3
    got = l1_rescaled(delta, torch.where(mask, delta, torch.zeros(())))
    assert torch.allclose(got.double(), _ref_l1(delta, mask), rtol=1e-6, atol=0)
    assert math.isclose(got.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-5)
    tiny = torch.full((4,), 1e-9)   # both norms < 1e-7: no rescale (mergekit's eps)
    assert torch.equal(l1_rescaled(tiny, tiny * torch.tensor([1.0, 0, 0, 0])), tiny * torch.tensor([1.0, 0, 0, 0]))


def test_dare_and_della_with_l1_rescale_on_dare_labs_mask():
    delta = torch.randn(40, 50, generator=torch.Generator().manual_seed(1))
    gen = lambda: tensor_generator(3, "m", "t")   # noqa: E731
    mask = keep_mask(delta.shape, 0.7, gen())
    got = dare(delta, 0.7, gen(), rescale="l1")
    assert torch.equal(got != 0, mask)
    assert torch.allclose(got.double(), _ref_l1(delta, mask), rtol=1e-6, atol=0)
    assert torch.equal(dare(delta, 0.0, gen(), rescale="l1"), delta)            # density 1: δ itself
    kept = della(delta, 0.6, 0.2, gen(), rescale=False)                         # DELLA's own mask
    got = della(delta, 0.6, 0.2, gen(), rescale="l1")
    assert torch.allclose(got.double(), _ref_l1(delta, kept != 0), rtol=1e-6, atol=0)


def test_density_round_trips_and_mergekit_counts():
    for d in [k / 100 for k in range(1, 100)] + [0.125, 0.333, 0.999, 0.05]:
        assert density_of(drop_rate_of(d)) == d
    for n in (1, 7, 100, 513, 4096):
        for d in (0.01, 0.1, 0.3, 0.57, 0.7, 0.9, 0.99):
            assert mergekit_keep_count(n, drop_rate_of(d)) == max(1, int(d * n))
            target = int(d * n)
            for gamma in (0.0, 0.01, 0.05, 0.5):
                bottom = max(0, n - target - int(gamma * n))
                assert mergekit_breadcrumbs_counts(n, drop_rate_of(d), gamma) == (n - bottom - target, target, bottom)
    assert mergekit_keep_count(100, drop_rate_of(0.57)) == 56       # 0.57·100 = 56.99999999999999 in float64


def test_magnitude_and_breadcrumbs_with_mergekit_counts():
    x = torch.randn(10, 10, generator=torch.Generator().manual_seed(2))
    order = x.abs().flatten().argsort(descending=True)
    got = magnitude_prune(x, drop_rate_of(0.57), count="mergekit")
    assert torch.equal(got.flatten() != 0, torch.zeros(100, dtype=torch.bool).index_fill(0, order[:56], True))
    assert torch.count_nonzero(magnitude_prune(x, drop_rate_of(0.57))) == 57   # paper: ⌈0.57·100⌉
    assert torch.count_nonzero(magnitude_prune(x, drop_rate_of(0.001), count="mergekit")) == 1
    got = breadcrumbs(x, drop_rate_of(0.6), 0.05, rescale="l1", count="mergekit")
    keep = torch.zeros(100, dtype=torch.bool).index_fill(0, order[5:65], True).view(10, 10)
    assert torch.allclose(got.double(), _ref_l1(x, keep), rtol=1e-6, atol=0)


def _ref_gta(base, deltas, w, consensus, normalize, lam):
    D = torch.stack([d.double() * wk for d, wk in zip(deltas, w)])
    W = torch.tensor(w, dtype=torch.float64).view(-1, *([1] * base.dim()))
    if consensus:
        e = torch.where(D.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(D) == e).double()
        mixed, div = (D * agree).sum(0), (W * agree).sum(0)
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed, div = D.sum(0), W.sum(0)
        div = torch.where(div.abs() < 1e-8, torch.ones_like(div), div)
    if normalize:
        mixed = mixed / div
    return base.double() + lam * mixed


@pytest.mark.parametrize("consensus,normalize", [("sum", True), ("sum", False), ("none", True), ("none", False)])
def test_gta_against_its_reference(consensus, normalize):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(30, 20, generator=g)
    deltas = [torch.randn(30, 20, generator=g) * (torch.rand(30, 20, generator=g) < 0.5) for _ in range(3)]
    w = [0.7, -0.4, 1.3]
    got = mergers.gta(base, deltas, w, consensus, normalize, 0.8)
    assert torch.allclose(got.double(), _ref_gta(base, deltas, w, consensus == "sum", normalize, 0.8), atol=1e-6)


def test_gta_elects_plus_where_the_weighted_sum_is_zero():
    base = torch.zeros(3)
    d1, d2 = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0])
    got = mergers.gta(base, [d1, d2], [1.0, 2.0], "sum", True)   # weighted sums: 1 − 2 = −1, −2 + 2 = 0, 0
    assert got.tolist() == [-1.0, 1.0, 0.0]     # entry 1: Σ = 0 → +: only model 2 (w 2, δ 1) agrees: 2·1/2
    paper = mergers.ties(base, [d1, d2], 1.0, 1.0, "mean", [1.0, 2.0], weighted_election=True)
    assert paper.tolist() != got.tolist()


def test_linear_against_its_reference():
    g = torch.Generator().manual_seed(6)
    ts = [torch.randn(17, 5, generator=g) for _ in range(3)]
    w = [0.3, 0.5, 0.2]
    want = sum(wk * t.double() for wk, t in zip(w, ts)) / sum(w)
    assert torch.allclose(mergers.linear(ts, w).double(), want, atol=1e-6)
    assert torch.allclose(mergers.linear(ts, w, normalize=False).double(), want * sum(w), atol=1e-6)


def test_gradients_interpolate_over_layers_as_mergekit(tmp_path):
    def ref(values, t):   # mergekit's evaluate_setting, independently
        pos = t * (len(values) - 1)
        lo = math.floor(pos)
        hi = min(len(values) - 1, lo + 1)
        return values[lo] + (pos - lo) * (values[hi] - values[lo])

    for vals in ([0.0, 0.5, 1.0], [1.0, 0.0, 0.5], [2.0, 0.25], [0.3, 0.9, 0.1, 0.7]):
        for i, n in ((0, 3), (1, 3), (2, 3), (0, 1), (3, 7)):
            assert math.isclose(mk.gradient_value(vals, mk.layer_t(i, n)), ref(vals, i / (n - 1) if n > 1 else 1.0),
                                abs_tol=1e-12)
    m = mk.load(_case(tmp_path, "task_arithmetic_gradient"), semantics="mergekit").method
    # model a: weight [1, 0, 0.5] over 3 layers (t = 0, 0.5, 1); t = 0 outside the layers
    for tensor, w in (("model.embed_tokens.weight", 1.0), ("model.layers.0.mlp.up_proj.weight", 1.0),
                      ("model.layers.1.self_attn.q_proj.weight", 0.0), ("model.layers.2.input_layernorm.weight", 0.5)):
        assert m.value("weight", "a", tensor, -1) == w, tensor
    # model b: mlp → gradient [2, 0.25]; self_attn → 0.75; anything else → the global weight 1
    for tensor, w in (("model.layers.0.mlp.up_proj.weight", 2.0), ("model.layers.1.mlp.down_proj.weight", 1.125),
                      ("model.layers.2.mlp.gate_proj.weight", 0.25), ("model.layers.1.self_attn.k_proj.weight", 0.75),
                      ("model.norm.weight", 1.0), ("lm_head.weight", 1.0)):
        assert m.value("weight", "b", tensor, -1) == w, tensor
    assert (m.merger.kind, m.merger.consensus, m.merger.normalize) == ("gta", "none", True)


def test_new_knobs_take_the_reference_path():
    from dare_lab.engine.merge import _streams
    from dare_lab.engine.plan import TensorPlan

    plan = TensorPlan(name="w", shape=(4, 4), base_dtype=torch.float32, merge=True, sources={"a": "w"})
    assert _streams(plan, build_method("dare_ties"))
    for method in (build_method("dare_task_arithmetic", rescale="l1"),
                   build_method("magnitude_task_arithmetic", count_rule="mergekit"),
                   build_method("task_arithmetic", merger="gta", consensus="sum", normalize=True),
                   build_method("task_arithmetic", merger="linear", normalize=True)):
        assert not _streams(plan, method)


@pytest.mark.parametrize("make,message", [
    (lambda: Sparsifier(kind="dare", drop_rate=0.5, rescale="l2"), r"rescale='l2' is not a rescale rule; choose true"),
    (lambda: Sparsifier(kind="none", rescale="l1"), "rescale=l1 does not apply to sparsifier=none"),
    (lambda: Sparsifier(kind="darex", drop_rate=0.5, rescale="l1"), "rescale=l1 does not apply to sparsifier=darex"),
    (lambda: Sparsifier(kind="dare", drop_rate=0.5, count_rule="mergekit"), "count_rule='mergekit' applies only to"),
    (lambda: Sparsifier(kind="magnitude", drop_rate=0.5, count_rule="floor"), "unknown count_rule 'floor'"),
    (lambda: Merger(kind="ties", consensus="sum"), "consensus='sum' applies only to merger=gta"),
    (lambda: Merger(kind="gta", consensus="count"), "unknown gta consensus 'count'"),
    (lambda: Merger(kind="task_arithmetic", normalize=True), "normalize=true applies only to merger=gta or linear"),
    (lambda: MergeMethod(sparsifier=Sparsifier(kind="dare", drop_rate=0.5), merger=Merger(kind="linear")),
     "merger=linear averages the models' own tensors: it takes no sparsifier"),
    (lambda: parse_overrides([{"layers": [-1], "weight": 1.0}]), r"layers=\[-1\] must be layer indices"),
])
def test_bad_new_knobs_are_one_line_errors(make, message):
    with pytest.raises(ValueError, match=message) as e:
        make()
    assert "\n" not in str(e.value)


def test_della_rescale_false_under_mergekit_semantics_is_refused(tmp_path):
    p = tmp_path / "d.yml"
    p.write_text("merge_method: della\nbase_model: b\nparameters: {rescale: false}\n"
                 "models: [{model: a, parameters: {weight: 1, density: 0.5}}]\n")
    with pytest.raises(mk.MergekitConfigError, match="della with rescale: false is not supported"):
        mk.load(p, semantics="mergekit")


SLICE = """merge_method: ties
slices:
  - base_model: "{pool}/base"
    parameters: {weight: 1.0}
    sources:
      - {model: "{pool}/base", layer_range: [0, 3]}
      - {model: "{pool}/a", layer_range: [0, 3], parameters: {density: 0.3}}
      - {model: "{pool}/b", layer_range: [0, 3], parameters: {weight: 0.6, density: 0.5}}
      - {model: "{pool}/c", layer_range: [0, 3], parameters: {weight: 0.9, density: 0.7}}
dtype: float32
out_dtype: bfloat16
"""


def test_one_whole_model_slice_is_the_models_form(tmp_path):
    # cases/ties.yml as one slice (the slice's weight for model a); real mergekit-yaml 0.1.5 writes
    # the same bits for both forms (checked when the fixtures were made)
    p = tmp_path / "slice.yml"
    p.write_text(SLICE.replace("{pool}", str(FX / "pool")))
    m = mk.load(p, semantics="mergekit")
    assert m.models == {"a": str(FX / "pool/a"), "b": str(FX / "pool/b"), "c": str(FX / "pool/c")}
    got = merge_models(m.base, m.models, m.method, None, out_dtype=m.out_dtype)
    _assert_matches(got, load_file(str(FX / "out" / "ties.safetensors")))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("layer_range: [0, 3]}\n      - {model: \"{pool}/a\", layer_range: [0, 3]",
                         "layer_range: [0, 3]}\n      - {model: \"{pool}/a\", layer_range: [0, 2]"),
     r"layer_range=\[0, 2\] does not cover every layer of .*/a \(\[0, 3\]\)"),
    (lambda t: t.replace("    parameters: {weight: 1.0}\n", "    parameters: {weight: 1.0}\n    residual_weight: 0.5\n"),
     r"slices\[0\].residual_weight is not supported"),
    (lambda t: t.replace("dtype: float32\n", "models: [{model: x}]\ndtype: float32\n"), "give models: or slices:, not both"),
])
def test_other_slices_are_one_line_errors(tmp_path, edit, message):
    p = tmp_path / "slice.yml"
    p.write_text(edit(SLICE).replace("{pool}", str(FX / "pool")))
    with pytest.raises(mk.MergekitConfigError, match=message):
        mk.load(p)


def test_gradients_in_paper_semantics_are_per_layer_overrides(tmp_path):
    m = mk.load(_case(tmp_path, "ties_gradient")).method     # density [0.2, 0.8] → retain_ratio per layer
    assert (m.merger.kind, m.sparsifier.kind) == ("ties", "none")
    for model, tensor, k in (("a", "model.embed_tokens.weight", 0.2), ("a", "model.layers.0.mlp.up_proj.weight", 0.2),
                             ("a", "model.layers.1.mlp.up_proj.weight", 0.5), ("a", "model.layers.2.self_attn.o_proj.weight", 0.8),
                             ("b", "model.layers.2.mlp.up_proj.weight", 0.45), ("b", "model.layers.2.self_attn.o_proj.weight", 0.8),
                             ("c", "lm_head.weight", 0.2)):
        assert m.value("retain_ratio", model, tensor, -1) == pytest.approx(k, abs=1e-12), (model, tensor)
    assert dict(m.merger.weights) == {"a": 1.0, "b": 1.0, "c": -0.5}


def _dare_lab(tmp_path, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", DARE_LAB_RESULTS=str(tmp_path / "results"))
    pool = FX / "pool"
    return subprocess.run(["dare-lab", "modelpool=custom", f"modelpool.base={pool / 'base'}",
                           f"+modelpool.models={{a: {pool / 'a'}, b: {pool / 'b'}}}", *overrides,
                           "output.progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_cli_takes_rescale_l1_and_refuses_other_words(tmp_path):
    out = tmp_path / "merged"
    proc = _dare_lab(tmp_path, "method=dare_task_arithmetic", "method.drop_rate=0.5", "method.rescale=l1",
                     f"output.model_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    pool = FX / "pool"
    want = merge_models(str(pool / "base"), {"a": str(pool / "a"), "b": str(pool / "b")},
                        build_method("dare_task_arithmetic", drop_rate=0.5, rescale="l1"), None)
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert '"rescale": "l1"' in (out / "dare_lab_merge.json").read_text()
    bad = _dare_lab(tmp_path / "bad", "method=dare_task_arithmetic", "method.rescale=l2",
                    f"output.model_dir={tmp_path / 'bad_out'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == \
        "dare-lab: error: method.rescale=l2: expected true, false or l1 (default false)"


def test_layer_overrides_match_the_layer_index_only():
    from omegaconf import OmegaConf

    from dare_lab.ops.overrides import layer_index

    assert [layer_index(n) for n in ("model.layers.3.mlp.up_proj.weight", "bert.encoder.layer.11.output.dense.bias",
                                     "transformer.h.0.attn.c_attn.weight", "model.embed_tokens.weight",
                                     "lm_head.weight", "model.layers_norm.weight")] == [3, 11, 0, None, None, None]
    cfg = OmegaConf.create({"overrides": [{"layers": [0, 2], "weight": 0.5}, {"layers": 2, "pattern": "mlp", "weight": 3}]})
    m = build_method("task_arithmetic", overrides=cfg.overrides)
    assert [m.value("weight", "a", n, 1.0) for n in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
            "model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight", "model.norm.weight")] == \
        [0.5, 1.0, 0.5, 3.0, 1.0]
