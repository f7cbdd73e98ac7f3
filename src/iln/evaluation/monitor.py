"""What the training loop watches before the first update and every few hundred steps:
residual-stream statistics of the model being trained on a fixed probe batch, and
validation PSNR of its EMA twin."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from iln.evaluation.inference import restore
from iln.evaluation.metrics import psnr
from iln.evaluation.probes import measure_features


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
    """Build the ``monitor(step, model, ema)`` callback of ``iln.training.loop.fit``: feature rows
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
            layer = row["layer"]
            if _group_index(layer) is not None or layer in ("final_norm_in", "body_in"):
                scalars[f"features/{row['layer']}/magnitude"] = row["magnitude"]
                scalars[f"features/{row['layer']}/entropy"] = row["entropy"]
                scalars[f"features/{row['layer']}/max_abs"] = row["max_abs"]
        for key, points in deepest_group_curves([{"step": step, **r} for r in rows]).items():
            scalars[key] = points[-1][1]
        if val_psnr is not None:
            scalars["val/psnr"] = val_psnr
        log(step, scalars)
        return rows, val_psnr

    return monitor


DEEPEST_STATS: tuple[str, ...] = ("magnitude", "entropy")


def _group_index(layer: str) -> int | None:
    """3 for "group3" (a group's output); None for anything else (blocks, norms)."""
    return int(layer[5:]) if layer.startswith("group") and layer[5:].isdigit() else None


def deepest_group_curves(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """The deepest group's magnitude and entropy over training, under names that do not
    depend on the model's depth: {"features/deepest/magnitude": [(step, value), ...], ...}.

    rows: probe rows with ``step``, ``layer`` and the statistics (probes.csv's schema)."""
    groups = [i for r in rows if (i := _group_index(str(r["layer"]))) is not None]
    if not groups:
        return {}
    deepest = f"group{max(groups)}"
    points = sorted((int(r["step"]), r) for r in rows if r["layer"] == deepest)
    return {
        f"features/deepest/{stat}": [(step, float(r[stat])) for step, r in points]
        for stat in DEEPEST_STATS
    }
