r"""Stage 2(b) of KPL — optimal-transport refinement of the pseudo-labels, behind one front door.

The problem (kpl-method.md, Stage 2 (b)) is entropic optimal transport between the :math:`N` images, each of mass
:math:`r_i = 1/N`, and the :math:`C` classes, of masses :math:`q_c`, with the text logits as (negative) cost:

.. math::
    \Pi^\star = \arg\max_{\Pi \ge 0} \; \langle \Pi, L\rangle + \tau_t H(\Pi)
    \quad \text{s.t.}\quad \Pi \mathbf 1_C = r,\;\; \Pi^\top \mathbf 1_N = q ,

whose solution has the form :math:`\Pi_{ic} = \exp\big((L_{ic} + v_c)/\tau_t + u_i\big)`. Every solver starts from
the pseudo-labels :math:`P^0 = \mathrm{softmax}_{\text{row}}(L/\tau_t)` and differs in how it reaches (or does not
reach) the marginals. :func:`transport` takes the logits, ``tau_t`` and ``q`` and chooses the solver with ``method``
(POT style); :data:`TRANSPORT_METHODS` lists them:

* ``"released_greenkhorn"`` — the authors' released routine (reference mode): ``iters`` greedy single-line updates
  of :math:`\log P`, each rescaling the one column or row whose marginal is most violated; the plan is returned
  without multiplying by :math:`N`, so its rows sum to about :math:`1/N`.
* ``"inmap_sinkhorn"`` — InMaP's balanced Sinkhorn: ``iters`` full column-then-row sweeps from :math:`P^0/N`,
  returned times :math:`N` (rows sum to 1).
* ``"semidual"`` — the corrected default: the exact problem solved on its semi-dual over the :math:`C` class
  potentials :math:`v` (POT's ``ot.smooth.smooth_ot_semi_dual`` with the KL regulariser, L-BFGS-B),
  :math:`\max_v\; q^\top v - \tfrac1N \sum_i \tau_t \log\sum_c \exp((L_{ic}+v_c)/\tau_t)`; the plan meets the
  image marginal exactly and the class marginal to the solver's tolerance; rows rescaled to sum to 1.
* ``"sinkhorn_log"``, ``"greenkhorn"`` — POT's log-domain Sinkhorn and Greenkhorn (Altschuler, Weed & Rigollet
  2017) on the same problem, to a tolerance; rows rescaled to sum to 1.
* ``"none"`` — no transport: :math:`P^0` itself (an ablation).

Marginal errors in :class:`TransportResult` are measured on the coupling scale (rows 1/N, columns q) whatever the
scale a routine returns, so solvers can be compared. Class marginals: :func:`class_marginal`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ot
import torch
from torch import Tensor

from ..errors import KPLInputError, fix
from ..params import POSITIVE, Interval, Options, check, check_marginal, check_matrix

__all__ = ["TransportResult", "transport", "TRANSPORT_METHODS", "class_marginal"]


@dataclass
class TransportResult:
    """The transported pseudo-labels and how the solver got there."""

    plan: Tensor  # (N, C), on the scale the routine returns (released: rows ~1/N; others: rows sum to 1)
    iterations: int
    converged: bool | None  # None for fixed-iteration routines
    row_error: float  # max_i |Σ_c Π_ic − 1/N| on the coupling scale
    col_error: float  # max_c |Σ_i Π_ic − q_c| on the coupling scale
    method: str
    updates: list[tuple[str, int]] | None = None  # released routine: [("col", c) | ("row", i), ...]


def _errors(coupling: Tensor, q: Tensor) -> tuple[float, float]:
    n = coupling.shape[0]
    return ((coupling.sum(dim=1) - 1.0 / n).abs().max().item(),
            (coupling.sum(dim=0) - q.to(coupling.dtype)).abs().max().item())


def _released_greenkhorn(logits: Tensor, tau_t: float, q: Tensor, iters: int, **_) -> TransportResult:
    """The released greedy routine, arithmetic included (kpl-method.md, Released-code details 3).

    Each update is two in-place steps — subtract the line's logsumexp, then add ``log q_j`` (or ``log r_i`` with
    ``r = ones(N)/N``) — because fusing them changes results by an ulp, which flips the greedy choice at near-ties.
    Violations are sums of ``exp(log_P)`` per axis, compared as ``max col > max row`` (first index on ties).
    """
    n = logits.shape[0]
    q = q.to(logits.dtype)
    r = torch.ones(n, dtype=logits.dtype) / n
    log_q, log_r = torch.log(q), torch.log(r)
    z = logits / tau_t
    log_p = z - torch.logsumexp(z, dim=1, keepdim=True)
    updates: list[tuple[str, int]] = []
    for _ in range(iters):
        p = torch.exp(log_p)
        col_viol = (p.sum(dim=0) - q).abs()
        row_viol = (p.sum(dim=1) - r).abs()
        if col_viol.max() > row_viol.max():
            j = int(col_viol.argmax())
            log_p[:, j] -= torch.logsumexp(log_p[:, j], dim=0)
            log_p[:, j] += log_q[j]
            updates.append(("col", j))
        else:
            i = int(row_viol.argmax())
            log_p[i] -= torch.logsumexp(log_p[i], dim=0)
            log_p[i] += log_r[i]
            updates.append(("row", i))
    plan = torch.exp(log_p)
    return TransportResult(plan, iters, None, *_errors(plan, q), "released_greenkhorn", updates)


def _inmap_sinkhorn(logits: Tensor, tau_t: float, q: Tensor, iters: int, **_) -> TransportResult:
    """InMaP: from ``P0/N``, ``iters`` times scale columns to q then rows to 1/N; return the plan times N."""
    p0 = torch.softmax(logits / tau_t, dim=1)
    n = p0.shape[0]
    empty = (p0.sum(dim=0) <= 0).nonzero().flatten().tolist()
    if empty:
        raise KPLInputError(
            f"the pseudo-labels give class column(s) {empty} zero probability on every image (softmax(L / tau_t) "
            f"underflows at tau_t={tau_t}), so Sinkhorn cannot scale them to their class share: raise tau_t "
            + fix(cli="--tau-t 0.01", python="tau_t=0.01") + " or use the log-domain solver "
            + fix(cli="--transport semidual", python="transport='semidual'"))
    q = q.to(p0.dtype)
    p = p0 / n
    for _ in range(iters):
        p = p * (q / p.sum(dim=0))
        p = p / (n * p.sum(dim=1, keepdim=True))
    return TransportResult(p * n, iters, None, *_errors(p, q), "inmap_sinkhorn")


def _no_transport(logits: Tensor, tau_t: float, q: Tensor, **_) -> TransportResult:
    """No transport: the pseudo-labels P0 as they are (rows sum to 1), for ablations."""
    p0 = torch.softmax(logits / tau_t, dim=1)
    return TransportResult(p0, 0, None, *_errors(p0 / p0.shape[0], q), "none")


def _rows_to_one(coupling: Tensor, dtype: torch.dtype) -> Tensor:
    return (coupling / coupling.sum(dim=1, keepdim=True).clamp_min(torch.finfo(coupling.dtype).tiny)).to(dtype)


def _semidual(logits: Tensor, tau_t: float, q: Tensor, tol: float, max_iter: int, **_) -> TransportResult:
    """POT's semi-dual solver over the C class potentials (the class side is POT's source, the images its target).

    L-BFGS-B stops when the objective stops decreasing in float64: its change near the optimum is the *square* of
    the class-marginal error, so a stopping threshold near ``tol`` would leave that error far above ``tol``. It is
    run to float64 precision instead (a few more iterations); ``converged`` says whether the error is within ``tol``.
    """
    n = logits.shape[0]
    cost = -logits.double().T.numpy()  # (C, N)
    plan, log = ot.smooth.smooth_ot_semi_dual(q.double().numpy(), np.full(n, 1.0 / n), cost, tau_t, reg_type="kl",
                                              stopThr=1e-20, numItermax=max_iter, log=True)
    coupling = torch.from_numpy(np.ascontiguousarray(plan.T))
    row, col = _errors(coupling, q)
    return TransportResult(_rows_to_one(coupling, logits.dtype), int(log["res"].nit), col <= tol, row, col, "semidual")


def _pot_sinkhorn(logits: Tensor, tau_t: float, q: Tensor, tol: float, max_iter: int, method: str, **_):
    """POT's log-domain Sinkhorn or Greenkhorn in float64; the cost is shifted per row (same plan, no overflow)."""
    n = logits.shape[0]
    cost = (logits.max(dim=1, keepdim=True).values - logits).double()
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if method == "sinkhorn_log":
        coupling, log = ot.sinkhorn(a, q.double(), cost, tau_t, method="sinkhorn_log", numItermax=max_iter,
                                    stopThr=tol, log=True, warn=False)
        iterations = int(log["niter"]) + 1
    else:
        if not (np.exp(-cost.numpy() / tau_t) > 0).any(axis=0).all():
            raise KPLInputError(f"tau_t={tau_t} is too small for transport 'greenkhorn': a whole kernel column "
                                "underflows to 0 in float64; use " + fix(cli="--transport sinkhorn_log",
                                                                         python="transport='sinkhorn_log'"))
        g, log = ot.bregman.greenkhorn(a.numpy(), q.double().numpy(), cost.numpy(), tau_t,
                                       numItermax=max_iter * (n + len(q)), stopThr=tol, log=True, warn=False)
        coupling, iterations = torch.from_numpy(g), int(log["n_iter"]) + 1
    row, col = _errors(coupling, q)
    return TransportResult(_rows_to_one(coupling, logits.dtype), iterations, max(row, col) <= tol, row, col, method)


