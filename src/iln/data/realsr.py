"""Real-world degradation (the second-order model of Real-ESRGAN, Wang et al. 2021).

``degrade_realsr(gt, scale, params, rng)`` turns a uint8 (H, W, 3) image whose sides are
multiples of ``scale`` into its uint8 (H / scale, W / scale, 3) low-quality partner:

1. first order: blur (Gaussian, generalised Gaussian or plateau kernel, isotropic or not, or
   a sinc kernel), resize by a random factor with a random mode (area, bilinear, bicubic),
   Gaussian or Poisson noise (colour or grey), JPEG;
2. second order: the same with its own ranges (blur only with ``blur_prob``), the resize
   factor relative to the LR size, no JPEG of its own;
3. final step, in one of two orders at random: resize to the LR size and a sinc filter
   (with ``final_sinc_prob``), then JPEG; or JPEG first.

Every draw comes from the generator passed in, in a fixed order, so the result is a pure
function of (image, params, generator state). Real-ESRGAN's defaults are those of
``RealSRParams``. Where this differs from Real-ESRGAN: JPEG is Pillow's (libjpeg) at the
integer quality nearest the draw, on the image rounded to uint8, where Real-ESRGAN runs a
differentiable JPEG on floats; the target is not sharpened (Real-ESRNet trains on an
unsharp-masked target); images are filtered with reflected borders of any width.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special

from iln.data.degrade import jpeg_compress
from iln.data.params import RealSROrder, RealSRParams

RESIZE_MODES = ("area", "bilinear", "bicubic")
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # grey Poisson noise is drawn on this luma
MIN_KERNEL = 7  # kernel sizes are the odd sizes MIN_KERNEL..kernel_size
SINC_WIDE = 13  # kernels of at least this size may have a lower sinc cut-off (pi/5, not pi/3)


# --------------------------------------------------------------------------- kernels


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets from the centre of a size x size kernel, (x, y) each (size, size)."""
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    return np.meshgrid(ax, ax)


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """p^T Sigma^-1 p over the kernel grid, Sigma = R diag(sx^2, sy^2) R^T rotated by theta."""
    xx, yy = _grid(size)
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy  # coordinates along the principal axes
    v = -s * xx + c * yy
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def bivariate_kernel(
    kind: str, size: int, sigma_x: float, sigma_y: float, theta: float, beta: float = 1.0
) -> np.ndarray:
    """A normalised (size, size) blur kernel: "gaussian" exp(-d/2), "generalized"
    exp(-(d^beta)/2), "plateau" 1 / (1 + d^beta), with d the quadratic form above."""
    d = _quadratic_form(size, sigma_x, sigma_y, theta)
    if kind == "gaussian":
        k = np.exp(-0.5 * d)
    elif kind == "generalized":
        k = np.exp(-0.5 * d**beta)
    elif kind == "plateau":
        k = 1.0 / (1.0 + d**beta)
    else:
        raise ValueError(f"unknown kernel kind {kind!r} (gaussian, generalized, plateau)")
    return k / k.sum()


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """A normalised circular low-pass (2-D sinc) kernel with cut-off ``cutoff`` in radians
    per pixel: cutoff * J1(cutoff * r) / (2 pi r), its limit cutoff^2 / (4 pi) at r = 0."""
    xx, yy = _grid(size)
    r = np.hypot(xx, yy)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    k[r == 0] = cutoff**2 / (4 * np.pi)
    return k / k.sum()


def _beta(rng: np.random.Generator, low: float, high: float) -> float:
    """Real-ESRGAN's shape draw: below or above 1 with even odds, uniform on that side."""
    if rng.random() < 0.5:
        return float(rng.uniform(low, min(1.0, high)))
    return float(rng.uniform(max(1.0, low), high))


