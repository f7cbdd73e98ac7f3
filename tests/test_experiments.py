"""DVC experiments run in a copy of the project (`dvc exp run --temp`, `--queue` +
`dvc queue start`): every output goes to that copy, the workspace is left as it was, and
the MLflow runs land in the workspace's store.

The README's queue recipe, for real: two queued variants, `dvc queue start -j 2`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import _run, command_env, copy_project_files
from tests.test_tracking import stage_runs

pytestmark = pytest.mark.integration


def _digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file the workspace's stages wrote (outputs and checkpoints)."""
    files = [p for d in ("runs", "checkpoints", "reports") for p in (root / d).rglob("*")]
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(files)
        if p.is_file()
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A fresh clone-like project with two 2-iteration runs, reproduced and committed."""
    root = tmp_path_factory.mktemp("workspace")
    copy_project_files(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(
        iterations=2,
        batch_size=2,
        lq_patch=16,
        checkpoint_every=2,
        log_every=1,
        probe_every=0,
        probe_images=1,
        threads=1,
    )
    params["runs"] = {
        "ln": {"arch": "hat_tiny", "norm": "ln", "task": "sr_x2", "groups": ["table3"]},
        "iln": {"arch": "hat_tiny", "norm": "iln", "task": "sr_x2", "groups": ["table3"]},
    }
    params["evaluate"].update(samples=1)
    params["data"]["workers"] = params["degrade"]["workers"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("mlflow.db*\nmlartifacts/\n/checkpoints/\n")
    _run(["git", "init", "-q"], root)
    _run(["dvc", "repro"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], root)
    return root


def _stage_runs(root: Path) -> list[tuple[str, str, str]]:
    return sorted((r["run"], r["stage"], r["status"]) for r in stage_runs(root, "iln"))


def test_the_readme_queue_recipe_runs_two_variants_in_their_own_copies(workspace):
    before, runs_before = _digests(workspace), _stage_runs(workspace)
    assert "runs/ln/train/model.pt" in before and "checkpoints/ln/checkpoint.pt" in before
    for variant in ("++runs.iln.lr=1.0e-3", "++runs.ln.lr=1.0e-3"):
        _run(["dvc", "exp", "run", "--queue", "-S", variant], workspace)
    # the workers dvc starts outlive the command and keep its output open: a file, not a pipe
    with open(workspace / "queue-start.log", "w") as log:
        started = subprocess.run(
            ["dvc", "queue", "start", "-j", "2"],
            cwd=workspace,
            env=command_env(),
            stdout=log,
            stderr=log,
            timeout=300,
        )
    assert started.returncode == 0, (workspace / "queue-start.log").read_text()
    deadline = time.monotonic() + 900
    while True:
        status = _run(["dvc", "queue", "status"], workspace).stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status + _run(["dvc", "queue", "logs"], workspace).stdout

    assert _digests(workspace) == before  # model.pt, checkpoints, metrics: untouched
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], workspace).stdout)
    lrs = set()
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                params = rev["data"]["params"]["params.yaml"]["data"]["runs"]
                lrs.add((params["ln"].get("lr"), params["iln"].get("lr")))
                metrics = rev["data"]["metrics"]
                assert "reports/metrics/ln.json" in metrics, metrics  # one file per run
    assert lrs == {(0.001, None), (None, 0.001)}
    new = _stage_runs(workspace)
    for run in runs_before:
        new.remove(run)
    # every stage of both experiments ran in its copy (outputs DVC does not cache, such as
    # the checkpoints, are not copied there) and was tracked in the workspace's store
    assert {status for _, _, status in new} == {"FINISHED"}
    assert new.count(("report", "report", "FINISHED")) == 2
    trained = [
        (r["run"], r["params"].get("run.lr"))
        for r in stage_runs(workspace, "iln")
        if r["stage"] == "train"
    ]
    assert ("ln", "0.001") in trained and ("iln", "0.001") in trained
    _run(["dvc", "queue", "stop"], workspace, check=False)


def test_a_temp_experiment_writes_into_its_copy(workspace):
    before = _digests(workspace)
    out = _run(["dvc", "exp", "run", "--temp", "-S", "++runs.ln.iterations=3"], workspace).stdout
    assert "Ran experiment" in out, out
    assert _digests(workspace) == before
    trained = [
        r["params"].get("run.iterations")
        for r in stage_runs(workspace, "iln")
        if r["stage"] == "train" and r["run"] == "ln"
    ]
    assert "3" in trained
