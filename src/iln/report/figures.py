"""Training-dynamics figures from the runs' probes.csv and history.csv: one plot per
phenomenon, every run overlaid in its norm's fixed colour (iln.figures.styles); FIGURES lists them.

Each function returns the written path, or None when none of the given runs has the data
(the report says why).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from iln.figures.plotting import log_axis, new_figure, save_figure_atomic
from iln.report.runs import RunResults
from iln.figures.styles import (
    LINE_GRAD_CLIP,
    LINE_KLD,
    LINE_PLAIN,
    LINE_STDNORM_SWITCHED,
    norm_label,
    norm_rank,
    norm_style,
)

SHALLOW_ALPHA = 0.3  # shallower groups: thin, faint lines of the run's colour


def run_style(run: RunResults) -> dict[str, str]:
    """The run's line: its norm's colour, dashed / dotted / dash-dot for a stabiliser or a
    switched stdnorm."""
    info = run.info
    if info.kld_weight > 0:
        ls = LINE_KLD
    elif info.grad_clip > 0:
        ls = LINE_GRAD_CLIP
    else:
        ls = LINE_STDNORM_SWITCHED if info.stdnorm_switched else LINE_PLAIN
    return {"color": norm_style(info.norm).color, "ls": ls}


def run_labels(runs: Sequence[RunResults]) -> dict[str, str]:
    """Legend label per run name: the norm's label and variant, plus the run name where two
    runs would otherwise read the same."""
    labels = {r.info.name: r.info.label for r in runs}
    counts = {label: list(labels.values()).count(label) for label in labels.values()}
    return {
        name: label if counts[label] == 1 else f"{label} [{name}]" for name, label in labels.items()
    }


def _with_probes(runs: Sequence[RunResults]) -> list[RunResults]:
    return [r for r in runs if r.probes and r.group_layers()]


def _ceiling_line(ax, runs: Sequence[RunResults]) -> None:
    """The entropy ceiling ln C of the runs' probes, dashed (nothing without probes)."""
    values = [float(r["entropy_ceiling"]) for run in runs for r in run.probes or []]
    if values:
        ceiling = max(values)
        ax.axhline(ceiling, color="k", ls="--", lw=0.8, label=f"ceiling ln C = {ceiling:.2f}")


