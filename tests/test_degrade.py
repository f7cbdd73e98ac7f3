"""Noise / JPEG degradations, tiling, and the degrade pipeline (pairs + manifest + stage)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iln.data.degrade import (
    add_gaussian_noise,
    bicubic_downsample,
    jpeg_compress,
    noise_rng,
    tile_positions,
)
from iln.data.io import read_rgb, write_png
from iln.data.pairs import make_pairs
from iln.data.params import DegradeParams, SubImages
from tests.helpers import write_params

ROOT = Path(__file__).resolve().parents[1]


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus mild texture: compresses like a photograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(x / 9 + c) * np.cos(y / 13 - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def test_noise_is_per_image_and_order_independent():
    img = _photo(16, 16)
    a1 = add_gaussian_noise(img, 25, noise_rng(0, "dn_s25", "a"))
    b = add_gaussian_noise(img, 25, noise_rng(0, "dn_s25", "b"))
    a2 = add_gaussian_noise(img, 25, noise_rng(0, "dn_s25", "a"))  # after drawing b
    assert np.array_equal(a1, a2) and not np.array_equal(a1, b)
    assert not np.array_equal(a1, add_gaussian_noise(img, 25, noise_rng(1, "dn_s25", "a")))


def test_noise_statistics_clip_and_round():
    flat = np.full((200, 200, 3), 128, dtype=np.uint8)
    noisy = add_gaussian_noise(flat, 15, noise_rng(3, "dn_s15", "x"))
    assert noisy.dtype == np.uint8
    diff = noisy.astype(float) - 128
    assert abs(diff.mean()) < 0.3 and abs(diff.std() - 15) < 0.3
    dark = add_gaussian_noise(np.zeros((50, 50, 3), np.uint8), 50, noise_rng(0, "dn_s50", "d"))
    assert dark.min() == 0 and (dark == 0).mean() > 0.4  # negatives clipped, not wrapped


def test_jpeg_quality_is_honoured():
    img = _photo(96, 128)
    errors, sizes = [], []
    for q in (10, 20, 30, 40):
        out = jpeg_compress(img, q)
        assert out.shape == img.shape and out.dtype == np.uint8
        errors.append(np.mean((out.astype(float) - img) ** 2))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=q, subsampling=2)
        with Image.open(io.BytesIO(buf.getvalue())) as decoded:
            tables = decoded.quantization
        sizes.append(sum(tables[0]))  # luma table entries shrink as quality rises
    assert errors == sorted(errors, reverse=True) and sizes == sorted(sizes, reverse=True)
    assert np.array_equal(jpeg_compress(img, 20), jpeg_compress(img, 20))  # deterministic


def test_tile_positions_follow_the_official_rule():
    assert tile_positions(1356, 480, 240) == [0, 240, 480, 720, 876]  # last tile flush with the end
    assert tile_positions(960, 480, 240) == [0, 240, 480]
    assert tile_positions(300, 480, 240) == [0]


def _hr_tree(root: Path) -> Path:
    hr = root / "hr"
    for name, shape in (("a", (50, 62)), ("b", (48, 60))):
        write_png(hr / "default_train" / f"{name}.png", _photo(*shape, seed=len(name) + shape[0]))
    write_png(hr / "default_test" / "c.png", _photo(36, 36, seed=7))
    return hr


def test_make_pairs_sr_dn_car(tmp_path):
    hr = _hr_tree(tmp_path)
    params = DegradeParams(
        tasks=("sr_x2", "sr_x3", "dn_s15", "car_q20"),
        sets=("default_train", "default_test"),
        seed=5,
        workers=1,
    )
    manifest = make_pairs(params, hr, tmp_path / "pairs", progress=False, log=lambda _: None)
    src = read_rgb(hr / "default_train" / "a.png")
    gt3 = read_rgb(tmp_path / "pairs/sr_x3/default_train/gt/a.png")
    lq3 = read_rgb(tmp_path / "pairs/sr_x3/default_train/lq/a.png")
    assert gt3.shape == (48, 60, 3) and np.array_equal(gt3, src[:48, :60])  # mod-crop
    assert np.array_equal(lq3, bicubic_downsample(gt3, 3))
    dn = read_rgb(tmp_path / "pairs/dn_s15/default_train/lq/a.png")
    assert np.array_equal(dn, add_gaussian_noise(src, 15, noise_rng(5, "dn_s15", "a")))
    car = read_rgb(tmp_path / "pairs/car_q20/default_test/lq/c.png")
    assert np.array_equal(car, jpeg_compress(read_rgb(hr / "default_test/c.png"), 20))
    entry = manifest["pairs"]["sr_x2/default_train"]
    assert entry["images"] == 2 and entry["per_image"]["a"] == {"gt": [50, 62], "lq": [25, 31]}
    assert manifest["jpeg"]["subsampling"] == "yuv420" and "Pillow" in manifest["jpeg"]["encoder"]
    on_disk = json.loads((tmp_path / "pairs/manifest.json").read_text())
    assert on_disk["pairs"].keys() == manifest["pairs"].keys()
    assert not list((tmp_path / "pairs").glob(".staging-*"))


def test_pairs_do_not_depend_on_workers_or_other_images(tmp_path):
    hr = _hr_tree(tmp_path)
    one = DegradeParams(tasks=("dn_s25",), sets=("default_train",), seed=1, workers=1)
    make_pairs(one, hr, tmp_path / "p1", progress=False, log=lambda _: None)
    (hr / "default_train" / "b.png").unlink()  # a different set of neighbours, 2 workers
    two = DegradeParams(tasks=("dn_s25",), sets=("default_train",), seed=1, workers=2)
    make_pairs(two, hr, tmp_path / "p2", progress=False, log=lambda _: None)
    a1 = (tmp_path / "p1/dn_s25/default_train/lq/a.png").read_bytes()
    a2 = (tmp_path / "p2/dn_s25/default_train/lq/a.png").read_bytes()
    assert a1 == a2


def test_subimages_are_aligned(tmp_path):
    hr = tmp_path / "hr"
    write_png(hr / "default_train" / "big.png", _photo(60, 84, seed=3))
    params = DegradeParams(
        tasks=("sr_x4",),
        sets=("default_train",),
        workers=1,
        subimages=SubImages(sets=("default_train",), size=24, step=12),
    )
    manifest = make_pairs(params, hr, tmp_path / "pairs", progress=False, log=lambda _: None)
    base = tmp_path / "pairs/sr_x4/default_train"
    names = sorted(p.name for p in (base / "gt").iterdir())
    assert len(names) == len(tile_positions(15, 6, 3)) * len(tile_positions(21, 6, 3))
    assert manifest["pairs"]["sr_x4/default_train"]["files"] == len(names)
    full_lq = bicubic_downsample(read_rgb(hr / "default_train/big.png"), 4)
    tile = names[-1]  # the one flush with the bottom-right corner
    lq, gt = read_rgb(base / "lq" / tile), read_rgb(base / "gt" / tile)
    assert lq.shape == (6, 6, 3) and gt.shape == (24, 24, 3)
    assert np.array_equal(lq, full_lq[-6:, -6:])
    assert np.array_equal(gt, read_rgb(hr / "default_train/big.png")[-24:, -24:])


def test_derain_passes_pairs_through(tmp_path):
    hr = tmp_path / "hr"
    clean, rainy = _photo(20, 20, 1), _photo(20, 20, 2)
    write_png(hr / "Rain100L" / "1.png", clean)
    write_png(hr / "Rain100L_rain" / "1.png", rainy)
    params = DegradeParams(tasks=("derain",), sets=("Rain100L",), workers=1)
    make_pairs(params, hr, tmp_path / "pairs", progress=False, log=lambda _: None)
    assert np.array_equal(read_rgb(tmp_path / "pairs/derain/Rain100L/lq/1.png"), rainy)
    assert np.array_equal(read_rgb(tmp_path / "pairs/derain/Rain100L/gt/1.png"), clean)


def test_missing_hr_set_names_the_fix(tmp_path):
    params = DegradeParams(tasks=("sr_x2",), sets=("Set5",), workers=1)
    with pytest.raises(FileNotFoundError, match=r"Set5.*data\.datasets"):
        make_pairs(params, tmp_path / "hr", tmp_path / "pairs", progress=False, log=lambda _: None)
    assert not list((tmp_path / "pairs").glob(".staging-*"))


def test_degrade_params_validation():
    with pytest.raises(ValueError, match="sr_x5"):
        DegradeParams(tasks=("sr_x5",), sets=("default_train",))
    with pytest.raises(ValueError, match="unknown dataset 'Nope'.*catalogue: .*DIV2K_train"):
        DegradeParams(tasks=("sr_x2",), sets=("Nope",))
    with pytest.raises(ValueError, match="derain needs a set with rainy inputs"):
        DegradeParams(tasks=("derain",), sets=("default_train",))
    ok = DegradeParams(
        tasks=("sr_x2", "derain"), sets=("default_train",), task_sets={"derain": ("Rain100L",)}
    )
    assert ok.sets_for("derain") == ("Rain100L",) and ok.sets_for("sr_x2") == ("default_train",)
    with pytest.raises(ValueError, match=r"sets: listed twice: \['default_train'\]"):
        DegradeParams(tasks=("sr_x2",), sets=("default_train", "default_train"))
    with pytest.raises(ValueError, match="car_q0"):
        DegradeParams(tasks=("car_q0",), sets=("default_train",))


@pytest.mark.integration
def test_degrade_stage_cli(tmp_path):
    _hr_tree(tmp_path / "data")
    write_params(
        tmp_path / "params.yaml",
        degrade={"tasks": ["sr_x2"], "sets": ["default_test"], "workers": 1, "bogus": 1},
    )
    run = subprocess.run(
        [sys.executable, str(ROOT / "stages/degrade.py"), "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode != 0 and "degrade.bogus" in run.stderr
    write_params(  # runs train on default_test here: only it is degraded
        tmp_path / "params.yaml",
        degrade={"tasks": ["sr_x2"], "sets": ["default_test"], "workers": 1},
        train={"train_set": "default_test"},
        evaluate={"sets": ["default_test"]},
        report={"sets": ["default_test"]},
    )
    run = subprocess.run(
        [sys.executable, str(ROOT / "stages/degrade.py"), "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "data/pairs/sr_x2/default_test/lq/c.png").is_file()
