"""Restoring test images with a model and scoring them (PSNR / SSIM on Y).

``restore`` turns one uint8 LR image into one uint8 restored image exactly as the
benchmark protocol expects (clamp to [0, 1], scale to 255, round). ``evaluate_pairs``
applies any such function to a set of (name, lq, gt) pairs and returns one row per image;
``summarise`` reduces the rows to the per-set means that papers report. The bicubic
baseline lives here too because it shares the same uint8-in, uint8-out convention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from iln.metrics import psnr, rgb_to_grey, ssim
from iln.models.common import pad_like_swinir_test
from iln.protocols import Protocol

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

    ``tile`` (LR pixels, a multiple of ``model.window_size``) splits the input into
    overlapping tiles of that size, ``tile_overlap`` LR pixels apart at each seam, and
    averages the outputs where tiles overlap. This bounds memory on large images. For
    models whose layers only see a local neighbourhood the tiled result differs from the
    whole-image result only near seams; models with per-image statistics (i-LN, LN*,
    InstanceNorm, channel attention's global pooling in HAT) compute those statistics per
    tile, so tiling changes their output slightly everywhere. Benchmarks should be run
    without tiling when memory allows. ``on_tile(done, total)`` is called after each tile.

    A NaN or infinite output value becomes 0 or is clamped (``to_uint8``), so a broken
    forward pass can still be scored; ``refuse_nonfinite=True`` raises
    ``NonFiniteOutputError`` instead (for outputs a user keeps).
    """
    _check_image(lq, "lq")
    scale = int(model.scale)
    if pad not in PADS:
        raise ValueError(f"pad must be one of {', '.join(PADS)}, got {pad!r}")
    grey = int(getattr(model, "in_chans", 3)) == 1
    if tile is not None:
        window = int(model.window_size)
        if tile <= 0 or tile % window:
            raise ValueError(
                f"tile must be a positive multiple of model.window_size={window}, got {tile}"
            )
        if not 0 <= tile_overlap < tile:
            raise ValueError(f"tile_overlap must be in [0, tile={tile}), got {tile_overlap}")
    image = rgb_to_grey(lq)[..., :1] if grey else lq
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None]  # (1, C, H, W)
    x = (x.to(device=device, dtype=torch.float32) / 255.0).to(dtype)
    h, w = lq.shape[:2]
    if pad == "swinir_test":
        x = pad_like_swinir_test(x, int(model.window_size))
    ph, pw = x.shape[2], x.shape[3]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if tile is None or (ph <= tile and pw <= tile):
                y = model(x)  # (1, C, s*H', s*W')
            else:
                y = _forward_tiled(model, x, scale, tile, tile_overlap, on_tile)
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


def model_restore_fn(
    model: nn.Module,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    tile: int | None = None,
    tile_overlap: int = 16,
    pad: str = "model",
) -> RestoreFn:
    """``restore`` with the model and options bound, for ``evaluate_pairs``."""

    def fn(lq: np.ndarray) -> np.ndarray:
        return restore(
            model, lq, device=device, dtype=dtype, tile=tile, tile_overlap=tile_overlap, pad=pad
        )

    return fn


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
    rows: list[dict[str, Any]] = []
    for name, lq, gt in tqdm(
        pairs, total=total, disable=not progress, desc="evaluate", leave=False
    ):
        _check_image(lq, f"lq of {name!r}")
        _check_image(gt, f"gt of {name!r}")
        pred = restore_fn(lq)
        _check_image(pred, f"restored {name!r}")
        if pred.shape != gt.shape:
            raise ValueError(f"restored {name!r} has shape {pred.shape} but its gt has {gt.shape}")
        if protocol is not None:
            rows.append({"image": name, **protocol.score(pred, gt)})
            continue
        rows.append(
            {
                "image": name,
                "psnr": psnr(pred, gt, crop_border=crop_border),
                "ssim": ssim(pred, gt, crop_border=crop_border),
            }
        )
    return rows


def _finite_mean(values: list[float], what: str) -> float:
    """Mean over the finite values (inf only if every value is inf); NaN raises."""
    if any(math.isnan(v) for v in values):
        raise ValueError(f"summarise got a NaN {what}")
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.inf


def summarise(rows: list[Mapping[str, Any]]) -> dict[str, float | int]:
    """Per-set means: ``{"psnr", "ssim", "count", "psnr_infinite"}`` (+ ``"psnr_b"``).

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
    if all("psnr_b" in r for r in rows):
        out["psnr_b"] = _finite_mean([float(r["psnr_b"]) for r in rows], "PSNR-B")
    return out


def bicubic_restore(scale: int, *, round_each_pass: bool = False) -> RestoreFn:
    """The bicubic-upsampling baseline: MATLAB-compatible bicubic, rounded to uint8.

    Computed in float64 and rounded once. ``round_each_pass=True`` rounds and clips to
    0..255 after each axis as MATLAB does on a uint8 array; on natural images the two
    differ by about one grey level, more where the first pass overshoots [0, 255].
    """
    from iln.data.degrade import imresize, round_to_uint8

    def fn(lq: np.ndarray) -> np.ndarray:
        _check_image(lq, "lq")
        up = imresize(
            lq.astype(np.float64), scale, round_each_pass=round_each_pass
        )  # (s*H, s*W, 3)
        return round_to_uint8(up)  # half away from zero, as MATLAB

    return fn


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
