"""KL-divergence regulariser on residual-stream feature statistics (paper Table 8).

The paper lists "a KL-divergence regulariser on feature statistics" among the stabilisers
it tried against LN's feature growth (stable, clearly lower PSNR) without giving its form.
Ours: for every group output x of shape (B, N, C) (``model.residual_groups()``, the points the
probes measure), per image b,

    mu_b = mean over (N, C) of x,   var_b = biased variance over (N, C) of x,
    KL_b = KL(N(mu_b, var_b) || N(0, 1)) = 0.5 * (mu_b^2 + var_b - 1 - ln(var_b + 1e-8)),

averaged over images and groups, in float32. The training loss is
``L1 + kld_weight * penalty`` (``train.kld_weight`` / ``runs.R.kld_weight``, 0 = off).
The penalty is 0 exactly when every image's group outputs have mean 0 and variance 1, and
it grows linearly with the variance: an LN model whose features reach magnitude 400 pays
~200 per group, so a weight of 1e-3 makes that cost ~0.2, several times the L1 loss.

Captured through forward hooks registered from outside the model for the duration of a
``with`` block; the captured tensors live in this object, never on the modules.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from iln.models.restorer import WindowedRestorer

VAR_EPS = 1e-8  # keeps ln(var) finite for an all-constant feature map


def gaussian_kl(x: torch.Tensor) -> torch.Tensor:
    """Per-image KL(N(mu, var) || N(0, 1)) of tokens x (B, N, C); returns (B,) float32.

    mu and var are the mean and biased variance over all N*C values of each image.
    """
    if x.dim() != 3:
        raise ValueError(f"expected a residual-stream tensor (B, N, C), got {tuple(x.shape)}")
    x = x.float()
    mu = x.mean(dim=(1, 2))  # (B,)
    var = x.var(dim=(1, 2), unbiased=False)  # (B,)
    return 0.5 * (mu.square() + var - 1.0 - torch.log(var + VAR_EPS))  # (B,)


class FeatureKL(contextlib.AbstractContextManager):
    """Forward hooks on every residual group of the model while open; ``penalty()`` is the mean
    Gaussian KL of the group outputs recorded since the last ``penalty()`` call.

    Usage: ``with FeatureKL(model) as kl:`` around one training forward pass, then
    ``loss = l1 + w * kl.penalty()``; a probe pass outside the block records nothing.
    Gradients flow into the recorded outputs.
    """

    def __init__(self, model: WindowedRestorer) -> None:
        self._layers = list(model.residual_groups())
        self._values: list[torch.Tensor] = []  # each (B,)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _record(self, _module: nn.Module, _args: tuple, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"group output: expected a (B, N, C) tensor, got {type(output)}")
        self._values.append(gaussian_kl(output))

    def __enter__(self) -> FeatureKL:
        self._values = []
        self._handles = [layer.register_forward_hook(self._record) for layer in self._layers]
        return self

    def __exit__(self, *exc_info: object) -> None:
        while self._handles:
            self._handles.pop().remove()
        self._values = []

    def penalty(self) -> torch.Tensor:
        """Mean over images and groups of the KL recorded since the last call (then reset)."""
        if not self._values:
            raise RuntimeError("FeatureKL.penalty(): no group output was recorded")
        values, self._values = self._values, []
        return torch.stack([v.mean() for v in values]).mean()
