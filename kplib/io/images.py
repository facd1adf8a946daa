"""Image files as 8-bit RGB pictures: Pillow for the usual formats, pydicom for DICOM (:mod:`kplib.io.dicom`).

Decoding is part of preprocessing, so its rules are fixed and named by :data:`DECODE_VERSION`, which the embedding
store puts in its namespace (a change of rule re-encodes):

- **EXIF orientation** is applied (``ImageOps.exif_transpose``): a phone photo stored sideways is seen upright.
- **Transparency** (RGBA, LA, palette with a transparent colour) is composited on **black**: medical images (cells,
  fundus, X-ray) have black surroundings, so transparent margins should look like them.
- **16/32-bit integer** images (``I;16``, ``I;16B``, ``I``) are scaled by their *bit range*: :math:`v / (2^b - 1)`
  with :math:`b \\ge 8` the smallest bit depth holding the image's maximum, so a 12-bit X-ray stored in 16 bits
  fills the 8-bit range and nothing is clipped. Images with negative values and **float** images (``F``) are
  min–max scaled, :math:`(v - \\min v) / (\\max v - \\min v)`.
- **Animated / multi-page** files (GIF, WebP, TIFF) use their first frame; multi-frame DICOM its middle frame.
- **DICOM** (by the ``DICM`` marker at byte 128 whatever the file's name, or a ``.dcm`` name) follows the DICOM
  display chain: modality LUT, VOI LUT or window, MONOCHROME1 inverted (:mod:`kplib.io.dicom`).
- **Decompression bombs**: images of more than ``max_pixels`` pixels (default ``PIL.Image.MAX_IMAGE_PIXELS``,
  178,956,970) are refused before their pixels are decoded.

Every failure raises :class:`kplib.errors.ImageDecodeError` whose ``reason`` says what is wrong in words ("file is
empty (0 bytes)", "truncated image data", "image has no pixels", "not an image file", ...).
"""
from __future__ import annotations

import io
import logging
import os
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError, KPLInputError, fix
from .dicom import DICOM_EXTENSIONS, dicom_to_image, is_dicom

log = logging.getLogger("kplib")

#: File names listed as images (case-insensitive). Files with another name are listed only when they carry the
#: DICOM marker (:func:`kplib.io.dicom.is_dicom`): DICOM exports are often named by UID, without an extension.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"} | DICOM_EXTENSIONS
)
#: Names the pixels :func:`decode_image` produces; part of the embedding store's namespace.
DECODE_VERSION = (
    "kplib-decode-2: first frame (DICOM: middle frame); EXIF transpose; alpha on black; 16/32-bit integer scaled by "
    "bit range (2**b-1, b>=8 holds max); float/negative min-max; DICOM modality LUT, VOI LUT or window else full "
    "range, MONOCHROME1 inverted; RGB uint8"
)

_SIGNATURES = (  # what a file starts with -> format, for reasons when Pillow cannot identify it
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"),
)
_PIL_GUARD = threading.Lock()  # Pillow's bomb limit is a process-wide setting: read and raise it under a lock


