"""Tables the chapters show: knowledge bases, the modality gap, stage 1, KPL's two modes, the benchmark's output.
They *describe* what the stages did; labels, where taken, evaluate or explain, never choose anything for the method."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
from torch import Tensor

from .. import paths
from ..errors import KPLInputError
from ..io.knowledge import KPL_TEMPLATE, KnowledgeBase, check_template
from ..method.methods import run_method
from ..method.metrics import evaluate
from ..method.text_proxy import build_text_proxies, per_image_text_logits
from ..params import Interval, Options, check, check_descriptions, check_embeddings, unit

_WORD = re.compile(r"[a-z][a-z\-]*[a-z]|[a-z]")
#: What :func:`k_sweep` runs: the released dataset-level text proxy, the per-image retrieval extension, full KPL.
SWEEP_METHODS = ("text_proxy", "per_image", "kpl_reference", "kpl_corrected")


def _mean_words(texts: Sequence[str]) -> float:
    return round(float(np.mean([len(_WORD.findall(t.lower())) for t in texts])), 2) if texts else float("nan")


def _labels(labels: Any, n: int) -> Tensor:
    y = torch.as_tensor(labels).long().flatten()
    if y.numel() != n:
        raise KPLInputError(f"labels has {y.numel()} entries but there are {n} images")
    return y


def scores(labels: Any, predictions: Any, class_names: Sequence[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 of ``predictions`` (``metrics.evaluate`` without bootstrap)."""
    ev = evaluate(labels, predictions, list(class_names), n_bootstrap=0)
    return {k: ev[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}


def kb_counts(kbs: Mapping[str, KnowledgeBase]) -> pd.DataFrame:
    """One row per (knowledge base, class): display name, descriptions, references, mean words per description."""
    if not kbs or not all(isinstance(kb, KnowledgeBase) for kb in kbs.values()):
        raise KPLInputError("kbs must map a name to a KnowledgeBase (kplib.io.knowledge.load_kb) for at least one KB")
    return pd.DataFrame([{"dataset": name, "kb_id": kb.kb_id, "class": c.name, "display_name": c.display_name,
                          "descriptions": len(c.texts), "references": len(c.references),
                          "mean_words": _mean_words(c.texts)} for name, kb in kbs.items() for c in kb.classes])


def prompt_token_lengths(kb: KnowledgeBase, tokenizer: Any, template: str = KPL_TEMPLATE) -> pd.DataFrame:
    """Token length of every description's prompt, start and end tokens included (the 77-token context counts them);
    ``tokenizer``: an ``Encoder`` (``token_lengths``) or a Hugging Face tokenizer."""
    check_template(template)
    rows = [{"class": c.name, "index": j, "description": t, "n_words": len(_WORD.findall(t.lower())),
             "prompt": template.format(class_name=c.display_name, description=t)}
            for c in kb.classes for j, t in enumerate(c.texts)]
    prompts = [r["prompt"] for r in rows]
    n_tokens = (tokenizer.token_lengths(prompts) if hasattr(tokenizer, "token_lengths") else
                [len(i) for i in tokenizer(prompts, add_special_tokens=True, truncation=False)["input_ids"]])
    return pd.DataFrame([{**r, "n_tokens": n} for r, n in zip(rows, n_tokens)],
                        columns=["class", "index", "description", "prompt", "n_tokens", "n_words"])


def published_import_summary(results: Sequence[tuple[str, KnowledgeBase | str]]) -> pd.DataFrame:
    """One row per ``(file, KnowledgeBase or rejection reason)`` of ``descriptors.import_all_published()``."""
    rows = []
    for name, item in results:
        if not isinstance(item, (KnowledgeBase, str)):
            raise KPLInputError(f"results entry {name!r} must be a KnowledgeBase or a rejection reason (str), got "
                                f"{type(item).__name__}; pass the (file, result) pairs of the import")
        texts = [t for c in item.classes for t in c.texts] if isinstance(item, KnowledgeBase) else None
        rows.append({"file": name, "status": "rejected", "reason": item} if texts is None else {
            "file": name, "status": "imported", "kind": (item.source or {}).get("kind"), "classes": len(item.classes),
            "descriptions": len(texts), "per_class": round(len(texts) / len(item.classes), 2),
            "mean_words": _mean_words(texts), "reason": ""})
    return pd.DataFrame(rows, columns=["file", "status", "kind", "classes", "descriptions", "per_class", "mean_words",
                                       "reason"])


def vocabulary(texts: Iterable[str] | KnowledgeBase) -> Counter:
    """Word counts of a KB's descriptions (or any texts): lower-case words, English stop words removed."""
    texts = [t for c in texts.classes for t in c.texts] if isinstance(texts, KnowledgeBase) else texts
    return Counter(w for t in texts for w in _WORD.findall(t.lower()) if w not in ENGLISH_STOP_WORDS)


def vocabulary_overlap(a: KnowledgeBase | Iterable[str], b: KnowledgeBase | Iterable[str], top: int = 10) -> dict:
    """Jaccard index of two vocabularies, the most frequent shared words, and each side's words the other lacks."""
    va, vb = vocabulary(a), vocabulary(b)
    shared, union = set(va) & set(vb), set(va) | set(vb)
    return {"words_a": len(va), "words_b": len(vb), "shared_words": len(shared),
            "jaccard": len(shared) / len(union) if union else float("nan"),
            "shared": [w for w, _ in (va + vb).most_common() if w in shared][:top],
            "only_a": [w for w, _ in va.most_common() if w not in vb][:top],
            "only_b": [w for w, _ in vb.most_common() if w not in va][:top]}


def compare_kbs(a: KnowledgeBase, b: KnowledgeBase, label_a: str = "a", label_b: str = "b") -> pd.DataFrame:
    """Per class of ``a``: description counts and mean words in both KBs and their vocabulary Jaccard (NaN where
    ``b`` lacks the class; classes match by name)."""
    by_b = {c.name: c for c in b.classes}
    if label_a == label_b or not set(a.class_names) & set(by_b):
        raise KPLInputError(f"compare_kbs needs distinct labels and KBs that share a class name; {a.kb_id!r} has "
                            f"{a.class_names}, {b.kb_id!r} has {b.class_names}")
    rows = []
    for c in a.classes:
        cb = by_b.get(c.name)
        ov = vocabulary_overlap(c.texts, cb.texts, top=6) if cb else {"jaccard": float("nan"), "shared": []}
        rows.append({"class": c.name, f"descriptions ({label_a})": len(c.texts),
                     f"descriptions ({label_b})": len(cb.texts) if cb else float("nan"),
                     f"mean words ({label_a})": _mean_words(c.texts),
                     f"mean words ({label_b})": _mean_words(cb.texts) if cb else float("nan"),
                     "vocabulary jaccard": round(ov["jaccard"], 3), "shared words": ", ".join(ov["shared"])})
    return pd.DataFrame(rows)


def description_similarity(description_embeddings: Sequence[Tensor], class_names: Sequence[str]) -> pd.DataFrame:
    """C×C mean cosine between the description prompts of two classes (self-pairs excluded): off-diagonal values close
    to the diagonal mean the encoder barely tells the classes' descriptions apart."""
    names = list(class_names)
    if len(description_embeddings) != len(names):
        raise KPLInputError(f"{len(description_embeddings)} description blocks for {len(names)} class names")
    descs = [unit(d) for d in check_descriptions(description_embeddings, description_embeddings[0].shape[-1], names)]
    return pd.DataFrame([[_mean_cos(a, b, i == j) for j, b in enumerate(descs)] for i, a in enumerate(descs)],
                        index=names, columns=names)


def _mean_cos(a: Tensor, b: Tensor, same: bool) -> float:
    """Mean of ``a @ b.T``, without the diagonal (self-pairs) when ``a`` is ``b``."""
    s = a @ b.T
    if not same:
        return float(s.mean())
    return float((s.sum() - s.trace()) / (len(a) * (len(a) - 1))) if len(a) > 1 else float("nan")


def gap_projection(image_embeddings: Any, text_embeddings: Any) -> dict:
    """The gap vector ``mean(images) − mean(texts)`` (Liang et al. 2022), its norm, each embedding's coordinate along
    its direction, and ``separation``: the gap between the two mean coordinates in pooled standard deviations."""
    x = check_embeddings(image_embeddings, "image_embeddings").double()
    t = check_embeddings(text_embeddings, "text_embeddings", dim=x.shape[1]).double()
    gap = x.mean(0) - t.mean(0)
    norm = float(gap.norm())
    if norm == 0.0:
        raise KPLInputError("images and texts have the same mean: the gap vector is zero and has no direction")
    xi, ti = x @ (gap / norm), t @ (gap / norm)
    pooled = float(torch.sqrt((xi.var(unbiased=False) + ti.var(unbiased=False)) / 2))
    return {"gap_vector": gap, "gap_norm": norm, "direction": gap / norm, "image_coordinate": xi,
            "text_coordinate": ti, "separation": float(xi.mean() - ti.mean()) / pooled if pooled else float("inf")}


def gap_summary(image_embeddings: Any, text_embeddings: Any) -> dict[str, float]:
    """Scalars of the modality gap: ``gap_norm``, ``separation`` and the mean cosines image–image (distinct pairs),
    text–text and image–text (embeddings normalised)."""
    x, t = unit(torch.as_tensor(image_embeddings).double()), unit(torch.as_tensor(text_embeddings).double())
    gp = gap_projection(x, t)
    return {"gap_norm": gp["gap_norm"], "separation": gp["separation"], "mean_cos_image_image": _mean_cos(x, x, True),
            "mean_cos_text_text": _mean_cos(t, t, True), "mean_cos_image_text": _mean_cos(x, t, False)}


def prediction_shares(predictions: Any, class_names: Sequence[str]) -> pd.Series:
    """Share of the images predicted as each class: a collapse onto one class shows as one share ≈ 1."""
    p = torch.as_tensor(predictions).long().flatten()
    if p.numel() == 0 or p.min() < 0 or p.max() >= len(class_names):
        raise KPLInputError(f"predictions must be a non-empty vector of class indices in [0, {len(class_names) - 1}]")
    return pd.Series(torch.bincount(p, minlength=len(class_names)).numpy() / len(p), index=list(class_names),
                     name="predicted share")


def zero_shot_by_template(image_embeddings: Any, text: Any, labels: Any) -> pd.DataFrame:
    """Zero-shot scores of each class-name template alone and of their ensemble (labels evaluate only), with the
    share of images given the most-predicted class (``top_class_share``: 1.0 = total collapse)."""
    names = text.name_embeddings
    templates = list(text.templates or [f"template {i}" for i in range(names.shape[1])])
    if names.ndim != 3 or len(templates) != names.shape[1]:
        raise KPLInputError(f"text.name_embeddings must be (C, T, d) with one template per T, got shape "
                            f"{tuple(names.shape)} and {len(templates)} templates")
    variants = [(repr(t), names[:, i:i + 1]) for i, t in enumerate(templates)]
    variants += [(f"ensemble of {len(templates)} templates", names)] if len(templates) > 1 else []
    rows = []
    for label, emb in variants:
        pred = run_method("zero_shot", image_embeddings, replace(text, name_embeddings=emb)).predictions
        shares = prediction_shares(pred, text.class_names)
        rows.append({"template": label, **scores(labels, pred, text.class_names),
                     "top_class_share": float(shares.max()), "top_class": str(shares.idxmax())})
    return pd.DataFrame(rows)


def description_ranking(image_embeddings: Any, text: Any, k: int = 8, labels: Any = None) -> pd.DataFrame:
    """Every description's stage-1 score (mean cosine with all images), rank in its class and whether it is kept
    (top-K). With ``labels`` (explanation only): ``own_class_cosine``, ``other_class_cosine`` (class-balanced) and
    ``discrimination`` = own − other: a description close to *all* images is kept yet tells classes apart poorly."""
    x = unit(check_embeddings(image_embeddings, "image_embeddings"))
    descs = [d.to(x.dtype) for d in text.description_embeddings]
    texts = text.descriptions or [[f"description {m}" for m in range(len(d))] for d in descs]
    tp, parts = build_text_proxies(x, descs, k=k), []
    if labels is not None:  # class means (NaN for a class without images)
        y = _labels(labels, len(x))
        means = torch.stack([x[y == c].mean(0) for c in range(len(descs))]).double()
    for c, (name, d, s, sel) in enumerate(zip(text.class_names, descs, tp.scores, tp.selected)):
        df = pd.DataFrame({"class": name, "index": range(len(d)), "description": texts[c], "score": s.double().numpy(),
                           "kept": np.isin(np.arange(len(d)), sel.numpy())})
        df.insert(2, "rank", df["score"].rank(ascending=False, method="first").astype(int))
        if labels is not None:
            cos = unit(d.double()) @ means.T
            own, other = cos[:, c].numpy(), cos[:, [o for o in range(len(descs)) if o != c]].nanmean(1).numpy()
            df = df.assign(own_class_cosine=own, other_class_cosine=other, discrimination=own - other)
        parts.append(df)
    return pd.concat(parts).sort_values(["class", "rank"], kind="stable").reset_index(drop=True)


def k_sweep(image_embeddings: Any, text: Any, labels: Any, ks: Sequence[int],
            methods: Sequence[str] = ("text_proxy", "per_image"), seeds: Sequence[int] = (0,),
            subsample_fraction: float = 1.0, **overrides: Any) -> pd.DataFrame:
    """Scores of each of :data:`SWEEP_METHODS` for every K, per seed on a random ``subsample_fraction`` of the images:
    how much the numbers move with K *and* with the sample (``overrides`` go to ``run_method``). Choosing K here is
    tuning on test labels (the paper's best-of-sweep); :func:`sweep_spread` says by how much it flatters."""
    x = check_embeddings(image_embeddings, "image_embeddings")
    y = _labels(labels, len(x))
    ks = [check("ks[...]", k, Interval(int, 1)) for k in ks]
    methods = [check("methods[...]", m, Options(*SWEEP_METHODS)) for m in methods]
    fraction = check("subsample_fraction", subsample_fraction, Interval(float, 0, 1, closed="right"))
    if not ks or not seeds:
        raise KPLInputError("ks and seeds must be non-empty, e.g. ks=[1, 2, 4, 8, 16, 32], seeds=[0]")
    rows, descs = [], text.description_embeddings
    for seed in map(int, seeds):
        g = torch.Generator().manual_seed(seed)
        idx = torch.sort(torch.randperm(len(x), generator=g)[:max(2, round(fraction * len(x)))]).values
        for k, m in ((k, m) for k in ks for m in methods):
            pred = (build_text_proxies(x[idx], descs, k=k).predictions if m == "text_proxy" else
                    per_image_text_logits(x[idx], descs, k=k).argmax(1) if m == "per_image" else
                    run_method(m, x[idx], text, k=k, seed=seed, **overrides).predictions)
            rows.append({"method": m, "k": k, "seed": seed, "n": len(idx), **scores(y[idx], pred, text.class_names)})
    return pd.DataFrame(rows)


def sweep_spread(table: pd.DataFrame, fixed_k: int = 8, metric: str = "accuracy") -> pd.DataFrame:
    """Per method of a :func:`k_sweep` table: the range of ``metric`` over K (mean over seeds), its value at the K
    fixed in advance, and ``optimism`` = best-of-sweep − fixed-K: how much choosing K on test labels flatters."""
    if not {"method", "k", metric} <= set(table.columns):
        raise KPLInputError(f"table must be the DataFrame of k_sweep (columns method, k, {metric})")
    per_k = table.groupby(["method", "k"], sort=False)[metric].mean().unstack().sort_index(axis=1)  # method × K
    lo, hi, fixed = per_k.min(axis=1), per_k.max(axis=1), per_k.get(fixed_k, np.nan)
    return pd.DataFrame({f"min {metric}": lo, f"max {metric}": hi, "spread": hi - lo,
                         f"at K={fixed_k} (fixed in advance)": fixed, "best-of-sweep K (chosen on test labels)":
                         per_k.idxmax(axis=1), "optimism": hi - fixed}).reset_index()


def retrieval_agreement(image_embeddings: Any, text: Any, k: int = 8) -> pd.DataFrame:
    """Per class, how far per-image retrieval (each image's own top-K' descriptions, K' = min(K, M_c)) departs from
    the released dataset-level set: ``mean_jaccard``, ``share_identical`` and ``distinct_sets`` over the images."""
    x = unit(check_embeddings(image_embeddings, "image_embeddings"))
    descs = [unit(d.to(x.dtype)) for d in check_descriptions(text.description_embeddings, x.shape[1])]
    rows = []
    for name, d, sel in zip(text.class_names, descs, build_text_proxies(x, descs, k=k).selected):
        k_c = min(k, len(d))
        own = torch.topk(x @ d.T, k_c, dim=1).indices
        inter = torch.isin(own, sel).sum(1).double()
        rows.append({"class": name, "k": k_c, "mean_jaccard": float((inter / (2 * k_c - inter)).mean()),
                     "share_identical": float((inter == k_c).double().mean()),
                     "distinct_sets": len({tuple(sorted(r)) for r in own.tolist()})})
    return pd.DataFrame(rows)


def _masks(values: Sequence[Any], sizes: list[int], names: Sequence[str], what: str, dtype) -> list[Tensor]:
    if len(values) != len(sizes):
        raise KPLInputError(f"{what} has {len(values)} entries but there are {len(sizes)} classes")
    out = [torch.as_tensor(v).to(dtype).flatten() for v in values]
    for c, (v, m) in enumerate(zip(out, sizes)):
        if v.numel() != m:
            raise KPLInputError(f"{what}[{c}] has {v.numel()} entries but class {names[c]!r} has {m} descriptions: "
                                "one entry per description")
    return out


def retrieval_precision(image_embeddings: Any, text: Any, relevant: Sequence[Any], ks: Sequence[int]) -> pd.DataFrame:
    """Where the truth is known (simulator: ``truth["description_relevant"]``): per K and class, the share of the
    kept descriptions that are relevant (``precision``) and what a random choice reaches (``chance_precision``)."""
    sizes = [len(d) for d in text.description_embeddings]
    masks = _masks(relevant, sizes, text.class_names, "relevant", torch.bool)
    kept = {k: build_text_proxies(image_embeddings, text.description_embeddings, k=k).selected for k in ks}
    return pd.DataFrame([{"k": k, "class": name, "kept": len(s), "relevant_kept": int(r[s].sum()),
                          "precision": float(r[s].double().mean()), "relevant_total": int(r.sum()),
                          "chance_precision": float(r.double().mean())}
                         for k in ks for name, s, r in zip(text.class_names, kept[k], masks)])


def score_vs_truth(image_embeddings: Any, text: Any, relevant: Sequence[Any], strength: Sequence[Any]) -> pd.DataFrame:
    """Where the truth is known: does the stage-1 score follow relevance? Per class, the mean score of relevant and
    irrelevant descriptions and the Spearman correlation of score and true strength among the relevant ones."""
    tp = build_text_proxies(image_embeddings, text.description_embeddings, k=1)
    sizes = [len(s) for s in tp.scores]
    rel = _masks(relevant, sizes, text.class_names, "relevant", torch.bool)
    strong = _masks(strength, sizes, text.class_names, "strength", torch.float64)
    rows = []
    for name, s, r, st in zip(text.class_names, tp.scores, rel, strong):
        n = int(r.sum())
        rows.append({"class": name, "relevant": n, "mean_score_relevant": float(s[r].mean()) if n else float("nan"),
                     "mean_score_irrelevant": float(s[~r].mean()) if n < len(s) else float("nan"),
                     "spearman_score_strength": float(spearmanr(s[r], st[r])[0]) if n >= 3 else float("nan")})
    return pd.DataFrame(rows)


def compare_modes(results: Mapping[str, Any], image_embeddings: Any, labels: Any) -> pd.DataFrame:
    """One row per KPL/InMaP result: scores, iterations, times, the row scale of the transported pseudo-labels
    (``row_sum_times_n`` ≈ 1 for the released 1/N rows), hardening, and the pull ‖Yᵀ X‖_F of proxy learning
    relative to rows summing to 1 (``pull_vs_probability_rows``: ≈ 1/N in reference mode, 1 in corrected mode)."""
    x = check_embeddings(image_embeddings, "image_embeddings")
    y = _labels(labels, len(x))
    rows = []
    for name, res in results.items():
        if getattr(res, "proxy_learning", None) is None:
            raise KPLInputError(f"results[{name!r}] has no proxy-learning stage; pass kpl or inmap results only")
        if len(res.predictions) != len(y):
            raise KPLInputError(f"results[{name!r}] has {len(res.predictions)} predictions for {len(y)} labels")
        plan, target = res.transport.plan, res.targets.to(x.dtype)
        pull, pull_unit = float((target.T @ x).norm()), float(((target / target.sum(1, keepdim=True)).T @ x).norm())
        nt = res.no_transport_predictions
        rows.append({"run": name, "mode": res.config.mode, "transport": res.config.transport, "n": len(y),
                     **scores(y, res.predictions, res.class_names),
                     "text_proxy_accuracy": float((res.text.predictions == y).double().mean()),
                     "no_transport_accuracy": float((nt == y).double().mean()) if nt is not None else float("nan"),
                     "ot_iterations": res.transport.iterations, "ot_converged": res.transport.converged,
                     "proxy_iterations": res.proxy_learning.iterations,
                     "proxy_converged": res.proxy_learning.converged,
                     **{f"seconds_{k}": float(res.timings.get(k, float("nan")))
                        for k in ("total", "transport", "proxy_learning")},
                     "row_sum_mean": float(plan.sum(1).mean()), "row_sum_times_n": float(plan.sum(1).mean()) * len(y),
                     "max_entry": float(plan.max()), "alpha": res.config.alpha,
                     "hardened_rows": int(res.hardened.sum()), "hardened_fraction": float(res.hardened.double().mean()),
                     "pull_norm": pull, "pull_vs_probability_rows": pull / pull_unit if pull_unit else float("nan")})
    return pd.DataFrame(rows)


def proxy_image_cosines(result: Any, image_embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
    """Iteration of each proxy snapshot and the (S, C) cosines between the snapshots and the mean image: did
    proxy learning move the proxies towards the images?"""
    snaps = getattr(result.proxy_learning, "trajectory", None)
    if not snaps:
        raise KPLInputError("the result has no proxy snapshots: run it with KPLConfig(record_every=...) set")
    mean_image = unit(torch.as_tensor(image_embeddings).double().mean(0))
    cos = (unit(torch.stack(list(snaps)).double()) @ mean_image).numpy()
    steps = np.minimum(np.arange(len(cos)) * result.config.record_every, result.proxy_learning.iterations)
    return steps, cos


def bench_file() -> Path:
    """Where ``make bench`` writes the post-encoding numbers: ``$KPL_BENCH_OUT`` or ``<repo>/artifacts``."""
    return Path(os.environ.get("KPL_BENCH_OUT") or paths.REPO_ROOT / "artifacts") / "bench_post_encoding.json"


def read_bench(path: str | os.PathLike | None = None) -> pd.DataFrame | None:
    """``make bench``'s post-encoding numbers in long form (``n, c, variant, seconds, peak_rss_mb``); a missing file
    prints how to make it and gives ``None``, a foreign one raises (it must not be shown as a measurement)."""
    file = Path(path) if path is not None else bench_file()
    if not file.is_file():
        print(f"No benchmark results at {file}: run `make bench` (it writes this file), then re-run this notebook.")
        return None
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KPLInputError(f"cannot read the benchmark file {file}: {exc}; re-run `make bench` or delete it") from None
    if not isinstance(raw, list) or not raw or not all(isinstance(r, dict) and {"n", "reference_s", "corrected_s"}
                                                       <= r.keys() for r in raw):
        raise KPLInputError(f"{file} lacks columns n, reference_s, corrected_s: it was not written by "
                            "benchmarks/bench_post_encoding.py; re-run `make bench`")
    return pd.DataFrame([{"n": r["n"], "c": r.get("c"), "variant": v, "seconds": r[f"{v}_s"],
                          "peak_rss_mb": r.get(f"rss_{v}_mb")}
                         for r in raw for v in ("baseline", "reference", "corrected") if f"{v}_s" in r])
