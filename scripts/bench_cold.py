"""Merges from a cold page cache: what reading real checkpoints from disk costs.

    sudo python scripts/bench_cold.py [--size 1b] [--models 3] [--reps 2] [--methods ta,ties,dare_ta,dare_ties]

``scripts/bench_merge.py`` times merges whose inputs sit in the page cache; checkpoints people
merge are usually read from disk. Before each run this script drops the page cache (it writes
``/proc/sys/vm/drop_caches``, so it needs root, and says so in one line otherwise) and times:
the inputs read cold by one stream, the inputs read cold by one reader per checkpoint in
parallel (the disk's floor for the merge's reads), and each dare_lab merge (a fresh process, as
in ``bench_merge.py``). Same synthetic checkpoints as ``bench_merge.py`` (built once, cached).
Writes ``results/bench/cold.md``. Timings never go into tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import METHODS, REPO, build_checkpoint, dare_lab_cmd, median, param_count, read_inputs, run_measured  # noqa: E402

DROP = Path("/proc/sys/vm/drop_caches")


def drop_caches() -> None:
    os.sync()
    DROP.write_text("1\n")


def cold_read(inputs: list[Path], parallel: bool) -> float:
    """Seconds to read every input file from a just-dropped cache: one stream, or one per checkpoint."""
    drop_caches()
    t = time.perf_counter()
    if parallel:
        threads = [threading.Thread(target=read_inputs, args=([d],)) for d in inputs]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    else:
        read_inputs(inputs)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1b")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--methods", default="ta,ties,dare_ta,dare_ties")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=os.environ.get("DARE_LAB_BENCH_CACHE", str(Path.home() / ".cache" / "dare_lab_bench")))
    ap.add_argument("--out", default=str(REPO / "results" / "bench"))
    args = ap.parse_args()
    if not os.access(DROP, os.W_OK):
        sys.exit(f"bench_cold: {DROP} is not writable (run as root): the page cache cannot be dropped")
    keys = [k for k in args.methods.split(",") if k]
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        sys.exit(f"bench_cold: unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})")
    cache = Path(args.cache)
    scratch = cache / "out"
    scratch.mkdir(parents=True, exist_ok=True)
    base = build_checkpoint(cache, args.size, 0)
    models = [build_checkpoint(cache, args.size, i) for i in range(1, args.models + 1)]
    inputs = [base, *models]
    nbytes = sum(f.stat().st_size for d in inputs for f in d.glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    one, par, runs = [], [], {k: [] for k in keys}
    for rep in range(args.reps):
        one.append(cold_read(inputs, parallel=False))
        par.append(cold_read(inputs, parallel=True))
        print(f"rep {rep}: cold read one stream {one[-1]:.2f} s, {len(inputs)} streams {par[-1]:.2f} s", flush=True)
        for key in keys:
            out = scratch / f"cold-{key}"
            shutil.rmtree(out, ignore_errors=True)
            drop_caches()
            r = run_measured(dare_lab_cmd(base, models, METHODS[key][0], out, args.threads), env)
            r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
            shutil.rmtree(out, ignore_errors=True)
            runs[key].append(r)
            print(f"  {key:10s} merge only {r['merge_s']:6.2f} s  wall {r['wall']:6.2f} s", flush=True)
    floor = median(par)
    lines = ["# Merges from a cold page cache", "",
             f"Synthetic bf16 checkpoints as in `merge.md` (size `{args.size}`, {param_count(args.size) / 1e9:.3f} B "
             f"parameters each, K = {args.models}: {nbytes / 1e9:.2f} GB of inputs); the page cache is dropped before "
             f"every read and every merge; dare_lab threads = {args.threads}; median of {args.reps}. Command: "
             f"`python scripts/bench_cold.py --size {args.size} --models {args.models} --reps {args.reps}` (as root).", "",
             f"Inputs read cold: one stream **{median(one):.2f} s** ({nbytes / median(one) / 1e9:.2f} GB/s); one reader per "
             f"checkpoint in parallel **{floor:.2f} s** ({nbytes / floor / 1e9:.2f} GB/s) — the *cold read floor* below "
             "(the merge's writes come on top). *whole process* starts cold too: the dropped cache held Python's and "
             "torch's files as well.", "",
             "| merge | merge only | whole process | merge / cold read floor |", "|---|---|---|---|"]
    for key in keys:
        m, w = median([r["merge_s"] for r in runs[key]]), median([r["wall"] for r in runs[key]])
        lines.append(f"| {METHODS[key][4]} | {m:.2f} s | {w:.2f} s | {m / floor:.1f}× |")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cold.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
