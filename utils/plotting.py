"""Matplotlib helpers for quicklook PNGs: a non-interactive backend and atomic saves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (8.0, 5.0), **kwargs: Any):
    """A figure and axes from matplotlib's object API with the Agg backend (no display needed).

    Using ``matplotlib.figure.Figure`` directly (not pyplot) keeps figures out of pyplot's global
    state, so long batch runs do not accumulate open figures.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, **kwargs)
    return fig, axes


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Save ``fig`` as PNG atomically (temporary name, then ``os.replace``); return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    FigureCanvasAgg(fig)
    fig.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, path)
    return path
