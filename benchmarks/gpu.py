"""What only a GPU can settle, measured in one run of at most 8 minutes on one GPU.

Usage (from the repository root)::

    PYTHONPATH=src python -m benchmarks.gpu --out DIR [--official CHECKOUT] [--smoke]

Writes ``DIR/gpu.json`` and ``DIR/gpu.md`` (the same rows as markdown tables). Sections:

- ``device``: the machine, torch, CUDA, the date;
- ``train_step``: seconds per training step (forward, L1, backward, Adam) and the peak of
  allocated device memory, by arch, norm, precision (fp32 with TF32 off, tf32, bf16 / fp16
  autocast), attention implementation (``fast.ATTENTION_IMPLS``), fast or reference path,
  eager or ``torch.compile``, batch and LR patch;
- ``inference``: whole-image ``hat_1`` / ``hat`` / ``swinir_1`` at 256 x 256 LR in fp32,
  bf16 and fp16 (the model cast, as ``iln restore --precision`` does);
- ``attention_check``: each attention implementation against the reference on the device
  (output and relative-position-bias gradient, float32 with TF32 off, against float64);
- ``sdpa_backends``: which ``scaled_dot_product_attention`` backend runs for the fast
  path's call (float mask whose gradient is needed) per head dim and dtype, and what each
  backend does when forced with ``torch.nn.attention.sdpa_kernel``;
- ``norm_kernel``: the i-LN norm (fast and reference) against ``F.layer_norm`` (per token);
- ``loader``: training-loader batches per second (SR pairs, DN degraded on the fly) against
  the step time;
- ``fp16_overflow``: the largest residual-stream feature of an LN (and i-LN) model whose
  patch-embed norm's affine is scaled up, in fp32, and whether fp16 inference overflows;
- ``official``: with ``--official``, the authors' HAT training step beside ours.

Every section has a time budget; a row that is not run says why (device, budget, error).
``--smoke`` runs a tiny version of every row on the CPU (tiny shapes, ``torch.compile`` with
the ``aot_eager`` backend) in about a minute on two cores; it is part of the test suite.
The script imports neither mlflow nor dvc (the GPU machines have neither).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.timing import (
    ADAM_BETAS,
    ADAM_LR,
    Timing,
    synchronizer,
    time_callable,
    time_interleaved,
    train_step,
)
from iln.evaluation import precision
from iln.util.files import write_json_atomic, write_text_atomic
from iln.models import build_model, common, fast, norms
from iln.training.loop import adam

SCALE = 2  # every model here is x2 SR


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one run (``FULL`` on a GPU, ``SMOKE`` on the CPU)."""

    train_arch: str
    train_precision: str  # of the rows that vary something else
    train_batch: int
    train_patch: int
    big_archs: tuple[str, ...]  # other archs with one train row each
    big_batch: int
    step_repeats: int
    infer_archs: tuple[str, ...]
    infer_precisions: tuple[str, ...]  # the others are listed with the reason
    infer_size: int
    repeats: int  # timed calls of the inference, attention, SDPA and norm rows
    compiled_overrides: dict[str, Any]  # network overrides of the compiled train rows
    attn_shape: tuple[int, int, int, int]  # (batch, window positions, heads, window side)
    attn_head_dims: tuple[int, ...]
    norm_shape: tuple[int, int, int]  # (B, N, C)
    loader_images: tuple[tuple[int, int], tuple[int, int]]  # (count, side) of SR, of DN
    loader_batch: int
    loader_patch: int
    loader_workers: tuple[int, ...]
    loader_batches: int
    overflow_arch: str
    overflow_size: int
    compile_backend: str
    budgets_s: dict[str, float]
    total_budget_s: float


