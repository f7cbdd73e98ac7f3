"""``iln smoke``: the smoke pipeline from the command line (its arguments and output)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from iln.smoke.pipeline import (
    LOG_NAME,
    OVERLAY,
    SmokeError,
    check_metrics,
    environment,
    metrics_table,
    run,
    shown_metrics,
    stage_times,
)

DESCRIPTION = """\
Run every stage of the pipeline (download, degrade, train, evaluate, analyze, report, the
MLflow records) with `dvc repro` on small data: the project's dvc.yaml, stages and
params.yaml plus the overlay configs/smoke.yaml (the embedded photos, LN and i-LN, 30
iterations), in a copy of the project. The workspace (params.yaml, dvc.lock, runs/,
reports/, mlflow.db) is never written. Then checks that the report and every output exist,
that `dvc metrics show` has a finite value of every metric for each run and the bicubic
baseline, and that MLflow holds a finished run of every stage.

Exit status 0 when all of it holds; 1 with one line naming the cause (the failed stage and
its error line, or the missing output, metric or MLflow run) otherwise; DVC's full output
is in the copy's smoke.log, which is kept on failure.
"""
EPILOG = """\
examples:
  iln smoke                     a temporary copy, removed when it passes
  iln smoke --out /tmp/smoke    keep the copy: reports/, mlflow.db, smoke.log
  iln smoke --out /tmp/smoke --compare /tmp/smoke-base
                                the metrics of two finished copies side by side
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="a new or empty folder for the copy, kept afterwards (default: a temporary "
        "folder, removed when the smoke run passes)",
    )
    parser.add_argument(
        "--project", default=".", metavar="DIR", help="the project to copy (default: here)"
    )
    parser.add_argument(
        "--overlay",
        metavar="FILE",
        help=f"the small params, applied to the copy's params.yaml (default: {OVERLAY})",
    )
    parser.add_argument(
        "--compare",
        metavar="BASE",
        help="run nothing: print a Markdown table of the metrics of the finished copy --out "
        "beside those of the finished copy BASE (e.g. of the base branch)",
    )


def smoke(args: argparse.Namespace) -> int:
    if args.compare:
        return _compare(args)
    project = Path(args.project)
    overlay = Path(args.overlay) if args.overlay else project / OVERLAY
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="iln-smoke-"))
    try:
        outcome = run(project, out, overlay, os.environ)
    except SmokeError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail(f"interrupted; the copy is in {out}", code=130)
    repro = outcome.repro
    print(
        f"iln smoke: dvc repro ran {len(repro.stages)} stages in {repro.seconds:.1f} s "
        f"({repro.cpu_seconds:.1f} s of CPU time): "
        f"{stage_times(repro.stages)}"
    )
    print(metrics_table(outcome.checked.metrics))
    if outcome.checked.headline:
        print(outcome.checked.headline)
    where = f"the copy is in {out}" if args.out else "the copy is removed (--out DIR keeps it)"
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    print(
        f"iln smoke: passed in {outcome.seconds:.1f} s (report, {len(outcome.checked.metrics)} "
        f"metric rows and {outcome.checked.stage_runs} MLflow stage runs checked); {where}"
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    if not args.out:
        return _fail("--compare BASE needs --out DIR, the branch's finished copy", code=2)
    env = environment(os.environ)
    try:
        branch = shown_metrics(Path(args.out), env)
        check_metrics(branch, {name: () for name in branch})
    except SmokeError as err:
        return _fail(f"{args.out}: {err}")
    try:
        base = shown_metrics(Path(args.compare), env)
    except (SmokeError, OSError):
        base = {}
    print(metrics_table(branch, base))
    return 0


def _fail(message: str, code: int = 1) -> int:
    print(f"iln smoke: {' '.join(message.split())}", file=sys.stderr)
    return code


__all__ = ["DESCRIPTION", "EPILOG", "LOG_NAME", "add_arguments", "smoke"]
