"""Final-checkpoint analyses: feature statistics of the EMA and of the trained ("raw")
weights, the final norm's bias against its input (paper Fig. 8) and the
relative-position-bias tables of the first and last groups (paper Fig. 9).

Works for any model that follows the residual-stream contract (HAT and SwinIR alike):
`model.norm` with a `bias` of shape (C,), and
`model.group_blocks(g)[b].attn.relative_position_bias_table` of shape ((2w-1)^2, heads)
(``iln.models.restorer.WindowedRestorer``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iln.util.files import write_csv_atomic, write_json_atomic
from iln.config.layout import FEATURES_COLUMNS, FINAL_NORM_COLUMNS
from iln.models.common import BIAS_TABLE_STD
from iln.figures.plotting import log_axis_if_wide, new_figure, save_figure_atomic
from iln.evaluation.probes import evaluation_mode, measure_features
from iln.util.device import unwrap

SUMMARY_STATS: tuple[str, ...] = ("magnitude", "entropy", "max_abs")

# --------------------------------------------------------------------------------------
# Fig. 8: final-norm bias against the per-channel magnitude of its input


def final_norm_bias(
    model: nn.Module, lq_batch: torch.Tensor, *, chunk_size: int | None = None
) -> list[dict[str, object]]:
    """Rows (channel, bias, input_mean_abs): `model.norm.bias` beside the per-channel mean
    |x| of the norm's input (the last group's output) over all tokens of the probe batch.

    lq_batch: (B, 3, H, W) on the model's device. Eval mode, no_grad, modes restored.
    A final norm without a bias (identity, ReZero) gives bias NaN: there is none to show.
    """
    model = unwrap(model)
    norm = model.norm
    bias = getattr(norm, "bias", None)  # None: a final norm without one (identity, ReZero)
    if lq_batch.dim() != 4:
        raise ValueError(f"lq_batch must be (B, 3, H, W), got shape {tuple(lq_batch.shape)}")
    sums: list[torch.Tensor] = []  # each (C,) float64
    counts: list[int] = []

    def pre_hook(_module: nn.Module, args: tuple) -> None:
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(
                f"model.norm input: expected (B, N, C), got {getattr(x, 'shape', type(x).__name__)}"
            )
        x64 = x.detach().to(torch.float64)  # (B, N, C)
        sums.append(x64.abs().sum(dim=(0, 1)).cpu())
        counts.append(x64.shape[0] * x64.shape[1])

    chunks = lq_batch.split(chunk_size) if chunk_size else (lq_batch,)
    with evaluation_mode(model):
        handle = norm.register_forward_pre_hook(pre_hook)
        try:
            for chunk in chunks:
                model(chunk)
        finally:
            handle.remove()
    if not sums:
        raise RuntimeError("model.norm was not called during the forward pass")
    mean_abs = torch.stack(sums).sum(dim=0) / sum(counts)  # (C,)
    if isinstance(bias, torch.Tensor):
        beta = bias.detach().to(torch.float64).cpu().reshape(-1)  # (C,)
    else:
        beta = torch.full_like(mean_abs, math.nan)  # (C,) no bias parameter
    if beta.numel() != mean_abs.numel():
        raise ValueError(
            f"model.norm.bias has {beta.numel()} entries "
            f"but its input has {mean_abs.numel()} channels"
        )
    return [
        {"channel": c, "bias": float(beta[c]), "input_mean_abs": float(mean_abs[c])}
        for c in range(beta.numel())
    ]


def plot_final_norm(
    rows: Sequence[Mapping[str, object]], path: Path | str, *, title: str = ""
) -> Path:
    """Fig. 8 style: channels sorted by input mean |x|; the bias in the same order; and
    the bias against mean |x| per channel."""
    if not rows:
        raise ValueError("plot_final_norm: no rows")
    mean_abs = np.array([float(r["input_mean_abs"]) for r in rows])  # (C,)
    bias = np.array([float(r["bias"]) for r in rows])  # (C,)
    order = np.argsort(-mean_abs)
    x = np.arange(len(rows))
    fig = new_figure(12, 3.8)
    axes = fig.subplots(1, 3)
    axes[0].bar(x, np.maximum(mean_abs[order], 1e-12), width=1.0, color="tab:blue")
    log_axis_if_wide(axes[0], mean_abs, "y")
    axes[0].set_xlabel("channel, sorted by input mean |x|")
    axes[0].set_ylabel("input mean |x|")
    axes[0].set_title("input of the final norm", fontsize=9)
    if np.isnan(bias).all():
        for ax in axes[1:]:
            ax.text(0.5, 0.5, "no bias parameter", ha="center", va="center", transform=ax.transAxes)
    else:
        axes[1].bar(x, bias[order], width=1.0, color="tab:red")
        axes[1].axhline(0.0, color="k", lw=0.5)
        axes[2].scatter(np.maximum(mean_abs, 1e-12), bias, s=10, color="tab:purple")
        axes[2].axhline(0.0, color="k", lw=0.5)
        log_axis_if_wide(axes[2], mean_abs, "x")
    axes[1].set_xlabel("channel, same order")
    axes[1].set_ylabel("final-norm bias β")
    axes[1].set_title("bias per channel", fontsize=9)
    axes[2].set_xlabel("input mean |x| of the channel")
    axes[2].set_ylabel("final-norm bias β")
    axes[2].set_title("bias against input magnitude", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure_atomic(fig, path)


# --------------------------------------------------------------------------------------
# Fig. 9: relative position bias


def rpb_table_images(table: torch.Tensor) -> torch.Tensor:
    """((2w-1)^2, heads) table -> (heads, 2w-1, 2w-1) images indexed [dy + w-1, dx + w-1]."""
    if table.dim() != 2:
        raise ValueError(
            f"relative_position_bias_table must be ((2w-1)^2, heads), got {tuple(table.shape)}"
        )
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0] or side % 2 == 0:
        raise ValueError(
            f"relative_position_bias_table has {table.shape[0]} rows, not (2w-1)^2 for an integer w"
        )
    return table.detach().t().reshape(table.shape[1], side, side)


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into the ((2w-1)^2,) table for query token i and key token j."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    )  # (2, w, w)
    flat = coords.flatten(1)  # (2, w*w)
    rel = flat[:, :, None] - flat[:, None, :] + (window - 1)  # (2, w*w, w*w)
    return rel[0] * (2 * window - 1) + rel[1]  # (w*w, w*w)


def gather_rpb(table: torch.Tensor) -> torch.Tensor:
    """((2w-1)^2, heads) table -> (heads, w*w, w*w) bias added to the attention logits."""
    images = rpb_table_images(table)  # checks the shape
    window = (images.shape[-1] + 1) // 2
    index = relative_position_index(window).to(table.device)  # (w*w, w*w)
    return (
        table.detach()[index.reshape(-1)]
        .reshape(window * window, window * window, -1)
        .permute(2, 0, 1)
    )


def group_rpb_tables(model: nn.Module, group: int) -> list[torch.Tensor]:
    """The window-attention bias tables of every block of residual group ``group``
    (negative: from the end)."""
    blocks = unwrap(model).group_blocks(group)
    return [b.attn.relative_position_bias_table.detach().cpu().to(torch.float32) for b in blocks]


def plot_rpb(
    tables: Sequence[torch.Tensor], path: Path | str, *, title: str = "", gathered: bool = False
) -> Path:
    """Heat maps: one row per block, one column per head. Default: the table reshaped to
    (2w-1, 2w-1) over the relative offsets (dy, dx) between query and key; gathered=True
    shows the (w*w, w*w) bias over (query, key). Colour limits are symmetric and shared
    within a row (one block), with a colour bar per row. A block whose table still has
    about its initial spread (std < 2x BIAS_TABLE_STD) is marked as near initialisation."""
    if not tables:
        raise ValueError("plot_rpb: no tables")
    images = [
        gather_rpb(t) if gathered else rpb_table_images(t) for t in tables
    ]  # each (heads, h, w)
    heads = max(img.shape[0] for img in images)  # DRCT's dense blocks differ in heads
    reach = (images[0].shape[-1] - 1) // 2  # w - 1: the largest offset
    extent = None if gathered else (-reach - 0.5, reach + 0.5, reach + 0.5, -reach - 0.5)
    width = max(1.9 * heads + 1.6, 5.5)
    fig = new_figure(width, 1.9 * len(images) + 1.1)
    axes = np.atleast_2d(fig.subplots(len(images), heads, squeeze=False))
    near_init = []
    for b, (img, table) in enumerate(zip(images, tables, strict=True)):
        lim = float(img.abs().max()) or 1.0
        spread = float(table.float().std())
        near_init.append(spread < 2 * BIAS_TABLE_STD)
        mappable = None
        for h in range(heads):
            ax = axes[b, h]
            if h >= img.shape[0]:  # this block has fewer heads
                ax.axis("off")
                continue
            mappable = ax.imshow(
                img[h].numpy(),
                cmap="RdBu_r",
                vmin=-lim,
                vmax=lim,
                interpolation="nearest",
                extent=extent,
            )
            if gathered:
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.set_xticks([-reach, 0, reach])
                ax.set_yticks([-reach, 0, reach])
                ax.tick_params(labelsize=7)
            if b == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if b == len(images) - 1:
                ax.set_xlabel("key index" if gathered else "dx = query - key column", fontsize=8)
            if h == 0:
                mark = ", near init." if near_init[-1] else ""
                ax.set_ylabel(
                    f"block {b} (std {spread:.3f}{mark})\n"
                    + ("query index" if gathered else "dy = query - key row"),
                    fontsize=8,
                )
        bar = fig.colorbar(mappable, ax=list(axes[b]), shrink=0.8)
        bar.set_label("bias added to the logit", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    note = ""
    if all(near_init):
        note = "\n" + textwrap.fill(
            f"Still near initialisation: every table's std is below {2 * BIAS_TABLE_STD:g} "
            f"(initial std {BIAS_TABLE_STD:g}), so these maps show little learned structure.",
            width=int(width * 13),
        )
    if title or note:
        fig.suptitle(title + note, fontsize=9)
    return save_figure_atomic(fig, path)


# --------------------------------------------------------------------------------------
# Everything for one final checkpoint


def final_feature_rows(
    weight_sets: Mapping[str, nn.Module],
    lq_batch: torch.Tensor,
    *,
    per_block: bool = False,
    chunk_size: int | None = None,
) -> list[dict[str, object]]:
    """Feature statistics (iln.evaluation.probes) of every model in ``weight_sets`` (name -> model,
    e.g. ``{"ema": ..., "raw": ...}``) on the same probe batch; rows FEATURES_COLUMNS."""
    rows: list[dict[str, object]] = []
    for name, model in weight_sets.items():
        features = measure_features(model, lq_batch, per_block=per_block, chunk_size=chunk_size)
        rows.extend({"weights": name, **row} for row in features)
    return rows


def final_summary(rows: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """``final/<weights>/<layer>/<stat>`` for stat in SUMMARY_STATS, from features rows."""
    return {
        f"final/{row['weights']}/{row['layer']}/{stat}": float(row[stat])
        for row in rows
        for stat in SUMMARY_STATS
    }


def run_final_analysis(
    model: nn.Module,
    lq_batch: torch.Tensor,
    out_dir: Path | str,
    *,
    raw: nn.Module | None = None,
    per_block: bool = False,
    chunk_size: int | None = None,
    label: str = "",
) -> dict[str, object]:
    """Write features.csv, summary.json, final_norm.csv, final_norm.png, rpb_first.png,
    rpb_last.png into out_dir (the run's analysis/ folder); return rows, summary and paths.

    ``model`` holds the EMA weights (what evaluation uses), ``raw`` the trained weights:
    features.csv and summary.json have both (``weights`` ema / raw), the final-norm and
    relative-position-bias analyses the EMA weights, as their titles say.
    """
    out_dir = Path(out_dir)
    weight_sets = {"ema": model} if raw is None else {"ema": model, "raw": raw}
    features = final_feature_rows(weight_sets, lq_batch, per_block=per_block, chunk_size=chunk_size)
    write_csv_atomic(out_dir / "features.csv", features, FEATURES_COLUMNS)
    summary = final_summary(features)
    write_json_atomic(out_dir / "summary.json", summary)
    bias_rows = final_norm_bias(model, lq_batch, chunk_size=chunk_size)
    write_csv_atomic(out_dir / "final_norm.csv", bias_rows, FINAL_NORM_COLUMNS)
    prefix = f"{label}: " if label else ""
    files = [
        out_dir / "features.csv",
        out_dir / "summary.json",
        out_dir / "final_norm.csv",
        plot_final_norm(
            bias_rows,
            out_dir / "final_norm.png",
            title=f"{prefix}final norm bias vs input (EMA weights)",
        ),
        plot_rpb(
            group_rpb_tables(model, 0),
            out_dir / "rpb_first.png",
            title=f"{prefix}relative position bias, first group (EMA weights)",
        ),
        plot_rpb(
            group_rpb_tables(model, -1),
            out_dir / "rpb_last.png",
            title=f"{prefix}relative position bias, last group (EMA weights)",
        ),
    ]
    return {
        "features": features,
        "summary": summary,
        "final_norm": bias_rows,
        "files": [str(f) for f in files],
    }
