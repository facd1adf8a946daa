"""The ``kpl`` command: run, compare, encode and merge through ``kplib.cli.main`` (in-process; one subprocess), the
predictions files (escaped paths, precise scores, deterministic bytes), the options generated from the configs, and
errors that name the flag and exit with code 2.

``kpl datasets`` / ``kpl audit`` and ``kpl kb ...`` are tested in test_datasets.py, test_audit.py and test_cli_kb.py.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures_images import unlabelled_copy
from test_pipeline import CLASSES, make_folder, make_kb

from kplib import pipeline
from kplib.cli import main
from kplib.io.datasets import display_path, parse_display_path
from kplib.io.encoders import STANDIN_LABEL

KPL = Path(sys.executable).parent / "kpl"
FAST = ("--iters-proxy", "50")


def kpl(capsys, *argv) -> tuple[int, str, str]:
    """``kpl <argv>`` in this process: (exit code, stdout, stderr); argparse errors give their SystemExit code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def standin_announcements(err: str) -> int:
    """Lines of stderr that announce the untrained stand-in."""
    return sum("untrained stand-in" in line.lower() for line in err.splitlines())


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "cells")


@pytest.fixture
def kb(tmp_path):
    return make_kb(tmp_path / "kb.json")


def put_named(folder: Path, name: bytes, data: bytes) -> Path:
    """Write a file whose name is given as raw bytes (possibly not valid UTF-8); return it as Python names it."""
    fd = os.open(os.fsencode(folder) + b"/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return folder / os.fsdecode(name)


# ------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("argv", [[], ["run"], ["compare"], ["encode"], ["merge"], ["datasets"], ["audit"], ["kb"],
                                  ["kb", "validate"], ["kb", "import"], ["kb", "generate"], ["kb", "list"]])
