"""kplib.book.analysis: the tables the chapters show (KBs, modality gap, stage 1, the two modes, the benchmark file)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from kplib import paths
from kplib.book import analysis as A
from kplib.errors import KPLInputError
from kplib.io.knowledge import Description, KBClass, KnowledgeBase
from kplib.method.methods import KPLConfig, TextEmbeddings, run_method
from kplib.method.simulate import make_world

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _kb(classes: dict[str, list[str]], kb_id: str = "test-kb", method: str = "curated") -> KnowledgeBase:
    return KnowledgeBase(schema_version=1, kb_id=kb_id, dataset="toy", modality="toy", created="2026-01-01",
                         method=method, authors=None, generator=None, source=None,
                         classes=[KBClass(name=n, display_name=n.replace("_", " "),
                                          descriptions=[Description(t) for t in ts], references=["ref"])
                                  for n, ts in classes.items()])


class _WordTokenizer:
    """Stand-in tokenizer: one token per whitespace word, plus BOS and EOS."""

    def __call__(self, texts, add_special_tokens=True, truncation=False):
        return {"input_ids": [[0] + [1] * len(t.split()) + [2] for t in texts]}


def _text(descs, names, class_names, texts=None, templates=None) -> TextEmbeddings:
    return TextEmbeddings(class_names=class_names, name_embeddings=names, description_embeddings=descs,
                          descriptions=texts, templates=templates)


def _world(n_per_class: int = 30, d: int = 16, seed: int = 0):
    """Two well-separated classes; class c's descriptions: 3 aligned with class c, 3 orthogonal noise directions."""
    g = torch.Generator().manual_seed(seed)
    e = torch.eye(d)
    mu = [e[0], e[1]]
    x = torch.cat([F.normalize(mu[c] + 0.3 * torch.randn(n_per_class, d, generator=g), dim=1) for c in (0, 1)])
    y = torch.arange(2).repeat_interleave(n_per_class)
    descs = []
    for c in (0, 1):
        good = F.normalize(mu[c] + 0.2 * torch.randn(3, d, generator=g), dim=1)
        junk = e[2 + 3 * c: 5 + 3 * c]
        descs.append(torch.cat([junk[:1], good, junk[1:]]))  # rows 1..3 are the aligned ones
    names = torch.stack([F.normalize(mu[c] + 0.5 * e[10], dim=0) for c in (0, 1)])[:, None, :]
    texts = [[f"c{c} d{m}" for m in range(6)] for c in (0, 1)]
    return x, y, descs, names, texts


# ------------------------------------------------------------------------------------------------ knowledge bases
def test_kb_counts_rows_and_values():
    kb = _kb({"a": ["red round spot", "a b"], "b_c": ["one"]})
    t = A.kb_counts({"toy": kb})
    assert list(t["class"]) == ["a", "b_c"]
    assert list(t["descriptions"]) == [2, 1]
    assert list(t["display_name"]) == ["a", "b c"]
    assert t.loc[0, "mean_words"] == pytest.approx(2.5)
    with pytest.raises(KPLInputError, match="kbs must map"):
        A.kb_counts({})
    with pytest.raises(KPLInputError, match="KnowledgeBase"):
        A.kb_counts({"x": {"not": "a kb"}})


def test_prompt_token_lengths_uses_template_and_counts_bos_eos():
    kb = _kb({"a": ["one two", "three"]})
    t = A.prompt_token_lengths(kb, _WordTokenizer(), template="{class_name} has {description}")
    assert list(t["n_tokens"]) == [6, 5]  # "a has one two" = 4 words + BOS/EOS
    assert t.loc[0, "prompt"] == "a has one two"
    with pytest.raises(KPLInputError, match="template"):
        A.prompt_token_lengths(kb, _WordTokenizer(), template="{description}")


def test_prompt_token_lengths_takes_an_encoder():
    class Enc:
        def token_lengths(self, texts):
            return [len(t) for t in texts]

    t = A.prompt_token_lengths(_kb({"a": ["xy"]}), Enc(), template="{class_name}{description}")
    assert list(t["n_tokens"]) == [3]


def test_prompt_token_lengths_real_clip_tokenizer():
    folder = paths.tokenizer_dir(required=False)
    if folder is None:
        pytest.skip("no CLIP tokenizer folder in this checkout ($KPL_TOKENIZER_DIR)")
    from transformers import CLIPTokenizer

    t = A.prompt_token_lengths(_kb({"a": ["x " * 80]}), CLIPTokenizer.from_pretrained(str(folder)))
    assert int(t["n_tokens"].iloc[0]) > 77  # a too-long prompt is reported, not truncated


