"""The fast path: the same maps as the reference code in ``norms.py``, ``common.py`` and
``hat.py``, computed with hand-written gradients and fused (some undocumented) kernels.

Selected by ``build_model(..., fast=True)`` (the default, which training uses); with
``fast=False`` a model runs the plain reference code only. Each piece below states what
it replaces and why it is faster; ``tests/test_fast.py`` binds every piece to its
reference in values and gradients (float64 gradcheck on small shapes). This is the only
module of the package that calls private torch functions.

How much longer a ``hat_1`` i-LN training step takes with one piece swapped for its
reference computation (CPU, one thread, batch 4, LR patch 32, x2; median of 5 interleaved
rounds of per-round ratios to the whole fast path; ``python -m benchmarks.fast_pieces``):
``attention`` / ``packed_attention`` 39%, ``gather_bias`` 6%, ``standardize_affine`` 5%,
``overlapping_windows`` 3%, ``spatial_mean`` 1.5%, ``image`` 0.4%; the whole reference path
takes 1.30x the fast path's time. Pieces that did not earn their place were dropped: a fast
residual update (0.3% in 9 rounds), a hand-written backward of the window permutation, a
private foreach EMA update.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# ----------------------------------------------------------------------------- attention


def gather_bias(table: Tensor, index: Tensor) -> Tensor:
    """``common.gather_bias`` as one ``index_select`` on the transposed table, whose
    gradient is a single index_add instead of the scatter of advanced indexing + permute.
    Negative indices wrap around as Python indexing does."""
    rows = table.shape[0]
    flat = torch.where(index < 0, index + rows, index).reshape(-1)  # (nq*nk,)
    return table.t().index_select(1, flat).view(table.shape[1], *index.shape)  # (heads, nq, nk)


# On CPU, attention over large windows (``WINDOWED_MIN_LOGITS`` below) never forms an
# attention-sized tensor. Forward is torch's fused (flash) CPU kernel with bias (+ mask)
# as its additive mask. Backward recomputes the
# probabilities P one window (all heads) at a time into two reused buffers that stay in
# cache and forms dS = P * (dP - rowsum(dO * O)) there, summing it over windows for the
# bias gradient. A batched backward writes and re-reads attention-sized tensors (25 MB per
# hat_1 block at batch 4, 56 MB for OCAB), and allocating those afresh every step costs
# as much as the arithmetic.


def _windows(t: Tensor) -> Tensor:
    """(..., h, n, d) -> (G, h, n, d) with a unit last stride: the fused kernel reads any
    other layout wrongly, without an error."""
    t = t.reshape(-1, *t.shape[-3:])
    return t if t.stride(-1) == 1 else t.contiguous()


def _full_bias(bias: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """bias (h, nq, nk) [+ mask (nW, 1, nq, nk)] -> (1 or nW, h, nq, nk); window g of the
    batch takes row g % nW (windows are numbered image by image)."""
    return (bias.unsqueeze(0) if mask is None else bias + mask).to(dtype)


def _fused_forward(q: Tensor, k: Tensor, v: Tensor, full: Tensor, scale: float) -> Tensor:
    """q (G, h, nq, d), k and v (G, h, nk, d) -> (G, h, nq, d), one kernel call per image
    when the bias has one row per window position (it cannot broadcast over B * nW)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    nw = full.shape[0]
    if nw == 1:
        return flash(q, k, v, attn_mask=full, scale=scale)[0]
    parts = (slice(i, i + nw) for i in range(0, q.shape[0], nw))
    return torch.cat([flash(q[i], k[i], v[i], attn_mask=full, scale=scale)[0] for i in parts])


