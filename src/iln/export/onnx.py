"""ONNX graphs of the whole restoration: an RGB (or grey) image in [0, 1] of any height and
width in, the restored image out. Reflect padding to the window (the same pixels as
``common.pad_to_multiple``), the shifted-window masks of the padded size, every whole-image
statistic (i-LN's mean and variance over the image) and the final crop are in the graph.

Exported with ``torch.onnx.export(dynamo=True)`` (``onnxscript``) from the reference path of
the network (``fast=False``: plain torch ops, the same function and weights as the fast path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from iln.export import ExportError, rebuild, require
from iln.util.files import atomic_path

OPSET = 18
ONNX_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
INPUT_NAME, OUTPUT_NAME = "image", "restored"
MIN_SIDE = 2  # reflection needs two pixels


def _reflect_index(side: int, padded: int, device: torch.device) -> Tensor:
    """Source row (or column) of each of ``padded`` rows: reflection about the borders,
    repeated when the padding is wider than the image (what ``pad_to_multiple`` does; the
    graph takes sides of 2 pixels or more)."""
    period = torch.ones((), dtype=torch.long, device=device) * (2 * side - 2)
    j = torch.remainder(torch.arange(padded, device=device), period)
    return torch.where(j < side, j, period - j)


class ImageToImage(nn.Module):
    """(B, C, H, W) in [0, 1] -> (B, C, s*H, s*W): pad, the network, crop (graph-friendly)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.window = int(model.window_size)
        self.scale = int(model.scale)

    def forward(self, image: Tensor) -> Tensor:
        h, w = image.shape[2], image.shape[3]
        ph = (h + self.window - 1) // self.window * self.window
        pw = (w + self.window - 1) // self.window * self.window
        x = image.index_select(2, _reflect_index(h, ph, image.device))
        x = x.index_select(3, _reflect_index(w, pw, image.device))
        return self.model(x)[:, :, : h * self.scale, : w * self.scale]


def export_onnx(model: nn.Module, path: Path, *, precision: str = "fp32") -> None:
    """Write ``model`` as an ONNX graph for one image (batch 1) of any height and width of
    ``MIN_SIDE`` pixels or more, in ``precision`` (its input and output too)."""
    require("onnx")
    require("onnxscript")  # torch.onnx's dynamo exporter
    if precision not in ONNX_DTYPES:
        raise ExportError(f"precision {precision!r}: expected one of {', '.join(ONNX_DTYPES)}")
    dtype = ONNX_DTYPES[precision]
    graph = ImageToImage(rebuild(model, fast=False)).to(dtype).eval()
    window = graph.window
    g = torch.Generator().manual_seed(0)
    example = torch.rand(1, graph.model.in_chans, window + 3, window + 1, generator=g).to(dtype)
    dim = torch.export.Dim
    shapes = {"image": {2: dim("height", min=MIN_SIDE), 3: dim("width", min=MIN_SIDE)}}
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes=shapes,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    with atomic_path(path) as tmp:
        program.save(str(tmp))


def onnx_session(path: Path) -> Any:
    """A CPU ``onnxruntime.InferenceSession`` of ``path``."""
    ort = require("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
