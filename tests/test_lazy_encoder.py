"""Lazy encoders: identity, fingerprint and cache hits without building/loading the model's weights.

A cached re-run must not pay for the model (issue 6); the weights are built on first encode, once, and checked
against the identity that was given out before.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import kplib.encoders as E
from kplib.encoders import ClipEncoder, EncoderIdentity, load_clip_tokenizer, load_encoder
from kplib.errors import ImageDecodeError, KPLError, KPLInputError, StandInWarning

TEXTS = ["a photo of a cat.", "a photo of a glioma, which has an infiltrative mass"]


def _images(n: int, seed: int = 0, size=(40, 52)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def _standin() -> ClipEncoder:
    with pytest.warns(StandInWarning):
        return load_encoder("standin")


@pytest.fixture
def count_clip_models(monkeypatch):
    """Count every CLIPModel built while the test runs: the stand-in's builder and ``CLIPModel.from_pretrained``
    (patching the class object itself: transformers' lazy module does not let ``transformers.CLIPModel`` be
    replaced)."""
    import transformers

    built: list[int] = []
    real_build, real_load = E.build_standin_model, transformers.CLIPModel.from_pretrained.__func__

    def build(seed: int = E.STANDIN_SEED):
        built.append(1)
        return real_build(seed)

    def load(cls, *args, **kwargs):
        built.append(1)
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(E, "build_standin_model", build)
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", classmethod(load))
    return built


def _tiny_clip(seed: int = 1, projection_dim: int = 16):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        projection_dim=projection_dim,
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, projection_dim=projection_dim),
    )
    torch.manual_seed(seed)
    return CLIPModel(cfg).eval()


@pytest.fixture(scope="module")
def tiny_parts():
    from transformers import CLIPImageProcessorPil

    return (_tiny_clip(), load_clip_tokenizer(),
            CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))


@pytest.fixture
def tiny_folder(tmp_path, tiny_parts):
    """A tiny random CLIP saved as users' checkpoints are (save_pretrained: model, tokenizer, processor)."""
    model, tokenizer, processor = tiny_parts
    folder = tmp_path / "tiny-clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------- stand-in
def test_second_standin_load_builds_no_model(count_clip_models, monkeypatch):
    first = _standin()
    assert count_clip_models == [1] and first.is_materialized  # fresh cache: built now, digest memoised
    processors = []
    real_processor = E.standin_image_processor
    monkeypatch.setattr(E, "standin_image_processor", lambda: processors.append(1) or real_processor())

    second = _standin()
    repr(second), second.preprocessing, second.fingerprint(), second.token_lengths(TEXTS)
    assert count_clip_models == [1] and not second.is_materialized and processors == []
    assert second.identity == first.identity and second.fingerprint() == first.fingerprint()
    assert (second.context_length, second.embed_dim) == (first.context_length, first.embed_dim) == (77, 256)

    second.preprocess(_images(1)[0])        # the processor is built when an image is preprocessed ...
    assert processors == [1] and count_clip_models == [1]
    second.encode_texts(TEXTS[:1])          # ... the model when something is encoded, once
    second.encode_texts(TEXTS[1:])
    assert count_clip_models == [1, 1] and second.is_materialized


def test_lazy_standin_gives_bit_identical_embeddings():
    eager, lazy = _standin(), _standin()
    assert eager.is_materialized and not lazy.is_materialized
    ims = _images(3, size=(230, 260))
    assert torch.equal(lazy.encode_images(ims, progress=False, batch_size=2, num_workers=1),
                       eager.encode_images(ims, progress=False, batch_size=2, num_workers=1))
    assert torch.equal(lazy.encode_texts(TEXTS), eager.encode_texts(TEXTS))


def test_concurrent_first_use_builds_the_model_once(monkeypatch):
    _standin()
    lazy = _standin()
    builds = []
    real = E.build_standin_model
    monkeypatch.setattr(E, "build_standin_model", lambda seed=0: builds.append(seed) or real(seed))
    got, start = [], threading.Barrier(4)

    def use():
        start.wait()
        got.append(lazy.model)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [0] and len(got) == 4 and all(m is got[0] for m in got)