def test_help_for_every_command(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kpl")
    if argv in (["run"], ["compare"]):
        for flag in ("--mode", "--kb", "--model", "--k", "--tau-t", "--tau-i", "--alpha", "--gamma",
                     "--class-marginal", "--retrieval", "--limit-per-class", "--on-error", "--no-transport-baseline",
                     "--iters-proxy", "--transport", "--transclip-n-neighbors", "--dn-fraction", "--unlabelled",
                     "--classes", "--skip-empty-classes", "--allow-aliases", "--max-pixels", "--seed", "--dtype"):
            assert flag in out, flag
        for flag in (["--method", "--predictions", "--output"] if argv == ["run"] else ["--methods", "--reference"]):
            assert flag in out, flag


@pytest.mark.slow  # a fresh process: torch + transformers imports and the stand-in, ~20 s on a loaded machine
def test_installed_entry_point_runs(folder, kb, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out_csv = tmp_path / "p.csv"
    r = subprocess.run([str(KPL), "run", str(folder), "--model", "standin", "--kb", str(kb), "--method",
                        "descriptor_mean", "--predictions", str(out_csv)],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    assert STANDIN_LABEL in r.stdout and len(read_csv(out_csv)) == 12
    assert standin_announcements(r.stderr) == 1 and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ encode
def test_encode_prints_counts_and_the_store(capsys, folder):
    code, out, err = kpl(capsys, "encode", folder, "--model", "standin")
    assert code == 0, err
    assert STANDIN_LABEL in out and "12 images of cells" in out
    assert "0 from the store, 12 encoded; 0 skipped" in out
    assert standin_announcements(err) == 1, err
    code, out, _ = kpl(capsys, "encode", folder, "--model", "standin")
    assert code == 0 and "12 from the store, 0 encoded" in out


def test_encode_refuses_method_options_and_no_cache(capsys, folder):
    code, _, err = kpl(capsys, "encode", folder, "--model", "standin", "--k", "3")
    assert code == 2 and "method options" in err
    code, _, err = kpl(capsys, "encode", folder, "--model", "standin", "--no-cache")
    assert code == 2 and "--no-cache" in err


# ------------------------------------------------------------------------------------------------ run
def test_run_end_to_end_csv_and_byte_identical_repeat(capsys, folder, kb, tmp_path):
    out_csv = tmp_path / "preds.csv"
    argv = ["run", folder, "--model", "standin", "--kb", kb, "--method", "kpl", "--mode", "corrected", "--k", "2",
            "--tau-t", "0.02", *FAST, "--predictions", out_csv]
    code, out, err = kpl(capsys, *argv)
    assert code == 0, err
    assert STANDIN_LABEL in out and "accuracy" in out and "balanced_accuracy" in out and "macro_f1" in out
    assert "12 images" in out
    assert "test-kb-v1" in out  # which knowledge base (the old CLI printed "knowledge base: test-kb-v1")
    assert standin_announcements(err) == 1, err

    rows = read_csv(out_csv)
    assert len(rows) == 12
    assert list(rows[0])[:6] == ["path", "true_class", "predicted_class", "score_alpha", "score_beta", "score_gamma"]
    for r in rows:
        assert r["path"].startswith("val/") and r["path"].split("/")[1] == r["true_class"]
        scores = {c: float(r[f"score_{c}"]) for c in CLASSES}
        assert r["predicted_class"] == max(scores, key=scores.get)
    # the stand-in travels with the predictions themselves, as it did (old CSV: an "encoder" column)
    assert all(r.get("encoder") == STANDIN_LABEL for r in rows)
    meta_path = tmp_path / "preds.meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    assert meta["encoder"]["is_standin"] is True and meta["encoder"]["label"] == STANDIN_LABEL
    assert meta["config"]["k"] == 2 and meta["config"]["tau_t"] == 0.02 and meta["config"]["mode"] == "corrected"
    assert meta["config"]["iters_proxy"] == 50 and meta["config"]["seed"] == 0
    assert meta["kb"]["kb_id"] == "test-kb-v1" and meta["dataset"]["n_images"] == 12 and meta["method"] == "kpl"
    assert "date" not in meta and "timings" not in meta

    first = (out_csv.read_bytes(), meta_path.read_bytes())
    code, out2, err2 = kpl(capsys, *argv)  # second run: embeddings from the store
    assert code == 0
    assert "12" in out2 and any(w in (out2 + err2).lower() for w in ("from the store", "hit")), \
        "the run does not say that it read its embeddings from the store (the old CLI printed the cache hits)"
    assert (out_csv.read_bytes(), meta_path.read_bytes()) == first


def test_run_json_predictions_zero_shot(capsys, folder, kb, tmp_path):
    out_json = tmp_path / "preds.json"
    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", "zero_shot",
                       "--predictions", out_json)
    assert code == 0, err
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert data["encoder"] == STANDIN_LABEL and data["class_names"] == list(CLASSES)
    assert data.get("is_standin") is True  # as the old predictions JSON said
    assert len(data["predictions"]) == 12
    for p in data["predictions"]:
        assert set(p) == {"path", "true_class", "predicted_class", "scores"}
        assert p["predicted_class"] == max(p["scores"], key=p["scores"].get)
    assert (tmp_path / "preds.meta.json").is_file()


NAMES = [b"caf\xe9.png", b"back\\slash.png", b"tab\there.png", b"new\nline.png", "r\u00e9sum\u00e9 (1).png".encode()]


def test_any_file_name_round_trips_into_predictions(capsys, folder, kb, tmp_path):
    beta = folder / "val" / "beta"
    made = [put_named(beta, name, _png(i)) for i, name in enumerate(NAMES)]
    paths = {}
    for suffix in ("csv", "json"):
        out = tmp_path / f"preds.{suffix}"
        code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", "zero_shot",
                           "--predictions", out)
        assert code == 0, err
        assert "Traceback" not in err and out.stat().st_size > 0
        first = out.read_bytes()
        assert kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", "zero_shot",
                   "--predictions", out)[0] == 0
        assert out.read_bytes() == first  # deterministic
        first.decode("utf-8")  # valid UTF-8 however the names are encoded
        if suffix == "csv":
            texts = [r["path"] for r in read_csv(out)]
        else:
            texts = [r["path"] for r in json.loads(first)["predictions"]]
        assert len(texts) == 12 + len(NAMES)
        paths[suffix] = texts
    assert paths["csv"] == paths["json"]
    for p in made:
        text = display_path(p, folder)
        assert text in paths["csv"], text
        back = parse_display_path(text, folder)
        assert os.fsencode(back) == os.fsencode(p) and back.is_file()
    assert "val/beta/caf\\xe9.png" in paths["csv"] and "val/beta/back\\\\slash.png" in paths["csv"]
    assert "val/beta/new\\x0aline.png" in paths["csv"] and "val/beta/résumé (1).png" in paths["csv"]


def _png(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10 * i, 200 - 10 * i, 7)).save(buf, format="PNG")
    return buf.getvalue()


SCALES = (1e-6, -0.3, 0.3, 7.0, 123.0, -4.5e3)