def _windowed_backward(
    saved: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    grad_out: Tensor,
    scale: float,
    grads: tuple[Tensor, Tensor, Tensor],
    need_bias: bool,
) -> Tensor | None:
    """Writes the q, k, v gradients (G, h, n, d) into ``grads``; returns the bias gradient.

    ``saved`` is (q, k, v, full bias, output) of the forward, all (G, h, ...)."""
    q, k, v, full, out = saved
    grad_q, grad_k, grad_v = grads
    h, nq, nk = full.shape[1:]
    rows = torch.linalg.vecdot(grad_out, out).unsqueeze(-1)  # rowsum(dP * P) = rowsum(dO * O)
    grad_bias = torch.zeros(h, nq, nk, dtype=q.dtype) if need_bias else None
    probs = torch.empty(h, nq, nk, dtype=q.dtype)  # the two buffers every window reuses
    dlogits = torch.empty_like(probs)
    for g in range(q.shape[0]):
        torch.baddbmm(full[g % len(full)], q[g], k[g].transpose(1, 2), alpha=scale, out=probs)
        # softmax again rather than exp(logits - lse): its kernel is a third faster than
        # exp_ and, unlike exp_, not slowed down by the masked logits' subnormal weights
        torch.ops.aten._softmax.out(probs, -1, False, out=probs)  # P (h, nq, nk)
        torch.bmm(probs.transpose(1, 2), grad_out[g], out=grad_v[g])
        torch.bmm(grad_out[g], v[g].transpose(1, 2), out=dlogits)  # dP
        dlogits.sub_(rows[g]).mul_(probs)  # dS
        if grad_bias is not None:
            grad_bias.add_(dlogits)
        # dS k * scale and dS^T q * scale (beta=0: the first argument is not read)
        torch.baddbmm(grad_q[g], dlogits, k[g], beta=0.0, alpha=scale, out=grad_q[g])
        torch.baddbmm(
            grad_k[g], dlogits.transpose(1, 2), q[g], beta=0.0, alpha=scale, out=grad_k[g]
        )
    return grad_bias


