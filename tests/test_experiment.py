"""experiment.py: cached dataset embedding, EmbeddingSet I/O, KB embedding, run_experiment provenance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kplib.encoders import PromptTruncationWarning, load_encoder
from kplib.errors import ImageDecodeError, KPLInputError, StandInWarning
from kplib.experiment import (
    DEFAULT_NAME_TEMPLATES,
    KPL_TEMPLATE,
    EmbeddingSet,
    embed_dataset,
    embed_knowledge,
    run_experiment,
)

CLASSES = ("alpha", "beta", "gamma")


def make_folder(root: Path, per_class: int = 4, size: int = 40) -> Path:
    """<root>/val/<class>/<image>.png, each class a different dominant colour plus noise."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        d = root / "val" / name
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (size, size + 4, 3), dtype=np.uint8)
            arr[..., c] += 180
            Image.fromarray(arr).save(d / f"img_{i}.png")
    return root


def make_kb(path: Path, n_desc: int = 3, long_class: str | None = None) -> Path:
    classes = []
    for name in CLASSES:
        descs = [{"text": f"{adj} {name} texture", "source": None} for adj in ("smooth", "grainy", "bright")][:n_desc]
        if name == long_class:
            descs.append({"text": "an extremely " + "very " * 80 + "long description", "source": None})
        classes.append({"name": name, "display_name": f"{name} tissue", "references": [], "descriptions": descs})
    kb = {"schema_version": 1, "kb_id": "test-kb-v1", "dataset": None, "modality": "synthetic", "created": "2026-11-25",
          "method": "curated", "authors": "tests", "generator": None, "source": None, "classes": classes}
    path.write_text(json.dumps(kb), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def standin():
    with pytest.warns(StandInWarning):
        return load_encoder("standin")


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data")


# ------------------------------------------------------------------------------------------------ embed_dataset
def test_second_run_reads_everything_from_cache(folder, standin, isolated_cache):
    first = embed_dataset(str(folder), standin, progress=False)
    assert len(first) == 12 and first.class_names == list(CLASSES)
    assert first.counts() == {c: 4 for c in CLASSES}
    assert first.cache_stats["hits"] == 0 and first.cache_stats["misses"] == 12
    assert first.cache_stats["writes"] == 12 and first.cache_stats["n_encoded"] == 12
    assert first.encoder == standin.identity and first.encoder.is_standin
    assert torch.allclose(first.embeddings.norm(dim=1), torch.ones(12), atol=1e-5)
    assert any(isolated_cache.rglob("*.kple"))  # the cache lives in KPL_CACHE_DIR

    second = embed_dataset(str(folder), standin, progress=False)
    assert second.cache_stats["hits"] == 12 and second.cache_stats["misses"] == 0
    assert second.cache_stats["n_encoded"] == 0
    assert torch.equal(first.embeddings, second.embeddings)
    assert second.paths == first.paths and torch.equal(second.labels, first.labels)

    # an edited image is re-encoded, the rest still hit
    p = Path(first.paths[5])
    Image.fromarray(np.zeros((40, 44, 3), dtype=np.uint8)).save(p)
    third = embed_dataset(str(folder), standin, progress=False)
    assert third.cache_stats["hits"] == 11 and third.cache_stats["misses"] == 1
    assert not torch.equal(third.embeddings[5], first.embeddings[5])
    assert torch.equal(third.embeddings[:5], first.embeddings[:5])


def test_cache_key_separates_precision(folder, standin):
    embed_dataset(str(folder), standin, progress=False)
    with pytest.warns(StandInWarning):
        bf = load_encoder("standin", dtype="bfloat16")
    other = embed_dataset(str(folder), bf, progress=False)
    assert other.cache_stats["hits"] == 0  # bf16 embeddings are not fp32 ones


def test_no_cache_and_identical_values(folder, standin, isolated_cache):
    a = embed_dataset(str(folder), standin, cache=False, progress=False)
    assert a.cache_stats is None and not any(isolated_cache.rglob("*.kple"))
    b = embed_dataset(str(folder), standin, progress=False)
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=1e-6, rtol=0)


def test_undecodable_image_stop_and_skip(folder, standin):
    bad = folder / "val" / "beta" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageDecodeError, match="zz_broken.png"):
        embed_dataset(str(folder), standin, progress=False)
    emb = embed_dataset(str(folder), standin, on_error="skip", progress=False)
    assert len(emb) == 12 and emb.counts()["beta"] == 4
    assert [Path(p).name for p, _ in emb.skipped] == ["zz_broken.png"]
    assert str(bad) not in emb.paths
    assert emb.meta["dataset"]["n_images"] == 12


def test_limit_per_class_and_bad_inputs(folder, standin, tmp_path):
    emb = embed_dataset(str(folder), standin, progress=False, limit_per_class=2, seed=1)
    assert emb.counts() == {c: 2 for c in CLASSES}
    with pytest.raises(KPLInputError, match="neither a registered dataset"):
        embed_dataset(str(tmp_path / "nowhere"), standin)
    with pytest.raises(KPLInputError, match="ClipEncoder"):
        embed_dataset(str(folder), "standin")
    with pytest.raises(KPLInputError, match="on_error"):
        embed_dataset(str(folder), standin, on_error="ignore")


