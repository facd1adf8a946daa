"""Encoders (kplib.io.encoders): the labelled stand-in, checkpoints through CLIPModel.from_pretrained (a tiny random CLIP
saved with save_pretrained), refusals, the auto fallback, offline behaviour, bf16, prompt lengths, namespaces."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from kplib import paths
from kplib.errors import KPLInputError, StandInWarning
from kplib.io.encoders import STANDIN_LABEL, STANDIN_RECIPE, Encoder, EncoderIdentity, checkpoint_digest, load_encoder

TEXTS = ["a photo of a cat.", "a photo of a glioma, which has an infiltrative mass"]


def _images(n: int, seed: int = 0, size=(40, 52)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def _standin(**kwargs) -> Encoder:
    with pytest.warns(StandInWarning, match="UNTRAINED STAND-IN.*meaningless"):
        return load_encoder("standin", **kwargs)


@pytest.fixture(scope="module")
def standin() -> Encoder:
    return _standin()


def _tiny_clip(seed: int = 1, projection_dim: int = 16) -> CLIPModel:
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
    return (_tiny_clip(), CLIPTokenizer.from_pretrained(str(paths.tokenizer_dir())),
            CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))


@pytest.fixture
def tiny_folder(tmp_path, tiny_parts):
    """A tiny random CLIP saved as users' checkpoints are: model, tokenizer, image processor."""
    folder = tmp_path / "tiny-clip"
    for part in tiny_parts:
        part.save_pretrained(folder)
    return folder


def _load_quietly(model: str, **kwargs) -> Encoder:
    with warnings.catch_warnings():
        warnings.simplefilter("error", StandInWarning)   # a real checkpoint must never fall back
        return load_encoder(model, **kwargs)


# --------------------------------------------------------------------------------------------------- stand-in
def test_standin_identity_and_label(standin):
    ident = standin.identity
    assert ident.is_standin and ident.name == "standin" and ident.label == STANDIN_LABEL
    assert "UNTRAINED" in ident.label and "meaningless" in ident.label
    assert ident.revision.startswith(STANDIN_RECIPE) and torch.__version__ in ident.revision
    assert EncoderIdentity.from_dict(ident.to_dict()) == ident and ident.to_dict()["label"] == STANDIN_LABEL
    assert "UNTRAINED" in repr(standin)
    # the documented architecture: real tokenizer vocabulary and context, 224 px OpenAI preprocessing
    assert (standin.context_length, standin.embed_dim, standin.tokenizer.vocab_size) == (77, 256, 49408)
    assert standin.preprocessing["crop_size"] == {"height": 224, "width": 224}
    assert standin.model.config._attn_implementation == "sdpa"


def test_standin_is_deterministic_and_leaves_the_global_rng_alone(standin):
    state = torch.random.get_rng_state()
    again = _standin()
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb = standin.model.state_dict(), again.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert again.identity == standin.identity and again.namespace() == standin.namespace()
    ims = _images(3, size=(230, 260))
    out = standin.encode_images(ims)
    assert out.shape == (3, 256) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(out, again.encode_images(ims)) and torch.equal(standin.encode_texts(TEXTS),
                                                                        again.encode_texts(TEXTS))


def test_standin_without_tokenizer_says_which_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("KPL_TOKENIZER_DIR", str(tmp_path / "missing"))
    with pytest.raises(KPLInputError, match="KPL_TOKENIZER_DIR"), warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        load_encoder("standin")


