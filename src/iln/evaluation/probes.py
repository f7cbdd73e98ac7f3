"""Feature statistics of the residual stream, measured through hooks attached from outside.

The model is never modified: forward hooks are registered on the contract's probe points
(the input of the first group, the outputs of `model.residual_groups()`, optionally of every
block of `model.group_blocks(g)`, and the input of `model.norm`) for one pass over a fixed probe
batch and removed afterwards, also when the pass raises.

Statistics (paper Fig. 1/2/4/7, Table 8), on tokens x of shape (B, N, C), in float64
because LN features reach 1e6-1e7 and their squares would lose precision in float32:

- magnitude: mean of x^2 over (N, C) per image, averaged over images.
- max_abs: max |x| over the whole batch.
- entropy: per image, p_c = E_tokens[x_c^2] / sum_c' E_tokens[x_c'^2] and
  H = -sum_c p_c ln p_c (natural log, 0 ln 0 = 0), averaged over images. The ceiling is
  ln C (all channels carry equal energy); 0 means one channel carries everything. An image
  whose features are all zero has no distribution: its entropy is NaN.
- token_std_spread: per image, the per-token std over channels s_n (what a per-token LN
  divides out), then std_n(s_n) / mean_n(s_n) (coefficient of variation over tokens),
  averaged over images; 0 when every token has the same std (or all are constant).

The paper does not publish its formulas; these are ours. Where: the raw residual stream
(never a normalised tensor, which is ~1 by construction) at each group's output, the paper's
"layer output" of Fig. 1 (a HAT layer is a residual group); `body_in` is the stream entering
the first group (after the patch embedding), so that growth through the body can be read
apart from the scale the embedding sets.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from iln.config.layout import PROBE_COLUMNS as PROBE_COLUMNS  # the row schema, re-exported
from iln.util.device import unwrap

if TYPE_CHECKING:
    from iln.models.restorer import WindowedRestorer

FINAL_NORM_INPUT = "final_norm_in"
BODY_INPUT = "body_in"  # the residual stream entering the first group


# --------------------------------------------------------------------------------------
# Pure statistics


def _tokens64(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a residual-stream tensor of shape (B, N, C), got {shape}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"expected a non-empty (B, N, C) tensor, got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def per_image_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image statistics of tokens x (B, N, C), each a float64 tensor of shape (B,).

    Kept per image so that several forward calls (a probe batch run in chunks) combine
    exactly: means over images, max over images.
    """
    x64 = _tokens64(x)  # (B, N, C)
    sq = x64.square()  # (B, N, C)
    magnitude_b = sq.mean(dim=(1, 2))  # (B,)
    max_abs_b = x64.abs().amax(dim=(1, 2))  # (B,)

    energy = sq.mean(dim=1)  # (B, C) E_tokens[x_c^2]
    total = energy.sum(dim=1, keepdim=True)  # (B, 1)
    p = energy / total  # (B, C), NaN where total == 0
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))  # 0 ln 0 = 0
    entropy_b = -plogp.sum(dim=1)  # (B,)
    entropy_b = torch.where(total.squeeze(1) > 0, entropy_b, torch.full_like(entropy_b, math.nan))

    token_std = x64.std(dim=2, unbiased=False)  # (B, N)
    std_mean = token_std.mean(dim=1)  # (B,)
    std_std = token_std.std(dim=1, unbiased=False)  # (B,)
    spread_b = torch.where(
        std_mean > 0, std_std / std_mean.clamp_min(1e-300), torch.zeros_like(std_mean)
    )
    return {
        "magnitude": magnitude_b,
        "max_abs": max_abs_b,
        "entropy": entropy_b,
        "token_std_spread": spread_b,
    }


def magnitude(x: torch.Tensor) -> float:
    """Mean of x^2 over (N, C), averaged over the batch; x is (B, N, C)."""
    return float(per_image_stats(x)["magnitude"].mean())


def max_abs(x: torch.Tensor) -> float:
    """Largest |x| anywhere in the batch (paper Table 8); x is (B, N, C)."""
    return float(_tokens64(x).abs().max())


def channel_entropy(x: torch.Tensor) -> float:
    """Channel-energy entropy in nats, averaged over images; ceiling ln C. x is (B, N, C)."""
    return float(per_image_stats(x)["entropy"].mean())


