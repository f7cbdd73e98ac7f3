"""One process or many: the torchrun environment turned into (rank, world size, device)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from iln.runtime import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(env: Mapping[str, str], device_spec: str) -> DistInfo:
    """Join the process group torchrun describes in ``env`` (NCCL on CUDA, gloo on CPU).

    Without torchrun (no WORLD_SIZE, or 1) nothing is initialised.
    """
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank, key="train.device")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
