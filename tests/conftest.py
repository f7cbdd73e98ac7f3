"""Test-wide settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: the tests are tiny, and two OpenMP threads on a busy 2-core
    machine spin against each other and run ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def degraded_project(tmp_path_factory):
    """A tiny project after its download and degrade stages (copy it with copy_project)."""
    from tests.stage_project import make_project, run_stage, stage_runs

    root = make_project(tmp_path_factory.mktemp("degraded") / "project")
    for stage in ("download", "degrade"):
        run_stage(root, stage, "--no-progress")
    stage_runs(root)  # creates the store once (~5 s)
    return root
