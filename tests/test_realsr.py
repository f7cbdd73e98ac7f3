"""Real-world SR (realsr_x4): the second-order degradation is a pure function of its generator,
keeps LR = HR / 4, differs across samples; its kernels on known values; the degrade stage's
test pairs and the on-the-fly training patches; the params section and its errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from iln.config.params import ParamsError, load_params, resolve_run
from iln.data.dataset import TrainPatches, training_patches
from iln.data.degrade import noise_rng
from iln.data.io import read_rgb, write_png
from iln.data.pairs import make_pairs
from iln.data.params import DegradeParams, RealSROrder, RealSRParams, parse_task
from iln.data.realsr import (
    add_poisson_noise,
    bivariate_kernel,
    degrade_realsr,
    random_blur_kernel,
    sinc_kernel,
)
from iln.config.layout import Layout
from iln.evaluation.protocols import protocol_for
from iln.report.tables import task_name
from tests.helpers import ROOT, write_params

DEFAULTS = RealSRParams()


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 90 * np.sin(x / 7 + c) * np.cos(y / 11 - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- the degradation


def test_degradation_is_a_pure_function_of_the_generator_and_keeps_lr_a_quarter():
    gt = _photo(52, 68)  # sides multiples of 4, not of any window
    a = degrade_realsr(gt, 4, DEFAULTS, np.random.default_rng([5, 11]))
    b = degrade_realsr(gt, 4, DEFAULTS, np.random.default_rng([5, 11]))
    assert a.dtype == np.uint8 and a.shape == (13, 17, 3)
    assert np.array_equal(a, b)
    outputs = [degrade_realsr(gt, 4, DEFAULTS, np.random.default_rng([5, k])) for k in range(6)]
    assert len({o.tobytes() for o in outputs}) == 6  # every index draws its own degradation
    assert all(o.shape == (13, 17, 3) for o in outputs)


def test_degradation_rejects_a_size_that_is_not_a_multiple_of_the_scale():
    with pytest.raises(ValueError, match="52x66 is not a multiple of the scale 4"):
        degrade_realsr(_photo(52, 66), 4, DEFAULTS, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        degrade_realsr(_photo(8, 8).astype(np.float32), 4, DEFAULTS, np.random.default_rng(0))


def test_degradation_survives_the_smallest_sizes_the_ranges_allow():
    # first-order factor 0.15 on 16 px leaves 2 px: a 21 x 21 kernel with reflected borders
    shrink = dataclasses.replace(
        DEFAULTS.first, resize_prob=(0.0, 1.0, 0.0), resize_range=(0.15, 1.0)
    )
    params = dataclasses.replace(DEFAULTS, first=shrink)
    for k in range(5):
        out = degrade_realsr(_photo(16, 16), 4, params, np.random.default_rng(k))
        assert out.shape == (4, 4, 3)


def test_gaussian_kernels_on_known_values():
    size, sigma = 21, 2.0
    iso = bivariate_kernel("gaussian", size, sigma, sigma, 0.0)
    ax = np.arange(size) - 10
    g = np.exp(-(ax**2) / (2 * sigma**2))
    np.testing.assert_allclose(iso, np.outer(g, g) / np.outer(g, g).sum(), rtol=1e-12, atol=0)
    # beta = 1: the generalised Gaussian is the Gaussian
    np.testing.assert_allclose(
        bivariate_kernel("generalized", size, 1.5, 3.0, 0.7, beta=1.0),
        bivariate_kernel("gaussian", size, 1.5, 3.0, 0.7),
        rtol=1e-12,
        atol=0,
    )
    # anisotropic: sigma_x along x at theta 0, along y at theta pi/2
    wide = bivariate_kernel("gaussian", size, 3.0, 1.0, 0.0)
    np.testing.assert_allclose(bivariate_kernel("gaussian", size, 3.0, 1.0, np.pi / 2), wide.T)
    assert wide[10, 13] > wide[13, 10]  # [row y, column x]: wider along x
    plateau = bivariate_kernel("plateau", size, 2.0, 2.0, 0.0, beta=2.0)
    d = (ax[None, :] ** 2 + ax[:, None] ** 2) / 4.0
    np.testing.assert_allclose(plateau, (1 / (1 + d**2)) / (1 / (1 + d**2)).sum(), rtol=1e-12)
    for k in (iso, wide, plateau):
        assert k.sum() == pytest.approx(1.0)


def test_sinc_kernel_is_a_normalised_radial_low_pass():
    k = sinc_kernel(21, np.pi / 2)
    assert k.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(k, k.T, atol=1e-15)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)
    response = np.abs(np.fft.fft2(k, (64, 64)))
    assert response[0, 0] == pytest.approx(1.0)
    assert response[0, 32] < 0.1  # the Nyquist frequency is stopped at a cut-off of pi / 2


def test_random_kernels_are_padded_to_the_kernel_size_and_follow_the_list():
    only_iso = RealSROrder(kernel_list=("iso",), kernel_prob=(1.0,), sinc_prob=0.0)
    for k in range(10):
        kernel = random_blur_kernel(only_iso, np.random.default_rng(k))
        assert kernel.shape == (21, 21) and kernel.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(kernel, kernel.T, atol=1e-15)  # isotropic


def test_poisson_noise_is_zero_mean_and_grows_with_brightness():
    import torch

    ramp = torch.arange(256, dtype=torch.float32).div(255).expand(1, 3, 64, 256)  # 256 levels
    noise = add_poisson_noise(ramp, 1.0, False, np.random.default_rng(0)) - ramp
    dim, bright = noise[..., 64:128], noise[..., 192:]  # values ~0.25-0.5 and ~0.75-1
    assert abs(float(dim.mean())) < 2e-3
    # counts at 256 per unit: std sqrt(x / 256), ~0.037 and ~0.058 on average here
    assert 0.03 < float(dim.std()) < 0.045 and float(bright.std()) > 1.3 * float(dim.std())
    grey = add_poisson_noise(ramp, 1.0, True, np.random.default_rng(0))
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


# --------------------------------------------------------------------------- pairs and patches


def test_degrade_stage_writes_fixed_quarter_size_test_pairs(tmp_path):
    write_png(tmp_path / "hr/default_test/a.png", _photo(50, 70, seed=1))  # mod-cropped to 48x68
    write_png(tmp_path / "hr/default_test/b.png", _photo(48, 48, seed=2))
    params = DegradeParams(tasks=("realsr_x4",), sets=("default_test",), workers=1, seed=3)
    for out in ("pairs", "again"):
        manifest = make_pairs(params, tmp_path / "hr", tmp_path / out, progress=False, log=print)
    folder = tmp_path / "pairs/realsr_x4/default_test"
    lq, gt = read_rgb(folder / "lq/a.png"), read_rgb(folder / "gt/a.png")
    assert gt.shape == (48, 68, 3) and lq.shape == (12, 17, 3)
    expected = degrade_realsr(gt, 4, DEFAULTS, noise_rng(3, "realsr_x4", "a"))
    assert np.array_equal(lq, expected)  # the pair is the per-image seeded degradation
    again = read_rgb(tmp_path / "again/realsr_x4/default_test/lq/a.png")
    assert np.array_equal(lq, again)
    assert not np.array_equal(
        read_rgb(folder / "lq/b.png"),
        degrade_realsr(read_rgb(folder / "gt/b.png"), 4, DEFAULTS, noise_rng(3, "realsr_x4", "a")),
    )
    record = manifest["pairs"]["realsr_x4/default_test"]["per_image"]["a"]
    assert record["seed"] == "sha256(3|realsr_x4|a)" and record["lq"] == [12, 17]
    assert manifest["params"]["realsr"]["final_sinc_prob"] == 0.8


def test_manifest_of_tasks_without_realsr_does_not_mention_it(tmp_path):
    write_png(tmp_path / "hr/default_test/a.png", _photo(16, 16))
    params = DegradeParams(tasks=("sr_x2",), sets=("default_test",), workers=1)
    manifest = make_pairs(params, tmp_path / "hr", tmp_path / "p", progress=False, log=print)
    assert "realsr" not in manifest["params"] and "realsr" not in manifest


def test_training_patches_are_pure_in_seed_and_index_and_differ_across_indices(tmp_path):
    for i, (h, w) in enumerate([(72, 64), (81, 97)]):
        write_png(tmp_path / f"hr/img{i}.png", _photo(h, w, seed=i))

    def patches(seed: int) -> TrainPatches:
        return TrainPatches(
            tmp_path / "hr",
            None,
            scale=4,
            lq_patch=12,
            seed=seed,
            degradation="realsr_x4",
            realsr=DEFAULTS,
        )

    a, b = patches(7), patches(7)
    late = b[5]  # b draws sample 5 first, a after 0..4
    samples = [a[k] for k in range(6)]
    assert np.array_equal(samples[5]["lq"], late["lq"])
    assert np.array_equal(samples[5]["gt"], late["gt"])
    assert late["lq"].shape == (3, 12, 12) and late["gt"].shape == (3, 48, 48)
    assert len({s["lq"].tobytes() for s in samples}) == 6
    assert not np.array_equal(patches(8)[5]["lq"], late["lq"])
    with pytest.raises(ValueError, match="realsr parameters"):
        TrainPatches(tmp_path / "hr", None, scale=4, lq_patch=12, seed=0, degradation="realsr_x4")
    with pytest.raises(ValueError, match="scale=4"):
        TrainPatches(
            tmp_path / "hr",
            None,
            scale=1,
            lq_patch=12,
            seed=0,
            degradation="realsr_x4",
            realsr=DEFAULTS,
        )


def test_training_patches_of_a_realsr_run_read_the_clean_images(tmp_path):
    for i in range(2):
        write_png(tmp_path / f"data/hr/default_train/t{i}.png", _photo(64, 64, seed=i))
    layout = Layout(tmp_path)
    data = training_patches(
        "realsr_x4", "default_train", layout=layout, lq_patch=8, seed=0, realsr=DEFAULTS
    )
    assert data.scale == 4 and data.lq_files is None and len(data) == 2
    with pytest.raises(ValueError, match="degrade.realsr"):
        training_patches("realsr_x4", "default_train", layout=layout, lq_patch=8, seed=0)


# --------------------------------------------------------------------------- task and params


def test_task_name_protocol_and_scale():
    spec = parse_task("realsr_x4")
    assert (spec.kind, spec.scale) == ("realsr", 4)
    assert protocol_for("realsr_x4") == protocol_for("sr_x4")  # Y, 4 px cropped
    assert task_name("realsr_x4") == "real-world SR x4"
    with pytest.raises(ValueError, match="real-world SR scale must be one of"):
        parse_task("realsr_x2")


def test_the_default_params_declare_real_esrgan_defaults_but_no_realsr_task():
    params = load_params(ROOT / "params.yaml")
    assert "realsr_x4" not in params.degrade.tasks
    assert params.degrade.realsr == RealSRParams()
    first, second = params.degrade.realsr.first, params.degrade.realsr.second
    assert first.resize_range == (0.15, 1.5) and second.resize_range == (0.3, 1.2)
    assert first.noise_range == (1.0, 30.0) and second.noise_range == (1.0, 25.0)
    assert first.blur_sigma == (0.2, 3.0) and second.blur_sigma == (0.2, 1.5)
    assert (first.blur_prob, second.blur_prob, params.degrade.realsr.final_sinc_prob) == (
        1.0,
        0.8,
        0.8,
    )


def test_a_realsr_run_resolves_with_its_degradation_and_trains_on_clean_images(tmp_path):
    path = write_params(
        tmp_path / "params.yaml",
        degrade={"tasks": ["sr_x2", "realsr_x4"], "task_sets": {"realsr_x4": ["default_test"]}},
    )
    raw = path.read_text().replace(
        "runs:\n", "runs:\n  real_ln:\n    arch: hat_tiny\n    norm: ln\n    task: realsr_x4\n", 1
    )
    path.write_text(raw)
    run = resolve_run(load_params(path), "real_ln")
    assert run.realsr == RealSRParams() and run.jpeg_subsampling == "yuv420" and run.scale == 4
    assert resolve_run(load_params(path), "ln").realsr is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"first": {"kernel_prob": [0.5, 0.5]}}, "degrade.realsr.first: kernel_prob: expected 6"),
        ({"second": {"resize_range": [1.2, 1.5]}}, "degrade.realsr.second: resize_range: must"),
        ({"first": {"kernel_list": ["box"]}}, "kernel_list: unknown kernel 'box'"),
        ({"final_sinc_prob": 1.5}, "degrade.realsr: final_sinc_prob: must be in [0, 1]"),
        ({"first": {"jpeg_range": [90.0, 30.0]}}, "jpeg_range: expected 1.0 <= min <= max"),
        ({"first": {"noise_range": "1e1"}}, "degrade.realsr.first.noise_range: expected a list"),
    ],
)
def test_bad_realsr_params_name_the_key(tmp_path, section, message):
    path = write_params(tmp_path / "params.yaml", degrade={"realsr": section})
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert message in str(err.value)
