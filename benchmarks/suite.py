"""Benchmark suite: training-step and inference time, peak memory, FLOP rate, the cost of
i-LN against LN, the fast path against the reference code, and bicubic degradation speed.

Everything runs in ONE process so that the ratios (i-LN / LN, reference / fast path,
reference / vectorised bicubic) compare like with like; compared variants are timed
round-robin and medians are reported (``benchmarks.timing`` says why).

Run ``python -m benchmarks.suite --help`` from the repository root. Absolute times depend
on the machine and its load; read the ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import multiprocessing
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.timing import (
    paired_ratio,
    random_pair,
    synchronizer,
    time_callable,
    time_interleaved,
    train_step,
)
from iln.util.files import write_json_atomic, write_text_atomic
from iln.util.device import resolve_device

SCHEMA_VERSION = 1
DIV2K_SHAPE = (1356, 2040, 3)  # a typical DIV2K training image, (H, W, C)
TARGETS = {
    "iln_over_ln_max": 1.03,  # i-LN may cost at most 3% more per training step
    "fast_path_speedup_min": 1.25,  # fast path at least 1.25x faster than the reference code
    "fast_path_max_abs_diff": 1e-5,  # and the same numbers
    "bicubic_speedup_min": 10.0,  # vectorised resize at least 10x faster than the reference
}
TARGET_PRESETS = ("hat_1", "swinir_1")  # presets the i-LN cost target applies to


# ----------------------------------------------------------------------------- model work


def seeded_train_step(model: nn.Module, lq: Tensor, gt: Tensor, *, seed: int) -> Callable:
    """``train_step`` with the stochastic-depth draws (B, model.drop_sites) fixed by ``seed``."""
    noise = torch.rand(lq.shape[0], model.drop_sites, generator=torch.Generator().manual_seed(seed))
    return train_step(model, lq, gt, drop_noise=noise.to(lq.device))


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of ``fn()`` as torch's FlopCounterMode counts them.

    It counts matmuls, convolutions and attention kernels (2 per multiply-add), forward and
    backward alike; elementwise work (norms, activations, the loss, Adam) is not counted,
    which is the usual convention for model FLOPs.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


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


def _peak_rss_growth_in_child(fn: Callable[[], object], conn) -> None:
    """In a forked child: the growth of the process's peak RSS while it runs ``fn()``."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    try:
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
        conn.send((after - before, after))
    except BaseException as err:  # report, do not hang the parent
        conn.send(err)
    finally:
        conn.close()


