"""The book's figures: each function returns a matplotlib ``Figure`` that names the encoder behind its numbers.

Conventions
- Every function takes a keyword-only ``encoder_label`` (e.g. ``EncoderIdentity.label`` or
  ``world.text.meta["encoder"]``); it is written into the figure's suptitle. A label containing ``UNTRAINED`` or
  ``SIMULATED`` adds a red caption at the bottom ("UNTRAINED stand-in — not a result" / "simulated data").
- Inputs are plain tensors or arrays (torch tensors are moved to CPU numpy) and, where useful, fields of
  :class:`kplib.methods.MethodResult`. Logic that belongs to the method lives in the stage modules, not here.
- Figures are created with :class:`matplotlib.figure.Figure`, *not* through ``pyplot``: nothing accumulates in
  pyplot's registry and a notebook shows a figure exactly once — end the cell with it or call ``display(fig)``.
  ``fig.savefig(path)`` works as usual.
"""
from __future__ import annotations

import html
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .errors import KPLInputError

STANDIN_CAPTION = "UNTRAINED stand-in — not a result"
SIMULATED_CAPTION = "simulated data"
CAPTION_COLOR = "#c00000"
_MAX_LEGEND_CLASSES = 12
_TEXT_MARKERS = ("*", "X", "D", "P", "^", "s", "v")

__all__ = [
    "STANDIN_CAPTION",
    "SIMULATED_CAPTION",
    "Projection",
    "caption_for",
    "encoder_banner",
    "gap_summary",
    "embedding_map",
    "cosine_distributions",
    "modality_gap_bar",
    "confusion_heatmap",
    "plan_heatmap",
    "class_marginals",
    "description_scores",
    "k_sweep",
    "proxy_trajectory",
    "metrics_bar",
    "balancing_study",
]


# ----------------------------------------------------------------------------------------------------------------
# labels, captions, banners


def caption_for(encoder_label: str) -> str | None:
    """The red caption a figure made with this encoder must carry, or ``None`` for a real pretrained encoder."""
    upper = encoder_label.upper()
    if "UNTRAINED" in upper:
        return STANDIN_CAPTION
    if "SIMULATED" in upper:
        return SIMULATED_CAPTION
    return None


def _check_label(encoder_label: Any) -> str:
    if not isinstance(encoder_label, str) or not encoder_label.strip():
        raise KPLInputError(
            "encoder_label must be a non-empty string naming the encoder that produced the numbers "
            "(e.g. encoder.identity.label, or world.text.meta['encoder'] for simulated data)"
        )
    return encoder_label.strip()


def _finish(fig: Figure, title: str, encoder_label: str, fontsize: int = 11) -> Figure:
    """Put the title and the encoder into the suptitle; add the red caption for stand-in / simulated numbers."""
    fig.suptitle(f"{title}\nencoder: {encoder_label}", fontsize=fontsize)
    caption = caption_for(encoder_label)
    if caption is not None:
        # supxlabel, not fig.text: the constrained layout reserves room for it, so it never overlaps the axes.
        fig.supxlabel(caption, color=CAPTION_COLOR, fontweight="bold", fontsize=fontsize)
    return fig


