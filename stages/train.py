"""DVC stage `train@RUN`: train one grid member, resuming from its last checkpoint.

python stages/train.py RUN [--params params.yaml]
torchrun --nproc_per_node N stages/train.py RUN     # one run over N GPUs (DDP)
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

import torch

from iln import tracking
from iln.cli import project_root, run_stage
from iln.config import flatten, load_params, resolve_run
from iln.data.dataset import TestPairs, TrainPatches
from iln.distributed import init_distributed, shutdown
from iln.files import write_csv_atomic, write_json_atomic
from iln.layout import HISTORY_COLUMNS, PROBES_CSV_COLUMNS, Layout
from iln.models import build_model
from iln.monitor import probe_batch, training_monitor
from iln.train import fit
from iln.weights import save_trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="name of the run under `runs:` in the params file")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    run = resolve_run(params, args.run)
    layout = Layout(project_root())
    settings = run.train
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dist = init_distributed(os.environ, settings.device)

    torch.manual_seed(settings.seed)
    overrides = run.model_overrides()
    model = build_model(run.spec.arch, norm=run.spec.norm, scale=run.scale, **overrides)
    lq_dir, gt_dir = layout.pair_dirs(
        run.spec.task, settings.train_set
    )  # SR pairs (config admits SR runs only)
    dataset = TrainPatches(
        gt_dir, lq_dir, scale=run.scale, lq_patch=settings.lq_patch, seed=settings.seed
    )
    val_pairs = list(TestPairs(*layout.pair_dirs(run.spec.task, params.evaluate.sets[0])))[
        : settings.probe_images
    ]
    probe_lq = probe_batch([lq for _, lq, _ in val_pairs], size=2 * settings.lq_patch)

    out = layout.train_dir(run.name)
    tracked = (
        tracking.stage_run(
            layout.root,
            experiment=params.tracking.experiment,
            stage="train",
            run_name=run.name,
            norm=run.spec.norm,
            params={**flatten(run.spec, "run"), **flatten(settings, "train")},
            tags={
                "iln.fingerprint": run.fingerprint(),
                "iln.world_size": dist.world_size,
                "iln.device": str(dist.device),
            },
        )
        if dist.is_main
        else nullcontext()
    )
    with tracked as tracker:
        log = (lambda step, metrics: tracker.log_metrics(metrics, step=step)) if tracker else None
        monitor = training_monitor(
            probe_lq,
            val_pairs,
            crop_border=run.scale,
            device=dist.device,
            per_block=settings.probe_per_block,
            log=log,
        )
        ema, result = fit(
            model,
            dataset,
            settings,
            device=dist.device,
            checkpoint_path=layout.checkpoint(run.name),
            fingerprint=run.fingerprint(),
            rank=dist.rank,
            world_size=dist.world_size,
            on_log=log,
            monitor=monitor,
        )
        if dist.is_main:
            save_trained(
                layout.weights(run.name),
                ema,
                arch=run.spec.arch,
                norm=run.spec.norm,
                scale=run.scale,
                overrides=overrides,
            )
            write_csv_atomic(out / "history.csv", result.history, HISTORY_COLUMNS)
            write_csv_atomic(out / "probes.csv", result.monitor_rows, PROBES_CSV_COLUMNS)
            summary = {
                "steps": result.steps,
                "resumed_from": result.resumed_from,
                "seconds_per_step": result.seconds_per_step,
                "final_loss": result.history[-1]["loss"] if result.history else None,
                "parameters": sum(p.numel() for p in ema.parameters()),
            }
            write_json_atomic(out / "summary.json", summary)
            tracker.set_tags({"iln.resumed_from": result.resumed_from})
            tracker.log_metrics({"seconds_per_step_mean": result.seconds_per_step})
            for name in ("history.csv", "probes.csv", "summary.json"):
                tracker.log_artifact(out / name)
    shutdown(dist)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("train", main))
