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
from iln.data.params import DataParams, DegradeParams, RealSRParams, check_min, parse_task
from iln.config.layout import PrecisionMode, check_run_name


class ParamsError(ValueError):
    """A params file does not have the expected shape; the message names the key."""


BASELINE = "bicubic"  # the interpolation baseline's name, beside the runs and released entries


# --------------------------------------------------------------------------- parsing

INT_LIMIT = 2**63  # every integer must fit a signed 64-bit int (seeds, counts)

_FLOAT_STRING = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


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
        values[name] = parse(hints[name], mapping[name], key)
    try:
        return cls(**values)
    except ParamsError:
        raise
    except (ValueError, TypeError) as err:
        raise ParamsError(f"{where}: {err}") from None


def parse(tp: Any, value: Any, where: str) -> Any:
    """``value`` read as type ``tp`` (a dataclass: from a mapping); unknown or missing keys
    and wrong types raise a ParamsError naming ``where``, the dotted key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, where)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):  # X | None, the only unions here
        if value is None:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return parse(inner, value, where)
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
            return tuple(parse(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ParamsError(f"{where}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(parse(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(f"{where}: expected a mapping, got {_describe(value)}")
        key_tp, value_tp = args
        return {
            parse(key_tp, k, where): parse(value_tp, v, _join(where, str(k)))
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

# The groups a run may belong to (fig2: the depth / width grid of the paper's Fig. 2).
GROUPS = (
    "table1", "table2", "table3", "table4", "table6", "table8", "stdnorm", "seeds", "batch",
    "fig2",
)  # fmt: skip


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
    kld_weight: float  # weight of the feature KL regulariser (iln.training.kld), 0 = off
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
        try:
            check_min(self, ("seed", "num_workers", "threads"), 0)
            check_min(self, ("probe_every", "grad_clip", "kld_weight"), 0, note="0 = off")
            check_min(self, ("cache_gib",), 0, note="0 = no cache")
            check_min(self, ("lr", "lr_gamma"), 0, strict=True)
            check_min(self, ("iterations", "batch_size", "lq_patch", "accumulate"), 1)
            check_min(self, ("checkpoint_every", "log_every", "probe_images"), 1)
            for i, beta in enumerate(self.betas):
                if not 0.0 <= beta < 1.0:
                    raise ValueError(f"betas[{i}]: must be in [0, 1), got {beta}")
            if not 0.0 <= self.ema_decay < 1.0:
                raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
            if self.milestones and self.milestones[0] < 1:
                raise ValueError(f"milestones: must be >= 1, got {list(self.milestones)}")
            if list(self.milestones) != sorted(self.milestones):
                raise ValueError(f"milestones: must be increasing, got {list(self.milestones)}")
            if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
                raise ValueError(
                    f"device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}"
                )
        except ValueError as err:
            raise ParamsError(f"train.{err}") from None


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
            raise ValueError("give exactly one of run (a run name) or weights (a checkpoint file)")


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
    workers: int = 0  # processes sharing the images (iln.util.pool), 0 = one per core
    self_ensemble: bool = False  # also score the x8 self-ensemble (psnr_x8, ssim_x8, ...)

    def __post_init__(self) -> None:
        if not self.sets:
            raise ParamsError("evaluate.sets: list at least one test set")
        try:
            check_min(self, ("tile", "tile_overlap", "samples", "precision_crop", "workers"), 0)
        except ValueError as err:
            raise ParamsError(f"evaluate.{err}") from None


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

    def test_sets(self, task: str) -> tuple[str, ...]:
        """The sets of ``evaluate.sets`` that the degrade stage makes pairs of for ``task``."""
        made = self.degrade.sets_for(task)
        return tuple(s for s in self.evaluate.sets if s in made)


@dataclass(frozen=True)
class ResolvedRun:
    """A run with every training setting filled in: what ``iln.training.loop.fit`` consumes."""

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
    "iterations", "batch_size", "lr", "milestones", "grad_clip", "kld_weight", "seed",
    "train_set", "accumulate", "grad_checkpoint",
)  # fmt: skip


def resolve_run(params: Params, name: str) -> ResolvedRun:
    if name not in params.runs:
        declared = ", ".join(sorted(params.runs))
        raise ParamsError(f"runs.{name}: no such run (declared runs: {declared})")
    spec = params.runs[name]
    overrides = {key: getattr(spec, key) for key in RUN_TRAIN_OVERRIDES}
    try:
        train = dataclasses.replace(
            params.train, **{k: v for k, v in overrides.items() if v is not None}
        )
    except ParamsError as err:  # every check is of one field: an override, as train passed
        raise ParamsError(f"runs.{name}.{str(err).removeprefix('train.')}") from None
    kind = parse_task(spec.task).kind
    return ResolvedRun(
        name=name,
        spec=spec,
        train=train,
        jpeg_subsampling=params.degrade.jpeg_subsampling if kind in ("car", "realsr") else None,
        realsr=params.degrade.realsr if kind == "realsr" else None,
    )


# --------------------------------------------------------------------------- checks
# They raise ValueError naming the dotted key; load_params adds the file.


def check_tile(
    tile: int,
    overlap: int,
    window: int,
    *,
    keys: tuple[str, str] = ("tile", "tile_overlap"),
    model: str = "the model",
) -> None:
    """The tiling of ``iln.evaluation.inference.restore`` (input pixels) for a model of attention window
    ``window``: 0 = whole images, else a multiple of the window, with an overlap below the
    tile. ``keys`` name the two settings in the ValueError, ``model`` the model."""
    for key, value in zip(keys, (tile, overlap)):
        if value < 0:
            raise ValueError(f"{key}: must be >= 0, got {value}")
    if tile % window:
        raise ValueError(
            f"{keys[0]}: must be 0 (whole images) or a multiple of the window size {window} "
            f"of {model}, got {tile}"
        )
    if tile and overlap >= tile:
        raise ValueError(f"{keys[1]}: must be < {keys[0]}={tile}, got {overlap}")


def _check_model(params: Params, name: str, spec: ModelSpec, where: str) -> None:
    """What a run and a released entry share: a valid name, a known arch and norm, a task
    the degrade stage produces, overrides that build (``iln.models.resolve_hparams``) with
    an evaluation tile that fits the window, and a grey model only on grey test sets."""
    from iln.models import ARCHS, NORMS, resolve_hparams  # torch-heavy: only at load

    check_run_name(name, where)
    for key, value, known in (("arch", spec.arch, ARCHS), ("norm", spec.norm, NORMS)):
        if value not in known:
            raise ValueError(
                f"{where}.{key}: unknown {key} {value!r} (choose from {', '.join(known)})"
            )
    parse_task(spec.task, f"{where}.task")
    if spec.task not in params.degrade.tasks:
        raise ValueError(
            f"{where}.task: {spec.task!r} is not produced by the degrade stage "
            f"(degrade.tasks: {', '.join(params.degrade.tasks)})"
        )
    for key in ("stdnorm", "affine_outer"):
        if key in spec.model:
            raise ValueError(f"{where}.model.{key}: set it as {where}.{key}, not under model")
    try:
        hp = resolve_hparams(spec.arch, norm=spec.norm, scale=spec.scale, **spec.model_overrides())
    except ValueError as err:
        raise ValueError(f"{where}.model: {err}") from None
    colour = [n for n in params.test_sets(spec.task) if n in SETS and not SETS[n].grey]
    if hp["in_chans"] == 1 and colour:
        raise ValueError(
            f"{where}.model.in_chans: a grey model is scored on grey sets only (Set12, BSD68, "
            f"Classic5); {', '.join(colour)} are colour (set degrade.task_sets.{spec.task})"
        )
    settings = params.evaluate
    keys = ("evaluate.tile", "evaluate.tile_overlap")
    check_tile(settings.tile, settings.tile_overlap, hp["window_size"], keys=keys, model=where)


def _check_runs(params: Params) -> None:
    if not params.runs and not params.released:
        raise ValueError("runs: declare at least one run (or a `released:` entry)")
    made = {s for task in params.degrade.tasks for s in params.degrade.sets_for(task)}
    for name in params.evaluate.sets:  # each test set is scored for the tasks that make it
        if name not in made:
            raise ValueError(
                f"evaluate.sets: {name!r} is not a set the degrade stage makes for any task "
                f"(degrade.sets, degrade.task_sets: {', '.join(sorted(made))})"
            )
    unknown = [s for s in params.report.sets if s not in params.evaluate.sets]
    if unknown:
        raise ValueError(
            f"report.sets: {unknown[0]!r} is not evaluated (evaluate.sets: "
            f"{', '.join(params.evaluate.sets)})"
        )
    for name, spec in params.runs.items():
        where = f"runs.{name}"
        if name == BASELINE:
            raise ValueError(f"{where}: 'bicubic' is reserved for the interpolation baseline")
        if spec.model.get("in_chans", 3) != 3:
            raise ValueError(
                f"{where}.model.in_chans: grey models are evaluated (released entries, iln "
                f"restore) but not trained here yet; training takes RGB (in_chans 3)"
            )
        _check_model(params, name, spec, where)
        _check_run_data(params, where, spec)
        for group in spec.groups:
            if group not in GROUPS:
                raise ValueError(
                    f"{where}.groups: unknown group {group!r} (choose from {', '.join(GROUPS)})"
                )
        if spec.init is not None:
            _check_init(params, name, spec.init)
        resolve_run(params, name)


def _check_init(params: Params, name: str, init: InitSpec) -> None:
    """``runs.NAME.init``: a weights file is named, or the source run is declared before
    this one (so no chain of inits loops back)."""
    where = f"runs.{name}.init"
    if init.weights is not None:
        if not init.weights.strip():
            raise ValueError(f"{where}.weights: give the path of the checkpoint file")
        return
    names = list(params.runs)
    if init.run not in params.runs:
        raise ValueError(
            f"{where}.run: no such run {init.run!r} (declared runs: {', '.join(sorted(names))})"
        )
    if init.run == name:
        raise ValueError(f"{where}.run: the inits loop ({name} -> {name})")
    if names.index(init.run) > names.index(name):
        raise ValueError(
            f"{where}.run: declare {init.run} before {name} under runs: (dvc repro trains "
            "the runs in the order they are declared, and its weights must exist first)"
        )


def _check_run_data(params: Params, where: str, spec: RunSpec) -> None:
    """The run's training images and test pairs are produced by the download / degrade stages."""
    train_set = spec.train_set or params.train.train_set
    key = f"{where}.train_set" if spec.train_set else "train.train_set"
    made = params.degrade.sets_for(spec.task)
    if parse_task(spec.task).kind in ("dn", "car", "realsr"):  # clean images, degraded on the fly
        try:
            missing = [p for p in parts_of(train_set) if p not in expand(params.data.datasets)]
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
        if missing:
            raise ValueError(
                f"{key}: {spec.task} trains on the clean images of {train_set!r}, but the "
                f"download stage does not fetch {', '.join(missing)} (data.datasets)"
            )
    elif train_set not in made:
        raise ValueError(
            f"{key}: {spec.task} trains on the degrade stage's pairs of {train_set!r}, which it "
            f"does not make (degrade sets for {spec.task}: {', '.join(made)})"
        )
    if not params.test_sets(spec.task):
        raise ValueError(
            f"{where}.task: none of evaluate.sets ({', '.join(params.evaluate.sets)}) is degraded "
            f"for {spec.task} (degrade sets for it: {', '.join(made)})"
        )


