"""methods.py on tiny synthetic inputs built here: every method runs, composes the stages exactly, resolves its
config per mode, and validates its inputs with informative errors."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from kplib.errors import KPLInputError
from kplib.method.controls import CONTROLS
from kplib.method.methods import METHODS, KPLConfig, MethodResult, TextEmbeddings, resolve_config, run_method
from kplib.method.proxy import harden, learn_proxies, pseudo_labels
from kplib.method.text_proxy import build_text_proxies
from kplib.method.transport import TRANSPORT_METHODS, transport

N, C, D = 90, 3, 16
NO_MODES = tuple(name for name, spec in METHODS.items() if not spec.modes)
CORE = ("zero_shot", "descriptor_mean", "inmap", "kpl", "kpl_reference", "kpl_corrected")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    cent = F.normalize(torch.randn(C, D, generator=g), dim=1)
    labels = torch.arange(N) % C
    x = F.normalize(cent[labels] + 0.5 * torch.randn(N, D, generator=g), dim=1)
    names = F.normalize(cent[:, None, :] + 0.4 * torch.randn(C, 2, D, generator=g), dim=-1)
    descs = [F.normalize(cent[c] + 0.7 * torch.randn(4 + 3 * c, D, generator=g), dim=1) for c in range(C)]
    controls = {name: [F.normalize(torch.randn(1 if name == "name_only" else 5, D, generator=g), dim=1)
                       for _ in range(C)] for name in CONTROLS}
    return x, labels, TextEmbeddings(["a", "b", "c"], names, descs, controls=controls)


FAST = {"iters_proxy": 40}


def _fast(method):
    """Fewer proxy steps for the methods that learn proxies; the other methods keep their own defaults."""
    return FAST if METHODS[method].modes else {}


def test_the_methods_table():
    assert set(CORE) <= set(METHODS)
    assert {f"kpl_{c}" for c in CONTROLS} <= set(METHODS)
    for spec in METHODS.values():
        assert callable(spec.run) and spec.summary
    assert set(NO_MODES) >= {"zero_shot", "descriptor_mean"} and not set(NO_MODES) & {"inmap", "kpl"}
    assert METHODS["kpl_reference"].fixed_mode == "reference" and METHODS["kpl_corrected"].fixed_mode == "corrected"


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_and_fills_its_result(method):
    x, labels, text = _inputs()
    res = run_method(method, x, text, **_fast(method))
    assert isinstance(res, MethodResult) and res.method == method
    assert res.predictions.shape == (N,) and res.predictions.dtype == torch.int64
    assert res.logits.shape == (N, C)
    assert torch.equal(res.predictions, res.logits.argmax(dim=1))
    assert res.class_names == ["a", "b", "c"]
    assert isinstance(res.config, METHODS[method].config)
    assert "total" in res.timings and all(v >= 0 for v in res.timings.values())
    if not METHODS[method].controls:  # the controls' random descriptions carry no class information here
        assert (res.predictions == labels).float().mean() > 0.5  # the tiny world is easy; chance is 1/3
    assert res.text is not None and res.text.proxies.shape == (C, D)
    if method in NO_MODES:
        assert res.transport is None and res.proxy_learning is None and res.pseudo_labels is None
        assert torch.equal(res.proxies, res.text.proxies)
    else:
        for key in ("pseudo_labels", "transport", "proxy_learning"):
            assert key in res.timings
        assert res.pseudo_labels.shape == (N, C) and res.targets.shape == (N, C) and res.hardened.shape == (N,)
        assert res.transport is not None and res.transport.plan.shape == (N, C)
        assert res.proxy_learning is not None and res.proxies is res.proxy_learning.proxies
        assert torch.allclose(res.proxies.norm(dim=1), torch.ones(C), atol=1e-5)
        assert torch.allclose(res.logits, F.normalize(x, dim=1) @ res.proxies.T, atol=1e-6)
        assert res.config.mode in ("reference", "corrected") and res.config.transport in TRANSPORT_METHODS


def test_zero_shot_is_template_ensemble_and_descriptor_mean_averages_all():
    x, _, text = _inputs(1)
    zs = run_method("zero_shot", x, text)
    w = F.normalize(F.normalize(text.name_embeddings, dim=-1).mean(dim=1), dim=-1)
    assert torch.allclose(zs.proxies, w)
    assert torch.allclose(zs.logits, x @ w.T, atol=1e-6)
    dm = run_method("descriptor_mean", x, text)
    w2 = torch.stack([F.normalize(d.mean(0), dim=0) for d in text.description_embeddings])
    assert torch.allclose(dm.proxies, w2)


def test_kpl_reference_is_exact_composition_of_the_stages():
    x, _, text = _inputs(2)
    res = run_method("kpl_reference", x, text, k=3, iters_proxy=30)
    # the images are normalised once after encoding (stage 2 learns from those), and stage 1 normalises them once
    # more inside retrieval: stage 1 of the given embeddings is build_text_proxies of them as given
    xn = F.normalize(x, dim=-1)
    tp = build_text_proxies(x, text.description_embeddings, k=3, mode="reference")
    tr = transport(tp.logits, 0.01, None, method="released_greenkhorn", iters=20)
    y, mask = harden(tr.plan, 0.6)
    learned = learn_proxies(xn, y, tp.proxies, 0.04, 10.0, 30, "reference")
    assert torch.equal(res.text.proxies, tp.proxies) and torch.equal(res.text.logits, tp.logits)
    assert [s.tolist() for s in res.text.selected] == [s.tolist() for s in tp.selected]
    assert torch.equal(res.pseudo_labels, pseudo_labels(tp.logits, 0.01))
    assert res.transport.updates == tr.updates and torch.equal(res.transport.plan, tr.plan)
    assert torch.equal(res.targets, y)
    assert not res.hardened.any() and not mask.any()  # released 1/N rows: hardening never fires
    assert torch.equal(res.proxies, learned.proxies)
    assert res.proxy_learning.lr_history == learned.lr_history
    cfg = res.config
    assert (cfg.mode, cfg.transport, cfg.normalize_rows, cfg.k_rule) == ("reference", "released_greenkhorn", False,
                                                                         "running_min")


def test_kpl_corrected_rows_sum_to_one_and_hardening_fires():
    x, _, text = _inputs(3)
    res = run_method("kpl_corrected", x, text, no_transport_baseline=True)
    assert res.transport.method == "semidual" and res.transport.converged  # the corrected default
    assert torch.allclose(res.transport.plan.sum(dim=1), torch.ones(N), atol=1e-5)
    assert res.hardened.any()
    assert res.proxy_learning.mode == "corrected" and res.proxy_learning.converged
    assert res.proxy_learning.lr_history == []
    assert res.no_transport_predictions.shape == (N,) and res.no_transport_predictions.dtype == torch.int64
    cfg = res.config
    assert (cfg.mode, cfg.transport, cfg.normalize_rows, cfg.k_rule) == ("corrected", "semidual", True, "per_class")


def test_inmap_uses_name_proxies_and_balanced_sinkhorn():
    x, _, text = _inputs(4)
    res = run_method("inmap", x, text, iters_proxy=20)
    zs = run_method("zero_shot", x, text)
    assert torch.allclose(res.text.proxies, zs.proxies)
    assert res.transport.method == "inmap_sinkhorn"
    assert torch.allclose(res.transport.plan.sum(dim=1), torch.ones(N), atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {"class_marginal": "em"},
        {"class_marginal": "gamma", "gamma": 0.5, "transport": "inmap_sinkhorn"},
        {"class_marginal": "gamma", "gamma": 0.5, "mode": "corrected"},
        {"retrieval": "per_image", "k": 2},
        {"transport": "inmap_sinkhorn"},
        {"transport": "greenkhorn", "mode": "corrected", "ot_max_iter": 50},
        {"transport": "semidual", "mode": "corrected", "tau_t": 1e-4},
        {"transport": "sinkhorn_log", "mode": "corrected"},
        {"k_rule": "per_class", "k": 6},
        {"record_every": 10},
    ],
)
def test_switches(overrides):
    x, _, text = _inputs(5)
    res = run_method("kpl", x, text, **{**FAST, **overrides})
    assert torch.isfinite(res.logits).all()
    for key, value in overrides.items():
        assert getattr(res.config, key) == value
    if overrides.get("record_every"):
        assert len(res.proxy_learning.trajectory) == 1 + 40 // 10
    if overrides.get("class_marginal") in ("em", "gamma"):
        assert not torch.allclose(res.class_marginal, torch.full((C,), 1 / C, dtype=torch.float64))
    if overrides.get("k_rule") == "per_class":
        assert [s.numel() for s in res.text.selected] == [4, 6, 6]
    if overrides.get("retrieval") == "per_image":
        assert not torch.allclose(res.text.logits, F.normalize(x, dim=1) @ res.text.proxies.T)


def test_config_constructors_resolution_and_dict():
    ref, cor = KPLConfig.reference(), KPLConfig.corrected(k=5)
    assert ref.mode == "reference" and ref.iters_proxy == 2000 and ref.lr == 10.0
    assert (ref.tau_t, ref.tau_i, ref.alpha, ref.gamma, ref.iters_ot, ref.k) == (0.01, 0.04, 0.6, 0.0, 20, 8)
    assert KPLConfig().mode is None  # resolved per method
    r = resolve_config("kpl", ref)
    assert (r.transport, r.normalize_rows, r.k_rule) == ("released_greenkhorn", False, "running_min")
    assert resolve_config("kpl").mode == "reference"  # plain "kpl" defaults to the released computation
    c = resolve_config("kpl", cor)
    assert (c.transport, c.normalize_rows, c.k_rule, c.k) == ("semidual", True, "per_class", 5)
    assert resolve_config("kpl_corrected").mode == "corrected" and resolve_config("kpl_reference").mode == "reference"
    i = resolve_config("inmap")
    assert (i.mode, i.transport) == ("reference", "inmap_sinkhorn")
    assert resolve_config("zero_shot") == KPLConfig()  # nothing to resolve
    assert resolve_config("kpl", cor, normalize_rows=False, transport="sinkhorn_log").normalize_rows is False
    d = c.to_dict()
    assert d["transport"] == "semidual" and d["normalize_rows"] is True and d["k"] == 5
    assert set(d) == {f.name for f in dataclasses.fields(KPLConfig)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.k = 3


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"tau_t": 0.0}, "tau_t must be a finite number > 0"),
        ({"tau_i": -1.0}, "tau_i must be a finite number > 0"),
        ({"mode": "fast"}, "mode must be one of"),
        ({"transport": "emd"}, "transport must be one of"),
        ({"class_marginal": "auto"}, "class_marginal must be one of"),
        ({"gamma": -0.5}, "gamma must be"),
        ({"alpha": math.nan}, "alpha must be a finite"),
        ({"k_rule": "smallest"}, "k_rule must be one of"),
        ({"retrieval": "both"}, "retrieval must be one of"),
        ({"normalize_rows": 1}, "normalize_rows must be True or False"),
        ({"iters_proxy": 2.5}, "iters_proxy must be an integer"),
    ],
)
def test_config_validation(kwargs, fragment):
    with pytest.raises(KPLInputError) as info:
        KPLConfig(**kwargs)
    assert fragment in str(info.value)


def test_gamma_is_never_silently_ignored():
    """Issue 17: gamma != 0 without the gamma class marginal is an error, never a silent no-op."""
    with pytest.raises(KPLInputError, match=r"gamma=1\.0 only acts with the gamma class marginal.*"
                                            r"--class-marginal gamma.*class_marginal='gamma'"):
        KPLConfig(gamma=1.0)
    x, _, text = _inputs()
    with pytest.raises(KPLInputError, match="gamma"):
        run_method("kpl_corrected", x, text, gamma=0.5, **FAST)


def test_reference_gamma_with_the_released_greedy_transport_raises_naming_the_fix():
    x, _, text = _inputs()
    for method in ("kpl", "kpl_reference"):
        with pytest.raises(KPLInputError, match=r"released greedy transport fails for gamma > 0.*"
                                                r"--transport inmap_sinkhorn.*transport='inmap_sinkhorn'"):
            run_method(method, x, text, class_marginal="gamma", gamma=0.5, **FAST)
    res = run_method("kpl_reference", x, text, class_marginal="gamma", gamma=0.5, transport="inmap_sinkhorn", **FAST)
    assert res.config.transport == "inmap_sinkhorn" and res.config.mode == "reference"


@pytest.mark.parametrize(
    "method, config, fragment",
    [
        ("zero_shot", KPLConfig.reference(), "'zero_shot' has no modes"),
        ("descriptor_mean", KPLConfig.corrected(), "'descriptor_mean' has no modes"),
        ("kpl_reference", KPLConfig.corrected(), "fixes mode='reference'"),
        ("kpl_corrected", KPLConfig.reference(), "fixes mode='corrected'"),
    ],
)
def test_mode_that_does_not_apply_raises(method, config, fragment):
    x, _, text = _inputs()
    with pytest.raises(KPLInputError, match=fragment):
        run_method(method, x, text, config)
    with pytest.raises(KPLInputError, match=fragment):
        run_method(method, x, text, mode=config.mode)


def _bad(text, **changes):
    return dataclasses.replace(text, **changes)


@pytest.mark.parametrize(
    "make, method, fragment",
    [
        (lambda x, t: (F.normalize(x[:, :5], dim=1), t), "kpl_reference", "has 16 columns, expected 5"),
        (lambda x, t: (x * torch.arange(N).clamp(max=1)[:, None], t), "kpl_reference", "all-zero row"),
        (lambda x, t: (x[0], t), "zero_shot", "image_embeddings must be a non-empty 2-D"),
        (lambda x, t: (torch.where(torch.arange(x.numel()).view_as(x) == 5, math.inf, x), t), "kpl_reference",
         "NaN/Inf"),
        (lambda x, t: (x, _bad(t, description_embeddings=[t.description_embeddings[0], t.description_embeddings[1][:0],
                                                          t.description_embeddings[2]])), "kpl_reference",
         "class 1 ('b') has no descriptions"),
        (lambda x, t: (x, _bad(t, description_embeddings=t.description_embeddings[:2])), "kpl_reference",
         "hold 2 classes but text.class_names has 3"),
        (lambda x, t: (x, _bad(t, description_embeddings=t.description_embeddings[:2])), "descriptor_mean",
         "hold 2 classes but text.class_names has 3"),
        (lambda x, t: (x, _bad(t, name_embeddings=t.name_embeddings[:2])), "zero_shot",
         "text.name_embeddings must have shape (C, T, d) = (3, T, 16)"),
        (lambda x, t: (x, _bad(t, name_embeddings=t.name_embeddings[:2])), "kpl_reference",
         "name_embeddings"),
        (lambda x, t: (x, _bad(t, class_names=["a"])), "kpl_reference", "at least 2 classes"),
        (lambda x, t: (x, "text"), "kpl", "text must be a kplib TextEmbeddings"),
        # another device than the CPU (meta stands in for cuda here): named, with the fix
        (lambda x, t: (x.to("meta"), t), "kpl_corrected", "image_embeddings is on device meta"),
        (lambda x, t: (x.to("meta"), t), "kpl_reference", "pass image_embeddings.cpu()"),
        (lambda x, t: (x.to("meta"), t), "transclip", "compute on the CPU"),
        (lambda x, t: (x, _bad(t, description_embeddings=[d.to("meta") for d in t.description_embeddings])),
         "kpl_reference", "is on device meta"),
    ],
)
def test_input_validation(make, method, fragment):
    x, _, text = _inputs()
    xx, tt = make(x, text)
    with pytest.raises(KPLInputError) as info:
        run_method(method, xx, tt, **_fast(method))
    assert fragment in str(info.value)


@pytest.mark.parametrize("method", list(METHODS))
def test_non_unit_inputs_give_the_normalised_result(method):
    """Issue 17 item 4: rows are L2-normalised by the method layer, so scaling images, class-name prompts or
    descriptions changes nothing (an all-zero row still raises, above)."""
    x, _, text = _inputs(6)
    # float64: the released descent amplifies float32 rounding, which would blur what is compared here
    x, text = x.double(), _bad(text, name_embeddings=text.name_embeddings.double(),
                               description_embeddings=[d.double() for d in text.description_embeddings],
                               controls={k: [d.double() for d in v] for k, v in text.controls.items()})
    kw = _fast(method)
    a = run_method(method, x, text, **kw)
    scaled = _bad(text, name_embeddings=text.name_embeddings * 2.0,
                  description_embeddings=[d * (1.5 + c) for c, d in enumerate(text.description_embeddings)],
                  controls={k: [d * 3.0 for d in v] for k, v in text.controls.items()})
    b = run_method(method, x * torch.linspace(0.5, 4.0, N, dtype=x.dtype)[:, None], scaled, **kw)
    assert torch.allclose(a.text.proxies, b.text.proxies, atol=1e-12)
    assert torch.allclose(a.text.logits, b.text.logits, atol=1e-12)
    if method in CORE:  # end to end (with the controls' random texts, near-ties in the greedy transport and the
        # released descent amplify the ulps that normalising a scaled row leaves)
        if a.targets is not None:
            assert torch.allclose(a.targets, b.targets, atol=1e-9)
        assert torch.equal(a.predictions, b.predictions)
        # corrected mode's L-BFGS stops at a tolerance: an ulp in its input moves the stopping point within it
        atol = 1e-9 if a.config.mode == "reference" else 1e-6
        assert torch.allclose(a.logits, b.logits, atol=atol)
        assert torch.allclose(a.proxies, b.proxies, atol=atol)


def test_run_method_rejects_unknown_names():
    x, _, text = _inputs()
    with pytest.raises(KPLInputError, match="method must be one of"):
        run_method("clip", x, text)
    with pytest.raises(KPLInputError, match=r"unknown KPLConfig field\(s\) \['iterations'\]"):
        run_method("kpl", x, text, iterations=3)
    with pytest.raises(KPLInputError, match="tau_t must be a finite number > 0"):
        run_method("kpl_corrected", x, text, tau_t=-0.01)
    with pytest.raises(KPLInputError, match="k must be an integer >= 1"):
        run_method("zero_shot", x, text, k=0)  # validated even where unused
    with pytest.raises(KPLInputError, match="method 'kpl' takes a KPLConfig, got dict"):
        run_method("kpl", x, text, config={"k": 3})
    # a valid config does not change a parameter-free method
    assert torch.equal(run_method("zero_shot", x, text, k=3).predictions, run_method("zero_shot", x, text).predictions)


def test_corrected_default_semidual_agrees_with_pot_sinkhorn_end_to_end():
    x, _, text = _inputs(6)
    semi = run_method("kpl_corrected", x, text)
    pot = run_method("kpl_corrected", x, text, transport="sinkhorn_log", ot_max_iter=20000)
    assert pot.transport.method == "sinkhorn_log" and pot.transport.converged
    assert semi.transport.method == "semidual" and semi.transport.converged
    # both meet tol=1e-6 on the coupling scale (entries ~1/N); the normalised rows agree to ~N * tol
    assert torch.allclose(semi.transport.plan, pot.transport.plan, atol=N * 1e-6 * 4)
    assert (semi.predictions == pot.predictions).float().mean() >= 0.99


def test_meta_travels_from_the_text_embeddings():
    x, _, text = _inputs()
    text.meta = {"encoder": "stand-in", "kb": "tiny"}
    res = run_method("kpl", x, text, **FAST)
    assert res.meta == {"encoder": "stand-in", "kb": "tiny"} and res.meta is not text.meta
