"""Pieces shared by HAT and SwinIR, written as the reference: residual update, stochastic
depth, MLP, shifted windows, relative position indices, window attention, padding, the
input encoding, the pixel-shuffle head and the one weight initialisation.

Functions and modules that take ``fast`` hand the same computation to ``fast.py`` (hand-
written gradients, fused kernels) when it is True; the plain torch code here defines what
they compute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from iln.models import fast as fast_ops
from iln.models import norms

MASK_VALUE = -100.0  # logit added between tokens of different regions in shifted windows
RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K training set, RGB in [0, 1]
RGB_STD = (0.2842, 0.2701, 0.2920)
GREY_STD = RGB_STD[0]  # grey stdnorm, as the authors' HAT for in_chans 1 (mean 0)
NUM_FEAT = 64  # channels of the reconstruction head


@dataclass(frozen=True)
class ForwardContext:
    """What every block of one forward pass shares, built once at the top of the model.

    ``size`` is the (padded) token grid (H, W); ``shift_mask`` the (nW, n, n) additive mask
    of the shifted windows; ``orders`` (fast path only) maps a shift to the token
    permutation that does shift + window partition in one gather, and its inverse;
    ``drop_noise`` (B, sites) holds the uniform draws of stochastic depth, one column per
    drop site of the network (None: drawn from the global RNG); ``checkpoint`` recomputes
    every block's activations in the backward pass instead of keeping them.
    """

    size: tuple[int, int]
    shift_mask: Tensor
    orders: Mapping[int, tuple[Tensor, Tensor]] | None = None
    drop_noise: Tensor | None = None
    checkpoint: bool = False

    def noise(self, site: int) -> Tensor | None:
        """The (B,) uniform draws of drop site ``site``, or None (global RNG)."""
        return None if self.drop_noise is None else self.drop_noise[:, site]


def window_context(
    size: tuple[int, int],
    window: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    drop_noise: Tensor | None,
    checkpoint: bool,
    fast: bool,
) -> ForwardContext:
    """The shared per-forward geometry of a windowed network on an (H, W) token grid."""
    shift = window // 2
    h, w = size
    mask = shift_window_mask(h, w, window, shift, device=device, dtype=dtype)
    shared = dict(size=size, shift_mask=mask, drop_noise=drop_noise, checkpoint=checkpoint)
    if not fast:
        return ForwardContext(**shared)
    positions = torch.arange(h * w, device=device).view(1, h, w, 1)
    orders = {}
    for s in (0, shift):
        grid = torch.roll(positions, shifts=(-s, -s), dims=(1, 2)) if s else positions
        order = window_partition(grid, window).reshape(-1)  # (N,) source token of each window slot
        orders[s] = (order, torch.argsort(order))
    return ForwardContext(orders=orders, **shared)


def run_block(block: nn.Module, x: Tensor, ctx: ForwardContext, *args: Tensor) -> Tensor:
    """``block(x, ctx, *args)``; under ``ctx.checkpoint`` (and autograd) its activations are
    recomputed in the backward pass (``torch.utils.checkpoint``), with the same result and
    gradients: stochastic depth reads ``ctx.drop_noise`` (or a replayed RNG state)."""
    if ctx.checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, ctx, *args, use_reentrant=False)
    return block(x, ctx, *args)


def residual_add(
    x: Tensor,
    scale: norms.Scale,
    branch: Tensor,
    *others: Tensor,
    drop_factor: Tensor | None = None,
) -> Tensor:
    """The residual update x + scale * F, F = drop_factor * branch + sum of ``others``.

    ``scale`` is what the norm in front of the branch returned (1 for LN, the per-image
    std for i-LN); ``drop_factor`` the stochastic-depth factor of ``branch`` from
    ``drop_path_factor`` (None: nothing dropped). A unit scale adds the terms one by one,
    in the order of the released LN blocks.
    """
    if drop_factor is not None:
        branch = branch * drop_factor
    if isinstance(scale, float) and scale == norms.UNIT:
        for term in (branch, *others):
            x = x + term
        return x
    return x + scale * sum(others, branch)


def drop_path_factor(x: Tensor, rate: float, training: bool, noise: Tensor | None) -> Tensor | None:
    """Stochastic depth for the branch ``x`` (B, ...) as a per-sample factor (B, 1, ..., 1):
    0 with probability ``rate``, else 1 / (1 - rate). None when nothing is dropped (rate 0,
    or eval). ``noise`` (B,) uniform in [0, 1) decides each sample (``ForwardContext.noise``;
    None: drawn from the global RNG). Pass the factor to ``residual_add`` as ``drop_factor``."""
    if rate == 0.0 or not training:
        return None
    keep_rate = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if noise is None:
        noise = torch.rand(shape, dtype=x.dtype, device=x.device)
    mask = (keep_rate + noise.to(device=x.device, dtype=x.dtype).view(shape)).floor_()
    return mask.div_(keep_rate)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (official names ``fc1``/``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------- windows


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B*nW, window*window, C), windows in row-major order per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """(B*nW, window*window, C) -> (B, H, W, C), the inverse of ``window_partition``."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def shift_window_mask(
    h: int, w: int, window: int, shift: int, *, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Additive attention mask (nW, n, n) of shifted windows: 0 within a region, -100 across.

    After the cyclic shift, a window on the bottom/right border holds tokens from up to
    three regions per axis that were not neighbours in the image.
    """
    region = torch.zeros(h, w, device=device)  # (H, W)
    bounds = ((0, -window), (-window, -shift), (-shift, None))
    label = 0
    for h0, h1 in bounds:
        for w0, w1 in bounds:
            region[h0:h1, w0:w1] = label
            label += 1
    ids = window_partition(region.view(1, h, w, 1), window).squeeze(-1)  # (nW, n)
    differs = ids.unsqueeze(1) != ids.unsqueeze(2)  # (nW, n, n)
    return torch.zeros(differs.shape, device=device, dtype=dtype).masked_fill_(differs, MASK_VALUE)


def relative_position_index(window: int) -> Tensor:
    """(n, n) index into a ((2w-1)^2, heads) bias table for query i and key j of a window."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, n, n), each in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


