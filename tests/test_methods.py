"""methods.py on tiny synthetic inputs built here: every method runs, composes the stages exactly, and validates
its inputs with informative errors."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from kplib.errors import KPLInputError
from kplib.methods import METHODS, KPLConfig, MethodResult, TextEmbeddings, run_method
from kplib.proxy import harden, learn_proxies
from kplib.text_proxy import build_text_proxies
from kplib.transport import released_greenkhorn

N, C, D = 90, 3, 16


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    cent = F.normalize(torch.randn(C, D, generator=g), dim=1)
    labels = torch.arange(N) % C
    x = F.normalize(cent[labels] + 0.5 * torch.randn(N, D, generator=g), dim=1)
    names = F.normalize(cent[:, None, :] + 0.4 * torch.randn(C, 2, D, generator=g), dim=-1)
    descs = [F.normalize(cent[c] + 0.7 * torch.randn(4 + 3 * c, D, generator=g), dim=1) for c in range(C)]
    return x, labels, TextEmbeddings(["a", "b", "c"], names, descs)


FAST = {"iters_proxy": 40}


@pytest.mark.parametrize("method", METHODS + ("kpl",))
def test_every_method_runs_and_fills_its_result(method):
    x, labels, text = _inputs()
    kw = {} if method in ("zero_shot", "descriptor_mean") else FAST
    res = run_method(method, x, text, **kw)
    assert isinstance(res, MethodResult)
    assert res.predictions.shape == (N,) and res.predictions.dtype == torch.int64
    assert res.logits.shape == (N, C)
    assert torch.equal(res.predictions, res.logits.argmax(dim=1))
    assert res.class_names == ["a", "b", "c"]
    assert "total" in res.timings and all(v >= 0 for v in res.timings.values())
    assert (res.predictions == labels).float().mean() > 0.5  # the tiny world is easy; chance is 1/3
    if method not in ("zero_shot", "descriptor_mean"):
        for key in ("pseudo_labels", "transport", "hardening", "proxy_learning"):
            assert key in res.timings
        assert res.pseudo_labels_initial.shape == (N, C)
        assert res.transport is not None and res.proxy_learning is not None
        assert torch.allclose(res.proxies.norm(dim=1), torch.ones(C), atol=1e-5)


def test_zero_shot_is_template_ensemble_and_descriptor_mean_averages_all():
    x, _, text = _inputs(1)
    zs = run_method("zero_shot", x, text)
    w = F.normalize(F.normalize(text.name_embeddings, dim=-1).mean(dim=1), dim=-1)
    assert torch.allclose(zs.proxies, w)
    dm = run_method("descriptor_mean", x, text)
    w2 = torch.stack([F.normalize(d.mean(0), dim=0) for d in text.description_embeddings])
    assert torch.allclose(dm.proxies, w2)


def test_kpl_reference_is_exact_composition_of_the_stages():
    x, _, text = _inputs(2)
    res = run_method("kpl_reference", x, text, k=3, iters_proxy=30)
    tp = build_text_proxies(x, text.description_embeddings, k=3)
    tr = released_greenkhorn(x @ tp.proxies.T, 0.01, None, 20)
    y, mask = harden(tr.plan, 0.6)
    learned = learn_proxies(x, y, tp.proxies, 0.04, 10.0, 30, "reference")
    assert torch.equal(res.text_proxies, tp.proxies)
    assert res.transport.updates == tr.updates
    assert torch.equal(res.pseudo_labels_final, y)
    assert not res.hardened.any()  # released 1/N rows: hardening never fires
    assert torch.allclose(res.proxies, learned.proxies)
    assert res.config["transport"] == "released_greenkhorn" and res.config["normalize_rows"] is False


def test_kpl_corrected_rows_sum_to_one_and_hardening_fires():
    x, _, text = _inputs(3)
    res = run_method("kpl_corrected", x, text, no_transport_baseline=True)
    assert res.transport.solver == "semidual_newton" and res.transport.converged  # the corrected default
    assert torch.allclose(res.pseudo_labels_transported.sum(dim=1), torch.ones(N), atol=1e-5)
    assert res.hardened.any()
    assert res.proxy_learning.mode == "corrected" and res.proxy_learning.converged
    assert res.no_transport_predictions.shape == (N,)
    assert res.config["mode"] == "corrected"


def test_inmap_uses_name_proxies_and_balanced_sinkhorn():
    x, _, text = _inputs(4)
    res = run_method("inmap", x, text, iters_proxy=20)
    zs = run_method("zero_shot", x, text)
    assert torch.allclose(res.text_proxies, zs.proxies)
    assert res.transport.solver == "inmap_sinkhorn"
    assert torch.allclose(res.pseudo_labels_transported.sum(dim=1), torch.ones(N), atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {"class_marginal": "em"},
        {"class_marginal": "gamma", "gamma": 0.5},
        {"retrieval": "per_image", "k": 2},
        {"transport": "none"},
        {"transport": "inmap_sinkhorn"},
        {"transport": "greenkhorn", "mode": "corrected", "ot_max_iter": 50},
        {"transport": "semidual_newton", "mode": "corrected", "tau_t": 1e-4},
        {"transport": "sinkhorn_log", "mode": "corrected"},
        {"record_every": 10},
    ],
)
def test_switches(overrides):
    x, _, text = _inputs(5)
    res = run_method("kpl", x, text, **{**FAST, **overrides})
    assert torch.isfinite(res.logits).all()
    for key, value in overrides.items():
        assert res.config[key] == value
    if overrides.get("record_every"):
        assert len(res.proxy_learning.trajectory) == 1 + 40 // 10
    if overrides.get("class_marginal") in ("em", "gamma"):
        assert not torch.allclose(res.class_marginal, torch.full((C,), 1 / C))


def test_config_constructors_and_dict():
    ref, cor = KPLConfig.reference(), KPLConfig.corrected(k=5)
    assert ref.to_dict()["transport"] == "released_greenkhorn" and ref.iters_proxy == 2000 and ref.lr == 10.0
    assert (ref.tau_t, ref.tau_i, ref.alpha, ref.gamma, ref.iters_ot, ref.k) == (0.01, 0.04, 0.6, 0.0, 20, 8)
    d = cor.to_dict()
    assert d["transport"] == "semidual_newton" and d["normalize_rows"] is True and d["k"] == 5
    assert set(d) == {f.name for f in dataclasses.fields(KPLConfig)}


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"tau_t": 0.0}, "tau_t must be a positive"),
        ({"tau_i": -1.0}, "tau_i must be a positive"),
        ({"mode": "fast"}, "mode must be one of"),
        ({"transport": "emd"}, "transport must be one of"),
        ({"class_marginal": "auto"}, "class_marginal must be one of"),
        ({"gamma": -0.5}, "gamma must be"),
        ({"alpha": math.nan}, "alpha must be a finite"),
    ],
)
def test_config_validation(kwargs, fragment):
    with pytest.raises(KPLInputError) as info:
        KPLConfig(**kwargs)
    assert fragment in str(info.value)


def _bad(text, **changes):
    return dataclasses.replace(text, **changes)


@pytest.mark.parametrize(
    "make, method, fragment",
    [
        (lambda x, t: (F.normalize(x[:, :5], dim=1), t), "kpl_reference", "has 16 columns, expected 5"),
        (lambda x, t: (x * 3, t), "kpl_reference", "image_embeddings rows must be L2-normalised"),
        (lambda x, t: (x[0], t), "zero_shot", "image_embeddings must be 2-D"),
        (lambda x, t: (torch.where(torch.arange(x.numel()).view_as(x) == 5, math.inf, x), t), "kpl_reference",
         "NaN/Inf"),
        (lambda x, t: (x, _bad(t, description_embeddings=[t.description_embeddings[0], t.description_embeddings[1][:0],
                                                          t.description_embeddings[2]])), "kpl_reference",
         "class 1 ('b') has no descriptions"),
        (lambda x, t: (x, _bad(t, description_embeddings=t.description_embeddings[:2])), "kpl_reference",
         "one (M_c, d) tensor per class (3 classes"),
        (lambda x, t: (x, _bad(t, name_embeddings=t.name_embeddings[:2])), "zero_shot",
         "name_embeddings has 2 classes but text.class_names has 3"),
        (lambda x, t: (x, _bad(t, name_embeddings=t.name_embeddings[:2])), "kpl_reference",
         "name_embeddings has 2 classes but text.description_embeddings has 3"),
        (lambda x, t: (x, _bad(t, name_embeddings=t.name_embeddings * 2)), "inmap",
         "name_embeddings rows must be L2-normalised"),
        (lambda x, t: (x, _bad(t, description_embeddings=[d * 2 for d in t.description_embeddings])),
         "descriptor_mean", "rows must be L2-normalised"),
    ],
)
def test_input_validation(make, method, fragment):
    x, _, text = _inputs()
    xx, tt = make(x, text)
    with pytest.raises(KPLInputError) as info:
        run_method(method, xx, tt, **({} if method in ("zero_shot", "descriptor_mean") else FAST))
    assert fragment in str(info.value)


def test_run_method_rejects_unknown_names():
    x, _, text = _inputs()
    with pytest.raises(KPLInputError, match="method must be one of"):
        run_method("clip", x, text)
    with pytest.raises(KPLInputError, match=r"unknown KPLConfig field\(s\) \['iterations'\]"):
        run_method("kpl", x, text, iterations=3)
    with pytest.raises(KPLInputError, match="tau_t must be a positive"):
        run_method("kpl_corrected", x, text, tau_t=-0.01)
    with pytest.raises(KPLInputError, match="k must be an integer >= 1"):
        run_method("zero_shot", x, text, k=0)  # validated even where unused
    with pytest.raises(KPLInputError, match="config must be a kplib.methods.KPLConfig"):
        run_method("kpl", x, text, config={"k": 3})
    # a valid config does not change a parameter-free method
    assert torch.equal(run_method("zero_shot", x, text, k=3).predictions, run_method("zero_shot", x, text).predictions)


def test_corrected_default_newton_agrees_with_pot_sinkhorn_end_to_end():
    x, _, text = _inputs(6)
    newton = run_method("kpl_corrected", x, text)
    pot = run_method("kpl_corrected", x, text, transport="sinkhorn_log", ot_max_iter=20000)
    assert pot.transport.solver == "pot.sinkhorn_log" and pot.transport.converged
    assert newton.transport.solver == "semidual_newton" and newton.transport.converged
    # both meet tol=1e-6 on the coupling scale (entries ~1/N); the normalised rows agree to ~N * tol
    assert torch.allclose(newton.pseudo_labels_transported, pot.pseudo_labels_transported, atol=N * 1e-6 * 4)
    assert (newton.predictions == pot.predictions).float().mean() >= 0.99
