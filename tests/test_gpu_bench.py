"""``benchmarks/gpu.py``: its smoke run on the CPU with mlflow, dvc, scikit-image and matplotlib
unimportable (as on the GPU machines), a run killed mid-way, and the pieces that decide what it
reports."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from benchmarks import gpu

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("mlflow", "dvc", "skimage", "matplotlib")  # not on the GPU machines

BLOCKER = f"""\
import sys


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {ABSENT!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machines")
        return None


sys.meta_path.insert(0, _Absent())
"""


def _smoke(tmp_path: Path, out: Path) -> subprocess.Popen:
    """``python -m benchmarks.gpu --smoke --out OUT`` with the four packages unimportable
    (a sitecustomize on PYTHONPATH installs a meta-path blocker before anything runs)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(site), str(ROOT / "src"), str(ROOT)])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.integration
def test_smoke_run_without_tracking_or_plotting_names_every_kernel_and_resumes_fit(tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    child = _smoke(tmp_path, out)
    _, stderr = child.communicate(timeout=240)
    assert child.returncode == 0, stderr[-3000:]
    assert time.perf_counter() - start < 240
    report = json.loads((out / "gpu.json").read_text())
    assert (out / "gpu.md").read_text().startswith("# GPU benchmark")
    device = report["device"]
    assert device["device"] == "cpu" and device["smoke"] is True
    assert device["progress"]["done"] == list(gpu.SECTIONS) and not device["progress"]["left"]
    assert device["fp32_precision"]["matmul"] in ("ieee", "tf32")
    assert device["inductor_cache"] == str(out / "inductor_cache")
    rows = [row for name in gpu.SECTIONS for row in report[name]]
    for row in rows:  # every row measured something, naming its kernel, or says why not
        assert row["status"] in ("ok", "error", "not_run", "skipped"), row
        assert row.get("kernel") if row["status"] == "ok" else row["reason"], row
        assert not any(name in str(row.get("reason")) for name in ABSENT), row
    ok = [r for r in report["train_step"] if r["status"] == "ok"]
    assert {(r["norm"], r["precision"]) for r in ok} >= {("iln", "fp32"), ("ln", "fp32")}
    assert {r["attention"] for r in ok} >= {"auto", "sdpa", "materialized"}
    assert {r["path"] for r in ok} == {"fast", "reference"}
    assert {r["mode"] for r in ok} >= {"eager"}
    tf32 = [r for r in report["train_step"] if r["precision"] == "tf32"]
    assert tf32 and all(r["status"] == "not_run" and "CUDA" in r["reason"] for r in tf32)
    compiled = [r for r in report["train_step"] if r["mode"] == "compiled"]
    assert compiled[0]["status"] in ("ok", "skipped", "not_run"), compiled[0]  # a crowded CPU
    assert all(r["seconds"] > 0 for r in ok)
    by_attention = {r["attention"]: r["kernel"] for r in ok if r["mode"] == "eager"}
    assert "route:sdpa" in by_attention["sdpa"] and "sdpa:math" in by_attention["sdpa"]
    assert "route:materialized" in by_attention["materialized"]
    fit = {r["amp"]: r for r in report["fit"]}
    assert fit["fp32"]["status"] == "ok", fit
    assert fit["fp32"]["resumed_equals_uninterrupted"] is True
    assert fit["fp32"]["max_abs_diff_weights"] == 0.0 and fit["fp32"]["max_abs_update"] > 0
    sdpa = [r for r in report["sdpa_backends"] if r["status"] != "not_run"]
    assert {tuple(r["q"])[-1] for r in sdpa} >= {16, 32}  # hat's 30 as the model pads it
    assert any(r["k"] != r["q"] for r in sdpa)  # OCAB's larger key windows
    for r in sdpa:  # the CPU's fused kernel takes no mask that needs its gradient
        if r["backend"] == "fused_only" and r["mode"] == "train":
            assert r["status"] == "error" and "AttentionKernelError" in r["reason"], r
        if r["mode"] == "inference":
            assert r["status"] == "ok" and "sdpa:flash_cpu" in r["kernel"], r
    checks = {r["attention"]: r for r in report["attention_check"]}
    assert checks["sdpa"]["status"] == "ok" and checks["sdpa"]["max_error_bias_grad"] < 1e-4
    assert all(r["status"] == "ok" for r in report["norm_kernel"])
    assert report["official"][0]["reason"] == "not run: --official CHECKOUT not given"
    # the last sections run when the machine leaves them time (a crowded one may not)
    flex = {(r["block"], r["impl"], r["mode"]): r for r in report["flex"]}
    assert "C++" in flex["hab", "flex_compiled", "inference"]["reason"]
    eager = flex["ocab", "flex_eager", "inference"]
    assert _out_of_time(eager) or "route:flex_eager" in eager["kernel"]
    loader = [r for r in report["loader"] if r["status"] == "ok"]
    assert all(r["batches_per_second"] > 0 for r in loader)
    for row in report["fp16_overflow"]:  # a feature beyond fp16's range cannot stay finite
        if not _out_of_time(row):
            assert row["status"] == "ok" and row["overflow_fp32"] is False
            assert row["overflow_fp16"] or not row["exceeds_fp16_range"]
            if (row["norm"], row["embedding_gain"]) == ("ln", 1.0):
                assert row["overflow_fp16"] is False


def _out_of_time(row: dict) -> bool:
    """A row the budget or its time limit stopped (never the case on an idle machine)."""
    return row["status"] != "ok" and ("budget" in row["reason"] or "limit" in row["reason"])


@pytest.mark.integration
def test_a_killed_smoke_run_leaves_the_sections_it_finished(tmp_path):
    out = tmp_path / "out"
    child = _smoke(tmp_path, out)
    report = None
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.5)
            if (out / "gpu.json").exists():
                report = json.loads((out / "gpu.json").read_text())
                if report["device"]["progress"]["done"]:
                    break
        assert child.poll() is None, "the run ended before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    report = json.loads((out / "gpu.json").read_text())  # as the killed run left it
    progress = report["device"]["progress"]
    assert progress["done"] and progress["done"] == list(gpu.SECTIONS[: len(progress["done"])])
    for name in progress["done"]:
        assert report[name] and all(r["status"] for r in report[name])
    assert not [name for name in progress["left"] if name in report]
    assert (out / "gpu.md").read_text().startswith("# GPU benchmark")


