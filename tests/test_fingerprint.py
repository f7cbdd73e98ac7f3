"""The resume fingerprint: trajectory settings, training pairs and code, nothing else."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from iln import tracking
from iln.config import RunSpec, TrainParams, load_params, resolve_run
from iln.data.io import write_png
from iln.fingerprint import (
    OBSERVER_KEYS,
    TRAJECTORY_KEYS,
    code_digest,
    imported_modules,
    training_fingerprint,
    tree_digest,
)
from tests.stage_project import copy_project, read_params, run_stage, summary, write_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("section, fields", [("run", RunSpec), ("train", TrainParams)])
def test_every_setting_is_classified_once(section, fields):
    """A new params key must be declared trajectory or observer (else: this test fails)."""
    names = {f.name for f in dataclasses.fields(fields)}
    trajectory, observer = set(TRAJECTORY_KEYS[section]), set(OBSERVER_KEYS[section])
    assert not trajectory & observer
    assert trajectory | observer == names


def _fingerprint(tmp_path, mutate=lambda raw: None, data="d", code="c"):
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / f"p{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = resolve_run(load_params(path), "ln")
    return training_fingerprint(run, data_digest=data, code_digest=code)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r["train"].update(probe_every=7),
        lambda r: r["train"].update(log_every=3, checkpoint_every=50),
        lambda r: r["train"].update(device="cpu", threads=1, num_workers=2, compile=True),
        lambda r: r["train"].update(iterations=1000, probe_images=1, probe_per_block=True),
        lambda r: r["runs"]["ln"].update(groups=["table1"]),
        lambda r: r["evaluate"].update(samples=0, tile=64),
        lambda r: r["report"].update(sets=[]),
    ],
)
def test_observer_settings_keep_the_fingerprint(tmp_path, mutate):
    assert _fingerprint(tmp_path, mutate) == _fingerprint(tmp_path)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r["train"].update(lr=1.0e-3),
        lambda r: r["train"].update(seed=2),
        lambda r: r["train"].update(batch_size=8),
        lambda r: r["runs"]["ln"].update(seed=5),
        lambda r: r["runs"]["ln"].update(norm="iln"),
        lambda r: r["runs"]["ln"].update(stdnorm=True),
    ],
)
def test_trajectory_settings_change_the_fingerprint(tmp_path, mutate):
    assert _fingerprint(tmp_path, mutate) != _fingerprint(tmp_path)


def test_data_and_code_change_the_fingerprint(tmp_path):
    base = _fingerprint(tmp_path)
    assert _fingerprint(tmp_path, data="other") != base
    assert _fingerprint(tmp_path, code="other") != base


def test_tree_digest_follows_names_and_bytes_not_timestamps(tmp_path):
    folder = tmp_path / "gt"
    write_png(folder / "a.png", np.zeros((4, 4, 3), np.uint8))
    first = tree_digest([folder])
    write_png(folder / "a.png", np.zeros((4, 4, 3), np.uint8))  # same bytes, new file
    assert tree_digest([folder]) == first
    write_png(folder / "b.png", np.zeros((4, 4, 3), np.uint8))
    assert tree_digest([folder]) != first
    (folder / "b.png").rename(folder / "c.png")
    third = tree_digest([folder])
    write_png(folder / "c.png", np.ones((4, 4, 3), np.uint8))
    assert tree_digest([folder]) != third


def test_imports_are_followed_through_packages_relative_and_lazy_imports(tmp_path):
    pkg = tmp_path / "src" / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .inner import f\n")
    (pkg / "sub" / "inner.py").write_text("def f():\n    from pkg import lazy\n")
    (pkg / "lazy.py").write_text("import os\n")
    (pkg / "unused.py").write_text("")
    script = tmp_path / "stage.py"
    script.write_text("from pkg.sub import f\nimport numpy\n")
    found = {p.relative_to(pkg).as_posix() for p in imported_modules(script, pkg)}
    assert found == {"__init__.py", "sub/__init__.py", "sub/inner.py", "lazy.py"}
    before = code_digest(script, pkg)
    (pkg / "unused.py").write_text("x = 1\n")
    assert code_digest(script, pkg) == before
    (pkg / "lazy.py").write_text("import sys\n")
    assert code_digest(script, pkg) != before


def test_train_stage_retrains_on_new_data_and_resumes_past_observer_changes(
    tmp_path, degraded_project
):
    """The independent check's scenario: add a training image, rerun degrade and train."""
    root = copy_project(degraded_project, tmp_path / "project")
    run_stage(root, "train", "ln")
    assert summary(root, "ln")["resumed_from"] == 0
    (first,) = tracking.find_stage_runs(root, experiment="iln", run_name="ln")

    params = read_params(root)  # probes and logs more often, new report groups: no retraining
    params["train"].update(probe_every=1, log_every=2)
    params["runs"]["ln"]["groups"] = ["table3", "table4"]
    write_params(root, params)
    run_stage(root, "train", "ln")
    assert summary(root, "ln")["resumed_from"] == 4
    (again,) = tracking.find_stage_runs(root, experiment="iln", run_name="ln")
    assert again["run_id"] == first["run_id"] and again["status"] == "FINISHED"  # continued
    assert [s for s, _ in tracking.metric_history(root, first["run_id"], "loss")] == [1, 2, 3, 4]

    train_dir = root / "data" / "hr" / "default_train"  # one more training photo
    shutil.copy(root / "data" / "default" / "test" / "chelsea.png", train_dir / "extra.png")
    run_stage(root, "degrade", "--no-progress")
    run_stage(root, "train", "ln")
    assert summary(root, "ln")["resumed_from"] == 0
    runs = tracking.find_stage_runs(root, experiment="iln", run_name="ln")
    assert len(runs) == 2  # new data, new training, new tracked run
