"""PSNR and SSIM as the image-restoration literature reports them.

The numbers in SR / denoising papers (and in BasicSR, which the compared models were
trained and tested with) follow one protocol: the restored image is rounded to uint8,
converted to the BT.601 luma channel Y without rounding, ``crop_border`` pixels are
removed at every border (``crop_border = scale`` for SR), PSNR is computed in float64
with a data range of 255 and SSIM is computed the MATLAB way (Wang et al. 2004): an
11x11 Gaussian window with sigma 1.5, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, "valid"
filtering (no padding) and the mean of the SSIM map. Anything else (other luma
coefficients, padding, a uniform window) shifts results by a few hundredths of a dB,
which is the size of the effects being compared.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import correlate1d

DATA_RANGE = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * DATA_RANGE) ** 2
SSIM_C2 = (0.03 * DATA_RANGE) ** 2

# ITU-R BT.601 luma for R, G, B in [0, 255]: Y in [16, 235].
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0
_Y_OFFSET = 16.0


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB image with values in [0, 255]; returns float64 (H, W).

    Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, not rounded (as BasicSR's
    ``to_y_channel`` and MATLAB's ``rgb2ycbcr`` on doubles).
    """
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"rgb_to_y expects an (H, W, 3) RGB array, got shape {img.shape}")
    if not (img.dtype == np.uint8 or np.issubdtype(img.dtype, np.floating)):
        raise ValueError(
            f"rgb_to_y expects uint8 or float values in [0, 255], got dtype {img.dtype}"
        )
    return img.astype(np.float64) @ _Y_WEIGHTS + _Y_OFFSET  # (H, W)