def _ctx(plan=gpu.SMOKE, **limits) -> gpu.Context:
    plan = dataclasses.replace(plan, **limits)
    budget = gpu.Budget(total_s=100.0)
    budget.enter("inference", 100.0)
    stuck: list[str] = []
    return gpu.Context(plan, torch.device("cpu"), budget, gpu.Watchdog(60.0, stuck.append), Path())


def test_a_row_past_its_hard_limit_is_skipped_with_the_reason():
    ctx = _ctx(row_limit_s=0.3)
    start = time.perf_counter()
    row = gpu._guarded({"arch": "hat"}, ctx, lambda: time.sleep(20) or {"kernel": "x"})
    assert time.perf_counter() - start < 5
    assert row == {
        "arch": "hat",
        "status": "skipped",
        "reason": "skipped: stopped at its hard time limit of 0.3 s (its row limit)",
    }
    assert gpu._guarded({}, ctx, lambda: {"seconds": 1.0, "kernel": "k"})["status"] == "ok"


def test_a_spent_budget_is_the_reason_a_row_did_not_run():
    ctx = _ctx()
    ctx.budget.enter("inference", 0.0)
    row = gpu._guarded({"arch": "hat"}, ctx, lambda: {"seconds": 1.0, "kernel": "k"})
    assert row == {
        "arch": "hat",
        "status": "not_run",
        "reason": "not run: the inference budget of 0 s was spent",
    }
    ctx.budget.enter("inference", 100.0)
    assert gpu._guarded({}, ctx, lambda: {"seconds": 1.0, "kernel": "k"}) == {
        "status": "ok",
        "seconds": 1.0,
        "kernel": "k",
    }

    def cuda_only():
        raise gpu.Unavailable("tf32 is a CUDA matmul mode; cpu has none")

    assert gpu._guarded({}, ctx, cuda_only) == {
        "status": "not_run",
        "reason": "not run: tf32 is a CUDA matmul mode; cpu has none",
    }
    failed = gpu._guarded({}, ctx, lambda: 1 / 0)
    assert failed == {"status": "error", "reason": "ZeroDivisionError: division by zero"}
    unnamed = gpu._guarded({}, ctx, lambda: {"seconds": 1.0})
    assert unnamed["status"] == "error" and "kernel" in unnamed["reason"]


def test_kernel_names_come_from_the_profilers_op_names():
    keys = [
        "aten::linear",
        "iln::attention.sdpa",
        "aten::scaled_dot_product_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_efficient_attention_backward",
        "fmha_cutlassF_f32_aligned_64x64_rf_sm80",
    ]
    assert gpu.kernel_names(keys) == (
        "cuda:fmha_cutlassF_f32_aligned_64x64_rf_sm80, route:sdpa, sdpa:efficient, "
        "sdpa:efficient_backward"
    )
    assert gpu.kernel_names(["aten::bmm", "aten::_softmax"]) == "unfused: matmul + softmax"
    assert gpu.kernel_names(["aten::add"]) == "no attention op seen"


def test_the_sdpa_rows_replay_the_calls_the_models_make():
    shapes = gpu.model_sdpa_shapes("hat", batch=2, patch=32)  # window 16, 6 heads, dim 180
    assert {"q": [8, 6, 256, 32], "k": [8, 6, 256, 32], "v": [8, 6, 256, 32]}.items() <= (
        shapes[0].items()
    )
    assert shapes[0]["mask"] == [1, 6, 256, 256]  # the bias, shared by every window
    assert [2, 24, 256, 32] in [s["q"] for s in shapes]  # shifted: window positions as heads
    assert [8, 6, 576, 32] in [s["k"] for s in shapes]  # OCAB: 24 x 24 key windows


def test_the_plan_covers_every_precision_implementation_path_and_mode_within_8_minutes():
    specs = gpu.train_step_specs(gpu.FULL)
    assert {s["precision"] for s in specs} == set(gpu.PRECISIONS)
    assert {s["attention"] for s in specs} == {"auto", "sdpa", "flex", "materialized"}
    assert {s["path"] for s in specs} == {"fast", "reference"}
    assert {s["mode"] for s in specs} == {"eager", "compiled"}
    assert gpu.FULL.infer_archs == ("hat_1", "hat", "swinir_1") and gpu.FULL.infer_size == 256
    assert set(gpu.FULL.budgets_s) == set(gpu.SECTIONS)
    assert sum(gpu.FULL.budgets_s.values()) <= gpu.FULL.total_budget_s
    # the run's budget, one row stuck past its limit and the start-up fit in 8 minutes
    assert gpu.FULL.total_budget_s + gpu.FULL.grace_s <= 8 * 60 - 15
    assert set(gpu.FULL.fit_archs) == {"hat_tiny", "hat_1"} and gpu.FULL.fit_steps >= 24
    assert set(gpu.FULL.fit_amps) == {"bf16", "fp32"}


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
