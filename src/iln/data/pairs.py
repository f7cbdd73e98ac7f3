"""The degrade stage's work: (lq, gt) PNG pairs ``<pairs_root>/<task>/<set>/{lq,gt}/<name>.png``.

Every HR image is decoded once and all tasks that use it are done in the same job; jobs run
in worker processes. Each pair folder is built in a hidden staging folder and renamed into
place when complete; ``manifest.json`` (counts, sizes, seeds, encoder) is written last,
atomically.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from iln.data.catalog import RAIN_SUFFIX, SETS, parts_of
from iln.data.degrade import (
    add_gaussian_noise,
    bicubic_downsample,
    jpeg_compress,
    jpeg_encoder_info,
    modcrop,
    noise_rng,
    tile_positions,
)
from iln.data.io import is_plain_rgb_png, list_images, read_rgb, write_png
from iln.data.parallel import resolve_workers, run_jobs
from iln.data.params import DegradeParams, RealSRParams, parse_task
from iln.data.prepare import replace_dir
from iln.data.realsr import degrade_realsr
from iln.util.files import write_json_atomic

STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class Output:
    """One (task, set) pair folder an image contributes to."""

    task: str
    set_name: str
    lq_dir: str  # staging folders
    gt_dir: str
    tiles: tuple[int, int] | None  # (size, step) on HR, or None for whole images


@dataclass(frozen=True)
class Options:
    seed: int
    round_each_pass: bool
    jpeg_subsampling: str
    compress_level: int
    realsr: RealSRParams


@dataclass(frozen=True)
class ImageJob:
    name: str  # output stem
    gt_src: str
    lq_src: str | None  # derain: the rainy input
    outputs: tuple[Output, ...]
    options: Options


def make_pairs(
    params: DegradeParams,
    hr_root: str | Path,
    pairs_root: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Write every task x set pair folder and the manifest; returns the manifest."""
    hr_root, pairs_root = Path(hr_root), Path(pairs_root)
    pairs_root.mkdir(parents=True, exist_ok=True)
    for stale in pairs_root.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    options = Options(
        params.seed,
        params.bicubic_rounding == "per_pass",
        params.jpeg_subsampling,
        params.png_compress_level,
        params.realsr,
    )
    start = time.perf_counter()
    staged: dict[tuple[str, str], Path] = {}
    jobs: dict[tuple[str, str | None], dict] = {}  # (gt source, lq source) -> {"name", "outputs"}
    try:
        for task in params.tasks:
            for set_name in params.sets_for(task):
                stage = Path(
                    tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{task}-{set_name}-", dir=pairs_root)
                )
                (stage / "lq").mkdir()
                (stage / "gt").mkdir()
                staged[(task, set_name)] = stage
                tiles = (
                    (params.subimages.size, params.subimages.step)
                    if set_name in params.subimages.sets
                    else None
                )
                output = Output(task, set_name, str(stage / "lq"), str(stage / "gt"), tiles)
                for name, gt_src, lq_src in _sources(hr_root, set_name, derain=task == "derain"):
                    entry = jobs.setdefault(
                        (str(gt_src), str(lq_src) if lq_src else None),
                        {"name": name, "outputs": []},
                    )
                    entry["outputs"].append(output)
        work = [
            (ImageJob(v["name"], gt, lq, tuple(v["outputs"]), options),)
            for (gt, lq), v in jobs.items()
        ]
        results = run_jobs(
            _process_image, work, workers=params.workers, progress=progress, desc="degrade"
        )
        records: dict[str, dict] = {f"{t}/{s}": {} for (t, s) in staged}
        for job_results in results:
            for key, name, record in job_results:
                records[key][name] = record
        for (task, set_name), stage in staged.items():
            replace_dir(stage, pairs_root / task / set_name)
    finally:
        for stage in staged.values():
            shutil.rmtree(stage, ignore_errors=True)
    manifest = _manifest(params, records, staged)
    write_json_atomic(pairs_root / "manifest.json", manifest)
    log(
        f"degrade: {len(work)} source images, {len(staged)} pair folders in "
        f"{time.perf_counter() - start:.1f} s "
        f"({resolve_workers(params.workers)} workers)"
    )
    return manifest


