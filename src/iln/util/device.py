"""Where a model runs: the device a spec names, and the plain module under the wrappers
(DistributedDataParallel, torch.compile) that training may put around it."""

from __future__ import annotations

import torch
from torch import nn


def resolve_device(spec: str, local_rank: int = 0, *, key: str = "device") -> torch.device:
    """``auto`` -> the local rank's CUDA device when present, else CPU; otherwise the
    device ``spec`` names. ``key`` (the params key that gave ``spec``) names the setting
    in the error raised when it asks for CUDA on a machine without one."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key}: {spec!r} but no CUDA device is available (use auto or cpu)")
    return device


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers (same parameters, eager forward):
    what checkpoints save, EMA follows and probes hook (hooks on a compiled graph would
    force a recompilation at every measurement)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def use_tf32(device: torch.device, enabled: bool) -> bool:
    """Let fp32 matmuls and convolutions on CUDA run in TF32 (``train.tf32``), process-wide;
    returns whether TF32 is now on (never on the CPU, where it does not exist)."""
    on = enabled and device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on
