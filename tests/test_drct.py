"""DRCT: every norm variant, parameter counts, the released code's outputs on its weights
(fixture made by running it, see tests/fixtures/drct/README.md), export / import of
BasicSR-format weights, the fast path, i-LN homogeneity of a dense group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from iln.analysis.final import group_rpb_tables, plot_rpb
from iln.evaluation.probes import probe_points
from iln.models import NORMS, build_model, common, drct, norms
from iln.models.checkpoint import (
    CheckpointMismatchError,
    describe_checkpoint,
    load_official_checkpoint,
    official_key_map,
    to_official_state_dict,
)

FIXTURE = Path(__file__).parent / "fixtures" / "drct" / "official_drct.pt"
FULL_COUNTS = {2: 13_991_867, 3: 14_176_507, 4: 14_139_579}


def _image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURE, weights_only=True)


def _official_state(fx, scale: int) -> dict[str, torch.Tensor]:
    """The released model's state dict at ``scale`` (2 or 4), float32 parameters."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in fx["state_dict"].items()}
    if scale == 2:  # the x2 model is the x4 one without its second upsampling stage
        state = {k: v for k, v in state.items() if not k.startswith("upsample.2.")}
    return state


def _fixture_overrides(fx) -> dict:
    cfg = fx["config"]
    return dict(
        embed_dim=cfg["embed_dim"],
        depths=list(cfg["depths"]),
        num_heads=list(cfg["num_heads"]),
        window_size=cfg["window_size"],
        gc=cfg["gc"],
        mlp_ratio=cfg["mlp_ratio"],
    )


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_runs_forward_and_backward_on_odd_sizes_at_every_scale(norm):
    for scale in (1, 2, 3, 4):
        model = build_model("drct_tiny", norm=norm, scale=scale)
        x = _image(1, 13, 17, seed=scale)
        y = model(x)
        assert y.shape == (1, 3, 13 * scale, 17 * scale)
        y.square().mean().backward()
        assert torch.isfinite(y).all()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_parameter_counts_equal_across_norms_unless_the_variant_adds_some():
    counts = {n: _count(build_model("drct_tiny", norm=n, scale=2)) for n in NORMS}
    base = counts["ln"]
    for name in ("iln", "ln_star", "ln_rs", "rmsnorm", "batchnorm", "batchnorm_train"):
        assert counts[name] == base, name
    assert counts["instancenorm"] == base
    model = build_model("drct_tiny", norm="ln", scale=2)
    block_norms = [
        m
        for layer in model.layers
        for block in layer.residual_group.blocks
        for m in (block.norm1, block.norm2)
    ]
    widths = sum(m.weight.numel() for m in block_norms)  # norms of the dense blocks widen
    outer = 2 * model.embed_dim
    assert counts["layerscale"] == base + widths
    assert counts["dyt"] == base + len(block_norms) + 2
    assert counts["none"] == base - 2 * (widths + outer)
    assert counts["rezero"] == counts["none"] + len(block_norms)


@pytest.mark.parametrize("scale", (2, 3, 4))
def test_full_preset_builds_on_meta_with_the_released_parameter_counts(scale, official):
    assert official["full_counts"][scale] == FULL_COUNTS[scale]  # measured on the released code
    for norm in ("ln", "iln"):
        with torch.device("meta"):
            model = build_model("drct", norm=norm, scale=scale)
        assert _count(model) == FULL_COUNTS[scale], norm


def test_full_preset_follows_the_released_block_rules():
    with torch.device("meta"):
        model = build_model("drct", norm="ln", scale=2)
    assert len(model.layers) == 6
    group = model.layers[2].residual_group
    assert [b.norm1.weight.numel() for b in group.blocks] == [180, 212, 244, 276, 308]
    assert [b.attn.num_heads for b in group.blocks] == [6, 4, 2, 6, 4]
    assert [b.mlp.fc1.out_features for b in group.blocks] == [360, 424, 488, 276, 308]
    assert [b.shift for b in group.blocks] == [0, 8, 0, 8, 0]
    assert [a.out_channels for a in group.adjust] == [32, 32, 32, 32, 180]
    rates = torch.linspace(0, 0.1, 36).tolist()  # every block of group g: rate of block 6g
    for g, layer in enumerate(model.layers):
        assert {b.drop_path for b in layer.residual_group.blocks} == {rates[6 * g]}
    assert drct.block_heads(212, 6) == 4 and drct.block_heads(244, 6) == 2