def near_ties(method, x, text, config=None, **kw):
    """The real method, then logits where the winner beats the runner-up by one float32 ulp (a near-tie)."""
    res = REAL_RUN_METHOD(method, x, text, config, **kw)
    n, c = res.logits.shape
    logits = np.zeros((n, c), np.float32)
    for i in range(n):
        v = np.float32(SCALES[i % len(SCALES)] * 1.2345678)
        logits[i] = v
        logits[i, i % c] = np.nextafter(v, np.float32(np.inf))
    logits = torch.from_numpy(logits)
    return dataclasses.replace(res, logits=logits, predictions=logits.argmax(dim=1))


REAL_RUN_METHOD = pipeline.run_method


@pytest.mark.parametrize("suffix", ["csv", "json"])
def test_scores_reproduce_the_argmax_on_near_ties(capsys, folder, kb, tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(pipeline, "run_method", near_ties)
    out = tmp_path / f"preds.{suffix}"
    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", "zero_shot",
                       "--predictions", out)
    assert code == 0, err
    if suffix == "csv":
        rows = read_csv(out)
        scores = [[r[f"score_{c}"] for c in CLASSES] for r in rows]
    else:
        rows = json.loads(out.read_text(encoding="utf-8"))["predictions"]
        scores = [[r["scores"][c] for c in CLASSES] for r in rows]
    assert len(rows) == 12
    for i, (r, s) in enumerate(zip(rows, scores)):
        values = np.array([float(v) for v in s], dtype=np.float64)
        assert CLASSES[int(values.argmax())] == r["predicted_class"] == CLASSES[i % 3], (r, s)
        v = np.float32(SCALES[i % len(SCALES)] * 1.2345678)
        assert values.astype(np.float32)[i % 3] == np.nextafter(v, np.float32(np.inf))  # exact float32 round trip


def test_each_skipped_file_is_reported_once(capsys, folder, kb, tmp_path):
    bad = [folder / "val" / "alpha" / "zz_truncated.png", folder / "val" / "gamma" / "notes.jpg"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bad[1].write_bytes(b"Radiologist notes, not an image.\n")
    out_json = tmp_path / "p.json"
    code, out, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", "zero_shot",
                         "--on-error", "skip", "--predictions", out_json)
    assert code == 0, err
    for p in bad:
        assert (out + err).count(p.name) == 1, (out, err)
        assert str(p) in err  # with its full path
    meta = json.loads((tmp_path / "p.meta.json").read_text(encoding="utf-8"))
    assert sorted(p for p, _ in meta["dataset"]["skipped"]) == sorted(display_path(p) for p in bad)
    assert len(json.loads(out_json.read_text(encoding="utf-8"))["predictions"]) == 12

    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", "zero_shot")
    assert code == 2 and all(str(p) in err for p in bad) and "--on-error skip" in err


def test_run_unlabelled_with_the_kbs_classes(capsys, folder, kb, tmp_path):
    images = unlabelled_copy(tmp_path / "export", folder)
    out_csv, out_json = tmp_path / "u.csv", tmp_path / "u.json"
    code, out, err = kpl(capsys, "run", images, "--unlabelled", "--kb", kb, "--model", "standin", *FAST,
                         "--predictions", out_csv, "--output", out_json)
    assert code == 0, err
    assert "no metrics" in out
    rows = read_csv(out_csv)
    assert len(rows) == 12 and {r["true_class"] for r in rows} == {""}
    assert {r["predicted_class"] for r in rows} <= set(CLASSES)
    assert list(rows[0])[3:6] == [f"score_{c}" for c in CLASSES]
    assert {r["path"] for r in rows} == {display_path(p, images) for p in images.rglob("*.png")}
    result = json.loads(out_json.read_text(encoding="utf-8"))
    assert result["metrics"] is None and result["method"] == "kpl_corrected" and result["dataset"] == "export"


def test_run_unlabelled_zero_shot_with_classes_and_no_kb(capsys, folder, tmp_path):
    images = unlabelled_copy(tmp_path / "export", folder)
    out_csv = tmp_path / "z.csv"
    code, _, err = kpl(capsys, "run", images, "--classes", "normal,pneumonia", "--method", "zero_shot",
                       "--model", "standin", "--predictions", out_csv)
    assert code == 0, err
    rows = read_csv(out_csv)
    assert len(rows) == 12 and {r["predicted_class"] for r in rows} <= {"normal", "pneumonia"}
    assert list(rows[0])[3:5] == ["score_normal", "score_pneumonia"]


