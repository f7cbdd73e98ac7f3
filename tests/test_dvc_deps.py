"""dvc.yaml lists, per stage, every module and params key its outputs depend on, and no more.

The modules are read from the stage scripts' imports (``iln.training.fingerprint.imported_modules``),
so a module added later to a stage's import graph without a dvc.yaml dep fails here. Left
out, with what only they import: the modules that change no DVC output of the stage
(``NO_OUTPUT_MODULES``), declared below per stage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from iln.config.params import EvaluateParams
from iln.data.params import DataParams, DegradeParams
from iln.training.fingerprint import imported_modules

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "iln"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

# The stage's error lines and its MLflow run (with the run's colour) are no DVC output.
RECORDING = ("iln.cli.stage", "iln.tracking", "iln.figures.styles")
NO_OUTPUT_MODULES = {
    # download and degrade validate the whole params file, which imports iln.models to check
    # arch and norm names: their outputs do not depend on the model code.
    "download": (*RECORDING, "iln.models"),
    "degrade": (*RECORDING, "iln.models"),
    # the bicubic baseline runs stages/evaluate.py without a model: the code that opens and
    # runs trained or released models changes none of its outputs
    "baseline": (*RECORDING, "iln.models", "iln.weights.trained", "iln.weights.released", "iln.evaluation.precision"),
    # the report draws every norm in its colour; it imports iln.models only to validate
    # params, and iln.weights.subject's model opening (iln.weights.trained, iln.weights.released) never runs there
    "report": ("iln.cli.stage", "iln.tracking", "iln.models", "iln.weights.trained", "iln.weights.released"),
}
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


def needed_modules(name: str) -> list[str]:
    """The source files a stage's outputs depend on, as dvc.yaml names them."""
    script = ROOT / _stage(name)["cmd"].split()[1]
    stop = NO_OUTPUT_MODULES.get(name, RECORDING)
    found = imported_modules(script, PACKAGE, stop=stop)
    return [p.relative_to(ROOT).as_posix() for p in found]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_module_is_a_dep(name):
    deps = _stage(name)["deps"]
    script = _stage(name)["cmd"].split()[1]
    assert script in deps
    needed = needed_modules(name)
    missing = [f for f in needed if not any(f == d or f.startswith(d + "/") for d in deps)]
    assert not missing, f"dvc.yaml stage {name}: add {missing} to its deps"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_module_dep_is_stale(name):
    needed = needed_modules(name)
    modules = [d for d in _stage(name)["deps"] if d.startswith("src/iln/") and d.endswith(".py")]
    stale = [d for d in modules if d not in needed]
    assert not stale, f"dvc.yaml stage {name}: {stale} change none of its outputs"
    folders = [d for d in _stage(name)["deps"] if (ROOT / d).is_dir() and d.startswith("src/")]
    for folder in folders:  # a folder dep: every module in it is needed
        inside = sorted(
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in p.parts
        )
        unused = [f for f in inside if f not in needed]
        assert not unused, f"dvc.yaml stage {name}: {folder} holds {unused}, not needed"


def test_a_plot_colour_is_no_dep_of_training():
    """Changing a colour in iln.figures.styles keeps every train stage up to date for `dvc status`."""
    assert "src/iln/figures/styles.py" not in _stage("train")["deps"]
    assert "src/iln/figures/styles.py" in _stage("report")["deps"]


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