def encoder_banner(encoder_label: str, dataset: str | None = None):
    """An HTML banner for the top of a chapter: which encoder produced the numbers, red when they mean nothing.

    Returns an ``IPython.display.HTML`` object (display it, or end a cell with it).
    """
    from IPython.display import HTML

    encoder_label = _check_label(encoder_label)
    caption = caption_for(encoder_label)
    where = f" on <b>{html.escape(dataset)}</b>" if dataset else ""
    if caption == STANDIN_CAPTION:
        colour, background = CAPTION_COLOR, "#fff0f0"
        note = (
            "These numbers come from a randomly initialised CLIP: they exercise the code and mean nothing about "
            "CLIP, KPL or medicine. Set <code>KPL_MODEL</code> to a pretrained checkpoint for real numbers."
        )
    elif caption == SIMULATED_CAPTION:
        colour, background = CAPTION_COLOR, "#fff0f0"
        note = (
            "These embeddings are SIMULATED by <code>kplib.simulate</code> (known ground truth): they illustrate "
            "mechanisms and are not measurements of any real model."
        )
    else:
        colour, background = "#1a5e20", "#f0fff0"
        note = "Numbers below were produced by this pretrained encoder."
    return HTML(
        f'<div class="kpl-encoder-banner" style="border:3px solid {colour};background:{background};'
        f'padding:0.6em 1em;margin:0.5em 0;border-radius:4px;">'
        f'<b style="color:{colour}">Encoder: {html.escape(encoder_label)}</b>{where}<br>{note}</div>'
    )


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _np(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    """Tensor/array/list → float or int numpy array on the CPU, with a shape check."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - message path
        raise KPLInputError(f"{name} must be an array or tensor, got {type(x).__name__}") from exc
    if ndim is not None and arr.ndim != ndim:
        raise KPLInputError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise KPLInputError(f"{name} contains NaN/Inf values")
    return arr


def _labels(labels: Any, n: int, n_classes: int, name: str = "labels") -> np.ndarray:
    y = _np(labels, name, ndim=1).astype(np.int64)
    if y.shape[0] != n:
        raise KPLInputError(f"{name} has {y.shape[0]} entries but there are {n} images")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise KPLInputError(f"{name} must be class indices in [0, {n_classes - 1}] (one per class name)")
    return y


def _palette(n: int) -> list:
    return sns.color_palette("tab10" if n <= 10 else "husl", n)


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.clip(norms, 1e-12, None)


# ----------------------------------------------------------------------------------------------------------------
# modality gap


def gap_summary(image_emb: Any, text_emb: Any) -> dict[str, float]:
    """Modality-gap statistics of image embeddings (N, d) and text embeddings (T, d).

    ``gap_norm`` is the norm of the gap vector mean(images) − mean(texts) (Liang et al. 2022); the three mean
    cosines say how tight each modality is and how far apart they are.
    """
    x = _unit_rows(_np(image_emb, "image_emb", ndim=2).astype(np.float64))
    t = _unit_rows(_np(text_emb, "text_emb", ndim=2).astype(np.float64))
    if x.shape[1] != t.shape[1]:
        raise KPLInputError(f"image_emb has dimension {x.shape[1]} but text_emb has {t.shape[1]}; use one encoder")
    gap = x.mean(0) - t.mean(0)

    def _mean_offdiag(a: np.ndarray) -> float:
        n = a.shape[0]
        if n < 2:
            return float("nan")
        s = a @ a.T
        return float((s.sum() - np.trace(s)) / (n * (n - 1)))

    return {
        "gap_norm": float(np.linalg.norm(gap)),
        "mean_cos_image_image": _mean_offdiag(x),
        "mean_cos_text_text": _mean_offdiag(t),
        "mean_cos_image_text": float((x @ t.T).mean()),
    }


def modality_gap_bar(summaries: Mapping[str, Mapping[str, float]], *, encoder_label: str) -> Figure:
    """Bars of :func:`gap_summary` statistics for several settings (datasets, simulator gap sizes, ...)."""
    encoder_label = _check_label(encoder_label)
    if not summaries:
        raise KPLInputError("summaries is empty: pass {name: gap_summary(...)} for at least one setting")
    keys = ["gap_norm", "mean_cos_image_image", "mean_cos_image_text", "mean_cos_text_text"]
    rows = []
    for name, s in summaries.items():
        missing = [k for k in keys if k not in s]
        if missing:
            raise KPLInputError(f"summaries[{name!r}] lacks {missing}; build it with kplib.viz.gap_summary")
        rows += [{"setting": name, "statistic": k.replace("_", " "), "value": float(s[k])} for k in keys]
    df = pd.DataFrame(rows)
    fig = _figure(max(6.0, 1.6 * len(summaries) + 3), 4.2)
    ax = fig.subplots()
    sns.barplot(data=df, x="setting", y="value", hue="statistic", ax=ax, palette="Set2")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("")
    ax.set_ylabel("value (norm or mean cosine)")
    ax.legend(title="", fontsize=8, loc="best")
    return _finish(fig, "Modality gap: gap-vector norm and mean cosines", encoder_label)


def cosine_distributions(
    image_emb: Any,
    text_emb: Any,
    labels: Any,
    *,
    encoder_label: str,
    max_pairs: int = 20000,
    seed: int = 0,
) -> Figure:
    """Histograms of image–text cosines (own class vs other classes) and image–image cosines (same vs different class).

    ``text_emb`` holds one text embedding per class, shape (C, d). Image pairs are subsampled to ``max_pairs`` with
    ``seed``. The modality gap shows as image–text cosines far below image–image cosines.
    """
    encoder_label = _check_label(encoder_label)
    x = _np(image_emb, "image_emb", ndim=2).astype(np.float64)
    t = _np(text_emb, "text_emb", ndim=2).astype(np.float64)
    if x.shape[1] != t.shape[1]:
        raise KPLInputError(f"image_emb has dimension {x.shape[1]} but text_emb has {t.shape[1]}; use one encoder")
    y = _labels(labels, x.shape[0], t.shape[0])
    if x.shape[0] < 2:
        raise KPLInputError("cosine_distributions needs at least 2 images")
    rng = np.random.default_rng(seed)
    sims = x @ t.T
    own = sims[np.arange(len(y)), y]
    other_mask = np.ones_like(sims, dtype=bool)
    other_mask[np.arange(len(y)), y] = False
    other = sims[other_mask]
    n_pairs = min(max_pairs, x.shape[0] * (x.shape[0] - 1) // 2)
    i = rng.integers(0, x.shape[0], size=4 * n_pairs)
    j = rng.integers(0, x.shape[0], size=4 * n_pairs)
    keep = i != j
    i, j = i[keep][:n_pairs], j[keep][:n_pairs]
    ii = np.einsum("nd,nd->n", x[i], x[j])
    same = y[i] == y[j]
    parts = {
        "image–text, own class": own,
        "image–text, other classes": other,
        "image–image, same class": ii[same],
        "image–image, different class": ii[~same],
    }
    df = pd.concat(
        [pd.DataFrame({"cosine": v, "pair": k}) for k, v in parts.items() if len(v)], ignore_index=True
    )
    fig = _figure(8.0, 4.2)
    ax = fig.subplots()
    colours = dict(zip(parts, ["#1f77b4", "#9ecae1", "#d62728", "#fcae91"]))
    sns.histplot(
        data=df, x="cosine", hue="pair", stat="density", common_norm=False, element="step", fill=True,
        alpha=0.35, bins=60, ax=ax, palette=colours,
    )
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density (each distribution normalised)")
    return _finish(fig, "Image–text vs image–image cosine similarities", encoder_label)


# ----------------------------------------------------------------------------------------------------------------
# embedding maps


@dataclass
class Projection:
    """A fitted 2-D projection (UMAP or PCA) of image and text embeddings; ``transform`` places new points."""

    method: str
    model: Any
    points: dict[str, np.ndarray] = field(default_factory=dict)   # 2-D coordinates of what was fitted

    def transform(self, x: Any) -> np.ndarray:
        """Project (n, d) embeddings into this map's 2-D coordinates."""
        arr = _np(x, "x", ndim=2).astype(np.float32)
        return np.asarray(self.model.transform(arr), dtype=np.float64)


def _fit_projection(blocks: dict[str, np.ndarray], method: str, seed: int) -> Projection:
    stacked = np.concatenate(list(blocks.values()), axis=0).astype(np.float32)
    n = stacked.shape[0]
    if method == "umap":
        if n < 4:
            raise KPLInputError(f"a UMAP map needs at least 4 points, got {n}; pass method='pca' for tiny inputs")
        import umap  # umap-learn; imported lazily: its first import compiles numba code (~7 s)

        model = umap.UMAP(
            n_components=2, n_neighbors=min(15, n - 1), min_dist=0.1, metric="cosine", random_state=seed,
            n_jobs=1, transform_seed=seed,
        )
    elif method == "pca":
        from sklearn.decomposition import PCA

        if n < 2:
            raise KPLInputError("a PCA map needs at least 2 points")
        model = PCA(n_components=2, random_state=seed)
    else:
        raise KPLInputError(f"method must be 'umap' or 'pca', got {method!r}")
    coords = np.asarray(model.fit_transform(stacked), dtype=np.float64)
    points, start = {}, 0
    for key, block in blocks.items():
        points[key] = coords[start : start + block.shape[0]]
        start += block.shape[0]
    return Projection(method=method, model=model, points=points)


def _class_legend(ax, class_names: Sequence[str], colours: list, title: str = "true class (images)") -> None:
    if len(class_names) <= _MAX_LEGEND_CLASSES:
        handles = [
            ax.scatter([], [], s=25, color=colours[c], label=name) for c, name in enumerate(class_names)
        ]
        ax.legend(handles=handles, title=title, fontsize=8, title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), frameon=False)


