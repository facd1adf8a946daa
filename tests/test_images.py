"""kplib.io.images: the decoding rules (EXIF, alpha, bit depth, frames), the reasons for bad files, the bomb guard."""
from __future__ import annotations

import io
import os
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from _fixtures_images import huge_png_header
from PIL import Image

from kplib.errors import ImageDecodeError, KPLInputError
from kplib.io import images
from kplib.io.images import DECODE_VERSION, IMAGE_EXTENSIONS, decode_image, read_image


def save_rgb(path: Path, color=(10, 20, 30), size=(8, 6), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)


def png_with_size(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def reason_of(path, **kw) -> str:
    with pytest.raises(ImageDecodeError) as ei:
        read_image(path, **kw)
    assert ei.value.path == Path(path) and str(path) in str(ei.value)
    return ei.value.reason


# ------------------------------------------------------------------------------------------------ constants
def test_extensions_and_version():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm"} <= IMAGE_EXTENSIONS
    assert "DICOM" in DECODE_VERSION and "EXIF" in DECODE_VERSION and "alpha on black" in DECODE_VERSION


# ------------------------------------------------------------------------------------------------ decoding rules
def test_rgb_jpeg_roundtrip_mode_and_size(tmp_path):
    im = read_image(save_rgb(tmp_path / "a.jpg", (200, 100, 50), size=(17, 9)))
    assert im.mode == "RGB" and im.size == (17, 9)
    assert np.abs(np.asarray(im).astype(int) - [200, 100, 50]).max() <= 3


def test_grayscale_becomes_three_equal_channels(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.array([[0, 77], [200, 255]], dtype=np.uint8), mode="L").save(p)
    arr = np.asarray(read_image(p))
    assert arr.shape == (2, 2, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert arr[..., 0].tolist() == [[0, 77], [200, 255]]


def test_16bit_png_scaled_by_bit_range_not_clipped(tmp_path):
    vals = np.array([[0, 1, 2048, 4095]], dtype=np.uint16)  # 12-bit values in 16 bits: divide by 4095
    p = tmp_path / "x12.png"
    Image.fromarray(vals).save(p)
    assert Image.open(p).mode == "I;16"
    assert np.asarray(read_image(p))[..., 0].tolist() == [[0, 0, round(2048 * 255 / 4095), 255]]


def test_16bit_full_range_and_big_endian_tiff(tmp_path):
    vals = np.array([[0, 257], [4096, 65535]], dtype=">u2")
    p = tmp_path / "be.tif"
    Image.frombytes("I;16B", (2, 2), vals.tobytes()).save(p)
    assert Image.open(p).mode == "I;16B"
    assert np.asarray(read_image(p))[..., 0].tolist() == [[0, 1], [16, 255]]


def test_32bit_integer_image(tmp_path):
    p = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 1023]], dtype=np.int32)).save(p)  # 10-bit range
    assert np.asarray(read_image(p))[..., 0].tolist() == [[0, 255]]


def test_negative_integers_and_float_are_min_max_scaled(tmp_path):
    p = tmp_path / "neg.tif"
    Image.fromarray(np.array([[-1, 0, 1]], dtype=np.int32)).save(p)
    assert np.asarray(read_image(p))[..., 0].tolist() == [[0, 128, 255]]
    q = tmp_path / "f.tif"
    Image.fromarray(np.array([[-1.5, 0.5, 2.5]], dtype=np.float32)).save(q)
    assert Image.open(q).mode == "F"
    assert np.asarray(read_image(q))[..., 0].tolist() == [[0, 128, 255]]