def entropy_ceiling(channels: int) -> float:
    """ln C: the entropy when every channel carries the same energy."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    return math.log(channels)


def token_std_spread(x: torch.Tensor) -> float:
    """Coefficient of variation over tokens of the per-token std, averaged over images."""
    return float(per_image_stats(x)["token_std_spread"].mean())


def feature_row(layer: str, x: torch.Tensor) -> dict[str, object]:
    """One probes row (columns PROBE_COLUMNS) for tokens x (B, N, C)."""
    acc = _Accumulator()
    acc.add(x)
    return acc.row(layer)


@dataclass
class _Accumulator:
    """Per-image statistics of one probe point, gathered over one or more forward calls."""

    parts: list[dict[str, torch.Tensor]] = field(default_factory=list)
    channels: int | None = None

    def add(self, x: torch.Tensor) -> None:
        stats = per_image_stats(x)
        channels = int(x.shape[-1])
        if self.channels is not None and channels != self.channels:
            raise ValueError(f"channel count changed between calls: {self.channels} -> {channels}")
        self.channels = channels
        self.parts.append({k: v.cpu() for k, v in stats.items()})

    def row(self, layer: str) -> dict[str, object]:
        if not self.parts or self.channels is None:
            raise RuntimeError(f"probe point {layer!r} recorded nothing")
        cat = {k: torch.cat([p[k] for p in self.parts]) for k in self.parts[0]}
        return {
            "layer": layer,
            "magnitude": float(cat["magnitude"].mean()),
            "max_abs": float(cat["max_abs"].max()),
            "entropy": float(cat["entropy"].mean()),
            "entropy_ceiling": entropy_ceiling(self.channels),
            "token_std_spread": float(cat["token_std_spread"].mean()),
        }


# --------------------------------------------------------------------------------------
# Hooks


@dataclass(frozen=True)
class ProbePoint:
    """A named place in the model whose output (or input, for the final norm) is measured."""

    name: str
    module: nn.Module
    reads_input: bool


def probe_points(model: WindowedRestorer, *, per_block: bool = False) -> list[ProbePoint]:
    """The contract's probe points in forward order: body_in, [group{g}.block{b}...,]
    group{g}, ..., final_norm_in."""
    groups = model.residual_groups()
    points: list[ProbePoint] = [ProbePoint(BODY_INPUT, groups[0], True)] if len(groups) else []
    for g, group in enumerate(groups):
        if per_block:
            points.extend(
                ProbePoint(f"group{g}.block{b}", blk, False)
                for b, blk in enumerate(model.group_blocks(g))
            )
        points.append(ProbePoint(f"group{g}", group, False))
    points.append(ProbePoint(FINAL_NORM_INPUT, model.norm, True))
    return points


class FeatureProbe(contextlib.AbstractContextManager):
    """Context manager: hooks on every probe point while open, none after (also on errors).

    Usage: `with FeatureProbe(model) as probe: model(lq)`, then `probe.rows()`.
    The model itself is left exactly as it was; only hook handles are added and removed.
    """

    def __init__(self, model: nn.Module, *, per_block: bool = False) -> None:
        self._points = probe_points(model, per_block=per_block)
        self._acc: dict[str, _Accumulator] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureProbe:
        self._acc = {p.name: _Accumulator() for p in self._points}
        try:
            for point in self._points:
                self._handles.append(self._register(point))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook this probe registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def _register(self, point: ProbePoint) -> torch.utils.hooks.RemovableHandle:
        acc = self._acc[point.name]
        if point.reads_input:

            def pre_hook(_module: nn.Module, args: tuple) -> None:
                if not args:
                    raise RuntimeError(
                        f"{point.name}: the module was called without a positional input"
                    )
                acc.add(args[0])

            return point.module.register_forward_pre_hook(pre_hook)

        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"{point.name}: expected a (B, N, C) tensor output, got {type(output).__name__}"
                )
            acc.add(output)

        return point.module.register_forward_hook(hook)

    def rows(self) -> list[dict[str, object]]:
        """One row per probe point (columns PROBE_COLUMNS), in forward order."""
        out = []
        for point in self._points:
            if not self._acc[point.name].parts:
                raise RuntimeError(
                    f"probe point {point.name!r} saw no tensor during the forward pass; "
                    "does the model follow the residual-stream contract?"
                )
            out.append(self._acc[point.name].row(point.name))
        return out


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd for the body; every submodule's train/eval flag restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


def measure_features(
    model: nn.Module,
    lq_batch: torch.Tensor,
    *,
    per_block: bool = False,
    chunk_size: int | None = None,
) -> list[dict[str, object]]:
    """Feature statistics at every probe point for one pass over the probe batch.

    lq_batch: (B, 3, H, W) on the model's device. DDP / torch.compile wrappers are
    unwrapped (the measurement runs the plain module on the same parameters).
    chunk_size splits the batch to bound memory; the statistics are the same.
    Runs in eval mode under no_grad and restores the model's modes afterwards.
    """
    model = unwrap(model)
    if lq_batch.dim() != 4:
        raise ValueError(f"lq_batch must be (B, 3, H, W), got shape {tuple(lq_batch.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunks = lq_batch.split(chunk_size) if chunk_size else (lq_batch,)
    with evaluation_mode(model), FeatureProbe(model, per_block=per_block) as probe:
        for chunk in chunks:
            model(chunk)
        return probe.rows()
