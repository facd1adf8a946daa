"""kplib.viz: every figure names its encoder, carries the red caption for stand-in/simulated numbers, and renders."""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from kplib import viz
from kplib.errors import KPLInputError

STANDIN = "UNTRAINED stand-in (random CLIP, seed 0) — numbers are meaningless"
SIMULATED = "SIMULATED (not a real encoder)"
REAL = "openai/clip-vit-base-patch16"
NAMES = ["glioma", "meningioma", "notumor"]
N, C, D = 60, 3, 16


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    y = torch.arange(N) % C
    t = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=-1)
    p0 = torch.softmax(torch.randn(N, C, generator=g) * 3, dim=1)
    descs = [[f"finding {i} of {name}" for i in range(12)] for name in NAMES]
    scores = [torch.rand(12, generator=g) for _ in NAMES]
    selected = [torch.argsort(-s)[:4] for s in scores]
    return {"x": x, "y": y, "t": t, "p0": p0, "descs": descs, "scores": scores, "selected": selected}


def _pca_projection(data, label):
    fig, proj = viz.embedding_map(data["x"], data["y"], NAMES, {"text": data["t"]}, method="pca", encoder_label=label)
    return proj


def _make(name: str, data, label: str) -> Figure:
    """Build figure `name` from random inputs."""
    if name == "embedding_map":
        fig, _ = viz.embedding_map(
            data["x"], data["y"], NAMES, {"class prompts": data["t"], "descriptions": data["x"][:7]},
            method="pca", encoder_label=label,
        )
        return fig
    if name == "cosine_distributions":
        return viz.cosine_distributions(data["x"], data["t"], data["y"], encoder_label=label)
    if name == "modality_gap_bar":
        s = viz.gap_summary(data["x"], data["t"])
        return viz.modality_gap_bar({"set A": s, "set B": s}, encoder_label=label)
    if name == "confusion_heatmap":
        return viz.confusion_heatmap(np.array([[5, 1, 0], [2, 6, 1], [0, 0, 9]]), NAMES, encoder_label=label)
    if name == "plan_heatmap":
        return viz.plan_heatmap({"P0": data["p0"], "after": data["p0"] / N}, data["y"], NAMES, encoder_label=label)
    if name == "class_marginals":
        return viz.class_marginals(
            data["p0"], {"uniform": torch.full((C,), 1 / C), "em": [0.5, 0.3, 0.2]}, [0.6, 0.3, 0.1], NAMES,
            encoder_label=label,
        )
    if name == "description_scores":
        return viz.description_scores(
            data["scores"], data["selected"], data["descs"], NAMES, top=6, encoder_label=label
        )
    if name == "k_sweep":
        return viz.k_sweep(
            [2, 4, 8], {"kpl": [[0.5, 0.6], 0.55, 0.6], "text proxy": [0.4, 0.41, 0.45]}, encoder_label=label,
            baselines={"majority class": 0.33}, chosen_k=8,
        )
    if name == "proxy_trajectory":
        proj = _pca_projection(data, label)
        traj = [torch.nn.functional.normalize(data["t"] + a * data["x"][:C], dim=-1) for a in (0.0, 0.5, 1.0, 2.0)]
        return viz.proxy_trajectory(proj, traj, data["t"], data["x"], data["y"], NAMES, encoder_label=label)
    if name == "metrics_bar":
        rows = [
            {"dataset": ds, "method": m, "accuracy": a, "accuracy_ci": (a - 0.05, a + 0.04)}
            for ds in ("brain", "malaria") for m, a in (("zero_shot", 0.4), ("kpl", 0.6))
        ]
        return viz.metrics_bar(rows, encoder_label=label)
    if name == "balancing_study":
        df = pd.DataFrame(
            [{"imbalance": r, "method": m, "accuracy": 0.5 + 0.01 * s, "seed": s}
             for r in (1, 3, 10) for m in ("uniform", "em") for s in range(3)]
        )
        return viz.balancing_study(df, encoder_label=label, logx=True)
    raise AssertionError(name)


FIGURES = [
    "embedding_map", "cosine_distributions", "modality_gap_bar", "confusion_heatmap", "plan_heatmap",
    "class_marginals", "description_scores", "k_sweep", "proxy_trajectory", "metrics_bar", "balancing_study",
]


@pytest.mark.parametrize("name", FIGURES)
@pytest.mark.parametrize(
    "label, caption", [(STANDIN, viz.STANDIN_CAPTION), (SIMULATED, viz.SIMULATED_CAPTION), (REAL, "")]
)
def test_figure_names_encoder_and_captions(name, label, caption, data):
    fig = _make(name, data, label)
    assert isinstance(fig, Figure)
    assert label in fig.get_suptitle()
    assert fig.get_supxlabel() == caption
    if caption:
        assert fig._supxlabel.get_color() == viz.CAPTION_COLOR
    assert fig.axes[0].get_xlabel() or fig.axes[0].get_ylabel()   # axes are labelled
    buf = io.BytesIO()
    fig.savefig(buf, format="png")          # renders: layout and artists are valid
    assert buf.tell() > 5000


