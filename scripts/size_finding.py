"""Paper §4.2 / Fig. 3-4, "larger models tolerate higher drop rates": two model sizes side by side.

Joins the raw tables of ``fig3_redundancy`` runs (one or more per size; rows repeated across runs,
e.g. p = 0, are kept once), scores every point relative to that size's SFT score (p = 0), and writes

    <out>/curves.csv|md   size, task, metric, method, p, mean ± std over seeds of score / SFT, n_seeds
    <out>/verdict.csv|md  per size, task, method: the first p whose mean relative score < threshold
    <out>/size_finding.png one panel per (task, method): relative score vs p, one line (± std) per size

Usage:
    python scripts/size_finding.py --out results/paper/size_finding \\
        --run MiniLM-L6=results/fig3_redundancy/size_minilm --run MPNet-base=results/fig3_redundancy/size_mpnet_s0 \\
        [--run MPNet-base=<another run of the same size, e.g. more seeds>] [--metric accuracy] [--threshold 0.95]
        [--methods dare,drop_only,magnitude] [--plot-rates 0,0.9,0.99,0.995,0.999,0.9995]
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import sys
from pathlib import Path

import numpy as np

from dare_lab.analysis.plots import METHOD_STYLE, method_label
from dare_lab.analysis.redundancy import summarize
from dare_lab.tracking.figures import new_figure, save_png


def read_runs(runs: list[tuple[str, Path]]) -> dict[str, list[dict]]:
    """size label → raw rows ``{model, metric, method, p, seed, value}`` (one per distinct point)."""
    out: dict[str, dict[tuple, dict]] = {}
    for size, run in runs:
        f = run / "tables" / "redundancy_raw.csv"
        if not f.is_file():
            raise FileNotFoundError(f"--run {size}={run}: no {f} (a finished fig3_redundancy run dir?)")
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                key = (r["model"], r["metric"], r["method"], float(r["p"]), int(r["seed"]))
                row = {"model": r["model"], "metric": r["metric"], "method": r["method"], "p": float(r["p"]),
                       "seed": int(r["seed"]), "value": float(r["value"])}
                old = out.setdefault(size, {}).get(key)
                if old is not None and not math.isclose(old["value"], row["value"], abs_tol=1e-9):
                    raise ValueError(f"{size}: runs disagree at {key}: {old['value']} vs {row['value']} "
                                     "(different models or data?)")
                out[size][key] = row
    return {size: list(rows.values()) for size, rows in out.items()}


def relative_curves(raw: dict[str, list[dict]], metric: str, methods: tuple[str, ...] = ("dare", "drop_only", "magnitude")) -> list[dict]:
    """Rows ``{size, task, metric, method, p, sft, mean, std, n_seeds}`` of score / SFT score."""
    out = []
    for size, rows in raw.items():
        rows = [r for r in rows if r["metric"].rpartition("/")[2] == metric and r["method"] in methods]
        if not rows:
            raise ValueError(f"{size}: no metric {metric!r} in its runs")
        sft = {(r["model"], r["metric"]): r["value"] for r in rows if r["p"] == 0.0}
        present = sorted({r["method"] for r in rows})
        rel: dict[tuple, dict] = {}
        for r in rows:
            if (r["model"], r["metric"]) not in sft:
                raise ValueError(f"{size}: no p=0 (SFT) score for {r['model']} {r['metric']}")
            base = sft[(r["model"], r["metric"])]
            # p = 0 is evaluated once (every method is the identity there): give it to every method
            for m in (present if r["p"] == 0.0 else [r["method"]]):
                rel[(r["model"], r["metric"], m, r["p"], r["seed"])] = dict(r, method=m, value=r["value"] / base)
        for s in summarize(list(rel.values())):
            out.append({"size": size, "task": s["model"], "metric": s["metric"], "method": s["method"], "p": s["p"],
                        "sft": sft[(s["model"], s["metric"])], "mean": s["mean"], "std": s["std"],
                        "n_seeds": s["n_seeds"]})
    return sorted(out, key=lambda r: (r["task"], r["method"], r["size"], r["p"]))


def verdict(curves: list[dict], threshold: float) -> list[dict]:
    """Per (size, task, method): the last p still >= threshold and the first p below it (mean over seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for r in curves:
        groups.setdefault((r["task"], r["method"], r["size"]), []).append(r)
    out = []
    for (task, method, size), rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: r["p"])
        below = next((r for r in rows if r["mean"] < threshold), None)
        kept = [r for r in rows if below is None or r["p"] < below["p"]]
        out.append({"task": task, "method": method_label(method), "size": size, "sft": round(rows[0]["sft"], 4),
                    f"last p >= {threshold:g}": kept[-1]["p"] if kept else "",
                    f"first p < {threshold:g}": below["p"] if below else f"none (<= {rows[-1]['p']:g})",
                    "relative there": round(below["mean"], 4) if below else "",
                    "n_seeds": max(r["n_seeds"] for r in rows if r["p"] > 0) if len(rows) > 1 else 1})
    return out


