"""kplib.book.figures: every figure names its encoder, carries the red caption for stand-in/simulated numbers, renders."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from kplib.book import analysis, figures
from kplib.errors import KPLInputError
from kplib.io.encoders import EncoderIdentity
from kplib.method.methods import run_method
from kplib.method.simulate import make_world
from kplib.method.text_proxy import TextProxies

STANDIN = "UNTRAINED stand-in (random CLIP, seed 0) — numbers are meaningless"
SIMULATED = "SIMULATED (not a real encoder)"
REAL = "openai/clip-vit-base-patch16"
NAMES = ["glioma", "meningioma", "notumor"]
N, C, D = 60, 3, 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    y = torch.arange(N) % C
    t = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=-1)
    p0 = torch.softmax(torch.randn(N, C, generator=g) * 3, dim=1)
    descs = [[f"finding {i} of {name}" for i in range(12)] for name in NAMES]
    scores = [torch.rand(12, generator=g) for _ in NAMES]
    tp = TextProxies(proxies=t, logits=x @ t.T, scores=scores, selected=[torch.argsort(-s)[:4] for s in scores])
    world = make_world(n_images=N, n_classes=C, dim=D, n_descriptions=10, seed=0)
    results = {mode: run_method("kpl", world.image_embeddings, world.text, mode=mode, iters_proxy=30, record_every=5)
               for mode in ("reference", "corrected")}
    ranking = analysis.description_ranking(world.image_embeddings, world.text, k=3, labels=world.labels)
    return {"x": x, "y": y, "t": t, "p0": p0, "descs": descs, "tp": tp, "world": world, "results": results,
            "ranking": ranking}


def _make(name: str, d, label):
    """Build figure `name` from the fixture's inputs."""
    w, res = d["world"], d["results"]
    if name == "embedding_map":
        return figures.embedding_map(d["x"], d["y"], NAMES, {"class prompts": d["t"], "descriptions": d["x"][:7]},
                                     method="pca", encoder=label)[0]
    if name == "trajectory":
        proj = figures.project({"images": w.image_embeddings, "text": res["corrected"].text.proxies}, "pca")
        return figures.trajectory(proj, res["reference"], w.image_embeddings, w.labels, encoder=label)
    if name == "gap_bar":
        s = analysis.gap_summary(d["x"], d["t"])
        return figures.gap_bar({"set A": s, "set B": s}, encoder=label)
    if name == "plans":
        return figures.plans({"P0": d["p0"], "after": d["p0"] / N}, d["y"], NAMES, encoder=label)
    if name == "marginals":
        return figures.marginals(d["p0"], {"uniform": torch.full((C,), 1 / C), "em": [0.5, 0.3, 0.2]},
                                 [0.6, 0.3, 0.1], NAMES, encoder=label)
    if name == "sweep":
        df = pd.DataFrame([{"k": k, "method": m, "accuracy": 0.5 + 0.01 * s + 0.001 * k, "seed": s}
                           for k in (1, 3, 10) for m in ("kpl", "text proxy") for s in range(3)])
        return figures.sweep(df, "k", encoder=label, baselines={"majority class": 0.33}, mark=8, logx=True)
    if name == "metrics_bar":
        rows = [{"dataset": ds, "method": m, "accuracy": a, "accuracy_ci": (a - 0.05, a + 0.04)}
                for ds in ("brain", "malaria") for m, a in (("zero_shot", 0.4), ("kpl", 0.6))]
        return figures.metrics_bar(rows, encoder=label, chance={"brain": 0.25, "malaria": 0.5})
    return {
        "gap_hist": lambda: figures.gap_hist(analysis.gap_projection(d["x"], d["t"]), encoder=label),
        "cosines": lambda: figures.cosines(d["x"], d["t"], d["y"], encoder=label),
        "confusion": lambda: figures.confusion(np.array([[5, 1, 0], [2, 6, 1], [0, 0, 9]]), NAMES, encoder=label),
        "similarity": lambda: figures.similarity(analysis.description_similarity(w.text.description_embeddings,
                                                                                 w.class_names), encoder=label),
        "hardening": lambda: figures.hardening(res, encoder=label),
        "proxy_travel": lambda: figures.proxy_travel(res, w.image_embeddings, encoder=label),
        "descent": lambda: figures.descent(res["reference"], encoder=label),
        "description_scores": lambda: figures.description_scores(d["tp"], d["descs"], NAMES, top=6, encoder=label),
        "score_vs_discrimination": lambda: figures.score_vs_discrimination(d["ranking"], encoder=label),
    }[name]()


