"""Every task trains and is scored by its protocol: on-the-fly DN / CAR patches (pure in
(seed, k), equal to the degrade stage's degradation), exact resume, deraining pairs, the
protocol functions on known values, and the catalogue facts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iln.data.catalog import SETS, listing
from iln.data.dataset import TestPairs, TrainPatches, training_patches
from iln.data.degrade import jpeg_compress
from iln.data.io import read_rgb, write_png
from iln.data.pairs import make_pairs
from iln.data.params import DegradeParams, parse_task
from iln.evaluation.inference import degraded_input, evaluate_pairs, summarise
from iln.config.layout import Layout
from iln.evaluation.metrics import blocking_effect_factor, psnr, psnr_b, rgb_to_grey
from iln.models import build_model
from iln.evaluation.protocols import protocol_for
from iln.training.loop import fit, load_checkpoint
from tests.helpers import train_settings


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus mild texture: compresses like a photograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(x / 9 + c) * np.cos(y / 13 - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def clean_dir(tmp_path):
    folder = tmp_path / "clean"
    for i, (h, w) in enumerate([(40, 36), (33, 48), (48, 48)]):
        write_png(folder / f"img{i}.png", _photo(h, w, seed=i))
    return folder


def _to_uint8(chw: np.ndarray) -> np.ndarray:
    return np.round(chw.transpose(1, 2, 0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- on-the-fly data


@pytest.mark.parametrize("task", ["dn_s25", "car_q20"])
def test_on_the_fly_samples_are_pure_functions_of_seed_and_index(clean_dir, task):
    a = TrainPatches(clean_dir, None, scale=1, lq_patch=16, seed=3, degradation=task)
    b = TrainPatches(clean_dir, None, scale=1, lq_patch=16, seed=3, degradation=task)
    late = b[7]  # b sees sample 7 first, a after 0..6: the order must not matter
    for k in range(8):
        sample = a[k]
    assert np.array_equal(sample["lq"], late["lq"]) and np.array_equal(sample["gt"], late["gt"])
    other = TrainPatches(clean_dir, None, scale=1, lq_patch=16, seed=4, degradation=task)[7]
    assert not np.array_equal(other["lq"], late["lq"])
    lq, gt = _to_uint8(late["lq"]), _to_uint8(late["gt"])
    assert lq.shape == gt.shape == (16, 16, 3) and not np.array_equal(lq, gt)
    assert np.allclose(late["lq"] * 255.0, np.round(late["lq"] * 255.0), atol=1e-4)  # uint8 grid


def test_training_noise_has_the_runs_sigma_and_is_clipped():
    flat = TrainPatches.__new__(TrainPatches)  # only _degrade is used
    flat.degradation = parse_task("dn_s25")
    gt = np.full((64, 64, 3), 128, np.uint8)
    noisy = flat._degrade(gt, np.random.default_rng(0))
    assert noisy.dtype == np.uint8
    assert abs(float((noisy.astype(float) - 128).std()) - 25.0) < 0.5
    dark = flat._degrade(np.zeros((64, 64, 3), np.uint8), np.random.default_rng(0))
    assert dark.min() == 0 and (dark == 0).mean() > 0.45  # clipped at 0, not wrapped


@pytest.mark.parametrize("subsampling", ["yuv420", "yuv444"])
def test_car_at_train_time_equals_the_degrade_stage(tmp_path, subsampling):
    image = _photo(48, 48, seed=7)
    write_png(tmp_path / "hr/default_test/a.png", image)
    params = DegradeParams(
        tasks=("car_q20",), sets=("default_test",), workers=1, jpeg_subsampling=subsampling
    )
    make_pairs(params, tmp_path / "hr", tmp_path / "pairs", progress=False, log=lambda _: None)
    stored = read_rgb(tmp_path / "pairs/car_q20/default_test/lq/a.png")
    patches = TrainPatches(
        tmp_path / "hr/default_test",
        None,
        scale=1,
        lq_patch=48,  # the whole image, no flips: the train-time input must be the stored one
        seed=0,
        augment=False,
        degradation="car_q20",
        jpeg_subsampling=subsampling,
    )
    sample = patches[0]
    assert np.array_equal(_to_uint8(sample["gt"]), image)
    assert np.array_equal(_to_uint8(sample["lq"]), stored)
    assert not np.array_equal(
        stored,
        jpeg_compress(image, 20, subsampling="yuv444" if subsampling == "yuv420" else "yuv420"),
    )


class _FailAt(torch.utils.data.Dataset):
    """Wraps a dataset and dies at one sample index (stands for a killed process)."""

    def __init__(self, data, fail_at: int) -> None:
        self.data, self.fail_at = data, fail_at

    def __getitem__(self, k: int):
        if k == self.fail_at:
            raise KeyboardInterrupt
        return self.data[k]


def _fit(folder, data, task):
    torch.manual_seed(0)
    model = build_model(
        "swinir_tiny",
        norm="iln",
        scale=1,
        embed_dim=8,
        depths=(1,),
        num_heads=(2,),
        window_size=4,
        drop_path_rate=0.1,  # stochastic depth draws from the global RNG: resume must restore it
    )
    settings = train_settings(
        iterations=6, batch_size=2, lq_patch=16, checkpoint_every=2, log_every=1
    )
    ema, _ = fit(
        model,
        data,
        settings,
        device=torch.device("cpu"),
        checkpoint_path=folder / "ckpt.pt",
        fingerprint=task,
        progress=False,
    )
    return ema.state_dict()


@pytest.mark.parametrize("task", ["dn_s25", "car_q20"])
def test_on_the_fly_training_is_deterministic_and_resumes_bit_exact(tmp_path, clean_dir, task):
    def data():
        return TrainPatches(clean_dir, None, scale=1, lq_patch=16, seed=1, degradation=task)

    ref = _fit(tmp_path / "ref", data(), task)
    again = _fit(tmp_path / "again", data(), task)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "cut", _FailAt(data(), fail_at=3 * 2 + 1), task)  # dies in step 4
    assert load_checkpoint(tmp_path / "cut" / "ckpt.pt", task)["step"] == 2
    resumed = _fit(tmp_path / "cut", data(), task)
    for key, value in ref.items():
        assert torch.equal(value, again[key]), key
        assert torch.equal(value, resumed[key]), key


# --------------------------------------------------------------------------- deraining pairs


def _rain_pairs(root, names_lq, names_gt, size=(24, 20)):
    layout = Layout(root)
    lq_dir, gt_dir = layout.pair_dirs("derain", "Rain13K")
    for i, name in enumerate(names_gt):
        write_png(gt_dir / f"{name}.png", _photo(*size, seed=i))
    for i, name in enumerate(names_lq):
        write_png(lq_dir / f"{name}.png", _photo(*size, seed=100 + i))
    return layout


def test_derain_patches_pair_inputs_and_targets_by_name(tmp_path):
    layout = _rain_pairs(tmp_path, ["b", "a"], ["a", "b"])
    data = training_patches("derain", "Rain13K", layout=layout, lq_patch=8, seed=0)
    assert data.scale == 1 and [p.stem for p in data.gt_files] == ["a", "b"]
    sample = data[0]
    assert sample["lq"].shape == sample["gt"].shape == (3, 8, 8)
    name = data.gt_files[data.image_index(0)].stem
    lq_dir, gt_dir = layout.pair_dirs("derain", "Rain13K")
    rng = np.random.default_rng([0, 0])  # the same crop position in both images
    top, left = int(rng.integers(0, 24 - 8 + 1)), int(rng.integers(0, 20 - 8 + 1))
    flips = rng.random(3) < 0.5
    for key, folder in (("lq", lq_dir), ("gt", gt_dir)):
        crop = read_rgb(folder / f"{name}.png")[top : top + 8, left : left + 8]
        crop = crop[:, ::-1] if flips[0] else crop
        crop = crop[::-1] if flips[1] else crop
        crop = crop.transpose(1, 0, 2) if flips[2] else crop
        assert np.array_equal(_to_uint8(sample[key]), crop), key


def test_derain_set_with_unmatched_names_is_rejected_naming_the_file(tmp_path):
    layout = _rain_pairs(tmp_path / "missing", ["a"], ["a", "b"])
    with pytest.raises(FileNotFoundError, match=r"no lq partner for .*b\.png"):
        training_patches("derain", "Rain13K", layout=layout, lq_patch=8, seed=0)
    layout = _rain_pairs(tmp_path / "extra", ["a", "c"], ["a"])
    with pytest.raises(FileNotFoundError, match=r"c\.png: lq image without a gt partner"):
        training_patches("derain", "Rain13K", layout=layout, lq_patch=8, seed=0)
    layout = _rain_pairs(tmp_path / "size", ["a"], ["a"])
    lq_dir, _ = layout.pair_dirs("derain", "Rain13K")
    write_png(lq_dir / "a.png", _photo(24, 22))
    with pytest.raises(ValueError, match=r"a\.png: lq size 24x22 .* does not match gt"):
        training_patches("derain", "Rain13K", layout=layout, lq_patch=8, seed=0)
    with pytest.raises(FileNotFoundError, match="no lq partner"):
        _rain_pairs(tmp_path / "test", ["x"], ["y"])
        TestPairs(*Layout(tmp_path / "test").pair_dirs("derain", "Rain13K"))


# --------------------------------------------------------------------------- protocols


def _steps(d: int = 8) -> np.ndarray:
    """16x16 grey image with a step of d grey levels at every 8-pixel column boundary."""
    plane = 100 + d * (np.arange(16)[None, :] // 8) + np.zeros((16, 1))
    return np.repeat(plane[..., None], 3, axis=-1).astype(np.uint8)


def test_psnr_b_known_value():
    pred = _steps(8)
    gt = pred + np.uint8(2)  # MSE 4
    # D_B: 16 boundary pairs differing by 8 (columns 7|8) and 16 that do not (rows 7|8) -> 32;
    # D_Bc = 0; BEF = log2(8) / log2(16) * 32 = 24.
    assert blocking_effect_factor(pred[..., 0].astype(float)) == pytest.approx(24.0)
    expected = 10 * math.log10(255**2 / (4 + 24))
    assert psnr_b(pred, gt, crop_border=0, y_channel=False) == pytest.approx(expected, abs=1e-12)
    k = 219 / 255  # Y of a grey image is 16 + k * grey: every difference scales by k
    expected_y = 10 * math.log10(255**2 / ((4 + 24) * k * k))
    assert psnr_b(pred, gt, crop_border=0) == pytest.approx(expected_y, abs=1e-9)


def test_psnr_b_equals_psnr_without_blocking():
    # equal steps on a square whose sides are multiples of 8: boundary and other pairs are
    # then alike in both directions (elsewhere the pooled counts, as KAIR's, see blocking)
    ramp = np.repeat((50 + 3 * np.arange(24))[None, :, None], 24, axis=0)
    pred = np.repeat(ramp, 3, axis=-1).astype(np.uint8)
    gt = (pred + np.uint8(5)).astype(np.uint8)
    assert blocking_effect_factor(pred[..., 0].astype(float)) == 0.0
    for y_channel in (True, False):
        assert psnr_b(pred, gt, crop_border=0, y_channel=y_channel) == pytest.approx(
            psnr(pred, gt, crop_border=0, y_channel=y_channel), abs=1e-12
        )


def test_protocols_score_the_space_each_task_is_reported_in():
    gt = _photo(32, 40, seed=1)
    pred = gt.copy()
    pred[..., 0] = np.clip(pred[..., 0].astype(int) + 3, 0, 255)  # red channel +3 (mostly)
    mse_rgb = np.mean((pred.astype(float) - gt) ** 2)
    dn = protocol_for("dn_s15").score(pred, gt)
    assert dn["psnr"] == pytest.approx(10 * math.log10(255**2 / mse_rgb), abs=1e-12)
    assert set(dn) == {"psnr", "ssim"}
    dr = protocol_for("derain").score(pred, gt)
    assert dr["psnr"] == psnr(pred, gt, crop_border=0) != dn["psnr"]
    car = protocol_for("car_q10").score(pred, gt)
    assert set(car) == {"psnr", "ssim", "psnr_b"} and car["psnr"] == dr["psnr"]
    assert protocol_for("sr_x4").crop_border == 4
    assert {protocol_for(t).crop_border for t in ("dn_s50", "car_q40", "derain")} == {0}


def test_grey_sets_are_scored_on_the_grey_image():
    grey = _photo(24, 24)[..., :1].repeat(3, axis=-1)
    assert np.array_equal(rgb_to_grey(grey), grey)
    brighter = (grey + np.uint8(5)).astype(np.uint8)
    on_grey = protocol_for("car_q10", grey=True).score(brighter, grey)
    assert on_grey["psnr"] == pytest.approx(20 * math.log10(255 / 5), abs=1e-12)
    on_y = protocol_for("car_q10").score(brighter, grey)
    assert on_y["psnr"] == pytest.approx(20 * math.log10(255 / (5 * 219 / 255)), abs=1e-9)
    assert SETS["Classic5"].grey and not SETS["LIVE1"].grey


def test_degraded_input_baseline_and_summary_schema():
    gt = _photo(24, 24, seed=2)
    lq = jpeg_compress(gt, 10)
    rows = evaluate_pairs(
        degraded_input, [("a", lq, gt), ("b", gt, gt)], protocol=protocol_for("car_q10")
    )
    assert rows[0]["psnr"] == psnr(lq, gt, crop_border=0) and math.isinf(rows[1]["psnr"])
    summary = summarise(rows)
    assert summary["psnr"] == rows[0]["psnr"] and summary["psnr_infinite"] == 1
    assert summary["psnr_b"] == rows[0]["psnr_b"] <= rows[0]["psnr"]
    with pytest.raises(ValueError, match="exactly one of crop_border and protocol"):
        evaluate_pairs(degraded_input, [], crop_border=0, protocol=protocol_for("derain"))


# --------------------------------------------------------------------------- catalogue


def test_catalogue_counts_and_listing():
    assert SETS["Test100"].count == 98 and SETS["Rain13K"].count == 13711
    assert SETS["Rain100L"].count == SETS["Rain100H"].count == 100
    text = listing()
    test100 = next(line for line in text.splitlines() if line.startswith("Test100"))
    rain13k = next(line for line in text.splitlines() if line.startswith("Rain13K"))
    assert " 98 " in test100 and " 13711 " in rain13k
    assert "500x500" in SETS["Kodak24"].description
