"""Reduced-precision inference: overflow detection, int8/int4 simulation, no side effects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iln.evaluation.inference import restore
from iln.models.restorer import WindowedRestorer
from iln.evaluation.precision import (
    FP16_MAX,
    INT4_MAX,
    INT8_MAX,
    FeatureMonitor,
    attach_activation_quant,
    evaluate_precisions,
    fake_quant_symmetric,
    prepare_model,
    quantise_weights_,
)


class _Gain(nn.Module):
    """A residual group whose output is ``gain`` times larger than its input (B, N, C)."""

    def __init__(self, dim: int, gain: float) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        return self.gain * (x + 0.1 * self.fc(x))


class FakeNormSR(nn.Module):
    """Tiny model with the contract's shape: groups on (B, N, C), a final LayerNorm, x2.

    With ``gain`` = 100 and 3 groups the residual stream reaches ~1e6 (an LN-trained
    model's regime): fine in fp32 because the final LayerNorm rescales it, inf in fp16.
    """

    in_chans = 3
    residual_groups = WindowedRestorer.residual_groups  # the restorer's own accessors
    group_blocks = WindowedRestorer.group_blocks

    def __init__(
        self, gain: float, *, fail_in_half: bool = False, dim: int = 8, seed: int = 0
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.scale, self.window_size, self.embed_dim = 2, 4, dim
        self.fail_in_half = fail_in_half
        self.conv_first = nn.Conv2d(3, dim, 3, padding=1)
        self.layers = nn.ModuleList([_Gain(dim, gain) for _ in range(3)])
        self.norm = nn.LayerNorm(dim)
        self.conv_last = nn.Conv2d(dim, 3 * 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        if self.fail_in_half and x.dtype == torch.float16:
            raise RuntimeError("\"fake_op\" not implemented for 'Half'")
        b, _, h, w = x.shape
        f = self.conv_first(x).flatten(2).transpose(1, 2)  # (B, N, C)
        for layer in self.layers:
            f = layer(f)
        f = self.norm(f).transpose(1, 2).reshape(b, self.embed_dim, h, w)
        res = F.pixel_shuffle(self.conv_last(f), 2)  # (B, 3, 2H, 2W)
        return F.interpolate(x, scale_factor=2, mode="nearest") + 0.05 * res


def _pairs(n=2):
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        lq = rng.integers(30, 220, (12, 16, 3), dtype=np.uint8)
        gt = np.repeat(np.repeat(lq, 2, 0), 2, 1)
        out.append((f"im{k}", lq, gt))
    return out


def test_ln_like_model_overflows_in_fp16_only():
    model = FakeNormSR(gain=100.0)
    res = evaluate_precisions(
        model, _pairs(), scale=2, device="cpu", modes=("fp32", "fp16"), progress=False
    )
    fp32, fp16 = res["fp32"], res["fp16"]
    assert fp32["overflow"] is False and fp32["unsupported"] is None
    assert fp32["max_abs_feature"] > FP16_MAX and fp32["exceeds_fp16_range"] is True
    assert fp16["overflow"] is True and fp16["output_nonfinite"] is True
    assert fp16["max_abs_feature"] == math.inf
    assert fp16["psnr"] < fp32["psnr"] - 10
    assert fp32["count"] == fp16["count"] == 2


def test_iln_like_model_is_unchanged_in_low_precision():
    model = FakeNormSR(gain=1.0)
    res = evaluate_precisions(model, _pairs(), scale=2, device="cpu", progress=False)
    assert set(res) == {"fp32", "fp16", "bf16", "int8", "int4"}
    for mode, row in res.items():
        assert row["overflow"] is False, mode
        assert row["unsupported"] is None, mode
        assert row["max_abs_feature"] < 100, mode
        assert 0 < row["ssim"] <= 1, mode
        if mode != "int4":  # 15 levels per tensor cost real accuracy even at unit scale
            assert abs(row["psnr"] - res["fp32"]["psnr"]) < 1.0, mode
    assert res["fp32"]["exceeds_fp16_range"] is False


def test_caller_model_untouched_and_hooks_removed():
    model = FakeNormSR(gain=100.0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate_precisions(model, _pairs(1), scale=2, device="cpu", progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in before)
    assert model.training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_unsupported_format_is_reported_not_raised():
    model = FakeNormSR(gain=1.0, fail_in_half=True)
    res = evaluate_precisions(
        model, _pairs(), scale=2, device="cpu", modes=("fp32", "fp16", "bf16"), progress=False
    )
    assert "not implemented for 'Half'" in res["fp16"]["unsupported"]
    assert res["fp16"]["psnr"] is None and res["fp16"]["count"] == 0
    assert res["bf16"]["unsupported"] is None and res["bf16"]["count"] == 2
    assert res["fp32"]["psnr"] is not None


def test_bad_arguments():
    model = FakeNormSR(gain=1.0)
    with pytest.raises(ValueError, match="'fp8'"):
        evaluate_precisions(
            model, _pairs(1), scale=2, device="cpu", modes=("fp32", "fp8"), progress=False
        )
    with pytest.raises(ValueError, match="model.scale=2"):
        evaluate_precisions(model, _pairs(1), scale=4, device="cpu", progress=False)
    with pytest.raises(AttributeError, match="residual_groups"):
        FeatureMonitor(nn.Linear(2, 2))


def test_feature_monitor_records_group_outputs():
    model = FakeNormSR(gain=10.0)
    lq = _pairs(1)[0][1]
    seen = []
    with FeatureMonitor(model) as mon:
        handle = model.layers[2].register_forward_hook(
            lambda m, i, o: seen.append(o.abs().max().item())
        )
        restore(model, lq, device="cpu")
        handle.remove()
    assert mon.max_abs_feature == pytest.approx(seen[0]) and not mon.overflow
    assert not model.layers[0]._forward_hooks and not model._forward_hooks


def test_weight_fake_quant_per_output_channel():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3)
    with torch.no_grad():
        conv.weight[1] *= 100  # a channel with a much larger range keeps its own scale
        conv.weight[2] = 0
    w = conv.weight.detach().clone()
    assert quantise_weights_(conv) == 1
    q = conv.weight.detach()
    for o in range(5):
        step = w[o].abs().max() / 127
        if step == 0:
            assert (q[o] == 0).all()
            continue
        levels = q[o] / step
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert (q[o] - w[o]).abs().max() <= step / 2 + 1e-6
        assert q[o].abs().max() == pytest.approx(w[o].abs().max().item(), rel=1e-6)


def test_activation_fake_quant_is_dynamic_per_tensor():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    handles = attach_activation_quant(lin)
    for scale in (1.0, 1e4):
        x = torch.randn(2, 10, 6) * scale
        s = x.abs().max() / 127
        expected = F.linear(fake_quant_symmetric(x, s), lin.weight, lin.bias)
        assert torch.allclose(lin(x), expected)
        assert not torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), rtol=0, atol=1e-7)
    for h in handles:
        h.remove()


def test_prepare_model_formats():
    model = FakeNormSR(gain=1.0)
    assert prepare_model(model, "fp16", "cpu").conv_first.weight.dtype == torch.float16
    assert prepare_model(model, "bf16", "cpu").norm.weight.dtype == torch.bfloat16
    q = prepare_model(model, "int8", "cpu")
    assert q.conv_first.weight.dtype == torch.float32 and q.conv_first._forward_pre_hooks
    assert not torch.equal(q.conv_first.weight, model.conv_first.weight)
    assert (
        model.conv_first.weight.dtype == torch.float32 and not model.conv_first._forward_pre_hooks
    )


def test_crop_border_defaults_to_scale():
    model = FakeNormSR(gain=1.0)
    pairs = _pairs(1)
    default = evaluate_precisions(
        model, pairs, scale=2, device="cpu", modes=("fp32",), progress=False
    )["fp32"]
    explicit = evaluate_precisions(
        model, pairs, scale=2, device="cpu", modes=("fp32",), crop_border=2, progress=False
    )["fp32"]
    none = evaluate_precisions(
        model, pairs, scale=2, device="cpu", modes=("fp32",), crop_border=0, progress=False
    )["fp32"]
    assert default["psnr"] == explicit["psnr"] != none["psnr"]


def test_hat_tiny_low_precision_runs():
    from iln.models import build_model

    torch.manual_seed(0)
    model = build_model("hat_tiny", norm="ln", scale=2)
    rng = np.random.default_rng(1)
    lq = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pairs = [("x", lq, np.repeat(np.repeat(lq, 2, 0), 2, 1))]
    res = evaluate_precisions(
        model, pairs, scale=2, device="cpu", modes=("fp32", "fp16", "int8"), progress=False
    )
    for mode in ("fp32", "fp16", "int8"):
        assert res[mode]["unsupported"] is None and res[mode]["overflow"] is False, mode
        assert 0 < res[mode]["max_abs_feature"] < FP16_MAX, mode
    # An untrained model's features are small: half precision changes the image little.
    assert abs(res["fp16"]["psnr"] - res["fp32"]["psnr"]) < 0.5


def test_int4_weights_use_seven_levels_per_output_channel():
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    w = lin.weight.detach().clone()
    assert quantise_weights_(lin, INT4_MAX) == 1
    q = lin.weight.detach()
    for o in range(4):
        step = w[o].abs().max() / 7
        levels = q[o] / step
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        assert set(levels.round().int().tolist()) <= set(range(-7, 8))
        assert (q[o] - w[o]).abs().max() <= step / 2 + 1e-6


def test_int4_activation_quantisation_is_coarser_than_int8():
    torch.manual_seed(0)
    x = torch.randn(2, 50, 6)
    errors = {}
    for qmax in (INT8_MAX, INT4_MAX):
        torch.manual_seed(1)
        ref = nn.Linear(6, 6)
        lin = nn.Linear(6, 6)
        lin.load_state_dict(ref.state_dict())
        handles = attach_activation_quant(lin, qmax)
        with torch.no_grad():
            errors[qmax] = float((lin(x) - ref(x)).abs().max())
        for h in handles:
            h.remove()
    assert 0 < errors[INT8_MAX] < errors[INT4_MAX]


def test_hat_tiny_int4_is_finite_and_worse_than_int8():
    from iln.models import build_model

    torch.manual_seed(0)
    model = build_model("hat_tiny", norm="ln", scale=2)
    lq = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref = model.eval()(lq)
        out = {mode: prepare_model(model, mode, "cpu")(lq) for mode in ("int8", "int4")}
    assert torch.isfinite(out["int4"]).all()
    err8 = float((out["int8"] - ref).abs().mean())
    err4 = float((out["int4"] - ref).abs().mean())
    assert 0 < err8 < err4
