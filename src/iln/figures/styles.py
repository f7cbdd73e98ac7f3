"""One name and one colour per normalisation, used by every figure, table and MLflow run.

A fixed mapping (not a cycle of colours over whatever runs exist), so LN is the same red and
i-LN the same blue in every figure of every report and in the MLflow UI. Variants of a norm
(gradient clipping, KL regulariser, stdnorm switched) keep the norm's colour and change the
line style.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NormStyle:
    label: str  # the name printed in tables, legends and titles
    color: str  # hex RGB, also the MLflow run colour


NORM_STYLES: dict[str, NormStyle] = {
    "ln": NormStyle("LN", "#d62728"),
    "iln": NormStyle("i-LN", "#1f77b4"),
    "iln_clamp": NormStyle("i-LN (clamped)", "#00bfc4"),
    "ln_star": NormStyle("LN*", "#ff7f0e"),
    "ln_rs": NormStyle("LN+Rs", "#9467bd"),
    "instancenorm": NormStyle("InstanceNorm", "#2ca02c"),
    "rmsnorm": NormStyle("RMSNorm", "#8c564b"),
    "layerscale": NormStyle("LayerScale", "#e377c2"),
    "none": NormStyle("no norm", "#7f7f7f"),
    "rezero": NormStyle("ReZero", "#bcbd22"),
    "batchnorm": NormStyle("BN", "#17becf"),
    "batchnorm_train": NormStyle("BN (batch stats in eval)", "#393b79"),
    "dyt": NormStyle("DyT", "#637939"),
}
UNKNOWN_STYLE_COLOR = "#000000"
BASELINE_COLOR = "#b0b0b0"  # runs without a norm (the bicubic baseline, the report): light grey

# line styles of a norm's variants (matplotlib names)
LINE_PLAIN = "-"
LINE_GRAD_CLIP = "--"
LINE_KLD = ":"
LINE_STDNORM_SWITCHED = "-."


def norm_style(norm: str) -> NormStyle:
    """The norm's fixed style; an unknown norm keeps its key as the label, drawn in black."""
    return NORM_STYLES.get(norm, NormStyle(norm, UNKNOWN_STYLE_COLOR))


def norm_label(norm: str) -> str:
    return norm_style(norm).label


def norm_rank(norm: str) -> int:
    """Position in the fixed order above (unknown norms last)."""
    order = list(NORM_STYLES)
    return order.index(norm) if norm in order else len(order)
