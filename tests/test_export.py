"""iln.export and the ``iln export`` / ``iln import`` commands: every format written and read
back, key sets against committed fixtures of the other tools' names and shapes, the
traiNNer-redux fold, ONNX graphs against PyTorch in onnxruntime, and (where the user points
to checkouts: ILN_OFFICIAL_REPO, ILN_REDUX_REPO) the authors' and traiNNer-redux's code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iln.cli.main import main
from iln.export import ExportError, rebuild
from iln.export import redux as rx
from iln.export.basicsr import write_basicsr
from iln.models import build_model, load_official_checkpoint
from iln.weights.trained import load_trained, save_trained
from tests import thirdparty

FIXTURES = Path(__file__).parent / "fixtures"
# Small networks of every family; HAT's matches the key-name fixtures.
SMALL = {
    "hat_tiny": dict(embed_dim=16, depths=[2], num_heads=[2]),
    "swinir_tiny": dict(embed_dim=16, depths=[2], num_heads=[2]),
    "drct_tiny": dict(embed_dim=16, depths=[5], num_heads=[2], gc=4),
}
HAT_SMALL = dict(
    embed_dim=16, depths=[2], num_heads=[2], window_size=8, compress_ratio=4, squeeze_factor=8
)


def _model(arch: str, norm: str, scale: int = 2, seed: int = 0, **extra) -> torch.nn.Module:
    """A small model with weights away from their initial values (biases, norm gains)."""
    model = build_model(arch, norm=norm, scale=scale, **{**SMALL[arch], **extra})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _image(h: int, w: int, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, channels, h, w, generator=torch.Generator().manual_seed(seed))


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


# ---- safetensors


@pytest.mark.parametrize("arch", list(SMALL))
@pytest.mark.parametrize("norm", ["ln", "iln"])
def test_safetensors_round_trip_keeps_weights_recipe_and_outputs(tmp_path, arch, norm):
    pytest.importorskip("safetensors")
    from iln.export.safetensors import read_metadata, read_safetensors, write_safetensors

    model = _model(arch, norm)
    path = tmp_path / "m.safetensors"
    write_safetensors(model, path, {"provenance": {"name": "run_a", "steps": 10}})
    back = read_safetensors(path)
    assert back.settings == model.settings
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    meta = read_metadata(path)
    assert meta["iln.arch"] == arch and meta["iln.norm"] == norm and meta["iln.scale"] == "2"
    assert json.loads(meta["iln.provenance"]) == {"name": "run_a", "steps": 10}
    x = _image(13, 11)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_safetensors_without_a_recipe_is_refused_in_one_line(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    from iln.export.safetensors import read_safetensors

    path = tmp_path / "bare.safetensors"
    st.save_file({"conv_first.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    with pytest.raises(ExportError, match=r"bare.safetensors: no iln recipe in its metadata"):
        read_safetensors(path)


# ---- official BasicSR


def test_basicsr_export_has_the_authors_key_names_and_shapes(tmp_path):
    """The fixture lists the names and shapes of the authors' HAT_iLN built with HAT_SMALL
    (x2): an export loads into it strictly exactly when they are equal."""
    model = build_model("hat_tiny", norm="iln", scale=2, **HAT_SMALL)
    write_basicsr(model, tmp_path / "m.pth")
    state = torch.load(tmp_path / "m.pth", weights_only=True)["params_ema"]
    expected = json.loads((FIXTURES / "official_hat_iln_small_x2.json").read_text())
    assert _shapes(state) == expected
    assert "layers.0.residual_group.blocks.0.norm1.gamma" in state


@pytest.mark.parametrize("arch", list(SMALL))
@pytest.mark.parametrize("norm", ["ln", "iln"])
def test_basicsr_export_reads_back_with_equal_outputs(tmp_path, arch, norm):
    model = _model(arch, norm)
    write_basicsr(model, tmp_path / "m.pth")
    back = build_model(arch, norm=norm, scale=2, **SMALL[arch]).eval()
    load_official_checkpoint(back, tmp_path / "m.pth")
    x = _image(17, 9)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


# ---- traiNNer-redux


def test_redux_export_has_redux_key_names_and_shapes():
    """The fixture lists the names and shapes of traiNNer-redux's hat_iln with HAT_SMALL."""
    model = build_model("hat_tiny", norm="iln", scale=2, **HAT_SMALL)
    expected = json.loads((FIXTURES / "redux_hat_iln_small_x2.json").read_text())
    assert _shapes(rx.to_redux_state_dict(model)) == expected


