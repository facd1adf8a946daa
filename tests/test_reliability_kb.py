"""Reliability (issue 7): half-written knowledge bases — each defect is a clear error (or, where harmless, a clear
report) that names the class and the KB file, on the way a user meets it: ``embed_knowledge`` (what ``kpl run`` and
``run_experiment`` call) and ``kpl kb validate``. Parsing details of each field are unit-tested in
test_knowledge.py; here every case goes through the pipeline entry points with the stand-in's real tokenizer.
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import pytest

from kplib.cli.kb import main as kb_main
from kplib.encoders import PromptTruncationWarning, load_encoder
from kplib.errors import KnowledgeBaseError, KPLInputError, StandInWarning
from kplib.experiment import embed_knowledge

CLASSES = ["alpha", "beta gamma", "delta"]


@pytest.fixture(scope="module")
def standin():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        return load_encoder("standin")


def kb_dict(names=CLASSES, n_desc: int = 3) -> dict:
    return {"schema_version": 1, "kb_id": "half-written-v1", "dataset": None, "modality": "synthetic",
            "created": "2026-11-25", "method": "curated", "authors": "tests", "generator": None, "source": None,
            "classes": [{"name": n, "display_name": n, "references": ["a ref"],
                         "descriptions": [{"text": f"{adj} {n} pattern", "source": None}
                                          for adj in ("smooth", "grainy", "bright", "dark")[:n_desc]]}
                        for n in names]}


def write(tmp_path: Path, data, name: str = "my kb ü.json") -> Path:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in message: {message}"


def validate_cli(path: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = kb_main(["kb", "validate", str(path), "--classes", ",".join(CLASSES), "--min-count", "1", *extra])
    out, err = capsys.readouterr()
    return rc, out + err


# ------------------------------------------------------------------------------------------------ errors
def test_missing_class(tmp_path, standin, capsys):
    path = write(tmp_path, kb_dict(names=["alpha", "delta"]))
    with pytest.raises(KnowledgeBaseError) as info:
        embed_knowledge(path, standin, CLASSES)
    assert_names(one_line(info.value), "'beta gamma'", str(path))
    rc, text = validate_cli(path, capsys)
    assert rc == 1 and re.search(r"ERROR\s+coverage \[beta gamma\]", text) and str(path) in text


@pytest.mark.parametrize("variant", ["Beta Gamma", "beta_gamma", "beta  gamma", "Beta-Gamma"])
def test_class_name_case_and_spacing_mismatch(tmp_path, standin, capsys, variant):
    path = write(tmp_path, kb_dict(names=["alpha", variant, "delta"]))
    with pytest.raises(KnowledgeBaseError) as info:
        embed_knowledge(path, standin, CLASSES)
    msg = one_line(info.value)
    assert_names(msg, "'beta gamma'", repr(variant).replace("  ", " "), str(path), "rename")
    rc, text = validate_cli(path, capsys)
    assert rc == 1 and "differs only in case/spacing" in text


def test_leading_trailing_space_in_class_name(tmp_path, standin):
    path = write(tmp_path, kb_dict(names=["alpha", "beta gamma ", "delta"]))
    with pytest.raises(KnowledgeBaseError) as info:
        embed_knowledge(path, standin, CLASSES)
    assert_names(one_line(info.value), "'beta gamma '", str(path), "leading/trailing spaces")


def test_empty_class(tmp_path, standin, capsys):
    data = kb_dict()
    data["classes"][1]["descriptions"] = []
    path = write(tmp_path, data)
    with pytest.raises(KnowledgeBaseError) as info:
        embed_knowledge(path, standin, CLASSES)
    assert_names(one_line(info.value), "'beta gamma'", str(path), "non-empty")
    rc, text = validate_cli(path, capsys)
    assert rc == 2 and "'beta gamma'" in text and str(path) in text


def test_whitespace_only_description(tmp_path, standin):
    data = kb_dict()
    data["classes"][2]["descriptions"][1]["text"] = "   \n"
    path = write(tmp_path, data)
    with pytest.raises(KnowledgeBaseError) as info:
        embed_knowledge(path, standin, CLASSES)
    assert_names(one_line(info.value), "'delta'", str(path), "descriptions[1]")


def test_duplicate_class_entry(tmp_path, standin, capsys):
    data = kb_dict()
    data["classes"].append(dict(data["classes"][0]))
    path = write(tmp_path, data)
    with pytest.raises(KnowledgeBaseError) as info:
        embed_knowledge(path, standin, CLASSES)
    assert_names(one_line(info.value), "'alpha'", str(path), "duplicate")
    rc, text = validate_cli(path, capsys)
    assert rc == 2 and "duplicate" in text and "'alpha'" in text


def test_duplicate_description_is_reported_by_validate(tmp_path, capsys):
    data = kb_dict()
    data["classes"][0]["descriptions"].append({"text": "smooth alpha pattern", "source": None})
    path = write(tmp_path, data)
    rc, text = validate_cli(path, capsys)
    assert rc == 1 and re.search(r"ERROR\s+duplicate \[alpha #3\].*exact duplicate of #0", text)


def test_duplicate_description_is_not_silent_in_the_pipeline(tmp_path, standin, caplog):
    data = kb_dict()
    data["classes"][0]["descriptions"].append({"text": "smooth alpha pattern", "source": None})
    path = write(tmp_path, data)
    caplog.set_level(logging.WARNING, logger="kplib")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            embed_knowledge(path, standin, CLASSES)
        except KPLInputError as exc:
            said = [str(exc)]
        else:
            said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert any("duplicate" in s and "alpha" in s for s in said), said


def test_wrong_schema_version(tmp_path, standin, capsys):
    for version in (2, "1", None):
        data = kb_dict()
        data["schema_version"] = version
        path = write(tmp_path, data)
        with pytest.raises(KnowledgeBaseError) as info:
            embed_knowledge(path, standin, CLASSES)
        assert_names(one_line(info.value), str(path), "schema_version")
    rc, text = validate_cli(path, capsys)
    assert rc == 2 and "schema_version" in text


def test_invalid_utf8(tmp_path, standin, capsys):
    raw = json.dumps(kb_dict(), ensure_ascii=False).replace("grainy alpha", "gr\udcffiny alpha")
    path = write(tmp_path, raw.encode("utf-8", "surrogateescape"))
    with pytest.raises(KnowledgeBaseError) as info:
        embed_knowledge(path, standin, CLASSES)
    assert_names(one_line(info.value), str(path), "not valid UTF-8", "re-save it as UTF-8")
    rc, text = validate_cli(path, capsys)
    assert rc == 2 and "UTF-8" in text


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_half_written_file(tmp_path, standin, cut):
    raw = json.dumps(kb_dict()).encode()
    path = write(tmp_path, raw[: int(len(raw) * cut)])
    with pytest.raises(KnowledgeBaseError) as info:
        embed_knowledge(path, standin, CLASSES)
    assert_names(one_line(info.value), str(path), "not valid JSON", "line 1")


def test_missing_file(tmp_path, standin):
    with pytest.raises(KnowledgeBaseError) as info:
        embed_knowledge(tmp_path / "nope.json", standin, CLASSES)
    assert_names(one_line(info.value), str(tmp_path / "nope.json"), "does not exist")


# ------------------------------------------------------------------------------------------------ over-length
def test_over_length_descriptions_named_by_class(tmp_path, standin, capsys):
    data = kb_dict()
    long_text = "an extremely " + "very " * 90 + "long description"
    data["classes"][1]["descriptions"].append({"text": long_text, "source": None})
    path = write(tmp_path, data)
    with pytest.raises(KPLInputError) as info:
        embed_knowledge(path, standin, CLASSES, strict=True)
    assert_names(one_line(info.value), "class 'beta gamma', description 3", "exceed", "77")
    # default: warn (naming class and description), truncate as CLIP does, record it in the provenance
    with pytest.warns(PromptTruncationWarning, match=r"class 'beta gamma', description 3"):
        text = embed_knowledge(path, standin, CLASSES)
    assert [p["label"] for p in text.meta["long_prompts"]] == ["class 'beta gamma', description 3"]
    assert [len(d) for d in text.description_embeddings] == [3, 4, 3]
    rc, out = validate_cli(path, capsys)
    assert rc == 1 and re.search(r"token_length \[beta gamma #3\]", out)


# ------------------------------------------------------------------------------------------------ harmless: reported
def test_extra_class_is_dropped_and_reported(tmp_path, standin, capsys):
    """A KB written for more classes than the folder holds (e.g. a subset of a dataset) is usable: the extra class
    is dropped (class order = the folder's) and ``kb validate`` names it as a warning."""
    path = write(tmp_path, kb_dict(names=["zeta", *CLASSES]))
    text = embed_knowledge(path, standin, CLASSES)
    assert text.class_names == CLASSES and len(text.description_embeddings) == 3
    assert text.meta["n_descriptions"] == [3, 3, 3]
    rc, out = validate_cli(path, capsys)
    assert rc == 0 and re.search(r"WARNING\s+coverage \[zeta\]", out)
