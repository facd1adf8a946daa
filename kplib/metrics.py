"""Classification metrics with seeded bootstrap confidence intervals, reference baselines and result tables.

Point estimates come from scikit-learn (``accuracy_score``, ``balanced_accuracy_score``,
``f1_score(average="macro", labels=all classes, zero_division=0)``, ``confusion_matrix(labels=range(C))``).
Bootstrap intervals are percentile intervals over resamples of the test set (images drawn with replacement, same
size N). They are computed from per-resample confusion counts with ``np.bincount`` instead of calling scikit-learn
once per resample; ``tests/test_metrics.py`` checks that the vectorised formulas equal scikit-learn's.

Metric definitions (as scikit-learn computes them):

- accuracy: fraction of correct predictions.
- balanced accuracy: mean per-class recall over the classes *present in y_true* (scikit-learn drops classes with no
  true example; in a bootstrap resample a rare class can be absent and is then dropped the same way).
- macro-F1: unweighted mean over *all* C classes of ``2 TP / (2 TP + FP + FN)``; a class with TP = FP = FN = 0
  scores 0 (``zero_division=0``), so a class absent from both labels and predictions pulls the mean down.

An interval says how much the number would move under resampling of *this* test set; it says nothing about
other datasets, encoders, or the K chosen on test labels.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

from .errors import KPLInputError

__all__ = [
    "METRICS",
    "evaluate",
    "confusion_counts",
    "metrics_from_confusion",
    "majority_baseline",
    "chance_baseline",
    "results_table",
]

METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1")
_TABLE_LEAD = ("dataset", "method", "encoder", "n")
_BOOKKEEPING = ("n_bootstrap", "confidence", "seed", "n_sim", "macro_f1_mc_se", "macro_f1_plugin")  # raw=True only
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000  # indices drawn per chunk (bounds memory: 32 MB of int64)


# ----------------------------------------------------------------------------------------------- validation
def _check_class_names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str) or not hasattr(class_names, "__len__") or len(class_names) == 0:
        raise KPLInputError("class_names must be a non-empty list of class-name strings (one per class)")
    names = [str(n) if isinstance(n, np.str_) else n for n in class_names]
    if not all(isinstance(n, str) for n in names):
        raise KPLInputError("class_names must contain only strings")
    if len(set(names)) != len(names):
        raise KPLInputError(f"class_names contains duplicates: {names}")
    return names


def _as_labels(y: Any, name: str, n_classes: int) -> np.ndarray:
    """1-D int64 array of class indices in [0, n_classes)."""
    if hasattr(y, "detach"):  # torch tensor
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise KPLInputError(f"{name} must be 1-D (one class index per image), got shape {arr.shape}")
    if arr.size == 0:
        raise KPLInputError(f"{name} is empty; evaluate needs at least one image")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise KPLInputError(f"{name} must hold integer class indices, got non-integer floats")
    elif arr.dtype.kind not in "iu":
        raise KPLInputError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= n_classes)
    if bad.any():
        raise KPLInputError(
            f"{name} has {int(bad.sum())} value(s) outside [0, {n_classes}) (e.g. {int(arr[bad][0])}); "
            f"labels must index class_names, which has {n_classes} entries"
        )
    return arr


def _check_bootstrap_args(n_bootstrap: int, confidence: float) -> None:
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise KPLInputError(f"n_bootstrap must be an integer >= 0 (0 = no intervals), got {n_bootstrap!r}")
    if not isinstance(confidence, (int, float)) or not (0.0 < confidence < 1.0):
        raise KPLInputError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")


# ------------------------------------------------------------------------------------ vectorised metrics
def confusion_counts(y_true: Any, y_pred: Any, n_classes: int, indices: np.ndarray | None = None) -> np.ndarray:
    """Confusion counts ``[true, pred]``; with ``indices`` of shape (B, N') one (C, C) matrix per resample.

    ``indices`` are row indices into y_true / y_pred (a bootstrap resample is ``rng.integers(0, N, size=(B, N))``).
    Uses one ``np.bincount`` over ``resample * C² + true * C + pred``.
    """
    yt = _as_labels(y_true, "y_true", n_classes)
    yp = _as_labels(y_pred, "y_pred", n_classes)
    if yt.shape != yp.shape:
        raise KPLInputError(f"y_true has {yt.size} entries but y_pred has {yp.size}; they must match")
    cells = yt * n_classes + yp
    cc = n_classes * n_classes
    if indices is None:
        return np.bincount(cells, minlength=cc).reshape(n_classes, n_classes)
    idx = np.asarray(indices)
    if idx.ndim != 2:
        raise KPLInputError(f"indices must be 2-D (resamples × images), got shape {idx.shape}")
    b = idx.shape[0]
    flat = (cells[idx] + (np.arange(b, dtype=np.int64) * cc)[:, None]).ravel()
    return np.bincount(flat, minlength=b * cc).reshape(b, n_classes, n_classes)


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro-F1 from confusion counts of shape (..., C, C) (rows = true class).

    Same definitions as scikit-learn (see the module docstring); vectorised over leading dimensions.
    """
    conf = np.asarray(confusion, dtype=np.float64)
    if conf.ndim < 2 or conf.shape[-1] != conf.shape[-2]:
        raise KPLInputError(f"confusion must have shape (..., C, C), got {conf.shape}")
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    support = conf.sum(axis=-1)          # true count per class
    predicted = conf.sum(axis=-2)        # predicted count per class
    n = support.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = tp.sum(axis=-1) / n
        present = support > 0
        recall = np.where(present, tp / np.where(present, support, 1.0), 0.0)
        balanced = recall.sum(axis=-1) / present.sum(axis=-1)
        denom = support + predicted      # = 2TP + FP + FN
        f1 = np.where(denom > 0, 2.0 * tp / np.where(denom > 0, denom, 1.0), 0.0)
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "macro_f1": f1.mean(axis=-1)}


