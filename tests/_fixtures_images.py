"""Generators of messy image folders and DICOM files for the tests (everything is written under a given tmp folder).

:func:`messy_dataset` builds ``ROOT/val/<class>/...`` with good files in every class plus every awkward case of
issue 7; it returns, per file, what must happen to it: an expected decoded RGB (checked at named pixels) or the
reason (regex) it must be reported with. :func:`dicom_bytes` writes DICOM files with pydicom, with a patient name and
ID (:data:`SECRETS`) that must never appear in any output. :func:`tree_state` snapshots a folder to prove that
nothing was written into it.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("alpha", "beta gamma", "δέλτα")   # sorted order; a space and non-ASCII letters in folder names


@dataclass
class Expect:
    """What must happen to one file: decode to ``size`` with ``pixels`` {(x, y): rgb} (± ``tol``), or be reported
    with a reason matching ``reason`` (a regex)."""

    size: tuple[int, int] | None = None
    pixels: dict[tuple[int, int], tuple[int, int, int]] = field(default_factory=dict)
    tol: int = 0
    reason: str | None = None

    @property
    def bad(self) -> bool:
        return self.reason is not None


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A few hundred bytes claiming a width×height 8-bit grey PNG: cheap stand-in for a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + _png_chunk(b"IEND", b""))


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _halves(left, right, size=(16, 8), mode="RGB") -> Image.Image:
    w, h = size
    im = Image.new(mode, size, left)
    im.paste(Image.new(mode, (w // 2, h), right), (w // 2, 0))
    return im


def good_rgb(i: int, c: int) -> Image.Image:
    """A plain RGB image, distinct per (class, index)."""
    rng = np.random.default_rng(1000 * c + i)
    arr = rng.integers(0, 50, (24, 28, 3), dtype=np.uint8)
    arr[..., c % 3] += 150
    return Image.fromarray(arr)


def messy_dataset(root: Path, with_bad: bool = True) -> dict[Path, Expect]:
    """Build the messy folder under ``root`` (``root/val/<class>/...``); return {path: Expect} for every image-named
    file that must be listed (hidden and non-image files are created but not listed)."""
    base = root / "val"
    out: dict[Path, Expect] = {}

    def put(cls: str, name: str, data: bytes, expect: Expect) -> Path:
        p = base / cls / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[p] = expect
        return p

    for c, cls in enumerate(CLASSES):
        for i in range(3):
            im = good_rgb(i, c)
            put(cls, f"good_{i}.png", _save(im, "PNG"), Expect(size=im.size, pixels={(0, 0): im.getpixel((0, 0))}))

    a, b, d = CLASSES
    # 16-bit PNG with 12-bit content: scaled by bit range (2**12 - 1), not clipped, not black
    arr16 = np.full((8, 16), 1000, dtype=np.uint16)
    arr16[:, 8:] = 4095
    im16 = Image.fromarray(arr16)
    assert im16.mode.startswith("I;16")
    put(a, "sixteen_bit.png", _save(im16, "PNG"),
        Expect(size=(16, 8), pixels={(0, 0): (62,) * 3, (15, 0): (255,) * 3}))
    # CMYK JPEG: pure cyan
    put(a, "cmyk.jpg", _save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95),
        Expect(size=(16, 16), pixels={(8, 8): (0, 255, 255)}, tol=12))
    # palette PNG with a transparent index: transparent half composited on black, opaque half green
    pal = Image.new("P", (16, 8), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (8, 0, 16, 8))
    put(a, "palette_transparent.png", _save(pal, "PNG", transparency=0),
        Expect(size=(16, 8), pixels={(0, 0): (0, 0, 0), (15, 0): (0, 255, 0)}))
    # LA: opaque grey 200 | fully transparent grey 200 → (200,200,200) | black
    la = _halves((200, 255), (200, 0), mode="LA")
    put(b, "grey_alpha.png", _save(la, "PNG"), Expect(size=(16, 8), pixels={(0, 0): (200,) * 3, (15, 0): (0, 0, 0)}))
    # 1×1 pixel
    put(b, "one_pixel.png", _save(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
        Expect(size=(1, 1), pixels={(0, 0): (10, 200, 30)}))
    # EXIF orientation 6 (rotate 90° clockwise to display): stored 16×8 red|blue → shown 8×16 red over blue
    exif = Image.Exif()
    exif[0x0112] = 6
    put(b, "exif_rotated.jpg", _save(_halves((255, 0, 0), (0, 0, 255)), "JPEG", quality=95, exif=exif),
        Expect(size=(8, 16), pixels={(4, 2): (255, 0, 0), (4, 13): (0, 0, 255)}, tol=40))
    # TIFF and lossless WebP
    put(d, "scan.tiff", _save(_halves((1, 2, 3), (250, 251, 252)), "TIFF"),
        Expect(size=(16, 8), pixels={(0, 0): (1, 2, 3), (15, 7): (250, 251, 252)}))
    put(d, "photo.webp", _save(_halves((9, 99, 199), (200, 100, 0)), "WEBP", lossless=True),
        Expect(size=(16, 8), pixels={(0, 0): (9, 99, 199), (15, 7): (200, 100, 0)}))
    # names with spaces and Unicode
    put(d, "scan 01 – ü é.png", _save(Image.new("RGB", (5, 4), (7, 8, 9)), "PNG"),
        Expect(size=(5, 4), pixels={(0, 0): (7, 8, 9)}))
    put(a, "胸部 X 線.jpeg", _save(Image.new("RGB", (12, 12), (128, 128, 128)), "JPEG", quality=95),
        Expect(size=(12, 12), pixels={(6, 6): (128, 128, 128)}, tol=3))

    # hidden and non-image files: never listed, never read as images
    for cls in CLASSES:
        (base / cls / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 100)
    (base / a / "._good_0.png").write_bytes(b"\0\5\x16\7 AppleDouble junk")
    (base / b / ".hidden.png").write_bytes(_save(Image.new("RGB", (4, 4)), "PNG"))
    (base / d / "notes.txt").write_text("radiologist notes", encoding="utf-8")
    (base / ".hidden_class").mkdir()
    (base / ".hidden_class" / "x.png").write_bytes(_save(Image.new("RGB", (4, 4)), "PNG"))
    # a sub-folder symlink loop inside a class (not descended into)
    os.symlink("..", base / d / "loop_dir")

    if with_bad:
        put(a, "zero_bytes.jpg", b"", Expect(reason=r"file is empty \(0 bytes\)"))
        jpg = _save(good_rgb(7, 0), "JPEG", quality=90)
        put(a, "truncated.jpg", jpg[: len(jpg) // 2], Expect(reason=r"(?i)truncated"))
        png = _save(good_rgb(8, 1), "PNG")
        put(b, "truncated.png", png[: len(png) // 2], Expect(reason=r"(?i)truncated|corrupt"))
        put(b, "report.jpg", b"Patient report: no findings.\n" * 4, Expect(reason=r"not an image file.*text"))
        put(d, "bomb.png", huge_png_header(), Expect(reason=r"too large.*not decoded"))
        loop = base / d / "self_loop.png"
        os.symlink("self_loop.png", loop)
        out[loop] = Expect(reason=r"symbolic link loop")
    return out


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (not following symlinks): relative name → (kind, size, mode, mtime_ns, sha256 |
    link target). Any write, rename, chmod or touch inside the tree changes it."""
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                state[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif os.path.isdir(p):
                state[rel] = ("dir", st.st_mode, st.st_mtime_ns)
            else:
                digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
                state[rel] = ("file", st.st_size, st.st_mode, st.st_mtime_ns, digest)
    st = os.lstat(root)
    state["."] = ("dir", st.st_mode, st.st_mtime_ns)
    return state


def small_kb(path: Path, class_names=CLASSES, n_desc: int = 3) -> Path:
    """A valid schema-v1 KB file for ``class_names`` (written at ``path``, outside any data folder)."""
    import json

    classes = [{"name": n, "display_name": n, "references": [],
                "descriptions": [{"text": f"{adj} {n} pattern", "source": None}
                                 for adj in ("smooth", "grainy", "bright", "dark", "round")[:n_desc]]}
               for n in class_names]
    kb = {"schema_version": 1, "kb_id": "reliability-kb-v1", "dataset": None, "modality": "synthetic",
          "created": "2026-11-25", "method": "curated", "authors": "tests", "generator": None, "source": None,
          "classes": classes}
    path.write_text(json.dumps(kb, ensure_ascii=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ DICOM
#: Header values written into every test DICOM file; no message, log, cache or output may contain them.
SECRETS = ("Doe^Jane", "KPL-SECRET-123", "Springfield General")


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, *,
                compress: str | None = None, preamble: bool = True, pixel_data: bool = True, **attrs) -> bytes:
    """A DICOM file (bytes) holding ``pixels`` ((rows, cols), (rows, cols, 3) or with a leading frame axis), with the
    patient name/ID of :data:`SECRETS` and any extra attributes (``WindowCenter=...``, ``RescaleSlope=...``).
    ``compress``: a transfer syntax UID to encode with (pydicom encodes RLE Lossless itself). ``preamble=False``
    writes a raw data set without the 128-byte preamble and ``DICM`` marker (old exports)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.InstitutionName = SECRETS
    ds.PatientBirthDate = "19700101"
    ds.Modality = "OT"
    bits = bits_stored or (8 if pixels.dtype.itemsize == 1 else 16)
    ds.set_pixel_data(pixels, photometric, bits)
    for key, value in attrs.items():
        setattr(ds, key, value)
    if compress is not None:
        ds.compress(compress)
    if not pixel_data:
        del ds.PixelData
    buf = io.BytesIO()
    if preamble:
        ds.save_as(buf, enforce_file_format=True)
    else:
        del ds.file_meta
        ds.save_as(buf, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def assert_no_secrets(*texts: str) -> None:
    """None of the DICOM header values of :data:`SECRETS` (nor the surname) appears in any of ``texts``."""
    for text in texts:
        for secret in (*SECRETS, "Doe", "SECRET", "19700101"):
            assert secret not in text, f"DICOM header value {secret!r} leaked into: {text[:300]!r}"


def non_utf8_name(stem: bytes = b"caf\xe9", suffix: str = ".png") -> str:
    """A file name whose bytes are not valid UTF-8 (Latin-1 'café'), as Python holds it (surrogate escapes)."""
    return os.fsdecode(stem) + suffix


def kpl_data(capsys, *argv) -> tuple[int, str, str]:
    """``kpl <argv>`` for the ``datasets`` and ``audit`` commands, through a parser holding only them, run as
    ``kplib.cli.main`` runs a command (a KPLError prints one line and gives exit code 2): (code, stdout, stderr)."""
    import argparse
    import sys

    from kplib.cli.data import register
    from kplib.errors import KPLError

    parser = argparse.ArgumentParser(prog="kpl")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    try:
        code = args.func(args)
    except KPLError as exc:
        print(f"kpl: error: {exc}", file=sys.stderr)
        code = 2
    out, err = capsys.readouterr()
    return code, out, err


def unlabelled_copy(root: Path, labelled: Path) -> Path:
    """The PNG images of a labelled ``<class>/<image>`` folder copied into a flat/nested folder without classes."""
    for i, p in enumerate(sorted(labelled.rglob("*.png"))):
        dest = root / ("2021" if i % 2 else "2022/deep") / f"scan_{i:02d}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    return root
