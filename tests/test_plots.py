"""`dvc plots show` works offline: the page loads vega from plots/vendor, never a network URL,
and the top-level plots of dvc.yaml overlay every run."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

# DVC gives each file's path without the prefix all plotted files share ("ln/train/probes.csv"
# for runs/ln/train/probes.csv and runs/iln/...): the run is the folder above train/
RUN_FROM_FILENAME = "peek(split(replace(datum.filename, /\\/train\\/[^\\/]+$/, ''), '/'))"
VENDOR = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _dvc() -> list[str]:
    exe = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    if exe is None:
        pytest.skip("dvc is not installed")
    return [exe]


def test_top_level_plots_overlay_every_default_run():
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    runs = yaml.safe_load((ROOT / "params.yaml").read_text())["runs"]
    ids = [next(iter(p)) for p in plots]
    assert ids == ["loss", "val_psnr", "deepest_magnitude", "deepest_entropy"]
    for plot in plots:
        (definition,) = plot.values()
        runs_plotted = {path.split("/")[1] for path in definition["y"]}
        assert runs_plotted == set(runs), next(iter(plot))
        assert (ROOT / definition["template"]).is_file()


@pytest.mark.integration
def test_plots_page_is_offline(tmp_path):
    """Run `dvc plots show` on synthetic CSVs in a scratch repository with this project's
    plot definitions, template and vendored scripts."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_COMMITTER_NAME": "t"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run([*_dvc(), "init", "-q"], cwd=repo, check=True, env=env)
    shutil.copytree(ROOT / "plots", repo / "plots")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    runs = sorted({path.split("/")[1] for p in plots for path in next(iter(p.values()))["y"]})
    for k, run in enumerate(runs):
        history = [
            {
                "step": s,
                "loss": 0.1 / s,
                "lr": 1e-3,
                "val_psnr": 20 + k + s / 100 if s % 4 == 0 else "",
            }
            for s in range(2, 10, 2)
        ]
        _write_csv(repo / "runs" / run / "train" / "history.csv", history)
        probes = [
            {"step": s, "layer": layer, "magnitude": (k + 1) * (g + 1) * (s + 1), "entropy": 3 - g}
            for s in (0, 4, 8)
            for g, layer in enumerate(("group0", "group1", "group2", "final_norm_in"))
        ]
        _write_csv(repo / "runs" / run / "train" / "probes.csv", probes)
    result = subprocess.run(
        [*_dvc(), "plots", "show"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    page = (repo / "dvc_plots" / "index.html").read_text()
    # No URL at all: the templates leave out vega-lite's "$schema" (vega-embed defaults to
    # vega-lite), so nothing in the page even names a network address.
    assert re.findall(r"https?://", page) == []
    sources = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", page)
    assert sources == [f"../plots/vendor/{name}" for name in VENDOR]
    for source in sources:
        assert (repo / "dvc_plots" / source).resolve().is_file()
    assert page.count("vegaEmbed(") == 4
    for run in runs:  # the data of every run, in each chart (DVC drops the common "runs/")
        assert page.count(f'"filename": "{run}/train/history.csv"') >= 2 * 4
        assert page.count(f'"filename": "{run}/train/probes.csv"') >= 2 * 3 * 4


def test_vendored_scripts_and_licences_are_recorded():
    readme = (ROOT / "plots" / "vendor" / "README.md").read_text()
    for name in VENDOR:
        assert (ROOT / "plots" / "vendor" / name).stat().st_size > 10_000
        assert name in readme
    for package in ("vega", "vega-lite", "vega-embed"):
        assert (ROOT / "plots" / "vendor" / f"LICENSE.{package}").is_file()


def test_templates_draw_each_run_in_its_norms_colour_labelled_by_the_norms_name():
    """Every template names each line by its run (runs/<name>/...) and draws it in the colour
    iln.figures.styles gives the norm of that name (black for other names), the legend listing only
    the runs plotted."""
    from iln.figures.styles import NORM_STYLES, UNKNOWN_STYLE_COLOR

    for path in sorted((ROOT / "plots" / "templates").glob("*.json")):
        spec = json.loads(path.read_text())
        assert spec["transform"][0] == {"calculate": RUN_FROM_FILENAME, "as": "run"}
        colour = spec["transform"][1]
        assert colour["as"] == "run_color", path.name
        table = dict(re.findall(r"'([a-z_]+)': '(#[0-9a-f]{6})'", colour["calculate"]))
        assert table == {norm: style.color for norm, style in NORM_STYLES.items()}, path.name
        assert colour["calculate"].endswith(f"[datum.run] || '{UNKNOWN_STYLE_COLOR}'")
        labels = dict(re.findall(r"'([a-z_]+)': '([^'#]+)'", spec["transform"][2]["calculate"]))
        assert labels == {norm: style.label for norm, style in NORM_STYLES.items()}, path.name
        assert spec["transform"][2]["as"] == "norm" and spec["width"] == "container"
        assert spec["encoding"]["color"] == {
            "field": "norm",  # the legend says LN, i-LN, LN*, LN+Rs
            "type": "nominal",
            "title": "norm",
            "scale": {"range": {"field": "run_color"}},
        }
        assert spec["encoding"].get("strokeDash", {"legend": None})["legend"] is None


def test_the_loss_smoothing_is_a_centred_moving_average():
    from iln.figures.plotting import smooth_centred, smoothing_window

    assert smooth_centred([1.0, 2.0, 6.0, 3.0], 3) == pytest.approx([1.5, 3.0, 11 / 3, 4.5])
    falling = [10.0 - i for i in range(9)]  # a straight line: no lag, the same line
    assert smooth_centred(falling, 5)[2:-2] == pytest.approx(falling[2:-2])
    assert smooth_centred([1.0, float("nan"), 3.0], 3) == pytest.approx([1.0, 2.0, 3.0])
    assert (smoothing_window(30), smoothing_window(3000)) == (3, 151)
    with pytest.raises(ValueError, match="odd"):
        smooth_centred([1.0], 2)


def test_a_figure_is_written_as_png_and_svg_the_same_bytes_each_time(tmp_path):
    from iln.figures.plotting import PRINT_DPI, new_figure, save_figure_atomic

    def draw(path: Path) -> Path:
        fig = new_figure(2.0, 1.5)
        ax = fig.subplots()
        ax.plot([0, 1], [1, 2], label="deepest group")
        ax.set_xlabel("training iteration")
        return save_figure_atomic(fig, path)

    first = draw(tmp_path / "a.png").read_bytes()
    assert int.from_bytes(first[16:20], "big") == 2 * PRINT_DPI >= 400
    svg = (tmp_path / "a.svg").read_bytes()
    assert b"training iteration" in svg  # text kept as text
    draw(tmp_path / "b.png")
    assert (tmp_path / "b.svg").read_bytes() == svg and (tmp_path / "b.png").read_bytes() == first
