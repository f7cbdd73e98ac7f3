"""The SLURM recipe, against stand-ins for sbatch, srun and scontrol that record their calls."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def _project(tmp_path: Path, runs: dict) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "project"
    (root / "slurm").mkdir(parents=True)
    for name in ("train.sbatch", "submit_grid.sh"):
        shutil.copy(ROOT / "slurm" / name, root / "slurm" / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["runs"] = runs
    params["degrade"]["tasks"] = ["sr_x2", "sr_x4"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    _stub(bin_dir, "sbatch", f'echo "sbatch $*" >> {log}; echo $((RANDOM + 1000))')
    _stub(bin_dir, "srun", f'echo "srun $*" >> {log}')
    _stub(bin_dir, "scontrol", "echo node-a; echo node-b")
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(ROOT / "src"),
        ILN_PYTHON=sys.executable,
    )
    return root, env


def test_the_grid_is_submitted_sources_first_with_job_dependencies(tmp_path):
    runs = {
        "x2": {"arch": "hat_tiny", "norm": "iln", "task": "sr_x2"},
        "x4": {"arch": "hat_tiny", "norm": "iln", "task": "sr_x4", "init": {"run": "x2"}},
    }
    root, env = _project(tmp_path, runs)
    out = subprocess.run(
        ["bash", "slurm/submit_grid.sh", "--nodes", "2", "--", "x4"],  # x2 comes with it
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert [c.split()[-1] for c in calls] == ["x2", "x4"]
    x2_job = out.stdout.splitlines()[0].split("job ")[1]
    assert "--nodes 2" in calls[1] and f"--dependency afterok:{x2_job}" in calls[1]
    assert "--dependency" not in calls[0]


def test_the_job_starts_one_torchrun_per_node_on_the_first_node_as_rendezvous(tmp_path):
    root, env = _project(tmp_path, {"a": {"arch": "hat_tiny", "norm": "ln", "task": "sr_x2"}})
    env.update(
        SLURM_SUBMIT_DIR=str(root),
        SLURM_GPUS_ON_NODE="4",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_ID="77",
        SLURM_CPUS_PER_TASK="16",
    )
    out = subprocess.run(
        ["bash", "slurm/train.sbatch", "a"], cwd=root, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    call = (tmp_path / "calls.log").read_text()
    for part in (
        "-m torch.distributed.run",
        "--nnodes 2",
        "--nproc_per_node 4",
        "--rdzv_endpoint node-a:29500",
        "--rdzv_id iln-77",
        "stages/train.py a",
    ):
        assert part in call


def test_a_bad_params_file_is_one_line(tmp_path):
    root, env = _project(tmp_path, {"a": {"arch": "nope", "norm": "ln", "task": "sr_x2"}})
    out = subprocess.run(
        ["bash", "slurm/submit_grid.sh"], cwd=root, env=env, capture_output=True, text=True
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "runs.a.arch" in out.stderr


def _job(root, env, **slurm):
    env = {**env, "SLURM_SUBMIT_DIR": str(root), "SLURM_JOB_NODELIST": "node-a",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "5", **slurm}  # fmt: skip
    return subprocess.run(
        ["bash", "slurm/train.sbatch", "a"], cwd=root, env=env, capture_output=True, text=True
    )


def test_zero_gpus_need_a_cpu_thread_count_and_then_run_one_process(tmp_path):
    root, env = _project(tmp_path, {"a": {"arch": "hat_tiny", "norm": "ln", "task": "sr_x2"}})
    env.pop("OMP_NUM_THREADS", None)
    out = _job(root, env, SLURM_GPUS_ON_NODE="0")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "no GPU on this node" in out.stderr and "OMP_NUM_THREADS" in out.stderr
    assert "division" not in out.stderr and not (tmp_path / "calls.log").exists()
    out = _job(root, {**env, "OMP_NUM_THREADS": "4"}, SLURM_GPUS_ON_NODE="0")
    assert out.returncode == 0, out.stderr
    assert "--nproc_per_node 1" in (tmp_path / "calls.log").read_text()


def test_a_run_name_without_the_separator_is_refused_in_one_line(tmp_path):
    root, env = _project(tmp_path, {"ln": {"arch": "hat_tiny", "norm": "ln", "task": "sr_x2"}})
    for args in (["ln"], ["--nodes", "2", "ln"]):
        out = subprocess.run(
            ["bash", "slurm/submit_grid.sh", *args], cwd=root, env=env, capture_output=True,
            text=True,
        )  # fmt: skip
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert "no -- among the arguments" in out.stderr
    assert not (tmp_path / "calls.log").exists()  # nothing submitted
