"""Safe extraction of zip and tar(.gz/.bz2/.xz) archives.

An archive is rejected as a whole (nothing extracted) if any member could write outside the
target folder: an absolute path, a ``..`` component, a drive letter, a symlink or hard link
whose target resolves outside, or a device/FIFO. Links that stay inside are extracted by
tar's own ``data`` filter (which re-checks all of the above); zip symlinks are rejected.
"""

from __future__ import annotations

import posixpath
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path


class UnsafeArchiveError(ValueError):
    """An archive member would escape the extraction folder."""


def _escapes(name: str) -> bool:
    """Absolute, drive-qualified, or containing a '..' component (even one that would come
    back inside: no legitimate archive needs it)."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return True
    return ".." in name.split("/")


def _check_member_name(archive: Path, name: str) -> None:
    if _escapes(name):
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be written outside the target folder; "
                                 f"archive rejected")


def _link_escapes(member_name: str, target: str, *, hard: bool) -> bool:
    target = target.replace("\\", "/")
    if target.startswith("/"):
        return True
    base = "" if hard else posixpath.dirname(member_name.replace("\\", "/"))
    resolved = posixpath.normpath(posixpath.join(base, target))
    return resolved == ".." or resolved.startswith("../") or resolved.startswith("/")


def member_wanted(prefixes: Iterable[str] | None) -> Callable[[str], bool]:
    """Filter: is a member under one of the folders ``prefixes`` (matched as whole path
    components anywhere in the member path)? ``None`` selects everything."""
    if prefixes is None:
        return lambda name: True
    keys = ["/" + p.strip("/") + "/" for p in prefixes]
    return lambda name: any(key in "/" + name.replace("\\", "/").lstrip("/") for key in keys)


def safe_extract(archive: str | Path, dest: str | Path, *, wanted: Callable[[str], bool] | None = None) -> int:
    """Extract ``archive`` into ``dest`` after checking every member; returns files extracted.

    ``wanted`` selects which members are written (all of them are checked)."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = wanted or (lambda name: True)
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, dest, wanted)
    if tarfile.is_tarfile(archive):
        return _extract_tar(archive, dest, wanted)
    raise ValueError(f"{archive}: not a zip or tar archive")


def _extract_zip(archive: Path, dest: Path, wanted: Callable[[str], bool]) -> int:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_member_name(archive, info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symlink; archive rejected")
            count = 0
            for info in infos:
                if info.is_dir() or not wanted(info.filename):
                    continue
                zf.extract(info, dest)
                count += 1
    except zipfile.BadZipFile as err:
        raise ValueError(f"{archive}: corrupt zip archive ({err})") from None
    return count


def _extract_tar(archive: Path, dest: Path, wanted: Callable[[str], bool]) -> int:
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _check_member_name(archive, m.name)
                if m.issym() or m.islnk():
                    if _link_escapes(m.name, m.linkname, hard=m.islnk()):
                        raise UnsafeArchiveError(
                            f"{archive}: link {m.name!r} -> {m.linkname!r} points outside the target folder; "
                            f"archive rejected"
                        )
                elif not (m.isfile() or m.isdir()):
                    raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or FIFO; archive rejected")
            selected = [m for m in members if not m.isdir() and wanted(m.name)]
            tf.extractall(dest, members=selected, filter="data")
    except tarfile.TarError as err:
        raise ValueError(f"{archive}: corrupt tar archive ({err})") from None
    return len(selected)
