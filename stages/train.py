"""DVC stage `train@RUN`: train one grid member, resuming from its last checkpoint.

python stages/train.py RUN [--params params.yaml]
torchrun --nproc_per_node N stages/train.py RUN     # one run over N GPUs (DDP)

W processes train exactly what one process trains at the same global batch (iln.training.loop), so
the process count is not part of the run. Several nodes must see the same project folder;
only rank 0 reads checkpoints and writes outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

import iln
from iln import tracking
from iln.cli.stage import project_root, run_stage, store_root, warn
from iln.config.params import ResolvedRun, flatten, load_params, resolve_run
from iln.data.dataset import TestPairs, training_patches, training_sources
from iln.training.distributed import agree, init_distributed, shutdown
from iln.util.files import remove_stale_temps, write_csv_atomic, write_json_atomic
from iln.training.fingerprint import code_digest, training_fingerprint, tree_digest
from iln.config.layout import HISTORY_COLUMNS, PROBES_CSV_COLUMNS, Layout
from iln.models import build_model, resolve_hparams
from iln.evaluation.monitor import deepest_group_curves, probe_batch, training_monitor
from iln.evaluation.protocols import protocol_for
from iln.training.resume import remember_tracked_run, tracked_run
from iln.util.device import use_tf32
from iln.figures.styles import norm_style
from iln.training.loop import fit
from iln.weights.warm_start import WarmStart, carry_weights, file_sha256, released_state, trained_state
from iln.weights.trained import save_trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="name of the run under `runs:` in the params file")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    run = resolve_run(params, args.run)
    layout = Layout(project_root())
    remove_stale_temps(layout.checkpoint(run.name).parent)  # kill -9 leftovers
    remove_stale_temps(layout.train_dir(run.name))
    settings = run.train
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dist = init_distributed(os.environ, settings.device)
    tf32 = use_tf32(dist.device, settings.tf32)

    torch.manual_seed(settings.seed)
    overrides = run.model_overrides()
    model = build_model(run.spec.arch, norm=run.spec.norm, scale=run.scale, **overrides)
    warm = warm_start(model, run, layout) if run.spec.init is not None else None
    dataset = training_patches(
        run.spec.task,
        settings.train_set,
        layout=layout,
        lq_patch=settings.lq_patch,
        seed=settings.seed,
        jpeg_subsampling=params.degrade.jpeg_subsampling,
        realsr=run.realsr,
        cache_bytes=int(settings.cache_gib * 2**30),
    )
    first_test_set = params.test_sets(run.spec.task)[0]
    val_pairs = list(TestPairs(*layout.pair_dirs(run.spec.task, first_test_set)))[
        : settings.probe_images
    ]
    probe_lq = probe_batch([lq for _, lq, _ in val_pairs], size=2 * settings.lq_patch)
    fingerprint = training_fingerprint(  # what a checkpoint must match to be resumed
        run,
        data_digest=tree_digest(training_sources(run.spec.task, settings.train_set, layout)),
        code_digest=code_digest(Path(__file__), Path(iln.__file__).parent),
        init_digest=warm.sha256 if warm is not None else None,
    )
    agree(dist, fingerprint, "the run's fingerprint")

    out = layout.train_dir(run.name)
    store = tracking.tracking_uri(store_root())
    checkpoint = layout.checkpoint(run.name)
    tracked = (
        tracking.stage_run(
            store_root(),
            experiment=params.tracking.experiment,
            stage="train",
            run_name=run.name,
            norm=run.spec.norm,
            color=norm_style(run.spec.norm).color,
            params={**flatten(run.spec, "run"), **flatten(settings, "train")},
            tags={
                "iln.fingerprint": fingerprint,
                "iln.world_size": dist.world_size,
                "iln.device": str(dist.device),
                "iln.tf32": tf32,
            },
            continue_run=tracked_run(checkpoint, fingerprint, store),  # a resumed training
        )
        if dist.is_main
        else nullcontext()
    )
    with tracked as tracker:
        if tracker:
            remember_tracked_run(checkpoint, fingerprint, store, tracker.run_id)
        log = (lambda step, metrics: tracker.log_metrics(metrics, step=step)) if tracker else None
        monitor = training_monitor(
            probe_lq,
            val_pairs,
            crop_border=protocol_for(run.spec.task).crop_border,
            device=dist.device,
            per_block=settings.probe_per_block,
            log=log,
        )
        ema, result = fit(
            model,
            dataset,
            settings,
            device=dist.device,
            checkpoint_path=checkpoint,
            fingerprint=fingerprint,
            rank=dist.rank,
            world_size=dist.world_size,
            on_log=log,
            monitor=monitor,
            warn=lambda message: warn("train", message),
        )
        if dist.is_main:
            save_trained(
                layout.weights(run.name),
                ema,
                arch=run.spec.arch,
                norm=run.spec.norm,
                scale=run.scale,
                overrides=overrides,
                raw=model,
            )
            write_csv_atomic(out / "history.csv", result.history, HISTORY_COLUMNS)
            write_csv_atomic(out / "probes.csv", result.monitor_rows, PROBES_CSV_COLUMNS)
            summary = {
                "steps": result.steps,
                "resumed_from": result.resumed_from,
                "seconds_per_step": result.seconds_per_step,
                "final_loss": result.history[-1]["loss"] if result.history else None,
                "parameters": sum(p.numel() for p in ema.parameters()),
                "world_size": dist.world_size,
                "model": model_hparams(run),
            }
            if warm is not None:
                summary["init"] = warm.summary()
            write_json_atomic(out / "summary.json", summary)
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
                curves=deepest_group_curves(result.monitor_rows),
                note=member_note(run),
            )
    shutdown(dist)
    return 0


def model_hparams(run: ResolvedRun) -> dict[str, object]:
    """The model's resolved hyper-parameters (its preset with the run's overrides), as
    train/summary.json records them for readers that build no model (the report)."""
    return resolve_hparams(
        run.spec.arch, norm=run.spec.norm, scale=run.scale, **run.model_overrides()
    )


def member_params(run: ResolvedRun) -> dict[str, object]:
    """What a user compares on the member's parent run: the model's effective
    hyper-parameters (``model.*``, e.g. whether stdnorm is on), the task and the training
    settings in force (``train.*``)."""
    return {
        "task": run.spec.task,
        **{f"model.{k}": v for k, v in model_hparams(run).items()},
        **flatten(run.train, "train"),
    }


def member_note(run: ResolvedRun) -> str:
    """The parent run's description in the MLflow UI."""
    settings = run.train
    return (
        f"{norm_style(run.spec.norm).label} on {run.spec.arch}, task {run.spec.task}: "
        f"{settings.iterations} iterations at batch {settings.batch_size}, lr {settings.lr:g}, "
        f"EMA decay {settings.ema_decay:g}. Its train, evaluate and analyze stage runs are "
        "the child runs below; features/deepest/* are the deepest group's feature magnitude "
        "mean(x^2) and channel entropy (nats) of the weights being trained, per probe step."
    )


def warm_start(model: torch.nn.Module, run: ResolvedRun, layout: Layout) -> WarmStart:
    """Carry ``runs.R.init``'s weights into ``model`` (see ``iln.weights.warm_start``)."""
    init, key = run.spec.init, f"runs.{run.name}.init"
    if init.run is not None:
        path = layout.weights(init.run)
        if not path.is_file():
            raise FileNotFoundError(
                f"{key}.run: {init.run} has no trained weights yet ({path}); train it first: "
                f"dvc repro train@{init.run}"
            )
        source, name = trained_state(path), f"run {init.run} (EMA weights)"
    else:
        path = Path(init.weights)
        path = path if path.is_absolute() else layout.root / path
        if not path.is_file():
            raise FileNotFoundError(f"{key}.weights: no such file {path}")
        source, name = released_state(path, init.key, model), f"{init.weights} ({init.key})"
    return carry_weights(model, source, name=name, sha256=file_sha256(path))


if __name__ == "__main__":
    sys.exit(run_stage("train", main))
