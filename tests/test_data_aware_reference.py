"""Independent float64 references for Fisher merging and RegMean, written from the papers.

Nothing here calls dare_lab's statistics or merge formulas: models are run in float64, one
example at a time (no padding, so no masking to get right), and the merges are the papers'
closed forms solved with numpy.

- Fisher merging (Matena & Raffel 2022, eq. 2 with the diagonal Fisher of eq. 3):
      F_k = (1/N_k) Σ_i Σ_y p(y|x_i) (∇_θ log p(y|x_i))²
      θ* = Σ_k λ_k (F_k + ε) θ_k / Σ_k λ_k (F_k + ε);   an entry whose Fisher is zero in every
      model (ε = 0) takes the λ-weighted mean.
- RegMean (Jin et al. 2023, eq. 4 and §3.3): G_k = X_kᵀ X_k (unnormalised, over every token the
  layer sees), G̃_k = diag G_k + α·offdiag G_k, W*ᵀ = (Σ_k G̃_k)⁺ Σ_k G̃_k W_kᵀ — the minimum-norm
  least-squares solution when Σ G̃ is singular (numpy lstsq / gelsd). Every other parameter is
  the plain mean; heads are the base's.
"""
from __future__ import annotations

import re

import numpy as np
import torch

HEAD = re.compile(r"(^|\.)(classifier|score)(\.|$)")


def f64_model(path, sd=None):
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    if sd is not None:
        m.load_state_dict({k: v for k, v in sd.items() if k in m.state_dict()}, strict=False)
    return m.double().eval()


def encodings(tok, texts, max_length):
    return [tok(t, truncation=True, max_length=max_length, return_tensors="pt") for t in texts]


def ref_inputs(model, encs):
    """{"<linear>.weight": X} with every token's input row to each non-head nn.Linear (float64)."""
    rows, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not HEAD.search(name + ".weight"):
            def hook(module, inputs, output, key=name + ".weight"):
                rows.setdefault(key, []).append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double())
            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for e in encs:
            model(**e)
    for h in handles:
        h.remove()
    return {k: torch.cat(v).numpy() for k, v in rows.items()}


