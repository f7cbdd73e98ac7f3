"""What a resumable checkpoint must match: everything that shapes the training trajectory.

A checkpoint is resumed only into a run with the same fingerprint, a hash of
  - the run's trajectory settings: the model (arch, norm, task, stdnorm, affine_outer, model
    overrides) and every training setting that changes the weights (batch, patch, optimiser,
    schedule, EMA, clipping, seed, precision, training set);
  - a digest of the training pairs (names and bytes of every file), so that an added, removed
    or changed image starts training afresh;
  - a digest of the code on the training path, by its meaning (``code_digest``).
Settings that only say how fast, where, or how often to record (``OBSERVER_KEYS``) are left
out: changing the probe or log interval, the device, the threads or the report groups keeps a
resumable checkpoint. ``iterations`` is left out as well: a run is a prefix of any longer run
with the same settings, so a longer run resumes from a shorter one's checkpoint and a shorter
one from any checkpoint at or before its last step (``iln.training.resume``). Every field of
``TrainParams`` and ``RunSpec`` is either in ``TRAJECTORY_KEYS`` or in ``OBSERVER_KEYS``
(a test checks it); a field in neither still counts as trajectory, the safe side.

The training path: the packages whose code decides the weights (``TRAINING_PACKAGES``: the
params, the data pipeline, the models, the initial weights, the loop, its helpers) and the
train stage script. They are also the train stage's code deps in dvc.yaml, so DVC re-runs the
stage when any of their files changes and the stage then resumes or retrains by this digest.
Everything else (the monitor's probes and validation PSNR, the MLflow records, the colours,
the report) lives in other packages and changes no trajectory.

By meaning, not by location: every top-level statement of those files (a function, a class,
a constant) counts as its syntax tree (``ast.dump``) without docstrings, other bare string
statements and ``pass``; imports do not count, and the statements are digested as a sorted
multiset. So comments, docstrings, formatting and moving a definition from one module to
another keep the digest, while any changed name, constant or expression changes it.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from iln.config.params import RUN_TRAIN_OVERRIDES, ResolvedRun

TRAJECTORY_KEYS = {
    "run": ("arch", "norm", "task", "stdnorm", "affine_outer", "model", "init"),
    "train": (
        "batch_size",
        "lq_patch",
        "lr",
        "betas",
        "milestones",
        "lr_gamma",
        "ema_decay",
        "grad_clip",
        "kld_weight",
        "seed",
        "train_set",
        "amp",
        "tf32",
    ),
}
OBSERVER_KEYS = {
    # the run's overrides of train keys are judged as train keys (ResolvedRun.train)
    "run": ("groups", *RUN_TRAIN_OVERRIDES),
    "train": (
        "iterations",
        "checkpoint_every",
        "log_every",
        "probe_every",
        "probe_images",
        "probe_per_block",
        "compile",
        "device",
        "num_workers",
        "threads",
        # W processes, K micro-batches and recomputed activations train the same weights
        # (iln.training.loop's determinism contract), so neither restarts a run
        "accumulate",
        "grad_checkpoint",
        "cache_gib",
    ),
}

# The packages of src/iln on the training path (see the module docstring); dvc.yaml's train
# stage lists the same folders (tests/test_dvc.py checks it).
TRAINING_PACKAGES = ("config", "data", "models", "training", "util", "weights")


def training_fingerprint(
    run: ResolvedRun, *, data_digest: str, code_digest: str, init_digest: str | None = None
) -> str:
    """16 hex digits naming the trajectory of ``run`` on these training pairs with this code
    (and, for a run with ``init``, these initial weights: ``init_digest``)."""
    spec = dataclasses.asdict(run.spec)
    train = dataclasses.asdict(run.train)
    payload = {
        "run": {k: v for k, v in spec.items() if k not in OBSERVER_KEYS["run"]},
        "train": {k: v for k, v in train.items() if k not in OBSERVER_KEYS["train"]},
        "data": data_digest,
        "code": code_digest,
    }
    if init_digest is not None:
        payload["init"] = init_digest
    if run.jpeg_subsampling is not None:  # car_q runs encode their inputs on the fly
        payload["jpeg_subsampling"] = run.jpeg_subsampling
    if run.realsr is not None:  # realsr runs degrade their inputs on the fly
        payload["realsr"] = dataclasses.asdict(run.realsr)
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tree_digest(folders: Iterable[Path]) -> str:
    """Digest of every file under ``folders``: relative names, sizes and bytes, in name order."""
    digest = hashlib.sha256()
    for folder in folders:
        folder = Path(folder)
        digest.update(f"folder {folder.name}\n".encode())
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            with open(path, "rb") as handle:
                content = hashlib.file_digest(handle, "blake2b").hexdigest()
            name = path.relative_to(folder).as_posix()
            digest.update(f"{name} {path.stat().st_size} {content}\n".encode())
    return digest.hexdigest()


def code_digest(script: Path, package_dir: Path) -> str:
    """Digest of the meaning of ``script`` and of the ``TRAINING_PACKAGES`` of the package at
    ``package_dir``: equal for code that computes the same, wherever its definitions live."""
    statements = sorted(
        hashlib.sha256(text.encode()).hexdigest()
        for path in [Path(script), *training_files(package_dir)]
        for text in statement_meanings(path.read_text(), path)
    )
    return hashlib.sha256("\n".join(statements).encode()).hexdigest()


def training_files(package_dir: Path) -> list[Path]:
    """The source files of the ``TRAINING_PACKAGES`` under ``package_dir``, in name order."""
    return sorted(
        path for name in TRAINING_PACKAGES for path in (Path(package_dir) / name).rglob("*.py")
    )


def statement_meanings(source: str, filename: str | Path = "<source>") -> list[str]:
    """Each top-level statement of ``source`` but its imports, as its syntax tree in text,
    without docstrings, other bare string statements and ``pass``."""
    tree = _WithoutNoOps().visit(ast.parse(source, filename=str(filename)))
    return [
        ast.dump(node, annotate_fields=False)
        for node in tree.body
        if not isinstance(node, ast.Import | ast.ImportFrom)
    ]


class _WithoutNoOps(ast.NodeTransformer):
    """Drops statements that do nothing: ``pass`` and a bare string (a docstring)."""

    def visit_Pass(self, node: ast.Pass) -> None:
        return None

    def visit_Expr(self, node: ast.Expr) -> ast.Expr | None:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return None
        return self.generic_visit(node)
