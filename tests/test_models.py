"""HAT / SwinIR: shapes, every norm variant, parameter counts,
homogeneity of i-LN blocks, index/mask constants, build errors."""

from __future__ import annotations

import pytest
import torch

from iln.models import ARCHS, NORMS, build_model, common, norms

TINY = ("hat_tiny", "swinir_tiny")


def _image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("norm", NORMS)
def test_every_tiny_arch_and_norm_runs_forward_and_backward_at_every_scale(arch, norm):
    for scale in (1, 2, 3, 4):
        model = build_model(arch, norm=norm, scale=scale)
        x = _image(2, 13, 17)
        y = model(x)
        assert y.shape == (2, 3, 13 * scale, 17 * scale)
        y.square().mean().backward()
        assert torch.isfinite(y).all()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), (
            "a parameter got no or a bad gradient"
        )


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("norm", ("ln", "iln", "ln_star", "ln_rs"))
def test_scale_one_restorer_keeps_an_odd_input_shape_and_trains(arch, norm):
    model = build_model(arch, norm=norm, scale=1)
    x = _image(2, 13, 21, seed=3)
    y = model(x)
    assert y.shape == x.shape
    (y - x).abs().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("stdnorm", (False, True))
def test_scale_one_output_is_the_input_plus_a_residual_in_image_space(arch, stdnorm):
    # a head that predicts the constant residual c in the encoded space restores
    # input + c * std / img_range: the identity when c = 0, for any body and stdnorm
    model = build_model(arch, norm="iln", scale=1, stdnorm=stdnorm, img_range=2.0).eval()
    x = _image(1, 13, 21, seed=4)
    with torch.no_grad():
        model.conv_last.weight.zero_()
        model.conv_last.bias.zero_()
        torch.testing.assert_close(model(x), x, rtol=0, atol=1e-6)
        model.conv_last.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        std = torch.tensor(common.RGB_STD) if stdnorm else torch.ones(3)
        shift = (torch.tensor([0.1, -0.2, 0.3]) * std / 2.0).view(1, 3, 1, 1)
        torch.testing.assert_close(model(x), x + shift, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("arch", "expected"), [("hat_1", 4_273_887), ("swinir_1", 3_327_771)])
def test_scale_one_parameter_counts(arch, expected):
    for norm in ("ln", "iln"):
        model = build_model(arch, norm=norm, scale=1)
        assert sum(p.numel() for p in model.parameters()) == expected
        assert not hasattr(model, "upsample")


@pytest.mark.parametrize("arch", TINY)
def test_full_presets_forward_any_size_including_one_pixel(arch):
    model = build_model(arch, norm="iln", scale=2).eval()
    with torch.no_grad():
        for h, w in ((1, 1), (1, 9), (5, 30), (8, 8)):
            assert model(_image(1, h, w)).shape == (1, 3, 2 * h, 2 * w)


@pytest.mark.parametrize(
    ("arch", "scale", "expected"),
    [
        ("hat_1", 2, 4_476_095),
        ("hat_1", 4, 4_623_807),
        ("hat", 2, 20_624_795),
        ("hat", 4, 20_772_507),
    ],
)
def test_parameter_counts_equal_the_released_models_for_ln_and_iln(arch, scale, expected):
    for norm in ("ln", "iln"):
        model = build_model(arch, norm=norm, scale=scale)
        assert sum(p.numel() for p in model.parameters()) == expected


def test_norm_twins_have_the_same_parameter_count_unless_the_variant_adds_some():
    counts = {
        n: sum(p.numel() for p in build_model("hat_tiny", norm=n, scale=2).parameters())
        for n in NORMS
    }
    base = counts["ln"]
    for name in (
        "iln",
        "iln_clamp",
        "ln_star",
        "ln_rs",
        "rmsnorm",
        "batchnorm",
        "batchnorm_train",
        "instancenorm",
    ):
        assert counts[name] == base, name
    model = build_model("hat_tiny", norm="ln", scale=2)
    n_block_norms = (
        sum(isinstance(m, norms.LayerNorm) for m in model.modules()) - 2
    )  # minus the two outer norms
    dim = model.embed_dim
    assert counts["layerscale"] == base + n_block_norms * dim
    assert counts["dyt"] == base + n_block_norms + 2  # one alpha per norm
    assert counts["none"] == base - (n_block_norms + 2) * 2 * dim
    assert counts["rezero"] == counts["none"] + n_block_norms


