"""imagenet_sample: the published DCLIP descriptors (Menon & Vondrick 2023) as its default KB.

The descriptor file is keyed by CLIP-cleaned class names in ImageNet index order; the image folders are WordNet ids
with WordNet names in class_names.json, where "crane" and "maillot" name two classes each. These tests check the
explicit wnid alignment (one-to-one, duplicates resolved, any contradiction raises) and a run end to end.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kplib import paths
from kplib.errors import KnowledgeBaseError, KPLInputError, StandInWarning
from kplib.io.datasets import load_dataset, registry
from kplib.io.descriptors import DCLIP_IMAGENET_FILE, dclip_imagenet_kb, imagenet_class_map
from kplib.io.knowledge import KnowledgeBase, load_kb
from kplib.method.methods import KPLConfig


def _shared_ok() -> bool:
    try:
        return ((paths.data_root() / "imagenet_sample" / "class_names.json").is_file()
                and (paths.descriptors_root() / DCLIP_IMAGENET_FILE).is_file())
    except KPLInputError:
        return False


needs_shared = pytest.mark.skipif(not _shared_ok(), reason="needs the shared data (imagenet_sample/class_names.json) "
                                  "and descriptors (classify_by_description) folders; set KPL_DATA_ROOT and "
                                  "KPL_DESCRIPTORS_ROOT")

# the two pairs of ImageNet classes that share a WordNet name in class_names.json
CRANE_BIRD, CRANE_MACHINE = "n02012849", "n03126707"
MAILLOT, TANK_SUIT = "n03710637", "n03710721"


@pytest.fixture(scope="module")
def wnid_names() -> dict[str, str]:
    return json.loads((paths.data_root() / "imagenet_sample" / "class_names.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def file_keys() -> list[str]:
    return list(json.loads((paths.descriptors_root() / DCLIP_IMAGENET_FILE).read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    """The KB ``kplib.pipeline.run`` uses for imagenet_sample when none is given (checked end to end below)."""
    return dclip_imagenet_kb()


@pytest.fixture(scope="module")
def standin():
    from kplib.io.encoders import load_encoder

    with pytest.warns(StandInWarning):
        return load_encoder("standin")


# ------------------------------------------------------------------------------------------------ the real mapping
@needs_shared
def test_default_kb_covers_every_folder_one_to_one(kb, wnid_names):
    ds = load_dataset("imagenet_sample")
    assert len(ds.class_names) == 1000
    sel = kb.select(ds.class_names)                       # raises if any folder has no class
    assert sel.class_names == ds.class_names
    assert sorted(kb.class_names) == sorted(wnid_names) == ds.class_names
    # one-to-one: 1000 distinct file classes (display names), each with its own descriptions
    assert len(set(sel.display_names)) == 1000
    assert all(len(c.descriptions) >= 1 for c in sel.classes)
    assert set(kb.source["class_map"]) == set(sel.display_names)
    assert sorted(kb.source["class_map"].values()) == ds.class_names


@needs_shared
def test_duplicate_wordnet_names_resolved(kb, wnid_names):
    # the ambiguity is real in class_names.json ...
    assert wnid_names[CRANE_BIRD] == wnid_names[CRANE_MACHINE] == "crane"
    assert wnid_names[MAILLOT] == wnid_names[TANK_SUIT] == "maillot"
    # ... and resolved by the descriptor file's own (CLIP-cleaned) names
    assert kb.get(CRANE_BIRD).display_name == "crane bird"
    assert kb.get(CRANE_MACHINE).display_name == "construction crane"
    assert kb.get(MAILLOT).display_name == "maillot"
    assert kb.get(TANK_SUIT).display_name == "one-piece bathing suit"
    bird = " ".join(kb.get(CRANE_BIRD).texts)
    machine = " ".join(kb.get(CRANE_MACHINE).texts)
    assert "plumage" in bird and "wingspan" in bird and "machine" not in bird
    assert "machine" in machine and "counterweight" in machine and "plumage" not in machine


@needs_shared
def test_spot_checks_and_anchors(kb, wnid_names):
    # first/last classes and renamed ones (WordNet name != CLIP-cleaned name)
    for wnid, shown in [("n01440764", "tench"), ("n15075141", "toilet paper"), ("n01514668", "rooster"),
                        ("n02109961", "husky"), ("n04552348", "military aircraft")]:
        assert kb.get(wnid).display_name == shown, wnid
    # every class whose file name equals its WordNet name is aligned to that wnid
    same = [w for w in wnid_names if kb.get(w).display_name.lower() == wnid_names[w].lower()]
    assert len(same) >= 700


@needs_shared
def test_provenance_names_dclip(kb):
    assert kb.method == "imported" and kb.dataset == "imagenet_sample"
    assert "Menon" in kb.authors and "Vondrick" in kb.authors and "2023" in kb.authors
    assert "Menon" in kb.source["citation"] and "DCLIP" in kb.source["published_set"]
    assert kb.source["file"] == DCLIP_IMAGENET_FILE
    assert "index order" in kb.source["class_alignment"] and "none contradicts" in kb.source["class_alignment"]
    assert kb.origin is not None and kb.origin.endswith("descriptors_imagenet.json")


@needs_shared
def test_other_datasets_keep_curated_default(standin):
    """The registry names each dataset's default KB: a curated one, or (imagenet_sample) the DCLIP file imported at
    run time; a folder that is not registered has none (test_pipeline: the error names --kb / kb=)."""
    from kplib.pipeline import run

    reg = registry()
    assert reg["brain_tumor_mri"].kb == "brain_tumor_mri"
    assert reg["imagenet_sample"].kb is None and reg["imagenet_sample"].published_descriptors == DCLIP_IMAGENET_FILE
    assert "not_a_dataset" not in reg
    brain = run(load_dataset("brain_tumor_mri", limit_per_class=1), "zero_shot", standin)
    assert brain.provenance()["kb"]["kb_id"] == load_kb("brain_tumor_mri").kb_id
    assert brain.provenance()["kb"]["origin"] == "kplib/io/kbs/brain_tumor_mri.json"


# --------------------------------------------------------------------------- the alignment fails loudly (synthetic)
WN = {"n00000001": "crane", "n00000002": "crane", "n00000003": "tench", "n00000004": "goldfish",
      "n00000005": "cock"}
KEYS = ["crane bird", "construction crane", "tench", "goldfish", "rooster"]


def test_class_map_by_index_order():
    m = imagenet_class_map(KEYS, WN, min_anchored=0.4)
    assert m == {"crane bird": "n00000001", "construction crane": "n00000002", "tench": "n00000003",
                 "goldfish": "n00000004", "rooster": "n00000005"}
    # key order, not the mapping's insertion order, decides: the wnids are sorted first
    assert imagenet_class_map(KEYS, dict(reversed(list(WN.items()))), min_anchored=0.4) == m


def test_class_map_rejects_swapped_anchors():
    keys = ["crane bird", "construction crane", "goldfish", "tench", "rooster"]
    with pytest.raises(KnowledgeBaseError, match=r"'goldfish'.*n00000003.*'tench'"):
        imagenet_class_map(keys, WN, min_anchored=0.4)


def test_class_map_rejects_shift_missing_and_duplicates():
    with pytest.raises(KnowledgeBaseError, match="4 classes but the dataset has 5"):
        imagenet_class_map(KEYS[1:], WN, min_anchored=0.4)
    with pytest.raises(KnowledgeBaseError, match=r"\['tench'\] occur more than once"):
        imagenet_class_map(["crane bird", "tench", "tench", "goldfish", "rooster"], WN, min_anchored=0.4)
    shifted = KEYS[1:] + KEYS[:1]  # right count, wrong order
    with pytest.raises(KnowledgeBaseError, match="contradict"):
        imagenet_class_map(shifted, WN, min_anchored=0.4)


def test_class_map_rejects_unverifiable_order_and_bad_ids():
    with pytest.raises(KnowledgeBaseError, match="too few to verify"):
        imagenet_class_map(["a", "b", "tench", "d", "e"], WN, min_anchored=0.5)  # 1 anchor of 5
    with pytest.raises(KnowledgeBaseError, match="not WordNet ids"):
        imagenet_class_map(["tench"], {"tench": "tench"})


def test_duplicate_json_keys_in_file_are_detected(tmp_path):
    # json.load would silently keep only the last "tench"; the importer must see both
    body = ('{"crane bird": ["long legs"], "construction crane": ["a tall machine"], "tench": ["a fish"], '
            '"tench": ["another fish"], "rooster": ["a red comb"]}')
    f = tmp_path / "descriptors_imagenet.json"
    f.write_text(body, encoding="utf-8")
    with pytest.raises(KnowledgeBaseError, match=r"'tench'.*more than once"):
        dclip_imagenet_kb(wnid_names=WN, path=f)


def test_kb_from_small_file(tmp_path):
    f = tmp_path / "descriptors_imagenet.json"
    f.write_text(json.dumps({k: [f"feature of {k}"] for k in KEYS}), encoding="utf-8")
    with pytest.raises(KnowledgeBaseError, match="too few to verify"):  # 2 of 5 anchors < default 0.5
        dclip_imagenet_kb(wnid_names=WN, path=f)
    wn = dict(WN, n00000005="rooster")
    kb = dclip_imagenet_kb(wnid_names=wn, path=f)
    assert kb.class_names == sorted(wn)
    assert kb.get("n00000002").texts == ["feature of construction crane"]
    assert kb.source["class_map"]["crane bird"] == "n00000001"


# ------------------------------------------------------------------------------------------------------ end to end
def _class_subset(ds, wnids):
    """The dataset restricted to some classes (class list and labels re-indexed), keeping its registered name."""
    keep = [ds.class_names.index(w) for w in wnids]
    rows = [i for i, y in enumerate(ds.labels.tolist()) if y in keep]
    new = {old: new for new, old in enumerate(keep)}
    return dataclasses.replace(ds, class_names=list(wnids), display_names=[ds.display_names[k] for k in keep],
                               paths=[ds.paths[i] for i in rows],
                               labels=torch.tensor([new[ds.labels[i].item()] for i in rows], dtype=torch.long))


@needs_shared
def test_run_kpl_corrected_on_class_subset_with_the_default_kb(standin):
    from kplib.pipeline import run

    ds = load_dataset("imagenet_sample")
    wnids = [CRANE_BIRD, CRANE_MACHINE, MAILLOT, TANK_SUIT, "n01440764", "n01514668", "n02109961", "n04552348"]
    sub = _class_subset(ds, sorted(wnids))
    assert len(sub) == 8 and [sub.display_names[sub.class_names.index(w)] for w in (CRANE_BIRD, CRANE_MACHINE)] \
        == ["crane", "crane"]
    exp = run(sub, "kpl_corrected", standin, config=KPLConfig(iters_proxy=50))  # no kb: the dataset's default
    res, prov = exp.result, exp.provenance()
    assert res.method == "kpl_corrected" and res.config.mode == "corrected"
    assert res.class_names == sorted(wnids)
    assert res.predictions.shape == (8,) and res.logits.shape == (8, 8)
    assert prov["kb"]["kb_id"] == "imagenet_sample-dclip-menon-vondrick-2023" and prov["kb"]["method"] == "imported"
    assert prov["encoder"]["is_standin"] and "UNTRAINED" in prov["encoder"]["label"]
    assert prov["dataset"]["name"] == "imagenet_sample" and prov["dataset"]["n_images"] == 8
    assert [p.parent.name for p in exp.images.paths] == sorted(wnids)
    # the prompts use the descriptor file's names, not the ambiguous WordNet ones
    shown = dict(zip(exp.text.class_names, exp.text.meta["display_names"]))
    assert (shown[CRANE_BIRD], shown[CRANE_MACHINE]) == ("crane bird", "construction crane")


@needs_shared
def test_prompts_use_the_human_class_names(kb, standin):
    from kplib.pipeline import embed_knowledge

    wnids = [CRANE_BIRD, CRANE_MACHINE]
    text = embed_knowledge(kb, standin, wnids, cache=False)
    assert text.meta["display_names"] == ["crane bird", "construction crane"]
    assert text.descriptions[0][0] == "long neck"
    # the two "crane" classes get different name prompts (not the ambiguous WordNet name twice)
    assert not torch.allclose(text.name_embeddings[0], text.name_embeddings[1])
