"""DVC stage `evaluate@RUN` (and `baseline`): PSNR/SSIM on every test set, restored samples,
and the inference-precision table. Each task is scored by its protocol (iln.evaluation.protocols).

    python stages/evaluate.py RUN [--params params.yaml]  # RUN: a `runs:` or `released:` entry
    python stages/evaluate.py bicubic            # the baseline: bicubic upsampling for SR,
                                                 # the degraded input itself for DN/CAR/DR
"""

from __future__ import annotations

import argparse
import sys

import torch

from iln import tracking
from iln.cli.stage import project_root, run_stage, store_root
from iln.config.params import BASELINE, flatten, load_params
from iln.data.catalog import SETS
from iln.data.dataset import TestPairs
from iln.data.io import write_png
from iln.data.params import parse_task
from iln.evaluation.inference import ImageJob, bicubic_restore, degraded_input, model_restore_fn, summarise
from iln.util.files import remove_stale_temps, write_csv_atomic, write_json_atomic
from iln.config.layout import METRICS_ALL, PER_IMAGE_COLUMNS, PER_IMAGE_ENSEMBLE_COLUMNS, Layout
from iln.util.pool import plan, run_jobs
from iln.evaluation.precision import PrecisionJob
from iln.evaluation.protocols import protocol_for
from iln.util.device import resolve_device
from iln.figures.styles import BASELINE_COLOR, norm_style
from iln.weights.subject import find_subject, open_model

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
    model, tags, released = None, None, None  # released: a `released:` entry's record
    if subject.spec is None:  # the baseline: no model
        restorers = {}
        for task in params.degrade.tasks:
            scale = parse_task(task).scale
            restorers[task] = bicubic_restore(scale) if scale > 1 else degraded_input
        run_params = {"baseline": BASELINE}
    else:
        opened = open_model(subject, layout, device)
        model, tags = opened.model, opened.tags
        restorers = {
            subject.spec.task: model_restore_fn(
                model, device=device, tile=settings.tile or None, tile_overlap=settings.tile_overlap
            )
        }
        run_params = flatten(settings, "evaluate")
        if opened.weights is not None:  # the authors' weights: evaluated, never trained
            run_params |= flatten(subject.spec, "released")
            released = {  # how the numbers were made: tile 0 = whole images
                **opened.weights.as_dict(),
                "tile": settings.tile,
                "tile_overlap": settings.tile_overlap,
                "precision_crop": settings.precision_crop,
            }
    precision_table = subject.precision_table and bool(settings.precision_modes)

    out = layout.eval_dir(args.run)
    modes = settings.precision_modes if precision_table else ()
    ensemble = settings.self_ensemble and model is not None
    image_sets: dict[tuple[str, str], list[ImageJob]] = {}  # (task, dataset) -> one job per image
    precision_jobs: list[PrecisionJob] = []  # (dataset, mode) in order
    for task in restorers:
        for dataset in params.test_sets(task):
            protocol = protocol_for(task, grey=SETS[dataset].grey)
            pairs = TestPairs(*layout.pair_dirs(task, dataset))
            files = tuple((p.stem, pairs.lq_files[p.stem], p) for p in pairs.gt_files)
            image_sets[task, dataset] = [
                ImageJob(task, name, lq, gt, protocol, i < settings.samples, ensemble)
                for i, (name, lq, gt) in enumerate(files)
            ]
            precision_jobs += [
                PrecisionJob(
                    task, dataset, files, mode, settings.precision_crop, protocol.crop_border
                )
                for mode in modes
            ]
    image_jobs = [job for jobs in image_sets.values() for job in jobs]
    workers = settings.workers or (0 if device.type == "cpu" else 1)  # one process per GPU
    processes, threads = plan(workers, len(precision_jobs) + len(image_jobs))
    print(
        f"evaluate: {len(image_jobs)} images, {len(precision_jobs)} precision formats; "
        f"{processes} processes x {threads} threads"
    )

    metrics: dict[str, dict[str, float]] = {}
    per_image: list[dict[str, object]] = []
    with tracking.stage_run(
        store_root(),
        experiment=params.tracking.experiment,
        stage="evaluate",
        run_name=args.run,
        norm=None if subject.spec is None else subject.spec.norm,
        color=BASELINE_COLOR if subject.spec is None else norm_style(subject.spec.norm).color,
        params=run_params,
        tags=tags,
    ) as tracker:
        # the slow formats (fp16, bf16 on CPUs) first, so no worker is left with one at the end
        results = run_jobs(
            restorers,
            [*precision_jobs, *image_jobs],
            processes=processes,
            threads=threads,
            desc="evaluate",
        )
        precision: dict[str, dict[str, object]] = {}
        for job, result in zip(precision_jobs, results):
            precision.setdefault(job.dataset, {})[job.mode] = result
        scored = iter(results[len(precision_jobs) :])
        for (task, dataset), jobs in image_sets.items():
            key = f"{task}/{dataset}"
            done = [next(scored) for _ in jobs]
            summary = summarise([row for row, _ in done])
            metrics[key] = {m: summary[m] for m in METRICS_ALL if m in summary}
            for job, (row, restored) in zip(jobs, done):
                per_image.append({"set": key, "task": task, "protocol": job.protocol.name, **row})
                if restored is not None:
                    write_png(out / "samples" / task / dataset / f"{job.name}.png", restored)
        write_json_atomic(
            out / "metrics.json", metrics if released is None else {**metrics, "released": released}
        )
        columns = PER_IMAGE_COLUMNS + (PER_IMAGE_ENSEMBLE_COLUMNS if ensemble else ())
        write_csv_atomic(out / "per_image.csv", per_image, columns)
        by_mode = {mode: {ds: precision[ds][mode] for ds in precision} for mode in modes}
        write_json_atomic(
            out / "precision.json", by_mode if precision_table else {}
        )  # {}: not in table4
        for key, values in metrics.items():
            tracker.log_metrics({f"{key}/{m}": v for m, v in values.items()})
        for mode, sets in by_mode.items() if precision_table else ():
            for ds, entry in sets.items():
                if entry.get("psnr") is not None:
                    tracker.log_metrics({f"precision/{mode}/{ds}/psnr": entry["psnr"]})
                tracker.set_tags({f"precision.{mode}.{ds}.overflow": entry.get("overflow")})
        tracker.log_artifact(out)
    tracking.log_to_group(  # the final numbers a user compares, on the member's parent run
        layout.root,
        experiment=params.tracking.experiment,
        run_name=args.run,
        metrics={f"{key}/{m}": v for key, values in metrics.items() for m, v in values.items()},
        note=BASELINE_NOTE if subject.spec is None else None,
    )
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_stage("evaluate", main))