def test_published_import_summary_statuses():
    kb = _kb({"a": ["x y", "z"], "b": ["w"]}, method="imported")
    t = A.published_import_summary([("f.json", kb), ("g.json", "class 'q' has no descriptions")])
    assert list(t["status"]) == ["imported", "rejected"]
    assert t.loc[0, "descriptions"] == 3 and t.loc[0, "per_class"] == pytest.approx(1.5)
    assert "no descriptions" in t.loc[1, "reason"]
    with pytest.raises(KPLInputError, match="rejection reason"):
        A.published_import_summary([("h.json", 3)])


def test_vocabulary_overlap_and_compare():
    a = _kb({"a": ["white cloudy lens", "cloudy pupil"], "b": ["red dots"]}, kb_id="A")
    b = _kb({"a": ["cloudy lens opacity"], "c": ["x"]}, kb_id="B")
    ov = A.vocabulary_overlap(a, b)
    # vocab A: white cloudy lens pupil red dots (6); B: cloudy lens opacity x (4); shared: cloudy, lens
    assert ov["shared_words"] == 2 and ov["jaccard"] == pytest.approx(2 / 8)
    assert ov["shared"][0] == "cloudy"
    assert "opacity" in ov["only_b"]
    cmp = A.compare_kbs(a, b)
    assert list(cmp["class"]) == ["a", "b"]
    assert cmp.loc[0, "vocabulary jaccard"] == pytest.approx(2 / 5)  # {white cloudy lens pupil} vs {cloudy lens opacity}
    assert cmp.loc[0, "descriptions (a)"] == 2 and cmp.loc[0, "descriptions (b)"] == 1
    assert pd.isna(cmp.loc[1, "vocabulary jaccard"])
    with pytest.raises(KPLInputError, match="share a class"):
        A.compare_kbs(a, _kb({"z": ["q"]}, kb_id="Z"))


def test_vocabulary_drops_stop_words():
    assert set(A.vocabulary(["the lens and the pupil"])) == {"lens", "pupil"}


# ------------------------------------------------------------------------------------------------- modality gap
def test_gap_summary_known_geometry():
    x = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    t = torch.tensor([[0.0, 1.0, 0.0]] * 3)
    s = A.gap_summary(x, t)
    assert s["gap_norm"] == pytest.approx(math.sqrt(2))
    assert s["mean_cos_image_image"] == pytest.approx(1.0)
    assert s["mean_cos_text_text"] == pytest.approx(1.0)
    assert s["mean_cos_image_text"] == pytest.approx(0.0)
    with pytest.raises(KPLInputError, match="dimension"):
        A.gap_summary(x, torch.ones(2, 4))


def test_gap_projection_recovers_offset():
    g = torch.Generator().manual_seed(1)
    d = 32
    axis = torch.zeros(d)
    axis[0] = 1.0
    img = F.normalize(torch.randn(200, d, generator=g) * 0.1 + 0.8 * axis, dim=1)
    txt = F.normalize(torch.randn(50, d, generator=g) * 0.1 - 0.8 * axis, dim=1)
    out = A.gap_projection(img, txt)
    assert out["gap_norm"] == pytest.approx(float((img.mean(0) - txt.mean(0)).norm()), rel=1e-6)
    assert abs(float(out["direction"][0])) > 0.95  # the gap points along the offset axis
    assert out["separation"] > 5
    assert out["image_coordinate"].shape == (200,) and out["text_coordinate"].shape == (50,)
    assert A.gap_summary(img, txt)["separation"] == pytest.approx(out["separation"], rel=1e-6)
    with pytest.raises(KPLInputError, match="gap vector is zero"):
        A.gap_projection(img, img)


def test_prediction_shares():
    s = A.prediction_shares(torch.tensor([0, 0, 0, 1]), ["a", "b", "c"])
    assert list(s) == [0.75, 0.25, 0.0]
    with pytest.raises(KPLInputError, match="class indices"):
        A.prediction_shares(torch.tensor([3]), ["a", "b"])


def test_zero_shot_by_template_rows():
    x, y, descs, names, texts = _world()
    names2 = torch.cat([names, names.flip(0)], dim=1)  # second template: names swapped -> accuracy near 0
    text = _text(descs, names2, ["a", "b"], texts, templates=["good {}", "swapped {}"])
    t = A.zero_shot_by_template(x, text, y)
    assert len(t) == 3
    assert t.loc[0, "accuracy"] > 0.9 and t.loc[1, "accuracy"] < 0.1
    assert t["template"].iloc[2].startswith("ensemble")
    assert t["top_class_share"].between(0.5, 1).all()


