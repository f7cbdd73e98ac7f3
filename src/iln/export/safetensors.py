"""safetensors files of any model: the state dict, and in the metadata the hyper-parameters
that rebuild the network (``iln.arch``, ``iln.norm``, ``iln.scale``, ``iln.overrides``) plus
what the caller adds (the run's parameters, the released file's checksum)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iln.export import ExportError, recipe_of, require
from iln.models import build_model
from iln.util.files import atomic_path

FORMAT_KEY = "iln.format"
FORMAT_VERSION = "1"
_RECIPE_KEYS = ("iln.arch", "iln.norm", "iln.scale", "iln.overrides")


def write_safetensors(model: nn.Module, path: Path, extra: Mapping[str, Any] | None = None) -> int:
    """Write ``model``'s tensors and its recipe (``extra``: more JSON-able metadata, stored
    under ``iln.<key>``); the number of tensors."""
    st = require("safetensors.torch")
    arch, norm, scale, overrides = recipe_of(model)
    meta = {
        FORMAT_KEY: FORMAT_VERSION,
        "iln.arch": arch,
        "iln.norm": norm,
        "iln.scale": str(scale),
        "iln.overrides": json.dumps(overrides, sort_keys=True),
    }
    for key, value in (extra or {}).items():
        meta[f"iln.{key}"] = json.dumps(value, sort_keys=True, default=str)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        st.save_file(state, str(tmp), metadata=meta)
    return len(state)


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (ExportError naming the file if unreadable)."""
    safetensors = require("safetensors")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, ValueError, RuntimeError) as err:  # SafetensorError is a RuntimeError...
        raise ExportError(f"{path}: not a readable safetensors file ({err})") from None
    except Exception as err:  # ...or its own class, depending on the version
        raise ExportError(f"{path}: not a readable safetensors file ({err})") from None


def read_safetensors(path: Path, device: torch.device | str = "cpu") -> nn.Module:
    """The model a ``write_safetensors`` file holds, weights loaded strictly (eval mode)."""
    st = require("safetensors.torch")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    meta = read_metadata(path)
    missing = [k for k in _RECIPE_KEYS if k not in meta]
    if missing:
        raise ExportError(
            f"{path}: no iln recipe in its metadata (missing {', '.join(missing)}); a "
            f"safetensors file of weights alone: read it with safetensors and give the "
            f"architecture yourself"
        )
    try:
        overrides = json.loads(meta["iln.overrides"])
        model = build_model(
            meta["iln.arch"], norm=meta["iln.norm"], scale=int(meta["iln.scale"]), **overrides
        )
    except (ValueError, TypeError) as err:
        raise ExportError(f"{path}: its recipe cannot be built ({err})") from None
    state = st.load_file(str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ExportError(f"{path}: tensors do not fit the recorded model ({first})") from None
    return model.to(device).eval()
