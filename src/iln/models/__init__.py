"""Model library: HAT, SwinIR and DRCT with every normalisation variant of the study.

``build_model(arch, norm=..., scale=..., **overrides)`` resolves a preset (one small
entry of ``PRESETS``), applies overrides named as in the official configs, builds the
norm factories once and passes them down through every level of the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

from iln.models import common, drct, norms
from iln.models import fast as fast_ops
from iln.models.checkpoint import load_official_checkpoint, to_official_state_dict
from iln.models.drct import DRCT
from iln.models.hat import HAT
from iln.models.norms import NORMS, build_norm
from iln.models.swinir import SwinIR

__all__ = [
    "ARCHS",
    "NORMS",
    "PRESETS",
    "SCALES",
    "build_model",
    "build_norm",
    "ModelSettings",
    "load_official_checkpoint",
    "resolve_settings",
    "to_official_state_dict",
]

SCALES = (1, 2, 3, 4)  # 1: restoration (denoising, JPEG, deraining) with a global residual

_HAT_COMMON: dict[str, Any] = dict(
    family="hat",
    conv_scale=0.01,
    overlap_ratio=0.5,
    mlp_ratio=2.0,
    drop_path_rate=0.1,
    img_range=1.0,
)
_SWINIR_COMMON: dict[str, Any] = dict(
    family="swinir", mlp_ratio=2.0, drop_path_rate=0.1, img_range=1.0, img_size=64
)
# The released SwinIR-M of the restoration tasks (scale 1; grey models: in_chans=1):
# denoising trained on 128 x 128 patches, JPEG artefact removal with window 7 (JPEG's 8 x 8
# blocks never align with it) on 126 x 126 patches and img_range 255.
_SWINIR_M = dict(_SWINIR_COMMON, embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6)

_DRCT_COMMON: dict[str, Any] = dict(family="drct", mlp_ratio=2.0, drop_path_rate=0.1, img_range=1.0)

# Network presets. hat_1 is the official "HAT-mini" config the paper calls HAT_1; hat the
# full HAT; swinir the classical SwinIR; swinir_dn / swinir_car the released denoising and
# JPEG SwinIR (same network, other window / img_range / training patch); swinir_1 a SwinIR
# sized like hat_1 (the paper does not publish it); drct the official DRCT (five dense
# Swin blocks per group, growth gc; depths only sets its stochastic-depth schedule, as
# released); the tiny ones keep a CPU training step well under a second.
PRESETS: dict[str, dict[str, Any]] = {
    "hat_1": dict(
        _HAT_COMMON,
        embed_dim=96,
        depths=(6,) * 6,
        num_heads=(6,) * 6,
        window_size=16,
        compress_ratio=24,
        squeeze_factor=24,
    ),
    "hat": dict(
        _HAT_COMMON,
        embed_dim=180,
        depths=(6,) * 6,
        num_heads=(6,) * 6,
        window_size=16,
        compress_ratio=3,
        squeeze_factor=30,
    ),
    "hat_tiny": dict(
        _HAT_COMMON,
        embed_dim=32,
        depths=(2,) * 3,
        num_heads=(2,) * 3,
        window_size=8,
        compress_ratio=4,
        squeeze_factor=8,
    ),
    "swinir": dict(_SWINIR_M, window_size=8),
    "swinir_dn": dict(_SWINIR_M, window_size=8, img_size=128),
    "swinir_car": dict(_SWINIR_M, window_size=7, img_size=126, img_range=255.0),
    "swinir_1": dict(
        _SWINIR_COMMON, embed_dim=96, depths=(6,) * 6, num_heads=(6,) * 6, window_size=8
    ),
    "swinir_tiny": dict(
        _SWINIR_COMMON, embed_dim=32, depths=(2,) * 4, num_heads=(2,) * 4, window_size=8
    ),
    "drct": dict(
        _DRCT_COMMON, embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6, window_size=16, gc=32
    ),
    "drct_tiny": dict(
        _DRCT_COMMON, embed_dim=32, depths=(5,) * 2, num_heads=(2,) * 2, window_size=8, gc=8
    ),
}
ARCHS: tuple[str, ...] = tuple(PRESETS)

# Overrides every arch accepts (besides its preset's network keys).
_GENERAL_KEYS = ("stdnorm", "affine_outer", "eps", "upsampler", "in_chans")
_UPSAMPLERS = ("pixelshuffle",)


@dataclass(frozen=True)
class HATParts:
    """What only HAT has: the channel-attention block (CAB) and the overlapping cross-attention
    (OCAB) of each group."""

    compress_ratio: int
    squeeze_factor: int
    conv_scale: float
    overlap_ratio: float


@dataclass(frozen=True)
class SwinIRParts:
    """What only SwinIR has: the training patch of the released constructor (its attn_mask)."""

    img_size: int


@dataclass(frozen=True)
class DRCTParts:
    """What only DRCT has: the growth channels of its dense Swin blocks."""

    gc: int


@dataclass(frozen=True)
class ModelSettings:
    """Every hyper-parameter of one network, resolved from its preset and overrides and checked
    (``resolve_settings``); ``build_model`` builds from it and leaves it on ``model.settings``.
    ``family`` names the one of ``hat`` / ``swinir`` / ``drct`` that is set."""

    arch: str
    family: Literal["hat", "swinir", "drct"]
    norm: str
    scale: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    mlp_ratio: float
    drop_path_rate: float
    img_range: float
    stdnorm: bool
    affine_outer: bool
    eps: float
    upsampler: str
    in_chans: int
    hat: HATParts | None = None
    swinir: SwinIRParts | None = None
    drct: DRCTParts | None = None

    def as_dict(self) -> dict[str, Any]:
        """One flat, JSON-ready mapping (the train summary's ``model`` key): the official
        hyper-parameter names, lists for the per-group values."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name in _FLAT}
        parts = self.hat or self.swinir or self.drct
        flat.update({f.name: getattr(parts, f.name) for f in fields(parts)})
        flat["depths"], flat["num_heads"] = list(self.depths), list(self.num_heads)
        return flat


_FLAT = {f.name for f in fields(ModelSettings)} - {"hat", "swinir", "drct"}
_PARTS = {"hat": HATParts, "swinir": SwinIRParts, "drct": DRCTParts}


def _as_int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(value)
    raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_settings(arch: str, *, norm: str, scale: int, **overrides: Any) -> ModelSettings:
    """The checked settings ``build_model(arch, norm=..., scale=..., **overrides)`` builds."""
    _check_names(arch, norm, scale, overrides)
    hp: dict[str, Any] = {"arch": arch, "norm": norm, "scale": int(scale)}
    hp.update(PRESETS[arch])
    hp.update(
        stdnorm=norm == "iln",
        affine_outer=norm in ("iln", "iln_clamp"),  # the official i-LN and traiNNer-redux's
        eps=norms.default_eps(norm),
        upsampler="pixelshuffle",
        in_chans=3,
    )
    hp.update(overrides)
    hp["depths"], hp["num_heads"] = _groups(hp, overrides)
    _check_widths(hp)
    _check_values(hp)
    for key in ("eps", "mlp_ratio", "img_range", "conv_scale", "overlap_ratio", "drop_path_rate"):
        if key in hp:
            hp[key] = float(hp[key])
    if hp["mlp_ratio"] <= 0:
        raise ValueError(f"mlp_ratio {hp['mlp_ratio']!r} must be positive")
    part = _PARTS[hp["family"]]
    own = part(**{f.name: hp.pop(f.name) for f in fields(part)})
    return ModelSettings(**hp, **{hp["family"]: own})


def _check_names(arch: str, norm: str, scale: int, overrides: dict[str, Any]) -> None:
    if arch not in PRESETS:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCHS)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    if isinstance(scale, bool) or scale not in SCALES:
        raise ValueError(
            f"scale {scale!r} is not supported; valid scales: {', '.join(map(str, SCALES))}"
        )
    valid = sorted(set(PRESETS[arch]) - {"family"} | set(_GENERAL_KEYS))
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown override {', '.join(map(repr, unknown))} for arch {arch!r}; "
            f"valid overrides: {', '.join(valid)}"
        )


