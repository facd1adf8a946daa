r"""Simulated CLIP-like worlds with known ground truth, for teaching and for testing mechanisms.

Nothing here comes from a real encoder (``text.meta["encoder"]`` says so): numbers computed on a world illustrate
mechanisms, never results about CLIP or KPL. Symbols below are those of the :class:`WorldConfig` field help.

**Frame.** A gap axis :math:`g`, a domain direction :math:`m` (what every image of the dataset shares, e.g. "chest
X-ray") and class directions :math:`\mu_1..\mu_C` are orthonormal in :math:`\mathbb R^d`, drawn from the seed. Noise
vectors :math:`z \sim \mathcal N(0, I/d)` (norm about 1) are projected orthogonally to :math:`g`.

**Images** of class :math:`y_i`: :math:`v_i = \mathrm{unit}\big(\kappa_I\, m + \tfrac{\delta}{\sqrt d}\,\mu_{y_i} +
z_i\big)`; :math:`\delta` is the distance of a class mean from the domain centre in within-class standard deviations
per coordinate (about 3: easy; about 1: hard).

**Class names** (zero-shot prompts, template :math:`\tau`):

.. math::
    \nu_c = \kappa_T\, m + a\,\mu_c + (1-a)\, o_c, \qquad n_{c\tau} = \mathrm{unit}(\nu_c + \sigma_n z_{c\tau}),

where :math:`o_c`, what the name means to the encoder instead of the class, is set by ``name_confusion``:
``"attractor"`` — the name of class ``attractor`` means the domain, :math:`o = m` (it sounds like every image, so weak
names collapse onto it, as CLIP does on medical names), the others unrelated unit directions; ``"unrelated"`` — all
unrelated (weak names, no bias); ``"generic"`` — all :math:`m`; ``"permuted"`` — :math:`o_c = \mu_{c+1}`.

**Description prompts** ("a photo of a {class}, which has {description}") are a class-name part plus a content part:

.. math::
    p_c = \lambda\,\mathrm{unit}(\nu_c) + \kappa_T\, m, \qquad
    e_{cj} = s_{cj}\big(r_{cj}\, f_c + \sqrt{1-r_{cj}^2}\; u_{cj}\big) + \sigma_d\,\varepsilon_{cj}, \qquad
    t_{cj} = \mathrm{unit}(p_c + e_{cj}),

with :math:`f_c` the unit part of :math:`\mu_c` orthogonal to :math:`\mathrm{span}(m, p_c)` (what the images show of
the class and the name does not say already), or :math:`\mu_c` itself where the name part spans it; :math:`u_{cj}` a
unit direction and :math:`\varepsilon_{cj}` noise, both orthogonal to :math:`m`, :math:`p_c` and every :math:`\mu`
(wording that tells nothing about the images). A ``relevant_fraction`` of the descriptions has relevance
:math:`r_{cj}\sim \rho\,U(0.2, 1)`, the others 0 (a feature the images do not show). The scale
:math:`s_{cj} = \sqrt{1 + r_{cj}^2\beta_c^2} - r_{cj}\beta_c`, :math:`\beta_c = \langle p_c, f_c\rangle`, keeps
:math:`\|p_c + e_{cj} - \sigma_d\varepsilon_{cj}\|^2 = \|p_c\|^2 + 1`, so a more relevant description has a higher
mean image similarity (stage 1 ranks it higher). The presets ``knowledge_informative`` / ``knowledge_uninformative``
share images, names and stream; in the second, ``relevant_fraction=0``, the contents carry no class information.

**Knowledge controls** (``text.controls``, the sets of :mod:`kplib.method.controls`, real counts :math:`M_c`):
``random_words`` :math:`\mathrm{unit}(p_c + u'_{cj} + \sigma_d\varepsilon'_{cj})`, fresh unrelated contents;
``shuffled`` :math:`\mathrm{unit}(p_c + e_{c'j'})`, :math:`c' \neq c` (:func:`.controls.shuffled_across_classes`);
``name_only`` one prompt :math:`\mathrm{unit}(p_c)`; ``generic`` :math:`\mathrm{unit}(p_c + \gamma_j)`,
:math:`j \le M_c`, the same contents :math:`\gamma_j = u''_j + \sigma_d\varepsilon''_j` (orthogonal to :math:`m`,
every :math:`\mu` and every :math:`p_c`) for every class.

**Modality gap** (Liang et al., "Mind the Gap", NeurIPS 2022). Every content :math:`x` (unit, :math:`\perp g`) is
placed in its modality's cone, :math:`\mathrm{unit}(\pm h g + \sqrt{1-h^2}\,x)` (+ images, − texts), with :math:`h`
solved so that the mean image and the mean text (name prompts and descriptions) are exactly ``gap`` apart. Rough
published figures behind the defaults (from memory): a gap of about 0.82 for CLIP ViT-B/32 on MSCOCO, matching
image-caption cosines about 0.3, unrelated images of one dataset at 0.5 and above (the "cone effect");
:func:`describe_world` measures these on a world.

**Priors**: balanced, a sequence, or ``imbalance`` :math:`r = p_0/p_{C-1}` (:func:`class_priors`); counts are exact
(largest-remainder rounding of :math:`N p`), image order shuffled. The attractor's bias in a text score does not
shrink with ``dim`` while the class signal does (like :math:`1/\sqrt d`): the presets are tuned for ``dim=512``. All
randomness comes from one ``torch.Generator`` seeded with ``seed`` (the controls are drawn last, so they do not change
the world); ``params`` records every setting.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KPLInputError
from ..params import Interval, Options, check, check_marginal, check_matrix, param, replace, validate
from .controls import shuffled_across_classes
from .methods import TextEmbeddings

__all__ = ["PRESETS", "SIMULATED_ENCODER", "SimulatedWorld", "WorldConfig", "class_priors", "describe_world",
           "make_world", "modality_gap", "preset", "text_rows"]

SIMULATED_ENCODER = "SIMULATED (not a real encoder)"
KPL_PROMPT = "a photo of a {class_name}, which has {description}"
_NONNEG = Interval(float, 0, 1e3)


@dataclass(frozen=True)
class WorldConfig:
    """Every knob of a simulated world (the module docstring gives the equations)."""

    n_images: int = param(1000, Interval(int, 1), "images N")
    n_classes: int = param(4, Interval(int, 2), "classes C")
    dim: int = param(512, Interval(int, 1), "embedding dimension d (at least 2C + 3)")
    priors: Any = field(default=None, metadata={"help": "None / 'balanced', or one positive weight per class"})
    imbalance: float | None = param(None, Interval(float, 1, 1e6), "max/min class share (geometric decay)",
                                    none_ok=True)
    gap: float | None = param(0.82, Interval(float, 0, 2, closed="left"), "modality gap ||mean(x) - mean(t)||",
                              none_ok=True)
    class_separation: float = param(3.0, _NONNEG, "delta: class-mean distance in noise units")
    image_coherence: float = param(0.8, _NONNEG, "kappa_I: weight of the domain in every image")
    text_coherence: float = param(1.0, _NONNEG, "kappa_T: weight of the domain in every text")
    name_alignment: float = param(0.8, Interval(float, 0, 1), "a: how much a class name means its class")
    name_confusion: str = param("attractor", Options("attractor", "unrelated", "generic", "permuted"),
                                "what a name means instead of its class")
    attractor: int = param(0, Interval(int, 0), "class whose name means the domain (name_confusion='attractor')")
    name_noise: float = param(0.3, _NONNEG, "sigma_n: template noise of the name prompts")
    n_templates: int = param(1, Interval(int, 1), "name-prompt templates T")
    n_descriptions: Any = field(default=50, metadata={"help": "descriptions per class M_c: an int or one per class"})
    relevant_fraction: float = param(0.5, Interval(float, 0, 1), "share of descriptions the images show")
    relevance_strength: float = param(1.0, Interval(float, 0, 1), "rho: scale of the relevance r ~ rho U(0.2, 1)")
    name_weight_in_prompt: float = param(1.0, _NONNEG, "lambda: weight of the class name in a description prompt")
    description_noise: float = param(0.5, _NONNEG, "sigma_d: wording noise of a description")
    seed: int = param(0, Interval(int), "seed of the world's random stream")

    def __post_init__(self) -> None:
        validate(self)
        c = self.n_classes
        check("dim", self.dim, Interval(int, 2 * c + 3))  # room for g, m, the mu_c, the names and the contents
        check("n_images (one image per class at least)", self.n_images, Interval(int, c))
        check("attractor (a class index)", self.attractor, Interval(int, 0, c - 1))
        m = [self.n_descriptions] * c if isinstance(self.n_descriptions, int) else self.n_descriptions
        if not hasattr(m, "__len__") or len(m) != c:
            raise KPLInputError(f"n_descriptions must be an integer or {c} integers (one per class), got {m!r}")
        for v in m:
            check("n_descriptions", v, Interval(int, 1))
        priors = self.priors.tolist() if hasattr(self.priors, "tolist") else self.priors
        object.__setattr__(self, "priors", priors if priors is None or isinstance(priors, str) else tuple(priors))
        object.__setattr__(self, "n_descriptions", m[0] if isinstance(self.n_descriptions, int) else tuple(m))
        class_priors(c, self.priors, self.imbalance)  # validates priors / imbalance

    def counts(self) -> list[int]:
        """Descriptions per class, :math:`M_c`."""
        m = self.n_descriptions
        return [m] * self.n_classes if isinstance(m, int) else list(m)


@dataclass
class SimulatedWorld:
    """A simulated dataset: image embeddings with labels, the text side, and the ground truth that made them."""

    image_embeddings: Tensor  # (N, d) unit rows
    labels: Tensor  # (N,) int64
    text: TextEmbeddings  # names (C, T, d), descriptions, controls; meta["encoder"] = SIMULATED_ENCODER
    class_names: list[str]
    priors: Tensor  # (C,) class priors (counts are exact roundings of N * priors)
    gap_vector: Tensor  # (d,) mean(images) - mean(texts), norm = params["gap"]
    params: dict  # every WorldConfig field (+ "preset")
    # gap_axis, domain_direction, class_directions mu, class_means (normalised empirical image means: an optimistic
    # oracle), name_parts p_c and description_contents e_cj (before the gap), description_relevant / _strength,
    # shuffled_source (per class (M_c, 2): source class and index), attractor, h, content_gap, measured_gap, counts
    truth: dict = field(default_factory=dict)


def class_priors(n_classes: int, priors: Any = None, imbalance: float | None = None) -> Tensor:
    """Class priors (float64, sum 1): balanced, a sequence of weights, or ``imbalance`` :math:`r`:
    :math:`p_c \\propto r^{-c/(C-1)}`, class 0 the most, class C-1 the least frequent."""
    check("n_classes", n_classes, Interval(int, 2))
    is_sequence = priors is not None and not isinstance(priors, str)
    if imbalance is not None:
        if is_sequence:
            raise KPLInputError("give either priors (a sequence) or imbalance (a max/min ratio), not both")
        r = check("imbalance", imbalance, Interval(float, 1, 1e6))
        return torch.softmax(-math.log(r) * torch.arange(n_classes, dtype=torch.float64) / (n_classes - 1), 0)
    if not is_sequence:
        if priors not in (None, "balanced"):
            raise KPLInputError(f"priors must be None, 'balanced' or {n_classes} weights, got {priors!r}")
        return torch.full((n_classes,), 1.0 / n_classes, dtype=torch.float64)
    return check_marginal(priors, n_classes, "priors")


def _exact_counts(n: int, p: Tensor) -> Tensor:
    """Largest-remainder rounding of n p (sums to n; each count within 1 of n p_c)."""
    raw = n * p
    counts = torch.floor(raw).long()
    order = torch.sort(raw - counts, descending=True, stable=True).indices
    counts[order[:n - int(counts.sum())]] += 1
    return counts


def modality_gap(image_embeddings: Tensor, text_embeddings: Tensor) -> tuple[Tensor, float]:
    """Gap vector ``mean(images) - mean(texts)`` and its norm (Liang et al. 2022's :math:`\\|\\Delta_{gap}\\|`)."""
    x = check_matrix(image_embeddings, "image_embeddings")
    gap = x.mean(0) - check_matrix(text_embeddings, "text_embeddings", cols=x.shape[1]).mean(0)
    return gap, float(gap.norm())


def text_rows(text: TextEmbeddings) -> Tensor:
    """All text embeddings of a world as rows: the (C·T) name prompts, then every description."""
    return torch.cat([text.name_embeddings.reshape(-1, text.name_embeddings.shape[-1]), *text.description_embeddings])


class _Stream:
    """The world's random stream and frame: gap axis ``g``, domain ``m``, class directions ``mu`` (orthonormal)."""

    def __init__(self, seed: int, d: int, c: int):
        self.gen, self.d = torch.Generator().manual_seed(seed), d
        frame, _ = torch.linalg.qr(self.randn(d, c + 2))
        self.g, self.m, self.mu = frame[:, 0], frame[:, 1], frame[:, 2:].T

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def noise(self, *shape: int) -> Tensor:
        """Isotropic noise of norm about 1, orthogonal to the gap axis."""
        z = self.randn(*shape, self.d) / math.sqrt(self.d)
        return z - (z @ self.g)[..., None] * self.g


def _names(cfg: WorldConfig, s: _Stream) -> tuple[Tensor, Tensor]:
    """Name prompts (C, T, d) and :math:`\\nu_c` (C, d)."""
    c, a = cfg.n_classes, cfg.name_alignment
    if cfg.name_confusion in ("attractor", "unrelated"):
        other = F.normalize(s.noise(c), dim=-1)  # directions the images do not share
        if cfg.name_confusion == "attractor":
            other[cfg.attractor] = s.m
    elif cfg.name_confusion == "generic":
        other = s.m.expand(c, s.d).clone()
    else:  # permuted: name c means class c + 1
        other = s.mu.roll(-1, dims=0)
    nu = cfg.text_coherence * s.m + a * s.mu + (1 - a) * other
    return F.normalize(nu[:, None, :] + cfg.name_noise * s.noise(c, cfg.n_templates), dim=-1), nu


def _orthonormal(*vectors: Tensor) -> Tensor:
    """An orthonormal basis (d, k) of the span of ``vectors`` (Gram-Schmidt; dependent vectors are skipped)."""
    basis: list[Tensor] = []
    for v in vectors:
        for b in basis:
            v = v - (v @ b) * b
        if v.norm() > 1e-6:
            basis.append(v / v.norm())
    return torch.stack(basis, dim=1)


def _unrelated(cfg: WorldConfig, s: _Stream, q: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``n`` unit directions ``u`` and wording noises (times sigma_d), both orthogonal to ``q``'s span."""
    u, eps = s.noise(n), s.noise(n)
    return F.normalize(u - (u @ q) @ q.T, dim=-1), cfg.description_noise * (eps - (eps @ q) @ q.T)


def _descriptions(cfg: WorldConfig, s: _Stream, nu: Tensor) -> dict[str, list[Tensor]]:
    """Per class: name part p_c, contents e_cj, relevance mask and strength (module docstring)."""
    out: dict[str, list] = {k: [] for k in ("name_part", "content", "relevant", "strength")}
    for k, m_k in enumerate(cfg.counts()):
        is_rel = torch.zeros(m_k, dtype=torch.bool)
        is_rel[torch.randperm(m_k, generator=s.gen)[:round(cfg.relevant_fraction * m_k)]] = True
        r = (0.2 + 0.8 * torch.rand(m_k, generator=s.gen, dtype=torch.float64)) * cfg.relevance_strength
        r = torch.where(is_rel, r, torch.zeros_like(r))
        p_k = cfg.name_weight_in_prompt * F.normalize(nu[k], dim=0) + cfg.text_coherence * s.m
        q = _orthonormal(s.m, p_k)
        f_k = s.mu[k] - q @ (q.T @ s.mu[k])  # what the images show of class k beyond the name part
        f_k = f_k / f_k.norm() if f_k.norm() > 1e-6 else s.mu[k]  # the name part spans mu_k: mu_k itself
        u, eps = _unrelated(cfg, s, _orthonormal(s.m, *s.mu, p_k), m_k)
        rest, beta = torch.sqrt(torch.clamp(1.0 - r * r, min=0.0)), p_k @ f_k
        keep = torch.sqrt(1.0 + (r * beta) ** 2) - r * beta  # |p_c + e_cj| the same for every j (1 if beta = 0)
        part = torch.where(is_rel[:, None], keep[:, None] * (r[:, None] * f_k + rest[:, None] * u), u)
        for key, val in zip(out, (p_k, part + eps, is_rel, r.float())):
            out[key].append(val)
    return out


def _controls(cfg: WorldConfig, s: _Stream, desc: dict) -> tuple[dict[str, list[Tensor]], list[Tensor]]:
    """The four knowledge-control description sets (before the gap) and the shuffled contents' sources."""
    parts, contents, counts = desc["name_part"], desc["content"], cfg.counts()
    random_words = [p + sum(_unrelated(cfg, s, _orthonormal(s.m, *s.mu, p), m_k)) for p, m_k in zip(parts, counts)]
    generic = sum(_unrelated(cfg, s, _orthonormal(s.m, *s.mu, *parts), max(counts)))
    sources = shuffled_across_classes([[(c, j) for j in range(m_c)] for c, m_c in enumerate(counts)], cfg.seed)
    sources = [torch.tensor(src, dtype=torch.long) for src in sources]
    shuffled = [p + torch.stack([contents[c][j] for c, j in src.tolist()]) for p, src in zip(parts, sources)]
    sets = {"random_words": random_words, "shuffled": shuffled, "name_only": [p[None] for p in parts],
            "generic": [p + generic[:m_k] for p, m_k in zip(parts, counts)]}
    return {k: [F.normalize(x, dim=-1) for x in v] for k, v in sets.items()}, sources


def _solve_h(gap: float | None, content_gap: float) -> float:
    """The cone offset h that makes ||mean(images) - mean(texts)|| = gap (the image/text means move by ±h g)."""
    if gap is None:
        return 0.0
    if gap < content_gap - 1e-9:
        raise KPLInputError(f"gap={gap} is not reachable: the image and text contents alone already differ by "
                            f"{content_gap:.3f}; pass gap >= {content_gap:.3f}, or gap=None for no modality offset")
    return math.sqrt(max(0.0, (gap**2 - content_gap**2) / (4.0 - content_gap**2)))


def make_world(config: WorldConfig | None = None, **overrides: Any) -> SimulatedWorld:
    """Build a :class:`SimulatedWorld` from ``config`` (default :class:`WorldConfig`) with ``overrides`` applied."""
    cfg = replace(config or WorldConfig(), **overrides)
    c, n, d = cfg.n_classes, cfg.n_images, cfg.dim
    s = _Stream(cfg.seed, d, c)
    p = class_priors(c, cfg.priors, cfg.imbalance)
    counts = _exact_counts(n, p)
    labels = torch.repeat_interleave(torch.arange(c), counts)[torch.randperm(n, generator=s.gen)]
    v = F.normalize(cfg.image_coherence * s.m + cfg.class_separation / math.sqrt(d) * s.mu[labels] + s.noise(n), dim=-1)
    names, nu = _names(cfg, s)
    desc = _descriptions(cfg, s, nu)
    prompts = [F.normalize(pc + e, dim=-1) for pc, e in zip(desc["name_part"], desc["content"])]
    controls, sources = _controls(cfg, s, desc)
    content_gap = float((v.mean(0) - torch.cat([names.reshape(-1, d), *prompts]).mean(0)).norm())
    h = _solve_h(cfg.gap, content_gap)

    def place(x: Tensor, sign: float) -> Tensor:  # into the image (+) or text (-) cone
        return F.normalize(sign * h * s.g + math.sqrt(1.0 - h * h) * x, dim=-1).float()

    class_names = [f"class_{k:0{len(str(c - 1))}d}" for k in range(c)]
    texts = [[f"relevant feature {j} of {class_names[k]} (strength {r:.2f})" if rel else
              f"irrelevant feature {j} of {class_names[k]} (not visible in the images)"
              for j, (rel, r) in enumerate(zip(desc["relevant"][k].tolist(), desc["strength"][k].tolist()))]
             for k in range(c)]
    text = TextEmbeddings(
        class_names=class_names, name_embeddings=place(names, -1.0),
        description_embeddings=[place(t, -1.0) for t in prompts], descriptions=texts,
        templates=[f"SIMULATED name prompt #{t} for {{}}" for t in range(cfg.n_templates)],
        meta={"encoder": SIMULATED_ENCODER, "kb": "simulated", "template": KPL_PROMPT, "seed": cfg.seed},
        controls={k: [place(t, -1.0) for t in v] for k, v in controls.items()})
    images = place(v, 1.0)
    gap_vector, gap_norm = modality_gap(images, text_rows(text))
    truth = {"gap_axis": s.g.float(), "domain_direction": s.m.float(), "class_directions": s.mu.float(),
             "class_means": F.normalize(torch.stack([images[labels == k].mean(0) for k in range(c)]), dim=-1),
             "name_parts": torch.stack(desc["name_part"]), "description_contents": desc["content"],
             "description_relevant": desc["relevant"], "description_strength": desc["strength"],
             "shuffled_source": sources, "attractor": cfg.attractor if cfg.name_confusion == "attractor" else None,
             "h": h, "content_gap": content_gap, "measured_gap": gap_norm, "counts": counts}
    return SimulatedWorld(images, labels, text, class_names, p.float(), gap_vector, dataclasses.asdict(cfg), truth)


PRESETS: dict[str, dict[str, Any]] = {
    # Zero-shot names and text proxies collapse onto class 0 (its name "sounds like" every image); the classes are
    # balanced, so the balancing transport removes the bias and proxy learning recovers the classes.
    "balanced_collapse": dict(n_images=800, n_classes=4, name_alignment=0.1, name_confusion="attractor",
                              relevant_fraction=0.5, class_separation=3.0, name_weight_in_prompt=1.5),
    # Informative names, imbalanced test set (max/min = 10): uniform transport moves majority-class images into
    # minority classes; an estimated class marginal recovers most of it.
    "imbalanced": dict(n_images=800, n_classes=4, imbalance=10.0, name_alignment=0.8, class_separation=3.0),
    # Well-aligned names, balanced and well-separated classes: every method does well.
    "easy": dict(n_images=800, n_classes=4, name_alignment=0.9, class_separation=4.0, relevant_fraction=0.8),
    # Weak, unbiased names; the descriptions carry the class information (or, in the twin, none at all): the
    # knowledge controls must separate these two worlds.
    "knowledge_informative": dict(n_images=800, n_classes=4, name_alignment=0.2, name_confusion="unrelated",
                                  relevant_fraction=0.8, class_separation=3.0),
    "knowledge_uninformative": dict(n_images=800, n_classes=4, name_alignment=0.2, name_confusion="unrelated",
                                    relevant_fraction=0.0, class_separation=3.0),
}


def preset(name: str, **overrides: Any) -> SimulatedWorld:
    """A named world of the book (:data:`PRESETS`); ``overrides`` replace preset settings (e.g. ``seed``)."""
    world = make_world(**{**PRESETS[check("preset", name, Options(*PRESETS))], **overrides})
    world.params["preset"] = name
    return world


def describe_world(world: SimulatedWorld, max_pairs: int = 2000) -> dict[str, float]:
    """Geometry to set beside the rough CLIP figures of the module docstring.

    ``image_image_cosine``: mean cosine between distinct images (the first ``max_pairs``);
    ``image_name_cosine_own`` / ``_other``: mean cosine of images with their own / the other classes' names;
    ``gap_norm``: :math:`\\|\\mathrm{mean(images)} - \\mathrm{mean(texts)}\\|`.
    """
    x = world.image_embeddings[:max_pairs]
    k = x.shape[0]
    gram = x @ x.T
    sims = world.image_embeddings @ F.normalize(world.text.name_embeddings.mean(1), dim=-1).T
    own = sims.gather(1, world.labels[:, None]).squeeze(1)
    return {"image_image_cosine": float((gram.sum() - gram.diagonal().sum()) / max(k * (k - 1), 1)),
            "image_name_cosine_own": float(own.mean()),
            "image_name_cosine_other": float(((sims.sum(1) - own) / (sims.shape[1] - 1)).mean()),
            "gap_norm": modality_gap(world.image_embeddings, text_rows(world.text))[1]}
