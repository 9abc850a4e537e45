"""TIES ``trim_scope: model`` (the official TIES code's / MergeLM's whole-model trim) against a
whole-model reference, and ``trim_scope: tensor`` (the default) unchanged.

The reference holds every model whole, as MergeLM does: flatten all in-scope deltas of a model
(sorted names), threshold = ``kthvalue`` of the ⌊(1−k)·n⌋-th smallest |δ̂|, keep ``>=``, split
back per tensor, then TIES per entry (sign of the sum, the tensor's majority sign where it is 0,
disjoint mean), θ = θ_PRE + λ·merged. The engine must give the same bits.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dare_lab.engine.global_trim import model_thresholds
from dare_lab.engine.merge import merge_models, merge_state_dicts
from dare_lab.engine.scope import Scope
from dare_lab.ops import merge as mergers
from dare_lab.ops.method import MergeMethod, Merger, Sparsifier
from dare_lab.ops.presets import build_method
from dare_lab.ops.seeding import tensor_generator
from dare_lab.ops.sparsify import dare


def _load_dir(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _pool_state(pool):
    from pathlib import Path

    base = _load_dir(Path(pool.base))
    models = {m: _load_dir(Path(p)) for m, p in sorted(pool.models.items())}
    return base, models


def reference_global_ties(base, models, k, drop_rate=0.0, seed=0, lam=1.0, scope=None, dtype=torch.float32):
    """Whole-model TIES with the trim over all in-scope entries of each model (held in memory)."""
    scope = scope or Scope()
    names = sorted(n for n, t in base.items() if scope.selects(n, tuple(t.shape), t.dtype))
    order = sorted(models)
    deltas = {}
    for m in order:
        per = []
        for n in names:
            d = models[m][n].to(dtype) - base[n].to(dtype)
            if drop_rate:
                d = dare(d, drop_rate, tensor_generator(seed, m, n))
            per.append(d)
        deltas[m] = per
    trimmed = {}
    for m in order:
        flat = torch.cat([d.flatten() for d in deltas[m]])
        n_all = flat.numel()
        num_mask = int(n_all * (1 - k))              # MergeLM: int(num_total_params * param_value_mask_rate)
        if num_mask == 0:
            mask = torch.ones_like(flat, dtype=torch.bool)
        else:
            kth = flat.abs().kthvalue(num_mask).values
            mask = flat.abs() >= kth
        flat = flat * mask
        parts, s = [], 0
        for d in deltas[m]:
            parts.append(flat[s: s + d.numel()].view(d.shape))
            s += d.numel()
        trimmed[m] = parts
    out = {}
    for i, n in enumerate(names):
        ts = [trimmed[m][i] for m in order]
        total = torch.zeros_like(ts[0])
        for t in ts:
            total = total + t
        sign = torch.sign(total)
        balance = int((sign > 0).sum()) - int((sign < 0).sum())
        sign = torch.where(sign == 0, torch.tensor(float((balance > 0) - (balance < 0)), dtype=dtype), sign)
        acc = torch.zeros_like(sign)
        cnt = torch.zeros_like(sign)
        for t in ts:
            agree = ((sign > 0) & (t > 0)) | ((sign < 0) & (t < 0))
            acc = acc + torch.where(agree, t, torch.zeros((), dtype=dtype))
            cnt = cnt + agree.to(dtype)
        merged = acc / cnt.clamp(min=1)
        out[n] = (base[n].to(dtype) + merged * lam).to(base[n].dtype)
    for n, t in base.items():
        out.setdefault(n, t)
    return out


def _assert_same(got, want):
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == want[n].dtype, n
        assert torch.equal(got[n], want[n]), n


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """Tiny BERT and Llama pools with K = 2 and K = 3 (Llama sharded with an index)."""
    from dare_lab.pools.tiny import make_tiny_pool

    root = tmp_path_factory.mktemp("ties_global")
    return {
        ("bert", 2): make_tiny_pool(root / "bert2", "bert", n_models=2, seed=0),
        ("bert", 3): make_tiny_pool(root / "bert3", "bert", n_models=3, seed=1),
        ("llama", 2): make_tiny_pool(root / "llama2", "llama", n_models=2, seed=2, max_shard_size="20KB"),
        ("llama", 3): make_tiny_pool(root / "llama3", "llama", n_models=3, seed=3, max_shard_size="20KB"),
    }


@pytest.mark.parametrize("arch,k_models", [("bert", 2), ("bert", 3), ("llama", 2), ("llama", 3)])
@pytest.mark.parametrize("drop_rate,retain", [(0.0, 0.2), (0.5, 0.3), (0.9, 0.2)])
def test_model_scope_matches_whole_model_reference(pools, tmp_path, arch, k_models, drop_rate, retain):
    pool = pools[(arch, k_models)]
    name = "dare_ties" if drop_rate else "ties"
    method = build_method(name, drop_rate=drop_rate, retain_ratio=retain, trim_scope="model", seed=7)
    out = merge_models(pool.base, pool.models, method, tmp_path / "out", threads=2)
    base, models = _pool_state(pool)
    want = reference_global_ties(base, models, retain, drop_rate, seed=7)
    _assert_same(_load_dir(out), want)
    meta = json.loads((out / "dare_lab_merge.json").read_text())
    trim = meta["ties_trim"]
    assert meta["method"]["merger"]["trim_scope"] == "model"
    assert trim["rank"] == int(trim["entries"] * (1 - retain))
    assert set(trim["thresholds"]) == set(pool.models)
    # in memory, one thread: the same bits
    mem = merge_models(pool.base, pool.models, method, None, threads=1)
    _assert_same({n: t.contiguous() for n, t in mem.items()}, want)


def test_model_scope_differs_from_tensor_scope_and_tensor_scope_is_unchanged(pools):
    pool = pools[("llama", 3)]
    base, models = _pool_state(pool)
    default = merge_models(pool.base, pool.models, build_method("ties", retain_ratio=0.2), None)
    tensor = merge_models(pool.base, pool.models, build_method("ties", retain_ratio=0.2, trim_scope="tensor"), None)
    model = merge_models(pool.base, pool.models, build_method("ties", retain_ratio=0.2, trim_scope="model"), None)
    scope = Scope()
    differs = False
    for n, t in base.items():
        assert torch.equal(default[n], tensor[n]), n
        if scope.selects(n, tuple(t.shape), t.dtype):
            ds = [models[m][n].float() - t.float() for m in sorted(models)]
            want = mergers.ties(t.float(), ds, 0.2).to(t.dtype)     # the per-tensor formula, unchanged
            assert torch.equal(tensor[n], want), n
            differs |= not torch.equal(model[n], tensor[n])
    assert differs


def _tie_heavy(seed: int, shapes: dict[str, tuple[int, ...]], k_models: int):
    """Deltas on a coarse grid (multiples of 1/64 in [-4/64, 4/64]): every |δ| value repeats
    thousands of times, across all tensors; exact cancellations (sum 0) are common."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    base = {n: torch.round(t * 64) / 64 for n, t in base.items()}       # exact sums with the grid deltas
    models = {}
    for i in range(k_models):
        models[f"m{i}"] = {n: t + torch.randint(-4, 5, t.shape, generator=g).float() / 64 for n, t in base.items()}
    return base, models


