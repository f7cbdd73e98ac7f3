"""Normalisation variants: definitions, the (y, scale) interface, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iln.models import norms
from iln.models.norms import NORMS, UNIT, build_norm


def _randomise_affine(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _tokens(
    b: int = 3, n: int = 20, c: int = 8, seed: int = 1, dtype=torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(b, n, c, generator=g) + 2.0).to(dtype)  # (B, N, C)


@pytest.mark.parametrize("name", NORMS)
def test_every_norm_returns_tokens_and_a_broadcastable_scale(name):
    norm = build_norm(name, 8)
    x = _tokens()
    y, scale = norm(x)
    assert y.shape == x.shape
    if not isinstance(scale, float):
        assert torch.broadcast_shapes(scale.shape, x.shape) == x.shape


def test_ln_equals_torch_layer_norm():
    norm = build_norm("ln", 8)
    _randomise_affine(norm)
    x = _tokens()
    y, scale = norm(x)
    torch.testing.assert_close(
        y, F.layer_norm(x, (8,), norm.weight, norm.bias, 1e-5), rtol=0, atol=0
    )
    assert scale == UNIT


def test_iln_normalises_each_image_over_tokens_and_channels_and_returns_its_std():
    eps = 1e-4
    norm = build_norm("iln", 8)
    assert norm.eps == eps
    x = _tokens(dtype=torch.float64)
    norm = norm.double()
    y, scale = norm(x)  # weight 1, bias 0: y is the standardised input
    mean = y.mean(dim=(1, 2))
    var = y.var(dim=(1, 2), unbiased=False)
    in_var = x.var(dim=(1, 2), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(var, in_var / (in_var + eps), rtol=1e-10, atol=0)  # -> 1 as eps -> 0
    assert scale.shape == (3, 1, 1)
    torch.testing.assert_close(scale.flatten(), torch.sqrt(in_var + eps), rtol=1e-12, atol=0)


def test_iln_statistics_are_per_sample_and_the_same_in_train_and_eval():
    norm = build_norm("iln", 8)
    _randomise_affine(norm)
    x = _tokens(b=4)
    y_batch, s_batch = norm(x)
    y_one, s_one = norm(x[1:2])
    torch.testing.assert_close(y_batch[1:2], y_one)
    torch.testing.assert_close(s_batch[1:2], s_one)
    norm.eval()
    y_eval, _ = norm(x)
    torch.testing.assert_close(y_eval, y_batch, rtol=0, atol=0)


def test_iln_gradcheck_float64_through_output_and_scale():
    norm = build_norm("iln", 4).double()
    x = _tokens(b=2, n=5, c=4, dtype=torch.float64).requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)

    def call(t, w, b):
        return torch.func.functional_call(norm, {"weight": w, "bias": b}, (t,))  # (y, scale)

    assert torch.autograd.gradcheck(call, (x, weight, bias))


def test_iln_scale_is_not_detached():
    norm = build_norm("iln", 8)
    x = _tokens().requires_grad_(True)
    _, scale = norm(x)
    (grad,) = torch.autograd.grad(scale.sum(), x)
    var, mean = torch.var_mean(x.detach(), dim=(1, 2), correction=0, keepdim=True)
    expected = (x.detach() - mean) / (torch.sqrt(var + norm.eps) * x[0].numel())  # d std / dx
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)


def test_ln_star_is_iln_without_rescaling():
    a, b = build_norm("ln_star", 8), build_norm("iln", 8)
    x = _tokens()
    (ya, sa), (yb, _) = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    assert sa == UNIT


def test_ln_rs_rescales_each_token_by_its_std():
    norm = build_norm("ln_rs", 8)
    x = _tokens(dtype=torch.float64)
    norm = norm.double()
    y, scale = norm(x)
    torch.testing.assert_close(y, F.layer_norm(x, (8,), eps=norm.eps))
    var = x.var(dim=-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(scale, torch.sqrt(var + norm.eps))
    assert scale.shape == (3, 20, 1)


def test_rmsnorm_definition():
    norm = build_norm("rmsnorm", 8)
    _randomise_affine(norm)
    x = _tokens()
    y, scale = norm(x)
    rms = torch.sqrt(x.square().mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(y, x / rms * norm.weight + norm.bias)
    assert scale == UNIT


def test_layerscale_and_rezero_scale_their_branch_with_a_learnable_parameter():
    ls = build_norm("layerscale", 8)
    x = _tokens()
    y, scale = ls(x)
    torch.testing.assert_close(y, F.layer_norm(x, (8,), ls.weight, ls.bias, 1e-5))
    assert scale is ls.branch_scale and scale.shape == (8,)
    torch.testing.assert_close(scale.detach(), torch.full((8,), 1e-4))

    rz = build_norm("rezero", 8)
    y, scale = rz(x)
    assert torch.equal(y, x)
    assert scale is rz.alpha and scale.ndim == 0 and scale.item() == 0.0


def test_norms_without_residual_drop_the_branch_scale_parameter():
    assert type(build_norm("layerscale", 8, residual=False)) is norms.LayerNorm
    assert type(build_norm("rezero", 8, residual=False)) is norms.IdentityNorm
    assert type(build_norm("iln", 8, residual=False)) is norms.ImageLayerNorm


def test_none_is_identity_and_dyt_is_a_scaled_tanh():
    x = _tokens()
    y, scale = build_norm("none", 8)(x)
    assert torch.equal(y, x) and scale == UNIT
    dyt = build_norm("dyt", 8)
    _randomise_affine(dyt)
    y, _ = dyt(x)
    torch.testing.assert_close(y, torch.tanh(dyt.alpha * x) * dyt.weight + dyt.bias)


def test_instancenorm_normalises_each_channel_of_each_image_over_tokens():
    norm = build_norm("instancenorm", 8).double()
    x = _tokens(dtype=torch.float64)
    y, _ = norm(x)
    torch.testing.assert_close(
        y.mean(dim=1), torch.zeros(3, 8, dtype=torch.float64), rtol=0, atol=1e-12
    )
    var = x.var(dim=1, unbiased=False)
    torch.testing.assert_close(y.var(dim=1, unbiased=False), var / (var + norm.eps))


def test_batchnorm_uses_running_stats_in_eval_and_batchnorm_train_never_does():
    x = _tokens(b=4)
    bn = build_norm("batchnorm", 8)
    y_train, _ = bn(x)
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(
        y_train.reshape(-1, 8), F.batch_norm(flat, None, None, training=True, eps=1e-5)
    )
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    y_eval, _ = bn(x)
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(y_eval, expected)

    bnt = build_norm("batchnorm_train", 8)
    bnt.eval()
    y, _ = bnt(x)
    torch.testing.assert_close(y, y_train)
    assert bnt.running_mean is None


def test_affine_outer_norm():
    aff = norms.Affine(8)
    _randomise_affine(aff)
    x = _tokens()
    y, scale = aff(x)
    torch.testing.assert_close(y, x * aff.weight + aff.bias)
    assert scale == UNIT


def test_eps_is_per_instance_and_nothing_is_cached_between_calls():
    a = build_norm("iln", 8, eps=1e-2)
    b = build_norm("iln", 8)
    assert (a.eps, b.eps) == (1e-2, 1e-4)
    x = _tokens()
    before = set(vars(a)) | set(a._buffers)
    first = a(x)
    a(_tokens(seed=7))
    second = a(x)
    assert set(vars(a)) | set(a._buffers) == before
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)
    assert not torch.allclose(a(x)[1], b(x)[1])


def test_default_eps_per_variant():
    assert norms.default_eps("iln") == 1e-4
    assert norms.default_eps("ln_star") == 1e-4
    assert norms.default_eps("ln") == 1e-5


def test_unknown_norm_names_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown norm 'groupnorm'.*iln.*batchnorm_train"):
        build_norm("groupnorm", 8)


def _image_norm_grads(route, x, weight, bias, grad_y, grad_std):
    """Outputs and input/weight/bias gradients of one standardize route."""
    x, weight, bias = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    y, std = route(x, weight, bias)
    if grad_std is None:
        y.backward(grad_y)
    else:
        torch.autograd.backward([y, std], [grad_y, grad_std])
    return y.detach(), std.detach(), x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_groupnorm_route_of_the_image_norm_equals_the_layernorm_route(dtype):
    # LN* / i-LN on CPU take the GroupNorm kernels on a channels-last view; any other
    # input takes the LayerNorm kernels over (N, C). Both must be the same function.
    b, n, c, eps = 3, 40, 12, 1e-4
    g = torch.Generator().manual_seed(0)
    x = (4.0 * torch.randn(b, n, c, generator=g) + 1.5).to(dtype)
    weight, bias = torch.randn(c, generator=g).to(dtype), torch.randn(c, generator=g).to(dtype)
    grad_y, grad_std = (
        torch.randn(b, n, c, generator=g).to(dtype),
        torch.randn(b, 1, 1, generator=g).to(dtype),
    )
    assert norms._group_norm_applies(x)

    def group(t, w, bb):
        return norms._ImageStandardizeAffine.apply(t, w, bb, eps)

    def layer(t, w, bb):
        return norms._StandardizeAffine.apply(t, w, bb, 2, eps)

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    # with a gradient through the std (i-LN) and without one (LN*: the std is unused)
    for g_std in (grad_std, None):
        got = _image_norm_grads(group, x, weight, bias, grad_y, g_std)
        want = _image_norm_grads(layer, x, weight, bias, grad_y, g_std)
        for name, a, r in zip(("y", "std", "grad x", "grad weight", "grad bias"), got, want):
            torch.testing.assert_close(a, r, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_image_norm_takes_the_layernorm_route_for_strided_input_with_the_same_result():
    norm = build_norm("iln", 8).double()
    _randomise_affine(norm)
    x = _tokens(n=20, dtype=torch.float64)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channel-major memory
    assert not norms._group_norm_applies(strided)
    (y, s), (y2, s2) = norm(x), norm(strided)
    torch.testing.assert_close(y2, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, s, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["iln", "ln_rs"])
def test_gradcheck_of_the_strided_route(name):
    norm = build_norm(name, 4).double()
    x = (
        _tokens(b=2, n=5, c=4, dtype=torch.float64)
        .transpose(1, 2)
        .contiguous()
        .transpose(1, 2)
        .requires_grad_(True)
    )
    assert torch.autograd.gradcheck(lambda t: norm(t), (x,))
