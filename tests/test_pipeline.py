"""kplib.pipeline: embedding a folder through the store, encoding a knowledge base (and its controls), run() with
provenance and summary, unlabelled folders, compare() with paired tests.

Everything runs on the untrained stand-in encoder and on folders generated in tmp_path.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures_images import tree_state, unlabelled_copy
from PIL import Image

from kplib import pipeline
from kplib.errors import ImageDecodeError, KnowledgeBaseError, KPLInputError, StandInWarning
from kplib.io.datasets import load_dataset
from kplib.io.encoders import load_encoder
from kplib.io.images import decode_image, read_bytes
from kplib.io.knowledge import KPL_TEMPLATE, generic_descriptions
from kplib.method.controls import CONTROLS
from kplib.method.methods import METHODS, KPLConfig
from kplib.pipeline import DEFAULT_NAME_TEMPLATES, compare, embed_images, embed_knowledge, run

CLASSES = ("alpha", "beta", "gamma")
FAST = KPLConfig(iters_proxy=50)  # proxy learning budget small enough for 12 images


def make_folder(root: Path, per_class: int = 4, size: int = 40) -> Path:
    """<root>/val/<class>/<image>.png, each class a different dominant colour plus noise (all files distinct)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        d = root / "val" / name
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (size, size + 4, 3), dtype=np.uint8)
            arr[..., c] += 180
            Image.fromarray(arr).save(d / f"img_{i}.png")
    return root


def make_kb(path: Path, n_desc: int | dict = 3, long_class: str | None = None, modality: str = "synthetic",
            classes=CLASSES) -> Path:
    """A schema-v1 KB; ``n_desc`` descriptions per class (an int, or a dict class -> count, at most 6)."""
    adjectives = ("smooth", "grainy", "bright", "dark", "round", "striped")
    out = []
    for name in classes:
        n = n_desc[name] if isinstance(n_desc, dict) else n_desc
        descs = [{"text": f"{adj} {name} texture", "source": None} for adj in adjectives[:n]]
        if name == long_class:
            descs.append({"text": "an extremely " + "very " * 80 + "long description", "source": None})
        out.append({"name": name, "display_name": f"{name} tissue", "references": [], "descriptions": descs})
    kb = {"schema_version": 1, "kb_id": "test-kb-v1", "dataset": None, "modality": modality, "created": "2026-11-25",
          "method": "curated", "authors": "tests", "generator": None, "source": None, "classes": out}
    path.write_text(json.dumps(kb), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def standin():
    with pytest.warns(StandInWarning):
        return load_encoder("standin")


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data")


@pytest.fixture
def kb(tmp_path):
    return make_kb(tmp_path / "kb.json")


@pytest.fixture
def counting(monkeypatch):
    """Count, per path, the reads (kplib.pipeline.read_bytes) and decodes (kplib.pipeline.decode_image)."""
    calls = {"read": Counter(), "decode": Counter()}

    def read(path):
        calls["read"][Path(path)] += 1
        return read_bytes(path)

    def decode(data, path, *args, **kw):
        calls["decode"][Path(path)] += 1
        return decode_image(data, path, *args, **kw)

    monkeypatch.setattr(pipeline, "read_bytes", read)
    monkeypatch.setattr(pipeline, "decode_image", decode)
    return calls


def store_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------------------ embed_images
def test_second_run_reads_everything_from_the_store(folder, standin, isolated_cache, counting):
    first = embed_images(str(folder), standin)
    assert len(first) == 12 and first.class_names == list(CLASSES)
    assert first.folder.counts() == {c: 4 for c in CLASSES}
    assert first.stats["hits"] == 0 and first.stats["misses"] == 12
    assert first.stats["writes"] == 12 and first.stats["n_encoded"] == 12 and first.stats["n_images"] == 12
    assert first.encoder == standin.identity and first.encoder.is_standin
    assert first.embeddings.dtype == torch.float32 and first.embeddings.shape == (12, standin.embed_dim)
    assert torch.allclose(first.embeddings.norm(dim=1), torch.ones(12), atol=1e-5)
    assert any(p.name.endswith(".npy") for p in store_files(isolated_cache))  # the store lives in KPL_CACHE_DIR
    assert set(counting["read"].values()) == {1} and len(counting["read"]) == 12
    assert set(counting["decode"].values()) == {1} and len(counting["decode"]) == 12

    counting["read"].clear(), counting["decode"].clear()
    second = embed_images(str(folder), standin)
    assert second.stats["hits"] == 12 and second.stats["misses"] == 0 and second.stats["n_encoded"] == 0
    assert torch.equal(first.embeddings, second.embeddings)
    assert second.paths == first.paths and torch.equal(second.labels, first.labels)
    assert set(counting["read"].values()) == {1} and not counting["decode"]  # a hit is never decoded

    # an edited image is re-encoded, and only it; the rest still hit
    edited = Path(first.paths[5])
    Image.fromarray(np.zeros((40, 44, 3), dtype=np.uint8)).save(edited)
    counting["read"].clear(), counting["decode"].clear()
    third = embed_images(str(folder), standin)
    assert third.stats["hits"] == 11 and third.stats["misses"] == 1 and third.stats["n_encoded"] == 1
    assert list(counting["decode"]) == [edited]
    assert not torch.equal(third.embeddings[5], first.embeddings[5])
    assert torch.equal(third.embeddings[:5], first.embeddings[:5]) and torch.equal(third.embeddings[6:],
                                                                                   first.embeddings[6:])


def test_run_reads_each_file_once_and_decodes_it_at_most_once(folder, kb, standin, counting):
    exp = run(str(folder), "kpl_corrected", standin, str(kb), FAST)
    assert len(counting["read"]) == 12 and set(counting["read"].values()) == {1}
    assert set(counting["decode"].values()) == {1}
    counting["read"].clear(), counting["decode"].clear()
    again = run(str(folder), "kpl_corrected", standin, str(kb), FAST)
    assert set(counting["read"].values()) == {1} and not counting["decode"]
    assert torch.equal(again.result.predictions, exp.result.predictions)


def test_bfloat16_uses_another_namespace(folder, standin):
    embed_images(str(folder), standin)
    with pytest.warns(StandInWarning):
        bf = load_encoder("standin", dtype="bfloat16")
    other = embed_images(str(folder), bf)
    assert other.stats["hits"] == 0 and other.stats["n_encoded"] == 12  # bf16 embeddings are not fp32 ones
    again = embed_images(str(folder), standin)
    assert again.stats["hits"] == 12  # and did not replace them


def test_cache_false_writes_nothing_and_gives_the_same_values(folder, standin, isolated_cache):
    a = embed_images(str(folder), standin, cache=False)
    assert store_files(isolated_cache) == [] and "hits" not in a.stats and a.stats["n_encoded"] == 12
    b = embed_images(str(folder), standin)
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=1e-6, rtol=0)


