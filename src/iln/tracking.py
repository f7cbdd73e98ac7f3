"""MLflow tracking: the only module that imports mlflow.

Every stage invocation is one MLflow run. Runs of the same grid member (its training,
evaluation and analysis) are children of one parent run named after the member, so the
MLflow UI shows them together. The default store is a sqlite file at the repository
root; ``MLFLOW_TRACKING_URI`` points everything at another store or a tracking server.

Several stage processes may start at once: the sqlite store is created, and experiments
and parent runs are found or made, under an exclusive file lock beside it
(``mlflow.db.lock``); a write that meets "database is locked" is retried with backoff, so
no metric is lost. A stage run left RUNNING by a killed process of this machine is closed
as KILLED when its stage next starts; a resumed training continues its own MLflow run.

Every run of a grid member carries its norm (tag ``iln.norm``) and the colour its caller
gives it (``mlflow.runColor``; the stages pass the norm's fixed colour from iln.styles), so LN
is red and i-LN blue in every MLflow chart. The experiment is tagged as model training
(``mlflow.experimentKind``); MLflow 3.17's UI still opens on its GenAI view unless the URL
carries ``?workflowType=machine_learning`` (``<server>/#/experiments/<id>?workflowType=
machine_learning``) or the sidebar's "Model training" switch is set (the browser keeps it).
"""

from __future__ import annotations

import fcntl
import math
import os
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

RUN_TAG = "iln.run"
STAGE_TAG = "iln.stage"
KIND_TAG = "iln.kind"
PROCESS_TAG = "iln.process"  # host:pid:start of the process that owns a RUNNING stage run
NORM_TAG = "iln.norm"
RUN_COLOR_TAG = "mlflow.runColor"  # the colour the MLflow UI draws a run in
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # "Machine learning" rather than "GenAI apps"
EXPERIMENT_NOTE_TAG = "mlflow.note.content"  # the experiment's description in the UI
EXPERIMENT_NOTE = (
    "Stage runs of the iln pipeline (train, evaluate, analyze per grid member, and the "
    "report), grouped under one parent run per member; run colours are fixed per norm."
)
PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values
BATCH_LIMIT = 100


def tracking_uri(root: Path) -> str:
    """The store every stage writes to: ``$MLFLOW_TRACKING_URI`` or ``<root>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def git_commit(root: Path) -> str:
    """Commit of the code that ran, with ``-dirty`` when the work tree had changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


class StageRun:
    """Handle on one MLflow run: params, step metrics, tags and artifacts."""

    def __init__(self, client: Any, run_id: str) -> None:
        self._client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_text(v)) for k, v in params.items()]
        for start in range(0, len(items), BATCH_LIMIT):
            _retry(self._client.log_batch, self.run_id, params=items[start : start + BATCH_LIMIT])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite numbers (MLflow stores NaN/inf poorly: they go in as tags instead)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        finite, other = [], {}
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):
                finite.append(Metric(_metric_key(key), value, stamp, step or 0))
            else:
                other[f"nonfinite.{_metric_key(key)}"] = str(value)
        for start in range(0, len(finite), BATCH_LIMIT):
            _retry(self._client.log_batch, self.run_id, metrics=finite[start : start + BATCH_LIMIT])
        if other:
            self.set_tags(other)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            _retry(self._client.set_tag, self.run_id, key, str(value))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            _retry(self._client.log_artifacts, self.run_id, str(path), artifact_path)
        elif path.exists():
            _retry(self._client.log_artifact, self.run_id, str(path), artifact_path)


def _param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 3] + "..."


def _metric_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def _client(root: Path) -> tuple[Any, str]:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    return MlflowClient(tracking_uri=uri), uri


def _experiment_id(client: Any, name: str, root: Path, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id, tags = experiment.experiment_id, experiment.tags
    else:
        artifacts = None
        if uri.startswith("sqlite:"):
            artifacts = (root / "mlartifacts").resolve().as_uri()
        try:
            experiment_id = _retry(client.create_experiment, name, artifact_location=artifacts)
            tags = {}
        except Exception:  # made meanwhile by another process writing to the same server
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id, tags = experiment.experiment_id, experiment.tags
    wanted = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, EXPERIMENT_NOTE_TAG: EXPERIMENT_NOTE}
    for key, value in wanted.items():
        if key not in tags:  # never overwrite what a user set in the UI
            try:
                _retry(client.set_experiment_tag, experiment_id, key, value)
            except Exception:  # set meanwhile by another process: a server refuses a 2nd insert
                if key not in _retry(client.get_experiment, experiment_id).tags:
                    raise
    return experiment_id