def ref_fisher(model, encs):
    """Exact diagonal Fisher (expectation over labels), float64, mean over the examples."""
    params = {n: p for n, p in model.named_parameters() if not HEAD.search(n)}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for e in encs:
        logp = torch.log_softmax(model(**e).logits[0], -1)
        probs = logp.detach().exp()
        for y in range(logp.shape[0]):
            grads = torch.autograd.grad(logp[y], list(params.values()), retain_graph=True, allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    acc[n] += probs[y] * g.pow(2)
    return {n: (a / len(encs)).numpy() for n, a in acc.items()}


def ref_fisher_merge(base, models, fishers, lam, eps, zero_rtol=1e-20):
    """θ* per the paper; with ε = 0 an entry is zero-Fisher when F_k ≤ zero_rtol·max F_k (float64 round-off)."""
    names = list(models)
    scale = {m: max(float(np.max(f)) for f in fishers[m].values()) for m in names}
    out = {}
    for k, b in base.items():
        if HEAD.search(k) or not b.is_floating_point():
            out[k] = b.double().numpy()
            continue
        th = [models[m][k].double().numpy() for m in names]
        if not all(k in fishers[m] for m in names):
            out[k] = sum(th) / len(th)
            continue
        fs = [np.where(fishers[m][k] <= zero_rtol * scale[m], 0.0, fishers[m][k]) for m in names]
        w = [lk * (f + eps) for lk, f in zip(lam, fs)]
        num, den = sum(wk * t for wk, t in zip(w, th)), sum(w)
        mean = sum(lk * t for lk, t in zip(lam, th)) / sum(lam)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = np.where(den > 0, num / np.where(den > 0, den, 1.0), mean)
    return out


def ref_regmean(base, models, inputs, alpha, per_model_scale=None):
    """W* = (Σ G̃_k)⁺ Σ G̃_k W_kᵀ per linear layer (numpy lstsq, least-norm); others averaged.

    ``per_model_scale``: {model: c_k} multiplies G_k (1/N_k: the per-model-mean variant)."""
    names = list(models)
    out, ranks = {}, {}
    for k, b in base.items():
        if HEAD.search(k) or not b.is_floating_point():
            out[k] = b.double().numpy()
            continue
        th = [models[m][k].double().numpy() for m in names]
        if all(k in inputs[m] for m in names):
            a = np.zeros((th[0].shape[1],) * 2)
            rhs = np.zeros((th[0].shape[1], th[0].shape[0]))
            for m, w in zip(names, th):
                g = inputs[m][k].T @ inputs[m][k] * (1.0 if per_model_scale is None else per_model_scale[m])
                gt = np.diag(np.diag(g)) + alpha * (g - np.diag(np.diag(g)))
                a += gt
                rhs += gt @ w.T
            sol, _, rank, _ = np.linalg.lstsq(a, rhs, rcond=None)
            out[k], ranks[k] = sol.T, int(rank)
        else:
            out[k] = sum(th) / len(th)
    return out, ranks


def ls_objective(w, inputs, models, k):
    """Σ_k ||X_k Wᵀ − X_k W_kᵀ||² (RegMean's α = 1 objective) in float64."""
    w = np.asarray(w, dtype=np.float64)
    return float(sum(np.sum((inputs[m][k] @ (w - models[m][k].double().numpy()).T) ** 2) for m in models))


def max_abs_diff(got, ref, keys=None):
    keys = keys or [k for k in ref if not HEAD.search(k)]
    worst, where = 0.0, None
    for k in keys:
        d = float(np.max(np.abs(got[k].double().numpy() - ref[k]))) if ref[k].size else 0.0
        if d > worst:
            worst, where = d, k
    return worst, where


# ============================================================================= tests
# dare_lab's merges against the references above on a tiny BERT pool (2 layers, h32).

import json  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

from dare_lab.data_aware import DataAwareMerge  # noqa: E402
from dare_lab.engine.pool import ModelPool  # noqa: E402
from dare_lab.ops import dare, tensor_generator  # noqa: E402
from dare_lab.ops.data_aware import fisher_merge, psd_solve, regmean_merge_rank, zero_fisher_floor  # noqa: E402
from dare_lab.taskpool.classification import TaskSpec, load_split, read_state_dict  # noqa: E402
from dare_lab.train.tiny import polarity_rows, topic_rows, write_csv  # noqa: E402

POOLER = "bert.pooler.dense.weight"
KEY_BIAS = "bert.encoder.layer.0.attention.self.key.bias"
MAXLEN = 16


@pytest.fixture(scope="module")
def env(tmp_path_factory, noisy_bert_trio):
    root = tmp_path_factory.mktemp("da_ref")
    base, a, b = noisy_bert_trio
    base_sd = read_state_dict(base)
    files = {"a": write_csv(polarity_rows(40, 1), root / "a.csv"), "b": write_csv(topic_rows(40, 2), root / "b.csv"),
             "b_small": write_csv(topic_rows(12, 3), root / "b_small.csv")}
    pool = ModelPool(base=str(base), models={"a": str(a), "b": str(b)})
    return root, pool, files, base_sd


def _tasks(env, b="b"):
    root, pool, files, _ = env
    return [{"name": "a", "files": {"train": str(files["a"])}, "labels": ["neg", "pos"], "max_length": MAXLEN},
            {"name": b, "model": "b", "files": {"train": str(files[b])}, "labels": ["food", "sport", "tech"],
             "max_length": MAXLEN}]


_CACHE: dict = {}


def _ref_stats(env, kind, n, p=0.0, seed=0, b="b"):
    """(sparsified models, reference statistics, N used per model) — float64, one example at a time."""
    key = (kind, n, p, seed, b)
    if key not in _CACHE:
        from transformers import AutoTokenizer

        _, pool, _, base = env
        models, stats, used = {}, {}, {}
        for m, t in zip(("a", "b"), _tasks(env, b)):
            sd = read_state_dict(pool.models[m])
            if p:
                sd = {k: (v if HEAD.search(k) else base[k] + dare(v - base[k], p, tensor_generator(seed, m, k)))
                      for k, v in sd.items()}
            texts = load_split(TaskSpec.from_any(t), "train").texts[:n]
            encs = encodings(AutoTokenizer.from_pretrained(pool.models[m]), texts, MAXLEN)
            model = f64_model(pool.models[m], sd)
            stats[m] = ref_fisher(model, encs) if kind == "fisher" else ref_inputs(model, encs)
            models[m], used[m] = sd, len(texts)
        _CACHE[key] = models, stats, used
    return _CACHE[key]


def _quiet_merge(method, pool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return method.merge_pool(pool)


# ----------------------------------------------------------------------------- RegMean

@pytest.mark.parametrize("alpha", [0.7, 0.9, 1.0])
def test_regmean_matches_the_float64_reference(env, alpha):
    _, pool, _, base = env
    models, inputs, _ = _ref_stats(env, "regmean", 32)
    ref, ranks = ref_regmean(base, models, inputs, alpha)
    # float64 statistics: every tensor within float32 rounding of the float64 reference
    m64 = DataAwareMerge("regmean", tasks=_tasks(env), num_examples=32, alpha=alpha, compute_dtype="float64")
    got = _quiet_merge(m64, pool)
    worst, where = max_abs_diff(got, ref)
    assert worst < 5e-7, (worst, where)
    assert {k: r["rank"] for k, r in m64.report["ranks"].items()} == ranks
    # float32 statistics (the default): the same least-squares objective as the reference
    got32 = _quiet_merge(DataAwareMerge("regmean", tasks=_tasks(env), num_examples=32, alpha=alpha), pool)
    if alpha < 1:
        assert max_abs_diff(got32, ref)[0] < 5e-6
    else:  # the pooler's Gram sum has condition number ~1e8: W is fixed only as far as the objective fixes it
        assert np.linalg.cond(sum(inputs[m][POOLER].T @ inputs[m][POOLER] for m in models)) > 1e6
        for k in ranks:  # excess over the minimum, relative to the plain average's
            mean = sum(models[m][k].double() for m in models) / len(models)
            excess = ls_objective(got32[k], inputs, models, k) - ls_objective(ref[k], inputs, models, k)
            assert excess < 1e-6 * ls_objective(mean, inputs, models, k), (k, excess)


def test_regmean_singular_gram_gives_the_least_norm_solution(env):
    """N = 4 per model: the pooler (one [CLS] row per example) sees 8 rows, so Σ XᵀX has rank 8 of 32."""
    _, pool, _, base = env
    models, inputs, _ = _ref_stats(env, "regmean", 4)
    ref, ranks = ref_regmean(base, models, inputs, 1.0)
    assert ranks[POOLER] == 8
    for dtype, tol in (("float64", 5e-7), ("float32", 1e-5)):
        method = DataAwareMerge("regmean", tasks=_tasks(env), num_examples=4, alpha=1.0, compute_dtype=dtype)
        with pytest.warns(UserWarning, match=r"singular Gram sum .*rank 8 of 32"):
            got = method.merge_pool(pool)
        assert method.report["ranks"][POOLER] == {"rank": 8, "dim": 32}
        d = float(np.max(np.abs(got[POOLER].double().numpy() - ref[POOLER])))
        assert d < tol, (dtype, d)
        assert ls_objective(got[POOLER], inputs, models, POOLER) < 1e-9


def test_psd_solve_exactly_rank_deficient():
    """An exactly rank-16-of-32 float64 Gram sum: the solve must be A⁺B (numpy pinv), rank 16."""
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(8, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 32, generator=g, dtype=torch.float64)
    x2 = torch.randn(8, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 32, generator=g, dtype=torch.float64)
    w1, w2 = torch.randn(5, 32, generator=g, dtype=torch.float64), torch.randn(5, 32, generator=g, dtype=torch.float64)
    grams = [x1.T @ x1, x2.T @ x2]
    assert torch.linalg.matrix_rank(grams[0] + grams[1]) == 16
    out, rank = regmean_merge_rank([w1, w2], grams, alpha=1.0)
    a = (grams[0] + grams[1]).numpy()
    want = (np.linalg.pinv(a) @ (grams[0] @ w1.T + grams[1] @ w2.T).numpy()).T
    assert rank == 16
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-10)
    # the least-norm solution of the stacked least-squares problem (independent route: lstsq on X)
    X, Y = torch.cat([x1, x2]), torch.cat([x1 @ w1.T, x2 @ w2.T])
    np.testing.assert_allclose(out.numpy(), np.linalg.lstsq(X.numpy(), Y.numpy(), rcond=None)[0].T, atol=1e-9)
    sol, r = psd_solve(torch.zeros(4, 4, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64))
    assert r == 0 and torch.equal(sol, torch.zeros(4, 2, dtype=torch.float64))


def test_regmean_unequal_n_sum_default_mean_option_and_short_data(env):
    _, pool, _, base = env
    models, inputs, used = _ref_stats(env, "regmean", 32, b="b_small")
    assert used["a"] == 32 and used["b"] < 32
    method = DataAwareMerge("regmean", tasks=_tasks(env, "b_small"), num_examples=32, alpha=0.9, compute_dtype="float64")
    assert method.normalize == "sum"  # the paper's Σ XᵀX is the default
    with pytest.warns(UserWarning, match=rf"task 'b_small' \(model 'b'\): num_examples=32 but only {used['b']} examples"):
        got = method.merge_pool(pool)
    assert method.report["num_examples_used"] == used
    ref, _ = ref_regmean(base, models, inputs, 0.9)
    assert max_abs_diff(got, ref)[0] < 5e-7
    # per-model mean: G_k / N_k
    mean = DataAwareMerge("regmean", tasks=_tasks(env, "b_small"), num_examples=32, alpha=0.9, normalize="mean",
                          compute_dtype="float64")
    got_mean = _quiet_merge(mean, pool)
    ref_mean, _ = ref_regmean(base, models, inputs, 0.9, {m: 1.0 / n for m, n in used.items()})
    assert max_abs_diff(got_mean, ref_mean)[0] < 5e-7
    assert float((got_mean[POOLER] - got[POOLER]).abs().max()) > 1e-3  # the two choices really differ here
    with pytest.raises(ValueError, match=r"only \d+ examples; using N=\d+ \(on_short_data=error\)$") as exc:
        DataAwareMerge("regmean", tasks=_tasks(env, "b_small"), num_examples=32, on_short_data="error").merge_pool(pool)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------- Fisher

@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_fisher_matches_the_float64_reference(env, eps):
    _, pool, _, base = env
    models, fishers, _ = _ref_stats(env, "fisher", 8)
    ref = ref_fisher_merge(base, models, fishers, [0.4, 0.6], eps)
    method = DataAwareMerge("fisher", tasks=_tasks(env), num_examples=8, scaling=[0.4, 0.6], min_fisher=eps)
    got = method.merge_pool(pool)
    worst, where = max_abs_diff(got, ref)
    assert worst < 5e-7, (worst, where)
    # key biases: mathematically zero gradient (softmax shift invariance) → the λ-weighted mean
    want = 0.4 * models["a"][KEY_BIAS].double() + 0.6 * models["b"][KEY_BIAS].double()
    assert float((got[KEY_BIAS].double() - want).abs().max()) < 1e-7
    assert method.report["fisher_zeroed"]["a"] >= 64  # the two key biases, at least


def test_fisher_epsilon_zero_structural_zeros_fall_back_to_the_mean():
    t1, t2 = torch.randn(6), torch.randn(6)
    f1 = torch.tensor([1.0, 0.0, 1e-22, 2.0, 0.0, 0.5])
    f2 = torch.tensor([0.0, 0.0, 3e-22, 1.0, 1e-23, 0.5])
    clean1, n1 = zero_fisher_floor({"w": f1}, 1e-16)
    clean2, n2 = zero_fisher_floor({"w": f2}, 1e-16)
    assert (n1, n2) == (1, 2)
    out = fisher_merge([t1, t2], [clean1["w"], clean2["w"]], [1.0, 3.0], min_fisher=0.0)
    mean = (t1 + 3 * t2) / 4
    for i in (1, 2, 4):  # zero in every model (after the round-off floor): exactly the λ-weighted mean
        assert out[i] == mean[i]
    assert out[0] == t1[0]
    assert out[3] == (2 * t1[3] + 3 * t2[3]) / 5
    assert torch.isfinite(out).all()


def test_fisher_unequal_n_records_the_n_used(env):
    _, pool, _, base = env
    models, fishers, used = _ref_stats(env, "fisher", 12, b="b_small")
    method = DataAwareMerge("fisher", tasks=_tasks(env, "b_small"), num_examples=12, scaling=[0.4, 0.6])
    with pytest.warns(UserWarning, match="using N="):
        got = method.merge_pool(pool)
    assert method.report["num_examples_used"] == used and used["a"] == 12 and used["b"] < 12
    assert max_abs_diff(got, ref_fisher_merge(base, models, fishers, [0.4, 0.6], 1e-6))[0] < 5e-7


# ----------------------------------------------------------------------------- DARE variants

def test_dare_fisher_and_dare_regmean_match_the_reference_on_sparsified_models(env):
    _, pool, _, base = env
    p, seed = 0.5, 7
    models, fishers, _ = _ref_stats(env, "fisher", 6, p, seed)
    got = DataAwareMerge("fisher", tasks=_tasks(env), num_examples=6, scaling=[0.4, 0.6], drop_rate=p,
                         seed=seed).merge_pool(pool)
    assert max_abs_diff(got, ref_fisher_merge(base, models, fishers, [0.4, 0.6], 1e-6))[0] < 5e-7
    models, inputs, _ = _ref_stats(env, "regmean", 8, p, seed)
    got = _quiet_merge(DataAwareMerge("regmean", tasks=_tasks(env), num_examples=8, alpha=0.9, drop_rate=p, seed=seed,
                                      compute_dtype="float64"), pool)
    assert max_abs_diff(got, ref_regmean(base, models, inputs, 0.9)[0])[0] < 5e-7


# ----------------------------------------------------------------------------- threads, mapping, metadata

@pytest.mark.parametrize("kind,kw", [("fisher", {"min_fisher": 0.0}), ("fisher", {"min_fisher": 1e-6}),
                                     ("regmean", {"alpha": 1.0}), ("regmean", {"alpha": 0.9, "drop_rate": 0.5})])
def test_bit_identical_at_one_and_two_threads(env, kind, kw):
    _, pool, _, _ = env
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(_quiet_merge(DataAwareMerge(kind, tasks=_tasks(env), num_examples=6, **kw), pool))
            assert torch.get_num_threads() == n  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


def test_task_model_mapping_is_checked_before_any_statistic(env, monkeypatch):
    root, pool, files, _ = env

    def no_stats(*a, **k):
        raise AssertionError("statistics computed before the task mapping was checked")

    monkeypatch.setattr(DataAwareMerge, "statistics", no_stats)
    a, b = _tasks(env)
    cases = [
        ([a, dict(a, name="a_again", model="a")], r"tasks 'a' and 'a_again' both name model 'a'"),
        ([a, b, dict(b, name="c", model="c")], r"task 'c' names model 'c', which is not in the pool \['a', 'b'\]"),
        ([a], r"no task names pool model 'b'"),
    ]
    empty = write_csv([{"text": "x", "label": "food"}], root / "one.csv")
    empty.write_text("text,label\n")
    cases.append(([a, dict(b, files={"train": str(empty)})], r"task 'b' \(model 'b'\) has no usable 'train' data"))
    cases.append(([a, dict(b, files={"train": str(root / "missing.csv")})], r"task 'b' \(model 'b'\) has no usable"))
    for kind in ("fisher", "regmean"):
        for tasks, msg in cases:
            with pytest.raises(ValueError, match=msg) as exc:
                DataAwareMerge(kind, tasks=tasks, num_examples=4).merge_pool(pool)
            assert "\n" not in str(exc.value)


def test_merge_metadata_records_n_used_and_ranks(env, tmp_path):
    _, pool, _, _ = env
    method = DataAwareMerge("regmean", tasks=_tasks(env, "b_small"), num_examples=32, alpha=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = method.merge(pool, tmp_path / "m")
    meta = json.loads((out / "dare_lab_merge.json").read_text())
    assert meta["method"]["num_examples"] == 32 and meta["method"]["normalize"] == "sum"
    stats = meta["statistics"]
    assert stats["num_examples_used"]["a"] == 32 and stats["num_examples_used"]["b"] < 32
    assert stats["ranks"][POOLER]["dim"] == 32 and 1 <= stats["ranks"][POOLER]["rank"] <= 32
    assert stats["threads"] == 1


def test_method_configs_state_the_choices():
    import inspect
    from pathlib import Path

    import yaml

    params = set(inspect.signature(DataAwareMerge).parameters)
    root = Path(__file__).resolve().parents[1] / "configs" / "method"
    for name in ("fisher", "regmean", "dare_fisher", "dare_regmean"):
        cfg = yaml.safe_load((root / f"{name}.yaml").read_text())
        keys = set(cfg) - {"_target_"}
        assert keys <= params, (name, keys - params)
        assert cfg["on_short_data"] == "warn" and cfg["threads"] == 1
        if cfg["kind"] == "regmean":
            assert cfg["normalize"] == "sum" and "rcond" in cfg
        else:
            assert cfg["min_fisher"] == 1e-6 and cfg["zero_fisher_rtol"] == 1e-16
    with pytest.raises(ValueError, match="normalize"):
        DataAwareMerge("regmean", normalize="avg")
    with pytest.raises(ValueError, match="on_short_data"):
        DataAwareMerge("regmean", on_short_data="clip")
