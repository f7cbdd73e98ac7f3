"""Figure helpers shared by the analysis and the report: a figure without pyplot state, each
figure written atomically as a PNG (PRINT_DPI) and an SVG beside it (for papers), log axes
labelled in plain numbers, curves smoothed for reading."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from iln.util.files import write_bytes_atomic


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib Figure on the Agg canvas (no pyplot state, safe without a display)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


PRINT_DPI = 200  # PNG resolution: sharp in print at the figure's size
VECTOR_SUFFIX = ".svg"  # every figure also as a vector file beside its PNG


def vector_path(path: Path | str) -> Path:
    """The vector copy of a figure's PNG: figure.png -> figure.svg."""
    return Path(path).with_suffix(VECTOR_SUFFIX)


def save_figure_atomic(fig: Figure, path: Path | str, *, dpi: int = PRINT_DPI) -> Path:
    """Render fig as PNG (at ``dpi``) and as SVG in memory, then write both atomically
    (temp file + os.replace): ``path`` and ``vector_path(path)``. Returns the PNG's path."""
    path = Path(path)
    for target, kind, extra in (
        (path, "png", {"dpi": dpi}),
        (vector_path(path), "svg", {"metadata": {"Date": None}}),  # no date: same bytes each run
    ):
        buffer = io.BytesIO()
        # fixed element ids (else random per save); text kept as text, editable in a paper
        with rc_context({"svg.hashsalt": "iln", "svg.fonttype": "none"}):
            fig.savefig(buffer, format=kind, **extra)
        write_bytes_atomic(target, buffer.getvalue())
    return path


def smoothing_window(count: int, share: float = 0.05, least: int = 3) -> int:
    """An odd window of about ``share`` of ``count`` points, at least ``least``."""
    window = max(least, round(count * share))
    return window if window % 2 else window + 1


def smooth_centred(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over ``window`` (odd) points: each point the mean of the finite
    values within window // 2 on either side (fewer at the ends), so the curve does not lag
    behind the data the way a trailing average does."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"smooth_centred: window must be odd and positive, got {window}")
    half = window // 2
    out = []
    for i in range(len(values)):
        near = [v for v in values[max(0, i - half) : i + half + 1] if math.isfinite(v)]
        out.append(sum(near) / len(near) if near else math.nan)
    return out


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
