"""Benchmark suite: training-step and inference time, peak memory, FLOP rate, the cost of
i-LN against LN, fused against straightforward attention, and bicubic degradation speed.

Everything runs in ONE process so that the ratios (i-LN / LN, naive / fast attention,
reference / vectorised bicubic) compare like with like. Variants that are compared are
timed round-robin (A, B, A, B, ...) rather than one after the other: on a shared machine
the load drifts over minutes, and interleaving spreads that drift over both arms instead
of charging it to one of them. Medians are reported because a single preempted sample
(another process waking up) would move a mean by far more than the effect being measured.

Run ``python -m iln.bench --help``. Absolute times depend on the machine and its load;
read the ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from iln.files import write_json_atomic, write_text_atomic
from iln.train import adam

SCHEMA_VERSION = 1
ADAM_LR = 2.0e-4  # the official HAT_1 recipe (DESIGN section 5)
ADAM_BETAS = (0.9, 0.99)
DIV2K_SHAPE = (1356, 2040, 3)  # a typical DIV2K training image, (H, W, C)
TARGETS = {
    "iln_over_ln_max": 1.03,  # i-LN may cost at most 3% more per training step
    "attention_speedup_min": 1.25,  # fused path at least 1.25x faster than the naive one
    "attention_max_abs_diff": 1e-5,  # and the same numbers
    "bicubic_speedup_min": 10.0,  # vectorised resize at least 10x faster than the reference
}
TARGET_PRESETS = ("hat_1", "swinir_1")  # presets the i-LN cost target applies to


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls; ``median_s`` is the figure to quote.

    ``cpu_samples_s`` is the process CPU time of each call (all threads). With one
    thread on a CPU shared with other jobs it excludes the time the process waited for
    a core, which is most of the noise there; with a GPU it only measures the host side.
    """

    median_s: float
    min_s: float
    max_s: float
    iqr_s: float  # spread of the middle half: large when the machine was busy
    repeats: int
    warmup: int
    samples_s: tuple[float, ...]
    cpu_median_s: float | None = None
    cpu_samples_s: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    samples: Sequence[float], *, warmup: int, cpu_samples: Sequence[float] | None = None
) -> Timing:
    """Timing of raw wall-clock samples (seconds), with the CPU-time samples if given."""
    if not samples:
        raise ValueError("summarize needs at least one sample")
    if cpu_samples is not None and len(cpu_samples) != len(samples):
        raise ValueError(
            f"got {len(cpu_samples)} CPU-time samples for {len(samples)} wall-clock samples"
        )
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Timing(
        median_s=statistics.median(ordered),
        min_s=ordered[0],
        max_s=ordered[-1],
        iqr_s=q3 - q1,
        repeats=len(samples),
        warmup=warmup,
        samples_s=tuple(samples),
        cpu_median_s=None if cpu_samples is None else statistics.median(cpu_samples),
        cpu_samples_s=None if cpu_samples is None else tuple(cpu_samples),
    )


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued device work.

    CUDA kernels run asynchronously: without a synchronize before reading the clock, the
    time of the launch, not of the work, would be measured.
    """
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, Timing]:
    """Median time of every function, calls interleaved round-robin.

    The warm-up calls (allocator growth, lazy init, one-time caches) are not timed. The
    starting function rotates every round so that none always runs right after the
    same neighbour. The garbage collector runs before each round and is paused during it
    (as ``timeit`` does) so that a collection triggered by one arm is not charged to another.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}"
        )
    if not fns:
        raise ValueError("time_interleaved needs at least one function")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    cpu_samples: dict[str, list[float]] = {name: [] for name in names}
    enabled = gc.isenabled()
    for r in range(repeats):
        shift = r % len(names)
        gc.collect()
        gc.disable()
        try:
            for name in names[shift:] + names[:shift]:
                sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                fns[name]()
                sync()
                samples[name].append(time.perf_counter() - start)
                cpu_samples[name].append(time.process_time() - cpu_start)
        finally:
            if enabled:
                gc.enable()
    return {
        name: summarize(samples[name], warmup=warmup, cpu_samples=cpu_samples[name])
        for name in names
    }


