"""kplib.io.datasets: folder layouts (labelled, unlabelled), guards (aliases, empty classes), file names that are not
UTF-8, the registry (datasets.json), and ``kpl datasets``. Folders are generated in tmp_path."""
from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from pathlib import Path

import pytest
import torch
from _fixtures_images import dicom_bytes, kpl_data, non_utf8_name, tree_state
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from kplib.errors import ImageDecodeError, KPLInputError
from kplib.io import datasets
from kplib.io.datasets import (
    ImageFolder,
    display_path,
    load_dataset,
    load_folder,
    parse_display_path,
    registry,
    unreadable_error,
)
from kplib.io.images import read_image


def save_rgb(path: Path, color=(10, 20, 30), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_folder(root: Path, spec: dict[str, int], split: str | None = "val") -> Path:
    """ROOT[/split]/<class>/img_<i>.jpg with ``spec[class]`` distinct small JPEGs."""
    base = root / split if split else root
    for c, (cls, n) in enumerate(spec.items()):
        for i in range(n):
            save_rgb(base / cls / f"img_{i:03d}.jpg", color=(40 * c, 5 * i % 256, 100))
    return root


# ------------------------------------------------------------------------------------------------ labelled layout
def test_layout_with_split_and_sorted_classes(tmp_path):
    root = make_folder(tmp_path / "ds", {"b_cls": 2, "a_cls": 3, "C_cls": 1})
    ds = load_folder(root)
    assert ds.class_names == ["C_cls", "a_cls", "b_cls"]
    assert ds.split == "val" and ds.name == "ds" and len(ds) == 6 and ds.labelled
    assert ds.labels.dtype == torch.long and ds.counts() == {"C_cls": 1, "a_cls": 3, "b_cls": 2}
    for path, label in zip(ds.paths, ds.labels.tolist()):
        assert path.parent.name == ds.class_names[label]
    assert ds.paths == sorted(ds.paths, key=lambda p: (ds.class_names.index(p.parent.name), p.name))
    d = ds.describe()
    assert d["n_images"] == 6 and d["counts"]["a_cls"] == 3 and d["split"] == "val" and d["layout"] == "class folders"
    json.dumps(d)


def test_flat_layout_and_split_detection(tmp_path):
    root = make_folder(tmp_path / "flat", {"x": 2, "y": 2}, split=None)
    with pytest.raises(KPLInputError, match="split='val'"):
        load_folder(root, split="val")
    ds = load_folder(root)
    assert ds.split is None and ds.class_names == ["x", "y"] and len(ds) == 4
    assert load_folder(make_folder(tmp_path / "one", {"x": 1, "y": 1}, split="test")).split == "test"


def test_several_splits_need_an_explicit_choice(tmp_path):
    root = make_folder(tmp_path / "multi", {"x": 1, "y": 1}, split="train")
    make_folder(root, {"x": 1, "y": 1}, split="test")
    with pytest.raises(KPLInputError, match=r"several splits.*--split NAME.*split=NAME"):
        load_folder(root)
    assert load_folder(root, split="test").split == "test"


def test_missing_root_and_loose_images_need_a_decision(tmp_path):
    with pytest.raises(KPLInputError, match="does not exist"):
        load_folder(tmp_path / "nothing")
    save_rgb(tmp_path / "loose" / "a.jpg")
    save_rgb(tmp_path / "loose" / "b.jpg")
    with pytest.raises(KPLInputError, match=r"no class folders.*--unlabelled or --classes a,b.*labelled=False"):
        load_folder(tmp_path / "loose")


def test_single_class_is_an_error(tmp_path):
    with pytest.raises(KPLInputError, match="at least 2 classes"):
        load_folder(make_folder(tmp_path / "single", {"only": 2}))


def test_empty_class_folder_error_names_it_and_the_fix(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", {"full": 2, "other": 1})
    (root / "val" / "hollow").mkdir()
    (root / "val" / "hollow" / "readme.txt").write_text("nothing here")
    with pytest.raises(KPLInputError) as ei:
        load_folder(root)
    msg = str(ei.value)
    assert str(root / "val" / "hollow") in msg and "no image files" in msg and "non-image" in msg
    assert "--skip-empty-classes" in msg and "skip_empty=True" in msg
    with caplog.at_level("WARNING", logger="kplib"):
        ds = load_folder(root, skip_empty=True, display_names=["F", "H", "O"])
    assert ds.class_names == ["full", "other"] and ds.display_names == ["F", "O"] and ds.dropped_classes == ["hollow"]
    assert "hollow" in caplog.text


def test_hidden_and_non_image_files_ignored(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 1})
    cls = root / "val" / "a"
    save_rgb(cls / ".hidden.jpg")
    (cls / ".DS_Store").write_bytes(b"\0\1")
    (cls / "labels.csv").write_text("x,y\n")
    save_rgb(cls / ".ipynb_checkpoints" / "img_000-checkpoint.jpg")
    save_rgb(root / "val" / ".trash" / "z.jpg")   # hidden class folder
    save_rgb(cls / "UPPER.JPEG")                  # extension match is case-insensitive
    ds = load_folder(root)
    assert ds.class_names == ["a", "b"]
    assert sorted(p.name for p in ds.paths if p.parent.name == "a") == ["UPPER.JPEG", "img_000.jpg", "img_001.jpg"]


def test_dicom_without_extension_is_listed_other_files_are_not(tmp_path):
    pytest.importorskip("pydicom")
    import numpy as np

    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    (root / "val" / "a" / "1.2.840.113619.2.55.3").write_bytes(dicom_bytes(np.zeros((2, 2), np.uint8), bits_stored=8))
    (root / "val" / "a" / "notes").write_bytes(b"x" * 300)
    ds = load_folder(root)
    assert sorted(p.name for p in ds.paths) == ["1.2.840.113619.2.55.3", "img_000.jpg", "img_000.jpg"]
    assert read_image(root / "val" / "a" / "1.2.840.113619.2.55.3").size == (2, 2)


def test_spaces_and_unicode_names(tmp_path):
    root = tmp_path / "données médicales"
    save_rgb(root / "val" / "gliome à haut grade" / "coupe n°1 (copie) ü.jpg")
    save_rgb(root / "val" / "健康 brain" / "图像 1.png")
    ds = load_folder(root)
    assert ds.class_names == ["gliome à haut grade", "健康 brain"]
    assert [p.name for p in ds.paths] == ["coupe n°1 (copie) ü.jpg", "图像 1.png"]
    assert ds.name == "données médicales"
    assert display_path(ds.paths[0], root) == "val/gliome à haut grade/coupe n°1 (copie) ü.jpg"


def test_symlink_loops_do_not_hang(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    cls = root / "val" / "a"
    os.symlink(cls, cls / "loop")                 # folder loop inside a class folder: not descended
    os.symlink(root, root / "val" / "b" / "up")   # loop to an ancestor
    os.symlink("self.jpg", cls / "self.jpg")      # a link pointing at itself, named like an image
    result: dict = {}

    def work():
        result["ds"] = load_folder(root)
        result["un"] = load_folder(root, labelled=False)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "listing hung on a symbolic-link loop"
    ds = result["ds"]
    assert sorted(p.name for p in ds.paths) == ["img_000.jpg", "img_000.jpg", "img_001.jpg", "img_001.jpg", "self.jpg"]
    assert len(result["un"]) == 5
    bad = []
    for p in ds.paths:
        try:
            read_image(p)
        except ImageDecodeError as exc:
            bad.append((p.name, exc.reason))
    assert bad == [("self.jpg", "symbolic link loop (the link points back to itself)")]


def test_class_folder_symlink_to_ancestor_gives_empty_class_error(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    os.symlink(root / "val", root / "val" / "c_loop")
    with pytest.raises(KPLInputError, match="c_loop.*no image files.*sub-folder"):
        load_folder(root)


def test_aliased_class_folders_refused_unless_allowed(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", {"cat": 2, "dog": 1})
    os.symlink(root / "val" / "cat", root / "val" / "kitten")
    with pytest.raises(KPLInputError) as ei:
        load_folder(root)
    msg = str(ei.value)
    assert str(root / "val" / "cat") in msg and str(root / "val" / "kitten") in msg
    assert "--allow-aliases" in msg and "allow_aliases=True" in msg
    with caplog.at_level("WARNING", logger="kplib"):
        ds = load_folder(root, allow_aliases=True)
    assert ds.counts() == {"cat": 2, "dog": 1, "kitten": 2} and "same folder" in caplog.text


def test_nested_and_loose_files_warned_not_used(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    save_rgb(root / "val" / "a" / "deeper" / "x.jpg")
    save_rgb(root / "val" / "loose.jpg")
    (root / "val" / "b" / "dir.jpg").mkdir()      # a folder named like an image
    with caplog.at_level("WARNING", logger="kplib"):
        ds = load_folder(root)
    assert len(ds) == 2
    assert "sub-folder" in caplog.text and "outside any class folder" in caplog.text


def test_display_names(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    assert load_folder(root, display_names={"b": "bee"}).display_names == ["a", "bee"]
    assert load_folder(root, display_names=["A", "B"]).display_names == ["A", "B"]
    with pytest.raises(KPLInputError, match="'zz'"):
        load_folder(root, display_names={"zz": "?"})
    with pytest.raises(KPLInputError, match="3 entries"):
        load_folder(root, display_names=["1", "2", "3"])
    with pytest.raises(KPLInputError, match="empty name"):
        load_folder(root, display_names={"a": "  "})


def test_limit_per_class_seeded_sorted_and_recorded(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 12, "b": 3})
    full = load_folder(root)
    s0, s0b, s1 = (load_folder(root, limit_per_class=5, seed=s) for s in (0, 0, 1))
    assert s0.counts() == {"a": 5, "b": 3} and s0.paths == s0b.paths
    a0 = [p for p in s0.paths if p.parent.name == "a"]
    assert a0 == sorted(a0) and set(a0) <= set(full.paths)
    assert a0 != [p for p in s1.paths if p.parent.name == "a"]  # the seed matters (C(12,5) = 792 subsets)
    assert s0.limit_per_class == 5 and s0.seed == 0 and s0.describe()["limit_per_class"] == 5
    pool = sorted(p for p in full.paths if p.parent.name == "a")  # the shared data's rule
    assert a0 == sorted(random.Random(0).sample(pool, 5))
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(KPLInputError, match="limit_per_class"):
            load_folder(root, limit_per_class=bad)


def test_subset_without_and_the_all_files_error(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", {"a": 3, "b": 2})
    ds = load_folder(root)
    bad = [(ds.paths[0], "file is empty (0 bytes)"), (ds.paths[3], "truncated image data")]
    ok = ds.without(bad + bad[:1])                       # repeated reports count once
    assert len(ok) == 3 and ok.counts() == {"a": 2, "b": 1} and ok.skipped == bad
    assert ok.without(bad[:1]).skipped == bad
    summary = ok.skipped_summary()
    assert summary.count(str(ds.paths[0])) == 1 and str(ds.paths[3]) in summary
    with pytest.raises(KPLInputError, match=r"(?s)\['b'\].*--skip-empty-classes"):
        ds.without([(p, "bad") for p in ds.paths[3:]])
    with caplog.at_level("WARNING", logger="kplib"), pytest.raises(KPLInputError, match="at least 2 classes"):
        ds.without([(p, "bad") for p in ds.paths[3:]], skip_empty=True)
    err = unreadable_error(bad, n_checked=5)
    text = str(err)
    assert str(ds.paths[0]) in text and str(ds.paths[3]) in text and "2 of 5" in text  # full path of every file
    assert "--on-error skip" in text and "on_error='skip'" in text and err.bad == bad


def test_read_only_data_folder_untouched(tmp_path):
    root = make_folder(tmp_path / "ro", {"a": 2, "b": 2})
    (root / "val" / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff")
    before = tree_state(root)
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
    try:
        for p in sorted(modes, key=lambda q: len(str(q)), reverse=True):
            p.chmod(0o555 if p.is_dir() else 0o444)
        ds = load_folder(root)
        for p in ds.paths:
            try:
                read_image(p)
            except ImageDecodeError:
                pass
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert tree_state(root) == before   # root ignores chmod: compare the tree itself


# ------------------------------------------------------------------------------------------------ unlabelled
def test_unlabelled_flat_and_nested(tmp_path):
    root = tmp_path / "unlabelled"
    for name in ("b.png", "a.jpg", "2021/x.png", "2021/deeper/y.png", ".hidden.png", "notes.txt"):
        save_rgb(root / name) if name != "notes.txt" else (root / name).write_text("hi")
    ds = load_folder(root, labelled=False)
    assert ds.labels is None and not ds.labelled and ds.class_names == [] and ds.counts() == {}
    assert [display_path(p, root) for p in ds.paths] == ["2021/deeper/y.png", "2021/x.png", "a.jpg", "b.png"]
    ds2 = load_folder(root, classes=["normal", "tumour"], display_names={"tumour": "brain tumour"})
    assert ds2.labels is None and ds2.class_names == ["normal", "tumour"]
    assert ds2.display_names == ["normal", "brain tumour"] and ds2.describe()["layout"] == "unlabelled"
    assert len(load_folder(root, labelled=False, limit_per_class=2, seed=0)) == 2
    assert len(ds2.subset([0, 2])) == 2 and ds2.subset([0, 2]).labels is None


def test_class_folders_read_as_unlabelled_only_when_asked(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 1})
    assert load_folder(root).labelled
    un = load_folder(root, classes=["x", "y"])
    assert un.labels is None and len(un) == 3 and un.class_names == ["x", "y"]
    with pytest.raises(KPLInputError, match="classes="):
        load_folder(root, classes=["x", "y"], labelled=True)
    for bad in (["x"], ["x", "x"], ["x", " "]):
        with pytest.raises(KPLInputError, match="at least 2 distinct"):
            load_folder(root, classes=bad)


# ------------------------------------------------------------------------------------------------ file names
def test_non_utf8_names_listed_decoded_and_printable(tmp_path):
    root = tmp_path / "export"
    save_rgb(root / "val" / "a" / "plain.png")
    save_rgb(root / "val" / non_utf8_name(b"b\xe9b\xe9", "") / non_utf8_name())
    ds = load_folder(root)
    assert len(ds) == 2 and read_image(ds.paths[1]).size == (8, 6)
    shown = display_path(ds.paths[1], root)
    assert shown == "val/b\\xe9b\\xe9/caf\\xe9.png"
    shown.encode("utf-8")
    assert parse_display_path(shown, root) == ds.paths[1] and os.path.exists(parse_display_path(shown, root))
    json.dumps(ds.describe()).encode("utf-8")
    assert display_path(root / "a\\b\nc.png", root) == "a\\\\b\\x0ac.png"


@given(st.lists(st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b),
                min_size=1, max_size=3))
def test_display_path_round_trips(parts):
    path = Path("/data").joinpath(*(os.fsdecode(p) for p in parts))
    text = display_path(path, "/data")
    text.encode("utf-8")
    assert parse_display_path(text, "/data") == path
    assert parse_display_path(display_path(path)) == path


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
    reg = registry()
    assert set(reg) == set(EXPECTED_COUNTS) | {"imagenet_sample"}
    assert json.loads(datasets.REGISTRY_FILE.read_text(encoding="utf-8")).keys() == reg.keys()
    for name, info in reg.items():
        assert info.name == name and info.modality and info.paper_dataset and info.citation and info.split == "val"
        if name in EXPECTED_COUNTS:
            assert set(info.display_names) == set(EXPECTED_COUNTS[name]) and info.kb == name
    assert reg["imagenet_sample"].kb is None and reg["imagenet_sample"].display_names_file == "class_names.json"
    assert reg["brain_tumor_mri"].display_names["notumor"] == "brain with no tumor"
    assert reg["aptos2019_dr_gaussian"].display_names["Proliferate_DR"] == "proliferative diabetic retinopathy"
    reg.clear()
    assert registry()  # a copy: callers cannot damage the registry


def test_load_dataset_unknown_and_missing_root(tmp_path, monkeypatch):
    with pytest.raises(KPLInputError, match="brain_tumor_mri"):
        load_dataset("brain_tumour")
    monkeypatch.setenv("KPL_DATA_ROOT", str(tmp_path / "absent"))
    with pytest.raises(KPLInputError, match="KPL_DATA_ROOT"):
        load_dataset("malaria_cells")
    monkeypatch.setenv("KPL_DATA_ROOT", str(tmp_path))
    with pytest.raises(KPLInputError, match="malaria_cells.*KPL_DATA_ROOT"):
        load_dataset("malaria_cells")


def test_load_dataset_from_custom_root_and_folder(tmp_path, monkeypatch):
    make_folder(tmp_path / "tb_cxr_nitrd_da", {"normal": 2, "tuberculosis": 3})
    monkeypatch.setenv("KPL_DATA_ROOT", str(tmp_path))
    ds = load_dataset("tb_cxr_nitrd_da")
    assert ds.name == "tb_cxr_nitrd_da" and ds.display_names == ["normal chest X-ray", "tuberculosis chest X-ray"]
    assert load_dataset("tb_cxr_nitrd_da", display_names=["N", "T"]).display_names == ["N", "T"]
    folder = load_dataset(tmp_path / "tb_cxr_nitrd_da", limit_per_class=1)
    assert folder.name == "tb_cxr_nitrd_da" and len(folder) == 2 and load_dataset(folder) is folder


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir() and not os.environ.get("KPL_DATA_ROOT"),
                                  reason=f"shared data not present ({SHARED}); set KPL_DATA_ROOT")


@needs_shared
@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_real_datasets_counts_and_names(name):
    ds = load_dataset(name)
    assert ds.counts() == EXPECTED_COUNTS[name] and ds.class_names == sorted(EXPECTED_COUNTS[name])
    assert ds.display_names == [registry()[name].display_names[c] for c in ds.class_names]
    sub = load_dataset(name, limit_per_class=7, seed=3)
    assert all(n == 7 for n in sub.counts().values()) and set(sub.paths) <= set(ds.paths)
    assert all(read_image(p).mode == "RGB" for p in sub.paths)


@needs_shared
@pytest.mark.slow
def test_real_datasets_every_image_decodes():
    for name in registry():
        bad = []
        for p in load_dataset(name).paths:
            try:
                read_image(p)
            except ImageDecodeError as exc:
                bad.append((p, exc.reason))
        assert bad == [], f"{name}: {bad[:5]}"


@needs_shared
def test_real_imagenet_sample():
    ds = load_dataset("imagenet_sample")
    assert len(ds) == 1000 and ds.num_classes == 1000 and set(ds.counts().values()) == {1}
    assert ds.class_names[0] == "n01440764" and ds.display_names[0] == "tench"
    assert ds.class_names == sorted(ds.class_names)


# ------------------------------------------------------------------------------------------------ kpl datasets
def test_kpl_datasets_lists_registry(capsys, tmp_path, monkeypatch):
    (tmp_path / "malaria_cells" / "val" / "A").mkdir(parents=True)
    (tmp_path / "malaria_cells" / "val" / "B").mkdir(parents=True)
    monkeypatch.setenv("KPL_DATA_ROOT", str(tmp_path))
    code, out, _ = kpl_data(capsys, "datasets")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("malaria_cells"))
    assert line.split()[1:3] == ["yes", "2"]
    brain = next(x for x in out.splitlines() if x.startswith("brain_tumor_mri"))
    assert brain.split()[1] == "no" and brain.split()[3] == "brain_tumor_mri"  # its curated KB
    imagenet = next(x for x in out.splitlines() if x.startswith("imagenet_sample"))
    assert "DCLIP" in imagenet and "descriptors_imagenet.json" in imagenet


def test_kpl_datasets_describes_a_folder(capsys, tmp_path):
    root = make_folder(tmp_path / "export", {"glioma": 2, "no tumour": 3})
    code, out, _ = kpl_data(capsys, "datasets", root)
    assert code == 0 and "layout: class folders; 5 images, 2 classes" in out
    assert any(x.split() == ["no", "tumour", "3"] for x in out.splitlines())
    (root / "val" / "empty").mkdir()
    code, _, err = kpl_data(capsys, "datasets", root)
    assert code == 2 and str(root / "val" / "empty") in err and "--skip-empty-classes" in err
    code, out, _ = kpl_data(capsys, "datasets", root, "--skip-empty-classes")
    assert code == 0 and "dropped empty class folders: empty" in out
    code, out, _ = kpl_data(capsys, "datasets", root, "--classes", "a,b")
    assert code == 0 and "layout: unlabelled; 5 images, 2 classes" in out
    save_rgb(root / "val" / non_utf8_name(b"\xff") / "x.png")
    code, out, _ = kpl_data(capsys, "datasets", root, "--skip-empty-classes")
    assert code == 0 and "\\xff" in out
    with pytest.raises(SystemExit) as ei:
        kpl_data(capsys, "datasets", root, "--classes", "onlyone")
    assert ei.value.code == 2


def test_tree_hash_helper_detects_changes(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    before = tree_state(root)
    (root / "val" / "a" / "img_000.jpg").write_bytes(hashlib.sha256(b"x").digest())
    assert tree_state(root) != before
    assert isinstance(load_folder(root), ImageFolder)
