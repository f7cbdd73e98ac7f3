"""Downloads against a local HTTP server (127.0.0.1, in a thread), safe extraction, set
preparation."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iln.data import catalog
from iln.data.archive import ExtractLimits, UnsafeArchiveError, member_wanted, safe_extract
from iln.data.download import DownloadError, Expected, fetch
from iln.data.io import read_rgb, write_png
from iln.data.params import DataParams
from iln.data.prepare import Sources, prepare_sets
from tests.helpers import write_params

ROOT = Path(__file__).resolve().parents[1]


class Server:
    """Serves ``files`` with Range support; ``cut[name] = n`` drops the connection after n bytes
    once."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.content_type = "application/octet-stream"
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[len("bytes=") :].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", server.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                limit = server.cut.pop(name, None)
                if limit is not None:
                    self.wfile.write(body[:limit])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_resume_after_cut_connection(server, tmp_path):
    data = np.random.default_rng(0).bytes(300_000)
    server.files["blob.bin"] = data
    server.cut["blob.bin"] = 100_000
    digests = fetch(
        server.url("blob.bin"),
        tmp_path / "blob.bin",
        progress=False,
        backoff=0,
        expected=Expected(sha256=hashlib.sha256(data).hexdigest()),
    )
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert digests["sha256"] == hashlib.sha256(data).hexdigest()
    assert server.requests == [("blob.bin", None), ("blob.bin", "bytes=100000-")]
    assert not (tmp_path / "blob.bin.part").exists()


def test_resume_across_runs_from_part_file(server, tmp_path):
    data = b"0123456789" * 1000
    server.files["f"] = data
    (tmp_path / "f.part").write_bytes(data[:4000])
    fetch(server.url("f"), tmp_path / "f", progress=False)
    assert (tmp_path / "f").read_bytes() == data and server.requests == [("f", "bytes=4000-")]


