"""Build the normalised HR layout ``<hr_root>/<set>/<name>.png`` from the catalogue.

For each requested set: find its images (embedded folder, local folder or archive, or a
download), convert every image to 8-bit RGB PNG (plain RGB PNGs are copied byte for byte),
check the count, and move the finished folder into place with one rename. A set is built in
a hidden staging folder next to its destination, so an interrupted run never leaves a
partial ``<set>/`` behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from iln.data.archive import ExtractLimits, member_wanted, safe_extract
from iln.data.catalog import ARCHIVES, RAIN_SUFFIX, SETS, SetSpec, expand
from iln.data.download import ChecksumBook, DownloadError, Expected, fetch
from iln.data.io import is_plain_rgb_png, list_images, read_rgb, write_png
from iln.data.parallel import run_jobs
from iln.util.files import write_json_atomic

STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class Sources:
    """Where raw data can be found (paths are used as given)."""

    embedded_dir: Path
    download_dir: Path
    checksum_file: Path
    local: dict[str, Path]
    extract_limits: ExtractLimits = ExtractLimits()


def prepare_sets(
    names: Sequence[str],
    hr_root: str | Path,
    sources: Sources,
    *,
    workers: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Fetch and normalise the sets named (groups / composites expanded); returns a summary
    per set, also written to ``<hr_root>/sources.json``."""
    hr_root = Path(hr_root)
    hr_root.mkdir(parents=True, exist_ok=True)
    for stale in hr_root.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    sets = expand(list(names))
    summary: dict[str, dict] = {}
    extracted: dict[str, Path] = {}  # archive path -> extraction folder, shared by its sets
    scratch = sources.download_dir / f".extract-{os.getpid()}"  # created on first extraction
    try:
        for name in sets:
            spec = SETS[name]
            root, origin = _source_root(
                spec, sources, scratch, extracted, progress=progress, log=log
            )
            clean_dir = locate(root, spec.member, name)
            pairs = [(clean_dir, hr_root / name)]
            if spec.paired:
                input_dir = locate(root, spec.input_member, name)
                if input_dir == clean_dir:
                    raise ValueError(
                        f"{name}: expected separate folders of rainy inputs and clean targets "
                        f"under {root} (e.g. input/ and target/)"
                    )
                pairs.append((input_dir, hr_root / f"{name}{RAIN_SUFFIX}"))
            if origin.get("pin") == "content":
                origin["content_sha256"] = _check_content(
                    spec, [clean_dir] + [p[0] for p in pairs[1:]], sources, origin["url"]
                )
            counts = _normalise_set(spec, pairs, workers=workers, progress=progress)
            summary[name] = {"count": counts[0], **origin}
            log(f"{name}: {counts[0]} images -> {hr_root / name}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_json_atomic(hr_root / "sources.json", summary)
    return summary


def _display(path: Path) -> str:
    """Relative to the working directory when inside it (the summary is the same on any clone)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _source_root(
    spec: SetSpec,
    sources: Sources,
    scratch: Path,
    extracted: dict[str, Path],
    *,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[Path, dict]:
    """A folder under which the set's member folder(s) can be found, and where it came from."""
    if spec.kind == "embedded":
        root = sources.embedded_dir
        if not root.is_dir():
            raise FileNotFoundError(f"{spec.name}: embedded image folder {root} not found")
        return root, {"origin": "embedded", "path": _display(root)}
    wanted = [spec.member] + ([spec.input_member] if spec.input_member else [])
    if spec.name in sources.local:
        local = sources.local[spec.name]
        if local.is_dir():
            return local, {"origin": "local", "path": _display(local)}
        if local.is_file():
            return _extract(local, scratch, extracted, wanted, sources.extract_limits), {
                "origin": "local archive",
                "path": _display(local),
            }
        raise FileNotFoundError(f"data.local.{spec.name}: {local} does not exist")
    archive = ARCHIVES[spec.archive]
    if archive.url is None:
        raise DownloadError(
            f"{spec.name}: no public download. {archive.howto} "
            f"Or use the embedded default set (data.datasets: [default])."
        )
    book = ChecksumBook(sources.checksum_file)
    by_bytes = archive.pin == "bytes"
    recorded = book.get(archive.filename) if by_bytes else None
    dest = sources.download_dir / archive.filename
    log(f"{spec.name}: fetching {archive.url} ({archive.size or 'size unknown'})")
    digests = fetch(
        archive.url,
        dest,
        expected=Expected(sha256=archive.sha256 or recorded, md5=archive.md5),
        label=f"{spec.name} ({archive.filename})",
        progress=progress,
    )
    if by_bytes and recorded is None and archive.sha256 is None:
        book.record(archive.filename, digests["sha256"], archive.url)
    origin = {"origin": "download", "url": archive.url, "sha256": digests["sha256"]}
    if not by_bytes:
        origin["pin"] = "content"
    return _extract(
        dest, scratch, extracted, wanted, sources.extract_limits, all_sets_of=spec.archive
    ), origin


def _extract(
    archive: Path,
    scratch: Path,
    extracted: dict[str, Path],
    wanted: list[str],
    limits: ExtractLimits,
    *,
    all_sets_of: str | None = None,
) -> Path:
    key = str(archive.resolve())
    if key not in extracted:
        if all_sets_of is not None:  # extract the folders of every set in this archive at once
            wanted = sorted(
                {
                    m
                    for s in SETS.values()
                    if s.archive == all_sets_of
                    for m in (s.member, s.input_member)
                    if m
                }
            )
        target = Path(tempfile.mkdtemp(prefix="x", dir=_mkdir(scratch)))
        safe_extract(archive, target, wanted=member_wanted(wanted), limits=limits)
        extracted[key] = target
    return extracted[key]


def content_digest(folders: Sequence[Path]) -> str:
    """SHA-256 over the sorted file names and bytes of the images in ``folders`` (in order).

    Independent of how an archive packed them (compression, timestamps, member order): what
    pins a GitHub source archive, whose bytes are regenerated on request.
    """
    digest = hashlib.sha256()
    for k, folder in enumerate(folders):
        for path in list_images(folder):
            data = path.read_bytes()
            digest.update(f"{k}/{path.name}\x00{len(data)}\x00".encode())
            digest.update(data)
    return digest.hexdigest()


def _check_content(spec: SetSpec, folders: list[Path], sources: Sources, url: str) -> str:
    """Verify (or, the first time, record) the content digest of a set's extracted images."""
    book = ChecksumBook(sources.checksum_file)
    digest = content_digest(folders)
    recorded = book.get_content(spec.name)
    if recorded is None:
        book.record_content(spec.name, digest, url)
    elif recorded != digest:
        raise DownloadError(
            f"{spec.name}: the images extracted from {url} differ from the ones recorded in "
            f"{sources.checksum_file} (content sha256 {digest}, expected {recorded}); the source "
            f"changed upstream. Delete the entry {spec.name!r} there to accept the new content."
        )
    return digest


def locate(root: Path, member: str, set_name: str) -> Path:
    """The one folder under ``root`` whose path ends with ``member`` (e.g. 'benchmark/Set5/HR').

    Tolerates an extra or missing top-level folder: if no folder ends with the full member
    path, shorter suffixes are tried; ``root`` itself is used when it directly holds images
    and nothing matches."""
    parts = [p for p in member.split("/") if p]
    dirs = [d for d in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]]
    for n in range(len(parts), 0, -1):
        suffix = tuple(parts[-n:])
        hits = [d for d in dirs if d.relative_to(root).parts[-n:] == suffix and _has_images(d)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            listing = ", ".join(str(h.relative_to(root)) for h in hits[:5])
            raise ValueError(
                f"{set_name}: several folders under {root} match {member!r}: {listing}"
            )
    if _has_images(root):
        return root
    raise FileNotFoundError(f"{set_name}: no folder of images matching {member!r} under {root}")


def _has_images(folder: Path) -> bool:
    try:
        return bool(list_images(folder))
    except FileNotFoundError:
        return False


def _normalise_set(
    spec: SetSpec, pairs: list[tuple[Path, Path]], *, workers: int, progress: bool
) -> list[int]:
    """Convert each (source folder -> destination folder); paired folders must share names."""
    plans = []
    for src_dir, dst_dir in pairs:
        files = list_images(src_dir)
        by_stem: dict[str, Path] = {}
        for f in files:
            if f.stem in by_stem:
                raise ValueError(
                    f"{spec.name}: {by_stem[f.stem].name} and {f.name} in {src_dir} would both "
                    f"become {f.stem}.png"
                )
            by_stem[f.stem] = f
        plans.append((by_stem, dst_dir))
    if spec.count is not None and len(plans[0][0]) != spec.count:
        raise ValueError(
            f"{spec.name}: found {len(plans[0][0])} images in {pairs[0][0]}, a complete copy has "
            f"{spec.count}"
        )
    if len(plans) == 2:
        plans[1] = (_match_partners(spec.name, plans[0][0], plans[1][0], pairs[1][0]), plans[1][1])
    staged = []
    try:
        jobs = []
        for by_stem, dst_dir in plans:
            stage = Path(
                tempfile.mkdtemp(prefix=STAGING_PREFIX + dst_dir.name + "-", dir=dst_dir.parent)
            )
            staged.append((stage, dst_dir))
            jobs += [
                (str(src), str(stage / f"{stem}.png")) for stem, src in sorted(by_stem.items())
            ]
        run_jobs(_normalise_file, jobs, workers=workers, progress=progress, desc=spec.name)
        for stage, dst_dir in staged:
            replace_dir(stage, dst_dir)
    finally:
        for stage, _ in staged:
            shutil.rmtree(stage, ignore_errors=True)
    return [len(by_stem) for by_stem, _ in plans]


def _match_partners(
    set_name: str, clean: dict[str, Path], inputs: dict[str, Path], input_dir: Path
) -> dict[str, Path]:
    """Rainy inputs keyed by the clean image's stem: same stem, or 'rain-x' for 'norain-x'."""
    out = {}
    for stem in clean:
        for candidate in (stem, stem.replace("norain", "rain", 1)):
            if candidate in inputs:
                out[stem] = inputs[candidate]
                break
        else:
            raise ValueError(f"{set_name}: no rainy input for {clean[stem].name} in {input_dir}")
    return out


def _normalise_file(src: str, dst: str) -> None:
    if src.lower().endswith(".png") and is_plain_rgb_png(src):
        shutil.copyfile(src, dst)
    else:
        write_png(dst, read_rgb(src))


def replace_dir(stage: Path, dst: Path) -> None:
    """Move a finished staging folder into place (one rename; an old copy is removed first)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        trash = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX + "old-", dir=dst.parent))
        os.replace(dst, trash / dst.name)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(stage, dst)
