"""Tests of kplib.method.simulate: shapes, norms, seeds, priors, modality gap, the knobs' effects, the generative
model's equations and the knowledge controls."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from kplib.errors import KPLInputError
from kplib.method.methods import TextEmbeddings
from kplib.method.simulate import (
    PRESETS,
    SIMULATED_ENCODER,
    SimulatedWorld,
    WorldConfig,
    class_priors,
    describe_world,
    make_world,
    modality_gap,
    preset,
    text_rows,
)
from kplib.method.text_proxy import build_text_proxies

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(n_images=300, n_classes=3, dim=64, n_descriptions=12)
CONTROLS = ("random_words", "shuffled", "name_only", "generic")


def _zero_shot_accuracy(world: SimulatedWorld) -> float:
    names = F.normalize(world.text.name_embeddings.mean(1), dim=-1)
    pred = (world.image_embeddings @ names.T).argmax(1)
    return (pred == world.labels).float().mean().item()


def test_shapes_types_and_text_side():
    w = make_world(n_images=200, n_classes=5, dim=96, n_templates=3, n_descriptions=[4, 5, 6, 7, 8], seed=1)
    assert w.image_embeddings.shape == (200, 96) and w.image_embeddings.dtype == torch.float32
    assert w.labels.shape == (200,) and w.labels.dtype == torch.int64
    assert set(w.labels.tolist()) == set(range(5))
    assert isinstance(w.text, TextEmbeddings)
    assert w.text.name_embeddings.shape == (5, 3, 96)
    assert [d.shape for d in w.text.description_embeddings] == [(m, 96) for m in (4, 5, 6, 7, 8)]
    assert [len(t) for t in w.text.descriptions] == [4, 5, 6, 7, 8]
    assert w.class_names == w.text.class_names == ["class_0", "class_1", "class_2", "class_3", "class_4"]
    assert w.text.meta["encoder"] == SIMULATED_ENCODER
    assert w.priors.shape == (5,) and w.gap_vector.shape == (96,)
    assert all("class_2" in t for t in w.text.descriptions[2])


def test_controls_keep_per_class_counts():
    w = make_world(n_images=200, n_classes=5, dim=96, n_descriptions=[4, 5, 6, 7, 8], seed=1)
    assert set(w.text.controls) == set(CONTROLS)
    for name in ("random_words", "shuffled", "generic"):
        assert [t.shape for t in w.text.controls[name]] == [(m, 96) for m in (4, 5, 6, 7, 8)], name
        assert all(t.dtype == torch.float32 for t in w.text.controls[name])
    assert [t.shape for t in w.text.controls["name_only"]] == [(1, 96)] * 5  # one prompt per class


def test_class_names_sort_like_folders():
    w = make_world(n_images=40, n_classes=12, dim=32, n_descriptions=2)
    assert w.class_names == sorted(w.class_names) and w.class_names[0] == "class_00"


@pytest.mark.parametrize("size", [dict(SMALL, n_templates=2), dict(n_images=20, n_classes=3, dim=9, n_descriptions=4)])
@pytest.mark.parametrize("confusion", ["attractor", "generic"])
def test_unit_norms(size, confusion):  # dim = 2C + 3 is the smallest room for every part
    w = make_world(**size, name_confusion=confusion)
    controls = [t for ts in w.text.controls.values() for t in ts]
    for t in (w.image_embeddings, w.text.name_embeddings, *w.text.description_embeddings, *controls):
        assert torch.allclose(t.norm(dim=-1), torch.ones(()), atol=1e-5)


def test_reproducible_by_seed_and_seeds_differ():
    a, b, c = make_world(**SMALL, seed=3), make_world(**SMALL, seed=3), make_world(**SMALL, seed=4)
    assert torch.equal(a.image_embeddings, b.image_embeddings) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.text.name_embeddings, b.text.name_embeddings)
    assert all(torch.equal(x, y) for x, y in zip(a.text.description_embeddings, b.text.description_embeddings))
    assert a.text.descriptions == b.text.descriptions
    for name in CONTROLS:
        assert all(torch.equal(x, y) for x, y in zip(a.text.controls[name], b.text.controls[name])), name
    assert all(torch.equal(x, y) for x, y in zip(a.truth["shuffled_source"], b.truth["shuffled_source"]))
    assert not torch.equal(a.image_embeddings, c.image_embeddings)
    assert not torch.equal(a.text.name_embeddings, c.text.name_embeddings)
    assert not torch.equal(a.text.controls["random_words"][0], c.text.controls["random_words"][0])


def test_params_record_every_setting():
    w = make_world(**SMALL, imbalance=3.0, seed=9)
    assert {f.name for f in dataclasses.fields(WorldConfig)} <= set(w.params)
    assert w.params["seed"] == 9 and w.params["imbalance"] == 3.0
    assert make_world(WorldConfig(**SMALL, seed=9), imbalance=3.0).params == w.params
    assert preset("easy", seed=2).params["preset"] == "easy"


@pytest.mark.parametrize("n", [400, 401, 997])
def test_balanced_counts_exact(n):
    w = make_world(n_images=n, n_classes=4, dim=32, n_descriptions=3)
    counts = torch.bincount(w.labels, minlength=4).double()
    assert (counts - n / 4).abs().max() < 1.0  # largest-remainder rounding: within 1 image of N * p


def test_imbalance_priors_and_counts():
    w = make_world(n_images=1000, n_classes=4, dim=32, imbalance=10.0, n_descriptions=3)
    p = w.priors.double()
    assert p[0] / p[-1] == pytest.approx(10.0, rel=1e-5)
    assert torch.all(p[:-1] > p[1:])  # geometric decay over class index
    assert p.sum() == pytest.approx(1.0)
    counts = torch.bincount(w.labels, minlength=4).double()
    assert (counts - 1000 * p).abs().max() < 1.0


def test_explicit_priors_normalised():
    p = class_priors(3, [2, 1, 1])
    assert torch.allclose(p, torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    assert torch.allclose(class_priors(3, "balanced"), torch.full((3,), 1 / 3, dtype=torch.float64))
    w = make_world(**SMALL, priors=torch.tensor([2.0, 1.0, 1.0]))
    assert torch.allclose(w.priors, torch.tensor([0.5, 0.25, 0.25])) and w.params["priors"] == (2.0, 1.0, 1.0)


@pytest.mark.parametrize("gap", [0.6, 0.82, 1.3])
def test_measured_gap_matches_request(gap):
    w = make_world(**SMALL, gap=gap)
    vec, norm = modality_gap(w.image_embeddings, text_rows(w.text))
    assert norm == pytest.approx(gap, abs=1e-4)
    assert torch.allclose(vec, w.gap_vector)
    # images and texts (controls too) sit on opposite sides of the gap axis
    axis = w.truth["gap_axis"]
    controls = torch.cat([t for ts in w.text.controls.values() for t in ts])
    assert (w.image_embeddings @ axis).min() > 0 > max((text_rows(w.text) @ axis).max(), (controls @ axis).max())


def test_gap_none_and_unreachable_gap():
    w = make_world(**SMALL, gap=None)
    assert w.truth["h"] == 0.0
    assert w.truth["measured_gap"] == pytest.approx(w.truth["content_gap"], abs=1e-4)
    with pytest.raises(KPLInputError, match="not reachable"):
        make_world(**SMALL, gap=0.01)
    with pytest.raises(KPLInputError, match="gap"):
        make_world(**SMALL, gap=2.0)


def test_default_geometry_near_published_clip_figures():
    stats = describe_world(make_world(n_images=500, seed=0))
    # targets from the module docstring (approximate published figures): gap 0.82, image-image ~0.5, paired ~0.3
    assert stats["gap_norm"] == pytest.approx(0.82, abs=1e-4)
    assert 0.4 < stats["image_image_cosine"] < 0.6  # measured 0.48
    assert 0.2 < stats["image_name_cosine_own"] < 0.4  # measured 0.30
    assert stats["image_name_cosine_own"] > stats["image_name_cosine_other"]


def test_name_alignment_monotone_on_zero_shot():
    # measured zero-shot accuracy (400 images, d=128), a = 0, .4, .6, .8, 1:
    # seed 0: .25 .37 .69 .87 .93; seed 1: .25 .39 .76 .92 .97; seed 2: .25 .39 .74 .90 .95
    alphas = [0.0, 0.4, 0.6, 0.8, 1.0]
    for seed in (0, 1, 2):
        acc = [_zero_shot_accuracy(make_world(n_images=400, dim=128, n_descriptions=5, name_alignment=a, seed=seed))
               for a in alphas]
        assert all(y > x + 0.02 for x, y in zip(acc, acc[1:])), acc
        assert acc[0] < 0.3 and acc[-1] > 0.85, acc


def test_attractor_collapse_and_permuted_names():
    w = make_world(n_images=600, name_alignment=0.0, attractor=2, seed=0)
    names = F.normalize(w.text.name_embeddings.mean(1), dim=-1)
    pred = (w.image_embeddings @ names.T).argmax(1)
    assert (pred == 2).float().mean() > 0.95  # measured 1.00
    # permuted names point to the next class: zero-shot is far below chance (measured 0.02)
    assert _zero_shot_accuracy(make_world(n_images=600, name_alignment=0.0, name_confusion="permuted")) < 0.1
    # unrelated names carry no bias: no class takes most of the images (measured largest share 0.28-0.40)
    w = make_world(n_images=600, name_alignment=0.0, name_confusion="unrelated", seed=0)
    pred = (w.image_embeddings @ F.normalize(w.text.name_embeddings.mean(1), dim=-1).T).argmax(1)
    assert torch.bincount(pred, minlength=4).max() < 0.6 * 600


def test_class_separation_controls_difficulty():
    def oracle(sep):
        w = make_world(n_images=600, class_separation=sep, seed=0)
        pred = (w.image_embeddings @ w.truth["class_directions"].T).argmax(1)  # true class directions
        return (pred == w.labels).float().mean().item()

    # measured (seeds 0/1): separation 1 -> 0.56/0.55, 2 -> 0.84/0.82, 3 -> 0.96/0.95, 4 -> 0.995/0.99
    hard, easy = oracle(1.0), oracle(4.0)
    assert easy > 0.97 and hard < 0.7, (hard, easy)


def test_relevant_descriptions_match_fraction_and_texts():
    w = make_world(**SMALL, relevant_fraction=0.25)
    for c, (mask, texts) in enumerate(zip(w.truth["description_relevant"], w.text.descriptions)):
        assert int(mask.sum()) == round(0.25 * 12)
        for j, t in enumerate(texts):
            assert t.startswith("relevant" if mask[j] else "irrelevant") and w.class_names[c] in t


def test_relevant_descriptions_score_higher_in_stage_one():
    # Relevant descriptions align more with their class direction and get a higher stage-1 score (mean image
    # similarity) than irrelevant ones. Measured over seeds 0-3 x 3 classes: alignment higher in 12/12 cases,
    # stage-1 score in 12/12 (seeds 0-7: 24/24 and 20/24; the class signal in the images is weak, as for CLIP).
    aligned, scored, total = 0, 0, 0
    for seed in range(4):
        w = make_world(**{**SMALL, "seed": seed}, relevant_fraction=0.25)
        scores = build_text_proxies(w.image_embeddings, w.text.description_embeddings, k=3).scores
        for c, mask in enumerate(w.truth["description_relevant"]):
            own = w.text.description_embeddings[c] @ w.truth["class_directions"][c]
            aligned += bool(own[mask].mean() > own[~mask].mean())
            scored += bool(scores[c][mask].mean() > scores[c][~mask].mean())
            total += 1
    assert aligned >= 0.9 * total and scored >= 0.75 * total, (aligned, scored, total)


# ------------------------------------------------------------------------ the generative model, written out again
def _before_gap(w: SimulatedWorld, t: torch.Tensor) -> torch.Tensor:
    """Undo the cone placement t = unit(-h g + sqrt(1 - h^2) x) (x is a unit vector orthogonal to g)."""
    h = w.truth["h"]
    return (t.double() + h * w.truth["gap_axis"].double()) / math.sqrt(1 - h * h)


def _prompt(part: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    return F.normalize(part + content, dim=-1)


@pytest.mark.parametrize("confusion", ["attractor", "unrelated", "permuted"])
def test_prompts_follow_the_documented_equations(confusion):
    w = make_world(**{**SMALL, "n_descriptions": [5, 12, 7]}, name_confusion=confusion, seed=2)
    parts, contents = w.truth["name_parts"], w.truth["description_contents"]
    mu, m = w.truth["class_directions"].double(), w.truth["domain_direction"].double()
    for c in range(3):
        # t_cj = unit(-h g + sqrt(1-h^2) unit(p_c + e_cj)), the content orthogonal to the name part and the domain
        assert torch.allclose(_before_gap(w, w.text.description_embeddings[c]), _prompt(parts[c], contents[c]),
                              atol=1e-5)
        assert (contents[c] @ m).abs().max() < 1e-6
        if not (confusion == "attractor" and c == 0):  # the attractor's name part spans mu_0 (f_0 = mu_0)
            assert (contents[c] @ parts[c]).abs().max() < 1e-6
        # irrelevant contents and every random-words content carry nothing along any class direction
        irrelevant = contents[c][~w.truth["description_relevant"][c]]
        assert (irrelevant @ mu.T).abs().max() < 1e-6
        rw = _before_gap(w, w.text.controls["random_words"][c])
        rw_content = rw - (rw @ F.normalize(parts[c], dim=0))[:, None] * F.normalize(parts[c], dim=0)
        assert (rw_content @ mu.T).abs().max() < 1e-5 and (rw_content.norm(dim=1) > 0.3).all()
        # name only: the name part alone
        assert torch.allclose(_before_gap(w, w.text.controls["name_only"][c]), F.normalize(parts[c], dim=0)[None],
                              atol=1e-5)
        # shuffled: the class's name part with contents of other classes only
        src = w.truth["shuffled_source"][c]
        assert src.shape == (contents[c].shape[0], 2) and (src[:, 0] != c).all()
        assert len({tuple(s) for s in src.tolist()}) == src.shape[0]  # no content twice (the others hold enough)
        moved = torch.stack([contents[k][j] for k, j in src.tolist()])
        assert torch.allclose(_before_gap(w, w.text.controls["shuffled"][c]), _prompt(parts[c], moved), atol=1e-5)
    # generic: the same contents for every class (each class's first M_c), orthogonal to every name part
    generic = [_before_gap(w, t) for t in w.text.controls["generic"]]
    residual = [g - (g @ F.normalize(p, dim=0))[:, None] * F.normalize(p, dim=0) for g, p in zip(generic, parts)]
    residual = [F.normalize(r - (r @ m)[:, None] * m, dim=1) for r in residual]
    assert torch.allclose(residual[0], residual[1][:5], atol=1e-4) and torch.allclose(residual[1][:7], residual[2],
                                                                                      atol=1e-4)


@pytest.mark.parametrize("confusion", ["attractor", "unrelated", "generic"])
def test_prompts_of_a_class_have_one_length_before_normalisation(confusion):
    # without wording noise, ||p_c + e_cj|| is the same for every description of a class, relevant or not (so stage
    # 1 ranks by relevance, not by length), also where f_c = mu_c (attractor class, generic names)
    w = make_world(**SMALL, description_noise=0.0, relevant_fraction=0.5, name_confusion=confusion, seed=1)
    for part, content in zip(w.truth["name_parts"], w.truth["description_contents"]):
        lengths = (part + content).norm(dim=1)
        assert torch.allclose(lengths, torch.full_like(lengths, math.sqrt(part @ part + 1)), atol=1e-9)


def test_relevant_contents_point_to_their_class():
    w = preset("knowledge_informative", n_images=200, dim=128, n_descriptions=10, seed=1)
    mu = w.truth["class_directions"].double()
    for c, (content, rel) in enumerate(zip(w.truth["description_contents"], w.truth["description_relevant"])):
        along = content[rel] @ mu.T  # (relevant, C)
        assert (along.argmax(dim=1) == c).all() and (along[:, c] > 0.15).all()


def test_knowledge_twins_differ_only_in_description_contents():
    a = preset("knowledge_informative", n_images=200, dim=128, n_descriptions=10, seed=4)
    b = preset("knowledge_uninformative", n_images=200, dim=128, n_descriptions=10, seed=4)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.truth["class_directions"], b.truth["class_directions"])
    assert torch.equal(a.truth["name_parts"], b.truth["name_parts"])
    assert torch.allclose(_before_gap(a, a.text.name_embeddings), _before_gap(b, b.text.name_embeddings), atol=1e-5)
    assert all(m.float().mean() == 0.8 for m in a.truth["description_relevant"])
    assert not any(m.any() for m in b.truth["description_relevant"])


def test_presets_build():
    assert set(PRESETS) >= {"balanced_collapse", "imbalanced", "easy", "knowledge_informative",
                            "knowledge_uninformative"}
    w = preset("imbalanced", n_images=200)
    assert w.priors[0] / w.priors[-1] == pytest.approx(10.0, rel=1e-4)
    with pytest.raises(KPLInputError, match="preset must be one of .balanced_collapse.*got .nope."):
        preset("nope")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(priors=[1, 2]), "priors must have 3 entries"),
        (dict(priors=[1, 0, 1]), "positive"),
        (dict(priors=[1, 1, 1], imbalance=2.0), "not both"),
        (dict(imbalance=0.5), "imbalance"),
        (dict(name_alignment=1.5), "name_alignment"),
        (dict(name_confusion="random"), "name_confusion"),
        (dict(attractor=3), "attractor"),
        (dict(n_descriptions=[3, 3]), "n_descriptions"),
        (dict(n_descriptions=2.5), "n_descriptions"),
        (dict(n_descriptions=[3, 0, 3]), "n_descriptions"),
        (dict(n_images=2), "n_images"),
        (dict(dim=5), "dim"),
        (dict(relevant_fraction=-0.1), "relevant_fraction"),
        (dict(seed=1.5), "seed"),
        (dict(n_image=10), "unknown WorldConfig field"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(KPLInputError, match=match):
        make_world(**{**SMALL, **kwargs})


def test_modality_gap_rejects_mismatch():
    with pytest.raises(KPLInputError, match="text_embeddings has 5 columns, expected 4"):
        modality_gap(torch.randn(3, 4), torch.randn(3, 5))
    vec, norm = modality_gap(torch.eye(2)[:1], torch.eye(2)[1:])
    assert norm == pytest.approx(math.sqrt(2)) and torch.allclose(vec, torch.tensor([1.0, -1.0]))
