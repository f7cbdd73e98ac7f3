"""Resumable HTTP(S) downloads with checksum verification (standard library only).

A download goes to ``<file>.part`` and is resumed with an HTTP Range request after a cut
connection (also across runs). Only a complete file whose checksum matches is renamed to its
final name; a mismatching file is deleted. Checksums come from the catalogue (published) or
from a small JSON book that records the SHA-256 of the first successful download.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from iln.util.files import write_json_atomic

CHUNK = 1 << 20
USER_AGENT = "iln-data/1.0 (+python urllib)"


class DownloadError(RuntimeError):
    """A dataset could not be fetched; the message names it, the URL and what to do."""


@dataclass(frozen=True)
class Expected:
    """Checksums a file must match (any may be None)."""

    sha256: str | None = None
    md5: str | None = None


def file_digests(path: Path) -> dict[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            sha.update(block)
            md5.update(block)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def mismatch(digests: dict[str, str], expected: Expected) -> str | None:
    """Description of the first checksum that does not match, or None."""
    for algo in ("sha256", "md5"):
        want = getattr(expected, algo)
        if want and digests[algo].lower() != want.lower():
            return f"{algo} {digests[algo]} (expected {want})"
    return None


class ChecksumBook:
    """SHA-256 recorded at first download, keyed by file name (commit the file to pin data).

    ``writer`` names the stage that records entries, for the message when the file is damaged
    (the data sets' book is written by the download stage, the released weights' book by the
    check_released stage).
    """

    def __init__(self, path: str | Path, *, writer: str = "the download stage") -> None:
        self.path = Path(path)
        fix = f"{writer} writes it: restore it from git, or delete it to record fresh checksums"
        if self.path.exists():
            try:
                self.entries: dict[str, dict[str, str]] = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(
                    f"{self.path}: unreadable checksum file, not valid JSON ({err}); {fix}"
                ) from None
            if not isinstance(self.entries, dict):
                raise ValueError(
                    f"{self.path}: unreadable checksum file (expected a JSON object); {fix}"
                )
            for name, entry in self.entries.items():
                if not isinstance(entry, dict) or not all(
                    isinstance(v, str) for v in entry.values()
                ):
                    raise ValueError(
                        f"{self.path}: unreadable checksum file (entry {name!r} is "
                        f"{json.dumps(entry)[:60]}, expected an object of strings such as "
                        f'{{"sha256": ..., "url": ...}}); {fix}'
                    )
        else:
            self.entries = {}

    def get(self, filename: str) -> str | None:
        return self.entries.get(filename, {}).get("sha256")

    def record(self, filename: str, sha256: str, url: str) -> None:
        self.entries[filename] = {"sha256": sha256, "url": url}
        write_json_atomic(self.path, self.entries)

    def get_content(self, set_name: str) -> str | None:
        """The content digest recorded for a set (archives pinned by content)."""
        return self.entries.get(set_name, {}).get("content_sha256")

    def record_content(self, set_name: str, digest: str, url: str) -> None:
        self.entries[set_name] = {"content_sha256": digest, "url": url}
        write_json_atomic(self.path, self.entries)


def fetch(
    url: str,
    dest: str | Path,
    *,
    expected: Expected = Expected(),
    label: str = "",
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 2.0,
) -> dict[str, str]:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify, rename; return its digests.

    An existing ``dest`` is verified and reused; if it does not match it is deleted and
    downloaded again. Raises DownloadError naming ``label`` and the URL.
    """
    dest = Path(dest)
    label = label or dest.name
    if not url.startswith(("https://", "http://")):
        raise DownloadError(f"{label}: only http(s) URLs are supported, got {url!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        digests = file_digests(dest)
        if mismatch(digests, expected) is None:
            return digests
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _download_to(url, part, label=label, progress=progress, timeout=timeout)
            break
        except _Retryable as err:
            attempt += 1
            if attempt > retries:
                raise DownloadError(
                    f"{label}: download from {url} failed after {retries + 1} attempts "
                    f"({err.__cause__ or err}). Check the network, or use the embedded default "
                    f"set (data.datasets: [default]), or point data.local.<set> at a folder that "
                    f"already holds the images. The partial file "
                    f"{part} is kept and will be resumed."
                ) from None
            time.sleep(backoff * attempt)
    digests = file_digests(part)
    problem = mismatch(digests, expected)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{label}: checksum mismatch for {url}: got {problem}; the download was deleted"
        )
    os.replace(part, dest)
    return digests


class _Retryable(Exception):
    pass


def _download_to(url: str, part: Path, *, label: str, progress: bool, timeout: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left to fetch: the .part is complete
            return
        if err.code in (408, 429, 500, 502, 503, 504):
            raise _Retryable(f"HTTP {err.code}") from err
        raise DownloadError(
            f"{label}: {url} answered HTTP {err.code} {err.reason}. Use the embedded default set "
            f"or point data.local.<set> at a local copy."
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _Retryable(str(err)) from err
    with response:
        status = getattr(response, "status", 200)
        ctype = response.headers.get("Content-Type", "")
        if ctype.startswith("text/html"):
            raise DownloadError(
                f"{label}: {url} returned a web page instead of the file (a login, quota or "
                f"confirmation page). Download it in a browser into {part.parent} as "
                f"{part.name[: -len('.part')]}, or point data.local.<set> at a local copy."
            )
        if offset and status != 206:  # the server ignored the Range header: start again
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        mode = "ab" if offset else "wb"
        received = 0
        with (
            open(part, mode) as handle,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            try:
                while block := response.read(CHUNK):
                    handle.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (TimeoutError, OSError, http.client.HTTPException) as err:
                raise _Retryable(str(err)) from err
        if length is not None and received < int(length):
            raise _Retryable(f"connection closed after {offset + received} of {total} bytes")
