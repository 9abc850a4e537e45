"""Program: embedding similarity of sparsified vs original models (paper Fig. 6 and 7).

``dare-lab +experiment=fig6_embedding_similarity`` — for each model, the mean cosine
similarity per layer between the SFT model's token hidden states and those of its DARE /
DropOnly versions (line plot: layer × p) and the distribution of last-layer similarities
(histogram), streamed batch by batch (see ``dare_lab.analysis.similarity``).

Config (``analysis.*``): methods [dare, drop_only]; drop_rates; seeds; target; models (null
= all); texts (explicit inputs, else the model's task inputs from the taskpool); n_texts;
batch_size; max_length; device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from dare_lab.analysis import similarity as S
from dare_lab.analysis.plots import histogram_plot, layer_similarity_plot, method_label
from dare_lab.programs.analysis_common import (TrackedRun, build_pool, build_scope, build_taskpool, cfg_get,
                                      print_table)


def _hist_stats(counts: np.ndarray) -> dict[str, float]:
    """Quantiles from the streamed histogram (upper bin edge: exact up to one bin width)."""
    upper = S.HIST_EDGES[1:]
    total = counts.sum()
    if total == 0:
        return {}
    cdf = np.cumsum(counts) / total
    q = lambda x: float(upper[min(np.searchsorted(cdf, x), len(upper) - 1)])  # noqa: E731
    return {"q10": q(0.1), "median": q(0.5), "q90": q(0.9),
            "share_below_0.9": float(counts[upper <= 0.9].sum() / total)}


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    a = lambda k, d=None: cfg_get(cfg, f"analysis.{k}", d)  # noqa: E731
    methods = list(a("methods", ["dare", "drop_only"]))
    drop_rates = [float(p) for p in a("drop_rates", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])]
    seeds = [int(s) for s in a("seeds", [0])]
    pool = build_pool(cfg)
    taskpool = build_taskpool(cfg)
    names = list(a("models") or pool.models)
    tr = TrackedRun(cfg, run_dir)
    all_rows, last_rows, metrics, ours = [], [], {}, {}
    for name in names:
        texts = a("texts") or S.task_texts(taskpool, name, int(a("n_texts", 256)))
        rows, hists = S.embedding_similarity(pool, name, texts, methods, drop_rates, seeds, target=a("target", "delta"),
                                             scope=build_scope(cfg), batch_size=int(a("batch_size", 16)),
                                             max_length=int(a("max_length", 128)), device=str(a("device", "cpu")))
        all_rows += rows
        n_layers = max(r["layer"] for r in rows) + 1
        curves = {}
        for m in methods:
            for p in drop_rates:
                per_layer = []
                for layer in range(n_layers):
                    v = [r["mean_cos"] for r in rows if r["method"] == m and r["p"] == p and r["layer"] == layer]
                    per_layer.append(float(np.mean(v)))
                curves[f"{method_label(m)} p={p:g}"] = per_layer
                last = per_layer[-1]
                metrics[f"{name}/{m}/p{p:g}/last_layer_cos"] = last
                metrics[f"{name}/{m}/p{p:g}/mean_layer_cos"] = float(np.mean(per_layer))
                ours.setdefault(f"{m} p={p:g}", last)
                st = _hist_stats(hists[f"{m} p={p:g}"])
                last_rows.append({"model": name, "method": m, "p": p, "mean": last, **st})
        path = layer_similarity_plot(tr.plot_path(f"similarity_layers_{name}"), list(range(n_layers)), curves,
                                     f"{name}: mean cosine similarity to SFT per layer")
        tr.image(f"similarity_layers_{name}", path)
        shown = {f"{method_label(k.split(' p=')[0])} p={k.split(' p=')[1]}": v for k, v in hists.items()
                 if float(k.split(" p=")[1]) > 0}
        path = histogram_plot(tr.plot_path(f"similarity_last_layer_{name}"), S.HIST_EDGES, shown,
                              f"{name}: last-layer token cosine similarity", "cosine similarity", logy=True)
        tr.image(f"similarity_last_layer_{name}", path)
    tr.table("similarity_raw", all_rows)
    md = tr.table("similarity_layers", S.layer_table(all_rows))
    md_last = tr.table("similarity_last_layer", last_rows)
    print_table("mean cosine similarity per layer (L0 = embeddings)", md)
    print_table("last-layer similarity distribution", md_last)
    return tr.close(cfg, metrics, ours)
