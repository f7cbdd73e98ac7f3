"""The offline default set: photographs shipped inside scikit-image's wheel, cropped and
downscaled (MATLAB-compatible bicubic) so the whole pipeline runs on a CPU in minutes.

The PNGs are committed under ``data/default/{train,test}``; ``write_embedded`` recreates
them bit for bit from scikit-image's files (pinned version), for the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iln.data.io import write_png
from iln.data.resize import imresize, round_to_uint8


@dataclass(frozen=True)
class EmbeddedImage:
    name: str  # scikit-image loader (skimage.data.<name>) and output file stem
    split: str  # "train" or "test"
    crop: tuple[int, int, int, int]  # (top, left, height, width) on the original
    size: tuple[
        int, int
    ]  # (height, width) after resizing; multiples of 12 (mod-crop free for x2/x3/x4)
    licence: str


EMBEDDED = (
    EmbeddedImage("astronaut", "train", (0, 0, 512, 512), (384, 384), "public domain (NASA)"),
    EmbeddedImage("rocket", "train", (0, 5, 427, 630), (252, 372), "public domain (SpaceX)"),
    EmbeddedImage(
        "hubble_deep_field", "train", (52, 116, 768, 768), (384, 384), "public domain (NASA)"
    ),
    EmbeddedImage(
        "immunohistochemistry",
        "train",
        (0, 0, 512, 512),
        (384, 384),
        "no known copyright restrictions",
    ),
    EmbeddedImage("retina", "train", (0, 0, 1411, 1411), (384, 384), "CC0 (M. Haggstrom)"),
    EmbeddedImage("chelsea", "test", (0, 4, 300, 443), (252, 372), "CC0 (S. van der Walt)"),
    EmbeddedImage("coffee", "test", (0, 5, 400, 590), (252, 372), "CC0 (R. Michetti)"),
)


def render(spec: EmbeddedImage) -> np.ndarray:
    """The committed pixels of one embedded image: uint8 (H, W, 3)."""
    import skimage.data

    original = getattr(skimage.data, spec.name)()  # (H, W, 3) uint8, read from the installed wheel
    top, left, h, w = spec.crop
    if top + h > original.shape[0] or left + w > original.shape[1]:
        raise ValueError(
            f"{spec.name}: crop {spec.crop} exceeds the image size {original.shape[:2]}"
        )
    crop = original[top : top + h, left : left + w, :3]
    return round_to_uint8(imresize(crop, output_shape=spec.size))


def write_embedded(out_dir: str | Path) -> list[Path]:
    """Write ``<out_dir>/{train,test}/<name>.png`` for every embedded image."""
    out_dir = Path(out_dir)
    written = []
    for spec in EMBEDDED:
        path = out_dir / spec.split / f"{spec.name}.png"
        write_png(path, render(spec), compress_level=9)
        written.append(path)
    return written
