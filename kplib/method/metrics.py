r"""Classification metrics with seeded bootstrap intervals, reference baselines, a paired test and result tables.

Point estimates are scikit-learn's: ``accuracy_score``, ``balanced_accuracy_score`` (mean recall over the classes
present in ``y_true``), ``f1_score(average="macro", labels=all C classes, zero_division=0)`` and
``confusion_matrix``; :func:`metrics_from_confusion` computes the same numbers from confusion counts of many resamples.

**Bootstrap.** A percentile interval over resamples of the test set (N images drawn with replacement). Only the
pairs (true class, predicted class) of the drawn images matter, and drawing N images with replacement draws each
of the :math:`C^2` cells with probability :math:`n_{jk}/N`, so the confusion matrix of a resample is exactly
:math:`\tilde n \sim \mathrm{Multinomial}\big(N, (n_{jk}/N)_{j,k}\big)`. One ``multinomial`` call gives every
resample in :math:`O(BC^2)`, independent of N — the same distribution as drawing image indices
(``scipy.stats.bootstrap(..., paired=True, method="percentile")``; ``tests/test_metrics.py`` compares the two), at
N = 27,558 in milliseconds instead of seconds.

**Paired comparison** (:func:`paired_comparison`). Two methods scored on the same images: the accuracy difference
with a paired bootstrap interval (the same resampled images for both, i.e. a multinomial over the four cells
right/wrong × right/wrong), and the exact McNemar test — under :math:`H_0` each of the :math:`n_{10}+n_{01}`
discordant images is equally likely to favour either method, so :math:`n_{10}\sim\mathrm{Bin}(n_{10}+n_{01}, 1/2)`
(``scipy.stats.binomtest``, two-sided).

An interval says how much a number moves under resampling of *this* test set; nothing about other datasets,
encoders, or a K chosen on the test labels.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn import metrics as skm

from ..errors import KPLInputError
from ..params import Interval, check

__all__ = ["METRICS", "PairedComparison", "chance_baseline", "compact_table", "evaluate", "majority_baseline",
           "metrics_from_confusion", "paired_comparison", "paired_table", "results_table"]

METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1")
SHORT_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "macro_f1": "macro-F1"}
_LEAD = ("dataset", "method", "encoder", "n")
_BOOKKEEPING = ("n_bootstrap", "confidence", "seed", "n_sim", "macro_f1_mc_se", "macro_f1_plugin")  # raw only
_N_BOOTSTRAP = Interval(int, 0)
_CONFIDENCE = Interval(float, 0, 1, closed="neither")


def _class_names(class_names: Sequence[str]) -> list[str]:
    names = [] if isinstance(class_names, str) else [str(n) if isinstance(n, np.str_) else n for n in class_names]
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise KPLInputError(f"class_names must be a non-empty list of class-name strings, one per class and no "
                            f"duplicates, got {class_names!r}")
    return names


def _labels(y: Any, name: str, n_classes: int | None) -> np.ndarray:
    """1-D int64 class indices in [0, n_classes) (lists, numpy arrays and torch tensors accepted)."""
    arr = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y)
    if arr.ndim != 1:
        raise KPLInputError(f"{name} must be 1-D (one class index per image), got shape {arr.shape}")
    if arr.size == 0:
        raise KPLInputError(f"{name} is empty; metrics need at least one image")
    if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == arr.round()))):
        raise KPLInputError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= (n_classes or np.iinfo(np.int64).max))
    if bad.any():
        raise KPLInputError(f"{name} has {int(bad.sum())} value(s) outside [0, {n_classes}) (e.g. "
                            f"{int(arr[bad][0])}); labels must index class_names, which has {n_classes} entries")
    return arr


def _pair(y_true: Any, y_pred: Any, n_classes: int | None, pred_name: str = "y_pred") -> tuple[np.ndarray, np.ndarray]:
    yt, yp = _labels(y_true, "y_true", n_classes), _labels(y_pred, pred_name, n_classes)
    if yt.shape != yp.shape:
        raise KPLInputError(f"y_true has {yt.size} entries but {pred_name} has {yp.size}; they must match")
    return yt, yp


def _percentile(values: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro-F1 of confusion counts (..., C, C) (rows = true class), as scikit-learn.

    Balanced accuracy averages recall over the classes with a true example; macro-F1 averages
    :math:`2TP/(2TP+FP+FN)` over all C classes, 0 where the denominator is 0.
    """
    conf = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    support, predicted = conf.sum(axis=-1), conf.sum(axis=-2)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=support + predicted > 0)
    return {"accuracy": tp.sum(axis=-1) / support.sum(axis=-1),
            "balanced_accuracy": recall.sum(axis=-1) / present.sum(axis=-1), "macro_f1": f1.mean(axis=-1)}


