"""MLflow tracking: the only module that imports mlflow.

Every stage invocation is one MLflow run. Runs of the same grid member (its training,
evaluation and analysis) are children of one parent run named after the member, so the
MLflow UI shows them together. The default store is a sqlite file at the repository
root; ``MLFLOW_TRACKING_URI`` points everything at another store or a tracking server.

Several stage processes may start at once: the sqlite store is created, and experiments
and parent runs are found or made, under an exclusive file lock beside it
(``mlflow.db.lock``); a write that meets "database is locked" is retried with backoff, so
no metric is lost. A stage run left RUNNING by a killed process of this machine is closed
as KILLED when any stage next starts (DVC may restore the killed stage from its run cache
and never run it again); a stage whose (member, stage) is still running in a live process
of the same project folder (an orphan of a killed ``dvc repro``) is refused. A resumed
training continues its own MLflow run.

A store that cannot be used (a damaged, empty, locked or full sqlite file, a tracking
server that does not answer) is a ``TrackingError``: one line naming the store and what to
do, within seconds for a server (``SERVER_TIMEOUT``). The default sqlite store keeps its
artifacts beside it (``mlartifacts/``); when the project folder was moved or copied, the
artifact locations recorded in it are re-pointed at the new folder before any run starts.

Every run of a grid member carries its norm (tag ``iln.norm``) and the colour its caller
gives it (``mlflow.runColor``; the stages pass the fixed colour of iln.figures.styles), so LN
is red and i-LN blue in every MLflow chart. The experiment is tagged as model training
(``mlflow.experimentKind``); MLflow 3.17's UI still opens on its GenAI view unless the URL
carries ``?workflowType=machine_learning`` (``<server>/#/experiments/<id>?workflowType=
machine_learning``) or the sidebar's "Model training" switch is set (the browser keeps it).

``iln ui`` (``start_ui``) serves the store and prints ``comparison_link``: it opens MLflow's
saved view ``VIEW_KEY`` (``save_comparison_view``, an experiment tag), the parent run of
every grid member with a norm, one line each, in the charts a user compares.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import math
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from iln.util.files import process_alive, write_json_atomic

RUN_TAG = "iln.run"
STAGE_TAG = "iln.stage"
KIND_TAG = "iln.kind"
PROCESS_TAG = "iln.process"  # host:pid:start of the process that owns a RUNNING stage run
WORKDIR_TAG = "iln.workdir"  # the project folder a stage run works in
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
    return os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri_default(root)


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; the message names the store and what to do."""


SERVER_TIMEOUT = 5.0  # seconds a tracking server has to answer before a stage gives up
_SQLITE_HEADER = b"SQLite format 3\x00"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def check_store(uri: str) -> None:
    """Refuse, in one line, a store MLflow would fail on with a traceback, hang on, or
    silently replace: a sqlite file that is empty, not a database, or cut short; a tracking
    server that does not answer within ``SERVER_TIMEOUT`` seconds."""
    db = _sqlite_file(uri)
    if db is not None:
        _check_sqlite_file(db)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)


def _check_sqlite_file(db: Path) -> None:
    try:
        size, header = _size_and_header(db)
    except FileNotFoundError:
        return  # a fresh store: MLflow creates it
    except OSError as err:
        raise TrackingError(f"MLflow store {db}: unreadable ({err.strerror or err})") from None
    aside = (
        f"move it aside (mv {db} {db}.damaged) to start a new store, or restore it from a backup"
    )
    if size == 0:
        raise TrackingError(f"MLflow store {db} is empty (0 bytes), not a database: {aside}")
    if not header.startswith(_SQLITE_HEADER):
        raise TrackingError(f"MLflow store {db} is not an sqlite database: {aside}")
    expected = _expected_size(header)
    if expected and size < expected and not Path(f"{db}-wal").exists():
        # Another process may be committing right now (sqlite writes page 1, with the new
        # page count, before the pages that extend the file): look again holding a read
        # lock, which waits for any commit to end.
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=RETRY_SECONDS)
            try:
                con.execute("BEGIN")
                con.execute("SELECT count(*) FROM sqlite_master").fetchall()
                size, header = _size_and_header(db)
                expected = _expected_size(header)
            finally:
                con.close()
        except sqlite3.Error:
            pass  # unreadable as it is: cut short, as its header says
        if expected and size < expected:
            raise TrackingError(
                f"MLflow store {db} is cut short ({size} of {expected} bytes): {aside}"
            )


