"""Pieces shared by HAT and SwinIR: residual merge, stochastic depth, MLP, shifted windows,
relative position indices, window attention (fast and naive), padding, the
pixel-shuffle head and the one weight initialisation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iln.models import norms

MASK_VALUE = -100.0  # logit added between tokens of different regions in shifted windows
RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K training set, RGB in [0, 1]
RGB_STD = (0.2842, 0.2701, 0.2920)
NUM_FEAT = 64  # channels of the reconstruction head
ATTENTION_MODES = ("fast", "naive")


@dataclass(frozen=True)
class ForwardContext:
    """What every block of one forward pass shares, built once at the top of the model.

    ``size`` is the (padded) token grid (H, W); ``shift_mask`` the (nW, n, n) additive mask
    of the shifted windows; ``orders`` maps a shift to the token permutation that does
    shift + window partition in one gather, and its inverse (both None on the naive
    path, which rebuilds what it needs); ``generator`` feeds stochastic depth.
    """

    size: tuple[int, int]
    shift_mask: Tensor | None = None
    orders: Mapping[int, tuple[Tensor, Tensor]] | None = None
    generator: torch.Generator | None = None


def window_context(
    size: tuple[int, int],
    window: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator | None,
    fast: bool,
) -> ForwardContext:
    """The shared per-forward geometry of a windowed network on an (H, W) token grid."""
    if not fast:
        return ForwardContext(size=size, generator=generator)
    shift = window // 2
    h, w = size
    positions = torch.arange(h * w, device=device).view(1, h, w, 1)
    orders = {}
    for s in (0, shift):
        grid = torch.roll(positions, shifts=(-s, -s), dims=(1, 2)) if s else positions
        order = window_partition(grid, window).reshape(-1)  # (N,) source token of each window slot
        orders[s] = (order, torch.argsort(order))
    mask = shift_window_mask(h, w, window, shift, device=device, dtype=dtype)
    return ForwardContext(size=size, shift_mask=mask, orders=orders, generator=generator)


class _PermuteTokens(torch.autograd.Function):
    """x[:, order] for a permutation ``order``; its gradient is the inverse gather
    (cheaper than the scatter-add of a general index_select)."""

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:  # x (B, N, C)
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def permute_tokens(x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
    """(B, N, C) -> (B, N, C) with token i taken from ``order[i]``."""
    return _PermuteTokens.apply(x, order, inverse)


def residual_add(
    x: Tensor,
    scale: norms.Scale,
    branch: Tensor,
    *others: Tensor,
    drop_factor: Tensor | None = None,
) -> Tensor:
    """x + scale * (drop_factor * branch + sum of others).

    ``drop_factor`` is the stochastic-depth factor of ``branch`` from ``drop_path_factor``
    (None: nothing dropped); folding it into the same multiply-add saves the separate
    passes of an explicit ``branch / keep_rate * mask``. A unit scale adds the branches one
    by one, which is exactly the operation order of the official LN blocks; any other
    scale multiplies the summed branches, as the official i-LN blocks do.
    """
    if isinstance(scale, float) and scale == norms.UNIT:
        x = x + branch if drop_factor is None else _ScaledAdd.apply(x, branch, drop_factor)
        for other in others:
            x = x + other
        return x
    if others:
        total = sum(others[1:], others[0])
        total = branch + total if drop_factor is None else torch.addcmul(total, branch, drop_factor)
        return _scaled_add(x, total, scale)
    return _scaled_add(x, branch, scale if drop_factor is None else scale * drop_factor)


def _scaled_add(x: Tensor, t: Tensor, scale: norms.Scale) -> Tensor:
    return _ScaledAdd.apply(x, t, scale) if isinstance(scale, Tensor) else x + t * scale


class _ScaledAdd(torch.autograd.Function):
    """x + t * s (s broadcast to t) with a backward that forms only the needed products.

    For a per-sample s (B, 1, ..., 1) the gradient of s is one dot product per sample,
    taken on CPU right before that sample's ``grad * s`` so that both read the same
    cache-warm slice of ``grad``, and no full-size temporary is formed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        ctx.save_for_backward(t, s)
        return torch.addcmul(x, t, s)

    @staticmethod
    def backward(ctx, grad: Tensor):
        t, s = ctx.saved_tensors
        need_t, need_s = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if need_s and _per_sample(s, t):
            grad_t, grad_s = _scale_and_dot(grad, t, s, need_t)
            return grad, grad_t, grad_s
        grad_t = grad * s if need_t else None
        grad_s = (grad * t).sum_to_size(s.shape) if need_s else None
        return grad, grad_t, grad_s


def _per_sample(s: Tensor, t: Tensor) -> bool:
    return s.ndim == t.ndim and s.shape[0] == t.shape[0] and s[0].numel() == 1


