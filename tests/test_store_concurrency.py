"""Many stage processes at once against one store; killed runs closed; no metric lost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from iln import tracking
from tests.stage_project import (
    copy_project,
    finish,
    metric_steps,
    read_params,
    run_stage,
    stage_env,
    stage_runs,
    start_stage,
    write_params,
)


def _both_train(root, **env):
    processes = [start_stage(root, "train", run, **env) for run in ("ln", "iln")]
    results = [finish(p, timeout=240) for p in processes]
    for code, err in results:
        assert code == 0, err[-3000:]


def _two_runs(tmp_path, degraded_project):
    root = copy_project(degraded_project, tmp_path / "project", store=False)
    params = read_params(root)
    params["runs"]["iln"] = {**params["runs"]["ln"], "norm": "iln"}
    write_params(root, params)
    return root


@pytest.mark.integration
def test_two_train_processes_at_once_on_a_fresh_store(tmp_path, degraded_project):
    root = _two_runs(tmp_path, degraded_project)
    assert not (root / "mlflow.db").exists()
    _both_train(root)
    rows = stage_runs(root)
    assert sorted((r["run"], r["status"]) for r in rows) == [
        ("iln", "FINISHED"),
        ("ln", "FINISHED"),
    ]
    for row in rows:
        assert len(metric_steps(root, row["run_id"], "loss")) == 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_two_train_processes_against_a_local_tracking_server(tmp_path, degraded_project):
    root = _two_runs(tmp_path, degraded_project)
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server"),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"),
            *("--artifacts-destination", str(store / "artifacts")),
        ],
        cwd=store,
        env=stage_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("the local MLflow server did not start")
                time.sleep(0.5)
        _both_train(root, MLFLOW_TRACKING_URI=uri)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            rows = stage_runs(root)
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert sorted((r["run"], r["status"]) for r in rows) == [
        ("iln", "FINISHED"),
        ("ln", "FINISHED"),
    ]
    assert all("summary.json" in r["artifacts"] for r in rows)
    assert not (root / "mlflow.db").exists()  # everything went to the server


@pytest.mark.integration
def test_a_killed_run_is_closed_when_its_stage_next_runs(tmp_path, degraded_project):
    root = copy_project(degraded_project, tmp_path / "project")
    params = read_params(root)
    params["train"].update(iterations=100000, checkpoint_every=100000)
    write_params(root, params)
    process = start_stage(root, "train", "ln")
    deadline = time.monotonic() + 120
    while not stage_runs(root, "ln"):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)  # no handler runs: the run stays RUNNING
    finish(process)
    (killed,) = stage_runs(root, "ln")
    assert killed["status"] == "RUNNING"

    params["train"].update(iterations=2, checkpoint_every=2)
    write_params(root, params)
    run_stage(root, "train", "ln")
    statuses = {r["run_id"]: r["status"] for r in stage_runs(root, "ln")}
    assert statuses.pop(killed["run_id"]) == "KILLED"
    assert list(statuses.values()) == ["FINISHED"]


class _Locked:
    """A client whose writes meet a locked sqlite file the first two times."""

    def __init__(self) -> None:
        self.failures, self.batches = 2, []

    def log_batch(self, run_id, metrics=(), params=()):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        self.batches.append(list(metrics))


def test_a_locked_database_is_retried_and_no_metric_is_lost():
    client = _Locked()
    tracking.StageRun(client, "r").log_metrics({"loss": 0.5}, step=3)
    assert [(m.key, m.value, m.step) for m in client.batches[0]] == [("loss", 0.5, 3)]


def test_other_store_errors_are_not_retried():
    class Broken:
        calls = 0

        def log_batch(self, run_id, metrics=(), params=()):
            Broken.calls += 1
            raise RuntimeError("no such table: metrics")

    with pytest.raises(RuntimeError, match="no such table"):
        tracking.StageRun(Broken(), "r").log_metrics({"loss": 0.5}, step=1)
    assert Broken.calls == 1
