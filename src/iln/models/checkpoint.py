"""Released checkpoints (BasicSR format) <-> our models.

Our module names follow the released code, with two differences handled here:
- our norms always call their affine parameters ``weight`` / ``bias``, while the released
  i-LN code names those of its i-LN and Affine norms ``gamma`` / ``beta``;
- SwinIR's released weights also carry per-block constants (``attn_mask`` of the shifted
  blocks, at the training patch size ``img_size``, and ``attn.relative_position_index``)
  that our SwinIR computes instead; on load the index must equal ours and the masks must
  have the shape of some training patch, then both are dropped. Exports write them, so
  that an export loads strictly into the released code.
HAT's ``relative_position_index_SA`` / ``_OCA`` buffers are kept under their names; a
checkpoint without them (older releases) keeps the model's own, identical values.
DRCT's blocks are ``layers.{g}.residual_group.blocks.{k}`` / ``.adjust.{k}`` here and
``layers.{g}.swin{k+1}`` / ``layers.{g}.adjust{k+1}`` upstream (``drct.official_key``); its
released weights carry the same per-block constants as SwinIR's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from iln.models import common, drct, norms
from iln.models.swinir import SwinBlock, SwinIR

PARAM_KEYS = ("params_ema", "params")  # BasicSR checkpoint layout
_GAMMA_BETA = {"weight": "gamma", "bias": "beta"}
_OPTIONAL_BUFFERS = ("relative_position_index_SA", "relative_position_index_OCA")
_DERIVED_SUFFIXES = (".attn_mask", ".attn.relative_position_index")
_MAX_LISTED = 12


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model (missing, unexpected or misshapen tensors)."""


def _uses_gamma_beta(module: nn.Module) -> bool:
    """Norms that the released i-LN code names gamma/beta: its i-LN (LN*) and Affine."""
    return isinstance(module, (norms.ImageLayerNorm, norms.Affine))


def official_key_map(model: nn.Module) -> dict[str, str]:
    """Our state-dict key -> the released key, for every entry of ``model.state_dict()``."""
    renamed: dict[str, str] = {}
    for name, module in model.named_modules():
        if _uses_gamma_beta(module):
            prefix = f"{name}." if name else ""
            for ours, theirs in _GAMMA_BETA.items():
                renamed[prefix + ours] = prefix + theirs
    keys = {key: renamed.get(key, key) for key in model.state_dict()}
    if isinstance(model, drct.DRCT):
        keys = {ours: drct.official_key(theirs) for ours, theirs in keys.items()}
    return keys


def to_official_state_dict(model: nn.Module, *, img_size: int = 64) -> dict[str, Tensor]:
    """The model's tensors under the released names (the inverse of the loader).

    For DRCT the released per-block buffers are added (``drct.official_buffers``), the masks
    for the released constructor's ``img_size`` (64 in its configs). For SwinIR the
    per-block constants of the released code are added: every block's
    ``attn.relative_position_index`` and every shifted block's ``attn_mask`` for a
    ``model.img_size`` square input (the released constructor's training patch; the
    released code uses that buffer only for inputs of exactly that size and computes the
    same mask for any other).
    """
    state = model.state_dict()
    out = {theirs: state[ours].detach().clone() for ours, theirs in official_key_map(model).items()}
    if isinstance(model, drct.DRCT):
        out.update(drct.official_buffers(model, img_size))
    elif isinstance(model, SwinIR):
        index = model.relative_position_index.detach().cpu()
        size = model.img_size
        masks: dict[tuple[int, int], Tensor] = {}
        for name, block in model.named_modules():
            if not isinstance(block, SwinBlock):
                continue
            out[f"{name}.attn.relative_position_index"] = index.clone()
            if block.shift:
                geometry = (block.attn.window, block.shift)
                if geometry not in masks:
                    masks[geometry] = common.shift_window_mask(
                        size, size, *geometry, device=torch.device("cpu"), dtype=torch.float32
                    )
                out[f"{name}.attn_mask"] = masks[geometry].clone()
    return out


def _check_derived(model: nn.Module, state: Mapping[str, Tensor], keys: list[str]) -> list[str]:
    """Problems with the released SwinIR per-block constants in ``keys`` (empty: fine)."""
    index = getattr(model, "relative_position_index", None)
    window = getattr(model, "window_size", None)
    problems = []
    for key in keys:
        value = state[key]
        if key.endswith(".attn.relative_position_index"):
            if not isinstance(index, Tensor) or not torch.equal(value.to(index), index):
                shape = tuple(value.shape)
                problems.append(f"{key} {shape} differs from the model's relative position index")
        elif isinstance(window, int):
            n = window * window
            grid = round(value.shape[0] ** 0.5) if value.ndim == 3 else 0
            if value.ndim != 3 or value.shape[1:] != (n, n) or grid * grid != value.shape[0]:
                problems.append(
                    f"{key} {tuple(value.shape)} is no shift mask of {window}x{window} windows "
                    f"(expected (nW, {n}, {n}) with nW a square)"
                )
    return problems


