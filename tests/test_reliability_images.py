"""Reliability: messy image folders end to end through ``kplib.pipeline`` and the ``kpl`` command, with the untrained
stand-in encoder on folders generated in tmp_path (``_fixtures_images.messy_dataset``).

Decoding each format and listing each awkward folder are tested in test_images.py and test_bad_inputs.py; here the
whole messy export goes through listing, reading, the embedding store, encoding, the method and the output files, and
we check: each file is encoded or reported by path with its reason; ``skip`` finishes with each skipped file reported
once; ``stop`` lists every bad file in one error and stops encoding as soon as a bad file is known; the data folder is
never written to (names, sizes, modes, mtimes, bytes).
"""
from __future__ import annotations

import json
import os
import re
import stat
import warnings
from pathlib import Path

import pytest
import torch
from _fixtures_images import CLASSES, good_rgb, messy_dataset, small_kb, tree_state

from kplib import pipeline
from kplib.errors import ImageDecodeError, StandInWarning
from kplib.io.datasets import display_path
from kplib.io.encoders import Encoder, load_encoder
from kplib.pipeline import embed_images


@pytest.fixture(scope="module")
def standin() -> Encoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        return load_encoder("standin", batch_size=4)


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "hospital export"
    return root, messy_dataset(root)


@pytest.fixture
def encoded(monkeypatch):
    """How many images each call of Encoder.encode_images received."""
    calls: list[int] = []
    real = Encoder.encode_images

    def counting(self, images, *args, **kw):
        images = list(images)
        calls.append(len(images))
        return real(self, images, *args, **kw)

    monkeypatch.setattr(Encoder, "encode_images", counting)
    return calls


def kpl(capsys, *argv) -> tuple[int, str, str]:
    from kplib.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_encoding_with_skipped_files(messy, standin):
    root, expect = messy
    good = {p for p, e in expect.items() if not e.bad}
    bad = {p: e for p, e in expect.items() if e.bad}
    emb = embed_images(root, standin, on_error="skip")
    assert emb.class_names == sorted(CLASSES)
    assert set(emb.paths) == good and len(emb.paths) == len(good)  # hidden files, notes.txt, loop_dir never listed
    assert emb.embeddings.shape == (len(good), standin.embed_dim)
    assert torch.isfinite(emb.embeddings).all()
    assert torch.allclose(emb.embeddings.norm(dim=1), torch.ones(len(good)), atol=1e-5)
    skipped = dict(emb.folder.skipped)
    assert set(skipped) == set(bad) and len(emb.folder.skipped) == len(bad)
    for p, e in bad.items():
        assert re.search(e.reason, skipped[p]), (p.name, skipped[p])
    for p, y in zip(emb.paths, emb.labels.tolist()):  # labels follow the sorted class folders
        assert p.parent.name == emb.class_names[y]
    # each row is the embedding of its own file (same as encoding the file alone)
    i = emb.paths.index(next(p for p in sorted(good) if p.name == "good_1.png"))
    from kplib.io.images import read_image

    torch.testing.assert_close(emb.embeddings[i], standin.encode_images([read_image(emb.paths[i])])[0],
                               atol=1e-5, rtol=0)


def test_strict_mode_lists_every_bad_file_and_encodes_nothing(messy, standin, encoded):
    """``on_error='stop'`` on a folder of fewer images than a chunk: the bad files are found before the model runs."""
    root, expect = messy
    with pytest.raises(ImageDecodeError) as info:
        embed_images(root, standin, cache=False, on_error="stop")
    bad = {p for p, e in expect.items() if e.bad}
    assert {p for p, _ in info.value.bad} == bad
    for p in bad:
        assert display_path(p) in str(info.value)
    assert encoded == [], f"the encoder ran on {sum(encoded)} image(s) before stopping"


def test_strict_mode_encodes_nothing_when_only_decoding_fails(messy, standin, encoded):
    """The same without the unreadable symbolic-link loop: every remaining bad file reads fine and fails only when
    decoded. The error is known before the chunk is encoded, so nothing is encoded."""
    root, expect = messy
    loop = next(p for p in expect if p.name == "self_loop.png")
    loop.unlink()
    with pytest.raises(ImageDecodeError) as info:
        embed_images(root, standin, cache=False, on_error="stop")
    assert len(info.value.bad) == sum(e.bad for e in expect.values()) - 1
    assert encoded == [], f"the encoder ran on {sum(encoded)} image(s) although a bad file was already known"


def _numbered_folder(root: Path, n_per_class: int = 6) -> list[Path]:
    files = []
    for c, name in enumerate(("a", "b")):
        d = root / name
        d.mkdir(parents=True)
        for i in range(n_per_class):
            good_rgb(i, c).save(d / f"{i:02d}.png")
            files.append(d / f"{i:02d}.png")
    return files


def test_strict_mode_stops_encoding_at_the_first_bad_chunk_and_keeps_what_it_stored(tmp_path, standin, encoded,
                                                                                      monkeypatch):
    """Files go through in chunks (read once, then decoded and encoded): a bad file in the third chunk stops the
    encoding before that chunk; the two chunks encoded before are in the store, so the re-run with skip encodes only
    the rest."""
    monkeypatch.setattr(pipeline, "_CHUNK", 3)
    files = _numbered_folder(tmp_path / "data")
    bad = files[7]  # chunk 0: files 0-2, chunk 1: 3-5, chunk 2: 6-8
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: read fine, fails to decode
    with pytest.raises(ImageDecodeError) as info:
        embed_images(tmp_path / "data", standin, on_error="stop")
    assert [p for p, _ in info.value.bad] == [bad]
    assert sum(encoded) == 6, f"encoded {encoded}: expected the two chunks before the bad file only"
    encoded.clear()
    emb = embed_images(tmp_path / "data", standin, on_error="skip")
    assert [p for p, _ in emb.folder.skipped] == [bad] and len(emb) == 11
    assert emb.stats["hits"] == 6 and emb.stats["n_encoded"] == 5 and sum(encoded) == 5


