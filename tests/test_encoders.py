"""Encoders: the real from_pretrained path (through a saved tiny CLIP), the stand-in, batching, bf16, prompt lengths."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kplib import config
from kplib.encoders import (
    STANDIN_LABEL,
    ClipEncoder,
    EncoderIdentity,
    PromptTruncationWarning,
    _unit,
    build_standin_model,
    checkpoint_files_digest,
    load_clip_tokenizer,
    load_encoder,
    weights_digest,
)
from kplib.errors import ImageDecodeError, KPLInputError, StandInWarning


def _images(n: int, seed: int = 0, size=(40, 52)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def standin() -> ClipEncoder:
    with pytest.warns(StandInWarning):
        return load_encoder("standin")


def _tiny_clip(seed: int = 1):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        projection_dim=16,
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, projection_dim=16),
    )
    torch.manual_seed(seed)
    return CLIPModel(cfg).eval()


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny random CLIP saved exactly as users' checkpoints are: model, tokenizer, image processor."""
    from transformers import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-clip")
    model = _tiny_clip()
    tokenizer = load_clip_tokenizer()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, tokenizer, processor


# ----------------------------------------------------------------------------------------------- real path
def test_save_pretrained_roundtrip_gives_identical_embeddings(saved_tiny):
    folder, model, tokenizer, processor = saved_tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error", StandInWarning)  # the real path must never fall back
        loaded = load_encoder(str(folder))
    assert not loaded.identity.is_standin
    assert loaded.identity.name == str(folder)
    assert loaded.identity.label == str(folder)
    assert loaded.identity.revision == "files-" + checkpoint_files_digest(folder)  # config + weight file bytes
    assert loaded.context_length == 77 and loaded.embed_dim == 16
    assert loaded.preprocessing["crop_size"] == {"height": 32, "width": 32}

    memory = ClipEncoder(model, tokenizer, processor, EncoderIdentity("memory", None, False))
    ims = _images(5)
    a = loaded.encode_images(ims, batch_size=2, progress=False)
    b = memory.encode_images(ims, batch_size=2, progress=False)
    assert a.shape == (5, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    texts = ["a photo of a cat.", "a photo of a glioma, which has an infiltrative mass"]
    assert torch.equal(loaded.encode_texts(texts), memory.encode_texts(texts))

    # independent of kplib's plumbing: transformers' own calls give the same unit vectors
    with torch.inference_mode():
        pix = processor(images=ims, return_tensors="pt")["pixel_values"]
        out = model.get_image_features(pixel_values=pix)
    ref = torch.nn.functional.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=0)
    assert torch.allclose(a.norm(dim=1), torch.ones(5), atol=1e-5)


def test_unaligned_weights_are_realigned_so_embeddings_do_not_depend_on_addresses(saved_tiny):
    """Weights mapped from a safetensors file sit at arbitrary 4-byte offsets; CPU matrix products round
    differently there. The encoder copies such tensors to aligned memory, so the embeddings equal those of the same
    weights built in memory (the round-trip test above depends on it)."""
    folder, model, tokenizer, processor = saved_tiny
    import copy

    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p in shifted.parameters():   # every weight at a 4-byte offset from the allocator's 64-byte alignment
            block = torch.empty(p.numel() + 1, dtype=p.dtype)
            view = block[1:].view_as(p)
            view.copy_(p.data)
            p.data = view
    assert all(p.data_ptr() % 64 == 4 for p in shifted.parameters())
    enc = ClipEncoder(shifted, tokenizer, processor, EncoderIdentity("shifted", None, False))
    assert all(t.data_ptr() % 64 == 0 for t in (*enc.model.parameters(), *enc.model.buffers()) if t.numel())
    for p, q in zip(enc.model.parameters(), model.parameters()):
        assert torch.equal(p, q)   # values untouched
    memory = ClipEncoder(model, tokenizer, processor, EncoderIdentity("memory", None, False))
    ims = _images(5)
    assert torch.equal(enc.encode_images(ims, batch_size=2, progress=False),
                       memory.encode_images(ims, batch_size=2, progress=False))


def test_auto_loads_configured_real_model_without_warning(saved_tiny, monkeypatch):
    folder, model, *_ = saved_tiny
    monkeypatch.setenv("KPL_MODEL", str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StandInWarning)
        enc = load_encoder("auto")
    assert not enc.identity.is_standin and enc.identity.name == str(folder)


@pytest.mark.parametrize("bad", ["missing-folder", "empty-folder", "hub-id"])
def test_auto_falls_back_to_standin_with_loud_warning(tmp_path, monkeypatch, bad):
    target = {"missing-folder": str(tmp_path / "no-such-model"), "empty-folder": str(tmp_path),
              "hub-id": "kpl-test-org/no-such-clip"}[bad]
    monkeypatch.setenv("KPL_MODEL", target)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub id case must not wait for the network
    with pytest.warns(StandInWarning, match="UNTRAINED STAND-IN.*meaningless.*could not load"):
        enc = load_encoder("auto")
    assert enc.identity.is_standin
    assert enc.identity.label == STANDIN_LABEL
    assert "meaningless" in enc.identity.label and "UNTRAINED" in enc.identity.label