def norm_tags(norm: str | None, color: str | None) -> dict[str, str]:
    """Tags naming a run's norm and the colour the MLflow UI draws it in."""
    tags = {NORM_TAG: norm} if norm is not None else {}
    return {**tags, RUN_COLOR_TAG: color} if color is not None else tags


GROUP_NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI


def log_to_group(
    root: Path,
    *,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    step: int | None = None,
    curves: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    note: str | None = None,
) -> str:
    """Put what a user compares on the parent run of grid member ``run_name`` (made by
    ``stage_run``, which must have run first): ``params`` (None values left out), final
    ``metrics`` at ``step``, step ``curves`` (name -> (step, value) points; steps the parent
    already holds are not logged again, so a resumed or repeated stage adds no duplicates)
    and ``note``, its description. A param whose value changed since the parent logged it
    (MLflow keeps a run's params fixed) is named in the tag ``iln.params_changed``.
    Returns the parent's run id."""
    uri = tracking_uri(root)
    with _store_lock(uri):
        client, _ = _client(root)
        experiment_id = _experiment_id(client, experiment, root, uri)
        parent_id = _parent_run(client, experiment_id, run_name, {})
    handle = StageRun(client, parent_id)
    if params:
        logged = _retry(client.get_run, parent_id).data.params
        wanted = {str(k): v for k, v in params.items() if v is not None}
        handle.log_params({k: v for k, v in wanted.items() if k not in logged})
        changed = sorted(
            k for k, v in wanted.items() if k in logged and logged[k] != _param_text(v)
        )
        if changed:
            handle.set_tags({"iln.params_changed": ", ".join(changed)})
    if metrics:
        handle.log_metrics(metrics, step=step)
    for key, points in (curves or {}).items():
        held = {m.step for m in _retry(client.get_metric_history, parent_id, _metric_key(key))}
        for point_step, value in points:
            if int(point_step) not in held:
                handle.log_metrics({key: value}, step=int(point_step))
    if note is not None:
        handle.set_tags({GROUP_NOTE_TAG: note})
    return parent_id


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def ui_command(root: Path) -> tuple[str, str]:
    """(how to open the store in the MLflow UI, the UI's address): ``mlflow ui`` on the
    project's sqlite store, or the tracking server ``$MLFLOW_TRACKING_URI`` names."""
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        return f"a browser (the tracking server {uri})", uri.rstrip("/")
    if uri == f"sqlite:///{(root / 'mlflow.db').resolve()}":
        uri = "sqlite:///mlflow.db"
    return f"mlflow ui --backend-store-uri {uri}", LOCAL_UI


def charts_link(handle: StageRun, ui: str, stage: str = "train") -> str:
    """A link that opens the MLflow UI's chart view on the runs of ``stage`` of the
    experiment ``handle`` belongs to."""
    experiment_id = _retry(handle._client.get_run, handle.run_id).info.experiment_id
    query = urlencode(
        {
            "workflowType": "machine_learning",
            "compareRunsMode": "CHART",
            "searchFilter": f"tags.`{STAGE_TAG}` = '{stage}'",
        },
        quote_via=quote,
    )
    return f"{ui}/#/experiments/{experiment_id}/runs?{query}"


