"""Per-model and per-tensor knob values (method.overrides) against direct formulas."""

import pytest
import torch

from dare_lab.ops import tensor_generator
from dare_lab.ops.merge import ties_disjoint_merge, ties_elect, ties_trim
from dare_lab.ops.method import MergeMethod, Merger, Sparsifier
from dare_lab.ops.overrides import OverriddenMethod, parse_overrides
from dare_lab.ops.sparsify import dare


def _pool(shape=(6, 5)):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    return base, {m: base + 0.1 * torch.randn(shape, generator=g) for m in ("a", "b", "c")}


def _method(sparsifier="dare", merger="task_arithmetic", p=0.5, overrides=(), **mg):
    sp = Sparsifier(kind=sparsifier, drop_rate=p)
    return OverriddenMethod(name="x", sparsifier=sp, merger=Merger(kind=merger, **mg), seed=3,
                            overrides=parse_overrides(overrides))


def test_uniform_overrides_equal_the_plain_method_bit_for_bit():
    base, ft = _pool()
    for merger in ("average", "task_arithmetic", "ties"):
        plain = MergeMethod(name="x", sparsifier=Sparsifier(kind="dare", drop_rate=0.5),
                            merger=Merger(kind=merger, scaling=0.7), seed=3)
        over = _method(merger=merger, scaling=0.7, overrides=[{"drop_rate": 0.5}])
        assert torch.equal(over.merge_tensor("l.w", base, ft), plain.merge_tensor("l.w", base, ft))
    assert MergeMethod.streamable and not OverriddenMethod.streamable


def test_per_model_drop_rate_and_weight_follow_task_arithmetic():
    base, ft = _pool()
    m = _method(p=0.5, scaling=0.5, weights=(1.0, 2.0, 3.0),
                overrides=[{"models": ["b"], "drop_rate": 0.9}, {"models": ["c"], "weight": -1.0}])
    want = base.clone()
    acc = torch.zeros_like(base)
    for name, p, w in (("a", 0.5, 1.0), ("b", 0.9, 2.0), ("c", 0.5, -1.0)):
        acc += w * dare(ft[name] - base, p, tensor_generator(3, name, "l.w"))
    want += 0.5 * acc
    assert torch.allclose(m.merge_tensor("l.w", base, ft), want, atol=0, rtol=1e-6)


def test_pattern_overrides_retain_ratio_and_scaling_per_tensor_and_the_later_entry_wins():
    base, ft = _pool()
    m = _method(sparsifier="none", p=0.0, merger="ties", retain_ratio=0.2, scaling=1.0,
                overrides=[{"pattern": r"mlp\.", "retain_ratio": 0.6, "scaling": 2.0},
                           {"models": ["a"], "pattern": r"mlp\.", "retain_ratio": 1.0}])

    def ties_ref(ratios, lam):
        trimmed = [ties_trim(ft[n] - base, r) for n, r in zip("abc", ratios)]
        return base + lam * ties_disjoint_merge(trimmed, ties_elect(trimmed))

    assert torch.equal(m.merge_tensor("layer.mlp.w", base, ft), ties_ref([1.0, 0.6, 0.6], 2.0))
    assert torch.equal(m.merge_tensor("layer.attn.w", base, ft), ties_ref([0.2, 0.2, 0.2], 1.0))
    assert m.describe()["overrides"][1] == {"models": ["a"], "pattern": r"mlp\.", "retain_ratio": 1.0}


@pytest.mark.parametrize("entry,message", [
    ({"models": ["a"]}, "sets no knob"),
    ({"density": 0.5}, "unknown knob 'density'"),
    ({"models": ["a"], "scaling": 2.0}, "scaling applies to whole tensors"),
    ({"retain_ratio": 0.0}, r"retain_ratio=0.0 \(everywhere\) is outside \(0, 1\]"),
    ({"weight": "2"}, "weight='2' .* is not a finite number"),
    ({"pattern": "(", "weight": 1.0}, "is not a regular expression"),
    ("drop_rate=0.9", "must be a mapping"),
])
def test_bad_overrides_are_one_line_errors(entry, message):
    with pytest.raises(ValueError, match=message):
        _method(merger="ties", overrides=[entry])


def test_overrides_that_cannot_apply_are_refused():
    with pytest.raises(ValueError, match="drop_rate=1.0"):
        _method(overrides=[{"models": ["a"], "drop_rate": 1.0}])   # DARE rescales: p < 1
    with pytest.raises(ValueError, match="retain_ratio .* but the merger is task_arithmetic"):
        _method(overrides=[{"retain_ratio": 0.5}])
    with pytest.raises(ValueError, match="no sparsifier"):
        _method(sparsifier="none", p=0.0, overrides=[{"drop_rate": 0.5}])
    with pytest.raises(ValueError, match=r"names models \['d'\] that are not in the pool \['a', 'b', 'c'\]"):
        _method(overrides=[{"models": ["d"], "weight": 2.0}]).check_models(["a", "b", "c"])


def test_descriptions_state_the_rescale_that_is_applied():
    sp = lambda kind, **kw: MergeMethod(sparsifier=Sparsifier(kind, 0.9, **kw)).describe()["sparsifier"]["rescale"]  # noqa: E731
    assert [sp("dare"), sp("drop_only"), sp("magnitude"), sp("magnitude", rescale=True)] == [True, False, False, True]
