"""Training loop: exact resume, divergence handling, DDP equivalence."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from iln.training.loop import StreamBatches, TrainingDiverged, fit, load_checkpoint, update_ema
from tests.helpers import assert_same_weights, train_settings


class TinyNet(nn.Module):
    """x2 upsampler with dropout, so the global RNG state matters for exact resume."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Conv2d(8, 12, 3, padding=1),
        )
        self.up = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.body(x))


class StreamData(torch.utils.data.Dataset):
    """Sample k is a pure function of k; optionally fails at one sample."""

    def __init__(self, fail_at: int | None = None, nan_at: int | None = None) -> None:
        self.fail_at, self.nan_at = fail_at, nan_at

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if k == self.fail_at:
            raise KeyboardInterrupt  # stands for kill -9 in the middle of a run
        g = torch.Generator().manual_seed(k)
        lq = torch.rand(3, 8, 8, generator=g)
        gt = torch.rand(3, 16, 16, generator=g)
        if k == self.nan_at:
            lq[0, 0, 0] = float("nan")
        return {"lq": lq, "gt": gt}


def _train(tmp_path, dataset, iterations=12, **kw):
    torch.manual_seed(0)
    settings = train_settings(
        iterations=iterations, batch_size=4, checkpoint_every=4, log_every=2, probe_every=0
    )
    return fit(
        TinyNet(),
        dataset,
        settings,
        device=torch.device("cpu"),
        checkpoint_path=tmp_path / "ckpt.pt",
        fingerprint="abc",
        progress=False,
        **kw,
    )


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    ema_ref, ref = _train(tmp_path / "ref", StreamData())
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", StreamData(fail_at=6 * 4 + 1))  # dies inside step 7
    assert load_checkpoint(tmp_path / "cut" / "ckpt.pt", "abc")["step"] == 4
    ema, resumed = _train(tmp_path / "cut", StreamData())
    assert resumed.resumed_from == 4 and resumed.steps == 12
    for a, b in zip(ema_ref.state_dict().values(), ema.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in ref.history]


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path):
    _train(tmp_path, StreamData(), iterations=4)
    assert load_checkpoint(tmp_path / "ckpt.pt", "other") is None
    assert load_checkpoint(tmp_path / "ckpt.pt", "abc")["step"] == 4


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"step 10.*step 8"):
        _train(tmp_path, StreamData(nan_at=9 * 4))
    assert load_checkpoint(tmp_path / "ckpt.pt", "abc")["step"] == 8


def test_non_finite_features_from_the_monitor_stop_training(tmp_path):
    settings = train_settings(
        iterations=6, batch_size=2, checkpoint_every=2, log_every=1, probe_every=3
    )

    def monitor(step, model, ema):
        return [{"layer": "group0", "magnitude": float("inf") if step == 6 else 1.0}], None

    with pytest.raises(TrainingDiverged, match="group0"):
        fit(
            TinyNet(),
            StreamData(),
            settings,
            device=torch.device("cpu"),
            checkpoint_path=tmp_path / "c.pt",
            fingerprint="x",
            monitor=monitor,
            progress=False,
        )


def test_stream_batches_split_every_step_between_ranks():
    ranks = [list(StreamBatches(3, 5, 8, r, 2)) for r in range(2)]
    assert ranks[0] == [[24, 25, 26, 27], [32, 33, 34, 35]]
    assert ranks[1] == [[28, 29, 30, 31], [36, 37, 38, 39]]
    with pytest.raises(ValueError, match="not divisible"):
        StreamBatches(0, 1, 6, 0, 4)


