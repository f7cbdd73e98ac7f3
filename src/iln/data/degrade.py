"""Synthetic degradations: bicubic downsampling, Gaussian noise, JPEG; plus mod-crop and tiling.

All take and return uint8 (H, W, 3) RGB (``imresize`` works in float64). Randomness comes
only from a generator passed in; ``noise_rng`` derives one per image from (base seed, task,
image name) so a pair never depends on which other images were processed, or in what order.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import PIL
from PIL import Image, features

from iln.data.resize import imresize, imresize_reference, round_to_uint8

__all__ = [
    "imresize",
    "imresize_reference",
    "round_to_uint8",
    "bicubic_downsample",
    "modcrop",
    "add_gaussian_noise",
    "noise_rng",
    "jpeg_compress",
    "jpeg_encoder_info",
    "tile_positions",
    "SUBSAMPLING",
]

SUBSAMPLING = {
    "yuv444": 0,
    "yuv422": 1,
    "yuv420": 2,
}  # chroma 4:4:4 / 4:2:2 / 4:2:0 -> Pillow's codes


def _check_rgb(img: np.ndarray, what: str) -> None:
    if (
        not isinstance(img, np.ndarray)
        or img.dtype != np.uint8
        or img.ndim != 3
        or img.shape[2] != 3
    ):
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", type(img).__name__)
        raise ValueError(f"{what} expects a uint8 (H, W, 3) image, got {dtype} of shape {shape}")


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop bottom/right so height and width are multiples of ``scale`` (the SR benchmark rule)."""
    h, w = img.shape[:2]
    hh, ww = h - h % scale, w - w % scale
    if hh == 0 or ww == 0:
        raise ValueError(f"image of size {h}x{w} is smaller than the scale {scale}")
    return img if (hh, ww) == (h, w) else img[:hh, :ww]


def bicubic_downsample(img: np.ndarray, scale: int, *, round_each_pass: bool = False) -> np.ndarray:
    """MATLAB ``imresize(img, 1/scale)`` on uint8 (H, W, 3) -> uint8 (ceil(H/s), ceil(W/s), 3).

    Computed in float64 and rounded once (half away from zero, clipped), unless
    ``round_each_pass``: then the intermediate is rounded too, as MATLAB does for uint8 input.
    """
    _check_rgb(img, "bicubic_downsample")
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"bicubic_downsample scale must be a positive integer, got {scale!r}")
    if scale == 1:
        return img.copy()
    return round_to_uint8(imresize(img, 1.0 / scale, round_each_pass=round_each_pass))


def noise_rng(seed: int, task: str, name: str) -> np.random.Generator:
    """A generator that depends only on (seed, task, image name)."""
    digest = hashlib.sha256(f"{seed}\x00{task}\x00{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def add_gaussian_noise(
    img: np.ndarray, sigma: float, rng: np.random.Generator, *, grey: bool = False
) -> np.ndarray:
    """img + N(0, sigma^2) per pixel and channel on the [0, 255] scale, clipped and rounded to
    uint8. ``grey``: ``img`` is a grey image replicated to RGB; one noise plane is drawn for
    its first channel and the result replicated, so the noisy image stays grey."""
    _check_rgb(img, "add_gaussian_noise")
    if grey:
        plane = img[..., :1].astype(np.float64)  # (H, W, 1)
        noisy = plane + rng.normal(0.0, float(sigma), size=plane.shape)
        return np.repeat(round_to_uint8(noisy), 3, axis=-1)
    noisy = img.astype(np.float64) + rng.normal(0.0, float(sigma), size=img.shape)
    return round_to_uint8(noisy)


def jpeg_compress(
    img: np.ndarray, quality: int, *, subsampling: str = "yuv420", grey: bool = False
) -> np.ndarray:
    """Encode as baseline JPEG with Pillow (libjpeg, standard IJG tables scaled by ``quality``,
    RGB -> YCbCr with ``subsampling``) and decode again. ``grey``: ``img`` is a grey image
    replicated to RGB; its first channel is encoded as a one-channel (greyscale) JPEG, as
    the grey JPEG benchmarks are, and the decoded plane replicated."""
    _check_rgb(img, "jpeg_compress")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    if subsampling not in SUBSAMPLING:
        raise ValueError(
            f"JPEG subsampling must be one of {', '.join(SUBSAMPLING)}, got {subsampling!r}"
        )
    buffer = io.BytesIO()
    source = Image.fromarray(np.ascontiguousarray(img[..., 0]), "L") if grey else None
    (source or Image.fromarray(img, "RGB")).save(
        buffer,
        format="JPEG",
        quality=int(quality),
        subsampling=SUBSAMPLING[subsampling],
        optimize=False,
        progressive=False,
    )
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB")).copy()


def jpeg_encoder_info(subsampling: str = "yuv420") -> dict[str, str]:
    """Which encoder made the JPEG pairs (encoders differ; recorded in the manifest)."""
    turbo = features.version("libjpeg_turbo")
    return {
        "encoder": "Pillow " + PIL.__version__,
        "library": f"libjpeg-turbo {turbo}" if turbo else f"libjpeg {features.version('jpg')}",
        "colour": (
            "RGB -> YCbCr (JFIF), baseline, standard IJG quantisation tables scaled by quality"
        ),
        "subsampling": subsampling,
    }


def tile_positions(length: int, size: int, step: int) -> list[int]:
    """Start offsets of ``size`` tiles every ``step`` pixels, plus one flush with the end when
    the last regular tile leaves a remainder (the official sub-image rule)."""
    if length < size:
        return [0]
    starts = list(range(0, length - size + 1, step))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts
