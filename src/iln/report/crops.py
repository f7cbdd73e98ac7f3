"""Labelled crop panels (LR | bicubic | each norm | HR) from the restored samples that the
evaluate stages keep, so the report needs no inference of its own."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from iln.data.io import read_rgb
from iln.evaluation.metrics import psnr, rgb_to_y
from iln.figures.plotting import new_figure, save_figure_atomic

Box = tuple[int, int, int, int]  # (top, left, height, width) in HR pixels


def largest_difference_box(a: np.ndarray, b: np.ndarray, *, size: int, scale: int = 1) -> Box:
    """The ``size`` x ``size`` box where two restorations differ most (sum of |dY|).

    Corners are aligned to ``scale`` so the matching LR crop is exact; ties go to the
    top-most, then left-most box, so the choice is deterministic.
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(
            f"a and b must be two (H, W, 3) images of one shape: {a.shape} vs {b.shape}"
        )
    h, w = a.shape[:2]
    if size > h or size > w:
        raise ValueError(f"crop size {size} exceeds the image size {h}x{w}")
    diff = np.abs(rgb_to_y(a) - rgb_to_y(b))  # (H, W)
    integral = np.zeros((h + 1, w + 1), dtype=np.float64)
    integral[1:, 1:] = diff.cumsum(0).cumsum(1)
    tops = np.arange(0, h - size + 1, scale)
    lefts = np.arange(0, w - size + 1, scale)
    t, c = tops[:, None], lefts[None, :]
    sums = (
        integral[t + size, c + size]
        - integral[t, c + size]
        - integral[t + size, c]
        + integral[t, c]
    )
    i, j = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(tops[i]), int(lefts[j]), size, size


def crop_panel(
    *,
    lq: np.ndarray,
    gt: np.ndarray,
    restored: Mapping[str, np.ndarray],
    scale: int,
    box: Box,
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
