"""Restoring test images with a model and scoring them (PSNR / SSIM on Y).

``restore`` turns one uint8 LR image into one uint8 restored image exactly as the
benchmark protocol expects (clamp to [0, 1], scale to 255, round). ``evaluate_pairs``
applies any such function to a set of (name, lq, gt) pairs and returns one row per image;
``summarise`` reduces the rows to the per-set means that papers report. ``self_ensemble``
is the x8 flip / transpose test-time ensemble (``restore(..., ensemble=True)``), and
``ImageJob`` restores and scores one test image file as a job of ``iln.util.pool`` (the evaluate
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

from iln.config.params import check_tile
from iln.data.io import read_rgb
from iln.config.layout import ENSEMBLE_SUFFIX, METRICS_ENSEMBLE
from iln.evaluation.metrics import psnr, rgb_to_grey, ssim
from iln.models.common import pad_like_swinir_test
from iln.evaluation.protocols import Protocol

RestoreFn = Callable[[np.ndarray], np.ndarray]
PADS = ("model", "swinir_test")  # the model's reflect pad; the SwinIR test script's flip pad


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
    model: nn.Module,
    x: torch.Tensor,
    scale: int,
    tile: int,
    overlap: int,
    on_tile: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run ``model`` on overlapping LR tiles and average the overlapping outputs."""
    _, c, h, w = x.shape  # (1, 3, H, W)
    th, tw = min(tile, h), min(tile, w)
    stride = tile - overlap
    acc = torch.zeros(1, c, h * scale, w * scale, dtype=torch.float32, device=x.device)
    weight = torch.zeros(1, 1, h * scale, w * scale, dtype=torch.float32, device=x.device)
    corners = [(t, lf) for t in _tile_starts(h, th, stride) for lf in _tile_starts(w, tw, stride)]
    for done, (top, left) in enumerate(corners, start=1):
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
        if on_tile is not None:
            on_tile(done, len(corners))
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
    pad: str = "model",
    refuse_nonfinite: bool = False,
    on_tile: Callable[[int, int], None] | None = None,
    ensemble: bool = False,
) -> np.ndarray:
    """Restore one uint8 (H, W, 3) image; returns uint8 (s*H, s*W, 3).

    A grey model (``model.in_chans == 1``, the released grey SwinIR) gets the grey image
    (``metrics.rgb_to_grey``, the identity on a grey set stored replicated to RGB) as its
    one channel; its output is replicated to RGB.

    ``pad``: "model" leaves the padding to the model (reflect to a multiple of the
    window); "swinir_test" pads as the released SwinIR test script first
    (``common.pad_like_swinir_test``) and crops the output, to reproduce its numbers.

    The model must already be on ``device`` with parameters in ``dtype``; only the input is
    cast. The model pads and crops to its window itself. It is switched to eval mode for
    the call and put back in its previous mode afterwards.

    ``tile`` (LR pixels, a multiple of ``model.window_size``, ``iln.config.params.check_tile``;
    None or 0: the whole image) splits the input into overlapping tiles of that size,
    ``tile_overlap`` LR pixels apart at each seam, and averages the outputs where tiles
    overlap. This bounds memory on large images. For
    models whose layers only see a local neighbourhood the tiled result differs from the
    whole-image result only near seams; models with per-image statistics (i-LN, LN*,
    InstanceNorm, channel attention's global pooling in HAT) compute those statistics per
    tile, so tiling changes their output slightly everywhere. Benchmarks should be run
    without tiling when memory allows. ``on_tile(done, total)`` is called after each tile.

    ``ensemble``: the x8 self-ensemble (``self_ensemble``) of that forward pass, 8x the
    cost; each transformed image is tiled the same way.

    A NaN or infinite output value becomes 0 or is clamped (``to_uint8``), so a broken
    forward pass can still be scored; ``refuse_nonfinite=True`` raises
    ``NonFiniteOutputError`` instead (for outputs a user keeps).
    """
    _check_image(lq, "lq")
    scale = int(model.scale)
    if pad not in PADS:
        raise ValueError(f"pad must be one of {', '.join(PADS)}, got {pad!r}")
    grey = model.in_chans == 1
    if tile is not None:
        check_tile(tile, tile_overlap, int(model.window_size))
    image = rgb_to_grey(lq)[..., :1] if grey else lq
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None]  # (1, C, H, W)
    x = (x.to(device=device, dtype=torch.float32) / 255.0).to(dtype)
    h, w = lq.shape[:2]
    if pad == "swinir_test":
        x = pad_like_swinir_test(x, int(model.window_size))
    ph, pw = x.shape[2], x.shape[3]

    def forward(x: torch.Tensor) -> torch.Tensor:  # (1, C, h', w') -> (1, C, s*h', s*w')
        if not tile or (x.shape[-2] <= tile and x.shape[-1] <= tile):
            return model(x)
        return _forward_tiled(model, x, scale, tile, tile_overlap, on_tile)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            y = self_ensemble(forward, x) if ensemble else forward(x)  # (1, C, s*H', s*W')
    finally:
        model.train(was_training)
    channels = 1 if grey else 3
    if tuple(y.shape) != (1, channels, ph * scale, pw * scale):
        raise ValueError(f"model returned {tuple(y.shape)} for an input {ph}x{pw} at scale {scale}")
    y = y[:, :, : h * scale, : w * scale]
    if refuse_nonfinite:
        bad = int((~torch.isfinite(y)).sum())
        if bad:
            raise NonFiniteOutputError(
                f"the model's output has {bad} NaN or infinite values of {y.numel()} "
                f"(not written: it would be a black or blank image)"
            )
    return to_uint8(y.expand(-1, 3, -1, -1) if grey else y)


class NonFiniteOutputError(ValueError):
    """The model's output holds NaN or infinite values (a broken model or an overflow)."""


@dataclasses.dataclass(frozen=True)
class ModelRestorer:
    """``restore`` with the model and its options bound: a picklable ``RestoreFn`` (it can
    be sent to evaluation worker processes)."""

    model: nn.Module
    device: torch.device | str
    dtype: torch.dtype = torch.float32
    tile: int | None = None
    tile_overlap: int = 16
    pad: str = "model"
    ensemble: bool = False

    def __call__(self, lq: np.ndarray) -> np.ndarray:
        return restore(
            self.model,
            lq,
            device=self.device,
            dtype=self.dtype,
            tile=self.tile,
            tile_overlap=self.tile_overlap,
            pad=self.pad,
            ensemble=self.ensemble,
        )


def model_restore_fn(
    model: nn.Module,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    tile: int | None = None,
    tile_overlap: int = 16,
    pad: str = "model",
    ensemble: bool = False,
) -> ModelRestorer:
    """``restore`` with the model and options bound, for ``evaluate_pairs``."""
    return ModelRestorer(model, device, dtype, tile, tile_overlap, pad, ensemble)


def evaluate_pairs(
    restore_fn: RestoreFn,
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]],
    *,
    crop_border: int | None = None,
    protocol: Protocol | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score ``restore_fn(lq)`` against ``gt`` for every (name, lq, gt) pair.

    Scored by ``protocol`` (``iln.evaluation.protocols``: the task's image space, crop and metrics), or,
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
    """Restore and score one test image (a job for ``iln.util.pool.run_jobs``).

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
