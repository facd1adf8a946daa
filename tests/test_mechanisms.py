"""Mechanism tests on simulated worlds (kplib.simulate) with known ground truth.

They check *why* KPL works or fails, not numbers about CLIP (the worlds are SIMULATED, not a real encoder):
(a) on a balanced test set where the text proxies collapse onto one class, the class-balancing transport repairs it;
(b) on an imbalanced test set, uniform transport hurts, and an estimated class marginal recovers most of the loss.

Thresholds come from measurements (recorded next to each assertion) with a margin. World size: 400 images,
d = 512, 20 descriptions per class (the presets with ``n_images=400, n_descriptions=20``).
"""
from __future__ import annotations

import pytest
import torch

from kplib.methods import run_method
from kplib.simulate import preset

SIZE = dict(n_images=400, n_descriptions=20)


def _acc(pred: torch.Tensor, y: torch.Tensor) -> float:
    return (pred == y).float().mean().item()


def _largest_share(pred: torch.Tensor, n_classes: int) -> float:
    return torch.bincount(pred, minlength=n_classes).max().item() / pred.numel()


def _collapse_case(seed: int) -> dict:
    w = preset("balanced_collapse", seed=seed, **SIZE)
    c = len(w.class_names)
    zs = run_method("zero_shot", w.image_embeddings, w.text)
    kpl = run_method("kpl_corrected", w.image_embeddings, w.text, no_transport_baseline=True)
    return {
        "zs_share": _largest_share(zs.predictions, c),
        "tp_share": _largest_share(kpl.text_predictions, c),
        "tp_acc": _acc(kpl.text_predictions, w.labels),
        "kpl_acc": _acc(kpl.predictions, w.labels),
        "no_ot_acc": _acc(kpl.no_transport_predictions, w.labels),
    }


def _check_collapse(r: dict) -> None:
    # measured, kpl_corrected, seeds 0/1: text-proxy share of the largest class .98/.98, text-proxy acc .27/.27,
    # KPL acc .79/.78, proxy learning without OT ~ text proxy (.27/.27)
    assert r["zs_share"] >= 0.95, r  # zero-shot names: every image -> the attractor (measured 1.00)
    assert r["tp_share"] >= 0.75, r  # text proxies collapse onto one class
    assert r["kpl_acc"] >= r["tp_acc"] + 0.30, r  # balancing OT repairs it (measured +0.51 .. +0.52)
    assert r["kpl_acc"] >= r["no_ot_acc"] + 0.30, r  # ... and it is the OT step, not proxy learning alone


def test_balancing_ot_repairs_collapsed_text_proxies():
    _check_collapse(_collapse_case(seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_balancing_ot_repairs_collapse_more_seeds(seed):
    _check_collapse(_collapse_case(seed))


def _imbalanced_case(seed: int, estimate: dict) -> dict:
    w = preset("imbalanced", seed=seed, **SIZE)
    uni = run_method("kpl_corrected", w.image_embeddings, w.text)
    est = run_method("kpl_corrected", w.image_embeddings, w.text, **estimate)
    return {
        "tp_acc": _acc(uni.text_predictions, w.labels),
        "uniform_acc": _acc(uni.predictions, w.labels),
        "estimated_acc": _acc(est.predictions, w.labels),
        "q": est.class_marginal,
        "priors": w.priors,
    }


def _check_imbalanced(r: dict, min_recovered: float) -> None:
    loss = r["tp_acc"] - r["uniform_acc"]
    # measured after the simulator's equal-length description fix (seeds 0/1/2/3): text proxy
    # .805/.837/.837/.850, KPL corrected uniform .700/.688/.685/.702 (loss .105-.152)
    assert loss >= 0.07, r  # uniform OT pushes majority-class images into minority classes
    recovered = (r["estimated_acc"] - r["uniform_acc"]) / loss
    assert recovered >= min_recovered, (recovered, r)
    # the estimated marginal is closer to the true priors than the uniform one
    uniform = torch.full_like(r["priors"], 1.0 / r["priors"].numel())
    assert (r["q"] - r["priors"]).abs().sum() < (uniform - r["priors"]).abs().sum(), r


GAMMA = dict(class_marginal="gamma", gamma=1.0)


def test_uniform_ot_hurts_on_imbalanced_and_estimated_marginal_recovers():
    # gamma = 1 (q ∝ Σ_i P0_ic): measured KPL acc .783/.837/.820/.848 -> recovers 79/100/89/98 % of the loss
    _check_imbalanced(_imbalanced_case(0, GAMMA), min_recovered=0.6)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_imbalanced_more_seeds(seed):
    _check_imbalanced(_imbalanced_case(seed, GAMMA), min_recovered=0.6)


@pytest.mark.slow
def test_em_prior_needs_calibrated_pseudo_labels():
    """A documented limitation, not a success: the EM prior of Saerens et al. assumes calibrated posteriors. The
    text-proxy pseudo-labels at tau_t = 0.01 are over-confident and biased towards the majority class, so EM
    overshoots the majority and does worse than uniform transport here (measured seeds 0-3: EM .565/.567/.562/.618
    vs uniform .700/.688/.685/.702). The book's balancing chapter shows the same."""
    r = _imbalanced_case(0, dict(class_marginal="em"))
    assert r["estimated_acc"] < r["uniform_acc"] - 0.05, r
    assert r["q"][0] > r["priors"][0], r  # it over-weights the majority class
