"""HAT (Hybrid Attention Transformer, Chen et al. 2023) with an injectable norm.

Module names and the computation follow the released implementation, so released
weights load by name (see ``checkpoint.py``). The norm is passed in as a factory
``dim -> module`` whose forward returns ``(y, scale)``; every residual branch is merged
by ``residual_add``, x + scale * F(norm(x)): the LN blocks for unit scales, the i-LN blocks
for the per-image std.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from iln.models import common
from iln.models import fast as fast_ops
from iln.models.common import ForwardContext, residual_add
from iln.models.norms import NormFactory
from iln.models.restorer import WindowedRestorer


class ChannelAttention(nn.Module):
    """RCAN channel attention: global pool, squeeze, excite, sigmoid gate.

    ``fast``: the pool is ``fast.spatial_mean``."""

    def __init__(self, dim: int, squeeze_factor: int, fast: bool) -> None:
        super().__init__()
        self.fast = fast
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, dim // squeeze_factor, 1, padding=0),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim // squeeze_factor, dim, 1, padding=0),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        if self.fast:
            return x * self.attention[1:](fast_ops.spatial_mean(x))  # (B, C, 1, 1) gate
        return x * self.attention(x)


class CAB(nn.Module):
    """Channel attention block, the convolutional branch of a HAB."""

    def __init__(self, dim: int, compress_ratio: int, squeeze_factor: int, fast: bool) -> None:
        super().__init__()
        self.cab = nn.Sequential(
            nn.Conv2d(dim, dim // compress_ratio, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(dim // compress_ratio, dim, 3, 1, 1),
            ChannelAttention(dim, squeeze_factor, fast),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        return self.cab(x)


class HAB(nn.Module):
    """Hybrid attention block: (shifted) window attention + 0.01 * CAB, then MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shift: int,
        compress_ratio: int,
        squeeze_factor: int,
        conv_scale: float,
        mlp_ratio: float,
        drop_path: float,
        drop_site: int,
        norm_layer: NormFactory,
        fast: bool,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        self.shift = shift
        self.conv_scale = conv_scale
        self.drop_path = drop_path
        self.drop_site = drop_site  # columns drop_site, drop_site + 1 of ctx.drop_noise
        self.fast = fast
        self.norm1 = norm_layer(dim)
        self.attn = common.WindowAttention(dim, window, num_heads, fast, attention)
        self.conv_block = CAB(dim, compress_ratio, squeeze_factor, fast)
        self.norm2 = norm_layer(dim)
        self.mlp = common.Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, ctx: ForwardContext, index: Tensor) -> Tensor:
        """x (B, N, C) -> (B, N, C); ``index`` the model's relative position index (n, n)."""
        h, w = ctx.size
        b, _, c = x.shape
        u, s1 = self.norm1(x)  # (B, N, C)
        grid = u.view(b, h, w, c)  # (B, H, W, C)

        conv_x = common.tokens(self.conv_block(common.image(u, ctx.size, self.fast)))  # (B, N, C)

        attn_x = self.attn(grid, ctx, index, self.shift)  # (B, N, C)

        noise = ctx.noise(self.drop_site)
        drop = common.drop_path_factor(attn_x, self.drop_path, self.training, noise)
        x = residual_add(x, s1, attn_x, conv_x * self.conv_scale, drop_factor=drop)
        v, s2 = self.norm2(x)
        mlp_x = self.mlp(v)
        noise = ctx.noise(self.drop_site + 1)
        drop = common.drop_path_factor(mlp_x, self.drop_path, self.training, noise)
        return residual_add(x, s2, mlp_x, drop_factor=drop)