# --------------------------------------------------------------------------------------------------- checkpoints
def test_save_pretrained_round_trip_gives_identical_embeddings(tiny_folder, tiny_parts):
    model, tokenizer, processor = tiny_parts
    a, b = _load_quietly(str(tiny_folder)), _load_quietly(str(tiny_folder))
    assert not a.identity.is_standin and a.identity.name == a.identity.label == str(tiny_folder)
    assert a.identity.revision == "files-" + checkpoint_digest(tiny_folder) == b.identity.revision
    assert (a.context_length, a.embed_dim) == (77, 16) and a.preprocessing["crop_size"] == {"height": 32, "width": 32}
    assert a.model.config._attn_implementation == "sdpa" and a.namespace() == b.namespace()
    memory = Encoder(model, tokenizer, processor, EncoderIdentity("memory", None, False))
    ims = _images(5)
    got = a.encode_images(ims, batch_size=2)
    assert got.shape == (5, 16) and got.dtype == torch.float32
    assert torch.equal(got, b.encode_images(ims, batch_size=2))           # two loads from disk: bit-identical
    assert torch.equal(a.encode_texts(TEXTS), b.encode_texts(TEXTS))     # (the store keys on the file revision)
    # the same weights in memory: equal up to float rounding (CPU kernels round differently for weights that
    # safetensors maps at unaligned addresses; measured here: at most 9e-8)
    torch.testing.assert_close(got, memory.encode_images(ims, batch_size=2), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.encode_texts(TEXTS), memory.encode_texts(TEXTS), atol=1e-6, rtol=0)
    with torch.inference_mode():   # independent of kplib's plumbing: transformers' own calls give the same vectors
        ref = model.get_image_features(pixel_values=processor(images=ims, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(got, torch.nn.functional.normalize(ref.pooler_output, dim=-1), atol=1e-5, rtol=0)


def test_preprocessing_in_threads_keeps_every_pixel_in_order(tiny_parts):
    model, tokenizer, processor = tiny_parts
    enc = Encoder(model, tokenizer, processor, EncoderIdentity("memory", None, False))
    ims = _images(7)
    want = processor(images=ims, return_tensors="pt")["pixel_values"]
    for threads in (1, 2, 3, 16):  # one slice, uneven slices, more threads than images
        enc.preprocess_threads = threads
        assert torch.equal(enc._preprocess(ims), want), threads
    enc.preprocess_threads = 1
    serial = enc.encode_images(ims, batch_size=4)
    enc.preprocess_threads = 3
    assert torch.equal(enc.encode_images(ims, batch_size=4), serial)


def test_revision_follows_the_files(tiny_folder):
    first = _load_quietly(str(tiny_folder))
    assert _load_quietly(str(tiny_folder)).identity == first.identity
    _tiny_clip(seed=2).save_pretrained(tiny_folder)                        # other weights → other revision
    changed = _load_quietly(str(tiny_folder))
    assert changed.identity.revision.startswith("files-") and changed.identity.revision != first.identity.revision
    assert changed.namespace() != first.namespace()
    assert not torch.equal(changed.encode_texts(TEXTS), first.encode_texts(TEXTS))


def test_incomplete_checkpoint_is_refused(tiny_folder, tiny_parts):
    """transformers would fill weights missing from the file with random values; kplib refuses."""
    model = tiny_parts[0]
    model.save_pretrained(tiny_folder, state_dict={k: v for k, v in model.state_dict().items()
                                                   if k != "text_projection.weight"})
    with pytest.raises(KPLInputError, match="text_projection") as info:
        _load_quietly(str(tiny_folder))
    assert str(tiny_folder) in str(info.value) and "complete CLIPModel checkpoint" in str(info.value)


def test_config_that_mismatches_the_weights_is_refused(tiny_folder):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["projection_dim"] = 8
    (tiny_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KPLInputError, match=str(tiny_folder.name)):
        _load_quietly(str(tiny_folder))


def test_non_clip_checkpoint_is_refused(tiny_folder):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["model_type"] = "siglip"
    (tiny_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KPLInputError, match="'siglip' checkpoint, not a CLIP"):
        _load_quietly(str(tiny_folder))


def test_bad_models_fail_fast_with_a_clear_message(tmp_path, tiny_folder, monkeypatch):
    with pytest.raises(KPLInputError, match="not found.*standin"):
        _load_quietly(str(tmp_path / "no-such-model"))
    with pytest.raises(KPLInputError, match="cannot load CLIP checkpoint.*no weight file.*--model standin"):
        _load_quietly(str(tmp_path))                                        # exists, holds no checkpoint
    (tiny_folder / "model.safetensors").unlink()
    with pytest.raises(KPLInputError, match="no weight file"):
        _load_quietly(str(tiny_folder))
    with pytest.raises(KPLInputError, match="cannot load CLIP checkpoint 'not a valid id'"):
        _load_quietly("not a valid id")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KPLInputError, match="not in the local Hugging Face cache and offline mode is on"):
        _load_quietly("kpl-test-org/no-such-clip")
    with pytest.raises(KPLInputError, match="dtype"):
        load_encoder("standin", dtype="float16")
    with pytest.raises(KPLInputError, match="batch_size"):
        load_encoder("standin", batch_size=0)
    with pytest.raises(KPLInputError, match="model"):
        load_encoder("")


def test_unreachable_hub_answers_once_without_retries(monkeypatch, tmp_path):
    """No network and HF_HUB_OFFLINE unset: one request to the hub, no retry loop (here: a closed local port)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    requests = []
    import huggingface_hub.utils._http as http

    real = http.http_backoff
    monkeypatch.setattr(http, "http_backoff", lambda *a, **k: requests.append(1) or real(*a, **k))
    with pytest.raises(KPLInputError, match="hub did not answer"):
        _load_quietly("kpl-test-org/no-such-clip")
    monkeypatch.setenv("KPL_MODEL", "kpl-test-org/no-such-clip")
    with pytest.warns(StandInWarning, match="no-such-clip.*hub did not answer"):
        assert load_encoder("auto").identity.is_standin
    assert len(requests) == 2


def _fake_hub_cache(root, repo_id: str, files_from, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache holding one snapshot of ``repo_id`` (huggingface_hub's layout: refs/main → commit)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)
    return commit


def test_hub_id_in_the_local_cache_loads_offline_with_its_commit(tiny_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)   # a regression fails fast instead of downloading
    commit = _fake_hub_cache(tmp_path / "hf", "kpl-test-org/tiny-clip", tiny_folder)
    monkeypatch.setenv("KPL_MODEL", "kpl-test-org/tiny-clip")
    explicit, auto = _load_quietly("kpl-test-org/tiny-clip"), _load_quietly("auto")
    for enc in (explicit, auto):
        assert enc.identity == EncoderIdentity("kpl-test-org/tiny-clip", commit, False)
    assert torch.equal(explicit.encode_texts(TEXTS), _load_quietly(str(tiny_folder)).encode_texts(TEXTS))
    next((tmp_path / "hf").rglob("model.safetensors")).unlink()           # only config/tokenizer cached
    with pytest.warns(StandInWarning, match="kpl-test-org/tiny-clip"):
        assert load_encoder("auto").identity.is_standin


# --------------------------------------------------------------------------------------------------- auto
def test_auto_loads_the_configured_checkpoint_without_warning(tiny_folder, monkeypatch):
    monkeypatch.setenv("KPL_MODEL", str(tiny_folder))
    enc = _load_quietly("auto")
    assert not enc.identity.is_standin and enc.identity.name == str(tiny_folder)


@pytest.mark.parametrize("bad", ["missing-folder", "empty-folder", "hub-id", "no-weights"])
def test_auto_falls_back_to_the_standin_with_a_loud_warning(tmp_path, tiny_folder, monkeypatch, bad):
    if bad == "no-weights":
        (tiny_folder / "model.safetensors").unlink()
    (tmp_path / "empty").mkdir()
    target = {"missing-folder": str(tmp_path / "no-such-model"), "empty-folder": str(tmp_path / "empty"),
              "hub-id": "kpl-test-org/no-such-clip", "no-weights": str(tiny_folder)}[bad]
    monkeypatch.setenv("KPL_MODEL", target)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(StandInWarning, match="UNTRAINED STAND-IN.*meaningless.*could not load.*KPL_MODEL"):
        enc = load_encoder("auto")
    assert enc.identity.is_standin and enc.identity.label == STANDIN_LABEL


def test_kpl_model_standin_selects_it_loudly(monkeypatch):
    monkeypatch.setenv("KPL_MODEL", "standin")
    with pytest.warns(StandInWarning, match="KPL_MODEL=standin"):
        assert load_encoder("auto").identity.is_standin


# --------------------------------------------------------------------------------------------------- encoding
def test_batching_and_image_modes_do_not_change_results(standin):
    ims = _images(7, seed=3, size=(64, 80))
    ref = standin.encode_images(ims, batch_size=32)
    for bs in (1, 3):
        torch.testing.assert_close(standin.encode_images(ims, batch_size=bs, progress=True), ref, atol=1e-5, rtol=0)
    gray = [im.convert("L") for im in ims[:2]]
    torch.testing.assert_close(standin.encode_images(gray), standin.encode_images([g.convert("RGB") for g in gray]),
                               atol=1e-6, rtol=0)
    assert standin.encode_images([]).shape == (0, 256) and standin.encode_texts([]).shape == (0, 256)


def test_generators_are_consumed_a_batch_at_a_time(tiny_folder, monkeypatch):
    enc = _load_quietly(str(tiny_folder), batch_size=100)
    ims = _images(1234, size=(8, 8))       # more than the first output block (1024 rows) of a generator
    consumed, ahead = [], []

    def images():
        for i, im in enumerate(ims):
            consumed.append(i)
            yield im

    real = enc.model.get_image_features
    monkeypatch.setattr(enc.model, "get_image_features",
                        lambda **kw: ahead.append(len(consumed) - 100 * len(ahead)) or real(**kw))
    lazy = enc.encode_images(images())
    assert len(ahead) == 13 and max(ahead) <= 100          # never more than one batch decoded ahead of the model
    assert lazy.shape == (1234, 16) and torch.equal(lazy, enc.encode_images(ims))


def test_invalid_inputs_are_named(standin, tmp_path):
    path = tmp_path / "x.png"
    _images(1)[0].save(path)
    with pytest.raises(KPLInputError, match=r"images\[1\] is a PosixPath.*read_image"):
        standin.encode_images([_images(1)[0], path])
    with pytest.raises(KPLInputError, match="batch_size"):
        standin.encode_images(_images(1), batch_size=0)
    with pytest.raises(KPLInputError, match="strings"):
        standin.encode_texts(["ok", 3])
    with pytest.raises(KPLInputError, match="kind"):
        standin.namespace("audio")


def test_bfloat16_is_close_to_float32(standin):
    bf = _standin(dtype="bfloat16")
    assert bf.namespace()["dtype"] == "bfloat16" and bf.namespace() != standin.namespace()
    ims = _images(8, seed=5, size=(224, 224))
    a, b = standin.encode_images(ims), bf.encode_images(ims)
    assert b.dtype == torch.float32 and torch.allclose(b.norm(dim=1), torch.ones(8), atol=1e-5)
    assert not torch.equal(a, b)                                   # bf16 autocast really ran
    # measured: 1 - cos <= 9.3e-6 (images), 4.5e-5 (texts); centred cos >= 0.9992 (images), 0.9997 (texts)
    assert (1 - (a * b).sum(1)).max() < 1e-3
    ca, cb = a - a.mean(0), b - b.mean(0)          # the untrained model's embeddings share a large common direction
    assert torch.nn.functional.cosine_similarity(ca, cb).min() > 0.99
    texts = [f"a photo of a {c}, which has {d}" for c in ("cat", "glioma") for d in ("round cells", "a dark rim")]
    ta, tb = standin.encode_texts(texts), bf.encode_texts(texts)
    assert not torch.equal(ta, tb) and (1 - (ta * tb).sum(1)).max() < 1e-3


def test_token_lengths_and_truncation_as_clip_does(standin):
    assert standin.token_lengths(["a photo of a cat"]) == [7]                # start + 5 words + end
    long = "a photo of a glioma, which has " + "a very irregular enhancing rim and " * 12 + "edema"
    assert standin.token_lengths([long])[0] > 77
    e = standin.encode_texts([long + " and calcification", long + " and haemorrhage", TEXTS[0]], batch_size=2)
    assert torch.equal(e[0], e[1]) and not torch.equal(e[0], e[2])        # text beyond the context changes nothing
    ids = standin.tokenizer([long], truncation=True, max_length=77)["input_ids"][0]
    assert len(ids) == 77 and ids[-1] == standin.tokenizer.eos_token_id


def test_namespaces_say_what_changes_an_embedding(standin, tmp_path, monkeypatch):
    image, text = standin.namespace(), standin.namespace("text")
    assert image["kind"] == "image" and text["kind"] == "text"
    for ns in (image, text):
        assert {ns["model"], ns["revision"], ns["is_standin"], ns["dtype"]} == {"standin", standin.identity.revision,
                                                                               True, "float32"}
        json.dumps(ns)                                             # JSON-serialisable (the store digests it)
    assert image["preprocessing"]["processor"] == "CLIPImageProcessorPil" and "tokenizer" not in image
    assert text["context_length"] == 77 and len(text["tokenizer"]) == 64
    # same weights, another tokenizer (two BPE merges swapped in rank) → another text namespace
    copy = tmp_path / "tokenizer"
    shutil.copytree(paths.tokenizer_dir(), copy)
    monkeypatch.setenv("KPL_TOKENIZER_DIR", str(copy))
    assert _standin().namespace("text") == text
    merges = copy / "merges.txt"
    lines = merges.read_text(encoding="utf-8").splitlines()
    first = 1 if lines[0].startswith("#") else 0
    lines[first], lines[-1] = lines[-1], lines[first]
    merges.write_text("\n".join(lines) + "\n", encoding="utf-8")
    changed = _standin()
    assert changed.identity == standin.identity and changed.namespace() == image
    assert changed.namespace("text") != text