def _size_and_header(db: Path) -> tuple[int, bytes]:
    with open(db, "rb") as handle:
        return os.fstat(handle.fileno()).st_size, handle.read(100)


def _expected_size(header: bytes) -> int:
    """The database size an sqlite header records (0 when it records none)."""
    if len(header) < 100 or header[24:28] != header[92:96]:
        return 0  # the page count is stale (written by sqlite < 3.7)
    page = int.from_bytes(header[16:18], "big")
    page = 65536 if page == 1 else page
    return page * int.from_bytes(header[28:32], "big")


def _check_server(uri: str) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT):
            pass
    except urllib.error.HTTPError:
        return  # it answers (a proxy may not route /health): MLflow's own errors follow
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"no MLflow tracking server answers at {uri} (MLFLOW_TRACKING_URI) within "
            f"{SERVER_TIMEOUT:g} s ({reason}): start it (mlflow server ...) or unset "
            f"MLFLOW_TRACKING_URI to use the project's mlflow.db"
        ) from None


def store_error(uri: str, err: BaseException) -> TrackingError:
    """One line for an error of the store at ``uri``: what went wrong and what to do."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in chain:  # down to sqlite's own message
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    found = [c for c in chain if isinstance(c, sqlite3.Error)]
    found = found or [c for c in chain if "sqlite3." in str(c)]
    text = (str(found[0].args[0]) if found[0].args else str(found[0])) if found else ""
    text = " ".join((text or str(err) or type(err).__name__).split())
    text = text.split("[SQL:")[0].split("(Background on this error")[0].strip()
    text = re.sub(r"^\(sqlite3\.\w+\)\s*", "", text)  # SQLAlchemy's prefix
    db = _sqlite_file(uri)
    where = f"MLflow store {db or uri}"
    lowered = text.lower()
    if "disk is full" in lowered or "no space left" in lowered:
        disk = f"the disk of {db}" if db else "the server's disk"
        return TrackingError(
            f"{where}: the disk is full ({text}): free space on {disk}, then rerun"
        )
    if "not a database" in lowered or "malformed" in lowered:
        return TrackingError(
            f"{where} is damaged ({text}): move it aside (mv {db} {db}.damaged) to start a "
            f"new store, or restore it from a backup"
        )
    if "database is locked" in lowered:
        return TrackingError(
            f"{where} stayed locked by another process for {RETRY_SECONDS:g} s ({text}): close "
            f"what holds it (an sqlite shell, a database browser, a stuck stage), then rerun"
        )
    if "readonly" in lowered or "read-only" in lowered or "permission denied" in lowered:
        return TrackingError(f"{where} is not writable ({text}): fix its permissions, then rerun")
    return TrackingError(f"{where}: {text}")


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
    """Handle on one MLflow run: params, step metrics, tags and artifacts. A write the store
    refuses raises ``TrackingError`` naming ``store``."""

    def __init__(self, client: Any, run_id: str, store: str | None = None) -> None:
        self._client = client
        self.run_id = run_id
        self.store = store

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_text(v)) for k, v in params.items()]
        for start in range(0, len(items), BATCH_LIMIT):
            _retry(
                self._client.log_batch,
                self.run_id,
                params=items[start : start + BATCH_LIMIT],
                store=self.store,
            )

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
            _retry(
                self._client.log_batch,
                self.run_id,
                metrics=finite[start : start + BATCH_LIMIT],
                store=self.store,
            )
        if other:
            self.set_tags(other)

    def log_curve(self, key: str, points: Sequence[tuple[int, float]]) -> None:
        """Log the (step, value) ``points`` of metric ``key`` in batches (non-finite values
        are left out: MLflow stores them poorly)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [
            Metric(_metric_key(key), float(v), stamp, int(s))
            for s, v in points
            if math.isfinite(float(v))
        ]
        for start in range(0, len(items), BATCH_LIMIT):
            _retry(
                self._client.log_batch,
                self.run_id,
                metrics=items[start : start + BATCH_LIMIT],
                store=self.store,
            )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            _retry(self._client.set_tag, self.run_id, key, str(value), store=self.store)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            _retry(
                self._client.log_artifacts, self.run_id, str(path), artifact_path, store=self.store
            )
        elif path.exists():
            _retry(
                self._client.log_artifact, self.run_id, str(path), artifact_path, store=self.store
            )


