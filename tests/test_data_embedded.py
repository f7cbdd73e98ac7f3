"""The committed default images are what the documented recipe produces, and load offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iln.data.catalog import SETS
from iln.data.embedded import EMBEDDED, render
from iln.data.io import read_rgb

DEFAULT = Path(__file__).resolve().parents[1] / "data" / "default"


def test_committed_images_match_the_recipe():
    names = {spec.split: set() for spec in EMBEDDED}
    for spec in EMBEDDED:
        committed = read_rgb(DEFAULT / spec.split / f"{spec.name}.png")
        assert committed.shape == spec.size + (3,)
        assert spec.size[0] % 12 == 0 and spec.size[1] % 12 == 0  # mod-crop free for x2, x3, x4
        assert np.array_equal(committed, render(spec)), spec.name
        names[spec.split].add(spec.name)
    for split in ("train", "test"):
        on_disk = {p.stem for p in (DEFAULT / split).glob("*.png")}
        assert on_disk == names[split]
    assert SETS["default_train"].member == "train" and SETS["default_test"].member == "test"
