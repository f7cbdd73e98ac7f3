"""MLflow tracking: each norm's run carries its fixed colour; the experiment is model training."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from iln import tracking
from iln.styles import NORM_STYLES


def test_norm_runs_get_the_norms_colour_and_the_experiment_its_kind(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, norm in (("ln", "ln"), ("iln", "iln"), ("bicubic", None)):
        with tracking.stage_run(
            tmp_path, experiment="e", stage="evaluate", run_name=name, norm=norm
        ):
            pass
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("e")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    colours = {r.info.run_name: r.data.tags.get(tracking.RUN_COLOR_TAG) for r in runs}
    assert colours["ln/evaluate"] == colours["ln"] == NORM_STYLES["ln"].color
    assert colours["iln/evaluate"] == NORM_STYLES["iln"].color != colours["ln"]
    assert colours["bicubic/evaluate"] is None
    assert tracking.experiment_url("http://127.0.0.1:5000/", "3") == (
        "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    )