def test_output_json_and_merge(capsys, folder, kb, tmp_path):
    results = []
    for method in ("kpl_corrected", "zero_shot"):
        out = tmp_path / f"{method}.json"
        code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", method, *(
            FAST if method != "zero_shot" else ()), "--output", out)
        assert code == 0, err
        d = json.loads(out.read_text(encoding="utf-8"))
        assert {"dataset", "model", "method", "config", "metrics"} <= set(d)
        assert d["dataset"] == "cells" and d["method"] == method and d["model"] == STANDIN_LABEL
        assert {"accuracy", "balanced_accuracy", "macro_f1"} <= set(d["metrics"])
        assert type(d["metrics"]["n"]) is int  # an image count, not 6.0
        results.append(d)
    table = tmp_path / "table.csv"
    code, out, err = kpl(capsys, "merge", tmp_path / "kpl_corrected.json", tmp_path / "zero_shot.json",
                         "--output", table)
    assert code == 0, err
    assert "kpl_corrected" in out and "zero_shot" in out
    rows = read_csv(table)
    assert [r["method"] for r in rows] == ["kpl_corrected", "zero_shot"]
    for r, d in zip(rows, results):
        assert r["dataset"] == "cells" and r["model"] == STANDIN_LABEL
        assert float(r["accuracy"]) == pytest.approx(d["metrics"]["accuracy"])
    (tmp_path / "other.json").write_text('{"something": 1}', encoding="utf-8")
    code, _, err = kpl(capsys, "merge", tmp_path / "zero_shot.json", tmp_path / "other.json")
    assert code == 2 and "other.json" in err and "--output" in err


@pytest.mark.parametrize("method", ["transclip", "clip_dn"])
def test_baselines_with_their_own_config_write_predictions_and_output(capsys, folder, kb, tmp_path, method):
    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", method,
                       "--predictions", tmp_path / "p.json", "--output", tmp_path / "r.json")
    assert code == 0, err
    meta = json.loads((tmp_path / "p.meta.json").read_text(encoding="utf-8"))
    assert meta["method"] == method and meta["config"]
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["method"] == method


def test_compare_prints_and_writes_the_paired_table(capsys, folder, kb, tmp_path):
    out = tmp_path / "table.csv"
    code, stdout, err = kpl(capsys, "compare", folder, "--model", "standin", "--kb", kb, "--methods",
                            "kpl_corrected,zero_shot,kpl_shuffled", *FAST, "--output", out)
    assert code == 0, err
    assert "12 images of cells" in stdout and STANDIN_LABEL in stdout and "McNemar p" in stdout
    assert standin_announcements(err) == 1, err
    rows = read_csv(out)
    assert [r["method"] for r in rows] == ["kpl_corrected", "zero_shot", "kpl_shuffled"]
    assert rows[0]["McNemar p"] == "" and 0 <= float(rows[1]["McNemar p"]) <= 1
    code, _, err = kpl(capsys, "compare", folder, "--model", "standin", "--kb", kb, "--methods", "kpl,nonsense")
    assert code == 2 and "nonsense" in err
    code, _, err = kpl(capsys, "compare", folder, "--model", "standin", "--kb", kb, "--methods", "zero_shot,clip_dn",
                       "--k", "3")
    assert code == 2 and "--k" in err


# ------------------------------------------------------------------------------------------------ options and errors
@pytest.mark.parametrize("method,mode,why", [
    ("kpl_reference", "corrected", "fixes"), ("kpl_corrected", "reference", "fixes"),
    ("kpl_corrected", "corrected", "fixes"), ("zero_shot", "corrected", "has no modes"),
    ("transclip", "reference", "has no modes")])
def test_mode_that_does_not_apply_is_an_error_that_says_why(capsys, folder, kb, method, mode, why):
    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", method, "--mode", mode)
    assert code == 2, err
    line = [x for x in err.splitlines() if x.startswith("kpl: error:")]
    assert len(line) == 1 and "--mode" in line[0] and method in line[0] and why in line[0]


def test_mode_applies_to_kpl(capsys, folder, kb, tmp_path):
    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", "kpl", "--mode",
                       "reference", "--iters-proxy", "5", "--predictions", tmp_path / "p.csv")
    assert code == 0, err
    assert json.loads((tmp_path / "p.meta.json").read_text())["config"]["mode"] == "reference"


