"""The playground: ipywidgets knobs (gap, imbalance, K, tau_t, tau_i, method) over a simulated world that is
re-simulated, re-run and redrawn on every change; ipywidgets render blank in a static page, so :func:`knob_panel`
draws the same over a grid of values at build time. Simulated numbers: mechanisms, not measurements."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import ipywidgets as w
import numpy as np
import pandas as pd
from IPython.display import display
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix

from ..errors import KPLInputError
from ..method.methods import METHODS, run_method
from ..method.simulate import PRESETS, make_world
from ..params import POSITIVE, Interval, Options, check, unit
from . import analysis
from .figures import _legend, draw_confusion, draw_map, draw_shares, finish, project

#: The knobs: name → (label, constraint).
KNOBS: dict[str, tuple[str, Any]] = {
    "gap": ("modality gap ‖mean(img) − mean(txt)‖", Interval(float, 0, 2, closed="neither")),
    "imbalance": ("class imbalance (max/min class share)", Interval(float, 1)),
    "k": ("K (descriptions kept per class)", Interval(int, 1)),
    "tau_t": ("tau_t (pseudo-label temperature)", POSITIVE),
    "tau_i": ("tau_i (proxy-learning temperature)", POSITIVE),
    "method": ("method", Options(*METHODS)),
}
#: Starting values: the released defaults, a balanced world with the simulator's default gap.
DEFAULTS: dict[str, Any] = {"gap": 0.82, "imbalance": 1.0, "k": 8, "tau_t": 0.01, "tau_i": 0.04,
                            "method": "kpl_reference"}
#: The values each static panel computes (:func:`knob_panel`).
KNOB_GRIDS: dict[str, tuple] = {"gap": (0.6, 0.82, 1.0, 1.2), "imbalance": (1.0, 3.0, 10.0, 30.0), "k": (1, 4, 8, 32),
                                "tau_t": (0.003, 0.01, 0.03, 0.1), "tau_i": (0.01, 0.04, 0.1, 0.3)}
BASE_PRESET = "balanced_collapse"  # names point at one class: zero-shot and the text proxy collapse


def _check(values: dict[str, Any]) -> dict[str, Any]:
    """All knob values (``DEFAULTS`` for those not given), checked."""
    unknown = [k for k in values if k not in KNOBS]
    if unknown:
        raise KPLInputError(f"unknown playground knob(s) {unknown}; the knobs are {list(KNOBS)}")
    return {k: check(k, v, KNOBS[k][1]) for k, v in {**DEFAULTS, **values}.items()}


@lru_cache(maxsize=16)
def _world(gap: float | None, imbalance: float, n_images: int, dim: int, seed: int, base: str):
    check("base", base, Options(*PRESETS))
    return make_world(**{**PRESETS[base], "n_images": n_images, "dim": dim, "seed": seed, "gap": gap,
                         "imbalance": None if imbalance == 1.0 else imbalance})


@dataclass
class PlaygroundRun:
    """One simulated world, one method run on it and its scores (memoised: read, do not modify)."""

    params: dict  # the knob values + n_images, dim, seed, base
    world: Any  # kplib.method.simulate.SimulatedWorld
    result: Any  # kplib.method.methods.MethodResult
    scores: dict  # accuracy, balanced_accuracy, macro_f1, text_proxy_accuracy

    @property
    def encoder_label(self) -> str:
        return self.world.text.meta["encoder"]


@lru_cache(maxsize=64)
def _run(knobs: tuple, n_images: int, dim: int, seed: int, base: str) -> PlaygroundRun:
    v = dict(knobs)
    world = _world(v["gap"], v["imbalance"], n_images, dim, seed, base)
    spec = METHODS[v["method"]]  # pass the knobs the method has (CLIP-DN has no K, no temperatures, no seed)
    knobs = {k: x for k, x in {**v, "seed": seed}.items() if k in {f.name for f in fields(spec.config)}
             and (spec.uses is None or k in spec.uses)}
    result = run_method(v["method"], world.image_embeddings, world.text, **knobs)
    scores = analysis.scores(world.labels, result.predictions, world.class_names)
    if result.text is not None:
        scores["text_proxy_accuracy"] = float((result.text.predictions == world.labels).float().mean())
    return PlaygroundRun({**v, "n_images": n_images, "dim": dim, "seed": seed, "base": base}, world, result, scores)


def simulate_and_run(n_images: int = 400, dim: int = 128, seed: int = 0,
                     base: str = BASE_PRESET, **values: Any) -> PlaygroundRun:
    """Simulate the world for the knob ``values`` (others: :data:`DEFAULTS`) and run the method on it (memoised)."""
    return _run(tuple(_check(values).items()), int(n_images), int(dim), int(seed), base)


def _map(ax, run: PlaygroundRun, legend: bool = True) -> None:
    """PCA of images, class-name prompts, text proxies and learned proxies (the gap is a visible axis)."""
    blocks = {"images": run.world.image_embeddings, "class-name prompts": unit(run.world.text.name_embeddings.mean(1))}
    if run.result.text is not None and run.result.method not in ("zero_shot", "inmap"):  # those are name proxies
        blocks["text proxies"] = run.result.text.proxies
    if run.result.proxy_learning is not None:
        blocks["learned proxies"] = run.result.proxy_learning.proxies
    draw_map(ax, project(blocks, "pca").points, run.world.labels.numpy(), run.world.class_names, legend=legend)
    ax.set(xlabel="PCA 1 (images + texts)", ylabel="PCA 2")


def playground_figure(run: PlaygroundRun) -> Figure:
    """Three panels for one run: embedding map, confusion matrix, class shares (true, predicted, transport target)."""
    if not isinstance(run, PlaygroundRun):
        raise KPLInputError("run must be a PlaygroundRun from kplib.book.widgets.simulate_and_run")
    names, c = run.world.class_names, len(run.world.class_names)
    fig = Figure(figsize=(13, 4.4), layout="constrained")
    ax_map, ax_cm, ax_sh = fig.subplots(1, 3, width_ratios=[1.3, 1, 1])
    _map(ax_map, run)
    draw_confusion(ax_cm, confusion_matrix(run.world.labels, run.result.predictions, labels=list(range(c))), names)
    shares = {"true share": run.world.priors.numpy(),
              "predicted share": np.bincount(run.result.predictions.numpy(), minlength=c) / len(run.world.labels)}
    if run.result.class_marginal is not None:
        shares["transport target q"] = run.result.class_marginal.numpy()
    draw_shares(ax_sh, shares, names)
    ax_sh.set_ylim(0, 1)
    for ax, title in zip((ax_map, ax_cm, ax_sh), ("embedding map (colour: true class)", "confusion", "class shares")):
        ax.set_title(title, fontsize=9)
    p, s = run.params, run.scores
    extra = f" · text proxy {s['text_proxy_accuracy']:.2f}" if "text_proxy_accuracy" in s else ""
    return finish(fig, f"{p['method']}: accuracy {s['accuracy']:.2f}, balanced {s['balanced_accuracy']:.2f}{extra}\n"
                       f"gap {p['gap']:.2f} · imbalance {p['imbalance']:g} · K {p['k']} · tau_t {p['tau_t']:g} · "
                       f"tau_i {p['tau_i']:g}", run.encoder_label)


def knob_panel(knob: str, values: Sequence | None = None, methods: Sequence[str] | None = None,
               show_method: str | None = None, n_images: int = 400, dim: int = 128, seed: int = 0,
               base: str = BASE_PRESET) -> tuple[Figure, pd.DataFrame]:
    """The static stand-in for one knob: ``methods`` over a grid of ``knob`` values (others at :data:`DEFAULTS`) as
    maps (of ``show_method``) above the scores; ``knob="method"`` compares the methods ``values``.
    Returns the figure and a tidy table (knob, value, method, scores, encoder)."""
    check("knob", knob, Options(*KNOBS))
    methods = [check("methods[...]", m, Options(*METHODS)) for m in (METHODS if methods is None else methods)]
    values = list(values if values is not None else methods if knob == "method" else KNOB_GRIDS[knob])
    show_method = show_method or DEFAULTS["method"]
    if knob != "method" and show_method not in methods:
        raise KPLInputError(f"show_method {show_method!r} must be one of the methods run: {methods}")
    if not values or not methods:
        raise KPLInputError(f"values and methods for knob {knob!r} must be non-empty")
    rows, shown, size = [], [], {"n_images": n_images, "dim": dim, "seed": seed, "base": base}
    for value in values:
        for method in [value] if knob == "method" else methods:
            run = simulate_and_run(**size, **{knob: value, "method": method})
            rows.append({"knob": knob, "value": value, "method": method, **run.scores, "encoder": run.encoder_label})
            if method == (value if knob == "method" else show_method):
                shown.append((value, run))
    table = pd.DataFrame(rows)
    n = len(values)
    fig = Figure(figsize=(max(10.0, 3.0 * n), 7.2), layout="constrained")
    axes = fig.subplot_mosaic([[f"map{i}" for i in range(n)], ["scores"] * n], height_ratios=[1, 1.1])
    for i, (value, run) in enumerate(shown):
        _map(axes[f"map{i}"], run, legend=(i == n - 1))
        axes[f"map{i}"].set_title(f"{value if knob == 'method' else f'{knob} = {value:g}'}\nacc "
                                  f"{run.scores['accuracy']:.2f}, bal. acc {run.scores['balanced_accuracy']:.2f}",
                                  fontsize=9)
    ax = axes["scores"]
    if knob == "method":
        for j, metric in enumerate(("accuracy", "balanced_accuracy", "macro_f1")):
            ax.bar(np.arange(n) + (j - 1) * 0.27, table[metric], width=0.25, label=metric.replace("_", " "))
    else:
        for j, (method, sub) in enumerate(table.groupby("method", sort=False)):
            ax.plot(range(n), sub["accuracy"], "o-", color=f"C{j}", label=f"{method} accuracy")
            ax.plot(range(n), sub["balanced_accuracy"], "s--", color=f"C{j}", alpha=0.6, lw=1,
                    label=f"{method} balanced acc.")
        ax.set_xlabel(KNOBS[knob][0] + " (grid values; not evenly spaced)")
    ax.set_xticks(range(n), [f"{v:g}" if isinstance(v, float) else str(v) for v in values])
    ax.set(ylim=(0, 1.02), ylabel="score on the simulated world")
    _legend(ax)
    what = "each method" if knob == "method" else show_method
    return finish(fig, f"Knob: {KNOBS[knob][0]} — maps show {what} ({base} world, N = {n_images}, d = {dim}, "
                       f"seed {seed})", shown[0][1].encoder_label), table


class Playground:
    """Controls for :data:`KNOBS`; every change (or ``update(**values)``) redraws :func:`playground_figure` into
    ``output``. ``run``, ``figure``: the last ones; ``history``: every redraw's knobs."""

    def __init__(self, n_images: int = 400, dim: int = 128, seed: int = 0, base: str = BASE_PRESET, **initial: Any):
        self.size = {"n_images": int(n_images), "dim": int(dim), "seed": int(seed), "base": base}
        start = _check(initial)
        # the smallest gap this world can have: its contents alone differ that much
        lo = np.ceil(_world(None, 1.0, *self.size.values()).truth["content_gap"] * 100) / 100
        if start["gap"] < lo:
            raise KPLInputError(f"gap must be at least {lo} for this world (its contents alone differ that much)")
        kw = {"style": {"description_width": "initial"}, "layout": w.Layout(width="330px")}
        log = {"base": 10, "continuous_update": False, **kw}
        self.controls = {
            "gap": w.FloatSlider(min=lo, max=1.4, step=0.02, description="modality gap", continuous_update=False, **kw),
            "imbalance": w.FloatLogSlider(min=0, max=1.7, step=0.05, description="imbalance (max/min)", **log),
            "k": w.IntSlider(min=1, max=50, description="K", continuous_update=False, **kw),
            "tau_t": w.FloatLogSlider(min=-3, max=0, step=0.1, description="tau_t", **log),
            "tau_i": w.FloatLogSlider(min=-2.5, max=0, step=0.1, description="tau_i", **log),
            "method": w.Dropdown(options=list(METHODS), description="method", **kw)}
        self.output, self.run, self.figure, self.history, self._quiet = w.Output(), None, None, [], False
        for name, control in self.controls.items():
            control.value = start[name]
            control.observe(lambda _: None if self._quiet else self.update(), names="value")
        controls = list(self.controls.values())
        self.widget = w.VBox([w.HBox([w.VBox(controls[:3]), w.VBox(controls[3:])]), self.output])
        self.update()

    def values(self) -> dict[str, Any]:
        """The knob values the controls show now."""
        return {name: control.value for name, control in self.controls.items()}

    def update(self, **values: Any) -> Figure:
        """Set the given knobs (the others stay), re-simulate, re-run and redraw; returns the new figure."""
        v = _check({**self.values(), **values})
        self._quiet = True
        try:
            for name, value in values.items():
                self.controls[name].value = value
        finally:
            self._quiet = False
        self.run = simulate_and_run(**self.size, **v)
        self.figure = playground_figure(self.run)
        self.history.append(dict(v))
        # set the Output's content directly: capturing through `with output:` goes through the kernel's iopub
        # routing, which headless executors (nbclient/papermill) intercept
        self.output.outputs = ()
        self.output.append_display_data(self.figure)
        return self.figure

    def _ipython_display_(self) -> None:
        display(self.widget)