def _check_released(params: Params) -> None:
    for name, spec in params.released.items():
        where = f"released.{name}"
        if name == BASELINE or name in params.runs:
            taken = "the interpolation baseline" if name == BASELINE else f"runs.{name}"
            raise ValueError(
                f"{where}: the name is taken by {taken} (released entries share the "
                "runs/<name>/ folders)"
            )
        if not re.fullmatch(r"sr_x[234]|dn_s\d+|car_q\d+", spec.task):
            raise ValueError(
                f"{where}.task: expected sr_x2, sr_x3, sr_x4, dn_s<sigma> or car_q<quality> (the "
                f"released HAT and SwinIR checkpoints), got {spec.task!r}"
            )
        _check_model(params, name, spec, where)
        if not spec.weights.strip():
            raise ValueError(f"{where}.weights: give the path of the checkpoint file")


PER_CORE_LIMIT = 4  # threads or processes per core, at most


def _check_per_core(params: Params, cores: int) -> None:
    """Thread and process counts within ``PER_CORE_LIMIT`` x the machine's cores (torch
    crashes on a thread count far past them)."""
    limit = PER_CORE_LIMIT * cores
    counts = {
        "train.threads": params.train.threads,
        "train.num_workers": params.train.num_workers,
        "data.workers": params.data.workers,
        "degrade.workers": params.degrade.workers,
    }
    for key, value in counts.items():
        if value > limit:
            raise ValueError(
                f"{key}: must be <= {limit} ({PER_CORE_LIMIT} x the {cores} cores of this "
                f"machine), got {value}"
            )


# --------------------------------------------------------------------------- reading

YAML_NODE_LIMIT = 100_000  # values after expanding aliases: far above any real params file


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
        _check_nodes(root, path)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None


def _check_nodes(root: yaml.Node | None, path: Path) -> None:
    stack, seen = [(root, "")], 0
    while stack:
        node, where = stack.pop()
        seen += 1
        if seen > YAML_NODE_LIMIT:
            raise ParamsError(
                f"{path}: more than {YAML_NODE_LIMIT} values once its aliases (&name / *name) "
                f"are expanded; write the values out"
            )
        if isinstance(node, yaml.SequenceNode):
            stack += ((item, f"{where}[{i}]") for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}  # dotted key -> the line it is first given on
            for key_node, value_node in node.value:
                key, line = _join(where, str(key_node.value)), key_node.start_mark.line + 1
                if isinstance(key_node, yaml.ScalarNode) and key in lines:
                    raise ParamsError(
                        f"{path}:{line}: {key}: duplicate key (first given at line "
                        f"{lines[key]}); keep one"
                    )
                lines[key] = line
                stack.append((value_node, key))


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
    except ValueError as err:  # ParamsError, or a check's ValueError
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