def test_defaults_pair_iln_with_stdnorm_and_affine_outer_and_overrides_split_them():
    iln = build_model("hat_tiny", norm="iln", scale=2)
    assert iln.settings.stdnorm and iln.settings.affine_outer
    assert isinstance(iln.norm, norms.Affine) and isinstance(iln.patch_embed.norm, norms.Affine)
    assert isinstance(iln.layers[0].residual_group.blocks[0].norm1, norms.ImageLayerNorm)
    ln = build_model("hat_tiny", norm="ln", scale=2)
    assert not ln.settings.stdnorm and not ln.settings.affine_outer
    assert type(ln.norm) is norms.LayerNorm
    mixed = build_model("hat_tiny", norm="ln", scale=2, stdnorm=True, affine_outer=True)
    assert mixed.input_norm.stdnorm and isinstance(mixed.norm, norms.Affine)
    plain = build_model("hat_tiny", norm="iln", scale=2, stdnorm=False, affine_outer=False)
    assert not plain.input_norm.stdnorm and isinstance(plain.norm, norms.ImageLayerNorm)


def test_stdnorm_standardises_with_the_div2k_statistics_and_maps_back():
    mean = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)
    std = torch.tensor([0.2842, 0.2701, 0.2920]).view(1, 3, 1, 1)
    x = _image(1, 4, 5)
    on, off = (
        common.InputNorm(stdnorm=True, img_range=1.0),
        common.InputNorm(stdnorm=False, img_range=1.0),
    )
    torch.testing.assert_close(on.encode(x), (x - mean) / std)
    torch.testing.assert_close(off.encode(x), x - mean)
    torch.testing.assert_close(on.decode(on.encode(x)), x)
    torch.testing.assert_close(off.decode(off.encode(x)), x)
    assert (
        "mean" not in build_model("hat_tiny", norm="iln", scale=2).state_dict()
    )  # constants, not weights


def test_grey_stdnorm_divides_by_the_official_grey_std_and_mean_stays_zero():
    # the authors' HAT (hat_arch.py, in_chans != 3): mean 0; std 0.2842 with stdnorm, else 1
    x = _image(1, 4, 5)[:, :1]
    on = common.InputNorm(stdnorm=True, img_range=1.0, in_chans=1)
    off = common.InputNorm(stdnorm=False, img_range=255.0, in_chans=1)
    torch.testing.assert_close(on.encode(x), x / 0.2842)
    torch.testing.assert_close(off.encode(x), x * 255.0)
    torch.testing.assert_close(on.decode(on.encode(x)), x)
    grey = build_model("hat_tiny", norm="iln", scale=2, in_chans=1)
    assert grey.input_norm.stdnorm
    torch.testing.assert_close(grey.input_norm.encode(x), x / 0.2842)


