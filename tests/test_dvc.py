"""dvc.yaml names code by package folder, and the folders it names cover what each stage runs.

A stage's code deps are the packages of src/iln whose code makes its outputs; DVC re-runs it
when a file in one of them changes. Missing a package means a stale output that DVC calls up to
date, so the packages a stage script really loads are checked against its deps.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iln.config.params import EvaluateParams
from iln.data.params import DataParams, DegradeParams
from iln.training.fingerprint import TRAINING_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# The stage's error lines, its MLflow run and the run's colour are no DVC output of any stage.
RECORDING = {"cli", "tracking", "figures"}
# Params keys that change none of the stage's outputs (how many processes, where caches live).
NO_OUTPUT_KEYS = {
    "download": ("data.workers", "data.download_dir", "data.checksums"),
    "degrade": ("degrade.workers",),
    "evaluate": ("evaluate.workers",),
    "evaluate_released": ("evaluate.workers",),
}


def _stage(name: str) -> dict:
    stage = STAGES[name]
    return stage.get("do", stage)


def _code_deps(name: str) -> set[str]:
    return {d.removeprefix("src/iln/") for d in _stage(name)["deps"] if d.startswith("src/iln/")}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_package_folders(name):
    for package in _code_deps(name):
        assert (ROOT / "src" / "iln" / package / "__init__.py").is_file(), (
            f"dvc.yaml stage {name}: src/iln/{package} is not a package folder"
        )


def test_train_watches_exactly_the_fingerprinted_packages_and_the_validation():
    assert _code_deps("train") == {*TRAINING_PACKAGES, "evaluation"}


def test_a_colour_or_an_mlflow_record_is_no_dep_of_training_or_evaluation():
    for name in ("train", "evaluate", "baseline"):
        assert not _code_deps(name) & RECORDING
    assert "figures" in _code_deps("report") and "figures" in _code_deps("analyze")


def _loaded_packages(script: str) -> set[str]:
    """The iln packages (and top-level modules) loaded by importing a stage script."""
    code = (
        "import json, runpy, sys; runpy.run_path(sys.argv[1], run_name='stage');"
        "print(json.dumps(sorted({m.split('.')[1] for m in sys.modules"
        " if m.startswith('iln.')})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / script)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("script", sorted({_stage(n)["cmd"].split()[1] for n in STAGES}))
def test_every_package_a_stage_loads_is_a_dep_of_each_of_its_stages(script):
    """Lazy imports aside (the params check imports the models), what a stage script loads
    must be watched by every stage that runs it, recording modules excepted."""
    loaded = _loaded_packages(script) - RECORDING - {"metrics"}
    for name in STAGES:
        if _stage(name)["cmd"].split()[1] != script or name == "baseline":
            continue  # the bicubic baseline opens no model: weights and models are no deps
        missing = loaded - _code_deps(name)
        assert not missing, f"dvc.yaml stage {name}: add src/iln/{sorted(missing)} to its deps"


@pytest.mark.parametrize(
    "name, section, fields",
    [
        ("download", "data", DataParams),
        ("degrade", "degrade", DegradeParams),
        ("evaluate", "evaluate", EvaluateParams),
        ("evaluate_released", "evaluate", EvaluateParams),
    ],
)
def test_every_params_key_is_listed_or_known_to_change_no_output(name, section, fields):
    listed = {k for k in _stage(name)["params"] if k.startswith(f"{section}.")}
    keys = {f"{section}.{f.name}" for f in dataclasses.fields(fields)}
    assert listed | set(NO_OUTPUT_KEYS[name]) == keys
    assert not listed & set(NO_OUTPUT_KEYS[name])
