"""kplib's CPU image forwards (float32, and bfloat16 opt-in) compute what transformers' CLIP forward computes, and are
chosen as documented."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kplib import vision_forward as vf
from kplib.encoders import ClipEncoder, EncoderIdentity, load_clip_tokenizer, standin_image_processor, weights_digest
from kplib.errors import KPLInputError

VIT_B16 = dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072, patch_size=16,
               image_size=224, projection_dim=512)   # ViT-B/16's layer shapes (2 of its 12 layers, to stay quick)
SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256, patch_size=32,
             image_size=224, projection_dim=32)


def _randomise(model, seed: int = 0):
    """transformers initialises biases to 0 and layer norms to (1, 0): that would hide a wrong bias or layer-norm
    treatment. Give every parameter random values of a realistic size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if ("norm" in name and name.endswith("weight")) else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if scale == 0.5 else 0.0))
    return model


def _tower(cfg: dict, act: str, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return _randomise(CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg, hidden_act=act)).eval(), seed)


def _clip(act: str = "quick_gelu", seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(projection_dim=32, vision_config={**SMALL, "hidden_act": act},
                     text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, projection_dim=32))
    return _randomise(CLIPModel(cfg).eval(), seed)


def _reference(model, pixels):
    with torch.inference_mode():
        if hasattr(model, "get_image_features"):                # CLIPModel
            return model.get_image_features(pixel_values=pixels).pooler_output
        return model(pixel_values=pixels).image_embeds            # CLIPVisionModelWithProjection


@pytest.mark.parametrize("cfg,act", [(SMALL, "quick_gelu"), (SMALL, "gelu"), (VIT_B16, "quick_gelu")],
                         ids=["small-quick_gelu", "small-gelu", "vit_b16-quick_gelu"])
def test_image_features_equal_transformers(cfg, act):
    model = _tower(cfg, act)
    pixels = torch.randn(3, 3, cfg["image_size"], cfg["image_size"], generator=torch.Generator().manual_seed(1))
    before = weights_digest(model)
    ref = _reference(model, pixels)
    got = vf.image_features(model, pixels, act)
    assert got.shape == ref.shape
    assert ref.abs().max() > 0.1                             # a real signal, not zeros
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert F.cosine_similarity(got, ref).min() > 0.99999
    assert weights_digest(model) == before                   # the in-place work never touches the weights


def test_wrong_activation_is_detected():
    """The check has teeth: running a gelu tower as quick_gelu changes the features."""
    model = _tower(SMALL, "gelu")
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    diff = (vf.image_features(model, pixels, "quick_gelu") - _reference(model, pixels)).abs().max()
    assert diff > 1e-3
    with pytest.raises(ValueError, match="relu"):
        vf.image_features(model, pixels, "relu")


def test_unsupported_reasons():
    assert vf.unsupported_reason("quick_gelu", "cpu", "float32") is None
    assert vf.unsupported_reason("gelu", torch.device("cpu"), "float32") is None
    assert vf.unsupported_reason("quick_gelu", "cpu", "bfloat16") is None
    assert "float16" in vf.unsupported_reason("quick_gelu", "cpu", "float16")
    assert "cuda" in vf.unsupported_reason("quick_gelu", "cuda", "float32")
    assert "relu" in vf.unsupported_reason("relu", "cpu", "float32")


def _encoder(model, **kw) -> ClipEncoder:
    return ClipEncoder(model, load_clip_tokenizer(), standin_image_processor(),
                       EncoderIdentity("test-clip", None, False), **kw)


def test_encoder_chooses_the_forward_and_records_it():
    model = _clip()
    enc = _encoder(model)
    assert enc.vision_forward == "kplib"
    assert enc.fingerprint()["vision_forward"] == vf.NAME
    other = _encoder(model, vision_forward="transformers")
    assert other.fingerprint()["vision_forward"] == "transformers"
    assert other.fingerprint() != enc.fingerprint()          # separate cache namespaces
    bf = _encoder(model, dtype="bfloat16")
    assert bf.vision_forward == "kplib" and bf.fingerprint()["vision_forward"] == vf.NAME_BF16
    assert _encoder(model, dtype="bfloat16", vision_forward="transformers").fingerprint() != bf.fingerprint()
    assert "vision_forward='kplib'" in repr(enc)

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)) for _ in range(5)]
    a = enc.encode_images(images, batch_size=2, progress=False)
    b = other.encode_images(images, batch_size=2, progress=False)
    assert F.cosine_similarity(a, b).min() > 0.99999
    torch.testing.assert_close(a.norm(dim=1), torch.ones(5))