@pytest.mark.parametrize("method,option", [
    ("zero_shot", ["--k", "3"]), ("zero_shot", ["--iters-proxy", "5"]), ("descriptor_mean", ["--tau-t", "0.1"]),
    ("kpl_corrected", ["--transclip-n-neighbors", "3"]), ("kpl_corrected", ["--dn-fraction", "0.3"]),
    ("transclip", ["--dn-fraction", "0.3"]), ("inmap", ["--k", "3"]), ("waffle", ["--alpha", "0.5"])])
def test_an_option_that_does_not_apply_is_an_error(capsys, folder, kb, method, option):
    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", method, *option)
    assert code == 2, err
    assert option[0] in err and method in err and "Traceback" not in err
    assert standin_announcements(err) == 0  # refused before any model is loaded


@pytest.mark.parametrize("option,value", [("--tau-t", "-1"), ("--k", "0"), ("--alpha", "nan"),
                                          ("--batch-size", "0"), ("--limit-per-class", "0"),
                                          ("--max-pixels", "0"), ("--transclip-n-neighbors", "0")])
def test_a_bad_value_names_the_flag(capsys, folder, kb, option, value):
    method = "transclip" if option.startswith("--transclip") else "kpl_corrected"
    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", method, option, value)
    assert code == 2, err
    assert option in err, err
    assert "Traceback" not in err


def test_errors_are_one_line_exit_2(capsys, folder, kb, tmp_path):
    code, _, err = kpl(capsys, "run", tmp_path / "nowhere", "--model", "standin", "--kb", kb)
    assert code == 2 and "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("kpl: error:")]
    assert len(lines) == 1 and "nowhere" in lines[0]
    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--predictions", tmp_path / "p.txt")
    assert code == 2 and "--predictions" in err
    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--output", tmp_path / "no" / "r.json")
    assert code == 2 and "--output" in err
    code, _, err = kpl(capsys, "run", folder, "--model", str(tmp_path / "no-model"), "--kb", kb)
    assert code == 2 and "no-model" in err and standin_announcements(err) == 0  # explicit model: no fallback
    code, _, err = kpl(capsys, "run", folder, "--model", "standin")  # no KB for an unregistered folder
    assert code == 2 and "--kb" in err
    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", tmp_path / "missing.json")
    assert code == 2 and "missing.json" in err
    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--gamma", "0.5")
    assert code == 2 and "--class-marginal gamma" in err
    code, _, err = kpl(capsys, "run", folder, "--model", "standin", "--kb", kb, "--method", "nonsense")
    assert code == 2 and "nonsense" in err


def test_a_bad_device_is_a_clear_error(capsys, folder, kb):
    devices = ["no-such-device"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        code, _, err = kpl(capsys, "encode", folder, "--model", "standin", "--device", device)
        assert code == 2, err
        assert "--device" in err and device in err and "Traceback" not in err


def test_max_pixels_reaches_the_decoder(capsys, folder):
    """The bomb guard's message tells users to pass --max-pixels N: the option must act on run/encode."""
    code, _, err = kpl(capsys, "encode", folder, "--model", "standin", "--max-pixels", "1000")  # images: 44 x 40
    assert code == 2 and "too large" in err and "--max-pixels" in err
    code, _, err = kpl(capsys, "encode", folder, "--model", "standin", "--max-pixels", "2000")
    assert code == 0, err


def test_empty_class_folder_and_aliases_through_the_cli(capsys, folder, kb):
    (folder / "val" / "empty class").mkdir()
    code, _, err = kpl(capsys, "encode", folder, "--model", "standin")
    assert code == 2 and str(folder / "val" / "empty class") in err and "--skip-empty-classes" in err
    code, out, err = kpl(capsys, "encode", folder, "--model", "standin", "--skip-empty-classes")
    assert code == 0 and "empty class" in err and "12 images" in out
    os.symlink(folder / "val" / "alpha", folder / "val" / "alpha2")
    code, _, err = kpl(capsys, "encode", folder, "--model", "standin", "--skip-empty-classes")
    assert code == 2 and "--allow-aliases" in err
    code, out, err = kpl(capsys, "encode", folder, "--model", "standin", "--skip-empty-classes", "--allow-aliases")
    assert code == 0 and "16 images" in out and "same folder" in err


def test_verbose_logging_and_exit_codes(capsys, folder, kb):
    code, out, err = kpl(capsys, "-vv", "run", folder, "--model", "standin", "--kb", kb, "--method", "zero_shot")
    assert code == 0 and "accuracy" in out and standin_announcements(err) == 1
    code, _, err = kpl(capsys, "run")  # usage error from argparse
    assert code == 2 and "usage: kpl" in err
    code, _, _ = kpl(capsys, "--version")
    assert code == 0