@pytest.mark.parametrize("norm", ["iln", "iln_clamp"])
def test_redux_fold_and_unfold_are_inverse(norm):
    model = _model("hat_tiny", norm)
    back = rx.from_redux_state_dict(
        rx.to_redux_state_dict(model),
        build_model("hat_tiny", norm=norm, scale=2, **SMALL["hat_tiny"]),
    )
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=1e-6)


def test_redux_fold_is_exact_without_a_mean_shift():
    """Grey models have mean 0: stdnorm and img_range fold exactly, so the network without an
    encoding (what traiNNer-redux runs) gives our outputs."""
    model = _model("hat_tiny", "iln", in_chans=1, img_range=255.0)
    assert rx.mean_folds_exactly(model)
    x = _image(19, 13, channels=1)
    with torch.no_grad():
        ours, theirs = rebuild(model, fast=False)(x), rx.redux_twin(model)(x)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)


def test_redux_fold_of_the_mean_changes_only_what_the_border_padding_reaches():
    """Where conv_first sees no padding the folded encoding is exact: the first features of
    the two networks agree inside the one-pixel border and differ on it."""
    model = _model("hat_tiny", "iln")
    twin = rx.redux_twin(model)
    x = _image(16, 16)
    with torch.no_grad():
        ours = model.conv_first(model.input_norm.encode(x))
        theirs = twin.conv_first(twin.input_norm.encode(x))
    diff = (ours - theirs).abs()
    assert diff[..., 1:-1, 1:-1].max() < 1e-5
    assert diff[..., 0, :].max() > 1e-3
    assert not rx.mean_folds_exactly(model)


def test_redux_export_of_an_rgb_model_is_refused_unless_allowed(tmp_path):
    model = _model("hat_tiny", "iln")
    refused = r"mean shift cannot be folded exactly .* differ by up to"
    with pytest.raises(ExportError, match=refused):
        rx.write_redux(model, tmp_path / "m.pth")
    assert not (tmp_path / "m.pth").exists()
    difference = rx.write_redux(model, tmp_path / "m.pth", allow_border=True)
    assert difference == pytest.approx(rx.border_difference(model))
    back = rx.read_redux(tmp_path / "m.pth", arch="hat_1", norm="iln")
    for key in ("embed_dim", "depths", "num_heads", "window_size", "compress_ratio"):
        assert back.settings.as_dict()[key] == model.settings.as_dict()[key], key
    assert back.settings.scale == 2


@pytest.mark.parametrize(
    ("arch", "norm", "scale", "why"),
    [
        ("swinir_tiny", "iln", 2, "is a HAT"),
        ("hat_tiny", "ln", 2, "norm is i-LN"),
        ("hat_tiny", "iln", 1, "scales 2, 3, 4"),
    ],
)
def test_redux_refuses_what_hat_iln_cannot_hold(arch, norm, scale, why):
    model = build_model(arch, norm=norm, scale=scale, **SMALL[arch])
    with pytest.raises(ExportError, match=f"cannot be written as traiNNer-redux hat_iln: .*{why}"):
        rx.to_redux_state_dict(model)


# ---- the commands