def test_cli_strict_mode_exit_2_names_every_file_and_writes_nothing(messy, tmp_path, capsys):
    root, expect = messy
    kb = small_kb(tmp_path / "kb.json")
    out = tmp_path / "out" / "preds.csv"
    out.parent.mkdir()
    before = tree_state(root)
    rc, _, err = kpl(capsys, "run", root, "--model", "standin", "--method", "zero_shot", "--kb", kb,
                     "--predictions", out, "--no-progress")
    assert rc == 2
    line = [ln for ln in err.splitlines() if ln.startswith("kpl: error:")]
    assert len(line) == 1 and "cannot read image" in line[0]
    bad = [p for p, e in expect.items() if e.bad]
    for p in bad:  # all bad files at once, each with its full path
        assert display_path(p) in line[0], p.name
    assert f"{len(bad)} of {len(expect)} images cannot be read" in line[0]
    assert "--on-error skip" in line[0] and "on_error='skip'" in line[0]  # says what to do, both spellings
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert tree_state(root) == before


def test_cli_encode_skip_mode_reports_each_file_once(messy, capsys):
    root, expect = messy
    bad = [p for p, e in expect.items() if e.bad]
    rc, out, err = kpl(capsys, "encode", root, "--model", "standin", "--on-error", "skip", "--no-progress",
                       "--batch-size", "4")
    assert rc == 0, err
    n_good = len(expect) - len(bad)
    assert f"{n_good} images of hospital export" in out and f"; {len(bad)} skipped" in out
    assert f"skipped {len(bad)} unreadable image(s)" in err
    for p in bad:  # each skipped file once, with its full path and reason
        lines = [ln for ln in (out + err).splitlines() if p.name in ln]
        assert len(lines) == 1 and display_path(p) in lines[0] and ":" in lines[0], (p.name, lines)
    assert f"{display_path(root / 'val' / 'alpha' / 'zero_bytes.jpg')}: file is empty (0 bytes)" in err


def test_cli_run_skip_mode_records_skipped_files_in_metadata(messy, tmp_path, capsys):
    root, expect = messy
    bad = {p for p, e in expect.items() if e.bad}
    kb = small_kb(tmp_path / "kb.json")
    out = tmp_path / "preds.json"
    rc, _, err = kpl(capsys, "run", root, "--model", "standin", "--method", "zero_shot", "--kb", kb, "--on-error",
                     "skip", "--predictions", out, "--no-progress")
    assert rc == 0, err
    assert f"skipped {len(bad)} unreadable image(s)" in err
    meta = json.loads(out.with_name("preds.meta.json").read_text(encoding="utf-8"))
    assert {p for p, _ in meta["dataset"]["skipped"]} == {display_path(p) for p in bad}
    preds = json.loads(out.read_text(encoding="utf-8"))["predictions"]
    assert len(preds) == len(expect) - len(bad)
    assert {r["path"] for r in preds} == {display_path(p, root) for p in expect if p not in bad}


def test_empty_class_folder_is_reported_by_the_cli(tmp_path, capsys):
    root = tmp_path / "data"
    messy_dataset(root, with_bad=False)
    empty = root / "val" / "empty class"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"junk")
    rc, _, err = kpl(capsys, "encode", root, "--model", "standin", "--no-progress")
    assert rc == 2
    assert str(empty) in err and "no image files" in err and "--skip-empty-classes" in err


def test_nothing_written_into_a_read_only_data_folder(messy, tmp_path, standin, capsys):
    """The whole tree is made read-only (as root this does not stop writes — so we compare a full snapshot: names,
    kinds, sizes, modes, mtimes, bytes) and goes through encode (cached, twice), and run with outputs."""
    root, _ = messy
    paths = [Path(d) for d, _, _ in os.walk(root)] + [Path(d) / f for d, _, fs in os.walk(root) for f in fs]
    for p in paths:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        before = tree_state(root)
        for _ in range(2):  # a cold and a warm store
            emb = embed_images(root, standin, on_error="skip")
            assert len(emb.folder.skipped) == 6
        kb = small_kb(tmp_path / "kb.json")
        assert kpl(capsys, "encode", root, "--model", "standin", "--on-error", "skip", "--no-progress")[0] == 0
        rc, _, err = kpl(capsys, "run", root, "--model", "standin", "--method", "kpl", "--kb", kb, "--on-error",
                         "skip", "--predictions", tmp_path / "p.csv", "--output", tmp_path / "r.json",
                         "--no-progress", "--iters-proxy", "5")
        assert rc == 0, err
        assert tree_state(root) == before
    finally:
        for p in paths:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_bad_files_in_an_unlabelled_folder(tmp_path, capsys):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(4):
        good_rgb(i, i % 3).save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "p.csv"
    rc, _, err = kpl(capsys, "run", root, "--classes", "x,y", "--method", "zero_shot", "--model", "standin",
                     "--kb", small_kb(tmp_path / "kb.json", class_names=("x", "y")), "--on-error", "skip",
                     "--predictions", out)
    assert rc == 0, err
    assert err.count("broken.png") == 1
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1 + 4
