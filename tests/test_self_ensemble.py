"""The x8 self-ensemble (evaluate.self_ensemble): its transforms, its fixed points, its keys."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iln.data.io import read_rgb, write_png
from iln.evaluation.inference import ImageJob, model_restore_fn, restore, self_ensemble, summarise
from iln.evaluation.protocols import protocol_for


class Pointwise(nn.Module):
    """Every output pixel a function of the input pixel under it (nearest upsampling): the
    model commutes with every flip and transpose."""

    window_size, in_chans = 4, 3

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale
        self.mix = nn.Conv2d(3, 3, 1)
        torch.nn.init.normal_(self.mix.weight, std=0.5, generator=torch.Generator().manual_seed(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        y = torch.sigmoid(self.mix(x))
        return F.interpolate(y, scale_factor=self.scale, mode="nearest")


class Identity(nn.Module):
    scale, window_size, in_chans = 1, 4, 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Skewed(nn.Module):
    """A 3x3 convolution with random (not symmetric) weights and a pixel shuffle: no flip or
    transpose leaves it unchanged."""

    window_size, in_chans = 4, 3

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale
        g = torch.Generator().manual_seed(5)
        self.conv = nn.Conv2d(3, 3 * scale * scale, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, std=0.3, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.pixel_shuffle(self.conv(x), self.scale))


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_ensemble_of_an_equivariant_model_is_its_plain_output():
    model, x = Pointwise(), torch.rand(1, 3, 9, 13, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(self_ensemble(model, x), model(x), rtol=0, atol=1e-6)
    lq = _image(11, 7)
    plain = restore(model, lq, device="cpu")
    assert np.array_equal(restore(model, lq, device="cpu", ensemble=True), plain)


def test_ensemble_of_the_identity_is_the_identity():
    lq = _image(10, 15, seed=2)
    assert np.array_equal(restore(Identity(), lq, device="cpu", ensemble=True), lq)


def test_ensemble_is_the_mean_of_the_eight_back_transformed_outputs():
    """Checked against the dihedral group written another way (numpy rotations of the HWC
    image, each undone by the opposite rotation)."""
    model, lq = Skewed(), _image(9, 14, seed=4)

    def run(img: np.ndarray) -> np.ndarray:  # (H, W, 3) float in [0, 1] -> (sH, sW, 3)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            return model(x)[0].permute(1, 2, 0).double().numpy()

    img = lq.astype(np.float64) / 255.0
    outputs = []
    for flip in (False, True):
        base = img[:, ::-1] if flip else img
        for k in range(4):
            y = np.rot90(run(np.rot90(base, k)), -k)
            outputs.append(y[:, ::-1] if flip else y)
    expected = np.mean(outputs, axis=0)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        got = self_ensemble(model, x)[0].permute(1, 2, 0).double().numpy()
    assert got.shape == (18, 28, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        plain = model(x)[0].permute(1, 2, 0).double().numpy()
    assert np.abs(got - plain).max() > 1e-2  # the model is not equivariant: the average differs


def test_image_job_reports_the_ensemble_under_its_own_keys(tmp_path):
    model = Skewed()
    lq = _image(8, 12, seed=6)
    gt = restore(model, lq, device="cpu", ensemble=True)
    write_png(tmp_path / "lq.png", lq)
    write_png(tmp_path / "gt.png", gt)
    protocol = protocol_for("sr_x2")
    restorers = {"sr_x2": model_restore_fn(model, device="cpu")}
    row, kept = ImageJob("sr_x2", "a", tmp_path / "lq.png", tmp_path / "gt.png", protocol)(
        restorers
    )
    assert kept is None and "psnr_x8" not in row
    job = ImageJob("sr_x2", "a", tmp_path / "lq.png", tmp_path / "gt.png", protocol, True, True)
    row_x8, kept = job(restorers)
    assert np.array_equal(kept, restore(model, lq, device="cpu"))  # samples: the plain output
    assert {k: row_x8[k] for k in row} == row  # the plain scores are unchanged
    x8 = protocol.score(
        restore(model, lq, device="cpu", ensemble=True), read_rgb(tmp_path / "gt.png")
    )
    assert (row_x8["psnr_x8"], row_x8["ssim_x8"]) == (x8["psnr"], x8["ssim"])
    # gt is the ensemble's output: PSNR inf, or ~330 dB where rgb_to_y's matmul rounds the
    # strided restored array and the contiguous gt differently
    assert row_x8["psnr_x8"] > 300 and row_x8["ssim_x8"] == pytest.approx(1.0)
    assert row_x8["psnr"] < 40
    summary = summarise([{**row_x8, "psnr_x8": 30.0}, {**row_x8, "psnr_x8": math.inf}])
    assert summary["psnr_x8"] == 30.0  # inf left out of the mean, as for the plain PSNR
    assert summary["ssim_x8"] == pytest.approx(1.0) and summary["psnr"] == row["psnr"]
    assert "psnr_b_x8" not in summary  # PSNR-B only where the protocol measures it


def test_image_job_ensemble_needs_a_model(tmp_path):
    write_png(tmp_path / "x.png", _image(8, 8))
    job = ImageJob(
        "derain", "x", tmp_path / "x.png", tmp_path / "x.png", protocol_for("derain"), False, True
    )
    with pytest.raises(ValueError, match="self-ensemble needs a model"):
        job({"derain": lambda lq: lq.copy()})


def test_report_shows_the_ensemble_beside_each_metric(tmp_path):
    from iln.report import build_report
    from tests.test_report import BASE, PROTOCOL, infos, make_run, md_row

    runs = infos({n: {**BASE, "norm": n, "groups": ["table3"]} for n in ("ln", "iln")})
    for norm, psnr in (("ln", 30.0), ("iln", 30.5)):
        make_run(tmp_path / "runs", norm, norm=norm, psnr=psnr, sets=("default_test",))
    metrics = tmp_path / "runs" / "iln" / "eval" / "metrics.json"
    values = json.loads(metrics.read_text())
    values["sr_x2/default_test"].update(psnr_x8=30.75, ssim_x8=0.8123)
    metrics.write_text(json.dumps(values))
    build_report(runs, tmp_path / "runs", tmp_path / "out", scale_note="test", protocol=PROTOCOL)
    header, cells = md_row(tmp_path / "out", "table3", "i-LN")
    assert cells[header.index("default_test PSNR x8 (ours)")] == "30.75"
    assert cells[header.index("default_test SSIM x8 (ours)")] == "0.8123"
    header, cells = md_row(tmp_path / "out", "table3", "LN")  # evaluated without it
    assert cells[header.index("default_test PSNR x8 (ours)")] == "–"
