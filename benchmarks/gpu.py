"""What only a GPU can settle, measured in one run of at most 8 minutes on one GPU.

Usage (from the repository root)::

    PYTHONPATH=src python -m benchmarks.gpu --out DIR [--official CHECKOUT] [--smoke]

Writes ``DIR/gpu.json`` and ``DIR/gpu.md`` (the same rows as markdown tables), both
rewritten atomically after every section, so a run that is killed keeps what it finished.
Sections, in the order they run:

- ``device``: the machine, torch, CUDA, the date, how fp32 matmuls run (TF32 or not, and
  through which torch API), ``cudnn.benchmark``, where the inductor cache is, and
  ``progress`` (sections done, running, left, seconds each);
- ``attention_check``: each attention implementation against the float64 reference;
- ``norm_kernel``: the i-LN norm (fast and reference) against ``F.layer_norm``;
- ``sdpa_backends``: the ``scaled_dot_product_attention`` calls the models really make
  (shapes captured from the models' own calls on ``meta``: padded head dims, the shifted
  windows' mask, OCAB), training (mask that needs its gradient, forward and backward) and
  inference (no grad), fp32 / bf16 / fp16, as torch dispatches them (``default``) and
  restricted to fused kernels as CUDA training runs them (``fused_only``);
- ``fit``: the real training loop (``iln.training.loop.fit``: loader, EMA, AMP, checkpoints) for a
  few dozen steps, interrupted and resumed, against an uninterrupted run;
- ``train_step``: seconds per training step and peak memory by arch, norm, precision,
  attention implementation, fast or reference path, eager or ``torch.compile``;
- ``inference``: whole-image ``hat_1`` / ``hat`` / ``swinir_1`` in fp32, bf16, fp16;
- ``flex``: ``torch.compile(flex_attention)`` reading the relative position table in its
  score_mod, against the SDPA path, on the models' shapes;
- ``loader``: training-loader batches per second against the step time;
- ``fp16_overflow``: whether fp16 inference overflows once the residual stream is large;
- ``official``: with ``--official``, the authors' HAT training step beside ours.

Every row that measured something names the kernel that ran (``kernel``: profiler op
names, ``iln::attention.*`` ranges of ``iln.models.fast``). Every row runs under a hard
time limit (a watchdog); a row that is not run or overran says why (``status`` not_run /
skipped / error and a ``reason``). ``--smoke`` runs a tiny version of every section on the
CPU in well under 4 minutes on two cores; it is part of the test suite. The script imports
neither mlflow, dvc, scikit-image nor matplotlib (the GPU machines have none of them).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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
from iln.models import PRESETS, build_model, common, fast, norms
from iln.training.loop import adam
from iln.util import device as runtime
from iln.util.files import write_json_atomic, write_text_atomic

SCALE = 2  # every model here is x2 SR


@dataclass(frozen=True)
class Plan:
    """Sizes and time limits of one run (``FULL`` on a GPU, ``SMOKE`` on the CPU)."""

    train_arch: str
    train_precision: str  # of the rows that vary something else
    train_batch: int
    train_patch: int
    ln_precisions: tuple[str, ...]  # the LN rows (i-LN has every one of PRECISIONS)
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
    sdpa_archs: tuple[str, ...]  # whose attention calls the sdpa rows replay
    sdpa_dtypes: tuple[str, ...]
    flex_archs: tuple[str, ...]
    flex_dtypes: tuple[str, ...]
    flex_compile: bool  # False: the compiled flex rows say why they did not run
    fit_archs: tuple[str, ...]
    fit_amps: tuple[str, ...]
    fit_steps: int  # the interrupted run stops after fit_steps // 2 and resumes
    fit_batch: dict[str, int]
    fit_patch: int
    norm_shape: tuple[int, int, int]  # (B, N, C)
    loader_images: tuple[tuple[int, int], tuple[int, int]]  # (count, side) of SR, of DN
    loader_batch: int
    loader_patch: int
    loader_workers: tuple[int, ...]
    loader_batches: int
    overflow_arch: str
    overflow_size: int
    compile_backend: str
    budgets_s: dict[str, float]  # per section
    total_budget_s: float
    row_limit_s: float  # hard limit of one row (compiled rows: compiled_row_limit_s)
    compiled_row_limit_s: float
    grace_s: float = 30.0  # past limit + grace a row stuck in native code ends the run
    notes: dict[str, str] = field(default_factory=dict)


SECTIONS = (  # quick ones first: a run killed early keeps them
    "attention_check",
    "norm_kernel",
    "sdpa_backends",
    "fit",
    "train_step",
    "inference",
    "flex",
    "loader",
    "fp16_overflow",
    "official",
)

FULL = Plan(
    train_arch="hat_1",
    train_precision="tf32",
    train_batch=16,
    train_patch=64,
    ln_precisions=("fp32", "tf32", "bf16", "fp16"),
    big_archs=("hat", "swinir_1"),
    big_batch=8,
    step_repeats=5,
    infer_archs=("hat_1", "hat", "swinir_1"),
    infer_precisions=("fp32", "bf16", "fp16"),
    infer_size=256,
    repeats=3,
    compiled_overrides={},
    attn_shape=(16, 16, 6, 16),
    attn_head_dims=(16, 30),
    sdpa_archs=("hat_1", "hat"),  # swinir_1's calls: hat_1's head dim, 8 x 8 windows
    sdpa_dtypes=("fp32", "bf16", "fp16"),
    flex_archs=("hat_1",),
    flex_dtypes=("bf16",),
    flex_compile=True,
    fit_archs=("hat_tiny", "hat_1"),
    fit_amps=("bf16", "fp32"),
    fit_steps=24,
    fit_batch={"hat_tiny": 16, "hat_1": 8},
    fit_patch=64,
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
        sdpa_backends=30,
        norm_kernel=10,
        attention_check=35,
        train_step=130,
        inference=40,
        fit=70,
        flex=55,
        loader=20,
        fp16_overflow=10,
        official=25,
    ),
    total_budget_s=430,
    row_limit_s=30,
    compiled_row_limit_s=90,
)
SMOKE = Plan(
    train_arch="hat_tiny",
    train_precision="fp32",
    train_batch=1,
    train_patch=8,
    ln_precisions=("fp32",),
    big_archs=(),
    big_batch=2,
    step_repeats=1,
    infer_archs=("hat_tiny", "swinir_tiny"),
    infer_precisions=("fp32",),
    infer_size=16,
    repeats=1,
    compiled_overrides={"depths": [1]},  # one block and OCAB: tracing more costs a minute
    attn_shape=(2, 4, 2, 4),
    attn_head_dims=(16, 30),
    sdpa_archs=("hat_tiny", "hat"),
    sdpa_dtypes=("fp32",),
    flex_archs=("hat_tiny",),
    flex_dtypes=("fp32",),
    flex_compile=False,
    fit_archs=("hat_tiny",),
    fit_amps=("fp32",),
    fit_steps=4,
    fit_batch={"hat_tiny": 2},
    fit_patch=16,
    norm_shape=(2, 256, 32),
    loader_images=((2, 96), (2, 128)),
    loader_batch=2,
    loader_patch=16,
    loader_workers=(0, 2),
    loader_batches=3,
    overflow_arch="hat_tiny",
    overflow_size=16,
    compile_backend="aot_eager",
    budgets_s=dict(  # a few seconds each on an idle machine; a crowded one cuts the last rows
        attention_check=20,
        norm_kernel=20,
        sdpa_backends=30,
        fit=40,
        train_step=70,
        inference=25,
        flex=25,
        loader=15,
        fp16_overflow=15,
        official=5,
    ),
    total_budget_s=190,  # the run ends within 4 minutes even on a crowded machine
    row_limit_s=60,
    compiled_row_limit_s=90,
    grace_s=10.0,
    notes={
        "flex_compile": "not run: torch.compile(flex_attention) on the CPU builds C++ "
        "kernels (96 s for one shape on the shared two-core machine), beyond the smoke run"
    },
)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLEX_CPU = "flex_attention has no backward on the CPU"
NO_KERNEL = "no device kernel (host-side work)"


# ----------------------------------------------------------------------------- limits


class Unavailable(Exception):
    """The device lacks what a row measures (TF32 on the CPU, flex backward on the CPU)."""


class RowTimeout(BaseException):
    """Raised in the main thread when a row passes its hard time limit (a BaseException,
    so that no ``except Exception`` on the way, torch.compile's included, swallows it)."""


class Watchdog:
    """Hard time limits of rows. ``limit(seconds)`` arms SIGALRM, whose handler raises
    ``RowTimeout`` in the running Python code. A row stuck in native code for ``grace_s``
    longer (the signal waits for it to return) is ended by a thread that records it as
    skipped, writes the report (``on_stuck``) and exits the process with status 3."""

    def __init__(self, grace_s: float, on_stuck: Callable[[str], None]) -> None:
        self.grace_s, self.on_stuck = grace_s, on_stuck
        self.fired = False
        self._deadline: float | None = None
        self._label = ""
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    @contextlib.contextmanager
    def limit(self, seconds: float, label: str) -> Iterator[None]:
        self.fired = False
        previous = signal.signal(signal.SIGALRM, self._alarm)
        with self._lock:
            self._deadline, self._label = time.monotonic() + seconds + self.grace_s, label
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            with self._lock:
                self._deadline = None

    def _alarm(self, signum, frame) -> None:
        self.fired = True
        # again every second: code that ignores exceptions (a weakref or __del__ callback
        # the signal happened to interrupt) may have swallowed this one
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        raise RowTimeout()

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            with self._lock:
                stuck = self._deadline is not None and time.monotonic() > self._deadline
                label = self._label
            if stuck:
                self.on_stuck(label)
                os._exit(3)


class Budget:
    """Seconds left to a section and to the whole run; ``reason`` says why a row is not run,
    ``row_limit`` how long a row may take."""

    def __init__(self, total_s: float) -> None:
        self.start = time.perf_counter()
        self.total_s = total_s
        self.section = ""
        self.section_start = self.start
        self.section_s = 0.0

    def enter(self, name: str, seconds: float) -> None:
        self.section, self.section_start, self.section_s = name, time.perf_counter(), seconds

    def left(self) -> float:
        now = time.perf_counter()
        return min(self.section_s - (now - self.section_start), self.total_s - (now - self.start))

    def reason(self, need_s: float = 0.0) -> str | None:
        now = time.perf_counter()
        if self.section_s - (now - self.section_start) <= need_s:
            return f"not run: the {self.section} budget of {self.section_s:g} s was spent"
        if self.total_s - (now - self.start) <= need_s:
            return f"not run: the run's budget of {self.total_s:g} s was spent"
        return None

    def row_limit(self, cap_s: float) -> float:
        return max(0.0, min(cap_s, self.left()))


@dataclass
class Context:
    """What every section shares: the plan, the device, the limits, the output folder."""

    plan: Plan
    device: torch.device
    budget: Budget
    watchdog: Watchdog | None
    out: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _error(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:300]


def _guarded(
    row: dict[str, Any],
    ctx: Context,
    run: Callable[[], dict[str, Any]],
    *,
    compiled: bool = False,
    long: bool = False,
    need_s: float = 0.0,
) -> dict[str, Any]:
    """``row`` updated with what ``run`` measured (and the kernel it names), or with why
    it did not run: the budget, its hard time limit, an error. Compiled and ``long`` rows
    (whole training runs) have the longer limit."""
    skip = ctx.budget.reason(need_s)
    if skip is not None:
        return {**row, "status": "not_run", "reason": skip}
    cap = ctx.plan.compiled_row_limit_s if compiled or long else ctx.plan.row_limit_s
    limit = ctx.budget.row_limit(cap)
    label = f"{ctx.budget.section}: {row}"
    try:
        guard = ctx.watchdog.limit(limit, label) if ctx.watchdog else contextlib.nullcontext()
        with guard:
            result = run()
        if "kernel" not in result:
            raise AssertionError("a measured row must name the kernel that ran")
        return {**row, "status": "ok", **result}
    except RowTimeout:
        return {**row, "status": "skipped", "reason": _overran(limit, cap)}
    except Unavailable as err:
        return {**row, "status": "not_run", "reason": f"not run: {err}"}
    except Exception as err:  # one failing row (OOM, a compiler error) must not end the run
        if ctx.watchdog is not None and ctx.watchdog.fired:  # the timeout, wrapped
            return {**row, "status": "skipped", "reason": _overran(limit, cap)}
        return {**row, "status": "error", "reason": _error(err)}
    finally:
        if compiled and "torch._dynamo" in sys.modules:  # (importing it costs seconds)
            torch.compiler.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _overran(limit: float, cap: float) -> str:
    why = "its row limit" if limit >= cap else "the time left to its section or run"
    return f"skipped: stopped at its hard time limit of {limit:.3g} s ({why})"


# ----------------------------------------------------------------------------- kernels

SDPA_OP = "aten::_scaled_dot_product_"
SDPA_KERNELS = {  # aten op suffix -> kernel
    "flash_attention_for_cpu": "flash_cpu",
    "flash_attention": "flash",
    "efficient_attention": "efficient",
    "cudnn_attention": "cudnn",
    "attention_math": "math",
    "fused_attention_overrideable": "overrideable",
}
CUDA_ATTENTION_MARKS = ("fmha", "flash", "attention", "sdpa", "triton_tem")


def kernel_names(keys: Sequence[str]) -> str:
    """The attention that ran, from profiler op names: the ``iln.models.fast`` route
    (``iln::attention.<route>``), the SDPA backend of each aten op (``sdpa:efficient``,
    ``sdpa:efficient_backward``), CUDA kernels of attention (compiled graphs), else the
    plain ``matmul + softmax`` of the reference code."""
    found: list[str] = []
    for key in keys:
        name = None
        if key.startswith(fast.ROUTE_PREFIX):
            name = "route:" + key[len(fast.ROUTE_PREFIX) :]
        elif key.startswith(SDPA_OP):
            rest = key[len(SDPA_OP) :]
            base = rest.removesuffix("_backward")
            if base in SDPA_KERNELS:
                name = "sdpa:" + SDPA_KERNELS[base] + ("_backward" if rest != base else "")
        elif not key.startswith("aten::") and any(m in key for m in CUDA_ATTENTION_MARKS):
            name = "cuda:" + key[:60]
        if name is not None and name not in found:
            found.append(name)
    if not found and any(k in ("aten::_softmax", "aten::softmax") for k in keys):
        found.append("unfused: matmul + softmax")
    return ", ".join(sorted(found)) or "no attention op seen"


def profiled_kernels(fn: Callable[[], object], device: torch.device) -> str:
    """Runs ``fn`` once under the profiler (host ops; CUDA kernels too on CUDA) and names
    the attention that ran (``kernel_names``)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            synchronizer(device)()
    except RuntimeError:  # no CUDA activity (CUPTI): the host ops name the kernels too
        if len(activities) == 1:
            raise
        with torch.profiler.profile(activities=activities[:1]) as prof:
            fn()
            synchronizer(device)()
    return kernel_names([e.key for e in prof.key_averages()])


@contextlib.contextmanager
def _fp32_precision(tf32: bool) -> Iterator[None]:
    """fp32 matmuls and convolutions in TF32 (or full fp32) for the block, restored after."""
    saved = runtime.fp32_precision()
    runtime.set_fp32_precision(tf32)
    try:
        yield
    finally:
        runtime.set_fp32_precision(saved["matmul"] == "tf32")


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


def device_info(ctx: Context, smoke: bool) -> dict[str, Any]:
    device = ctx.device
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
        "fp32_precision": runtime.fp32_precision(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "total_budget_s": ctx.plan.total_budget_s,
        "row_limit_s": ctx.plan.row_limit_s,
        "compiled_row_limit_s": ctx.plan.compiled_row_limit_s,
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
    specs = [dict(base, precision=p) for p in PRECISIONS]
    specs += [dict(base, norm="ln", precision=p) for p in plan.ln_precisions]
    specs += [dict(base, attention=a) for a in ("sdpa", "materialized")]
    specs.append(dict(base, path="reference"))
    specs += [dict(base, arch=a, precision="bf16", batch=plan.big_batch) for a in plan.big_archs]
    # train.grad_checkpoint: the memory it saves and the time it costs (issue: full HAT)
    specs += [
        dict(base, arch=a, precision="fp32", batch=plan.big_batch, grad_checkpoint=c)
        for a in plan.big_archs
        for c in (False, True)
    ]
    specs.append(dict(base, attention="flex"))  # compiles flex_attention (off the CPU)
    compiled = dict(base, precision="bf16", mode="compiled")
    if plan.compiled_overrides:
        compiled["overrides"] = plan.compiled_overrides
    specs += [dict(compiled, attention=a) for a in ("auto", "flex")]
    return specs


def _train_step(spec: dict[str, Any], ctx: Context) -> dict[str, Any]:
    plan, device = ctx.plan, ctx.device
    if spec["precision"] == "tf32" and device.type != "cuda":
        raise Unavailable(f"tf32 is a CUDA matmul mode; {device.type} has none")
    if spec["attention"] == "flex" and device.type == "cpu":
        raise Unavailable(FLEX_CPU)
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
    with _fp32_precision(spec["precision"] == "tf32"):
        start = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - start
        memory.reset()
        timing = _time(step, device, repeats=plan.step_repeats, warmup=1)
        peak = memory.peak()
        kernel = profiled_kernels(step, device)
        fp32_matmul = runtime.fp32_precision()["matmul"]
    row = {
        "seconds": timing.median_s,
        "seconds_min": timing.min_s,
        "first_step_seconds": first,
        "peak_memory_bytes": peak,
        "repeats": timing.repeats,
        "kernel": kernel,
        "fp32_matmul": fp32_matmul,
    }
    if compiled:
        row["compile_backend"] = plan.compile_backend
    return row


def run_train_steps(ctx: Context) -> list[dict[str, Any]]:
    rows = []
    for spec in train_step_specs(ctx.plan):
        compiled = spec["mode"] == "compiled" or spec["attention"] == "flex"
        rows.append(_guarded(spec, ctx, lambda s=spec: _train_step(s, ctx), compiled=compiled))
    return rows


# ----------------------------------------------------------------------------- inference


def _inference(base: nn.Module, dtype_name: str, ctx: Context) -> dict[str, Any]:
    plan, device = ctx.plan, ctx.device
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

    with _fp32_precision(False):
        forward()
        memory.reset()
        timing = _time(forward, device, repeats=plan.repeats, warmup=0)
        peak = memory.peak()
        kernel = profiled_kernels(forward, device)
    return {"seconds": timing.median_s, "peak_memory_bytes": peak, "kernel": kernel}


def run_inference(ctx: Context) -> list[dict[str, Any]]:
    rows = []
    for arch in ctx.plan.infer_archs:
        base = build_model(arch, norm="iln", scale=SCALE, generator=_gen(0))
        for dtype_name in DTYPES:
            row = dict(arch=arch, norm="iln", precision=dtype_name, lr_size=ctx.plan.infer_size)
            if dtype_name not in ctx.plan.infer_precisions:
                reason = "not run: half precision on the CPU takes minutes (dtypes: meta tests)"
                rows.append({**row, "status": "not_run", "reason": reason})
                continue
            rows.append(_guarded(row, ctx, lambda m=base, d=dtype_name: _inference(m, d, ctx)))
    return rows


# ----------------------------------------------------------------------------- sdpa


def model_sdpa_shapes(arch: str, batch: int, patch: int) -> list[dict[str, Any]]:
    """The distinct ``scaled_dot_product_attention`` calls a training forward of ``arch``
    (attention "sdpa", batch x patch) makes, captured by the profiler from a forward on
    ``meta``: q, k, v and mask shapes, padded as ``iln.models.fast`` pads them. One group
    of two blocks (a window block, a shifted one and OCAB) makes every call the whole model
    makes: the groups of these presets are alike."""
    group = dict(depths=[2], num_heads=[PRESETS[arch]["num_heads"][0]])
    model = build_model(arch, norm="iln", scale=SCALE, attention="sdpa", **group)
    model = model.to("meta").train()
    x = torch.empty(batch, 3, patch, patch, device="meta")
    with torch.profiler.profile(record_shapes=True) as prof:
        model(x)
    shapes: list[dict[str, Any]] = []
    for event in prof.events():
        if event.name != "aten::scaled_dot_product_attention":
            continue
        q, k, v, mask = (list(s) for s in event.input_shapes[:4])
        call = {"q": q, "k": k, "v": v, "mask": mask}
        if call not in shapes:
            shapes.append(call)
    return shapes


def _sdpa_row(shape: dict[str, Any], dtype: torch.dtype, train: bool, backend: str, ctx: Context):
    device = ctx.device
    gen = _gen(3)
    q, k, v = (torch.randn(shape[n], generator=gen, dtype=dtype).to(device) for n in "qkv")
    mask = (0.5 * torch.randn(shape["mask"], generator=gen, dtype=dtype)).to(device)
    scale = shape["q"][-1] ** -0.5
    for t in (q, k, v, mask):
        t.requires_grad_(train)
    if backend == "fused_only":  # what CUDA training runs (fast.sdpa), on any device
        if train:
            backends = fast.training_sdpa_backends(device.type, mask_needs_grad=True)
        else:
            backends = fast.FUSED_CUDA if ctx.cuda else fast.training_sdpa_backends("cpu", False)

        def attend():
            return fast.fused_sdpa(q, k, v, mask, scale, backends)
    else:

        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def call() -> None:
        if train:
            attend().sum().backward()
        else:
            with torch.no_grad():
                attend()

    kernel = profiled_kernels(call, device)
    timing = _time(call, device, repeats=ctx.plan.repeats, warmup=1)
    return {"kernel": kernel, "seconds": timing.median_s}


def run_sdpa_backends(ctx: Context) -> list[dict[str, Any]]:
    rows = []
    patch = ctx.plan.train_patch
    for arch in ctx.plan.sdpa_archs:
        shapes = model_sdpa_shapes(arch, ctx.plan.train_batch, max(patch, 16))
        for shape in shapes:
            for dtype_name in ctx.plan.sdpa_dtypes:
                for mode in ("train", "inference"):
                    for backend in ("default", "fused_only"):
                        row = dict(arch=arch, dtype=dtype_name, mode=mode, backend=backend)
                        row.update(shape)
                        train = mode == "train"
                        run = functools.partial(
                            _sdpa_row, shape, DTYPES[dtype_name], train, backend, ctx
                        )
                        rows.append(_guarded(row, ctx, run))
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


def _attention_check(impl: str, compiled: bool, ctx: Context):
    plan, device = ctx.plan, ctx.device
    if impl == "flex" and device.type == "cpu":
        raise Unavailable(FLEX_CPU)
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
    with _fp32_precision(False):
        out = fn(*inputs, mask.float())
        grads = torch.autograd.grad(out, inputs, cotangent.float())
        kernel = profiled_kernels(
            lambda: torch.autograd.grad(fn(*inputs, mask.float()), inputs, cotangent.float()),
            device,
        )
    return {
        "max_error_output": float((out.detach().double() - ref.detach()).abs().max()),
        "max_error_bias_grad": float((grads[3].double() - ref_grads[3]).abs().max()),
        "max_error_q_grad": float((grads[0].double() - ref_grads[0]).abs().max()),
        "kernel": kernel,
    }


def run_attention_checks(ctx: Context):
    rows = []
    impls = (("sdpa", False), ("materialized", False), ("flex", True), ("auto", False))
    for impl, compiled in impls:
        row = dict(
            attention=impl,
            mode="compiled" if compiled else "eager",
            dtype="fp32 (TF32 off) vs fp64 reference",
            head_dim=ctx.plan.attn_head_dims[0],
        )
        if compiled:
            row["compile_backend"] = ctx.plan.compile_backend
        run = lambda i=impl, c=compiled: _attention_check(i, c, ctx)  # noqa: E731
        rows.append(_guarded(row, ctx, run, compiled=compiled))
    return rows


# ----------------------------------------------------------------------------- flex


def _flex_operands(arch: str, block: str, ctx: Context, dtype: torch.dtype, train: bool):
    """q, k, v (B*nW, h, nq / nk, d), the (rows, h) table, its (nq, nk) index and the
    shift mask (nW, 1, n, n) or None of one ``arch`` block (``hab`` shifted or ``ocab``)
    at the training batch and patch."""
    hp = PRESETS[arch]
    w, heads, dim = hp["window_size"], hp["num_heads"][0], hp["embed_dim"]
    b, p, d = ctx.plan.train_batch, max(ctx.plan.train_patch, w), dim // heads
    nw = (p // w) ** 2
    gen = _gen(7)
    if block == "ocab":
        ow = common.overlap_window_size(w, hp["overlap_ratio"])
        index, rows, nk, mask = (
            common.relative_position_index_overlap(w, ow),
            (w + ow - 1),
            ow * ow,
            None,
        )
    else:
        index, rows, nk = common.relative_position_index(w), 2 * w - 1, w * w
        mask = common.shift_window_mask(p, p, w, w // 2, device=torch.device("cpu"), dtype=dtype)
        mask = mask.unsqueeze(1).to(ctx.device)
    q = torch.randn(b * nw, heads, w * w, d, generator=gen, dtype=dtype)
    k, v = (torch.randn(b * nw, heads, nk, d, generator=gen, dtype=dtype) for _ in range(2))
    table = 0.5 * torch.randn(rows * rows, heads, generator=gen)
    tensors = [t.to(ctx.device).requires_grad_(train) for t in (q, k, v, table)]
    return (*tensors, index.to(ctx.device), mask, d**-0.5)


def _flex_row(arch: str, block: str, impl: str, train: bool, dtype_name: str, ctx: Context):
    dtype = DTYPES[dtype_name]
    q, k, v, table, index, mask, scale = _flex_operands(arch, block, ctx, dtype, train)
    if mask is not None:  # (B, nW, h, n, d), one mask per window position
        q, k, v = (t.reshape(-1, mask.shape[0], *t.shape[1:]) for t in (q, k, v))

    def attend():
        if impl == "sdpa":  # the model's path: gather the bias, then SDPA with it as mask
            bias = fast.gather_bias(table, index).to(dtype)
            return fast.attention(q, k, v, bias, scale, mask, impl="sdpa")
        compiled = impl == "flex_compiled"
        return fast.flex_table_attention(q, k, v, table, index, scale, mask, compile_flex=compiled)

    def call() -> None:
        if train:
            attend().float().sum().backward()
        else:
            with torch.no_grad():
                attend()

    memory = _Memory(ctx.device)
    start = time.perf_counter()
    call()  # the compilation, for flex_compiled
    synchronizer(ctx.device)()
    first = time.perf_counter() - start
    memory.reset()
    timing = _time(call, ctx.device, repeats=ctx.plan.repeats, warmup=1)
    peak = memory.peak()
    kernel = profiled_kernels(call, ctx.device)
    return {
        "seconds": timing.median_s,
        "first_call_seconds": first,
        "peak_memory_bytes": peak,
        "kernel": kernel,
    }


def run_flex(ctx: Context) -> list[dict[str, Any]]:
    """The compiled flex kernel (score_mod reading the table) against the SDPA path."""
    rows = []
    for arch in ctx.plan.flex_archs:
        for block in ("hab", "ocab"):
            for dtype_name in ctx.plan.flex_dtypes:
                for mode in ("train", "inference"):
                    for impl in ("sdpa", "flex_compiled", "flex_eager"):
                        row = dict(arch=arch, block=block, dtype=dtype_name, mode=mode, impl=impl)
                        reason = _flex_not_run(impl, mode == "train", ctx)
                        if reason is not None:
                            rows.append({**row, "status": "not_run", "reason": reason})
                            continue
                        run = lambda a=arch, b=block, i=impl, t=mode == "train", d=dtype_name: (  # noqa: E731
                            _flex_row(a, b, i, t, d, ctx)
                        )
                        rows.append(_guarded(row, ctx, run, compiled=impl == "flex_compiled"))
    return rows


def _flex_not_run(impl: str, train: bool, ctx: Context) -> str | None:
    if impl == "flex_eager" and ctx.cuda:
        return "not run: eager flex materialises the scores (the compiled rows are the kernel)"
    if impl == "flex_compiled" and not ctx.plan.flex_compile:
        return ctx.plan.notes["flex_compile"]
    if impl.startswith("flex") and train and ctx.device.type == "cpu":
        return f"not run: {FLEX_CPU}"
    return None


# ----------------------------------------------------------------------------- fit


class _Interrupted(Exception):
    """Stops the training loop after a checkpoint, as a killed job would stop."""


def call_fit(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    amp: str,
    steps: int,
    batch: int,
    patch: int,
    checkpoint_every: int,
    device: torch.device,
    checkpoint: Path,
    on_log: Callable[[int, dict[str, float]], None] | None,
) -> tuple[nn.Module, float, str]:
    """The one call of the real training loop (``iln.training.loop.fit``, its public signature),
    with the defaults of ``params.yaml`` where they do not matter here; returns the EMA
    model, fit's seconds per step and how fp32 matmuls ran (TF32 as ``train.tf32``)."""
    from iln.config.params import TrainParams
    from iln.training.loop import fit

    settings = TrainParams(
        iterations=steps,
        batch_size=batch,
        lq_patch=patch,
        lr=2e-4,
        betas=(0.9, 0.99),
        milestones=(steps // 2,),
        lr_gamma=0.5,
        ema_decay=0.9,
        grad_clip=0.0,
        kld_weight=0.0,
        seed=1,
        checkpoint_every=checkpoint_every,
        log_every=1 if on_log is not None else steps,
        probe_every=0,
        probe_images=1,
        probe_per_block=False,
        train_set="synthetic",
        amp=amp,
        compile=False,
        device=device.type,
        num_workers=0,
        threads=0,
    )
    runtime.use_tf32(device, settings.tf32)  # as the train stage does
    ema, result = fit(
        model,
        dataset,
        settings,
        device=device,
        checkpoint_path=checkpoint,
        fingerprint=f"gpu-benchmark {amp} {steps}",
        on_log=on_log,
        progress=False,
        warn=lambda message: None,
    )
    return ema, result.seconds_per_step, runtime.fp32_precision()["matmul"]


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max(float((x.double() - y.double()).abs().max()) for x, y in pairs if x.numel())


def _fit_row(arch: str, amp: str, folder: Path, ctx: Context) -> dict[str, Any]:
    """Uninterrupted run of ``fit_steps`` against one stopped after half of them (by an
    exception right after its checkpoint) and resumed in a fresh model from that checkpoint."""
    from iln.data.dataset import TrainPatches

    plan, device = ctx.plan, ctx.device
    steps, half = plan.fit_steps, plan.fit_steps // 2
    batch = plan.fit_batch[arch]
    dataset = TrainPatches(
        folder / "sr" / "gt", folder / "sr" / "lq", scale=2, lq_patch=plan.fit_patch, seed=1
    )
    options = dict(amp=amp, steps=steps, batch=batch, patch=plan.fit_patch, device=device)

    def fresh() -> nn.Module:
        return build_model(arch, norm="iln", scale=SCALE, generator=_gen(0))

    def stop(step: int, row: dict[str, float]) -> None:
        if step > half:  # the checkpoint of step ``half`` is written
            raise _Interrupted(f"stopped at step {step}")

    memory = _Memory(device)
    memory.reset()
    start = time.perf_counter()
    whole = fresh()
    whole_ema, seconds_per_step, fp32_matmul = call_fit(
        whole,
        dataset,
        checkpoint_every=steps,
        checkpoint=folder / f"{arch}-{amp}-a.pt",
        on_log=None,
        **options,
    )
    wall = time.perf_counter() - start
    peak = memory.peak()
    path = folder / f"{arch}-{amp}-b.pt"
    with contextlib.suppress(_Interrupted):
        call_fit(fresh(), dataset, checkpoint_every=half, checkpoint=path, on_log=stop, **options)
    resumed = fresh()
    resumed_ema, _, _ = call_fit(
        resumed, dataset, checkpoint_every=half, checkpoint=path, on_log=None, **options
    )
    kernel = profiled_kernels(
        lambda: _one_step(resumed, batch, plan.fit_patch, amp, device), device
    )
    diff, diff_ema = _max_diff(whole, resumed), _max_diff(whole_ema, resumed_ema)
    return {
        "steps": steps,
        "interrupted_after": half,
        "batch": batch,
        "lr_patch": plan.fit_patch,
        "steps_per_second": 1.0 / seconds_per_step if seconds_per_step > 0 else None,
        "wall_seconds_uninterrupted": wall,
        "peak_memory_bytes": peak,
        "fp32_matmul": fp32_matmul,
        "max_abs_diff_weights": diff,
        "max_abs_diff_ema": diff_ema,
        "max_abs_update": _max_diff(whole, fresh().to(device)),
        "resumed_equals_uninterrupted": diff == 0.0 and diff_ema == 0.0,
        "kernel": kernel,
    }


def _one_step(model: nn.Module, batch: int, patch: int, amp: str, device: torch.device) -> None:
    """A forward and backward of the fit's model (for the kernel it runs), no update."""
    model.train()
    x = torch.rand(batch, 3, patch, patch, generator=_gen(8)).to(device)
    dtype = AUTOCAST.get(amp)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x)
    out.float().mean().backward()
    model.zero_grad(set_to_none=True)


def run_fit(ctx: Context) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fit-", dir=ctx.out) as tmp:
        folder = Path(tmp)
        count, side = ctx.plan.loader_images[0]
        _write_images(folder / "sr", count, max(side, 4 * ctx.plan.fit_patch), 2)
        for arch in ctx.plan.fit_archs:
            for amp in ("bf16", "fp32"):
                row = dict(arch=arch, amp=amp)
                if amp not in ctx.plan.fit_amps:
                    reason = "not run: bf16 autocast on the CPU is slow; the GPU run has it"
                    rows.append({**row, "status": "not_run", "reason": reason})
                    continue
                run = lambda a=arch, m=amp: _fit_row(a, m, folder, ctx)  # noqa: E731
                with _fp32_precision(False):  # fit sets TF32 as training does; restored
                    rows.append(_guarded(row, ctx, run, long=True))
    return rows


# ----------------------------------------------------------------------------- norms


NORM_OPS = ("layer_norm", "group_norm", "var_mean", "batch_norm")


def _norm_kernel(kind: str, dtype: torch.dtype, ctx: Context):
    plan, device = ctx.plan, ctx.device
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
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    ops = {e.key for e in prof.key_averages() if e.key.startswith("aten::")}
    ran = sorted(k for k in ops if any(name in k for name in NORM_OPS))
    return {"seconds": timing.median_s, "kernel": ", ".join(ran) or "elementwise ops only"}


def run_norm_kernels(ctx: Context):
    rows = []
    for dtype_name in ("fp32", "bf16"):
        for kind in ("iln_fast", "iln_reference", "layer_norm"):
            shape = list(ctx.plan.norm_shape)
            row = dict(norm=kind, dtype=dtype_name, shape=shape, passes="fwd+bwd")
            run = lambda k=kind, t=DTYPES[dtype_name]: _norm_kernel(k, t, ctx)  # noqa: E731
            rows.append(_guarded(row, ctx, run))
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
    return {"batches_per_second": count / seconds, "batches": count, "kernel": NO_KERNEL}


def run_loader(ctx: Context, step_seconds: float | None) -> list[dict[str, Any]]:
    plan = ctx.plan
    with tempfile.TemporaryDirectory(prefix="loader-", dir=ctx.out) as tmp:
        folder = Path(tmp)
        (sr_count, sr_side), (dn_count, dn_side) = plan.loader_images
        _write_images(folder / "sr", sr_count, sr_side, 2)
        _write_images(folder / "dn", dn_count, dn_side, None)
        return _loader_rows(ctx, step_seconds, folder)


def _loader_rows(ctx: Context, step_seconds: float | None, folder: Path) -> list[dict[str, Any]]:
    plan = ctx.plan
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
                row, ctx, lambda k=kind, w=workers, s=sub: _loader(k, w, folder / s, plan)
            )
            if result["status"] == "ok" and step_seconds:
                result["keeps_up"] = result["batches_per_second"] * step_seconds >= 1.0
            rows.append(result)
    return rows


