"""Side-by-side crops (LR | bicubic | LN | i-LN | HR) from the restored samples that the
evaluate stages keep, so the report needs no inference of its own."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from iln.data.io import read_rgb, write_png
from iln.evaluate import largest_difference_box, side_by_side_crops


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
        images = {"LR": read_rgb(lq_dir / name), **restored, "HR": gt}
        path = out_dir / f"{prefix}_{Path(name).stem}.png"
        write_png(path, side_by_side_crops(images, scale=scale, box=box))
        written.append(path)
    return written