def embedding_map(
    image_emb: Any,
    labels: Any,
    class_names: Sequence[str],
    text_points: Mapping[str, Any] | None = None,
    method: str = "umap",
    seed: int = 0,
    *,
    encoder_label: str,
    projection: Projection | None = None,
) -> tuple[Figure, Projection]:
    """Images and text embeddings on one 2-D map (UMAP with cosine metric, or PCA), fitted on both together.

    ``text_points`` maps a legend name to an (n, d) array (class-name prompts, text proxies, descriptions); a block
    with one row per class is coloured by class. Returns the figure and the fitted :class:`Projection`, whose
    ``transform`` places proxies or trajectories on the same map. Pass ``projection`` to reuse a fitted map.
    """
    encoder_label = _check_label(encoder_label)
    x = _np(image_emb, "image_emb", ndim=2)
    class_names = list(class_names)
    y = _labels(labels, x.shape[0], len(class_names))
    blocks = {"images": x}
    for key, pts in (text_points or {}).items():
        arr = _np(pts, f"text_points[{key!r}]", ndim=2)
        if arr.shape[1] != x.shape[1]:
            raise KPLInputError(
                f"text_points[{key!r}] has dimension {arr.shape[1]} but the images have {x.shape[1]}; use one encoder"
            )
        if key == "images":
            raise KPLInputError("text_points may not use the key 'images' (reserved for the image embeddings)")
        blocks[key] = arr
    import torch

    threads = torch.get_num_threads()  # `import umap` / UMAP fit/transform reset torch's thread count (measured)
    try:
        if projection is None:
            projection = _fit_projection(blocks, method, seed)
            coords = projection.points
        else:
            coords = {k: projection.transform(v) for k, v in blocks.items()}
    finally:
        torch.set_num_threads(threads)
    colours = _palette(len(class_names))
    fig = _figure(8.5, 6.0)
    ax = fig.subplots()
    pts = coords["images"]
    ax.scatter(pts[:, 0], pts[:, 1], c=[colours[c] for c in y], s=10, alpha=0.55, linewidths=0)
    _class_legend(ax, class_names, colours)
    text_handles = []
    for k, key in enumerate(k for k in blocks if k != "images"):
        p = coords[key]
        marker = _TEXT_MARKERS[k % len(_TEXT_MARKERS)]
        per_class = p.shape[0] == len(class_names)
        col = [colours[c] for c in range(p.shape[0])] if per_class else "0.3"
        h = ax.scatter(p[:, 0], p[:, 1], c=col, marker=marker, s=160 if per_class else 30, edgecolors="black",
                       linewidths=0.8, label=key, zorder=3)
        text_handles.append(h)
        if per_class and len(class_names) <= _MAX_LEGEND_CLASSES:
            for c in range(p.shape[0]):
                ax.annotate(class_names[c], p[c], textcoords="offset points", xytext=(6, 6), fontsize=7)
    if text_handles:
        legend = ax.get_legend()
        ax.legend(handles=text_handles, title="text embeddings", fontsize=8, title_fontsize=8, loc="lower left",
                  bbox_to_anchor=(1.01, 0.0), frameon=False)
        if legend is not None:
            ax.add_artist(legend)
    ax.set_xlabel(f"{projection.method.upper()} 1")
    ax.set_ylabel(f"{projection.method.upper()} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    title = f"Images and texts on one {projection.method.upper()} map (coloured by true class)"
    return _finish(fig, title, encoder_label), projection


def proxy_trajectory(
    reducer: Projection,
    trajectory: Sequence[Any],
    text_proxies: Any,
    image_emb: Any,
    labels: Any,
    class_names: Sequence[str],
    *,
    encoder_label: str,
) -> Figure:
    """Proxies moving during proxy learning, drawn on a fitted map: from the text proxy (star) to the end (circle).

    ``trajectory`` is ``ProxyLearningResult.trajectory``: snapshots (C, d), the first being the initial proxies.
    """
    encoder_label = _check_label(encoder_label)
    if not isinstance(reducer, Projection):
        raise KPLInputError("reducer must be the Projection returned by kplib.viz.embedding_map")
    if trajectory is None or len(trajectory) < 2:
        raise KPLInputError(
            "trajectory needs at least 2 snapshots; run proxy learning with record_every set "
            "(KPLConfig(record_every=...))"
        )
    class_names = list(class_names)
    snaps = [_np(s, f"trajectory[{i}]", ndim=2) for i, s in enumerate(trajectory)]
    n_classes = len(class_names)
    for i, s in enumerate(snaps):
        if s.shape[0] != n_classes:
            raise KPLInputError(f"trajectory[{i}] has {s.shape[0]} rows, expected one per class ({n_classes})")
    x = _np(image_emb, "image_emb", ndim=2)
    y = _labels(labels, x.shape[0], n_classes)
    t = _np(text_proxies, "text_proxies", ndim=2)
    stacked = np.concatenate(snaps, axis=0)
    path = reducer.transform(stacked).reshape(len(snaps), n_classes, 2)
    img = reducer.transform(x)
    tp = reducer.transform(t)
    colours = _palette(n_classes)
    fig = _figure(8.5, 6.0)
    ax = fig.subplots()
    ax.scatter(img[:, 0], img[:, 1], c=[colours[c] for c in y], s=8, alpha=0.25, linewidths=0)
    _class_legend(ax, class_names, colours)
    for c in range(n_classes):
        ax.plot(path[:, c, 0], path[:, c, 1], "-", color=colours[c], lw=2, alpha=0.9)
        ax.scatter(path[1:-1, c, 0], path[1:-1, c, 1], color=colours[c], s=12, zorder=3)
    h_text = ax.scatter(tp[:, 0], tp[:, 1], c=colours[:n_classes], marker="*", s=220, edgecolors="black",
                        label="text proxy (start)", zorder=4)
    h_end = ax.scatter(path[-1, :, 0], path[-1, :, 1], c=colours[:n_classes], marker="o", s=110,
                       edgecolors="black", label="learned proxy (end)", zorder=4)
    legend = ax.get_legend()
    ax.legend(handles=[h_text, h_end], fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0.0), frameon=False)
    if legend is not None:
        ax.add_artist(legend)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{reducer.method.upper()} 1")
    ax.set_ylabel(f"{reducer.method.upper()} 2")
    title = f"Proxies moving from the text region into the image region ({len(snaps)} snapshots)"
    return _finish(fig, title, encoder_label)


