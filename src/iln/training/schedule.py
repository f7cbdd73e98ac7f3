"""When the training loop logs, probes and checkpoints, and the check that every process
agrees on it.

Under several processes every collective call (DDP's gradient reduction, the finite check
and global loss of a logged step, the barrier after a checkpoint) must be entered by every
rank at the same step, or the ranks wait for each other forever. So every such step is a
function of the settings alone (never of which rank probes, or whether it has a monitor),
and before the first step the ranks compare those settings (``agree_schedule``): a
mismatch is one error on every rank naming the key and the values, not a hang.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from iln.config.params import TrainParams


@dataclass(frozen=True)
class Schedule:
    """The settings that decide at which steps the processes exchange data: the number of
    steps, the split of each step's batch, the log, probe and checkpoint intervals, and
    whether the model is compiled (which changes how DDP reduces gradients)."""

    iterations: int
    batch_size: int
    accumulate: int
    log_every: int
    probe_every: int
    checkpoint_every: int
    compile: bool

    @classmethod
    def of(cls, settings: TrainParams) -> Schedule:
        fields = (f.name for f in dataclasses.fields(cls))
        return cls(**{name: getattr(settings, name) for name in fields})

    def probes(self, step: int) -> bool:
        """Whether step ``step`` (1-based, after its update) is probed (``probe_every`` > 0)."""
        return self.probe_every > 0 and (step % self.probe_every == 0 or step == self.iterations)

    def logs(self, step: int) -> bool:
        """Whether step ``step`` is logged (a collective on every rank): every ``log_every``
        steps, the last step, and every probe step, so that a probe's row has a loss."""
        return step % self.log_every == 0 or step == self.iterations or self.probes(step)

    def checkpoints(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.iterations


def schedule_mismatch(records: list[Schedule]) -> str | None:
    """The first key on which a rank's schedule differs from rank 0's, as one line, or None."""
    for rank, record in enumerate(records[1:], start=1):
        for field in dataclasses.fields(Schedule):
            ours, theirs = getattr(records[0], field.name), getattr(record, field.name)
            if ours != theirs:
                return (
                    f"train.{field.name} differs between the processes: {ours} on rank 0, "
                    f"{theirs} on rank {rank}; every node must train with the same params "
                    "(they decide at which steps the processes exchange data)"
                )
    return None


def agree_schedule(schedule: Schedule, world_size: int) -> None:
    """Raise on every rank unless every rank of the process group has the same ``schedule``
    (one all_gather; nothing under one process)."""
    if world_size == 1:
        return
    records: list[Schedule | None] = [None] * world_size
    torch.distributed.all_gather_object(records, schedule)
    mismatch = schedule_mismatch(records)
    if mismatch is not None:
        raise RuntimeError(mismatch)