def test_palette_with_transparency_composited_on_black(tmp_path):
    p = tmp_path / "pal.png"
    im = Image.new("P", (4, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putdata([0, 0, 1, 1])
    im.save(p, transparency=0)
    arr = np.asarray(read_image(p))
    assert arr[0, 0].tolist() == [0, 0, 0] and arr[0, 3].tolist() == [0, 255, 0]


def test_palette_without_transparency(tmp_path):
    p = tmp_path / "pal.gif"
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putdata([0, 1])
    im.save(p)
    assert np.asarray(read_image(p))[0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_la_alpha_on_black(tmp_path):
    p = tmp_path / "la.png"
    arr = np.zeros((1, 3, 2), dtype=np.uint8)
    arr[..., 0] = 200
    arr[0, :, 1] = [0, 128, 255]
    Image.fromarray(arr, mode="LA").save(p)
    got = np.asarray(read_image(p))[0, :, 0].tolist()
    assert got[0] == 0 and got[2] == 200 and abs(got[1] - 100) <= 1


def test_rgba_alpha_on_black(tmp_path):
    p = tmp_path / "rgba.png"
    arr = np.zeros((1, 2, 4), dtype=np.uint8)
    arr[0, 0] = [250, 250, 250, 0]
    arr[0, 1] = [10, 200, 30, 255]
    Image.fromarray(arr, mode="RGBA").save(p)
    assert np.asarray(read_image(p))[0].tolist() == [[0, 0, 0], [10, 200, 30]]


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    assert Image.open(p).mode == "CMYK"
    r, g, b = np.asarray(read_image(p))[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    im.save(p, exif=exif, quality=95)
    assert Image.open(p).size == (40, 20)
    out = read_image(p)
    assert out.size == (20, 40)
    arr = np.asarray(out).astype(int)
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60     # top is the former left (red)
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60   # bottom is the former right (blue)


@pytest.mark.parametrize("fmt,ext,kw", [("TIFF", ".tif", {}), ("WEBP", ".webp", {"lossless": True}),
                                        ("BMP", ".bmp", {})])
def test_tiff_webp_bmp(tmp_path, fmt, ext, kw):
    p = tmp_path / f"x{ext}"
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(arr).save(p, format=fmt, **kw)
    assert np.array_equal(np.asarray(read_image(p)), arr)


def test_animated_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    r, _, b = np.asarray(read_image(p))[0, 0].tolist()
    assert r > 200 and b < 60


def test_one_pixel_image(tmp_path):
    im = read_image(save_rgb(tmp_path / "one.png", (1, 2, 3), size=(1, 1)))
    assert im.size == (1, 1) and np.asarray(im)[0, 0].tolist() == [1, 2, 3]


def test_decode_from_given_bytes_does_not_need_the_file(tmp_path):
    p = save_rgb(tmp_path / "a.png", (9, 8, 7))
    blob = p.read_bytes()
    p.unlink()
    assert np.asarray(decode_image(blob, p))[0, 0].tolist() == [9, 8, 7]


def test_content_decides_the_format_not_the_name(tmp_path):
    p = tmp_path / "really_a_png.jpg"
    Image.new("RGB", (3, 3), (1, 2, 3)).save(p, format="PNG")
    assert np.asarray(read_image(p))[0, 0].tolist() == [1, 2, 3]


# ------------------------------------------------------------------------------------------------ reasons
def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert reason_of(p) == "file is empty (0 bytes)"


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("hello, I am not a picture\n")
    reason = reason_of(p)
    assert reason.startswith("not an image file") and "hello" in reason


@pytest.mark.parametrize("size", [(0, 5), (5, 0)])
def test_zero_pixel_png_says_it_has_no_pixels(tmp_path, size):
    p = tmp_path / "zero.png"
    p.write_bytes(png_with_size(*size))
    assert reason_of(p) == f"image has no pixels ({size[0]}×{size[1]} according to its PNG header)"


def test_damaged_file_of_a_known_format_is_corrupt_not_unknown(tmp_path):
    p = tmp_path / "bad.png"
    p.write_bytes(png_with_size(4, 4)[:33] + b"\0" * 40)  # signature and IHDR, then rubbish
    reason = reason_of(p)
    assert "not an image file" not in reason and ("corrupt" in reason or "truncated" in reason)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert "truncated" in reason_of(p)


def test_missing_file_directory_and_links(tmp_path):
    assert reason_of(tmp_path / "nope.jpg") == "file not found"
    (tmp_path / "dir.jpg").mkdir()
    assert reason_of(tmp_path / "dir.jpg") == "is a directory, not an image file"
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    assert reason_of(tmp_path / "dangling.jpg") == "broken symbolic link (its target does not exist)"
    os.symlink("self.jpg", tmp_path / "self.jpg")
    assert reason_of(tmp_path / "self.jpg") == "symbolic link loop (the link points back to itself)"


def test_permission_denied(tmp_path, monkeypatch):
    p = save_rgb(tmp_path / "secret.png")
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "denied"))
                        if self == p else real(self))  # chmod does not stop root, who runs the tests here
    assert reason_of(p) == "permission denied (cannot read the file)"


def test_nan_float_image(tmp_path):
    p = tmp_path / "nan.tif"
    Image.fromarray(np.array([[np.nan, 1.0]], dtype=np.float32)).save(p)
    reason = reason_of(p)
    assert "NaN" in reason and "corrupt" not in reason, reason  # a well-formed file with degenerate values


# ------------------------------------------------------------------------------------------------ bomb guard
def test_decompression_bomb_refused_fast_and_without_memory(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(huge_png_header(20000, 20000))  # 400 M pixels claimed, a few hundred bytes on disk
    assert p.stat().st_size < 2000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    reason = reason_of(p)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000  # < ~100 MB growth
    assert "too large" in reason and "400000000" in reason and "not decoded" in reason
    assert "--max-pixels N" in reason and "max_pixels=N" in reason  # the fix, for CLI and Python users


def test_decompression_bomb_warning_range_is_an_error_too(tmp_path, monkeypatch):
    p = save_rgb(tmp_path / "big.png", size=(40, 40))   # 1600 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1000 < 1600 < 2000: Pillow would only warn
    reason = reason_of(p)
    assert "too large" in reason and "1600" in reason and "--max-pixels" in reason


def test_max_pixels_lowers_and_raises_the_limit(tmp_path, monkeypatch):
    p = save_rgb(tmp_path / "big.png", size=(40, 40))
    assert "limit of 1000 pixels" in reason_of(p, max_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)   # Pillow's own guard (> 2x: error) is lifted for the call
    assert read_image(p, max_pixels=1600).size == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == 500                 # and put back
    assert "too large" in reason_of(p)                   # default: Pillow's limit
    for bad in (0, -5, 2.5, True, "10"):
        with pytest.raises(KPLInputError, match="max_pixels.*--max-pixels"):
            read_image(p, max_pixels=bad)


def test_truncated_images_flag_is_warned(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(images.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with caplog.at_level("WARNING", logger="kplib"):
        read_image(save_rgb(tmp_path / "a.png"))
    assert "LOAD_TRUNCATED_IMAGES" in caplog.text
