"""Labelled crop panels (LR | bicubic | each norm | HR) from the restored samples that the
evaluate stages keep, so the report needs no inference of its own."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from iln.analysis import new_figure, save_figure_atomic
from iln.data.io import read_rgb
from iln.evaluate import largest_difference_box
from iln.metrics import psnr


def crop_panel(
    *,
    lq: np.ndarray,
    gt: np.ndarray,
    restored: Mapping[str, np.ndarray],
    scale: int,
    box: tuple[int, int, int, int],
    path: Path,
    title: str,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """One row of panels over the HR box (top, left, height, width): the LR input (nearest
    upsampled), every restoration titled with its whole-image PSNR (in its colour from
    ``colors``, label -> colour), and the ground truth."""
    top, left, h, w = box
    panels = [
        ("LR input", lq[top // scale : (top + h) // scale, left // scale : (left + w) // scale])
    ]
    for label, image in restored.items():
        value = psnr(image, gt, crop_border=scale)
        panels.append((f"{label}\n{value:.2f} dB", image[top : top + h, left : left + w]))
    panels.append(("HR (ground truth)", gt[top : top + h, left : left + w]))
    fig = new_figure(2.1 * len(panels), 2.75)
    axes = fig.subplots(1, len(panels))
    names = ["LR input", *restored, "HR (ground truth)"]
    for ax, name, (label, image) in zip(axes, names, panels, strict=True):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=9, color=(colors or {}).get(name, "black"))
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return save_figure_atomic(fig, path)


def comparison_panels(
    *,
    lq_dir: Path,
    gt_dir: Path,
    samples: Mapping[str, Path],
    scale: int,
    out_dir: Path,
    prefix: str,
    contrast: tuple[str, str],
    crop: int = 96,
    colors: Mapping[str, str] | None = None,
) -> list[Path]:
    """One panel per image that every ``samples`` folder holds (label -> folder of PNGs).

    The crop is the ``crop`` x ``crop`` HR window where the two ``contrast`` restorations
    (e.g. LN and i-LN) differ most, so the panel shows where the norms disagree.
    """
    folders = list(samples.values())
    if not folders or not all(folder.is_dir() for folder in folders):
        return []
    names = sorted(
        set.intersection(*({p.name for p in folder.glob("*.png")} for folder in folders))
    )
    written = []
    for name in names:
        gt = read_rgb(gt_dir / name)
        restored = {label: read_rgb(folder / name) for label, folder in samples.items()}
        size = min(crop, gt.shape[0], gt.shape[1]) // scale * scale
        box = largest_difference_box(
            restored[contrast[0]], restored[contrast[1]], size=size, scale=scale
        )
        written.append(
            crop_panel(
                lq=read_rgb(lq_dir / name),
                gt=gt,
                restored=restored,
                scale=scale,
                box=box,
                path=out_dir / f"{prefix}_{Path(name).stem}.png",
                colors=colors,
                title=(
                    f"{Path(name).stem}, x{scale}: the {size}x{size} HR region where "
                    f"{contrast[0]} and {contrast[1]} differ most "
                    f"(PSNR over the whole image, Y channel, EMA weights)"
                ),
            )
        )
    return written
