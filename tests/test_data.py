"""Tests of kplib.data: robust decoding, image-folder listing, scanning, registry. Images are generated in tmp_path."""
from __future__ import annotations

import hashlib
import io
import os
import resource
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kplib import data
from kplib.data import (
    DATASETS,
    DecodeReport,
    ImageDecodeError,
    get_dataset,
    load_image_folder,
    load_rgb,
    scan_images,
)
from kplib.errors import KPLInputError


# ------------------------------------------------------------------------------------------------ helpers
def save_rgb(path: Path, color=(10, 20, 30), size=(8, 6), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def make_folder(root: Path, spec: dict[str, int], split: str | None = "val") -> Path:
    """ROOT[/split]/<class>/img_<i>.jpg with ``spec[class]`` distinct small JPEGs."""
    base = root / split if split else root
    for c, (cls, n) in enumerate(spec.items()):
        for i in range(n):
            save_rgb(base / cls / f"img_{i:03d}.jpg", color=(40 * c, 5 * i % 256, 100))
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """Path → content hash (or 'DIR') of every entry under root, without following symlinks."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "DIR"
        for f in filenames:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "LINK:" + os.readlink(p)
            else:
                out[rel] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)


def fake_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width×height 8-bit grayscale pixels (pixel data not really there)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + png_chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------------ decoding
def test_rgb_jpeg_roundtrip_mode_and_size(tmp_path):
    im = load_rgb(save_rgb(tmp_path / "a.jpg", (200, 100, 50), size=(17, 9)))
    assert im.mode == "RGB" and im.size == (17, 9)
    assert np.abs(np.asarray(im).astype(int) - [200, 100, 50]).max() <= 3


def test_grayscale_becomes_three_equal_channels(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.array([[0, 77], [200, 255]], dtype=np.uint8), mode="L").save(p)
    arr = np.asarray(load_rgb(p))
    assert arr.shape == (2, 2, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert arr[..., 0].tolist() == [[0, 77], [200, 255]]


def test_16bit_png_scaled_by_bit_range_not_clipped(tmp_path):
    # 12-bit values stored in 16 bits: max 4095 -> divide by 4095 (not by 65535, not clip at 255)
    vals = np.array([[0, 1, 2048, 4095]], dtype=np.uint16)
    p = tmp_path / "x12.png"
    Image.fromarray(vals).save(p)
    assert Image.open(p).mode == "I;16"
    got = np.asarray(load_rgb(p))[..., 0]
    assert got.tolist() == [[0, 0, round(2048 * 255 / 4095), 255]]


def test_16bit_full_range_and_big_endian_tiff(tmp_path):
    vals = np.array([[0, 257], [4096, 65535]], dtype=">u2")
    p = tmp_path / "be.tif"
    Image.frombytes("I;16B", (2, 2), vals.tobytes()).save(p)
    assert Image.open(p).mode == "I;16B"
    got = np.asarray(load_rgb(p))[..., 0]
    assert got.tolist() == [[0, 1], [16, 255]]


def test_32bit_integer_image(tmp_path):
    p = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 1023]], dtype=np.int32)).save(p)  # 10-bit range
    got = np.asarray(load_rgb(p))[..., 0]
    assert got.tolist() == [[0, 255]]


def test_palette_with_transparency_composited_on_black(tmp_path):
    p = tmp_path / "pal.png"
    im = Image.new("P", (4, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putdata([0, 0, 1, 1])
    im.save(p, transparency=0)
    arr = np.asarray(load_rgb(p))
    assert arr[0, 0].tolist() == [0, 0, 0]        # transparent red -> black background
    assert arr[0, 3].tolist() == [0, 255, 0]      # opaque green kept


def test_palette_without_transparency(tmp_path):
    p = tmp_path / "pal.gif"
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putdata([0, 1])
    im.save(p)
    assert np.asarray(load_rgb(p))[0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_la_alpha_on_black(tmp_path):
    p = tmp_path / "la.png"
    arr = np.zeros((1, 3, 2), dtype=np.uint8)
    arr[..., 0] = 200
    arr[0, :, 1] = [0, 128, 255]
    Image.fromarray(arr, mode="LA").save(p)
    got = np.asarray(load_rgb(p))[0, :, 0].tolist()
    assert got[0] == 0 and got[2] == 200 and abs(got[1] - 100) <= 1


def test_rgba_alpha_on_black(tmp_path):
    p = tmp_path / "rgba.png"
    arr = np.zeros((1, 2, 4), dtype=np.uint8)
    arr[0, 0] = [250, 250, 250, 0]
    arr[0, 1] = [10, 200, 30, 255]
    Image.fromarray(arr, mode="RGBA").save(p)
    assert np.asarray(load_rgb(p))[0].tolist() == [[0, 0, 0], [10, 200, 30]]


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    assert Image.open(p).mode == "CMYK"
    r, g, b = np.asarray(load_rgb(p))[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    im.save(p, exif=exif, quality=95)
    assert Image.open(p).size == (40, 20)
    out = load_rgb(p)
    assert out.size == (20, 40)                 # width/height swapped
    arr = np.asarray(out).astype(int)
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60     # top is the former left (red)
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60   # bottom is the former right (blue)


@pytest.mark.parametrize("fmt,ext,kw", [("TIFF", ".tif", {}), ("WEBP", ".webp", {"lossless": True}), ("BMP", ".bmp", {})])
def test_tiff_webp_bmp(tmp_path, fmt, ext, kw):
    p = tmp_path / f"x{ext}"
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(arr).save(p, format=fmt, **kw)
    assert np.array_equal(np.asarray(load_rgb(p)), arr)


def test_animated_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    r, g, b = np.asarray(load_rgb(p))[0, 0].tolist()
    assert r > 200 and b < 60


def test_one_pixel_image(tmp_path):
    im = load_rgb(save_rgb(tmp_path / "one.png", (1, 2, 3), size=(1, 1)))
    assert im.size == (1, 1) and np.asarray(im)[0, 0].tolist() == [1, 2, 3]


def test_load_rgb_from_given_bytes_does_not_need_the_file(tmp_path):
    p = save_rgb(tmp_path / "a.png", (9, 8, 7))
    blob = p.read_bytes()
    p.unlink()
    assert np.asarray(load_rgb(p, data=blob))[0, 0].tolist() == [9, 8, 7]


def _reason(path, **kw) -> str:
    with pytest.raises(ImageDecodeError) as ei:
        load_rgb(path, **kw)
    assert ei.value.path == Path(path)
    assert str(path) in str(ei.value)
    return ei.value.reason


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert _reason(p) == "file is empty (0 bytes)"


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("hello, I am not a picture\n")
    reason = _reason(p)
    assert reason.startswith("not an image file") and "hello" in reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files(tmp_path, fmt):
    buf = io.BytesIO()
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format=fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert "truncated" in _reason(p)


def test_missing_file_and_directory(tmp_path):
    assert _reason(tmp_path / "nope.jpg") == "file not found"
    (tmp_path / "dir.jpg").mkdir()
    assert "directory" in _reason(tmp_path / "dir.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    assert "broken symbolic link" in _reason(tmp_path / "dangling.jpg")


def test_decompression_bomb_refused_fast_and_without_memory(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(fake_png(20000, 20000))  # 400 M pixels claimed, ~1 kB on disk
    assert p.stat().st_size < 2000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    reason = _reason(p)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000  # < ~100 MB growth
    assert "too large" in reason and "400000000" in reason and "MAX_IMAGE_PIXELS" in reason


def test_decompression_bomb_warning_range_is_an_error_too(tmp_path, monkeypatch):
    p = save_rgb(tmp_path / "big.png", size=(40, 40))   # 1600 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1000 < 1600 < 2000: Pillow would only warn
    assert "too large" in _reason(p)


def test_decode_never_writes_into_data_folder(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    before = tree_digest(root)
    ds = load_image_folder(root, on_error="stop")
    for path in ds.paths:
        load_rgb(path)
    assert tree_digest(root) == before


# ------------------------------------------------------------------------------------------------ listing
def test_layout_with_split_and_sorted_classes(tmp_path):
    root = make_folder(tmp_path / "ds", {"b_cls": 2, "a_cls": 3, "C_cls": 1})
    ds = load_image_folder(root)
    assert ds.class_names == sorted(["b_cls", "a_cls", "C_cls"]) == ["C_cls", "a_cls", "b_cls"]
    assert ds.split == "val" and ds.name == "ds" and len(ds) == 6
    assert ds.labels.dtype == torch.long
    assert ds.counts() == {"C_cls": 1, "a_cls": 3, "b_cls": 2}
    # labels follow the class folder of each path, files sorted within a class
    for path, label in zip(ds.paths, ds.labels.tolist()):
        assert path.parent.name == ds.class_names[label]
    assert ds.paths == sorted(ds.paths, key=lambda p: (ds.class_names.index(p.parent.name), p.name))
    d = ds.describe()
    assert d["n_images"] == 6 and d["counts"]["a_cls"] == 3 and d["split"] == "val"


def test_flat_layout_and_auto_detect(tmp_path):
    root = make_folder(tmp_path / "flat", {"x": 2, "y": 2}, split=None)
    with pytest.raises(KPLInputError, match="split='val'"):
        load_image_folder(root)  # default split="val" is absent: clear message
    ds = load_image_folder(root, split=None)
    assert ds.split is None and ds.class_names == ["x", "y"] and len(ds) == 4
    # auto-detect a single split folder of any name
    root2 = make_folder(tmp_path / "one", {"x": 1, "y": 1}, split="test")
    assert load_image_folder(root2, split=None).split == "test"


def test_several_splits_need_an_explicit_choice(tmp_path):
    root = make_folder(tmp_path / "multi", {"x": 1, "y": 1}, split="train")
    make_folder(root, {"x": 1, "y": 1}, split="test")
    with pytest.raises(KPLInputError, match="several splits"):
        load_image_folder(root, split=None)
    assert load_image_folder(root, split="test").split == "test"


def test_missing_root_and_no_classes(tmp_path):
    with pytest.raises(KPLInputError, match="does not exist"):
        load_image_folder(tmp_path / "nothing")
    (tmp_path / "loose" / "val").mkdir(parents=True)
    save_rgb(tmp_path / "loose" / "val" / "a.jpg")
    with pytest.raises(KPLInputError, match="directly"):
        load_image_folder(tmp_path / "loose")


def test_single_class_is_an_error(tmp_path):
    root = make_folder(tmp_path / "single", {"only": 2})
    with pytest.raises(KPLInputError, match="at least 2 classes"):
        load_image_folder(root)


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_folder(tmp_path / "ds", {"full": 2, "other": 1})
    (root / "val" / "hollow").mkdir()
    (root / "val" / "hollow" / "readme.txt").write_text("nothing here")
    with pytest.raises(KPLInputError) as ei:
        load_image_folder(root)
    msg = str(ei.value)
    assert "hollow" in msg and "no image files" in msg and "non-image" in msg


def test_hidden_and_non_image_files_ignored(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 1})
    cls = root / "val" / "a"
    save_rgb(cls / ".hidden.jpg")
    (cls / ".DS_Store").write_bytes(b"\0\1")
    (cls / "labels.csv").write_text("x,y\n")
    save_rgb(cls / ".ipynb_checkpoints" / "img_000-checkpoint.jpg")
    save_rgb(root / "val" / ".trash" / "z.jpg")   # hidden class folder
    save_rgb(cls / "UPPER.JPEG")                  # extension match is case-insensitive
    ds = load_image_folder(root)
    assert ds.class_names == ["a", "b"]
    assert sorted(p.name for p in ds.paths if p.parent.name == "a") == ["UPPER.JPEG", "img_000.jpg", "img_001.jpg"]


def test_spaces_and_unicode_names(tmp_path):
    root = tmp_path / "données médicales"
    save_rgb(root / "val" / "gliome à haut grade" / "coupe n°1 ü.jpg")
    save_rgb(root / "val" / "健康 brain" / "图像 1.png")
    ds = load_image_folder(root, on_error="stop")
    assert ds.class_names == ["gliome à haut grade", "健康 brain"]
    assert [p.name for p in ds.paths] == ["coupe n°1 ü.jpg", "图像 1.png"]
    assert ds.name == "données médicales"


def test_symlink_loops_do_not_hang(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    cls = root / "val" / "a"
    os.symlink(cls, cls / "loop")                 # folder loop inside a class folder: not descended
    os.symlink(root, root / "val" / "b" / "up")   # loop to an ancestor
    os.symlink("self.jpg", cls / "self.jpg")      # a link pointing at itself, named like an image
    result: dict = {}

    def work():
        try:
            result["ds"] = load_image_folder(root)
        except Exception as exc:  # pragma: no cover - reported below
            result["exc"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "listing hung on a symlink loop"
    ds = result["ds"]
    assert sorted(p.name for p in ds.paths) == ["img_000.jpg", "img_000.jpg", "img_001.jpg", "img_001.jpg", "self.jpg"]
    with pytest.raises(ImageDecodeError, match="symbolic link loop"):
        scan_images(ds, on_error="stop")
    ok, report = scan_images(ds, on_error="skip")
    assert len(ok) == 4 and [p.name for p, _ in report.skipped] == ["self.jpg"]


def test_class_folder_symlink_to_ancestor_gives_empty_class_error(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    os.symlink(root / "val", root / "val" / "c_loop")
    with pytest.raises(KPLInputError, match="c_loop.*no image files.*sub-folder"):
        load_image_folder(root)


def test_display_names(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    assert load_image_folder(root, display_names={"b": "bee"}).display_names == ["a", "bee"]
    assert load_image_folder(root, display_names=["A", "B"]).display_names == ["A", "B"]
    with pytest.raises(KPLInputError, match="'zz'"):
        load_image_folder(root, display_names={"zz": "?"})
    with pytest.raises(KPLInputError, match="3 entries"):
        load_image_folder(root, display_names=["1", "2", "3"])
    with pytest.raises(KPLInputError, match="empty name"):
        load_image_folder(root, display_names={"a": "  "})


def test_limit_per_class_seeded_sorted_and_recorded(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 12, "b": 3})
    full = load_image_folder(root)
    s0 = load_image_folder(root, limit_per_class=5, seed=0)
    s0b = load_image_folder(root, limit_per_class=5, seed=0)
    s1 = load_image_folder(root, limit_per_class=5, seed=1)
    assert s0.counts() == {"a": 5, "b": 3}                 # small class kept whole
    assert s0.paths == s0b.paths                           # deterministic
    a0 = [p for p in s0.paths if p.parent.name == "a"]
    assert a0 == sorted(a0) and set(a0) <= set(full.paths)
    assert a0 != [p for p in s1.paths if p.parent.name == "a"]  # seed matters (C(12,5)=792 subsets)
    assert s0.limit_per_class == 5 and s0.seed == 0 and s0.describe()["limit_per_class"] == 5
    # same rule as the shared data READMEs: random.Random(seed).sample(sorted(pool), k)
    import random

    pool = sorted(p for p in full.paths if p.parent.name == "a")
    assert a0 == sorted(random.Random(0).sample(pool, 5))
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(KPLInputError, match="limit_per_class"):
            load_image_folder(root, limit_per_class=bad)


# ------------------------------------------------------------------------------------------------ scanning
@pytest.fixture
def dataset_with_bad_files(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 3, "b": 2})
    (root / "val" / "a" / "zero.jpg").write_bytes(b"")
    (root / "val" / "b" / "text.png").write_text("not an image")
    return root


def test_strict_mode_stops_listing_bad_files(dataset_with_bad_files):
    ds = load_image_folder(dataset_with_bad_files)
    assert len(ds) == 7
    with pytest.raises(ImageDecodeError) as ei:
        scan_images(ds, on_error="stop")
    msg = str(ei.value)
    assert "zero.jpg" in msg and "file is empty (0 bytes)" in msg
    assert "text.png" in msg and "on_error='skip'" in msg
    assert len(ei.value.report.skipped) == 2
    with pytest.raises(ImageDecodeError):
        load_image_folder(dataset_with_bad_files, on_error="stop")


def test_skip_mode_returns_good_subset_and_report(dataset_with_bad_files, caplog):
    ds = load_image_folder(dataset_with_bad_files)
    with caplog.at_level("WARNING", logger="kplib"):
        ok, report = scan_images(ds, on_error="skip")
    assert isinstance(report, DecodeReport)
    assert len(ok) == 5 and ok.counts() == {"a": 3, "b": 2}
    assert report.n_checked == 7 and report.n_ok == 5
    assert {p.name for p, _ in report.skipped} == {"zero.jpg", "text.png"}
    assert "2 of 7 images could not be decoded" in report.summary()
    assert "zero.jpg" in caplog.text
    for path, label in zip(ok.paths, ok.labels.tolist()):
        assert path.parent.name == ok.class_names[label]
    assert ok.decode_report is report and len(ok.describe()["skipped"]) == 2
    # via load_image_folder
    assert len(load_image_folder(dataset_with_bad_files, on_error="skip")) == 5


def test_clean_dataset_report(tmp_path):
    ds = load_image_folder(make_folder(tmp_path / "ds", {"a": 1, "b": 1}))
    ok, report = scan_images(ds)
    assert ok is ds and report.skipped == [] and report.summary() == "all 2 images decoded"


def test_skip_mode_class_left_empty_is_an_error(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 2})
    (root / "val" / "b").mkdir()
    (root / "val" / "b" / "bad.jpg").write_bytes(b"")
    with pytest.raises(KPLInputError, match=r"\['b'\]"):
        load_image_folder(root, on_error="skip")


def test_bad_on_error_value(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    with pytest.raises(KPLInputError, match="on_error"):
        load_image_folder(root, on_error="ignore")
    with pytest.raises(KPLInputError, match="on_error"):
        scan_images(load_image_folder(root), on_error=None)


def test_read_only_data_folder_untouched(tmp_path):
    root = make_folder(tmp_path / "ro", {"a": 2, "b": 2})
    (root / "val" / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff")
    before = tree_digest(root)
    modes = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            modes[p] = os.stat(p).st_mode
    try:
        for p in sorted(modes, key=len, reverse=True) + [str(root)]:
            os.chmod(p, 0o555 if os.path.isdir(p) else 0o444)
        ds, report = scan_images(load_image_folder(root), on_error="skip")
        assert len(ds) == 4 and len(report.skipped) == 1
        for p in ds.paths:
            load_rgb(p)
    finally:
        os.chmod(root, 0o755)
        for p, mode in modes.items():
            os.chmod(p, mode)
    # tests may run as root, where chmod does not stop writes: compare the tree instead
    assert tree_digest(root) == before


# ------------------------------------------------------------------------------------------------ registry
EXPECTED_COUNTS = {  # from the README table of each /work/shared/data/<dataset>
    "brain_tumor_mri": {"glioma": 300, "meningioma": 306, "notumor": 405, "pituitary": 300},
    "malaria_cells": {"Parasitized": 311, "Uninfected": 213},
    "chest_xray_pneumonia": {"NORMAL": 234, "PNEUMONIA": 390},
    "tb_cxr_nitrd_da": {"normal": 78, "tuberculosis": 78},
    "eye_diseases_4class": {"cataract": 360, "diabetic_retinopathy": 400, "glaucoma": 400, "normal": 400},
    "aptos2019_dr_gaussian": {"Mild": 370, "Moderate": 400, "No_DR": 400, "Proliferate_DR": 295, "Severe": 193},
}


def test_registry_entries_well_formed():
    assert set(DATASETS) == set(EXPECTED_COUNTS) | {"imagenet_sample"}
    for name, info in DATASETS.items():
        assert info.name == name and info.modality and info.paper_dataset and info.citation
        if name in EXPECTED_COUNTS:
            assert set(info.display_names) == set(EXPECTED_COUNTS[name])
            assert info.kb == name
    assert DATASETS["imagenet_sample"].kb is None
    assert DATASETS["brain_tumor_mri"].display_names["notumor"] == "brain with no tumor"
    assert DATASETS["aptos2019_dr_gaussian"].display_names["Proliferate_DR"] == "proliferative diabetic retinopathy"


def test_get_dataset_unknown_and_missing_root(tmp_path, monkeypatch):
    with pytest.raises(KPLInputError, match="brain_tumor_mri"):
        get_dataset("brain_tumour")
    monkeypatch.setenv("KPL_DATA_ROOT", str(tmp_path / "absent"))
    with pytest.raises(KPLInputError, match="KPL_DATA_ROOT"):
        get_dataset("malaria_cells")
    monkeypatch.setenv("KPL_DATA_ROOT", str(tmp_path))
    with pytest.raises(KPLInputError, match="malaria_cells.*KPL_DATA_ROOT"):
        get_dataset("malaria_cells")
    assert data.available_datasets() == []


def test_get_dataset_from_custom_root(tmp_path, monkeypatch):
    make_folder(tmp_path / "tb_cxr_nitrd_da", {"normal": 2, "tuberculosis": 3})
    monkeypatch.setenv("KPL_DATA_ROOT", str(tmp_path))
    ds = get_dataset("tb_cxr_nitrd_da")
    assert ds.name == "tb_cxr_nitrd_da" and ds.display_names == ["normal chest X-ray", "tuberculosis chest X-ray"]
    assert data.available_datasets() == ["tb_cxr_nitrd_da"]


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir() and not os.environ.get("KPL_DATA_ROOT"),
    reason=f"shared data not present ({SHARED}); set KPL_DATA_ROOT to run the real-data checks",
)


@needs_shared
@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_real_datasets_counts_and_names(name):
    ds = get_dataset(name)
    assert ds.counts() == EXPECTED_COUNTS[name]
    assert ds.class_names == sorted(EXPECTED_COUNTS[name])
    assert ds.display_names == [DATASETS[name].display_names[c] for c in ds.class_names]
    sub = get_dataset(name, limit_per_class=7, seed=3)
    assert all(n == 7 for n in sub.counts().values())
    assert set(sub.paths) <= set(ds.paths)
    checked, report = scan_images(sub, on_error="stop")
    assert report.n_ok == len(sub) and load_rgb(sub.paths[0]).mode == "RGB"


@needs_shared
@pytest.mark.slow
def test_real_datasets_every_image_decodes():
    for name in DATASETS:  # ~5 s in total on this machine
        ds = get_dataset(name)
        _, report = scan_images(ds, on_error="skip")
        assert report.skipped == [], f"{name}: {report.summary()}"


@needs_shared
def test_real_imagenet_sample():
    ds = get_dataset("imagenet_sample")
    assert len(ds) == 1000 and ds.num_classes == 1000 and set(ds.counts().values()) == {1}
    assert ds.class_names[0] == "n01440764" and ds.display_names[0] == "tench"
    assert ds.class_names == sorted(ds.class_names)