def evaluate(y_true: Any, y_pred: Any, class_names: Sequence[str], n_bootstrap: int = 1000,
             confidence: float = 0.95, seed: int = 0) -> dict:
    """Accuracy, balanced accuracy, macro-F1, confusion matrix and seeded percentile bootstrap intervals.

    Returns a dict: ``accuracy``, ``balanced_accuracy``, ``macro_f1`` (in [0, 1]); ``<metric>_ci`` = ``(lo, hi)``
    (``None`` when ``n_bootstrap=0``); ``confusion`` (C, C) rows = true class; ``n``, ``class_names``,
    ``n_bootstrap``, ``confidence``, ``seed``; ``classes_absent_from_y_true`` (balanced accuracy skips them).
    """
    names = _class_names(class_names)
    check("n_bootstrap", n_bootstrap, _N_BOOTSTRAP)
    check("confidence", confidence, _CONFIDENCE)
    yt, yp = _pair(y_true, y_pred, len(names))
    labels = list(range(len(names)))
    conf = skm.confusion_matrix(yt, yp, labels=labels)
    with warnings.catch_warnings():  # absent classes are reported in the result instead
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")
        warnings.filterwarnings("ignore", message=".*A single label was found.*")
        balanced = skm.balanced_accuracy_score(yt, yp)
    out = {"accuracy": float(skm.accuracy_score(yt, yp)), "balanced_accuracy": float(balanced),
           "macro_f1": float(skm.f1_score(yt, yp, average="macro", labels=labels, zero_division=0)),
           "confusion": conf, "n": int(yt.size), "class_names": names, "n_bootstrap": int(n_bootstrap),
           "confidence": float(confidence), "seed": int(seed),
           "classes_absent_from_y_true": [names[k] for k in labels if conf[k].sum() == 0]}
    draws = np.random.default_rng(seed).multinomial(yt.size, conf.ravel() / yt.size, size=n_bootstrap)
    boot = metrics_from_confusion(draws.reshape(n_bootstrap, *conf.shape))
    return {**out, **{f"{k}_ci": _percentile(boot[k], confidence) if n_bootstrap else None for k in METRICS}}