class OCAB(nn.Module):
    """Overlapping cross-attention block: queries from w x w windows, keys/values from
    overlapping ow x ow windows (zero padded at the border), then MLP. No stochastic depth."""

    def __init__(
        self,
        dim: int,
        window: int,
        overlap_ratio: float,
        num_heads: int,
        mlp_ratio: float,
        norm_layer: NormFactory,
        fast: bool,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        fast_ops.check_attention_impl(attention)
        self.window = window
        self.overlap = common.overlap_window_size(window, overlap_ratio)
        if (self.overlap - window) % 2:
            raise ValueError(
                f"overlap_ratio={overlap_ratio} with window_size={window} gives an odd border "
                f"({self.overlap - window}); choose values whose overlap is even"
            )
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fast = fast
        self.attention = attention
        self.norm1 = norm_layer(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((window + self.overlap - 1) ** 2, num_heads)
        )
        self.proj = nn.Linear(dim, dim)
        self.norm2 = norm_layer(dim)
        self.mlp = common.Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, ctx: ForwardContext, index: Tensor) -> Tensor:
        """x (B, N, C) -> (B, N, C); ``index`` the overlap index (w*w, ow*ow)."""
        h, w = ctx.size
        b, n_tok, c = x.shape
        win, ow, heads = self.window, self.overlap, self.num_heads
        d = c // heads
        u, s1 = self.norm1(x)
        qkv = self.qkv(u).view(b, h, w, 3 * c)  # (B, H, W, 3C)

        q = common.window_partition(qkv[..., :c], win)  # (B*nW, w*w, C)
        q = q.view(-1, win * win, heads, d).transpose(1, 2)  # (B*nW, h, w*w, d)

        border = (ow - win) // 2
        kv = nn.functional.pad(
            qkv[..., c:], (0, 0, border, border, border, border)
        )  # (B, H+2p, W+2p, 2C)
        if self.fast:
            k, v = fast_ops.overlapping_windows(kv, ow, win, heads)  # (B*nW, h, ow*ow, d) each
        else:
            kv = kv.unfold(1, ow, win).unfold(2, ow, win)  # (B, nWh, nWw, 2C, ow, ow)
            kv = kv.reshape(b, -1, 2, heads, d, ow * ow).permute(
                2, 0, 1, 3, 5, 4
            )  # (2, B, nW, h, ow*ow, d)
            kv = kv.reshape(2, -1, heads, ow * ow, d)  # (2, B*nW, h, ow*ow, d)
            k, v = kv[0], kv[1]

        table = self.relative_position_bias_table
        gather = fast_ops.gather_bias if self.fast else common.gather_bias
        if self.fast and self.attention == "flex":  # the kernel reads the table at the index
            out = fast_ops.flex_table_attention(q, k, v, table, index, self.scale)
        elif self.fast:
            bias = gather(table, index)  # (h, w*w, ow*ow)
            out = fast_ops.attention(q, k, v, bias, self.scale, impl=self.attention)
        else:
            out = common.attention(q, k, v, gather(table, index), self.scale)  # (B*nW, h, w*w, d)
        out = out.transpose(1, 2).reshape(-1, win * win, c)  # (B*nW, w*w, C)
        out = common.window_reverse(out, win, h, w).reshape(b, n_tok, c)  # (B, N, C)

        x = residual_add(x, s1, self.proj(out))
        v_in, s2 = self.norm2(x)
        return residual_add(x, s2, self.mlp(v_in))


class AttenBlocks(nn.Module):
    """The blocks of one group: ``depth`` HABs (every second one shifted) and one OCAB."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        compress_ratio: int,
        squeeze_factor: int,
        conv_scale: float,
        overlap_ratio: float,
        mlp_ratio: float,
        drop_path: Sequence[float],
        first_site: int,
        norm_layer: NormFactory,
        fast: bool,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            HAB(
                dim,
                num_heads,
                window,
                0 if i % 2 == 0 else window // 2,
                compress_ratio,
                squeeze_factor,
                conv_scale,
                mlp_ratio,
                drop_path[i],
                first_site + 2 * i,
                norm_layer,
                fast,
                attention,
            )
            for i in range(depth)
        )
        self.overlap_attn = OCAB(
            dim, window, overlap_ratio, num_heads, mlp_ratio, norm_layer, fast, attention
        )

    def forward(
        self, x: Tensor, ctx: ForwardContext, index_sa: Tensor, index_oca: Tensor
    ) -> Tensor:
        for block in self.blocks:
            x = common.run_block(block, x, ctx, index_sa)
        return common.run_block(self.overlap_attn, x, ctx, index_oca)


class RHAG(nn.Module):
    """Residual hybrid attention group: blocks, then conv3x3 on the image grid, plus input."""

    def __init__(self, dim: int, **blocks_kwargs) -> None:
        super().__init__()
        self.residual_group = AttenBlocks(dim, **blocks_kwargs)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.fast = blocks_kwargs["fast"]

    def forward(
        self, x: Tensor, ctx: ForwardContext, index_sa: Tensor, index_oca: Tensor
    ) -> Tensor:
        y = self.residual_group(x, ctx, index_sa, index_oca)  # (B, N, C)
        return common.tokens(self.conv(common.image(y, ctx.size, self.fast))) + x


class HAT(WindowedRestorer):
    """HAT for classical SR (pixel-shuffle head) or, at ``scale=1``, for restoration.

    ``norm_layer`` builds the norms inside residual blocks, ``outer_norm_layer`` the
    patch-embed and final norms; ``fast`` selects the fast path (``fast.py``) and
    ``attention`` its attention kernels (``fast.ATTENTION_IMPLS``). Any input size (see
    ``WindowedRestorer``).
    """

    def __init__(
        self,
        *,
        scale: int,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int,
        compress_ratio: int,
        squeeze_factor: int,
        conv_scale: float,
        overlap_ratio: float,
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
        rates = torch.linspace(
            0, drop_path_rate, sum(depths), device="cpu"
        ).tolist()  # grows with depth
        layers = nn.ModuleList(
            RHAG(
                embed_dim,
                depth=depth,
                num_heads=heads,
                window=window_size,
                compress_ratio=compress_ratio,
                squeeze_factor=squeeze_factor,
                conv_scale=conv_scale,
                overlap_ratio=overlap_ratio,
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
        self.drop_sites = 2 * sum(depths)  # attention and MLP branch of every HAB
        overlap = common.overlap_window_size(window_size, overlap_ratio)
        self.register_buffer(
            "relative_position_index_SA", common.relative_position_index(window_size)
        )
        self.register_buffer(
            "relative_position_index_OCA",
            common.relative_position_index_overlap(window_size, overlap),
        )

    def forward_layers(self, t: Tensor, ctx: ForwardContext) -> Tensor:
        for layer in self.layers:
            t = layer(t, ctx, self.relative_position_index_SA, self.relative_position_index_OCA)
        return t
