"""PSNR and SSIM as the image-restoration literature reports them.

The implementation lives in ``iln.evaluation.metrics``; this module keeps the names that
scripts written against earlier versions import (``from iln.metrics import psnr, ssim``).
"""

from iln.evaluation.metrics import (
    blocking_effect_factor,
    psnr,
    psnr_b,
    rgb_to_grey,
    rgb_to_y,
    ssim,
)

__all__ = ["blocking_effect_factor", "psnr", "psnr_b", "rgb_to_grey", "rgb_to_y", "ssim"]
