"""Training parity against the authors' code and traiNNer-redux's i-LN, run only where a
checkout is given (nothing of theirs is in this repository):

    ILN_OFFICIAL_REPO=<clone of github.com/2minkyulee/i-LN>
    ILN_REDUX_REPO=<clone of github.com/the-database/traiNNer-redux>
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from benchmarks import train_parity, vs_redux
from benchmarks.vs_official import official_classes

OFFICIAL = os.environ.get("ILN_OFFICIAL_REPO", "")
REDUX = os.environ.get("ILN_REDUX_REPO", "")
needs_official = pytest.mark.skipif(
    not OFFICIAL, reason="set ILN_OFFICIAL_REPO to a clone of github.com/2minkyulee/i-LN"
)
needs_redux = pytest.mark.skipif(
    not REDUX, reason="set ILN_REDUX_REPO to a clone of github.com/the-database/traiNNer-redux"
)


@needs_official
@pytest.mark.parametrize("norm", ["ln", "iln"])
def test_training_follows_the_authors_model_step_by_step(norm):
    classes = official_classes(Path(OFFICIAL))
    ours, theirs = train_parity.build_twins(classes, "hat_tiny", norm, 2, 0, torch.float64)
    start = {n: p.detach().clone() for n, p in ours.named_parameters()}
    rows = train_parity.train_side_by_side(
        ours, theirs, steps=4, batch=2, lr_patch=16, scale=2, seed=0, lr=2e-3
    )
    assert max(r.loss_diff for r in rows) < 1e-12
    assert max(r.weight_rel for r in rows) < 1e-10
    moved = max((p.detach() - start[n]).abs().max().item() for n, p in ours.named_parameters())
    assert moved > 1e-3  # four Adam steps at 2e-3 moved the weights: the check is not vacuous


@needs_redux
def test_i_ln_equals_trainner_redux_hat_iln_in_eval_mode():
    cls = vs_redux.redux_hat_iln(Path(REDUX))
    assert max(vs_redux.eval_differences(cls).values()) < 1e-10


@needs_redux
def test_iln_clamp_trains_as_trainner_redux_hat_iln_with_its_running_std_clamp():
    cls = vs_redux.redux_hat_iln(Path(REDUX))
    rows, eval_diff = vs_redux.train_differences(cls, steps=3)
    assert rows[-1].clamped  # the x8 batch spiked past twice the running std
    assert max(r.running_std_diff for r in rows) == 0.0
    assert max(max(r.loss_diff, r.weight_diff) for r in rows) < vs_redux.TRAIN_TOLERANCE
    assert eval_diff < vs_redux.TRAIN_TOLERANCE
