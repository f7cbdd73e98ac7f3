"""Training-dynamics figures (paper Fig. 1, 4, 7 style) from the runs' probes.csv."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from iln.analysis import new_figure, save_figure_atomic
from iln.report.runs import RunResults


def _has_probes(run: RunResults | None) -> bool:
    return run is not None and bool(run.probes)


def _ceiling(run: RunResults) -> float | None:
    values = [float(r["entropy_ceiling"]) for r in run.probes or []]
    return max(values) if values else None


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def fig1_magnitude_entropy(
    runs: Sequence[tuple[str, RunResults | None]], path: Path
) -> Path | None:
    """Magnitude (log) and channel entropy vs iteration at every group, one column per run
    (LN and i-LN). None when no run has probes."""
    if not any(_has_probes(r) for _, r in runs):
        return None
    fig = new_figure(5.0 * len(runs), 7.0)
    # Shared y axes per row: the point of the figure is LN's scale against i-LN's.
    axes = fig.subplots(2, len(runs), squeeze=False, sharey="row")
    for col, (title, run) in enumerate(runs):
        ax_m, ax_e = axes[0, col], axes[1, col]
        if not _has_probes(run):
            _empty(ax_m, f"{title}: not run")
            _empty(ax_e, f"{title}: not run")
            continue
        layers = run.group_layers()
        cmap = colormaps["viridis"]
        for i, layer in enumerate(layers):
            color = cmap(i / max(len(layers) - 1, 1))
            ax_m.plot(*run.curve(layer, "magnitude"), color=color, label=layer)
            ax_e.plot(*run.curve(layer, "entropy"), color=color, label=layer)
        ceiling = _ceiling(run)
        if ceiling is not None:
            ax_e.axhline(ceiling, color="k", ls="--", lw=0.8, label="ln C")
        ax_m.set_yscale("log")
        ax_m.set_title(f"{title} ({run.info.name})")
        ax_m.set_ylabel("magnitude (mean x²)")
        ax_e.set_ylabel("channel entropy (nats)")
        ax_e.set_xlabel("iteration")
        ax_m.legend(fontsize=7)
        ax_e.legend(fontsize=7)
    return save_figure_atomic(fig, path)


def deepest_curves(
    runs: Sequence[RunResults], path: Path, *, title: str, log_magnitude: bool = True
) -> Path | None:
    """Deepest-group magnitude and entropy vs iteration, one line per run (Fig. 4 style)."""
    runs = [r for r in runs if _has_probes(r)]
    if not runs:
        return None
    fig = new_figure(11.0, 4.0)
    ax_m, ax_e = fig.subplots(1, 2)
    cmap = colormaps["tab10"] if len(runs) <= 10 else colormaps["tab20"]
    for i, run in enumerate(runs):
        layer = run.group_layers()[-1] if run.group_layers() else None
        if layer is None:
            continue
        color = cmap(i % cmap.N)
        label = f"{run.info.label} ({run.info.name})"
        ax_m.plot(*run.curve(layer, "magnitude"), color=color, label=label)
        ax_e.plot(*run.curve(layer, "entropy"), color=color, label=label)
    if log_magnitude:
        ax_m.set_yscale("log")
    ax_m.set_ylabel("magnitude (mean x²), deepest group")
    ax_e.set_ylabel("channel entropy (nats), deepest group")
    ceiling = max((c for r in runs if (c := _ceiling(r)) is not None), default=None)
    if ceiling is not None:
        ax_e.axhline(ceiling, color="k", ls="--", lw=0.8, label="ln C")
    for ax in (ax_m, ax_e):
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure_atomic(fig, path)


def fig7_entropy_ablation(runs: Sequence[RunResults], path: Path) -> Path | None:
    """Deepest-group entropy vs iteration, and final entropy per group, for the Table 3
    variants (LN, LN*, LN+Rs, i-LN)."""
    runs = [r for r in runs if _has_probes(r)]
    if not runs:
        return None
    fig = new_figure(11.0, 4.0)
    ax_t, ax_g = fig.subplots(1, 2)
    cmap = colormaps["tab10"]
    for i, run in enumerate(runs):
        layers = run.group_layers()
        if not layers:
            continue
        color = cmap(i % cmap.N)
        label = f"{run.info.label} ({run.info.name})"
        ax_t.plot(*run.curve(layers[-1], "entropy"), color=color, label=label)
        final = [run.curve(layer, "entropy")[1][-1] for layer in layers]
        ax_g.plot(np.arange(len(layers)), final, marker="o", color=color, label=label)
    ceiling = max((c for r in runs if (c := _ceiling(r)) is not None), default=None)
    for ax in (ax_t, ax_g):
        if ceiling is not None:
            ax.axhline(ceiling, color="k", ls="--", lw=0.8, label="ln C")
        ax.set_ylabel("channel entropy (nats)")
        ax.legend(fontsize=7)
    ax_t.set_xlabel("iteration")
    ax_t.set_title("deepest group over training")
    ax_g.set_xlabel("group index")
    ax_g.xaxis.get_major_locator().set_params(integer=True)
    ax_g.set_title("per group at the last probe")
    return save_figure_atomic(fig, path)
