"""Restoring one's own images with a trained or released model (``iln restore``).

The model comes from either a ``model.pt`` written by the train stage (it records its
architecture) or a BasicSR checkpoint such as the authors' released files (the caller names
the architecture). Every image goes through ``iln.evaluate.restore``, the function the
evaluate stage uses, so the same weights and input give the same pixels as the stage's
samples (on the same device and number of CPU threads: torch's parallel reductions, such as
the i-LN statistics, can differ in the last bit across thread counts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from iln.data.io import ImageReadError, list_images, read_rgb, write_png
from iln.evaluate import restore
from iln.released import BASICSR_KEYS, ReleasedWeightsError, load_released
from iln.weights import load_trained

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Norms that normalise each token on its own: the paper finds their features grow to
# ~1e6, past the largest fp16 value (65504).
PER_TOKEN_NORMS = ("ln", "ln_rs", "rmsnorm", "layerscale")


class RestoreError(ValueError):
    """The weights or the arguments cannot be used; the message says why."""


def load_model(
    weights: Path,
    *,
    device: torch.device | str,
    arch: str | None = None,
    norm: str | None = None,
    scale: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    key: str = "params_ema",
) -> nn.Module:
    """A train-stage ``model.pt`` (architecture recorded inside; arch/norm/scale must be
    None) or a BasicSR checkpoint (arch, norm and scale required), in eval mode."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such weights file")
    try:
        blob = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated or not a torch file
        raise RestoreError(f"{weights}: cannot be read as a torch file ({err})") from None
    given = [name for name, v in (("--arch", arch), ("--norm", norm), ("--scale", scale)) if v]
    if isinstance(blob, Mapping) and "state_dict" in blob and "arch" in blob:
        if given or overrides:
            raise RestoreError(
                f"{weights} records its own architecture ({blob['arch']}, {blob['norm']}, "
                f"x{blob['scale']}); drop {', '.join(given) or 'the model options'}"
            )
        model, _ = load_trained(weights, torch.device(device))
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
                key=key,
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


def output_paths(inputs: Sequence[Path], output: Path) -> dict[Path, Path]:
    """Input -> output PNG: the input's name with .png, in folder ``output``; a single input
    with an ``output`` ending in .png is written to exactly that file."""
    output = Path(output)
    if len(inputs) == 1 and output.suffix.lower() == ".png" and not output.is_dir():
        return {inputs[0]: output}
    return {p: output / f"{p.stem}.png" for p in inputs}


@dataclass(frozen=True)
class Failure:
    image: Path
    message: str


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
) -> list[Failure]:
    """Restore every input to its output PNG (written atomically); returns the failures.

    An input that cannot be read or restored is skipped and reported; the others are still
    written. ``model`` is cast to ``precision`` in place.
    """
    if precision not in PRECISIONS:
        raise RestoreError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    model.to(dtype)
    failures: list[Failure] = []
    claimed: dict[Path, Path] = {}
    for image, out in tqdm(targets.items(), disable=not progress, desc="restore", unit="image"):
        problem = None
        if out.resolve() == image.resolve():
            problem = f"the output {out} would overwrite the input"
        elif out.resolve() in claimed:
            problem = f"{out} is already the output of {claimed[out.resolve()]}"
        if problem is None:
            claimed[out.resolve()] = image
            try:
                restored = restore(
                    model,
                    read_rgb(image),
                    device=device,
                    dtype=dtype,
                    tile=tile,
                    tile_overlap=tile_overlap,
                )
                write_png(out, restored)
            except (ImageReadError, ValueError, RuntimeError, OSError) as err:
                problem = str(err) if str(err).startswith(str(image)) else f"{image}: {err}"
        if problem is not None:
            failure = Failure(
                image, problem if problem.startswith(str(image)) else f"{image}: {problem}"
            )
            failures.append(failure)
            if on_failure is not None:
                on_failure(failure)
    return failures