def test_auto_hub_id_offline_falls_back_without_waiting_for_the_hub(monkeypatch):
    import kplib.encoders as E

    # a hub id in no local cache (the default model might be cached on a developer's machine)
    monkeypatch.setenv("KPL_MODEL", "kpl-test-org/no-such-clip")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    monkeypatch.setattr(E, "_hub_reachable", lambda *a, **k: calls.append(1) or False)
    with pytest.warns(StandInWarning, match="kpl-test-org/no-such-clip.*unreachable"):
        enc = load_encoder("auto")
    assert enc.identity.is_standin and calls == [1]


def test_incomplete_checkpoint_is_refused(saved_tiny, tmp_path):
    """transformers would silently fill missing weights with random values; kplib refuses."""
    import shutil

    folder, model, *_ = saved_tiny
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    sd = {k: v for k, v in model.state_dict().items() if k != "text_projection.weight"}
    model.save_pretrained(broken, state_dict=sd)
    enc = load_encoder(str(broken))  # weights are loaded (and checked) on first encode
    with pytest.raises(KPLInputError, match="text_projection"):
        enc.encode_texts(["a photo of a cat."])


def test_explicit_bad_model_raises_without_fallback(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", StandInWarning)
        with pytest.raises(KPLInputError, match="not found"):
            load_encoder(str(tmp_path / "no-such-model"))
        with pytest.raises(KPLInputError, match=r"cannot load CLIP checkpoint .*standin"):
            load_encoder(str(tmp_path))  # exists, but holds no checkpoint
    with pytest.raises(KPLInputError, match="dtype"):
        load_encoder("standin", dtype="float16")
    with pytest.raises(KPLInputError, match="model"):
        load_encoder("")


# ----------------------------------------------------------------------------------------------- stand-in
def test_standin_is_deterministic_and_leaves_global_rng_alone(standin):
    state = torch.random.get_rng_state()
    a, b = build_standin_model(0), build_standin_model(0)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert weights_digest(a) == weights_digest(b) != weights_digest(build_standin_model(1))
    assert standin.identity.revision == "weights-" + weights_digest(a)
    # same architecture facts as documented: real tokenizer vocabulary and context, 224 px input
    assert standin.context_length == 77 and standin.tokenizer.vocab_size == 49408
    assert standin.preprocessing["crop_size"] == {"height": 224, "width": 224}
    with pytest.warns(StandInWarning):
        again = load_encoder("standin")
    ims = _images(3, size=(230, 260))
    assert torch.equal(standin.encode_images(ims, progress=False), again.encode_images(ims, progress=False))
    assert torch.equal(standin.encode_texts(["a photo of a cell."]), again.encode_texts(["a photo of a cell."]))


def test_batching_and_prefetch_do_not_change_results(standin):
    ims = _images(7, seed=3, size=(64, 80))
    ref = standin.encode_images(ims, batch_size=32, progress=False, num_workers=0)
    for bs, nw in [(1, 0), (3, 1), (2, 2)]:
        out = standin.encode_images(ims, batch_size=bs, progress=False, num_workers=nw)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_bounded_prefetch(standin, monkeypatch):
    """Decoding runs ahead of the model by at most num_workers + 1 batches (memory does not grow with N)."""
    decoded, consumed, ahead = [0], [0], []
    real_load, real_pixels = ClipEncoder._load_chunk, ClipEncoder.encode_pixels

    def load(self, images, chunk):
        out = real_load(self, images, chunk)
        decoded[0] += 1
        return out

    def pixels(self, pix):
        consumed[0] += 1
        ahead.append(decoded[0] - consumed[0])
        return real_pixels(self, pix)

    monkeypatch.setattr(ClipEncoder, "_load_chunk", load)
    monkeypatch.setattr(ClipEncoder, "encode_pixels", pixels)
    standin.encode_images(_images(12, size=(32, 32)), batch_size=1, progress=False, num_workers=1)
    assert consumed[0] == 12 and max(ahead) <= 2


def test_bfloat16_is_close_to_float32(standin):
    with pytest.warns(StandInWarning):
        bf = load_encoder("standin", dtype="bfloat16")
    ims = _images(8, seed=5, size=(224, 224))
    a, b = standin.encode_images(ims, progress=False), bf.encode_images(ims, progress=False)
    assert b.dtype == torch.float32 and torch.allclose(b.norm(dim=1), torch.ones(8), atol=1e-5)
    assert not torch.equal(a, b)  # bf16 really ran (images: kplib's bf16 forward; texts: autocast)
    assert bf.vision_forward == "kplib"
    # measured: 1 - cos <= 3.7e-6 (images; 8.2e-6 under autocast), 6e-5 (texts); centred cos >= 0.9997 (images).
    # Thresholds keep a 10x margin.
    assert (1 - (a * b).sum(1)).max() < 1e-3
    ca, cb = a - a.mean(0), b - b.mean(0)  # the untrained model's embeddings share a large common direction
    assert torch.nn.functional.cosine_similarity(ca, cb).min() > 0.99
    texts = [f"a photo of a {c}, which has {d}" for c in ("cat", "glioma") for d in ("round cells", "a dark rim")]
    ta, tb = standin.encode_texts(texts), bf.encode_texts(texts)
    assert (1 - (ta * tb).sum(1)).max() < 1e-3


# ----------------------------------------------------------------------------------------------- inputs
def test_paths_and_bad_files(standin, tmp_path):
    good = []
    for i, im in enumerate(_images(3, size=(30, 30))):
        p = tmp_path / f"ok{i}.png"
        im.save(p)
        good.append(p)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    from_paths = standin.encode_images(good, progress=False)
    from_pil = standin.encode_images([Image.open(p) for p in good], progress=False)
    torch.testing.assert_close(from_paths, from_pil, atol=1e-6, rtol=0)
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        standin.encode_images([good[0], bad, good[1]], progress=False)
    res = standin.encode_images_detailed([good[0], bad, good[1]], progress=False, on_error="skip")
    assert res.indices == [0, 2] and [i for i, _ in res.failures] == [1]
    torch.testing.assert_close(res.embeddings, from_paths[:2], atol=1e-6, rtol=0)
    with pytest.raises(KPLInputError, match="on_error"):
        standin.encode_images_detailed(good, on_error="ignore")
    with pytest.raises(KPLInputError, match="batch_size"):
        standin.encode_images(good, batch_size=0)


def test_long_prompts_are_reported_by_class_and_description(standin):
    assert standin.token_lengths(["a photo of a cat"]) == [7]  # BOS + 5 words + EOS
    short = "a photo of a glioma, which has an infiltrative mass"
    long = "a photo of a glioma, which has " + "a very irregular enhancing rim and " * 12 + "edema"
    labels = ["class 'glioma', description 0", "class 'glioma', description 7"]
    with pytest.warns(PromptTruncationWarning, match="class 'glioma', description 7"):
        found = standin.check_prompt_lengths([short, long], labels=labels)
    assert [p.index for p in found] == [1] and found[0].label == labels[1] and found[0].n_tokens > 77
    with pytest.raises(KPLInputError, match="description 7"):
        standin.check_prompt_lengths([short, long], labels=labels, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncationWarning)
        assert standin.check_prompt_lengths([short], labels=labels[:1]) == []
    # truncation as CLIP does it: text beyond the context changes nothing
    with pytest.warns(PromptTruncationWarning):
        e = standin.encode_texts([long + " and calcification", long + " and haemorrhage"])
    assert torch.equal(e[0], e[1])
    with pytest.raises(KPLInputError, match="labels"):
        standin.check_prompt_lengths([short], labels=labels)


def test_unit_accepts_tensors_and_model_outputs():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(_unit(x), torch.tensor([[0.6, 0.8]]))
    assert torch.allclose(_unit(BaseModelOutputWithPooling(pooler_output=x)), torch.tensor([[0.6, 0.8]]))


def test_tokenizer_comes_from_config(monkeypatch, tmp_path):
    monkeypatch.setenv("KPL_TOKENIZER_DIR", str(tmp_path / "missing"))
    with pytest.raises(KPLInputError, match="KPL_TOKENIZER_DIR"):
        config.tokenizer_dir()


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_keep_freed_memory_sets_and_restores_mallopt(monkeypatch):
    import kplib.encoders as enc

    fake = _FakeLibc()
    monkeypatch.setattr(enc, "_glibc", lambda: fake)
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "262144")
    with enc.keep_freed_memory():
        with enc.keep_freed_memory():  # nested: only the outermost use touches the allocator
            assert fake.calls == [(enc._M_MMAP_MAX, 0), (enc._M_TRIM_THRESHOLD, 1 << 30)]
        assert len(fake.calls) == 2
    restored = dict(fake.calls[2:])
    assert restored == {enc._M_MMAP_MAX: 65536, enc._M_TRIM_THRESHOLD: 262144}  # env value wins over default
    fake.calls.clear()
    with pytest.raises(RuntimeError):
        with enc.keep_freed_memory():
            raise RuntimeError("boom")
    assert len(fake.calls) == 4  # restored even when the batch loop raises


def test_keep_freed_memory_is_a_noop_off_glibc(monkeypatch):
    import kplib.encoders as enc

    monkeypatch.setattr(enc, "_glibc", lambda: None)
    with enc.keep_freed_memory():
        pass


def test_keep_freed_memory_leaves_embeddings_bit_identical(standin, monkeypatch):
    import contextlib

    import kplib.encoders as enc

    imgs = _images(10, seed=3)
    calls = []
    real = enc.keep_freed_memory

    @contextlib.contextmanager
    def spy():
        calls.append(1)
        with real():
            yield

    monkeypatch.setattr(enc, "keep_freed_memory", spy)
    with_heap = standin.encode_images(imgs, batch_size=4, progress=False, num_workers=0)
    assert calls == [1]  # the batch loop really ran inside the context manager
    monkeypatch.setattr(enc, "keep_freed_memory", contextlib.nullcontext)
    without = standin.encode_images(imgs, batch_size=4, progress=False, num_workers=0)
    assert torch.equal(with_heap, without)