def random_blur_kernel(order: RealSROrder, rng: np.random.Generator) -> np.ndarray:
    """One order's blur kernel, zero-padded to (kernel_size, kernel_size)."""
    size = int(rng.choice(np.arange(MIN_KERNEL, order.kernel_size + 1, 2)))
    if rng.random() < order.sinc_prob:
        low = np.pi / 5 if size >= SINC_WIDE else np.pi / 3
        kernel = sinc_kernel(size, float(rng.uniform(low, np.pi)))
    else:
        kind = order.kernel_list[int(rng.choice(len(order.kernel_list), p=order.kernel_prob))]
        shape, _, spread = kind.rpartition("_")
        sigma_x = float(rng.uniform(*order.blur_sigma))
        if spread == "iso":
            sigma_y, theta = sigma_x, 0.0
        else:
            sigma_y, theta = (
                float(rng.uniform(*order.blur_sigma)),
                float(rng.uniform(-np.pi, np.pi)),
            )
        if shape == "generalized":
            beta = _beta(rng, *order.betag_range)
        elif shape == "plateau":
            beta = _beta(rng, *order.betap_range)
        else:
            shape, beta = "gaussian", 1.0
        kernel = bivariate_kernel(shape, size, sigma_x, sigma_y, theta, beta)
    pad = (order.kernel_size - size) // 2
    return np.pad(kernel, pad)


