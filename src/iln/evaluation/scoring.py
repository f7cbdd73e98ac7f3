"""One subject scored on every test set of its task: what the evaluate stage computes.

``open_restorers`` turns a subject (a trained run, a released entry or the baseline) into one
restore function per task; ``plan_jobs`` makes one job per test image and per precision
format; ``collect`` turns the jobs' results (in job order) into the per-set metrics, the
per-image rows, the precision table and the sample images. The stage runs the jobs (over
processes) and writes what ``collect`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from iln.config.layout import METRICS_ALL, Layout
from iln.config.params import BASELINE, Params, flatten
from iln.data.catalog import SETS
from iln.data.dataset import TestPairs
from iln.data.params import parse_task
from iln.evaluation.inference import (
    ImageJob,
    bicubic_restore,
    degraded_input,
    model_restore_fn,
    summarise,
)
from iln.evaluation.precision import PrecisionJob
from iln.evaluation.protocols import protocol_for
from iln.weights.subject import Subject, open_model


@dataclass
class Restorers:
    """A subject's restore function per task, with what its MLflow run records: the params,
    the tags and, for a released entry, how its numbers were made (``released``)."""

    by_task: dict[str, Any]
    run_params: dict[str, Any]
    tags: dict[str, str] | None = None
    released: dict[str, Any] | None = None
    has_model: bool = True


def open_restorers(
    subject: Subject, params: Params, layout: Layout, device: torch.device
) -> Restorers:
    """The baseline restores every task of the degrade stage without a model; a run or a
    released entry restores its task with its model (tiled or chunked as params say)."""
    settings = params.evaluate
    if subject.spec is None:  # the baseline: no model
        by_task = {}
        for task in params.degrade.tasks:
            scale = parse_task(task).scale
            by_task[task] = bicubic_restore(scale) if scale > 1 else degraded_input
        return Restorers(by_task, {"baseline": BASELINE}, has_model=False)
    opened = open_model(subject, layout, device)
    restore = model_restore_fn(
        opened.model,
        device=device,
        tile=settings.tile or None,
        tile_overlap=settings.tile_overlap,
        chunked=settings.chunked,
    )
    restorers = Restorers({subject.spec.task: restore}, flatten(settings, "evaluate"), opened.tags)
    if opened.weights is not None:  # the authors' weights: evaluated, never trained
        restorers.run_params |= flatten(subject.spec, "released")
        restorers.released = {  # how the numbers were made: tile 0 = whole images
            **opened.weights.as_dict(),
            "tile": settings.tile,
            "tile_overlap": settings.tile_overlap,
            "chunked": settings.chunked,
            "precision_crop": settings.precision_crop,
        }
    return restorers


@dataclass
class Jobs:
    """One ``ImageJob`` per test image, grouped by (task, set), and one ``PrecisionJob`` per
    (set, precision format); ``all`` puts the slow formats first, so that no worker is left
    with one at the end."""

    image_sets: dict[tuple[str, str], list[ImageJob]] = field(default_factory=dict)
    precision: list[PrecisionJob] = field(default_factory=list)

    @property
    def all(self) -> list[Any]:
        return [*self.precision, *(job for jobs in self.image_sets.values() for job in jobs)]


def plan_jobs(
    tasks: list[str], params: Params, layout: Layout, *, modes: tuple[str, ...], ensemble: bool
) -> Jobs:
    settings, jobs = params.evaluate, Jobs()
    for task in tasks:
        for dataset in params.test_sets(task):
            protocol = protocol_for(task, grey=SETS[dataset].grey)
            pairs = TestPairs(*layout.pair_dirs(task, dataset))
            files = tuple((p.stem, pairs.lq_files[p.stem], p) for p in pairs.gt_files)
            jobs.image_sets[task, dataset] = [
                ImageJob(task, name, lq, gt, protocol, i < settings.samples, ensemble)
                for i, (name, lq, gt) in enumerate(files)
            ]
            jobs.precision += [
                PrecisionJob(
                    task, dataset, files, mode, settings.precision_crop, protocol.crop_border
                )
                for mode in modes
            ]
    return jobs


@dataclass
class Scores:
    """What the evaluate stage writes: per-set metrics, per-image rows, the precision table
    by format and set, and the restored samples (path under the eval folder -> image)."""

    metrics: dict[str, dict[str, float]]
    per_image: list[dict[str, object]]
    precision: dict[str, dict[str, object]]
    samples: dict[str, np.ndarray]


def collect(jobs: Jobs, results: list[Any], modes: tuple[str, ...]) -> Scores:
    """``results`` in the order of ``jobs.all``."""
    precision: dict[str, dict[str, object]] = {}
    for job, result in zip(jobs.precision, results):
        precision.setdefault(job.dataset, {})[job.mode] = result
    scored = iter(results[len(jobs.precision) :])
    metrics: dict[str, dict[str, float]] = {}
    per_image: list[dict[str, object]] = []
    samples: dict[str, np.ndarray] = {}
    for (task, dataset), image_jobs in jobs.image_sets.items():
        key = f"{task}/{dataset}"
        done = [next(scored) for _ in image_jobs]
        summary = summarise([row for row, _ in done])
        metrics[key] = {m: summary[m] for m in METRICS_ALL if m in summary}
        for job, (row, restored) in zip(image_jobs, done):
            per_image.append({"set": key, "task": task, "protocol": job.protocol.name, **row})
            if restored is not None:
                samples[f"samples/{task}/{dataset}/{job.name}.png"] = restored
    by_mode = {mode: {ds: precision[ds][mode] for ds in precision} for mode in modes}
    return Scores(metrics, per_image, by_mode, samples)