# ----------------------------------------------------------------------------- fp16


def _overflow(base: nn.Module, gain: float, ctx: Context) -> dict[str, Any]:
    from iln.evaluation import (
        precision,  # here: its import chain (evaluation, metrics) takes a second
    )

    plan, device = ctx.plan, ctx.device
    model = copy.deepcopy(base).eval()
    with torch.no_grad():  # the stream starts at the patch-embed norm's output (LN or Affine)
        model.patch_embed.norm.weight.mul_(gain)
        model.patch_embed.norm.bias.mul_(gain)
    x = torch.rand(1, 3, plan.overflow_size, plan.overflow_size, generator=_gen(6))
    row: dict[str, Any] = {}
    for mode in ("fp32", "fp16"):
        copy_ = precision.prepare_model(model, mode, device)
        with precision.FeatureMonitor(copy_) as monitor, torch.no_grad(), _fp32_precision(False):
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


def _forward_kernels(base: nn.Module, ctx: Context) -> str:
    """The attention an fp32 forward of ``base`` runs (the same for every gain)."""
    from iln.evaluation import precision

    model = precision.prepare_model(base, "fp32", ctx.device)
    s = ctx.plan.overflow_size
    x = torch.rand(1, 3, s, s, generator=_gen(6)).to(ctx.device)
    with torch.no_grad():
        return profiled_kernels(lambda: model(x), ctx.device)


