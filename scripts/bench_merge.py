"""dare_lab vs mergekit on the same synthetic Llama-shaped bf16 checkpoints, side by side.

Builds (once, cached outside the repo) a base ~ N(0, 0.02) and K fine-tuned = base + N(0, 0.001)
checkpoints in HF format, then runs the four merges with dare_lab and with mergekit,
alternating tools, several repetitions, each merge in a fresh subprocess whose wall time, CPU
time (user + sys) and peak RSS are read with ``os.wait4``. The I/O floor (read every input from
the page cache, write and fsync one output of the merged size) is measured in the same run.
Writes ``results/bench/merge.md`` and ``merge.csv``; the last printed line is

    merge-bench: ta=<speedup>x rss=<ratio> floor=<ratio> ties=... dare_ta=... dare_ties=...

    python scripts/bench_merge.py --size tiny --reps 1               # quick, while iterating
    python scripts/bench_merge.py --size 1b --models 3 --reps 3 --mk-reps 1 --compile --scaling --delta  # the reported run

mergekit is a benchmark-only dependency in its own venv (never a dare_lab dependency)::

    python -m venv /tmp/mergekit-venv && /tmp/mergekit-venv/bin/pip install torch==2.13.0 mergekit
    MERGEKIT_YAML=/tmp/mergekit-venv/bin/mergekit-yaml python scripts/bench_merge.py ...

(``--mergekit PATH``; default ``$MERGEKIT_YAML``, else ``mergekit-yaml`` on PATH; without one
the mergekit columns stay empty). ``--compile`` adds each method's first merge with an empty
numba cache (cold) and with a warm one. Timings never go into tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# hidden, intermediate, layers, heads, vocab
SIZES = {
    "tiny": (512, 1408, 4, 8, 8000),
    "0.25b": (1024, 2816, 16, 16, 32000),
    "1b": (2048, 5504, 16, 16, 32000),
}

METHODS = {
    # key: (dare_lab build_method kwargs, mergekit merge_method, mergekit per-model params, mergekit global params, label)
    "ta": (dict(name="task_arithmetic", scaling=1.0), "task_arithmetic", {"weight": 1.0}, {"lambda": 1.0},
           "task arithmetic (λ = 1)"),
    "ties": (dict(name="ties", retain_ratio=0.5), "ties", {"weight": 1.0, "density": 0.5}, {"normalize": True},
             "TIES (retain 0.5)"),
    "dare_ta": (dict(name="dare_task_arithmetic", drop_rate=0.9, scaling=1.0), "dare_linear", {"weight": 1.0, "density": 0.1},
                {"lambda": 1.0}, "DARE + task arithmetic (p = 0.9)"),
    "dare_ties": (dict(name="dare_ties", drop_rate=0.9, retain_ratio=1.0), "dare_ties", {"weight": 1.0, "density": 0.1},
                  {"normalize": True}, "DARE + TIES (p = 0.9)"),
}
EXTRA = {"dare_ta_geo": (dict(name="dare_task_arithmetic", drop_rate=0.9, scaling=1.0, sampler="geometric"),
                         "DARE + TA, geometric sampler")}

CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
_launched, _first = float(os.environ.get("BENCH_LAUNCHED", "nan")), []
_pread = os.pread
def _timed_pread(fd, n, off):   # process start → first tensor byte read (both ends wall-clock)
    if not _first:
        _first.append(time.time() - _launched)
    return _pread(fd, n, off)
os.pread = _timed_pread
_preadv = getattr(os, "preadv", None)
if _preadv is not None:
    def _timed_preadv(fd, bufs, off, *a):
        if not _first:
            _first.append(time.time() - _launched)
        return _preadv(fd, bufs, off, *a)
    os.preadv = _timed_preadv
from dare_lab.engine import merge_models
from dare_lab.ops.presets import build_method
cfg = json.loads(sys.argv[1])
t1 = time.perf_counter()
merge_models(cfg["base"], cfg["models"], build_method(**cfg["method"]), cfg["out"], threads=cfg["threads"])
t2 = time.perf_counter()
from dare_lab.engine import warmup
import threading
for th in threading.enumerate():   # the background compile (the process would wait for it at exit anyway)
    if th.name == "dare-lab-numba-warmup":
        th.join()
print(json.dumps({"import_s": t1 - t0, "merge_s": t2 - t1, "first_read_s": _first[0] if _first else None,
                  "warmup": warmup.history(), "compile_mode": warmup.resolved_mode(cfg["threads"])}))
import gc; gc.freeze()  # as dare-lab's CLI does before it exits (skips a last collection over torch's objects)
"""


