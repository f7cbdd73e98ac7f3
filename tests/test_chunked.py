"""Exact chunked inference (iln.models.chunked) equals whole-image inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iln.evaluation.inference import restore
from iln.models import NORMS, build_model, common, norms
from iln.models.chunked import band_shift_mask, chunked_forward, plan_norm

ARCHS = ("hat_tiny", "swinir_tiny", "drct_tiny")


def _model(arch: str, norm: str, scale: int = 2, seed: int = 0) -> torch.nn.Module:
    """A model whose every weight and statistic is moved off its initial value, so that
    each branch, norm affine and running statistic changes the output."""
    g = torch.Generator().manual_seed(seed)
    model = build_model(arch, norm=norm, scale=scale, generator=g, fast=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0, generator=g)
            elif name.endswith(("running_mean", "std_ema")):
                buf.uniform_(0.0, 0.5, generator=g)
    return model


def _assert_equal_to_whole(model: torch.nn.Module, x: torch.Tensor, tokens: int) -> None:
    with torch.no_grad():
        whole = model(x)
        out = chunked_forward(model, x, tokens=tokens)
    assert out.shape == whole.shape and out.dtype == whole.dtype
    scale = float(whole.abs().max())
    assert scale > 0.1  # a test of something
    torch.testing.assert_close(out, whole, rtol=0.0, atol=1e-5 * scale)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm", ["ln", "iln"])
@pytest.mark.parametrize("size", [(21, 35), (13, 9)])
def test_chunked_equals_whole_image(arch, norm, size):
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    _assert_equal_to_whole(_model(arch, norm), x, tokens=100)  # pieces of about 100 tokens


@pytest.mark.parametrize("norm", [n for n in NORMS if n not in ("ln", "iln")])
def test_chunked_equals_whole_image_for_every_other_norm(norm):
    x = torch.rand(2, 3, 19, 27, generator=torch.Generator().manual_seed(2))  # two images
    _assert_equal_to_whole(_model("hat_tiny", norm), x, tokens=100)


@pytest.mark.parametrize("arch, scale", [("hat_tiny", 1), ("swinir_tiny", 3), ("drct_tiny", 4)])
def test_chunked_equals_whole_image_at_every_head(arch, scale):
    x = torch.rand(1, 3, 17, 23, generator=torch.Generator().manual_seed(3))
    _assert_equal_to_whole(_model(arch, "iln", scale=scale), x, tokens=100)


def test_any_piece_size_gives_the_whole_image():
    """From pieces of one row / one window to a single piece holding everything."""
    model = _model("hat_tiny", "iln")
    x = torch.rand(1, 3, 15, 26, generator=torch.Generator().manual_seed(4))
    for tokens in (1, 10**9):
        _assert_equal_to_whole(model, x, tokens=tokens)


@pytest.mark.parametrize("window, size", [(8, (24, 40)), (7, (21, 14)), (8, (8, 16))])
def test_band_shift_mask_is_the_rows_of_the_whole_mask(window, size):
    shift = window // 2
    like = torch.zeros(())
    whole = common.shift_window_mask(*size, window, shift, device=like.device, dtype=like.dtype)
    per_row = size[1] // window
    for lo in range(0, size[0], window):
        band = band_shift_mask(size, window, shift, (lo, lo + window), like)
        first = lo // window * per_row
        assert torch.equal(band, whole[first : first + per_row])
    both = band_shift_mask(size, window, shift, (0, size[0]), like)
    assert torch.equal(both, whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_dtypes_on_the_meta_device(arch, dtype):
    model = build_model(arch, norm="iln", scale=2, fast=False).eval().to("meta", dtype)
    x = torch.empty(1, 3, 37, 29, device="meta", dtype=dtype)
    with torch.no_grad():
        whole = model(x)
    out = chunked_forward(model, x, tokens=200)
    assert (out.shape, out.dtype, out.device) == (whole.shape, whole.dtype, whole.device)
    assert out.shape == (1, 3, 74, 58)


def test_statistics_are_those_of_the_whole_stream():
    """The plan of i-LN normalises any piece with the mean and std of all tokens."""
    norm = norms.build_norm("iln", 8)
    x = torch.randn(2, 50, 8) * 3 + 1
    y, scale = norm(x)
    plan = plan_norm(norm, x)
    piece, piece_scale = plan(x[:, 10:20])
    torch.testing.assert_close(piece, y[:, 10:20])
    assert torch.equal(piece_scale, scale)


def test_refusals_name_the_problem():
    model = build_model("hat_tiny", norm="iln", scale=2)
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"needs the model in eval mode"):
        chunked_forward(model.train(), x)
    with pytest.raises(ValueError, match=r"tokens must be a positive int, got 0"):
        chunked_forward(model.eval(), x, tokens=0)
    with pytest.raises(TypeError, match=r"runs HAT, SwinIR and DRCT, not Conv2d"):
        chunked_forward(torch.nn.Conv2d(3, 3, 3).eval(), x)
    with pytest.raises(TypeError, match=r"does not know the norm GroupNorm"):
        plan_norm(torch.nn.GroupNorm(1, 8), torch.zeros(1, 4, 8))


def test_restore_chunked_gives_the_whole_image_pixels():
    model = _model("hat_tiny", "iln")
    lq = np.random.default_rng(5).integers(0, 256, (19, 30, 3), dtype=np.uint8)
    whole = restore(model, lq, device="cpu").astype(int)
    chunked = restore(model, lq, device="cpu", chunked=True).astype(int)
    assert chunked.shape == whole.shape == (38, 60, 3)
    assert np.abs(chunked - whole).max() <= 1  # float rounding may cross a .5 boundary
    assert (chunked == whole).mean() > 0.999
    with pytest.raises(ValueError, match=r"chunked \(exact\) and tile \(inexact\)"):
        restore(model, lq, device="cpu", chunked=True, tile=16, tile_overlap=8)


def test_the_command_refuses_chunked_with_tiles(tmp_path, capsys):
    from iln.cli.main import main
    from iln.data.io import write_png
    from iln.weights.trained import save_trained

    model = build_model("hat_tiny", norm="iln", scale=2, generator=torch.Generator())
    save_trained(tmp_path / "model.pt", model, arch="hat_tiny", norm="iln", scale=2, overrides={})
    write_png(tmp_path / "in.png", np.zeros((8, 8, 3), np.uint8))
    argv = ["restore", str(tmp_path / "model.pt"), str(tmp_path / "in.png"), str(tmp_path / "o")]
    assert main([*argv, "--chunked", "--tile", "64"]) == 2
    assert "--chunked (exact) and --tile (inexact) exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