def _scale_and_dot(
    grad: Tensor, t: Tensor, s: Tensor, need_scaled: bool
) -> tuple[Tensor | None, Tensor]:
    """(grad * s or None, per-sample sums of grad * t shaped like s) for a per-sample s.

    On CPU one ``dot`` and one ``mul`` per sample, so each slice of ``grad`` is read from
    memory once; a GPU takes the batched ``vecdot``.
    """
    b = grad.shape[0]
    flat_grad, flat_t = grad.reshape(b, -1), t.reshape(b, -1).to(grad.dtype)  # (B, M)
    if grad.device.type != "cpu":
        return (grad * s if need_scaled else None), torch.linalg.vecdot(flat_grad, flat_t).view(
            s.shape
        )
    scaled = torch.empty_like(grad, memory_format=torch.contiguous_format) if need_scaled else None
    flat_scaled = scaled.view(b, -1) if need_scaled else None
    flat_s = s.reshape(b, 1).to(grad.dtype)
    sums = []
    for i in range(b):
        sums.append(torch.dot(flat_grad[i], flat_t[i]))
        if need_scaled:
            torch.mul(flat_grad[i], flat_s[i], out=flat_scaled[i])
    return scaled, torch.stack(sums).view(s.shape).to(s.dtype)


def drop_path_factor(
    x: Tensor, rate: float, training: bool, generator: torch.Generator | None
) -> Tensor | None:
    """Stochastic depth for the branch ``x`` (B, ...) as a per-sample factor (B, 1, ..., 1):
    0 with probability ``rate``, else 1 / (1 - rate). None when nothing is dropped (rate 0,
    or eval). Pass it to ``residual_add`` as ``drop_factor``."""
    if rate == 0.0 or not training:
        return None
    keep_rate = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = (
        keep_rate + torch.rand(shape, dtype=x.dtype, device=x.device, generator=generator)
    ).floor_()
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
    """Relative position bias (heads, nq, nk) from a (rows, heads) table.

    Negative indices wrap around (as Python indexing does), so the released OCAB index
    buffer is used as is.
    """
    rows = table.shape[0]
    flat = torch.where(index < 0, index + rows, index).reshape(-1)  # (nq*nk,)
    return table.t().index_select(1, flat).view(table.shape[1], *index.shape)  # (heads, nq, nk)


def gather_bias_naive(table: Tensor, index: Tensor) -> Tensor:
    """``gather_bias`` the way the released code writes it (advanced indexing, permute)."""
    return (
        table[index.view(-1)].view(*index.shape, -1).permute(2, 0, 1).contiguous()
    )  # (heads, nq, nk)


def naive_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, mask: Tensor | None = None
) -> Tensor:
    """softmax(q k^T * scale + bias [+ mask]) v, spelled out as the released code does.

    q (..., nq, d), k and v (..., nk, d); bias and mask broadcastable to (..., nq, nk).
    """
    logits = (q * scale) @ k.transpose(-2, -1) + bias  # (..., nq, nk)
    if mask is not None:
        logits = logits + mask
    return torch.softmax(logits, dim=-1) @ v


class _BiasedAttention(torch.autograd.Function):
    """The naive computation with a hand-written backward that reuses its buffers.

    Forward adds bias and mask and takes the softmax in place in the logits buffer;
    backward forms dS = P * (dP - rowsum(dO * O)) in place in the dP buffer, so each pass
    allocates one attention-sized tensor instead of three. The forward gives the numbers of
    ``naive_attention`` (up to the rounding of masked logits).
    """

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None, scale: float
    ) -> Tensor:
        probs = torch.matmul(q * scale, k.transpose(-2, -1))  # (..., nq, nk)
        # bias + mask is image-independent, so combining first saves a pass over probs;
        # it changes only masked logits (-100 + bias), whose softmax weight is ~e^-100
        probs.add_(bias if mask is None else bias + mask)
        torch.ops.aten._softmax.out(probs, -1, False, out=probs)
        out = torch.matmul(probs, v)  # (..., nq, d)
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.scale = scale
        ctx.bias_shape = bias.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, probs, out = ctx.saved_tensors
        grad_v = torch.matmul(probs.transpose(-2, -1), grad_out)  # (..., nk, d)
        grad_s = torch.matmul(grad_out, v.transpose(-2, -1))  # dP (..., nq, nk)
        row = (grad_out * out).sum(
            -1, keepdim=True
        )  # rowsum(dP * P) = rowsum(dO * O), (..., nq, 1)
        grad_s.sub_(row).mul_(probs)  # dS, in place
        grad_bias = grad_s.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[3] else None
        grad_q = torch.matmul(grad_s, k).mul_(ctx.scale)  # (..., nq, d)
        grad_k = torch.matmul(grad_s.transpose(-2, -1), q * ctx.scale)  # (..., nk, d)
        return grad_q, grad_k, grad_v, grad_bias, None, None


