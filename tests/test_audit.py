"""kplib.io.audit and ``kpl audit``: duplicates within and across classes, near-duplicates, aliases, empty classes,
unreadable files, files outside <class>/<image>, names that are not UTF-8; text, JSON and exit codes."""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from _fixtures_images import kpl_data, non_utf8_name, tree_state
from PIL import Image

from kplib.errors import KPLInputError
from kplib.io.audit import NEAR_THRESHOLD, audit, find_leaks
from kplib.io.datasets import load_folder


def picture(seed: int, size=(96, 96)) -> Image.Image:
    """A smooth random picture (low frequencies dominate, as in photographs), distinct per seed."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def messy(tmp_path) -> Path:
    """val/{a,b,c(empty),d -> a}: a within-class duplicate, a cross-class duplicate, a cross-class near-duplicate
    (re-encoded JPEG), an unreadable file, a nested and a loose image, a name that is not UTF-8."""
    root, v = tmp_path / "export", tmp_path / "export" / "val"
    put(v / "a" / "one.png", encode(picture(1)))
    put(v / "a" / "one copy.png", encode(picture(1)))              # same bytes, same class
    put(v / "a" / "two.png", encode(picture(2)))
    put(v / "b" / "two (1).png", encode(picture(2)))               # same bytes, other class: a leak
    put(v / "b" / "one.jpg", encode(picture(1), "JPEG", quality=90))  # the same picture re-encoded
    put(v / "b" / "three.png", encode(picture(3)))
    put(v / "b" / "broken.png", b"")
    put(v / "b" / non_utf8_name(b"f\xfcnf"), encode(picture(5)))
    put(v / "a" / "deeper" / "nested.png", encode(picture(6)))
    put(v / "loose.png", encode(picture(7)))
    (v / "c").mkdir()
    os.symlink(v / "a", v / "d")
    return root


def test_audit_finds_everything_and_writes_nothing(messy):
    before = tree_state(messy)
    r = audit(messy)
    assert tree_state(messy) == before
    assert r.layout == "class folders" and r.split == "val" and r.near_threshold == NEAR_THRESHOLD == 2
    assert r.class_counts == {"a": 3, "b": 5, "d": 3} and r.imbalance_ratio == pytest.approx(5 / 3)
    assert r.n_images == 11 and r.empty_classes == ["c"] and r.aliases == [["val/a", "val/d"]]
    assert r.unreadable == [("val/b/broken.png", "file is empty (0 bytes)")]
    assert r.modes == {"PNG RGB": 9, "JPEG RGB": 1} and r.sizes["most_common"] == [[[96, 96], 10]]
    groups = {tuple(g["paths"]): g["cross_class"] for g in r.exact_duplicates}
    assert groups[("val/a/one copy.png", "val/a/one.png", "val/d/one copy.png", "val/d/one.png")] is True
    assert groups[("val/a/two.png", "val/b/two (1).png", "val/d/two.png")] is True
    near = {(d["a"], d["b"]): d for d in r.near_duplicates}
    assert ("val/a/one copy.png", "val/b/one.jpg") in near and near[("val/a/one.png", "val/b/one.jpg")]["cross_class"]
    assert all(d["distance"] <= 2 for d in r.near_duplicates)
    assert not any("three" in k[0] or "three" in k[1] for k in near)  # distinct pictures are not near
    assert r.outside_depth == ["val/a/deeper/nested.png", "val/loose.png"]
    assert r.non_utf8_names == ["val/b/f\\xfcnf.png"]
    assert r.exit_code == 1 and r.findings() == [
        "1 unreadable file(s)", "2 group(s) of exact duplicates across classes", "1 aliased class folder group(s)",
        "1 empty class folder(s)"]
    json.dumps(r.to_dict(), ensure_ascii=False).encode("utf-8")
    text = r.to_text()
    assert "ACROSS CLASSES val/a/two.png = val/b/two (1).png" in text and "verdict:" in text and "(exit 1)" in text


def test_clean_folder_and_options(tmp_path):
    v = tmp_path / "clean" / "val"
    for c, cls in enumerate(("x", "y")):
        for i in range(3):
            put(v / cls / f"{i}.png", encode(picture(10 * c + i)))
    r = audit(tmp_path / "clean")
    assert r.exit_code == 0 and r.findings() == [] and r.exact_duplicates == [] and r.near_duplicates == []
    assert r.imbalance_ratio == 1.0 and "nothing that changes results (exit 0)" in r.to_text()
    assert audit(tmp_path / "clean", near_threshold=None).near_threshold is None
    un = audit(tmp_path / "clean", labelled=False)
    assert un.layout == "unlabelled" and un.class_counts == {} and un.outside_depth == []
    for bad in (-1, 64, 2.5, True):
        with pytest.raises(KPLInputError, match="near_threshold.*--near-threshold"):
            audit(tmp_path / "clean", near_threshold=bad)


def test_find_leaks_fast_path(messy):
    ds = load_folder(messy, skip_empty=True, allow_aliases=True)
    leaks = find_leaks(ds)
    assert leaks and [[p.name for p in g] for g in leaks.aliases] == [["a", "d"]]
    cross = sorted(sorted(str(p.relative_to(messy)) for p in g) for g in leaks.cross_class)
    assert ["val/a/two.png", "val/b/two (1).png", "val/d/two.png"] in cross
    assert "byte-identical" in leaks.message() and "val/b/two (1).png" in leaks.message()
    digests = [p.name.replace(" copy", "").split(".")[0].split(" (")[0] for p in ds.paths]  # caller's own keys
    assert len(find_leaks(ds, digests=digests).cross_class) >= 2
    clean = load_folder(messy, skip_empty=True, allow_aliases=True, classes=["x", "y"])
    assert not find_leaks(clean)


def test_imagehash_missing_is_named(messy, monkeypatch):
    monkeypatch.setitem(sys.modules, "imagehash", None)
    with pytest.raises(KPLInputError, match=r"pip install imagehash.*--no-near.*near_threshold=None"):
        audit(messy)
    assert audit(messy, near_threshold=None).exit_code == 1


def test_kpl_audit_text_json_and_exit_codes(messy, capsys, tmp_path):
    code, out, _ = kpl_data(capsys, "audit", messy, "--max-items", "2")
    assert code == 1 and "aliased class folders: 1" in out and "... and" in out
    code, out, _ = kpl_data(capsys, "audit", messy, "--json", "--no-near")
    data = json.loads(out)
    assert code == 1 and data["exit_code"] == 1 and data["near_threshold"] is None and data["empty_classes"] == ["c"]
    assert data["non_utf8_names"] == ["val/b/f\\xfcnf.png"]
    put(tmp_path / "ok" / "x" / "1.png", encode(picture(1)))
    put(tmp_path / "ok" / "y" / "1.png", encode(picture(2)))
    assert kpl_data(capsys, "audit", tmp_path / "ok")[0] == 0
    code, _, err = kpl_data(capsys, "audit", tmp_path / "missing")
    assert code == 2 and "nor an existing folder" in err
    assert kpl_data(capsys, "audit", tmp_path / "ok", "--near-threshold", "99")[0] == 2
    with pytest.raises(SystemExit) as ei:
        kpl_data(capsys, "audit", tmp_path / "ok", "--no-such-option")
    assert ei.value.code == 2


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "tb_cxr_nitrd_da").is_dir(), reason="shared data not present")
def test_shared_tb_set_is_clean(monkeypatch):
    monkeypatch.setenv("KPL_DATA_ROOT", str(SHARED))
    r = audit("tb_cxr_nitrd_da")
    assert r.exit_code == 0 and r.class_counts == {"normal": 78, "tuberculosis": 78} and r.unreadable == []


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "eye_diseases_4class").is_dir(), reason="shared data not present")
def test_shared_eye_set_has_cross_class_duplicates(monkeypatch):
    monkeypatch.setenv("KPL_DATA_ROOT", str(SHARED))
    r = audit("eye_diseases_4class", near_threshold=None)
    cross = [g for g in r.exact_duplicates if g["cross_class"]]
    assert r.exit_code == 1 and len(cross) == 2 and all(len(set(g["classes"])) == 2 for g in cross)


def test_raised_max_pixels_reaches_the_format_count(tmp_path, monkeypatch):
    """Formats come from the decoder (``info["source_format"]``): an image above Pillow's own limit but under
    ``max_pixels`` is counted, not parsed a second time under Pillow's limit."""
    for cls in ("x", "y"):
        put(tmp_path / "big" / cls / "1.png", encode(picture(ord(cls), size=(40, 40))))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 px > 2 x 500: Pillow alone would refuse them
    r = audit(tmp_path / "big", max_pixels=1600, near_threshold=None)
    assert r.unreadable == [] and r.modes == {"PNG RGB": 2} and r.exit_code == 0
