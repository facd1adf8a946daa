"""Tests of kplib.io.knowledge (schema I/O, strict loading, select/merge, validation, generic knowledge) and
kplib.io.descriptors (importers of the files people write and of the published descriptor files)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat

import pytest

from kplib import paths
from kplib.errors import KnowledgeBaseError, KPLInputError
from kplib.io import descriptors as D
from kplib.io import knowledge as K


def kb_dict(classes=None, **over):
    classes = classes if classes is not None else {
        "glaucoma": ["an enlarged optic cup", "a thin neuroretinal rim"],
        "cataract": ["a hazy, blurred view of the fundus", "washed-out retinal vessels"],
    }
    d = {"schema_version": 1, "kb_id": "t-v1", "dataset": "toy", "modality": "fundus", "created": "2026-11-25",
         "method": "curated", "authors": "tests", "generator": None, "source": None,
         "classes": [{"name": n, "display_name": n.replace("_", " "), "references": ["ref"],
                      "descriptions": [{"text": t, "source": None} for t in ts]} for n, ts in classes.items()]}
    d.update(over)
    return d


def write(tmp_path, d, name="kb.json"):
    p = tmp_path / name
    p.write_text(json.dumps(d), encoding="utf-8")
    return p


def make_kb(classes=None, **over):
    return K.from_dict(kb_dict(classes, **over))


# ------------------------------------------------------------------ load / save
def test_save_load_roundtrip_deterministic_atomic(tmp_path):
    kb = make_kb({"b_class": ["x one", "ünïcode ☂ two"], "a_class": ["y"]})
    p = tmp_path / "out.json"
    K.save_kb(kb, p)
    first = p.read_bytes()
    K.save_kb(K.load_kb(p), p)
    assert p.read_bytes() == first                       # stable
    assert "ünïcode ☂" in first.decode("utf-8")          # UTF-8, not \u escapes
    assert list(json.loads(first)) == list(K._TOP_FIELDS)  # schema key order, not sorted
    assert [c["name"] for c in json.loads(first)["classes"]] == ["b_class", "a_class"]  # class order kept
    back = K.load_kb(p)
    assert back == kb and back.origin == str(p)
    assert [x.name for x in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def test_save_refuses_invalid_kb_and_missing_folder(tmp_path):
    kb = make_kb()
    kb.classes[0].descriptions.clear()
    with pytest.raises(KnowledgeBaseError, match="glaucoma"):
        K.save_kb(kb, tmp_path / "x.json")
    with pytest.raises(KnowledgeBaseError, match="does not exist"):
        K.save_kb(make_kb(), tmp_path / "nope" / "x.json")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("mutate, pattern", [
    (lambda d: d.update(schema_version=2), "schema_version is 2"),
    (lambda d: d.update(schema_version=True), "schema_version"),
    (lambda d: d.pop("modality"), r"missing field\(s\) \['modality'\]"),
    (lambda d: d.update(clases=[]), "unknown field"),
    (lambda d: d.update(method="llm"), "method"),
    (lambda d: d.update(created="25/11/2026"), "ISO date"),
    (lambda d: d.update(method="generated"), "generator"),
    (lambda d: d.update(method="imported", source={"file": "x"}), "citation"),
    (lambda d: d.update(classes=[]), "non-empty list"),
])
def test_load_rejects_bad_top_level(tmp_path, mutate, pattern):
    d = kb_dict()
    mutate(d)
    p = write(tmp_path, d, "bad.json")
    with pytest.raises(KnowledgeBaseError, match=pattern) as e:
        K.load_kb(p)
    assert "bad.json" in str(e.value)


@pytest.mark.parametrize("mutate, pattern", [
    (lambda c: c.update(descriptions=[]), "non-empty list"),
    (lambda c: c["descriptions"].append({"text": "  ", "source": None}), r"descriptions\[2\] is empty"),
    (lambda c: c["descriptions"].append("plain string"), r"descriptions\[2\] must be an object"),
    (lambda c: c.pop("references"), "missing field"),
    (lambda c: c.update(display_name=""), "display_name"),
    (lambda c: c.update(colour="red"), "unknown field"),
])
def test_load_rejects_bad_class_naming_file_and_class(tmp_path, mutate, pattern):
    d = kb_dict()
    mutate(d["classes"][1])
    p = write(tmp_path, d, "bad.json")
    with pytest.raises(KnowledgeBaseError, match=pattern) as e:
        K.load_kb(p)
    assert "bad.json" in str(e.value) and "'cataract'" in str(e.value)


def test_load_rejects_duplicate_class(tmp_path):
    d = kb_dict()
    d["classes"].append(dict(d["classes"][0]))
    with pytest.raises(KnowledgeBaseError, match=r"class 'glaucoma'.*duplicate"):
        K.load_kb(write(tmp_path, d))


def test_load_invalid_utf8_and_json(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes(json.dumps(kb_dict()).replace("optic", "opt\u00efc").encode("latin-1"))
    with pytest.raises(KnowledgeBaseError, match="latin1.json is not valid UTF-8"):
        K.load_kb(p)
    p = tmp_path / "broken.json"
    p.write_text('{\n  "schema_version": 1,\n  "kb_id": "x",,\n}', encoding="utf-8")
    with pytest.raises(KnowledgeBaseError, match=r"broken.json is not valid JSON: .* line 3, column 16"):
        K.load_kb(p)
    with pytest.raises(KnowledgeBaseError, match="does not exist"):
        K.load_kb(tmp_path / "missing.json")


def test_unknown_curated_name_lists_available():
    with pytest.raises(KnowledgeBaseError, match="no curated knowledge base named 'no_such_set'") as e:
        K.load_kb("no_such_set")
    for n in K.list_curated():
        assert n in str(e.value)


# ------------------------------------------------------------------ curated KBs shipped in kplib/io/kbs
@pytest.mark.parametrize("name", K.list_curated())
def test_curated_kbs_load_and_validate_against_their_dataset(name):
    kb = K.curated_kb(name)
    assert kb.method == "curated" and kb.dataset == name and kb.origin == f"kplib/io/kbs/{name}.json"
    folder = paths.data_root() / name / "val"
    if not folder.is_dir():
        pytest.skip(f"no images for {name} under {paths.data_root()}")
    class_names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    report = K.validate(kb, class_names=class_names)
    assert report.ok, report.to_text()
    assert kb.select(class_names).class_names == class_names


# ------------------------------------------------------------------ select / merge
def test_select_reorders_and_subsets_and_copies():
    kb = make_kb({"a": ["x"], "b": ["y"], "c": ["z"]})
    s = kb.select(["c", "a"])
    assert s.class_names == ["c", "a"] and kb.class_names == ["a", "b", "c"]
    s.classes[0].descriptions.append(K.Description("new"))
    assert kb.get("c").texts == ["z"]


def test_select_missing_and_near_match_are_errors(tmp_path):
    p = write(tmp_path, kb_dict({"Normal": ["a"], "diabetic retinopathy": ["b"]}), "eyes.json")
    kb = K.load_kb(p)
    with pytest.raises(KnowledgeBaseError, match=r"'normal'.*eyes.json.*'Normal'.*rename 'Normal' to 'normal'"):
        kb.select(["normal", "diabetic retinopathy"])
    with pytest.raises(KnowledgeBaseError, match=r"'diabetic_retinopathy'.*'diabetic retinopathy'"):
        kb.select(["Normal", "diabetic_retinopathy"])
    with pytest.raises(KnowledgeBaseError, match=r"'glaucoma' is not in knowledge base .*eyes.json"):
        kb.select(["Normal", "glaucoma"])
    with pytest.raises(KnowledgeBaseError, match="duplicates"):
        kb.select(["Normal", "Normal"])


def test_merge_unions_dedupes_and_keeps_provenance():
    a = make_kb({"x": ["one", "two"], "y": ["three"]}, kb_id="A")
    b = make_kb({"y": ["three", "four"], "z": ["five"]}, kb_id="B")
    b.classes[0].descriptions[1] = K.Description("four", "paper p. 3")
    m = K.merge([a, b])
    assert m.class_names == ["x", "y", "z"] and m.method == "merged" and m.source == {"merged": ["A", "B"]}
    y = m.get("y")
    assert y.texts == ["three", "four"]
    assert [d.source for d in y.descriptions] == ["A", "paper p. 3"]
    assert m.get("z").descriptions[0].source == "B"
    K.from_dict(m.to_dict())  # merged KB is schema-valid
    with pytest.raises(KnowledgeBaseError, match="different datasets"):
        K.merge([a, make_kb(dataset="other")])


# ------------------------------------------------------------------ validate
def codes(report, check=None, severity=None):
    return [(f.check, f.cls, f.index) for f in report.findings
            if (check is None or f.check == check) and (severity is None or f.severity == severity)]


def test_validate_clean_kb_ok_and_tables():
    kb = make_kb()
    r = K.validate(kb, class_names=["cataract", "glaucoma"], min_count=2)
    assert r.ok and not r.findings, r.to_text()
    frame = r.counts_frame()
    assert list(frame["class"]) == ["glaucoma", "cataract"] and list(frame["descriptions"]) == [2, 2]
    assert (frame["max_tokens"] > 5).all()
    assert r.to_frame().empty and "OK" in r.to_text()


def test_validate_min_count_defaults():
    kb = make_kb()
    r = K.validate(kb, check_tokens=False)  # curated: default 40
    assert not r.ok and set(codes(r, "count")) == {("count", "glaucoma", None), ("count", "cataract", None)}
    kb.method = "imported"
    kb.source = {"file": "f", "citation": "c", "licence": "l"}
    assert K.validate(kb, check_tokens=False).ok  # others: default 1


def test_validate_coverage_missing_extra_and_near_match():
    kb = make_kb({"Normal": ["clear view"], "glaucoma": ["cupping"], "extra": ["e"]})
    r = K.validate(kb, class_names=["glaucoma", "normal", "cataract"], min_count=1, check_tokens=False)
    errs = {f.cls: f.message for f in r.errors if f.check == "coverage"}
    assert set(errs) == {"normal", "cataract"}
    assert "'Normal'" in errs["normal"] and "Rename" in errs["normal"]
    assert codes(r, "coverage", "warning") == [("coverage", "extra", None)]


def test_validate_duplicates_and_near_duplicates():
    kb = make_kb({"a": ["an enlarged optic cup", "an enlarged optic cup", "An enlarged optic-cup.",
                        "enlarged optic cups with rim thinning", "enlarged optic cup with rim thinning",
                        "a thin rim"]})
    r = K.validate(kb, min_count=1, check_tokens=False)
    assert codes(r, "duplicate", "error") == [("duplicate", "a", 1)]
    near = codes(r, "near_duplicate", "warning")
    assert ("near_duplicate", "a", 2) in near       # normalised equality
    assert ("near_duplicate", "a", 4) in near       # difflib ratio >= 0.92
    assert not any(i == 5 for _, _, i in near)      # a genuinely different description is not flagged


def test_validate_empty_entry_in_memory():
    kb = make_kb({"a": ["ok"]})
    kb.classes[0].descriptions.append(K.Description("   "))
    r = K.validate(kb, min_count=1, check_tokens=False)
    assert codes(r, "empty") == [("empty", "a", 1)] and not r.ok


def test_validate_token_length_boundary():
    tok = K.default_tokenizer()
    template = K.KPL_TEMPLATE
    base = template.format(class_name="glaucoma", description="")
    n_base = len(tok(base)["input_ids"])
    # each " dot" adds one BPE token: build descriptions reaching exactly 77 and 78 tokens
    fit = "dot" + " dot" * (77 - n_base - 1)
    over = fit + " dot"
    assert len(tok(template.format(class_name="glaucoma", description=fit))["input_ids"]) == 77
    kb = make_kb({"glaucoma": [fit, over]})
    r = K.validate(kb, min_count=1, near_duplicate_ratio=1.01)
    assert codes(r, "token_length") == [("token_length", "glaucoma", 1)]
    assert "78 CLIP tokens" in r.errors[0].message
    assert r.counts_frame()["max_tokens"].tolist() == [78]
    assert K.validate(kb, min_count=1, template="{class_name} {description}", near_duplicate_ratio=1.01).ok


def test_validate_flags_descriptions_naming_another_class():
    kb = make_kb({
        "normal": ["a sharp optic disc margin"],
        "glaucoma": ["a normal-looking macula", "an abnormal cup", "no diabetic retinopathy signs"],
        "diabetic_retinopathy": ["dot haemorrhages", "unlike Glaucoma, the cup is small"],
    })
    r = K.validate(kb, class_names=["diabetic_retinopathy", "glaucoma", "normal"], min_count=1,
                   check_tokens=False)
    flagged = codes(r, "names_other_class", "error")
    assert flagged == [("names_other_class", "glaucoma", 0), ("names_other_class", "glaucoma", 2),
                       ("names_other_class", "diabetic_retinopathy", 1)]
    # "abnormal" does not match the whole word "normal"; a class naming itself is fine
    assert not r.ok and "'normal'" in r.errors[0].message


def test_validate_shared_text_and_bad_template():
    kb = make_kb({"a": ["same words"], "b": ["Same words"]})
    r = K.validate(kb, min_count=1, check_tokens=False)
    assert codes(r, "shared_text", "warning") == [("shared_text", "b", 0)]
    with pytest.raises(KnowledgeBaseError, match="template"):
        K.validate(kb, template="a photo of {description}")


# ------------------------------------------------------------------ importers (synthetic files)
@pytest.fixture
def desc_root(tmp_path, monkeypatch):
    root = tmp_path / "descriptors"
    (root / "pub").mkdir(parents=True)
    (root / "pub" / "README.md").write_text(
        "# Someone et al., A Paper (2023)\n\n- **Source**: GitHub x/y, commit abc\n- **Licence**: MIT (c) 2023\n",
        encoding="utf-8")
    monkeypatch.setenv("KPL_DESCRIPTORS_ROOT", str(root))
    return root


def put(root, name, obj):
    p = root / "pub" / name
    p.write_text(json.dumps(obj), encoding="utf-8")
    return p


def test_import_plain_map_with_provenance_and_cleaning(desc_root):
    p = put(desc_root, "plain.json", {"Normal": ["clear lungs", " clear lungs ", "", "sharp angles"],
                                       "TB": ["cavities"]})
    kb = D.import_descriptors(p)
    assert kb.method == "imported" and kb.class_names == ["Normal", "TB"]
    assert kb.get("Normal").texts == ["clear lungs", "sharp angles"]
    s = kb.source
    assert s["file"] == "pub/plain.json" and s["citation"] == "Someone et al., A Paper (2023)"
    assert s["licence"] == "MIT (c) 2023" and s["kind"] == "descriptors" and s["format"] == "class_map"
    assert s["cleaning"] == {"dropped_empty_strings": 1, "dropped_exact_duplicates": 1}
    assert kb.get("TB").descriptions[0].source == "pub/plain.json"
    K.from_dict(kb.to_dict())  # schema-valid


def test_import_matching_is_explicit(desc_root):
    p = put(desc_root, "plain.json", {"Normal": ["clear"], "Tuberculosis": ["cavities"], "Other": ["x"]})
    with pytest.raises(KnowledgeBaseError, match=r"'normal'.*'Normal'.*class_map=\{'Normal': 'normal'\}"):
        D.import_descriptors(p, class_names=["normal", "Tuberculosis"])
    with pytest.raises(KnowledgeBaseError, match="'tb' cannot be matched"):
        D.import_descriptors(p, class_names=["Normal", "tb"])
    with pytest.raises(KnowledgeBaseError, match="class_map key 'Tb'"):
        D.import_descriptors(p, class_names=["Normal"], class_map={"Tb": "Normal"})
    with pytest.raises(KnowledgeBaseError, match="not classes of the dataset"):
        D.import_descriptors(p, class_names=["Normal"], class_map={"Tuberculosis": "tb"})
    kb = D.import_descriptors(p, class_names=["tuberculosis", "normal"], dataset="tbset",
                                  class_map={"Normal": "normal", "Tuberculosis": "tuberculosis"})
    assert kb.class_names == ["tuberculosis", "normal"] and kb.dataset == "tbset"
    assert kb.get("normal").texts == ["clear"] and kb.get("normal").display_name == "Normal"
    assert kb.source["unused_classes"] == ["Other"]
    assert kb.source["class_map"] == {"Tuberculosis": "tuberculosis", "Normal": "normal"}


def test_import_empty_class_rejected_or_dropped(desc_root):
    p = put(desc_root, "gaps.json", {"a": ["x"], "b": [], "c": ["", "  "]})
    with pytest.raises(KnowledgeBaseError, match=r"\['b', 'c'\].*drop_empty_classes"):
        D.import_descriptors(p)
    kb = D.import_descriptors(p, drop_empty_classes=True)
    assert kb.class_names == ["a"] and kb.source["dropped_empty_classes"] == ["b", "c"]


def test_import_cupl_prompts_flagged(desc_root):
    p = put(desc_root, "CuPL_x.json", {"tabby cat": ["A tabby cat has a striped coat of brown fur.",
                                                     "The image shows a tabby cat lying on a sofa."]})
    kb = D.import_descriptors(p)
    assert kb.source["kind"] == "prompts"
    r = K.validate(kb, check_tokens=False)
    assert [f.check for f in r.warnings] == ["prompt_style"]


def test_import_nested_sets_need_subset(desc_root):
    p = put(desc_root, "nested.json", {"set_A": {"No Finding": ["clear"], "Nodule": ["round spot"]},
                                        "set_B": {"No Finding": ["clear"], "COVID-19": ["ground glass"]}})
    with pytest.raises(KnowledgeBaseError, match=r"several descriptor sets \['set_A', 'set_B'\]"):
        D.import_descriptors(p)
    with pytest.raises(KnowledgeBaseError, match="no set 'set_C'"):
        D.import_descriptors(p, subset="set_C")
    kb = D.import_descriptors(p, subset="set_B")
    assert kb.class_names == ["No Finding", "COVID-19"] and kb.source["subset"] == "set_B"
    assert kb.get("COVID-19").descriptions[0].source == "pub/nested.json#set_B"


def test_import_criteria_table_and_unknown_structure(desc_root):
    p = put(desc_root, "crit.json", {"axes": {"color": ["red"]},
                                      "per_class_criteria (derived)": {"MEL": {"color": "black", "shape": "irregular"},
                                                                       "NV": {"color": "tan", "shape": "round"}}})
    kb = D.import_descriptors(p)
    assert kb.get("MEL").texts == ["color: black", "shape: irregular"] and kb.source["format"] == "criteria_table"
    bad = put(desc_root, "bad.json", [1, 2, 3])
    with pytest.raises(KnowledgeBaseError, match="pub/bad.json: unrecognised"):
        D.import_descriptors(bad)


# ------------------------------------------------------------------ importers (the real published files)
def test_import_all_published_real_files():
    root = paths.descriptors_root()
    results = dict(D.import_all_published())
    files = {str(p.relative_to(root)) for p in D.published_descriptor_files()}
    assert {n.split("#")[0] for n in results} == files            # every file is accounted for
    for name, r in results.items():
        assert isinstance(r, (K.KnowledgeBase, str)) and (not isinstance(r, str) or r)
        if isinstance(r, K.KnowledgeBase):
            K.from_dict(r.to_dict())
            assert r.source["citation"] and r.source["licence"], name
    nlm = results["zero_shot_unseen_pulmonary/dk4o_descriptors.json#disease_descriptors_NLM"]
    assert nlm.class_names == ["No Finding", "Tuberculosis"]
    assert [len(c.descriptions) for c in nlm.classes] == [5, 7]
    assert "MIT" in nlm.source["licence"]
    assert results["susx_cupl_prompts/CuPL_prompts_oxfordpets.json"].source["kind"] == "prompts"
    assert results["classify_by_description/descriptors_pets.json"].source["kind"] == "descriptors"
    assert len(results["explicd/explicd_isic2018_criteria.json"].classes) == 7
    assert "corn_field" in results["classify_by_description/descriptors_places365.json"]


def test_import_for_dataset_pairs():
    (kb,) = D.import_for_dataset("tb_cxr_nitrd_da", class_names=["normal", "tuberculosis"])
    assert kb.class_names == ["normal", "tuberculosis"] and kb.dataset == "tb_cxr_nitrd_da"
    assert kb.source["class_map"] == {"No Finding": "normal", "Tuberculosis": "tuberculosis"}
    with pytest.raises(KnowledgeBaseError, match="no published descriptor set is paired"):
        D.import_for_dataset("malaria_cells")


def test_import_with_registered_dataset_uses_its_folders_and_display_names():
    from kplib.io.datasets import load_dataset
    try:
        ds = load_dataset("chest_xray_pneumonia")
    except KPLInputError as e:  # data root absent on this machine
        pytest.skip(f"chest_xray_pneumonia not available: {e}")
    (kb,) = D.import_for_dataset("chest_xray_pneumonia")
    assert kb.class_names == ds.class_names == ["NORMAL", "PNEUMONIA"]
    assert kb.display_names == list(ds.display_names)
    assert K.validate(kb, class_names=ds.class_names).ok
    f = paths.descriptors_root() / "zero_shot_unseen_pulmonary" / "multixpert_descriptors.json"
    with pytest.raises(KnowledgeBaseError, match=r"'NORMAL'.*'Normal'.*class_map"):
        D.import_descriptors(f, dataset="chest_xray_pneumonia", subset="disease_descriptors_Pneumonia")


def test_registry_descriptor_pointers_agree_with_published_matches():
    from kplib.io.datasets import registry

    for name, matches in D.PUBLISHED_MATCHES.items():
        assert registry()[name].published_descriptors in {f for f, _, _ in matches}, name


# ------------------------------------------------------------------ knowledge bases as people write them (issue 15)
def test_import_people_formats_keep_metadata_as_provenance(tmp_path):
    nested = {"dataset": "my_eyes", "note": "written by hand", "modality": "fundus photograph",
              "classes": {"glaucoma": ["an enlarged cup"],
                          "normal": [{"text": "a sharp disc margin", "source": "atlas"}]}}
    kb = D.import_descriptors(write(tmp_path, nested, "nested.json"))
    assert kb.class_names == ["glaucoma", "normal"] and kb.dataset == "my_eyes" and kb.modality == "fundus photograph"
    assert kb.source["format"] == "classes" and kb.source["metadata"] == {"dataset": "my_eyes", "note":
                                                                           "written by hand",
                                                                           "modality": "fundus photograph"}
    assert [d.source for d in kb.get("normal").descriptions] == ["atlas"]
    assert kb.get("glaucoma").descriptions[0].source == str(tmp_path / "nested.json")
    flat = {"glioma": ["a mass"], "notumor": [{"text": "symmetric hemispheres"}], "version": 2, "about": {"x": 1}}
    kb = D.import_descriptors(write(tmp_path, flat, "flat.json"))
    assert kb.class_names == ["glioma", "notumor"] and kb.source["metadata"] == {"version": 2, "about": {"x": 1}}
    assert kb.get("notumor").texts == ["symmetric hemispheres"]
    listed = {"classes": [{"name": "a_b", "display_name": "A B", "descriptions": ["x", {"text": "y"}]}], "by": "me"}
    kb = D.import_descriptors(write(tmp_path, listed, "listed.json"))
    assert kb.get("a_b").display_name == "A B" and kb.get("a_b").texts == ["x", "y"]
    for name in ("nested.json", "flat.json", "listed.json"):  # the result is a valid KB that round-trips
        out = K.save_kb(D.import_descriptors(tmp_path / name), tmp_path / f"out_{name}")
        assert K.load_kb(out).to_dict() == D.import_descriptors(tmp_path / name).to_dict()


@pytest.mark.parametrize("data, pattern", [
    ({"a": ["x"], "set": {"b": ["y"]}}, "mixes classes"),
    ({"note": "only metadata"}, "no class found"),
    ({"a": ["x", 42]}, r"class 'a', entry 1: 42 is not a description"),
    ({"a": [{"text": "x", "ref": "y"}]}, "entry 0"),
    ({"Glioma": ["x"], "glioma": ["y"]}, r"'Glioma' and 'glioma' differ only in case"),
    ({"classes": "a b c"}, "'classes' must map each class"),
    ({"schema_version": 1, "a": ["x"]}, "already a schema-v1 knowledge base"),
])
def test_import_refuses_what_it_cannot_read_naming_the_file(tmp_path, data, pattern):
    p = write(tmp_path, data, "odd.json")
    with pytest.raises(KnowledgeBaseError, match=pattern) as e:
        D.import_descriptors(p)
    assert str(p) in str(e.value)


def test_load_non_schema_file_names_the_import_command(tmp_path):
    p = write(tmp_path, {"classes": {"a": ["x"]}, "dataset": "d"}, "my kb.json")
    with pytest.raises(KnowledgeBaseError) as e:
        K.load_kb(p)
    msg = str(e.value)
    out = tmp_path / "my kb.kb.json"
    assert f"kpl kb import '{p}' --output '{out}'" in msg, msg
    assert f"save_kb(import_descriptors({str(p)!r}), {str(out)!r})" in msg and "schema_version" in msg
    assert "kplib.io.descriptors" in msg
    p2 = write(tmp_path, {"x": 1}, "junk.json")  # not convertible: the import says why
    with pytest.raises(KnowledgeBaseError, match="missing field 'schema_version'"):
        K.load_kb(p2)
    with pytest.raises(KnowledgeBaseError, match="junk.json: unrecognised structure: no class found"):
        D.import_descriptors(p2)
    with pytest.raises(KnowledgeBaseError, match=r"list.json: the top level must be a JSON object, got list"):
        K.load_kb(write(tmp_path, [kb_dict()], "list.json"))


def test_read_json_edge_cases(tmp_path):
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(kb_dict()).encode("utf-8"))
    assert K.load_kb(bom).class_names == ["glaucoma", "cataract"]
    dup = tmp_path / "dup.json"
    dup.write_text('{"a": ["x"], "a": ["y"]}', encoding="utf-8")
    with pytest.raises(KnowledgeBaseError, match=r"dup.json has the key 'a' more than once"):
        D.import_descriptors(dup)
    lines = tmp_path / "lines.json"
    lines.write_text('{"class": "a", "text": "x"}\n{"class": "b", "text": "y"}\n', encoding="utf-8")
    with pytest.raises(KnowledgeBaseError, match=r"lines.json looks like JSON Lines"):
        K.load_kb(lines)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_save_respects_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = K.save_kb(make_kb(), tmp_path / "kb.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_select_reports_kb_classes_without_images(caplog):
    kb = make_kb({"a": ["x"], "b": ["y"], "zeta": ["z"]})
    with caplog.at_level(logging.WARNING, logger="kplib"):
        assert kb.select(["a", "b"]).class_names == ["a", "b"]
    assert any("['zeta']" in r.getMessage() and "no images" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kplib"):
        make_kb({"a": ["x", "y", "x"], "b": ["y"]}).select(["a", "b"])
    assert [r.getMessage() for r in caplog.records if "duplicate" in r.getMessage()] == [
        "knowledge base 't-v1', class 'a': duplicate description(s) ['x'] count more than once in the top-K text proxy; "
        "remove them (`kpl kb validate` lists them)"]


# ------------------------------------------------------------------ tokenizer (issue 13 item 9)
def test_validate_without_a_tokenizer_skips_the_token_check_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("KPL_TOKENIZER_DIR", str(tmp_path / "absent"))
    r = K.validate(make_kb(), min_count=1)
    assert r.ok and r.params["token_check"] is False
    (skip,) = [f for f in r.warnings if f.check == "token_length"]
    assert "KPL_TOKENIZER_DIR" in skip.message and "--model" in skip.message and "tokenizer=" in skip.message
    r = K.validate(make_kb(), min_count=1, tokenizer=str(tmp_path / "no_checkpoint"))
    assert r.params["token_check"] is False and "no_checkpoint" in r.warnings[-1].message


def test_validate_with_a_checkpoints_own_tokenizer(tmp_path):
    import transformers

    tok = transformers.CLIPTokenizer.from_pretrained(str(paths.tokenizer_dir()))
    tok.model_max_length = 12
    tok.save_pretrained(tmp_path / "ckpt")
    kb = make_kb({"a": ["x", "a much longer description with many words in it"]})
    r = K.validate(kb, min_count=1, tokenizer=str(tmp_path / "ckpt"))
    assert r.params["context_length"] == 12 and r.params["token_check"] is True
    assert [(f.check, f.index) for f in r.errors] == [("token_length", 1)]
    assert K.validate(kb, min_count=1).ok  # the CLIP tokenizer's 77 tokens


# ------------------------------------------------------------------ generic knowledge (issue 16 control)
def test_generic_descriptions_for_every_registered_modality():
    from kplib.io.datasets import registry

    expected = {"brain MRI": "brain MRI", "thin blood smear microscopy (single-cell crops)": "microscopy",
                "paediatric chest X-ray": "chest X-ray", "chest X-ray": "chest X-ray",
                "colour fundus photograph": "fundus photograph",
                "fundus photograph (Gaussian-filtered, Graham 2015)": "fundus photograph",
                "natural photographs": "natural photograph"}
    families = K._generic_table()["families"]
    for info in registry().values():
        texts = K.generic_descriptions(info.modality)
        assert texts == families[expected[info.modality]]["descriptions"], info.modality
        assert 20 <= len(texts) <= 30 and len(set(texts)) == len(texts)
    with pytest.raises(KPLInputError, match=r"'ultrasound'.*'chest X-ray'.*'natural photograph'"):
        K.generic_descriptions("ultrasound")


def test_generic_descriptions_name_no_class_of_their_modality():
    """A generic description must not carry class knowledge: none names a class of a dataset of its modality."""
    from kplib.io.datasets import registry

    for name, info in registry().items():
        if info.kb is None:
            continue
        kb = K.curated_kb(info.kb)
        generic = K.KBClass("generic_control", "generic", [K.Description(t) for t in
                                                            K.generic_descriptions(info.modality)])
        probe = dataclasses.replace(kb, classes=[*kb.classes, generic])
        r = K.validate(probe, min_count=1, check_tokens=False)
        assert not [f for f in r.findings if f.cls == "generic_control" and f.check == "names_other_class"], name
