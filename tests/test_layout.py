"""The artefact layout (iln.config.layout) against dvc.yaml: every stage declares exactly the outputs
the layout names, and every file the readers open lies inside a declared output."""

from __future__ import annotations

from pathlib import Path

import pytest
from dvc.repo import Repo

from iln.config.layout import (
    ANALYSIS_FIGURES,
    Layout,
    RunFiles,
    stage_outputs,
)
from tests.helpers import ROOT

KNOWN = ("train", "evaluate", "analyze", "baseline", "report")


@pytest.fixture(scope="module")
def declared() -> dict[str, set[str]]:
    """dvc.yaml's stages (foreach rendered by DVC itself) -> their outs/metrics/plots."""
    with Repo(str(ROOT)) as repo:
        return {
            stage.addressing: {Path(out.def_path).as_posix() for out in stage.outs}
            for stage in repo.index.stages
            if hasattr(stage, "cmd")
        }


def split(address: str) -> tuple[str, str | None]:
    name, _, run = address.partition("@")
    return name, run or None


def test_every_known_stage_declares_exactly_the_layouts_outputs(declared):
    seen = set()
    for address, outs in declared.items():
        stage, run = split(address)
        if stage not in KNOWN:
            continue
        seen.add(stage)
        assert outs == set(stage_outputs(stage, run)), address
    assert seen == set(KNOWN)


def test_run_files_lie_inside_the_outputs_of_their_stage(declared):
    run = next(split(a)[1] for a in declared if a.startswith("train@"))
    files = Layout(Path(".")).run_files(run)
    produced_by = {
        "train": (files.weights, files.history, files.probes, files.train_summary),
        "evaluate": (files.metrics, files.per_image, files.precision, files.samples("t", "s")),
        "analyze": (
            files.features,
            files.final_norm,
            *(files.analysis_dir / n for n in ANALYSIS_FIGURES),
        ),
    }
    for stage, paths in produced_by.items():
        outs = [Path(p) for p in declared[f"{stage}@{run}"]]
        for path in paths:
            assert any(path == o or o in path.parents for o in outs), (stage, path)


def test_outputs_under_runs_are_named_by_the_layout(declared):
    """Any stage (also ones the layout does not list) writes only files the layout names."""
    names = {
        "train/model.pt",
        "train/history.csv",
        "train/probes.csv",
        "train/summary.json",
        "eval/samples",
        "eval/metrics.json",
        "eval/per_image.csv",
        "eval/precision.json",
        "analysis",
    }
    for address, outs in declared.items():
        for out in outs:
            parts = Path(out).parts
            if parts[0] == "runs":
                assert "/".join(parts[2:]) in names, (address, out)
    assert RunFiles(Path("runs/x")).metrics == Path("runs/x/eval/metrics.json")


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown stage 'trian'"):
        stage_outputs("trian", "ln")
    with pytest.raises(ValueError, match="per run"):
        stage_outputs("train")
