"""The released SwinIR zoo: every task config of the official code builds here, loads its
weights strictly, computes the official outputs, and exports back to the official layout.

The fixtures under ``tests/fixtures/swinir_*.pt`` were made by running the official SwinIR
code on reduced sizes of each task config (see ``tests/fixtures/README.md``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from iln.data.catalog import SETS
from iln.data.degrade import add_gaussian_noise, jpeg_compress
from iln.evaluation.inference import restore
from iln.evaluation.metrics import psnr_b
from iln.models import build_model, common, load_official_checkpoint, to_official_state_dict
from iln.models.checkpoint import CheckpointMismatchError
from iln.evaluation.protocols import protocol_for

FIXTURES = Path(__file__).parent / "fixtures"
# official task name -> (our preset, scale)
TASKS = {
    "classical_sr_x2": ("swinir", 2),
    "color_dn": ("swinir_dn", 1),
    "gray_dn": ("swinir_dn", 1),
    "color_jpeg_car": ("swinir_car", 1),
    "jpeg_car": ("swinir_car", 1),
}


def _fixture(task: str) -> dict:
    return torch.load(FIXTURES / f"swinir_{task}.pt", weights_only=True)


def _ours(task: str, *, fast: bool = True, seed: int = 0) -> torch.nn.Module:
    """Our model of the fixture's reduced config; window and img_range come from the preset."""
    arch, scale = TASKS[task]
    cfg = _fixture(task)["config"]
    model = build_model(
        arch,
        norm="ln",
        scale=scale,
        fast=fast,
        generator=torch.Generator().manual_seed(seed),
        embed_dim=cfg["embed_dim"],
        depths=cfg["depths"],
        num_heads=cfg["num_heads"],
        img_size=cfg["img_size"],
        in_chans=cfg["in_chans"],
    )
    return model.eval()


@pytest.mark.parametrize("task", TASKS)
def test_presets_hold_the_official_task_configs(task):
    cfg = _fixture(task)["config"]
    model = _ours(task)
    hp = model.hparams
    assert (hp["window_size"], hp["img_range"], hp["in_chans"]) == (
        cfg["window_size"],
        cfg["img_range"],
        cfg["in_chans"],
    )
    assert model.scale == cfg["upscale"] and (cfg["upsampler"] == "") == (model.scale == 1)
    assert not hp["stdnorm"] and not hp["affine_outer"]  # the released models: LN, mean only


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("task", TASKS)
def test_official_weights_load_strictly_and_give_the_official_outputs(task, fast):
    blob = _fixture(task)
    model = load_official_checkpoint(_ours(task, fast=fast), {"params": blob["state_dict"]})
    with torch.no_grad():
        out = model(blob["input"])  # (2, C, 13, 11): odd sizes, padded inside
    torch.testing.assert_close(out, blob["output"], rtol=0, atol=1e-5)  # outputs ~[0, 1]