def _param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 3] + "..."


def _metric_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def _client(root: Path) -> tuple[Any, str]:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    check_store(uri)
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
        handle.log_curve(key, [(int(s), v) for s, v in points if int(s) not in held])
    if note is not None:
        handle.set_tags({GROUP_NOTE_TAG: note})
    _retry(client.set_terminated, parent_id, "FINISHED")  # its duration spans its stage runs
    return parent_id


UI_HOST = "127.0.0.1"
VIEW_KEY = "iln-compare"  # the saved view `iln ui` and the report link to
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow's saved views: experiment tags
VIEW_NAME = "LN vs i-LN: one line per grid member"
# the parent run of every grid member with a norm: one line each (no stage runs, no
# baseline, no report); ordered by name, which also stops MLflow nesting runs
COMPARED_RUNS = f"tags.`{KIND_TAG}` = 'group' and tags.`{NORM_TAG}` LIKE '%'"
RUN_NAME_ORDER = "tags.`mlflow.runName`"  # the UI's "Sort: Run Name"
COMPARED_CHARTS: tuple[tuple[str, str], ...] = (  # (metric, y axis) of the first section
    ("loss", "linear"),
    ("val/psnr", "linear"),
    ("features/deepest/magnitude", "log"),
    ("features/deepest/entropy", "linear"),
)
LOG10_MAGNITUDE = ("features/deepest/log10_magnitude", "linear")
FINAL_METRICS = ("psnr", "ssim")  # <task>/<set>/<metric> on the parents: bar charts, columns


def ui_command(root: Path) -> tuple[str, str]:
    """(how to open the store in the MLflow UI, the UI's address for the report's link):
    ``iln ui`` on the project's store, or the tracking server ``$MLFLOW_TRACKING_URI``
    names. ``$ILN_UI_PORT`` is the port the link names (``iln ui --port`` serves it)."""
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        return f"a browser (the tracking server {uri})", uri.rstrip("/")
    port = os.environ.get("ILN_UI_PORT", "5000")
    return f"iln ui --port {port}", f"http://{UI_HOST}:{port}"


def comparison_view(metric_keys: Sequence[str], now_ms: int) -> dict[str, Any]:
    """The saved-view envelope MLflow 3's runs page loads from the experiment tag
    ``mlflow.sharedViewState.<key>`` (``?viewStateShareKey=<key>``): the parent runs of
    ``COMPARED_RUNS``, all shown, in the chart view: ``COMPARED_CHARTS`` first (magnitude
    on a log axis), then bar charts of the final PSNR/SSIM and the log10 magnitude curve;
    every other metric of ``metric_keys`` (those of the compared runs) has a hidden chart,
    as MLflow would add a chart of its own for it. The runs table opens with the PSNR,
    magnitude, entropy and SSIM columns."""
    finals = sorted(  # <task>/<set>/<metric>: not val/psnr, not precision/<mode>/<set>/psnr
        k for k in metric_keys if k.count("/") == 2 and k.rsplit("/", 1)[-1] in FINAL_METRICS
    )
    first, second = "iln-compared", "iln-final"
    charts = [_line_chart(*chart, first) for chart in COMPARED_CHARTS]
    charts += [_bar_chart(key, second) for key in finals]
    charts.append(_line_chart(*LOG10_MAGNITUDE, second))
    shown = {c["metricKey"] for c in charts}
    charts += [
        {**_bar_chart(key, second), "deleted": True}
        for key in sorted(metric_keys)
        if key not in shown
    ]
    columns = [k for k in finals if k.endswith("/psnr")]
    columns += ["features/deepest/magnitude", "features/deepest/entropy"]
    columns += [k for k in finals if not k.endswith("/psnr")] + ["steps"]
    ui_state = {
        "selectedColumns": [f"metrics.`{key}`" for key in columns],
        "columnOrder": [f"metrics.`{key}`" for key in columns],  # else sorted by name
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts,
        "compareRunSections": [
            _section(first, "LN vs i-LN over training", 2),
            _section(second, "Final PSNR / SSIM", 3),
        ],
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
        "useGroupedValuesInCharts": True,
        "groupBy": None,
        "viewMaximized": False,
        "runListHidden": False,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0},
    }
    facets = {"searchFilter": COMPARED_RUNS, "orderByKey": RUN_NAME_ORDER}
    state = json.dumps({**facets, "orderByAsc": True, **ui_state}, separators=(",", ":"))
    packed = "deflate;" + base64.b64encode(zlib.compress(state.encode())).decode("ascii")
    return {"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": packed}


