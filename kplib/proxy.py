"""Stage 2(a), (c), (d), (e) of KPL — pseudo-labels, hardening, proxy learning, prediction (kpl-method.md).

Proxies are stored as rows: ``W`` is ``(C, d)`` and logits are ``X @ W.T``.

Proxy learning minimises the cross-entropy between targets ``Y`` and ``softmax_row(X Wᵀ / tau_i)`` over proxies
of unit norm. Two modes:

* ``"reference"`` — the released projected gradient descent, step for step (method doc 2(d)): ``base = Yᵀ X``;
  each step ``G = softmax(X Wᵀ/tau_i)ᵀ X - base``; if ``||G||_F`` grew, halve ``lr`` for good; ``W -= lr/(N tau_i) G``;
  renormalise rows. Exactly ``iters`` steps, whatever ``Y``'s row sums are (the released routine's rows sum to
  1/N, which makes the pull term ``base`` ~N times too weak — reproduced, not fixed).
* ``"corrected"`` — the same objective (callers pass targets whose rows sum to 1) solved by L-BFGS with a
  strong-Wolfe line search on ``W = V / ||V||_row``, stopped at a tolerance. The released halving rule compares the
  *Euclidean* gradient norm, whose radial part never vanishes on the sphere, so it keeps halving on float noise
  and stalls (lr → 0) instead of converging; corrected mode measures the tangent gradient instead.

Both modes make one fused pass over X per step/evaluation: X is processed in row chunks, and each chunk gives its
logits, softmax, loss and ``Pᵀ X_chunk`` (no N×d temporaries). Chunk size 32768 rows: measured at N=27,558,
d=768, C=2 on the 2-core project machine, L2-sized chunks (256-4096 rows) were 10-40% *slower* per pass than one
85 MB chunk (its second read comes from the large L3; small chunks add per-call and thread-sync overhead, which
is worst when other processes share the cores). Reference mode also stops computing once the loop state repeats
bit for bit (exact; see ``_learn_reference``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import (
    check_choice,
    check_embeddings,
    check_int,
    check_matrix,
    check_positive,
    check_probability_rows,
)
from .errors import KPLInputError

__all__ = ["pseudo_labels", "harden", "ProxyLearningResult", "learn_proxies", "predict"]


def pseudo_labels(logits: Tensor, tau: float) -> Tensor:
    """Soft pseudo-labels ``softmax_row(logits / tau)`` (method doc 2(a), ``tau = tau_t``)."""
    logits = check_matrix(logits, "logits")
    tau = check_positive(tau, "tau")
    return torch.softmax(logits / tau, dim=1)


def harden(pseudo_labels: Tensor, alpha: float = 0.6) -> tuple[Tensor, Tensor]:
    """Confidence hardening (method doc 2(c)): rows whose maximum exceeds ``alpha`` become one-hot at the argmax.

    Returns ``(Y, hardened_mask)``. With the released routine's rows summing to ~1/N no entry exceeds alpha and
    nothing is hardened — reproduced on purpose (reference mode); do not pre-scale the rows here.
    """
    p = check_probability_rows(pseudo_labels, "pseudo_labels")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise KPLInputError(f"alpha must be a finite number (hardening threshold), got {alpha!r}")
    mask = p.max(dim=1).values > alpha
    y = p.clone()
    if mask.any():
        y[mask] = F.one_hot(p[mask].argmax(dim=1), p.shape[1]).to(p.dtype)
    return y, mask


@dataclass
class ProxyLearningResult:
    """Output of :func:`learn_proxies`.

    ``lr_history``: reference mode — the lr used at every step (length ``iterations``; halvings are visible as
    drops); corrected mode — the last L-BFGS line-search step length (one entry).
    ``grad_norms``: reference — ``||G||_F`` of every step (the quantity the halving rule compares);
    corrected — the tangent-gradient norm ``||grad_W f||_F`` at every function evaluation.
    ``losses``: mean cross-entropy at the proxies *before* each step (reference) / at every evaluation
    (corrected).
    """

    proxies: Tensor  # (C, d)
    iterations: int
    converged: bool | None
    lr_history: list[float]
    grad_norms: list[float]
    losses: list[float] | None
    trajectory: list[Tensor] | None  # snapshots (C, d) every `record_every` steps, first = initial proxies
    mode: str = "reference"
    evaluations: int = 0  # passes over X made (reference: < iterations when a repeating state was detected)


def _fused_pass(
    x_chunks: list[Tensor], y_chunks: list[Tensor], x_sum: Tensor, w: Tensor, tau: float
) -> tuple[Tensor, float]:
    """One read of X: returns ``softmax(X Wᵀ/tau)ᵀ X`` (C, d) and ``Σ_i Σ_c -Y_ic log softmax_ic``.

    Logits are taken relative to class 0 (``x·(w_c - w_0)``, same softmax) so only C-1 columns are multiplied
    with X, and class 0's row of ``Pᵀ X`` is ``Σ_i x_i - Σ_{c≥1} (Pᵀ X)_c`` (rows of P sum to 1). For C=2 this
    halves the arithmetic; chunks keep temporaries at O(chunk · C).

    The sums over chunks are kept in float64 (``Pᵀ X`` and the loss are returned in float64; ``x_sum`` is
    float64 too, from :func:`_base`): in float32 a sum over 10⁶ images carries ~1e-7 relative noise, which is the
    size of the last useful loss decreases; corrected mode's line search then flailed on noise (measured at
    N = 10⁶, C = 10: the loss stopped improving after 13 evaluations and L-BFGS spent 37 more). The products
    inside a chunk stay in X's dtype, so the pass costs the same.

    Matrix layouts were chosen by measurement (N = 10⁶, d = 768, C = 10, 2 cores): logits as ``X @ Vᵀ`` with
    V (C-1, d) contiguous ran 3x faster than ``X @ V`` with V (d, C-1) contiguous; ``Pᵀ X`` as ``Xᵀ P`` with P's
    columns padded to a multiple of 16 ran ~1.3x faster than ``Pᵀ X`` from a strided slice.
    """
    c, d = w.shape
    k = c - 1
    v = ((w[1:] - w[0]) / tau).contiguous()  # (C-1, d)
    acc = torch.zeros(k, d, dtype=torch.float64)
    loss = torch.zeros((), dtype=torch.float64)
    if c == 2:
        for xc, (y1, rows) in zip(x_chunks, y_chunks):  # see _prepare_targets
            # matrix-vector products (measured ~2x faster than the (N,1)/(1,N) GEMM shapes)
            s = xc @ v[0]
            # -[y0 log σ(-s) + y1 log σ(s)] = (y0 + y1) softplus(s) - y1 s
            loss -= torch.dot(rows, F.logsigmoid(-s)) + torch.dot(y1, s)
            acc[0] += torch.sigmoid(s) @ xc
    else:
        width = -(-k // 16) * 16
        p_pad = torch.zeros(x_chunks[0].shape[0], width, dtype=w.dtype)  # padding columns stay 0
        for xc, yc in zip(x_chunks, y_chunks):
            z = F.pad(xc @ v.T, (1, 0))  # (B, C): class 0 has logit 0
            logp = torch.log_softmax(z, dim=1)
            loss -= (yc * logp).sum()
            p = p_pad[: xc.shape[0]]
            torch.exp(logp[:, 1:], out=p[:, :k])
            acc += (xc.T @ p)[:, :k].T
    ptx = torch.cat([(x_sum - acc.sum(dim=0)).unsqueeze(0), acc])
    return ptx, float(loss)


def _prepare_targets(y: Tensor, chunk_size: int) -> list:
    """Target chunks as :func:`_fused_pass` wants them: (B, C) tensors, or for C=2 ``(Y[:, 1], row sums)``.

    Subnormal target entries (|y| < finfo.tiny, e.g. the released routine's 1/N-scaled rows in float32) are set
    to 0: they change ``Yᵀ X`` by < 1e-30 but make every per-step product with Y ~50x slower on x86 (measured).
    """
    tiny = torch.finfo(y.dtype).tiny
    y = torch.where(y.abs() < tiny, torch.zeros((), dtype=y.dtype), y)
    if y.shape[1] == 2:
        return [(yc[:, 1].contiguous(), yc.sum(dim=1)) for yc in y.split(chunk_size)]
    return list(y.split(chunk_size))


def _check_inputs(image_embeddings, targets, init_proxies):
    x = check_embeddings(image_embeddings, "image_embeddings")
    w0 = check_embeddings(init_proxies, "init_proxies", dim=x.shape[1]).to(x.dtype)
    y = check_probability_rows(targets, "targets", n_cols=w0.shape[0]).to(x.dtype)
    if y.shape[0] != x.shape[0]:
        raise KPLInputError(
            f"targets has {y.shape[0]} rows but image_embeddings has {x.shape[0]}; pass one target row per image"
        )
    return x, y, w0


def learn_proxies(
    image_embeddings: Tensor,
    targets: Tensor,
    init_proxies: Tensor,
    tau_i: float = 0.04,
    lr: float = 10.0,
    iters: int = 2000,
    mode: str = "reference",
    tol: float = 1e-6,
    record_every: int | None = None,
    *,
    chunk_size: int = 32768,
    history_size: int = 20,
    detect_cycles: bool = True,
) -> ProxyLearningResult:
    """Learn unit-norm class proxies (C, d) from pseudo-label targets (method doc 2(d)); see module docstring.

    ``iters`` is the exact step count in reference mode and the maximum L-BFGS iteration count in corrected mode.
    ``tol`` (corrected only): stop when every tangent-gradient entry is ≤ ``tol`` or the loss / step change is
    below ``tol · 1e-3`` (torch L-BFGS ``tolerance_grad`` / ``tolerance_change``); ``converged`` is True when
    one of those stopped it before ``iters`` iterations.
    ``lr`` is used by reference mode only (corrected mode's steps come from the line search).
    ``chunk_size`` rows of X are processed at a time (memory/cache knob; no effect on the maths).
    ``detect_cycles`` (reference only): skip the computation of steps once the loop state repeats bit for bit
    (see :func:`_learn_reference`; same proxies and histories as computing them; False computes every step).
    """
    x, y, w0 = _check_inputs(image_embeddings, targets, init_proxies)
    tau_i = check_positive(tau_i, "tau_i")
    lr = check_positive(lr, "lr")
    iters = check_int(iters, "iters", minimum=0)
    mode = check_choice(mode, "mode", ("reference", "corrected"))
    tol = check_positive(tol, "tol")
    chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
    if record_every is not None:
        record_every = check_int(record_every, "record_every", minimum=1)
    x_chunks = list(x.split(chunk_size))
    y_chunks = _prepare_targets(y, chunk_size)
    if mode == "reference":
        return _learn_reference(x, x_chunks, y_chunks, w0, tau_i, lr, iters, record_every, bool(detect_cycles))
    return _learn_corrected(x, x_chunks, y_chunks, w0, tau_i, iters, tol, record_every, history_size)


def _base(x_chunks, y_chunks, w0) -> tuple[Tensor, Tensor]:
    """``Yᵀ X`` (C, d) and ``Σ_i x_i`` (d,), in one read of X, summed over chunks in float64 (see
    :func:`_fused_pass`)."""
    base = torch.zeros(w0.shape, dtype=torch.float64)
    x_sum = torch.zeros(w0.shape[1], dtype=torch.float64)
    for xc, yc in zip(x_chunks, y_chunks):
        if isinstance(yc, tuple):  # C = 2: (Y[:, 1], row sums) -> Y[:, 0] = rows - Y[:, 1]
            y1, rows = yc
            yc = torch.stack([rows - y1, y1], dim=1)
        base += yc.T @ xc
        x_sum += xc.sum(dim=0)
    return base, x_sum


def _learn_reference(x, x_chunks, y_chunks, w0, tau, lr, iters, record_every, detect_cycles=True):
    """The released loop, step for step. With ``detect_cycles`` it stops *computing* (not stepping) once the
    loop state ``(W, lr, pre)`` repeats bit for bit with period 1 or 2: every step is a deterministic function of
    that state, so the remaining steps would repeat the cycle exactly; their records, the trajectory and the
    final proxies are filled in from the cycle. Measured on the benchmark workloads (released 1/N rows, where the
    pull term is negligible and the proxies collapse), the state repeats after 86-160 of the 2000 steps.
    ``evaluations`` counts the passes over X actually made."""
    n = x.shape[0]
    base, x_sum = _base(x_chunks, y_chunks, w0)  # Yᵀ X, computed once
    w = w0.clone()
    pre = math.inf
    lrs, norms, losses = [], [], []
    traj = [w.clone()] if record_every else None
    states: list[tuple[Tensor, float, float]] = [(w, lr, pre)]  # last three states S_{k-2}, S_{k-1}, S_k
    done = 0
    for step in range(iters):
        ptx, loss = _fused_pass(x_chunks, y_chunks, x_sum, w, tau)
        g = (ptx - base).to(w.dtype)
        g_norm = float(torch.linalg.vector_norm(g))
        if g_norm > pre:
            lr = lr / 2  # permanent
        pre = g_norm
        w = w - (lr / (n * tau)) * g
        w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
        lrs.append(lr)
        norms.append(g_norm)
        losses.append(loss / n)
        if traj is not None and (step + 1) % record_every == 0:
            traj.append(w.clone())
        done = step + 1
        if not detect_cycles:
            continue
        states = [*states[-2:], (w, lr, pre)]
        period = next(
            (p for p in (1, 2) if len(states) > p and _same_state(states[-1], states[-1 - p])), None
        )
        if period is not None:
            break
    if done < iters:  # S_done == S_{done-period}: steps done+1.. repeat the last `period` steps exactly
        cycle_w = [st[0] for st in states[-period:]]  # W after steps done-period+1 .. done
        cyc = slice(len(lrs) - period, None)
        rec = list(zip(lrs[cyc], norms[cyc], losses[cyc]))
        for k in range(done + 1, iters + 1):
            r = rec[(k - done - 1) % period]
            lrs.append(r[0])
            norms.append(r[1])
            losses.append(r[2])
            if traj is not None and k % record_every == 0:
                traj.append(cycle_w[(k - done - 1) % period].clone())
        w = cycle_w[(iters - done - 1) % period]
    return ProxyLearningResult(w, iters, None, lrs, norms, losses, traj, "reference", done)


def _same_state(a: tuple[Tensor, float, float], b: tuple[Tensor, float, float]) -> bool:
    return a[1] == b[1] and a[2] == b[2] and torch.equal(a[0], b[0])


def _learn_corrected(x, x_chunks, y_chunks, w0, tau, iters, tol, record_every, history_size) -> ProxyLearningResult:
    n = x.shape[0]
    base, x_sum = _base(x_chunks, y_chunks, w0)
    v_param = torch.nn.Parameter(w0.clone())
    losses, norms = [], []
    traj = [w0.clone()] if record_every else None
    evals = 0

    def closure() -> Tensor:
        nonlocal evals
        with torch.no_grad():
            vv = v_param.detach()
            r = torch.linalg.vector_norm(vv, dim=1, keepdim=True)
            w = vv / r
            ptx, loss = _fused_pass(x_chunks, y_chunks, x_sum, w, tau)
            g = ((ptx - base) / (n * tau)).to(w.dtype)  # Euclidean gradient of the mean CE w.r.t. W
            g_tan = g - (g * w).sum(dim=1, keepdim=True) * w  # tangent to the sphere
            v_param.grad = g_tan / r  # chain rule through W = V / ||V||
            evals += 1
            losses.append(loss / n)
            norms.append(float(torch.linalg.vector_norm(g_tan)))
        return torch.tensor(loss / n, dtype=x.dtype)

    if iters == 0:
        return ProxyLearningResult(w0.clone(), 0, False, [], [], [], traj, "corrected", 0)
    max_eval = iters * 2 + 25
    opt = torch.optim.LBFGS(
        [v_param],
        lr=1.0,
        max_iter=iters if record_every is None else 1,
        max_eval=max_eval,
        tolerance_grad=tol,
        tolerance_change=tol * 1e-3,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )
    state = opt.state[v_param]
    if record_every is None:
        opt.step(closure)  # runs the whole optimisation; stops at a tolerance, max_iter or max_eval
    else:  # one iteration per call so snapshots can be taken (costs one extra evaluation per iteration)
        while int(state.get("n_iter", 0)) < iters and evals < max_eval:
            before = int(state.get("n_iter", 0))
            opt.step(closure)
            n_now = int(state.get("n_iter", 0))
            if n_now % record_every == 0:
                traj.append(F.normalize(v_param.detach(), dim=1).clone())
            if n_now == before or norms[-1] <= tol or (
                len(losses) > 1 and abs(losses[-1] - losses[-2]) < tol * 1e-3
            ):
                break
    n_iter = int(state.get("n_iter", 0))
    steps = [float(state.get("t", 1.0))]
    w = F.normalize(v_param.detach(), dim=1)
    converged = n_iter < iters and evals < max_eval
    return ProxyLearningResult(w, n_iter, converged, steps, norms, losses, traj, "corrected", evals)


def predict(image_embeddings: Tensor, proxies: Tensor) -> Tensor:
    """``argmax_c <x_i, w_c>`` (method doc 2(e)); int64 (N,)."""
    x = check_matrix(image_embeddings, "image_embeddings")
    w = check_matrix(proxies, "proxies", cols=x.shape[1]).to(x.dtype)
    return (x @ w.T).argmax(dim=1)
