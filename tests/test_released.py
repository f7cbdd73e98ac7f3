"""Released checkpoints through the real pipeline: `dvc repro` with a `released:` section
evaluates, analyses and reports BasicSR-format checkpoints without training anything, and
its PSNR equals a direct computation of the authors' test protocol."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from iln import tracking
from iln.config.layout import check_run_name
from iln.config.params import ParamsError, ReleasedSpec, load_params
from iln.models import build_model, load_official_checkpoint, to_official_state_dict
from iln.report import RunInfo
from iln.weights.released import (
    CATALOGUE,
    DRIVE_FOLDER,
    ReleasedWeightsError,
    load_released,
    open_released,
    pin_weights,
    verify_weights,
)
from iln.weights.subject import Subject
from tests.helpers import ROOT, write_params
from tests.stage_project import stage_runs
from tests.test_pipeline import _run, copy_project_files

ENTRIES = {  # name: (arch, norm, key the pipeline loads); one entry keeps the test fast
    "tiny_ln": ("hat_tiny", "ln", "params_ema"),
}


def _model(arch: str, norm: str, seed: int) -> torch.nn.Module:
    return build_model(arch, norm=norm, scale=2, generator=torch.Generator().manual_seed(seed))


def _write_basicsr(path: Path, params: torch.nn.Module, ema: torch.nn.Module) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"params": to_official_state_dict(params), "params_ema": to_official_state_dict(ema)},
        path,
    )


def _protocol_psnr(model: torch.nn.Module, lq_dir: Path, gt_dir: Path, scale: int) -> float:
    """The authors' test protocol in a few lines: reflect-pad the whole LR image at the
    bottom/right to a multiple of the window, forward, crop, clamp, round to uint8, Y
    (BT.601), crop `scale` pixels per border, PSNR; mean over the set."""
    window = model.window_size
    values = []
    model.eval()
    for gt_path in sorted(gt_dir.glob("*.png")):
        lq = np.asarray(Image.open(lq_dir / gt_path.name).convert("RGB"))
        gt = np.asarray(Image.open(gt_path).convert("RGB")).astype(np.float64)
        x = torch.from_numpy(lq.copy()).permute(2, 0, 1)[None].float() / 255.0
        h, w = x.shape[2:]
        x = F.pad(x, (0, -w % window, 0, -h % window), mode="reflect")
        with torch.no_grad():
            y = model(x)[:, :, : h * scale, : w * scale]
        out = (y[0].clamp(0, 1) * 255.0).round().permute(1, 2, 0).numpy().astype(np.uint8)

        def luma(img: np.ndarray) -> np.ndarray:
            img = img.astype(np.float64)
            return (
                16.0 + (65.481 * img[..., 0] + 128.553 * img[..., 1] + 24.966 * img[..., 2]) / 255
            )

        diff = (luma(out) - luma(gt))[scale:-scale, scale:-scale]
        values.append(10 * np.log10(255.0**2 / np.mean(diff**2)))
    return float(np.mean(values))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project whose params declare two released entries and no run."""
    root = tmp_path_factory.mktemp("released")
    copy_project_files(root)
    models = {}
    for i, (name, (arch, norm, key)) in enumerate(ENTRIES.items()):
        plain, ema = _model(arch, norm, 10 + i), _model(arch, norm, 20 + i)
        _write_basicsr(root / "weights" / "released" / f"{name}.pth", plain, ema)
        models[name] = ema if key == "params_ema" else plain
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["runs"] = {}
    params["released"] = {
        name: {
            "arch": arch,
            "norm": norm,
            "task": "sr_x2",
            "weights": f"weights/released/{name}.pth",
        }
        | ({} if key == "params_ema" else {"key": key})
        for name, (arch, norm, key) in ENTRIES.items()
    }
    params["train"].update(probe_images=1, lq_patch=16)
    params["evaluate"].update(samples=1, precision_modes=["fp32", "fp16"], precision_crop=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], root)
    _run(["dvc", "repro"], root)
    return root, models