class _WindowAttentionCPU(torch.autograd.Function):
    """``common.attention`` on CPU: q (..., h, nq, d), k and v (..., h, nk, d), bias
    (h, nq, nk); with a mask (nW, 1, nq, nk), q is (B, nW, h, nq, d)."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None, scale: float
    ) -> Tensor:
        if mask is not None and q.ndim != 5:
            raise ValueError(f"a shift mask needs q as (B, nW, h, nq, d), got {tuple(q.shape)}")
        q3, k3, v3 = _windows(q), _windows(k), _windows(v)
        full = _full_bias(bias, mask, q.dtype)
        out = _fused_forward(q3, k3, v3, full, scale)
        ctx.save_for_backward(q3, k3, v3, full, out)
        ctx.scale = scale
        ctx.shapes = q.shape, k.shape, v.shape
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = ctx.saved_tensors
        grads = tuple(torch.empty(t.shape, dtype=t.dtype) for t in saved[:3])
        grad_bias = _windowed_backward(
            saved, grad_out.reshape(saved[4].shape), ctx.scale, grads, ctx.needs_input_grad[3]
        )
        grad_q, grad_k, grad_v = (g.view(shape) for g, shape in zip(grads, ctx.shapes))
        return grad_q, grad_k, grad_v, grad_bias, None, None


class _PackedWindowAttentionCPU(torch.autograd.Function):
    """The same from the qkv projection (G, n, 3, h, d) as it is, with its gradient
    written in that layout: no copy splits q, k, v or joins their gradients."""

    @staticmethod
    def forward(ctx, qkv: Tensor, bias: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (G, h, n, d), strided
        full = _full_bias(bias, mask, qkv.dtype)
        out = _fused_forward(q, k, v, full, scale)  # (G, h, n, d)
        ctx.save_for_backward(qkv, full, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qkv, full, out = ctx.saved_tensors
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype)
        grads = tuple(t.transpose(1, 2) for t in grad_qkv.unbind(2))
        grad_bias = _windowed_backward(
            (q, k, v, full, out), grad_out, ctx.scale, grads, ctx.needs_input_grad[1]
        )
        return grad_qkv, grad_bias, None, None


class _MaterializedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias + mask) v for small windows on the CPU (and for impl
    "materialized"), with a hand-written backward that reuses its buffers.

    Forward adds bias and mask and takes the softmax in place in the logits buffer;
    backward forms dS = P * (dP - rowsum(dO * O)) in place in the dP buffer, so each pass
    allocates one attention-sized tensor instead of three. The forward gives the numbers of
    ``common.attention`` up to the rounding of masked logits.
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
        row = (grad_out * out).sum(-1, keepdim=True)  # rowsum(dP * P) = rowsum(dO * O)
        grad_s.sub_(row).mul_(probs)  # dS, in place
        grad_bias = grad_s.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[3] else None
        grad_q = torch.matmul(grad_s, k).mul_(ctx.scale)  # (..., nq, d)
        grad_k = torch.matmul(grad_s.transpose(-2, -1), q * ctx.scale)  # (..., nk, d)
        return grad_q, grad_k, grad_v, grad_bias, None, None


# Logits per head and window (nq * nk) from which the CPU path recomputes probabilities
# window by window; below it (hat_tiny's 8 x 8 windows: 4,096) the per-window loop costs
# more in calls than it saves, and the whole batch of logits is small enough to allocate.
WINDOWED_MIN_LOGITS = 128 * 128


def _windowed(t: Tensor, logits: int) -> bool:
    return t.device.type == "cpu" and logits >= WINDOWED_MIN_LOGITS


# How ``attention`` / ``packed_attention`` compute off the reference path (``build_model(...,
# attention=...)``). "auto": on the CPU the kernels above (unchanged), elsewhere "sdpa".
# "sdpa": torch's ``scaled_dot_product_attention`` with bias (+ shift mask) as an additive
# float mask, with and without gradients (CUDA's memory-efficient kernel takes it and
# returns its gradient, so no attention-sized tensor is kept for backward). "flex":
# ``torch.nn.attention.flex_attention`` adding the bias in a score_mod; fused only under
# ``torch.compile`` (eager it materialises the scores; no backward on the CPU).
# "materialized": ``_MaterializedAttention`` on every device (the former off-CPU path).
ATTENTION_IMPLS = ("auto", "sdpa", "flex", "materialized")

# Head dims are zero-padded to these multiples before a fused kernel: CUDA's memory-efficient
# kernel takes only multiples of 8 (fp16 / bf16; 4 for fp32), flex_attention's of 16. Zero
# columns in q and k leave every logit as it is; those of v give output columns cut off.
SDPA_HEAD_MULTIPLE = 8
FLEX_HEAD_MULTIPLE = 16


def check_attention_impl(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"unknown attention implementation {impl!r}; valid: {', '.join(ATTENTION_IMPLS)}"
        )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    scale: float,
    mask: Tensor | None = None,
    impl: str = "auto",
) -> Tensor:
    """``common.attention``, computed faster; ``impl`` one of ``ATTENTION_IMPLS``.

    q (..., h, nq, d), k and v (..., h, nk, d), bias (h, nq, nk); with a shift ``mask``
    (nW, 1, nq, nk), q is (B, nW, h, nq, d).
    """
    check_attention_impl(impl)
    if impl == "auto" and q.device.type == "cpu":
        return _cpu_attention(q, k, v, bias, scale, mask)
    if impl == "materialized":
        with route("materialized"):
            return _MaterializedAttention.apply(q, k, v, bias, mask, scale)
    if impl == "flex":
        return _flex_attention(q, k, v, bias, scale, mask)
    return _sdpa_attention(q, k, v, bias, scale, mask)


ROUTE_PREFIX = "iln::attention."


def route(name: str) -> contextlib.AbstractContextManager:
    """Names the attention route taken in a profile (``iln::attention.<name>``, a
    ``record_function`` range), so a benchmark can say what ran; nothing under
    ``torch.compile`` (the compiled graph's own ops show what ran there)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(ROUTE_PREFIX + name)


def _cpu_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, mask: Tensor | None
) -> Tensor:
    """The CPU route of "auto": for windows of at least ``WINDOWED_MIN_LOGITS`` logits,
    ``_WindowAttentionCPU`` (fused forward, windowed backward). Otherwise, with gradients,
    ``_MaterializedAttention`` (the CPU's fused kernel cannot differentiate the bias); without,
    torch's ``scaled_dot_product_attention`` with bias (+ mask) as the additive mask."""
    if _windowed(q, q.shape[-2] * k.shape[-2]):
        with route("windowed_cpu"):
            return _WindowAttentionCPU.apply(q, k, v, bias, mask, scale)
    if _needs_grad(q, k, v, bias):
        with route("materialized"):
            return _MaterializedAttention.apply(q, k, v, bias, mask, scale)
    # torch's fused kernels take 4-D (G, h, n, d); a 5-D call would fall back to plain math
    with route("sdpa"):
        return _cpu_sdpa(q, k, v, bias, scale, mask)


def _cpu_sdpa(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, mask: Tensor | None
) -> Tensor:
    if mask is None:
        q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias.unsqueeze(0), scale=scale)
        return out.view(*q.shape[:-1], v.shape[-1])
    full = bias + mask  # (nW, h, nq, nk): one call per image (q is (B, nW, h, nq, d))
    return torch.stack(
        [
            F.scaled_dot_product_attention(q[i], k[i], v[i], attn_mask=full, scale=scale)
            for i in range(len(q))
        ]
    )


