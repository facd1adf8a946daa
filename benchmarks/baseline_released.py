"""A plain transcription of the released KPL post-encoding computation, used only as the benchmark baseline.

Written from ../shared/docs/kpl-method.md, Stage 2, the way the released code computes it: full-batch torch
tensors, StableGreenkhorn (20 single-line updates), hardening at alpha, then 2000 projected-gradient steps on the
proxies with two skinny matrix products per step. No deliberate slowdown, no optimisation either. The library's
reference mode must agree with this on >= 99.9% of predictions; its speed is the denominator of every ratio.
"""
from __future__ import annotations

import torch


def released_stable_greenkhorn(logits: torch.Tensor, tau_t: float = 0.01, iters: int = 20) -> torch.Tensor:
    n, c = logits.shape
    log_p = logits / tau_t
    log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    log_r = torch.full((n,), -torch.log(torch.tensor(float(n))).item())
    log_q = torch.full((c,), -torch.log(torch.tensor(float(c))).item())
    for _ in range(iters):
        p = torch.exp(log_p)
        col_viol = (p.sum(0) - torch.exp(log_q)).abs()
        row_viol = (p.sum(1) - torch.exp(log_r)).abs()
        if col_viol.max() > row_viol.max():
            j = int(col_viol.argmax())
            log_p[:, j] = log_p[:, j] - torch.logsumexp(log_p[:, j], 0) + log_q[j]
        else:
            i = int(row_viol.argmax())
            log_p[i, :] = log_p[i, :] - torch.logsumexp(log_p[i, :], 0) + log_r[i]
    return torch.exp(log_p)


def released_harden(y: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    y = y.clone()
    conf, idx = y.max(dim=1)
    mask = conf > alpha
    y[mask] = torch.nn.functional.one_hot(idx[mask], y.shape[1]).to(y.dtype)
    return y


def released_proxy_descent(
    x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, tau_i: float = 0.04, lr: float = 10.0, iters: int = 2000
) -> torch.Tensor:
    """W is d×C here, exactly as in the method document."""
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
    """Everything after encoding: text logits -> greedy OT -> hardening -> proxy descent -> predictions.

    ``text_proxies`` is (C, d) rows (the library convention); the transcription works with W = its transpose.
    With ``return_proxies`` also returns the learned proxies as (C, d) rows.
    """
    w0 = text_proxies.T.contiguous()
    logits = x @ w0
    y = released_stable_greenkhorn(logits, 0.01, iters_ot)
    y = released_harden(y, 0.6)
    w = released_proxy_descent(x, y, w0, 0.04, 10.0, iters_proxy)
    pred = (x @ w).argmax(dim=1)
    return (pred, w.T.contiguous()) if return_proxies else pred
