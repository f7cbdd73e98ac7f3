"""MATLAB-compatible bicubic resizing (``imresize(A, scale)``, default 'bicubic', antialiasing on).

The algorithm, per axis: output pixel ``x`` (1-based) maps to input coordinate
``u = x / scale + 0.5 * (1 - 1 / scale)``; the cubic convolution kernel (Keys, a = -0.5)
is evaluated at ``u - j`` for the input pixels ``j`` in reach; when shrinking (scale < 1) the
kernel is stretched by ``1 / scale`` (and its height scaled by ``scale``), which low-pass
filters the image before sampling (antialiasing). Weights are normalised to sum to 1.
Indices outside ``1..n`` are mirrored half-sample symmetrically (``0 -> 1, -1 -> 2``,
``n + 1 -> n``). The output length is ``ceil(n * scale)``. The two axes are resized one
after the other, the axis with the smaller scale first (rows first on ties).

``imresize`` precomputes the (out, taps) weight and index tables once per axis and applies
each tap as one gather over the whole image. ``imresize_reference`` computes every weight on
the fly inside loops over output rows and columns. Both accumulate the taps in the same order
with the same float64 operations, so their outputs are bit-identical.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

KERNEL_WIDTH = 4.0  # support of the cubic kernel at scale >= 1
_BLOCK_ELEMENTS = 1 << 18


def cubic(x):
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic'); scalar or array."""
    ax = abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0) + (
        -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0
    ) * ((ax > 1.0) & (ax <= 2.0))


def _mirror(index: int, length: int) -> int:
    """0-based index of the 1-based MATLAB index ``index`` after symmetric padding."""
    period = 2 * length
    m = (index - 1) % period
    return m if m < length else period - 1 - m


@lru_cache(maxsize=64)
def contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights (out_len, taps) float64 and 0-based input indices (out_len, taps) for one axis.

    Taps whose weight is zero for every output pixel are dropped (as MATLAB does). The tables
    are cached per (in_len, out_len, scale) and returned read-only.
    """
    kernel_width = KERNEL_WIDTH / scale if scale < 1 else KERNEL_WIDTH
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # (out,)
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    index = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # (out, taps) 1-based
    dist = u[:, None] - index
    weights = scale * cubic(scale * dist) if scale < 1 else cubic(dist)
    total = np.zeros(out_len)
    for k in range(taps):  # left-to-right sum, the same order as the reference
        total = total + weights[:, k]
    weights = weights / total[:, None]
    period = 2 * in_len
    m = (index.astype(np.int64) - 1) % period
    index0 = np.where(m < in_len, m, period - 1 - m)
    keep = np.any(weights != 0, axis=0)
    weights, index0 = np.ascontiguousarray(weights[:, keep]), np.ascontiguousarray(index0[:, keep])
    weights.setflags(write=False)
    index0.setflags(write=False)
    return weights, index0


def output_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """MATLAB's output size: ``ceil(n * scale)`` per axis."""
    return math.ceil(shape[0] * scale), math.ceil(shape[1] * scale)


def _plan(img: np.ndarray, scale: float | None, out_shape: tuple[int, int] | None):
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize expects an (H, W) or (H, W, C) array, got shape {img.shape}")
    h, w = img.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"imresize got an empty image of shape {img.shape}")
    if (scale is None) == (out_shape is None):
        raise ValueError("imresize needs exactly one of scale and output_shape")
    if scale is not None:
        if not scale > 0 or not math.isfinite(scale):
            raise ValueError(f"imresize scale must be a positive number, got {scale}")
        scales = (float(scale), float(scale))
        out_h, out_w = output_shape((h, w), scale)
    else:
        out_h, out_w = (int(v) for v in out_shape)
        if out_h < 1 or out_w < 1:
            raise ValueError(f"imresize output_shape must be positive, got {out_shape}")
        scales = (out_h / h, out_w / w)
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)  # smaller scale first, rows on ties
    return (h, w), (out_h, out_w), scales, order


