"""The streamed fast path equals the whole-tensor reference bit for bit, whatever the threads.

Inputs are bf16-quantised (so |δ| has many exact ties), hold −0.0, exact cancellations between
models (TIES' summed sign 0) and tensors larger than one chunk (the engine's chunk is shrunk
to 4096 entries so thresholds, tie quotas, mask streams and majority signs cross chunks).
"""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import dare_lab.engine.merge as engine
import dare_lab.engine.streamed as streamed
from dare_lab.engine import kernels as fused
from dare_lab.engine import warmup
from dare_lab.engine import merge_models, merge_state_dicts
from dare_lab.ops.method import MergeMethod, Merger, Sparsifier
from dare_lab.ops.sparsify import kth_largest, top_magnitude_mask

SHAPES = {"embed.weight": (203, 96), "layers.0.w": (96, 150), "layers.0.b": (150,), "layers.1.w": (300, 250), "norm": (96,)}


def make_pool(seed=0, k=3, negative=False):
    g = torch.Generator().manual_seed(seed)
    base, models = {}, {f"m{i}": {} for i in range(k)}
    for name, shape in SHAPES.items():
        b = (torch.randn(shape, generator=g) * 0.02).bfloat16()
        b.view(-1)[:7] = -0.0
        base[name] = b
        deltas = []
        for i in range(k):
            d = torch.randn(shape, generator=g) * 0.001 - (0.0005 if negative else 0.0)
            if i == 1:  # exact cancellation with model 0 on a stripe of entries
                d.view(-1)[::5] = -deltas[0].view(-1)[::5]
            deltas.append(d)
            models[f"m{i}"][name] = (b.float() + d).bfloat16()
    return base, models


METHODS = {
    "ta": MergeMethod("ta", Sparsifier(), Merger("task_arithmetic", scaling=1.0)),
    "ta_weighted": MergeMethod("taw", Sparsifier(), Merger("task_arithmetic", scaling=0.8, weights=(0.7, -0.3, 1.3))),
    "average": MergeMethod("avg", Sparsifier(), Merger("average")),
    "ties": MergeMethod("ties", Sparsifier(), Merger("ties", retain_ratio=0.5)),
    "ties_sum_w": MergeMethod("ties2", Sparsifier(), Merger("ties", retain_ratio=0.3, merge_func="sum", weights=(1.0, 0.5, 2.0), weighted_election=True)),
    "ties_max": MergeMethod("ties3", Sparsifier(), Merger("ties", retain_ratio=0.7, merge_func="max", scaling=0.9)),
    "dare_ta": MergeMethod("dare_ta", Sparsifier("dare", 0.9), Merger("task_arithmetic"), seed=3),
    "dare_ta_w": MergeMethod("dare_ta_w", Sparsifier("dare", 0.5), Merger("task_arithmetic", weights=(0.3, 1.0, -2.0)), seed=3),
    "dare_ties": MergeMethod("dare_ties", Sparsifier("dare", 0.9), Merger("ties", retain_ratio=1.0), seed=1),
    "dare_ties_trim": MergeMethod("dare_ties_t", Sparsifier("dare", 0.6), Merger("ties", retain_ratio=0.5), seed=1),
    "drop_only": MergeMethod("drop", Sparsifier("drop_only", 0.7), Merger("average"), seed=2),
    "magnitude": MergeMethod("mp", Sparsifier("magnitude", 0.7), Merger("task_arithmetic")),
    "magnitude_rescale_ties": MergeMethod("mp2", Sparsifier("magnitude", 0.5, rescale=True), Merger("ties", retain_ratio=0.5)),
    "dare_finetuned": MergeMethod("dft", Sparsifier("dare", 0.3, target="finetuned"), Merger("task_arithmetic"), seed=4),
    "mag_finetuned_ties": MergeMethod("mft", Sparsifier("magnitude", 0.4, target="finetuned"), Merger("ties", retain_ratio=0.6)),
    "geometric_ta": MergeMethod("geo", Sparsifier("dare", 0.9, sampler="geometric"), Merger("task_arithmetic"), seed=5),
    "geometric_ties": MergeMethod("geo2", Sparsifier("dare", 0.8, sampler="geometric"), Merger("ties", retain_ratio=0.5), seed=5),
    "geometric_drop_ft": MergeMethod("geo3", Sparsifier("drop_only", 0.5, sampler="geometric", target="finetuned"), Merger("average"), seed=5),
}