def majority_baseline(y_true: Any, class_names: Sequence[str], n_bootstrap: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """Always predict the most frequent class **of the test labels** (ties: lowest index).

    It reads the test labels, so it is a reference line for reading results, not a method. Returns
    :func:`evaluate`'s dict plus ``method="majority_class"``, ``majority_class`` and ``note``.
    """
    names = _class_names(class_names)
    yt = _labels(y_true, "y_true", len(names))
    majority = int(np.argmax(np.bincount(yt, minlength=len(names))))
    out = evaluate(yt, np.full_like(yt, majority), names, n_bootstrap, confidence, seed)
    return {**out, "method": "majority_class", "majority_class": names[majority],
            "note": "always predicts the most frequent class of the TEST labels (a reference line, not a method)"}


def chance_baseline(class_names: Sequence[str], y_true: Any, n_sim: int = 2000, confidence: float = 0.95,
                    seed: int = 0) -> dict:
    r"""Expected metrics of guessing each image's class uniformly at random.

    Accuracy and balanced accuracy are exactly :math:`1/C`. Macro-F1 has no closed form; it is the mean over
    ``n_sim`` seeded random guessers, each true class's confusion row drawn as
    :math:`\mathrm{Multinomial}(n_c, 1/C)` (what uniform guessing produces), with its Monte-Carlo standard error
    ``macro_f1_mc_se`` and the plug-in value :math:`\frac1C\sum_c 2n_c/(N + Cn_c)` as ``macro_f1_plugin``.
    ``<metric>_ci`` is the central interval over the simulated guessers (how far luck moves a random guesser).
    """
    names = _class_names(class_names)
    c = len(names)
    check("n_sim", n_sim, Interval(int, 1))
    check("confidence", confidence, _CONFIDENCE)
    support = np.bincount(_labels(y_true, "y_true", c), minlength=c)
    rng = np.random.default_rng(seed)
    sim = metrics_from_confusion(np.stack([rng.multinomial(s, np.full(c, 1 / c), size=n_sim) for s in support], 1))
    n = int(support.sum())
    out = {"method": "chance_uniform", "accuracy": 1 / c, "balanced_accuracy": 1 / c,
           "macro_f1": float(sim["macro_f1"].mean()),
           "macro_f1_mc_se": float(sim["macro_f1"].std(ddof=1) / np.sqrt(n_sim)) if n_sim > 1 else float("nan"),
           "macro_f1_plugin": float(np.mean(2 * support / (n + c * support))), "n": n, "class_names": names,
           "n_sim": int(n_sim), "confidence": float(confidence), "seed": int(seed),
           "note": "expected score of a uniform random guess (macro-F1 simulated)"}
    return {**out, **{f"{k}_ci": _percentile(sim[k], confidence) for k in METRICS}}


@dataclass(frozen=True)
class PairedComparison:
    """Method a against method b on the same images (``difference = accuracy_a - accuracy_b``)."""

    accuracy_a: float
    accuracy_b: float
    difference: float
    difference_ci: tuple[float, float] | None  # paired percentile bootstrap
    a_only: int  # images a gets right and b wrong (n_10)
    b_only: int  # images b gets right and a wrong (n_01)
    p_value: float  # exact McNemar: two-sided binomial test of a_only among the discordant pairs
    n: int
    n_bootstrap: int
    confidence: float
    seed: int


def paired_comparison(y_true: Any, pred_a: Any, pred_b: Any, n_bootstrap: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> PairedComparison:
    """Accuracy difference of two methods on the same images, its paired bootstrap interval and McNemar's exact p.

    Only whether each method is right matters, so labels need no class list. With no discordant image the methods
    cannot be told apart: difference 0 and p = 1.
    """
    check("n_bootstrap", n_bootstrap, _N_BOOTSTRAP)
    check("confidence", confidence, _CONFIDENCE)
    yt = _labels(y_true, "y_true", None)
    a = _pair(yt, pred_a, None, "pred_a")[1] == yt
    b = _pair(yt, pred_b, None, "pred_b")[1] == yt
    n = yt.size
    cells = np.array([np.sum(a & b), np.sum(a & ~b), np.sum(~a & b), np.sum(~a & ~b)])  # both, a only, b only, none
    a_only, b_only = int(cells[1]), int(cells[2])
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    draws = np.random.default_rng(seed).multinomial(n, cells / n, size=n_bootstrap)
    ci = _percentile((draws[:, 1] - draws[:, 2]) / n, confidence) if n_bootstrap else None
    return PairedComparison(float(a.mean()), float(b.mean()), (a_only - b_only) / n, ci, a_only, b_only,
                            float(min(p, 1.0)), int(n), int(n_bootstrap), float(confidence), int(seed))


def _pct(v: Any) -> str:
    return "–" if v is None or math.isnan(v) else f"{100 * float(v):.1f}"


def _ci(ci: Any) -> str:
    return "–" if ci is None else f"[{100 * float(ci[0]):.1f}, {100 * float(ci[1]):.1f}]"


def results_table(rows: list[dict], raw: bool = False) -> pd.DataFrame:
    """One row per result: ``dataset, method, encoder, n``, then each metric and its interval, then extra keys.

    Every row is a dict from :func:`evaluate` (or a baseline) plus ``dataset``, ``method`` and ``encoder`` (a number
    without the encoder that produced it is not reported). Display form: percent with one decimal, intervals as
    ``"[lo, hi]"``. ``raw=True``: values in [0, 1], intervals split into ``<metric>_ci_lo`` / ``_ci_hi``, and the
    bookkeeping keys (``seed``, ``n_bootstrap``, ...). Other scalar keys (``kb``, ``k``, ``note``) follow as
    columns; arrays such as ``confusion`` are dropped.
    """
    if not isinstance(rows, (list, tuple)) or not rows:
        raise KPLInputError("rows must be a non-empty list of result dicts (from evaluate)")
    skip = {*_LEAD, *METRICS, *(f"{m}_ci" for m in METRICS), "confusion", "class_names"}
    records = []
    for i, row in enumerate(rows):
        for key in ("dataset", "method", "encoder"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key].strip():
                what = "the encoder that produced it (e.g. EncoderIdentity.label)" if key == "encoder" else key
                raise KPLInputError(f"rows[{i}] lacks {key!r}: every result must carry {what}")
        missing = [m for m in METRICS if m not in row]
        if missing:
            raise KPLInputError(f"rows[{i}] ({row['method']!r}) lacks {missing}; pass the dict from evaluate()")
        rec = {k: row.get(k) for k in _LEAD}
        for m in METRICS:
            ci = row.get(f"{m}_ci")
            if raw:
                lo, hi = (float("nan"), float("nan")) if ci is None else map(float, ci)
                rec.update({m: float(row[m]), f"{m}_ci_lo": lo, f"{m}_ci_hi": hi})
            else:
                rec.update({m: _pct(row[m]), f"{m}_ci": _ci(ci)})
        rec.update({k: v for k, v in row.items() if k not in skip and (raw or k not in _BOOKKEEPING)
                    and (v is None or isinstance(v, (str, int, float, bool, np.integer, np.floating)))})
        records.append(rec)
    return pd.DataFrame.from_records(records)


def compact_table(rows: list[dict], metrics: Sequence[str] = ("accuracy", "balanced_accuracy"),
                  intervals: bool = True) -> pd.DataFrame:
    """Short table for a chapter: one row per method, cells ``"81.2 [79.0, 83.1]"`` (%), the encoder in a caption.

    Columns are the ``metrics`` (short names) for one dataset, the datasets for one metric, else (dataset, metric).
    The encoder and the dataset, named once, go to ``table.attrs["caption"]`` (show it with
    ``table.style.set_caption(table.attrs["caption"])``). Reference lines that use no model (``encoder`` starting
    with ``"none"``: majority class, chance) sit beside the methods; rows of more than one model encoder are refused.
    """
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics or any(m not in METRICS for m in metrics):
        raise KPLInputError(f"metrics must be a non-empty list from {list(METRICS)}, got {list(metrics)}")
    raw = results_table(rows, raw=True)
    encoders = sorted({e for e in raw["encoder"] if not e.lower().startswith("none")})
    if len(encoders) != 1:
        raise KPLInputError(f"compact_table needs rows from exactly one encoder (plus reference lines), got "
                            f"{encoders}; make one table per encoder")
    datasets = list(dict.fromkeys(raw["dataset"]))
    table = pd.DataFrame(index=list(dict.fromkeys(raw["method"])), dtype=object, columns=pd.MultiIndex.from_product(
        [datasets, [SHORT_NAMES[m] for m in metrics]], names=["dataset", "metric"]))
    for _, r in raw.iterrows():
        for m in metrics:
            lo, hi = r[f"{m}_ci_lo"], r[f"{m}_ci_hi"]
            interval = f" {_ci((lo, hi))}" if intervals and not math.isnan(lo) else ""
            table.loc[r["method"], (r["dataset"], SHORT_NAMES[m])] = _pct(r[m]) + interval
    if len(datasets) == 1 or len(metrics) == 1:
        table.columns = table.columns.droplevel(0 if len(datasets) == 1 else 1)
    confidence = next((r["confidence"] for r in rows if r.get("n_bootstrap")), 0.95)
    what = f"Encoder: {encoders[0]}" + (f"; dataset: {datasets[0]}" if len(datasets) == 1 else "")
    table.attrs["caption"] = what + ". Percent" + (f", {confidence:.0%} bootstrap interval in brackets." if intervals
                                                   else ".")
    return table


def paired_table(comparisons: dict[str, PairedComparison]) -> pd.DataFrame:
    """The "what produces the gain" table: one row per comparison name (e.g. ``"KPL vs random words"``).

    Columns: the difference in accuracy points with its interval, the discordant counts and McNemar's p.
    """
    return pd.DataFrame.from_records([{
        "comparison": name, "a − b (acc. pts)": f"{100 * c.difference:+.1f}",
        "interval": _ci(c.difference_ci), "a only": c.a_only, "b only": c.b_only,
        "McNemar p": f"{c.p_value:.2g}", "n": c.n} for name, c in comparisons.items()]).set_index("comparison")
