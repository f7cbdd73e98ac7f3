"""Atomic file writers: a reader (or a crash) never sees half a file.

Every output of the project is written through ``atomic_path``: the bytes go to a temp file
in the destination folder, named ``.<name>.<pid>.<random>.iln.tmp`` (``<name>`` cut short if the
temp name would pass the 255-byte file-name limit), which is renamed over
the destination only when complete. On any failure the temp file is removed; a full disk
is reported as one ``DiskFullError`` line naming the file. Temp files are created with the
permissions of a normal file (0666 minus the umask). A temp file left by a killed process
(kill -9 cannot be caught) is removed by ``remove_stale_temps`` at the next stage start,
and ``.dvcignore`` keeps such files out of every DVC output.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".iln.tmp"
# Temp files of this project: ours, and those of the torch.save writer used before (".x.tmp<pid>").
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]+\.iln\.tmp$|^\..+\.tmp(\d+)$")
_NAME_MAX_BYTES = 255  # longest file name on Linux, macOS and Windows file systems
_FULL_DISK_BYTES = 1 << 20  # a write that failed with less than this free: the disk was full


class DiskFullError(OSError):
    """No space left while writing an output; the message names the file."""


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; write it completely, and it replaces ``path``.

    with atomic_path(out) as tmp:
        torch.save(obj, tmp)

    Any exception removes the temp file. A write that fails because the disk is full
    (ENOSPC, or a library's own wording of it such as torch's ``basic_ios::clear: iostream
    error`` with the disk at 0 bytes free) raises ``DiskFullError`` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_temp_name(path.name))
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # honours the umask
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        if not full and isinstance(err, (OSError, RuntimeError)):
            free = _free_bytes(path.parent)  # measured before the partial file is removed
            full = 0 <= free < _FULL_DISK_BYTES
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(
                errno.ENOSPC,
                f"{path}: no space left on the device while writing it "
                f"({_free_bytes(path.parent)} bytes free in {path.parent} after removing the "
                f"partial file); free some space and rerun",
            ) from None
        raise


def _temp_name(name: str) -> str:
    """``.<name>.<pid>.<random>.iln.tmp``, with ``name`` shortened (whole UTF-8 characters)
    so that the temp name fits the 255-byte limit of file names wherever ``name`` does."""
    tail = f".{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    room = _NAME_MAX_BYTES - 1 - len(tail.encode())
    head = name.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
    return f".{head}{tail}"


def remove_stale_temps(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """Remove temp files of this project in ``folder`` whose writing process is gone
    (left by kill -9 or a lost machine); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for candidate in folder.rglob(".*") if recursive else folder.glob(".*"):
        match = _TEMP_NAME.match(candidate.name)
        if match is None or not candidate.is_file():
            continue
        pid = int(match.group(1) or match.group(2))
        if pid != os.getpid() and process_alive(pid):  # our pid: an earlier process's leftover
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's live process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return False
    return True


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def strict_json(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None: strict JSON, which DVC and browsers
    parse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Strict JSON (non-finite numbers become null), keys sorted, written atomically."""
    write_text_atomic(
        path, json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    )


def write_csv_atomic(path: Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text_atomic(path, buffer.getvalue())


def read_csv_rows(path: Path | str, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV (as ``write_csv_atomic`` writes them) as string dicts; raises naming the
    file if a required column is absent."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        missing = [c for c in required if c not in fields]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; "
                f"expected at least {list(required)}, found {fields}"
            )
        return list(reader)