def param_count(size: str) -> int:
    h, inter, layers, _, vocab = SIZES[size]
    return 2 * vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h


def tensor_specs(size: str) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, layers, _, vocab = SIZES[size]
    specs = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                  (p + "self_attn.k_proj.weight", (h, h)), (p + "self_attn.v_proj.weight", (h, h)),
                  (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                  (p + "mlp.down_proj.weight", (h, inter))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return specs


def build_checkpoint(cache: Path, size: str, index: int) -> Path:
    """Checkpoint ``index`` (0 = base) of a size, built once, in a child process.

    The benchmark process itself must stay small: a child's ``ru_maxrss`` includes the RSS of
    the process it was forked from (Linux keeps the high-water mark across fork + exec), so
    building multi-GB checkpoints here would inflate every later measurement.
    """
    out = cache / size / ("base" if index == 0 else f"ft{index}")
    if not (out / ".complete").exists():
        subprocess.run([sys.executable, __file__, "--build-checkpoint", str(cache), size, str(index)], check=True)
    return out


def _build_checkpoint(cache: Path, size: str, index: int, shard_bytes: int = 1 << 30) -> Path:
    import torch
    from safetensors.torch import save_file

    name = "base" if index == 0 else f"ft{index}"
    out = cache / size / name
    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    h, inter, layers, heads, vocab = SIZES[size]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shards, cur, used = [], {}, 0
    for t, (tname, shape) in enumerate(tensor_specs(size)):
        g = torch.Generator().manual_seed(1000 + t)
        w = torch.randn(shape, generator=g).mul_(0.02).to(torch.bfloat16)
        if index:
            g2 = torch.Generator().manual_seed(1_000_003 * index + t)
            w = w.float().add_(torch.randn(shape, generator=g2).mul_(0.001)).to(torch.bfloat16)
        nb = w.numel() * 2
        if cur and used + nb > shard_bytes:
            shards.append(cur)
            cur, used = {}, 0
        cur[tname] = w
        used += nb
    shards.append(cur)
    weight_map = {}
    for i, sd in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, out / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in sd})
    total = sum(v.numel() * 2 for sd in shards for v in sd.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / ".complete").write_text("ok")
    return out


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat ((0, 0) where it is missing)."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return vals[7], sum(vals)


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    os.sync()  # no write-back of an earlier run's (unsynced) output may overlap this one
    time.sleep(1.0)
    steal0, total0 = cpu_ticks()
    env = dict(env if env is not None else os.environ, BENCH_LAUNCHED=repr(time.time()))
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # read pipes in threads so the child never blocks, then reap it with wait4 for its rusage
    import threading

    bufs = {"out": b"", "err": b""}

    def pump(stream, key):
        bufs[key] = stream.read()

    threads = [threading.Thread(target=pump, args=(proc.stdout, "out")), threading.Thread(target=pump, args=(proc.stderr, "err"))]
    for th in threads:
        th.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    for th in threads:
        th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} failed ({proc.returncode}):\n{bufs['err'].decode()[-3000:]}")
    steal1, total1 = cpu_ticks()
    steal = (steal1 - steal0) / (total1 - total0) if total1 > total0 else 0.0
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_gb": ru.ru_maxrss * 1024 / 1e9, "steal": steal,
            "stdout": bufs["out"].decode()}


def dare_lab_cmd(base: Path, models: list[Path], method: dict, out: Path, threads: int) -> list[str]:
    cfg = {"base": str(base), "models": {m.name: str(m) for m in models}, "method": method, "out": str(out), "threads": threads}
    return [sys.executable, "-c", CHILD, json.dumps(cfg)]


