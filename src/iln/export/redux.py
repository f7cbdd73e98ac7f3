"""traiNNer-redux's ``hat_iln`` (HAT with i-LN) <-> our HAT i-LN models.

Their module keys are ours (norms ``weight`` / ``bias``, outer norms affine), but their network
has no input encoding: no mean shift, no division by the DIV2K std (our ``stdnorm``), no
``img_range``. Ours maps the image x to e = (x - m) * g per channel (g = img_range / std, or
img_range without stdnorm) and the network output z back to z / g + m, so the encoding folds
into the first convolution (W' = W g, b' = b - sum W g m) and the decoding into the last one
(W' = W / g, b' = b / g + m). The scale folds exactly; the mean shift folds exactly except
on the image's one-pixel border, where ``conv_first`` zero-pads: our zeros are encoded pixels
of value m, theirs are pixels of value 0. ``border_difference`` measures what that changes.

In eval mode redux's i-LN (its running std starts at zero in a loaded model, so no clamp)
computes our ``iln`` and ``iln_clamp``; other norms, archs and designs are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from iln.export import ExportError, rebuild, require, settings_of
from iln.models import build_model
from iln.util.files import atomic_path

REDUX_NORMS = ("iln", "iln_clamp")
REDUX_EPS = 1e-4  # redux's iLN default, which hat_iln does not change
PARAM_KEY = "params"  # what traiNNer-redux saves and reads first


def check_redux(model: nn.Module) -> None:
    """ExportError in one line if ``model`` has no traiNNer-redux ``hat_iln`` counterpart."""
    hp = settings_of(model)
    name = f"{hp['arch']} {hp['norm']} x{hp['scale']}"
    problems = [
        why
        for bad, why in (
            (hp.get("family") != "hat", "traiNNer-redux's hat_iln is a HAT (no SwinIR or DRCT)"),
            (hp["norm"] not in REDUX_NORMS, f"its norm is i-LN ({', '.join(REDUX_NORMS)} here)"),
            (not hp["affine_outer"], "its outer norms are affine (affine_outer true)"),
            (float(hp["eps"]) != REDUX_EPS, f"its i-LN eps is {REDUX_EPS}, not {hp['eps']}"),
            (hp["scale"] == 1, "it has only the pixel-shuffle head of scales 2, 3, 4"),
        )
        if bad
    ]
    if problems:
        raise ExportError(f"{name} cannot be written as traiNNer-redux hat_iln: {problems[0]}")


def _encoding(model: nn.Module) -> tuple[Tensor, Tensor]:
    """(m, g) per input channel: our encoding is e = (x - m) * g."""
    codec = model.input_norm
    mean = codec.mean.detach().reshape(-1).double().cpu()
    gain = torch.full_like(mean, float(codec.img_range))
    if codec.stdnorm:
        gain = gain / codec.std.detach().reshape(-1).double().cpu()
    return mean, gain


def to_redux_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict a traiNNer-redux ``hat_iln`` loads strictly, encoding folded in."""
    check_redux(model)
    mean, gain = _encoding(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    w, b = state["conv_first.weight"].double(), state["conv_first.bias"].double()
    dtype = state["conv_first.weight"].dtype
    state["conv_first.weight"] = (w * gain.view(1, -1, 1, 1)).to(dtype)
    state["conv_first.bias"] = (b - (w * (gain * mean).view(1, -1, 1, 1)).sum((1, 2, 3))).to(dtype)
    w, b = state["conv_last.weight"].double(), state["conv_last.bias"].double()
    state["conv_last.weight"] = (w / gain.view(-1, 1, 1, 1)).to(dtype)
    state["conv_last.bias"] = (b / gain + mean).to(dtype)
    return state


def from_redux_state_dict(state: Mapping[str, Tensor], model: nn.Module) -> nn.Module:
    """Load a traiNNer-redux ``hat_iln`` state dict into ``model`` (its encoding unfolded
    from the first and last convolutions); the inverse of ``to_redux_state_dict``."""
    check_redux(model)
    mean, gain = _encoding(model)
    ours = {k: v.detach().cpu().clone() for k, v in state.items()}
    for key in ("conv_first.weight", "conv_first.bias", "conv_last.weight", "conv_last.bias"):
        if key not in ours:
            raise ExportError(f"not a hat_iln state dict: no {key}")
    w, b = ours["conv_first.weight"].double(), ours["conv_first.bias"].double()
    dtype = ours["conv_first.weight"].dtype
    if w.shape[1] != mean.numel():
        raise ExportError(f"conv_first.weight {tuple(w.shape)}: expected {mean.numel()} inputs")
    ours["conv_first.weight"] = (w / gain.view(1, -1, 1, 1)).to(dtype)
    ours["conv_first.bias"] = (b + (w * mean.view(1, -1, 1, 1)).sum((1, 2, 3))).to(dtype)
    w, b = ours["conv_last.weight"].double(), ours["conv_last.bias"].double()
    ours["conv_last.weight"] = (w * gain.view(-1, 1, 1, 1)).to(dtype)
    ours["conv_last.bias"] = ((b - mean) * gain).to(dtype)
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ExportError(
            f"the hat_iln weights do not fit {model.settings.arch}: {first}"
        ) from None
    return model


def redux_twin(model: nn.Module) -> nn.Module:
    """Our network computing what traiNNer-redux's ``hat_iln`` computes with
    ``to_redux_state_dict(model)``: the folded weights, and no input encoding."""
    twin = rebuild(model, fast=False)
    twin.load_state_dict(to_redux_state_dict(model))
    twin.input_norm.mean.zero_()
    twin.input_norm.std.fill_(1.0)
    twin.input_norm.img_range = 1.0
    return twin


def probe_image(side: int, channels: int) -> Tensor:
    """A fixed (1, channels, side + 3, side + 1) image in [0, 1] (smooth ramps plus noise,
    drawn from its own generator), odd-sized so that the padding is exercised."""
    g = torch.Generator().manual_seed(0)
    h, w = side + 3, side + 1
    ramp = torch.linspace(0, 1, h).view(h, 1) * torch.linspace(1, 0, w).view(1, w)
    noise = torch.rand(channels, h, w, generator=g)
    return (0.7 * ramp + 0.3 * noise).clamp(0, 1).unsqueeze(0)


@torch.no_grad()
def border_difference(model: nn.Module, image: Tensor | None = None) -> float:
    """Largest |difference| between ``model`` and its traiNNer-redux form on ``image``
    (default: a probe of three windows a side): the mean shift at the zero-padded border."""
    ours = rebuild(model, fast=False)
    if image is None:
        image = probe_image(3 * ours.window_size, ours.in_chans)
    return float((ours(image) - redux_twin(model)(image)).abs().max())


def mean_folds_exactly(model: nn.Module) -> bool:
    """Whether the encoding folds exactly: no mean shift (grey models), only a scale."""
    mean, _ = _encoding(model)
    return bool((mean == 0).all())


def write_redux(model: nn.Module, path: Path, *, allow_border: bool = False) -> float:
    """Write ``{"params": state}`` as traiNNer-redux saves it; the largest output difference
    on the probe image (0 where the encoding folds exactly). A mean shift, which changes the
    border, is refused in one line giving that difference unless ``allow_border``."""
    state = to_redux_state_dict(model)
    difference = 0.0 if mean_folds_exactly(model) else border_difference(model)
    if difference and not allow_border:
        hp = settings_of(model)
        raise ExportError(
            f"{hp['arch']} {hp['norm']} x{hp['scale']}: its RGB mean shift cannot be folded "
            f"exactly into traiNNer-redux hat_iln (its conv_first zero-pads raw pixels, ours "
            f"encoded ones): outputs differ by up to {difference:.3g} on a probe image; "
            f"--allow-border-difference writes it anyway"
        )
    with atomic_path(path) as tmp:
        torch.save({PARAM_KEY: state}, tmp)
    return difference


def _count(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    found: dict[int, set[int]] = {}
    for key in state:
        if m := re.match(pattern, key):
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return [len(found[g]) for g in sorted(found)]


def redux_recipe(state: Mapping[str, Tensor]) -> tuple[int, dict[str, object]]:
    """(scale, overrides) of the HAT a ``hat_iln`` state dict holds, read from its shapes."""
    try:
        embed, in_chans = state["conv_first.weight"].shape[:2]
        block = "layers.0.residual_group.blocks.0."
        n_sa = state["relative_position_index_SA"].shape[0]
        n_oca = state["relative_position_index_OCA"].shape[1]
        window, outer = round(n_sa**0.5), round(n_oca**0.5)
        depths = _count(state, r"layers\.(\d+)\.residual_group\.blocks\.(\d+)\.norm1\.weight$")
        heads = [
            state[f"layers.{g}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1]
            for g in range(len(depths))
        ]
        ups = [k for k in state if re.fullmatch(r"upsample\.\d+\.weight", k)]
        out = state[ups[0]].shape[0] // state[ups[0]].shape[1] if ups else 0
        scale = {1: 0, 4: 2 ** len(ups), 9: 3}.get(out, 0)
        overrides: dict[str, object] = dict(
            embed_dim=int(embed),
            in_chans=int(in_chans),
            depths=depths,
            num_heads=[int(h) for h in heads],
            window_size=window,
            overlap_ratio=(outer - window) / window,
            compress_ratio=int(embed) // state[block + "conv_block.cab.0.weight"].shape[0],
            squeeze_factor=int(embed)
            // state[block + "conv_block.cab.3.attention.1.weight"].shape[0],
            mlp_ratio=state[block + "mlp.fc1.weight"].shape[0] / int(embed),
        )
    except (KeyError, IndexError) as err:
        raise ExportError(f"not a traiNNer-redux hat_iln state dict (no {err})") from None
    if not depths or not scale:
        raise ExportError("not a traiNNer-redux hat_iln state dict (no blocks or no upsampler)")
    return scale, overrides


def read_redux(path: Path, *, arch: str = "hat_1", norm: str = "iln") -> nn.Module:
    """A traiNNer-redux ``hat_iln`` file (.pth with ``params`` / ``params_ema`` or a bare state
    dict, or .safetensors) as our HAT ``norm`` model (eval mode): its shapes give the
    network's size, ``arch`` (a HAT preset) the rest (conv_scale, img_range)."""
    from iln.models.checkpoint import read_state_dict

    path = Path(path)
    if path.suffix == ".safetensors":
        state = require("safetensors.torch").load_file(str(path))
    else:
        state = read_state_dict(path, PARAM_KEY)
    scale, overrides = redux_recipe(state)
    try:
        model = build_model(arch, norm=norm, scale=scale, **overrides)
    except ValueError as err:
        raise ExportError(f"{path}: {err}") from None
    try:
        return from_redux_state_dict(state, model).eval()
    except ExportError as err:
        raise ExportError(f"{path}: {err}") from None