# ----------------------------------------------------------------------------------------------------------------
# classification and transport


def confusion_heatmap(
    cm: Any, class_names: Sequence[str], *, encoder_label: str, title: str = "Confusion matrix", normalize: bool = True
) -> Figure:
    """Heatmap of a C×C confusion matrix (rows = true class); cells show counts, colour the row-normalised share."""
    encoder_label = _check_label(encoder_label)
    class_names = list(class_names)
    m = _np(cm, "cm", ndim=2).astype(np.float64)
    if m.shape != (len(class_names), len(class_names)):
        raise KPLInputError(f"cm has shape {m.shape}, expected ({len(class_names)}, {len(class_names)}) for the class names")
    rows = m.sum(1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0) if normalize else m
    size = max(4.5, 0.7 * len(class_names) + 3)
    fig = _figure(size + 1, size)
    ax = fig.subplots()
    annotate = len(class_names) <= 15
    sns.heatmap(
        share, annot=m.astype(int) if annotate else False, fmt="d", cmap="Blues", vmin=0,
        vmax=1 if normalize else None, xticklabels=class_names, yticklabels=class_names, ax=ax, square=True,
        cbar_kws={"label": "share of the true class" if normalize else "count"},
    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)
    return _finish(fig, f"{title} (numbers = image counts)", encoder_label)