def write_table(rows: list[dict], stem: Path) -> None:
    cols = list(rows[0])
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot(curves: list[dict], threshold: float, path: Path, rates: list[float] | None = None) -> Path:
    """``rates``: the x axis (categorical; default every p of any size)."""
    if rates:
        curves = [r for r in curves if r["p"] in rates]
    tasks = sorted({r["task"] for r in curves})
    methods = [m for m in METHOD_STYLE if any(r["method"] == m for r in curves)]
    sizes = list(dict.fromkeys(r["size"] for r in curves))
    rates = sorted({r["p"] for r in curves})
    xs = np.arange(len(rates))
    fig = new_figure(4.0 * len(methods), 3.2 * len(tasks))
    styles = [("tab:blue", "o", "-"), ("tab:red", "s", "--"), ("tab:green", "^", ":")]
    for i, task in enumerate(tasks):
        for j, method in enumerate(methods):
            ax = fig.add_subplot(len(tasks), len(methods), i * len(methods) + j + 1)
            for k, size in enumerate(sizes):
                idx = {r["p"]: r for r in curves if (r["task"], r["method"], r["size"]) == (task, method, size)}
                if not idx:
                    continue
                m = np.array([idx[p]["mean"] if p in idx else np.nan for p in rates])
                s = np.array([idx[p]["std"] if p in idx else 0.0 for p in rates])
                color, marker, ls = styles[k % len(styles)]
                ax.errorbar(xs, m, yerr=s, color=color, marker=marker, ms=4, ls=ls, capsize=2,
                            label=f"{size} (SFT {next(iter(idx.values()))['sft']:.3f})")
            ax.axhline(threshold, color="grey", lw=0.8, ls="--")
            ax.set_xticks(xs, [f"{p:g}" for p in rates], rotation=45, fontsize=7)
            ax.set_ylim(0.0, 1.1)
            ax.set_title(f"{task} · {method_label(method)}", fontsize=9)
            if j == 0:
                ax.set_ylabel("score / SFT score")
            if i == len(tasks) - 1:
                ax.set_xlabel("drop rate p")
            ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    return save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, metavar="SIZE=RUN_DIR",
                    help="a fig3_redundancy run dir for a model size (repeatable; same size joins its runs; "
                         "a quoted glob joins every match)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--metric", default="accuracy")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--methods", default="dare,drop_only,magnitude", help="comma-separated sparsifier kinds")
    ap.add_argument("--plot-rates", default=None, help="comma-separated p for the plot's x axis (default: all)")
    a = ap.parse_args(argv)
    runs = []
    for spec in a.run:
        size, sep, run = spec.partition("=")
        if not sep or not size or not run:
            ap.error(f"--run {spec!r}: expected SIZE=RUN_DIR")
        found = sorted(glob.glob(run)) if any(c in run for c in "*?[") else [run]
        if not found:
            ap.error(f"--run {spec!r}: no directory matches")
        runs += [(size, Path(r)) for r in found]
    try:
        curves = relative_curves(read_runs(runs), a.metric, tuple(a.methods.split(",")))
    except (FileNotFoundError, ValueError) as e:
        print(f"size_finding: {e}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    write_table(curves, a.out / "curves")
    v = verdict(curves, a.threshold)
    write_table(v, a.out / "verdict")
    rates = [float(p) for p in a.plot_rates.split(",")] if a.plot_rates else None
    png = plot(curves, a.threshold, a.out / "size_finding.png", rates)
    print((a.out / "verdict.md").read_text(), end="")
    print(f"wrote {a.out}/curves.csv|md, verdict.csv|md, {png.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