def test_export_and_import_commands_round_trip(tmp_path, capsys):
    pytest.importorskip("safetensors")
    model = _model("hat_tiny", "iln")
    src = tmp_path / "model.pt"
    save_trained(src, model, arch="hat_tiny", norm="iln", scale=2, overrides=SMALL["hat_tiny"])
    for fmt in ("basicsr", "safetensors"):
        assert main(["export", str(src), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    assert main(["export", str(src), "--format", "redux", "--out", str(tmp_path / "r")]) == 2
    assert "--allow-border-difference" in capsys.readouterr().err
    args = ["export", str(src), "--format", "redux", "--out", str(tmp_path / "r")]
    assert main([*args, "--allow-border-difference"]) == 0
    again = ["export", str(src), "--format", "basicsr", "--out", str(tmp_path / "basicsr")]
    assert main(again) == 2
    assert "exists (--overwrite replaces it)" in capsys.readouterr().err
    x = _image(11, 21)
    for fmt, file in (("safetensors", "safetensors"), ("redux", "r")):
        out = tmp_path / f"{fmt}.pt"
        assert main(["import", str(tmp_path / file), "--format", fmt, "--out", str(out)]) == 0
        back, _ = load_trained(out, torch.device("cpu"))
        with torch.no_grad():
            diff = float((back(x) - model(x)).abs().max())
        assert diff < 1e-5, (fmt, diff)
    assert "from redux r; outputs differ from the redux model by up to" in capsys.readouterr().out


def test_export_of_an_unknown_name_says_what_exists(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    code = main(
        [
            "export",
            "no_such_run",
            "--format",
            "basicsr",
            "--out",
            str(tmp_path / "x"),
            "--params",
            str(params),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "'no_such_run': no such run, released entry or baseline" in err
    assert len(err.strip().splitlines()) == 1


# ---- ONNX


@pytest.mark.integration  # each export traces the network (~30 s on a CPU core)
@pytest.mark.parametrize("arch", list(SMALL))
@pytest.mark.parametrize("norm", ["ln", "iln"])
def test_onnx_matches_pytorch_at_odd_sizes(tmp_path, arch, norm):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from iln.export.onnx import export_onnx, onnx_session

    model = _model(arch, norm, depths=SMALL[arch]["depths"][:1] if arch != "drct_tiny" else [5])
    export_onnx(model, tmp_path / "m.onnx")
    session = onnx_session(tmp_path / "m.onnx")
    for h, w in ((13, 29), (5, 3), (2, 17), (24, 16)):  # pads wider than the image included
        x = _image(h, w, seed=h)
        (y,) = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            expected = model(x)
        assert y.shape == tuple(expected.shape)
        assert float(abs(torch.from_numpy(y) - expected).max()) < 1e-4, (h, w)


# ---- the other tools' own code (skipped unless the user gives checkouts)


def test_basicsr_export_loads_strictly_into_the_authors_hat_iln(tmp_path):
    hat_iln = thirdparty.official_hat_iln()
    model = _model("hat_tiny", "iln")
    write_basicsr(model, tmp_path / "m.pth")
    theirs = hat_iln(
        upscale=2,
        in_chans=3,
        img_size=64,
        window_size=8,
        compress_ratio=4,
        squeeze_factor=8,
        conv_scale=0.01,
        overlap_ratio=0.5,
        img_range=1.0,
        embed_dim=16,
        depths=[2],
        num_heads=[2],
        mlp_ratio=2.0,
        upsampler="pixelshuffle",
        resi_connection="1conv",
        eps=1e-4,
        stdnorm=True,
    ).eval()
    theirs.load_state_dict(torch.load(tmp_path / "m.pth")["params_ema"], strict=True)
    x = _image(24, 16)  # their network takes multiples of the window (BasicSR pads outside)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=0, atol=1e-5)


def test_redux_export_equals_redux_hat_iln(tmp_path):
    hat_iln = thirdparty.redux_hat_iln()
    model = _model("hat_tiny", "iln")
    rx.write_redux(model, tmp_path / "m.pth", allow_border=True)
    theirs = hat_iln(
        upscale=2,
        in_chans=3,
        img_size=64,
        window_size=8,
        compress_ratio=4,
        squeeze_factor=8,
        conv_scale=0.01,
        overlap_ratio=0.5,
        embed_dim=16,
        depths=[2],
        num_heads=[2],
        mlp_ratio=2.0,
    ).eval()
    theirs.load_state_dict(torch.load(tmp_path / "m.pth")["params"], strict=True)
    x = _image(19, 13)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), rx.redux_twin(model)(x), rtol=0, atol=1e-5)
        gap = float((theirs(x) - model(x)).abs().max())
    assert gap <= 2 * rx.border_difference(model, x) + 1e-6


# ---- spandrel (chaiNNer's loader): an optional package here


@pytest.mark.parametrize(
    ("arch", "detected"), [("hat_tiny", "HAT"), ("swinir_tiny", "SwinIR"), ("drct_tiny", "DRCT")]
)
def test_spandrel_detects_our_ln_exports_with_equal_outputs(tmp_path, arch, detected):
    spandrel = pytest.importorskip("spandrel")
    model = _model(arch, "ln")
    write_basicsr(model, tmp_path / "m.pth")
    descriptor = spandrel.ModelLoader().load_from_file(tmp_path / "m.pth")
    assert descriptor.architecture.id == detected
    assert descriptor.scale == 2
    x = _image(16, 24)
    with torch.no_grad():
        torch.testing.assert_close(descriptor.model.eval()(x), model(x), rtol=0, atol=1e-5)


def test_spandrel_does_not_detect_the_authors_iln_format(tmp_path):
    spandrel = pytest.importorskip("spandrel")
    write_basicsr(_model("hat_tiny", "iln"), tmp_path / "m.pth")
    with pytest.raises(Exception):  # noqa: B017 (spandrel's error class varies by version)
        spandrel.ModelLoader().load_from_file(tmp_path / "m.pth")


def test_export_of_a_run_records_its_parameters(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from iln.export.safetensors import read_metadata

    params = tmp_path / "params.yaml"
    params.write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    model = _model("hat_tiny", "iln")
    weights = tmp_path / "runs" / "iln" / "train" / "model.pt"
    weights.parent.mkdir(parents=True)
    save_trained(weights, model, arch="hat_tiny", norm="iln", scale=2, overrides=SMALL["hat_tiny"])
    out = tmp_path / "iln.safetensors"
    args = ["export", "iln", "--format", "safetensors", "--out", str(out), "--params", str(params)]
    assert main(args) == 0
    provenance = json.loads(read_metadata(out)["iln.provenance"])
    recorded = (provenance["name"], provenance["kind"], provenance["weights"])
    assert recorded == ("iln", "trained", "ema")
    assert provenance["spec"]["norm"] == "iln" and provenance["train"]["lr"] > 0
    assert main([*args[:-2], "--params", str(params), "--weights", "raw", "--overwrite"]) == 2
    assert "holds no raw weights" in capsys.readouterr().err


@pytest.mark.integration
def test_onnx_fp16_graph_runs_in_onnxruntime_close_to_fp32(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from iln.export.onnx import export_onnx, onnx_session

    model = _model("hat_tiny", "iln", depths=[1])
    export_onnx(model, tmp_path / "m.onnx", precision="fp16")
    session = onnx_session(tmp_path / "m.onnx")
    x = _image(13, 29)
    (y,) = session.run(None, {"image": x.numpy().astype("float16")})
    with torch.no_grad():
        expected = model(x)
    assert y.dtype.name == "float16"
    assert float(abs(torch.from_numpy(y).float() - expected).max()) < 5e-3


def test_onnx_precision_is_checked_before_anything_is_written(tmp_path):
    from iln.export.onnx import export_onnx

    with pytest.raises(ExportError, match="precision 'bf16': expected one of fp32, fp16"):
        export_onnx(_model("hat_tiny", "iln"), tmp_path / "m.onnx", precision="bf16")
    assert not (tmp_path / "m.onnx").exists()


def test_a_missing_optional_package_is_named_with_its_install_command():
    from iln.export import require

    with pytest.raises(
        ExportError, match=r'^no_such_package_x is not installed: pip install -e ".\[export\]"'
    ):
        require("no_such_package_x")
