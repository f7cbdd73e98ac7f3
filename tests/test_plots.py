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


def test_templates_draw_each_run_in_its_norms_colour_labelled_by_run_name():
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
        assert spec["encoding"]["color"] == {
            "field": "run",
            "type": "nominal",
            "title": "run",
            "scale": {"range": {"field": "run_color"}},
        }