@pytest.mark.integration
def test_repro_evaluates_and_analyses_released_entries_without_training(project):
    root, _ = project
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert not [s for s in lock if s.startswith("train")]
    assert not list((root / "runs").glob("*/train"))
    for name in ENTRIES:
        for stage in ("check_released", "evaluate_released", "analyze_released"):
            assert f"{stage}@{name}" in lock
        analysis = root / "runs" / name / "analysis"
        for f in ("features.csv", "final_norm.csv", "final_norm.png", "rpb_first.png"):
            assert (analysis / f).exists(), f
        precision = json.loads((root / "runs" / name / "eval" / "precision.json").read_text())
        assert set(precision) == {"fp32", "fp16"}
        assert (root / "runs" / name / "eval" / "samples" / "sr_x2" / "default_test").is_dir()
    assert "Running stage" not in _run(["dvc", "repro"], root).stdout


@pytest.mark.integration
def test_metrics_equal_the_authors_protocol_and_name_the_weights(project):
    root, models = project
    pairs = root / "data" / "pairs" / "sr_x2" / "default_test"
    book = json.loads((root / "weights" / "checksums.json").read_text())
    for name, (_, _, key) in ENTRIES.items():
        metrics = json.loads((root / "runs" / name / "eval" / "metrics.json").read_text())
        expected = _protocol_psnr(models[name], pairs / "lq", pairs / "gt", scale=2)
        assert abs(metrics["sr_x2/default_test"]["psnr"] - expected) < 1e-6
        weights = f"weights/released/{name}.pth"
        sha = hashlib.sha256((root / weights).read_bytes()).hexdigest()
        assert metrics["released"] == {
            "file": weights,
            "sha256": sha,
            "bytes": (root / weights).stat().st_size,
            "key": key,
            "tile": 0,
            "tile_overlap": 16,
            "chunked": False,
            "precision_crop": 16,
        }
        assert book[weights]["sha256"] == sha


@pytest.mark.integration
def test_report_and_mlflow_show_the_released_entries(project):
    root, _ = project
    tables = root / "reports" / "tables"
    table = (tables / "released.md").read_text()
    report = (root / "reports" / "report.md").read_text()
    assert "## Released checkpoints" in report and "rpb_first.png" in report
    for name in ENTRIES:
        sha = json.loads((root / "runs" / name / "eval" / "metrics.json").read_text())
        weights = f"weights/released/{name}.pth"
        assert f"| {name} | " in table and f"| whole image | {weights} |" in table
        assert f"| {sha['released']['sha256'][:12]} |" in table
        assert sha["released"]["sha256"] in (tables / "released.csv").read_text()
        assert f"| {name} | group" in (tables / "released_features.md").read_text()
    assert "mean x^2" in (tables / "released_features.md").read_text()
    rows = stage_runs(root)
    stages = {(r["run"], r["stage"]): r for r in rows}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    for name in ENTRIES:
        for stage in ("evaluate", "analyze"):
            run = stages[(name, stage)]
            assert run["status"] == "FINISHED"
            assert client.get_run(run["run_id"]).data.tags["iln.released"] == "true"
    assert not [r for r in rows if r["stage"] == "train"]


@pytest.mark.integration
def test_a_missing_weights_file_stops_with_where_to_get_it(project):
    root, _ = project
    params_path = root / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["released"]["tiny_ln"]["weights"] = "weights/released/SRx4_HAT-mini_baseline.pth"
    try:
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        result = _run(["dvc", "repro"], root, check=False)
    finally:
        params_path.write_text(original)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "check_released: error: released.tiny_ln.weights:" in out
    assert "SRx4_HAT-mini_baseline.pth does not exist" in out and DRIVE_FOLDER in out


# ---------------------------------------------------------------------------- library


@pytest.mark.parametrize(("arch", "norm"), [("hat_tiny", "iln"), ("swinir_tiny", "ln")])
def test_official_export_round_trips_through_the_loader(arch, norm):
    source, target = _model(arch, norm, 1), _model(arch, norm, 2)
    load_official_checkpoint(target, {"params_ema": to_official_state_dict(source)})
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key