def time_callable(
    fn: Callable[[], object], *, repeats: int, warmup: int, sync: Callable[[], None] = lambda: None
) -> Timing:
    """Median time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    return time_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, sync=sync)["fn"]


# ----------------------------------------------------------------------------- model work


def random_batch(
    batch: int, lr_patch: int, scale: int, *, device: torch.device, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A random (lq, gt) pair of the training shapes; the values do not affect the time."""
    lq = torch.rand(batch, 3, lr_patch, lr_patch, generator=generator)  # (B, 3, p, p)
    gt = torch.rand(
        batch, 3, scale * lr_patch, scale * lr_patch, generator=generator
    )  # (B, 3, s*p, s*p)
    return lq.to(device), gt.to(device)


def make_adam(model: nn.Module) -> torch.optim.Optimizer:
    """Adam as the official recipe configures it (lr 2e-4, betas (0.9, 0.99), no decay)."""
    return adam(list(model.parameters()), lr=ADAM_LR, betas=ADAM_BETAS)


def make_train_step(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    generator: torch.Generator | None = None,
) -> Callable[[], Tensor]:
    """One training iteration as a closure: forward, L1 loss, backward, Adam step.

    ``generator`` (on the model's device) drives stochastic depth, so that timing runs do
    not consume the global RNG.
    """
    lq, gt = batch

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.l1_loss(model(lq, generator=generator), gt)  # output (B, 3, s*p, s*p)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def make_inference(model: nn.Module, lq: Tensor) -> Callable[[], Tensor]:
    """Restoration of ``lq`` (B, 3, H, W) without autograd, as evaluation runs it."""

    def infer() -> Tensor:
        with torch.inference_mode():
            return model(lq)

    return infer


def time_train_step(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    *,
    device: torch.device,
    repeats: int,
    warmup: int,
    generator: torch.Generator | None = None,
) -> Timing:
    """Median seconds of one training iteration (forward + L1 backward + Adam step).

    The model must already be on ``device``; it is put in training mode and its weights
    change (a benchmark does not need them afterwards).
    """
    model.train()
    step = make_train_step(model, batch, make_adam(model), generator=generator)
    return time_callable(step, repeats=repeats, warmup=warmup, sync=synchronizer(device))


def time_inference(
    model: nn.Module, lq: Tensor, *, device: torch.device, repeats: int, warmup: int
) -> Timing:
    """Median seconds to restore ``lq`` in eval mode under ``torch.inference_mode``."""
    model.eval()
    return time_callable(
        make_inference(model, lq), repeats=repeats, warmup=warmup, sync=synchronizer(device)
    )


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of ``fn()`` as torch's FlopCounterMode counts them.

    It counts matmuls, convolutions and attention kernels (2 per multiply-add), forward and
    backward alike; elementwise work (norms, activations, the loss, Adam) is not counted,
    which is the usual convention for model FLOPs.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def train_step_flops(
    model: nn.Module, batch: tuple[Tensor, Tensor], *, generator: torch.Generator | None = None
) -> int:
    """FLOPs of forward + L1 backward (the Adam update adds only uncounted elementwise work)."""
    lq, gt = batch
    model.train()

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        F.l1_loss(model(lq, generator=generator), gt).backward()

    flops = count_flops(forward_backward)
    model.zero_grad(set_to_none=True)
    return flops


def measure_matmul_peak(
    n: int, *, device: torch.device, repeats: int, warmup: int, generator: torch.Generator
) -> dict[str, Any]:
    """Achievable fp32 rate of this machine: a large square matmul, timed.

    The model FLOP rate is judged against this rather than a datasheet peak, since the
    same threads, BLAS library and machine load apply to both.
    """
    a = torch.randn(n, n, generator=generator).to(device)  # (n, n)
    b = torch.randn(n, n, generator=generator).to(device)  # (n, n)
    timing = time_callable(lambda: a @ b, repeats=repeats, warmup=warmup, sync=synchronizer(device))
    flops = 2 * n**3
    return {
        "n": n,
        "dtype": "float32",
        "flops": flops,
        "gflops": flops / timing.median_s / 1e9,
        "timing": timing.to_dict(),
    }


