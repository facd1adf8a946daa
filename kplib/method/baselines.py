r"""Training-free baselines from the literature on plain tensors: CLIP-DN and WaffleCLIP.

**CLIP-DN** (Zhou et al., "Test-Time Distribution Normalization for Contrastively Learned Vision-language Models",
NeurIPS 2023). The dot product :math:`x^\top t` is the zeroth-order term of CLIP's InfoNCE objective; its first-order
term brings in the negatives through the two modality means, which DN estimates at test time from unlabelled data:

.. math::
    s_{ic} = \big(x_i - a\,\mu_x\big)^\top \big(t_c - a\,\mu_t\big), \qquad a = \tfrac12 ,

with :math:`\mu_x` the mean of the unlabelled image embeddings and :math:`\mu_t` the text mean. What the paper
leaves open, and what :func:`clip_dn` does: :math:`\mu_x` is the mean of **all** N given images (the paper estimates
it from about 100 random unlabelled samples; pass ``image_mean`` to use another estimate); :math:`\mu_t` is the mean
of the C class text embeddings (the zero-shot classification setting has no caption distribution; pass
``text_mean`` for another); embeddings are taken as unit rows and the centred vectors are **not** re-normalised
(``renormalize=True`` re-normalises both, as the authors' public zero-shot script does after centring; that script
also uses :math:`a = 0.25` on unnormalised encoder outputs — ``fraction`` sets :math:`a`).
For classification, :math:`-a\,x_i^\top\mu_t + a^2\mu_x^\top\mu_t` is the same for every class, so without
re-normalisation the predictions depend on :math:`\mu_x` only: :math:`\arg\max_c (x_i - a\mu_x)^\top t_c`.

**WaffleCLIP** (Roth et al., "Waffling around for Performance: Visual Classification with Random Words and Broad
Concepts", ICCV 2023), inductive: each class is represented by prompts "a photo of a {class}, which has {random
descriptor}" with random word / random character descriptors in place of LLM-generated descriptions, and the scores
are averaged over the prompts. :func:`random_descriptors` draws the descriptors (seeded); the pipeline builds and
encodes the prompts; :func:`waffle_proxies` turns the per-class prompt embeddings :math:`t_{cm}` into proxies
:math:`w_c = \bar t_c / \|\bar t_c\|`, :math:`\bar t_c = \frac1{M_c}\sum_m t_{cm}`, and :func:`waffle_clip` predicts
:math:`\arg\max_c x_i^\top w_c`. With ``normalize=False`` the proxy is :math:`\bar t_c` itself, i.e. exactly the
paper's average of the cosine scores over the prompts.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from string import ascii_lowercase, digits
from typing import Any

import torch
from torch import Tensor

from ..errors import KPLInputError
from ..params import Boolean, Interval, Options, check, check_descriptions, check_embeddings, param, unit, validate

__all__ = ["DESCRIPTOR_KINDS", "BaselineResult", "CLIPDNConfig", "clip_dn", "random_descriptors",
           "waffle_clip", "waffle_proxies"]

DESCRIPTOR_KINDS = ("mixed", "words", "characters")
_CHARACTERS = ascii_lowercase + digits


@dataclass
class BaselineResult:
    """Proxies and logits of a one-shot (no iteration) baseline."""

    method: str
    proxies: Tensor  # (C, d) class vectors the images are scored against
    logits: Tensor  # (N, C)
    meta: dict = field(default_factory=dict)

    @property
    def predictions(self) -> Tensor:
        """``argmax_c logits_ic``."""
        return self.logits.argmax(dim=1)


@dataclass(frozen=True)
class CLIPDNConfig:
    """CLIP-DN's switches (module docstring)."""

    fraction: float = param(0.5, Interval(float, 0.0, 1.0), "a: share of the modality means subtracted (paper: 1/2)")
    renormalize: bool = param(False, Boolean(), "re-normalise the centred image and text vectors to unit length")

    def __post_init__(self) -> None:
        validate(self)


def _mean_vector(value: Any, name: str, dim: int, dtype: torch.dtype) -> Tensor:
    v = torch.as_tensor(value).to(dtype).reshape(-1)
    if v.numel() != dim or not torch.isfinite(v).all():
        raise KPLInputError(f"{name} must be a finite vector of {dim} values (the embedding dimension), got "
                            f"{v.numel()} value(s)")
    return v


