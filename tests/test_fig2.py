"""Paper Fig. 2 (depth and width): the sweep points read from runs, and the figure drawn
from synthetic points."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from iln.config.params import load_params
from iln.config.layout import PROBES_CSV_COLUMNS
from iln.models import resolve_hparams
from iln.config.overlay import apply_file
from iln.report import figures
from iln.report.runs import RunInfo, RunResults
from iln.figures.styles import norm_style
from tests.helpers import ROOT, train_summary

SHAPES = [(2, 2), (3, 2), (4, 3)]  # (groups, blocks) at width 32
WIDTHS = [16, 32, 48]  # at 3 x 2


def _points() -> list[figures.SizePoint]:
    """LN grows with size and loses entropy; i-LN stays flat near the ceiling."""
    points = []
    for norm in ("ln", "iln"):
        for g, b, c in [(g, b, 32) for g, b in SHAPES] + [(3, 2, c) for c in WIDTHS if c != 32]:
            size = g * b * c / 192
            grows = norm == "ln"
            points.append(
                figures.SizePoint(
                    run=f"{norm}_g{g}b{b}_c{c}",
                    norm=norm,
                    groups=g,
                    blocks=b,
                    width=c,
                    magnitude=5.0 * size**2 if grows else 0.1,
                    entropy=math.log(c) - (0.4 * size if grows else 0.05),
                )
            )
    return points


def test_sweeps_pick_the_shared_width_and_the_shared_shape():
    points = _points()
    depth = figures._sweep(points, "depth")
    width = figures._sweep(points, "width")
    assert {p.width for p in depth} == {32} and sorted({p.depth for p in depth}) == [4, 6, 12]
    assert {(p.groups, p.blocks) for p in width} == {(3, 2)}
    assert sorted({p.width for p in width}) == WIDTHS


def test_depth_width_figure_is_drawn_in_the_norm_colours(tmp_path):
    path = figures.depth_width(_points(), tmp_path / "fig2.png", title="synthetic")
    assert path == tmp_path / "fig2.png"
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    for norm in ("ln", "iln"):
        rgb = np.array([int(norm_style(norm).color[i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels.astype(int) - rgb).sum(axis=1) < 10).sum() > 200, norm


def test_depth_width_figure_needs_two_sizes_on_one_sweep(tmp_path):
    one = [p for p in _points() if (p.groups, p.blocks, p.width) == (3, 2, 32)]
    assert figures.depth_width(one, tmp_path / "fig2.png", title="one size") is None
    assert not (tmp_path / "fig2.png").exists()


def _write_probes(path, steps_rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PROBES_CSV_COLUMNS)
        writer.writeheader()
        for row in steps_rows:
            writer.writerow({c: row.get(c, 1.0) for c in PROBES_CSV_COLUMNS})


def test_size_points_read_the_deepest_group_at_the_last_probe_and_the_run_size(tmp_path):
    rows = [
        {"step": s, "layer": f"group{g}", "magnitude": 10 * s + g, "entropy": 2.0 + g / 10}
        for s in (0, 100)
        for g in range(4)
    ]
    _write_probes(tmp_path / "r/train/probes.csv", rows)
    summary = train_summary((3,) * 4, 32)
    (tmp_path / "r/train/summary.json").write_text(json.dumps(summary))
    info = RunInfo(name="r", arch="hat_tiny", norm="ln", task="sr_x2")
    (point,) = figures.size_points([RunResults.load(info, tmp_path / "r")])
    assert (point.groups, point.blocks, point.width, point.depth) == (4, 3, 32, 12)
    assert point.magnitude == pytest.approx(1003.0) and point.entropy == pytest.approx(2.3)


def test_the_shipped_depth_width_grid_sweeps_depth_and_width_for_ln_and_iln(tmp_path):
    apply_file(ROOT / "configs/cpu_depth_width.yaml", ROOT / "params.yaml", tmp_path / "p.yaml")
    params = load_params(tmp_path / "p.yaml")
    fig2 = {n: r for n, r in params.runs.items() if "fig2" in r.groups}
    points = []
    for name, run in fig2.items():
        hp = resolve_hparams(run.arch, norm=run.norm, scale=run.scale, **run.model)
        depths = hp["depths"]
        assert len(set(depths)) == 1, name  # every group of a run has the same depth
        points.append(
            figures.SizePoint(name, run.norm, len(depths), depths[0], hp["embed_dim"], 1.0, 1.0)
        )
    depth, width = figures._sweep(points, "depth"), figures._sweep(points, "width")
    for norm in ("ln", "iln"):
        shapes = sorted((p.groups, p.blocks) for p in depth if p.norm == norm)
        assert shapes == [(2, 2), (3, 2), (4, 3), (6, 4)], norm
        assert sorted(p.width for p in width if p.norm == norm) == [16, 32, 48, 64], norm
    assert len(points) == 14
