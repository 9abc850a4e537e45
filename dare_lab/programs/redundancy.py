"""Program: redundancy curves (paper Fig. 3/4/12, DropOnly Fig. 8, MP Fig. 9, §4.7 Fig. 11).

``dare-lab +experiment=fig3_redundancy`` — for each model of the pool, score vs drop rate for
each sparsifier over ``analysis.seeds``; writes the raw and summary tables (CSV + Markdown),
a paper-style wide table and one PNG per model/task under ``results/<experiment>/<run>/``.

Config (``analysis.*``): methods [dare, drop_only, magnitude, and della | breadcrumbs | darex];
drop_rates; seeds; target (delta | finetuned); models (null = all); rescale_mp (false);
knobs (per kind, e.g. ``{della: {epsilon: 0.05}, breadcrumbs: {gamma: 0.01}}``); tolerance
(findings, 0.01).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dare_lab.analysis import redundancy as R
from dare_lab.analysis.plots import redundancy_plot
from dare_lab.programs.analysis_common import (TrackedRun, build_pool, build_scope, build_taskpool, cfg_get,
                                      print_table)


def _knobs(node: Any) -> dict[str, dict[str, Any]] | None:
    """``analysis.knobs``: per sparsifier kind its own knobs (nulls dropped: the kind's default)."""
    from omegaconf import OmegaConf

    if node is None:
        return None
    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if not isinstance(plain, dict) or not all(isinstance(v, dict) for v in plain.values()):
        raise ValueError(f"analysis.knobs={plain!r}: expected {{kind: {{knob: value}}}}, e.g. {{della: {{epsilon: 0.05}}}}")
    return {str(k): {kk: vv for kk, vv in v.items() if vv is not None} for k, v in plain.items()}


def run(cfg: DictConfig, run_dir: Path | None = None, target: str | None = None) -> dict[str, Any]:
    a = lambda k, d=None: cfg_get(cfg, f"analysis.{k}", d)  # noqa: E731
    target = target or a("target", "delta")
    methods = list(a("methods", list(R.METHODS)))
    drop_rates = [float(p) for p in a("drop_rates", list(R.DROP_RATES))]
    seeds = [int(s) for s in a("seeds", [0, 1, 2])]
    pool, taskpool = build_pool(cfg), build_taskpool(cfg)
    tr = TrackedRun(cfg, run_dir)
    rows = R.redundancy_curves(pool, taskpool, methods, drop_rates, seeds, target=target, scope=build_scope(cfg),
                               models=a("models"), rescale_mp=bool(a("rescale_mp", False)),
                               work_dir=a("work_dir") or (Path(run_dir) / "work" if run_dir else None),
                               knobs=_knobs(a("knobs")))
    summary = R.summarize(rows)
    tr.table("redundancy_raw", rows)
    tr.table("redundancy", summary)
    md = tr.table("redundancy_wide", R.pivot(summary, drop_rates))
    sft = R.sft_scores(summary)
    plots = []
    for model, metrics in R.primary_metrics(summary).items():
        for metric in metrics:
            curves = {m: R.curve(summary, model, metric, m, drop_rates) for m in methods}
            name = f"redundancy_{model}_{metric.replace('/', '_')}"
            path = redundancy_plot(tr.plot_path(name), drop_rates, curves, sft.get((model, metric)),
                                   f"{model} · {metric} · {'θ_SFT' if target == 'finetuned' else 'δ'} sparsified", metric)
            tr.image(name, path)
            plots.append(path)
    print_table(f"redundancy ({target}) mean±std over seeds {seeds}", md)
    lines = R.findings(summary, float(a("tolerance", 0.01)))
    print("\n".join(lines))
    metrics: dict[str, Any] = {}
    for r in summary:
        metrics[f"{r['model']}/{r['metric']}/{r['method']}/p{r['p']:g}"] = r["mean"]
    from dare_lab.tracking import atomic_write

    atomic_write(tr.dir / "findings.txt", "\n".join(lines) + "\n")
    ours = {f"{r['method']} p={r['p']:g}": r["mean"] for r in summary}
    return tr.close(cfg, metrics, ours, f"plots: {', '.join(str(p) for p in plots)}\n")
