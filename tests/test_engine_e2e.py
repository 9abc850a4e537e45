"""End to end: tiny pools merged through the ``dare-lab`` command load with transformers and
their logits equal a direct in-memory computation of the same formula."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from dare_lab.ops import tensor_generator


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "dare_lab.shell.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def load_dir(path) -> dict:
    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def reference_dare(delta, p, seed, model, name):
    """Plain DARE written out: keep iff U[0,1) (float32, per-tensor generator) ≥ p, then ÷(1−p)."""
    u = torch.rand(delta.shape, generator=tensor_generator(seed, model, name), dtype=torch.float32)
    return torch.where(u >= p, delta / (1 - p), torch.zeros(()))


def reference_ties(base, deltas, k, lam):
    """TIES written out with a full sort per tensor (stable: ties by lowest index)."""
    trimmed = []
    for d in deltas:
        flat = d.flatten()
        keep = int(torch.ceil(torch.tensor(k * flat.numel() - 1e-9)).item())
        order = torch.sort(flat.abs(), descending=True, stable=True).indices[:keep]
        t = torch.zeros_like(flat)
        t[order] = flat[order]
        trimmed.append(t.view_as(d))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return base + lam * merged


def test_dare_ties_llama_through_cli_matches_reference(tiny_llama_pool, tmp_path):
    pool = tiny_llama_pool
    out = tmp_path / "merged"
    r = run_cli("modelpool=custom", f"modelpool.base={pool.base}", f"+modelpool.models={{ft0: {pool.models['ft0']}, ft1: {pool.models['ft1']}}}",
                "method=dare_ties", "method.drop_rate=0.5", "method.retain_ratio=0.5", "method.scaling=0.8", "method.seed=3",
                f"output.model_dir={out}", "engine.max_shard_size=30KB", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "metrics.json" in r.stdout and (out / "model.safetensors.index.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()

    base_sd, fts = load_dir(pool.base), {m: load_dir(p) for m, p in pool.models.items()}
    expected = {}
    for name, b in base_sd.items():
        deltas = [reference_dare(fts[m][name].float() - b.float(), 0.5, 3, m, name) for m in ("ft0", "ft1")]
        expected[name] = reference_ties(b.float(), deltas, 0.5, 0.8)
    ref = AutoModelForCausalLM.from_pretrained(pool.base).eval()
    ref.load_state_dict(expected, strict=False)
    ids = torch.tensor([[1, 5, 9, 17, 33, 40, 2]])
    with torch.inference_mode():
        assert torch.equal(merged(ids).logits, ref(ids).logits)
    card = (out / "README.md").read_text()
    assert "dare_ties" in card and "seed: 3" in card and pool.models["ft0"] in card
    meta = json.loads((out / "dare_lab_merge.json").read_text())
    assert meta["method"]["sparsifier"]["drop_rate"] == 0.5 and meta["method"]["sparsifier"]["sampler"] == "torch_rand"


def test_dare_task_arithmetic_bert_keeps_heads_out_and_matches_reference(tiny_bert_pool, tmp_path):
    pool = tiny_bert_pool
    out = tmp_path / "merged_bert"
    r = run_cli("modelpool=custom", f"modelpool.base={pool.base}", f"+modelpool.models={{ft0: {pool.models['ft0']}, ft1: {pool.models['ft1']}}}",
                "method=dare_task_arithmetic", "method.drop_rate=0.9", "method.scaling=0.5", "method.seed=11",
                f"output.model_dir={out}", "engine.out_dtype=bfloat16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16
    base_sd, fts = load_dir(pool.base), {m: load_dir(p) for m, p in pool.models.items()}
    out_sd = load_dir(out)
    for name, b in base_sd.items():
        if name.startswith("classifier"):
            assert torch.equal(out_sd[name], b.to(torch.bfloat16))  # heads never merged: base's copied
            continue
        acc = sum(reference_dare(fts[m][name] - b, 0.9, 11, m, name) for m in ("ft0", "ft1"))
        assert torch.equal(out_sd[name], (b + 0.5 * acc).to(torch.bfloat16)), name


def test_sweep_over_drop_rates_writes_one_row_per_run(tiny_bert_pool, tmp_path):
    pool = tiny_bert_pool
    r = run_cli("-m", "modelpool=custom", f"modelpool.base={pool.base}", f"+modelpool.models={{a: {pool.models['ft0']}}}",
                "method.drop_rate=0.0,0.5,0.9", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summaries = list((tmp_path / "results" / "sweeps").rglob("summary.csv"))
    assert len(summaries) == 1
    lines = summaries[0].read_text().strip().splitlines()
    assert len(lines) == 4 and all(f"method.drop_rate={p}" in "\n".join(lines) for p in ("0.0", "0.5", "0.9"))
    for job in ("0", "1", "2"):
        assert (summaries[0].parent / job / "metrics.json").exists()
        assert (summaries[0].parent / job / "config.yaml").exists()
