"""How each task is scored: one ``Protocol`` per (task, grey or colour test set).

The literature scores each task its own way, and numbers are only comparable within one
convention:

- ``sr_x<s>``: PSNR / SSIM on Y (BT.601), ``s`` pixels cropped at every border (the SR
  benchmark convention of BasicSR and the HAT / SwinIR papers); ``realsr_x<s>`` (synthetic
  real-world pairs) the same.
- ``dn_s<sigma>``: PSNR / SSIM on RGB at [0, 255], no crop (the SwinIR / KAIR colour
  denoising convention: MSE over all three channels, SSIM averaged over them); on the
  grey image for grey sets (Set12, BSD68: the grey denoising convention).
- ``car_q<q>``: PSNR / SSIM / PSNR-B on Y for colour sets, on the grey image for grey sets
  (Classic5), no crop (the SwinIR / KAIR JPEG convention).
- ``derain``: PSNR / SSIM on Y, no crop (the Restormer / MPRNet convention).

The paper states none of these choices for its denoising, JPEG and deraining tables; they
are the conventions of the code bases it builds on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iln.data.params import parse_task
from iln.evaluation.metrics import psnr, psnr_b, rgb_to_grey, ssim


@dataclass(frozen=True)
class Protocol:
    """What ``score`` measures: the image space, the border crop, whether PSNR-B is added."""

    name: str  # short id written to per_image.csv, e.g. "y_crop4", "rgb", "y_psnrb"
    space: str  # "y" (BT.601 luma), "rgb" (all channels) or "grey" (the grey image)
    crop_border: int
    with_psnr_b: bool
    description: str

    def score(self, pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
        """{"psnr", "ssim"} (+ "psnr_b") of uint8 (H, W, 3) ``pred`` against ``gt``."""
        if self.space == "grey":
            pred, gt = rgb_to_grey(pred), rgb_to_grey(gt)
        y_channel = self.space == "y"
        out = {
            "psnr": psnr(pred, gt, crop_border=self.crop_border, y_channel=y_channel),
            "ssim": ssim(pred, gt, crop_border=self.crop_border, y_channel=y_channel),
        }
        if self.with_psnr_b:
            out["psnr_b"] = psnr_b(pred, gt, crop_border=self.crop_border, y_channel=y_channel)
        return out


def protocol_for(task: str, *, grey: bool = False) -> Protocol:
    """The protocol of ``task`` (a task name such as ``dn_s25``); ``grey``: a greyscale set."""
    spec = parse_task(task)
    if spec.kind in ("sr", "realsr"):
        return Protocol(
            f"y_crop{spec.scale}",
            "y",
            spec.scale,
            False,
            f"PSNR/SSIM on Y (BT.601), {spec.scale} px cropped per border",
        )
    if spec.kind == "dn":
        if grey:
            return Protocol("grey", "grey", 0, False, "PSNR/SSIM on the grey image, no crop")
        return Protocol("rgb", "rgb", 0, False, "PSNR/SSIM on RGB at [0, 255], no crop")
    if spec.kind == "car":
        if grey:
            return Protocol(
                "grey_psnrb", "grey", 0, True, "PSNR/SSIM/PSNR-B on the grey image, no crop"
            )
        return Protocol("y_psnrb", "y", 0, True, "PSNR/SSIM/PSNR-B on Y (BT.601), no crop")
    return Protocol("y", "y", 0, False, "PSNR/SSIM on Y (BT.601), no crop")
