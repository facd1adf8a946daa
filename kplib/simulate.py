"""Simulated CLIP-like worlds with known ground truth, for teaching and for testing mechanisms.

Nothing here comes from a real encoder: every world says so (``text.meta["encoder"]``), and numbers computed on it
are illustrations of mechanisms, never results about CLIP or KPL.

Geometry (all vectors in R^d; ``g, m, mu_1..mu_C`` are orthonormal, drawn at random from the seed):

- **Modality gap** (Liang et al., "Mind the Gap", NeurIPS 2022): images and texts live in two cones on opposite
  sides of a gap axis ``g``. Every image is ``x = h g + sqrt(1 - h²) v`` and every text ``t = -h g + sqrt(1 - h²) w``,
  with unit "content" vectors ``v, w ⟂ g``. ``h`` is solved so that the difference of the two modality means
  (over all images and all texts of the world: name prompts and descriptions) has exactly the requested norm
  ``gap``. Approximate published figures that motivate the defaults (Liang et al. 2022 and common CLIP
  experience; stated from memory, treat them as rough): the distance between the image and text mean embeddings
  of CLIP ViT-B/32 on MSCOCO is about 0.82; a matching image–caption pair typically has cosine around 0.3;
  cosines between unrelated images of one dataset are much higher (roughly 0.5 and above — the "cone effect"; we
  are not sure of a precise published value, and for a single medical dataset it is likely higher still).
  :func:`describe_world` measures these quantities on a world so the book can show them next to the targets.
- **Images**: content ``v_i = normalise(image_coherence · m + s · mu_{y_i} + z_i)`` with a shared "domain"
  direction ``m`` (all images are e.g. chest X-rays), the class direction scaled by
  ``s = class_separation / sqrt(d)`` and isotropic noise ``z_i ~ N(0, I/d)`` (norm ≈ 1). So ``class_separation``
  is the distance of each class mean from the domain centre in units of the within-class standard deviation per
  coordinate — a dimension-free difficulty knob (≈3: easy; ≈1: hard).
- **Class-name prompts** (zero-shot): ``w = normalise(text_coherence · m + a · mu_c + (1 - a) · e_c + noise)``
  with ``a = name_alignment``. ``e_c`` is what the name means to the encoder instead of the class:
  ``name_confusion="attractor"`` (default): the ``attractor`` class's name points to the domain direction ``m`` —
  it sounds like *every* image of the dataset — and the other names to unrelated directions, so with small ``a``
  zero-shot predicts the attractor for almost every image, the collapse CLIP shows on medical names;
  ``"generic"``: every name points to ``m`` (no class information, no bias); ``"permuted"``: name c points to the
  mean of class c+1 (systematically wrong names).
- **Descriptions** (KPL prompt "a photo of a {class}, which has {description}"): each prompt embedding contains its
  class-name content (weight ``name_weight_in_prompt``), the domain, and either a class-relevant part
  ``r · mu_c + sqrt(1 - r²) · u`` (u an unrelated unit direction) with a relevance strength
  ``r ~ U(0.2, 1) · relevance_strength`` (``relevant_fraction`` of the descriptions), or the unrelated direction
  alone (irrelevant: a feature the images do not show). Feature parts thus have equal norm, so a stronger
  relevance means a higher mean image similarity. Texts are readable
  placeholders such as ``"relevant feature 3 of class_1 (strength 0.72)"``; ``truth`` records which are relevant.
- **Priors**: balanced, an explicit sequence, or ``imbalance = max/min`` with geometric decay over class index.
  Class counts are exact (largest-remainder rounding of ``n_images · priors``), image order is shuffled.

Scale note: the attractor's bias in a text score does not depend on ``dim`` while the class signal shrinks like
``1/sqrt(dim)`` (so does the noise), so the same ``name_alignment`` collapses more strongly at larger ``dim``; the
presets are tuned for the default ``dim=512`` (CLIP ViT-B's width; ViT-L/14 uses 768).

All randomness comes from one ``torch.Generator`` seeded with ``seed``; ``params`` records every argument.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import KPLInputError
from .methods import TextEmbeddings

__all__ = [
    "SIMULATED_ENCODER",
    "SimulatedWorld",
    "make_world",
    "PRESETS",
    "preset",
    "modality_gap",
    "text_rows",
    "describe_world",
    "class_priors",
]

SIMULATED_ENCODER = "SIMULATED (not a real encoder)"
NAME_CONFUSIONS = ("attractor", "generic", "permuted")
KPL_PROMPT = "a photo of a {class_name}, which has {description}"


@dataclass
class SimulatedWorld:
    """A simulated dataset: image embeddings with labels, the text side, and the ground truth that made them."""

    image_embeddings: Tensor  # (N, d) unit rows
    labels: Tensor  # (N,) int64
    text: TextEmbeddings  # names (C, T, d) + descriptions, meta["encoder"] = SIMULATED_ENCODER
    class_names: list[str]
    priors: Tensor  # (C,) class priors used (counts are exact roundings of N * priors)
    gap_vector: Tensor  # (d,) mean(images) - mean(all texts), norm = params["gap"]
    params: dict  # every argument of make_world
    # truth: gap_axis, domain_direction, class_directions (the true class directions mu_c), class_means (empirical,
    # normalised in-sample means of the images: an optimistic oracle), description_relevant / _strength per class,
    # attractor, h, content_gap, measured_gap, counts
    truth: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- helpers
def _num(value: Any, name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KPLInputError(f"{name} must be a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise KPLInputError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")
    return float(value)


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KPLInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def class_priors(n_classes: int, priors: Any = None, imbalance: float | None = None) -> Tensor:
    """Class priors (float64, sum 1): balanced, an explicit sequence, or geometric decay with ratio ``imbalance``.

    ``imbalance = r`` gives ``p_c ∝ r^(-c/(C-1))`` so class 0 is the most and class C-1 the least frequent,
    ``p_0 / p_{C-1} = r``.
    """
    n_classes = _int(n_classes, "n_classes", 2)
    is_sequence = priors is not None and not (isinstance(priors, str) and priors == "balanced")
    if imbalance is not None:
        if is_sequence:
            raise KPLInputError("give either priors (a sequence) or imbalance (a max/min ratio), not both")
        r = _num(imbalance, "imbalance", 1.0, 1e6)
        return torch.softmax(-math.log(r) * torch.arange(n_classes, dtype=torch.float64) / (n_classes - 1), 0)
    if not is_sequence:
        if isinstance(priors, str) or priors is None:
            return torch.full((n_classes,), 1.0 / n_classes, dtype=torch.float64)
    if isinstance(priors, str):
        raise KPLInputError(f"priors must be None, 'balanced' or a sequence of {n_classes} weights, got {priors!r}")
    p = torch.as_tensor(priors, dtype=torch.float64).flatten()
    if p.numel() != n_classes:
        raise KPLInputError(f"priors has {p.numel()} entries but n_classes = {n_classes}; give one weight per class")
    if not torch.isfinite(p).all() or (p <= 0).any():
        raise KPLInputError("priors must be positive finite weights (every class needs images)")
    return p / p.sum()


def _exact_counts(n: int, p: Tensor) -> Tensor:
    """Largest-remainder rounding of n * p (sums to n; each count within 1 of n p_c)."""
    raw = n * p
    counts = torch.floor(raw).long()
    rest = n - int(counts.sum())
    if rest > 0:
        order = torch.sort(raw - counts, descending=True, stable=True).indices
        counts[order[:rest]] += 1
    return counts


def modality_gap(image_embeddings: Tensor, text_embeddings: Tensor) -> tuple[Tensor, float]:
    """Gap vector ``mean(images) - mean(texts)`` and its norm (Liang et al. 2022's ||Δ_gap||).

    Both inputs are (n, d) rows (normalise them first, as CLIP embeddings are).
    """
    for name, t in (("image_embeddings", image_embeddings), ("text_embeddings", text_embeddings)):
        if not isinstance(t, Tensor) or t.ndim != 2 or t.shape[0] == 0:
            raise KPLInputError(f"{name} must be a non-empty (n, d) tensor, got {getattr(t, 'shape', type(t))}")
    if image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise KPLInputError(
            f"image_embeddings have d={image_embeddings.shape[1]} but text_embeddings d={text_embeddings.shape[1]}"
        )
    gap = image_embeddings.mean(0) - text_embeddings.mean(0)
    return gap, float(gap.norm())


def text_rows(text: TextEmbeddings) -> Tensor:
    """All text embeddings of a world as rows: the (C·T) name prompts, then every description."""
    names = text.name_embeddings.reshape(-1, text.name_embeddings.shape[-1])
    return torch.cat([names, *text.description_embeddings], dim=0)


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ make_world
def make_world(
    n_images: int = 1000,
    n_classes: int = 4,
    dim: int = 512,
    priors: Any = None,
    imbalance: float | None = None,
    gap: float | None = 0.82,
    class_separation: float = 3.0,
    image_coherence: float = 0.8,
    text_coherence: float = 1.0,
    name_alignment: float = 0.8,
    name_confusion: str = "attractor",
    attractor: int = 0,
    name_noise: float = 0.3,
    n_templates: int = 1,
    n_descriptions: int | Sequence[int] = 50,
    relevant_fraction: float = 0.5,
    relevance_strength: float = 1.0,
    name_weight_in_prompt: float = 1.0,
    description_noise: float = 0.5,
    seed: int = 0,
) -> SimulatedWorld:
    """Build a :class:`SimulatedWorld` (see the module docstring for the geometry each knob controls).

    ``gap=None`` puts no modality offset (h = 0); otherwise ``gap`` must be reachable: at least the gap the
    contents alone produce (the error says the smallest reachable value) and below 2.
    """
    params = dict(
        n_images=n_images, n_classes=n_classes, dim=dim,
        priors=(priors.tolist() if hasattr(priors, "tolist") else
                list(priors) if priors is not None and not isinstance(priors, str) else priors),
        imbalance=imbalance, gap=gap, class_separation=class_separation, image_coherence=image_coherence,
        text_coherence=text_coherence, name_alignment=name_alignment, name_confusion=name_confusion,
        attractor=attractor, name_noise=name_noise, n_templates=n_templates,
        n_descriptions=(list(n_descriptions) if not isinstance(n_descriptions, int) else n_descriptions),
        relevant_fraction=relevant_fraction, relevance_strength=relevance_strength,
        name_weight_in_prompt=name_weight_in_prompt, description_noise=description_noise, seed=seed,
    )
    n = _int(n_images, "n_images", 1)
    c = _int(n_classes, "n_classes", 2)
    d = _int(dim, "dim", c + 3)
    if n < c:
        raise KPLInputError(f"n_images ({n}) must be at least n_classes ({c}) so every class has an image")
    p = class_priors(c, priors, imbalance)
    sep = _num(class_separation, "class_separation", 0.0, 1e3)
    coh_i = _num(image_coherence, "image_coherence", 0.0, 1e3)
    coh_t = _num(text_coherence, "text_coherence", 0.0, 1e3)
    a = _num(name_alignment, "name_alignment", 0.0, 1.0)
    if name_confusion not in NAME_CONFUSIONS:
        raise KPLInputError(f"name_confusion must be one of {list(NAME_CONFUSIONS)}, got {name_confusion!r}")
    att = _int(attractor, "attractor", 0)
    if att >= c:
        raise KPLInputError(f"attractor must be a class index in [0, {c}), got {att}")
    sig_n = _num(name_noise, "name_noise", 0.0, 1e3)
    n_t = _int(n_templates, "n_templates", 1)
    m_per_class = [n_descriptions] * c if isinstance(n_descriptions, int) else list(n_descriptions)
    if len(m_per_class) != c:
        raise KPLInputError(f"n_descriptions has {len(m_per_class)} entries but n_classes = {c}")
    m_per_class = [_int(m, "n_descriptions", 1) for m in m_per_class]
    frac = _num(relevant_fraction, "relevant_fraction", 0.0, 1.0)
    rel = _num(relevance_strength, "relevance_strength", 0.0, 1e3)
    lam = _num(name_weight_in_prompt, "name_weight_in_prompt", 0.0, 1e3)
    sig_d = _num(description_noise, "description_noise", 0.0, 1e3)
    if gap is not None:
        gap = _num(gap, "gap", 0.0, 2.0, hi_open=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise KPLInputError(f"seed must be an integer, got {seed!r}")

    gen = torch.Generator().manual_seed(seed)
    # orthonormal frame: gap axis g, domain m, class directions mu_c
    frame, _ = torch.linalg.qr(_randn(gen, d, c + 2))
    g, m, mu = frame[:, 0], frame[:, 1], frame[:, 2:].T  # mu: (C, d)

    def perp(x: Tensor) -> Tensor:  # remove the gap-axis component (contents live in g's complement)
        return x - (x @ g)[..., None] * g

    def unit_noise(*shape: int) -> Tensor:  # isotropic, norm ≈ 1, orthogonal to g
        return perp(_randn(gen, *shape, d) / math.sqrt(d))

    # ---- images
    counts = _exact_counts(n, p)
    labels = torch.repeat_interleave(torch.arange(c), counts)
    labels = labels[torch.randperm(n, generator=gen)]
    s = sep / math.sqrt(d)
    v = F.normalize(coh_i * m + s * mu[labels] + unit_noise(n), dim=-1)

    # ---- class names: own class (a) vs what the name means instead (1 - a)
    if name_confusion == "attractor":
        other = F.normalize(unit_noise(c), dim=-1)  # unrelated directions the images do not share
        other[att] = m
    elif name_confusion == "generic":
        other = m.expand(c, d).clone()
    else:  # permuted: name c means class c+1
        other = mu.roll(-1, dims=0)
    name_core = coh_t * m + a * mu + (1 - a) * other  # (C, d)
    names = F.normalize(name_core[:, None, :] + sig_n * unit_noise(c, n_t), dim=-1)  # (C, T, d)
    name_mean = F.normalize(name_core, dim=-1)

    # ---- descriptions inside the KPL prompt
    desc_content, desc_texts, relevant_masks, strengths = [], [], [], []
    for k in range(c):
        m_k = m_per_class[k]
        n_rel = int(round(frac * m_k))
        is_rel = torch.zeros(m_k, dtype=torch.bool)
        is_rel[torch.randperm(m_k, generator=gen)[:n_rel]] = True
        r = (0.2 + 0.8 * torch.rand(m_k, generator=gen, dtype=torch.float64)) * rel
        r = torch.where(is_rel, r, torch.zeros_like(r))
        # Each prompt = the class's shared part (name + domain) + a unit-length feature part orthogonal to it
        # (+ noise). Relevant: r·f_k + sqrt(1-r²)·u, with f_k the class direction made orthogonal to the shared
        # part; irrelevant: u alone (u unrelated to the images). The prompt's length before normalisation then
        # does not depend on r, so a stronger relevance always means a higher mean image similarity (an earlier
        # version let the length grow with r, which diluted the domain share and ranked weak features first).
        shared = lam * name_mean[k] + coh_t * m
        q_basis, _ = torch.linalg.qr(torch.stack([m, shared], dim=1))  # (d, 2) orthonormal

        def orth(x: Tensor) -> Tensor:
            return x - (x @ q_basis) @ q_basis.T

        f_k = F.normalize(orth(mu[k]), dim=-1)
        unrelated = orth(unit_noise(m_k))
        unrelated = F.normalize(unrelated - (unrelated @ f_k)[:, None] * f_k, dim=-1)
        r_t = r.to(unrelated.dtype)
        rest = torch.sqrt(torch.clamp(1.0 - r_t * r_t, min=0.0))
        part = torch.where(is_rel[:, None], r_t[:, None] * f_k + rest[:, None] * unrelated, unrelated)
        w = shared + part + sig_d * orth(unit_noise(m_k))
        desc_content.append(F.normalize(w, dim=-1))
        relevant_masks.append(is_rel)
        strengths.append(r.float())
        desc_texts.append([
            f"relevant feature {j} of {{cls}} (strength {r[j]:.2f})" if is_rel[j] else
            f"irrelevant feature {j} of {{cls}} (not visible in the images)"
            for j in range(m_k)
        ])

    # ---- modality gap: solve h so that ||mean(x) - mean(t)|| = gap exactly
    w_all = torch.cat([names.reshape(-1, d), *desc_content], dim=0)
    content_diff = float((v.mean(0) - w_all.mean(0)).norm())
    if gap is None:
        h = 0.0
    else:
        if gap < content_diff - 1e-9:
            raise KPLInputError(
                f"gap={gap} is not reachable: the image and text contents alone already differ by "
                f"{content_diff:.3f}; pass gap >= {content_diff:.3f}, or gap=None for no modality offset"
            )
        h = math.sqrt(max(0.0, (gap**2 - content_diff**2) / (4.0 - content_diff**2)))
    root = math.sqrt(1.0 - h * h)

    def to_image(x: Tensor) -> Tensor:
        return F.normalize(h * g + root * x, dim=-1).float()

    def to_text(x: Tensor) -> Tensor:
        return F.normalize(-h * g + root * x, dim=-1).float()

    width = len(str(c - 1))
    class_names = [f"class_{k:0{width}d}" for k in range(c)]
    images = to_image(v)
    text = TextEmbeddings(
        class_names=class_names,
        name_embeddings=to_text(names),
        description_embeddings=[to_text(x) for x in desc_content],
        descriptions=[[t.format(cls=class_names[k]) for t in desc_texts[k]] for k in range(c)],
        templates=[f"SIMULATED name prompt #{t} for {{}}" for t in range(n_t)],
        meta={"encoder": SIMULATED_ENCODER, "kb": "simulated", "template": KPL_PROMPT, "seed": seed},
    )
    gap_vector, gap_norm = modality_gap(images, text_rows(text))
    truth = {
        "gap_axis": g.float(), "domain_direction": m.float(), "class_directions": mu.float(),
        "class_means": F.normalize(torch.stack([images[labels == k].mean(0) for k in range(c)]), dim=-1),
        "description_relevant": relevant_masks, "description_strength": strengths,
        "attractor": att if name_confusion == "attractor" else None,
        "h": h, "content_gap": content_diff, "measured_gap": gap_norm, "counts": counts,
    }
    return SimulatedWorld(
        image_embeddings=images, labels=labels, text=text, class_names=class_names, priors=p.float(),
        gap_vector=gap_vector, params=params, truth=truth,
    )


# ----------------------------------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # Zero-shot names and text proxies collapse onto class 0 (its name "sounds like" every image); the classes are
    # balanced, so balancing OT removes the per-class bias and proxy learning recovers the classes. An EM-estimated
    # class marginal follows the collapsed pseudo-labels (q -> one-hot on the attractor) and does not help here.
    "balanced_collapse": dict(n_images=800, n_classes=4, name_alignment=0.1, name_confusion="attractor",
                              relevant_fraction=0.5, class_separation=3.0),
    # Names are informative, but the test set is imbalanced (max/min = 10): forcing uniform class mass through OT
    # moves majority-class images into minority classes; an estimated class marginal recovers most of it.
    "imbalanced": dict(n_images=800, n_classes=4, imbalance=10.0, name_alignment=0.8, class_separation=3.0),
    # Well-aligned names, balanced classes, well-separated classes: every method does well.
    "easy": dict(n_images=800, n_classes=4, name_alignment=0.9, class_separation=4.0, relevant_fraction=0.8),
}


def preset(name: str, **overrides: Any) -> SimulatedWorld:
    """A named world used in the book (``PRESETS``); keyword ``overrides`` replace preset arguments (e.g. seed)."""
    if name not in PRESETS:
        raise KPLInputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    world = make_world(**{**PRESETS[name], **overrides})
    world.params["preset"] = name
    return world


def describe_world(world: SimulatedWorld, max_pairs: int = 2000) -> dict[str, float]:
    """Geometry statistics to compare with the approximate CLIP figures in the module docstring.

    ``image_image_cosine``: mean cosine between distinct images (first ``max_pairs`` images);
    ``image_name_cosine_own`` / ``_other``: mean cosine of images with their own / other classes' name prompts;
    ``gap_norm``: ||mean(images) - mean(texts)||.
    """
    x = world.image_embeddings[:max_pairs]
    gram = x @ x.T
    k = x.shape[0]
    ii = float((gram.sum() - gram.diagonal().sum()) / max(k * (k - 1), 1))
    names = world.text.name_embeddings.mean(1)
    names = F.normalize(names, dim=-1)
    sims = world.image_embeddings @ names.T
    own = sims.gather(1, world.labels[:, None]).squeeze(1)
    c = names.shape[0]
    other = (sims.sum(1) - own) / (c - 1)
    _, gap_norm = modality_gap(world.image_embeddings, text_rows(world.text))
    return {
        "image_image_cosine": ii,
        "image_name_cosine_own": float(own.mean()),
        "image_name_cosine_other": float(other.mean()),
        "gap_norm": gap_norm,
    }
