"""The training dynamics as each norm's change from its own first probe (step 0): the
headline, the figure captions and the README say "LN grows x670, i-LN shrinks x0.04", never a
ratio between two norms whose step-0 values already differ.

Every sentence here is computed from the probes it describes: "stays within 2x of its step-0
value" only where the last value is within a factor STEADY of the first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from iln.report.runs import RunResults

STEADY = 2.0  # a change within this factor either way "stays within 2x of its step-0 value"


@dataclass(frozen=True)
class Change:
    """One statistic of one layer from the first to the last training probe."""

    first_step: int
    first: float
    last_step: int
    last: float

    @property
    def factor(self) -> float:
        """last / first (inf or nan where first is 0)."""
        if self.first == 0:
            return math.inf if self.last > 0 else math.nan
        return self.last / self.first


def deepest_change(run: RunResults, stat: str) -> Change | None:
    """The deepest group's ``stat`` at the run's first and last probe (None: fewer than two
    probe steps, or no finite value at either)."""
    layers = run.group_layers()
    if not layers:
        return None
    steps, values = run.curve(layers[-1], stat)
    if len(steps) < 2 or not (math.isfinite(values[0]) and math.isfinite(values[-1])):
        return None
    return Change(steps[0], values[0], steps[-1], values[-1])


def _fold(factor: float) -> str:
    """x0.04 as "25-fold" (the reciprocal, for a shrinkage)."""
    return f"{1 / factor:.2g}-fold"


def growth_phrase(change: Change) -> str:
    """What a magnitude did, with its numbers: "grows x670 (2.1 at step 0 -> 1.4e+03 at step
    600)", "shrinks 25-fold, to x0.04 (...)" or "stays within 2x of its step-0 value, x1.3
    (...)"."""
    values = (
        f"{change.first:.3g} at step {change.first_step} → {change.last:.3g} at step "
        f"{change.last_step}"
    )
    factor = change.factor
    if not math.isfinite(factor):
        return f"changes from {values}"
    if 1 / STEADY <= factor <= STEADY:
        start = f"its step-{change.first_step} value"
        return f"stays within {STEADY:g}x of {start}, x{factor:.2g} ({values})"
    if factor > STEADY:
        return f"grows x{factor:.3g} ({values})"
    return f"shrinks {_fold(factor)}, to x{factor:.2g} ({values})"


def entropy_phrase(change: Change, ceiling: float | None) -> str:
    """What a channel entropy did: "3.18 -> 0.83 nats (ceiling ln C = 3.47)"."""
    tail = f" (ceiling ln C = {ceiling:.2f})" if ceiling is not None else ""
    return (
        f"{change.first:.2f} at step {change.first_step} → {change.last:.2f} nats at step "
        f"{change.last_step}{tail}"
    )


def _ceiling(run: RunResults) -> float | None:
    values = [float(r["entropy_ceiling"]) for r in run.probes or []]
    return max(values) if values else None


def dynamics_sentence(runs: Sequence[RunResults], labels: dict[str, str], stat: str) -> str:
    """One sentence over the runs: each run's deepest group from its first to its last probe
    ("" where no run has two probes). ``labels``: run name -> legend label."""
    parts = []
    for run in runs:
        change = deepest_change(run, stat)
        if change is None:
            continue
        label = labels.get(run.info.name, run.info.label)
        if stat == "entropy":
            parts.append(f"{label} {entropy_phrase(change, _ceiling(run))}")
        else:
            parts.append(f"{label} {growth_phrase(change)}")
    if not parts:
        return ""
    what = {"magnitude": "feature magnitude", "entropy": "channel entropy", "max_abs": "max |x|"}
    return f"Deepest group's {what.get(stat, stat)}, first to last probe: " + "; ".join(parts) + "."