@pytest.mark.parametrize("k_models", [2, 3])
@pytest.mark.parametrize("retain", [0.2, 0.37, 0.5, 1.0])
def test_tie_heavy_threshold_spanning_tensors(k_models, retain):
    shapes = {"a.weight": (64, 48), "b.weight": (5000,), "c.bias": (7,), "d.weight": (33, 17)}
    base, models = _tie_heavy(11 + k_models, shapes, k_models)
    method = build_method("ties", retain_ratio=retain, trim_scope="model")
    got = merge_state_dicts(base, models, method)
    _assert_same(got, reference_global_ties(base, models, retain))
    # the kept count is exactly #(|δ| ≥ t) over the whole model, t the reference's kth value
    deltas = {m: {n: models[m][n] - base[n] for n in shapes} for m in models}
    plans = sorted(shapes)
    trim = model_thresholds(lambda n: {m: deltas[m][n] for m in deltas}, plans, sorted(models), retain, torch.float32)
    n_all = sum(math.prod(s) for s in shapes.values())
    assert trim.entries == n_all and trim.rank == mergers.model_trim_rank(n_all, retain)
    for m in models:
        flat = torch.cat([deltas[m][n].flatten() for n in plans]).abs()
        if trim.rank == 0:
            assert trim.thresholds[m] == 0.0 and trim.kept[m] == n_all
            continue
        t = float(flat.kthvalue(trim.rank).values)
        assert trim.thresholds[m] == t
        assert trim.kept[m] == int((flat >= t).sum())
        hit = [n for n in plans if bool((deltas[m][n].abs() == t).any())]
        assert len(hit) >= 2          # the tie at the threshold does span tensors
    # any processing order of the tensors gives the same thresholds
    rev = model_thresholds(lambda n: {m: deltas[m][n] for m in deltas}, plans[::-1], sorted(models), retain, torch.float32)
    assert rev.thresholds == trim.thresholds and rev.kept == trim.kept


