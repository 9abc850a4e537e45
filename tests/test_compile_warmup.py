"""numba compiles in the background while the torch path merges (issue 17: a first merge used to
wait ~30 s on numba): same bits either way, no tensor waits, and the rehearsal compiles exactly
the specialisations the merge then uses."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from dare_lab.engine import kernels, merge_state_dicts, streamed, warmup
from dare_lab.engine import merge as engine
from dare_lab.ops.presets import build_method

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba not installed")


@pytest.fixture(autouse=True)
def _own_warm_markers(tmp_path, monkeypatch):
    """Each test starts with no warm markers (earlier merges of the suite leave some)."""
    monkeypatch.setenv("DARE_LAB_WARM_DIR", str(tmp_path / "warm"))


def _pool(k=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(64, 96, generator=g).to(dtype), "b": torch.randn(96, generator=g).to(dtype)}
    models = {f"m{i}": {n: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in base.items()}
              for i in range(k)}
    return base, models


def _count(monkeypatch, name):
    calls = []
    orig = getattr(streamed.StreamedMerge, name)
    monkeypatch.setattr(streamed.StreamedMerge, name, lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    return calls


@pytest.mark.parametrize("method", [dict(name="task_arithmetic", scaling=1.0), dict(name="ties", retain_ratio=0.5),
                                    dict(name="dare_task_arithmetic", drop_rate=0.9, seed=3)], ids=["ta", "ties", "dare_ta"])
def test_tensors_take_the_torch_path_while_numba_compiles(method, monkeypatch):
    monkeypatch.setattr(warmup, "MODE", "background")
    monkeypatch.setattr(warmup, "_done", set())
    release = threading.Event()
    orig = warmup._rehearse
    monkeypatch.setattr(warmup, "_rehearse", lambda *a: release.wait(30) and orig(*a))
    compiled = _count(monkeypatch, "_ties_fused" if method["name"] == "ties" else "_ta_fused")
    base, models = _pool()
    m = build_method(**method)
    try:
        during = merge_state_dicts(base, models, m)
        assert compiled == [], "a tensor used the compiled loops while the rehearsal was still compiling"
        assert streamed.compiled_kernels() is None
    finally:
        release.set()
    for t in threading.enumerate():
        if t.name == "dare-lab-numba-warmup":
            t.join(60)
    assert streamed.compiled_kernels() is kernels
    after = merge_state_dicts(base, models, m)   # rehearsed: no new rehearsal, the compiled loops
    assert compiled, "the compiled loops were not used once the rehearsal finished"
    monkeypatch.setattr(warmup, "MODE", "wait")
    with monkeypatch.context() as mp:
        mp.setattr(engine, "_FAST", False)
        ref = merge_state_dicts(base, models, m)
    for name in ref:
        assert torch.equal(during[name], ref[name]) and torch.equal(after[name], ref[name]), name


CHILD = r"""
import json, sys, threading, torch
from dare_lab.engine import kernels, merge_state_dicts, streamed, warmup
from dare_lab.ops.presets import build_method
K, dtype = int(sys.argv[1]), getattr(torch, sys.argv[2])
g = torch.Generator().manual_seed(0)
base = {"w": torch.randn(40, 50, generator=g).to(dtype), "n": torch.randn(50, generator=g)}
models = {f"m{i}": {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
          for i in range(K)}
method = build_method(name=sys.argv[3], **json.loads(sys.argv[4]))
disp = [kernels.ta_chunk, kernels.ties_chunk, kernels.mt_uniforms, kernels.mt_seed, kernels.bracket_chunk, kernels.abs_delta]
merge_state_dicts(base, models, method)            # starts the rehearsal, merges on torch meanwhile
for t in threading.enumerate():
    if t.name == "dare-lab-numba-warmup":
        t.join()
before = [len(d.signatures) for d in disp]
warmup.MODE = "wait"
merge_state_dicts(base, models, method)            # every tensor on the compiled loops now
print(json.dumps({"before": before, "after": [len(d.signatures) for d in disp], "history": warmup.history()}))
"""


@pytest.mark.parametrize("k,dtype,name,kw", [(2, "bfloat16", "ties", {"retain_ratio": 0.5}),
                                            (3, "float32", "dare_task_arithmetic", {"drop_rate": 0.5})],
                         ids=["ties_bf16", "dare_ta_f32"])
def test_rehearsal_compiles_what_the_merge_uses(k, dtype, name, kw):
    """In a fresh process: after the rehearsal, the merge compiles no further specialisation."""
    env = dict(os.environ, DARE_LAB_COMPILE="background")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(k), dtype, name, json.dumps(kw)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["history"], "no rehearsal ran"
    assert sum(out["before"]) > 0
    assert out["after"] == out["before"], "the merge compiled a specialisation the rehearsal missed"


def test_a_rehearsed_kind_takes_the_compiled_loops_from_the_first_tensor_next_time(tmp_path, monkeypatch):
    """Once rehearsed (numba's cache filled), a later merge of that kind in a new process skips the
    background path: no rehearsal, compiled loops from the first tensor, same bits."""
    monkeypatch.setattr(warmup, "MODE", "background")
    monkeypatch.setattr(warmup, "_done", set())
    base, models = _pool()
    m = build_method(name="ties", retain_ratio=0.5)
    first = merge_state_dicts(base, models, m)
    for t in threading.enumerate():
        if t.name == "dare-lab-numba-warmup":
            t.join(60)
    assert list((tmp_path / "warm").glob("dare_lab_warm-*")), "no warm marker written"
    monkeypatch.setattr(warmup, "_done", set())          # as in a fresh process
    rehearsed = []
    monkeypatch.setattr(warmup, "_rehearse", lambda *a: rehearsed.append(a))
    compiled = _count(monkeypatch, "_ties_fused")
    again = merge_state_dicts(base, models, m)
    assert rehearsed == [] and compiled, "a warm kind went through the background path again"
    for name in first:
        assert torch.equal(first[name], again[name]), name
    monkeypatch.setattr(warmup, "_cpu_name", lambda: "another CPU")   # the marker is keyed on the CPU
    monkeypatch.setattr(warmup, "_done", set())
    merge_state_dicts(base, models, m)
    for t in threading.enumerate():
        if t.name == "dare-lab-numba-warmup":
            t.join(60)
    assert rehearsed, "a marker of another CPU was taken as warm"


@pytest.mark.parametrize("cores,background", [(1, False), (2, True)], ids=["no_free_core", "a_free_core"])
def test_auto_compiles_in_the_background_only_with_a_core_to_spare(cores, background, monkeypatch):
    """``auto`` (the default): an in-memory merge (1 thread) on 1 core compiles first (every tensor
    on the compiled loops), on 2 cores in the background (a rehearsal thread starts)."""
    monkeypatch.setattr(warmup, "MODE", "auto")
    monkeypatch.setattr(warmup, "_done", set())
    monkeypatch.setattr(warmup, "available_cores", lambda: cores)
    rehearsed = []
    monkeypatch.setattr(warmup, "_rehearse", lambda *a: rehearsed.append(a))
    compiled = _count(monkeypatch, "_ties_fused")
    base, models = _pool()
    merged = merge_state_dicts(base, models, build_method(name="ties", retain_ratio=0.5))   # on 1 thread
    for t in threading.enumerate():
        if t.name == "dare-lab-numba-warmup":
            t.join(60)
    assert warmup.resolved_mode(1) == ("background" if background else "wait")
    assert bool(rehearsed) == background
    if not background:
        assert len(compiled) == len(merged), "a tensor took the torch path though the merge waited for numba"


def test_a_bad_compile_mode_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(warmup, "MODE", "later")
    base, models = _pool()
    with pytest.raises(ValueError, match=r"DARE_LAB_COMPILE must be one of auto, background, wait, got 'later'"):
        merge_state_dicts(base, models, build_method(name="task_arithmetic"))
    monkeypatch.setattr(warmup, "MODE", "wait")
    assert warmup.resolved_mode(1) == "wait"
    monkeypatch.setattr(warmup, "MODE", "background")
    assert warmup.resolved_mode(64) == "background"


def test_a_merge_that_waited_marks_its_kinds_warm(tmp_path, monkeypatch):
    """A merge that compiled its own loops (``wait``, e.g. ``auto`` on 2 cores) leaves the same
    warm markers as a rehearsal: a later background-mode merge of that kind rehearses nothing."""
    monkeypatch.setattr(warmup, "MODE", "wait")
    monkeypatch.setattr(warmup, "_done", set())
    base, models = _pool()
    m = build_method(name="ties", retain_ratio=0.5)
    merge_state_dicts(base, models, m)
    assert list((tmp_path / "warm").glob("dare_lab_warm-*")), "no warm marker after a merge that waited"
    monkeypatch.setattr(warmup, "MODE", "background")
    monkeypatch.setattr(warmup, "_done", set())          # as in a fresh process
    rehearsed = []
    monkeypatch.setattr(warmup, "_rehearse", lambda *a: rehearsed.append(a))
    merge_state_dicts(base, models, m)
    assert rehearsed == []
