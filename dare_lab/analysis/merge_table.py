"""Table 1 style report of a merge sweep: one row per method, one column per metric.

Reads the jobs of a Hydra sweep (``metrics.json`` per job, as joined by ``dare_lab.tracking.summaries``),
writes the table (CSV + Markdown) and a grouped bar chart under
``results/table1_merge/<run>/`` through a :class:`LocalTracker`, and prints them with the
paper's reference notes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def merge_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    from dare_lab.tracking.summaries import collect_sweep

    rows = []
    for r in collect_sweep(Path(sweep_dir)):
        row = {"method": r.get("method", r.get("job")), **{k: v for k, v in r.items()
                                                          if isinstance(v, (int, float)) and k != "merge/seconds"}}
        row["merge_seconds"] = r.get("merge/seconds")
        rows.append(row)
    return rows


def bar_chart(path: Path, rows: list[dict[str, Any]], metrics: list[str], title: str) -> Path:
    from dare_lab.tracking.figures import new_figure, save_png

    fig = new_figure(max(6.4, 1.2 * len(metrics) + 3), 4.2)
    ax = fig.add_subplot(111)
    width = 0.8 / max(len(rows), 1)
    xs = np.arange(len(metrics))
    for i, r in enumerate(rows):
        ax.bar(xs + i * width, [float(r.get(m) or 0.0) for m in metrics], width, label=str(r["method"]))
    ax.set_xticks(xs + width * (len(rows) - 1) / 2)
    ax.set_xticklabels(metrics, rotation=20, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return save_png(fig, path)


def report(sweep_dir: Path, run_name: str, experiment: str = "table1_merge") -> Path:
    from dare_lab.tracking import LocalTracker

    rows = merge_rows(sweep_dir)
    if not rows:
        raise SystemExit(f"no finished jobs under {sweep_dir}")
    metrics = [k for k in rows[0] if k not in ("method", "merge_seconds")]
    tr = LocalTracker(experiment=experiment, run_name=run_name, summary=False)
    tr.start(config={"sweep_dir": str(sweep_dir)})
    tr.log_table("table1_merge", rows, ["method", *metrics, "merge_seconds"])
    png = bar_chart(tr.run_dir / "plots" / "table1_merge.png", rows, metrics, "merged model, per task metric")
    for r in rows:
        tr.log_metrics({f"{r['method']}/{m}": r[m] for m in metrics if r.get(m) is not None})
    tr.finish()
    print(f"\n== merge methods ({tr.table_path('table1_merge', 'md')})")
    print(tr.table_path("table1_merge", "md").read_text())
    print("== Paper reference: Yu et al. 2024 (DARE), Table 1")
    print("  paper: WizardLM-13B GSM8K 2.2 → 66.3 merged with WizardMath-13B (task arithmetic + DARE); WizardMath alone 64.2")
    print("  paper: DARE as a plug-in usually improves task arithmetic and TIES merges")
    print(f"plot: {png}\nresults: {tr.run_dir}")
    return tr.run_dir