def test_explicit_kplib_forward_refuses_what_it_cannot_serve():
    relu = _clip(act="relu")
    assert _encoder(relu).vision_forward == "transformers"   # auto: transformers' forward
    with pytest.raises(KPLInputError, match="relu"):
        _encoder(relu, vision_forward="kplib")
    with pytest.raises(KPLInputError, match="vision_forward"):
        _encoder(_clip(), vision_forward="fast")
    enc = _encoder(_clip())
    enc.vision_forward = "transformers"                      # settable before encoding
    assert enc.fingerprint()["vision_forward"] == "transformers"


def test_a_model_of_another_shape_is_refused_by_name():
    model = _clip()
    del model.vision_model.encoder.layers[0].mlp.fc2
    with pytest.raises(KPLInputError, match=r"layers\[0\]\.mlp\.fc2.*vision_forward='transformers'"):
        _encoder(model)
    assert _encoder(model, vision_forward="transformers").vision_forward == "transformers"


# ---------------------------------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("cfg,act", [(SMALL, "quick_gelu"), (SMALL, "gelu"), (VIT_B16, "quick_gelu")],
                         ids=["small-quick_gelu", "small-gelu", "vit_b16-quick_gelu"])
def test_bf16_features_are_closer_to_float32_than_autocast(cfg, act):
    """The bfloat16 forward computes the same function in lower precision: every image's features point where the
    float32 ones do, at least as closely as transformers' forward under autocast (the library's previous bf16 path),
    and not bit for bit (bfloat16 really ran)."""
    model = _tower(cfg, act)
    pixels = torch.randn(5, 3, cfg["image_size"], cfg["image_size"], generator=torch.Generator().manual_seed(3))
    before = weights_digest(model)
    ref = _reference(model, pixels)
    got = vf.image_features_bf16(model, vf.bf16_weights(model), pixels, act)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(pixel_values=pixels).image_embeds.float()
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert not torch.equal(got, ref)
    cos, cos_auto = F.cosine_similarity(got, ref), F.cosine_similarity(auto, ref)
    # measured (max 1 - cos): 1.7e-6, 1.6e-6, 3.6e-5 here; autocast 6.3e-6, 9.1e-6, 3.5e-5
    assert cos.min() > 0.999
    assert (1 - cos).max() <= 1.5 * (1 - cos_auto).max()
    assert weights_digest(model) == before


def test_bf16_attention_groups_give_the_same_result(monkeypatch):
    """Attention runs a few images at a time (so the scores stay in cache); the grouping changes nothing."""
    model = _tower(SMALL, "quick_gelu")
    weights = vf.bf16_weights(model)
    pixels = torch.randn(5, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    whole = vf.image_features_bf16(model, weights, pixels)
    monkeypatch.setattr(vf, "ATTENTION_SCORES_BYTES", 1)          # one image per group
    torch.testing.assert_close(vf.image_features_bf16(model, weights, pixels), whole, rtol=0, atol=0)


def test_bf16_encoder_uses_kplib_forward_and_casts_weights_once(monkeypatch):
    model = _clip()
    enc = _encoder(model, dtype="bfloat16")
    casts = []
    real = vf.bf16_weights
    monkeypatch.setattr(vf, "bf16_weights", lambda m: casts.append(m) or real(m))
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(5)]
    a = enc.encode_images(images, batch_size=2, progress=False)
    assert len(casts) == 1                                        # three batches, one cast
    b = _encoder(model).encode_images(images, batch_size=2, progress=False)
    assert F.cosine_similarity(a, b).min() > 0.999
    assert not torch.equal(a, b)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(5))
