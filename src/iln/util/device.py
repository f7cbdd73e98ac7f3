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
    set_fp32_precision(on)
    return on


def set_fp32_precision(tf32: bool) -> None:
    """CUDA fp32 matmuls and cuDNN convolutions in TF32 (``tf32``) or full fp32, through
    ``torch.backends.*.fp32_precision`` where torch has it (2.9 and later; mixing it with
    the older ``allow_tf32`` flags raises there), else through ``allow_tf32``."""
    mode = "tf32" if tf32 else "ieee"
    if _has_fp32_precision():
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def fp32_precision() -> dict[str, str]:
    """How CUDA computes fp32 matmuls and convolutions now, and which torch API says so:
    ``{"api": ..., "matmul": "tf32" | "ieee", "conv": ...}`` (for run records)."""
    if _has_fp32_precision():
        matmul = torch.backends.cuda.matmul.fp32_precision
        conv = torch.backends.cudnn.conv.fp32_precision
        return {"api": "fp32_precision", "matmul": _effective(matmul), "conv": _effective(conv)}
    return {
        "api": "allow_tf32",
        "matmul": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
        "conv": "tf32" if torch.backends.cudnn.allow_tf32 else "ieee",
    }


def _has_fp32_precision() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(
        getattr(torch.backends.cudnn, "conv", None), "fp32_precision"
    )


def _effective(mode: str) -> str:
    """``none`` defers to the global ``torch.backends.fp32_precision`` (itself ``none`` =
    full fp32)."""
    if mode != "none":
        return mode
    parent = getattr(torch.backends, "fp32_precision", "none")
    return "ieee" if parent == "none" else parent


def use_cudnn_benchmark(device: torch.device, fixed_shapes: bool) -> bool:
    """Let cuDNN time its convolution algorithms once per shape and keep the fastest
    (``cudnn.benchmark``) on CUDA when every step has the same shapes (training patches);
    returns whether it is now on."""
    on = fixed_shapes and device.type == "cuda"
    torch.backends.cudnn.benchmark = on
    return on
