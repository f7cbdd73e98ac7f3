"""SwinIR (Liang et al. 2021) for classical SR with an injectable norm.

Same conventions as ``hat.py``: the norm factory returns ``(y, scale)`` norms and every
residual branch is merged by ``residual_add``; module names follow the released code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from iln.models import common
from iln.models.common import ForwardContext, residual_add
from iln.models.norms import NormFactory


class SwinBlock(nn.Module):
    """Swin Transformer block: (shifted) window attention, then MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        drop_path: float,
        norm_layer: NormFactory,
        fast: bool,
    ) -> None:
        super().__init__()
        self.shift = shift
        self.drop_path = drop_path
        self.norm1 = norm_layer(dim)
        self.attn = common.WindowAttention(dim, window, num_heads, fast)
        self.norm2 = norm_layer(dim)
        self.mlp = common.Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, ctx: ForwardContext, index: Tensor) -> Tensor:
        """x (B, N, C) -> (B, N, C)."""
        h, w = ctx.size
        b, _, c = x.shape
        u, s1 = self.norm1(x)
        grid = u.view(b, h, w, c)  # (B, H, W, C)
        attn_x = self.attn(grid, ctx, index, self.shift)  # (B, N, C)

        drop = common.drop_path_factor(attn_x, self.drop_path, self.training, ctx.generator)
        x = residual_add(x, s1, attn_x, drop_factor=drop)
        v, s2 = self.norm2(x)
        mlp_x = self.mlp(v)
        drop = common.drop_path_factor(mlp_x, self.drop_path, self.training, ctx.generator)
        return residual_add(x, s2, mlp_x, drop_factor=drop)


class BasicLayer(nn.Module):
    """The Swin blocks of one group, every second one shifted by half a window."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        norm_layer: NormFactory,
        fast: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window,
                0 if i % 2 == 0 else window // 2,
                mlp_ratio,
                drop_path[i],
                norm_layer,
                fast,
            )
            for i in range(depth)
        )

    def forward(self, x: Tensor, ctx: ForwardContext, index: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, ctx, index)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer block (group): blocks, conv3x3 on the grid, plus input."""

    def __init__(self, dim: int, **layer_kwargs) -> None:
        super().__init__()
        self.residual_group = BasicLayer(dim, **layer_kwargs)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: Tensor, ctx: ForwardContext, index: Tensor) -> Tensor:
        y = self.residual_group(x, ctx, index)  # (B, N, C)
        return common.tokens(self.conv(common.image(y, ctx.size))) + x


class PatchEmbed(nn.Module):
    """Image to tokens (patch size 1) followed by the patch-embed norm."""

    def __init__(self, dim: int, norm_layer: NormFactory) -> None:
        super().__init__()
        self.norm = norm_layer(dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, N, C)
        y, _ = self.norm(common.tokens(x))
        return y


class SwinIR(nn.Module):
    """SwinIR for classical SR (pixel-shuffle head) or, at ``scale=1``, for restoration
    (input + predicted residual, as HAT). Any input size, padded to the window."""

    def __init__(
        self,
        *,
        scale: int,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int,
        mlp_ratio: float,
        drop_path_rate: float,
        stdnorm: bool,
        img_range: float,
        norm_layer: NormFactory,
        outer_norm_layer: NormFactory,
        attention: str,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.window_size = window_size
        self.embed_dim = embed_dim
        self.fast = attention == "fast"
        self.input_norm = common.InputNorm(stdnorm, img_range)
        self.register_buffer(
            "relative_position_index", common.relative_position_index(window_size), persistent=False
        )

        self.conv_first = nn.Conv2d(3, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim, outer_norm_layer)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList(
            RSTB(
                embed_dim,
                depth=depth,
                num_heads=heads,
                window=window_size,
                mlp_ratio=mlp_ratio,
                drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                norm_layer=norm_layer,
                fast=self.fast,
            )
            for i, (depth, heads) in enumerate(zip(depths, num_heads))
        )
        self.norm = outer_norm_layer(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        if scale == 1:  # restoration head: features -> residual image
            self.conv_last = nn.Conv2d(embed_dim, 3, 3, 1, 1)
        else:  # super-resolution head: features -> pixel shuffle -> image
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, common.NUM_FEAT, 3, 1, 1), nn.LeakyReLU(inplace=True)
            )
            self.upsample = common.upsample_layers(scale)
            self.conv_last = nn.Conv2d(common.NUM_FEAT, 3, 3, 1, 1)

    def forward_features(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, C, H, W) with H, W multiples of the window -> (B, C, H, W)."""
        size = (x.shape[2], x.shape[3])
        ctx = common.window_context(
            size,
            self.window_size,
            device=x.device,
            dtype=x.dtype,
            generator=generator,
            fast=self.fast,
        )
        t = self.patch_embed(x)
        for layer in self.layers:
            t = layer(t, ctx, self.relative_position_index)
        t, _ = self.norm(t)
        return common.image(t, size)

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """x (B, 3, H, W) in [0, 1] -> (B, 3, s*H, s*W) (s = 1: input + residual), not clamped."""
        h, w = x.shape[2], x.shape[3]
        x = self.input_norm.encode(common.pad_to_multiple(x, self.window_size))
        f = self.conv_first(x)
        f = self.conv_after_body(self.forward_features(f, generator)) + f
        if self.scale == 1:  # global residual in the encoded space: decode(x + r) = x + r'
            x = x + self.conv_last(f)
        else:
            x = self.conv_last(self.upsample(self.conv_before_upsample(f)))
        x = self.input_norm.decode(x)
        return x[:, :, : h * self.scale, : w * self.scale]
