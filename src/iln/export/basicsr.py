"""The official BasicSR checkpoint layout (``params_ema``) of HAT, SwinIR and DRCT, i-LN norms
named ``gamma`` / ``beta`` as in the authors' code (``iln.models.checkpoint``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from iln.export import settings_of
from iln.models import to_official_state_dict
from iln.util.files import atomic_path

RELEASED_IMG_SIZE = 64  # the released constructors' img_size (sets SwinIR/DRCT attn_mask)


def write_basicsr(model: nn.Module, path: Path) -> int:
    """Write ``{"params_ema": state}`` under the released key names; the number of tensors."""
    hp = settings_of(model)
    state = to_official_state_dict(model, img_size=hp.get("img_size", RELEASED_IMG_SIZE))
    state = {k: v.cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        torch.save({"params_ema": state}, tmp)
    return len(state)