def top_ops(fn: Callable[[], object], *, device: torch.device, limit: int = 15) -> dict[str, Any]:
    """Total profiled self time of one call of ``fn`` and the operators that take most of it.

    Used to say where a step's time goes when a target is missed (compare two variants'
    lists op by op).
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return {
        "total_ms": total / 1e3,
        "ops": [
            {
                "op": e.key,
                "calls": e.count,
                "self_ms": getattr(e, key) / 1e3,
                "share": getattr(e, key) / total,
            }
            for e in events[:limit]
        ],
    }


# ----------------------------------------------------------------------------- memory


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _rss_peak() -> int | None:
    """VmHWM of /proc/self/status in bytes (peak RSS since start or the last reset)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def tensor_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor memory that ``fn()`` allocated and had not yet freed.

    torch keeps no allocator statistics for the CPU (and tracemalloc does not see its
    buffers), but its profiler records every allocation and free with its size: the peak
    of their running sum is the call's working memory (activations, gradients,
    temporaries). Memory alive before the call is not counted, and neither is its release
    (e.g. the previous step's gradients dropped by ``zero_grad``): the profiler does not
    know the size of blocks allocated before it started.
    """
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return int(peak)


def measure_peak_memory(fn: Callable[[], object], *, device: torch.device) -> dict[str, Any]:
    """Peak memory of one call of ``fn()``, with the method that measured it.

    ``step_peak_bytes``: the call's working memory, the peak of the tensor memory it
    allocated (CUDA: ``max_memory_allocated`` minus the allocation before the call, which
    also nets out what the call frees; CPU: the profiler's allocation records, see
    ``tensor_peak_bytes``, which do not).
    On the CPU ``rss_peak_bytes`` adds the process RSS high-water mark during the call
    (Linux: the mark is reset first; elsewhere ``ru_maxrss``, the peak of the whole
    process so far). RSS counts everything alive in the process and memory the C
    allocator kept from earlier work, so it is an upper bound, not a per-model figure.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "method": "cuda_max_memory_allocated",
            "step_peak_bytes": int(peak - before),
            "allocated_peak_bytes": int(peak),
            "rss_method": None,
            "rss_peak_bytes": None,
        }
    gc.collect()
    step_peak = tensor_peak_bytes(fn)
    if _reset_rss_peak() and _rss_peak() is not None:
        fn()
        rss_peak, rss_method = _rss_peak(), "rss_high_water_mark_of_call"
    else:
        fn()
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        rss_peak, rss_method = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit,
            "process_peak_rss",
        )
    return {
        "method": "profiler_tensor_allocations",
        "step_peak_bytes": step_peak,
        "allocated_peak_bytes": None,
        "rss_method": rss_method,
        "rss_peak_bytes": rss_peak,
    }


# ----------------------------------------------------------------------------- model benchmark


@dataclass(frozen=True)
class Variant:
    """One model configuration to benchmark: preset x norm x attention path."""

    preset: str
    norm: str
    attention: str = "fast"

    @property
    def label(self) -> str:
        return f"{self.preset}/{self.norm}" + (
            "" if self.attention == "fast" else f"/{self.attention}"
        )


def build_variants(
    variants: Sequence[Variant], *, scale: int, device: torch.device, seed: int
) -> dict[Variant, nn.Module]:
    """Models of every variant, on ``device``.

    Variants that differ only in the attention path share the weights of the first one
    built (state dict copied), so their outputs can be compared number for number.
    """
    from iln.models import build_model  # heavy import kept out of the timing helpers

    models: dict[Variant, nn.Module] = {}
    for v in variants:
        model = build_model(
            v.preset,
            norm=v.norm,
            scale=scale,
            attention=v.attention,
            generator=torch.Generator().manual_seed(seed),
        )
        twin = next(
            (m for u, m in models.items() if (u.preset, u.norm) == (v.preset, v.norm)), None
        )
        if twin is not None:
            model.load_state_dict(twin.state_dict())
        models[v] = model.to(device)
    return models


def output_difference(
    reference: nn.Module, other: nn.Module, lq: Tensor, *, with_grad: bool
) -> dict[str, float]:
    """Largest absolute differences of outputs (and parameter gradients when
    ``with_grad``) between two models with the same weights, in eval mode.

    With gradients, the fast attention takes its autograd path (custom backward); without,
    torch's fused kernel: both must match the naive computation.
    """
    reference.eval()
    other.eval()
    result: dict[str, float] = {}
    if not with_grad:
        with torch.inference_mode():
            result["output"] = float((reference(lq) - other(lq)).abs().max())
        return result
    outs = []
    for model in (reference, other):
        model.zero_grad(set_to_none=True)
        out = model(lq)  # (B, 3, s*H, s*W)
        out.abs().mean().backward()
        outs.append(out.detach())
    result["output"] = float((outs[0] - outs[1]).abs().max())
    grads_a = dict(reference.named_parameters())
    diffs = [
        float((p.grad - grads_a[name].grad).abs().max())
        for name, p in other.named_parameters()
        if p.grad is not None and grads_a[name].grad is not None
    ]
    result["grad"] = max(diffs) if diffs else 0.0
    for model in (reference, other):
        model.zero_grad(set_to_none=True)
    return result


