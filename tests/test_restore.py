"""`iln restore`: one's own images through a trained or released model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iln.__main__ import main
from iln.data.io import read_rgb, write_png
from iln.evaluate import restore
from iln.models import build_model, to_official_state_dict
from iln.restore import fp16_warning, load_model
from iln.weights import save_trained
from tests.helpers import ROOT, write_params


def _model(norm: str, seed: int = 0) -> torch.nn.Module:
    return build_model(
        "hat_tiny", norm=norm, scale=2, generator=torch.Generator().manual_seed(seed)
    )


def _images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(folder / f"img{i}.png")
        write_png(paths[-1], rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return paths


def _env() -> dict[str, str]:
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
        "PYTHONPATH": str(ROOT / "src"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "OMP_NUM_THREADS": "1",
        "HOME": os.environ.get("HOME", "/tmp"),
    }


@pytest.mark.integration
def test_restore_gives_the_evaluate_stage_samples_pixel_for_pixel(tmp_path):
    pairs = tmp_path / "data" / "pairs" / "sr_x2" / "default_test"
    lq = _images(pairs / "lq", [(21, 19), (16, 24)])
    _images(pairs / "gt", [(42, 38), (32, 48)], seed=1)
    model = _model("iln")
    save_trained(
        tmp_path / "runs" / "iln" / "train" / "model.pt",
        model,
        arch="hat_tiny",
        norm="iln",
        scale=2,
        overrides={},
    )
    write_params(
        tmp_path / "params.yaml",
        runs={"iln": {"arch": "hat_tiny", "norm": "iln", "task": "sr_x2"}},
        evaluate={"samples": 2, "precision_modes": [], "device": "cpu"},
    )
    for command in (
        [str(ROOT / "stages" / "evaluate.py"), "iln"],
        ["-m", "iln", "restore", "runs/iln/train/model.pt", str(pairs / "lq"), "out"],
    ):
        done = subprocess.run(
            [sys.executable, *command], cwd=tmp_path, env=_env(), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
    samples = tmp_path / "runs" / "iln" / "eval" / "samples" / "sr_x2" / "default_test"
    for path in lq:
        ours = read_rgb(tmp_path / "out" / path.name)
        assert ours.shape == (2 * 21, 2 * 19, 3) or ours.shape == (32, 48, 3)
        assert np.array_equal(ours, read_rgb(samples / path.name)), path.name


def test_a_corrupt_file_is_reported_by_name_and_the_others_are_written(tmp_path, capsys):
    model = _model("ln")
    save_trained(tmp_path / "model.pt", model, arch="hat_tiny", norm="ln", scale=2, overrides={})
    good = _images(tmp_path / "in", [(12, 10), (9, 17)])
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    code = main(
        ["restore", str(tmp_path / "model.pt"), str(tmp_path / "in"), str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.png" in err and "1 of 3 images failed" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0.png", "img1.png"]
    for path in good:
        expected = restore(model, read_rgb(path), device="cpu")
        assert np.array_equal(read_rgb(tmp_path / "out" / path.name), expected)


def test_basicsr_checkpoints_need_the_architecture(tmp_path, capsys):
    model = _model("iln", seed=3)
    torch.save({"params_ema": to_official_state_dict(model)}, tmp_path / "w.pth")
    (image,) = _images(tmp_path, [(10, 14)])
    code = main(["restore", str(tmp_path / "w.pth"), str(image), str(tmp_path / "o.png")])
    assert code == 2 and "give --arch, --norm, --scale" in capsys.readouterr().err
    args = ["--arch", "hat_tiny", "--norm", "iln", "--scale", "2", "--stdnorm", "true"]
    code = main(["restore", str(tmp_path / "w.pth"), str(image), str(tmp_path / "o.png"), *args])
    assert code == 0
    expected = restore(model, read_rgb(image), device="cpu")
    assert np.array_equal(read_rgb(tmp_path / "o.png"), expected)
    code = main(["restore", str(tmp_path / "w.pth"), str(image), str(tmp_path / "p.png"), "--arch",
                 "hat_tiny", "--norm", "ln", "--scale", "2"])  # fmt: skip
    assert code == 2 and "unexpected" in capsys.readouterr().err


def test_fp16_warns_for_per_token_norms_only(tmp_path, capsys):
    assert "per-token ln" in fp16_warning(_model("ln"), "fp16")
    assert fp16_warning(_model("iln"), "fp16") is None
    assert fp16_warning(_model("ln"), "bf16") is None
    save_trained(tmp_path / "m.pt", _model("ln"), arch="hat_tiny", norm="ln", scale=2, overrides={})
    (image,) = _images(tmp_path, [(8, 8)])
    assert main(["restore", str(tmp_path / "m.pt"), str(image), str(tmp_path / "o"),
                 "--precision", "bf16"]) == 0  # fmt: skip
    assert read_rgb(tmp_path / "o" / image.name).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="records its own architecture"):
        load_model(tmp_path / "m.pt", device="cpu", arch="hat_tiny")
