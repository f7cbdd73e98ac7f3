"""The datasets the paper uses: where each one comes from and what a complete copy holds.

Every *set* becomes one folder of HR PNGs, ``data/hr/<set>/``. Sets come from

- the embedded default (real photographs shipped in this repository under ``data/default``),
- a downloadable *archive* (one archive may hold several sets, e.g. the EDSR benchmark tar),
- or several other sets at once (*composite*, e.g. DF2K = DIV2K train + Flickr2K), which is
  never copied: the degrade stage reads its parts.

Paired sets (deraining) also carry their degraded inputs, normalised to ``data/hr/<set>_rain/``.

Checksums: where the publisher (or a well-known loader that pins them) gives one it is listed
here; otherwise the SHA-256 of the first download is recorded in the checksum file and every
later download is verified against it. GitHub source archives are generated on request and
their bytes are not stable (compression and timestamps may change), so they are pinned by
content instead: the SHA-256 over the sorted file names and bytes of each set's extracted
images (``pin="content"``).

``python -m iln.data.catalog`` lists every set with its image count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RAIN_SUFFIX = "_rain"  # data/hr/<set>_rain/ holds the rainy inputs of a paired set


@dataclass(frozen=True)
class Archive:
    """One downloadable file."""

    filename: str  # name in the download folder
    url: str | None  # None: not downloadable without a licence step (see ``howto``)
    md5: str | None = None
    sha256: str | None = None
    checksum_origin: str = ""  # who publishes the checksum listed here
    size: str = ""  # approximate, for the progress message
    howto: str = ""  # how to obtain it by hand
    pin: Literal["bytes", "content"] = "bytes"  # content: digest of the extracted images


@dataclass(frozen=True)
class SetSpec:
    """One normalised set (one folder of HR images)."""

    name: str
    kind: Literal["embedded", "archive", "composite"]
    split: Literal["train", "test"]
    description: str
    archive: str | None = None  # key in ARCHIVES
    member: str = ""  # folder of the clean images: path suffix inside the archive / embedded dir
    input_member: str | None = None  # paired sets: folder of the degraded inputs
    count: int | None = None  # images in a complete copy (checked after normalising)
    parts: tuple[str, ...] = ()  # composite sets
    grey: bool = False  # greyscale images (stored replicated to RGB; scored on the grey image)

    @property
    def paired(self) -> bool:
        return self.input_member is not None


_GITHUB = "https://github.com/{repo}/archive/{commit}.zip"
_GDRIVE = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
_TORCHSR = "md5 pinned by the torchSR dataset loaders"
_GDRIVE_HOWTO = (
    "Google Drive may refuse scripted downloads (quota or a confirmation page); if so, download "
    "it in a browser and put it in the download folder under this file name, or point "
    "data.local at the folder."
)

ARCHIVES: dict[str, Archive] = {
    "DIV2K_train_HR": Archive(
        "DIV2K_train_HR.zip",
        "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip",
        md5="bdc2d9338d4e574fe81bf7d158758658",
        checksum_origin=_TORCHSR,
        size="3.5 GB",
    ),
    "DIV2K_valid_HR": Archive(
        "DIV2K_valid_HR.zip",
        "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_HR.zip",
        md5="9fcdda83005c5e5997799b69f955ff88",
        checksum_origin=_TORCHSR,
        size="0.45 GB",
    ),
    "Flickr2K": Archive(
        "Flickr2K.tar",
        "https://cv.snu.ac.kr/research/EDSR/Flickr2K.tar",
        md5="5d3f39443d5e9489bff8963f8f26cb03",
        checksum_origin=_TORCHSR,
        size="20 GB (HR and LR)",
    ),
    "EDSR_benchmark": Archive(
        "benchmark.tar",
        "https://cv.snu.ac.kr/research/EDSR/benchmark.tar",
        md5="4ace41d33c2384b97e6b320cd0afd6ba",
        checksum_origin=_TORCHSR,
        size="0.2 GB",
    ),
    "Manga109": Archive(
        "Manga109.zip",
        None,
        howto="The official Manga109 release (manga109.org, on request) is 109 whole volumes "
        "of pages, not the SR test set. SR papers (EDSR, RCAN, SwinIR, HAT) test on a derived set "
        "of 109 images, one per title, named after the title (e.g. AisazuNihaIrarenai.png), "
        "passed around with those projects' benchmark bundles. Put exactly those 109 images "
        "(PNG, or any format read_rgb reads) directly in one folder, without sub-folders, and "
        "set data.local.Manga109 to it.",
    ),
    "IRCNN_testsets": Archive(
        "IRCNN-938f6a7f.zip",
        _GITHUB.format(repo="cszn/IRCNN", commit="938f6a7fc9f12df9188da838fc2cec4bcca06976"),
        size="0.1 GB",
        pin="content",
    ),
    "FFDNet_testsets": Archive(
        "FFDNet-a68d5445.zip",
        _GITHUB.format(repo="cszn/FFDNet", commit="a68d544599bb9bb2f89da51ab9e18458fa882023"),
        size="0.1 GB",
        pin="content",
    ),
    "SwinIR_testsets": Archive(
        "SwinIR-33f61662.zip",
        _GITHUB.format(
            repo="JingyunLiang/SwinIR", commit="33f616625268d08ba600f8db89388eec0328edb1"
        ),
        size="0.05 GB",
        pin="content",
    ),
    "DnCNN_testsets": Archive(
        "DnCNN-badb6530.zip",
        _GITHUB.format(repo="cszn/DnCNN", commit="badb6530935b23b2f2fcb40885898a2bab80eb73"),
        size="0.05 GB",
        pin="content",
    ),
    "Rain13K_train": Archive(
        "Rain13K_train.zip",
        _GDRIVE.format(id="14BidJeG4nSNuFNFDf99K-7eErCq4i47t"),
        size="1.2 GB",
        howto=_GDRIVE_HOWTO,
    ),
    "Rain13K_test": Archive(
        "Rain13K_test.zip",
        _GDRIVE.format(id="1P_-RAvltEoEhfT-9GrWRdpEi6NSswTs8"),
        size="1.4 GB",
        howto=_GDRIVE_HOWTO,
    ),
}


_FILE_SETS = (  # the sets that are files of an archive or of the package
    SetSpec(
        "default_train",
        "embedded",
        "train",
        "scikit-image photographs (offline default)",
        member="train",
    ),
    SetSpec(
        "default_test",
        "embedded",
        "test",
        "scikit-image photographs (offline default)",
        member="test",
    ),
    SetSpec(
        "DIV2K_train",
        "archive",
        "train",
        "DIV2K training HR (800)",
        "DIV2K_train_HR",
        "DIV2K_train_HR",
        count=800,
    ),
    SetSpec(
        "DIV2K_valid",
        "archive",
        "test",
        "DIV2K validation HR (100)",
        "DIV2K_valid_HR",
        "DIV2K_valid_HR",
        count=100,
    ),
    SetSpec(
        "Flickr2K",
        "archive",
        "train",
        "Flickr2K HR (2650)",
        "Flickr2K",
        "Flickr2K/Flickr2K_HR",
        count=2650,
    ),
    SetSpec(
        "DF2K",
        "composite",
        "train",
        "DIV2K train + Flickr2K (3450)",
        parts=("DIV2K_train", "Flickr2K"),
    ),
    SetSpec(
        "Set5",
        "archive",
        "test",
        "SR benchmark",
        "EDSR_benchmark",
        "benchmark/Set5/HR",
        count=5,
    ),
    SetSpec(
        "Set14",
        "archive",
        "test",
        "SR benchmark",
        "EDSR_benchmark",
        "benchmark/Set14/HR",
        count=14,
    ),
    SetSpec(
        "B100",
        "archive",
        "test",
        "SR benchmark (BSD100)",
        "EDSR_benchmark",
        "benchmark/B100/HR",
        count=100,
    ),
    SetSpec(
        "Urban100",
        "archive",
        "test",
        "SR / denoising benchmark",
        "EDSR_benchmark",
        "benchmark/Urban100/HR",
        count=100,
    ),
    SetSpec("Manga109", "archive", "test", "SR benchmark", "Manga109", "Manga109", count=109),
    SetSpec(
        "CBSD68",
        "archive",
        "test",
        "colour denoising benchmark",
        "IRCNN_testsets",
        "testsets/CBSD68",
        count=68,
    ),
    SetSpec(
        "Kodak24",
        "archive",
        "test",
        "colour denoising benchmark: the 500x500 crops of the FFDNet archive, not the full "
        "768x512 Kodak images (numbers are not comparable with full-size results)",
        "FFDNet_testsets",
        "testsets/Kodak24",
        count=24,
    ),
    SetSpec(
        "McMaster",
        "archive",
        "test",
        "colour denoising benchmark",
        "SwinIR_testsets",
        "testsets/McMaster",
        count=18,
    ),
    SetSpec(
        "Classic5",
        "archive",
        "test",
        "JPEG benchmark (greyscale, replicated to RGB)",
        "SwinIR_testsets",
        "testsets/classic5",
        count=5,
        grey=True,
    ),
    SetSpec(
        "LIVE1",
        "archive",
        "test",
        "JPEG benchmark",
        "DnCNN_testsets",
        "testsets/LIVE1",
        count=29,
    ),
    SetSpec(
        "Set12",
        "archive",
        "test",
        "grey denoising benchmark",
        "DnCNN_testsets",
        "testsets/Set12",
        count=12,
        grey=True,
    ),
    SetSpec(
        "BSD68",
        "archive",
        "test",
        "grey denoising benchmark",
        "DnCNN_testsets",
        "testsets/BSD68",
        count=68,
        grey=True,
    ),
    SetSpec(
        "Rain13K",
        "archive",
        "train",
        "deraining training pairs",
        "Rain13K_train",
        "Rain13K/target",
        input_member="Rain13K/input",
        count=13711,
    ),
)
_RAIN_TEST_COUNTS = {
    "Rain100L": 100,
    "Rain100H": 100,
    "Test100": 98,
    "Test1200": 1200,
    "Test2800": 2800,
}
_RAIN_TEST_SETS = tuple(
    SetSpec(
        name,
        "archive",
        "test",
        "deraining test pairs",
        "Rain13K_test",
        f"{name}/target",
        input_member=f"{name}/input",
        count=count,
    )
    for name, count in _RAIN_TEST_COUNTS.items()
)
SETS: dict[str, SetSpec] = {spec.name: spec for spec in (*_FILE_SETS, *_RAIN_TEST_SETS)}

# Names accepted in data.datasets besides the set names themselves.
GROUPS: dict[str, tuple[str, ...]] = {
    "default": ("default_train", "default_test"),
    "DIV2K": ("DIV2K_train", "DIV2K_valid"),
    "sr_benchmarks": ("Set5", "Set14", "B100", "Urban100", "Manga109"),
    "dn_benchmarks": ("CBSD68", "Kodak24", "McMaster", "Urban100"),
    "car_benchmarks": ("Classic5", "LIVE1", "Urban100"),
    "grey_dn_benchmarks": ("Set12", "BSD68", "Urban100"),
    "rain_test": ("Rain100L", "Rain100H", "Test100", "Test1200", "Test2800"),
}


def catalogue_names() -> list[str]:
    """Every name data.datasets accepts (sets and groups)."""
    return sorted(SETS) + sorted(GROUPS)


def unknown_name_error(name: str, where: str) -> ValueError:
    return ValueError(
        f"{where}: unknown dataset {name!r} (catalogue: {', '.join(catalogue_names())})"
    )


def expand(names: tuple[str, ...] | list[str], where: str = "datasets") -> list[str]:
    """Resolve groups and composite sets into the concrete sets to fetch, in order, once each."""
    out: list[str] = []

    def add(name: str) -> None:
        if name in GROUPS:
            for member in GROUPS[name]:
                add(member)
        elif name in SETS:
            spec = SETS[name]
            for part in spec.parts:
                add(part)
            if spec.kind != "composite" and name not in out:
                out.append(name)
        else:
            raise unknown_name_error(name, where)

    for name in names:
        add(name)
    return out


def parts_of(name: str) -> tuple[str, ...]:
    """The concrete sets whose images make up set ``name`` (itself unless composite)."""
    if name not in SETS:
        raise unknown_name_error(name, "set")
    spec = SETS[name]
    return spec.parts if spec.kind == "composite" else (name,)


def listing() -> str:
    """A plain-text table of every set: name, split, image count, source and description."""
    rows = [("set", "split", "count", "source", "size", "description")]
    for spec in SETS.values():
        archive = ARCHIVES.get(spec.archive) if spec.archive else None
        if spec.kind == "composite":
            source = " + ".join(spec.parts)
        elif archive is None:
            source = "embedded"
        elif archive.url is None:
            source = "by hand (data.local)"
        else:
            source = archive.filename + (" (pinned by content)" if archive.pin == "content" else "")
        count = sum(SETS[p].count or 0 for p in spec.parts) if spec.parts else spec.count
        rows.append(
            (
                spec.name + (" (paired)" if spec.paired else "") + (" (grey)" if spec.grey else ""),
                spec.split,
                "-" if count is None else str(count),
                source,
                archive.size if archive else "",
                spec.description,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(r[:5], widths)) + "  " + r[5]
        for r in rows
    )


if __name__ == "__main__":
    print(listing())
