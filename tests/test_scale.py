"""The determinism contract through the real train stage: a run trained by W processes (one
node or two, each with its own copy of the project), with micro-batches or with recomputed
activations equals the run trained by one plain process, drop path on."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import assert_same_weights
from tests.stage_project import (
    ROOT,
    copy_project,
    make_project,
    read_params,
    run_stage,
    stage_env,
    write_params,
)

pytestmark = pytest.mark.integration

RUN = "iln"


@pytest.fixture(scope="module")
def iln_project(tmp_path_factory):
    """A degraded project with one hat_tiny i-LN run of 6 steps at batch 4 (drop path 0.1)."""
    root = make_project(tmp_path_factory.mktemp("scale") / "project", runs=(RUN,))
    params = read_params(root)
    params["runs"][RUN]["norm"] = "iln"
    params["train"].update(iterations=6, batch_size=4, checkpoint_every=3, log_every=1)
    write_params(root, params)
    for stage in ("download", "degrade"):
        run_stage(root, stage, "--no-progress")
    return root


def _weights(root):
    blob = torch.load(root / "runs" / RUN / "train" / "model.pt", weights_only=True)
    return blob["raw_state_dict"], blob["state_dict"]


def _summary(root):
    return json.loads((root / "runs" / RUN / "train" / "summary.json").read_text())


def _assert_same_run(a, b, rel=1e-5):
    for wa, wb in zip(_weights(a), _weights(b)):  # trained and EMA weights
        assert_same_weights(wa, wb, rel)
    sa, sb = _summary(a), _summary(b)
    assert sa["steps"] == sb["steps"] == 6
    assert sa["final_loss"] == pytest.approx(sb["final_loss"], rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(root, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args, str(ROOT / "stages" / "train.py")]
        + [RUN],
        cwd=root,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen, what: str, timeout: float = 600) -> None:
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    assert process.returncode == 0, f"{what} failed ({process.returncode}):\n{err[-3000:]}"


@pytest.fixture(scope="module")
def single(iln_project, tmp_path_factory):
    root = copy_project(iln_project, tmp_path_factory.mktemp("single") / "p")
    run_stage(root, "train", RUN)
    return root


def test_two_processes_train_the_run_of_one(single, iln_project, tmp_path):
    root = copy_project(iln_project, tmp_path / "p")
    _finish(_torchrun(root, "--standalone", "--nproc_per_node", "2"), "torchrun x2")
    _assert_same_run(single, root)
    assert _summary(root)["world_size"] == 2


def test_two_nodes_without_a_shared_folder_train_the_run_of_one(single, iln_project, tmp_path):
    """Each node has its own copy of the project; rank 0's node writes every output."""
    port, nodes = _free_port(), []
    for node in range(2):
        root = copy_project(iln_project, tmp_path / f"node{node}")
        nodes.append(
            (
                root,
                _torchrun(
                    root,
                    "--nnodes",
                    "2",
                    "--nproc_per_node",
                    "1",
                    "--rdzv_backend",
                    "c10d",
                    "--rdzv_endpoint",
                    f"127.0.0.1:{port}",
                    "--rdzv_id",
                    "scale-test",
                ),
            )
        )
    for node, (_, process) in enumerate(nodes):
        _finish(process, f"node {node}")
    written = [root for root, _ in nodes if (root / "runs" / RUN / "train" / "model.pt").exists()]
    assert len(written) == 1
    _assert_same_run(single, written[0])


@pytest.mark.parametrize("setting", [{"accumulate": 2}, {"grad_checkpoint": True}])
def test_micro_batches_and_recomputed_activations_train_the_run_of_one(
    single, iln_project, tmp_path, setting
):
    root = copy_project(iln_project, tmp_path / "p")
    params = read_params(root)
    params["train"].update(setting)
    write_params(root, params)
    run_stage(root, "train", RUN)
    _assert_same_run(single, root)


def test_a_run_resumed_on_another_process_count_continues_exactly(single, iln_project, tmp_path):
    """Train 3 steps on one process, resume to 6 on two: the same run (the process count is
    not part of the fingerprint)."""
    root = copy_project(iln_project, tmp_path / "p")
    params = read_params(root)
    params["train"]["iterations"] = 3
    write_params(root, params)
    run_stage(root, "train", RUN)
    params["train"]["iterations"] = 6
    write_params(root, params)
    _finish(_torchrun(root, "--standalone", "--nproc_per_node", "2"), "torchrun x2 resume")
    assert _summary(root)["resumed_from"] == 3
    _assert_same_run(single, root)


def test_a_device_spelling_that_names_no_present_gpu_is_one_line(iln_project, tmp_path):
    root = copy_project(iln_project, tmp_path / "p")
    params = read_params(root)
    params["train"]["device"] = "cuda:1"
    write_params(root, params)
    process = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "train.py"), RUN],
        cwd=root,
        env=stage_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode != 0
    assert "Traceback" not in process.stderr
    assert "train.device" in process.stderr