def overlap_window_size(window: int, overlap_ratio: float) -> int:
    """Side of the overlapping key/value windows of OCAB."""
    return int(window * overlap_ratio) + window


def relative_position_index_overlap(window: int, overlap: int) -> Tensor:
    """(w*w, ow*ow) index into the ((w+ow-1)^2, heads) bias table of OCAB.

    Reproduces the released mapping exactly: the offset added to the relative
    coordinates makes some entries negative, which wrap around when the table is indexed.
    Distinct (query, key) offsets still land on distinct table rows.
    """
    grid_q = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ).flatten(1)
    grid_k = torch.stack(
        torch.meshgrid(torch.arange(overlap), torch.arange(overlap), indexing="ij")
    ).flatten(1)
    rel = grid_k[:, None, :] - grid_q[:, :, None] + (window - overlap + 1)  # (2, w*w, ow*ow)
    return rel[0] * (window + overlap - 1) + rel[1]


def gather_bias(table: Tensor, index: Tensor) -> Tensor:
    """Relative position bias (heads, nq, nk) from a (rows, heads) table and an (nq, nk)
    index; negative indices wrap around (the released OCAB index buffer has some)."""
    return table[index.view(-1)].view(*index.shape, -1).permute(2, 0, 1)  # (heads, nq, nk)


def attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, mask: Tensor | None = None
) -> Tensor:
    """softmax(q k^T * scale + bias [+ mask]) v, as the released code computes it.

    q (..., nq, d), k and v (..., nk, d); bias and mask broadcastable to (..., nq, nk).
    """
    logits = (q * scale) @ k.transpose(-2, -1) + bias  # (..., nq, nk)
    if mask is not None:
        logits = logits + mask
    return torch.softmax(logits, dim=-1) @ v


