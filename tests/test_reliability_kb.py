"""Reliability (issues 7 and 15): knowledge bases as people write them, half-written and unusual — each case has one
exact outcome (converted as expected, reported, or a one-line error naming the file and the fix), met the way a user
meets it: ``kpl kb import``, ``kpl kb validate`` (the same ``load_kb`` as ``kpl run --kb``) and the pipeline's
``embed_knowledge``. Parsing details of each schema field are unit-tested in test_knowledge.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import pytest
from PIL import Image

from kplib.cli import main
from kplib.errors import KnowledgeBaseError, KPLInputError, StandInWarning
from kplib.io import descriptors as D
from kplib.io import knowledge as K

CLASSES = ["alpha", "beta gamma", "delta"]
TEXTS = {n: [f"{adj} {n} pattern" for adj in ("smooth", "grainy", "bright")] for n in CLASSES}


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


def folder_of(tmp_path: Path, classes=CLASSES) -> Path:
    root = tmp_path / "images"
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (8, 8), (30 * i, 60 * j, 90)).save(root / c / f"{j}.png")
    return root


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ the corpus
# (case, file content, command, exit code, text that must appear in the output, classes of the written KB or None)
CORPUS = [
    ("nested `classes` map with metadata", {"classes": TEXTS, "dataset": "toy", "note": "by hand"}, "import", 0,
     "wrote", CLASSES),
    ("flat map with a metadata key", {**TEXTS, "author": "me", "version": 2}, "import", 0, "wrote", CLASSES),
    ("{class: [{text: ...}]}", {n: [{"text": t} for t in ts] for n, ts in TEXTS.items()}, "import", 0, "wrote",
     CLASSES),
    ("whitespace and repeats are cleaned", {**TEXTS, "alpha": ["  x  ", "   ", "x"]}, "import", 0, "wrote", CLASSES),
    ("empty class list", {**TEXTS, "alpha": []}, "import", 2,
     ("class(es) ['alpha'] (1 in all) have no non-empty descriptions; leave them out (command line: "
      "--drop-empty-classes; Python: drop_empty_classes=True)"), None),
    ("non-string description", {**TEXTS, "delta": ["fine", 3.5]}, "import", 2,
     "class 'delta', entry 1: 3.5 is not a description; write a string or an object", None),
    ("duplicate classes differing in case", {**TEXTS, "Alpha": ["x"]}, "import", 2,
     "classes 'alpha' and 'Alpha' differ only in case/spacing", None),
    ("the same key twice", b'{"alpha": ["x"], "beta gamma": ["y"], "alpha": ["z"]}', "import", 2,
     "has the key 'alpha' more than once in one object (JSON keeps the last); merge the entries", None),
    ("BOM-prefixed UTF-8", b"\xef\xbb\xbf" + json.dumps(TEXTS).encode(), "import", 0, "wrote", CLASSES),
    ("Latin-1 file", json.dumps({**TEXTS, "delta": ["caf\u00e9 au lait spots"]}, ensure_ascii=False).encode("latin-1"),
     "import", 2, "is not valid UTF-8 (byte", None),
    ("JSON Lines", b'{"class": "alpha", "text": "x"}\n{"class": "delta", "text": "y"}\n', "import", 2,
     "looks like JSON Lines", None),
    ("a list at the top", b'["alpha", "delta"]', "import", 2, "unrecognised structure", None),
    ("classes mixed with descriptor sets", {"alpha": ["x"], "set": {"delta": ["y"]}}, "import", 2,
     "mixes classes ['alpha'] with descriptor sets ['set']", None),
    ("a schema-v1 KB given to import", kb_dict(), "import", 2, "already a schema-v1 knowledge base", None),
    ("a description naming another class", {**TEXTS, "alpha": ["unlike delta, smooth"]}, "import", 1,
     "not written: 1 error(s)", None),
    ("a {class: [text]} file used as a KB", TEXTS, "validate", 2, "kpl kb import", None),
    ("a KB class missing from the folder", kb_dict(names=[*CLASSES, "zeta"]), "validate-folder", 0,
     "WARNING coverage [zeta]: KB class 'zeta' has no images in the dataset", None),
    ("a folder class missing from the KB", kb_dict(names=["alpha", "beta gamma"]), "validate-folder", 1,
     "ERROR   coverage [delta]: dataset class 'delta' has no entry in the KB", None),
]


@pytest.mark.parametrize("case, content, command, code, text, written", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus(tmp_path, capsys, case, content, command, code, text, written):
    path = write(tmp_path, content)
    folder = folder_of(tmp_path)
    out = tmp_path / "out" / "kb.json"
    out.parent.mkdir()
    before = tree_digest(folder) | {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    argv = {"import": ["kb", "import", str(path), "--output", str(out)],
            "validate": ["kb", "validate", str(path), "--min-count", "1"],
            "validate-folder": ["kb", "validate", str(path), "--dataset", str(folder), "--min-count", "1"]}[command]
    rc = main(argv)
    stdout, stderr = capsys.readouterr()
    said = " ".join((stdout + stderr).split())
    assert rc == code, stdout + stderr
    assert " ".join(text.split()) in said, said
    if code == 2:  # one line on stderr naming the file
        assert len(stderr.strip().splitlines()) == 1 and str(path) in stderr and stdout == ""
    assert (K.load_kb(out).class_names if out.exists() else None) == written
    assert list(out.parent.iterdir()) == ([out] if written else [])  # a failed import writes nothing
    assert tree_digest(folder) | {path.name: hashlib.sha256(path.read_bytes()).hexdigest()} == before


def test_corpus_provenance_of_people_written_files(tmp_path):
    kb = D.import_descriptors(write(tmp_path, {"classes": TEXTS, "dataset": "toy", "note": "by hand"}))
    assert kb.dataset == "toy" and kb.source["metadata"] == {"dataset": "toy", "note": "by hand"}
    kb = D.import_descriptors(write(tmp_path, {**TEXTS, "author": "me", "version": 2}))
    assert kb.source["metadata"] == {"author": "me", "version": 2} and kb.class_names == CLASSES
    kb = D.import_descriptors(write(tmp_path, {**TEXTS, "alpha": ["  x  ", "   ", "x"]}))
    assert kb.get("alpha").texts == ["x"]
    assert kb.source["cleaning"] == {"dropped_empty_strings": 1, "dropped_exact_duplicates": 1}


def test_forced_import_writes_and_says_so(tmp_path, capsys):
    path = write(tmp_path, {**TEXTS, "alpha": ["unlike delta, smooth"]})
    out = tmp_path / "kb.json"
    assert main(["kb", "import", str(path), "--output", str(out), "--force"]) == 0
    assert "names_other_class [alpha #0]" in capsys.readouterr().out and K.load_kb(out).class_names == CLASSES


# ------------------------------------------------------------------------------------------------ schema-v1 defects
@pytest.mark.parametrize("mutate, parts, code", [
    (lambda d: d["classes"][1]["descriptions"].clear(), ["'beta gamma'", "non-empty"], 2),
    (lambda d: d["classes"][2]["descriptions"][1].update(text="   \n"), ["'delta'", "descriptions[1]"], 2),
    (lambda d: d["classes"][1].update(name="beta gamma "), ["'beta gamma '", "leading/trailing spaces"], 2),
    (lambda d: d["classes"].append(dict(d["classes"][0])), ["'alpha'", "duplicate"], 2),
    (lambda d: d.update(schema_version=2), ["schema_version is 2"], 2),
    (lambda d: d.update(schema_version="1"), ["schema_version is '1'"], 2),
    (lambda d: d.update(schema_version=None), ["schema_version is None"], 2),
])
def test_schema_defects_are_one_line_errors(tmp_path, capsys, mutate, parts, code):
    data = kb_dict()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(KnowledgeBaseError) as info:
        K.load_kb(path)
    for part in [*parts, str(path)]:
        assert part in " ".join(str(info.value).split())
    rc = main(["kb", "validate", str(path), "--classes", ",".join(CLASSES), "--min-count", "1"])
    err = capsys.readouterr().err
    assert rc == code and all(p in err for p in parts) and str(path) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_half_written_file(tmp_path, cut):
    raw = json.dumps(kb_dict()).encode()
    path = write(tmp_path, raw[: int(len(raw) * cut)])
    with pytest.raises(KnowledgeBaseError, match="not valid JSON: .* line 1") as info:
        K.load_kb(path)
    assert str(path) in str(info.value)


def test_invalid_utf8_and_missing_file(tmp_path, capsys):
    raw = json.dumps(kb_dict(), ensure_ascii=False).replace("grainy alpha", "gr\udcffiny alpha")
    path = write(tmp_path, raw.encode("utf-8", "surrogateescape"))
    with pytest.raises(KnowledgeBaseError, match="not valid UTF-8.*re-save it as UTF-8"):
        K.load_kb(path)
    assert main(["kb", "validate", str(path)]) == 2 and "UTF-8" in capsys.readouterr().err
    with pytest.raises(KnowledgeBaseError, match="does not exist") as info:
        K.load_kb(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(info.value)


def test_duplicate_description_is_reported_by_validate(tmp_path, capsys):
    data = kb_dict()
    data["classes"][0]["descriptions"].append({"text": "smooth alpha pattern", "source": None})
    path = write(tmp_path, data)
    rc = main(["kb", "validate", str(path), "--classes", ",".join(CLASSES), "--min-count", "1"])
    assert rc == 1 and "ERROR   duplicate [alpha #3]: exact duplicate of #0" in capsys.readouterr().out


def test_over_length_description_is_reported_by_validate(tmp_path, capsys):
    data = kb_dict()
    data["classes"][1]["descriptions"].append({"text": "an extremely " + "very " * 90 + "long description",
                                               "source": None})
    rc = main(["kb", "validate", str(write(tmp_path, data)), "--classes", ",".join(CLASSES), "--min-count", "1"])
    out = capsys.readouterr().out
    assert rc == 1 and "token_length [beta gamma #3]: prompt is" in out and "> 77" in out


# ------------------------------------------------------------------------------------------------ through the pipeline
@pytest.fixture(scope="module")
def standin():
    from kplib.io.encoders import load_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        return load_encoder("standin")


@pytest.mark.parametrize("names, variant", [(["alpha", "delta"], None),
                                            (["alpha", "Beta Gamma", "delta"], "Beta Gamma"),
                                            (["alpha", "beta_gamma", "delta"], "beta_gamma"),
                                            (["alpha", "beta  gamma", "delta"], "beta  gamma"),
                                            (["alpha", "Beta-Gamma", "delta"], "Beta-Gamma")])
def test_missing_or_misspelt_class_stops_the_pipeline(tmp_path, standin, capsys, names, variant):
    from kplib.pipeline import embed_knowledge

    path = write(tmp_path, kb_dict(names=names))
    with pytest.raises(KnowledgeBaseError) as info:
        embed_knowledge(path, standin, CLASSES)
    msg = " ".join(str(info.value).split())
    assert "'beta gamma'" in msg and str(path) in msg
    assert variant is None or (repr(variant).replace("  ", " ") in msg and "rename" in msg and "--class-map" in msg)
    rc = main(["kb", "validate", str(path), "--classes", ",".join(CLASSES), "--min-count", "1"])
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 1 and "ERROR coverage [beta gamma]" in out and str(path) in out
    assert variant is None or "differs only in case/spacing" in out


def test_over_length_description_is_named_by_the_pipeline(tmp_path, standin, caplog):
    """The pipeline encodes an over-long prompt truncated as CLIP does, and says which one."""
    from kplib.pipeline import embed_knowledge

    data = kb_dict()
    data["classes"][1]["descriptions"].append({"text": "an extremely " + "very " * 90 + "long description",
                                               "source": None})
    with caplog.at_level(logging.WARNING, logger="kplib"):
        text = embed_knowledge(K.load_kb(write(tmp_path, data)), standin, CLASSES)
    assert [len(d) for d in text.description_embeddings] == [3, 4, 3]
    assert any("class 'beta gamma', description 3" in r.getMessage() and "truncated" in r.getMessage()
               for r in caplog.records)


def test_extra_class_is_dropped_and_reported(tmp_path, standin, capsys, caplog):
    """A KB written for more classes than the folder holds is usable: the extra class is left out (class order =
    the folder's), with a warning, and ``kb validate`` names it."""
    from kplib.pipeline import embed_knowledge

    path = write(tmp_path, kb_dict(names=["zeta", *CLASSES]))
    with caplog.at_level(logging.WARNING, logger="kplib"):
        text = embed_knowledge(K.load_kb(path), standin, CLASSES)
    assert text.class_names == CLASSES and [len(d) for d in text.description_embeddings] == [3, 3, 3]
    assert any("zeta" in r.getMessage() for r in caplog.records)


def test_duplicate_description_is_not_silent_in_the_pipeline(tmp_path, standin, caplog):
    from kplib.pipeline import embed_knowledge

    data = kb_dict()
    data["classes"][0]["descriptions"].append({"text": "smooth alpha pattern", "source": None})
    caplog.set_level(logging.WARNING, logger="kplib")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            embed_knowledge(K.load_kb(write(tmp_path, data)), standin, CLASSES)
        except KPLInputError as exc:
            said = [str(exc)]
        else:
            said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert any("duplicate" in s and "alpha" in s for s in said), said
