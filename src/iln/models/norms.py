"""Normalisation variants behind one interface.

Every norm maps tokens ``x`` of shape (B, N, C) to ``(y, scale)``: ``y`` is the
normalised tensor (B, N, C) fed to a residual branch and ``scale`` is what the block
multiplies that branch by before adding it back (``x <- x + scale * F(y)``).

- plain norms (LN, LN*, RMSNorm, BN, IN, DyT, identity, Affine) return ``UNIT`` (the
  python float 1.0), which the block treats as "no multiply";
- i-LN returns the per-image std sqrt(var + eps) of its input, shape (B, 1, 1), which is
  the input-adaptive rescaling of the paper (gradients flow through it);
- i-LN (clamped), traiNNer-redux's variant, returns that std clamped to twice a running
  average of it (the one norm that keeps state between calls, see ``ClampedImageLayerNorm``);
- LN+Rs returns the per-token std, shape (B, N, 1);
- LayerScale and ReZero return their learnable branch scale, (C,) resp. (), so that the
  block code is the same for every variant.

Nothing is cached on a module between calls (except the running std that defines
``iln_clamp``); eps is a per-instance attribute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iln.models import fast as fast_ops

UNIT = 1.0  # branch scale of every norm without rescaling

LAYERSCALE_INIT = 1e-4  # LayerScale per-channel branch scale at init
REZERO_INIT = 0.0  # ReZero scalar branch scale at init
DYT_ALPHA_INIT = 0.5  # Dynamic Tanh input scale at init (Zhu et al. 2025)

Scale = Tensor | float
NormFactory = Callable[[int], nn.Module]


class _Affine(nn.Module):
    """Per-channel weight (init 1) and bias (init 0) shared by most variants."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))


class LayerNorm(_Affine):
    """Per-token LayerNorm (the baseline): statistics over the C channels of each token."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim)
        self.eps = eps

    def forward(self, x: Tensor) -> tuple[Tensor, Scale]:  # x (B, N, C)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps), UNIT


class ImageLayerNorm(_Affine):
    """LN*: one mean and one biased variance per image over all N*C values.

    With ``rescale=True`` this is i-LN: the branch scale is the per-image std
    sqrt(var + eps) of the input (B, 1, 1), not detached. Statistics are per sample, so
    train and eval behave the same and nothing depends on the batch. ``fast`` computes
    the same map with fused kernels (``fast.standardize_affine``).
    """

    def __init__(self, dim: int, eps: float = 1e-4, rescale: bool = True, fast: bool = False):
        super().__init__(dim)
        self.eps = eps
        self.rescale = rescale
        self.fast = fast

    def forward(self, x: Tensor) -> tuple[Tensor, Scale]:  # x (B, N, C)
        if self.fast:
            y, std = fast_ops.standardize_affine(x, self.weight, self.bias, 2, self.eps)
        else:
            var, mean = torch.var_mean(x, dim=(1, 2), correction=0, keepdim=True)  # (B, 1, 1)
            std = torch.sqrt(var + self.eps)
            y = (x - mean) / std * self.weight + self.bias
        return y, (std if self.rescale else UNIT)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, rescale={self.rescale}"


CLAMP_EMA_ALPHA = 1e-3  # iln_clamp: weight of each new batch in the running std
CLAMP_FACTOR = 2.0  # iln_clamp: branch scale and running-std target <= CLAMP_FACTOR * running std


class ClampedImageLayerNorm(_Affine):
    """i-LN as traiNNer-redux implements it (its ``iLN``): the branch scale is clamped.

    The input is normalised exactly as by LN* (per-image mean and std over all N*C values,
    std = sqrt(var + eps)); the branch scale is ``min(std, 2 * std_ema)`` per image, where
    ``std_ema`` is a running average of the batch-mean std, updated in training mode only,
    without gradients:

    - the first training call (``std_ema`` still below eps) copies the batch mean;
    - later calls move it by alpha = 1e-3 towards ``min(batch mean, 2 * std_ema)``: a
      spiking batch is clamped to twice the running std and still counts, so a spike
      raises ``std_ema`` by at most 0.1% (traiNNer-redux's rule since its commit 327eecd,
      2 Apr 2026; before, such a batch was skipped);
    - while ``std_ema`` is below eps (never trained since built or loaded) the scale is the
      raw std, as plain i-LN.

    This is state kept on the module and changed by ``forward``: a non-persistent buffer
    (not in the state dict, so a loaded model starts again from "not initialised"). That
    is the variant's definition upstream, not a cache; the EMA weights of training copy it
    with the other buffers. There is no fast path: ``fast`` is accepted and ignored.
    """

    def __init__(self, dim: int, eps: float = 1e-4, fast: bool = False) -> None:
        super().__init__(dim)
        self.eps = eps
        self.register_buffer("std_ema", torch.zeros(()), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Scale]:  # x (B, N, C)
        var, mean = torch.var_mean(x, dim=(1, 2), correction=0, keepdim=True)  # (B, 1, 1)
        std = torch.sqrt(var + self.eps)
        if self.training:  # tensor ops only: no host sync, the same on every device
            with torch.no_grad():
                ema = self.std_ema
                batch = std.mean().to(ema.dtype)
                fresh = ema < self.eps
                target = torch.where(fresh, batch, torch.minimum(batch, CLAMP_FACTOR * ema))
                ema.lerp_(target, torch.where(fresh, 1.0, CLAMP_EMA_ALPHA).to(ema.dtype))
        ema = self.std_ema.to(std.dtype)
        scale = torch.where(ema < self.eps, std, torch.minimum(std, CLAMP_FACTOR * ema))
        return (x - mean) / std * self.weight + self.bias, scale

    def extra_repr(self) -> str:
        return f"eps={self.eps}, alpha={CLAMP_EMA_ALPHA}, clamp={CLAMP_FACTOR} x std_ema"


class TokenRescaledLayerNorm(_Affine):
    """LN+Rs: per-token LN whose branch is rescaled by the per-token std (B, N, 1)."""

    def __init__(self, dim: int, eps: float = 1e-5, fast: bool = False) -> None:
        super().__init__(dim)
        self.eps = eps
        self.fast = fast

    def forward(self, x: Tensor) -> tuple[Tensor, Scale]:  # x (B, N, C)
        if self.fast:
            return fast_ops.standardize_affine(x, self.weight, self.bias, 1, self.eps)
        var, mean = torch.var_mean(x, dim=-1, correction=0, keepdim=True)  # (B, N, 1)
        std = torch.sqrt(var + self.eps)
        return (x - mean) / std * self.weight + self.bias, std


class RMSNorm(_Affine):
    """Per-token RMSNorm x / sqrt(mean(x^2) + eps) * weight + bias.

    The bias (init 0) keeps the parameter count equal to the LN twin.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim)
        self.eps = eps

    def forward(self, x: Tensor) -> tuple[Tensor, Scale]:  # x (B, N, C)
        rms = torch.sqrt(x.square().mean(dim=-1, keepdim=True) + self.eps)  # (B, N, 1)
        return x / rms * self.weight + self.bias, UNIT


