"""The resume fingerprint: trajectory settings, training pairs and code, nothing else."""

from __future__ import annotations

import ast
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from iln.config.params import RunSpec, TrainParams, load_params, resolve_run
from iln.data.io import write_png
from iln.training.fingerprint import (
    OBSERVER_KEYS,
    TRAINING_PACKAGES,
    TRAJECTORY_KEYS,
    code_digest,
    statement_meanings,
    training_files,
    training_fingerprint,
    tree_digest,
)
from tests.stage_project import (
    copy_project,
    metric_steps,
    read_params,
    run_stage,
    stage_env,
    stage_runs,
    summary,
    write_params,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "iln"
TRAIN_STAGE = ROOT / "stages" / "train.py"


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


def test_moving_a_definition_between_modules_keeps_the_digest(tmp_path):
    """Code that computes the same, wherever it lives, names the same trajectory."""
    pkg = tmp_path / "src" / "iln"
    for name in TRAINING_PACKAGES:
        (pkg / name).mkdir(parents=True)
        (pkg / name / "__init__.py").write_text("")
    (pkg / "report").mkdir()
    (pkg / "models" / "a.py").write_text("import os\n\nSCALE = 2\n\n\ndef f(x):\n    return x\n")
    (pkg / "models" / "b.py").write_text("def g(x):\n    return x * SCALE\n")
    script = tmp_path / "stage.py"
    script.write_text("def main():\n    return 0\n")
    before = code_digest(script, pkg)
    (pkg / "models" / "a.py").write_text("SCALE = 2\n")  # f moves to another package
    (pkg / "training" / "c.py").write_text(
        "from iln.models.a import SCALE\n\n\ndef f(x):\n    return x\n"
    )
    (pkg / "report" / "r.py").write_text("COLOUR = 'red'\n")  # off the training path
    assert code_digest(script, pkg) == before
    (pkg / "models" / "b.py").write_text("def g(x):\n    return x / SCALE\n")
    assert code_digest(script, pkg) != before


SOURCE = '''"""A module."""
SCALE = 1e-4  # the branch scale


class Block:
    """A block."""

    def forward(self, x):
        "Scaled input."
        return x * SCALE
'''


@pytest.mark.parametrize(
    "edited",
    [
        SOURCE.replace("# the branch scale", "# the branch scale, as LayerScale has it"),
        SOURCE.replace('"""A block."""', '"""A block.\n\n    Longer now."""'),
        SOURCE.replace('"Scaled input."', "pass"),
        SOURCE.replace('"""A module."""\n', "# no docstring\n\n"),
        SOURCE.replace(
            "return x * SCALE", "return (\n            x\n            * SCALE\n        )"
        ),
    ],
    ids=["comment", "docstring", "pass", "module-docstring", "layout"],
)
def test_comments_docstrings_and_layout_keep_the_meaning(edited):
    assert edited != SOURCE
    assert statement_meanings(edited) == statement_meanings(SOURCE)


@pytest.mark.parametrize(
    "edited",
    [
        SOURCE.replace("SCALE = 1e-4", "SCALE = 2e-4"),
        SOURCE.replace("x * SCALE", "x / SCALE"),
        SOURCE.replace("def forward(self, x)", "def forward(self, y)").replace("x *", "y *"),
        SOURCE.replace('"Scaled input."', '"Scaled input."\n        x = x + 0'),
    ],
    ids=["constant", "expression", "name", "statement"],
)
def test_a_changed_constant_expression_or_statement_changes_the_meaning(edited):
    assert statement_meanings(edited) != statement_meanings(SOURCE)


def test_the_training_path_holds_models_data_loss_and_loop_and_nothing_that_records():
    on_path = {p.relative_to(PACKAGE).as_posix() for p in training_files(PACKAGE)}
    for needed in (
        "models/norms.py",
        "models/hat.py",
        "models/fast.py",
        "data/dataset.py",
        "training/loop.py",
        "training/kld.py",
        "config/params.py",
        "weights/warm_start.py",
    ):
        assert needed in on_path
    for recording in ("tracking.py", "figures/styles.py", "evaluation/monitor.py", "report/"):
        assert not any(name.startswith(recording) for name in on_path)


def test_no_module_on_the_training_path_imports_code_off_it():
    """Code the training path runs must count in the digest: it may import nothing from the
    packages left out of it (the monitor, tracking, colours, the report)."""
    on_path = set(TRAINING_PACKAGES)
    for path in training_files(PACKAGE):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "iln" and len(parts) > 1:
                    assert parts[1] in on_path, f"{path.relative_to(PACKAGE)} imports {name}"


def _code_copy(tmp_path):
    """The package and the train stage copied, as a checkout holds them."""
    shutil.copytree(PACKAGE, tmp_path / "src" / "iln", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "stages").mkdir()
    shutil.copy(TRAIN_STAGE, tmp_path / "stages" / "train.py")
    package, script = tmp_path / "src" / "iln", tmp_path / "stages" / "train.py"
    return package, script, lambda: code_digest(script, package)


def _edit(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name}: {old!r} not found once"
    path.write_text(text.replace(old, new))


def test_comments_and_colours_keep_the_code_digest_a_changed_constant_trains_afresh(tmp_path):
    """The independent check's edits, on a copy of the code."""
    package, script, digest = _code_copy(tmp_path)
    before = digest()
    _edit(package / "figures" / "styles.py", '"#1f77b4"', '"#0000ff"')  # another blue
    for name in ("tracking.py", "models/hat.py", "training/loop.py"):
        (package / name).write_text((package / name).read_text() + "# a note\n")
    _edit(package / "models" / "norms.py", '"""Normalisation', '"""The normalisation')
    _edit(script, "def main(", "# the stage\ndef main(")
    assert digest() == before
    _edit(package / "models" / "norms.py", "LAYERSCALE_INIT = 1e-4", "LAYERSCALE_INIT = 2e-4")
    assert digest() != before


@pytest.mark.parametrize(
    "name, old, new",
    [
        (
            "training/loop.py",
            "F.l1_loss(output.float(), gt)",
            "F.mse_loss(output.float(), gt)",
        ),
        ("data/degrade.py", "rng.normal(0.0, float(sigma)", "rng.normal(0.0, float(2 * sigma)"),
        ("training/kld.py", "VAR_EPS = 1e-8", "VAR_EPS = 1e-6"),
    ],
)
def test_a_change_to_the_loss_data_or_regulariser_changes_the_code_digest(tmp_path, name, old, new):
    package, _, digest = _code_copy(tmp_path)
    before = digest()
    text = (package / name).read_text()
    (package / name).write_text(text.replace(old, new, 1))
    assert digest() != before


@pytest.mark.integration
def test_train_stage_retrains_on_new_data_and_resumes_past_observer_changes(
    tmp_path, degraded_project
):
    """The independent check's scenario: add a training image, rerun degrade and train."""
    root = copy_project(degraded_project, tmp_path / "project")
    run_stage(root, "train", "ln")
    assert summary(root, "ln")["resumed_from"] == 0
    (first,) = stage_runs(root, "ln")

    params = read_params(root)  # probes and logs more often, new report groups: no retraining
    params["train"].update(probe_every=1, log_every=2)
    params["runs"]["ln"]["groups"] = ["table3", "table4"]
    write_params(root, params)
    run_stage(root, "train", "ln")
    assert summary(root, "ln")["resumed_from"] == 4
    (again,) = stage_runs(root, "ln")
    assert again["run_id"] == first["run_id"] and again["status"] == "FINISHED"  # continued
    assert metric_steps(root, first["run_id"], "loss") == [1, 2, 3, 4]

    train_dir = root / "data" / "hr" / "default_train"  # one more training photo
    shutil.copy(root / "data" / "default" / "test" / "chelsea.png", train_dir / "extra.png")
    run_stage(root, "degrade", "--no-progress")
    run_stage(root, "train", "ln")
    assert summary(root, "ln")["resumed_from"] == 0
    runs = stage_runs(root, "ln")
    assert len(runs) == 2  # new data, new training, new tracked run


@pytest.mark.integration
def test_train_stage_resumes_past_comments_and_colours_and_retrains_on_a_changed_constant(
    tmp_path, degraded_project
):
    """The independent check on a copy of the code: a colour, comments in tracking.py and in
    the HAT module resume the finished run; LAYERSCALE_INIT doubled trains afresh."""
    root = copy_project(degraded_project, tmp_path / "project")
    package, script, _ = _code_copy(tmp_path / "code")
    env = {**stage_env(), "PYTHONPATH": str(package.parent)}

    def train() -> int:
        done = subprocess.run(
            [sys.executable, str(script), "ln"], cwd=root, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return summary(root, "ln")["resumed_from"]

    assert train() == 0
    _edit(package / "figures" / "styles.py", '"#1f77b4"', '"#0000ff"')
    for name in ("tracking.py", "models/hat.py"):
        (package / name).write_text("# a comment line\n" + (package / name).read_text())
    assert train() == read_params(root)["train"]["iterations"] == 4
    _edit(package / "models" / "norms.py", "LAYERSCALE_INIT = 1e-4", "LAYERSCALE_INIT = 2e-4")
    assert train() == 0
