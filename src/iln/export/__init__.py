"""Models that travel: a trained or released model written in the formats other tools load,
and files of those formats read back into this project's models.

- ``basicsr``: the official i-LN / HAT / SwinIR / DRCT checkpoint layout (``params_ema``), which
  the authors' code loads strictly (i-LN norms named ``gamma`` / ``beta``) and spandrel
  (chaiNNer) detects for the LN models;
- ``redux``: traiNNer-redux's ``hat_iln`` (HAT with i-LN), with our input encoding folded
  into the first and last convolutions (``iln.export.redux``);
- ``safetensors``: every model, its hyper-parameters in the file's metadata;
- ``onnx``: the whole network (padding, whole-image statistics, cropping) as one graph for
  onnxruntime.

The optional packages (``pip install -e ".[export]"``) are imported only when a format needs
them (``require``).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from torch import nn

from iln.models import ModelSettings, build_model

FORMATS = ("onnx", "safetensors", "basicsr", "redux")
IMPORT_FORMATS = ("safetensors", "redux")


class ExportError(ValueError):
    """A model cannot be written in (or read from) a format; the message says why."""


def require(module: str) -> ModuleType:
    """``module`` imported, or ExportError in one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f'{module} is not installed: pip install -e ".[export]" (or pip install {module})'
        ) from None


def settings_of(model: nn.Module) -> dict[str, Any]:
    """The resolved settings ``build_model`` left on ``model``, as one flat mapping."""
    settings = getattr(model, "settings", None)
    if not isinstance(settings, ModelSettings):
        raise ExportError(f"{type(model).__name__} was not built by iln.models.build_model")
    return settings.as_dict()


def recipe_of(model: nn.Module) -> tuple[str, str, int, dict[str, Any]]:
    """(arch, norm, scale, overrides) that rebuild ``model`` with ``build_model``."""
    hp = settings_of(model)
    overrides = {k: v for k, v in hp.items() if k not in ("arch", "norm", "scale", "family")}
    return hp["arch"], hp["norm"], hp["scale"], overrides


def rebuild(model: nn.Module, *, fast: bool) -> nn.Module:
    """The same network with the same weights, on the fast or the reference path (eval, CPU)."""
    arch, norm, scale, overrides = recipe_of(model)
    copy = build_model(arch, norm=norm, scale=scale, fast=fast, **overrides)
    copy.load_state_dict(model.state_dict())
    return copy.cpu().eval()
