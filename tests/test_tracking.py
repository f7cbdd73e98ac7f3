"""MLflow tracking: each norm's run carries the colour it is given; the experiment is model
training."""

from __future__ import annotations

import random
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from iln import tracking
from iln.figures.styles import NORM_STYLES

ROOT = Path(__file__).resolve().parents[1]


def test_norm_runs_get_the_norms_colour_and_the_experiment_its_kind(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, norm in (("ln", "ln"), ("iln", "iln"), ("bicubic", None)):
        with tracking.stage_run(
            tmp_path,
            experiment="e",
            stage="evaluate",
            run_name=name,
            norm=norm,
            color=NORM_STYLES[norm].color if norm else None,
        ):
            pass
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("e")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    colours = {r.info.run_name: r.data.tags.get(tracking.RUN_COLOR_TAG) for r in runs}
    assert colours["ln/evaluate"] == colours["ln"] == NORM_STYLES["ln"].color
    assert colours["iln/evaluate"] == NORM_STYLES["iln"].color != colours["ln"]
    assert colours["bicubic/evaluate"] is None


def test_an_experiment_tag_set_meanwhile_by_another_process_is_not_an_error(tmp_path):
    """Two stages against one tracking server both find the experiment untagged and both
    tag it; the server refuses the second insert (UNIQUE constraint failed), which must not
    fail the stage. Any other refusal still does."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = MlflowClient(tracking_uri=uri)
    real.create_experiment("e")

    class RacingClient:  # the other process tags the experiment just before we do
        def __getattr__(self, name):
            return getattr(real, name)

        def set_experiment_tag(self, experiment_id, key, value):
            real.set_experiment_tag(experiment_id, key, value)
            raise RuntimeError("UNIQUE constraint failed: experiment_tags.key")

    experiment_id = tracking._experiment_id(RacingClient(), "e", tmp_path, uri)
    tags = real.get_experiment(experiment_id).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND

    class RefusingClient(RacingClient):  # refuses and nobody else set the tag
        def set_experiment_tag(self, experiment_id, key, value):
            raise RuntimeError("permission denied")

    real.create_experiment("f")
    with pytest.raises(RuntimeError, match="permission denied"):
        tracking._experiment_id(RefusingClient(), "f", tmp_path, uri)


# --------------------------------------------------------------------------- store faults


def stage_runs(root, experiment="e"):
    """(run_id, member, stage, status, params) of the stage runs in the store of ``root``."""
    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return [
        {
            "run_id": run.info.run_id,
            "run": run.data.tags.get(tracking.RUN_TAG),
            "stage": run.data.tags.get(tracking.STAGE_TAG),
            "status": run.info.status,
            "params": dict(run.data.params),
            "artifacts": [a.path for a in client.list_artifacts(run.info.run_id)],
        }
        for run in client.search_runs(
            [found.experiment_id], f"tags.`{tracking.KIND_TAG}` = 'stage'", max_results=1000
        )
    ]


def _open(root, **kwargs):
    """Open and close one stage run of the report against the store of ``root``."""
    with tracking.stage_run(
        root, experiment="e", stage="report", run_name="report", **kwargs
    ) as run:
        run.log_metrics({"x": 1.0})
    return run


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real store with one finished run: ``mlflow.db`` of a project folder."""
    root = tmp_path_factory.mktemp("store")
    _open(root)
    return root / "mlflow.db"


@pytest.fixture
def default_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _damage(store, root, how):
    data = store.read_bytes()
    db = root / "mlflow.db"
    if how == "cut in half":
        db.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        db.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(len(data))))
    elif how == "0 bytes":
        db.write_bytes(b"")
    else:  # pages overwritten in the middle, the header and size intact
        damaged = bytearray(data)
        noise = random.Random(1)
        for start in range(8192, len(data) - 4096, 4096):
            damaged[start + 100 : start + 3000] = bytes(noise.randrange(256) for _ in range(2900))
        db.write_bytes(bytes(damaged))
    return db


@pytest.mark.parametrize(
    "how, message",
    [
        ("cut in half", r"is cut short \(\d+ of \d+ bytes\): move it aside \(mv "),
        ("garbage", r"is not an sqlite database: move it aside"),
        ("0 bytes", r"is empty \(0 bytes\), not a database: move it aside"),
        ("pages overwritten", r"is damaged \(database disk image is malformed\): move it aside"),
    ],
)
def test_a_damaged_store_is_one_line_and_is_left_as_it_was(
    tmp_path, store, default_store, how, message
):
    db = _damage(store, tmp_path, how)
    before = db.read_bytes()
    with pytest.raises(tracking.TrackingError, match=f"^MLflow store {db} {message}") as info:
        _open(tmp_path)
    assert "\n" not in str(info.value)
    assert db.read_bytes() == before  # never replaced by a new store, never "repaired"