FIGURES = ["embedding_map", "trajectory", "gap_bar", "gap_hist", "cosines", "confusion", "similarity", "plans",
           "marginals", "hardening", "proxy_travel", "descent", "description_scores", "score_vs_discrimination",
           "sweep", "metrics_bar"]


def _renders(fig: Figure) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # layout and artists are valid
    assert buf.tell() > 5000


@pytest.mark.parametrize("name", FIGURES)
@pytest.mark.parametrize("label, caption", [(STANDIN, figures.STANDIN_CAPTION), (SIMULATED, figures.SIMULATED_CAPTION),
                                            (REAL, "")])
def test_figure_names_encoder_and_captions(name, label, caption, data):
    fig = _make(name, data, label)
    assert isinstance(fig, Figure)
    assert label in fig.get_suptitle()
    assert fig.get_supxlabel() == caption
    if caption:
        assert fig._supxlabel.get_color() == figures.CAPTION_COLOR
    assert fig.axes[0].get_xlabel() or fig.axes[0].get_ylabel()  # axes are labelled
    _renders(fig)


@pytest.mark.parametrize("name", FIGURES)
@pytest.mark.parametrize("bad", ["", "   ", None])
def test_missing_encoder_is_refused(name, bad, data):
    with pytest.raises(KPLInputError, match="encoder"):
        _make(name, data, bad)


def test_encoder_objects_give_their_label(data):
    ident = EncoderIdentity("some/clip", None, True)
    assert figures.label_of(ident) == ident.label and "UNTRAINED" in ident.label
    holder = type("Enc", (), {"identity": ident})()
    fig = figures.confusion(np.eye(3), NAMES, encoder=holder)
    assert ident.label in fig.get_suptitle() and fig.get_supxlabel() == figures.STANDIN_CAPTION


def test_caption_for():
    assert figures.caption_for(STANDIN) == figures.STANDIN_CAPTION
    assert figures.caption_for("a simulated world") == figures.SIMULATED_CAPTION
    assert figures.caption_for(REAL) is None


def test_figures_without_an_encoder_say_so():
    counts = pd.DataFrame({"dataset": ["a", "a", "b"], "class": ["x", "y", "z"], "descriptions": [40, 50, 45]})
    lengths = pd.DataFrame({"dataset": ["a"] * 3 + ["b"], "n_tokens": [12, 20, 80, 30]})
    for fig in (figures.kb_counts_bar(counts, minimum=40), figures.token_lengths(lengths)):
        assert "encoder: none" in fig.get_suptitle() and fig.get_supxlabel() == ""
        _renders(fig)


def test_scaling_reads_the_bench_table():
    bench = pd.DataFrame([{"n": n, "variant": v, "seconds": s * n, "peak_rss_mb": 100.0 + n / 100}
                          for n in (1000, 10000) for v, s in (("baseline", 1e-3), ("corrected", 1e-5))])
    fig = figures.scaling(bench)
    assert "SIMULATED" in fig.get_suptitle() and fig.get_supxlabel() == figures.SIMULATED_CAPTION
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    _renders(fig)


def test_plans_report_row_scale(data):
    fig = figures.plans({"released": data["p0"] / N}, data["y"], NAMES, encoder=REAL)
    assert f"{1 / N:.3g}" in fig.axes[0].get_title()