def read_state_dict(
    source: str | os.PathLike[str] | Mapping[str, Any], key: str = "params_ema"
) -> dict[str, Tensor]:
    """The tensors of ``source`` (path or dict): ``source[key]`` in the BasicSR layout, or a
    bare state dict. A BasicSR dict without ``key`` is refused, naming the key it has: the
    EMA and the trained weights are different models, never taken for one another."""
    where = "the given state dict"
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        if not os.path.isfile(where):
            raise FileNotFoundError(f"checkpoint {where} does not exist")
        try:
            blob = torch.load(where, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling refused or corrupt file
            raise ValueError(
                f"checkpoint {where} could not be read as a torch state dict: {err}"
            ) from err
    else:
        blob = source
    if not isinstance(blob, Mapping):
        raise ValueError(f"checkpoint {where}: expected a dict, got {type(blob).__name__}")
    if key in blob and isinstance(blob[key], Mapping):
        blob = blob[key]
    elif any(k in blob for k in PARAM_KEYS):
        other = next(k for k in PARAM_KEYS if k in blob)
        raise ValueError(f"checkpoint {where}: has no {key!r} (it has {other!r}); use {other!r}")
    bad = [k for k, v in blob.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(
            f"checkpoint {where}: expected a state dict of tensors (optionally under {key!r}), "
            f"found non-tensor entries {bad[:_MAX_LISTED]}"
        )
    return {re.sub(r"^module\.", "", k): v for k, v in blob.items()}


def describe_checkpoint(state: Mapping[str, Tensor]) -> str:
    """A one-line guess of what network a released-format state dict holds."""
    parts: list[str] = []
    keys = list(state)
    parts.append(
        "HAT"
        if any(".overlap_attn." in k for k in keys)
        else "DRCT"
        if any(re.match(r"layers\.\d+\.swin1\.", k) for k in keys)
        else "SwinIR-like"
        if any(".blocks." in k for k in keys)
        else "unknown arch"
    )
    if any(k.endswith((".gamma", ".beta")) for k in keys):
        parts.append("i-LN norms (parameters named gamma/beta)")
    elif any(re.search(r"\.norm1\.weight$", k) for k in keys):
        parts.append("LN-style norms (parameters named weight/bias)")
    ups = sorted(
        int(m.group(1)) for k in keys if (m := re.fullmatch(r"upsample\.(\d+)\.weight", k))
    )
    if len(ups) == 2:
        parts.append("scale x4")
    elif len(ups) == 1:
        out_ch = state[f"upsample.{ups[0]}.weight"].shape[0]
        parts.append(
            {256: "scale x2", 576: "scale x3"}.get(out_ch, f"upsample with {out_ch} channels")
        )
    if "conv_first.weight" in state:
        parts.append(f"embed_dim {state['conv_first.weight'].shape[0]}")
        parts.append(f"in_chans {state['conv_first.weight'].shape[1]}")
    depth: dict[int, set[int]] = {}
    for k in keys:
        if m := re.match(r"layers\.(\d+)\.residual_group\.blocks\.(\d+)\.", k):
            depth.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if depth:
        parts.append(f"depths {[len(depth[g]) for g in sorted(depth)]}")
    dense = {m.group(1) for k in keys if (m := re.match(r"layers\.(\d+)\.swin1\.", k))}
    if dense:
        parts.append(f"{len(dense)} dense groups")
    table = next(
        (
            v
            for k, v in state.items()
            if k.endswith(
                (
                    "blocks.0.attn.relative_position_bias_table",
                    "swin1.attn.relative_position_bias_table",
                )
            )
        ),
        None,
    )
    if table is not None:
        side = round(table.shape[0] ** 0.5)
        parts.append(f"window_size {(side + 1) // 2}, {table.shape[1]} heads")
    return ", ".join(parts)


def _describe_model(model: nn.Module) -> str:
    settings = getattr(model, "settings", None)
    if settings is None:
        return type(model).__name__
    hp = settings.as_dict()
    fields = (
        "arch",
        "norm",
        "scale",
        "embed_dim",
        "depths",
        "window_size",
        "in_chans",
        "affine_outer",
    )
    return ", ".join(f"{k}={hp[k]}" for k in fields if k in hp)


def _listing(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}): {', '.join(items[:_MAX_LISTED])}{more}"


def load_official_checkpoint(
    model: nn.Module, source: str | os.PathLike[str] | Mapping[str, Any], key: str = "params_ema"
) -> nn.Module:
    """Load released weights (path or dict, BasicSR layout or bare) into ``model``.

    Raises ``CheckpointMismatchError`` listing missing, unexpected and misshapen tensors,
    with a guess of what the checkpoint holds, when it does not fit exactly.
    """
    state = read_state_dict(source, key)
    key_map = official_key_map(model)  # ours -> theirs
    ours_of = {theirs: ours for ours, theirs in key_map.items()}
    expected = model.state_dict()
    derived = [k for k in state if k.endswith(_DERIVED_SUFFIXES) and k not in ours_of]
    given = {k: v for k, v in state.items() if k not in derived}

    missing = [t for t in ours_of if t not in given and t not in _OPTIONAL_BUFFERS]
    unexpected = [t for t in given if t not in ours_of]
    mismatched = [
        f"{t} {tuple(given[t].shape)} vs model {tuple(expected[ours_of[t]].shape)}"
        for t in ours_of
        if t in given and given[t].shape != expected[ours_of[t]].shape
    ] + _check_derived(model, state, derived)
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not fit the model ({_describe_model(model)})"]
        if missing:
            lines.append(_listing("missing", missing))
        if unexpected:
            lines.append(_listing("unexpected", unexpected))
        if mismatched:
            lines.append(_listing("shape mismatch", mismatched))
        lines.append(f"  the checkpoint looks like: {describe_checkpoint(state)}")
        raise CheckpointMismatchError("\n".join(lines))

    converted = {ours: given[theirs] for theirs, ours in ours_of.items() if theirs in given}
    for theirs in _OPTIONAL_BUFFERS:
        if theirs in ours_of and theirs not in given:
            converted[ours_of[theirs]] = expected[ours_of[theirs]]
    model.load_state_dict(converted, strict=True)
    return model
