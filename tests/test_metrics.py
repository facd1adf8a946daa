"""Tests of kplib.metrics: vectorised metrics equal scikit-learn's, seeded bootstrap, baselines, tables."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

from kplib.errors import KPLInputError
from kplib.metrics import (
    METRICS,
    chance_baseline,
    confusion_counts,
    evaluate,
    majority_baseline,
    metrics_from_confusion,
    results_table,
)

NAMES4 = ["a", "b", "c", "d"]


def _sk(yt, yp, c):
    labels = list(range(c))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bal = balanced_accuracy_score(yt, yp)
    return {
        "accuracy": accuracy_score(yt, yp),
        "balanced_accuracy": bal,
        "macro_f1": f1_score(yt, yp, average="macro", labels=labels, zero_division=0),
    }


def _labels(n, c, seed, skew=None):
    rng = np.random.default_rng(seed)
    p = None if skew is None else np.asarray(skew) / np.sum(skew)
    yt = rng.choice(c, size=n, p=p)
    # predictions: correct with prob 0.6, otherwise a random class biased towards class 0
    yp = np.where(rng.random(n) < 0.6, yt, rng.choice(c, size=n, p=[0.7] + [0.3 / (c - 1)] * (c - 1)))
    return yt, yp


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_point_estimate_equals_sklearn(seed):
    yt, yp = _labels(500, 4, seed, skew=[8, 4, 2, 1])
    ours = metrics_from_confusion(confusion_counts(yt, yp, 4))
    ref = _sk(yt, yp, 4)
    for k in METRICS:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k
    np.testing.assert_array_equal(confusion_counts(yt, yp, 4), confusion_matrix(yt, yp, labels=range(4)))


def test_vectorised_resamples_equal_sklearn_including_absent_classes():
    # a rare class (5 of 60) is absent from some resamples: balanced accuracy must drop it like sklearn does,
    # macro-F1 must count it as 0 when it is absent from both labels and predictions.
    yt, yp = _labels(60, 4, 7, skew=[20, 20, 15, 1])
    rng = np.random.default_rng(3)
    idx = rng.integers(0, yt.size, size=(40, yt.size))
    ours = metrics_from_confusion(confusion_counts(yt, yp, 4, idx))
    saw_absent = False
    for b in range(idx.shape[0]):
        ref = _sk(yt[idx[b]], yp[idx[b]], 4)
        saw_absent |= not np.any(yt[idx[b]] == 3)
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
    assert r["confusion"].shape == (4, 4) and r["confusion"].sum() == 800
    assert r["n"] == 800 and r["class_names"] == NAMES4 and r["classes_absent_from_y_true"] == []


def test_bootstrap_is_seeded():
    yt, yp = _labels(300, 3, 1)
    a = evaluate(yt, yp, ["x", "y", "z"], n_bootstrap=200, seed=5)
    b = evaluate(yt, yp, ["x", "y", "z"], n_bootstrap=200, seed=5)
    c = evaluate(yt, yp, ["x", "y", "z"], n_bootstrap=200, seed=6)
    assert a["accuracy_ci"] == b["accuracy_ci"]
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


def test_bootstrap_large_n_is_seeded_and_bracketing():
    # (speed is measured by benchmarks, not tests: 1000 resamples at N = 27k took ~0.25 s CPU when written)
    yt, yp = _labels(27_000, 4, 0)
    a = evaluate(yt, yp, NAMES4, n_bootstrap=1000, seed=0)
    b = evaluate(yt, yp, NAMES4, n_bootstrap=1000, seed=0)
    assert a["accuracy_ci"] == b["accuracy_ci"]
    assert a["accuracy_ci"][0] < a["accuracy"] < a["accuracy_ci"][1]


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
    assert r["macro_f1_plugin"] == pytest.approx(np.mean(2 * np.array([70, 20, 10]) / (100 + 3 * np.array([70, 20, 10]))))
    lo, hi = r["accuracy_ci"]
    assert lo < 1 / 3 < hi and hi - lo > 0.1  # random guessing on 100 images: ±~9 points


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


def test_compact_table_pivots_one_metric_and_names_the_encoder():
    from kplib.metrics import compact_table, evaluate

    y = np.array([0, 0, 1, 1, 1, 0])
    rows = []
    for ds in ("a", "b"):
        for method, pred in (("m1", y), ("m2", np.zeros_like(y))):
            rows.append({**evaluate(y, pred, ["x", "z"], n_bootstrap=50, seed=0), "dataset": ds, "method": method,
                         "encoder": "ENC-1"})
        rows.append({**evaluate(y, np.zeros_like(y), ["x", "z"], n_bootstrap=0), "dataset": ds,
                     "method": "majority_class", "encoder": "none (reference line)"})
    t = compact_table(rows, "accuracy")
    assert list(t.index) == ["m1", "m2", "majority_class"]
    assert t.columns.get_level_values(0).unique().tolist() == ["encoder: ENC-1"]
    assert t.columns.get_level_values(1).tolist() == ["a", "b"]
    assert t.iloc[0, 0].startswith("100.0 [")
    assert t.iloc[2, 0] == "50.0"  # no interval when n_bootstrap=0
    with pytest.raises(KPLInputError, match="exactly one encoder"):
        compact_table(rows + [{**rows[0], "encoder": "ENC-2"}], "accuracy")
    with pytest.raises(KPLInputError, match="metric"):
        compact_table(rows, "auc")