@pytest.mark.parametrize("name", FIGURES)
@pytest.mark.parametrize("bad", ["", "   ", None])
def test_missing_encoder_label_is_refused(name, bad, data):
    with pytest.raises(KPLInputError, match="encoder_label"):
        _make(name, data, bad)


def test_caption_for():
    assert viz.caption_for(STANDIN) == viz.STANDIN_CAPTION
    assert viz.caption_for("a simulated world") == viz.SIMULATED_CAPTION
    assert viz.caption_for(REAL) is None


def test_gap_summary_known_geometry():
    x = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    t = torch.tensor([[0.0, 1.0, 0.0]] * 3)
    s = viz.gap_summary(x, t)
    assert s["gap_norm"] == pytest.approx(math.sqrt(2))
    assert s["mean_cos_image_image"] == pytest.approx(1.0)
    assert s["mean_cos_text_text"] == pytest.approx(1.0)
    assert s["mean_cos_image_text"] == pytest.approx(0.0)
    with pytest.raises(KPLInputError, match="dimension"):
        viz.gap_summary(x, torch.ones(2, 4))


def test_plan_heatmap_reports_row_scale(data):
    fig = viz.plan_heatmap({"released": data["p0"] / N}, data["y"], NAMES, encoder_label=REAL)
    assert f"{1 / N:.3g}" in fig.axes[0].get_title()


def test_pca_projection_transform_matches_fit(data):
    fig, proj = viz.embedding_map(data["x"], data["y"], NAMES, {"text": data["t"]}, method="pca", encoder_label=REAL)
    assert isinstance(proj, viz.Projection)
    assert proj.points["images"].shape == (N, 2) and proj.points["text"].shape == (C, 2)
    np.testing.assert_allclose(proj.transform(data["x"]), proj.points["images"], atol=1e-4)
    # reusing the projection draws in the same coordinates without refitting
    fig2, same = viz.embedding_map(data["x"], data["y"], NAMES, method="pca", encoder_label=REAL, projection=proj)
    assert same is proj


@pytest.mark.slow
def test_umap_map_is_seeded(data):
    """UMAP (first fit per process compiles numba code: slow) with a fixed seed gives the same map twice."""
    _, a = viz.embedding_map(data["x"], data["y"], NAMES, {"text": data["t"]}, method="umap", seed=3, encoder_label=REAL)
    _, b = viz.embedding_map(data["x"], data["y"], NAMES, {"text": data["t"]}, method="umap", seed=3, encoder_label=REAL)
    np.testing.assert_allclose(a.points["images"], b.points["images"], atol=1e-5)
    assert a.transform(data["t"]).shape == (C, 2)


def test_bad_inputs_name_the_parameter(data):
    with pytest.raises(KPLInputError, match="labels"):
        viz.embedding_map(data["x"], data["y"] + 5, NAMES, method="pca", encoder_label=REAL)
    with pytest.raises(KPLInputError, match="method"):
        viz.embedding_map(data["x"], data["y"], NAMES, method="tsne", encoder_label=REAL)
    with pytest.raises(KPLInputError, match="cm"):
        viz.confusion_heatmap(np.eye(2), NAMES, encoder_label=REAL)
    with pytest.raises(KPLInputError, match="trajectory"):
        viz.proxy_trajectory(_pca_projection(data, REAL), [data["t"]], data["t"], data["x"], data["y"], NAMES,
                             encoder_label=REAL)
    with pytest.raises(KPLInputError, match="one entry per class"):
        viz.description_scores(data["scores"][:2], data["selected"], data["descs"], NAMES, encoder_label=REAL)
    with pytest.raises(KPLInputError, match="column"):
        viz.metrics_bar([{"method": "kpl"}], encoder_label=REAL)
    with pytest.raises(KPLInputError, match="negative"):
        viz.plan_heatmap(-data["p0"], data["y"], NAMES, encoder_label=REAL)
    with pytest.raises(KPLInputError, match="one per K"):
        viz.k_sweep([1, 2], {"kpl": [0.5]}, encoder_label=REAL)


def test_encoder_banner_is_loud_for_standin():
    standin = viz.encoder_banner(STANDIN, dataset="brain_tumor_mri").data
    assert "UNTRAINED" in standin and viz.CAPTION_COLOR in standin and "brain_tumor_mri" in standin
    real = viz.encoder_banner(REAL).data
    assert REAL in real and viz.CAPTION_COLOR not in real
    assert "SIMULATED" in viz.encoder_banner(SIMULATED).data


def test_metrics_bar_without_intervals_and_with_formatted_strings():
    rows = [{"method": "kpl", "accuracy": 0.6, "accuracy_ci": None}, {"method": "zero_shot", "accuracy": 0.4,
                                                                      "accuracy_ci": None}]
    fig = viz.metrics_bar(rows, encoder_label=REAL)
    assert "bootstrap" not in fig.axes[0].get_ylabel()
    with pytest.raises(KPLInputError, match="accuracy_ci"):
        viz.metrics_bar([{"method": "kpl", "accuracy": 0.6, "accuracy_ci": "[50.0, 70.0]"}], encoder_label=REAL)
