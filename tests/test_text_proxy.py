"""Stage 1 (TPO) against naive loop oracles written from kpl-method.md, plus input validation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kplib.errors import KPLInputError
from kplib.text_proxy import build_text_proxies, per_image_text_logits, score_descriptions


def _world(seed=0, n=40, d=12, m=(9, 3, 6)):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    descs = [F.normalize(torch.randn(mc, d, generator=g, dtype=torch.float64), dim=1) for mc in m]
    return x, descs


def _oracle_scores(x, descs):
    n = x.shape[0]
    out = []
    for t in descs:
        s = []
        for m in range(t.shape[0]):
            s.append(sum(float(x[i] @ t[m]) for i in range(n)) / n)
        out.append(s)
    return out


def test_scores_match_naive_mean_over_images():
    x, descs = _world()
    got = score_descriptions(x, descs)
    want = _oracle_scores(x, descs)
    for g, w in zip(got, want):
        assert torch.allclose(g, torch.tensor(w, dtype=g.dtype), atol=1e-12)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_text_proxies_are_normalised_mean_of_top_k(k):
    x, descs = _world(seed=1)
    tp = build_text_proxies(x, descs, k=k)
    want_scores = _oracle_scores(x, descs)
    assert tp.proxies.shape == (3, 12)
    for c, t in enumerate(descs):
        order = sorted(range(t.shape[0]), key=lambda m: -want_scores[c][m])
        kc = min(k, t.shape[0])  # K' = min(K, M_c)
        assert tp.selected[c].tolist() == order[:kc]
        mean = sum(t[m] for m in order[:kc]) / kc
        assert torch.allclose(tp.proxies[c], mean / mean.norm(), atol=1e-12)
    assert torch.allclose(tp.proxies.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_per_image_logits_match_naive_loop_across_chunk_boundaries():
    x, descs = _world(seed=2, n=23)
    k = 3
    got = per_image_text_logits(x, descs, k=k, chunk_size=7)
    for i in range(x.shape[0]):
        for c, t in enumerate(descs):
            sims = [float(t[m] @ x[i]) for m in range(t.shape[0])]
            top = sorted(range(len(sims)), key=lambda m: -sims[m])[: min(k, len(sims))]
            mean = sum(t[m] for m in top) / len(top)
            want = float(x[i] @ mean) / float(mean.norm())
            assert math.isclose(float(got[i, c]), want, abs_tol=1e-10)


def test_per_image_with_large_k_equals_dataset_level_all_descriptions():
    # when K >= M_c every image keeps every description: identical to the dataset-level proxies with K = max M_c
    x, descs = _world(seed=3)
    got = per_image_text_logits(x, descs, k=50)
    tp = build_text_proxies(x, descs, k=50)
    assert torch.allclose(got, x @ tp.proxies.T, atol=1e-10)


def test_float32_inputs_and_dtype():
    x, descs = _world(seed=4)
    tp = build_text_proxies(x.float(), [d.float() for d in descs])
    assert tp.proxies.dtype == torch.float32


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda x, d: (x, d, 0), "k must be an integer >= 1"),
        (lambda x, d: (x * 2, d, 8), "image_embeddings rows must be L2-normalised"),
        (lambda x, d: (x, [d[0], d[1][:0], d[2]], 8), "class 1 has no descriptions"),
        (lambda x, d: (x, [d[0][:, :5], d[1], d[2]], 8), "expected 12"),
        (lambda x, d: (torch.where(torch.arange(x.numel()).view_as(x) == 3, math.nan, x), d, 8), "NaN/Inf"),
        (lambda x, d: (x[0], d, 8), "must be 2-D"),
        (lambda x, d: (x, [], 8), "non-empty list"),
    ],
)
def test_bad_inputs_raise_informative_errors(mutate, fragment):
    x, descs = _world()
    xx, dd, k = mutate(x, descs)
    with pytest.raises(KPLInputError, match=None) as info:
        build_text_proxies(xx, dd, k=k)
    assert fragment in str(info.value)