def test_standin_memo_corrupt_or_unwritable_still_works(isolated_cache, tmp_path, monkeypatch):
    reference = "weights-" + E.weights_digest(E.build_standin_model(E.STANDIN_SEED))
    memo = isolated_cache / E.STANDIN_MEMO
    memo.write_text("{not json", encoding="utf-8")
    enc = _standin()
    assert enc.identity.revision == reference and enc.is_materialized   # built now, memo repaired
    assert json.loads(memo.read_text()) == {E.standin_recipe_key(): reference.removeprefix("weights-")}
    memo.write_text(json.dumps({E.standin_recipe_key(): "not a digest"}), encoding="utf-8")
    assert _standin().identity.revision == reference

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("KPL_CACHE_DIR", str(blocker / "cache"))   # cannot be created, even by root
    for _ in range(2):
        enc = _standin()
        assert enc.identity.revision == reference and enc.is_materialized
    assert torch.equal(enc.encode_texts(TEXTS[:1]), _standin().encode_texts(TEXTS[:1]))


def test_standin_digest_mismatch_raises_and_fixes_the_memo(isolated_cache, monkeypatch):
    true_revision = _standin().identity.revision
    lazy = _standin()
    assert lazy.identity.revision == true_revision and not lazy.is_materialized
    monkeypatch.setattr(E, "weights_digest", lambda model: "0" * 16)   # as if torch initialised differently now
    with pytest.raises(KPLError, match=r"not reproducible on this machine.*re-run") as info:
        lazy.encode_texts(TEXTS[:1])
    assert true_revision in str(info.value) and "weights-" + "0" * 16 in str(info.value)
    with pytest.raises(KPLError, match="not reproducible"):     # the encoder stays unusable: no mixed results
        lazy.encode_images(_images(1), progress=False)
    assert not lazy.is_materialized
    memo = json.loads((isolated_cache / E.STANDIN_MEMO).read_text())
    assert memo == {E.standin_recipe_key(): "0" * 16}
    rerun = _standin()                                           # the re-run uses the corrected revision
    assert rerun.identity.revision == "weights-" + "0" * 16
    assert rerun.encode_texts(TEXTS[:1]).shape == (1, 256)


def test_preprocessing_memo_that_does_not_match_the_processor_raises(isolated_cache):
    true_preprocessing = _standin().preprocessing
    memo_path = isolated_cache / E.PREPROCESSING_MEMO
    memo = json.loads(memo_path.read_text())
    (key,) = memo
    memo[key] = dict(true_preprocessing, crop_size={"height": 200, "width": 200})   # stale/foreign memo
    memo_path.write_text(json.dumps(memo))
    stale = _standin()
    assert stale.preprocessing["crop_size"] == {"height": 200, "width": 200}       # what the cache key used
    for on_error in ("stop", "skip"):   # never reported as (or skipped like) an undecodable image
        with pytest.raises(KPLError, match=r"preprocessing.*differs.*re-run") as info:
            stale.encode_images_detailed(_images(2), progress=False, num_workers=1, on_error=on_error)
        assert not isinstance(info.value, ImageDecodeError)
    assert json.loads(memo_path.read_text())[key] == true_preprocessing             # memo corrected
    assert _standin().preprocessing == true_preprocessing


