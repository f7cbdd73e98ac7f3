"""Initial weights from another run or a released file (``runs.R.init``), instead of a fresh
initialisation: how SwinIR, KAIR and HAT-dagger train x3/x4 models from their x2 weights.

Every tensor of the model whose name and shape match a tensor of the source is carried over;
the others (e.g. an upsampler of another scale) keep their fresh initialisation and are
listed. The source's SHA-256 goes into the run's fingerprint, so a retrained source trains
the run afresh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from iln.models.checkpoint import official_key_map, read_state_dict


@dataclass(frozen=True)
class WarmStart:
    """What ``carry_weights`` did: the source, its digest, what was carried and what not."""

    source: str
    sha256: str
    carried: tuple[str, ...]
    fresh: tuple[str, ...]  # model tensors without a same-named, same-shaped source tensor
    unused: tuple[str, ...]  # source tensors the model has no place for

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "carried": len(self.carried),
            "fresh": list(self.fresh),
            "unused": list(self.unused),
        }


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def trained_state(path: Path) -> dict[str, Tensor]:
    """The EMA weights of a trained-model file (``iln.weights.trained``), our tensor names."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), Mapping):
        raise ValueError(f"{path}: not a trained-model file (no state_dict)")
    return dict(blob["state_dict"])


def released_state(path: Path, key: str, model: nn.Module) -> dict[str, Tensor]:
    """The tensors under ``key`` of a BasicSR-format file, renamed to ``model``'s names
    (released names the model does not use are kept as they are)."""
    ours_of = {theirs: ours for ours, theirs in official_key_map(model).items()}
    return {ours_of.get(k, k): v for k, v in read_state_dict(path, key).items()}


def carry_weights(
    model: nn.Module, source: Mapping[str, Tensor], *, name: str, sha256: str
) -> WarmStart:
    """Copy into ``model`` every tensor of ``source`` with the same name and shape."""
    target = model.state_dict()
    carried = [k for k, v in target.items() if k in source and source[k].shape == v.shape]
    with torch.no_grad():
        for k in carried:
            target[k].copy_(source[k])
    return WarmStart(
        source=name,
        sha256=sha256,
        carried=tuple(carried),
        fresh=tuple(k for k in target if k not in set(carried)),
        unused=tuple(k for k in source if k not in target),
    )
