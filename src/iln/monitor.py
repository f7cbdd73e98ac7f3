"""What the training loop watches before the first update and every few hundred steps:
residual-stream statistics of the model being trained on a fixed probe batch, and
validation PSNR of its EMA twin."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from iln.evaluate import restore
from iln.metrics import psnr
from iln.probes import measure_features


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Central ``size`` x ``size`` window of an (H, W, 3) image (smaller images whole)."""
    h, w = img.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[top : top + size, left : left + size]


def probe_batch(lq_images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Fixed probe batch: equal central crops of the first LR test images, (n, 3, size, size)."""
    if not lq_images:
        raise ValueError("the probe batch needs at least one test image")
    size = min([size] + [min(img.shape[:2]) for img in lq_images])
    crops = [center_crop(img, size) for img in lq_images]
    batch = np.stack(crops).astype(np.float32) / 255.0  # (n, size, size, 3)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def training_monitor(
    probe_lq: torch.Tensor,
    val_pairs: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    crop_border: int,
    device: torch.device,
    per_block: bool,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> Callable[[int, nn.Module, nn.Module], tuple[list[dict[str, Any]], float | None]]:
    """Build the ``monitor(step, model, ema)`` callback of ``iln.train.fit``: feature rows
    of ``model`` on the probe batch, and the mean PSNR of ``ema`` on ``val_pairs`` (whole
    images; None without pairs). Both also go to ``log`` (``features/...``, ``val/psnr``)."""
    probe_lq = probe_lq.to(device)

    def monitor(
        step: int, model: nn.Module, ema: nn.Module
    ) -> tuple[list[dict[str, Any]], float | None]:
        rows = measure_features(model, probe_lq, per_block=per_block)
        val_psnr = None
        if val_pairs:
            values = [
                psnr(restore(ema, lq, device=device), gt, crop_border=crop_border)
                for _, lq, gt in val_pairs
            ]
            val_psnr = float(np.mean(values))
        if log is None:
            return rows, val_psnr
        scalars: dict[str, float] = {}
        for row in rows:
            is_group = (
                row["layer"].startswith("group") and "." not in row["layer"]
            )  # not group{g}.block{b}
            if is_group or row["layer"] == "final_norm_in":
                scalars[f"features/{row['layer']}/magnitude"] = row["magnitude"]
                scalars[f"features/{row['layer']}/entropy"] = row["entropy"]
                scalars[f"features/{row['layer']}/max_abs"] = row["max_abs"]
        if val_psnr is not None:
            scalars["val/psnr"] = val_psnr
        log(step, scalars)
        return rows, val_psnr

    return monitor
