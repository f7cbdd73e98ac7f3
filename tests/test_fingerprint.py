"""The resume fingerprint: trajectory settings, training pairs and code, nothing else."""

from __future__ import annotations

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
    RECORDING_MODULES,
    TRAJECTORY_KEYS,
    code_digest,
    code_meaning,
    imported_modules,
    training_fingerprint,
    training_modules,
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
    assert code_meaning(edited) == code_meaning(SOURCE)


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
    assert code_meaning(edited) != code_meaning(SOURCE)


def _names(paths):
    return {p.relative_to(PACKAGE).as_posix() for p in paths}


def test_the_training_path_holds_models_data_loss_and_loop_and_nothing_that_records():
    on_path = _names(training_modules(TRAIN_STAGE, PACKAGE))
    for needed in (
        "models/norms.py",
        "models/hat.py",
        "models/swinir.py",
        "models/fast.py",
        "data/dataset.py",
        "data/degrade.py",
        "train.py",
        "kld.py",
        "resume.py",
        "distributed.py",
        "config.py",
    ):
        assert needed in on_path
    for recording in ("tracking.py", "styles.py", "monitor.py", "probes.py", "evaluate.py"):
        assert recording not in on_path
    assert not [name for name in on_path if name.startswith("report/")]


def _module_file(name):
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_recording_modules_are_imported_by_the_train_stage_and_by_no_training_module():
    """The list stays exact: no stale entry, and no module on the training path reaches one
    (it would then count for the weights and must not be left out)."""
    imported = set(imported_modules(TRAIN_STAGE, PACKAGE))
    recording = {_module_file(name) for name in RECORDING_MODULES}
    assert recording <= imported, sorted(_names(recording - imported))
    for module in training_modules(TRAIN_STAGE, PACKAGE):
        reached = set(imported_modules(module, PACKAGE)) & recording
        assert not reached, f"{module.name} imports {sorted(_names(reached))}"


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
    _edit(package / "styles.py", '"#1f77b4"', '"#0000ff"')  # i-LN drawn in another blue
    for name in ("tracking.py", "models/hat.py", "train.py"):
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
            "train.py",
            "F.l1_loss(output.float(), gt_all[part])",
            "F.mse_loss(output.float(), gt_all[part])",
        ),
        ("data/degrade.py", "rng.normal(0.0, float(sigma)", "rng.normal(0.0, float(2 * sigma)"),
        ("kld.py", "VAR_EPS = 1e-8", "VAR_EPS = 1e-6"),
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
    _edit(package / "styles.py", '"#1f77b4"', '"#0000ff"')
    for name in ("tracking.py", "models/hat.py"):
        (package / name).write_text("# a comment line\n" + (package / name).read_text())
    assert train() == read_params(root)["train"]["iterations"] == 4
    _edit(package / "models" / "norms.py", "LAYERSCALE_INIT = 1e-4", "LAYERSCALE_INIT = 2e-4")
    assert train() == 0
