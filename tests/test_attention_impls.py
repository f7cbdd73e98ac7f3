"""The attention implementations of the fast path (``fast.ATTENTION_IMPLS``) against the
reference ``common.attention``: values and gradients (the relative position bias included)
wherever the kernel runs on the CPU, shapes and dtypes on the ``meta`` device (which takes
the CUDA branches)."""

from __future__ import annotations

import pytest
import torch

from iln.models import build_model, common, fast

F64 = torch.float64
META = torch.device("meta")
DIFFERENTIABLE = ("sdpa", "materialized")  # flex_attention has no backward on the CPU


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _operands(g, *, b, nw, h, nq, nk, d, masked, dtype=F64):
    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_(True)

    q, k, v = leaf(b, nw, h, nq, d), leaf(b, nw, h, nk, d), leaf(b, nw, h, nk, d)
    bias = leaf(h, nq, nk, scale=0.5)
    mask = None
    if masked:  # -100 between regions, one mask per window position, as shifted windows
        mask = torch.where(torch.rand(nw, 1, nq, nk, generator=g) < 0.3, -100.0, 0.0).to(dtype)
    else:  # without a mask the window axis is just more batch, as in OCAB
        q, k, v = (t.detach().flatten(0, 1).requires_grad_(True) for t in (q, k, v))
    return q, k, v, bias, mask


def _values_and_grads(f, inputs, cotangent_seed=5):
    out = f(*inputs)
    ct = torch.randn(out.shape, generator=_gen(cotangent_seed), dtype=out.dtype)
    return out, torch.autograd.grad(out, inputs, ct)


@pytest.mark.parametrize("impl", DIFFERENTIABLE)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "shift_mask"])
@pytest.mark.parametrize("d", [16, 30], ids=["d16", "d30_padded"])  # hat_1 / hat head dims
def test_attention_impl_equals_the_reference_with_bias_gradient(impl, masked, d):
    q, k, v, bias, mask = _operands(_gen(1), b=2, nw=3, h=2, nq=16, nk=36, d=d, masked=masked)
    inputs = (q, k, v, bias)
    out, grads = _values_and_grads(lambda *t: fast.attention(*t, 0.3, mask, impl=impl), inputs)
    ref, ref_grads = _values_and_grads(lambda *t: common.attention(*t, 0.3, mask), inputs)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("q", "k", "v", "bias"), grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("impl", DIFFERENTIABLE)
def test_sdpa_attention_in_float32_takes_the_bias_gradient_too(impl):
    q, k, v, bias, mask = _operands(
        _gen(2), b=2, nw=4, h=3, nq=64, nk=64, d=16, masked=True, dtype=torch.float32
    )
    out, grads = _values_and_grads(
        lambda *t: fast.attention(*t, 0.25, mask, impl=impl), (q, k, v, bias)
    )
    ref, ref_grads = _values_and_grads(lambda *t: common.attention(*t, 0.25, mask), (q, k, v, bias))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "shift_mask"])
@pytest.mark.parametrize("d", [16, 30], ids=["d16", "d30_padded"])
def test_flex_attention_forward_equals_the_reference(masked, d):
    q, k, v, bias, mask = _operands(_gen(3), b=2, nw=3, h=2, nq=16, nk=36, d=d, masked=masked)
    q, k, v, bias = (t.detach() for t in (q, k, v, bias))  # no flex backward on the CPU
    out = fast.attention(q, k, v, bias, 0.3, mask, impl="flex")
    torch.testing.assert_close(
        out, common.attention(q, k, v, bias, 0.3, mask), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("impl", fast.ATTENTION_IMPLS)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "shift_mask"])
def test_packed_attention_impl_equals_the_reference(impl, masked):
    g = _gen(4)
    b, nw, n, h, d = 2, 2, 16, 3, 8
    qkv = torch.randn(b * nw, n, 3, h, d, generator=g, dtype=F64, requires_grad=impl != "flex")
    bias = (0.5 * torch.randn(h, n, n, generator=g, dtype=F64)).requires_grad_(impl != "flex")
    mask = None
    if masked:
        mask = torch.where(torch.rand(nw, 1, n, n, generator=g) < 0.3, -100.0, 0.0).to(F64)
    out = fast.packed_attention(qkv, bias, 0.3, mask, impl)
    ref = common.qkv_attention(qkv, bias, 0.3, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if impl != "flex":
        ct = torch.randn(ref.shape, generator=g, dtype=F64)
        for a, b in zip(
            torch.autograd.grad(out, (qkv, bias), ct),
            torch.autograd.grad(ref, (qkv, bias), ct),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["hat_tiny", "swinir_tiny"])
def test_a_model_on_sdpa_attention_equals_the_default_fast_model(arch):
    auto = build_model(arch, norm="iln", scale=2, drop_path_rate=0.0, generator=_gen(6)).double()
    sdpa = build_model(arch, norm="iln", scale=2, drop_path_rate=0.0, attention="sdpa").double()
    sdpa.load_state_dict(auto.state_dict())
    x = torch.rand(2, 3, 19, 21, generator=_gen(7), dtype=F64)
    y_auto, y_sdpa = auto(x), sdpa(x)
    torch.testing.assert_close(y_sdpa, y_auto, rtol=1e-10, atol=1e-10)
    g_auto = torch.autograd.grad(y_auto.square().mean(), list(auto.parameters()))
    g_sdpa = torch.autograd.grad(y_sdpa.square().mean(), list(sdpa.parameters()))
    for (name, _), a, b in zip(auto.named_parameters(), g_sdpa, g_auto, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("impl", ["auto", *DIFFERENTIABLE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_off_the_cpu_keeps_shapes_and_dtypes(impl, dtype):
    b, nw, h, n, d = 2, 4, 6, 256, 30
    q, k, v = (
        torch.empty(b, nw, h, n, d, device=META, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    table = torch.empty(961, h, device=META, dtype=dtype, requires_grad=True)
    bias = fast.gather_bias(table, common.relative_position_index(16).to(META))
    mask = torch.empty(nw, 1, n, n, device=META, dtype=dtype)
    out = fast.attention(q, k, v, bias, d**-0.5, mask, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype
    out.sum().backward()
    assert table.grad.shape == table.shape and table.grad.dtype == dtype
    assert q.grad.shape == q.shape and q.grad.dtype == dtype


def test_unknown_attention_impl_is_named():
    with pytest.raises(ValueError, match="unknown attention implementation 'fused'; valid: auto"):
        build_model("hat_tiny", norm="ln", scale=2, attention="fused")
    with pytest.raises(ValueError, match="with fast=False the model runs the reference"):
        build_model("hat_tiny", norm="ln", scale=2, fast=False, attention="sdpa")
