"""DRCT (Dense-residual-connected Transformer, Hsu et al., CVPRW 2024) with an injectable norm.

A SwinIR-like restorer whose groups (RDG) run five Swin blocks on densely concatenated
features: block k (k = 0..4) sees the group input and the k growth features made so far,
``width = embed_dim + k * gc`` channels; a 1x1 convolution after each block makes the next
growth feature (``gc`` channels, LeakyReLU 0.2) and after the last one maps back to
``embed_dim``; the group returns ``0.2 * x5 + x``.

The Swin blocks are ``swinir.SwinBlock`` (same norm interface, same fast path). Each is a
pre-norm residual block on its own, wider stream, so with i-LN its two branches are scaled
by the std of that block's (concatenated) input; the group's own skip has no norm in front
and is not rescaled, like the group skips of HAT and SwinIR (see docs/models.md, "DRCT").

Our module names: ``layers.{g}.residual_group.blocks.{k}`` and ``.adjust.{k}`` (so the
restorer's ``group_blocks`` finds them for the probes and analyses); the released code names
them ``layers.{g}.swin{k+1}`` and ``layers.{g}.adjust{k+1}`` (``official_key``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iln.models import common
from iln.models.common import ForwardContext
from iln.models.norms import NormFactory
from iln.models.restorer import WindowedRestorer
from iln.models.swinir import SwinBlock

DENSE_BLOCKS = 5  # Swin blocks per group, fixed by the released architecture
NARROW_MLP_FROM = 3  # blocks 3 and 4 (0-based) use mlp ratio 1, as released
GROWTH_SLOPE = 0.2  # LeakyReLU slope after the growth convolutions
GROUP_RESIDUAL_SCALE = 0.2  # the group returns 0.2 * x5 + x


def dense_widths(embed_dim: int, gc: int) -> list[int]:
    """Channels seen by the five blocks of a group: embed_dim + k * gc."""
    return [embed_dim + k * gc for k in range(DENSE_BLOCKS)]


def block_heads(width: int, num_heads: int) -> int:
    """Heads of a block of ``width`` channels, by the released rule
    ``num_heads - width % num_heads`` (6 heads: 180 -> 6, 212 -> 4, 244 -> 2, 276 -> 6,
    308 -> 4)."""
    return num_heads - width % num_heads


def check_dense_heads(embed_dim: int, gc: int, num_heads: Sequence[int]) -> None:
    """Raise unless every block's head count divides its width (the released code
    silently needs this; its full config happens to satisfy it)."""
    for heads in num_heads:
        for width in dense_widths(embed_dim, gc):
            h = block_heads(width, heads)
            if width % h:
                raise ValueError(
                    f"embed_dim {embed_dim} with gc {gc} and num_heads {heads}: a block of "
                    f"width {width} gets {h} heads (num_heads - width % num_heads), which do "
                    "not divide it; choose embed_dim / gc / num_heads whose widths "
                    "embed_dim + k * gc (k = 0..4) split evenly"
                )


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (released name and shape ``(out, in, 1, 1)``) applied to tokens
    (B, N, C_in) -> (B, N, C_out): the same map as the convolution on the image grid."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1)

    def forward(self, t: Tensor) -> Tensor:  # (B, N, C_in) -> (B, N, C_out)
        return F.linear(t, self.weight.flatten(1), self.bias)


class DenseBlocks(nn.Module):
    """The body of one RDG: five Swin blocks on densely concatenated tokens, each followed
    by a 1x1 convolution (growth features, LeakyReLU 0.2; the last maps back to
    ``dim`` with no activation)."""

    def __init__(
        self,
        dim: int,
        gc: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        drop_path: float,
        first_site: int,
        norm_layer: NormFactory,
        fast: bool,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        widths = dense_widths(dim, gc)
        self.blocks = nn.ModuleList(
            SwinBlock(
                width,
                block_heads(width, num_heads),
                window,
                0 if k % 2 == 0 else window // 2,
                mlp_ratio if k < NARROW_MLP_FROM else 1.0,
                drop_path,
                first_site + 2 * k,
                norm_layer,
                fast,
                attention,
            )
            for k, width in enumerate(widths)
        )
        self.adjust = nn.ModuleList(
            PointwiseConv(width, gc if k < DENSE_BLOCKS - 1 else dim)
            for k, width in enumerate(widths)
        )

    def forward(self, x: Tensor, ctx: ForwardContext, index: Tensor) -> Tensor:
        """x (B, N, dim) -> x5 (B, N, dim)."""
        features = [x]
        out = x
        for k, (block, adjust) in enumerate(zip(self.blocks, self.adjust)):
            stream = torch.cat(features, dim=-1) if k else x  # (B, N, dim + k * gc)
            out = adjust(common.run_block(block, stream, ctx, index))
            if k < DENSE_BLOCKS - 1:
                out = F.leaky_relu(out, GROWTH_SLOPE)
                features.append(out)
        return out


class RDG(nn.Module):
    """Residual dense group: ``0.2 * DenseBlocks(x) + x``."""

    def __init__(self, dim: int, **blocks_kwargs) -> None:
        super().__init__()
        self.residual_group = DenseBlocks(dim, **blocks_kwargs)

    def forward(self, x: Tensor, ctx: ForwardContext, index: Tensor) -> Tensor:
        return self.residual_group(x, ctx, index) * GROUP_RESIDUAL_SCALE + x


class DRCT(WindowedRestorer):
    """DRCT for classical SR (pixel-shuffle head) or, at ``scale=1``, for restoration
    (input + predicted residual, as HAT and SwinIR). Any input size (see
    ``WindowedRestorer``; the released forward does not pad).

    ``depths`` has its released meaning: its length is the number of groups and its
    entries only set the stochastic-depth schedule (every block of group g takes rate
    ``linspace(0, drop_path_rate, sum(depths))[sum(depths[:g])]``); each group always has
    five blocks.
    """

    def __init__(
        self,
        *,
        scale: int,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int,
        gc: int,
        mlp_ratio: float,
        drop_path_rate: float,
        stdnorm: bool,
        img_range: float,
        norm_layer: NormFactory,
        outer_norm_layer: NormFactory,
        fast: bool,
        in_chans: int = 3,
        attention: str = "auto",
    ) -> None:
        check_dense_heads(embed_dim, gc, num_heads)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        layers = nn.ModuleList(
            RDG(
                embed_dim,
                gc=gc,
                num_heads=heads,
                window=window_size,
                mlp_ratio=mlp_ratio,
                drop_path=rates[sum(depths[:i])],
                first_site=2 * DENSE_BLOCKS * i,
                norm_layer=norm_layer,
                fast=fast,
                attention=attention,
            )
            for i, heads in enumerate(num_heads)
        )
        super().__init__(
            scale=scale,
            embed_dim=embed_dim,
            window_size=window_size,
            stdnorm=stdnorm,
            img_range=img_range,
            outer_norm_layer=outer_norm_layer,
            layers=layers,
            fast=fast,
            in_chans=in_chans,
        )
        self.drop_sites = 2 * DENSE_BLOCKS * len(num_heads)  # two branches per Swin block
        self.register_buffer(
            "relative_position_index", common.relative_position_index(window_size), persistent=False
        )

    def forward_layers(self, t: Tensor, ctx: ForwardContext) -> Tensor:
        for layer in self.layers:
            t = layer(t, ctx, self.relative_position_index)
        return t


# ----------------------------------------------------------------------------- released names

_OURS = re.compile(r"^layers\.(\d+)\.residual_group\.(blocks|adjust)\.(\d+)\.")


def official_key(key: str) -> str:
    """Our state-dict key -> the released one (``...residual_group.blocks.{k}.`` ->
    ``...swin{k+1}.``, ``...residual_group.adjust.{k}.`` -> ``...adjust{k+1}.``)."""
    m = _OURS.match(key)
    if m is None:
        return key
    group, kind, k = m.groups()
    name = "swin" if kind == "blocks" else "adjust"
    return f"layers.{group}.{name}{int(k) + 1}.{key[m.end() :]}"


def official_buffers(model: DRCT, img_size: int) -> dict[str, Tensor]:
    """The constants the released DRCT registers as buffers, under its names: every
    block's ``attn.relative_position_index`` and, for the shifted blocks, ``attn_mask`` of
    the shifted windows on the ``img_size`` x ``img_size`` training patch (the released
    constructor argument ``img_size``, 64 in its configs)."""
    window = model.window_size
    if not isinstance(img_size, int) or img_size <= window:  # the released blocks reshape
        raise ValueError(
            f"img_size {img_size!r} must be an int larger than window_size {window}: at or "
            "below it the released blocks shrink their window and drop the shift"
        )
    if img_size % window:
        raise ValueError(f"img_size {img_size} must be a multiple of window_size {window}")
    index = model.relative_position_index.detach().clone()
    mask = common.shift_window_mask(
        img_size, img_size, window, window // 2, device=index.device, dtype=torch.float32
    )
    out: dict[str, Tensor] = {}
    for g in range(len(model.residual_groups())):
        for k, block in enumerate(model.group_blocks(g)):
            prefix = f"layers.{g}.swin{k + 1}"
            out[f"{prefix}.attn.relative_position_index"] = index.clone()
            if block.shift:
                out[f"{prefix}.attn_mask"] = mask.clone()
    return out
