"""Where a run's initial weights come from (``runs.R.init``): read as strictly as the stages
read weights, every refusal one line naming the params key and the file."""

from __future__ import annotations

import pickle

import pytest
import torch

from iln.config.layout import Layout
from iln.config.params import InitSpec
from iln.models import build_model, to_official_state_dict
from iln.weights.trained import save_trained
from iln.weights.warm_start import open_init

WHERE = "runs.ft.init"


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("hat_tiny", norm="iln", scale=2)


@pytest.fixture
def layout(tmp_path):
    return Layout(tmp_path)


def _trained(layout, run="ln"):
    path = layout.weights(run)
    path.parent.mkdir(parents=True)
    ema, raw = _model(1), _model(2)
    save_trained(path, ema, arch="hat_tiny", norm="iln", scale=2, overrides={}, raw=raw)
    return ema, raw


def _basicsr(layout, blob, name="w.pth"):
    path = layout.root / "weights" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)
    return path


def test_a_run_source_gives_its_ema_weights_or_with_key_params_its_trained_ones(layout):
    ema, raw = _trained(layout)
    got = open_init(InitSpec(run="ln"), WHERE, layout, _model())
    torch.testing.assert_close(got.state, ema.state_dict(), rtol=0, atol=0)
    assert got.record is None and len(got.sha256) == 64
    got = open_init(InitSpec(run="ln", key="params"), WHERE, layout, _model())
    torch.testing.assert_close(got.state, raw.state_dict(), rtol=0, atol=0)
    assert "trained weights" in got.name


def test_a_file_gives_the_tensors_of_its_key_in_our_names_and_never_the_other_key(layout):
    source = _model(3)
    _basicsr(layout, {"params": to_official_state_dict(source)})
    got = open_init(InitSpec(weights="weights/w.pth", key="params"), WHERE, layout, _model())
    torch.testing.assert_close(got.state, source.state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"w\.pth: has no 'params_ema' \(it has 'params'\)"):
        open_init(InitSpec(weights="weights/w.pth"), WHERE, layout, _model())


def test_a_file_outside_the_project_or_a_folder_is_refused(layout, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "w.pth"
    torch.save({"params_ema": {}}, outside)
    with pytest.raises(ValueError, match=rf"{WHERE}.weights: .* lies outside the project"):
        open_init(InitSpec(weights=str(outside)), WHERE, layout, _model())
    (layout.root / "weights" / "dir.pth").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"{WHERE}.weights: .*dir\.pth is a folder"):
        open_init(InitSpec(weights="weights/dir.pth"), WHERE, layout, _model())


def test_a_changed_file_is_refused_against_its_recorded_checksum(layout):
    _basicsr(layout, {"params_ema": to_official_state_dict(_model(3))})
    spec = InitSpec(weights="weights/w.pth")
    from iln.weights.released import pin_weights

    pin_weights(open_init(spec, WHERE, layout, _model()).record, book=layout.weights_book)
    _basicsr(layout, {"params_ema": to_official_state_dict(_model(4))})
    with pytest.raises(ValueError, match=r"w\.pth has SHA-256 .* recorded for it on first use"):
        open_init(spec, WHERE, layout, _model())


def test_damaged_unsafe_and_nan_sources_are_one_line_naming_the_file(layout):
    _trained(layout)
    path = layout.weights("ln")
    path.write_bytes(path.read_bytes()[:1000])  # cut short
    with pytest.raises(ValueError, match=rf"{WHERE}.run: .*model\.pt: unreadable trained model"):
        open_init(InitSpec(run="ln"), WHERE, layout, _model())

    class Payload:  # a pickle that is not weights-only
        def __reduce__(self):
            return (print, ("code ran",))

    path.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=2))
    with pytest.raises(ValueError, match=rf"{WHERE}.run: .*model\.pt: unreadable trained model"):
        open_init(InitSpec(run="ln"), WHERE, layout, _model())

    state = to_official_state_dict(_model(3))
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    _basicsr(layout, {"params_ema": state}, "nan.pth")
    with pytest.raises(ValueError, match=r"nan\.pth .* holds NaN or infinite values"):
        open_init(InitSpec(weights="weights/nan.pth"), WHERE, layout, _model())