@pytest.mark.parametrize("task", ["classical_sr_x2", "jpeg_car"])
def test_the_released_test_script_padding_is_reproduced(task):
    blob = _fixture(task)
    model = load_official_checkpoint(_ours(task), blob["state_dict"])
    x = blob["input"]
    padded = common.pad_like_swinir_test(x, model.window_size)
    ws = model.window_size
    assert padded.shape[2:] == ((13 // ws + 1) * ws, (11 // ws + 1) * ws)
    with torch.no_grad():
        out = model(padded)[..., : 13 * model.scale, : 11 * model.scale]
    torch.testing.assert_close(out, blob["output_test_pad"], rtol=0, atol=1e-5)
    assert (out - blob["output"]).abs().max() > 1e-3  # the two paddings do differ


@pytest.mark.parametrize("task", TASKS)
def test_export_has_exactly_the_official_tensors(task):
    official = _fixture(task)["state_dict"]
    exported = to_official_state_dict(_ours(task, seed=3))
    assert set(exported) == set(official)
    for key, value in official.items():
        assert exported[key].shape == value.shape and exported[key].dtype == value.dtype, key
        if key.endswith(("attn_mask", "relative_position_index")):
            assert torch.equal(exported[key], value), key


@pytest.mark.parametrize("task", ["classical_sr_x2", "jpeg_car"])
def test_export_round_trips_through_the_official_layout(task):
    source = _ours(task, seed=4)
    target = load_official_checkpoint(_ours(task, seed=5), to_official_state_dict(source))
    x = _fixture(task)["input"]
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_released_constants_that_do_not_fit_are_refused():
    official = _fixture("jpeg_car")["state_dict"]
    bad_index = dict(official)
    key = "layers.0.residual_group.blocks.0.attn.relative_position_index"
    bad_index[key] = official[key].flip(0)
    with pytest.raises(CheckpointMismatchError, match="differs from the model's relative"):
        load_official_checkpoint(_ours("jpeg_car"), bad_index)
    bad_mask = dict(official)
    bad_mask["layers.0.residual_group.blocks.1.attn_mask"] = torch.zeros(4, 64, 64)
    with pytest.raises(CheckpointMismatchError, match=r"no shift mask of 7x7 windows"):
        load_official_checkpoint(_ours("jpeg_car"), bad_mask)


def test_a_grey_checkpoint_into_an_rgb_model_names_the_channels():
    official = _fixture("gray_dn")["state_dict"]
    model = build_model(
        "swinir_dn", norm="ln", scale=1, embed_dim=12, depths=[2], num_heads=[3], img_size=16
    )
    with pytest.raises(CheckpointMismatchError, match=r"conv_first.weight \(12, 1, 3, 3\)") as info:
        load_official_checkpoint(model, official)
    assert "in_chans=3" in str(info.value) and "looks like: SwinIR-like" in str(info.value)
    assert "in_chans 1" in str(info.value) and "window_size 8" in str(info.value)


@pytest.mark.parametrize("norm", ["ln", "iln"])
@pytest.mark.parametrize(
    "arch,in_chans,scale",
    [
        ("swinir", 3, 2),
        ("swinir", 1, 3),
        ("swinir_dn", 3, 1),
        ("swinir_dn", 1, 1),
        ("swinir_car", 3, 1),
        ("swinir_car", 1, 1),
    ],
)
def test_zoo_configs_train_on_odd_sizes(arch, in_chans, scale, norm):
    model = build_model(
        arch,
        norm=norm,
        scale=scale,
        in_chans=in_chans,
        embed_dim=12,
        depths=[2],
        num_heads=[2],
        generator=torch.Generator().manual_seed(0),
    )
    x = torch.rand(2, in_chans, 9, 11, requires_grad=True)
    out = model(x, drop_noise=torch.rand(2, model.drop_sites))
    assert out.shape == (2, in_chans, 9 * scale, 11 * scale)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_odd_windows_compute_the_same_on_the_fast_and_reference_paths():
    kwargs = dict(norm="iln", scale=1, embed_dim=12, depths=[2], num_heads=[2], in_chans=1)
    kwargs.update(drop_path_rate=0.0, generator=torch.Generator().manual_seed(0))
    fast = build_model("swinir_car", fast=True, **kwargs)
    ref = build_model("swinir_car", fast=False, **kwargs)
    ref.load_state_dict(fast.state_dict())
    grads = []
    for model in (fast, ref):
        x = torch.rand(2, 1, 15, 10, generator=torch.Generator().manual_seed(2))
        x.requires_grad_(True)
        model(x).square().sum().backward()
        grads.append((model(x).detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-3)  # img_range 255
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-4)


def test_window_and_channel_rules_name_the_bad_value():
    with pytest.raises(ValueError, match=r"window_size 7 must be an even int >= 2 for HAT"):
        build_model("hat_tiny", norm="ln", scale=2, window_size=7)
    with pytest.raises(ValueError, match=r"img_size 64 must be a multiple of window_size=7"):
        build_model("swinir_tiny", norm="ln", scale=2, window_size=7)
    with pytest.raises(ValueError, match=r"in_chans 2 must be 1 \(grey\) or 3 \(RGB\)"):
        build_model("swinir_tiny", norm="ln", scale=2, in_chans=2)
    model = build_model("hat_tiny", norm="ln", scale=2, in_chans=1)  # HAT takes grey too
    assert model(torch.rand(1, 1, 9, 9)).shape == (1, 1, 18, 18)


def test_grey_models_restore_the_grey_image_and_the_test_padding_is_offered():
    model = build_model(
        "swinir_car", norm="ln", scale=1, in_chans=1, embed_dim=12, depths=[2], num_heads=[2]
    )
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (13, 11, 1), dtype=np.uint8).repeat(3, axis=-1)
    out = restore(model, grey, device="cpu")
    assert out.shape == (13, 11, 3) and (out == out[..., :1]).all()
    with torch.no_grad():
        direct = model(torch.from_numpy(grey[..., :1].copy()).permute(2, 0, 1)[None] / 255.0)
    expected = (direct[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(out[..., 0], expected)
    flip = restore(model, grey, device="cpu", pad="swinir_test")
    assert flip.shape == out.shape and not np.array_equal(flip, out)
    with pytest.raises(ValueError, match="pad must be one of model, swinir_test"):
        restore(model, grey, device="cpu", pad="zeros")


def test_img_size_at_most_the_window_is_refused():
    # the released constructor then turns every shift off and shrinks the window
    with pytest.raises(ValueError, match="img_size 8 must be a multiple of window_size=8 larger"):
        build_model("swinir_tiny", norm="ln", scale=2, img_size=8)


# --------------------------------------------------------------------------- PSNR-B


def _blocky(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random image and a version pulled halfway to its 8x8 block means."""
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (h, w, 3)).astype(np.float64)
    gt = (gt + np.roll(gt, 1, 0) + np.roll(gt, 1, 1)) / 3
    pred = gt.copy()
    for i in range(0, h, 8):
        for j in range(0, w, 8):
            block = pred[i : i + 8, j : j + 8]
            pred[i : i + 8, j : j + 8] = 0.5 * block + 0.5 * block.mean((0, 1))

    def u8(a):
        return np.clip(np.round(a), 0, 255).astype(np.uint8)

    return u8(pred), u8(gt)


# KAIR's calculate_psnrb (as SwinIR's test script calls it) on _blocky: (grey plane = the
# first channel, RGB, Y). KAIR converts to Y in float32, hence the looser Y tolerance.
KAIR_PSNR_B = {
    (32, 40): (21.88301296486781, 21.645918195378034, 26.679372787475586),
    (37, 45): (20.555739504533793, 20.16099604292629, 24.948823928833008),
    (29, 64): (20.304447215147277, 20.253706360283843, 25.41423797607422),
}


@pytest.mark.parametrize("size", KAIR_PSNR_B)
def test_psnr_b_equals_kair_including_sizes_that_are_not_multiples_of_8(size):
    pred, gt = _blocky(*size)
    grey, rgb, y = KAIR_PSNR_B[size]
    pred_grey, gt_grey = pred[..., :1].repeat(3, -1), gt[..., :1].repeat(3, -1)
    assert psnr_b(pred_grey, gt_grey, crop_border=0, y_channel=False) == pytest.approx(
        grey, abs=1e-9
    )
    assert psnr_b(pred, gt, crop_border=0, y_channel=False) == pytest.approx(rgb, abs=1e-9)
    assert psnr_b(pred, gt, crop_border=0, y_channel=True) == pytest.approx(y, abs=1e-5)
    assert math.isfinite(grey)


# --------------------------------------------------------------------------- grey sets


def test_grey_sets_get_grey_inputs_and_are_scored_on_the_grey_plane():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 24, 1), dtype=np.uint8).repeat(3, axis=-1)
    noisy = add_gaussian_noise(grey, 25, np.random.default_rng(1), grey=True)
    plane = grey[..., 0] + np.random.default_rng(1).normal(0, 25, (20, 24, 1))[..., 0]
    assert np.array_equal(noisy[..., 0], np.clip(np.round(plane), 0, 255).astype(np.uint8))
    assert (noisy == noisy[..., :1]).all()
    assert not (add_gaussian_noise(grey, 25, np.random.default_rng(1)) == noisy[..., :1]).all()
    jpeg = jpeg_compress(grey, 10, grey=True)
    assert (jpeg == jpeg[..., :1]).all() and not np.array_equal(jpeg, grey)
    assert {SETS[n].grey for n in ("Set12", "BSD68", "Classic5")} == {True}
    assert protocol_for("dn_s25", grey=True).space == "grey"
    assert protocol_for("dn_s25").space == "rgb"
    one = protocol_for("dn_s25", grey=True).score(noisy, grey)
    assert one["psnr"] == pytest.approx(
        10 * math.log10(255**2 / np.mean((noisy[..., 0].astype(float) - grey[..., 0]) ** 2))
    )


# Parameter counts of the official constructor at full size (SwinIR-M), counted by running it.
OFFICIAL_COUNTS = [
    ("swinir_dn", 3, 11_504_163),  # color_dn
    ("swinir_dn", 1, 11_497_681),  # gray_dn
    ("swinir_car", 3, 11_492_067),  # color_jpeg_car: window 7, smaller bias tables
    ("swinir_car", 1, 11_485_585),  # jpeg_car
]


@pytest.mark.parametrize("arch,in_chans,expected", OFFICIAL_COUNTS)
def test_full_zoo_presets_have_the_official_parameter_counts(arch, in_chans, expected):
    model = build_model(arch, norm="ln", scale=1, in_chans=in_chans)
    assert sum(p.numel() for p in model.parameters()) == expected
    iln = build_model(arch, norm="iln", scale=1, in_chans=in_chans)
    assert sum(p.numel() for p in iln.parameters()) == expected