def test_checksum_mismatch_is_rejected_and_removed(server, tmp_path):
    server.files["f"] = b"payload"
    with pytest.raises(DownloadError, match=r"label-x: checksum mismatch .*sha256"):
        fetch(
            server.url("f"),
            tmp_path / "f",
            expected=Expected(sha256="0" * 64),
            label="label-x",
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DownloadError, match="md5"):
        fetch(server.url("f"), tmp_path / "f", expected=Expected(md5="0" * 32), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_reused_or_replaced(server, tmp_path):
    server.files["f"] = b"good"
    (tmp_path / "f").write_bytes(b"good")
    fetch(
        server.url("f"),
        tmp_path / "f",
        expected=Expected(md5=hashlib.md5(b"good").hexdigest()),
        progress=False,
    )
    assert server.requests == []
    (tmp_path / "f").write_bytes(b"bad!")
    fetch(
        server.url("f"),
        tmp_path / "f",
        expected=Expected(md5=hashlib.md5(b"good").hexdigest()),
        progress=False,
    )
    assert (tmp_path / "f").read_bytes() == b"good"


def test_offline_error_names_dataset_url_and_alternatives(server, tmp_path):
    url = server.url("f")
    server.close()  # nothing listens any more
    with pytest.raises(DownloadError) as err:
        fetch(url, tmp_path / "f", label="Set5", progress=False, retries=1, backoff=0, timeout=2)
    message = str(err.value)
    assert (
        "Set5" in message
        and url in message
        and "embedded default" in message
        and "data.local" in message
    )
    server.httpd = None
    server.close = lambda: None


def test_html_page_instead_of_file(server, tmp_path):
    server.files["f"] = b"<html>confirm</html>"
    server.content_type = "text/html; charset=utf-8"
    with pytest.raises(DownloadError, match="web page"):
        fetch(server.url("f"), tmp_path / "f", progress=False)
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(server.url("missing"), tmp_path / "g", progress=False)


def _tar_bytes(
    members: dict[str, bytes], links: dict[str, str] | None = None, gz: bool = True
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink_out"])
def test_unsafe_tar_rejected_before_anything_is_written(tmp_path, kind):
    members = {"ok/a.txt": b"a"}
    links = None
    if kind == "dotdot":
        members["ok/../../evil.txt"] = b"x"
    elif kind == "absolute":
        members["/tmp/evil.txt"] = b"x"
    else:
        links = {"ok/link": "../../outside"}
    (tmp_path / "a.tar.gz").write_bytes(_tar_bytes(members, links))
    with pytest.raises(UnsafeArchiveError, match="archive rejected"):
        safe_extract(tmp_path / "a.tar.gz", tmp_path / "out")
    assert list((tmp_path / "out").rglob("*")) == []
    assert not (tmp_path / "evil.txt").exists()


def test_unsafe_zip_rejected_and_filtering(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("d/a.txt", "a")
        zf.writestr("../evil.txt", "x")
    (tmp_path / "bad.zip").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match=r"\.\./evil\.txt"):
        safe_extract(tmp_path / "bad.zip", tmp_path / "out")
    assert list((tmp_path / "out").rglob("*")) == []
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("top/keep/a.txt", "a")
        zf.writestr("top/skip/b.txt", "b")
    (tmp_path / "good.zip").write_bytes(buf.getvalue())
    assert (
        safe_extract(tmp_path / "good.zip", tmp_path / "out2", wanted=member_wanted(["keep"])) == 1
    )
    assert [p.name for p in (tmp_path / "out2").rglob("*.txt")] == ["a.txt"]
    (tmp_path / "plain.tar").write_bytes(_tar_bytes({"x/y.txt": b"y", "x/z.txt": b"z"}, gz=False))
    assert safe_extract(tmp_path / "plain.tar", tmp_path / "out3") == 2


def _symlink_chain_tar(depth: int = 5) -> bytes:
    """The CVE-2025-4517 shape: a chain of symlinks whose resolved path passes PATH_MAX, then a
    link that climbs out through it and a file written through that link."""
    long = "d" * 247
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        path = ""
        for _ in range(16):
            for name, target in ((path + long, None), (path + "a", long)):
                info = tarfile.TarInfo(name)
                if target is None:
                    info.type = tarfile.DIRTYPE
                else:
                    info.type, info.linkname = tarfile.SYMTYPE, target
                tf.addfile(info)
            path += "a/"
        info = tarfile.TarInfo("escape")
        info.type, info.linkname = tarfile.SYMTYPE, path + "/".join([".."] * (16 + depth))
        tf.addfile(info)
        info = tarfile.TarInfo("escape/file")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"pwnd"))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["chain", "inside_symlink", "hardlink"])
def test_tar_links_of_any_kind_are_refused(tmp_path, kind):
    target = tmp_path / "a" / "b" / "c" / "d" / "e" / "out"
    if kind == "chain":
        data = _symlink_chain_tar()
    elif kind == "inside_symlink":
        data = _tar_bytes({"x/y.txt": b"y"}, {"x/l": "y.txt"}, gz=False)
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            info = tarfile.TarInfo("x/y.txt")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"y"))
            info = tarfile.TarInfo("x/h")
            info.type, info.linkname = tarfile.LNKTYPE, "x/y.txt"
            tf.addfile(info)
        data = buf.getvalue()
    (tmp_path / "evil.tar").write_bytes(data)
    with pytest.raises(UnsafeArchiveError, match="link"):
        safe_extract(tmp_path / "evil.tar", target)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [tmp_path / "evil.tar"]


