"""The fast path's choice of attention kernels: fused SDPA backends only (one-line error where
none takes the call), flex_attention reading the relative position table, the profiler names of
the routes, and TF32 / cuDNN settings through ``iln.util.device``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from benchmarks import gpu
from torch.nn.attention import SDPBackend

from iln.models import build_model, common, fast
from iln.util import device as runtime

F64 = torch.float64


def _operands(mask_grad: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=g, dtype=dtype) for _ in range(3))
    mask = torch.randn(1, 4, 64, 64, generator=g, dtype=dtype).requires_grad_(mask_grad)
    return q, k, v, mask


def test_a_mask_that_needs_its_gradient_and_no_fused_kernel_raise_one_line():
    q, k, v, mask = _operands(mask_grad=True)
    backends = fast.training_sdpa_backends("cpu", mask_needs_grad=True)
    with pytest.raises(fast.AttentionKernelError) as err:
        fast.fused_sdpa(q, k, v, mask, 0.25, backends)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("attention: no fused kernel (flash_attention) takes q (2, 4, 64, 16)")
    shapes = "torch.float32 with a (1, 4, 64, 64) torch.float32 mask that needs its gradient"
    assert shapes in message
    assert "Triggered internally" not in message


def test_fused_sdpa_without_gradients_runs_the_fused_kernel_with_the_references_values():
    q, k, v, mask = _operands(mask_grad=False)
    backends = fast.training_sdpa_backends("cpu", mask_needs_grad=False)
    with torch.profiler.profile() as prof:
        out = fast.fused_sdpa(q, k, v, mask, 0.25, backends)
    assert "sdpa:flash_cpu" in gpu.kernel_names([e.key for e in prof.key_averages()])
    reference = common.attention(q.double(), k.double(), v.double(), mask.double(), 0.25)
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=1e-5)


def test_cuda_training_may_run_only_the_kernels_that_return_the_bias_gradient():
    assert fast.training_sdpa_backends("cuda", mask_needs_grad=True) == (
        SDPBackend.EFFICIENT_ATTENTION,
    )
    assert set(fast.training_sdpa_backends("cuda", mask_needs_grad=False)) == {
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
    }
    for device in ("cpu", "meta"):  # torch's CUDA checks say no off CUDA
        q, k, v, mask = (t.to(device) for t in _operands(mask_grad=False))
        assert not any(fast.qualifies(b, q, k, v, mask) for b in fast.FUSED_CUDA)


def test_meta_training_through_fast_sdpa_keeps_shapes_and_dtypes():
    q, k, v, mask = (t.to("meta") for t in _operands(mask_grad=False, dtype=torch.bfloat16))
    q.requires_grad_(True)
    out = fast.sdpa(q, k, v, mask.requires_grad_(True), 0.25)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.device.type == "meta"


@pytest.mark.parametrize("masked", [False, True])
def test_flex_reading_the_table_equals_the_reference(masked):
    g = torch.Generator().manual_seed(1)
    window, overlap, heads, d, nw = 4, 6, 2, 16, 4
    if masked:  # a shifted window block: q (B, nW, h, n, d), mask (nW, 1, n, n)
        index = common.relative_position_index(window)
        rows, nk = (2 * window - 1) ** 2, window * window
        q = torch.randn(2, nw, heads, window * window, d, generator=g, dtype=F64)
        k, v = (torch.randn(2, nw, heads, nk, d, generator=g, dtype=F64) for _ in range(2))
        regions = torch.randint(0, 3, (nw, 1, nk), generator=g)
        mask = torch.where(regions.unsqueeze(-1) != regions.unsqueeze(-2), -100.0, 0.0)
        mask = mask.to(F64)
    else:  # OCAB: larger key windows, an index with negative entries that wrap
        index = common.relative_position_index_overlap(window, overlap)
        assert (index < 0).any()
        rows, nk = (window + overlap - 1) ** 2, overlap * overlap
        q = torch.randn(8, heads, window * window, d, generator=g, dtype=F64)
        k, v = (torch.randn(8, heads, nk, d, generator=g, dtype=F64) for _ in range(2))
        mask = None
    table = torch.randn(rows, heads, generator=g, dtype=F64)
    out = fast.flex_table_attention(q, k, v, table, index, 0.3, mask, compile_flex=False)
    reference = common.attention(q, k, v, common.gather_bias(table, index), 0.3, mask)
    torch.testing.assert_close(out, reference)


def test_a_flex_model_computes_the_reference_model_and_names_its_route():
    gen = torch.Generator().manual_seed(2)
    reference = build_model("hat_tiny", norm="iln", scale=2, fast=False, generator=gen).eval()
    flex = build_model("hat_tiny", norm="iln", scale=2, attention="flex").eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(generator=gen)
        flex.load_state_dict(reference.state_dict())
        x = torch.rand(1, 3, 16, 16, generator=gen)
        with torch.profiler.profile() as prof:
            out = flex(x)
        torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=1e-5)
    assert gpu.kernel_names([e.key for e in prof.key_averages()]) == "route:flex_eager"


def test_the_routes_of_the_cpu_kernels_are_named_in_a_profile():
    model = build_model("hat_tiny", norm="iln", scale=2, generator=torch.Generator())
    x = torch.rand(1, 3, 8, 8)
    kernels = gpu.profiled_kernels(lambda: model(x).sum().backward(), torch.device("cpu"))
    assert kernels == "route:materialized"  # 8 x 8 windows: below WINDOWED_MIN_LOGITS
    with torch.no_grad():
        kernels = gpu.profiled_kernels(lambda: model(x), torch.device("cpu"))
    assert kernels == "route:sdpa, sdpa:flash_cpu"


def test_tf32_through_the_current_api_round_trips_and_is_recorded():
    saved = runtime.fp32_precision()
    try:
        runtime.set_fp32_precision(True)
        assert runtime.fp32_precision()["matmul"] == "tf32"
        assert runtime.fp32_precision()["conv"] == "tf32"
        runtime.set_fp32_precision(False)
        state = runtime.fp32_precision()
        assert state["matmul"] == state["conv"] == "ieee"
        new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision")
        assert state["api"] == ("fp32_precision" if new_api else "allow_tf32")
        assert runtime.use_tf32(torch.device("cpu"), True) is False  # no TF32 on the CPU
        assert runtime.fp32_precision()["matmul"] == "ieee"
    finally:
        runtime.set_fp32_precision(saved["matmul"] == "tf32")
    assert runtime.use_cudnn_benchmark(torch.device("cpu"), fixed_shapes=True) is False
    assert torch.backends.cudnn.benchmark is False


def test_inference_without_a_fused_kernel_is_allowed():
    """Off CUDA ``fast.sdpa`` dispatches as torch does: the values of F.sdpa."""
    q, k, v, mask = _operands(mask_grad=False)
    with torch.no_grad():
        out = fast.sdpa(q, k, v, mask, 0.25)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
    )