def stat_vs_iteration(
    runs: Sequence[RunResults],
    path: Path,
    *,
    stat: str,
    title: str,
    ylabel: str,
    log: bool,
) -> Path | None:
    """One statistic vs iteration, every run overlaid: its deepest group as a thick line, its
    shallower groups as thin faint lines of the same colour."""
    runs = _with_probes(runs)
    if not runs:
        return None
    labels = run_labels(runs)
    fig = new_figure(9.0, 4.6)
    ax = fig.subplots()
    values: list[float] = []
    for run in runs:
        layers = run.group_layers()
        style = run_style(run)
        for layer in layers:
            values += run.curve(layer, stat)[1]
        for layer in layers[:-1]:
            ax.plot(*run.curve(layer, stat), **style, lw=0.8, alpha=SHALLOW_ALPHA)
        ax.plot(
            *run.curve(layers[-1], stat),
            **style,
            lw=2.2,
            marker="o",
            ms=3,
            label=f"{labels[run.info.name]}, {layers[-1]}",
        )
    if stat == "entropy":
        _ceiling_line(ax, runs)
    if log:
        log_axis(ax, values)
    ax.set_xlabel("training iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="major")
    ax.legend(
        fontsize=8,
        title="thick: deepest group\nthin: shallower groups",
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    return save_figure_atomic(fig, path)


def per_group_last_probe(runs: Sequence[RunResults], path: Path, *, title: str) -> Path | None:
    """Magnitude and entropy of every group at each run's last probe (depth profile)."""
    runs = _with_probes(runs)
    if not runs:
        return None
    labels = run_labels(runs)
    fig = new_figure(11.0, 4.4)
    ax_m, ax_e = fig.subplots(1, 2)
    names: list[str] = []
    magnitudes: list[float] = []
    for run in runs:
        layers = run.group_layers()
        names = layers if len(layers) > len(names) else names
        step = run.last_probe_step()
        rows = {r["layer"]: r for r in run.probes if r["step"] == step}
        x = np.arange(len(layers))
        style = {**run_style(run), "marker": "o", "lw": 1.8}
        label = f"{labels[run.info.name]} (step {step})"
        magnitude = [float(rows[layer]["magnitude"]) for layer in layers]
        magnitudes += magnitude
        ax_m.plot(x, magnitude, label=label, **style)
        ax_e.plot(x, [float(rows[layer]["entropy"]) for layer in layers], label=label, **style)
    _ceiling_line(ax_e, runs)
    log_axis(ax_m, magnitudes)
    ax_m.set_ylabel("magnitude: mean x² (log scale)")
    ax_e.set_ylabel("channel entropy (nats)")
    for ax in (ax_m, ax_e):
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_xlabel("group output (input side → output side)")
        ax.grid(alpha=0.3, which="major")
    ax_m.set_title("feature magnitude per group", fontsize=10)
    ax_e.set_title("channel entropy per group", fontsize=10)
    ax_e.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure_atomic(fig, path)


def loss_and_val_psnr(runs: Sequence[RunResults], path: Path, *, title: str) -> Path | None:
    """Training loss (log) and validation PSNR vs iteration, every run overlaid."""
    runs = [r for r in runs if r.history]
    if not runs:
        return None
    labels = run_labels(runs)
    fig = new_figure(11.0, 4.2)
    ax_l, ax_p = fig.subplots(1, 2)
    any_psnr = False
    losses: list[float] = []
    for run in runs:
        style = {**run_style(run), "label": labels[run.info.name]}
        steps, loss = run.history_curve("loss")
        losses += loss
        ax_l.plot(steps, loss, lw=1.2, **style)
        steps, psnr = run.history_curve("val_psnr")
        if steps:
            any_psnr = True
            ax_p.plot(steps, psnr, marker="o", ms=3, lw=1.5, **style)
    log_axis(ax_l, losses)
    ax_l.set_ylabel("L1 training loss (log scale)")
    ax_l.set_title("training loss", fontsize=10)
    ax_p.set_ylabel("validation PSNR (dB, Y), EMA weights")
    ax_p.set_title("validation PSNR", fontsize=10)
    if not any_psnr:
        ax_p.text(
            0.5,
            0.5,
            "no validation PSNR in history.csv",
            ha="center",
            va="center",
            transform=ax_p.transAxes,
            color="0.4",
        )
        ax_p.set_xticks([])
        ax_p.set_yticks([])
    else:
        ax_p.legend(fontsize=8)
        ax_p.yaxis.set_major_locator(MaxNLocator(nbins=6))
    for ax in (ax_l, ax_p):
        ax.set_xlabel("training iteration")
        ax.grid(alpha=0.3, which="major")
    ax_l.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure_atomic(fig, path)


# --------------------------------------------------------------------------- Fig. 2


@dataclass(frozen=True)
class SizePoint:
    """One run of the depth / width grid at its last training probe (deepest group)."""

    run: str
    norm: str
    groups: int  # residual groups
    blocks: int  # Transformer blocks per group
    width: int  # embed dim C
    magnitude: float  # mean x^2 of the deepest group's output
    entropy: float  # channel entropy (nats); its ceiling is ln(width)

    @property
    def depth(self) -> int:
        return self.groups * self.blocks


def size_points(runs: Sequence[RunResults]) -> list[SizePoint]:
    """The deepest group's magnitude and entropy at each run's last training probe, with the
    network size that train/summary.json records (runs without it are left out)."""
    points = []
    for run in _with_probes(runs):
        if run.model is None:
            continue
        step, deepest = run.last_probe_step(), run.group_layers()[-1]
        row = next(r for r in run.probes if r["step"] == step and r["layer"] == deepest)
        depths = run.model["depths"]
        points.append(
            SizePoint(
                run=run.info.name,
                norm=run.info.norm,
                groups=len(depths),
                blocks=max(depths),
                width=run.model["embed_dim"],
                magnitude=float(row["magnitude"]),
                entropy=float(row["entropy"]),
            )
        )
    return points


def _sweep(points: Sequence[SizePoint], along: str) -> list[SizePoint]:
    """The points of one sweep: along "depth", those at the width with the most distinct
    depths; along "width", those at the (groups, blocks) shape with the most distinct widths."""
    if along == "depth":
        fixed, varied = (lambda p: p.width), (lambda p: p.depth)
    else:
        fixed, varied = (lambda p: (p.groups, p.blocks)), (lambda p: p.width)
    by_fixed: dict[object, list[SizePoint]] = {}
    for point in points:
        by_fixed.setdefault(fixed(point), []).append(point)
    if not by_fixed:
        return []
    best = max(sorted(by_fixed), key=lambda v: len({varied(p) for p in by_fixed[v]}))
    return by_fixed[best]


def depth_width(points: Sequence[SizePoint], path: Path, *, title: str) -> Path | None:
    """Paper Fig. 2: the deepest group's magnitude (log) and channel entropy against depth
    (groups x blocks, at the most common width) and against width (at the most common
    depth), one line per norm in its colour. None when no sweep has two sizes."""
    by_depth, by_width = _sweep(points, "depth"), _sweep(points, "width")
    if len({p.depth for p in by_depth}) < 2 and len({p.width for p in by_width}) < 2:
        return None
    fig = new_figure(11.0, 7.0)
    (ax_md, ax_mw), (ax_ed, ax_ew) = fig.subplots(2, 2)
    norms = sorted({p.norm for p in points}, key=norm_rank)
    magnitudes = [p.magnitude for p in points]
    for series, ax_m, ax_e, x_of in (
        (by_depth, ax_md, ax_ed, lambda p: p.depth),
        (by_width, ax_mw, ax_ew, lambda p: p.width),
    ):
        for norm in norms:
            line = sorted((p for p in series if p.norm == norm), key=x_of)
            if not line:
                continue
            style = {"color": norm_style(norm).color, "marker": "o", "lw": 1.8, "ms": 5}
            xs = [x_of(p) for p in line]
            ax_m.plot(xs, [p.magnitude for p in line], label=norm_label(norm), **style)
            ax_e.plot(xs, [p.entropy for p in line], label=norm_label(norm), **style)
        sizes = sorted({x_of(p) for p in series})
        ceilings = sorted({(x_of(p), math.log(p.width)) for p in series})
        if ceilings:
            ax_e.plot(*zip(*ceilings), color="k", ls="--", lw=0.8, label="ceiling ln C")
        log_axis(ax_m, magnitudes)
        for ax in (ax_m, ax_e):
            ax.set_xticks(sizes)
            ax.grid(alpha=0.3, which="major")
        if series is by_depth:
            shapes = {p.depth: f"{p.groups}×{p.blocks}" for p in series}
            for ax in (ax_m, ax_e):
                ax.set_xticklabels([f"{d}\n({shapes[d]})" for d in sizes])
                ax.set_xlabel("depth: Transformer blocks (groups × blocks per group)")
            width = series[0].width if series else None
            ax_m.set_title(f"against depth (width C = {width})", fontsize=10)
        else:
            for ax in (ax_m, ax_e):
                ax.set_xlabel("width: embedding dimension C")
            shape = f"{series[0].groups}×{series[0].blocks}" if series else "-"
            ax_m.set_title(f"against width (depth {shape} blocks)", fontsize=10)
        ax_m.set_ylabel("deepest group: mean x² (log scale)")
        ax_e.set_ylabel("deepest group: channel entropy (nats)")
    for ax in (ax_mw, ax_ed, ax_ew):
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure_atomic(fig, path)


# --------------------------------------------------------------------------- the list

MAGNITUDE = "magnitude: mean x² (log scale)"
Draw = Callable[[Sequence[RunResults], Path], Path | None]


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report: figures/<name>.png, drawn from the runs of ``group``
    (None: one LN, LN*, LN+Rs and i-LN run each), which need ``need`` to be drawn."""

    name: str
    heading: str
    caption: str
    draw: Draw  # (runs, path) -> the path, or None: nothing to draw
    group: str | None = None
    need: str = "probes.csv"  # what the runs must have: the skip reason says so
    probes: bool = True  # the caption ends with how the probes were measured
    fig1: bool = False  # the caption quotes the paper's Fig. 1 numbers


def _curve(stat: str, title: str, ylabel: str = MAGNITUDE, log: bool = True) -> Draw:
    return lambda runs, path: stat_vs_iteration(
        runs, path, stat=stat, title=title, ylabel=ylabel, log=log
    )


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        "fig1_magnitude_vs_iteration",
        "Feature magnitude vs iteration (paper Fig. 1, top)",
        "Per-token LN lets the residual stream grow; i-LN keeps it at a fixed scale.",
        _curve("magnitude", "Feature magnitude (mean x²) of the residual stream during training"),
        fig1=True,
    ),
    FigureSpec(
        "fig1_entropy_vs_iteration",
        "Channel entropy vs iteration (paper Fig. 1, bottom)",
        "Entropy of the per-channel energy: at the ceiling ln C every channel carries the "
        "same energy; LN's deep groups concentrate it in a few channels.",
        _curve(
            "entropy",
            "Channel entropy of the residual stream during training",
            "channel entropy (nats)",
            log=False,
        ),
    ),
    FigureSpec(
        "fig7_per_group_last_probe",
        "Every group at the last probe (paper Fig. 7: the ablation)",
        "Magnitude and entropy of each group's output at the last probe, for LN, LN*, "
        "LN+Rs and i-LN: which half of i-LN keeps the statistics in check.",
        lambda runs, path: per_group_last_probe(
            runs, path, title="Depth profile at the last training probe (raw weights)"
        ),
    ),
    FigureSpec(
        "fig4_norms_magnitude",
        "Every normalisation layer (paper Fig. 4)",
        "Feature magnitude of the Table 1 runs.",
        _curve(
            "magnitude", "Feature magnitude during training, every normalisation (Table 1 runs)"
        ),
        group="table1",
    ),
    FigureSpec(
        "fig8_stabilisers_max_abs",
        "Other stabilisers: max |x| during training (paper Table 8)",
        "Whether gradient clipping or the KL regulariser stops LN's features from growing "
        "(dashed: gradient clipping, dotted: KL regulariser).",
        _curve(
            "max_abs",
            "Largest |x| of the residual stream during training (Table 8 runs)",
            "max |x| (log scale)",
        ),
        group="table8",
    ),
    FigureSpec(
        "fig2_depth_width",
        "Depth and width (paper Fig. 2)",
        "The deepest group's feature magnitude and channel entropy at each run's last "
        "training probe, against depth (Transformer blocks, at the grid's shared width) and "
        "against width (embedding dimension, at its shared depth); the dashed line is the "
        "entropy ceiling ln C. The paper's Fig. 2: LN's growth and entropy loss get worse as "
        "the network grows.",
        lambda runs, path: depth_width(
            size_points(runs),
            path,
            title="Deepest group at the last training probe, against network size",
        ),
        group="fig2",
        need="probes.csv of two sizes",
    ),
    FigureSpec(
        "figS1_stdnorm_magnitude",
        "Input standardisation on and off (ours, Table S1)",
        "Feature magnitude with the input standardised (dash-dot: stdnorm switched "
        "against the official pairing).",
        _curve("magnitude", "Feature magnitude with stdnorm on and off"),
        group="stdnorm",
    ),
    FigureSpec(
        "figS2_loss_val_psnr",
        "Training loss and validation PSNR (ours)",
        "L1 loss of the weights being trained, and PSNR of the EMA weights on the "
        "validation images, per run.",
        lambda runs, path: loss_and_val_psnr(runs, path, title="Training loss and validation PSNR"),
        need="history.csv",
        probes=False,
    ),
)