def fast_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, mask: Tensor | None = None
) -> Tensor:
    """Same result as ``naive_attention``, computed faster.

    Without gradients it is torch's fused ``scaled_dot_product_attention`` with bias
    (+ mask) as the additive mask (a 4-D mask lets the fused CPU kernel run); with
    gradients (the bias table is trained, which the fused kernels cannot differentiate)
    it is ``_BiasedAttention``.
    """
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or bias.requires_grad
    )
    if needs_grad:
        return _BiasedAttention.apply(q, k, v, bias, mask, scale)
    full = bias if mask is None else bias + mask
    if q.ndim == 5 and q.shape[0] == 1:  # one image: (nW, h, n, d) with an (nW, h, n, n) mask
        return F.scaled_dot_product_attention(
            q[0], k[0], v[0], attn_mask=full, scale=scale
        ).unsqueeze(0)
    while full.ndim < q.ndim:
        full = full.unsqueeze(0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=scale)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) w x w windows with a relative position
    bias table ((2w-1)^2, heads).

    ``fast`` selects torch's fused attention with the bias (+ shift mask) passed as the
    additive mask, the shift mask coming from the forward context. The naive path spells
    out q k^T * scale + bias + mask, softmax, @ v and rebuilds mask and index on every
    call, exactly as the released code computes them.
    """

    def __init__(self, dim: int, window: int, num_heads: int, fast: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        self.fast = fast
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
        if self.fast:  # one gather each way, with the context's permutations and mask
            order, inverse = ctx.orders[shift]
            windows = permute_tokens(grid.reshape(b, h * w, c), order, inverse).view(
                -1, n, c
            )  # (B*nW, n, C)
            out = self._attend(windows, index, ctx.shift_mask if shift else None)  # (B*nW, n, C)
            return permute_tokens(out.view(b, h * w, c), inverse, order)  # (B, N, C)
        mask = None
        if shift:
            grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
            mask = shift_window_mask(h, w, self.window, shift, device=grid.device, dtype=grid.dtype)
        index = relative_position_index(self.window).to(grid.device)
        windows = window_partition(grid, self.window)  # (B*nW, n, C)
        out = window_reverse(self._attend(windows, index, mask), self.window, h, w)  # (B, H, W, C)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out.reshape(b, h * w, c)

    def _attend(self, windows: Tensor, index: Tensor, mask: Tensor | None) -> Tensor:
        """windows (B*nW, n, C), index (n, n), mask (nW, n, n) or None -> (B*nW, n, C)."""
        bw, n, c = windows.shape
        heads = self.num_heads
        qkv = (
            self.qkv(windows).view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        )  # (3, B*nW, h, n, d)
        if self.fast:
            qkv = qkv.contiguous()  # one copy instead of one per matmul
        q, k, v = qkv
        gather = gather_bias if self.fast else gather_bias_naive
        bias = gather(self.relative_position_bias_table, index)  # (h, n, n)
        if mask is not None:  # one mask per window position, shared by the images
            nw = mask.shape[0]
            q, k, v = (t.view(bw // nw, nw, heads, n, -1) for t in (q, k, v))  # (B, nW, h, n, d)
            mask = mask.unsqueeze(1)  # (nW, 1, n, n)
        attend = fast_attention if self.fast else naive_attention
        out = attend(q, k, v, bias, self.scale, mask)  # (..., h, n, d)
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


class InputNorm(nn.Module):
    """Maps the [0, 1] image into the network range and back.

    Always subtracts the DIV2K RGB mean (as the official models); with ``stdnorm`` it also
    divides by the DIV2K RGB std (the official i-LN configs). Constants are
    non-persistent buffers, so they follow ``.to(device)`` but stay out of state dicts.
    """

    def __init__(self, stdnorm: bool, img_range: float) -> None:
        super().__init__()
        self.stdnorm = stdnorm
        self.img_range = img_range
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(RGB_STD).view(1, 3, 1, 1), persistent=False)

    def encode(self, x: Tensor) -> Tensor:  # (B, 3, H, W)
        x = x - self.mean.to(x.dtype)
        if self.stdnorm:
            x = x / self.std.to(x.dtype)
        return x * self.img_range

    def decode(self, x: Tensor) -> Tensor:  # (B, 3, H, W)
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


def image(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W) as a channels-last view of the same memory.

    The gradient comes back as a contiguous (B, H*W, C) tensor. The CPU convolutions
    return an NCHW input gradient, whose token view is channel-major; left as is, that
    layout would travel down the whole residual stream and make every later gradient op
    either copy or stride across memory.
    """
    return _TokensAsImage.apply(x, size[0], size[1])


class _TokensAsImage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, h: int, w: int) -> Tensor:  # x (B, N, C)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)  # (B, C, H, W)

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad (B, C, H, W)
        return grad.flatten(2).transpose(1, 2).contiguous(), None, None  # (B, N, C)


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
                    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
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
