"""A fine-tune's source run must be current before the fine-tune starts from its weights.

``runs.R.init: {run: S}`` starts R from S's ``model.pt``. DVC has no edge from train@S to
train@R (a stage's deps cannot name another run's files through an optional params key), so
``dvc repro train@R`` after a change to S, or S retrained outside DVC, would start R from S's
old weights. The train stage therefore checks, before R trains or resumes, that S's weights
are the ones S's params and code give now: S's summary records the fingerprint it was trained
under and its steps, and both must match what S's train stage would compute today.
"""

from __future__ import annotations

import json

from iln.config.layout import Layout
from iln.config.params import Params, ResolvedRun, resolve_run
from iln.training.fingerprint import training_fingerprint, tree_digest
from iln.weights.released import resolve_weights, sha256_of


def init_sha256(run: ResolvedRun, layout: Layout) -> str | None:
    """The SHA-256 of the file ``run`` starts from (None for a fresh initialisation)."""
    init = run.spec.init
    if init is None:
        return None
    if init.run is not None:
        return sha256_of(layout.weights(init.run))
    return sha256_of(resolve_weights(init.weights, layout.root, f"runs.{run.name}.init.weights"))


def run_fingerprint(run: ResolvedRun, layout: Layout, *, code: str) -> str:
    """The fingerprint ``run``'s train stage trains under with this code (``code``: the code
    digest) on the training pairs and initial weights on disk now."""
    sources = layout.training_sources(run.spec.task, run.train.train_set)
    return training_fingerprint(
        run,
        data_digest=tree_digest(sources),
        code_digest=code,
        init_digest=init_sha256(run, layout),
    )


def check_source_current(params: Params, run: ResolvedRun, layout: Layout, *, code: str) -> None:
    """ValueError in one line when ``run`` starts from a run whose weights are out of date."""
    init = run.spec.init
    if init is None or init.run is None:
        return
    where, source = f"runs.{run.name}.init.run", resolve_run(params, init.run)
    retrain = f"retrain it first: dvc repro train@{source.name}"
    path = layout.train_dir(source.name) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ValueError(
            f"{where}: {source.name} has no training summary ({path}); {retrain}"
        ) from None
    if summary.get("steps") != source.train.iterations:
        raise ValueError(
            f"{where}: {source.name}'s weights are from step {summary.get('steps')}, but its "
            f"params ask for {source.train.iterations} iterations; {retrain}"
        )
    if summary.get("fingerprint") != run_fingerprint(source, layout, code=code):
        raise ValueError(
            f"{where}: {source.name}'s weights were trained with other settings, data or code "
            f"than its params and code give now; {retrain}"
        )
