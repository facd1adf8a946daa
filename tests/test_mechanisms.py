"""Mechanism tests on simulated worlds (kplib.method.simulate) with known ground truth.

They check *why* KPL works or fails, not numbers about CLIP (the worlds are SIMULATED, not a real encoder):
(a) on a balanced test set where the text proxies collapse onto one class, the class-balancing transport repairs it;
(b) on an imbalanced test set, uniform transport hurts, and an estimated class marginal recovers most of the loss
    (EM only where the pseudo-labels are not biased towards the majority class);
(c) the knowledge controls of issue 16: where the descriptions carry class information KPL with them beats its
    random-words and shuffled controls by far; where they carry none it does not.

Thresholds come from measurements (recorded next to each assertion) with a margin. World size: 400 images,
d = 512, 20 descriptions per class (the presets with ``n_images=400, n_descriptions=20``).
"""
from __future__ import annotations

import pytest
import torch

from kplib.method.methods import kpl, resolve_config, run_method
from kplib.method.metrics import paired_comparison
from kplib.method.simulate import preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = dict(n_images=400, n_descriptions=20)


def _acc(pred: torch.Tensor, y: torch.Tensor) -> float:
    return (pred == y).float().mean().item()


def _largest_share(pred: torch.Tensor, n_classes: int) -> float:
    return torch.bincount(pred, minlength=n_classes).max().item() / pred.numel()


def _collapse_case(seed: int) -> dict:
    w = preset("balanced_collapse", seed=seed, **SIZE)
    c = len(w.class_names)
    zs = run_method("zero_shot", w.image_embeddings, w.text)
    res = run_method("kpl_corrected", w.image_embeddings, w.text, no_transport_baseline=True)
    return {
        "zs_share": _largest_share(zs.predictions, c),
        "tp_share": _largest_share(res.text.predictions, c),
        "tp_acc": _acc(res.text.predictions, w.labels),
        "kpl_acc": _acc(res.predictions, w.labels),
        "no_ot_acc": _acc(res.no_transport_predictions, w.labels),
    }


def _check_collapse(r: dict) -> None:
    # measured, kpl_corrected, seeds 0/1/2/3: text-proxy share of the largest class .92/.92/.96/.96, text-proxy acc
    # .33/.33/.29/.29, KPL acc .85/.83/.80/.79, proxy learning without OT ~ text proxy (.32/.32/.29/.29)
    assert r["zs_share"] >= 0.95, r  # zero-shot names: every image -> the attractor (measured 1.00)
    assert r["tp_share"] >= 0.75, r  # text proxies collapse onto one class
    assert r["kpl_acc"] >= r["tp_acc"] + 0.30, r  # balancing OT repairs it (measured +0.50 .. +0.52)
    assert r["kpl_acc"] >= r["no_ot_acc"] + 0.30, r  # ... and it is the OT step, not proxy learning alone


