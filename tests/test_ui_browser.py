"""`iln ui` in a real browser: started on a store holding a small grid, the one address it
prints opens, in headless Chromium and with no click, the four comparison charts with a line
for LN and for i-LN (benchmarks/mlflow_ui.py, the documented check; skipped without
Chromium)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from benchmarks import mlflow_ui

from tests.test_tracking_view import grid

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (params.yaml, mlflow.db) whose store holds the grid `ln`, `iln`, the
    baseline and the report; this process and `iln ui` both use its default store."""
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    grid(tmp_path, "iln")
    return tmp_path


@pytest.mark.skipif(mlflow_ui.browser() is None, reason="no chromium on PATH")
def test_the_printed_address_opens_the_comparison_charts(project, tmp_path):
    server, url = mlflow_ui.start_ui(project)
    try:
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1" and parts.port  # a free port, not a fixed one
        dom = mlflow_ui.load(url, budget=90, screenshot=tmp_path / "ui.png")
    finally:
        mlflow_ui.stop(server)
    assert mlflow_ui.missing(dom, ["iln", "ln"]) == []
    assert "bicubic (" not in dom and "report (" not in dom  # no lines without data
    assert (tmp_path / "ui.png").stat().st_size > 10_000


def test_a_missing_store_is_one_line(tmp_path):
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    result = subprocess.run(
        [sys.executable, "-m", "iln", "ui"],
        cwd=tmp_path,
        env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("iln ui: error: no MLflow store") and "dvc repro" in line
    assert not (tmp_path / "mlflow.db").exists()  # nothing made
