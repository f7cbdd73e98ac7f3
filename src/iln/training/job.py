"""One grid run made ready to train, and what its training leaves behind.

``start_job`` joins the processes (``iln.training.distributed``), builds and seeds the model,
carries ``runs.R.init``'s weights into it (``iln.weights.warm_start``) and opens the training
patches; ``train_summary`` is the record ``train/summary.json`` keeps of a finished training.
The train stage wires these to its params and its outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from iln.config.layout import Layout
from iln.config.params import Params, ResolvedRun, flatten
from iln.data.dataset import training_patches
from iln.models import build_model, resolve_settings
from iln.training.distributed import DistInfo, init_distributed
from iln.training.loop import FitResult
from iln.training.schedule import Schedule, agree_schedule
from iln.training.sources import check_source_current
from iln.util.device import use_cudnn_benchmark, use_tf32
from iln.util.files import remove_stale_temps
from iln.weights.released import pin_weights
from iln.weights.warm_start import WarmStart, carry_weights, open_init


@dataclass(frozen=True)
class TrainingJob:
    """A run ready for ``iln.training.loop.fit``: this process's place among the training
    processes, whether TF32 and cuDNN's algorithm search are on, the seeded (and
    warm-started) model and its patches."""

    run: ResolvedRun
    dist: DistInfo
    tf32: bool
    cudnn_benchmark: bool
    model: nn.Module
    warm: WarmStart | None
    dataset: torch.utils.data.Dataset


def start_job(
    run: ResolvedRun, params: Params, layout: Layout, env: Mapping[str, str], *, code: str
) -> TrainingJob:
    """Clear what a killed training left half-written, join the processes torchrun describes
    in ``env`` and check that they agree on the schedule (``iln.training.schedule``), check
    that a fine-tune's source run is current (``code``: the code digest), then build the
    model from ``train.seed``, carry the init weights in and open the training patches."""
    remove_stale_temps(layout.checkpoint(run.name).parent)  # kill -9 leftovers
    remove_stale_temps(layout.train_dir(run.name))
    settings = run.train
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dist = init_distributed(env, settings.device)
    agree_schedule(Schedule.of(settings), dist.world_size)  # before any work or MLflow run
    tf32 = use_tf32(dist.device, settings.tf32)
    cudnn_benchmark = use_cudnn_benchmark(dist.device, fixed_shapes=True)  # fixed LR patches
    check_source_current(params, run, layout, code=code)
    torch.manual_seed(settings.seed)
    model = build_model(run.spec.arch, norm=run.spec.norm, scale=run.scale, **run.model_overrides())
    warm = warm_start(model, run, layout) if run.spec.init is not None else None
    dataset = training_patches(
        run.spec.task,
        layout.training_sources(run.spec.task, settings.train_set),
        lq_patch=settings.lq_patch,
        seed=settings.seed,
        jpeg_subsampling=params.degrade.jpeg_subsampling,
        realsr=run.realsr,
        cache_bytes=int(settings.cache_gib * 2**30),
    )
    return TrainingJob(run, dist, tf32, cudnn_benchmark, model, warm, dataset)


def warm_start(model: nn.Module, run: ResolvedRun, layout: Layout) -> WarmStart:
    """Carry ``runs.R.init``'s weights into ``model`` (see ``iln.weights.warm_start``)."""
    source = open_init(run.spec.init, f"runs.{run.name}.init", layout, model)
    if source.record is not None:  # a weights file: its SHA-256 pinned once it has loaded
        pin_weights(source.record, book=layout.weights_book)
    return carry_weights(model, source.state, name=source.name, sha256=source.sha256)


def model_hparams(run: ResolvedRun) -> dict[str, object]:
    """The model's resolved hyper-parameters (its preset with the run's overrides), as
    train/summary.json records them for readers that build no model (the report)."""
    return resolve_settings(
        run.spec.arch, norm=run.spec.norm, scale=run.scale, **run.model_overrides()
    ).as_dict()


def member_params(run: ResolvedRun) -> dict[str, object]:
    """What a user compares on the member's parent run: the model's effective
    hyper-parameters (``model.*``, e.g. whether stdnorm is on), the task and the training
    settings in force (``train.*``)."""
    return {
        "task": run.spec.task,
        **{f"model.{k}": v for k, v in model_hparams(run).items()},
        **flatten(run.train, "train"),
    }


def train_summary(
    job: TrainingJob, result: FitResult, ema: nn.Module, fingerprint: str
) -> dict[str, Any]:
    """train/summary.json: steps, where it resumed, speed, final loss, size, processes, the
    model's hyper-parameters, the fingerprint (a fine-tune of this run checks it) and, for a
    warm start, its source."""
    summary = {
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "seconds_per_step": result.seconds_per_step,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "parameters": sum(p.numel() for p in ema.parameters()),
        "world_size": job.dist.world_size,
        "model": model_hparams(job.run),
        "fingerprint": fingerprint,
    }
    if job.warm is not None:
        summary["init"] = job.warm.summary()
    return summary
