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


@pytest.mark.parametrize("fast", [False, True])
def test_iln_gradcheck_float64_through_output_and_scale(fast):
    norm = build_norm("iln", 4, fast=fast).double()
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


# ---- iln_clamp: traiNNer-redux's i-LN (branch scale clamped to twice a running std)


def _images_with_std(amplitudes, n: int = 12, c: int = 4) -> torch.Tensor:
    """(B, N, C) float64 tokens whose image b has mean 0 and biased variance amplitudes[b]^2
    exactly (a fixed pattern, standardised, times the amplitude)."""
    z = torch.linspace(-1.0, 1.0, n * c, dtype=torch.float64).reshape(n, c) ** 3
    z = (z - z.mean()) / z.var(unbiased=False).sqrt()
    return torch.stack([a * z for a in amplitudes])


def _std(amplitude: float, eps: float = 1e-4) -> float:
    return (amplitude**2 + eps) ** 0.5


def _clamp_norm() -> norms.ClampedImageLayerNorm:
    norm = build_norm("iln_clamp", 4).double()
    assert isinstance(norm, norms.ClampedImageLayerNorm) and norm.eps == 1e-4
    return norm.train()


def test_iln_clamp_normalises_as_ln_star_and_its_first_training_call_copies_the_batch_std():
    norm = _clamp_norm()
    x = _images_with_std([1.0, 1.0, 10.0])
    star = build_norm("ln_star", 4).double()
    _randomise_affine(norm, seed=5)
    star.load_state_dict(norm.state_dict())
    y, scale = norm(x)
    torch.testing.assert_close(y, star(x)[0], rtol=0, atol=1e-12)  # input / raw std, no clamp
    first = (2 * _std(1.0) + _std(10.0)) / 3  # batch mean of the per-image std: ~4.0
    assert norm.std_ema.item() == pytest.approx(first, rel=1e-12)
    # the branch scale is min(std, 2 * std_ema): the third image (std ~10) is clamped to ~8
    expected = torch.tensor([_std(1.0), _std(1.0), 2 * first], dtype=torch.float64)
    torch.testing.assert_close(scale.flatten(), expected, rtol=1e-12, atol=0)


def test_iln_clamp_running_std_moves_by_alpha_towards_the_batch_std_clamped_to_twice_its_value():
    norm = _clamp_norm()
    norm(_images_with_std([2.0, 2.0]))
    ema = _std(2.0)
    norm(_images_with_std([3.0, 1.0]))  # batch mean ~2 < 2 * ema: an EMA step of 1e-3
    ema += 1e-3 * ((_std(3.0) + _std(1.0)) / 2 - ema)
    assert norm.std_ema.item() == pytest.approx(ema, rel=1e-12)
    # batch mean ~4.75 >= 2 * ema: clamped to 2 * ema, and the step is still taken (the
    # running std grows by alpha, 0.1%), so the branch scale is 2 x the updated value
    _, scale = norm(_images_with_std([4.5, 5.0]))
    spiked = ema + 1e-3 * (2 * ema - ema)  # alpha is a float32 1e-3 (as upstream): rel 1e-9
    assert norm.std_ema.item() == pytest.approx(spiked, rel=1e-9)
    assert norm.std_ema.item() > ema * (1 + 0.999e-3)  # not skipped
    torch.testing.assert_close(
        scale.flatten(),
        torch.tensor([2 * spiked, 2 * spiked], dtype=torch.float64),
        rtol=1e-9,
        atol=0,
    )
    # a batch far below the running std is not clamped from below: a plain EMA step
    norm(_images_with_std([0.1, 0.1]))
    assert norm.std_ema.item() == pytest.approx(spiked + 1e-3 * (_std(0.1) - spiked), rel=1e-9)


def test_iln_clamp_changes_nothing_in_eval_mode_and_is_plain_i_ln_before_any_training():
    fresh = build_norm("iln_clamp", 4).double().eval()
    x = _images_with_std([1.0, 30.0])
    _, scale = fresh(x)  # never trained: the raw std, as i-LN
    torch.testing.assert_close(scale, build_norm("iln", 4).double()(x)[1], rtol=0, atol=0)
    assert fresh.std_ema.item() == 0.0
    trained = _clamp_norm()
    trained(_images_with_std([1.0, 1.0]))
    trained.eval()
    _, scale = trained(x)
    assert trained.std_ema.item() == pytest.approx(_std(1.0), rel=1e-12)  # not updated in eval
    torch.testing.assert_close(
        scale.flatten(), torch.tensor([_std(1.0), 2 * _std(1.0)], dtype=torch.float64)
    )


def test_iln_clamp_running_std_is_not_saved_and_the_state_dict_matches_i_ln():
    from iln.models import build_model

    norm = _clamp_norm()
    norm(_images_with_std([1.0]))
    assert "std_ema" in dict(norm.named_buffers())
    assert set(norm.state_dict()) == {"weight", "bias"}
    clamp = build_model("hat_tiny", norm="iln_clamp", scale=2)
    iln = build_model("hat_tiny", norm="iln", scale=2)
    assert set(clamp.state_dict()) == set(iln.state_dict())
    clamp.load_state_dict(iln.state_dict(), strict=True)
    assert clamp.settings.affine_outer is True and clamp.settings.stdnorm is False


def test_iln_clamp_gradient_flows_through_the_unclamped_scale_only():
    norm = _clamp_norm()
    norm(_images_with_std([1.0, 1.0]))
    x = _images_with_std([1.0, 5.0]).requires_grad_(True)
    _, scale = norm(x)
    grad = torch.autograd.grad(scale.sum(), x)[0]
    assert grad[0].abs().sum() > 0  # std of image 0 is below 2 * std_ema
    assert grad[1].abs().sum() == 0  # image 1 is clamped to the constant 2 * std_ema
