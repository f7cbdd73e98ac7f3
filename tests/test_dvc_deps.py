"""dvc.yaml lists, per stage, every module and params key its outputs depend on, and no more.

The modules are read from the stage scripts' imports (``iln.fingerprint.imported_modules``),
so a module added later to a stage's import graph without a dvc.yaml dep fails here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from iln.config import EvaluateParams
from iln.data.params import DataParams, DegradeParams
from iln.fingerprint import OBSERVER_MODULES, imported_modules

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "iln"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

# The download and degrade stages validate the whole params file, which imports iln.models
# to check arch and norm names: their outputs do not depend on the model code.
VALIDATION_ONLY = {"download": ("src/iln/models/",), "degrade": ("src/iln/models/",)}
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


def _needed(name: str) -> list[str]:
    script = ROOT / _stage(name)["cmd"].split()[1]
    files = [p.relative_to(ROOT).as_posix() for p in imported_modules(script, PACKAGE)]
    skip = tuple(f"src/iln/{m}" for m in OBSERVER_MODULES) + VALIDATION_ONLY.get(name, ())
    return [f for f in files if not f.startswith(skip)]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_module_is_a_dep(name):
    deps = _stage(name)["deps"]
    script = _stage(name)["cmd"].split()[1]
    assert script in deps
    missing = [f for f in _needed(name) if not any(f == d or f.startswith(d + "/") for d in deps)]
    assert not missing, f"dvc.yaml stage {name}: add {missing} to its deps"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_module_dep_is_stale(name):
    needed = _needed(name)
    modules = [d for d in _stage(name)["deps"] if d.startswith("src/iln/") and d.endswith(".py")]
    stale = [d for d in modules if d not in needed]
    assert not stale, f"dvc.yaml stage {name}: {stale} are not imported by its script"


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
