"""The playground: ipywidgets controls over a simulated world, and the static figures that stand in for them.

A reader moves a knob (modality-gap size, class imbalance, K, tau_t, tau_i, method); the world is re-simulated
(``kplib.simulate.make_world``), the method re-run (``kplib.methods.run_method``) and one figure redrawn:
an embedding map (PCA of images and texts, with the text proxies and the learned proxies), the confusion matrix
and the class shares (true vs predicted vs what the transport step assumed).

ipywidgets render blank in a static offline HTML page, so every knob also has :func:`knob_panel`: the same
computation over a grid of values, done once at build time, drawn as one static figure.

All numbers here come from the simulator (known ground truth, ``SIMULATED`` encoder label): they illustrate the
mechanisms and are not measurements of any real model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .errors import KPLInputError
from .viz import _finish as viz_finish

__all__ = [
    "KNOBS",
    "DEFAULTS",
    "KNOB_GRIDS",
    "PlaygroundRun",
    "simulate_and_run",
    "playground_figure",
    "knob_panel",
    "Playground",
]

#: The controls: name → (label, kind). Kinds: "float", "logfloat", "int", "choice".
KNOBS: dict[str, tuple[str, str]] = {
    "gap": ("modality gap ||mean(img) - mean(txt)||", "float"),
    "imbalance": ("class imbalance (max/min class share)", "logfloat"),
    "k": ("K (descriptions kept per class)", "int"),
    "tau_t": ("tau_t (pseudo-label temperature)", "logfloat"),
    "tau_i": ("tau_i (proxy-learning temperature)", "logfloat"),
    "method": ("method", "choice"),
}
#: Starting values: the released defaults (K, temperatures), a balanced world with the simulator's default gap.
DEFAULTS: dict[str, Any] = {"gap": 0.82, "imbalance": 1.0, "k": 8, "tau_t": 0.01, "tau_i": 0.04,
                            "method": "kpl_reference"}
#: The values each static panel computes (``knob_panel``); the method grid is ``kplib.methods.METHODS``.
KNOB_GRIDS: dict[str, tuple] = {
    "gap": (0.6, 0.82, 1.0, 1.2),
    "imbalance": (1.0, 3.0, 10.0, 30.0),
    "k": (1, 4, 8, 32),
    "tau_t": (0.003, 0.01, 0.03, 0.1),
    "tau_i": (0.01, 0.04, 0.1, 0.3),
}
#: The simulated world under the knobs: the book's "balanced_collapse" preset (names point at one class, so the
#: zero-shot and text-proxy predictions collapse), made small enough to recompute on every change.
BASE_PRESET = "balanced_collapse"
_SIZE = {"n_images": 400, "dim": 128}


def _methods() -> tuple[str, ...]:
    from .methods import METHODS

    return tuple(METHODS)


def _check_values(values: dict[str, Any]) -> dict[str, Any]:
    unknown = [k for k in values if k not in KNOBS]
    if unknown:
        raise KPLInputError(f"unknown playground knob(s) {unknown}; the knobs are {list(KNOBS)}")
    out = {**DEFAULTS, **values}
    for name in ("gap", "imbalance", "tau_t", "tau_i"):
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise KPLInputError(f"{name} must be a positive finite number, got {v!r}")
        out[name] = float(v)
    if out["imbalance"] < 1:
        raise KPLInputError(f"imbalance is the max/min class-share ratio and must be >= 1, got {out['imbalance']}")
    k = out["k"]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise KPLInputError(f"k must be a positive integer (descriptions kept per class), got {k!r}")
    out["k"] = int(k)
    if out["method"] not in _methods():
        raise KPLInputError(f"method must be one of {list(_methods())}, got {out['method']!r}")
    return out


# ------------------------------------------------------------------------------------------------- one run
@lru_cache(maxsize=16)
def _world(gap: float, imbalance: float, n_images: int, dim: int, seed: int, base: str):
    from .simulate import PRESETS, make_world

    if base not in PRESETS:
        raise KPLInputError(f"base must be one of the simulator presets {sorted(PRESETS)}, got {base!r}")
    params = {**PRESETS[base], "n_images": n_images, "dim": dim, "seed": seed, "gap": gap,
              "imbalance": None if imbalance == 1.0 else imbalance}
    params.pop("priors", None)
    return make_world(**params)


def min_gap(n_images: int = _SIZE["n_images"], dim: int = _SIZE["dim"], seed: int = 0,
            base: str = BASE_PRESET) -> float:
    """The smallest modality gap the base world can have (its image and text contents alone differ this much)."""
    return float(_world(None, 1.0, n_images, dim, seed, base).truth["content_gap"])


@dataclass
class PlaygroundRun:
    """One simulated world, one method run on it, and its scores. ``world`` and ``result`` are memoised (runs with the
    same knobs share them): read them, do not modify them."""

    params: dict                      # the knob values (+ n_images, dim, seed, base)
    world: Any                        # kplib.simulate.SimulatedWorld
    result: Any                       # kplib.methods.MethodResult
    scores: dict = field(default_factory=dict)   # accuracy, balanced_accuracy, text_proxy_accuracy

    @property
    def encoder_label(self) -> str:
        return str(self.world.text.meta.get("encoder", "SIMULATED"))


def _config(method: str, k: int, tau_t: float, tau_i: float, seed: int):
    from .methods import KPLConfig

    if method == "kpl_reference":
        return KPLConfig.reference(k=k, tau_t=tau_t, tau_i=tau_i, seed=seed)
    if method == "kpl_corrected":
        return KPLConfig.corrected(k=k, tau_t=tau_t, tau_i=tau_i, seed=seed)
    if method == "inmap":
        return KPLConfig(k=k, tau_t=tau_t, tau_i=tau_i, seed=seed)
    return None


def simulate_and_run(n_images: int = _SIZE["n_images"], dim: int = _SIZE["dim"], seed: int = 0,
                     base: str = BASE_PRESET, **values: Any) -> PlaygroundRun:
    """Simulate the world for the knob ``values`` (missing knobs take :data:`DEFAULTS`) and run the method on it.

    ``gap`` below the world's content gap raises :class:`~kplib.errors.KPLInputError` with the smallest reachable
    value (``make_world``'s message). ``k``, ``tau_t``, ``tau_i`` do not apply to ``zero_shot``;
    ``descriptor_mean`` uses every description (``k`` ignored).
    """
    v = _check_values(values)
    key = (v["method"], v["gap"], v["imbalance"], v["k"], v["tau_t"], v["tau_i"], int(n_images), int(dim), int(seed),
           base)
    world, result, scores = _run(*key)
    return PlaygroundRun(params={**v, "n_images": int(n_images), "dim": int(dim), "seed": int(seed), "base": base},
                         world=world, result=result, scores=dict(scores))


@lru_cache(maxsize=64)
def _run(method: str, gap: float, imbalance: float, k: int, tau_t: float, tau_i: float, n_images: int, dim: int,
         seed: int, base: str):
    """One method on one world, memoised: the static grids revisit the default setting once per knob."""
    from .methods import run_method
    from .metrics import evaluate

    world = _world(gap, imbalance, n_images, dim, seed, base)
    result = run_method(method, world.image_embeddings, world.text, config=_config(method, k, tau_t, tau_i, seed))
    ev = evaluate(world.labels, result.predictions, world.class_names, n_bootstrap=0)
    scores = {"accuracy": ev["accuracy"], "balanced_accuracy": ev["balanced_accuracy"], "macro_f1": ev["macro_f1"]}
    if result.text_predictions is not None:
        scores["text_proxy_accuracy"] = float((result.text_predictions == world.labels).float().mean())
    return world, result, scores


# ------------------------------------------------------------------------------------------------- drawing
def _pca_map(run: PlaygroundRun):
    """2-D PCA fitted on images + class-name prompts + text proxies (so the modality gap is a visible axis)."""
    from sklearn.decomposition import PCA

    x = run.world.image_embeddings.numpy()
    names = run.world.text.name_embeddings.mean(1).numpy()
    blocks = {"images": x, "class-name prompts": names}
    if run.result.text_proxies is not None:
        blocks["text proxies"] = run.result.text_proxies.numpy()
    if run.result.proxy_learning is not None:   # zero-shot / descriptor-mean proxies are not learned
        blocks["learned proxies"] = run.result.proxies.numpy()
    stacked = np.concatenate([b / np.linalg.norm(b, axis=1, keepdims=True) for b in blocks.values()])
    pca = PCA(n_components=2, random_state=0).fit(stacked)
    return {k: pca.transform(b / np.linalg.norm(b, axis=1, keepdims=True)) for k, b in blocks.items()}


_MARKERS = {"class-name prompts": "X", "text proxies": "*", "learned proxies": "o"}


def _draw_map(ax, run: PlaygroundRun, legend: bool = True) -> None:
    import seaborn as sns

    pts = _pca_map(run)
    c = len(run.world.class_names)
    colours = sns.color_palette("tab10" if c <= 10 else "husl", c)   # the palette of kplib.viz
    y = run.world.labels.numpy()
    img = pts["images"]
    ax.scatter(img[:, 0], img[:, 1], c=[colours[k] for k in y], s=6, alpha=0.4, linewidths=0)
    for key, marker in _MARKERS.items():
        if key in pts:
            p = pts[key]
            ax.scatter(p[:, 0], p[:, 1], c=colours[:c], marker=marker, s=150 if marker == "*" else 90,
                       edgecolors="black", linewidths=0.8, label=key, zorder=3)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("PCA 1 (images + texts)")
    ax.set_ylabel("PCA 2")
    if legend:
        ax.legend(fontsize=7, loc="best", framealpha=0.7)


def _shares(run: PlaygroundRun) -> dict[str, np.ndarray]:
    c = len(run.world.class_names)
    pred = np.bincount(run.result.predictions.numpy(), minlength=c) / len(run.result.predictions)
    out = {"true share": run.world.priors.numpy().astype(float), "predicted share": pred}
    if run.result.class_marginal is not None:
        out["transport target q"] = run.result.class_marginal.numpy().astype(float)
    return out


def _title(run: PlaygroundRun) -> str:
    p = run.params
    s = run.scores
    knobs = (f"gap {p['gap']:.2f} · imbalance {p['imbalance']:g} · K {p['k']} · tau_t {p['tau_t']:g} · "
             f"tau_i {p['tau_i']:g}")
    extra = f" · text proxy {s['text_proxy_accuracy']:.2f}" if "text_proxy_accuracy" in s else ""
    return (f"{p['method']}: accuracy {s['accuracy']:.2f}, balanced {s['balanced_accuracy']:.2f}{extra}\n{knobs}")


def _finish(fig: Figure, title: str, encoder_label: str) -> Figure:
    return viz_finish(fig, title, encoder_label, fontsize=10)


def playground_figure(run: PlaygroundRun) -> Figure:
    """Three panels for one run: embedding map, confusion matrix (row shares), class shares true vs predicted."""
    if not isinstance(run, PlaygroundRun):
        raise KPLInputError("run must be a PlaygroundRun from kplib.widgets.simulate_and_run")
    names = run.world.class_names
    c = len(names)
    fig = Figure(figsize=(13, 4.4), layout="constrained")
    ax_map, ax_cm, ax_sh = fig.subplots(1, 3, width_ratios=[1.3, 1, 1])
    _draw_map(ax_map, run)
    ax_map.set_title("embedding map (colours: true class)", fontsize=9)
    from .metrics import confusion_counts

    cm = confusion_counts(run.world.labels.numpy(), run.result.predictions.numpy(), c).astype(float)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax_cm.imshow(share, vmin=0, vmax=1, cmap="Blues")
    for i in range(c):
        for j in range(c):
            ax_cm.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                       color="white" if share[i, j] > 0.6 else "black")
    ax_cm.set_xticks(range(c), names, rotation=45, ha="right", fontsize=8)
    ax_cm.set_yticks(range(c), names, fontsize=8)
    ax_cm.set_xlabel("predicted class")
    ax_cm.set_ylabel("true class")
    ax_cm.set_title("confusion (numbers = images)", fontsize=9)
    fig.colorbar(im, ax=ax_cm, shrink=0.8, label="share of the true class")
    shares = _shares(run)
    width = 0.8 / len(shares)
    for s, (label, vals) in enumerate(shares.items()):
        ax_sh.bar(np.arange(c) + (s - (len(shares) - 1) / 2) * width, vals, width=width * 0.95, label=label,
                  color=("0.25" if label == "true share" else f"C{s}"))
    ax_sh.axhline(1 / c, color="grey", ls="--", lw=1, label="uniform 1/C")
    ax_sh.set_xticks(range(c), names, rotation=45, ha="right", fontsize=8)
    ax_sh.set_ylabel("share of the images")
    ax_sh.set_ylim(0, 1)
    ax_sh.legend(fontsize=7, loc="upper right")
    ax_sh.set_title("class shares", fontsize=9)
    return _finish(fig, _title(run), run.encoder_label)


def knob_panel(knob: str, values: Sequence | None = None, methods: Sequence[str] | None = None,
               show_method: str | None = None, n_images: int = _SIZE["n_images"], dim: int = _SIZE["dim"],
               seed: int = 0, base: str = BASE_PRESET, **fixed: Any) -> tuple[Figure, pd.DataFrame]:
    """The static stand-in for one widget: every method over a grid of ``knob`` values (others fixed at
    :data:`DEFAULTS` or ``fixed``), drawn as a row of embedding maps (for ``show_method``) above the scores.

    ``knob="method"`` compares the methods at the fixed settings (maps per method, bars of the scores).
    Returns the figure and a tidy table (``knob, value, method, accuracy, balanced_accuracy, macro_f1,
    text_proxy_accuracy, encoder``).
    """
    if knob not in KNOBS:
        raise KPLInputError(f"knob must be one of {list(KNOBS)}, got {knob!r}")
    all_methods = _methods()
    methods = list(methods) if methods is not None else list(all_methods)
    bad = [m for m in methods if m not in all_methods]
    if not methods or bad:
        raise KPLInputError(f"methods must be a non-empty subset of {list(all_methods)}, got {methods!r}")
    if knob == "method":
        values = list(values) if values is not None else methods
        methods = values
    else:
        values = list(values) if values is not None else list(KNOB_GRIDS[knob])
    if not values:
        raise KPLInputError(f"values for knob {knob!r} is empty")
    show_method = show_method or fixed.get("method", DEFAULTS["method"])
    if knob != "method" and show_method not in methods:
        raise KPLInputError(f"show_method {show_method!r} must be one of the methods run: {methods}")
    fixed = {k: v for k, v in fixed.items() if k != "method"}
    rows, shown = [], []
    for value in values:
        for method in (methods if knob != "method" else [value]):
            knobs = {**fixed, "method": method} if knob == "method" else {**fixed, knob: value, "method": method}
            run = simulate_and_run(n_images=n_images, dim=dim, seed=seed, base=base, **knobs)
            rows.append({"knob": knob, "value": value, "method": method, **run.scores,
                         "encoder": run.encoder_label})
            if method == (value if knob == "method" else show_method):
                shown.append((value, run))
    table = pd.DataFrame(rows)
    label = shown[0][1].encoder_label
    n = len(values)
    fig = Figure(figsize=(max(10.0, 3.0 * n), 7.2), layout="constrained")
    mosaic = [[f"map{i}" for i in range(n)], ["scores"] * n]
    axes = fig.subplot_mosaic(mosaic, height_ratios=[1, 1.1])
    for i, (value, run) in enumerate(shown):
        ax = axes[f"map{i}"]
        _draw_map(ax, run, legend=(i == 0))
        what = value if knob == "method" else f"{knob} = {value:g}" if isinstance(value, float) else f"{knob} = {value}"
        ax.set_title(f"{what}\nacc {run.scores['accuracy']:.2f}, bal. acc {run.scores['balanced_accuracy']:.2f}",
                     fontsize=9)
    ax = axes["scores"]
    if knob == "method":
        metrics = ["accuracy", "balanced_accuracy", "macro_f1"]
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            ax.bar(np.arange(n) + (j - 1) * width, table[metric], width=width * 0.95, label=metric.replace("_", " "))
        ax.set_xticks(range(n), values)
    else:
        for j, method in enumerate(methods):
            sub = table[table["method"] == method]
            ax.plot(range(n), sub["accuracy"], "o-", color=f"C{j}", label=f"{method} accuracy")
            ax.plot(range(n), sub["balanced_accuracy"], "s--", color=f"C{j}", alpha=0.6, lw=1,
                    label=f"{method} balanced acc.")
        ax.set_xticks(range(n), [f"{v:g}" if isinstance(v, float) else str(v) for v in values])
        ax.set_xlabel(KNOBS[knob][0] + " (grid values; not evenly spaced)")
        if DEFAULTS[knob] in values:
            ax.axvline(values.index(DEFAULTS[knob]), color="grey", ls=":", lw=1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("score on the simulated world")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    title = (f"Knob: {KNOBS[knob][0]} — maps show {show_method if knob != 'method' else 'each method'}"
             f" ({base} world, N = {n_images}, d = {dim}, seed {seed})")
    return _finish(fig, title, label), table


# ------------------------------------------------------------------------------------------------- the widget
class Playground:
    """ipywidgets controls for :data:`KNOBS` over :func:`simulate_and_run`; every change redraws
    :func:`playground_figure` into an ``Output``. ``update(**values)`` does the same from code (and tests).

    ``knobs`` picks the controls shown (default: all); the others keep their initial values.
    Attributes: ``controls`` (name → widget), ``output``, ``widget`` (the box to display), ``run`` (the last
    :class:`PlaygroundRun`), ``figure`` (the last figure), ``history`` (the knob values of every redraw).
    """

    def __init__(self, n_images: int = _SIZE["n_images"], dim: int = _SIZE["dim"], seed: int = 0,
                 base: str = BASE_PRESET, knobs: Sequence[str] | None = None, **initial: Any):
        import ipywidgets as w

        shown = list(KNOBS) if knobs is None else list(knobs)
        if not shown or any(k not in KNOBS for k in shown):
            raise KPLInputError(f"knobs must be a non-empty subset of {list(KNOBS)}, got {knobs!r}")

        self.n_images, self.dim, self.seed, self.base = int(n_images), int(dim), int(seed), base
        start = _check_values(initial)
        lo = math.ceil(min_gap(self.n_images, self.dim, self.seed, base) * 100) / 100
        if start["gap"] < lo:
            raise KPLInputError(f"gap must be at least {lo} for this world (its contents alone differ that much)")
        style = {"description_width": "initial"}
        layout = w.Layout(width="330px")
        self.controls = {
            "gap": w.FloatSlider(value=start["gap"], min=lo, max=1.4, step=0.02, description="modality gap",
                                 style=style, layout=layout, continuous_update=False),
            "imbalance": w.FloatLogSlider(value=start["imbalance"], base=10, min=0, max=1.7, step=0.05,
                                          description="imbalance (max/min)", style=style, layout=layout,
                                          continuous_update=False),
            "k": w.IntSlider(value=start["k"], min=1, max=50, description="K", style=style, layout=layout,
                             continuous_update=False),
            "tau_t": w.FloatLogSlider(value=start["tau_t"], base=10, min=-3, max=0, step=0.1, description="tau_t",
                                      style=style, layout=layout, continuous_update=False),
            "tau_i": w.FloatLogSlider(value=start["tau_i"], base=10, min=-2.5, max=0, step=0.1,
                                      description="tau_i", style=style, layout=layout, continuous_update=False),
            "method": w.Dropdown(options=list(_methods()), value=start["method"], description="method",
                                 style=style, layout=layout),
        }
        self.output = w.Output()
        self.run: PlaygroundRun | None = None
        self.figure: Figure | None = None
        self.history: list[dict] = []
        self._suspended = False
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        # every knob has a control (so values() is complete); only ``knobs`` are shown, the rest stay fixed
        half = (len(shown) + 1) // 2
        self.widget = w.VBox([w.HBox([w.VBox([self.controls[n] for n in shown[:half]]),
                                      w.VBox([self.controls[n] for n in shown[half:]])]), self.output])
        self.update()

    def values(self) -> dict[str, Any]:
        """The knob values the controls show now."""
        return {name: control.value for name, control in self.controls.items()}

    def _on_change(self, change) -> None:
        if not self._suspended:
            self.update()

    def update(self, **values: Any) -> Figure:
        """Set the given knobs (others stay), re-simulate, re-run and redraw; returns the new figure."""
        v = _check_values({**self.values(), **values})
        self._suspended = True
        try:
            for name, value in values.items():
                self.controls[name].value = value
        finally:
            self._suspended = False
        self.run = simulate_and_run(n_images=self.n_images, dim=self.dim, seed=self.seed, base=self.base, **v)
        self.figure = playground_figure(self.run)
        self.history.append(dict(v))
        # Replace the Output widget's content through its ``outputs`` state rather than ``with self.output:
        # display(...)``: output capture goes through the kernel's iopub routing, which headless executors
        # (nbclient/papermill) intercept — measured here to hang a build now and then.
        self.output.outputs = ()
        self.output.append_display_data(self.figure)
        return self.figure

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