def test_balancing_ot_repairs_collapsed_text_proxies():
    _check_collapse(_collapse_case(seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_balancing_ot_repairs_collapse_more_seeds(seed):
    _check_collapse(_collapse_case(seed))


def _imbalanced_case(seed: int, estimate: dict, **world) -> dict:
    w = preset("imbalanced", seed=seed, **SIZE, **world)
    uni = run_method("kpl_corrected", w.image_embeddings, w.text)
    est = run_method("kpl_corrected", w.image_embeddings, w.text, **estimate)
    return {
        "tp_acc": _acc(uni.text.predictions, w.labels),
        "uniform_acc": _acc(uni.predictions, w.labels),
        "estimated_acc": _acc(est.predictions, w.labels),
        "q": est.class_marginal,
        "priors": w.priors,
    }


def _check_imbalanced(r: dict, min_recovered: float) -> None:
    loss = r["tp_acc"] - r["uniform_acc"]
    # measured (seeds 0/1/2/3): text proxy .908/.902/.925/.920, KPL corrected uniform .705/.705/.697/.690
    # (loss .20-.23)
    assert loss >= 0.07, r  # uniform OT pushes majority-class images into minority classes
    recovered = (r["estimated_acc"] - r["uniform_acc"]) / loss
    assert recovered >= min_recovered, (recovered, r)
    # the estimated marginal is closer to the true priors than the uniform one
    uniform = torch.full_like(r["priors"], 1.0 / r["priors"].numel())
    assert (r["q"] - r["priors"]).abs().sum() < (uniform - r["priors"]).abs().sum(), r


GAMMA = dict(class_marginal="gamma", gamma=1.0)


def test_uniform_ot_hurts_on_imbalanced_and_estimated_marginal_recovers():
    # gamma = 1 (q ∝ Σ_i P0_ic): measured KPL acc .928/.913/.945/.933 -> recovers 110/105/109/105 % of the loss
    _check_imbalanced(_imbalanced_case(0, GAMMA), min_recovered=0.6)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_imbalanced_more_seeds(seed):
    _check_imbalanced(_imbalanced_case(seed, GAMMA), min_recovered=0.6)


def test_em_prior_recovers_when_pseudo_labels_are_unbiased():
    """With informative names (the preset) the EM prior of Saerens et al. follows the true shares: measured seeds 0-3
    EM .882/.940/.940/.877 vs uniform .705/.705/.697/.690 (+.17 .. +.24)."""
    r = _imbalanced_case(0, dict(class_marginal="em"))
    assert r["estimated_acc"] >= r["uniform_acc"] + 0.10, r
    _check_imbalanced(r, min_recovered=0.6)


@pytest.mark.slow
def test_em_prior_needs_calibrated_pseudo_labels():
    """A documented limitation, not a success: the EM prior assumes calibrated posteriors. When the majority class's
    name attracts the images (name_alignment 0.2; the attractor is class 0, the most frequent), the text-proxy
    pseudo-labels at tau_t = 0.01 are over-confident and biased towards the majority class, so EM overshoots it and
    does worse than uniform transport (measured seeds 0-3: EM .570/.575/.562/.565 vs uniform .697/.705/.663/.678).
    The book's balancing chapter shows the same."""
    r = _imbalanced_case(0, dict(class_marginal="em"), name_alignment=0.2)
    assert r["estimated_acc"] < r["uniform_acc"] - 0.05, r
    assert r["q"][0] > r["priors"][0], r  # it over-weights the majority class


# --------------------------------------------------------------------------- knowledge controls (issue 16)
def _knowledge_case(world: str, seed: int) -> dict:
    """KPL with the real descriptions against its random-words and shuffled controls, both modes, same images."""
    w = preset(world, seed=seed, **SIZE)
    out = {}
    for method in ("kpl_reference", "kpl_corrected"):
        cfg = resolve_config(method)
        real = kpl(w.image_embeddings, w.text, cfg)
        for control in ("random_words", "shuffled"):
            res = kpl(w.image_embeddings, w.text, cfg, descriptions=control)
            assert not torch.allclose(res.text.proxies, real.text.proxies)  # the control changed the text side
            out[method, control] = paired_comparison(w.labels, real.predictions, res.predictions, n_bootstrap=0)
    return out


def _check_knowledge(world: str, seed: int) -> None:
    for (method, control), r in _knowledge_case(world, seed).items():
        if world == "knowledge_informative":
            # measured seeds 0-9, real - control accuracy: random words +.34 .. +.48 (reference), +.45 .. +.53
            # (corrected); shuffled +.74 .. +.80 (reference), +.71 .. +.79 (corrected); McNemar p <= 2e-35
            assert r.difference >= (0.20 if control == "random_words" else 0.40), (method, control, r)
            assert r.p_value < 1e-8, (method, control, r)
        else:
            # measured seeds 0-9, real - control: random words -.030 .. +.035 (reference), -.015 .. +.043
            # (corrected); shuffled -.065 .. +.033 (reference), -.035 .. +.022 (corrected); where real is ahead,
            # McNemar p >= 0.09
            assert r.difference <= 0.10, (method, control, r)
            assert r.difference <= 0 or r.p_value > 0.01, (method, control, r)


@pytest.mark.parametrize("world", ["knowledge_informative", "knowledge_uninformative"])
def test_knowledge_controls_separate_informative_from_uninformative_descriptions(world):
    _check_knowledge(world, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("world", ["knowledge_informative", "knowledge_uninformative"])
def test_knowledge_controls_more_seeds(world, seed):
    _check_knowledge(world, seed)