def test_decompression_bomb_and_member_count_are_refused(tmp_path):
    bomb = tmp_path / "zeros.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("zeros.bin", "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(64):  # 64 MiB of zeros in ~64 KiB
                f.write(chunk)
    with pytest.raises(UnsafeArchiveError, match=r"decompression bomb.*max_ratio"):
        safe_extract(bomb, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    many = tmp_path / "many.tar"
    many.write_bytes(_tar_bytes({f"f{i}.txt": b"x" for i in range(5)}, gz=False))
    with pytest.raises(UnsafeArchiveError, match="5 members, more than the limit of 4"):
        safe_extract(many, tmp_path / "out2", limits=ExtractLimits(max_members=4))
    with pytest.raises(UnsafeArchiveError, match="max_gib"):
        safe_extract(many, tmp_path / "out3", limits=ExtractLimits(max_bytes=4))
    assert safe_extract(many, tmp_path / "out4") == 5


def _png_bytes(img: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode).save(buf, "PNG") if mode else Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _benchmark_tar(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    members = {
        f"benchmark/Set5/HR/img{i}.png": _png_bytes(
            rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        )
        for i in range(4)
    }
    members["benchmark/Set5/HR/grey.png"] = _png_bytes(
        rng.integers(0, 256, (12, 10), dtype=np.uint8), "L"
    )
    members["benchmark/Set5/LR_bicubic/X2/img0x2.png"] = b"unused"
    return _tar_bytes(members)


def _sources(tmp_path: Path, **local) -> Sources:
    return Sources(
        embedded_dir=tmp_path / "default",
        download_dir=tmp_path / "downloads",
        checksum_file=tmp_path / "checksums.json",
        local={k: Path(v) for k, v in local.items()},
    )


def test_prepare_downloads_extracts_normalises_and_records(server, tmp_path, monkeypatch):
    server.files["benchmark.tar"] = _benchmark_tar()
    monkeypatch.setitem(
        catalog.ARCHIVES,
        "EDSR_benchmark",
        catalog.Archive("benchmark.tar", server.url("benchmark.tar")),
    )
    hr = tmp_path / "hr"
    summary = prepare_sets(
        ["Set5"], hr, _sources(tmp_path), workers=1, progress=False, log=lambda _: None
    )
    names = sorted(p.name for p in (hr / "Set5").iterdir())
    assert names == ["grey.png", "img0.png", "img1.png", "img2.png", "img3.png"]
    assert read_rgb(hr / "Set5" / "grey.png").shape == (12, 10, 3)
    book = json.loads((tmp_path / "checksums.json").read_text())
    assert book["benchmark.tar"]["sha256"] == summary["Set5"]["sha256"]
    assert not list((tmp_path / "downloads").glob(".extract-*")) and not list(hr.glob(".staging-*"))
    # a different file behind the same URL no longer matches the recorded checksum
    (tmp_path / "downloads" / "benchmark.tar").unlink()
    server.files["benchmark.tar"] = _benchmark_tar(seed=1)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        prepare_sets(
            ["Set5"], hr, _sources(tmp_path), workers=1, progress=False, log=lambda _: None
        )
    assert sorted(p.name for p in (hr / "Set5").iterdir()) == names  # previous copy untouched
    assert not (tmp_path / "downloads" / "benchmark.tar").exists()
    assert not (tmp_path / "downloads" / "benchmark.tar.part").exists()


def _classic5_zip(images: dict[str, bytes], *, level: int, date: tuple) -> bytes:
    """A GitHub-style source zip: the same images may come with other compression and dates."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
        for name, data in images.items():
            zf.writestr(zipfile.ZipInfo(f"SwinIR-abc/testsets/classic5/{name}", date), data)
    return buf.getvalue()


def test_github_archives_are_pinned_by_the_content_of_their_images(server, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = {
        f"img{i}.bmp": _png_bytes(rng.integers(0, 256, (9, 8), dtype=np.uint8), "L")
        for i in range(5)
    }
    monkeypatch.setitem(
        catalog.ARCHIVES,
        "SwinIR_testsets",
        catalog.Archive("swinir.zip", server.url("swinir.zip"), pin="content"),
    )

    def prepare():
        (tmp_path / "downloads" / "swinir.zip").unlink(missing_ok=True)  # download afresh
        return prepare_sets(
            ["Classic5"],
            tmp_path / "hr",
            _sources(tmp_path),
            workers=1,
            progress=False,
            log=lambda _: None,
        )

    server.files["swinir.zip"] = _classic5_zip(images, level=1, date=(2020, 1, 1, 0, 0, 0))
    first = prepare()["Classic5"]
    book = json.loads((tmp_path / "checksums.json").read_text())
    assert "swinir.zip" not in book  # the zip's bytes are not pinned
    assert book["Classic5"]["content_sha256"] == first["content_sha256"]
    # regenerated by the server: other bytes, same images -> accepted
    server.files["swinir.zip"] = _classic5_zip(images, level=9, date=(2024, 6, 1, 12, 0, 0))
    assert prepare()["Classic5"]["content_sha256"] == first["content_sha256"]
    # one image changed upstream -> refused, the installed copy stays
    images["img3.bmp"] = _png_bytes(np.zeros((9, 8), np.uint8), "L")
    server.files["swinir.zip"] = _classic5_zip(images, level=1, date=(2020, 1, 1, 0, 0, 0))
    with pytest.raises(DownloadError, match="Classic5: the images extracted .* differ"):
        prepare()
    assert len(list((tmp_path / "hr" / "Classic5").glob("*.png"))) == 5


def test_prepare_incomplete_set_is_not_installed(server, tmp_path, monkeypatch):
    server.files["benchmark.tar"] = _tar_bytes(
        {"benchmark/Set14/HR/a.png": _png_bytes(np.zeros((4, 4, 3), np.uint8))}
    )
    monkeypatch.setitem(
        catalog.ARCHIVES,
        "EDSR_benchmark",
        catalog.Archive("benchmark.tar", server.url("benchmark.tar")),
    )
    with pytest.raises(ValueError, match="Set14: found 1 images .* complete copy has 14"):
        prepare_sets(
            ["Set14"],
            tmp_path / "hr",
            _sources(tmp_path),
            workers=1,
            progress=False,
            log=lambda _: None,
        )
    assert not (tmp_path / "hr" / "Set14").exists() and not list(
        (tmp_path / "hr").glob(".staging-*")
    )


def test_prepare_embedded_and_local(tmp_path):
    write_png(tmp_path / "default/train/a.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "default/test/b.png", np.zeros((8, 8, 3), np.uint8))
    local = tmp_path / "mine" / "Kodak"
    local.mkdir(parents=True)
    for i in range(24):
        Image.fromarray(np.full((6, 6, 3), i, np.uint8)).save(local / f"kodim{i:02d}.bmp")
    hr = tmp_path / "hr"
    summary = prepare_sets(
        ["default", "Kodak24"],
        hr,
        _sources(tmp_path, Kodak24=local),
        workers=2,
        progress=False,
        log=lambda _: None,
    )
    assert [p.name for p in (hr / "default_train").iterdir()] == ["a.png"]
    assert (
        len(list((hr / "Kodak24").glob("*.png"))) == 24 and summary["Kodak24"]["origin"] == "local"
    )
    assert (hr / "default_train/a.png").read_bytes() == (
        tmp_path / "default/train/a.png"
    ).read_bytes()


def test_no_public_download_explains(tmp_path):
    with pytest.raises(DownloadError, match="Manga109.*manga109.org.*data.local.Manga109"):
        prepare_sets(
            ["Manga109"],
            tmp_path / "hr",
            _sources(tmp_path),
            workers=1,
            progress=False,
            log=lambda _: None,
        )


def test_data_params_validation():
    assert DataParams(datasets=("default", "DF2K")).datasets == ("default", "DF2K")
    with pytest.raises(ValueError, match=r"unknown dataset 'Set6'.*catalogue: .*Set5"):
        DataParams(datasets=("Set6",))
    with pytest.raises(ValueError, match="local.default_train"):
        DataParams(datasets=("default",), local={"default_train": "x"})
    assert catalog.expand(["DF2K", "DIV2K"]) == ["DIV2K_train", "Flickr2K", "DIV2K_valid"]


@pytest.mark.integration
def test_download_stage_cli_default(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "default").symlink_to(ROOT / "data" / "default")
    write_params(tmp_path / "params.yaml", data={"datasets": ["default"], "workers": 1})
    run = subprocess.run(
        [sys.executable, str(ROOT / "stages/download.py"), "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "data/hr/default_train").glob("*.png"))) == 5
    assert len(list((tmp_path / "data/hr/default_test").glob("*.png"))) == 2