def _bootstrap_metrics(yt: np.ndarray, yp: np.ndarray, n_classes: int, n_bootstrap: int, seed: int) -> dict:
    """Metric values over ``n_bootstrap`` seeded resamples (indices drawn chunk by chunk from one Generator)."""
    rng = np.random.default_rng(seed)
    n = yt.size
    chunk = max(1, min(n_bootstrap, _BOOTSTRAP_CHUNK_ELEMENTS // max(n, 1)))
    out: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    done = 0
    while done < n_bootstrap:
        b = min(chunk, n_bootstrap - done)
        idx = rng.integers(0, n, size=(b, n))
        values = metrics_from_confusion(confusion_counts(yt, yp, n_classes, idx))
        for k in METRICS:
            out[k].append(values[k])
        done += b
    return {k: np.concatenate(v) for k, v in out.items()}


def _percentile_ci(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------- evaluate
def evaluate(
    y_true: Any,
    y_pred: Any,
    class_names: Sequence[str],
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Accuracy, balanced accuracy, macro-F1 (scikit-learn), confusion matrix and seeded percentile bootstrap CIs.

    Returns a dict with keys ``accuracy``, ``balanced_accuracy``, ``macro_f1`` (floats in [0, 1]),
    ``accuracy_ci`` etc. (``(lo, hi)``, or ``None`` when ``n_bootstrap == 0``), ``confusion`` (C×C ndarray, rows =
    true class), ``n``, ``class_names``, ``n_bootstrap``, ``confidence``, ``seed`` and
    ``classes_absent_from_y_true`` (names; balanced accuracy averages over the other classes only).
    """
    names = _check_class_names(class_names)
    c = len(names)
    _check_bootstrap_args(n_bootstrap, confidence)
    yt = _as_labels(y_true, "y_true", c)
    yp = _as_labels(y_pred, "y_pred", c)
    if yt.shape != yp.shape:
        raise KPLInputError(f"y_true has {yt.size} entries but y_pred has {yp.size}; they must match")
    labels = list(range(c))
    with warnings.catch_warnings():
        # scikit-learn warns when a class of y_pred never occurs in y_true; we report that in the result instead.
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")
        # ... and when y_true and y_pred hold a single label (e.g. one image); labels are passed where it matters
        warnings.filterwarnings("ignore", message=".*A single label was found.*")
        balanced = balanced_accuracy_score(yt, yp)
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(yt, yp)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(yt, yp, average="macro", labels=labels, zero_division=0)),
        "confusion": confusion_matrix(yt, yp, labels=labels),
        "n": int(yt.size),
        "class_names": names,
        "n_bootstrap": int(n_bootstrap),
        "confidence": float(confidence),
        "seed": int(seed),
        "classes_absent_from_y_true": [names[k] for k in range(c) if not np.any(yt == k)],
    }
    if n_bootstrap > 0:
        boot = _bootstrap_metrics(yt, yp, c, int(n_bootstrap), seed)
        for k in METRICS:
            out[f"{k}_ci"] = _percentile_ci(boot[k], confidence)
    else:
        for k in METRICS:
            out[f"{k}_ci"] = None
    return out


# --------------------------------------------------------------------------------------------- baselines
def majority_baseline(
    y_true: Any,
    class_names: Sequence[str],
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Metrics of always predicting the most frequent class **of the test labels** (ties: lowest index).

    This baseline peeks at the test labels (it knows which class is most frequent), so it is a reference line for
    reading results, not a method a user could run. Returns :func:`evaluate`'s dict plus ``majority_class``,
    ``method = "majority_class"`` and ``note``.
    """
    names = _check_class_names(class_names)
    yt = _as_labels(y_true, "y_true", len(names))
    majority = int(np.argmax(np.bincount(yt, minlength=len(names))))
    out = evaluate(yt, np.full_like(yt, majority), names, n_bootstrap, confidence, seed)
    out.update(
        method="majority_class",
        majority_class=names[majority],
        note="always predicts the most frequent class of the TEST labels (uses the labels: a reference, not a method)",
    )
    return out


def chance_baseline(
    class_names: Sequence[str],
    y_true: Any,
    n_sim: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Expected metrics of guessing uniformly at random (each image gets one of the C classes with prob. 1/C).

    - accuracy: exactly 1/C (expectation; does not depend on the label distribution);
    - balanced accuracy: exactly 1/C (each present class has expected recall 1/C);
    - macro-F1: no closed form for the expectation (F1 is a ratio), so it is estimated by seeded simulation: for
      each true class c the row of the confusion matrix is drawn as Multinomial(n_c, 1/C) — exactly the
      distribution uniform guessing produces — ``n_sim`` times; ``macro_f1_mc_se`` is the Monte-Carlo standard
      error. ``macro_f1_plugin`` is the F1 of the expected counts, mean_c 2 n_c / (N + C n_c), for comparison.
    - ``<metric>_ci``: the central ``confidence`` interval of the metric over the simulated random guesses on this
      test set (how far luck alone moves a random guesser), not a bootstrap interval.
    """
    names = _check_class_names(class_names)
    c = len(names)
    _check_bootstrap_args(n_sim, confidence)
    if n_sim < 1:
        raise KPLInputError(f"n_sim must be >= 1 (number of simulated random guessers), got {n_sim}")
    yt = _as_labels(y_true, "y_true", c)
    support = np.bincount(yt, minlength=c)
    rng = np.random.default_rng(seed)
    conf = np.stack([rng.multinomial(int(support[k]), np.full(c, 1.0 / c), size=n_sim) for k in range(c)], axis=1)
    sim = metrics_from_confusion(conf)  # conf: (n_sim, C, C)
    n = int(yt.size)
    plugin = float(np.mean(2.0 * support / (n + c * support)))
    out: dict[str, Any] = {
        "method": "chance_uniform",
        "accuracy": 1.0 / c,
        "balanced_accuracy": 1.0 / c,
        "macro_f1": float(sim["macro_f1"].mean()),
        "macro_f1_mc_se": float(sim["macro_f1"].std(ddof=1) / math.sqrt(n_sim)) if n_sim > 1 else float("nan"),
        "macro_f1_plugin": plugin,
        "n": n,
        "class_names": names,
        "n_sim": int(n_sim),
        "confidence": float(confidence),
        "seed": int(seed),
        "note": "expected score of a uniform random guess; accuracy and balanced accuracy exact (1/C), "
        "macro-F1 by seeded simulation",
    }
    for k in METRICS:
        out[f"{k}_ci"] = _percentile_ci(sim[k], confidence)
    return out


# ------------------------------------------------------------------------------------------------- tables
def _fmt_pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100.0 * float(v):.1f}"


def _fmt_ci(ci: Any) -> str:
    if ci is None:
        return "–"
    lo, hi = ci
    return f"[{100.0 * float(lo):.1f}, {100.0 * float(hi):.1f}]"


def results_table(rows: list[dict], raw: bool = False) -> pd.DataFrame:
    """One row per result: ``dataset, method, encoder, n, accuracy, accuracy_ci, balanced_accuracy, ..., macro_f1_ci``.

    Every row must carry ``dataset``, ``method``, ``encoder`` (a non-empty string: a number without the encoder that
    produced it is not reported) and the three metrics (e.g. ``{**evaluate(...), "dataset": ..., ...}``).
    Display form (default): metrics in percent with one decimal and CIs as ``"[lo, hi]"``. ``raw=True``: numeric
    values in [0, 1] with CIs split into ``<metric>_ci_lo`` / ``<metric>_ci_hi``. Other scalar keys (e.g. ``kb``,
    ``k``, ``note``) follow as extra columns; arrays such as ``confusion`` are dropped, and bookkeeping keys
    (``seed``, ``n_bootstrap``, ``confidence``, ...) appear only with ``raw=True``.
    """
    if not isinstance(rows, (list, tuple)) or len(rows) == 0:
        raise KPLInputError("rows must be a non-empty list of result dicts")
    records = []
    extra: list[str] = []
    skip = set(_TABLE_LEAD) | set(METRICS) | {f"{m}_ci" for m in METRICS} | {"confusion", "class_names"}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise KPLInputError(f"rows[{i}] must be a dict, got {type(row).__name__}")
        for key in ("dataset", "method", "encoder"):
            val = row.get(key)
            if not isinstance(val, str) or not val.strip():
                what = "the encoder that produced it (e.g. EncoderIdentity.label)" if key == "encoder" else key
                raise KPLInputError(f"rows[{i}] lacks {key!r}: every result must carry {what}")
        for m in METRICS:
            if m not in row:
                raise KPLInputError(f"rows[{i}] ({row['method']!r}) lacks metric {m!r}; pass the dict from evaluate()")
        rec: dict[str, Any] = {"dataset": row["dataset"], "method": row["method"], "encoder": row["encoder"],
                               "n": row.get("n")}
        for m in METRICS:
            ci = row.get(f"{m}_ci")
            if ci is not None and (not isinstance(ci, (tuple, list)) or len(ci) != 2):
                raise KPLInputError(f"rows[{i}] {m}_ci must be a (lo, hi) pair or None, got {ci!r}")
            if raw:
                rec[m] = float(row[m])
                rec[f"{m}_ci_lo"] = float(ci[0]) if ci is not None else float("nan")
                rec[f"{m}_ci_hi"] = float(ci[1]) if ci is not None else float("nan")
            else:
                rec[m] = _fmt_pct(row[m])
                rec[f"{m}_ci"] = _fmt_ci(ci)
        for key, val in row.items():
            if key in skip or (not raw and key in _BOOKKEEPING) or not (val is None or isinstance(val, (str, int, float, bool, np.integer, np.floating))):
                continue
            if key not in extra:
                extra.append(key)
            rec[key] = val
        records.append(rec)
    cols = list(_TABLE_LEAD)
    for m in METRICS:
        cols += [m, f"{m}_ci_lo", f"{m}_ci_hi"] if raw else [m, f"{m}_ci"]
    df = pd.DataFrame.from_records(records)
    return df.reindex(columns=cols + extra)


def compact_table(rows: list[dict], metric: str = "balanced_accuracy") -> pd.DataFrame:
    """A readable summary for one metric: methods as rows, datasets as columns, cells ``"34.0 [31.5, 36.5]"`` (%).

    The encoder stays *in* the table, as the top level of the column header. Reference lines that involve no model
    (rows whose ``encoder`` starts with ``"none"``, e.g. majority class, chance) sit beside the methods; rows from
    more than one encoder are refused (make one table per encoder). Rows are validated as in
    :func:`results_table`; methods keep their first-appearance order.
    """
    if metric not in METRICS:
        raise KPLInputError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    raw = results_table(rows, raw=True)
    model_encoders = sorted({e for e in raw["encoder"] if not e.lower().startswith("none")})
    if len(model_encoders) != 1:
        raise KPLInputError(
            f"compact_table needs rows from exactly one encoder (plus reference lines), got {model_encoders}; "
            "make one table per encoder"
        )
    cells = [f"{_fmt_pct(v)} {_fmt_ci((lo, hi))}" if np.isfinite(lo) else _fmt_pct(v)
             for v, lo, hi in zip(raw[metric], raw[f"{metric}_ci_lo"], raw[f"{metric}_ci_hi"])]
    table = raw.assign(cell=cells).pivot_table(index="method", columns="dataset", values="cell", aggfunc="first")
    table = table.reindex(index=list(dict.fromkeys(raw["method"])), columns=list(dict.fromkeys(raw["dataset"])))
    table.columns = pd.MultiIndex.from_product([[f"encoder: {model_encoders[0]}"], table.columns],
                                               names=["encoder", "dataset"])
    table.index.name = f"{metric} (%)"
    return table
