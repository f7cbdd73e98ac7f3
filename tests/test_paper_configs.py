"""Every paper-scale grid parses, builds each of its models (on the `meta` device: no memory,
no time) and plans its pipeline in the right order."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iln.config.params import load_params
from iln.models import build_model
from iln.config.overlay import apply_file

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((ROOT / "configs").glob("paper_*.yaml"))
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_paper_grids():
    names = {p.name for p in PAPER_CONFIGS}
    assert {"paper_hat1_x4.yaml", "paper_hat_dagger.yaml", "paper_tasks.yaml"} <= names


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_every_run_of_a_paper_grid_builds_on_the_meta_device(config, tmp_path):
    apply_file(config, ROOT / "params.yaml", tmp_path / "params.yaml")
    params = load_params(tmp_path / "params.yaml")
    text = config.read_text()
    assert "GPU-hours" in text or "H200-hours" in text, "state the compute the grid needs"
    for name, spec in params.runs.items():
        with torch.device("meta"):
            model = build_model(spec.arch, norm=spec.norm, scale=spec.scale, **_overrides(spec))
        assert next(model.parameters()).device.type == "meta", name


def _overrides(spec):
    overrides = dict(spec.model)
    for key in ("stdnorm", "affine_outer"):
        if getattr(spec, key) is not None:
            overrides[key] = getattr(spec, key)
    return overrides


def _planned(root: Path) -> list[str]:
    """The stages ``dvc repro`` would run, in its order (DVC's own planner, which is what
    ``dvc repro --dry`` prints, without reading any stage's dependencies)."""
    script = (
        "from dvc.repo import Repo; from dvc.repo.reproduce import plan_repro\n"
        "repo = Repo('.')\n"
        "for stage in plan_repro(repo.index.graph): print(stage.addressing)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [line.rsplit(":", 1)[-1] for line in out.stdout.split()]


@pytest.mark.integration
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_dvc_plans_every_grid_in_dependency_order(config, tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    for name in ("dvc.yaml", "data.dvc", ".dvcignore", ".dvc/config", "stages", "src", "data"):
        source, target = ROOT / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, target)
    apply_file(config, ROOT / "params.yaml", root / "params.yaml")  # as `iln config` does
    params = load_params(root / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    planned = _planned(root)
    position = {stage: i for i, stage in enumerate(planned)}
    assert position["download"] < position["degrade"]
    for name, spec in params.runs.items():
        assert position["degrade"] < position[f"train@{name}"] < position[f"evaluate@{name}"]
        if spec.init is not None and spec.init.run is not None:
            assert position[f"train@{spec.init.run}"] < position[f"train@{name}"]
    assert planned[-1] == "report"