class LayerScaleNorm(LayerNorm):
    """Per-token LN plus a learnable per-channel branch scale (LayerScale, init small)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim, eps)
        self.branch_scale = nn.Parameter(torch.full((dim,), LAYERSCALE_INIT))

    def forward(self, x: Tensor) -> tuple[Tensor, Scale]:  # x (B, N, C)
        y, _ = super().forward(x)
        return y, self.branch_scale  # (C,)


class IdentityNorm(nn.Module):
    """No normalisation at all (paper Table 1 "None")."""

    def __init__(self, dim: int, eps: float = 0.0) -> None:
        super().__init__()
        self.eps = eps  # unused; kept so every norm has the same constructor

    def forward(self, x: Tensor) -> tuple[Tensor, Scale]:
        return x, UNIT


class ReZeroNorm(IdentityNorm):
    """No normalisation; the branch is scaled by a learnable scalar initialised to 0."""

    def __init__(self, dim: int, eps: float = 0.0) -> None:
        super().__init__(dim, eps)
        self.alpha = nn.Parameter(torch.tensor(REZERO_INIT))

    def forward(self, x: Tensor) -> tuple[Tensor, Scale]:
        return x, self.alpha  # ()


class BatchNorm(_Affine):
    """BatchNorm over the (B, N) tokens of a batch, per channel.

    ``track_running_stats=True`` (``batchnorm``) normalises with running statistics in
    eval mode; ``False`` (``batchnorm_train``) always uses the batch statistics.
    """

    def __init__(
        self, dim: int, eps: float = 1e-5, track_running_stats: bool = True, momentum: float = 0.1
    ) -> None:
        super().__init__(dim)
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(dim))
            self.register_buffer("running_var", torch.ones(dim))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, x: Tensor) -> tuple[Tensor, Scale]:  # x (B, N, C)
        use_batch_stats = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(
            x.reshape(-1, x.shape[-1]),  # (B*N, C)
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
        )
        return y.view_as(x), UNIT

    def extra_repr(self) -> str:
        return f"eps={self.eps}, track_running_stats={self.track_running_stats}"


class InstanceNorm(_Affine):
    """Per image and per channel, statistics over the N tokens."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim)
        self.eps = eps

    def forward(self, x: Tensor) -> tuple[Tensor, Scale]:  # x (B, N, C)
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)  # (B, 1, C)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias, UNIT


