"""MATLAB-compatible bicubic imresize: known values, invariants, vectorised == reference."""

from __future__ import annotations

import numpy as np
import pytest

from iln.data.degrade import (
    bicubic_downsample,
    imresize,
    imresize_reference,
    modcrop,
    round_to_uint8,
)
from iln.data.resize import contributions, cubic


def test_cubic_kernel_known_values():
    # Keys a = -0.5: k(0) = 1, k(+-1) = 0, k(0.5) = 0.5625, k(1.5) = -0.0625, zero from 2 on.
    xs = np.array([0.0, 0.5, -0.5, 1.0, 1.5, -1.5, 2.0, 2.5])
    np.testing.assert_array_equal(cubic(xs), [1.0, 0.5625, 0.5625, 0.0, -0.0625, -0.0625, 0.0, 0.0])


def test_half_scale_weights_by_hand():
    # Shrinking by 2 stretches the kernel to width 8: taps at distances 3.5, 2.5, ..., -3.5 get
    # 0.5 * k(d / 2) = (-3, -9, 29, 111, 111, 29, -9, -3) / 256.
    weights, index = contributions(8, 4, 0.5)
    expected = np.array([-3, -9, 29, 111, 111, 29, -9, -3]) / 256
    for row in weights:
        np.testing.assert_allclose(row, expected, rtol=0, atol=1e-15)
    # Output pixel 1 reads 1-based inputs -2..5; -2, -1, 0 mirror to 3, 2, 1 (0-based 2, 1, 0).
    np.testing.assert_array_equal(index[0], [2, 1, 0, 0, 1, 2, 3, 4])
    # Output pixel 4 reads 1-based 4..11; 9, 10, 11 mirror to 8, 7, 6.
    np.testing.assert_array_equal(index[3], [3, 4, 5, 6, 7, 7, 6, 5])


def test_double_scale_weights_by_hand():
    # Enlarging by 2: output pixel centres sit at +-0.25 from input centres:
    # k(1.25), k(0.25), k(0.75), k(1.75) = -0.0703125, 0.8671875, 0.2265625, -0.0234375.
    weights, _ = contributions(4, 8, 2.0)
    np.testing.assert_allclose(
        weights[1], [-0.0703125, 0.8671875, 0.2265625, -0.0234375], atol=1e-15
    )


def test_hand_computed_ramp_example():
    # Row [10, 20, ..., 80] shrunk by 2 (worked out from the weights above):
    # first output
    # (-3*30 - 9*20 + 29*10 + 111*10 + 111*20 + 29*30 - 9*40 - 3*50) / 256 = 3710 / 256,
    # second (-3*10 - 9*10 + 29*20 + 111*30 + 111*40 + 29*50 - 9*60 - 3*70) / 256 = 8930 / 256,
    # third reads 1-based 2..9 with 9 mirrored to 8:
    # (-3*20 - 9*30 + 29*40 + 111*50 + 111*60 + 29*70 - 9*80 - 3*80) / 256 = 14110 / 256
    # (the ramp value 55 plus the mirror's effect: 30 / 256).
    row = (np.arange(1, 9) * 10.0)[None, :]  # (1, 8)
    out = imresize(row, 0.5)
    assert out.shape == (1, 4)
    np.testing.assert_allclose(out[0, :3], [3710 / 256, 8930 / 256, 14110 / 256], atol=1e-12)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_constant_image_stays_constant(scale):
    img = np.full((24, 36, 3), 123, dtype=np.uint8)
    out = bicubic_downsample(img, scale)
    assert out.shape == (24 // scale, 36 // scale, 3)
    assert (out == 123).all()
    up = imresize(img.astype(np.float64), scale)
    np.testing.assert_allclose(up, 123.0, atol=1e-9)


@pytest.mark.parametrize(
    "shape,scale", [((13, 17, 3), 2), ((13, 17, 3), 3), ((13, 17, 3), 4), ((5, 7, 3), 4)]
)
def test_output_size_is_ceil(shape, scale):
    img = np.zeros(shape, dtype=np.uint8)
    out = bicubic_downsample(img, scale)
    assert out.shape == (-(-shape[0] // scale), -(-shape[1] // scale), 3)
    assert imresize(img, 1.7).shape[:2] == (
        int(np.ceil(shape[0] * 1.7)),
        int(np.ceil(shape[1] * 1.7)),
    )


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_linear_ramp_downsampled_matches_analytic(scale):
    # A cubic kernel that sums to one reproduces linear functions, so away from the borders
    # output pixel i (0-based) equals the ramp at input coordinate scale * (i + 0.5) - 0.5.
    w = 24 * scale
    ramp = np.broadcast_to(2.0 * np.arange(w)[None, :, None] + 7.0, (6 * scale, w, 3))
    out = imresize(ramp, 1.0 / scale)
    i = np.arange(out.shape[1])
    analytic = 2.0 * (scale * (i + 0.5) - 0.5) + 7.0
    interior = slice(3, out.shape[1] - 3)
    np.testing.assert_allclose(out[2, interior, 0], analytic[interior], atol=1e-9)


def test_rows_and_columns_are_independent_axes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (12, 16, 3)).astype(np.float64)
    out = imresize(img, 0.5)
    # resizing is separable: each output equals resizing columns then rows of the same data
    rows = imresize(img, output_shape=(6, 16))
    both = imresize(rows, output_shape=(6, 8))
    np.testing.assert_allclose(out, both, atol=1e-9)


@pytest.mark.parametrize(
    "shape,scale",
    [
        ((20, 17, 3), 1 / 2),
        ((21, 18, 3), 1 / 3),
        ((24, 19, 3), 1 / 4),
        ((9, 11, 3), 2),
        ((7, 6, 3), 4),
        ((15, 13, 3), 0.7),
        ((10, 9), 0.5),
    ],
)
def test_vectorised_equals_reference_bit_for_bit(shape, scale):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, shape).astype(np.float64)
    fast, ref = imresize(img, scale), imresize_reference(img, scale)
    assert fast.shape == ref.shape
    assert np.array_equal(fast, ref)  # same operations in the same order
    assert np.array_equal(round_to_uint8(fast), round_to_uint8(ref))


def test_round_half_away_from_zero_and_clip():
    x = np.array([-3.0, 0.5, 1.5, 2.5, 254.49, 254.5, 300.0])
    np.testing.assert_array_equal(round_to_uint8(x), [0, 1, 2, 3, 254, 255, 255])


def test_round_each_pass_differs_only_by_rounding():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    once = bicubic_downsample(img, 3)
    per_pass = bicubic_downsample(img, 3, round_each_pass=True)
    assert np.abs(once.astype(int) - per_pass.astype(int)).max() <= 1


def test_modcrop_and_bad_input():
    img = np.zeros((13, 17, 3), dtype=np.uint8)
    assert modcrop(img, 4).shape == (12, 16, 3)
    assert modcrop(img[:12, :16], 4) is not None
    with pytest.raises(ValueError, match="uint8"):
        bicubic_downsample(img.astype(np.float32), 2)
    with pytest.raises(ValueError, match="positive integer"):
        bicubic_downsample(img, 0)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img)
