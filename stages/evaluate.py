"""DVC stage `evaluate@RUN` (and `baseline`): PSNR/SSIM on every test set, restored samples,
and the inference-precision table. Each task is scored by its protocol (iln.evaluation.protocols).

    python stages/evaluate.py RUN [--params params.yaml]  # RUN: a `runs:` or `released:` entry
    python stages/evaluate.py bicubic            # the baseline: bicubic upsampling for SR,
                                                 # the degraded input itself for DN/CAR/DR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from iln import tracking
from iln.cli.stage import project_root, run_stage, store_root
from iln.config.layout import PER_IMAGE_COLUMNS, PER_IMAGE_ENSEMBLE_COLUMNS, Layout
from iln.config.params import load_params
from iln.data.io import write_png
from iln.evaluation.scoring import Restorers, Scores, collect, open_restorers, plan_jobs
from iln.figures.styles import BASELINE_COLOR, norm_style
from iln.util.device import resolve_device
from iln.util.files import remove_stale_temps, write_csv_atomic, write_json_atomic
from iln.util.pool import plan, run_jobs
from iln.weights.subject import find_subject

BASELINE_NOTE = (
    "The baseline: bicubic upsampling for SR, the degraded input itself for denoising, JPEG "
    "artefact removal and deraining; no model. Every PSNR table of the report has its row."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run",
        help="run name under `runs:` or `released:`, or `bicubic` for the interpolation baseline",
    )
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    layout = Layout(project_root())
    remove_stale_temps(layout.eval_dir(args.run), recursive=True)  # kill -9 leftovers
    settings = params.evaluate
    device = resolve_device(settings.device, key="evaluate.device")
    subject = find_subject(params, args.run)
    restorers = open_restorers(subject, params, layout, device)
    precision_table = subject.precision_table and bool(settings.precision_modes)
    modes = settings.precision_modes if precision_table else ()
    ensemble = settings.self_ensemble and restorers.has_model
    jobs = plan_jobs(list(restorers.by_task), params, layout, modes=modes, ensemble=ensemble)
    workers = settings.workers or (0 if device.type == "cpu" else 1)  # one process per GPU
    processes, threads = plan(workers, len(jobs.all))
    print(
        f"evaluate: {len(jobs.all) - len(jobs.precision)} images, {len(jobs.precision)} "
        f"precision formats; {processes} processes x {threads} threads"
    )
    with tracking.stage_run(
        store_root(),
        experiment=params.tracking.experiment,
        stage="evaluate",
        run_name=args.run,
        norm=None if subject.spec is None else subject.spec.norm,
        color=BASELINE_COLOR if subject.spec is None else norm_style(subject.spec.norm).color,
        params=restorers.run_params,
        tags=restorers.tags,
    ) as tracker:
        results = run_jobs(
            restorers.by_task, jobs.all, processes=processes, threads=threads, desc="evaluate"
        )
        scores = collect(jobs, results, modes)
        write_outputs(layout.eval_dir(args.run), scores, restorers, ensemble, precision_table)
        log_scores(tracker, scores, precision_table)
        tracker.log_artifact(layout.eval_dir(args.run))
    tracking.log_to_group(  # the final numbers a user compares, on the member's parent run
        layout.root,
        experiment=params.tracking.experiment,
        run_name=args.run,
        metrics={f"{k}/{m}": v for k, values in scores.metrics.items() for m, v in values.items()},
        note=BASELINE_NOTE if subject.spec is None else None,
    )
    return 0


def write_outputs(
    out: Path, scores: Scores, restorers: Restorers, ensemble: bool, precision_table: bool
) -> None:
    """samples/, metrics.json, per_image.csv and precision.json ({} when not in table4)."""
    for name, image in scores.samples.items():
        write_png(out / name, image)
    metrics = scores.metrics
    released = restorers.released
    write_json_atomic(
        out / "metrics.json", metrics if released is None else {**metrics, "released": released}
    )
    columns = PER_IMAGE_COLUMNS + (PER_IMAGE_ENSEMBLE_COLUMNS if ensemble else ())
    write_csv_atomic(out / "per_image.csv", scores.per_image, columns)
    write_json_atomic(out / "precision.json", scores.precision if precision_table else {})


def log_scores(tracker: tracking.StageRun, scores: Scores, precision_table: bool) -> None:
    for key, values in scores.metrics.items():
        tracker.log_metrics({f"{key}/{m}": v for m, v in values.items()})
    for mode, sets in scores.precision.items() if precision_table else ():
        for ds, entry in sets.items():
            if entry.get("psnr") is not None:
                tracker.log_metrics({f"precision/{mode}/{ds}/psnr": entry["psnr"]})
            tracker.set_tags({f"precision.{mode}.{ds}.overflow": entry.get("overflow")})


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_stage("evaluate", main))
