"""The MLflow comparison view `iln ui` prints and the report links to: the saved view's
filter selects exactly the parent run of every grid member with a norm (one line each, no
stage runs, no baseline, no report), its charts are the ones a user compares (magnitude on a
log axis), no metric gets a chart MLflow would add on its own, and the runs table opens with
PSNR, magnitude and entropy; parent runs span their stage runs in time."""

from __future__ import annotations

import base64
import json
import zlib
from urllib.parse import parse_qs, urlsplit

import pytest
from mlflow.tracking import MlflowClient

from iln import tracking


def _state(view: dict) -> dict:
    packed = view["state"]
    assert packed.startswith("deflate;")  # MLflow's compressed saved-view state
    return json.loads(zlib.decompress(base64.b64decode(packed[len("deflate;") :])))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(project folder, store URI) holding a small grid, as the stages log it."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        grid(root, "e")
    return root, uri


def grid(root, experiment: str) -> None:
    """Two grid members with train/evaluate stage runs and their parents' curves, the
    bicubic baseline and the report, as the stages log them."""
    for name, colour in (("ln", "#d62728"), ("iln", "#1f77b4")):
        for stage in ("train", "evaluate"):
            with tracking.stage_run(
                root, experiment=experiment, stage=stage, run_name=name, norm=name, color=colour
            ) as run:
                run.log_metrics({"loss": 0.5, "features/group0/magnitude": 3.0}, step=4)
        tracking.log_to_group(
            root,
            experiment=experiment,
            run_name=name,
            metrics={"sr_x2/default_test/psnr": 30.0, "sr_x2/default_test/ssim": 0.9},
            curves={
                "loss": [(1, 0.5), (2, 0.4)],
                "val/psnr": [(0, 20.0), (2, 25.0)],
                "features/deepest/magnitude": [(0, 1.0), (2, 100.0)],
                "features/deepest/log10_magnitude": [(0, 0.0), (2, 2.0)],
                "features/deepest/entropy": [(0, 4.0), (2, 3.0)],
            },
        )
    for name in ("bicubic", "report"):
        with tracking.stage_run(
            root,
            experiment=experiment,
            stage="evaluate" if name == "bicubic" else "report",
            run_name=name,
            color="#b0b0b0",
        ) as run:
            run.log_metrics({"sr_x2/default_test/psnr": 28.0})
        tracking.log_to_group(
            root, experiment=experiment, run_name=name, metrics={"sr_x2/default_test/psnr": 28.0}
        )


def test_the_saved_view_shows_one_line_per_grid_member(store, monkeypatch):
    root, uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    experiment_id = tracking.save_comparison_view(root, "e")
    client = MlflowClient(tracking_uri=uri)
    tags = client.get_experiment(experiment_id).tags
    view = json.loads(tags[tracking.VIEW_TAG_PREFIX + tracking.VIEW_KEY])
    assert view["name"] and view["createdAt"] <= view["updatedAt"]
    state = _state(view)

    # what MLflow's runs page searches with, through the store's own search
    found = client.search_runs(
        [experiment_id], filter_string=state["searchFilter"], max_results=1000
    )
    assert sorted(r.data.tags[tracking.RUN_TAG] for r in found) == ["iln", "ln"]
    assert {r.data.tags[tracking.KIND_TAG] for r in found} == {"group"}
    assert state["orderByKey"] == "tags.`mlflow.runName`"  # not start_time: no nesting
    assert state["runsHiddenMode"] == "SHOW_ALL"

    charts = state["compareRunCharts"]
    first = state["compareRunSections"][0]["uuid"]
    shown = [(c["metricKey"], c.get("scaleType")) for c in charts if c["metricSectionId"] == first]
    assert shown == [
        ("loss", "linear"),
        ("val/psnr", "linear"),
        ("features/deepest/magnitude", "log"),
        ("features/deepest/entropy", "linear"),
    ]
    held = {key for run in found for key in run.data.metrics}
    assert held <= {c["metricKey"] for c in charts}  # MLflow adds a chart for any other
    visible = {c["metricKey"] for c in charts if not c["deleted"]}
    assert "sr_x2/default_test/psnr" in visible and "steps" not in visible
    assert state["selectedColumns"][:3] == [
        "metrics.`sr_x2/default_test/psnr`",
        "metrics.`features/deepest/magnitude`",
        "metrics.`features/deepest/entropy`",
    ]
    assert state["columnOrder"] == state["selectedColumns"]
    assert state["isAccordionReordered"]  # MLflow keeps the sections' order
    assert len(tags[tracking.VIEW_TAG_PREFIX + tracking.VIEW_KEY]) <= 20000  # MLflow's limit


def test_the_link_opens_the_view_on_the_port_given():
    link = tracking.comparison_link("http://127.0.0.1:5123", "7")
    parts = urlsplit(link)
    assert parts.netloc == "127.0.0.1:5123" and parts.path == "/"
    route, query = parts.fragment.split("?")
    assert route == "/experiments/7/runs"
    assert parse_qs(query) == {
        "workflowType": ["machine_learning"],
        "compareRunsMode": ["CHART"],
        "viewStateShareKey": [tracking.VIEW_KEY],
    }
    # a search facet in the address would make MLflow ignore the saved view
    assert not {"searchFilter", "orderByKey", "orderByAsc"} & set(parse_qs(query))


def test_a_parent_run_spans_its_stage_runs(store):
    _, uri = store
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "e"]
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = {r.info.run_id: r for r in runs if r.data.tags[tracking.KIND_TAG] == "group"}
    for child in runs:
        parent = parents.get(child.data.tags.get("mlflow.parentRunId"))
        if parent is not None:
            assert parent.info.start_time <= child.info.start_time
            assert parent.info.end_time >= child.info.end_time
            assert parent.info.status == "FINISHED"


def test_a_store_without_the_experiment_is_one_line(store, monkeypatch):
    root, uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(tracking.TrackingError, match="has no experiment 'nothing'.*dvc repro"):
        tracking.save_comparison_view(root, "nothing")
