"""Typed, strict view of params.yaml.

The file is parsed once into frozen dataclasses. Every problem is reported with the dotted
key it concerns (``runs.ln_x2.norm``), and nothing is coerced silently: YAML 1.1 reads
``2e-4`` as a string, which here is an error that says how to write it instead.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from iln.data.catalog import SETS, expand, parts_of
from iln.data.params import DataParams, DegradeParams, RealSRParams, parse_task
from iln.layout import PrecisionMode, check_run_name


class ParamsError(ValueError):
    """A params file does not have the expected shape; the message names the key."""


BASELINE = "bicubic"  # the interpolation baseline's name, beside the runs and released entries


# --------------------------------------------------------------------------- parsing

INT_LIMIT = 2**63  # every integer must fit a signed 64-bit int (seeds, counts)

_FLOAT_STRING = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse(cls: type, mapping: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``mapping``; unknown or missing keys and wrong types raise."""
    return _parse_value(cls, mapping, where)


def _parse_dataclass(cls: type, mapping: Any, where: str) -> Any:
    if not isinstance(mapping, Mapping):
        raise ParamsError(
            f"{where}: expected a mapping of {cls.__name__} fields, got {_describe(mapping)}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ParamsError(
            f"{_join(where, unknown[0])}: unknown key (valid keys under '{where or 'top level'}': "
            f"{', '.join(sorted(fields))})"
        )
    values = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name not in mapping:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{key}: missing required key")
            continue
        values[name] = _parse_value(hints[name], mapping[name], key)
    try:
        return cls(**values)
    except ParamsError:
        raise
    except (ValueError, TypeError) as err:
        raise ParamsError(f"{where}: {err}") from None