def plan_heatmap(
    plans: Any | Mapping[str, Any],
    labels: Any,
    class_names: Sequence[str],
    *,
    encoder_label: str,
) -> Figure:
    """Pseudo-label matrices (N, C) side by side, images sorted by true class; e.g. ``{"P0": ..., "after OT": ...}``.

    Rows are rescaled to sum to 1 for display; each panel's title gives the mean row sum *as returned* (the released
    transport routine returns rows summing to about 1/N).
    """
    encoder_label = _check_label(encoder_label)
    class_names = list(class_names)
    if not isinstance(plans, Mapping):
        plans = {"pseudo-labels": plans}
    if not plans:
        raise KPLInputError("plans is empty: pass an (N, C) matrix or {name: matrix}")
    mats = {k: _np(v, f"plans[{k!r}]", ndim=2).astype(np.float64) for k, v in plans.items()}
    shapes = {m.shape for m in mats.values()}
    if len(shapes) != 1:
        raise KPLInputError(f"all plans must have the same shape (N, C), got {sorted(shapes)}")
    n, c = next(iter(shapes))
    if c != len(class_names):
        raise KPLInputError(f"plans have {c} columns but there are {len(class_names)} class names")
    y = _labels(labels, n, c)
    order = np.argsort(y, kind="stable")
    bounds = np.cumsum(np.bincount(y, minlength=c))[:-1]
    fig = _figure(3.0 * len(mats) + 1.5, 5.5)
    axes = np.atleast_1d(fig.subplots(1, len(mats), sharey=True))
    image = None
    for ax, (name, m) in zip(axes, mats.items()):
        if (m < 0).any():
            raise KPLInputError(f"plans[{name!r}] has negative entries; pseudo-labels must be non-negative")
        row_sum = m.sum(1, keepdims=True)
        shown = np.divide(m, row_sum, out=np.zeros_like(m), where=row_sum > 0)[order]
        image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
        for b in bounds:
            ax.axhline(b - 0.5, color="white", lw=1)
        ax.set_xticks(range(c))
        ax.set_xticklabels(class_names if c <= 15 else [], rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("class (column)")
        ax.set_title(f"{name}\nmean row sum as returned: {row_sum.mean():.3g}", fontsize=9)
    mids = np.concatenate([[0], bounds]) + np.bincount(y, minlength=c) / 2
    axes[0].set_yticks(mids - 0.5)
    axes[0].set_yticklabels(class_names if c <= 15 else [], fontsize=8)
    axes[0].set_ylabel(f"images sorted by true class (N = {n})")
    fig.colorbar(image, ax=list(axes), label="share of the row (rows rescaled to sum to 1)")
    return _finish(fig, "Pseudo-labels per image, sorted by true class", encoder_label)


def _shares(x: Any, name: str, n_classes: int | None = None) -> np.ndarray:
    arr = _np(x, name).astype(np.float64)
    if arr.ndim == 2:
        arr = arr.sum(0)      # a plan (N, C): the class marginal is its column sums
    if arr.ndim != 1:
        raise KPLInputError(f"{name} must be a (C,) vector of class shares or an (N, C) plan, got shape {arr.shape}")
    if (arr < 0).any() or arr.sum() <= 0:
        raise KPLInputError(f"{name} must be non-negative with a positive sum")
    if n_classes is not None and arr.shape[0] != n_classes:
        raise KPLInputError(f"{name} has {arr.shape[0]} classes, expected {n_classes}")
    return arr / arr.sum()


def class_marginals(
    before: Any,
    after: Any | Mapping[str, Any],
    true_priors: Any | None,
    class_names: Sequence[str],
    *,
    encoder_label: str,
    before_label: str = "P0 (before transport)",
) -> Figure:
    """Class shares before transport, after transport (one or several variants) and, when known, the true shares.

    Each input is a (C,) vector of shares/counts or an (N, C) plan (its column sums are used). A uniform transport
    forces every class to 1/C whatever the true shares are: this figure makes that visible.
    """
    encoder_label = _check_label(encoder_label)
    class_names = list(class_names)
    c = len(class_names)
    series = {before_label: _shares(before, "before", c)}
    if isinstance(after, Mapping):
        for k, v in after.items():
            series[k] = _shares(v, f"after[{k!r}]", c)
    else:
        series["after transport"] = _shares(after, "after", c)
    if true_priors is not None:
        series["true class share"] = _shares(true_priors, "true_priors", c)
    df = pd.DataFrame(
        [{"class": class_names[j], "series": k, "share": v[j]} for k, v in series.items() for j in range(c)]
    )
    fig = _figure(max(6.0, 0.9 * c * len(series) / 2 + 3), 4.2)
    ax = fig.subplots()
    palette = sns.color_palette("Set2", len(series))
    if true_priors is not None:
        palette[-1] = (0.2, 0.2, 0.2)
    sns.barplot(data=df, x="class", y="share", hue="series", ax=ax, palette=palette)
    ax.axhline(1 / c, color="grey", ls="--", lw=1, label="uniform 1/C")
    ax.set_ylabel("share of the images")
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=30 if c > 4 else 0)
    ax.legend(fontsize=8, loc="best")
    return _finish(fig, "Class marginals: what the transport step assumes vs the truth", encoder_label)


