"""DICOM files as the 8-bit RGB images a CLIP model expects, through pydicom (an optional dependency).

A DICOM file stores values; what a radiologist sees is a chain of look-up tables applied to them (PS3.4 N.2).
:func:`dicom_to_image` follows it for one frame (the middle one, ``NumberOfFrames // 2``, of a multi-frame file):

1. **Modality LUT**: the Modality LUT Sequence, else rescale slope and intercept, :math:`v = m\\,s + b`.
2. **VOI LUT**: the VOI LUT Sequence, else the (first) window; the table's output range :math:`[y_{min}, y_{max}]`
   maps to ``[0, 255]``. Without either, the frame's full range :math:`(v - \\min v) / (\\max v - \\min v)`.
3. **MONOCHROME1** (``0`` = white) is inverted, so bone is bright as in MONOCHROME2.
4. **Colour**: RGB and YBR are scaled by :math:`2^{\\text{BitsStored}} - 1`; PALETTE COLOR goes through its palette.

Compressed transfer syntaxes read as far as pydicom's installed decoders allow; the error names what to install.

**Privacy**: headers carry patient names, IDs and dates. Only the technical attributes of :data:`PIXEL_TAGS` are
parsed, with pydicom's warnings and value checks off, and messages name the path and technical attributes only: no
header value can reach a message, a log or a cache.
"""
from __future__ import annotations

import io
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError, fix

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
#: The only attributes read from a DICOM file: what decoding one frame needs, nothing about the patient.
PIXEL_TAGS = (
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelData", "FloatPixelData",
    "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "RescaleSlope", "RescaleIntercept",
    "ModalityLUTSequence", "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
    *(f"{c}PaletteColorLookupTable{p}" for c in ("Red", "Green", "Blue") for p in ("Descriptor", "Data")),
    *(f"Segmented{c}PaletteColorLookupTableData" for c in ("Red", "Green", "Blue")),
)


def is_dicom(data: bytes) -> bool:
    """Whether ``data`` carries the DICOM Part 10 marker: ``b"DICM"`` after the 128-byte preamble."""
    return data[128:132] == b"DICM"


#: How to raise the decompression-bomb limit, for the command line and for Python.
RAISE_LIMIT = fix(cli="--max-pixels N", python="max_pixels=N")


def check_size(path: Path, width: int, height: int, limit: int | None, what: str = "") -> None:
    """The decompression-bomb guard: an image of more than ``limit`` pixels is refused before it is decoded."""
    if limit is not None and width * height > limit:
        raise ImageDecodeError(path, f"image too large: {width}×{height} = {width * height} pixels{what} exceeds the "
                                     f"decompression-bomb limit of {limit} pixels; it was not decoded. If the file is "
                                     f"trusted, raise the limit {RAISE_LIMIT} "
                                     "or downscale the image")


@contextmanager
def _pydicom(path: Path):
    """pydicom (imported on first use: optional), without warnings or value validation, which quote values."""
    try:
        import pydicom
        import pydicom.pixels
    except ImportError:
        raise ImageDecodeError(path, "DICOM file, but pydicom (the DICOM reader) is not installed: "
                                     "pip install pydicom") from None
    with warnings.catch_warnings(), pydicom.config.disable_value_validation():
        warnings.simplefilter("ignore")
        yield pydicom


