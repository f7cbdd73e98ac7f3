"""TrainPatches determinism and alignment; TestPairs matching."""

from __future__ import annotations

import numpy as np
import pytest

from iln.data.dataset import TestPairs, TrainPatches
from iln.data.degrade import bicubic_downsample
from iln.data.io import write_png


def _write_sr_pairs(root, scale=2, sizes=((40, 48), (32, 36), (44, 44))):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        gt = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        write_png(root / "gt" / f"im{i}.png", gt)
        write_png(root / "lq" / f"im{i}.png", bicubic_downsample(gt, scale))
    return root / "gt", root / "lq"


def _locate(big: np.ndarray, patch: np.ndarray) -> list[tuple[int, int]]:
    """Where ``patch`` occurs in ``big`` (exhaustive search; images are tiny)."""
    p = patch.shape[0]
    return [
        (y, x)
        for y in range(big.shape[0] - p + 1)
        for x in range(big.shape[1] - p + 1)
        if np.array_equal(big[y : y + p, x : x + p], patch)
    ]


def test_samples_are_a_function_of_seed_and_k(tmp_path):
    gt_dir, lq_dir = _write_sr_pairs(tmp_path)
    a = TrainPatches(gt_dir, lq_dir, scale=2, lq_patch=8, seed=3)
    b = TrainPatches(gt_dir, lq_dir, scale=2, lq_patch=8, seed=3, cache_bytes=0)
    order = [7, 2, 11, 0, 5]
    first = {k: a[k] for k in order}
    for k in reversed(order):  # another instance, another order
        assert np.array_equal(b[k]["lq"], first[k]["lq"]) and np.array_equal(
            b[k]["gt"], first[k]["gt"]
        )
    c = TrainPatches(gt_dir, lq_dir, scale=2, lq_patch=8, seed=4)
    assert any(not np.array_equal(c[k]["gt"], first[k]["gt"]) for k in order)
    sample = first[7]
    assert sample["lq"].shape == (3, 8, 8) and sample["gt"].shape == (3, 16, 16)
    assert (
        sample["lq"].dtype == np.float32 and 0.0 <= sample["gt"].min() and sample["gt"].max() <= 1.0
    )


def test_every_image_once_per_epoch(tmp_path):
    gt_dir, lq_dir = _write_sr_pairs(tmp_path)
    ds = TrainPatches(gt_dir, lq_dir, scale=2, lq_patch=8, seed=0)
    n = len(ds)
    for epoch in range(3):
        assert sorted(ds.image_index(epoch * n + i) for i in range(n)) == list(range(n))


def test_crops_are_aligned(tmp_path):
    gt_dir, lq_dir = _write_sr_pairs(tmp_path)
    ds = TrainPatches(gt_dir, lq_dir, scale=2, lq_patch=6, seed=1, augment=False)
    from iln.data.io import read_rgb

    for k in range(6):
        i = ds.image_index(k)
        gt_full = read_rgb(ds.gt_files[i])
        lq_full = read_rgb(ds.lq_files[ds.gt_files[i].stem])
        s = ds[k]
        lq = np.round(s["lq"].transpose(1, 2, 0) * 255).astype(np.uint8)
        gt = np.round(s["gt"].transpose(1, 2, 0) * 255).astype(np.uint8)
        ((ly, lx),) = _locate(lq_full, lq)
        assert np.array_equal(gt, gt_full[2 * ly : 2 * ly + 12, 2 * lx : 2 * lx + 12])


def test_augmentation_is_applied_to_both(tmp_path):
    gt_dir, lq_dir = _write_sr_pairs(tmp_path)
    plain = TrainPatches(gt_dir, lq_dir, scale=2, lq_patch=8, seed=9, augment=False)
    aug = TrainPatches(gt_dir, lq_dir, scale=2, lq_patch=8, seed=9)
    changed = 0
    for k in range(16):
        p, a = plain[k], aug[k]
        found = None
        for hflip in (False, True):
            for vflip in (False, True):
                for transpose in (False, True):

                    def t(x, hflip=hflip, vflip=vflip, transpose=transpose):
                        x = x[:, :, ::-1] if hflip else x
                        x = x[:, ::-1, :] if vflip else x
                        return x.transpose(0, 2, 1) if transpose else x

                    if np.array_equal(t(p["gt"]), a["gt"]) and np.array_equal(t(p["lq"]), a["lq"]):
                        found = (hflip, vflip, transpose)
        assert found is not None  # the same dihedral transform on lq and gt
        changed += found != (False, False, False)
    assert changed >= 8


def test_on_the_fly_noise(tmp_path):
    gt_dir, _ = _write_sr_pairs(tmp_path)
    ds = TrainPatches(gt_dir, None, scale=1, lq_patch=12, seed=0, degradation="dn_s50")
    s = ds[3]
    assert s["lq"].shape == s["gt"].shape == (3, 12, 12)
    assert 30 / 255 < np.std(s["lq"] - s["gt"]) < 70 / 255
    assert np.array_equal(ds[3]["lq"], s["lq"])
    car = TrainPatches(gt_dir, None, scale=1, lq_patch=16, seed=0, degradation="car_q10")
    assert not np.array_equal(car[0]["lq"], car[0]["gt"])
    with pytest.raises(ValueError, match="lq_dir=None and scale=1"):
        TrainPatches(gt_dir, None, scale=2, lq_patch=8, seed=0, degradation="dn_s15")


def test_too_small_and_mismatched_images_are_named(tmp_path):
    gt_dir, lq_dir = _write_sr_pairs(tmp_path, sizes=((40, 48), (12, 30)))
    with pytest.raises(
        ValueError,
        match=r"train\.lq_patch: 8 is larger than the smallest training input .*im1\.png \(6x15\)",
    ):
        TrainPatches(gt_dir, lq_dir, scale=2, lq_patch=8, seed=0)
    write_png(lq_dir / "im1.png", np.zeros((7, 15, 3), np.uint8))
    with pytest.raises(ValueError, match=r"im1\.png.*7x15.*does not match"):
        TrainPatches(gt_dir, lq_dir, scale=2, lq_patch=4, seed=0)
    (lq_dir / "im1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no lq partner for .*im1\.png"):
        TrainPatches(gt_dir, lq_dir, scale=2, lq_patch=4, seed=0)


def test_test_pairs(tmp_path):
    gt_dir, lq_dir = _write_sr_pairs(tmp_path)
    pairs = TestPairs(lq_dir, gt_dir)
    assert len(pairs) == 3 and pairs.names == ["im0", "im1", "im2"]
    name, lq, gt = pairs[1]
    assert name == "im1" and lq.shape == (16, 18, 3) and gt.shape == (32, 36, 3)
    assert [n for n, _, _ in pairs] == pairs.names
    (gt_dir / "im2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"im2\.png.*without a gt partner"):
        TestPairs(lq_dir, gt_dir)