def benchmark_group(
    variants: Sequence[Variant],
    *,
    scale: int,
    batch: int,
    lr_patch: int,
    infer_size: int,
    device: torch.device,
    repeats: int,
    warmup: int,
    seed: int,
    matmul_gflops: float | None,
    count_model_flops: bool = True,
) -> list[dict[str, Any]]:
    """Benchmark variants that are to be compared with each other (one preset).

    Training steps of all variants are timed interleaved, then their inferences; memory
    and FLOPs are measured on one extra step each.
    """
    models = build_variants(variants, scale=scale, device=device, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    train_batch = random_batch(batch, lr_patch, scale, device=device, generator=gen)
    infer_lq = torch.rand(1, 3, infer_size, infer_size, generator=gen).to(device)  # (1, 3, H, W)
    sync = synchronizer(device)

    steps: dict[str, Callable[[], object]] = {}
    for v, model in models.items():
        model.train()
        drop_gen = torch.Generator(device=device).manual_seed(seed)
        steps[v.label] = make_train_step(model, train_batch, make_adam(model), generator=drop_gen)
    train_times = time_interleaved(steps, repeats=repeats, warmup=warmup, sync=sync)
    memory = {label: measure_peak_memory(step, device=device) for label, step in steps.items()}

    flops: dict[str, int | None] = {}
    for v, model in models.items():
        flops[v.label] = train_step_flops(model, train_batch) if count_model_flops else None

    for model in models.values():
        model.eval()
    infers = {v.label: make_inference(m, infer_lq) for v, m in models.items()}
    infer_times = time_interleaved(infers, repeats=repeats, warmup=warmup, sync=sync)

    rows = []
    for v, model in models.items():
        step_s = train_times[v.label].median_s
        f = flops[v.label]
        achieved = None if f is None else f / step_s / 1e9
        rows.append(
            {
                "preset": v.preset,
                "norm": v.norm,
                "attention": v.attention,
                "label": v.label,
                "params": sum(p.numel() for p in model.parameters()),
                "hparams": {
                    k: model.hparams[k]
                    for k in ("stdnorm", "affine_outer", "eps", "embed_dim", "window_size")
                },
                "train_step": train_times[v.label].to_dict(),
                "inference": infer_times[v.label].to_dict(),
                "memory_train_step": memory[v.label],
                "flops_per_step": f,
                "achieved_gflops": achieved,
                "matmul_peak_gflops": matmul_gflops,
                "pct_of_matmul_peak": None
                if achieved is None or not matmul_gflops
                else 100.0 * achieved / matmul_gflops,
            }
        )
    return rows


def attention_agreement(
    preset: str, norm: str, *, scale: int, size: int, device: torch.device, seed: int
) -> dict[str, float]:
    """Max |fast - naive| of outputs (inference and autograd paths) and gradients on one image."""
    fast_v, naive_v = Variant(preset, norm, "fast"), Variant(preset, norm, "naive")
    models = build_variants([fast_v, naive_v], scale=scale, device=device, seed=seed)
    lq = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1)).to(
        device
    )  # (1, 3, H, W)
    infer = output_difference(models[fast_v], models[naive_v], lq, with_grad=False)
    train = output_difference(models[fast_v], models[naive_v], lq, with_grad=True)
    return {
        "inference_output": infer["output"],
        "train_output": train["output"],
        "train_grad": train["grad"],
    }


def profile_train_steps(
    variants: Sequence[Variant],
    *,
    scale: int,
    batch: int,
    lr_patch: int,
    device: torch.device,
    seed: int,
    limit: int,
) -> dict[str, dict[str, Any]]:
    """``top_ops`` of one training step (after one warm-up step) per variant, built one at
    a time so that only one model is alive while it is profiled."""
    profiles = {}
    for v in variants:
        model = build_variants([v], scale=scale, device=device, seed=seed)[v]
        model.train()
        data = random_batch(
            batch, lr_patch, scale, device=device, generator=torch.Generator().manual_seed(seed)
        )
        step = make_train_step(
            model,
            data,
            make_adam(model),
            generator=torch.Generator(device=device).manual_seed(seed),
        )
        step()  # warm-up outside the profile
        profiles[v.label] = top_ops(step, device=device, limit=limit)
    return profiles


