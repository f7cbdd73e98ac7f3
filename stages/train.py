"""DVC stage `train@RUN`: train one grid member, resuming from its last checkpoint.

python stages/train.py RUN [--params params.yaml]
torchrun --nproc_per_node N stages/train.py RUN     # one run over N GPUs (DDP)

W processes train exactly what one process trains at the same global batch (iln.training.loop), so
the process count is not part of the run. Several nodes must see the same project folder;
only rank 0 reads checkpoints and writes outputs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

import iln
from iln import tracking
from iln.cli.stage import project_root, run_stage, store_root, warn
from iln.config.layout import HISTORY_COLUMNS, PROBES_CSV_COLUMNS, Layout
from iln.config.params import Params, flatten, load_params, resolve_run
from iln.data.dataset import TestPairs
from iln.evaluation.monitor import deepest_group_curves, probe_batch, training_monitor
from iln.evaluation.protocols import protocol_for
from iln.figures.styles import norm_style
from iln.training.distributed import agree, shutdown
from iln.training.fingerprint import code_digest
from iln.training.job import TrainingJob, member_params, start_job, train_summary
from iln.training.loop import FitResult, LogFn, MonitorFn, fit
from iln.training.resume import previous_path
from iln.training.sources import run_fingerprint
from iln.util.device import fp32_precision
from iln.util.files import write_csv_atomic, write_json_atomic
from iln.weights.trained import save_trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="name of the run under `runs:` in the params file")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    run = resolve_run(params, args.run)
    layout = Layout(project_root())
    code = code_digest(Path(__file__), Path(iln.__file__).parent)
    job = start_job(run, params, layout, os.environ, code=code)
    fingerprint = run_fingerprint(run, layout, code=code)  # what a checkpoint must match
    agree(job.dist, fingerprint, "the run's fingerprint")
    with tracked(job, params, layout, fingerprint) as tracker:
        log = (lambda step, metrics: tracker.log_metrics(metrics, step=step)) if tracker else None
        ema, result = fit(
            job.model,
            job.dataset,
            run.train,
            device=job.dist.device,
            checkpoint_path=layout.checkpoint(run.name),
            fingerprint=fingerprint,
            rank=job.dist.rank,
            world_size=job.dist.world_size,
            on_log=log,
            monitor=training_probes(job, params, layout, log),
            warn=lambda message: warn("train", message),
        )
        if tracker:
            write_outputs(job, params, layout, ema, result, tracker, fingerprint)
    shutdown(job.dist)
    return 0


@contextmanager
def tracked(
    job: TrainingJob, params: Params, layout: Layout, fingerprint: str
) -> Iterator[tracking.StageRun | None]:
    """The MLflow run of this training on rank 0 (a resumed training continues its run);
    None on the other ranks."""
    if not job.dist.is_main:
        yield None
        return
    run, checkpoint = job.run, layout.checkpoint(job.run.name)
    store = tracking.tracking_uri(store_root())
    resuming = checkpoint.exists() or previous_path(checkpoint).exists()
    with tracking.stage_run(
        store_root(),
        experiment=params.tracking.experiment,
        stage="train",
        run_name=run.name,
        norm=run.spec.norm,
        color=norm_style(run.spec.norm).color,
        params={**flatten(run.spec, "run"), **flatten(run.train, "train")},
        tags={
            "iln.fingerprint": fingerprint,
            "iln.world_size": job.dist.world_size,
            "iln.device": str(job.dist.device),
            "iln.tf32": job.tf32,
            "iln.fp32_matmul": fp32_precision()["matmul"],  # tf32 or ieee (full fp32)
            "iln.cudnn_benchmark": job.cudnn_benchmark,
        },
        # a resumed training continues its run
        continue_run=tracking.tracked_run(checkpoint.parent, fingerprint, store)
        if resuming
        else None,
    ) as tracker:
        tracking.remember_tracked_run(checkpoint.parent, fingerprint, store, tracker.run_id)
        yield tracker


def training_probes(
    job: TrainingJob, params: Params, layout: Layout, log: LogFn | None
) -> MonitorFn:
    """Feature statistics of a probe batch and the validation PSNR on the first images of
    the task's first test set, during training (``iln.evaluation.monitor``)."""
    run, settings = job.run, job.run.train
    test_set = params.test_sets(run.spec.task)[0]
    pairs = list(TestPairs(*layout.pair_dirs(run.spec.task, test_set)))[: settings.probe_images]
    return training_monitor(
        probe_batch([lq for _, lq, _ in pairs], size=2 * settings.lq_patch),
        pairs,
        crop_border=protocol_for(run.spec.task).crop_border,
        device=job.dist.device,
        per_block=settings.probe_per_block,
        log=log,
    )


