"""A tiny project on disk for running stage scripts as separate processes (no DVC)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_project(root: Path, *, runs: tuple[str, ...] = ("ln",), **train) -> Path:
    """params.yaml for 4-iteration hat_tiny runs, the embedded photos; no store yet."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "data" / "default", root / "data" / "default")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(
        dict(
            iterations=4,
            batch_size=2,
            lq_patch=16,
            checkpoint_every=2,
            log_every=1,
            probe_every=0,
            probe_images=1,
            threads=1,
            **train,
        )
    )
    params["runs"] = {
        name: {"arch": "hat_tiny", "norm": "ln", "task": "sr_x2", "groups": ["table3"]}
        for name in runs
    }
    params["data"]["workers"] = params["degrade"]["workers"] = 1
    write_params(root, params)
    return root


def copy_project(template: Path, root: Path, *, store: bool = True) -> Path:
    """A copy of a project (its params, data and, unless ``store`` is false, its empty
    MLflow store), without run outputs."""
    skip = ("runs", "checkpoints", "mlartifacts") + (() if store else ("mlflow.db*",))
    shutil.copytree(template, root, ignore=shutil.ignore_patterns(*skip))
    return root


def read_params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "ILN_"))}
    env.update(
        PYTHONPATH=str(ROOT / "src"),
        MLFLOW_DISABLE_TELEMETRY="true",
        OMP_NUM_THREADS="1",
        **extra,
    )
    return env


def start_stage(root: Path, stage: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args],
        cwd=root,
        env=stage_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """(return code, stderr) of a started stage; kills it after ``timeout`` seconds."""
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return process.returncode, err


def run_stage(root: Path, stage: str, *args: str, timeout: float = 300, **env: str) -> str:
    code, err = finish(start_stage(root, stage, *args, **env), timeout)
    assert code == 0, f"stages/{stage}.py {' '.join(args)} failed ({code}):\n{err[-3000:]}"
    return err


def summary(root: Path, run: str) -> dict:
    return json.loads((root / "runs" / run / "train" / "summary.json").read_text())


def stage_runs(root: Path, run_name: str | None = None) -> list[dict]:
    """Summaries of the stage runs in the project's MLflow store (``$MLFLOW_TRACKING_URI`` or
    its mlflow.db, which this creates when missing), optionally of one grid member."""
    from mlflow.tracking import MlflowClient

    from iln import tracking

    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    experiment = client.get_experiment_by_name("iln")
    if experiment is None:
        return []
    query = f"tags.`{tracking.KIND_TAG}` = 'stage'"
    if run_name is not None:
        query += f" and tags.`{tracking.RUN_TAG}` = '{run_name}'"
    found = client.search_runs([experiment.experiment_id], filter_string=query, max_results=1000)
    return [
        {
            "run_id": run.info.run_id,
            "run": run.data.tags.get(tracking.RUN_TAG),
            "stage": run.data.tags.get(tracking.STAGE_TAG),
            "status": run.info.status,
            "parent": run.data.tags.get("mlflow.parentRunId"),
            "metrics": dict(run.data.metrics),
            "artifacts": [a.path for a in client.list_artifacts(run.info.run_id)],
        }
        for run in found
    ]


def metric_steps(root: Path, run_id: str, key: str) -> list[int]:
    """The steps at which run ``run_id`` logged metric ``key``."""
    from mlflow.tracking import MlflowClient

    from iln import tracking

    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    return [m.step for m in client.get_metric_history(run_id, key)]
