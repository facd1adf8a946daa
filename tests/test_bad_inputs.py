"""The corpus of bad and unusual inputs: images, DICOM files, folders and file names.

Each case builds its input under ``data/`` (a fresh folder), runs one action on it and asserts the exact outcome:
decoded as expected, reported with a named reason, or refused with an error that names the fix. Every case also checks
that the data tree is byte-for-byte unchanged afterwards and that no DICOM header value reached a message or a log.

To add a case, append ``Case(id, build, action, expect)`` to :data:`CASES`: ``build(data_dir) -> target``; ``action``
a key of :data:`ACTIONS` (add one for a new kind of input, e.g. knowledge bases); ``expect`` one of
:class:`Decoded`, :class:`Unreadable`, :class:`Refused`, :class:`Check`.
"""
from __future__ import annotations

import io
import logging
import os
import re
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _fixtures_images import assert_no_secrets, dicom_bytes, huge_png_header, messy_dataset, non_utf8_name, tree_state
from PIL import Image

from kplib.errors import ImageDecodeError, KPLInputError
from kplib.io.audit import audit
from kplib.io.datasets import display_path, load_folder, parse_display_path
from kplib.io.images import read_image


# ------------------------------------------------------------------------------------------------ expectations
@dataclass
class Decoded:
    """Decodes to an RGB image of ``size`` with ``pixels`` {(x, y): (r, g, b)} within ``tol``."""

    size: tuple[int, int]
    pixels: dict = field(default_factory=dict)
    tol: int = 0

    def check(self, result, error) -> None:
        assert error is None, error
        assert result.mode == "RGB" and result.size == self.size
        for xy, rgb in self.pixels.items():
            got = result.getpixel(xy)
            assert max(abs(a - b) for a, b in zip(got, rgb)) <= self.tol, (xy, got, rgb)


@dataclass
class Unreadable:
    """Reported as an :class:`ImageDecodeError` whose reason matches ``reason`` (a regex) and names the file."""

    reason: str

    def check(self, result, error) -> None:
        assert isinstance(error, ImageDecodeError), f"expected an unreadable file, got {result!r} / {error!r}"
        assert re.search(self.reason, error.reason), error.reason
        assert str(error.path) in str(error)  # the full path of the file


@dataclass
class Refused:
    """Refused with ``error`` whose message matches ``message`` and, when given, spells ``fix`` for CLI and Python."""

    message: str
    fix: tuple[str, str] | None = None
    error: type = KPLInputError

    def check(self, result, error) -> None:
        assert isinstance(error, self.error), f"expected {self.error.__name__}, got {result!r} / {error!r}"
        assert re.search(self.message, str(error), re.DOTALL), str(error)
        if self.fix:
            assert f"command line: {self.fix[0]}" in str(error) and f"Python: {self.fix[1]}" in str(error)


@dataclass
class Check:
    """Succeeds, and ``fn(result)`` holds (it asserts)."""

    fn: Callable[[Any], None]

    def check(self, result, error) -> None:
        assert error is None, error
        self.fn(result)


@dataclass
class Case:
    id: str
    build: Callable[[Path], Any]
    action: str
    expect: Any
    options: dict = field(default_factory=dict)


def _decode(target, options, monkeypatch):
    if options.get("pillow_limit"):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", options["pillow_limit"])
    if options.get("no_pydicom"):
        monkeypatch.setitem(sys.modules, "pydicom", None)
    if options.get("deny"):  # chmod does not stop root, who runs the tests here: deny the read itself
        real = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "denied"))
                            if self == target else real(self))
    return read_image(target, max_pixels=options.get("max_pixels"))


ACTIONS: dict[str, Callable] = {
    "decode": _decode,
    "load": lambda target, options, mp: load_folder(target, **options),
    "audit": lambda target, options, mp: audit(target, **options),
}


