"""What ``iln export`` and ``iln import`` do: open a model by name (a run or released entry
of params.yaml, opened as evaluate opens it) or from a file, and write it in a format."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iln.export import ExportError, settings_of
from iln.weights.trained import Weights

CPU = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class Opened:
    """A model to export and what the safetensors metadata records of where it came from."""

    model: nn.Module
    provenance: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FileRecipe:
    """What a BasicSR or traiNNer-redux file does not record (a model.pt records all)."""

    arch: str | None = None
    norm: str | None = None
    scale: int | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    key: str | None = None


def open_named(name: str, params_path: Path, weights: Weights, recipe: FileRecipe) -> Opened:
    """``name``: a weights file (model.pt, a BasicSR .pth with ``recipe``, an iln .safetensors)
    or a run / released entry of ``params_path`` (its folder is the project root)."""
    path = Path(name)
    if path.is_file():
        if path.suffix == ".safetensors":
            from iln.export.safetensors import read_safetensors

            return Opened(read_safetensors(path), {"source": path.name})
        from iln.evaluation.batch_restore import load_model

        model = load_model(
            path,
            device=CPU,
            arch=recipe.arch,
            norm=recipe.norm,
            scale=recipe.scale,
            overrides=dict(recipe.overrides) or None,
            key=recipe.key,
        )
        return Opened(model, {"source": path.name})
    from iln.config.layout import Layout
    from iln.config.params import load_params, resolve_run
    from iln.weights.subject import find_subject, open_model

    params = load_params(params_path)
    subject = find_subject(params, name)
    opened = open_model(subject, Layout(params_path.resolve().parent), CPU, weights=weights)
    provenance: dict[str, Any] = {"name": name, "kind": subject.kind, "weights": weights}
    if subject.spec is not None:
        provenance["spec"] = dataclasses.asdict(subject.spec)
    if subject.kind == "trained":  # the training parameters as params.yaml resolves them now
        provenance["train"] = dataclasses.asdict(resolve_run(params, name).train)
    if opened.weights is not None:
        provenance["file"] = opened.weights.as_dict()
    return Opened(opened.model, provenance)


def export(
    opened: Opened, fmt: str, out: Path, *, precision: str = "fp32", allow_border: bool = False
) -> str:
    """Write ``opened`` as ``fmt`` to ``out``; a one-line summary of what was written."""
    if precision != "fp32" and fmt != "onnx":
        raise ExportError(f"--precision {precision}: only ONNX graphs have a number format")
    if allow_border and fmt != "redux":
        raise ExportError("--allow-border-difference is for --format redux only")
    model = opened.model.cpu().eval()
    hp = settings_of(model)
    what = f"{hp['arch']} {hp['norm']} x{hp['scale']}"
    if fmt == "basicsr":
        from iln.export.basicsr import write_basicsr

        count = write_basicsr(model, out)
        return f"wrote {out} ({what}, {count} tensors under params_ema, the released key names)"
    if fmt == "redux":
        from iln.export.redux import write_redux

        difference = write_redux(model, out, allow_border=allow_border)
        exact = "exact" if difference == 0 else f"outputs differ by up to {difference:.3g}"
        return f"wrote {out} (traiNNer-redux hat_iln of {what}, encoding folded: {exact})"
    if fmt == "safetensors":
        from iln.export.safetensors import write_safetensors

        count = write_safetensors(model, out, {"provenance": opened.provenance})
        return f"wrote {out} ({what}, {count} tensors, recipe in the metadata)"
    if fmt == "onnx":
        from iln.export.onnx import export_onnx

        export_onnx(model, out, precision=precision)
        return f"wrote {out} ({what}, ONNX {precision}, input 'image' (1, C, H, W) in [0, 1])"
    raise ExportError(f"unknown format {fmt!r}")


def import_file(source: Path, fmt: str, out: Path, recipe: FileRecipe) -> str:
    """Read ``source`` (``fmt``: safetensors or redux) and write it as a train-stage model.pt
    (``iln restore`` and ``iln export`` read it); a one-line summary."""
    from iln.weights.trained import save_trained

    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    if fmt == "safetensors":
        from iln.export.safetensors import read_safetensors

        model = read_safetensors(source)
    elif fmt == "redux":
        from iln.export.redux import read_redux

        if recipe.scale is not None:
            raise ExportError("--scale: a traiNNer-redux file's scale is read from its shapes")
        model = read_redux(source, arch=recipe.arch or "hat_1", norm=recipe.norm or "iln")
    else:
        raise ExportError(f"unknown import format {fmt!r}; expected safetensors or redux")
    hp = settings_of(model)
    overrides = {k: v for k, v in hp.items() if k not in ("arch", "norm", "scale", "family")}
    save_trained(
        out, model, arch=hp["arch"], norm=hp["norm"], scale=hp["scale"], overrides=overrides
    )
    note = ""
    if fmt == "redux":
        from iln.export.redux import border_difference, mean_folds_exactly

        gap = 0.0 if mean_folds_exactly(model) else border_difference(model)
        note = (
            f"; outputs differ from the redux model by up to {gap:.3g} (mean shift at the border)"
        )
    return f"wrote {out} ({hp['arch']} {hp['norm']} x{hp['scale']} from {fmt} {source.name}{note})"
