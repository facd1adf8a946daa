"""The ``kpl`` command: --help everywhere, datasets, encode, run end to end, predictions files, errors."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kplib.cli import main
from kplib.encoders import STANDIN_LABEL

sys.path.insert(0, str(Path(__file__).parent))
from test_experiment import CLASSES, make_folder, make_kb  # noqa: E402

KPL = Path(sys.executable).parent / "kpl"


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "cells")


@pytest.fixture
def kb(tmp_path):
    return make_kb(tmp_path / "kb.json")


# ------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("argv", [[], ["datasets"], ["encode"], ["run"], ["kb"], ["kb", "validate"],
                                  ["kb", "import"], ["kb", "generate"], ["kb", "list"]])
def test_help_for_every_command(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kpl")
    if argv == ["run"]:
        for flag in ("--method", "--mode", "--kb", "--model", "--k", "--tau-t", "--tau-i", "--alpha", "--gamma",
                     "--class-marginal", "--retrieval", "--limit-per-class", "--predictions", "--on-error",
                     "--no-transport-baseline", "--iters-proxy"):
            assert flag in out, flag


def test_installed_entry_point_runs():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([str(KPL), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "encode" in r.stdout and "run" in r.stdout and "datasets" in r.stdout


# ------------------------------------------------------------------------------------------------ datasets / encode
def test_datasets_lists_registry(capsys, tmp_path, monkeypatch):
    (tmp_path / "malaria_cells" / "val" / "A").mkdir(parents=True)
    (tmp_path / "malaria_cells" / "val" / "B").mkdir(parents=True)
    monkeypatch.setenv("KPL_DATA_ROOT", str(tmp_path))
    code, out, _ = run_main(capsys, "datasets")
    assert code == 0
    line = next(l for l in out.splitlines() if l.startswith("malaria_cells"))
    assert line.split()[1:3] == ["yes", "2"]
    brain = next(l for l in out.splitlines() if l.startswith("brain_tumor_mri"))
    assert brain.split()[1] == "no"
    assert brain.split()[3] == "brain_tumor_mri"  # its curated KB
    # no curated KB: the published descriptor set that `kpl run` imports (default_kb_for) is named
    imagenet = next(l for l in out.splitlines() if l.startswith("imagenet_sample"))
    assert "DCLIP" in imagenet and "descriptors_imagenet.json" in imagenet


def test_encode_prints_encoder_counts_and_cache(capsys, folder, tmp_path):
    code, out, err = run_main(capsys, "encode", str(folder), "--model", "standin", "--save", str(tmp_path / "e.pt"))
    assert code == 0, err
    assert f"encoder: {STANDIN_LABEL}" in out and "MEANINGLESS" in out
    assert "12 images, 3 classes" in out and "  beta: 4" in out
    assert "cache: 0 hit(s), 12 miss(es), 12 written" in out
    assert "UNTRAINED STAND-IN" in err  # the log line on stderr
    assert (tmp_path / "e.pt").is_file()
    code, out, _ = run_main(capsys, "encode", str(folder), "--model", "standin")
    assert code == 0 and "cache: 12 hit(s), 0 miss(es)" in out


# ------------------------------------------------------------------------------------------------ run
def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_run_end_to_end_csv_and_byte_identical_repeat(capsys, folder, kb, tmp_path):
    out_csv = tmp_path / "preds.csv"
    argv = ["run", str(folder), "--model", "standin", "--kb", str(kb), "--method", "kpl", "--mode", "corrected",
            "--k", "2", "--tau-t", "0.02", "--iters-proxy", "50", "--n-bootstrap", "50", "--predictions", str(out_csv)]
    code, out, err = run_main(capsys, *argv)
    assert code == 0, err
    assert f"encoder: {STANDIN_LABEL}" in out
    assert out.count("THESE NUMBERS ARE MEANINGLESS") == 2  # banner before and after the table
    assert "knowledge base: test-kb-v1" in out and "accuracy" in out and "balanced_accuracy" in out
    assert "12 images in 3 classes" in out

    rows = _read_csv(out_csv)
    assert len(rows) == 12
    assert list(rows[0]) == ["path", "true_class", "predicted_class", "score_alpha", "score_beta", "score_gamma",
                             "encoder"]
    for r in rows:
        assert r["path"].startswith("val/") and r["path"].split("/")[1] == r["true_class"]
        scores = {c: float(r[f"score_{c}"]) for c in CLASSES}
        assert r["predicted_class"] == max(scores, key=scores.get)
        assert r["encoder"] == STANDIN_LABEL
    meta_path = tmp_path / "preds.meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["is_standin"] is True and meta["encoder_label"] == STANDIN_LABEL
    assert meta["config"]["k"] == 2 and meta["config"]["tau_t"] == 0.02 and meta["config"]["mode"] == "corrected"
    assert meta["kb_id"] == "test-kb-v1" and meta["n_images"] == 12 and meta["seed"] == 0
    assert "date" not in meta and "timings" not in meta

    first = (out_csv.read_bytes(), meta_path.read_bytes())
    code, out2, _ = run_main(capsys, *argv)  # second run: embeddings from the cache
    assert code == 0 and "embedding cache: 12 hit(s), 0 miss(es)" in out2
    assert (out_csv.read_bytes(), meta_path.read_bytes()) == first


def test_run_json_predictions_zero_shot(capsys, folder, kb, tmp_path):
    out_json = tmp_path / "preds.json"
    code, out, err = run_main(capsys, "run", str(folder), "--model", "standin", "--kb", str(kb),
                              "--method", "zero_shot", "--n-bootstrap", "0", "--predictions", str(out_json))
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["encoder"] == STANDIN_LABEL and data["is_standin"] is True
    assert data["class_names"] == list(CLASSES) and len(data["predictions"]) == 12
    for p in data["predictions"]:
        assert set(p) == {"path", "true_class", "predicted_class", "scores"}
        assert p["predicted_class"] == max(p["scores"], key=p["scores"].get)
    assert (tmp_path / "preds.meta.json").is_file()


@pytest.mark.slow  # two fresh processes (torch + transformers imports, stand-in build): ~10 s idle, 30 s loaded
def test_run_through_installed_command(folder, kb, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out_csv = tmp_path / "p.csv"
    r = subprocess.run([str(KPL), "run", str(folder), "--model", "standin", "--kb", str(kb), "--method",
                        "descriptor_mean", "--n-bootstrap", "0", "--predictions", str(out_csv)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert STANDIN_LABEL in r.stdout and len(_read_csv(out_csv)) == 12
    assert "UNTRAINED STAND-IN" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([str(KPL), "encode", str(tmp_path / "nowhere"), "--model", "standin"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("kpl: error:") and "Traceback" not in r.stderr


def test_errors_are_one_line_exit_2(capsys, folder, kb, tmp_path):
    code, out, err = run_main(capsys, "run", str(tmp_path / "nowhere"), "--model", "standin", "--kb", str(kb))
    assert code == 2 and "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("kpl: error:")]
    assert len(lines) == 1 and "nowhere" in lines[0]
    code, _, err = run_main(capsys, "run", str(folder), "--model", "standin", "--kb", str(kb),
                            "--predictions", str(tmp_path / "p.txt"))
    assert code == 2 and "--predictions" in err
    code, _, err = run_main(capsys, "run", str(folder), "--model", str(tmp_path / "no-model"), "--kb", str(kb))
    assert code == 2 and "no-model" in err and "STAND-IN" not in err  # explicit model: no fallback
    code, _, err = run_main(capsys, "run", str(folder), "--model", "standin")  # no KB for an unregistered folder
    assert code == 2 and "--kb" in err
    code, _, err = run_main(capsys, "run", str(folder), "--model", "standin", "--kb", str(kb), "--method",
                            "zero_shot", "--k", "3")
    assert code == 2 and "--k" in err
    code, _, err = run_main(capsys, "run", str(folder), "--model", "standin", "--kb", str(kb), "--tau-t", "-1")
    assert code == 2 and "tau_t" in err
    code, _, err = run_main(capsys, "encode", str(folder), "--model", "standin", "--batch-size", "0")
    assert code == 2 and "--batch-size" in err
    code, _, err = run_main(capsys, "encode", str(folder), "--model", "standin", "--threads", "0")
    assert code == 2 and "--threads" in err
    code, _, err = run_main(capsys, "run", str(folder), "--kb", str(kb), "--template", "a photo of {class_name}")
    assert code == 2 and "--template" in err and "STAND-IN" not in err  # rejected before any model is loaded
