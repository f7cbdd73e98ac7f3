"""Initial weights from another run or a released file (``runs.R.init``), instead of a fresh
initialisation: how SwinIR, KAIR and HAT-dagger train x3/x4 models from their x2 weights.

Every tensor of the model whose name and shape match a tensor of the source is carried over;
the others (e.g. an upsampler of another scale) keep their fresh initialisation and are
listed. The source's SHA-256 goes into the run's fingerprint, so a retrained source trains
the run afresh.

A source is read as strictly as the stages read weights: a run's ``model.pt`` through the
trained-model reader (its EMA weights, or the trained ones with ``key: params``), a file as a
released checkpoint is (inside the project, checked against and pinned in the checksum book,
its ``key`` present, no fallback to the other key). Every refusal is one line naming the
params key and the file; weights that are NaN or infinite are refused before step 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from iln.config.layout import Layout
from iln.config.params import InitSpec
from iln.models.checkpoint import official_key_map
from iln.weights.released import WeightsRecord, read_basicsr, sha256_of, verify_weights
from iln.weights.trained import read_trained


@dataclass(frozen=True)
class WarmStart:
    """What ``carry_weights`` did: the source, its digest, what was carried and what not."""

    source: str
    sha256: str
    carried: tuple[str, ...]
    fresh: tuple[str, ...]  # model tensors without a same-named, same-shaped source tensor
    unused: tuple[str, ...]  # source tensors the model has no place for

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "carried": len(self.carried),
            "fresh": list(self.fresh),
            "unused": list(self.unused),
        }


def open_init(init: InitSpec, where: str, layout: Layout, model: nn.Module) -> InitWeights:
    """The tensors ``init`` (the params key ``where``) names, in ``model``'s tensor names."""
    if init.run is not None:
        path = layout.weights(init.run)
        if not path.exists():
            raise FileNotFoundError(
                f"{where}.run: {init.run} has no trained weights yet ({path}); train it first: "
                f"dvc repro train@{init.run}"
            )
        weights = "raw" if init.key == "params" else "ema"
        try:
            _, state = read_trained(path, weights=weights)
        except ValueError as err:
            raise ValueError(f"{where}.run: {err}") from None
        name = f"run {init.run} ({'trained' if weights == 'raw' else 'EMA'} weights)"
        record = None
    else:
        key = init.key or "params_ema"
        path, record = verify_weights(
            init.weights, key, root=layout.root, book=layout.weights_book, where=f"{where}.weights"
        )
        ours_of = {theirs: ours for ours, theirs in official_key_map(model).items()}
        state = {ours_of.get(k, k): v for k, v in read_basicsr(path, key).items()}
        name = f"{init.weights} ({key})"
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"{where}: {path} ({name}) holds NaN or infinite values in {len(bad)} of "
            f"{len(state)} tensors (first: {bad[0]}); a model cannot start from them"
        )
    return InitWeights(state=state, name=name, sha256=sha256_of(path), record=record)


@dataclass(frozen=True)
class InitWeights:
    """The tensors of an init source, what to call it, and its file's SHA-256 (with its
    checksum-book record for a weights file, pinned once the run has started from it)."""

    state: dict[str, Tensor]
    name: str
    sha256: str
    record: WeightsRecord | None


def carry_weights(
    model: nn.Module, source: Mapping[str, Tensor], *, name: str, sha256: str
) -> WarmStart:
    """Copy into ``model`` every tensor of ``source`` with the same name and shape."""
    target = model.state_dict()
    carried = [k for k, v in target.items() if k in source and source[k].shape == v.shape]
    with torch.no_grad():
        for k in carried:
            target[k].copy_(source[k])
    return WarmStart(
        source=name,
        sha256=sha256,
        carried=tuple(carried),
        fresh=tuple(k for k in target if k not in set(carried)),
        unused=tuple(k for k in source if k not in target),
    )
