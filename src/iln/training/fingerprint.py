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

The training path, the rule: the train stage script and every ``iln`` module it imports,
directly or not (also imports inside functions, read from the source), except those in
``RECORDING_MODULES`` and what is imported only through them. Those only record, track,
validate, colour or write what training produced (the probes, the validation PSNR, MLflow,
the error lines, the final model file, this fingerprint); a test checks that each of them
is imported by the train stage and that no module on the training path imports one, so the
list stays exact. Everything else the stage reaches
(the models, the data pipeline and the params that feed it, the loss, the optimiser, the
loop, the checkpoints, the distributed setup) is on the training path, and so is any module
added to it later until it is declared recording: the safe side again.

By meaning: each module counts as its syntax tree (``ast.dump``) without docstrings, other
bare string statements and ``pass``, so comments, docstrings and formatting do not count,
while any changed name, constant or expression does.
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

# Modules of the train stage that only record, track, validate, colour or write what training
# produced: left out of the code digest with what only they import (see the module docstring).
RECORDING_MODULES = (
    "iln.cli.stage",  # the stage's error lines
    "iln.tracking",  # MLflow
    "iln.figures.styles",  # the MLflow run colour
    "iln.evaluation.monitor",  # the probes and the validation PSNR during training
    "iln.evaluation.probes",
    "iln.evaluation.inference",
    "iln.evaluation.metrics",
    "iln.evaluation.protocols",
    "iln.weights.trained",  # the model file written from the trained weights
    "iln.training.fingerprint",  # what names a checkpoint, not what trains it
)


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
    """Digest of the meaning of ``script`` and of the modules of the package at
    ``package_dir`` on its training path (``training_modules``)."""
    digest = hashlib.sha256()
    root = package_dir.parent
    for path in [Path(script), *training_modules(script, package_dir)]:
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        meaning = hashlib.sha256(code_meaning(path.read_text(), path).encode()).hexdigest()
        digest.update(f"{name} {meaning}\n".encode())
    return digest.hexdigest()


def training_modules(script: Path, package_dir: Path) -> list[Path]:
    """Source files of the package that ``script`` imports, not through ``RECORDING_MODULES``."""
    return imported_modules(script, package_dir, stop=RECORDING_MODULES)


def code_meaning(source: str, filename: str | Path = "<source>") -> str:
    """The syntax tree of ``source`` as text, without docstrings, other bare string statements
    and ``pass``: equal for two sources that differ only in comments, docstrings or layout."""
    tree = _WithoutNoOps().visit(ast.parse(source, filename=str(filename)))
    return ast.dump(tree, annotate_fields=False)


class _WithoutNoOps(ast.NodeTransformer):
    """Drops statements that do nothing: ``pass`` and a bare string (a docstring)."""

    def visit_Pass(self, node: ast.Pass) -> None:
        return None

    def visit_Expr(self, node: ast.Expr) -> ast.Expr | None:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return None
        return self.generic_visit(node)


def imported_modules(script: Path, package_dir: Path, *, stop: Iterable[str] = ()) -> list[Path]:
    """Source files of the package at ``package_dir`` (e.g. src/iln) that ``script`` imports,
    directly or through other modules, including the packages' ``__init__.py`` files.
    Modules named in ``stop`` (dotted names; a package stops its modules too) are neither
    listed nor followed.

    Read from the source (every import statement, also those inside functions), not from a
    running interpreter, so it is the same whatever ran before.
    """
    package = package_dir.name
    stop = set(stop)
    seen: set[Path] = set()
    todo = [(Path(script), None)]
    while todo:
        path, module = todo.pop()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for name in _imported_names(node, module, is_package=path.name == "__init__.py"):
                if name != package and not name.startswith(package + "."):
                    continue
                for found in _module_files(name, package_dir):
                    found_name = _module_name(found, package_dir)
                    if found not in seen and not _within(found_name, stop):
                        seen.add(found)
                        todo.append((found, found_name))
    return sorted(seen)


def _imported_names(node: ast.AST, module: str | None, *, is_package: bool) -> list[str]:
    """Dotted module names an import statement may load (``from a import b`` may load a.b)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative import
        if module is None:
            return []
        parts = module.split(".")
        anchor = parts if is_package else parts[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _module_files(name: str, package_dir: Path) -> list[Path]:
    """The file of module ``name`` and the ``__init__.py`` of every package on its way."""
    parts = name.split(".")[1:]
    files = [package_dir / "__init__.py"]
    folder = package_dir
    for i, part in enumerate(parts):
        if (folder / part).is_dir() and (folder / part / "__init__.py").exists():
            folder = folder / part
            files.append(folder / "__init__.py")
        elif i == len(parts) - 1 and (folder / f"{part}.py").exists():
            files.append(folder / f"{part}.py")
        else:
            return []  # not a module (a name imported from a module), or not ours
    return [f for f in files if f.exists()]


def _within(module: str, names: set[str]) -> bool:
    """Whether ``module`` is one of ``names`` or inside one of them (a package)."""
    return any(module == name or module.startswith(name + ".") for name in names)


def _module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)