def test_scale_one_head_restores_at_input_size_with_the_same_parameters_for_ln_and_iln():
    counts = set()
    for norm in ("ln", "iln"):
        model = build_model("drct_tiny", norm=norm, scale=1)
        assert not hasattr(model, "upsample")
        x = _image(1, 11, 19)
        assert model(x).shape == x.shape
        counts.add(_count(model))
    assert len(counts) == 1


def test_bad_growth_or_heads_name_the_keys():
    with pytest.raises(ValueError, match=r"gc 0 must be a positive int"):
        build_model("drct_tiny", norm="ln", scale=2, gc=0)
    with pytest.raises(ValueError, match=r"width 38 gets 4 heads"):
        build_model("drct_tiny", norm="ln", scale=2, embed_dim=30, gc=8, num_heads=6)
    with pytest.raises(ValueError, match=r"unknown override 'gc' for arch 'hat_tiny'"):
        build_model("hat_tiny", norm="ln", scale=2, gc=8)


def test_per_block_probe_points_cover_every_dense_block():
    model = build_model("drct_tiny", norm="iln", scale=2)
    names = [p.name for p in probe_points(model, per_block=True)]
    assert names[:7] == ["body_in"] + [f"group0.block{b}" for b in range(5)] + ["group0"]
    assert len(names) == len(model.layers) * 6 + 2