def reference(base, models, method, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(engine, "_FAST", False)
        return merge_state_dicts(base, models, method)


@pytest.fixture(autouse=True, params=[True, False] if fused.AVAILABLE else [False], ids=["compiled", "torch"])
def small_chunks(request, monkeypatch):
    """Every test runs with the compiled TIES loops and with the torch code (same bits)."""
    monkeypatch.setattr(engine, "_CHUNK", 4096)
    monkeypatch.setattr(streamed, "FUSED", request.param)
    monkeypatch.setattr(warmup, "MODE", "wait")  # every tensor on the path under test (no background compile)
    # the sampled-bracket threshold pass from 16K entries (so these small tensors take it)
    monkeypatch.setattr(streamed, "BRACKET_MIN", 1 << 14)


def assert_bits_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.int16) if a[name].dtype == torch.bfloat16 else a[name],
                           b[name].view(torch.int16) if b[name].dtype == torch.bfloat16 else b[name]), name


@pytest.mark.parametrize("negative", [False, True], ids=["majority+", "majority-"])
@pytest.mark.parametrize("key", sorted(METHODS))
def test_streamed_equals_reference_bit_for_bit(key, negative, monkeypatch):
    base, models = make_pool(seed=len(key), negative=negative)
    method = METHODS[key]
    ref = reference(base, models, method, monkeypatch)
    fast = merge_models(engine.StateDictSource(base, "base"), {m: engine.StateDictSource(sd, m) for m, sd in models.items()},
                        method, None, threads=2)
    assert_bits_equal(ref, fast)
    fp32 = merge_models(engine.StateDictSource(base, "base"), {m: engine.StateDictSource(sd, m) for m, sd in models.items()},
                        method, None, threads=1, out_dtype="float32")
    with monkeypatch.context() as mp:
        mp.setattr(engine, "_FAST", False)
        ref32 = merge_state_dicts(base, models, method, out_dtype="float32")
    assert_bits_equal(ref32, fp32)


def write_pool(tmp_path, base, models):
    paths = {}
    for name, sd in {"base": base, **models}.items():
        d = tmp_path / name
        d.mkdir()
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        paths[name] = str(d)
    return paths.pop("base"), paths


@pytest.mark.parametrize("key", ["ta", "ties", "dare_ta", "dare_ties", "geometric_ta", "magnitude_rescale_ties"])
def test_files_threads_1_and_2_identical_and_equal_reference(key, tmp_path, monkeypatch):
    base, models = make_pool(seed=7)
    base_dir, model_dirs = write_pool(tmp_path, base, models)
    method = METHODS[key]
    outs = []
    for threads in (1, 2):
        out = merge_models(base_dir, model_dirs, method, tmp_path / f"out{threads}", threads=threads, max_shard_size="100KB")
        outs.append({f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))})
    assert outs[0] == outs[1]
    merged = {}
    for f in sorted((tmp_path / "out2").glob("*.safetensors")):
        merged.update(load_file(f))
    assert_bits_equal(reference(base, models, method, monkeypatch), merged)


def test_nan_falls_back_to_the_reference_error(tmp_path):
    base, models = make_pool()
    models["m1"]["layers.1.w"][5, 7] = float("nan")
    with pytest.raises(engine.NonFiniteError, match="NaN/Inf in the delta of tensor 'layers.1.w' of model 'm1'"):
        merge_models(engine.StateDictSource(base, "base"), {m: engine.StateDictSource(sd, m) for m, sd in models.items()},
                     METHODS["dare_ta"], None, threads=2)


