"""kplib.book.widgets: the playground widget recomputes and redraws on every change; the static panels stand in for it."""
from __future__ import annotations

import numpy as np
import pytest

from kplib.errors import KPLInputError

pytest.importorskip("ipywidgets")

from kplib.book import widgets  # noqa: E402

SMALL = {"n_images": 120, "dim": 48}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pixels(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def test_playground_update_changes_figure():
    pg = widgets.Playground(**SMALL)
    assert pg.values() == widgets.DEFAULTS
    first_fig, first_run = pg.figure, pg.run
    assert first_run.params["method"] == "kpl_reference"
    before = _pixels(first_fig)
    new = {"gap": 1.0, "imbalance": 10.0, "k": 2, "tau_t": 0.05, "tau_i": 0.1, "method": "kpl_corrected"}
    fig = pg.update(**new)
    assert fig is pg.figure and fig is not first_fig
    assert {k: pg.values()[k] for k in new} == pytest.approx(new)
    assert pg.run.params["method"] == "kpl_corrected" and pg.run.params["k"] == 2
    # the world really changed: imbalanced priors now, and a different gap
    priors = pg.run.world.priors.numpy()
    assert priors.max() / priors.min() == pytest.approx(10.0, rel=1e-4)
    assert pg.run.world.truth["measured_gap"] == pytest.approx(1.0, abs=1e-3)
    assert "kpl_corrected" in fig.get_suptitle() and "kpl_reference" not in fig.get_suptitle()
    assert len(pg.output.outputs) == 1          # the Output widget shows the new figure only
    after = _pixels(fig)
    assert before.shape != after.shape or not np.array_equal(before, after)


def test_control_change_triggers_the_callback():
    pg = widgets.Playground(**SMALL)
    n = len(pg.history)
    pg.controls["method"].value = "zero_shot"     # what a reader's click does
    assert len(pg.history) == n + 1 and pg.run.params["method"] == "zero_shot"
    assert pg.run.result.proxy_learning is None    # zero-shot learns no proxies: none drawn on the map
    labels = [t.get_text() for t in pg.figure.axes[0].get_legend().get_texts()]
    assert "learned proxies" not in labels and "class-name prompts" in labels
    assert "zero_shot" in pg.figure.get_suptitle()


def test_bad_knobs_are_named():
    with pytest.raises(KPLInputError, match="unknown playground knob"):
        widgets.simulate_and_run(**SMALL, temperature=0.1)
    with pytest.raises(KPLInputError, match="method"):
        widgets.simulate_and_run(**SMALL, method="magic")
    with pytest.raises(KPLInputError, match="imbalance"):
        widgets.simulate_and_run(**SMALL, imbalance=0.5)
    with pytest.raises(KPLInputError, match="k must"):
        widgets.simulate_and_run(**SMALL, k=0)


def test_simulated_scores_in_range_and_labelled():
    run = widgets.simulate_and_run(**SMALL, method="kpl_reference")
    assert 0 <= run.scores["accuracy"] <= 1 and 0 <= run.scores["balanced_accuracy"] <= 1
    assert "SIMULATED" in run.encoder_label
    fig = widgets.playground_figure(run)
    assert "SIMULATED" in fig.get_suptitle()


def test_knob_panel_grid():
    fig, table = widgets.knob_panel("k", values=[1, 8], methods=["zero_shot", "kpl_reference"], **SMALL)
    assert len(table) == 4 and set(table["value"]) == {1, 8}
    assert table["accuracy"].between(0, 1).all()
    # zero-shot does not depend on K; the maps row has one axis per value plus the scores axis
    zs = table[table["method"] == "zero_shot"]["accuracy"].to_numpy()
    assert zs[0] == zs[1]
    assert len(fig.axes) >= 3
    fig2, table2 = widgets.knob_panel("method", values=["zero_shot", "inmap"], **SMALL)
    assert list(table2["method"]) == ["zero_shot", "inmap"]
    with pytest.raises(KPLInputError, match="knob"):
        widgets.knob_panel("colour")
    with pytest.raises(KPLInputError, match="show_method"):
        widgets.knob_panel("k", values=[1], methods=["zero_shot"], show_method="inmap", **SMALL)


def test_every_method_of_the_dropdown_runs():
    """The playground's method dropdown lists every method; each gets only the knobs it has (CLIP-DN takes no K,
    no temperatures and no seed, and raised before), and the knobs it has take effect."""
    for method in widgets.METHODS:
        run = widgets.simulate_and_run(**SMALL, method=method, k=4, tau_t=0.03)
        assert 0 <= run.scores["accuracy"] <= 1, method
        config = run.result.config
        if method.startswith("kpl"):
            assert (config.k, config.tau_t) == (4, 0.03), method