def _signature(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def _header_size(fmt: str, data: bytes) -> tuple[int, int] | None:
    """Width and height as the header states them (PNG, GIF, BMP), without Pillow."""
    try:
        if fmt == "PNG" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if fmt == "GIF":
            return struct.unpack("<HH", data[6:10])
        if fmt == "BMP":
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
    except struct.error:
        return None
    return None


def _describe_head(data: bytes) -> str:
    head = data[:16]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"it starts with text {head.decode('ascii', 'replace')!r}"
    return f"it starts with bytes {head[:8].hex(' ')}"


def _unidentified_reason(data: bytes) -> str:
    fmt = _signature(data)
    if fmt is None:
        return f"not an image file (Pillow cannot identify the format; {_describe_head(data)})"
    size = _header_size(fmt, data)
    if size is not None and min(size) == 0:
        return f"image has no pixels ({size[0]}×{size[1]} according to its {fmt} header)"
    return f"corrupt {fmt} data (the file starts like a {fmt} image but Pillow cannot decode it)"


def read_bytes(path) -> bytes:
    """The file's bytes, or :class:`ImageDecodeError` saying why they cannot be read (missing, loop, denied...)."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageDecodeError(path, "broken symbolic link (its target does not exist)") from None
        raise ImageDecodeError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied (cannot read the file)") from None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            raise ImageDecodeError(path, "symbolic link loop (the link points back to itself)") from None
        raise ImageDecodeError(path, f"cannot read the file ({exc.strerror or exc})") from None


def pixel_limit(max_pixels: int | None = None) -> int | None:
    """The decompression-bomb limit in force: ``max_pixels``, else Pillow's ``PIL.Image.MAX_IMAGE_PIXELS``."""
    if max_pixels is None:
        with _PIL_GUARD:
            return Image.MAX_IMAGE_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise KPLInputError(f"max_pixels must be a positive integer or None, got {max_pixels!r} "
                            f"{fix(cli='--max-pixels N', python='max_pixels=N')}")
    return int(max_pixels)


def _open(data: bytes, limit: int | None) -> Image.Image:
    """``Image.open`` with Pillow's own bomb guard at least as high as ``limit`` (the explicit check is ours)."""
    with _PIL_GUARD:
        pil_limit = Image.MAX_IMAGE_PIXELS
        if pil_limit is None or (limit is not None and limit <= pil_limit):
            return Image.open(io.BytesIO(data))
        Image.MAX_IMAGE_PIXELS = limit  # raised for this header parse only, under the lock
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def _too_large(width: int, height: int, limit: int) -> str:
    return (f"image too large: {width}×{height} = {width * height} pixels exceeds the decompression-bomb limit of "
            f"{limit} pixels; it was not decoded. If the file is trusted, raise the limit "
            f"{fix(cli='--max-pixels N', python='max_pixels=N')} or downscale the image")


def _scale_high_depth(im: Image.Image) -> Image.Image:
    """16/32-bit or float single-channel image -> 8-bit ``L`` without clipping (module docstring)."""
    arr = np.asarray(im).astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if im.mode != "F" and lo >= 0:
        scaled = arr * (255.0 / (2 ** max(8, int(hi).bit_length()) - 1))
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _composite_on_black(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info):
        return _composite_on_black(im)
    if im.mode.startswith("I") or im.mode == "F":
        return _scale_high_depth(im).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _pillow_decode(data: bytes, path: Path, limit: int | None) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow warns (rather than raises) between its limit and twice that: an error here too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _open(data, limit) as im:
            if limit is not None and im.width * im.height > limit:
                raise ImageDecodeError(path, _too_large(im.width, im.height, limit))
            im.load()
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception as exc:  # noqa: BLE001 - corrupt EXIF must not cost the pixels; say so
                log.warning("ignoring the unreadable EXIF orientation of %s (%s)", path, exc)
                oriented = im
            rgb = _to_rgb(oriented)
            if rgb is im:
                rgb = im.copy()  # detach from the closing file object
            rgb.load()
            return rgb


def decode_image(data: bytes, path, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file's bytes into an 8-bit RGB ``PIL.Image`` (fully loaded), by the module's rules.

    Parameters
    ----------
    data : bytes
        The file's bytes (the caller read them once, e.g. to hash them for the embedding store).
    path : str or Path
        The file, used in messages and to recognise a ``.dcm`` name.
    max_pixels : int, optional
        Decompression-bomb limit in pixels; default Pillow's ``PIL.Image.MAX_IMAGE_PIXELS``.

    Raises
    ------
    kplib.errors.ImageDecodeError
        For empty, truncated, corrupt, pixel-less, oversized or non-image files, with the reason.
    """
    path = Path(path)
    limit = pixel_limit(max_pixels)
    if len(data) == 0:
        raise ImageDecodeError(path, "file is empty (0 bytes)")
    if is_dicom(data) or (path.suffix.lower() in DICOM_EXTENSIONS and _signature(data) is None):
        return dicom_to_image(data, path, max_pixels=limit)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images will not be detected")
    try:
        rgb = _pillow_decode(data, path, limit)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path, f"image too large, refused by the decompression-bomb guard ({exc}); it was not "
                                     f"decoded. If the file is trusted, raise the limit "
                                     f"{fix(cli='--max-pixels N', python='max_pixels=N')}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, _unidentified_reason(data)) from None
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise ImageDecodeError(path, f"truncated image data (the file ends early: {exc})") from None
        raise ImageDecodeError(path, f"corrupt image data ({exc})") from None
    except (SyntaxError, ValueError, TypeError, IndexError, EOFError, struct.error) as exc:
        raise ImageDecodeError(path, f"corrupt image data ({type(exc).__name__}: {exc})") from None
    except MemoryError:
        raise ImageDecodeError(path, "not enough memory to decode the image") from None
    if rgb.width < 1 or rgb.height < 1:
        raise ImageDecodeError(path, f"image has no pixels ({rgb.width}×{rgb.height})")
    return rgb


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Read a file and :func:`decode_image` it."""
    return decode_image(read_bytes(path), path, max_pixels=max_pixels)
