"""read_rgb conversions and rejections; write_png atomicity."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from iln.data.io import (
    WRITE_FORMATS,
    ImageReadError,
    is_plain_rgb_png,
    list_images,
    read_rgb,
    write_image,
    write_png,
)


def _png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit RGB(A) PNG written by hand (Pillow cannot write one)."""
    h, w, c = values.shape
    raw = b"".join(b"\x00" + values[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    colour_type = {3: 2, 4: 6}[c]
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_rgb_roundtrip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", img)
    out = read_rgb(tmp_path / "a.png")
    assert out.dtype == np.uint8 and np.array_equal(out, img)
    assert is_plain_rgb_png(tmp_path / "a.png")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left behind


def test_greyscale_is_replicated(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    out = read_rgb(tmp_path / "g.png")
    assert out.shape == (3, 4, 3) and all(np.array_equal(out[..., c], grey) for c in range(3))
    Image.fromarray(grey).convert("1").save(tmp_path / "b.bmp")
    assert read_rgb(tmp_path / "b.bmp").shape == (3, 4, 3)


def test_palette_is_converted(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[:2] = (255, 0, 0)
    rgb[2:] = (0, 0, 255)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=2).save(
        tmp_path / "p.png"
    )
    assert np.array_equal(read_rgb(tmp_path / "p.png"), rgb)


def test_opaque_alpha_dropped_transparent_rejected(tmp_path):
    rgba = np.full((3, 3, 4), 200, dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    assert np.array_equal(read_rgb(tmp_path / "opaque.png"), rgba[..., :3])
    rgba[0, 0, 3] = 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "holes.png")
    with pytest.raises(ImageReadError, match=r"holes\.png.*transparent"):
        read_rgb(tmp_path / "holes.png")


def test_16bit_grey_and_rgb_scaled_by_rounding(tmp_path):
    grey = np.array([[0, 128, 129, 385, 65535]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    out = read_rgb(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 1, 255])  # round(v / 257)
    rgb = np.array([[[0, 257, 65535], [1000, 30000, 65534]]], dtype=np.uint16)
    _png16(tmp_path / "c16.png", rgb)
    np.testing.assert_array_equal(
        read_rgb(tmp_path / "c16.png"), np.round(rgb / 257).astype(np.uint8)
    )
    assert not is_plain_rgb_png(tmp_path / "c16.png")  # must be converted, not copied
    rgba = np.concatenate([rgb, np.full((1, 2, 1), 65535, np.uint16)], axis=-1)
    _png16(tmp_path / "a16.png", rgba)
    np.testing.assert_array_equal(
        read_rgb(tmp_path / "a16.png"), np.round(rgb / 257).astype(np.uint8)
    )


def test_truncated_and_garbage_files_name_the_file(tmp_path):
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    write_png(tmp_path / "full.png", img)
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png"):
        read_rgb(tmp_path / "cut.png")
    assert not is_plain_rgb_png(tmp_path / "cut.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=r"junk\.png"):
        read_rgb(tmp_path / "junk.png")


def test_write_png_checks_input(tmp_path):
    with pytest.raises(ValueError, match=r"x\.png.*uint8"):
        write_png(tmp_path / "x.png", np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        write_png(tmp_path / "x.png", np.zeros((2, 2, 4), dtype=np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_list_images_sorted_and_filtered(tmp_path):
    for name in ("b.png", "a.JPG", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_pixels_as_image_viewers_do(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "photo.png", exif=exif)
    with Image.open(tmp_path / "photo.png") as opened:  # Pillow's viewer-equivalent turn
        shown = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    assert np.array_equal(read_rgb(tmp_path / "photo.png", upright=True), shown)
    assert np.array_equal(read_rgb(tmp_path / "photo.png"), stored)  # datasets: as stored
    if orientation in (5, 6, 7, 8):
        assert shown.shape == (7, 5, 3)


def test_write_image_writes_the_format_of_the_suffix(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    for suffix, (fmt, _) in WRITE_FORMATS.items():
        write_image(tmp_path / f"x{suffix}", pixels)
        with Image.open(tmp_path / f"x{suffix}") as img:
            assert img.format == fmt and img.size == (4, 6)
        if fmt != "JPEG":  # the others are lossless
            assert np.array_equal(read_rgb(tmp_path / f"x{suffix}"), pixels), suffix
    with pytest.raises(ValueError, match=r"x\.gif: cannot write images as \.gif"):
        write_image(tmp_path / "x.gif", pixels)
