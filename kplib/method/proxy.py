r"""Stage 2 (a), (c), (d), (e) of KPL — pseudo-labels, hardening, proxy learning on the sphere, prediction.

Pseudo-labels are :math:`P^0 = \mathrm{softmax}_{\text{row}}(L/\tau_t)`; after transport, rows whose largest entry
exceeds :math:`\alpha` are hardened to one-hot (:func:`harden`). Proxy learning then fits one unit vector per class
in the *image* space so that the images' softmax over proxies explains the targets :math:`Y`:

.. math::
    \min_{\|w_c\| = 1}\; f(W) = -\frac1N \sum_{i=1}^N \sum_{c=1}^C Y_{ic} \log
    \frac{\exp(\langle x_i, w_c\rangle/\tau_i)}{\sum_{c'} \exp(\langle x_i, w_{c'}\rangle/\tau_i)},
    \qquad
    \nabla_W f = \frac{1}{N\tau_i}\Big(\mathrm{diag}(Y\mathbf 1)\,\mathrm{softmax}(XW^\top/\tau_i)
    - Y\Big)^{\!\top} X .

For rows of :math:`Y` that sum to 1 the bracket is :math:`P^\top X - Y^\top X`, which is what the released code uses
as its step direction :math:`G` (kpl-method.md 2(d)). Two modes:

* ``"reference"`` — the released projected gradient descent, step for step: ``base = Yᵀ X``; each step
  :math:`G = \mathrm{softmax}(XW^\top/\tau_i)^\top X - \text{base}`; if :math:`\|G\|_F` grew, halve ``lr`` for
  good; :math:`W \leftarrow W - \frac{lr}{N\tau_i} G`; renormalise rows; exactly ``iters`` steps. With the released
  transport's rows summing to 1/N the pull term ``base`` is about N times too weak — reproduced, not fixed.
* ``"corrected"`` — the same objective solved by L-BFGS (strong-Wolfe line search) on :math:`W = V/\|V\|_{\text{row}}`
  with the *tangent* gradient, stopped at a tolerance (the released rule compares the Euclidean gradient norm,
  whose radial part never vanishes on the sphere, so it keeps halving on noise and stalls).

Each step or evaluation is one pass over X in row chunks (no N×d temporaries), with sums over chunks in float64 so a
million-image loss is not decided by rounding. Reference mode also stops *computing* (not stepping) once its loop
state repeats bit for bit: the remaining steps are then a known cycle and are filled in exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import Tensor

from ..errors import KPLInputError
from ..params import MODES, POSITIVE, Interval, check, check_embeddings, check_matrix, unit

__all__ = ["pseudo_labels", "harden", "ProxyLearningResult", "learn_proxies", "predict"]


def pseudo_labels(logits: Tensor, tau: float) -> Tensor:
    r"""Soft pseudo-labels :math:`P^0 = \mathrm{softmax}_{\text{row}}(L/\tau_t)` (kpl-method.md 2(a))."""
    return torch.softmax(check_matrix(logits, "logits") / check("tau_t", tau, POSITIVE), dim=1)


def harden(p: Tensor, alpha: float = 0.6) -> tuple[Tensor, Tensor]:
    """Confidence hardening (kpl-method.md 2(c)): rows whose maximum exceeds ``alpha`` become one-hot at the argmax.

    Returns ``(Y, mask)``. Rows of the released transport sum to about 1/N, so nothing exceeds alpha there and
    nothing is hardened — reproduced on purpose; the rows are not rescaled here.
    """
    p = check_matrix(p, "pseudo_labels")
    if (p < 0).any():
        raise KPLInputError("pseudo_labels must be non-negative")
    mask = p.max(dim=1).values > alpha
    y = p.clone()
    y[mask] = F.one_hot(p[mask].argmax(dim=1), p.shape[1]).to(p.dtype)
    return y, mask


@dataclass
class ProxyLearningResult:
    """Learned proxies and the history of the optimisation.

    ``lr_history``: reference — the lr of every step (halvings show as drops); corrected — empty (line search).
    ``grad_norms``: reference — :math:`\\|G\\|_F` of every step; corrected — the tangent-gradient norm per evaluation.
    ``losses``: mean cross-entropy before each step (reference) or at each evaluation (corrected).
    ``evaluations``: passes over X actually made (reference: fewer than ``iterations`` once a cycle was found).
    """

    proxies: Tensor  # (C, d) unit rows
    iterations: int
    converged: bool | None
    lr_history: list[float]
    grad_norms: list[float]
    losses: list[float]
    trajectory: list[Tensor] | None  # (C, d) every `record_every` steps, first = initial proxies
    mode: str
    evaluations: int


class _Objective:
    """One chunked pass over X giving the descent direction's ``Pᵀ X`` and the mean cross-entropy ``f(W)``.

    ``base = Yᵀ X`` is computed once. With ``weighted`` the softmax rows are weighted by Y's row sums (the exact
    gradient for any Y); without, ``Pᵀ X`` is the released code's unweighted product.
    """

    def __init__(self, x: Tensor, y: Tensor, tau: float, chunk_size: int, weighted: bool):
        self.x_chunks = x.split(chunk_size)
        self.row_sums = y.sum(dim=1).split(chunk_size)
        self.tau, self.n, self.weighted = tau, x.shape[0], weighted
        tiny = torch.finfo(y.dtype).tiny  # subnormal targets (1/N rows in float32) change Yᵀ X by < 1e-30 but
        y = torch.where(y.abs() < tiny, torch.zeros((), dtype=y.dtype), y)  # make every product ~50x slower
        self.base = sum((yc.T @ xc).double() for yc, xc in zip(y.split(chunk_size), self.x_chunks))

    def __call__(self, w: Tensor) -> tuple[Tensor, float]:
        """``(Pᵀ X, f(W))`` with :math:`f = \\frac1N[\\sum_i (Y\\mathbf 1)_i \\mathrm{lse}_i(XW^\\top/\\tau)
        - \\sum_c \\langle \\text{base}_c, w_c\\rangle/\\tau]`."""
        ptx = torch.zeros(w.shape, dtype=torch.float64)
        lse_sum = torch.zeros((), dtype=torch.float64)
        for xc, rows in zip(self.x_chunks, self.row_sums):
            z = xc @ (w.T / self.tau)
            lse = torch.logsumexp(z, dim=1, keepdim=True)
            p = torch.exp(z - lse)
            ptx += ((p * rows.unsqueeze(1)) if self.weighted else p).T.matmul(xc).double()
            lse_sum += rows.double() @ lse.squeeze(1).double()
        loss = (lse_sum - (self.base * w.double()).sum() / self.tau) / self.n
        return ptx, float(loss)


def learn_proxies(x: Tensor, targets: Tensor, init: Tensor, tau_i: float = 0.04, lr: float = 10.0,
                  iters: int = 2000, mode: str = "reference", tol: float = 1e-6, record_every: int | None = None,
                  *, chunk_size: int = 32768) -> ProxyLearningResult:
    """Fit unit-norm class proxies (C, d) to pseudo-label targets (kpl-method.md 2(d); module docstring for maths).

    Parameters
    ----------
    x : Tensor (N, d)
        Image embeddings (unit rows).
    targets : Tensor (N, C)
        Non-negative targets :math:`Y` (hardened transported pseudo-labels).
    init : Tensor (C, d)
        Initial proxies (the text proxies).
    tau_i, lr, iters : float, float, int
        Temperature, initial step (reference mode) and step count (reference) or L-BFGS iteration budget.
    mode : {"reference", "corrected"}
    tol : float
        Corrected mode: stop when every tangent-gradient entry is below ``tol`` or the loss changes by < tol·1e-3.
    record_every : int, optional
        Keep a snapshot of the proxies every ``record_every`` steps (for the book's trajectory figures).
    """
    for name, value in (("tau_i", tau_i), ("lr", lr), ("tol", tol)):
        check(name, value, POSITIVE)
    check("iters", iters, Interval(int, 0))
    check("mode", mode, MODES)
    check("record_every", record_every, Interval(int, 1), none_ok=True)
    x = check_embeddings(x, "image_embeddings")
    w0 = unit(check_embeddings(init, "init_proxies", dim=x.shape[1]).to(x.dtype))
    y = check_matrix(targets, "targets", cols=w0.shape[0]).to(x.dtype)
    if y.shape[0] != x.shape[0] or (y < 0).any():
        raise KPLInputError(f"targets must be a non-negative ({x.shape[0]}, {w0.shape[0]}) matrix, one row per image "
                            f"and one column per proxy; got shape {tuple(y.shape)}")
    objective = _Objective(x, y, tau_i, chunk_size, weighted=mode != "reference")
    if mode == "reference":
        return _descend(objective, w0, lr, iters, record_every)
    return _lbfgs(objective, w0, iters, tol, record_every)


def _descend(objective: _Objective, w: Tensor, lr: float, iters: int, record_every: int | None):
    """The released loop. Every step is a deterministic function of the state ``(W, lr, previous ‖G‖)``, so once
    the state equals the one 1 or 2 steps earlier the rest is that cycle repeated; it is filled in, not computed."""
    scale = 1.0 / (objective.n * objective.tau)
    pre, records = math.inf, []  # (lr, ‖G‖, loss) per step
    traj = [w.clone()] if record_every else None
    states, period = [(w, lr, pre)], None
    for step in range(1, iters + 1):
        ptx, loss = objective(w)
        g = (ptx - objective.base).to(w.dtype)
        g_norm = float(torch.linalg.vector_norm(g))
        if g_norm > pre:
            lr = lr / 2
        pre = g_norm
        w = unit(w - (lr * scale) * g)
        records.append((lr, g_norm, loss))
        if traj is not None and step % record_every == 0:
            traj.append(w.clone())
        states = [*states[-2:], (w, lr, pre)]
        period = next((p for p in (1, 2) if len(states) > p and states[-1][1:] == states[-1 - p][1:]
                       and torch.equal(states[-1][0], states[-1 - p][0])), None)
        if period:
            break
    done = len(records)
    for k in range(done + 1, iters + 1):  # the cycle, repeated
        phase = (k - done - 1) % period
        records.append(records[done - period + phase])
        if traj is not None and k % record_every == 0:
            traj.append(states[len(states) - period + phase][0].clone())
    if done < iters:
        w = states[len(states) - period + (iters - done - 1) % period][0]
    lrs, norms, losses = (list(col) for col in zip(*records)) if records else ([], [], [])
    return ProxyLearningResult(w, iters, None, lrs, norms, losses, traj, "reference", done)


def _lbfgs(objective: _Objective, w0: Tensor, iters: int, tol: float, record_every: int | None):
    """L-BFGS-B (scipy) on ``V`` with ``W = V/‖V‖``: the gradient through the normalisation is tangent-grad / ‖V‖."""
    shape, dtype = w0.shape, w0.dtype
    losses, norms, traj = [], [], [w0.clone()] if record_every else None

    def fun(v_flat: np.ndarray) -> tuple[float, np.ndarray]:
        v = torch.from_numpy(v_flat).reshape(shape)
        r = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        w = v / r
        ptx, loss = objective(w.to(dtype))
        g = (ptx - objective.base) / (objective.n * objective.tau)
        g_tan = g - (g * w).sum(dim=1, keepdim=True) * w
        losses.append(loss)
        norms.append(float(torch.linalg.vector_norm(g_tan)))
        return loss, (g_tan / r).reshape(-1).numpy()

    steps = 0

    def snapshot(v_flat: np.ndarray) -> None:
        nonlocal steps
        steps += 1
        if record_every and steps % record_every == 0:
            traj.append(unit(torch.from_numpy(v_flat).reshape(shape)).to(dtype))

    if iters == 0:
        return ProxyLearningResult(w0.clone(), 0, False, [], [], [], traj, "corrected", 0)
    res = minimize(fun, w0.double().reshape(-1).numpy(), jac=True, method="L-BFGS-B", callback=snapshot,
                   options=dict(maxiter=iters, maxfun=2 * iters + 25, gtol=tol, ftol=tol * 1e-3, maxcor=20))
    w = unit(torch.from_numpy(res.x).reshape(shape)).to(dtype)
    converged = bool(res.success) and res.nit < iters
    return ProxyLearningResult(w, int(res.nit), converged, [], norms, losses, traj, "corrected", int(res.nfev))


def predict(x: Tensor, proxies: Tensor) -> Tensor:
    r""":math:`\hat y_i = \arg\max_c \langle x_i, w_c\rangle` (kpl-method.md 2(e)); int64 (N,)."""
    x = check_matrix(x, "image_embeddings")
    return (x @ check_matrix(proxies, "proxies", cols=x.shape[1]).to(x.dtype).T).argmax(dim=1)