def _groups(hp: dict[str, Any], overrides: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """(depths, num_heads) of equal length; a uniform preset head count follows depths."""
    depths = _as_int_tuple("depths", hp["depths"])
    heads = _as_int_tuple("num_heads", hp["num_heads"])
    if "num_heads" not in overrides and len(set(heads)) == 1:
        heads = heads[:1]
    if len(heads) == 1:
        heads = heads * len(depths)
    if len(heads) != len(depths) or not depths or min(depths) < 1:
        raise ValueError(
            f"depths {depths} and num_heads {heads} must be non-empty, positive and of equal length"
        )
    return depths, heads


def _check_widths(hp: dict[str, Any]) -> None:
    """Embedding width, window and the family's own sizes."""
    embed, window, heads = hp["embed_dim"], hp["window_size"], hp["num_heads"]
    if not _is_int(embed) or embed < 1 or any(embed % h for h in heads):
        raise ValueError(
            f"embed_dim {embed!r} must be a positive int divisible by every num_heads {heads}"
        )
    if hp["family"] == "hat" and (not _is_int(window) or window < 2 or window % 2):
        raise ValueError(
            f"window_size {window!r} must be an even int >= 2 for HAT (the shift is half a "
            f"window and OCAB's overlapping windows need an even border)"
        )
    if not _is_int(window) or window < 2:
        raise ValueError(
            f"window_size {window!r} must be an int >= 2 (shifted blocks move by window // 2)"
        )
    if "img_size" in hp:
        size = hp["img_size"]
        if not _is_int(size) or size <= window or size % window:
            raise ValueError(
                f"img_size {size!r} must be a multiple of window_size={window} larger than it "
                f"(the released constructor's training patch, which sets its attn_mask buffers)"
            )
    if "gc" in hp:
        if not _is_int(hp["gc"]) or hp["gc"] < 1:
            raise ValueError(f"gc {hp['gc']!r} must be a positive int (DRCT's growth channels)")
        drct.check_dense_heads(embed, hp["gc"], heads)
    for key in ("compress_ratio", "squeeze_factor"):
        if key in hp and (not isinstance(hp[key], int) or hp[key] < 1 or embed // hp[key] < 1):
            raise ValueError(f"{key} {hp[key]!r} must be an int in [1, embed_dim={embed}]")


def _check_values(hp: dict[str, Any]) -> None:
    """Input channels, upsampler, stochastic depth and the two norm switches."""
    if hp["in_chans"] not in (1, 3) or isinstance(hp["in_chans"], bool):
        raise ValueError(f"in_chans {hp['in_chans']!r} must be 1 (grey) or 3 (RGB)")
    if hp["upsampler"] not in _UPSAMPLERS:
        raise ValueError(
            f"upsampler {hp['upsampler']!r} is not supported; valid: {', '.join(_UPSAMPLERS)}"
        )
    if not 0.0 <= float(hp["drop_path_rate"]) < 1.0:
        raise ValueError(f"drop_path_rate {hp['drop_path_rate']!r} must be in [0, 1)")
    for key in ("stdnorm", "affine_outer"):
        if not isinstance(hp[key], bool):
            raise ValueError(f"{key} must be a bool, got {hp[key]!r}")


def build_model(
    arch: str,
    *,
    norm: str,
    scale: int,
    generator: torch.Generator | None = None,
    fast: bool = True,
    attention: str = "auto",
    **overrides: Any,
) -> nn.Module:
    """Build preset ``arch`` with norm variant ``norm`` for x``scale`` SR, or for
    restoration at input resolution (input + predicted residual) with ``scale=1``.

    Overrides use the official hyper-parameter names (``embed_dim``, ``depths``,
    ``num_heads``, ``window_size``, ``compress_ratio``, ``squeeze_factor``, ``mlp_ratio``,
    ``conv_scale``, ``overlap_ratio``, ``drop_path_rate``, ``img_range``, ``in_chans``,
    SwinIR's ``img_size``, DRCT's ``gc``) plus
    ``stdnorm``, ``affine_outer`` (``stdnorm`` default True for ``iln`` only, as the official
    configs; ``affine_outer`` True for ``iln`` and ``iln_clamp``, False otherwise), ``eps``
    (norm eps) and ``upsampler``. ``generator`` draws the initial weights (global RNG when
    None). The resolved settings are on ``model.settings`` (``ModelSettings``).

    ``fast`` (default) runs the fast path of ``fast.py`` (hand-written gradients, fused
    kernels); ``fast=False`` the plain reference code. Both compute the same function and
    share parameter names, so weights move freely between them. ``attention`` picks the
    fast path's attention kernels (``fast.ATTENTION_IMPLS``; "auto": the CPU kernels on the
    CPU, ``scaled_dot_product_attention`` elsewhere); the reference path has only its own.
    """
    fast_ops.check_attention_impl(attention)
    if not fast and attention != "auto":
        raise ValueError(
            f"attention={attention!r} selects a fast-path kernel; with fast=False the model "
            "runs the reference attention only"
        )
    settings = resolve_settings(arch, norm=norm, scale=scale, **overrides)
    block_norm = norms.norm_factory(norm, eps=settings.eps, fast=fast)
    outer_norm = (
        norms.affine_factory()
        if settings.affine_outer
        else norms.norm_factory(norm, eps=settings.eps, residual=False, fast=fast)
    )
    shared = dict(
        scale=settings.scale,
        embed_dim=settings.embed_dim,
        depths=list(settings.depths),
        num_heads=list(settings.num_heads),
        window_size=settings.window_size,
        mlp_ratio=settings.mlp_ratio,
        drop_path_rate=settings.drop_path_rate,
        stdnorm=settings.stdnorm,
        img_range=settings.img_range,
        norm_layer=block_norm,
        outer_norm_layer=outer_norm,
        fast=fast,
        in_chans=settings.in_chans,
        attention=attention,
    )
    with torch.random.fork_rng(devices=[]):  # construction-time draws are replaced below
        if settings.hat is not None:
            model: nn.Module = HAT(**asdict(settings.hat), **shared)
        elif settings.drct is not None:
            model = DRCT(gc=settings.drct.gc, **shared)
        else:
            model = SwinIR(img_size=settings.swinir.img_size, **shared)
    common.init_weights(model, generator)
    model.settings = settings
    return model