def test_bias_tables_of_blocks_with_different_head_counts_plot_in_one_figure(tmp_path):
    model = build_model("drct_tiny", norm="ln", scale=2, embed_dim=36, gc=8, num_heads=6)
    tables = group_rpb_tables(model, -1)
    assert [t.shape[1] for t in tables] == [6, 4, 2, 6, 4]
    out = plot_rpb(tables, tmp_path / "rpb.png")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_iln_dense_group_is_positively_homogeneous_without_conv_biases_and_ln_is_not():
    # each block's branches are rescaled by the std of its own concatenated input and
    # the 1x1 convolutions and LeakyReLU are homogeneous, so the whole group is
    for norm, homogeneous in (("iln", True), ("ln", False)):
        model = build_model("drct_tiny", norm=norm, scale=2, eps=0.0, drop_path_rate=0.0)
        layer = model.layers[0].double().eval()
        with torch.no_grad():
            for conv in layer.residual_group.adjust:
                conv.bias.zero_()
        ctx = common.window_context(
            (16, 16),
            8,
            device=torch.device("cpu"),
            dtype=torch.float64,
            drop_noise=None,
            checkpoint=False,
            fast=True,
        )
        index = model.relative_position_index
        x = torch.randn(2, 256, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        with torch.no_grad():
            lhs, rhs = layer(6.5 * x, ctx, index), 6.5 * layer(x, ctx, index)
        assert torch.allclose(lhs, rhs, rtol=1e-9, atol=1e-9) == homogeneous, norm


@pytest.mark.parametrize("norm", ("ln", "iln", "ln_rs"))
def test_fast_path_equals_the_reference_in_outputs_and_gradients(norm):
    quick = build_model("drct_tiny", norm=norm, scale=2, drop_path_rate=0.0, fast=True)
    ref = build_model("drct_tiny", norm=norm, scale=2, drop_path_rate=0.0, fast=False)
    ref.load_state_dict(quick.state_dict())
    x = _image(2, 19, 21, seed=6)
    y_fast, y_ref = quick(x), ref(x)
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=1e-5)
    g_fast = torch.autograd.grad(y_fast.square().mean(), list(quick.parameters()))
    g_ref = torch.autograd.grad(y_ref.square().mean(), list(ref.parameters()))
    for (name, _), a, b in zip(quick.named_parameters(), g_fast, g_ref, strict=True):
        tol = 1e-5 * (1 + b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=tol, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(quick(x[:1]), ref(x[:1]), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- released code


@pytest.mark.parametrize("scale", (2, 4))
@pytest.mark.parametrize("fast", (True, False))
def test_ln_drct_on_the_released_weights_gives_the_released_outputs(official, scale, fast):
    model = build_model("drct", norm="ln", scale=scale, fast=fast, **_fixture_overrides(official))
    load_official_checkpoint(model.eval(), {"params": _official_state(official, scale)}, "params")
    with torch.no_grad():
        for x, expected in zip(official["inputs"], official[f"outputs_x{scale}"], strict=True):
            torch.testing.assert_close(model(x), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("scale", (2, 4))
def test_export_holds_exactly_the_released_keys_shapes_and_buffers(official, scale):
    model = build_model("drct", norm="ln", scale=scale, **_fixture_overrides(official))
    theirs = _official_state(official, scale)
    load_official_checkpoint(model, theirs)
    exported = to_official_state_dict(model, img_size=official["config"]["img_size"])
    assert sorted(exported) == sorted(theirs)  # strict loading: no key missing or extra
    for key, value in theirs.items():
        assert exported[key].dtype == value.dtype, key
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)


def test_full_preset_export_matches_the_released_state_dict_layout(official):
    with torch.device("meta"):
        model = build_model("drct", norm="ln", scale=2)
    exported = {k: tuple(v.shape) for k, v in to_official_state_dict(model).items()}
    assert exported == official["full_x2_shapes"]
    keys = official_key_map(model)
    ours = "layers.5.residual_group.blocks.4.attn.qkv.weight"
    assert keys[ours] == "layers.5.swin5.attn.qkv.weight"
    assert keys["layers.0.residual_group.adjust.1.bias"] == "layers.0.adjust2.bias"


@pytest.mark.parametrize("norm", ("ln", "iln"))
def test_export_then_import_round_trips_every_tensor(norm):
    g = torch.Generator().manual_seed(3)
    source = build_model("drct_tiny", norm=norm, scale=2, generator=g).eval()
    exported = to_official_state_dict(source, img_size=16)
    if norm == "iln":  # the i-LN naming of the released HAT-iLN code
        assert "layers.0.swin1.norm1.gamma" in exported and "norm.beta" in exported
    target = load_official_checkpoint(build_model("drct_tiny", norm=norm, scale=2).eval(), exported)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)
    x = _image(1, 10, 14)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_export_refuses_an_img_size_the_released_blocks_would_reshape():
    model = build_model("drct_tiny", norm="ln", scale=2)
    with pytest.raises(ValueError, match=r"img_size 8 must be an int larger than window_size 8"):
        to_official_state_dict(model, img_size=8)


def test_loading_another_arch_lists_what_does_not_fit_and_names_drct(official):
    model = build_model("drct_tiny", norm="ln", scale=4)
    state = _official_state(official, 4)
    assert describe_checkpoint(state) == (
        "DRCT, LN-style norms (parameters named weight/bias), scale x4, embed_dim 24, "
        "in_chans 3, 2 dense groups, window_size 4, 6 heads"
    )
    with pytest.raises(CheckpointMismatchError, match=r"looks like: DRCT") as err:
        load_official_checkpoint(model, state)  # the fixture's widths differ from drct_tiny's
    assert "shape mismatch" in str(err.value)
    hat = to_official_state_dict(build_model("hat_tiny", norm="ln", scale=4))
    with pytest.raises(CheckpointMismatchError, match=r"looks like: HAT"):
        load_official_checkpoint(model, hat)


def test_iln_outer_norms_are_affine_and_block_norms_image_layer_norms():
    model = build_model("drct_tiny", norm="iln", scale=2)
    assert isinstance(model.patch_embed.norm, norms.Affine) and isinstance(model.norm, norms.Affine)
    inner = [m for n, m in model.named_modules() if n.endswith((".norm1", ".norm2"))]
    assert len(inner) == 2 * 5 * len(model.layers)
    assert all(isinstance(m, norms.ImageLayerNorm) and m.rescale for m in inner)
