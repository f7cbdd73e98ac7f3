"""Reading any dataset image as 8-bit RGB, and writing PNGs atomically.

Conversions done by ``read_rgb`` (everything else is rejected with the file name):

- greyscale (1-bit, 8-bit) -> the grey value replicated to R, G and B;
- 16-bit (greyscale or RGB PNG, 16-bit TIFF) -> 8-bit by ``round(v / 257)`` (exact map of
  0..65535 onto 0..255);
- palette -> RGB through the palette;
- with alpha (RGBA, LA, palette with transparency) -> alpha dropped if fully opaque;
  an image with any transparent pixel is rejected, since a restoration target has no
  meaningful colour under transparency;
- CMYK / YCbCr JPEGs -> RGB by Pillow's conversion.

EXIF orientation is applied only when asked (``upright=True``, as ``iln restore`` does for
photos): benchmark files are stored upright, and the dataset pipeline reads their pixels as
stored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from iln.util.files import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".webp")

_16BIT_PNG_RAWMODES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
_EXIF_ORIENTATION = 0x0112
# What ``write_image`` writes for each file suffix: the Pillow format and its settings
# (lossless where the format allows; JPEG at quality 95 without chroma subsampling).
WRITE_FORMATS: dict[str, tuple[str, dict[str, object]]] = {
    ".png": ("PNG", {"compress_level": 6}),
    ".jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".jpeg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".bmp": ("BMP", {}),
    ".tif": ("TIFF", {"compression": "tiff_lzw"}),
    ".tiff": ("TIFF", {"compression": "tiff_lzw"}),
    ".ppm": ("PPM", {}),
    ".webp": ("WEBP", {"lossless": True}),
}


class ImageReadError(ValueError):
    """An image file cannot be used; the message names the file."""


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as err:
        raise ImageReadError(f"{path}: cannot read image header ({err})") from None
    return height, width


def read_rgb(path: str | Path, *, upright: bool = False) -> np.ndarray:
    """Decode an image file to uint8 (H, W, 3) RGB, converting as the module doc says.

    ``upright``: turn the pixels as the file's EXIF orientation tag says (what image viewers
    show); an absent or invalid tag leaves them as stored.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if upright else 1
            if _is_16bit_png_header(img):  # tiles are only known before decoding
                rgba = _read_16bit_png(path)
                array = _drop_opaque_alpha(rgba, path) if rgba.shape[-1] == 4 else rgba
            else:
                img.load()  # full decode here, so truncated files fail now
                array = _to_rgb(img, path)
    except ImageReadError:
        raise
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
    ) as err:
        raise ImageReadError(f"{path}: cannot decode image ({err})") from None
    return np.ascontiguousarray(_orient(array, orientation))


def _orient(array: np.ndarray, orientation: object) -> np.ndarray:
    """(H, W, C) pixels as stored -> as shown for EXIF orientation 1-8 (others: unchanged).

    2 mirrored, 3 turned 180 degrees, 4 flipped, 5 mirrored and turned 90 degrees
    anticlockwise (the transpose), 6 turned 90 degrees clockwise, 7 the transverse, 8 turned
    90 degrees anticlockwise: what Pillow's ``ImageOps.exif_transpose`` does.
    """
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(array, -1)
    if orientation == 7:
        return np.rot90(array, 2).transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(array, 1)
    return array


def _to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode == "L":
        return _grey_to_rgb(np.asarray(img))
    if mode == "1":
        return _grey_to_rgb(np.asarray(img.convert("L")))
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(img).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageReadError(
                f"{path}: integer image with values outside 0..65535 is not supported"
            )
        return _grey_to_rgb(_16_to_8(values))
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in img.info
        return _to_rgb(img.convert("RGBA" if has_alpha else "RGB"), path)
    if mode == "LA":
        la = np.asarray(img)
        return _drop_opaque_alpha(
            np.concatenate([_grey_to_rgb(la[..., 0]), la[..., 1:2]], axis=-1), path
        )
    if mode == "RGBA":
        return _drop_opaque_alpha(np.asarray(img), path)
    if mode in ("CMYK", "YCbCr", "RGBX"):
        return np.asarray(img.convert("RGB"))
    raise ImageReadError(
        f"{path}: unsupported image mode {mode!r} (expected RGB, greyscale, palette or 16-bit)"
    )


def _read_16bit_png(path: Path) -> np.ndarray:
    """Full 16-bit values of a colour PNG: Pillow unpacks the high bytes with the big-endian
    raw mode and the low bytes with the little-endian one; both decodes run in Pillow's C code."""
    planes = []
    for little in (False, True):
        with Image.open(path) as img:
            tiles = list(img.tile)
            if little:
                img.tile = [t._replace(args=_16BIT_PNG_RAWMODES[t.args]) for t in tiles]
            img.load()
            planes.append(np.asarray(img).astype(np.int64))
    values = planes[0] * 256 + planes[1]  # (H, W, C) in 0..65535
    return _16_to_8(values)


def _16_to_8(values: np.ndarray) -> np.ndarray:
    # round(v / 257) in integers: (v + 128) // 257 is exact for 0..65535
    return ((values + 128) // 257).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1).astype(np.uint8)


def _drop_opaque_alpha(rgba: np.ndarray, path: Path) -> np.ndarray:
    alpha = rgba[..., 3]
    if (alpha != 255).any():
        share = float((alpha != 255).mean())
        raise ImageReadError(
            f"{path}: image has transparent pixels ({share:.1%} of the image); "
            "expected an opaque image"
        )
    return rgba[..., :3]


def write_png(path: str | Path, array: np.ndarray, *, compress_level: int = 6) -> None:
    """Write uint8 (H, W, 3) or (H, W) as PNG through the atomic writer (``iln.util.files``)."""
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: write_png expects uint8 pixels, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))):
        raise ValueError(f"{path}: write_png expects (H, W) or (H, W, 3), got shape {array.shape}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(
            tmp, format="PNG", compress_level=compress_level
        )


def write_image(path: str | Path, array: np.ndarray) -> None:
    """Write uint8 (H, W, 3) pixels in the format of the file's suffix (``WRITE_FORMATS``),
    through the atomic writer."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_FORMATS:
        raise ValueError(
            f"{path}: cannot write images as {suffix or 'a file without a suffix'} "
            f"(writable: {', '.join(WRITE_FORMATS)})"
        )
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"{path}: expected uint8 (H, W, 3) pixels, got {array.dtype} {array.shape}"
        )
    fmt, options = WRITE_FORMATS[suffix]
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format=fmt, **options)


def is_plain_rgb_png(path: str | Path) -> bool:
    """True for an 8-bit RGB PNG whose chunks pass Pillow's CRC check: such a file can be
    copied byte for byte instead of decoded and re-encoded."""
    try:
        with Image.open(path) as img:
            if (
                img.format != "PNG"
                or img.mode != "RGB"
                or _is_16bit_png_header(img)
                or img.info.get("transparency")
            ):
                return False
            img.verify()
    except Exception:  # any problem: fall back to the decoding path, which reports it
        return False
    return True


def _is_16bit_png_header(img: Image.Image) -> bool:
    """Pillow decodes 16-bit colour PNGs to 8 bits by truncation; detect them to round instead."""
    return img.format == "PNG" and any(
        isinstance(t.args, str) and t.args in _16BIT_PNG_RAWMODES for t in img.tile
    )
