"""Matplotlib (Agg, no display, no pyplot global state) plots for the analysis programs.

Every function writes one PNG atomically and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dare_lab.tracking.figures import line_plot, new_figure, save_png

__all__ = ["METHOD_STYLE", "method_label", "line_plot", "redundancy_plot", "layer_similarity_plot", "histogram_plot"]


METHOD_STYLE = {"dare": ("DARE", "tab:red", "o"), "drop_only": ("DropOnly", "tab:blue", "s"),
                "magnitude": ("MP", "tab:green", "^"), "della": ("DELLA", "tab:purple", "D"),
                "breadcrumbs": ("Breadcrumbs", "tab:brown", "v"), "darex": ("DAREx-q", "tab:orange", "P")}


def method_label(kind: str) -> str:
    return METHOD_STYLE.get(kind, (kind, None, None))[0]


def redundancy_plot(path: str | Path, drop_rates: Sequence[float], curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                    sft: float | None, title: str, ylabel: str) -> Path:
    """Score vs drop rate, one curve (mean ± std band) per method; SFT score as a dashed line.

    The x axis is categorical (0.0 … 0.9, 0.99 evenly spaced) like the paper's figures.
    """
    fig = new_figure()
    ax = fig.add_subplot(111)
    xs = np.arange(len(drop_rates))
    for kind, (mean, std) in curves.items():
        label, color, marker = METHOD_STYLE.get(kind, (kind, None, "o"))
        m, s = np.asarray(mean, float), np.asarray(std, float)
        ax.plot(xs, m, marker=marker, ms=4, color=color, label=label)
        if np.any(s > 0):
            ax.fill_between(xs, m - s, m + s, color=color, alpha=0.2)
    if sft is not None:
        ax.axhline(sft, color="k", ls="--", lw=1, label=f"SFT (p=0): {sft:.4g}")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{p:g}" for p in drop_rates])
    ax.set_xlabel("drop rate p")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def layer_similarity_plot(path: str | Path, layers: Sequence[int], curves: Mapping[str, Sequence[float]], title: str) -> Path:
    """Mean cosine similarity per layer, one line per (method, p)."""
    fig = new_figure()
    ax = fig.add_subplot(111)
    for label, vs in curves.items():
        ax.plot(list(layers), list(vs), marker="o", ms=3, label=label)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("mean cosine similarity to SFT")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def histogram_plot(path: str | Path, edges: Sequence[float], counts: Mapping[str, Sequence[float]], title: str,
                   xlabel: str, logx: bool = False, logy: bool = False, share: bool = False) -> Path:
    """Overlaid step histograms from precomputed (streamed) bin counts.

    Normalised to a density, or with ``share`` to the fraction of entries per bin (right for
    log-spaced bins, where a density would inflate the narrow bins). The x range is cropped to
    the occupied bins.
    """
    fig = new_figure()
    ax = fig.add_subplot(111)
    e = np.asarray(edges, float)
    occupied = np.zeros(len(e) - 1, dtype=bool)
    for label, c in counts.items():
        c = np.asarray(c, float)
        total = c.sum()
        occupied |= c > 0
        if total > 0:
            c = c / total if share else c / (total * np.diff(e))
        ax.stairs(c, e, label=str(label))
    if occupied.any():
        idx = np.flatnonzero(occupied)
        lo, hi = e[max(idx[0] - 1, 0)], e[min(idx[-1] + 2, len(e) - 1)]
        ax.set_xlim(lo, hi)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of entries per bin" if share else "density")
    ax.set_title(title, fontsize=10)
    if len(counts) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_png(fig, path)