FULL = Plan(
    train_arch="hat_1",
    train_precision="tf32",
    train_batch=16,
    train_patch=64,
    big_archs=("hat", "swinir_1"),
    big_batch=8,
    step_repeats=5,
    infer_archs=("hat_1", "hat", "swinir_1"),
    infer_precisions=("fp32", "bf16", "fp16"),
    infer_size=256,
    repeats=3,
    compiled_overrides={},
    attn_shape=(16, 16, 6, 16),
    attn_head_dims=(16, 30, 32),
    norm_shape=(16, 4096, 96),
    loader_images=((24, 480), (6, 2040)),
    loader_batch=16,
    loader_patch=64,
    loader_workers=(0, 4, 8),
    loader_batches=8,
    overflow_arch="hat_1",
    overflow_size=64,
    compile_backend="inductor",
    budgets_s=dict(
        attention_check=20,
        sdpa_backends=25,
        norm_kernel=15,
        train_step=200,
        inference=45,
        loader=45,
        fp16_overflow=15,
        official=60,
    ),
    total_budget_s=450,
)
SMOKE = Plan(
    train_arch="hat_tiny",
    train_precision="fp32",
    train_batch=1,
    train_patch=8,
    big_archs=("swinir_tiny",),
    big_batch=2,
    step_repeats=2,
    infer_archs=("hat_1", "hat", "swinir_1"),
    infer_precisions=("fp32",),
    infer_size=16,
    repeats=1,
    compiled_overrides={"depths": [2]},  # one group: tracing every block costs a minute
    attn_shape=(2, 4, 2, 4),
    attn_head_dims=(16, 30),
    norm_shape=(2, 256, 32),
    loader_images=((2, 96), (2, 128)),
    loader_batch=2,
    loader_patch=16,
    loader_workers=(0, 2),
    loader_batches=3,
    overflow_arch="hat_tiny",
    overflow_size=16,
    compile_backend="aot_eager",
    budgets_s=dict.fromkeys(FULL.budgets_s, math.inf),  # every row runs; the test times the run
    total_budget_s=math.inf,
)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLEX_CPU = "flex_attention has no backward on the CPU"
# A compiled row starts only with this much of its budget left: a first inductor compile of
# hat_1, forward and backward, cannot be stopped once begun.
COMPILED_MIN_LEFT_S = 120


class Budget:
    """Seconds left to a section and to the whole run; ``reason`` says why a row is not run."""

    def __init__(self, total_s: float) -> None:
        self.start = time.perf_counter()
        self.total_s = total_s
        self.section = ""
        self.section_start = self.start
        self.section_s = 0.0

    def enter(self, name: str, seconds: float) -> None:
        self.section, self.section_start, self.section_s = name, time.perf_counter(), seconds

    def reason(self, need_s: float = 0.0) -> str | None:
        now = time.perf_counter()
        if self.section_s - (now - self.section_start) <= need_s:
            return f"not run: the {self.section} budget of {self.section_s:g} s was spent"
        if self.total_s - (now - self.start) <= need_s:
            return f"not run: the run's budget of {self.total_s:g} s was spent"
        return None


def _error(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:300]