# ----------------------------------------------------------------------------- bicubic


def random_image(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, C) noise: resizing costs the same for any content, so noise stands in for a photo."""
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def benchmark_bicubic(
    image: np.ndarray,
    scales: Sequence[int],
    *,
    repeats: int,
    warmup: int,
    crop: int,
    reference_repeats: int,
) -> dict[str, Any]:
    """Throughput of ``bicubic_downsample`` on ``image`` and its speedup over the
    straightforward per-pixel ``imresize_reference`` on a ``crop`` x ``crop`` corner.

    The reference is pure Python (minutes on a full DIV2K image), hence the crop; both
    implementations run on the same crop and must give identical uint8 output.
    """
    from iln.data.degrade import bicubic_downsample, imresize_reference, round_to_uint8

    patch = np.ascontiguousarray(image[:crop, :crop])
    out: dict[str, Any] = {
        "image_shape": list(image.shape),
        "crop": list(patch.shape),
        "scales": {},
    }
    for s in scales:
        full = time_callable(lambda: bicubic_downsample(image, s), repeats=repeats, warmup=warmup)
        fast_crop = time_callable(
            lambda: bicubic_downsample(patch, s), repeats=repeats, warmup=warmup
        )
        results: list[np.ndarray] = []
        ref_crop = time_callable(
            lambda: results.append(round_to_uint8(imresize_reference(patch, 1.0 / s))),
            repeats=reference_repeats,
            warmup=0,
        )
        fast_out = bicubic_downsample(patch, s)
        out["scales"][str(s)] = {
            "timing": full.to_dict(),
            "images_per_s": 1.0 / full.median_s,
            "megapixels_per_s": image.shape[0] * image.shape[1] / full.median_s / 1e6,
            "crop_fast": fast_crop.to_dict(),
            "crop_reference": ref_crop.to_dict(),
            "speedup_vs_reference": ref_crop.median_s / fast_crop.median_s,
            "identical_uint8": bool(all(np.array_equal(fast_out, r) for r in results)),
        }
    return out


# ----------------------------------------------------------------------------- report


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: software versions, device, threads, CPU, load."""
    cpu_model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info


def paired_ratio(
    numerator: Mapping[str, Any], denominator: Mapping[str, Any], *, key: str = "samples_s"
) -> float | None:
    """Median over rounds of (numerator sample / denominator sample).

    Interleaved timing puts the two samples of a round next to each other in time, so
    their ratio cancels most of the machine's load drift; the median drops the rounds a
    neighbour process disturbed. ``key="cpu_samples_s"`` gives the CPU-time ratio (None
    when CPU times were not recorded).
    """
    if numerator.get(key) is None or denominator.get(key) is None:
        return None
    pairs = zip(numerator[key], denominator[key], strict=True)
    return statistics.median(a / b for a, b in pairs)


