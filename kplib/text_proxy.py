"""Stage 1 of KPL — Text Proxy Optimisation (TPO), kpl-method.md "Stage 1".

Each description ``t_cm`` of class c is scored by its mean cosine similarity with *all* N images
(``s_cm = <mean_i x_i, t_cm>``, dataset-level retrieval as in the released code); the top-K' = min(K, M_c)
descriptions are averaged and L2-normalised into the class's text proxy ``w_c``.

:func:`per_image_text_logits` is an **extension** (not the reference): every image retrieves its own top-K
descriptions per class, and its class score is the cosine with the normalised mean of those.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_description_embeddings, check_embeddings, check_int

__all__ = ["TextProxies", "score_descriptions", "build_text_proxies", "per_image_text_logits"]


@dataclass
class TextProxies:
    """Result of stage 1."""

    proxies: Tensor  # (C, d) L2-normalised text proxies w_c
    scores: list[Tensor]  # per class (M_c,) mean image-description similarity s_cm
    selected: list[Tensor]  # per class, indices (K'_c,) of kept descriptions, best first


def _validate(image_embeddings, description_embeddings) -> tuple[Tensor, list[Tensor]]:
    x = check_embeddings(image_embeddings, "image_embeddings")
    descs = check_description_embeddings(description_embeddings, dim=x.shape[1])
    return x, [d.to(x.dtype) for d in descs]


def score_descriptions(image_embeddings: Tensor, description_embeddings: Sequence[Tensor]) -> list[Tensor]:
    """``s_cm = (1/N) Σ_i <x_i, t_cm>`` for every class c and description m (method doc, Stage 1 step 3).

    Computed as the dot product with the mean image embedding: one pass over X, O(N d + Σ_c M_c d).
    """
    x, descs = _validate(image_embeddings, description_embeddings)
    mean_image = x.mean(dim=0)
    return [d @ mean_image for d in descs]


def build_text_proxies(
    image_embeddings: Tensor, description_embeddings: Sequence[Tensor], k: int = 8
) -> TextProxies:
    """Text proxies: average of each class's top-K' descriptions by ``s_cm``, L2-normalised (Stage 1 step 4)."""
    k = check_int(k, "k", minimum=1)
    x, descs = _validate(image_embeddings, description_embeddings)
    mean_image = x.mean(dim=0)
    proxies, scores, selected = [], [], []
    for d in descs:
        s = d @ mean_image
        k_c = min(k, d.shape[0])
        # stable sort so that ties keep knowledge-base order (deterministic, documented)
        idx = torch.sort(s, descending=True, stable=True).indices[:k_c]
        proxies.append(F.normalize(d[idx].mean(dim=0), dim=0))
        scores.append(s)
        selected.append(idx)
    return TextProxies(proxies=torch.stack(proxies), scores=scores, selected=selected)


def per_image_text_logits(
    image_embeddings: Tensor,
    description_embeddings: Sequence[Tensor],
    k: int = 8,
    chunk_size: int = 4096,
) -> Tensor:
    """EXTENSION (not the released method): per-image retrieval of descriptions.

    For image i and class c, keep the K' = min(K, M_c) descriptions most similar to x_i, and score the class by
    the cosine between x_i and the normalised mean of those descriptions. Returns ``(N, C)`` logits.

    The cosine is computed without materialising the (N, K', d) mean vectors: with ``a = t_{c,idx} @ x_i``
    (the K' kept similarities) and the description Gram matrix ``G_c = T_c T_cᵀ``,
    ``cos(x_i, mean) = Σ_k a_k / sqrt(Σ_{k,l} G_c[idx_k, idx_l])`` (x_i is unit-norm). Images are processed in
    chunks of ``chunk_size`` so memory stays O(chunk_size · (M_c + K'²)).
    """
    k = check_int(k, "k", minimum=1)
    chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
    x, descs = _validate(image_embeddings, description_embeddings)
    out = torch.empty(x.shape[0], len(descs), dtype=x.dtype)
    grams = [d @ d.T for d in descs]
    for start in range(0, x.shape[0], chunk_size):
        xb = x[start : start + chunk_size]
        for c, (d, gram) in enumerate(zip(descs, grams)):
            k_c = min(k, d.shape[0])
            sims = xb @ d.T  # (B, M_c)
            top, idx = torch.topk(sims, k_c, dim=1)  # (B, K')
            sq_norm = gram[idx.unsqueeze(2), idx.unsqueeze(1)].sum(dim=(1, 2))  # ||Σ_k t_k||²
            out[start : start + chunk_size, c] = top.sum(dim=1) / sq_norm.clamp_min(1e-30).sqrt()
    return out