def test_tie_heavy_with_dare_and_float64_compute():
    shapes = {"x.weight": (40, 30), "y.weight": (999,)}
    base, models = _tie_heavy(5, shapes, 3)
    for p, k in ((0.5, 0.3), (0.9, 0.2)):
        method = build_method("dare_ties", drop_rate=p, retain_ratio=k, trim_scope="model", seed=3)
        _assert_same(merge_state_dicts(base, models, method), reference_global_ties(base, models, k, p, seed=3))
    g = torch.Generator().manual_seed(9)
    base = {"x.weight": torch.randn(40, 30, generator=g), "y.weight": torch.randn(999, generator=g)}
    models = {f"m{i}": {n: t + 1e-3 * torch.randn(t.shape, generator=g) for n, t in base.items()} for i in range(2)}
    method = build_method("ties", retain_ratio=0.2, trim_scope="model")
    got = merge_state_dicts(base, models, method, dtype=torch.float64)
    _assert_same(got, reference_global_ties(base, models, 0.2, dtype=torch.float64))


def test_model_trim_rank_is_mergelms_count():
    for n in (1, 2, 3, 7, 10, 999, 12345, 10**9 + 7):
        for k in (0.1, 0.2, 0.5, 0.9, 1.0):
            assert mergers.model_trim_rank(n, k) == math.floor((1 - __import__("fractions").Fraction(repr(k))) * n)
    assert mergers.model_trim_rank(10, 0.2) == int(10 * 0.8) == 8
    assert mergers.model_trim_rank(12345, 0.2) == int(12345 * 0.8)
    assert mergers.model_trim_rank(5, 1.0) == 0


def test_trim_scope_validation():
    with pytest.raises(ValueError, match="unknown TIES trim_scope 'global'"):
        Merger("ties", trim_scope="global")
    with pytest.raises(ValueError, match="trim_scope='model' applies only to merger=ties"):
        Merger("task_arithmetic", trim_scope="model")
    with pytest.raises(ValueError, match="unknown TIES trim_scope"):
        build_method("ties", trim_scope=None)
    with pytest.raises(ValueError, match="does not combine with method.overrides"):
        build_method("ties", trim_scope="model", overrides=[{"models": ["a"], "retain_ratio": 0.5}])
    m = MergeMethod("ties", Sparsifier(), Merger("ties", trim_scope="model"))
    with pytest.raises(ValueError, match="needs each model's whole-model threshold"):
        m.merge_tensor("w", torch.zeros(4), {"a": torch.ones(4)})
    with pytest.raises(ValueError, match="trim thresholds given but trim_scope='tensor'"):
        MergeMethod("ties", Sparsifier(), Merger("ties")).merge_tensor("w", torch.zeros(4), {"a": torch.ones(4)},
                                                                      thresholds={"a": 0.5})


# ---- the streamed path (chunked threshold passes, streamed TIES with fixed cuts) vs whole tensors ----

@pytest.fixture(params=[True, False], ids=["fused", "torch"])
def small_chunks(request, monkeypatch):
    """Chunks of 4096 entries (so every tensor spans chunks), compiled loops on or off."""
    from dare_lab.engine import merge as engine
    from dare_lab.engine import streamed

    monkeypatch.setattr(engine, "_CHUNK", 4096)
    from dare_lab.engine import warmup

    monkeypatch.setattr(streamed, "FUSED", request.param and streamed.FUSED)
    monkeypatch.setattr(warmup, "MODE", "wait")  # the compiled loops from the first tensor on
    return request.param