class DynamicTanh(_Affine):
    """DyT: weight * tanh(alpha * x) + bias with a learnable scalar alpha."""

    def __init__(self, dim: int, eps: float = 0.0) -> None:
        super().__init__(dim)
        self.eps = eps  # unused
        self.alpha = nn.Parameter(torch.tensor(DYT_ALPHA_INIT))

    def forward(self, x: Tensor) -> tuple[Tensor, Scale]:
        return torch.tanh(self.alpha * x) * self.weight + self.bias, UNIT


class Affine(_Affine):
    """x * weight + bias with no normalisation: the outer norms of the official i-LN model
    (patch-embed and final norm, which have no residual around them)."""

    def __init__(self, dim: int, eps: float = 0.0) -> None:
        super().__init__(dim)
        self.eps = eps  # unused

    def forward(self, x: Tensor) -> tuple[Tensor, Scale]:
        return x * self.weight + self.bias, UNIT


# name -> (constructor(dim, eps, fast), default eps). Only ``build_norm`` reads this table.
_VARIANTS: dict[str, tuple[Callable[[int, float, bool], nn.Module], float]] = {
    "ln": (lambda dim, eps, fast: LayerNorm(dim, eps), 1e-5),
    "iln": (lambda dim, eps, fast: ImageLayerNorm(dim, eps, rescale=True, fast=fast), 1e-4),
    "iln_clamp": (lambda dim, eps, fast: ClampedImageLayerNorm(dim, eps, fast=fast), 1e-4),
    "ln_star": (lambda dim, eps, fast: ImageLayerNorm(dim, eps, rescale=False, fast=fast), 1e-4),
    "ln_rs": (lambda dim, eps, fast: TokenRescaledLayerNorm(dim, eps, fast=fast), 1e-5),
    "rmsnorm": (lambda dim, eps, fast: RMSNorm(dim, eps), 1e-5),
    "layerscale": (lambda dim, eps, fast: LayerScaleNorm(dim, eps), 1e-5),
    "none": (lambda dim, eps, fast: IdentityNorm(dim, eps), 0.0),
    "rezero": (lambda dim, eps, fast: ReZeroNorm(dim, eps), 0.0),
    "batchnorm": (lambda dim, eps, fast: BatchNorm(dim, eps, track_running_stats=True), 1e-5),
    "batchnorm_train": (
        lambda dim, eps, fast: BatchNorm(dim, eps, track_running_stats=False),
        1e-5,
    ),
    "instancenorm": (lambda dim, eps, fast: InstanceNorm(dim, eps), 1e-5),
    "dyt": (lambda dim, eps, fast: DynamicTanh(dim, eps), 0.0),
}

NORMS: tuple[str, ...] = tuple(_VARIANTS)

# Without a residual around the norm a learnable branch scale has nothing to scale.
_OUTER_VARIANT = {"layerscale": "ln", "rezero": "none"}


def default_eps(name: str) -> float:
    """The eps a variant uses when none is given (LN family 1e-5, LN*/i-LN 1e-4)."""
    _check_name(name)
    return _VARIANTS[name][1]


def _check_name(name: str) -> None:
    if name not in _VARIANTS:
        raise ValueError(f"unknown norm {name!r}; valid norms: {', '.join(NORMS)}")


def build_norm(
    name: str, dim: int, *, eps: float | None = None, residual: bool = True, fast: bool = False
) -> nn.Module:
    """Build norm ``name`` over ``dim`` channels.

    ``residual=False`` is for norms with no residual branch around them (patch-embed and
    final norm): variants whose only addition is a learnable branch scale (layerscale,
    rezero) then fall back to their plain normaliser, so no parameter goes unused.
    ``fast`` selects the fused implementation where a variant has one (LN*, i-LN, LN+Rs).
    """
    _check_name(name)
    if not residual:
        name = _OUTER_VARIANT.get(name, name)
    make, eps_default = _VARIANTS[name]
    return make(dim, eps_default if eps is None else float(eps), fast)


def norm_factory(
    name: str, *, eps: float | None = None, residual: bool = True, fast: bool = False
) -> NormFactory:
    """A ``dim -> norm`` callable to pass down through a network."""
    _check_name(name)

    def make(dim: int) -> nn.Module:
        return build_norm(name, dim, eps=eps, residual=residual, fast=fast)

    return make


def affine_factory() -> NormFactory:
    """A ``dim -> Affine`` callable (the official i-LN outer norms)."""
    return Affine
