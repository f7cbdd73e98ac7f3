"""MLflow tracking: each norm's run carries the colour it is given; the experiment is model
training."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from iln import tracking
from iln.styles import NORM_STYLES


def test_norm_runs_get_the_norms_colour_and_the_experiment_its_kind(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, norm in (("ln", "ln"), ("iln", "iln"), ("bicubic", None)):
        with tracking.stage_run(
            tmp_path,
            experiment="e",
            stage="evaluate",
            run_name=name,
            norm=norm,
            color=NORM_STYLES[norm].color if norm else None,
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


def test_an_experiment_tag_set_meanwhile_by_another_process_is_not_an_error(tmp_path):
    """Two stages against one tracking server both find the experiment untagged and both
    tag it; the server refuses the second insert (UNIQUE constraint failed), which must not
    fail the stage. Any other refusal still does."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = MlflowClient(tracking_uri=uri)
    real.create_experiment("e")

    class RacingClient:  # the other process tags the experiment just before we do
        def __getattr__(self, name):
            return getattr(real, name)

        def set_experiment_tag(self, experiment_id, key, value):
            real.set_experiment_tag(experiment_id, key, value)
            raise RuntimeError("UNIQUE constraint failed: experiment_tags.key")

    experiment_id = tracking._experiment_id(RacingClient(), "e", tmp_path, uri)
    tags = real.get_experiment(experiment_id).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND

    class RefusingClient(RacingClient):  # refuses and nobody else set the tag
        def set_experiment_tag(self, experiment_id, key, value):
            raise RuntimeError("permission denied")

    real.create_experiment("f")
    with pytest.raises(RuntimeError, match="permission denied"):
        tracking._experiment_id(RefusingClient(), "f", tmp_path, uri)
