"""Open the address `iln ui` prints in headless Chromium and check the comparison is there.

    python benchmarks/mlflow_ui.py [PROJECT] [--screenshot shot.png] [--budget 90]

PROJECT is a project folder after a run of the pipeline (its mlflow.db; default: the
current folder). The script starts `iln ui` there on a free port, reads the one address it
prints, loads that address in headless Chromium as a new user would (a fresh profile, no
click), and checks the page's DOM: the four charts of the view's first section (training
loss, validation PSNR, magnitude on a log axis, entropy) are drawn, each with a legend entry
for every grid member. With --screenshot it also writes the page as a PNG (1600 x 1400) to
look at. It prints what it found and exits 1 naming what is missing.

Chromium must be installed (Debian: apt-get install chromium); it runs with --no-sandbox,
as it must under root in a container. --budget is Chromium's virtual-time budget in seconds:
the time the page gets to fetch the runs and their metric histories (raise it on a loaded
machine).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from iln import tracking

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = "1600,1400"


def browser() -> str | None:
    """The headless-capable Chromium of this machine, or None."""
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def start_ui(project: Path, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Start ``iln ui`` in ``project``; returns (its process, the address it printed)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "iln", "ui"],
        cwd=project,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert server.stdout is not None
    for line in server.stdout:  # `iln ui` prints one line about the UI, then the address
        if line.startswith("http"):
            return server, line.strip()
    server.wait(timeout=timeout)
    raise RuntimeError(f"iln ui exited with status {server.returncode} and printed no address")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def load(url: str, budget: float, screenshot: Path | None = None) -> str:
    """The page's DOM after ``budget`` seconds of virtual time (and its screenshot)."""
    command = [browser() or "chromium", "--headless", "--no-sandbox", "--disable-gpu"]
    command += [f"--virtual-time-budget={int(budget * 1000)}", f"--window-size={WINDOW}"]
    if screenshot is not None:
        run = subprocess.run(
            [*command, f"--screenshot={screenshot}", url],
            capture_output=True,
            text=True,
            timeout=budget + 240,
        )
        if not screenshot.is_file():
            raise RuntimeError(f"chromium wrote no screenshot: {run.stderr[-2000:]}")
    run = subprocess.run(
        [*command, "--dump-dom", url], capture_output=True, text=True, timeout=budget + 240
    )
    return run.stdout


def missing(dom: str, members: list[str]) -> list[str]:
    """What the comparison page lacks: a chart of the first section (titled by its metric),
    or a legend entry ``<member> (<metric>)`` of a grid member in that chart."""
    text = re.sub(r"<[^>]+>", "\n", dom)
    absent = []
    for key, _ in tracking.COMPARED_CHARTS:
        if key not in text.splitlines():
            absent.append(f"chart {key!r}")
            continue
        absent += [f"{m}'s line in {key!r}" for m in members if f"{m} ({key})" not in text]
    if dom.count("js-plotly-plot") < len(tracking.COMPARED_CHARTS):
        absent.append(f"{len(tracking.COMPARED_CHARTS)} drawn charts (plotly)")
    return absent


def members(project: Path, experiment: str) -> list[str]:
    """The names of the runs the view compares (the grid members with a norm)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri(project))
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [found.experiment_id], filter_string=tracking.COMPARED_RUNS, max_results=1000
    )
    return sorted(r.data.tags[tracking.RUN_TAG] for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", nargs="?", default=".", type=Path)
    parser.add_argument("--screenshot", type=Path, help="also write the page as this PNG")
    parser.add_argument("--budget", type=float, default=90.0, metavar="S")
    parser.add_argument("--experiment", default="iln", help="tracking.experiment (default iln)")
    args = parser.parse_args(argv)
    if browser() is None:
        print("mlflow_ui: no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    project = args.project.resolve()
    names = members(project, args.experiment)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    server, url = start_ui(project)
    try:
        print(f"mlflow_ui: {url}")
        dom = load(url, args.budget, args.screenshot)
    finally:
        stop(server)
    absent = missing(dom, names)
    if absent:
        print(f"mlflow_ui: missing from the page: {'; '.join(absent)}", file=sys.stderr)
        return 1
    titles = ", ".join(key for key, _ in tracking.COMPARED_CHARTS)
    print(f"mlflow_ui: on opening the address: {titles}; one line each for {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
