"""mergekit YAMLs run through dare_lab: each merge against the test's own float64 reference of
the YAML's formula, the semantic differences printed, unsupported keys refused in one line."""

import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import dare_lab
from dare_lab.engine import DEFAULT_EXCLUDE
from dare_lab.engine.merge import merge_models
from dare_lab.ops import tensor_generator
from dare_lab.ops.sparsify import dare
from dare_lab.shell import mergekit as mk


@pytest.fixture(scope="module")
def pool3(tmp_path_factory):
    from dare_lab.pools.tiny import make_tiny_pool

    return make_tiny_pool(tmp_path_factory.mktemp("mk"), "bert", n_models=3, seed=4)


def _yaml(tmp_path, text):
    p = tmp_path / "mk.yml"
    p.write_text(text)
    return p


def _sd(path):
    from pathlib import Path

    return load_file(str(Path(path) / "model.safetensors"))


def _merged(cfg_path):
    m = mk.load(cfg_path)
    return m, merge_models(m.base, m.models, m.method, None)


def _heads(name):
    import re

    return any(re.search(p, name) for p in DEFAULT_EXCLUDE)


def test_task_arithmetic_with_per_model_weights_and_lambda(pool3, tmp_path):
    b, ms = pool3.base, pool3.models
    cfg = _yaml(tmp_path, f"""
merge_method: task_arithmetic
base_model: {b}
parameters: {{lambda: 0.7}}
models:
  - model: {ms['ft0']}
    parameters: {{weight: 0.5}}
  - model: {ms['ft1']}
    parameters: {{weight: 1.5}}
  - model: {ms['ft2']}
    parameters: {{weight: -0.25}}
dtype: bfloat16
""")
    m, got = _merged(cfg)
    assert m.models == {"ft0": ms["ft0"], "ft1": ms["ft1"], "ft2": ms["ft2"]} and m.out_dtype == "bfloat16"
    base, fts = _sd(b), [_sd(ms[f"ft{i}"]) for i in range(3)]
    for name, t0 in base.items():
        if _heads(name):
            continue
        want = t0.double() + 0.7 * sum(w * (ft[name].double() - t0.double()) for w, ft in zip((0.5, 1.5, -0.25), fts))
        assert torch.allclose(got[name].double(), want, atol=1e-6), name


def test_linear_without_base_is_the_normalised_weighted_average(pool3, tmp_path):
    ms = pool3.models
    cfg = _yaml(tmp_path, f"""
merge_method: linear
models:
  - {{model: {ms['ft0']}, parameters: {{weight: 1.0}}}}
  - {{model: {ms['ft1']}, parameters: {{weight: 3.0}}}}
""")
    m, got = _merged(cfg)
    assert m.base == ms["ft0"] and any("serves as the base" in n for n in m.notes)
    a, c = _sd(ms["ft0"]), _sd(ms["ft1"])
    for name in a:
        if not _heads(name):
            want = (1.0 * a[name].double() + 3.0 * c[name].double()) / 4.0
            assert torch.allclose(got[name].double(), want, atol=1e-6), name


def test_dare_linear_maps_density_to_drop_rate_with_filters(pool3, tmp_path):
    b, ms = pool3.base, pool3.models
    cfg = _yaml(tmp_path, f"""
merge_method: dare_linear
base_model: {b}
parameters: {{weight: 1.0}}
models:
  - model: {ms['ft0']}
    parameters:
      density: [{{filter: attention, value: 0.3}}, {{value: 0.6}}]
  - model: {ms['ft1']}
    parameters: {{density: 0.6}}
""")
    m, got = _merged(cfg)
    assert any("L1 norm" in n for n in m.notes)
    base, f0, f1 = _sd(b), _sd(ms["ft0"]), _sd(ms["ft1"])
    for name, t0 in base.items():
        if _heads(name):
            continue
        p0 = 0.7 if "attention" in name else 0.4   # mergekit: the first matching filter wins
        want = t0 + dare(f0[name] - t0, p0, tensor_generator(0, "ft0", name)) \
            + dare(f1[name] - t0, 0.4, tensor_generator(0, "ft1", name))
        assert torch.allclose(got[name], want, atol=1e-6), name