@pytest.mark.parametrize("n,k,levels", [(70_000, 35_000, 0), (100_003, 7, 0), (200_000, 150_000, 5), (90_000, 89_999, 3), (80_000, 1, 2)])
def test_kth_largest_equals_kthvalue(n, k, levels):
    g = torch.Generator().manual_seed(n + k)
    a = torch.randn(n, generator=g).abs()
    if levels:
        a = (a * levels).round() / levels  # few distinct values: huge tie groups
    thr, greater = kth_largest(a, k)
    assert thr == torch.kthvalue(a, n - k + 1).values
    assert greater == int((a > thr).sum())


@pytest.mark.parametrize("k", [1, 5_000, 40_000, 100_000, 199_999])
def test_kth_largest_on_mostly_zeros(k, monkeypatch):
    """|δ| after DARE at p = 0.9: the sample brackets a single value (0); counted, never gathered."""
    g = torch.Generator().manual_seed(k)
    a = torch.rand(200_000, generator=g)
    a[torch.rand(200_000, generator=g) < 0.9] = 0.0
    gathered = []
    monkeypatch.setattr(torch, "kthvalue", lambda t, i: gathered.append(t.numel()) or _kthvalue(t, i))
    thr, greater = kth_largest(a, k)
    ref = _kthvalue(a, a.numel() - k + 1).values
    assert thr == ref and greater == int((a > ref).sum())
    if ref == 0:
        assert gathered == []   # the degenerate bracket answered by counting alone


_kthvalue = torch.kthvalue


def test_top_magnitude_mask_breaks_ties_by_lowest_index():
    x = torch.tensor([1.0, -3.0, 2.0, 3.0, 2.0, -2.0, 0.5] * 12_000)
    keep = top_magnitude_mask(x, 24_000 + 5)
    ties = torch.nonzero(keep & (x.abs() == 2.0)).flatten()
    assert int(keep.sum()) == 24_005 and ties.tolist() == [2, 4, 5, 9, 11]
    assert bool(keep[x.abs() == 3.0].all())


@pytest.mark.parametrize("key", ["ties", "dare_ties", "ties_sum_w", "ties_max"])
def test_files_with_majority_patches_equal_reference(key, tmp_path, monkeypatch):
    """Negative majority: entries whose summed sign is 0 are patched in the written shards."""
    base, models = make_pool(seed=11, negative=True)
    base_dir, model_dirs = write_pool(tmp_path, base, models)
    out = merge_models(base_dir, model_dirs, METHODS[key], tmp_path / "out", threads=2, max_shard_size="100KB")
    merged = {}
    for f in sorted(out.glob("*.safetensors")):
        merged.update(load_file(f))
    assert_bits_equal(reference(base, models, METHODS[key], monkeypatch), merged)


def test_compiled_loops_are_used():
    assert fused.AVAILABLE, "numba is a dependency: the compiled TIES loops must load"


@pytest.mark.parametrize("lo_hi", [(0.0, 1e-9), (0.5, 1.0), (0.0, 0.0)], ids=["below", "above", "empty"])
def test_missed_bracket_falls_back_to_the_exact_search(lo_hi, monkeypatch):
    """A sampled bracket that misses the k-th value (rows of very different scale, say) must
    still give the exact threshold: the whole-|δ| search runs for that model."""
    monkeypatch.setattr(streamed, "sample_bracket", lambda *a, **k: lo_hi)
    calls = []
    orig = streamed.StreamedMerge._threshold
    monkeypatch.setattr(streamed.StreamedMerge, "_threshold", lambda self, *a, **k: calls.append(a) or orig(self, *a, **k))
    base, models = make_pool(seed=5)
    method = METHODS["ties"]
    fast = merge_state_dicts(base, models, method)
    assert_bits_equal(reference(base, models, method, monkeypatch), fast)
    if streamed.FUSED:
        assert calls, "the fallback search did not run"


