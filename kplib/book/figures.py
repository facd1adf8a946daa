"""The book's figures: matplotlib ``Figure`` objects (not pyplot: a notebook shows each once) whose title names the
encoder (``encoder=``: a label, an ``EncoderIdentity``, an ``Encoder`` or the ``Chapter``); stand-in and simulated
figures carry a red caption. The axis-level ``draw_*`` helpers are shared with the playground."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from sklearn.decomposition import PCA

from ..errors import KPLInputError
from ..params import Options, check, check_embeddings
from . import analysis

STANDIN_CAPTION = "UNTRAINED stand-in — not a result"
SIMULATED_CAPTION = "SIMULATED data — known ground truth, not a measurement"
CAPTION_COLOR = "#c00000"
NO_ENCODER = "none (text statistics only)"
_MARKERS = ("*", "X", "o", "D", "P", "^", "s")


def label_of(encoder: Any) -> str:
    """The label of the encoder behind the numbers: a string, or ``.label`` / ``.identity.label`` of an object."""
    label = encoder if isinstance(encoder, str) else getattr(getattr(encoder, "identity", encoder), "label", None)
    if not isinstance(label, str) or not label.strip():
        raise KPLInputError("encoder must name the encoder behind the numbers: a label (encoder.identity.label, "
                            f"SIMULATED_ENCODER), the Encoder or the Chapter of kplib.book.setup; got {encoder!r}")
    return label.strip()


def caption_for(label: str) -> str | None:
    """The red caption a figure made with this encoder carries, or ``None`` for a pretrained encoder."""
    upper = label.upper()
    return STANDIN_CAPTION if "UNTRAINED" in upper else SIMULATED_CAPTION if "SIMULATED" in upper else None


def finish(fig: Figure, title: str, encoder: Any) -> Figure:
    """Title + ``encoder: <label>`` as the suptitle, and the red caption for stand-in or simulated numbers."""
    label = label_of(encoder)
    fig.suptitle(f"{title}\nencoder: {label}", fontsize=10)
    if caption := caption_for(label):  # supxlabel: the constrained layout reserves room for it
        fig.supxlabel(caption, color=CAPTION_COLOR, fontweight="bold", fontsize=10)
    return fig


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _axes(width: float, height: float, *grid, **kw):
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(*grid, **kw)
    return fig, np.atleast_1d(axes).ravel() if grid else axes


def _classes(labels: Any, n: int, c: int) -> np.ndarray:
    y = _np(labels).astype(np.int64).ravel()
    if y.shape[0] != n or (y.size and (y.min() < 0 or y.max() >= c)):
        raise KPLInputError(f"labels must hold one class index in [0, {c - 1}] per image ({n} images), got "
                            f"{y.shape[0]} values in [{y.min() if y.size else '-'}, {y.max() if y.size else '-'}]")
    return y


def _palette(n: int) -> list:
    return sns.color_palette("tab10" if n <= 10 else "husl", n)


def _legend(ax, handles=None, **kw) -> None:
    """The legend outside the axes, on the right (never over the data)."""
    ax.legend(**({} if handles is None else {"handles": handles}), fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False, **kw)


def _need(df: pd.DataFrame, *columns: str | None) -> None:
    missing = [c for c in columns if c is not None and c not in df]
    if missing:
        raise KPLInputError(f"the table lacks column(s) {missing}; its columns are {list(df.columns)}")


def draw_map(ax, coords: Mapping[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str],
             legend: bool = True, alpha: float = 0.5) -> None:
    """Images (``coords["images"]``) coloured by class; blocks of one row per class as class-coloured markers."""
    colours = _palette(len(class_names))
    img = coords["images"]
    ax.scatter(img[:, 0], img[:, 1], c=[colours[c] for c in labels], s=8, alpha=alpha, linewidths=0)
    handles = [Patch(color=colours[c], label=n) for c, n in enumerate(class_names)] if len(class_names) <= 12 else []
    for marker, (key, p) in zip(_MARKERS, [kv for kv in coords.items() if kv[0] != "images"]):
        per_class = len(p) == len(class_names)
        handles.append(ax.scatter(p[:, 0], p[:, 1], c=colours[:len(p)] if per_class else "0.3", marker=marker,
                                  s=150 if per_class else 25, edgecolors="black", linewidths=0.7, label=key,
                                  zorder=3))
    ax.set(xticks=[], yticks=[])
    if legend:
        _legend(ax, handles)


def draw_confusion(ax, cm: Any, class_names: Sequence[str]) -> None:
    """Confusion matrix (rows: true class): colour = share of the true class, numbers = image counts."""
    m, c = _np(cm).astype(float), len(class_names)
    if m.shape != (c, c):
        raise KPLInputError(f"cm has shape {m.shape}, expected ({c}, {c}): one row and column per class name")
    _heat(ax, m / np.maximum(m.sum(1, keepdims=True), 1), class_names, m.astype(int), "d", "Blues",
          "share of the true class", vmax=1)
    ax.set(xlabel="predicted class", ylabel="true class")


def _heat(ax, values, names, annot, fmt: str, cmap: str, label: str, vmax=None) -> None:
    sns.heatmap(values, annot=annot if len(names) <= 15 else False, fmt=fmt, cmap=cmap, vmin=0 if vmax else None,
                vmax=vmax, xticklabels=list(names), yticklabels=list(names), ax=ax, square=True,
                cbar_kws={"label": label, "shrink": 0.8})
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)


def _shares(x: Any, name: str, c: int) -> np.ndarray:
    a = _np(x).astype(float)
    a = a.sum(0) if a.ndim == 2 else a
    if a.shape != (c,) or (a < 0).any() or a.sum() <= 0:
        raise KPLInputError(f"{name} must be non-negative class shares or counts (C = {c},) or an (N, C) plan")
    return a / a.sum()


def draw_shares(ax, series: Mapping[str, np.ndarray], class_names: Sequence[str]) -> None:
    """Grouped bars of class shares, one group per class; a series named ``true ...`` is dark grey."""
    c = len(class_names)
    pd.DataFrame(series, index=list(class_names)).plot.bar(
        ax=ax, width=0.8, color=["0.25" if label.startswith("true") else f"C{s}" for s, label in enumerate(series)])
    ax.axhline(1 / c, color="grey", ls="--", lw=1, label="uniform 1/C")
    ax.set_xticks(range(c), class_names, rotation=30 if c > 4 else 0, ha="right" if c > 4 else "center", fontsize=8)
    ax.set_ylabel("share of the images")
    _legend(ax)


def gap_bar(summaries: Mapping[str, Mapping[str, float]], *, encoder: Any) -> Figure:
    """Bars of :func:`.analysis.gap_summary` statistics for several settings (datasets, simulated gap sizes)."""
    keys = ("gap_norm", "mean_cos_image_image", "mean_cos_image_text", "mean_cos_text_text")
    if not summaries or any(k not in s for s in summaries.values() for k in keys):
        raise KPLInputError(f"summaries must map each setting to analysis.gap_summary(...) (keys {keys})")
    fig, ax = _axes(max(6.0, 1.6 * len(summaries) + 3), 4.2)
    table = pd.DataFrame(summaries).T[list(keys)].rename(columns=lambda k: k.replace("_", " "))
    table.plot.bar(ax=ax, rot=0, colormap="Set2")
    ax.set(xlabel="", ylabel="value (norm or mean cosine)")
    _legend(ax)
    return finish(fig, "Modality gap: gap-vector norm and mean cosines", encoder)


def gap_hist(gap: Mapping[str, Any], *, encoder: Any) -> Figure:
    """Images and texts along the gap direction (:func:`.analysis.gap_projection`): two bumps when there is a gap."""
    fig, ax = _axes(8, 4)
    for key, what in (("image_coordinate", "images"), ("text_coordinate", "texts")):
        v = _np(gap[key])
        ax.hist(v, bins=40, alpha=0.6, density=True, label=f"{what} ({len(v)})")
    ax.set(xlabel="coordinate along the gap direction (mean(images) − mean(texts), normalised)", ylabel="density")
    ax.legend(fontsize=8)
    return finish(fig, f"Embeddings along the gap vector (norm {gap['gap_norm']:.3f}, separation "
                       f"{gap['separation']:.1f} spreads)", encoder)


def cosines(image_emb: Any, class_text: Any, labels: Any, *, encoder: Any, max_pairs: int = 20000,
            seed: int = 0) -> Figure:
    """Image–text cosines (own vs other class; ``class_text`` is (C, d)) and image–image cosines (same vs different
    class, ``max_pairs`` random pairs). The modality gap shows as image–text cosines far below image–image ones."""
    x = _np(check_embeddings(image_emb, "image_emb")).astype(float)
    t = _np(check_embeddings(class_text, "class_text", dim=x.shape[1])).astype(float)
    y = _classes(labels, len(x), len(t))
    sims = x @ t.T
    own = np.eye(len(t), dtype=bool)[y]
    i, j = np.random.default_rng(seed).integers(0, len(x), size=(2, 4 * max_pairs))
    i, j = i[i != j][:max_pairs], j[i != j][:max_pairs]
    ii, same = np.einsum("nd,nd->n", x[i], x[j]), y[i] == y[j]
    parts = {"image–text, own class": sims[own], "image–text, other classes": sims[~own],
             "image–image, same class": ii[same], "image–image, different class": ii[~same]}
    df = pd.concat([pd.DataFrame({"cosine": v, "pair": k}) for k, v in parts.items() if len(v)], ignore_index=True)
    fig, ax = _axes(8.0, 4.2)
    sns.histplot(data=df, x="cosine", hue="pair", stat="density", common_norm=False, element="step", alpha=0.35,
                 bins=60, ax=ax, palette=dict(zip(parts, ["#1f77b4", "#9ecae1", "#d62728", "#fcae91"])))
    ax.set(xlabel="cosine similarity", ylabel="density (each distribution normalised)")
    return finish(fig, "Image–text vs image–image cosine similarities", encoder)


@dataclass
class Projection:
    """A 2-D projection (UMAP or PCA) fitted on images and texts together; ``transform`` places new points."""

    method: str
    model: Any
    points: dict[str, np.ndarray]  # coordinates of the fitted blocks

    def transform(self, x: Any) -> np.ndarray:
        return np.asarray(self.model.transform(_np(x).astype(np.float32)), dtype=float)


def project(blocks: Mapping[str, Any], method: str = "umap", seed: int = 0) -> Projection:
    """Fit a 2-D map on the stacked blocks: UMAP with the cosine metric (umap-learn), or PCA (scikit-learn)."""
    blocks = {k: _np(v).astype(np.float32) for k, v in blocks.items()}
    n, threads = sum(len(b) for b in blocks.values()), torch.get_num_threads()
    if check("method", method, Options("umap", "pca")) == "pca":
        model = PCA(n_components=2, random_state=seed)
    else:
        try:  # optional and heavy: its first import compiles numba code (and resets torch's thread count)
            import umap
        except ImportError as exc:
            raise KPLInputError("method='umap' needs umap-learn: pip install 'kplib[book]' (or method='pca')") from exc
        model = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, n - 1)), min_dist=0.1, metric="cosine",
                          random_state=seed, transform_seed=seed, n_jobs=1)
    try:
        coords = np.asarray(model.fit_transform(np.concatenate(list(blocks.values()))), dtype=float)
    finally:
        torch.set_num_threads(threads)
    return Projection(method, model, dict(zip(blocks, np.split(coords, np.cumsum([len(b) for b in blocks.values()])))))


def embedding_map(image_emb: Any, labels: Any, class_names: Sequence[str], text_points: Mapping[str, Any] | None = None,
                  method: str = "umap", seed: int = 0, *, encoder: Any,
                  projection: Projection | None = None) -> tuple[Figure, Projection]:
    """Images and text embeddings (``text_points``: legend name → (n, d)) on one 2-D map fitted on both; pass a
    fitted ``projection`` to draw in its coordinates. Returns the figure and the :class:`Projection`."""
    class_names, x = list(class_names), _np(image_emb)
    y = _classes(labels, len(x), len(class_names))
    blocks = {"images": x, **{k: _np(check_embeddings(v, f"text_points[{k!r}]", dim=x.shape[1]))
                              for k, v in (text_points or {}).items()}}
    if projection is None:
        projection = project(blocks, method, seed)
        coords = projection.points
    else:
        coords = {k: projection.transform(v) for k, v in blocks.items()}
    fig, ax = _axes(8.5, 6.0)
    draw_map(ax, coords, y, class_names)
    name = projection.method.upper()
    ax.set(xlabel=f"{name} 1", ylabel=f"{name} 2")
    return finish(fig, f"Images and texts on one {name} map (colour: true class)", encoder), projection


def trajectory(projection: Projection, result: Any, image_emb: Any, labels: Any, *, encoder: Any) -> Figure:
    """Proxies moving during proxy learning (a MethodResult run with ``record_every``), on a fitted map."""
    snaps = getattr(result.proxy_learning, "trajectory", None) or []
    if len(snaps) < 2:
        raise KPLInputError(f"the trajectory has {len(snaps)} proxy snapshot(s), at least 2 are needed; run the "
                            "method with record_every set (KPLConfig(record_every=...))")
    c = len(result.class_names)
    path = projection.transform(torch.cat(list(snaps))).reshape(len(snaps), c, 2)
    coords = {"images": projection.transform(image_emb),
              "text proxy (start)": projection.transform(result.text.proxies), "learned proxy (end)": path[-1]}
    fig, ax = _axes(8.5, 6.0)
    draw_map(ax, coords, _classes(labels, len(coords["images"]), c), result.class_names, alpha=0.25)
    for k, colour in enumerate(_palette(c)):
        ax.plot(path[:, k, 0], path[:, k, 1], ".-", color=colour, lw=2, alpha=0.9)
    name = projection.method.upper()
    ax.set(xlabel=f"{name} 1", ylabel=f"{name} 2")
    return finish(fig, f"Proxies during proxy learning ({result.config.mode} mode, {len(snaps)} snapshots, "
                       f"{result.proxy_learning.iterations} iterations)", encoder)


def confusion(cm: Any, class_names: Sequence[str], *, encoder: Any, title: str = "Confusion matrix") -> Figure:
    """Heatmap of a C×C confusion matrix (rows: true class); numbers are counts, colour the row share."""
    size = max(4.5, 0.7 * len(class_names) + 3)
    fig, ax = _axes(size + 1, size)
    draw_confusion(ax, cm, list(class_names))
    return finish(fig, f"{title} (numbers = image counts)", encoder)


def similarity(table: pd.DataFrame, *, encoder: Any) -> Figure:
    """Heatmap of a class × class similarity table (:func:`.analysis.description_similarity`)."""
    fig, ax = _axes(7.5, 5)
    _heat(ax, table, table.columns, True, ".2f", "mako", "mean cosine")
    ax.set(xlabel="class", ylabel="class")
    return finish(fig, "Description prompts: mean cosine between classes", encoder)


def plans(plans: Any, labels: Any, class_names: Sequence[str], *, encoder: Any) -> Figure:
    """Pseudo-label matrices (N, C) side by side (``{"P0": ..., "after OT": ...}``), images sorted by class, rows
    rescaled to 1 for display; titles give the mean row sum *as returned* (the released routine's rows sum to 1/N)."""
    mats = {k: _np(v).astype(float) for k, v in (plans if isinstance(plans, Mapping) else {"pseudo-labels": plans})
            .items()}
    n, c = next(iter(mats.values())).shape
    if any(m.shape != (n, c) for m in mats.values()) or c != len(class_names):
        raise KPLInputError(f"plans must all be (N, C) with one column per class name ({len(class_names)})")
    y = _classes(labels, n, c)
    order, bounds = np.argsort(y, kind="stable"), np.cumsum(np.bincount(y, minlength=c))[:-1]
    fig, axes = _axes(3.0 * len(mats) + 1.5, 5.5, 1, len(mats), sharey=True)
    for ax, (name, m) in zip(axes, mats.items()):
        if (m < 0).any():
            raise KPLInputError(f"plans[{name!r}] has negative entries; pseudo-labels are non-negative")
        rows = m.sum(1, keepdims=True)
        image = ax.imshow((m / np.where(rows > 0, rows, 1))[order], aspect="auto", interpolation="nearest",
                          cmap="viridis", vmin=0, vmax=1)
        for b in bounds:
            ax.axhline(b - 0.5, color="white", lw=1)
        ax.set_xticks(range(c), list(class_names) if c <= 15 else [], rotation=45, ha="right", fontsize=8)
        ax.set(xlabel="class (column)", yticks=[])
        ax.set_title(f"{name}\nmean row sum as returned: {rows.mean():.3g}", fontsize=9)
    axes[0].set_ylabel(f"images sorted by true class (N = {n})")
    fig.colorbar(image, ax=list(axes), label="share of the row (rows rescaled to sum to 1)")
    return finish(fig, "Pseudo-labels per image, sorted by true class", encoder)


def marginals(before: Any, after: Any, true_priors: Any, class_names: Sequence[str], *, encoder: Any) -> Figure:
    """Class shares before transport, after (one or a mapping of variants) and the true shares: (C,) shares or
    counts, or (N, C) plans. A uniform transport forces every class to 1/C whatever the truth: this shows it."""
    c = len(class_names)
    series = {"P0 (before transport)": _shares(before, "before", c)}
    for k, v in (after.items() if isinstance(after, Mapping) else [("after transport", after)]):
        series[k] = _shares(v, f"after[{k!r}]", c)
    if true_priors is not None:
        series["true class share"] = _shares(true_priors, "true_priors", c)
    fig, ax = _axes(max(6.0, 0.45 * c * len(series) + 3), 4.2)
    draw_shares(ax, series, list(class_names))
    return finish(fig, "Class marginals: what the transport step assumes vs the truth", encoder)


def hardening(results: Mapping[str, Any], *, encoder: Any) -> Figure:
    """Per result, the largest entry of each transported row (as returned) against the hardening threshold alpha."""
    fig, axes = _axes(5 * len(results), 3.6, 1, len(results))
    for k, (ax, (name, res)) in enumerate(zip(axes, results.items())):
        ax.hist(_np(res.transport.plan.max(dim=1).values), bins=30, color=f"C{k}")
        ax.axvline(res.config.alpha, color="k", ls="--", lw=1, label=f"alpha = {res.config.alpha}")
        ax.set(xlabel="largest entry of a transported row (as returned)", ylabel="images")
        ax.set_title(f"{name}: {int(res.hardened.sum())} of {len(res.hardened)} rows hardened", fontsize=9)
        ax.legend(fontsize=8)
    return finish(fig, "Hardening compares each row's largest entry with alpha", encoder)


def proxy_travel(results: Mapping[str, Any], image_emb: Any, *, encoder: Any) -> Figure:
    """Cosine of each class proxy with the mean image during proxy learning (:func:`.analysis.proxy_image_cosines`)."""
    fig, axes = _axes(5 * len(results), 3.6, 1, len(results), sharey=True)
    for ax, (name, res) in zip(axes, results.items()):
        steps, cos = analysis.proxy_image_cosines(res, image_emb)
        for c, cls in enumerate(res.class_names):
            ax.plot(steps, cos[:, c], "o-", ms=3, label=cls)
        ax.set(xlabel="iteration", title=name)
    axes[0].set_ylabel("cosine(proxy, mean image)")
    axes[-1].legend(fontsize=8)
    return finish(fig, "Proxies and the image region during proxy learning", encoder)


def descent(result: Any, *, encoder: Any) -> Figure:
    """Gradient norm and step size of proxy learning, step by step (the released descent halves its step)."""
    pl = result.proxy_learning
    fig, (ax1, ax2) = _axes(10, 3.4, 1, 2)
    ax1.semilogy(pl.grad_norms)
    ax1.set(xlabel="step", ylabel="‖G‖_F", title="gradient norm")
    ax2.semilogy(pl.lr_history)
    halvings = sum(b < a for a, b in zip(pl.lr_history, pl.lr_history[1:]))
    ax2.set(xlabel="step", ylabel="lr", title=f"step size: {halvings} permanent halvings")
    return finish(fig, f"Proxy learning step by step ({result.config.mode} mode)", encoder)


def description_scores(text: Any, descriptions: Sequence[Sequence[str]], class_names: Sequence[str], top: int = 10,
                       *, encoder: Any, max_classes: int = 6) -> Figure:
    """Per class, the ``top`` best-scored descriptions of stage 1 (``text``: TextProxies); the kept top-K in blue."""
    if not len(text.scores) == len(text.selected) == len(descriptions) == len(class_names):
        raise KPLInputError(f"scores ({len(text.scores)}), selected ({len(text.selected)}), descriptions "
                            f"({len(descriptions)}) and class_names ({len(class_names)}) need one entry per class")
    n_show = min(len(class_names), max_classes)
    ncols, nrows = min(2, n_show), math.ceil(n_show / 2)
    fig, axes = _axes(7.5 * ncols, 0.32 * top * nrows + 1.6 * nrows + 0.8, nrows, ncols)
    for c, ax in enumerate(axes[:n_show]):
        s, kept = _np(text.scores[c]).astype(float), set(_np(text.selected[c]).astype(int).tolist())
        if len(descriptions[c]) != len(s):
            raise KPLInputError(f"class {class_names[c]!r}: {len(descriptions[c])} descriptions but {len(s)} scores")
        order = np.argsort(-s, kind="stable")[:top]
        ax.barh(range(len(order)), s[order], color=["#2b8cbe" if i in kept else "#bdbdbd" for i in order])
        ax.set_yticks(range(len(order)), [descriptions[c][i][:55] for i in order], fontsize=7)
        ax.invert_yaxis()
        pad = max(float(np.ptp(s[order])) * 0.15, 1e-3)
        ax.set(xlim=(s[order].min() - pad, s[order].max() + pad), xlabel="mean cosine with the images")
        ax.set_title(f"{class_names[c]}: {len(kept)} kept of {len(s)}", fontsize=9)
    for ax in axes[n_show:]:
        ax.set_visible(False)
    axes[0].legend(handles=[Patch(color="#2b8cbe", label="kept (top-K → text proxy)"),
                            Patch(color="#bdbdbd", label="not kept")], loc="lower right", fontsize=7)
    shown = "" if n_show == len(class_names) else f" (first {n_show} of {len(class_names)} classes)"
    return finish(fig, f"Description scores: which knowledge is retrieved{shown}", encoder)


def score_vs_discrimination(ranking: pd.DataFrame, *, encoder: Any) -> Figure:
    """Retrieval score against class discrimination of every description (:func:`.analysis.description_ranking`)."""
    _need(ranking, "class", "score", "discrimination", "kept")
    fig, ax = _axes(8, 4.5)
    for c, (name, r) in enumerate(ranking.groupby("class", sort=False)):
        ax.scatter(r.score[~r.kept], r.discrimination[~r.kept], s=14, color=f"C{c}", alpha=0.35)
        ax.scatter(r.score[r.kept], r.discrimination[r.kept], s=40, color=f"C{c}", edgecolors="black", label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="stage-1 score (mean cosine with all images): what retrieval uses",
           ylabel="own − other class cosine (uses labels)")
    _legend(ax, title="class (kept: black edge)", title_fontsize=7)
    return finish(fig, "Retrieval score vs class discrimination of every description", encoder)


def sweep(df: pd.DataFrame, x: str, y: str = "accuracy", hue: str = "method", *, encoder: Any, col: str | None = None,
          logx: bool = False, logy: bool = False, baselines: Mapping[str, float] | None = None,
          mark: float | None = None, title: str | None = None, xlabel: str | None = None) -> Figure:
    """``y`` against ``x`` per ``hue``: the mean over repeated rows (seeds, subsamples) with a min–max band, one
    panel per value of ``col``. ``baselines`` draws horizontal lines, ``mark`` a vertical one (e.g. the K fixed in
    advance). Used for K sweeps (:func:`.analysis.k_sweep`), the balancing study and the scaling benchmark."""
    _need(df, x, y, hue, col)
    if df.empty:
        raise KPLInputError("the table is empty")
    panels = list(dict.fromkeys(df[col])) if col else [None]
    fig, axes = _axes(5.2 * len(panels) + 1.5, 4.3, 1, len(panels), sharey=not logy)
    hues = list(dict.fromkeys(df[hue]))
    for ax, panel in zip(axes, panels):
        sub = df if panel is None else df[df[col] == panel]
        stats = sub.groupby([hue, x], sort=False)[y].agg(["mean", "min", "max"]).reset_index().sort_values(x)
        for h, colour in zip(hues, _palette(len(hues))):
            s = stats[stats[hue] == h]
            ax.plot(s[x], s["mean"], "o-", color=colour, label=str(h))
            ax.fill_between(s[x], s["min"], s["max"], color=colour, alpha=0.15, lw=0)
        for k, (name, v) in enumerate((baselines or {}).items()):
            ax.axhline(float(v), color="0.4", ls=("--", ":", "-.")[k % 3], lw=1, label=name)
        if mark is not None:
            ax.axvline(mark, color="black", lw=0.8, alpha=0.6, label=f"{x} fixed in advance = {mark:g}")
        ax.set(xlabel=xlabel or x, ylabel=y.replace("_", " "), title=str(panel) if col else "",
               xscale="log" if logx else "linear", yscale="log" if logy else "linear")
        if logx:
            values = sorted(sub[x].unique())
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.minorticks_off()
    _legend(axes[-1], axes[0].get_legend_handles_labels()[0])
    return finish(fig, title or f"{y.replace('_', ' ').capitalize()} against {x}", encoder)


def scaling(bench: pd.DataFrame) -> Figure:
    """Time and peak memory of the post-encoding stages against N (:func:`.analysis.read_bench`: ``make bench``)."""
    _need(bench, "n", "variant", "seconds")
    long = bench.melt(id_vars=["n", "variant"], value_vars=[c for c in ("seconds", "peak_rss_mb") if c in bench],
                      var_name="quantity", value_name="value").dropna()
    long["quantity"] = long["quantity"].map({"seconds": "seconds (transport + proxy learning)",
                                             "peak_rss_mb": "peak RSS of the process (MB)"})
    return sweep(long, "n", "value", hue="variant", col="quantity", logx=True, logy=True, xlabel="N (images)",
                 encoder="SIMULATED embeddings (speed only)", title="Post-encoding time and memory (make bench)")


def metrics_bar(table: Any, metric: str = "accuracy", *, encoder: Any, title: str | None = None,
                chance: Mapping[str, float] | None = None) -> Figure:
    """One metric per method, grouped by ``dataset`` when present, with the bootstrap intervals of ``<metric>_ci``
    (``(lo, hi)``, as ``metrics.evaluate`` returns); ``chance`` maps a dataset to 1/C."""
    df = pd.DataFrame(table).reset_index(drop=True)
    _need(df, "method", metric)
    df, cis = df if "dataset" in df else df.assign(dataset=""), df.get(f"{metric}_ci", pd.Series([None] * len(df)))
    if not all(v is None or (isinstance(v, (tuple, list, np.ndarray)) and len(v) == 2) for v in cis):
        raise KPLInputError(f"column {metric}_ci must hold (lo, hi) pairs: pass the rows of metrics.evaluate, not a "
                            "formatted table")
    ci, bars = np.array([(np.nan, np.nan) if v is None else v for v in cis], dtype=float), cis.notna().any()
    datasets, methods = list(dict.fromkeys(df["dataset"])), list(dict.fromkeys(df["method"]))
    width = 0.8 / len(methods)
    fig, ax = _axes(min(13.0, max(6.5, 0.66 * len(datasets) * len(methods) + 3)), 4.5)
    for m, method in enumerate(methods):
        sel = (df["method"] == method).to_numpy()
        pos = np.array([datasets.index(d) for d in df["dataset"][sel]]) + (m - (len(methods) - 1) / 2) * width
        v = df[metric][sel].to_numpy(float)
        err = np.nan_to_num(np.clip([v - ci[sel, 0], ci[sel, 1] - v], 0, None)) if bars else None
        ax.bar(pos, v, width=width * 0.95, color=f"C{m}", label=method, yerr=err, capsize=3)
    if chance:
        ax.scatter([datasets.index(d) for d in chance], list(chance.values()), marker="_", s=900, color="k",
                   zorder=5, label="chance (1/C)")
    ax.set_xticks(range(len(datasets)), datasets, rotation=20 if len(datasets) > 3 else 0)
    ax.set(ylabel=metric.replace("_", " ") + (" (bars: bootstrap interval)" if bars else ""),
           ylim=(0, 1.0 if df[metric].max() <= 1.0 else None))
    _legend(ax)
    return finish(fig, title or f"{metric.replace('_', ' ').capitalize()} by method", encoder)


def kb_counts_bar(counts: pd.DataFrame, minimum: int | None = None) -> Figure:
    """Descriptions per class of each knowledge base (:func:`.analysis.kb_counts`), with the validation minimum."""
    _need(counts, "dataset", "class", "descriptions")
    datasets = list(dict.fromkeys(counts["dataset"]))
    fig, ax = _axes(11, 4.2)
    ax.bar(range(len(counts)), counts["descriptions"], color=[f"C{datasets.index(d)}" for d in counts["dataset"]])
    if minimum is not None:
        ax.axhline(minimum, color="k", ls="--", lw=1, label=f"validation minimum ({minimum})")
    ax.set_xticks(range(len(counts)), counts["class"], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("descriptions per class")
    _legend(ax, ax.get_legend_handles_labels()[0] + [Patch(color=f"C{i}", label=d) for i, d in enumerate(datasets)])
    return finish(fig, "Knowledge bases: descriptions per class", NO_ENCODER)


def token_lengths(lengths: pd.DataFrame, limit: int = 77) -> Figure:
    """Prompt lengths in tokens per ``dataset`` (:func:`.analysis.prompt_token_lengths`) and the context length."""
    _need(lengths, "n_tokens")
    lengths = lengths if "dataset" in lengths else lengths.assign(dataset="")
    fig, ax = _axes(8, 4)
    bins = np.arange(lengths.n_tokens.min() - 0.5, max(lengths.n_tokens.max(), limit) + 1.5)
    for name, g in lengths.groupby("dataset", sort=False):
        ax.hist(g["n_tokens"], bins=bins, histtype="step", lw=1.5, label=name)
    ax.axvline(limit, color="red", ls="--", label=f"text context ({limit} tokens)")
    ax.set(xlabel="tokens of the full prompt (start/end tokens included)", ylabel="number of descriptions")
    ax.legend(fontsize=7)
    return finish(fig, "Prompt lengths (tokenizer only; no encoder weights involved)", NO_ENCODER)
