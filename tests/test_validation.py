"""Bad input is refused before any work, in one line naming the dotted params key or the file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from iln.cli.stage import run_stage
from iln.config.params import ParamsError, load_params
from iln.data.io import write_png
from iln.data.pairs import make_pairs
from iln.data.params import DegradeParams
from iln.data.prepare import Sources, prepare_sets
from iln.util.device import resolve_device

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path, key: str, value) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.seed", -1, "train.seed: must be >= 0, got -1"),
        ("runs.ln.seed", -2, "runs.ln.seed: must be >= 0, got -2"),
        ("degrade.seed", -1, "degrade: seed: must be >= 0"),
        ("train.threads", -1, "train.threads: must be >= 0"),
        ("train.num_workers", -1, "train.num_workers: must be >= 0"),
        ("train.betas", [1.0, 0.99], r"train.betas[0]: must be in [0, 1), got 1.0"),
        ("train.betas", [0.9, -0.1], r"train.betas[1]: must be in [0, 1), got -0.1"),
        ("train.lr_gamma", -0.5, "train.lr_gamma: must be > 0"),
        ("train.lr_gamma", 0.0, "train.lr_gamma: must be > 0"),
        ("tracking.experiment", "", "tracking.experiment: must be a non-empty name"),
        (
            "train.train_set",
            "Set5",
            "train.train_set: sr_x2 trains on the degrade stage's pairs of 'Set5'",
        ),
        ("evaluate.sets", ["B100"], "evaluate.sets: 'B100' is not a set the degrade stage"),
        ("report.sets", ["Urban100"], "report.sets: 'Urban100' is not evaluated"),
        ("runs.ln.task", KeyError, "runs.ln.task: missing required key"),
        ("train.grad_clip", float("nan"), "train.grad_clip: expected a finite number, got nan"),
        ("train.lr_gamma", float("nan"), "train.lr_gamma: expected a finite number, got nan"),
        ("train.lr", float("inf"), "train.lr: expected a finite number, got inf"),
        ("runs.ln.lr", float("-inf"), "runs.ln.lr: expected a finite number, got -inf"),
        ("train.lr", 10**400, "train.lr: expected a finite number"),
        ("train.seed", 2**70, "train.seed: must be between -2**63 and 2**63 - 1"),
        ("degrade.seed", 2**63, "degrade.seed: must be between -2**63 and 2**63 - 1"),
        ("train.threads", 100_000, "train.threads: must be <= 8 (4 x the 2 cores"),
        ("train.num_workers", 9, "train.num_workers: must be <= 8"),
        ("degrade.workers", 9, "degrade.workers: must be <= 8"),
        ("runs.ln.task", "sr_x9", "runs.ln.task: SR scale must be one of (2, 3, 4)"),
        ("runs.ln.task", "colour", "runs.ln.task: unknown task 'colour'"),
        ("runs.ln.model", {"embed_dim": -1}, "runs.ln.model: embed_dim -1 must be a positive"),
        ("runs.ln.model", {"embed_dim": 33}, "runs.ln.model: embed_dim 33 must be a positive"),
        ("runs.ln.model", {"depth": 2}, "runs.ln.model: unknown override 'depth'"),
        ("evaluate.tile", 7, "evaluate.tile: must be 0 (whole images) or a multiple of the window"),
    ],
)
def test_bad_params_name_the_key(tmp_path, key, value, message):
    with pytest.raises(ParamsError) as info:
        load_params(_params(tmp_path, key, value), cores=2)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_tile_overlap_past_the_tile_is_refused_at_load(tmp_path):
    path = _params(tmp_path, "evaluate.tile", 32)
    path.write_text(path.read_text().replace("tile_overlap: 16", "tile_overlap: 32"))
    with pytest.raises(ParamsError, match=r"evaluate.tile_overlap: must be < evaluate.tile=32"):
        load_params(path)
    path.write_text(path.read_text().replace("tile_overlap: 32", "tile_overlap: 8"))
    assert load_params(path).evaluate.tile == 32  # a multiple of hat_tiny's window 8


@pytest.mark.parametrize(
    "init, message",
    [
        ({"run": "ln"}, None),  # ln is declared before iln
        ({"weights": "w.pth", "key": "params"}, None),
        ({}, "runs.iln.init: give exactly one of run (a run name) or weights"),
        ({"run": "ln", "weights": "w.pth"}, "runs.iln.init: give exactly one of run"),
        ({"weights": " "}, "runs.iln.init.weights: give the path of the checkpoint file"),
        ({"run": "nope"}, "runs.iln.init.run: no such run 'nope' (declared runs: "),
        ({"run": "iln"}, "runs.iln.init.run: the inits loop (iln -> iln)"),
        ({"run": "ln_star"}, "runs.iln.init.run: declare ln_star before iln under runs:"),
    ],
)
def test_an_init_names_one_source_declared_before_the_run(tmp_path, init, message):
    """Every init source is declared before its run, so no chain of inits loops back."""
    path = _params(tmp_path, "runs.iln.init", init)
    if message is None:
        assert load_params(path).runs["iln"].init is not None
        return
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_run_override_is_named_as_the_runs_key(tmp_path):
    for key, value, message in [
        ("runs.ln.lr", 0.0, "runs.ln.lr: must be > 0, got 0.0"),
        ("runs.ln.iterations", 0, "runs.ln.iterations: must be >= 1, got 0"),
        ("runs.ln.milestones", [5, 2], "runs.ln.milestones: must be increasing, got [5, 2]"),
    ]:
        with pytest.raises(ParamsError, match=re.escape(message)):
            load_params(_params(tmp_path, key, value))


def _duplicated_lr(tmp_path) -> Path:
    text = (ROOT / "params.yaml").read_text()
    first = next(line for line in text.splitlines() if line.startswith("  lr: "))
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(first, f"{first}\n  lr: 1", 1))
    return path


def test_a_duplicate_key_names_the_file_the_dotted_key_and_both_lines(tmp_path):
    path = _duplicated_lr(tmp_path)
    line = path.read_text().splitlines().index("  lr: 1") + 1
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value) == (
        f"{path}:{line}: train.lr: duplicate key (first given at line {line - 1}); keep one"
    )


def test_a_duplicate_run_and_an_alias_bomb_are_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("runs:\n  ln: {arch: hat_tiny}\n  iln: {}\n  ln: {arch: hat_tiny}\n")
    with pytest.raises(
        ParamsError, match=r"params.yaml:4: runs.ln: duplicate key \(first given at"
    ):
        load_params(path)
    rows = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]
    path.write_text("\n".join(rows) + "\n")  # 10**6 values from 60 written
    with pytest.raises(ParamsError, match=r"more than 100000 values once its aliases"):
        load_params(path)


def test_the_machine_bounds_threads_by_its_cores(tmp_path):
    path = _params(tmp_path, "train.threads", 64)
    assert load_params(path, cores=16).train.threads == 64
    with pytest.raises(ParamsError, match=r"train.threads: must be <= 32 \(4 x the 8 cores"):
        load_params(path, cores=8)


@pytest.mark.parametrize(
    "stage, edit, message",
    [
        ("train", ("train.grad_clip", float("nan")), "train.grad_clip: expected a finite number"),
        ("train", ("train.lr_gamma", float("nan")), "train.lr_gamma: expected a finite number"),
        ("download", ("data.extract.max_gib", float("inf")), "data.extract.max_gib: expected a"),
        ("train", None, "train.lr: duplicate key (first given at line"),
    ],
)
def test_non_finite_numbers_and_duplicate_keys_through_a_stage_process(
    tmp_path, stage, edit, message
):
    params = _params(tmp_path, *edit) if edit else _duplicated_lr(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, str(ROOT / f"stages/{stage}.py"), *(["ln"] if stage == "train" else [])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{stage}: error: {params.name}")
    assert message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no work done


def test_cuda_without_a_gpu_names_the_key():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match=r"^evaluate.device: 'cuda' but no CUDA device"):
        resolve_device("cuda", key="evaluate.device")


@pytest.mark.parametrize("error", [ValueError("a\nb"), RuntimeError("c"), OSError(28, "full")])
def test_library_errors_end_in_one_line_not_a_traceback(capsys, monkeypatch, error):
    monkeypatch.delenv("ILN_TRACEBACK", raising=False)

    def main():
        raise error

    assert run_stage("train", main) == 1
    err = capsys.readouterr().err
    assert err.startswith("train: error: ") and err.count("\n") == 1


@pytest.mark.integration
def test_bad_params_through_a_stage_process_are_one_line(tmp_path):
    params = _params(tmp_path, "train.seed", -1)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages/train.py"), "ln", "--params", str(params)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"train: error: {params}: train.seed: must be >= 0, got -1"
    ]
    assert not (tmp_path / "mlflow.db").exists()  # failed before any work


def test_a_1x1_image_is_named(tmp_path):
    hr = tmp_path / "hr"
    write_png(hr / "default_train" / "ok.png", np.zeros((16, 16, 3), np.uint8))
    write_png(hr / "default_train" / "dot.png", np.zeros((1, 1, 3), np.uint8))
    params = DegradeParams(tasks=("sr_x2",), sets=("default_train",), workers=1)
    with pytest.raises(ValueError, match=r"default_train/dot\.png: image of size 1x1"):
        make_pairs(params, hr, tmp_path / "pairs", progress=False, log=lambda _: None)


def test_an_image_beside_its_namesake_is_named_with_both(tmp_path):
    local = tmp_path / "mine"
    local.mkdir()
    for name in ("x.png", "x.jpg", "y.png", "z.png", "w.png", "v.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(local / name)
    sources = Sources(
        embedded_dir=tmp_path / "default",
        download_dir=tmp_path / "downloads",
        checksum_file=tmp_path / "checksums.json",
        local={"Set5": local},
    )
    with pytest.raises(ValueError, match=r"Set5: x\.jpg and x\.png in .*mine would both"):
        prepare_sets(
            ["Set5"], tmp_path / "hr", sources, workers=1, progress=False, log=lambda _: None
        )