def test_dare_ties_is_an_untrimmed_election_and_ties_takes_density_as_retain_ratio(pool3, tmp_path):
    b, ms = pool3.base, pool3.models
    models = f"""models:
  - {{model: {ms['ft0']}, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {ms['ft1']}, parameters: {{weight: 1.0, density: 0.5}}}}
"""
    dt = mk.load(_yaml(tmp_path, f"merge_method: dare_ties\nbase_model: {b}\n" + models)).method
    assert (dt.sparsifier.kind, dt.sparsifier.drop_rate, dt.merger.kind, dt.merger.retain_ratio, dt.merger.merge_func) == \
        ("dare", 0.5, "ties", 1.0, "sum")
    ties = mk.load(_yaml(tmp_path, f"merge_method: ties\nbase_model: {b}\n" + models)).method
    assert (ties.sparsifier.kind, ties.merger.retain_ratio) == ("none", 0.5)
    m, got = _merged(tmp_path / "mk.yml")
    ref = dare_lab.merge(b, {"ft0": ms["ft0"], "ft1": ms["ft1"]}, method="ties", retain_ratio=0.5, out_dir=None)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("text,message", [
    ("merge_method: slerp\nbase_model: b\nmodels: [{model: a}]", "merge_method='slerp' is not supported"),
    ("merge_method: linear\nslices: [{sources: []}]\n", r"slices\[0\].sources must be a non-empty list"),
    ("merge_method: linear\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}, {sources: []}]\n",
     "dare_lab takes one slice covering every layer of each model"),
    ("merge_method: linear\nmodules: {text: {}}\n", "modules are not supported"),
    ("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a, parameters: {weight: [0, 1]}}]",
     "a gradient needs the layer count of 'b'"),
    ("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a}]", "model 'a' has no weight"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]", "ties needs base_model"),
    ("merge_method: ties\nbase_model: b\nparameters: {int8_mask: true}\nmodels: [{model: a, parameters: {weight: 1}}]",
     "int8_mask is not supported"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 1.5}}]",
     r"density=1.5 is outside \(0, 1\]"),
    ("- just a list", "must hold a mapping"),
    ("merge_method: ties\nbase_model: b\nparameters: {gamma: 0.1}\nmodels: [{model: a, parameters: {weight: 1}}]",
     "parameters.gamma is not used by ties"),
])
def test_unsupported_configs_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(mk.MergekitConfigError, match=message):
        mk.load(_yaml(tmp_path, text))
    with pytest.raises(mk.MergekitConfigError, match="does not exist"):
        mk.load(tmp_path / "nope.yml")


def test_cli_runs_a_mergekit_yaml(pool3, tmp_path):
    b, ms = pool3.base, pool3.models
    cfg = _yaml(tmp_path, f"""
merge_method: dare_ties
base_model: {b}
models:
  - {{model: {ms['ft0']}, parameters: {{weight: 1.0, density: 0.4}}}}
  - {{model: {ms['ft1']}, parameters: {{weight: 1.0, density: 0.4}}}}
""")
    out = tmp_path / "merged"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", DARE_LAB_RESULTS=str(tmp_path / "results"))
    proc = subprocess.run(["dare-lab", "+experiment=mergekit", f"mergekit={cfg}", f"output.model_dir={out}",
                           "output.progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mergekit: DARE rescale" in proc.stdout and "mergekit: dare_ties" in proc.stdout
    m, want = _merged(cfg)
    got = _sd(out)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("kind,sparsifier,merger,merge_func,retain", [
    ("dare_ties", "dare", "ties", "sum", 1.0),            # mergekit: normalize false by default → a sum
    ("ties", "none", "ties", "mean", 0.5),
    ("breadcrumbs", "breadcrumbs", "task_arithmetic", None, None),
    ("breadcrumbs_ties", "breadcrumbs", "ties", "sum", 1.0),
    ("della", "della", "ties", "mean", 1.0),
    ("della_linear", "della", "task_arithmetic", None, None),
])
def test_each_method_maps_to_its_dare_lab_form(tmp_path, kind, sparsifier, merger, merge_func, retain):
    knobs = {"della": "{epsilon: 0.05}", "breadcrumbs": "{gamma: 0.01}"}.get(sparsifier, "{}")
    m = mk.load(_yaml(tmp_path, f"""merge_method: {kind}
base_model: b
parameters: {knobs}
models: [{{model: a, parameters: {{weight: 1.0, density: 0.5}}}}, {{model: c, parameters: {{weight: 1.0, density: 0.5}}}}]
""")).method
    assert (m.sparsifier.kind, m.merger.kind) == (sparsifier, merger)
    if sparsifier != "none":
        assert m.sparsifier.drop_rate == 0.5
    if merge_func:
        assert (m.merger.merge_func, m.merger.retain_ratio) == (merge_func, retain)
    if sparsifier == "della":
        assert m.sparsifier.epsilon == 0.05
    if sparsifier == "breadcrumbs":
        assert m.sparsifier.gamma == 0.01