def test_description_similarity():
    e = torch.eye(4)
    a = torch.stack([e[0], F.normalize(e[0] + e[1], dim=0)])
    b = torch.stack([e[2]])
    s = A.description_similarity([a, b], ["a", "b"])
    assert s.loc["a", "a"] == pytest.approx(2 ** -0.5, abs=1e-6)  # self-pairs excluded
    assert s.loc["a", "b"] == pytest.approx(0.0) and pd.isna(s.loc["b", "b"])
    with pytest.raises(KPLInputError, match="class names"):
        A.description_similarity([a, b], ["a"])


# ------------------------------------------------------------------------------------------------- text proxies
def test_description_ranking_scores_and_discrimination():
    x, y, descs, names, texts = _world()
    text = _text(descs, names, ["a", "b"], texts)
    t = A.description_ranking(x, text, k=3, labels=y)
    assert len(t) == 12
    a = t[t["class"] == "a"]
    assert set(a[a["kept"]]["index"]) == {1, 2, 3}  # the aligned descriptions are retrieved
    assert list(a["rank"]) == list(range(1, 7))
    assert a[a["kept"]]["discrimination"].min() > a[~a["kept"]]["discrimination"].max()
    d0 = descs[0][4]  # a junk description of class a: discrimination = own-class mean cosine - class b's
    want = float(d0 @ x[y == 0].mean(0) - d0 @ x[y == 1].mean(0))
    assert float(a[a["index"] == 4]["discrimination"].iloc[0]) == pytest.approx(want, abs=1e-5)
    expected = float(descs[0][1] @ x.mean(0))
    assert float(a[a["index"] == 1]["score"].iloc[0]) == pytest.approx(expected, abs=1e-5)
    assert "discrimination" not in A.description_ranking(x, text, k=3).columns


def test_k_sweep_and_spread():
    x, y, descs, names, texts = _world()
    text = _text(descs, names, ["a", "b"], texts)
    t = A.k_sweep(x, text, y, ks=[1, 3, 6], methods=("text_proxy", "per_image"), seeds=(0, 1),
                  subsample_fraction=0.5)
    assert len(t) == 3 * 2 * 2 and set(t["n"]) == {30}
    assert t["accuracy"].between(0, 1).all()
    assert (t[(t.method == "text_proxy") & (t.k == 3)]["accuracy"] > 0.9).all()  # aligned descriptions: easy
    s = A.sweep_spread(t, fixed_k=3)
    row = s[s.method == "text_proxy"].iloc[0]
    assert row["spread"] == pytest.approx(row["max accuracy"] - row["min accuracy"])
    assert row["optimism"] >= 0
    assert row["optimism"] == pytest.approx(row["max accuracy"] - row["at K=3 (fixed in advance)"])
    with pytest.raises(KPLInputError, match="methods"):
        A.k_sweep(x, text, y, ks=[1], methods=("nope",))
    with pytest.raises(KPLInputError, match="labels has"):
        A.k_sweep(x, text, y[:3], ks=[1])
    with pytest.raises(KPLInputError, match="subsample_fraction"):
        A.k_sweep(x, text, y, ks=[1], subsample_fraction=0.0)


def test_k_sweep_runs_kpl():
    x, y, descs, names, texts = _world(n_per_class=10)
    text = _text(descs, names, ["a", "b"], texts)
    t = A.k_sweep(x, text, y, ks=[2], methods=("kpl_reference",), iters_proxy=20)
    assert len(t) == 1 and 0 <= t["accuracy"].iloc[0] <= 1


def test_retrieval_agreement():
    x, y, descs, names, texts = _world()
    text = _text(descs, names, ["a", "b"], texts)
    t = A.retrieval_agreement(x, text, k=6)
    assert (t["mean_jaccard"] == 1.0).all() and (t["distinct_sets"] == 1).all()  # K' = M: every set is the same
    t1 = A.retrieval_agreement(x, text, k=1)
    assert (t1["mean_jaccard"] < 1.0).all() and (t1["distinct_sets"] > 1).all()
    assert t1["mean_jaccard"].between(0, 1).all()


def test_retrieval_precision_counts_true_relevant():
    x, y, descs, names, texts = _world()
    text = _text(descs, names, ["a", "b"], texts)
    relevant = [torch.tensor([False, True, True, True, False, False])] * 2
    t = A.retrieval_precision(x, text, relevant, ks=[3, 6])
    k3 = t[t.k == 3]
    assert (k3["precision"] == 1.0).all() and (k3["relevant_kept"] == 3).all()
    k6 = t[t.k == 6]
    assert (k6["precision"] == 0.5).all() and (k6["chance_precision"] == 0.5).all()
    with pytest.raises(KPLInputError, match="relevant\\[0\\] has 2"):
        A.retrieval_precision(x, text, [torch.ones(2)] * 2, ks=[1])


