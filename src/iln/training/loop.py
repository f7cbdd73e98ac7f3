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
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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

    Resumes from ``checkpoint_path`` when it holds a checkpoint of the same
    ``fingerprint``; a checkpoint of another configuration is ignored and overwritten.
    Under several processes rank 0 reads the checkpoint and sends it to the others, so only
    rank 0 needs the checkpoint folder.
    ``monitor(step, model, ema)`` runs on rank 0 before the first update (step 0) and every
    ``settings.probe_every`` steps; it returns feature-statistic rows (a non-finite
    ``magnitude`` in them stops training) and a validation PSNR, stored as ``val_psnr`` in
    that step's history row (every probe step is also a logged step).
    With ``settings.kld_weight`` > 0 the loss is ``L1 + kld_weight * FeatureKL penalty``
    (see ``iln.training.kld``); 0 trains on the plain L1 loss. The logged ``loss`` is the loss of the
    whole global batch. Non-finiteness of the loss is checked without a host sync every
    step: the step it first happened is kept on the device and read at every logged step
    and before every checkpoint.
    """
    distributed = world_size > 1
    local_batch = settings.batch_size // world_size
    if settings.batch_size % world_size:
        raise ValueError(
            f"train.batch_size: {settings.batch_size} is not divisible by the "
            f"{world_size} processes"
        )
    if local_batch % settings.accumulate:
        raise ValueError(
            f"train.accumulate: {settings.accumulate} micro-batches do not split the "
            f"{local_batch} samples each of the {world_size} processes trains per step "
            f"(train.batch_size {settings.batch_size})"
        )
    micro = local_batch // settings.accumulate
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer, scheduler = build_optimizer(model, settings)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
    history: list[dict[str, float]] = []
    monitor_rows: list[dict[str, Any]] = []
    start = 0

    state = (
        load_checkpoint(checkpoint_path, fingerprint, max_step=settings.iterations, warn=warn)
        if rank == 0
        else None
    )
    if distributed:  # every rank continues from rank 0's checkpoint, whatever its disk holds
        box = [state]
        torch.distributed.broadcast_object_list(box, src=0)
        state = box[0]
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], device)
        history, monitor_rows, start = (
            list(state["history"]),
            list(state["monitor"]),
            int(state["step"]),
        )

    train_model: nn.Module = model
    ddp: nn.parallel.DistributedDataParallel | None = None
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_model = ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if settings.compile:
        train_model = torch.compile(train_model)
    drop_sites = int(getattr(unwrap(model), "drop_sites", 0))  # our restorers draw per sample
    forward_options = {"checkpoint": True} if settings.grad_checkpoint else {}
    if settings.grad_checkpoint and not drop_sites:
        raise ValueError(
            f"train.grad_checkpoint: {type(unwrap(model)).__name__} has no blocks to checkpoint"
        )

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=StreamBatches(
            start, settings.iterations, settings.batch_size, rank, world_size
        ),
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(settings.seed),  # keeps the global RNG untouched
    )
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.amp)
    bar = tqdm(
        total=settings.iterations,
        initial=start,
        disable=not progress or rank != 0,
        desc="train",
        unit="it",
        dynamic_ncols=True,
    )
    model.train()
    step, last_saved = start, start
    last_good = Path(state["loaded_from"]) if state is not None else None
    never = 2**62
    first_bad = torch.full((), never, dtype=torch.int64, device=device)  # step, on the device

    def kept() -> str:
        """Where the last good checkpoint of THIS configuration is, for the divergence message."""
        if last_good is None:
            return (
                "no checkpoint of this configuration was written before (a rerun starts at step 0)"
            )
        return f"the last good checkpoint (step {last_saved}) is kept at {last_good}"

    def check_finite() -> None:
        """Raise if the loss of any rank was non-finite at some step so far (one host sync)."""
        bad = first_bad.clone()
        if distributed:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
        if int(bad) != never:
            bar.close()
            raise TrainingDiverged(f"loss became non-finite at step {int(bad)}; {kept()}")

    def global_loss(local: torch.Tensor) -> float:
        """The loss of the whole global batch (each rank holds the mean of its equal share)."""
        total = local.detach().clone()
        if distributed:
            torch.distributed.all_reduce(total)
            total /= world_size
        return float(total)

    def checkpoint(step: int) -> None:
        check_finite()
        if rank == 0:
            save_resume_state(
                {
                    "version": CHECKPOINT_VERSION,
                    "fingerprint": fingerprint,
                    "step": step,
                    "model": unwrap(model).state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(device),
                    "history": history,
                    "monitor": monitor_rows,
                },
                checkpoint_path,
            )
        if distributed:
            torch.distributed.barrier()

    timer, timer_step, seconds = time.perf_counter(), start, 0.0
    probing = monitor is not None and rank == 0 and settings.probe_every > 0

    def probe(step: int) -> float | None:
        rows, psnr = monitor(step, unwrap(model), ema)
        monitor_rows.extend({"step": step, **r} for r in rows)
        bad = [r["layer"] for r in rows if "magnitude" in r and not math.isfinite(r["magnitude"])]
        if bad:
            bar.close()
            raise TrainingDiverged(
                f"features of {', '.join(bad)} became non-finite at step {step}; {kept()}"
            )
        return psnr

    if probing and start == 0:
        probe(0)  # the initial model, before any update
    for batch in loader:
        lq_all = batch["lq"].to(device, non_blocking=True)  # (b, 3, p, p)
        gt_all = batch["gt"].to(device, non_blocking=True)  # (b, 3, s*p, s*p)
        noise_all = (
            drop_noise(
                settings.seed, step_samples(step, settings.batch_size, rank, world_size), drop_sites
            ).to(device, non_blocking=True)
            if drop_sites
            else None
        )  # (b, sites)
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for m in range(settings.accumulate):
            part = slice(m * micro, (m + 1) * micro)
            options = dict(forward_options)
            if noise_all is not None:
                options["drop_noise"] = noise_all[part]
            last = m == settings.accumulate - 1
            syncing = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
            feature_kl = FeatureKL(unwrap(model)) if settings.kld_weight > 0 else None
            with syncing:
                with (
                    torch.autocast(
                        device.type,
                        dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None,
                    ),
                    feature_kl or contextlib.nullcontext(),
                ):
                    output = train_model(lq_all[part], **options)  # (m, 3, s*p, s*p)
                    kld = feature_kl.penalty() if feature_kl is not None else None
                loss = F.l1_loss(output.float(), gt_all[part])
                if kld is not None:
                    loss = loss + settings.kld_weight * kld
                if settings.accumulate > 1:  # each micro-batch's share of the local mean
                    loss = loss / settings.accumulate
                scaler.scale(loss).backward()
            step_loss += loss.detach()
        first_bad = torch.where(  # the first step whose loss was not finite, without a sync
            torch.isfinite(step_loss) | (first_bad != never), first_bad, step + 1
        )
        if settings.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        update_ema(ema, unwrap(model), settings.ema_decay)
        step += 1
        bar.update(1)

        probe_now = probing and (step % settings.probe_every == 0 or step == settings.iterations)
        if step % settings.log_every == 0 or step == settings.iterations or probe_now:
            check_finite()
            now = time.perf_counter()
            seconds += now - timer
            row = {
                "step": step,
                "loss": global_loss(step_loss),
                "lr": float(scheduler.get_last_lr()[0]),
                "seconds_per_step": (now - timer) / (step - timer_step),
            }
            if on_log is not None and rank == 0:
                on_log(step, {k: v for k, v in row.items() if k != "step"})
            if probe_now:  # after the timing: probes do not count as training time
                val_psnr = probe(step)
                if val_psnr is not None:
                    row["val_psnr"] = val_psnr
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", s_per_it=f"{row['seconds_per_step']:.3f}")
            timer, timer_step = time.perf_counter(), step

        if step % settings.checkpoint_every == 0 or step == settings.iterations:
            checkpoint(step)
            last_saved, last_good = step, checkpoint_path
    bar.close()
    trained = step - start
    return ema, FitResult(
        steps=step,
        resumed_from=start,
        seconds_per_step=seconds / trained if trained else float("nan"),
        history=history,
        monitor_rows=monitor_rows,
    )