def test_a_run_initialised_from_another_carries_every_matching_tensor(tmp_path):
    """x4 from x2's EMA weights, one step at lr 1e-10: every tensor of the same name and
    shape equals x2's; the x4 upsampler keeps its fresh initialisation and is listed."""
    root = make_project(tmp_path / "p", runs=("x2", "x4"))
    params = read_params(root)
    params["degrade"]["tasks"] = ["sr_x2", "sr_x4"]
    params["train"].update(iterations=2)
    params["runs"]["x2"].update(norm="iln")
    params["runs"]["x4"].update(norm="iln", task="sr_x4", iterations=1, lr=1.0e-10)
    params["runs"]["x4"]["init"] = {"run": "x2"}
    write_params(root, params)
    for stage in ("download", "degrade"):
        run_stage(root, stage, "--no-progress")
    run_stage(root, "train", "x2")
    run_stage(root, "train", "x4")
    source = torch.load(root / "runs/x2/train/model.pt", weights_only=True)["state_dict"]
    target = torch.load(root / "runs/x4/train/model.pt", weights_only=True)["state_dict"]
    same = [k for k, v in target.items() if k in source and source[k].shape == v.shape]
    assert len(same) > 0.9 * len(target)
    for key in same:
        torch.testing.assert_close(target[key], source[key], rtol=0, atol=1e-6, msg=key)
    init = json.loads((root / "runs/x4/train/summary.json").read_text())["init"]
    assert init["carried"] == len(same) and "upsample.2.weight" in init["fresh"]
    assert len(init["sha256"]) == 64

    params["runs"]["x2"]["iterations"] = 3  # a retrained source trains the run afresh
    write_params(root, params)
    stale = subprocess.run(  # ... but never from the source's old weights
        [sys.executable, str(ROOT / "stages" / "train.py"), "x4"],
        cwd=root,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stale.returncode != 0 and "Traceback" not in stale.stderr
    assert "runs.x4.init.run: x2's weights are from step 2" in stale.stderr
    assert "dvc repro train@x2" in stale.stderr
    assert _summary_of(root, "x4")["init"]["sha256"] == init["sha256"]  # nothing rewritten
    run_stage(root, "train", "x2")
    run_stage(root, "train", "x4")
    assert _summary_of(root, "x4")["resumed_from"] == 0
    run_stage(root, "train", "x4")  # an unchanged source resumes the finished run
    assert _summary_of(root, "x4")["resumed_from"] == 1


def _summary_of(root, run):
    return json.loads((root / "runs" / run / "train" / "summary.json").read_text())


def test_probe_steps_that_are_not_logged_steps_do_not_hang_two_processes(iln_project, tmp_path):
    """probe_every 6 is not a multiple of log_every 4: every rank enters the collectives of
    the probe steps (their finite check and global loss), though only rank 0 probes."""
    root = copy_project(iln_project, tmp_path / "p")
    params = read_params(root)
    params["train"].update(iterations=12, log_every=4, probe_every=6)
    write_params(root, params)
    _finish(_torchrun(root, "--standalone", "--nproc_per_node", "2"), "probes", timeout=300)
    with open(root / "runs" / RUN / "train" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [4, 6, 8, 12]
    assert [bool(r["val_psnr"]) for r in rows] == [False, True, False, True]


@pytest.mark.parametrize(("key", "values"), [("log_every", (1, 2)), ("iterations", (6, 4))])
def test_nodes_with_another_schedule_stop_at_once_with_one_line_each(
    iln_project, tmp_path, key, values
):
    """Two loopback nodes whose params differ outside the fingerprint (how often to log, how
    many steps): every rank names the key and both values and exits before any work (no
    MLflow run, no output), no hang, no rendezvous timeout."""
    port, nodes = _free_port(), []
    for node, value in enumerate(values):
        root = copy_project(iln_project, tmp_path / f"node{node}")
        params = read_params(root)
        params["train"][key] = value
        write_params(root, params)
        nodes.append(
            _torchrun(
                root,
                *("--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1"),
                *("--master_addr", "127.0.0.1", "--master_port", str(port)),
            )
        )
    started, expected = (
        time.monotonic(),
        (
            f"train: error: train.{key} differs between the processes: {values[0]} on rank 0, "
            f"{values[1]} on rank 1;"
        ),
    )
    for node, process in enumerate(nodes):
        try:
            _, err = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            pytest.fail(f"node {node} still running after 240 s")
        assert process.returncode != 0
        ours = [line for line in err.splitlines() if line.startswith("train: ")]
        assert len(ours) == 1 and ours[0].startswith(expected), err[-2000:]
    assert time.monotonic() - started < 120  # start-up included; the check itself is one gather
    assert not any((tmp_path / f"node{n}" / "runs").exists() for n in range(2))  # nothing begun
