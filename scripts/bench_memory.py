"""Peak memory of a streamed merge vs the size of its largest tensor.

Builds a synthetic bf16 pool (base + K fine-tuned) whose largest tensor is known, merges it
in a fresh subprocess per method, and reads the child's peak RSS. The engine's claim: peak ≈
baseline (interpreter + torch) + about (K+1) × largest tensor in fp32 per worker thread,
independent of the number of tensors. Writes results/bench/memory.md.

    python scripts/bench_memory.py [--rows 8192 --cols 4096 --n-small 24 --k 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
from dare_lab.engine import merge_models
from dare_lab.ops.presets import build_method
cfg = json.loads(sys.argv[1])
rss0 = hwm_kb()  # after imports; VmHWM is per process image (ru_maxrss survives exec)
t = time.perf_counter()
merge_models(cfg["base"], cfg["models"], build_method(cfg["method"], **cfg["kw"]), cfg["out"], threads=cfg["threads"])
print(json.dumps({"baseline_kb": rss0, "peak_kb": hwm_kb(),
                  "seconds": time.perf_counter() - t}))
"""


def build_pool(root: Path, rows: int, cols: int, n_small: int, k: int) -> tuple[str, dict[str, str]]:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base = {"big.weight": torch.randn(rows, cols, generator=gen).mul_(0.02).to(torch.bfloat16)}
    for i in range(n_small):
        base[f"layer{i}.weight"] = torch.randn(rows // 4, cols, generator=gen).mul_(0.02).to(torch.bfloat16)
    models = {}
    for name in ["base"] + [f"ft{j}" for j in range(k)]:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        sd = base if name == "base" else {n: (t.float() + 0.001 * torch.randn(t.shape, generator=gen)).to(torch.bfloat16) for n, t in base.items()}
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        if name != "base":
            models[name] = str(d)
    return str(root / "base"), models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--n-small", type=int, default=24)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--methods", default="task_arithmetic,dare_task_arithmetic,dare_ties")
    ap.add_argument("--out", default="results/bench/memory.md")
    args = ap.parse_args()
    largest_fp32 = args.rows * args.cols * 4
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base, models = build_pool(Path(tmp) / "pool", args.rows, args.cols, args.n_small, args.k)
        total_params = args.rows * args.cols * (1 + args.n_small / 4)
        knobs = {"task_arithmetic": {}, "dare_task_arithmetic": {"drop_rate": 0.9}, "dare_ties": {"drop_rate": 0.9, "retain_ratio": 0.5}}
        for method in args.methods.split(","):
            kw = knobs[method]
            for threads in (1, 2):
                cfg = {"base": base, "models": models, "method": method, "kw": kw, "threads": threads,
                       "out": str(Path(tmp) / f"out_{method}_{threads}")}
                r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, check=True)
                res = json.loads(r.stdout.strip().splitlines()[-1])
                extra = (res["peak_kb"] - res["baseline_kb"]) * 1024
                rows.append({"method": method, "threads": threads, "seconds": res["seconds"],
                             "baseline_MB": res["baseline_kb"] / 1024, "peak_MB": res["peak_kb"] / 1024,
                             "peak_above_baseline_MB": extra / 2**20,
                             "x_largest_fp32": extra / largest_fp32})
    lines = [
        "# Streamed merge: peak memory vs largest tensor", "",
        f"Pool: base + K={args.k} fine-tuned, bf16, {args.n_small + 1} tensors, {total_params / 1e6:.0f} M parameters per model "
        f"({total_params * 2 / 2**20:.0f} MiB on disk each); largest tensor {args.rows}×{args.cols} = "
        f"{largest_fp32 / 2**20:.0f} MiB in fp32. (K+1) × largest = {(args.k + 1) * largest_fp32 / 2**20:.0f} MiB.", "",
        "Command: `python scripts/bench_memory.py " + " ".join(sys.argv[1:]) + "`", "",
        "| method | threads | wall s | baseline RSS MiB | peak RSS MiB | peak − baseline MiB | ÷ largest fp32 tensor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['threads']} | {r['seconds']:.2f} | {r['baseline_MB']:.0f} | {r['peak_MB']:.0f} | "
                     f"{r['peak_above_baseline_MB']:.0f} | {r['x_largest_fp32']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
