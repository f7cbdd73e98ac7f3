"""The authors' released checkpoints: where they come from, checking a local copy, loading it.

The paper's authors published their trained HAT_1 ("HAT-mini", LN and i-LN) and full HAT
("HAT-dagger", i-LN) SR models as BasicSR checkpoints (a dict holding ``params`` and/or
``params_ema``) in one Google Drive folder. Drive folders cannot be downloaded by a script,
so a copy is made by hand; ``CATALOGUE`` says what each file is and how to get it.

A local file, inside the project, is named by a ``released:`` entry of params.yaml. Its
SHA-256 is recorded in a checksum book the first time it loads (a file that is refused, e.g.
cut short, is not recorded) and every later use is checked against it, so a replaced or
damaged file is noticed instead of silently changing the numbers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from iln.data.download import ChecksumBook
from iln.config.layout import check_run_name
from iln.models import build_model, load_official_checkpoint

if TYPE_CHECKING:
    from iln.config.params import ReleasedSpec

DRIVE_FOLDER = "https://drive.google.com/drive/folders/1vAv1qw_jYsk0TIJhegjrJkYG3Rycey8c"
BASICSR_KEYS = ("params_ema", "params")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """One file of the authors' release and the model it holds."""

    member: str  # path inside the Drive folder
    arch: str
    norm: str
    scale: int
    stdnorm: bool  # as in the authors' test config of this file
    size: str  # estimated from the parameter count: the published file sizes are not known
    paper: str  # which of the paper's numbers it produced

    @property
    def filename(self) -> str:
        return Path(self.member).name

    def howto(self) -> str:
        return (
            f"open {DRIVE_FOLDER} in a browser, download {self.member} ({self.size}) and save it "
            f"under that file name (Google Drive folders cannot be downloaded by a script)"
        )


_MINI = "about 40 MB with params and params_ema, half that with one (estimated)"
_DAGGER = "about 170 MB with params and params_ema, half that with one (estimated)"

CATALOGUE: dict[str, ReleasedCheckpoint] = {
    c.filename: c
    for c in (
        ReleasedCheckpoint(
            "HAT-mini/SRx2_HAT-mini_baseline.pth",
            "hat_1",
            "ln",
            2,
            False,
            _MINI,
            "HAT_1 with LN, x2",
        ),
        ReleasedCheckpoint(
            "HAT-mini/SRx4_HAT-mini_baseline.pth",
            "hat_1",
            "ln",
            4,
            False,
            _MINI,
            "HAT_1 with LN, x4 (LN row of the x4 HAT_1 comparison; fp16 collapse; Fig. 1, 8, 9)",
        ),
        ReleasedCheckpoint(
            "HAT-mini/SRx2_HAT-mini_iLN.pth",
            "hat_1",
            "iln",
            2,
            True,
            _MINI,
            "HAT_1 with i-LN, x2",
        ),
        ReleasedCheckpoint(
            "HAT-mini/SRx4_HAT-mini_iLN.pth",
            "hat_1",
            "iln",
            4,
            True,
            _MINI,
            "HAT_1 with i-LN, x4 (the i-LN row of the x4 HAT_1 comparison; fp16 unchanged)",
        ),
        ReleasedCheckpoint(
            "HAT-dagger/SRx2_HAT-dagger_iLN.pth",
            "hat",
            "iln",
            2,
            True,
            _DAGGER,
            "full HAT with i-LN, x2 (the full-HAT rows)",
        ),
        ReleasedCheckpoint(
            "HAT-dagger/SRx4_HAT-dagger_iLN.pth",
            "hat",
            "iln",
            4,
            True,
            _DAGGER,
            "full HAT with i-LN, x4 (the full-HAT rows)",
        ),
    )
}


def where_to_get(path: str | os.PathLike[str]) -> str:
    """How to obtain the file at ``path``: the catalogue entry with its name, else a hint."""
    entry = CATALOGUE.get(Path(path).name)
    if entry is not None:
        return entry.howto()
    return (
        f"it is not one of the authors' released files ({', '.join(CATALOGUE)}, from "
        f"{DRIVE_FOLDER}); point `weights` at a BasicSR-format checkpoint you have"
    )


def resolve_weights(weights: str, root: Path, where: str) -> Path:
    """The file a ``released.<name>.weights`` value names (relative paths: to ``root``).

    The path must lie inside the project (``root``), as written or once symlinks are
    resolved: a file elsewhere is linked or copied into ``weights/released/`` first, so that
    params.yaml never makes a stage read and record an arbitrary file of the machine.
    """
    path = Path(weights)
    path = path if path.is_absolute() else Path(root) / path
    lexical = Path(os.path.normpath(os.path.abspath(path)))
    inside = lexical.is_relative_to(os.path.normpath(os.path.abspath(root)))
    if not inside and not path.resolve().is_relative_to(Path(root).resolve()):
        raise ReleasedWeightsError(
            f"{where}: {weights!r} lies outside the project ({Path(root).resolve()}); put the "
            f"file (or a link to it) under weights/released/ and name it relative to the project"
        )
    return path


