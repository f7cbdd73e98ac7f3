"""Restoring one's own images with a trained or released model (``iln restore``).

The model comes from either a ``model.pt`` written by the train stage (it records its
architecture) or a BasicSR checkpoint such as the authors' released files (the caller names
the architecture). Every image goes through ``iln.evaluation.inference.restore``, the function the
evaluate stage uses, so the same weights and input give the same pixels as the stage's
samples (on the same device and number of CPU threads: torch's parallel reductions, such as
the i-LN statistics, can differ in the last bit across thread counts).

Nothing of the user's is lost: ``plan_outputs`` checks every output against every input and
every existing file, and ``check_writable`` the output folder, before any image is computed;
weights or outputs that are NaN or infinite are refused rather than written as black images.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from iln.data.io import (
    WRITE_FORMATS,
    ImageReadError,
    image_size,
    list_images,
    read_rgb,
    write_image,
)
from iln.evaluation.inference import NonFiniteOutputError, restore
from iln.weights.released import BASICSR_KEYS, ReleasedWeightsError, check_finite, load_released
from iln.weights.trained import load_trained

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Norms that normalise each token on its own: the paper finds their features grow to
# ~1e6, past the largest fp16 value (65504).
PER_TOKEN_NORMS = ("ln", "ln_rs", "rmsnorm", "layerscale")
_PROBE_BYTES = 64 * 1024


class RestoreError(ValueError):
    """The weights or the arguments cannot be used; the message says why."""


def check_weights_file(weights: Path) -> None:
    """FileNotFoundError for a missing file, RestoreError for a folder or a device (whose
    reading would never end, as ``/dev/zero``), in one line naming the path."""
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: no such weights file")
    if weights.is_dir():
        raise RestoreError(f"{weights}: is a folder; expected a weights file (model.pt or .pth)")
    if not weights.is_file():
        raise RestoreError(
            f"{weights}: not a regular file (a device, pipe or socket); expected a weights file"
        )


def load_model(
    weights: Path,
    *,
    device: torch.device | str,
    arch: str | None = None,
    norm: str | None = None,
    scale: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    key: str | None = None,
) -> nn.Module:
    """A train-stage ``model.pt`` (architecture recorded inside; arch/norm/scale/key must be
    None) or a BasicSR checkpoint (arch, norm and scale required; ``key`` picks ``params`` or
    ``params_ema``, the default), in eval mode. Weights that are NaN or infinite are refused."""
    weights = Path(weights)
    check_weights_file(weights)
    try:
        blob = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated or not a torch file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RestoreError(f"{weights}: cannot be read as a torch file ({first})") from None
    given = [name for name, v in (("--arch", arch), ("--norm", norm), ("--scale", scale)) if v]
    if isinstance(blob, Mapping) and "state_dict" in blob and "arch" in blob:
        recorded = ", ".join(str(blob.get(k)) for k in ("arch", "norm", "scale"))
        if given or overrides:
            raise RestoreError(
                f"{weights} records its own architecture ({recorded}); "
                f"drop {', '.join(given) or 'the model options'}"
            )
        if key is not None:
            raise RestoreError(
                f"{weights} is a model.pt of the train stage, restored with the EMA weights it "
                f"holds; --key picks params or params_ema of a BasicSR checkpoint: drop it"
            )
        model, _ = load_trained(weights, torch.device(device))
        check_finite(model, weights)
        return model
    if isinstance(blob, Mapping) and any(k in blob for k in BASICSR_KEYS):
        missing = [o for o, v in (("--arch", arch), ("--norm", norm), ("--scale", scale)) if not v]
        if missing:
            raise RestoreError(
                f"{weights} is a BasicSR checkpoint, which does not record its architecture: "
                f"give {', '.join(missing)} (e.g. --arch hat_1 --norm iln --scale 4)"
            )
        del blob
        try:
            return load_released(
                weights,
                arch=arch,
                norm=norm,
                scale=scale,
                key=key or "params_ema",
                overrides=overrides,
                device=device,
            )
        except ReleasedWeightsError as err:
            raise RestoreError(str(err)) from None
    raise RestoreError(
        f"{weights}: neither a model.pt of the train stage nor a BasicSR checkpoint "
        f"(a dict with params / params_ema)"
    )


def fp16_warning(model: nn.Module, precision: str) -> str | None:
    """A warning when a per-token-norm model is run in fp16 (the paper's overflow)."""
    norm = getattr(model, "hparams", {}).get("norm")
    if precision != "fp16" or norm not in PER_TOKEN_NORMS:
        return None
    return (
        f"warning: this model uses per-token {norm}; such models' features can reach ~1e6, "
        f"past the fp16 maximum 65504, and the output may collapse (the paper's finding). "
        f"Use --precision fp32 or bf16 if it does."
    )


def input_images(source: Path) -> list[Path]:
    """One image file, or the images directly in a folder (sorted by name)."""
    source = Path(source)
    if source.is_dir():
        images = list_images(source)
        if not images:
            raise FileNotFoundError(f"{source}: no images in this folder")
        return images
    if source.is_file():
        return [source]
    raise FileNotFoundError(f"{source}: no such image or folder")


def plan_outputs(
    inputs: Sequence[Path], output: Path, *, overwrite: bool = False
) -> dict[Path, Path]:
    """Input -> output file, checked before any work; RestoreError names the first conflict.

    ``output`` with an image suffix (``WRITE_FORMATS``: .png, .jpg, ...) that is not an
    existing folder, for a single input, is that file, in that format. Otherwise ``output``
    is a folder of PNGs named after the inputs (``a.jpg`` -> ``a.png``); inputs that share
    a name but not the suffix (``a.jpg``, ``a.png``) keep their suffix (``a.jpg.png``,
    ``a.png.png``). An output that is one of the inputs (any of them, not only its own), an
    existing folder, or the output of two inputs is refused; an existing file is refused
    unless ``overwrite``.
    """
    output = Path(output)
    inputs = list(inputs)
    single = output.suffix.lower() in WRITE_FORMATS and not output.is_dir()
    if single and len(inputs) > 1:
        raise RestoreError(
            f"{output}: names one image file, but there are {len(inputs)} input images; "
            f"give a folder for OUTPUT"
        )
    if not single and output.exists() and not output.is_dir():
        raise RestoreError(
            f"{output}: exists and is not a folder; OUTPUT is a folder, or an image file "
            f"({', '.join(WRITE_FORMATS)}) for a single input"
        )
    if single:
        targets = {inputs[0]: output}
    else:
        stems = Counter(p.stem.casefold() for p in inputs)
        targets = {
            p: output / (f"{p.name}.png" if stems[p.stem.casefold()] > 1 else f"{p.stem}.png")
            for p in inputs
        }
    files_of_inputs = {_file_id(p): p for p in inputs}  # the same file under any name or link
    claimed: dict[str, Path] = {}
    for image, out in targets.items():
        # casefolded: two names that differ only in case are one file on macOS and Windows
        name = os.path.normpath(os.path.abspath(out)).casefold()
        if name in claimed:
            raise RestoreError(
                f"{out}: would be the output of both {claimed[name]} and {image}; restore them "
                f"into separate folders"
            )
        claimed[name] = image
        if out.is_dir():
            raise RestoreError(f"{out}: the output of {image} is an existing folder")
        if not out.exists():
            continue
        original = files_of_inputs.get(_file_id(out))
        if original is not None:
            whose = "that input itself" if original == image else f"the input image {original}"
            raise RestoreError(
                f"{out}: the output of {image} would replace {whose}; inputs are never "
                f"overwritten: choose an OUTPUT other than the inputs' folder (nothing was "
                f"written)"
            )
        if not overwrite:
            raise RestoreError(
                f"{out}: exists (it would be the output of {image}); pass --overwrite to "
                f"replace it, or choose another OUTPUT (nothing was written)"
            )
    return targets


def _file_id(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write (then remove) a 64 KiB probe file there, so that a
    read-only or full folder is reported before any image is computed."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RestoreError(
            f"{folder}: cannot create the output folder ({err.strerror or err}); nothing was "
            f"restored"
        ) from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".iln-restore-probe.") as probe:
            probe.write(bytes(_PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise RestoreError(
            f"{folder}: cannot write in the output folder ({err.strerror or err}); nothing "
            f"was restored"
        ) from None


@dataclass(frozen=True)
class Failure:
    image: Path
    message: str


@dataclass
class Outcome:
    """What ``restore_files`` did: the files written, the images skipped, and whether it
    ended early (``stopped``: a write failed, so the rest was not computed; or interrupted)."""

    written: list[Path] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    stopped: str | None = None
    interrupted: bool = False


def restore_files(
    model: nn.Module,
    targets: Mapping[Path, Path],
    *,
    device: torch.device | str,
    precision: str = "fp32",
    tile: int | None = None,
    tile_overlap: int = 16,
    progress: bool = True,
    on_failure: Callable[[Failure], None] | None = None,
) -> Outcome:
    """Restore every input to its output file (written atomically; ``plan_outputs`` made the
    targets).

    An input that cannot be read or restored (unreadable, out of memory, NaN or infinite
    output) is skipped and reported; the others are still written. A failed write (disk
    full, no permission) stops the run: the next images would fail too. Ctrl-C stops it as
    well; the file being written is removed, the ones written are kept. Progress is shown in
    LR pixels (and tiles, with ``tile``). ``model`` is cast to ``precision`` in place.
    """
    if precision not in PRECISIONS:
        raise RestoreError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    model.to(dtype)
    outcome = Outcome()
    sizes = {image: _pixels(image) for image in targets}
    bar = tqdm(
        total=sum(sizes.values()), disable=not progress, desc="restore", unit="px",
        unit_scale=True,
    )  # fmt: skip
    try:
        for number, (image, out) in enumerate(targets.items(), start=1):
            bar.set_postfix_str(f"image {number}/{len(targets)}")
            start = bar.n
            on_tile = _tile_progress(bar, f"image {number}/{len(targets)}", start, sizes[image])

            problem = None
            try:
                restored = restore(
                    model,
                    read_rgb(image, upright=True),
                    device=device,
                    dtype=dtype,
                    tile=tile,
                    tile_overlap=tile_overlap,
                    refuse_nonfinite=True,
                    on_tile=on_tile,
                )
            except ImageReadError as err:
                problem = str(err)
            except NonFiniteOutputError as err:
                hint = "; try --precision fp32 or bf16" if precision == "fp16" else ""
                problem = f"{err}{hint}"
            except (MemoryError, RuntimeError, ValueError) as err:
                problem = _memory_hint(err, image, tile) or _first_line(err)
            if problem is None:
                try:
                    write_image(out, restored)
                except OSError as err:  # DiskFullError, permission, ...: the rest would fail too
                    text = err.strerror or str(err)  # DiskFullError's names the file already
                    outcome.stopped = text if text.startswith(str(out)) else f"{out}: {text}"
                    break
                outcome.written.append(out)
            else:
                failure = Failure(
                    image, problem if problem.startswith(str(image)) else f"{image}: {problem}"
                )
                outcome.failures.append(failure)
                if on_failure is not None:
                    on_failure(failure)
            bar.update(start + sizes[image] - bar.n)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        bar.close()
    return outcome


def _tile_progress(bar: tqdm, label: str, start: float, pixels: int) -> Callable[[int, int], None]:
    """``on_tile`` for ``restore``: advance the bar by the tile's share of the image."""

    def on_tile(done: int, total: int) -> None:
        bar.set_postfix_str(f"{label}, tile {done}/{total}")
        bar.update(start + pixels * done // total - bar.n)

    return on_tile


def _pixels(image: Path) -> int:
    try:
        h, w = image_size(image)
    except ImageReadError:
        return 0  # reported when the image is read
    return h * w


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _memory_hint(err: BaseException, image: Path, tile: int | None) -> str | None:
    """The message for an image too large for memory (CPU or GPU), with what to do."""
    text = str(err)
    if not (isinstance(err, MemoryError) or "allocate" in text or "out of memory" in text):
        return None
    asked = re.search(r"allocate ([0-9.]+) ?(bytes|[KMGT]i?B)", text)
    more = f"; {asked.group(1)} {asked.group(2)} more were requested" if asked else ""
    size = "x".join(map(str, _size_or_none(image) or ()))
    advice = (
        f"use a smaller --tile than {tile}"
        if tile
        else "use --tile 256 (or smaller) to restore it in tiles"
    )
    return f"{image}: not enough memory to restore this {size} image{more}; {advice}"


def _size_or_none(image: Path) -> tuple[int, int] | None:
    try:
        return image_size(image)
    except ImageReadError:
        return None
