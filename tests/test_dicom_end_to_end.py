"""Issue 15's DICOM bar: a generated DICOM folder (MONOCHROME1 and 2, 16-bit with a window, RGB, RLE Lossless, a file
named by its UID) runs through ``kpl run`` end to end, and no DICOM header value appears in any output file, in
stdout/stderr (with -v logging), or anywhere under KPL_CACHE_DIR.

The files are written by pydicom itself (``_fixtures_images.dicom_bytes``) with the patient name, ID and institution
of ``SECRETS`` and the further header values of ``EXTRA`` below; every file the run wrote is read as bytes.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from _fixtures_images import SECRETS, dicom_bytes, tree_state
from test_pipeline import make_kb

from kplib.cli import main

pydicom = pytest.importorskip("pydicom")
from pydicom.uid import RLELossless

#: Header values written besides SECRETS (patient name, ID, institution); none may leave the files.
EXTRA = {"ReferringPhysicianName": "Quill^Ophelia", "AccessionNumber": "ACC9917342", "StudyDescription":
         "KPLSTUDYDESC brain", "SeriesDescription": "KPLSERIESDESC axial", "PatientAddress": "12 Elmwood Lane",
         "StudyID": "STUDY8812", "OperatorsName": "Tech^Bartholomew", "StationName": "KPLSTATION7"}
#: Every value to search for, as bytes (names also by their parts).
NEEDLES = [s.encode() for s in (*SECRETS, "Doe", "Jane", "19700101", *EXTRA.values(), "Ophelia", "Bartholomew",
                                "Elmwood")]


def _px16(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).integers(0, 4096, (16, 16))).astype(np.uint16)


def _files() -> dict[str, bytes]:
    rgb = np.random.default_rng(5).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    mono8 = np.random.default_rng(6).integers(0, 256, (16, 16)).astype(np.uint8)
    return {
        "normal/mono2_window.dcm": dicom_bytes(_px16(1), "MONOCHROME2", 12, WindowCenter=2000, WindowWidth=3000,
                                               **EXTRA),
        "normal/mono1.dcm": dicom_bytes(mono8, "MONOCHROME1", 8, **EXTRA),
        "normal/1.2.826.0.1.3680043.8.498.1": dicom_bytes(_px16(2), "MONOCHROME2", 16, RescaleSlope=1,
                                                          RescaleIntercept=-1024, **EXTRA),
        "tumour/rgb.dcm": dicom_bytes(rgb, "RGB", 8, PlanarConfiguration=0, **EXTRA),
        "tumour/rle.dcm": dicom_bytes(_px16(3), "MONOCHROME2", 12, compress=RLELossless, **EXTRA),
        "tumour/mono2_16bit_window.DCM": dicom_bytes(_px16(4), "MONOCHROME2", 16, WindowCenter=[1500, 2500],
                                                     WindowWidth=[800, 1200], **EXTRA),
    }


@pytest.fixture
def dicom_folder(tmp_path):
    root = tmp_path / "dicom export"
    for rel, data in _files().items():
        assert all(n in data for n in (SECRETS[0].encode(), SECRETS[1].encode(), EXTRA["AccessionNumber"].encode()))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _leaks(data: bytes) -> list[str]:
    return [n.decode() for n in NEEDLES if n in data or n.lower() in data.lower()]


def test_generated_files_hold_the_values_searched_for(dicom_folder):
    """The search can fail: every value is in the input files (so it would be found if copied anywhere)."""
    found = set()
    for p in dicom_folder.rglob("*"):
        if p.is_file():
            found |= set(_leaks(p.read_bytes()))
    assert found == {n.decode() for n in NEEDLES}


def test_kpl_run_on_dicom_leaks_no_header_value(dicom_folder, tmp_path, capsys, isolated_cache):
    kb = make_kb(tmp_path / "kb.json", classes=("normal", "tumour"))
    out = tmp_path / "out"
    out.mkdir()
    before = tree_state(dicom_folder)
    texts = []
    runs = [["-v", "run", dicom_folder, "--model", "standin", "--kb", kb, "--method", "kpl_corrected",
             "--iters-proxy", "50", "--predictions", out / "preds.csv", "--output", out / "result.json"],
            ["-vv", "run", dicom_folder, "--model", "standin", "--kb", kb, "--method", "zero_shot",
             "--predictions", out / "preds.json"],
            ["-vv", "compare", dicom_folder, "--model", "standin", "--kb", kb, "--methods", "kpl_corrected,zero_shot",
             "--iters-proxy", "50", "--output", out / "table.csv"],
            ["-vv", "encode", dicom_folder, "--model", "standin"],
            ["-v", "run", dicom_folder, "--unlabelled", "--kb", kb, "--model", "standin", "--iters-proxy", "50",
             "--predictions", out / "unlabelled.csv"]]
    for argv in runs:
        code = main([str(a) for a in argv])
        std = capsys.readouterr()
        assert code == 0, std.err
        texts += [std.out, std.err]

    # the run used every DICOM file (none skipped), and the predictions hold relative paths only
    with (out / "preds.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["path"] for r in rows) == sorted(_files())
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert result["metrics"]["n"] == 6
    assert "6 from the store, 0 encoded; 0 skipped" in texts[6]  # kpl encode: all six decoded and stored

    # no header value in any output file, in stdout/stderr, or in the embedding store
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"preds.csv", "preds.meta.json", "result.json", "preds.json",
                                          "table.csv", "unlabelled.csv"}
    cached = [p for p in Path(isolated_cache).rglob("*") if p.is_file()]
    assert cached, "the run stored nothing: the cache search would prove nothing"
    for p in written + cached:
        assert _leaks(p.read_bytes()) == [], f"DICOM header value(s) {_leaks(p.read_bytes())} in {p}"
    for text in texts:
        assert _leaks(text.encode("utf-8")) == [], f"DICOM header value(s) {_leaks(text.encode())} on the console"
    assert tree_state(dicom_folder) == before  # nothing written into the export
