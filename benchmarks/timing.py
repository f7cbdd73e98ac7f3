"""Timing core of the benchmarks: repeated calls timed round-robin, medians, paired ratios,
and the training step they time.

Variants that are compared are timed round-robin (A, B, A, B, ...) rather than one after
the other: on a shared machine the load drifts over minutes, and interleaving spreads that
drift over both arms instead of charging it to one of them. Medians are reported because a
single preempted sample (another process waking up) would move a mean by far more than the
effect being measured.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iln.training.loop import adam

ADAM_LR, ADAM_BETAS = 2.0e-4, (0.9, 0.99)  # the official HAT_1 recipe (DESIGN section 5)


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
    gc_every_round: bool = True,
) -> dict[str, Timing]:
    """Median time of every function, calls interleaved round-robin.

    The warm-up calls (allocator growth, lazy init, one-time caches) are not timed. The
    starting function rotates every round so that none always runs right after the
    same neighbour. The garbage collector runs before each round (only before the first
    with ``gc_every_round=False``, for calls shorter than a collection) and is paused
    during it (as ``timeit`` does) so that a collection triggered by one arm is not
    charged to another.
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
        if gc_every_round or r == 0:
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
    fn: Callable[[], object],
    *,
    repeats: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
    gc_every_round: bool = True,
) -> Timing:
    """Median time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    timings = time_interleaved(
        {"fn": fn}, repeats=repeats, warmup=warmup, sync=sync, gc_every_round=gc_every_round
    )
    return timings["fn"]


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


def random_pair(
    batch: int,
    lr_patch: int,
    scale: int,
    generator: torch.Generator,
    device: torch.device = torch.device("cpu"),
) -> tuple[Tensor, Tensor]:
    """A random (lq, gt) pair of the training shapes, (B, 3, p, p) and (B, 3, s*p, s*p),
    drawn in that order; the values do not affect the time."""
    lq = torch.rand(batch, 3, lr_patch, lr_patch, generator=generator)
    gt = torch.rand(batch, 3, scale * lr_patch, scale * lr_patch, generator=generator)
    return lq.to(device), gt.to(device)


def train_step(
    model: nn.Module,
    lq: Tensor,
    gt: Tensor,
    *,
    drop_noise: Tensor | None = None,
    checkpoint: bool | None = None,
) -> Callable[[], Tensor]:
    """One training iteration as a closure: forward, L1 loss, backward, Adam step (the
    pipeline's fused Adam as the official recipe sets it: lr 2e-4, betas (0.9, 0.99)).

    The model is put in training mode and its weights change. ``drop_noise``
    (B, model.drop_sites) fixes stochastic depth, so that timing runs do not consume the
    global RNG; it and ``checkpoint`` are passed to the model only when given (the
    authors' models take neither).
    """
    optimizer = adam(list(model.parameters()), lr=ADAM_LR, betas=ADAM_BETAS)
    model.train()
    options: dict[str, Any] = {}
    if drop_noise is not None:
        options["drop_noise"] = drop_noise
    if checkpoint is not None:
        options["checkpoint"] = checkpoint

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.l1_loss(model(lq, **options), gt)  # output (B, 3, s*p, s*p)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step