def final_sinc_kernel(params: RealSRParams, rng: np.random.Generator) -> np.ndarray | None:
    """The final step's sinc kernel (None: no final filter), padded like the blur kernels."""
    if rng.random() >= params.final_sinc_prob:
        return None
    top = params.second.kernel_size
    size = int(rng.choice(np.arange(MIN_KERNEL, top + 1, 2)))
    kernel = sinc_kernel(size, float(rng.uniform(np.pi / 3, np.pi)))
    return np.pad(kernel, (top - size) // 2)


# --------------------------------------------------------------------------- image ops
# Images are float32 tensors (1, 3, h, w) in [0, 1] (bicubic may overshoot until clipped).


def filter2d(img: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """Correlate every channel with ``kernel`` (k, k odd), borders reflected (any width)."""
    k = kernel.shape[0]
    pad = k // 2
    padded = np.pad(img[0].numpy(), ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    weight = torch.from_numpy(kernel.astype(np.float32)).expand(3, 1, k, k)
    return F.conv2d(torch.from_numpy(padded)[None], weight, groups=3)


def resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """torch's interpolation to ``size`` (h, w) with ``mode`` from RESIZE_MODES."""
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if mode == "area":
        return F.interpolate(img, size=size, mode="area")
    return F.interpolate(img, size=size, mode=mode, align_corners=False)


def add_gaussian_noise(
    img: torch.Tensor, sigma: float, grey: bool, rng: np.random.Generator
) -> torch.Tensor:
    """img + N(0, (sigma / 255)^2), one draw per pixel (grey) or per pixel and channel."""
    _, _, h, w = img.shape
    noise = rng.standard_normal((1, 1 if grey else 3, h, w)).astype(np.float32)
    return (img + torch.from_numpy(noise) * np.float32(sigma / 255.0)).clamp(0.0, 1.0)


def add_poisson_noise(
    img: torch.Tensor, scale: float, grey: bool, rng: np.random.Generator
) -> torch.Tensor:
    """Shot noise: the image on the 255 grid (grey: its luma) with photon counts
    2^ceil(log2(number of distinct values)) per unit, the noise multiplied by ``scale``."""
    base = img.clamp(0.0, 1.0)
    if grey:
        weights = torch.tensor(GREY_WEIGHTS, dtype=img.dtype).view(1, 3, 1, 1)
        base = (base * weights).sum(dim=1, keepdim=True)
    quantised = (base * 255.0).round().double().numpy() / 255.0
    levels = 2.0 ** math.ceil(math.log2(max(len(np.unique(quantised)), 1)))
    noisy = rng.poisson(quantised * levels) / levels
    noise = torch.from_numpy((noisy - quantised).astype(np.float32))
    return (img + noise * np.float32(scale)).clamp(0.0, 1.0)


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """(1, 3, h, w) float in [0, 1] -> uint8 (h, w, 3), clipped and rounded."""
    x = (img[0].clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


def _from_uint8(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()[None] / 255.0


def random_jpeg(
    img: torch.Tensor, order: RealSROrder, rng: np.random.Generator, subsampling: str
) -> torch.Tensor:
    quality = int(round(float(rng.uniform(*order.jpeg_range))))
    return _from_uint8(jpeg_compress(_to_uint8(img), quality, subsampling=subsampling))


def _random_noise(img: torch.Tensor, order: RealSROrder, rng: np.random.Generator) -> torch.Tensor:
    gaussian = rng.random() < order.gaussian_noise_prob
    grey = rng.random() < order.gray_noise_prob
    if gaussian:
        return add_gaussian_noise(img, float(rng.uniform(*order.noise_range)), grey, rng)
    return add_poisson_noise(img, float(rng.uniform(*order.poisson_scale_range)), grey, rng)


def _random_factor(order: RealSROrder, rng: np.random.Generator) -> float:
    direction = int(rng.choice(3, p=order.resize_prob))  # up, down, keep
    if direction == 0:
        return float(rng.uniform(1.0, order.resize_range[1]))
    if direction == 1:
        return float(rng.uniform(order.resize_range[0], 1.0))
    return 1.0


def _random_mode(rng: np.random.Generator) -> str:
    return RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))]


# --------------------------------------------------------------------------- the pipeline


def degrade_realsr(
    gt: np.ndarray,
    scale: int,
    params: RealSRParams,
    rng: np.random.Generator,
    *,
    jpeg_subsampling: str = "yuv420",
) -> np.ndarray:
    """The real-world LR partner (H / scale, W / scale, 3) uint8 of ``gt`` (H, W, 3) uint8."""
    if not isinstance(gt, np.ndarray) or gt.dtype != np.uint8 or gt.ndim != 3 or gt.shape[2] != 3:
        shape = getattr(gt, "shape", None)
        raise ValueError(f"degrade_realsr expects a uint8 (H, W, 3) image, got shape {shape}")
    h, w = gt.shape[:2]
    if scale < 1 or h % scale or w % scale:
        raise ValueError(
            f"degrade_realsr: image size {h}x{w} is not a multiple of the scale {scale} "
            "(mod-crop it first)"
        )
    lq_size = (h // scale, w // scale)
    first, second = params.first, params.second
    kernel1 = random_blur_kernel(first, rng)
    kernel2 = random_blur_kernel(second, rng)
    sinc = final_sinc_kernel(params, rng)
    with torch.no_grad():
        img = _from_uint8(gt)
        # first order: blur, resize relative to the input, noise, JPEG
        if rng.random() < first.blur_prob:
            img = filter2d(img, kernel1)
        factor = _random_factor(first, rng)
        img = resize(img, (h * factor, w * factor), _random_mode(rng))
        img = _random_noise(img, first, rng)
        img = random_jpeg(img, first, rng, jpeg_subsampling)
        # second order: blur, resize relative to the LR size, noise
        if rng.random() < second.blur_prob:
            img = filter2d(img, kernel2)
        factor = _random_factor(second, rng)
        img = resize(img, (lq_size[0] * factor, lq_size[1] * factor), _random_mode(rng))
        img = _random_noise(img, second, rng)
        # final step: (resize to the LR size + sinc, JPEG) or (JPEG, resize + sinc)
        jpeg_first = rng.random() >= 0.5
        if jpeg_first:
            img = random_jpeg(img, second, rng, jpeg_subsampling)
        img = resize(img, lq_size, _random_mode(rng))
        if sinc is not None:
            img = filter2d(img, sinc)
        if not jpeg_first:
            img = random_jpeg(img, second, rng, jpeg_subsampling)
        return _to_uint8(img)