def iln_ratios(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """i-LN / LN training-step time per preset (fast attention rows only).

    The target is judged on the paired ratio; the ratio of medians and of minima are
    kept as cross-checks (on a quiet machine all three agree).
    """
    by_key = {(r["preset"], r["norm"]): r for r in rows if r["attention"] == "fast"}
    ratios = {}
    for (preset, norm), row in by_key.items():
        ln = by_key.get((preset, "ln"))
        if norm != "iln" or ln is None:
            continue
        ratio = paired_ratio(row["train_step"], ln["train_step"])
        target = TARGETS["iln_over_ln_max"] if preset in TARGET_PRESETS else None
        ratios[preset] = {
            "iln_over_ln_train_step": ratio,
            "iln_over_ln_train_step_of_medians": row["train_step"]["median_s"]
            / ln["train_step"]["median_s"],
            "iln_over_ln_train_step_of_minima": row["train_step"]["min_s"]
            / ln["train_step"]["min_s"],
            "iln_over_ln_train_step_cpu_time": paired_ratio(
                row["train_step"], ln["train_step"], key="cpu_samples_s"
            ),
            "iln_over_ln_inference": paired_ratio(row["inference"], ln["inference"]),
            "target_max": target,
            "meets_target": None if target is None else ratio <= target,
        }
    return ratios


def attention_summary(
    rows: Sequence[Mapping[str, Any]], agreement: Mapping[str, float] | None
) -> dict[str, Any] | None:
    """Naive / fast training-step time of the attention-comparison preset."""
    naive = next((r for r in rows if r["attention"] == "naive"), None)
    if naive is None:
        return None
    fast = next(
        r
        for r in rows
        if (r["preset"], r["norm"], r["attention"]) == (naive["preset"], naive["norm"], "fast")
    )
    speedup = paired_ratio(naive["train_step"], fast["train_step"])
    out: dict[str, Any] = {
        "preset": naive["preset"],
        "norm": naive["norm"],
        "train_speedup_fast_over_naive": speedup,
        "train_speedup_of_medians": naive["train_step"]["median_s"]
        / fast["train_step"]["median_s"],
        "train_speedup_cpu_time": paired_ratio(
            naive["train_step"], fast["train_step"], key="cpu_samples_s"
        ),
        "inference_speedup_fast_over_naive": paired_ratio(naive["inference"], fast["inference"]),
        "target_speedup_min": TARGETS["attention_speedup_min"],
        "meets_speed_target": speedup >= TARGETS["attention_speedup_min"],
        "max_abs_diff": dict(agreement) if agreement is not None else None,
        "tolerance": TARGETS["attention_max_abs_diff"],
    }
    if agreement is not None:
        out["outputs_agree"] = (
            max(agreement["inference_output"], agreement["train_output"])
            <= TARGETS["attention_max_abs_diff"]
        )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else format(value, spec)
    )


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def markdown_report(result: Mapping[str, Any]) -> str:
    """The JSON result as markdown tables (what the README shows)."""
    m, s = result["machine"], result["settings"]
    lines = [
        f"Device `{m['device']}` ({m['cpu_model'] or m.get('cuda_device', '?')}), torch {m['torch']}, "
        f"{m['torch_threads']} thread(s), load average at start {_fmt((m['load_average'] or [None])[0], '.2f')}; "
        f"x{s['scale']}, batch {s['batch']}, LR patch {s['lr_patch']}, inference on one "
        f"{s['infer_size']}x{s['infer_size']} LR image; median of {s['repeats']} after {s['warmup']} warm-up.",
        "",
    ]
    peak = result.get("matmul_peak")
    if peak:
        lines += [
            f"fp32 matmul peak ({peak['n']}x{peak['n']}), measured before each preset's group (the % column uses "
            f"that measurement): {peak['gflops_min']:.1f} to {peak['gflops_max']:.1f} GFLOP/s.",
            "",
        ]
    lines += [
        "| model | params | train step (s) | inference (s) | step peak memory (MiB) | process RSS peak (MiB) "
        "| GFLOP/step | GFLOP/s | % of matmul peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        f = r["flops_per_step"]
        lines.append(
            f"| {r['label']} | {r['params']:,} | {_fmt(r['train_step']['median_s'], '.3f')} | "
            f"{_fmt(r['inference']['median_s'], '.3f')} | {_mib(r['memory_train_step']['step_peak_bytes'])} | "
            f"{_mib(r['memory_train_step']['rss_peak_bytes'])} | "
            f"{_fmt(None if f is None else f / 1e9, '.2f')} | {_fmt(r['achieved_gflops'], '.1f')} | "
            f"{_fmt(r['pct_of_matmul_peak'], '.0f')} |"
        )
    if result["ratios"]:
        lines += [
            "",
            "i-LN / LN time, median over rounds of the paired ratio (ratio of medians, of minima in brackets; "
            "CPU time: the same paired ratio of process CPU time):",
            "",
            "| preset | train step | train step, CPU time | inference | target (train step) |",
            "|---|---:|---:|---:|---|",
        ]
        for preset, r in result["ratios"].items():
            target = (
                "-"
                if r["target_max"] is None
                else f"<= {r['target_max']:.2f} " + ("met" if r["meets_target"] else "MISSED")
            )
            lines.append(
                f"| {preset} | {r['iln_over_ln_train_step']:.3f} ({r['iln_over_ln_train_step_of_medians']:.3f}, "
                f"{r['iln_over_ln_train_step_of_minima']:.3f}) | {_fmt(r['iln_over_ln_train_step_cpu_time'], '.3f')} | "
                f"{r['iln_over_ln_inference']:.3f} | {target} |"
            )
    a = result.get("attention")
    if a:
        diff = a["max_abs_diff"] or {}
        lines += [
            "",
            f"Attention on {a['preset']}/{a['norm']}: fused path {a['train_speedup_fast_over_naive']:.2f}x faster "
            f"per training step than the straightforward one (target >= {a['target_speedup_min']:.2f}: "
            f"{'met' if a['meets_speed_target'] else 'MISSED'}; CPU time {_fmt(a['train_speedup_cpu_time'], '.2f')}x), "
            f"{a['inference_speedup_fast_over_naive']:.2f}x "
            f"at inference; max |fast - naive|: output {_fmt(diff.get('train_output'), '.1e')} (autograd path), "
            f"{_fmt(diff.get('inference_output'), '.1e')} (inference), gradients {_fmt(diff.get('train_grad'), '.1e')}.",
        ]
    b = result.get("bicubic")
    if b:
        h, w = b["image_shape"][:2]
        ch, cw = b["crop"][:2]
        lines += [
            "",
            f"| bicubic x | images/s ({w}x{h}) | MPix/s | speedup vs reference ({cw}x{ch} crop) | identical uint8 |",
            "|---|---:|---:|---:|---|",
        ]
        for sc, r in b["scales"].items():
            lines.append(
                f"| {sc} | {r['images_per_s']:.2f} | {r['megapixels_per_s']:.1f} | {r['speedup_vs_reference']:.0f}x | "
                f"{'yes' if r['identical_uint8'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """The whole benchmark, as configured by the parsed CLI arguments."""
    device = resolve_device(args.device)
    log = (
        (lambda msg: print(msg, file=sys.stderr, flush=True))
        if not args.silent
        else (lambda msg: None)
    )
    result: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "command": ["python", "-m", "iln.bench", *argv],
        "machine": machine_info(device),
        "settings": {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "scale": args.scale,
            "batch": args.batch,
            "lr_patch": args.lr_patch,
            "infer_size": args.infer_size,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "presets": list(args.presets),
            "norms": list(args.norms),
            "attention_preset": args.attention_preset,
            "quick": args.quick,
        },
        "targets": dict(TARGETS),
    }
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)

    peaks: list[dict[str, Any]] = []
    presets = list(dict.fromkeys(args.presets))
    attention_preset = None if "attention" in args.skip else args.attention_preset
    if attention_preset is not None and attention_preset not in presets:
        presets.append(attention_preset)
    rows: list[dict[str, Any]] = []
    for preset in presets:
        variants = [Variant(preset, norm) for norm in args.norms] if preset in args.presets else []
        if preset == attention_preset:
            if Variant(preset, args.norms[0]) not in variants:
                variants.insert(0, Variant(preset, args.norms[0]))
            variants.append(Variant(preset, args.norms[0], "naive"))
        matmul_gflops = None
        if (
            "flops" not in args.skip
        ):  # re-measured per preset: the machine's load changes over a run
            log(f"matmul peak ({args.matmul_n}x{args.matmul_n}) ...")
            peaks.append(
                dict(
                    measure_matmul_peak(
                        args.matmul_n,
                        device=device,
                        repeats=args.repeats,
                        warmup=args.warmup,
                        generator=gen,
                    ),
                    preset=preset,
                )
            )
            matmul_gflops = peaks[-1]["gflops"]
        log(f"{preset}: {', '.join(v.label for v in variants)} ...")
        rows += benchmark_group(
            variants,
            scale=args.scale,
            batch=args.batch,
            lr_patch=args.lr_patch,
            infer_size=args.infer_size,
            device=device,
            repeats=args.repeats,
            warmup=args.warmup,
            seed=args.seed,
            matmul_gflops=matmul_gflops,
            count_model_flops="flops" not in args.skip,
        )
    result["models"] = rows
    result["ratios"] = iln_ratios(rows)
    if peaks:
        gflops = [p["gflops"] for p in peaks]
        result["matmul_peak"] = {
            "n": args.matmul_n,
            "dtype": "float32",
            "gflops_min": min(gflops),
            "gflops_max": max(gflops),
            "measurements": peaks,
        }

    agreement = None
    if attention_preset is not None:
        log(f"{attention_preset}: fast vs naive attention outputs ...")
        agreement = attention_agreement(
            attention_preset,
            args.norms[0],
            scale=args.scale,
            size=args.lr_patch,
            device=device,
            seed=args.seed,
        )
    result["attention"] = attention_summary(rows, agreement)

    if args.profile:
        log("profiling one training step per variant ...")
        variants = [Variant(p, n) for p in args.presets for n in args.norms]
        if attention_preset is not None:
            variants.append(Variant(attention_preset, args.norms[0], "naive"))
        result["profile"] = profile_train_steps(
            variants,
            scale=args.scale,
            batch=args.batch,
            lr_patch=args.lr_patch,
            device=device,
            seed=args.seed,
            limit=args.profile,
        )

    if "bicubic" not in args.skip:
        log(f"bicubic {args.bicubic_shape[1]}x{args.bicubic_shape[0]} ...")
        image = random_image(
            (args.bicubic_shape[0], args.bicubic_shape[1], 3), np.random.default_rng(args.seed)
        )
        result["bicubic"] = benchmark_bicubic(
            image,
            args.bicubic_scales,
            repeats=args.repeats,
            warmup=args.warmup,
            crop=args.bicubic_crop,
            reference_repeats=args.reference_repeats,
        )
        for r in result["bicubic"]["scales"].values():
            r["meets_speedup_target"] = r["speedup_vs_reference"] >= TARGETS["bicubic_speedup_min"]
    result["machine"]["load_average_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    result["elapsed_s"] = time.perf_counter() - started
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m iln.bench",
        description="Time training steps, inference, memory and FLOP rate of the model presets for each norm, "
        "fast vs naive attention, and the bicubic degradation; write JSON and markdown.",
    )
    p.add_argument(
        "--presets",
        nargs="+",
        default=None,
        help="model presets (default hat_tiny hat_1 swinir_1; --quick: hat_tiny swinir_tiny)",
    )
    p.add_argument(
        "--norms",
        nargs="+",
        default=["ln", "iln"],
        help="norm variants; the first is used for the attention comparison (default ln iln)",
    )
    p.add_argument(
        "--attention-preset",
        default=None,
        help="preset timed with fast and naive attention (default hat_1; --quick: hat_tiny)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny presets, small sizes, few repeats (tests, CI)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results.json"),
        help="JSON path; the markdown table is written beside it with suffix .md",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    p.add_argument("--scale", type=int, default=2, choices=(2, 3, 4))
    p.add_argument("--batch", type=int, default=None, help="training batch (default 2; --quick 1)")
    p.add_argument(
        "--lr-patch", type=int, default=None, help="LR training patch side (default 64; --quick 16)"
    )
    p.add_argument(
        "--infer-size",
        type=int,
        default=None,
        help="LR inference image side (default 64; --quick 16)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--matmul-n",
        type=int,
        default=None,
        help="matmul side for the peak (default 2048; --quick 256)",
    )
    p.add_argument(
        "--bicubic-shape",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help=f"image for the bicubic throughput (default {DIV2K_SHAPE[0]} {DIV2K_SHAPE[1]}; --quick 96 128)",
    )
    p.add_argument("--bicubic-scales", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument(
        "--bicubic-crop",
        type=int,
        default=None,
        help="crop side for the reference comparison (default 256; --quick 24)",
    )
    p.add_argument(
        "--reference-repeats",
        type=int,
        default=None,
        help="repeats of the slow reference (default 3; --quick 1)",
    )
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=("attention", "bicubic", "flops"),
        help="sections to skip",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also record the top N ops of one training step per variant (torch.profiler)",
    )
    p.add_argument("--silent", action="store_true", help="no progress messages on stderr")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the size defaults, which depend on --quick, and check them."""
    quick = args.quick
    defaults = dict(
        presets=["hat_tiny", "swinir_tiny"] if quick else ["hat_tiny", "hat_1", "swinir_1"],
        attention_preset="hat_tiny" if quick else "hat_1",
        batch=1 if quick else 2,
        lr_patch=16 if quick else 64,
        infer_size=16 if quick else 64,
        repeats=2 if quick else 5,
        warmup=1,
        matmul_n=256 if quick else 2048,
        bicubic_shape=[96, 128] if quick else list(DIV2K_SHAPE[:2]),
        bicubic_crop=24 if quick else 256,
        reference_repeats=1 if quick else 3,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    from iln.models import ARCHS, NORMS

    for name in list(args.presets) + [args.attention_preset]:
        if name not in ARCHS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(ARCHS)}")
    for norm in args.norms:
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    for key in (
        "batch",
        "lr_patch",
        "infer_size",
        "repeats",
        "matmul_n",
        "bicubic_crop",
        "reference_repeats",
    ):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0 or args.threads < 0 or min(args.bicubic_shape) < 1:
        raise ValueError("--warmup and --threads must be >= 0 and --bicubic-shape positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = resolve_defaults(args)
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args, argv)
    table = markdown_report(result)
    write_json_atomic(args.out, result)
    write_text_atomic(args.out.with_suffix(".md"), table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
