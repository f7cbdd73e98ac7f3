"""PSNR / SSIM / Y conversion: known values, reference agreement, protocol edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from iln.evaluation.metrics import SSIM_C1, SSIM_C2, gaussian_window, psnr, rgb_to_y, ssim


def _random_pair(shape=(48, 40, 3), noise=10, seed=0):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, shape, dtype=np.uint8)
    pred = np.clip(gt.astype(np.int64) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(
        np.uint8
    )
    return pred, gt


def _smooth_image(h=64, w=72, seed=0):
    """A natural-ish image (smooth gradients + texture) so SSIM is far from 0 and 1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None] * np.array(
        [1.0, 0.7, 0.4]
    )
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).round().astype(np.uint8)


def test_rgb_to_y_known_values():
    img = np.array(
        [[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8
    )
    y = rgb_to_y(img)
    assert y.dtype == np.float64 and y.shape == (1, 5)
    np.testing.assert_allclose(
        y[0], [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966], atol=1e-12
    )


def test_rgb_to_y_is_not_rounded_and_accepts_float():
    img = np.full((2, 2, 3), 1, dtype=np.uint8)
    expected = 16 + (65.481 + 128.553 + 24.966) / 255
    np.testing.assert_allclose(rgb_to_y(img), expected, atol=1e-12)
    np.testing.assert_allclose(rgb_to_y(img.astype(np.float32)), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        rgb_to_y(np.zeros((4, 4), dtype=np.uint8))


@pytest.mark.parametrize("d", [1, 3, 10])
def test_psnr_constant_offset(d):
    rng = np.random.default_rng(d)
    gt = rng.integers(20, 200, (32, 30, 3), dtype=np.uint8)
    pred = gt + np.uint8(d)
    # RGB: every value differs by d.
    assert psnr(pred, gt, crop_border=0, y_channel=False) == pytest.approx(
        20 * math.log10(255 / d), abs=1e-10
    )
    # Y: an equal offset d on R, G, B shifts Y by d * 219 / 255.
    dy = d * 219.0 / 255.0
    assert psnr(pred, gt, crop_border=2) == pytest.approx(20 * math.log10(255 / dy), abs=1e-10)


def test_psnr_matches_formula_on_random_images():
    pred, gt = _random_pair()
    a, b = rgb_to_y(pred)[3:-3, 3:-3], rgb_to_y(gt)[3:-3, 3:-3]
    expected = 10 * math.log10(255.0**2 / np.mean((a - b) ** 2))
    assert psnr(pred, gt, crop_border=3) == pytest.approx(expected, abs=1e-10)


def test_identical_images_give_inf_and_one():
    _, gt = _random_pair()
    assert psnr(gt, gt.copy(), crop_border=2) == math.inf
    assert psnr(gt, gt.copy(), crop_border=0, y_channel=False) == math.inf
    assert ssim(gt, gt.copy(), crop_border=2) == pytest.approx(1.0, abs=1e-12)
    assert ssim(gt, gt.copy(), crop_border=0, y_channel=False) == pytest.approx(1.0, abs=1e-12)


def test_crop_border_is_honoured():
    gt = _smooth_image()
    pred = gt.copy()
    b = 4
    pred[:b] = 255 - pred[:b]
    pred[:, -b:] = 0
    assert psnr(pred, gt, crop_border=b) == math.inf
    assert ssim(pred, gt, crop_border=b) == pytest.approx(1.0, abs=1e-12)
    assert psnr(pred, gt, crop_border=b - 1) < 30
    assert ssim(pred, gt, crop_border=b - 1) < 0.999
    assert psnr(pred, gt, crop_border=0) < psnr(pred, gt, crop_border=b - 1)


@pytest.mark.parametrize("crop", [0, 4])
def test_ssim_agrees_with_skimage_on_y(crop):
    gt = _smooth_image()
    pred = np.clip(
        gt.astype(np.int64) + np.random.default_rng(1).integers(-25, 26, gt.shape), 0, 255
    ).astype(np.uint8)
    ours = ssim(pred, gt, crop_border=crop)
    sl = slice(crop, -crop) if crop else slice(None)
    ref = structural_similarity(
        rgb_to_y(pred)[sl, sl],
        rgb_to_y(gt)[sl, sl],
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    assert 0.2 < ours < 0.99
    assert ours == pytest.approx(ref, abs=1e-9)


def test_ssim_rgb_is_mean_over_channels_and_agrees_with_skimage():
    gt = _smooth_image(seed=3)
    pred = np.clip(
        gt.astype(np.int64) + np.random.default_rng(2).integers(-30, 31, gt.shape), 0, 255
    ).astype(np.uint8)
    ours = ssim(pred, gt, crop_border=2, y_channel=False)
    ref = structural_similarity(
        pred[2:-2, 2:-2],
        gt[2:-2, 2:-2],
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    assert ours == pytest.approx(ref, abs=1e-9)
    # Each channel alone, via a grey image repeated over channels, averages to the same.
    per_channel = [
        ssim(
            np.repeat(pred[..., c : c + 1], 3, -1),
            np.repeat(gt[..., c : c + 1], 3, -1),
            crop_border=2,
            y_channel=False,
        )
        for c in range(3)
    ]
    assert ours == pytest.approx(np.mean(per_channel), abs=1e-12)


def test_ssim_matches_brute_force_valid_window():
    """Direct evaluation of the SSIM formula on every 11x11 window (no filtering tricks)."""
    pred, gt = _random_pair((17, 19, 3), noise=40, seed=5)
    a, b = rgb_to_y(pred), rgb_to_y(gt)
    g = gaussian_window()
    win = np.outer(g, g)
    assert win.shape == (11, 11) and win.sum() == pytest.approx(1.0)
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (win * pa).sum(), (win * pb).sum()
            va = (win * (pa - ma) ** 2).sum()
            vb = (win * (pb - mb) ** 2).sum()
            cov = (win * (pa - ma) * (pb - mb)).sum()
            vals.append(
                ((2 * ma * mb + SSIM_C1) * (2 * cov + SSIM_C2))
                / ((ma**2 + mb**2 + SSIM_C1) * (va + vb + SSIM_C2))
            )
    assert len(vals) == 7 * 9
    assert ssim(pred, gt, crop_border=0) == pytest.approx(np.mean(vals), abs=1e-10)


def test_ssim_of_flat_images_known_value():
    a = np.full((20, 20, 3), 100, dtype=np.uint8)
    b = np.full((20, 20, 3), 150, dtype=np.uint8)
    ya, yb = rgb_to_y(a)[0, 0], rgb_to_y(b)[0, 0]
    expected = (2 * ya * yb + SSIM_C1) / (
        ya**2 + yb**2 + SSIM_C1
    )  # zero variance: only luminance term
    assert ssim(a, b, crop_border=0) == pytest.approx(expected, abs=1e-12)


def test_ssim_symmetric_and_decreasing_with_noise():
    gt = _smooth_image(seed=7)
    rng = np.random.default_rng(0)
    scores = []
    for level in (2, 10, 40):
        pred = np.clip(
            gt.astype(np.int64) + rng.integers(-level, level + 1, gt.shape), 0, 255
        ).astype(np.uint8)
        s = ssim(pred, gt, crop_border=2)
        assert s == pytest.approx(ssim(gt, pred, crop_border=2), abs=1e-12)
        scores.append(s)
    assert scores[0] > scores[1] > scores[2]


def test_errors_name_the_problem():
    pred, gt = _random_pair()
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(pred[:-1], gt, crop_border=0)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(pred, gt[:, :-2], crop_border=0)
    with pytest.raises(ValueError, match="pred must have dtype uint8"):
        psnr(pred.astype(np.float32), gt, crop_border=0)
    with pytest.raises(ValueError, match="gt must have dtype uint8"):
        ssim(pred, gt.astype(np.float64), crop_border=0)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        psnr(pred[..., 0], gt[..., 0], crop_border=0)
    with pytest.raises(ValueError, match="crop_border"):
        psnr(pred, gt, crop_border=-1)
    with pytest.raises(ValueError, match="crop_border=20 leaves nothing"):
        psnr(pred, gt, crop_border=20)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(pred[:20], gt[:20], crop_border=5)