@pytest.mark.parametrize("key", sorted(METHODS))
def test_streamed_path_never_falls_back_on_finite_inputs(key, monkeypatch):
    """A false NaN/Inf alarm would hide a wrong fast path behind the reference's result."""
    base, models = make_pool(seed=3)

    def no_fallback(*a, **k):
        raise AssertionError("the streamed path fell back to the whole-tensor reference")
    monkeypatch.setattr(engine, "_merge_one_reference", no_fallback)
    merge_models(engine.StateDictSource(base, "base"), {m: engine.StateDictSource(sd, m) for m, sd in models.items()},
                 METHODS[key], None, threads=1)



def _outcome(fn):
    """The error message, or the result's raw bits (a dropped overflowing δ may vanish)."""
    try:
        out = fn()
    except engine.NonFiniteError as err:
        return str(err)
    return {k: v.view(torch.int16) if v.dtype == torch.bfloat16 else v for k, v in out.items()}


@pytest.mark.parametrize("key", ["ta", "average", "dare_ta", "drop_only", "ties", "dare_ties", "dare_ties_trim"])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "overflow"])
def test_non_finite_anywhere_gives_the_reference_outcome(key, bad, monkeypatch):
    """The compiled loops check only what must be checked (task arithmetic: its output, where
    any NaN/Inf δ lands, even a DARE-dropped one, as Inf·0 = NaN); whatever the reference
    does with a NaN/Inf (raise, or drop an overflowing δ), the fast path does too."""
    base, models = make_pool(seed=7)
    name, at = "layers.1.w", (17, 3)   # inside the second 4096-entry chunk
    if bad == "overflow":              # finite inputs whose δ overflows float32
        base[name][at], models["m2"][name][at] = -3.3e38, 3.3e38
    else:
        models["m2"][name][at] = float(bad)
    run = lambda: merge_models(engine.StateDictSource(base, "base"),  # noqa: E731
                               {m: engine.StateDictSource(sd, m) for m, sd in models.items()}, METHODS[key], None, threads=1)
    with monkeypatch.context() as mp:
        mp.setattr(engine, "_FAST", False)
        expected = _outcome(run)
    got = _outcome(run)
    if isinstance(expected, str):
        assert got == expected
    else:
        assert_bits_equal(expected, got)


def test_compiled_bf16_rounding_is_torchs_on_the_hard_cases(monkeypatch):
    """Task arithmetic's loop rounds fp32 → bf16 itself: halfway cases (to even), negative
    ones, subnormals, -0.0 and values that round up to ±Inf give torch's bits."""
    one_ulp = 2.0 ** -7                      # bf16 spacing at 1.0
    hard = [1 + one_ulp / 2, 1 + 3 * one_ulp / 2, -(1 + one_ulp / 2), -(1 + 3 * one_ulp / 2), 1 + one_ulp / 2 + 2**-20,
            2.0 ** -130, -(2.0 ** -133) * 3, 1e-45, -0.0, 0.0, 3.3961e38, -3.3961e38, 65504.0, 1 / 3, -2 / 3]
    x = torch.tensor(hard * 700, dtype=torch.float32)   # 10 500 entries: several blocks and chunks
    base, models = {"w": torch.zeros_like(x)}, {"a": {"w": x}}
    method = METHODS["ta"]
    with monkeypatch.context() as mp:
        mp.setattr(engine, "_FAST", False)
        want = merge_state_dicts(base, models, method, out_dtype="bf16")["w"]
    got = merge_state_dicts(base, models, method, out_dtype="bf16")["w"]
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    nz = x != 0   # 0 + (−0.0) is +0.0 on both paths
    assert torch.equal(want.view(torch.int16)[nz], x.bfloat16().view(torch.int16)[nz])