@pytest.mark.parametrize("key", ["params", "params_ema"])
def test_key_picks_the_weights_that_are_loaded(tmp_path, key):
    plain, ema = _model("swinir_tiny", "iln", 1), _model("swinir_tiny", "iln", 2)
    _write_basicsr(tmp_path / "w.pth", plain, ema)
    loaded = load_released(tmp_path / "w.pth", arch="swinir_tiny", norm="iln", scale=2, key=key)
    expected = (plain if key == "params" else ema).state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_a_checkpoint_of_another_model_says_which_keys_differ(tmp_path):
    path = tmp_path / "ln.pth"
    _write_basicsr(path, _model("hat_tiny", "ln", 1), _model("hat_tiny", "ln", 2))
    with pytest.raises(ReleasedWeightsError) as err:
        load_released(path, arch="hat_tiny", norm="iln", scale=2)
    text = str(err.value)
    assert "missing" in text and "unexpected" in text and "norm1.gamma" in text
    with pytest.raises(
        ReleasedWeightsError, match=r"x4: checkpoint does not fit(.|\n)*upsample\.2"
    ):
        load_released(path, arch="hat_tiny", norm="ln", scale=4)


def test_the_key_must_be_in_the_file(tmp_path):
    path = tmp_path / "only_params.pth"
    torch.save({"params": to_official_state_dict(_model("hat_tiny", "ln", 1))}, path)
    with pytest.raises(ReleasedWeightsError, match="has no 'params_ema'.*set `key: params`"):
        load_released(path, arch="hat_tiny", norm="ln", scale=2)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ReleasedWeightsError, match="junk.pth: cannot be read"):
        load_released(tmp_path / "junk.pth", arch="hat_tiny", norm="ln", scale=2)


def test_sha256_is_recorded_on_first_use_and_checked_after(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"first")
    book = tmp_path / "weights" / "checksums.json"
    _, record = verify_weights("w.pth", "params_ema", root=tmp_path, book=book, where="x")
    assert record.sha256 == hashlib.sha256(b"first").hexdigest()
    assert not book.exists()  # checking records nothing: a file is pinned once it has loaded
    pin_weights(record, book=book)
    assert json.loads(book.read_text())["w.pth"]["sha256"] == record.sha256
    verify_weights("w.pth", "params_ema", root=tmp_path, book=book, where="x")
    (tmp_path / "w.pth").write_bytes(b"second")
    with pytest.raises(ReleasedWeightsError, match="was recorded for it on first use"):
        verify_weights("w.pth", "params_ema", root=tmp_path, book=book, where="x")
    with pytest.raises(FileNotFoundError, match=r"released.a.weights: .*gone.pth does not exist"):
        verify_weights("gone.pth", "params", root=tmp_path, book=book, where="released.a.weights")


def _spec(weights: str) -> ReleasedSpec:
    return ReleasedSpec(arch="hat_tiny", norm="ln", task="sr_x2", weights=weights)


