r"""Stage 1 of KPL — text proxy optimisation (TPO): pick the descriptions that match the images, average them.

Every description :math:`t_{cm}` of class :math:`c` (the embedding of the prompt "a photo of a {class}, which has
{description}") is scored by its mean cosine similarity with *all* :math:`N` unlabelled images,

.. math::
    s_{cm} = \frac{1}{N}\sum_{i=1}^{N} \langle x_i, t_{cm}\rangle = \langle \bar x, t_{cm}\rangle ,

the top-:math:`K_c` descriptions are averaged, and the average is projected back to the sphere:

.. math::
    w_c = \frac{\sum_{m \in S_c} t_{cm}}{\big\|\sum_{m \in S_c} t_{cm}\big\|}, \qquad
    S_c = \mathrm{top}K_c(s_{c\cdot}) ,
    \qquad L = X W^\top .

The retrieval is dataset-level, as released: every image shares the same selected descriptions.
:func:`per_image_text_logits` is the per-image variant the paper's wording suggests (an extension, never the
reference).

Two modes, because the released code differs from the paper's intent in three places (kpl-method.md, "Released-code
details" 2, 4, 5):

* how many descriptions are kept: the paper's :math:`K_c = \min(K, M_c)` per class (``k_rule="per_class"``), or the
  released running minimum :math:`K_c = \min(K, M_1, \dots, M_c)` in class order (``k_rule="running_min"``), which
  fails in the released code when it leaves classes with top-K sets of unequal size — reproduced as an error;
* normalisation: reference mode normalises the images and the descriptions again inside retrieval, exactly where the
  released code does; corrected mode normalises each once;
* ties at the K boundary: reference mode selects with ``torch.topk`` (the released choice among exactly tied scores),
  corrected mode with a stable sort (ties keep knowledge-base order).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

import torch
from torch import Tensor

from ..errors import KPLInputError, fix
from ..params import K_RULES, MODES, Interval, check, check_descriptions, check_embeddings, unit

__all__ = ["TextProxies", "kept_per_class", "build_text_proxies", "per_image_text_logits"]


@dataclass
class TextProxies:
    """The result of stage 1: one text proxy per class and how it was chosen."""

    proxies: Tensor  # (C, d) unit rows w_c
    logits: Tensor  # (N, C) text logits L = X W^T
    scores: list[Tensor]  # per class (M_c,) mean image-description similarity s_cm
    selected: list[Tensor]  # per class, indices (K_c,) of the kept descriptions, best first

    @property
    def predictions(self) -> Tensor:
        """``argmax_c L_ic``: the text-proxy prediction ("accuracy with text proxy" of the released code)."""
        return self.logits.argmax(dim=1)


def kept_per_class(k: int, sizes: Sequence[int], rule: str, class_names: Sequence[str] | None = None) -> list[int]:
    """How many descriptions each class keeps: ``"per_class"`` min(K, M_c), ``"running_min"`` min(K, M_1..M_c).

    Under the running minimum, a class that lowers K after an earlier class kept more makes the released code fail
    (its per-class top-K tensors cannot be stacked); that case raises :class:`KPLInputError` saying how to run anyway.
    """
    if rule == "per_class":
        return [min(k, m) for m in sizes]
    kept = list(accumulate(sizes, min, initial=k))[1:]
    if len(set(kept)) > 1:
        c = next(i for i in range(1, len(kept)) if kept[i] < kept[i - 1])
        name = repr(class_names[c]) if class_names is not None else str(c)
        per_class = fix(cli="--k-rule per_class", python="k_rule='per_class'")
        corrected = fix(cli="--mode corrected", python="mode='corrected'")
        raise KPLInputError(
            f"the released code would fail here: class {name} has {sizes[c]} descriptions and lowers its running K "
            f"from {kept[c - 1]} to {kept[c]} after earlier classes kept {kept[c - 1]}, so the per-class top-K sets "
            f"differ in size and the released torch.stack raises. Run it anyway with the paper's per-class rule "
            f"{per_class} or corrected mode {corrected}, or give every class at least K descriptions")
    return kept


def build_text_proxies(x: Tensor, descriptions: Sequence[Tensor], k: int = 8, mode: str = "corrected",
                       k_rule: str | None = None, class_names: Sequence[str] | None = None) -> TextProxies:
    """Text proxies from the top-K descriptions of each class (kpl-method.md, Stage 1 steps 3-5).

    Parameters
    ----------
    x : Tensor (N, d)
        Image embeddings, normalised here as the released code does after encoding (corrected mode keeps rows
        that are unit length already, see :func:`~kplib.params.unit`).
    descriptions : list of Tensor (M_c, d)
        Embeddings of each class's description prompts.
    k : int
        Descriptions kept per class (K = 8 in the released code).
    mode : {"reference", "corrected"}
        Released normalisation and ``torch.topk``, or single normalisation and a stable sort (see module docstring).
    k_rule : {"running_min", "per_class"}, optional
        How K meets short classes; default: ``"running_min"`` in reference mode, ``"per_class"`` in corrected mode.

    Returns
    -------
    TextProxies
        ``proxies`` (C, d), ``logits`` = X Wᵀ (N, C), per-class ``scores`` and ``selected`` indices.
    """
    check("k", k, Interval(int, 1))
    check("mode", mode, MODES)
    check("k_rule", k_rule, K_RULES, none_ok=True)
    x = unit(check_embeddings(x, "image_embeddings"), exact=mode == "reference")  # after encoding, as released
    descs = [unit(d.to(x.dtype)) for d in check_descriptions(descriptions, x.shape[1], class_names)]
    rule = k_rule or ("running_min" if mode == "reference" else "per_class")
    kept = kept_per_class(k, [d.shape[0] for d in descs], rule, class_names)
    again = unit if mode == "reference" else (lambda t: t)  # the released retrieval normalises everything again
    mean_image = again(x).mean(dim=0)
    proxies, scores, selected = [], [], []
    for d, k_c in zip(descs, kept):
        d = again(d)
        s = d @ mean_image
        if mode == "reference":
            idx = torch.topk(s, k_c).indices
        else:
            idx = torch.sort(s, descending=True, stable=True).indices[:k_c]
        proxies.append(unit(d[idx].mean(dim=0)))
        scores.append(s)
        selected.append(idx)
    w = torch.stack(proxies)
    return TextProxies(proxies=w, logits=x @ w.T, scores=scores, selected=selected)


def per_image_text_logits(x: Tensor, descriptions: Sequence[Tensor], k: int = 8, chunk_size: int = 4096) -> Tensor:
    r"""EXTENSION (not the released method): every image retrieves its own top-K descriptions per class.

    For image :math:`i` and class :math:`c`, keep the :math:`K_c=\min(K, M_c)` descriptions most similar to
    :math:`x_i` and score the class by the cosine between :math:`x_i` and their normalised mean. With
    :math:`a = T_{c,S} x_i` (the kept similarities) and the Gram matrix :math:`G_c = T_c T_c^\top`,

    .. math:: \cos(x_i, \textstyle\sum_{m\in S} t_{cm}) = \frac{\sum_m a_m}{\sqrt{\sum_{m,l \in S} G_c[m, l]}} ,

    so no (N, K, d) tensor is formed; images go in chunks of ``chunk_size``. Returns logits (N, C).
    """
    check("k", k, Interval(int, 1))
    x = unit(check_embeddings(x, "image_embeddings"))
    descs = [unit(d.to(x.dtype)) for d in check_descriptions(descriptions, x.shape[1])]
    out = torch.empty(x.shape[0], len(descs), dtype=x.dtype)
    grams = [d @ d.T for d in descs]
    for start in range(0, x.shape[0], chunk_size):
        xb = x[start:start + chunk_size]
        for c, (d, gram) in enumerate(zip(descs, grams)):
            top, idx = torch.topk(xb @ d.T, min(k, d.shape[0]), dim=1)
            sq_norm = gram[idx.unsqueeze(2), idx.unsqueeze(1)].sum(dim=(1, 2))
            out[start:start + chunk_size, c] = top.sum(dim=1) / sq_norm.clamp_min(1e-30).sqrt()
    return out