def _counting(fn, log, tag):
    def wrapped(*a, **k):
        log.append(tag)
        return fn(*a, **k)
    return wrapped


def _whole_tensor_path(base, models, method, monkeypatch, **kw):
    from dare_lab.engine import merge as engine

    with monkeypatch.context() as mp:
        mp.setattr(engine, "_FAST", False)
        return merge_state_dicts(base, models, method, **kw)


@pytest.mark.parametrize("spec", [
    dict(name="ties", retain_ratio=0.2),
    dict(name="ties", retain_ratio=0.37, merge_func="sum", scaling=0.7),
    dict(name="ties", retain_ratio=0.5, merge_func="max"),
    dict(name="dare_ties", drop_rate=0.5, retain_ratio=0.3),
    dict(name="dare_ties", drop_rate=0.9, retain_ratio=0.2, sampler="geometric"),
    dict(name="x", sparsifier="magnitude", merger="ties", drop_rate=0.3, retain_ratio=0.4),
    dict(name="x", sparsifier="drop_only", merger="ties", drop_rate=0.5, retain_ratio=0.25, weights=[1.0, 0.5, 2.0]),
    dict(name="della_ties", drop_rate=0.5),                      # not streamed: whole-tensor path both times
])
@pytest.mark.parametrize("tie_heavy", [False, True])
def test_streamed_equals_whole_tensor_path_and_reference(spec, tie_heavy, small_chunks, monkeypatch):
    shapes = {"big.weight": (96, 160), "mid.weight": (9000,), "small.bias": (13,)}
    if tie_heavy:
        base, models = _tie_heavy(21, shapes, 3)
    else:
        g = torch.Generator().manual_seed(21)
        base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        models = {f"m{i}": {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
                  for i in range(3)}
    method = build_method(trim_scope="model", seed=5, **spec)
    from dare_lab.engine import global_trim

    used = []
    with monkeypatch.context() as mp:     # the streamed passes run (and only where the sparsifier streams)
        mp.setattr(global_trim.StreamedDeltas, "pieces", _counting(global_trim.StreamedDeltas.pieces, used, "pass"))
        mp.setattr(global_trim.FixedTrimMerge, "prepare", _counting(global_trim.FixedTrimMerge.prepare, used, "merge"))
        got = merge_state_dicts(base, models, method)
    streams = method.sparsifier.streamed
    assert used.count("pass") == (2 * len(shapes) if streams else 0) and used.count("merge") == (len(shapes) if streams else 0)
    _assert_same(got, _whole_tensor_path(base, models, method, monkeypatch))
    if spec["name"] in ("ties", "dare_ties") and spec.get("merge_func", "mean") == "mean" and "sampler" not in spec:
        _assert_same(got, reference_global_ties(base, models, spec["retain_ratio"], spec.get("drop_rate", 0.0), seed=5))


def test_streamed_bf16_pool_on_disk_threads_and_memory(tmp_path, small_chunks, monkeypatch):
    shapes = {"a.weight": (128, 100), "b.weight": (7000,), "c.bias": (50,)}
    base, models = _tie_heavy(3, shapes, 2)
    base = {n: t.to(torch.bfloat16) for n, t in base.items()}
    models = {m: {n: t.to(torch.bfloat16) for n, t in sd.items()} for m, sd in models.items()}
    from safetensors.torch import save_file

    for name, sd in [("base", base), *models.items()]:
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
    method = build_method("dare_ties", drop_rate=0.3, retain_ratio=0.2, trim_scope="model")
    want = _whole_tensor_path(base, models, method, monkeypatch)
    _assert_same(want, reference_global_ties(base, models, 0.2, 0.3))
    for threads in (1, 2):
        out = merge_models(tmp_path / "base", {m: tmp_path / m for m in models}, method, tmp_path / f"out{threads}",
                           threads=threads)
        _assert_same(_load_dir(out), want)


def test_nan_in_an_input_gives_the_documented_error(small_chunks):
    from dare_lab.engine.merge import NonFiniteError

    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(100, 90, generator=g)}
    models = {"x": {"a.weight": base["a.weight"] + 0.01}, "y": {"a.weight": base["a.weight"].clone()}}
    models["y"]["a.weight"][3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN/Inf in the delta of tensor 'a.weight' of model 'y'"):
        merge_state_dicts(base, models, build_method("ties", trim_scope="model"))
