"""A plain transcription of the released KPL computation, used only as the benchmark's baseline and agreement oracle.

Written from ../shared/docs/kpl-method.md ("Stage 1", "Stage 2" and "Released-code details") the way the released
code computes it: full-batch torch tensors; stage 1 with the images normalised after encoding and, inside retrieval,
images and descriptions normalised again, the mean image scoring every description, ``torch.topk`` keeping
``k = min(k, M_c)`` where ``k`` is the loop's own variable (a running minimum in class order) and the per-class
top-K embeddings stacked (``torch.stack`` raises when they differ in size); StableGreenkhorn (20 single-line updates,
each as two in-place steps); hardening at alpha inside the descent routine (so the no-transport baseline learns from
hardened P0 too); then 2000 projected-gradient steps on the proxies with two skinny matrix products per step. No
deliberate slowdown, no optimisation either. kplib's reference mode must agree with this; its speed is the
denominator of every ratio in bench_post_encoding.py.
"""
from __future__ import annotations

import torch


def released_text_proxies(image_features: torch.Tensor, description_embeddings: list[torch.Tensor], k: int = 8):
    """Stage 1 as released. Returns ``(x, W, selected, scores)``: the images normalised after encoding (N, d), the
    text proxies as columns W (d, C), the selected description indices and the description scores per class. Raises
    (inside ``torch.stack``) where the released code raises: when the running K leaves the classes' top-K sets of
    unequal size."""
    x = image_features / image_features.norm(dim=-1, keepdim=True)  # after encoding
    x_retrieval = x / x.norm(dim=-1, keepdim=True)  # again, inside retrieval
    mean_image = x_retrieval.mean(dim=0)
    kept, selected, all_scores = [], [], []
    for emb in description_embeddings:
        t = emb / emb.norm(dim=-1, keepdim=True)  # after encoding
        t = t / t.norm(dim=-1, keepdim=True)  # again, inside retrieval
        scores = t @ mean_image
        k = min(k, t.shape[0])  # the loop's own k: a running minimum over classes
        idx = torch.topk(scores, k).indices
        kept.append(t[idx])
        selected.append(idx)
        all_scores.append(scores)
    w = torch.stack(kept).mean(dim=1)  # (C, K, d) -> (C, d); raises for unequal K
    w = w / w.norm(dim=-1, keepdim=True)
    return x, w.T.contiguous(), selected, all_scores


def released_stable_greenkhorn(logits: torch.Tensor, tau_t: float = 0.01, iters: int = 20,
                               return_updates: bool = False):
    """StableGreenkhorn: violations as sums of exp(log_P) per axis, the larger maximum wins, one line rescaled by
    subtracting its logsumexp and then adding ``log q_j`` (or ``log r_i``, ``r = ones(N)/N``) in a second step."""
    n, c = logits.shape
    r = torch.ones(n, dtype=logits.dtype) / n
    q = torch.ones(c, dtype=logits.dtype) / c
    log_r, log_q = torch.log(r), torch.log(q)
    log_p = logits / tau_t
    log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    updates = []
    for _ in range(iters):
        p = torch.exp(log_p)
        col_viol = (p.sum(0) - q).abs()
        row_viol = (p.sum(1) - r).abs()
        if col_viol.max() > row_viol.max():
            j = int(col_viol.argmax())
            log_p[:, j] -= torch.logsumexp(log_p[:, j], 0)
            log_p[:, j] += log_q[j]
            updates.append(("col", j))
        else:
            i = int(row_viol.argmax())
            log_p[i, :] -= torch.logsumexp(log_p[i, :], 0)
            log_p[i, :] += log_r[i]
            updates.append(("row", i))
    return (torch.exp(log_p), updates) if return_updates else torch.exp(log_p)


def released_harden(y: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    y = y.clone()
    conf, idx = y.max(dim=1)
    mask = conf > alpha
    y[mask] = torch.nn.functional.one_hot(idx[mask], y.shape[1]).to(y.dtype)
    return y


def released_proxy_descent(
    x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, tau_i: float = 0.04, lr: float = 10.0, iters: int = 2000,
    alpha: float | None = None,
) -> torch.Tensor:
    """W is d×C here, exactly as in the method document. With ``alpha`` the targets are hardened first, as the
    released routine does to whatever it receives."""
    if alpha is not None:
        y = released_harden(y, alpha)
    n = x.shape[0]
    w = w0.clone()
    base = x.T @ y
    pre = float("inf")
    for _ in range(iters):
        g = x.T @ torch.softmax(x @ w / tau_i, dim=1) - base
        norm = float(torch.linalg.norm(g))
        if norm > pre:
            lr = lr / 2
        pre = norm
        w = w - lr / (n * tau_i) * g
        w = w / w.norm(dim=0, keepdim=True)
    return w


def released_kpl_post_encoding(
    x: torch.Tensor, text_proxies: torch.Tensor, iters_proxy: int = 2000, iters_ot: int = 20,
    return_proxies: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Everything after stage 1: text logits -> greedy OT -> hardening -> proxy descent -> predictions.

    ``text_proxies`` is (C, d) rows (the library convention); the transcription works with W = its transpose.
    With ``return_proxies`` also returns the learned proxies as (C, d) rows.
    """
    w0 = text_proxies.T.contiguous()
    logits = x @ w0
    y = released_stable_greenkhorn(logits, 0.01, iters_ot)
    w = released_proxy_descent(x, y, w0, 0.04, 10.0, iters_proxy, alpha=0.6)
    pred = (x @ w).argmax(dim=1)
    return (pred, w.T.contiguous()) if return_proxies else pred


def released_kpl(image_features: torch.Tensor, description_embeddings: list[torch.Tensor], k: int = 8,
                 iters_proxy: int = 2000, iters_ot: int = 20, tau_t: float = 0.01) -> dict:
    """The released computation end to end from (un-normalised) embeddings, with its three reported accuracies'
    predictions: text proxy, proxy learning on (hardened) P0 without transport, and KPL. Also returns the stage
    results the agreement check compares (selection, text proxies (C, d), plan, updates, learned proxies (C, d))."""
    x, w0, selected, scores = released_text_proxies(image_features, description_embeddings, k)
    logits = x @ w0
    plan, updates = released_stable_greenkhorn(logits, tau_t, iters_ot, return_updates=True)
    p0 = torch.softmax(logits / tau_t, dim=1)
    w_no_ot = released_proxy_descent(x, p0, w0, 0.04, 10.0, iters_proxy, alpha=0.6)
    w = released_proxy_descent(x, plan, w0, 0.04, 10.0, iters_proxy, alpha=0.6)
    return {"selected": selected, "scores": scores, "text_proxies": w0.T.contiguous(),
            "text_predictions": logits.argmax(dim=1), "plan": plan, "updates": updates,
            "no_transport_proxies": w_no_ot.T.contiguous(), "no_transport_predictions": (x @ w_no_ot).argmax(dim=1),
            "proxies": w.T.contiguous(), "predictions": (x @ w).argmax(dim=1)}