def test_undecodable_images_stop_with_every_file_listed_or_are_skipped_once(folder, standin, caplog):
    bad = [folder / "val" / "beta" / "zz_broken.png", folder / "val" / "gamma" / "report.jpg"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bad[1].write_bytes(b"Patient report: no findings.\n")
    with pytest.raises(ImageDecodeError) as info:
        embed_images(str(folder), standin)
    msg = str(info.value)
    for p in bad:
        assert str(p) in msg  # full path of every bad file, in one error
    assert "command line: --on-error skip" in msg and "Python: on_error='skip'" in msg
    assert sorted(p for p, _ in info.value.bad) == sorted(bad)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kplib"):
        emb = embed_images(str(folder), standin, on_error="skip")
    assert len(emb) == 12 and emb.folder.counts() == {c: 4 for c in CLASSES}
    assert sorted(p for p, _ in emb.folder.skipped) == sorted(bad)
    assert not set(bad) & set(emb.paths) and emb.embeddings.shape[0] == len(emb.paths)
    assert [r for _, r in sorted(emb.folder.skipped)] != ["", ""]
    for p in bad:  # each skipped file reported once
        assert caplog.text.count(p.name) == 1, caplog.text
    assert emb.folder.describe()["n_images"] == 12 and len(emb.folder.describe()["skipped"]) == 2


def test_decoding_in_threads_keeps_every_row_and_failure_in_order(folder, standin, monkeypatch):
    """embed_images decodes each chunk in Encoder.preprocess_threads threads: same rows, same failures, same order."""
    (folder / "val" / "beta" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "val" / "alpha" / "b_report.jpg").write_bytes(b"Patient report: no findings.\n")
    runs = {}
    for threads in (1, 3):
        monkeypatch.setattr(standin, "preprocess_threads", threads)
        emb = embed_images(str(folder), standin, cache=False, on_error="skip")
        runs[threads] = emb
        decoded = [decode_image(read_bytes(p), p) for p in emb.paths]
        assert torch.equal(emb.embeddings, standin.encode_images(decoded)), threads  # row i is file i
    assert runs[1].paths == runs[3].paths and torch.equal(runs[1].embeddings, runs[3].embeddings)
    assert runs[1].folder.skipped == runs[3].folder.skipped and len(runs[3].folder.skipped) == 2


def test_limit_per_class_and_bad_inputs(folder, standin, tmp_path):
    emb = embed_images(load_dataset(str(folder), limit_per_class=2, seed=1), standin)
    assert emb.folder.counts() == {c: 2 for c in CLASSES}
    other = embed_images(load_dataset(str(folder), limit_per_class=2, seed=2), standin)
    assert other.folder.counts() == {c: 2 for c in CLASSES}
    assert load_dataset(str(folder), limit_per_class=2, seed=1).paths == emb.paths  # seeded
    with pytest.raises(KPLInputError, match="neither a registered dataset"):
        embed_images(str(tmp_path / "nowhere"), standin)
    with pytest.raises(KPLInputError, match="on_error"):
        embed_images(str(folder), standin, on_error="ignore")


def test_an_encoder_given_by_name_is_loaded_or_refused_clearly(folder):
    """embed_images(folder, "standin"): run() accepts a model name; embed_images must either do the same or say that
    it needs an Encoder (old API: a KPLInputError naming the type), never an AttributeError."""
    try:
        with pytest.warns(StandInWarning):
            emb = embed_images(str(folder), "standin")
    except KPLInputError as exc:
        assert "encoder" in str(exc).lower() and "load_encoder" in str(exc)
    else:
        assert len(emb) == 12


def test_cross_class_duplicates_are_reported_once_with_both_names(folder, standin, caplog, counting):
    src = folder / "val" / "alpha" / "img_0.png"
    (folder / "val" / "beta" / "copied scan.png").write_bytes(src.read_bytes())
    with caplog.at_level(logging.WARNING, logger="kplib"):
        emb = embed_images(str(folder), standin)
    leaks = [r.getMessage() for r in caplog.records if "copied scan.png" in r.getMessage()]
    assert len(leaks) == 1, caplog.text
    assert "img_0.png" in leaks[0] and "leak" in leaks[0]
    assert len(emb) == 13 and set(counting["read"].values()) == {1}  # the leak check reuses the content keys


def test_aliased_class_folders_refused_unless_allowed(folder, standin, caplog):
    os.symlink(folder / "val" / "alpha", folder / "val" / "alpha_link")
    with pytest.raises(KPLInputError, match="same folder") as info:
        embed_images(str(folder), standin)
    assert "command line: --allow-aliases" in str(info.value) and "Python: allow_aliases=True" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="kplib"):
        emb = embed_images(load_dataset(str(folder), allow_aliases=True), standin)
    assert emb.folder.counts()["alpha_link"] == 4 and "same folder" in caplog.text