# ----------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_folder_loads_lazily_with_a_file_revision(tiny_folder, tiny_parts, isolated_cache,
                                                             count_clip_models):
    model, tokenizer, processor = tiny_parts
    with warnings.catch_warnings():
        warnings.simplefilter("error", StandInWarning)
        a, b = load_encoder(str(tiny_folder)), load_encoder(str(tiny_folder))
    assert count_clip_models == [] and not a.is_materialized and not b.is_materialized
    assert a.identity == b.identity and a.fingerprint() == b.fingerprint()
    assert a.identity.revision == "files-" + E.checkpoint_files_digest(tiny_folder)
    assert (a.context_length, a.embed_dim) == (77, 16)
    assert a.preprocessing["crop_size"] == {"height": 32, "width": 32}

    memory = ClipEncoder(model, tokenizer, processor, EncoderIdentity("memory", None, False))
    ims = _images(3)
    assert torch.equal(a.encode_images(ims, batch_size=2, progress=False),
                       memory.encode_images(ims, batch_size=2, progress=False))
    assert torch.equal(a.encode_texts(TEXTS), memory.encode_texts(TEXTS))
    assert count_clip_models == [1]

    # the per-file digests are memoised by (path, size, mtime): a re-run trusts them without reading the bytes
    weights = tiny_folder / "model.safetensors"
    memo_path = isolated_cache / E.CHECKPOINT_MEMO
    memo = json.loads(memo_path.read_text())
    memo[str(weights.resolve())]["blake2b"] = "f" * 32
    memo_path.write_text(json.dumps(memo))
    trusted = load_encoder(str(tiny_folder)).identity.revision
    assert trusted != a.identity.revision
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # touched: hashed again
    assert load_encoder(str(tiny_folder)).identity.revision == a.identity.revision

    _tiny_clip(seed=2).save_pretrained(tiny_folder)                 # other weights → other revision
    changed = load_encoder(str(tiny_folder))
    assert changed.identity.revision.startswith("files-") and changed.identity.revision != a.identity.revision


def test_weights_changed_after_load_encoder_are_refused(tiny_folder):
    enc = load_encoder(str(tiny_folder))
    _tiny_clip(seed=3).save_pretrained(tiny_folder)
    with pytest.raises(KPLError, match=r"changed.*call load_encoder again"):
        enc.encode_texts(TEXTS[:1])


def test_incomplete_checkpoint_raises_at_first_encode(tiny_folder, tiny_parts):
    model = tiny_parts[0]
    sd = {k: v for k, v in model.state_dict().items() if k != "text_projection.weight"}
    model.save_pretrained(tiny_folder, state_dict=sd)
    enc = load_encoder(str(tiny_folder))            # files look right: the identity is known, nothing loaded
    assert not enc.is_materialized
    for _ in range(2):
        with pytest.raises(KPLInputError, match="text_projection") as info:
            enc.encode_texts(TEXTS[:1])
        assert str(tiny_folder) in str(info.value) and "complete CLIPModel checkpoint" in str(info.value)


def test_config_that_mismatches_the_weights_raises_at_first_encode(tiny_folder):
    cfg_path = tiny_folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["projection_dim"] = 8
    cfg_path.write_text(json.dumps(cfg))
    enc = load_encoder(str(tiny_folder))
    assert enc.embed_dim == 8 and not enc.is_materialized
    with pytest.raises(KPLInputError) as info:
        enc.encode_images(_images(1), progress=False)
    assert str(tiny_folder) in str(info.value)


def test_auto_falls_back_on_folders_without_weights_or_clip_config(tiny_folder, monkeypatch):
    monkeypatch.setenv("KPL_MODEL", str(tiny_folder))
    (tiny_folder / "model.safetensors").unlink()
    with pytest.warns(StandInWarning, match="no weight file"):
        assert load_encoder("auto").identity.is_standin
    with pytest.raises(KPLInputError, match="no weight file"):
        load_encoder(str(tiny_folder))
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["model_type"] = "siglip"
    (tiny_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KPLInputError, match="not a CLIP"):
        load_encoder(str(tiny_folder))