def _sources(hr_root: Path, set_name: str, *, derain: bool) -> list[tuple[str, Path, Path | None]]:
    """(output stem, gt source, lq source or None) for every image of a (possibly composite) set."""
    out: list[tuple[str, Path, Path | None]] = []
    seen: dict[str, Path] = {}
    for part in parts_of(set_name):
        folder = hr_root / part
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder}: HR images of set {part!r} not found; add {set_name!r} to "
                f"data.datasets so the download stage provides it"
            )
        rain = hr_root / f"{part}{RAIN_SUFFIX}" if derain else None
        if derain and not rain.is_dir():
            raise FileNotFoundError(
                f"{rain}: rainy inputs of set {part!r} not found (derain needs a paired set)"
            )
        for path in list_images(folder):
            if path.stem in seen:
                raise ValueError(
                    f"{set_name}: image name {path.stem!r} occurs in both {seen[path.stem]} "
                    f"and {path}"
                )
            seen[path.stem] = path
            lq = None
            if rain is not None:
                lq = rain / path.name
                if not lq.is_file():
                    raise FileNotFoundError(f"{lq}: rainy partner of {path} not found")
            out.append((path.stem, path, lq))
    if not out:
        raise FileNotFoundError(f"set {set_name!r}: no images under {hr_root}")
    return out


def _is_grey_set(name: str) -> bool:
    """A grey benchmark (Classic5, Set12, BSD68): its noisy / JPEG inputs stay grey."""
    return name in SETS and SETS[name].grey


def _process_image(job: ImageJob) -> list[tuple[str, str, dict]]:
    """All outputs of one source image; returns (task/set, name, record) per output.
    A ValueError about the image (too small for the scale, ...) names the source file."""
    try:
        return _process_image_named(job)
    except ValueError as err:
        if str(job.gt_src) in str(err) or (job.lq_src and str(job.lq_src) in str(err)):
            raise
        raise ValueError(f"{job.gt_src}: {err}") from None


def _process_image_named(job: ImageJob) -> list[tuple[str, str, dict]]:
    hr = (
        None if all(o.task == "derain" for o in job.outputs) else read_rgb(job.gt_src)
    )  # (H, W, 3) uint8
    plain_png = is_plain_rgb_png(job.gt_src)
    results = []
    for out in job.outputs:
        task = parse_task(out.task)
        record: dict = {}
        if task.kind == "derain":
            gt = read_rgb(job.gt_src) if hr is None else hr
            lq = read_rgb(job.lq_src)
            if lq.shape != gt.shape:
                raise ValueError(
                    f"{job.lq_src}: size {lq.shape[:2]} differs from its target {job.gt_src} "
                    f"{gt.shape[:2]}"
                )
        elif task.kind == "sr":
            gt = modcrop(hr, task.scale)
            lq = bicubic_downsample(gt, task.scale, round_each_pass=job.options.round_each_pass)
        elif task.kind == "realsr":
            gt = modcrop(hr, task.scale)
            rng = noise_rng(job.options.seed, task.name, job.name)
            lq = degrade_realsr(
                gt,
                task.scale,
                job.options.realsr,
                rng,
                jpeg_subsampling=job.options.jpeg_subsampling,
            )
            record["seed"] = f"sha256({job.options.seed}|{task.name}|{job.name})"
        elif task.kind == "dn":
            gt = hr
            rng = noise_rng(job.options.seed, task.name, job.name)
            lq = add_gaussian_noise(gt, task.sigma, rng, grey=_is_grey_set(out.set_name))
            record["seed"] = f"sha256({job.options.seed}|{task.name}|{job.name})"
        else:
            gt = hr
            lq = jpeg_compress(
                gt,
                task.quality,
                subsampling=job.options.jpeg_subsampling,
                grey=_is_grey_set(out.set_name),
            )
        record["gt"], record["lq"] = list(gt.shape[:2]), list(lq.shape[:2])
        if out.tiles is None:
            _write_pair(
                out,
                job.name,
                lq,
                gt,
                gt_copy_from=job.gt_src if plain_png and gt is hr else None,
                lq_copy_from=job.lq_src
                if task.kind == "derain" and is_plain_rgb_png(job.lq_src)
                else None,
                level=job.options.compress_level,
            )
        else:
            record["tiles"] = _write_tiles(
                out, job.name, lq, gt, task.scale, level=job.options.compress_level
            )
        results.append((f"{out.task}/{out.set_name}", job.name, record))
    return results


