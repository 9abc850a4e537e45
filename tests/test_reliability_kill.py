"""SIGKILL during a merge: the output path holds the previous complete model, the new complete
model, or nothing — never a directory that loads as a (partial) model.

A child process merges a tiny Llama pool into many small shards with a slowed writer
(``os.pwrite`` and ``os.replace`` wrapped with a sleep and a marker line — in the child
only); the parent kills it with SIGKILL at several points: while importing, at random writes,
just before and just after the atomic exchange of an overwrite, and so on. After each kill a strict loader either
loads every tensor of the output (bit-identical to one of the two complete merges) or finds
no output at all.
"""

import json
import os
import random
import signal
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from dare_lab.engine import merge_models
from dare_lab.ops.presets import build_method

CHILD = r"""
import os, sys, time
DELAY = float(os.environ["KILL_TEST_DELAY"])
import threading
_pwrite, _replace = os.pwrite, os.replace
n, lock = [0], threading.Lock()
def say(text):
    with lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
def slow_pwrite(fd, data, offset):
    with lock:
        n[0] += 1
        k = n[0]
    say(f"W {k}")
    time.sleep(DELAY)
    return _pwrite(fd, data, offset)
def slow_replace(src, dst):
    say(f"R {os.path.basename(str(src))}")
    time.sleep(0.3)
    out = _replace(src, dst)
    say("R done")
    return out
say("START")
from dare_lab.engine import merge_models
from dare_lab.ops.presets import build_method
import dare_lab.engine.writer as writer
_exchange = writer.exchange
def slow_exchange(a, b):
    say(f"X {os.path.basename(str(a))}")
    time.sleep(0.3)
    out = _exchange(a, b)
    say("X done")
    time.sleep(0.3)
    return out
os.pwrite, os.replace, writer.exchange = slow_pwrite, slow_replace, slow_exchange
base, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
models = dict(a.split("=", 1) for a in sys.argv[4:])
print("MERGE", flush=True)
merge_models(base, models, build_method("dare_ties", drop_rate=0.5, seed=seed), out, overwrite=True,
             threads=2, max_shard_size="6KB")
print("DONE", flush=True)
"""


def method(seed):
    return build_method("dare_ties", drop_rate=0.5, seed=seed)


def strict_load(out: Path) -> dict[str, torch.Tensor] | None:
    """What a user's loader gets: None when no model is there, else every tensor (raising on any damage)."""
    if not out.exists():
        return None
    index = out / "model.safetensors.index.json"
    files = sorted({out / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.exists() else [out / "model.safetensors"]
    sd = {}
    for f in files:
        sd.update(load_file(f))
    meta = json.loads((out / "dare_lab_merge.json").read_text())  # written last before the rename
    assert meta["tensors"]["merged"] > 0
    assert (out / "config.json").exists()
    return sd


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kill_at(args, env, trigger, timeout=240):
    """Run the child until ``trigger(line)`` is true, then SIGKILL it. Returns the lines seen."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    seen = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            seen.append(line.strip())
            if trigger(line.strip()) or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    return seen


def at_write(k):
    return lambda line: line.startswith("W ") and int(line.split()[1]) >= k


def test_sigkill_during_merge_leaves_old_new_or_nothing(tiny_llama_pool, tmp_path):
    """Six kill points, run side by side (each child merges into its own copy of the old model)."""
    pool = tiny_llama_pool
    old = {k: v.contiguous() for k, v in merge_models(pool.base, pool.models, method(0), None).items()}
    new = {k: v.contiguous() for k, v in merge_models(pool.base, pool.models, method(1), None).items()}
    first = tmp_path / "k0" / "merged"
    merge_models(pool.base, pool.models, method(0), first, max_shard_size="6KB")
    assert same(strict_load(first), old)
    assert len(list(first.glob("*.safetensors"))) > 5  # many shards: kills land inside the write phase

    rng = random.Random(int(os.environ.get("DARE_LAB_KILL_SEED", "7")))
    picks = sorted(rng.sample(range(1, len(old)), 2))
    triggers = [
        ("during start-up", lambda line: line == "START"),
        *[(f"at write {k}", at_write(k)) for k in picks],
        ("just before the exchange", lambda line: line.startswith("X .merged.tmp-")),  # new complete, not in place
        ("just after the exchange", lambda line: line == "X done"),  # new in place, old in a hidden sibling
        ("after the commit", lambda line: line == "DONE"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "KILL_TEST_DELAY": "0.03",
           "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"k{i}" / "merged" for i in range(len(triggers))]
    for o in outs[1:]:
        shutil.copytree(first, o)
    results: dict[int, list[str]] = {}

    def one(i):
        args = [sys.executable, "-c", CHILD, pool.base, str(outs[i]), "1", *[f"{m}={p}" for m, p in pool.models.items()]]
        results[i] = kill_at(args, env, triggers[i][1])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(triggers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = []
    for i, (what, _) in enumerate(triggers):
        after = strict_load(outs[i])
        state = "none" if after is None else "old" if same(after, old) else "new" if same(after, new) else "CORRUPT"
        outcomes.append((what, state, results[i][-1] if results[i] else ""))
        for p in outs[i].parent.iterdir():  # leftovers are hidden siblings only, never at the output path
            assert p == outs[i] or p.name.startswith(".merged."), p
    assert "CORRUPT" not in [s for _, s, _ in outcomes], outcomes
    expected = ["old", "old", "old", "old", "new", "new"]
    assert [s for _, s, _ in outcomes] == expected, outcomes
    print("kill points survived:", len(outcomes), outcomes)


def test_overwrite_without_atomic_exchange_falls_back_to_two_renames(tiny_llama_pool, tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is unavailable, the old output is renamed aside first."""
    import dare_lab.engine.writer as writer

    pool = tiny_llama_pool
    out = tmp_path / "merged"
    merge_models(pool.base, pool.models, method(0), out)
    monkeypatch.setattr(writer, "exchange", lambda a, b: False)
    merge_models(pool.base, pool.models, method(1), out, overwrite=True)
    new = merge_models(pool.base, pool.models, method(1), None)
    assert same(strict_load(out), {k: v.contiguous() for k, v in new.items()})
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