def test_a_file_refused_as_cut_short_is_not_pinned_and_the_complete_one_then_loads(tmp_path):
    path = tmp_path / "weights" / "released" / "w.pth"
    _write_basicsr(path, _model("hat_tiny", "ln", 1), _model("hat_tiny", "ln", 2))
    complete = path.read_bytes()
    path.write_bytes(complete[: len(complete) // 2])  # an interrupted copy
    book = tmp_path / "weights" / "checksums.json"
    open_args = dict(root=tmp_path, book=book, device="cpu")
    with pytest.raises(ReleasedWeightsError, match="w.pth: cannot be read as a torch checkpoint"):
        open_released(_spec("weights/released/w.pth"), "a", **open_args)
    assert not book.exists()
    path.write_bytes(complete)  # the copy finished: accepted, not "replaced"
    _, record = open_released(_spec("weights/released/w.pth"), "a", **open_args)
    sha = hashlib.sha256(complete).hexdigest()
    assert record.sha256 == sha
    assert json.loads(book.read_text())["weights/released/w.pth"]["sha256"] == sha


@pytest.mark.parametrize(
    "text",
    ['{"w.pth": "deadbeef"}', '{"w.pth": {"sha256": 5}}', '{"w.pth": {"sha256": "ab", "u'],
)
def test_a_damaged_weights_book_names_the_book_and_the_check_released_stage(tmp_path, text):
    (tmp_path / "w.pth").write_bytes(b"weights")
    book = tmp_path / "weights" / "checksums.json"
    book.parent.mkdir()
    book.write_text(text)
    with pytest.raises(ReleasedWeightsError) as info:
        verify_weights("w.pth", "params_ema", root=tmp_path, book=book, where="x")
    message = str(info.value)
    assert message.startswith(f"{book}: unreadable checksum file") and "\n" not in message
    assert "the check_released stage" in message and "download" not in message
    assert book.read_text() == text  # left for the user to restore


def test_weights_outside_the_project_are_refused_naming_the_key(tmp_path):
    project = tmp_path / "project"
    (project / "weights").mkdir(parents=True)
    (tmp_path / "elsewhere.pth").write_bytes(b"not ours")
    book = project / "weights" / "checksums.json"
    for weights in ("../../../../etc/passwd", "../elsewhere.pth", str(tmp_path / "elsewhere.pth")):
        with pytest.raises(ReleasedWeightsError) as info:
            verify_weights(weights, "params", root=project, book=book, where="released.a.weights")
        assert str(info.value).startswith(f"released.a.weights: {weights!r} lies outside")
    assert not book.exists()
    (project / "weights" / "linked.pth").symlink_to(tmp_path / "elsewhere.pth")  # deliberate
    path, _ = verify_weights(
        "weights/linked.pth", "params", root=project, book=book, where="released.a.weights"
    )
    assert path.read_bytes() == b"not ours"
    absolute_inside = str(project / "weights" / "linked.pth")
    verify_weights(absolute_inside, "params", root=project, book=book, where="released.a.weights")


def test_a_folder_or_a_device_as_weights_is_one_line(tmp_path):
    (tmp_path / "weights" / "folder.pth").mkdir(parents=True)
    book = tmp_path / "weights" / "checksums.json"
    with pytest.raises(
        ReleasedWeightsError, match=r"released\.a\.weights: .*folder\.pth is a folder"
    ):
        verify_weights(
            "weights/folder.pth", "p", root=tmp_path, book=book, where="released.a.weights"
        )
    (tmp_path / "weights" / "zero.pth").symlink_to("/dev/zero")
    with pytest.raises(ReleasedWeightsError, match="zero.pth is not a regular file"):
        verify_weights("weights/zero.pth", "params", root=tmp_path, book=book, where="x")


@pytest.mark.parametrize("name", ["..", ".", "-h", "--params", ".hidden", "a/b", "x" * 101])
def test_entry_names_that_are_not_plain_folder_names_are_refused(name):
    with pytest.raises(ValueError, match=f"released.{re.escape(name)}: .* cannot be used"):
        check_run_name(name, f"released.{name}")


def test_plain_entry_names_are_accepted():
    for name in ("hat1_ln_x4", "HAT-mini.iLN", "_x", "9"):
        check_run_name(name, f"released.{name}")


@pytest.mark.integration
@pytest.mark.parametrize("name", ["..", "-h"])
def test_the_check_stage_refuses_names_that_would_escape_or_be_options(tmp_path, name):
    """`..` used to write weights.json at the project root; `-h` printed the help, exit 0."""
    path = write_params(tmp_path / "params.yaml")
    raw = yaml.safe_load(path.read_text())
    raw["released"] = {name: {"arch": "hat_tiny", "norm": "ln", "task": "sr_x2", "weights": "w"}}
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "check_released.py"), "--", name],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip() == (  # refused when the params file is read, before any work
        f"check_released: error: params.yaml: released.{name}: {name!r} cannot be used as a "
        f"name (letters, "
        f"digits, '_', '-' and '.' only, starting with a letter, digit or '_'; at most 100 "
        f"characters)"
    )
    assert "usage" not in done.stdout
    assert not list(tmp_path.rglob("weights.json"))


def test_released_stage_commands_end_options_before_the_name():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in ("check_released", "evaluate_released", "analyze_released"):
        assert stages[stage]["do"]["cmd"].endswith(" -- ${key}"), stage


def test_catalogue_lists_the_six_released_files():
    assert sorted(c.member for c in CATALOGUE.values()) == sorted(
        [
            "HAT-mini/SRx2_HAT-mini_baseline.pth",
            "HAT-mini/SRx4_HAT-mini_baseline.pth",
            "HAT-mini/SRx2_HAT-mini_iLN.pth",
            "HAT-mini/SRx4_HAT-mini_iLN.pth",
            "HAT-dagger/SRx2_HAT-dagger_iLN.pth",
            "HAT-dagger/SRx4_HAT-dagger_iLN.pth",
        ]
    )
    assert all(c.stdnorm == (c.norm == "iln") for c in CATALOGUE.values())


