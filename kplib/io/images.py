"""Image files as 8-bit RGB pictures: Pillow for the usual formats, pydicom for DICOM (the ``DICM`` marker or a
``.dcm`` name; :mod:`kplib.io.dicom`). Decoding is part of preprocessing, so its rules are named by
:data:`DECODE_VERSION`, which the embedding store puts in its namespace (a change of rule re-encodes):

- EXIF orientation is applied; transparency is composited on black, like the surroundings of medical images.
- 16/32-bit integer images are scaled by their bit range, :math:`v / (2^b - 1)` with :math:`b \\ge 8` the smallest bit
  depth holding the maximum (a 12-bit X-ray in 16 bits fills the 8-bit range); images with negative values and float
  images are min–max scaled, :math:`(v - \\min v) / (\\max v - \\min v)`.
- Animated / multi-page files give their first frame, multi-frame DICOM its middle one.
- Images of more than ``max_pixels`` pixels (decompression bombs) are refused before their pixels are decoded.

Every failure raises :class:`kplib.errors.ImageDecodeError`, whose ``reason`` says what is wrong. A decoded image's
``info["source_format"]`` names what the file held, e.g. ``"PNG RGBA"`` or ``"DICOM MONOCHROME2 12-bit RLE Lossless"``.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError, KPLInputError
from ..params import Interval
from .dicom import DICOM_EXTENSIONS, RAISE_LIMIT, check_size, dicom_to_image, is_dicom

log = logging.getLogger("kplib")

#: File names listed as images (case-insensitive); files of other names only with the DICOM marker (UID exports).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"} | DICOM_EXTENSIONS)
#: Names the pixels :func:`decode_image` produces; part of the embedding store's namespace.
DECODE_VERSION = (
    "kplib-decode-2: first frame (DICOM: middle frame); EXIF transpose; alpha on black; 16/32-bit integer scaled by "
    "bit range (2**b-1, b>=8 holds max); float/negative min-max; DICOM modality LUT, VOI LUT or window else full "
    "range, MONOCHROME1 inverted; RGB uint8"
)
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
               b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}
_READ_ERRORS = {errno.ENOENT: "file not found", errno.EISDIR: "is a directory, not an image file",
                errno.ELOOP: "symbolic link loop (the link points back to itself)",
                **dict.fromkeys((errno.EACCES, errno.EPERM), "permission denied (cannot read the file)")}
_PIL_GUARD = threading.Lock()  # Pillow's bomb limit is a process-wide setting: read and raise it under a lock


def _signature(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _SIGNATURES.items() if data.startswith(magic)), None)


def _unidentified_reason(data: bytes) -> str:
    """Why Pillow cannot identify ``data``: not an image, an image without pixels (header size), or corrupt."""
    fmt, head = _signature(data), data[:16]
    if fmt is None:
        said = (f"text {head.decode('ascii', 'replace')!r}" if all(32 <= b < 127 or b in (9, 10, 13) for b in head)
                else f"bytes {head[:8].hex(' ')}")
        return f"not an image file (Pillow cannot identify the format; it starts with {said})"
    try:  # width and height as the header states them
        size = (struct.unpack(">II", data[16:24]) if fmt == "PNG" and data[12:16] == b"IHDR"
                else struct.unpack("<HH", data[6:10]) if fmt == "GIF"
                else tuple(map(abs, struct.unpack("<ii", data[18:26]))) if fmt == "BMP" else None)
    except struct.error:
        size = None
    if size is not None and min(size) == 0:
        return f"image has no pixels ({size[0]}×{size[1]} according to its {fmt} header)"
    return f"corrupt {fmt} data (the file starts like a {fmt} image but Pillow cannot decode it)"


def read_bytes(path) -> bytes:
    """The file's bytes, or :class:`ImageDecodeError` saying why they cannot be read (missing, loop, denied...)."""
    path = Path(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = _READ_ERRORS.get(exc.errno, f"cannot read the file ({exc.strerror or exc})")
        if exc.errno == errno.ENOENT and path.is_symlink():
            reason = "broken symbolic link (its target does not exist)"
        raise ImageDecodeError(path, reason) from None


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    """Any Pillow mode -> RGB by the module's rules (alpha on black, high bit depths scaled without clipping)."""
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV; a copy even of RGB
    arr = np.asarray(im).astype(np.float64)
    if not np.isfinite(arr).all():
        raise ImageDecodeError(path, "pixel values include NaN or infinity (a floating-point image): nothing to "
                                     "scale to 8 bits")
    lo, hi = float(arr.min()), float(arr.max())
    if im.mode != "F" and lo >= 0:
        scaled = arr * (255.0 / (2 ** max(8, int(hi).bit_length()) - 1))
    else:
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def _pillow_decode(data: bytes, path: Path, limit: int | None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow only warns up to 2x its limit
        with _PIL_GUARD:  # Pillow's own guard at least as high as ``limit`` for the header parse (the check is ours)
            pil_limit = Image.MAX_IMAGE_PIXELS
            try:
                if pil_limit is not None and (limit is None or limit > pil_limit):
                    Image.MAX_IMAGE_PIXELS = limit
                im = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
        with im:
            check_size(path, im.width, im.height, limit)
            im.load()  # Pillow's guard is back for the frames and tiles it checks while loading
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception as exc:  # noqa: BLE001 - corrupt EXIF must not cost the pixels; say so
                log.warning("ignoring the unreadable EXIF orientation of %s (%s)", path, exc)
                oriented = im
            rgb = _to_rgb(oriented, path)  # a new, loaded image: detached from the file
            rgb.info["source_format"] = f"{im.format} {im.mode}"
            return rgb


def decode_image(data: bytes, path, max_pixels: int | None = None) -> Image.Image:
    """Decode a file's bytes (read once by the caller, who may hash them) into a loaded 8-bit RGB ``PIL.Image``.

    ``path`` names the file in messages and recognises a ``.dcm`` name; ``max_pixels`` is the decompression-bomb
    limit (default ``PIL.Image.MAX_IMAGE_PIXELS``). Empty, truncated, corrupt, pixel-less, oversized and non-image
    files raise :class:`~kplib.errors.ImageDecodeError` with the reason.
    """
    path = Path(path)
    if not (max_pixels is None or Interval(int, 1).accepts(max_pixels)):
        raise KPLInputError(f"max_pixels must be a positive integer or None, got {max_pixels!r} {RAISE_LIMIT}")
    with _PIL_GUARD:
        limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    if len(data) == 0:
        raise ImageDecodeError(path, "file is empty (0 bytes)")
    if is_dicom(data) or (path.suffix.lower() in DICOM_EXTENSIONS and _signature(data) is None):
        return dicom_to_image(data, path, max_pixels=limit)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images will not be detected")
    try:
        return _pillow_decode(data, path, limit)  # Pillow refuses 0-pixel images when it opens them
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path, f"image too large, refused by the decompression-bomb guard ({exc}); it was not "
                                     f"decoded. If the file is trusted, raise the limit {RAISE_LIMIT}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, _unidentified_reason(data)) from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError, struct.error) as exc:
        what = "truncated" if "truncated" in str(exc).lower() else "corrupt"  # Pillow: "image file is truncated"
        raise ImageDecodeError(path, f"{what} image data ({type(exc).__name__}: {exc})") from None
    except MemoryError:
        raise ImageDecodeError(path, "not enough memory to decode the image") from None


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Read a file and :func:`decode_image` it."""
    return decode_image(read_bytes(path), path, max_pixels=max_pixels)
