"""The atomic writer every output goes through: no leftovers, a full disk in one line,
normal permissions, stale temp files of killed processes cleaned."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from iln.util import files
from iln.util.files import DiskFullError, atomic_path, remove_stale_temps, write_json_atomic


def save_atomic(obj, path):
    """torch.save through the atomic writer, as the model and checkpoint writers do."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_any_failure_removes_the_temp_file_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(KeyError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyError("boom")
    assert _leftovers(tmp_path) == []
    assert target.read_text() == '{\n  "a": 1\n}\n'


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "metrics.json"

    real_open = open

    class NoSpace:
        def __init__(self, path, mode):
            self.handle = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "open", NoSpace, raising=False)
    with pytest.raises(DiskFullError) as info:
        write_json_atomic(target, {"psnr": 30.0})
    message = str(info.value)
    assert "\n" not in message and str(target) in message and "no space left" in message
    assert not target.exists() and _leftovers(target.parent) == []


def test_torch_save_iostream_error_on_a_full_disk_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    """torch.save does not say ENOSPC: it says `basic_ios::clear: iostream error`."""

    def failing_save(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"x" * 1000)
        raise RuntimeError("basic_ios::clear: iostream error")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: usage(8 << 20, 8 << 20, 0))
    target = tmp_path / "checkpoint.pt"
    with pytest.raises(DiskFullError, match="checkpoint.pt: no space left"):
        save_atomic({"w": torch.zeros(3)}, target)
    assert _leftovers(tmp_path) == []


def test_other_torch_errors_pass_through_unchanged(tmp_path, monkeypatch):
    def failing_save(obj, path):
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="something else"):
        save_atomic({}, tmp_path / "m.pt")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {})
        save_atomic({"w": torch.zeros(1)}, tmp_path / "b.pt")
    finally:
        os.umask(previous)
    for name in ("a.json", "b.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    live_pid = os.getppid()
    (tmp_path / "run").mkdir()
    stale = [
        tmp_path / f".checkpoint.pt.{dead_pid}.0a1b2c3d.iln.tmp",
        tmp_path / f".checkpoint.pt.tmp{dead_pid}",  # the earlier torch.save writer's name
        tmp_path / "run" / f".model.pt.{dead_pid}.ffff0000.iln.tmp",
    ]
    kept = [
        tmp_path / f".probes.csv.{live_pid}.0a1b2c3d.iln.tmp",  # still being written
        tmp_path / "checkpoint.pt",
        tmp_path / ".hidden",
    ]
    for path in stale + kept:
        path.write_bytes(b"x")
    removed = remove_stale_temps(tmp_path, recursive=True)
    assert sorted(removed) == sorted(stale)
    assert all(path.exists() for path in kept)


@pytest.mark.integration
def test_dvc_never_counts_temp_files_in_an_output():
    root = Path(__file__).resolve().parents[1]
    temps = [
        "checkpoints/ln/.checkpoint.pt.4242.0a1b2c3d.iln.tmp",
        "checkpoints/ln/.checkpoint.pt.tmp4242",
        "runs/ln/eval/samples/sr_x2/default_test/.chelsea.png.4242.0a1b2c3d.iln.tmp",
    ]
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    result = subprocess.run(
        [dvc, "check-ignore", *temps, "checkpoints/ln/checkpoint.pt"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.split() == temps


@pytest.mark.parametrize("name", ["x" * 251 + ".png", "é" * 125 + ".png"])
def test_the_temp_file_of_a_name_near_the_limit_stays_within_255_bytes(tmp_path, name):
    target = tmp_path / name  # 255 bytes: the longest name a file system takes
    with atomic_path(target) as tmp:
        assert len(tmp.name.encode()) <= 255 and tmp.name.endswith(files.TEMP_SUFFIX)
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done"
    assert _leftovers(tmp_path) == []
