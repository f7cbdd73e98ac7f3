"""Typed ``data:`` and ``degrade:`` sections of params.yaml.

Plain frozen dataclasses: the strict generic loader builds them, their ``__post_init__``
checks what only this layer knows (catalogue names, task names, scales). Errors are
``ValueError`` whose message starts with the offending key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from iln.data.archive import ExtractLimits
from iln.data.catalog import SETS, expand, unknown_name_error

TASK_RE = re.compile(r"^(?:sr_x(?P<scale>\d+)|dn_s(?P<sigma>\d+)|car_q(?P<quality>\d+)|derain)$")
SR_SCALES = (2, 3, 4)


@dataclass(frozen=True)
class TaskSpec:
    """A parsed task name: ``sr_x4`` -> kind "sr", scale 4."""

    name: str
    kind: Literal["sr", "dn", "car", "derain"]
    scale: int = 1
    sigma: int = 0
    quality: int = 0


def parse_task(name: str, where: str = "task") -> TaskSpec:
    match = TASK_RE.match(name)
    if not match:
        raise ValueError(
            f"{where}: unknown task {name!r} "
            "(sr_x2, sr_x3, sr_x4, dn_s<sigma>, car_q<quality>, derain)"
        )
    if match["scale"] is not None:
        scale = int(match["scale"])
        if scale not in SR_SCALES:
            raise ValueError(f"{where}: SR scale must be one of {SR_SCALES}, got {name!r}")
        return TaskSpec(name, "sr", scale=scale)
    if match["sigma"] is not None:
        sigma = int(match["sigma"])
        if not 1 <= sigma <= 255:
            raise ValueError(f"{where}: noise sigma must be in 1..255, got {name!r}")
        return TaskSpec(name, "dn", sigma=sigma)
    if match["quality"] is not None:
        quality = int(match["quality"])
        if not 1 <= quality <= 100:
            raise ValueError(f"{where}: JPEG quality must be in 1..100, got {name!r}")
        return TaskSpec(name, "car", quality=quality)
    return TaskSpec(name, "derain")


@dataclass(frozen=True)
class ExtractParams:
    """Bounds on what one downloaded archive may unpack to (a decompression bomb is refused)."""

    max_gib: float = 64.0  # total unpacked size; DF2K unpacks to ~12 GiB
    max_members: int = 200_000
    max_ratio: float = 50.0  # unpacked / archive size; image datasets unpack to about 1x

    def __post_init__(self) -> None:
        for key in ("max_gib", "max_members", "max_ratio"):
            if getattr(self, key) <= 0:
                raise ValueError(f"extract.{key}: must be > 0, got {getattr(self, key)}")

    def limits(self) -> ExtractLimits:
        return ExtractLimits(
            max_bytes=int(self.max_gib * 2**30),
            max_members=self.max_members,
            max_ratio=self.max_ratio,
        )


@dataclass(frozen=True)
class DataParams:
    """What the download stage fetches and where it keeps downloads."""

    datasets: tuple[str, ...]  # set or group names from iln.data.catalog
    local: dict[str, str] = field(
        default_factory=dict
    )  # set name -> folder (or archive) already on disk
    embedded_dir: str = "data/default"
    download_dir: str = (
        "data/downloads"  # archives and .part files (kept between runs, not a stage output)
    )
    checksums: str = "data/checksums.json"  # SHA-256 recorded at first download (commit it)
    workers: int = 0  # processes for normalising images; 0 = all cores
    extract: ExtractParams = field(default_factory=ExtractParams)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("datasets: list at least one dataset (e.g. default)")
        expand(self.datasets, "datasets")
        for name in self.local:
            if name not in SETS:
                raise unknown_name_error(name, f"local.{name}")
            if SETS[name].kind != "archive":
                raise ValueError(
                    f"local.{name}: only downloadable sets can be pointed at a local folder"
                )
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0 (0 = all cores), got {self.workers}")


@dataclass(frozen=True)
class SubImages:
    """Cut training images into overlapping tiles (the official 480 / step 240 on HR)."""

    sets: tuple[str, ...] = ()
    size: int = 480  # HR tile size; LR tiles are size / scale
    step: int = 240

    def __post_init__(self) -> None:
        for name in self.sets:
            if name not in SETS:
                raise unknown_name_error(name, "subimages.sets")
        if self.size < 1 or self.step < 1:
            raise ValueError(f"subimages: size and step must be >= 1, got {self.size}, {self.step}")
        for scale in SR_SCALES:
            if self.size % scale or self.step % scale:
                raise ValueError(
                    f"subimages: size {self.size} and step {self.step} must be divisible by "
                    f"every SR scale {SR_SCALES} so LR tiles stay aligned"
                )


@dataclass(frozen=True)
class DegradeParams:
    """Which (lq, gt) pairs the degrade stage writes: every task x every set."""

    tasks: tuple[str, ...]
    sets: tuple[str, ...]
    task_sets: dict[str, tuple[str, ...]] = field(
        default_factory=dict
    )  # per-task override of ``sets``
    seed: int = 0  # base of the per-image noise seeds
    workers: int = 0  # processes; 0 = all cores
    bicubic_rounding: Literal["once", "per_pass"] = "once"  # per_pass = MATLAB on uint8 input
    # yuv420 = 4:2:0 chroma subsampling. Written without colons: YAML 1.1 reads an unquoted
    # 4:2:0 as the base-60 integer 14520, and `dvc exp run -S` rewrites params.yaml unquoted.
    jpeg_subsampling: Literal["yuv420", "yuv444"] = "yuv420"
    png_compress_level: int = (
        1  # zlib level of written pairs: 1 is ~3x faster to write than 6, ~10% larger
    )
    subimages: SubImages = field(default_factory=SubImages)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: list at least one task (e.g. sr_x2)")
        for task in self.tasks:
            parse_task(task, f"tasks: {task}")
        for key, values in (
            ("tasks", self.tasks),
            ("sets", self.sets),
            *((f"task_sets.{t}", v) for t, v in self.task_sets.items()),
        ):
            if len(set(values)) != len(values):
                raise ValueError(
                    f"{key}: listed twice: {sorted({v for v in values if values.count(v) > 1})}"
                )
        for task in self.task_sets:
            if task not in self.tasks:
                raise ValueError(f"task_sets.{task}: not one of tasks ({', '.join(self.tasks)})")
        for task in self.tasks:
            where = f"task_sets.{task}" if task in self.task_sets else "sets"
            for name in self.sets_for(task):
                if name not in SETS:
                    raise unknown_name_error(name, where)
                if task == "derain" and not all(SETS[p].paired for p in _parts(name)):
                    paired = sorted(n for n, s in SETS.items() if s.paired)
                    raise ValueError(
                        f"{where}: derain needs a set with rainy inputs, got {name!r} "
                        f"(paired sets: {', '.join(paired)}; set task_sets.derain)"
                    )
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0 (0 = all cores), got {self.workers}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level: must be in 0..9, got {self.png_compress_level}")

    def sets_for(self, task: str) -> tuple[str, ...]:
        return tuple(self.task_sets.get(task, self.sets))


def _parts(name: str) -> tuple[str, ...]:
    spec = SETS[name]
    return spec.parts if spec.kind == "composite" else (name,)
