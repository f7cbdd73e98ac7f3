"""Typed ``data:`` and ``degrade:`` sections of params.yaml.

Plain frozen dataclasses: the strict generic loader builds them, their ``__post_init__``
checks what only this layer knows (catalogue names, task names, scales). Errors are
``ValueError`` whose message starts with the offending key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from iln.data.archive import ExtractLimits
from iln.data.catalog import SETS, expand, unknown_name_error

ON_THE_FLY = ("dn", "car", "realsr")  # task kinds whose lq is made from the clean patch

TASK_RE = re.compile(
    r"^(?:sr_x(?P<scale>\d+)|realsr_x(?P<real_scale>\d+)|dn_s(?P<sigma>\d+)"
    r"|car_q(?P<quality>\d+)|derain)$"
)
SR_SCALES = (2, 3, 4)
REALSR_SCALES = (4,)  # Real-ESRGAN's x4 recipe (train_realesrnet_x4plus.yml)


@dataclass(frozen=True)
class TaskSpec:
    """A parsed task name: ``sr_x4`` -> kind "sr", scale 4; ``realsr_x4`` -> kind "realsr"
    (real-world SR: the second-order degradation of ``iln.data.realsr``), scale 4."""

    name: str
    kind: Literal["sr", "realsr", "dn", "car", "derain"]
    scale: int = 1
    sigma: int = 0
    quality: int = 0


def parse_task(name: str, where: str = "task") -> TaskSpec:
    match = TASK_RE.match(name)
    if not match:
        raise ValueError(
            f"{where}: unknown task {name!r} "
            "(sr_x2, sr_x3, sr_x4, realsr_x4, dn_s<sigma>, car_q<quality>, derain)"
        )
    if match["real_scale"] is not None:
        scale = int(match["real_scale"])
        if scale not in REALSR_SCALES:
            raise ValueError(
                f"{where}: real-world SR scale must be one of {REALSR_SCALES}, got {name!r}"
            )
        return TaskSpec(name, "realsr", scale=scale)
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


def check_min(
    obj: object, names: Iterable[str], low: float, *, note: str = "", strict: bool = False
) -> None:
    """``NAME: must be >= LOW (NOTE), got VALUE`` (``> LOW`` when ``strict``) as a ValueError,
    for the first of the fields ``names`` of ``obj`` below ``low``."""
    for name in names:
        value = getattr(obj, name)
        if value < low or (strict and value == low):
            bound = f"{'>' if strict else '>='} {low}" + (f" ({note})" if note else "")
            raise ValueError(f"{name}: must be {bound}, got {value}")


@dataclass(frozen=True)
class ExtractParams:
    """Bounds on what one downloaded archive may unpack to (a decompression bomb is refused)."""

    max_gib: float = 64.0  # total unpacked size; DF2K unpacks to ~12 GiB
    max_members: int = 200_000
    max_ratio: float = 50.0  # unpacked / archive size; image datasets unpack to about 1x

    def __post_init__(self) -> None:
        check_min(self, ("max_gib", "max_members", "max_ratio"), 0, strict=True)

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
    # set name -> folder (or archive) already on disk
    local: dict[str, str] = field(default_factory=dict)
    embedded_dir: str = "data/default"
    # archives and .part files (kept between runs, not a stage output)
    download_dir: str = "data/downloads"
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
        check_min(self, ("workers",), 0, note="0 = all cores")


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
        check_min(self, ("size", "step"), 1)
        for scale in SR_SCALES:
            if self.size % scale or self.step % scale:
                raise ValueError(
                    f"subimages: size {self.size} and step {self.step} must be divisible by "
                    f"every SR scale {SR_SCALES} so LR tiles stay aligned"
                )


KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)


def _check_range(where: str, values: tuple[float, float], low: float, high: float) -> None:
    if not low <= values[0] <= values[1] <= high:
        raise ValueError(f"{where}: expected {low} <= min <= max <= {high}, got {list(values)}")


def _check_probs(where: str, probs: tuple[float, ...], count: int) -> None:
    if len(probs) != count or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"{where}: expected {count} probabilities >= 0 summing to 1, got {probs}")


@dataclass(frozen=True)
class RealSROrder:
    """One order of the real-world degradation: blur, random resize, noise, JPEG.

    Defaults are Real-ESRGAN's first order (train_realesrnet_x4plus.yml); ``RealSRParams``
    sets the second order's. Kernel sizes are drawn from the odd sizes 7..``kernel_size``;
    ``sinc_prob`` replaces the blur kernel by a 2-D sinc (ringing) kernel. ``resize_prob``:
    probabilities of up, down and keep; ``resize_range``: the factor's range (relative to
    the size before this order for the first, to the LR size for the second). Noise: Gaussian
    with ``gaussian_noise_prob`` (sigma on [0, 255] in ``noise_range``), else Poisson (scale
    in ``poisson_scale_range``), grey (the same in every channel) with ``gray_noise_prob``.
    JPEG quality in ``jpeg_range`` (the second order's JPEG is the final step's).
    """

    blur_prob: float = 1.0
    kernel_size: int = 21
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)

    def __post_init__(self) -> None:
        for key in ("blur_prob", "sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key}: must be in [0, 1], got {getattr(self, key)}")
        if self.kernel_size < 7 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: must be an odd integer >= 7, got {self.kernel_size}")
        for name in self.kernel_list:
            if name not in KERNEL_TYPES:
                raise ValueError(
                    f"kernel_list: unknown kernel {name!r} (choose from {', '.join(KERNEL_TYPES)})"
                )
        if not self.kernel_list:
            raise ValueError("kernel_list: list at least one kernel type")
        _check_probs("kernel_prob", self.kernel_prob, len(self.kernel_list))
        _check_probs("resize_prob", self.resize_prob, 3)
        _check_range("blur_sigma", self.blur_sigma, 1e-3, 1e3)
        _check_range("betag_range", self.betag_range, 1e-3, 1e3)
        _check_range("betap_range", self.betap_range, 1e-3, 1e3)
        _check_range("resize_range", self.resize_range, 1e-3, 1e3)
        if not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            raise ValueError(
                f"resize_range: must contain 1 (down below it, up above it), "
                f"got {list(self.resize_range)}"
            )
        _check_range("noise_range", self.noise_range, 0.0, 255.0)
        _check_range("poisson_scale_range", self.poisson_scale_range, 0.0, 1e3)
        _check_range("jpeg_range", self.jpeg_range, 1.0, 100.0)


def _second_order() -> RealSROrder:
    """Real-ESRGAN's second order (the ``*2`` keys of train_realesrnet_x4plus.yml)."""
    return RealSROrder(
        blur_prob=0.8,
        blur_sigma=(0.2, 1.5),
        resize_prob=(0.3, 0.4, 0.3),
        resize_range=(0.3, 1.2),
        noise_range=(1.0, 25.0),
        poisson_scale_range=(0.05, 2.5),
    )