def _as_heads(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """4-D operands for one fused call over the whole batch: (G, h, n, d) and bias (h, nq, nk)
    without a mask; with one, each window position's heads become heads of their own,
    q (B, nW*h, nq, d) against bias + mask (nW*h, nq, nk), shared by the B images."""
    if mask is None:
        return (*(t.reshape(-1, *t.shape[-3:]) for t in (q, k, v)), bias)
    q4, k4, v4 = (t.reshape(t.shape[0], -1, *t.shape[-2:]) for t in (q, k, v))
    return q4, k4, v4, (bias + mask).flatten(0, 1)  # (nW*h, nq, nk)


def _pad_head_dim(t: Tensor, multiple: int) -> Tensor:
    pad = -t.shape[-1] % multiple
    return F.pad(t, (0, pad)) if pad else t


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, mask: Tensor | None
) -> Tensor:
    q4, k4, v4, table = _as_heads(q, k, v, bias, mask)
    q4, k4, v4 = (_pad_head_dim(t, SDPA_HEAD_MULTIPLE) for t in (q4, k4, v4))
    with route("sdpa"):
        out = sdpa(q4, k4, v4, table.unsqueeze(0).to(q.dtype), scale)
    return out[..., : v.shape[-1]].reshape(*q.shape[:-1], v.shape[-1])


