"""One process or many: the torchrun environment turned into (rank, world size, device)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from iln.util.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_device(spec: str, local_rank: int, local_world_size: int, *, key: str) -> torch.device:
    """The device of the process with ``local_rank`` among ``local_world_size`` on its node.

    ``auto`` and ``cuda`` give GPU ``local_rank``; ``cuda:N`` gives GPU ``N + local_rank``
    (one process: GPU N; several: a block of GPUs starting at N); ``cpu`` is the CPU for every
    process. A spec naming more GPUs than the node has raises, naming ``key``.
    """
    if spec in ("auto", "cuda") and (spec == "cuda" or torch.cuda.is_available()):
        spec = "cuda:0"
    if not spec.startswith("cuda:"):
        if spec == "mps" and local_world_size > 1:
            raise RuntimeError(
                f"{key}: mps runs one process only (torchrun gave {local_world_size})"
            )
        return resolve_device(spec, local_rank, key=key)
    first = int(spec.split(":", 1)[1])
    if not torch.cuda.is_available():
        raise RuntimeError(f"{key}: {spec!r} but no CUDA device is available (use auto or cpu)")
    count = torch.cuda.device_count()
    index = first + local_rank
    if index >= count:
        raise RuntimeError(
            f"{key}: {spec!r} with {local_world_size} processes on this node needs GPUs "
            f"{first}..{first + local_world_size - 1}, but it has {count}"
        )
    return torch.device("cuda", index)


def init_distributed(env: Mapping[str, str], device_spec: str) -> DistInfo:
    """Join the process group torchrun describes in ``env`` (NCCL on CUDA, gloo on CPU), on
    this process's device (``process_device``).

    Without torchrun (no WORLD_SIZE, or 1) nothing is initialised.
    """
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", "1"))
    device = process_device(device_spec, local_rank, local_world_size, key="train.device")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def agree(info: DistInfo, value: str, what: str) -> None:
    """Raise on every rank unless every rank computed the same ``value`` (e.g. the run's
    fingerprint: same code, params and training data on every node)."""
    if info.world_size == 1:
        return
    values: list[str | None] = [None] * info.world_size
    dist.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise RuntimeError(
            f"{what} differs between rank 0 and rank(s) {', '.join(map(str, differ))}: every "
            "node must see the same project folder (code, params.yaml and data/pairs)"
        )


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