def test_contract_attributes_and_hooks():
    model = build_model("hat_tiny", norm="ln", scale=3)
    assert (model.scale, model.window_size, model.embed_dim) == (3, 8, model.settings.embed_dim)
    seen = []
    model.layers[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.layers[0].residual_group.blocks[1].register_forward_hook(
        lambda m, i, o: seen.append(o.shape)
    )
    model(_image(2, 9, 10))
    c = model.embed_dim
    assert seen == [(2, 16 * 16, c), (2, 16 * 16, c)]
    table = model.layers[0].residual_group.blocks[0].attn.relative_position_bias_table
    assert table.shape == (15 * 15, model.settings.num_heads[0])
    assert model.norm.bias.shape == (c,)
    swin = build_model("swinir_tiny", norm="iln", scale=2)
    assert swin.layers[0].residual_group.blocks[0].attn.relative_position_bias_table.shape == (
        225,
        swin.settings.num_heads[0],
    )
    assert swin.norm.bias.shape == (swin.embed_dim,)


def test_results_do_not_depend_on_previous_calls():
    model = build_model("hat_tiny", norm="iln", scale=2).eval()
    a, b = _image(1, 16, 24), _image(1, 9, 9, seed=1)
    with torch.no_grad():
        first = model(a)
        model(b)
        again = model(a)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def _block_and_context(arch: str, norm: str, which: str):
    model = build_model(arch, norm=norm, scale=2, eps=0.0, drop_path_rate=0.0).double()
    group = model.layers[0].residual_group
    block = group.overlap_attn if which == "ocab" else group.blocks[1]  # blocks[1] is shifted
    index = (
        model.relative_position_index_OCA
        if which == "ocab"
        else getattr(model, "relative_position_index_SA", None)
    )
    if index is None:
        index = model.relative_position_index
    size = (16, 16)
    ctx = common.window_context(
        size,
        model.window_size,
        device=torch.device("cpu"),
        dtype=torch.float64,
        drop_noise=None,
        checkpoint=False,
        fast=True,
    )
    return block, ctx, index, model.embed_dim


@pytest.mark.parametrize(
    ("arch", "which"), [("hat_tiny", "hab"), ("hat_tiny", "ocab"), ("swinir_tiny", "swin")]
)
def test_iln_blocks_are_positively_homogeneous_and_ln_blocks_are_not(arch, which):
    for norm, homogeneous in (("iln", True), ("ln", False)):
        block, ctx, index, c = _block_and_context(arch, norm, which)
        x = torch.randn(2, 256, c, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        a = 7.5
        lhs, rhs = block(a * x, ctx, index), a * block(x, ctx, index)
        assert torch.allclose(lhs, rhs, rtol=1e-9, atol=1e-9) == homogeneous, norm


def test_relative_position_index_known_values():
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(common.relative_position_index(2), expected)
    oca = common.relative_position_index_overlap(16, 24)  # the released HAT buffer
    assert oca.shape == (256, 576)
    assert (oca[0, 0].item(), oca.min().item(), oca.max().item()) == (-280, -880, 640)
    assert oca.unique().numel() == 39 * 39  # negative entries wrap onto distinct rows
    table = torch.arange(39 * 39, dtype=torch.float64).unsqueeze(1)  # (rows, 1 head)
    torch.testing.assert_close(common.gather_bias(table, oca)[0], table[oca, 0])


def test_shift_mask_separates_regions_with_minus_100():
    mask = common.shift_window_mask(8, 8, 4, 2, device=torch.device("cpu"), dtype=torch.float32)
    assert mask.shape == (4, 16, 16)
    assert mask[0].eq(0).all()  # top-left window holds a single region
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    # bottom-right window: 4 regions of 4 tokens each -> each token sees 4 of 16 as its own
    assert (mask[3] == 0).sum(dim=1).tolist() == [4] * 16


def test_pad_to_multiple_reflects_and_handles_tiny_sides():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    y = common.pad_to_multiple(x, 4)
    assert y.shape == (1, 1, 4, 4)
    torch.testing.assert_close(y[0, 0, 3], x[0, 0, 1])  # reflect: row 3 mirrors row 1
    assert common.pad_to_multiple(torch.ones(1, 1, 1, 2), 8).shape == (1, 1, 8, 8)
    assert common.pad_to_multiple(torch.ones(1, 1, 3, 3), 16).shape == (1, 1, 16, 16)


def test_generator_makes_initialisation_and_stochastic_depth_reproducible():
    a = build_model("swinir_tiny", norm="ln", scale=2, generator=torch.Generator().manual_seed(5))
    b = build_model("swinir_tiny", norm="ln", scale=2, generator=torch.Generator().manual_seed(5))
    c = build_model("swinir_tiny", norm="ln", scale=2, generator=torch.Generator().manual_seed(6))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.conv_first.weight, c.conv_first.weight)
    state = torch.get_rng_state()
    build_model("swinir_tiny", norm="ln", scale=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone


@pytest.mark.parametrize("arch", ["hat_tiny", "swinir_tiny"])
def test_stochastic_depth_of_a_sample_depends_only_on_its_own_noise_row(arch):
    """What makes W processes, micro-batches and recomputation train one run: sample j of a
    batch gives the same output alone as beside others, given its row of drop noise."""
    model = build_model(arch, norm="iln", scale=2, drop_path_rate=0.5).train()
    x = _image(3, 8, 8)
    noise = torch.rand(3, model.drop_sites, generator=torch.Generator().manual_seed(1))
    batch = model(x, drop_noise=noise)
    alone = model(x[1:2], drop_noise=noise[1:2])
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-6)
    kept, dropped = torch.zeros_like(noise[:1]), torch.full_like(noise[:1], 0.999)
    assert not torch.allclose(model(x[:1], drop_noise=kept), model(x[:1], drop_noise=dropped))
    with pytest.raises(ValueError, match="drop_noise: expected shape"):
        model(x, drop_noise=noise[:, :-1])


def test_activation_checkpointing_keeps_less_for_the_backward_pass():
    from benchmarks.grad_checkpoint import saved_bytes

    model = build_model("hat_tiny", norm="iln", scale=2).train()
    x, noise = _image(2, 16, 16), torch.rand(2, model.drop_sites)
    assert saved_bytes(model, x, noise, True) < 0.3 * saved_bytes(model, x, noise, False)


@pytest.mark.parametrize("arch", ["hat_tiny", "swinir_tiny"])
def test_activation_checkpointing_gives_the_same_output_and_gradients(arch):
    model = build_model(arch, norm="iln", scale=2).train()
    x = _image(2, 8, 8)
    noise = torch.rand(2, model.drop_sites, generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpoint in (False, True):
        model.zero_grad()
        out = model(x, drop_noise=noise, checkpoint=checkpoint)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_initialisation_follows_the_released_recipe():
    model = build_model(
        "hat_tiny", norm="layerscale", scale=2, generator=torch.Generator().manual_seed(0)
    )
    block = model.layers[0].residual_group.blocks[0]
    assert block.attn.qkv.bias.abs().max() == 0
    assert 0.015 < block.mlp.fc1.weight.std().item() < 0.025
    assert block.norm1.weight.eq(1).all() and block.norm1.bias.eq(0).all()
    assert torch.equal(block.norm1.branch_scale, torch.full_like(block.norm1.branch_scale, 1e-4))
    assert 0.015 < block.attn.relative_position_bias_table.std().item() < 0.025


def test_build_errors_name_the_bad_value_and_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown override 'embed_dimm'.*valid overrides:.*embed_dim"
    ):
        build_model("hat_tiny", norm="ln", scale=2, embed_dimm=8)
    with pytest.raises(
        ValueError, match=r"unknown override 'compress_ratio' for arch 'swinir_tiny'"
    ):
        build_model("swinir_tiny", norm="ln", scale=2, compress_ratio=3)
    with pytest.raises(ValueError, match=r"unknown arch 'hat_2'.*" + ".*".join(ARCHS)):
        build_model("hat_2", norm="ln", scale=2)
    with pytest.raises(ValueError, match=r"unknown norm 'gn'.*iln"):
        build_model("hat_tiny", norm="gn", scale=2)
    with pytest.raises(ValueError, match=r"scale 8 is not supported; valid scales: 1, 2, 3, 4"):
        build_model("hat_tiny", norm="ln", scale=8)
    with pytest.raises(ValueError, match=r"unknown attention implementation 'naive'; valid:"):
        build_model("hat_tiny", norm="ln", scale=2, attention="naive")
    with pytest.raises(ValueError, match=r"unknown override 'attn'"):
        build_model("hat_tiny", norm="ln", scale=2, attn="sdpa")
    with pytest.raises(ValueError, match=r"embed_dim 31 .*divisible"):
        build_model("hat_tiny", norm="ln", scale=2, embed_dim=31)
    with pytest.raises(ValueError, match=r"window_size 7"):
        build_model("hat_tiny", norm="ln", scale=2, window_size=7)


def test_overrides_use_official_names_and_land_in_the_settings():
    model = build_model(
        "hat_tiny",
        norm="ln",
        scale=2,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 4],
        window_size=4,
        mlp_ratio=1.5,
    )
    assert model.settings.depths == (1, 1) and model.settings.num_heads == (2, 4)
    assert len(model.layers) == 2 and model.window_size == 4 and model.embed_dim == 16
    assert model.layers[0].residual_group.blocks[0].mlp.fc1.out_features == 24


def test_drop_path_factor_is_zero_or_the_inverse_keep_rate_and_none_when_off():
    x = torch.zeros(4000, 5, 3)
    noise = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    drop = common.drop_path_factor(x, 0.25, True, noise)
    assert drop.shape == (4000, 1, 1)
    values = set(drop.flatten().tolist())
    assert values == {0.0, torch.tensor(1.0 / 0.75).item()}  # in float32
    assert abs((drop == 0).float().mean().item() - 0.25) < 0.03
    assert common.drop_path_factor(x, 0.25, False, None) is None
    assert common.drop_path_factor(x, 0.0, True, None) is None


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_trains_under_bf16_autocast(arch, norm):
    model = build_model(arch, norm=norm, scale=2).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_image(2, 16, 16), drop_noise=torch.rand(2, model.drop_sites))
    out.float().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