def test_score_vs_truth_sign_follows_strength():
    d = 8
    e = torch.eye(d)
    x = F.normalize(torch.ones(5, d) * 0.1 + e[0], dim=1)  # images all along e0
    strengths = torch.tensor([0.9, 0.5, 0.1, 0.0])
    descs = F.normalize(torch.stack([s * e[0] + (1 - s) * e[1] for s in strengths]), dim=1)
    other = F.normalize(torch.stack([e[3], e[4]]), dim=1)
    text = _text([descs, other], torch.zeros(2, 1, d) + e[2], ["a", "b"])
    t = A.score_vs_truth(x, text, [torch.tensor([True, True, True, False]), torch.tensor([True, False])],
                         [strengths, torch.tensor([1.0, 0.0])])
    assert t.loc[0, "relevant"] == 3
    assert t.loc[0, "spearman_score_strength"] == pytest.approx(1.0)  # closer to the images -> higher score
    assert t.loc[0, "mean_score_relevant"] > t.loc[0, "mean_score_irrelevant"]
    with pytest.raises(KPLInputError, match="one entry per description"):
        A.score_vs_truth(x, text, [torch.tensor([True]), torch.tensor([True, False])], [strengths] * 2)


# --------------------------------------------------------------------------------------- the two modes of KPL
@pytest.fixture(scope="module")
def modes():
    world = make_world(n_images=200, n_classes=3, dim=32, seed=0)
    res = {mode: run_method("kpl", world.image_embeddings, world.text, config=getattr(KPLConfig, mode)(
        iters_proxy=100, no_transport_baseline=True, record_every=20)) for mode in ("reference", "corrected")}
    return world, res


def test_compare_modes_shows_row_scale_hardening_and_pull(modes):
    world, res = modes
    df = A.compare_modes(res, world.image_embeddings, world.labels).set_index("run")
    ref, cor = df.loc["reference"], df.loc["corrected"]
    assert ref["mode"] == "reference" and cor["mode"] == "corrected"
    assert ref["row_sum_times_n"] == pytest.approx(1.0, rel=0.2) and cor["row_sum_mean"] == pytest.approx(1.0)
    assert ref["hardened_rows"] == 0 and ref["max_entry"] < ref["alpha"]  # 1/N rows: hardening never fires
    assert ref["pull_vs_probability_rows"] == pytest.approx(1 / 200, rel=0.2)
    assert cor["pull_vs_probability_rows"] == pytest.approx(1.0)
    assert 0 <= cor["no_transport_accuracy"] <= 1 and 0 <= cor["text_proxy_accuracy"] <= 1
    assert ref["proxy_iterations"] == 100
    with pytest.raises(KPLInputError, match="proxy-learning"):
        A.compare_modes({"zs": run_method("zero_shot", world.image_embeddings, world.text)},
                        world.image_embeddings, world.labels)
    with pytest.raises(KPLInputError, match="labels"):
        A.compare_modes(res, world.image_embeddings[:10], world.labels)


def test_proxy_image_cosines_start_at_the_text_proxies(modes):
    world, res = modes
    steps, cos = A.proxy_image_cosines(res["reference"], world.image_embeddings)
    assert cos.shape == (len(res["reference"].proxy_learning.trajectory), 3)
    assert list(steps[:3]) == [0, 20, 40] and steps[-1] == 100
    mean_image = F.normalize(world.image_embeddings.double().mean(0), dim=0)
    want = F.normalize(res["reference"].text.proxies.double(), dim=1) @ mean_image
    assert torch.allclose(torch.as_tensor(cos[0]), want, atol=1e-6)


# ------------------------------------------------------------------------------------------- benchmark file
def test_read_bench(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KPL_BENCH_OUT", str(tmp_path))
    assert A.bench_file() == tmp_path / "bench_post_encoding.json"
    assert A.read_bench() is None and "make bench" in capsys.readouterr().out  # a missing file: a clear note
    A.bench_file().write_text(json.dumps([{"n": 662, "c": 2, "reference_s": 1.5, "corrected_s": 0.2,
                                           "baseline_s": 3.0, "rss_corrected_mb": 300.0}]))
    df = A.read_bench()
    assert list(df["variant"]) == ["baseline", "reference", "corrected"] and set(df["n"]) == {662}
    assert df.set_index("variant").loc["reference", "seconds"] == 1.5
    assert df.set_index("variant").loc["corrected", "peak_rss_mb"] == 300.0
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(KPLInputError, match="make bench"):
        A.read_bench(bad)
    bad.write_text(json.dumps([{"n": 1}]))
    with pytest.raises(KPLInputError, match="lacks columns"):
        A.read_bench(bad)
