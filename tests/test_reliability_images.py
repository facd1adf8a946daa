"""Reliability (issue 7): messy image folders end to end — through ``kplib.experiment`` and the ``kpl`` command with
the untrained stand-in encoder on folders generated in tmp_path (see ``_fixtures_images.messy_dataset``).

Unit-level decoding of each format is tested in test_data.py; here every awkward file sits in one dataset that goes
through listing, decoding, encoding, the method and the output files, and we check: each file is either encoded
(decoded to the right RGB) or reported by path with its reason; ``skip`` finishes with a summary; ``stop`` stops
before any encoding; the data folder is never written to (names, sizes, modes, mtimes, bytes).
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

from _fixtures_images import CLASSES, messy_dataset, small_kb, tree_state
from kplib.data import load_rgb
from kplib.encoders import ClipEncoder, load_encoder
from kplib.errors import ImageDecodeError, StandInWarning
from kplib.experiment import embed_dataset


@pytest.fixture(scope="module")
def standin() -> ClipEncoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        return load_encoder("standin")


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "hospital export"
    return root, messy_dataset(root)


def kpl(*argv) -> int:
    from kplib.cli import main

    return main([str(a) for a in argv])


def test_each_file_is_decoded_right_or_reported_by_path(messy, standin):
    root, expect = messy
    good = {p for p, e in expect.items() if not e.bad}
    bad = {p: e for p, e in expect.items() if e.bad}
    # decoded pixels are the right RGB (the same decoder feeds the encoder)
    for p in sorted(good):
        im = load_rgb(p)
        e = expect[p]
        assert im.mode == "RGB" and im.size == e.size, p
        for xy, rgb in e.pixels.items():
            got = im.getpixel(xy)
            assert max(abs(a - b) for a, b in zip(got, rgb)) <= e.tol, (p.name, xy, got, rgb)

    emb = embed_dataset(root, standin, cache=True, on_error="skip", batch_size=4, progress=False)
    assert emb.class_names == sorted(CLASSES)
    assert {Path(p) for p in emb.paths} == good               # hidden files, notes.txt, loop_dir never listed
    assert emb.embeddings.shape == (len(good), standin.embed_dim)
    assert torch.isfinite(emb.embeddings).all()
    assert torch.allclose(emb.embeddings.norm(dim=1), torch.ones(len(good)), atol=1e-5)
    skipped = {Path(p): reason for p, reason in emb.skipped}
    assert set(skipped) == set(bad)
    for p, e in bad.items():
        assert re.search(e.reason, skipped[p]), (p.name, skipped[p])
    # labels follow the sorted class folders
    for p, y in zip(emb.paths, emb.labels.tolist()):
        assert Path(p).parent.name == emb.class_names[y]


def test_strict_mode_stops_before_any_encoding(messy, standin, monkeypatch):
    """``on_error='stop'``: the bad files are found before the model runs on any batch (no wasted hours on a
    large folder that would fail at its last image)."""
    root, expect = messy
    calls = []
    real = ClipEncoder.encode_pixels
    monkeypatch.setattr(ClipEncoder, "encode_pixels", lambda self, px: calls.append(px.shape[0]) or real(self, px))
    with pytest.raises(ImageDecodeError) as info:
        embed_dataset(root, standin, cache=False, on_error="stop", batch_size=2, progress=False)
    bad = {p for p, e in expect.items() if e.bad}
    assert info.value.path in bad and str(info.value.path) in str(info.value)
    assert calls == [], f"the encoder ran on {sum(calls)} image(s) before stopping"


def test_cli_strict_mode_exit_2_names_file_and_writes_nothing(messy, tmp_path, capsys):
    root, expect = messy
    kb = small_kb(tmp_path / "kb.json")
    out = tmp_path / "out" / "preds.csv"
    out.parent.mkdir()
    before = tree_state(root)
    rc = kpl("run", root, "--model", "standin", "--method", "zero_shot", "--kb", kb, "--predictions", out,
             "--no-progress", "--n-bootstrap", "10")
    err = capsys.readouterr().err
    assert rc == 2
    line = [ln for ln in err.splitlines() if ln.startswith("kpl: error:")]
    assert line and "cannot read image" in line[0] and str(root) in line[0]
    assert "and 5 more bad file(s)" in line[0]           # all bad files are listed at once, not one per run
    assert "on_error='skip'" in line[0] or "--on-error skip" in line[0]   # says what to do
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert tree_state(root) == before


def test_cli_skip_mode_finishes_with_summary(messy, tmp_path, capsys):
    root, expect = messy
    bad = {p for p, e in expect.items() if e.bad}
    rc = kpl("encode", root, "--model", "standin", "--on-error", "skip", "--no-progress", "--batch-size", "4")
    out, err = capsys.readouterr()
    assert rc == 0, err
    n_good = len(expect) - len(bad)
    assert f"{n_good} images, 3 classes" in out
    assert f"skipped {len(bad)} undecodable image(s)" in out
    for p in bad:
        assert any(str(p) in ln and ":" in ln for ln in out.splitlines()), f"{p} not listed in the summary"
    assert "zero_bytes.jpg: file is empty (0 bytes)" in out


def test_cli_run_skip_mode_records_skipped_files_in_metadata(messy, tmp_path, capsys):
    root, expect = messy
    bad = {str(p) for p, e in expect.items() if e.bad}
    kb = small_kb(tmp_path / "kb.json")
    out = tmp_path / "preds.json"
    rc = kpl("run", root, "--model", "standin", "--method", "zero_shot", "--kb", kb, "--on-error", "skip",
             "--predictions", out, "--no-progress", "--n-bootstrap", "10")
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert f"skipped {len(bad)} undecodable image(s)" in stdout
    meta = json.loads(out.with_name("preds.meta.json").read_text(encoding="utf-8"))
    assert {p for p, _ in meta["skipped"]} == bad
    preds = json.loads(out.read_text(encoding="utf-8"))["predictions"]
    assert len(preds) == len(expect) - len(bad)
    assert {r["path"] for r in preds}.isdisjoint({os.path.relpath(p, root) for p in bad})


def test_empty_class_folder_is_reported_by_the_cli(tmp_path, capsys):
    root = tmp_path / "data"
    messy_dataset(root, with_bad=False)
    empty = root / "val" / "empty class"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"junk")
    rc = kpl("encode", root, "--model", "standin", "--no-progress")
    err = capsys.readouterr().err
    assert rc == 2
    assert str(empty) in err and "no image files" in err


def test_nothing_written_into_a_read_only_data_folder(messy, tmp_path, standin, capsys):
    """The whole tree is made read-only (as root this does not stop writes — so we compare a full snapshot:
    names, kinds, sizes, modes, mtimes, bytes) and goes through encode (cached, twice), and run with outputs."""
    root, _ = messy
    paths = [Path(d) for d, _, _ in os.walk(root)] + [Path(d) / f for d, _, fs in os.walk(root) for f in fs]
    for p in paths:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        before = tree_state(root)
        for _ in range(2):  # a cold and a warm cache
            emb = embed_dataset(root, standin, cache=True, on_error="skip", progress=False)
            assert len(emb.skipped) == 6
        kb = small_kb(tmp_path / "kb.json")
        assert kpl("encode", root, "--model", "standin", "--on-error", "skip", "--no-progress") == 0
        assert kpl("run", root, "--model", "standin", "--method", "kpl", "--kb", kb, "--on-error", "skip",
                   "--predictions", tmp_path / "p.csv", "--no-progress", "--n-bootstrap", "10",
                   "--iters-proxy", "5") == 0
        capsys.readouterr()
        assert tree_state(root) == before
    finally:
        for p in paths:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | stat.S_IWUSR)

