"""CLIP-DN and WaffleCLIP (kplib.method.baselines): reductions, invariances, proxies, seeded descriptors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kplib.errors import KPLInputError
from kplib.method.baselines import (
    CLIPDNConfig,
    clip_dn,
    random_descriptors,
    waffle_clip,
    waffle_proxies,
)


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_clip_dn_is_zero_shot_when_both_means_are_zero():
    a, b = _unit(20, 16, seed=1), _unit(3, 16, seed=2)
    x, t = torch.cat([a, -a]), torch.cat([b, -b])  # mean zero by construction, unit rows
    assert x.mean(0).abs().max() < 1e-15 and t.mean(0).abs().max() < 1e-15
    for renormalize in (False, True):
        res = clip_dn(x, t, renormalize=renormalize)
        assert torch.allclose(res.logits, x @ t.T, atol=1e-12)
        assert torch.equal(res.predictions, (x @ t.T).argmax(1))
    # and for any inputs when nothing is subtracted
    x, t = _unit(30, 16, seed=3), _unit(5, 16, seed=4)
    assert torch.allclose(clip_dn(x, t, fraction=0.0).logits, x @ t.T, atol=1e-12)


def test_clip_dn_formula_means_and_the_terms_it_is_invariant_to():
    x, t = _unit(40, 16, seed=5) + 0.8 * _unit(16, seed=6), _unit(6, 16, seed=7) - 0.5 * _unit(16, seed=8)
    x, t = F.normalize(x, dim=1), F.normalize(t, dim=1)
    mu_x, mu_t = x.mean(0), t.mean(0)
    res = clip_dn(x, t)  # a = 1/2, means estimated from the inputs
    assert torch.allclose(res.meta["image_mean"], mu_x) and torch.allclose(res.meta["text_mean"], mu_t)
    assert torch.allclose(res.logits, (x - mu_x / 2) @ (t - mu_t / 2).T, atol=1e-12)
    assert torch.allclose(res.proxies, t - mu_t / 2)
    renorm = clip_dn(x, t, renormalize=True, fraction=0.25)
    assert torch.allclose(renorm.logits, F.normalize(x - mu_x / 4, dim=1) @ F.normalize(t - mu_t / 4, dim=1).T)
    # without re-normalisation the text mean only shifts each image's logits by a constant: predictions unchanged
    for seed in range(3):
        other = clip_dn(x, t, text_mean=3.0 * _unit(16, seed=20 + seed))
        shift = other.logits - res.logits
        assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-12)
        assert torch.equal(other.predictions, res.predictions)
    # the image mean is the term DN adds: it enters as -a mu_x . (t_c - a mu_t), a per-class offset
    given = clip_dn(x, t, image_mean=torch.zeros(16))
    offset = (mu_x / 2 @ (t - mu_t / 2).T).expand(40, 6)
    assert torch.allclose(given.logits - res.logits, offset, atol=1e-12) and offset.std() > 1e-3


def test_clip_dn_input_errors():
    x, t = _unit(10, 8), _unit(3, 8, seed=1)
    with pytest.raises(KPLInputError, match="fraction"):
        clip_dn(x, t, fraction=1.5)
    with pytest.raises(KPLInputError, match="image_mean"):
        clip_dn(x, t, image_mean=torch.zeros(7))
    with pytest.raises(KPLInputError, match="columns"):
        clip_dn(x, _unit(3, 9))
    with pytest.raises(KPLInputError, match="fraction must be"):
        CLIPDNConfig(fraction=-0.1)


def test_waffle_proxies_are_unit_norm_class_means():
    prompts = [_unit(m, 12, seed=m) for m in (5, 7, 3)]
    proxies = waffle_proxies(prompts)
    means = torch.stack([p.mean(0) for p in prompts])
    assert proxies.shape == (3, 12)
    assert torch.allclose(proxies.norm(dim=1), torch.ones(3, dtype=proxies.dtype))
    assert torch.allclose(proxies, means / means.norm(dim=1, keepdim=True))
    assert torch.allclose(waffle_proxies(prompts, normalize=False), means)
    # rows are taken as unit vectors: scaling a prompt embedding changes nothing
    scaled = [p * torch.linspace(1, 3, len(p), dtype=p.dtype)[:, None] for p in prompts]
    assert torch.allclose(waffle_proxies(scaled), proxies)
    # a (C, M, d) tensor works too
    same = torch.stack([_unit(4, 12, seed=c) for c in range(3)])
    assert torch.allclose(waffle_proxies(same), F.normalize(same.mean(1), dim=1))


def test_waffle_clip_scores_images_against_the_proxies_and_matches_the_papers_score_average():
    prompts = [_unit(6, 12, seed=10 + c) for c in range(4)]
    x = _unit(25, 12, seed=99)
    res = waffle_clip(x, prompts)
    assert torch.allclose(res.logits, x @ waffle_proxies(prompts).T)
    assert res.meta["prompts_per_class"] == [6, 6, 6, 6]
    averaged = waffle_clip(x, prompts, normalize=False)  # the paper: mean over prompts of the cosine scores
    per_prompt = torch.stack([(x @ p.T).mean(1) for p in prompts], dim=1)
    assert torch.allclose(averaged.logits, per_prompt)
    with pytest.raises(KPLInputError):
        waffle_clip(x, [prompts[0], prompts[1][:0]])  # a class without prompts


def test_random_descriptors_are_reproducible_from_the_seed():
    first = random_descriptors(30, seed=7)
    assert first == random_descriptors(30, seed=7)
    assert first != random_descriptors(30, seed=8)
    assert len(first) == 30 and len(set(first)) == 30
    assert random_descriptors(10, seed=7) == first[:10]  # a prefix of the same stream


def test_random_descriptor_kinds_and_lengths():
    words = random_descriptors(40, (2, 4), kind="words", word_length=(3, 6), seed=1)
    for text in words:
        parts = text.split(" ")
        assert 2 <= len(parts) <= 4 and all(3 <= len(p) <= 6 and p.isalpha() and p.islower() for p in parts)
    chars = random_descriptors(40, kind="characters", seed=1)
    assert all(" " not in c and c.isalnum() for c in chars)
    assert any(ch.isdigit() for c in chars for ch in c)
    mixed = random_descriptors(20, seed=1)
    assert all(" " in m for m in mixed[0::2]) and all(" " not in m for m in mixed[1::2])
    counts = [1, 3, 5, 2]
    matched = random_descriptors(4, kind="words", word_counts=counts, seed=2)
    assert [len(m.split(" ")) for m in matched] == counts
    with pytest.raises(KPLInputError, match="word_counts"):
        random_descriptors(3, word_counts=[1, 2])
    with pytest.raises(KPLInputError, match="kind"):
        random_descriptors(3, kind="emoji")
    with pytest.raises(KPLInputError, match="n_words"):
        random_descriptors(3, (4, 2))
    with pytest.raises(KPLInputError, match="n must be"):
        random_descriptors(0)
