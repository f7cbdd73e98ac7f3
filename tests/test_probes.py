"""Feature statistics and the outside-attached probe hooks."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from iln.evaluation.probes import (
    BODY_INPUT,
    FINAL_NORM_INPUT,
    PROBE_COLUMNS,
    FeatureProbe,
    channel_entropy,
    entropy_ceiling,
    feature_row,
    magnitude,
    max_abs,
    measure_features,
    probe_points,
    token_std_spread,
)
from iln.models import build_model
from iln.models.restorer import WindowedRestorer

# ------------------------------------------------------------------ a model following the contract


class FakeBlock(nn.Module):
    def __init__(self, dim: int, window: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.attn = nn.Module()
        self.attn.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window - 1) ** 2, heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        return x + self.fc(x)


class FakeGroup(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.residual_group = nn.Module()
        self.residual_group.blocks = nn.ModuleList(FakeBlock(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        y = x
        for block in self.residual_group.blocks:
            y = block(y)
        return y + x


class FakeIR(nn.Module):
    """conv_first -> tokens -> groups -> final norm -> pixel-shuffle head, like HAT/SwinIR."""

    residual_groups = WindowedRestorer.residual_groups  # the restorer's own accessors
    group_blocks = WindowedRestorer.group_blocks

    def __init__(
        self,
        dim: int = 8,
        groups: int = 3,
        depth: int = 2,
        scale: int = 2,
        fail_after: int | None = None,
    ):
        super().__init__()
        self.scale = scale
        self.conv_first = nn.Conv2d(3, dim, 3, 1, 1)
        self.layers = nn.ModuleList(FakeGroup(dim, depth) for _ in range(groups))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(0.5)
        self.conv_last = nn.Conv2d(dim, 3 * scale * scale, 3, 1, 1)
        self.fail_after = fail_after
        self.seen: list[tuple[bool, bool]] = []  # (training, grad enabled) per forward

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_first(x).flatten(2).transpose(1, 2)  # (B, N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        self.seen.append((self.training, torch.is_grad_enabled()))
        b, _, h, w = x.shape
        t = self.tokens(x)
        for i, layer in enumerate(self.layers):
            t = layer(t)
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("boom")
        t = self.dropout(self.norm(t))
        img = t.transpose(1, 2).reshape(b, -1, h, w)
        return nn.functional.pixel_shuffle(self.conv_last(img), self.scale)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def lq(batch: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model() -> FakeIR:
    torch.manual_seed(0)
    return FakeIR()


# ------------------------------------------------------------------ statistics


def test_uniform_channels_reach_the_entropy_ceiling():
    signs = torch.randint(0, 2, (2, 5, 8), generator=torch.Generator().manual_seed(1)) * 2.0 - 1.0
    assert channel_entropy(signs * 3.0) == pytest.approx(math.log(8), abs=1e-12)
    assert entropy_ceiling(8) == pytest.approx(math.log(8))
    assert feature_row("g", signs)["entropy_ceiling"] == pytest.approx(math.log(8))


def test_one_hot_channel_has_zero_entropy():
    x = torch.zeros(2, 6, 5)
    x[:, :, 3] = torch.randn(2, 6) + 5.0
    assert channel_entropy(x) == 0.0


def test_entropy_known_value_and_average_over_images():
    x = torch.zeros(2, 4, 2, dtype=torch.float64)
    x[0, :, 0], x[0, :, 1] = 1.0, math.sqrt(3.0)  # energies 1 : 3
    x[1, :, 0] = 1.0  # one channel: 0 nats
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert channel_entropy(x) == pytest.approx(h0 / 2, abs=1e-12)


def test_magnitude_and_max_abs_scale_and_known_values():
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(2))
    for a in (0.5, 10.0, 1e5):
        assert magnitude(a * x) == pytest.approx(a * a * magnitude(x), rel=1e-6)
        assert max_abs(a * x) == pytest.approx(a * max_abs(x), rel=1e-6)
        assert channel_entropy(a * x) == pytest.approx(channel_entropy(x), rel=1e-6)
        assert token_std_spread(a * x) == pytest.approx(token_std_spread(x), rel=1e-5)
    two = torch.stack([torch.ones(4, 3), 3.0 * torch.ones(4, 3)])  # images with x^2 = 1 and 9
    assert magnitude(two) == pytest.approx(5.0)
    y = torch.zeros(2, 3, 4)
    y[1, 2, 0] = -7.5
    assert max_abs(y) == 7.5


def test_statistics_are_exact_for_million_scale_features():
    x = torch.full((2, 4096, 96), 3.0e6, dtype=torch.float32)
    assert magnitude(x) == 9.0e12
    assert channel_entropy(x) == pytest.approx(math.log(96), abs=1e-12)


def test_token_std_spread_known_values():
    same = torch.tensor([[[1.0, -1.0], [5.0, 3.0], [0.0, 2.0]]])  # every token has std 1
    assert token_std_spread(same) == pytest.approx(0.0, abs=1e-12)
    x = torch.tensor([[[1.0, -1.0], [3.0, -3.0]]])  # token stds 1 and 3: std 1 / mean 2
    assert token_std_spread(x) == pytest.approx(0.5)


def test_all_zero_features_have_no_entropy_and_no_spread():
    z = torch.zeros(1, 4, 3)
    row = feature_row("z", z)
    assert math.isnan(row["entropy"])
    assert row["magnitude"] == 0.0 and row["token_std_spread"] == 0.0


@pytest.mark.parametrize("shape", [(4, 5), (1, 2, 3, 4), (0, 3, 2)])
def test_bad_shapes_are_rejected(shape):
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        magnitude(torch.ones(shape))


# ------------------------------------------------------------------ hooks


def test_measure_features_rows_follow_the_contract(model):
    rows = measure_features(model, lq())
    layers = [BODY_INPUT, "group0", "group1", "group2", FINAL_NORM_INPUT]
    assert [r["layer"] for r in rows] == layers
    assert all(tuple(r) == PROBE_COLUMNS for r in rows)
    # the final norm's input is the last group's output: identical statistics
    assert {k: v for k, v in rows[3].items() if k != "layer"} == {
        k: v for k, v in rows[4].items() if k != "layer"
    }


def test_measured_values_match_a_manual_forward(model):
    batch = lq()
    with torch.no_grad():
        t = model.tokens(batch)
        expected = [feature_row("x", t)]  # body_in: the stream entering the first group
        for layer in model.layers:
            t = layer(t)
            expected.append(feature_row("x", t))
    rows = measure_features(model, batch)
    for got, want in zip(rows[:4], expected, strict=True):
        for key in PROBE_COLUMNS[1:]:
            assert got[key] == pytest.approx(want[key], rel=1e-12)


def test_per_block_rows_are_in_forward_order(model):
    rows = measure_features(model, lq(), per_block=True)
    names = [r["layer"] for r in rows]
    assert names[:4] == [BODY_INPUT, "group0.block0", "group0.block1", "group0"]
    assert names[-1] == FINAL_NORM_INPUT and len(names) == 3 * 3 + 2


def test_chunks_give_the_same_statistics(model):
    batch = lq(batch=5)
    whole = measure_features(model, batch)
    chunked = measure_features(model, batch, chunk_size=2)
    for a, b in zip(whole, chunked, strict=True):
        for key in PROBE_COLUMNS[1:]:  # float32 convolutions differ slightly by batch size
            assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_eval_mode_no_grad_and_modes_restored(model):
    model.train()
    model.dropout.eval()  # a mixed state must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    measure_features(model, lq())
    assert model.seen[-1] == (False, False)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.is_grad_enabled()
    assert hook_count(model) == 0


def test_hooks_removed_and_mode_restored_after_an_exception():
    model = FakeIR(fail_after=1)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        measure_features(model, lq(), per_block=True)
    assert hook_count(model) == 0
    assert all(m.training for m in model.modules())


def test_probe_context_manager_removes_hooks(model):
    with FeatureProbe(model, per_block=True) as probe:
        assert hook_count(model) == len(probe_points(model, per_block=True))
        with torch.no_grad():
            model(lq())
    assert hook_count(model) == 0
    assert len(probe.rows()) == 3 * 3 + 2  # and body_in, final_norm_in


def test_missing_probe_points_are_named():
    with pytest.raises(AttributeError, match="residual_groups"):
        measure_features(nn.Conv2d(3, 3, 1), lq())

    class NoNorm(FakeIR):
        def forward(self, x):
            t = self.tokens(x)
            for layer in self.layers:
                t = layer(t)
            return t

    with pytest.raises(RuntimeError, match=FINAL_NORM_INPUT):
        measure_features(NoNorm(), lq())


# ------------------------------------------------------------------ overhead


def _overhead(
    model: nn.Module, batch: torch.Tensor, probe: torch.Tensor, repeats: int = 3
) -> tuple[float, float]:
    """(best seconds per training step, best seconds per probe measurement)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    target = torch.rand(
        batch.shape[0], 3, batch.shape[2] * model.scale, batch.shape[3] * model.scale
    )
    model.train()
    step, probe_t = math.inf, math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = (model(batch) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step = min(step, time.perf_counter() - t0)
        t0 = time.perf_counter()
        measure_features(model, probe)
        probe_t = min(probe_t, time.perf_counter() - t0)
    return step, probe_t


def test_probe_overhead_is_small_at_k_100():
    torch.manual_seed(0)
    fake = FakeIR(dim=16, groups=3, depth=2)
    step, probe_t = _overhead(fake, lq(batch=4, size=16), lq(batch=2, size=16))
    # measuring every 100 steps must cost < 5% of training time
    assert probe_t / (100 * step) < 0.05


def test_probe_overhead_on_the_tiny_hat_preset():
    torch.manual_seed(0)
    hat = build_model("hat_tiny", norm="ln", scale=2)
    rows = measure_features(hat, lq(batch=1, size=16))
    assert rows[-1]["layer"] == FINAL_NORM_INPUT and len(rows) == len(hat.layers) + 2
    step, probe_t = _overhead(hat, lq(batch=2, size=16), lq(batch=2, size=16), repeats=2)
    assert probe_t / (100 * step) < 0.05


def test_compiled_wrapper_is_measured_through_the_plain_module(model):
    class Wrapper(nn.Module):  # what torch.compile returns: the original under `_orig_mod`
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

        def forward(self, x):
            raise AssertionError("the wrapper must not run")

    batch = lq()
    assert measure_features(Wrapper(model), batch) == measure_features(model, batch)
