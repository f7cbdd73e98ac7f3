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
    blob = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"arch", "norm", "scale", "overrides", "state_dict"} - set(blob)
    if missing:
        raise ValueError(f"{path}: not a trained-model file (missing {', '.join(sorted(missing))})")
    model = build_model(blob["arch"], norm=blob["norm"], scale=blob["scale"], **blob["overrides"])
    model.load_state_dict(blob["state_dict"])
    recipe = {k: blob[k] for k in ("arch", "norm", "scale", "overrides")}
    return model.to(device).eval(), recipe
