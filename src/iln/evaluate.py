"""Restoring test images with a model and scoring them (PSNR / SSIM on Y).

``restore`` turns one uint8 LR image into one uint8 restored image exactly as the
benchmark protocol expects (clamp to [0, 1], scale to 255, round). ``evaluate_pairs``
applies any such function to a set of (name, lq, gt) pairs and returns one row per image;
``summarise`` reduces the rows to the per-set means that papers report. ``self_ensemble``
is the x8 flip / transpose test-time ensemble (``restore(..., ensemble=True)``), and
``ImageJob`` restores and scores one test image file as a job of ``iln.pool`` (the evaluate
stage spreads its images over processes with it). The bicubic baseline and the
side-by-side crop panels live here too because they share the same uint8-in, uint8-out
convention.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from iln.data.io import read_rgb
from iln.layout import ENSEMBLE_SUFFIX, METRICS_ENSEMBLE
from iln.metrics import psnr, rgb_to_y, ssim
from iln.protocols import Protocol

RestoreFn = Callable[[np.ndarray], np.ndarray]


def _check_image(img: np.ndarray, what: str) -> None:
    if (
        not isinstance(img, np.ndarray)
        or img.dtype != np.uint8
        or img.ndim != 3
        or img.shape[-1] != 3
    ):
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"{what} must be a uint8 (H, W, 3) RGB array, got {desc}")


def to_uint8(y: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) model output in [0, 1] (any float dtype) -> uint8 (H, W, 3).

    NaN becomes 0 and +-inf is clamped like any other value, so a numerically broken
    forward pass (e.g. fp16 overflow) still yields an image that can be scored.
    """
    y = torch.nan_to_num(y[0].float(), nan=0.0, posinf=1.0, neginf=0.0)  # (3, H, W)
    y = (y.clamp(0.0, 1.0) * 255.0).round()
    return y.to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering [0, length); the last one is flush."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _forward_tiled(
    model: nn.Module, x: torch.Tensor, scale: int, tile: int, overlap: int
) -> torch.Tensor:
    """Run ``model`` on overlapping LR tiles and average the overlapping outputs."""
    _, c, h, w = x.shape  # (1, 3, H, W)
    th, tw = min(tile, h), min(tile, w)
    stride = tile - overlap
    acc = torch.zeros(1, c, h * scale, w * scale, dtype=torch.float32, device=x.device)
    weight = torch.zeros(1, 1, h * scale, w * scale, dtype=torch.float32, device=x.device)
    for top in _tile_starts(h, th, stride):
        for left in _tile_starts(w, tw, stride):
            patch = x[:, :, top : top + th, left : left + tw]  # (1, 3, th, tw)
            out = model(patch).float()  # (1, 3, s*th, s*tw)
            if out.shape[-2:] != (th * scale, tw * scale):
                raise ValueError(
                    f"model returned {tuple(out.shape)} for a tile {th}x{tw} at scale {scale}"
                )
            rows = slice(top * scale, (top + th) * scale)
            cols = slice(left * scale, (left + tw) * scale)
            acc[:, :, rows, cols] += out
            weight[:, :, rows, cols] += 1.0
    return acc / weight


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Transform ``k`` in 0..7 of (B, C, H, W): bit 0 flips W, bit 1 flips H, bit 2
    transposes H and W (applied in that order)."""
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    if k & 4:
        x = x.transpose(-2, -1)
    return x


def _dihedral_inverse(y: torch.Tensor, k: int) -> torch.Tensor:
    """Undo ``_dihedral(., k)`` (the same steps in reverse order; each is its own inverse)."""
    if k & 4:
        y = y.transpose(-2, -1)
    if k & 2:
        y = y.flip(-2)
    if k & 1:
        y = y.flip(-1)
    return y


def self_ensemble(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The x8 self-ensemble: ``forward`` on the 8 flips / transposes of ``x`` (B, C, H, W),
    each output transformed back, averaged in fp32 before any rounding (as BasicSR's and
    KAIR's test scripts do). The first of the 8 is ``forward(x)`` itself."""
    total = None
    for k in range(8):
        y = _dihedral_inverse(forward(_dihedral(x, k)), k).float()  # (B, C, sH, sW)
        total = y if total is None else total + y
    return total / 8.0