def clip_dn(x: Tensor, text_class_embeddings: Tensor, *, fraction: float = 0.5, image_mean: Tensor | None = None,
            text_mean: Tensor | None = None, renormalize: bool = False) -> BaselineResult:
    r"""CLIP-DN zero-shot logits :math:`(x_i - a\mu_x)^\top(t_c - a\mu_t)` (module docstring for every choice).

    Parameters
    ----------
    x : (N, d) image embeddings (unit rows); their mean is :math:`\mu_x` unless ``image_mean`` is given.
    text_class_embeddings : (C, d) one text embedding per class (unit rows); their mean is :math:`\mu_t` unless
        ``text_mean`` is given.
    fraction : :math:`a`, the share of each mean subtracted (1/2 from the paper's first-order derivation).
    renormalize : re-normalise the centred vectors before the dot product.

    Computed as ``X t̃ᵀ - a (μ_x · t̃)`` so the centred (N, d) images are never materialised.
    """
    check("fraction", fraction, Interval(float, 0.0, 1.0))
    x = unit(check_embeddings(x, "image embeddings"))
    t = unit(check_embeddings(text_class_embeddings, "text class embeddings", dim=x.shape[1]).to(x.dtype))
    d = x.shape[1]
    mu_x = x.mean(0) if image_mean is None else _mean_vector(image_mean, "image_mean", d, x.dtype)
    mu_t = t.mean(0) if text_mean is None else _mean_vector(text_mean, "text_mean", d, x.dtype)
    t_c = t - fraction * mu_t
    if renormalize:
        t_c = unit(t_c)
    logits = x @ t_c.T - fraction * (mu_x @ t_c.T)[None, :]
    if renormalize:  # ||x_i - a mu_x||² = ||x_i||² - 2a x_i·mu_x + a²||mu_x||²
        sq = (x * x).sum(1) - 2 * fraction * (x @ mu_x) + fraction**2 * (mu_x @ mu_x)
        logits = logits / sq.clamp_min(torch.finfo(x.dtype).tiny).sqrt()[:, None]
    meta = {"fraction": fraction, "renormalize": renormalize, "image_mean": mu_x, "text_mean": mu_t,
            "image_mean_source": "given" if image_mean is not None else f"mean of {x.shape[0]} images",
            "text_mean_source": "given" if text_mean is not None else f"mean of {t.shape[0]} class embeddings"}
    return BaselineResult("clip_dn", t_c, logits, meta)


def waffle_proxies(prompt_embeddings: Sequence[Tensor] | Tensor, normalize: bool = True) -> Tensor:
    """Class proxies (C, d) from per-class random-descriptor prompt embeddings: each class's mean prompt.

    ``prompt_embeddings`` is a list with one (M_c, d) matrix per class (or a (C, M, d) tensor); rows are taken as
    unit vectors. ``normalize=True`` returns the means scaled to unit length.
    """
    first = prompt_embeddings[0]
    dim = first.shape[-1] if isinstance(first, Tensor) else len(first[0])
    descs = check_descriptions(prompt_embeddings, dim)
    means = torch.stack([unit(d).mean(0) for d in descs])
    return unit(means) if normalize else means


def waffle_clip(x: Tensor, prompt_embeddings: Sequence[Tensor] | Tensor, normalize: bool = True) -> BaselineResult:
    """WaffleCLIP, inductive: score every image against :func:`waffle_proxies`; no use of the other images."""
    proxies = waffle_proxies(prompt_embeddings, normalize=normalize)
    x = unit(check_embeddings(x, "image embeddings", dim=proxies.shape[1]))
    proxies = proxies.to(x.dtype)
    meta = {"normalize": normalize, "prompts_per_class": [len(p) for p in prompt_embeddings]}
    return BaselineResult("waffle", proxies, x @ proxies.T, meta)


def _word(rng: random.Random, length_range: tuple[int, int]) -> str:
    return "".join(rng.choice(ascii_lowercase) for _ in range(rng.randint(*length_range)))


def random_descriptors(n: int, n_words: tuple[int, int] = (2, 5), *, kind: str = "mixed",
                       word_counts: Sequence[int] | None = None, word_length: tuple[int, int] = (3, 10),
                       seed: int = 0) -> list[str]:
    """``n`` random descriptors as WaffleCLIP draws them, reproducible from ``seed`` (Python's ``random.Random``).

    ``kind="words"``: sequences of random lowercase pseudo-words (``word_length`` letters each); ``"characters"``:
    one run of random letters and digits, as many characters as a word descriptor of the same word count;
    ``"mixed"`` (WaffleCLIP's pairs of both kinds): even positions words, odd positions characters.
    The number of words is drawn uniformly from ``n_words`` (inclusive), or given per descriptor by ``word_counts``
    (e.g. the word counts of a knowledge base's real descriptions, to match their length); no word list is needed.
    """
    check("n", n, Interval(int, 1))
    check("kind", kind, Options(*DESCRIPTOR_KINDS))
    check("seed", seed, Interval(int, 0))
    for name, (lo, hi) in (("n_words", n_words), ("word_length", word_length)):
        check(f"{name}[0]", lo, Interval(int, 1))
        check(f"{name}[1]", hi, Interval(int, lo))
    if word_counts is not None:
        word_counts = [check("word_counts entry", w, Interval(int, 1)) for w in word_counts]
        if len(word_counts) != n:
            raise KPLInputError(f"word_counts has {len(word_counts)} entries but n = {n}; give one per descriptor")
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(n):
        words = word_counts[i] if word_counts is not None else rng.randint(*n_words)
        text = " ".join(_word(rng, word_length) for _ in range(words))
        as_chars = kind == "characters" or (kind == "mixed" and i % 2 == 1)
        out.append("".join(rng.choice(_CHARACTERS) for _ in range(len(text))) if as_chars else text)
    return out
