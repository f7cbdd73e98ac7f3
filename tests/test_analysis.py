"""Final-checkpoint statistics (EMA and raw weights), final-norm bias (Fig. 8) and
relative-position-bias images (Fig. 9)."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
from torch import nn

from iln.analysis.final import (
    FINAL_NORM_COLUMNS,
    final_norm_bias,
    gather_rpb,
    group_rpb_tables,
    plot_final_norm,
    plot_rpb,
    relative_position_index,
    rpb_table_images,
    run_final_analysis,
)
from iln.config.layout import FEATURES_COLUMNS
from iln.evaluation.probes import measure_features
from iln.figures.styles import NORM_STYLES, norm_style
from iln.models import build_model
from iln.models.restorer import WindowedRestorer
from iln.weights.trained import load_trained, save_trained

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeBlock(nn.Module):
    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.attn = nn.Module()
        self.attn.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window - 1) ** 2, heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        return x + self.fc(x)


class FakeGroup(nn.Module):
    def __init__(self, dim: int, depth: int, window: int, heads: int) -> None:
        super().__init__()
        self.residual_group = nn.Module()
        self.residual_group.blocks = nn.ModuleList(
            FakeBlock(dim, window, heads) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for block in self.residual_group.blocks:
            y = block(y)
        return y + x


class FakeIR(nn.Module):
    """Follows the model contract: layers[g].residual_group.blocks[b].attn.<table>, norm."""

    residual_groups = WindowedRestorer.residual_groups  # the restorer's own accessors
    group_blocks = WindowedRestorer.group_blocks

    def __init__(
        self, dim: int = 6, groups: int = 2, depth: int = 2, window: int = 3, heads: int = 2
    ) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(3, dim, 3, 1, 1)
        self.layers = nn.ModuleList(FakeGroup(dim, depth, window, heads) for _ in range(groups))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.norm.bias)
        self.conv_last = nn.Conv2d(dim, 3, 3, 1, 1)

    def body(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, N, C) before the norm
        t = self.conv_first(x).flatten(2).transpose(1, 2)
        for layer in self.layers:
            t = layer(t)
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        t = self.norm(self.body(x))
        return self.conv_last(t.transpose(1, 2).reshape(b, -1, h, w))


def lq(batch: int = 2, size: int = 6) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------ Fig. 8


def test_final_norm_bias_matches_the_norm_and_its_input():
    torch.manual_seed(0)
    model = FakeIR().train()
    batch = lq()
    rows = final_norm_bias(model, batch)
    with torch.no_grad():
        expected = model.body(batch).abs().double().mean(dim=(0, 1))  # (C,)
    assert [r["channel"] for r in rows] == list(range(6))
    for r in rows:
        assert tuple(r) == FINAL_NORM_COLUMNS
        assert r["bias"] == pytest.approx(float(model.norm.bias.detach()[r["channel"]]))
        assert r["input_mean_abs"] == pytest.approx(float(expected[r["channel"]]), rel=1e-6)
    assert model.training and hook_count(model) == 0


def test_final_norm_without_bias_gives_nan():
    model = FakeIR()
    model.norm = nn.Identity()
    rows = final_norm_bias(model, lq())
    assert all(math.isnan(r["bias"]) and r["input_mean_abs"] > 0 for r in rows)


# ------------------------------------------------------------------ Fig. 9


def _coded_table(window: int, heads: int) -> torch.Tensor:
    """Table whose entry for (dy, dx, head) is 100*head + 10*dy + dx."""
    side = 2 * window - 1
    table = torch.empty(side * side, heads)
    for dy in range(-(window - 1), window):
        for dx in range(-(window - 1), window):
            for h in range(heads):
                table[(dy + window - 1) * side + (dx + window - 1), h] = 100 * h + 10 * dy + dx
    return table


def test_table_images_are_indexed_by_relative_offset():
    w, heads = 4, 3
    images = rpb_table_images(_coded_table(w, heads))
    assert images.shape == (heads, 2 * w - 1, 2 * w - 1)
    assert images[2, 0 + w - 1, 0 + w - 1] == 200  # zero offset
    assert images[1, -3 + w - 1, 2 + w - 1] == 100 - 30 + 2


def test_gathered_bias_is_the_table_at_query_minus_key():
    w, heads = 3, 2
    bias = gather_rpb(_coded_table(w, heads))
    assert bias.shape == (heads, w * w, w * w)
    for i in range(w * w):
        for j in range(w * w):
            dy, dx = i // w - j // w, i % w - j % w
            for h in range(heads):
                assert bias[h, i, j] == 100 * h + 10 * dy + dx
    assert relative_position_index(w).max() == (2 * w - 1) ** 2 - 1


@pytest.mark.parametrize("shape", [(10, 2), (25,), (16, 2)])
def test_bad_table_shapes_are_rejected(shape):
    with pytest.raises(ValueError, match="2w-1"):
        rpb_table_images(torch.zeros(shape))


def test_group_tables_and_plot(tmp_path):
    model = FakeIR(groups=3, depth=2, window=3, heads=2)
    first, last = group_rpb_tables(model, 0), group_rpb_tables(model, -1)
    assert len(first) == 2 and torch.equal(
        last[1], model.layers[2].residual_group.blocks[1].attn.relative_position_bias_table.detach()
    )
    out = plot_rpb(first, tmp_path / "rpb.png", gathered=True)
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(AttributeError, match="relative_position_bias_table"):
        model.layers[0].residual_group.blocks[0].attn = nn.Module()
        group_rpb_tables(model, 0)


# ------------------------------------------------------------------ everything for one checkpoint


def _check_outputs(out_dir, n_layers: int, weights: tuple[str, ...] = ("ema",)) -> None:
    with (out_dir / "features.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == FEATURES_COLUMNS and len(rows) == n_layers * len(weights)
    assert [r["weights"] for r in rows] == [w for w in weights for _ in range(n_layers)]
    with (out_dir / "final_norm.csv").open() as fh:
        assert tuple(next(csv.DictReader(fh))) == FINAL_NORM_COLUMNS
    for name in ("final_norm.png", "rpb_first.png", "rpb_last.png"):
        assert (out_dir / name).read_bytes().startswith(PNG_MAGIC)
        assert (out_dir / name).with_suffix(".svg").read_text().lstrip().startswith("<?xml")
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]


def test_run_final_analysis_writes_every_file(tmp_path):
    model = FakeIR(groups=2)
    result = run_final_analysis(model, lq(), tmp_path / "analysis", label="fake")
    _check_outputs(tmp_path / "analysis", n_layers=4)  # body_in, 2 groups, final norm input
    assert len(result["files"]) == 6 and len(result["final_norm"]) == 6


@pytest.mark.parametrize("norm", ["ln", "iln"])
def test_final_norm_figure_is_drawn_in_the_norms_colour(tmp_path, norm):
    rows = [{"channel": c, "bias": 0.1 * c - 0.2, "input_mean_abs": 1.0 + c} for c in range(6)]
    path = plot_final_norm(rows, tmp_path / "final_norm.png", color=norm_style(norm).color)
    svg = path.with_suffix(".svg").read_text()
    others = {s.color for n, s in NORM_STYLES.items() if n != norm}
    assert norm_style(norm).color in svg
    assert not [c for c in others if c in svg], "another norm's colour in the figure"


def test_ema_and_raw_weights_are_measured_and_labelled(tmp_path):
    torch.manual_seed(0)
    ema = FakeIR(groups=2)
    raw = copy.deepcopy(ema)
    with torch.no_grad():
        for p in raw.parameters():
            p.mul_(3.0)  # a trained model far from its EMA twin
    out = tmp_path / "analysis"
    result = run_final_analysis(ema, lq(), out, raw=raw)
    _check_outputs(out, n_layers=4, weights=("ema", "raw"))
    with (out / "features.csv").open() as fh:
        rows = {(r["weights"], r["layer"]): float(r["magnitude"]) for r in csv.DictReader(fh)}
    for name, model in (("ema", ema), ("raw", raw)):
        for row in measure_features(model, lq()):
            assert rows[(name, row["layer"])] == pytest.approx(row["magnitude"], rel=1e-12)
    assert rows[("raw", "group1")] > 10 * rows[("ema", "group1")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result["summary"]
    expected = {
        f"final/{w}/{layer}/{stat}"
        for w in ("ema", "raw")
        for layer in ("body_in", "group0", "group1", "final_norm_in")
        for stat in ("magnitude", "entropy", "max_abs")
    }
    assert set(summary) == expected
    assert summary["final/raw/group1/magnitude"] == rows[("raw", "group1")]


def test_model_file_keeps_both_weight_sets(tmp_path):
    from iln.models import build_model

    torch.manual_seed(0)
    raw = build_model("hat_tiny", norm="ln", scale=2)
    ema = copy.deepcopy(raw)
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(0.5)
    path = tmp_path / "model.pt"
    save_trained(path, ema, arch="hat_tiny", norm="ln", scale=2, overrides={}, raw=raw)
    loaded = {w: load_trained(path, torch.device("cpu"), weights=w)[0] for w in ("ema", "raw")}
    for name, model in (("ema", ema), ("raw", raw)):
        for key, value in model.state_dict().items():
            assert torch.equal(loaded[name].state_dict()[key], value), (name, key)
    blob = torch.load(path, weights_only=True)
    assert blob["state_dict"].keys() == blob["raw_state_dict"].keys()  # EMA under state_dict
    save_trained(path, ema, arch="hat_tiny", norm="ln", scale=2, overrides={})
    with pytest.raises(ValueError, match="no raw weights"):
        load_trained(path, torch.device("cpu"), weights="raw")


@pytest.mark.parametrize(("arch", "norm"), [("hat_tiny", "ln"), ("swinir_tiny", "iln")])
def test_run_final_analysis_on_real_models(tmp_path, arch, norm):
    torch.manual_seed(0)
    model = build_model(arch, norm=norm, scale=2)
    run_final_analysis(model, lq(batch=1, size=8), tmp_path)
    _check_outputs(tmp_path, n_layers=len(model.layers) + 2)