def restore(
    model: nn.Module,
    lq: np.ndarray,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    tile: int | None = None,
    tile_overlap: int = 16,
    ensemble: bool = False,
) -> np.ndarray:
    """Restore one uint8 (H, W, 3) image; returns uint8 (s*H, s*W, 3).

    The model must already be on ``device`` with parameters in ``dtype``; only the input is
    cast. The model pads and crops to its window itself. It is switched to eval mode for
    the call and put back in its previous mode afterwards.

    ``tile`` (LR pixels, a multiple of ``model.window_size``) splits the input into
    overlapping tiles of that size, ``tile_overlap`` LR pixels apart at each seam, and
    averages the outputs where tiles overlap. This bounds memory on large images. For
    models whose layers only see a local neighbourhood the tiled result differs from the
    whole-image result only near seams; models with per-image statistics (i-LN, LN*,
    InstanceNorm, channel attention's global pooling in HAT) compute those statistics per
    tile, so tiling changes their output slightly everywhere. Benchmarks should be run
    without tiling when memory allows.

    ``ensemble``: the x8 self-ensemble (``self_ensemble``) of that forward pass, 8x the
    cost; each transformed image is tiled the same way.
    """
    _check_image(lq, "lq")
    scale = int(model.scale)
    if tile is not None:
        window = int(model.window_size)
        if tile <= 0 or tile % window:
            raise ValueError(
                f"tile must be a positive multiple of model.window_size={window}, got {tile}"
            )
        if not 0 <= tile_overlap < tile:
            raise ValueError(f"tile_overlap must be in [0, tile={tile}), got {tile_overlap}")
    x = torch.from_numpy(np.array(lq, copy=True)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    x = (x.to(device=device, dtype=torch.float32) / 255.0).to(dtype)
    h, w = lq.shape[:2]

    def forward(x: torch.Tensor) -> torch.Tensor:  # (1, 3, h', w') -> (1, 3, s*h', s*w')
        if tile is None or (x.shape[-2] <= tile and x.shape[-1] <= tile):
            return model(x)
        return _forward_tiled(model, x, scale, tile, tile_overlap)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            y = self_ensemble(forward, x) if ensemble else forward(x)  # (1, 3, s*H, s*W)
    finally:
        model.train(was_training)
    if tuple(y.shape) != (1, 3, h * scale, w * scale):
        raise ValueError(f"model returned {tuple(y.shape)} for an input {h}x{w} at scale {scale}")
    return to_uint8(y)


@dataclasses.dataclass(frozen=True)
class ModelRestorer:
    """``restore`` with the model and its options bound: a picklable ``RestoreFn`` (it can
    be sent to evaluation worker processes)."""

    model: nn.Module
    device: torch.device | str
    dtype: torch.dtype = torch.float32
    tile: int | None = None
    tile_overlap: int = 16
    ensemble: bool = False

    def __call__(self, lq: np.ndarray) -> np.ndarray:
        return restore(
            self.model,
            lq,
            device=self.device,
            dtype=self.dtype,
            tile=self.tile,
            tile_overlap=self.tile_overlap,
            ensemble=self.ensemble,
        )


def model_restore_fn(
    model: nn.Module,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    tile: int | None = None,
    tile_overlap: int = 16,
    ensemble: bool = False,
) -> ModelRestorer:
    """``restore`` with the model and options bound, for ``evaluate_pairs``."""
    return ModelRestorer(model, device, dtype, tile, tile_overlap, ensemble)


def evaluate_pairs(
    restore_fn: RestoreFn,
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]],
    *,
    crop_border: int | None = None,
    protocol: Protocol | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score ``restore_fn(lq)`` against ``gt`` for every (name, lq, gt) pair.

    Scored by ``protocol`` (``iln.protocols``: the task's image space, crop and metrics), or,
    given ``crop_border`` instead, by the SR convention: PSNR and SSIM on Y with
    ``crop_border`` pixels removed per side. Returns rows ``{"image": name, "psnr": dB,
    "ssim": value}`` (plus ``"psnr_b"`` when the protocol measures it) in input order.
    """
    if (crop_border is None) == (protocol is None):
        raise ValueError("evaluate_pairs needs exactly one of crop_border and protocol")
    total = len(pairs) if hasattr(pairs, "__len__") else None
    rows = []
    for name, lq, gt in tqdm(
        pairs, total=total, disable=not progress, desc="evaluate", leave=False
    ):
        _check_image(lq, f"lq of {name!r}")
        rows.append(_score(name, restore_fn(lq), gt, crop_border, protocol))
    return rows


def _score(
    name: str, pred: np.ndarray, gt: np.ndarray, crop_border: int | None, protocol: Protocol | None
) -> dict[str, Any]:
    _check_image(gt, f"gt of {name!r}")
    _check_image(pred, f"restored {name!r}")
    if pred.shape != gt.shape:
        raise ValueError(f"restored {name!r} has shape {pred.shape} but its gt has {gt.shape}")
    if protocol is not None:
        return {"image": name, **protocol.score(pred, gt)}
    return {
        "image": name,
        "psnr": psnr(pred, gt, crop_border=crop_border),
        "ssim": ssim(pred, gt, crop_border=crop_border),
    }


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """Restore and score one test image (a job for ``iln.pool.run_jobs``).

    Called with the restorers by task (what the pool shares with its workers); returns
    ``(row, restored)``: the per-image row of ``evaluate_pairs`` and, with ``keep``, the
    restored uint8 image (else None). With ``ensemble`` (the task's restorer must then be a
    ``ModelRestorer``) the row also has the x8 self-ensemble's scores under the same names
    with ``ENSEMBLE_SUFFIX`` (``psnr_x8``, ``ssim_x8``, ``psnr_b_x8``).
    """

    task: str
    name: str
    lq: Path
    gt: Path
    protocol: Protocol
    keep: bool = False
    ensemble: bool = False

    def __call__(self, restorers: Mapping[str, RestoreFn]) -> tuple[dict, np.ndarray | None]:
        restore_fn = restorers[self.task]
        if self.ensemble and not isinstance(restore_fn, ModelRestorer):
            raise ValueError(f"the self-ensemble needs a model to restore {self.task} with")
        lq, gt = read_rgb(self.lq), read_rgb(self.gt)
        _check_image(lq, f"lq of {self.name!r}")
        pred = restore_fn(lq)
        row = _score(self.name, pred, gt, None, self.protocol)
        if self.ensemble:
            x8 = dataclasses.replace(restore_fn, ensemble=True)(lq)
            scores = _score(self.name, x8, gt, None, self.protocol)
            row.update({k + ENSEMBLE_SUFFIX: v for k, v in scores.items() if k != "image"})
        return row, pred if self.keep else None


def _finite_mean(values: list[float], what: str) -> float:
    """Mean over the finite values (inf only if every value is inf); NaN raises."""
    if any(math.isnan(v) for v in values):
        raise ValueError(f"summarise got a NaN {what}")
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.inf


def summarise(rows: list[Mapping[str, Any]]) -> dict[str, float | int]:
    """Per-set means: ``{"psnr", "ssim", "count", "psnr_infinite"}`` (+ ``"psnr_b"``, and
    ``"psnr_x8"``, ``"ssim_x8"``, ``"psnr_b_x8"`` when the rows have the self-ensemble's).

    An image restored perfectly has PSNR = inf, which would make the plain mean inf and
    hide every other image. The PSNR mean is therefore taken over the finite values and
    ``psnr_infinite`` counts the images left out (inf only if every image is perfect);
    PSNR-B, when the rows have it, is averaged the same way. SSIM is always finite and
    averaged over all rows.
    """
    if not rows:
        raise ValueError("summarise needs at least one row")
    values = [float(r["psnr"]) for r in rows]
    out: dict[str, float | int] = {
        "psnr": _finite_mean(values, "PSNR"),
        "ssim": float(np.mean([float(r["ssim"]) for r in rows])),
        "count": len(rows),
        "psnr_infinite": sum(1 for v in values if not math.isfinite(v)),
    }
    for key in ("psnr_b", *METRICS_ENSEMBLE):
        if all(key in r for r in rows):
            column = [float(r[key]) for r in rows]
            if key.startswith("ssim"):
                out[key] = float(np.mean(column))
            else:
                out[key] = _finite_mean(column, "PSNR-B" if key == "psnr_b" else key)
    return out


def bicubic_restore(scale: int, *, round_each_pass: bool = False) -> RestoreFn:
    """The bicubic-upsampling baseline: MATLAB-compatible bicubic, rounded to uint8.

    Computed in float64 and rounded once. ``round_each_pass=True`` rounds and clips to
    0..255 after each axis as MATLAB does on a uint8 array; on natural images the two
    differ by about one grey level, more where the first pass overshoots [0, 255].
    """
    return functools.partial(_bicubic, scale=scale, round_each_pass=round_each_pass)


def _bicubic(lq: np.ndarray, *, scale: int, round_each_pass: bool) -> np.ndarray:
    from iln.data.degrade import imresize, round_to_uint8

    _check_image(lq, "lq")
    up = imresize(lq.astype(np.float64), scale, round_each_pass=round_each_pass)  # (s*H, s*W, 3)
    return round_to_uint8(up)  # half away from zero, as MATLAB


def degraded_input(lq: np.ndarray) -> np.ndarray:
    """The baseline of same-size tasks (denoising, JPEG, deraining): the degraded input itself,
    so a set's score says how far the test pairs start from their targets."""
    _check_image(lq, "lq")
    return lq.copy()


Box = tuple[int, int, int, int]  # (top, left, height, width) in HR pixels


def centre_box(hr_shape: tuple[int, ...], size: int, *, scale: int = 1) -> Box:
    """A ``size`` x ``size`` box in the middle of an HR image, corners aligned to ``scale``."""
    h, w = hr_shape[:2]
    if size > h or size > w:
        raise ValueError(f"crop size {size} exceeds the image size {h}x{w}")
    top = (h - size) // 2 // scale * scale
    left = (w - size) // 2 // scale * scale
    return top, left, size, size


def largest_difference_box(a: np.ndarray, b: np.ndarray, *, size: int, scale: int = 1) -> Box:
    """The ``size`` x ``size`` box where two restorations differ most (sum of |dY|).

    Corners are aligned to ``scale`` so the matching LR crop is exact; ties go to the
    top-most, then left-most box, so the choice is deterministic.
    """
    _check_image(a, "a")
    _check_image(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b shapes differ: {a.shape} vs {b.shape}")
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


def side_by_side_crops(
    images: Mapping[str, np.ndarray],
    *,
    scale: int,
    box: Box,
    upscale_lr: bool = True,
    gap: int = 4,
) -> np.ndarray:
    """One uint8 panel with the same region of every image, left to right in dict order.

    ``images`` maps a label (e.g. "LR", "Bicubic", "LN", "i-LN", "HR") to a uint8
    (H, W, 3) array, either HR-sized or LR-sized (HR / scale). ``box`` is
    (top, left, height, width) in HR pixels. LR images are cropped at box / scale and,
    with ``upscale_lr``, enlarged by pixel repetition (nearest) to the HR crop size;
    otherwise their small crop sits at the top-left of a white tile. Crops are separated
    by ``gap`` white columns. Labels are not drawn: the order is the dict order.
    """
    if not images:
        raise ValueError("side_by_side_crops needs at least one image")
    for label, img in images.items():
        _check_image(img, f"image {label!r}")
    hr_shape = max((img.shape for img in images.values()), key=lambda s: s[0] * s[1])
    hr_h, hr_w = hr_shape[:2]
    top, left, bh, bw = box
    if bh <= 0 or bw <= 0 or top < 0 or left < 0 or top + bh > hr_h or left + bw > hr_w:
        raise ValueError(f"box {box} does not fit in the HR image {hr_h}x{hr_w}")
    tiles = []
    for label, img in images.items():
        if img.shape == hr_shape:
            tiles.append(img[top : top + bh, left : left + bw])
            continue
        if img.shape[:2] != (hr_h // scale, hr_w // scale):
            raise ValueError(
                f"image {label!r} has shape {img.shape}: "
                f"expected HR {hr_shape} or LR of scale {scale}"
            )
        if top % scale or left % scale or bh % scale or bw % scale:
            raise ValueError(
                f"box {box} must be aligned to scale {scale} to crop the LR image {label!r}"
            )
        crop = img[top // scale : (top + bh) // scale, left // scale : (left + bw) // scale]
        if upscale_lr:
            tiles.append(np.repeat(np.repeat(crop, scale, axis=0), scale, axis=1))
        else:
            canvas = np.full((bh, bw, 3), 255, dtype=np.uint8)
            canvas[: crop.shape[0], : crop.shape[1]] = crop
            tiles.append(canvas)
    spacer = np.full((bh, gap, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for k, t in enumerate(tiles):
        if k:
            parts.append(spacer)
        parts.append(t)
    return np.concatenate(parts, axis=1)


def central_crop_pairs(
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], *, lq_size: int, scale: int
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Aligned central crops: an ``lq_size`` square of each LR image and the matching
    ``scale * lq_size`` square of its HR image (images smaller than that stay whole)."""
    cropped = []
    for name, lq, gt in pairs:
        h, w = lq.shape[:2]
        size_h, size_w = min(lq_size, h), min(lq_size, w)
        top, left = (h - size_h) // 2, (w - size_w) // 2
        lq_crop = lq[top : top + size_h, left : left + size_w]
        gt_crop = gt[top * scale : (top + size_h) * scale, left * scale : (left + size_w) * scale]
        cropped.append((name, np.ascontiguousarray(lq_crop), np.ascontiguousarray(gt_crop)))
    return cropped