# ----------------------------------------------------------------------------------------------------------------
# stage 1 and method comparisons


def description_scores(
    scores: Sequence[Any],
    selected: Sequence[Any],
    descriptions: Sequence[Sequence[str]],
    class_names: Sequence[str],
    top: int = 10,
    *,
    encoder_label: str,
    max_classes: int = 6,
) -> Figure:
    """Per class, the ``top`` best-scored descriptions (mean image–description cosine); kept ones (top-K) highlighted.

    ``scores``/``selected`` are ``TextProxies.scores``/``.selected`` (or the MethodResult fields); ``descriptions`` the
    raw texts (``TextEmbeddings.descriptions``). At most ``max_classes`` classes are drawn.
    """
    encoder_label = _check_label(encoder_label)
    class_names = list(class_names)
    if not (len(scores) == len(selected) == len(descriptions) == len(class_names)):
        raise KPLInputError(
            f"scores ({len(scores)}), selected ({len(selected)}), descriptions ({len(descriptions)}) and class_names "
            f"({len(class_names)}) must each have one entry per class"
        )
    if not isinstance(top, int) or top < 1:
        raise KPLInputError(f"top must be a positive integer, got {top!r}")
    n_show = min(len(class_names), max_classes)
    ncols = 2 if n_show > 1 else 1
    nrows = math.ceil(n_show / ncols)
    fig = _figure(7.5 * ncols, 0.32 * top * nrows + 1.6 * nrows + 0.8)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for c in range(n_show):
        s = _np(scores[c], f"scores[{c}]", ndim=1).astype(np.float64)
        kept = set(_np(selected[c], f"selected[{c}]", ndim=1).astype(int).tolist())
        texts = list(descriptions[c])
        if len(texts) != s.shape[0]:
            raise KPLInputError(
                f"class {class_names[c]!r}: {len(texts)} descriptions but {s.shape[0]} scores; pass the texts "
                "that were encoded"
            )
        order = np.argsort(-s, kind="stable")[:top]
        ax = axes[c]
        colours = ["#2b8cbe" if i in kept else "#bdbdbd" for i in order]
        ax.barh(range(len(order)), s[order], color=colours)
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([_short(texts[i], 55) for i in order], fontsize=7)
        ax.invert_yaxis()
        lo, hi = s[order].min(), s[order].max()
        pad = max((hi - lo) * 0.15, 1e-3)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_title(f"{class_names[c]}: {len(kept)} kept of {len(texts)}", fontsize=9)
        ax.set_xlabel("mean cosine with the images")
    for ax in axes[n_show:]:
        ax.set_visible(False)
    from matplotlib.patches import Patch

    handles = [Patch(color="#2b8cbe", label="kept (top-K → text proxy)"), Patch(color="#bdbdbd", label="not kept")]
    axes[0].legend(handles=handles, loc="lower right", fontsize=7)
    shown = "" if n_show == len(class_names) else f" (first {n_show} of {len(class_names)} classes)"
    return _finish(fig, f"Description scores: which knowledge is retrieved{shown}", encoder_label)


