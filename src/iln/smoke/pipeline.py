"""The smoke pipeline: ``dvc repro`` of this project in a copy of it, with an overlay of small
params (``configs/smoke.yaml``), then checks of what the chain must deliver.

Why a copy with an overlay, not ``dvc exp run --temp -S ...``: an experiment run records its
results as Git refs of the user's repository and needs a Git commit to start from, while the
MLflow store of a stage lives in the workspace it runs for (``DVC_ROOT``), so the user's
``mlflow.db`` would collect the smoke runs; ``-S`` also takes values, not the grid table an
overlay replaces whole. A copy holds its own ``dvc.lock``, ``runs/``, ``reports/`` and
``mlflow.db``; the workspace is read, never written. The copy is a DVC project without Git
(``core.no_scm``): nothing is committed, nothing is pushed.

Every failure is a :class:`SmokeError` whose message is one line naming the cause: the stage
that failed and its own error line, or the output, metric or MLflow run that is missing.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from iln.config.layout import RunFiles
from iln.config.overlay import apply_file
from iln.config.params import read_yaml

OVERLAY = Path("configs") / "smoke.yaml"
LOG_NAME = "smoke.log"
# What a fresh clone holds that `dvc repro` reads (the rest: outputs, caches, the store).
COPIED: tuple[str, ...] = (
    "dvc.yaml",
    "params.yaml",
    "stages",
    "src",
    "configs",
    "data.dvc",
    ".dvcignore",
    ".dvc/config",
    "data/default",
    "plots",
)
REQUIRED: tuple[str, ...] = ("dvc.yaml", "params.yaml", "stages", "src")
RUN_METRICS: tuple[str, ...] = ("psnr", "ssim", "magnitude", "entropy", "step")
BASELINE_METRICS: tuple[str, ...] = ("psnr", "ssim")
RUN_STAGES: tuple[str, ...] = ("train", "evaluate", "analyze")
BASELINE = "bicubic"
REPORT_FILES: tuple[str, ...] = ("report.md", "report.html", "summary.json")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*.iln.tmp", ".*.tmp[0-9]*")
_RUNNING = re.compile(r"^Running stage '([^']+)':")
_FAILED = re.compile(r"failed to reproduce '([^']+)'")
_EXIT = re.compile(r"exited with (-?\d+)")
_ERROR_LINE = re.compile(r"^[\w.@-]+: error: ")


class SmokeError(RuntimeError):
    """The chain is broken; the message is one line naming the cause."""


@dataclass(frozen=True)
class StageTime:
    stage: str
    seconds: float  # wall clock from DVC starting the stage to the next one (its lock update too)


@dataclass(frozen=True)
class Repro:
    returncode: int
    stages: tuple[StageTime, ...]
    seconds: float
    cpu_seconds: float  # user + system time of DVC and every stage process
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Checked:
    metrics: dict[str, dict[str, float]]  # `dvc metrics show` rows: file stem -> key -> value
    stage_runs: int  # finished MLflow stage runs found
    headline: str  # the report's headline sentence ("" when it has none)


def prepare(project: Path, out: Path, overlay: Path) -> None:
    """Copy what ``dvc repro`` reads from ``project`` into the new folder ``out`` and apply
    ``overlay`` to the copy's params.yaml (on top of the workspace's own params)."""
    if not (project / "dvc.yaml").is_file():
        raise SmokeError(f"{project}: no dvc.yaml here; run iln smoke from the project root")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SmokeError(f"{out}: exists and is not an empty folder; name a new one with --out")
    if not overlay.is_file():
        raise SmokeError(f"{overlay}: no such overlay (the smoke params are configs/smoke.yaml)")
    missing = [name for name in REQUIRED if not (project / name).exists()]
    if missing:
        raise SmokeError(f"{project}: missing {', '.join(missing)}; is this the iln project?")
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source, target = project / name, out / name
        if not source.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=_IGNORED)
        else:
            shutil.copy2(source, target)
    _without_git(out / ".dvc" / "config")
    try:
        apply_file(overlay, out / "params.yaml", stack=True)
    except (ValueError, OSError) as err:
        raise SmokeError(str(err)) from None


def _without_git(config: Path) -> None:
    """Mark the copy a DVC project without Git (``core.no_scm``)."""
    config.parent.mkdir(parents=True, exist_ok=True)
    text = config.read_text() if config.is_file() else ""
    if re.search(r"^\[core\]\s*$", text, flags=re.M):
        text = re.sub(r"^\[core\]\s*$", "[core]\n    no_scm = true", text, count=1, flags=re.M)
    else:
        text = f"[core]\n    no_scm = true\n{text}"
    config.write_text(text)


def environment(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` for DVC and the stages: this Python's scripts first on PATH (``python`` and
    ``dvc`` of this install), no MLflow or DVC settings of the caller's (the records go to the
    copy's own mlflow.db), no telemetry."""
    env = {k: v for k, v in base.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # each line of DVC's as it happens: the stage times
    return env


def dvc_command() -> str:
    """The ``dvc`` of this Python's install, else whichever is on PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def reproduce(root: Path, env: Mapping[str, str], log: Path) -> Repro:
    """``dvc repro`` in ``root``, its output in ``log``; the wall time of each stage."""
    started: list[tuple[str, float]] = []
    lines: list[str] = []
    begin, cpu_before = time.monotonic(), _children_cpu()
    with (
        log.open("w") as sink,
        subprocess.Popen(
            [dvc_command(), "repro"],
            cwd=root,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        ) as process,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            sink.write(line)
            sink.flush()
            found = _RUNNING.match(line)
            if found:
                started.append((found.group(1), time.monotonic()))
            lines.append(line.rstrip("\n"))
        code = process.wait()
    end = time.monotonic()
    ends = [t for _, t in started[1:]] + [end]
    stages = tuple(StageTime(name, e - s) for (name, s), e in zip(started, ends, strict=True))
    return Repro(code, stages, end - begin, _children_cpu() - cpu_before, tuple(lines))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def failure(repro: Repro, log: Path) -> str:
    """One line: which stage failed and its own error line (or DVC's), and where the log is."""
    errors = [line for line in repro.lines if line.startswith("ERROR:")]
    failed = next((m.group(1) for e in errors if (m := _FAILED.search(e))), None)
    if failed is None:
        cause = errors[-1] if errors else f"dvc repro exited with {repro.returncode}"
        return f"dvc repro failed before any stage ran: {cause} (log: {log})"
    code = next((m.group(1) for e in errors if (m := _EXIT.search(e))), str(repro.returncode))
    section = _stage_section(repro.lines, failed)
    own = [line for line in section if _ERROR_LINE.match(line.strip())]
    if own:
        cause = own[-1].strip()
    elif any(line.startswith("Traceback") for line in section):
        cause = next(line.strip() for line in reversed(section) if line.strip())
    else:
        cause = "it printed no error line"
    return f"stage '{failed}' failed (exit {code}): {cause} (log: {log})"


def _stage_section(lines: Sequence[str], stage: str) -> list[str]:
    """The lines a stage printed: after its ``Running stage`` line, before DVC's ERROR."""
    starts = [i for i, line in enumerate(lines) if line.startswith(f"Running stage '{stage}':")]
    if not starts:
        return []
    section = []
    for line in lines[starts[-1] + 1 :]:
        if line.startswith("ERROR:") or _RUNNING.match(line):
            break
        if not line.startswith("> "):  # DVC's echo of the command
            section.append(line)
    return section


def expected_outputs(root: Path, runs: Sequence[str]) -> list[Path]:
    """The files every run of the grid and the report must have written."""
    paths = [root / "reports" / name for name in REPORT_FILES]
    for run in runs:
        files = RunFiles(root / "runs" / run)
        paths += [files.weights, files.history, files.probes, files.metrics, files.per_image]
    return paths


def check(root: Path, env: Mapping[str, str]) -> Checked:
    """What the finished copy ``root`` must hold: every expected output, a finite value of
    every metric in ``dvc metrics show``, a finished MLflow run of every stage invocation."""
    params = read_yaml(root / "params.yaml")
    runs = list(params["runs"])
    tasks = sorted({spec["task"] for spec in params["runs"].values()})
    for path in expected_outputs(root, runs):
        if not path.is_file() or path.stat().st_size == 0:
            raise SmokeError(f"{path.relative_to(root)}: missing or empty after dvc repro")
    for folder in [
        root / "reports" / "figures",
        *(RunFiles(root / "runs" / r).analysis_dir for r in runs),
    ]:
        if not folder.is_dir() or not any(folder.iterdir()):
            raise SmokeError(f"{folder.relative_to(root)}: missing or empty after dvc repro")
    expected = {run: RUN_METRICS for run in runs}
    expected |= {f"{BASELINE}_{task}": BASELINE_METRICS for task in tasks}
    metrics = check_metrics(shown_metrics(root, env), expected)
    found = check_stage_runs(root, params["tracking"]["experiment"], runs, env)
    return Checked(metrics, found, headline((root / "reports" / "report.md").read_text()))


def shown_metrics(root: Path, env: Mapping[str, str]) -> dict[str, dict[str, object]]:
    """``dvc metrics show --json`` of the workspace of ``root``: file stem -> its values."""
    result = subprocess.run(
        [dvc_command(), "metrics", "show", "--json"],
        cwd=root,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SmokeError(f"dvc metrics show failed: {last}")
    shown = json.loads(result.stdout or "{}")
    files = next(iter(shown.values()), {}).get("data", {}) if shown else {}
    rows: dict[str, dict[str, object]] = {}
    for path, entry in files.items():
        if "error" in entry:
            raise SmokeError(f"{path}: dvc metrics show cannot read it ({entry['error']})")
        rows[Path(path).stem] = entry.get("data", {})
    return rows


def check_metrics(
    rows: Mapping[str, Mapping[str, object]], expected: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, float]]:
    """``rows`` (file stem -> values) with every key of ``expected`` present and finite."""
    out: dict[str, dict[str, float]] = {}
    for name, keys in expected.items():
        if name not in rows:
            raise SmokeError(f"reports/metrics/{name}.json: no such row in dvc metrics show")
        for key in keys:
            value = rows[name].get(key)
            if value is None:
                raise SmokeError(f"reports/metrics/{name}.json: metric '{key}' is missing")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SmokeError(
                    f"reports/metrics/{name}.json: metric '{key}' = {value!r} is not a number"
                )
            if not math.isfinite(value):
                raise SmokeError(
                    f"reports/metrics/{name}.json: metric '{key}' = {value} is not finite"
                )
        out[name] = {key: float(rows[name][key]) for key in keys}  # type: ignore[arg-type]
    return out


def check_stage_runs(
    root: Path, experiment: str, runs: Sequence[str], env: Mapping[str, str]
) -> int:
    """The number of finished MLflow stage runs in the copy's store; an error naming the first
    stage invocation without one."""
    from iln import tracking  # imports MLflow: only once the pipeline has run

    store = root / "mlflow.db"
    if not store.is_file():
        raise SmokeError("mlflow.db: no MLflow store after dvc repro")
    finished = tracking.finished_stage_runs(tracking.tracking_uri_default(root), experiment)
    wanted = [(run, stage) for run in runs for stage in RUN_STAGES]
    wanted += [(BASELINE, "evaluate"), ("report", "report")]
    for run, stage in wanted:
        if (run, stage) not in finished:
            raise SmokeError(
                f"mlflow.db: no finished MLflow run of stage {stage} for {run} "
                f"(experiment {experiment})"
            )
    return sum(finished.values())


def headline(report: str) -> str:
    """The report's headline paragraph, "" when it has none."""
    return next((line for line in report.splitlines() if line.startswith("**Headline")), "")


def metrics_table(
    branch: Mapping[str, Mapping[str, object]],
    base: Mapping[str, Mapping[str, object]] | None = None,
) -> str:
    """A Markdown table of ``dvc metrics show`` rows (file stem -> values); with ``base``, each
    value beside the base's (``-`` where the base lacks it)."""
    keys = [k for k in RUN_METRICS if any(k in row for row in branch.values())]
    if base is None:
        head = ["run", *keys]
        body = [[name, *(_cell(row.get(k)) for k in keys)] for name, row in branch.items()]
    else:
        head = ["run", *(f"{k} ({side})" for k in keys for side in ("branch", "base"))]
        body = [
            [name, *(_cell(src.get(name, {}).get(k)) for k in keys for src in (branch, base))]
            for name in branch
        ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return str(int(value)) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Outcome:
    repro: Repro
    checked: Checked
    seconds: float  # copy, dvc repro and checks


def run(project: Path, out: Path, overlay: Path, environ: Mapping[str, str]) -> Outcome:
    """The smoke pipeline of ``project`` in the new folder ``out``; a :class:`SmokeError`
    naming the cause when the chain is broken."""
    begin = time.monotonic()
    prepare(project, out, overlay)
    env = environment(environ)
    log = out / LOG_NAME
    repro = reproduce(out, env, log)
    if repro.returncode != 0:
        raise SmokeError(failure(repro, log))
    checked = check(out, env)
    return Outcome(repro, checked, time.monotonic() - begin)


def stage_times(stages: Sequence[StageTime]) -> str:
    return ", ".join(f"{s.stage} {s.seconds:.1f} s" for s in stages)