def _section(uuid: str, name: str, columns: int) -> dict[str, Any]:
    return {"uuid": uuid, "name": name, "display": True, "isReordered": True, "columns": columns}


def _chart(kind: str, key: str, section: str) -> dict[str, Any]:
    return {
        "uuid": f"iln-{kind.lower()}-{key}",
        "type": kind,
        "metricKey": key,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,
        "runsCountToCompare": 100,
        "displayName": key,
    }


def _line_chart(key: str, scale: str, section: str) -> dict[str, Any]:
    return {
        **_chart("LINE", key, section),
        "selectedMetricKeys": [key],
        "scaleType": scale,
        "xAxisScaleType": "linear",
        "xAxisKey": "step",
        "yAxisKey": "metric",
        "lineSmoothness": 0,
        "useGlobalXaxisKey": False,
        "useGlobalLineSmoothing": False,
        "range": {},
        "yAxisExpressions": [],
        "selectedXAxisMetricKey": "",
        "ignoreOutliers": False,
    }


def _bar_chart(key: str, section: str) -> dict[str, Any]:
    return _chart("BAR", key, section)


def save_comparison_view(root: Path, experiment: str) -> str:
    """Write the saved view ``VIEW_KEY`` of the experiment named ``experiment`` (see
    ``comparison_view``) from the metrics its compared runs hold now, replacing an older
    one. Returns the experiment's id; a store or experiment that is missing is a
    ``TrackingError``."""
    uri = tracking_uri(root)
    db = _sqlite_file(uri)
    if db is not None and not db.exists():
        raise TrackingError(f"no MLflow store {db}: run the pipeline first (dvc repro)")
    client, _ = _client(root)
    try:
        found = _retry(client.get_experiment_by_name, experiment)
        if found is None:
            raise TrackingError(
                f"MLflow store {uri} has no experiment {experiment!r} (tracking.experiment): "
                f"run the pipeline first (dvc repro)"
            )
        runs = _retry(
            client.search_runs,
            [found.experiment_id],
            filter_string=COMPARED_RUNS,
            max_results=1000,
        )
        keys = sorted({key for run in runs for key in run.data.metrics})
        view = comparison_view(keys, int(time.time() * 1000))
        _retry(
            client.set_experiment_tag,
            found.experiment_id,
            VIEW_TAG_PREFIX + VIEW_KEY,
            json.dumps(view),
        )
    except TrackingError:
        raise
    except Exception as err:
        raise store_error(uri, err) from err
    return found.experiment_id


def comparison_link(ui: str, experiment_id: str) -> str:
    """The address of the saved comparison view on the MLflow UI at ``ui``, opened in the
    chart view of the classic runs page (``workflowType=machine_learning``: not the GenAI
    overview)."""
    query = urlencode(
        {
            "workflowType": "machine_learning",
            "compareRunsMode": "CHART",
            "viewStateShareKey": VIEW_KEY,
        }
    )
    return f"{ui}/#/experiments/{experiment_id}/runs?{query}"


