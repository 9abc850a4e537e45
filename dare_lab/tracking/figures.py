"""Matplotlib figures without pyplot's global state (Agg canvas), saved as PNG atomically."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from dare_lab.tracking.files import atomic_write


def new_figure(w: float = 6.4, h: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return atomic_write(path, buf.getvalue())


def line_plot(path: str | Path, x: Sequence[float], ys: Mapping[str, Sequence[float]], xname: str = "x",
              yname: str = "y", title: str | None = None) -> Path:
    """One line per entry of ``ys`` over ``x`` (what a tracker's ``log_line`` draws)."""
    fig = new_figure()
    ax = fig.add_subplot(111)
    for k, vs in ys.items():
        ax.plot(list(x), list(vs), marker="o", ms=3, label=str(k))
    ax.set_xlabel(xname)
    ax.set_ylabel(yname)
    if title:
        ax.set_title(title)
    if len(ys) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, path)