def read_header(data: bytes, path):
    """The technical attributes (:data:`PIXEL_TAGS`) of a DICOM file as a ``pydicom.Dataset``; nothing else is read.

    Files without the ``DICM`` marker (raw data sets, old exports) are read with ``force=True``; being uncompressed,
    their transfer syntax is the encoding they were read with.
    """
    path, where = Path(path), "the header"
    with _pydicom(path) as pydicom:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=not is_dicom(data), specific_tags=list(PIXEL_TAGS))
            for where in ("NumberOfFrames", "Rows", "Columns", "BitsStored", "SamplesPerPixel"):
                if ds.get(where) is not None:
                    int(ds[where].value)
            where = "the transfer syntax"
            ds.ensure_file_meta()
            if "TransferSyntaxUID" not in ds.file_meta:
                if is_dicom(data):
                    raise ValueError("no transfer syntax")
                implicit, little = ds.original_encoding
                ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit else (
                    pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad headers; quote no value
            raise ImageDecodeError(path, f"not a readable DICOM file ({type(exc).__name__} while reading {where}: "
                                         "the file is damaged, truncated or not DICOM)") from None
    return ds


def _decoders_hint(pydicom, ts) -> str:
    """The pip commands that would add a decoder for transfer syntax ``ts``, from pydicom's own handler table."""
    try:
        missing = pydicom.pixels.get_decoder(ts).missing_dependencies
    except NotImplementedError:
        return f"pydicom has no decoder for this transfer syntax ({ts})"
    installs = ["pip install " + " ".join({"gdcm": "python-gdcm"}.get(n, n) for n in re.findall(
        r"(?:^| and )([\w-]+)", line.partition(" - requires ")[2]) if n != "numpy") for line in missing]
    return "install a decoder that reads it, one of: " + "; ".join(installs) if installs else ""


def _frame(ds, path: Path) -> np.ndarray:
    """The values of the middle frame, the only one decoded (``ds`` from :func:`read_header`)."""
    frames, ts = int(ds.get("NumberOfFrames", 1) or 1), ds.file_meta.TransferSyntaxUID
    with _pydicom(path) as pydicom:
        try:
            return pydicom.pixels.pixel_array(ds, index=frames // 2 if frames > 1 else None)
        except Exception as exc:  # noqa: BLE001 - decoders raise many types; mapped to a reason below
            text = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        hint = _decoders_hint(pydicom, ts)
    what = f"{ts.name} ({ts})"
    if "missing dependencies" in text[0]:
        raise ImageDecodeError(path, f"DICOM pixel data is compressed as {what}, which no installed decoder reads; "
                                     f"{hint}")
    if "less than expected" in text[0]:
        raise ImageDecodeError(path, f"truncated DICOM pixel data ({text[0]})")
    raise ImageDecodeError(path, f"cannot decode the DICOM pixel data ({what}: {text[-1]})" + (hint and f"; {hint}"))


def _grey_unit(arr: np.ndarray, ds, path: Path) -> np.ndarray:
    """Modality LUT, then VOI LUT / window (or the full range), as values in [0, 1]; MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds)
    if ds.get("VOILUTSequence") or ("WindowCenter" in ds and "WindowWidth" in ds):
        out = apply_voi_lut(values, ds).astype(np.float64)
        # the table's output range: what it gives for the lowest and the highest possible input
        lo, hi = sorted(apply_voi_lut(np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max]), ds).tolist())
    else:
        out = values.astype(np.float64)
        lo, hi = float(out.min()), float(out.max())
    if not np.isfinite(out).all():
        raise ImageDecodeError(path, "DICOM pixel values are not finite (NaN or infinity)")
    unit = np.clip((out - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(out)
    return 1.0 - unit if ds.PhotometricInterpretation == "MONOCHROME1" else unit


def dicom_to_image(data: bytes, path, max_pixels: int | None = None) -> Image.Image:
    """Decode one frame of a DICOM file into an 8-bit RGB ``PIL.Image`` by the module's rules.

    ``path`` names the file in messages; ``max_pixels`` is the decompression-bomb limit per frame, as for
    :func:`kplib.io.images.decode_image`. Failures raise :class:`~kplib.errors.ImageDecodeError`.
    """
    path = Path(path)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    ds = read_header(data, path)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if not is_dicom(data):
            raise ImageDecodeError(path, "not a DICOM file (no 'DICM' marker at byte 128 and no DICOM pixel data)")
        raise ImageDecodeError(path, "DICOM file without pixel data (e.g. a report, structured report or "
                                     "presentation state): nothing to classify")
    if ds.get("Rows") is None or ds.get("Columns") is None:
        raise ImageDecodeError(path, "DICOM pixel data without Rows and Columns attributes (a damaged header)")
    rows, cols, photometric = int(ds.Rows), int(ds.Columns), str(ds.get("PhotometricInterpretation", "")).strip()
    if rows < 1 or cols < 1:
        raise ImageDecodeError(path, f"image has no pixels ({cols}×{rows}, DICOM Columns×Rows)")
    check_size(path, cols, rows, limit, " per DICOM frame")
    arr, unit = _frame(ds, path), None
    try:
        if photometric in ("MONOCHROME1", "MONOCHROME2") and arr.ndim == 2:
            unit = _grey_unit(arr, ds, path)
        elif photometric == "PALETTE COLOR" and arr.ndim == 2:
            from pydicom.pixels import apply_color_lut

            unit = apply_color_lut(arr, ds) / (2.0 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1)
        elif (photometric == "RGB" or photometric.startswith("YBR")) and arr.ndim == 3 and arr.shape[-1] == 3:
            unit = arr / (2.0 ** int(ds.get("BitsStored") or 8) - 1)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ImageDecodeError(path, f"cannot apply the DICOM look-up tables ({type(exc).__name__}: the LUT, "
                                     "palette or window attributes are invalid)") from None
    if unit is None:
        raise ImageDecodeError(path, f"unsupported DICOM image: PhotometricInterpretation {photometric or '(none)'} "
                                     f"with {arr.shape[-1] if arr.ndim == 3 else 1} sample(s) per pixel")
    rgb = Image.fromarray(np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)).convert("RGB")
    rgb.info["source_format"] = (f"DICOM {photometric} {ds.get('BitsStored', '?')}-bit "
                                 f"{ds.file_meta.TransferSyntaxUID.name}")
    return rgb
