"""DVC stage `evaluate@RUN` (and `baseline`): PSNR/SSIM on every test set, restored samples,
and the inference-precision table.

    python stages/evaluate.py RUN [--params params.yaml]
    python stages/evaluate.py bicubic            # the bicubic-upsampling baseline
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from iln import tracking
from iln.cli import project_root, run_stage
from iln.config import flatten, load_params
from iln.data.dataset import TestPairs
from iln.data.io import write_png
from iln.evaluate import (
    bicubic_restore,
    central_crop_pairs,
    evaluate_pairs,
    model_restore_fn,
    summarise,
)
from iln.files import write_csv_atomic, write_json_atomic
from iln.layout import METRICS_KEYS, PER_IMAGE_COLUMNS, Layout
from iln.precision import evaluate_precisions
from iln.train import resolve_device
from iln.weights import load_trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run", help="run name under `runs:`, or `bicubic` for the interpolation baseline"
    )
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    layout = Layout(project_root())
    settings = params.evaluate
    device = resolve_device(settings.device)
    if args.run == "bicubic":
        tasks = [task for task in params.degrade.tasks if task.startswith("sr_")]
        restorers = {task: bicubic_restore(int(task[len("sr_x") :])) for task in tasks}
        model, run_params, precision_table = None, {"baseline": "bicubic"}, False
    else:
        spec = params.run(args.run)
        model, _ = load_trained(layout.weights(args.run), device)
        tile = settings.tile or None
        restorers = {
            spec.task: model_restore_fn(
                model, device=device, tile=tile, tile_overlap=settings.tile_overlap
            )
        }
        run_params = flatten(settings, "evaluate")
        precision_table = "table4" in spec.groups and bool(settings.precision_modes)

    out = layout.eval_dir(args.run)
    metrics: dict[str, dict[str, float]] = {}
    per_image: list[dict[str, object]] = []
    precision: dict[str, dict[str, object]] = {}
    with tracking.stage_run(
        layout.root,
        experiment=params.tracking.experiment,
        stage="evaluate",
        run_name=args.run,
        norm=None if args.run == "bicubic" else params.run(args.run).norm,
        params=run_params,
    ) as tracker:
        for task, restore_fn in restorers.items():
            crop_border = int(task[len("sr_x") :]) if task.startswith("sr_x") else 0
            for dataset in settings.sets:
                pairs = TestPairs(*layout.pair_dirs(task, dataset))
                kept: list = []  # the first `samples` restorations, saved below

                def restore_and_keep(lq, restore_fn=restore_fn, kept=kept):
                    restored = restore_fn(lq)
                    if len(kept) < settings.samples:
                        kept.append(restored)
                    return restored

                rows = evaluate_pairs(restore_and_keep, pairs, crop_border=crop_border)
                key = f"{task}/{dataset}"
                summary = summarise(rows)
                metrics[key] = {m: summary[m] for m in METRICS_KEYS}
                per_image += [{"set": key, **row} for row in rows]
                for row, restored in zip(rows, kept):
                    write_png(
                        out / "samples" / task / dataset / f"{Path(row['image']).stem}.png",
                        restored,
                    )
                if precision_table:
                    subset = (
                        central_crop_pairs(
                            pairs, lq_size=settings.precision_crop, scale=model.scale
                        )
                        if settings.precision_crop
                        else pairs
                    )
                    precision[dataset] = evaluate_precisions(
                        model,
                        subset,
                        scale=model.scale,
                        device=device,
                        modes=settings.precision_modes,
                        crop_border=crop_border,
                    )
        write_json_atomic(out / "metrics.json", metrics)
        write_csv_atomic(out / "per_image.csv", per_image, PER_IMAGE_COLUMNS)
        by_mode = {
            mode: {ds: precision[ds][mode] for ds in precision} for mode in settings.precision_modes
        }
        write_json_atomic(
            out / "precision.json", by_mode if precision_table else {}
        )  # {}: not in table4
        for key, values in metrics.items():
            tracker.log_metrics({f"{key}/psnr": values["psnr"], f"{key}/ssim": values["ssim"]})
        for mode, sets in by_mode.items() if precision_table else ():
            for ds, entry in sets.items():
                if entry.get("psnr") is not None:
                    tracker.log_metrics({f"precision/{mode}/{ds}/psnr": entry["psnr"]})
                tracker.set_tags({f"precision.{mode}.{ds}.overflow": entry.get("overflow")})
        tracker.log_artifact(out)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_stage("evaluate", main))
