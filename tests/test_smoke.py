"""`iln smoke`, the smoke pipeline for CI: it passes on this project, and each way the chain
can break (a damaged image, a stage that exits 1, a missing or non-finite metric, a missing
output or MLflow run) ends it with exit status 1 and one line naming the cause. Also the CI
workflow that runs it (.github/workflows/smoke.yml) and the CLI's help, version and
switches."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iln.cli.main import _old_booleans, _parser, main
from iln.smoke.pipeline import (
    COPIED,
    Repro,
    SmokeError,
    check,
    check_metrics,
    environment,
    failure,
    metrics_table,
    prepare,
)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "smoke.yml"
ILN = [sys.executable, "-m", "iln"]


def _repro(lines: list[str], code: int = 1) -> Repro:
    return Repro(code, (), 1.0, 0.5, tuple(lines))


def test_a_failed_stage_is_named_with_its_own_error_line(tmp_path):
    lines = [
        "Running stage 'download':",
        "> python stages/download.py",
        "default_test: 2 images",
        "Running stage 'degrade':",
        "> python stages/degrade.py",
        "degrade: error: data/hr/default_test/coffee.png: cannot read the image (truncated)",
        "ERROR: failed to reproduce 'degrade': failed to run: python stages/degrade.py, "
        "exited with 1",
    ]
    message = failure(_repro(lines), tmp_path / "smoke.log")
    assert message.startswith("stage 'degrade' failed (exit 1): degrade: error: data/hr/")
    assert "coffee.png" in message and str(tmp_path / "smoke.log") in message
    assert "\n" not in message


def test_a_stage_that_exits_without_a_word_and_a_traceback_are_named_too(tmp_path):
    silent = ["Running stage 'report':", "> python stages/report.py",
              "ERROR: failed to reproduce 'report': failed to run: python stages/report.py, "
              "exited with 3"]  # fmt: skip
    assert failure(_repro(silent), tmp_path).startswith(
        "stage 'report' failed (exit 3): it printed no error line"
    )
    crash = ["Running stage 'train@ln':", "Traceback (most recent call last):",
             '  File "x.py", line 1', "ZeroDivisionError: division by zero",
             "ERROR: failed to reproduce 'train@ln': exited with 1"]  # fmt: skip
    assert "ZeroDivisionError: division by zero" in failure(_repro(crash), tmp_path)
    broken = ["ERROR: 'dvc.yaml' is invalid: unknown key"]
    assert failure(_repro(broken), tmp_path).startswith(
        "dvc repro failed before any stage ran: ERROR: 'dvc.yaml' is invalid"
    )


def test_metrics_must_be_present_and_finite():
    rows = {"ln": {"psnr": 20.0, "ssim": 0.5}, "iln": {"psnr": math.nan, "ssim": 0.5}}
    with pytest.raises(SmokeError, match=r"reports/metrics/iln.json: metric 'psnr' = nan is not"):
        check_metrics(rows, {"ln": ("psnr",), "iln": ("psnr",)})
    with pytest.raises(SmokeError, match=r"reports/metrics/ln.json: metric 'entropy' is missing"):
        check_metrics(rows, {"ln": ("psnr", "entropy")})
    with pytest.raises(SmokeError, match=r"reports/metrics/bicubic_sr_x2.json: no such row"):
        check_metrics(rows, {"bicubic_sr_x2": ("psnr",)})
    with pytest.raises(SmokeError, match=r"'ssim' = 'high' is not a number"):
        check_metrics({"ln": {"ssim": "high"}}, {"ln": ("ssim",)})
    assert check_metrics(rows, {"ln": ("psnr", "ssim")}) == {"ln": {"psnr": 20.0, "ssim": 0.5}}


def test_the_metrics_table_sets_the_branch_beside_its_base():
    branch = {"ln": {"psnr": 20.123456, "step": 40.0}, "iln": {"psnr": 21.0, "step": 40.0}}
    table = metrics_table(branch, {"ln": {"psnr": 19.5, "step": 40.0}}).splitlines()
    assert table[0] == "| run | psnr (branch) | psnr (base) | step (branch) | step (base) |"
    assert table[2] == "| ln | 20.12 | 19.5 | 40 | 40 |"
    assert table[3] == "| iln | 21 | - | 40 | - |"  # the base lacks the run
    assert metrics_table(branch).splitlines()[0] == "| run | psnr | step |"


def test_the_copy_leaves_the_workspace_alone_and_refuses_a_used_folder(tmp_path):
    out = tmp_path / "copy"
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "params.yaml", ROOT / "dvc.yaml")}
    prepare(ROOT, out, ROOT / "configs" / "smoke.yaml")
    assert {p: p.stat().st_mtime_ns for p in before} == before
    params = yaml.safe_load((out / "params.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    assert params["runs"] == smoke["runs"] and set(params["runs"]) == {"ln", "iln"}
    assert params["train"]["iterations"] == smoke["train"]["iterations"] <= 100
    assert "no_scm = true" in (out / ".dvc" / "config").read_text()
    assert not (out / "runs").exists() and not (out / "mlflow.db").exists()
    with pytest.raises(SmokeError, match="exists and is not an empty folder"):
        prepare(ROOT, out, ROOT / "configs" / "smoke.yaml")
    with pytest.raises(SmokeError, match="no dvc.yaml here"):
        prepare(tmp_path, tmp_path / "other", ROOT / "configs" / "smoke.yaml")


def test_the_stages_see_no_mlflow_or_dvc_setting_of_the_caller():
    env = environment({"MLFLOW_TRACKING_URI": "sqlite:///mine.db", "DVC_ROOT": "/x", "A": "1"})
    assert "MLFLOW_TRACKING_URI" not in env and "DVC_ROOT" not in env and env["A"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


# ---- the CLI -----------------------------------------------------------------------------


def test_version_and_an_example_in_every_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip().startswith("iln 0.")
    commands = _parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, sub in commands.items():
        assert "examples:" in sub.format_help() and f"iln {name}" in sub.epilog, name


def _help_width(command: str | None, columns: int, monkeypatch) -> int:
    monkeypatch.setenv("COLUMNS", str(columns))  # read by shutil.get_terminal_size
    parser = _parser()
    if command is not None:
        parser = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    return max(len(line) for line in parser.format_help().splitlines())


@pytest.mark.parametrize("command", ["restore", "config", "smoke", None])
def test_help_fits_an_80_column_terminal_and_narrows_with_it(command, monkeypatch):
    assert _help_width(command, 80, monkeypatch) <= 80
    assert _help_width(command, 60, monkeypatch) < _help_width(command, 120, monkeypatch)


def test_stdnorm_switches_and_the_older_spelling():
    parse = _parser().parse_args
    base = ["restore", "w.pth", "in.png", "out.png"]
    assert parse(_old_booleans([*base, "--stdnorm"])).stdnorm is True
    assert parse(_old_booleans([*base, "--no-stdnorm"])).stdnorm is False
    assert parse(_old_booleans([*base])).stdnorm is None
    assert parse(_old_booleans([*base, "--stdnorm", "false"])).stdnorm is False
    assert parse(_old_booleans([*base, "--stdnorm=true"])).stdnorm is True
    assert parse(_old_booleans([*base, "--affine-outer", "off"])).affine_outer is False
    assert _old_booleans(["--stdnorm", "in.png"]) == ["--stdnorm", "in.png"]


def test_a_missing_overlay_lists_the_ones_there(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    for name in ("b.yaml", "a.yaml"):
        (tmp_path / "configs" / name).write_text("train: {iterations: 2}\n")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    code = main(["config", "configs/nope.yaml", "--params", str(tmp_path / "params.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "configs/nope.yaml: no such overlay file; the overlays in configs/: " in err
    assert err.rstrip().endswith("configs/a.yaml, configs/b.yaml")


# ---- the CI workflow ---------------------------------------------------------------------


def _readme_install() -> str:
    text = (ROOT / "README.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("python3.11 -m venv .venv"))
    return line.removesuffix(" && dvc repro")


def test_the_workflow_installs_as_the_readme_says_and_keeps_what_it_promises():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = workflow["jobs"]["smoke"]["steps"]
    uses = {s.get("uses", "").split("@")[0]: s for s in steps}
    assert uses["actions/setup-python"]["with"] == {
        "python-version": "3.11",
        "cache": "pip",
        "cache-dependency-path": "pyproject.toml",
    }
    runs = "\n".join(s.get("run", "") for s in steps)
    assert _readme_install() in runs
    assert ".venv/bin/iln smoke --out" in runs and "GITHUB_STEP_SUMMARY" in runs
    assert 'dvc" metrics show --md' in runs and "Headline" in runs and "--compare" in runs
    kept = uses["actions/upload-artifact"]["with"]["path"]
    assert "/smoke/reports/" in kept and "/smoke/mlflow.db" in kept
    assert {"push", "pull_request"} <= set(workflow[True])  # YAML 1.1 reads `on` as true


def _actionlint() -> str | None:
    local = Path(sys.executable).parent / "actionlint"
    return str(local) if local.exists() else shutil.which("actionlint")


@pytest.mark.skipif(_actionlint() is None, reason="actionlint not installed (the dev extra has it)")
def test_actionlint_finds_nothing_in_the_workflow():
    result = subprocess.run([_actionlint(), str(WORKFLOW)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the whole smoke pipeline (integration) ----------------------------------------------


def _smoke(project: Path, out: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PYTHONPATH"] = str(ROOT / "src")
    return subprocess.run(
        [*ILN, "smoke", "--project", str(project), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _clone(tmp_path: Path) -> Path:
    """The files of a fresh clone that the pipeline reads."""
    project = tmp_path / "clone"
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, project / name)
    return project


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("smoke") / "copy"
    return out, _smoke(ROOT, out)


@pytest.mark.integration
def test_the_smoke_pipeline_passes_and_checks_everything(finished):
    out, result = finished
    assert result.returncode == 0, result.stderr
    assert "iln smoke: passed in" in result.stdout and "| ln |" in result.stdout
    assert "| iln |" in result.stdout and "**Headline" in result.stdout
    rows = {p.stem: json.loads(p.read_text()) for p in (out / "reports/metrics").glob("*.json")}
    assert set(rows) == {"ln", "iln", "bicubic_sr_x2"}
    assert (out / "mlflow.db").is_file() and (out / "reports/report.html").is_file()
    assert not (ROOT / "runs" / "smoke").exists()


@pytest.mark.integration
def test_a_missing_metric_output_or_mlflow_store_is_named(finished, tmp_path):
    out, result = finished
    assert result.returncode == 0, result.stderr
    env = environment(os.environ)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    path = copy / "reports/metrics/iln.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                if k != "entropy"}))  # fmt: skip
    with pytest.raises(SmokeError, match=r"^reports/metrics/iln.json: metric 'entropy' is miss"):
        check(copy, env)
    path.write_text(path.read_text().replace("}", ', "entropy": NaN}'))
    with pytest.raises(SmokeError, match="'entropy' = nan is not finite"):
        check(copy, env)
    (copy / "reports/report.html").unlink()
    with pytest.raises(SmokeError, match=r"^reports/report.html: missing or empty"):
        check(copy, env)
    shutil.copytree(out, tmp_path / "again")
    (tmp_path / "again" / "mlflow.db").unlink()
    with pytest.raises(SmokeError, match="mlflow.db: no MLflow store"):
        check(tmp_path / "again", env)


@pytest.mark.integration
def test_a_damaged_test_image_fails_naming_the_stage_and_the_file(tmp_path):
    project = _clone(tmp_path)
    image = project / "data/default/test/coffee.png"
    image.write_bytes(image.read_bytes()[:200])  # truncated
    result = _smoke(project, tmp_path / "out")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("iln smoke: stage '") and "coffee.png" in result.stderr
    assert (ROOT / "data/default/test/coffee.png").stat().st_size > 200


@pytest.mark.integration
def test_a_stage_script_that_exits_1_fails_naming_the_stage(tmp_path):
    project = _clone(tmp_path)
    script = project / "stages" / "degrade.py"
    script.write_text("import sys\nsys.exit(1)\n" + script.read_text())
    result = _smoke(project, tmp_path / "out")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "iln smoke: stage 'degrade' failed (exit 1): it printed no error line"
    )
