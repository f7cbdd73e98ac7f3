"""Training patches and test pairs.

``TrainPatches[k]`` is a pure function of (seed, k): k is the global sample counter, so a
resumed run, or several data-parallel ranks taking disjoint k, see exactly the samples an
uninterrupted single-process run would. Sample k belongs to epoch ``k // n`` (n images);
the image is position ``k % n`` of that epoch's permutation, drawn from (seed, epoch); crop,
flips and noise come from a generator seeded with (seed, k).

Where the lq image comes from depends on the task (``training_patches``):

- ``sr_x<s>`` and ``derain``: the degrade stage's stored pairs (bicubic LR; rainy input), matched
  by file name;
- ``dn_s<sigma>`` and ``car_q<q>``: made on the fly from the clean patch with the degrade
  stage's own functions: Gaussian noise on [0, 255] from the sample's generator, clipped and
  rounded to uint8 exactly as the stored test pairs are; JPEG with the same encoder and chroma
  subsampling. The clean images are the HR images of the training set (no stored pairs).
- ``realsr_x<s>``: the HR patch (s * lq_patch square) degraded on the fly by the real-world
  pipeline (``iln.data.realsr``), every draw from the sample's generator, so sample k's
  kernels, noise and JPEG qualities are a pure function of (seed, k).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from iln.data.catalog import parts_of
from iln.data.degrade import SUBSAMPLING, add_gaussian_noise, jpeg_compress
from iln.data.io import image_size, list_images, read_rgb
from iln.data.params import RealSRParams, parse_task
from iln.data.realsr import degrade_realsr
from iln.config.layout import Layout

ON_THE_FLY = ("dn", "car", "realsr")  # task kinds whose lq is made from the clean patch
DEFAULT_CACHE_BYTES = 8 << 30  # train.cache_gib's default, 8 GiB
_PERMUTATION_STREAM = (
    0x5045524D  # separates the per-epoch permutation stream from per-sample streams
)


def _match(gt_files: list[Path], lq_dir: Path) -> dict[str, Path]:
    lq_files = {p.stem: p for p in list_images(lq_dir)}
    out = {}
    for gt in gt_files:
        if gt.stem not in lq_files:
            raise FileNotFoundError(f"{lq_dir}: no lq partner for {gt}")
        out[gt.stem] = lq_files[gt.stem]
    extra = sorted(set(lq_files) - set(out))
    if extra:
        raise FileNotFoundError(
            f"{lq_files[extra[0]]}: lq image without a gt partner in the gt folder"
        )
    return out


class TrainPatches:
    """Random aligned (lq, gt) patches for training; see the module doc for determinism.

    gt_dir: folder of HR images (or a list of folders, read as one set).
    lq_dir: folder of LR images with the same names, or None to make lq on the fly from the
        gt patch with ``degradation`` ("dn_s<sigma>" or "car_q<quality>" with scale 1;
        "realsr_x<s>" with scale s and ``realsr`` its parameters), JPEG with
        ``jpeg_subsampling`` chroma (the degrade stage's setting).
    Returns {"lq": float32 (3, p, p), "gt": float32 (3, s*p, s*p)} in [0, 1].
    ``len()`` is the number of images (one epoch); any k >= 0 is a valid index.

    Decoding is kept off the training step: the constructor decodes the images once, on
    ``decode_threads`` threads (0 = every core; the PNG decoder runs outside the GIL), up to
    ``cache_bytes`` of decoded pixels in all (``train.cache_gib``; 0 = no cache). Data loader
    workers started by fork (Linux's default) share these pages with the training process
    (they are only read, so copy-on-write never copies them); workers started by spawn
    (macOS, Windows) each receive a copy. Images beyond the budget (first fit in file
    order) are decoded at every use, and a warning names the key and the size that would
    hold them all. The cache changes no sample.
    """

    def __init__(
        self,
        gt_dir: str | Path | Sequence[str | Path],
        lq_dir: str | Path | None,
        *,
        scale: int,
        lq_patch: int,
        seed: int,
        augment: bool = True,
        degradation: str | None = None,
        jpeg_subsampling: str = "yuv420",
        realsr: RealSRParams | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        decode_threads: int = 0,
    ) -> None:
        if scale < 1 or lq_patch < 1:
            raise ValueError(f"scale and lq_patch must be >= 1, got {scale}, {lq_patch}")
        if cache_bytes < 0:
            raise ValueError(
                f"train.cache_gib: must be >= 0 (0 = no cache), got {cache_bytes} bytes"
            )
        self.scale, self.lq_patch, self.seed, self.augment = scale, lq_patch, seed, augment
        self.cache_bytes = cache_bytes
        self.degradation = (
            parse_task(degradation, "degradation") if degradation is not None else None
        )
        if self.degradation is not None:
            if self.degradation.kind not in ("dn", "car", "realsr"):
                raise ValueError(
                    "degradation must be dn_s<sigma>, car_q<quality> or realsr_x<scale>, "
                    f"got {degradation!r}"
                )
            if lq_dir is not None or scale != self.degradation.scale:
                raise ValueError(
                    f"on-the-fly degradation {degradation!r} needs lq_dir=None and "
                    f"scale={self.degradation.scale}"
                )
            if (self.degradation.kind == "realsr") != (realsr is not None):
                raise ValueError(
                    "realsr parameters are given exactly when the degradation is realsr_x<s>"
                )
        elif lq_dir is None:
            raise ValueError("lq_dir is required unless a degradation makes lq on the fly")
        if jpeg_subsampling not in SUBSAMPLING:
            raise ValueError(
                f"jpeg_subsampling must be one of {', '.join(SUBSAMPLING)}, "
                f"got {jpeg_subsampling!r}"
            )
        self.jpeg_subsampling = jpeg_subsampling
        self.realsr = realsr
        dirs = [Path(gt_dir)] if isinstance(gt_dir, (str, Path)) else [Path(d) for d in gt_dir]
        self.gt_files = [p for d in dirs for p in list_images(d)]
        if not self.gt_files:
            raise FileNotFoundError(f"no training images in {', '.join(map(str, dirs))}")
        stems = [p.stem for p in self.gt_files]
        if len(set(stems)) != len(stems):
            dup = next(s for s in stems if stems.count(s) > 1)
            raise ValueError(f"image name {dup!r} occurs twice in {', '.join(map(str, dirs))}")
        self.lq_files = None if lq_dir is None else _match(self.gt_files, Path(lq_dir))
        self.decoded_bytes = self._check_sizes()  # per image: gt + lq pixels, from the headers
        self._perm: tuple[int, np.ndarray] | None = None
        self._images = self._decode_cached(decode_threads)

    def _check_sizes(self) -> list[int]:
        """From the file headers: every lq fits a patch and matches its gt (gt = s * lq).
        Returns each image's decoded size in bytes (gt + lq)."""
        p, s = self.lq_patch, self.scale
        smallest: tuple[int, Path, int, int] | None = None  # (min side, file, h, w)
        sizes = []
        for gt in self.gt_files:
            gh, gw = image_size(gt)
            src, (h, w) = gt, (gh // s, gw // s)  # lq made on the fly: the LR grid of gt
            if self.lq_files is not None:
                src = self.lq_files[gt.stem]
                h, w = image_size(src)
                if (gh, gw) != (h * s, w * s):
                    raise ValueError(
                        f"{src}: lq size {h}x{w} times scale {s} does not match gt {gt} "
                        f"size {gh}x{gw}"
                    )
            sizes.append(3 * gh * gw + (3 * h * w if self.lq_files is not None else 0))
            if smallest is None or min(h, w) < smallest[0]:
                smallest = (min(h, w), src, h, w)
        if smallest is not None and smallest[0] < p:
            _, src, h, w = smallest
            raise ValueError(
                f"train.lq_patch: {p} is larger than the smallest training input {src} "
                f"({h}x{w}), the training patch {p}x{p} does not fit in it"
            )
        return sizes

    def _decode_cached(self, threads: int) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
        """Decode the images that fit ``cache_bytes`` (first fit in file order)."""
        chosen, total = [], 0
        for i, size in enumerate(self.decoded_bytes):
            if total + size <= self.cache_bytes:
                chosen.append(i)
                total += size
        if 0 < self.cache_bytes and len(chosen) < len(self.gt_files):
            need = sum(self.decoded_bytes) / 2**30
            warnings.warn(
                f"train.cache_gib: the decoded training images need {need:.2f} GiB, the "
                f"cache holds {self.cache_bytes / 2**30:.2f} GiB: "
                f"{len(self.gt_files) - len(chosen)} of {len(self.gt_files)} images are "
                "decoded at every use (slower steps); raise train.cache_gib to hold them all",
                stacklevel=3,
            )
        if not chosen:
            return {}

        workers = threads or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=min(workers, len(chosen))) as pool:
            images = dict(zip(chosen, pool.map(self._read, chosen)))
        for pair in images.values():  # shared by the loader workers: never written
            for img in pair:
                if img is not None:
                    img.setflags(write=False)
        return images

    def __len__(self) -> int:
        return len(self.gt_files)

    def image_index(self, k: int) -> int:
        """Which image sample k is cut from."""
        n = len(self.gt_files)
        epoch, position = divmod(k, n)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch])
            self._perm = (epoch, rng.permutation(n))
        return int(self._perm[1][position])

    @property
    def cached_bytes(self) -> int:
        """Decoded pixels held in the shared cache (at most ``cache_bytes``)."""
        return sum(self.decoded_bytes[i] for i in self._images)

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        gt = read_rgb(self.gt_files[i])
        lq = None if self.lq_files is None else read_rgb(self.lq_files[self.gt_files[i].stem])
        return gt, lq

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self._images[i] if i in self._images else self._read(i)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        k = int(k)
        if k < 0:
            raise IndexError(f"sample index must be >= 0, got {k}")
        gt, lq = self._load(self.image_index(k))
        rng = np.random.default_rng([self.seed, k])
        p, s = self.lq_patch, self.scale
        # the patch's position on the LR grid (an lq made on the fly: gt's size / s)
        rows, cols = (gt.shape[0] // s, gt.shape[1] // s) if lq is None else lq.shape[:2]
        top = int(rng.integers(0, rows - p + 1))
        left = int(rng.integers(0, cols - p + 1))
        gt_patch = gt[top * s : (top + p) * s, left * s : (left + p) * s]  # (s*p, s*p, 3)
        lq_patch = None if lq is None else lq[top : top + p, left : left + p]  # (p, p, 3)
        flips = rng.random(3) < 0.5 if self.augment else np.zeros(3, dtype=bool)
        gt_patch = _augment(gt_patch, flips)
        if lq_patch is None:
            lq_patch = self._degrade(np.ascontiguousarray(gt_patch), rng)
        else:
            lq_patch = _augment(lq_patch, flips)
        return {"lq": _to_chw(lq_patch), "gt": _to_chw(gt_patch)}

    def _degrade(self, gt_patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        task = self.degradation
        if task.kind == "realsr":
            return degrade_realsr(
                gt_patch, task.scale, self.realsr, rng, jpeg_subsampling=self.jpeg_subsampling
            )
        if task.kind == "dn":
            return add_gaussian_noise(gt_patch, task.sigma, rng)
        return jpeg_compress(gt_patch, task.quality, subsampling=self.jpeg_subsampling)


def training_sources(task: str, train_set: str, layout: Layout) -> list[Path]:
    """The folders a run's training reads: the clean HR images of every part of ``train_set``
    for DN / CAR / real-world SR (degraded on the fly), else the stored (lq, gt) pairs."""
    if parse_task(task).kind in ON_THE_FLY:
        return [layout.hr / part for part in parts_of(train_set)]
    return list(layout.pair_dirs(task, train_set))


def training_patches(
    task: str,
    train_set: str,
    *,
    layout: Layout,
    lq_patch: int,
    seed: int,
    jpeg_subsampling: str = "yuv420",
    realsr: RealSRParams | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> TrainPatches:
    """The training patches of a run: stored pairs for SR and deraining, the clean HR images of
    ``train_set`` (all parts of a composite set such as DF2K) degraded on the fly for DN / CAR
    and real-world SR (``realsr``: its parameters, required for realsr_x<s>). ``cache_bytes``:
    host memory for decoded images (``train.cache_gib``, see TrainPatches)."""
    spec = parse_task(task)
    if spec.kind in ON_THE_FLY:
        if spec.kind == "realsr" and realsr is None:
            raise ValueError(f"{task}: training needs the degrade.realsr parameters")
        return TrainPatches(
            training_sources(task, train_set, layout),
            None,
            scale=spec.scale,
            lq_patch=lq_patch,
            seed=seed,
            degradation=task,
            jpeg_subsampling=jpeg_subsampling,
            realsr=realsr if spec.kind == "realsr" else None,
            cache_bytes=cache_bytes,
        )
    lq_dir, gt_dir = layout.pair_dirs(task, train_set)
    return TrainPatches(
        gt_dir, lq_dir, scale=spec.scale, lq_patch=lq_patch, seed=seed, cache_bytes=cache_bytes
    )


def _augment(img: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Horizontal flip, vertical flip, transpose (together: the 8 dihedral transforms)."""
    if flips[0]:
        img = img[:, ::-1]
    if flips[1]:
        img = img[::-1, :]
    if flips[2]:
        img = img.transpose(1, 0, 2)
    return img


def _to_chw(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1]."""
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


class TestPairs:
    """Evaluation pairs: (name, lq uint8 (h, w, 3), gt uint8 (H, W, 3)), sorted by name."""

    __test__ = False  # not a pytest test class

    def __init__(self, lq_dir: str | Path, gt_dir: str | Path) -> None:
        self.lq_dir, self.gt_dir = Path(lq_dir), Path(gt_dir)
        self.gt_files = list_images(self.gt_dir)
        if not self.gt_files:
            raise FileNotFoundError(f"{self.gt_dir}: no test images")
        self.lq_files = _match(self.gt_files, self.lq_dir)

    def __len__(self) -> int:
        return len(self.gt_files)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        gt = self.gt_files[i]
        return gt.stem, read_rgb(self.lq_files[gt.stem]), read_rgb(gt)

    @property
    def names(self) -> list[str]:
        return [p.stem for p in self.gt_files]