def write_outputs(
    job: TrainingJob,
    params: Params,
    layout: Layout,
    ema: nn.Module,
    result: FitResult,
    tracker: tracking.StageRun,
    fingerprint: str,
) -> None:
    """model.pt, history.csv, probes.csv and summary.json, and what MLflow keeps of them."""
    run, out = job.run, layout.train_dir(job.run.name)
    save_trained(
        layout.weights(run.name),
        ema,
        arch=run.spec.arch,
        norm=run.spec.norm,
        scale=run.scale,
        overrides=run.model_overrides(),
        raw=job.model,
    )
    write_csv_atomic(out / "history.csv", result.history, HISTORY_COLUMNS)
    write_csv_atomic(out / "probes.csv", result.monitor_rows, PROBES_CSV_COLUMNS)
    write_json_atomic(out / "summary.json", train_summary(job, result, ema, fingerprint))
    tracker.set_tags({"iln.resumed_from": result.resumed_from})
    tracker.log_metrics({"seconds_per_step_mean": result.seconds_per_step})
    for name in ("history.csv", "probes.csv", "summary.json"):
        tracker.log_artifact(out / name)
    tracking.log_to_group(
        layout.root,
        experiment=params.tracking.experiment,
        run_name=run.name,
        params=member_params(run),
        metrics={"steps": result.steps},
        step=result.steps,
        curves=member_curves(result.history, result.monitor_rows),
        note=member_note(job),
    )


def member_curves(
    history: list[dict[str, object]], monitor_rows: list[dict[str, object]]
) -> dict[str, list[tuple[int, float]]]:
    """The step curves a user compares on the member's parent run: the training loss, the
    validation PSNR, the deepest group's magnitude and entropy, and ``log10`` of that
    magnitude (MLflow's charts open on a linear axis, where i-LN's magnitude is a flat line
    beside LN's)."""
    curves = deepest_group_curves(monitor_rows)
    magnitude = curves.get("features/deepest/magnitude", [])
    curves["features/deepest/log10_magnitude"] = [
        (step, math.log10(value)) for step, value in magnitude if value > 0
    ]
    for column, key in (("loss", "loss"), ("val_psnr", "val/psnr")):
        curves[key] = [
            (int(row["step"]), float(row[column]))
            for row in history
            if row.get(column) not in (None, "")
        ]
    return curves


def member_note(job: TrainingJob) -> str:
    """The parent run's description in the MLflow UI."""
    spec, settings = job.run.spec, job.run.train
    return (
        f"{norm_style(spec.norm).label} on {spec.arch}, task {spec.task}: "
        f"{settings.iterations} iterations at batch {settings.batch_size}, lr {settings.lr:g}, "
        f"EMA decay {settings.ema_decay:g}. Its train, evaluate and analyze stage runs are "
        "the child runs below; features/deepest/* are the deepest group's feature magnitude "
        "mean(x^2) and channel entropy (nats) of the weights being trained, per probe step."
    )


if __name__ == "__main__":
    sys.exit(run_stage("train", main))