def test_empty_class_folder_needs_skip_empty(folder, standin, caplog):
    (folder / "val" / "delta").mkdir()
    with pytest.raises(KPLInputError, match="delta") as info:
        embed_images(str(folder), standin)
    assert "command line: --skip-empty-classes" in str(info.value)
    assert "Python: skip_empty=True" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="kplib"):
        emb = embed_images(load_dataset(str(folder), skip_empty=True), standin)
    assert emb.class_names == list(CLASSES) and emb.folder.dropped_classes == ["delta"]
    assert "delta" in caplog.text


def test_nothing_written_into_the_data_folder(folder, kb, standin):
    before = tree_state(folder)
    embed_images(str(folder), standin)
    run(str(folder), "kpl_corrected", standin, str(kb), FAST)
    assert tree_state(folder) == before


# ------------------------------------------------------------------------------------------------ embed_knowledge
def test_embed_knowledge_prompts_templates_and_display_names(standin, kb):
    text = embed_knowledge(str(kb), standin, ["gamma", "alpha", "beta"])  # dataset order wins over KB order
    assert text.class_names == ["gamma", "alpha", "beta"]
    assert text.name_embeddings.shape == (3, len(DEFAULT_NAME_TEMPLATES), standin.embed_dim)
    assert [d.shape[0] for d in text.description_embeddings] == [3, 3, 3]
    assert text.descriptions[0][0] == "smooth gamma texture"
    assert text.meta["display_names"] == ["gamma tissue", "alpha tissue", "beta tissue"]
    # the description prompt is the KPL template with the KB's display name
    prompt = KPL_TEMPLATE.format(class_name="gamma tissue", description="smooth gamma texture")
    torch.testing.assert_close(text.description_embeddings[0][0], standin.encode_texts([prompt])[0],
                               atol=1e-6, rtol=0)
    name_prompt = DEFAULT_NAME_TEMPLATES[1].format("alpha tissue")
    torch.testing.assert_close(text.name_embeddings[1, 1], standin.encode_texts([name_prompt])[0], atol=1e-6, rtol=0)
    assert text.meta["kb_id"] == "test-kb-v1" and text.meta["kb_method"] == "curated"
    assert text.meta["encoder"]["is_standin"] and text.meta["template"] == KPL_TEMPLATE

    # another template, other name templates and display names
    other = embed_knowledge(str(kb), standin, list(CLASSES), display_names=["A", "B", "G"],
                            template="{description} seen in a {class_name}", name_templates=["{} cells"])
    assert other.name_embeddings.shape == (3, 1, standin.embed_dim)
    torch.testing.assert_close(other.description_embeddings[2][1],
                               standin.encode_texts(["grainy gamma texture seen in a G"])[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(other.name_embeddings[0, 0], standin.encode_texts(["A cells"])[0], atol=1e-6, rtol=0)


def test_embed_knowledge_warns_about_long_prompts_by_class_and_description(standin, tmp_path, caplog):
    kb = make_kb(tmp_path / "kb.json", long_class="beta")
    with caplog.at_level(logging.WARNING, logger="kplib"):
        text = embed_knowledge(str(kb), standin, list(CLASSES))
    assert "class 'beta', description 3" in caplog.text and "truncated" in caplog.text
    assert "alpha" not in caplog.text.split("truncated", 1)[1]  # only the long one is named
    assert [d.shape[0] for d in text.description_embeddings] == [3, 4, 3]  # still encoded (truncated as CLIP does)


def test_embed_knowledge_missing_class_and_bad_templates(standin, kb):
    with pytest.raises(KnowledgeBaseError, match="delta"):
        embed_knowledge(str(kb), standin, ["alpha", "delta"])
    with pytest.raises(KPLInputError, match="template"):
        embed_knowledge(str(kb), standin, list(CLASSES), template="a photo of a {class_name}")
    with pytest.raises(KPLInputError, match="name_templates"):
        embed_knowledge(str(kb), standin, list(CLASSES), name_templates=["no placeholder"])


def test_embed_knowledge_without_a_kb_encodes_class_names_only(standin):
    text = embed_knowledge(None, standin, list(CLASSES))
    assert text.name_embeddings.shape == (3, len(DEFAULT_NAME_TEMPLATES), standin.embed_dim)
    assert [d.shape[0] for d in text.description_embeddings] == [0, 0, 0]
    assert text.meta["kb_id"] is None


UNEVEN = {"alpha": 2, "beta": 5, "gamma": 3}


@pytest.fixture
def xray_kb(tmp_path):
    return make_kb(tmp_path / "xray.json", n_desc=UNEVEN, modality="chest X-ray")


def test_knowledge_controls_keep_the_counts_and_change_only_the_text(standin, xray_kb):
    plain = embed_knowledge(str(xray_kb), standin, list(CLASSES))
    text = embed_knowledge(str(xray_kb), standin, list(CLASSES), controls=True, seed=3, modality="chest X-ray")
    assert set(text.controls) == set(CONTROLS)
    assert text.meta["controls"] == {"names": sorted(CONTROLS), "seed": 3, "modality": "chest X-ray"}
    counts = [UNEVEN[c] for c in CLASSES]
    for name in ("random_words", "shuffled", "generic"):
        assert [d.shape[0] for d in text.controls[name]] == counts, name
    assert [d.shape[0] for d in text.controls["name_only"]] == [1, 1, 1]
    # the real side is untouched
    assert all(torch.equal(a, b) for a, b in zip(plain.description_embeddings, text.description_embeddings))
    assert torch.equal(plain.name_embeddings, text.name_embeddings) and plain.descriptions == text.descriptions
    # name only: the KPL prompt with an empty description
    torch.testing.assert_close(text.controls["name_only"][1][0], standin.encode_texts(
        [KPL_TEMPLATE.format(class_name="beta tissue", description="")])[0], atol=1e-6, rtol=0)
    # generic: prompts of the modality's generic descriptions
    generic = standin.encode_texts([KPL_TEMPLATE.format(class_name="gamma tissue", description=t)
                                    for t in generic_descriptions("chest X-ray")])
    assert ((text.controls["generic"][2] @ generic.T).max(dim=1).values > 1 - 1e-5).all()


def test_knowledge_controls_are_reproducible_from_the_seed(standin, xray_kb):
    a = embed_knowledge(str(xray_kb), standin, list(CLASSES), controls=True, seed=3, modality="chest X-ray")
    b = embed_knowledge(str(xray_kb), standin, list(CLASSES), controls=True, seed=3, modality="chest X-ray")
    c = embed_knowledge(str(xray_kb), standin, list(CLASSES), controls=True, seed=4, modality="chest X-ray")
    for name in ("random_words", "shuffled"):
        assert all(torch.equal(x, y) for x, y in zip(a.controls[name], b.controls[name])), name
    assert not all(torch.equal(x, y) for x, y in zip(a.controls["random_words"], c.controls["random_words"]))


def test_shuffled_descriptions_come_from_other_classes(standin, xray_kb):
    text = embed_knowledge(str(xray_kb), standin, list(CLASSES), controls=True, seed=0, modality="chest X-ray")
    descs = text.descriptions
    for c, name in enumerate(CLASSES):
        shown = f"{name} tissue"
        others = standin.encode_texts([KPL_TEMPLATE.format(class_name=shown, description=t)
                                       for j, group in enumerate(descs) if j != c for t in group])
        own = standin.encode_texts([KPL_TEMPLATE.format(class_name=shown, description=t) for t in descs[c]])
        rows = text.controls["shuffled"][c]
        assert ((rows @ others.T).max(dim=1).values > 1 - 1e-5).all(), name  # each one another class's text
        assert ((rows @ own.T).max(dim=1).values < 1 - 1e-4).all(), name  # never its own


def test_a_modality_without_generic_descriptions_leaves_out_only_that_control(standin, kb, caplog):
    with caplog.at_level(logging.WARNING, logger="kplib"):
        text = embed_knowledge(str(kb), standin, list(CLASSES), controls=True, modality="synthetic")
    assert set(text.controls) == set(CONTROLS) - {"generic"} and "generic" in caplog.text


def test_run_a_control_method_records_the_seed(folder, kb, standin):
    exp = run(str(folder), "kpl_shuffled", standin, str(kb), KPLConfig(iters_proxy=50, seed=5))
    assert exp.provenance()["controls"]["seed"] == 5 and exp.provenance()["config"]["seed"] == 5
    again = run(str(folder), "kpl_shuffled", standin, str(kb), KPLConfig(iters_proxy=50, seed=5))
    assert torch.equal(again.result.logits, exp.result.logits)


# ------------------------------------------------------------------------------------------------ run
@pytest.mark.parametrize("method", ["zero_shot", "kpl_corrected"])
def test_run_fills_provenance_and_summary(folder, kb, standin, method):
    exp = run(str(folder), method, standin, str(kb), FAST)
    res = exp.result
    assert res.method == method and res.predictions.shape == (12,) and res.logits.shape == (12, 3)
    prov = exp.provenance()
    assert prov["encoder"] == standin.identity.to_dict() and prov["encoder"]["is_standin"] is True
    assert prov["encoder"]["revision"] == standin.identity.revision
    ds = prov["dataset"]
    assert ds["name"] == "data" and ds["n_images"] == 12 and ds["counts"] == {c: 4 for c in CLASSES}
    assert ds["class_names"] == list(CLASSES) and ds["seed"] == 0 and ds["skipped"] == []
    assert prov["kb"] == {"kb_id": "test-kb-v1", "method": "curated", "origin": str(kb)}
    assert prov["method"] == method and prov["template"] == KPL_TEMPLATE
    assert prov["config"] == res.config.to_dict() and prov["config"]["seed"] == 0
    assert prov["config"]["iters_proxy"] == 50
    if method == "kpl_corrected":
        assert prov["config"]["mode"] == "corrected"
    assert prov["kplib"] and prov["torch"] == torch.__version__
    assert "date" not in json.dumps(prov) and "timings" not in json.dumps(prov)
    assert exp.metrics is not None and exp.metrics["n"] == 12
    assert exp.metrics["accuracy"] == pytest.approx(float((res.predictions == exp.images.labels).double().mean()))

    summary = exp.summary()
    assert {"dataset", "model", "method", "config", "metrics"} <= set(summary)
    assert summary["dataset"] == "data" and summary["method"] == method and summary["model"] == standin.identity.label
    assert summary["is_standin"] is True and summary["kb"] == "test-kb-v1" and summary["config"] == prov["config"]
    m = summary["metrics"]
    assert {"accuracy", "balanced_accuracy", "macro_f1", "accuracy_ci", "n"} <= set(m)
    assert m["accuracy"] == exp.metrics["accuracy"] and len(m["accuracy_ci"]) == 2 and m["n"] == 12
    json.dumps(summary)  # JSON-ready

    again = run(str(folder), method, standin, str(kb), FAST)
    assert again.images.stats["hits"] == 12 and again.provenance() == prov
    assert torch.equal(again.result.predictions, res.predictions) and torch.equal(again.result.logits, res.logits)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_with_json_provenance_and_summary(folder, xray_kb, standin, method):
    exp = run(str(folder), method, standin, str(xray_kb), [FAST])
    assert exp.result.predictions.shape == (12,) and exp.metrics is not None
    prov, summary = exp.provenance(), exp.summary()
    assert prov["method"] == summary["method"] == method
    assert prov["config"] == dataclasses.asdict(exp.result.config)
    json.dumps(prov), json.dumps(summary)


def test_run_seed_reaches_the_bootstrap(folder, kb, standin):
    exp = run(str(folder), "zero_shot", standin, str(kb), KPLConfig(seed=7))
    assert exp.metrics["seed"] == 7 and exp.provenance()["config"]["seed"] == 7


def test_zero_shot_runs_without_a_kb(folder, standin):
    exp = run(str(folder), "zero_shot", standin)  # an unregistered folder and no KB: class names only
    assert exp.result.predictions.shape == (12,) and exp.kb is None
    assert exp.provenance()["kb"]["kb_id"] is None and exp.summary()["kb"] is None
    # its class-name prompts use the folder names
    names = embed_knowledge(None, standin, list(CLASSES))
    assert torch.equal(exp.text.name_embeddings, names.name_embeddings)


@pytest.mark.parametrize("method", ["kpl_corrected", "descriptor_mean"])
def test_a_method_that_needs_a_kb_says_how_to_give_one(folder, standin, method):
    with pytest.raises(KPLInputError) as info:
        run(str(folder), method, standin)
    assert "command line: --kb" in str(info.value) and "Python: kb=" in str(info.value)


@pytest.mark.parametrize("method", ["zero_shot", "kpl_corrected", "transclip", "inmap"])
def test_unlabelled_folder_gives_predictions_without_metrics(folder, kb, standin, tmp_path, method):
    images = unlabelled_copy(tmp_path / "export", folder)
    ds = load_dataset(images, classes=list(CLASSES))
    assert ds.labels is None and len(ds) == 12
    config = [FAST]  # a sequence of configs: each method takes the one of its class (transclip: its default)
    exp = run(ds, method, standin, str(kb), config)
    assert exp.metrics is None and exp.images.labels is None
    assert exp.result.predictions.shape == (12,) and exp.result.logits.shape == (12, 3)
    assert exp.summary()["metrics"] is None and exp.provenance()["dataset"]["layout"] == "unlabelled"
    # the same images, labelled: the transductive methods see the same embeddings, so the same predictions
    labelled = run(str(folder), method, standin, str(kb), config)
    assert labelled.images.paths == sorted(folder.rglob("*.png"))  # scan_<j> is labelled image j
    unl = {int(Path(p).stem.split("_")[1]): k for p, k in zip(exp.images.paths, exp.result.predictions.tolist())}
    assert [unl[j] for j in range(12)] == labelled.result.predictions.tolist()


def test_unlabelled_folder_takes_its_classes_from_the_kb(folder, kb, standin, tmp_path):
    """load_folder documents labelled=False as "classes from classes, or later from a knowledge base"."""
    images = unlabelled_copy(tmp_path / "export", folder)
    exp = run(load_dataset(images, labelled=False), "kpl_corrected", standin, str(kb), FAST)
    assert exp.images.class_names == list(CLASSES) and exp.metrics is None
    assert exp.result.predictions.shape == (12,)


# ------------------------------------------------------------------------------------------------ compare
def test_compare_runs_every_method_on_the_same_embeddings(folder, kb, standin):
    methods = ["kpl_corrected", "zero_shot", "kpl_shuffled"]
    cmp = compare(str(folder), methods, standin, str(kb), FAST, n_bootstrap=200)
    assert list(cmp.experiments) == methods and cmp.reference == "kpl_corrected"
    images = {id(e.images) for e in cmp.experiments.values()}
    assert len(images) == 1  # one EmbeddingSet for all
    labels = cmp.experiments["zero_shot"].images.labels
    ref = cmp.experiments["kpl_corrected"].result.predictions
    assert set(cmp.paired) == {"zero_shot", "kpl_shuffled"}

    def acc(pred):
        return float((pred == labels).double().mean())

    for m in ("zero_shot", "kpl_shuffled"):
        pred = cmp.experiments[m].result.predictions
        pair = cmp.paired[m]
        assert pair.difference == pytest.approx(acc(pred) - acc(ref))
        assert pair.a_only == int(((pred == labels) & (ref != labels)).sum())
        assert pair.b_only == int(((pred != labels) & (ref == labels)).sum())
        assert 0 <= pair.p_value <= 1 and pair.n == 12 and pair.n_bootstrap == 200
        # the same predictions as a run of that method alone
        alone = run(str(folder), m, standin, str(kb), FAST)
        assert torch.equal(alone.result.predictions, pred)
    table = cmp.table()
    assert list(table.index) == methods
    assert {"accuracy", "balanced_accuracy", "macro_f1", "McNemar p"} <= set(table.columns)
    assert np.isnan(table.loc["kpl_corrected", "McNemar p"])
    assert table.loc["zero_shot", "accuracy"] == cmp.experiments["zero_shot"].metrics["accuracy"]
    assert table.loc["kpl_shuffled", "Δ vs kpl_corrected"] == pytest.approx(cmp.paired["kpl_shuffled"].difference)


def test_compare_reference_and_bad_inputs(folder, kb, standin):
    cmp = compare(str(folder), ["kpl_corrected", "zero_shot"], standin, str(kb), FAST, reference="zero_shot")
    assert set(cmp.paired) == {"kpl_corrected"} and cmp.reference == "zero_shot"
    with pytest.raises(KPLInputError, match="reference"):
        compare(str(folder), ["kpl_corrected"], standin, str(kb), FAST, reference="zero_shot")
    with pytest.raises(KPLInputError, match="--methods"):
        compare(str(folder), [], standin, str(kb))


def test_compare_on_unlabelled_images_has_no_paired_tests(folder, kb, standin, tmp_path):
    ds = load_dataset(unlabelled_copy(tmp_path / "export", folder), classes=list(CLASSES))
    cmp = compare(ds, ["kpl_corrected", "zero_shot"], standin, str(kb), FAST)
    assert cmp.paired == {} and all(e.metrics is None for e in cmp.experiments.values())
    assert list(cmp.table().index) == ["kpl_corrected", "zero_shot"]


def test_embedding_set_save_and_load_round_trip(folder, standin, tmp_path):
    """``EmbeddingSet.save`` (``kpl encode --save``) keeps every field; load refuses a file it did not write."""
    emb = embed_images(load_dataset(folder), standin, cache=False)
    loaded = pipeline.EmbeddingSet.load(emb.save(tmp_path / "emb.pt"))
    assert torch.equal(loaded.embeddings, emb.embeddings) and torch.equal(loaded.labels, emb.labels)
    assert loaded.paths == emb.paths and loaded.class_names == emb.class_names
    assert loaded.folder.skipped == emb.folder.skipped and loaded.encoder == emb.encoder
    (tmp_path / "other.pt").write_bytes(b"not a torch file")
    with pytest.raises(KPLInputError, match="other.pt is not an embedding file"):
        pipeline.EmbeddingSet.load(tmp_path / "other.pt")
