"""The fast path (``iln.models.fast``) against the reference code, piece by piece and for
whole models: values and gradients, float64 gradcheck on small shapes."""

from __future__ import annotations

import pytest
import torch

from iln.models import build_model, common, fast
from iln.models.norms import build_norm

TINY = ("hat_tiny", "swinir_tiny")
F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaf(*shape: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).requires_grad_(True)


def _same_values_and_grads(f_fast, f_ref, inputs, *, tol: float = 1e-12) -> None:
    """f_fast(*inputs) == f_ref(*inputs), and so are the gradients of a random projection."""
    out_fast, out_ref = f_fast(*inputs), f_ref(*inputs)
    outs_fast = out_fast if isinstance(out_fast, tuple) else (out_fast,)
    outs_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    g = _gen(99)
    cotangents = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs_ref]
    for a, b in zip(outs_fast, outs_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads_fast = torch.autograd.grad(outs_fast, wrt, cotangents)
    grads_ref = torch.autograd.grad(outs_ref, wrt, cotangents)
    for i, (a, b) in enumerate(zip(grads_fast, grads_ref, strict=True)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, i=i: f"input {i}: {m}")


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize("name", ["iln", "ln_star", "ln_rs"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_fused_norms_equal_the_reference_and_pass_gradcheck(name, layout):
    ref = build_norm(name, 6, fast=False).double()
    quick = build_norm(name, 6, fast=True).double()
    g = _gen(1)
    weight, bias = _leaf(6, g=g), _leaf(6, g=g)
    x = (3.0 * torch.randn(2, 7, 6, generator=g, dtype=F64) + 1.5).detach()
    if layout == "strided":  # channel-major memory: the LayerNorm-kernel route
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    x.requires_grad_(True)
    assert fast.group_norm_applies(x) == (layout == "contiguous")

    def call(norm):
        def f(t, w, b):
            y, s = torch.func.functional_call(norm, {"weight": w, "bias": b}, (t,))
            return (y, s) if isinstance(s, torch.Tensor) else y

        return f

    _same_values_and_grads(call(quick), call(ref), (x, weight, bias), tol=1e-11)
    assert torch.autograd.gradcheck(call(quick), (x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_groupnorm_route_of_the_image_norm_equals_the_layernorm_route(dtype):
    # LN* / i-LN on CPU take the GroupNorm kernels on a channels-last view; any other
    # input takes the LayerNorm kernels over (N, C). Both must be the same function.
    b, n, c, eps = 3, 40, 12, 1e-4
    g = _gen(0)
    x = (4.0 * torch.randn(b, n, c, generator=g) + 1.5).to(dtype).requires_grad_(True)
    weight = torch.randn(c, generator=g).to(dtype).requires_grad_(True)
    bias = torch.randn(c, generator=g).to(dtype).requires_grad_(True)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    _same_values_and_grads(
        lambda t, w, bb: fast._ImageStandardizeAffine.apply(t, w, bb, eps),
        lambda t, w, bb: fast._StandardizeAffine.apply(t, w, bb, 2, eps),
        (x, weight, bias),
        tol=tol,
    )
    # LN*: the std is not used, so no gradient flows back through it
    y_group = fast._ImageStandardizeAffine.apply(x, weight, bias, eps)[0]
    y_layer = fast._StandardizeAffine.apply(x, weight, bias, 2, eps)[0]
    grad = torch.randn(b, n, c, generator=g).to(dtype)
    for a, r in zip(
        torch.autograd.grad(y_group, (x, weight, bias), grad),
        torch.autograd.grad(y_layer, (x, weight, bias), grad),
    ):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- attention


@pytest.fixture(params=["windowed", "materialized"])
def route(request, monkeypatch):
    """Both CPU attention routes: windowed backward (large windows), batched (small)."""
    monkeypatch.setattr(fast, "WINDOWED_MIN_LOGITS", 0 if request.param == "windowed" else 10**9)
    return request.param


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_attention_equals_the_reference_and_passes_gradcheck(masked, strided, route):
    g = _gen(2)
    b, nw, h, nq, nk, d = 2, 2, 2, 4, 6, 3
    q, k, v = _leaf(b, nw, h, nq, d, g=g), _leaf(b, nw, h, nk, d, g=g), _leaf(b, nw, h, nk, d, g=g)
    if strided:  # k and v with a strided last dim, as OCAB's unfold leaves them
        k, v = (_leaf(b, nw, h, d, nk, g=g).transpose(-2, -1) for _ in range(2))
        assert k.stride(-1) != 1
    bias = _leaf(h, nq, nk, g=g, scale=0.1)
    mask = None
    if masked:  # -100 between regions, as the shifted windows have
        mask = torch.where(torch.rand(nw, 1, nq, nk, generator=g) < 0.3, -100.0, 0.0).to(F64)

    def run(attend):
        return lambda q, k, v, bias: attend(q, k, v, bias, 0.5, mask)

    _same_values_and_grads(run(fast.attention), run(common.attention), (q, k, v, bias))
    assert torch.autograd.gradcheck(run(fast.attention), (q, k, v, bias))
    with torch.no_grad():  # inference takes torch's fused kernel
        for one in (slice(0, 1), slice(None)):
            torch.testing.assert_close(
                fast.attention(q[one], k[one], v[one], bias, 0.5, mask),
                common.attention(q[one], k[one], v[one], bias, 0.5, mask),
                rtol=1e-12,
                atol=1e-12,
            )


@pytest.mark.parametrize("masked", [False, True])
def test_packed_attention_equals_the_reference_and_passes_gradcheck(masked, route):
    g = _gen(4)
    b, nw, n, h, d = 2, 2, 5, 2, 3
    qkv = _leaf(b * nw, n, 3, h, d, g=g)  # the qkv projection of B*nW windows
    bias = _leaf(h, n, n, g=g, scale=0.1)
    mask = None
    if masked:
        mask = torch.where(torch.rand(nw, 1, n, n, generator=g) < 0.3, -100.0, 0.0).to(F64)

    def reference(qkv, bias):
        return common.qkv_attention(qkv, bias, 0.5, mask)

    def packed(qkv, bias):
        return fast.packed_attention(qkv, bias, 0.5, mask)

    _same_values_and_grads(packed, reference, (qkv, bias))
    assert torch.autograd.gradcheck(packed, (qkv, bias))


def test_gather_bias_equals_the_reference_with_wrapping_indices():
    table = _leaf(39 * 39, 3, g=_gen(3))
    index = common.relative_position_index_overlap(16, 24)  # has negative entries
    _same_values_and_grads(fast.gather_bias, common.gather_bias, (table, index), tol=0.0)


def test_tokens_as_image_is_a_view_and_hands_back_a_contiguous_token_gradient():
    x = torch.randn(2, 12, 5, requires_grad=True)  # (B, N, C) on a 3 x 4 grid
    img = common.image(x, (3, 4), fast=True)
    assert img.shape == (2, 5, 3, 4) and img.data_ptr() == x.data_ptr()
    torch.testing.assert_close(img, common.image(x, (3, 4)), rtol=0, atol=0)
    grad = torch.randn(2, 5, 3, 4)  # NCHW, as a convolution returns it
    (gx,) = torch.autograd.grad(img, x, grad)
    assert gx.is_contiguous()
    torch.testing.assert_close(gx, grad.flatten(2).transpose(1, 2), rtol=0, atol=0)


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("norm", ["ln", "iln", "ln_star", "ln_rs"])
def test_fast_models_equal_the_reference_in_outputs_and_gradients(arch, norm, route):
    quick = build_model(arch, norm=norm, scale=2, drop_path_rate=0.0, fast=True)
    ref = build_model(arch, norm=norm, scale=2, drop_path_rate=0.0, fast=False)
    ref.load_state_dict(quick.state_dict())
    x = torch.rand(2, 3, 19, 21, generator=_gen(6))
    y_fast, y_ref = quick(x), ref(x)
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=1e-5)
    g_fast = torch.autograd.grad(y_fast.square().mean(), list(quick.parameters()))
    g_ref = torch.autograd.grad(y_ref.square().mean(), list(ref.parameters()))
    for (name, _), a, b in zip(quick.named_parameters(), g_fast, g_ref, strict=True):
        torch.testing.assert_close(
            a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item()), msg=name
        )
    with torch.no_grad():  # inference takes torch's fused attention kernel
        for batch in (x[:1], x):
            torch.testing.assert_close(quick(batch), ref(batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", TINY)
def test_a_small_fast_model_passes_float64_gradcheck(arch, route):
    small = dict(embed_dim=4, depths=[1], num_heads=[2], window_size=4, drop_path_rate=0.0)
    if arch.startswith("hat"):
        small.update(compress_ratio=2, squeeze_factor=2)
    model = build_model(arch, norm="iln", scale=1, fast=True, **small).double()
    x = torch.rand(1, 3, 5, 6, generator=_gen(7), dtype=F64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: model(t), (x,))