def run_overflow(ctx: Context) -> list[dict[str, Any]]:
    plan = ctx.plan
    rows = []
    for norm in ("ln", "iln"):
        base = build_model(plan.overflow_arch, norm=norm, scale=SCALE, generator=_gen(0))
        kernel = _forward_kernels(base, ctx)
        for gain in (1.0, 1.0e3, 1.0e5):
            row = dict(
                arch=plan.overflow_arch, norm=norm, embedding_gain=gain, lr_size=plan.overflow_size
            )
            run = lambda m=base, g=gain, k=kernel: {**_overflow(m, g, ctx), "kernel": k}  # noqa: E731
            rows.append(_guarded(row, ctx, run))
    return rows


# ----------------------------------------------------------------------------- official


def run_official(checkout: Path | None, ctx: Context) -> list[dict[str, Any]]:
    plan, device = ctx.plan, ctx.device
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
        with _fp32_precision(False):
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
            "kernel": profiled_kernels(steps["ours"], device),
        }

    return [
        _guarded({**row, "norm": norm}, ctx, lambda n=norm: measure(n)) for norm in ("ln", "iln")
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


class Recorder:
    """The report, written to ``out/gpu.json`` and ``out/gpu.md`` (atomically) at the start,
    after every section and when a row is stuck past its limit; ``progress`` in ``device``
    says which sections are done, which one runs and which are left."""

    def __init__(self, out: Path, device: dict[str, Any]) -> None:
        self.out = out
        self.report: dict[str, Any] = {"device": device}
        self.progress: dict[str, Any] = {
            "done": [],
            "running": None,
            "left": list(SECTIONS),
            "section_seconds": {},
        }
        device["progress"] = self.progress
        self._lock = threading.Lock()

    def start(self, name: str) -> None:
        self.progress["running"] = name
        self.progress["left"].remove(name)
        self.save()

    def finish(self, name: str, rows: list[dict[str, Any]], seconds: float) -> None:
        with self._lock:
            self.report[name] = rows
            self.progress["done"].append(name)
            self.progress["running"] = None
            self.progress["section_seconds"][name] = seconds
        self.save()

    def stuck(self, label: str) -> None:
        """A row ran past its limit in native code: the run ends here (watchdog thread)."""
        self.report["device"]["stopped"] = (
            f"stopped: a row stayed in native code past its hard limit ({label[:200]}); "
            f"sections not run: {', '.join(self.progress['left']) or 'none'}"
        )
        self.save()

    def save(self) -> None:
        with self._lock:
            write_json_atomic(self.out / "gpu.json", self.report)
            write_text_atomic(self.out / "gpu.md", markdown(self.report))


def run(
    plan: Plan, device: torch.device, out: Path, *, smoke: bool, official: Path | None
) -> dict[str, Any]:
    budget = Budget(plan.total_budget_s)
    runtime.set_fp32_precision(False)  # rows that want TF32 ask for it
    runtime.use_cudnn_benchmark(device, fixed_shapes=True)  # every row has fixed shapes
    ctx = Context(plan, device, budget, None, out)
    recorder = Recorder(out, device_info(ctx, smoke))
    ctx.watchdog = Watchdog(plan.grace_s, recorder.stuck)

    def step_seconds() -> float | None:  # the main train row, for the loader's keeps_up
        rows = recorder.report.get("train_step", [])
        main = [r for r in rows if r["status"] == "ok" and r["norm"] == "iln"]
        main = [r for r in main if r["arch"] == plan.train_arch]
        return main[0]["seconds"] if main else None

    sections: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "sdpa_backends": lambda: run_sdpa_backends(ctx),
        "norm_kernel": lambda: run_norm_kernels(ctx),
        "attention_check": lambda: run_attention_checks(ctx),
        "train_step": lambda: run_train_steps(ctx),
        "inference": lambda: run_inference(ctx),
        "fit": lambda: run_fit(ctx),
        "flex": lambda: run_flex(ctx),
        "loader": lambda: run_loader(ctx, step_seconds()),
        "fp16_overflow": lambda: run_overflow(ctx),
        "official": lambda: run_official(official, ctx),
    }
    for name in SECTIONS:
        budget.enter(name, plan.budgets_s[name])
        recorder.start(name)
        try:
            rows = sections[name]()
        except Exception as err:  # outside its rows (a model build): the next section runs
            rows = [{"status": "error", "reason": _error(err)}]
        recorder.finish(name, rows, time.perf_counter() - budget.section_start)
    recorder.report["device"]["seconds"] = time.perf_counter() - budget.start
    recorder.save()
    return recorder.report


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
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # compiled rows keep their caches with the results (a second run starts warm)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(out / "inductor_cache")
    os.environ["TRITON_CACHE_DIR"] = str(out / "triton_cache")
    plan = SMOKE if args.smoke else FULL
    if args.smoke:
        torch.set_num_threads(1)
    report = run(plan, device, out, smoke=args.smoke, official=args.official)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