def free_port(host: str = UI_HOST) -> int:
    """A TCP port of ``host`` that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def start_ui(root: Path, host: str, port: int) -> subprocess.Popen:
    """Start ``mlflow ui`` on the project's store (``tracking_uri(root)``, a sqlite file)
    at ``host:port``, after re-pointing artifact locations of a moved project; returns the
    server process (see ``wait_for_ui``)."""
    uri = tracking_uri(root)
    check_store(uri)
    with _store_lock(uri):
        _relocate_artifacts(root, uri)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", host, "--port", str(port), "--workers", "1"]
    # its messages go to stderr: stdout is the address alone, for scripts; a process group
    # of its own, so that stop_ui ends the workers and job runners it starts as well
    return subprocess.Popen(
        command,
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr,
        start_new_session=True,
    )


def stop_ui(server: subprocess.Popen, grace: float = 10.0) -> None:
    """End a UI of ``start_ui`` with every process it started (``mlflow ui`` leaves its
    uvicorn worker and job consumers running when it alone is stopped)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break  # the group is gone
        try:
            server.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    server.poll()


def wait_for_ui(address: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    """Return once the MLflow UI at ``address`` answers; a server that exits or stays
    silent for ``timeout`` seconds is a ``TrackingError``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise TrackingError(
                f"the MLflow UI exited (status {server.returncode}) before serving {address}: "
                f"see its messages above (a port in use? choose another with --port)"
            )
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2):
                return
        except (OSError, ValueError):
            time.sleep(0.5)
    raise TrackingError(f"the MLflow UI did not answer at {address} within {timeout:g} s")


def charts_link(handle: StageRun, ui: str) -> str:
    """``comparison_link`` for the experiment ``handle`` belongs to."""
    experiment_id = _retry(handle._client.get_run, handle.run_id).info.experiment_id
    return comparison_link(ui, experiment_id)


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
    the report) iln.figures.styles.BASELINE_COLOR, a grey no norm uses.

    Stage runs of the experiment left RUNNING by a killed process of this machine are first
    closed as KILLED; a (run_name, stage) still running in a live process of this machine in
    the same working folder raises ``TrackingError``. ``continue_run``: the id of an earlier
    run of this stage to continue (a resumed training), when the store still has it; else a
    new run is made. The run ends FINISHED on success, FAILED on an exception (a store that
    refuses to record that adds a note to the exception instead of hiding it), KILLED on
    Ctrl-C. Any failure of the store is a ``TrackingError`` naming it.
    """
    uri = tracking_uri(root)
    workdir = str(Path.cwd().resolve())
    common = {"iln.git_commit": git_commit(root), **norm_tags(norm, color)}
    run_tags = {
        **common,
        **{k: str(v) for k, v in (tags or {}).items()},
        RUN_TAG: run_name,
        STAGE_TAG: stage,
        KIND_TAG: "stage",
        PROCESS_TAG: _process_id(),
        WORKDIR_TAG: workdir,
    }
    run_id: str | None = None
    client: Any = None
    try:
        with _store_lock(uri):  # creates the store once, however many processes start at once
            client, _ = _client(root)  # checks the store first
            _relocate_artifacts(root, uri)
            experiment_id = _experiment_id(client, experiment, root, uri)
            parent_id = _parent_run(client, experiment_id, run_name, common)
            _close_killed_runs(client, experiment_id)
            _refuse_live_twin(client, experiment_id, run_name, stage, workdir, uri)
            run_id = _reopen(client, continue_run, run_name, stage) if continue_run else None
            run_id, logged = _new_or_continued(
                client, run_id, experiment_id, f"{run_name}/{stage}", run_tags, parent_id
            )
        handle = StageRun(client, run_id, uri)
        if logged:
            handle.set_tags(run_tags)
        _log_params(handle, params or {}, logged)
    except Exception as err:
        if run_id is not None:  # made, but not ready: never leave it RUNNING
            _close_quietly(client, run_id, "FAILED", err, uri)
        if isinstance(err, TrackingError):
            raise
        raise store_error(uri, err) from err
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as err:
        _close_quietly(client, run_id, status, err, uri)
        raise
    else:
        _retry(client.set_terminated, run_id, status, store=uri)
        # the member's parent ends with its last stage run, so its duration spans them
        _retry(client.set_terminated, parent_id, "FINISHED", store=uri)
    finally:
        if status == "KILLED":
            _close_quietly(client, run_id, status, None, uri)


def _new_or_continued(
    client: Any,
    run_id: str | None,
    experiment_id: str,
    name: str,
    tags: dict[str, str],
    parent_id: str,
) -> tuple[str, dict[str, str]]:
    """(run id, params it holds): a new child run of ``parent_id``, or the continued run
    ``run_id``, claimed for this process before another stage could take it for lost."""
    if run_id is None:
        tags = {**tags, "mlflow.parentRunId": parent_id}
        return _retry(client.create_run, experiment_id, run_name=name, tags=tags).info.run_id, {}
    _retry(client.set_tag, run_id, PROCESS_TAG, tags[PROCESS_TAG])
    return run_id, dict(_retry(client.get_run, run_id).data.params)


def _log_params(handle: StageRun, params: Mapping[str, Any], logged: dict[str, str]) -> None:
    """The params a run does not hold yet; a continued run keeps those it holds (MLflow
    forbids changing them) and names the ones whose value changed in a tag."""
    new = {k: v for k, v in params.items() if str(k) not in logged}
    changed = sorted(
        k for k, v in params.items() if str(k) in logged and logged[str(k)] != _param_text(v)
    )
    if new:
        handle.log_params(new)
    if changed:
        handle.set_tags({"iln.params_changed_on_resume": ", ".join(changed)})


def _close_quietly(
    client: Any, run_id: str, status: str, failure: BaseException | None, uri: str
) -> None:
    """End run ``run_id`` while another error is on its way: a store that refuses (full,
    damaged) must not hide that error; a note on it says the run's fate instead."""
    try:
        _retry(client.set_terminated, run_id, status, store=uri)
    except Exception as err:
        if failure is not None:
            failure.add_note(
                f"and MLflow run {run_id} could not be marked {status}: {err}; the next "
                f"stage marks it KILLED"
            )


# --------------------------------------------------------------------------- concurrency

RETRY_SECONDS = 120.0  # give up on a store locked for longer than this


def _retry(call: Callable[..., Any], *args: Any, store: str | None = None, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, retried with jittered exponential backoff while the store
    answers "database is locked" (another process is writing to the sqlite file). With
    ``store`` (its URI), any other failure, and a lock held past ``RETRY_SECONDS``, raises
    ``TrackingError`` in one line naming the store."""
    delay, waited = 0.05, 0.0
    while True:
        try:
            with _unlogged_store_errors():
                return call(*args, **kwargs)
        except TrackingError:
            raise
        except Exception as err:
            if "database is locked" not in str(err) or waited > RETRY_SECONDS:
                if store is None:
                    raise
                raise store_error(store, err) from err
        pause = delay * (0.5 + random.random())
        time.sleep(pause)
        waited += pause
        delay = min(delay * 2, 2.0)


@contextmanager
def _unlogged_store_errors() -> Iterator[None]:
    """MLflow logs every sqlite error with its traceback (~100 lines) before raising it; the
    error is raised to us anyway and ends in one line (or is retried), so mute that log."""
    logger = logging.getLogger("mlflow.store.db.utils")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Exclusive lock beside a sqlite store (``<db>.lock``) while it may be created or
    experiments and parent runs are found-or-made; nothing to lock for a server."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///") :])
    if not db.parent.is_dir() and not os.environ.get("MLFLOW_TRACKING_URI"):
        db.parent.mkdir(parents=True)  # the project's own store: its folder is the project's
    if not db.parent.is_dir():  # a typo in MLFLOW_TRACKING_URI must not make a new store
        raise TrackingError(
            f"MLflow store {db}: its folder {db.parent} does not exist; create it, or fix "
            f"MLFLOW_TRACKING_URI ({uri})"
        )
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
    if not process_alive(int(pid)):
        return True
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


def _close_killed_runs(client: Any, experiment_id: str) -> list[str]:
    """Mark KILLED every RUNNING stage run of the experiment whose process of this machine
    died (whatever stage it was: DVC may restore that stage from its run cache and never
    run it again)."""
    found = _retry(
        client.search_runs,
        [experiment_id],
        filter_string=f"tags.`{KIND_TAG}` = 'stage' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    closed = []
    for run in found:
        if _owner_gone(run.data.tags.get(PROCESS_TAG)):
            _retry(client.set_terminated, run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def _refuse_live_twin(
    client: Any, experiment_id: str, run_name: str, stage: str, workdir: str, uri: str
) -> None:
    """Refuse to start (run_name, stage) beside a live process of this machine already running
    it in the same project folder (the orphan of a killed ``dvc repro``): both would write the
    same outputs. Queued experiments run in folders of their own and are not twins."""
    found = _retry(
        client.search_runs,
        [experiment_id],
        filter_string=(
            f"tags.`{RUN_TAG}` = '{run_name}' and tags.`{STAGE_TAG}` = '{stage}' "
            f"and attributes.status = 'RUNNING'"
        ),
        max_results=100,
    )
    for run in found:
        process = run.data.tags.get(PROCESS_TAG) or ""
        if run.data.tags.get(WORKDIR_TAG) != workdir or process.count(":") < 2:
            continue
        host, pid, _ = process.rsplit(":", 2)
        mine = host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid()
        if mine and not _owner_gone(process):
            raise TrackingError(
                f"{run_name}/{stage} is already running in process {pid} of this project "
                f"(MLflow run {run.info.run_id} in {uri}; left by an interrupted dvc repro?): "
                f"wait for it to end or stop it (kill {pid}), then rerun"
            )


def _relocate_artifacts(root: Path, uri: str) -> None:
    """Re-point the artifact locations of the default store ``<root>/mlflow.db`` at
    ``<root>/mlartifacts`` when they name the ``mlartifacts`` folder of another place: the
    project was moved or copied with its store (an absolute path is all MLflow records)."""
    db = _sqlite_file(uri)
    if db is None or uri != tracking_uri_default(root) or not db.exists():
        return
    new = (root / "mlartifacts").resolve().as_uri()
    try:
        with sqlite3.connect(db, timeout=RETRY_SECONDS) as con:
            rows = con.execute(
                "SELECT artifact_location FROM experiments WHERE artifact_location LIKE ?",
                ("file://%/mlartifacts",),
            ).fetchall()
            for (old,) in rows:
                if old == new:
                    continue
                n = len(old)
                con.execute(
                    "UPDATE experiments SET artifact_location = ? || substr(artifact_location, ?)"
                    " WHERE substr(artifact_location, 1, ?) = ?",
                    (new, n + 1, n, old),
                )
                con.execute(
                    "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?)"
                    " WHERE substr(artifact_uri, 1, ?) = ?",
                    (new, n + 1, n + 1, old + "/"),
                )
        con.close()
    except sqlite3.OperationalError as err:
        if "no such table" in str(err):
            return  # not initialised yet: MLflow makes the tables
        raise


def tracking_uri_default(root: Path) -> str:
    """The default store of a project folder: ``<root>/mlflow.db``."""
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def finished_stage_runs(uri: str, experiment: str) -> dict[tuple[str, str], int]:
    """(grid member, stage) -> the number of FINISHED stage runs in experiment ``experiment``
    of the store ``uri`` (empty when the experiment does not exist)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    counts: dict[tuple[str, str], int] = {}
    for run in client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{KIND_TAG}` = 'stage' and attributes.status = 'FINISHED'",
        max_results=5000,
    ):
        key = (run.data.tags.get(RUN_TAG, ""), run.data.tags.get(STAGE_TAG, ""))
        counts[key] = counts.get(key, 0) + 1
    return counts


# The MLflow run a training logs to, kept beside its checkpoint, so that a resumed training
# continues that run instead of starting another.
TRACKING_FILE = "tracking.json"


def tracked_run(folder: Path, fingerprint: str, store: str) -> str | None:
    """The id of the run recorded in checkpoint folder ``folder`` for configuration
    ``fingerprint`` in ``store`` (None: none, damaged, or another configuration or store)."""
    try:
        record = json.loads((Path(folder) / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("fingerprint") != fingerprint or record.get("store") != store:
        return None
    return record.get("run_id") if isinstance(record.get("run_id"), str) else None


def remember_tracked_run(folder: Path, fingerprint: str, store: str, run_id: str) -> None:
    """Record beside the checkpoints in ``folder`` which run this training logs to."""
    write_json_atomic(
        Path(folder) / TRACKING_FILE,
        {"fingerprint": fingerprint, "store": store, "run_id": run_id},
    )