def test_ema_moves_towards_the_model():
    ema, model = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        ema.weight.fill_(0.0)
        model.weight.fill_(1.0)
    update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.1))


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    settings = train_settings(
        iterations=5, batch_size=4, checkpoint_every=5, log_every=1, probe_every=0
    )
    ema, _ = fit(
        TinyNet(dropout=0.0),
        StreamData(),
        settings,
        device=torch.device("cpu"),
        checkpoint_path=__import__("pathlib").Path(out) / "ckpt.pt",
        fingerprint="ddp",
        rank=rank,
        world_size=world,
        progress=False,
    )
    if rank == 0:
        torch.save(ema.state_dict(), os.path.join(out, "ema.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.integration
def test_two_process_ddp_matches_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    settings = train_settings(
        iterations=5, batch_size=4, checkpoint_every=5, log_every=1, probe_every=0
    )
    single, _ = fit(
        TinyNet(dropout=0.0),
        StreamData(),
        settings,
        device=torch.device("cpu"),
        checkpoint_path=tmp_path / "single.pt",
        fingerprint="ddp",
        progress=False,
    )
    ddp = torch.load(tmp_path / "ema.pt", weights_only=True)
    for key, value in single.state_dict().items():
        assert torch.allclose(value, ddp[key], atol=1e-6), key


def test_monitor_runs_before_the_first_update_and_validation_joins_the_history(tmp_path):
    settings = train_settings(
        iterations=6, batch_size=2, checkpoint_every=6, log_every=2, probe_every=3
    )
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in TinyNet().state_dict().items()}
    seen = []

    def monitor(step, model, ema):
        if step == 0:  # the model has not been updated yet
            assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
        seen.append(step)
        return [{"layer": "group0", "magnitude": 1.0}], 20.0 + step

    torch.manual_seed(0)
    _, result = fit(
        TinyNet(),
        StreamData(),
        settings,
        device=torch.device("cpu"),
        checkpoint_path=tmp_path / "c.pt",
        fingerprint="x",
        monitor=monitor,
        progress=False,
    )
    assert seen == [0, 3, 6]
    assert [r["step"] for r in result.monitor_rows] == [0, 3, 6]
    assert [r["step"] for r in result.history] == [2, 3, 4, 6]  # every probe step is logged
    assert [r.get("val_psnr") for r in result.history] == [None, 23.0, None, 26.0]


def test_drop_noise_of_a_sample_is_a_function_of_seed_and_index_only():
    from iln.training.loop import drop_noise

    both = drop_noise(1, [8, 9], 6)
    assert both.shape == (2, 6) and both.dtype == torch.float32
    torch.testing.assert_close(both[1:], drop_noise(1, [9], 6), rtol=0, atol=0)
    assert not torch.equal(drop_noise(2, [9], 6), drop_noise(1, [9], 6))
    assert not torch.equal(both[0], both[1])
    assert 0.0 <= float(both.min()) and float(both.max()) < 1.0


class HatPatches(torch.utils.data.Dataset):
    """x2 pairs for hat_tiny; sample k a pure function of k."""

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(k)
        return {"lq": torch.rand(3, 8, 8, generator=g), "gt": torch.rand(3, 16, 16, generator=g)}


def _fit_hat(tmp_path, name, **overrides):
    from iln.models import build_model

    torch.manual_seed(0)
    model = build_model("hat_tiny", norm="iln", scale=2, drop_path_rate=0.3)
    settings = train_settings(
        iterations=3, batch_size=4, checkpoint_every=3, log_every=1, lr=1e-3, **overrides
    )
    ema, result = fit(
        model,
        HatPatches(),
        settings,
        device=torch.device("cpu"),
        checkpoint_path=tmp_path / name / "ckpt.pt",
        fingerprint=name,
        progress=False,
    )
    return model, ema, result


@pytest.mark.parametrize(
    ("setting", "rel"),
    [
        ({"grad_checkpoint": True}, 0.0),  # the same arithmetic, recomputed
        ({"accumulate": 2}, 1e-5),
        ({"accumulate": 4}, 5e-5),  # micro-batches of one sample: other summation orders
    ],
)
def test_micro_batches_and_checkpointing_train_the_plain_run(tmp_path, setting, rel):
    plain, plain_ema, plain_result = _fit_hat(tmp_path, "plain")
    other, other_ema, other_result = _fit_hat(tmp_path, "other", **setting)
    for a, b in ((plain, other), (plain_ema, other_ema)):
        assert_same_weights(a.state_dict(), b.state_dict(), rel)
    losses = [r["loss"] for r in plain_result.history]
    assert [r["loss"] for r in other_result.history] == pytest.approx(losses, rel=1e-6)


def test_accumulation_that_does_not_split_the_batch_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="train.accumulate: 3 micro-batches"):
        _fit_hat(tmp_path, "bad", accumulate=3)


def test_every_device_spelling_resolves_per_process_on_a_cpu_machine():
    from iln.training.distributed import process_device

    for spec in ("auto", "cpu"):
        assert process_device(spec, 1, 2, key="train.device") == torch.device("cpu")
    if not torch.cuda.is_available():
        for spec in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(RuntimeError, match="train.device: .* no CUDA device"):
                process_device(spec, 0, 1, key="train.device")
