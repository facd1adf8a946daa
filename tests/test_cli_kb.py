"""Tests of the ``kpl kb`` commands (kplib.cli_kb), run in-process; one run as ``python -m kplib.cli_kb``."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from kplib import knowledge as K
from kplib.cli import kb as cli_kb

from test_knowledge import kb_dict, write
from test_llm import GOOD, KEY, FakeServer, completion


def run(capsys, *argv):
    code = cli_kb.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_add_kb_subparsers_plugs_into_a_parent_parser():
    parser = argparse.ArgumentParser(prog="kpl")
    sub = parser.add_subparsers(dest="command")
    cli_kb.add_kb_subparsers(sub)
    args = parser.parse_args(["kb", "validate", "some.json", "--classes", "a,b", "--min-count", "3"])
    assert args.func is cli_kb._cmd_validate and args.classes == "a,b" and args.min_count == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["kb", "validate", "x.json", "--dataset", "d", "--classes", "a"])  # exclusive


@pytest.mark.parametrize("name", K.list_curated())
def test_validate_curated_ok(capsys, name):
    code, out, _ = run(capsys, "kb", "validate", name, "--no-dataset")
    assert code == 0 and "OK" in out and name in out


def test_validate_findings_give_exit_1(capsys, tmp_path):
    p = write(tmp_path, kb_dict({"normal": ["clear view", "clear view"], "glaucoma": ["cupping"]}))
    code, out, _ = run(capsys, "kb", "validate", str(p), "--classes", "glaucoma,normal,cataract", "--min-count",
                       "1", "--no-token-check")
    assert code == 1
    assert "ERROR   duplicate [normal #1]" in out and "ERROR   coverage [cataract]" in out
    code, out, _ = run(capsys, "kb", "validate", str(p), "--classes", "glaucoma,normal", "--min-count", "1",
                       "--no-dataset")
    assert code == 1 and "duplicate" in out
    p2 = write(tmp_path, kb_dict({"normal": ["clear view"], "glaucoma": ["cupping"]}), "ok.json")
    code, out, _ = run(capsys, "kb", "validate", str(p2), "--classes", "glaucoma,normal", "--min-count", "1")
    assert code == 0 and "OK" in out


def test_validate_bad_file_exit_2(capsys, tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{", encoding="utf-8")
    code, out, err = run(capsys, "kb", "validate", str(p))
    assert code == 2 and "broken.json is not valid JSON" in err and out == ""


def test_import_with_class_map(capsys, tmp_path):
    src = tmp_path / "d.json"
    src.write_text(json.dumps({"set1": {"Normal": ["clear lungs"], "TB": ["cavities", "nodules"]},
                               "set2": {"Normal": ["x"], "Nodule": ["y"]}}), encoding="utf-8")
    out_kb = tmp_path / "kb.json"
    code, _, err = run(capsys, "kb", "import", str(src), "--subset", "set1", "--classes", "normal,tuberculosis",
                       "-o", str(out_kb))
    assert code == 2 and "'Normal'" in err and "--class-map" in err and not out_kb.exists()
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"Normal": "normal", "TB": "tuberculosis"}), encoding="utf-8")
    code, out, _ = run(capsys, "kb", "import", str(src), "--subset", "set1", "--classes", "normal,tuberculosis",
                       "--class-map", str(cmap), "-o", str(out_kb))
    assert code == 0 and "2 classes, 3 descriptions" in out
    kb = K.load_kb(out_kb)
    assert kb.class_names == ["normal", "tuberculosis"] and kb.get("tuberculosis").texts == ["cavities", "nodules"]
    code, _, err = run(capsys, "kb", "import", str(src), "--subset", "set1", "--class-map", "{bad", "-o",
                       str(out_kb))
    assert code == 2 and "--class-map" in err


def test_generate_against_local_server(capsys, tmp_path, monkeypatch):
    server = FakeServer()
    try:
        server.reply((200, completion(GOOD)))
        monkeypatch.setenv("KPL_LLM_BASE_URL", f"http://127.0.0.1:{server.port}/v1")
        monkeypatch.setenv("KPL_LLM_MODEL", "test-model")
        monkeypatch.setenv("KPL_LLM_API_KEY", KEY)
        out_kb = tmp_path / "gen.json"
        code, out, err = run(capsys, "kb", "generate", "--classes", "glioma,notumor", "--dataset", "toy",
                             "--prompt", "medical", "--modality", "brain MRI", "--min-count", "50", "-o",
                             str(out_kb))
        assert code == 0, out + err
        assert KEY not in out + err and KEY not in out_kb.read_text(encoding="utf-8")
        kb = K.load_kb(out_kb)
        assert kb.method == "generated" and kb.class_names == ["glioma", "notumor"]
        assert kb.generator["base_url_host"] == f"127.0.0.1:{server.port}"
        assert len(server.requests) == 2
        server.reply((400, b'{"error": "bad"}'))
        code, out, err = run(capsys, "kb", "generate", "--classes", "glioma", "-o", str(tmp_path / "g2.json"))
        assert code == 2 and "HTTP 400" in err and not (tmp_path / "g2.json").exists()
    finally:
        server.close()


def test_generate_requires_endpoint(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("KPL_LLM_BASE_URL", raising=False)
    code, _, err = run(capsys, "kb", "generate", "--classes", "a", "-o", str(tmp_path / "x.json"))
    assert code == 2 and "KPL_LLM_BASE_URL" in err


def test_list_standalone_module():
    r = subprocess.run([sys.executable, "-m", "kplib.cli.kb", "kb", "list"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for name in K.list_curated():
        assert name in r.stdout
