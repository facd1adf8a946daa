"""kplib.io.dicom: DICOM files built with pydicom (and pydicom's own test files) through the display chain, the
transfer syntaxes this environment reads, the documented multi-frame rule, clear errors, and no header value in any
message or log."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from _fixtures_images import SECRETS, assert_no_secrets, dicom_bytes

from kplib.errors import ImageDecodeError
from kplib.io.dicom import dicom_to_image, is_dicom, read_header
from kplib.io.images import decode_image, read_image

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless


def grey(data: bytes, name: str = "x.dcm", **kw) -> list:
    im = decode_image(data, name, **kw)
    arr = np.asarray(im)
    assert im.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0].tolist()


def reason(data: bytes, name: str = "scan.dcm", **kw) -> str:
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(data, name, **kw)
    assert_no_secrets(str(ei.value))
    assert "not an image file" not in ei.value.reason  # a DICOM file is never "not an image"
    return ei.value.reason


# ------------------------------------------------------------------------------------------------ display chain
def test_monochrome2_16bit_with_window():
    px = np.array([[0, 1000, 1500, 2000, 4095]], dtype=np.uint16)
    data = dicom_bytes(px, "MONOCHROME2", 12, WindowCenter=1500, WindowWidth=1000)
    assert is_dicom(data)
    # LINEAR window (PS3.3 C.11.2.1.2.1): <= 1000 black, > 1999 white, 1500 mid-grey
    assert grey(data) == [[0, 0, 128, 255, 255]]


def test_no_window_uses_the_full_range():
    assert grey(dicom_bytes(np.array([[100, 200, 300]], dtype=np.uint16), "MONOCHROME2", 12)) == [[0, 128, 255]]


def test_monochrome1_is_inverted():
    px = np.array([[0, 100, 255]], dtype=np.uint8)
    assert grey(dicom_bytes(px, "MONOCHROME1", 8)) == [[255, 155, 0]]
    assert grey(dicom_bytes(px, "MONOCHROME2", 8)) == [[0, 100, 255]]


def test_rescale_slope_intercept_applied_before_the_window():
    # stored 0/100/200 -> -1000/-800/-600 (Hounsfield-like); the window is given in rescaled units
    px = np.array([[0, 100, 200]], dtype=np.uint16)
    data = dicom_bytes(px, "MONOCHROME2", 12, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=-800,
                       WindowWidth=400)
    assert grey(data) == [[0, 128, 255]]


def test_voi_lut_sequence():
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.add_new(0x00283006, "US", [0, 50, 100, 255])  # LUTData
    data = dicom_bytes(np.array([[0, 1, 2, 3]], dtype=np.uint16), "MONOCHROME2", 12, VOILUTSequence=[item])
    assert grey(data) == [[0, 50, 100, 255]]


def test_rgb():
    px = np.array([[[255, 0, 0], [0, 255, 0], [10, 20, 30]]], dtype=np.uint8)
    im = decode_image(dicom_bytes(px, "RGB", 8, PlanarConfiguration=0), "c.dcm")
    assert np.asarray(im).tolist() == px.tolist()


@pytest.mark.parametrize("photometric,px", [
    ("MONOCHROME2", np.arange(64, dtype=np.uint16).reshape(8, 8) * 60),
    ("RGB", np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)),
])
def test_rle_lossless_equals_uncompressed(photometric, px):
    bits = 12 if px.dtype == np.uint16 else 8
    extra = {"PlanarConfiguration": 0} if photometric == "RGB" else {}
    plain = decode_image(dicom_bytes(px, photometric, bits, **extra), "a.dcm")
    rle = dicom_bytes(px, photometric, bits, compress=RLELossless, **extra)
    assert read_header(rle, "b.dcm").file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(np.asarray(decode_image(rle, "b.dcm")), np.asarray(plain))


@pytest.mark.parametrize("n_frames,expected", [(3, 60), (4, 100), (2, 60)])
def test_multi_frame_gives_the_middle_frame(n_frames, expected):
    frames = np.stack([np.full((2, 3), 20 + 40 * k, dtype=np.uint8) for k in range(n_frames)])
    data = dicom_bytes(frames, "MONOCHROME2", 8, WindowCenter=128, WindowWidth=256)  # identity on 8 bits
    assert int(read_header(data, "m.dcm").NumberOfFrames) == n_frames
    assert grey(data) == [[expected] * 3] * 2  # frame NumberOfFrames // 2


# ------------------------------------------------------------------------------------------------ recognition
def test_recognised_by_marker_whatever_the_name():
    data = dicom_bytes(np.array([[0, 255]], dtype=np.uint8), "MONOCHROME2", 8)
    assert grey(data, "1.2.840.113619.2.55.3.604688119") == [[0, 255]]
    assert grey(data, "export_without_extension") == [[0, 255]]


def test_raw_data_set_without_preamble_named_dcm():
    data = dicom_bytes(np.array([[0, 255]], dtype=np.uint8), "MONOCHROME2", 8, preamble=False)
    assert not is_dicom(data)
    assert grey(data, "old.dcm") == [[0, 255]]


# ------------------------------------------------------------------------------------------------ reasons
def test_missing_pixel_data():
    data = dicom_bytes(np.array([[1, 2]], dtype=np.uint8), "MONOCHROME2", 8, pixel_data=False)
    assert reason(data).startswith("DICOM file without pixel data")


def test_corrupt_and_truncated_files():
    data = dicom_bytes(np.arange(400, dtype=np.uint16).reshape(20, 20), "MONOCHROME2", 12)
    assert reason(data[:132] + b"\xff" * 50).startswith("not a readable DICOM file")
    cut = reason(data[:-100])
    assert cut.startswith(("truncated DICOM pixel data", "not a readable DICOM file"))


def test_zero_rows_and_bomb_guard():
    data = dicom_bytes(np.zeros((2, 2), dtype=np.uint8), "MONOCHROME2", 8, Rows=0)
    assert reason(data).startswith("image has no pixels")
    big = dicom_bytes(np.zeros((40, 40), dtype=np.uint8), "MONOCHROME2", 8)
    text = reason(big, max_pixels=1000)
    assert "too large" in text and "1600" in text and "--max-pixels N" in text and "max_pixels=N" in text
    assert decode_image(big, "big.dcm", max_pixels=1600).size == (40, 40)


def test_pydicom_missing_is_named(monkeypatch):
    data = dicom_bytes(np.array([[1, 2]], dtype=np.uint8), "MONOCHROME2", 8)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` now raises ImportError
    text = reason(data, "scan_without_extension")
    assert text == "DICOM file, but pydicom (the DICOM reader) is not installed: pip install pydicom"


# ------------------------------------------------------------------------------------------------ transfer syntaxes
def test_shipped_files_jpeg_baseline_jpeg2000_deflate_palette():
    rle_rgb = np.asarray(read_image(get_testdata_file("SC_rgb_rle.dcm"))).astype(int)
    jpeg_ybr = np.asarray(read_image(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))).astype(int)  # YBR_FULL, lossy
    assert np.abs(jpeg_ybr - rle_rgb).mean() < 3
    mr = np.asarray(read_image(get_testdata_file("MR_small.dcm")))
    assert np.array_equal(np.asarray(read_image(get_testdata_file("MR_small_jp2klossless.dcm"))), mr)
    assert np.array_equal(np.asarray(read_image(get_testdata_file("MR_small_RLE.dcm"))), mr)
    assert np.array_equal(np.asarray(read_image(get_testdata_file("MR_small_bigendian.dcm"))), mr)
    assert read_image(get_testdata_file("image_dfl.dcm")).size == (512, 512)  # deflated explicit VR
    palette = np.asarray(read_image(get_testdata_file("examples_palette.dcm"))).astype(int)
    assert (np.abs(palette[..., 0] - palette[..., 2]) > 30).any()  # colours, not grey


def test_jpeg_ls_reads_or_names_the_missing_decoder():
    from pydicom.pixels import get_decoder

    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    if get_decoder(read_header(Path(path).read_bytes(), path).file_meta.TransferSyntaxUID).is_available:
        assert np.array_equal(np.asarray(read_image(path)), np.asarray(read_image(get_testdata_file("MR_small.dcm"))))
        return
    with pytest.raises(ImageDecodeError) as ei:
        read_image(path)
    text = ei.value.reason
    assert "JPEG-LS Lossless" in text and "1.2.840.10008.1.2.4.80" in text
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in text and "pip install python-gdcm" in text


# ------------------------------------------------------------------------------------------------ privacy
def test_no_header_value_in_messages_logs_or_warnings(caplog, recwarn):
    px = np.arange(16, dtype=np.uint16).reshape(4, 4)
    files = [dicom_bytes(px, "MONOCHROME2", 12, WindowCenter=8, WindowWidth=10),
             dicom_bytes(px, "MONOCHROME2", 12, pixel_data=False),
             dicom_bytes(px, "MONOCHROME2", 12, NumberOfFrames=7).replace(b"IS\x02\x007 ", b"IS\x02\x001A"),
             dicom_bytes(px, "MONOCHROME2", 12)[:-7]]
    assert b"IS\x02\x001A" in files[2] and all(SECRETS[0].encode() in f for f in files)  # secrets in the files ...
    messages = []
    with caplog.at_level(logging.DEBUG):
        for i, data in enumerate(files):
            try:
                dicom_to_image(data, f"f{i}.dcm")
            except ImageDecodeError as exc:
                messages.append(str(exc))
    assert len(messages) == 3
    assert_no_secrets(*messages, caplog.text, *(str(w.message) for w in recwarn))  # ... and nowhere else
    ds = read_header(files[0], "f0.dcm")
    assert "PatientName" not in ds and "PatientID" not in ds and "InstitutionName" not in ds  # never even parsed


def test_generated_dicom_folder_lists_decodes_and_audits_without_secrets(tmp_path, caplog):
    from kplib.io.audit import audit
    from kplib.io.datasets import load_folder

    px16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 60)
    files = {
        "val/normal/a.dcm": dicom_bytes(px16, "MONOCHROME2", 12, WindowCenter=2000, WindowWidth=3000),
        "val/normal/1.2.826.0.1.3680043": dicom_bytes(px16.astype(np.uint8), "MONOCHROME1", 8),
        "val/tumour/rgb.dcm": dicom_bytes(np.zeros((8, 8, 3), np.uint8), "RGB", 8, PlanarConfiguration=0),
        "val/tumour/rle.dcm": dicom_bytes(px16, "MONOCHROME2", 12, compress=RLELossless),
    }
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    with caplog.at_level(logging.DEBUG):
        ds = load_folder(tmp_path)
        assert ds.counts() == {"normal": 2, "tumour": 2}
        assert all(read_image(p).size == (8, 8) for p in ds.paths)
        report = audit(tmp_path)
    assert report.exit_code == 0 and report.unreadable == []
    assert report.modes["DICOM MONOCHROME2 12-bit RLE Lossless"] == 1
    assert_no_secrets(json.dumps(report.to_dict()), report.to_text(), caplog.text, json.dumps(ds.describe()))
