"""Analyses behind the book's chapters 1–3: tables a notebook plots, computed from the stage modules.

Nothing here is part of the method: these functions *describe* knowledge bases, the modality gap and stage 1
(text proxies) so the chapters show tables and figures without re-implementing kplib in notebook cells.

* Knowledge bases (chapter "Building the knowledge base"): :func:`kb_counts`, :func:`prompt_token_lengths`,
  :func:`published_import_summary`, :func:`compare_kbs`, :func:`vocabulary_overlap`.
* Modality gap (chapter "Zero-shot CLIP and the modality gap"): :func:`gap_projection`,
  :func:`zero_shot_by_template`, :func:`prediction_shares`.
* Text proxies (chapter "Text proxy optimisation"): :func:`description_ranking`, :func:`k_sweep`,
  :func:`sweep_spread`, :func:`retrieval_agreement`.

Functions that use the test labels say so: they explain what happened, they never choose anything for the method.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_description_embeddings, check_embeddings, check_in_range, check_int
from .errors import KPLInputError
from .knowledge import KPL_TEMPLATE, KnowledgeBase, default_tokenizer

__all__ = [
    "kb_counts",
    "prompt_token_lengths",
    "published_import_summary",
    "vocabulary",
    "vocabulary_overlap",
    "compare_kbs",
    "description_similarity",
    "gap_projection",
    "prediction_shares",
    "zero_shot_by_template",
    "description_ranking",
    "SWEEP_METHODS",
    "k_sweep",
    "sweep_spread",
    "retrieval_agreement",
    "retrieval_precision",
    "score_vs_truth",
]

_WORD = re.compile(r"[a-z][a-z\-]*[a-z]|[a-z]")


# ------------------------------------------------------------------------------------------------ knowledge bases
def _check_kb(kb: Any, name: str = "kb") -> KnowledgeBase:
    if not isinstance(kb, KnowledgeBase):
        raise KPLInputError(f"{name} must be a kplib.knowledge.KnowledgeBase (load one with load_kb / curated_kb), "
                            f"got {type(kb).__name__}")
    return kb


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def kb_counts(kbs: Mapping[str, KnowledgeBase]) -> pd.DataFrame:
    """One row per (dataset, class): display name, number of descriptions and references, mean words per description.

    ``kbs`` maps a name (usually the dataset) to a KB; the row order follows the mapping and each KB's class order.
    """
    if not kbs:
        raise KPLInputError("kbs is empty: pass {dataset: KnowledgeBase} with at least one knowledge base")
    rows = []
    for name, kb in kbs.items():
        kb = _check_kb(kb, f"kbs[{name!r}]")
        for c in kb.classes:
            n_words = [len(_words(t)) for t in c.texts]
            rows.append({"dataset": name, "kb_id": kb.kb_id, "method": kb.method, "class": c.name,
                         "display_name": c.display_name, "descriptions": len(c.texts),
                         "references": len(c.references),
                         "mean_words": round(float(np.mean(n_words)), 2) if n_words else float("nan")})
    return pd.DataFrame(rows)


def prompt_token_lengths(kb: KnowledgeBase, template: str = KPL_TEMPLATE, tokenizer: Any = None) -> pd.DataFrame:
    """CLIP token length of every description inside its prompt (BOS/EOS included, as the 77-token context counts).

    Columns: ``class``, ``index``, ``description``, ``prompt``, ``n_tokens``, ``n_words`` (words of the description).
    ``tokenizer=None`` uses the CLIP tokenizer from ``$KPL_TOKENIZER_DIR`` (what :func:`kplib.knowledge.validate`
    uses); the validation report only keeps the per-class maximum and mean, this keeps every prompt for histograms.
    """
    kb = _check_kb(kb)
    if "{class_name}" not in template or "{description}" not in template:
        raise KPLInputError(f"template {template!r} must contain '{{class_name}}' and '{{description}}'")
    tok = tokenizer if tokenizer is not None else default_tokenizer()
    rows, prompts = [], []
    for c in kb.classes:
        for j, t in enumerate(c.texts):
            p = template.format(class_name=c.display_name, description=t)
            prompts.append(p)
            rows.append({"class": c.name, "index": j, "description": t, "prompt": p, "n_words": len(_words(t))})
    if not rows:
        return pd.DataFrame(columns=["class", "index", "description", "prompt", "n_tokens", "n_words"])
    ids = tok(prompts, add_special_tokens=True, truncation=False)["input_ids"]
    for r, i in zip(rows, ids):
        r["n_tokens"] = len(i)
    return pd.DataFrame(rows)[["class", "index", "description", "prompt", "n_tokens", "n_words"]]


def published_import_summary(results: Sequence[tuple[str, KnowledgeBase | str]]) -> pd.DataFrame:
    """Table of :func:`kplib.knowledge.import_all_published` output: what imported, what was rejected and why.

    Columns: ``file``, ``status`` ("imported" | "rejected"), ``kind`` (descriptors | prompts), ``classes``,
    ``descriptions``, ``per_class`` (mean descriptions per class), ``mean_words``, ``licence``, ``reason``.
    """
    rows = []
    for name, item in results:
        if isinstance(item, KnowledgeBase):
            texts = [t for c in item.classes for t in c.texts]
            src = item.source or {}
            rows.append({"file": name, "status": "imported", "kind": src.get("kind"), "classes": len(item.classes),
                         "descriptions": len(texts), "per_class": round(len(texts) / len(item.classes), 2),
                         "mean_words": round(float(np.mean([len(_words(t)) for t in texts])), 2) if texts else None,
                         "licence": src.get("licence"), "reason": ""})
        elif isinstance(item, str):
            rows.append({"file": name, "status": "rejected", "kind": None, "classes": None, "descriptions": None,
                         "per_class": None, "mean_words": None, "licence": None, "reason": item})
        else:
            raise KPLInputError(f"results entry {name!r} must be a KnowledgeBase or a rejection reason (str), got "
                                f"{type(item).__name__}; pass the list returned by import_all_published()")
    return pd.DataFrame(rows, columns=["file", "status", "kind", "classes", "descriptions", "per_class",
                                       "mean_words", "licence", "reason"])


def vocabulary(texts: Iterable[str] | KnowledgeBase, stop_words: Iterable[str] | None = None) -> Counter:
    """Word counts of a KB's descriptions (or any texts): lower-case words, English stop words removed.

    Stop words default to scikit-learn's ``ENGLISH_STOP_WORDS``.
    """
    if isinstance(texts, KnowledgeBase):
        texts = [t for c in texts.classes for t in c.texts]
    if stop_words is None:
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
        stop_words = ENGLISH_STOP_WORDS
    stop = set(stop_words)
    counts: Counter = Counter()
    for t in texts:
        if not isinstance(t, str):
            raise KPLInputError(f"texts must be strings, got {type(t).__name__}")
        counts.update(w for w in _words(t) if w not in stop)
    return counts


def vocabulary_overlap(a: KnowledgeBase | Iterable[str], b: KnowledgeBase | Iterable[str], top: int = 10) -> dict:
    """How much two KBs share their words: Jaccard index of the vocabularies and the most frequent words of each
    side that the other side never uses (``only_a``/``only_b``) and of the shared ones (``shared``)."""
    va, vb = vocabulary(a), vocabulary(b)
    sa, sb = set(va), set(vb)
    union = sa | sb
    shared = sa & sb
    return {
        "words_a": len(sa), "words_b": len(sb), "shared_words": len(shared),
        "jaccard": len(shared) / len(union) if union else float("nan"),
        "shared": [w for w, _ in (va + vb).most_common() if w in shared][:top],
        "only_a": [w for w, _ in va.most_common() if w not in sb][:top],
        "only_b": [w for w, _ in vb.most_common() if w not in sa][:top],
    }


def compare_kbs(a: KnowledgeBase, b: KnowledgeBase, label_a: str | None = None,
                label_b: str | None = None) -> pd.DataFrame:
    """Per class of ``a`` that ``b`` also has: description counts, mean words and vocabulary Jaccard of the two KBs.

    Classes are matched by name exactly (import published files with the dataset's class names first:
    :func:`kplib.knowledge.import_for_dataset`); a class of ``a`` missing from ``b`` gets NaN on b's side.
    """
    a, b = _check_kb(a, "a"), _check_kb(b, "b")
    la, lb = label_a or a.kb_id, label_b or b.kb_id
    if la == lb:
        raise KPLInputError(f"label_a and label_b are both {la!r}; pass distinct labels")
    by_b = {c.name: c for c in b.classes}
    if not set(a.class_names) & set(by_b):
        raise KPLInputError(f"knowledge bases {a.kb_id!r} and {b.kb_id!r} share no class name ({a.class_names} vs "
                            f"{b.class_names}); import the published file with the dataset's classes")
    rows = []
    for c in a.classes:
        cb = by_b.get(c.name)
        row = {"class": c.name, f"descriptions ({la})": len(c.texts),
               f"mean words ({la})": round(float(np.mean([len(_words(t)) for t in c.texts])), 2)}
        if cb is None:
            row.update({f"descriptions ({lb})": float("nan"), f"mean words ({lb})": float("nan"),
                        "vocabulary jaccard": float("nan"), "shared words": ""})
        else:
            ov = vocabulary_overlap(c.texts, cb.texts, top=6)
            row.update({f"descriptions ({lb})": len(cb.texts),
                        f"mean words ({lb})": round(float(np.mean([len(_words(t)) for t in cb.texts])), 2),
                        "vocabulary jaccard": round(ov["jaccard"], 3), "shared words": ", ".join(ov["shared"])})
        rows.append(row)
    return pd.DataFrame(rows)


def description_similarity(description_embeddings: Sequence[Tensor], class_names: Sequence[str]) -> pd.DataFrame:
    """C×C mean cosine between the description prompts of class a (rows) and class b (columns).

    The diagonal excludes each prompt's similarity with itself. Off-diagonal values close to the diagonal mean the
    encoder barely tells the classes' descriptions apart (template and modality words dominate the prompts).
    """
    class_names = list(class_names)
    if not description_embeddings:
        raise KPLInputError("description_embeddings is empty: pass one (M_c, d) tensor per class")
    dim = int(torch.as_tensor(description_embeddings[0]).shape[-1])
    descs = check_description_embeddings(description_embeddings, dim=dim, class_names=class_names)
    if len(descs) != len(class_names):
        raise KPLInputError(f"{len(descs)} description blocks for {len(class_names)} class names")
    c = len(descs)
    out = np.zeros((c, c))
    for a in range(c):
        for b in range(c):
            s = descs[a] @ descs[b].T
            if a == b:
                m = s.shape[0]
                out[a, b] = float((s.sum() - s.diagonal().sum()) / (m * (m - 1))) if m > 1 else float("nan")
            else:
                out[a, b] = float(s.mean())
    return pd.DataFrame(out, index=class_names, columns=class_names)


# ------------------------------------------------------------------------------------------------- modality gap
def gap_projection(image_embeddings: Tensor, text_embeddings: Tensor) -> dict:
    """The gap vector ``mean(images) − mean(texts)`` (Liang et al. 2022), its norm, and every embedding's coordinate
    along its unit direction — two separated bumps when there is a modality gap.

    Returns ``{"gap_vector" (d,), "gap_norm", "direction" (d,), "image_coordinate" (N,), "text_coordinate" (T,),
    "separation"}``, where ``separation`` = difference of the two mean coordinates divided by the pooled standard
    deviation (how many spreads apart the modalities sit along the gap).
    """
    x = check_embeddings(image_embeddings, "image_embeddings")
    t = check_embeddings(text_embeddings, "text_embeddings", dim=x.shape[1])
    gap = x.mean(0) - t.mean(0)
    norm = float(gap.norm())
    if norm == 0.0:
        raise KPLInputError("image and text embeddings have the same mean: the gap vector is zero, no direction")
    direction = gap / norm
    xi, ti = x @ direction, t @ direction
    pooled = float(torch.sqrt((xi.var(unbiased=False) + ti.var(unbiased=False)) / 2))
    sep = float((xi.mean() - ti.mean()) / pooled) if pooled > 0 else float("inf")
    return {"gap_vector": gap, "gap_norm": norm, "direction": direction, "image_coordinate": xi,
            "text_coordinate": ti, "separation": sep}


def prediction_shares(predictions: Any, class_names: Sequence[str]) -> pd.Series:
    """Share of the images predicted as each class (sums to 1): a collapse onto one class shows as one share ≈ 1."""
    class_names = list(class_names)
    p = torch.as_tensor(predictions).long().flatten()
    if p.numel() == 0:
        raise KPLInputError("predictions is empty")
    if p.min() < 0 or p.max() >= len(class_names):
        raise KPLInputError(f"predictions must be class indices in [0, {len(class_names) - 1}]")
    counts = torch.bincount(p, minlength=len(class_names)).double()
    return pd.Series((counts / counts.sum()).numpy(), index=class_names, name="predicted share")


def zero_shot_by_template(image_embeddings: Tensor, text: Any, labels: Any) -> pd.DataFrame:
    """Zero-shot accuracy of each class-name template alone and of the template ensemble (``methods.zero_shot``).

    Uses the labels to *evaluate* only. Columns: ``template``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``,
    ``top_class_share`` (share of images given the most-predicted class: 1.0 = total collapse), ``top_class``.
    """
    from dataclasses import replace

    from .methods import zero_shot
    from .metrics import evaluate

    x = check_embeddings(image_embeddings, "image_embeddings")
    names = text.name_embeddings
    if names.ndim != 3:
        raise KPLInputError(f"text.name_embeddings must be (C, T, d), got shape {tuple(names.shape)}")
    templates = list(text.templates or [f"template {i}" for i in range(names.shape[1])])
    if len(templates) != names.shape[1]:
        raise KPLInputError(f"text.templates has {len(templates)} entries but name_embeddings has {names.shape[1]}")
    rows = []
    variants = [(f"{t!r}", names[:, i : i + 1]) for i, t in enumerate(templates)]
    if names.shape[1] > 1:
        variants.append((f"ensemble of {names.shape[1]} templates", names))
    for label, emb in variants:
        res = zero_shot(x, replace(text, name_embeddings=emb, templates=None))
        ev = evaluate(labels, res.predictions, text.class_names, n_bootstrap=0)
        shares = prediction_shares(res.predictions, text.class_names)
        rows.append({"template": label, "accuracy": ev["accuracy"], "balanced_accuracy": ev["balanced_accuracy"],
                     "macro_f1": ev["macro_f1"], "top_class_share": float(shares.max()),
                     "top_class": str(shares.idxmax())})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------- text proxies
def description_ranking(image_embeddings: Tensor, text: Any, k: int = 8, labels: Any = None) -> pd.DataFrame:
    """Every description of every class with its stage-1 score ``s_cm`` (mean cosine with all images), its rank in
    its class and whether it is among the top-K kept for the text proxy (``text_proxy.build_text_proxies``).

    With ``labels`` (evaluation only — the method never sees them) three explanatory columns are added:
    ``own_class_cosine`` (mean cosine with the images of its own class), ``other_class_cosine`` (with the other
    classes' images, class-balanced) and ``discrimination`` = own − other: a description can be retrieved because it
    is close to *all* images (high ``score``) while telling the classes apart poorly (``discrimination`` ≈ 0).
    """
    from .text_proxy import build_text_proxies

    x = check_embeddings(image_embeddings, "image_embeddings")
    descs = text.description_embeddings
    texts = text.descriptions or [[f"description {m}" for m in range(d.shape[0])] for d in descs]
    tp = build_text_proxies(x, descs, k=k)
    y = None
    if labels is not None:
        y = torch.as_tensor(labels).long().flatten()
        if y.numel() != x.shape[0]:
            raise KPLInputError(f"labels has {y.numel()} entries but there are {x.shape[0]} images")
        if y.min() < 0 or y.max() >= len(descs):
            raise KPLInputError(f"labels must be class indices in [0, {len(descs) - 1}]")
        present = [c for c in range(len(descs)) if (y == c).any()]
        class_means = {c: x[y == c].mean(0) for c in present}
    rows = []
    for c, (name, d, s, sel) in enumerate(zip(text.class_names, descs, tp.scores, tp.selected)):
        order = torch.sort(s, descending=True, stable=True).indices.tolist()
        rank = {m: r + 1 for r, m in enumerate(order)}
        kept = set(sel.tolist())
        if y is not None:
            per_class = {cc: (d.to(x.dtype) @ mu) for cc, mu in class_means.items()}
            others = [cc for cc in present if cc != c]
        for m in range(d.shape[0]):
            row = {"class": name, "index": m, "rank": rank[m], "description": texts[c][m], "score": float(s[m]),
                   "kept": m in kept}
            if y is not None:
                own = float(per_class[c][m]) if c in per_class else float("nan")
                other = float(torch.stack([per_class[cc][m] for cc in others]).mean()) if others else float("nan")
                row.update(own_class_cosine=own, other_class_cosine=other, discrimination=own - other)
            rows.append(row)
    return pd.DataFrame(rows).sort_values(["class", "rank"], kind="stable").reset_index(drop=True)


#: Methods :func:`k_sweep` can run: stage-1 text proxy (released dataset-level retrieval), the per-image retrieval
#: extension, and full KPL in either mode (``methods.run_method``).
SWEEP_METHODS: tuple[str, ...] = ("text_proxy", "per_image", "kpl_reference", "kpl_corrected")


def _subsample(n: int, fraction: float, seed: int) -> Tensor:
    if fraction >= 1.0:
        return torch.arange(n)
    m = max(2, int(round(fraction * n)))
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=g)[:m]).values


def k_sweep(image_embeddings: Tensor, text: Any, labels: Any, ks: Sequence[int],
            methods: Sequence[str] = ("text_proxy", "per_image"), seeds: Sequence[int] = (0,),
            subsample_fraction: float = 1.0, **overrides: Any) -> pd.DataFrame:
    """Accuracy (and balanced accuracy, macro-F1) of each method for every K in ``ks``.

    For each seed, a random ``subsample_fraction`` of the images is the (transductive) test set, so the sweep shows
    how much the numbers move with K *and* with the image sample; with ``subsample_fraction=1`` one seed suffices.
    ``overrides`` are passed to :func:`kplib.methods.run_method` for the ``kpl_*`` methods (e.g. ``iters_proxy``).
    The labels are used to *score* every K: picking the best K from this table is tuning on the test labels —
    exactly the paper's best-of-sweep — and :func:`sweep_spread` reports how much that choice flatters a method.

    Columns: ``method``, ``k``, ``seed``, ``n``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``.
    """
    from .metrics import evaluate
    from .text_proxy import build_text_proxies, per_image_text_logits

    x = check_embeddings(image_embeddings, "image_embeddings")
    check_description_embeddings(text.description_embeddings, dim=x.shape[1], class_names=text.class_names)
    y = torch.as_tensor(labels).long().flatten()
    if y.numel() != x.shape[0]:
        raise KPLInputError(f"labels has {y.numel()} entries but there are {x.shape[0]} images")
    ks = [check_int(k, "ks[...]") for k in ks]
    if not ks:
        raise KPLInputError("ks is empty: pass the K values to sweep, e.g. [1, 2, 4, 8, 16, 32]")
    methods = list(methods)
    for m in methods:
        if m not in SWEEP_METHODS:
            raise KPLInputError(f"methods entry {m!r} is not one of {list(SWEEP_METHODS)}")
    fraction = check_in_range(subsample_fraction, "subsample_fraction", 0.0, 1.0)
    if fraction == 0.0:
        raise KPLInputError("subsample_fraction must be > 0")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise KPLInputError("seeds is empty: pass at least one seed")
    rows = []
    for seed in seeds:
        idx = _subsample(x.shape[0], fraction, seed)
        xs, ys = x[idx], y[idx]
        for k in ks:
            for m in methods:
                if m == "text_proxy":
                    pred = (xs @ build_text_proxies(xs, text.description_embeddings, k=k).proxies.T).argmax(1)
                elif m == "per_image":
                    pred = per_image_text_logits(xs, text.description_embeddings, k=k).argmax(1)
                else:
                    from .methods import run_method
                    pred = run_method(m, xs, text, k=k, seed=seed, **overrides).predictions
                ev = evaluate(ys, pred, text.class_names, n_bootstrap=0)
                rows.append({"method": m, "k": k, "seed": seed, "n": int(ys.numel()), "accuracy": ev["accuracy"],
                             "balanced_accuracy": ev["balanced_accuracy"], "macro_f1": ev["macro_f1"]})
    return pd.DataFrame(rows)


def sweep_spread(table: pd.DataFrame, fixed_k: int = 8, metric: str = "accuracy") -> pd.DataFrame:
    """Per method: the range of ``metric`` over the K sweep (mean over seeds per K), the value at the K fixed in
    advance (``fixed_k``, the released default 8), and what best-of-sweep would report.

    ``best_of_sweep - at_fixed_k`` (``optimism``) is how much choosing K on the test labels flatters the method.
    """
    need = {"method", "k", metric}
    if not isinstance(table, pd.DataFrame) or not need <= set(table.columns):
        raise KPLInputError(f"table must be the DataFrame returned by k_sweep (columns {sorted(need)})")
    rows = []
    for m, g in table.groupby("method", sort=False):
        per_k = g.groupby("k")[metric].mean()
        best_k = int(per_k.idxmax())
        at_fixed = float(per_k.loc[fixed_k]) if fixed_k in per_k.index else float("nan")
        rows.append({"method": m, f"min {metric}": float(per_k.min()), f"max {metric}": float(per_k.max()),
                     "spread": float(per_k.max() - per_k.min()), f"at K={fixed_k} (fixed in advance)": at_fixed,
                     "best-of-sweep K (chosen on test labels)": best_k,
                     "optimism": float(per_k.max() - at_fixed)})
    return pd.DataFrame(rows)


def retrieval_agreement(image_embeddings: Tensor, text: Any, k: int = 8) -> pd.DataFrame:
    """How far the per-image retrieval extension departs from the released dataset-level retrieval, per class.

    For each image and class, the per-image variant keeps the image's own top-K' descriptions (K' = min(K, M_c));
    the released rule keeps one top-K' set for all images. Columns: ``class``, ``k``, ``mean_jaccard`` (mean over
    images of |own ∩ shared| / |own ∪ shared|), ``share_identical`` (images whose own set equals the shared set),
    ``distinct_sets`` (how many different top-K' sets the images retrieve).
    """
    from .text_proxy import build_text_proxies

    x = check_embeddings(image_embeddings, "image_embeddings")
    k = check_int(k, "k")
    descs = check_description_embeddings(text.description_embeddings, dim=x.shape[1], class_names=text.class_names)
    shared = build_text_proxies(x, descs, k=k).selected
    rows = []
    for name, d, sel in zip(text.class_names, descs, shared):
        k_c = min(k, d.shape[0])
        own = torch.topk(x @ d.to(x.dtype).T, k_c, dim=1).indices          # (N, K')
        shared_mask = torch.zeros(d.shape[0], dtype=torch.bool)
        shared_mask[sel] = True
        inter = shared_mask[own].sum(1).double()
        jacc = inter / (2 * k_c - inter)
        sets = {tuple(sorted(r)) for r in own.tolist()}
        rows.append({"class": name, "k": k_c, "mean_jaccard": float(jacc.mean()),
                     "share_identical": float((inter == k_c).double().mean()), "distinct_sets": len(sets)})
    return pd.DataFrame(rows)


def retrieval_precision(image_embeddings: Tensor, text: Any, relevant: Sequence[Any],
                        ks: Sequence[int]) -> pd.DataFrame:
    """Where the truth is known (the simulator's ``truth["description_relevant"]``): for each K and class, how many
    of the K' descriptions kept by stage 1 are truly relevant.

    ``relevant``: per class a boolean mask (M_c,). Columns: ``k``, ``class``, ``kept``, ``relevant_kept``,
    ``precision`` (relevant_kept / kept), ``relevant_total``, ``chance_precision`` (relevant_total / M_c: what a
    random choice of descriptions would reach on average).
    """
    from .text_proxy import build_text_proxies

    x = check_embeddings(image_embeddings, "image_embeddings")
    descs = text.description_embeddings
    if len(relevant) != len(descs):
        raise KPLInputError(f"relevant has {len(relevant)} masks but there are {len(descs)} classes")
    masks = []
    for c, (r, d) in enumerate(zip(relevant, descs)):
        r = torch.as_tensor(r).bool().flatten()
        if r.numel() != d.shape[0]:
            raise KPLInputError(f"relevant[{c}] has {r.numel()} entries but class {text.class_names[c]!r} has "
                                f"{d.shape[0]} descriptions")
        masks.append(r)
    ks = [check_int(k, "ks[...]") for k in ks]
    if not ks:
        raise KPLInputError("ks is empty")
    rows = []
    for k in ks:
        sel = build_text_proxies(x, descs, k=k).selected
        for name, s, r in zip(text.class_names, sel, masks):
            hit = int(r[s].sum())
            rows.append({"k": k, "class": name, "kept": int(s.numel()), "relevant_kept": hit,
                         "precision": hit / int(s.numel()), "relevant_total": int(r.sum()),
                         "chance_precision": float(r.double().mean())})
    return pd.DataFrame(rows)


def score_vs_truth(image_embeddings: Tensor, text: Any, relevant: Sequence[Any], strength: Sequence[Any]) -> pd.DataFrame:
    """Where the truth is known (simulator): does the stage-1 score ``s_cm`` follow true relevance?

    Per class: mean score of the relevant and of the irrelevant descriptions, and the Spearman rank correlation
    (scipy) between score and true relevance strength among the relevant ones (+1: the score ranks the most relevant
    first; negative: it prefers weakly relevant ones). Columns: ``class``, ``relevant``, ``mean_score_relevant``,
    ``mean_score_irrelevant``, ``spearman_score_strength``.
    """
    from scipy.stats import spearmanr

    from .text_proxy import score_descriptions

    scores = score_descriptions(image_embeddings, text.description_embeddings)
    if len(relevant) != len(scores) or len(strength) != len(scores):
        raise KPLInputError(f"relevant ({len(relevant)}) and strength ({len(strength)}) need one entry per class "
                            f"({len(scores)})")
    rows = []
    for c, (name, s) in enumerate(zip(text.class_names, scores)):
        r = torch.as_tensor(relevant[c]).bool().flatten()
        st = torch.as_tensor(strength[c]).double().flatten()
        if r.numel() != s.numel() or st.numel() != s.numel():
            raise KPLInputError(f"class {name!r}: relevant/strength must have one entry per description ({s.numel()})")
        n_rel = int(r.sum())
        rho = float(spearmanr(s[r].numpy(), st[r].numpy())[0]) if n_rel >= 3 else float("nan")
        rows.append({"class": name, "relevant": n_rel,
                     "mean_score_relevant": float(s[r].mean()) if n_rel else float("nan"),
                     "mean_score_irrelevant": float(s[~r].mean()) if n_rel < s.numel() else float("nan"),
                     "spearman_score_strength": rho})
    return pd.DataFrame(rows)