def imresize(
    img: np.ndarray,
    scale: float | None = None,
    *,
    output_shape: tuple[int, int] | None = None,
    round_each_pass: bool = False,
) -> np.ndarray:
    """MATLAB ``imresize(img, scale)`` (bicubic, antialiased) in float64, not clipped.

    img: (H, W) or (H, W, C) array (any real dtype, used as float64)
    -> float64 (ceil(H*scale), ceil(W*scale)[, C]).
    ``round_each_pass`` rounds and clips to 0..255 after each axis, as MATLAB does when given
    a uint8 array (its intermediate image is uint8 too); the default rounds nothing.
    """
    x = np.asarray(img, dtype=np.float64)
    in_hw, out_hw, scales, order = _plan(x, scale, output_shape)
    for axis in order:
        weights, index = contributions(in_hw[axis], out_hw[axis], scales[axis])
        x = _apply_axis(x, weights, index, axis)
        if round_each_pass:
            x = round_to_uint8(x).astype(np.float64)
    return x


def _apply_axis(x: np.ndarray, weights: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """out[i] = sum_k weights[i, k] * x[index[i, k]] along ``axis``, taps accumulated in order.

    Output rows are processed in blocks of about ``_BLOCK_ELEMENTS`` values so that the
    per-tap temporaries stay in cache (2-3x faster than whole-image temporaries).
    """
    moved = np.moveaxis(x, axis, 0)  # (n, other, [C])
    if axis == 1:
        moved = np.ascontiguousarray(moved)  # gathers of whole contiguous rows are fastest
    tail = (1,) * (moved.ndim - 1)
    out_len, taps = weights.shape
    out = np.empty((out_len,) + moved.shape[1:])
    step = max(1, _BLOCK_ELEMENTS // max(1, math.prod(moved.shape[1:])))
    for r0 in range(0, out_len, step):
        r1 = min(r0 + step, out_len)
        acc = np.zeros((r1 - r0,) + moved.shape[1:])
        for k in range(taps):
            acc += weights[r0:r1, k].reshape((-1,) + tail) * moved[index[r0:r1, k]]
        out[r0:r1] = acc
    return np.moveaxis(out, 0, axis)


def round_to_uint8(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 255] and round half away from zero (MATLAB's conversion to uint8)."""
    return np.floor(np.clip(x, 0.0, 255.0) + 0.5).astype(np.uint8)


def imresize_reference(
    img: np.ndarray, scale: float | None = None, *, output_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Straightforward per-pixel version of ``imresize`` (slow; for tests and benchmarks).

    Loops over every output row (first pass) and every output column (second pass), computes
    that pixel's weights from the kernel, and sums the taps in Python floats.
    """
    x = np.asarray(img, dtype=np.float64)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[:, :, None]
    in_hw, out_hw, scales, order = _plan(x, scale, output_shape)
    for axis in order:
        x = _reference_axis(x, in_hw[axis], out_hw[axis], scales[axis], axis)
    return x[:, :, 0] if squeeze else x


def _reference_axis(
    x: np.ndarray, in_len: int, out_len: int, scale: float, axis: int
) -> np.ndarray:
    data = (x if axis == 0 else x.transpose(1, 0, 2)).tolist()  # [n][other][C] Python floats
    other, channels = len(data[0]), len(data[0][0])
    kernel_width = KERNEL_WIDTH / scale if scale < 1 else KERNEL_WIDTH
    taps = int(math.ceil(kernel_width)) + 2
    out = []
    for i in range(1, out_len + 1):
        u = i / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - kernel_width / 2)
        weights, sources = [], []
        for k in range(taps):
            d = u - (left + k)
            weights.append(scale * cubic(scale * d) if scale < 1 else cubic(d))
            sources.append(_mirror(left + k, in_len))
        total = 0.0
        for wk in weights:
            total = total + wk
        weights = [wk / total for wk in weights]
        row = []
        for j in range(other):
            pixel = []
            for c in range(channels):
                acc = 0.0
                for wk, src in zip(weights, sources):
                    acc = acc + wk * data[src][j][c]
                pixel.append(acc)
            row.append(pixel)
        out.append(row)
    result = np.asarray(out, dtype=np.float64)  # (out_len, other, C)
    return result if axis == 0 else result.transpose(1, 0, 2)