#: name -> solver; KPLConfig's ``transport`` choices are these names.
TRANSPORT_METHODS = {
    "released_greenkhorn": _released_greenkhorn,
    "inmap_sinkhorn": _inmap_sinkhorn,
    "semidual": _semidual,
    "sinkhorn_log": _pot_sinkhorn,
    "greenkhorn": _pot_sinkhorn,
    "none": _no_transport,
}


def transport(logits: Tensor, tau_t: float = 0.01, class_marginal: Tensor | None = None, method: str = "semidual",
              *, iters: int = 20, tol: float = 1e-6, max_iter: int = 1000) -> TransportResult:
    """Transport the pseudo-labels of ``logits`` towards the class marginal (module docstring for the maths).

    Parameters
    ----------
    logits : Tensor (N, C)
        Text logits :math:`L`; the pseudo-labels are :math:`\\mathrm{softmax}(L/\\tau_t)`.
    tau_t : float
        Temperature of the pseudo-labels and regularisation of the transport (0.01 released).
    class_marginal : Tensor (C,), optional
        Class masses :math:`q` (normalised here); uniform :math:`1/C` when None.
    method : str
        One of :data:`TRANSPORT_METHODS`.
    iters : int
        Updates of the fixed-iteration routines (``released_greenkhorn``: single lines; ``inmap_sinkhorn``: sweeps).
    tol, max_iter : float, int
        Tolerance on the class-marginal error and iteration budget of the solvers that run to convergence.
    """
    logits = check_matrix(logits, "text_logits")
    check("tau_t", tau_t, POSITIVE)
    check("transport method", method, Options(*TRANSPORT_METHODS))
    check("iters_ot", iters, Interval(int, 0))
    check("ot_tol", tol, POSITIVE)
    check("ot_max_iter", max_iter, Interval(int, 1))
    c = logits.shape[1]
    q = torch.full((c,), 1.0 / c, dtype=torch.float64) if class_marginal is None else check_marginal(class_marginal, c)
    result = TRANSPORT_METHODS[method](logits, tau_t=tau_t, q=q, iters=iters, tol=tol, max_iter=max_iter,
                                       method=method)
    if not torch.isfinite(result.plan).all():
        raise KPLInputError(f"transport {method!r} produced NaN/Inf at tau_t={tau_t}; raise tau_t or use "
                            + fix(cli="--transport semidual", python="transport='semidual'"))
    return result


