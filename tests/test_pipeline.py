"""Smoke run of the real pipeline: `dvc repro` in a temporary copy with tiny params.

Checks what a user relies on: every stage runs offline, metrics exist for every run and
the bicubic baseline, MLflow holds one finished run per stage invocation grouped under
its grid member, a second `dvc repro` is a no-op, a param change of one run re-runs only
that run's stages, and a bad param fails before any work, naming the key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iln import tracking
from iln.config import layout
from iln.figures.styles import BASELINE_COLOR, NORM_STYLES
from tests.stage_project import metric_steps, stage_runs

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
COPIED = (
    "dvc.yaml",
    "params.yaml",
    "data.dvc",
    ".dvcignore",
    "stages",
    "src",
    "data/default",
    ".dvc/config",
    "plots",
)


def copy_project_files(root: Path) -> None:
    """The files of ``COPIED`` from this checkout into ``root``, as a fresh clone has them."""
    for name in COPIED:
        source, target = ROOT / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(
                source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy2(source, target)


def command_env() -> dict[str, str]:
    """This environment for dvc and the stages: this venv first, no MLflow/DVC settings of
    the caller's, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=900
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh clone-like copy of the project, reproduced once with tiny params."""
    root = tmp_path_factory.mktemp("project")
    copy_project_files(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(
        iterations=4,
        batch_size=2,
        lq_patch=16,
        checkpoint_every=2,
        log_every=1,
        probe_every=2,
        probe_images=1,
    )
    params["runs"] = {
        "ln": {"arch": "hat_tiny", "norm": "ln", "task": "sr_x2", "groups": ["table3", "table4"]},
        "iln": {"arch": "hat_tiny", "norm": "iln", "task": "sr_x2", "groups": ["table3"]},
    }
    params["evaluate"].update(samples=1, precision_modes=["fp32", "int8"], precision_crop=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], root)
    _run(["dvc", "repro"], root)
    return root


def test_repro_writes_metrics_for_every_run_and_the_baseline(project):
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], project).stdout)
    files = next(iter(shown.values()))["data"]
    assert set(files) == {f"reports/metrics/{n}.json" for n in ("ln", "iln", "bicubic_sr_x2")}
    for run in ("ln", "iln", "bicubic_sr_x2"):
        values = files[f"reports/metrics/{run}.json"]["data"]
        assert 0 < values["psnr"] < 100 and 0 < values["ssim"] <= 1
    assert set(files["reports/metrics/ln.json"]["data"]) == {
        "psnr",
        "ssim",
        "magnitude",
        "entropy",
        "step",
    }
    assert files["reports/metrics/iln.json"]["data"]["step"] == 4
    summary = json.loads((project / "reports/summary.json").read_text())
    assert summary["ln"]["entropy_ceiling"] > 0
    precision = json.loads((project / "runs/ln/eval/precision.json").read_text())
    assert (
        set(precision) == {"fp32", "int8"}
        and precision["fp32"]["default_test"]["overflow"] is False
    )
    report = (project / "reports/report.md").read_text()
    assert report.count("|") > 10
    assert "### Table 1: Normalisation layers compared" in report
    assert "| LN | ln | 28.79 / 27.68 / 26.55 / 31.01 |" in report  # the paper beside ours
    assert list((project / "reports/figures").glob("fig1_*.png"))
    assert list((project / "reports/figures").glob("crops_sr_x2_default_test_*.png"))


def test_stages_write_the_layouts_schemas(project):
    """What the stages write is what iln.config.layout declares (the report reads with it)."""

    def header(path: Path) -> tuple[str, ...]:
        return tuple(path.read_text().splitlines()[0].split(","))

    files = layout.RunFiles(project / "runs" / "ln")
    assert header(files.history) == layout.HISTORY_COLUMNS
    assert header(files.probes) == layout.PROBES_CSV_COLUMNS
    assert header(files.features) == layout.FEATURES_COLUMNS
    assert header(files.final_norm) == layout.FINAL_NORM_COLUMNS
    assert header(files.per_image) == layout.PER_IMAGE_COLUMNS
    assert set(json.loads(files.train_summary.read_text())) == set(layout.TRAIN_SUMMARY_KEYS)
    for values in json.loads(files.metrics.read_text()).values():
        assert tuple(values) == layout.METRICS_KEYS
    for per_set in json.loads(files.precision.read_text()).values():
        for entry in per_set.values():
            assert set(layout.PRECISION_KEYS) <= set(entry)
    assert all((files.analysis_dir / name).exists() for name in layout.ANALYSIS_FIGURES)


def test_mlflow_has_a_finished_run_per_stage_grouped_by_grid_member(project):
    rows = stage_runs(project)
    by_key = {(r["run"], r["stage"]): r for r in rows}
    for run in ("ln", "iln"):
        train, evaluate, analyze = (
            by_key[(run, stage)] for stage in ("train", "evaluate", "analyze")
        )
        assert {train["status"], evaluate["status"], analyze["status"]} == {"FINISHED"}
        assert train["parent"] == evaluate["parent"] == analyze["parent"]
        assert len(metric_steps(project, train["run_id"], "loss")) == 4
        assert "features/group0/magnitude" in train["metrics"] and "val/psnr" in train["metrics"]
        assert "sr_x2/default_test/psnr" in evaluate["metrics"]
        assert "samples" in evaluate["artifacts"] and "metrics.json" in evaluate["artifacts"]
    assert ("bicubic", "evaluate") in by_key and ("report", "report") in by_key


def test_metrics_show_fits_160_columns_with_one_row_per_run(project):
    result = _run(["dvc", "metrics", "show"], project)
    lines = result.stdout.splitlines()
    assert lines and max(map(len, lines)) <= 160, result.stdout
    rows = [line.split()[0] for line in lines[1:] if line.strip()]
    assert rows == [f"reports/metrics/{n}.json" for n in ("bicubic_sr_x2", "iln", "ln")]


def test_parent_runs_hold_what_a_user_compares_in_their_norms_colour(project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri(project))
    experiment = client.get_experiment_by_name("iln")
    everything = client.search_runs([experiment.experiment_id], max_results=1000)
    expected = {"ln": NORM_STYLES["ln"].color, "iln": NORM_STYLES["iln"].color}
    for run in everything:  # every run we make, parents and stage runs alike
        name = run.data.tags[tracking.RUN_TAG]
        assert run.data.tags[tracking.RUN_COLOR_TAG] == expected.get(name, BASELINE_COLOR), name
    parents = {
        r.data.tags[tracking.RUN_TAG]: r
        for r in everything
        if r.data.tags[tracking.KIND_TAG] == "group"
    }
    assert set(parents) == {"ln", "iln", "bicubic", "report"}
    for name in ("ln", "iln"):
        parent = parents[name]
        history = client.get_metric_history(parent.info.run_id, "features/deepest/magnitude")
        assert sorted(m.step for m in history) == [0, 2, 4]  # probe_every 2, 4 iterations
        assert "features/deepest/entropy" in parent.data.metrics
        assert len(client.get_metric_history(parent.info.run_id, "loss")) == 4  # log_every 1
        assert parent.data.metrics["val/psnr"] > 0
        log10 = client.get_metric_history(parent.info.run_id, "features/deepest/log10_magnitude")
        by_step = {m.step: m.value for m in history}
        assert sorted(m.step for m in log10) == sorted(by_step)
        assert all(10**m.value == pytest.approx(by_step[m.step], rel=1e-9) for m in log10)
        assert parent.info.end_time >= max(  # the parent spans its stage runs
            r.info.end_time
            for r in everything
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        )
        assert parent.data.metrics["steps"] == 4
        assert 0 < parent.data.metrics["sr_x2/default_test/psnr"] < 100
        assert parent.data.params["model.stdnorm"] == str(name == "iln")
        assert "None" not in parent.data.params.values()
        assert parent.data.tags["mlflow.note.content"].startswith(NORM_STYLES[name].label)
    assert "sr_x2/default_test/psnr" in parents["bicubic"].data.metrics
    report = (project / "reports/report.md").read_text().rstrip()
    assert report.endswith(">") and "compareRunsMode=CHART" in report.splitlines()[-1]


def test_second_repro_is_a_no_op(project):
    out = _run(["dvc", "repro"], project).stdout
    assert "Running stage" not in out


def test_changing_one_run_reruns_only_its_stages(project):
    params_path = project / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["runs"]["iln"]["iterations"] = 6
    try:
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        changed = set(json.loads(_run(["dvc", "status", "--json"], project).stdout))
    finally:
        params_path.write_text(original)
    assert {"train@iln"} <= changed
    # every train stage reads the whole `runs` table (a run may start from another's
    # weights); train@ln only resumes its finished checkpoint, nothing after it re-runs
    assert not {"evaluate@ln", "analyze@ln", "download", "degrade", "baseline"} & changed


def test_bad_param_fails_before_any_work_naming_the_key(project):
    params_path = project / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["runs"]["ln"]["norm"] = "layernorm2"
    try:
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        result = _run(["dvc", "repro"], project, check=False)
    finally:
        params_path.write_text(original)
    assert result.returncode != 0
    assert "runs.ln.norm: unknown norm 'layernorm2'" in result.stdout + result.stderr
    assert "%|" not in result.stderr  # no progress bar: no work started