class AttentionKernelError(RuntimeError):
    """No fused attention kernel takes a call that must not fall back to the math kernel."""


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """``scaled_dot_product_attention`` of 4-D (G, h, n, d) operands and a float mask, as
    the fast path calls it. On CUDA with gradients (training) only the fused backends that
    take the call may run (``training_sdpa_backends``), so a shape or dtype none of them
    takes raises ``AttentionKernelError`` instead of falling back to the math kernel, which
    keeps the (G, h, nq, nk) probabilities for backward; without gradients (inference) the
    fallback is allowed and warned about once per shape and dtype. Elsewhere (CPU, meta,
    under ``torch.compile``) torch dispatches as it likes."""
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if _needs_grad(q, k, v, mask):
        backends = training_sdpa_backends(q.device.type, mask.requires_grad)
        return fused_sdpa(q, k, v, mask, scale, backends)
    if not any(qualifies(b, q, k, v, mask) for b in FUSED_CUDA):
        warnings.warn(
            f"attention: no fused kernel takes q {tuple(q.shape)} {q.dtype} with a "
            f"{tuple(mask.shape)} mask; inference falls back to the math kernel",
            RuntimeWarning,
            stacklevel=2,
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


FUSED_CUDA = (
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
)


def training_sdpa_backends(device_type: str, mask_needs_grad: bool) -> tuple[SDPBackend, ...]:
    """The fused backends a training call may run on: on CUDA, with a mask (the relative
    position bias) whose gradient is needed, the memory-efficient kernel only (flash takes
    no float mask, cuDNN returns no mask gradient); otherwise any of ``FUSED_CUDA`` (torch
    picks in its own order). The CPU's one fused kernel is flash (it takes no mask that
    needs a gradient)."""
    if device_type == "cpu":
        return (SDPBackend.FLASH_ATTENTION,)
    return (SDPBackend.EFFICIENT_ATTENTION,) if mask_needs_grad else FUSED_CUDA


def qualifies(backend: SDPBackend, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> bool:
    """Whether torch's own checks let CUDA ``backend`` take this call (False off CUDA)."""
    from torch.backends import cuda

    check = {  # getattr: torch versions without one of the checks
        SDPBackend.CUDNN_ATTENTION: getattr(cuda, "can_use_cudnn_attention", None),
        SDPBackend.FLASH_ATTENTION: getattr(cuda, "can_use_flash_attention", None),
        SDPBackend.EFFICIENT_ATTENTION: getattr(cuda, "can_use_efficient_attention", None),
    }.get(backend)
    if check is None or q.device.type != "cuda":
        return False
    return bool(check(cuda.SDPAParams(q, k, v, mask, 0.0, False, False), False))


def fused_sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, backends: tuple[SDPBackend, ...]
) -> Tensor:
    """``scaled_dot_product_attention`` inside ``sdpa_kernel(backends)``; where none of
    ``backends`` takes the call, one ``AttentionKernelError`` line naming the shapes, dtype
    and torch's first reason (torch's own error would say only "No available kernel")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(list(backends)):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        except RuntimeError as err:
            if "No available kernel" not in str(err) and "No viable backend" not in str(err):
                raise
            reasons = [_reason(str(w.message)) for w in caught]
    names = ", ".join(b.name.lower() for b in backends)
    grad = " that needs its gradient" if mask.requires_grad else ""
    why = "; ".join(r for r in reasons if r)
    why = f" (torch: {why[:240]})" if why else ""
    raise AttentionKernelError(
        f"attention: no fused kernel ({names}) takes q {tuple(q.shape)}, k {tuple(k.shape)} "
        f"{q.dtype} with a {tuple(mask.shape)} {mask.dtype} mask{grad}; the math kernel "
        f"would materialise the attention{why}"
    )


def _reason(message: str) -> str:
    """A torch warning as one line, without its "(Triggered internally at ...)" tail."""
    return " ".join(message.split("(Triggered internally")[0].split()).rstrip(" .:")


def _flex_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, mask: Tensor | None
) -> Tensor:
    """flex_attention adding a given (h, nq, nk) bias (+ mask) in its score_mod."""
    q4, k4, v4, table = _as_heads(q, k, v, bias, mask)
    q4, k4, v4 = (_pad_head_dim(t, FLEX_HEAD_MULTIPLE) for t in (q4, k4, v4))

    def add_bias(score: Tensor, b: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + table[head, q_idx, kv_idx]

    out = _run_flex(q4, k4, v4, add_bias, scale, compile_flex=None)
    return out[..., : v.shape[-1]].reshape(*q.shape[:-1], v.shape[-1])


def flex_table_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    index: Tensor,
    scale: float,
    mask: Tensor | None = None,
    compile_flex: bool | None = None,
) -> Tensor:
    """``attention`` with the bias read from the relative position ``table`` (rows, h) at
    ``index`` (nq, nk) inside flex_attention's score_mod: no (h, nq, nk) bias is formed,
    and the table's gradient is accumulated by the kernel. Shapes as ``attention``.

    ``compile_flex``: run ``torch.compile(flex_attention)`` (compiled once per process,
    the fused kernel); None = compiled off the CPU, eager on it (where flex has no
    backward and the compiled kernel costs a C++ build)."""
    heads, rows = table.shape[1], table.shape[0]
    idx = torch.where(index < 0, index + rows, index)  # negative entries wrap, as indexing
    weights = table.to(q.dtype)
    if mask is None:
        q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))

        def add_bias(score: Tensor, b: Tensor, head: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return score + weights[idx[qi, ki], head]
    else:  # window position w's heads are heads w*h .. w*h+h-1 of one call per batch
        q4, k4, v4 = (t.reshape(t.shape[0], -1, *t.shape[-2:]) for t in (q, k, v))
        shift = mask.flatten(0, 1).to(q.dtype)  # (nW, nq, nk)

        def add_bias(score: Tensor, b: Tensor, head: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return score + weights[idx[qi, ki], head % heads] + shift[head // heads, qi, ki]

    q4, k4, v4 = (_pad_head_dim(t, FLEX_HEAD_MULTIPLE) for t in (q4, k4, v4))
    out = _run_flex(q4, k4, v4, add_bias, scale, compile_flex)
    return out[..., : v.shape[-1]].reshape(*q.shape[:-1], v.shape[-1])


def packed_flex_attention(
    qkv: Tensor, table: Tensor, index: Tensor, scale: float, mask: Tensor | None = None
) -> Tensor:
    """``packed_attention`` through ``flex_table_attention``: qkv (B*nW, n, 3, h, d) ->
    (B*nW, h, n, d), ``mask`` (nW, 1, n, n) shared by the B images."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B*nW, h, n, d) each
    if mask is None:
        return flex_table_attention(q, k, v, table, index, scale)
    nw = mask.shape[0]
    q, k, v = (t.reshape(-1, nw, *t.shape[1:]) for t in (q, k, v))  # (B, nW, h, n, d)
    return flex_table_attention(q, k, v, table, index, scale, mask).flatten(0, 1)


@functools.cache
def compiled_flex():
    """``torch.compile(flex_attention)``, built once per process: the fused kernel (eager
    flex_attention materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _run_flex(q, k, v, score_mod, scale: float, compile_flex: bool | None) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    compiled = q.device.type != "cpu" if compile_flex is None else compile_flex
    if torch.compiler.is_compiling():  # inside a compiled model: traced into its graph
        return flex_attention(q, k, v, score_mod=score_mod, scale=scale)
    with route("flex_compiled" if compiled else "flex_eager"):
        flex = compiled_flex() if compiled else flex_attention
        return flex(q, k, v, score_mod=score_mod, scale=scale)


def packed_attention(
    qkv: Tensor, bias: Tensor, scale: float, mask: Tensor | None = None, impl: str = "auto"
) -> Tensor:
    """``common.qkv_attention``: the attention of the windows' qkv projection
    (B*nW, n, 3, h, d) -> (B*nW, h, n, d), ``mask`` (nW, 1, n, n) shared by the B images;
    ``impl`` as for ``attention``."""
    check_attention_impl(impl)
    if impl == "auto" and _windowed(qkv, qkv.shape[1] ** 2) and qkv.stride(-1) == 1:
        with route("windowed_cpu"):
            return _PackedWindowAttentionCPU.apply(qkv, bias, mask, scale)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous()  # (B*nW, h, n, d) each
    if mask is None:
        return attention(q, k, v, bias, scale, impl=impl)
    nw = mask.shape[0]
    q, k, v = (t.view(-1, nw, *t.shape[1:]) for t in (q, k, v))  # (B, nW, h, n, d)
    return attention(q, k, v, bias, scale, mask, impl=impl).flatten(0, 1)


def overlapping_windows(grid: Tensor, size: int, stride: int, heads: int) -> tuple[Tensor, Tensor]:
    """OCAB's keys and values: ``size`` x ``size`` windows every ``stride`` tokens of a
    (B, H', W', 2C) grid of [k | v] channels -> k, v (B*nW, h, size*size, d).

    The reference unfolds, reshapes and permutes (two full copies, and two unfold
    backwards); here the windows are one ``index_select`` of tokens (gradient: one
    index_add) and k, v strided views of it.
    """
    b, hp, wp, c2 = grid.shape
    positions = torch.arange(hp * wp, device=grid.device).view(hp, wp)
    order = positions.unfold(0, size, stride).unfold(1, size, stride)  # (nWh, nWw, size, size)
    kv = grid.reshape(b, hp * wp, c2).index_select(1, order.reshape(-1))  # (B, nW*size^2, 2C)
    kv = kv.view(-1, size * size, 2, heads, c2 // (2 * heads))  # (B*nW, size^2, 2, h, d)
    k, v = kv.unbind(2)  # (its gradient is one stack, where indexing's is two zero-fills)
    return k.transpose(1, 2), v.transpose(1, 2)


# ----------------------------------------------------------------------------- layout


class _TokensAsImage(torch.autograd.Function):
    """``common.image`` whose gradient comes back as contiguous (B, N, C) tokens.

    The CPU convolutions return an NCHW input gradient, whose token view is
    channel-major; left as is, that layout would travel down the whole residual stream
    and make every later gradient op either copy or stride across memory.
    """

    @staticmethod
    def forward(ctx, x: Tensor, h: int, w: int) -> Tensor:  # x (B, N, C)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)  # (B, C, H, W)

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad (B, C, H, W)
        return grad.flatten(2).transpose(1, 2).contiguous(), None, None  # (B, N, C)


def image(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W) channels-last view; contiguous token gradient."""
    return _TokensAsImage.apply(x, size[0], size[1])


def spatial_mean(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, 1, 1) mean, as HAT's channel attention pools
    (``AdaptiveAvgPool2d(1)``): a sum and a scale, whose backward on the channels-last
    CAB activations is about 3x faster than the mean's (equal up to rounding)."""
    return x.sum((2, 3), keepdim=True) * (1.0 / (x.shape[2] * x.shape[3]))


# ----------------------------------------------------------------------------- norms


def standardize_affine(
    x: Tensor, weight: Tensor, bias: Tensor, dims: int, eps: float
) -> tuple[Tensor, Tensor]:
    """(xhat * weight + bias, std) over the last ``dims`` dims of each sample,
    xhat = (x - mean) / std, std = sqrt(biased var + eps); differentiable in both outputs.

    The reference is ``norms.ImageLayerNorm`` (dims 2) / ``norms.TokenRescaledLayerNorm``
    (dims 1). Input of another dtype than the parameters (a bf16 / fp16 activation under
    autocast) is computed in the parameters' dtype, as autocast runs ``layer_norm``.
    ``std`` has the dtype of the (cast) input: CUDA's kernels return fp32 statistics for
    fp16 / bf16 input, which as a branch scale would promote a half-precision residual
    stream to fp32 (and the next half-precision convolution would refuse it).
    """
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    if dims == 2 and group_norm_applies(x):
        return _ImageStandardizeAffine.apply(x, weight, bias, eps)
    return _StandardizeAffine.apply(x, weight, bias, dims, eps)


def group_norm_applies(x: Tensor) -> bool:
    """The GroupNorm route needs the CPU kernels (they take channels-last input; the CUDA
    ones do not) and a contiguous (B, N, C) input."""
    return x.device.type == "cpu" and x.ndim == 3 and x.is_contiguous()


class _StandardizeAffine(torch.autograd.Function):
    """Statistics and normalisation from one fused kernel (the one LayerNorm uses).

    The hand-written backward includes the gradient through ``std`` (d std / dx = xhat / M
    for M normalised values), so the rescaling is not detached, and skips the extra
    full-size products autograd would form for the affine.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor, dims: int, eps: float
    ) -> tuple[Tensor, Tensor]:
        shape = list(x.shape[-dims:])
        xhat, mean, rstd = torch.native_layer_norm(x, shape, None, None, eps)  # (B, 1, 1)
        ctx.save_for_backward(x, xhat, mean, rstd, weight)
        ctx.shape = shape
        ctx.set_materialize_grads(False)  # an unused std (LN*) brings no gradient pass
        return torch.addcmul(bias, xhat, weight), rstd.reciprocal().to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_std: Tensor | None):
        x, xhat, mean, rstd, weight = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(xhat)
        grad_w = (grad_y * xhat).sum_to_size(weight.shape) if ctx.needs_input_grad[1] else None
        grad_b = grad_y.sum_to_size(weight.shape) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_layer_norm_backward.default(
                grad_y * weight, x, ctx.shape, mean, rstd, None, None, [True, False, False]
            )[0]
            if grad_std is not None:
                grad_x.addcmul_(xhat, grad_std, value=1.0 / math.prod(ctx.shape))
        return grad_x, grad_w, grad_b, None, None


class _ImageStandardizeAffine(torch.autograd.Function):
    """The same map over all N*C values of each image, on CPU.

    A contiguous (B, N, C) tensor is, viewed as (B, C, 1, N), a channels-last image whose
    one group spans every value of a sample, so the CPU GroupNorm kernels give
    normalisation *and* the per-channel affine in one pass forward, and the input, weight
    and bias gradients in one pass backward. Only x is kept for backward (no xhat), and
    the gradient through std is added in place.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        b, n, c = x.shape
        y, mean, rstd = torch.native_group_norm(
            _as_image(x), weight, bias, b, c, n, 1, eps
        )  # mean, rstd (B, 1)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.set_materialize_grads(False)
        return y.permute(0, 2, 3, 1).view(b, n, c), rstd.reciprocal().view(b, 1, 1).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_std: Tensor | None):
        x, mean, rstd, weight = ctx.saved_tensors
        b, n, c = x.shape
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward.default(
            _as_image(grad_y.contiguous()),
            _as_image(x),
            mean,
            rstd,
            weight,
            b,
            c,
            n,
            1,
            list(ctx.needs_input_grad[:3]),
        )
        if grad_x is not None:
            grad_x = grad_x.permute(0, 2, 3, 1).reshape(b, n, c)
            if grad_std is not None:  # + xhat * grad_std / (N*C), xhat = (x - mean) * rstd
                k = rstd.view(b, 1, 1) * grad_std.view(b, 1, 1) / (n * c)  # (B, 1, 1)
                shift = mean.view(b, 1, 1) * k
                for i in range(b):  # one sample at a time: the second pass finds it in cache
                    grad_x[i].addcmul_(x[i], k[i]).sub_(shift[i])
        return grad_x, grad_w, grad_b, None


def _as_image(t: Tensor) -> Tensor:
    """Contiguous tokens (B, N, C) -> the same memory as a channels-last (B, C, 1, N) image."""
    b, n, c = t.shape
    return t.view(b, 1, n, c).permute(0, 3, 1, 2)