def class_marginal(p0: Tensor, rule: str = "uniform", gamma: float = 0.0, max_iter: int = 100,
                   tol: float = 1e-6) -> Tensor:
    r"""The class marginal :math:`q` the transport aims at, estimated from the pseudo-labels :math:`P^0`.

    * ``"uniform"``: :math:`q_c = 1/C` (the released default; it assumes a balanced test set).
    * ``"gamma"``: :math:`q_c \propto (\sum_i P^0_{ic})^\gamma` (InMaP's exponent; :math:`\gamma = 0` is uniform).
    * ``"em"``: EM re-estimation of the test priors (Saerens, Latinne & Decaestecker 2002) for posteriors calibrated
      to uniform priors: repeat :math:`\pi_{ic} \propto P^0_{ic} q_c` (rows normalised), :math:`q = \frac1N\sum_i
      \pi_{i\cdot}` from :math:`q = 1/C` until :math:`\max|\Delta q| < ` ``tol``. Rows of :math:`P^0` are
      normalised first, so rows that sum to 1/N are accepted.
    """
    check("class_marginal", rule, Options("uniform", "gamma", "em"))
    p0 = check_matrix(p0, "pseudo_labels").double()
    c = p0.shape[1]
    if rule == "uniform":
        return torch.full((c,), 1.0 / c, dtype=torch.float64)
    if rule == "gamma":
        check("gamma", gamma, Interval(float, 0))
        q = p0.sum(dim=0).pow(gamma)
        return q / q.sum()
    post0 = p0 / p0.sum(dim=1, keepdim=True)
    q = torch.full((c,), 1.0 / c, dtype=torch.float64)
    for _ in range(max_iter):
        post = post0 * q
        q, previous = (post / post.sum(dim=1, keepdim=True)).mean(dim=0), q
        if (q - previous).abs().max().item() < tol:
            break
    return q