def mergekit_cmd(exe: str, base: Path, models: list[Path], key: str, out: Path, workdir: Path) -> list[str]:
    _, mk_method, per_model, global_params, _ = METHODS[key]
    lines = [f"merge_method: {mk_method}", f"base_model: {base}", "dtype: float32", "out_dtype: bfloat16", "parameters:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in global_params.items()]
    lines.append("models:")
    for m in models:
        lines.append(f"  - model: {m}")
        lines.append("    parameters: {" + ", ".join(f"{k}: {v}" for k, v in per_model.items()) + "}")
    cfg = workdir / f"mergekit_{key}.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return [exe, str(cfg), str(out), "--lazy-unpickle", "--random-seed", "0", "--quiet"]


def read_inputs(inputs: list[Path], view: memoryview | None = None) -> int:
    """Read every safetensors file of the checkpoints once (into the page cache); bytes read."""
    view = view if view is not None else memoryview(bytearray(16 << 20))
    total = 0
    for f in (f for d in inputs for f in sorted(d.glob("*.safetensors"))):
        fd = os.open(f, os.O_RDONLY)
        try:
            while (n := os.readv(fd, [view])) > 0:
                total += n
        finally:
            os.close(fd)
    return total


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> dict:
    """Read every input file from the page cache (warmed first), write + fsync out_bytes."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)

    read_inputs(inputs, view)
    t = time.perf_counter()
    nbytes = read_inputs(inputs, view)
    read_s = time.perf_counter() - t
    target = scratch / "floor.bin"
    t = time.perf_counter()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        left = out_bytes
        while left > 0:
            left -= os.write(fd, view[: min(left, len(buf))])
        write_s = time.perf_counter() - t
        os.fsync(fd)
    finally:
        os.close(fd)
    total_s = time.perf_counter() - t + read_s
    target.unlink()
    direct = direct_write_floor(out_bytes, scratch)
    return {"read_s": read_s, "read_gb": nbytes / 1e9, "write_s": write_s, "sync_s": total_s - read_s - write_s,
            "floor_s": total_s, "direct_write_s": direct, "direct_floor_s": read_s + direct if direct == direct else total_s}


def direct_write_floor(out_bytes: int, scratch: Path) -> float:
    """Write + fsync ``out_bytes`` with O_DIRECT from a page-aligned buffer (the merge writer's own
    path where the file system takes it); NaN where O_DIRECT is refused."""
    import mmap

    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return float("nan")
    target = scratch / "floor_direct.bin"
    buf = mmap.mmap(-1, 16 << 20)            # anonymous mappings are page aligned
    view = memoryview(buf)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag)
    except OSError:
        return float("nan")
    try:
        t = time.perf_counter()
        left = out_bytes - out_bytes % 4096
        while left > 0:
            n = min(left, len(buf))
            left -= os.write(fd, view[:n])
        os.fsync(fd)
        return time.perf_counter() - t
    except OSError:
        return float("nan")
    finally:
        os.close(fd)
        view.release()
        buf.close()
        target.unlink(missing_ok=True)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--models", type=int, default=3, help="K fine-tuned models")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mk-reps", type=int, default=None, help="mergekit repetitions (default: --reps; its first reps)")
    ap.add_argument("--methods", default="ta,ties,dare_ta,dare_ties")
    ap.add_argument("--extra", default="dare_ta_geo", help="dare_lab-only rows (comma list, '' for none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=os.environ.get("DARE_LAB_BENCH_CACHE", str(Path.home() / ".cache" / "dare_lab_bench")))
    ap.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml") or "",
                    help="mergekit-yaml of a separate venv (see the module docstring)")
    ap.add_argument("--compile", action="store_true", help="also time each method's first merge with a cold and a warm numba cache")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--scaling", action="store_true", help="also time DARE+TA at sizes 0.25b/1b and K = 2, 3, 5, 8")
    ap.add_argument("--scaling-sizes", default="0.25b,1b")
    ap.add_argument("--delta", action="store_true", help="also measure delta compression at p = 0.9 / 0.99")
    ap.add_argument("--out", default=str(REPO / "results" / "bench"))
    args = ap.parse_args()

    cache = Path(args.cache)
    scratch = cache / "out"
    scratch.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    base = build_checkpoint(cache, args.size, 0)
    models = [build_checkpoint(cache, args.size, i) for i in range(1, args.models + 1)]
    print(f"checkpoints ready ({time.perf_counter() - t:.0f} s): {args.size}, {param_count(args.size) / 1e9:.3f} B params each, K={args.models}", flush=True)
    keys = [k for k in args.methods.split(",") if k]
    extras = [k for k in args.extra.split(",") if k]
    use_mk = not args.no_mergekit and bool(args.mergekit) and Path(args.mergekit).exists()
    out_bytes = param_count(args.size) * 2
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs: dict[tuple[str, str], list[dict]] = {}
    floors = []
    for rep in range(args.reps):
        floors.append(io_floor([base, *models], out_bytes, scratch))
        print(f"rep {rep}: I/O floor {floors[-1]['floor_s']:.2f} s", flush=True)
        for key in keys + extras:
            mk_now = use_mk and rep < (args.reps if args.mk_reps is None else args.mk_reps)
            tools = ["dare_lab"] if key in extras else (["mergekit", "dare_lab"] if mk_now else ["dare_lab"])
            if rep % 2:
                tools.reverse()
            for tool in tools:
                out = scratch / f"{tool}-{key}"
                shutil.rmtree(out, ignore_errors=True)
                read_inputs([base, *models])   # the other tool's run may have pushed inputs out of the cache
                if tool == "dare_lab":
                    spec = (METHODS.get(key) or EXTRA[key])[0]
                    r = run_measured(dare_lab_cmd(base, models, spec, out, args.threads), env)
                    r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
                else:
                    r = run_measured(mergekit_cmd(args.mergekit, base, models, key, out, scratch), {**os.environ, "HF_HUB_OFFLINE": "1"})
                    r.pop("stdout")
                shutil.rmtree(out, ignore_errors=True)
                r["rep"] = rep
                runs.setdefault((key, tool), []).append(r)
                print(f"  {key:10s} {tool:9s} wall {r['wall']:7.2f} s  cpu {r['cpu']:7.2f} s  rss {r['rss_gb']:.2f} GB  "
                      f"steal {100 * r['steal']:.0f} %", flush=True)

    floor = {k: median([f[k] for f in floors]) for k in floors[0]}
    compile_rows = run_compile(args, keys, base, models, scratch, env) if args.compile else []
    scaling = run_scaling(args, cache, scratch, env) if args.scaling else []
    delta = run_delta(args, cache, base, models, scratch) if args.delta else []
    write_report(args, keys, extras, runs, floor, scaling, delta, compile_rows)


def run_compile(args, keys: list[str], base: Path, models: list[Path], scratch: Path, env: dict) -> list[dict]:
    """Each method's first merge in a fresh process: numba cache empty (cold: the default ``auto``
    mode, and DARE_LAB_COMPILE=background / wait forced) and filled by the default run (warm)."""
    rows = []
    for key in keys:
        spec = METHODS[key][0]
        row = {"key": key, "merge": METHODS[key][4]}
        for label, mode, cold in (("cold_wait", "wait", True), ("cold_background", "background", True),
                                  ("cold", "auto", True), ("warm", "auto", False)):
            cache_dir = scratch / f"numba-{key}"
            if cold:
                shutil.rmtree(cache_dir, ignore_errors=True)
            out = scratch / f"compile-{key}"
            shutil.rmtree(out, ignore_errors=True)
            read_inputs([base, *models])
            r = run_measured(dare_lab_cmd(base, models, spec, out, args.threads),
                             {**env, "NUMBA_CACHE_DIR": str(cache_dir), "DARE_LAB_COMPILE": mode})
            r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
            shutil.rmtree(out, ignore_errors=True)
            row[label] = r
            print(f"  compile {key:10s} {label:9s} merge {r['merge_s']:7.2f} s  wall {r['wall']:7.2f} s", flush=True)
        shutil.rmtree(scratch / f"numba-{key}", ignore_errors=True)
        rows.append(row)
    return rows


def summarise(runs: list[dict]) -> dict:
    out = {k: median([r[k] for r in runs]) for k in ("wall", "cpu", "rss_gb", "steal")}
    if "merge_s" in runs[0]:
        out["merge_s"] = median([r["merge_s"] for r in runs])
        out["import_s"] = median([r["import_s"] for r in runs])
        reads = [r["first_read_s"] for r in runs if r.get("first_read_s") is not None]
        out["first_read_s"] = median(reads) if reads else None
    out["n"] = len(runs)
    return out


def run_scaling(args, cache: Path, scratch: Path, env: dict) -> list[dict]:
    rows = []
    for size in args.scaling_sizes.split(","):
        base = build_checkpoint(cache, size, 0)
        for k in (2, 3, 5, 8):
            models = [build_checkpoint(cache, size, i) for i in range(1, k + 1)]
            for key in ("dare_ta",):
                out = scratch / f"scale-{size}-{k}-{key}"
                shutil.rmtree(out, ignore_errors=True)
                read_inputs([base, *models])
                r = run_measured(dare_lab_cmd(base, models, METHODS[key][0], out, args.threads), env)
                r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
                shutil.rmtree(out, ignore_errors=True)
                total = param_count(size) * (k + 1)
                rows.append({"size": size, "K": k, "method": key, "params_in": total, **r,
                             "ns_per_param": r["merge_s"] / total * 1e9})
                print(f"  scaling {size} K={k} {key}: merge {r['merge_s']:.2f} s, rss {r['rss_gb']:.2f} GB", flush=True)
    return rows


def run_delta(args, cache: Path, base: Path, models: list[Path], scratch: Path) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from dare_lab.engine.delta_store import rebuild, save_sparse_deltas

    rows = []
    dense = sum(f.stat().st_size for f in models[0].glob("*.safetensors"))
    for p in (0.9, 0.99):
        store = scratch / f"delta-{p}"
        shutil.rmtree(store, ignore_errors=True)
        t = time.perf_counter()
        save_sparse_deltas(base, models[0], store, drop_rate=p, seed=0)
        save_s = time.perf_counter() - t
        size = sum(f.stat().st_size for f in store.glob("*.safetensors"))
        out = scratch / f"rebuilt-{p}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        rebuild(base, [store], out)
        rebuild_s = time.perf_counter() - t
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
        rows.append({"p": p, "dense_gb": dense / 1e9, "sparse_gb": size / 1e9, "ratio": size / dense, "save_s": save_s, "rebuild_s": rebuild_s})
        print(f"  delta store p={p}: {size / 1e9:.3f} GB ({size / dense:.3f} of dense), save {save_s:.1f} s, rebuild {rebuild_s:.1f} s", flush=True)
    return rows


def write_report(args, keys, extras, runs, floor, scaling, delta, compile_rows=()) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, summary = [], []
    size_b = param_count(args.size) / 1e9
    for key in keys + extras:
        dl = summarise(runs[(key, "dare_lab")])
        mk = summarise(runs[(key, "mergekit")]) if (key, "mergekit") in runs else None
        label = METHODS[key][4] if key in METHODS else EXTRA[key][1]
        speed = mk["wall"] / dl["wall"] if mk else float("nan")
        rss = dl["rss_gb"] / mk["rss_gb"] if mk else float("nan")
        fl = dl["merge_s"] / floor["direct_floor_s"]
        rows.append({"key": key, "merge": label, "dl": dl, "mk": mk, "speedup": speed, "rss_ratio": rss, "floor_ratio": fl})
        if key in keys:
            summary.append(f"{key}={speed:.1f}x rss={rss:.2f} floor={fl:.1f}")
    with open(out / "merge.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["merge", "tool", "reps", "wall_median_s", "cpu_s", "peak_rss_gb", "merge_only_s", "speedup_vs_mergekit",
                    "rss_ratio", "merge_s_over_io_floor", "io_floor_s", "size", "K"])
        for r in rows:
            for tool, s in (("dare_lab", r["dl"]), ("mergekit", r["mk"])):
                if s is None:
                    continue
                w.writerow([r["key"], tool, s["n"], f"{s['wall']:.3f}", f"{s['cpu']:.3f}", f"{s['rss_gb']:.3f}",
                            f"{s.get('merge_s', float('nan')):.3f}", f"{r['speedup']:.2f}" if tool == "dare_lab" else "",
                            f"{r['rss_ratio']:.3f}" if tool == "dare_lab" else "", f"{r['floor_ratio']:.2f}" if tool == "dare_lab" else "",
                            f"{floor['floor_s']:.3f}", args.size, args.models])
        for s in scaling:
            w.writerow([f"scaling-{s['method']}", "dare_lab", 1, f"{s['wall']:.3f}", f"{s['cpu']:.3f}", f"{s['rss_gb']:.3f}",
                        f"{s['merge_s']:.3f}", "", "", "", "", s["size"], s["K"]])
    import platform

    lines = [
        "# Merge benchmark: dare_lab vs mergekit", "",
        f"Synthetic Llama-shaped bf16 checkpoints, {size_b:.3f} B parameters each (size `{args.size}`): base ~ N(0, 0.02), "
        f"K = {args.models} fine-tuned = base + N(0, 0.001). {platform.machine()}, {os.cpu_count()} cores; "
        f"dare_lab threads={args.threads}; mergekit `--lazy-unpickle --random-seed 0`, `dtype: float32`, `out_dtype: bfloat16`. "
        f"Each merge is a fresh subprocess started after its inputs were read once into the page cache and a `sync` (wall includes interpreter start and imports; CPU = user + sys; peak RSS from `wait4`, the benchmark process itself kept small); "
        f"tools alternate; median of {args.reps} repetitions (mergekit: {args.reps if args.mk_reps is None else min(args.reps, args.mk_reps)}). Command: `python scripts/bench_merge.py --size {args.size} --models {args.models} --reps {args.reps}"
        f"{'' if args.mk_reps is None else f' --mk-reps {args.mk_reps}'}"
        f"{' --compile' if compile_rows else ''}{' --scaling' if scaling else ''}{' --delta' if delta else ''}`"
        f" (mergekit: `MERGEKIT_YAML=<venv>/bin/mergekit-yaml`, installed as the script's docstring says).", "",
        f"I/O floor in the same run (median): read {floor['read_gb']:.2f} GB of inputs from the page cache {floor['read_s']:.2f} s + "
        f"write {param_count(args.size) * 2 / 1e9:.2f} GB {floor['write_s']:.2f} s + fsync {floor['sync_s']:.2f} s = **{floor['floor_s']:.2f} s** "
        "(one thread, buffered writes; dare_lab fsyncs its output too, mergekit does not). "
        f"With the merge writer's own write path (O_DIRECT from aligned buffers, then fsync): write + fsync "
        f"{floor['direct_write_s']:.2f} s, floor **{floor['direct_floor_s']:.2f} s** — the floor the *merge / I/O floor* "
        "column divides by.", "",
        "Start-up: process start → first tensor byte read (`os.pread`), median over the rows below: "
        f"**{median([r['dl']['first_read_s'] for r in rows if r['dl'].get('first_read_s') is not None]):.2f} s** "
        f"(interpreter + imports {median([r['dl']['import_s'] for r in rows]):.2f} s of it).", "",
        "| merge | mergekit wall | mergekit CPU | mergekit RSS | dare_lab wall | dare_lab CPU | dare_lab RSS | dare_lab merge only | speedup | RSS ratio | merge / I/O floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mk, dl = r["mk"], r["dl"]
        mkc = (f"{mk['wall']:.1f} s", f"{mk['cpu']:.1f} s", f"{mk['rss_gb']:.2f} GB") if mk else ("–", "–", "–")
        lines.append(f"| {r['merge']} | {mkc[0]} | {mkc[1]} | {mkc[2]} | {dl['wall']:.2f} s | {dl['cpu']:.1f} s | {dl['rss_gb']:.2f} GB | "
                     f"{dl['merge_s']:.2f} s | {'%.1f×' % r['speedup'] if mk else '–'} | {'%.2f' % r['rss_ratio'] if mk else '–'} | {r['floor_ratio']:.1f}× |")
    lines += ["", "Columns: *speedup* = mergekit wall / dare_lab wall (whole processes); *merge only* = time inside "
              "`merge_models` (dare_lab's interpreter start + imports ≈ "
              f"{median([r['dl']['import_s'] for r in rows]):.1f} s excluded); *merge / I/O floor* = merge only / floor.", "",
              "Semantics notes (the configs match as closely as the tools allow):",
              "- All merges compute in fp32 and save bf16 in both tools.",
              "- TIES: both keep the top 50 % |δ| per tensor and average the sign-agreeing entries (mergekit `normalize: true`). "
              "mergekit elects the sign from the sum of deltas with 0 → +; dare_lab elects from the sum, 0 → the tensor's majority sign. "
              "mergekit finds the top-k with a full `argsort` of every tensor, dare_lab with an exact k-th-value threshold.",
              "- DARE: dare_lab keeps each entry iff u ≥ p (u float32, seeded per (seed, model, tensor)) and rescales kept entries "
              "by 1/(1−p). mergekit's `dare_linear`/`dare_ties` draw `torch.bernoulli(density)` and **rescale each tensor to keep its "
              "L1 norm** (not ×1/(1−p)): not the paper's DARE; results differ by that per-tensor factor and by the random stream.",
              "- DARE + TIES: DARE on each delta, then sign election and disjoint mean, no magnitude trim (retain 1.0) — "
              "mergekit's `dare_ties` with `normalize: true`.",
              "- `dare_ta_geo` (dare_lab only): the `geometric` mask sampler, same Bernoulli(1−p) law, different masks, "
              "recorded in the merge metadata; `torch_rand` stays the default and is what the four main rows use.", ""]
    paired = [(r, mk_run, dl_run) for r in rows for mk_run in runs.get((r["key"], "mergekit"), [])
              for dl_run in runs[(r["key"], "dare_lab")] if dl_run["rep"] == mk_run["rep"]]
    if paired:
        lines += ["## Paired runs (the same repetition, tools back to back)", "",
                  "CPU steal = share of the machine's CPU time the hypervisor gave to other guests while the run "
                  "lasted (`/proc/stat`); it slows both tools, never equally.", "",
                  "| merge | rep | mergekit wall | steal | dare_lab wall | steal | speedup |", "|---|---|---|---|---|---|---|"]
        for r, mk_run, dl_run in paired:
            lines.append(f"| {r['merge']} | {mk_run['rep']} | {mk_run['wall']:.1f} s | {100 * mk_run['steal']:.0f} % | "
                         f"{dl_run['wall']:.2f} s | {100 * dl_run['steal']:.0f} % | {mk_run['wall'] / dl_run['wall']:.1f}× |")
        lines.append("")
    if compile_rows:
        modes = sorted({c["cold"].get("compile_mode", "?") for c in compile_rows})
        lines += ["## Compile cost (first merge in a fresh process)", "",
                  "*cold*: empty numba cache (a fresh install), the default `DARE_LAB_COMPILE=auto`, which compiles in "
                  "the background only when a core is free beyond the merge's threads and otherwise first "
                  f"(here: **{', '.join(modes)}**, {args.threads} threads); *cold, background*: forced background "
                  "compile (tensors take the torch path, same bits, until the loops are compiled); *cold, wait*: "
                  "forced compile first; *warm*: the cache filled by the default cold run. "
                  "*compile cost* = cold − warm merge-only time.", "",
                  "| merge | cold (default) | cold, background | cold, wait | warm | compile cost (cold − warm) | "
                  "background compile time |", "|---|---|---|---|---|---|---|"]
        for c in compile_rows:
            comp = sum(h["seconds"] for h in c["cold_background"].get("warmup") or [])
            lines.append(f"| {c['merge']} | {c['cold']['merge_s']:.2f} s | {c['cold_background']['merge_s']:.2f} s | "
                         f"{c['cold_wait']['merge_s']:.2f} s | {c['warm']['merge_s']:.2f} s | "
                         f"{c['cold']['merge_s'] - c['warm']['merge_s']:.2f} s | {comp:.1f} s |")
        lines.append("")
    if scaling:
        lines += ["## Scaling (dare_lab; one run each)", "",
                  "| size | K | method | params read | merge only | ns / param read | peak RSS |", "|---|---|---|---|---|---|---|"]
        for s in scaling:
            lines.append(f"| {s['size']} | {s['K']} | {s['method']} | {s['params_in'] / 1e9:.2f} B | {s['merge_s']:.2f} s | "
                         f"{s['ns_per_param']:.2f} | {s['rss_gb']:.2f} GB |")
        lines.append("")
    if delta:
        lines += ["## Delta compression (one fine-tuned model, DARE masks seed 0)", "",
                  "| p | dense checkpoint | sparse delta store | ratio | save | rebuild (base + sparse delta → checkpoint) |",
                  "|---|---|---|---|---|---|"]
        for d in delta:
            lines.append(f"| {d['p']} | {d['dense_gb']:.2f} GB | {d['sparse_gb']:.3f} GB | {d['ratio']:.3f} | {d['save_s']:.1f} s | {d['rebuild_s']:.1f} s |")
        lines.append("")
    (out / "merge.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print("merge-bench: " + " ".join(summary))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build-checkpoint"]:
        _build_checkpoint(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        main()
