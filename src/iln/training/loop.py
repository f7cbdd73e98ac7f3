"""The training loop: L1, Adam, MultiStepLR, parameter EMA, atomic checkpoints, exact resume.

Determinism contract: every random decision of a step is a pure function of
``(seed, sample index)``, and step ``t`` consumes the global samples ``[t*B, (t+1)*B)``:
the patch, its augmentation and degradation (``iln.data.dataset.TrainPatches``) and the
stochastic-depth draws of every block (``drop_noise``). Rank ``r`` of ``W`` processes takes
its contiguous slice of each step's samples, and splits it into ``accumulate`` micro-batches
whose losses are weighted by their share of the global batch. So a run trained by W
processes (one node or several), with any accumulation and with activation checkpointing,
computes the run of one process at the same global batch, to float rounding, and a run
interrupted at any point and resumed from its last checkpoint ends with the same weights as
one that never stopped (on CPU, bit for bit). Exceptions: batch statistics (the
``batchnorm`` norms) see only the micro-batch; the global torch RNG (saved in every
checkpoint) serves only models outside this project that draw from it.

The loop (``fit``): a ``TrainState`` (model, EMA, optimiser, schedule, scaler, step and
records; ``state_dict`` is the checkpoint) is created and ``resume``d, then every step is one
``train_step``, and the steps its ``Schedule`` names are logged (``log_step``), probed
(``probe``) and checkpointed (``save_checkpoint``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from iln.config.params import TrainParams
from iln.training.kld import FeatureKL
from iln.training.resume import CHECKPOINT_VERSION, load_resume_state, save_resume_state
from iln.training.schedule import Schedule, agree_schedule
from iln.util.device import unwrap

LogFn = Callable[[int, dict[str, float]], None]
MonitorFn = Callable[[int, nn.Module, nn.Module], tuple[list[dict[str, Any]], float | None]]
"""monitor(step, model, ema) -> (feature rows of the model, validation PSNR of the EMA or None)."""
WarnFn = Callable[[str], None]


class TrainingDiverged(RuntimeError):
    """Loss or features became non-finite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class FitResult:
    steps: int
    resumed_from: int
    seconds_per_step: float
    history: list[dict[str, float]]
    monitor_rows: list[dict[str, Any]]


def step_samples(step: int, global_batch: int, rank: int, world_size: int) -> range:
    """The global sample indices rank ``rank`` of ``world_size`` trains on at step ``step``
    (0-based): ``step*B + rank*b + [0, b)`` with ``b = B / W``."""
    local = global_batch // world_size
    first = step * global_batch + rank * local
    return range(first, first + local)


class StreamBatches(torch.utils.data.Sampler[list[int]]):
    """Sample indices of steps ``start .. stop-1`` for one rank (``step_samples``)."""

    def __init__(
        self, start: int, stop: int, global_batch: int, rank: int, world_size: int
    ) -> None:
        if global_batch % world_size:
            raise ValueError(
                f"batch_size {global_batch} is not divisible by the {world_size} processes"
            )
        self.start, self.stop = start, stop
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield list(step_samples(step, self.global_batch, self.rank, self.world_size))


DROP_STREAM = 1  # seed-sequence key of the stochastic-depth draws (the patch draws use none)


def drop_noise(seed: int, samples: Iterable[int], sites: int) -> torch.Tensor:
    """Stochastic-depth draws (len(samples), sites) float32 in [0, 1): row j belongs to
    global sample ``samples[j]`` and is a pure function of ``(seed, sample)``, whichever
    process, micro-batch or recomputation uses it."""
    rows = [
        np.random.default_rng([seed, k, DROP_STREAM]).random(sites, dtype=np.float32)
        for k in samples
    ]
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, sites)