def require_weights(path: Path, where: str) -> None:
    """FileNotFoundError (missing) or ReleasedWeightsError (a folder, a device, ...) in one
    line naming the file, the params key and where to get it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{where}: {path} does not exist; to get it, {where_to_get(path)}")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise ReleasedWeightsError(f"{where}: {path} is {kind}; expected a checkpoint file")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


class ReleasedWeightsError(ValueError):
    """A weights file cannot be used as declared (changed since first use, not a BasicSR
    checkpoint, no such key, tensors that do not fit the model); the message names the file."""


@dataclass(frozen=True)
class WeightsRecord:
    """What identifies the weights a released entry was evaluated with."""

    file: str  # as written in params.yaml
    sha256: str
    bytes: int
    key: str

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes, "key": self.key}


def verify_weights(
    weights: str, key: str, *, root: Path, book: Path, where: str
) -> tuple[Path, WeightsRecord]:
    """Check that the file exists, lies in the project and matches the SHA-256 recorded for
    it in ``book``, if any; returns its path and record (nothing is recorded here: a file is
    pinned by ``pin_weights`` only once it has loaded).

    ``book`` is a checksum file like the datasets' (``ChecksumBook``), keyed by ``weights``
    as written in params.yaml; commit it to pin the files. A mismatch raises
    ``ReleasedWeightsError`` saying how to accept a deliberately replaced file.
    """
    path = resolve_weights(weights, root, where)
    require_weights(path, where)
    digest = sha256_of(path)
    known = _weights_book(book).get(weights)
    if known is not None and known != digest:
        raise ReleasedWeightsError(
            f"{where}: {path} has SHA-256 {digest}, but {known} was recorded for it on first "
            f"use in {book}; if you replaced the file on purpose, delete its entry there"
        )
    return path, WeightsRecord(file=weights, sha256=digest, bytes=path.stat().st_size, key=key)


def pin_weights(record: WeightsRecord, *, book: Path) -> None:
    """Record the SHA-256 of a file that loaded, if its entry is new (written atomically; an
    entry lost to a concurrent writer is recorded again on the next use)."""
    checksums = _weights_book(book)
    if checksums.get(record.file) is None:
        entry = CATALOGUE.get(Path(record.file).name)
        checksums.record(
            record.file, record.sha256, f"{DRIVE_FOLDER} {entry.member}" if entry else ""
        )


def _weights_book(book: Path) -> ChecksumBook:
    try:
        return ChecksumBook(book, writer="the check_released stage (dvc repro check_released@NAME)")
    except ValueError as err:
        raise ReleasedWeightsError(str(err)) from None


def check_finite(model: nn.Module, source: str | Path) -> None:
    """ValueError naming ``source`` if any weight of ``model`` is NaN or infinite: such a model
    turns every image into NaN, which would be written as black."""
    bad = [name for name, t in model.state_dict().items() if not torch.isfinite(t).all()]
    if bad:
        total = len(model.state_dict())
        raise ValueError(
            f"{source}: {len(bad)} of {total} weight tensors hold NaN or infinite values "
            f"(first: {bad[0]}); these weights cannot restore anything (a diverged or damaged "
            f"file)"
        )


def read_basicsr(path: Path, key: str) -> Mapping[str, torch.Tensor]:
    """``params_ema`` or ``params`` of a BasicSR checkpoint, strictly: the key must be there."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated or not a torch file
        raise ReleasedWeightsError(
            f"{path}: cannot be read as a torch checkpoint ({err})"
        ) from None
    if not isinstance(blob, Mapping) or not any(k in blob for k in BASICSR_KEYS):
        found = ", ".join(map(str, list(blob)[:8])) if isinstance(blob, Mapping) else "not a dict"
        raise ReleasedWeightsError(
            f"{path}: not a BasicSR checkpoint (expected a dict with params and/or params_ema; "
            f"found {found})"
        )
    if key not in blob:
        other = next(k for k in BASICSR_KEYS if k in blob)
        raise ReleasedWeightsError(f"{path}: has no {key!r} (it has {other!r}); set `key: {other}`")
    state = blob[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        what = (
            "holds entries that are not named tensors"
            if isinstance(state, Mapping)
            else f"is {type(state).__name__}"
        )
        raise ReleasedWeightsError(
            f"{path}: {key!r} {what}; a BasicSR checkpoint maps parameter names to tensors"
        )
    return state


def load_released(
    path: Path,
    *,
    arch: str,
    norm: str,
    scale: int,
    key: str = "params_ema",
    overrides: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build the declared network and load the checkpoint's ``key`` tensors (eval mode).

    A file whose tensors do not fit raises ``ReleasedWeightsError`` listing the missing,
    unexpected and misshapen keys and what the file looks like.
    """
    state = dict(read_basicsr(Path(path), key))
    model = build_model(arch, norm=norm, scale=scale, **dict(overrides or {}))
    try:
        load_official_checkpoint(model, state)
    except ValueError as err:  # CheckpointMismatchError, or entries that are not tensors
        raise ReleasedWeightsError(f"{path} ({key}) as {arch}/{norm} x{scale}: {err}") from None
    try:
        check_finite(model, f"{path} ({key})")
    except ValueError as err:
        raise ReleasedWeightsError(str(err)) from None
    return model.to(device).eval()


def open_released(
    spec: ReleasedSpec, name: str, *, root: Path, book: Path, device: torch.device | str
) -> tuple[nn.Module, WeightsRecord]:
    """The model of ``released.<name>``: the name checked, the file
    verified, loaded, and then pinned in ``book``."""
    try:
        check_run_name(name, f"released.{name}")
    except ValueError as err:
        raise ReleasedWeightsError(str(err)) from None
    path, record = verify_weights(
        spec.weights, spec.key, root=root, book=book, where=f"released.{name}.weights"
    )
    model = load_released(
        path,
        arch=spec.arch,
        norm=spec.norm,
        scale=spec.scale,
        key=spec.key,
        overrides=spec.model_overrides(),
        device=device,
    )
    pin_weights(record, book=book)
    return model, record
