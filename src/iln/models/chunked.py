"""Exact whole-image inference at bounded memory for HAT, SwinIR and DRCT.

``chunked_forward(model, x)`` computes what ``model(x)`` computes in eval mode, with the
model's own modules and weights, in another order: the residual stream (tokens (B, N, C)
at input size) stays whole, and everything wider is made and consumed in pieces of about
``tokens`` token positions:

- every whole-image statistic is taken over the whole stream before the pieces are cut
  (i-LN / LN* mean and variance over all tokens and channels, InstanceNorm per channel,
  BatchNorm without running statistics over the batch), then each piece is normalised
  with it; per-token norms (LN, RMSNorm, LN+Rs, DyT, ...) are applied piece by piece;
- window attention runs on bands of window rows (the cyclic shift becomes a gather of
  rows and a roll of the band; the shift mask is made per band), in batches of windows;
- OCAB takes each band of query windows with the rows of its overlapping key / value
  windows (zero outside the image, as the whole-image code);
- 3x3 convolutions (HAT's channel attention block, the group convolutions, the head) run
  on horizontal strips with a halo of rows, cropped back; channel attention's global
  pooling is summed over the strips first (two passes: conv output, then its gate);
- the MLP and DRCT's 1x1 convolutions run on blocks of tokens;
- the long skip ``conv_first`` is recomputed per strip of the head instead of kept.

Every residual update is made in place, so the peak holds about three streams (the
group input, the stream and one branch accumulator; DRCT: its dense feature buffer and a
block's stream) plus the pieces. The sums happen in a different order from the
whole-image code, so outputs agree to float rounding, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iln.models import common, norms
from iln.models.drct import DENSE_BLOCKS, DRCT, GROUP_RESIDUAL_SCALE, GROWTH_SLOPE
from iln.models.hat import HAB, HAT, OCAB
from iln.models.swinir import SwinBlock, SwinIR

DEFAULT_TOKENS = 1 << 14  # token positions per piece (a 128 x 128 region)
HEAD_HALO = 6  # LR rows around a head strip: covers the 3x3 convolutions of every scale
CAB_HALO = 2  # the two 3x3 convolutions of HAT's channel attention block
CONV_HALO = 1  # one 3x3 convolution

# Norms whose output for a token depends on that token alone.
_PER_TOKEN = (
    norms.LayerNorm,  # and LayerScaleNorm
    norms.RMSNorm,
    norms.TokenRescaledLayerNorm,
    norms.IdentityNorm,  # and ReZeroNorm
    norms.DynamicTanh,
    norms.Affine,
)


@dataclass(frozen=True)
class NormPlan:
    """A norm with its whole-image statistics taken: maps a piece of tokens (B, n, C) to
    ``(y, scale)`` as the norm maps the whole stream, restricted to those tokens.

    ``stats`` (mean, std) broadcast over (B, n, C) (None: the norm is per token and is
    called on the piece); ``scale`` is the branch scale of a norm with statistics.
    """

    norm: nn.Module
    stats: tuple[Tensor, Tensor] | None = None
    scale: norms.Scale = norms.UNIT

    def __call__(self, piece: Tensor) -> tuple[Tensor, norms.Scale]:
        if self.stats is None:
            return self.norm(piece)
        mean, std = self.stats
        return (piece - mean) / std * self.norm.weight + self.norm.bias, self.scale


def plan_norm(norm: nn.Module, x: Tensor) -> NormPlan:
    """The ``NormPlan`` of ``norm`` (eval mode) for the whole stream ``x`` (B, N, C)."""
    if isinstance(norm, norms.ClampedImageLayerNorm):
        var, mean = torch.var_mean(x, dim=(1, 2), correction=0, keepdim=True)  # (B, 1, 1)
        std = torch.sqrt(var + norm.eps)
        ema = norm.std_ema.to(std.dtype)
        scale = torch.where(ema < norm.eps, std, torch.minimum(std, norms.CLAMP_FACTOR * ema))
        return NormPlan(norm, (mean, std), scale)
    if isinstance(norm, norms.ImageLayerNorm):
        var, mean = torch.var_mean(x, dim=(1, 2), correction=0, keepdim=True)  # (B, 1, 1)
        std = torch.sqrt(var + norm.eps)
        return NormPlan(norm, (mean, std), std if norm.rescale else norms.UNIT)
    if isinstance(norm, norms.InstanceNorm):
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)  # (B, 1, C)
        return NormPlan(norm, (mean, torch.sqrt(var + norm.eps)))
    if isinstance(norm, norms.BatchNorm):
        if norm.track_running_stats:  # eval: running statistics, per token
            return NormPlan(norm)
        var, mean = torch.var_mean(x, dim=(0, 1), correction=0, keepdim=True)  # (1, 1, C)
        return NormPlan(norm, (mean, torch.sqrt(var + norm.eps)))
    if isinstance(norm, _PER_TOKEN):
        return NormPlan(norm)
    raise TypeError(f"chunked inference does not know the norm {type(norm).__name__}")


# ----------------------------------------------------------------------------- helpers


def _add_scaled(dst: Tensor, scale: norms.Scale, branch: Tensor) -> None:
    """dst += scale * branch in place (dst, branch (B, n, C); scale as a norm returns it)."""
    if isinstance(scale, float) and scale == norms.UNIT:
        dst.add_(branch)
    else:
        dst.add_(scale * branch)


def _scaled(scale: norms.Scale, branch: Tensor) -> Tensor:
    """scale * branch (branch (B, n, C)), the branch itself for a unit scale."""
    if isinstance(scale, float) and scale == norms.UNIT:
        return branch
    return scale * branch


def _token_rows(scale: norms.Scale, b: int, width: int, start: int, stop: int) -> norms.Scale:
    """A per-token scale (B, rows * width, 1) cut to rows [start, stop); others unchanged."""
    if isinstance(scale, Tensor) and scale.dim() == 3 and scale.shape[1] > 1:
        return scale.view(b, -1, width, 1)[:, start:stop].reshape(b, -1, 1)
    return scale


def _spans(length: int, step: int) -> list[tuple[int, int]]:
    step = max(1, step)
    return [(i, min(i + step, length)) for i in range(0, length, step)]


def _rows_per_piece(tokens: int, width: int, unit: int = 1) -> int:
    """Rows (a multiple of ``unit``) of ``width`` tokens in one piece of ``tokens``."""
    return unit * max(1, tokens // (width * unit))


def _grid_image(grid: Tensor) -> Tensor:
    """(B, h, W, C) -> (B, C, h, W) view."""
    return grid.permute(0, 3, 1, 2)


def _normalised_rows(plan: NormPlan, grid: Tensor, start: int, stop: int) -> Tensor:
    """Rows [start, stop) of the normalised stream as an image (B, C, rows, W)."""
    b, _, w, c = grid.shape
    u, _ = plan(grid[:, start:stop].reshape(b, -1, c))
    return _grid_image(u.view(b, stop - start, w, c))


# ----------------------------------------------------------------------------- attention


def _attend(attn: common.WindowAttention, windows: Tensor, bias: Tensor, mask: Tensor | None):
    """The reference window attention of ``attn`` on windows (k, n, C) of one image with
    their masks (k, n, n) or None -> (k, n, C)."""
    k, n, c = windows.shape
    qkv = attn.qkv(windows).view(k, n, 3, attn.num_heads, c // attn.num_heads)
    out = common.qkv_attention(qkv, bias, attn.scale, None if mask is None else mask.unsqueeze(1))
    return attn.proj(out.transpose(1, 2).reshape(k, n, c))


def band_shift_mask(
    size: tuple[int, int], window: int, shift: int, rows: tuple[int, int], like: Tensor
) -> Tensor:
    """Rows [r0, r1) (shifted coordinates, multiples of the window) of
    ``common.shift_window_mask``: the (nW_band, n, n) mask of those windows."""
    h, w = size
    r = torch.arange(rows[0], rows[1], device=like.device)
    col = torch.arange(w, device=like.device)

    def label(p: Tensor, length: int) -> Tensor:  # 0, 1, 2: the three regions of an axis
        return (p >= length - window).long() + (p >= length - shift).long()

    region = (3 * label(r, h)[:, None] + label(col, w)[None, :]).to(like.dtype)
    ids = common.window_partition(region.view(1, rows[1] - rows[0], w, 1), window).squeeze(-1)
    differs = ids.unsqueeze(1) != ids.unsqueeze(2)
    out = torch.zeros(differs.shape, device=like.device, dtype=like.dtype)
    return out.masked_fill_(differs, common.MASK_VALUE)


def _window_attention(
    attn: common.WindowAttention,
    plan: NormPlan,
    x: Tensor,
    size: tuple[int, int],
    shift: int,
    index: Tensor,
    tokens: int,
    extra: Tensor | None = None,
) -> None:
    """x += scale * (W-MSA(norm(x)) [+ extra]) in place, band of window rows by band.

    Bands hold whole windows and windows only see themselves, so updating x band by band
    leaves the bands still to come untouched; the norm's statistics were taken before.
    """
    h, w = size
    b, _, c = x.shape
    win = attn.window
    n = win * win
    grid = x.view(b, h, w, c)
    bias = common.gather_bias(attn.relative_position_bias_table, index)  # (heads, n, n)
    batch = max(1, tokens // (n * attn.num_heads))  # windows per attention call
    for lo, hi in _spans(h, _rows_per_piece(tokens, w, win)):
        rows = (torch.arange(lo, hi, device=x.device) + shift) % h  # rolled row -> source row
        band = grid.index_select(1, rows)  # (B, R, W, C)
        if shift:
            band = torch.roll(band, shifts=-shift, dims=2)
        u, scale = plan(band.reshape(b, -1, c))
        windows = common.window_partition(u.view(b, hi - lo, w, c), win)  # (B*nWb, n, C)
        windows = windows.view(b, -1, n, c)
        mask = band_shift_mask(size, win, shift, (lo, hi), u) if shift else None
        out = torch.empty_like(windows)
        for i in range(b):
            for j, k in _spans(windows.shape[1], batch):
                m = None if mask is None else mask[j:k]
                out[i, j:k] = _attend(attn, windows[i, j:k], bias, m)
        branch = common.window_reverse(out.view(-1, n, c), win, hi - lo, w)  # (B, R, W, C)
        if extra is not None:
            more = extra.view(b, h, w, c).index_select(1, rows)
            branch = branch + (torch.roll(more, shifts=-shift, dims=2) if shift else more)
        delta = _scaled(scale, branch.reshape(b, -1, c)).view(b, hi - lo, w, c)
        if shift:
            delta = torch.roll(delta, shifts=shift, dims=2)
        grid.index_add_(1, rows, delta)


def _ocab_attention(block: OCAB, x: Tensor, size: tuple[int, int], index: Tensor, tokens: int):
    """x += scale * proj(OCA(norm1(x))) in place: bands of query windows, each with the
    rows of its overlapping key / value windows."""
    h, w = size
    b, _, c = x.shape
    win, ow, heads = block.window, block.overlap, block.num_heads
    d = c // heads
    border = (ow - win) // 2
    plan = plan_norm(block.norm1, x)
    grid = x.view(b, h, w, c)
    acc = torch.empty_like(x)
    acc_grid = acc.view(b, h, w, c)
    bias = common.gather_bias(block.relative_position_bias_table, index)  # (heads, w*w, ow*ow)
    batch = max(1, tokens // (heads * ow * ow))
    for lo, hi in _spans(h, _rows_per_piece(tokens, w, win)):
        top, bottom = max(0, lo - border), min(h, hi + border)
        u, scale = plan(grid[:, top:bottom].reshape(b, -1, c))
        qkv = block.qkv(u).view(b, bottom - top, w, 3 * c)
        q = common.window_partition(qkv[:, lo - top : hi - top, :, :c], win)  # (B*nWb, w*w, C)
        q = q.view(-1, win * win, heads, d).transpose(1, 2)  # (B*nWb, h, w*w, d)
        pad = (0, 0, border, border, border - (lo - top), border - (bottom - hi))
        kv = F.pad(qkv[..., c:], pad)  # (B, R + 2p, W + 2p, 2C)
        kv = kv.unfold(1, ow, win).unfold(2, ow, win)  # (B, nWh, nWw, 2C, ow, ow)
        kv = kv.reshape(b, -1, 2, heads, d, ow * ow).permute(2, 0, 1, 3, 5, 4)
        k, v = kv.reshape(2, -1, heads, ow * ow, d)  # (B*nWb, h, ow*ow, d) each
        out = torch.empty_like(q)
        for i, j in _spans(q.shape[0], batch):
            out[i:j] = common.attention(q[i:j], k[i:j], v[i:j], bias, block.scale)
        out = out.transpose(1, 2).reshape(-1, win * win, c)
        out = common.window_reverse(out, win, hi - lo, w).reshape(b, -1, c)
        branch = _scaled(_token_rows(scale, b, w, lo - top, hi - top), block.proj(out))
        acc_grid[:, lo:hi] = branch.view(b, hi - lo, w, c)
    x.add_(acc)


# ----------------------------------------------------------------------------- blocks


def _mlp(block: nn.Module, x: Tensor, tokens: int) -> None:
    """x += scale * MLP(norm2(x)) in place, block of tokens by block."""
    plan = plan_norm(block.norm2, x)
    for lo, hi in _spans(x.shape[1], tokens):
        piece = x[:, lo:hi]
        v, scale = plan(piece)
        _add_scaled(piece, scale, block.mlp(v))


def _channel_attention_branch(
    block: HAB, plan: NormPlan, x: Tensor, size: tuple[int, int], tokens: int
) -> Tensor:
    """conv_scale * CAB(norm1(x)) as tokens (B, N, C): the convolutions strip by strip
    (halo 2), summing the global pool; then the gate of that pool on every token."""
    h, w = size
    b, _, c = x.shape
    conv1, act, conv2, ca = block.conv_block.cab
    grid = x.view(b, h, w, c)
    out = torch.empty_like(x)
    out_grid = out.view(b, h, w, c)
    total = torch.zeros(b, c, device=x.device, dtype=torch.float64)
    for lo, hi in _spans(h, _rows_per_piece(tokens, w)):
        top, bottom = max(0, lo - CAB_HALO), min(h, hi + CAB_HALO)
        y = conv2(act(conv1(_normalised_rows(plan, grid, top, bottom))))
        y = y[:, :, lo - top : hi - top]  # (B, C, rows, W)
        out_grid[:, lo:hi] = y.permute(0, 2, 3, 1)
        total += y.sum(dim=(2, 3), dtype=torch.float64)
    pool = (total / (h * w)).to(x.dtype).view(b, c, 1, 1)
    gate = ca.attention[1:](pool).view(b, 1, c)  # squeeze, excite, sigmoid
    return out.mul_(gate).mul_(block.conv_scale)


def _hab(block: HAB, x: Tensor, size: tuple[int, int], index: Tensor, tokens: int) -> None:
    plan = plan_norm(block.norm1, x)
    conv = _channel_attention_branch(block, plan, x, size, tokens)
    _window_attention(block.attn, plan, x, size, block.shift, index, tokens, extra=conv)
    del conv
    _mlp(block, x, tokens)


def _swin_block(
    block: SwinBlock, x: Tensor, size: tuple[int, int], index: Tensor, tokens: int
) -> None:
    plan = plan_norm(block.norm1, x)
    _window_attention(block.attn, plan, x, size, block.shift, index, tokens)
    _mlp(block, x, tokens)


def _conv_into(conv: nn.Conv2d, y: Tensor, dst: Tensor, size: tuple[int, int], tokens: int):
    """dst += tokens(conv(image(y))) in place for a 3x3 convolution, strip by strip."""
    h, w = size
    b, _, c = y.shape
    src, dst_grid = y.view(b, h, w, c), dst.view(b, h, w, dst.shape[2])
    for lo, hi in _spans(h, _rows_per_piece(tokens, w)):
        top, bottom = max(0, lo - CONV_HALO), min(h, hi + CONV_HALO)
        out = conv(_grid_image(src[:, top:bottom]))[:, :, lo - top : hi - top]
        dst_grid[:, lo:hi] += out.permute(0, 2, 3, 1)


def _hat_layers(model: HAT, x: Tensor, size: tuple[int, int], tokens: int) -> None:
    for layer in model.layers:
        y = x.clone()
        group = layer.residual_group
        for block in group.blocks:
            _hab(block, y, size, model.relative_position_index_SA, tokens)
        _ocab_attention(group.overlap_attn, y, size, model.relative_position_index_OCA, tokens)
        _mlp(group.overlap_attn, y, tokens)
        _conv_into(layer.conv, y, x, size, tokens)


def _swinir_layers(model: SwinIR, x: Tensor, size: tuple[int, int], tokens: int) -> None:
    for layer in model.layers:
        y = x.clone()
        for block in layer.residual_group.blocks:
            _swin_block(block, y, size, model.relative_position_index, tokens)
        _conv_into(layer.conv, y, x, size, tokens)


def _drct_layers(model: DRCT, x: Tensor, size: tuple[int, int], tokens: int) -> None:
    b, n, dim = x.shape
    for layer in model.layers:
        group = layer.residual_group
        gc = group.adjust[0].out_channels
        features = torch.empty(b, n, dim + (DENSE_BLOCKS - 1) * gc, dtype=x.dtype, device=x.device)
        features[..., :dim] = x
        for k, (block, adjust) in enumerate(zip(group.blocks, group.adjust)):
            width = dim + k * gc
            stream = features[..., :width].clone()
            _swin_block(block, stream, size, model.relative_position_index, tokens)
            for lo, hi in _spans(n, tokens):
                out = adjust(stream[:, lo:hi])
                if k < DENSE_BLOCKS - 1:
                    features[:, lo:hi, width : width + gc] = F.leaky_relu(out, GROWTH_SLOPE)
                else:
                    x[:, lo:hi] += out * GROUP_RESIDUAL_SCALE
            del stream


# ----------------------------------------------------------------------------- model


def _check(model: nn.Module, tokens: int) -> None:
    if not isinstance(model, (HAT, SwinIR, DRCT)):
        raise TypeError(f"chunked inference runs HAT, SwinIR and DRCT, not {type(model).__name__}")
    if model.training:
        raise ValueError("chunked inference needs the model in eval mode (model.eval())")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")


def _embed(model: nn.Module, xp: Tensor, tokens: int) -> Tensor:
    """Tokens (B, N, C) of patch_embed(conv_first(xp)), strip by strip, normalised in place."""
    b, _, h, w = xp.shape
    t = torch.empty(b, h * w, model.embed_dim, dtype=xp.dtype, device=xp.device)
    grid = t.view(b, h, w, -1)
    for lo, hi in _spans(h, _rows_per_piece(tokens, w)):
        top, bottom = max(0, lo - CONV_HALO), min(h, hi + CONV_HALO)
        out = model.conv_first(xp[:, :, top:bottom])[:, :, lo - top : hi - top]
        grid[:, lo:hi] = out.permute(0, 2, 3, 1)
    _normalise_in_place(model.patch_embed.norm, t, tokens)
    return t


def _normalise_in_place(norm: nn.Module, t: Tensor, tokens: int) -> None:
    plan = plan_norm(norm, t)
    for lo, hi in _spans(t.shape[1], tokens):
        t[:, lo:hi] = plan(t[:, lo:hi])[0]


def _head(model: nn.Module, xp: Tensor, t: Tensor, tokens: int) -> Tensor:
    """The decoded image (B, in_chans, s*H, s*W) from the final tokens, strip by strip: the
    long skip conv_first(xp) is recomputed per strip."""
    b, _, h, w = xp.shape
    s = model.scale
    grid = t.view(b, h, w, -1)
    y = torch.empty(b, xp.shape[1], s * h, s * w, dtype=xp.dtype, device=xp.device)
    step = _rows_per_piece(tokens, w * max(1, s * s * common.NUM_FEAT // model.embed_dim))
    for lo, hi in _spans(h, step):
        top, bottom = max(0, lo - HEAD_HALO), min(h, hi + HEAD_HALO)
        img = xp[:, :, top:bottom]
        f = model.conv_after_body(_grid_image(grid[:, top:bottom])) + model.conv_first(img)
        if s == 1:
            out = img + model.conv_last(f)
        else:
            out = model.conv_last(model.upsample(model.conv_before_upsample(f)))
        out = out[:, :, (lo - top) * s : (hi - top) * s]
        y[:, :, lo * s : hi * s] = model.input_norm.decode(out)
    return y


def chunked_forward(model: nn.Module, x: Tensor, *, tokens: int = DEFAULT_TOKENS) -> Tensor:
    """``model(x)`` of an eval-mode HAT, SwinIR or DRCT at bounded memory.

    x (B, in_chans, H, W) in [0, 1] -> (B, in_chans, s*H, s*W), equal to the whole-image
    forward to float rounding (every whole-image statistic is exact). ``tokens`` is the
    number of token positions per piece of the wide layers: smaller, less memory and more
    Python overhead. Runs without autograd.
    """
    _check(model, tokens)
    h, w = x.shape[2], x.shape[3]
    with torch.no_grad():
        xp = model.input_norm.encode(common.pad_to_multiple(x, model.window_size))
        size = (xp.shape[2], xp.shape[3])
        t = _embed(model, xp, tokens)
        if isinstance(model, HAT):
            _hat_layers(model, t, size, tokens)
        elif isinstance(model, DRCT):
            _drct_layers(model, t, size, tokens)
        else:
            _swinir_layers(model, t, size, tokens)
        _normalise_in_place(model.norm, t, tokens)
        y = _head(model, xp, t, tokens)
    return y[:, :, : h * model.scale, : w * model.scale]