@dataclass(frozen=True)
class RealSRParams:
    """The real-world (Real-ESRGAN) degradation of ``realsr_x<s>`` tasks: two orders, then
    the final resize to the LR size, a sinc filter with ``final_sinc_prob`` and JPEG, in a
    random order (``iln.data.realsr``)."""

    first: RealSROrder = field(default_factory=RealSROrder)
    second: RealSROrder = field(default_factory=_second_order)
    final_sinc_prob: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 <= self.final_sinc_prob <= 1.0:
            raise ValueError(f"final_sinc_prob: must be in [0, 1], got {self.final_sinc_prob}")


@dataclass(frozen=True)
class DegradeParams:
    """Which (lq, gt) pairs the degrade stage writes: every task x every set."""

    tasks: tuple[str, ...]
    sets: tuple[str, ...]
    task_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per task, for ``sets``
    seed: int = 0  # base of the per-image noise seeds
    workers: int = 0  # processes; 0 = all cores
    bicubic_rounding: Literal["once", "per_pass"] = "once"  # per_pass = MATLAB on uint8 input
    # yuv420 = 4:2:0 chroma subsampling. Written without colons: YAML 1.1 reads an unquoted
    # 4:2:0 as the base-60 integer 14520, and `dvc exp run -S` rewrites params.yaml unquoted.
    jpeg_subsampling: Literal["yuv420", "yuv444"] = "yuv420"
    # zlib level of written pairs: 1 is ~3x faster to write than 6, ~10% larger
    png_compress_level: int = 1
    subimages: SubImages = field(default_factory=SubImages)
    realsr: RealSRParams = field(default_factory=RealSRParams)  # realsr_x<s> tasks

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
        check_min(self, ("workers",), 0, note="0 = all cores")
        check_min(self, ("seed",), 0)
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level: must be in 0..9, got {self.png_compress_level}")

    def sets_for(self, task: str) -> tuple[str, ...]:
        return tuple(self.task_sets.get(task, self.sets))


def _parts(name: str) -> tuple[str, ...]:
    spec = SETS[name]
    return spec.parts if spec.kind == "composite" else (name,)
