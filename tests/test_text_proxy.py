"""Stage 1 (TPO) against naive loop oracles written from kpl-method.md, plus input validation.

The reference-mode specifics of issue 17 (running-minimum K, re-normalisation, torch.topk ties) have their own
oracles in tests/test_reference_oracles.py; here: the stage's maths in both modes and its errors.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kplib.errors import KPLInputError
from kplib.method.text_proxy import TextProxies, build_text_proxies, kept_per_class, per_image_text_logits
from kplib.params import check_matrix, unit


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


@pytest.mark.parametrize("mode", ["reference", "corrected"])
def test_scores_match_naive_mean_over_images(mode):
    x, descs = _world()
    got = build_text_proxies(x, descs, k=2, mode=mode).scores
    want = _oracle_scores(x, descs)
    assert len(got) == 3
    for g, w in zip(got, want):
        assert torch.allclose(g, torch.tensor(w, dtype=g.dtype), atol=1e-12)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_text_proxies_are_normalised_mean_of_top_k(k):
    """Corrected mode (the paper's K'_c = min(K, M_c) per class)."""
    x, descs = _world(seed=1)
    tp = build_text_proxies(x, descs, k=k, mode="corrected")
    want_scores = _oracle_scores(x, descs)
    assert isinstance(tp, TextProxies)
    assert tp.proxies.shape == (3, 12) and tp.logits.shape == (40, 3)
    for c, t in enumerate(descs):
        order = sorted(range(t.shape[0]), key=lambda m: -want_scores[c][m])
        kc = min(k, t.shape[0])  # K' = min(K, M_c)
        assert tp.selected[c].tolist() == order[:kc]
        mean = sum(t[m] for m in order[:kc]) / kc
        assert torch.allclose(tp.proxies[c], mean / mean.norm(), atol=1e-12)
    assert torch.allclose(tp.proxies.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(tp.logits, x @ tp.proxies.T, atol=1e-12)
    assert torch.equal(tp.predictions, tp.logits.argmax(dim=1))


@pytest.mark.parametrize("m, k, kept",
                         [((3, 9, 6), 4, [3, 3, 3]), ((9, 3, 6), 2, [2, 2, 2]), ((5, 9, 6), 8, [5, 5, 5])])
def test_reference_mode_keeps_running_minimum_best_first(m, k, kept):
    """Reference mode: K_c = min(K, M_1..M_c) in class order, the kept descriptions best first."""
    x, descs = _world(seed=7, m=m)
    tp = build_text_proxies(x, descs, k=k, mode="reference")
    want_scores = _oracle_scores(x, descs)
    running = k
    for c, t in enumerate(descs):
        running = min(running, t.shape[0])
        assert running == kept[c]
        order = sorted(range(t.shape[0]), key=lambda j: -want_scores[c][j])
        assert tp.selected[c].tolist() == order[:running]
        mean = sum(t[j] for j in order[:running]) / running
        assert torch.allclose(tp.proxies[c], mean / mean.norm(), atol=1e-12)


def test_kept_per_class_rules():
    assert kept_per_class(20, [12, 50, 37], "per_class") == [12, 20, 20]
    assert kept_per_class(20, [12, 50, 37], "running_min") == [12, 12, 12]
    assert kept_per_class(8, [50, 50, 50], "running_min") == [8, 8, 8]
    assert kept_per_class(20, [50, 12, 37], "per_class") == [20, 12, 20]
    for sizes in ([50, 12, 37], [50, 37, 12]):  # a small class in the middle or last: the released code fails
        with pytest.raises(KPLInputError, match="released code would fail"):
            kept_per_class(20, sizes, "running_min", ["a", "b", "c"])


def test_per_image_logits_match_naive_loop_across_chunk_boundaries():
    x, descs = _world(seed=2, n=23)
    k = 3
    got = per_image_text_logits(x, descs, k=k, chunk_size=7)
    assert got.shape == (23, 3)
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
    tp = build_text_proxies(x, descs, k=50, mode="corrected")
    assert torch.allclose(got, x @ tp.proxies.T, atol=1e-10)


@pytest.mark.parametrize("mode", ["reference", "corrected"])
def test_float32_inputs_and_dtype(mode):
    x, descs = _world(seed=4, m=(9, 9, 9))
    tp = build_text_proxies(x.float(), [d.float() for d in descs], mode=mode)
    assert tp.proxies.dtype == torch.float32 and tp.logits.dtype == torch.float32
    tp64 = build_text_proxies(x, descs, mode=mode)
    assert tp64.proxies.dtype == torch.float64


@pytest.mark.parametrize("mode", ["reference", "corrected"])
def test_non_unit_inputs_give_the_normalised_result(mode):
    """Rows are L2-normalised by the method layer (issue 17 item 4), so scaling a row changes nothing."""
    x, descs = _world(seed=5, m=(9, 9, 9))
    scale = torch.linspace(0.5, 3.0, x.shape[0], dtype=torch.float64)[:, None]
    tp = build_text_proxies(x, descs, k=4, mode=mode)
    tp2 = build_text_proxies(x * scale, [d * 2.5 for d in descs], k=4, mode=mode)
    assert [s.tolist() for s in tp2.selected] == [s.tolist() for s in tp.selected]
    assert torch.allclose(tp2.proxies, tp.proxies, atol=1e-12)
    assert torch.allclose(tp2.logits, tp.logits, atol=1e-12)
    assert torch.allclose(per_image_text_logits(x * scale, [d * 2.5 for d in descs], k=3),
                          per_image_text_logits(x, descs, k=3), atol=1e-12)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda x, d: (x, d, 0), "k must be an integer >= 1"),
        (lambda x, d: (x * torch.arange(x.shape[0]).clamp(max=1)[:, None], d, 8), "all-zero row"),
        (lambda x, d: (x, [d[0], d[1] * 0, d[2]], 8), "all-zero row"),
        (lambda x, d: (x, [d[0], d[1][:0], d[2]], 8), "class 1 has no descriptions"),
        (lambda x, d: (x, [d[0][:, :5], d[1], d[2]], 8), "expected 12"),
        (lambda x, d: (torch.where(torch.arange(x.numel()).view_as(x) == 3, math.nan, x), d, 8), "NaN/Inf"),
        (lambda x, d: (x[0], d, 8), "must be a non-empty 2-D"),
        (lambda x, d: (x, [], 8), "non-empty list"),
    ],
)
def test_bad_inputs_raise_informative_errors(mutate, fragment):
    x, descs = _world()
    xx, dd, k = mutate(x, descs)
    with pytest.raises(KPLInputError) as info:
        build_text_proxies(xx, dd, k=k, mode="corrected")
    assert fragment in str(info.value)


@pytest.mark.parametrize("kwargs, fragment", [({"mode": "fast"}, "mode must be one of"),
                                              ({"k_rule": "smallest"}, "k_rule must be one of")])
def test_bad_switches_raise(kwargs, fragment):
    """An unknown mode or K rule is an error, never silently one of the two modes."""
    x, descs = _world()
    with pytest.raises(KPLInputError, match=fragment):
        build_text_proxies(x, descs, k=2, **kwargs)


def test_unit_inexact_skips_only_rows_that_are_unit_already():
    """``unit(x, exact=False)`` (corrected mode) returns x itself, no N×d copy, only when normalising would change
    rounding alone; rows off unit length by more (e.g. stored in float16) are normalised."""
    x, _ = _world(seed=6)
    for dtype in (torch.float32, torch.float64):
        xu = F.normalize(x.to(dtype), dim=1)
        assert unit(xu, exact=False) is xu
        assert unit(xu) is not xu  # reference mode normalises, as released
        x16 = xu.half().to(dtype)
        assert torch.equal(unit(x16, exact=False), F.normalize(x16, dim=1))
        assert torch.equal(unit(2 * xu, exact=False), F.normalize(2 * xu, dim=1))


def test_corrected_mode_on_unit_rows_equals_normalising_them_to_rounding():
    x, descs = _world(seed=7, m=(9, 9, 9))
    x = x.float()
    tp = build_text_proxies(x, [d.float() for d in descs], k=4, mode="corrected")
    ref = build_text_proxies(F.normalize(x, dim=1) * (1 + 1e-3), [d.float() for d in descs], k=4, mode="corrected")
    assert [s.tolist() for s in tp.selected] == [s.tolist() for s in ref.selected]
    assert torch.allclose(tp.logits, ref.logits, atol=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_found_by_the_sum_check_and_large_finite_values_pass(bad):
    x = torch.ones(5, 4)
    x[3, 2] = bad
    with pytest.raises(KPLInputError, match="1 NaN/Inf"):
        check_matrix(x, "x")
    big = torch.full((4, 3), 3e38)  # finite, but their float32 sum overflows to inf: counted exactly, none bad
    assert check_matrix(big, "x") is big