def _mean_and_band(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    means, los, his = [], [], []
    for v in values:
        arr = np.atleast_1d(_np(v, "accuracy values")).astype(np.float64)
        means.append(arr.mean())
        los.append(arr.min())
        his.append(arr.max())
    return np.array(means), np.array(los), np.array(his)


def k_sweep(
    ks: Sequence[int],
    accuracies_by_method: Mapping[str, Sequence[Any]],
    *,
    encoder_label: str,
    metric: str = "accuracy",
    baselines: Mapping[str, float] | None = None,
    chosen_k: int | None = None,
    title: str | None = None,
) -> Figure:
    """A metric against K (descriptions kept per class) for each method; a value per K may be a list (seeds/runs),
    drawn as mean with a min–max band. ``baselines`` draws horizontal lines (majority class, chance);
    ``chosen_k`` marks the K fixed in advance (never chosen on test labels)."""
    encoder_label = _check_label(encoder_label)
    ks = [int(k) for k in ks]
    if not ks or not accuracies_by_method:
        raise KPLInputError("k_sweep needs at least one K and one method")
    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    palette = _palette(len(accuracies_by_method))
    for colour, (name, vals) in zip(palette, accuracies_by_method.items()):
        if len(vals) != len(ks):
            raise KPLInputError(f"accuracies_by_method[{name!r}] has {len(vals)} entries, expected one per K ({len(ks)})")
        mean, lo, hi = _mean_and_band(vals)
        ax.plot(ks, mean, "o-", color=colour, label=name)
        if (hi > lo).any():
            ax.fill_between(ks, lo, hi, color=colour, alpha=0.2)
        ax.annotate(f"spread {mean.max() - mean.min():.3f}", (ks[-1], mean[-1]), textcoords="offset points",
                    xytext=(4, 0), fontsize=7, color=colour, va="center")
    for k, (name, v) in enumerate((baselines or {}).items()):
        ax.axhline(float(v), color="0.4", ls=("--", ":", "-.")[k % 3], lw=1, label=name)
    if chosen_k is not None:
        ax.axvline(chosen_k, color="black", lw=0.8, alpha=0.6, label=f"K fixed in advance = {chosen_k}")
    ax.set_xlabel("K (descriptions kept per class)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8, loc="best")
    return _finish(fig, title or f"Sensitivity to K: {metric} over the sweep", encoder_label)


def _ci_bounds(table: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    lo_col, hi_col, ci_col = f"{metric}_lo", f"{metric}_hi", f"{metric}_ci"
    if lo_col in table and hi_col in table:
        return table[lo_col].to_numpy(float), table[hi_col].to_numpy(float)
    if ci_col in table:
        vals = table[ci_col].tolist()
        if all(v is None for v in vals):      # evaluate(..., n_bootstrap=0): no intervals
            return None
        if all(v is None or (isinstance(v, (tuple, list, np.ndarray)) and len(v) == 2) for v in vals):
            arr = np.asarray([(np.nan, np.nan) if v is None else v for v in vals], dtype=float)
            return arr[:, 0], arr[:, 1]
        raise KPLInputError(
            f"column {ci_col!r} must hold (lo, hi) pairs; pass the rows given to results_table (before formatting) "
            f"or columns {lo_col!r}/{hi_col!r}"
        )
    return None


def metrics_bar(
    table: pd.DataFrame | Sequence[Mapping[str, Any]],
    metric: str = "accuracy",
    *,
    encoder_label: str,
    title: str | None = None,
) -> Figure:
    """Bars of one metric per method (grouped by dataset when there are several), with bootstrap intervals.

    ``table`` has columns ``method``, ``metric`` and optionally ``dataset`` and the interval, either as
    ``<metric>_ci`` (lo, hi) pairs (what ``metrics.evaluate`` returns) or ``<metric>_lo``/``<metric>_hi``.
    """
    encoder_label = _check_label(encoder_label)
    df = pd.DataFrame(list(table)) if not isinstance(table, pd.DataFrame) else table.reset_index(drop=True)
    for col in ("method", metric):
        if col not in df:
            raise KPLInputError(f"table has no column {col!r}; columns are {list(df.columns)}")
    if "dataset" not in df:
        df = df.assign(dataset="")
    bounds = _ci_bounds(df, metric)
    datasets = list(dict.fromkeys(df["dataset"]))
    methods = list(dict.fromkeys(df["method"]))
    width = 0.8 / len(methods)
    fig = _figure(max(6.5, 1.1 * len(datasets) * max(1, len(methods)) * 0.6 + 3), 4.5)
    ax = fig.subplots()
    palette = _palette(len(methods))
    for m, method in enumerate(methods):
        xs, ys, errs = [], [], [[], []]
        for d, dataset in enumerate(datasets):
            sel = np.flatnonzero((df["method"] == method).to_numpy() & (df["dataset"] == dataset).to_numpy())
            if len(sel) == 0:
                continue
            if len(sel) > 1:
                raise KPLInputError(f"table has {len(sel)} rows for method {method!r} on dataset {dataset!r}")
            i = sel[0]
            v = float(df[metric].iloc[i])
            xs.append(d + (m - (len(methods) - 1) / 2) * width)
            ys.append(v)
            if bounds is not None:     # rows without an interval get no error bar (nan → 0)
                errs[0].append(float(np.nan_to_num(max(v - bounds[0][i], 0.0))))
                errs[1].append(float(np.nan_to_num(max(bounds[1][i] - v, 0.0))))
        ax.bar(xs, ys, width=width * 0.95, color=palette[m], label=method,
               yerr=np.array(errs) if bounds is not None and xs else None, capsize=3)
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(datasets, rotation=20 if len(datasets) > 3 else 0)
    ax.set_ylabel(metric.replace("_", " ") + (" (bars: bootstrap interval)" if bounds is not None else ""))
    ax.set_ylim(0, 1.0 if df[metric].max() <= 1.0 else None)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _finish(fig, title or f"{metric.replace('_', ' ').capitalize()} by method", encoder_label)


def balancing_study(
    df: pd.DataFrame,
    x: str = "imbalance",
    y: str = "accuracy",
    hue: str = "method",
    *,
    encoder_label: str,
    col: str | None = None,
    title: str = "What the balancing step does",
    xlabel: str | None = None,
    logx: bool = False,
) -> Figure:
    """Line plot of ``y`` against ``x`` per ``hue`` (mean over repeated rows, e.g. seeds, with a min–max band),
    optionally one panel per value of ``col`` (e.g. the metric). ``logx`` puts x on a log scale, ticked at the
    values present (e.g. imbalance ratios 1, 3, 10, 30)."""
    encoder_label = _check_label(encoder_label)
    needed = [c for c in (x, y, hue, col) if c is not None]
    missing = [c for c in needed if c not in df]
    if missing:
        raise KPLInputError(f"df lacks columns {missing}; it has {list(df.columns)}")
    if df.empty:
        raise KPLInputError("df is empty")
    panels = list(dict.fromkeys(df[col])) if col else [None]
    fig = _figure(5.2 * len(panels) + 1.5, 4.3)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    hues = list(dict.fromkeys(df[hue]))
    palette = dict(zip(hues, _palette(len(hues))))
    for ax, panel in zip(axes, panels):
        sub = df if panel is None else df[df[col] == panel]
        stats = sub.groupby([hue, x], sort=False)[y].agg(["mean", "min", "max"]).reset_index()
        for h in hues:
            s = stats[stats[hue] == h].sort_values(x)
            if s.empty:
                continue
            ax.plot(s[x], s["mean"], "o-", color=palette[h], label=str(h))
            if (s["max"] > s["min"]).any():
                ax.fill_between(s[x], s["min"], s["max"], color=palette[h], alpha=0.15)
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(y.replace("_", " "))
        if logx:
            values = sorted(float(v) for v in sub[x].unique())
            if values and values[0] <= 0:
                raise KPLInputError(f"logx needs positive values of {x!r}, got {values[0]}")
            ax.set_xscale("log")
            ax.set_xticks(values, labels=[f"{v:g}" for v in values])
            ax.minorticks_off()
        if panel is not None:
            ax.set_title(str(panel), fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=hue, title_fontsize=8, frameon=False)
    return _finish(fig, title, encoder_label)