def measure_peak_memory(fn: Callable[[], object], *, device: torch.device) -> dict[str, Any]:
    """Peak memory of one call of ``fn()``, with the method that measured it.

    CUDA: ``step_peak_bytes`` is ``max_memory_allocated`` during the call minus the
    allocation before it (the tensors the call allocated). CPU, where torch keeps no
    allocator statistics: the call runs in a forked child process (the same model and
    tensors, copy-on-write), and ``step_peak_bytes`` is how much that child's peak RSS
    (``resource.getrusage``) grew during the call; ``rss_peak_bytes`` is the child's peak
    RSS itself. RSS counts pages, so memory the C allocator reuses from earlier work in
    the parent is not counted as growth: read it as the step's fresh working memory.
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
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_peak_rss_growth_in_child, args=(fn, send))
    child.start()
    send.close()
    answer = receive.recv()
    child.join()
    if isinstance(answer, BaseException):
        raise RuntimeError(f"memory measurement failed in the child process: {answer!r}")
    growth, peak = answer
    return {
        "method": "child_process_peak_rss_growth",
        "step_peak_bytes": int(growth),
        "allocated_peak_bytes": None,
        "rss_method": "child_process_peak_rss",
        "rss_peak_bytes": int(peak),
    }


# ----------------------------------------------------------------------------- model benchmark


@dataclass(frozen=True)
class Variant:
    """One model configuration to benchmark: preset x norm x code path
    (``fast``: the default fast path, ``reference``: ``build_model(..., fast=False)``)."""

    preset: str
    norm: str
    path: str = "fast"

    @property
    def label(self) -> str:
        return f"{self.preset}/{self.norm}" + ("" if self.path == "fast" else f"/{self.path}")


def build_variants(
    variants: Sequence[Variant], *, scale: int, device: torch.device, seed: int
) -> dict[Variant, nn.Module]:
    """Models of every variant, on ``device``.

    Variants that differ only in the code path share the weights of the first one
    built (state dict copied), so their outputs can be compared number for number.
    """
    from iln.models import build_model  # heavy import kept out of the timing helpers

    models: dict[Variant, nn.Module] = {}
    for v in variants:
        model = build_model(
            v.preset,
            norm=v.norm,
            scale=scale,
            fast=v.path == "fast",
            generator=torch.Generator().manual_seed(seed),
        )
        twin = next(
            (m for u, m in models.items() if (u.preset, u.norm) == (v.preset, v.norm)), None
        )
        if twin is not None:
            model.load_state_dict(twin.state_dict())
        models[v] = model.to(device)
    return models


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
    geometry = dict(scale=scale, device=device, seed=seed)
    models = build_variants(variants, **geometry)
    gen = torch.Generator().manual_seed(seed)
    lq, gt = random_pair(batch, lr_patch, scale, gen, device)
    infer_lq = torch.rand(1, 3, infer_size, infer_size, generator=gen).to(device)  # (1, 3, H, W)
    sync = synchronizer(device)

    steps = {v.label: seeded_train_step(m, lq, gt, seed=seed) for v, m in models.items()}
    train_times = time_interleaved(steps, repeats=repeats, warmup=warmup, sync=sync)
    memory = {label: measure_peak_memory(step, device=device) for label, step in steps.items()}

    # model FLOPs are those of the reference computation: the fast path's attention
    # backward recomputes the logits, work the architecture does not ask for; the Adam
    # update adds only uncounted elementwise work
    flops: dict[str, int | None] = {v.label: None for v in models}
    for v in models if count_model_flops else ():
        (reference,) = build_variants([Variant(v.preset, v.norm, "reference")], **geometry).values()
        reference.train()
        flops[v.label] = count_flops(lambda m=reference: F.l1_loss(m(lq), gt).backward())

    def inference(model: nn.Module) -> Callable[[], Tensor]:
        model.eval()

        def call() -> Tensor:
            with torch.inference_mode():  # as evaluation runs it
                return model(infer_lq)

        return call

    infers = {v.label: inference(m) for v, m in models.items()}
    infer_times = time_interleaved(infers, repeats=repeats, warmup=warmup, sync=sync)

    rows = []
    for v, model in models.items():
        f = flops[v.label]
        achieved = None if f is None else f / train_times[v.label].median_s / 1e9
        rows.append(
            {
                "preset": v.preset,
                "norm": v.norm,
                "path": v.path,
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


def fast_path_agreement(
    preset: str, norm: str, *, scale: int, size: int, device: torch.device, seed: int
) -> dict[str, float]:
    """Max |fast - reference| on one image, the two models holding the same weights, in
    eval mode: outputs of inference (torch's fused kernel), outputs and parameter gradients
    of mean |output| on the autograd path (the fast path's hand-written backwards)."""
    fast_v, reference_v = Variant(preset, norm), Variant(preset, norm, "reference")
    models = build_variants([fast_v, reference_v], scale=scale, device=device, seed=seed)
    pair = [models[fast_v].eval(), models[reference_v].eval()]
    lq = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    lq = lq.to(device)  # (1, 3, H, W)
    with torch.inference_mode():
        inferred = [model(lq) for model in pair]
    outs = []
    for model in pair:
        out = model(lq)  # (1, 3, s*H, s*W)
        out.abs().mean().backward()
        outs.append(out.detach())
    other = dict(pair[1].named_parameters())
    grads = [
        float((p.grad - other[name].grad).abs().max())
        for name, p in pair[0].named_parameters()
        if p.grad is not None and other[name].grad is not None
    ]
    return {
        "inference_output": float((inferred[0] - inferred[1]).abs().max()),
        "train_output": float((outs[0] - outs[1]).abs().max()),
        "train_grad": max(grads, default=0.0),
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
        lq, gt = random_pair(batch, lr_patch, scale, torch.Generator().manual_seed(seed), device)
        step = seeded_train_step(model, lq, gt, seed=seed)
        step()  # warm-up outside the profile
        profiles[v.label] = top_ops(step, device=device, limit=limit)
    return profiles


# ----------------------------------------------------------------------------- bicubic


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
    out: dict[str, Any] = {"image_shape": list(image.shape), "crop": list(patch.shape)}
    out["scales"] = {}
    for s in scales:
        full, fast_crop = (
            time_callable(
                functools.partial(bicubic_downsample, x, s), repeats=repeats, warmup=warmup
            )
            for x in (image, patch)
        )
        results: list[np.ndarray] = []

        def reference(s: int = s, results: list[np.ndarray] = results) -> None:
            results.append(round_to_uint8(imresize_reference(patch, 1.0 / s)))

        ref_crop = time_callable(reference, repeats=reference_repeats, warmup=0)
        fast_out = bicubic_downsample(patch, s)
        speedup = ref_crop.median_s / fast_crop.median_s
        out["scales"][str(s)] = {
            "timing": full.to_dict(),
            "images_per_s": 1.0 / full.median_s,
            "megapixels_per_s": image.shape[0] * image.shape[1] / full.median_s / 1e6,
            "crop_fast": fast_crop.to_dict(),
            "crop_reference": ref_crop.to_dict(),
            "speedup_vs_reference": speedup,
            "identical_uint8": bool(all(np.array_equal(fast_out, r) for r in results)),
            "meets_speedup_target": speedup >= TARGETS["bicubic_speedup_min"],
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


def iln_ratios(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """i-LN / LN training-step time per preset (fast-path rows only).

    The target is judged on the paired ratio; the ratio of medians and of minima are
    kept as cross-checks (on a quiet machine all three agree).
    """
    by_key = {(r["preset"], r["norm"]): r for r in rows if r["path"] == "fast"}
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


def fast_path_summary(
    rows: Sequence[Mapping[str, Any]], agreement: Mapping[str, float] | None
) -> dict[str, Any] | None:
    """Reference / fast training-step time of the path-comparison preset."""
    reference = next((r for r in rows if r["path"] == "reference"), None)
    if reference is None:
        return None
    fast = next(
        r
        for r in rows
        if (r["preset"], r["norm"], r["path"]) == (reference["preset"], reference["norm"], "fast")
    )
    speedup = paired_ratio(reference["train_step"], fast["train_step"])
    out: dict[str, Any] = {
        "preset": reference["preset"],
        "norm": reference["norm"],
        "train_speedup_fast_over_reference": speedup,
        "train_speedup_of_medians": reference["train_step"]["median_s"]
        / fast["train_step"]["median_s"],
        "train_speedup_cpu_time": paired_ratio(
            reference["train_step"], fast["train_step"], key="cpu_samples_s"
        ),
        "inference_speedup_fast_over_reference": paired_ratio(
            reference["inference"], fast["inference"]
        ),
        "target_speedup_min": TARGETS["fast_path_speedup_min"],
        "meets_speed_target": speedup >= TARGETS["fast_path_speedup_min"],
        "max_abs_diff": dict(agreement) if agreement is not None else None,
        "tolerance": TARGETS["fast_path_max_abs_diff"],
    }
    if agreement is not None:
        out["outputs_agree"] = (
            max(agreement["inference_output"], agreement["train_output"])
            <= TARGETS["fast_path_max_abs_diff"]
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
    cpu = m["cpu_model"] or m.get("cuda_device", "?")
    load = _fmt((m["load_average"] or [None])[0], ".2f")
    lines = [
        f"Device `{m['device']}` ({cpu}), torch {m['torch']}, "
        f"{m['torch_threads']} thread(s), load average at start {load}; "
        f"x{s['scale']}, batch {s['batch']}, LR patch {s['lr_patch']}, inference on one "
        f"{s['infer_size']}x{s['infer_size']} LR image; "
        f"median of {s['repeats']} after {s['warmup']} warm-up.",
        "",
    ]
    peak = result.get("matmul_peak")
    if peak:
        lines += [
            f"fp32 matmul peak ({peak['n']}x{peak['n']}), measured before each preset's group "
            f"(the % column uses that measurement): "
            f"{peak['gflops_min']:.1f} to {peak['gflops_max']:.1f} GFLOP/s.",
            "",
        ]
    lines += [
        "| model | params | train step (s) | inference (s) | step peak memory (MiB) "
        "| process RSS peak (MiB) | GFLOP/step | GFLOP/s | % of matmul peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        f, mem = r["flops_per_step"], r["memory_train_step"]
        cells = [
            r["label"],
            f"{r['params']:,}",
            _fmt(r["train_step"]["median_s"], ".3f"),
            _fmt(r["inference"]["median_s"], ".3f"),
            _mib(mem["step_peak_bytes"]),
            _mib(mem["rss_peak_bytes"]),
            _fmt(None if f is None else f / 1e9, ".2f"),
            _fmt(r["achieved_gflops"], ".1f"),
            _fmt(r["pct_of_matmul_peak"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if result["ratios"]:
        lines += [
            "",
            "i-LN / LN time, median over rounds of the paired ratio (ratio of medians, of "
            "minima in brackets; CPU time: the same paired ratio of process CPU time):",
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
            step = (
                f"{r['iln_over_ln_train_step']:.3f} "
                f"({r['iln_over_ln_train_step_of_medians']:.3f}, "
                f"{r['iln_over_ln_train_step_of_minima']:.3f})"
            )
            cpu_time = _fmt(r["iln_over_ln_train_step_cpu_time"], ".3f")
            lines.append(
                f"| {preset} | {step} | {cpu_time} | {r['iln_over_ln_inference']:.3f} | {target} |"
            )
    a = result.get("fast_path")
    if a:
        diff = a["max_abs_diff"] or {}
        verdict = "met" if a["meets_speed_target"] else "MISSED"
        lines += [
            "",
            f"Fast path on {a['preset']}/{a['norm']}: "
            f"{a['train_speedup_fast_over_reference']:.2f}x faster per training step than the "
            f"reference code (target >= {a['target_speedup_min']:.2f}: {verdict}; "
            f"CPU time {_fmt(a['train_speedup_cpu_time'], '.2f')}x), "
            f"{a['inference_speedup_fast_over_reference']:.2f}x at inference; "
            f"max |fast - reference|: output {_fmt(diff.get('train_output'), '.1e')} "
            f"(autograd path), {_fmt(diff.get('inference_output'), '.1e')} (inference), "
            f"gradients {_fmt(diff.get('train_grad'), '.1e')}.",
        ]
    b = result.get("bicubic")
    if b:
        h, w = b["image_shape"][:2]
        ch, cw = b["crop"][:2]
        lines += [
            "",
            f"| bicubic x | images/s ({w}x{h}) | MPix/s | "
            f"speedup vs reference ({cw}x{ch} crop) | identical uint8 |",
            "|---|---:|---:|---:|---|",
        ]
        for sc, r in b["scales"].items():
            lines.append(
                f"| {sc} | {r['images_per_s']:.2f} | {r['megapixels_per_s']:.1f} | "
                f"{r['speedup_vs_reference']:.0f}x | {'yes' if r['identical_uint8'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI


def model_groups(
    presets: Sequence[str], norms: Sequence[str], reference_preset: str | None
) -> list[tuple[str, list[Variant]]]:
    """The variants timed together, per preset: every norm on the fast path, and on the
    path-comparison preset the first norm on both paths."""
    groups = []
    for preset in dict.fromkeys([*presets, *([reference_preset] if reference_preset else [])]):
        variants = [Variant(preset, norm) for norm in norms] if preset in presets else []
        if preset == reference_preset:
            if Variant(preset, norms[0]) not in variants:
                variants.insert(0, Variant(preset, norms[0]))
            variants.append(Variant(preset, norms[0], "reference"))
        groups.append((preset, variants))
    return groups


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """The whole benchmark, as configured by the parsed CLI arguments."""
    device = args.device

    def log(msg: str) -> None:
        if not args.silent:
            print(msg, file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "command": ["python", "-m", "benchmarks.suite", *argv],
        "machine": machine_info(device),
        "settings": {"device": str(device), "threads": torch.get_num_threads()}
        | {key: getattr(args, key) for key in SETTINGS},
        "targets": dict(TARGETS),
    }
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    sizes = dict(scale=args.scale, batch=args.batch, lr_patch=args.lr_patch, device=device)
    reference_preset = None if "reference" in args.skip else args.reference_preset

    peaks: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for preset, variants in model_groups(args.presets, args.norms, reference_preset):
        matmul_gflops = None
        if "flops" not in args.skip:  # re-measured per preset: the machine's load changes
            log(f"matmul peak ({args.matmul_n}x{args.matmul_n}) ...")
            peak = measure_matmul_peak(
                args.matmul_n,
                device=device,
                repeats=args.repeats,
                warmup=args.warmup,
                generator=gen,
            )
            peaks.append(dict(peak, preset=preset))
            matmul_gflops = peak["gflops"]
        log(f"{preset}: {', '.join(v.label for v in variants)} ...")
        rows += benchmark_group(
            variants,
            **sizes,
            infer_size=args.infer_size,
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
    if reference_preset is not None:
        log(f"{reference_preset}: fast path vs reference outputs ...")
        agreement = fast_path_agreement(
            reference_preset,
            args.norms[0],
            scale=args.scale,
            size=args.lr_patch,
            device=device,
            seed=args.seed,
        )
    result["fast_path"] = fast_path_summary(rows, agreement)

    if args.profile:
        log("profiling one training step per variant ...")
        variants = [Variant(p, n) for p in args.presets for n in args.norms]
        if reference_preset is not None:
            variants.append(Variant(reference_preset, args.norms[0], "reference"))
        result["profile"] = profile_train_steps(
            variants, **sizes, seed=args.seed, limit=args.profile
        )

    if "bicubic" not in args.skip:
        h, w = args.bicubic_shape
        log(f"bicubic {w}x{h} ...")
        image = np.random.default_rng(args.seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
        result["bicubic"] = benchmark_bicubic(  # noise: resizing costs the same for any content
            image,
            args.bicubic_scales,
            repeats=args.repeats,
            warmup=args.warmup,
            crop=args.bicubic_crop,
            reference_repeats=args.reference_repeats,
        )
    result["machine"]["load_average_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    result["elapsed_s"] = time.perf_counter() - started
    return result


# the settings recorded in the JSON, besides the device and the threads
SETTINGS = (
    "scale",
    "batch",
    "lr_patch",
    "infer_size",
    "repeats",
    "warmup",
    "seed",
    "presets",
    "norms",
    "reference_preset",
    "quick",
)
# the size options: (default, default with --quick)
SIZES: dict[str, tuple[Any, Any]] = {
    "presets": (["hat_tiny", "hat_1", "swinir_1"], ["hat_tiny", "swinir_tiny"]),
    "reference_preset": ("hat_1", "hat_tiny"),
    "batch": (2, 1),
    "lr_patch": (64, 16),
    "infer_size": (64, 16),
    "repeats": (5, 2),
    "warmup": (1, 1),
    "matmul_n": (2048, 256),
    "bicubic_shape": (list(DIV2K_SHAPE[:2]), [96, 128]),
    "bicubic_crop": (256, 24),
    "reference_repeats": (3, 1),
}


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.suite",
        description="Time training steps, inference, memory and FLOP rate of the model presets "
        "for each norm, fast path vs reference code, and the bicubic degradation; write JSON "
        "and markdown.",
    )

    def sized(flag: str, what: str, **options: Any) -> None:
        """An option whose default depends on --quick (filled in by ``resolve_defaults``)."""
        full, quick = (" ".join(map(str, d)) if isinstance(d, list) else d for d in SIZES[flag])
        options.setdefault("type", _at_least(1))
        p.add_argument(
            f"--{flag.replace('_', '-')}",
            default=None,
            **options,
            help=f"{what} (default {full}; --quick {quick})",
        )

    sized("presets", "model presets", nargs="+", type=str)
    p.add_argument(
        "--norms",
        nargs="+",
        default=["ln", "iln"],
        help="norm variants; the first is used for the fast/reference comparison (default ln iln)",
    )
    sized("reference_preset", "preset timed with the fast path and the reference code", type=str)
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
        "--threads",
        type=_at_least(0),
        default=0,
        help="torch intra-op threads (0: torch's default)",
    )
    p.add_argument("--scale", type=int, default=2, choices=(2, 3, 4))
    sized("batch", "training batch")
    sized("lr_patch", "LR training patch side")
    sized("infer_size", "LR inference image side")
    sized("repeats", "timed repeats")
    sized("warmup", "untimed warm-up calls", type=_at_least(0))
    p.add_argument("--seed", type=int, default=0)
    sized("matmul_n", "matmul side for the peak")
    sized("bicubic_shape", "image for the bicubic throughput", nargs=2, metavar=("H", "W"))
    p.add_argument("--bicubic-scales", type=int, nargs="+", default=[2, 3, 4])
    sized("bicubic_crop", "crop side for the reference comparison")
    sized("reference_repeats", "repeats of the slow reference")
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=("reference", "bicubic", "flops"),
        help="sections to skip",
    )
    p.add_argument(
        "--profile",
        type=_at_least(0),
        default=0,
        metavar="N",
        help="also record the top N ops of one training step per variant (torch.profiler)",
    )
    p.add_argument("--silent", action="store_true", help="no progress messages on stderr")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the size defaults, which depend on --quick; check the names and the device."""
    for key, defaults in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, defaults[args.quick])
    from iln.models import ARCHS, NORMS

    for name in [*args.presets, args.reference_preset]:
        if name not in ARCHS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(ARCHS)}")
    for norm in args.norms:
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    try:
        args.device = resolve_device(args.device, key="--device")
    except RuntimeError as error:
        raise ValueError(str(error)) from None
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
