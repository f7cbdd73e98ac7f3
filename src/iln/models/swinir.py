"""SwinIR (Liang et al. 2021) for classical SR and restoration with an injectable norm.

Same conventions as ``hat.py``: the norm factory returns ``(y, scale)`` norms and every
residual branch is merged by ``residual_add``; module names follow the released code.
Every task of the released SwinIR zoo fits: classical SR (window 8), colour / grey
denoising (scale 1, window 8), colour / grey JPEG artefact removal (scale 1, window 7,
``img_range`` 255); grey models take one channel (``in_chans`` 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from iln.models import common
from iln.models.common import ForwardContext, residual_add
from iln.models.norms import NormFactory
from iln.models.restorer import WindowedRestorer


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
        drop_site: int,
        norm_layer: NormFactory,
        fast: bool,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        self.shift = shift
        self.drop_path = drop_path
        self.drop_site = drop_site  # columns drop_site, drop_site + 1 of ctx.drop_noise
        self.fast = fast
        self.norm1 = norm_layer(dim)
        self.attn = common.WindowAttention(dim, window, num_heads, fast, attention)
        self.norm2 = norm_layer(dim)
        self.mlp = common.Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, ctx: ForwardContext, index: Tensor) -> Tensor:
        """x (B, N, C) -> (B, N, C)."""
        h, w = ctx.size
        b, _, c = x.shape
        u, s1 = self.norm1(x)
        grid = u.view(b, h, w, c)  # (B, H, W, C)
        attn_x = self.attn(grid, ctx, index, self.shift)  # (B, N, C)

        noise = ctx.noise(self.drop_site)
        drop = common.drop_path_factor(attn_x, self.drop_path, self.training, noise)
        x = residual_add(x, s1, attn_x, drop_factor=drop)
        v, s2 = self.norm2(x)
        mlp_x = self.mlp(v)
        noise = ctx.noise(self.drop_site + 1)
        drop = common.drop_path_factor(mlp_x, self.drop_path, self.training, noise)
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
        first_site: int,
        norm_layer: NormFactory,
        fast: bool,
        attention: str = "auto",
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
                first_site + 2 * i,
                norm_layer,
                fast,
                attention,
            )
            for i in range(depth)
        )

    def forward(self, x: Tensor, ctx: ForwardContext, index: Tensor) -> Tensor:
        for block in self.blocks:
            x = common.run_block(block, x, ctx, index)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer block (group): blocks, conv3x3 on the grid, plus input."""

    def __init__(self, dim: int, **layer_kwargs) -> None:
        super().__init__()
        self.residual_group = BasicLayer(dim, **layer_kwargs)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.fast = layer_kwargs["fast"]

    def forward(self, x: Tensor, ctx: ForwardContext, index: Tensor) -> Tensor:
        y = self.residual_group(x, ctx, index)  # (B, N, C)
        return common.tokens(self.conv(common.image(y, ctx.size, self.fast))) + x


class SwinIR(WindowedRestorer):
    """SwinIR for classical SR (pixel-shuffle head) or, at ``scale=1``, for restoration
    (input + predicted residual, as HAT); ``fast`` and ``attention`` as for ``HAT``. Any
    input size (see ``WindowedRestorer``).

    ``window_size`` may be odd (the JPEG models use 7); shifted blocks move by
    ``window_size // 2`` as the released code. ``img_size`` is the released constructor's
    training patch size: it changes nothing here (the shift masks are made for the input
    at hand) and only sets the shape of the per-block ``attn_mask`` buffers that
    ``checkpoint.to_official_state_dict`` writes for the released code.
    """

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
        fast: bool,
        in_chans: int = 3,
        img_size: int = 64,
        attention: str = "auto",
    ) -> None:
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        layers = nn.ModuleList(
            RSTB(
                embed_dim,
                depth=depth,
                num_heads=heads,
                window=window_size,
                mlp_ratio=mlp_ratio,
                drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                first_site=2 * sum(depths[:i]),
                norm_layer=norm_layer,
                fast=fast,
                attention=attention,
            )
            for i, (depth, heads) in enumerate(zip(depths, num_heads))
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
        self.drop_sites = 2 * sum(depths)  # attention and MLP branch of every Swin block
        self.img_size = img_size
        self.register_buffer(
            "relative_position_index", common.relative_position_index(window_size), persistent=False
        )

    def forward_layers(self, t: Tensor, ctx: ForwardContext) -> Tensor:
        for layer in self.layers:
            t = layer(t, ctx, self.relative_position_index)
        return t
