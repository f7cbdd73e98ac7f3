"""Trained-model files: the EMA weights (what evaluation uses, as in the paper), the trained
("raw") weights beside them, and the recipe needed to rebuild the network.

``state_dict`` holds the EMA weights, so any reader that loads ``state_dict`` evaluates the
EMA model; ``raw_state_dict`` holds the weights of the model being trained at its last step
(what the training probes measured). With EMA decay 0.999 the EMA still carries
0.999^T of the initial weights after T steps (55% at T = 600), so on short runs the two
differ a lot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from iln.util.files import atomic_path
from iln.models import build_model

Weights = Literal["ema", "raw"]
STATE_KEYS: dict[str, str] = {"ema": "state_dict", "raw": "raw_state_dict"}


def save_trained(
    path: Path,
    model: nn.Module,
    *,
    arch: str,
    norm: str,
    scale: int,
    overrides: dict[str, Any],
    raw: nn.Module | None = None,
) -> None:
    """Write ``model`` (the EMA weights) and, when given, ``raw`` (the trained weights)."""
    blob = {
        "arch": arch,
        "norm": norm,
        "scale": scale,
        "overrides": dict(overrides),
        "state_dict": model.state_dict(),
    }
    if raw is not None:
        blob["raw_state_dict"] = raw.state_dict()
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_trained(
    path: Path, device: torch.device, *, weights: Weights = "ema"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network recorded in ``path`` and load its ``weights`` (eval mode)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained model here (run the train stage first)")
    if weights not in STATE_KEYS:
        raise ValueError(f"weights must be one of {sorted(STATE_KEYS)}, got {weights!r}")
    rerun = "the train stage writes it: rerun that stage (dvc repro -f train@RUN)"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # RuntimeError, EOFError, pickle errors, ... for a damaged file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: unreadable trained model ({first}); {rerun}") from None
    missing = {"arch", "norm", "scale", "overrides", "state_dict"} - set(
        blob if isinstance(blob, dict) else ()
    )
    if missing:
        raise ValueError(
            f"{path}: not a trained-model file (missing {', '.join(sorted(missing))}); {rerun}"
        )
    if STATE_KEYS[weights] not in blob:
        raise ValueError(
            f"{path}: holds no {weights} weights (written before they were saved); {rerun}"
        )
    state = blob[STATE_KEYS[weights]]
    wrong = [
        f"{key} is {type(blob[key]).__name__}, expected {expected}"
        for key, ok, expected in (
            ("arch", isinstance(blob["arch"], str), "a name"),
            ("norm", isinstance(blob["norm"], str), "a name"),
            ("scale", type(blob["scale"]) is int, "an integer"),
            ("overrides", isinstance(blob["overrides"], dict), "a dict"),
            (STATE_KEYS[weights], isinstance(state, dict), "a dict of tensors"),
        )
        if not ok
    ]
    if not wrong and not all(isinstance(v, torch.Tensor) for v in state.values()):
        wrong = [f"{STATE_KEYS[weights]} holds values that are not tensors"]
    if wrong:
        raise ValueError(f"{path}: not a trained-model file ({'; '.join(wrong)}); {rerun}")
    try:
        model = build_model(
            blob["arch"], norm=blob["norm"], scale=blob["scale"], **blob["overrides"]
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the recorded model cannot be built ({err}); {rerun}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(
            f"{path}: weights do not fit the recorded model ({first}); {rerun}"
        ) from None
    recipe = {k: blob[k] for k in ("arch", "norm", "scale", "overrides")}
    return model.to(device).eval(), recipe
