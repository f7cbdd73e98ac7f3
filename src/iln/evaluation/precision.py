"""Reduced-precision inference of a trained model (the paper's Table 4).

The paper's point: per-token LN lets the residual stream grow to 1e6-1e7, beyond the
largest half-precision value (65504), so the LN model's fp16 inference produces inf/NaN
and collapses, while i-LN keeps features near unit scale and loses nothing. This module
runs the same model in several numeric formats and reports, per format, PSNR / SSIM and
whether any group output or the final output became non-finite.

Formats (each on its own deep copy of the model; the caller's model is never touched):

- ``fp32``: the reference.
- ``fp16`` / ``bf16``: every floating parameter and buffer and the input are cast
  (``model.to(dtype)``), so the whole forward pass, residual additions included, runs in
  that format; no autocast, no fp32 islands.
- ``int8`` (simulated, fp32 arithmetic): weights of every ``nn.Linear`` / ``nn.Conv2d``
  are fake-quantised once, symmetric per output channel (scale = max |w| / 127 over the
  channel, values rounded and clamped to [-127, 127]); the input of every such layer is
  fake-quantised symmetric per tensor with a scale computed from that very input at call
  time (dynamic quantisation: max |x| / 127). Biases, norms, softmax, attention
  matmuls (``q @ k^T``, ``attn @ v``) and residual additions stay in fp32.
- ``int4`` (simulated, fp32 arithmetic): the same scheme as ``int8`` with 4-bit signed
  symmetric levels [-7, 7]: weights per output channel (scale = max |w| / 7 over the
  channel), the input of every ``nn.Linear`` / ``nn.Conv2d`` per tensor, dynamic
  (scale = max |x| / 7). Only 15 levels per tensor: a per-tensor activation scale set by a
  few huge LN features rounds every ordinary feature to 0, which is the paper's point
  about outliers and low-bit inference.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from iln.data.io import read_rgb
from iln.evaluation.inference import ModelRestorer, central_crop_pairs, restore, summarise
from iln.config.layout import PRECISION_MODES
from iln.evaluation.metrics import psnr, ssim

if TYPE_CHECKING:
    from iln.models.restorer import WindowedRestorer

FP16_MAX = 65504.0
INT8_MAX = 127
INT4_MAX = 7
INT_LEVELS = {"int8": INT8_MAX, "int4": INT4_MAX}  # largest integer level per integer mode

_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.float32,
    "int4": torch.float32,
}


def fake_quant_symmetric(
    x: torch.Tensor, scale: torch.Tensor, qmax: int = INT8_MAX
) -> torch.Tensor:
    """Round ``x / scale`` to integers in [-qmax, qmax] and map back (``scale`` > 0,
    broadcastable); qmax 127 is int8, 7 is int4."""
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def _symmetric_scale(amax: torch.Tensor, qmax: int = INT8_MAX) -> torch.Tensor:
    """max |x| / qmax, with all-zero groups given scale 1 (they quantise to 0 either way)."""
    scale = amax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantise_weights_(model: nn.Module, qmax: int = INT8_MAX) -> int:
    """Fake-quantise Linear / Conv2d weights in place to [-qmax, qmax] levels, per output
    channel; returns how many layers."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                w = module.weight  # (out, in) or (out, in, kh, kw)
                amax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True)  # (out, 1, ...)
                w.copy_(fake_quant_symmetric(w, _symmetric_scale(amax, qmax), qmax))
                count += 1
    return count


def _input_quantiser(qmax: int):
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        scale = _symmetric_scale(x.detach().abs().amax(), qmax)
        return (fake_quant_symmetric(x, scale, qmax),) + tuple(args[1:])

    return hook


def attach_activation_quant(
    model: nn.Module, qmax: int = INT8_MAX
) -> list[torch.utils.hooks.RemovableHandle]:
    """Per-tensor dynamic fake-quantisation to [-qmax, qmax] levels of the input of every
    Linear / Conv2d."""
    hook = _input_quantiser(qmax)
    return [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]


def _abs_max(t: torch.Tensor) -> float:
    """max |t| in float, with NaN counted as inf (a NaN feature is an overflow)."""
    t = t.detach().float().abs()
    return float(torch.nan_to_num(t, nan=math.inf, posinf=math.inf).amax())


