"""Figure helpers shared by the analysis and the report: a figure without pyplot state, PNGs
written atomically, log axes labelled in plain numbers."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from iln.util.files import write_bytes_atomic


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib Figure on the Agg canvas (no pyplot state, safe without a display)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure_atomic(fig: Figure, path: Path | str, *, dpi: int = 110) -> Path:
    """Render fig as PNG in memory, then write it atomically (temp file + os.replace)."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def log_axis(ax, values: Sequence[float], axis: str = "y") -> None:
    """Log scale labelled in plain numbers (0.1, 1, 10): decades always, and 2 and 5 within
    each decade when the data spans less than two decades (else too few labels to read)."""
    getattr(ax, f"set_{axis}scale")("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    narrow = bool(positive) and max(positive) / min(positive) < 100
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    target.set_major_locator(LogLocator(base=10.0, numticks=10))
    target.set_major_formatter(plain)
    target.set_minor_locator(LogLocator(base=10.0, subs=(2.0, 5.0) if narrow else (1.0,)))
    target.set_minor_formatter(plain if narrow else NullFormatter())


def log_axis_if_wide(ax, values: np.ndarray, axis: str) -> None:
    """log_axis when the values span more than a decade, a linear axis otherwise."""
    positive = values[values > 0]
    if positive.size and positive.max() / positive.min() > 10:
        log_axis(ax, [float(v) for v in values], axis)
    else:
        (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(nbins=5))
