"""`iln restore`: one's own images through a trained or released model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iln.cli.main import main
from iln.data.io import read_rgb, write_png
from iln.evaluation.inference import restore
from iln.models import build_model, to_official_state_dict
from iln.evaluation.batch_restore import fp16_warning, load_model
from iln.weights.trained import save_trained
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


# ----------------------------------------------------------------- faults, done for real


def _cli(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iln", "restore", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        **kwargs,
    )


def _one_error_line(stderr: str, *parts: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    for part in parts:
        assert part in lines[0], lines[0]


def _saved(tmp_path: Path, model: torch.nn.Module, name: str = "model.pt") -> Path:
    save_trained(tmp_path / name, model, arch="hat_tiny", norm="iln", scale=2, overrides={})
    return tmp_path / name


def _digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.integration
def test_restoring_a_folder_into_itself_leaves_every_original_byte_identical(tmp_path):
    model = _model("iln")
    weights = _saved(tmp_path, model)
    folder = tmp_path / "DIR"
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "a.png", "b.png"):
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / name)
    before = _digests(folder)
    done = _cli([str(weights), "DIR", "DIR"], tmp_path)
    assert done.returncode == 2
    _one_error_line(done.stderr, "DIR/b.png: the output of DIR/b.png would replace", "nothing")
    assert _digests(folder) == before  # no original touched, nothing added
    # into another folder: a.jpg and a.png share a name, so both keep their suffix
    code = main(["restore", str(weights), str(folder), str(tmp_path / "OUT")])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "OUT").iterdir()) == [
        "a.jpg.png",
        "a.png.png",
        "b.png",
    ]
    for source, out in (("a.jpg", "a.jpg.png"), ("a.png", "a.png.png"), ("b.png", "b.png")):
        expected = restore(model, read_rgb(folder / source), device="cpu")
        assert np.array_equal(read_rgb(tmp_path / "OUT" / out), expected), out
    assert _digests(folder) == before


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    model = _model("ln")
    weights = _saved(tmp_path, model)
    _images(tmp_path / "in", [(8, 8), (8, 16)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "img1.png").write_bytes(b"the user's own file")
    args = ["restore", str(weights), str(tmp_path / "in"), str(out)]
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, "img1.png: exists", "--overwrite")
    assert _digests(out) == {"img1.png": b"the user's own file"}  # img0 not computed either
    assert main([*args, "--overwrite"]) == 0
    assert read_rgb(out / "img1.png").shape == (16, 32, 3)
    assert f"2 of 2 images written to {out}" in capsys.readouterr().out


def test_one_input_and_an_image_file_name_writes_that_file(tmp_path, capsys):
    weights = _saved(tmp_path, _model("iln"))
    first, _ = _images(tmp_path / "in", [(8, 8), (8, 16)])
    assert main(["restore", str(weights), str(first), str(tmp_path / "o.jpg")]) == 0
    assert (tmp_path / "o.jpg").is_file()
    with Image.open(tmp_path / "o.jpg") as img:
        assert img.format == "JPEG" and img.size == (16, 16)
    assert f"wrote {tmp_path / 'o.jpg'}" in capsys.readouterr().out
    assert main(["restore", str(weights), str(tmp_path / "in"), str(tmp_path / "o.png")]) == 2
    _one_error_line(capsys.readouterr().err, "o.png: names one image file", "2 input images")
    assert not (tmp_path / "o.png").exists()


def test_a_read_only_output_folder_is_refused_before_any_image_is_computed(tmp_path, capsys):
    weights = _saved(tmp_path, _model("iln"))
    _images(tmp_path / "in", [(8, 8)])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    immutable = os.geteuid() == 0  # root writes through permissions: make it immutable
    if immutable and subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
        pytest.skip("running as root where chattr +i is unavailable: no read-only folder")
    try:
        with pytest.raises(OSError):
            (locked / "probe").write_bytes(b"x")
        code = main(["restore", str(weights), str(tmp_path / "in"), str(locked)])
        err = capsys.readouterr().err
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o755)
    assert code == 2
    _one_error_line(err, f"{locked}: cannot write in the output folder", "nothing was restored")
    assert "restore:" not in err.replace("iln restore:", "")  # no progress bar: no work began
    assert list(locked.iterdir()) == []


def test_a_name_of_244_characters_is_restored(tmp_path, capsys):
    """The temp file beside the output stays within the 255-byte name limit."""
    weights = _saved(tmp_path, _model("iln"))
    source = tmp_path / "in" / ("x" * 240 + ".jpg")
    source.parent.mkdir()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(source)
    assert main(["restore", str(weights), str(source.parent), str(tmp_path / "out")]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x" * 240 + ".png"]


def test_a_photo_with_exif_orientation_is_written_upright(tmp_path):
    """Orientation 6 (the camera turned clockwise): viewers turn the stored pixels 90 degrees
    clockwise; the restored PNG holds them turned, without a tag to apply."""
    model = _model("iln")
    weights = _saved(tmp_path, model)
    stored = np.random.default_rng(2).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "photo.png", exif=exif)  # PNG: lossless, so pixels compare exactly
    assert main(["restore", str(weights), str(tmp_path / "photo.png"), str(tmp_path / "o")]) == 0
    out = read_rgb(tmp_path / "o" / "photo.png")
    assert out.shape == (32, 16, 3)  # upright: 16 rows x 8 columns, doubled
    expected = restore(model, np.ascontiguousarray(np.rot90(stored, -1)), device="cpu")
    assert np.array_equal(out, expected)
    with Image.open(tmp_path / "o" / "photo.png") as written:
        assert written.getexif().get(0x0112) is None


@pytest.mark.integration
def test_threads_outside_the_machine_range_are_one_line(tmp_path, capsys):
    weights = _saved(tmp_path, _model("iln"))
    _images(tmp_path / "in", [(8, 8)])
    done = _cli([str(weights), "in", "out", "--threads", "-1"], tmp_path)
    assert done.returncode == 2, done.stderr
    _one_error_line(done.stderr, "argument --threads: expected 1 to", "got -1")
    for threads in ("100000", "0"):  # 100000 used to crash torch
        with pytest.raises(SystemExit) as exited:
            main(["restore", str(weights), str(tmp_path / "in"), "out", "--threads", threads])
        assert exited.value.code == 2
        _one_error_line(capsys.readouterr().err, f"cores here), got {threads}")
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_weights_full_of_nan_are_refused_and_nothing_is_written(tmp_path):
    model = _model("iln")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    weights = _saved(tmp_path, model)
    _images(tmp_path / "in", [(8, 8)])
    done = _cli([str(weights), "in", "out"], tmp_path)
    assert done.returncode == 2
    _one_error_line(done.stderr, "model.pt:", "NaN or infinite", "cannot restore anything")
    assert not (tmp_path / "out").exists()


def test_basicsr_weights_with_inf_are_refused(tmp_path, capsys):
    state = to_official_state_dict(_model("iln"))
    state["conv_first.weight"][0] = float("inf")
    torch.save({"params_ema": state}, tmp_path / "w.pth")
    (image,) = _images(tmp_path, [(8, 8)])
    code = main(["restore", str(tmp_path / "w.pth"), str(image), str(tmp_path / "o"),
                 "--arch", "hat_tiny", "--norm", "iln", "--scale", "2"])  # fmt: skip
    assert code == 2
    _one_error_line(capsys.readouterr().err, "w.pth (params_ema): 1 of", "NaN or infinite")


def test_an_output_that_overflows_is_not_written_as_a_black_image(tmp_path, capsys):
    """Finite weights whose output is not (here a last conv filled with 3e38, as an fp16
    overflow would do): the image is reported and skipped, the exit status is 1."""
    model = _model("iln")
    with torch.no_grad():
        model.conv_last.weight.fill_(3e38)
    weights = _saved(tmp_path, model)
    _images(tmp_path / "in", [(8, 8)])
    assert main(["restore", str(weights), str(tmp_path / "in"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "img0.png: the model's output has" in err and "NaN or infinite values" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_malformed_weights_are_one_line_each(tmp_path, capsys):
    (image,) = _images(tmp_path, [(8, 8)])
    basicsr = ["--arch", "hat_tiny", "--norm", "iln", "--scale", "2"]
    torch.save({"params_ema": 3}, tmp_path / "number.pth")
    torch.save({"params_ema": [1, 2]}, tmp_path / "list.pth")
    weights = _saved(tmp_path, _model("iln"))
    blob = torch.load(weights, weights_only=True)
    torch.save({**blob, "overrides": "embed_dim=8"}, tmp_path / "overrides.pt")
    (tmp_path / "folder.pt").mkdir()
    cases = [
        (["number.pth", *basicsr], "number.pth: 'params_ema' is int"),
        (["list.pth", *basicsr], "list.pth: 'params_ema' is list"),
        (["overrides.pt"], "overrides.pt: not a trained-model file (overrides is str"),
        (["/dev/zero"], "/dev/zero: not a regular file"),
        (["folder.pt"], "folder.pt: is a folder"),
        (["model.pt", "--key", "params"], "model.pt is a model.pt of the train stage"),
    ]
    for (name, *options), message in cases:
        source = name if name.startswith("/") else str(tmp_path / name)
        code = main(["restore", source, str(image), str(tmp_path / "out"), *options])
        assert code == 2, message
        _one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_ctrl_c_ends_in_one_line_and_leaves_no_partial_file(tmp_path):
    weights = _saved(tmp_path, _model("iln"))
    _images(tmp_path / "in", [(8, 8), (160, 160), (8, 8)])
    process = subprocess.Popen(
        [sys.executable, "-m", "iln", "restore", str(weights), "in", "out"],
        cwd=tmp_path,
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
        # a runner started in the background of a script ignores SIGINT, and so would the
        # child: give it the default disposition, as a terminal does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "out" / "img0.png").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # inside the second image's forward pass
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "iln restore: interrupted; 1 of 3 images written to out/, no partial file" in stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["img0.png"]


@pytest.mark.integration
def test_an_image_too_large_for_memory_suggests_tiles(tmp_path):
    """Memory is capped for real (RLIMIT_AS, 256 MiB above what the process holds)."""
    weights = _saved(tmp_path, _model("iln"))
    Image.fromarray(np.zeros((600, 600, 3), np.uint8)).save(tmp_path / "big.png")
    script = (
        "import resource, sys\n"
        "from iln.cli.main import main\n"
        "held = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (held + (256 << 20), resource.RLIM_INFINITY))\n"
        f"sys.exit(main(['restore', {str(weights)!r}, 'big.png', 'out']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "big.png: not enough memory to restore this 600x600 image" in done.stderr
    assert "use --tile 256 (or smaller)" in done.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_tiled_progress_counts_tiles_and_the_last_line_names_the_outputs(tmp_path, capsys):
    weights = _saved(tmp_path, _model("iln"))
    _images(tmp_path / "in", [(20, 20)])
    args = ["restore", str(weights), str(tmp_path / "in"), str(tmp_path / "out")]
    assert main([*args, "--tile", "8", "--tile-overlap", "2"]) == 0
    captured = capsys.readouterr()
    assert "tile 9/9" in captured.err and "px" in captured.err  # 3 x 3 tiles of 8, stride 6
    assert captured.out.strip().splitlines()[-1] == (
        f"iln restore: 1 of 1 images written to {tmp_path / 'out'}{os.sep}"
    )
    assert main([*args, "--overwrite", "--tile", "8", "--tile-overlap", "8"]) == 2
    _one_error_line(capsys.readouterr().err, "--tile-overlap: must be < --tile=8, got 8")
    assert main([*args, "--overwrite", "--tile", "12"]) == 2
    _one_error_line(capsys.readouterr().err, "--tile: must be 0 (whole images) or a multiple")


@pytest.mark.integration
def test_a_folder_that_takes_no_more_bytes_is_refused_first_and_a_failed_write_stops(tmp_path):
    """Writes refused by the kernel for real (RLIMIT_FSIZE: a file may not grow past the
    limit, as on a full disk): 16 KiB refuses the probe before any work; 100 KiB lets the
    small first output through and stops at the second, keeping the first, leaving no temp."""
    weights = _saved(tmp_path, _model("iln"))
    _images(tmp_path / "in", [(8, 8), (128, 128), (8, 8)])  # noise: ~190 KB as a 256x256 PNG
    script = (
        "import resource, sys\n"
        "from iln.cli.main import main\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.RLIM_INFINITY))\n"
        f"assert main(['restore', {str(weights)!r}, 'in', 'out']) == 2\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100 << 10, resource.RLIM_INFINITY))\n"
        f"sys.exit(main(['restore', {str(weights)!r}, 'in', 'out']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    first, second = [line for line in done.stderr.splitlines() if "error:" in line]
    assert "out: cannot write in the output folder (File too large); nothing was restored" in first
    assert second.endswith(
        "out/img1.png: File too large; stopped: 1 of 3 images written to out/"
    ), second
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["img0.png"]
