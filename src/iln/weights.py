"""Trained-model files: EMA weights plus the recipe needed to rebuild the network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from iln.models import build_model
from iln.train import save_atomic


def save_trained(
    path: Path, model: nn.Module, *, arch: str, norm: str, scale: int, overrides: dict[str, Any]
) -> None:
    save_atomic(
        {
            "arch": arch,
            "norm": norm,
            "scale": scale,
            "overrides": dict(overrides),
            "state_dict": model.state_dict(),
        },
        Path(path),
    )


def load_trained(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network recorded in ``path`` and load its weights (eval mode)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained model here (run the train stage first)")
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
    model = build_model(blob["arch"], norm=blob["norm"], scale=blob["scale"], **blob["overrides"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(
            f"{path}: weights do not fit the recorded model ({first}); {rerun}"
        ) from None
    recipe = {k: blob[k] for k in ("arch", "norm", "scale", "overrides")}
    return model.to(device).eval(), recipe
