"""Released-format checkpoints: key names, round trips, and errors that say what is wrong."""

from __future__ import annotations

import pytest
import torch

from iln.models import build_model, load_official_checkpoint, to_official_state_dict
from iln.models.checkpoint import CheckpointMismatchError, describe_checkpoint


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 11, 14, generator=torch.Generator().manual_seed(seed))


def _model(arch: str = "hat_tiny", norm: str = "ln", scale: int = 2, seed: int = 0, **kw):
    return build_model(
        arch, norm=norm, scale=scale, generator=torch.Generator().manual_seed(seed), **kw
    ).eval()


def test_released_key_names():
    ln = to_official_state_dict(_model(norm="ln"))
    for key in (
        "conv_first.weight",
        "patch_embed.norm.weight",
        "layers.0.residual_group.blocks.0.norm1.weight",
        "layers.0.residual_group.blocks.0.attn.qkv.weight",
        "layers.0.residual_group.blocks.0.attn.relative_position_bias_table",
        "layers.0.residual_group.blocks.0.conv_block.cab.0.weight",
        "layers.0.residual_group.blocks.0.conv_block.cab.2.weight",
        "layers.0.residual_group.blocks.0.conv_block.cab.3.attention.1.weight",
        "layers.0.residual_group.blocks.0.conv_block.cab.3.attention.3.weight",
        "layers.0.residual_group.blocks.0.mlp.fc2.bias",
        "layers.0.residual_group.overlap_attn.norm1.bias",
        "layers.0.residual_group.overlap_attn.qkv.weight",
        "layers.0.residual_group.overlap_attn.relative_position_bias_table",
        "layers.0.residual_group.overlap_attn.proj.weight",
        "layers.0.residual_group.overlap_attn.mlp.fc1.weight",
        "layers.0.conv.weight",
        "norm.weight",
        "conv_after_body.weight",
        "conv_before_upsample.0.weight",
        "upsample.0.weight",
        "conv_last.weight",
        "relative_position_index_SA",
        "relative_position_index_OCA",
    ):
        assert key in ln, key
    iln = to_official_state_dict(_model(norm="iln"))
    for key in (
        "patch_embed.norm.gamma",
        "norm.beta",
        "layers.1.residual_group.blocks.1.norm2.gamma",
        "layers.0.residual_group.overlap_attn.norm1.beta",
    ):
        assert key in iln, key
    assert not any(k.endswith((".norm1.weight", ".norm2.bias")) for k in iln)
    assert (
        iln["relative_position_index_OCA"] < 0
    ).any()  # the released buffer, negative entries included


@pytest.mark.parametrize(
    ("arch", "norm", "scale"),
    [
        ("hat_tiny", "ln", 2),
        ("hat_tiny", "iln", 4),
        ("swinir_tiny", "iln", 3),
        ("swinir_tiny", "ln", 2),
    ],
)
def test_round_trip_through_a_basicsr_file_gives_the_same_outputs(tmp_path, arch, norm, scale):
    source = _model(arch, norm, scale, seed=1)
    path = tmp_path / "net_g.pth"
    torch.save(
        {
            "params": to_official_state_dict(_model(arch, norm, scale, seed=9)),
            "params_ema": to_official_state_dict(source),
        },
        path,
    )
    target = _model(arch, norm, scale, seed=2)
    assert not torch.equal(target.conv_first.weight, source.conv_first.weight)
    assert load_official_checkpoint(target, path) is target
    with torch.no_grad():
        torch.testing.assert_close(target(_image()), source(_image()), rtol=0, atol=0)
    load_official_checkpoint(target, path, key="params")
    assert torch.equal(
        target.conv_first.weight, _model(arch, norm, scale, seed=9).conv_first.weight
    )


def test_bare_state_dict_and_older_files_without_index_buffers_load():
    source = _model(norm="iln", seed=1)
    state = to_official_state_dict(source)
    del state["relative_position_index_SA"], state["relative_position_index_OCA"]
    target = _model(norm="iln", seed=2)
    load_official_checkpoint(target, {"module." + k: v for k, v in state.items()})
    with torch.no_grad():
        torch.testing.assert_close(target(_image()), source(_image()), rtol=0, atol=0)


def test_swinir_per_block_constants_of_the_released_code_are_accepted():
    source = _model("swinir_tiny", "ln", seed=1)
    state = to_official_state_dict(source)
    assert "layers.0.residual_group.blocks.0.attn.relative_position_index" in state
    state["layers.0.residual_group.blocks.1.attn_mask"] = torch.zeros(64, 64, 64)
    target = _model("swinir_tiny", "ln", seed=2)
    load_official_checkpoint(target, state)
    assert torch.equal(target.conv_last.weight, source.conv_last.weight)


def test_ln_checkpoint_into_iln_model_names_the_norm_mismatch():
    state = to_official_state_dict(_model(norm="ln"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_checkpoint(_model(norm="iln"), state)
    text = str(err.value)
    assert "missing" in text and "blocks.0.norm1.gamma" in text
    assert "unexpected" in text and "blocks.0.norm1.weight" in text
    assert "LN-style norms" in text and "norm=iln" in text


def test_iln_checkpoint_into_ln_model_says_it_is_an_iln_checkpoint():
    state = {"params_ema": to_official_state_dict(_model(norm="iln"))}
    with pytest.raises(
        CheckpointMismatchError, match=r"i-LN norms \(parameters named gamma/beta\)"
    ):
        load_official_checkpoint(_model(norm="ln"), state)


def test_x2_checkpoint_into_x4_model_names_the_upsampler_and_the_scale():
    state = to_official_state_dict(_model(norm="ln", scale=2))
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_checkpoint(_model(norm="ln", scale=4), state)
    text = str(err.value)
    assert "missing (2): upsample.2.weight, upsample.2.bias" in text
    assert "scale x2" in text and "scale=4" in text


def test_shape_mismatch_and_extra_tensors_are_listed():
    state = to_official_state_dict(_model(norm="ln", embed_dim=16, num_heads=2))
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_checkpoint(_model(norm="ln"), state)
    text = str(err.value)
    assert (
        "shape mismatch" in text
        and "conv_first.weight (16, 3, 3, 3) vs model (32, 3, 3, 3)" in text
    )
    assert "unexpected (1): extra.weight" in text
    assert "embed_dim 16" in text


def test_unreadable_sources_raise_with_the_file_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_official_checkpoint(_model(), tmp_path / "nothere.pth")
    with pytest.raises(ValueError, match="non-tensor entries"):
        load_official_checkpoint(_model(), {"params_ema": {"conv_first.weight": "x"}})
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth could not be read"):
        load_official_checkpoint(_model(), bad)


def test_describe_checkpoint_reads_the_architecture():
    text = describe_checkpoint(to_official_state_dict(_model(norm="iln", scale=3)))
    assert text.startswith("HAT, i-LN norms")
    assert (
        "scale x3" in text
        and "embed_dim 32" in text
        and "depths [2, 2, 2]" in text
        and "window_size 8" in text
    )
