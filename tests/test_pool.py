"""iln.util.pool: how processes and threads are planned, and that spreading jobs over processes
changes nothing but the time (order, values, errors), down to the evaluation's numbers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from iln.data.io import write_png
from iln.evaluation.inference import ImageJob, central_crop_pairs, model_restore_fn
from iln.models import build_model
from iln.util.pool import plan, run_jobs, usable_cores
from iln.evaluation.precision import PrecisionJob, evaluate_precisions
from iln.evaluation.protocols import protocol_for


@pytest.mark.parametrize(
    "workers, jobs, cores, expected",
    [
        (0, 10, 4, (4, 1)),  # one process per core
        (0, 2, 4, (2, 2)),  # fewer jobs than cores: the cores are shared out as threads
        (3, 10, 8, (3, 2)),  # 3 x 2 <= 8
        (1, 5, 2, (1, 2)),  # one process uses every core
        (8, 10, 2, (8, 1)),  # asked for more processes than cores: one thread each
        (0, 0, 4, (1, 4)),
    ],
)
def test_plan_never_oversubscribes(workers, jobs, cores, expected):
    processes, threads = plan(workers, jobs, cores=cores)
    assert (processes, threads) == expected
    assert processes * threads <= max(cores, processes)


def test_plan_rejects_negative_workers():
    with pytest.raises(ValueError, match="workers must be >= 0"):
        plan(-1, 3)
    assert plan(0, 100)[0] == min(usable_cores(), 100)


@dataclass(frozen=True)
class Scaled:
    """A job: shared * value, with the torch threads it ran with and the process id."""

    value: int

    def __call__(self, shared: int) -> tuple[int, int, int]:
        if self.value < 0:
            raise ValueError(f"job {self.value}: negative values are refused")
        return shared * self.value, torch.get_num_threads(), os.getpid()


def test_run_here_sets_and_restores_threads():
    before = torch.get_num_threads()
    out = run_jobs(3, [Scaled(v) for v in range(4)], processes=1, threads=2, progress=False)
    assert [r[0] for r in out] == [0, 3, 6, 9] and {r[1] for r in out} == {2}
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="job -1: negative"):
        run_jobs(3, [Scaled(1), Scaled(-1)], processes=1, threads=1, progress=False)


@pytest.mark.integration
def test_spread_jobs_keep_their_order_and_report_errors_as_raised():
    jobs = [Scaled(v) for v in range(7)]
    out = run_jobs(5, jobs, processes=2, threads=1, progress=False)
    assert [r[0] for r in out] == [5 * v for v in range(7)]
    assert {r[1] for r in out} == {1} and os.getpid() not in {r[2] for r in out}
    with pytest.raises(ValueError, match=r"^job -2: negative values are refused$"):
        run_jobs(5, [Scaled(1), Scaled(-2), Scaled(3)], processes=2, threads=1, progress=False)


@pytest.mark.integration
def test_per_image_metrics_are_the_same_with_one_and_two_workers(tmp_path):
    """The evaluation jobs of the stage on hat_tiny i-LN: identical rows and restorations."""
    torch.manual_seed(0)
    model = build_model("hat_tiny", norm="iln", scale=2).eval()
    rng = np.random.default_rng(0)
    jobs = []
    for k, (h, w) in enumerate([(20, 24), (17, 30), (24, 16)]):
        lq = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        gt = rng.integers(0, 256, (2 * h, 2 * w, 3), dtype=np.uint8)
        write_png(tmp_path / f"lq{k}.png", lq)
        write_png(tmp_path / f"gt{k}.png", gt)
        jobs.append(
            ImageJob(
                "sr_x2",
                f"img{k}",
                tmp_path / f"lq{k}.png",
                tmp_path / f"gt{k}.png",
                protocol_for("sr_x2"),
                keep=True,
                ensemble=k == 0,
            )
        )
    restorers = {"sr_x2": model_restore_fn(model, device="cpu")}
    one = run_jobs(restorers, jobs, processes=1, threads=1, progress=False)
    two = run_jobs(restorers, jobs, processes=2, threads=1, progress=False)
    assert [row for row, _ in one] == [row for row, _ in two]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(one, two))
    assert "psnr_x8" in one[0][0] and "psnr_x8" not in one[1][0]


def test_precision_jobs_one_format_each_equal_the_whole_table(tmp_path):
    torch.manual_seed(1)
    model = build_model("hat_tiny", norm="ln", scale=2).eval()
    rng = np.random.default_rng(1)
    files, pairs = [], []
    for k in range(2):
        lq = rng.integers(0, 256, (20, 22, 3), dtype=np.uint8)
        gt = rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)
        write_png(tmp_path / f"lq{k}.png", lq)
        write_png(tmp_path / f"gt{k}.png", gt)
        files.append((f"img{k}", tmp_path / f"lq{k}.png", tmp_path / f"gt{k}.png"))
        pairs.append((f"img{k}", lq, gt))
    modes = ("fp32", "int8")
    whole = evaluate_precisions(
        model,
        central_crop_pairs(pairs, lq_size=16, scale=2),
        scale=2,
        device="cpu",
        modes=modes,
        crop_border=2,
        progress=False,
    )
    restorers = {"sr_x2": model_restore_fn(model, device="cpu")}
    jobs = [PrecisionJob("sr_x2", "s", tuple(files), mode, 16, 2) for mode in modes]
    assert run_jobs(restorers, jobs, processes=1, threads=1, progress=False) == [
        whole[m] for m in modes
    ]
