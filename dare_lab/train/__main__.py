"""Command line for the fine-tuning program.

    python -m dare_lab.train --base bert-base-uncased --out models/sst2 --glue sst2 --learning-rate 2e-5
    python -m dare_lab.train --base ./minilm --out models/news --train data/train.csv --test data/test.csv \\
        --labels business,sports,tech --epochs 10 --learning-rate 5e-5

Defaults follow the paper's GLUE recipe (10 epochs, weight decay 0.01, linear warmup, the
training split divided 90/10 into train/validation with a fixed seed). A finished output
directory is reused; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from dare_lab.taskpool.classification import TaskSpec, glue_task
from dare_lab.train.finetune import FinetuneConfig, finetune


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dare_lab.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="pre-trained model: HF hub id or local directory")
    ap.add_argument("--out", required=True, help="output directory of the task model")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--glue", help="a GLUE task name (hub dataset nyu-mll/glue)")
    src.add_argument("--train", help="local training file (.csv/.tsv/.jsonl)")
    ap.add_argument("--test", help="local test file (optional)")
    ap.add_argument("--name", default=None, help="task name (default: the GLUE name or 'task')")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--text-pair-column", default=None)
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--labels", default=None, help="comma-separated class names, when labels are strings")
    ap.add_argument("--regression", action="store_true")
    ap.add_argument("--max-length", type=int, default=128)
    for f in ("epochs", "learning_rate", "batch_size", "weight_decay", "warmup_ratio", "max_train_examples", "seed"):
        default = getattr(FinetuneConfig, f)
        ap.add_argument("--" + f.replace("_", "-"), type=type(default) if default is not None else int, default=default)
    ap.add_argument("--select-best", action="store_true", help="keep the epoch with the best validation score")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.glue:
            task = glue_task(args.glue, max_length=args.max_length)
        else:
            files = {"train": args.train, **({"test": args.test} if args.test else {})}
            task = TaskSpec(name=args.name or "task", files=files, text_column=args.text_column,
                            text_pair_column=args.text_pair_column, label_column=args.label_column,
                            labels=args.labels.split(",") if args.labels else None, regression=args.regression,
                            metrics=("pearson", "spearman") if args.regression else ("accuracy",),
                            max_length=args.max_length)
        cfg = FinetuneConfig(epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
                             weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                             max_train_examples=args.max_train_examples, seed=args.seed,
                             select_best=args.select_best, device=args.device)
        summary = finetune(args.base, task, args.out, cfg, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("task", "out_dir", "validation", "train_seconds") if k in summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
