"""What the evaluate and analyze stages work on: a trained run (``runs:``), a released
checkpoint (``released:``) or the interpolation baseline (``bicubic``), found by its name in
one place, and the model of a trained or released one opened in one place. The evaluate and
analyze stages open models; the report reads the subjects' folders, so this module imports no
torch until a model is opened."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from iln.config.params import BASELINE, ModelSpec, Params, ParamsError, ReleasedSpec, RunSpec
from iln.config.layout import Layout

if TYPE_CHECKING:
    import torch

    from iln.models.restorer import WindowedRestorer
    from iln.weights.released import WeightsRecord
    from iln.weights.trained import Weights

Kind = Literal["trained", "released", "baseline"]


@dataclass(frozen=True)
class Subject:
    """One name a stage is run for. ``spec``: the declared model (a ``RunSpec`` for a
    trained run, a ``ReleasedSpec`` for a released entry), None for the baseline."""

    name: str
    kind: Kind
    spec: ModelSpec | None

    @property
    def precision_table(self) -> bool:
        """Whether the evaluate stage measures the inference-precision table: for every
        released entry and for the runs of group table4, never for the baseline."""
        if isinstance(self.spec, RunSpec):
            return "table4" in self.spec.groups
        return isinstance(self.spec, ReleasedSpec)


def find_subject(params: Params, name: str) -> Subject:
    """The run, released entry or baseline called ``name``; ParamsError if there is none."""
    if name == BASELINE:
        return Subject(name, "baseline", None)
    if name in params.runs:
        return Subject(name, "trained", params.runs[name])
    if name in params.released:
        return Subject(name, "released", params.released[name])
    raise ParamsError(
        f"{name!r}: no such run, released entry or baseline (runs: "
        f"{', '.join(sorted(params.runs)) or 'none'}; released: "
        f"{', '.join(sorted(params.released)) or 'none'}; the baseline: {BASELINE})"
    )


def subjects(params: Params) -> list[Subject]:
    """Every trained run, then every released entry, in the order params.yaml declares them
    (the baseline, which has no folder of its own to report on, is not one of them)."""
    return [find_subject(params, name) for name in [*params.runs, *params.released]]


@dataclass(frozen=True)
class OpenedModel:
    """A subject's network on its device in eval mode, with what the tracking records of it:
    ``recipe`` (arch, norm, scale, overrides: how it was built) and, for a released entry,
    ``weights`` (the file and its SHA-256)."""

    model: WindowedRestorer
    recipe: dict[str, Any]
    weights: WeightsRecord | None = None

    @property
    def tags(self) -> dict[str, str] | None:
        """Tracking tags: a released entry and the SHA-256 of its file (None for a run)."""
        if self.weights is None:
            return None
        return {"iln.released": "true", "iln.weights_sha256": self.weights.sha256}


def open_model(
    subject: Subject, layout: Layout, device: torch.device, *, weights: Weights = "ema"
) -> OpenedModel:
    """The model of a trained run (its ``weights``: the EMA or the trained ones, from
    ``layout.weights``) or of a released entry (the file checked against and pinned in
    ``layout.weights_book``; it has only the one set of weights its ``key`` names)."""
    from iln.weights.released import open_released  # torch: only once a model is opened
    from iln.weights.trained import load_trained

    spec = subject.spec
    if subject.kind == "trained":
        model, recipe = load_trained(layout.weights(subject.name), device, weights=weights)
        return OpenedModel(model, recipe)
    if isinstance(spec, ReleasedSpec):
        if weights != "ema":
            raise ValueError(
                f"released.{subject.name}: a released checkpoint has no {weights} weights "
                f"(it holds the ones released.{subject.name}.key names)"
            )
        model, record = open_released(
            spec, subject.name, root=layout.root, book=layout.weights_book, device=device
        )
        recipe = {
            "arch": spec.arch,
            "norm": spec.norm,
            "scale": spec.scale,
            "overrides": spec.model_overrides(),
        }
        return OpenedModel(model, recipe, record)
    raise ParamsError(f"{subject.name}: the interpolation baseline has no model")
