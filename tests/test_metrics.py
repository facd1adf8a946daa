"""Tests of kplib.method.metrics: scikit-learn's metrics, the multinomial bootstrap against an index bootstrap,
the paired comparison (McNemar's exact test, paired bootstrap), baselines and tables."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

from kplib.errors import KPLInputError
from kplib.method.metrics import (
    METRICS,
    PairedComparison,
    chance_baseline,
    compact_table,
    evaluate,
    majority_baseline,
    metrics_from_confusion,
    paired_comparison,
    paired_table,
    results_table,
)

NAMES4 = ["a", "b", "c", "d"]


def _sk(yt, yp, c):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bal = balanced_accuracy_score(yt, yp)
    return {"accuracy": accuracy_score(yt, yp), "balanced_accuracy": bal,
            "macro_f1": f1_score(yt, yp, average="macro", labels=list(range(c)), zero_division=0)}


def _labels(n, c, seed, skew=None):
    rng = np.random.default_rng(seed)
    p = None if skew is None else np.asarray(skew) / np.sum(skew)
    yt = rng.choice(c, size=n, p=p)
    # predictions: correct with prob 0.6, otherwise a random class biased towards class 0
    yp = np.where(rng.random(n) < 0.6, yt, rng.choice(c, size=n, p=[0.7] + [0.3 / (c - 1)] * (c - 1)))
    return yt, yp


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_from_confusion_equal_sklearn(seed):
    yt, yp = _labels(500, 4, seed, skew=[8, 4, 2, 1])
    ours = metrics_from_confusion(confusion_matrix(yt, yp, labels=range(4)))
    ref = _sk(yt, yp, 4)
    for k in METRICS:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k


def test_vectorised_resamples_equal_sklearn_including_absent_classes():
    # a rare class (5 of 60) is absent from some resamples: balanced accuracy must drop it like sklearn does,
    # macro-F1 must count it as 0 when it is absent from both labels and predictions.
    yt, yp = _labels(60, 4, 7, skew=[20, 20, 15, 1])
    idx = np.random.default_rng(3).integers(0, yt.size, size=(40, yt.size))
    confs = np.stack([confusion_matrix(yt[i], yp[i], labels=range(4)) for i in idx])
    ours = metrics_from_confusion(confs)
    saw_absent = False
    for b, i in enumerate(idx):
        ref = _sk(yt[i], yp[i], 4)
        saw_absent |= not np.any(yt[i] == 3)
        for k in METRICS:
            assert ours[k][b] == pytest.approx(ref[k], abs=1e-12), (k, b)
    assert saw_absent, "test data should include resamples without class 3"


def test_evaluate_point_estimates_confusion_and_ci():
    yt, yp = _labels(800, 4, 0)
    r = evaluate(torch.as_tensor(yt), torch.as_tensor(yp), NAMES4, n_bootstrap=500, seed=0)
    ref = _sk(yt, yp, 4)
    for k in METRICS:
        assert r[k] == pytest.approx(ref[k], abs=1e-12)
        lo, hi = r[f"{k}_ci"]
        assert lo < r[k] < hi
        # bootstrap SE of a proportion-like metric with n=800 is ~1.7 points: the 95% interval is ~4-10 points wide
        assert 0.02 < hi - lo < 0.12, (k, lo, hi)
    np.testing.assert_array_equal(r["confusion"], confusion_matrix(yt, yp, labels=range(4)))
    assert r["n"] == 800 and r["class_names"] == NAMES4 and r["classes_absent_from_y_true"] == []


@pytest.mark.parametrize("metric", ["balanced_accuracy", "macro_f1"])
def test_bootstrap_matches_an_index_bootstrap_of_sklearn(metric):
    # The multinomial draw of the confusion counts has the distribution of resampling images: its percentile
    # interval must match scipy's index bootstrap of scikit-learn's metric up to Monte-Carlo error (SE of the
    # difference ~0.003 here).
    yt, yp = _labels(300, 4, 5, skew=[4, 3, 2, 1])
    fn = {"balanced_accuracy": balanced_accuracy_score,
          "macro_f1": lambda a, b: f1_score(a, b, average="macro", labels=range(4), zero_division=0)}[metric]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = stats.bootstrap((yt, yp), fn, paired=True, vectorized=False, n_resamples=1000, method="percentile",
                              random_state=1).confidence_interval
    ours = evaluate(yt, yp, NAMES4, n_bootstrap=4000, seed=0)[f"{metric}_ci"]
    assert ours == pytest.approx((ref.low, ref.high), abs=0.012), (ours, ref)
    assert ours[1] - ours[0] > 0.05  # a real interval (SE ~ 0.03 at N = 300)


def test_accuracy_bootstrap_matches_scipy_at_large_n():
    yt, yp = _labels(27_558, 2, 0)
    ref = stats.bootstrap((yt, yp), lambda a, b, axis=-1: (a == b).mean(axis=axis), paired=True, vectorized=True,
                          n_resamples=1000, method="percentile", random_state=0, batch=100).confidence_interval
    a = evaluate(yt, yp, ["x", "y"], n_bootstrap=1000, seed=0)
    assert a["accuracy_ci"] == pytest.approx((ref.low, ref.high), abs=0.0015)
    assert a["accuracy_ci"] == evaluate(yt, yp, ["x", "y"], n_bootstrap=1000, seed=0)["accuracy_ci"]


def test_bootstrap_is_seeded():
    yt, yp = _labels(300, 3, 1)
    a = evaluate(yt, yp, ["x", "y", "z"], n_bootstrap=200, seed=5)
    b = evaluate(yt, yp, ["x", "y", "z"], n_bootstrap=200, seed=5)
    c = evaluate(yt, yp, ["x", "y", "z"], n_bootstrap=200, seed=6)
    assert a["accuracy_ci"] == b["accuracy_ci"] and a["macro_f1_ci"] == b["macro_f1_ci"]
    assert a["macro_f1_ci"] != c["macro_f1_ci"]


def test_bootstrap_ci_covers_truth_roughly():
    # The percentile interval should contain the population accuracy 0.7 in most repetitions (nominal 95%).
    rng = np.random.default_rng(0)
    hits = 0
    for rep in range(40):
        yt = rng.integers(0, 2, size=400)
        yp = np.where(rng.random(400) < 0.7, yt, 1 - yt)
        lo, hi = evaluate(yt, yp, ["n", "p"], n_bootstrap=300, seed=rep)["accuracy_ci"]
        hits += lo <= 0.7 <= hi
    assert hits >= 33  # nominal 38/40; a broken interval (e.g. too narrow by 2x) gives ~27


def test_no_bootstrap():
    r = evaluate([0, 1, 1], [0, 1, 0], ["a", "b"], n_bootstrap=0)
    assert r["accuracy_ci"] is None and r["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "yt, yp, names, match",
    [
        ([0, 1], [0, 1, 1], ["a", "b"], "y_pred has 3"),
        ([0, 2], [0, 1], ["a", "b"], "y_true.*outside"),
        ([0, 1], [0, -1], ["a", "b"], "y_pred.*outside"),
        ([0.5, 1], [0, 1], ["a", "b"], "integer"),
        ([float("nan"), 1], [0, 1], ["a", "b"], "integer"),
        ([], [], ["a", "b"], "empty"),
        ([[0, 1]], [[0, 1]], ["a", "b"], "1-D"),
        ([0, 1], [0, 1], [], "class_names"),
        ([0, 1], [0, 1], ["a", "a"], "duplicates"),
    ],
)
def test_evaluate_rejects_bad_input(yt, yp, names, match):
    with pytest.raises(KPLInputError, match=match):
        evaluate(yt, yp, names, n_bootstrap=0)


def test_evaluate_rejects_bad_bootstrap_args():
    with pytest.raises(KPLInputError, match="n_bootstrap"):
        evaluate([0, 1], [0, 1], ["a", "b"], n_bootstrap=-1)
    with pytest.raises(KPLInputError, match="confidence"):
        evaluate([0, 1], [0, 1], ["a", "b"], confidence=95)


def test_absent_class_reported_and_excluded_from_balanced_accuracy():
    r = evaluate([0, 0, 1, 1], [0, 2, 1, 1], ["a", "b", "c"], n_bootstrap=0)
    assert r["classes_absent_from_y_true"] == ["c"]
    assert r["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    # macro-F1 over all 3 classes: a: 2*1/(2+0+1)=2/3, b: 1, c: 0 (one FP)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_majority_baseline_uses_test_labels():
    yt = np.array([2] * 50 + [0] * 30 + [1] * 20)
    r = majority_baseline(yt, ["a", "b", "c"], n_bootstrap=100)
    assert r["majority_class"] == "c"
    assert r["accuracy"] == pytest.approx(0.5)
    assert r["balanced_accuracy"] == pytest.approx(1 / 3)
    assert r["macro_f1"] == pytest.approx((2 * 50 / (100 + 50)) / 3)
    assert "TEST labels" in r["note"]


def test_chance_baseline_matches_brute_force_simulation():
    yt = np.array([0] * 70 + [1] * 20 + [2] * 10)
    r = chance_baseline(["a", "b", "c"], yt, n_sim=4000, seed=0)
    assert r["accuracy"] == pytest.approx(1 / 3) and r["balanced_accuracy"] == pytest.approx(1 / 3)
    # independent brute force: random predictions through sklearn
    rng = np.random.default_rng(123)
    brute = np.mean([f1_score(yt, rng.integers(0, 3, 100), average="macro", labels=[0, 1, 2], zero_division=0)
                     for _ in range(600)])
    assert r["macro_f1"] == pytest.approx(brute, abs=0.012)
    support = np.array([70, 20, 10])
    assert r["macro_f1_plugin"] == pytest.approx(np.mean(2 * support / (100 + 3 * support)))
    lo, hi = r["accuracy_ci"]
    assert lo < 1 / 3 < hi and hi - lo > 0.1  # random guessing on 100 images: ±~9 points


# ------------------------------------------------------------------------------------------ paired comparison
def test_paired_identical_predictions():
    yt, yp = _labels(500, 3, 2)
    r = paired_comparison(yt, yp, yp.copy(), n_bootstrap=300)
    assert isinstance(r, PairedComparison)
    assert r.difference == 0 and r.p_value == 1.0 and r.a_only == r.b_only == 0
    assert r.difference_ci == (0.0, 0.0) and r.accuracy_a == r.accuracy_b == pytest.approx(accuracy_score(yt, yp))


def _thirty_more_for_b():
    # 200 images: both right on 80, a only on 10, b only on 40, both wrong on 70 -> b right on 30 more images
    yt = np.zeros(200, dtype=int)
    a = np.r_[np.zeros(80), np.zeros(10), np.ones(40), np.ones(70)].astype(int)
    b = np.r_[np.zeros(80), np.ones(10), np.zeros(40), np.ones(70)].astype(int)
    perm = np.random.default_rng(0).permutation(200)
    return yt[perm], a[perm], b[perm]


def test_paired_thirty_more_right_exact_mcnemar():
    yt, a, b = _thirty_more_for_b()
    r = paired_comparison(yt, a, b, n_bootstrap=4000, seed=1)
    assert (r.a_only, r.b_only, r.n) == (10, 40, 200)
    assert r.accuracy_a == pytest.approx(0.45) and r.accuracy_b == pytest.approx(0.60)
    assert r.difference == pytest.approx(-30 / 200)
    # exact McNemar by hand: two-sided binomial tail of 10 successes in 50 fair trials
    by_hand = 2 * sum(math.comb(50, k) for k in range(11)) / 2**50
    assert r.p_value == pytest.approx(by_hand, rel=1e-9) and r.p_value < 1e-4
    lo, hi = r.difference_ci
    assert lo < -0.15 < hi < 0
    # the paired bootstrap equals scipy's index bootstrap of the per-image difference (same images for both)
    ref = stats.bootstrap(((a == yt).astype(float), (b == yt).astype(float)),
                          lambda x, y, axis=-1: (x - y).mean(axis=axis), paired=True, vectorized=True,
                          n_resamples=4000, method="percentile", random_state=2).confidence_interval
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=0.01)
    swapped = paired_comparison(yt, b, a, n_bootstrap=0)
    assert swapped.difference == -r.difference and swapped.p_value == r.p_value and swapped.difference_ci is None


def test_paired_agrees_with_statsmodels_mcnemar():
    mcnemar = pytest.importorskip("statsmodels.stats.contingency_tables").mcnemar
    yt, a, b = _thirty_more_for_b()
    r = paired_comparison(yt, a, b, n_bootstrap=0)
    assert r.p_value == pytest.approx(mcnemar([[80, 10], [40, 70]], exact=True).pvalue, rel=1e-9)


def test_paired_is_seeded_and_validates():
    yt, a, b = _thirty_more_for_b()
    assert paired_comparison(yt, a, b, seed=3) == paired_comparison(yt, a, b, seed=3)
    assert paired_comparison(yt, a, b, seed=3).difference_ci != paired_comparison(yt, a, b, seed=4).difference_ci
    with pytest.raises(KPLInputError, match="pred_b has 3"):
        paired_comparison([0, 1], [0, 1], [0, 1, 1])
    with pytest.raises(KPLInputError, match="pred_a.*outside"):
        paired_comparison([0, 1], [0, -1], [0, 1])


def test_paired_table():
    yt, a, b = _thirty_more_for_b()
    t = paired_table({"a vs b": paired_comparison(yt, a, b, n_bootstrap=100)})
    assert t.loc["a vs b", "a − b (acc. pts)"] == "-15.0"
    assert (t.loc["a vs b", "a only"], t.loc["a vs b", "b only"]) == (10, 40)
    assert t.loc["a vs b", "interval"].startswith("[-")


# ----------------------------------------------------------------------------------------------------- tables
def _row(method="kpl", **kw):
    r = evaluate([0, 1, 1, 0, 1], [0, 1, 0, 0, 1], ["a", "b"], n_bootstrap=50)
    return {**r, "dataset": "toy", "method": method, "encoder": "SIMULATED (not a real encoder)", **kw}


def test_results_table_display_and_raw():
    rows = [_row(kb="kb-1"), _row("zero_shot")]
    df = results_table(rows)
    assert list(df.columns[:10]) == ["dataset", "method", "encoder", "n", "accuracy", "accuracy_ci",
                                     "balanced_accuracy", "balanced_accuracy_ci", "macro_f1", "macro_f1_ci"]
    assert df.loc[0, "accuracy"] == "80.0"
    assert df.loc[0, "accuracy_ci"].startswith("[") and df.loc[0, "accuracy_ci"].endswith("]")
    assert "kb" in df.columns and "confusion" not in df.columns and "seed" not in df.columns
    raw = results_table(rows, raw=True)
    assert raw.loc[0, "accuracy"] == pytest.approx(0.8)
    assert raw.loc[0, "accuracy_ci_lo"] <= 0.8 <= raw.loc[0, "accuracy_ci_hi"]
    assert "seed" in raw.columns


def test_results_table_accepts_baselines():
    yt = np.array([0, 0, 0, 1])
    df = results_table([
        {**majority_baseline(yt, ["a", "b"], n_bootstrap=20), "dataset": "toy", "encoder": "none (label-only)"},
        {**chance_baseline(["a", "b"], yt, n_sim=50), "dataset": "toy", "encoder": "none (label-only)"},
    ])
    assert list(df["method"]) == ["majority_class", "chance_uniform"]
    assert df.loc[1, "accuracy"] == "50.0"


@pytest.mark.parametrize("bad", [{"encoder": None}, {"encoder": ""}, {"dataset": None}])
def test_results_table_requires_encoder_dataset(bad):
    row = _row()
    row.update(bad)
    with pytest.raises(KPLInputError, match="encoder|dataset"):
        results_table([row])


def test_results_table_row_without_encoder_key():
    row = _row()
    del row["encoder"]
    with pytest.raises(KPLInputError, match="encoder"):
        results_table([_row(), row])


def test_results_table_rejects_missing_metric_and_empty():
    row = _row()
    del row["macro_f1"]
    with pytest.raises(KPLInputError, match="macro_f1"):
        results_table([row])
    with pytest.raises(KPLInputError):
        results_table([])


def _rows(datasets=("a", "b")):
    y = np.array([0, 0, 1, 1, 1, 0])
    rows = []
    for ds in datasets:
        for method, pred in (("m1", y), ("m2", np.zeros_like(y))):
            rows.append({**evaluate(y, pred, ["x", "z"], n_bootstrap=50, seed=0), "dataset": ds, "method": method,
                         "encoder": "ENC-1"})
        rows.append({**evaluate(y, np.zeros_like(y), ["x", "z"], n_bootstrap=0), "dataset": ds,
                     "method": "majority_class", "encoder": "none (reference line)"})
    return rows


def test_compact_table_one_dataset_names_encoder_once_in_the_caption():
    t = compact_table(_rows(("a",)))
    assert list(t.index) == ["m1", "m2", "majority_class"]
    assert list(t.columns) == ["accuracy", "balanced acc."]
    assert "encoder" not in t.columns and "ENC-1" not in t.to_string()
    assert t.attrs["caption"].startswith("Encoder: ENC-1; dataset: a.") and "95% bootstrap" in t.attrs["caption"]
    assert t.loc["m1", "accuracy"].startswith("100.0 [") and t.loc["majority_class", "accuracy"] == "50.0"
    plain = compact_table(_rows(("a",)), metrics=["macro_f1"], intervals=False)
    assert list(plain.columns) == ["macro-F1"] and "[" not in plain.to_string() and "interval" not in \
        plain.attrs["caption"]


def test_compact_table_several_datasets():
    rows = _rows()
    t = compact_table(rows, metrics=["accuracy"])
    assert list(t.columns) == ["a", "b"] and list(t.index) == ["m1", "m2", "majority_class"]
    assert t.equals(compact_table(rows, "accuracy"))  # one metric may be named alone
    both = compact_table(rows, metrics=["accuracy", "macro_f1"])
    assert both.columns.tolist() == [("a", "accuracy"), ("a", "macro-F1"), ("b", "accuracy"), ("b", "macro-F1")]
    with pytest.raises(KPLInputError, match="exactly one encoder"):
        compact_table(rows + [{**rows[0], "encoder": "ENC-2"}])
    with pytest.raises(KPLInputError, match="metrics"):
        compact_table(rows, ["auc"])
