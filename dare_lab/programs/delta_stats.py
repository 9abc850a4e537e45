"""Program: delta parameter statistics (paper Fig. 10, 18–20; Table 6).

``dare-lab +experiment=table6_delta_ranges`` — per (base, fine-tuned) pair: the deciles
0 %, 10 %, …, 100 % of δ in the paper's Table 6 layout, exact share of |δ| below thresholds,
‖δ‖/‖θ_PRE‖, a |δ| histogram (PNG) and a verdict line per model (the paper's 0.002–0.005 rule
of thumb; a warning when the base looks like the wrong backbone).

Config (``analysis.*``): fraction (sampled share of entries, paper: 0.1); seed; max_samples;
models (null = all); safe_range [0.002, 0.005].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dare_lab.analysis import delta_stats as D
from dare_lab.analysis.plots import histogram_plot
from dare_lab.programs.analysis_common import TrackedRun, build_pool, build_scope, cfg_get, print_table


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    a = lambda k, d=None: cfg_get(cfg, f"analysis.{k}", d)  # noqa: E731
    pool = build_pool(cfg)
    names = list(a("models") or pool.models)
    safe = tuple(float(x) for x in a("safe_range", [0.002, 0.005]))
    tr = TrackedRun(cfg, run_dir)
    deciles, overview, verdicts, metrics, hists = [], [], [], {}, {}
    for name in names:
        st = D.delta_statistics(pool.base, pool.models[name], name, fraction=float(a("fraction", 0.1)),
                                seed=int(a("seed", 0)), scope=build_scope(cfg), max_samples=int(a("max_samples", 5_000_000)))
        deciles.append(st.decile_row())
        s = st.summary()
        overview.append({"model": name, **s})
        metrics.update({f"{name}/{k}": v for k, v in s.items()})
        v = D.verdict(st, safe)  # type: ignore[arg-type]
        verdicts += [v, *st.warnings]
        hists[name] = st.hist
        tr.table(f"delta_per_tensor_{name}", st.per_tensor)
    md = tr.table("table6_deltas", deciles)
    tr.table("delta_overview", overview)
    path = histogram_plot(tr.plot_path("delta_abs_hist"), D.LOG_EDGES[1:], {k: h[1:] for k, h in hists.items()},
                          "|δ| = |θ_SFT − θ_PRE| (all in-scope entries)", "|δ|", logx=True, share=True)
    tr.image("delta_abs_hist", path)
    print_table("delta parameter deciles (Table 6 format)", md)
    print("\n".join(verdicts))
    from dare_lab.tracking import atomic_write

    atomic_write(tr.dir / "verdict.txt", "\n".join(verdicts) + "\n")
    ours = {f"{r['model']} {k}": v for r in deciles for k, v in r.items() if k != "model"}
    return tr.close(cfg, metrics, ours, f"plot: {path}\n")