# ----------------------------------------------------------------------------------------------- experiment
def test_cached_rerun_of_embed_dataset_and_knowledge_never_loads_the_model(tiny_folder, tmp_path, monkeypatch):
    import transformers

    from kplib.experiment import embed_dataset, embed_knowledge

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("alpha", "beta"):
        (data / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(data / name / f"{i}.png")
    kb = tmp_path / "kb.json"
    kb.write_text(json.dumps({
        "schema_version": 1, "kb_id": "lazy-test-v1", "dataset": None, "modality": "synthetic",
        "created": "2026-11-25", "method": "curated", "authors": "tests", "generator": None, "source": None,
        "classes": [{"name": n, "display_name": n, "references": [],
                     "descriptions": [{"text": f"{a} {n} texture", "source": None} for a in ("smooth", "grainy")]}
                    for n in ("alpha", "beta")]}), encoding="utf-8")

    def run(enc):
        emb = embed_dataset(data, enc, progress=False)
        text = embed_knowledge(kb, enc, emb.class_names)
        return emb, text

    first = load_encoder(str(tiny_folder))
    emb1, text1 = run(first)
    assert first.is_materialized and emb1.cache_stats["misses"] == 6

    def refuse(*args, **kwargs):
        raise AssertionError("a cached re-run loaded weights or built the image processor")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", refuse)
    second = load_encoder(str(tiny_folder))
    emb2, text2 = run(second)
    assert not second.is_materialized and second._processor is None
    assert emb2.cache_stats["hits"] == 6 and emb2.cache_stats["misses"] == 0
    assert torch.equal(emb1.embeddings, emb2.embeddings)
    assert torch.equal(text1.name_embeddings, text2.name_embeddings)
    assert all(torch.equal(x, y) for x, y in zip(text1.description_embeddings, text2.description_embeddings))
    assert emb2.encoder == emb1.encoder and emb2.meta["preprocessing"] == emb1.meta["preprocessing"]


# ----------------------------------------------------------------------------------------------- hub ids
def _fake_hub_cache(root, repo_id: str, files_from, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache holding one snapshot of ``repo_id`` (layout of huggingface_hub: refs/main → commit)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)
    return commit


def test_hub_id_in_the_local_cache_loads_lazily_offline(tiny_folder, tmp_path, monkeypatch, count_clip_models):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)   # a regression fails fast instead of downloading
    monkeypatch.setattr(E, "_hub_reachable", lambda *a, **k: pytest.fail("the hub must not be asked"))
    commit = _fake_hub_cache(tmp_path / "hf", "kpl-test-org/tiny-clip", tiny_folder)
    monkeypatch.setenv("KPL_MODEL", "kpl-test-org/tiny-clip")
    with warnings.catch_warnings():
        warnings.simplefilter("error", StandInWarning)
        explicit, auto = load_encoder("kpl-test-org/tiny-clip"), load_encoder("auto")
    for enc in (explicit, auto):
        assert enc.identity == EncoderIdentity("kpl-test-org/tiny-clip", commit, False)
        assert not enc.is_materialized
    assert count_clip_models == []
    assert explicit.encode_texts(TEXTS).shape == (2, 16) and count_clip_models == [1]


def test_incomplete_cached_snapshot_with_unreachable_hub_falls_back_in_auto(tiny_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)   # a regression fails fast instead of downloading
    calls = []
    monkeypatch.setattr(E, "_hub_reachable", lambda *a, **k: calls.append(1) or False)
    _fake_hub_cache(tmp_path / "hf", "kpl-test-org/tiny-clip", tiny_folder)
    next((tmp_path / "hf").rglob("model.safetensors")).unlink()   # only config/tokenizer were downloaded
    monkeypatch.setenv("KPL_MODEL", "kpl-test-org/tiny-clip")
    with pytest.warns(StandInWarning, match=r"kpl-test-org/tiny-clip.*unreachable.*no weight file"):
        assert load_encoder("auto").identity.is_standin
    assert calls == [1]


def test_text_cache_key_changes_with_the_tokenizer_files(isolated_cache, tmp_path, monkeypatch):
    """Same weights, another tokenizer (here: two BPE merges swapped in rank) → other text-cache entries."""
    from kplib import config
    from kplib.experiment import _text_namespace

    first = _standin()
    copy = tmp_path / "tokenizer"
    shutil.copytree(config.tokenizer_dir(), copy)
    monkeypatch.setenv("KPL_TOKENIZER_DIR", str(copy))
    same = _standin()
    assert same.tokenizer_digest == first.tokenizer_digest is not None
    assert _text_namespace(same) == _text_namespace(first)
    merges = copy / "merges.txt"
    lines = merges.read_text(encoding="utf-8").splitlines()
    first_merge = 1 if lines[0].startswith("#") else 0
    lines[first_merge], lines[-1] = lines[-1], lines[first_merge]
    merges.write_text("\n".join(lines) + "\n", encoding="utf-8")
    changed = _standin()
    assert changed.identity == first.identity            # the weights are the same ...
    assert changed.tokenizer_digest != first.tokenizer_digest
    assert _text_namespace(changed) != _text_namespace(first)   # ... the cached text embeddings are not shared
