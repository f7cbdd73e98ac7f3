"""The decoded-image cache of TrainPatches (train.cache_gib): bounded, and invisible in the
samples, which stay a function of (seed, sample index) whatever the budget."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from iln.config.params import ParamsError
from iln.data.dataset import TrainPatches
from iln.data.degrade import bicubic_downsample
from iln.data.io import write_png
from tests.helpers import train_settings

SIZES = ((40, 48), (32, 36), (44, 44))


def _sr_pairs(root):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        gt = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        write_png(root / "gt" / f"im{i}.png", gt)
        write_png(root / "lq" / f"im{i}.png", bicubic_downsample(gt, 2))
    return root / "gt", root / "lq"


def _clean(root):
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate(SIZES):
        write_png(root / "hr" / f"im{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return root / "hr"


def _decoded(h, w, scale=2):  # gt + lq bytes of one SR pair
    return 3 * h * w + 3 * (h // scale) * (w // scale)


def _samples(ds, ks=(0, 4, 1, 9, 2, 7)):
    return {k: ds[k] for k in ks}


def _same(a, b):
    return all(np.array_equal(a[k][x], b[k][x]) for k in a for x in ("lq", "gt"))


@pytest.mark.parametrize("task", ["sr_x2", "dn_s25", "car_q20"])
def test_samples_do_not_depend_on_the_budget(tmp_path, task):
    if task == "sr_x2":
        gt, lq = _sr_pairs(tmp_path)
        kw = dict(scale=2)
    else:
        gt, lq = _clean(tmp_path), None
        kw = dict(scale=1, degradation=task)
    make = lambda budget: TrainPatches(gt, lq, lq_patch=8, seed=5, cache_bytes=budget, **kw)  # noqa: E731
    full = make(1 << 30)
    assert full.cached_bytes == sum(full.decoded_bytes)
    reference = _samples(full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for budget in (0, full.decoded_bytes[0], full.decoded_bytes[0] + full.decoded_bytes[2]):
            assert _same(_samples(make(budget)), reference), budget
    assert not _same(_samples(TrainPatches(gt, lq, lq_patch=8, seed=6, **kw)), reference)


def test_the_cache_holds_at_most_its_budget_and_says_which_key_to_raise(tmp_path):
    gt, lq = _sr_pairs(tmp_path)
    sizes = [_decoded(h, w) for h, w in SIZES]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a budget that holds everything warns about nothing
        ds = TrainPatches(gt, lq, scale=2, lq_patch=8, seed=0, cache_bytes=sum(sizes))
        assert ds.decoded_bytes == sizes and ds.cached_bytes == sum(sizes)
        off = TrainPatches(gt, lq, scale=2, lq_patch=8, seed=0, cache_bytes=0)  # off: no warning
        assert off.cached_bytes == 0
    budget = sizes[0] + sizes[1]  # im0 and im1 fit, im2 does not
    with pytest.warns(UserWarning, match=r"train\.cache_gib: .* 1 of 3 images are decoded") as rec:
        ds = TrainPatches(gt, lq, scale=2, lq_patch=8, seed=0, cache_bytes=budget)
    assert ds.cached_bytes == budget
    assert f"need {sum(sizes) / 2**30:.2f} GiB" in str(rec[0].message)
    assert sizes[1] < sizes[0]  # first fit in file order: im0 is too big, im1 is kept
    with pytest.warns(UserWarning, match=r"2 of 3 images"):
        small = TrainPatches(gt, lq, scale=2, lq_patch=8, seed=0, cache_bytes=sizes[1])
    assert small.cached_bytes == sizes[1]
    gt_img, _ = ds._load(0)
    with pytest.raises(ValueError, match="read-only"):  # shared with the loader workers
        gt_img[0, 0, 0] = 1


@pytest.mark.integration
def test_a_data_loader_with_workers_gives_the_same_batches(tmp_path):
    gt = _clean(tmp_path)
    ds = TrainPatches(gt, None, scale=1, lq_patch=8, seed=2, degradation="dn_s15")
    batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    here = list(torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=0))
    there = list(torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=2))
    for a, b in zip(here, there):
        assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])


def test_cache_gib_is_checked():
    assert train_settings().cache_gib == 8.0
    with pytest.raises(ParamsError, match=r"train\.cache_gib: must be >= 0"):
        train_settings(cache_gib=-1.0)