def test_a_report_stage_on_a_store_cut_in_half_exits_1_in_one_line(tmp_path, store):
    _damage(store, tmp_path, "cut in half")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "report.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"},
        timeout=300,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"report: error: MLflow store {tmp_path / 'mlflow.db'} is cut short")


def test_a_closed_port_fails_within_seconds_naming_the_server(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError) as info:
        _open(tmp_path)
    assert time.monotonic() - start < tracking.SERVER_TIMEOUT + 5
    assert str(info.value).startswith(
        f"no MLflow tracking server answers at http://127.0.0.1:{port} (MLFLOW_TRACKING_URI)"
    )


def test_a_server_that_never_answers_times_out(tmp_path, monkeypatch):
    with socket.socket() as sock:  # accepts connections, never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        monkeypatch.setattr(tracking, "SERVER_TIMEOUT", 1.0)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{sock.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(tracking.TrackingError, match=r"within 1 s \(timed out\)"):
            _open(tmp_path)
        assert time.monotonic() - start < 10


def _hold_exclusive_lock(db, seconds):
    con = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    timer = threading.Timer(seconds, lambda: (con.execute("COMMIT"), con.close()))
    timer.start()
    return timer


def test_an_exclusive_lock_while_the_store_opens_is_waited_out(tmp_path, store, default_store):
    shutil.copy(store, tmp_path / "mlflow.db")
    timer = _hold_exclusive_lock(tmp_path / "mlflow.db", 2.0)
    _open(tmp_path)
    timer.join()
    assert [r["status"] for r in stage_runs(tmp_path)] == [
        "FINISHED",
        "FINISHED",
    ]


@pytest.mark.integration  # waits out sqlite's busy timeout several times (~30 s)
def test_a_lock_held_past_the_retry_limit_is_one_line(tmp_path, store, default_store, monkeypatch):
    shutil.copy(store, tmp_path / "mlflow.db")
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 1.0)
    timer = _hold_exclusive_lock(tmp_path / "mlflow.db", 120.0)
    try:
        with pytest.raises(tracking.TrackingError, match=r"stayed locked by another process"):
            _open(tmp_path)
    finally:
        timer.cancel()
        timer.function()


def test_the_project_moved_with_its_store_keeps_its_artifacts(tmp_path, default_store):
    old = tmp_path / "old"
    with tracking.stage_run(old, experiment="e", stage="report", run_name="report") as run:
        (tmp_path / "a.txt").write_text("a")
        run.log_artifact(tmp_path / "a.txt")
    new = tmp_path / "new"
    old.rename(new)
    with tracking.stage_run(new, experiment="e", stage="report", run_name="report") as run:
        run.log_artifact(tmp_path / "a.txt")
    assert not old.exists()  # never re-created
    client = MlflowClient(tracking_uri=tracking.tracking_uri(new))
    experiment = client.get_experiment_by_name("e")
    assert experiment.artifact_location == (new / "mlartifacts").resolve().as_uri()
    rows = stage_runs(new)
    assert [r["artifacts"] for r in rows] == [["a.txt"], ["a.txt"]]  # the old run's too
    for row in rows:
        assert client.get_run(row["run_id"]).info.artifact_uri.startswith(
            (new / "mlartifacts").resolve().as_uri() + "/"
        )


_FULL_DISK_STAGE = """
import sys
from pathlib import Path
from iln import tracking
from iln.cli.stage import run_stage
from iln.util.files import write_json_atomic

root, when = Path(sys.argv[1]), sys.argv[2]


def fill():  # take every free byte of the disk
    try:
        with open(root / "filler", "ab") as handle:
            while True:
                handle.write(bytes(65536))
                handle.flush()
    except OSError:
        pass


def main():
    if when == "open":
        fill()
    with tracking.stage_run(root, experiment="e", stage=sys.argv[3], run_name="ln") as run:
        run.log_metrics({"x": 1.0})
        fill()
        write_json_atomic(root / "out.json", {"values": list(range(100000))})
    return 0


sys.exit(run_stage(sys.argv[3], main))
"""