def _parse_value(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, where)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse_value(arg, value, where)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(
            errors[0] if len(errors) == 1 else f"{where}: {_describe(value)} fits none of {tp}"
        )
    if origin is Literal:
        if value not in args:
            raise ParamsError(
                f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ParamsError(f"{where}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(
            _parse_value(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))
        )
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(f"{where}: expected a mapping, got {_describe(value)}")
        key_tp, value_tp = args or (str, Any)
        return {
            _parse_value(key_tp, k, where): _parse_value(value_tp, v, _join(where, str(k)))
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {_describe(value)}")
        if not -INT_LIMIT <= value < INT_LIMIT:  # torch and numpy take 64-bit integers
            raise ParamsError(f"{where}: must be between -2**63 and 2**63 - 1, got {value}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_STRING.match(value.strip()):
            raise ParamsError(
                f"{where}: expected a number, got the string {value!r} "
                f"(YAML reads exponents without a dot as text: write {float(value):.1e})"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {_describe(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer past the float range
            number = math.inf
        if not math.isfinite(number):  # NaN passes every `<` check: refuse it here, once
            raise ParamsError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r}")  # a bug in this module


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


# --------------------------------------------------------------------------- schema

GROUPS = (
    "table1",
    "table2",
    "table3",
    "table4",
    "table6",
    "table8",
    "stdnorm",
    "seeds",
    "batch",
    "fig2",  # the depth / width grid (paper Fig. 2)
)


@dataclass(frozen=True)
class TrainParams:
    """Training defaults shared by every run (a run may override some of them)."""

    iterations: int
    batch_size: int
    lq_patch: int
    lr: float
    betas: tuple[float, float]
    milestones: tuple[int, ...]
    lr_gamma: float
    ema_decay: float
    grad_clip: float
    kld_weight: float  # weight of the feature KL regulariser (iln.kld), 0 = off
    seed: int
    checkpoint_every: int
    log_every: int
    probe_every: int
    probe_images: int
    probe_per_block: bool
    train_set: str
    amp: Literal["fp32", "bf16", "fp16"]  # fp32 = mixed precision off
    compile: bool
    device: str
    num_workers: int
    threads: int
    accumulate: int = 1  # micro-batches per process and step (same trajectory as 1)
    grad_checkpoint: bool = False  # recompute block activations in the backward pass
    tf32: bool = True  # TF32 matmuls/convolutions in fp32 CUDA training (no effect on CPU)
    cache_gib: float = 8.0  # host memory for decoded training images, per training process

    def __post_init__(self) -> None:
        for name in (
            "iterations",
            "batch_size",
            "lq_patch",
            "checkpoint_every",
            "log_every",
            "probe_images",
            "accumulate",
        ):
            if getattr(self, name) < 1:
                raise ParamsError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.probe_every < 0:
            raise ParamsError(f"train.probe_every: must be >= 0 (0 = off), got {self.probe_every}")
        if self.lr <= 0:
            raise ParamsError(f"train.lr: must be > 0, got {self.lr}")
        if self.cache_gib < 0:
            raise ParamsError(f"train.cache_gib: must be >= 0 (0 = no cache), got {self.cache_gib}")
        for name in ("seed", "num_workers", "threads"):
            if getattr(self, name) < 0:
                raise ParamsError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ParamsError(f"train.betas[{i}]: must be in [0, 1), got {beta}")
        if self.lr_gamma <= 0:
            raise ParamsError(f"train.lr_gamma: must be > 0, got {self.lr_gamma}")
        if self.milestones and self.milestones[0] < 1:
            raise ParamsError(f"train.milestones: must be >= 1, got {list(self.milestones)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ParamsError(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if list(self.milestones) != sorted(self.milestones):
            raise ParamsError(f"train.milestones: must be increasing, got {list(self.milestones)}")
        if self.grad_clip < 0:
            raise ParamsError(f"train.grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        if self.kld_weight < 0:
            raise ParamsError(f"train.kld_weight: must be >= 0 (0 = off), got {self.kld_weight}")
        if self.device not in ("auto", "cpu") and not re.match(r"^cuda(:\d+)?$|^mps$", self.device):
            raise ParamsError(
                f"train.device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}"
            )


@dataclass(frozen=True)
class InitSpec:
    """Where a run's initial weights come from, instead of a fresh initialisation: the EMA
    weights of another run of the grid (``run``; DVC trains it first), or a BasicSR-format
    file (``weights``, relative to the project root, its tensors under ``key``). Every tensor
    of the same name and shape is carried over; the others keep their fresh values."""

    run: str | None = None
    weights: str | None = None
    key: Literal["params_ema", "params"] = "params_ema"

    def __post_init__(self) -> None:
        if (self.run is None) == (self.weights is None):
            raise ParamsError(
                "init: give exactly one of run (a run name) or weights (a checkpoint file)"
            )


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model a run or a released entry declares: the network (``arch``, ``norm``), the
    task it restores and the model settings it overrides (``stdnorm`` and ``affine_outer``
    by name, the rest under ``model``; ``iln.models.resolve_hparams`` fills in the others)."""

    arch: str
    norm: str
    task: str
    stdnorm: bool | None = None
    affine_outer: bool | None = None
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> int:
        """Upscaling factor implied by the task (1 for same-size restoration)."""
        return parse_task(self.task).scale

    def model_overrides(self) -> dict[str, Any]:
        """The keyword arguments of ``iln.models.build_model`` beyond arch, norm and scale."""
        overrides = dict(self.model)
        if self.stdnorm is not None:
            overrides["stdnorm"] = self.stdnorm
        if self.affine_outer is not None:
            overrides["affine_outer"] = self.affine_outer
        return overrides

    def hparams(self) -> dict[str, Any]:
        """Every hyperparameter of the network (ValueError for overrides it does not take)."""
        from iln.models import resolve_hparams  # torch-heavy import only when asked

        return resolve_hparams(
            self.arch, norm=self.norm, scale=self.scale, **self.model_overrides()
        )


@dataclass(frozen=True, kw_only=True)
class RunSpec(ModelSpec):
    """One member of the experiment grid. Unset fields take the ``train`` defaults."""

    groups: tuple[str, ...] = ()
    iterations: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    milestones: tuple[int, ...] | None = None
    grad_clip: float | None = None
    kld_weight: float | None = None
    seed: int | None = None
    train_set: str | None = None  # e.g. Rain13K for derain in a grid whose default is DF2K
    accumulate: int | None = None
    grad_checkpoint: bool | None = None
    init: InitSpec | None = None  # initial weights from another run or a file


@dataclass(frozen=True, kw_only=True)
class ReleasedSpec(ModelSpec):
    """A released checkpoint evaluated and analysed like a trained run, never trained.

    ``weights``: a BasicSR-format file (a dict with ``params`` and/or ``params_ema``),
    inside the project (a path relative to its root, or an absolute one within it);
    ``key``: which of the two to load.
    """

    weights: str
    key: Literal["params_ema", "params"] = "params_ema"


@dataclass(frozen=True)
class EvaluateParams:
    sets: tuple[str, ...]
    tile: int
    tile_overlap: int
    samples: int
    precision_modes: tuple[PrecisionMode, ...]
    precision_crop: int  # LR size of the central crop used for the precision table, 0 = whole image
    device: str
    workers: int = 0  # processes sharing the images (iln.pool), 0 = one per core
    self_ensemble: bool = False  # also score the x8 self-ensemble (psnr_x8, ssim_x8, ...)

    def __post_init__(self) -> None:
        if not self.sets:
            raise ParamsError("evaluate.sets: list at least one test set")
        for name in ("tile", "tile_overlap", "samples", "precision_crop", "workers"):
            if getattr(self, name) < 0:
                raise ParamsError(f"evaluate.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ReportParams:
    sets: tuple[str, ...]


@dataclass(frozen=True)
class TrackingParams:
    experiment: str

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise ParamsError("tracking.experiment: must be a non-empty name")


@dataclass(frozen=True)
class Params:
    data: DataParams
    degrade: DegradeParams
    train: TrainParams
    runs: dict[str, RunSpec]
    evaluate: EvaluateParams
    report: ReportParams
    tracking: TrackingParams
    released: dict[str, ReleasedSpec] = field(default_factory=dict)

    def run(self, name: str) -> RunSpec:
        try:
            return self.runs[name]
        except KeyError:
            raise ParamsError(
                f"runs.{name}: no such run (declared runs: {', '.join(sorted(self.runs))})"
            ) from None

    def test_sets(self, task: str) -> tuple[str, ...]:
        """The sets of ``evaluate.sets`` that the degrade stage makes pairs of for ``task``."""
        made = self.degrade.sets_for(task)
        return tuple(s for s in self.evaluate.sets if s in made)


@dataclass(frozen=True)
class ResolvedRun:
    """A run with every training setting filled in: what ``iln.train.fit`` consumes."""

    name: str
    spec: RunSpec
    train: TrainParams
    jpeg_subsampling: str | None = None  # car_q / realsr runs: chroma of the on-the-fly JPEG
    realsr: RealSRParams | None = None  # realsr runs: the on-the-fly real-world degradation

    @property
    def scale(self) -> int:
        return self.spec.scale

    def model_overrides(self) -> dict[str, Any]:
        return self.spec.model_overrides()


# The `train:` keys a run may override for itself (RunSpec fields of the same name).
RUN_TRAIN_OVERRIDES: tuple[str, ...] = (
    "iterations",
    "batch_size",
    "lr",
    "milestones",
    "grad_clip",
    "kld_weight",
    "seed",
    "train_set",
    "accumulate",
    "grad_checkpoint",
)


def resolve_run(params: Params, name: str) -> ResolvedRun:
    spec = params.run(name)
    overrides = {
        key: getattr(spec, key) for key in RUN_TRAIN_OVERRIDES if getattr(spec, key) is not None
    }
    try:
        train = dataclasses.replace(params.train, **overrides)
    except ParamsError as err:
        message = str(err)
        for key in overrides:  # name the run's own key when its override is the bad value
            if message.startswith(f"train.{key}"):
                raise ParamsError(f"runs.{name}.{key}{message[len(f'train.{key}') :]}") from None
        raise ParamsError(f"runs.{name}: {message}") from None
    kind = parse_task(spec.task).kind
    return ResolvedRun(
        name=name,
        spec=spec,
        train=train,
        jpeg_subsampling=params.degrade.jpeg_subsampling if kind in ("car", "realsr") else None,
        realsr=params.degrade.realsr if kind == "realsr" else None,
    )


# --------------------------------------------------------------------------- checks


def _check_name(name: str, where: str) -> None:
    """A run or released entry names folders and stage arguments (``iln.layout``)."""
    try:
        check_run_name(name, where)
    except ValueError as err:
        raise ParamsError(str(err)) from None


def _check_model(params: Params, name: str, spec: ModelSpec, where: str) -> None:
    """What a run and a released entry share: a valid name, a known arch and norm, a task
    the degrade stage produces, overrides that build (``ModelSpec.hparams``) with an
    evaluation tile that fits the window, and a grey model only on grey test sets."""
    from iln.models import ARCHS, NORMS  # torch-heavy import only when params are loaded

    _check_name(name, where)
    if spec.arch not in ARCHS:
        raise ParamsError(
            f"{where}.arch: unknown arch {spec.arch!r} (choose from {', '.join(ARCHS)})"
        )
    if spec.norm not in NORMS:
        raise ParamsError(
            f"{where}.norm: unknown norm {spec.norm!r} (choose from {', '.join(NORMS)})"
        )
    try:
        parse_task(spec.task, f"{where}.task")
    except ValueError as err:
        raise ParamsError(str(err)) from None
    if spec.task not in params.degrade.tasks:
        raise ParamsError(
            f"{where}.task: {spec.task!r} is not produced by the degrade stage "
            f"(degrade.tasks: {', '.join(params.degrade.tasks)})"
        )
    for key in ("stdnorm", "affine_outer"):
        if key in spec.model:
            raise ParamsError(f"{where}.model.{key}: set it as {where}.{key}, not under model")
    try:
        hp = spec.hparams()
    except ValueError as err:
        raise ParamsError(f"{where}.model: {err}") from None
    colour = [n for n in params.test_sets(spec.task) if n in SETS and not SETS[n].grey]
    if hp["in_chans"] == 1 and colour:
        raise ParamsError(
            f"{where}.model.in_chans: a grey model is scored on grey sets only (Set12, BSD68, "
            f"Classic5); {', '.join(colour)} are colour (set degrade.task_sets.{spec.task})"
        )
    _check_tile(params.evaluate, hp["window_size"], where)


def _check_runs(params: Params) -> None:
    if not params.runs and not params.released:
        raise ParamsError("runs: declare at least one run (or a `released:` entry)")
    made = {s for task in params.degrade.tasks for s in params.degrade.sets_for(task)}
    for name in params.evaluate.sets:  # each test set is scored for the tasks that make it
        if name not in made:
            raise ParamsError(
                f"evaluate.sets: {name!r} is not a set the degrade stage makes for any task "
                f"(degrade.sets, degrade.task_sets: {', '.join(sorted(made))})"
            )
    for name, spec in params.runs.items():
        where = f"runs.{name}"
        if name == BASELINE:
            raise ParamsError(f"{where}: 'bicubic' is reserved for the interpolation baseline")
        if spec.model.get("in_chans", 3) != 3:
            raise ParamsError(
                f"{where}.model.in_chans: grey models are evaluated (released entries, iln "
                f"restore) but not trained here yet; training takes RGB (in_chans 3)"
            )
        _check_model(params, name, spec, where)
        _check_run_data(params, where, spec, parse_task(spec.task).kind)
        for group in spec.groups:
            if group not in GROUPS:
                raise ParamsError(
                    f"{where}.groups: unknown group {group!r} (choose from {', '.join(GROUPS)})"
                )
        if spec.init is not None:
            _check_init(params, name, spec.init)
        resolve_run(params, name)
    unknown = [s for s in params.report.sets if s not in params.evaluate.sets]
    if unknown:
        raise ParamsError(
            f"report.sets: {unknown[0]!r} is not evaluated (evaluate.sets: "
            f"{', '.join(params.evaluate.sets)})"
        )


def _check_init(params: Params, name: str, init: InitSpec) -> None:
    """``runs.NAME.init``: the source run exists, is not the run itself and no chain of
    inits loops back; a weights file is named."""
    where = f"runs.{name}.init"
    if init.weights is not None:
        if not init.weights.strip():
            raise ParamsError(f"{where}.weights: give the path of the checkpoint file")
        return
    names = list(params.runs)
    if init.run in params.runs and names.index(init.run) > names.index(name):
        raise ParamsError(
            f"{where}.run: declare {init.run} before {name} under runs: (dvc repro trains "
            "the runs in the order they are declared, and its weights must exist first)"
        )
    seen = [name]
    source = init.run
    while source is not None:
        if source not in params.runs:
            raise ParamsError(
                f"{where}.run: no such run {source!r} (declared runs: "
                f"{', '.join(sorted(params.runs))})"
            )
        if source in seen:
            raise ParamsError(f"{where}.run: the inits loop ({' -> '.join([*seen, source])})")
        seen.append(source)
        following = params.runs[source].init
        source = following.run if following is not None else None


def _check_run_data(params: Params, where: str, spec: RunSpec, kind: str) -> None:
    """The run's training images and test pairs are produced by the download / degrade stages."""
    train_set = spec.train_set or params.train.train_set
    key = f"{where}.train_set" if spec.train_set else "train.train_set"
    if kind in ("dn", "car", "realsr"):  # clean images, degraded on the fly
        try:
            missing = [p for p in parts_of(train_set) if p not in expand(params.data.datasets)]
        except ValueError as err:
            raise ParamsError(f"{key}: {err}") from None
        if missing:
            raise ParamsError(
                f"{key}: {spec.task} trains on the clean images of {train_set!r}, but the "
                f"download stage does not fetch {', '.join(missing)} (data.datasets)"
            )
    elif train_set not in params.degrade.sets_for(spec.task):
        raise ParamsError(
            f"{key}: {spec.task} trains on the degrade stage's pairs of {train_set!r}, which it "
            f"does not make (degrade sets for {spec.task}: "
            f"{', '.join(params.degrade.sets_for(spec.task))})"
        )
    if not params.test_sets(spec.task):
        raise ParamsError(
            f"{where}.task: none of evaluate.sets ({', '.join(params.evaluate.sets)}) is degraded "
            f"for {spec.task} "
            f"(degrade sets for it: {', '.join(params.degrade.sets_for(spec.task))})"
        )


def _check_released(params: Params) -> None:
    for name, spec in params.released.items():
        where = f"released.{name}"
        if name == BASELINE or name in params.runs:
            raise ParamsError(
                f"{where}: the name is taken by "
                + ("the interpolation baseline" if name == BASELINE else f"runs.{name}")
                + " (released entries share the runs/<name>/ folders)"
            )
        if not re.match(r"^(sr_x[234]|dn_s\d+|car_q\d+)$", spec.task):
            raise ParamsError(
                f"{where}.task: expected sr_x2, sr_x3, sr_x4, dn_s<sigma> or car_q<quality> (the "
                f"released HAT and SwinIR checkpoints), got {spec.task!r}"
            )
        _check_model(params, name, spec, where)
        if not spec.weights.strip():
            raise ParamsError(f"{where}.weights: give the path of the checkpoint file")


# Keys whose value is a number of threads or processes: at most this many per core.
PER_CORE_KEYS = ("train.threads", "train.num_workers", "data.workers", "degrade.workers")
PER_CORE_LIMIT = 4
YAML_NODE_LIMIT = 100_000  # values after expanding aliases: far above any real params file


def _check_per_core(params: Params, cores: int) -> None:
    """Thread and process counts within ``PER_CORE_LIMIT`` x the machine's cores (torch
    crashes on a thread count far past them)."""
    limit = PER_CORE_LIMIT * cores
    for key in PER_CORE_KEYS:
        value: Any = params
        for part in key.split("."):
            value = getattr(value, part)
        if value > limit:
            raise ParamsError(
                f"{key}: must be <= {limit} ({PER_CORE_LIMIT} x the {cores} cores of this "
                f"machine), got {value}"
            )


def _check_tile(settings: EvaluateParams, window: int, where: str) -> None:
    if settings.tile and settings.tile % window:
        raise ParamsError(
            f"evaluate.tile: must be 0 (whole images) or a multiple of the window size "
            f"{window} of {where}, got {settings.tile}"
        )
    if settings.tile and settings.tile_overlap >= settings.tile:
        raise ParamsError(
            f"evaluate.tile_overlap: must be < evaluate.tile={settings.tile}, "
            f"got {settings.tile_overlap}"
        )


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, refusing what ``yaml.safe_load`` would accept silently: a key given
    twice in one mapping (the last value would win) and aliases expanding past
    ``YAML_NODE_LIMIT`` values. Errors name the file, the dotted key and the line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: unreadable ({err})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            return None
        _check_nodes(root, path)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None


def _check_nodes(root: yaml.Node, path: Path) -> None:
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    seen = 0
    while stack:
        node, where = stack.pop()
        seen += 1
        if seen > YAML_NODE_LIMIT:
            raise ParamsError(
                f"{path}: more than {YAML_NODE_LIMIT} values once its aliases (&name / *name) "
                f"are expanded; write the values out"
            )
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value)
                line = key_node.start_mark.line + 1
                if isinstance(key_node, yaml.ScalarNode) and key in first:
                    raise ParamsError(
                        f"{path}:{line}: {_join(where, key)}: duplicate key (first given at "
                        f"line {first[key]}); keep one"
                    )
                first[key] = line
                stack.append((value_node, _join(where, key)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node.value))


def load_params(path: str | Path, *, cores: int | None = None) -> Params:
    """Read and validate a params file; every error names the file and the key.

    cores: the machine's CPU cores, which bound thread and process counts (default: this
    machine's, ``os.cpu_count()``)."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        params = parse(Params, raw, "")
        _check_runs(params)
        _check_released(params)
        _check_per_core(params, cores or os.cpu_count() or 1)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    return params


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a (nested) dataclass or mapping, for logging as tracking params."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, _join(prefix, str(key))))
        return out
    return {prefix: obj}
