"""Benchmark suite: timing helpers, FLOP counting, memory measurement and the CLI output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from benchmarks import suite as bench
from benchmarks import timing
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def test_summarize_known_samples():
    t = timing.summarize([0.3, 0.1, 0.2, 0.4], warmup=2)
    assert t.median_s == pytest.approx(0.25)
    assert (t.min_s, t.max_s) == (0.1, 0.4)
    assert t.iqr_s == pytest.approx(0.325 - 0.175)
    assert t.repeats == 4 and t.warmup == 2
    assert t.samples_s == (0.3, 0.1, 0.2, 0.4)  # call order kept
    with pytest.raises(ValueError, match="at least one sample"):
        timing.summarize([], warmup=0)
    with pytest.raises(ValueError, match="1 CPU-time samples for 2"):
        timing.summarize([0.1, 0.2], warmup=0, cpu_samples=[0.1])


def test_time_callable_measures_a_sleep():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.02)

    t = timing.time_callable(work, repeats=3, warmup=2)
    assert len(calls) == 5  # warm-up calls run but are not timed
    assert t.repeats == 3 and len(t.samples_s) == 3
    assert 0.02 <= t.min_s <= t.median_s <= t.max_s < 1.0
    assert t.cpu_median_s < 0.01 and len(t.cpu_samples_s) == 3  # sleeping uses no CPU time


def test_time_interleaved_rotates_and_separates_the_arms():
    order = []
    fns = {
        "fast": lambda: order.append("fast"),
        "slow": lambda: (order.append("slow"), time.sleep(0.02)),
    }
    times = timing.time_interleaved(fns, repeats=4, warmup=1)
    assert order[:2] == ["fast", "slow"]  # warm-up round
    assert order[2:] == [
        "fast",
        "slow",
        "slow",
        "fast",
        "fast",
        "slow",
        "slow",
        "fast",
    ]  # start rotates
    assert times["slow"].median_s >= 0.02 > times["fast"].median_s
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        timing.time_interleaved(fns, repeats=0, warmup=0)


def test_count_flops_of_a_linear_layer():
    layer = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    assert bench.count_flops(lambda: layer(x)) == 2 * 5 * 8 * 4
    xg = x.clone().requires_grad_(True)
    # backward: grads of the input (5x4 @ 4x8) and weight (4x5 @ 5x8), each as large as forward
    assert bench.count_flops(lambda: layer(xg).sum().backward()) == 3 * 2 * 5 * 8 * 4


def test_matmul_peak_counts_2n3():
    peak = bench.measure_matmul_peak(
        64,
        device=torch.device("cpu"),
        repeats=2,
        warmup=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert peak["flops"] == 2 * 64**3
    assert peak["gflops"] == pytest.approx(peak["flops"] / peak["timing"]["median_s"] / 1e9)


_PEAK_SCRIPT = """
import json, torch
from benchmarks import suite as bench
mib = 2**20
def work():
    a = torch.ones(64 * mib // 4)  # 64 MiB touched
    b = torch.ones(32 * mib // 4)  # 96 MiB alive: the peak
    del a
    c = torch.ones(16 * mib // 4)
    return float(b[0] + c[0])
print(json.dumps(bench.measure_peak_memory(work, device=torch.device("cpu"))))
"""


def test_peak_memory_counts_the_fresh_memory_of_the_call():
    # in a fresh interpreter: memory that earlier tests freed (still resident) would be
    # reused by the call without growing its RSS
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True
    )
    mem, mib = json.loads(out.stdout.splitlines()[-1]), 2**20
    assert mem["method"] == "child_process_peak_rss_growth"
    assert 80 * mib <= mem["step_peak_bytes"] <= 140 * mib
    assert mem["rss_peak_bytes"] >= mem["step_peak_bytes"]

    def fail():
        raise ValueError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        bench.measure_peak_memory(fail, device=torch.device("cpu"))


def test_ratios_and_fast_path_summary_from_rows():
    def row(preset, norm, path, step, infer):
        return {
            "preset": preset,
            "norm": norm,
            "path": path,
            "train_step": {
                "samples_s": step,
                "median_s": sorted(step)[1],
                "min_s": min(step),
                "cpu_samples_s": [0.5 * t for t in step],
            },
            "inference": {"samples_s": infer, "median_s": sorted(infer)[1], "min_s": min(infer)},
        }

    # round 2 of LN was slowed by a neighbour: the paired ratio ignores it, the medians do not
    rows = [
        row("hat_1", "ln", "fast", [1.0, 3.0, 3.0], [1.0, 1.0, 1.0]),
        row("hat_1", "iln", "fast", [1.05, 1.05, 3.15], [1.0, 1.0, 1.0]),
        row("hat_1", "ln", "reference", [1.5, 1.5, 3.0], [2.0, 2.0, 2.0]),
        row("hat_tiny", "iln", "fast", [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),
    ]
    ratios = bench.iln_ratios(rows)
    assert list(ratios) == ["hat_1"]  # no LN twin for hat_tiny
    assert ratios["hat_1"]["iln_over_ln_train_step"] == pytest.approx(1.05)
    assert ratios["hat_1"]["iln_over_ln_train_step_of_medians"] == pytest.approx(0.35)
    assert ratios["hat_1"]["iln_over_ln_train_step_cpu_time"] == pytest.approx(1.05)
    assert ratios["hat_1"]["meets_target"] is False
    summary = bench.fast_path_summary(
        rows, {"inference_output": 1e-7, "train_output": 2e-5, "train_grad": 0.0}
    )
    assert summary["train_speedup_fast_over_reference"] == pytest.approx(
        1.0
    )  # paired: [1.5, 0.5, 1.0]
    assert summary["meets_speed_target"] is False
    assert summary["outputs_agree"] is False  # 2e-5 > 1e-5


@pytest.mark.integration
def test_quick_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench" / "results.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.suite",
        "--quick",
        "--presets",
        "hat_tiny",
        "--threads",
        "1",
        "--silent",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--lr-patch",
        "8",
        "--infer-size",
        "8",
        "--bicubic-shape",
        "40",
        "48",
        "--bicubic-crop",
        "16",
        "--bicubic-scales",
        "2",
        "4",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert {
        "machine",
        "settings",
        "matmul_peak",
        "models",
        "ratios",
        "fast_path",
        "bicubic",
        "targets",
    } <= set(result)
    assert (
        result["machine"]["torch"] == torch.__version__ and result["machine"]["torch_threads"] == 1
    )
    assert result["settings"]["lr_patch"] == 8 and result["settings"]["batch"] == 1
    labels = [r["label"] for r in result["models"]]
    assert labels == ["hat_tiny/ln", "hat_tiny/iln", "hat_tiny/ln/reference"]
    for r in result["models"]:
        assert r["train_step"]["median_s"] > 0 and r["inference"]["median_s"] > 0
        assert r["flops_per_step"] > 0 and r["achieved_gflops"] > 0
        assert r["memory_train_step"]["step_peak_bytes"] > 0
    flops = {r["label"]: r["flops_per_step"] for r in result["models"]}
    assert flops["hat_tiny/ln"] == flops["hat_tiny/ln/reference"]  # same work, different kernels
    assert "hat_tiny" in result["ratios"]
    assert [p["preset"] for p in result["matmul_peak"]["measurements"]] == ["hat_tiny"]
    assert all(
        r["matmul_peak_gflops"] == result["matmul_peak"]["gflops_max"] for r in result["models"]
    )
    fast_path = result["fast_path"]
    assert fast_path["preset"] == "hat_tiny" and fast_path["outputs_agree"] is True
    assert set(result["bicubic"]["scales"]) == {"2", "4"}
    assert all(r["identical_uint8"] for r in result["bicubic"]["scales"].values())
    table = out.with_suffix(".md").read_text()
    assert "| hat_tiny/iln |" in table and "i-LN / LN" in table
    assert table in proc.stdout
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes leave no temp files


def test_cli_rejects_an_unknown_preset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--presets", "hat_huge", "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2
    assert "hat_huge" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_einops_stand_in_of_the_authors_comparison_matches_the_pattern():
    from benchmarks import vs_official

    b, nc, ch, ow, nw = 2, 2, 3, 4, 5
    t = torch.arange(b * nc * ch * ow * ow * nw, dtype=torch.float32).view(b, nc * ch * ow * ow, nw)
    got = vs_official._rearrange(
        t, "b (nc ch owh oww) nw -> nc (b nw) (owh oww) ch", nc=nc, ch=ch, owh=ow, oww=ow
    )
    assert got.shape == (nc, b * nw, ow * ow, ch)
    split = t.view(b, nc, ch, ow * ow, nw)
    for i, j, n, p, c in [(0, 0, 0, 0, 0), (1, 1, 3, 7, 2), (1, 0, 4, 15, 1)]:
        assert got[j, i * nw + n, p, c] == split[i, j, c, p, n]
    with pytest.raises(NotImplementedError, match="pattern"):
        vs_official._rearrange(t, "b c n -> n b c")


def test_authors_comparison_names_a_path_that_is_not_their_checkout(tmp_path):
    from benchmarks import vs_official

    with pytest.raises(FileNotFoundError, match="hat_arch.py"):
        vs_official.official_classes(tmp_path)


def test_every_fast_piece_swapped_for_its_reference_computes_the_same_model():
    """benchmarks.fast_pieces times the fast path against itself with one piece swapped:
    that is only a fair comparison if the swapped-in reference computes the same thing."""
    from benchmarks import fast_pieces

    from iln.models import build_model
    from iln.models import fast as fast_ops

    model = build_model("hat_tiny", norm="iln", scale=2, drop_path_rate=0.0)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    originals = {name: getattr(fast_ops, name) for p in fast_pieces.PIECES.values() for name in p}
    for piece in fast_pieces.PIECES:
        with fast_pieces.swapped(piece):
            assert all(getattr(fast_ops, n) is not originals[n] for n in fast_pieces.PIECES[piece])
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5, msg=piece)
    assert all(getattr(fast_ops, name) is f for name, f in originals.items())