def test_released_params_are_checked_strictly(tmp_path):
    entry = {"arch": "hat_tiny", "norm": "ln", "task": "sr_x2", "weights": "w.pth"}
    cases = [
        ({"ln": entry}, "released.ln: the name is taken by runs.ln"),
        ({"a": entry | {"norm": "layernorm"}}, "released.a.norm: unknown norm"),
        ({"a": entry | {"task": "derain"}}, "released.a.task: expected sr_x2"),
        (
            {"a": entry | {"model": {"in_chans": 1}}},
            "released.a.model.in_chans: a grey model is scored on grey sets only",
        ),
        ({"a": entry | {"task": "sr_x4"}}, "released.a.task: 'sr_x4' is not produced"),
        ({"a": entry | {"key": "ema"}}, "released.a.key: expected one of"),
        ({"a": entry | {"model": {"embed_dm": 8}}}, "released.a.model: unknown override"),
        ({"a": entry | {"epochs": 1}}, "released.a.epochs: unknown key"),
    ]
    for released, message in cases:
        path = write_params(tmp_path / "params.yaml")
        raw = yaml.safe_load(path.read_text())
        raw["released"] = released
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(".", r"\.")):
            load_params(path)
    raw["runs"], raw["released"] = {}, {"a": entry}
    path.write_text(yaml.safe_dump(raw))
    assert load_params(path).released["a"].key == "params_ema"


def test_report_handles_runs_without_a_train_folder(tmp_path):
    """A released entry has eval/ and analysis/ but no train/: the report's other tables and
    figures read it like any run, and its section puts the paper's number beside ours."""
    from iln.analysis.final import run_final_analysis
    from iln.report import build_report
    from iln.report.paper import load_paper_numbers, paper_rows
    from iln.util.files import write_json_atomic

    runs_dir, out = tmp_path / "runs", tmp_path / "reports"
    write_json_atomic(
        runs_dir / "hat1_ln_x4" / "eval" / "metrics.json",
        {
            "sr_x4/Set14": {"psnr": 28.8, "ssim": 0.79},
            "released": {"file": "w.pth", "sha256": "ab" * 32, "key": "params_ema", "tile": 64},
        },
    )
    write_json_atomic(
        runs_dir / "hat1_ln_x4" / "eval" / "precision.json",
        {"fp16": {"Set14": {"psnr": None, "overflow": True}}},
    )
    run_final_analysis(
        _model("hat_tiny", "ln", 0), torch.rand(1, 3, 16, 16), runs_dir / "hat1_ln_x4" / "analysis"
    )
    entry = {"arch": "hat_1", "norm": "ln", "task": "sr_x4", "stdnorm": False, "weights": "w.pth"}
    subject = Subject("hat1_ln_x4", "released", ReleasedSpec(**entry))
    released = {"hat1_ln_x4": RunInfo.from_subject(subject, load_params(ROOT / "params.yaml"))}
    build_report(released, runs_dir, out, scale_note="test", released=released)
    report = (out / "report.md").read_text()
    table = (out / "tables" / "released.md").read_text()
    (paper,) = paper_rows(load_paper_numbers(), "table1", norm="ln", set="Set14")
    assert (
        f"| hat_1 LN x4 no stdnorm / Set14 | hat1_ln_x4 | {paper['psnr']:g} | 28.80 | "
        f"{paper['ssim']:g} | 0.7900 | tiled (64 px LR tiles, 0 overlap) | w.pth | "
        f"{'ab' * 6} |"
    ) in table
    csv_text = (out / "tables" / "released.csv").read_text()
    assert f"SSIM,{paper['ssim']:g},0.79,hat1_ln_x4" in csv_text
    assert "ab" * 32 in csv_text  # the full SHA-256
    precision = (out / "tables" / "released_precision.md").read_text()
    assert "| hat_1 LN x4 no stdnorm / fp16 | hat1_ln_x4 | – | yes |" in precision  # overflow
    features = (out / "tables" / "released_features.md").read_text()
    assert "| hat_1 LN x4 no stdnorm | hat1_ln_x4 | group" in features and "mean x^2" in features
    assert "hat1_ln_x4: hat_1 LN sr_x4" in report  # the all-runs table read it too
    assert "../runs/hat1_ln_x4/analysis/final_norm.png" in report
