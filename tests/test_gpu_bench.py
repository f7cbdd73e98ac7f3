"""``benchmarks/gpu.py``: its smoke run on the CPU with mlflow and dvc unimportable (as on the
GPU machines), and the pieces that decide what it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from benchmarks import gpu

ROOT = Path(__file__).resolve().parents[1]

WITHOUT_TRACKING = (
    "import runpy, sys\n"
    "sys.modules['mlflow'] = None\n"  # importing either now raises ImportError
    "sys.modules['dvc'] = None\n"
    "sys.argv = ['benchmarks.gpu', *sys.argv[1:]]\n"
    "runpy.run_module('benchmarks.gpu', run_name='__main__')\n"
    "assert sys.modules['mlflow'] is None and sys.modules['dvc'] is None\n"
)


@pytest.mark.integration
def test_smoke_run_without_mlflow_or_dvc_measures_every_section(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRACKING, "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.perf_counter() - start < 240
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert (tmp_path / "gpu.md").read_text().startswith("# GPU benchmark")
    assert report["device"]["device"] == "cpu" and report["device"]["smoke"] is True
    rows = [row for section in report.values() if isinstance(section, list) for row in section]
    for row in rows:  # every row measured something or says why not
        assert row["status"] in ("ok", "error", "not_run"), row
        assert row["status"] == "ok" or row["reason"], row
        assert "mlflow" not in str(row.get("reason")) and "dvc" not in str(row.get("reason"))
    ok = [r for r in report["train_step"] if r["status"] == "ok"]
    assert {(r["norm"], r["precision"]) for r in ok} >= {("iln", "fp32"), ("ln", "fp32")}
    assert {r["attention"] for r in ok} >= {"auto", "sdpa", "materialized"}
    assert {r["path"] for r in ok} == {"fast", "reference"}
    assert {r["mode"] for r in ok} == {"eager", "compiled"}
    assert all(r["seconds"] > 0 for r in ok)
    tf32 = [
        r for r in report["train_step"] if r["precision"] == "tf32" and r["attention"] == "auto"
    ]
    assert tf32 and all("CUDA" in r["reason"] for r in tf32 if r["status"] != "ok")
    inference = {r["arch"]: r for r in report["inference"] if r["status"] == "ok"}
    assert {r["precision"] for r in report["inference"]} == {"fp32", "bf16", "fp16"}
    assert set(inference) == {"hat_1", "hat", "swinir_1"}
    assert all(r["seconds"] > 0 for r in inference.values())
    checks = {r["attention"]: r for r in report["attention_check"]}
    assert checks["sdpa"]["status"] == "ok" and checks["sdpa"]["max_error_bias_grad"] < 1e-4
    assert all(r["status"] == "ok" for r in report["norm_kernel"])
    assert any(r["status"] == "ok" and r["batches_per_second"] > 0 for r in report["loader"])
    overflow = {(r["norm"], r["embedding_gain"]): r for r in report["fp16_overflow"]}
    assert overflow["ln", 1.0]["status"] == "ok" and overflow["ln", 1.0]["overflow_fp16"] is False
    for row in overflow.values():  # a feature beyond fp16's range cannot stay finite in fp16
        assert row["status"] == "ok" and row["overflow_fp32"] is False
        assert row["overflow_fp16"] or not row["exceeds_fp16_range"]
    assert report["official"][0]["reason"] == "not run: --official CHECKOUT not given"


def test_the_plan_covers_every_precision_implementation_path_and_mode():
    specs = gpu.train_step_specs(gpu.FULL)
    assert {s["precision"] for s in specs} == set(gpu.PRECISIONS)
    assert {s["attention"] for s in specs} == {"auto", "sdpa", "flex", "materialized"}
    assert {s["path"] for s in specs} == {"fast", "reference"}
    assert {s["mode"] for s in specs} == {"eager", "compiled"}
    assert gpu.FULL.infer_archs == ("hat_1", "hat", "swinir_1") and gpu.FULL.infer_size == 256
    assert sum(gpu.FULL.budgets_s.values()) <= gpu.FULL.total_budget_s + 60
    assert gpu.FULL.total_budget_s <= 8 * 60 - 30  # leaves time for the model builds


def test_a_spent_budget_is_the_reason_a_row_did_not_run():
    budget = gpu.Budget(total_s=100.0)
    budget.enter("inference", 0.0)
    row = gpu._guarded({"arch": "hat"}, budget, lambda: {"seconds": 1.0})
    assert row == {
        "arch": "hat",
        "status": "not_run",
        "reason": "not run: the inference budget of 0 s was spent",
    }
    budget.enter("inference", 100.0)
    assert gpu._guarded({}, budget, lambda: {"seconds": 1.0}) == {"status": "ok", "seconds": 1.0}
    failed = gpu._guarded({}, budget, lambda: 1 / 0)
    assert failed == {"status": "error", "reason": "ZeroDivisionError: division by zero"}


def test_markdown_has_one_table_per_section_with_every_column():
    report = {
        "device": {"device": "cuda", "name": "GPU"},
        "train_step": [
            {"arch": "hat_1", "status": "ok", "seconds": 0.123456},
            {"arch": "hat", "status": "not_run", "reason": "a | b"},
        ],
    }
    text = gpu.markdown(report)
    assert "- name: GPU" in text
    assert "| arch | status | seconds | reason |" in text
    assert "| hat_1 | ok | 0.1235 |  |" in text
    assert "| hat | not_run |  | a / b |" in text