def test_nothing_written_into_data_folder(folder, standin):
    before = sorted(p for p in folder.rglob("*"))
    embed_dataset(str(folder), standin, progress=False)
    assert sorted(p for p in folder.rglob("*")) == before


def test_embedding_set_save_load_roundtrip(folder, standin, tmp_path):
    emb = embed_dataset(str(folder), standin, progress=False)
    out = emb.save(tmp_path / "emb.pt")
    back = EmbeddingSet.load(out)
    assert torch.equal(back.embeddings, emb.embeddings) and torch.equal(back.labels, emb.labels)
    assert back.paths == emb.paths and back.class_names == emb.class_names
    assert back.encoder == emb.encoder and back.encoder.label == emb.encoder.label
    assert back.meta["preprocessing"] == standin.preprocessing and back.meta["dtype"] == "float32"
    with pytest.raises(KPLInputError, match="not found"):
        EmbeddingSet.load(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(KPLInputError, match="not a kplib embedding set"):
        EmbeddingSet.load(tmp_path / "other.pt")


# ------------------------------------------------------------------------------------------------ embed_knowledge
def test_embed_knowledge_prompts_and_shapes(standin, tmp_path):
    kb = make_kb(tmp_path / "kb.json")
    text = embed_knowledge(str(kb), standin, ["gamma", "alpha", "beta"])  # dataset order wins over KB order
    assert text.class_names == ["gamma", "alpha", "beta"]
    assert text.name_embeddings.shape == (3, len(DEFAULT_NAME_TEMPLATES), standin.embed_dim)
    assert [d.shape[0] for d in text.description_embeddings] == [3, 3, 3]
    assert text.descriptions[0][0] == "smooth gamma texture"
    # the description prompt is the KPL template with the KB's display name
    prompt = KPL_TEMPLATE.format(class_name="gamma tissue", description="smooth gamma texture")
    torch.testing.assert_close(text.description_embeddings[0][0], standin.encode_texts([prompt])[0],
                               atol=1e-6, rtol=0)
    name_prompt = DEFAULT_NAME_TEMPLATES[1].format("alpha tissue")
    torch.testing.assert_close(text.name_embeddings[1, 1], standin.encode_texts([name_prompt])[0], atol=1e-6, rtol=0)
    assert text.meta["kb_id"] == "test-kb-v1" and text.meta["encoder"]["is_standin"]
    assert text.meta["long_prompts"] == []


def test_embed_knowledge_reports_long_prompts_by_class_and_description(standin, tmp_path):
    kb = make_kb(tmp_path / "kb.json", long_class="beta")
    with pytest.warns(PromptTruncationWarning, match=r"class 'beta', description 3"):
        text = embed_knowledge(str(kb), standin, list(CLASSES))
    assert [p["label"] for p in text.meta["long_prompts"]] == ["class 'beta', description 3"]
    with pytest.raises(KPLInputError, match=r"class 'beta', description 3"):
        embed_knowledge(str(kb), standin, list(CLASSES), strict=True)


def test_embed_knowledge_missing_class_is_an_error(standin, tmp_path):
    kb = make_kb(tmp_path / "kb.json")
    with pytest.raises(KPLInputError, match="delta"):
        embed_knowledge(str(kb), standin, ["alpha", "delta"])
    with pytest.raises(KPLInputError, match="template"):
        embed_knowledge(str(kb), standin, list(CLASSES), template="a photo of a {class_name}")


# ------------------------------------------------------------------------------------------------ run_experiment
@pytest.mark.parametrize("method", ["zero_shot", "kpl"])
def test_run_experiment_fills_provenance(folder, standin, tmp_path, method):
    kb = make_kb(tmp_path / "kb.json")
    kw = {"iters_proxy": 50} if method == "kpl" else {}
    res = run_experiment(str(folder), method, model=standin, kb=str(kb), progress=False, **kw)
    assert res.predictions.shape == (12,) and res.logits.shape == (12, 3)
    m = res.meta
    assert m["encoder_label"] == standin.identity.label and m["is_standin"] is True
    assert m["encoder"]["revision"] == standin.identity.revision
    assert m["dataset"] == "data" and m["n_images"] == 12 and m["counts"] == {c: 4 for c in CLASSES}
    assert m["kb_id"] == "test-kb-v1" and m["kb_method"] == "curated"
    assert m["seed"] == 0 and m["kplib_version"] and m["date"]
    assert m["config"] == res.config and m["method"] == res.method
    assert torch.equal(m["labels"], torch.tensor([0] * 4 + [1] * 4 + [2] * 4))
    assert len(m["paths"]) == 12
    again = run_experiment(str(folder), method, model=standin, kb=str(kb), progress=False, **kw)
    assert again.meta["cache"]["hits"] == 12
    assert torch.equal(again.predictions, res.predictions) and torch.equal(again.logits, res.logits)


def test_run_experiment_needs_a_kb_for_unregistered_folders(folder, standin):
    with pytest.raises(KPLInputError, match="kb="):
        run_experiment(str(folder), "kpl", model=standin, progress=False)
