"""The parent run of a grid member carries what a user compares: params without None,
final metrics, step curves logged once per step, a description."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from iln import tracking
from iln.evaluation.monitor import deepest_group_curves
from iln.figures.styles import BASELINE_COLOR, NORM_STYLES


def _parent(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name("e")
    (run,) = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`iln.run` = '{name}' and tags.`iln.kind` = 'group'",
    )
    return run


def test_the_parent_run_holds_params_metrics_curves_and_a_note(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracking.stage_run(
        tmp_path, experiment="e", stage="train", run_name="ln", norm="ln", color="#d62728"
    ):
        pass
    curve = [(0, 2.0), (100, 5.0), (200, 9.0)]
    for _ in range(2):  # a repeated stage logs no step twice
        tracking.log_to_group(
            tmp_path,
            experiment="e",
            run_name="ln",
            params={"model.stdnorm": False, "model.window": 8, "train.init": None},
            metrics={"steps": 200},
            step=200,
            curves={"features/deepest/magnitude": curve},
            note="LN on hat_tiny",
        )
    client = MlflowClient(tracking_uri=uri)
    parent = _parent(client, "ln")
    assert parent.data.params == {"model.stdnorm": "False", "model.window": "8"}
    assert parent.data.metrics["steps"] == 200
    history = client.get_metric_history(parent.info.run_id, "features/deepest/magnitude")
    assert sorted((m.step, m.value) for m in history) == curve
    assert parent.data.tags["mlflow.note.content"] == "LN on hat_tiny"
    assert parent.data.tags[tracking.RUN_COLOR_TAG] == "#d62728"

    tracking.log_to_group(tmp_path, experiment="e", run_name="ln", params={"model.window": 16})
    parent = _parent(client, "ln")
    assert parent.data.params["model.window"] == "8"  # MLflow keeps a run's params
    assert parent.data.tags["iln.params_changed"] == "model.window"


def test_deepest_group_curves_follow_the_deepest_group_whatever_the_depth():
    rows = [
        {"step": s, "layer": layer, "magnitude": m, "entropy": 3.0 - m / 10}
        for s, m in ((0, 1.0), (100, 4.0))
        for layer in ("group0", "group1", "group1.block0", "final_norm_in")
    ] + [{"step": 100, "layer": "group2", "magnitude": 7.0, "entropy": 2.0}]
    rows += [{"step": 0, "layer": "group2", "magnitude": 6.0, "entropy": 2.5}]
    curves = deepest_group_curves(rows)
    assert curves == {
        "features/deepest/magnitude": [(0, 6.0), (100, 7.0)],
        "features/deepest/entropy": [(0, 2.5), (100, 2.0)],
    }
    assert deepest_group_curves([{"step": 0, "layer": "final_norm_in"}]) == {}


def test_the_baseline_grey_is_no_norms_colour():
    assert BASELINE_COLOR not in {style.color for style in NORM_STYLES.values()}
