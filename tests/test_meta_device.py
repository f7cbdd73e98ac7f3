"""The CUDA code paths, exercised on torch's ``meta`` device: it takes the non-CPU branches
of ``fast.py`` and follows CUDA's dtype rules (fp32 layer-norm statistics for fp16 / bf16
input), so dtype and shape mistakes of the GPU path show here without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from iln.evaluation import precision
from iln.models import build_model

META = torch.device("meta")
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def test_meta_layer_norm_statistics_follow_cuda_rules():
    """What the fix below guards against: fp32 statistics for half input off the CPU."""
    x = torch.empty(2, 4, 8, device=META, dtype=torch.float16)
    _, _, rstd = torch.native_layer_norm(x, [4, 8], None, None, 1e-4)
    assert rstd.dtype == torch.float32
    _, _, rstd_cpu = torch.native_layer_norm(torch.ones(2, 4, 8).half(), [4, 8], None, None, 1e-4)
    assert rstd_cpu.dtype == torch.float16


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("norm", ["ln", "iln", "ln_star", "ln_rs"])
@pytest.mark.parametrize("arch", ["hat_1", "swinir_1"])
def test_half_precision_inference_keeps_the_model_dtype(arch, norm, fast):
    base = build_model(arch, norm=norm, scale=2, fast=fast, generator=torch.Generator())
    for name, dtype in HALF.items():
        model = copy.deepcopy(base).to(device=META, dtype=dtype).eval()
        x = torch.empty(1, 3, 24, 20, device=META, dtype=dtype)  # padded to the window inside
        with torch.no_grad():
            y = model(x)
        assert y.dtype == dtype, f"{arch} {norm} {name}: output {y.dtype}"
        assert y.shape == (1, 3, 48, 40)


@pytest.mark.parametrize("norm", ["iln", "ln_rs"])
def test_precision_formats_run_on_a_cuda_like_device(norm):
    """``precision.prepare_model`` (Table 4's fp16 / bf16 rows and ``iln restore
    --precision``) on the meta device: the whole forward stays in the format."""
    base = build_model("hat_tiny", norm=norm, scale=2, generator=torch.Generator())
    for mode, dtype in {**HALF, "fp32": torch.float32}.items():
        model = precision.prepare_model(base, mode, META)
        assert next(model.parameters()).dtype == dtype
        with torch.no_grad():
            y = model(torch.empty(1, 3, 16, 16, device=META, dtype=dtype))
        assert y.dtype == dtype


@pytest.mark.parametrize("norm", ["iln", "ln_rs"])
def test_half_precision_training_step_keeps_the_model_dtype(norm):
    model = build_model("hat_tiny", norm=norm, scale=2, generator=torch.Generator())
    model = model.to(device=META, dtype=torch.bfloat16).train()
    y = model(torch.empty(2, 3, 16, 16, device=META, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    table = model.layers[0].residual_group.blocks[0].attn.relative_position_bias_table
    assert table.grad is not None and table.grad.dtype == torch.bfloat16
