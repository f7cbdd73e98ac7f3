"""Safe extraction of zip and tar(.gz/.bz2/.xz) archives.

Every member is checked before anything is written; one bad member rejects the whole
archive. Rejected:

- a path that is absolute, drive-qualified or has a ``..`` component;
- any link: symlinks and hard links in tar and zip archives alike. The datasets this
  project fetches hold none, and refusing them outright closes the symlink-chain escape of
  Python's tarfile ``data`` filter (CVE-2025-4517, fixed in Python 3.11.13) on every 3.11;
- devices and FIFOs;
- more than ``limits.max_members`` members, more than ``limits.max_bytes`` unpacked bytes,
  or unpacked/packed size above ``limits.max_ratio`` (a decompression bomb: image datasets
  are already compressed and unpack to about their archive's size).

The unpacked sizes are the ones the archive declares; both readers stop at the declared size
of a member, so an archive cannot unpack to more than it declares.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


class UnsafeArchiveError(ValueError):
    """An archive member would escape the extraction folder, or the archive is a bomb."""


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what one archive may unpack to (params: ``data.extract``)."""

    max_bytes: int = 64 * 2**30  # 64 GiB: DF2K unpacks to ~12 GiB, Rain13K to ~3 GiB
    max_members: int = 200_000
    max_ratio: float = 50.0  # unpacked bytes / archive bytes


def _escapes(name: str) -> bool:
    """Absolute, drive-qualified, or containing a '..' component (even one that would come
    back inside: no legitimate archive needs it)."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return True
    return ".." in name.split("/")


def _reject(archive: Path, what: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{archive}: {what}; archive rejected")


def _check_member_name(archive: Path, name: str) -> None:
    if _escapes(name):
        raise _reject(archive, f"member {name!r} would be written outside the target folder")


def _check_totals(archive: Path, members: int, unpacked: int, limits: ExtractLimits) -> None:
    packed = max(archive.stat().st_size, 1)
    if members > limits.max_members:
        raise _reject(
            archive,
            f"{members} members, more than the limit of {limits.max_members} "
            f"(data.extract.max_members)",
        )
    if unpacked > limits.max_bytes:
        raise _reject(
            archive,
            f"unpacks to {unpacked / 2**30:.1f} GiB, more than the limit of "
            f"{limits.max_bytes / 2**30:.1f} GiB (data.extract.max_gib)",
        )
    if unpacked / packed > limits.max_ratio:
        raise _reject(
            archive,
            f"unpacks to {unpacked / packed:.0f}x its size ({unpacked} bytes from "
            f"{packed}), more than {limits.max_ratio:g}x: a decompression bomb? "
            f"(data.extract.max_ratio)",
        )


def member_wanted(prefixes: Iterable[str] | None) -> Callable[[str], bool]:
    """Filter: is a member under one of the folders ``prefixes`` (matched as whole path
    components anywhere in the member path)? ``None`` selects everything."""
    if prefixes is None:
        return lambda name: True
    keys = ["/" + p.strip("/") + "/" for p in prefixes]
    return lambda name: any(key in "/" + name.replace("\\", "/").lstrip("/") for key in keys)


def safe_extract(
    archive: str | Path,
    dest: str | Path,
    *,
    wanted: Callable[[str], bool] | None = None,
    limits: ExtractLimits = ExtractLimits(),
) -> int:
    """Extract ``archive`` into ``dest`` after checking every member; returns files extracted.

    ``wanted`` selects which members are written (all of them are checked)."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = wanted or (lambda name: True)
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, dest, wanted, limits)
    if tarfile.is_tarfile(archive):
        return _extract_tar(archive, dest, wanted, limits)
    raise ValueError(f"{archive}: not a zip or tar archive")


def _extract_zip(
    archive: Path, dest: Path, wanted: Callable[[str], bool], limits: ExtractLimits
) -> int:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_member_name(archive, info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise _reject(archive, f"member {info.filename!r} is a symlink")
                if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise _reject(archive, f"member {info.filename!r} is a device or FIFO")
            _check_totals(archive, len(infos), sum(i.file_size for i in infos), limits)
            count = 0
            for info in infos:
                if info.is_dir() or not wanted(info.filename):
                    continue
                target = dest.joinpath(
                    *[p for p in info.filename.replace("\\", "/").split("/") if p]
                )
                target.parent.mkdir(parents=True, exist_ok=True)
                with (
                    zf.open(info) as src,
                    open(target, "wb") as out,
                ):  # reads at most file_size bytes
                    shutil.copyfileobj(src, out, 1 << 20)
                count += 1
    except zipfile.BadZipFile as err:
        raise ValueError(f"{archive}: corrupt zip archive ({err})") from None
    return count


def _extract_tar(
    archive: Path, dest: Path, wanted: Callable[[str], bool], limits: ExtractLimits
) -> int:
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _check_member_name(archive, m.name)
                if m.issym() or m.islnk():
                    kind = "symlink" if m.issym() else "hard link"
                    raise _reject(
                        archive,
                        f"member {m.name!r} is a {kind} (-> {m.linkname!r}); "
                        f"links are not accepted in datasets",
                    )
                if not (m.isfile() or m.isdir()):
                    raise _reject(archive, f"member {m.name!r} is a device or FIFO")
            _check_totals(archive, len(members), sum(m.size for m in members), limits)
            selected = [m for m in members if m.isfile() and wanted(m.name)]
            tf.extractall(dest, members=selected, filter="data")  # a second line of defence
    except tarfile.TarError as err:
        raise ValueError(f"{archive}: corrupt tar archive ({err})") from None
    return len(selected)