def adam(params: list[nn.Parameter], *, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam without weight decay; the fused kernel where the device has one (CPU, CUDA).

    On CPU the default per-tensor loop costs ~4x the fused step (swinir_1: 25 vs 6 ms).
    """
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=0.0, fused=fused)


def build_optimizer(model: nn.Module, settings: TrainParams) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adam(params, lr=settings.lr, betas=settings.betas)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, list(settings.milestones), settings.lr_gamma
    )
    return optimizer, scheduler


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters, in one multi-tensor update
    (``torch.optim.swa_utils``); buffers are copied."""
    ema_params = list(ema.parameters())
    if ema_params:
        update = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
        update(ema_params, [p.detach() for p in model.parameters()], None)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(
    path: Path, fingerprint: str, *, max_step: int | None = None, warn: WarnFn | None = None
) -> dict[str, Any] | None:
    """The newest usable checkpoint of this exact configuration at ``path`` (or the one
    kept before it), else None; see ``iln.training.resume``."""
    return load_resume_state(
        path,
        fingerprint,
        max_step=max_step if max_step is not None else 2**62,
        warn=warn or _stderr_warning,
    )


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class TrainState:
    """Everything a run continues from: the weights being trained, their EMA, the optimiser,
    the learning-rate schedule, the fp16 loss scaler, the step reached and the records so
    far. ``state_dict()`` is a checkpoint's content (without its version and fingerprint),
    ``load_state_dict`` resumes from one."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    monitor_rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def create(cls, model: nn.Module, settings: TrainParams, device: torch.device) -> TrainState:
        """Step 0 of ``model`` (moved to ``device``): its EMA twin is a copy of it."""
        model.to(device)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        optimizer, scheduler = build_optimizer(model, settings)
        scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
        return cls(model, ema, optimizer, scheduler, scaler, device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(self.device),
            "history": self.history,
            "monitor": self.monitor_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], self.device)
        self.history, self.monitor_rows = list(state["history"]), list(state["monitor"])
        self.step = int(state["step"])


def micro_batch_size(settings: TrainParams, world_size: int) -> int:
    """Samples per micro-batch: the global batch split between the processes, then into
    ``accumulate`` micro-batches; a split that does not divide raises, naming the key."""
    if settings.batch_size % world_size:
        raise ValueError(
            f"train.batch_size: {settings.batch_size} is not divisible by the "
            f"{world_size} processes"
        )
    local_batch = settings.batch_size // world_size
    if local_batch % settings.accumulate:
        raise ValueError(
            f"train.accumulate: {settings.accumulate} micro-batches do not split the "
            f"{local_batch} samples each of the {world_size} processes trains per step "
            f"(train.batch_size {settings.batch_size})"
        )
    return local_batch // settings.accumulate


def from_rank0(value: Any, world_size: int) -> Any:
    """Rank 0's ``value`` on every rank (a collective under several processes)."""
    if world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def resume(
    state: TrainState,
    path: Path,
    fingerprint: str,
    *,
    max_step: int,
    rank: int,
    world_size: int,
    warn: WarnFn | None,
) -> Path | None:
    """Load the checkpoint to continue from into ``state``: rank 0 reads it and sends it to
    the others, so only rank 0 needs the checkpoint folder. Returns the file it came from,
    or None (step 0)."""
    saved = load_checkpoint(path, fingerprint, max_step=max_step, warn=warn) if rank == 0 else None
    saved = from_rank0(saved, world_size)  # every rank continues from rank 0's checkpoint
    if saved is None:
        return None
    state.load_state_dict(saved)
    return Path(saved["loaded_from"])


@dataclass(frozen=True)
class StepSetup:
    """What every step of this process uses besides the state: the model as called (wrapped
    for DDP, compiled), this process's share of the batch and the stochastic-depth sites."""

    settings: TrainParams
    forward: nn.Module
    ddp: nn.parallel.DistributedDataParallel | None
    micro: int
    drop_sites: int
    rank: int
    world_size: int


def step_setup(
    model: nn.Module, settings: TrainParams, device: torch.device, *, rank: int, world_size: int
) -> StepSetup:
    micro = micro_batch_size(settings, world_size)
    ddp = None
    forward: nn.Module = model
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        forward = ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if settings.compile:
        forward = torch.compile(forward)
    drop_sites = int(getattr(unwrap(model), "drop_sites", 0))  # our restorers draw per sample
    if settings.grad_checkpoint and not drop_sites:
        raise ValueError(
            f"train.grad_checkpoint: {type(unwrap(model)).__name__} has no blocks to checkpoint"
        )
    return StepSetup(settings, forward, ddp, micro, drop_sites, rank, world_size)


def step_loader(
    dataset: torch.utils.data.Dataset,
    settings: TrainParams,
    device: torch.device,
    *,
    start: int,
    rank: int,
    world_size: int,
) -> torch.utils.data.DataLoader:
    """This process's share of the batches of steps ``start .. iterations-1``."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=StreamBatches(
            start, settings.iterations, settings.batch_size, rank, world_size
        ),
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(settings.seed),  # keeps the global RNG untouched
    )


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(amp: str, device: torch.device) -> torch.autocast:
    """Mixed precision as ``train.amp`` says (``fp32``: off)."""
    dtype = AMP_DTYPES.get(amp)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def step_noise(setup: StepSetup, step: int, device: torch.device) -> torch.Tensor | None:
    """The stochastic-depth draws (b, sites) of this process's samples of step ``step``."""
    if not setup.drop_sites:
        return None
    samples = step_samples(step, setup.settings.batch_size, setup.rank, setup.world_size)
    return drop_noise(setup.settings.seed, samples, setup.drop_sites).to(device, non_blocking=True)


def micro_batch_loss(
    setup: StepSetup,
    model: nn.Module,
    lq: torch.Tensor,
    gt: torch.Tensor,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """L1 (+ ``kld_weight`` x the feature KL penalty) of one micro-batch, as its share of
    the process's mean loss."""
    settings = setup.settings
    options: dict[str, Any] = {"checkpoint": True} if settings.grad_checkpoint else {}
    if noise is not None:
        options["drop_noise"] = noise
    feature_kl = FeatureKL(unwrap(model)) if settings.kld_weight > 0 else None
    with autocast(settings.amp, lq.device), feature_kl or contextlib.nullcontext():
        output = setup.forward(lq, **options)  # (m, 3, s*p, s*p)
        kld = feature_kl.penalty() if feature_kl is not None else None
    loss = F.l1_loss(output.float(), gt)
    if kld is not None:
        loss = loss + settings.kld_weight * kld
    if settings.accumulate > 1:  # each micro-batch's share of the local mean
        loss = loss / settings.accumulate
    return loss


def gradient_sync(setup: StepSetup, last: bool) -> contextlib.AbstractContextManager:
    """DDP reduces the gradients in the backward pass of the last micro-batch only."""
    return setup.ddp.no_sync() if setup.ddp is not None and not last else contextlib.nullcontext()


def optimizer_step(state: TrainState, settings: TrainParams) -> None:
    """Clip, step the optimiser, the scaler and the schedule, move the EMA; one step done."""
    if settings.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), settings.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    update_ema(state.ema, unwrap(state.model), settings.ema_decay)
    state.step += 1


def train_step(state: TrainState, setup: StepSetup, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One update on this process's share of step ``state.step``'s samples, in
    ``accumulate`` micro-batches; returns the share's mean loss (on the device, no sync)."""
    device = state.device
    lq_all = batch["lq"].to(device, non_blocking=True)  # (b, 3, p, p)
    gt_all = batch["gt"].to(device, non_blocking=True)  # (b, 3, s*p, s*p)
    noise_all = step_noise(setup, state.step, device)  # (b, sites)
    state.optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)
    accumulate = setup.settings.accumulate
    for m in range(accumulate):
        part = slice(m * setup.micro, (m + 1) * setup.micro)
        noise = noise_all[part] if noise_all is not None else None
        with gradient_sync(setup, last=m == accumulate - 1):
            loss = micro_batch_loss(setup, state.model, lq_all[part], gt_all[part], noise)
            state.scaler.scale(loss).backward()
        step_loss += loss.detach()
    optimizer_step(state, setup.settings)
    return step_loss


NEVER = 2**62  # the step of a divergence that did not happen


class DivergenceWatch:
    """The first step whose loss was not finite, kept on the device (no host sync per step),
    and where the last good checkpoint of this configuration is."""

    def __init__(self, device: torch.device, world_size: int, kept: Path | None, step: int):
        self.first_bad = torch.full((), NEVER, dtype=torch.int64, device=device)
        self.world_size, self.kept, self.saved_step = world_size, kept, step

    def record(self, step: int, step_loss: torch.Tensor) -> None:
        self.first_bad = torch.where(
            torch.isfinite(step_loss) | (self.first_bad != NEVER), self.first_bad, step
        )

    def saved(self, step: int, path: Path) -> None:
        self.saved_step, self.kept = step, path

    def where_kept(self) -> str:
        if self.kept is None:
            return (
                "no checkpoint of this configuration was written before (a rerun starts at step 0)"
            )
        return f"the last good checkpoint (step {self.saved_step}) is kept at {self.kept}"

    def check(self) -> None:
        """Raise if the loss of any rank was non-finite so far (a collective: one host sync)."""
        bad = self.first_bad.clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
        if int(bad) != NEVER:
            step = int(bad)
            raise TrainingDiverged(f"loss became non-finite at step {step}; {self.where_kept()}")

    def check_features(self, rows: list[dict[str, Any]], step: int) -> None:
        bad = [r["layer"] for r in rows if "magnitude" in r and not math.isfinite(r["magnitude"])]
        if bad:
            raise TrainingDiverged(
                f"features of {', '.join(bad)} became non-finite at step {step}; "
                f"{self.where_kept()}"
            )


class StepClock:
    """Seconds per step between logged steps; probes and checkpoints between them count."""

    def __init__(self, step: int) -> None:
        self.start, self.step, self.total = time.perf_counter(), step, 0.0

    def lap(self, step: int) -> float:
        now = time.perf_counter()
        self.total += now - self.start
        return (now - self.start) / (step - self.step)

    def restart(self, step: int) -> None:
        self.start, self.step = time.perf_counter(), step


def global_loss(local: torch.Tensor, world_size: int) -> float:
    """The loss of the whole global batch (each rank holds the mean of its equal share)."""
    total = local.detach().clone()
    if world_size > 1:
        torch.distributed.all_reduce(total)
        total /= world_size
    return float(total)


def log_step(
    state: TrainState,
    step_loss: torch.Tensor,
    watch: DivergenceWatch,
    clock: StepClock,
    *,
    on_log: LogFn | None,
    monitor: MonitorFn | None,
) -> dict[str, float]:
    """Append the history row of a logged step; every rank calls it at the same steps (the
    finite check and the global loss are collectives). ``on_log`` gets the row (rank 0);
    ``monitor``, given at a probe step on rank 0, adds its validation PSNR to the row."""
    watch.check()
    seconds_per_step = clock.lap(state.step)
    row = {
        "step": state.step,
        "loss": global_loss(step_loss, watch.world_size),
        "lr": float(state.scheduler.get_last_lr()[0]),
        "seconds_per_step": seconds_per_step,
    }
    if on_log is not None:
        on_log(state.step, {k: v for k, v in row.items() if k != "step"})
    if monitor is not None:  # after the timing: probes do not count as training time
        val_psnr = probe(state, monitor, watch)
        if val_psnr is not None:
            row["val_psnr"] = val_psnr
    state.history.append(row)
    return row


def probe(state: TrainState, monitor: MonitorFn, watch: DivergenceWatch) -> float | None:
    """Run the monitor on rank 0 (no collective); its rows join the state's records."""
    rows, psnr = monitor(state.step, unwrap(state.model), state.ema)
    state.monitor_rows.extend({"step": state.step, **r} for r in rows)
    watch.check_features(rows, state.step)
    return psnr


def save_checkpoint(
    state: TrainState, path: Path, fingerprint: str, watch: DivergenceWatch, *, rank: int
) -> None:
    """Check that no rank diverged, write the checkpoint on rank 0, wait for every rank."""
    watch.check()
    if rank == 0:
        saved = {"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, **state.state_dict()}
        save_resume_state(saved, path)
    if watch.world_size > 1:
        torch.distributed.barrier()
    watch.saved(state.step, path)


def fit_result(state: TrainState, start: int, clock: StepClock) -> FitResult:
    trained = state.step - start
    return FitResult(
        steps=state.step,
        resumed_from=start,
        seconds_per_step=clock.total / trained if trained else float("nan"),
        history=state.history,
        monitor_rows=state.monitor_rows,
    )


def progress_bar(settings: TrainParams, start: int, enabled: bool) -> tqdm:
    return tqdm(
        total=settings.iterations,
        initial=start,
        disable=not enabled,
        desc="train",
        unit="it",
        dynamic_ncols=True,
    )


def fit(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    settings: TrainParams,
    *,
    device: torch.device,
    checkpoint_path: Path,
    fingerprint: str,
    rank: int = 0,
    world_size: int = 1,
    on_log: LogFn | None = None,
    monitor: MonitorFn | None = None,
    progress: bool = True,
    warn: WarnFn | None = None,
) -> tuple[nn.Module, FitResult]:
    """Train ``model`` (built and seeded by the caller) and return its EMA twin.

    Resumes from the checkpoint of the same ``fingerprint`` at ``checkpoint_path``
    (``resume``). The ranks first agree on the schedule (``iln.training.schedule``), so every
    rank enters every collective. ``monitor(step, model, ema)`` runs on rank 0 at step 0 and
    every probe step: its feature rows (a non-finite ``magnitude`` stops training) join the
    records, its validation PSNR that step's history row. The logged ``loss`` is the loss of
    the global batch: L1, plus ``kld_weight`` x the feature KL penalty (``iln.training.kld``).
    """
    schedule = Schedule.of(settings)
    agree_schedule(schedule, world_size)
    micro_batch_size(settings, world_size)  # a batch that does not split fails before any work
    state = TrainState.create(model, settings, device)
    kept = resume(
        state,
        checkpoint_path,
        fingerprint,
        max_step=settings.iterations,
        rank=rank,
        world_size=world_size,
        warn=warn,
    )
    start = state.step
    setup = step_setup(model, settings, device, rank=rank, world_size=world_size)
    loader = step_loader(dataset, settings, device, start=start, rank=rank, world_size=world_size)
    watch = DivergenceWatch(device, world_size, kept, start)
    probing = monitor is not None and rank == 0 and settings.probe_every > 0
    with progress_bar(settings, start, enabled=progress and rank == 0) as bar:
        model.train()
        clock = StepClock(start)
        if probing and start == 0:
            probe(state, monitor, watch)  # the initial model, before any update
        for batch in loader:
            step_loss = train_step(state, setup, batch)
            watch.record(state.step, step_loss)
            bar.update(1)
            if schedule.logs(state.step):
                row = log_step(
                    state,
                    step_loss,
                    watch,
                    clock,
                    on_log=on_log if rank == 0 else None,
                    monitor=monitor if probing and schedule.probes(state.step) else None,
                )
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}", s_per_it=f"{row['seconds_per_step']:.3f}"
                )
                clock.restart(state.step)
            if schedule.checkpoints(state.step):
                save_checkpoint(state, checkpoint_path, fingerprint, watch, rank=rank)
    return state.ema, fit_result(state, start, clock)
