"""Damaged inputs: a cut resume checkpoint, model.pt or checksum file; a diverging run."""

from __future__ import annotations

import pytest
import torch

from iln.data.download import ChecksumBook
from iln.training.resume import kept_path, previous_path
from iln.training.loop import TrainingDiverged, fit
from iln.weights.trained import load_trained, save_trained
from tests.helpers import train_settings
from tests.test_train import StreamData, TinyNet


def _train(path, data=None, iterations=12, fingerprint="abc", warnings=None):
    torch.manual_seed(0)
    settings = train_settings(
        iterations=iterations, batch_size=4, checkpoint_every=4, log_every=2, probe_every=0
    )
    return fit(
        TinyNet(),
        data or StreamData(),
        settings,
        device=torch.device("cpu"),
        checkpoint_path=path,
        fingerprint=fingerprint,
        progress=False,
        warn=(warnings.append if warnings is not None else None),
    )


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_cut_resume_checkpoint_falls_back_to_the_previous_one(tmp_path):
    ema_ref, _ = _train(tmp_path / "ref" / "ckpt.pt")
    path = tmp_path / "cut" / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        _train(path, StreamData(fail_at=10 * 4 + 1))  # killed in step 11: checkpoints 4, 8
    assert torch.load(previous_path(path), weights_only=True)["step"] == 4
    _cut(path)
    warnings: list[str] = []
    ema, result = _train(path, warnings=warnings)
    assert result.resumed_from == 4 and _same(ema, ema_ref)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"{path} is unreadable" in warnings[0]
    assert f"resuming from {previous_path(path)} (step 4)" in warnings[0]


def test_no_readable_checkpoint_restarts_from_step_0_with_one_warning(tmp_path):
    path = tmp_path / "ckpt.pt"
    _train(path, iterations=8)
    _cut(path)
    _cut(previous_path(path))
    warnings: list[str] = []
    _, result = _train(path, iterations=8, warnings=warnings)
    assert result.resumed_from == 0 and result.steps == 8
    assert len(warnings) == 1 and "training starts at step 0" in warnings[0]


def test_a_cut_model_file_names_the_file_and_the_stage_that_writes_it(tmp_path):
    path = tmp_path / "runs" / "ln" / "train" / "model.pt"
    model = TinyNet()
    save_trained(path, model, arch="hat_tiny", norm="ln", scale=2, overrides={})
    _cut(path)
    with pytest.raises(ValueError) as info:
        load_trained(path, torch.device("cpu"))
    message = str(info.value)
    assert message.startswith(f"{path}: unreadable trained model") and "\n" not in message
    assert "train stage writes it" in message


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"DIV2K.zip": "deadbeef"}'])
def test_a_damaged_checksum_file_names_the_file_and_the_stage_that_writes_it(tmp_path, text):
    book = tmp_path / "checksums.json"
    book.write_text(text)
    with pytest.raises(ValueError, match=r"checksums\.json: unreadable checksum file.*download"):
        ChecksumBook(book)


def test_divergence_names_the_last_good_checkpoint_of_this_configuration(tmp_path):
    path = tmp_path / "ckpt.pt"
    _train(path, iterations=4, fingerprint="another configuration")
    with pytest.raises(TrainingDiverged) as info:  # diverges before its first checkpoint
        _train(path, StreamData(nan_at=2 * 4))
    assert "no checkpoint of this configuration was written" in str(info.value)
    assert str(path) not in str(info.value)
    with pytest.raises(TrainingDiverged, match=rf"step 8\) is kept at {path}$"):
        _train(path, StreamData(nan_at=9 * 4))


def test_a_shorter_run_keeps_the_longer_runs_checkpoints_and_20_resumes_from_20(tmp_path):
    path = tmp_path / "ckpt.pt"
    ema_20, first = _train(path, iterations=20)  # checkpoints at 16 and 20
    assert first.resumed_from == 0
    _, short = _train(path, iterations=6)  # 4 and 6: must not destroy 16 and 20
    assert short.resumed_from == 0 and short.steps == 6
    assert torch.load(path, weights_only=True)["step"] == 6
    assert torch.load(kept_path(path, 20), weights_only=True)["step"] == 20
    assert torch.load(kept_path(path, 16), weights_only=True)["step"] == 16
    warnings: list[str] = []
    ema, again = _train(path, iterations=20, warnings=warnings)
    assert again.resumed_from == 20 and _same(ema, ema_20) and not warnings
    _, middle = _train(path, iterations=18)  # the latest compatible step of 18 is 16
    assert middle.resumed_from == 16
    assert not kept_path(path, 16).exists()  # reached again: no longer kept
    assert kept_path(path, 20).exists()
    _, longer = _train(path, iterations=24)
    assert longer.resumed_from == 20 and torch.load(path, weights_only=True)["step"] == 24
    assert {p.name for p in tmp_path.iterdir()} == {"ckpt.pt", "ckpt.prev.pt"}


def test_a_longer_run_of_another_configuration_is_not_kept(tmp_path):
    path = tmp_path / "ckpt.pt"
    _train(path, iterations=8, fingerprint="other")
    _, result = _train(path, iterations=4)
    assert result.resumed_from == 0
    assert {p.name for p in tmp_path.iterdir()} == {"ckpt.pt", "ckpt.prev.pt"}
