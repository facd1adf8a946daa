"""Tests of the ``kpl kb`` commands (kplib.cli.kb), run in-process through ``kpl``'s entry point."""
from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys

import pytest
from PIL import Image
from test_knowledge import kb_dict, write
from test_llm import GOOD, KEY, FakeServer, completion

from kplib.cli import kb as cli_kb
from kplib.cli import main
from kplib.io import knowledge as K


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def image_folder(root, classes, n=2):
    """A tiny <root>/<class>/<image>.png folder (``n`` images per class; 0 leaves the class folder empty)."""
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(root / c / f"{i}.png")
    return root


def test_register_plugs_into_a_parent_parser():
    parser = argparse.ArgumentParser(prog="kpl")
    sub = parser.add_subparsers(dest="command")
    assert cli_kb.register(sub) is None
    args = parser.parse_args(["kb", "validate", "some.json", "--classes", "a,b", "--min-count", "3", "--model", "m"])
    assert args.func is cli_kb.cmd_validate and args.classes == "a,b" and args.min_count == 3
    assert args.checkpoint == "m"
    args = parser.parse_args(["kb", "generate", "--classes", "a", "--model", "gpt-x", "-o", "x.json"])
    assert args.func is cli_kb.cmd_generate and args.llm_model == "gpt-x"
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
    assert code == 2 and "broken.json is not valid JSON" in err and out == "" and len(err.splitlines()) == 1


def test_validate_against_an_image_folder(capsys, tmp_path):
    """Coverage from a folder: a folder class without KB entry is an error, a KB class without images a warning."""
    folder = image_folder(tmp_path / "data", ["glaucoma", "normal"])
    image_folder(folder, ["cataract"], n=0)  # an empty class folder: the KB's cataract has no images
    p = write(tmp_path, kb_dict({"glaucoma": ["cupping"], "cataract": ["haze"], "zeta": ["z"]}))
    code, out, _ = run(capsys, "kb", "validate", str(p), "--dataset", str(folder), "--min-count", "1")
    assert code == 1
    assert "ERROR   coverage [normal]: dataset class 'normal' has no entry" in out
    assert "WARNING coverage [cataract]: KB class 'cataract' has no images" in out
    assert "WARNING coverage [zeta]" in out
    code, _, err = run(capsys, "kb", "validate", str(p), "--dataset", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere" in err


def test_validate_outside_a_checkout_without_tokenizer(capsys, monkeypatch, tmp_path):
    """`kpl kb validate brain_tumor_mri` with no CLIP tokenizer folder: the token check is skipped, with a warning."""
    monkeypatch.setenv("KPL_TOKENIZER_DIR", str(tmp_path / "absent"))
    code, out, err = run(capsys, "kb", "validate", "brain_tumor_mri", "--no-dataset")
    assert code == 0, err
    assert "token check=off" in out and "WARNING token_length: prompt token lengths not checked" in out
    assert "--model" in out


def test_validate_with_the_models_own_tokenizer(capsys, tmp_path):
    import transformers

    from kplib import paths

    tok = transformers.CLIPTokenizer.from_pretrained(str(paths.tokenizer_dir()))
    tok.model_max_length = 10
    tok.save_pretrained(tmp_path / "ckpt")
    p = write(tmp_path, kb_dict({"a": ["one two three four five six seven"], "b": ["x"]}))
    code, out, _ = run(capsys, "kb", "validate", str(p), "--min-count", "1", "--model", str(tmp_path / "ckpt"))
    assert code == 1 and "context_length=10" in out and "token_length [a #0]" in out


def test_validate_non_schema_file_names_the_import(capsys, tmp_path):
    p = write(tmp_path, {"classes": {"a": ["x"]}, "note": "mine"}, "mine.json")
    code, out, err = run(capsys, "kb", "validate", str(p))
    assert code == 2 and f"kpl kb import {p} --output {tmp_path / 'mine.kb.json'}" in err
    code, out, _ = run(capsys, "kb", "import", str(p), "--output", str(tmp_path / "mine.kb.json"))
    assert code == 0
    code, out, _ = run(capsys, "kb", "validate", str(tmp_path / "mine.kb.json"))
    assert code == 0 and "OK" in out


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
    assert code == 0 and "wrote" in out and "2 classes, 3 descriptions" in out
    kb = K.load_kb(out_kb)
    assert kb.class_names == ["normal", "tuberculosis"] and kb.get("tuberculosis").texts == ["cavities", "nodules"]
    code, _, err = run(capsys, "kb", "import", str(src), "--subset", "set1", "--class-map", "{bad", "-o",
                       str(out_kb))
    assert code == 2 and "--class-map" in err
    code, _, err = run(capsys, "kb", "import", str(src), "-o", str(out_kb))
    assert code == 2 and "--subset set1" in err and "subset='set1'" in err


def test_failed_import_writes_nothing_unless_forced(capsys, tmp_path):
    src = write(tmp_path, {"glaucoma": ["an enlarged cup", "unlike cataract, a clear view"], "cataract": ["haze"]},
                "mine.json")
    out_kb = tmp_path / "kb.json"
    code, out, _ = run(capsys, "kb", "import", str(src), "-o", str(out_kb))
    assert code == 1 and "names_other_class [glaucoma #1]" in out and "not written" in out and "--force" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json"]
    old = os.umask(0o022)
    try:
        code, out, _ = run(capsys, "kb", "import", str(src), "-o", str(out_kb), "--force")
    finally:
        os.umask(old)
    assert code == 0 and K.load_kb(out_kb).class_names == ["glaucoma", "cataract"]
    assert stat.S_IMODE(out_kb.stat().st_mode) == 0o644


def test_import_into_a_missing_folder_fails_before_reading(capsys, tmp_path):
    src = write(tmp_path, {"a": ["x"]}, "mine.json")
    code, _, err = run(capsys, "kb", "import", str(src), "-o", str(tmp_path / "no" / "kb.json"))
    assert code == 2 and "--output" in err and str(tmp_path / "no") in err


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
    assert code == 2 and "KPL_LLM_BASE_URL" in err and "--base-url" in err


def test_list_through_the_kpl_command():
    r = subprocess.run([sys.executable, "-c", "import sys; from kplib.cli import main; sys.exit(main())", "kb", "list"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    for name in K.list_curated():
        assert name in r.stdout