def _write_pair(
    out: Output,
    name: str,
    lq: np.ndarray,
    gt: np.ndarray,
    *,
    gt_copy_from: str | None,
    lq_copy_from: str | None,
    level: int,
) -> None:
    gt_path, lq_path = Path(out.gt_dir) / f"{name}.png", Path(out.lq_dir) / f"{name}.png"
    if gt_copy_from:
        shutil.copyfile(gt_copy_from, gt_path)  # already a plain RGB PNG of exactly these pixels
    else:
        write_png(gt_path, gt, compress_level=level)
    if lq_copy_from:
        shutil.copyfile(lq_copy_from, lq_path)
    else:
        write_png(lq_path, lq, compress_level=level)


def _write_tiles(
    out: Output, name: str, lq: np.ndarray, gt: np.ndarray, scale: int, *, level: int
) -> int:
    """Cut aligned tiles: HR size/step from params, LR the same divided by the scale."""
    size, step = out.tiles
    h, w = lq.shape[:2]
    lsize, lstep = size // scale, step // scale
    index = 0
    for top in tile_positions(h, lsize, lstep):
        for left in tile_positions(w, lsize, lstep):
            index += 1
            stem = f"{name}_s{index:03d}"
            lq_tile = lq[top : top + lsize, left : left + lsize]
            gt_tile = gt[top * scale : (top + lsize) * scale, left * scale : (left + lsize) * scale]
            write_png(
                Path(out.lq_dir) / f"{stem}.png",
                np.ascontiguousarray(lq_tile),
                compress_level=level,
            )
            write_png(
                Path(out.gt_dir) / f"{stem}.png",
                np.ascontiguousarray(gt_tile),
                compress_level=level,
            )
    return index


def _manifest(params: DegradeParams, records: dict[str, dict], staged: dict) -> dict:
    """Deterministic: the same params and HR images give the same bytes (no timings, no
    worker count)."""
    pairs = {}
    for task, set_name in staged:
        key = f"{task}/{set_name}"
        images = records[key]
        tiled = set_name in params.subimages.sets
        pairs[key] = {
            "task": task,
            "set": set_name,
            "parts": list(parts_of(set_name)),
            "images": len(images),
            "files": sum(r.get("tiles", 1) for r in images.values()) if tiled else len(images),
            "subimages": tiled,
            "per_image": dict(sorted(images.items())),
        }
    realsr = any(parse_task(t).kind == "realsr" for t in params.tasks)
    manifest_params = {
        k: v
        for k, v in asdict(params).items()
        if k != "workers" and (k != "realsr" or realsr)  # realsr: only where a task uses it
    }
    return {
        "format": 1,
        "params": manifest_params,
        "bicubic": "MATLAB imresize (bicubic a=-0.5, antialiased, symmetric borders), float64, "
        + ("rounded after each pass" if params.bicubic_rounding == "per_pass" else "rounded once")
        + ", half away from zero",
        "noise": "N(0, sigma^2) on [0, 255], numpy PCG64 seeded by sha256(seed|task|image), "
        "clipped and rounded",
        "jpeg": jpeg_encoder_info(params.jpeg_subsampling),
        **(
            {
                "realsr": "Real-ESRGAN second-order degradation (iln.data.realsr), every draw "
                "from numpy PCG64 seeded by sha256(seed|task|image); JPEG as above"
            }
            if realsr
            else {}
        ),
        "pairs": pairs,
    }