def _guarded(row: dict[str, Any], budget: Budget, run: Callable[[], dict[str, Any]], need_s=0.0):
    """``row`` updated with what ``run`` measured, or with why it did not run."""
    skip = budget.reason(need_s)
    if skip is not None:
        return {**row, "status": "not_run", "reason": skip}
    try:
        return {**row, "status": "ok", **run()}
    except Exception as err:  # one failing row (OOM, a compiler error) must not end the run
        return {**row, "status": "error", "reason": _error(err)}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on or off for the block (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class _Memory:
    """Peak allocated device memory of a block (None off CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.max_memory_allocated(self.device))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _time(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int) -> Timing:
    """``timing.time_callable`` with the garbage collector run once, not before every call
    (a collection costs more than many of the calls timed here)."""
    sync = synchronizer(device)
    return time_callable(fn, repeats=repeats, warmup=warmup, sync=sync, gc_every_round=False)


# ----------------------------------------------------------------------------- device


def device_info(device: torch.device, smoke: bool) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    info = {
        "device": str(device),
        "name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "smoke": smoke,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["memory_bytes"] = int(props.total_memory)
        info["capability"] = f"{props.major}.{props.minor}"
    return info


# ----------------------------------------------------------------------------- train_step


def train_step_specs(plan: Plan) -> list[dict[str, Any]]:
    """The train rows, most telling first (later ones are the first to fall to the budget)."""
    base = dict(
        arch=plan.train_arch,
        norm="iln",
        precision=plan.train_precision,
        attention="auto",
        path="fast",
        mode="eager",
        batch=plan.train_batch,
        lr_patch=plan.train_patch,
        grad_checkpoint=False,
    )
    specs = [dict(base, norm=n, precision=p) for n in ("iln", "ln") for p in PRECISIONS]
    specs += [dict(base, attention=a) for a in ("sdpa", "materialized", "flex")]
    specs.append(dict(base, path="reference"))
    specs += [dict(base, arch=a, precision="bf16", batch=plan.big_batch) for a in plan.big_archs]
    # train.grad_checkpoint: the memory it saves and the time it costs (issue: full HAT)
    specs += [
        dict(base, arch=a, precision="fp32", batch=plan.big_batch, grad_checkpoint=c)
        for a in plan.big_archs
        for c in (False, True)
    ]
    compiled = dict(base, precision="bf16", mode="compiled")
    if plan.compiled_overrides:
        compiled["overrides"] = plan.compiled_overrides
    specs += [dict(compiled, attention=a) for a in ("auto", "flex")]
    return specs


def _train_step(spec: dict[str, Any], plan: Plan, device: torch.device) -> dict[str, Any]:
    if spec["precision"] == "tf32" and device.type != "cuda":
        raise NotImplementedError(f"tf32 is a CUDA matmul mode; {device.type} has none")
    if spec["attention"] == "flex" and device.type == "cpu":
        raise NotImplementedError(FLEX_CPU)
    model = build_model(
        spec["arch"],
        norm=spec["norm"],
        scale=SCALE,
        fast=spec["path"] == "fast",
        attention=spec["attention"],
        generator=_gen(0),
        **spec.get("overrides", {}),
    ).to(device)
    model.train()
    optimizer = adam(list(model.parameters()), lr=ADAM_LR, betas=ADAM_BETAS)
    gen = torch.Generator(device).manual_seed(1)
    b, p = spec["batch"], spec["lr_patch"]
    lq = torch.rand(b, 3, p, p, generator=gen, device=device)
    gt = torch.rand(b, 3, SCALE * p, SCALE * p, generator=gen, device=device)
    noise = torch.rand(b, model.drop_sites, generator=gen, device=device)  # stochastic depth
    compiled = spec["mode"] == "compiled"
    forward = torch.compile(model, backend=plan.compile_backend) if compiled else model
    autocast_dtype = AUTOCAST.get(spec["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=spec["precision"] == "fp16")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = forward(lq, drop_noise=noise, checkpoint=spec["grad_checkpoint"])
            loss = F.l1_loss(out, gt)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    sync = synchronizer(device)
    memory = _Memory(device)
    with _tf32(spec["precision"] == "tf32"):
        start = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - start
        memory.reset()
        timing = _time(step, device, repeats=plan.step_repeats, warmup=1)
    row = {
        "seconds": timing.median_s,
        "seconds_min": timing.min_s,
        "first_step_seconds": first,
        "peak_memory_bytes": memory.peak(),
        "repeats": timing.repeats,
    }
    if compiled:
        row["compile_backend"] = plan.compile_backend
    return row


def run_train_steps(plan: Plan, device: torch.device, budget: Budget) -> list[dict[str, Any]]:
    rows = []
    for spec in train_step_specs(plan):
        need = COMPILED_MIN_LEFT_S if spec["mode"] == "compiled" and device.type == "cuda" else 0
        rows.append(_guarded(spec, budget, lambda s=spec: _train_step(s, plan, device), need))
    return rows


# ----------------------------------------------------------------------------- inference


def _inference(
    base: nn.Module, dtype_name: str, plan: Plan, device: torch.device
) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    model = copy.deepcopy(base).to(device=device, dtype=dtype).eval()
    s = plan.infer_size
    x = torch.rand(1, 3, s, s, generator=_gen(2)).to(device=device, dtype=dtype)
    memory = _Memory(device)

    def forward() -> None:
        with torch.no_grad():
            y = model(x)
        if y.dtype != dtype:
            raise AssertionError(f"output is {y.dtype}, the model {dtype}")

    with _tf32(False):
        forward()
        memory.reset()
        timing = _time(forward, device, repeats=plan.repeats, warmup=0)
    return {"seconds": timing.median_s, "peak_memory_bytes": memory.peak()}


def run_inference(plan: Plan, device: torch.device, budget: Budget) -> list[dict[str, Any]]:
    rows = []
    for arch in plan.infer_archs:
        base = build_model(arch, norm="iln", scale=SCALE, generator=_gen(0))
        for dtype_name in DTYPES:
            row = dict(arch=arch, norm="iln", precision=dtype_name, lr_size=plan.infer_size)
            if dtype_name not in plan.infer_precisions:
                reason = "not run: half precision on the CPU takes minutes (dtypes: meta tests)"
                rows.append({**row, "status": "not_run", "reason": reason})
                continue
            rows.append(
                _guarded(row, budget, lambda m=base, d=dtype_name: _inference(m, d, plan, device))
            )
    return rows


# ----------------------------------------------------------------------------- attention


def _attention_operands(plan: Plan, d: int, dtype: torch.dtype, device: torch.device):
    b, nw, h, w = plan.attn_shape
    n = w * w
    gen = _gen(3)
    q, k, v = (torch.randn(b, nw, h, n, d, generator=gen, dtype=dtype) for _ in range(3))
    bias = 0.5 * torch.randn(h, n, n, generator=gen, dtype=dtype)
    regions = torch.randint(0, 3, (nw, 1, n), generator=gen)
    mask = torch.where(regions.unsqueeze(-1) != regions.unsqueeze(-2), common.MASK_VALUE, 0.0)
    return [t.to(device) for t in (q, k, v, bias)], mask.to(device=device, dtype=dtype)


def _attention_check(impl: str, compiled: bool, plan: Plan, device: torch.device):
    if impl == "flex" and device.type == "cpu":
        raise NotImplementedError(FLEX_CPU)
    d = plan.attn_head_dims[0]
    (q, k, v, bias), mask = _attention_operands(plan, d, torch.float64, device)
    scale = d**-0.5
    ref_inputs = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    ref = common.attention(*ref_inputs, scale, mask)
    cotangent = torch.randn(ref.shape, generator=_gen(4), dtype=ref.dtype).to(device)
    ref_grads = torch.autograd.grad(ref, ref_inputs, cotangent)
    inputs = [t.float().requires_grad_(True) for t in (q, k, v, bias)]

    def attend(q, k, v, bias, mask):
        return fast.attention(q, k, v, bias, scale, mask, impl=impl)

    fn = torch.compile(attend, backend=plan.compile_backend) if compiled else attend
    with _tf32(False):
        out = fn(*inputs, mask.float())
        grads = torch.autograd.grad(out, inputs, cotangent.float())
    return {
        "max_error_output": float((out.detach().double() - ref.detach()).abs().max()),
        "max_error_bias_grad": float((grads[3].double() - ref_grads[3]).abs().max()),
        "max_error_q_grad": float((grads[0].double() - ref_grads[0]).abs().max()),
    }


def run_attention_checks(plan: Plan, device: torch.device, budget: Budget):
    rows = []
    impls = (("sdpa", False), ("materialized", False), ("flex", True), ("auto", False))
    for impl, compiled in impls:
        row = dict(
            attention=impl,
            mode="compiled" if compiled else "eager",
            dtype="fp32 (TF32 off) vs fp64 reference",
            head_dim=plan.attn_head_dims[0],
        )
        if compiled:
            row["compile_backend"] = plan.compile_backend
        rows.append(
            _guarded(row, budget, lambda i=impl, c=compiled: _attention_check(i, c, plan, device))
        )
    return rows


SDPA_OPS = {  # the aten op each backend runs, as the profiler names it
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def _sdpa_call(q, k, v, table, scale):
    """The fast path's call shape: a float mask (bias + shift mask) that needs a gradient."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=table, scale=scale)
    out.sum().backward()


def _sdpa_backend(d: int, dtype: torch.dtype, backend: str, plan: Plan, device: torch.device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    (q, k, v, bias), mask = _attention_operands(plan, d, dtype, device)
    q4, k4, v4 = (t.flatten(1, 2).requires_grad_(True) for t in (q, k, v))  # (B, nW*h, n, d)
    table = (bias + mask).flatten(0, 1).unsqueeze(0).requires_grad_(True)  # (1, nW*h, n, n)

    def call() -> None:
        _sdpa_call(q4, k4, v4, table, d**-0.5)

    if backend == "default":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call()
        ran = sorted({SDPA_OPS[e.key] for e in prof.key_averages() if e.key in SDPA_OPS})
        timing = _time(call, device, repeats=plan.repeats, warmup=1)
        return {"ran": ", ".join(ran) or "none of the fused ops", "seconds": timing.median_s}
    with sdpa_kernel(getattr(SDPBackend, backend)):
        timing = _time(call, device, repeats=plan.repeats, warmup=1)
    return {"ran": backend.lower(), "seconds": timing.median_s}


def run_sdpa_backends(plan: Plan, device: torch.device, budget: Budget):
    rows = []
    backends = ("default", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    for d in plan.attn_head_dims:
        for dtype_name, dtype in DTYPES.items():
            for backend in backends:
                row = dict(
                    head_dim=d, dtype=dtype_name, backend=backend, shape=list(plan.attn_shape)
                )
                rows.append(
                    _guarded(
                        row,
                        budget,
                        lambda d=d, t=dtype, b=backend: _sdpa_backend(d, t, b, plan, device),
                    )
                )
    return rows


# ----------------------------------------------------------------------------- norms


def _norm_kernel(kind: str, dtype: torch.dtype, plan: Plan, device: torch.device):
    b, n, c = plan.norm_shape
    x = torch.randn(b, n, c, generator=_gen(5)).to(device=device, dtype=dtype).requires_grad_(True)
    if kind == "layer_norm":
        layer = nn.LayerNorm(c, eps=1e-5).to(device=device, dtype=dtype)

        def run() -> None:
            layer(x).sum().backward()
    else:
        norm = norms.build_norm("iln", c, fast=kind == "iln_fast").to(device=device, dtype=dtype)

        def run() -> None:
            y, std = norm(x)
            (y.sum() + std.sum()).backward()

    timing = _time(run, device, repeats=plan.repeats + 2, warmup=1)
    return {"seconds": timing.median_s}


def run_norm_kernels(plan: Plan, device: torch.device, budget: Budget):
    rows = []
    for dtype_name in ("fp32", "bf16"):
        for kind in ("iln_fast", "iln_reference", "layer_norm"):
            row = dict(kernel=kind, dtype=dtype_name, shape=list(plan.norm_shape), passes="fwd+bwd")
            rows.append(
                _guarded(
                    row,
                    budget,
                    lambda k=kind, t=DTYPES[dtype_name]: _norm_kernel(k, t, plan, device),
                )
            )
    return rows


# ----------------------------------------------------------------------------- loader


def _write_images(folder: Path, count: int, side: int, scale: int | None) -> None:
    """``count`` smooth random RGB images (side x side*3/4) as PNG, and their x``scale``
    bicubic LR twins in ``folder/lq`` when ``scale`` is given."""
    from iln.data.degrade import bicubic_downsample
    from iln.data.io import write_png

    rng = np.random.default_rng(0)
    h, w = (side * 3 // 4) // 4 * 4, side // 4 * 4
    for i in range(count):
        coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
        img = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w] + rng.normal(0, 8, (h, w, 3))
        img = np.clip(img, 0, 255).astype(np.uint8)
        write_png(folder / "gt" / f"{i:04d}.png", img, compress_level=6)
        if scale is not None:
            write_png(folder / "lq" / f"{i:04d}.png", bicubic_downsample(img, scale))


def _loader(kind: str, workers: int, folder: Path, plan: Plan) -> dict[str, Any]:
    from iln.data.dataset import TrainPatches

    if kind == "sr_x2":
        dataset = TrainPatches(
            folder / "gt", folder / "lq", scale=2, lq_patch=plan.loader_patch, seed=0
        )
    else:
        dataset = TrainPatches(
            [folder / "gt"], None, scale=1, lq_patch=plan.loader_patch, seed=0, degradation=kind
        )
    total = (plan.loader_batches + 1) * plan.loader_batch
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=plan.loader_batch, sampler=range(total), num_workers=workers
    )
    batches = iter(loader)
    next(batches)  # worker start-up and the first decodes
    start = time.perf_counter()
    count = sum(1 for _ in batches)
    seconds = time.perf_counter() - start
    return {"batches_per_second": count / seconds, "batches": count}


def run_loader(plan: Plan, budget: Budget, step_seconds: float | None) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        folder = Path(tmp)
        (sr_count, sr_side), (dn_count, dn_side) = plan.loader_images
        _write_images(folder / "sr", sr_count, sr_side, 2)
        _write_images(folder / "dn", dn_count, dn_side, None)
        return _loader_rows(plan, budget, step_seconds, folder)


def _loader_rows(
    plan: Plan, budget: Budget, step_seconds: float | None, folder: Path
) -> list[dict[str, Any]]:
    rows = []
    cores = os.cpu_count() or 1
    for kind, sub in (("sr_x2", "sr"), ("dn_s25", "dn")):
        for workers in plan.loader_workers:
            row = dict(
                task=kind,
                workers=workers,
                batch=plan.loader_batch,
                lr_patch=plan.loader_patch,
                train_step_seconds=step_seconds,
            )
            if workers > cores:
                rows.append({**row, "status": "not_run", "reason": f"only {cores} cores"})
                continue
            result = _guarded(
                row, budget, lambda k=kind, w=workers, s=sub: _loader(k, w, folder / s, plan)
            )
            if result["status"] == "ok" and step_seconds:
                result["keeps_up"] = result["batches_per_second"] * step_seconds >= 1.0
            rows.append(result)
    return rows


# ----------------------------------------------------------------------------- fp16


def _overflow(base: nn.Module, gain: float, plan: Plan, device: torch.device) -> dict[str, Any]:
    model = copy.deepcopy(base).eval()
    with torch.no_grad():  # the stream starts at the patch-embed norm's output (LN or Affine)
        model.patch_embed.norm.weight.mul_(gain)
        model.patch_embed.norm.bias.mul_(gain)
    x = torch.rand(1, 3, plan.overflow_size, plan.overflow_size, generator=_gen(6))
    row: dict[str, Any] = {}
    for mode in ("fp32", "fp16"):
        copy_ = precision.prepare_model(model, mode, device)
        with precision.FeatureMonitor(copy_) as monitor, torch.no_grad(), _tf32(False):
            start = time.perf_counter()
            copy_(x.to(device=device, dtype=DTYPES[mode]))
            synchronizer(device)()
            seconds = time.perf_counter() - start
        row[f"max_abs_feature_{mode}"] = monitor.max_abs_feature
        row[f"overflow_{mode}"] = monitor.overflow
        row[f"output_nonfinite_{mode}"] = monitor.output_nonfinite
        row[f"seconds_{mode}"] = seconds
    row["exceeds_fp16_range"] = row["max_abs_feature_fp32"] > precision.FP16_MAX
    return row


def run_overflow(plan: Plan, device: torch.device, budget: Budget) -> list[dict[str, Any]]:
    rows = []
    for norm in ("ln", "iln"):
        base = build_model(plan.overflow_arch, norm=norm, scale=SCALE, generator=_gen(0))
        for gain in (1.0, 1.0e3, 1.0e5):
            row = dict(
                arch=plan.overflow_arch, norm=norm, embedding_gain=gain, lr_size=plan.overflow_size
            )
            rows.append(_guarded(row, budget, lambda m=base, g=gain: _overflow(m, g, plan, device)))
    return rows


# ----------------------------------------------------------------------------- official


def run_official(
    checkout: Path | None, plan: Plan, device: torch.device, budget: Budget
) -> list[dict[str, Any]]:
    row = dict(arch="hat_1", batch=plan.train_batch, lr_patch=plan.train_patch, precision="fp32")
    if checkout is None:
        return [{**row, "status": "not_run", "reason": "not run: --official CHECKOUT not given"}]
    from benchmarks import vs_official

    def measure(norm: str) -> dict[str, Any]:
        ours, theirs = vs_official.build_pair(
            vs_official.official_classes(checkout), norm, SCALE, 0
        )
        ours, theirs = ours.to(device), theirs.to(device)
        gen = torch.Generator(device).manual_seed(1)
        p, b = plan.train_patch, plan.train_batch
        lq = torch.rand(b, 3, p, p, generator=gen, device=device)
        gt = torch.rand(b, 3, SCALE * p, SCALE * p, generator=gen, device=device)
        with _tf32(False):
            diff = vs_official.max_differences(ours, theirs, lq, gt)
            steps = {
                "ours": train_step(ours, lq, gt),
                "theirs": train_step(theirs, lq, gt),
            }
            timings = time_interleaved(
                steps, repeats=plan.step_repeats, warmup=1, sync=synchronizer(device)
            )
        return {
            "max_abs_output_difference": diff["output"],
            "max_relative_gradient_difference": diff["gradient_relative"],
            "seconds_ours": timings["ours"].median_s,
            "seconds_theirs": timings["theirs"].median_s,
        }

    return [
        _guarded({**row, "norm": norm}, budget, lambda n=norm: measure(n)) for norm in ("ln", "iln")
    ]


# ----------------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    lines = ["# GPU benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in report["device"].items()]
    for section, rows in report.items():
        if section == "device" or not isinstance(rows, list) or not rows:
            continue
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        lines += ["", f"## {section}", ""]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for row in rows:
            lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/")


def run(plan: Plan, device: torch.device, *, smoke: bool, official: Path | None) -> dict[str, Any]:
    budget = Budget(plan.total_budget_s)
    report: dict[str, Any] = {"device": device_info(device, smoke)}

    def step_seconds() -> float | None:  # the main train row, for the loader's keeps_up
        rows = report["train_step"]
        main = [r for r in rows if r["status"] == "ok" and r["norm"] == "iln"]
        main = [r for r in main if r["arch"] == plan.train_arch]
        return main[0]["seconds"] if main else None

    sections: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("train_step", lambda: run_train_steps(plan, device, budget)),
        ("inference", lambda: run_inference(plan, device, budget)),
        ("attention_check", lambda: run_attention_checks(plan, device, budget)),
        ("sdpa_backends", lambda: run_sdpa_backends(plan, device, budget)),
        ("norm_kernel", lambda: run_norm_kernels(plan, device, budget)),
        ("loader", lambda: run_loader(plan, budget, step_seconds())),
        ("fp16_overflow", lambda: run_overflow(plan, device, budget)),
    ]
    section_seconds = report["device"]["section_seconds"] = {}
    for name, section in sections:
        budget.enter(name, plan.budgets_s[name])
        report[name] = section()
        section_seconds[name] = time.perf_counter() - budget.section_start
    budget.enter("official", plan.budgets_s["official"])  # its time is in the run's seconds
    report["official"] = run_official(official, plan, device, budget)
    report["device"]["seconds"] = time.perf_counter() - budget.start
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    p.add_argument("--official", type=Path, help="clone of github.com/2minkyulee/i-LN")
    p.add_argument("--smoke", action="store_true", help="a tiny version of every row on the CPU")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device (use --smoke for the CPU)", file=sys.stderr)
        return 2
    if args.official is not None and not (args.official / "iLN").is_dir():
        print(f"--official {args.official}: not a clone of i-LN (no iLN folder)", file=sys.stderr)
        return 2
    plan = SMOKE if args.smoke else FULL
    if args.smoke:
        torch.set_num_threads(1)
    report = run(plan, device, smoke=args.smoke, official=args.official)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "gpu.json", report)
    write_text_atomic(args.out / "gpu.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
