"""One grid run made ready to train, and what its training leaves behind.

``start_job`` joins the processes (``iln.training.distributed``), builds and seeds the model,
carries ``runs.R.init``'s weights into it (``iln.weights.warm_start``) and opens the training
patches; ``train_summary`` is the record ``train/summary.json`` keeps of a finished training.
The train stage wires these to its params and its outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iln.config.layout import Layout
from iln.config.params import Params, ResolvedRun, flatten
from iln.data.dataset import training_patches
from iln.models import build_model, resolve_hparams
from iln.training.distributed import DistInfo, init_distributed
from iln.training.loop import FitResult
from iln.training.schedule import Schedule, agree_schedule
from iln.util.device import use_tf32
from iln.util.files import remove_stale_temps
from iln.weights.warm_start import (
    WarmStart,
    carry_weights,
    file_sha256,
    released_state,
    trained_state,
)


@dataclass(frozen=True)
class TrainingJob:
    """A run ready for ``iln.training.loop.fit``: this process's place among the training
    processes, whether TF32 is on, the seeded (and warm-started) model and its patches."""

    run: ResolvedRun
    dist: DistInfo
    tf32: bool
    model: nn.Module
    warm: WarmStart | None
    dataset: torch.utils.data.Dataset


def start_job(
    run: ResolvedRun, params: Params, layout: Layout, env: Mapping[str, str]
) -> TrainingJob:
    """Clear what a killed training left half-written, join the processes torchrun describes
    in ``env`` and check that they agree on the schedule (``iln.training.schedule``), then
    build the model from ``train.seed`` and open the training patches."""
    remove_stale_temps(layout.checkpoint(run.name).parent)  # kill -9 leftovers
    remove_stale_temps(layout.train_dir(run.name))
    settings = run.train
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dist = init_distributed(env, settings.device)
    agree_schedule(Schedule.of(settings), dist.world_size)  # before any work or MLflow run
    tf32 = use_tf32(dist.device, settings.tf32)
    torch.manual_seed(settings.seed)
    model = build_model(run.spec.arch, norm=run.spec.norm, scale=run.scale, **run.model_overrides())
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
    return TrainingJob(run, dist, tf32, model, warm, dataset)


def warm_start(model: nn.Module, run: ResolvedRun, layout: Layout) -> WarmStart:
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


def train_summary(job: TrainingJob, result: FitResult, ema: nn.Module) -> dict[str, Any]:
    """train/summary.json: steps, where it resumed, speed, final loss, size, processes, the
    model's hyper-parameters and, for a warm start, its source."""
    summary = {
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "seconds_per_step": result.seconds_per_step,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "parameters": sum(p.numel() for p in ema.parameters()),
        "world_size": job.dist.world_size,
        "model": model_hparams(job.run),
    }
    if job.warm is not None:
        summary["init"] = job.warm.summary()
    return summary