def _on_a_small_disk(tmp_path, store, commands):
    """Run shell ``commands`` with ``$DISK`` a 4 MB tmpfs holding a copy of ``store``, in a
    mount namespace of their own (no root needed where user namespaces are allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "stage.py"
    script.write_text(_FULL_DISK_STAGE)
    shell = (
        f"mount -t tmpfs -o size=4m tmpfs {disk} || exit 97; cp {store} {disk}/mlflow.db; "
        f"DISK={disk}; STAGE='{sys.executable} {script}'; {commands}"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell],
            capture_output=True,
            text=True,
            env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"},
            timeout=300,
        )
    except FileNotFoundError:
        pytest.skip("no unshare(1) on this machine: cannot make a small disk without root")
    if result.returncode == 97 or "unshare failed" in result.stderr:
        pytest.skip(f"this machine refuses a private tmpfs: {result.stderr.strip()[:200]}")
    return result


@pytest.mark.integration
def test_a_full_disk_under_the_store_is_one_line_and_the_run_is_closed_later(tmp_path, store):
    result = _on_a_small_disk(
        tmp_path,
        store,
        '$STAGE $DISK run train; echo "rc=$?" >&2; rm $DISK/filler; '
        '$STAGE $DISK open evaluate; echo "rc=$?" >&2; rm $DISK/filler; '
        f"cp $DISK/mlflow.db {tmp_path}",
    )
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in lines if not line.startswith("20")]  # MLflow's INFO lines
    assert len(lines) == 4, result.stderr[-3000:]
    train_error, train_rc, open_error, open_rc = lines
    assert train_rc == open_rc == "rc=1"
    # the output's own error first, then what became of the MLflow run
    assert train_error.startswith("train: error: ") and "out.json: no space left" in train_error
    assert re.search(r"MLflow run \w+ could not be marked FAILED: .*the disk is full", train_error)
    assert train_error.endswith("the next stage marks it KILLED)")
    assert open_error.startswith(f"evaluate: error: MLflow store {tmp_path / 'disk'}/mlflow.db")
    assert "the disk is full (database or disk is full): free space on the disk of" in open_error

    _open(tmp_path, norm=None)  # any later stage, here the report, closes the lost train run
    statuses = {(r["stage"], r["status"]) for r in stage_runs(tmp_path)}
    assert ("train", "KILLED") in statuses and ("train", "RUNNING") not in statuses


_HOLDING_STAGE = """
import os, signal, sys, time
from pathlib import Path
from iln import tracking

with tracking.stage_run(Path(sys.argv[1]), experiment="e", stage=sys.argv[2], run_name="ln"):
    print("open", flush=True)
    if sys.argv[3] == "die":
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no handler runs, the run stays RUNNING
    time.sleep(120)
"""


def _holding_stage(root, stage, then):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDING_STAGE, str(root), stage, then],
        cwd=root,
        env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "open\n"
    return process


@pytest.mark.integration
def test_a_run_lost_to_kill_9_is_closed_by_any_later_stage(tmp_path, store, default_store):
    """DVC may restore a killed stage from its run cache and never run it again: the report
    (another stage, another member) must close the lost analyze run."""
    shutil.copy(store, tmp_path / "mlflow.db")
    process = _holding_stage(tmp_path, "analyze", "die")
    assert process.wait(timeout=60) == -9
    (lost,) = [r for r in stage_runs(tmp_path) if r["run"] == "ln"]
    assert lost["status"] == "RUNNING"
    _open(tmp_path)
    statuses = {r["run_id"]: r["status"] for r in stage_runs(tmp_path)}
    assert statuses[lost["run_id"]] == "KILLED"


@pytest.mark.integration
def test_a_stage_still_running_in_this_folder_is_not_started_twice(
    tmp_path, store, default_store, monkeypatch
):
    """kill -9 of dvc repro leaves its evaluate running: the next repro must not start a
    second one writing the same outputs. A copy of the project elsewhere (a queued
    experiment) is not refused."""
    shutil.copy(store, tmp_path / "mlflow.db")
    process = _holding_stage(tmp_path, "evaluate", "hold")
    try:
        monkeypatch.chdir(tmp_path)
        with pytest.raises(tracking.TrackingError) as info:
            with tracking.stage_run(tmp_path, experiment="e", stage="evaluate", run_name="ln"):
                pass
        assert str(info.value).startswith(
            f"ln/evaluate is already running in process {process.pid} of this project"
        )
        assert f"stop it (kill {process.pid}), then rerun" in str(info.value)
        elsewhere = tmp_path / "copy"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        with tracking.stage_run(tmp_path, experiment="e", stage="evaluate", run_name="ln"):
            pass
    finally:
        process.kill()
        process.wait()
    statuses = sorted(r["status"] for r in stage_runs(tmp_path))
    assert statuses == ["FINISHED", "FINISHED", "RUNNING"]  # nothing made for the refused one


def test_a_store_in_a_folder_that_does_not_exist_is_refused_not_made(tmp_path, monkeypatch):
    missing = tmp_path / "nonexistent" / "dir" / "x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    with pytest.raises(
        tracking.TrackingError, match=r"its folder .*nonexistent/dir does not exist"
    ):
        with tracking.stage_run(tmp_path, experiment="iln", stage="train", run_name="ln"):
            pass
    assert not (tmp_path / "nonexistent").exists()