class FeatureMonitor:
    """Forward hooks recording max |x| and non-finite values in every group output
    (``model.residual_groups()``) and in the model's final output; hooks removed on exit."""

    def __init__(self, model: WindowedRestorer) -> None:
        self.model = model
        self._groups = list(model.residual_groups())
        self.max_abs_feature = 0.0
        self.feature_nonfinite = False
        self.output_nonfinite = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _on_group(self, module: nn.Module, inputs: Any, output: Any) -> None:
        t = output if isinstance(output, torch.Tensor) else output[0]  # (B, N, C)
        m = _abs_max(t)
        self.max_abs_feature = max(self.max_abs_feature, m)
        self.feature_nonfinite |= not math.isfinite(m)

    def _on_output(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.output_nonfinite |= not bool(torch.isfinite(output).all())  # (B, 3, sH, sW)

    @property
    def overflow(self) -> bool:
        return self.feature_nonfinite or self.output_nonfinite

    def __enter__(self) -> FeatureMonitor:
        self._handles = [g.register_forward_hook(self._on_group) for g in self._groups]
        self._handles.append(self.model.register_forward_hook(self._on_output))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def prepare_model(model: nn.Module, mode: str, device: torch.device | str) -> nn.Module:
    """A deep copy of ``model`` on ``device`` in the numeric format ``mode``, in eval mode."""
    if mode not in PRECISION_MODES:
        raise ValueError(f"unknown precision mode {mode!r}; expected one of {PRECISION_MODES}")
    m = copy.deepcopy(model).to(device=device, dtype=_DTYPES[mode]).eval()
    if mode in INT_LEVELS:
        quantise_weights_(m, INT_LEVELS[mode])
        attach_activation_quant(m, INT_LEVELS[mode])  # the hooks live and die with this copy
    return m


def evaluate_precisions(
    model: nn.Module,
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]],
    *,
    scale: int,
    device: torch.device | str,
    modes: Sequence[str] = PRECISION_MODES,
    crop_border: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """PSNR / SSIM (Y, ``crop_border`` default ``scale``) and overflow flags per format.

    Returns ``{mode: {"psnr", "ssim", "count", "psnr_infinite", "overflow",
    "output_nonfinite", "max_abs_feature", "exceeds_fp16_range", "unsupported"}}``:
    ``overflow`` is True when any group output or the final output contained inf/NaN on
    any image; ``max_abs_feature`` is the largest |x| over all group outputs and images
    (inf when non-finite); ``exceeds_fp16_range`` says whether that exceeds 65504 (the
    fp32 row thereby predicts the fp16 outcome). If a format fails to run on ``device``
    (an operator without a kernel for that dtype), its row has ``"unsupported"`` set to
    the error message and no scores, and the other formats still run; a failure in fp32
    is raised. The pairs are read once; all formats run on each image in turn.
    """
    modes = tuple(modes)
    for mode in modes:
        if mode not in PRECISION_MODES:
            raise ValueError(f"unknown precision mode {mode!r}; expected one of {PRECISION_MODES}")
    if model.scale != scale:
        raise ValueError(f"model.scale={model.scale} but scale={scale} was requested")
    border = scale if crop_border is None else crop_border
    copies = {mode: prepare_model(model, mode, device) for mode in modes}
    monitors = {mode: FeatureMonitor(copies[mode]) for mode in modes}
    rows: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    unsupported: dict[str, str | None] = {mode: None for mode in modes}
    total = len(pairs) if hasattr(pairs, "__len__") else None
    for name, lq, gt in tqdm(
        pairs, total=total, disable=not progress, desc="precision", leave=False
    ):
        for mode in modes:
            if unsupported[mode] is not None:
                continue
            try:
                with monitors[mode]:
                    pred = restore(copies[mode], lq, device=device, dtype=_DTYPES[mode])
            except (RuntimeError, NotImplementedError) as err:
                if mode == "fp32":
                    raise
                unsupported[mode] = (
                    f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                )
                continue
            if pred.shape != gt.shape:
                raise ValueError(
                    f"restored {name!r} has shape {pred.shape} but its gt has {gt.shape}"
                )
            rows[mode].append(
                {
                    "image": name,
                    "psnr": psnr(pred, gt, crop_border=border),
                    "ssim": ssim(pred, gt, crop_border=border),
                }
            )
    result: dict[str, dict[str, Any]] = {}
    for mode in modes:
        mon = monitors[mode]
        entry: dict[str, Any] = {
            "psnr": None,
            "ssim": None,
            "count": 0,
            "psnr_infinite": 0,
            "overflow": mon.overflow,
            "output_nonfinite": mon.output_nonfinite,
            "max_abs_feature": mon.max_abs_feature,
            "exceeds_fp16_range": mon.max_abs_feature > FP16_MAX,
            "unsupported": unsupported[mode],
        }
        if unsupported[mode] is None and rows[mode]:
            entry.update(summarise(rows[mode]))
        result[mode] = entry
    return result


@dataclasses.dataclass(frozen=True)
class PrecisionJob:
    """One format of the precision table on one test set (a job for ``iln.util.pool.run_jobs``).

    Called with the restorers by task (the pool's shared state; the task's restorer must be a
    ``ModelRestorer``); returns ``evaluate_precisions(...)[mode]`` for the (name, lq file,
    gt file) ``pairs``, each cut to its central ``crop`` LR pixels (0 = whole images).
    """

    task: str
    dataset: str  # which set the pairs are (for the caller's bookkeeping)
    pairs: tuple[tuple[str, Path, Path], ...]
    mode: str
    crop: int
    crop_border: int

    def __call__(self, restorers: Mapping[str, Any]) -> dict[str, Any]:
        restorer = restorers[self.task]
        if not isinstance(restorer, ModelRestorer):
            raise ValueError(f"the precision table needs a model to restore {self.task} with")
        model = restorer.model
        pairs = [(name, read_rgb(lq), read_rgb(gt)) for name, lq, gt in self.pairs]
        if self.crop:
            pairs = central_crop_pairs(pairs, lq_size=self.crop, scale=model.scale)
        return evaluate_precisions(
            model,
            pairs,
            scale=model.scale,
            device=restorer.device,
            modes=(self.mode,),
            crop_border=self.crop_border,
            progress=False,
        )[self.mode]