# ------------------------------------------------------------------------------------------------ builders
def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(shape=(32, 32, 3), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def spliced(data: bytes, at: int, new: bytes) -> bytes:
    """``data`` with ``new`` written over its bytes from ``at``."""
    return data[:at] + new + data[at + len(new):]


def png_of_size(w: int, h: int) -> bytes:
    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def exif_rotated() -> bytes:
    im = Image.new("RGB", (16, 8), (255, 0, 0))
    im.paste((0, 0, 255), (8, 0, 16, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return enc(im, "JPEG", quality=95, exif=exif)


def palette_transparent() -> bytes:
    pal = Image.new("P", (16, 8), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (8, 0, 16, 8))
    return enc(pal, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def classes(d: Path, spec: dict[str, int], split="val") -> Path:
    for c, (name, n) in enumerate(spec.items()):
        for i in range(n):
            put(d / split / name / f"{i}.png", enc(Image.new("RGB", (4, 4), (40 * c, i, 9)), "PNG"))
    return d


def with_(d: Path, spec: dict[str, int], extra: Callable[[Path], Any]) -> Path:
    classes(d, spec)
    extra(d / "val")
    return d


def dcm(px, photometric="MONOCHROME2", bits=None, **kw) -> bytes:
    return dicom_bytes(np.asarray(px), photometric, bits, **kw)


A12 = np.array([[0, 1000, 1500, 2000, 4095]], dtype=np.uint16)
CASES: list[Case] = [
    # -------------------------------------------------------------------------------------------- images
    Case("zero-byte file", lambda d: put(d / "x.jpg", b""), "decode", Unreadable(r"^file is empty \(0 bytes\)$")),
    Case("truncated JPEG", lambda d: put(d / "t.jpg", enc(noise(), "JPEG")[:400]), "decode", Unreadable("truncated")),
    Case("truncated PNG", lambda d: put(d / "t.png", enc(noise(), "PNG")[:900]), "decode", Unreadable("truncated")),
    Case("corrupt PNG stream", lambda d: put(d / "c.png", spliced(enc(noise(), "PNG"), 60, b"\0" * 20)), "decode",
         Unreadable(r"^corrupt image data")),
    Case("0-pixel-wide PNG", lambda d: put(d / "w0.png", png_of_size(0, 5)), "decode",
         Unreadable(r"^image has no pixels \(0×5 according to its PNG header\)$")),
    Case("0-pixel-wide BMP", lambda d: put(d / "w0.bmp", spliced(enc(Image.new("RGB", (4, 4)), "BMP"), 18,
                                                                  struct.pack("<i", 0))), "decode",
         Unreadable(r"^image has no pixels \(0×4")),
    Case("text file named .jpg", lambda d: put(d / "report.jpg", b"Patient report: no findings.\n"), "decode",
         Unreadable(r"^not an image file .*text 'Patient report")),
    Case("PNG named .jpg", lambda d: put(d / "p.jpg", enc(Image.new("RGB", (3, 2), (1, 2, 3)), "PNG")), "decode",
         Decoded((3, 2), {(0, 0): (1, 2, 3)})),
    Case("16-bit PNG with 12-bit content", lambda d: put(d / "s.png", enc(Image.fromarray(
        np.array([[1000, 4095]], dtype=np.uint16)), "PNG")), "decode", Decoded((2, 1), {(0, 0): (62,) * 3,
                                                                                       (1, 0): (255,) * 3})),
    Case("float TIFF", lambda d: put(d / "f.tif", enc(Image.fromarray(np.array([[-1.5, 0.5, 2.5]], np.float32)),
                                                      "TIFF")), "decode",
         Decoded((3, 1), {(0, 0): (0,) * 3, (1, 0): (128,) * 3, (2, 0): (255,) * 3})),
    Case("float TIFF with NaN", lambda d: put(d / "n.tif", enc(Image.fromarray(np.array([[np.nan, 1]], np.float32)),
                                                               "TIFF")), "decode", Unreadable("NaN")),
    Case("palette with transparency", lambda d: put(d / "p.png", palette_transparent()), "decode",
         Decoded((16, 8), {(0, 0): (0, 0, 0), (15, 0): (0, 255, 0)})),
    Case("CMYK JPEG", lambda d: put(d / "k.jpg", enc(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)),
         "decode", Decoded((16, 16), {(8, 8): (0, 255, 255)}, tol=12)),
    Case("EXIF-rotated JPEG", lambda d: put(d / "r.jpg", exif_rotated()), "decode",
         Decoded((8, 16), {(4, 2): (255, 0, 0), (4, 13): (0, 0, 255)}, tol=40)),
    Case("animated GIF", lambda d: put(d / "a.gif", animated_gif()), "decode",
         Decoded((4, 4), {(0, 0): (255, 0, 0)}, tol=40)),
    Case("LA with transparent half", lambda d: put(d / "la.png", enc(Image.merge("LA", (
        Image.new("L", (4, 1), 200), Image.frombytes("L", (4, 1), bytes([255, 255, 0, 0])))), "PNG")), "decode",
         Decoded((4, 1), {(0, 0): (200,) * 3, (3, 0): (0, 0, 0)})),
    Case("1x1 pixel", lambda d: put(d / "o.png", enc(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")), "decode",
         Decoded((1, 1), {(0, 0): (10, 200, 30)})),
    Case("decompression bomb", lambda d: put(d / "bomb.png", huge_png_header()), "decode",
         Unreadable(r"too large.*not decoded.*--max-pixels N.*max_pixels=N")),
    Case("large image under a raised --max-pixels", lambda d: put(d / "big.png", enc(Image.new("RGB", (40, 40)),
                                                                                     "PNG")),
         "decode", Decoded((40, 40)), {"pillow_limit": 500, "max_pixels": 1600}),
    Case("symlink loop named like an image", lambda d: (os.symlink("self.png", d / "self.png"), d / "self.png")[1],
         "decode", Unreadable(r"^symbolic link loop")),
    Case("broken symlink", lambda d: (os.symlink(d / "gone.png", d / "b.png"), d / "b.png")[1], "decode",
         Unreadable(r"^broken symbolic link")),
    Case("directory named like an image", lambda d: (d / "dir.jpg").mkdir() or d / "dir.jpg", "decode",
         Unreadable(r"^is a directory")),
    Case("permission denied", lambda d: put(d / "locked.png", enc(Image.new("RGB", (2, 2)), "PNG")), "decode",
         Unreadable(r"^permission denied"), {"deny": True}),
    # -------------------------------------------------------------------------------------------- DICOM
    Case("DICOM MONOCHROME2 16-bit with window", lambda d: put(d / "w.dcm", dcm(A12, bits=12, WindowCenter=1500,
                                                                                  WindowWidth=1000)), "decode",
         Decoded((5, 1), {(0, 0): (0,) * 3, (1, 0): (0,) * 3, (2, 0): (128,) * 3, (4, 0): (255,) * 3})),
    Case("DICOM MONOCHROME1", lambda d: put(d / "m1.dcm", dcm(np.array([[0, 255]], np.uint8), "MONOCHROME1", 8)),
         "decode", Decoded((2, 1), {(0, 0): (255,) * 3, (1, 0): (0,) * 3})),
    Case("DICOM rescale slope/intercept", lambda d: put(d / "ct.dcm", dcm(
        np.array([[0, 100, 200]], np.uint16), bits=12, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=-800,
        WindowWidth=400)), "decode", Decoded((3, 1), {(0, 0): (0,) * 3, (1, 0): (128,) * 3, (2, 0): (255,) * 3})),
    Case("DICOM RGB", lambda d: put(d / "c.dcm", dcm(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8), "RGB", 8,
                                                     PlanarConfiguration=0)), "decode",
         Decoded((2, 1), {(0, 0): (255, 0, 0), (1, 0): (0, 0, 255)})),
    Case("DICOM RLE Lossless", lambda d: put(d / "rle.dcm", dcm(A12, bits=12, compress="1.2.840.10008.1.2.5")),
         "decode", Decoded((5, 1), {(0, 0): (0,) * 3, (4, 0): (255,) * 3})),
    Case("DICOM multi-frame (middle frame)", lambda d: put(d / "mf.dcm", dcm(np.stack(
        [np.full((2, 2), 20 + 40 * k, np.uint8) for k in range(3)]), bits=8, WindowCenter=128, WindowWidth=256)),
         "decode", Decoded((2, 2), {(0, 0): (60,) * 3})),
    Case("DICOM without extension (UID name)", lambda d: put(d / "1.2.840.113619.2.55.3", dcm(
        np.array([[0, 255]], np.uint8), bits=8)), "decode", Decoded((2, 1), {(1, 0): (255,) * 3})),
    Case("DICOM without pixel data", lambda d: put(d / "sr.dcm", dcm(np.zeros((2, 2), np.uint8), bits=8,
                                                                     pixel_data=False)), "decode",
         Unreadable(r"^DICOM file without pixel data")),
    Case("DICOM corrupt header", lambda d: put(d / "bad.dcm", b"\0" * 128 + b"DICM" + b"\xff" * 64), "decode",
         Unreadable(r"^not a readable DICOM file")),
    Case("DICOM truncated pixel data", lambda d: put(d / "cut.dcm", dcm(np.zeros((20, 20), np.uint16), bits=12)[:-99]),
         "decode", Unreadable(r"^truncated DICOM pixel data")),
    Case("DICOM with pydicom missing", lambda d: put(d / "scan", dcm(np.zeros((2, 2), np.uint8), bits=8)), "decode",
         Unreadable(r"pydicom .*not installed: pip install pydicom$"), {"no_pydicom": True}),
    # -------------------------------------------------------------------------------------------- folders and names
    Case("spaces, parentheses and unicode names", lambda d: put(d / "scan (1) – ü 胸部.png", enc(
        Image.new("RGB", (5, 4), (7, 8, 9)), "PNG")), "decode", Decoded((5, 4), {(0, 0): (7, 8, 9)})),
    Case("non-UTF-8 file name", lambda d: put(d / non_utf8_name(), enc(Image.new("RGB", (2, 2), (5, 6, 7)), "PNG")),
         "decode", Decoded((2, 2), {(0, 0): (5, 6, 7)})),
    Case("non-UTF-8 names in a class folder", lambda d: with_(d, {"a": 1, "b": 1}, lambda v: put(
        v / "b" / non_utf8_name(b"\xe9t\xe9"), enc(Image.new("RGB", (2, 2)), "PNG"))), "load",
         Check(lambda ds: (parse_display_path(display_path(ds.paths[2], ds.root), ds.root) == ds.paths[2]) or None)),
    Case("aliased class folders", lambda d: with_(d, {"a": 2, "b": 1}, lambda v: os.symlink(v / "a", v / "a2")),
         "load", Refused(r"same folder", ("--allow-aliases", "allow_aliases=True"))),
    Case("aliased class folders allowed", lambda d: with_(d, {"a": 2, "b": 1}, lambda v: os.symlink(v / "a", v / "c")),
         "load", Check(lambda ds: ds.counts() == {"a": 2, "b": 1, "c": 2} or None), {"allow_aliases": True}),
    Case("empty class folder", lambda d: with_(d, {"a": 1, "b": 1}, lambda v: (v / "empty").mkdir()), "load",
         Refused(r"empty has no image files", ("--skip-empty-classes", "skip_empty=True"))),
    Case("empty class folder skipped", lambda d: with_(d, {"a": 1, "b": 1}, lambda v: (v / "empty").mkdir()), "load",
         Check(lambda ds: ds.dropped_classes == ["empty"] or None), {"skip_empty": True}),
    Case("only one class", lambda d: classes(d, {"only": 3}), "load", Refused(r"at least 2 classes")),
    Case("loose images only", lambda d: put(d / "x.png", enc(Image.new("RGB", (2, 2)), "PNG")).parent, "load",
         Refused(r"no class folders", ("--unlabelled or --classes a,b", "labelled=False or classes=[...]"))),
    Case("unlabelled nested folder", lambda d: [put(d / p, enc(Image.new("RGB", (2, 2)), "PNG")) for p in (
        "2021/a.png", "2022/deep/b.png")] and d, "load",
         Check(lambda ds: (ds.labels is None and len(ds) == 2) or None), {"labelled": False}),
    Case("nested deeper files not used", lambda d: with_(d, {"a": 1, "b": 1}, lambda v: put(
        v / "a" / "sub" / "x.png", b"")), "load", Check(lambda ds: len(ds) == 2 or None)),
    Case("symlink loop folder in a class", lambda d: with_(d, {"a": 1, "b": 1}, lambda v: os.symlink(
        v, v / "a" / "loop")), "load", Check(lambda ds: len(ds) == 2 or None)),
    Case("hidden files and AppleDouble", lambda d: with_(d, {"a": 1, "b": 1}, lambda v: [put(
        v / "a" / n, b"\0\5\x16\7") for n in (".DS_Store", "._0.png")]), "load",
         Check(lambda ds: len(ds) == 2 or None)),
    Case("several splits", lambda d: classes(classes(d, {"a": 1, "b": 1}, "train"), {"a": 1, "b": 1}, "test"), "load",
         Refused(r"several splits", ("--split NAME", "split=NAME"))),
    Case("audit finds a cross-class duplicate", lambda d: with_(d, {"a": 1, "b": 1}, lambda v: put(
        v / "b" / "dup.png", (v / "a" / "0.png").read_bytes())), "audit",
         Check(lambda r: (r.exit_code == 1 and [g["classes"] for g in r.exact_duplicates] == [["a", "b"]]) or None)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, tmp_path, monkeypatch, caplog):
    if case.id.startswith("DICOM") or case.id.startswith("non-UTF-8 names in"):
        pytest.importorskip("pydicom")
    data = tmp_path / "data"
    data.mkdir()
    target = case.build(data)
    before = tree_state(data)
    result = error = None
    with caplog.at_level(logging.DEBUG):
        try:
            result = ACTIONS[case.action](target, dict(case.options), monkeypatch)
        except (ImageDecodeError, KPLInputError) as exc:
            error = exc
    monkeypatch.undo()
    case.expect.check(result, error)
    assert tree_state(data) == before, "the data folder was changed"
    assert_no_secrets(str(error or ""), caplog.text)


def test_corpus_is_large_and_distinct():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


def test_messy_hospital_export_each_file_decoded_or_reported(tmp_path):
    """The reliability fixture: every image-named file of a messy export is listed, and each one is decoded to the
    right pixels or reported with its reason; hidden and non-image files are never listed."""
    root = tmp_path / "hospital export"
    expect = messy_dataset(root)
    before = tree_state(root)
    ds = load_folder(root)
    assert set(ds.paths) == set(expect) and len(ds.paths) == len(expect)
    for p in ds.paths:
        e = expect[p]
        try:
            im = read_image(p)
        except ImageDecodeError as exc:
            assert e.bad and re.search(e.reason, exc.reason), (p.name, exc.reason)
            continue
        assert not e.bad and im.mode == "RGB" and im.size == e.size, p.name
        for xy, rgb in e.pixels.items():
            assert max(abs(a - b) for a, b in zip(im.getpixel(xy), rgb)) <= e.tol, (p.name, xy)
    for p, y in zip(ds.paths, ds.labels.tolist()):
        assert p.parent.name == ds.class_names[y]
    assert tree_state(root) == before