def _parent_run(client: Any, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
    found = _retry(
        client.search_runs,
        [experiment_id],
        filter_string=f"tags.`{RUN_TAG}` = '{run_name}' and tags.`{KIND_TAG}` = 'group'",
        max_results=1,
    )
    if found:
        existing = found[0]
        for key in (NORM_TAG, RUN_COLOR_TAG):  # a parent made before these tags existed
            if key in tags and existing.data.tags.get(key) != tags[key]:
                _retry(client.set_tag, existing.info.run_id, key, tags[key])
        return existing.info.run_id
    parent = _retry(
        client.create_run,
        experiment_id,
        run_name=run_name,
        tags={**tags, RUN_TAG: run_name, KIND_TAG: "group"},
    )
    _retry(client.set_terminated, parent.info.run_id, "FINISHED")
    return parent.info.run_id


@contextmanager
def stage_run(
    root: Path,
    *,
    experiment: str,
    stage: str,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    continue_run: str | None = None,
    norm: str | None = None,
    color: str | None = None,
) -> Iterator[StageRun]:
    """Open one tracked run for a stage invocation of grid member ``run_name``.

    norm, color: the member's normalisation (tag ``iln.norm``) and the colour the MLflow UI
    draws its runs in (hex RGB); the stages give runs without a norm (the bicubic baseline,
    the report) iln.styles.BASELINE_COLOR, a grey no norm uses.

    Runs of the same (run_name, stage) left RUNNING by a killed process of this machine
    are first closed as KILLED. ``continue_run``: the id of an earlier run of this stage to
    continue (a resumed training), when the store still has it; else a new run is made.
    The run ends FINISHED on success, FAILED on an exception, KILLED on Ctrl-C.
    """
    uri = tracking_uri(root)
    common = {"iln.git_commit": git_commit(root), **norm_tags(norm, color)}
    run_tags = {
        **common,
        **{k: str(v) for k, v in (tags or {}).items()},
        RUN_TAG: run_name,
        STAGE_TAG: stage,
        KIND_TAG: "stage",
        PROCESS_TAG: _process_id(),
    }
    with _store_lock(uri):  # creates the store once, however many processes start at once
        client, _ = _client(root)
        experiment_id = _experiment_id(client, experiment, root, uri)
        parent_id = _parent_run(client, experiment_id, run_name, common)
        _close_killed_runs(client, experiment_id, run_name, stage)
        run_id = _reopen(client, continue_run, run_name, stage) if continue_run else None
        if run_id is None:
            run_id = _retry(
                client.create_run,
                experiment_id,
                run_name=f"{run_name}/{stage}",
                tags={**run_tags, "mlflow.parentRunId": parent_id},
            ).info.run_id
            logged: dict[str, str] = {}
        else:
            logged = dict(_retry(client.get_run, run_id).data.params)
    handle = StageRun(client, run_id)
    if logged:
        handle.set_tags(run_tags)
    if params:  # a continued run keeps its params (MLflow forbids changing them)
        new = {k: v for k, v in params.items() if str(k) not in logged}
        changed = sorted(
            k for k, v in params.items() if str(k) in logged and logged[str(k)] != _param_text(v)
        )
        handle.log_params(new)
        if changed:
            handle.set_tags({"iln.params_changed_on_resume": ", ".join(changed)})
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _retry(client.set_terminated, handle.run_id, status)


# --------------------------------------------------------------------------- concurrency

RETRY_SECONDS = 120.0  # give up on a store locked for longer than this


def _retry(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, retried with jittered exponential backoff while the store
    answers "database is locked" (another process is writing to the sqlite file)."""
    delay, waited = 0.05, 0.0
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if "database is locked" not in str(err) or waited > RETRY_SECONDS:
                raise
        pause = delay * (0.5 + random.random())
        time.sleep(pause)
        waited += pause
        delay = min(delay * 2, 2.0)


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Exclusive lock beside a sqlite store (``<db>.lock``) while it may be created or
    experiments and parent runs are found-or-made; nothing to lock for a server."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _process_id(pid: int | None = None) -> str:
    """host:pid:start-time of a process (the start time tells a reused pid apart)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def _start_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks


def _owner_gone(process: str | None) -> bool:
    """True when the process that owns a RUNNING run ran on this machine and is gone."""
    if not process or process.count(":") < 2:
        return False
    host, pid, start = process.rsplit(":", 2)
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's run: it may still be alive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # alive, owned by another user
    return start != "?" and _start_ticks(int(pid)) != start  # the pid now names another process


def _reopen(client: Any, run_id: str, run_name: str, stage: str) -> str | None:
    """Mark run ``run_id`` RUNNING again when it is a finished or killed run of this stage."""
    try:
        run = _retry(client.get_run, run_id)
    except Exception:  # deleted, or another store
        return None
    tags = run.data.tags
    if tags.get(RUN_TAG) != run_name or tags.get(STAGE_TAG) != stage:
        return None
    if run.info.status == "RUNNING" or run.info.lifecycle_stage != "active":
        return None  # a live process still writes to it, or it was deleted
    _retry(client.update_run, run_id, status="RUNNING")
    return run_id


def _close_killed_runs(client: Any, experiment_id: str, run_name: str, stage: str) -> list[str]:
    """Mark KILLED the RUNNING runs of (run_name, stage) whose process of this machine died."""
    found = _retry(
        client.search_runs,
        [experiment_id],
        filter_string=(
            f"tags.`{RUN_TAG}` = '{run_name}' and tags.`{STAGE_TAG}` = '{stage}' "
            f"and attributes.status = 'RUNNING'"
        ),
        max_results=100,
    )
    closed = []
    for run in found:
        if _owner_gone(run.data.tags.get(PROCESS_TAG)):
            _retry(client.set_terminated, run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed
