"""Tests of kplib.knowledge: schema I/O, strict loading, select/merge, validation, importers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kplib import config, knowledge as K
from kplib.errors import KnowledgeBaseError


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


# ------------------------------------------------------------------ curated KBs shipped in kplib/kbs
@pytest.mark.parametrize("name", K.list_curated())
def test_curated_kbs_load_and_validate_against_their_dataset(name):
    kb = K.curated_kb(name)
    assert kb.method == "curated" and kb.dataset == name and kb.origin == f"kplib/kbs/{name}.json"
    folder = config.data_root() / name / "val"
    if not folder.is_dir():
        pytest.skip(f"no images for {name} under {config.data_root()}")
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
    kb = K.import_descriptor_file(p)
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
        K.import_descriptor_file(p, class_names=["normal", "Tuberculosis"])
    with pytest.raises(KnowledgeBaseError, match="'tb' cannot be matched"):
        K.import_descriptor_file(p, class_names=["Normal", "tb"])
    with pytest.raises(KnowledgeBaseError, match="class_map key 'Tb'"):
        K.import_descriptor_file(p, class_names=["Normal"], class_map={"Tb": "Normal"})
    with pytest.raises(KnowledgeBaseError, match="not classes of the dataset"):
        K.import_descriptor_file(p, class_names=["Normal"], class_map={"Tuberculosis": "tb"})
    kb = K.import_descriptor_file(p, class_names=["tuberculosis", "normal"], dataset="tbset",
                                  class_map={"Normal": "normal", "Tuberculosis": "tuberculosis"})
    assert kb.class_names == ["tuberculosis", "normal"] and kb.dataset == "tbset"
    assert kb.get("normal").texts == ["clear"] and kb.get("normal").display_name == "Normal"
    assert kb.source["unused_classes"] == ["Other"]
    assert kb.source["class_map"] == {"Tuberculosis": "tuberculosis", "Normal": "normal"}


def test_import_empty_class_rejected_or_dropped(desc_root):
    p = put(desc_root, "gaps.json", {"a": ["x"], "b": [], "c": ["", "  "]})
    with pytest.raises(KnowledgeBaseError, match=r"\['b', 'c'\].*drop_empty_classes"):
        K.import_descriptor_file(p)
    kb = K.import_descriptor_file(p, drop_empty_classes=True)
    assert kb.class_names == ["a"] and kb.source["dropped_empty_classes"] == ["b", "c"]


def test_import_cupl_prompts_flagged(desc_root):
    p = put(desc_root, "CuPL_x.json", {"tabby cat": ["A tabby cat has a striped coat of brown fur.",
                                                     "The image shows a tabby cat lying on a sofa."]})
    kb = K.import_descriptor_file(p)
    assert kb.source["kind"] == "prompts"
    r = K.validate(kb, check_tokens=False)
    assert [f.check for f in r.warnings] == ["prompt_style"]


def test_import_nested_sets_need_subset(desc_root):
    p = put(desc_root, "nested.json", {"set_A": {"No Finding": ["clear"], "Nodule": ["round spot"]},
                                        "set_B": {"No Finding": ["clear"], "COVID-19": ["ground glass"]}})
    with pytest.raises(KnowledgeBaseError, match=r"several descriptor sets \['set_A', 'set_B'\]"):
        K.import_descriptor_file(p)
    with pytest.raises(KnowledgeBaseError, match="no set 'set_C'"):
        K.import_descriptor_file(p, subset="set_C")
    kb = K.import_descriptor_file(p, subset="set_B")
    assert kb.class_names == ["No Finding", "COVID-19"] and kb.source["subset"] == "set_B"
    assert kb.get("COVID-19").descriptions[0].source == "pub/nested.json#set_B"


def test_import_criteria_table_and_unknown_structure(desc_root):
    p = put(desc_root, "crit.json", {"axes": {"color": ["red"]},
                                      "per_class_criteria (derived)": {"MEL": {"color": "black", "shape": "irregular"},
                                                                       "NV": {"color": "tan", "shape": "round"}}})
    kb = K.import_descriptor_file(p)
    assert kb.get("MEL").texts == ["color: black", "shape: irregular"] and kb.source["format"] == "criteria_table"
    bad = put(desc_root, "bad.json", [1, 2, 3])
    with pytest.raises(KnowledgeBaseError, match="pub/bad.json: unrecognised"):
        K.import_descriptor_file(bad)


# ------------------------------------------------------------------ importers (the real published files)
def test_import_all_published_real_files():
    root = config.descriptors_root()
    results = dict(K.import_all_published())
    files = {str(p.relative_to(root)) for p in K.published_descriptor_files()}
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
    (kb,) = K.import_for_dataset("tb_cxr_nitrd_da", class_names=["normal", "tuberculosis"])
    assert kb.class_names == ["normal", "tuberculosis"] and kb.dataset == "tb_cxr_nitrd_da"
    assert kb.source["class_map"] == {"No Finding": "normal", "Tuberculosis": "tuberculosis"}
    with pytest.raises(KnowledgeBaseError, match="no published descriptor set is paired"):
        K.import_for_dataset("malaria_cells")


def test_import_with_registered_dataset_uses_its_folders_and_display_names():
    from kplib import data
    try:
        ds = data.get_dataset("chest_xray_pneumonia")
    except Exception as e:  # data root absent on this machine
        pytest.skip(f"chest_xray_pneumonia not available: {e}")
    (kb,) = K.import_for_dataset("chest_xray_pneumonia")
    assert kb.class_names == ds.class_names == ["NORMAL", "PNEUMONIA"]
    assert kb.display_names == list(ds.display_names)
    assert K.validate(kb, class_names=ds.class_names).ok
    f = config.descriptors_root() / "zero_shot_unseen_pulmonary" / "multixpert_descriptors.json"
    with pytest.raises(KnowledgeBaseError, match=r"'NORMAL'.*'Normal'.*class_map"):
        K.import_descriptor_file(f, dataset="chest_xray_pneumonia", subset="disease_descriptors_Pneumonia")


def test_registry_descriptor_pointers_agree_with_published_matches():
    from kplib.data import DATASETS
    from kplib.knowledge import PUBLISHED_MATCHES

    for name, matches in PUBLISHED_MATCHES.items():
        assert DATASETS[name].published_descriptors in {f for f, _, _ in matches}, name