def _prepare(
    pred: np.ndarray, gt: np.ndarray, crop_border: int, y_channel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Validate, convert to float64 (Y or RGB) and crop; returns (H', W', C) arrays."""
    for name, arr in (("pred", pred), ("gt", gt)):
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{name} must be a numpy array, got {type(arr).__name__}")
        if arr.dtype != np.uint8:
            raise ValueError(
                f"{name} must have dtype uint8 (values rounded to [0, 255]), got {arr.dtype}"
            )
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"{name} must have shape (H, W, 3) RGB, got {arr.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: pred {pred.shape} vs gt {gt.shape}")
    if (
        isinstance(crop_border, bool)
        or not isinstance(crop_border, (int, np.integer))
        or crop_border < 0
    ):
        raise ValueError(f"crop_border must be a non-negative int, got {crop_border!r}")
    h, w = gt.shape[:2]
    if 2 * crop_border >= h or 2 * crop_border >= w:
        raise ValueError(f"crop_border={crop_border} leaves nothing of an image of size {h}x{w}")
    if y_channel:
        a = rgb_to_y(pred)[..., None]  # (H, W, 1)
        b = rgb_to_y(gt)[..., None]
    else:
        a = pred.astype(np.float64)  # (H, W, 3)
        b = gt.astype(np.float64)
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    return a, b


def psnr(pred: np.ndarray, gt: np.ndarray, *, crop_border: int, y_channel: bool = True) -> float:
    """Peak signal-to-noise ratio in dB (data range 255); identical images give inf.

    With ``y_channel=False`` the mean squared error is taken over all three RGB channels.
    """
    a, b = _prepare(pred, gt, crop_border, y_channel)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(DATA_RANGE**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian taps; their outer product is MATLAB's fspecial('gaussian')."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(maps: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 2-D Gaussian filtering of (K, H, W) maps keeping only the valid region.

    scipy pads at the borders; dropping ``len(taps) // 2`` rows and columns on each side
    leaves exactly the values of a "valid" 2-D filtering (the padding is never read).
    """
    r = len(taps) // 2
    out = correlate1d(maps, taps, axis=1, mode="constant")
    out = correlate1d(out, taps, axis=2, mode="constant")
    return out[:, r:-r, r:-r]


def _ssim_plane(a: np.ndarray, b: np.ndarray, taps: np.ndarray) -> float:
    """Mean SSIM between two float64 (H, W) planes."""
    stats = _filter_valid(np.stack([a, b, a * a, b * b, a * b]), taps)  # (5, H-10, W-10)
    mu_a, mu_b, aa, bb, ab = stats
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = aa - mu_aa
    var_b = bb - mu_bb
    cov = ab - mu_ab
    num = (2.0 * mu_ab + SSIM_C1) * (2.0 * cov + SSIM_C2)
    den = (mu_aa + mu_bb + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return float(np.mean(num / den))


def ssim(pred: np.ndarray, gt: np.ndarray, *, crop_border: int, y_channel: bool = True) -> float:
    """Structural similarity the MATLAB way (Gaussian 11x11, sigma 1.5, valid filtering).

    With ``y_channel=False`` SSIM is computed per RGB channel and averaged, as BasicSR does.
    The cropped image must be at least 11x11.
    """
    a, b = _prepare(pred, gt, crop_border, y_channel)
    h, w = a.shape[:2]
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after cropping "
            f"{crop_border} at each border, got {h}x{w}"
        )
    taps = gaussian_window()
    return float(np.mean([_ssim_plane(a[..., c], b[..., c], taps) for c in range(a.shape[-1])]))


def rgb_to_grey(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> uint8 (H, W, 3) with R = G = B = round(0.299 R + 0.587 G + 0.114 B).

    The full-range BT.601 luma that a greyscale JPEG (and Pillow's "L" mode) uses: a grey
    image (R = G = B) maps onto itself. Replicated to three channels, so that RGB scoring
    (``y_channel=False``) of two grey images equals scoring their single grey planes.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(
            f"rgb_to_grey expects a uint8 (H, W, 3) image, got {img.dtype} {img.shape}"
        )
    grey = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # (H, W)
    grey = np.clip(np.floor(grey + 0.5), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


JPEG_BLOCK = 8


def blocking_effect_factor(plane: np.ndarray, block: int = JPEG_BLOCK) -> float:
    """BEF of one float64 (H, W) plane (Yim & Bovik 2011), in squared grey levels, as
    KAIR's ``calculate_psnrb`` (the code SwinIR's and later JPEG tables were scored with).

    D_B: the squared differences between horizontally or vertically adjacent pixels that
    straddle a block boundary (columns / rows block-1 | block, 2*block-1 | 2*block, ...),
    summed and divided by N_B = H * (W // block - 1) + W * (H // block - 1); D_Bc: the same
    over all other adjacent pairs, divided by H * (W - 1) + W * (H - 1) - N_B. BEF =
    log2(block) / log2(min(H, W)) * (D_B - D_Bc) when D_B > D_Bc, else 0.

    N_B is the number of boundary pairs when H and W are multiples of ``block``; for other
    sizes (most LIVE1 images) the last, partial block's boundary is summed but not counted,
    as KAIR does: the published PSNR-B values follow that count, the exact count gives up to
    ~1 dB more on small images. A side shorter than ``block`` counts no boundaries (KAIR's
    count would go negative there).
    """
    h, w = plane.shape
    dx = (plane[:, :-1] - plane[:, 1:]) ** 2  # (H, W-1): pair (j, j+1)
    dy = (plane[:-1, :] - plane[1:, :]) ** 2  # (H-1, W)
    on_x = (np.arange(w - 1) % block) == block - 1
    on_y = (np.arange(h - 1) % block) == block - 1
    boundary_n = h * max(w // block - 1, 0) + w * max(h // block - 1, 0)
    other_n = h * (w - 1) + w * (h - 1) - boundary_n
    if boundary_n == 0 or other_n <= 0:
        return 0.0
    d_b = (dx[:, on_x].sum() + dy[on_y, :].sum()) / boundary_n
    d_bc = (dx[:, ~on_x].sum() + dy[~on_y, :].sum()) / other_n
    if d_b <= d_bc:
        return 0.0
    return float(math.log2(block) / math.log2(min(h, w)) * (d_b - d_bc))


def psnr_b(pred: np.ndarray, gt: np.ndarray, *, crop_border: int, y_channel: bool = True) -> float:
    """PSNR-B (Yim & Bovik 2011): 10 log10(255^2 / (MSE + BEF(pred))), data range 255.

    The blocking effect factor is measured on the restored image ``pred``, per plane (Y, or
    each RGB channel with the three PSNR-B values averaged, as KAIR/SwinIR do). With BEF = 0
    it equals PSNR.
    """
    a, b = _prepare(pred, gt, crop_border, y_channel)
    values = []
    for c in range(a.shape[-1]):
        mse = float(np.mean((a[..., c] - b[..., c]) ** 2))
        denominator = mse + blocking_effect_factor(a[..., c])
        values.append(
            math.inf if denominator == 0.0 else 10.0 * math.log10(DATA_RANGE**2 / denominator)
        )
    return float(np.mean(values))
