"""restore (whole and tiled), evaluate_pairs, summarise, bicubic baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iln.evaluation.inference import (
    evaluate_pairs,
    model_restore_fn,
    restore,
    summarise,
)
from iln.evaluation.metrics import psnr
from iln.models.restorer import WindowedRestorer


class _Group(nn.Module):
    """A residual group on tokens (B, N, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        return x + 0.5 * torch.tanh(self.fc(x))


class FakeSR(nn.Module):
    """Follows the model contract: pads to the window, groups on (B, N, C), pixel shuffle.

    ``kernel=1`` makes every output pixel depend on one input pixel only (tiling is exact);
    ``kernel=3`` gives a small local receptive field (tiling differs only near seams).
    """

    in_chans = 3
    residual_groups = WindowedRestorer.residual_groups  # the restorer's own accessors
    group_blocks = WindowedRestorer.group_blocks

    def __init__(
        self, scale: int = 2, window_size: int = 8, dim: int = 8, kernel: int = 3, seed: int = 0
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.scale, self.window_size, self.embed_dim = scale, window_size, dim
        self.conv_first = nn.Conv2d(3, dim, kernel, padding=kernel // 2)
        self.layers = nn.ModuleList([_Group(dim) for _ in range(2)])
        self.conv_last = nn.Conv2d(dim, 3 * scale * scale, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        b, _, h, w = x.shape
        ws = self.window_size
        x = F.pad(x, (0, (-w) % ws, 0, (-h) % ws), mode="reflect")
        hp, wp = x.shape[-2:]
        f = self.conv_first(x).flatten(2).transpose(1, 2)  # (B, N, C)
        for layer in self.layers:
            f = layer(f)
        f = f.transpose(1, 2).reshape(b, self.embed_dim, hp, wp)
        res = F.pixel_shuffle(self.conv_last(f), self.scale) * 0.1  # (B, 3, sHp, sWp)
        up = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return (up + res)[:, :, : h * self.scale, : w * self.scale]


class Lambda(nn.Module):
    def __init__(self, fn, scale: int = 1, window_size: int = 4) -> None:
        super().__init__()
        self.fn, self.scale, self.window_size, self.in_chans = fn, scale, window_size, 3
        self.layers = nn.ModuleList()

    def forward(self, x):
        return self.fn(x)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _nearest(img, s):
    return np.repeat(np.repeat(img, s, axis=0), s, axis=1)


def test_restore_identity_roundtrip_is_exact():
    lq = _image(13, 17)
    out = restore(Lambda(lambda x: x), lq, device="cpu")
    assert out.dtype == np.uint8 and np.array_equal(out, lq)


def test_restore_scale_layout_and_clamp():
    lq = _image(9, 11, seed=1)
    up = restore(
        Lambda(lambda x: F.interpolate(x, scale_factor=3, mode="nearest"), scale=3),
        lq,
        device="cpu",
    )
    assert np.array_equal(up, _nearest(lq, 3))
    # Out-of-range values are clamped, NaN becomes 0, then rounding: 0.5 / 255 steps.
    const = Lambda(
        lambda x: torch.stack([x[:, 0] * 0 + 1.7, x[:, 1] * 0 - 3.0, x[:, 2] * 0 + 100.4 / 255], 1)
    )
    out = restore(const, lq, device="cpu")
    assert (out[..., 0] == 255).all() and (out[..., 1] == 0).all() and (out[..., 2] == 100).all()
    out = restore(Lambda(lambda x: x * float("nan")), lq, device="cpu")
    assert (out == 0).all()


def test_restore_restores_training_mode_and_checks_inputs():
    model = FakeSR()
    model.train()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    whole = restore(model, _image(8, 8), device="cpu")
    assert seen == [False] and model.training
    with pytest.raises(ValueError, match="uint8"):
        restore(model, _image(8, 8).astype(np.float32), device="cpu")
    with pytest.raises(ValueError, match="tile: must be 0 .* multiple of the window size 8 "):
        restore(model, _image(8, 8), device="cpu", tile=12)
    with pytest.raises(ValueError, match=r"tile_overlap: must be < tile=16, got 16"):
        restore(model, _image(8, 8), device="cpu", tile=16, tile_overlap=16)
    with pytest.raises(ValueError, match=r"tile_overlap: must be >= 0, got -1"):
        restore(model, _image(8, 8), device="cpu", tile=16, tile_overlap=-1)
    with pytest.raises(ValueError, match=r"tile: must be >= 0, got -8"):
        restore(model, _image(8, 8), device="cpu", tile=-8)
    assert np.array_equal(restore(model, _image(8, 8), device="cpu", tile=0), whole)
    with pytest.raises(ValueError, match="model returned"):
        restore(Lambda(lambda x: x, scale=2), _image(8, 8), device="cpu")


@pytest.mark.parametrize("shape", [(37, 53), (16, 40), (64, 33)])
def test_tiled_equals_whole_for_pointwise_model(shape):
    model = FakeSR(kernel=1)
    lq = _image(*shape, seed=2)
    whole = restore(model, lq, device="cpu")
    tiled = restore(model, lq, device="cpu", tile=16, tile_overlap=4)
    assert whole.shape == tiled.shape == (2 * shape[0], 2 * shape[1], 3)
    diff = np.abs(whole.astype(int) - tiled.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float summation order only


def test_tiled_close_to_whole_for_local_model():
    model = FakeSR(kernel=3, scale=3)
    lq = _image(50, 45, seed=3)
    whole = restore(model, lq, device="cpu")
    tiled = restore(model, lq, device="cpu", tile=24, tile_overlap=8)
    assert tiled.shape == whole.shape == (150, 135, 3)
    assert psnr(tiled, whole, crop_border=0, y_channel=False) > 40
    # Far from any seam (tile starts 0, 16, 26 -> seams near LR rows 16..24 and 26..) nothing
    # changes.
    assert np.array_equal(tiled[: 3 * 12, : 3 * 12], whole[: 3 * 12, : 3 * 12])


def _pairs(model, n=3):
    out = []
    for k in range(n):
        lq = _image(12 + k, 14, seed=10 + k)
        gt = restore(model, lq, device="cpu")
        if k:  # perturb all but the first so PSNR is finite there
            gt = np.clip(
                gt.astype(int) + np.random.default_rng(k).integers(-k * 3, k * 3 + 1, gt.shape),
                0,
                255,
            ).astype(np.uint8)
        out.append((f"img{k}", lq, gt))
    return out


def test_evaluate_pairs_rows_and_summary():
    model = FakeSR()
    pairs = _pairs(model)
    rows = evaluate_pairs(
        model_restore_fn(model, device="cpu"), pairs, crop_border=2, progress=False
    )
    assert [r["image"] for r in rows] == ["img0", "img1", "img2"]
    assert rows[0]["psnr"] == math.inf and rows[0]["ssim"] == pytest.approx(1.0)
    assert math.isfinite(rows[1]["psnr"]) and rows[1]["psnr"] > rows[2]["psnr"]
    s = summarise(rows)
    assert s["count"] == 3 and s["psnr_infinite"] == 1
    assert s["psnr"] == pytest.approx((rows[1]["psnr"] + rows[2]["psnr"]) / 2)
    assert s["ssim"] == pytest.approx(np.mean([r["ssim"] for r in rows]))
    # A generator (no len) works too.
    rows2 = evaluate_pairs(
        model_restore_fn(model, device="cpu"), iter(pairs), crop_border=2, progress=True
    )
    assert rows2 == rows


def test_summarise_edge_cases():
    assert summarise([{"image": "a", "psnr": math.inf, "ssim": 1.0}])["psnr"] == math.inf
    with pytest.raises(ValueError, match="at least one row"):
        summarise([])
    with pytest.raises(ValueError, match="NaN"):
        summarise([{"image": "a", "psnr": float("nan"), "ssim": 1.0}])


def test_evaluate_pairs_names_bad_image():
    model = FakeSR()
    lq = _image(8, 8)
    with pytest.raises(ValueError, match="'bad'.*shape"):
        evaluate_pairs(
            model_restore_fn(model, device="cpu"),
            [("bad", lq, _image(15, 16))],
            crop_border=2,
            progress=False,
        )
    with pytest.raises(ValueError, match="gt of 'bad2'"):
        evaluate_pairs(
            model_restore_fn(model, device="cpu"),
            [("bad2", lq, _image(16, 16)[..., :1])],
            crop_border=2,
            progress=False,
        )


def test_bicubic_baseline():
    from iln.data import degrade
    from iln.evaluation.inference import bicubic_restore

    flat = np.full((10, 12, 3), 77, dtype=np.uint8)
    up = bicubic_restore(2)(flat)
    assert up.shape == (20, 24, 3) and up.dtype == np.uint8 and (up == 77).all()
    lq = _image(10, 12, seed=4)
    up4 = bicubic_restore(4)(lq)
    assert up4.shape == (40, 48, 3)
    ref = degrade.imresize(lq.astype(np.float64), 4)
    assert np.array_equal(up4, degrade.round_to_uint8(ref))
    # Bicubic reproduces a horizontal linear ramp away from the borders.
    ramp = np.broadcast_to((np.arange(16) * 10 + 40)[None, :, None], (8, 16, 3)).astype(np.uint8)
    r2 = bicubic_restore(2)(ramp)
    x = (np.arange(32) + 0.5) / 2 - 0.5  # output pixel centres in input coordinates
    np.testing.assert_allclose(r2[4, 6:26, 0], np.round(40 + 10 * x[6:26]), atol=1)
    per_pass = bicubic_restore(4, round_each_pass=True)(lq)
    ref = degrade.imresize(lq.astype(np.float64), 4, round_each_pass=True)
    assert np.array_equal(per_pass, degrade.round_to_uint8(ref))
    smooth = np.clip(ramp.astype(int) + np.arange(8)[:, None, None] * 3, 0, 255).astype(np.uint8)
    diff = bicubic_restore(2, round_each_pass=True)(smooth).astype(int) - bicubic_restore(2)(
        smooth
    ).astype(int)
    assert np.abs(diff).max() <= 1


def test_restore_with_hat_tiny():
    from iln.models import build_model

    torch.manual_seed(0)
    model = build_model("hat_tiny", norm="iln", scale=2)
    lq = _image(20, 27, seed=6)
    whole = restore(model, lq, device="cpu")
    tiled = restore(model, lq, device="cpu", tile=model.window_size * 2, tile_overlap=4)
    assert whole.shape == tiled.shape == (40, 54, 3)
    # i-LN statistics are per tile, so tiling changes the output a little, not a lot.
    assert psnr(tiled, whole, crop_border=0) > 25