def qkv_attention(qkv: Tensor, bias: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
    """``attention`` of the windows' qkv projection (B*nW, n, 3, h, d) -> (B*nW, h, n, d);
    ``mask`` (nW, 1, n, n) is shared by the B images (``fast.packed_attention`` on the fast
    path)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B*nW, h, n, d) each
    if mask is not None:  # (B, nW, h, n, d): one mask per window position
        q, k, v = (t.reshape(-1, mask.shape[0], *t.shape[1:]) for t in (q, k, v))
    return attention(q, k, v, bias, scale, mask).flatten(0, -4)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) w x w windows with a relative position
    bias table ((2w-1)^2, heads).

    Reference: cyclic shift, window partition, softmax(q k^T * scale + bias + mask) v,
    window reverse, shift back. ``fast``: shift + partition as one token gather with the
    context's permutations (two copies instead of four), ``fast.gather_bias`` and
    ``fast.packed_attention`` on the qkv projection as it is, computed by ``attention`` (one
    of ``fast.ATTENTION_IMPLS``).
    """

    def __init__(
        self, dim: int, window: int, num_heads: int, fast: bool, attention: str = "auto"
    ) -> None:
        super().__init__()
        fast_ops.check_attention_impl(attention)
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        self.fast = fast
        self.attention = attention
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, grid: Tensor, ctx: ForwardContext, index: Tensor, shift: int) -> Tensor:
        """grid (B, H, W, C) normalised tokens -> attention output (B, H*W, C).

        ``index`` is the model's (n, n) relative position index; ``shift`` 0 or w/2.
        """
        b, h, w, c = grid.shape
        n = self.window * self.window
        mask = ctx.shift_mask if shift else None
        if self.fast:  # shift + partition (and back) as one token gather each way
            order, inverse = ctx.orders[shift]
            windows = grid.reshape(b, h * w, c).index_select(1, order).view(-1, n, c)
            out = self._attend(windows, index, mask)  # (B*nW, n, C)
            return out.view(b, h * w, c).index_select(1, inverse)  # (B, N, C)
        if shift:
            grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(grid, self.window)  # (B*nW, n, C)
        out = window_reverse(self._attend(windows, index, mask), self.window, h, w)  # (B, H, W, C)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out.reshape(b, h * w, c)

    def _attend(self, windows: Tensor, index: Tensor, mask: Tensor | None) -> Tensor:
        """windows (B*nW, n, C), index (n, n), mask (nW, n, n) or None -> (B*nW, n, C)."""
        bw, n, c = windows.shape
        heads = self.num_heads
        qkv = self.qkv(windows).view(bw, n, 3, heads, c // heads)  # (B*nW, n, 3, h, d)
        if mask is not None:
            mask = mask.unsqueeze(1)  # (nW, 1, n, n): one per window position, for all images
        table = self.relative_position_bias_table
        if self.fast and self.attention == "flex":  # the kernel reads the table at the index
            out = fast_ops.packed_flex_attention(qkv, table, index, self.scale, mask)
            return self.proj(out.reshape(bw, heads, n, -1).transpose(1, 2).reshape(bw, n, c))
        gather = fast_ops.gather_bias if self.fast else gather_bias
        bias = gather(table, index)  # (h, n, n)
        if self.fast:
            out = fast_ops.packed_attention(qkv, bias, self.scale, mask, self.attention)
        else:
            out = qkv_attention(qkv, bias, self.scale, mask)  # (B*nW, h, n, d)
        return self.proj(out.reshape(bw, heads, n, -1).transpose(1, 2).reshape(bw, n, c))


# ----------------------------------------------------------------------------- image level


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad (B, C, H, W) at the bottom/right to multiples of ``multiple``.

    Reflect padding as in the official evaluation; a pad wider than the image is
    reflected repeatedly, and a side of one pixel is replicated (reflection needs two).
    """
    pad_h, pad_w = (-x.shape[2]) % multiple, (-x.shape[3]) % multiple
    while pad_h or pad_w:
        step_h = min(pad_h, x.shape[2] - 1)
        step_w = min(pad_w, x.shape[3] - 1)
        if (pad_h and step_h == 0) or (pad_w and step_w == 0):
            x = F.pad(
                x,
                (0, pad_w if step_w == 0 else 0, 0, pad_h if step_h == 0 else 0),
                mode="replicate",
            )
            pad_h, pad_w = (pad_h if step_h else 0), (pad_w if step_w else 0)
            continue
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return x


def pad_like_swinir_test(x: Tensor, window: int) -> Tensor:
    """The padding of the released SwinIR test script (``main_test_swinir.py``): the image
    followed by its mirror image (edge row / column repeated) along H, then W, cut at
    ``(H // window + 1) * window`` and ``(W // window + 1) * window``, so at least one row
    and column are always added, even to a multiple of the window.

    Our models pad by reflection (edge not repeated) to the next multiple inside forward;
    outputs differ near the bottom and right borders (and, for per-image statistics such
    as i-LN's, slightly everywhere). A pad longer than the image stops at twice its size,
    as in the script; the model's own padding then completes it.
    """
    h, w = x.shape[2], x.shape[3]
    x = torch.cat([x, torch.flip(x, [2])], 2)[:, :, : (h // window + 1) * window]
    return torch.cat([x, torch.flip(x, [3])], 3)[:, :, :, : (w // window + 1) * window]


class InputNorm(nn.Module):
    """Maps the [0, 1] image into the network range and back.

    RGB (``in_chans`` 3): always subtracts the DIV2K RGB mean (as the official models); with
    ``stdnorm`` it also divides by the DIV2K RGB std (the official i-LN configs). Grey
    (``in_chans`` 1): mean 0 as the official grey SwinIR / HAT models; with ``stdnorm`` it
    divides by ``GREY_STD`` = 0.2842 (the red channel's std), as the authors' i-LN HAT does
    for one channel (``hat_arch.py``, the ``in_chans != 3`` branch of ``__init__``). The
    result is multiplied by ``img_range`` (1 or 255 in the official configs). Constants are
    non-persistent buffers, so they follow ``.to(device)`` but stay out of state dicts.
    """

    def __init__(self, stdnorm: bool, img_range: float, in_chans: int = 3) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (grey) or 3 (RGB), got {in_chans!r}")
        self.stdnorm = stdnorm
        self.img_range = img_range
        mean, std = (RGB_MEAN, RGB_STD) if in_chans == 3 else ((0.0,), (GREY_STD,))
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, in_chans, 1, 1), persistent=False)

    def encode(self, x: Tensor) -> Tensor:  # (B, in_chans, H, W)
        x = x - self.mean.to(x.dtype)
        if self.stdnorm:
            x = x / self.std.to(x.dtype)
        return x * self.img_range

    def decode(self, x: Tensor) -> Tensor:  # (B, in_chans, H, W)
        x = x / self.img_range
        if self.stdnorm:
            x = x * self.std.to(x.dtype)
        return x + self.mean.to(x.dtype)


def upsample_layers(scale: int, num_feat: int = NUM_FEAT) -> nn.Sequential:
    """conv + PixelShuffle stages: two x2 stages for x4, one x2 or x3 stage otherwise
    (official module indices ``upsample.0``, ``upsample.2``)."""
    layers: list[nn.Module] = []
    if scale in (2, 4):
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
    elif scale == 3:
        layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
    else:
        raise ValueError(f"scale {scale} is not supported; valid scales: 2, 3, 4")
    return nn.Sequential(*layers)


def tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> contiguous (B, H*W, C) (free for a channels-last input)."""
    return x.flatten(2).transpose(1, 2).contiguous()


def image(x: Tensor, size: tuple[int, int], fast: bool = False) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W) as a channels-last view of the same memory.

    ``fast``: the gradient comes back as contiguous tokens (``fast.image``).
    """
    if fast:
        return fast_ops.image(x, size)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)


# ----------------------------------------------------------------------------- init

BIAS_TABLE_STD = 0.02
LINEAR_STD = 0.02


def init_weights(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """The single initialisation of every network here.

    Linear: trunc-normal std 0.02 (cut at +-2), bias 0. Relative position bias tables:
    trunc-normal std 0.02. Conv: PyTorch's default (Kaiming-uniform, a = sqrt(5), bias
    uniform in +-1/sqrt(fan_in)). Norms: weight 1, bias 0, LayerScale 1e-4, ReZero 0, DyT
    alpha 0.5, BN running statistics reset. ``generator`` makes the draw explicit; with
    None the global generator is used.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(
                    module.weight, std=LINEAR_STD, a=-2.0, b=2.0, generator=generator
                )
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    fan_in = module.weight[0].numel()  # in_channels / groups * kernel area
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    module.bias.uniform_(-bound, bound, generator=generator)
            if isinstance(module, norms._Affine):
                module.weight.fill_(1.0)
                module.bias.zero_()
            if isinstance(module, norms.LayerScaleNorm):
                module.branch_scale.fill_(norms.LAYERSCALE_INIT)
            elif isinstance(module, norms.ReZeroNorm):
                module.alpha.fill_(norms.REZERO_INIT)
            elif isinstance(module, norms.DynamicTanh):
                module.alpha.fill_(norms.DYT_ALPHA_INIT)
            elif isinstance(module, norms.BatchNorm) and module.track_running_stats:
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()
            table = getattr(module, "relative_position_bias_table", None)
            if isinstance(table, nn.Parameter):
                nn.init.trunc_normal_(table, std=BIAS_TABLE_STD, a=-2.0, b=2.0, generator=generator)