def test_pca_projection_transform_matches_fit(data):
    fig, proj = figures.embedding_map(data["x"], data["y"], NAMES, {"text": data["t"]}, method="pca", encoder=REAL)
    assert isinstance(proj, figures.Projection)
    assert proj.points["images"].shape == (N, 2) and proj.points["text"].shape == (C, 2)
    np.testing.assert_allclose(proj.transform(data["x"]), proj.points["images"], atol=1e-4)
    # reusing the projection draws in the same coordinates without refitting
    fig2, same = figures.embedding_map(data["x"], data["y"], NAMES, method="pca", encoder=REAL, projection=proj)
    assert same is proj
    np.testing.assert_allclose(fig2.axes[0].collections[0].get_offsets(), proj.points["images"], atol=1e-4)


@pytest.mark.slow
def test_umap_map_is_seeded(data):
    """UMAP (first fit per process compiles numba code: slow) with a fixed seed gives the same map twice."""
    _, a = figures.embedding_map(data["x"], data["y"], NAMES, {"text": data["t"]}, method="umap", seed=3, encoder=REAL)
    _, b = figures.embedding_map(data["x"], data["y"], NAMES, {"text": data["t"]}, method="umap", seed=3, encoder=REAL)
    np.testing.assert_allclose(a.points["images"], b.points["images"], atol=1e-5)
    assert a.transform(data["t"]).shape == (C, 2)


def test_bad_inputs_name_the_parameter(data):
    with pytest.raises(KPLInputError, match="labels"):
        figures.embedding_map(data["x"], data["y"] + 5, NAMES, method="pca", encoder=REAL)
    with pytest.raises(KPLInputError, match="method"):
        figures.embedding_map(data["x"], data["y"], NAMES, method="tsne", encoder=REAL)
    with pytest.raises(KPLInputError, match="cm"):
        figures.confusion(np.eye(2), NAMES, encoder=REAL)
    no_snapshots = run_method("kpl", data["world"].image_embeddings, data["world"].text, iters_proxy=5)
    proj = figures.project({"images": data["world"].image_embeddings}, "pca")
    with pytest.raises(KPLInputError, match="record_every"):
        figures.trajectory(proj, no_snapshots, data["world"].image_embeddings, data["world"].labels, encoder=REAL)
    short = TextProxies(data["t"], data["x"] @ data["t"].T, data["tp"].scores[:2], data["tp"].selected)
    with pytest.raises(KPLInputError, match="one entry per class"):
        figures.description_scores(short, data["descs"], NAMES, encoder=REAL)
    with pytest.raises(KPLInputError, match="column"):
        figures.metrics_bar([{"method": "kpl"}], encoder=REAL)
    with pytest.raises(KPLInputError, match="negative"):
        figures.plans(-data["p0"], data["y"], NAMES, encoder=REAL)
    with pytest.raises(KPLInputError, match="lacks column"):  # a sweep table without the x column
        figures.sweep(pd.DataFrame({"method": ["kpl"], "accuracy": [0.5]}), "k", encoder=REAL)
    with pytest.raises(KPLInputError, match="shares"):
        figures.marginals(data["p0"], [0.5, 0.5], None, NAMES, encoder=REAL)


def test_metrics_bar_without_intervals_and_with_formatted_strings():
    rows = [{"method": "kpl", "accuracy": 0.6, "accuracy_ci": None},
            {"method": "zero_shot", "accuracy": 0.4, "accuracy_ci": None}]
    fig = figures.metrics_bar(rows, encoder=REAL)
    assert "bootstrap" not in fig.axes[0].get_ylabel()
    with pytest.raises(KPLInputError, match="accuracy_ci"):
        figures.metrics_bar([{"method": "kpl", "accuracy": 0.6, "accuracy_ci": "[50.0, 70.0]"}], encoder=REAL)
